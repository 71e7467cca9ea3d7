"""Read a model quantized with torch.ao eager mode (`prepare`/`convert`) as its x86/fbgemm kernels compute it.

Measured against torch's own quantized kernels (x86 engine), and reproduced here exactly:

- weights: signed qint8 codes with per-channel (or per-tensor) scales and zero point 0; a transposed convolution's
  per-tensor (its layer checked against the exact sums of its codes: `refuse_defective_kernel`);
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
- an activation module torch runs code by code on a quantized tensor (quantized Hardswish, ELU, LeakyReLU,
  Sigmoid, ReLU6; float ReLU6, Hardtanh, Sigmoid, Tanh, Hardsigmoid, ... on quantized input): a `CodeTable`, the
  output code of every input code measured from the kernel itself (`measured_table`);
- `QuantStub` re-grids its float input (`Requantize`), `DeQuantStub` passes values through;
- dynamic quantization (`quantize_dynamic`: `nn.quantized.dynamic.Linear`, `LinearReLU`), as fbgemm computes it
  (`DynamicLinear`): each call quantizes its float input on the input's own range (ATen's
  `ChooseQuantizationParams` on [0, 127] with `reduce_range`, codes round(x x float32(1 / scale)) + zero point), the
  int32 product with the weight codes, the codes' column sums times the zero point taken off, and the result
  fma(float32(acc), input scale x weight scale, bias). Measured bit for bit against the kernel on 2,000 inputs of
  six kinds (wide and tiny ranges, one sign, constant), five shapes, per-tensor and per-channel weights.
  The runtime's range is the whole input tensor's, so the view quantizes each image on its own range: the model as
  deployed one input at a time (`quantization.dynamic_agreement` checks that at load).
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import call_model, iter_batches
from .deployed import (
    BiasMode,
    CodeAvgPool,
    CodeTable,
    Deployed,
    DeployedFormatError,
    DeployedLayer,
    Requantize,
    Scaling,
    channels_last_as_nchw,
)
from .onednn import fused_multiply_add

_AVERAGING = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d)


def _ao_types() -> dict[str, tuple[type, ...]]:
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.intrinsic.quantized.dynamic as nniqd
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd

    return {
        "dynamic": (nnqd.Linear,),  # nniqd.LinearReLU is one too
        "dynamic_relu": (nniqd.LinearReLU,),
        "dynamic_recurrent": (nnqd.LSTM, nnqd.GRU),
        "layer": (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear, nnq.ConvTranspose1d, nnq.ConvTranspose2d,
                  nnq.ConvTranspose3d),
        "transposed": (nnq.ConvTranspose1d, nnq.ConvTranspose2d, nnq.ConvTranspose3d),
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


def qnnpack_add_parameters(scale_a: float, scale_b: float, scale: float) -> tuple[int, int, int]:
    """QNNPACK's fixed-point add (torch's qnnpack engine): each operand's ratio float32(scale_x / scale) times
    2^shift, rounded half to even, where shift = 21 - the larger ratio's binary exponent: (multiplier a,
    multiplier b, shift)."""
    f32 = torch.float32
    ratios = [torch.tensor(s, dtype=f32) / torch.tensor(scale, dtype=f32) for s in (scale_a, scale_b)]
    shift = 21 - (math.frexp(float(max(ratios)))[1] - 1)
    a, b = (int(torch.round(r * torch.tensor(2.0**shift, dtype=f32))) for r in ratios)
    return a, b, shift


class QnnpackAddOperand(Requantize):
    """An operand of QNNPACK's add: its stored code (recovered exactly from (code - zero point) x scale) times its
    fixed-point multiplier, an integer below 2^30, exact in float64. A `Requantize`, so that the float function
    passes values through."""

    def __init__(self, scale: float, zero_point: int, low: int, high: int, multiplier: int) -> None:
        super().__init__(scale, zero_point, low, high)
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.div(x, torch.tensor(self.scale, dtype=torch.float32)).round_().add_(self.zero_point)
        return codes.double().mul_(self.multiplier)


class QnnpackAddRequantize(Requantize):
    """QNNPACK's add on the sum of its operands' `QnnpackAddOperand`s: plus the zero points' product
    -(multiplier a x zero point a + multiplier b x zero point b), shifted right by `shift` rounding half away from
    zero, plus the output zero point, clamped (at the zero point for add_relu); returns code x scale, as `Requantize`
    does. Measured against the engine's kernel on every code pair of 40 random grids (2.6M outputs, add and
    add_relu): equal; the x86 kernel's float arithmetic differs on ~1 pair in 65,536, more under faults."""

    def __init__(self, scale: float, zero_point: int, low: int, high: int, product: int, shift: int) -> None:
        super().__init__(scale, zero_point, low, high)
        self.product, self.shift = product, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = x.long().add_(self.product)
        mask = (1 << self.shift) - 1
        remainder = (acc & mask) - (acc < 0).long()
        codes = (acc >> self.shift).add_((remainder > (mask >> 1)).long()).add_(self.zero_point)
        codes = codes.clamp_(self.low, self.high).sub_(self.zero_point).to(torch.float32)
        return codes.mul_(torch.tensor(self.scale, dtype=torch.float32))


def kernel_scaling(onednn: bool) -> Scaling:
    """The float32 steps of the kernel that runs a quantized conv/linear: oneDNN's where it adds the zero point
    before rounding (`zero_point_before_rounding`), fbgemm's otherwise. Measured on this machine's x86, onednn and
    fbgemm engines against both kernels on 4M outputs each (every layer of nine random-init ResNet-style models, and
    a 64-channel 1x1 conv and linear with random scales and biases): each kernel's own steps gave every output
    code, the one-multiplier form missed 7-12 in 4M."""
    return Scaling.ONEDNN if onednn else Scaling.FBGEMM


