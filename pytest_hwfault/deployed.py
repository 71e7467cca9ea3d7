"""One notion of a deployed int8 model, whatever format it came in: what its runtime stores and how it computes.

A reader (`ao.py` for torch.ao eager, `fx_reader.py` for torch.ao FX, `pt2e.py` for torchao PT2E, `onnx_reader.py`
for ONNX QDQ) turns a deployed model into a `Deployed`:

- `module`: a float torch module with the deployed model's function. Each multiply-accumulate layer named in
  `layers` is a plain ``nn.Conv1d/2d/3d`` or ``nn.Linear`` (dequantized weights, float bias), which `quantize`
  turns into an integer layer from the `DeployedLayer`'s codes; every place where the runtime re-grids a value
  outside such a layer (after a residual add, a concatenation, a pooling) is a `Requantize` or `CodeAvgPool`
  module, so the float graph between layers computes what the runtime computes;
- `layers`: per multiply-accumulate layer, the codes and quantization parameters exactly as the runtime holds
  them (`DeployedLayer`): weight codes and per-channel scales, input and output scale *and zero point*, signed or
  unsigned activation codes, the bias and how the runtime adds it (`BiasMode`);
- `float_module`: the model's float function (dequantized weights, activations not re-gridded), for the float
  baseline; None when a reader cannot give it (the float accuracy is then reported as unavailable).

Faults then hit the stored codes as the hardware holds them: an unsigned (uint8) code's bit 7 is worth
+-128 x scale with no sign extension, a signed one's is the sign bit.
"""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .onednn import fused_multiply_add

FORMATS = ("torch.ao eager", "torch.ao fx", "pt2e", "onnx")


class DeployedFormatError(ValueError):
    """A deployed model holds something the reader cannot reproduce exactly; the message names the node and the
    format."""


class BiasMode(str, enum.Enum):
    """How a runtime adds a layer's bias.

    INTEGER: int32 bias codes at the accumulator scale are added to the int32 accumulator, which is then scaled by
    acc_scale / act_scale (ONNX QLinearConv, onnxruntime; the project's own quantizer).
    FLOAT: the int32 accumulator (no bias in it) is scaled to the output's scale and the float bias / act_scale is
    added unrounded (fbgemm/x86 torch.ao kernels; a PT2E graph, whose conv adds a float bias)."""

    INTEGER = "integer"
    FLOAT = "float"


class Scaling(str, enum.Enum):
    """How a runtime takes its float32 accumulator to the output grid, in which float32 steps (each rounds, so the
    order shows on near-ties: measured against each kernel on millions of outputs).

    COMBINED: times one multiplier per channel, float32(input scale x weight scale) / output scale, the bias as
    `BiasMode` says (onnxruntime; the project's own quantizer; a PT2E graph).
    ONEDNN: times the input scale (as 1 / (1 / scale) in float32: torch hands oneDNN inverse scales), then times the
    channel's weight scale, plus the float bias, then times float32(1 / output scale) (oneDNN's int8 kernels: torch.ao's
    x86 engine's convolutions on AVX512-VNNI CPUs, and the onednn engine).
    FBGEMM: plus the float bias / float32(input scale x weight scale), then times the multiplier (fbgemm's
    requantization: torch.ao's x86 engine's linear layers, and the fbgemm engine).
    INDUCTOR: oneDNN's steps as x86 Inductor's int8 ops call it (``onednn::qconv_pointwise``, ``qlinear_pointwise``
    on a compiled PT2E model): the input scale as it is, then as ONEDNN (for a float result, no output step).
    QNNPACK: as COMBINED, but the multiplier is float32(input scale x weight scale) x float32(1 / output scale)
    (QNNPACK's requantization scales: torch's qnnpack engine, ARM; measured: 0 of 14.7M outputs apart on random
    conv and depthwise layers, where the divided multiplier missed 10)."""

    COMBINED = "combined"
    QNNPACK = "qnnpack"
    ONEDNN = "onednn"
    FBGEMM = "fbgemm"
    INDUCTOR = "inductor"


