"""Late start: a faulty image's forward pass resumes just before its first faulty layer, from cached fault-free values.

Fault dropping skips the images that hold no fault. Late start skips, for the others, every layer before the first
fault: those layers compute exactly what the fault-free pass computed, because the engine's layers sum integers
exactly whatever the batch, so the result is bit-identical to a full forward pass.

How (torch.fx): the quantized model's graph is cut just before chosen quantized layers. A cut's *live set* is every
value computed before the cut and read at or after it (in a ResNet, the block's input: one tensor). One fault-free
pass over the campaign's images stores the live values of every chosen cut; a faulty image then runs the graph's
suffix from the latest cut at or before its first faulty layer, on those stored values. Persistent weight or
qparams faults make every image faulty, but only from the first layer they touch: all images then resume at the
cut before it (`resume_all`), with the faults applied for the suffix.

Memory policy: the cache holds live values for every image of the campaign, on the model's device, and never
exceeds its budget (`DEFAULT_CACHE_BYTES`, 256 MiB, unless the campaign is given another). Candidate cuts are the
quantized layers after the first whose live values are all per-image tensors; the cache takes as many of them as
fit, evenly spaced over the layer order (so an image's wasted prefix is bounded by the spacing). A model that fx
cannot trace, or a budget too small for a single cut, runs without late start; `LateStart.disabled_reason` says
why.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate

import torch
from torch import fx

from .data import Batch, as_args
from .evaluate import select_logits
from .faults import FaultPattern
from .graph import trace
from .layout import CHANNELS_LAST
from .qmodel import QuantizedModel

DEFAULT_CACHE_BYTES = 256 << 20
# What resuming one more group of images costs, in images: each group pays every layer's fixed per-call cost (hooks,
# op dispatch, small-batch inefficiency, gathering its cached values) once. Measured on ResNet56 int8, 2 cores,
# campaigns in steady state (act BER 1e-8 to 1e-6): 4 and 10 made late start slower than none at 1e-7 and 1e-6 (many
# small groups), 20 and 40 about even there and ~8% faster at 1e-8; a full pass of n images takes ~10 + 0.9 n ms.
BUCKET_OVERHEAD_IMAGES = 32


@dataclass
class Cut:
    """A point just before quantized layer `layer` (its position in execution order), where a pass can resume."""

    layer: str
    position: int
    live: list[str]  # fx node names whose values the suffix reads
    bytes_per_image: int
    suffix: fx.GraphModule | None = field(default=None, repr=False)


def _cut_positions(nodes: list[fx.Node], layer_nodes: dict[str, int]) -> dict[str, list[fx.Node]]:
    """For each quantized layer, the nodes computed before it and still read at or after it."""
    index = {node: i for i, node in enumerate(nodes)}
    last_use = {node: max((index[user] for user in node.users), default=-1) for node in nodes}
    live: dict[str, list[fx.Node]] = {}
    for name, at in layer_nodes.items():
        live[name] = [n for n in nodes[:at] if n.op != "get_attr" and last_use[n] >= at]
    return live


def _suffix_module(root: torch.nn.Module, graph: fx.Graph, start: fx.Node, live: list[fx.Node]) -> fx.GraphModule:
    """A module running `graph` from node `start` to its output, taking the `live` values as arguments."""
    suffix = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in live:
        env[node] = suffix.placeholder(f"live_{node.name}")
    started = False
    for node in graph.nodes:
        started = started or node is start
        if node.op == "get_attr" or (started and node.op != "placeholder"):
            env[node] = suffix.node_copy(node, lambda n: env[n])
    return _compiled(root, suffix)


def _compiled(root: torch.nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """`graph` as a module over `root`'s submodules, without the nodes nothing reads."""
    module = fx.GraphModule(root, graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _capture_module(traced: fx.GraphModule, names: list[str], with_output: bool = False) -> fx.GraphModule:
    """A module returning the values of the named nodes (a prefix of the graph: nothing after them runs), and
    with `with_output` the model's own output last."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output: fx.Node | None = None
    for node in traced.graph.nodes:
        if node.op == "output":
            output = node
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    by_name = {node.name: new for node, new in env.items()}
    values = [by_name[name] for name in names]
    if with_output:
        assert output is not None
        values.append(fx.node.map_arg(output.args[0], lambda n: env[n]))  # type: ignore[arg-type]
    graph.output(tuple(values))
    return _compiled(traced, graph)  # nothing after the last wanted value runs


def _select_evenly(candidates: list[Cut], allowed_bytes_per_image: int) -> list[Cut]:
    """As many candidates as fit the per-image byte allowance, spread evenly over the list."""
    for count in range(len(candidates), 0, -1):
        picks = sorted({round(i * (len(candidates) - 1) / max(1, count - 1)) for i in range(count)})
        chosen = [candidates[i] for i in picks]
        if sum(c.bytes_per_image for c in chosen) <= allowed_bytes_per_image:
            return chosen
    return []


class LateStart:
    """Cached fault-free live values of a campaign's images, and the graph suffixes that resume from them."""

    def __init__(self, qmodel: QuantizedModel, inputs: Batch, *, budget_bytes: int = DEFAULT_CACHE_BYTES,
                 batch_size: int = 256) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes!r} must be >= 0")
        self.qmodel, self.batch_size, self.budget_bytes = qmodel, batch_size, budget_bytes
        self.cuts: list[Cut] = []
        self.cache: dict[str, torch.Tensor] = {}
        self.disabled_reason: str | None = None
        # The model's fault-free output for every image, from the pass that fills the cache: a campaign's golden
        # run comes for free. None when late start is off or the output is not one tensor.
        self.fault_free_output: torch.Tensor | None = None
        self.resumed_images = 0  # images resumed at a cut, over every call
        self.layers_skipped = 0  # quantized layers those images did not rerun
        self.layer_position = {name: i for i, name in enumerate(qmodel.layers)}  # execution order
        try:
            self._build(inputs)
        except _Unsupported as exc:
            self.cuts, self.cache, self.disabled_reason = [], {}, str(exc)

    @property
    def enabled(self) -> bool:
        return bool(self.cuts)

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    # -- building --------------------------------------------------------------------------------------------------
    def _build(self, inputs: Batch) -> None:
        if self.qmodel.functional:
            raise _Unsupported("the model's functional layers run by call order, which a graph suffix cannot resume")
        repeated = [name for name, layer in self.qmodel.layers.items() if layer.calls > 1]
        if repeated:
            raise _Unsupported(f"layer {repeated[0]!r} runs {self.qmodel.layers[repeated[0]].calls} times per forward "
                               "pass: a graph suffix cannot resume between its calls")
        if self.qmodel.trace_error:
            raise _Unsupported(self.qmodel.trace_error)
        try:
            traced = trace(self.qmodel.module)
        except Exception as exc:  # any tracing failure: no late start, and say why
            reason = f"torch.fx cannot trace the model: {type(exc).__name__}: {exc}".splitlines()[0]
            raise _Unsupported(reason) from None
        nodes = list(traced.graph.nodes)
        at = {str(n.target): i for i, n in enumerate(nodes) if n.op == "call_module" and str(n.target) in
              self.qmodel.layers}
        order = sorted(at, key=at.__getitem__)
        if order != list(self.layer_position) or len(inputs) == 0:
            raise _Unsupported("the traced graph does not call every quantized layer once, in the order they ran")
        live_nodes = _cut_positions(nodes, at)
        if len(inputs) < 2:
            raise _Unsupported("one image: nothing tells a value with one row per image from one that has one row")
        shapes = self._live_shapes(traced, inputs[:2], {n for name in order[1:] for n in live_nodes[name]})
        candidates = []
        for name in order[1:]:
            live = live_nodes[name]
            if not all(n.name in shapes for n in live):
                continue
            size = sum(math.prod(shapes[n.name][0]) * shapes[n.name][1].itemsize for n in live)
            candidates.append(Cut(name, self.layer_position[name], [n.name for n in live], size))
        chosen = _select_evenly(candidates, self.budget_bytes // len(inputs))
        if not chosen:
            raise _Unsupported(f"no cut fits a cache of {self.budget_bytes} bytes for {len(inputs)} images"
                               if candidates else "no cut has only per-image tensors live across it")
        by_name = {n.name: n for n in nodes}
        for cut in chosen:
            cut.suffix = _suffix_module(traced, traced.graph, nodes[at[cut.layer]], [by_name[v] for v in cut.live])
        self.cuts = chosen
        self._fill_cache(traced, inputs, sorted({v for cut in chosen for v in cut.live}))

    def _live_shapes(self, traced: fx.GraphModule, two: Batch, wanted: set[fx.Node]
                     ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-image shape and dtype of each wanted value that is a tensor with one row per image: its first
        dimension follows the number of images, one row for one image and two for two (a value of one row that
        is not per image, such as a constant of shape [1] or a shape computed from the batch, keeps its size)."""
        names = sorted(n.name for n in wanted)
        capture = _capture_module(traced, names)
        runs = []
        for images in (two[:1], two):
            args, kwargs = as_args(images.to(self.qmodel.device))
            runs.append(self.qmodel.run_graph(capture, args, {}, kwargs))
        shapes = {}
        for name, one, both in zip(names, *runs):
            if isinstance(one, torch.Tensor) and isinstance(both, torch.Tensor) and one.dim() >= 1 and \
                    one.shape[0] == 1 and both.shape == (2, *one.shape[1:]) and both.dtype == one.dtype:
                shapes[name] = (tuple(one.shape[1:]), one.dtype)
        return shapes

    def _fill_cache(self, traced: fx.GraphModule, inputs: Batch, names: list[str]) -> None:
        """One fault-free pass over every image: the live values of the cuts, and the model's output."""
        device, capture = self.qmodel.device, _capture_module(traced, names, with_output=True)
        outputs: list[torch.Tensor] | None = []
        for start in range(0, len(inputs), self.batch_size):
            x = inputs[start : start + self.batch_size].to(device)
            args, kwargs = as_args(x)
            *values, returned = self.qmodel.run_graph(capture, args, {}, kwargs)
            output = select_logits(returned, len(x))
            for name, value in zip(names, values):
                if name not in self.cache:  # in the value's own memory layout (channels-last, typically)
                    self.cache[name] = torch.empty((len(inputs), *value.shape[1:]), dtype=value.dtype,
                                                   device=device, memory_format=_layout_of(value))
                self.cache[name][start : start + len(x)] = value  # a copy: later in-place ops cannot reach it
            if outputs is not None and isinstance(output, torch.Tensor) and output.dim() and len(output) == len(x):
                outputs.append(output)
            else:
                outputs = None
        self.fault_free_output = torch.cat(outputs) if outputs else None

    # -- running ---------------------------------------------------------------------------------------------------
    def first_faulty_layer(self, pattern: FaultPattern, n_images: int) -> torch.Tensor:
        """Per image (of the pattern's numbering), the position of its first faulty layer; len(layers) if none."""
        last = len(self.layer_position)
        first = torch.full((n_images,), last, dtype=torch.int64)
        faulty = sorted(((self.layer_position[layer], group) for (site, layer), group in pattern.groups.items()
                         if site.transient and len(group)), key=lambda item: item[0])
        for position, group in faulty:  # in execution order, so each image is set once, by its first faulty layer
            hit = group.images()
            first[hit] = torch.minimum(first[hit], torch.tensor(position))
            if int(first.max()) < last:  # every image has its first fault: later layers change nothing
                break
        return first

    def logits(self, images: torch.Tensor, pattern: FaultPattern) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(positions in `images`, logits) per resumed group, for the campaign images `images` (sorted) under
        `pattern` (transient faults only, numbered by position in `images`). Images left out run from the start
        (the caller does that)."""
        if not self.cuts:
            return []
        first = self.first_faulty_layer(pattern, len(images))
        positions = [c.position for c in self.cuts]
        # latest cut at or before the first fault: 0 = none (from the start), k = self.cuts[k - 1]
        admissible = torch.searchsorted(torch.tensor(positions), first, side="right")
        assigned = self._plan(admissible, [0, *positions])
        out = []
        for k in sorted(set(assigned.tolist()) - {0}):
            members = (assigned == k).nonzero().reshape(-1)
            cut = self.cuts[k - 1]
            self.resumed_images += len(members)
            self.layers_skipped += len(members) * cut.position
            out.append((members, self._resume(cut, images[members], pattern.restricted_to(members))))
        return out

    def resume_all(self, first_faulty: int, pattern: FaultPattern) -> torch.Tensor | None:
        """The logits of every image resumed at the latest cut at or before layer position `first_faulty` (the
        caller has applied persistent faults that touch no earlier layer); None when no cut lies there."""
        cut = next((c for c in reversed(self.cuts) if c.position <= first_faulty), None)
        if cut is None:
            return None
        images = torch.arange(len(next(iter(self.cache.values()))))
        self.resumed_images += len(images)
        self.layers_skipped += len(images) * cut.position
        return self._resume(cut, images, pattern)

    def _plan(self, admissible: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """Which start each image runs from: any start at or before its admissible one is exact, so images are
        grouped to minimise (layers run) x (images + BUCKET_OVERHEAD_IMAGES) summed over groups, by dynamic
        programming over the admissible starts that occur. Many tiny groups would each pay the per-layer cost of
        a forward pass; one group from the start would rerun every early layer."""
        total = len(self.layer_position)
        per_start = Counter(admissible.tolist())
        present = sorted(per_start)
        prefix = [0, *accumulate(per_start[k] for k in present)]  # images admissible at present[:e]
        best = [0.0] + [math.inf] * len(present)  # best[e]: cost of the groups covering present[:e]
        choice = [0] * (len(present) + 1)
        for e in range(1, len(present) + 1):
            for s in range(e):
                cost = best[s] + (total - starts[present[s]]) * (prefix[e] - prefix[s] + BUCKET_OVERHEAD_IMAGES)
                if cost < best[e]:
                    best[e], choice[e] = cost, s
        assigned_start = {}
        e = len(present)
        while e > 0:
            s = choice[e]
            for k in present[s:e]:
                assigned_start[k] = present[s]
            e = s
        return torch.tensor([assigned_start[k] for k in admissible.tolist()], dtype=torch.int64)

    def _resume(self, cut: Cut, images: torch.Tensor, pattern: FaultPattern) -> torch.Tensor:
        assert cut.suffix is not None
        device = self.qmodel.device
        parts = []
        for start in range(0, len(images), self.batch_size):
            rows = images[start : start + self.batch_size].to(device)
            live = tuple(self.cache[name][rows] for name in cut.live)  # copies, in the cache's memory layout
            edits = self.qmodel.prepare(pattern, start, start + len(rows))
            # a suffix keeps every reader of each layer output it computes: the model's own ops may run in place
            parts.append(select_logits(self.qmodel.run_graph(cut.suffix, live, edits, in_place=True), len(rows)))
        return torch.cat(parts)


class _Unsupported(Exception):
    pass


def _layout_of(value: torch.Tensor) -> torch.memory_format:
    layout = CHANNELS_LAST.get(value.dim())
    if layout is not None and value.is_contiguous(memory_format=layout) and not value.is_contiguous():
        return layout
    return torch.contiguous_format
