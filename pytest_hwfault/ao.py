"""Read a model quantized with torch.ao eager mode (`prepare`/`convert`) as its x86/fbgemm kernels compute it.

Measured against torch's own quantized kernels (x86 engine), and reproduced here exactly:

- weights: signed qint8 codes with per-channel (or per-tensor) scales and zero point 0;
- activations: unsigned quint8 codes q meaning (q - zero point) x scale, so a fault on bit 7 moves the value by
  +-128 x scale with no sign extension;
- conv/linear: the int32 accumulator of input and weight codes in float32, scaled and biased in the kernel's own
  float32 steps (`deployed.Scaling`: oneDNN's convolutions scale by the input scale, then the weight scale, add the
  float bias, scale by 1 / output scale, and add the zero point before rounding; fbgemm's linear layers add the bias
  / (input scale x weight scale) first, scale by one multiplier, round, then add the zero point; which kernel runs a
  module is measured, `zero_point_before_rounding`), rounded half to even; a fused ReLU clamps at the zero point;
- `QFunctional` (add, add_relu, mul, cat, ...): the float result of dequantized operands, re-gridded to its own
  scale and zero point (`deployed.Requantize`);
- average pooling on a quantized tensor: the mean of integer codes rounded half to even onto the input's grid
  (`deployed.CodeAvgPool`); ReLU, max pooling and reshapes keep values on their grid and run as they are;
- `QuantStub` re-grids its float input (`Requantize`), `DeQuantStub` passes values through.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import call_model, iter_batches
from .deployed import BiasMode, CodeAvgPool, Deployed, DeployedFormatError, DeployedLayer, Requantize, Scaling

_AVERAGING = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d)


def _ao_types() -> dict[str, tuple[type, ...]]:
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    return {
        "layer": (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear),
        "fused_relu": (nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d, nniq.LinearReLU),
        "quantize": (nnq.Quantize,),
        "dequantize": (nnq.DeQuantize,),
        "functional": (nnq.QFunctional,),
    }


class KernelDequantize(Requantize):
    """The vectorised dequantization of torch's quantized add on the x86 CPU: q x scale + (-zero point x scale),
    one fused multiply-add in float32 (measured; (q - zero point) x scale differs in the last bit, which moves
    near-ties of the sum). The input is (q - zero point) x scale, whose code it recovers exactly. A subclass of
    `Requantize`, so that the float function (`deployed.float_function`) passes values through it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scale, dtype=torch.float32)
        premul = torch.tensor(-self.zero_point, dtype=torch.float32) * scale
        codes = torch.div(x, scale).round_().add_(self.zero_point)  # the stored code q, exactly
        # q x scale is exact in float64 (8 x 24 bits), and so is its sum with premul: one rounding to float32
        return codes.double().mul_(float(scale)).add_(float(premul)).float()


