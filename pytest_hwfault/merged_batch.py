"""Layers of a deployed graph that run on the batch merged with another dimension, viewed per image.

An exporter may hand a layer its images folded into the rows: Hugging Face's GPT-2 projections (Conv1D) export as a
Gemm on [batch x tokens, width], rows i x k .. i x k + k - 1 holding image i; an attention exported sequence first
(torch's nn.MultiheadAttention) runs its projections on [tokens, batch, width]. Faults are placed per image, so the
engine needs the batch as a layer's first dimension. `unmerge_batches` finds such layers on a few calibration images
(which dimension follows the number of images, and, by changing one image at a time, which rows hold it), then
rewrites the graph so that each computes on the [images, k, ...] view of the same values and hands on the layout the
graph had: the same numbers, faults placed per image. A reader's per-image steps around a layer (`per_image = True`:
onnxruntime's dynamic quantization of the layer's input, its float result) are computed on the same view, so that an
image's range is its own rows'. A layer whose rows no image changes (an attention that an infinite-scale mask left
constant) is placed forward instead: by which image's outputs its rows change. A layer whose rows no check can place
is left as it is, and the calibration refuses it, saying why.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

FOLD, INTERLEAVE, SECOND = "fold", "interleave", "second"
CHECK_IMAGES = 4  # images the layouts are found on (one changed at a time)


@dataclass(frozen=True)
class Layout:
    """Where a layer's operand holds image i: `FOLD`, rows i x k .. i x k + k - 1 of its first dimension (batch-major,
    as a reshape of [batch, k, ...] to [batch x k, ...] gives); `INTERLEAVE`, rows t x N + i (sequence-major);
    `SECOND`, index i of its second dimension ([k, batch, ...])."""

    kind: str
    rows: int  # k: rows per image

    def describe(self) -> str:
        return {FOLD: f"the batch merged with {self.rows} rows per image, image by image",
                INTERLEAVE: f"the batch merged with {self.rows} rows per image, row by row (sequence first)",
                SECOND: "the batch as its second dimension (sequence first)"}[self.kind]


def to_images(x: torch.Tensor, kind: str, rows: int) -> torch.Tensor:
    """The [images, k, ...] view of an operand laid out as `kind` (a copy where it is a transpose)."""
    if kind == FOLD:
        return x.unflatten(0, (-1, rows))
    if kind == INTERLEAVE:
        return x.unflatten(0, (rows, -1)).transpose(0, 1).contiguous()
    return x.transpose(0, 1).contiguous()


def from_images(y: torch.Tensor, kind: str) -> torch.Tensor:
    """A result on [images, k, ...] laid out as the graph had it (`to_images` undone)."""
    if kind == FOLD:
        return y.flatten(0, 1)
    if kind == INTERLEAVE:
        return y.transpose(0, 1).flatten(0, 1)
    return y.transpose(0, 1)


class _Recorder:
    """The shapes of the arguments of each module a graph calls exactly once, in one forward, and a copy of the first
    argument of those asked for (`keep`)."""

    def __init__(self, module: fx.GraphModule, names: Collection[str]) -> None:
        self.module, self.names = module, set(names)
        self.shapes: dict[str, list[torch.Size | None]] = {}
        self.values: dict[str, torch.Tensor] = {}

    def run(self, call: Callable[[nn.Module], Any], keep: Collection[str] = ()) -> None:
        self.shapes, self.values = {}, {}
        handles = []
        for name in self.names:
            def hook(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                self.shapes[name] = [a.shape if isinstance(a, torch.Tensor) else None for a in args]
                if name in keep and args and isinstance(args[0], torch.Tensor):
                    self.values[name] = args[0].detach().clone()
            handles.append(self.module.get_submodule(name).register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                call(self.module)
        finally:
            for handle in handles:
                handle.remove()


def _on(call: Callable[[nn.Module, Any], Any], batch: Any) -> Callable[[nn.Module], Any]:
    return lambda module: call(module, batch)


def _candidate(first: torch.Size | None, second: torch.Size | None, images: int) -> Layout | None:
    """The layout an operand may have from its shapes at `images` and at `images - 1` images (None: batch first,
    or no dimension follows the images)."""
    if first is None or second is None or len(first) == 0 or len(second) == 0:
        return None
    a, b = first[0], second[0]
    if a == images and b == images - 1:
        return None  # batch first
    if a != b and b > 0 and a % images == 0 and a // images > 1 and b == a // images * (images - 1):
        return Layout(FOLD, a // images)  # or INTERLEAVE: the rows that change decide
    if a == b and len(first) > 1 and len(second) > 1 and first[1] == images and second[1] == images - 1:
        return Layout(SECOND, a)
    return None


def _changed(base: torch.Tensor, other: torch.Tensor, dim: int) -> set[int]:
    """Indices along `dim` where two same-shaped tensors differ anywhere (NaN equal to NaN)."""
    differ = ~((base == other) | (base.isnan() & other.isnan()))
    if differ.dim() == 0:
        return set()
    return {int(i) for i in differ.movedim(dim, 0).flatten(1).any(1).nonzero().flatten()}


def _placed(layout: Layout, changes: dict[int, set[int]], images: int) -> Layout | None:
    """The layout the changed rows of each image prove (image j changed: only its rows changed, and some did), or None
    where no layout explains every change, or both do."""
    if not any(changes.values()):
        return None
    if layout.kind == SECOND:
        return layout if all(rows <= {j} for j, rows in changes.items()) else None
    k = layout.rows
    fold = all(all(r // k == j for r in rows) for j, rows in changes.items())
    interleave = all(all(r % images == j for r in rows) for j, rows in changes.items())
    if fold and not interleave:
        return layout
    if interleave and not fold:
        return Layout(INTERLEAVE, k)
    return None


def _image_rows(layout: Layout, image: int, images: int) -> tuple[int, torch.Tensor]:
    """(the dimension, the indices) of an operand laid out as `layout` that hold `image`."""
    k = layout.rows
    if layout.kind == FOLD:
        return 0, torch.arange(image * k, image * k + k)
    if layout.kind == INTERLEAVE:
        return 0, torch.arange(k) * images + image
    return 1, torch.tensor([image])


def _changed_images(before: Any, after: Any, images: int) -> set[int]:
    """The images whose outputs differ: over every output tensor with one row per image (NaN equal to NaN)."""
    from torch.utils._pytree import tree_leaves

    changed: set[int] = set()
    for a, b in zip(tree_leaves(before), tree_leaves(after)):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dim() and \
                a.shape[0] == images:
            changed |= _changed(a, b, 0)
    return changed


def _influence(module: fx.GraphModule, source: str, layout: Layout, images: int,
               run: Callable[[nn.Module], Any]) -> Layout | None:
    """A layer whose rows no image changes (a constant input: an attention an infinite-scale mask silenced, in
    onnxruntime too) is placed forward: the layout under which changing the rows it gives image j (by more than any
    value there) changes image j's outputs and no other's, for every j, and some outputs at all; None where no
    layout or both do."""
    with torch.no_grad():
        base = run(module)
    options = [layout] if layout.kind == SECOND else [layout, Layout(INTERLEAVE, layout.rows)]
    proved = []
    for option in options:
        moved = False
        for image in range(images):
            dim, rows = _image_rows(option, image, images)

            def bump(_: nn.Module, args: tuple[Any, ...], dim: int = dim, rows: torch.Tensor = rows) -> Any:
                x = args[0].clone()
                x.index_add_(dim, rows, torch.full_like(x.index_select(dim, rows), float(x.abs().amax()) + 1.0))
                return (x, *args[1:])

            handle = module.get_submodule(source).register_forward_pre_hook(bump)
            try:
                with torch.no_grad():
                    changed = _changed_images(base, run(module), images)
            finally:
                handle.remove()
            if not changed <= {image}:
                break
            moved = moved or bool(changed)
        else:
            if moved:
                proved.append(option)
    return proved[0] if len(proved) == 1 else None


def _region(layer: fx.Node, per_image: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """The layer with the per-image steps around it: back from its first operand through `getitem`s of a per-image
    module's results (dynamic quantization), forward to per-image users of its result and of those results."""
    region = {layer}
    stack = [layer]
    while stack:
        node = stack.pop()
        neighbours = [*node.users]
        if node is layer or node.op == "call_function" and node.target is operator.getitem:
            first = node.args[0] if node.args else None
            if isinstance(first, fx.Node) and (first.op == "call_module" and per_image(first)
                                               or first.op == "call_function" and first.target is operator.getitem):
                neighbours.append(first)
        for other in neighbours:
            if other in region:
                continue
            if other.op == "call_module" and per_image(other) or (
                    other.op == "call_function" and other.target is operator.getitem
                    and isinstance(other.args[0], fx.Node) and (other.args[0] in region or per_image(other.args[0]))):
                region.add(other)
                stack.append(other)
    return region


