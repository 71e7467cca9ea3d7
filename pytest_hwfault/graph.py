"""What the model's graph tells the quantizer, found by tracing it with torch.fx.

- BatchNorm directly after a conv/linear is folded into it, as an inference accelerator does. Folding changes the
  weights that get quantized (and so the scales), which is what hardware actually stores.
- A layer whose input is another quantized layer's output, passed only through ops that keep values on its code
  grid (ReLU, max-pooling, reshapes), reads those very codes: it shares their scale and needs no requantization.
- A producer whose output goes *only* to such readers (through such ops) hands its codes on as they are, never
  dequantized, as an accelerator's output buffer feeds the next layer: this saves three elementwise passes.

A model that fx cannot trace keeps its BatchNorm layers in float after the quantized layer and requantizes every
layer input; `QuantizedModel.bn_kept` and `QuantizedModel.fold_error` say so.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def fold_batchnorm(model: nn.Module) -> tuple[list[tuple[str, str]], list[str], str | None]:
    """Fold, in place on `model` (a private copy in eval mode), every BN whose only input is a conv/linear output
    used by nothing else, where the forward reads neither module's tensors directly. Returns (folded (layer, bn)
    pairs, BN modules kept, why tracing failed or None)."""
    all_bn = [name for name, m in model.named_modules() if isinstance(m, _BN)]
    if not all_bn:
        return [], [], None
    try:
        graph = torch.fx.symbolic_trace(model).graph
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
        graph = torch.fx.symbolic_trace(model).graph
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
        graph = torch.fx.symbolic_trace(model).graph
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
