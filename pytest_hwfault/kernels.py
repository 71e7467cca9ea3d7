"""Quantized Conv2d and Linear layers computed on real int8 kernels, with the same numbers as the float-emulated path.

The emulated path (`qmodel`) computes a layer's accumulator in float32 (float64 for wide layers) on integer-valued
tensors: exact, but at the price of a float convolution. Where the layer's codes fit 8 bits, the same integer sum
comes out of an int8 kernel at a fraction of that cost:

- Conv2d: oneDNN's int8 convolution (``torch.ops.onednn.qconv_prepack`` / ``qconv2d_pointwise``, the ops torch's
  x86 Inductor lowering uses) on uint8 input codes with a zero point, int8 weight codes, scales 1 and a float32
  output: the int32 accumulator (zero-point compensation included) converted to float32, exact because every
  float32-computed layer's accumulator stays below 2^24 (`quantization._exact_dtype`). A wide layer (float64
  accumulator: a fan-in from 1024 products on with signed codes, as in any ImageNet CNN from 128 channels on) has
  its input channels cut into chunks whose float32 results are exact, summed in float64. Weights are prepacked once per
  layer; a weight fault (which edits the module's weight codes in place) is seen by the weight's version counter,
  and the faulty codes are prepacked for that pass (or the original pack reused once the codes are restored). A
  batch runs at a padded size (`padded_batch`: few sizes, so oneDNN's cached primitives serve every batch a
  campaign makes; the padding rows' results are dropped).
- Conv1d: the same convolution at height 1 ([N, C, L] as [N, C, 1, L], the kernel 1 x k), answering row-major as
  the emulated Conv1d does.
- Linear: ``torch._int_mm`` (int8 x int8 -> int32, exact), then converted to the layer's compute dtype (float64
  for wide layers: exact too). Unsigned input codes are shifted into int8 and the shift's contribution (a constant
  times each output's weight sum) added back in int32.

The kernel replaces only the module's forward computation: the engine's pre-hook still writes the float input codes
(which input faults and the pe site read), and the forward hook receives a float accumulator with exactly the values
the emulated conv/linear gives, in the same memory layout. Every number is therefore the same on both paths.

A kernel is used only after `available` has checked it on this machine against float64 integer arithmetic (codes at
-128/0/127/255 at every position, several shapes, strides, groups and layouts, chunked sums past 2^24); a layer
whose codes do not fit int8/uint8 (bits > 8), other layer types, a module on a non-CPU device, and a forward with
autograd recording all run on the emulated path.
"""

from __future__ import annotations

import math
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import native

if TYPE_CHECKING:
    from .qmodel import QuantLayer

KERNELS = ("auto", "int8", "emulated")

__all__ = ["CHUNK_FAN_IN", "CHUNK_WEIGHT_SUM", "KERNELS", "Int8Conv1d", "Int8Conv2d", "Int8Forward", "Int8Linear",
           "available", "install", "kernel_for", "weight_chunks"]


# -- the kernels on their own: exact integer results ----------------------------------------------------------------
# oneDNN's int8 convolution with a float32 output converts its raw sum of uint8 x int8 products to float32 before
# the zero-point compensation is taken off (measured: a fan-in of 576 at codes near 255 x 127 comes out off by 1).
# A raw sum is at most 255 x the sum of |w| over the output channel's weights, whatever the inputs (padding
# included: it holds the zero point, a byte too). So a layer's input channels are cut into chunks where that bound
# stays below 2^24 (each a conv over its own input channels, or for grouped weights a conv with the other chunks'
# weights zeroed): every chunk's result is then exact, and so is their sum (float32 where the accumulator stays below
# 2^24, float64 for a wide layer), which is the accumulator. The chunks follow the actual codes (faulty ones too:
# repacked), so a float32 layer whose weights are far from all +-128 (any trained or initialised one: mean |code| ~30
# of 127) is one conv; a wide layer is a few.
CHUNK_WEIGHT_SUM = ((1 << 24) - 1) // 255  # 65793: the largest sum of |weight code| one chunk may hold
CHUNK_FAN_IN = CHUNK_WEIGHT_SUM // 128  # 514 products of a uint8 and an int8 code: always within the bound