def _rewrite(module: fx.GraphModule, region: set[fx.Node], entries: dict[fx.Node, list[int]], layout: Layout,
             merged_results: set[fx.Node]) -> None:
    """Each entry's operands at the given positions through `to_images`; each merged result of the region, where a
    node outside it reads it, through `from_images` for those readers."""
    graph = module.graph
    for node, positions in entries.items():
        args = list(node.args)
        for position in positions:
            with graph.inserting_before(node):
                args[position] = graph.call_function(to_images, (args[position], layout.kind, layout.rows))
        node.args = tuple(args)
    for node in merged_results:
        outside = [user for user in node.users if user not in region]
        if not outside:
            continue
        with graph.inserting_after(node):
            back = graph.call_function(from_images, (node, layout.kind))
        for user in outside:
            user.replace_input_with(node, back)
    graph.lint()
    module.recompile()


def _source(layer: fx.Node, per_image: Callable[[fx.Node], bool]) -> fx.Node:
    """The module whose first operand holds what the layer's first operand is computed from per image: a per-image
    step's input (`getitem(dynamic quantization(x), 0)`: x), else the layer itself."""
    first = layer.args[0] if layer.args else None
    if isinstance(first, fx.Node) and first.op == "call_function" and first.target is operator.getitem:
        producer = first.args[0]
        if isinstance(producer, fx.Node) and per_image(producer):
            return producer
    return layer


