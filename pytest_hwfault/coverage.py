"""What share of a model's multiply-accumulates and weights the faults of a quantized view can reach.

The engine quantizes Conv1d/2d/3d and Linear modules; everything else (attention matmuls, recurrent cells,
functional convolutions with their own parameters, fused fast paths) runs in float, where no fault lands. A gate
that passed on such a model would be about its quantized part only, so the view's coverage is measured on the
forward that campaigns run, by counting the MACs (torch's flop counter) of every module, and each campaign
states it, and refuses to judge a model below its ``min_coverage``.

A MAC-heavy op the flop counter cannot count (a fused kernel without a formula) makes the coverage unknown: it is
listed, and only ``min_coverage=0`` accepts it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .qmodel import QuantizedModel

# aten ops that multiply-accumulate; the ones with a flop formula are counted, the others make coverage unknown
_MAC_OP = re.compile(r"(^|_)(mm|bmm|addmm|baddbmm|addbmm|addmv|mv|dot|vdot|matmul|linear|conv\w*|convolution\w*|"
                     r"einsum|lstm\w*|gru\w*|rnn\w*|\w*attention\w*|\w*transformer\w*|mkldnn\w*|\w*qlinear\w*|"
                     r"\w*qconv\w*)($|\.)")
MEASURED_IMAGES = 2  # images in the measuring forward: MAC shares do not depend on the batch size


@dataclass(frozen=True)
class Coverage:
    """MAC and weight coverage of a quantized view, and what its faults cannot reach."""

    macs: float  # share of the counted multiply-accumulates computed by quantized layers
    weights: float  # share of the weight elements (matrices and kernels) held as codes
    total_macs: int  # per image, counted
    uncovered: list[dict[str, Any]] = field(default_factory=list)  # {"module", "ops", "share"}, largest first
    uncounted: list[str] = field(default_factory=list)  # MAC ops whose MACs could not be counted

    @property
    def complete(self) -> bool:
        return not self.uncounted and self.macs >= 1.0

    def share(self, site: str) -> float:
        """What faults at `site` can reach: stored weights for "weight", the MACs' operands and sums otherwise."""
        return self.weights if site == "weight" else self.macs

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
                "uncovered": self.uncovered, "uncounted": self.uncounted}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Coverage:
        return cls(float(data["macs"]), float(data["weights"]), int(data["total_macs"]),
                   list(data.get("uncovered", [])), list(data.get("uncounted", [])))


class _UncountedMacOps(TorchDispatchMode):
    """Names the MAC-like aten ops that the flop counter has no formula for."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        packet = getattr(func, "_overloadpacket", func)
        if packet not in flop_registry and not _decomposes(func) and _MAC_OP.search(str(packet).split(".", 1)[-1]):
            self.seen.add(str(packet))
        return func(*args, **(kwargs or {}))


def _decomposes(func: Any) -> bool:
    """True for composite ops (aten.linear, aten.conv2d, aten.lstm): their pieces reach the counter themselves."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"))
    except (AttributeError, RuntimeError):
        return False


def _own_flops(counts: dict[str, dict[Any, int]]) -> dict[str, dict[str, int]]:
    """Flops per module excluding its submodules' (the counter credits every op to all enclosing modules), keyed
    by qualified name ('' for the model itself)."""
    tree = {name: ops for name, ops in counts.items() if name != "Global"}
    own: dict[str, dict[str, int]] = {}
    for name, ops in tree.items():
        children = [child for child in tree if child.startswith(name + ".") and "." not in child[len(name) + 1:]]
        left = {str(op): n - sum(tree[c].get(op, 0) for c in children) for op, n in ops.items()}
        qualified = name.split(".", 1)[1] if "." in name else ""  # the counter prefixes the root's class name
        own[qualified] = {op: n for op, n in left.items() if n > 0}
    return own


def _weight_share(qmodel: QuantizedModel) -> float:
    quantized = {id(layer.module.weight) for layer in qmodel.layers.values()}
    total = coded = 0
    for param in qmodel.module.parameters():
        if param.dim() >= 2 and param.is_floating_point():
            total += param.numel()
            coded += param.numel() if id(param) in quantized else 0
    return coded / total if total else 1.0


def measure_coverage(qmodel: QuantizedModel, inputs: torch.Tensor) -> Coverage:
    """Run the quantized view's fault-free forward on a couple of `inputs` and count where its MACs happen."""
    x = inputs[:MEASURED_IMAGES]
    watcher = _UncountedMacOps()
    counter = FlopCounterMode(display=False)
    # oneDNN's fused RNN kernels have no flop formula; the reference kernels do, and compute the same MACs
    mkldnn = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        with counter, watcher:
            qmodel._forward(x, None, 0)
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)
    own = _own_flops(counter.get_flop_counts())
    total = sum(sum(ops.values()) for ops in own.values())
    covered = sum(sum(ops.values()) for name, ops in own.items() if name in qmodel.layers)
    shares = {name: sum(ops.values()) / total for name, ops in own.items()
              if name not in qmodel.layers and ops and total}
    uncovered = [{"module": name, "ops": sorted(own[name]), "share": share}
                 for name, share in sorted(shares.items(), key=lambda item: (-item[1], item[0]))]
    return Coverage(macs=covered / total if total else 1.0, weights=_weight_share(qmodel),
                    total_macs=total // 2 // max(1, len(x)), uncovered=uncovered, uncounted=sorted(watcher.seen))


def require_coverage(qmodel: QuantizedModel, inputs: torch.Tensor, minimum: float, site: str) -> Coverage:
    """The view's coverage, or EvaluationError naming what is left in float when faults at `site` reach less
    than `minimum` of it: a verdict would then be about the quantized part of the model only."""
    from .evaluate import EvaluationError

    coverage = measure_coverage(qmodel, inputs)
    if not coverage.reaches(minimum, site):
        raise EvaluationError(
            f"min_coverage={minimum:g}: {coverage.describe()}. A verdict would be about the quantized part only: "
            f"lower min_coverage= to gate on it knowingly (min_coverage={coverage.accepting(site):g} accepts it)")
    return coverage
