"""A view of a deployed model compared with the model layer by layer, not only at its outputs.

Comparing outputs alone misses whatever does not reach them: a random-init or pruned model whose later layers
collapse to one code (a scale of 2^-23) hands every image the same logits, so a view that computes its earlier
layers otherwise still "agrees". The view keeps the model's module names, so each quantized layer (conv/linear)
is compared on its first call by its output codes: the model's stored codes minus the zero point, and the view's
as it hands them on (codes, or code x scale values: `QuantLayer.handed_on_scale`). An ONNX model's layers are
compared by the codes onnxruntime stores for them (`view_layer_codes`, `codes_agreement`, and
`onnx_faults.onnxruntime_layer_codes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LayerAgreement:
    """How many quantized layers' first outputs both the model and the view computed, and the modules whose output
    codes differ, in the model's order of calls: (name, type, equal codes, codes, a quantized layer)."""

    compared: int
    apart: tuple[tuple[str, str, int, int, bool], ...]
    unit: str = "codes"  # what is compared: output codes, or a dynamic module's float values

    @property
    def layers_apart(self) -> int:
        return sum(1 for *_, layer in self.apart if layer)

    def describe(self) -> str:
        """The difference in words (empty when there is none)."""
        if not self.apart:
            return ""
        name, kind, equal, total, _ = self.apart[0]
        return (f"the first module whose output differs: {name!r} ({kind}), or an op the model calls on its input "
                f"({equal} of {total} {self.unit} equal; {self.layers_apart} of {self.compared} quantized layers' "
                f"output {self.unit} differ)")