class KernelCodes(Requantize):
    """A quantized value's stored code minus its zero point, recovered exactly from (code - zero point) x scale: the
    integer operand of torch's quantized mul. A `Requantize`, so that the float function passes values through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.div(x, torch.tensor(self.scale, dtype=torch.float32)).round_()


class KernelProductRequantize(Requantize):
    """torch's quantized mul on the x86 CPU: the integer product of the operands' codes minus their zero points
    (exact in float32: |p| <= 2^16), times the float32 multiplier scale_a x scale_b x (1 / scale), rounded half to
    even, plus the zero point (measured; a float product of dequantized values differs on near-ties)."""

    def __init__(self, scale_a: float, scale_b: float, scale: float, zero_point: int, low: int, high: int) -> None:
        super().__init__(scale, zero_point, low, high)
        f32 = torch.float32
        inverse = torch.tensor(1.0, dtype=f32) / torch.tensor(scale, dtype=f32)
        self.multiplier = float(torch.tensor(scale_a, dtype=f32) * torch.tensor(scale_b, dtype=f32) * inverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.mul(x, torch.tensor(self.multiplier, dtype=torch.float32)).round_()
        scale = torch.tensor(self.scale, dtype=torch.float32)
        return codes.add_(self.zero_point).clamp_(self.low, self.high).sub_(self.zero_point).mul_(scale)


def kernel_scaling(onednn: bool) -> Scaling:
    """The float32 steps of the kernel that runs a quantized conv/linear: oneDNN's where it adds the zero point
    before rounding (`zero_point_before_rounding`), fbgemm's otherwise. Measured on this machine's x86, onednn and
    fbgemm engines against both kernels on 4M outputs each (every layer of nine random-init ResNet-style models, and
    a 64-channel 1x1 conv and linear with random scales and biases): each kernel's own steps gave every output
    code, the one-multiplier form missed 7-12 in 4M."""
    return Scaling.ONEDNN if onednn else Scaling.FBGEMM


def zero_point_before_rounding(module: Any) -> bool:
    """Whether the kernel that runs the quantized conv/linear `module` adds its output zero point to the scaled
    float32 accumulator before rounding (oneDNN: torch's x86 engine's convolutions on CPUs with AVX512-VNNI, the
    onednn engine) rather than rounding, then adding it (fbgemm: the x86 engine's linear layers and convolutions
    elsewhere). With an odd zero point the two differ exactly on ties (x.5 rounds to the even neighbour of x.5 or of
    x.5 + zero point). Measured on a copy of `module` whose scales are powers of two, so that its scaled
    accumulators are exact and one in four is a tie."""
    probe: Any = copy.deepcopy(module)
    weight = module.weight()
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, weight.shape, generator=generator, dtype=torch.int8)
    channels = weight.shape[0]
    step, out_scale, zero = 2.0**-6, 2.0**-8, 77  # accumulators x 2^-4: one in 16 is x.5
    probe.set_weight_bias(torch._make_per_channel_quantized_tensor(
        codes, torch.full((channels,), step, dtype=torch.float64), torch.zeros(channels, dtype=torch.int64), 0),
        torch.zeros(channels))
    probe.scale, probe.zero_point = out_scale, zero
    if isinstance(module, torch.ao.nn.quantized.Linear):
        shape: tuple[int, ...] = (256, module.in_features)
    else:
        spatial = [k * d + 4 for k, d in zip(module.kernel_size, module.dilation)]
        shape = (4, module.in_channels, *spatial)
    # input codes - zero point in [-3, 12]: accumulators stay well inside the output range around the zero point
    x_codes = torch.randint(0, 16, shape, generator=generator, dtype=torch.uint8)
    x = torch._make_per_tensor_quantized_tensor(x_codes, step, 3)
    with torch.no_grad():
        out = probe(x).int_repr().double() - zero
        values = x_codes.double() - 3
        if isinstance(module, torch.ao.nn.quantized.Linear):
            acc = values @ codes.double().t()
        else:
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(module.kernel_size)]
            acc = conv(values, codes.double(), None, module.stride, module.padding, module.dilation, module.groups)
    scaled = acc * (step * step / out_scale)
    low, high = -zero, 255 - zero
    if isinstance(module, _ao_types()["fused_relu"]):
        low = 0
    inside = (scaled > low) & (scaled < high)
    ties = inside & (scaled - scaled.floor() == 0.5)
    if not bool(ties.any()):
        return False
    first = ((scaled + zero).round() - zero)[ties]
    after = scaled.round()[ties]
    return bool((out[ties] == first).all()) and not bool((out[ties] == after).all())


def has_ao_modules(model: nn.Module) -> bool:
    package = "torch.ao.nn.quantized"
    return any(type(m).__module__.startswith((package, "torch.ao.nn.intrinsic.quantized")) for m in model.modules())


def _is_ao(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic"))


def float_twin(module: Any) -> nn.Module:  # an ao Conv/Linear: its attributes are untyped
    """A float conv/linear with the ao module's geometry, dequantized weights and float bias."""
    if isinstance(module, torch.ao.nn.quantized.Linear):
        twin: Any = nn.Linear(module.in_features, module.out_features, bias=True)
    else:
        kind = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(module.kernel_size)]
        twin = kind(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, bias=True, padding_mode=module.padding_mode)
    bias = module.bias()
    with torch.no_grad():
        twin.bias.copy_(bias if bias is not None else torch.zeros_like(twin.bias))
        twin.weight.copy_(module.weight().dequantize())
    return twin.requires_grad_(False)


