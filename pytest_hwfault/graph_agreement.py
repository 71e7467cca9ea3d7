"""A view of a converted PT2E graph compared with the graph itself, each part on the graph's own inputs.

A converted (not compiled) PT2E graph computes each conv/linear in float32 on dequantized values; the engine
computes the exact integer sum and scales it. The two may round a sum near half a code to neighbouring codes, and
one code apart early becomes many later, so the graph's and the view's outputs cannot be asked to be equal. What can
be asked is that every part of the view computes the graph's arithmetic: each quantized layer and each re-gridding
of the view is run on the very values the graph gave the same part (forward pre-hooks replace its input), and its
output is compared with the graph's. A code apart must be a near-tie that the graph's float32 sum rounds across: the
graph's float32 value and the exact value of the same sum (its integer codes summed exactly, in float64) lie on
either side of the half code between the two codes. A float result must be the exact value up to the view's own
float32 scaling. Anything else means the view computes part of the graph otherwise.

That proves each part's arithmetic, not how the view connects the parts: so the view runs once more with each
part's output replaced by the graph's (forward hooks), and each part's input, which the view's copies of the graph's
ops compute from those outputs, must be the graph's bit for bit (`flow_agreement`).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

FAULT_BER = 1e-2  # the act faults the graph runs under for the second comparison
FAULT_SEED = 0
UNIT_ROUNDOFF = 2.0 ** -24  # float32's: what one rounding step may move a value by, relatively
ROUNDING_STEPS = 8  # the float32 steps of a layer's scaling and quantization (view's and graph's) a tie may sit within


@dataclass(frozen=True)
class Origin:
    """Where a part of the view comes from in the graph: the node whose value it takes (`given`), the node whose
    value it stands for (`replaced`: the output codes, or a float result), and the float value before its
    quantization (`before`). `codes_of`: the grid of its output codes ((scale, zero point), None for a float
    result); `fan_in`: the number of products in each output's sum (0: a re-gridding, exact in the view)."""

    given: str  # "" for a stand-in: a module with arithmetic of its own (Inductor's), not compared, whose output the
    replaced: str  # data-flow check replaces by the graph's
    before: str
    codes_of: tuple[float, int] | None
    fan_in: int
    layer: str | None = None  # the graph's conv/linear node, whose exact sum the view computes


@dataclass(frozen=True)
class PartAgreement:
    """The parts compared and how their outputs stood: codes compared, codes one apart at a near-tie the graph's
    float32 sum rounds across, and the parts apart otherwise: (name, values apart, values, largest distance, its
    unit: codes, or for a float result, the float32 rounding allowed)."""

    parts: int
    layers: int
    codes: int
    near_ties: int
    apart: tuple[tuple[str, int, int, float, str], ...]

    def first_apart(self) -> str:
        """The first part apart beyond rounding, in words (empty when none is)."""
        if not self.apart:
            return ""
        name, count, total, largest, unit = self.apart[0]
        return (f"{name!r} computes otherwise than the graph: {count} of {total} outputs apart where the graph's "
                f"float32 rounding does not explain it (up to {largest:.3g} {unit}; {len(self.apart)} of "
                f"{self.parts} parts apart)")


