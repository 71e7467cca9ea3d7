"""Models already quantized with torch.ao eager mode keep their own codes and scales."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.ao.quantization as tq
from deployed_models import ResNetStyle, agreement, ao_under_faults, images, to_ao_eager, trained_resnet_style
from torch import nn

from pytest_hwfault import FaultModel, FaultPattern, accuracy, quantize
from pytest_hwfault.deployed import DeployedFormatError
from pytest_hwfault.faults import sample_pattern
from pytest_hwfault.quantization import DeployedMismatchWarning, state_checksum
from pytest_hwfault.spec import Site


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.add = torch.ao.nn.quantized.FloatFunctional()
        self.fc = nn.Linear(8 * 64, 10)
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.relu(self.bn(self.conv(x)))
        x = self.add.add(x, self.conv2(x))
        return self.dequant(self.fc(x.flatten(1)))


@pytest.fixture(scope="module")
def ao_model(digits):  # noqa: ANN001, ANN201
    x = digits.x_train.reshape(-1, 1, 8, 8)
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        net = Net()
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), digits.y_train).backward()
            opt.step()
        net.eval()
        net.qconfig = tq.get_default_qconfig("fbgemm")
        tq.fuse_modules(net, [["conv", "bn", "relu"]], inplace=True)
        prepared = tq.prepare(net)
        prepared(x[:500])
        return tq.convert(prepared)


def test_ao_codes_and_scales_are_used_and_outputs_match(ao_model, digits) -> None:  # noqa: ANN001
    x = digits.x_test.reshape(-1, 1, 8, 8)
    before = state_checksum(ao_model)
    qmodel = quantize(ao_model, x[:256])
    assert qmodel.config["source"] == "torch.ao eager" and list(qmodel.layers) == ["conv", "conv2", "fc"]
    conv = qmodel.layers["conv"]
    weight = ao_model.conv.weight()
    assert torch.equal(conv.weight_codes, weight.int_repr().to(torch.int32))
    assert torch.allclose(conv.weight_scale, weight.q_per_channel_scales().float())
    assert conv.act_scale == pytest.approx(ao_model.conv.scale) and conv.act_zero_point == ao_model.conv.zero_point
    assert conv.act_range == (0, 255 - ao_model.conv.zero_point)  # fused ReLU clamps at the zero point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ao_model(x)
    ours = qmodel(x)
    step = qmodel.layers["fc"].act_scale
    # the same integer model: the same output codes
    assert float((reference - ours).abs().max()) <= step * 1.001
    assert float((reference == ours).float().mean()) == 1.0  # measured: every logit equal
    assert torch.equal(reference.argmax(1), ours.argmax(1))
    assert state_checksum(ao_model) == before


def test_ao_activation_faults_flip_unsigned_codes(ao_model, digits) -> None:  # noqa: ANN001
    x = digits.x_test[:4].reshape(-1, 1, 8, 8)
    qmodel = quantize(ao_model, x)
    layer = qmodel.layers["conv2"]
    captured: list[torch.Tensor] = []
    handle = layer.module.register_forward_hook(lambda m, a, out: captured.append(layer.dequantize_output(out)))
    clean = qmodel(x)
    pattern = FaultPattern.from_faults([("act", "conv2", 5, 7, "flip", 0)])
    faulty = qmodel(x, pattern)
    handle.remove()
    before, after = captured[0].reshape(4, -1)[0, 5], captured[1].reshape(4, -1)[0, 5]
    stored = int(round(float(before) / layer.act_scale)) + layer.act_zero_point  # the quint8 code
    flipped = stored ^ 0x80  # bit 7 of an unsigned code: +-128, no sign extension
    assert int(round(float(after) / layer.act_scale)) + layer.act_zero_point == flipped
    assert not torch.equal(clean, faulty)
    y = digits.y_test[:4]
    for site in (Site.ACT, Site.WEIGHT, Site.ACC, Site.INPUT):
        # `accuracy` draws one trial with torch.Generator().manual_seed(seed): the same pattern, drawn here, is not
        # empty, and the accuracy is that of the faulty outputs, counted image by image
        model = FaultModel(site, 1e-3)
        pattern = sample_pattern(model, qmodel.targets(model.site), len(x), torch.Generator().manual_seed(1))
        assert len(pattern) > 0, site
        expected = sum(int(row.argmax()) == int(label) for row, label in zip(qmodel(x, pattern), y)) / len(x)
        assert accuracy(qmodel, (x, y), model, seed=1) == expected, site


def test_ao_model_needs_8_bits(ao_model, digits) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="bits=4: a deployed torch.ao eager model holds 8-bit codes"):
        quantize(ao_model, digits.x_test[:8].reshape(-1, 1, 8, 8), bits=4)


def test_the_float_baseline_of_a_fused_model_keeps_its_relu(ao_model, digits) -> None:  # noqa: ANN001
    x, y = digits.x_test.reshape(-1, 1, 8, 8), digits.y_test
    qmodel = quantize(ao_model, x[:256])
    assert type(ao_model.conv).__name__ == "ConvReLU2d"  # the fixture fuses conv, bn and relu
    with torch.inference_mode():
        own = float((ao_model(x).argmax(1) == y).float().mean())
    float_accuracy = float((qmodel.float_forward(x).argmax(1) == y).float().mean())
    # measured: 0.9824 for both with the ReLU, 0.9446 without it
    assert own > 0.9 and abs(float_accuracy - own) < 0.01, (float_accuracy, own)


# -- the ResNet-style model every deployed-int8 reader is tested on (tests/deployed_models.py) ------------------------
@pytest.fixture(scope="module")
def ao_resnet(digits):  # noqa: ANN001, ANN201
    return to_ao_eager(trained_resnet_style(digits, eager=True), images(digits.x_train), ResNetStyle.FUSIONS)


@pytest.fixture(scope="module")
def ao_resnet_q(ao_resnet, digits):  # noqa: ANN001, ANN201
    return quantize(ao_resnet, images(digits.x_train))


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model(x)


def test_ao_resnet_style_is_reproduced_exactly(ao_resnet, ao_resnet_q, digits) -> None:  # noqa: ANN001
    x = images(digits.x_test)
    assert list(ao_resnet_q.layers) == ["stem", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "fc"]
    measured = agreement(_run(ao_resnet, x), ao_resnet_q(x), ao_resnet_q.layers["fc"].act_scale)
    # measured: predictions 1.0, exact 1.0, max 0 codes (residual adds, average pool, QuantStub all re-gridded)
    assert measured["predictions"] == 1.0 and measured["exact"] >= 0.999 and measured["max_codes"] <= 1.001, measured


def test_ao_resnet_style_weight_fault_is_the_runtimes(ao_resnet, ao_resnet_q, digits) -> None:  # noqa: ANN001
    x = images(digits.x_test[:8])
    name, index, bit = "block2.conv1", 1000, 7
    faulty = copy.deepcopy(ao_resnet)
    module = faulty.get_submodule(name)
    weight = module.weight()
    codes = weight.int_repr().clone()
    codes.view(-1)[index] ^= 1 << bit  # bit 7 of an int8 code: its sign bit
    module.set_weight_bias(torch._make_per_channel_quantized_tensor(
        codes, weight.q_per_channel_scales(), weight.q_per_channel_zero_points(), weight.q_per_channel_axis()),
        module.bias())
    runtime = _run(faulty, x)
    assert not torch.equal(runtime, _run(ao_resnet, x))  # the fault shows
    assert torch.equal(ao_resnet_q(x, FaultPattern.from_faults([("weight", name, index, bit, "flip")])), runtime)


@pytest.mark.parametrize(("site", "ber"), [("act", 1e-3), ("act", 1e-2), ("weight", 1e-3)])
def test_a_trials_faults_are_the_runtimes(ao_resnet, ao_resnet_q, digits, site, ber) -> None:  # noqa: ANN001
    """A whole trial's faults in every layer (thousands of act codes at once, saturating the residual adds and the
    pool; the int8 weight codes) against torch's quantized kernels running the model under the same faults: logits
    equal bit for bit."""
    x = images(digits.x_test[:32])
    fault_model = FaultModel(site, ber)
    pattern = sample_pattern(fault_model, ao_resnet_q.targets(fault_model.site), len(x),
                             torch.Generator().manual_seed(int(1 / ber)))
    runtime = _run(ao_under_faults(ao_resnet, pattern), x)
    ours = ao_resnet_q(x, pattern)
    assert (ours != ao_resnet_q(x)).float().mean() > 0.5
    assert torch.equal(ours, runtime)


@pytest.mark.parametrize(("name", "index", "bit"), [("block1.conv2", 77, 7), ("fc", 3, 6)])
def test_ao_resnet_style_activation_fault_is_the_runtimes(ao_resnet, ao_resnet_q, digits, name, index,  # noqa: ANN001
                                                          bit) -> None:
    x, image = images(digits.x_test[:8]), 5
    faulty = copy.deepcopy(ao_resnet)

    def edit(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        codes = out.int_repr().contiguous().clone()  # the runtime computes channels-last
        codes[image].view(-1)[index] ^= 1 << bit  # a quint8 code: bit 7 is worth 128 codes, no sign
        return torch._make_per_tensor_quantized_tensor(codes, out.q_scale(), out.q_zero_point())

    faulty.get_submodule(name).register_forward_hook(edit)
    runtime = _run(faulty, x)
    assert not torch.equal(runtime, _run(ao_resnet, x))
    pattern = FaultPattern.from_faults([("act", name, index, bit, "flip", image)])
    assert torch.equal(ao_resnet_q(x, pattern), runtime)


def _converted(make: Any, x: torch.Tensor) -> nn.Module:
    """The model `make()` builds (seeded), converted by torch.ao eager with the x86 qconfig, calibrated on `x`."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = make().eval()
    model.qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.prepare(model)
        prepared(x)
        return tq.convert(prepared)


