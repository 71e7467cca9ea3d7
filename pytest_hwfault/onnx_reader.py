"""Read an ONNX QDQ model (QuantizeLinear/DequantizeLinear around float ops, as onnxruntime's `quantize_static`
writes it) as onnxruntime's CPU execution provider computes it. A QOperator model (the kernels as nodes) is first
rewritten into its QDQ equivalent (`onnx_qoperator`).

onnxruntime fuses each DequantizeLinear -> op -> QuantizeLinear group it can into an integer kernel; this reader
reproduces each kernel's arithmetic (read in onnxruntime's MLAS sources and measured against onnxruntime 1.32):

- Conv / Gemm / MatMul on a dequantized activation and a dequantized int8 initializer, followed by a
  QuantizeLinear (possibly through Relu): a layer (`DeployedLayer`). QLinearConv / QGemm add the int32 bias codes
  to the int32 accumulator (`BiasMode.INTEGER`), scale it by float32(x_scale x w_scale / y_scale) in float32,
  round half to even, add the zero point and saturate. Where onnxruntime leaves such a group in float (a float
  Conv between DequantizeLinear and QuantizeLinear), its float sum differs from the exact one by float32 rounding
  only: outputs may differ by one code where the exact value sits within that rounding of a half code (the model's
  notes name each such layer whose sums can pass 2^24, where float32 rounds them);
- QLinearAdd (x86, AVX2/AVX-512 kernel): with ratios rA = float32(sA / sC), rB = float32(sB / sC) and
  fixed = float32(zC) - fma(rA, zA, rB zB), the output code is saturate(round_half_even(fma(qA, rA, fma(qB, rB,
  fixed)))) on the stored codes qA, qB, A and B swapped where onnxruntime's broadcast hands A over as the scalar
  operand (`QLinearAdd`, measured on every code pair); an Add left in float is a float add re-gridded by its
  QuantizeLinear (`deployed.Requantize`);
- the kernels of a static transformer (`QLinearMatMul` of two activations, `QLinearMul`, `QLinearSoftmax`, and
  QLinearAdd with a quantized constant operand), each as its class says; the float and shape ops between them run
  as torch computes them (`onnx_float`), named in the notes where onnxruntime's kernel rounds otherwise;
- QLinearGlobalAveragePool: the int32 sum of (code - zero point) over the image, times float32(s_in / (s_out x
  float32(N))) in float32, rounded half to even, plus the output zero point, saturated (`QLinearGlobalAvgPool`);
- QLinearAveragePool: the float32 sum, in window order, of the dequantized values, divided by the element count,
  then float32(y / s_out + z_out) rounded half to even and saturated (`QLinearAvgPool`);
- QuantizeLinear on a float value: round_half_even(x / scale) + zero point, saturated (`deployed.Requantize`);
  one on a value already on the same grid (after MaxPool, Flatten, Reshape) changes nothing and is dropped.

Each integer kernel reproduced from its arithmetic (QLinearAdd, QLinearMul, QLinearMatMul of two activations,
QLinearSoftmax, the average pools) is probed at load on the node's own scales and zero points against the installed
onnxruntime (`onnx_probes`: every code pair, or rows and images of codes); a node whose probe disagrees is named in
the notes.

Which groups onnxruntime fuses depends on its graph optimizer (an int8-activation model keeps some Conv and Add
nodes in float, and runs some int8 kernels on uint8 codes with zero point + 128, which moves where QLinearAdd's and
QLinearAveragePool's float32 sums round): when onnxruntime is installed the reader asks it, by optimizing the model
once and reading the kernels it chose and their zero points; without it every fusible group is taken as fused, on
the model's own zero points.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from . import onnx_float, onnx_probes
from .deployed import (
    BiasMode,
    CodeTable,
    Deployed,
    DeployedFormatError,
    DeployedLayer,
    Requantize,
    check_fixed_batch,
    code_values,
    float32_multiplier,
    stored_codes,
)

CONVOLUTIONS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}  # by spatial dims
# onnxruntime's integer kernels for a conv/gemm/matmul group (anything else it runs is a float op)
INTEGER_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                   "DynamicQuantizeMatMul")
SUPPORTED = ("QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul", "Relu", "Add", "GlobalAveragePool",
             "AveragePool", "MaxPool", "Flatten", "Reshape", "Clip", "Identity", "Concat", "Constant",
             "DynamicQuantizeLinear -> MatMulInteger or ConvInteger -> Cast -> Mul -> Add (quantize_dynamic)")


def _code_range(signed: bool) -> tuple[int, int]:
    return (-128, 127) if signed else (0, 255)


def _saturate(codes: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """onnxruntime's conversion of a float result to codes, in place: a NaN becomes the lowest code (its float -> int32
    conversion gives INT32_MIN, saturated; measured on QuantizeLinear, QLinearAdd, QLinearMul and QLinearMatMul,
    uint8 and int8: a degenerate scale's NaNs; QLinearSoftmax converts otherwise), the rest clamped."""
    return codes.nan_to_num_(nan=float(low)).clamp_(low, high)


def _int32_converted(x: torch.Tensor) -> torch.Tensor:
    """MLAS's float -> int32 conversion without a clamp before it (QLinearAdd, QLinearMul): a value outside the int32
    range, infinities and NaN included, becomes INT32_MIN, which then saturates to the lowest code (measured: a sum
    of 1.2e12 gives code 0, not 255)."""
    return torch.where((x >= -(2.0**31)) & (x < 2.0**31), x, torch.tensor(-(2.0**31), dtype=x.dtype))


def _fma32(a: torch.Tensor, b: float, c: torch.Tensor | float) -> torch.Tensor:
    """float32 fused multiply-add: the product is exact in float64, one rounding to float32 at the end."""
    return (a.double() * float(np.float32(b)) + (c.double() if isinstance(c, torch.Tensor) else float(c))).float()


def _fma_f32(a: float, b: float, c: float) -> float:
    """float32(a) x float32(b) + float32(c) rounded once to float32 (C's fmaf)."""
    from .onednn import fused_multiply_add

    a32, b32, c32 = (torch.tensor([v], dtype=torch.float32) for v in (a, b, c))
    return float(fused_multiply_add(a32, b32, c32)[0])


def _scalar_first(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether onnxruntime's broadcast hands QLinearAdd's kernel the first input as its scalar operand, which it
    then passes as the kernel's second (its operands swapped; measured): where A holds one value, or (B not) where
    A's innermost dimension the output does not hold at 1 is 1 and B's is not (A one value per span of B)."""
    if math.prod(a) == 1:
        return True
    if math.prod(b) == 1:
        return False
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)
    for da, db in zip(reversed(a), reversed(b)):
        if da != 1 or db != 1:
            return da == 1
    return False


def _native_qlinear(op: int, a: torch.Tensor, b: torch.Tensor, params: list[float] | None) -> torch.Tensor | None:
    """QLinearAdd (op 0) or QLinearMul (op 1) in one native pass, where it applies (finite scales, `params` not
    None; shapes `native.qlinear_binary` reads) and `_native_qlinear_agrees`; None: the eager chain runs."""
    from . import native

    if params is None:
        return None
    fused = native.qlinear_binary(op, a, b, params)  # None where the passes are off or decline
    return fused if fused is not None and _native_qlinear_agrees() else None


_qlinear_agrees: bool | None = None  # `_native_qlinear_agrees`, once it ran with the passes on


def _native_qlinear_agrees() -> bool:
    """Whether `native.qlinear_binary` equals the eager chains of `QLinearAdd` and `QLinearMul` bit for bit on this
    machine (checked once per process, while the passes are on): every code of u8 and s8 grids, with zero points at
    the edges and within, scales that make ties and saturate, values off the grid (faulty inputs), either operand
    broadcast along leading or inner dimensions, a transposed or sliced one, and a NaN."""
    global _qlinear_agrees
    if _qlinear_agrees is None:
        _qlinear_agrees = _check_native_qlinear()
    return _qlinear_agrees


def _check_native_qlinear() -> bool:
    from . import native

    generator = torch.Generator().manual_seed(25)
    for signed in (False, True):
        low, high = _code_range(signed)
        a = (torch.arange(low, high + 1, dtype=torch.float32).repeat(8) - 3) * 0.05
        a = torch.cat([a, torch.randn(500, generator=generator) * 40, torch.tensor([float("nan"), 1e30, -1e30])])
        b_full = a.flip(0) * 1.7
        for scales, zeros in (((0.05, 0.085, 0.1), (3, 0, 7)), ((0.05, 0.085, 0.0125), (low, high, 0)),
                              ((1e-3, 2.0, 1e-9), (0, 5, high))):
            grids = [(s, z) for s, z in zip(scales, zeros)]
            for cls, op in ((QLinearAdd, 0), (QLinearMul, 1)):
                module = cls(grids[0], grids[1], grids[2], signed)
                rows = a[: a.numel() // 14 * 14].view(-1, 2, 7)
                for x, y in ((a, b_full), (rows, b_full[:7]), (b_full[:7], rows), (rows, rows[:1, :1]),
                             (rows[:, :1], rows[:1]), (rows.transpose(0, 2), b_full[:2].view(2, 1)),
                             (rows[:, :, :1], rows), (a[:1], b_full)):
                    swapped = op == 0 and _scalar_first(x.shape, y.shape)
                    params = module._params(swapped) if isinstance(module, QLinearAdd) else module._params()
                    assert params is not None
                    fused = native.qlinear_binary(op, *((y, x) if swapped else (x, y)), params)
                    if fused is None or not native.same_bits(fused, module.eager(x, y)):
                        return False
    return True


class QLinearAdd(nn.Module):
    """onnxruntime's QLinearAdd (MLAS AVX2 kernel) on values (code - zero point) x scale (module docstring)."""

    def __init__(self, a: tuple[float, int], b: tuple[float, int], c: tuple[float, int], signed: bool,
                 shift: tuple[int, int, int] = (0, 0, 0)) -> None:
        """`shift`: what the kernel adds to each stored code and zero point (128 where onnxruntime runs int8
        codes as uint8)."""
        super().__init__()
        (self.sa, self.za), (self.sb, self.zb), (self.sc, self.zc) = a, b, c
        self.shift = shift
        self.za, self.zb, self.zc = self.za + shift[0], self.zb + shift[1], self.zc + shift[2]
        signed = signed and shift[2] == 0
        f32 = np.float32
        with np.errstate(all="ignore"):  # a degenerate (infinite) scale: the kernel's NaNs, as it computes them
            self.ra, self.rb = float(f32(self.sa) / f32(self.sc)), float(f32(self.sb) / f32(self.sc))
            # the kernel's compiler fuses the first product with the sum: zC - fma(r1, z1, r2 x z2), where 1 is the
            # kernel's first operand (measured on every code pair: the sum of two roundings is off near ties)
            self.fixed = float(f32(self.zc) - _fma_f32(self.ra, self.za, float(f32(self.rb) * f32(self.zb))))
            self.fixed_swapped = float(f32(self.zc) - _fma_f32(self.rb, self.zb, float(f32(self.ra) * f32(self.za))))
        self.low, self.high = _code_range(signed)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        swapped = _scalar_first(a.shape, b.shape)
        fused = _native_qlinear(0, *((b, a) if swapped else (a, b)), self._params(swapped))
        return fused if fused is not None else self.eager(a, b)

    def eager(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The kernel on torch's ops (the native pass's reference): fma(qA, rA, fma(qB, rB, fixed)), its operands
        swapped where onnxruntime hands A to it as the scalar one (`_scalar_first`)."""
        qa, qb = stored_codes(a, self.sa, self.za), stored_codes(b, self.sb, self.zb)
        if _scalar_first(a.shape, b.shape):
            out = _fma32(qb, self.rb, _fma32(qa, self.ra, self.fixed_swapped))
        else:
            out = _fma32(qa, self.ra, _fma32(qb, self.rb, self.fixed))
        return code_values(_saturate(_int32_converted(out.round_()), self.low, self.high), self.sc, self.zc)

    def _params(self, swapped: bool = False) -> list[float] | None:
        """The native pass's parameters, for (A, B) or, `swapped`, for (B, A)."""
        scales = (self.sa, self.sb, self.sc)
        if not all(math.isfinite(s) for s in scales):
            return None
        if swapped:
            return [self.sb, self.zb, self.sa, self.za, self.sc, self.zc, self.low, self.high, self.rb, self.ra,
                    self.fixed_swapped]
        return [self.sa, self.za, self.sb, self.zb, self.sc, self.zc, self.low, self.high, self.ra, self.rb, self.fixed]

    def extra_repr(self) -> str:
        return f"a=({self.sa!r}, {self.za}), b=({self.sb!r}, {self.zb}), out=({self.sc!r}, {self.zc})"


class QLinearMatMul(nn.Module):
    """onnxruntime's QLinearMatMul of two activations (an attention's products, which its QDQ transformer fuses):
    the exact integer sum of (code - zero point) products, to float32, times float32(sa x sb / sy) in float32,
    rounded half to even, plus the zero point, saturated (MLAS's requantization). Outside the fault sites: its
    MACs are counted as unfaulted."""

    uncovered_reason = ("onnxruntime's integer QLinearMatMul of two activations, computed exactly outside the fault "
                        "sites")

    def __init__(self, a: tuple[float, int], b: tuple[float, int], y: tuple[float, int], signed: bool,
                 relu: bool = False) -> None:
        """`relu`: a ReLU between the product and its QuantizeLinear: the codes clamp at the zero point (what a
        float ReLU of the dequantized codes, re-gridded, gives too)."""
        super().__init__()
        (self.sa, self.za), (self.sb, self.zb), (self.sy, self.zy) = a, b, y
        self.multiplier = float(float32_multiplier(self.sa, torch.tensor([self.sb]), self.sy)[0])
        self.low, self.high = _code_range(signed)
        if relu:
            self.low = max(self.low, self.zy)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        qa = stored_codes(a, self.sa, self.za).sub_(self.za).double()
        qb = stored_codes(b, self.sb, self.zb).sub_(self.zb).double()
        acc = torch.matmul(qa, qb).float()  # exact in float64 (|sum| < 2^53); int32 -> float32 rounds as this does
        out = acc.mul_(torch.tensor(self.multiplier, dtype=torch.float32)).round_().add_(self.zy)
        return code_values(_saturate(out, self.low, self.high), self.sy, self.zy)

    def extra_repr(self) -> str:
        return f"a=({self.sa!r}, {self.za}), b=({self.sb!r}, {self.zb}), out=({self.sy!r}, {self.zy})"


class QLinearMul(nn.Module):
    """onnxruntime's QLinearMul (a QDQ Mul it fuses, e.g. GELU's products): float32((a - za) x (b - zb)) times
    float32(float32(sa x sb) / sc), plus the output zero point, each step rounded to float32, then rounded half to
    even and saturated. The zero point is added before the rounding (MLAS adds it in float): on a tie with an odd
    zero point, round(x) + zc is the other code (found by the per-node probe, `onnx_probes`: 226 of 65,536 code
    pairs for zc = 7)."""

    def __init__(self, a: tuple[float, int], b: tuple[float, int], c: tuple[float, int], signed: bool) -> None:
        super().__init__()
        (self.sa, self.za), (self.sb, self.zb), (self.sc, self.zc) = a, b, c
        f32 = np.float32
        self.ratio = float(f32(f32(self.sa) * f32(self.sb)) / f32(self.sc))
        self.low, self.high = _code_range(signed)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fused = _native_qlinear(1, a, b, self._params())
        return fused if fused is not None else self.eager(a, b)

    def eager(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The kernel on torch's ops (the native pass's reference)."""
        qa = stored_codes(a, self.sa, self.za).sub_(self.za)
        qb = stored_codes(b, self.sb, self.zb).sub_(self.zb)
        out = torch.mul(qa, qb).mul_(torch.tensor(self.ratio, dtype=torch.float32)).add_(float(self.zc))
        return code_values(_saturate(_int32_converted(out.round_()), self.low, self.high), self.sc, self.zc)

    def _params(self) -> list[float] | None:
        scales = (self.sa, self.sb, self.sc)
        return None if not all(math.isfinite(s) for s in scales) else \
            [self.sa, self.za, self.sb, self.zb, self.sc, self.zc, self.low, self.high, self.ratio]

    def extra_repr(self) -> str:
        return f"a=({self.sa!r}, {self.za}), b=({self.sb!r}, {self.zb}), out=({self.sc!r}, {self.zc})"


@functools.cache
def _libm_logf() -> Any:
    """The C library's float32 log (the one onnxruntime's kernel calls), or None where ctypes cannot find it."""
    import ctypes
    import ctypes.util

    try:
        logf = ctypes.CDLL(ctypes.util.find_library("m") or None).logf
    except (AttributeError, OSError):
        return None
    logf.restype, logf.argtypes = ctypes.c_float, [ctypes.c_float]
    return logf


def _logf(x: float) -> float:
    """C's logf of float32 `x`: the C library's own, else the float64 log rounded to float32 (which equals glibc's
    on all but 3 of the 200,000 row lengths 1 .. 200,000 that reach here)."""
    logf = _libm_logf()
    return float(logf(x)) if logf is not None else float(np.float32(math.log(float(np.float32(x)))))


class QLinearSoftmax(nn.Module):
    """onnxruntime's QLinearSoftmax (a QDQ Softmax it fuses; its com.microsoft kernel): a table of
    float32(exp((i - 255 + shift) x x_scale)) computed in double for the 256 code offsets i, with shift =
    max(0, logf(float32(FLT_MAX / D)) - 5) / x_scale (D: the reduced size; the float32 log, as C++'s overload
    for a float argument computes it); each row's codes index it as code - row max + 255; the row's entries
    summed in float32 in order; out = round_half_even(entry x floor(1 / y_scale) / sum, in float64) + zero point,
    at most 255 (uint8) or 127 (int8) (measured on 128M values of rows of 3 to 64: the float32 quotient's ties
    were rounded otherwise on 1 in 10^6)."""

    def __init__(self, x_scale: float, y: tuple[float, int], signed: bool, axis: int, opset: int,
                 nan_code: int = 0) -> None:
        """`nan_code`: the output code of a NaN result (an infinite x_scale's): code 0 of the type the kernel runs,
        which is the code 0 - 128 of an int8 model that onnxruntime runs as uint8."""
        super().__init__()
        self.x_scale, (self.sy, self.zy), self.signed, self.axis, self.opset = x_scale, y, signed, axis, opset
        self.nan_code = nan_code
        f32 = np.float32
        self.y_factor = float(np.floor(f32(1.0) / f32(self.sy)))
        self.low, self.high = _code_range(signed)
        self._tables: dict[int, torch.Tensor] = {}

    def table(self, reduced: int) -> torch.Tensor:
        found = self._tables.get(reduced)
        if found is None:
            scale = float(np.float32(self.x_scale))
            shift = max(0.0, _logf(float(np.float32(np.finfo(np.float32).max) / np.float32(reduced))) - 5) / scale
            found = torch.tensor([math.exp((i - 255 + shift) * scale) for i in range(256)], dtype=torch.float64).float()
            self._tables[reduced] = found
        return found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.div(x, torch.tensor(self.x_scale, dtype=torch.float32)).round_()  # code - zero point
        # values on a degenerate grid (an infinite scale, named in the notes) hold no codes: any in-range index
        codes = torch.nan_to_num(codes, nan=0.0).clamp_(-255, 255)
        shape = codes.shape
        axis = self.axis % codes.dim()
        rows = codes.movedim(axis, -1) if self.opset >= 13 else codes.reshape(*shape[:axis], -1)
        reduced = rows.shape[-1]
        entries = self.table(reduced)[(rows - rows.amax(-1, keepdim=True) + 255).long()]
        total = torch.zeros(entries.shape[:-1], dtype=torch.float32)
        for j in range(reduced):  # in order, each step rounded to float32, as the kernel sums
            total = total + entries[..., j]
        out = entries.double().mul_(self.y_factor).div_(total.double().unsqueeze(-1))
        # a NaN (an infinite x_scale: the table's entry at the row's maximum is exp(0 x inf)) becomes code 0 of the
        # kernel's type, uint8 and int8 alike: its INT32_MIN truncated to a byte (measured; the per-node probe found
        # it)
        out = out.round_().add_(self.zy).nan_to_num_(nan=float(self.nan_code)).clamp_(self.low, self.high).float()
        out = out.movedim(-1, axis) if self.opset >= 13 else out.reshape(shape)
        return code_values(out, self.sy, self.zy)

    def extra_repr(self) -> str:
        return f"x_scale={self.x_scale!r}, out=({self.sy!r}, {self.zy}), axis={self.axis}"


def _runtime_table(op_type: str, attrs: dict[str, Any], inp: _Grid, out: _Grid) -> torch.Tensor | None:
    """onnxruntime's output code for each input code (-128..127 or 0..255, in order) of a DequantizeLinear -> op ->
    QuantizeLinear group, measured by running the group alone on all 256 codes; None without onnxruntime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    codes = np.arange(-128, 128, dtype=np.int8) if inp.signed else np.arange(256, dtype=np.uint8)

    def dtype(grid: _Grid) -> type:
        return np.int8 if grid.signed else np.uint8

    inits = [numpy_helper.from_array(np.array(inp.scale, dtype=np.float32), "sx"),
             numpy_helper.from_array(np.array(inp.zero_point, dtype=dtype(inp)), "zx"),
             numpy_helper.from_array(np.array(out.scale, dtype=np.float32), "sy"),
             numpy_helper.from_array(np.array(out.zero_point, dtype=dtype(out)), "zy")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["fx"]),
             helper.make_node(op_type, ["fx"], ["f"], **attrs),
             helper.make_node("QuantizeLinear", ["f", "sy", "zy"], ["y"])]
    element = TensorProto.INT8 if inp.signed else TensorProto.UINT8
    graph = helper.make_graph(nodes, "table", [helper.make_tensor_value_info("x", element, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.INT8 if out.signed else TensorProto.UINT8,
                                                             [256])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"x": codes})[0].astype(np.int64))
    except Exception:  # noqa: BLE001 - no table: the op stays a float op, named in the notes
        return None


