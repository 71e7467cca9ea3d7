"""Per-node probes of the integer kernels the ONNX reader reproduces from their arithmetic (QLinearAdd, QLinearMul,
QLinearMatMul of two activations, QLinearSoftmax): each node's own scales and zero points are run through the
installed onnxruntime, on every pair of codes (every row of a spread of codes, for the softmax), and compared with
the view's module code for code.

Why per node: the arithmetic was measured on one onnxruntime build and CPU (1.32, AVX-512). Another build may
compile it otherwise (QLinearAdd's fused multiply-add is GCC's contraction, not in the source) or run another
instruction set's path, and a ratio or a tie rounds differently only for some scales. The load check against
onnxruntime on the calibration images sees the model as a whole, on those images; a probe sees each kernel on
every input it can take. Where one disagrees, the reader names the node (`onnx_reader.read_onnx`'s notes).

Pure functions of the module's parameters, cached per process (a model repeats the same grids).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

MS_DOMAIN = "com.microsoft"


Node = tuple[str, list[str], str, str, dict[str, Any]]  # op type, inputs, output, domain, attributes


def _run(nodes: list[Node], feeds: dict[str, np.ndarray],
         initializers: dict[str, np.ndarray], out_zero: str) -> list[np.ndarray] | None:
    """The outputs of a graph of `nodes` (op type, inputs, output, domain, attributes), each of the type of the
    initializer `out_zero` (the output zero point), on the installed onnxruntime's CPU provider; None without
    onnxruntime or where it fails (no probe: no claim)."""
    try:
        import onnxruntime as ort
        from onnx import helper, numpy_helper
        from onnx.helper import np_dtype_to_tensor_dtype
    except ImportError:
        return None
    graph = helper.make_graph(
        [helper.make_node(op, inputs, [out], domain=domain or None, **attrs) for op, inputs, out, domain, attrs
         in nodes], "probe",
        [helper.make_tensor_value_info(name, np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
         for name, a in feeds.items()],
        [helper.make_tensor_value_info(out, np_dtype_to_tensor_dtype(initializers[out_zero].dtype), None)
         for _, _, out, _, _ in nodes],
        [numpy_helper.from_array(a, name) for name, a in initializers.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)]
    try:
        model = helper.make_model(graph, opset_imports=opsets)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return list(session.run(None, feeds))
    except Exception:  # noqa: BLE001 - onnxruntime refused the probe: the node stays uncertified
        return None


def _as_values(codes: np.ndarray, scale: float, zero: int) -> torch.Tensor:
    """The view's input values (code - zero) x scale of stored codes."""
    from .deployed import code_values

    return code_values(torch.from_numpy(codes.astype(np.int64)), scale, zero)


def _agree(theirs: np.ndarray, ours: torch.Tensor, scale: float, zero: int) -> bool:
    """Whether onnxruntime's output codes, as values (code - zero) x scale, equal the module's output values (a NaN
    where the other holds a NaN: the zero point's value on a degenerate, infinite-scale grid)."""
    values = _as_values(theirs, scale, zero)
    return values.shape == ours.shape and bool(((values == ours) | (values.isnan() & ours.isnan())).all())


def _grids_valid(*grids: tuple[float, int]) -> bool:
    """Positive scales, finite or not (a degenerate grid of an infinite scale is probed as onnxruntime runs it)."""
    return all(scale > 0 for scale, _ in grids)


def _qparams(names: str, grids: list[tuple[float, int, bool]]) -> dict[str, np.ndarray]:
    """Initializers s<name>, z<name> of each grid (scale, zero point, signed)."""
    out = {}
    for name, (scale, zero, signed) in zip(names, grids):
        out[f"s{name}"] = np.array(scale, np.float32)
        out[f"z{name}"] = np.array(zero, np.int8 if signed else np.uint8)
    return out