def _quantized_warning(converted: nn.Module, x: torch.Tensor) -> tuple[Any, list[str]]:
    """The view of `converted`, and the DeployedMismatchWarnings reading it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = quantize(converted, x)
    return qmodel, [str(w.message) for w in caught if issubclass(w.category, DeployedMismatchWarning)]


class _Upsampled(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.up, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Upsample(scale_factor=2, mode=mode), \
            nn.Conv2d(4, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.conv2(self.up(self.conv(self.quant(x)))))


def test_the_view_is_checked_against_the_model_at_load_naming_the_module_that_computes_otherwise(digits) -> None:  # noqa: ANN001
    """A float module a torch.ao eager model runs on quantized tensors runs as it is in the view: a bilinear
    Upsample, whose quantized kernel rounds where the view computes in float, made 10% of the outputs differ
    (0.016 apart) with nothing said. Every static torch.ao model is now compared with the view at load; a
    difference is a DeployedMismatchWarning naming the first module whose output differs."""
    x = images(digits.x_train[:64])
    for mode, equal in (("nearest", True), ("bilinear", False)):
        converted = _converted(lambda: _Upsampled(mode), x)  # noqa: B023 - called at once
        qmodel, mismatches = _quantized_warning(converted, x)
        note = qmodel.config["deployed_notes"][0]
        assert note.startswith("checked against the model (torch's quantized kernels, engine 'x86') on 64 "
                               "calibration images: ")
        if equal:
            assert note.endswith("fault-free outputs equal bit for bit") and not mismatches
            assert torch.equal(_run(converted, x), qmodel(x))
        else:
            assert "fault-free outputs differ" in note and (
                "the first module whose output differs: 'up' (Upsample), or an op the model calls on its input (") \
                in note, note
            assert mismatches == [f"_Upsampled (torch.ao eager): {note}"]
            assert not torch.equal(_run(converted, x), qmodel(x))


class _UpsampledCollapsed(_Upsampled):
    """`_Upsampled` with a last 1x1 conv of zero weights: its output, the model's, is its bias whatever the image
    (as a random-init network's last layers can collapse to one code)."""

    def __init__(self, mode: str) -> None:
        super().__init__(mode)
        self.head = nn.Conv2d(2, 3, 1)
        with torch.no_grad():
            self.head.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.head(self.conv2(self.up(self.conv(self.quant(x))))))


