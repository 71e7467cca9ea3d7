"""Hypothesis-driven search for the worst fault patterns of a quantized model, shrunk to minimal counterexamples.

A campaign (``campaign.py``) estimates the *average* accuracy under random faults at a bit error rate. A search asks
the worst-case question instead: is there a pattern of at most k faults that takes the accuracy below the threshold,
and if so, which is the smallest? Hypothesis draws patterns (``strategies.py``), is steered toward damaging ones by
``hypothesis.target`` (the accuracy drop, and a finer logit-margin loss), and shrinks the first failing pattern to a
minimal one: fewer faults, then lower bits, earlier layers, lower indices.

Every candidate is first screened on a small fixed subset of the data (evenly spaced images, `subset`); only a
pattern that fails there is evaluated on all the data, and a pattern counts as failing only when it fails there
too. The shrinker therefore only ever keeps patterns that fail on the full data: what is reported is confirmed.
Per-image transient faults need no subset: only the images they strike are evaluated, and the accuracy over all the
data follows exactly from the fault-free predictions.

Two ways in:

- inside a user's own ``@given`` test: ``FaultOracle(qmodel, data, max_drop=0.2).check(pattern)`` with a pattern
  from ``strategies.bit_flips``: it calls ``hypothesis.target`` and fails with the report below;
- driven by the plugin or a plain test: ``search_faults(qmodel, data, ...)`` / ``run_marker_search(...)``, which run
  ``hypothesis.find`` under a stable ``database_key``, so that the stored counterexample is replayed first next time.

What a search asks for (`SearchSpec`, `expand_search`) lives in `spec.py`, beside `CampaignSpec`; the failure
report's per-fault explanation and replay live in `explain.py`. This module imports neither torch nor hypothesis
when it is imported; the engine is imported when a search runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# What a search asks for, re-exported from spec.py where it lives (`from pytest_hwfault.search import SearchSpec`).
from .data import Batch
from .spec import DEFAULT_EXAMPLES, DEFAULT_MAX_FLIPS, DEFAULT_SUBSET, SearchSpec, check_threshold

if TYPE_CHECKING:
    import torch
    from hypothesis import settings as HypothesisSettings

    from .explain import FaultDetail
    from .faults import Fault, FaultPattern
    from .qmodel import QuantizedModel

MARGIN_CLAMP = 1e6  # logit margins are clamped so that target() always sees finite numbers
DROP_LABEL = "accuracy drop"
MARGIN_LABEL = "logit margin loss"


def search_database_key(name: str, spec: SearchSpec, qmodel: QuantizedModel | None = None) -> bytes:
    """Hypothesis database key of a search: the caller's name (a test's nodeid), the search's question and the
    model's architecture (layer names, types, weight shapes, code width), not its weights, so that a retrained model
    is first tried on the counterexample that broke its predecessor."""
    architecture = None if qmodel is None else [
        [name_, layer.module_type, list(layer.weight_codes.shape), layer.bits] for name_, layer in qmodel.layers.items()
    ]
    payload = json.dumps({"name": name, "search": spec.question(), "architecture": architecture}, sort_keys=True)
    return b"pytest-hwfault.search." + hashlib.blake2b(payload.encode(), digest_size=16).hexdigest().encode()


# -- evaluating candidates -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Screen:
    """One candidate on the images it was evaluated on."""

    accuracy: float
    drop: float  # fault-free accuracy of the same images minus `accuracy`
    margin_loss: float  # mean decrease of (true logit - best other logit) over the same images
    images: int


def subset_indices(n_images: int, subset: int | None) -> list[int]:
    """The screening subset: `subset` evenly spaced images out of `n_images` (every image when None or larger),
    so that data sorted by class is still covered."""
    if subset is None or subset >= n_images:
        return list(range(n_images))
    if subset == 1:
        return [0]
    return sorted({round(i * (n_images - 1) / (subset - 1)) for i in range(subset)})


def _margins(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: correct (NaN/Inf rows count as wrong, as in evaluate.py) and the clamped logit margin."""
    import torch

    logits = logits.reshape(len(logits), -1).float()
    finite = torch.isfinite(logits).all(dim=1)
    clean = torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
    labels = labels.to(clean.device)
    true = clean.gather(1, labels[:, None])[:, 0]
    others = clean.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
    correct = (clean.argmax(dim=1) == labels) & finite
    margin = torch.where(finite, (true - others).clamp(-MARGIN_CLAMP, MARGIN_CLAMP),
                         torch.full_like(true, -MARGIN_CLAMP))
    return correct.cpu(), margin.cpu()


