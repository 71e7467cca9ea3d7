"""The quantized view (pytest_hwfault.quantization): exact codes and scales, calibration, BN folding, errors, and a user
model that stays untouched."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    Branchy,
    assert_requantized,
    float_params,
    input_codes,
    integer_acc,
    seeded,
    watch,
    weights_hold_codes,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytest_hwfault.data import DataError
from pytest_hwfault.faults import FaultPattern, Site
from pytest_hwfault.qmodel import ControlFlowError
from pytest_hwfault.quantization import NoQuantizableLayerError, QuantizedModel, quantize, state_checksum

pytestmark = pytest.mark.usefixtures("single_threaded")  # tiny tensors: one thread is fastest


def _layer_io(qmodel: QuantizedModel, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """For every quantized layer: the float tensor entering it and what it hands on, in one fault-free pass."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    with contextlib.ExitStack() as stack:
        for name in qmodel.layers:
            seen[name] = stack.enter_context(watch(qmodel, name))
        qmodel(x)
    return seen


# -- exactness -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_quantized_layers_compute_exactly_on_codes(which, granularity, bits, digits, noisy_digits, trained_mlp,
                                                   trained_cnn):
    model = trained_mlp if which == "mlp" else trained_cnn
    qmodel = quantize(model, digits.x_train[:256], bits=bits, weight_granularity=granularity)
    qmax = 2 ** (bits - 1) - 1
    assert qmodel.config["bits"] == bits and qmodel.config["weight_granularity"] == granularity
    for name, layer in qmodel.layers.items():
        codes, scale = layer.weight_codes, layer.weight_scale
        assert layer.bits == bits and layer.qmax == qmax
        assert codes.shape == layer.module.weight.shape
        assert not codes.is_floating_point()
        assert scale.shape == (codes.shape[0],) and scale.dtype == torch.float32
        assert int(codes.abs().max()) <= qmax
        assert weights_hold_codes(layer), name
        # the codes are the float (BN-folded) weights rounded on their scale
        weight, _ = float_params(model, qmodel, name)
        view = scale.reshape(-1, *([1] * (codes.dim() - 1)))
        assert torch.equal(codes.to(torch.int64), torch.clamp(torch.round(weight / view), -qmax, qmax).to(torch.int64))
        if granularity == "per_tensor":
            assert torch.equal(scale, scale[:1].expand_as(scale))
            assert int(codes.abs().max()) == qmax  # the largest weight lands on the top code
        else:
            # every output channel uses its whole range
            per_channel_max = codes.reshape(codes.shape[0], -1).abs().amax(dim=1)
            assert torch.equal(per_channel_max, torch.full_like(per_channel_max, qmax)), name
    # every layer hands on exact codes x act scale, equal to the integer reference of its accumulator
    for name, io in _layer_io(qmodel, noisy_digits).items():
        layer = qmodel.layers[name]
        codes = torch.round(io["out"] / layer.act_scale)
        assert int(codes.abs().max()) <= qmax
        acc, slack = integer_acc(model, qmodel, name, input_codes(layer, io["raw"]))
        assert_requantized(qmodel, name, io["out"], acc, slack)


def test_per_channel_and_per_tensor_scales_follow_the_weights() -> None:
    with seeded(20):
        model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
        x = torch.randn(64, 12)
    for bits in (4, 8):
        qmax = 2 ** (bits - 1) - 1
        per_channel = quantize(model, x, bits=bits, weight_granularity="per_channel")
        per_tensor = quantize(model, x, bits=bits, weight_granularity="per_tensor")
        for name in ("0", "2"):
            w = model.get_submodule(name).weight.detach()
            want_channel = w.abs().amax(dim=1) / qmax
            want_tensor = w.abs().max() / qmax
            got_channel = per_channel.layers[name].weight_scale
            got_tensor = per_tensor.layers[name].weight_scale
            assert got_channel.shape == got_tensor.shape == (w.shape[0],)
            torch.testing.assert_close(got_channel, want_channel, rtol=1e-6, atol=0)
            torch.testing.assert_close(got_tensor, want_tensor.expand(w.shape[0]), rtol=1e-6, atol=0)
            assert len(set(got_channel.tolist())) > 1  # the channels really have different scales
            assert len(set(got_tensor.tolist())) == 1
            # codes are round(w / scale), clamped
            codes = per_channel.layers[name].weight_codes
            want_codes = torch.clamp(torch.round(w / got_channel[:, None]), -qmax, qmax)
            assert torch.equal(codes.to(torch.int64), want_codes.to(torch.int64))