class QLinearGlobalAvgPool(nn.Module):
    """onnxruntime's QLinearGlobalAveragePool (MLAS) on values (code - zero point) x scale."""

    def __init__(self, inp: tuple[float, int], out: tuple[float, int], signed: bool) -> None:
        super().__init__()
        (self.si, self.zi), (self.so, self.zo) = inp, out
        self.low, self.high = _code_range(signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f32 = np.float32
        size = int(np.prod(x.shape[2:]))
        scale = torch.tensor(f32(self.si) / (f32(self.so) * f32(size)), dtype=torch.float32)
        acc = (stored_codes(x, self.si, self.zi) - self.zi).double().sum(dim=tuple(range(2, x.dim())), keepdim=True)
        out = _saturate(acc.float().mul_(scale), self.low - self.zo, self.high - self.zo).round_()
        return out.mul_(torch.tensor(self.so, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"in=({self.si!r}, {self.zi}), out=({self.so!r}, {self.zo})"


class QLinearAvgPool(nn.Module):
    """onnxruntime's QLinearAveragePool: a float32 sum in window order of dequantized values, divided by the
    element count, quantized as float32(y / scale + zero point) rounded half to even."""

    def __init__(self, kernel: list[int], stride: list[int], pads: list[int], include_pad: bool,
                 out: tuple[float, int], signed: bool) -> None:
        super().__init__()
        self.kernel, self.stride = (kernel[0], kernel[1]), (stride[0], stride[1])
        self.pads, self.include_pad = pads, include_pad
        (self.so, self.zo), (self.low, self.high) = out, _code_range(signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        top, left, bottom, right = self.pads
        padded = F.pad(x, (left, right, top, bottom))
        cols = F.unfold(padded, self.kernel, stride=self.stride)  # [n, c * k, L], window positions row-major
        k = self.kernel[0] * self.kernel[1]
        cols = cols.reshape(n, c, k, -1)
        total = cols[:, :, 0].clone()
        for i in range(1, k):
            total += cols[:, :, i]
        if self.include_pad:
            count = torch.full_like(total, float(k))
        else:
            ones = F.pad(torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device), (left, right, top, bottom))
            count = F.unfold(ones, self.kernel, stride=self.stride).sum(1).expand_as(total)
        out_h = (h + top + bottom - self.kernel[0]) // self.stride[0] + 1
        y = (total / count).div_(torch.tensor(self.so, dtype=torch.float32)).add_(self.zo).round_()
        y = _saturate(y, self.low, self.high).sub_(self.zo).mul_(torch.tensor(self.so, dtype=torch.float32))
        return y.reshape(n, c, out_h, -1)


class Clamp(nn.Module):
    def __init__(self, low: float | None, high: float | None) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.low, self.high)

    def extra_repr(self) -> str:
        return f"low={self.low!r}, high={self.high!r}"


class OnnxFlatten(nn.Module):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis > 0:  # no arithmetic on sizes: a traced graph (late start) computes the same; the trailing
            return x.unsqueeze(-1).flatten(0, self.axis - 1).flatten(1)  # 1 makes rank == axis give [N, 1]
        axis = self.axis % x.dim() if self.axis < 0 else self.axis
        return x.reshape(int(np.prod(x.shape[:axis])), -1)


class OnnxReshape(nn.Module):
    """Reshape to a constant shape: a 0 copies the input's size there, unless `allow_zero` (then it is a size of 0,
    as torch's dynamo exporter writes every Reshape)."""

    def __init__(self, shape: list[int], allow_zero: bool = False) -> None:
        super().__init__()
        self.shape, self.allow_zero = shape, allow_zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape([x.shape[i] if s == 0 and not self.allow_zero else s for i, s in enumerate(self.shape)])


class GlobalMean(nn.Module):
    """A float GlobalAveragePool: the mean over every dim after the channels (1-d, 2-d or 3-d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


class OrtGlobalAveragePool(GlobalMean):
    """onnxruntime's float GlobalAveragePool (MLAS's global pooling kernel): each channel's values, in memory order,
    summed in float32 into four lanes (value k into lane k mod 4) while four remain, the lanes added as (0 + 2) +
    (1 + 3), the rest added one by one, then divided by the count (measured bit for bit against onnxruntime:
    `runtime_global_pool_agrees`)."""

    fx_leaf = True  # one node in a traced graph: its loop runs over the input's size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(*x.shape[:2], -1)
        size = flat.shape[2]
        lanes = flat.new_zeros(*x.shape[:2], 4)
        for start in range(0, size - 3, 4):
            lanes = lanes + flat[:, :, start:start + 4]
        total = (lanes[..., 0] + lanes[..., 2]) + (lanes[..., 1] + lanes[..., 3])
        for k in range(size // 4 * 4, size):
            total = total + flat[:, :, k]
        mean = total / torch.tensor(float(size), dtype=total.dtype)
        return mean.reshape(*x.shape[:2], *([1] * (x.dim() - 2)))


class Concat(nn.Module):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, self.axis)


class Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Constant(nn.Module):
    """A constant operand (an initializer used as an activation)."""

    def __init__(self, value: np.ndarray) -> None:
        super().__init__()
        array = np.array(value)  # floats as float32 (the runtime's), integers and booleans as they are (shapes)
        if array.dtype.kind == "f":  # a parameter of the model (a LayerNorm's weight, a position embedding): the
            # coverage lists it among the parameters faults do not reach, as it does a torch model's
            self.value = nn.Parameter(torch.from_numpy(array.astype(np.float32)), requires_grad=False)
        else:
            self.register_buffer("value", torch.from_numpy(array))

    def forward(self) -> torch.Tensor:
        value = self.value
        assert isinstance(value, torch.Tensor)
        return value


class OrtDynamicQuantize(nn.Module):
    """onnxruntime's dynamic quantization of a float input (DynamicQuantizeLinear, and DynamicQuantizeMatMul's own),
    per image: the range widened to hold 0, scale float32((max - min) / 255) (1 for an empty range), zero point
    round_half_even(clamp(-min / scale, 0, 255)), codes clamp(round_half_even(x / scale) + zero point, 0, 255): a
    division (measured on 10M values: x x float32(1 / scale) differs on 15). Returns (codes as float32, scale, zero
    point), the last two per image; traceable (no Python arithmetic on sizes)."""

    per_image = True  # a layer's batch merged with its tokens: computed on the per-image view (`merged_batch`)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = x.flatten(1)
        low, high = flat.amin(1).clamp(max=0.0), flat.amax(1).clamp(min=0.0)
        scale = torch.where(high == low, torch.ones_like(high), (high - low) / 255)
        zero = torch.neg(low).div_(scale).clamp_(0, 255).round_()
        # laid out as x (the int8 kernel reads contiguous codes in one fused pass)
        codes = torch.div(flat, scale.unsqueeze(1)).round_().add_(zero.unsqueeze(1)).clamp_(0, 255)
        return codes.reshape(x.shape), scale, zero


class OrtDynamicOutput(nn.Module):
    """onnxruntime's float result of a dynamic MatMulInteger -> Cast -> Mul -> Add chain (or its fused
    DynamicQuantizeMatMul) from the layer's raw accumulator sum(code x weight code): minus the zero point x the
    weight codes' column sums in int32, to float32, times the float32 product input scale x weight scale (one
    rounding), plus the bias (another). `weight_scale` becomes the layer's stored multiplier once the view is
    built (`scales_layer`), so qparams faults reach it."""

    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    per_image = True  # scales each image's rows by its own input scale
    fx_leaf = True  # one node in a traced graph: its forward branches on how large the sums are

    def __init__(self, layer: str, weight_scale: torch.Tensor, bias: torch.Tensor | None, onnx_output: str = ""
                 ) -> None:
        super().__init__()
        self.scales_layer = layer
        self.onnx_output = onnx_output  # the graph's tensor of this result: the load check compares it, layer by layer
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, acc: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        correction = zero.to(torch.int64).unsqueeze(1) * weight.sum(1, dtype=torch.float64).to(torch.int64)
        # |acc - correction| below the bound: no int32 wrap, and the difference is exact in acc's own float dtype
        # below 2^24 (float32) or in float64 below 2^31; its float32 is then the int32 result's (one rounding). The
        # bound costs one read of acc: the int64 chain below is five passes over twice the bytes (measured on a
        # 4-layer BERT's dynamic view: 2x its forward)
        low, high = torch.aminmax(acc) if acc.numel() else (torch.zeros(()), torch.zeros(()))
        bound = max(-float(low), float(high)) + float(correction.abs().amax())
        if bound < 2.0**31 and acc.dtype in (torch.float32, torch.float64) and acc.dim() >= 2:
            per_image = (acc.shape[0], *([1] * (acc.dim() - 2)), acc.shape[-1])
            exact = acc if bound < 2.0**24 or acc.dtype == torch.float64 else acc.double()
            out = torch.sub(exact, correction.reshape(per_image).to(exact.dtype)).float()
            out = out.mul_((scale.unsqueeze(1) * self.weight_scale).reshape(per_image))
            return out if self.bias is None else out.add_(self.bias)
        # in int64 (the accumulator holds integers; a float64 remainder cost 4x the layer's int8 matmul), wrapped to
        # int32 as the kernel's sum wraps (an accumulator fault can take it there)
        raw = acc.to(torch.int64).movedim(0, -2) - correction
        raw = torch.bitwise_and(raw + 2**31, 2**32 - 1) - 2**31
        out = raw.float() * (scale.unsqueeze(1) * self.weight_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.movedim(-2, 0)


class OrtDynamicConvOutput(OrtDynamicOutput):
    """onnxruntime's float result of a dynamic ConvInteger -> Cast -> Mul -> Add chain: ConvInteger pads its codes with
    their zero point, so each output is sum((code - zero point) x weight code) over the taps inside the image; the
    layer's raw accumulator (zero-padded codes) minus the zero point x the sum of the weight codes over those taps
    (`window_sums`), to float32, times the float32 product input scale x weight scale, plus the bias per channel."""

    def __init__(self, layer: str, weight_scale: torch.Tensor, bias: torch.Tensor | None, onnx_output: str,
                 conv: nn.modules.conv._ConvNd) -> None:
        super().__init__(layer, weight_scale, bias, onnx_output)
        self.stride, self.dilation = tuple(conv.stride), tuple(conv.dilation)
        self.padding = tuple(int(p) for p in conv.padding)  # explicit pads (the reader's ConvInteger)
        self.groups, self.dims = conv.groups, len(conv.stride)
        self._windows: tuple[Any, tuple[int, ...], torch.Tensor] | None = None

    def window_sums(self, weight: torch.Tensor, image: tuple[int, ...]) -> torch.Tensor:
        """[1, out channels, *output size]: each output's sum of weight codes over the taps inside an image of
        `image` ([channels, *size]) (exact in float64), kept until the codes change (weight faults)."""
        from .kernels import _version

        version = _version(weight)
        if self._windows is None or self._windows[0] != version or self._windows[1] != image:
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
            ones = torch.ones(1, *image, dtype=torch.float64, device=weight.device)
            sums = conv(ones, weight.double(), None, self.stride, self.padding, self.dilation, self.groups)
            self._windows = (version, image, sums)
        return self._windows[2]

    def forward(self, acc: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,  # type: ignore[override]
                weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        per_image = (len(acc), *([1] * (acc.dim() - 1)))
        per_channel = (1, -1, *([1] * (acc.dim() - 2)))
        correction = zero.double().reshape(per_image) * self.window_sums(weight, tuple(x.shape[1:]))
        low, high = torch.aminmax(acc) if acc.numel() else (torch.zeros(()), torch.zeros(()))
        bound = max(-float(low), float(high)) + float(correction.abs().amax())
        multiplier = (scale.unsqueeze(1) * self.weight_scale).reshape(len(acc), -1, *([1] * (acc.dim() - 2)))
        if bound < 2.0**31 and acc.dtype in (torch.float32, torch.float64):
            exact = acc if bound < 2.0**24 or acc.dtype == torch.float64 else acc.double()
            out = torch.sub(exact, correction.to(exact.dtype)).float().mul_(multiplier)
        else:  # in int64, wrapped to int32 as the kernel's sum wraps (an accumulator fault can take it there)
            raw = acc.to(torch.int64) - correction.to(torch.int64)
            out = (torch.bitwise_and(raw + 2**31, 2**32 - 1) - 2**31).float() * multiplier
        return out if self.bias is None else out.add_(self.bias.reshape(per_channel))


@dataclass
class _Grid:
    scale: float
    zero_point: int
    signed: bool


@dataclass
class _Weight:
    """A DequantizeLinear of an initializer: codes, per-channel scale and zero point along `axis`; with a
    `block_size` (opset 21's blocked quantization: a scale per block of `block_size` codes along `axis`, for each
    index of the other axes) the scale and zero point have the codes' rank."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    name: str
    block_size: int = 0

    def values(self) -> np.ndarray:
        if self.block_size:
            length = self.codes.shape[self.axis]
            scale, zero = (np.repeat(t.reshape(t.shape or (1,) * self.codes.ndim), self.block_size, self.axis)
                           .take(range(length), self.axis) for t in (self.scale, self.zero_point))
        else:
            shape = [1] * self.codes.ndim
            if self.scale.size > 1:
                shape[self.axis] = -1
            scale, zero = self.scale.reshape(shape), self.zero_point.reshape(shape)
        return ((self.codes.astype(np.int64) - zero) * scale.astype(np.float32)).astype(np.float32)