class FaultSearchFailure(AssertionError):
    """A fault pattern takes the accuracy below the threshold; the message is the report."""


class FaultOracle:
    """Decides whether fault patterns break a quantized model on fixed data, and explains the ones that do.

    The threshold is ``min_acc`` (absolute) or ``max_drop`` (from the fault-free quantized accuracy of the same
    images). Build it once per model and data (e.g. in a module- or session-scoped fixture) and call `check` in a
    ``@given`` test, or give it to `search_faults`. Counters: `screened` (subset evaluations), `confirmed` (full
    evaluations), `observations` (every drop given to ``hypothesis.target``) and `best_drop`."""

    def __init__(
        self,
        qmodel: QuantizedModel,
        data: Any,
        *,
        min_acc: float | None = None,
        max_drop: float | None = None,
        subset: int | None = DEFAULT_SUBSET,
        samples: int | None = None,
        batch_size: int = 256,
    ) -> None:
        from .data import as_tensors
        from .evaluate import check_repeatable

        check_threshold(min_acc, max_drop)
        self.qmodel = qmodel
        self.inputs, self.labels = as_tensors(data, samples)
        if len(self.inputs) == 0:
            raise ValueError("data is empty")
        # a pattern is judged on a subset, then on every image: a forward that moves by itself, or an image that
        # reads the others, would make those two disagree and a drop the model's own doing
        check_repeatable(qmodel, self.inputs)
        self.min_acc = min_acc
        self.max_drop = max_drop
        self.batch_size = batch_size
        self.subset = subset_indices(len(self.inputs), subset)
        self.x_subset = self.inputs[self.subset]
        self.y_subset = self.labels[self.subset]
        self.clean_correct, self.clean_margin = self._run(self.inputs, self.labels, None)
        self.baseline = float(self.clean_correct.float().mean())
        self.subset_baseline = float(self.clean_correct[self.subset].float().mean())
        self.required = self._required(self.baseline)
        self.subset_required = self._required(self.subset_baseline)
        self.screened = 0
        self.confirmed = 0
        self.observations: list[float] = []
        self.best_drop = 0.0

    # -- thresholds and raw evaluation ---------------------------------------------------------------------------
    def _required(self, baseline: float) -> float:
        return float(self.min_acc) if self.min_acc is not None else baseline - float(self.max_drop or 0.0)

    @staticmethod
    def _below(accuracy: float, required: float) -> bool:
        return accuracy < required - 1e-9

    def threshold_text(self) -> str:
        if self.min_acc is not None:
            return f">= {self.required:.4f} (min_acc)"
        return f">= {self.required:.4f} (fault-free {self.baseline:.4f} - max_drop {self.max_drop:g})"

    def _run(self, x: Batch, y: torch.Tensor, pattern: FaultPattern | None) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
        import torch

        from .evaluate import select_logits

        correct, margin = [], []
        for start in range(0, len(x), self.batch_size):
            batch = x[start : start + self.batch_size]
            logits = select_logits(self.qmodel(batch, pattern, image_offset=start), len(batch))
            c, m = _margins(logits, y[start : start + self.batch_size])
            correct.append(c)
            margin.append(m)
        return torch.cat(correct), torch.cat(margin)

    # -- the search's representation: faults, with image None = every image at transient sites ------------------
    @staticmethod
    def _per_image_only(faults: Sequence[Fault]) -> bool:
        from .faults import Site

        return bool(faults) and all(Site(f.site).transient and f.image is not None for f in faults)

    def _on_images(self, faults: Sequence[Fault], images: Sequence[int]) -> FaultPattern:
        """The pattern of `faults` over the given images of the data (sorted), renumbered 0..len(images)-1."""
        from .explain import pattern_of
        from .faults import Fault

        position = {image: i for i, image in enumerate(images)}
        kept = []
        for f in faults:
            if f.image is None:
                kept.append(f)
            elif f.image in position:
                kept.append(Fault(f.site, f.layer, f.index, f.bit, f.kind, position[f.image]))
        return pattern_of(kept, len(images))

    def full_pattern(self, faults: Sequence[Fault]) -> FaultPattern:
        """The exact pattern of `faults` over all the data (what `accuracy(qmodel, data, faults=...)` replays)."""
        from .explain import pattern_of

        return pattern_of(faults, len(self.inputs))

    def screen(self, faults: Sequence[Fault]) -> Screen:
        """Evaluate on the subset (or, for per-image transient faults, exactly on all the data)."""
        if self._per_image_only(faults):
            return self._exact(faults)
        self.screened += 1
        correct, margin = self._run(self.x_subset, self.y_subset, self._on_images(faults, self.subset))
        accuracy = float(correct.float().mean())
        loss = float((self.clean_margin[self.subset] - margin).mean())
        return Screen(accuracy, self.subset_baseline - accuracy, loss, len(self.subset))

    def _exact(self, faults: Sequence[Fault]) -> Screen:
        """Per-image transient faults: evaluate only the images they strike; the others keep their fault-free
        outcome, so the accuracy over all the data is exact."""
        images = sorted({int(f.image) for f in faults if f.image is not None})
        bad = [i for i in images if i >= len(self.inputs)]
        if bad:
            raise IndexError(f"fault on image {bad[0]} but only {len(self.inputs)} images are evaluated")
        self.confirmed += 1
        correct, margin = self._run(self.inputs[images], self.labels[images], self._on_images(faults, images))
        changed = int(correct.sum()) - int(self.clean_correct[images].sum())
        accuracy = (int(self.clean_correct.sum()) + changed) / len(self.inputs)
        loss = float((self.clean_margin[images] - margin).sum()) / len(self.inputs)
        return Screen(accuracy, self.baseline - accuracy, loss, len(self.inputs))

    def accuracy(self, faults: Sequence[Fault]) -> float:
        """Accuracy over all the data under `faults` (the confirmation)."""
        if self._per_image_only(faults):
            return self._exact(faults).accuracy
        self.confirmed += 1
        correct, _ = self._run(self.inputs, self.labels, self.full_pattern(faults))
        return float(correct.float().mean())

    def _observe(self, screen: Screen) -> None:
        from hypothesis import target
        from hypothesis.control import currently_in_test_context

        self.observations.append(screen.drop)
        self.best_drop = max(self.best_drop, screen.drop)
        if currently_in_test_context():
            target(screen.drop, label=DROP_LABEL)
            target(screen.margin_loss, label=MARGIN_LABEL)

    def fails(self, faults: Sequence[Fault]) -> bool:
        """The search's condition: fails on the subset (cheap), then on all the data (confirmed). Calls
        ``hypothesis.target`` with the subset's accuracy drop and logit-margin loss when inside a test."""
        faults = tuple(faults)
        screen = self.screen(faults)
        self._observe(screen)
        if self._per_image_only(faults):
            return self._below(screen.accuracy, self.required)
        if not self._below(screen.accuracy, self.subset_required):
            return False
        if len(self.subset) == len(self.inputs):
            return True
        return self._below(self.accuracy(faults), self.required)

    # -- inside a user's @given test ---------------------------------------------------------------------------
    def faults_of(self, pattern: FaultPattern | Sequence[Fault]) -> tuple[Fault, ...]:
        """The search representation of a pattern: a transient fault on the same code and bit of every image of the
        data becomes one fault with ``image=None`` (drawn patterns remember theirs)."""
        from .faults import Fault, FaultPattern
        from .strategies import DrawnPattern

        if isinstance(pattern, DrawnPattern):
            return pattern.drawn
        faults = tuple(pattern.to_list() if isinstance(pattern, FaultPattern) else pattern)
        images: dict[tuple[str, str, int, int, str], set[int]] = {}
        for f in faults:
            if f.image is not None:
                images.setdefault((f.site, f.layer, f.index, f.bit, f.kind), set()).add(f.image)
        every = {key for key, seen in images.items() if len(seen) == len(self.inputs) == max(seen) + 1}
        if not every:
            return faults
        collapsed: list[Fault] = []
        for f in faults:
            key = (f.site, f.layer, f.index, f.bit, f.kind)
            if f.image is None or key not in every:
                collapsed.append(f)
            elif f.image == 0:
                collapsed.append(Fault(*key))
        return tuple(collapsed)

    def check(self, pattern: FaultPattern | Sequence[Fault]) -> None:
        """For a ``@given`` test: target the damage and fail with the report when `pattern` breaks the model."""
        faults = self.faults_of(pattern)
        if self.fails(faults):
            raise FaultSearchFailure(self.report(faults))

    # -- explaining a pattern -----------------------------------------------------------------------------------
    def details(self, faults: Sequence[Fault]) -> list[FaultDetail]:
        from .explain import describe_faults

        return describe_faults(self.qmodel, faults, self.inputs)

    def report(self, faults: Sequence[Fault], header: str | None = None) -> str:
        """The failure message: the pattern fault by fault, the accuracies, and the replay."""
        from .explain import format_details, replay_lines

        accuracy = self.accuracy(faults)
        n = len(self.inputs)
        lines = [header or f"hwfault: {len(faults)} fault(s) take the accuracy to {accuracy:.4f}, below the "
                           f"required {self.threshold_text()}"]
        lines.append(f"  accuracy under the pattern: {accuracy:.4f} on {n} images; fault-free quantized "
                     f"{self.baseline:.4f}")
        lines.append("  the pattern (shrunk toward fewer faults, then lower bits, earlier layers, lower indices):")
        lines.extend("    " + line for line in format_details(self.details(faults)))
        lines.append("  replay:")
        lines.extend("    " + line for line in replay_lines(faults, n, self.required, accuracy))
        return "\n".join(lines)