def test_max_calibration_scales_cover_the_calibration_range() -> None:
    with seeded(21):
        model = nn.Sequential(nn.Linear(10, 5))
        x = torch.randn(128, 10)
    qmodel = quantize(model, x, bits=8)
    layer = qmodel.layers["0"]
    torch.testing.assert_close(torch.tensor(layer.input_scale), x.abs().max() / 127, rtol=1e-6, atol=0)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(torch.tensor(layer.act_scale), out.abs().max() / 127, rtol=1e-6, atol=0)


def test_percentile_calibration_clips_outliers_and_max_does_not() -> None:
    with seeded(22):
        model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        x = torch.randn(512, 16)
    x[3, 5] = 500.0  # one outlier in the calibration data
    x[100, 0] = -400.0
    by_max = quantize(model, x, calibration="max")
    by_pct = quantize(model, x, calibration="percentile", percentile=99.9)
    assert by_pct.config["calibration"] == "percentile" and by_pct.config["percentile"] == 99.9
    assert by_max.config["percentile"] is None
    first_max, first_pct = by_max.layers["0"], by_pct.layers["0"]
    assert first_pct.input_clip_rate > 0 and first_pct.act_clip_rate > 0
    assert first_pct.input_clip_rate <= 0.01 and first_pct.act_clip_rate <= 0.01  # 99.9th percentile
    assert first_pct.input_scale < first_max.input_scale / 10
    for layer in by_max.layers.values():
        assert layer.input_clip_rate == 0.0 and layer.act_clip_rate == 0.0
    assert by_pct.summary()[0]["input_clip_rate"] == first_pct.input_clip_rate
    # clipped values saturate, they do not wrap: image 3's outlier reads as the top code
    io = _layer_io(by_pct, x[:8])["0"]
    in_codes = input_codes(first_pct, io["raw"])
    assert int(in_codes[3, 5]) == 127
    acc, slack = integer_acc(model, by_pct, "0", in_codes)
    assert_requantized(by_pct, "0", io["out"], acc, slack)


def test_calibration_data_forms_give_identical_scales(digits, digits_mlp) -> None:
    x, y = digits.x_train[:300], digits.y_train[:300]
    reference = quantize(digits_mlp, x, batch_size=64)
    forms = [(x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)]
    for form in forms:
        other = quantize(digits_mlp, form, batch_size=64)
        for name, layer in reference.layers.items():
            assert other.layers[name].act_scale == layer.act_scale
            assert other.layers[name].input_scale == layer.input_scale
            assert torch.equal(other.layers[name].weight_codes, layer.weight_codes)

    # calibration images drawn anew at every read (a training transform) are refused, naming the argument
    noisy = [(xi + 0.1 * torch.rand_like(xi), yi) for xi, yi in zip(x, y)]

    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return x[i] + 0.1 * torch.rand_like(x[i]), y[i]

    with pytest.raises(DataError, match="calibration_data .* gives different images when read twice"):
        quantize(digits_mlp, Noisy(), batch_size=64)
    fixed = quantize(digits_mlp, noisy, batch_size=64)  # a list of items drawn once reads alike every time
    assert fixed.layers.keys() == reference.layers.keys()


# -- structure -------------------------------------------------------------------------------------------------------
def test_bn_is_folded_and_quantized_model_agrees_with_float(digits, digits_mlp, digits_cnn) -> None:
    for model, folded in ((digits_mlp, [("0", "1")]), (digits_cnn, [("1", "2")])):
        qmodel = quantize(model, digits.x_train[:512])
        assert qmodel.folded == folded
        assert qmodel.bn_kept == [] and qmodel.fold_error is None
        with torch.no_grad():
            reference = model(digits.x_test)
        quantized = qmodel(digits.x_test)
        agree = (quantized.argmax(1) == reference.argmax(1)).float().mean()
        assert agree > 0.95
        assert (quantized - reference).abs().mean() < 0.05 * reference.abs().mean()
        assert repr(qmodel).startswith("QuantizedModel(Sequential, 2 layers, bits=8, bn_folded=1, bn_kept=0)")