@dataclass
class _Named:
    """What `_module_name` reads of a node, for a module named after something else (an initializer)."""

    name: str
    op_type: str


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _runtime_kernels(model: Any) -> dict[str, tuple[str, list[tuple[int, bool] | None]]] | None:
    """For each node name, the op type onnxruntime's CPU provider runs after its graph optimizations and the zero
    points (value, signed) among the kernel's constant inputs (onnxruntime runs int8 activations of some kernels
    as uint8 with zero point + 128, which changes their float rounding); None without onnxruntime."""
    graph = _runtime_graph(model)
    return None if graph is None else graph[0]


def _runtime_graph(model: Any) -> tuple[dict[str, tuple[str, list[tuple[int, bool] | None]]],
                                        dict[str, _Grid], dict[str, tuple[str, list[str], dict[str, Any]]]] | None:
    """`_runtime_kernels`; the grid of each DequantizeLinear onnxruntime keeps (scalar scale and zero point), by node
    name: its optimizer can move a grid (`_Builder.removed_double_qdq`); and the GELU kernels it fuses from a
    GELU's float ops and the FusedMatMul it fuses from a MatMul and its scalings (`onnx_float.ORT_FUSED`): their op
    type, inputs and attributes by output name; None without onnxruntime."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            optimized = onnx.load(options.optimized_model_filepath)
        except Exception:
            return None
    consts = {i.name: numpy_helper.to_array(i) for i in optimized.graph.initializer}
    kernels: dict[str, tuple[str, list[tuple[int, bool] | None]]] = {}
    for node in optimized.graph.node:
        zeros: list[tuple[int, bool] | None] = []
        for name in node.input:
            value = consts.get(name)
            small = value is not None and value.size == 1 and value.dtype in (np.int8, np.uint8)
            zeros.append((int(value.reshape(())), value.dtype == np.int8) if small and value is not None else None)
        # onnxruntime's NCHWc layout kernels (blocked channels) compute otherwise than the op of the same name
        kernel = f"NCHWc {node.op_type}" if node.domain == "com.microsoft.nchwc" else node.op_type
        kernels.setdefault(re.sub(r"_token_\d+$", "", node.name), (kernel, zeros))
    grids: dict[str, _Grid] = {}
    for node in optimized.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3:
            scale, zero = consts.get(node.input[1]), consts.get(node.input[2])
            if scale is not None and zero is not None and scale.size == 1 and zero.size == 1 and \
                    zero.dtype in (np.int8, np.uint8):
                grids[node.name] = _Grid(float(scale.reshape(())), int(zero.reshape(())), zero.dtype == np.int8)
    # a kernel's inputs as listed, an absent optional one as "" (SkipLayerNormalization's beta before its bias); its
    # first output (SkipLayerNormalization's others, the mean and the sum, are what the exported ops compute too)
    exported = {node.name for node in model.graph.node}
    fused = {node.output[0]: (node.op_type, list(node.input), _attrs(node)) for node in optimized.graph.node
             if (node.op_type in onnx_float.ORT_FUSED and node.domain == "com.microsoft"
                 and (len(node.output) == 1 or node.op_type == "SkipLayerNormalization"))
             # a LayerNorm exported as ReduceMean, Sub, Pow, ... (opsets before 17) it fuses into its kernel
             or (node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx") and node.name not in exported)}
    return kernels, grids, fused


def _module_name(node: Any, index: int, taken: set[str]) -> str:
    name = re.sub(r"[^0-9a-zA-Z_]", "_", node.name.strip("/")).strip("_") or f"{node.op_type}_{index}"
    if name[0].isdigit():
        name = f"n_{name}"
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _merged_grid(one: _Grid, two: _Grid) -> _Grid | None:
    """The grid onnxruntime's DoubleQDQPairsRemover gives two QDQ pairs it merges (its FindNewZeroPointAndScale, in
    float32): the real range both cover, max of the minima to min of the maxima, over the code range; the zero point
    rounded half away from zero. The same grid where the pairs' are equal; None where their types differ (it does
    not merge those) or the ranges share no more than zero."""
    if one.signed != two.signed:
        return None
    if (one.scale, one.zero_point) == (two.scale, two.zero_point):
        return two
    f32 = np.float32
    low, high = _code_range(one.signed)
    mins = [f32(low - g.zero_point) * f32(g.scale) for g in (one, two)]
    maxes = [f32(high - g.zero_point) * f32(g.scale) for g in (one, two)]
    real_min, real_max = max(mins), min(maxes)
    scale = f32(f32(real_max - real_min) / f32(high - low))
    if not (math.isfinite(float(scale)) and scale > 0):
        # ranges that share at most zero: onnxruntime's grid would be degenerate (scale 0); every value is 0 both
        # there and in the graph's two roundings, which the view then keeps
        return None
    shifted = float(f32(f32(low) - f32(real_min / scale)))
    zero_point = int(math.copysign(math.floor(abs(shifted) + 0.5), shifted))
    return _Grid(float(scale), zero_point, one.signed)


class _Builder:
    """Turns the ONNX graph into an fx.GraphModule: `exact` re-grids as the runtime does; otherwise the float
    function (quantize nodes only clamp to their range, integer kernels become their float ops)."""

    def __init__(self, model: Any, kernels: dict[str, tuple[str, list[tuple[int, bool] | None]]] | None,
                 exact: bool, runtime_grids: dict[str, _Grid] | None = None,
                 fused: dict[str, tuple[str, list[str], dict[str, Any]]] | None = None) -> None:
        from onnx import numpy_helper

        self.model, self.graph, self.kernels, self.exact = model, model.graph, kernels, exact
        self.runtime_grids = runtime_grids or {}  # onnxruntime's DequantizeLinear grids, by node name
        self.fusions = fused or {}  # onnxruntime's fused kernels: op type, inputs and attributes by output name
        self._inferred: tuple[dict[str, int], dict[str, list[int | None]]] | None = None
        self.followed: list[tuple[str, str]] = []  # (node, kernel) computed as onnxruntime's fused kernel does
        self.inside_followed: set[str] = set()  # names of the nodes such a kernel replaces
        self.targets: dict[str, list[str]] = {}  # the modules made for each node, by its name
        self.uncertified: list[str] = []  # followed kernels whose shapes do not show the order is the measured one
        self.disagreeing: list[tuple[str, str]] = []  # (kernel, node) where a probe of the node's grids disagreed
        self.unprobed: list[tuple[str, str]] = []  # (kernel, node) where onnxruntime could not run the probe
        self.merged_qdq: list[str] = []  # QuantizeLinear nodes onnxruntime merged with the pair before them
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.root = nn.Module()
        self.fx = fx.Graph()
        self.values: dict[str, fx.Node] = {}  # float activations
        self.grids: dict[str, _Grid] = {}  # activations known to lie on a grid (dequantized codes)
        self.weights: dict[str, _Weight] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.skip: set[int] = set()
        self.layers: dict[str, DeployedLayer] = {}
        self.taken: set[str] = set()
        self.notes: list[str] = []
        # dynamic quantization: each DynamicQuantizeLinear's codes -> (its scale, its zero point); a Mul of such a
        # scale and a weight scale -> (the input scale, the weight scales)
        self.dynamic: dict[str, tuple[str, str]] = {}
        self.float_run: list[str] = []  # quantized layers onnxruntime's optimizer leaves in float (not wide)
        self.float_run_wide: list[str] = []  # the same, whose float32 sums can pass 2^24 (each named on its own)
        self.degenerate: set[str] = set()  # quantize nodes with a zero, infinite or NaN scale (noted once)
        self.float_nodes: list[Any] = []  # nodes the view computes in float (or on shapes)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.scale_products: dict[str, tuple[str, np.ndarray]] = {}

    # -- helpers -----------------------------------------------------------------------------------------------
    def error(self, node: Any, why: str) -> DeployedFormatError:
        return DeployedFormatError(f"onnx: node {node.name!r} ({node.op_type}): {why}")

    def const(self, name: str, node: Any) -> np.ndarray:
        if name not in self.consts:
            raise self.error(node, f"input {name!r} must be a constant (initializer or Constant node)")
        return self.consts[name]

    def add_module(self, module: nn.Module, node: Any, index: int, args: tuple[Any, ...]) -> fx.Node:
        name = _module_name(node, index, self.taken)
        self.root.add_module(name, module)
        self.targets.setdefault(node.name, []).append(name)
        return self.fx.call_module(name, args)

    def value(self, name: str, node: Any) -> fx.Node:
        if name in self.values:
            return self.values[name]
        if name in self.consts:  # named after the initializer (the coverage lists float ones as parameters)
            const = Constant(self.consts[name])
            self.values[name] = self.add_module(const, _Named(name, "Constant"), 0, ())
            return self.values[name]
        raise self.error(node, f"input {name!r} is not an activation this reader can compute")

    def single_consumer(self, name: str, op_type: str) -> Any | None:
        users = self.consumers.get(name, [])
        outputs = {o.name for o in self.graph.output}
        return users[0] if len(users) == 1 and users[0].op_type == op_type and name not in outputs else None

    def q_params(self, node: Any) -> _Grid:
        scale = self.const(node.input[1], node)
        if len(node.input) > 2 and node.input[2]:
            zero = self.const(node.input[2], node)
        else:  # the codes' type is the output_dtype attribute's (opset 21), uint8 by default
            import onnx

            zero = np.zeros((), dtype=onnx.helper.tensor_dtype_to_np_dtype(
                int(_attrs(node).get("output_dtype", 0)) or onnx.TensorProto.UINT8))
        if scale.size != 1 or zero.size != 1:
            raise self.error(node, "activations must be quantized per tensor")
        if zero.dtype not in (np.int8, np.uint8):
            raise self.error(node, f"activation codes of type {zero.dtype} are not supported (int8/uint8 only)")
        value = float(scale.reshape(()))
        if not 0.0 < value < float("inf") and node.name not in self.degenerate:
            self.degenerate.add(node.name)  # the view computes what the runtime does with it: say what that is
            self.notes.append(f"node {node.name!r} ({node.op_type}) quantizes with scale {value!r}: its codes carry "
                              "no information (a calibration range with an infinite value, such as an attention "
                              "mask's float32 minimum; exclude the node from quantization)")
        return _Grid(value, int(zero.reshape(())), zero.dtype == np.int8)

    def fused(self, node: Any, kernel: str) -> bool:
        if self.kernels is None or not node.name:
            return True
        return self.kernels.get(node.name, ("", []))[0] == kernel

    def probe(self, node: Any, module: nn.Module, kernel: str, agrees: Any) -> None:
        """Name `node` where the installed onnxruntime's `kernel`, run on the node's own grids as it runs them (the
        kernel's type and zero points: `kernel_grid`), disagrees with `module`, which the view computes it with, or
        could not be probed (`onnx_probes`); the verdict is kept as `module.probe_agrees` (None: no probe; without
        onnxruntime, whose absence the notes say)."""
        verdict = None if self.kernels is None else agrees()
        setattr(module, "probe_agrees", verdict)  # noqa: B010 - a plain attribute, not a parameter or buffer
        if verdict is False:
            self.disagreeing.append((kernel, node.name))
        elif verdict is None and self.kernels is not None:
            self.unprobed.append((kernel, node.name))

    def kernel_grid(self, node: Any, position: int, grid: _Grid) -> tuple[float, int, bool]:
        """(scale, zero point, signed) of the operand at `position` as the runtime's kernel holds it
        (`kernel_zero`)."""
        return (grid.scale, *self.kernel_zero(node, position, grid))

    def kernel_zero(self, node: Any, position: int, grid: _Grid) -> tuple[int, bool]:
        """The zero point (and signedness) the runtime's kernel uses for the operand at `position`: the model's,
        or the uint8 one onnxruntime substitutes for an int8 one."""
        zeros: list[tuple[int, bool] | None] = self.kernels.get(node.name, ("", []))[1] if self.kernels else []
        found = zeros[position] if position < len(zeros) else None
        if found is not None and found[0] - grid.zero_point in (0, 128) and (found[1] == grid.signed or grid.signed):
            return found
        return grid.zero_point, grid.signed

    def output_grid(self, name: str) -> tuple[_Grid, list[Any], bool] | None:
        """The QuantizeLinear that re-grids activation `name` (possibly through a Relu): its grid, the nodes it
        takes over, and whether a ReLU sits in between."""
        relu = self.single_consumer(name, "Relu")
        nodes: list[Any] = []
        if relu is not None:
            nodes.append(relu)
            name = relu.output[0]
        quant = self.single_consumer(name, "QuantizeLinear")
        if quant is None:
            return None
        return self.q_params(quant), [*nodes, quant], relu is not None

    # -- the walk ----------------------------------------------------------------------------------------------
    def build(self) -> fx.GraphModule:
        inputs = {i.name for i in self.graph.initializer}
        for graph_input in self.graph.input:
            if graph_input.name not in inputs:
                self.values[graph_input.name] = self.fx.placeholder(re.sub(r"\W", "_", graph_input.name) or "x")
        for index, node in enumerate(self.graph.node):
            if id(node) in self.skip:
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None and node.op_type in onnx_float.OPS:
                handler = self.float_op
            if node.domain not in ("", "ai.onnx") or handler is None:
                raise DeployedFormatError(
                    f"onnx: node {node.name!r} of type {node.op_type!r} (domain {node.domain or 'ai.onnx'!r}) is "
                    f"not supported; supported: {', '.join(SUPPORTED)}; float ops: {', '.join(onnx_float.OPS)}")
            handler(node, index)
            if self.exact and node.output and node.output[0] in self.fusions:
                self.follow_fused(node, index)
        outputs = [self.value(o.name, self.graph.node[-1]) for o in self.graph.output]
        self.fx.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        self.drop_unread()
        return fx.GraphModule(self.root, self.fx)

    def drop_unread(self) -> None:
        """The exported ops a followed kernel replaced (and the constants only they read), unread now: dropped, so
        that they neither run nor count in the coverage's MACs."""
        droppable = {target for name in self.inside_followed for target in self.targets.get(name, ())}
        constants = {name for name, module in self.root.named_children() if isinstance(module, Constant)}
        dropped = True
        while dropped:
            dropped = False
            for fx_node in reversed(list(self.fx.nodes)):
                if fx_node.op == "call_module" and not fx_node.users and \
                        (fx_node.target in droppable or fx_node.target in constants):
                    target = str(fx_node.target)
                    self.fx.erase_node(fx_node)
                    if not any(n.op == "call_module" and n.target == target for n in self.fx.nodes):
                        delattr(self.root, target)
                    dropped = True

    def follow_fused(self, node: Any, index: int) -> None:
        """onnxruntime fuses a GELU's exported ops (its tanh form: Mul, Pow, Add, Tanh, ...; its erf form: Div, Erf,
        Add, Mul, Mul; a bias Add before either) into its FastGelu, Gelu or BiasGelu kernel, and a float MatMul
        with the scalings of its operands or result into its FusedMatMul, whose float32 steps differ from the
        exported ops': where the installed onnxruntime's kernel agrees with `onnx_float`'s (a probe; for a
        FusedMatMul, on shapes whose order is known: `_fused_matmul_qualifies`) and the view has its inputs, the
        fused output is computed as that kernel computes it (the exported ops stay in the graph, unread)."""
        output = node.output[0]
        kernel, listed, attrs = self.fusions[output]
        while listed and not listed[-1]:
            listed = listed[:-1]
        inputs = [name for name in listed if name]
        if not inputs or not all(name in self.values or name in self.consts for name in inputs) or \
                output in self.grids:
            return
        if kernel == "FusedMatMul":
            if len(inputs) != 2 or any(int(attrs.get(a, 0)) for a in ("transA", "transBatchA", "transBatchB")) or \
                    not runtime_fused_matmul_agrees(float(attrs.get("alpha", 1.0)), bool(attrs.get("transB", 0))):
                return
            if not self.fused_matmul_qualifies(inputs, attrs):  # followed (closer), but not certified: named
                self.uncertified.append(kernel)
        elif kernel == "LayerNormalization":
            sizes = {i.name: int(np.prod(i.dims)) for i in self.graph.initializer}
            if not _layer_norm_certified(listed, attrs, self.inferred()[1], sizes):
                self.uncertified.append(kernel)
        elif kernel == "SkipLayerNormalization":
            if len(listed) < 3 or not runtime_skip_layer_norm_agrees(len(listed) > 3 and bool(listed[3]),
                                                                      len(listed) > 4 and bool(listed[4])):
                return
            shapes = [self.inferred()[1].get(name) for name in listed[:2]]
            if not shapes[0] or shapes[0] != shapes[1]:  # a skip not of the input's (inferred) shape: named
                self.uncertified.append(kernel)
        elif kernel == "QuickGelu":
            if not runtime_quick_gelu_agrees():
                return
        elif not runtime_gelu_agrees(kernel, len(inputs) > 1):
            return
        op = onnx_float.OnnxOp(kernel, onnx_float.ort_fused(kernel, attrs), [not name for name in listed])
        self.values[output] = self.add_module(op, _Named(f"{node.name}_{kernel}", kernel), index,
                                              tuple(self.value(name, node) for name in inputs))
        self.followed.append((node.name, kernel))
        # the exported nodes between the kernel's inputs and its output: not run by onnxruntime, not named
        stack, seen = [output], set(inputs)
        while stack:
            producer = self.producers.get(stack.pop())
            if producer is None or producer.name in self.inside_followed:
                continue
            self.inside_followed.add(producer.name)
            stack.extend(name for name in producer.input if name and name not in seen and name not in self.consts)

    def fused_matmul_qualifies(self, inputs: list[str], attrs: dict[str, Any]) -> bool:
        """Whether a FusedMatMul's products are summed in the order `onnx_float.ort_matmul` knows, whatever the
        batch: two activations of inferred shapes (`_inferred`) with k <= 256 and two rows and columns or more."""
        a, b = (self.inferred()[1].get(name) for name in inputs)
        if not a or not b or len(a) < 2 or len(b) < 2 or any(name in self.consts for name in inputs):
            return False
        m, k = a[-2], a[-1]
        n = b[-2] if int(attrs.get("transB", 0)) else b[-1]
        if m is None or k is None or n is None:
            return False
        return k <= onnx_float.ORT_MATMUL_BLOCK and m >= 2 and n >= 2

    def inferred(self) -> tuple[dict[str, int], dict[str, list[int | None]]]:
        if self._inferred is None:
            self._inferred = _inferred(self.model)
        return self._inferred

    def float_op(self, node: Any, index: int) -> None:
        """A float or shape node (`onnx_float`): evaluated here where its inputs are all constants (an exporter's
        shape arithmetic on constants, a transposed weight), else run by an `OnnxOp` module named after it. A
        value on a quantization grid stays on it through an op that only moves values."""
        attrs = _attrs(node)
        if node.op_type in onnx_float.MULTIPLE_OUTPUTS:
            attrs["_outputs"] = len(node.output)
        else:  # an optional output the function does not compute (LayerNormalization's Mean and InvStdDev)
            graph_outputs = {o.name for o in self.graph.output}
            for i, name in enumerate(node.output[1:], start=1):
                if name and (self.consumers.get(name) or name in graph_outputs):
                    raise self.error(node, f"its output {i} ({name!r}) is read, which the reader does not compute "
                                           "(only the first output of this op)")
        if node.op_type == "MatMul":  # onnxruntime packs a constant B and sums its products otherwise
            attrs["_constant_b"] = len(node.input) > 1 and node.input[1] in self.consts
        try:
            fn = onnx_float.function(node.op_type, attrs, self.opset)
        except ValueError as exc:  # a mode of the op the reader does not compute
            raise self.error(node, str(exc)) from None
        assert fn is not None
        present = [name for name in node.input if name]
        if all(name in self.consts for name in present):
            with torch.no_grad():
                args = [torch.from_numpy(np.array(self.consts[name])) if name else None for name in node.input]
                while args and args[-1] is None:
                    args.pop()
                try:
                    result = fn(*args)
                except Exception as exc:
                    raise self.error(node, f"could not evaluate it on its constant inputs: {exc}") from None
            for name, value in zip(node.output, result if isinstance(result, (tuple, list)) else (result,)):
                if name:
                    self.consts[name] = value.numpy()
            return
        self.float_nodes.append(node)
        op = onnx_float.OnnxOp(node.op_type, fn, [not name for name in node.input])
        out = self.add_module(op, node, index, tuple(self.value(name, node) for name in present))
        outputs = [self.fx.call_function(operator.getitem, (out, i)) for i in range(len(node.output))] if \
            node.op_type in onnx_float.MULTIPLE_OUTPUTS else [out]
        keeps = onnx_float.keeps_grid(node.op_type, attrs)
        if node.op_type == "Pad" and len(node.input) > 2 and node.input[2]:  # the pad value, an input from opset 11
            value = self.consts.get(node.input[2])
            keeps = keeps and value is not None and bool((np.asarray(value) == 0).all())
        grid = self.grids.get(node.input[0]) if keeps else None
        for name, value in zip(node.output, outputs):
            if grid is not None:
                self.set_quantized(name, value, grid)
            else:
                self.values[name] = value

    def set_quantized(self, name: str, node: fx.Node, grid: _Grid) -> None:
        self.values[name] = node
        self.grids[name] = grid

    def op_Constant(self, node: Any, index: int) -> None:
        from onnx import numpy_helper

        value = _attrs(node).get("value")
        if value is None:
            raise self.error(node, "only Constant nodes with a tensor `value` are supported")
        self.consts[node.output[0]] = numpy_helper.to_array(value)

    def removed_double_qdq(self, node: Any) -> tuple[str, _Grid] | None:
        """onnxruntime's DoubleQDQPairsRemover: Q1 -> DQ1 (-> a Cast to float, which it removes first) -> Q2 -> DQ2
        becomes Q1 -> DQ2, both on a new grid covering what both ranges share, (max(mins) - min(maxes)) / (qmax -
        qmin) and a zero point to match. Where onnxruntime's optimized graph lacks this QuantizeLinear (Q2) and the
        DequantizeLinear before it (DQ1) but keeps the one after it (DQ2): Q1's input and DQ2's grid there, which
        the view then quantizes to directly, as onnxruntime computes it."""
        if not self.exact or self.kernels is None or not node.name or node.name in self.kernels:
            return None
        producers = self.producers
        value = node.input[0]
        step = producers.get(value)
        while step is not None and step.op_type in ("Cast", "Identity") and (
                step.op_type == "Identity" or int(_attrs(step).get("to", 0)) == 1):
            value = step.input[0]
            step = producers.get(value)
        if step is None or step.op_type != "DequantizeLinear" or not step.name or step.name in self.kernels:
            return None
        first = producers.get(step.input[0])
        after = self.single_consumer(node.output[0], "DequantizeLinear")
        if first is None or first.op_type != "QuantizeLinear" or after is None:
            return None
        if after.name in self.runtime_grids:  # DQ2 kept: its grid as onnxruntime rewrote it
            return first.input[0], self.runtime_grids[after.name]
        # DQ2 fused into the kernel after it: the grid by onnxruntime's own formula
        grid = _merged_grid(self.q_params(first), self.q_params(node))
        return None if grid is None else (first.input[0], grid)

    def op_QuantizeLinear(self, node: Any, index: int) -> None:
        merged = self.removed_double_qdq(node)
        if merged is not None:
            source, grid = merged
            low, high = _code_range(grid.signed)
            out = self.add_module(Requantize(grid.scale, grid.zero_point, low, high), node, index,
                                  (self.value(source, node),))
            self.set_quantized(node.output[0], out, grid)
            self.merged_qdq.append(node.name)
            return
        grid = self.q_params(node)
        source = node.input[0]
        x = self.value(source, node)
        known = self.grids.get(source)
        low, high = _code_range(grid.signed)
        if known is not None and (known.scale, known.zero_point, known.signed) == (grid.scale, grid.zero_point,
                                                                                    grid.signed):
            out = x  # already on this very grid
        elif self.exact:
            out = self.add_module(Requantize(grid.scale, grid.zero_point, low, high), node, index, (x,))
        else:
            out = self.add_module(Clamp((low - grid.zero_point) * grid.scale, (high - grid.zero_point) * grid.scale),
                                  node, index, (x,))
        self.set_quantized(node.output[0], out, grid)

    def op_DequantizeLinear(self, node: Any, index: int) -> None:
        source = node.input[0]
        if source in self.consts:  # a weight or a bias
            codes = self.consts[source]
            scale = self.const(node.input[1], node)
            zero = self.const(node.input[2], node) if len(node.input) > 2 and node.input[2] else \
                np.zeros_like(scale, dtype=codes.dtype)
            attrs = _attrs(node)
            axis, block_size = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
            if block_size and (scale.ndim != codes.ndim or zero.shape != scale.shape or any(
                    s != (c if d != axis % codes.ndim else -(-c // block_size))
                    for d, (s, c) in enumerate(zip(scale.shape, codes.shape)))):
                raise self.error(node, f"blocked scales of shape {list(scale.shape)} (zero points "
                                       f"{list(zero.shape)}) for codes of shape {list(codes.shape)}, block_size "
                                       f"{block_size} along axis {axis}: the codes' shape with ceil(size / block_size) "
                                       "along the axis expected")
            weight = _Weight(codes, scale.astype(np.float32), zero, axis % max(codes.ndim, 1), source, block_size)
            self.weights[node.output[0]] = weight
            self.consts[node.output[0]] = weight.values()
            return
        if source not in self.grids:
            # codes picked from a quantized constant (a dynamically quantized embedding table, Gather'ed): ONNX's
            # float((q - zero point)) x scale, a float op outside the fault sites
            self.float_op(node, index)
            return
        self.check_pair(node, self.grids[source])
        self.set_quantized(node.output[0], self.value(source, node), self.grids[source])

    def check_pair(self, node: Any, grid: _Grid) -> None:
        """Refuse a DequantizeLinear whose scale or zero point differ from those of the QuantizeLinear that made its
        codes: the runtime reads the codes on the DequantizeLinear's grid (its fused kernels take that as their
        input's), the view keeps values on the QuantizeLinear's."""
        producer = self.producers.get(node.input[0])
        if producer is None or producer.op_type != "QuantizeLinear" or producer.name in self.merged_qdq:
            return  # a merged pair's grid is onnxruntime's rewrite of both (`removed_double_qdq`)
        scale = self.const(node.input[1], node)
        zero = self.const(node.input[2], node) if len(node.input) > 2 and node.input[2] else None
        zero_point = 0 if zero is None or zero.size != 1 else int(zero.reshape(()))
        if scale.size != 1 or float(scale.reshape(())) != grid.scale or zero_point != grid.zero_point or (
                zero is not None and (zero.dtype == np.int8) != grid.signed):
            raise self.error(node, f"reads the codes of QuantizeLinear {producer.name!r} (scale {grid.scale!r}, "
                                   f"zero point {grid.zero_point}) with scale {scale.reshape(-1)[:4].tolist()} and "
                                   f"zero point {None if zero is None else zero.reshape(-1)[:4].tolist()}: only a "
                                   "DequantizeLinear on its QuantizeLinear's own scale and zero point is supported")

    def keep_grid(self, node: Any, out: fx.Node) -> None:
        self.values[node.output[0]] = out
        if node.input[0] in self.grids:
            self.grids[node.output[0]] = self.grids[node.input[0]]

    def op_Identity(self, node: Any, index: int) -> None:
        if node.input[0] in self.consts:  # an alias of a constant (an exporter's shared weights)
            self.consts[node.output[0]] = self.consts[node.input[0]]
            if node.input[0] in self.weights:
                self.weights[node.output[0]] = self.weights[node.input[0]]
            return
        self.keep_grid(node, self.value(node.input[0], node))

    def op_Relu(self, node: Any, index: int) -> None:
        self.keep_grid(node, self.add_module(nn.ReLU(), node, index, (self.value(node.input[0], node),)))

    def op_MaxPool(self, node: Any, index: int) -> None:
        a = _attrs(node)
        kernel = list(a["kernel_shape"])
        pads = list(a.get("pads", [0] * 2 * len(kernel)))
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[:len(kernel)] != pads[len(kernel):] \
                or len(kernel) != 2 or a.get("storage_order", 0) or len(node.output) > 1:
            raise self.error(node, "only 2-d MaxPool with symmetric explicit pads is supported")
        pool = nn.MaxPool2d(tuple(kernel), tuple(a.get("strides", [1, 1])), tuple(pads[:2]),  # ONNX's default 1
                            tuple(a.get("dilations", [1, 1])),
                            ceil_mode=bool(a.get("ceil_mode", 0)))
        self.keep_grid(node, self.add_module(pool, node, index, (self.value(node.input[0], node),)))

    def op_Flatten(self, node: Any, index: int) -> None:
        flat = OnnxFlatten(int(_attrs(node).get("axis", 1)))
        self.keep_grid(node, self.add_module(flat, node, index, (self.value(node.input[0], node),)))

    def op_Reshape(self, node: Any, index: int) -> None:
        if node.input[1] not in self.consts or node.input[0] in self.consts:  # a shape computed from the input
            self.float_op(node, index)
            return
        shape = [int(s) for s in self.const(node.input[1], node).reshape(-1)]
        reshape = OnnxReshape(shape, bool(_attrs(node).get("allowzero", 0)))
        self.keep_grid(node, self.add_module(reshape, node, index, (self.value(node.input[0], node),)))

    def op_Clip(self, node: Any, index: int) -> None:
        a = _attrs(node)
        low = a.get("min") if len(node.input) < 2 or not node.input[1] else float(self.const(node.input[1], node))
        high = a.get("max") if len(node.input) < 3 or not node.input[2] else float(self.const(node.input[2], node))
        self.values[node.output[0]] = self.add_module(Clamp(low, high), node, index,
                                                      (self.value(node.input[0], node),))

    def op_Concat(self, node: Any, index: int) -> None:
        if all(name in self.consts for name in node.input):
            self.float_op(node, index)
            return
        xs = tuple(self.value(name, node) for name in node.input)
        self.values[node.output[0]] = self.add_module(Concat(int(_attrs(node)["axis"])), node, index, xs)

    def op_Add(self, node: Any, index: int) -> None:
        a_name, b_name = node.input[0], node.input[1]
        if a_name in self.consts and b_name in self.consts:
            self.float_op(node, index)
            return
        target = self.output_grid(node.output[0])
        self.constant_grids(a_name, b_name)  # a quantized constant operand (a bias added after a MatMul)
        a, b = self.value(a_name, node), self.value(b_name, node)
        if (self.exact and target is not None and a_name in self.grids and b_name in self.grids
                and self.fused(node, "QLinearAdd")):
            grid, taken, relu = target
            ga, gb = self.grids[a_name], self.grids[b_name]
            if relu and grid.zero_point != _code_range(grid.signed)[0]:
                pass  # a ReLU that the output range does not imply: runs in float
            elif ga.signed == gb.signed == grid.signed:
                shift = (self.kernel_zero(node, 2, ga)[0] - ga.zero_point,
                         self.kernel_zero(node, 5, gb)[0] - gb.zero_point,
                         self.kernel_zero(node, 7, grid)[0] - grid.zero_point)
                add = QLinearAdd((ga.scale, ga.zero_point), (gb.scale, gb.zero_point), (grid.scale, grid.zero_point),
                                 grid.signed, shift)
                self.probe(node, add, "QLinearAdd", lambda: onnx_probes.binary_agrees(
                    "QLinearAdd", (add.sa, add.za), (add.sb, add.zb), (add.sc, add.zc), add.low < 0))
                self.skip.update(id(n) for n in taken)
                self.set_quantized(taken[-1].output[0], self.add_module(add, node, index, (a, b)), grid)
                return
        self.float_nodes.append(node)
        self.values[node.output[0]] = self.add_module(Add(), node, index, (a, b))

    def op_GlobalAveragePool(self, node: Any, index: int) -> None:
        source = node.input[0]
        x = self.value(source, node)
        target = self.output_grid(node.output[0])
        if self.exact and target is not None and not target[2] and source in self.grids \
                and self.fused(node, "QLinearGlobalAveragePool"):
            grid, taken, _ = target
            known = self.grids[source]
            pool = QLinearGlobalAvgPool((known.scale, known.zero_point), (grid.scale, grid.zero_point), grid.signed)
            spatial = (self.inferred()[1].get(source) or [])[2:]
            side = spatial[0] if len(spatial) == 2 and spatial[0] == spatial[1] else None
            x_grid, y_grid = self.kernel_grid(node, 2, known), self.kernel_grid(node, 4, grid)
            self.probe(node, pool, "QLinearGlobalAveragePool", lambda: None if x_grid[2] != y_grid[2] else
                       onnx_probes.global_pool_agrees(x_grid[:2], y_grid[:2], y_grid[2], side))
            self.skip.update(id(n) for n in taken)
            self.set_quantized(taken[-1].output[0], self.add_module(pool, node, index, (x,)), grid)
            return
        self.float_nodes.append(node)  # named where onnxruntime runs it otherwise (`_reproduced`)
        mean = OrtGlobalAveragePool() if self.exact else GlobalMean()
        self.values[node.output[0]] = self.add_module(mean, node, index, (x,))

    def op_AveragePool(self, node: Any, index: int) -> None:
        a = _attrs(node)
        kernel = list(a["kernel_shape"])
        pads = list(a.get("pads", [0] * 2 * len(kernel)))
        strides = list(a.get("strides", [1] * len(kernel)))
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(kernel) != 2 or a.get("ceil_mode", 0) \
                or any(d != 1 for d in a.get("dilations", [1, 1])):
            raise self.error(node, "only 2-d AveragePool with explicit pads, ceil_mode=0 and no dilations is "
                                   "supported")
        include_pad = bool(a.get("count_include_pad", 0))
        source = node.input[0]
        x = self.value(source, node)
        target = self.output_grid(node.output[0])
        if self.exact and target is not None and not target[2] and source in self.grids \
                and self.fused(node, "QLinearAveragePool"):
            grid, taken, _ = target
            zero, signed = self.kernel_zero(node, 4, grid)
            pool = QLinearAvgPool(kernel, strides, [pads[0], pads[1], pads[2], pads[3]], include_pad,
                                  (grid.scale, zero), signed)
            x_grid = self.kernel_grid(node, 2, self.grids[source])
            self.probe(node, pool, "QLinearAveragePool", lambda: None if x_grid[2] != signed else
                       onnx_probes.average_pool_agrees(x_grid[:2], (grid.scale, zero), signed, (kernel[0], kernel[1]),
                                                       (strides[0], strides[1]), (pads[0], pads[1], pads[2], pads[3]),
                                                       include_pad))
            self.skip.update(id(n) for n in taken)
            self.set_quantized(taken[-1].output[0], self.add_module(pool, node, index, (x,)), grid)
            return
        if pads[:2] != pads[2:]:
            raise self.error(node, "a float AveragePool needs symmetric pads")
        avg = nn.AvgPool2d((kernel[0], kernel[1]), (strides[0], strides[1]), (pads[0], pads[1]),
                           count_include_pad=include_pad)
        self.float_nodes.append(node)  # torch's float sums, not MLAS's: named
        self.values[node.output[0]] = self.add_module(avg, node, index, (x,))

    # -- dynamic quantization (onnxruntime's quantize_dynamic) ----------------------------------------------------
    def op_DynamicQuantizeLinear(self, node: Any, index: int) -> None:
        x = self.value(node.input[0], node)
        self.dynamic[node.output[0]] = (node.output[1], node.output[2])
        if not self.exact:  # the float function: the input as it is
            self.values[node.output[0]] = x
            return
        quantized = self.add_module(OrtDynamicQuantize(), node, index, (x,))
        for i, out in enumerate(node.output):
            self.values[out] = self.fx.call_function(operator.getitem, (quantized, i))

    def constant_grids(self, *names: str) -> None:
        """Give each quantized constant among `names` (a DequantizeLinear of per-tensor 8-bit codes) its grid, so
        that a QLinear kernel taking it as an operand is read as one."""
        for name in names:
            weight = self.weights.get(name)
            if weight is not None and weight.scale.size == 1 and weight.codes.dtype in (np.int8, np.uint8) and \
                    name not in self.grids:
                self.grids[name] = _Grid(float(weight.scale.reshape(())), int(weight.zero_point.reshape(())),
                                         weight.codes.dtype == np.int8)

    def op_Mul(self, node: Any, index: int) -> None:
        scales = {scale for scale, _ in self.dynamic.values()}
        a, b = node.input[0], node.input[1]
        if a in scales and b in self.consts or b in scales and a in self.consts:
            scale, weight = (a, b) if a in scales else (b, a)
            self.scale_products[node.output[0]] = (scale, self.consts[weight])
            return  # read by the MatMulInteger chain that uses it
        self.constant_grids(a, b)
        target = self.output_grid(node.output[0])
        if self.exact and target is not None and not target[2] and a in self.grids and b in self.grids \
                and not (a in self.consts and b in self.consts) and self.fused(node, "QLinearMul"):
            grid, taken, _ = target
            ga, gb = self.grids[a], self.grids[b]
            if ga.signed == gb.signed == grid.signed:
                mul = QLinearMul((ga.scale, ga.zero_point), (gb.scale, gb.zero_point), (grid.scale, grid.zero_point),
                                 grid.signed)
                kernel_grids = [self.kernel_grid(node, p, g) for p, g in ((2, ga), (5, gb), (7, grid))]
                self.probe(node, mul, "QLinearMul", lambda: None if len({g[2] for g in kernel_grids}) > 1 else
                           onnx_probes.binary_agrees("QLinearMul", *(g[:2] for g in kernel_grids),
                                                     kernel_grids[0][2]))
                self.skip.update(id(n) for n in taken)
                args = (self.value(a, node), self.value(b, node))
                self.set_quantized(taken[-1].output[0], self.add_module(mul, node, index, args), grid)
                return
        self.float_op(node, index)

    def op_Sigmoid(self, node: Any, index: int) -> None:
        self.lookup(node, index, "QLinearSigmoid")

    def op_LeakyRelu(self, node: Any, index: int) -> None:
        self.lookup(node, index, "QLinearLeakyRelu")

    def lookup(self, node: Any, index: int, kernel: str) -> None:
        """An elementwise op on a quantized value whose result is quantized, which onnxruntime fuses into a
        lookup-table kernel: its table, measured from onnxruntime (`CodeTable`); else a float op."""
        source = node.input[0]
        target = self.output_grid(node.output[0])
        known = self.grids.get(source)
        if self.exact and target is not None and not target[2] and known is not None and self.kernels is not None \
                and self.fused(node, kernel):
            grid, taken, _ = target
            attrs = {key: value for key, value in _attrs(node).items()}
            table = _runtime_table(node.op_type, attrs, known, grid)
            if table is not None:
                module = CodeTable((known.scale, known.zero_point, known.signed), (grid.scale, grid.zero_point),
                                   table)
                self.skip.update(id(n) for n in taken)
                self.set_quantized(taken[-1].output[0], self.add_module(module, node, index,
                                                                        (self.value(source, node),)), grid)
                return
        self.float_op(node, index)

    def op_Softmax(self, node: Any, index: int) -> None:
        source = node.input[0]
        target = self.output_grid(node.output[0])
        known = self.grids.get(source)
        if self.exact and target is not None and not target[2] and known is not None \
                and known.signed == target[0].signed and self.fused(node, "QLinearSoftmax"):
            grid, taken, _ = target
            axis = int(_attrs(node).get("axis", -1 if self.opset >= 13 else 1))
            (x_zero, x_signed), (y_zero, y_signed) = self.kernel_zero(node, 2, known), self.kernel_zero(node, 4, grid)
            softmax = QLinearSoftmax(known.scale, (grid.scale, grid.zero_point), grid.signed, axis, self.opset,
                                     nan_code=grid.zero_point - y_zero)
            shape = self.inferred()[1].get(source)
            width = None
            if shape:
                reduced = shape[axis % len(shape):] if self.opset < 13 else [shape[axis % len(shape)]]
                width = math.prod(d for d in reduced if d) if all(reduced) else None
            # probed as the kernel runs: on its own type and zero points
            self.probe(node, softmax, "QLinearSoftmax", lambda: None if x_signed != y_signed else
                       onnx_probes.softmax_agrees((known.scale, x_zero), (grid.scale, y_zero), y_signed, self.opset,
                                                  width))
            self.skip.update(id(n) for n in taken)
            self.set_quantized(taken[-1].output[0], self.add_module(softmax, node, index,
                                                                    (self.value(source, node),)), grid)
            return
        self.float_op(node, index)

    def op_MatMulInteger(self, node: Any, index: int) -> None:
        """A dynamically quantized MatMul, as quantize_dynamic writes it: DynamicQuantizeLinear's codes times an
        int8 weight initializer, then Cast, Mul by the product of the two scales, and Add of a bias; onnxruntime
        fuses the chain (DynamicQuantizeMatMul) with the same arithmetic (`OrtDynamicOutput`)."""
        source, weight_name = node.input[0], node.input[1]
        zeros = [node.input[i] if i < len(node.input) else "" for i in (2, 3)]
        if source not in self.dynamic or weight_name not in self.consts or zeros[0] != self.dynamic[source][1]:
            raise self.error(node, "only a MatMulInteger of a DynamicQuantizeLinear's codes (with its zero point) "
                                   "and an int8 weight initializer is supported")
        codes = self.consts[weight_name]
        if codes.dtype != np.int8 or codes.ndim != 2:
            raise self.error(node, f"weights of type {codes.dtype} and rank {codes.ndim}: int8 matrices only")
        if zeros[1] and bool((self.const(zeros[1], node) != 0).any()):
            raise self.error(node, "asymmetric weights (non-zero weight zero points) are not supported; quantize "
                                   "with weight_type=QuantType.QInt8")
        channels = codes.shape[1]
        taken, product, bias = self.dynamic_chain(node, channels, ((channels,), (1, channels)))
        weight_scale = np.broadcast_to(self.scale_products[product][1].astype(np.float32).reshape(-1), (channels,))
        linear = nn.Linear(codes.shape[0], channels, bias=not self.exact and bias is not None).requires_grad_(False)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy((codes.T * weight_scale[:, None]).astype(np.float32)))
            if linear.bias is not None and bias is not None:
                linear.bias.copy_(bias)
        self.dynamic_layer(node, index, linear, taken, codes.T, weight_scale, bias)

    def dynamic_chain(self, node: Any, channels: int, bias_shapes: tuple[tuple[int, ...], ...]
                      ) -> tuple[list[Any], str, torch.Tensor | None]:
        """The Cast -> Mul by (input scale x weight scale) -> Add of a bias (optional) after a dynamic MatMulInteger or
        ConvInteger: (those nodes, the scale product's name, the bias or None); a bias is a constant of one of
        `bias_shapes`."""
        cast = self.single_consumer(node.output[0], "Cast")
        mul = self.single_consumer(cast.output[0], "Mul") if cast is not None else None
        product = next((i for i in mul.input if i != cast.output[0]), "") \
            if cast is not None and mul is not None else ""
        if mul is None or self.scale_products.get(product, ("",))[0] != self.dynamic[node.input[0]][0]:
            raise self.error(node, "expected Cast -> Mul by (input scale x weight scale) after it, as onnxruntime's "
                                   "quantize_dynamic writes it")
        assert cast is not None
        taken, bias = [cast, mul], None
        add = self.single_consumer(mul.output[0], "Add")
        other = next((i for i in add.input if i != mul.output[0]), "") if add is not None else ""
        if add is not None and other in self.consts and self.consts[other].size == channels \
                and self.consts[other].shape in bias_shapes:
            taken.append(add)
            bias = torch.from_numpy(self.consts[other].astype(np.float32).reshape(-1))
        return taken, product, bias

    def dynamic_layer(self, node: Any, index: int, module: nn.Module, taken: list[Any], codes: np.ndarray,
                      weight_scale: np.ndarray, bias: torch.Tensor | None) -> None:
        """A dynamic MatMulInteger / ConvInteger as the raw-output layer `module` (its weight `codes` laid out as the
        module's) and the float result of its chain (`OrtDynamicOutput`, `OrtDynamicConvOutput`); in the float
        function, `module` itself on the float input."""
        source = node.input[0]
        x = self.value(source, node)
        self.skip.update(id(n) for n in taken)
        if not self.exact:  # the float function: dequantized weights and the bias on the float input
            self.values[taken[-1].output[0]] = self.add_module(module, node, index, (x,))
            return
        name = _module_name(node, index, self.taken)
        setattr(module, "onnx_node", node.name)  # noqa: B010 - where the layer's weight codes live in the graph
        self.root.add_module(name, module)
        acc = self.fx.call_module(name, (x,))
        weight = self.fx.get_attr(f"{name}.weight")  # after the layer: a late-start cut before it keeps images only
        scale, zero = (self.values[v] for v in self.dynamic[source])
        if isinstance(module, nn.modules.conv._ConvNd):
            conv_output = OrtDynamicConvOutput(name, torch.from_numpy(weight_scale.copy()), bias,
                                               taken[-1].output[0], module)
            output = self.add_module(conv_output, node, index, (acc, scale, zero, weight, x))
        else:
            linear_output = OrtDynamicOutput(name, torch.from_numpy(weight_scale.copy()), bias, taken[-1].output[0])
            output = self.add_module(linear_output, node, index, (acc, scale, zero, weight))
        self.values[taken[-1].output[0]] = output
        self.layers[name] = DeployedLayer(
            weight_codes=torch.from_numpy(codes.astype(np.int32)).contiguous(),
            weight_scale=torch.from_numpy(weight_scale.copy()), input_scale=1.0, input_zero_point=0, act_scale=None,
            act_zero_point=0, input_signed=False, raw_output=True)

    def op_ConvInteger(self, node: Any, index: int) -> None:
        """A dynamically quantized Conv, as quantize_dynamic writes it: DynamicQuantizeLinear's codes (padded with
        their zero point) convolved with an int8 weight initializer of one scale, then Cast, Mul by the product of the
        two scales, and Add of the bias as [1, channels, 1, ...] (`OrtDynamicConvOutput`)."""
        source, weight_name = node.input[0], node.input[1]
        zeros = [node.input[i] if i < len(node.input) else "" for i in (2, 3)]
        if source not in self.dynamic or weight_name not in self.consts or zeros[0] != self.dynamic[source][1]:
            raise self.error(node, "only a ConvInteger of a DynamicQuantizeLinear's codes (with its zero point) "
                                   "and an int8 weight initializer is supported")
        codes = self.consts[weight_name]
        dims = codes.ndim - 2
        if codes.dtype != np.int8 or dims not in CONVOLUTIONS:
            raise self.error(node, f"weights of type {codes.dtype} and rank {codes.ndim}: int8 1-d, 2-d and 3-d "
                                   "convolution kernels only")
        if zeros[1] and bool((self.const(zeros[1], node) != 0).any()):
            raise self.error(node, "asymmetric weights (non-zero weight zero points) are not supported; quantize "
                                   "with weight_type=QuantType.QInt8")
        a = _attrs(node)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise self.error(node, "only convolutions with explicit pads are supported")
        pads = list(a.get("pads", [0] * 2 * dims))
        if pads[:dims] != pads[dims:]:
            raise self.error(node, f"asymmetric pads {pads} are not supported")
        channels, groups = codes.shape[0], int(a.get("group", 1))
        taken, product, bias = self.dynamic_chain(node, channels, ((channels,), (1, channels) + (1,) * dims,
                                                                   (channels,) + (1,) * dims))
        if self.scale_products[product][1].size != 1:
            raise self.error(node, "a weight scale per channel: onnxruntime's quantize_dynamic writes one per "
                                   "convolution")
        weight_scale = np.broadcast_to(self.scale_products[product][1].astype(np.float32).reshape(-1), (channels,))
        conv = CONVOLUTIONS[dims](codes.shape[1] * groups, channels, tuple(codes.shape[2:]),
                                  tuple(a.get("strides", [1] * dims)), tuple(pads[:dims]),
                                  tuple(a.get("dilations", [1] * dims)), groups,
                                  bias=not self.exact and bias is not None).requires_grad_(False)
        assert isinstance(conv, nn.modules.conv._ConvNd)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(codes.astype(np.float32) * weight_scale[0]))
            if conv.bias is not None and bias is not None:
                conv.bias.copy_(bias)
        self.dynamic_layer(node, index, conv, taken, codes, weight_scale, bias)

    # -- multiply-accumulate layers --------------------------------------------------------------------------------
    def op_Conv(self, node: Any, index: int) -> None:
        a = _attrs(node)
        weight = self.weights.get(node.input[1])
        w = weight.values() if weight is not None else self.const(node.input[1], node)
        dims = w.ndim - 2
        if dims not in CONVOLUTIONS or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise self.error(node, "only 1-d, 2-d and 3-d convolutions with explicit pads are supported")
        pads = list(a.get("pads", [0] * 2 * dims))
        if pads[:dims] != pads[dims:]:
            raise self.error(node, f"asymmetric pads {pads} are not supported")
        groups = int(a.get("group", 1))
        conv = CONVOLUTIONS[dims](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]),
                                  tuple(a.get("strides", [1] * dims)), tuple(pads[:dims]),
                                  tuple(a.get("dilations", [1] * dims)), groups, bias=True)
        self.mac(node, index, conv, weight, w, channel_axis=0)

    def op_Gemm(self, node: Any, index: int) -> None:
        a = _attrs(node)
        if node.input[1] not in self.consts or node.input[0] in self.consts or (
                node.input[1] not in self.weights and len(node.input) > 2 and node.input[2] and
                node.input[2] not in self.consts):
            self.float_op(node, index)  # of two activations, or a float one with a computed bias
            return
        if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
            raise self.error(node, "only Gemm with alpha=beta=1 and transA=0 is supported")
        weight = self.weights.get(node.input[1])
        w = weight.values() if weight is not None else self.const(node.input[1], node)
        trans = bool(a.get("transB", 0))
        w_out = w if trans else w.T
        linear = nn.Linear(w_out.shape[1], w_out.shape[0], bias=True)
        self.mac(node, index, linear, weight, w_out, channel_axis=0 if trans else 1)

    def op_MatMul(self, node: Any, index: int) -> None:
        weight = self.weights.get(node.input[1])
        if node.input[1] not in self.consts or node.input[0] in self.consts or self.consts[node.input[1]].ndim != 2:
            target = self.output_grid(node.output[0])
            a_grid, b_grid = self.grids.get(node.input[0]), self.grids.get(node.input[1])
            if self.exact and target is not None and a_grid is not None and b_grid is not None \
                    and self.fused(node, "QLinearMatMul") and node.input[0] not in self.consts \
                    and node.input[1] not in self.consts:
                # int8 codes the kernel runs as uint8 (code and zero point + 128): the same code - zero point
                # products, the same output code
                grid, taken, relu = target
                matmul = QLinearMatMul((a_grid.scale, a_grid.zero_point), (b_grid.scale, b_grid.zero_point),
                                       (grid.scale, grid.zero_point), grid.signed, relu)
                self.probe(node, matmul, "QLinearMatMul", lambda: onnx_probes.matmul_agrees(
                    self.kernel_grid(node, 2, a_grid), self.kernel_grid(node, 5, b_grid),
                    self.kernel_grid(node, 7, grid), relu))
                args = (self.value(node.input[0], node), self.value(node.input[1], node))
                self.skip.update(id(n) for n in taken)
                self.set_quantized(taken[-1].output[0], self.add_module(matmul, node, index, args), grid)
                return
            self.float_op(node, index)  # of two activations (attention), or batched: float, outside the fault sites
            return
        w = self.consts[node.input[1]]
        linear = nn.Linear(w.shape[0], w.shape[1], bias=True)
        self.mac(node, index, linear, weight, np.ascontiguousarray(w.T), channel_axis=1)

    def mac(self, node: Any, index: int, module: nn.Module, weight: _Weight | None, w: np.ndarray,
            channel_axis: int) -> None:
        """A conv/linear: a layer when its input is a dequantized activation, its weight a dequantized int8
        initializer and its output quantized; else a float op."""
        source = node.input[0]
        x = self.value(source, node)
        bias_weight = self.weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        bias = None
        if len(node.input) > 2 and node.input[2]:
            given = self.const(node.input[2], node)
            outputs = int(np.shape(w)[0])  # the weight as the layer holds it, [out, in, ...]
            if any(size != 1 for size in given.shape[:-1]) or given.size not in (1, outputs):
                raise self.error(node, f"a bias of shape {list(given.shape)} (not one value per output, or one for "
                                       f"all: a Gemm's C broadcast over its rows): only a bias of shape [{outputs}] "
                                       "or [1] is supported")
            bias = given.astype(np.float32).reshape(-1)
        assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
            assert module.bias is not None
            module.bias.copy_(torch.from_numpy(bias) if bias is not None else torch.zeros_like(module.bias))
        module.requires_grad_(False)
        target = self.output_grid(node.output[0])
        in_grid = self.grids.get(source)
        why = _not_a_layer(weight, in_grid, target)
        if why:
            self.notes.append(f"node {node.name!r} ({node.op_type}) runs in float, outside the fault sites: {why}")
            out = self.add_module(module, node, index, (x,))
            self.values[node.output[0]] = out
            return
        assert weight is not None and in_grid is not None and target is not None
        grid, taken, relu = target
        if bool((weight.zero_point != 0).any()):
            raise self.error(node, "asymmetric weights (non-zero weight zero points) are not supported; quantize "
                                   "weights symmetrically (onnxruntime's default for QInt8 weights)")
        out_channels = module.weight.shape[0]
        scale = np.broadcast_to(weight.scale.reshape(-1), (out_channels,)) if weight.scale.size == 1 else \
            weight.scale.reshape(-1)
        if weight.scale.size > 1 and weight.axis != channel_axis:
            raise self.error(node, f"per-channel weight scales along axis {weight.axis} (output channels are axis "
                                   f"{channel_axis})")
        codes = torch.from_numpy(weight.codes.astype(np.int32))
        if isinstance(module, nn.Linear) and channel_axis == 1:
            codes = codes.T.contiguous()
        bias_codes, mode = None, BiasMode.FLOAT
        if bias_weight is not None and bias_weight.codes.dtype == np.int32 and not bool(
                (bias_weight.zero_point != 0).any()):
            bias_codes, mode = torch.from_numpy(bias_weight.codes.astype(np.int32).reshape(-1)), BiasMode.INTEGER
            expected = np.float32(in_grid.scale) * scale.astype(np.float32)
            if not np.allclose(bias_weight.scale.reshape(-1), expected, rtol=1e-6, atol=0):
                self.notes.append(f"layer of node {node.name!r}: the bias scale is not input scale x weight scale; "
                                  "the int32 bias codes are added to the accumulator as they are, as QLinearConv "
                                  "does")
        elif bias is not None:
            bias_codes = torch.from_numpy(bias)
        name = _module_name(node, index, self.taken)
        kernel = self.kernels.get(node.name, ("", []))[0] if self.kernels is not None and node.name else ""
        # 255 x 128 per product: an accumulator that can pass 2^24, where a float32 sum rounds
        if self.exact and kernel and kernel not in INTEGER_KERNELS and codes[0].numel() * 255 * 128 >= 1 << 24:
            self.notes.append(f"layer of node {node.name!r}: onnxruntime runs it as a float {kernel}, not an integer "
                              "kernel; the engine computes its exact integer sum, which onnxruntime's float32 sum "
                              "rounds where it passes 2^24 (this layer's can): outputs near a half code may be one "
                              "code apart from onnxruntime's")
            self.float_run_wide.append(node.name)
        elif self.exact and kernel and kernel not in INTEGER_KERNELS:
            self.float_run.append(node.name)  # named together, in one note (`read_onnx`)
        # where the layer lives in the graph: its node (weight codes) and the tensor of its stored output codes
        setattr(module, "onnx_node", node.name)  # noqa: B010 - plain attributes, not parameters or buffers
        setattr(module, "onnx_codes", taken[-1].output[0])  # noqa: B010
        self.root.add_module(name, module)
        out = self.fx.call_module(name, (x,))
        act_low, _ = _code_range(grid.signed)
        relu = relu and grid.zero_point != act_low  # a ReLU the output range does not imply
        if not self.exact:
            if relu:
                out = self.add_module(nn.ReLU(), taken[0], index, (out,))
            low, high = _code_range(grid.signed)
            out = self.add_module(Clamp((low - grid.zero_point) * grid.scale, (high - grid.zero_point) * grid.scale),
                                  taken[-1], index, (out,))
        self.layers[name] = DeployedLayer(
            weight_codes=codes.reshape(module.weight.shape), weight_scale=torch.from_numpy(scale.astype(np.float32)),
            input_scale=in_grid.scale, input_zero_point=in_grid.zero_point, act_scale=grid.scale,
            act_zero_point=grid.zero_point, bias=None if bias_codes is None else bias_codes.float(),
            bias_mode=mode, input_signed=in_grid.signed, act_signed=grid.signed, relu=relu)
        self.skip.update(id(n) for n in taken)
        self.set_quantized(taken[-1].output[0], out, grid)


