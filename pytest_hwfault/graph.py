"""What the model's graph tells the quantizer, found by tracing it with torch.fx.

- BatchNorm directly after a conv/linear is folded into it, as an inference accelerator does. Folding changes the
  weights that get quantized (and so the scales), which is what hardware actually stores.
- A layer whose input is another quantized layer's output, passed only through ops that keep values on its code
  grid (ReLU, max-pooling, reshapes), reads those very codes: it shares their scale and needs no requantization.
- A producer whose output goes *only* to such readers (through such ops) hands its codes on as they are, never
  dequantized, as an accelerator's output buffer feeds the next layer: this saves three elementwise passes.

A model that fx cannot trace keeps its BatchNorm layers in float after the quantized layer and requantizes every
layer input; `QuantizedModel.bn_kept` and `QuantizedModel.fold_error` say so. So does a model whose traced graph
computes other values than its forward (`trace_disagreement`: a branch on `torch.fx` tracing), since every analysis
here reads the traced graph as the forward's.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _same_values(a: Any, b: Any) -> bool:
    """Whether two forward results hold the same values bit for bit (NaN where NaN is), container by container."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape or \
                a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            a, b = torch.view_as_real(a) if a.is_complex() else a, torch.view_as_real(b) if b.is_complex() else b
            return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)) and \
                torch.equal(a.signbit(), b.signbit())
        return torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(_same_values(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))
    if type(a) is type(b) and dataclasses.is_dataclass(a) and not isinstance(a, type):
        return all(_same_values(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if type(a) is type(b) and hasattr(a, "__dict__") and not isinstance(a, type) and vars(a):
        return _same_values(vars(a), vars(b))
    try:
        return bool(a == b)
    except Exception:  # an object with no truth value for ==: not comparable, so not known to agree
        return False


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with a module that says `fx_leaf = True` called as one node: a reader's module whose
    forward takes a data-dependent path (onnxruntime's dynamic output: the int32 wrap only where a sum can reach
    it) computes the same values either way, and a graph suffix calls it as it is."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(getattr(m, "fx_leaf", False)) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """torch.fx's symbolic trace of `model`, reader modules marked `fx_leaf` kept whole (`_Tracer`)."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def trace_disagreement(model: nn.Module, run: Callable[[nn.Module], Any]) -> str | None:
    """Why the graph torch.fx traces for `model` cannot stand for its forward, or None where it can.

    Every analysis in this module, and late start's graph suffixes, read the traced graph as what the forward does.
    A forward that branches on being traced (`torch.fx._symbolic_trace.is_fx_tracing()`), or on a flag the trace
    fixed, computes something else: a BN folded, a layer's output taken in place or its codes handed on would then
    change what the model computes. So the traced graph and the forward run on the same example (`run` calls a
    module on it, as the model is called) and must agree bit for bit; where the forward itself gives two answers,
    the check cannot tell, and the trace is not trusted either."""
    try:
        traced = trace(model)
    except Exception as exc:  # any tracing failure: the analyses fall back, and say why
        return f"torch.fx cannot trace the model: {type(exc).__name__}: {exc}".splitlines()[0]
    with torch.no_grad():
        try:
            eager = run(model)
        except Exception as exc:  # calibration will say what is wrong with the model, on its own batches
            return f"the model's forward fails on the images the trace is checked on: {type(exc).__name__}: {exc}" \
                .splitlines()[0]
        try:
            replayed = run(traced)
        except Exception as exc:
            return (f"the graph torch.fx traces for the model fails where its forward runs: {type(exc).__name__}: "
                    f"{exc}").splitlines()[0]
        if _same_values(eager, replayed):
            return None
        if not _same_values(eager, run(model)):
            return ("the model's forward gave two different results on the same images, so the graph torch.fx "
                    "traces for it cannot be checked against it")
    return ("the graph torch.fx traces for the model computes other values than its forward on the same images "
            "(does the forward branch on torch.fx tracing?)")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def fold_batchnorm(model: nn.Module, untraceable: str | None = None) -> tuple[list[tuple[str, str]], list[str],
                                                                              str | None]:
    """Fold, in place on `model` (a private copy in eval mode), every BN whose only input is a conv/linear output
    used by nothing else, where the forward reads neither module's tensors directly. Returns (folded (layer, bn)
    pairs, BN modules kept, why tracing failed or None). `untraceable`: why the traced graph cannot be trusted
    (`trace_disagreement`), if known: then nothing is folded."""
    all_bn = [name for name, m in model.named_modules() if isinstance(m, _BN)]
    if not all_bn:
        return [], [], None
    if untraceable:
        return [], all_bn, untraceable
    try:
        graph = trace(model).graph
    except Exception as exc:  # any tracing failure means: keep BN, and say why
        return [], all_bn, f"{type(exc).__name__}: {exc}".splitlines()[0]
    modules = dict(model.named_modules())
    uses: dict[str, int] = {}
    read: set[str] = set()  # modules whose tensors the forward reads directly (`self.bn.running_mean`)
    for node in graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
        elif node.op == "get_attr":
            owner = str(node.target)
            while "." in owner:
                owner = owner.rpartition(".")[0]
                read.add(owner)
    folded: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        producer = node.args[0] if node.args else None
        if not isinstance(producer, torch.fx.Node) or producer.op != "call_module" or len(producer.users) != 1:
            continue
        layer, bn = modules[str(producer.target)], modules[str(node.target)]
        if uses[str(producer.target)] != 1 or uses[str(node.target)] != 1 or not bn.track_running_stats:
            continue
        if {str(producer.target), str(node.target)} & read:  # folding would change what that read sees
            continue
        if not _holds_its_tensors(layer):
            continue
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        assert bn.running_mean is not None and bn.running_var is not None  # track_running_stats
        if isinstance(layer, _CONV) and layer.weight.shape[0] == bn.num_features:
            w, b = fuse_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
        elif isinstance(layer, _CONV_TRANSPOSE) and layer.groups == 1 and layer.weight.shape[1] == bn.num_features:
            w, b = fuse_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias, transpose=True)  # output channels along dim 1
        elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and layer.out_features == bn.num_features:
            w, b = fuse_linear_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                                          bn.weight, bn.bias)
        else:
            continue
        layer.weight = nn.Parameter(w.detach(), requires_grad=False)
        layer.bias = nn.Parameter(b.detach(), requires_grad=False)
        _set_submodule(model, str(node.target), nn.Identity())
        folded.append((str(producer.target), str(node.target)))
    folded_bn = {bn for _, bn in folded}
    return folded, [name for name in all_bn if name not in folded_bn], None


