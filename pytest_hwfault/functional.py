"""Functional multiply-accumulates as layers of the view: F.linear / F.conv1d-3d with the model's own parameters,
matmul / bmm / mm / einsum / ``@`` between activations (or an activation and a parameter), and
F.scaled_dot_product_attention.

A module can be hooked; a function call cannot. So the quantizer watches one forward pass (`discover`) and gives
each functional MAC call, by its position in the sequence of such calls, a module of its own: a Linear or ConvNd
holding a copy of the parameter it was called with, a `decompose.MatMul`/`Einsum` of two activations, or a
`decompose.ScaledDotProductAttention` (two MatMuls). During every forward pass of the view, `Dispatch` (a
TorchFunctionMode) counts the calls and hands the k-th one to its module, which the engine has quantized like any
other layer. A model whose sequence of functional calls changes between forward passes is refused with the call
that differed: its faults could not be placed the same way twice.

Calls the engine cannot make per-image layers of (an operand without the batch dimension that is not a
parameter, a weight computed in the forward) run as they are, in float, and the view's
coverage counts them as uncovered.

Calls made inside a quantized module (nn.Linear's own F.linear) are the layer itself and pass through: they are
recognised by their weight, which is a layer's weight.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Container, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .data import Inputs, call_model
from .decompose import BaddBmm, Einsum, FusedAttentionOff, MatMul, ScaledDotProductAttention

_OPS: dict[Any, str] = {
    F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
    torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul",
    torch.Tensor.__rmatmul__: "rmatmul", torch.bmm: "bmm", torch.Tensor.bmm: "bmm", torch.mm: "mm",
    torch.Tensor.mm: "mm", torch.einsum: "einsum", F.scaled_dot_product_attention: "scaled_dot_product_attention",
    torch.baddbmm: "baddbmm", torch.Tensor.baddbmm: "baddbmm", torch.linalg.matmul: "matmul",
}
# the same ops as aten overloads, which a graph from torch.export (`ExportedProgram.module()`) calls by name
_OPS.update({getattr(getattr(torch.ops.aten, name), overload): op for name, overload, op in (
    ("linear", "default", "linear"), ("conv1d", "default", "conv1d"), ("conv2d", "default", "conv2d"),
    ("conv3d", "default", "conv3d"), ("conv_transpose1d", "default", "conv_transpose1d"),
    ("conv_transpose2d", "input", "conv_transpose2d"), ("conv_transpose3d", "input", "conv_transpose3d"),
    ("matmul", "default", "matmul"), ("mm", "default", "mm"), ("bmm", "default", "bmm"),
    ("einsum", "default", "einsum"), ("baddbmm", "default", "baddbmm"),
    ("scaled_dot_product_attention", "default", "scaled_dot_product_attention"))})
# Python functions a torch-function mode sees whole, whose MACs are calls of the ops above made inside them (a mode is
# off while it handles a call): watched and dispatched inside, call by call. F.multi_head_attention_forward: WavLM
# and other models call it with their own projection weights instead of running nn.MultiheadAttention.
def _watched_inside(function: Any) -> Any:
    """`function` without its own torch-function check (the mode would be handed the call again, not its insides):
    the same code, reading a `has_torch_function` that answers False; everything it calls keeps its own checks."""
    clone = types.FunctionType(function.__code__, {**function.__globals__, "has_torch_function": lambda *_: False},
                               function.__name__, function.__defaults__, function.__closure__)
    clone.__kwdefaults__ = function.__kwdefaults__
    return clone


def _addmm_as_mm(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta: Any = 1, alpha: Any = 1,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.addmm (and Tensor.addmm) as beta * input + alpha * mm(mat1, mat2): its MACs are the mm call, which the
    mode sees (a layer where it can be one, `x @ W` with a stored W as a Linear); the scaling and the added input
    are float, as a layer's float bias is."""
    product = torch.mm(mat1, mat2)
    scaled = product if alpha == 1 else alpha * product
    if beta == 0:  # addmm ignores its input then (NaN in it included)
        result = scaled
    else:
        result = scaled + (input if beta == 1 else beta * input)
    return out.copy_(result) if out is not None else result


def _convolution_as_conv(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any,
                         padding: Any, dilation: Any, transposed: bool, output_padding: Any, groups: int
                         ) -> torch.Tensor:
    """aten.convolution (a core ATen graph's every convolution, from `ExportedProgram.run_decompositions()`) as the
    F.conv / F.conv_transpose call of its dimensionality, which the modes see."""
    dims = weight.dim() - 2
    if transposed:
        transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return transpose(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return (F.conv1d, F.conv2d, F.conv3d)[dims - 1](input, weight, bias, stride, padding, dilation, groups)


def _tensordot_as_matmul(a: torch.Tensor, b: torch.Tensor, dims: Any = 2, out: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """torch.tensordot as one matmul: `a`'s free dimensions in order, then the contracted ones merged, times `b`'s
    contracted dimensions merged by its free ones (`h @ W` itself where W's first dimension is contracted, a Linear
    where W is stored)."""
    if isinstance(dims, int):
        contracted_a, contracted_b = list(range(a.dim() - dims, a.dim())), list(range(dims))
    elif isinstance(dims, torch.Tensor):
        contracted_a, contracted_b = [int(d) for d in dims[0]], [int(d) for d in dims[1]]
    else:
        contracted_a = [dims[0]] if isinstance(dims[0], int) else list(dims[0])
        contracted_b = [dims[1]] if isinstance(dims[1], int) else list(dims[1])
    contracted_a, contracted_b = [d % a.dim() for d in contracted_a], [d % b.dim() for d in contracted_b]
    free_a = [d for d in range(a.dim()) if d not in contracted_a]
    free_b = [d for d in range(b.dim()) if d not in contracted_b]
    inner = math.prod(a.shape[d] for d in contracted_a)
    left = a if contracted_a == [a.dim() - 1] else \
        a.permute(*free_a, *contracted_a).reshape(*(a.shape[d] for d in free_a), inner)
    if b.dim() == 2 and contracted_b == [1]:  # a Linear by b itself: F.linear(h, W) is h @ W.T
        result = F.linear(left, b)
        return out.copy_(result) if out is not None else result
    # W itself where its first dimension is contracted: x @ W, which the modes know as a stored matrix
    right = b if b.dim() == 2 and contracted_b == [0] else \
        b.permute(*contracted_b, *free_b).reshape(inner, math.prod(b.shape[d] for d in free_b))
    result = torch.matmul(left, right).reshape(*(a.shape[d] for d in free_a), *(b.shape[d] for d in free_b))
    return out.copy_(result) if out is not None else result


def _inner_as_matmul(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.inner: a sum over both operands' last dimension (`h @ W.T` for a 2-D W), a scalar's product else."""
    result = a * b if a.dim() == 0 or b.dim() == 0 else _tensordot_as_matmul(a, b, ([-1], [-1]))
    return out.copy_(result) if out is not None else result


def _chain_as_matmuls(*tensors: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.linalg.multi_dot (a list) and torch.chain_matmul (matrices) as matmuls from the left, each a call the
    modes see; torch may associate the chain otherwise, which changes only float rounding."""
    chain = list(tensors[0]) if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)) else list(tensors)
    result = functools.reduce(torch.matmul, chain)
    return out.copy_(result) if out is not None else result


_COMPOSITES = {F.multi_head_attention_forward: _watched_inside(F.multi_head_attention_forward),
               torch.addmm: _addmm_as_mm, torch.Tensor.addmm: _addmm_as_mm,
               torch.ops.aten.addmm.default: _addmm_as_mm, torch.ops.aten.convolution.default: _convolution_as_conv,
               torch.tensordot: _tensordot_as_matmul, torch.inner: _inner_as_matmul,
               torch.Tensor.inner: _inner_as_matmul, torch.linalg.multi_dot: _chain_as_matmuls,
               torch.chain_matmul: _chain_as_matmuls}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_TRANSPOSE_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONVS: dict[str, type[nn.Module]] = {
    "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d, "conv_transpose1d": nn.ConvTranspose1d,
    "conv_transpose2d": nn.ConvTranspose2d, "conv_transpose3d": nn.ConvTranspose3d}


class CallOrderError(ValueError):
    """The model made other functional calls than when it was quantized."""


@dataclass
class Call:
    """One functional MAC call of the model's forward pass, and the module that runs it (None: runs in float)."""

    op: str
    where: str  # the innermost module of the model that made the call ('' for the model itself)
    module: nn.Module | None = None
    name: str | None = None  # its layer name, e.g. "encoder.layer.0.attention.self.matmul()"
    weight: int | None = None  # id of the parameter a linear/conv/matmul call passed as its weight
    reason: str | None = None  # why it runs in float
    # a call left in float whose weight is computed in the forward pass: that weight's elements, which no fault
    # reaches (they count against the weight coverage)
    weight_elements: int = 0
    # a linear/conv call whose bias the forward computes from stored tensors (Swin V2 zeroes the key's share of its
    # qkv bias): the value the layer holds as its bias codes; every later call must pass the same
    computed_bias: torch.Tensor | None = None
    # id of the parameter a linear/conv layer holds as its bias codes (as a module layer holds its own)
    bias: int | None = None
    # a matmul on a stored matrix's transpose (`x @ W.t()`): that matrix (a new view of it comes at every call)
    transposed: torch.Tensor | None = None
    # a linear/conv call whose weight the forward computes from stored tensors alone (weight standardisation, a
    # gain times a direction): the value the layer holds as its weight codes, as a deployed model stores it once
    # computed; every later call must pass the same. `computed_from`: the parameters it is computed from, which the
    # layer's codes stand in for
    computed_weight: torch.Tensor | None = None
    computed_from: frozenset[int] = frozenset()
    # the elements `weight_elements` counts should the call run in float
    float_elements: int = 0
    # a call that showed no order and took its sibling's (`_order_of_unmoved`): the index of that sibling, whose
    # calibration statistics it shares (its own inputs may be all zeros: a recurrent cell's initial state)
    calibrate_with: int | None = None


@dataclass
class FunctionalPlan:
    """Every functional MAC call of one forward pass, in order."""

    calls: list[Call] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.calls)

    def layers(self) -> dict[str, nn.Module]:
        """Layer name -> quantized module (an attention call's are its two matmuls)."""
        return {name: module for name, (module, _) in self.placed_layers().items()}

    def placed_layers(self) -> dict[str, tuple[nn.Module, str]]:
        """Layer name -> (quantized module, the model's module that makes the call)."""
        layers: dict[str, tuple[nn.Module, str]] = {}
        for call in self.calls:
            if call.module is None or not call.name:
                continue
            module = _layer_of(call.module)
            if isinstance(module, ScaledDotProductAttention):
                layers[f"{call.name}.scores"] = (module.scores, call.where)
                layers[f"{call.name}.context"] = (module.context, call.where)
            else:
                layers[call.name] = (module, call.where)
        return layers

    def shared_calibration(self) -> dict[str, str]:
        """Layer name -> the layer whose calibration statistics it shares (`Call.calibrate_with`)."""
        shared = {}
        for call in self.calls:
            sibling = self.calls[call.calibrate_with] if call.calibrate_with is not None else None
            if call.module is not None and call.name and sibling is not None and sibling.module is not None \
                    and sibling.name:
                shared[call.name] = sibling.name
        return shared

    def uncovered(self) -> list[dict[str, str]]:
        return [{"call": f"{call.where or '<model>'}: {call.op}", "reason": call.reason or ""}
                for call in self.calls if call.module is None]