def _not_a_layer(weight: _Weight | None, in_grid: _Grid | None, target: Any) -> str:
    """Why a Conv/Gemm/MatMul is no layer of the engine (which holds int8 codes, one scale per output channel, between
    quantized activations), or "" where it is one."""
    if weight is None:
        return "its weight is not a dequantized int8 initializer"
    if weight.codes.dtype != np.int8:
        return f"its weight is not a dequantized int8 initializer ({weight.codes.dtype} codes)"
    if weight.block_size:
        return (f"its weight is quantized in blocks ({weight.block_size} codes along axis {weight.axis} share a "
                "scale), which the engine's layers, with one scale per output channel, do not compute")
    if in_grid is None:
        return "its input is not a dequantized activation"
    return "" if target is not None else "its output is not quantized"


def _by_kernel(nodes: list[tuple[str, str]]) -> str:
    """(kernel, node name) pairs for a note: "QLinearAdd x2 (a, b); QLinearSoftmax x1 (c)", three names each at
    most."""
    grouped: dict[str, list[str]] = {}
    for kernel, name in nodes:
        grouped.setdefault(kernel, []).append(name)
    return "; ".join(f"{kernel} x{len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                     for kernel, names in grouped.items())


def _float_valued(model: Any, nodes: list[Any],
                  kernels: dict[str, tuple[str, list[tuple[int, bool] | None]]] | None = None) -> list[Any]:
    """The nodes among `nodes` that compute float values onnxruntime's kernel may round otherwise than torch's (not
    shapes, indices, moves or correctly rounded arithmetic, nor a kernel the view reproduces and the installed
    onnxruntime was checked to compute alike: `_reproduced`), by ONNX's type inference (a node whose type it cannot
    infer counts as float)."""
    import onnx

    types, shapes = _inferred(model)
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    skip = onnx_float.SHAPE_OPS | onnx_float.CORRECTLY_ROUNDED
    axes = _reduce_axes(model, [n for n in nodes if n.op_type == "ReduceMean"])
    return [n for n in nodes if n.op_type not in skip and not onnx_float.keeps_grid(n.op_type, _attrs(n))
            and types.get(n.output[0], 1) in floats and not _reproduced(n, shapes, sizes, kernels, axes)]


def _reduce_axes(model: Any, nodes: list[Any]) -> dict[str, list[int] | None]:
    """Each reduction's axes by node name: its attribute (before opset 18), or its second input where a constant
    gives it; [] where it reduces every dimension; None where the graph does not say."""
    from onnx import numpy_helper

    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and _attrs(node).get("value") is not None:
            constants[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
    found: dict[str, list[int] | None] = {}
    for node in nodes:
        attrs = _attrs(node)
        if "axes" in attrs:
            found[node.name] = [int(a) for a in attrs["axes"]]
        elif len(node.input) > 1 and node.input[1]:
            value = constants.get(node.input[1])
            found[node.name] = None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
        else:
            found[node.name] = None if int(attrs.get("noop_with_empty_axes", 0)) else []
    return found


def _inferred(model: Any) -> tuple[dict[str, int], dict[str, list[int | None]]]:
    """ONNX's inferred element types and shapes by value name, with its data propagation (a Reshape to a shape
    computed by Shape, Gather and Concat gets its static dimensions); a dimension the batch sets stays None. Empty
    where inference fails: then no node's shape qualifies."""
    import onnx

    values: tuple[Any, ...] = ()
    for propagate in (True, False):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=propagate).graph
        except Exception:  # noqa: BLE001 - inference is a nicety here: every node then counts
            continue
        values = (*inferred.value_info, *inferred.output, *inferred.input)
        break
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in values if v.type.tensor_type.HasField("shape")}
    return types, shapes