def qnnpack_bias_codes(bias: torch.Tensor | None, input_scale: float, weight_scale: torch.Tensor
                       ) -> torch.Tensor | None:
    """A conv/linear's float bias as QNNPACK (torch's qnnpack engine: ARM phones and boards) adds it: int32 codes at
    the accumulator's scale, round_half_even(float32(bias) x float32(1 / float32(input scale x weight scale))), the
    scales' product taken in float64 (`weight_scale`: the weight's stored scales, float64 as torch holds them), on
    the int32 accumulator, which one float32 multiplier then takes to the output grid (`Scaling.QNNPACK`). Measured
    against the engine's kernels on biases within 1e-6 of half a code (conv and linear, per-tensor and per-channel
    weights): every code of 52,000. On scales a float32 holds (an observer's) a float32 product is the same; on others
    it missed 16% of these codes, dividing instead 25-34%."""
    if bias is None:
        return None
    f64 = torch.float64
    accumulator_scale = (torch.tensor(input_scale, dtype=f64) * weight_scale.to(f64)).to(torch.float32)
    return torch.round(bias.detach().to(torch.float32) * (1.0 / accumulator_scale)).to(torch.int32)


def stored_weight_scales(module: Any) -> torch.Tensor:
    """A quantized conv/linear's weight scales per output channel, float64 as torch stores them."""
    weight = module.weight()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return weight.q_per_channel_scales().to(torch.float64)
    channels = module.out_channels if _is_transposed(module) else weight.shape[0]
    return torch.full((channels,), float(weight.q_scale()), dtype=torch.float64)


