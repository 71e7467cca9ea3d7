"""What share of a model's multiply-accumulates and weights the faults of a quantized view can reach.

The engine quantizes conv and linear modules, attention and recurrent modules (as their pieces, `decompose`) and
functional MAC calls (`functional`); what it cannot make a layer of (a functional call on a weight computed in the
forward, an op it does not know, a module whose options the rewrite does not reproduce) runs in float, where no
fault lands. A gate that passed on such a model would be about its quantized part only, so the view's coverage is
measured on the forward that campaigns run, by counting the MACs (torch's flop counter) of every module and
functional layer, and each campaign states it, and refuses to judge a model below its ``min_coverage``.

Weights: the share of the parameters read by multiply-accumulates that are held as codes. Parameters that feed
no MAC op (embedding tables, norms, position embeddings, a weight an elementwise op multiplies) are counted apart
and named with the ops that read them (`Coverage.unfaulted`).

A multiply-accumulate written elementwise, a product of the images' values with a stored tensor (a parameter, a
buffer, or what is computed from them alone) that a sum, mean or running sum then reduces
(``(x[:, None] * w).sum(-1)``, a cosine similarity to learned prototypes, ``torch.linalg.vecdot``, a ``cumsum``),
has no flop formula either: the counter counts
its products as MACs (op ``aten.mul+aten.sum``) and its stored operand as a weight MACs read. A product with a
stored tensor that no sum reduces (a norm's or LayerScale's weight) is not a MAC. A distance to stored vectors
written elementwise, the images' values minus a stored tensor, squared and summed (``((x[:, None] - c) ** 2).sum(-1)``,
``torch.linalg.vector_norm(x[:, None] - c, dim=-1)``, ``F.pairwise_distance``), is counted so too (op
``aten.sub+aten.pow+aten.sum``), as torch.cdist is.

torch has no flop formula for some MAC ops (`aten._trilinear`, which nn.Bilinear runs; cdist's kernels; the fast
Fourier transforms of an FFT convolution or FNet's token mixing, which had no MAC name either): the counter brings
its own. Any other MAC-heavy op it cannot count (a fused kernel without a formula) makes the coverage
unknown: it is listed, and only ``min_coverage=0`` accepts it.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .data import as_args
from .qmodel import QuantizedModel

# aten ops that multiply-accumulate; the ones with a flop formula are counted, the others make coverage unknown
_MAC_OP = re.compile(r"(^|_)(mm|bmm|addmm|baddbmm|addbmm|addmv|mv|dot|vdot|matmul|linear|conv\w*|convolution\w*|"
                     r"einsum|lstm\w*|gru\w*|rnn\w*|\w*attention\w*|\w*transformer\w*|mkldnn\w*|\w*qlinear\w*|"
                     r"\w*qconv\w*|trilinear|cdist\w*|euclidean_dist|fft_\w+)($|\.)")


def _trilinear_flops(i1: torch.Tensor, i2: torch.Tensor, i3: torch.Tensor, expand1: list[int], expand2: list[int],
                     expand3: list[int], *args: Any, **kwargs: Any) -> int:
    """nn.Bilinear's op: each input unsqueezed at its `expand` dims, all three multiplied over their broadcast
    shape and summed: two flops per point, as torch's matmul formulas count a multiply-accumulate."""
    shapes = []
    for tensor, expand in ((i1, expand1), (i2, expand2), (i3, expand3)):
        shape = list(tensor.shape)
        for dim in sorted(expand):
            shape.insert(dim, 1)
        shapes.append(shape)
    return 2 * math.prod(torch.broadcast_shapes(*shapes))


def _distance_flops(x1: torch.Tensor, x2: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    """torch.cdist: a difference and a multiply-accumulate per pair of rows and feature."""
    batch = math.prod(torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2]))
    return 2 * batch * x1.shape[-2] * x2.shape[-2] * x1.shape[-1]


def _grouped_mm_flops(a: torch.Tensor, b: torch.Tensor, *args: Any, out_val: torch.Tensor, **kwargs: Any) -> int:
    """torch._grouped_mm (a mixture of experts' experts: one matmul per group of routed rows): every output element
    sums the contracted dimension, but where two 2-d operands are cut into groups along it ([G, M, N] out)."""
    if a.dim() == 2 and b.dim() == 2:
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return 2 * out_val.numel() * a.shape[-1]


def _contracted_flops(x: torch.Tensor, *args: Any, out_val: torch.Tensor, **kwargs: Any) -> int:
    """torch.mv, dot and vdot: every output element sums the last dimension of the first operand, two flops a
    multiply-accumulate."""
    return 2 * max(out_val.numel(), 1) * x.shape[-1]