def weight_codes(module: Any, name: str, source: str = "torch.ao eager") -> tuple[torch.Tensor, torch.Tensor]:
    """An ao conv/linear's int8 weight codes and per-channel scales; asymmetric weights are refused."""
    weight = module.weight()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zero = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
    else:
        scale = torch.full((weight.shape[0],), weight.q_scale(), dtype=torch.float64)
        zero = torch.tensor([weight.q_zero_point()])
    if bool((zero != 0).any()):
        raise DeployedFormatError(f"{source}: layer {name!r} has asymmetric weights (non-zero zero points); only "
                                  "symmetric int8 weights (zero point 0, e.g. the x86/fbgemm default qconfig) are "
                                  "supported")
    return weight.int_repr().to(torch.int32), scale.float()


def _grid(tensor: Any) -> tuple[float, int, bool] | None:
    """(scale, zero point, signed) of a per-tensor quantized tensor, None for anything else."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_quantized:
        return None
    if tensor.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return None
    return float(tensor.q_scale()), int(tensor.q_zero_point()), tensor.dtype == torch.qint8


def _range(signed: bool) -> tuple[int, int]:
    return (-128, 127) if signed else (0, 255)


Grid = tuple[float, int, bool]  # scale, zero point, signed (qint8) codes


def pool_adds_zero_point_first(tensor: torch.Tensor) -> bool:
    """Whether torch's quantized average pools add the zero point before rounding on this input: on a contiguous
    (NCHW) one, not on a channels-last one (see `deployed.CodeAvgPool`)."""
    return bool(tensor.is_contiguous())


def record_grids(work: nn.Module, calibration_data: Any, batch_size: int, device: torch.device | str
                 ) -> tuple[dict[str, Grid], dict[str, dict[str, list[Grid | None]]], dict[str, bool]]:
    """One forward pass of the ao model: the grid of the quantized input of every module that runs on one, for
    each QFunctional the methods it ran with the grids of their tensor operands, and for each module on a quantized
    input whether that input was contiguous (NCHW: `pool_adds_zero_point_first`)."""
    inputs: dict[str, Grid] = {}
    functional: dict[str, dict[str, list[Grid | None]]] = {}
    contiguous: dict[str, bool] = {}

    def capture(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            grid = _grid(args[0]) if args else None
            if grid is not None:
                inputs.setdefault(name, grid)
                contiguous.setdefault(name, pool_adds_zero_point_first(args[0]))

        return hook

    def watch(name: str, method: str, call: Any) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            operands = list(args[0]) if method == "cat" else list(args)
            functional.setdefault(name, {}).setdefault(method, [_grid(a) for a in operands])
            return call(*args, **kwargs)

        return recorded

    handles = [m.register_forward_hook(capture(n)) for n, m in work.named_modules() if n]
    watched = [(m, method) for n, m in work.named_modules() if isinstance(m, _ao_types()["functional"])
               for method in _FUNCTIONAL_METHODS if hasattr(m, method)]
    for module, method in watched:
        name = next(n for n, m in work.named_modules() if m is module)
        setattr(module, method, watch(name, method, getattr(module, method)))
    try:
        with torch.no_grad():
            for x, _ in iter_batches(calibration_data, batch_size):
                call_model(work, x.to(device))
                break
    finally:
        for handle in handles:
            handle.remove()
        for module, method in watched:
            delattr(module, method)  # the class's method again
    return inputs, functional, contiguous


_FUNCTIONAL_METHODS = ("add", "add_relu", "mul", "mul_relu", "cat", "add_scalar", "mul_scalar", "matmul")
_SUPPORTED_FUNCTIONAL = ("add", "add_relu", "mul", "cat")


class AoFunctional(nn.Module):
    """torch.ao eager's QFunctional as its x86 kernels compute it: add/add_relu on the operands as the add kernel
    dequantizes them (`KernelDequantize`), mul on the operands' integer codes (`KernelCodes`,
    `KernelProductRequantize`), cat of the values; each result re-gridded to the module's own scale and zero point
    (`Requantize(divide=False)`). Its re-gridding modules are `Requantize`s, so the float function passes values
    through them (and mul then multiplies values)."""

    def __init__(self, scale: float, zero_point: int, operands: dict[str, list[Grid | None]]) -> None:
        super().__init__()
        self.requantize = Requantize(scale, zero_point, 0, 255, divide=False)
        self.requantize_relu = Requantize(scale, zero_point, zero_point, 255, divide=False)
        self.dequantize = nn.ModuleList(
            KernelDequantize(g[0], g[1], *_range(g[2])) if g is not None and g[1] else nn.Identity()
            for g in operands.get("add", operands.get("add_relu", [None, None])))
        mul = operands.get("mul", [None, None])
        self.codes = nn.ModuleList(nn.Identity() if g is None else KernelCodes(g[0], g[1], *_range(g[2]))
                                   for g in mul)
        scales = [g[0] if g is not None else 1.0 for g in mul]
        self.product = KernelProductRequantize(scales[0], scales[1], scale, zero_point, 0, 255)

    def _operands(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dequantize[0](x), self.dequantize[1](y)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.requantize(torch.add(*self._operands(x, y)))

    def add_relu(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.requantize_relu(torch.relu(torch.add(*self._operands(x, y))))

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.product(torch.mul(self.codes[0](x), self.codes[1](y)))

    def cat(self, x: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        return self.requantize(torch.cat(x, dim=dim))


def replace_ao_modules(work: nn.Module, inputs: dict[str, Grid], functional: dict[str, dict[str, list[Grid | None]]],
                       contiguous: dict[str, bool], source: str) -> dict[str, DeployedLayer]:
    """In place on `work` (a private copy): each ao module becomes its float equivalent with the runtime's
    re-gridding; returns each conv/linear layer's codes and parameters."""
    types = _ao_types()
    found: dict[str, DeployedLayer] = {}
    replaced: list[str] = []
    for name, module in list(work.named_modules()):
        if not name or any(name.startswith(f"{parent}.") for parent in replaced):  # e.g. packed parameters
            continue
        replacement: nn.Module | None = None
        ao: Any = module  # ao modules' attributes are untyped
        if isinstance(module, types["layer"]):
            if name not in inputs:
                raise DeployedFormatError(f"{source}: layer {name!r} did not run on the calibration data")
            codes, weight_scale = weight_codes(module, name, source)
            in_scale, in_zero, in_signed = inputs[name]
            bias = ao.bias()
            onednn = zero_point_before_rounding(module)
            found[name] = DeployedLayer(codes, weight_scale, in_scale, in_zero, float(ao.scale), int(ao.zero_point),
                                        bias=None if bias is None else bias.detach().float(),
                                        bias_mode=BiasMode.FLOAT, input_signed=in_signed, act_signed=False,
                                        relu=isinstance(module, types["fused_relu"]),
                                        zero_point_before_rounding=onednn, scaling=kernel_scaling(onednn))
            replacement = float_twin(module)
        elif isinstance(module, types["quantize"]):
            replacement = Requantize(float(ao.scale), int(ao.zero_point), *_range(ao.dtype == torch.qint8),
                                     divide=False)
        elif isinstance(module, types["dequantize"]):
            replacement = nn.Identity()
        elif isinstance(module, types["functional"]):
            unsupported = sorted(set(functional.get(name, {})) - set(_SUPPORTED_FUNCTIONAL))
            if unsupported:
                raise DeployedFormatError(f"{source}: QFunctional {name!r} runs {', '.join(unsupported)}; supported: "
                                          f"{', '.join(_SUPPORTED_FUNCTIONAL)}")
            replacement = AoFunctional(float(ao.scale), int(ao.zero_point), functional.get(name, {}))
        elif isinstance(module, _AVERAGING) and name in inputs:
            in_scale, in_zero, in_signed = inputs[name]
            replacement = CodeAvgPool(module, in_scale, in_zero, *_range(in_signed), contiguous[name])
        elif _is_ao(module):
            raise DeployedFormatError(
                f"{source}: module {name!r} of type {type(module).__qualname__} is not supported; supported: "
                "quantized Conv1d/2d/3d, Linear (and their ReLU fusions), Quantize, DeQuantize, QFunctional, and "
                "float modules running on quantized tensors (ReLU, pooling, reshapes)")
        if replacement is not None:
            replaced.append(name)
            work.set_submodule(name, replacement)
    return found


def read_ao_eager(work: nn.Module, calibration_data: Any, batch_size: int, device: torch.device | str) -> Deployed:
    """`work`: a private eval-mode copy of a torch.ao eager model, modified in place."""
    work.to(device)
    inputs, functional, contiguous = record_grids(work, calibration_data, batch_size, device)
    layers = replace_ao_modules(work, inputs, functional, contiguous, "torch.ao eager")
    return Deployed(work, layers, "torch.ao eager", notes=[
        "the float baseline is the float function of the int8 model (dequantized weights, unquantized "
        "activations), not the float model it was converted from"])