def weight_chunks(weight_codes: torch.Tensor) -> list[tuple[int, int]] | None:
    """Consecutive input-channel ranges of int8 weight codes [K, C/groups, kh, kw] where no output channel's sum of
    |code| passes `CHUNK_WEIGHT_SUM`, greedily; None where one input channel's window alone does."""
    if weight_codes[0].numel() <= CHUNK_FAN_IN:  # no output channel can pass the bound: nothing to count
        return [(0, weight_codes.shape[1])]
    # |code| in int32 (int8 has no +128), summed in int64
    per_channel = weight_codes.to(torch.int32).abs_().flatten(2).sum(2, dtype=torch.int64)  # [K, C/groups]
    if bool((per_channel > CHUNK_WEIGHT_SUM).any()):
        return None
    if int(per_channel.sum(1).max()) <= CHUNK_WEIGHT_SUM:  # the usual case: one chunk, no loop
        return [(0, per_channel.shape[1])]
    # greedy, a chunk per step (not a channel per step: a wide layer's 512 input channels cost 13 ms that way, at
    # every repack of a weight trial): the next cut is the first channel whose running sum from the chunk's start
    # passes the bound for some output channel
    sums, channels = per_channel.cumsum(1), per_channel.shape[1]
    chunks, start = [], 0
    while start < channels:
        before = sums[:, start - 1 : start] if start else torch.zeros_like(sums[:, :1])
        over = ((sums[:, start:] - before) > CHUNK_WEIGHT_SUM).any(0)
        stop = start + int(over.to(torch.uint8).argmax()) if bool(over.any()) else channels
        chunks.append((start, stop))  # stop > start: one channel alone is within the bound (checked above)
        start = stop
    return chunks


# One chunk of a layer's packed weights: the input channels it reads where it reads a slice of them (groups=1: its
# own channels only, so the chunks together cost one convolution), or None where it reads them all (one chunk, or
# grouped weights with the other chunks' codes zeroed), and oneDNN's packed form (an opaque tensor).
ConvChunk = tuple[tuple[int, int] | None, torch.Tensor]