def _op(func: Any) -> str | None:
    try:
        return _OPS.get(func)
    except TypeError:  # unhashable callables
        return None


def _arguments(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name."""
    if op in _CONVS:
        named = dict(zip(_CONV_TRANSPOSE_ARGS if op.startswith("conv_transpose") else _CONV_ARGS, args))
    elif op == "linear":
        named = dict(zip(("input", "weight", "bias"), args))
    elif op == "rmatmul":  # b.__rmatmul__(a) is a @ b
        named = {"a": args[1], "b": args[0]}
    elif op == "einsum":
        # einsum("ij,jk", a, b), or with the operands as a list (aten.einsum's own form, with an optional path)
        operands = tuple(args[1]) if len(args) >= 2 and isinstance(args[1], (list, tuple)) else args[1:]
        named = {"equation": args[0], "operands": operands}
    elif op == "scaled_dot_product_attention":
        named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args))
    elif op == "baddbmm":
        named = dict(zip(("input", "batch1", "batch2"), args))
    else:
        named = dict(zip(("a", "b"), args))
    named.update(kwargs)
    if op == "rmatmul" and "other" in kwargs:
        named["a"] = kwargs["other"]
    return named


def _is_transpose(t: Any, base: torch.Tensor) -> bool:
    """Whether `t` is the 2-D `base` transposed, element for element, in base's memory (`W.t()`, `W.T`,
    `W.transpose(0, 1)`: `x @ W.t()` is `F.linear(x, W)`)."""
    return bool(isinstance(t, torch.Tensor) and t.dim() == 2 and base.dim() == 2
                and tuple(t.shape) == tuple(base.shape)[::-1] and t.stride() == base.stride()[::-1]
                and t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
                and t.storage_offset() == base.storage_offset())


def _transpose_of(t: Any, parameters: Container[int]) -> torch.Tensor | None:
    """The 2-D parameter or buffer that `t` is a transpose of (`_is_transpose`), else None."""
    base = getattr(t, "_base", None)
    return base if isinstance(base, torch.Tensor) and id(base) in parameters and _is_transpose(t, base) else None


def _second_is_batch(op: str, named: dict[str, Any], out: Any, n: int, stored: Container[int]) -> bool:
    """A linear call whose input and result hold the images along their second dimension ([T, N, ...])."""
    x = named.get("input")
    return (op == "linear" and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.dim() >= 3
            and out.dim() >= 3 and x.shape[1] == n and out.shape[1] == n and id(x) not in stored)


def _batch_second(op: str, named: dict[str, Any], out: torch.Tensor, n: int, parameters: dict[int, str],
                  stored: Container[int]) -> tuple[nn.Module | None, int | None, str | None]:
    inner, weight, reason = _module_for(op, {**named, "input": named["input"].transpose(0, 1)}, out.transpose(0, 1),
                                        n, parameters, stored)
    return (BatchSecond(inner) if inner is not None else None), weight, reason


def _holds_w(named: dict[str, Any], parameters: Container[int]) -> bool:
    """Whether an einsum linear map holds its stored matrix as it is ([out, in], F.linear's layout)."""
    plan = _einsum_linear(str(named["equation"]), named["operands"], parameters)
    return plan is not None and plan.holds_w


@dataclass(frozen=True)
class _EinsumLinear:
    """An einsum that is a linear map of one operand (`activation`, 0 or 1) by a 2-D stored other operand: the
    activation's contracted dimension (`contracted`, counted from its end) moved last, F.linear by the matrix in
    [out, in] layout (`holds_w`: the stored matrix is that layout as it is), and the result's trailing dimensions
    put in the equation's order (`order`; None where they are in it)."""

    activation: int
    contracted: int
    order: tuple[int, ...] | None
    holds_w: bool


def _einsum_linear(equation: str, operands: Any, parameters: Container[int]) -> _EinsumLinear | None:
    """The plan of an einsum of one operand and a 2-D stored matrix sharing one contracted letter, the output the
    operand's other letters and the matrix's other one, the operand's first letter (or a leading ellipsis) first in
    the output too ("bld,dk->blk", "...d,kd->...k", "ok,nkl->nol", "nkl,ok->nlo"); None for any other einsum."""
    inputs, arrow, out = equation.replace(" ", "").partition("->")
    names = inputs.split(",")
    if not arrow or len(names) != 2 or len(operands) != 2:
        return None
    for stored in (1, 0):
        weight, x, letters, w = operands[stored], operands[1 - stored], names[1 - stored], names[stored]
        if not (isinstance(weight, torch.Tensor) and id(weight) in parameters and weight.dim() == 2
                and isinstance(x, torch.Tensor) and len(w) == 2 and w[0] != w[1] and "." not in w):
            continue
        lead = letters.startswith("...") and out.startswith("...")
        own, result = (letters[3:], out[3:]) if lead else (letters, out)
        shared = [c for c in w if c in own]
        if "." in own + result or len(set(own)) != len(own) or len(shared) != 1 or not own:
            continue
        contracted = shared[0]
        produced = w[1] if w[0] == contracted else w[0]
        rest = own.replace(contracted, "")
        if sorted(result) != sorted(rest + produced) or contracted in result or (
                not lead and (own[0] == contracted or result[0] != own[0])):
            continue
        order = tuple((rest + produced).index(c) for c in result)
        return _EinsumLinear(1 - stored, own.index(contracted) - len(own),
                             None if order == tuple(range(len(order))) else order, w == produced + contracted)
    return None


class EinsumLinear(nn.Module):
    """An einsum of a per-image operand and a stored matrix as a Linear (`_einsum_linear`): the contracted
    dimension moved last, the layer, the result's dimensions in the equation's order."""

    def __init__(self, layer: nn.Linear, plan: _EinsumLinear) -> None:
        super().__init__()
        self.layer, self.plan = layer, plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x.movedim(self.plan.contracted, -1))
        if self.plan.order is None:
            return y
        lead = y.dim() - len(self.plan.order)
        return y.permute(*range(lead), *(lead + i for i in self.plan.order)).contiguous()