def _addmv_flops(bias: torch.Tensor, matrix: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return 2 * matrix.numel()


def _addbmm_flops(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    """torch.addbmm: a batch of matmuls summed into one matrix."""
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _conv_tbc_flops(x: torch.Tensor, weight: torch.Tensor, *args: Any, out_val: torch.Tensor, **kwargs: Any) -> int:
    """torch.conv_tbc (a 1-d convolution on [time, batch, channels] inputs, weight [kernel, in, out])."""
    return 2 * out_val.numel() * weight.shape[0] * weight.shape[1]


def _fourier_flops(points: int, lengths: list[int], real: bool) -> int:
    """A fast Fourier transform over `lengths` (one 1-d transform per dimension) of a signal with `points` complex
    (or, `real`, real) points in all: FFTW's benchmark convention, 5 N log2 N flops for a complex transform of N
    points and half that for a real one (radix-2 butterflies: a complex multiply and two complex adds per pair)."""
    per_point = 5 * sum(math.log2(length) for length in lengths if length > 1)
    return round(points * per_point / (2 if real else 1))


def _fft_r2c_flops(x: torch.Tensor, dim: list[int], *args: Any, **kwargs: Any) -> int:
    return _fourier_flops(x.numel(), [x.shape[d] for d in dim], real=True)


def _fft_c2r_flops(x: torch.Tensor, dim: list[int], *args: Any, out_val: torch.Tensor, **kwargs: Any) -> int:
    return _fourier_flops(out_val.numel(), [out_val.shape[d] for d in dim], real=True)


def _fft_c2c_flops(x: torch.Tensor, dim: list[int], *args: Any, **kwargs: Any) -> int:
    return _fourier_flops(x.numel(), [x.shape[d] for d in dim], real=False)


_FOURIER = {torch.ops.aten._fft_r2c, torch.ops.aten._fft_c2r, torch.ops.aten._fft_c2c}
# MAC ops torch's flop counter has no formula for
_EXTRA_FLOPS: dict[Any, Any] = {torch.ops.aten._grouped_mm: _grouped_mm_flops,
                                torch.ops.aten._trilinear: _trilinear_flops,
                                torch.ops.aten._cdist_forward: _distance_flops,
                                torch.ops.aten._euclidean_dist: _distance_flops,
                                torch.ops.aten._fft_r2c: _fft_r2c_flops,
                                torch.ops.aten._fft_c2r: _fft_c2r_flops,
                                torch.ops.aten._fft_c2c: _fft_c2c_flops,
                                torch.ops.aten.mv: _contracted_flops,
                                torch.ops.aten.dot: _contracted_flops,
                                torch.ops.aten.vdot: _contracted_flops,
                                torch.ops.aten.addmv: _addmv_flops,
                                torch.ops.aten.addbmm: _addbmm_flops,
                                torch.ops.aten.conv_tbc: _conv_tbc_flops}
MEASURED_IMAGES = 2  # images in the measuring forward: MAC shares do not depend on the batch size
# the name under which elementwise products summed (a MAC written as (x * w).sum(-1)) are counted
PRODUCT_SUM = "aten.mul+aten.sum"
# and under which squared differences from a stored tensor summed (a distance written as ((x - c) ** 2).sum(-1))
DISTANCE_SUM = "aten.sub+aten.pow+aten.sum"
_PRODUCTS = {torch.ops.aten.mul, torch.ops.aten.mul_}
_SCALED_PRODUCTS = {torch.ops.aten.addcmul, torch.ops.aten.addcmul_}  # input + value * tensor1 * tensor2
_QUOTIENTS = {torch.ops.aten.div, torch.ops.aten.div_}  # x / w: a product with w's reciprocal
_REDUCTIONS = {torch.ops.aten.sum, torch.ops.aten.nansum, torch.ops.aten.mean,
               torch.ops.aten.cumsum}  # a running sum: each product added once
# elementwise ops that leave a tensor of products a tensor of the same products, scaled, offset, masked or copied
# by stored tensors and constants: (x * w * 0.5).sum(-1), (x * w + b).sum(-1), torch.where(mask, x * w, 0).sum(-1)
# multiply-accumulate as (x * w).sum(-1) does
_CARRIERS = {getattr(torch.ops.aten, name) for name in (
    "mul", "mul_", "div", "div_", "neg", "neg_", "add", "add_", "sub", "sub_", "rsub", "clone", "_to_copy",
    "copy_", "where", "masked_fill", "masked_fill_")}
_DIFFERENCES = {torch.ops.aten.sub, torch.ops.aten.sub_, torch.ops.aten.rsub}
_SQUARES = {torch.ops.aten.pow, torch.ops.aten.pow_}
_NORMS = {torch.ops.aten.linalg_vector_norm, torch.ops.aten.norm}
# why the MACs of an op no layer computes stay in float, where the op tells
_OP_REASONS = {"aten._grouped_mm": "aten._grouped_mm: a mixture of experts' experts (rows routed by content, so faults "
                                   "could not be placed per image) run in float",
               PRODUCT_SUM: f"{PRODUCT_SUM}: a product of the images' values with a stored tensor, summed (a "
                            "multiply-accumulate written elementwise, as (x[:, None] * w).sum(-1) or a cosine "
                            "similarity to stored vectors), runs in float: written as a linear, matmul or einsum "
                            "call it is quantized",
               DISTANCE_SUM: f"{DISTANCE_SUM}: the images' values minus a stored tensor, squared and summed (a "
                             "distance to stored vectors written elementwise, as ((x[:, None] - c) ** 2).sum(-1), "
                             "torch.linalg.vector_norm(x[:, None] - c, dim=-1) or F.pairwise_distance), runs in "
                             "float: written as (x ** 2).sum(-1, keepdim=True) - 2 * x @ c.T + (c ** 2).sum(-1), "
                             "its MACs are a matmul, which is quantized"}
# one reason for the three transforms (an FFT convolution runs two of them)
_FOURIER_REASON = ("aten._fft_*: a fast Fourier transform (an FFT convolution, FNet's token mixing, a spectrogram) "
                   "multiplies and adds in float, where no fault lands (written as a convolution, or as real "
                   "matmuls with the DFT's cosines and sines, it is quantized)")
_OP_REASONS.update({f"aten.{op}": _FOURIER_REASON for op in ("_fft_r2c", "_fft_c2r", "_fft_c2c")})


@dataclass(frozen=True)
class Coverage:
    """MAC and weight coverage of a quantized view, and what its faults cannot reach."""

    macs: float  # share of the counted multiply-accumulates computed by quantized layers
    weights: float  # share of the weight elements (matrices and kernels) held as codes
    total_macs: int  # per image, counted
    uncovered: list[dict[str, Any]] = field(default_factory=list)  # {"module", "ops", "share"}, largest first
    uncounted: list[str] = field(default_factory=list)  # MAC ops whose MACs could not be counted
    # parameter elements that feed no multiply-accumulate op (embedding tables, norms, position embeddings, and
    # weights an elementwise op multiplies): stored, but faults are not simulated there
    unfaulted_parameters: int = 0
    # those parameters, largest first: {"parameter", "elements", "ops"} (the ops that read each one)
    unfaulted: list[dict[str, Any]] = field(default_factory=list)
    # parameters MACs read that are held as no weight codes, so weight faults miss them, largest first:
    # {"parameter", "elements", "how"} (read by MACs left in float, or quantized per call as an activation)
    uncoded: list[dict[str, Any]] = field(default_factory=list)
    # a campaign's `layers=` choosing some of the quantized layers: {"layers": the selectors, "names": the layers,
    # "macs", "weights": the shares of all MACs and weights those layers compute and hold}, what its faults reach
    selection: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.uncounted and self.macs >= 1.0 and not self.selection

    def share(self, site: str) -> float:
        """What faults at `site` can reach: stored weights for "weight", the MACs' operands and sums otherwise (of
        the selected layers only, where a `layers=` chose some)."""
        shares = self.selection or {"macs": self.macs, "weights": self.weights}
        return float(shares["weights" if site == "weight" else "macs"])

    def reaches(self, minimum: float, site: str) -> bool:
        """True when faults at `site` provably reach at least `minimum` of what they could hit."""
        if minimum <= 0.0:
            return True
        return not self.uncounted and self.share(site) >= minimum - 1e-12

    def accepting(self, site: str) -> float:
        """The largest min_coverage that would accept this view at `site` (two decimals, rounded down)."""
        return 0.0 if self.uncounted else math.floor(self.share(site) * 100) / 100

    def describe(self) -> str:
        from .report.text import coverage_text

        return coverage_text(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"macs": self.macs, "weights": self.weights, "total_macs": self.total_macs,
                "uncovered": self.uncovered, "uncounted": self.uncounted,
                "unfaulted_parameters": self.unfaulted_parameters, "unfaulted": self.unfaulted,
                "uncoded": self.uncoded, "selection": self.selection}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Coverage:
        return cls(float(data["macs"]), float(data["weights"]), int(data["total_macs"]),
                   list(data.get("uncovered", [])), list(data.get("uncounted", [])),
                   int(data.get("unfaulted_parameters", 0)), list(data.get("unfaulted", [])),
                   list(data.get("uncoded", [])), dict(data.get("selection") or {}))


# ops that ask a tensor about itself; the flop counter lets them through untouched (nested tensors call them)
_QUERIES = {getattr(torch.ops.aten, name).default for name in (
    "sym_is_contiguous", "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "size",
    "sym_size", "stride", "sym_stride", "storage_offset", "sym_storage_offset", "numel", "sym_numel", "dim")
    if hasattr(torch.ops.aten, name)} | {torch.ops.aten.is_contiguous.memory_format, torch.ops.prim.layout.default}


class _MacCounter(TorchDispatchMode):
    """Counts each module's flops as torch's FlopCounterMode does (its formulas; composite ops decomposed; every op
    credited to all enclosing modules), names the MAC-like aten ops with no formula, and notes the storages every
    MAC op reads (to tell the parameters that feed multiply-accumulates from embeddings, norms and biases).

    One mode instead of FlopCounterMode and a watcher beside it, and one that does not ask to be hidden from
    Dynamo: torch wraps such a mode's dispatch in ``torch._dynamo.disable``, whose first call imports Dynamo,
    1-1.6 s of every pytest process that measures a coverage. No compiled code runs inside this mode.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.module_tracker import ModuleTracker

        self.uncounted: set[str] = set()
        self.read: set[int] = set()
        self.readers: dict[int, set[str]] = defaultdict(set)  # storage -> the computing ops that read it
        self.read_within: dict[int, set[str]] = defaultdict(set)  # storage -> the innermost modules reading it
        # the parameters and buffers a MAC op's operand computed from them stands for (a bilinear weight expanded
        # and made contiguous), each with the innermost module the op ran in: weights MACs read where that module
        # is no quantized layer (whose own ops read the codes it computes from them)
        self.computed_reads: list[tuple[frozenset[int], str | None]] = []
        # ops of other libraries (custom kernels) on the images' values, with the innermost module they ran in:
        # whatever they compute inside is out of this mode's sight
        self.foreign: set[tuple[str, str | None]] = set()
        self.flop_counts: dict[str, dict[Any, int]] = defaultdict(lambda: defaultdict(int))
        self.tracker = ModuleTracker()
        # storages of the root's parameters and buffers and of what is computed from them alone, each with the
        # parameters' and buffers' storages it is computed from; and the products of an images' tensor with one of
        # them (storage -> (the product, kept alive so that its storage is not reused, and those sources)), MACs
        # once a sum reduces them
        self.stored: dict[int, frozenset[int]] = {}
        self.kept: list[torch.Tensor] = []  # what is computed from them, alive: a freed storage's address is reused
        self.products: dict[int, _Product] = {}
        # the images' values minus a stored tensor (storage -> the difference, kept alive, and its sources): a
        # distance's terms once squared
        self.differences: dict[int, tuple[torch.Tensor, frozenset[int]]] = {}
        # flops per op of the innermost running module under `counting`'s root, by its first qualified name there
        self.own_counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.running: list[str | None] = []

    @contextmanager
    def counting(self, root: nn.Module | None = None) -> Iterator[None]:
        """Counts inside the block (the mode itself is re-entered while it decomposes an op). With `root`, each
        op's flops are also credited to the innermost module running (`own_counts`), named by its first qualified
        name under `root` as `named_modules` names it: a module shared by two parents (CoaT's position encodings)
        is one module wherever it runs, and a functional call's layer is the caller's child where it is called."""
        names = {id(module): name for name, module in root.named_modules()} if root is not None else {}
        if root is not None:
            self.stored = {storage: frozenset((storage,)) for storage in
                           (_storage(t) for t in (*root.parameters(), *root.buffers()))}

        def enter(module: nn.Module, args: Any) -> None:
            self.running.append(names.get(id(module)))

        def leave(module: nn.Module, args: Any, out: Any) -> None:
            if self.running:
                self.running.pop()

        handles = [nn.modules.module.register_module_forward_pre_hook(enter),
                   nn.modules.module.register_module_forward_hook(leave, always_call=True)] if names else []
        try:
            with self.tracker, self:
                yield
        finally:
            for handle in handles:
                handle.remove()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _QUERIES:
            return NotImplemented
        packet = getattr(func, "_overloadpacket", func)
        name = str(packet).split(".", 1)[-1]
        storages = {_storage(arg) for arg in pytree.tree_leaves((args, kwargs))
                    if isinstance(arg, torch.Tensor)}
        if _MAC_OP.search(name):  # composite ops too: in inference mode they reach this mode undecomposed
            if packet not in flop_registry and packet not in _EXTRA_FLOPS and not _decomposes(func):
                self.uncounted.add(str(packet))
            self.read |= storages
            sources = frozenset().union(*(self.stored[storage] for storage in storages if storage in self.stored))
            if packet in _FOURIER:  # a stored kernel, padded to the transform's length: the kernel is read
                self.read |= sources
            elif sources - storages:
                self.computed_reads.append((sources, self._innermost()))
        elif not getattr(func, "is_view", False) and not _decomposes(func):
            innermost = self._innermost()
            if str(packet).split(".", 1)[0] not in _TORCH_NAMESPACES and storages - self.stored.keys():
                self.foreign.add((str(packet), innermost))
            for storage in storages:
                self.readers[storage].add(str(packet))
                if innermost is not None:
                    self.read_within[storage].add(innermost)
        if func is not torch.ops.prim.device.default:  # as FlopCounterMode: composite ops count as their pieces
            with self:  # which come back through this mode
                result = func.decompose(*args, **kwargs)
                if result is not NotImplemented:
                    return result
        out = func(*args, **kwargs)
        formula = flop_registry.get(packet) or _EXTRA_FLOPS.get(packet)
        if formula is not None:
            self._credit(packet, formula(*args, **kwargs, out_val=out))
        elif not _MAC_OP.search(name) and not getattr(func, "is_view", False):
            self._follow_stored(packet, args, kwargs, out)
        return out

    def _credit(self, op: Any, flops: int) -> None:
        """`flops` of `op` (an op packet, as FlopCounterMode keys them, or `PRODUCT_SUM`) to every running module,
        and to the innermost one under the root."""
        for parent in set(self.tracker.parents):
            self.flop_counts[parent][op] += flops
        innermost = self._innermost()
        if innermost is not None:
            self.own_counts[innermost][str(op)] += flops

    def _innermost(self) -> str | None:
        return next((name for name in reversed(self.running) if name is not None), None)

    def _follow_stored(self, packet: Any, args: Any, kwargs: Any, out: Any) -> None:
        """Tracks what is computed from stored tensors alone, the products of the images' values with a stored
        tensor (and the squares of their differences from one), and counts their MACs when a sum or mean reduces
        them (`PRODUCT_SUM`, `DISTANCE_SUM`; a 2-norm of such a difference at once)."""
        inputs = [arg for arg in pytree.tree_leaves((args, kwargs)) if isinstance(arg, torch.Tensor)]
        outputs = [value for value in pytree.tree_leaves(out) if isinstance(value, torch.Tensor)]
        if not inputs or not outputs:
            return
        storages = [_storage(arg) for arg in inputs]
        result = _storage(outputs[0])
        if packet in _REDUCTIONS and storages[0] in self.products:
            product = self.products[storages[0]]
            if _sums_over_the_weight(product.weight_index(inputs[0]),
                                     _reduced_dims(packet, args, kwargs, inputs[0].dim())):
                self._credit(product.op, 2 * inputs[0].numel())
                self.read |= product.sources  # the parameters the summed products read are weights MACs read
            return
        if storages[0] in self.differences and len(inputs) == 1:
            difference, sources = self.differences[storages[0]]
            if packet in _SQUARES and len(args) > 1 and args[1] == 2:
                self.products[result] = _Product(outputs[0], sources, DISTANCE_SUM)
            elif packet in _NORMS and _two_norm(args, kwargs):
                self._credit(DISTANCE_SUM, 2 * inputs[0].numel())
                self.read |= sources
            elif packet in (torch.ops.aten.add, torch.ops.aten.add_):  # F.pairwise_distance's eps
                self.differences[result] = (outputs[0], sources)
            return
        if (packet in _PRODUCTS and len(inputs) == 2 and storages[0] == storages[1]
                and storages[0] in self.differences and inputs[0].shape == inputs[1].shape):  # d * d
            self.products[result] = _Product(outputs[0], self.differences[storages[0]][1], DISTANCE_SUM)
            return
        carried = next((storage for storage in storages if storage in self.products), None)
        if carried is not None and packet in _CARRIERS and outputs[0].is_floating_point() and all(
                storage == carried or storage in self.stored or arg.numel() == 1 or arg.dtype == torch.bool
                for storage, arg in zip(storages, inputs)):  # not a residual's sum with the images' values
            product = self.products[carried]
            if result != carried:  # in place, the entry stands
                index = product.weight_index(inputs[storages.index(carried)])
                self.products[result] = product._replace(tensor=outputs[0], numbered=_numbered(outputs[0], index))
            return
        stored = [storage in self.stored for storage in storages]
        if packet in _SCALED_PRODUCTS and len(args) > 2 and all(isinstance(a, torch.Tensor) for a in args[1:3]):
            factors = [_storage(args[1]) in self.stored,
                       _storage(args[2]) in self.stored]
            if sum(factors) == 1 and args[1 + factors.index(True)].numel() > 1 and outputs[0].is_floating_point():
                weight = args[1 + factors.index(True)]
                self.products[result] = _Product(outputs[0], self.stored[_storage(weight)],
                                                 PRODUCT_SUM, _numbered(outputs[0], _element_numbers(weight)))
                return
        if all(stored):  # computed from stored tensors alone: stored too (a normalised weight)
            sources = frozenset().union(*(self.stored[storage] for storage in storages))
            for value in outputs:
                self.stored[_storage(value)] = sources
                self.kept.append(value)
        elif (len(inputs) == 2 and sum(stored) == 1 and outputs[0].is_floating_point()
              and inputs[stored.index(True)].numel() > 1):  # a scalar's product is a scaling, never a MAC
            sources = self.stored[storages[stored.index(True)]]
            if packet in _PRODUCTS or (packet in _QUOTIENTS and stored == [False, True]
                                       and kwargs.get("rounding_mode") is None):
                self.products[result] = _Product(outputs[0], sources, PRODUCT_SUM,
                                                 _numbered(outputs[0], _element_numbers(inputs[stored.index(True)])))
            elif packet in _DIFFERENCES:
                self.differences[result] = (outputs[0], sources)


# a forward that hands the images' values to numpy (`h.numpy()`, `np.asarray(h)`: a numpy matmul, a scikit-learn
# head) computes there where no MAC is counted and no fault lands: the coverage is unknown, named so
LEFT_TORCH = ("the images' values leave torch (numpy, scikit-learn, ...): what is computed there is not counted, and "
              "no fault lands there")
_TO_NUMPY: set[Any] = {torch.Tensor.numpy, torch.Tensor.__array__}
# the operator namespaces of torch and of the int8 kernels the engine and the deployed readers run; an op of any
# other (a library's custom kernel: `torch.library.custom_op`, a C++ extension) may multiply-accumulate inside,
# where this mode sees nothing: run outside a quantized layer on the images' values, it makes the coverage unknown
_TORCH_NAMESPACES = {"aten", "prim", "prims", "quantized", "_quantized", "onednn", "mkldnn", "quantized_decomposed",
                     "torchao", "profiler"}
FOREIGN_OP = ("an op of another library (a custom kernel) on the images' values: what it computes inside is not "
              "counted, and no fault lands there")


class _LeavesTorch(TorchFunctionMode):
    """Notes each module whose forward hands a tensor that is not computed from stored tensors alone to numpy."""

    def __init__(self, counter: _MacCounter) -> None:
        super().__init__()
        self.counter = counter
        self.where: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _TO_NUMPY and args and isinstance(args[0], torch.Tensor) and \
                _storage(args[0]) not in self.counter.stored:
            self.where.add(self.counter._innermost() or "")
        return func(*args, **(kwargs or {}))


def _storage(tensor: torch.Tensor) -> int:
    """The address of a tensor's storage, by which views of one storage are known as one; a sparse or other
    non-strided tensor, which has none, is known by itself (its id, negated: never an address)."""
    return tensor.untyped_storage().data_ptr() if tensor.layout == torch.strided else -id(tensor)


class _Product(NamedTuple):
    """A tensor of products of the images' values with a stored tensor (kept alive, so that its storage is not
    reused), the parameters and buffers that stored tensor is computed from, the op its MACs count as, and, for each
    element of the product's storage, which element of the stored tensor it was multiplied by (`_numbered`; None
    where not followed: a distance's squares)."""

    tensor: torch.Tensor
    sources: frozenset[int]
    op: str
    numbered: torch.Tensor | None = None

    def weight_index(self, view: torch.Tensor) -> torch.Tensor | None:
        """Which stored element each element of `view` (a view of the product's storage) was multiplied by."""
        if self.numbered is None or view.element_size() != self.tensor.element_size():
            return None
        try:
            return self.numbered.as_strided(view.size(), view.stride(), view.storage_offset())
        except RuntimeError:
            return None


def _numbered(product: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor | None:
    """`index` (broadcast to the product's shape) laid out over the product's whole storage as the product's own
    elements are, -1 elsewhere: any view of that storage reads its elements' indices back by its own strides."""
    if index is None:
        return None
    try:
        values = index.expand(product.shape)
    except RuntimeError:
        return None
    laid = torch.full((product.untyped_storage().nbytes() // product.element_size(),), -1, dtype=torch.int64)
    laid.as_strided(product.size(), product.stride(), product.storage_offset()).copy_(values)
    return laid


def _element_numbers(weight: torch.Tensor) -> torch.Tensor:
    return torch.arange(weight.numel()).view(weight.shape)


def _reduced_dims(packet: Any, args: Any, kwargs: Any, ndim: int) -> list[int]:
    """The dimensions a sum, mean or running sum reduces (all of them where it names none)."""
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted({d % ndim for d in dims}) if ndim else []


def _sums_over_the_weight(index: torch.Tensor | None, dims: list[int]) -> bool:
    """Whether a reduction over `dims` adds products of different stored elements: a multiply-accumulate, where
    summing products of one stored element (a layer scale's, over the tokens it scales alike) is a scaled pooling.
    Unknown (`index` None) counts as one."""
    if index is None or not dims or index.numel() == 0:
        return True
    return bool((index.amax(dims) != index.amin(dims)).any())


def _two_norm(args: Any, kwargs: Any) -> bool:
    """Whether a linalg_vector_norm / norm call takes the 2-norm (its default)."""
    order = args[1] if len(args) > 1 else kwargs.get("ord", kwargs.get("p", 2))
    return order is None or order == 2


def _decomposes(func: Any) -> bool:
    """True for composite ops (aten.linear, aten.conv2d, aten.lstm): their pieces reach the counter themselves."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"))
    except (AttributeError, RuntimeError):
        return False


class _Measured(nn.Module):
    """The view's model and its functional layers under one root, so that the flop counter names them all."""

    def __init__(self, model: nn.Module, functional: list[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.functional = nn.ModuleDict({f"f{i}": m for i, m in enumerate(functional)})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _weight_shares(qmodel: QuantizedModel, read: set[int], readers: dict[int, set[str]], per_call: set[int]
                   ) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
    """The share of the weights read by multiply-accumulates that are held as codes (a weight computed in the
    forward pass by a call left in float counts as not held); the parameters MACs read that are not held as codes
    (read by float MACs, or, their storages in `per_call`, read inside a quantized layer that quantizes them per
    call as an activation: a parameter expanded to the batch as a bmm's operand), which weight faults miss; and
    the parameters that feed no multiply-accumulate op directly (embeddings, norms, biases, position embeddings, a
    weight an elementwise op multiplies), which faults do not reach, each with the ops that read it: so a layer
    written as ``(x * w).sum(-1)`` is named."""
    weights = [getattr(layer.module, "weight", None) for layer in qmodel.layers.values()]
    coded = {id(w): w.numel() for w in weights if isinstance(w, torch.Tensor)}
    stood_in = {held for call in (qmodel.functional.calls if qmodel.functional else []) if call.module is not None
                for held in (call.weight, call.bias)}  # a functional layer holds this parameter's codes
    # parameters a weight is computed from (weight standardisation): the layer's codes hold what they compute
    computed_from = {source for call in (qmodel.functional.calls if qmodel.functional else [])
                     if call.module is not None for source in call.computed_from}
    float_macs = 0
    unfaulted: list[dict[str, Any]] = []
    uncoded: list[dict[str, Any]] = []
    for name, param in qmodel.module.named_parameters():
        if id(param) in coded or id(param) in stood_in or not (param.is_floating_point() or param.is_complex()):
            continue
        storage = _storage(param)
        if storage in read or storage in per_call:
            float_macs += param.numel()
            uncoded.append({"parameter": name, "elements": param.numel(),
                            "how": "read by MACs in float" if storage in read else
                            "quantized per call as an activation, which act faults reach"})
        elif id(param) not in computed_from:
            unfaulted.append({"parameter": name, "elements": param.numel(),
                              "ops": sorted(readers.get(storage, ())) or ["none (not read)"]})
    unfaulted.sort(key=lambda row: (-row["elements"], row["parameter"]))
    uncoded.sort(key=lambda row: (-row["elements"], row["parameter"]))
    computed = sum(call.weight_elements for call in (qmodel.functional.calls if qmodel.functional else []))
    total = sum(coded.values()) + float_macs + computed
    return (sum(coded.values()) / total if total else 1.0), uncoded, unfaulted


def measure_coverage(qmodel: QuantizedModel, inputs: Any, layers: tuple[Any, ...] | None = None) -> Coverage:
    """Run the quantized view's fault-free forward on a couple of `inputs` and count where its MACs happen.
    `layers`: a campaign's layer selectors; where they choose some of the quantized layers, what the faults reach
    is those layers' share (`Coverage.selection`): the other layers compute without faults, as float ones do."""
    x = inputs[:MEASURED_IMAGES]
    calls = [call for call in (qmodel.functional.calls if qmodel.functional else []) if call.module is not None]
    root = _Measured(qmodel.module, [call.module for call in calls])
    counter = _MacCounter()
    # oneDNN's fused RNN kernels have no flop formula; the reference kernels do, and compute the same MACs
    mkldnn = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    leaves = _LeavesTorch(counter)
    try:
        with counter.counting(root), leaves:
            args, kwargs = as_args(x.to(qmodel.device))
            qmodel.run_graph(root, args, {}, kwargs)
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)
    own = {name: dict(ops) for name, ops in counter.own_counts.items()}
    modules = dict(root.named_modules())
    layer_modules = {id(layer.module) for layer in qmodel.layers.values()}
    total = sum(sum(ops.values()) for ops in own.values())
    covered = sum(sum(ops.values()) for name, ops in own.items() if id(modules.get(name)) in layer_modules)
    reasons: dict[str, list[str]] = {}
    for call in qmodel.functional.uncovered() if qmodel.functional else []:
        where, _, op = call["call"].rpartition(": ")
        reasons.setdefault("" if where == "<model>" else where, []).append(f"{op}: {call['reason']}")
    uncovered = []
    for name, ops in sorted(own.items(), key=lambda item: (-sum(item[1].values()), item[0])):
        if id(modules.get(name)) in layer_modules or not ops or not total:
            continue
        user_name = name[len("model."):] if name.startswith("model.") else ("" if name == "model" else name)
        entry: dict[str, Any] = {"module": user_name, "ops": sorted(ops), "share": sum(ops.values()) / total}
        why = reasons.get(user_name, []) + [_OP_REASONS[op] for op in ops if op in _OP_REASONS]
        told = getattr(modules.get(name), "uncovered_reason", None)  # a reader's module says what it is
        if isinstance(told, str):
            why.append(told)
        if why:
            entry["why"] = sorted(set(why))
        uncovered.append(entry)
    layer_names = {name for name, module in modules.items() if id(module) in layer_modules}
    for where in sorted(leaves.where):
        counter.uncounted.add(f"Tensor.numpy in {_user_name(where)}: {LEFT_TORCH}")
    for op, where in sorted(counter.foreign, key=str):
        if where not in layer_names:
            counter.uncounted.add(f"{op} in {_user_name(where)}: {FOREIGN_OP}")
    per_call = {storage for storage, within in counter.read_within.items() if within & layer_names}
    read = counter.read.union(*(sources for sources, within in counter.computed_reads if within not in layer_names))
    weights, uncoded, unfaulted = _weight_shares(qmodel, read, counter.readers, per_call)
    selection: dict[str, Any] = {}
    chosen = qmodel.select(layers) if layers is not None else list(qmodel.layers)
    if set(chosen) != set(qmodel.layers):
        chosen_modules = {id(qmodel.layers[name].module) for name in chosen}
        macs = sum(sum(ops.values()) for name, ops in own.items() if id(modules.get(name)) in chosen_modules)
        held = {id(w): w.numel() for w in (getattr(qmodel.layers[name].module, "weight", None) for name in chosen)
                if isinstance(w, torch.Tensor)}
        selection = {"layers": [str(selector) for selector in layers or ()], "names": chosen,
                     "macs": macs / total if total else 0.0,
                     "weights": weights * sum(held.values()) / max(1, _coded_elements(qmodel))}
    return Coverage(macs=covered / total if total else 1.0, weights=weights,
                    total_macs=total // 2 // max(1, len(x)), uncovered=uncovered, uncounted=sorted(counter.uncounted),
                    unfaulted_parameters=sum(row["elements"] for row in unfaulted), unfaulted=unfaulted,
                    uncoded=uncoded, selection=selection)


def _user_name(where: str | None) -> str:
    """A module's name in the user's model, from its name under the measuring root."""
    where = where or ""
    return (where[len("model."):] if where.startswith("model.") else ("" if where == "model" else where)) or "<model>"


def _coded_elements(qmodel: QuantizedModel) -> int:
    """The weight elements the quantized layers hold as codes (a tied weight once)."""
    weights = [getattr(layer.module, "weight", None) for layer in qmodel.layers.values()]
    return sum({id(w): w.numel() for w in weights if isinstance(w, torch.Tensor)}.values())


def require_coverage(qmodel: QuantizedModel, inputs: Any, minimum: float, site: str,
                     layers: tuple[Any, ...] | None = None) -> Coverage:
    """The view's coverage, or EvaluationError naming what is left in float when faults at `site` (in the
    `layers` a campaign selects) reach less than `minimum` of it: a verdict would then be about that part of the
    model only."""
    from .evaluate import EvaluationError

    coverage = measure_coverage(qmodel, inputs, layers)
    if not coverage.reaches(minimum, site):
        part = "the selected layers" if coverage.selection else "the quantized part"
        raise EvaluationError(
            f"min_coverage={minimum:g}: {coverage.describe()}. A verdict would be about {part} only: "
            f"lower min_coverage= to gate on it knowingly (min_coverage={coverage.accepting(site):g} accepts it)")
    return coverage