def static_layer(module: Any, codes: torch.Tensor, weight_scale: torch.Tensor, input_grid: Grid, output_grid: Grid,
                 relu: bool) -> DeployedLayer:
    """A static quantized conv/linear (eager or FX) as the engine set now runs it: QNNPACK's integer bias and one
    float32 multiplier under the qnnpack engine (`qnnpack_bias_codes`), otherwise the x86 kernel's float32 steps,
    oneDNN's or fbgemm's as measured on the layer (`zero_point_before_rounding`)."""
    in_scale, in_zero, in_signed = input_grid
    act_scale, act_zero, act_signed = output_grid
    bias = module.bias()
    if torch.backends.quantized.engine == "qnnpack":
        bias_codes = qnnpack_bias_codes(bias, in_scale, stored_weight_scales(module))
        return DeployedLayer(codes, weight_scale, in_scale, in_zero, act_scale, act_zero, bias=bias_codes,
                             bias_mode=BiasMode.INTEGER, input_signed=in_signed, act_signed=act_signed, relu=relu,
                             scaling=Scaling.QNNPACK)
    onednn = zero_point_before_rounding(module)
    return DeployedLayer(codes, weight_scale, in_scale, in_zero, act_scale, act_zero,
                         bias=None if bias is None else bias.detach().float(), bias_mode=BiasMode.FLOAT,
                         input_signed=in_signed, act_signed=act_signed, relu=relu, zero_point_before_rounding=onednn,
                         scaling=kernel_scaling(onednn))


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
    transposed = _is_transposed(module)
    channels = module.out_channels if transposed else weight.shape[0]
    step, out_scale, zero = 2.0**-6, 2.0**-8, 77  # accumulators x 2^-4: one in 16 is x.5
    probe.set_weight_bias(torch._make_per_tensor_quantized_tensor(codes, step, 0) if transposed else
                          torch._make_per_channel_quantized_tensor(codes, torch.full((channels,), step,
                                                                                     dtype=torch.float64),
                                                                   torch.zeros(channels, dtype=torch.int64), 0),
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
        acc = _accumulator(module, values, codes.double())
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


def _is_transposed(module: Any) -> bool:
    """A quantized transposed convolution (a function: an isinstance check would narrow `module` from Any)."""
    return isinstance(module, _ao_types()["transposed"])


def _accumulator(module: Any, values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The exact sums of an ao conv/linear over input codes minus their zero point (float64)."""
    if isinstance(module, torch.ao.nn.quantized.Linear):
        return values @ codes.t()
    dims = len(module.kernel_size)
    if _is_transposed(module):
        transposed = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
        return transposed(values, codes, None, module.stride, module.padding, module.output_padding, module.groups,
                          module.dilation)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return conv(values, codes, None, module.stride, module.padding, module.dilation, module.groups)


def refuse_defective_kernel(module: Any, name: str, grid: Grid, source: str) -> None:
    """Refuse a quantized transposed convolution whose runtime kernel does not compute a transposed convolution of
    its codes. torch 2.14's are defective on common shapes (measured: the x86 and onednn engines' put outputs 50-160
    output steps away from it whenever in_channels != out_channels; fbgemm's, with a 2x2 kernel at stride 2,
    repack other weights than those set), so the gate cannot stand for what such a model computes. Measured on the
    layer itself: random input codes on its input grid, its codes against the exact sums' value (before rounding)."""
    if not _is_transposed(module):
        return
    scale, zero, signed = grid
    low, high = _range(signed)
    generator = torch.Generator().manual_seed(0)
    spatial = [k * d + 3 for k, d in zip(module.kernel_size, module.dilation)]
    x_codes = torch.randint(low, high + 1, (2, module.in_channels, *spatial), generator=generator)
    x = torch._make_per_tensor_quantized_tensor(x_codes.to(torch.int8 if signed else torch.uint8), scale, zero)
    weight = module.weight()
    with torch.no_grad():
        out = module(x)
        acc = _accumulator(module, x_codes.double() - zero, weight.int_repr().double())
    bias = module.bias().detach() if module.bias() is not None else None
    value = acc * (scale * weight.q_scale())
    if bias is not None:
        value = value + bias.double().reshape(1, -1, *[1] * len(spatial))
    out_low, out_high = _range(out.dtype == torch.qint8)
    expected = (value / out.q_scale() + out.q_zero_point()).clamp(out_low, out_high)
    distance = float((out.int_repr().double() - expected).abs().max())
    if distance > 1.0:  # a correct kernel is within half a step, plus float32 rounding
        raise DeployedFormatError(
            f"{source}: layer {name!r} ({type(module).__qualname__}, {module.in_channels} -> {module.out_channels} "
            f"channels, kernel {tuple(module.kernel_size)}, stride {tuple(module.stride)}): torch's quantized kernel "
            f"(engine {torch.backends.quantized.engine!r}) puts its outputs up to {distance:.0f} output steps away "
            "from a transposed convolution of its codes (torch's quantized transposed convolutions are defective "
            "there: measured), so no view can stand for what this model computes; the float model quantized by the "
            "engine, or another export (ONNX), can be gated")


class PairSaturatingConv2d(nn.Conv2d):
    """A depthwise convolution as fbgemm's kernel computes it (torch's x86 engine runs depthwise convolutions of more
    than 100 channels on fbgemm; the fbgemm engine, all): per channel, the products of the stored input codes (zero
    point included) and the weight codes summed two kernel taps at a time, in row-major tap order, in int16 with
    saturation (vpmaddubsw), then in int32 (measured: `pair_saturation`). Calibrated codes (a reduced range) do not
    saturate; a fault's high bit can (MobileNetV2: 98 of 589,824 sums of one layer under a trial at BER 1e-3).
    Computes on codes minus the zero point, as the engine's layers do; `float_function` is the plain convolution."""

    pairs: torch.Tensor

    def __init__(self, conv: Any, input_zero_point: int) -> None:  # an nn.Conv2d (its geometry is loosely typed)
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=conv.bias is not None)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None and self.bias is not None:
                self.bias.copy_(conv.bias)
        self.requires_grad_(False)
        self.input_zero_point = input_zero_point
        taps = torch.arange(math.prod(self.kernel_size)).view(1, 1, *self.kernel_size)
        self.register_buffer("pairs", torch.stack([(taps // 2 == pair).float()
                                                   for pair in range((taps.numel() + 1) // 2)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for mask in self.pairs:
            weight = self.weight * mask.to(self.weight.dtype)
            pair = F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
            offset = (weight.sum((1, 2, 3)) * self.input_zero_point).view(1, -1, 1, 1)  # raw codes' share
            pair = pair.add_(offset).clamp_(-32768, 32767).sub_(offset)
            total = pair if total is None else total.add_(pair)
        assert total is not None
        return total if self.bias is None else total + self.bias.view(1, -1, 1, 1)

    def float_function(self) -> nn.Module:
        me: Any = self
        plain = nn.Conv2d(me.in_channels, me.out_channels, me.kernel_size, me.stride, me.padding, me.dilation,
                          me.groups, bias=me.bias is not None)
        plain.load_state_dict({key: value for key, value in self.state_dict().items() if key != "pairs"})
        return plain.requires_grad_(False)


def pair_saturation(module: Any) -> bool | None:
    """How torch's kernel for a quantized convolution sums its products, measured on a copy with random weight codes
    and input codes over the whole uint8 range (the codes faults produce): None, exactly (oneDNN's VNNI kernels);
    True, in saturating int16 pairs of kernel taps (fbgemm's depthwise kernels: `PairSaturatingConv2d` reproduces
    them); False, otherwise (named in the notes)."""
    if isinstance(module, torch.ao.nn.quantized.Linear) or _is_transposed(module):
        return None
    probe: Any = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(0)
    weight = module.weight()
    codes = torch.randint(-127, 128, weight.shape, generator=generator, dtype=torch.int8)
    channels = weight.shape[0]
    probe.set_weight_bias(torch._make_per_channel_quantized_tensor(
        codes, torch.full((channels,), 2.0**-6, dtype=torch.float64), torch.zeros(channels, dtype=torch.int64), 0),
        None)
    probe.scale, probe.zero_point = 2.0**-1, 128  # sums / 2^11: saturated pairs move them by whole codes
    zero = 37
    spatial = [k * d + 6 for k, d in zip(module.kernel_size, module.dilation)]
    x_codes = torch.randint(0, 256, (4, module.in_channels, *spatial), generator=generator, dtype=torch.uint8)
    x = torch._make_per_tensor_quantized_tensor(x_codes, 2.0**-6, zero)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # as the model's own tensors
    with torch.no_grad():
        out = probe(x).int_repr().double() - 128
        exact = _accumulator(module, x_codes.double() - zero, codes.double())
    scale = 2.0**-12 / 2.0**-1
    low = 0 if isinstance(module, _ao_types()["fused_relu"]) else -128  # a fused ReLU clamps at the zero point
    if float((out - (exact * scale).clamp(low, 127)).abs().max()) <= 0.5:
        return None
    if x.dim() != 4 or module.groups != module.in_channels or module.in_channels != module.out_channels or \
            module.padding_mode != "zeros":
        return False
    plain: Any = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                           module.dilation, module.groups, bias=False)
    twin = PairSaturatingConv2d(plain, zero)
    with torch.no_grad():
        twin.weight.copy_(codes.double())
        paired = twin.double()(x_codes.double() - zero)
    return float((out - (paired * scale).clamp(low, 127)).abs().max()) <= 0.5


def channels_last_notes(work: nn.Module) -> list[str]:
    """The note on the activations whose kernel reads channels-last tensors as NCHW (`channels_last_defect`)."""
    defective = [name for name, module in work.named_modules()
                 if isinstance(module, CodeTable) and module.reads_channels_last_as_nchw]
    if not defective:
        return []
    return [f"{len(defective)} activation(s) (e.g. {defective[0]!r}) run by torch's kernel (engine "
            f"{torch.backends.quantized.engine!r}) read the channels-last tensor the model hands them as if its "
            "memory were NCHW, which moves most codes to other places (a torch defect, measured): the view reproduces "
            "it, so the gate judges what the model computes; the float model does not compute so"]


def saturation_notes(saturating: dict[str, bool]) -> list[str]:
    """The notes on layers whose kernel saturates its sums (`pair_saturation`: True, reproduced; False, not)."""
    paired = [name for name, known in saturating.items() if known]
    other = [name for name, known in saturating.items() if not known]
    notes = []
    if paired:
        notes.append(f"{len(paired)} depthwise layer(s) (e.g. {paired[0]!r}) sum as fbgemm's kernel does: two kernel "
                     "taps at a time in int16, saturating on large codes (a fault's high bit), then in int32 "
                     "(measured, reproduced)")
    if other:
        notes.append(f"{len(other)} layer(s) (e.g. {other[0]!r}) whose kernel saturates its sums otherwise than the "
                     "engine reproduces (measured on codes over the whole uint8 range): exact fault-free on "
                     "calibrated codes, but where faults produce large codes the runtime's sums differ from the view's")
    return notes


def has_ao_modules(model: nn.Module) -> bool:
    package = "torch.ao.nn.quantized"
    return any(type(m).__module__.startswith((package, "torch.ao.nn.intrinsic.quantized")) for m in model.modules())


def _is_ao(module: nn.Module) -> bool:
    """A torch.ao module the reader must understand; a float fusion (`torch.ao.nn.intrinsic.modules.fused`, e.g.
    LinearReLU left unconverted) is a float Sequential whose float children run as they are."""
    kind = type(module).__module__
    return kind.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic")) and \
        not kind.startswith("torch.ao.nn.intrinsic.modules")


def float_twin(module: Any, saturating_zero_point: int | None = None) -> nn.Module:  # untyped ao attributes
    """A float conv/linear with the ao module's geometry, dequantized weights and float bias; with
    `saturating_zero_point` (the input's), a `PairSaturatingConv2d`."""
    if isinstance(module, torch.ao.nn.quantized.Linear):
        twin: Any = nn.Linear(module.in_features, module.out_features, bias=True)
    elif _is_transposed(module):
        transposed = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[len(module.kernel_size)]
        twin = transposed(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.output_padding, module.groups, bias=True, dilation=module.dilation,
                    padding_mode=module.padding_mode)
    else:
        kind = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(module.kernel_size)]
        twin = kind(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, bias=True, padding_mode=module.padding_mode)
    bias = module.bias()
    with torch.no_grad():
        twin.bias.copy_(bias if bias is not None else torch.zeros_like(twin.bias))
        twin.weight.copy_(module.weight().dequantize())
    if saturating_zero_point is not None:
        return PairSaturatingConv2d(twin, saturating_zero_point)
    return twin.requires_grad_(False)


def weight_codes(module: Any, name: str, source: str = "torch.ao eager") -> tuple[torch.Tensor, torch.Tensor]:
    """An ao conv/linear's int8 weight codes and per-output-channel scales; asymmetric weights are refused, and
    per-channel ones on a transposed convolution (torch.ao's observers refuse them too)."""
    weight = module.weight()
    if _is_transposed(module):
        if weight.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise DeployedFormatError(f"{source}: layer {name!r} is a transposed convolution with per-channel "
                                      "weights; only per-tensor weights are supported there (torch.ao's default)")
        return _weight_codes_of(weight, name, source, module.out_channels)
    return _weight_codes_of(weight, name, source)


def _weight_codes_of(weight: torch.Tensor, name: str, source: str, channels: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zero = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
    else:
        scale = torch.full((channels or weight.shape[0],), weight.q_scale(), dtype=torch.float64)
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


# -- elementwise ops on quantized tensors: a table of the runtime's output code for every input code -------------
def float_elementwise(module: nn.Module) -> nn.Module | None:
    """The float op of a module that torch runs on a quantized tensor code by code (its output code a function of
    the input code alone): a quantized activation module's float twin, a float activation module itself; None for
    any other module."""
    import torch.ao.nn.quantized as nnq

    ao: Any = module  # ao modules' attributes are untyped
    twins: dict[type, Any] = {nnq.Hardswish: lambda: nn.Hardswish(), nnq.ELU: lambda: nn.ELU(ao.alpha),
                              nnq.LeakyReLU: lambda: nn.LeakyReLU(ao.negative_slope), nnq.Sigmoid: lambda: nn.Sigmoid(),
                              nnq.ReLU6: lambda: nn.ReLU6()}
    twin = twins.get(type(module))
    if twin is not None:
        return twin()
    if _is_ao(module):  # e.g. a quantized Softmax or LayerNorm: not code by code
        return None
    if isinstance(module, (nn.Hardtanh, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ELU, nn.CELU, nn.LeakyReLU, nn.GELU,
                           nn.Hardswish, nn.Threshold)):  # nn.ReLU6 is a Hardtanh
        return copy.deepcopy(module)
    return None


def float_channelwise(module: nn.Module) -> nn.Module | None:
    """The float op of a quantized module whose output code is a function of its input code and channel alone (a
    quantized batch norm, and its ReLU fusion: a per-channel affine map, re-gridded); None for any other module."""
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    if not isinstance(module, (nnq.BatchNorm2d, nnq.BatchNorm3d)):  # BNReLU2d/3d are subclasses
        return None
    norm: Any = module
    twin = (nn.BatchNorm2d if isinstance(module, nnq.BatchNorm2d) else nn.BatchNorm3d)(norm.num_features, norm.eps)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(twin, name).copy_(getattr(norm, name))
    twin = twin.eval().requires_grad_(False)
    return nn.Sequential(twin, nn.ReLU()) if isinstance(module, (nniq.BNReLU2d, nniq.BNReLU3d)) else twin


def measured_table(op: Any, grid: Grid, what: str, source: str, channels: int | None = None, dims: int = 4
                   ) -> tuple[torch.Tensor, Grid, bool]:
    """torch's output code for each of the 256 input codes (in order from the lowest) of an elementwise op on a
    quantized tensor on `grid`, the grid of its output, and whether it wrote into its input: measured by running
    `op` itself on one tensor that holds every code. Its kernels give a code the same output wherever it sits
    (measured for ReLU6, Hardtanh, clamp, Hardswish, ELU, LeakyReLU, Sigmoid, Tanh, Hardsigmoid and GELU on 4M codes
    each: contiguous and channels-last tensors, odd lengths, one and two threads), so the table is the kernel.
    With `channels`, a channelwise op on `dims`-dimensional tensors: a [channels, 256] table, measured on 256 images
    each holding one code in every channel (a quantized batch norm: bit for bit on 4.8M codes, the same variety)."""
    scale, zero, signed = grid
    low, high = _range(signed)
    codes = torch.arange(low, high + 1).to(torch.int8 if signed else torch.uint8)
    if channels is not None:
        codes = codes.view(256, 1, *[1] * (dims - 2)).expand(256, channels, *[1] * (dims - 2)).contiguous()
    probe = torch._make_per_tensor_quantized_tensor(codes, scale, zero)
    with torch.no_grad():
        out = op(probe)
    if not isinstance(out, torch.Tensor) or not out.is_quantized or out.shape != probe.shape or \
            out.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        raise DeployedFormatError(f"{source}: {what} does not give a per-tensor quantized tensor of its input's shape "
                                  "on a quantized tensor; only elementwise ops are read as tables")
    out_grid = (float(out.q_scale()), int(out.q_zero_point()), out.dtype == torch.qint8)
    table = out.int_repr().long()
    if channels is not None:
        table = table.reshape(256, channels).t().contiguous()
    return table, out_grid, out.data_ptr() == probe.data_ptr()


def channels_last_defect(op: Any, grid: Grid, table: torch.Tensor, what: str, source: str) -> bool:
    """Whether torch's kernel of the elementwise `op` reads a channels-last tensor as if its memory were NCHW
    (`deployed.channels_last_as_nchw`), as torch's qnnpack hardtanh and clamp (ReLU6) do: their output is the table
    applied to the input's memory order, 75% of the codes out of place (measured; the x86 engine's kernels compute
    code by code in either layout). Measured on a channels-last tensor of every code at shuffled places; a kernel
    that does neither is refused (DeployedFormatError)."""
    scale, zero, signed = grid
    low, high = _range(signed)
    generator = torch.Generator().manual_seed(0)
    codes = (torch.randperm(high - low + 1, generator=generator) + low).view(2, 8, 4, 4)
    probe = torch._make_per_tensor_quantized_tensor(codes.to(torch.int8 if signed else torch.uint8), scale, zero)
    with torch.no_grad():
        out = op(probe.contiguous(memory_format=torch.channels_last)).int_repr().long()
    if torch.equal(out, table[codes - low]):
        return False
    if torch.equal(out, table[channels_last_as_nchw(codes) - low]):
        return True
    raise DeployedFormatError(f"{source}: {what} computes a channels-last quantized tensor otherwise than code by "
                              f"code (torch's kernel, engine {torch.backends.quantized.engine!r}, measured), and the "
                              "model hands it one: no table stands for it")


def code_table(op: Any, float_op: nn.Module, grid: Grid, what: str, source: str, channels: int | None = None,
               dims: int = 4, channels_last: bool = False) -> tuple[CodeTable, Grid]:
    """`op`, run by torch on quantized tensors on `grid`, as a `CodeTable` (with its float op), and its output
    grid; with `channels`, a channelwise op on `dims`-dimensional tensors (see `measured_table`). `channels_last`:
    the model hands the op channels-last tensors, whose reading by the kernel is measured (`channels_last_defect`)."""
    table, out, in_place = measured_table(op, grid, what, source, channels, dims)
    defect = channels is None and channels_last and channels_last_defect(op, grid, table, what, source)
    return CodeTable(grid, out[:2], table, float_op, in_place, reads_channels_last_as_nchw=defect), out


def module_table(module: nn.Module, grid: Grid, what: str, source: str, channels_last: bool = False
                 ) -> tuple[CodeTable, Grid] | None:
    """A module torch runs code by code (an activation) or channel by channel (a batch norm) on a quantized
    tensor on `grid`, as a `CodeTable`; None for any other module. `channels_last`: see `code_table`."""
    float_op = float_elementwise(module)
    if float_op is not None:
        return code_table(module, float_op, grid, what, source, channels_last=channels_last)
    float_op = float_channelwise(module)
    if float_op is not None:
        norm: Any = module
        return code_table(module, float_op, grid, what, source, int(norm.num_features),
                          5 if isinstance(module, torch.ao.nn.quantized.BatchNorm3d) else 4)
    return None


# -- dynamic quantization: each input quantized on its own range, as fbgemm's dynamic linear does ------------------
SMALL_SCALE = torch.tensor(6.1e-5, dtype=torch.float32)  # ATen's SMALL_SCALE_THRESHOLD: smaller scales are raised


def dynamic_qparams(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (dim 0) of `x`: the float32 scale and the zero point (as float32) that ATen's
    ``ChooseQuantizationParams(min, max, 0, qmax)`` gives for the image's range, as fbgemm's dynamic linear calls it:
    the range widened to hold 0, the scale (max - min) / qmax in float64 (0.1 where it is 0 or its float32 inverse
    overflows; raised to 6.1e-5 with the range stretched where smaller), the zero point from the end with the
    smaller error term (ATen's), clamped, rounded half to even; the scale rounded to float32 last. No Python branch
    on values: a traced graph (late start) computes the same."""
    flat = x.flatten(1)
    low, high = flat.amin(1).clamp(max=0.0), flat.amax(1).clamp(min=0.0)
    scale = (high.double() - low.double()) / qmax
    single = scale.float()
    scale = torch.where((single == 0) | torch.isinf(1 / single), torch.full_like(scale, 0.1), scale)
    small = scale < SMALL_SCALE.double()
    stretch = SMALL_SCALE / scale.float()  # float32, as ATen's amplifier
    wide = SMALL_SCALE * qmax
    low_small = torch.where(low == 0, low, torch.where(high == 0, -wide, low * stretch))
    high_small = torch.where(low == 0, wide.expand_as(high), torch.where(high == 0, high, high * stretch))
    low, high = torch.where(small, low_small, low), torch.where(small, high_small, high)
    scale = torch.where(small, SMALL_SCALE.double(), scale)
    from_low, from_high = -low.double() / scale, qmax - high.double() / scale
    low_error, high_error = -(low.double() / scale).abs(), qmax - (high.double() / scale).abs()
    zero = torch.where(low_error < high_error, from_low, from_high)
    zero = zero.clamp(0, qmax).round()  # below 0 -> 0, above qmax -> qmax, else nearbyint
    return scale.float(), zero.float()


class DynamicQuantize(nn.Module):
    """fbgemm's quantization of a dynamic linear's float input, per image: codes round(x x float32(1 / scale)) +
    zero point, clamped to [0, 255] (uint8), as float32 values. Returns (codes, scale, zero point), the last two per
    image."""

    def __init__(self, qmax: int) -> None:
        super().__init__()
        self.qmax = qmax

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale, zero = dynamic_qparams(x, self.qmax)
        # per image, with the image dimension moved last to broadcast (no Python arithmetic on sizes: traceable)
        codes = torch.mul(x.float().movedim(0, -1), 1 / scale).round_().add_(zero).clamp_(0, 255)
        return codes.movedim(-1, 0), scale, zero

    def extra_repr(self) -> str:
        return f"codes=[0, {self.qmax}] on each image's range"


def dynamic_output(acc: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, weight_sums: torch.Tensor,
                   weight_scale: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """fbgemm's float output of a dynamic linear from its raw int32 accumulator sum(code x weight code) (exact, in
    float32 or float64): minus the zero point x the weight codes' column sum in int32 (wrapping, as the kernel's
    int32 arithmetic does: only a faulty accumulator gets there), converted to float32, then one fused multiply-add
    with the float32 product input scale x weight scale and the bias; a fused ReLU last."""
    # [N, ..., out] as [..., N, out]: per-image and per-output factors broadcast as [N, out] (traceable)
    raw = acc.double().movedim(0, -2) - zero.double().unsqueeze(1) * weight_sums
    raw = torch.remainder(raw + 2.0**31, 2.0**32) - 2.0**31
    multiplier = scale.unsqueeze(1) * weight_scale
    out = fused_multiply_add(raw.float(), multiplier, bias.expand(raw.shape)) if bias is not None else \
        raw.float() * multiplier
    return (out.clamp_min_(0) if relu else out).movedim(-2, 0)


class DynamicLinear(nn.Module):
    """torch.ao's dynamic Linear (or LinearReLU) as fbgemm computes it: `quantize` (per image), then `linear`, the
    multiply-accumulate layer the engine computes on integer codes (input codes with zero point 0 as its view of
    them, so an input fault flips the stored uint8 code; its result the raw accumulator, where acc faults land),
    then `dynamic_output`. `weight_scale` is the layer's stored multiplier once the view is built (qparams faults
    edit it). The zero point's correction uses the column sums of the weight codes as they are (a weight fault
    changes them, as it does the runtime's when the faulty codes are packed; the engine's static layers likewise
    compute with the faulty code everywhere). In the view, `linear` holds the codes; before (the engine's
    calibration pass, which only records shapes), its dequantized weights."""

    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, qmax: int,
                 relu: bool = False) -> None:
        """`weight`: the dequantized weights [out, in] (the float function's); `qmax`: 127 with reduce_range."""
        super().__init__()
        self.quantize = DynamicQuantize(qmax)
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("weight_scale", weight_scale.float())
        self.relu = relu
        self.scales_layer = ""  # the layer whose raw accumulator it scales (the reader names it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale, zero = self.quantize(x)
        acc = self.linear(codes)
        # after the layer: a late-start cut before it keeps per-image values only
        weight_sums = self.linear.weight.sum(1, dtype=torch.float64)  # exact on codes: integers below 2^53
        return dynamic_output(acc, scale, zero, weight_sums, self.weight_scale, self.bias, self.relu).to(x.dtype)

    def float_function(self) -> nn.Module:
        """The layer's float function: the dequantized weights and the bias, no quantization (built from `linear`
        before the view writes its codes there; no float copy is kept in the module, whose parameters the coverage
        lists)."""
        twin = nn.Linear(self.linear.in_features, self.linear.out_features, bias=self.bias is not None)
        with torch.no_grad():
            twin.weight.copy_(self.linear.weight)
            if twin.bias is not None and self.bias is not None:
                twin.bias.copy_(self.bias)
        twin.requires_grad_(False)
        return nn.Sequential(twin, nn.ReLU()) if self.relu else twin


def read_dynamic(module: Any, name: str, ran: set[str], source: str) -> tuple[DynamicLinear, DeployedLayer]:
    """A dynamic Linear/LinearReLU as a `DynamicLinear` and its integer layer (named `name`.linear)."""
    if name not in ran:
        raise DeployedFormatError(f"{source}: layer {name!r} did not run on the calibration data")
    if module._packed_params.dtype != torch.qint8:
        raise DeployedFormatError(
            f"{source}: dynamic layer {name!r} holds {module._packed_params.dtype} weights (quantize_dynamic with "
            "dtype=torch.float16): no integer codes to fault; quantize it with dtype=torch.qint8, or pass the float "
            "model")
    codes, weight_scale = weight_codes(module, name, source)
    twin: Any = float_twin(module)
    replacement = DynamicLinear(twin.weight, weight_scale, module.bias(), 127 if (module.version or 0) >= 4 else 255,
                                relu=isinstance(module, _ao_types()["dynamic_relu"]))  # reduce_range from version 4
    replacement.scales_layer = f"{name}.linear"
    layer = DeployedLayer(codes, weight_scale, input_scale=1.0, input_zero_point=0, act_scale=None, act_zero_point=0,
                          input_signed=False, raw_output=True)
    return replacement, layer


def read_dynamic_recurrent(module: Any, name: str, ran: set[str], source: str
                           ) -> tuple[nn.Module, dict[str, DeployedLayer]]:
    """A dynamic LSTM or GRU (torch.quantized_lstm / quantized_gru with fbgemm's dynamic linears) as the engine's
    unrolled recurrent module (`decompose.UnrolledRecurrent`) whose gate matmuls are `DynamicLinear`s: the input's
    share of every gate in one call per sequence (its range the image's whole sequence, as torch computes it for the
    whole input at once), the hidden state's at each step (its range that step's state); then torch's own gate
    equations. Measured bit for bit against the module run one sequence at a time (reduce_range: codes in
    [0, 127])."""
    from .decompose import UnrolledRecurrent

    if name not in ran:
        raise DeployedFormatError(f"{source}: layer {name!r} did not run on the calibration data")
    if module.mode not in ("LSTM", "GRU") or module.dtype != torch.qint8:
        raise DeployedFormatError(
            f"{source}: dynamic {module.mode} {name!r} with {module.dtype} weights is not supported; supported: "
            "dynamic LSTM and GRU with qint8 weights")
    weights, biases = module._weight_bias()["weight"], module._weight_bias()["bias"]
    dequantized = getattr(nn, module.mode)(module.input_size, module.hidden_size, module.num_layers, module.bias,
                                           module.batch_first, 0.0, module.bidirectional)
    with torch.no_grad():
        for key, weight in weights.items():
            getattr(dequantized, key).copy_(weight.dequantize())
        for key, bias in biases.items():
            if bias is not None:
                getattr(dequantized, key).copy_(bias)
    unrolled = UnrolledRecurrent(dequantized)
    layers: dict[str, DeployedLayer] = {}
    for suffix, cell in unrolled.cells.items():
        for part in ("ih", "hh"):
            weight, bias = weights[f"weight_{part}_{suffix}"], biases.get(f"bias_{part}_{suffix}")
            codes, weight_scale = _weight_codes_of(weight, f"{name}.{part}_{suffix}", source)
            gates = DynamicLinear(weight.dequantize(), weight_scale, bias, 127)
            layer = f"{name}.cells.{suffix}.{part}.linear"
            gates.scales_layer = layer
            setattr(cell, part, gates)
            layers[layer] = DeployedLayer(codes, weight_scale, input_scale=1.0, input_zero_point=0, act_scale=None,
                                          act_zero_point=0, input_signed=False, raw_output=True)
    return unrolled, layers


def pool_adds_zero_point_first(tensor: torch.Tensor) -> bool:
    """Whether torch's quantized average pools add the zero point before rounding on this input: on a contiguous
    (NCHW) one, not on a channels-last one (see `deployed.CodeAvgPool`); never under the qnnpack engine, whose
    pools (avg_pool2d, adaptive and global) round the exact mean of the codes, then add it (measured: 0 of 300k
    outputs apart, 2x2 to 14x14 windows, both layouts)."""
    return torch.backends.quantized.engine != "qnnpack" and bool(tensor.is_contiguous())


def is_channels_last(tensor: torch.Tensor) -> bool:
    """A 4-d tensor held channels-last (and not also NCHW, as a tensor of one channel or one pixel is)."""
    return tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)


def qnnpack_add(grids: list[Grid], scale: float) -> bool:
    """Whether torch's quantized add of operands on `grids` runs QNNPACK's fixed-point kernel: under the qnnpack
    engine, on two uint8 operands whose scale ratios it accepts ([2^-14, 2^8) of the output scale)."""
    if torch.backends.quantized.engine != "qnnpack" or len(grids) != 2 or any(g[2] for g in grids):
        return False
    return all(2.0**-14 <= g[0] / scale < 2.0**8 for g in grids)


class Recorded(NamedTuple):
    """What one forward pass of an ao model shows the reader (`record_grids`)."""

    inputs: dict[str, Grid]  # the grid of the quantized input of every module that runs on one (its first call's)
    functional: dict[str, dict[str, list[Grid | None]]]  # per QFunctional: its methods, their operands' grids
    contiguous: dict[str, bool]  # per module on a quantized input: NCHW (`pool_adds_zero_point_first`)
    ran: set[str]  # the modules that ran
    several: set[str]  # the modules that ran on inputs of more than one grid (called at several places), or on
    # quantized and float inputs both
    channels_last: set[str]  # the modules whose quantized input was a channels-last 4-d tensor (`channels_last_defect`)


def record_grids(work: nn.Module, calibration_data: Any, batch_size: int, device: torch.device | str) -> Recorded:
    """One forward pass of the ao model on the first calibration batch (see `Recorded`)."""
    inputs: dict[str, Grid] = {}
    functional: dict[str, dict[str, list[Grid | None]]] = {}
    contiguous: dict[str, bool] = {}
    ran: set[str] = set()
    several: set[str] = set()
    channels_last: set[str] = set()
    first: dict[str, Grid | None] = {}  # the first input's grid, None for a float one

    def capture(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            ran.add(name)
            grid = _grid(args[0]) if args else None
            if first.setdefault(name, grid) != grid:
                several.add(name)
            if grid is not None:
                inputs.setdefault(name, grid)
                contiguous.setdefault(name, pool_adds_zero_point_first(args[0]))
                if is_channels_last(args[0]):
                    channels_last.add(name)

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
    return Recorded(inputs, functional, contiguous, ran, several, channels_last)


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
        added = operands.get("add", operands.get("add_relu", [None, None]))
        grids = [g for g in added if g is not None]
        if qnnpack_add(grids, scale):  # QNNPACK's fixed-point add (torch's qnnpack engine, uint8 operands)
            (sa, za, _), (sb, zb, _) = grids
            ma, mb, shift = qnnpack_add_parameters(sa, sb, scale)
            product = -(ma * za + mb * zb)
            self.add_requantize: nn.Module = QnnpackAddRequantize(scale, zero_point, 0, 255, product, shift)
            self.add_requantize_relu: nn.Module = QnnpackAddRequantize(scale, zero_point, zero_point, 255, product,
                                                                       shift)
            self.dequantize = nn.ModuleList(QnnpackAddOperand(g[0], g[1], 0, 255, m)
                                            for g, m in zip(grids, (ma, mb)))
        else:
            self.add_requantize = self.requantize
            self.add_requantize_relu = Requantize(scale, zero_point, zero_point, 255, divide=False)
            self.dequantize = nn.ModuleList(
                KernelDequantize(g[0], g[1], *_range(g[2])) if g is not None and g[1] else nn.Identity()
                for g in added)
        mul = operands.get("mul", [None, None])
        self.codes = nn.ModuleList(nn.Identity() if g is None else KernelCodes(g[0], g[1], *_range(g[2]))
                                   for g in mul)
        scales = [g[0] if g is not None else 1.0 for g in mul]
        self.product = KernelProductRequantize(scales[0], scales[1], scale, zero_point, 0, 255)

    def _operands(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dequantize[0](x), self.dequantize[1](y)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.add_requantize(torch.add(*self._operands(x, y)))

    def add_relu(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # QNNPACK's operands: >= 0, relu a no-op
        return self.add_requantize_relu(torch.relu(torch.add(*self._operands(x, y))))

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.product(torch.mul(self.codes[0](x), self.codes[1](y)))

    def cat(self, x: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        return self.requantize(torch.cat(x, dim=dim))


class NeverRan(nn.Module):
    """In the view, a quantized layer of the model that did not run on the calibration data (an auxiliary head
    the model's eval forward skips): it has no input grid, so no view; should it run, the gate stops saying so."""

    def __init__(self, name: str, source: str) -> None:
        super().__init__()
        self.name, self.source = name, source

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise DeployedFormatError(f"{self.source}: layer {self.name!r} ran, but did not run on the calibration data, "
                                  "so the view holds no reading of it: calibrate on data that runs it")


def replace_ao_modules(work: nn.Module, recorded: Recorded, source: str, never_ran: list[str] | None = None,
                       saturating: dict[str, bool] | None = None) -> dict[str, DeployedLayer]:
    """In place on `work` (a private copy): each ao module becomes its float equivalent with the runtime's
    re-gridding, each module torch runs code by code on a quantized tensor a `CodeTable`; returns each conv/linear
    layer's codes and parameters. A layer that did not run on the calibration data becomes a `NeverRan` (its name
    added to `never_ran`). A layer whose kernel saturates its sums is added to `saturating` (`pair_saturation`)."""
    inputs, functional, contiguous, ran, several, channels_last = recorded
    types = _ao_types()
    found: dict[str, DeployedLayer] = {}
    replaced: list[str] = []
    for name, module in list(work.named_modules()):
        if not name or any(name.startswith(f"{parent}.") for parent in replaced):  # e.g. packed parameters
            continue
        replacement: nn.Module | None = None
        ao: Any = module  # ao modules' attributes are untyped
        dynamic = isinstance(module, (types["dynamic"], types["dynamic_recurrent"]))
        if never_ran is not None and (name not in ran if dynamic else  # a dynamic Linear is a Linear
                                      isinstance(module, types["layer"]) and name not in inputs):
            never_ran.append(name)
            replacement = NeverRan(name, source)
        elif isinstance(module, types["dynamic"]):
            replacement, found[f"{name}.linear"] = read_dynamic(module, name, ran, source)
        elif isinstance(module, types["dynamic_recurrent"]):
            replacement, recurrent = read_dynamic_recurrent(module, name, ran, source)
            found.update(recurrent)
        elif isinstance(module, types["layer"]):
            if name not in inputs:
                raise DeployedFormatError(f"{source}: layer {name!r} did not run on the calibration data")
            refuse_defective_kernel(module, name, inputs[name], source)
            codes, weight_scale = weight_codes(module, name, source)
            found[name] = static_layer(module, codes, weight_scale, inputs[name],
                                       (float(ao.scale), int(ao.zero_point), False),
                                       relu=isinstance(module, types["fused_relu"]))
            paired = pair_saturation(module)
            if paired is not None and saturating is not None:
                saturating[name] = paired
            replacement = float_twin(module, inputs[name][1] if paired else None)
        elif isinstance(module, types["quantize"]):
            replacement = Requantize(float(ao.scale), int(ao.zero_point), *_range(ao.dtype == torch.qint8),
                                     divide=False)
        elif isinstance(module, types["dequantize"]) or isinstance(module, torch.ao.nn.quantized.Dropout):
            replacement = nn.Identity()  # a quantized Dropout is the identity in eval mode
        elif isinstance(module, types["functional"]):
            unsupported = sorted(set(functional.get(name, {})) - set(_SUPPORTED_FUNCTIONAL))
            if unsupported:
                raise DeployedFormatError(f"{source}: QFunctional {name!r} runs {', '.join(unsupported)}; supported: "
                                          f"{', '.join(_SUPPORTED_FUNCTIONAL)}")
            replacement = AoFunctional(float(ao.scale), int(ao.zero_point), functional.get(name, {}))
        elif isinstance(module, _AVERAGING) and name in inputs:
            in_scale, in_zero, in_signed = inputs[name]
            replacement = CodeAvgPool(module, in_scale, in_zero, *_range(in_signed), contiguous[name])
        elif name in inputs and (float_elementwise(module) or float_channelwise(module)) is not None:
            what = f"module {name!r} ({type(module).__qualname__})"
            if name in several:
                raise DeployedFormatError(f"{source}: {what} runs on tensors of several grids, or on quantized and "
                                          "float tensors (one module called at several places), and torch computes "
                                          "it on each grid's codes: give each place its own module")
            table = module_table(module, inputs[name], what, source, channels_last=name in channels_last)
            assert table is not None
            replacement = table[0]
        elif _is_ao(module):
            kind = f"{type(module).__module__}.{type(module).__qualname__}"
            dynamic = ".dynamic." in kind
            raise DeployedFormatError(
                f"{source}: module {name!r} of type {kind} is not supported" + (
                    " (dynamic quantization of this module type)" if dynamic else "") +
                "; supported: quantized Conv1d/2d/3d, Linear (and their ReLU fusions), dynamic Linear and LinearReLU "
                "(qint8), Quantize, DeQuantize, Dropout, QFunctional, and float modules running on quantized tensors "
                "(ReLU, pooling, reshapes)" + (": quantize_dynamic with {nn.Linear} only, or pass the float model, "
                                               "which the engine quantizes itself" if dynamic else ""))
        if replacement is not None:
            replaced.append(name)
            work.set_submodule(name, replacement)
    return found


def read_ao_eager(work: nn.Module, calibration_data: Any, batch_size: int, device: torch.device | str) -> Deployed:
    """`work`: a private eval-mode copy of a torch.ao eager model, modified in place."""
    work.to(device)
    never_ran: list[str] = []
    saturating: dict[str, bool] = {}
    layers = replace_ao_modules(work, record_grids(work, calibration_data, batch_size, device), "torch.ao eager",
                                never_ran, saturating)
    if not layers:
        raise DeployedFormatError(f"torch.ao eager: no quantized layer ran on the calibration data (of "
                                  f"{len(never_ran)}: {', '.join(map(repr, never_ran[:3]))})")
    notes = ["the float baseline is the float function of the int8 model (dequantized weights, unquantized "
             "activations), not the float model it was converted from"]
    if never_ran:
        notes.append(f"{len(never_ran)} quantized layer(s) did not run on the calibration data "
                     f"({', '.join(map(repr, never_ran[:3]))}{', ...' if len(never_ran) > 3 else ''}): the eval "
                     "forward skips them (an auxiliary head), so the gate does not test them; should one run, the "
                     "gate stops with an error")
    notes.extend(saturation_notes(saturating))
    notes.extend(channels_last_notes(work))
    dynamic = sorted(name.rpartition(".")[0] for name, layer in layers.items() if layer.raw_output)
    if dynamic:
        notes.append(
            f"dynamic quantization ({len(dynamic)} Linear or recurrent gate layer(s), e.g. {dynamic[0]!r}): each "
            "quantizes its input on the range of that image alone, as the model computes when it runs one input at "
            "a time (at a larger "
            "batch the runtime's range is the batch's, so an image's result would depend on the others); no act "
            "site (their results stay float)")
    return Deployed(work, layers, "torch.ao eager", notes=notes)