def test_summary_describes_layers_in_execution_order(q_mlp) -> None:
    summary = q_mlp.summary()
    assert [s["name"] for s in summary] == list(q_mlp.layers) == ["0", "3"]
    assert [s["type"] for s in summary] == ["Linear", "Linear"]
    assert [s["output_shape"] for s in summary] == [[32], [10]]
    first, second = summary
    assert first["input_source"] is None
    # "3" reads "0"'s output codes through BN (folded) and ReLU: same scale, no requantization
    assert second["input_source"] == "0"
    assert second["input_scale"] == first["act_scale"]
    for s in summary:
        assert s["bits"] == 8
        assert 0 < s["weight_scale_mean"] <= s["weight_scale_max"]
        assert s["act_scale"] > 0 and s["input_scale"] > 0


def _non_traceable(digits) -> nn.Module:
    with seeded(23):
        model = Branchy(in_channels=1, channels=4, classes=10)
        model.train()
        with torch.no_grad():
            model(digits.x_train[:256])  # give the BN non-trivial running statistics
    return model.eval()


def test_non_traceable_model_keeps_its_batchnorm(digits) -> None:
    model = _non_traceable(digits)
    qmodel = quantize(model, digits.x_train[:256])
    assert qmodel.bn_kept == ["bn"]
    assert qmodel.folded == []
    assert isinstance(qmodel.fold_error, str) and qmodel.fold_error
    assert list(qmodel.layers) == ["conv", "fc"]
    assert all(s["input_source"] is None for s in qmodel.summary())
    with torch.no_grad():
        reference = model(digits.x_test[:128])
    out = qmodel(digits.x_test[:128])
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()  # the kept BN really runs
    assert (out.argmax(1) == reference.argmax(1)).float().mean() > 0.9


