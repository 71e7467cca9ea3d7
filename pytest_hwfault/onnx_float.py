"""The float and shape ops of an ONNX model, as torch functions: what a transformer exported to ONNX computes
between its quantized layers (LayerNormalization, Softmax, Erf, the attention's float MatMuls, and the Shape ->
Gather -> Concat -> Reshape arithmetic an exporter writes for every dynamic reshape).

Each op is a function of the node's attributes (and the model's opset) returning a function of the node's input
tensors. `onnx_reader` evaluates a node whose inputs are all constants once, while it reads the graph (constant
folding), and runs every other one as an `OnnxOp` module named after its node, so a coverage report names the
float compute that faults do not reach.

These ops are float: onnxruntime's kernels (its own Erf and Softmax approximations, its summation order in
LayerNormalization, ReduceMean and a float MatMul) may round otherwise than torch's, by an ulp here and there; the
reader's load check compares the view with onnxruntime on calibration images and says how far apart they are.
Integer tensors (shapes, indices) follow ONNX's integer semantics (Div truncates, Mod takes the divisor's sign).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Function = Callable[..., Any]

# ONNX TensorProto data types -> torch dtypes (Cast's `to`)
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


# -- helpers -----------------------------------------------------------------------------------------------------------
def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(attrs: dict[str, Any], opset: int, since: int, given: torch.Tensor | None) -> list[int] | None:
    """An op's `axes`: an attribute before opset `since`, an optional input from it on."""
    return _ints(given) if opset >= since else (list(attrs["axes"]) if "axes" in attrs else None)


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


# -- elementwise ---------------------------------------------------------------------------------------------------
def _divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="trunc") if _integer(a) and _integer(b) else a / b


def _mod(fmod: int) -> Function:
    def mod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not fmod and not (_integer(a) and _integer(b)):  # onnxruntime refuses it too
            raise ValueError("Mod with fmod=0 on floating-point inputs is not valid ONNX (fmod=1 is C's fmod)")
        return torch.fmod(a, b) if fmod else torch.remainder(a, b)
    return mod