def _holds_its_tensors(layer: nn.Module) -> bool:
    """Whether the layer's weight and bias are its own parameters (or parametrized), which folding may replace. A
    weight computed by a forward pre-hook (`torch.nn.utils.prune`'s `weight_orig * weight_mask`, the hook-based
    `weight_norm`) is set again by the hook on every call, which a folded Parameter in its place breaks."""
    from torch.nn.utils import parametrize

    return all(name in layer._parameters or parametrize.is_parametrized(layer, name) for name in ("weight", "bias"))


_GRID_MODULES = (nn.ReLU, nn.Identity, nn.Flatten, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_GRID_FUNCTIONS = {F.relu, torch.relu, torch.relu_, torch.flatten, torch.reshape, F.max_pool1d, F.max_pool2d,
                   F.max_pool3d}
_GRID_METHODS = {"relu", "relu_", "view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze"}


def _keeps_grid(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Ops whose output values are a subset of their first input's values (or zero), in eval mode."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return isinstance(module, _GRID_MODULES) and not isinstance(module, nn.ReLU6)
    if node.op == "call_function":
        return node.target in _GRID_FUNCTIONS
    if node.op == "call_method":
        return node.target in _GRID_METHODS
    return False


@dataclass
class CodeLinks:
    """How quantized layers pass codes to each other (see the module docstring)."""

    producers: dict[str, str] = field(default_factory=dict)  # reader layer -> the layer whose codes it reads
    codes_only: set[str] = field(default_factory=set)  # producers whose every use reads their codes


def code_links(model: nn.Module, layers: Collection[str]) -> CodeLinks:
    """For each of `layers` whose first input is, through grid-keeping ops only, the output of another of
    `layers`, the name of that producer; and the producers that only such readers use. Empty when the model cannot
    be traced."""
    try:
        graph = trace(model).graph
    except Exception:
        return CodeLinks()
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
            if node.kwargs and str(node.target) in layers:  # `self.fc(input=x)`: as the view's hooks see it
                module = modules[str(node.target)]
                bound = inspect.signature(type(module).forward).bind(module, *node.args, **node.kwargs)
                node.args, node.kwargs = bound.args[1:], bound.kwargs
    layer_nodes: dict[str, torch.fx.Node] = {}
    links = CodeLinks()
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) not in layers or not node.args:
            continue
        layer_nodes[str(node.target)] = node
        source = node.args[0]
        while isinstance(source, torch.fx.Node) and _keeps_grid(source, modules) and source.args:
            source = source.args[0]
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and str(source.target) in layers
            and calls[str(source.target)] == 1
            and calls[str(node.target)] == 1
        ):
            links.producers[str(node.target)] = str(source.target)
    for producer in set(links.producers.values()):
        if _only_read_as_codes(layer_nodes[producer], producer, links.producers, modules):
            links.codes_only.add(producer)
    return links


