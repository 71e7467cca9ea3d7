"""torch.ao models under the qnnpack engine (ARM phones and boards: QNNPACK's kernels), read as those kernels compute:
a conv/linear's integer bias and one float32 multiplier, the fixed-point add, the pools' rounding; and the load
check under faults, which every static torch.ao model now passes through."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from deployed_models import ao_under_faults
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_hwfault import FaultModel, FaultPattern, quantize
from pytest_hwfault.ao import (
    QnnpackAddOperand,
    QnnpackAddRequantize,
    pool_adds_zero_point_first,
    qnnpack_add_parameters,
    qnnpack_bias_codes,
)
from pytest_hwfault.deployed import CodeAvgPool
from pytest_hwfault.faults import sample_pattern
from pytest_hwfault.quantization import DeployedMismatchWarning

pytestmark = pytest.mark.skipif("qnnpack" not in torch.backends.quantized.supported_engines,
                                reason="this torch build has no qnnpack engine")


@pytest.fixture
def qnnpack() -> Iterator[None]:
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        yield
    finally:
        torch.backends.quantized.engine = engine


def _every_pair(scale_a: float, zero_a: int, scale_b: float, zero_b: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.arange(256, dtype=torch.uint8).repeat_interleave(256)
    b = torch.arange(256, dtype=torch.uint8).repeat(256)
    return (torch._make_per_tensor_quantized_tensor(a, scale_a, zero_a),
            torch._make_per_tensor_quantized_tensor(b, scale_b, zero_b))


@settings(max_examples=12, deadline=None)
@given(scales=st.tuples(*[st.floats(0.002, 0.2) for _ in range(3)]), zeros=st.tuples(*[st.integers(0, 255)] * 3),
       relu=st.booleans())
def test_the_fixed_point_add_is_qnnpacks_on_every_code_pair(scales: tuple[float, float, float],
                                                            zeros: tuple[int, int, int], relu: bool) -> None:
    """QNNPACK adds in fixed point (22-bit multipliers, a rounding shift); the float add of the x86 kernel differs on
    about one pair in 65,536, and more often on the extreme codes faults make."""
    (sa, sb, sc), (za, zb, zc) = scales, zeros
    if not all(2.0**-14 <= s / sc < 2.0**8 for s in (sa, sb)) or relu and zc == 255:
        return  # QNNPACK refuses these ratios, and an add_relu with nothing above its zero point, itself
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        qa, qb = _every_pair(sa, za, sb, zb)
        kernel = (torch.ops.quantized.add_relu if relu else torch.ops.quantized.add)(qa, qb, sc, zc)
    finally:
        torch.backends.quantized.engine = engine
    ma, mb, shift = qnnpack_add_parameters(sa, sb, sc)
    regrid = QnnpackAddRequantize(sc, zc, zc if relu else 0, 255, -(ma * za + mb * zb), shift)
    ours = regrid(QnnpackAddOperand(sa, za, 0, 255, ma)(qa.dequantize()) + QnnpackAddOperand(sb, zb, 0, 255, mb)(
        qb.dequantize()))
    assert torch.equal(ours, kernel.dequantize())


@pytest.mark.parametrize("channels_last", [False, True])
def test_qnnpack_pools_round_the_mean_then_add_the_zero_point(qnnpack: None, channels_last: bool) -> None:
    """On x86 a contiguous input's pools add the zero point before rounding; QNNPACK's never do."""
    codes = torch.randint(0, 256, (8, 16, 12, 12), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = torch._make_per_tensor_quantized_tensor(codes, 0.05, 3)  # an odd zero point: the two orders differ on ties
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert pool_adds_zero_point_first(x) is False
    for pool in (nn.AvgPool2d(2), nn.AvgPool2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(3)):
        ours = CodeAvgPool(pool, 0.05, 3, 0, 255, zero_point_first=pool_adds_zero_point_first(x))
        assert torch.equal(ours(x.dequantize()), pool(x).dequantize()), pool


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qnnpack_bias_codes_are_the_kernels_on_near_ties(qnnpack: None, kind: str, per_channel: bool) -> None:
    """A layer whose multiplier is exactly 1 outputs its bias code (plus the zero point): read back on biases within
    1e-6 of half a code, where the precision of QNNPACK's steps decides the code. On scales a float32 does not hold,
    the scales' product in float32 (the rule until the thirty-fourth session) missed 16% of these codes; torch takes
    it in float64."""
    generator = torch.Generator().manual_seed(2)
    read, missed = 0, 0
    for _ in range(40):
        layer: Any = torch.ao.nn.quantized.Linear(4, 32) if kind == "linear" else \
            torch.ao.nn.quantized.Conv2d(4, 32, 1)
        values = torch.randn(32, 4, *(() if kind == "linear" else (1, 1)), generator=generator) * 0.05
        # scales a float64 holds (not float32 values, as an observer's are): where the product's precision shows
        w_scale = float(torch.rand(1, generator=generator, dtype=torch.float64) * 0.02 + 0.002)
        weight = torch.quantize_per_channel(values, torch.full((32,), w_scale, dtype=torch.float64),
                                            torch.zeros(32, dtype=torch.long), 0, torch.qint8) if per_channel else \
            torch.quantize_per_tensor(values, w_scale, 0, torch.qint8)
        x_scale = float(torch.rand(1, generator=generator, dtype=torch.float64) * 0.05 + 0.005)
        accumulator = torch.tensor(x_scale, dtype=torch.float32) * torch.tensor(w_scale, dtype=torch.float32)
        halves = torch.randint(-100, 100, (32,), generator=generator).double() + 0.5
        near = halves + (torch.rand(32, generator=generator, dtype=torch.float64) - 0.5) * 1e-6
        bias = (near * x_scale * w_scale).float()
        layer.set_weight_bias(weight, bias)
        layer.scale, layer.zero_point = float(accumulator), 128
        shape = (1, 4) if kind == "linear" else (1, 4, 1, 1)
        x = torch._make_per_tensor_quantized_tensor(torch.full(shape, 7, dtype=torch.uint8), x_scale, 7)
        kernel = layer(x).int_repr().int().flatten() - 128
        codes = qnnpack_bias_codes(bias, x_scale, torch.full((32,), w_scale, dtype=torch.float64))
        assert codes is not None
        readable = kernel.abs() < 127
        read += int(readable.sum())
        missed += int((codes != kernel)[readable].sum())
    assert read > 1000 and missed == 0


class _Block(nn.Module):
    """A stem conv+ReLU, a depthwise conv, a residual add and add_relu, a 1x1 conv, an average pool and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.stem, self.relu = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.add = torch.ao.nn.quantized.FloatFunctional()
        self.add_relu = torch.ao.nn.quantized.FloatFunctional()
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.stem(self.quant(x)))
        h = self.add.add(h, self.depthwise(h))
        h = self.add_relu.add_relu(h, self.pointwise(h))
        return self.dequant(self.fc(self.pool(h).flatten(1)))