def _reproduced(node: Any, shapes: dict[str, list[int | None]], sizes: dict[str, int],
                kernels: dict[str, tuple[str, list[tuple[int, bool] | None]]] | None,
                axes: dict[str, list[int] | None] | None = None) -> bool:
    """Whether the view computes this float node bit for bit as the installed onnxruntime does: an elementwise op of
    `RUNTIME_PROBED` on which a probe agrees (`runtime_op_agrees`; ONNX's Gelu: `runtime_gelu_op_agrees`), or a
    LayerNormalization that onnxruntime runs as such (not fused with the Add before it into its
    SkipLayerNormalization), of float32 rows
    whose width `onnx_float.ort_layer_norm` reproduces, its scale and bias one value per element, on which a probe
    of that width and epsilon agrees with onnxruntime (`runtime_layer_norm_agrees`)."""
    if node.op_type in RUNTIME_PROBED:  # where onnxruntime runs it as such (not inside a kernel it fused)
        return kernels is not None and bool(node.name) and kernels.get(node.name, ("",))[0] == node.op_type \
            and runtime_op_agrees(node.op_type)
    if node.op_type == "Gelu":
        approximate = _attrs(node).get("approximate", "none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
        return kernels is not None and bool(node.name) and kernels.get(node.name, ("",))[0] == "Gelu" \
            and runtime_gelu_op_agrees(str(approximate))
    if node.op_type == "Softmax":
        return kernels is not None and bool(node.name) and kernels.get(node.name, ("",))[0] == "Softmax" \
            and runtime_softmax_agrees()
    if node.op_type in ("HardSigmoid", "HardSwish"):  # as such: not fused into a convolution's activation
        attrs = _attrs(node)
        return kernels is not None and bool(node.name) and kernels.get(node.name, ("",))[0] == node.op_type and \
            runtime_hard_activation_agrees(node.op_type, float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5)))
    if node.op_type == "ReduceMean":  # over trailing dimensions of a multiple of 4 values per row
        return kernels is not None and bool(node.name) and kernels.get(node.name, ("",))[0] == "ReduceMean" \
            and _trailing_mean_of_whole_packets(node, shapes, (axes or {}).get(node.name)) \
            and runtime_reduce_mean_agrees()
    if node.op_type == "BatchNormalization":  # as such: not fused into a convolution before it
        return kernels is not None and bool(node.name) and \
            kernels.get(node.name, ("",))[0] == "BatchNormalization" and runtime_batch_norm_agrees()
    if node.op_type == "GlobalAveragePool":  # MLAS's kernel, not NCHWc's
        return kernels is not None and bool(node.name) and \
            kernels.get(node.name, ("",))[0] == "GlobalAveragePool" and runtime_global_pool_agrees()
    if node.op_type == "MatMul":
        return _matmul_reproduced(node, shapes, sizes, kernels)
    if node.op_type != "LayerNormalization" or kernels is None or not node.name:
        return False
    if kernels.get(node.name, ("",))[0] != "LayerNormalization":
        return False
    return _layer_norm_certified(list(node.input), _attrs(node), shapes, sizes)