# -- the plugin-driven search ---------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """What a search found. `found` is True only for a pattern confirmed on all the data; `faults` is then the
    shrunk pattern (transient faults with image None strike every image) and `pattern` its exact FaultPattern."""

    spec: SearchSpec
    found: bool
    faults: tuple[Fault, ...]
    accuracy: float | None  # under `faults`, on all the data
    baseline: float  # fault-free quantized accuracy on all the data
    required: float
    images: int
    subset: int
    screened: int  # subset (or exact per-image) evaluations
    confirmed: int  # evaluations on all the data
    best_drop: float  # the largest accuracy drop seen on the subset
    seconds: float
    database_key: bytes | None
    details: list[FaultDetail] = field(default_factory=list)
    message: str = ""

    @property
    def pattern(self) -> FaultPattern | None:
        from .explain import pattern_of

        return pattern_of(self.faults, self.images) if self.found else None

    @property
    def evaluations(self) -> int:
        return self.screened + self.confirmed

    def replay(self) -> str:
        from .explain import replay_expression

        return replay_expression(self.faults, self.images)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (for a report)."""
        return {"spec": self.spec.to_dict(), "found": self.found,
                "faults": [[f.site, f.layer, f.index, f.bit, f.kind, f.image] for f in self.faults],
                "accuracy": self.accuracy, "baseline": self.baseline, "required": self.required,
                "images": self.images, "subset": self.subset, "screened": self.screened,
                "confirmed": self.confirmed, "best_drop": self.best_drop, "seconds": self.seconds,
                "database_key": None if self.database_key is None else self.database_key.decode(),
                "details": [d.to_dict() for d in self.details]}

    def summary(self) -> str:
        verdict = f"FOUND {len(self.faults)} fault(s)" if self.found else "no failing pattern found"
        return (f"hwfault search site={self.spec.site} kind={self.spec.kind} max_flips={self.spec.max_flips}: "
                f"{verdict} within {self.spec.examples} examples ({self.evaluations} model evaluations, "
                f"largest screened drop {self.best_drop:.4f}, {self.seconds:.1f}s)")