class _Recording(fx.Interpreter):
    """Runs the graph as it is, keeping the values of the named nodes, and for each conv/linear in `exact`, the exact
    value of its result (float64: its integer codes summed exactly, times the two scales, plus the bias), which
    the engine computes. `ber`: each bit of every activation code a full-range quantize node stores flips with this
    probability (a fixed seed), so that the parts after it compute on values calibration never showed."""

    def __init__(self, model: fx.GraphModule, kept: set[str], exact: set[str], ber: float = 0.0) -> None:
        super().__init__(model)
        self.kept, self.exact, self.ber = kept, exact, ber
        self.values: dict[str, torch.Tensor] = {}
        self.exact_values: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.generator = torch.Generator().manual_seed(FAULT_SEED)
        # the dequantize nodes of those layers, whose arguments (codes, scales) are kept when they run: the
        # interpreter frees a value after its last use
        self.dequantizes = {arg.name for node in model.graph.nodes if node.name in exact
                            for arg in node.args[:2] if isinstance(arg, fx.Node)}
        self.dequantized: dict[str, tuple[Any, ...]] = {}

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if str(target).startswith("_guards_fn"):  # export's input-shape guard: the reader checked that the graph
            return None  # computes any batch size before it read it (`deployed.check_fixed_batch`)
        return super().call_module(target, args, kwargs)

    def run_node(self, node: fx.Node) -> Any:
        if node.name in self.dequantizes:
            self.dequantized[node.name] = tuple(self.fetch_args_kwargs_from_env(node)[0])
        out = super().run_node(node)
        if node.name in self.kept and isinstance(out, torch.Tensor):  # a part's output: as computed, before a fault
            self.values[node.name] = out.detach().to("cpu", copy=True)
        if node.name in self.exact:
            exact, size, bound = self._exact(node)
            self.exact_values[node.name] = (exact.cpu(), size.cpu(), bound.cpu())
        if self.ber and _stores_full_codes(node, out):  # what the next parts read: the stored codes, faulty
            flips = torch.rand((*out.shape, 8), generator=self.generator) < self.ber
            mask = (flips.to(torch.int32) << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)
            out = (out.view(torch.uint8) ^ mask.to(out.device)).view(out.dtype)
        return out

    def _exact(self, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The exact result of conv/linear `node` (from the codes and scales its dequantize nodes read), the size of
        its terms (|sum| + |bias|: what the view's float32 scaling rounds relative to), and the bound on the graph's
        float32 rounding of it (gamma_n times the sum of |x| x |w|, Higham, Accuracy and Stability of Numerical
        Algorithms, 3.1, with n the fan-in plus the dequantizations and the bias, doubled for blocked kernels): a
        graph value farther from the exact one means this is not the graph's sum, and nothing is explained."""
        source, weight = node.args[0], node.args[1]
        assert isinstance(source, fx.Node) and isinstance(weight, fx.Node)
        codes, scale, zero, *_ = self.dequantized[source.name]
        weights, weight_scales, *_ = self.dequantized[weight.name]
        args, _ = self.fetch_args_kwargs_from_env(node)
        geometry = (None, *args[3:]) if len(args) > 2 else ()
        layer: Any = node.target  # aten conv1d/2d/3d or linear: the same geometry on the integer codes
        total = layer(codes.double() - zero, weights.double(), *geometry)  # integer sums: exact in float64
        magnitude = layer(args[0].double().abs(), args[1].double().abs(), *geometry)
        scales = torch.as_tensor(weight_scales, dtype=torch.float64).reshape(-1) * float(scale)
        shape = [-1] + [1] * (total.dim() - 2) if node.target != torch.ops.aten.linear.default else [-1]
        total = total * scales.reshape(shape).to(total.device)
        bias = args[2].double().reshape(shape) if len(args) > 2 and args[2] is not None else torch.zeros(())
        n = weights[0].numel() + 4
        bound = magnitude * (2 * n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)) + bias.abs() * UNIT_ROUNDOFF
        return total + bias, total.abs() + bias.abs(), bound


def _constants(model: fx.GraphModule) -> Iterator[torch.Tensor]:
    """The tensors the graph reads by get_attr (a converted graph's int8 weights): where it runs."""
    for node in model.graph.nodes:
        if node.op == "get_attr":
            value = operator.attrgetter(str(node.target))(model)
            if isinstance(value, torch.Tensor):
                yield value


def _stores_full_codes(node: fx.Node, out: Any) -> bool:
    """Whether `node` is a quantize_per_tensor whose codes span their whole 8-bit dtype (any flip stays a code)."""
    if node.op != "call_function" or "quantize_per_tensor" not in str(node.target) \
            or "dequantize" in str(node.target) or not isinstance(out, torch.Tensor):
        return False
    full = {torch.uint8: (0, 255), torch.int8: (-128, 127)}.get(out.dtype)
    return full is not None and tuple(node.args[3:5]) == full


def _record(model: fx.GraphModule, images: Any, kept: set[str], exact: set[str], ber: float = 0.0) -> _Recording:
    """The graph run on `images` where its constants live, keeping the values of `kept` (see `_Recording`)."""
    from .data import as_args

    recording = _Recording(model, kept, exact, ber)
    device = next((t.device for t in _constants(model)), torch.device("cpu"))
    args, kwargs = as_args(images.to(device))
    with torch.no_grad():
        recording.run(*model.graph.process_inputs(*args, **kwargs))
    return recording


def part_agreement(model: fx.GraphModule, qmodel: Any, images: Any, origins: Mapping[str, Origin], ber: float = 0.0
                   ) -> PartAgreement:
    """Run `model` (the converted graph) on `images` (with activation faults at `ber`), keeping what each part of
    the view takes and gives there; run the view with each part's input replaced by the graph's, and compare each
    part's output (see the module docstring)."""
    kept = {name for origin in origins.values() for name in (origin.given, origin.replaced, origin.before)}
    bounded = {origin.layer for origin in origins.values() if origin.layer is not None}
    recording = _record(model, images, kept, bounded, ber)
    values = recording.values
    views = dict(qmodel.module.named_modules())
    outputs: dict[str, torch.Tensor] = {}

    def given(name: str) -> Any:
        def replace(module: nn.Module, args: tuple[Any, ...]) -> Any:
            if name in outputs or not args or not isinstance(args[0], torch.Tensor):
                return None
            value = values[origins[name].given].to(args[0].device, args[0].dtype)
            layer = qmodel.layers.get(name)
            if layer is not None and layer.reads_codes:
                value = torch.div(value, torch.tensor(layer.input_scale, dtype=value.dtype)).round()
            if args[0].dim() == 4 and args[0].is_contiguous(memory_format=torch.channels_last) \
                    and not args[0].is_contiguous():
                value = value.contiguous(memory_format=torch.channels_last)
            return (value, *args[1:])
        return replace

    def keep(name: str) -> Any:
        def keep_output(module: nn.Module, args: Any, out: Any) -> None:
            if name not in outputs and isinstance(out, torch.Tensor):
                outputs[name] = out.detach().float().cpu().clone()
        return keep_output

    present = [name for name in origins if name in views and origins[name].given in values]
    handles = [views[name].register_forward_pre_hook(given(name), prepend=True) for name in present]
    handles += [views[name].register_forward_hook(keep(name)) for name in present]
    try:
        with torch.no_grad():
            qmodel(images)  # fault-free: each part's faulty input is the graph's
    finally:
        for handle in handles:
            handle.remove()
    parts = layers = codes = near_ties = 0
    apart = []
    for name in present:
        origin, mine = origins[name], outputs.get(name)
        theirs = values.get(origin.replaced)
        if mine is None or theirs is None or mine.numel() != theirs.numel():
            continue
        parts += 1
        layer = qmodel.layers.get(name)
        layers += layer is not None
        mine = mine.double().reshape(theirs.shape)
        if origin.layer is not None:
            exact, size, bound = recording.exact_values[origin.layer]
            if origin.before != origin.layer:  # the graph's ReLU between the sum and its quantization
                exact = exact.clamp(min=0)
            graph_value = values[origin.before].double()
        if origin.codes_of is None:  # a float result: the view's exact sum, up to its own float32 scaling steps
            assert origin.layer is not None
            allowed = float_allowance(exact, size)
            wrong = ~float_explained(mine, graph_value, exact, size, bound)
            if bool(wrong.any()):
                apart.append((name, int(wrong.sum()), theirs.numel(), float(((mine - exact).abs() / allowed).max()),
                              "times the float32 rounding allowed"))
            continue
        scale, zero = origin.codes_of
        handed = layer.handed_on_scale if layer is not None else scale
        ours = torch.div(mine.float(), torch.tensor(handed, dtype=torch.float32)).round().double()
        stored = theirs.double() - zero
        codes += stored.numel()
        differ = ours != stored
        if not bool(differ.any()):
            continue
        if origin.layer is None:  # a re-gridding the view computes as the graph does: no sum to round
            tie = torch.zeros_like(differ)
        else:
            tie = codes_explained(ours, stored, graph_value, exact, size, bound, scale, zero)
        near_ties += int((differ & tie).sum())
        wrong = differ & ~tie
        if bool(wrong.any()):
            apart.append((name, int(wrong.sum()), stored.numel(), float((ours - stored)[wrong].abs().max()), "codes"))
    return PartAgreement(parts, layers, codes, near_ties, tuple(apart))


def codes_explained(ours: torch.Tensor, stored: torch.Tensor, graph_value: torch.Tensor, exact: torch.Tensor,
                    size: torch.Tensor, bound: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """Where the view's codes (`ours`) and the graph's (`stored`), both code - zero point, may differ: by one code, at
    a half code that the graph's float32 value (`graph_value`, before its quantization) and the `exact` value of the
    same sum lie on either side of, or within a few float32 steps of (the view's scaling of the exact sum rounds at
    the scale of its terms, `size`, and of a zero point added before rounding); and only where the graph's value is
    this sum, within the `bound` on its float32 rounding."""
    inverse = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32))
    half = torch.minimum(ours, stored) + 0.5  # the half code between the two
    graph_side, exact_side = graph_value * inverse - half, exact * inverse - half
    near = ROUNDING_STEPS * UNIT_ROUNDOFF * (size * inverse + half.abs() + abs(zero) + 1)
    across = (graph_side * exact_side <= 0) | (graph_side.abs() <= near) | (exact_side.abs() <= near)
    summed = (graph_value - exact).abs() <= bound + _tiny(exact)
    return ((ours - stored).abs() == 1) & across & summed