def _only_read_as_codes(node: torch.fx.Node, producer: str, producers: dict[str, str],
                        modules: dict[str, nn.Module]) -> bool:
    """Whether every use of `node`'s value, followed through grid-keeping ops, is a layer reading `producer`'s
    codes as its only input."""
    pending = [node]
    while pending:
        value = pending.pop()
        for user in value.users:
            only_first = bool(user.args) and user.args[0] is value and value not in user.args[1:] and not any(
                arg is value for arg in user.kwargs.values())
            if not only_first:
                return False
            if user.op == "call_module" and producers.get(str(user.target)) == producer:
                continue
            if not _keeps_grid(user, modules):
                return False
            pending.append(user)
    return True


# The model's own elementwise ops that may run in place on a layer's fresh output (see `in_place_chains`)
_RELU_FUNCTIONS = {F.relu, torch.relu}
_ADD_FUNCTIONS = {operator.add, torch.add}


def _in_place_step(node: torch.fx.Node, value: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """What `node` does to `value`, its only input that `value` is: "relu" (value as its input), "add" (value as
    one operand of a two-tensor sum), "pass" (an identity module: the same tensor), or None (anything else)."""
    args = (*node.args, *node.kwargs.values())
    if sum(arg is value for arg in args) != 1:
        return None
    if node.op == "call_module":
        module = type(modules.get(str(node.target)))
        return "relu" if module is nn.ReLU else "pass" if module is nn.Identity else None
    first = bool(node.args) and node.args[0] is value
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS or node.op == "call_method" and \
            node.target == "relu":
        return "relu" if first and set(node.kwargs) <= {"inplace"} else None
    if (node.op == "call_function" and node.target in _ADD_FUNCTIONS or node.op == "call_method" and
            node.target == "add") and len(node.args) == 2 and not node.kwargs:
        other = node.args[1] if first else node.args[0]
        return "add" if isinstance(other, torch.fx.Node) else None
    return None


def in_place_chains(model: nn.Module, layers: Collection[str]) -> dict[str, tuple[str, ...]]:
    """For each of `layers` called once, the ops ("relu", "add") that read its output and nothing else does, one
    after the other: each reads the previous one's result as its only reader. The layer's output is a fresh
    tensor, so these may run in place on it (`inplace.OwnOpsInPlace`) with the same values, and no new tensor.
    Empty when the model cannot be traced."""
    try:
        graph = trace(model).graph
    except Exception:
        return {}
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    chains: dict[str, tuple[str, ...]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) not in layers or calls[str(node.target)] != 1:
            continue
        steps: list[str] = []
        value = node
        while len(value.users) == 1:
            user = next(iter(value.users))
            step = _in_place_step(user, value, modules)
            if step is None:
                break
            if step != "pass":
                steps.append(step)
            value = user
        if steps:
            chains[str(node.target)] = tuple(steps)
    return chains
