"""torch.ao models that run activations on quantized tensors code by code (ReLU6, Hardswish, Sigmoid, ...: the
MobileNetV2/V3 family) and average codes with a mean: read as torch's kernels compute them (a `CodeTable` measured
from the kernel itself, a `CodeAvgPool`), bit for bit, faults included. Both readers refused these models before."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from deployed_models import ao_under_faults, images, to_ao_eager, to_ao_fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_hwfault import FaultModel, quantize
from pytest_hwfault.ao import measured_table
from pytest_hwfault.deployed import CodeAvgPool, CodeTable, DeployedFormatError
from pytest_hwfault.faults import sample_pattern
from pytest_hwfault.quantization import DeployedMismatchWarning
from pytest_hwfault.spec import Site

pytestmark = pytest.mark.usefixtures("single_threaded")


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model(x)


def exact_quantize(model: nn.Module, x: torch.Tensor):  # noqa: ANN201
    """The view of a deployed model, whose load check must find it equal to the model bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)
        return quantize(model, x)


def seeded(factory: type[nn.Module], *args: object) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory(*args).eval()


def _convs(count: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(count))


class FxActivations(nn.Module):
    """Every form of elementwise activation FX mode leaves on quantized tensors, each on its own branch: float
    modules (ReLU6, Hardtanh, Sigmoid, Tanh, Hardsigmoid), quantized modules (Hardswish, ELU, LeakyReLU), functions
    and the quantized ops they become (relu6, hardswish, sigmoid, leaky_relu, clamp, elu, hardsigmoid), methods
    (tanh, clamp); each branch averaged by a mean into its own Linear, their logits summed."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.convs = nn.Conv2d(1, 4, 3, padding=1), _convs(17)
        self.acts = nn.ModuleList([nn.ReLU6(), nn.Hardtanh(-1.0, 2.0), nn.Hardswish(), nn.ELU(0.5), nn.LeakyReLU(0.1),
                                   nn.Sigmoid(), nn.Tanh(), nn.Hardsigmoid()])
        self.fc = nn.ModuleList(nn.Linear(4, 10) for _ in range(17))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        c = [conv(h) for conv in self.convs]
        branches = [act(y) for act, y in zip(self.acts, c)]
        branches += [F.relu6(c[8]), F.hardswish(c[9]), torch.sigmoid(c[10]), c[11].tanh(), F.leaky_relu(c[12], 0.2),
                     torch.clamp(c[13], -0.5, 0.8), F.elu(c[14]), F.hardsigmoid(c[15]), c[16].clamp(0.1, 0.6)]
        logits = self.fc[0](branches[0].mean((2, 3)))
        for fc, branch in zip(self.fc[1:], branches[1:]):
            logits = logits + fc(branch.mean((2, 3)))
        return logits


class EagerActivations(nn.Module):
    """The eager-mode forms, each on its own branch: torch.ao converts Hardswish, ELU, LeakyReLU and ReLU6 into
    quantized modules and runs Hardtanh, Sigmoid, Tanh and Hardsigmoid as they are on quantized tensors; then a
    squeeze-and-excitation multiply."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.stem, self.convs = nn.Conv2d(1, 4, 3, padding=1), _convs(8)
        self.acts = nn.ModuleList([nn.ReLU6(), nn.Hardtanh(-1.0, 2.0), nn.Hardswish(), nn.ELU(0.5), nn.LeakyReLU(0.1),
                                   nn.Sigmoid(), nn.Tanh(), nn.Hardsigmoid()])
        self.pool, self.gate = nn.AdaptiveAvgPool2d(1), nn.Hardsigmoid()
        self.cat, self.scale = torch.ao.nn.quantized.FloatFunctional(), torch.ao.nn.quantized.FloatFunctional()
        self.fc = nn.Linear(4 * 8 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(self.quant(x))
        y = self.cat.cat([act(conv(h)) for conv, act in zip(self.convs, self.acts)], 1)
        y = self.scale.mul(y, self.gate(self.pool(y)))
        return self.dequant(self.fc(torch.flatten(y, 1)))


def _tables(qmodel) -> list[CodeTable]:  # noqa: ANN001
    return [m for m in qmodel.module.modules() if isinstance(m, CodeTable)]


@pytest.fixture(scope="module")
def fx_activations(digits):  # noqa: ANN001, ANN201
    return to_ao_fx(seeded(FxActivations), images(digits.x_train[:256]))


@pytest.fixture(scope="module")
def eager_activations(digits):  # noqa: ANN001, ANN201
    return to_ao_eager(seeded(EagerActivations), images(digits.x_train[:256]))


def test_fx_activations_read_bit_for_bit(fx_activations, digits) -> None:  # noqa: ANN001
    """17 elementwise ops in 7 forms and a mean (each refused by the FX reader before) read bit for bit."""
    x = images(digits.x_train[:256])
    qmodel = exact_quantize(fx_activations, x)
    assert len(_tables(qmodel)) == 17
    # the means: of channels-last outputs, dequantized values in float32; of contiguous ones, codes
    means = [type(m).__name__ for m in qmodel.module.modules() if type(m).__name__ in ("_LayoutMean", "CodeAvgPool")]
    assert len(means) == 17 and len(set(means)) == 2, means
    test = images(digits.x_test)
    reference = run(fx_activations, test)
    assert reference.std() > 0.05  # not a constant: the activations pass information
    assert torch.equal(qmodel(test), reference)


def test_eager_activations_read_bit_for_bit(eager_activations, digits) -> None:  # noqa: ANN001
    import torch.ao.nn.quantized as nnq

    kinds = {type(m) for m in eager_activations.modules()}
    assert {nnq.Hardswish, nnq.ELU, nnq.LeakyReLU, nnq.ReLU6, nn.Sigmoid, nn.Hardsigmoid} <= kinds
    qmodel = exact_quantize(eager_activations, images(digits.x_train[:256]))
    assert len(_tables(qmodel)) == 9  # eight branches and the gate
    test = images(digits.x_test)
    assert torch.equal(qmodel(test), run(eager_activations, test))


@pytest.mark.parametrize("form", ["fx", "eager"])
@pytest.mark.parametrize("ber", [1e-3, 3e-2])
def test_activation_tables_under_faults_are_the_runtimes(fx_activations, eager_activations, digits, form,
                                                         ber) -> None:  # noqa: ANN001
    """A trial's activation faults, flipped codes running through every table, against torch's kernels running the
    model under the same faults (`ao_under_faults`): logits equal bit for bit."""
    model = fx_activations if form == "fx" else eager_activations
    qmodel = quantize(model, images(digits.x_train[:256]))
    x = images(digits.x_test[:64])
    fault_model = FaultModel("act", ber)
    pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x),
                             torch.Generator().manual_seed(int(1 / ber)))
    ours = qmodel(x, pattern)
    assert not torch.equal(ours, qmodel(x))
    assert torch.equal(ours, run(ao_under_faults(model, pattern), x))