def test_the_load_check_compares_every_layer_not_only_the_outputs_a_collapsed_head_hides(digits) -> None:  # noqa: ANN001
    """The load check compared outputs only: a model whose last layer hands every image the same codes agreed with
    any view of its earlier layers, so a bilinear Upsample the view computes otherwise passed as exact. Each quantized
    layer's output codes are now compared too (on the first 4 images), and the first module apart is named."""
    x = images(digits.x_train[:64])
    for mode in ("nearest", "bilinear"):
        converted = _converted(lambda: _UpsampledCollapsed(mode), x)  # noqa: B023 - called at once
        qmodel, mismatches = _quantized_warning(converted, x)
        note = qmodel.config["deployed_notes"][0]
        assert torch.equal(_run(converted, x), qmodel(x))  # the outputs agree either way
        if mode == "nearest":
            assert note.endswith("on 64 calibration images: output codes of its 3 quantized layers equal on 4 of them, "
                                 "and fault-free outputs equal bit for bit"), note
            assert not mismatches and not qmodel.config["view_mismatch"]
        else:
            assert "fault-free outputs equal, but not layer by layer on 4 of them: the first module whose output " \
                   "differs: 'up' (Upsample), or an op the model calls on its input (" in note, note
            assert "; 1 of 3 quantized layers' output codes differ)" in note, note
            assert mismatches == [f"_UpsampledCollapsed (torch.ao eager): {note}"]
            assert qmodel.config["view_mismatch"] == [note]