def _converted() -> nn.Module:
    torch.manual_seed(0)
    model = _Block().eval()
    model.qconfig = tq.get_default_qconfig("qnnpack")
    tq.fuse_modules(model, [["stem", "relu"]], inplace=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.prepare(model)
        prepared(torch.randn(64, 3, 8, 8))
        return tq.convert(prepared)


class _FxBlock(nn.Module):
    """`_Block` as FX mode quantizes it: its adds are `torch.ops.quantized.add`/`add_relu` in the converted graph."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.depthwise(h)
        h = F.relu(h + self.pointwise(h))
        return self.fc(self.pool(h).flatten(1))


def _converted_fx() -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    calibration = torch.randn(64, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(_FxBlock().eval(), tq.get_default_qconfig_mapping("qnnpack"), (calibration[:1],))
        prepared(calibration)
        return convert_fx(prepared)


def _read_exact(model: nn.Module, x: torch.Tensor) -> tuple[Any, list[str]]:
    """The view of `model` and its notes; a DeployedMismatchWarning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)
        qmodel = quantize(model, x)
    return qmodel, qmodel.config["deployed_notes"]


@pytest.mark.parametrize("form", ["eager", "fx"])
def test_a_qnnpack_model_reads_bit_for_bit_with_faults(qnnpack: None, form: str) -> None:
    """The view computed x86's arithmetic (a float bias on the float accumulator, the float add): 10% of this
    model's outputs apart under qnnpack. Now fault-free, under act faults and under weight faults, its logits are
    torch's own under the same faults; the load check says so, fault-free and under a trial of act faults. An FX
    model's convolutions and `torch.ops.quantized.add`s kept x86's arithmetic until the thirty-fourth session (614 of
    its 640 logits equal fault-free, every layer's codes apart)."""
    model = _converted() if form == "eager" else _converted_fx()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qmodel, notes = _read_exact(model, x)
    assert notes[0].endswith("engine 'qnnpack') on 64 calibration images: output codes of its 4 quantized layers "
                             "equal on 4 of them, and fault-free outputs equal bit for bit"), notes[0]
    assert "under a trial of act faults" in notes[1] and notes[1].endswith("outputs equal bit for bit"), notes[1]
    with torch.no_grad():
        assert torch.equal(model(x), qmodel(x))
    for site in ("act", "weight"):
        for trial in range(3):
            fault_model = FaultModel(site, 1e-2)
            pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x),
                                     torch.Generator().manual_seed(trial))
            with torch.no_grad():
                theirs = ao_under_faults(model, pattern)(x)
            ours = qmodel(x, pattern)
            assert not torch.equal(ours, qmodel(x))  # the faults moved the logits
            assert torch.equal(theirs, ours), (site, trial, float((theirs == ours).float().mean()))


