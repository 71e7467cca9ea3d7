"""Models quantized with torch.ao FX mode (`prepare_fx`/`convert_fx`) keep their own codes, scales and arithmetic:
the engine reproduces torch's x86 quantized kernels on the ResNet-style model, faults included."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from deployed_models import (
    ResNetStyle,
    agreement,
    ao_under_faults,
    images,
    to_ao_eager,
    to_ao_fx,
    trained_resnet_style,
)
from torch import nn

from pytest_hwfault import FaultModel, FaultPattern, accuracy, quantize
from pytest_hwfault.ao import (
    KernelCodes,
    KernelDequantize,
    KernelProductRequantize,
    pool_adds_zero_point_first,
    zero_point_before_rounding,
)
from pytest_hwfault.cifar_resnet import recalibrate_bn
from pytest_hwfault.deployed import CodeAvgPool, DeployedFormatError, Requantize
from pytest_hwfault.faults import sample_pattern
from pytest_hwfault.quantization import DeployedMismatchWarning, state_checksum
from pytest_hwfault.spec import Site

pytestmark = pytest.mark.usefixtures("single_threaded")

LAYERS = ["stem", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "fc"]


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model(x)


@pytest.fixture(scope="module")
def fx_model(digits):  # noqa: ANN001, ANN201
    return to_ao_fx(trained_resnet_style(digits), images(digits.x_train))


@pytest.fixture(scope="module")
def fx_qmodel(fx_model, digits):  # noqa: ANN001, ANN201
    return quantize(fx_model, images(digits.x_train))


def test_fx_model_is_reproduced_by_the_engine(fx_model, fx_qmodel, digits) -> None:  # noqa: ANN001
    x = images(digits.x_test)
    assert fx_qmodel.config["source"] == "torch.ao fx" and list(fx_qmodel.layers) == LAYERS
    measured = agreement(run(fx_model, x), fx_qmodel(x), fx_qmodel.layers["fc"].act_scale)
    # measured: every logit equal. The x86 engine's convolutions (oneDNN on AVX512-VNNI CPUs) add the output zero
    # point in float32 before rounding, its linear layers (fbgemm) after: rounding the other way put four outputs
    # of block1.conv2 on the other side of x.5 (3 of 3970 logits one code apart)
    assert measured == {"predictions": 1.0, "exact": 1.0, "max_codes": 0.0}, measured


@pytest.mark.parametrize("engine", ["x86", "fbgemm", "onednn"])
@pytest.mark.parametrize(("channels", "eager"), [(16, False), (64, False), (64, True)])
def test_ao_kernels_float32_steps_are_reproduced_on_near_ties(engine: str, channels: int, eager: bool) -> None:
    """Random weights, scales and images: a few outputs in 10^5 land within float32 rounding of a tie, where the
    order of the kernel's float32 steps decides the code (`deployed.Scaling`: oneDNN's convolutions scale by the
    input scale, then the weight scale, add the bias, then scale by 1 / output scale; fbgemm adds the bias first).
    Every layer's output codes and every logit equal torch's, under each engine, fbgemm's and oneDNN's kernels both
    (64 channels: wide layers, whose sums pass 2^24). With one multiplier per channel, 7-12 codes in 4M differed."""
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"torch built without the {engine} quantized engine")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        generator = torch.Generator().manual_seed(channels)
        calibration, x = torch.rand(64, 1, 8, 8, generator=generator), torch.rand(512, 1, 8, 8, generator=generator)
        with torch.random.fork_rng():
            torch.manual_seed(channels)
            net = recalibrate_bn(ResNetStyle(channels), calibration)
        if eager:
            twin = ResNetStyle(channels, eager=True).eval()
            twin.load_state_dict(net.state_dict())
            model = to_ao_eager(twin, calibration, ResNetStyle.FUSIONS)
        else:
            model = to_ao_fx(net, calibration)
        qmodel = quantize(model, calibration)
        theirs: dict[str, torch.Tensor] = {}
        ours: dict[str, torch.Tensor] = {}
        for name, layer in qmodel.layers.items():
            model.get_submodule(name).register_forward_hook(
                lambda m, a, out, n=name: theirs.__setitem__(n, out.int_repr().long() - out.q_zero_point()))
            layer.module.register_forward_hook(
                lambda m, a, out, n=name: ours.__setitem__(n, out if qmodel.layers[n].hands_on_codes else
                                                           torch.round(out / qmodel.layers[n].act_scale)))
        reference, logits = run(model, x), qmodel(x)
        for name in qmodel.layers:
            differ = int((theirs[name] != ours[name].long()).sum())
            assert differ == 0, f"{name}: {differ} of {ours[name].numel()} codes differ"
        measured = agreement(reference, logits, qmodel.layers["fc"].act_scale)
        assert measured == {"predictions": 1.0, "exact": 1.0, "max_codes": 0.0}, measured
    finally:
        torch.backends.quantized.engine = previous


@pytest.mark.parametrize(("engine", "expected"), [("fbgemm", False), ("onednn", True)])
def test_fx_kernel_rounding_is_measured(fx_model, engine, expected) -> None:  # noqa: ANN001
    # fbgemm rounds the scaled accumulator, then adds the output zero point; oneDNN adds it in float32, then rounds.
    # The probe repacks a copy of the layer under the current engine and finds which on exact ties.
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"torch built without the {engine} quantized engine")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        for name in ("block1.conv2", "fc"):
            assert zero_point_before_rounding(fx_model.get_submodule(name)) is expected, name
    finally:
        torch.backends.quantized.engine = previous


def test_fx_layers_keep_the_models_codes_and_grids(fx_model, fx_qmodel) -> None:  # noqa: ANN001
    for name in LAYERS:
        module, layer = fx_model.get_submodule(name), fx_qmodel.layers[name]
        weight = module.weight()
        assert torch.equal(layer.weight_codes, weight.int_repr().to(torch.int32)), name
        assert torch.allclose(layer.weight_scale, weight.q_per_channel_scales().float()), name
        assert layer.act_scale == pytest.approx(module.scale) and layer.act_zero_point == module.zero_point, name
    stem = fx_qmodel.layers["stem"]
    quantize_node = next(n for n in fx_model.graph.nodes if n.target is torch.quantize_per_tensor)
    scale, zero = (getattr(fx_model, arg.target) for arg in quantize_node.args[1:3])  # get_attr nodes
    assert stem.input_scale == pytest.approx(float(scale)) and stem.input_zero_point == int(zero)
    assert stem.act_range == (0, 255 - fx_model.stem.zero_point)  # ConvReLU2d: clamps at the zero point
    conv2 = fx_qmodel.layers["block1.conv2"]  # no ReLU: the unsigned codes go below the zero point
    assert conv2.act_range == (-fx_model.block1.conv2.zero_point, 255 - fx_model.block1.conv2.zero_point)


def test_fx_users_model_is_not_modified(fx_model, digits) -> None:  # noqa: ANN001
    before, code = state_checksum(fx_model), fx_model.code
    quantize(fx_model, images(digits.x_train[:64]))
    assert state_checksum(fx_model) == before and fx_model.code == code
    assert type(fx_model.stem).__name__ == "ConvReLU2d"


def _first_images(fx_model, fx_qmodel, digits, n: int = 8) -> torch.Tensor:  # noqa: ANN001
    """Test images on which the clean engine equals the runtime exactly (so a fault's effect is compared alone)."""
    x = images(digits.x_test)
    equal = (run(fx_model, x) == fx_qmodel(x)).all(1)
    return x[equal][:n]


def test_fx_weight_fault_is_the_runtimes(fx_model, fx_qmodel, digits) -> None:  # noqa: ANN001
    x = _first_images(fx_model, fx_qmodel, digits)
    name, index, bit = "block1.conv1", 100, 6
    faulty = copy.deepcopy(fx_model)
    module = faulty.get_submodule(name)
    weight = module.weight()
    codes = weight.int_repr().clone()
    flat = codes.view(-1)
    flat[index] = int(flat[index]) ^ (1 << bit)  # an int8 code: bit 6 of its two's complement
    edited = torch._make_per_channel_quantized_tensor(codes, weight.q_per_channel_scales(),
                                                      weight.q_per_channel_zero_points(), weight.q_per_channel_axis())
    module.set_weight_bias(edited, module.bias())
    pattern = FaultPattern.from_faults([("weight", name, index, bit, "flip")])
    ours, runtime = fx_qmodel(x, pattern), run(faulty, x)
    assert not torch.equal(runtime, run(fx_model, x))  # the fault shows
    assert torch.equal(ours, runtime)


@pytest.mark.parametrize(("name", "index", "bit"), [("block1.conv2", 37, 7), ("stem", 300, 5)])
def test_fx_activation_fault_is_the_runtimes(fx_model, fx_qmodel, digits, name, index, bit) -> None:  # noqa: ANN001
    x = _first_images(fx_model, fx_qmodel, digits)
    image = 2
    faulty = copy.deepcopy(fx_model)

    def edit(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        codes = out.int_repr().contiguous().clone()  # the runtime computes channels-last
        codes[image].view(-1)[index] ^= 1 << bit  # a quint8 code: bit 7 is worth 128 codes, no sign
        return torch._make_per_tensor_quantized_tensor(codes, out.q_scale(), out.q_zero_point())

    faulty.get_submodule(name).register_forward_hook(edit)
    pattern = FaultPattern.from_faults([("act", name, index, bit, "flip", image)])
    ours, runtime = fx_qmodel(x, pattern), run(faulty, x)
    assert not torch.equal(runtime, run(fx_model, x))
    assert torch.equal(ours, runtime)


@pytest.mark.parametrize(("site", "ber"), [("act", 1e-3), ("act", 1e-2), ("weight", 1e-3)])
def test_fx_trials_faults_are_the_runtimes(fx_model, fx_qmodel, digits, site, ber) -> None:  # noqa: ANN001
    """A whole trial's faults in every layer of the FX model against torch's quantized kernels running it under the
    same faults (`ao_under_faults`): logits equal bit for bit."""
    x = images(digits.x_test[:32])
    fault_model = FaultModel(site, ber)
    pattern = sample_pattern(fault_model, fx_qmodel.targets(fault_model.site), len(x),
                             torch.Generator().manual_seed(int(1 / ber)))
    ours, runtime = fx_qmodel(x, pattern), run(ao_under_faults(fx_model, pattern), x)
    assert (ours != fx_qmodel(x)).float().mean() > 0.5
    assert torch.equal(ours, runtime)


def test_fx_every_site_counts_as_accuracy(fx_qmodel, digits) -> None:  # noqa: ANN001
    x, y = images(digits.x_test[:16]), digits.y_test[:16]
    for site in (Site.ACT, Site.WEIGHT, Site.ACC, Site.INPUT):
        # `accuracy` draws one trial with torch.Generator().manual_seed(seed): the same pattern, drawn here, is not
        # empty, and the accuracy is that of the faulty outputs, counted image by image
        model = FaultModel(site, 1e-3)
        pattern = sample_pattern(model, fx_qmodel.targets(model.site), len(x), torch.Generator().manual_seed(1))
        assert len(pattern) > 0, site
        expected = sum(int(row.argmax()) == int(label) for row, label in zip(fx_qmodel(x, pattern), y)) / len(x)
        assert accuracy(fx_qmodel, (x, y), model, seed=1) == expected, site


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("grids", [(0.0213, 0, 0.0213, 0, 0.0426, 0), (0.0213, 5, 0.0213, 131, 0.0426, 97),
                                   (0.1, 10, 0.1, 20, 0.2, 33), (0.0371, 0, 0.0213, 120, 0.0584, 3)])
def test_fx_add_is_torchs_kernel_on_ties(grids, relu) -> None:  # noqa: ANN001
    # Scales chosen so that one sum in two is a tie (output scale twice the input scales): the add's operands are
    # dequantized as one float32 multiply-add q x s + (-z x s), and the sum quantized with the float32 inverse scale.
    # (On one thread and a multiple of 64 elements: torch's scalar loop tail, a few elements at the end of each
    # thread's chunk, dequantizes as (q - z) x s instead.)
    sa, za, sb, zb, so, zo = grids
    generator = torch.Generator().manual_seed(0)
    ca, cb = (torch.randint(0, 256, (64 * 1024,), generator=generator, dtype=torch.uint8) for _ in range(2))
    qa, qb = torch._make_per_tensor_quantized_tensor(ca, sa, za), torch._make_per_tensor_quantized_tensor(cb, sb, zb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = (torch.ops.quantized.add_relu if relu else torch.ops.quantized.add)(qa, qb, so, zo).dequantize()
    a = (ca.float() - za) * torch.tensor(sa)  # the values the engine hands between layers
    b = (cb.float() - zb) * torch.tensor(sb)
    low = zo if relu else 0
    ours = Requantize(so, zo, low, 255, divide=False)(KernelDequantize(sa, za, 0, 255)(a)
                                                      + KernelDequantize(sb, zb, 0, 255)(b))
    assert torch.equal(ours, reference)
    plain = Requantize(so, zo, low, 255)(a + b)  # a float add of (q - z) x s, divided by the scale: not the kernel
    assert not torch.equal(plain, reference)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("grids", [(0.0213, 0, 0.0213, 0, 0.0426, 0), (0.1, 10, 0.1, 20, 0.2, 33),
                                   (0.1, 0, 0.1, 0, 0.2, 33), (0.0371, 0, 0.0213, 7, 0.0584, 3)])
def test_fx_mul_is_torchs_kernel_on_ties(grids, relu) -> None:  # noqa: ANN001
    # the integer product of centred codes times a float32 multiplier sa x sb x (1 / so), rounded half to even
    sa, za, sb, zb, so, zo = grids
    generator = torch.Generator().manual_seed(0)
    ca, cb = (torch.randint(0, 256, (64 * 1024,), generator=generator, dtype=torch.uint8) for _ in range(2))
    qa, qb = torch._make_per_tensor_quantized_tensor(ca, sa, za), torch._make_per_tensor_quantized_tensor(cb, sb, zb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = (torch.ops.quantized.mul_relu if relu else torch.ops.quantized.mul)(qa, qb, so, zo).dequantize()
    a, b = (ca.float() - za) * torch.tensor(sa), (cb.float() - zb) * torch.tensor(sb)
    product = KernelCodes(sa, za, 0, 255)(a) * KernelCodes(sb, zb, 0, 255)(b)
    assert torch.equal(KernelProductRequantize(sa, sb, so, zo, zo if relu else 0, 255)(product), reference)


def test_fx_float_baseline_is_the_models_float_function(fx_model, fx_qmodel, digits) -> None:  # noqa: ANN001
    x, y = images(digits.x_test), digits.y_test
    own = float((run(fx_model, x).argmax(1) == y).float().mean())
    float_accuracy = float((fx_qmodel.float_forward(x).argmax(1) == y).float().mean())
    assert own > 0.9 and abs(float_accuracy - own) < 0.02, (float_accuracy, own)


def test_fx_quantize_per_tensor_is_torchs_kernel() -> None:
    generator = torch.Generator().manual_seed(0)
    for scale, zero in [(0.0371, 17), (0.0041, 3), (2.0**-6, 77)]:
        ties = (torch.randint(-100, 100, (4096,), generator=generator).float() + 0.5) * scale
        x = torch.cat([torch.randn(60000, generator=generator) * 3, ties])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = torch.quantize_per_tensor(x, scale, zero, torch.quint8).dequantize()
        assert torch.equal(Requantize(scale, zero, 0, 255, divide=False)(x), reference), (scale, zero)


@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(3), nn.AvgPool2d(2),
                                  nn.AvgPool2d(2, 2, 1), nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                                  nn.AvgPool2d(2, 3, ceil_mode=True), nn.AvgPool2d(2, divisor_override=3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fx_average_pool_is_torchs_kernel(pool, channels_last) -> None:  # noqa: ANN001
    # an odd zero point: on a contiguous (NCHW) input the kernel adds it before rounding the mean, so that ties (one
    # mean in four for a 2x2 window) round to the even stored code; on a channels-last input it rounds first
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (8, 16, 8, 8), generator=generator, dtype=torch.uint8)
    scale, zero = 0.0371, 37
    quantized = torch._make_per_tensor_quantized_tensor(codes, scale, zero)
    if channels_last:
        quantized = quantized.contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = pool(quantized).dequantize()
    values = (codes.float() - zero) * torch.tensor(scale)
    first = pool_adds_zero_point_first(quantized)
    assert first is not channels_last
    assert torch.equal(CodeAvgPool(pool, scale, zero, 0, 255, zero_point_first=first)(values), reference)
    other = CodeAvgPool(pool, scale, zero, 0, 255, zero_point_first=not first)(values)
    assert not torch.equal(other, reference) or pool.divisor_override == 3


class Branches(nn.Module):
    """Concatenation, a quantized multiply and a functional average pool: the graph's other re-gridding ops."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), self.b(x)], 1)
        y = F.avg_pool2d(self.c(y) * y, 2)
        return self.fc(torch.flatten(y, 1))


def test_fx_concat_multiply_and_functional_pool_are_exact(digits) -> None:  # noqa: ANN001
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Branches()
    fx = to_ao_fx(net, images(digits.x_train))
    targets = {str(node.target) for node in fx.graph.nodes}
    assert any("quantized.mul" in t for t in targets) and any("avg_pool2d" in t for t in targets)
    qmodel = quantize(fx, images(digits.x_train))
    x = images(digits.x_test)
    measured = agreement(run(fx, x), qmodel(x), qmodel.layers["fc"].act_scale)
    assert measured == {"predictions": 1.0, "exact": 1.0, "max_codes": 0.0}, measured  # measured: all equal


class Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1), nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.stack([self.a(x), self.b(x)], 1), 1))


def test_fx_unsupported_quantized_op_is_a_clear_error(digits) -> None:  # noqa: ANN001
    """torch.stack of quantized tensors (which torch re-grids as it likes): refused by node."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Stacked()
    fx = to_ao_fx(net, images(digits.x_train[:64]))
    with pytest.raises(DeployedFormatError, match=r"torch\.ao fx: node 'stack' \(call_function stack\) runs on a "
                                                  r"quantized tensor; supported: quantize_per_tensor"):
        quantize(fx, images(digits.x_train[:64]))


class _Shuffled(nn.Module):
    """Sub-pixel and channel shuffles between quantized convolutions (super-resolution and ShuffleNet blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.up, self.down = nn.Conv2d(1, 8, 3, padding=1), nn.PixelShuffle(2), nn.PixelUnshuffle(2)
        self.shuffle, self.conv2 = nn.ChannelShuffle(2), nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shuffle(self.down(self.up(self.conv(x))))
        return self.conv2(F.pixel_unshuffle(F.pixel_shuffle(h, 2), 2))


def test_pixel_and_channel_shuffles_keep_the_codes(digits) -> None:  # noqa: ANN001
    """PixelShuffle, PixelUnshuffle and ChannelShuffle move codes without computing: an FX model running them on
    quantized tensors was refused ("runs on a quantized tensor"). They keep the grid, bit for bit."""
    x = images(digits.x_train[:64])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Shuffled().eval()
    converted = to_ao_fx(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)
        qmodel = quantize(converted, x)
    assert list(qmodel.layers) == ["conv", "conv2"]
    with torch.no_grad():
        assert torch.equal(converted(x), qmodel(x))