def _per_image(n: int, *tensors: Any, stored: Container[int] = ()) -> bool:
    """Whether each tensor holds the batch's images along its first dimension: n rows, and not a stored tensor (or
    one computed from stored tensors alone) whose first dimension happens to be n."""
    return all(isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == n and id(t) not in stored
               for t in tensors)


class LeftLinear(nn.Module):
    """`W @ x` for a stored W [out, in] and per-image x [N, ..., in, L] (an im2col convolution, token mixing): a
    Linear over x's second-to-last dimension, so W is held as weight codes with a scale per row."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.transpose(-1, -2)).transpose(-1, -2).contiguous()  # laid out as the matmul's result


class BatchSecond(nn.Module):
    """A Linear on [T, N, ...] inputs (sequence first, nn.Transformer's default layout): it computes on the
    [N, T, ...] view, so that faults are placed per image."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.transpose(0, 1)).transpose(0, 1).contiguous()  # laid out as F.linear's result


def _unfolded(module: nn.Module) -> nn.Module:
    return module.layer if isinstance(module, Folded) else module


def _layer_of(module: nn.Module) -> nn.Module:
    """The quantized module inside a call's module (`Folded`, `LeftLinear`, `BaddBmm`, `BatchSecond`, `Interleaved`,
    `EinsumLinear` wrap one)."""
    while isinstance(module, (Folded, LeftLinear, BaddBmm, BatchSecond, Interleaved, EinsumLinear)):
        module = module.layer
    return module


class Folded(nn.Module):
    """A call on N x k rows that hold the N images' data image by image, k rows each (Swin's windows folded into
    the batch dimension, batch and sequence merged before a linear): its layer computes on the [N, k, ...] view
    of its operands, so that faults are placed per image. `discover` checks the order on the model."""

    def __init__(self, layer: nn.Module, fold: int) -> None:
        super().__init__()
        self.layer, self.fold = layer, fold

    def forward(self, *operands: torch.Tensor, **options: Any) -> torch.Tensor:
        images = operands[0].shape[0] // self.fold
        mask = options.get("attn_mask")  # attention: a mask per folded row is folded too; others broadcast as they are
        if isinstance(mask, torch.Tensor) and mask.dim() == operands[0].dim() and mask.shape[0] == len(operands[0]):
            options["attn_mask"] = mask.reshape(images, self.fold, *mask.shape[1:])
        rows = len(operands[0])  # an operand of another first dimension (baddbmm's broadcast input) stays as it is
        out = self.layer(*(x.reshape(images, self.fold, *x.shape[1:]) if len(x) == rows else x for x in operands),
                         **options)
        return out.reshape(images * self.fold, *out.shape[2:])


class Interleaved(nn.Module):
    """A call on k x N rows that hold the images step by step (row t x N + i is image i's t-th: windows folded window
    by window, sequence and batch merged sequence first, as F.multi_head_attention_forward's output projection
    reads them): its layer computes on the [N, k, ...] view of its operands (and of a mask with a row per folded
    row), so that faults are placed per image. `discover` checks the order on the model."""

    def __init__(self, layer: nn.Module, fold: int) -> None:
        super().__init__()
        self.layer, self.fold = layer, fold

    def forward(self, *operands: torch.Tensor, **options: Any) -> torch.Tensor:
        rows = len(operands[0])
        images = rows // self.fold

        def per_image(t: torch.Tensor) -> torch.Tensor:  # another first dimension (a broadcast input): as it is
            return t.reshape(self.fold, images, *t.shape[1:]).transpose(0, 1) if len(t) == rows else t

        mask = options.get("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == operands[0].dim():
            options["attn_mask"] = per_image(mask)
        out = self.layer(*map(per_image, operands), **options)
        return out.transpose(0, 1).reshape(images * self.fold, *out.shape[2:])


def _folded_conv_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The convolution of [N, k, C, ...]: its N x k images flattened for the kernel, the result unflattened."""
    conv: Any = type(self).__mro__[1]
    out: torch.Tensor = conv.forward(self, x.flatten(0, 1))
    return out.unflatten(0, (x.shape[0], -1))


# a convolution that `Folded` gives [N, k, C, ...]: its quantization hooks see the images along dim 0, the output
# channels along dim 2 (`channel_axis` 1 of an image's [k, O, ...]); it computes on the float-emulated path
_FOLDED_CONVS: dict[type[nn.Module], type[nn.Module]] = {
    kind: type(f"Folded{kind.__name__}", (kind,), {"forward": _folded_conv_forward, "channel_axis": 1,
                                                   "__module__": __name__})
    for kind in _CONVS.values()}
globals().update({folded.__name__: folded for folded in _FOLDED_CONVS.values()})  # importable: copies pickle


def _module_for(op: str, named: dict[str, Any], out: Any, n: int, parameters: dict[int, str],
                stored: Container[int] = ()) -> tuple[nn.Module | None, int | None, str | None]:
    """The module that computes this call as a layer, the id of its weight parameter, or why there is none. A
    linear or matmul call whose result holds k rows per image (first dimension N x k) gets its module `Folded`.
    `stored`: the ids of tensors computed from stored ones alone, which hold no image along any dimension."""
    if (op == "linear" or op in _CONVS) and id(named.get("weight")) not in parameters and id(named.get("weight")) \
            not in stored:  # a kernel per image (dynamic filters, a Siamese tracker's cross-correlation)
        if isinstance(named.get("weight"), nn.Parameter):  # not the model's: the copy the view runs reads it
            return None, None, ("its weight is a parameter outside the model (a forward that reads another "
                                "module's weight, such as a function set as forward that closes over the module "
                                "it replaced), which the view cannot hold as codes")
        return None, None, ("its weight is computed or selected from the images (a kernel per image, an expert "
                            "chosen by routing), not a stored tensor")
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or not n or out.shape[0] % n:
        if _second_is_batch(op, named, out, n, stored):  # sequence first: [T, N, ...]
            return _batch_second(op, named, out, n, parameters, stored)
        return None, None, "its result has no batch dimension"
    if id(out) in stored:
        return None, None, "it computes on stored tensors alone (the same for every image)"
    fold = out.shape[0] // n
    if fold > 1:
        if op not in ("linear", "matmul", "rmatmul", "bmm", "mm", "baddbmm", "scaled_dot_product_attention") \
                and op not in _CONVS:
            return None, None, "its result has no batch dimension"
        inner, weight, reason = _module_for(op, named, out, n * fold, parameters, stored)
        if inner is not None and op in _CONVS:  # frames of a video, windows, patches: k images of its own each
            inner.__class__ = _FOLDED_CONVS[type(inner)]
        return (Folded(inner, fold) if inner is not None else None), weight, reason
    if op == "linear" or op in _CONVS:
        x, weight, bias = named.get("input"), named.get("weight"), named.get("bias")
        if bias is not None and id(bias) not in parameters and (not isinstance(bias, torch.Tensor) or bias.dim() != 1):
            return None, None, "its bias is computed in the forward pass and is not one value per output"
        if not _per_image(n, x, stored=stored):
            return None, None, "its input has no batch dimension"
        assert isinstance(weight, torch.Tensor)
        module: nn.Module
        if op == "linear":
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        elif op.startswith("conv_transpose"):  # weight [in, out / groups, k...]
            groups = int(named.get("groups", 1))
            module = _CONVS[op](weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]),
                                stride=named.get("stride", 1), padding=named.get("padding", 0),
                                output_padding=named.get("output_padding", 0), groups=groups,
                                bias=bias is not None, dilation=named.get("dilation", 1))
        else:
            groups = int(named.get("groups", 1))
            module = _CONVS[op](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                stride=named.get("stride", 1), padding=named.get("padding", 0),
                                dilation=named.get("dilation", 1), groups=groups, bias=bias is not None)
        with torch.no_grad():
            assert isinstance(module.weight, torch.Tensor)
            module.weight.copy_(weight)
            if bias is not None:
                assert isinstance(module.bias, torch.Tensor)
                module.bias.copy_(bias)
        # a weight computed from stored tensors is a new tensor at every forward: no id to know it by
        return module.to(weight.device), (id(weight) if id(weight) in parameters else None), None
    if op in ("matmul", "rmatmul", "bmm", "mm"):
        a, b = named.get("a"), named.get("b")
        if _per_image(n, a, b, stored=stored):
            return MatMul(), None, None
        if _per_image(n, a, stored=stored) and isinstance(b, torch.Tensor) and id(b) in parameters and b.dim() == 2:
            linear = nn.Linear(b.shape[0], b.shape[1], bias=False)  # x @ W is F.linear(x, W^T)
            with torch.no_grad():
                linear.weight.copy_(b.T)
            return linear.to(b.device), id(b), None
        transposed = _transpose_of(b, parameters)
        if _per_image(n, a, stored=stored) and transposed is not None:
            linear = nn.Linear(transposed.shape[1], transposed.shape[0], bias=False)  # x @ W.t() is F.linear(x, W)
            with torch.no_grad():
                linear.weight.copy_(transposed)
            return linear.to(transposed.device), id(transposed), None
        if (isinstance(b, torch.Tensor) and b.dim() >= 3 and _per_image(n, b, stored=stored)
                and isinstance(a, torch.Tensor) and id(a) in parameters and a.dim() == 2):
            left = nn.Linear(a.shape[1], a.shape[0], bias=False)  # W @ x is F.linear(x^T, W)^T
            with torch.no_grad():
                left.weight.copy_(a)
            return LeftLinear(left).to(a.device), id(a), None
        return None, None, "an operand without the batch dimension that is not a 2-D parameter"
    if op == "baddbmm":
        if "out" in named:
            return None, None, "out= given"
        if _per_image(n, named.get("batch1"), named.get("batch2"), stored=stored):
            return BaddBmm(), None, None
        return None, None, "an operand without the batch dimension"
    if op == "einsum":
        operands = named["operands"]
        if len(operands) == 2 and _per_image(n, *operands, stored=stored):
            return Einsum(str(named["equation"]).replace(" ", "")), None, None
        plan = _einsum_linear(str(named["equation"]), operands, parameters)
        if plan is not None and _per_image(n, operands[plan.activation], stored=stored):
            weight = operands[1 - plan.activation]
            linear = nn.Linear(weight.shape[1] if plan.holds_w else weight.shape[0],
                               weight.shape[0] if plan.holds_w else weight.shape[1], bias=False)
            with torch.no_grad():
                linear.weight.copy_(weight if plan.holds_w else weight.T)
            simple = plan.activation == 0 and plan.contracted == -1 and plan.order is None
            return (linear if simple else EinsumLinear(linear, plan)).to(weight.device), id(weight), None
        return None, None, "einsum of other than two per-image operands or one and a stored matrix"
    if op == "scaled_dot_product_attention":
        if float(named.get("dropout_p", 0.0)) != 0.0:
            return None, None, "dropout_p > 0"
        if not _per_image(n, named.get("query"), named.get("key"), named.get("value"), stored=stored):
            return None, None, "an operand without the batch dimension"
        return ScaledDotProductAttention(), None, None
    return None, None, "not supported"


def _computed_weight(op: str, named: dict[str, Any], n: int, stored: Container[int] = (),
                     parameters: Container[int] = ()) -> int:
    """Elements of the weight-like operand of a call, should it run in float, that the forward computes from stored
    tensors (the same for every image), 0 when it has none. A parameter of the model is not counted here (the
    coverage finds it read by the multiply-accumulate), nor a kernel computed per image (an activation); a
    parameter outside the model (a forward that closes over the module it replaced) is: no fault reaches it."""
    if op == "linear" or op in _CONVS:
        weight = named.get("weight")
        return weight.numel() if isinstance(weight, torch.Tensor) and not _a_parameter(weight, parameters) and (
            id(weight) in stored or isinstance(weight, nn.Parameter)) else 0
    if op in ("matmul", "rmatmul", "bmm", "mm", "baddbmm"):
        operands = [named.get("batch1"), named.get("batch2")] if op == "baddbmm" else [named.get("a"), named.get("b")]
        shared = [t for t in operands if isinstance(t, torch.Tensor) and not _per_image(n, t, stored=stored)]
        return shared[0].numel() if len(shared) == 1 and not _a_parameter(shared[0], parameters) else 0
    return 0


def _a_parameter(t: torch.Tensor, parameters: Container[int]) -> bool:
    """A parameter of the model, or a view of one (`W.T`): the coverage finds its storage read by the MACs."""
    return id(t) in parameters or (t._base is not None and id(t._base) in parameters)


def _invoke(call: Call, named: dict[str, Any]) -> Any:
    """Run one dispatched call on its module."""
    module = call.module
    assert module is not None
    op = call.op
    if op == "linear" or op in _CONVS:
        weight = named.get("weight")
        if call.computed_weight is not None:
            if not (isinstance(weight, torch.Tensor) and torch.equal(weight, call.computed_weight)):
                raise CallOrderError(f"functional call {call.name!r} was made with another computed weight than when "
                                     "the model was quantized: the layer holds that weight as its codes, so it must "
                                     "not change")
        elif id(weight) != call.weight:
            raise CallOrderError(f"functional call {call.name!r} was made with another weight than when the model was "
                               "quantized: the model's functional calls must come in the same order every forward")
        bias = named.get("bias")
        if call.computed_bias is not None and not (isinstance(bias, torch.Tensor) and torch.equal(bias,
                                                                                             call.computed_bias)):
            raise CallOrderError(f"functional call {call.name!r} was made with another computed bias than when the "
                                 "model was quantized: the layer holds that bias as its codes, so it must not change")
        return module(named["input"])
    if op in ("matmul", "rmatmul", "bmm", "mm"):
        if call.weight is not None:
            left = isinstance(_unfolded(module), LeftLinear)
            operand = named.get("a" if left else "b")
            if (id(operand) != call.weight if call.transposed is None  # x @ W.t(): a new view of W at every call
                    else not _is_transpose(operand, call.transposed)):
                raise CallOrderError(f"functional call {call.name!r} was made with another weight than when the "
                                   "model was quantized")
            return module(named["b"] if left else named["a"])
        return module(named["a"], named["b"])
    if op == "einsum":
        if call.weight is not None:  # a linear map by a stored matrix (`_einsum_linear`)
            inner = _unfolded(module)
            activation = inner.plan.activation if isinstance(inner, EinsumLinear) else 0
            if id(named["operands"][1 - activation]) != call.weight:
                raise CallOrderError(f"functional call {call.name!r} was made with another weight than when the "
                                   "model was quantized")
            return module(named["operands"][activation])
        return module(*named["operands"])
    if op == "baddbmm":
        added = named.get("input")
        return module(named["batch1"], named["batch2"], *([] if added is None else [added]),
                      beta=named.get("beta", 1.0), alpha=named.get("alpha", 1.0))
    return module(named["query"], named["key"], named["value"], attn_mask=named.get("attn_mask"),
                  is_causal=bool(named.get("is_causal", False)), scale=named.get("scale"),
                  enable_gqa=bool(named.get("enable_gqa", False)))


# tensor attributes and methods that read no values: a model may ask a layer's weight its shape
_METADATA = {"shape", "dtype", "device", "requires_grad", "ndim", "is_cuda", "is_cpu", "is_meta", "layout", "is_leaf",
             "is_sparse", "is_quantized", "names", "itemsize", "nbytes", "grad_fn", "is_mkldnn", "is_nested",
             "size", "dim", "numel", "stride", "__len__", "element_size", "nelement", "is_contiguous",
             "is_floating_point", "is_complex", "get_device", "data_ptr", "storage_offset"}


# calls that only rearrange a tensor's elements: a batch-size-valued argument of theirs makes no row per image
_REARRANGING = {"reshape", "view", "reshape_as", "view_as", "flatten", "unflatten", "permute", "transpose",
                "movedim", "squeeze", "unsqueeze", "contiguous", "t"}


# calls a layer module's forward may make on its input before its own call: the engine hands that forward the input's
# integer codes, and these give the codes of what they give on the values, integers in the same range (`pad` with a
# zero fill: `_Discover._keeps_codes`). A scaling would give the values right but the accumulator no integer sum of
# codes (and its bit faults nothing a MAC array holds): such a module is left out, and its call quantizes its input
_KEEPS_CODES = _REARRANGING | {"__getitem__", "narrow", "select", "expand", "expand_as", "clone", "detach", "to",
                               "type_as", "float", "double", "chunk", "split", "pad", "dropout", "alpha_dropout",
                               "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}


def _function_name(func: Any) -> str:
    """`func`'s name; an attribute read (Tensor.T) by the attribute's name."""
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", None) == "__get__" and owner is not None:
        return str(getattr(owner, "__name__", "attribute"))
    return str(getattr(func, "__name__", func))


class _Discover(TorchFunctionMode):
    """Records the functional MAC calls of one forward pass and makes a module for each it can; notes which
    candidate layer modules ran, and which of them have a weight or bias that something else reads.

    A linear/conv call that a candidate makes while it runs, on its own weight, is that module's own (nn.Linear's
    F.linear) and is not recorded. A candidate that never runs but whose weight a call uses (nn.MultiheadAttention's
    out_proj) is not a layer: that call is. A layer's weight and bias become its codes, so any other read of them
    (a functional call outside it, a second call inside it, a weight normalised or summed in a custom forward, a
    bias read by the model) would see codes: such a candidate is `foreign`, and `discover` leaves it out. So is one
    that runs on a tensor without the batch dimension (a Linear on learned latent queries): its call then runs in
    float and the coverage names it. So is one whose forward returns anything but its own call's result as that call
    left it (a subclass's or an instance's own forward adding a low-rank branch, scaling or casting the result), or
    makes no call on its own weight (a forward set on the instance that computes with another module's): the engine
    computes a layer as its own call alone, so its other compute would be lost; its calls become layers.
    """

    def __init__(self, model: nn.Module, batch: int, candidates: dict[str, nn.Module]) -> None:
        super().__init__()
        self.batch = batch
        # stored tensors a call may use as its weight: parameters, and buffers (a registered fixed projection)
        stored = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        self.parameters = {id(p): name for name, p in stored}
        # tensors computed from stored tensors and constants alone, where the batch size was no argument: the same
        # for every image, so never per image, even where their first dimension happens to be the batch size (a
        # 128 x k parameter on a calibration batch of 128). Held here, so that their ids stay theirs
        self.stored: dict[int, torch.Tensor] = {id(p): p for _, p in stored}
        # stored tensor id -> the parameters and buffers it is computed from
        self.sources: dict[int, frozenset[int]] = {id(p): frozenset((id(p),)) for _, p in stored}
        self.plan = FunctionalPlan()
        self.stack: list[str] = []
        self.names = {id(m): name for name, m in model.named_modules()}
        self.candidates = {id(m): name for name, m in candidates.items()}
        self.held = {id(p): name for name, m in candidates.items()  # weight and bias ids -> their candidate
                     for p in (m._parameters.get("weight"), m._parameters.get("bias")) if p is not None}
        self.ran: set[str] = set()
        self.running: list[str] = []  # the candidates running now, innermost last
        self.own_calls: dict[str, int] = {}  # own linear/conv calls in the candidate's current run
        # its own call's op, result, and that result's version
        self.own_results: dict[str, tuple[str, torch.Tensor, Any]] = {}
        # per running candidate: its input and what its forward computed from it that holds the input's codes
        # (`_KEEPS_CODES`), by id (the tensors held, so that their ids stay theirs)
        self.input_like: dict[str, dict[int, torch.Tensor]] = {}
        self.made_by: dict[int, str] = {}  # what a running candidate's forward computed, by id -> the call
        self.foreign: dict[str, set[str]] = {}  # candidate -> what else read its weight or bias
        self.call_outputs: dict[int, torch.Tensor] | None = None  # call index -> its result (`_Outputs`)
        self.weight_holders: dict[tuple[Any, ...], nn.Module] = {}  # (parameter id, kind) -> its first layer
        # per call: the shape of each tensor it read (None for stored ones), then its result's
        self.shapes: list[list[tuple[int, ...] | None]] = []

    def _own(self, op: str | None, named: dict[str, Any]) -> set[int]:
        """The ids of the weight (and bias) that this call reads as the running candidate's own MAC."""
        if op != "linear" and op not in _CONVS or not self.running:
            return set()
        owner = self.running[-1]
        weight, bias = named.get("weight"), named.get("bias")
        if self.held.get(id(weight)) != owner or (bias is not None and self.held.get(id(bias)) != owner):
            return set()
        self.own_calls[owner] = self.own_calls.get(owner, 0) + 1
        if self.own_calls[owner] > 1:  # its hooks wrap one call per run
            return set()
        return {id(weight), id(bias)}

    def _follow_input(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Within the innermost running candidate's forward: note what it computes from its input that still holds
        the input's codes (`_keeps_codes`), and what computed everything else (named if its own call reads it)."""
        owner = self.running[-1]
        like = self.input_like.get(owner)
        name = _function_name(func)
        results = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        keeps = like is not None and self._keeps_codes(name, args, kwargs, like)
        for result in results:
            if keeps and like is not None:
                like[id(result)] = result
            elif like is not None:
                like.pop(id(result), None)
                self.made_by[id(result)] = name

    def _keeps_codes(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     like: dict[int, torch.Tensor]) -> bool:
        """Whether the call gives codes where its first argument holds the running layer's input codes."""
        if name not in _KEEPS_CODES or not args or id(args[0]) not in like:
            return False
        if name == "pad":
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            value = kwargs.get("value", args[3] if len(args) > 3 else None)
            return mode != "constant" or not value
        if name in ("to", "type_as"):  # a cast to another float dtype holds the same integers; not to an integer one
            target = next((arg for arg in (*args[1:], *kwargs.values()) if isinstance(arg, torch.dtype)), None)
            other = args[1] if name == "type_as" and len(args) > 1 else None
            dtype = other.dtype if isinstance(other, torch.Tensor) else target
            return dtype is None or dtype.is_floating_point
        return True

    def _track_stored(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Note `out` as stored (see `stored`) when every tensor the call read is, and no argument is the batch
        size (`cls_token.expand(n, -1, -1)` holds a row per image) unless the call only rearranges its elements
        (`weight.reshape(1, out_channels, -1)` where out_channels happens to be the batch size); else forget it
        (an in-place op on a stored tensor with an image's data)."""
        leaves = pytree.tree_leaves((args, kwargs))
        batch = 0 if _function_name(func) in _REARRANGING else self.batch
        stored = all(id(leaf) in self.stored if isinstance(leaf, torch.Tensor)
                     else not (isinstance(leaf, int) and not isinstance(leaf, bool) and leaf == batch)
                     and not (isinstance(leaf, torch.Size) and batch in leaf)
                     for leaf in leaves)
        sources = frozenset().union(*(self.sources.get(id(leaf), frozenset()) for leaf in leaves
                                      if isinstance(leaf, torch.Tensor))) if stored else frozenset()
        for result in pytree.tree_leaves(out):
            if isinstance(result, torch.Tensor) and id(result) not in self.parameters:  # `W.type_as(x)` is W
                if stored:
                    self.stored[id(result)] = result
                    self.sources[id(result)] = sources
                else:
                    self.stored.pop(id(result), None)
                    self.sources.pop(id(result), None)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _COMPOSITES:  # watched inside: its own linear and matmul calls are the MACs
            with self:
                return _COMPOSITES[func](*args, **kwargs)
        op = _op(func)
        out = func(*args, **kwargs)
        self._track_stored(func, args, kwargs, out)
        named = _arguments(op, args, kwargs) if op is not None else {}
        own = self._own(op, named)
        if own and isinstance(out, torch.Tensor):
            runner = self.running[-1]
            self.own_results[runner] = (str(op), out, _version_of(out))
            first = named.get("input")
            if runner in self.input_like and id(first) not in self.input_like[runner]:
                self.foreign.setdefault(runner, set()).add(
                    f"its forward computes its own {op} call's input with {self.made_by.get(id(first), 'a call')} "
                    "from its input (the engine hands a layer its input's integer codes, which only a "
                    "rearrangement or a zero padding keeps)")
        elif self.running and op is None:
            self._follow_input(func, args, kwargs, out)
        where = self.stack[-1] if self.stack else ""
        if _function_name(func) not in _METADATA:
            for tensor in pytree.tree_leaves((args, kwargs)):
                owner = self.held.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
                if owner is not None and id(tensor) not in own:
                    self.foreign.setdefault(owner, set()).add(f"{_function_name(func)} in {where or 'the model'}")
        if op is None or own:
            return out
        module, weight, reason = _module_for(op, named, out, self.batch, self.parameters, self.stored)
        if module is not None and weight is not None:  # a parameter two calls use is stored once: one tensor
            layer = _layer_of(module)
            # x @ W holds W^T; W @ x, x @ W.t() and F.linear(x, W) hold W: one layout per key
            orientation = ("left" if isinstance(_unfolded(module), LeftLinear)
                           else op == "linear" or _transpose_of(named.get("b"), self.parameters) is not None
                           or op == "einsum" and _holds_w(named, self.parameters))
            first = self.weight_holders.setdefault((weight, type(layer), orientation), layer)
            if first is not layer and first.weight.shape == layer.weight.shape:
                layer.weight = first.weight  # `quantization` ties their codes (QuantLayer.weight_group)
        computed = (named.get("weight") if module is not None and weight is None and (op == "linear" or op in _CONVS)
                    else None)
        if computed is not None and module is not None:  # computed from stored tensors: stored once, as one
            layer = _layer_of(module)                     # value computed from the same sources
            first = self.weight_holders.setdefault((self.sources.get(id(computed)), type(layer)), layer)
            held, mine = first.weight, layer.weight
            if (first is not layer and isinstance(held, torch.Tensor) and isinstance(mine, torch.Tensor)
                    and held.shape == mine.shape and torch.equal(held, mine)):
                layer.weight = held
        elements = _computed_weight(op, named, self.batch, self.stored, self.parameters)
        if self.call_outputs is not None and isinstance(out, torch.Tensor):
            self.call_outputs[len(self.plan.calls)] = out.detach().clone()
        self.plan.calls.append(Call(op, where, module, None, weight, reason, 0 if module is not None else elements,
                                    float_elements=elements))
        self.shapes.append([None if not isinstance(t, torch.Tensor) or id(t) in self.stored else tuple(t.shape)
                            for t in [*pytree.tree_leaves((args, kwargs)), out]])
        transposed = _transpose_of(named.get("b"), self.parameters) if op in ("matmul", "rmatmul", "mm") else None
        if module is not None and transposed is not None and weight == id(transposed):
            self.plan.calls[-1].transposed = transposed
        if computed is not None:
            self.plan.calls[-1].computed_weight = computed.detach().clone()
            self.plan.calls[-1].computed_from = self.sources.get(id(computed), frozenset())
        bias = named.get("bias") if op == "linear" or op in _CONVS else None
        if module is not None and isinstance(bias, torch.Tensor) and id(bias) not in self.parameters:
            self.plan.calls[-1].computed_bias = bias.detach().clone()
        elif module is not None and isinstance(bias, torch.Tensor):
            self.plan.calls[-1].bias = id(bias)
        return out

    @contextmanager
    def watching(self) -> Iterator[FunctionalPlan]:
        """Active for the block, with the innermost running module of the model tracked for naming."""
        def enter(module: nn.Module, args: Any) -> None:
            if id(module) in self.names:
                self.stack.append(self.names[id(module)])
            if id(module) in self.candidates:
                name = self.candidates[id(module)]
                self.ran.add(name)
                self.running.append(name)
                self.own_calls[name] = 0
                self.own_results.pop(name, None)
                first = args[0] if args else None
                if isinstance(first, torch.Tensor):
                    self.input_like[name] = {id(first): first}
                if isinstance(first, torch.Tensor) and (first.dim() == 0 or first.shape[0] != self.batch
                                                         or id(first) in self.stored):
                    # a computation shared by every image (a Linear on learned latent queries): no image's fault
                    self.foreign.setdefault(name, set()).add("a call on a tensor without the batch dimension")

        def leave(module: nn.Module, args: Any, out: Any) -> None:
            if id(module) in self.names and self.stack:
                self.stack.pop()
            if id(module) in self.candidates and self.running:
                name = self.running.pop()
                result = self.own_results.pop(name, None)
                self.input_like.pop(name, None)
                if not self.own_calls.get(name) and module._parameters.get("weight") is not None and \
                        name not in self.foreign:  # (where something else read its weight, that says it)
                    self.foreign.setdefault(name, set()).add(
                        f"its forward ({type(module).__qualname__}.forward"
                        f"{', set on the instance' if 'forward' in module.__dict__ else ''}) makes no call of its "
                        "own on its weight")
                if result is not None and (out is not result[1] or _version_of(out) != result[2]):
                    self.foreign.setdefault(name, set()).add(
                        f"its forward ({type(module).__qualname__}.forward"
                        f"{', set on the instance' if 'forward' in module.__dict__ else ''}) returns more than its "
                        f"own {result[0]} call computes")

        handles = [nn.modules.module.register_module_forward_pre_hook(enter),
                   nn.modules.module.register_module_forward_hook(leave)]
        try:
            with self, FusedAttentionOff():
                yield self.plan
        finally:
            for handle in handles:
                handle.remove()
        _name_calls(self.plan)


def _version_of(tensor: torch.Tensor) -> Any:
    """A tensor's version counter (bumped by every in-place write), or None for one without (inference mode)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _name_calls(plan: FunctionalPlan) -> None:
    """Layer names: the calling module's name and the op, e.g. "blocks.0.attn.matmul()", numbered from the second
    call of one op in one module ("matmul_2()")."""
    seen: dict[tuple[str, str], int] = {}
    for call in plan.calls:
        if call.module is None:
            continue
        op = "matmul" if call.op == "rmatmul" else call.op
        count = seen[(call.where, op)] = seen.get((call.where, op), 0) + 1
        stem = f"{op}()" if count == 1 else f"{op}_{count}()"
        call.name = f"{call.where}.{stem}" if call.where else stem


def _own_parameters(candidates: dict[str, nn.Module]) -> None:
    """Give each candidate's weight and bias a Parameter object of its own (the same storage), as quantization
    will: then a read through the candidate (`self.fc.weight`) is told from a read of the same tensor through
    another module (an embedding table tied to a Linear head), which keeps the float values."""
    for module in candidates.values():
        for attr in ("weight", "bias"):
            param = module._parameters.get(attr)
            if param is not None:
                module._parameters[attr] = nn.Parameter(param.detach(), requires_grad=False)


def discover(model: nn.Module, x: Any, candidates: dict[str, nn.Module]
             ) -> tuple[FunctionalPlan, set[str], dict[str, list[str]]]:
    """The functional MAC calls of `model`'s forward pass on the batch `x`, the `candidates` (layer modules) that
    are layers, and those left out because something else reads their weight or bias (name -> what read it).

    A candidate is a layer when it runs and nothing but its own linear/conv call reads its weight and bias. The
    MAC calls of one left out become functional calls (layers holding their own copy of the weight), so the
    module keeps the model's values for everything else. One forward, and one more per round of exclusions."""
    _own_parameters(candidates)
    excluded: dict[str, list[str]] = {}
    while True:
        watcher = _Discover(model, len(x), candidates)
        with torch.no_grad(), watcher.watching() as plan:
            call_model(model, x)
        foreign = {name: sorted(uses) for name, uses in watcher.foreign.items() if name in watcher.ran}
        if not foreign:
            foreign = _check_batch_dimension(model, x, candidates, plan, watcher.shapes)
        if not foreign:
            foreign = _check_placement(model, x, candidates, plan)
        if not foreign:
            return plan, watcher.ran, excluded
        excluded.update(foreign)
        candidates = {name: module for name, module in candidates.items() if name not in foreign}


def _image_axis(module: nn.Module | None) -> tuple[int, int]:
    """(the dimension along which a call's module reads the images, rows per image on it)."""
    if isinstance(module, BatchSecond):
        return 1, 1
    return 0, module.fold if isinstance(module, Folded) else 1


def _follows(module: nn.Module, shapes: list[tuple[int, ...] | None], probe: list[tuple[int, ...] | None],
             images: int, other: int) -> bool:
    """Whether every tensor of a call that held `images` images (x rows per image) along the module's image axis
    holds `other` images there in the probe's forward, its result included."""
    axis, rows = _image_axis(module)
    if len(shapes) != len(probe):
        return False
    result = shapes[-1]
    if result is None or len(result) <= axis or result[axis] != images * rows:
        return False
    return all(probe_shape is not None and len(probe_shape) > axis and probe_shape[axis] == other * rows
               for shape, probe_shape in zip(shapes, probe)
               if shape is not None and len(shape) > axis and shape[axis] == images * rows)


def _check_batch_dimension(model: nn.Module, x: Any, candidates: dict[str, nn.Module], plan: FunctionalPlan,
                           shapes: list[list[tuple[int, ...] | None]]) -> dict[str, list[str]]:
    """What `discover` took for the images by their number alone must follow the batch size: the same forward on
    another number of images must show the same number of rows per image where each layer reads them. A
    sequence-first [T, N, D] tensor with T = N, or a table with as many rows as there are images, reads as N images
    on one batch size only: such a candidate is returned (to be left out; its calls then become functional calls),
    such a call stays in float."""
    images = len(x)
    other = 2 if images != 2 else 1
    probe_x = x[:other] if other <= images else x[torch.zeros(other, dtype=torch.int64)]
    probe = _Discover(model, other, candidates)
    with torch.no_grad(), probe.watching() as probe_plan:
        call_model(model, probe_x)
    reason = (f"its images' dimension did not follow the batch size (the same size for {images} and {other} "
              "image(s)): it does not hold the images (a sequence-first [T, N, ...] input with T = N?)")
    foreign = {name: [reason] for name in probe.foreign if name in probe.ran}
    if foreign or [c.op for c in probe_plan.calls] != [c.op for c in plan.calls]:
        return foreign  # another call sequence on another batch size: the view refuses it when it runs
    changed = False
    for call, call_shapes, probe_shapes in zip(plan.calls, shapes, probe.shapes):
        if call.module is None or _follows(call.module, call_shapes, probe_shapes, images, other):
            continue
        if call.op == "linear" and isinstance(call.module, (Folded, nn.Linear)):  # [T, N, D], T a multiple of N
            second = BatchSecond(_unfolded(call.module))
            if _follows(second, call_shapes, probe_shapes, images, other):
                call.module = second
                continue
        call.weight_elements = call.float_elements
        call.module, call.weight, call.reason, call.name, call.transposed = None, None, reason, None, None
        call.computed_bias = call.computed_weight = None
        changed = True
    if changed:
        _name_calls(plan)
    return {}


def _check_placement(model: nn.Module, x: Any, candidates: dict[str, nn.Module], plan: FunctionalPlan
                     ) -> dict[str, list[str]]:
    """Faults are placed per image, so each layer must read image i where it places image i's faults. Changing
    each of the first few calibration images in turn must change only that image's rows: row i of a module layer's
    or a call's result, rows i x k ... (i + 1) x k - 1 of a `Folded` call's, column i of a `BatchSecond` call's.
    Otherwise faults would land in other images (a batch permuted before a layer) and results would depend on the
    batch split. A module layer that fails is returned (to be left out: its calls become functional calls); a call
    that fails stays in float, named with why. A folded call whose rows hold the images step by step (changing
    image i changes rows t x N + i only) is `Interleaved` instead; one whose number of rows changes stays in float."""
    # a few distinct images show the order as well as many, at a fraction of the forward passes' cost
    distinct = _distinct_images(x, 4)
    if len(distinct) < 2 <= len(x):  # copies of one image: no change of one into another shows anything
        for index in placed_calls(plan):
            _to_float(plan.calls[index], _SAME_IMAGES)
        _name_calls(plan)
        return {name: [_SAME_IMAGES] for name in candidates}
    x = x[torch.tensor(distinct)] if distinct != list(range(len(distinct))) else x[:len(distinct)]
    images = len(x)
    placed = placed_calls(plan)
    folded = [index for index in placed if isinstance(plan.calls[index].module, Folded)]
    if images < 2:  # one image shows no order: a folded call's rows could hold anything
        for index in folded:
            _to_float(plan.calls[index], "it folds images into its batch dimension, and the first calibration batch "
                                         "has one image: give two or more, to check that each image's rows lie "
                                         "together")
        _name_calls(plan)
        return {}
    watch = bool(plan.calls)  # without functional calls, the forward passes need no torch-function mode
    base = _Outputs(model, x, candidates, watch)
    wrong: set[Any] = set()  # calls (index) and module calls ((name, call)) whose rows hold another image's data
    not_interleaved: set[Any] = set()  # folded calls whose rows do not hold the images step by step either
    varying: set[Any] = set()
    moved: set[Any] = set()
    for image in range(images):  # each of the few images in turn
        other = next((j for j in range(images) if not _same_image(x, image, j)), None)
        if other is None:  # all the same image: nothing can be told
            wrong |= set(placed) | set(base.modules)
            continue
        changed = _Outputs(model, _replaced(x, image, other), candidates, watch)
        if base.others_moved(changed, image):  # the images read each other: no layer can show its order; the
            for index in folded:  # campaign refuses such a model, naming why (`evaluate.check_repeatable`)
                _to_float(plan.calls[index], _OUT_OF_ORDER)
            _name_calls(plan)
            return {}
        entries: list[tuple[Any, torch.Tensor | None]] = [*((i, base.calls.get(i)) for i in placed),
                                                          *base.modules.items()]
        for key, before in entries:
            after = changed.calls.get(key) if isinstance(key, int) else changed.modules.get(key)
            if before is None:  # no result recorded (another call sequence): nothing can be told
                wrong.add(key)
                not_interleaved.add(key)
                continue
            if after is None or after.shape != before.shape:
                (varying if key in folded else wrong).add(key)
                continue
            module = plan.calls[key].module if isinstance(key, int) else None
            second, fold = isinstance(module, BatchSecond), module.fold if isinstance(module, Folded) else 1
            differ = ~((after == before) | (after.isnan() & before.isnan()))
            if second:
                differ = differ.transpose(0, 1)
            if len(differ) != images * fold:
                wrong.add(key)
                continue
            rows = differ.reshape(images * fold, -1).any(dim=1).nonzero().flatten()
            if len(rows):
                moved.add(key)
            if len(rows) and (int(rows.min()) < image * fold or int(rows.max()) >= (image + 1) * fold) \
                    or key in folded and not len(rows):  # a fold with no rows moved shows no order
                wrong.add(key)
            if key in folded and (not len(rows) or bool((rows % images != image).any())):  # nor step by step
                not_interleaved.add(key)
    if wrong - set(folded) and not base.same_as(_Outputs(model, x, candidates, watch)):
        # the forward is not repeatable (a random op): the campaign refuses it (`evaluate.check_repeatable`)
        for index in folded:
            _to_float(plan.calls[index], _OUT_OF_ORDER)
        _name_calls(plan)
        return {}
    wrong |= varying
    not_interleaved |= varying
    _order_of_unmoved(plan, [index for index in folded if index not in moved | varying], wrong, not_interleaved)
    for index in sorted(set(folded) & wrong - not_interleaved):  # step by step: a layer all the same
        call = plan.calls[index]
        assert isinstance(call.module, Folded)
        call.module = Interleaved(call.module.layer, call.module.fold)
    for index in sorted(set(placed) & wrong & (not_interleaved | (set(placed) - set(folded)))):
        _to_float(plan.calls[index], _VARYING_ROWS if index in varying else _OUT_OF_ORDER if index in folded
                  else _OUT_OF_PLACE)
    _name_calls(plan)
    return {name: [_OUT_OF_PLACE] for name, _ in sorted(key for key in wrong if not isinstance(key, int))}


def _to_float(call: Call, reason: str) -> None:
    """Leave `call` in float, with why."""
    call.weight_elements = call.float_elements
    call.module, call.weight, call.name, call.reason = None, None, None, reason
    call.computed_bias = call.computed_weight = call.calibrate_with = None


_OUT_OF_ORDER = ("it folds images into its batch dimension (k rows per image) in another order than image by image, "
                 "so faults could not be placed per image")
_OUT_OF_PLACE = ("its images are not in their own rows: changing one image changed another image's rows (a batch "
                 "reordered before it?), so faults could not be placed per image")
_SAME_IMAGES = ("the first calibration batch holds copies of one image, so which rows hold which image cannot be "
                "checked, and faults could not be placed per image: calibrate on distinct images")
_VARYING_ROWS = ("its rows are not a fixed number per image: their number changed with the images' content (tokens "
                 "routed by content, as in a mixture of experts), so faults could not be placed per image")


def _order_of_unmoved(plan: FunctionalPlan, unmoved: list[int], bad: set[Any], not_interleaved: set[int]) -> None:
    """A folded call whose result no image changes (a recurrent cell's first step on a zero state) shows no order.
    It takes the order found for the calls of the same op, weight and fold in the same forward (the cell's later
    steps, which read the state it starts), where they all agree; otherwise it stays out of order (in float)."""
    for index in unmoved:
        call = plan.calls[index]
        assert isinstance(call.module, Folded)
        siblings = [j for j, other in enumerate(plan.calls)
                    if j != index and j not in unmoved and other.op == call.op and call.weight is not None
                    and other.weight == call.weight and isinstance(other.module, Folded)
                    and other.module.fold == call.module.fold]
        orders = {"image by image" if j not in bad else "step by step" if j not in not_interleaved else "neither"
                  for j in siblings}
        if orders == {"image by image"}:
            bad.discard(index)
            not_interleaved.discard(index)
        elif orders == {"step by step"}:
            not_interleaved.discard(index)
        else:
            continue
        call.calibrate_with = min(siblings, key=lambda j: abs(j - index))


class _Outputs:
    """Each layer call's result in one forward pass on `x`: functional calls by index (`calls`), and module layers
    by (name, call) (`modules`)."""

    def __init__(self, model: nn.Module, x: Any, candidates: dict[str, nn.Module], watch: bool = True) -> None:
        watcher = _Discover(model, len(x), candidates)
        self.calls: dict[int, torch.Tensor] = {}
        watcher.call_outputs = self.calls
        self.modules: dict[tuple[str, int], torch.Tensor] = {}

        def recorder(name: str) -> Any:
            def record(module: nn.Module, args: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor):
                    call = sum(1 for key in self.modules if key[0] == name)
                    self.modules[(name, call)] = out.detach().clone()
            return record

        handles = [module.register_forward_hook(recorder(name)) for name, module in candidates.items()]
        try:
            with torch.no_grad(), (watcher.watching() if watch else FusedAttentionOff()):
                out = call_model(model, x)
        finally:
            for handle in handles:
                handle.remove()
        # the model's results that hold a row per image
        self.results = [t.detach().clone() for t in pytree.tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.dim() and len(t) == len(x)]

    def others_moved(self, changed: _Outputs, image: int) -> bool:
        """Whether changing `image` moved another image's results: the images read each other (a batch mean,
        attention across the batch), which the campaign refuses (`check_repeatable`)."""
        for before, after in zip(self.results, changed.results):
            if before.shape != after.shape:
                return True
            differ = ~((after == before) | (after.isnan() & before.isnan()))
            rows = differ.reshape(len(differ), -1).any(dim=1).nonzero().flatten()
            if bool((rows != image).any()):
                return True
        return len(self.results) != len(changed.results)

    def same_as(self, other: _Outputs) -> bool:
        def equal(a: torch.Tensor, b: torch.Tensor | None) -> bool:
            return b is not None and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
        return (self.calls.keys() == other.calls.keys() and self.modules.keys() == other.modules.keys()
                and all(equal(value, other.calls.get(key)) for key, value in self.calls.items())
                and all(equal(value, other.modules.get(key)) for key, value in self.modules.items()))


def placed_calls(plan: FunctionalPlan) -> list[int]:
    """The calls of `plan` that are layers (the rest stay in float)."""
    return [index for index, call in enumerate(plan.calls) if call.module is not None]


def _distinct_images(x: Any, wanted: int) -> list[int]:
    """The positions of up to `wanted` images of `x`, no two the same: the first, skipping repeats."""
    chosen: list[int] = []
    for index in range(len(x)):
        if all(not _same_image(x, index, other) for other in chosen):
            chosen.append(index)
            if len(chosen) == wanted:
                break
    return chosen


def _same_image(x: Any, a: int, b: int) -> bool:
    tensors = x.tensors if isinstance(x, Inputs) else (x,)
    return all(torch.equal(t[a], t[b]) for t in tensors)


def _replaced(x: Any, image: int, other: int) -> Any:
    """`x` with its `image` replaced by its `other`."""
    def replace(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[image] = t[other]
        return t
    return Inputs(tuple(map(replace, x.tensors)), x.names) if isinstance(x, Inputs) else replace(x)


class Dispatch(TorchFunctionMode):
    """Routes the k-th functional MAC call of a forward pass to the module of `plan.calls[k]`."""

    def __init__(self, plan: FunctionalPlan, layer_weights: set[int], images: int | None = None) -> None:
        super().__init__()
        self.plan, self.layer_weights, self.count = plan, layer_weights, 0
        self.images = images  # in this forward pass, where known: a folded call must hold k rows for each
        self.depth = 0  # entered again inside a composite call (`_COMPOSITES`): the count is checked on leaving last

    def __enter__(self) -> Dispatch:
        self.depth += 1
        super().__enter__()
        return self

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _COMPOSITES:  # as `_Discover` watched it: its calls routed one by one
            with self:
                return _COMPOSITES[func](*args, **kwargs)
        op = _op(func)
        if op is None:
            return func(*args, **kwargs)
        named = _arguments(op, args, kwargs)
        if id(named.get("weight")) in self.layer_weights:
            return func(*args, **kwargs)
        k, calls = self.count, self.plan.calls
        self.count += 1
        if k >= len(calls) or calls[k].op != op:
            expected = f"{calls[k].op} (from {calls[k].where or 'the model'})" if k < len(calls) else "no call"
            raise CallOrderError(f"functional call {k} of this forward pass is {op}, where {expected} ran when the "
                               "model was quantized: the view places faults by call order, so the model must make "
                               "the same functional calls in every forward pass")
        if calls[k].module is None:
            return func(*args, **kwargs)
        if self.images is not None and isinstance(calls[k].module, (Folded, Interleaved)):
            _check_rows(calls[k], named, self.images)
        return _invoke(calls[k], named)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        super().__exit__(exc_type, exc, tb)
        self.depth -= 1
        if exc_type is None and not self.depth and self.count != len(self.plan.calls):
            raise CallOrderError(f"this forward pass made {self.count} functional multiply-accumulate calls where "
                                 f"{len(self.plan.calls)} ran when the model was quantized: the view places faults "
                                 "by call order, so the model must make the same functional calls in every forward "
                                 "pass")


def _check_rows(call: Call, named: dict[str, Any], images: int) -> None:
    """A folded call's first operand holds k rows per image of the forward pass, or faults would be placed in the
    wrong images (a number of rows that the content decides, which `discover` saw as k per image by chance)."""
    module = call.module
    assert isinstance(module, (Folded, Interleaved))
    first = named.get({"baddbmm": "batch1", "scaled_dot_product_attention": "query"}.get(
        call.op, "a" if call.op in ("matmul", "rmatmul", "bmm", "mm") else "input"))
    if isinstance(first, torch.Tensor) and len(first) != images * module.fold:
        raise CallOrderError(f"functional call {call.name!r} read {len(first)} rows for {images} image(s), where it "
                             f"read {module.fold} per image when the model was quantized: {_VARYING_ROWS}")


@contextmanager
def quantized_forward(plan: FunctionalPlan | None, layer_weights: set[int] | None = None,
                      images: int | None = None) -> Iterator[None]:
    """The context of one forward pass of the view: the fused attention fast path off, and functional calls
    dispatched to their layers when the model makes any (a TorchFunctionMode costs every torch call a Python
    call, so models without functional layers run without one). `images`: the forward pass's, where known."""
    with FusedAttentionOff():
        if plan:
            with Dispatch(plan, layer_weights or set(), images):
                yield
        else:
            yield


__all__ = ["Call", "CallOrderError", "Dispatch", "FunctionalPlan", "discover", "quantized_forward"]