def _run_hooked(hooks: list[tuple[nn.Module, Callable[..., None]]], *runs: Callable[[], Any]) -> None:
    """Each run in turn, without gradients, with the forward hooks registered, then removed (also on an error)."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            for run in runs:
                run()
    finally:
        for handle in handles:
            handle.remove()


def layer_agreement(model: nn.Module, qmodel: Any, run_model: Callable[[], Any], run_view: Callable[[], Any]
                    ) -> LayerAgreement:
    """Run `run_model()` and `run_view()` with forward hooks on the model's modules and the view's (`qmodel`, a
    `QuantizedModel`) of the same names, and compare the first output codes of each quantized layer; and of every
    other module the model runs on quantized tensors, whose output the view may hold as codes or as code x scale
    values (either matches): the first module apart names where the view computes otherwise."""
    theirs: dict[str, tuple[torch.Tensor, float]] = {}
    ours: dict[str, torch.Tensor] = {}

    def keep_theirs(name: str) -> Any:
        def keep(module: nn.Module, args: Any, out: Any) -> None:  # returns None: the output stays
            if name not in theirs and isinstance(out, torch.Tensor) and out.is_quantized \
                    and out.qscheme() == torch.per_tensor_affine:
                theirs[name] = (out.int_repr().long() - int(out.q_zero_point()), float(out.q_scale()))
        return keep

    def keep_ours(name: str) -> Any:
        def keep(module: nn.Module, args: Any, out: Any) -> None:
            if name not in ours and isinstance(out, torch.Tensor) and out.is_floating_point():
                ours[name] = out.detach().float().clone()  # the view's later in-place ops may overwrite it
        return keep

    modules = dict(model.named_modules())
    views = dict(qmodel.module.named_modules())
    named = [name for name in modules if name and name in views]
    _run_hooked([(modules[name], keep_theirs(name)) for name in named]
                + [(views[name], keep_ours(name)) for name in named], run_model, run_view)
    compared, apart = 0, []
    for name, (codes, scale) in theirs.items():  # in the order the model called them
        mine = ours.get(name)
        if mine is None or mine.shape != codes.shape:
            continue
        mine = mine.cpu()
        layer = qmodel.layers.get(name)
        if layer is not None:
            compared += 1
            mine = torch.div(mine, torch.tensor(layer.handed_on_scale, dtype=torch.float32)).round()
            candidates = [mine]
        else:  # codes, or values on the model's grid
            candidates = [mine, torch.div(mine, torch.tensor(scale, dtype=torch.float32)).round()]
        if not any(torch.equal(codes.float(), c) for c in candidates):
            equal = max(int((codes.float() == c).sum()) for c in candidates)
            apart.append((name, type(modules[name]).__name__, equal, codes.numel(), layer is not None))
    return LayerAgreement(compared, tuple(apart))


def dynamic_layer_agreement(model: nn.Module, qmodel: Any, run_model: Callable[[], Any], run_view: Callable[[], Any]
                            ) -> LayerAgreement:
    """A dynamically quantized torch.ao model against its view: the float outputs of each of the model's dynamic
    modules (Linear, LinearReLU, LSTM, GRU: their input quantized per call) and of the view's module of the same
    name, every call in order, must be equal bit for bit (the view computes fbgemm's arithmetic: no rounding is
    left to tell apart). The first module apart is named, in the model's order of calls."""
    from torch.utils._pytree import tree_leaves

    theirs: dict[str, list[torch.Tensor]] = {}
    ours: dict[str, list[torch.Tensor]] = {}

    def keeper(kept: dict[str, list[torch.Tensor]], name: str) -> Any:
        def keep(module: nn.Module, args: Any, out: Any) -> None:  # returns None: the output stays
            kept.setdefault(name, []).extend(t.detach().float().cpu().clone() for t in tree_leaves(out)
                                             if isinstance(t, torch.Tensor) and t.is_floating_point())
        return keep

    views = dict(qmodel.module.named_modules())
    dynamic = [(name, module) for name, module in model.named_modules()
               if name in views and ".quantized.dynamic." in f"{type(module).__module__}."]
    _run_hooked([(module, keeper(theirs, name)) for name, module in dynamic]
                + [(views[name], keeper(ours, name)) for name, _ in dynamic], run_model, run_view)
    compared, apart = 0, []
    for name, outputs in theirs.items():  # in the order the model first called them
        mine = ours.get(name, [])
        compared += 1
        if len(mine) != len(outputs) or any(a.shape != b.shape for a, b in zip(outputs, mine)):
            apart.append((name, type(dict(dynamic)[name]).__name__, 0, sum(t.numel() for t in outputs), True))
        elif not all(torch.equal(a, b) for a, b in zip(outputs, mine)):
            equal = sum(int((a == b).sum()) for a, b in zip(outputs, mine))
            apart.append((name, type(dict(dynamic)[name]).__name__, equal, sum(t.numel() for t in outputs), True))
    return LayerAgreement(compared, tuple(apart), "values")


def view_layer_codes(qmodel: Any, run_view: Callable[[], Any]) -> dict[str, torch.Tensor]:
    """Each quantized layer's first output codes (code - zero point, one row per image) as `run_view()` computes
    them in the view."""
    kept: dict[str, torch.Tensor] = {}

    def keeper(name: str, scale: float) -> Any:
        def keep(module: nn.Module, args: Any, out: Any) -> None:  # returns None: the output stays
            if name not in kept and isinstance(out, torch.Tensor):
                codes = torch.div(out.detach().float(), torch.tensor(scale, dtype=torch.float32)).round()
                kept[name] = codes.long().cpu().reshape(len(codes), -1)
        return keep

    _run_hooked([(layer.module, keeper(name, layer.handed_on_scale)) for name, layer in qmodel.layers.items()
                 if layer.act_scale is not None], run_view)
    return kept


def codes_agreement(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], kind: str = "layer"
                    ) -> LayerAgreement:
    """The layers' codes a runtime gave (`theirs`, code - zero point, one row per image, in its order) against the
    view's (`view_layer_codes`); layers of other sizes are left out."""
    compared, apart = 0, []
    for name, codes in theirs.items():
        mine = ours.get(name)
        if mine is None or mine.numel() != codes.numel():
            continue
        compared += 1
        mine = mine.reshape(codes.shape)
        if not torch.equal(codes, mine):
            apart.append((name, kind, int((codes == mine).sum()), codes.numel(), True))
    return LayerAgreement(compared, tuple(apart))
