"""torch.ao models with quantized transposed convolutions (decoders, U-Net upsampling, autoencoders): each one a
fault-site layer as torch's kernel computes it, bit for bit, faults included; and refused, with the measured
distance, where torch's kernel does not compute a transposed convolution of its codes (torch 2.14's are defective
on common shapes). Both readers refused every such model before."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from deployed_models import ao_under_faults, to_ao_fx
from torch import nn

from pytest_hwfault import FaultModel, quantize
from pytest_hwfault.deployed import DeployedFormatError
from pytest_hwfault.faults import sample_pattern
from pytest_hwfault.quantization import DeployedMismatchWarning

pytestmark = pytest.mark.usefixtures("single_threaded")


@contextlib.contextmanager
def engine(name: str) -> Iterator[None]:
    if name not in torch.backends.quantized.supported_engines:
        pytest.skip(f"torch built without the {name} quantized engine")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model(x)


class Decoder(nn.Module):
    """An encoder convolution, an upsampling transposed convolution, a head: the shape of a segmentation decoder."""

    def __init__(self, channels: int, out_channels: int, kernel: int, stride: int, padding: int, dims: int = 2,
                 eager: bool = False) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        transposed = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
        self.down = conv(1, channels, 3, stride=2, padding=1)
        self.up = transposed(channels, out_channels, kernel, stride=stride, padding=padding)
        self.head = conv(out_channels, 3, 1)
        self.eager = eager
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.eager:
            x = self.quant(x)
        y = self.head(F.relu(self.up(F.relu(self.down(x)))))
        return self.dequant(y) if self.eager else y


def _inputs(dims: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, 64, generator=generator) if dims == 1 else torch.rand(count, 1, 8, 8,
                                                                                         generator=generator)


def _decoder(*args: int, dims: int = 2, eager: bool = False) -> nn.Module:
    """The decoder quantized by FX mode, or eager mode with per-tensor weights on the transposed convolution (the
    x86 qconfig's per-channel observer is refused there by torch.ao)."""
    calibration = _inputs(dims, 128, 0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Decoder(*args, dims=dims, eager=eager).eval()
    if not eager:
        return to_ao_fx(net, calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net.qconfig = tq.get_default_qconfig("x86")
        net.up.qconfig = tq.QConfig(activation=net.qconfig.activation, weight=tq.default_weight_observer)
        prepared = tq.prepare(net)
        with torch.no_grad():
            prepared(calibration)
        return tq.convert(prepared)


def _defective(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether torch's kernel for the model's transposed convolution is more than a step from a transposed
    convolution of its dequantized input and weights (an independent reference, in float64)."""
    up = model.get_submodule("up")
    seen: dict[str, torch.Tensor] = {}
    handle = up.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    run(model, x)
    handle.remove()
    inp, out = seen["x"], seen["out"]
    function = F.conv_transpose1d if inp.dim() == 3 else F.conv_transpose2d
    with torch.no_grad():
        reference = function(inp.dequantize().double(), up.weight().dequantize().double(), up.bias().double(),
                             up.stride, up.padding, up.output_padding, up.groups, up.dilation)
    scale, zero = out.q_scale(), out.q_zero_point()
    reference = reference.clamp(-zero * scale, (255 - zero) * scale)
    return float((out.dequantize().double() - reference).abs().max()) > scale


@pytest.mark.parametrize(("form", "geometry"), [
    ("fx", (8, 8, 4, 2, 1, 2)), ("fx", (8, 8, 2, 2, 0, 2)), ("fx", (8, 8, 3, 1, 1, 2)), ("fx", (8, 8, 4, 2, 1, 1)),
    ("eager", (8, 8, 4, 2, 1, 2))])
def test_transposed_convolution_is_a_layer_bit_for_bit(form: str, geometry: tuple[int, ...]) -> None:
    """Under the x86 engine (its kernel correct for equal channel counts): the transposed convolution is a layer
    (a fault site) and the model reads bit for bit; a trial's activation and weight faults, in every layer, give
    torch's kernels' logits under the same faults."""
    *args, dims = geometry
    model = _decoder(*args, dims=dims, eager=form == "eager")
    x = _inputs(dims, 32, 1)
    assert not _defective(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)
        qmodel = quantize(model, _inputs(dims, 128, 0))
    assert "up" in qmodel.layers and type(qmodel.layers["up"].module).__name__.startswith("ConvTranspose")
    assert torch.equal(qmodel(x), run(model, x))
    for site, ber in (("act", 1e-2), ("weight", 1e-2)):
        fault_model = FaultModel(site, ber)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x),
                                 torch.Generator().manual_seed(7))
        assert ("up" in {name for _, name in pattern.groups})
        ours = qmodel(x, pattern)
        assert not torch.equal(ours, qmodel(x))
        assert torch.equal(ours, run(ao_under_faults(model, pattern), x)), site


@pytest.mark.parametrize(("name", "geometry"), [
    ("x86", (8, 4, 4, 2, 1)), ("x86", (4, 8, 3, 1, 1)), ("x86", (8, 8, 4, 2, 1)), ("fbgemm", (8, 8, 2, 2, 0)),
    ("fbgemm", (8, 8, 4, 2, 1))])
def test_a_defective_kernel_is_refused_with_its_distance(name: str, geometry: tuple[int, ...]) -> None:
    """The reader refuses a transposed convolution exactly where torch's kernel is more than a step from the
    transposed convolution of its codes (measured independently here: torch 2.14's x86 kernel with unequal channel
    counts, fbgemm's with a 2x2 kernel at stride 2), naming the layer, the engine and the distance; elsewhere it
    reads the model."""
    with engine(name):
        model = _decoder(*geometry)
        x = _inputs(2, 32, 1)
        if _defective(model, x):
            with pytest.raises(DeployedFormatError, match=rf"torch\.ao fx: layer 'up' \(ConvTranspose2d, "
                                                          rf"{geometry[0]} -> {geometry[1]} channels.*engine "
                                                          rf"'{name}'\) puts its outputs up to \d+ output steps away"):
                quantize(model, _inputs(2, 128, 0))
        else:
            qmodel = quantize(model, _inputs(2, 128, 0))
            assert torch.equal(qmodel(x), run(model, x))