def test_the_load_check_under_faults_compares_every_layer(digits, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Under a trial of act faults too, a collapsed head hides a layer computed otherwise (here the reference
    misses the faults of the first conv): the outputs agree, the layers' codes do not, and the view is inexact."""
    from pytest_hwfault import ao_faults

    x = images(digits.x_train[:64])
    converted = _converted(lambda: _UpsampledCollapsed("nearest"), x)
    real = ao_faults.ao_under_faults

    def missing_a_layer(model: nn.Module, pattern: FaultPattern) -> nn.Module:
        return real(model, FaultPattern({k: g for k, g in pattern.groups.items() if k[1] != "conv"}))

    monkeypatch.setattr(ao_faults, "ao_under_faults", missing_a_layer)
    with pytest.warns(DeployedMismatchWarning, match="under a trial of act faults"):
        qmodel = quantize(converted, x)
    note = qmodel.config["deployed_notes"][1]
    assert ": outputs equal bit for bit; layer by layer on 4 of the images: the first module whose output differs: " \
           "'conv' (Conv2d)" in note, note
    assert qmodel.config["view_mismatch"] == [note]


class _UpsampledClassifier(_Upsampled):
    def __init__(self, mode: str) -> None:
        super().__init__(mode)
        self.fc = nn.Linear(2 * 14 * 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.conv2(self.up(self.conv(self.quant(x)))).flatten(1)))


def test_a_campaign_refuses_a_view_that_computes_otherwise_than_the_model_unless_allowed(digits) -> None:  # noqa: ANN001
    """The load check's mismatch was a warning only, shown once per process: a gate judged the view of a bilinear
    Upsample model (10% of outputs apart) and said PASS, a second gate on the cached view said nothing at all. A
    campaign on such a view is now refused, naming the check's note, unless allow_inexact_view=True; then the
    result carries the note (and the campaign its faults: the flag is not part of its id)."""
    from pytest_hwfault.campaign import Campaign
    from pytest_hwfault.evaluate import EvaluationError
    from pytest_hwfault.spec import CampaignSpec

    x = images(digits.x_train[:64])
    for mode in ("bilinear", "nearest"):
        converted = _converted(lambda: _UpsampledClassifier(mode), x)  # noqa: B023 - called at once
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeployedMismatchWarning)
            qmodel = quantize(converted, x)
        labels = qmodel(x).argmax(1)  # the view's own predictions: every fault-free image correct
        strict, allowed = (CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=2, first=2, **extra)
                           for extra in ({}, {"allow_inexact_view": True}))
        assert strict.campaign_id("t") == allowed.campaign_id("t")
        if mode == "bilinear":
            with pytest.raises(EvaluationError, match=r"does not compute what the model computes: checked against "
                               r"the model .* fault-free outputs differ .* 'up' \(Upsample\).* "
                               r"allow_inexact_view=True"):
                Campaign(qmodel, x, labels, strict, "t")
        else:
            assert Campaign(qmodel, x, labels, strict, "t").run().inexact_view == []
        result = Campaign(qmodel, x, labels, allowed, "t").run()
        assert result.inexact_view == (qmodel.config["view_mismatch"] if mode == "bilinear" else [])
        assert (mode == "bilinear") == bool(result.inexact_view)
        assert type(result).from_dict(result.to_dict()).inexact_view == result.inexact_view
        assert result.merge(result).inexact_view == result.inexact_view


class _AuxiliaryHead(nn.Module):
    """An auxiliary classifier the eval forward skips (GoogLeNet's, Inception's): quantized, never run; and a
    Dropout, which convert makes a quantized Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.aux, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 3), nn.Linear(144, 10)
        self.drop = nn.Dropout(0.3)
        self.use_aux = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.conv(self.quant(x)))
        if self.use_aux:
            h = self.aux(h)
        return self.dequant(self.fc(h.flatten(1)))


def test_a_quantized_layer_the_forward_never_runs_is_named_not_refused(digits) -> None:  # noqa: ANN001
    """A converted model with an auxiliary head its eval forward skips was refused ("layer 'aux' did not run on the
    calibration data"), and a quantized Dropout too (torchvision's quantizable GoogLeNet has both). It is gated on
    what runs, the notes naming the layer left out; should it run, the view stops with an error saying so instead of
    computing without it."""
    x = images(digits.x_train[:64])
    converted = _converted(_AuxiliaryHead, x)
    assert isinstance(converted.drop, torch.ao.nn.quantized.Dropout)
    qmodel = quantize(converted, x)
    assert list(qmodel.layers) == ["conv", "fc"]
    assert torch.equal(_run(converted, x), qmodel(x))
    assert any(note.startswith("1 quantized layer(s) did not run on the calibration data ('aux')")
               for note in qmodel.config["deployed_notes"])
    qmodel.module.use_aux = True
    with pytest.raises(DeployedFormatError, match=r"torch.ao eager: layer 'aux' ran, but did not run on the "
                                                  r"calibration data"):
        qmodel(x)