def search_settings(spec: SearchSpec, base: HypothesisSettings | None = None) -> HypothesisSettings:
    """The settings of a search: the active profile's (or `base`), with ``max_examples=spec.examples``, no
    deadline (a model evaluation easily takes more than 200 ms) and no explain phase (it only re-runs the model)."""
    from hypothesis import Phase
    from hypothesis import settings as Settings

    base = base if base is not None else Settings()
    return Settings(base, max_examples=spec.examples, deadline=None,
                    phases=[p for p in base.phases if p is not Phase.explain])


def run_marker_search(
    qmodel: QuantizedModel,
    inputs: Batch,
    labels: torch.Tensor,
    spec: SearchSpec,
    *,
    nodeid: str = "",
    settings: HypothesisSettings | None = None,
    database_key: bytes | None = None,
) -> SearchResult:
    """Run the search `spec` on (inputs, labels) with ``hypothesis.find`` and return what it found.

    The database key defaults to `search_database_key(nodeid, spec, qmodel)`, so a rerun of the same test replays
    the stored counterexample first. ``spec.seed`` (not None) fixes hypothesis's random choices; with None, the
    active profile decides (the ``ci`` profile derandomizes)."""
    from random import Random

    from hypothesis import find
    from hypothesis.errors import NoSuchExample

    from .strategies import fault_lists

    start = time.perf_counter()
    if spec.samples is not None:
        inputs, labels = inputs[: spec.samples], labels[: spec.samples]
    oracle = FaultOracle(qmodel, (inputs, labels), min_acc=spec.min_acc, max_drop=spec.max_drop,
                         subset=spec.subset)
    strategy = fault_lists(qmodel, spec.site, layers=spec.layer_selectors(), bit_positions=spec.bit_positions,
                           max_flips=spec.max_flips, kinds=spec.kinds(), per_image=spec.per_image,
                           images=len(inputs))
    key = database_key if database_key is not None else search_database_key(nodeid, spec, qmodel)
    rng = None if spec.seed is None else Random(spec.seed)
    try:
        faults: tuple[Fault, ...] | None = find(strategy, oracle.fails, settings=search_settings(spec, settings),
                                                random=rng, database_key=key)
    except NoSuchExample:
        faults = None
    result = SearchResult(spec, faults is not None, faults or (), None, oracle.baseline, oracle.required,
                          len(inputs), len(oracle.subset), 0, 0, oracle.best_drop, 0.0, key)
    if faults is not None:
        result.accuracy = oracle.accuracy(faults)
        result.details = oracle.details(faults)
        header = (f"hwfault search (site={spec.site}, kind={spec.kind}, max_flips={spec.max_flips}, "
                  f"{spec.examples} examples, seed={spec.seed}): {len(faults)} fault(s) take the accuracy to "
                  f"{result.accuracy:.4f}, below the required {oracle.threshold_text()}")
        result.message = oracle.report(faults, header=header)
    result.screened, result.confirmed = oracle.screened, oracle.confirmed
    result.seconds = time.perf_counter() - start
    return result