def test_float_baseline_computes_the_activations_in_float(fx_activations, digits) -> None:  # noqa: ANN001
    """The float function runs each table's op in float: close to the float model the int8 one came from (its
    weights differ by their rounding alone), far from a function that skipped the activations."""
    x = images(digits.x_test[:128])
    qmodel = quantize(fx_activations, images(digits.x_train[:256]))
    ours = qmodel.float_forward(x)
    net = seeded(FxActivations)
    with torch.no_grad():
        reference = net(x)
        net.acts = nn.ModuleList(nn.Identity() for _ in net.acts)  # the module forms skipped
        skipped = net(x)
    distance = float((ours - reference).abs().max())
    assert distance < 0.2 * float((skipped - reference).abs().max()), distance
    assert not any(isinstance(m, CodeTable) for m in qmodel.float_module.modules())


OPS = {
    "relu6": nn.ReLU6(), "hardtanh": nn.Hardtanh(-0.7, 1.3), "clamp": lambda t: torch.clamp(t, -0.25, 2.0),
    "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "hardsigmoid": nn.Hardsigmoid(), "gelu": nn.GELU(),
    "hardswish": torch.ao.nn.quantized.Hardswish(0.031, 70), "elu": torch.ao.nn.quantized.ELU(0.027, 100, 0.6),
    "leaky_relu": torch.ao.nn.quantized.LeakyReLU(0.025, 40, 0.05),
    "q_sigmoid": lambda t: torch.ops.quantized.sigmoid(t, 1 / 256, 0),
}


