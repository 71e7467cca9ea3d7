"""Read a model quantized with torch.ao FX mode (`prepare_fx`/`convert_fx`) as its x86/fbgemm kernels compute it.

A `convert_fx` result is a GraphModule that quantizes its input with ``torch.quantize_per_tensor``, runs quantized
modules (torch.ao.nn.quantized(.intrinsic) Conv/Linear and their ReLU fusions), quantized functions
(``torch.ops.quantized.add``/``add_relu``/``mul``/``mul_relu``/``cat`` with their output scale and zero point),
float modules and functions on quantized tensors (ReLU, pooling, reshapes) and ``dequantize`` calls. On a private
copy, the graph is rewritten into the engine's form (see deployed.py), with the arithmetic measured against torch's
x86 kernels (as for the eager reader, ao.py):

- ``quantize_per_tensor`` -> `Requantize(divide=False)` (x times the float32 inverse scale, rounded half to even,
  plus the zero point); ``dequantize`` -> nothing;
- a quantized add/add_relu -> the float add of its operands as the kernel dequantizes them (`KernelDequantize`: one
  fused multiply-add, for operands with a zero point), re-gridded by `Requantize(divide=False)` (a fused ReLU clamps
  at the zero point); under the qnnpack engine, QNNPACK's fixed-point add (`QnnpackAddOperand`s, then
  `QnnpackAddRequantize`), as the eager reader's; a quantized cat -> float cat, then `Requantize(divide=False)`;
- a quantized mul/mul_relu -> the integer product of the operands' codes (`KernelCodes`) times the kernel's float32
  multiplier (`KernelProductRequantize`);
- an average pooling (module or function) on a quantized tensor -> `CodeAvgPool` (the mean of integer codes plus
  the zero point, rounded half to even);
- quantized conv/linear modules -> float twins (`ao.float_twin`) with their `DeployedLayer` (`ao.static_layer`);
  whether each layer's kernel is oneDNN's (output zero point added before rounding) or fbgemm's (after) is measured
  (`zero_point_before_rounding`), and the layer takes that kernel's float32 steps (`ao.kernel_scaling`); under the
  qnnpack engine, QNNPACK's integer bias and one float32 multiplier;
- an elementwise activation on a quantized tensor (a module, function, method or ``torch.ops.quantized`` op:
  ReLU6, Hardtanh, clamp, Hardswish, ELU, LeakyReLU, Sigmoid, ...) -> a `CodeTable` measured from torch's kernel
  (`ao.code_table`); a mean -> torch's kernel's own path (`code_mean`);
- ReLU, max pooling, reshapes, flatten, identities on quantized tensors keep values on their grid and run as they
  are; anything else that runs on a quantized tensor is refused (`DeployedFormatError`, naming the node).

Every re-gridding module is a `Requantize` or `CodeAvgPool` subclass, so the float function
(`deployed.float_function`) passes values through them. Measured against torch 2.x on an AVX512-VNNI CPU; residual:
torch's loops run a few elements at the end of each thread's chunk through a scalar path whose add dequantizes as
(q - zero point) x scale, which can move a near-tie there.

The grid of every quantized value (scale, zero point, signedness) is recorded by running the graph once on the
first calibration batch, on the CPU (torch's quantized kernels are CPU kernels).
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .ao import (
    _AVERAGING,
    KernelCodes,
    KernelDequantize,
    KernelProductRequantize,
    QnnpackAddOperand,
    QnnpackAddRequantize,
    _ao_types,
    channels_last_notes,
    code_table,
    float_channelwise,
    float_elementwise,
    float_twin,
    module_table,
    pair_saturation,
    pool_adds_zero_point_first,
    qnnpack_add,
    qnnpack_add_parameters,
    refuse_defective_kernel,
    saturation_notes,
    static_layer,
    weight_codes,
)
from .data import iter_batches
from .deployed import CodeAvgPool, Deployed, DeployedFormatError, DeployedLayer, Requantize

SOURCE = "torch.ao fx"

Grid = tuple[float, int, bool]  # scale, zero point, signed (qint8) codes


def _grid(value: Any, node: torch.fx.Node) -> Grid | None:
    """The grid of a quantized tensor, None for anything else; only 8-bit per-tensor grids are reproduced."""
    if not isinstance(value, torch.Tensor) or not value.is_quantized:
        return None
    if value.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric) or value.dtype not in (
            torch.quint8, torch.qint8):
        raise DeployedFormatError(f"{SOURCE}: node {node.name!r} ({_describe(node)}) gives a {value.dtype} "
                                  f"{value.qscheme()} tensor; only per-tensor quint8/qint8 activations are supported")
    return float(value.q_scale()), int(value.q_zero_point()), value.dtype == torch.qint8


def _range(signed: bool) -> tuple[int, int]:
    return (-128, 127) if signed else (0, 255)


def _describe(node: torch.fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and "quantized" in str(node.target):
        target = str(node.target)
    return f"{node.op} {target}"


Layout = tuple[int, "torch.memory_format | None"]  # a tensor's number of dimensions and memory format (None: other)


def _layout(value: torch.Tensor) -> Layout:
    rank = value.dim()
    formats = [torch.contiguous_format, *{4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(rank, [])]
    return rank, next((f for f in formats if value.is_contiguous(memory_format=f)), None)


def record_node_grids(work: torch.fx.GraphModule, calibration_data: Any, batch_size: int
                      ) -> tuple[dict[str, Grid], dict[str, bool], dict[str, Layout]]:
    """One forward pass of the graph on the first calibration batch: the grid of every node's quantized output,
    whether it is contiguous (NCHW: `ao.pool_adds_zero_point_first`), and its layout."""
    grids: dict[str, Grid] = {}
    contiguous: dict[str, bool] = {}
    layouts: dict[str, Layout] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            values = out if isinstance(out, (list, tuple)) else [out]
            for value in values:
                grid = _grid(value, n)
                if grid is not None:
                    grids.setdefault(n.name, grid)
                    contiguous.setdefault(n.name, pool_adds_zero_point_first(value))
                    layouts.setdefault(n.name, _layout(value))
                    break
            return out

    for x, _ in iter_batches(calibration_data, batch_size):
        inputs = x if isinstance(x, (list, tuple)) else (x,)
        with torch.no_grad():
            Recorder(work).run(*[t.to("cpu") if isinstance(t, torch.Tensor) else t for t in inputs])
        break
    else:
        raise ValueError("calibration_data is empty: give at least one batch of inputs")
    return grids, contiguous, layouts


class _FunctionCall(nn.Module):
    """A function call with its constant arguments, as a module: a functional pooling for `CodeAvgPool`, the float
    op of a `CodeTable`."""

    def __init__(self, function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.function, self.args, self.kwargs = function, args, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return f"{getattr(self.function, '__name__', self.function)}, args={self.args}, kwargs={self.kwargs}"


class _MethodCall(nn.Module):
    """A tensor method call with its constant arguments, as a module: the float op of a `CodeTable`."""

    def __init__(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.method, self.args, self.kwargs = method, args, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(x, self.method)(*self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return f"{self.method}, args={self.args}, kwargs={self.kwargs}"


class _LayoutMean(nn.Module):
    """A float32 mean computed in a given memory format (torch's sum over a channels-last tensor adds in another
    order than over a contiguous one)."""

    def __init__(self, dims: tuple[int, ...], keepdim: bool, layout: torch.memory_format) -> None:
        super().__init__()
        self.dims, self.keepdim, self.layout = dims, keepdim, layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == torch.contiguous_format or x.dim() == (4 if self.layout == torch.channels_last else 5):
            x = x.contiguous(memory_format=self.layout)  # the model's layout, whichever the view computes in
        return x.mean(self.dims, self.keepdim)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, keepdim={self.keepdim}, layout={self.layout}"


# the float ops of torch's quantized elementwise functions, called with the same arguments (their schemas' names)
def _float_hardswish(x: torch.Tensor, output_scale: float, output_zero_point: int) -> torch.Tensor:
    return F.hardswish(x)


def _float_elu(x: torch.Tensor, output_scale: float, output_zero_point: int, alpha: float = 1.0, scale: float = 1.0,
               input_scale: float = 1.0) -> torch.Tensor:
    return torch.ops.aten.elu(x, alpha, scale, input_scale)


def _float_leaky_relu(x: torch.Tensor, negative_slope: float, inplace: bool, output_scale: float,
                      output_zero_point: int) -> torch.Tensor:
    return F.leaky_relu(x, negative_slope, inplace)


def _float_sigmoid(x: torch.Tensor, output_scale: float, output_zero_point: int) -> torch.Tensor:
    return torch.sigmoid(x)


def _float_relu6(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return F.relu6(x, inplace)


def _float_celu(x: torch.Tensor, output_scale: float, output_zero_point: int, alpha: float = 1.0) -> torch.Tensor:
    return F.celu(x, alpha)


def _elementwise_functions() -> dict[Any, Any]:
    """Functions torch runs code by code on a quantized tensor (its output code a function of the input code alone),
    each with its float op (called with the same arguments): read as `CodeTable`s."""
    q = torch.ops.quantized
    same = (F.relu6, F.hardtanh, F.hardtanh_, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,
            F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.elu, F.celu, F.leaky_relu, F.gelu,
            F.threshold, torch.threshold)
    return {**{function: function for function in same}, q.hardswish: _float_hardswish, q.elu: _float_elu,
            q.leaky_relu: _float_leaky_relu, q.sigmoid: _float_sigmoid, q.relu6: _float_relu6, q.celu: _float_celu,
            q.threshold: F.threshold, q.clamp: torch.clamp}


_ELEMENTWISE_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_", "clamp_min",
                        "clamp_min_", "clamp_max", "clamp_max_"}


_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                   F.adaptive_avg_pool3d, torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d,
                   torch._C._nn.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool3d, torch.avg_pool1d,
                   torch.adaptive_avg_pool1d}

# ops that keep a quantized tensor on its grid (checked: their output has their input's grid)
_KEEP_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_KEEP_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
                   torch.relu, F.relu, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout, torch.chunk, torch.split,
                   F.pixel_shuffle, F.pixel_unshuffle, torch.pixel_shuffle, torch.pixel_unshuffle,
                   operator.getitem, getattr, torch.nn.functional.max_pool2d_with_indices}
_KEEP_METHODS = {"relu", "relu_", "flatten", "reshape", "view", "permute", "transpose", "contiguous", "squeeze",
                 "unsqueeze", "size", "dim", "chunk", "split", "max_pool2d"}
_SHAPE_ONLY = {"size", "dim"}


def _regridding_ops() -> dict[Any, tuple[Any, bool]]:
    """Quantized adds with an output scale and zero point: (float op, fused ReLU)."""
    q = torch.ops.quantized
    ops: dict[Any, tuple[Any, bool]] = {q.add: (torch.add, False), q.add_relu: (torch.add, True)}
    return ops


SUPPORTED = ("quantize_per_tensor, dequantize, quantized Conv1d/2d/3d and Linear modules (and their ReLU fusions), "
             "torch.ops.quantized add/add_relu/mul/mul_relu/cat, average pooling, means over given dimensions, "
             "elementwise activations (ReLU6, "
             "Hardtanh, clamp, Hardswish, ELU, CELU, LeakyReLU, Sigmoid, Tanh, Hardsigmoid, GELU, Threshold: "
             "modules, functions, methods and quantized ops), and ReLU, max pooling, reshapes, pixel and channel "
             "shuffles and identities running on quantized tensors")


def _unsupported(node: torch.fx.Node, why: str) -> DeployedFormatError:
    return DeployedFormatError(f"{SOURCE}: node {node.name!r} ({_describe(node)}) {why}; supported: {SUPPORTED}")


def rewrite(work: torch.fx.GraphModule, grids: dict[str, Grid], contiguous: dict[str, bool],
            layouts: dict[str, Layout], saturating: dict[str, bool] | None = None) -> dict[str, DeployedLayer]:
    """In place on `work` (a private copy): the graph in the engine's form; returns each conv/linear layer's codes
    and parameters, in graph order. A layer whose kernel saturates its sums is added to `saturating`
    (`ao.pair_saturation`)."""
    types = _ao_types()
    graph = work.graph
    layers: dict[str, DeployedLayer] = {}
    regridding = _regridding_ops()

    def add_module(node: torch.fx.Node, suffix: str, module: nn.Module) -> str:
        name = f"{node.name}_{suffix}"
        while hasattr(work, name):
            name += "_"
        work.add_submodule(name, module)
        return name

    def carry(node: torch.fx.Node, out: torch.fx.Node) -> None:
        """What was recorded of `node` (its grid, layout, rank), for `out`, which replaces it with its value."""
        if node.name in grids:
            grids[out.name] = grids[node.name]
        if node.name in contiguous:
            contiguous[out.name] = contiguous[node.name]
        if node.name in layouts:
            layouts[out.name] = layouts[node.name]

    def input_grids(node: torch.fx.Node) -> list[Grid]:
        return [grids[arg.name] for arg in node.all_input_nodes if arg.name in grids]

    def requantize_after(node: torch.fx.Node, function: Any, args: tuple[Any, ...], relu: bool,
                         fused_dequantize: bool = False) -> None:
        if node.name not in grids:
            raise _unsupported(node, "did not give a quantized tensor on the calibration data")
        scale, zero, signed = grids[node.name]
        low, high = _range(signed)
        added = [grids[arg.name] for arg in args if isinstance(arg, torch.fx.Node) and arg.name in grids]
        if fused_dequantize and qnnpack_add(added, scale):  # QNNPACK's fixed-point add (the qnnpack engine)
            (scale_a, zero_a, _), (scale_b, zero_b, _) = added
            multiplier_a, multiplier_b, shift = qnnpack_add_parameters(scale_a, scale_b, scale)
            regrid = add_module(node, "requantize", QnnpackAddRequantize(
                scale, zero, max(low, zero) if relu else low, high, -(multiplier_a * zero_a + multiplier_b * zero_b),
                shift))
            with graph.inserting_before(node):
                fixed = [graph.call_module(add_module(node, f"operand{i}", QnnpackAddOperand(
                    grid[0], grid[1], *_range(grid[2]), multiplier)), (arg,))
                    for i, (arg, grid, multiplier) in enumerate(zip(args, added, (multiplier_a, multiplier_b)))]
                out = graph.call_module(regrid, (graph.call_function(torch.add, tuple(fixed)),))
            node.replace_all_uses_with(out)
            carry(node, out)
            graph.erase_node(node)
            return
        regrid = add_module(node, "requantize",
                            Requantize(scale, zero, max(low, zero) if relu else low, high, divide=False))
        with graph.inserting_before(node):
            if fused_dequantize:  # the operands as the add kernel dequantizes them
                operands: list[Any] = []
                for arg in args:
                    grid = grids.get(arg.name) if isinstance(arg, torch.fx.Node) else None
                    if grid is not None and grid[1] != 0:
                        name = add_module(node, f"dequantize{len(operands)}", KernelDequantize(
                            grid[0], grid[1], *_range(grid[2])))
                        arg = graph.call_module(name, (arg,))
                    operands.append(arg)
                args = tuple(operands)
            value = graph.call_function(function, args)
            out = graph.call_module(regrid, (value,))
        node.replace_all_uses_with(out)
        carry(node, out)
        graph.erase_node(node)

    def constant(node: torch.fx.Node, arg: Any) -> Any:
        """An argument's value: a get_attr node's attribute (a quantized op's output scale and zero point)."""
        if isinstance(arg, torch.fx.Node):
            if arg.op != "get_attr":
                raise _unsupported(node, "runs with a computed argument")
            value: Any = work
            for part in str(arg.target).split("."):
                value = getattr(value, part)
            return value
        return arg

    def table_instead(node: torch.fx.Node, op: Any, what: str, float_op: nn.Module | None = None) -> None:
        """`node`, an op torch runs on the codes of its quantized input one by one (an activation; a module's, or
        a function's with its `float_op`) or channel by channel (a batch norm module), as a `CodeTable`."""
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.name not in grids or len(inputs[node.name]) != 1:
            raise _unsupported(node, "runs on a quantized tensor other than its first argument")
        if node.name not in grids:
            raise _unsupported(node, "did not give a quantized tensor on the calibration data")
        described = f"node {node.name!r} ({what})"
        channels_last = layouts.get(source.name) == (4, torch.channels_last)  # the kernel's reading is measured
        found = code_table(op, float_op, grids[source.name], described, SOURCE, channels_last=channels_last) \
            if float_op is not None else module_table(op, grids[source.name], described, SOURCE, channels_last)
        assert found is not None
        table, grid = found
        if grid != grids[node.name]:
            raise _unsupported(node, f"gives its output another grid on a tensor of every code ({grid}) than on the "
                                     f"calibration data ({grids[node.name]})")
        name = add_module(node, "table", table)
        with graph.inserting_before(node):
            out = graph.call_module(name, (source,))
        node.replace_all_uses_with(out)
        carry(node, out)
        graph.erase_node(node)

    def code_mean(node: torch.fx.Node) -> None:
        """torch's quantized mean, as its kernel computes it: on a contiguous tensor over its innermost dimensions,
        the mean of the codes (an integer sum over float32 N) rounded half to even on the input's grid
        (`CodeAvgPool`); otherwise the float32 mean of the dequantized values ((code - zero point) x scale: the
        view's values) in the tensor's own layout (a float32 sum's order follows it), quantized onto the input's
        grid (`Requantize`). Each measured bit for bit on 150k-300k outputs, contiguous and channels-last, 1 and 2
        threads."""
        source = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if not isinstance(source, torch.fx.Node) or source.name not in grids or node.name not in grids or \
                len(node.args) > 3 or set(node.kwargs) - {"dim", "keepdim"}:
            raise _unsupported(node, "averages a quantized tensor with arguments other than dim and keepdim")
        listed = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else None
        if not listed or not all(isinstance(dim, int) for dim in listed) or not isinstance(keepdim, bool):
            raise _unsupported(node, "averages a quantized tensor over computed or all dimensions (torch's float "
                                     "mean of a whole tensor splits its sum between threads)")
        rank, layout = layouts[source.name]
        if layout is None:
            raise _unsupported(node, "averages a quantized tensor neither contiguous nor channels-last")
        scale, zero, signed = grids[source.name]
        inner = {dim % rank for dim in listed} == set(range(rank - len(listed), rank))
        with graph.inserting_before(node):
            if inner and layout == torch.contiguous_format:
                pool = CodeAvgPool(_MethodCall("mean", (tuple(listed), keepdim), {}), scale, zero, *_range(signed),
                                   zero_point_first=True)
                out = graph.call_module(add_module(node, "codemean", pool), (source,))
            else:
                mean = graph.call_module(add_module(node, "floatmean", _LayoutMean(tuple(listed), keepdim, layout)),
                                         (source,))
                regrid = Requantize(scale, zero, *_range(signed), divide=False)
                out = graph.call_module(add_module(node, "requantize", regrid), (mean,))
        node.replace_all_uses_with(out)
        carry(node, out)
        graph.erase_node(node)

    elementwise = _elementwise_functions()
    # the grids of each node's quantized inputs, from the graph as it was recorded (before any rewrite)
    inputs = {node.name: input_grids(node) for node in graph.nodes}
    for node in list(graph.nodes):
        quantized_in = inputs[node.name]
        if node.op == "call_function" and node.target is torch.quantize_per_tensor:
            if node.name not in grids:
                raise _unsupported(node, "did not run on the calibration data")
            scale, zero, signed = grids[node.name]
            regrid = add_module(node, "requantize", Requantize(scale, zero, *_range(signed), divide=False))
            with graph.inserting_before(node):
                out = graph.call_module(regrid, (node.args[0],))
            node.replace_all_uses_with(out)
            carry(node, out)
            graph.erase_node(node)
        elif (node.op == "call_method" and node.target == "dequantize") or (
                node.op == "call_function" and node.target is torch.dequantize):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in (torch.ops.quantized.mul, torch.ops.quantized.mul_relu):
            operands = node.args[:2]
            if len(node.args) < 4 or not all(isinstance(arg, torch.fx.Node) and arg.name in grids for arg in operands):
                raise _unsupported(node, "multiplies by something other than a quantized tensor")
            if node.name not in grids:
                raise _unsupported(node, "did not give a quantized tensor on the calibration data")
            scale, zero, signed = grids[node.name]
            low, high = _range(signed)
            relu = node.target is torch.ops.quantized.mul_relu
            (scale_a, zero_a, signed_a), (scale_b, zero_b, signed_b) = (grids[arg.name] for arg in operands)
            product = add_module(node, "requantize", KernelProductRequantize(
                scale_a, scale_b, scale, zero, max(low, zero) if relu else low, high))
            with graph.inserting_before(node):
                codes_a = graph.call_module(add_module(node, "codes0", KernelCodes(scale_a, zero_a, *_range(signed_a))),
                                            (operands[0],))
                codes_b = graph.call_module(add_module(node, "codes1", KernelCodes(scale_b, zero_b, *_range(signed_b))),
                                            (operands[1],))
                out = graph.call_module(product, (graph.call_function(torch.mul, (codes_a, codes_b)),))
            node.replace_all_uses_with(out)
            carry(node, out)
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in regridding:
            function, relu = regridding[node.target]
            requantize_after(node, function, tuple(node.args[:2]), relu, fused_dequantize=True)
        elif node.op == "call_function" and node.target is torch.ops.quantized.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            requantize_after(node, torch.cat, (node.args[0], dim), False)
        elif node.op == "call_function" and node.target is torch.cat and quantized_in:
            if any(grid != grids.get(node.name) for grid in quantized_in):  # torch.cat re-grids to its output's
                requantize_after(node, torch.cat, tuple(node.args), False)
        elif node.op == "call_function" and quantized_in and node.target in elementwise:
            args = tuple(constant(node, arg) for arg in node.args[1:])
            kwargs = {key: constant(node, value) for key, value in node.kwargs.items()}
            table_instead(node, _FunctionCall(node.target, args, kwargs), _describe(node),
                          _FunctionCall(elementwise[node.target], args, kwargs))
        elif node.op == "call_method" and quantized_in and node.target in _ELEMENTWISE_METHODS:
            args = tuple(constant(node, arg) for arg in node.args[1:])
            kwargs = {key: constant(node, value) for key, value in node.kwargs.items()}
            call = _MethodCall(str(node.target), args, kwargs)  # on quantized and float tensors alike
            table_instead(node, call, _describe(node), copy.deepcopy(call))
        elif quantized_in and ((node.op == "call_method" and node.target == "mean") or (
                node.op == "call_function" and node.target is torch.mean)):
            code_mean(node)
        elif node.op == "call_function" and node.target in _POOL_FUNCTIONS and quantized_in:
            if any(isinstance(arg, torch.fx.Node) for arg in [*node.args[1:], *node.kwargs.values()]):
                raise _unsupported(node, "pools with computed arguments")
            pool = _FunctionCall(node.target, tuple(node.args[1:]), dict(node.kwargs))
            name = add_module(node, "codepool", _code_pool(pool, quantized_in[0], contiguous, node))
            with graph.inserting_before(node):
                out = graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(out)
            carry(node, out)
            graph.erase_node(node)
        elif node.op == "call_module":
            module = work.get_submodule(str(node.target))
            target = str(node.target)
            if isinstance(module, types["layer"]):
                if not quantized_in or node.name not in grids:
                    raise _unsupported(node, "did not run on a quantized tensor on the calibration data")
                if target in layers:
                    raise _unsupported(node, "calls a quantized layer a second time (shared layers are not "
                                             "supported)")
                refuse_defective_kernel(module, target, quantized_in[0], SOURCE)
                codes, w_scale = weight_codes(module, target, SOURCE)
                layers[target] = static_layer(module, codes, w_scale, quantized_in[0], grids[node.name],
                                              relu=isinstance(module, types["fused_relu"]))
                paired = pair_saturation(module)
                if paired is not None and saturating is not None:
                    saturating[target] = paired
                work.set_submodule(target, float_twin(module, quantized_in[0][1] if paired else None))
            elif isinstance(module, types["quantize"]):
                if node.name not in grids:
                    raise _unsupported(node, "did not run on the calibration data")
                scale, zero, signed = grids[node.name]
                node.target = add_module(node, "requantize", Requantize(scale, zero, *_range(signed), divide=False))
            elif isinstance(module, types["dequantize"]):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
            elif isinstance(module, _AVERAGING) and quantized_in:
                node.target = add_module(node, "codepool", _code_pool(module, quantized_in[0], contiguous, node))
            elif quantized_in and (float_elementwise(module) or float_channelwise(module)) is not None:
                table_instead(node, module, f"a {type(module).__qualname__}")
            elif quantized_in or type(module).__module__.startswith(("torch.ao.nn.quantized",
                                                                      "torch.ao.nn.intrinsic")):
                if not isinstance(module, _KEEP_MODULES):
                    raise _unsupported(node, f"(a {type(module).__qualname__}) runs on a quantized tensor")
                _check_keeps_grid(node, quantized_in, grids)
        elif node.op == "call_function" and quantized_in:
            if node.target not in _KEEP_FUNCTIONS:
                raise _unsupported(node, "runs on a quantized tensor")
            _check_keeps_grid(node, quantized_in, grids)
        elif node.op == "call_method" and quantized_in:
            if node.target not in _KEEP_METHODS:
                raise _unsupported(node, "runs on a quantized tensor")
            if node.target not in _SHAPE_ONLY:
                _check_keeps_grid(node, quantized_in, grids)
    for node in list(graph.nodes):  # the scales and zero points of the quantized ops
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    work.recompile()
    work.delete_all_unused_submodules()
    return layers


def _code_pool(pool: nn.Module, grid: Grid, contiguous: dict[str, bool], node: torch.fx.Node) -> CodeAvgPool:
    scale, zero, signed = grid
    source = node.args[0]
    zero_first = contiguous.get(source.name, True) if isinstance(source, torch.fx.Node) else True
    return CodeAvgPool(pool, scale, zero, *_range(signed), zero_point_first=zero_first)


def _check_keeps_grid(node: torch.fx.Node, quantized_in: list[Grid], grids: dict[str, Grid]) -> None:
    out = grids.get(node.name)
    if out is not None and out != quantized_in[0]:
        raise _unsupported(node, f"re-grids a quantized tensor (scale, zero point {quantized_in[0][:2]} -> "
                                 f"{out[:2]})")


def read_ao_fx(model: Any, calibration_data: Any, batch_size: int, device: torch.device | str) -> Deployed:
    """A torch.ao FX `convert_fx` GraphModule in the engine's form; `model` is not modified."""
    if not isinstance(model, torch.fx.GraphModule):
        raise TypeError(f"{SOURCE}: expected a torch.fx.GraphModule from convert_fx, got {type(model).__qualname__}")
    work = copy.deepcopy(model).eval().to("cpu")  # the quantized kernels run on the CPU
    saturating: dict[str, bool] = {}
    layers = rewrite(work, *record_node_grids(work, calibration_data, batch_size), saturating)
    if not layers:
        raise DeployedFormatError(f"{SOURCE}: no quantized conv/linear module in the graph")
    work.to(device)
    return Deployed(work, layers, SOURCE, notes=[
        "the float baseline is the float function of the int8 model (dequantized weights, unquantized "
        "activations), not the float model it was converted from", *saturation_notes(saturating),
        *channels_last_notes(work)])