def unmerge_batches(module: nn.Module, layers: Collection[str], x: Any,
                    call: Callable[[nn.Module, Any], Any]) -> list[str]:
    """Rewrite `module`'s graph (in place) so that every layer among `layers` whose operand holds the images merged
    with another dimension computes on the per-image view (see the module docstring); the notes say which. `x`: a
    batch of at least two calibration images (the first `CHECK_IMAGES` are used).

    Which rows hold image j is seen by changing image j alone (to the next image) and comparing the rows of each
    layer's input. A per-image step on a merged batch mixes the images (a dynamic quantization's range over a token's
    row of every image, sequence first), so every layer after it seems to mix them too: the layers placed are
    rewritten, and the others checked again, until a round places none."""
    if not isinstance(module, fx.GraphModule) or len(x) < 2:
        return []
    images = min(len(x), CHECK_IMAGES)
    x = x[:images]
    graph = module.graph
    called: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            called[node.target] = called.get(node.target, 0) + 1
    nodes = {node.target: node for node in graph.nodes if node.op == "call_module" and called[node.target] == 1}

    def per_image(node: fx.Node) -> bool:
        return node.op == "call_module" and (node.target in layers or bool(
            getattr(module.get_submodule(str(node.target)), "per_image", False)))

    sources = {name: str(_source(nodes[name], per_image).target) for name in layers if name in nodes}
    if not sources:
        return []
    by_layout: dict[Layout, list[str]] = {}
    try:
        _place(module, nodes, sources, layers, per_image, x, images, call, by_layout)
    except Exception:  # noqa: BLE001 - a forward on fewer or changed images failed: the calibration says what fails
        pass
    notes = []
    for layout, members in by_layout.items():
        shown = ", ".join(repr(m) for m in members[:3]) + (", ..." if len(members) > 3 else "")
        notes.append(f"{len(members)} layer(s) run on {layout.describe()} ({shown}): each computes on the "
                     f"[images, {layout.rows}, ...] view of the same values, so that faults are placed per image")
    return notes