@settings(max_examples=60, deadline=None)
@given(op=st.sampled_from(sorted(OPS)), scale=st.floats(1e-3, 0.2), signed=st.booleans(),
       zero=st.integers(0, 255), shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_code_table_is_torchs_kernel(op, scale, signed, zero, shape, channels_last, seed) -> None:  # noqa: ANN001
    """Differential: a table measured on one tensor of every code, applied to codes of any shape and layout, gives
    what torch's kernel gives on them."""
    zero_point = zero - 128 if signed else zero
    low = -128 if signed else 0
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(low, low + 256, shape, generator=generator).to(torch.int8 if signed else torch.uint8)
    x = torch._make_per_tensor_quantized_tensor(codes, scale, zero_point)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    kernel = OPS[op](x)
    table, out, in_place = measured_table(OPS[op], (float(x.q_scale()), zero_point, signed), op, "test")
    assert out == (float(kernel.q_scale()), int(kernel.q_zero_point()), signed) and not in_place
    view = CodeTable((float(x.q_scale()), zero_point, signed), out[:2], table)
    assert torch.equal(view(x.dequantize()), kernel.dequantize())


class Means(nn.Module):
    def __init__(self, dims: tuple[int, ...] | None, contiguous: bool) -> None:
        super().__init__()
        self.conv, self.dims, self.contiguous = nn.Conv2d(1, 6, 3), dims, contiguous
        self.fc = nn.Linear(6 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # no ReLU: an odd zero point, ties on both sides of it
        if self.contiguous:
            y = y.contiguous()  # the convolution's output is channels-last
        if self.dims is None:
            m = torch.mean(y)
        elif len(self.dims) > 1:
            m = torch.mean(y, self.dims, keepdim=True)
        else:
            m = y.mean(self.dims[0], True)
        return self.fc(torch.flatten(y + m, 1))  # the mean broadcast back: every output reads it


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("dims", [(2, 3), (-1, -2), (3,), (1, 2, 3), (1,), (0,)])
def test_fx_mean_is_torchs_kernel(digits, dims, contiguous) -> None:  # noqa: ANN001
    """torch's quantized mean averages the codes of a contiguous tensor over its innermost dimensions (rounding half
    to even on the input's grid), and dequantized values in float32 otherwise, in the tensor's own layout (the
    convolution's channels-last output): bit for bit either way."""
    x = images(digits.x_train[:256])
    model = to_ao_fx(seeded(Means, dims, contiguous), x)
    qmodel = exact_quantize(model, x)
    codes = contiguous and dims not in ((1,), (0,))
    assert any(isinstance(m, CodeAvgPool) for m in qmodel.module.modules()) == codes
    test = images(digits.x_test)
    assert torch.equal(qmodel(test), run(model, test))


def test_fx_mean_of_a_whole_tensor_is_refused(digits) -> None:  # noqa: ANN001
    """A mean over all dimensions: torch's float sum of a whole tensor splits between threads; refused by node."""
    x = images(digits.x_train[:64])
    model = to_ao_fx(seeded(Means, None, False), x)
    with pytest.raises(DeployedFormatError, match=r"torch\.ao fx: node 'mean' \(call_function mean\) averages a "
                                                  r"quantized tensor over computed or all dimensions"):
        quantize(model, x)


class InPlace(nn.Module):
    """A ReLU6 written into its input, which a later layer reads: it sees the clamped codes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        z = F.relu6(y, inplace=True)
        return self.fc(torch.flatten(self.b(z) + self.c(y), 1))


def test_fx_in_place_activation_is_seen_by_later_readers(digits) -> None:  # noqa: ANN001
    x = images(digits.x_train[:256]) * 4  # values past 6: the clamp shows
    model = to_ao_fx(seeded(InPlace), x)
    qmodel = exact_quantize(model, x)
    assert [m.in_place for m in _tables(qmodel)] == [True]
    test = images(digits.x_test) * 4
    assert torch.equal(qmodel(test), run(model, test))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.a, self.b, self.act = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Sigmoid()
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(torch.flatten(self.act(self.b(self.act(self.a(self.quant(x))))), 1)))


def test_eager_activation_shared_between_grids_is_refused(digits) -> None:  # noqa: ANN001
    """One Sigmoid module called after two layers: torch computes it on each one's codes, so one table cannot
    stand for it; refused naming the module."""
    x = images(digits.x_train[:64])
    model = to_ao_eager(seeded(Shared), x)
    with pytest.raises(DeployedFormatError, match=r"torch\.ao eager: module 'act' \(Sigmoid\) runs on tensors of "
                                                  r"several grids, or on quantized and float tensors"):
        quantize(model, x)


class SharedWithFloat(nn.Module):
    """One Sigmoid module on a quantized tensor and again on the float logits (after the DeQuantStub)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.a, self.act, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Sigmoid(), nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dequant(self.fc(torch.flatten(self.act(self.a(self.quant(x))), 1))))


def test_eager_activation_on_quantized_and_float_tensors_is_refused(digits) -> None:  # noqa: ANN001
    """A table would stand for the module on its float call too (where torch runs the float op): refused."""
    x = images(digits.x_train[:64])
    model = to_ao_eager(seeded(SharedWithFloat), x)
    with pytest.raises(DeployedFormatError, match=r"module 'act' \(Sigmoid\) runs on tensors of several grids, or "
                                                  r"on quantized and float tensors"):
        quantize(model, x)


def _torchvision_model(name: str, x: torch.Tensor) -> nn.Module:
    import torchvision
    import torchvision.models.quantization as quantizable

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name == "eager mobilenet_v3_large":  # torchvision's quantizable model, its own fusions
            model = quantizable.mobilenet_v3_large(quantize=False, num_classes=10).eval()
            model.fuse_model(is_qat=False)
            return to_ao_eager(model, x)
        return to_ao_fx(getattr(torchvision.models, name)(num_classes=10).eval(), x)


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "eager mobilenet_v3_large", "densenet121"])
def test_torchvision_models_read_bit_for_bit_faults_included(name: str) -> None:
    """torchvision's MobileNetV2 (ReLU6), MobileNetV3 (Hardswish, a Hardsigmoid gate, a quantized multiply) and
    DenseNet-121 (batch norms before convolutions: quantized BNReLU2d), quantized by FX mode, and the quantizable
    MobileNetV3-Large by eager mode: each refused before. Read bit for bit, and under a trial of activation faults
    against torch's kernels."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=generator)
    model = _torchvision_model(name, x)
    qmodel = exact_quantize(model, x)
    assert len(qmodel.layers) >= 50 and _tables(qmodel)
    test = torch.randn(8, 3, 32, 32, generator=generator)
    assert torch.equal(qmodel(test), run(model, test))
    fault_model = FaultModel("act", 1e-3)
    pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(test),
                             torch.Generator().manual_seed(3))
    ours = qmodel(test, pattern)
    assert not torch.equal(ours, qmodel(test))
    assert torch.equal(ours, run(ao_under_faults(model, pattern), test))


class PreActivation(nn.Module):
    """Batch norms torch.ao cannot fold into a convolution, so it runs them on quantized tensors (quantized
    BatchNorm2d): a pre-activation block's (BN, ReLU, conv), and one after a residual sum; 1-d in `dims=1`."""

    def __init__(self, eager: bool = False) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.norm1, self.norm2 = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 64, 10)
        self.eager = eager
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.add = torch.ao.nn.quantized.FloatFunctional()
        with torch.no_grad():  # statistics and affine parameters of a trained network, not the identity
            for norm in (self.norm1, self.norm2):
                norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.3, 0.3)
                norm.running_mean.uniform_(-0.5, 0.5), norm.running_var.uniform_(0.2, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(self.quant(x) if self.eager else x)
        y = self.conv(F.relu(self.norm1(h)))
        s = self.add.add(h, y) if self.eager else h + y
        out = self.fc(torch.flatten(F.relu(self.norm2(s)), 1))
        return self.dequant(out) if self.eager else out


@pytest.mark.parametrize("form", ["fx", "eager"])
def test_batch_norm_on_quantized_tensors_reads_bit_for_bit(digits, form: str) -> None:  # noqa: ANN001
    """A quantized batch norm is a per-channel table (each channel's output code a function of its input code:
    measured from torch's kernel, bit for bit at any layout and thread count), faults included."""
    x = images(digits.x_train[:256])
    net = seeded(PreActivation, form == "eager")
    model = to_ao_fx(net, x) if form == "fx" else to_ao_eager(net, x)
    kinds = {f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()}
    # FX fuses the ReLU after each norm (BNReLU2d); eager keeps them apart
    assert any(kind.startswith("torch.ao.nn") and kind.endswith(("BatchNorm2d", "BNReLU2d")) for kind in kinds)
    qmodel = exact_quantize(model, x)
    assert sum(m.table.dim() == 2 for m in _tables(qmodel)) == 2
    test = images(digits.x_test)
    assert torch.equal(qmodel(test), run(model, test))
    pattern = sample_pattern(FaultModel("act", 1e-2), qmodel.targets(Site.ACT), 64, torch.Generator().manual_seed(5))
    ours = qmodel(test[:64], pattern)
    assert not torch.equal(ours, qmodel(test[:64]))
    assert torch.equal(ours, run(ao_under_faults(model, pattern), test[:64]))



class Depthwise(nn.Module):
    """An inverted-residual-style block whose depthwise convolution has more than 100 channels: torch's x86 engine
    runs it on fbgemm's depthwise kernel."""

    def __init__(self, kernel: int = 3, relu: bool = False) -> None:
        super().__init__()
        self.expand = nn.Conv2d(1, 128, 1)
        self.depthwise = nn.Conv2d(128, 128, kernel, padding=kernel // 2, groups=128)
        self.project, self.fc = nn.Conv2d(128, 8, 1), nn.Linear(8 * 64, 10)
        self.act = F.relu if relu else F.relu6  # a ReLU fuses into the layer (ConvReLU2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.act(self.depthwise(F.relu6(self.expand(x)))))
        return self.fc(torch.flatten(y, 1))


@pytest.mark.parametrize(("kernel", "relu"), [(3, False), (5, False), (3, True)])
def test_depthwise_sums_saturate_as_fbgemms_kernel(digits, kernel: int, relu: bool) -> None:  # noqa: ANN001
    """fbgemm's depthwise kernel sums two kernel taps at a time in int16, saturating: calibrated (reduced-range)
    codes never reach it, a fault's high bit does. The view's layer sums so (`PairSaturatingConv2d`, found by
    measuring the kernel), so a trial of act faults gives torch's logits bit for bit (exact sums gave 97.5% of a
    MobileNetV2's logits under one trial at BER 1e-3)."""
    from pytest_hwfault.ao import PairSaturatingConv2d

    x = images(digits.x_train[:256])
    model = to_ao_fx(seeded(Depthwise, kernel, relu), x)
    qmodel = exact_quantize(model, x)
    assert isinstance(qmodel.layers["depthwise"].module, PairSaturatingConv2d)
    assert any("sum as fbgemm's kernel does" in note for note in qmodel.config["deployed_notes"])
    test = images(digits.x_test[:64])
    assert torch.equal(qmodel(test), run(model, test))
    for seed in range(2):
        pattern = sample_pattern(FaultModel("act", 3e-2), qmodel.targets(Site.ACT), len(test),
                                 torch.Generator().manual_seed(seed))
        assert torch.equal(qmodel(test, pattern), run(ao_under_faults(model, pattern), test))
    float_module = qmodel.float_module.get_submodule("depthwise")
    if relu:  # the fused ReLU, explicit in the float function
        float_module = float_module[0]
    assert type(float_module) is nn.Conv2d  # the float function sums exactly


@settings(max_examples=25, deadline=None)
@given(kernel=st.sampled_from([3, 5, 7]), stride=st.sampled_from([1, 2]), zero=st.integers(0, 255),
       seed=st.integers(0, 2**16))
def test_pair_saturating_conv_is_fbgemms_depthwise_kernel(kernel: int, stride: int, zero: int, seed: int) -> None:
    """Differential, on the fbgemm engine (every depthwise convolution there): any codes, any weights."""
    import torch.ao.nn.quantized as nnq

    from pytest_hwfault.ao import PairSaturatingConv2d

    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("torch built without fbgemm")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        generator = torch.Generator().manual_seed(seed)
        conv = nnq.Conv2d(16, 16, kernel, stride=stride, padding=kernel // 2, groups=16)
        codes = torch.randint(-127, 128, (16, 1, kernel, kernel), generator=generator, dtype=torch.int8)
        conv.set_weight_bias(torch._make_per_channel_quantized_tensor(
            codes, torch.full((16,), 2.0**-6, dtype=torch.float64), torch.zeros(16, dtype=torch.int64), 0), None)
        conv.scale, conv.zero_point = 2.0**-1, 128
        x_codes = torch.randint(0, 256, (2, 16, 11, 11), generator=generator, dtype=torch.uint8)
        x = torch._make_per_tensor_quantized_tensor(x_codes, 2.0**-6, zero).contiguous(
            memory_format=torch.channels_last)
        kernel_out = conv(x).int_repr().double() - 128
    finally:
        torch.backends.quantized.engine = previous
    plain = nn.Conv2d(16, 16, kernel, stride=stride, padding=kernel // 2, groups=16, bias=False)
    view = PairSaturatingConv2d(plain, zero).double()
    with torch.no_grad():
        view.weight.copy_(codes.double())
        sums = view(x_codes.double() - zero)
    assert float((kernel_out - (sums * 2.0**-11).clamp(-128, 127)).abs().max()) <= 0.5
