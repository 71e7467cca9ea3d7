"""Accept models already quantized with torch.ao eager mode: their own codes and scales are used.

Such a model holds int8 weights and quint8 activations computed by fused kernels that no hook can corrupt. It is
turned into the same float-module-with-integer-hooks form as any other model: each quantized conv/linear becomes a
float module whose weight codes, weight scales, input (scale, zero point) and output (scale, zero point) are the
ao module's; `QuantStub`/`DeQuantStub` become identities and `QFunctional` float ops (the next layer's input
quantization, with the scale and zero point the ao model used there, re-grids their result).

Activation codes of such a model are affine and unsigned: a stored quint8 code q means (q - zero_point) x scale,
and faults flip the bits of q. Bias stays a float in ao kernels; here it becomes an int32 code at the accumulator
scale, so an output may differ from the ao kernel's by one code in rare rounding ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import iter_batches


@dataclass(frozen=True)
class AoLayer:
    """The codes and quantization parameters an ao-quantized conv/linear brought with it."""

    weight_codes: torch.Tensor  # int32, the weight's shape
    weight_scale: torch.Tensor  # float32 [out_channels]
    input_scale: float
    input_zero_point: int
    act_scale: float
    act_zero_point: int
    fused_relu: bool


def _ao_types() -> dict[str, tuple[type, ...]]:
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    return {
        "layer": (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear),
        "fused_relu": (nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d, nniq.LinearReLU),
        "identity": (nnq.Quantize, nnq.DeQuantize),
        "functional": (nnq.QFunctional,),
    }


def has_ao_modules(model: nn.Module) -> bool:
    package = "torch.ao.nn.quantized"
    return any(type(m).__module__.startswith((package, "torch.ao.nn.intrinsic.quantized")) for m in model.modules())


def _float_twin(module: Any) -> nn.Module:  # an ao Conv/Linear: its attributes are untyped
    """A float conv/linear with the ao module's geometry; its weights are set from codes later."""
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


def _weight(module: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight = module.weight()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zero = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
    else:
        scale = torch.full((weight.shape[0],), weight.q_scale(), dtype=torch.float64)
        zero = torch.tensor([weight.q_zero_point()])
    if bool((zero != 0).any()):
        raise ValueError(f"ao layer {name!r} has asymmetric weights (non-zero zero points); only symmetric int8 "
                         "weights (zero point 0, e.g. the fbgemm/x86 default qconfig) are supported")
    return weight.int_repr().to(torch.int32), scale.float()


def convert_ao_modules(work: nn.Module, calibration_data: Any, batch_size: int,
                       device: torch.device | str) -> dict[str, AoLayer]:
    """In place on `work` (a private copy): replace ao modules by float ones; return each layer's parameters."""
    types = _ao_types()
    names = dict(work.named_modules())
    layers: dict[str, Any] = {n: m for n, m in names.items() if isinstance(m, types["layer"])}
    inputs: dict[str, tuple[float, int]] = {}

    def capture(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            inputs.setdefault(name, (float(args[0].q_scale()), int(args[0].q_zero_point())))

        return hook

    handles = [m.register_forward_pre_hook(capture(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for x, _ in iter_batches(calibration_data, batch_size):
                work(x.to(device))
                break
    finally:
        for handle in handles:
            handle.remove()

    found: dict[str, AoLayer] = {}
    replaced: list[str] = []
    for name, module in names.items():
        if not name or not type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic")):
            continue
        if any(name.startswith(f"{parent}.") for parent in replaced):  # e.g. a Linear's packed parameters
            continue
        replaced.append(name)
        if isinstance(module, types["layer"]):
            if name not in inputs:
                raise ValueError(f"ao layer {name!r} did not run on the calibration data")
            codes, scale = _weight(module, name)
            layer: Any = module  # an ao Conv/Linear: its attributes are untyped
            found[name] = AoLayer(codes, scale, *inputs[name], float(layer.scale), int(layer.zero_point),
                                  isinstance(module, types["fused_relu"]))
            replacement: nn.Module = _float_twin(module)
        elif isinstance(module, types["identity"]):
            replacement = nn.Identity()
        elif isinstance(module, types["functional"]):
            replacement = torch.ao.nn.quantized.FloatFunctional()
        else:
            raise ValueError(f"ao module {name!r} of type {type(module).__qualname__} is not supported; supported: "
                             "quantized Conv1d/2d/3d, Linear (and their ReLU fusions), Quantize, DeQuantize, "
                             "QFunctional")
        parent_name, _, child = name.rpartition(".")
        setattr(work.get_submodule(parent_name) if parent_name else work, child, replacement)
    return found