def _power(base: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """ONNX Pow: the base's type; an integer base to a floating exponent is the C pow in double, cast (truncated)."""
    if _integer(base) and not _integer(exponent):
        return torch.pow(base.double(), exponent.double()).to(base.dtype)
    return torch.pow(base, exponent)


def _variadic(op: Function) -> Function:
    def reduce(*xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = op(out, x)
        return out
    return reduce


BINARY: dict[str, Function] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _divide, "Pow": _power,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root, as onnxruntime's kernel computes it: torch's float32 sqrt is not on every
    CPU (17% of values an ulp off on an AMD EPYC with AVX-512), float64's rounded to float32 is (53 >= 2 x 24 + 2)."""
    return x.double().sqrt().to(x.dtype) if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x.sqrt()


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """onnxruntime's Tanh on a CPU with FMA3 (MLAS's kernel: a clamp to [-9, 9], a rational polynomial by fused
    multiply-adds; bit for bit on 300k values, against 45% for torch.tanh); the reader checks the installed
    onnxruntime agrees at load (`onnx_reader.runtime_op_agrees`) and names the node where it does not."""
    from . import native

    return native.tanh_mlas(x) if x.dtype == torch.float32 else torch.tanh(x)


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    """onnxruntime's Sigmoid on a CPU with FMA3 (MLAS's logistic kernel: a clamp to [-18, 18], a rational polynomial
    by fused multiply-adds, + 0.5, raised to 0; torch.sigmoid agrees on about a third of values); the reader checks
    the installed onnxruntime agrees at load (`onnx_reader.runtime_op_agrees`) and names the node where it does
    not."""
    from . import native

    return native.logistic_mlas(x) if x.dtype == torch.float32 else torch.sigmoid(x)


def _erf(x: torch.Tensor) -> torch.Tensor:
    """onnxruntime's Erf on a CPU with AVX-512F (MLAS's erf: bit for bit on all 2^32 float32 inputs, against 85-89% for
    torch.erf or a correctly rounded erf); the reader checks the installed onnxruntime agrees at load
    (`onnx_reader.runtime_op_agrees`) and names the node where it does not."""
    from . import native

    return native.erf_mlas(x) if x.dtype == torch.float32 else torch.erf(x)


UNARY: dict[str, Function] = {
    "Sqrt": _sqrt, "Erf": _erf, "Tanh": _tanh, "Sigmoid": _sigmoid, "Exp": torch.exp,
    "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Floor": torch.floor,
    "Ceil": torch.ceil, "Not": torch.logical_not, "Sin": torch.sin, "Cos": torch.cos, "Softplus": F.softplus,
    "Relu": torch.relu, "Identity": lambda x: x,
}


# -- shapes and data movement ------------------------------------------------------------------------------------------
def _shape(attrs: dict[str, Any], opset: int) -> Function:
    start, end = attrs.get("start", 0), attrs.get("end")

    def shape(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)
    return shape


def _gather(elements: bool) -> Callable[[dict[str, Any], int], Function]:
    """Gather (whole slices at the indices) or GatherElements (one value per index): ONNX counts negative indices
    from the end."""
    def make(attrs: dict[str, Any], opset: int) -> Function:
        axis = int(attrs.get("axis", 0))

        def gather(data: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            dim = axis % data.dim()
            index = indices.long()
            index = torch.where(index < 0, index + data.shape[dim], index)
            if elements:
                return torch.gather(data, dim, index)
            picked = torch.index_select(data, dim, index.reshape(-1))
            return picked.reshape((*data.shape[:dim], *indices.shape, *data.shape[dim + 1:]))
        return gather
    return make


def _gather_nd(attrs: dict[str, Any], opset: int) -> Function:
    """GatherND: the last dimension of `indices` (m values) indexes data's dimensions b .. b + m - 1, the first b
    (`batch_dims`) of both walked together; output shape indices.shape[:-1] + data.shape[b + m:]; negative indices
    count from the end (advanced indexing's own rule, and ONNX's)."""
    batch_dims = int(attrs.get("batch_dims", 0))

    def gather_nd(data: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        index = indices.long()
        m = index.shape[-1]
        if batch_dims == 0:
            return data[tuple(index[..., i] for i in range(m))]
        batch = math.prod(data.shape[:batch_dims])
        flat_data = data.reshape(batch, *data.shape[batch_dims:])
        flat_index = index.reshape(batch, *index.shape[batch_dims:])
        rows = torch.arange(batch).reshape(batch, *([1] * (flat_index.dim() - 2)))
        picked = flat_data[(rows, *(flat_index[..., i] for i in range(m)))]
        return picked.reshape(*index.shape[:-1], *data.shape[batch_dims + m:])
    return gather_nd


def _unsqueeze(attrs: dict[str, Any], opset: int) -> Function:
    def unsqueeze(x: torch.Tensor, axes_input: torch.Tensor | None = None) -> torch.Tensor:
        axes = _axes(attrs, opset, 13, axes_input) or []
        rank = x.dim() + len(axes)
        for axis in sorted(a % rank for a in axes):
            x = x.unsqueeze(axis)
        return x
    return unsqueeze


def _squeeze(attrs: dict[str, Any], opset: int) -> Function:
    def squeeze(x: torch.Tensor, axes_input: torch.Tensor | None = None) -> torch.Tensor:
        axes = _axes(attrs, opset, 13, axes_input)
        if axes is None:
            return x.squeeze()
        return x.squeeze(tuple(a % x.dim() for a in axes)) if axes else x.squeeze()  # empty axes: all ones
    return squeeze


def reshape(x: torch.Tensor, shape: Sequence[int], allow_zero: bool = False) -> torch.Tensor:
    """ONNX Reshape: a 0 copies the input's size at that position (unless `allow_zero`), -1 is inferred."""
    return x.reshape([x.shape[i] if s == 0 and not allow_zero else s for i, s in enumerate(shape)])


def _reshape(attrs: dict[str, Any], opset: int) -> Function:
    allow_zero = bool(attrs.get("allowzero", 0))

    def reshape_(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return reshape(x, _ints(shape) or [], allow_zero)
    return reshape_


def _transpose(attrs: dict[str, Any], opset: int) -> Function:
    perm = attrs.get("perm")

    def transpose(x: torch.Tensor) -> torch.Tensor:
        return x.permute(list(perm) if perm is not None else list(range(x.dim() - 1, -1, -1)))
    return transpose


def _slice_bounds(start: int, end: int, step: int, size: int) -> tuple[int, int]:
    """ONNX Slice's start and end on an axis of `size`: negative ones count from the end, then both are clamped to
    [0, size] stepping forward, start to [0, size - 1] and end to [-1, size - 1] stepping back (not quite Python's
    slices: a start before the beginning stepping back is the first element)."""
    start, end = start + size if start < 0 else start, end + size if end < 0 else end
    if step > 0:
        return min(max(start, 0), size), min(max(end, 0), size)
    return min(max(start, 0), size - 1), min(max(end, -1), size - 1)


def _slice(attrs: dict[str, Any], opset: int) -> Function:
    def slice_(x: torch.Tensor, *given: torch.Tensor | None) -> torch.Tensor:
        if opset >= 10:
            starts, ends = _ints(given[0]) or [], _ints(given[1]) or []
            axes = _ints(given[2]) if len(given) > 2 else None
            steps = _ints(given[3]) if len(given) > 3 else None
        else:
            starts, ends, axes, steps = list(attrs["starts"]), list(attrs["ends"]), attrs.get("axes"), None
        axes = list(axes) if axes is not None else list(range(len(starts)))
        steps = steps or [1] * len(starts)
        for start, end, axis, step in zip(starts, ends, axes, steps):
            dim = axis % x.dim()
            indices = range(*_slice_bounds(start, end, step, x.shape[dim]), step)
            if step > 0:
                x = x[(slice(None),) * dim + (slice(indices.start, indices.stop, step),)]
            else:
                x = torch.index_select(x, dim, torch.tensor(list(indices), dtype=torch.long))
        return x
    return slice_


def _expand(attrs: dict[str, Any], opset: int) -> Function:
    def expand(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape) or [])))
    return expand


def _split(attrs: dict[str, Any], opset: int) -> Function:
    axis = int(attrs.get("axis", 0))

    def split(x: torch.Tensor, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        dim = axis % x.dim()
        given = _ints(sizes) if sizes is not None else (list(attrs["split"]) if "split" in attrs else None)
        if given is None:
            parts = int(attrs.get("num_outputs", attrs.get("_outputs", 1)))
            chunk = -(-x.shape[dim] // parts)
            given = [min(chunk, x.shape[dim] - i * chunk) for i in range(parts)]
        return tuple(torch.split(x, given, dim))
    return split


def _flatten(attrs: dict[str, Any], opset: int) -> Function:
    axis = int(attrs.get("axis", 1))

    def flatten(x: torch.Tensor) -> torch.Tensor:
        a = axis % x.dim() if axis < 0 else axis
        return x.reshape(int(torch.tensor(x.shape[:a]).prod()), -1)
    return flatten


def _concat(attrs: dict[str, Any], opset: int) -> Function:
    axis = int(attrs["axis"])
    return lambda *xs: torch.cat(xs, axis)


def _cast(attrs: dict[str, Any], opset: int) -> Function:
    dtype = DTYPES[int(attrs["to"])]
    return lambda x: x.to(dtype)


def _tensor(value: Any) -> torch.Tensor | None:
    """An attribute's tensor (an onnx TensorProto, or already an array or tensor)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "dims"):
        from onnx import numpy_helper

        value = numpy_helper.to_array(value)
    return torch.from_numpy(np.array(value))


def _constant_of_shape(attrs: dict[str, Any], opset: int) -> Function:
    value = _tensor(attrs.get("value"))

    def fill(shape: torch.Tensor) -> torch.Tensor:
        if value is None:
            return torch.zeros(_ints(shape) or [], dtype=torch.float32)
        return value.reshape(-1)[0].expand(_ints(shape) or []).clone()
    return fill


def _range(attrs: dict[str, Any], opset: int) -> Function:
    def range_(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if _integer(start):
            return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)
        # onnxruntime's kernel: ceil((limit - start) / delta) values (the difference in the type, the quotient in
        # double), each the previous one plus delta in the type (torch.arange multiplies, which rounds otherwise)
        first, step = start.numpy().reshape(()), delta.numpy().reshape(())
        count = max(math.ceil(float(limit.numpy().reshape(()) - first) / float(step)), 0)
        steps = np.full(count, step, dtype=first.dtype)
        if count:
            steps[0] = first
        return torch.from_numpy(np.add.accumulate(steps, dtype=first.dtype))
    return range_


def _where(attrs: dict[str, Any], opset: int) -> Function:
    return lambda condition, a, b: torch.where(condition.bool(), a, b)


# -- normalization, reductions, activations ---------------------------------------------------------------------
def ort_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """onnxruntime's CPU Softmax of float32 `x` along `dim`, bit for bit on a CPU where MLAS runs its AVX-512F
    kernel (measured one node at a time: exponentials by its range reduction and polynomial in fused multiply-adds,
    their sum in 16 lanes folded as the kernel does, each times 1 / sum; onnxruntime moves another axis last, as
    here); the reader checks the installed onnxruntime agrees at load (`onnx_reader.runtime_softmax_agrees`)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from . import native

    if x.dtype != torch.float32 or x.numel() == 0 or _get_current_dispatch_mode() is not None:
        return torch.softmax(x, dim)
    moved = x.movedim(dim, -1)
    rows = native.softmax_mlas(moved.reshape(-1, moved.shape[-1]).contiguous())
    return rows.reshape(moved.shape).movedim(-1, dim)


def _softmax(log: bool) -> Callable[[dict[str, Any], int], Function]:
    def make(attrs: dict[str, Any], opset: int) -> Function:
        axis = int(attrs.get("axis", -1 if opset >= 13 else 1))
        op = torch.log_softmax if log else ort_softmax

        def softmax(x: torch.Tensor) -> torch.Tensor:
            if opset >= 13:
                return op(x, axis)
            a = axis % x.dim()  # before opset 13: over all dims from `axis` on, as one
            return op(x.reshape(*x.shape[:a], -1), -1).reshape(x.shape)
        return softmax
    return make


def ort_fast_gelu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """onnxruntime's CPU FastGelu (com.microsoft; a GELU's tanh form it fuses from the exported ops), bit for bit
    (measured one node at a time): v = x (+ bias); v x ((C x v) x v + B), MLAS's tanh of that, then
    (0.5 x v) x (t + 1), each a float32 operation in that order (`native.gelu_ort`)."""
    from . import native

    return native.gelu_ort(x, bias, erf=False)


def ort_gelu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """onnxruntime's CPU Gelu and BiasGelu (com.microsoft; the GELU's erf form it fuses from the exported ops, with
    the bias Add before it or without), bit for bit (measured one node at a time): v = x (+ bias); MLAS's erf of
    v x float32(1 / sqrt 2), then (0.5 x v) x (erf + 1), each a float32 operation in that order
    (`native.gelu_ort`)."""
    from . import native

    return native.gelu_ort(x, bias, erf=True)


# onnxruntime's GELU kernels (com.microsoft) it fuses from a GELU's exported ops, which `onnx_reader` follows: each
# computed from the fused node's inputs (x, and a bias where it has one)
ORT_GELUS: dict[str, Callable[..., torch.Tensor]] = {"FastGelu": ort_fast_gelu, "Gelu": ort_gelu, "BiasGelu": ort_gelu}


def ort_fused_matmul(alpha: float, trans_b: bool) -> Function:
    """onnxruntime's CPU FusedMatMul (com.microsoft: a float MatMul it fuses with the scalings of its operands or
    result), bit for bit where `ort_matmul_applies` (measured one node at a time): its float MatMul's chains
    (`ort_matmul`) times float32(alpha), the product of the scalings it folded."""
    scale = torch.tensor(alpha, dtype=torch.float32)

    def fused_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if trans_b:
            b = b.transpose(-1, -2)
        product = ort_matmul(a, b, False) if ort_matmul_applies(a, b, False) else torch.matmul(a, b)
        return product * scale
    return fused_matmul


def ort_skip_layer_norm(eps: float) -> Function:
    """onnxruntime's CPU SkipLayerNormalization (com.microsoft: a residual Add and the LayerNormalization after it,
    fused), bit for bit where the skip has the input's shape (measured on its Mean and InvStdDev outputs, then its
    output; widths 8 to 768): over the last dimension, Welford's running mean and sum of squared deviations in
    float32 (`native.skip_layer_norm_ort`)."""
    from . import native

    def skip_layer_norm(x: torch.Tensor, skip: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
        width = x.shape[-1]
        if any(t.numel() != width for t in (gamma, beta, bias) if t is not None) or skip.shape != x.shape:
            # a broadcast skip (whose order was not matched) or other shapes: torch's ops, and named
            v = x + skip if bias is None else (x + skip) + bias
            return F.layer_norm(v, (width,), gamma.reshape(-1), None if beta is None else beta.reshape(-1), eps)
        rows, skips = (t.reshape(-1, width).contiguous() for t in (x, skip))
        vectors = [None if t is None else t.reshape(-1).contiguous() for t in (beta, bias)]
        return native.skip_layer_norm_ort(rows, skips, gamma.reshape(-1).contiguous(), vectors[0], vectors[1],
                                          eps).reshape(x.shape)
    return skip_layer_norm


def ort_quick_gelu(alpha: float) -> Function:
    """onnxruntime's CPU QuickGelu (com.microsoft; x * sigmoid(alpha x), fused from a SiLU's or a QuickGELU's Sigmoid
    and Mul), measured against it: at alpha 1, x times MLAS's logistic of x kept at or below 1; otherwise x times
    MLAS's logistic of the float32 product x alpha, which may pass 1 (by an ulp, near x alpha = 17.8), as its
    Sigmoid's does (`onnx_reader.runtime_quick_gelu_agrees`)."""
    from . import native

    def quick_gelu(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return x * torch.sigmoid(x * alpha)
        if alpha == 1.0:
            return x * native.logistic_mlas(x).clamp_(max=1.0)
        return x * native.logistic_mlas(x * torch.tensor(alpha, dtype=torch.float32))
    return quick_gelu


def ort_fused(kernel: str, attrs: dict[str, Any]) -> Function:
    """The function of a kernel onnxruntime fused from exported ops (`ORT_FUSED`, and LayerNormalization), for the
    fused node's attributes."""
    if kernel == "FusedMatMul":
        return ort_fused_matmul(float(attrs.get("alpha", 1.0)), bool(attrs.get("transB", 0)))
    if kernel == "SkipLayerNormalization":
        return ort_skip_layer_norm(float(attrs.get("epsilon", 1e-12)))
    if kernel == "LayerNormalization":  # a LayerNorm it fused from an export's ReduceMean, Sub, Pow, ...
        return _layer_norm(attrs, 17)
    if kernel == "QuickGelu":
        return ort_quick_gelu(float(attrs.get("alpha", 1.702)))
    return ORT_GELUS[kernel]


ORT_FUSED = frozenset({*ORT_GELUS, "FusedMatMul", "SkipLayerNormalization", "QuickGelu"})


def ort_layer_norm_applies(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, axis: int) -> bool:
    """Whether `ort_layer_norm` computes this call: float32 rows whose width is a multiple of 8, a scale (and bias)
    of one value per element of a row (onnxruntime broadcasts anything else on another code path)."""
    width = math.prod(x.shape[axis % x.dim():]) if x.dim() else 0
    return (x.dtype == torch.float32 and width > 0 and width % 8 == 0 and scale.dtype == torch.float32
            and scale.numel() == width and (bias is None or (bias.dtype == torch.float32 and bias.numel() == width)))


def ort_layer_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, axis: int, eps: float
                   ) -> torch.Tensor:
    """onnxruntime's CPU LayerNormalization, bit for bit where `ort_layer_norm_applies` (measured on its kernel one
    node at a time, its optional Mean and InvStdDev outputs included: a float64 mean rounded to float32, the
    variance by fused multiply-adds in 8 lanes, y = fma((x - mean) x inv, scale, bias); the reader checks it on the
    installed onnxruntime at load, `onnx_reader.runtime_layer_norm_agrees`). The arithmetic is `native`'s."""
    from . import native

    width = math.prod(x.shape[axis % x.dim():])
    rows = x.reshape(-1, width).contiguous()
    flat_bias = None if bias is None else bias.reshape(width).contiguous()
    return native.layer_norm_ort(rows, scale.reshape(width).contiguous(), flat_bias, eps).reshape(x.shape)


def _batch_norm(attrs: dict[str, Any], opset: int) -> Function:
    """BatchNormalization in inference (as an exporter leaves one no convolution precedes: DenseNet's), as
    onnxruntime's CPU kernel computes it: per channel s = (1 / sqrt(var + eps)) x scale and b = bias - mean x s, then
    x s + b, each step one float32 rounding (the square root correctly rounded); torch's batch_norm agrees on 50-75%
    of values (measured; the reader's probe: `onnx_reader.runtime_batch_norm_agrees`)."""
    if int(attrs.get("training_mode", 0)):
        raise ValueError("BatchNormalization in training mode (training_mode=1) is not supported")
    eps = float(np.float32(attrs.get("epsilon", 1e-5)))

    def batch_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
                   ) -> torch.Tensor:
        shape = (1, -1, *([1] * (x.dim() - 2)))
        if x.dtype != torch.float32 or x.dim() < 2:
            return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
        inverse = torch.tensor(1.0) / (var + torch.tensor(eps)).double().sqrt().float()
        s = inverse * scale
        b = bias - mean * s
        return x * s.reshape(shape) + b.reshape(shape)
    return batch_norm


def _layer_norm(attrs: dict[str, Any], opset: int) -> Function:
    axis, eps = int(attrs.get("axis", -1)), float(attrs.get("epsilon", 1e-5))

    def layer_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if ort_layer_norm_applies(x, scale, bias, axis):
            return ort_layer_norm(x, scale, bias, axis, eps)
        shape = tuple(x.shape[axis % x.dim():])
        return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape), eps)
    return layer_norm


def ort_reduce_mean_applies(x: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """Whether `ort_reduce_mean` computes this ReduceMean: float32 over the trailing dimensions, whose values per row
    are a multiple of 4 (every row then starts 16-byte aligned in onnxruntime's buffer, whatever the batch, so
    Eigen's sum takes no unaligned head)."""
    width = math.prod(x.shape[d] for d in dims) if dims else 0
    return x.dtype == torch.float32 and sorted(dims) == list(range(x.dim() - len(dims), x.dim())) and width > 0 \
        and width % 4 == 0


def ort_reduce_mean(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    """onnxruntime's CPU ReduceMean over the trailing dimensions (`ort_reduce_mean_applies`), as measured: each row
    summed by Eigen's vectorised sum with 16-byte packets (two accumulators of 4 lanes over packets 0, 2, 4, ... and
    1, 3, 5, ..., added, then a last odd packet, then the lanes as (0 + 2) + (1 + 3)), divided by the count."""
    width = math.prod(x.shape[d] for d in dims)
    rows = x.reshape(-1, width)
    first = rows[:, 0:4]
    if width > 4:
        second, paired_end = rows[:, 4:8], width // 8 * 8
        for start in range(8, paired_end, 8):
            first, second = first + rows[:, start:start + 4], second + rows[:, start + 4:start + 8]
        first = first + second
        if width > paired_end:
            first = first + rows[:, paired_end:paired_end + 4]
    total = (first[:, 0] + first[:, 2]) + (first[:, 1] + first[:, 3])
    mean = total / torch.tensor(float(width))
    kept = [1 if d in dims else n for d, n in enumerate(x.shape)]
    return mean.reshape(kept) if keep else mean.reshape([n for d, n in enumerate(x.shape) if d not in dims])


def _reduce(op: str) -> Callable[[dict[str, Any], int], Function]:
    since = 13 if op == "ReduceSum" else 18

    def make(attrs: dict[str, Any], opset: int) -> Function:
        keep, noop = bool(attrs.get("keepdims", 1)), bool(attrs.get("noop_with_empty_axes", 0))

        def reduce(x: torch.Tensor, axes_input: torch.Tensor | None = None) -> torch.Tensor:
            axes = _axes(attrs, opset, since, axes_input)
            if not axes:
                if noop:
                    return x
                axes = list(range(x.dim()))
            dims = tuple(a % x.dim() for a in axes)
            if op == "ReduceMean":
                return ort_reduce_mean(x, dims, keep) if ort_reduce_mean_applies(x, dims) else \
                    x.mean(dims, keepdim=keep)
            if op == "ReduceSum":
                return x.sum(dims, keepdim=keep)
            if op == "ReduceMax":
                return x.amax(dims, keepdim=keep)
            return x.amin(dims, keepdim=keep)
        return reduce
    return make


def _gelu(attrs: dict[str, Any], opset: int) -> Function:
    """ONNX's Gelu (opset 20) as onnxruntime's CPU kernel computes it (the code of its Gelu and FastGelu kernels:
    `native.gelu_ort`; bit for bit where a probe agrees, `onnx_reader.runtime_gelu_op_agrees`; torch's F.gelu
    agrees on 77-78% of values)."""
    from . import native

    approximate = attrs.get("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate

    def gelu(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and approximate in ("none", "tanh"):
            return native.gelu_ort(x, None, erf=approximate == "none")
        return F.gelu(x, approximate=approximate)
    return gelu


def _leaky_relu(attrs: dict[str, Any], opset: int) -> Function:
    slope = float(attrs.get("alpha", 0.01))
    return lambda x: F.leaky_relu(x, slope)


def _hard_sigmoid(attrs: dict[str, Any], opset: int) -> Function:
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


def _hard_swish(attrs: dict[str, Any], opset: int) -> Function:
    alpha, beta = torch.tensor(1 / 6, dtype=torch.float32), 0.5  # ONNX: x max(0, min(1, alpha x + beta))
    return lambda x: x * torch.clamp(x * alpha.to(x.dtype) + beta, 0.0, 1.0)


def _elu(attrs: dict[str, Any], opset: int) -> Function:
    alpha = float(attrs.get("alpha", 1.0))  # onnxruntime's alpha (exp(x) - 1), not torch's expm1
    return lambda x: torch.where(x < 0, (torch.exp(x) - 1) * torch.tensor(alpha, dtype=x.dtype), x)


def _dropout(attrs: dict[str, Any], opset: int) -> Function:
    """Dropout in inference: the input, and (the node's second output) a mask of ones; in training mode (an input
    from opset 12) it would draw a random mask, which no gate can reproduce."""
    outputs = int(attrs.get("_outputs", 1))

    def dropout(x: torch.Tensor, ratio: torch.Tensor | None = None,
                training_mode: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if training_mode is not None and bool(training_mode.reshape(-1)[0]):
            raise ValueError("Dropout in training mode (training_mode true) draws a random mask at every run: export "
                             "the model in eval mode")
        return (x,) if outputs == 1 else (x, torch.ones_like(x, dtype=torch.bool))
    return dropout


def _is_inf(attrs: dict[str, Any], opset: int) -> Function:
    negative, positive = bool(attrs.get("detect_negative", 1)), bool(attrs.get("detect_positive", 1))

    def is_inf(x: torch.Tensor) -> torch.Tensor:
        none = torch.zeros_like(x, dtype=torch.bool)
        return (torch.isneginf(x) if negative else none) | (torch.isposinf(x) if positive else none)
    return is_inf


def _prelu(attrs: dict[str, Any], opset: int) -> Function:
    return lambda x, slope: torch.where(x < 0, x * slope, x)


def _text(value: Any, default: str) -> str:
    return (value.decode() if isinstance(value, bytes) else value) if value is not None else default


def _resize_scales(x: torch.Tensor, scales: torch.Tensor | None, sizes: torch.Tensor | None
                   ) -> tuple[list[int], list[float]]:
    """onnxruntime's output lengths and float32 scales of a Resize over the spatial axes: the lengths given, each
    scale their float32 ratio; or the scales given, each length int64(float32(length) x scale) in float32 (torch's
    float64 product floors 10 x 1.3 to 12, onnxruntime's to 13). The batch and channel axes must stay."""
    f32 = np.float32
    if sizes is not None and sizes.numel():
        lengths = _ints(sizes) or []
        if lengths[:2] != list(x.shape[:2]):
            raise ValueError(f"Resize to sizes {lengths} changes the batch or channel axes of {list(x.shape)}: only "
                             "spatial axes are resized")
        lengths = lengths[2:]
        return lengths, [float(f32(n) / f32(m)) for n, m in zip(lengths, x.shape[2:])]
    factors = [float(v) for v in (scales.reshape(-1).tolist() if scales is not None else [])]
    if factors[:2] != [1.0, 1.0]:
        raise ValueError(f"Resize by scales {factors} changes the batch or channel axes: only spatial axes are "
                         "resized")
    factors = [float(f32(v)) for v in factors[2:]]
    return [int(f32(m) * f32(f)) for m, f in zip(x.shape[2:], factors)], factors


def _nearest_floor(x: torch.Tensor, lengths: list[int], factors: list[float]) -> torch.Tensor:
    """Resize nearest / asymmetric / floor as onnxruntime indexes it: source index floor(i / scale) in float32,
    clamped to the input; it only picks values."""
    for axis, (length, factor) in enumerate(zip(lengths, factors), start=2):
        index = torch.floor(torch.arange(length, dtype=torch.float32) / torch.tensor(factor, dtype=torch.float32))
        x = x.index_select(axis, index.clamp_(0, x.shape[axis] - 1).long().to(x.device))
    return x


_LINEAR = {1: torch.ops.aten.upsample_linear1d, 2: torch.ops.aten.upsample_bilinear2d,
           3: torch.ops.aten.upsample_trilinear3d}


def _resize(attrs: dict[str, Any], opset: int) -> Function:
    """Resize in the modes torch's exporter writes: nearest with asymmetric coordinates and floor rounding (indexed
    as onnxruntime does), linear with pytorch_half_pixel / half_pixel or align_corners coordinates (torch's
    upsampling kernels on onnxruntime's output lengths and scales), over the spatial axes; others are refused by
    name."""
    if opset < 11:
        raise ValueError(f"Resize of opset {opset} (inputs X and scales; its coordinates onnxruntime's opset-10 rules) "
                         "is not supported: export with opset 11 or later")
    mode = _text(attrs.get("mode"), "nearest")
    transform = _text(attrs.get("coordinate_transformation_mode"), "half_pixel")
    nearest = _text(attrs.get("nearest_mode"), "round_prefer_floor")
    if not (mode == "nearest" and (transform, nearest) == ("asymmetric", "floor")) and not (
            mode == "linear" and transform in ("pytorch_half_pixel", "half_pixel", "align_corners")):
        raise ValueError(f"Resize with mode={mode!r}, coordinate_transformation_mode={transform!r}, "
                         f"nearest_mode={nearest!r} is not supported (torch's interpolate: nearest/asymmetric/floor, "
                         "linear/half_pixel or align_corners)")
    if attrs.get("antialias", 0) or attrs.get("axes") is not None:
        raise ValueError("Resize with antialias or axes is not supported")
    policy = _text(attrs.get("keep_aspect_ratio_policy"), "stretch")
    if policy != "stretch":
        raise ValueError(f"Resize with keep_aspect_ratio_policy={policy!r} is not supported (stretch)")

    def resize(x: torch.Tensor, roi: torch.Tensor | None = None, scales: torch.Tensor | None = None,
               sizes: torch.Tensor | None = None) -> torch.Tensor:
        lengths, factors = _resize_scales(x, scales, sizes)
        if lengths == list(x.shape[2:]):  # onnxruntime copies the input then, whatever the scales
            return x
        if 0 in lengths:  # a scale that rounds a length down to none: an empty output (torch's kernels refuse it)
            return x.new_empty([*x.shape[:2], *lengths])
        if mode == "nearest":
            return _nearest_floor(x, lengths, factors)
        if transform == "align_corners":  # coordinates from the lengths alone
            return _LINEAR[len(lengths)](x, lengths, True, *([None] * len(lengths)))
        # scales given: torch's kernels map coordinates by them, as onnxruntime does; sizes given: by the lengths'
        # ratio, which torch computes as onnxruntime does
        per_axis: list[float | None] = list(factors) if sizes is None or not sizes.numel() else [None] * len(lengths)
        if transform == "pytorch_half_pixel":  # an output length of 1 reads the first input position
            for axis, length in enumerate(lengths):
                if length == 1:
                    x, per_axis[axis] = x.narrow(axis + 2, 0, 1), None
        return _LINEAR[len(lengths)](x, lengths, False, *per_axis)
    return resize


def _pad(attrs: dict[str, Any], opset: int) -> Function:
    mode = _text(attrs.get("mode"), "constant")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise ValueError(f"Pad with mode={mode!r} is not supported (constant, reflect, edge)")

    def pad(x: torch.Tensor, pads: torch.Tensor | None = None, value: torch.Tensor | None = None,
            axes: torch.Tensor | None = None) -> torch.Tensor:
        given = _ints(pads) if opset >= 11 else list(attrs.get("pads", []))
        if axes is not None:
            raise ValueError("Pad with axes is not supported")
        given = given or [0] * 2 * x.dim()
        begins, ends = given[: x.dim()], given[x.dim():]
        flat = [p for d in reversed(range(x.dim())) for p in (begins[d], ends[d])]  # torch: the last dim first
        while len(flat) > 2 and flat[-2:] == [0, 0]:  # torch pads only trailing dims in reflect/replicate mode
            flat = flat[:-2]
        fill = float(value.reshape(-1)[0]) if value is not None and value.numel() else float(attrs.get("value", 0.0))
        return F.pad(x, flat, mode=torch_mode, value=fill) if torch_mode == "constant" else F.pad(x, flat, torch_mode)
    return pad


def _conv_transpose(attrs: dict[str, Any], opset: int) -> Function:
    if _text(attrs.get("auto_pad"), "NOTSET") != "NOTSET" or "output_shape" in attrs:
        raise ValueError("ConvTranspose with auto_pad or output_shape is not supported: give explicit pads")
    groups = int(attrs.get("group", 1))

    def conv_transpose(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        spatial = x.dim() - 2
        pads = list(attrs.get("pads", [0] * 2 * spatial))
        if pads[:spatial] != pads[spatial:]:
            raise ValueError(f"ConvTranspose with asymmetric pads {pads} is not supported")
        function = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
        return function(x, weight, bias, list(attrs.get("strides", [1] * spatial)), pads[:spatial],
                        list(attrs.get("output_padding", [0] * spatial)), groups,
                        list(attrs.get("dilations", [1] * spatial)))
    return conv_transpose


def _arg(largest: bool) -> Callable[[dict[str, Any], int], Function]:
    def make(attrs: dict[str, Any], opset: int) -> Function:
        axis, keep, last = int(attrs.get("axis", 0)), bool(attrs.get("keepdims", 1)), bool(
            attrs.get("select_last_index", 0))

        def arg(x: torch.Tensor) -> torch.Tensor:
            if last:  # the last of equal extremes: the first of the flipped axis, counted from the end
                flipped = (torch.argmax if largest else torch.argmin)(x.flip(axis), axis, keepdim=keep)
                return x.shape[axis] - 1 - flipped
            return (torch.argmax if largest else torch.argmin)(x, axis, keepdim=keep)
        return arg
    return make


def _trilu(attrs: dict[str, Any], opset: int) -> Function:
    upper = bool(attrs.get("upper", 1))

    def trilu(x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        diagonal = int(k.reshape(-1)[0]) if k is not None else 0
        return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)
    return trilu


def _tile(attrs: dict[str, Any], opset: int) -> Function:
    return lambda x, repeats: x.repeat(*(_ints(repeats) or []))


def _cumsum(attrs: dict[str, Any], opset: int) -> Function:
    exclusive, reverse = bool(attrs.get("exclusive", 0)), bool(attrs.get("reverse", 0))

    def cumsum(x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        dim = int(axis.reshape(-1)[0]) % x.dim()
        y = x.flip(dim) if reverse else x
        out = torch.cumsum(y, dim)
        if exclusive and y.shape[dim]:  # the sums of the elements before each: shifted by one, not out - y
            out = torch.cat([torch.zeros_like(y.narrow(dim, 0, 1)), out.narrow(dim, 0, y.shape[dim] - 1)], dim)
        return out.flip(dim) if reverse else out
    return cumsum


def _einsum(attrs: dict[str, Any], opset: int) -> Function:
    equation = _text(attrs.get("equation"), "")
    return lambda *xs: torch.einsum(equation, *xs)


# onnxruntime packs a constant B of a float MatMul and restarts its FMA chains every 256 values of k (MLAS's
# SGEMM stride); with B an activation, measured: one chain up to k = 256 (longer ones are cut otherwise), and other
# kernels where a matrix has one row or column
ORT_MATMUL_BLOCK = 256


def ort_matmul_applies(a: torch.Tensor, b: torch.Tensor, constant_b: bool) -> bool:
    """Whether `ort_matmul` computes this call: float32 matrices (batches of them) whose products onnxruntime's
    SGEMM sums in the order measured, and no dispatch mode watching torch's ops (the coverage's MAC counter, which
    must see the products as torch's matmul: a native pass holds no op it could count)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.dim() < 2 or b.dim() < 2:
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    return constant_b or (k <= ORT_MATMUL_BLOCK and m >= 2 and n >= 2)


def ort_matmul(a: torch.Tensor, b: torch.Tensor, constant_b: bool) -> torch.Tensor:
    """onnxruntime's CPU float MatMul, bit for bit where `ort_matmul_applies` (measured one node at a time: each
    output a chain of fused multiply-adds over k in order, restarted every 256 for a constant B and the parts
    added); the reader checks the installed onnxruntime agrees at load (`onnx_reader.runtime_matmul_agrees`)."""
    from . import native

    batch_shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    a3 = a.expand(*batch_shape, m, k).reshape(-1, m, k).contiguous()
    b3 = b.expand(*batch_shape, k, n).reshape(-1, k, n).contiguous()
    out = native.matmul_fma(a3, b3, ORT_MATMUL_BLOCK if constant_b else 0)
    return out.reshape(*batch_shape, m, n)


def _matmul(attrs: dict[str, Any], opset: int) -> Function:
    constant_b = bool(attrs.get("_constant_b", False))

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if ort_matmul_applies(a, b, constant_b):
            return ort_matmul(a, b, constant_b)
        return torch.matmul(a, b)
    return matmul


def _gemm(attrs: dict[str, Any], opset: int) -> Function:
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))

    def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.matmul(a.t() if trans_a else a, b.t() if trans_b else b)
        if alpha != 1.0:
            out = out * alpha
        if c is not None:
            out = out + (c * beta if beta != 1.0 else c)
        return out
    return gemm


def _dequantize(attrs: dict[str, Any], opset: int) -> Function:
    """DequantizeLinear: (codes - zero point) x scale in float32, in the scale's type (float16 from opset 19); per
    tensor, per axis, or in blocks of `block_size` codes along the axis (opset 21)."""
    axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))

    def expanded(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape([])
        dim = axis % x.dim()
        if block:
            return t.repeat_interleave(block, dim).narrow(dim, 0, x.shape[dim])
        shape = [1] * x.dim()
        shape[dim] = -1
        return t.reshape(shape)

    def dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
        codes = x.to(torch.int32) if zero_point is None else x.to(torch.int32) - expanded(zero_point, x).to(torch.int32)
        return (codes.to(torch.float32) * expanded(scale, x).to(torch.float32)).to(scale.dtype)
    return dequantize


def _simple(function: Function) -> Callable[[dict[str, Any], int], Function]:
    return lambda attrs, opset: function


OPS: dict[str, Callable[[dict[str, Any], int], Function]] = {
    **{name: _simple(function) for name, function in {**BINARY, **UNARY}.items()},
    "Mod": lambda attrs, opset: _mod(int(attrs.get("fmod", 0))),
    "Max": _simple(_variadic(torch.maximum)), "Min": _simple(_variadic(torch.minimum)),
    "Sum": _simple(_variadic(torch.add)),
    "Shape": _shape, "Gather": _gather(elements=False), "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Transpose": _transpose, "Slice": _slice, "Expand": _expand, "Split": _split, "Flatten": _flatten,
    "Concat": _concat, "Cast": _cast, "ConstantOfShape": _constant_of_shape, "Range": _range, "Where": _where,
    "Softmax": _softmax(log=False), "LogSoftmax": _softmax(log=True), "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce("ReduceMean"), "ReduceSum": _reduce("ReduceSum"), "ReduceMax": _reduce("ReduceMax"),
    "ReduceMin": _reduce("ReduceMin"), "Gelu": _gelu, "LeakyRelu": _leaky_relu, "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish, "Elu": _elu, "PRelu": _prelu, "Resize": _resize, "Pad": _pad,
    "ConvTranspose": _conv_transpose, "ArgMax": _arg(largest=True), "ArgMin": _arg(largest=False),
    "Trilu": _trilu, "Tile": _tile, "CumSum": _cumsum, "Einsum": _einsum,
    "MatMul": _matmul, "Gemm": _gemm, "DequantizeLinear": _dequantize, "GatherElements": _gather(elements=True),
    "GatherND": _gather_nd, "IsNaN": _simple(torch.isnan), "IsInf": _is_inf, "Dropout": _dropout,
    "BatchNormalization": _batch_norm,
}
# ops whose function returns a tuple, one tensor per output of the node (told their count as attribute `_outputs`)
MULTIPLE_OUTPUTS = frozenset({"Split", "Dropout"})
# ops that move or pick values without computing new ones: a value on a quantization grid stays on it
DATA_MOVEMENT = frozenset({"Identity", "Dropout", "Gather", "GatherElements", "GatherND", "Unsqueeze", "Squeeze",
                           "Reshape", "Transpose", "Slice", "Expand", "Split", "Flatten"})


# ops on shapes and indices, or that move values: they compute nothing a float kernel rounds
SHAPE_OPS = DATA_MOVEMENT | {"Shape", "Concat", "Cast", "ConstantOfShape", "Range", "Where", "Equal", "Less",
                             "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "Relu", "Max",
                             "Min", "Abs", "Neg", "Floor", "Ceil", "Mod", "ReduceMax", "ReduceMin", "IsNaN", "IsInf",
                             "DequantizeLinear", "ArgMax", "ArgMin", "Trilu", "Tile"}


# float ops whose every result is IEEE-754's correctly rounded one, in onnxruntime as in torch (tested one node at
# a time): the same bits whatever the kernel; the others (Erf, Softmax, LayerNormalization, a float MatMul, ...)
# are approximations or sums whose order is the kernel's
CORRECTLY_ROUNDED = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Reciprocal", "Sum", "Sqrt"})


def keeps_grid(op_type: str, attrs: dict[str, Any]) -> bool:
    """Whether every value the op outputs is one of its first input's (or zero, which every grid holds): a value on a
    quantization grid stays on it."""
    if op_type == "Resize":
        return _text(attrs.get("mode"), "nearest") == "nearest"
    if op_type == "Pad":  # padding with zeros (the reader checks a value given as an input), or edge / reflect
        return _text(attrs.get("mode"), "constant") != "constant" or float(attrs.get("value", 0.0)) == 0.0
    return op_type in DATA_MOVEMENT


def function(op_type: str, attrs: dict[str, Any], opset: int) -> Function | None:
    """The torch function of an ONNX op with these attributes, or None where this module has none."""
    make = OPS.get(op_type)
    return None if make is None else make(attrs, opset)


# ops computed as onnxruntime's kernels compute them, by branches on the values' dtype and shape and native passes:
# a traced graph keeps their node whole (`graph.trace`), as it cannot trace into them
RUNTIME_KERNELS = frozenset({"Sqrt", "Tanh", "Sigmoid", "Erf", "QuickGelu", "Softmax", "LayerNormalization", "MatMul",
                             "ReduceMean",
                             "FastGelu", "Gelu", "BiasGelu", "FusedMatMul", "SkipLayerNormalization"})


class OnnxOp(nn.Module):
    """One float (or shape) node of an ONNX graph, run as torch computes it, or as onnxruntime's kernel does where
    this module knows how (`RUNTIME_KERNELS`)."""

    def __init__(self, op_type: str, fn: Function, optional: Sequence[bool]) -> None:
        super().__init__()
        self.op_type, self.fn = op_type, fn
        self.fx_leaf = op_type in RUNTIME_KERNELS
        # what the coverage says of the MACs this node holds (a float MatMul or Gemm of the graph)
        self.uncovered_reason = f"a float {op_type} of the ONNX graph (onnxruntime runs it in float too)"
        self.optional = tuple(optional)  # inputs the node leaves out (empty names): passed as None

    def forward(self, *xs: Any) -> Any:
        args, given = [], iter(xs)
        for absent in self.optional:
            args.append(None if absent else next(given))
        while args and args[-1] is None:
            args.pop()
        return self.fn(*args)

    def extra_repr(self) -> str:
        return self.op_type
