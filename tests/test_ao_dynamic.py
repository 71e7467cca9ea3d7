"""torch.ao dynamic quantization (`quantize_dynamic`): each call quantizes its input on the input's own range, so the
view computes every image as the model does when it runs one input at a time, bit for bit, and each fault site
means what it means in the runtime: checked against torch's own kernel (fbgemm) where the fault can be made in the
model (weights, weight scales), and against plain integer arithmetic where it cannot (input codes, accumulator)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.quantization as tq
from deployed_models import ao_under_faults
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_hwfault import FaultModel, FaultPattern, quantize
from pytest_hwfault.ao import dynamic_qparams
from pytest_hwfault.deployed import DeployedFormatError
from pytest_hwfault.faults import sample_pattern
from pytest_hwfault.qmodel import SiteUnreachableError

pytestmark = pytest.mark.usefixtures("single_threaded")


class Encoder(nn.Module):
    """Linear layers on [N, T, D] with a LayerNorm and a residual: a small transformer-style block, one layer wide
    (fan-in 1100: its sums pass 2^24, so it accumulates in float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(16, 64), nn.LayerNorm(64)
        self.ff = nn.Sequential(nn.Linear(64, 1100), nn.ReLU(), nn.Linear(1100, 64))
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x))
        return self.head((h + self.ff(h)).mean(1))


class Fused(nn.Module):
    """A Linear and ReLU fused into a dynamic LinearReLU, then a bias-free head with an odd number of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.relu, self.head = nn.Linear(37, 24), nn.ReLU(), nn.Linear(24, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.fc(x)))


def _dynamic(model: nn.Module, per_channel: bool = False, fuse: list[str] | None = None) -> nn.Module:
    qconfig = tq.per_channel_dynamic_qconfig if per_channel else tq.default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model.eval()
        if fuse:
            model = tq.fuse_modules(model, [fuse])
        return tq.quantize_dynamic(model, {nn.Linear: qconfig, nni.LinearReLU: qconfig}, dtype=torch.qint8)


def _inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Images of six kinds: wide and tiny ranges, off-centre, one sign either way, all zero, constant."""
    generator = torch.Generator().manual_seed(seed)
    n = shape[0]
    magnitude = 10 ** (torch.rand(n, generator=generator) * 9 - 6)
    x = torch.randn(shape, generator=generator) * magnitude.reshape(-1, *[1] * (len(shape) - 1))
    x[1::6] += 0.7
    x[2::6] = x[2::6].abs()
    x[3::6] = -x[3::6].abs()
    x[4::6] = 0.0
    x[5::6] = 0.37
    return x