def search_faults(
    qmodel: QuantizedModel,
    data: Any,
    *,
    site: str = "weight",
    min_acc: float | None = None,
    max_drop: float | None = None,
    max_flips: int = DEFAULT_MAX_FLIPS,
    kind: str = "flip",
    bit_positions: Iterable[int] | None = None,
    layers: str | Iterable[str] | None = None,
    per_image: bool = False,
    examples: int = DEFAULT_EXAMPLES,
    subset: int | None = DEFAULT_SUBSET,
    samples: int | None = None,
    seed: int | None = None,
    name: str = "",
    settings: HypothesisSettings | None = None,
    database_key: bytes | None = None,
    array: tuple[int, int] | None = None,
    pe_register: str = "acc",
) -> SearchResult:
    """Search for a pattern of at most `max_flips` faults at `site` that takes the accuracy of `qmodel` on `data`
    below the threshold; return the shrunk, confirmed pattern (or ``found=False``). `name` (e.g. a test's nodeid)
    goes into the database key. See `SearchSpec` for the arguments."""
    from .data import as_tensors

    spec = SearchSpec(site=site, min_acc=min_acc, max_drop=max_drop, max_flips=max_flips, kind=kind,
                      bits=qmodel.config.get("bits", 8) if hasattr(qmodel, "config") else 8,
                      bit_positions=None if bit_positions is None else tuple(bit_positions),
                      layers=None if layers is None else ((layers,) if isinstance(layers, str) else tuple(layers)),
                      per_image=per_image, examples=examples, subset=subset, samples=samples, seed=seed,
                      array=array, pe_register=pe_register)
    inputs, labels = as_tensors(data)
    return run_marker_search(qmodel, inputs, labels, spec, nodeid=name, settings=settings,
                             database_key=database_key)


def mutations(faults: Sequence[Fault]) -> Iterable[tuple[str, tuple[Fault, ...]]]:
    """The single shrink steps a minimal pattern must resist: drop any one fault; move any fault to a lower bit.
    (For tests and audits of a reported pattern: `FaultOracle.fails` must be False on each.)"""
    from .faults import Fault

    for i, f in enumerate(faults):
        if len(faults) > 1:
            yield f"without fault {i + 1}", tuple(faults[:i]) + tuple(faults[i + 1 :])
        for bit in range(f.bit):
            lowered = Fault(f.site, f.layer, f.index, bit, f.kind, f.image)
            if lowered not in faults:
                yield f"fault {i + 1} on bit {bit}", tuple(faults[:i]) + (lowered,) + tuple(faults[i + 1 :])