def float_allowance(exact: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """How far a view's float result may lie from the `exact` sum: its float32 scaling steps, at the terms' `size`."""
    return size * (ROUNDING_STEPS * UNIT_ROUNDOFF) + _tiny(exact)


def float_explained(mine: torch.Tensor, graph_value: torch.Tensor, exact: torch.Tensor, size: torch.Tensor,
                    bound: torch.Tensor) -> torch.Tensor:
    """Where the view's float result (`mine`) is the exact sum up to its float32 scaling, and the graph's is this
    sum within the `bound` on its float32 rounding."""
    summed = (graph_value - exact).abs() <= bound + _tiny(exact)
    return ((mine - exact).abs() <= float_allowance(exact, size)) & summed


def _tiny(values: torch.Tensor) -> torch.Tensor:
    """A float32 rounding step of `values`, at least the smallest normal: comparisons of values that are zero."""
    return values.abs() * UNIT_ROUNDOFF + torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class FlowAgreement:
    """The parts whose input the view computed from the graph's outputs of the parts before it, those left out (an
    op between that the comparison does not replace lies before them), and the parts whose input differed: (name,
    values apart, values, largest difference)."""

    compared: int
    left_out: int
    apart: tuple[tuple[str, int, int, float], ...]

    def first_apart(self) -> str:
        """The first part handed another input than the graph's, in words (empty when none is)."""
        if not self.apart:
            return ""
        name, count, total, largest = self.apart[0]
        return (f"the view hands {name!r} another input than the graph does: {count} of {total} values apart (up to "
                f"{largest:.3g}) where every part before it gave the graph's own output, so its data flow between "
                f"parts is not the graph's ({len(self.apart)} of {self.compared} parts' inputs apart)")


def _replaced_before(graph: fx.Graph, parts: set[str]) -> dict[str, bool]:
    """For each part (a call_module of `parts`): whether everything its input is computed from, back to the graph's
    inputs or to the outputs of other parts (and of stand-ins), is ops the view copied from the graph, so that no
    module between rounds on its own."""
    copied: dict[fx.Node, bool] = {}
    for node in graph.nodes:  # in topological order
        if node.op == "call_module":
            copied[node] = str(node.target) in parts  # a part's output is replaced by the graph's; other modules not
        else:
            copied[node] = all(copied.get(arg, False) for arg in node.all_input_nodes)
    return {str(node.target): all(copied.get(arg, False) for arg in node.all_input_nodes[:1])
            for node in graph.nodes if node.op == "call_module" and str(node.target) in parts}


def flow_agreement(model: fx.GraphModule, qmodel: Any, images: Any, origins: Mapping[str, Origin]) -> FlowAgreement:
    """The view's data flow between its parts against the graph's: each part's output replaced by the graph's output
    of the same part (forward hooks), every part's input as the view then computes it must be the graph's input of
    that part, bit for bit (the ops between parts are the graph's own, run on the same values). A stand-in (an
    `Origin` with no `given`: the reader's rewrite for Inductor's lowering, a layer left in float) has its output
    replaced too, its own arithmetic compared by neither check. `part_agreement`
    gives each part the graph's input, which says nothing of how the view connects them: an edge or op between parts
    read otherwise would show only at the outputs, which a converted graph's float32 sums keep from being compared."""
    module = qmodel.module
    if not isinstance(module, fx.GraphModule):
        return FlowAgreement(0, 0, ())
    kept = {name for origin in origins.values() for name in (origin.given, origin.replaced)}
    values = _record(model, images, kept, set()).values
    views = dict(module.named_modules())
    present = {name for name, origin in origins.items() if name in views and origin.replaced in values}
    replaced_before = _replaced_before(module.graph, present)
    compared = [name for name in present if origins[name].given in values and replaced_before.get(name, False)]
    parts = [name for name in present if origins[name].given]  # stand-ins replaced, neither compared nor counted
    inputs: dict[str, torch.Tensor] = {}

    def take(name: str) -> Any:
        def keep_input(view: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in inputs and args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach().float().cpu().clone()
        return keep_input

    def give(name: str) -> Any:
        def graph_output(view: nn.Module, args: Any, out: Any) -> Any:
            if not isinstance(out, torch.Tensor):
                return None
            origin, layer = origins[name], qmodel.layers.get(name)
            theirs = values[origin.replaced]
            if origin.codes_of is None:  # a float result
                value = theirs.to(torch.float32)
            else:  # codes, handed on as the view hands them on
                scale, zero = origin.codes_of
                handed = layer.handed_on_scale if layer is not None else scale
                value = (theirs.to(torch.int32) - zero).to(torch.float32) * torch.tensor(handed, dtype=torch.float32)
            value = value.to(out.device, out.dtype).reshape(out.shape)
            if out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
                value = value.contiguous(memory_format=torch.channels_last)
            return value
        return graph_output

    handles = [views[name].register_forward_pre_hook(take(name), prepend=True) for name in compared]
    handles += [views[name].register_forward_hook(give(name)) for name in present]
    try:
        with torch.no_grad():
            qmodel(images)
    finally:
        for handle in handles:
            handle.remove()
    apart = []
    for name in (name for name in origins if name in compared):  # in the graph's order
        layer, mine = qmodel.layers.get(name), inputs.get(name)
        theirs = values[origins[name].given].float()
        if layer is not None and layer.reads_codes:
            theirs = torch.div(theirs, torch.tensor(layer.input_scale, dtype=theirs.dtype)).round()
        if mine is None or mine.numel() != theirs.numel():
            apart.append((name, theirs.numel(), theirs.numel(), float("inf")))
            continue
        mine = mine.reshape(theirs.shape)
        differ = (mine != theirs) & ~(mine.isnan() & theirs.isnan())
        if bool(differ.any()):
            apart.append((name, int(differ.sum()), differ.numel(), float((mine - theirs)[differ].abs().max())))
    return FlowAgreement(len(compared), len(parts) - len(compared), tuple(apart))


def graph_agreement(model: Any, qmodel: Any, images: Any, origins: Mapping[str, Origin]) -> tuple[str, bool]:
    """The view compared part by part with the converted graph, fault-free and with act faults at `FAULT_BER` in
    the graph, in words, and whether every part computes the graph's arithmetic."""
    try:
        clean = part_agreement(model, qmodel, images, origins)
        faulty = part_agreement(model, qmodel, images, origins, FAULT_BER)
        flow = flow_agreement(model, qmodel, images, origins)
    except Exception as error:  # noqa: BLE001 - the graph's own failure, reported, not raised
        return (f"could not run the graph part by part on {len(images)} calibration images to check the engine "
                f"against it ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): the "
                "engine's arithmetic is not known to be the graph's", False)
    if clean.parts == 0:
        return "not checked against the graph: no part of the view was found in it", False
    where = (f"checked part by part against the graph (torch running it) on {len(images)} calibration images, "
             f"fault-free and under act faults (BER {FAULT_BER:g} in every activation code the graph stores), each "
             f"of its {clean.layers} quantized layers and {clean.parts - clean.layers} re-griddings given the "
             "graph's own input")
    if clean.apart or faulty.apart:
        which, result = ("fault-free", clean) if clean.apart else ("under faults", faulty)
        return f"{where}: {which}, {result.first_apart()}", False
    if flow.apart:
        return f"{where}: every part computes the graph's arithmetic, but {flow.first_apart()}", False
    left_out = (f"; {flow.left_out} whose input passes a module the comparison does not replace left out"
                if flow.left_out else "")
    connected = (f"; each part's input, computed by the view from the graph's outputs of the parts before it, is the "
                 f"graph's ({flow.compared} parts{left_out})")
    if clean.near_ties or faulty.near_ties:
        return (f"{where}: every part computes the graph's arithmetic; output codes one apart at a near-tie the "
                f"graph's float32 sum rounds across (the engine's integer sum is exact): {clean.near_ties} of "
                f"{clean.codes} fault-free, {faulty.near_ties} of {faulty.codes} under faults{connected}", True)
    return (f"{where}: every part computes the graph's arithmetic, all output codes equal ({clean.codes} fault-free, "
            f"{faulty.codes} under faults){connected}", True)