def _trailing_mean_of_whole_packets(node: Any, shapes: dict[str, list[int | None]], axes: list[int] | None) -> bool:
    """Whether a ReduceMean reduces trailing dimensions (`axes`, [] for all) whose inferred sizes are known and hold a
    multiple of 4 values per row (`onnx_float.ort_reduce_mean_applies`)."""
    source = shapes.get(node.input[0])
    if not source or axes is None:
        return False
    reduced = sorted({a % len(source) for a in axes}) if axes else list(range(len(source)))
    sizes = [source[i] for i in reduced]
    return reduced == list(range(len(source) - len(reduced), len(source))) and \
        all(size is not None for size in sizes) and math.prod(s for s in sizes if s is not None) % 4 == 0


def _layer_norm_certified(inputs: list[str], attrs: dict[str, Any], shapes: dict[str, list[int | None]],
                          sizes: dict[str, int]) -> bool:
    """Whether onnxruntime's LayerNormalization of these inputs is computed bit for bit by the view: float32 rows
    whose inferred width `onnx_float.ort_layer_norm` reproduces, a scale and bias of one value per element, and a
    probe of that width and epsilon that agrees (`runtime_layer_norm_agrees`)."""
    shape = shapes.get(inputs[0])
    if not shape:
        return False
    tail = shape[int(attrs.get("axis", -1)) % len(shape):]
    if not tail or any(d is None or d <= 0 for d in tail):
        return False
    width = math.prod(d for d in tail if d is not None)
    operands = [name for name in inputs[1:] if name]
    if width % 8 or any(sizes.get(name, shapes.get(name) and math.prod(d or 0 for d in shapes[name])) != width
                        for name in operands):
        return False
    return runtime_layer_norm_agrees(width, float(attrs.get("epsilon", 1e-5)), len(operands) > 1)