def _one_at_a_time(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + 1]) for i in range(len(x))])


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_a_misread_layer_the_outputs_do_not_show_is_found_module_by_module(monkeypatch) -> None:  # noqa: ANN001
    """The load check compared a dynamic model's outputs only. A head with zero weights (and no bias) gives every
    image the logits 0, so a view that misread an earlier layer agreed with the model bit for bit, and a gate judged
    it. Each dynamic module's outputs are now compared too (one image at a time, as the outputs are): the misread
    layer is named and the view refused."""
    import pytest_hwfault.ao as ao
    from pytest_hwfault.quantization import DeployedMismatchWarning

    torch.manual_seed(3)
    float_model = Fused()
    with torch.no_grad():
        float_model.head.weight.zero_()
    model = _dynamic(float_model, fuse=["fc", "relu"])
    x = _inputs((48, 37), seed=4)
    read = ao.weight_codes

    def misread(module, name, source):  # noqa: ANN001, ANN202
        codes, scale = read(module, name, source)
        if name == "fc":
            codes = codes.clone()
            codes[:, 0] //= 2  # the first input's weight in every output
        return codes, scale

    view = quantize(model, x)  # as read: equal layer by layer too
    assert view.config["deployed_notes"][0].endswith(
        "outputs of its 2 dynamic modules equal on 4 of them, and fault-free outputs equal bit for bit")
    monkeypatch.setattr(ao, "weight_codes", misread)
    with pytest.warns(DeployedMismatchWarning, match=r"fault-free outputs equal, but not layer by layer on 4 of "
                                                     r"them: the first module whose output differs: 'fc' "
                                                     r"\(LinearReLU\)"):
        view = quantize(model, x)
    assert torch.equal(view(x), model(x))  # the outputs cannot tell
    assert len(view.config["view_mismatch"]) == 1


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("kind", ["encoder", "fused"])
def test_the_view_is_the_model_run_one_image_at_a_time(kind: str, per_channel: bool) -> None:
    """Fault-free, on both kernel paths, bit for bit (the sign of zero included), on images whose ranges span nine
    decades, one sign, zero and constants; the load check says so in the model's first note."""
    torch.manual_seed(3)
    model = _dynamic(Encoder(), per_channel) if kind == "encoder" else _dynamic(Fused(), per_channel, ["fc", "relu"])
    x = _inputs((48, 7, 16) if kind == "encoder" else (48, 37), seed=4)
    expected = _one_at_a_time(model, x)
    views = {kernel: quantize(model, x, kernel=kernel) for kernel in ("int8", "emulated")}
    for kernel, view in views.items():
        assert _bits_equal(view(x), expected), kernel
        assert view.config["deployed_notes"][0].endswith("fault-free outputs equal bit for bit"), kernel
        assert all(layer.raw_output and layer.float_output for layer in view.layers.values())
    assert set(views["int8"].kernels.values()) == {"int8"}
    if kind == "encoder":  # the 1100-wide layer sums in float64, exactly
        assert views["int8"].layers["ff.2.linear"].compute_dtype == torch.float64
    else:  # the float baseline: the dequantized weights and the biases, nothing quantized
        fc, head = model.get_submodule("fc"), model.get_submodule("head")
        hidden = torch.relu(torch.nn.functional.linear(x, fc.weight().dequantize(), fc.bias()))
        expected_float = torch.nn.functional.linear(hidden, head.weight().dequantize())
        assert torch.equal(views["int8"].float_forward(x), expected_float)
    # the reader keeps no float copy of a layer in the model, whose parameters the coverage would list as unfaulted
    from pytest_hwfault.coverage import measure_coverage

    coverage = measure_coverage(views["int8"], x[:2])
    assert coverage.macs == 1.0 and not [row for row in coverage.unfaulted if ".linear." in row["parameter"]
                                         or "twin" in row["parameter"]], coverage.unfaulted
    with torch.no_grad():  # the whole batch at once is another computation: one range for all images
        assert not torch.equal(model(x), expected)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
                min_size=1, max_size=40),
       st.sampled_from([1.0, 1e-3, 1e-6, 1e-9]))
def test_each_images_grid_is_atens(values: list[float], factor: float) -> None:
    """The scale and zero point of one image are what ATen's own ChooseQuantizationParams gives
    (`torch._choose_qparams_per_tensor`, reduce_range as fbgemm's dynamic linear asks for it), tiny ranges too."""
    x = torch.tensor(values, dtype=torch.float32) * factor
    scale, zero = dynamic_qparams(x.reshape(1, -1), 127)
    their_scale, their_zero = torch._choose_qparams_per_tensor(x, True)
    assert float(scale[0]) == float(torch.tensor(their_scale, dtype=torch.float32)) and int(zero[0]) == their_zero