def test_a_batchnorm_whose_tensors_the_forward_reads_is_not_folded() -> None:
    """Folding replaces the BN with an identity and rewrites the conv's weight: a forward that reads the BN's
    statistics, or the conv's weight, directly would crash or see other values. Neither is folded then."""
    class Reads(nn.Module):
        def __init__(self, what: str) -> None:
            super().__init__()
            self.what = what
            self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            extra = self.bn.running_mean if self.what == "bn" else self.conv.weight.mean((1, 2, 3))
            return self.head(self.bn(self.conv(x)).mean((2, 3)) + extra)

    for what in ("bn", "conv"):
        with seeded(9):
            model, x = Reads(what), torch.randn(32, 3, 8, 8)
            with torch.no_grad():
                model.train()(x)  # running statistics that are not the defaults
        model.eval()
        qmodel = quantize(model, x, bits=16)
        assert qmodel.folded == [] and qmodel.bn_kept == ["bn"]
        with torch.no_grad():
            expected = model(x)
        assert torch.allclose(qmodel(x), expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_model_in_another_float_dtype_is_refused_naming_the_layer(dtype: torch.dtype) -> None:
    """Codes are float32 in the view: another dtype would meet them at the first layer and crash its first
    forward. Refused at quantization, naming the layer and the fix."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype).eval()
    with pytest.raises(ValueError, match=rf"layer '0' \(Linear\) computes on {dtype} tensors: quantize works on "
                                         r"float32 models. Pass a float32 copy and float32 inputs \(model.float\(\)"):
        quantize(model, torch.randn(16, 8).to(dtype))


def test_autocast_in_the_forward_is_refused() -> None:
    """Under torch.autocast the emulated layers would multiply codes in bfloat16, which is not exact."""
    class Autocast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.net(x).float()

    with pytest.raises(ValueError, match=r"layer 'net.0' \(Linear\) computes on torch.bfloat16 tensors.*without "
                                         r"torch.autocast in the forward"):
        quantize(Autocast().eval(), torch.randn(16, 8))


def test_a_buffer_used_as_a_weight_is_a_layer() -> None:
    """A registered buffer is stored like a parameter: a functional call on it is a layer holding its codes."""
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("projection", torch.randn(8, 16))
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(F.linear(x, self.projection)))

    with seeded(10):
        model, x = Fixed().eval(), torch.randn(32, 16)
    qmodel = quantize(model, x, bits=16)
    assert set(qmodel.layers) == {"linear()", "head"}
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(qmodel(x), expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


def test_the_models_own_hooks_see_values_and_may_change_them() -> None:
    """Hooks the user registered on the model are copied with it: a forward hook that clamps a layer's output, one
    that records it, a pre-hook that rescales the next layer's input. They run after the engine's requantization
    (on values, not on the accumulator or on codes handed on), and a hooked layer's neighbours do not assume its
    grid: the view computes what the model computes."""
    with seeded(11):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        x = torch.randn(48, 16)
    recorded: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda module, args, out: out.clamp(-0.5, 0.5))
    model[2].register_forward_hook(lambda module, args, out: recorded.append(out.detach().clone()))
    model[4].register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    with torch.no_grad():
        expected = model(x)
    qmodel = quantize(model, x, bits=16)
    assert not any(layer.hands_on_codes or layer.input_source for layer in qmodel.layers.values())
    recorded.clear()
    out = qmodel(x)
    assert torch.allclose(out, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
    with torch.no_grad():
        model(x)
    assert len(recorded) == 2 and torch.allclose(recorded[0], recorded[1], rtol=0, atol=1e-3)


class _WritesInput(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.net = how, nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.how == "sub_":
            x.sub_(0.5)
        elif self.how == "clamp_":  # changes nothing on inputs in range: refused all the same
            x.clamp_(-10, 10)
        elif self.how == "data":  # past the version counter
            x.data.mul_(2)
        elif self.how == "mask" and mask is not None:
            mask.mul_(2)
        return self.net(x if mask is None else x * mask)


@pytest.mark.parametrize("how", ["sub_", "clamp_", "data", "mask"])
def test_a_forward_that_writes_its_input_is_refused_and_the_data_stays(how: str) -> None:
    """A campaign runs the same images many times: a forward that writes its input in place would see its own
    earlier writes (and change the user's data). Refused by one forward on a copy of two images, before any pass
    on the data itself, naming the input; a forward that only reads it is not."""
    from pytest_hwfault.data import Inputs
    from pytest_hwfault.quantization import UnsupportedModelError

    with seeded(12):
        x, mask = torch.randn(16, 8), torch.rand(16, 8)
    data = Inputs((x, mask), ("x", "mask")) if how == "mask" else x
    kept = x.clone(), mask.clone()
    which = "its input 'mask'" if how == "mask" else "its input"
    with pytest.raises(UnsupportedModelError, match=rf"_WritesInput's forward writes {which} in place .*each run would "
                                                    r"see the previous run's writes"):
        quantize(_WritesInput(how).eval(), data, bits=16)
    assert torch.equal(x, kept[0]) and torch.equal(mask, kept[1])
    quantize(_WritesInput("none").eval(), data, bits=16)  # reading it is fine


@pytest.mark.parametrize("scripted", ["root", "submodule"])
def test_a_torchscript_module_is_refused_naming_it(scripted: str) -> None:
    """No hook reaches inside TorchScript: its MACs would run in float, unfaulted. Refused (it crashed while
    freezing the copy's parameters)."""
    inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    if scripted == "root":
        model, where = torch.jit.script(nn.Sequential(inner, nn.Linear(8, 3))), "it is"
    else:
        model, where = nn.Sequential(torch.jit.script(inner), nn.Linear(8, 3)), "its submodule '0' is"
    with pytest.raises(ValueError, match=rf"{where} a TorchScript module .*the engine cannot reach the layers "
                                         r"inside it. Pass the eager module"):
        quantize(model.eval(), torch.randn(16, 8))


def test_batches_of_another_per_image_shape_are_a_refusal() -> None:
    """Faults are placed per image, by position: calibration batches whose per-image shapes differ (ragged
    sequences) are refused as an UnsupportedModelError, which a gate reports as a refusal, not a traceback."""
    from pytest_hwfault.quantization import UnsupportedModelError

    class Sequence(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv1d(4, 8, 3), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean(2))

    class Ragged(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.randn(4, 10 if i < 4 else 12, generator=torch.Generator().manual_seed(i))

    with pytest.raises(UnsupportedModelError, match=r"layer 'conv' \(Conv1d\) ran on tensors shaped .*faults are "
                                                    r"placed per image"):
        quantize(Sequence().eval(), torch.utils.data.DataLoader(Ragged(), batch_size=4))


def test_fold_bn_false_keeps_every_batchnorm_as_a_float_module(digits, digits_cnn) -> None:
    qmodel = quantize(digits_cnn, digits.x_train[:256], fold_bn=False)
    assert qmodel.folded == [] and qmodel.config["fold_bn"] is False
    assert isinstance(qmodel.module.get_submodule("2"), nn.BatchNorm2d)


def test_model_without_quantizable_layer_gets_a_clear_error() -> None:
    with pytest.raises(NoQuantizableLayerError) as info:
        quantize(nn.Sequential(nn.ReLU(), nn.Flatten()), torch.randn(4, 3))
    message = str(info.value)
    for kind in ("Conv1d", "Conv2d", "Conv3d", "Linear"):
        assert kind in message
    assert "Sequential has no quantizable layer" in message
    assert "ReLU" in message and "Flatten" in message  # what was found instead
    assert isinstance(info.value, ValueError)


def test_a_module_used_twice_per_forward_has_one_fault_range_per_call() -> None:
    """A re-used module is one layer (one stored weight) whose transient sites count each call's tensor in turn."""
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    with seeded(3):
        model, x = Twice().eval(), torch.randn(8, 4)
    qmodel = quantize(model, x)
    layer = qmodel.layers["fc"]
    assert layer.calls == 2 and layer.numel(Site.ACT) == 8 and layer.numel(Site.WEIGHT) == 16
    seen: list[torch.Tensor] = []
    handle = layer.module.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    clean = qmodel(x)
    first_clean = seen[-2]
    # a top-bit flip in the second call's output is that call's code moved by 2^(bits-1), and nothing else
    second = qmodel(x, faults=FaultPattern.from_faults([("act", "fc", 4 + 1, 7, "flip", 0)]))
    assert torch.equal(seen[-2], first_clean)
    moved = (second != clean).nonzero().tolist()
    assert moved == [[0, 1]]
    assert abs(round(float(second[0, 1] - clean[0, 1]) / layer.act_scale)) == 128
    # the same flip in the first call's output changes what the second call reads
    qmodel(x, faults=FaultPattern.from_faults([("act", "fc", 1, 7, "flip", 0)]))
    assert not torch.equal(seen[-2], first_clean)
    handle.remove()
    with pytest.raises(IndexError, match=r"allowed 0..7"):
        qmodel(x, faults=FaultPattern.from_faults([("act", "fc", 8, 0, "flip", 0)]))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"bits": 1}, ValueError, r"bits=1 must be an integer in \[2, 16\]"),
        ({"bits": 17}, ValueError, r"bits=17 must be an integer in \[2, 16\]"),
        ({"bits": True}, ValueError, r"bits=True"),
        ({"bits": 8.0}, ValueError, r"bits=8.0"),
        ({"weight_granularity": "per_row"}, ValueError, r"weight_granularity='per_row' is not supported"),
        ({"act_granularity": "per_channel"}, ValueError, r"act_granularity='per_channel' is not supported"),
        ({"calibration": "mse"}, ValueError, r"calibration='mse' is not supported; allowed: 'max', 'percentile'"),
        ({"calibration": "percentile", "percentile": 50.0}, ValueError, r"percentile=50.0 must be in \(50, 100\]"),
        ({"memory_format": "nhwc"}, ValueError,
         r"memory_format='nhwc' is not supported; allowed: 'auto', 'channels_last', 'preserve'"),
        ({"pass_codes": "yes"}, ValueError, r"pass_codes='yes' must be True or False"),
    ],
)
def test_quantize_rejects_bad_arguments(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        quantize(nn.Linear(3, 2), torch.randn(4, 3), **kwargs)


def test_quantize_rejects_a_non_module_and_empty_data() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        quantize(lambda x: x, torch.randn(4, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calibration_data is empty"):
        quantize(nn.Linear(3, 2), torch.empty(0, 3))


# -- the user's model ------------------------------------------------------------------------------------------------
def _hooks(model: nn.Module) -> list[str]:
    found = []
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(m, attr, None):
                found.append(f"{name or '<root>'}.{attr}")
    return found


def test_quantize_leaves_the_users_model_untouched(digits, digits_cnn) -> None:
    model = digits_cnn.train()  # in training mode: running BN in train mode would change its statistics
    for p in model.parameters():
        p.requires_grad_(True)
    before = state_checksum(model)
    state = copy.deepcopy(model.state_dict())
    qmodel = quantize(model, digits.x_train[:512], calibration="percentile")
    assert state_checksum(model) == before
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert _hooks(model) == []
    # the view works on its own copy, in eval mode
    assert qmodel.module is not model
    assert not any(m.training for m in qmodel.module.modules() if not isinstance(m, nn.Identity))
    assert all(p.data_ptr() not in {q.data_ptr() for q in model.parameters()} for p in qmodel.module.parameters())


def test_state_checksum_is_bit_exact() -> None:
    with seeded(24):
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    first = state_checksum(model)
    assert first == state_checksum(copy.deepcopy(model))
    assert len(first) == 64 and int(first, 16) >= 0
    with torch.no_grad():
        model[0].weight.view(-1)[0] = torch.nextafter(model[0].weight.view(-1)[0], torch.tensor(10.0))
    assert state_checksum(model) != first  # one ulp of one weight
    other = copy.deepcopy(model)
    other[1].num_batches_tracked += 1
    assert state_checksum(other) != state_checksum(model)  # buffers count too


class TiedEmbedding(nn.Module):
    """Input embedding and output head share one weight, as in many language models."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.emb(tokens)))


def test_a_weight_shared_with_an_unquantized_module_keeps_its_meaning_there() -> None:
    # Only the Linear is quantized; the Embedding that shares its weight still runs in float on the private copy
    # and must keep reading (about) the float weights, not whatever internal form the quantized layer stores.
    with seeded(25):
        model = TiedEmbedding().eval()
        tokens = torch.randint(0, 10, (64,))
    before = state_checksum(model)
    qmodel = quantize(model, tokens)
    assert list(qmodel.layers) == ["head"]
    with torch.no_grad():
        reference = model(tokens)
    out = qmodel(tokens)
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()
    assert (out.argmax(1) == reference.argmax(1)).float().mean() > 0.9
    assert state_checksum(model) == before


def test_tf32_is_off_during_a_cuda_forward_and_restored_after() -> None:
    """TF32 keeps 10 mantissa bits: 12-bit and wider codes would not be summed exactly (no GPU needed to check the
    switch itself)."""
    from pytest_hwfault.quantization import exact_float32

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with exact_float32(torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with pytest.raises(RuntimeError, match="mid-forward"), exact_float32(torch.device("cuda")):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("mid-forward")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class BatchBranch(nn.Module):
    """A forward that takes another branch for small batches (as a campaign runs its faulty images alone): `small`
    replaces `big`, or, with `extra`, runs after it."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.extra = extra
        self.big, self.small = nn.Linear(64, 10), nn.Linear(10 if extra else 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra:
            out = self.big(x)
            return self.small(out) if len(x) <= 32 else out
        return self.big(x) if len(x) > 32 else self.small(x)


@pytest.mark.parametrize("extra", [False, True])
def test_a_branch_the_calibration_did_not_take_is_refused(extra: bool, digits) -> None:
    """A module that did not run on the first calibration batch is no layer: where a later batch runs it, its MACs
    would run in float, out of every fault's reach. Refused, naming it, instead of counted as unfaulted."""
    torch.manual_seed(0)
    model = BatchBranch(extra).eval()
    qmodel = quantize(model, digits.x_train[:256])
    assert list(qmodel.layers) == ["big"]
    qmodel(digits.x_test[:64])  # the branch it was calibrated on
    with pytest.raises(ControlFlowError, match=r"module 'small' \(Linear\) runs in this forward pass but did not run "
                                               r"on the first calibration batch.*control flow depends on its input"):
        qmodel(digits.x_test[:8])


def test_a_layer_a_branch_skips_is_refused(digits) -> None:
    """Calibrated on small batches (both Linears run), a big batch skips `small`: faults meant for it go nowhere."""
    torch.manual_seed(0)
    qmodel = quantize(BatchBranch(extra=True).eval(), digits.x_train[:256], batch_size=16)
    assert list(qmodel.layers) == ["big", "small"]
    qmodel(digits.x_test[:16])
    with pytest.raises(ControlFlowError, match=r"layer 'small' ran 0 time\(s\) in a forward pass of 64 input\(s\) "
                                               r"where it ran 1 while it was calibrated"):
        qmodel(digits.x_test[:64])


def test_calibration_batches_that_run_other_modules_are_refused(digits) -> None:
    torch.manual_seed(0)
    with pytest.raises(ControlFlowError, match=r"module 'small' .* did not run on the first calibration batch"):
        quantize(BatchBranch().eval(), digits.x_train[:280], batch_size=64)  # the last batch: 24 images


class KeywordCalls(nn.Module):
    """Layers called with their input by keyword (``self.fc(input=x)``), or positionally."""

    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.keyword = keyword
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        if self.keyword:
            return self.fc(input=F.relu(self.conv(input=x)).flatten(1))
        return self.fc(F.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("kernel", ["auto", "emulated"])
def test_layers_called_by_keyword_are_quantized_as_positional_calls(kernel: str, digits) -> None:
    """A layer's input given by keyword is the same input: the same codes, scales and faulty outputs as the same
    weights called positionally (the calibration and the engine's hooks read it; before, they found no input)."""
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    torch.manual_seed(0)
    positional = KeywordCalls(keyword=False).eval()
    keyword = copy.deepcopy(positional)
    keyword.keyword = True
    x = digits.x_test[:64]
    views = [quantize(m, digits.x_train[:256], kernel=kernel) for m in (positional, keyword)]
    assert [v.summary() for v in views[0:1]] == [v.summary() for v in views[1:]]
    for site in ("act", "input", "weight"):
        fault_model = FaultModel(site, 1e-2)
        pattern = sample_pattern(fault_model, views[0].targets(fault_model.site), len(x), trial_generator(0, site, 0))
        assert len(pattern) > 0
        outputs = [v(x, pattern) for v in views]
        assert torch.equal(outputs[0], outputs[1]), site
        assert not torch.equal(outputs[0], views[0](x)), f"{site}: the faults changed nothing, the test proves nothing"


class TiedLayers(nn.Module):
    """Two Linear layers reading one weight tensor (``b.weight = a.weight``), or each its own copy of it."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        if tied:
            self.b.weight = self.a.weight
        else:
            self.b.weight = nn.Parameter(self.a.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.b(F.relu(self.a(x)))))


def test_a_tied_weight_is_stored_once_and_faults_reach_every_layer_that_reads_it(digits) -> None:
    """Memory holds a tied weight once: weight faults are drawn over its bits once (not once per reader), and one
    fault reaches both layers, as an untied twin with the same fault in both copies computes. Before, each layer
    had its own copy: twice the bits, and each fault reached one layer."""
    from pytest_hwfault.faults import Fault, FaultModel, sample_pattern, trial_generator

    torch.manual_seed(0)
    tied = TiedLayers(tied=True).eval()
    twin = TiedLayers(tied=False).eval()
    twin.load_state_dict(tied.state_dict())
    x = digits.x_test[:64]
    view, twin_view = quantize(tied, digits.x_train[:256]), quantize(twin, digits.x_train[:256])
    assert [layer.weight_group for layer in view.layers.values()] == [("a", "b"), ("a", "b"), ()]
    assert view.summary()[1]["weight_shared_with"] == ["a"]
    assert all(layer.weight_group == () for layer in twin_view.layers.values())
    assert [t.layer for t in view.targets(Site.WEIGHT)] == ["a", "head"]
    assert [t.layer for t in twin_view.targets(Site.WEIGHT)] == ["a", "b", "head"]
    assert [t.layer for t in view.targets(Site.WEIGHT, layers=("b",))] == ["b"]  # b alone: its (shared) codes
    assert [t.layer for t in view.targets(Site.ACT)] == ["a", "b", "head"]  # the outputs stay apart
    clean = view(x)
    assert torch.equal(clean, twin_view(x))
    states = {name: layer.module.weight.clone() for name, layer in view.layers.items()}
    faults = [Fault("weight", "a", index, 6) for index in (0, 65, 130, 4095)]
    both = FaultPattern.from_faults([*faults, *(Fault("weight", "b", f.index, f.bit) for f in faults)])
    expected = twin_view(x, both)
    assert not torch.equal(expected, twin_view(x, FaultPattern.from_faults(faults)))  # b's copy matters
    for named in ("a", "b"):
        pattern = FaultPattern.from_faults([Fault("weight", named, f.index, f.bit) for f in faults])
        assert torch.equal(view(x, pattern), expected), named
    sampled = sample_pattern(FaultModel("weight", 1e-2), view.targets(Site.WEIGHT), len(x),
                             trial_generator(0, "tied", 0))
    assert {layer for _, layer in sampled.groups} <= {"a", "head"}
    view(x, sampled)
    assert all(torch.equal(layer.module.weight, states[name]) for name, layer in view.layers.items())
    assert torch.equal(view(x), clean)


def test_torch_compile_wrappers_are_left_out_of_the_view(digits) -> None:
    """A torch.compile'd model or submodule is viewed as the module it compiled: compiled code inlines the hooks it
    saw, recompiles when they change and falls back to eager past its limit, so faults would reach some calls and
    not others (before: a different view, functional layers and recompile warnings). The same numbers as the plain
    model, faulty or not, and no compiled code runs."""
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    compilations: list[int] = []

    def backend(graph_module: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        compilations.append(1)
        return graph_module.forward

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
                          nn.Linear(32, 10)).eval()
    inner = copy.deepcopy(plain)
    inner[2] = torch.compile(inner[2], backend=backend)
    x = digits.x_test[:64]
    reference = quantize(plain, digits.x_train[:256])
    fault_model = FaultModel("act", 1e-2)
    pattern = sample_pattern(fault_model, reference.targets(fault_model.site), len(x), trial_generator(0, "c", 0))
    for model, where in ((torch.compile(plain, backend=backend), ["<model>"]), (inner, ["2"])):
        view = quantize(model, digits.x_train[:256])
        assert view.config["compiled"] == where
        assert list(view.layers) == ["0", "2.0", "3"]
        assert torch.equal(view(x), reference(x)) and torch.equal(view(x, pattern), reference(x, pattern))
    assert compilations == []
    assert reference.config["compiled"] == []


class FunctionalTwice(nn.Module):
    """One parameter used by two F.linear calls, or (`copies`) each call its own copy of it."""

    def __init__(self, copies: bool = False) -> None:
        super().__init__()
        self.w, self.head = nn.Parameter(torch.randn(64, 64) / 8), nn.Linear(64, 10)
        self.w2 = nn.Parameter(self.w.detach().clone()) if copies else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(x, self.w))
        return self.head(F.relu(F.linear(h, self.w if self.w2 is None else self.w2)))


def test_a_parameter_two_functional_calls_use_is_stored_once(digits) -> None:
    """The functional layers of two calls on one parameter share its stored codes, as two modules tied to one
    weight do: one fault reaches both, as the same fault in both copies of a two-parameter twin."""
    from pytest_hwfault.faults import Fault

    torch.manual_seed(0)
    model, twin = FunctionalTwice().eval(), FunctionalTwice(copies=True).eval()
    twin.load_state_dict(model.state_dict(), strict=False)  # w and the head; w2 is a copy of w:
    with torch.no_grad():
        twin.w2.copy_(model.w)
    x = digits.x_test[:64]
    view, twin_view = quantize(model, digits.x_train[:256]), quantize(twin, digits.x_train[:256])
    assert view.layers["linear()"].weight_group == ("linear()", "linear_2()")
    assert twin_view.layers["linear()"].weight_group == ()
    assert [t.layer for t in view.targets(Site.WEIGHT)] == ["linear()", "head"]
    faults = [Fault("weight", "linear()", index, 7) for index in (3, 700, 4000)]
    both = FaultPattern.from_faults([*faults, *(Fault("weight", "linear_2()", f.index, f.bit) for f in faults)])
    assert torch.equal(view(x, FaultPattern.from_faults(faults)), twin_view(x, both))
    assert torch.equal(view(x), twin_view(x))


def test_a_layer_whose_input_is_zero_on_every_calibration_image_is_refused_saying_so() -> None:
    """A dead layer before a layer with a bias gives that layer a zero input range, torch's observer its floor
    scale, and the bias codes past the 32-bit accumulator: it was refused with 'use fewer bits' (at 8 bits), which
    is not the cause."""
    with seeded(40):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        x = torch.randn(64, 16)
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
        model[4].bias.copy_(torch.tensor([0.1, 0.5, -0.2, 0.0]))
    with pytest.raises(ValueError, match=r"layer '4': its input was zero on every calibration image, so its input "
                                         r"scale is the observer's floor \(1\.19e-07\) .* remove the dead layers"):
        quantize(model, x)


class _LeNet(nn.Module):
    """PyTorch's classic MNIST net: a pooled conv's output viewed flat (`x.view(-1, 4 * 4 * 4)`)."""

    def __init__(self, viewed: bool = True) -> None:
        super().__init__()
        self.conv, self.fc, self.viewed = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 10), viewed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(h.view(-1, 4 * 4 * 4) if self.viewed else torch.flatten(h, 1))


def test_a_forward_that_views_a_convolutions_output_runs_in_its_own_layout() -> None:
    """The view computes image layers channels-last on the CPU; a forward viewing a conv's output (LeNet's
    `x.view(-1, 320)`) failed on those tensors ('view size is not compatible with input tensor's size and stride').
    Such a model keeps its own layout, with the same numbers as memory_format='preserve', and its notes say so; a
    model that flattens stays channels-last."""
    with seeded(4):
        model, x = _LeNet().eval(), torch.randn(16, 1, 8, 8)
    qmodel = quantize(model, x)
    assert qmodel.config["memory_format"] == "preserve" and not qmodel.channels_last
    assert any("not channels-last: its forward views a convolution's output" in note
               for note in qmodel.config["deployed_notes"])
    preserved = quantize(model, x, memory_format="preserve")
    assert torch.equal(qmodel(x), preserved(x))
    flat = _LeNet(viewed=False).eval()
    flat.load_state_dict(model.state_dict())
    flattened = quantize(flat, x)
    assert flattened.config["memory_format"] == "auto" and flattened.channels_last
    assert torch.equal(flattened(x), qmodel(x))