def _place(module: fx.GraphModule, nodes: dict[str, fx.Node], sources: dict[str, str], layers: Collection[str],
           per_image: Callable[[fx.Node], bool], x: Any, images: int, call: Callable[[nn.Module, Any], Any],
           by_layout: dict[Layout, list[str]]) -> None:
    """`unmerge_batches`' rounds; the layers rewritten are added to `by_layout` as they are."""
    recorder = _Recorder(module, nodes)
    recorder.run(_on(call, x[:images - 1]))
    fewer = recorder.shapes
    recorder.run(_on(call, x))
    full = recorder.shapes
    candidates: dict[str, Layout] = {}
    for name, source in sources.items():
        layout = _candidate((full.get(source) or [None])[0], (fewer.get(source) or [None])[0], images)
        if layout is not None:
            candidates[name] = layout
    while candidates:
        keep = {sources[name] for name in candidates}
        recorder.run(_on(call, x), keep)
        full, base = recorder.shapes, recorder.values
        changes: dict[str, dict[int, set[int]]] = {name: {} for name in candidates}
        for j in range(images):
            index = list(range(images))
            index[j] = (j + 1) % images
            recorder.run(_on(call, x[torch.tensor(index)]), keep)
            for name, layout in candidates.items():
                before, after = base.get(sources[name]), recorder.values.get(sources[name])
                if before is None or after is None or after.shape != before.shape:
                    changes[name][j] = {-1}  # no layout explains a changed shape
                    continue
                changes[name][j] = _changed(before, after, 1 if layout.kind == SECOND else 0)
        placed = {name: p for name, layout in candidates.items()
                  if (p := _placed(layout, changes[name], images)) is not None}
        for name, layout in candidates.items():  # rows no image changes: which image each feeds, seen forward
            if name not in placed and not any(changes[name].values()):
                found = _influence(module, sources[name], layout, images, _on(call, x))
                if found is not None:
                    placed[name] = found
        rewritten = _rewrite_placed(module, nodes, placed, full, fewer, layers, per_image)
        for layout, members in rewritten.items():
            by_layout.setdefault(layout, []).extend(members)
        if not rewritten:
            break
        done = {m for members in rewritten.values() for m in members}
        candidates = {name: layout for name, layout in candidates.items() if name not in done}


def _rewrite_placed(module: fx.GraphModule, nodes: dict[str, fx.Node], placed: dict[str, Layout],
                    full: dict[str, list[torch.Size | None]], fewer: dict[str, list[torch.Size | None]],
                    layers: Collection[str],
                    per_image: Callable[[fx.Node], bool]) -> dict[Layout, list[str]]:
    """Each placed layer's region rewritten onto the per-image view (`_rewrite`), where every layer of the region is
    placed alike and its operands from outside follow the images; the layers rewritten, by layout."""
    rewritten: dict[Layout, list[str]] = {}
    done: set[fx.Node] = set()
    for name, layout in placed.items():
        layer = nodes[name]
        if layer in done:
            continue
        region = _region(layer, per_image)
        members = sorted(str(n.target) for n in region if n.op == "call_module" and n.target in layers)
        if any(placed.get(m) != layout for m in members):
            continue  # a layer of the region its rows place otherwise, or not at all: refused at calibration
        dim = 1 if layout.kind == SECOND else 0
        source = str(_source(layer, per_image).target)
        first, second = full[source][0], fewer[source][0]
        assert first is not None and second is not None  # a candidate's
        sizes = first[dim], second[dim]
        # the region's operands from outside it that follow the images along the merged dimension
        entries: dict[fx.Node, list[int]] = {}
        for node in region:
            if node.op != "call_module":
                continue
            seen, seen_fewer = full.get(str(node.target)), fewer.get(str(node.target))
            if seen is None or seen_fewer is None:
                break
            for position, arg in enumerate(node.args):
                if not isinstance(arg, fx.Node) or arg in region or position >= min(len(seen), len(seen_fewer)):
                    continue
                a, b = seen[position], seen_fewer[position]
                if a is not None and b is not None and len(a) > dim and len(b) > dim and (a[dim], b[dim]) == sizes:
                    entries.setdefault(node, []).append(position)
        else:
            # results read outside the region: tensors laid out per image (a per-image step's scales never are)
            handed = {node for node in region if any(user not in region for user in node.users)}
            if not entries or any(node.op == "call_function" and node.args[1] != 0 for node in handed):
                continue
            _rewrite(module, region, entries, layout, handed)
            done |= region
            rewritten.setdefault(layout, []).extend(members)
    return rewritten