def conv2d_packs(weight_codes: torch.Tensor, zero_point: int, stride: tuple[int, ...], padding: tuple[int, ...],
                 dilation: tuple[int, ...], groups: int) -> list[ConvChunk] | None:
    """oneDNN's packed forms of int8 weight codes [K, C/groups, kh, kw], one per chunk of input channels
    (`weight_chunks`); None where one input channel's kernel window alone needs more than one chunk."""
    codes = weight_codes.to(torch.int8).contiguous()
    ranges = weight_chunks(codes)
    if ranges is None:
        return None

    def pack(chunk: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qconv_prepack(chunk, torch.ones(codes.shape[0]), 1.0, zero_point, list(stride),
                                              list(padding), list(dilation), groups, None)

    if len(ranges) == 1:
        return [(None, pack(codes))]
    if groups == 1:
        return [((start, stop), pack(codes[:, start:stop].contiguous())) for start, stop in ranges]
    return [(None, pack(torch.zeros_like(codes).index_copy_(1, torch.arange(start, stop), codes[:, start:stop])))
            for start, stop in ranges]


def conv2d_int32(x: torch.Tensor, packs: list[ConvChunk], out_channels: int, zero_point: int,
                 stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...],
                 groups: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The exact accumulator sum((x - zero_point) * w) of a convolution of uint8 `x` with weight codes packed by
    `conv2d_packs`, in `dtype`: float32 (exact while |acc| < 2^24) or float64 (exact: each chunk's float32 result
    is, and their float64 sum)."""
    ones, zeros = _unit_scales(out_channels)
    acc: torch.Tensor | None = None
    for channels, packed in packs:
        out = torch.ops.onednn.qconv2d_pointwise(
            x if channels is None else x[:, channels[0]:channels[1]], 1.0, zero_point, packed, ones, zeros, None,
            list(stride), list(padding), list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")
        if acc is None:
            acc = out if dtype == torch.float32 else out.to(dtype)
        else:
            acc.add_(out)
    assert acc is not None
    return acc


@cache
def _unit_scales(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """oneDNN's per-channel weight scales and zero points for a raw integer sum: ones and zeros (never written)."""
    return torch.ones(channels), torch.zeros(channels, dtype=torch.long)


def linear_int32(x: torch.Tensor, weight_t: torch.Tensor, shift: int = 0,
                 weight_sums: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k (x[m, k] + shift) * w[k, n] - shift * sum_k w[k, n] = x @ w exactly, for int8 `x` (codes shifted by
    `shift` into int8) and int8 `weight_t` [K, N]: int32."""
    acc = torch._int_mm(x, weight_t)
    if shift:
        assert weight_sums is not None
        acc.sub_(weight_sums * shift)
    return acc


# -- does this machine's build compute them exactly? ------------------------------------------------------------------
def _reference_conv(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, groups: int) -> torch.Tensor:
    return F.conv2d(x.double(), w.double(), stride=stride, padding=padding, groups=groups)


def _probe_conv() -> bool:
    generator = torch.Generator().manual_seed(16)
    # (images, channels, size, out channels, stride, padding, groups, accumulator dtype); the float64 cases sum
    # several chunks past 2^24 (a wide layer's)
    cases = [(2, 64, 6, 64, 1, 1, 1, torch.float32), (3, 32, 7, 48, 2, 1, 1, torch.float32),
             (2, 32, 5, 32, 1, 0, 4, torch.float32), (1, 3, 9, 16, 1, 1, 1, torch.float32),
             (2, 112, 5, 16, 2, 1, 1, torch.float32), (2, 256, 5, 16, 1, 1, 1, torch.float64),
             (1, 192, 4, 8, 1, 1, 2, torch.float64)]
    for n, c, h, k, stride, padding, groups, dtype in cases:
        shape, wshape = (n, c, h, h), (k, c // groups, 3, 3)
        codes = [torch.full(shape, v) for v in (-128, 127)] + [torch.randint(-128, 128, shape, generator=generator)]
        weights = [torch.full(wshape, v) for v in (-128, 127)] + [torch.randint(-128, 128, wshape,
                                                                                 generator=generator)]
        if dtype == torch.float64:  # large sums of one sign with random low bits: float32 would round them
            weights.append(torch.randint(100, 128, wshape, generator=generator))
        if math.prod(wshape[1:]) > CHUNK_FAN_IN:  # one chunk at its bound: raw sums of 255 x 65793 = 2^24 - 1
            edge = torch.zeros(wshape, dtype=torch.int64)
            edge.view(k, -1)[:, :CHUNK_FAN_IN] = -128
            edge.view(k, -1)[:, CHUNK_FAN_IN] = -(CHUNK_WEIGHT_SUM - 128 * CHUNK_FAN_IN)
            weights.append(edge)
        for zero_point, low in ((128, -128), (0, 0), (255, -255)):
            for w in weights:
                packed = conv2d_packs(w, zero_point, (stride,) * 2, (padding,) * 2, (1, 1), groups)
                if packed is None:
                    return False
                for x in codes:
                    x = x.clamp(low, low + 255)
                    reference = _reference_conv(x, w, stride, padding, groups)
                    if dtype == torch.float32 and bool(reference.abs().max() >= 1 << 24):
                        continue  # a float32 layer's sums stay below 2^24 (`quantization._exact_dtype`)
                    for layout in (torch.contiguous_format, torch.channels_last):
                        u8 = (x + zero_point).to(torch.uint8).contiguous(memory_format=layout)
                        got = conv2d_int32(u8, packed, k, zero_point, (stride,) * 2, (padding,) * 2, (1, 1), groups,
                                           dtype)
                        if got.dtype != dtype or not torch.equal(got.double(), reference):
                            return False
    return True


def _probe_linear() -> bool:
    generator = torch.Generator().manual_seed(16)
    for m, k, n in ((1, 64, 10), (37, 1536, 24), (128, 5, 7), (3, 2, 9)):
        for a in (torch.full((m, k), -128), torch.full((m, k), 127), torch.randint(-128, 128, (m, k),
                                                                                    generator=generator)):
            for w in (torch.full((n, k), -128), torch.full((n, k), 127), torch.randint(-128, 128, (n, k),
                                                                                        generator=generator)):
                got = linear_int32(a.to(torch.int8), w.to(torch.int8).t())
                if got.dtype != torch.int32 or not torch.equal(got.double(), a.double() @ w.double().t()):
                    return False
    return True


@cache
def available(kind: str, device_type: str = "cpu") -> bool:
    """Whether this machine's torch computes `kind` ("conv2d" or "linear") exactly on int8 kernels, checked once per
    process against float64 integer arithmetic. CPU only (no CUDA kernel is wired up yet)."""
    if device_type != "cpu":
        return False
    try:
        with torch.inference_mode():
            return _probe_conv() if kind == "conv2d" else _probe_linear()
    except (RuntimeError, AttributeError, NotImplementedError):  # an op missing or refused in this build
        return False


# -- the module forward that computes a layer's accumulator on an int8 kernel ---------------------------------------
def padded_batch(images: int) -> int:
    """The batch size a convolution of `images` images runs at: a power of two up to 8, then a multiple of 8 (19
    sizes up to 128 images, at most 7 images more above 8). A campaign's batches cluster around a few sizes, so a
    ResNet56's 66 convolution calls per size stay within oneDNN's primitive cache (1024 entries)."""
    if images <= 8:
        return 1 << (images - 1).bit_length() if images > 0 else images
    return -(-images // 8) * 8


def _version(weight: torch.Tensor) -> Any:
    """What changes whenever the weight's codes may have changed: its storage and its version counter (bumped by
    every in-place edit, as `QuantizedModel.weight_faults` makes); a fresh object (never equal: the codes are
    compared) for a tensor without a version counter (created in inference mode)."""
    try:
        return weight.data_ptr(), weight._version
    except RuntimeError:
        return object()


class Int8Forward:
    """Set as a quantized layer's module's `forward` (an instance attribute, so the engine's hooks stay as they
    are): computes the module's output, the exact accumulator, on an int8 kernel, or on the module's own forward
    where the kernel cannot (autograd recording, a non-CPU tensor, an input it was not built for, a dispatch
    mode such as the coverage's flop counter watching the ops)."""

    def __init__(self, module: nn.Module, zero_point: int, dtype: torch.dtype,
                 scratch: dict[tuple[Any, ...], torch.Tensor] | None = None) -> None:
        self.module = module
        self.zero_point = zero_point  # the uint8 codes the kernel reads are input code + zero_point
        self.dtype = dtype  # the accumulator's dtype on the emulated path
        self.calls = self.fallbacks = 0  # forwards, and those that ran on the emulated path
        # int8 input buffers shared by a model's kernels, one per shape and layout: a layer's int8 input is dead
        # once its kernel ran, and a fresh tensor per call costs page faults
        self.scratch = {} if scratch is None else scratch

    def int8_buffer(self, like: torch.Tensor, rows: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
        """A reusable tensor of `rows` images shaped like `like`'s, channels-last unless `like` is row-major."""
        layout = torch.contiguous_format if like.is_contiguous() else torch.channels_last
        key = (tuple(like.shape[1:]), layout, dtype)
        buffer = self.scratch.get(key)
        if buffer is None or buffer.shape[0] < rows:
            buffer = torch.empty((rows, *like.shape[1:]), dtype=dtype).contiguous(memory_format=layout)
            self.scratch[key] = buffer
        return buffer[:rows]

    def emulated(self, x: torch.Tensor) -> torch.Tensor:
        self.fallbacks += 1
        return type(self.module).forward(self.module, x)

    def usable(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
        """Whether the kernel computes this call: on `x`, the layer's input codes (or, with `dtype`, the values the
        engine is about to quantize into codes of that compute dtype)."""
        weight = self.module.weight
        return (x.device.type == "cpu" and isinstance(weight, torch.Tensor) and weight.device.type == "cpu"
                and (dtype or x.dtype) == self.dtype and weight.dtype == self.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                # a dispatch mode watching the ops (the coverage's flop counter, fake tensors) sees the
                # conv/linear it knows, not an opaque packed weight
                and _get_current_dispatch_mode() is None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        # the engine's work, past the forward pass's TorchFunctionModes (as the hooks run): a layer's own call is
        # not a functional call, and a mode's Python call per op would cost more than the small ops themselves
        with torch._C.DisableTorchFunction():
            if x.dtype == torch.uint8:  # bytes the engine's pre-hook wrote (`byte_input`), having checked `usable`
                return self.compute(x)
            if not self.usable(x):
                return self.emulated(x)
            return self.compute(x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:  # packed weights are opaque tensors: rebuilt after a copy
        state = dict(self.__dict__)
        for name in ("_packed", "_faulty"):
            if name in state:
                state[name] = None
        state["scratch"] = {}
        return state


class Int8Conv2d(Int8Forward):
    """oneDNN int8 convolution: uint8 input codes (code + zero point) x int8 weight codes -> float32 accumulator."""

    def __init__(self, module: nn.Conv2d, zero_point: int, dtype: torch.dtype,
                 scratch: dict[tuple[Any, ...], torch.Tensor] | None = None) -> None:
        super().__init__(module, zero_point, dtype, scratch)
        padding = module.padding
        assert not isinstance(padding, str)  # `kernel_for` refuses "same"/"valid"
        self.geometry: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int] = (
            tuple(module.stride), tuple(padding), tuple(module.dilation), module.groups)
        self.out_channels = module.out_channels
        self._packed: tuple[torch.Tensor, list[ConvChunk]] | None = None  # (int8 codes, their packs)
        self._faulty: tuple[Any, list[ConvChunk]] | None = None  # (weight version, packs) of faulty codes
        self._seen: Any = None  # the weight version the original pack was last confirmed for

    def _pack(self, codes: torch.Tensor) -> list[ConvChunk]:
        packs = conv2d_packs(codes, self.zero_point, *self.geometry)
        assert packs is not None  # `kernel_for` checked the kernel window
        return packs

    def _weight_pack(self) -> list[ConvChunk]:
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        version = _version(weight)
        if self._packed is None:
            codes = weight.to(torch.int8)
            self._packed = (codes, self._pack(codes))
            self._seen = version
        if version == self._seen:
            return self._packed[1]
        if self._faulty is not None and self._faulty[0] == version:
            return self._faulty[1]
        codes = weight.to(torch.int8)  # the codes changed since the pack (weight faults) or were restored
        if torch.equal(codes, self._packed[0]):
            self._seen = version
            return self._packed[1]
        self._faulty = (version, self._pack(codes))
        return self._faulty[1]

    def weight_restored(self, before: Any) -> None:
        """The weight's codes were edited, then restored bit for bit to those of version `before`
        (`QuantizedModel.weight_faults`): where the original pack was confirmed for that version, it serves the
        restored codes without comparing them."""
        weight = self.module.weight
        if self._packed is not None and self._seen == before and isinstance(weight, torch.Tensor):
            self._seen = _version(weight)

    def byte_input(self, like: torch.Tensor) -> torch.Tensor | None:
        """Where the engine's pre-hook may write this layer's input bytes (code + zero point) itself, laid out as
        the float codes `like` would be: handed to the forward as the input, they skip the float codes' pass."""
        if like.dim() != 4:
            return None
        target = self.int8_buffer(like, padded_batch(like.shape[0]), torch.uint8)[: like.shape[0]]
        # the same strides, or the output's layout would change (one channel: both layouts are "contiguous")
        return target if target.stride() == like.stride() else None

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # bytes the engine's pre-hook wrote into `byte_input`
            buffer = self.int8_buffer(x, padded_batch(x.shape[0]), torch.uint8)
            if buffer.data_ptr() != x.data_ptr():
                buffer[: x.shape[0]].copy_(x)
            return self.convolve(buffer, x)
        if x.dim() != 4:
            return self.emulated(x)
        # the kernel runs on a batch of `padded_batch` images (the rows past x's hold stale codes, and their
        # results are dropped): each new batch size costs oneDNN a new primitive, ~1.3 ms per layer here, and a
        # campaign's batches (faulty images, late-start groups) come in every size
        images = x.shape[0]
        u8 = self.int8_buffer(x, padded_batch(images), torch.uint8)
        if not native.to_bytes(x, u8[:images], self.zero_point):  # one fused pass, where it applies
            if self.zero_point == 128:  # code + 128 == the int8 code's bits with the top bit flipped
                u8[:images].view(torch.int8).copy_(x)
                u8[:images].bitwise_xor_(128)
            else:
                u8[:images].copy_(x.add(self.zero_point))
        return self.convolve(u8, x)

    def convolve(self, u8: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The accumulator of the layer's `x.shape[0]` images, from their bytes at the head of the padded `u8`."""
        stride, padding, dilation, groups = self.geometry
        acc = conv2d_int32(u8, self._weight_pack(), self.out_channels, self.zero_point, stride, padding, dilation,
                           groups, self.dtype)[: x.shape[0]]
        # oneDNN answers channels-last; the emulated conv keeps an NCHW input's layout, which
        # quantize(memory_format="preserve") promises the model's own hooks (a channels-last input, even with one
        # channel, has channel stride 1)
        nchw = x.is_contiguous() and x.stride(1) != 1
        return acc.contiguous() if nchw and not acc.is_contiguous() else acc


class Int8Conv1d(Int8Conv2d):
    """A Conv1d as oneDNN's int8 convolution of height 1: [N, C, L] viewed as [N, C, 1, L], the kernel as 1 x k. A
    wide Conv1d (a speech model's 512-channel layers) would otherwise be a float64 convolution."""

    def __init__(self, module: nn.Conv1d, zero_point: int, dtype: torch.dtype,
                 scratch: dict[tuple[Any, ...], torch.Tensor] | None = None) -> None:
        super().__init__(module, zero_point, dtype, scratch)  # type: ignore[arg-type]
        padding = module.padding
        assert not isinstance(padding, str)  # `kernel_for` refuses "same"/"valid"
        self.geometry = ((1, module.stride[0]), (0, padding[0]), (1, module.dilation[0]), module.groups)

    def _pack(self, codes: torch.Tensor) -> list[ConvChunk]:
        return super()._pack(codes.unsqueeze(2))

    def byte_input(self, like: torch.Tensor) -> torch.Tensor | None:
        return None  # the pre-hook writes float codes; `compute` turns them into bytes

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            return self.emulated(x)
        # the emulated Conv1d answers row-major whatever its input's layout
        return super().compute(x.unsqueeze(2)).squeeze(2).contiguous()


class Int8Linear(Int8Forward):
    """torch._int_mm: int8 input codes (shifted into int8 where they are unsigned) x int8 weight codes -> int32,
    converted to the layer's compute dtype."""

    def __init__(self, module: nn.Linear, zero_point: int, dtype: torch.dtype,
                 scratch: dict[tuple[Any, ...], torch.Tensor] | None = None) -> None:
        super().__init__(module, zero_point, dtype, scratch)
        self.shift = zero_point - 128  # input code + shift fits int8
        self._codes: tuple[Any, torch.Tensor, torch.Tensor | None] | None = None

    def _weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        version = _version(weight)
        if self._codes is None or self._codes[0] != version:
            codes = weight.to(torch.int8)
            sums = codes.sum(dim=1, dtype=torch.int32) if self.shift else None
            self._codes = (version, codes.t(), sums)
        return self._codes[1], self._codes[2]

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1:
            return self.emulated(x)
        flat = x.reshape(-1, x.shape[-1])
        codes = torch.empty(flat.shape, dtype=torch.int8)
        if not native.to_bytes(flat, codes, self.shift):  # one fused pass, where it applies
            codes.copy_(flat.add(self.shift) if self.shift else flat)
        weight_t, sums = self._weight()
        acc = linear_int32(codes, weight_t, self.shift, sums)
        return acc.to(self.dtype).reshape(*x.shape[:-1], acc.shape[-1])


# -- which layers qualify ------------------------------------------------------------------------------------------
def _stored_range(layer: QuantLayer) -> tuple[int, int] | None:
    """The input codes (as code - zero point) any input, producer or fault can give the layer; None when the layer
    reads two activations or has no per-tensor input range."""
    if layer.second_input_shape is not None or layer.input_range is None:
        return None
    signed = layer.signed_activations if layer.signed_inputs is None else layer.signed_inputs
    width = 1 << layer.bits
    low, high = (-(width >> 1), (width >> 1) - 1) if signed else (0, width - 1)
    zero = layer.input_zero_point
    return min(low - zero, layer.input_range[0]), max(high - zero, layer.input_range[1])


def kernel_for(layer: QuantLayer) -> type[Int8Forward] | None:
    """The int8 kernel that computes `layer` exactly on this machine, or None (why not: see the module's doc)."""
    module = layer.module
    if layer.bits > 8 or layer.calls < 1:
        return None
    codes = _stored_range(layer)
    weight = getattr(module, "weight", None)
    if codes is None or not isinstance(weight, torch.Tensor) or weight.device.type != "cpu":
        return None
    if layer.weight_codes.numel() and (int(layer.weight_codes.min()) < -128 or int(layer.weight_codes.max()) > 127):
        return None
    if codes[1] + _zero_point(layer) > 255:  # the codes do not fit uint8 with one zero point
        return None
    if type(module) in (nn.Conv2d, nn.Conv1d):
        assert isinstance(module, (nn.Conv2d, nn.Conv1d))
        if (module.padding_mode != "zeros" or isinstance(module.padding, str) or module.bias is not None
                or layer.compute_dtype not in (torch.float32, torch.float64)
                or math.prod(module.kernel_size) > CHUNK_FAN_IN):
            return None
        if not available("conv2d"):
            return None
        return Int8Conv2d if type(module) is nn.Conv2d else Int8Conv1d
    if type(module) is nn.Linear:
        # in_features 1: torch 2.14's CPU _int_mm returns garbage for a contraction of length 1
        if module.bias is not None or layer.compute_dtype not in (torch.float32, torch.float64) or \
                module.in_features < 2:
            return None
        return Int8Linear if available("linear") else None
    return None


def _zero_point(layer: QuantLayer) -> int:
    """The zero point that makes every input code of `layer` a uint8 (code + zero point >= 0)."""
    codes = _stored_range(layer)
    assert codes is not None
    return max(0, -codes[0])


def install(layers: dict[str, QuantLayer], kernel: str) -> dict[str, str]:
    """Put each qualifying layer's module on its int8 kernel (`kernel` "auto" or "int8"); returns the kernel each
    layer computes on ("int8" or "emulated")."""
    chosen: dict[str, str] = {}
    scratch: dict[tuple[Any, ...], torch.Tensor] = {}
    for name, layer in layers.items():
        found = None if kernel == "emulated" else kernel_for(layer)
        if found is None:
            chosen[name] = "emulated"
            continue
        layer.module.forward = found(layer.module, _zero_point(layer), layer.compute_dtype, scratch)
        chosen[name] = "int8"
    return chosen


def uninstall(layers: dict[str, QuantLayer]) -> None:
    """Back to the emulated path for every layer."""
    for layer in layers.values():
        if isinstance(layer.module.__dict__.get("forward"), Int8Forward):
            del layer.module.forward