# elementwise float ops `onnx_float` computes as onnxruntime's CPU kernels do, certified per process by a probe
RUNTIME_PROBED = frozenset({"Tanh", "Sigmoid", "Erf"})


def _one_node(op_type: str, inputs: dict[str, torch.Tensor], constants: dict[str, torch.Tensor],
              domain: str = "", names: list[str] | None = None, opset: int = 17, shapes_known: bool = True,
              **attrs: Any) -> torch.Tensor | None:
    """The installed onnxruntime's output of one `op_type` node (of `domain`: com.microsoft for its own kernels; CPU
    provider, default optimizations) on float32 `inputs` and `constants` (initializers), in the order given (or as
    `names` lists them, "" for an optional input left out); None without onnxruntime or where it fails.
    `shapes_known=False`: the inputs' shapes are not declared (a layout optimization that needs them stays off)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    graph = helper.make_graph(
        [helper.make_node(op_type, names if names is not None else [*inputs, *constants], ["y"], domain=domain or None,
                          **attrs)], "probe",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(t.shape) if shapes_known else None)
         for name, t in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(t.numpy(), name) for name, t in constants.items()])
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {name: t.numpy() for name, t in inputs.items()})[0])
    except Exception:  # noqa: BLE001 - no probe, no claim: the node stays named
        return None


def _same_bits(theirs: torch.Tensor | None, ours: torch.Tensor) -> bool:
    return theirs is not None and bool(torch.equal(theirs.view(torch.int32), ours.view(torch.int32)))


@functools.cache
def runtime_quick_gelu_agrees() -> bool:
    """Whether the installed onnxruntime's QuickGelu (com.microsoft: x * sigmoid(alpha x), which it fuses from a
    SiLU's or a QuickGELU's Sigmoid and Mul) equals `onnx_float.ort_quick_gelu` bit for bit, for alpha 1, 1.702 and
    0.5, on a dense sweep of -40..40 (where MLAS's logistic passes 1) and six decades of magnitudes; False without
    onnxruntime."""
    x = torch.cat([torch.linspace(-40.0, 40.0, 400_001), torch.logspace(-6, 6, 2_001), -torch.logspace(-6, 6, 2_001)])
    for alpha in (1.0, 1.702, 0.5):
        ours = onnx_float.ort_quick_gelu(alpha)(x)
        if not _same_bits(_one_node("QuickGelu", {"x": x}, {}, domain="com.microsoft", alpha=alpha), ours):
            return False
    return True


@functools.cache
def runtime_hard_activation_agrees(op_type: str, alpha: float, beta: float) -> bool:
    """Whether the installed onnxruntime's HardSigmoid (of these `alpha` and `beta`) or HardSwish equals `onnx_float`'s
    bit for bit (x alpha, + beta, clamped to [0, 1], each a float32 step; HardSwish: x times that at alpha 1/6, beta
    1/2) on a dense sweep of -12..12, six decades of magnitudes, zeros and infinities; False without onnxruntime."""
    magnitudes = torch.logspace(-6, 6, 4_001)
    x = torch.cat([torch.linspace(-12.0, 12.0, 200_001), magnitudes, -magnitudes,
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf")])])
    attrs: dict[str, Any] = {"alpha": alpha, "beta": beta} if op_type == "HardSigmoid" else {}
    function = onnx_float.function(op_type, attrs, 17)
    assert function is not None
    return _same_bits(_one_node(op_type, {"x": x}, {}, **attrs), function(x))


@functools.cache
def runtime_reduce_mean_agrees() -> bool:
    """Whether the installed onnxruntime's ReduceMean over trailing dimensions of a multiple of 4 values per row equals
    `onnx_float.ort_reduce_mean` bit for bit on a probe: rows of 4 to 196 values (one packet, pairs of packets, an
    odd last packet, 4000 values), magnitudes over six decades, one and several rows, every dimension at once;
    False without onnxruntime."""
    generator = torch.Generator().manual_seed(2)
    for shape, axes in (((2, 8, 2, 2), [2, 3]), ((3, 16, 8, 8), [2, 3]), ((2, 5, 12), [2]), ((4, 40), [1]),
                        ((2, 6, 4, 5), [2, 3]), ((1, 7, 14, 14), [2, 3]), ((1, 4000), [1]), ((4, 40), [0, 1])):
        x = torch.randn(shape, generator=generator) * torch.logspace(-3, 3, shape[1]).reshape(
            1, -1, *([1] * (len(shape) - 2)))
        theirs = _one_node("ReduceMean", {"x": x}, {}, shapes_known=False, keepdims=1, axes=axes)
        if not _same_bits(theirs, onnx_float.ort_reduce_mean(x, tuple(axes), True)):
            return False
    return True


@functools.cache
def runtime_batch_norm_agrees() -> bool:
    """Whether the installed onnxruntime's BatchNormalization (inference) equals `onnx_float`'s bit for bit on a
    probe: 1-d to 3-d inputs and a [N, C] one, magnitudes over four decades, variances from 0.01 to 3, two epsilons;
    False without onnxruntime."""
    generator = torch.Generator().manual_seed(1)
    for shape, eps in (((2, 8, 5, 5), 1e-5), ((3, 16, 7, 7), 1e-3), ((2, 5, 9), 1e-5), ((2, 4, 3, 5, 7), 1e-5),
                       ((4, 32), 1e-5)):
        channels = shape[1]
        x = torch.randn(shape, generator=generator) * torch.logspace(-2, 2, channels).reshape(
            1, -1, *([1] * (len(shape) - 2)))
        scale, bias, mean = (torch.randn(channels, generator=generator) for _ in range(3))
        var = torch.rand(channels, generator=generator) * 3 + 0.01
        fn = onnx_float.function("BatchNormalization", {"epsilon": eps}, 17)
        assert fn is not None
        constants = {"scale": scale, "bias": bias, "mean": mean, "var": var}
        theirs = _one_node("BatchNormalization", {"x": x}, constants, shapes_known=False, epsilon=eps)
        if not _same_bits(theirs, fn(x, scale, bias, mean, var)):
            return False
    return True


@functools.cache
def runtime_global_pool_agrees() -> bool:
    """Whether the installed onnxruntime's float GlobalAveragePool equals `OrtGlobalAveragePool` bit for bit on a
    probe: 1-d, 2-d and 3-d inputs of 1 to 3136 values per channel (whole lanes and remainders), magnitudes over six
    decades per channel, both signs; False without onnxruntime. Shapes undeclared: onnxruntime runs its NCHWc
    kernel, which sums otherwise, where it knows the channels (a model's node is certified where its optimized
    graph keeps the plain kernel: `_reproduced`)."""
    generator = torch.Generator().manual_seed(0)
    pool = OrtGlobalAveragePool()
    for shape in ((2, 8, 1, 1), (2, 8, 3), (2, 8, 7, 7), (3, 16, 2, 2), (2, 5, 13, 11), (1, 16, 56, 56),
                  (2, 4, 3, 5, 7)):
        x = torch.randn(shape, generator=generator) * torch.logspace(-3, 3, shape[1]).reshape(
            1, -1, *([1] * (len(shape) - 2)))
        if not _same_bits(_one_node("GlobalAveragePool", {"x": x}, {}, shapes_known=False), pool(x)):
            return False
    return True


@functools.cache
def runtime_op_agrees(op_type: str) -> bool:
    """Whether the installed onnxruntime's elementwise `op_type` equals `onnx_float`'s bit for bit on a probe (a
    dense sweep of -12..12, six decades of magnitudes of both signs, zeros, infinities); False without
    onnxruntime."""
    magnitudes = torch.logspace(-6, 6, 20_001)
    x = torch.cat([torch.linspace(-12.0, 12.0, 200_001), magnitudes, -magnitudes,
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf")])])
    function = onnx_float.function(op_type, {}, 17)
    assert function is not None
    return _same_bits(_one_node(op_type, {"x": x}, {}), function(x))


@functools.cache
def runtime_gelu_op_agrees(approximate: str) -> bool:
    """Whether the installed onnxruntime's ONNX Gelu (opset 20) with this `approximate` equals `onnx_float`'s bit for
    bit on a probe (a dense sweep of -12..12 and random values); False without onnxruntime."""
    generator = torch.Generator().manual_seed(32)
    x = torch.cat([torch.linspace(-12.0, 12.0, 96_000), torch.randn(32_000, generator=generator) * 4]).view(-1, 128)
    function = onnx_float.function("Gelu", {"approximate": approximate}, 20)
    assert function is not None
    return _same_bits(_one_node("Gelu", {"x": x}, {}, opset=20, approximate=approximate), function(x))


@functools.cache
def runtime_gelu_agrees(kernel: str, bias: bool) -> bool:
    """Whether the installed onnxruntime's `kernel` (FastGelu, Gelu or BiasGelu of com.microsoft) equals
    `onnx_float.ORT_GELUS[kernel]` bit for bit on a probe (a dense sweep of -12..12 and random values, with a bias
    or without); False without onnxruntime."""
    generator = torch.Generator().manual_seed(26)
    x = torch.cat([torch.linspace(-12.0, 12.0, 96_000), torch.randn(32_000, generator=generator) * 4]).view(-1, 128)
    b = torch.randn(128, generator=generator)
    theirs = _one_node(kernel, {"x": x}, {"b": b} if bias else {}, domain="com.microsoft")
    return _same_bits(theirs, onnx_float.ORT_GELUS[kernel](x, b if bias else None))


@functools.cache
def runtime_softmax_agrees() -> bool:
    """Whether the installed onnxruntime's float Softmax (last axis) equals `onnx_float`'s bit for bit on probes of
    widths 1 to 768 (the 16 lanes' tails), spreads up to 300 (the exponentials' subnormals and lower clamp), an
    infinity; False without onnxruntime."""
    generator = torch.Generator().manual_seed(24)
    softmax = onnx_float.function("Softmax", {"axis": -1}, 17)
    assert softmax is not None
    for d in (1, 5, 16, 17, 48, 100, 768):
        x = torch.randn(128, d, generator=generator) * torch.logspace(-2, 2.5, 128).unsqueeze(1)
        x[0, 0] = float("-inf")
        if not _same_bits(_one_node("Softmax", {"x": x}, {}, axis=-1), softmax(x)):
            return False
    return True


def _matmul_reproduced(node: Any, shapes: dict[str, list[int | None]], sizes: dict[str, int],
                       kernels: dict[str, tuple[str, list[tuple[int, bool] | None]]] | None) -> bool:
    """A float MatMul onnxruntime runs as such (not fused into another kernel), of matrices whose shapes
    `onnx_float.ort_matmul_applies` to whatever the batch (inferred; a dimension the batch may make 1 does not
    qualify), on which the probe agrees."""
    if kernels is None or not node.name or kernels.get(node.name, ("",))[0] != "MatMul":
        return False
    constant_b = node.input[1] in sizes
    a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
    if not a or not b or len(a) < 2 or len(b) < 2:
        return False
    m, k, n = a[-2], a[-1], b[-1]
    if not constant_b and (k is None or k > onnx_float.ORT_MATMUL_BLOCK or m is None or m < 2 or n is None or n < 2):
        return False
    return runtime_matmul_agrees(constant_b)


@functools.cache
def runtime_matmul_agrees(constant_b: bool) -> bool:
    """Whether the installed onnxruntime's float MatMul equals `onnx_float`'s bit for bit on probes of the shapes it
    is used for (with a constant B: one row, k past two blocks; else k up to 256, batched); False without
    onnxruntime."""
    generator = torch.Generator().manual_seed(22)
    cases = [((1, 40), (40, 8)), ((12, 600), (600, 16)), ((20, 256), (256, 3))] if constant_b else \
        [((12, 8), (8, 12)), ((2, 3, 16, 64), (2, 3, 64, 16)), ((5, 256), (256, 2))]
    matmul = onnx_float.function("MatMul", {"_constant_b": constant_b}, 17)
    assert matmul is not None
    for a_shape, b_shape in cases:
        a, b = torch.randn(a_shape, generator=generator), torch.randn(b_shape, generator=generator)
        theirs = _one_node("MatMul", {"a": a}, {"b": b}) if constant_b else _one_node("MatMul", {"a": a, "b": b}, {})
        if not _same_bits(theirs, matmul(a, b)):
            return False
    return True


@functools.cache
def runtime_fused_matmul_agrees(alpha: float, trans_b: bool) -> bool:
    """Whether the installed onnxruntime's FusedMatMul (com.microsoft) with this alpha equals
    `onnx_float.ort_fused_matmul`'s bit for bit on probes of the shapes it is used for (k up to 256, two rows and
    columns or more, batched); False without onnxruntime."""
    generator = torch.Generator().manual_seed(28)
    fused = onnx_float.ort_fused_matmul(alpha, trans_b)
    for a_shape, b_shape in (((12, 8), (8, 12)), ((2, 3, 16, 64), (2, 3, 64, 16)), ((5, 256), (256, 2))):
        a, b = torch.randn(a_shape, generator=generator), torch.randn(b_shape, generator=generator)
        if trans_b:
            b = b.transpose(-1, -2).contiguous()
        theirs = _one_node("FusedMatMul", {"a": a, "b": b}, {}, domain="com.microsoft", alpha=alpha,
                           transB=int(trans_b))
        if not _same_bits(theirs, fused(a, b)):
            return False
    return True


@functools.cache
def runtime_skip_layer_norm_agrees(beta: bool, bias: bool) -> bool:
    """Whether the installed onnxruntime's SkipLayerNormalization (com.microsoft) equals
    `onnx_float.ort_skip_layer_norm`'s bit for bit on a probe (widths 8, 100 and 768, rows of six decades of spread
    and offsets, a skip of the input's shape); False without onnxruntime."""
    generator = torch.Generator().manual_seed(31)
    for width in (8, 100, 768):
        x = torch.randn(2, 24, width, generator=generator) * torch.logspace(-3, 3, 24).view(1, 24, 1)
        skip = torch.randn(2, 24, width, generator=generator) + 50.0
        gamma, beta_value, bias_value = (torch.randn(width, generator=generator) for _ in range(3))
        names = ["x", "skip", "gamma", "beta" if beta else "", "bias" if bias else ""]
        while not names[-1]:
            names.pop()
        constants = {n: t for n, t in (("gamma", gamma), ("beta", beta_value), ("bias", bias_value)) if n in names}
        theirs = _one_node("SkipLayerNormalization", {"x": x, "skip": skip}, constants, domain="com.microsoft",
                           names=names, epsilon=1e-12)
        ours = onnx_float.ort_skip_layer_norm(1e-12)(x, skip, gamma, beta_value if beta else None,
                                                     bias_value if bias else None)
        if not _same_bits(theirs, ours):
            return False
    return True