ONEDNN_STEPS = (Scaling.ONEDNN, Scaling.INDUCTOR)  # scaled in oneDNN's float32 steps, the bias between them


@dataclass(frozen=True)
class DeployedLayer:
    """The codes and quantization parameters of one conv/linear layer of a deployed model, as its runtime holds
    them. Codes of activations are stored codes q, meaning (q - zero_point) x scale."""

    weight_codes: torch.Tensor  # int32 in the float module's weight shape
    weight_scale: torch.Tensor  # float32 [out_channels] (a per-tensor scale repeated)
    input_scale: float
    input_zero_point: int
    act_scale: float | None  # None: the runtime keeps the layer's result in float (no output codes)
    act_zero_point: int
    bias: torch.Tensor | None = None  # float32 [out_channels]: the value the runtime adds (see `bias_mode`)
    bias_mode: BiasMode = BiasMode.FLOAT
    input_signed: bool = False  # int8 (True) or uint8 (False) stored codes
    act_signed: bool = False
    relu: bool = False  # a fused ReLU: the output codes clamp at the zero point
    # the runtime adds the output zero point to the scaled float32 accumulator before rounding (oneDNN: torch's x86
    # engine's convolutions on AVX512-VNNI CPUs) rather than rounding, then adding it (fbgemm, onnxruntime): the
    # two differ on ties (x.5) with an odd zero point
    zero_point_before_rounding: bool = False
    scaling: Scaling = Scaling.COMBINED  # where a float bias goes, and in which steps the accumulator is scaled
    bits: int = 8
    # the layer hands on its raw integer accumulator (exact, in its compute dtype), which a module after it scales
    # (a dynamic layer, `ao.DynamicLinear`: the input's scale is known per call only); `weight_scale` is then what
    # that module multiplies by, the layer's stored multiplier (site qparams)
    raw_output: bool = False

    def code_range(self, signed: bool) -> tuple[int, int]:
        """The stored codes' range."""
        return (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if signed else (0, (1 << self.bits) - 1)

    def input_range(self) -> tuple[int, int]:
        """Input codes as code - zero point."""
        low, high = self.code_range(self.input_signed)
        return low - self.input_zero_point, high - self.input_zero_point

    def act_range(self) -> tuple[int, int]:
        """Output codes as code - zero point; a fused ReLU clamps at the zero point."""
        low, high = self.code_range(self.act_signed)
        return (0 if self.relu else low - self.act_zero_point), high - self.act_zero_point


@dataclass
class Deployed:
    """A deployed model read into the engine's form (see the module docstring)."""

    module: nn.Module
    layers: dict[str, DeployedLayer]
    source: str  # one of FORMATS
    float_module: nn.Module | None = None
    # what the reader knows it does not reproduce exactly, or leaves outside the fault sites, in words
    notes: list[str] = field(default_factory=list)
    # the nodes or ops the reader knows may round otherwise than the runtime (named in `notes`): where there are
    # any, outputs a little apart under faults are what the notes say, not news
    inexact: list[str] = field(default_factory=list)
    # each part of the view (module name) and where it comes from in the model's graph, for a check part by part
    # (`graph_agreement.Origin`; read from a converted PT2E graph)
    origins: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in FORMATS:
            raise ValueError(f"source={self.source!r}; allowed: {', '.join(FORMATS)}")


class Requantize(nn.Module):
    """A runtime's re-gridding of a value outside a multiply-accumulate layer (after a residual add, a concat, a
    quantize node): x -> (clamp(round(x / scale) + zero_point, low, high) - zero_point) x scale, rounding half to
    even as every runtime here does. `divide`: x / scale (onnxruntime's QuantizeLinear), or x times the float32
    inverse of the float32 scale (`divide=False`: torch's quantize_per_tensor and quantized kernels on the x86 CPU,
    and a PT2E graph's quantize_per_tensor); the two differ on near-ties."""

    def __init__(self, scale: float, zero_point: int, low: int, high: int, *, divide: bool = True,
                 zero_first: bool = False) -> None:
        super().__init__()
        self.scale, self.zero_point, self.low, self.high, self.divide = float(scale), int(zero_point), low, high, divide
        self.zero_first = zero_first  # the zero point added before rounding (a oneDNN kernel's own output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scale, dtype=torch.float32)
        codes = torch.div(x, scale) if self.divide else torch.mul(x, 1.0 / scale)
        codes = codes.add_(self.zero_point).round_() if self.zero_first else codes.round_().add_(self.zero_point)
        if self.divide:  # onnxruntime's QuantizeLinear: a NaN (a degenerate scale's) to the lowest code (measured)
            codes = codes.nan_to_num_(nan=float(self.low))
        return codes.clamp_(self.low, self.high).sub_(self.zero_point).mul_(scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}, zero_point={self.zero_point}, codes=[{self.low}, {self.high}]"


class CodeAvgPool(nn.Module):
    """An average pooling that a runtime computes on the integer codes of its input (torch's quantized avg pools):
    the mean of (code - zero point) in exact arithmetic (padding counting as zero), rounded half to even onto the
    input's grid. A float average of dequantized values would round ties (one output in ~64 for an 8x8 pool)
    either way. torch's kernels add the zero point before rounding on a contiguous (NCHW) input and after it on a
    channels-last one (measured: with an odd zero point the two differ on every tie): `zero_point_first`."""

    def __init__(self, pool: nn.Module, scale: float, zero_point: int, low: int, high: int,
                 zero_point_first: bool = False) -> None:
        super().__init__()
        self.pool, self.scale, self.zero_point, self.low, self.high = pool, float(scale), int(zero_point), low, high
        self.zero_point_first = zero_point_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scale, dtype=torch.float32)
        codes = torch.div(x, scale).round_().double()  # code - zero point, recovered exactly from code x scale
        mean = self.pool(codes)
        mean = mean.add_(self.zero_point).round_() if self.zero_point_first else mean.round_().add_(self.zero_point)
        return mean.clamp_(self.low, self.high).sub_(self.zero_point).float().mul_(scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}, zero_point={self.zero_point}, zero_point_first={self.zero_point_first}"