def _random_codes(generator: np.random.Generator, shape: tuple[int, ...], signed: bool, spread: int) -> np.ndarray:
    """Codes around a random centre, within `spread` of it (every code at 256)."""
    low = -128 if signed else 0
    centre = int(generator.integers(low, low + 256))
    codes = centre + generator.integers(-(spread // 2), spread // 2 + 1, size=shape)
    return np.clip(codes, low, low + 255).astype(np.int8 if signed else np.uint8)


# -- QLinearAdd, QLinearMul: every code pair, in the broadcast layouts that choose the kernel's operand order -------
def _pair_layouts(signed: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(A codes, B codes) holding every pair of codes: same shapes; B along A's rows; A one value per row of B
    (onnxruntime then hands A to the kernel as the scalar operand); A one value."""
    codes = np.arange(-128, 128).astype(np.int8) if signed else np.arange(256).astype(np.uint8)
    rows = np.repeat(codes, 256).reshape(256, 256)  # rows[i, j] = codes[i]
    grid = np.tile(codes, 256).reshape(256, 256)  # grid[i, j] = codes[j]
    return [(rows.reshape(-1), grid.reshape(-1)), (rows, codes), (codes.reshape(256, 1), grid),
            (codes[100:101].copy(), codes)]


@functools.cache
def binary_agrees(op_type: str, a: tuple[float, int], b: tuple[float, int], c: tuple[float, int],
                  signed: bool) -> bool | None:
    """Whether the installed onnxruntime's `op_type` (QLinearAdd or QLinearMul) on codes of these grids (scale and
    the kernel's zero point; int8 codes if `signed`, else uint8) gives the view's codes (`onnx_reader.QLinearAdd`,
    `QLinearMul`) on every pair of codes, whichever operand its broadcast hands over as the scalar one; None (no
    probe) without onnxruntime, where it refuses the probe, or with a scale that is not positive."""
    from .onnx_reader import QLinearAdd, QLinearMul

    if not _grids_valid(a, b, c):
        return None
    module = (QLinearAdd if op_type == "QLinearAdd" else QLinearMul)(a, b, c, signed)
    layouts = _pair_layouts(signed)
    feeds = {name: codes for k, (x, y) in enumerate(layouts) for name, codes in ((f"a{k}", x), (f"b{k}", y))}
    nodes: list[Node] = [(op_type, [f"a{k}", "sa", "za", f"b{k}", "sb", "zb", "sc", "zc"], f"y{k}", MS_DOMAIN, {})
                         for k in range(len(layouts))]
    outputs = _run(nodes, feeds, _qparams("abc", [(*a, signed), (*b, signed), (*c, signed)]), "zc")
    return None if outputs is None else all(
        _agree(theirs, module(_as_values(x, *a), _as_values(y, *b)), *c) for (x, y), theirs in zip(layouts, outputs))


# -- QLinearMatMul of two activations: random matrices, every code -------------------------------------------------
MATMUL_SHAPES = ((64, 64, 64, 256), (16, 768, 16, 256), (64, 32, 64, 8), (8, 3, 300, 256))  # m, k, n, code spread


@functools.cache
def matmul_agrees(a: tuple[float, int, bool], b: tuple[float, int, bool], y: tuple[float, int, bool],
                  relu: bool) -> bool | None:
    """Whether the installed onnxruntime's QLinearMatMul of codes on these grids (scale, zero point, signed) gives
    the view's codes (`onnx_reader.QLinearMatMul`; with `relu`, the codes clamped at the zero point) on random
    matrices of depths 3 to 768, wide and narrow spreads of codes; None (no probe) without onnxruntime, where it
    refuses the probe, or with a scale that is not positive."""
    from .onnx_reader import QLinearMatMul

    if not _grids_valid(a[:2], b[:2], y[:2]):
        return None
    module = QLinearMatMul(a[:2], b[:2], y[:2], y[2], relu)
    generator = np.random.default_rng(35)
    feeds = {}
    for k, (m, depth, n, spread) in enumerate(MATMUL_SHAPES):
        feeds[f"a{k}"] = _random_codes(generator, (m, depth), a[2], spread)
        feeds[f"b{k}"] = _random_codes(generator, (depth, n), b[2], spread)
    nodes: list[Node] = [("QLinearMatMul", [f"a{k}", "sa", "za", f"b{k}", "sb", "zb", "sy", "zy"], f"y{k}", "", {})
                         for k in range(len(MATMUL_SHAPES))]
    outputs = _run(nodes, feeds, _qparams("aby", [a, b, y]), "zy")
    if outputs is None:
        return None
    for k, theirs in enumerate(outputs):
        if relu:  # the ReLU between the product and its QuantizeLinear: codes clamped at the zero point
            theirs = np.maximum(theirs, theirs.dtype.type(y[1]))
        if not _agree(theirs, module(_as_values(feeds[f"a{k}"], *a[:2]), _as_values(feeds[f"b{k}"], *b[:2])),
                      *y[:2]):
            return False
    return True


# -- QLinearSoftmax: rows of codes of every spread, at the node's reduced size ---------------------------------------
SOFTMAX_WIDTHS = (3, 16, 64, 128)  # probed for every node, with the node's own reduced size where it is inferred


@functools.cache
def softmax_agrees(x: tuple[float, int], y: tuple[float, int], signed: bool, opset: int,
                   width: int | None = None) -> bool | None:
    """Whether the installed onnxruntime's QLinearSoftmax (its `opset` semantics) on codes of these grids gives the
    view's codes (`onnx_reader.QLinearSoftmax`) on rows of codes of spreads 1 to 256, of the node's reduced size
    `width` (where known) and `SOFTMAX_WIDTHS`; None (no probe) without onnxruntime,
    where it refuses the probe, or with a scale that is not positive."""
    from .onnx_reader import QLinearSoftmax

    if not _grids_valid(x, y):
        return None
    axis = -1 if opset >= 13 else 1
    module = QLinearSoftmax(x[0], y, signed, axis, opset)
    widths = sorted({*SOFTMAX_WIDTHS, *([width] if width else [])})
    generator = np.random.default_rng(36)
    feeds = {}
    for k, w in enumerate(widths):
        rows = max(70, 16384 // w)
        spreads = np.array([1, 2, 3, 8, 32, 128, 256])[np.arange(rows) % 7].reshape(-1, 1)
        low = -128 if signed else 0
        start = generator.integers(low, low + 256, size=(rows, 1))
        codes = start + (generator.random((rows, w)) * spreads).astype(np.int64)
        feeds[f"x{k}"] = np.clip(codes, low, low + 255).astype(np.int8 if signed else np.uint8)
    attrs = {"axis": axis, "opset": opset}
    nodes: list[Node] = [("QLinearSoftmax", [f"x{k}", "sx", "zx", "sy", "zy"], f"y{k}", MS_DOMAIN, attrs)
                         for k in range(len(widths))]
    outputs = _run(nodes, feeds, _qparams("xy", [(*x, signed), (*y, signed)]), "zy")
    return None if outputs is None else all(
        _agree(theirs, module(_as_values(feeds[f"x{k}"], *x)), *y) for k, theirs in enumerate(outputs))


# -- QLinearGlobalAveragePool, QLinearAveragePool: random images of codes -----------------------------------------
GLOBAL_POOL_SIZES = (1, 7, 8, 14)  # image sides probed for every node, with the node's own where it is inferred


@functools.cache
def global_pool_agrees(x: tuple[float, int], y: tuple[float, int], signed: bool,
                       side: int | None = None) -> bool | None:
    """Whether the installed onnxruntime's QLinearGlobalAveragePool (NCHW) on codes of these grids gives the view's
    codes (`onnx_reader.QLinearGlobalAvgPool`) on random images of sides `GLOBAL_POOL_SIZES` (and the node's
    `side` where it is known), wide and narrow spreads of codes; None (no probe) without onnxruntime, where it
    refuses the probe, or with a scale that is not positive."""
    from .onnx_reader import QLinearGlobalAvgPool

    if not _grids_valid(x, y):
        return None
    module = QLinearGlobalAvgPool(x, y, signed)
    generator = np.random.default_rng(37)
    sides = sorted({*GLOBAL_POOL_SIZES, *([side] if side else [])})
    feeds = {f"x{k}": _random_codes(generator, (2, 64, s, s), signed, spread)
             for k, (s, spread) in enumerate((s, spread) for s in sides for spread in (256, 8))}
    nodes: list[Node] = [("QLinearGlobalAveragePool", [name, "sx", "zx", "sy", "zy"], f"y{name}", MS_DOMAIN,
              {"channels_last": 0}) for name in feeds]
    outputs = _run(nodes, feeds, _qparams("xy", [(*x, signed), (*y, signed)]), "zy")
    return None if outputs is None else all(
        _agree(theirs, module(_as_values(codes, *x)), *y) for codes, theirs in zip(feeds.values(), outputs))


@functools.cache
def average_pool_agrees(x: tuple[float, int], y: tuple[float, int], signed: bool, kernel: tuple[int, int],
                        stride: tuple[int, int], pads: tuple[int, int, int, int], include_pad: bool) -> bool | None:
    """Whether the installed onnxruntime's QLinearAveragePool with this geometry, on codes of these grids, gives
    the view's codes (`onnx_reader.QLinearAvgPool`) on random images (wide and narrow spreads of codes); None (no
    probe) without onnxruntime, where it refuses the probe, or with a scale that is not positive."""
    from .onnx_reader import QLinearAvgPool

    if not _grids_valid(x, y):
        return None
    module = QLinearAvgPool(list(kernel), list(stride), list(pads), include_pad, y, signed)
    generator = np.random.default_rng(38)
    side = max(kernel) + 2 * max(stride) + 7
    feeds = {f"x{k}": _random_codes(generator, (2, 32, side, side + 1), signed, spread)
             for k, spread in enumerate((256, 8))}
    attrs = {"kernel_shape": list(kernel), "strides": list(stride), "pads": list(pads),
             "count_include_pad": int(include_pad)}
    nodes: list[Node] = [("QLinearAveragePool", [name, "sx", "zx", "sy", "zy"], f"y{name}", MS_DOMAIN, attrs)
                         for name in feeds]
    outputs = _run(nodes, feeds, _qparams("xy", [(*x, signed), (*y, signed)]), "zy")
    return None if outputs is None else all(
        _agree(theirs, module(_as_values(codes, *x)), *y) for codes, theirs in zip(feeds.values(), outputs))