@pytest.fixture(scope="module")
def per_channel_model() -> tuple[nn.Module, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = _dynamic(Fused(), per_channel=True, fuse=["fc", "relu"])
    return model, _inputs((12, 37), seed=6)


def _repacked(model: nn.Module, name: str, codes: torch.Tensor | None = None,
              scales: torch.Tensor | None = None) -> nn.Module:
    """A copy of the model whose dynamic layer `name` holds other weight codes or per-channel scales."""
    faulty = copy.deepcopy(model)
    module = faulty.get_submodule(name)
    weight = module.weight()
    module.set_weight_bias(torch._make_per_channel_quantized_tensor(
        weight.int_repr() if codes is None else codes, weight.q_per_channel_scales() if scales is None else scales,
        weight.q_per_channel_zero_points(), 0), module.bias())
    return faulty


def test_a_weight_fault_is_the_runtimes_with_that_code(per_channel_model: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = per_channel_model
    view = quantize(model, x)
    for name, index, bit in (("fc", 40, 7), ("head", 5, 6)):
        codes = model.get_submodule(name).weight().int_repr().clone()
        codes.view(-1)[index] ^= 1 << bit
        runtime = _one_at_a_time(_repacked(model, name, codes=codes), x)
        assert not torch.equal(runtime, _one_at_a_time(model, x))
        faulty = view(x, FaultPattern.from_faults([("weight", f"{name}.linear", index, bit, "flip")]))
        assert _bits_equal(faulty, runtime), name
    assert _bits_equal(view(x), _one_at_a_time(model, x))  # restored


def test_a_trial_of_weight_faults_is_the_runtimes_with_those_codes(
        per_channel_model: tuple[nn.Module, torch.Tensor]) -> None:
    """A whole trial of weight faults (BER 1e-3, every dynamic layer): the view against the model with those codes
    repacked (`ao_under_faults`), run one input at a time, bit for bit."""
    model, x = per_channel_model
    view = quantize(model, x)
    fault_model = FaultModel("weight", 1e-3)
    pattern = sample_pattern(fault_model, view.targets(fault_model.site), len(x), torch.Generator().manual_seed(8))
    assert len(pattern.groups) == len(view.layers)
    runtime = _one_at_a_time(ao_under_faults(model, pattern), x)
    assert not torch.equal(runtime, _one_at_a_time(model, x))
    assert _bits_equal(view(x, pattern), runtime)


def test_a_qparams_fault_flips_a_stored_weight_scale(per_channel_model: tuple[nn.Module, torch.Tensor]) -> None:
    """The runtime multiplies each call's input scale by the weight scale it stores: the layer's qparams words are
    those scales, and a flipped bit is the runtime with that scale."""
    model, x = per_channel_model
    view = quantize(model, x)
    channel, bit = 7, 24  # an exponent bit of the float32 scale
    scales = model.get_submodule("fc").weight().q_per_channel_scales().float()
    scales.view(torch.int32)[channel] ^= 1 << bit
    runtime = _one_at_a_time(_repacked(model, "fc", scales=scales.double()), x)
    faulty = view(x, FaultPattern.from_faults([("qparams", "fc.linear", channel, bit, "flip")]))
    assert _bits_equal(faulty, runtime)
    assert _bits_equal(view(x), _one_at_a_time(model, x))


def _reference(model: nn.Module, x: torch.Tensor, input_fault: tuple[int, int, int] | None = None,
               acc_fault: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The first dynamic layer's output in plain integer arithmetic (Python ints) and fbgemm's float32 steps, with
    one bit of a stored input code (image, element, bit) or of the raw int32 accumulator (image, output, bit)
    flipped."""
    from pytest_hwfault.onednn import fused_multiply_add

    layer = model.get_submodule("fc")
    weight = layer.weight()
    w = weight.int_repr().to(torch.int64)
    scale, zero = torch._choose_qparams_per_tensor(x[0], True)
    scale32 = torch.tensor(scale, dtype=torch.float32)
    codes = (x[0] * (1 / scale32)).round().to(torch.int64) + zero
    codes = codes.clamp(0, 255)
    if input_fault is not None:
        codes[input_fault[1]] ^= 1 << input_fault[2]
    raw = [int(sum(int(c) * int(v) for c, v in zip(codes, row))) for row in w]
    if acc_fault is not None:
        word = raw[acc_fault[1]] & 0xFFFFFFFF ^ (1 << acc_fault[2])
        raw[acc_fault[1]] = word - (1 << 32) if word >= 1 << 31 else word
    corrected = [((r - zero * int(row.sum())) + 2**31) % 2**32 - 2**31 for r, row in zip(raw, w)]
    acc = torch.tensor(corrected, dtype=torch.float32)
    multiplier = scale32 * weight.q_per_channel_scales().float()
    out = fused_multiply_add(acc, multiplier, layer.bias().float())
    return out.clamp_min(0)


@pytest.mark.parametrize(("site", "index", "bit"), [("input", 11, 7), ("input", 3, 0), ("acc", 2, 30), ("acc", 9, 3)])
def test_input_and_accumulator_faults_are_the_integer_arithmetics(per_channel_model: tuple[nn.Module, torch.Tensor],
                                                                 site: str, index: int, bit: int) -> None:
    """An input fault flips a bit of the stored uint8 code (bit 7 of a code in [0, 127] lies outside the input's
    range, and the kernel computes with it); an acc fault flips a bit of the raw int32 sum before the zero point's
    correction."""
    model, x = per_channel_model
    view = quantize(model, x[:1])
    seen: list[torch.Tensor] = []
    handle = model.get_submodule("fc").register_forward_hook(lambda m, a, out: seen.append(out))
    _one_at_a_time(model, x[:1])
    handle.remove()
    assert _bits_equal(_reference(model, x), seen[0][0])  # the reference is the runtime's arithmetic
    captured: list[torch.Tensor] = []
    hook = view.module.get_submodule("fc").register_forward_hook(lambda m, a, out: captured.append(out.clone()))
    fault = (0, index, bit)
    view(x[:1], FaultPattern.from_faults([(site, "fc.linear", index, bit, "flip", 0)]))
    hook.remove()
    expected = _reference(model, x, input_fault=fault if site == "input" else None,
                          acc_fault=fault if site == "acc" else None)
    assert not torch.equal(expected, _reference(model, x))
    assert _bits_equal(captured[0][0], expected)


def test_a_model_of_dynamic_layers_only_has_no_act_site(per_channel_model: tuple[nn.Module, torch.Tensor]) -> None:
    """Its layers' results stay float: a campaign at site act would run fault-free trials and pass. Refused,
    naming the layers and the sites that reach them."""
    from pytest_hwfault.campaign import Campaign
    from pytest_hwfault.spec import CampaignSpec

    model, x = per_channel_model
    view = quantize(model, x)
    labels = view(x).argmax(1)
    with pytest.raises(SiteUnreachableError, match=r"site 'act' has nothing to fault in this model: each of its "
                                                   r"quantized layers \(fc.linear, head.linear\) keeps its result in "
                                                   r"float.*site='acc'"):
        Campaign(view, x, labels, CampaignSpec(site="act", ber=1e-3, min_acc=0.5), "dynamic")


class Recurrent(nn.Module):
    def __init__(self, mode: str = "LSTM", **options: object) -> None:
        super().__init__()
        self.rnn = getattr(nn, mode)(8, 16, batch_first=True, **options)
        self.fc = nn.Linear(16 * (2 if options.get("bidirectional") else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "bidirectional": True}], ids=["one_layer", "stacked"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_a_dynamic_recurrent_model_is_the_model_run_one_sequence_at_a_time(mode: str,
                                                                          options: dict[str, object]) -> None:
    """torch.quantized_lstm / quantized_gru: the input's gate products in one dynamic linear per sequence, the
    hidden state's at every step, torch's own gate equations (a GRU's new state as (h - n) z + n): bit for bit, one
    and two bidirectional layers; every site but act runs, and the model is restored after."""
    from pytest_hwfault.campaign import Campaign
    from pytest_hwfault.spec import CampaignSpec

    torch.manual_seed(9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tq.quantize_dynamic(Recurrent(mode, **options).eval(), {nn.LSTM, nn.GRU, nn.Linear},
                                    dtype=torch.qint8)
    x = torch.randn(40, 7, 8) * torch.logspace(-3, 1, 40).reshape(-1, 1, 1)
    view = quantize(model, x)
    assert view.config["deployed_notes"][0].endswith("fault-free outputs equal bit for bit")
    assert view.layers["rnn.cells.l0.hh.linear"].calls == 7 and view.layers["rnn.cells.l0.ih.linear"].calls == 1
    expected = _one_at_a_time(model, x)
    assert _bits_equal(_one_at_a_time(view, x), expected)
    labels = expected.argmax(1)
    for site in ("input", "acc", "weight", "qparams"):
        spec = CampaignSpec(site=site, ber=3e-3, min_acc=0.5, budget=2, first=2, seed=4)
        trials = [Campaign(view, x, labels, spec, "lstm").trial(i) for i in range(2)]
        assert sum(trial.faults for trial in trials) > 0, site
    assert _bits_equal(_one_at_a_time(view, x), expected)  # weights and scales restored


class PackedRecurrent(nn.Module):
    """Packs its variable-length sequences (zero first feature: padding) before its recurrent module."""

    def __init__(self, mode: str, **options: object) -> None:
        super().__init__()
        self.rnn = getattr(nn, mode)(8, 16, batch_first=True, **options)
        self.fc = nn.Linear(16 * (2 if options.get("bidirectional") else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = (x[:, :, 0] != 0).sum(1).clamp(min=1)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return self.fc(padded[torch.arange(len(x)), lengths - 1])


@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "bidirectional": True}], ids=["one_layer", "stacked"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_a_dynamic_recurrent_model_fed_packed_batches_is_the_model_run_one_sequence_at_a_time(
        mode: str, options: dict[str, object]) -> None:
    """A packed batch (refused before) through torch.quantized_lstm / quantized_gru: torch's packed kernels stop each
    sequence at its length; the view runs one row per image on the padded batch with the steps past an image's
    length on zeros, discarded, whose per-image dynamic ranges include zero as torch's do. Bit for bit against the
    model run one sequence at a time, and the load check says so."""
    torch.manual_seed(9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tq.quantize_dynamic(PackedRecurrent(mode, **options).eval(), {nn.LSTM, nn.GRU, nn.Linear},
                                    dtype=torch.qint8)
    x = torch.randn(40, 7, 8) * torch.logspace(-3, 1, 40).reshape(-1, 1, 1)
    x[:, :, 0] = x[:, :, 0].abs() + 1e-3
    for image in range(40):
        x[image, 1 + image % 7:] = 0
    view = quantize(model, x)
    assert view.config["deployed_notes"][0].endswith("fault-free outputs equal bit for bit")
    assert view.layers["rnn.cells.l0.hh.linear"].calls == 7
    assert view.config["notes"][0].startswith(f"rnn (nn.{mode}) runs packed batches one row per image for 7 steps")
    assert _bits_equal(_one_at_a_time(view, x), _one_at_a_time(model, x))


@pytest.mark.parametrize("module", ["fp16", "lstm_cell"])
def test_dynamic_modules_without_integer_codes_or_support_are_refused_by_name(module: str) -> None:
    torch.manual_seed(7)
    if module == "fp16":
        model = nn.Sequential(nn.Linear(8, 4)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deployed = tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.float16)
        x, match = torch.randn(4, 8), r"dynamic layer '0' holds torch.float16 weights .*dtype=torch.qint8"
    else:
        class Cell(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.cell, self.fc = nn.LSTMCell(8, 16), nn.Linear(16, 3)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.fc(self.cell(x)[0])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deployed = tq.quantize_dynamic(Cell().eval(), {nn.LSTMCell, nn.Linear}, dtype=torch.qint8)
        x, match = torch.randn(4, 8), r"module 'cell' of type torch.ao.nn.quantized.dynamic.*LSTMCell is not " \
                                      r"supported \(dynamic quantization of this module type\)"
    with pytest.raises(DeployedFormatError, match=match):
        quantize(deployed, x)


@pytest.mark.parametrize(("site", "ber"), [("input", 2e-3), ("acc", 2e-3), ("weight", 2e-3), ("qparams", 2e-2)])
def test_trials_resume_late_and_skip_fault_free_images_with_the_same_numbers(site: str, ber: float) -> None:
    """The per-image quantization traces (no branch on sizes or values), so late start's cuts reach inside a
    dynamic layer: a trial resumed from the cache, one that re-runs only the faulty images and one that runs them
    all agree."""
    from pytest_hwfault.campaign import Campaign
    from pytest_hwfault.spec import CampaignSpec

    torch.manual_seed(8)
    model = _dynamic(Encoder(), per_channel=True)
    x = _inputs((60, 7, 16), seed=9)
    view = quantize(model, x)
    assert view.trace_error is None
    labels = view(x).argmax(1)
    spec = CampaignSpec(site=site, ber=ber, min_acc=0.5, budget=4, first=4, seed=2)
    plain = Campaign(view, x, labels, spec, "t", batch_size=16, drop_fault_free=False)
    expected = [plain.trial(i) for i in range(4)]
    assert any(trial.critical for trial in expected), site  # the faults show
    for options in ({"late_start": False}, {}):
        campaign = Campaign(view, x, labels, spec, "t", batch_size=16, **options)
        assert [campaign.trial(i) for i in range(4)] == expected, options
    cache = Campaign(view, x, labels, spec, "t", batch_size=16).late_start()
    assert cache is not None and len(cache.cuts) > 1


def test_an_fx_converted_dynamic_model_is_read_the_same_way() -> None:
    """prepare_fx/convert_fx with a dynamic qconfig leaves dynamic Linear modules in a GraphModule: the same
    reading, bit for bit one input at a time."""
    from torch.ao.quantization import QConfigMapping, quantize_fx

    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = _inputs((36, 16), seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapping = QConfigMapping().set_global(tq.default_dynamic_qconfig)
        converted = quantize_fx.convert_fx(quantize_fx.prepare_fx(model, mapping, (x[:2],)))
    view = quantize(converted, x)
    assert len(view.layers) == 2 and all(layer.raw_output for layer in view.layers.values())
    assert view.config["deployed_notes"][0].endswith("fault-free outputs equal bit for bit")
    assert _bits_equal(_one_at_a_time(view, x), _one_at_a_time(converted, x))