def stored_codes(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Stored codes of values (code - zero point) x scale, recovered exactly. On a degenerate grid (an infinite
    scale: its values are NaN at the zero point, -inf or +inf below or above it), the side of the zero point: -1, 0
    or +1 from it, which is all a kernel's infinite ratios read of such a code."""
    if not math.isfinite(scale):
        return torch.sign(torch.nan_to_num(x, nan=0.0)).add_(zero_point)
    return torch.div(x, torch.tensor(scale, dtype=torch.float32)).round_().add_(zero_point)


def code_values(codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """(code - zero point) x scale in float32: how the view carries a quantized value."""
    return codes.sub(zero_point).float().mul_(torch.tensor(scale, dtype=torch.float32))


class CodeTable(nn.Module):
    """An elementwise kernel on a quantized tensor whose output code is a function of the input code alone, as a
    table of the output code of each of the 256 input codes, measured from the runtime itself: onnxruntime's
    QLinearSigmoid and QLinearLeakyRelu (`onnx_reader._runtime_table`); torch's quantized ReLU6, Hardtanh, clamp,
    Hardswish, ELU, LeakyReLU, Sigmoid, Tanh, Hardsigmoid, GELU (`ao.measured_table`). Exact whatever the kernel's
    float approximation, and under faults too: a flipped input code reads its own entry. Values (code - zero point)
    x scale in and out; `table[i]` is the output code of input code i + (-128 if signed else 0); a [channels, 256]
    table is channelwise (a quantized batch norm: `table[c, i]` for channel c, dimension 1). `float_op`: the
    op in float, for the deployed model's float function (`float_function`). `in_place`: the kernel writes its
    result into its input (``relu6(x, inplace=True)``), which later readers of that input then see.
    `reads_channels_last_as_nchw`: the kernel reads the channels-last tensor the model hands it as if its memory
    were NCHW (torch's qnnpack hardtanh/clamp: a defect, `ao.channels_last_defect`), so the view reads its input so
    too (`ChannelsLastAsNchw`)."""

    table: torch.Tensor

    def __init__(self, inp: tuple[float, int, bool], out: tuple[float, int], table: torch.Tensor,
                 float_op: nn.Module | None = None, in_place: bool = False,
                 reads_channels_last_as_nchw: bool = False) -> None:
        super().__init__()
        (self.si, self.zi, self.signed), (self.so, self.zo) = inp, out
        self.register_buffer("table", table.float())
        self.float_op, self.in_place = float_op, in_place
        self.reads_channels_last_as_nchw = reads_channels_last_as_nchw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        read = channels_last_as_nchw(x) if self.reads_channels_last_as_nchw else x
        codes = stored_codes(read, self.si, self.zi)
        index = torch.nan_to_num(codes + (128 if self.signed else 0), nan=0.0).clamp_(0, 255).long()
        if self.table.dim() == 2:  # channelwise: each channel's own row of the flattened table
            channels = torch.arange(0, self.table.numel(), 256, device=x.device)
            index = index.add_(channels.view(1, -1, *[1] * (x.dim() - 2)))
        out = code_values(self.table.view(-1)[index], self.so, self.zo)
        return x.copy_(out) if self.in_place else out

    def float_function(self) -> nn.Module:
        if self.float_op is None:
            raise RuntimeError("this table was built without its float op; its reader gives the float module")
        return ChannelsLastAsNchw(self.float_op) if self.reads_channels_last_as_nchw else self.float_op

    def extra_repr(self) -> str:
        return f"in=({self.si!r}, {self.zi}), out=({self.so!r}, {self.zo}), in_place={self.in_place}" + (
            ", reads_channels_last_as_nchw=True" if self.reads_channels_last_as_nchw else "")


def channels_last_as_nchw(x: torch.Tensor) -> torch.Tensor:
    """A 4-d tensor's values in channels-last memory order, read as an NCHW tensor of the same shape."""
    return x.permute(0, 2, 3, 1).reshape(x.shape) if x.dim() == 4 else x


class ChannelsLastAsNchw(nn.Module):
    """`op` on its input read as `channels_last_as_nchw` does: a `CodeTable`'s float function where the kernel
    reads so."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(channels_last_as_nchw(x))


class KernelSum(nn.Module):
    """A residual sum as x86 Inductor fuses it into the convolution that feeds it (oneDNN's sum post-op,
    ``qconv2d_pointwise.binary``): the other operand's codes (code - zero point) times their scale added to the
    convolution's float32 result in one fused multiply-add, one rounding (measured on 25M outputs: a separate
    product and sum miss ~1 in 10^6), the fused ReLU, then times float32(1 / output scale), plus the zero point,
    rounded half to even, clamped. `forward(result, other)`: the convolution's float result and the other operand's
    values (code x scale, from which the codes are recovered exactly); returns code x output scale, as `Requantize`
    does."""

    def __init__(self, other_scale: float, scale: float, zero_point: int, low: int, high: int, relu: bool) -> None:
        super().__init__()
        self.other_scale, self.scale, self.zero_point = float(other_scale), float(scale), int(zero_point)
        self.low, self.high, self.relu = low, high, relu

    def forward(self, result: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        f32 = torch.float32
        other_scale, scale = torch.tensor(self.other_scale, dtype=f32), torch.tensor(self.scale, dtype=f32)
        codes = torch.div(other, other_scale).round_()
        value = fused_multiply_add(codes, other_scale, result.to(f32))
        if self.relu:
            value = value.clamp_min_(0)
        value = value.mul_(1.0 / scale).add_(self.zero_point).round_().clamp_(self.low, self.high)
        return value.sub_(self.zero_point).mul_(scale)

    def extra_repr(self) -> str:
        return f"other_scale={self.other_scale!r}, scale={self.scale!r}, zero_point={self.zero_point}, " \
               f"relu={self.relu}"


class FloatSum(nn.Module):
    """`KernelSum`'s float function: the sum and the ReLU, no re-gridding."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.relu = relu

    def forward(self, result: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        total = result + other
        return total.relu() if self.relu else total


def float_function(deployed: Deployed) -> nn.Module:
    """The deployed model's float function when the reader gave none: a copy of `module` whose re-gridding points
    pass values through and whose fused ReLUs are explicit."""
    if deployed.float_module is not None:
        return deployed.float_module
    module = copy.deepcopy(deployed.module)
    for name, sub in list(module.named_modules()):
        if isinstance(sub, Requantize):
            module.set_submodule(name, nn.Identity())
        elif isinstance(sub, CodeAvgPool):
            module.set_submodule(name, sub.pool)
        elif isinstance(sub, KernelSum):
            module.set_submodule(name, FloatSum(sub.relu))
        elif callable(getattr(sub, "float_function", None)):  # a reader's module that knows its float function
            module.set_submodule(name, sub.float_function())
    for name, layer in deployed.layers.items():
        if layer.relu:
            module.set_submodule(name, nn.Sequential(module.get_submodule(name), nn.ReLU()))
    return module


def is_onnx(model: Any) -> bool:
    """An ONNX model: a ModelProto, or the path of an .onnx file."""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        import os

        return str(os.fspath(model)).endswith(".onnx")
    return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")


def is_pt2e(model: Any) -> bool:
    """A converted PT2E graph: it quantizes and dequantizes with the quantized_decomposed ops."""
    graph = getattr(model, "graph", None)
    if not isinstance(model, torch.fx.GraphModule) or graph is None:
        return False
    return any(node.op == "call_function" and "quantized_decomposed" in str(node.target) for node in graph.nodes)


def is_ao_fx(model: Any) -> bool:
    """A torch.ao FX `convert_fx` graph: it quantizes with torch.quantize_per_tensor and runs torch.ao modules."""
    if not isinstance(model, torch.fx.GraphModule):
        return False
    return any(node.op == "call_function" and node.target in (torch.quantize_per_tensor,
                                                               torch.quantize_per_tensor_dynamic)
               for node in model.graph.nodes)


def detect(model: Any) -> str | None:
    """The deployed format of `model`, or None for a float model the project quantizes itself."""
    from .ao import has_ao_modules

    if is_onnx(model):
        return "onnx"
    if is_pt2e(model):
        return "pt2e"
    if is_ao_fx(model):
        return "torch.ao fx"
    if isinstance(model, nn.Module) and has_ao_modules(model):
        return "torch.ao eager"
    return None


def read(model: Any, source: str, calibration_data: Any, batch_size: int, device: torch.device | str,
         inductor: bool = False) -> Deployed:
    """Read a deployed model of format `source` (see `detect`) into the engine's form. The user's model is not
    modified: readers work on a copy. Imports of optional packages (torchao, onnx) happen here, lazily. `inductor`:
    a PT2E model as x86 Inductor compiles it (``torch.compile`` with freezing: oneDNN's int8 kernels), not as its
    graph computes."""
    if source == "torch.ao eager":
        from .ao import read_ao_eager

        return read_ao_eager(copy.deepcopy(model).eval(), calibration_data, batch_size, device)
    if source == "torch.ao fx":
        from .fx_reader import read_ao_fx

        return read_ao_fx(model, calibration_data, batch_size, device)
    if source == "pt2e":
        from .pt2e import read_pt2e

        return read_pt2e(model, calibration_data, batch_size, device, inductor=inductor)
    if source == "onnx":
        from .onnx_reader import read_onnx

        return read_onnx(model, calibration_data, batch_size, device)
    raise ValueError(f"unknown deployed format {source!r}; allowed: {', '.join(FORMATS)}")


def check_fixed_batch(source: str, size: int, declared: str, module: nn.Module, calibration_data: Any, *,
                      runtime: str, fix: str) -> str:
    """A graph made for a fixed batch of `size` images (`declared`: where it says so) must compute one image more:
    the engine runs images in batches of its own size. A note saying so (`runtime`: how the runtime runs it), or
    DeployedFormatError naming `declared` and `fix`, where it fails on `size` + 1 images or gives other shapes."""
    from torch.utils._pytree import tree_leaves

    from .data import call_model, concat, iter_batches

    what = f"the graph fixes its batch size to {size} ({declared})"
    parts, count = [], 0
    for x, _ in iter_batches(calibration_data, size + 1):
        parts.append(x)
        count += len(x)
        if count > size:
            break
    if count <= size:
        return (f"{what}: {runtime}; the calibration data holds {count} image(s), so whether it computes the larger "
                "batches the engine runs is not checked")
    images, problem = concat(parts)[: size + 1], None
    try:
        with torch.no_grad():
            outputs = [t for t in tree_leaves(call_model(module, images)) if isinstance(t, torch.Tensor)]
        if not outputs or any(t.dim() == 0 or len(t) != size + 1 for t in outputs):
            problem = f"its outputs on {size + 1} images are shaped {[list(t.shape) for t in outputs]}"
    except Exception as error:  # noqa: BLE001 - said, with the fix
        problem = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if problem is not None:
        raise DeployedFormatError(f"{source}: {what} and does not compute a batch of {size + 1} images ({problem}): "
                                  f"the engine runs images in batches. To gate it, {fix}")
    return f"{what}: {runtime}; the engine runs the same graph on larger batches, which it computes"


def load_check_pattern(qmodel: Any, count: int, ber: float, check: str) -> Any:
    """The act faults a load check under faults runs on `count` images (a fixed seed per `check`), or None where
    the view has no act site."""
    from .faults import FaultModel, sample_pattern, trial_generator
    from .spec import Site

    fault_model = FaultModel(Site.ACT, ber)
    targets = qmodel.targets(fault_model.site)
    return sample_pattern(fault_model, targets, count, trial_generator(0, check, 0)) if targets else None


def trial_agreement(qmodel: Any, images: Any, pattern: Any, theirs: list[torch.Tensor], against: str, ber: float,
                    cause: str = "") -> tuple[str, bool]:
    """The view under `pattern` (a trial of act faults at `ber`) against a runtime's outputs `theirs` under the same
    faults, in words, and whether they are equal bit for bit: the load checks under faults of `onnx_faults` and
    `ao_faults`. `cause`: said after a difference."""
    from torch.utils._pytree import tree_leaves

    with torch.no_grad():
        ours = [t for t in tree_leaves(qmodel(images, pattern)) if isinstance(t, torch.Tensor)]
        clean = [t for t in tree_leaves(qmodel(images)) if isinstance(t, torch.Tensor)]
    moved = sum(int((a != b).sum()) for a, b in zip(ours, clean)) / max(1, sum(a.numel() for a in ours))
    where = (f"checked against {against} under a trial of act faults (BER {ber:g}: {len(pattern)} faults, which "
             f"moved {moved:.0%} of the outputs) on {len(images)} calibration images")
    if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs, ours)):
        return f"{where}: its outputs have other shapes than the view's", False
    if all(torch.equal(a, b.cpu()) for a, b in zip(theirs, ours)):
        return f"{where}: outputs equal bit for bit", True
    equal = sum(int((a == b.cpu()).sum()) for a, b in zip(theirs, ours))
    return f"{where}: outputs differ ({equal} of {sum(a.numel() for a in theirs)} values exactly equal){cause}", False


def float32_multiplier(input_scale: float, weight_scale: torch.Tensor, act_scale: float | None,
                       inverse: bool = False) -> torch.Tensor:
    """input_scale x weight_scale / act_scale per channel, in float32 arithmetic as the runtimes compute it (no
    division for a layer whose result stays float); with `inverse`, times float32(1 / act_scale) instead
    (`Scaling.QNNPACK`)."""
    f32 = torch.float32
    product = torch.tensor(input_scale, dtype=f32) * weight_scale.to(f32)
    if act_scale is None:
        return product
    scale = torch.tensor(act_scale, dtype=f32)
    return product * (1.0 / scale) if inverse else product / scale

