"""Read a model quantized with torch.ao eager mode (`prepare`/`convert`) as its x86/fbgemm kernels compute it.

Measured against torch's own quantized kernels (x86 engine), and reproduced here exactly:

- weights: signed qint8 codes with per-channel (or per-tensor) scales and zero point 0;
- activations: unsigned quint8 codes q meaning (q - zero point) x scale, so a fault on bit 7 moves the value by
  +-128 x scale with no sign extension;
- conv/linear: the int32 accumulator of input and weight codes, scaled by input scale x weight scale / output scale
  in float32, plus the float bias / output scale added unrounded (`deployed.BiasMode.FLOAT`), rounded half to even;
  a fused ReLU clamps at the zero point;
- `QFunctional` (add, add_relu, mul, cat, ...): the float result of dequantized operands, re-gridded to its own
  scale and zero point (`deployed.Requantize`);
- average pooling on a quantized tensor: the mean of integer codes rounded half to even onto the input's grid
  (`deployed.CodeAvgPool`); ReLU, max pooling and reshapes keep values on their grid and run as they are;
- `QuantStub` re-grids its float input (`Requantize`), `DeQuantStub` passes values through.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import call_model, iter_batches
from .deployed import BiasMode, CodeAvgPool, Deployed, DeployedFormatError, DeployedLayer, Requantize

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


def _grid(tensor: torch.Tensor) -> tuple[float, int, bool] | None:
    """(scale, zero point, signed) of a per-tensor quantized tensor, None for anything else."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_quantized:
        return None
    if tensor.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return None
    return float(tensor.q_scale()), int(tensor.q_zero_point()), tensor.dtype == torch.qint8


def _range(signed: bool) -> tuple[int, int]:
    return (-128, 127) if signed else (0, 255)


def record_grids(work: nn.Module, calibration_data: Any, batch_size: int, device: torch.device | str
                 ) -> dict[str, tuple[float, int, bool]]:
    """One forward pass of the ao model: the grid of the quantized input of every module that runs on one."""
    inputs: dict[str, tuple[float, int, bool]] = {}

    def capture(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            grid = _grid(args[0]) if args else None
            if grid is not None:
                inputs.setdefault(name, grid)

        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in work.named_modules() if n]
    try:
        with torch.no_grad():
            for x, _ in iter_batches(calibration_data, batch_size):
                call_model(work, x.to(device))
                break
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def replace_ao_modules(work: nn.Module, inputs: dict[str, tuple[float, int, bool]], source: str
                       ) -> dict[str, DeployedLayer]:
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
            found[name] = DeployedLayer(codes, weight_scale, in_scale, in_zero, float(ao.scale), int(ao.zero_point),
                                        bias=None if bias is None else bias.detach().float(),
                                        bias_mode=BiasMode.FLOAT, input_signed=in_signed, act_signed=False,
                                        relu=isinstance(module, types["fused_relu"]))
            replacement = float_twin(module)
        elif isinstance(module, types["quantize"]):
            replacement = Requantize(float(ao.scale), int(ao.zero_point), *_range(ao.dtype == torch.qint8))
        elif isinstance(module, types["dequantize"]):
            replacement = nn.Identity()
        elif isinstance(module, types["functional"]):
            functional: Any = torch.ao.nn.quantized.FloatFunctional()
            functional.activation_post_process = Requantize(float(ao.scale), int(ao.zero_point), 0, 255)
            replacement = functional
        elif isinstance(module, _AVERAGING) and name in inputs:
            in_scale, in_zero, in_signed = inputs[name]
            replacement = CodeAvgPool(module, in_scale, in_zero, *_range(in_signed))
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
    layers = replace_ao_modules(work, record_grids(work, calibration_data, batch_size, device), "torch.ao eager")
    return Deployed(work, layers, "torch.ao eager", notes=[
        "the float baseline is the float function of the int8 model (dequantized weights, unquantized "
        "activations), not the float model it was converted from"])