@functools.cache
def runtime_layer_norm_agrees(width: int, eps: float, bias: bool) -> bool:
    """Whether the installed onnxruntime's LayerNormalization of rows of this width (a multiple of 8) equals
    `onnx_float`'s bit for bit on a probe (rows spread over six decades, offsets far larger than their spread, a
    constant row); False without onnxruntime. Its kernel's summation is the CPU's (8 lanes where measured): a
    runtime built otherwise gets no claim."""
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(64, width, generator=generator) * torch.logspace(-3, 3, 64).unsqueeze(1)
    x[:16] += torch.randn(16, 1, generator=generator) * 1e3
    x[16] = 0.75
    operands = {name: torch.randn(width, generator=generator) for name in ("s", "b")[:2 if bias else 1]}
    layer_norm = onnx_float.function("LayerNormalization", {"axis": -1, "epsilon": eps}, 17)
    assert layer_norm is not None
    theirs = _one_node("LayerNormalization", {"x": x}, operands, axis=-1, epsilon=eps)
    return _same_bits(theirs, layer_norm(x, *operands.values()))


def load(model: Any) -> Any:
    """A ModelProto from a ModelProto or the path of an .onnx file."""
    import onnx

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        path = os.fspath(model)
        try:
            return onnx.load(path)
        except OSError:
            raise
        except Exception as exc:  # protobuf's DecodeError and kin: the file is no ONNX model
            raise DeployedFormatError(f"onnx: {path!r} is not a readable ONNX model: {exc}") from exc
    from onnx.external_data_helper import uses_external_data

    unloaded = [t.name for t in model.graph.initializer if uses_external_data(t)]
    if unloaded:  # the reader and the load check read every initializer's values
        raise DeployedFormatError(
            f"onnx: the ModelProto holds {len(unloaded)} initializer(s) as external data it did not load (e.g. "
            f"{unloaded[0]!r}): pass the model's path, or onnx.load(path) with load_external_data=True")
    return model


def fixed_batch(proto: Any) -> tuple[int, list[tuple[str, list[int | None]]]] | None:
    """The batch size the graph's inputs declare when every one fixes its first dimension to one size (a model
    exported without a dynamic batch axis: onnxruntime then runs exactly that many images per call), with each
    input's declared shape; None when the batch dimension is symbolic."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [(i.name, [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim])
              for i in proto.graph.input if i.name not in initializers]
    sizes = {shape[0] if shape else None for _, shape in inputs}
    if not inputs or len(sizes) != 1 or None in sizes:
        return None
    (size,) = sizes
    return (size, inputs) if size else None


def onnxruntime_runner(model: Any) -> Any:
    """A function running the ONNX model on onnxruntime's CPU provider (default optimizations) on a batch of float
    inputs, returning its outputs as tensors; None without onnxruntime. A graph that fixes its batch size is run
    that many images at a time, as it is deployed, and the outputs joined."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    proto = load(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    initializers = {i.name for i in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]

    fixed = fixed_batch(proto)

    def run(x: Any) -> list[torch.Tensor]:
        tensors = x.tensors if hasattr(x, "tensors") else (x,)
        step = fixed[0] if fixed is not None else len(tensors[0])
        if len(tensors[0]) % step:
            raise ValueError(f"the graph runs {step} images at a time, not {len(tensors[0])}")
        parts = [session.run(None, {name: t[start:start + step].detach().cpu().numpy()
                                    for name, t in zip(names, tensors)})
                 for start in range(0, len(tensors[0]), step)]
        return [torch.cat([torch.from_numpy(part[i]) for part in parts]) for i in range(len(parts[0]))]

    return run


def _check_fixed_batch(proto: Any, module: nn.Module, calibration_data: Any) -> str | None:
    """Where the graph fixes its batch size: a note, or DeployedFormatError naming the inputs and the export option
    (`deployed.check_fixed_batch`)."""
    fixed = fixed_batch(proto)
    if fixed is None:
        return None
    size, inputs = fixed
    return check_fixed_batch(
        "onnx", size, "inputs " + ", ".join(f"{name!r} {shape}" for name, shape in inputs), module, calibration_data,
        runtime=f"onnxruntime runs it {size} image(s) at a time, so the load check against it does too",
        fix="export the model with a dynamic batch dimension, e.g. torch.onnx.export(..., dynamic_axes={'x': {0: "
            "'batch'}, 'logits': {0: 'batch'}}) with your input and output names, before quantizing it")


def read_onnx(model: Any, calibration_data: Any, batch_size: int, device: torch.device | str) -> Deployed:
    """Read an ONNX QDQ model (a ModelProto or an .onnx path) into the engine's form (see the module docstring).
    The model is called like the torch model it came from: its graph inputs, as float tensors."""
    from .onnx_qoperator import is_qoperator, to_qdq

    proto = load(model)
    qoperator = is_qoperator(proto)
    if qoperator:  # the integer kernels as nodes: read as the QDQ groups onnxruntime fuses into those kernels
        try:
            proto = to_qdq(proto)
        except ValueError as exc:
            raise DeployedFormatError(f"onnx (QOperator): {exc}") from None
    runtime = _runtime_graph(proto)
    kernels, runtime_grids, fused = (None, None, None) if runtime is None else runtime
    exact = _Builder(proto, kernels, exact=True, runtime_grids=runtime_grids, fused=fused)
    module = exact.build()
    float_builder = _Builder(proto, kernels, exact=False)
    float_module = float_builder.build()
    if not exact.layers:
        raise DeployedFormatError("onnx: the model has no quantized Conv/Gemm/MatMul (DequantizeLinear of an int8 "
                                  "weight, output QuantizeLinear; or a dynamically quantized MatMulInteger): is it a "
                                  "QDQ model?")
    notes = list(exact.notes)
    fixed = _check_fixed_batch(proto, module, calibration_data)
    if fixed is not None:
        notes.append(fixed)
    dynamic = [name for name, layer in exact.layers.items() if layer.raw_output]
    if dynamic:
        kinds = " or ".join(sorted({"Conv" if isinstance(module.get_submodule(name), nn.modules.conv._ConvNd)
                                    else "MatMul" for name in dynamic}))
        notes.append(f"dynamic quantization ({len(dynamic)} {kinds} layer(s), e.g. {dynamic[0]!r}): each quantizes "
                     "its input on the range of that image alone, as the model computes when it runs one input at a "
                     "time (at a larger batch onnxruntime's range is the batch's, so an image's result would depend "
                     "on the others); no act site (their results stay float)")
    if exact.float_run:
        shown = ", ".join(repr(name) for name in exact.float_run[:3]) + (", ..." if len(exact.float_run) > 3 else "")
        notes.append(f"{len(exact.float_run)} quantized layer(s) onnxruntime's optimizer leaves as float ops on the "
                     f"dequantized values ({shown}): their float32 products and sums round, where the engine "
                     "computes the exact integer sum, so an output near a half code may be one code apart from "
                     "onnxruntime's")
    if exact.merged_qdq:
        shown = ", ".join(repr(name) for name in exact.merged_qdq[:3]) + (", ..." if len(exact.merged_qdq) > 3 else "")
        notes.append(f"onnxruntime's optimizer merges {len(exact.merged_qdq)} QuantizeLinear -> DequantizeLinear "
                     f"pair(s) with the pair before them into one on a new grid (its DoubleQDQPairsRemover; {shown}): "
                     "the view quantizes to that grid, as onnxruntime computes it, not to the graph's two")
    for what, kernels_of in (("GELU(s)", onnx_float.ORT_GELUS),
                             ("SiLU(s) or QuickGELU(s), x * sigmoid(alpha x),", ("QuickGelu",)),
                             ("MatMul(s) and the scalings around them", ("FusedMatMul",)),
                             ("residual Add(s) and the LayerNormalization after each", ("SkipLayerNormalization",)),
                             ("LayerNorm(s) exported as ReduceMean, Sub, Pow, Sqrt, Div, ...",
                              ("LayerNormalization",))):
        followed = [(name, kernel) for name, kernel in exact.followed if kernel in kernels_of]
        if followed:
            names = " / ".join(sorted({kernel for _, kernel in followed}))
            notes.append(f"onnxruntime fuses {len(followed)} {what} into its {names} kernel (ending at "
                         f"{followed[0][0]!r}{', ...' if len(followed) > 1 else ''}): the view computes that "
                         "kernel's arithmetic, checked against the installed onnxruntime" +
                         (" (where the shapes are the ones measured: those whose shapes cannot be inferred are named "
                          "below)" if any(kernel in exact.uncertified for _, kernel in followed) else ""))
    counts: dict[str, int] = {}
    float_nodes = [n for n in exact.float_nodes if n.name not in exact.inside_followed]
    for op_type in [*(node.op_type for node in _float_valued(proto, float_nodes, kernels)), *exact.uncertified]:
        counts[op_type] = counts.get(op_type, 0) + 1
    if counts:
        notes.append("float ops outside the fault sites not certified as onnxruntime computes them (run on torch's "
                     "float kernels, or on the view's copy of onnxruntime's kernel where their shapes could not be "
                     "inferred), which may round otherwise than onnxruntime's by an ulp: "
                     + ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())))
    integer = [(kernels[n.name][0], n.name) for n in exact.float_nodes
               if kernels is not None and n.name in kernels and kernels[n.name][0].startswith(("QLinear", "QGemm"))]
    if integer:
        notes.append("onnxruntime runs these nodes as integer kernels the reader does not reproduce; the view computes "
                     "them in float on the dequantized values (outside the fault sites, their MACs counted as "
                     "unfaulted): " + _by_kernel(integer))
    if exact.disagreeing:
        notes.append("the installed onnxruntime's integer kernels disagree with the view's arithmetic for these nodes "
                     "(a probe of each node's own scales and zero points on every code pair, or on rows and images of "
                     "codes): their outputs may be a code apart from onnxruntime's: " + _by_kernel(exact.disagreeing))
    if exact.unprobed:
        notes.append("the installed onnxruntime could not run a probe of these nodes' kernels on their own grids (it "
                     "refused the one-node model, its operands' types differ, or a scale is not positive): computed "
                     "as measured on other grids, not certified: " + _by_kernel(exact.unprobed))
    if qoperator:
        notes.append("QOperator format (QLinearConv, QGemm, ... as nodes): read as the equivalent QDQ graph, whose "
                     "groups onnxruntime fuses into the same integer kernels")
    if kernels is None:
        notes.append("onnxruntime is not installed: every fusible QDQ group is taken as onnxruntime's integer "
                     "kernel (QLinearAdd, QLinearGlobalAveragePool, QLinearAveragePool)")
    notes.append("the float baseline is the float function of the QDQ model (dequantized weights, activations "
                 "clamped to their quantized range but not rounded), not the float model it came from")
    inexact = [*exact.float_run, *exact.float_run_wide, *counts, *(name for _, name in integer),
               *(name for _, name in exact.disagreeing), *(name for _, name in exact.unprobed)]
    return Deployed(module.to(device), exact.layers, "onnx", float_module=float_module.to(device), notes=notes,
                    inexact=inexact)