def test_the_load_check_under_faults_makes_a_view_apart_an_inexact_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch.ao model equal to its view fault-free but not under faults (here the reference misses one layer's
    faults) is a DeployedMismatchWarning and an inexact view, which campaigns refuse; a check that cannot run says
    why, and no more."""
    from pytest_hwfault import ao_faults
    from pytest_hwfault.campaign import Campaign
    from pytest_hwfault.evaluate import EvaluationError
    from pytest_hwfault.spec import CampaignSpec

    engine = torch.backends.quantized.engine
    model = _converted()  # qnnpack's qconfig, read under the x86 engine here
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    real = ao_faults.ao_under_faults

    def missing_a_layer(model: nn.Module, pattern: FaultPattern) -> nn.Module:
        return real(model, FaultPattern({k: g for k, g in pattern.groups.items() if k[1] != "pointwise"}))

    monkeypatch.setattr(ao_faults, "ao_under_faults", missing_a_layer)
    with pytest.warns(DeployedMismatchWarning, match=f"engine '{engine}'.* under a trial of act faults .* outputs "
                                                     "differ"):
        qmodel = quantize(model, x)
    assert qmodel.config["view_mismatch"] == [qmodel.config["deployed_notes"][1]]
    spec = CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=2, first=2)
    with pytest.raises(EvaluationError, match="under a trial of act faults"):
        Campaign(qmodel, x, qmodel(x).argmax(1), spec, "t")

    def refused(model: nn.Module, pattern: FaultPattern) -> nn.Module:
        raise ValueError("no such layer")

    monkeypatch.setattr(ao_faults, "ao_under_faults", refused)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)
        notes = quantize(model, x).config["deployed_notes"]
    assert notes[1].startswith("not checked against the model under faults (ValueError: no such layer)"), notes[1]


def test_a_qnnpack_pool_after_a_contiguous_input_is_read_as_qnnpack_rounds(qnnpack: None) -> None:
    """F.avg_pool2d on a contiguous quantized tensor: the reader chose x86's order (zero point first) whatever the
    engine."""
    codes = torch.randint(0, 256, (4, 8, 6, 6), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    x = torch._make_per_tensor_quantized_tensor(codes, 0.05, 3)
    assert torch.equal(CodeAvgPool(nn.AvgPool2d(2), 0.05, 3, 0, 255, zero_point_first=pool_adds_zero_point_first(x))(
        x.dequantize()), F.avg_pool2d(x, 2).dequantize())


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant_a, self.quant_b, self.dequant = tq.QuantStub(), tq.QuantStub(), tq.DeQuantStub()
        self.a, self.b, self.fc = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)
        self.add = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.add.add(self.a(self.quant_a(x)), self.b(self.quant_b(y)))))


def test_a_model_of_several_inputs_says_it_was_not_checked_under_faults() -> None:
    """The check under faults runs a model of one input; one of several is said to be checked fault-free only, not
    left without a word."""
    from pytest_hwfault.data import Inputs

    torch.manual_seed(0)
    model = _TwoInputs().eval()
    model.qconfig = tq.get_default_qconfig("x86")
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.prepare(model)
        prepared(x, y)
        converted = tq.convert(prepared)
        qmodel = quantize(converted, Inputs((x, y)))
    notes = qmodel.config["deployed_notes"]
    assert notes[0].endswith("fault-free outputs equal bit for bit") and not qmodel.config["view_mismatch"]
    assert notes[1].startswith("not checked against the model under faults: the model takes several inputs"), notes[1]


class _Relu6Block(nn.Module):
    """conv -> ReLU6 -> conv -> ReLU6 -> linear, as MobileNetV2 runs them: under FX mode and the qnnpack qconfig the
    ReLU6 stays a module of its own, run on the conv's channels-last output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(inplace=True)
        self.conv2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6()
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).flatten(1))


class _EagerRelu6Block(_Relu6Block):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(super().forward(self.quant(x)))


def _relu6_block(form: str, engine: str, calibration: torch.Tensor) -> nn.Module:
    """`_Relu6Block` converted by torch.ao in `form` (eager or FX) with `engine`'s qconfig."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if form == "fx":
            prepared = prepare_fx(_Relu6Block().eval(), tq.get_default_qconfig_mapping(engine), (calibration[:1],))
            prepared(calibration)
            return convert_fx(prepared)
        model = _EagerRelu6Block().eval()
        model.qconfig = tq.get_default_qconfig(engine)
        prepared = tq.prepare(model)
        prepared(calibration)
        return tq.convert(prepared)


@pytest.mark.parametrize("form", ["eager", "fx"])
@pytest.mark.parametrize("engine", ["qnnpack", "x86"])
def test_torchs_qnnpack_relu6_reads_channels_last_as_nchw_and_the_view_does_too(engine: str, form: str) -> None:
    """torch's qnnpack hardtanh/clamp (ReLU6) on a channels-last tensor returns the codes of its memory read as NCHW
    (75% of codes out of place: a torch defect); the view computed the ReLU6 code by code, so an FX MobileNetV2 under
    qnnpack computed otherwise from its first ReLU6 on (2,475 of 131,072 codes equal at the next conv). The kernel's
    reading is now measured where the model hands it a channels-last tensor, and reproduced: the view equals the
    model layer by layer, fault-free and under act and weight faults, and a note says so. The x86 engine's kernels
    read code by code: no note there."""
    from pytest_hwfault.ao import channels_last_defect, measured_table

    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        grid = (0.05, 128, False)
        table = measured_table(nn.ReLU6(), grid, "ReLU6", "test")[0]
        assert channels_last_defect(nn.ReLU6(), grid, table, "ReLU6", "test") is (engine == "qnnpack")
        hardtanh = lambda t: F.hardtanh(t, 0.0, 6.0)  # noqa: E731
        assert channels_last_defect(hardtanh, grid, table, "hardtanh", "test") is (engine == "qnnpack")
        calibration = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        model = _relu6_block(form, engine, calibration)
        qmodel, notes = _read_exact(model, calibration)
        assert notes[0].endswith("output codes of its 3 quantized layers equal on 4 of them, and fault-free outputs "
                                 "equal bit for bit"), notes[0]
        defect = [note for note in notes if "as if its memory were NCHW" in note]
        assert len(defect) == (engine == "qnnpack"), notes
        for site in ("act", "weight"):
            fault_model = FaultModel(site, 1e-2)
            pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(calibration),
                                     torch.Generator().manual_seed(5))
            with torch.no_grad():
                assert torch.equal(ao_under_faults(model, pattern)(calibration), qmodel(calibration, pattern)), site
    finally:
        torch.backends.quantized.engine = saved


def test_qnnpack_requantizes_with_the_inverse_output_scale(qnnpack: None) -> None:
    """QNNPACK's multiplier is float32(input scale x weight scale) x float32(1 / output scale), the float32 product
    with the accumulator rounded half to even. The view divided by the output scale (one float32 rounding apart),
    which put 10 of 14.7M outputs of random layers, and 1 in 131,072 of ResNet-18's, a code away. Checked here on
    random full and depthwise 3x3 layers, the integer arithmetic done apart from the engine; the divided multiplier,
    as a control, misses some of the same outputs."""
    from pytest_hwfault.deployed import float32_multiplier

    generator = torch.Generator().manual_seed(0)
    missed, divided, outputs = 0, 0, 0
    for trial in range(100):
        channels, groups = 96, 96 if trial % 2 else 1
        inputs = channels if groups > 1 else 16
        layer: Any = torch.ao.nn.quantized.Conv2d(inputs, channels, 3, padding=1, groups=groups)
        w_scale = float(torch.rand(1, generator=generator) * 0.05 + 1e-3)
        codes = torch.randint(-127, 128, (channels, inputs // groups, 3, 3), generator=generator)
        layer.set_weight_bias(torch.quantize_per_tensor(codes.float() * w_scale, w_scale, 0, torch.qint8),
                              torch.randn(channels, generator=generator))
        x_scale = float(torch.rand(1, generator=generator) * 0.05 + 1e-3)
        x_zero = int(torch.randint(0, 256, (1,), generator=generator))
        layer.scale, layer.zero_point = float(torch.rand(1, generator=generator) * 0.5 + 0.05), 128
        x_codes = torch.randint(0, 256, (2, inputs, 16, 16), generator=generator, dtype=torch.uint8)
        x = torch._make_per_tensor_quantized_tensor(x_codes, x_scale, x_zero).contiguous(
            memory_format=torch.channels_last)
        kernel = layer(x).int_repr().long()
        stored = torch.full((channels,), layer.weight().q_scale(), dtype=torch.float64)
        bias = qnnpack_bias_codes(layer.bias(), x_scale, stored)
        assert bias is not None
        acc = F.conv2d(x_codes.double() - x_zero, layer.weight().int_repr().double(), padding=1, groups=groups)
        acc = (acc + bias.double().view(1, -1, 1, 1)).float()  # exact: |acc| < 2^24
        for inverse in (True, False):
            multiplier = float32_multiplier(x_scale, stored, layer.scale, inverse=inverse).view(1, -1, 1, 1)
            ours = (acc * multiplier).round().add(128).clamp(0, 255).long()
            apart = int((ours != kernel).sum())
            missed, divided = (missed + apart, divided) if inverse else (missed, divided + apart)
        outputs += kernel.numel()
    assert outputs > 3_000_000 and missed == 0 and divided > 0, (outputs, missed, divided)
