"""Statistical fault campaigns: deterministic trials, mergeable results, sequential verdicts.

Trial i of a campaign draws its faults from a generator seeded by (base seed, campaign id, i) alone, so a trial's
outcome does not depend on which process computes it or when. A result is a set of trial outcomes; its verdict is
defined on the contiguous prefix [0, T) of trials, looked at only at the plan's checkpoints: the first checkpoint
that decides wins, and trials past it are ignored. Any executor (one process, xdist shards, CI machines) that
computes any superset of that prefix therefore reports the same numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .bits import Kind
from .coverage import require_coverage
from .data import Batch, DataError, Inputs
from .evaluate import (
    EvaluationError,
    Predictions,
    baseline_floor,
    chance_accuracy,
    check_classification,
    check_repeatable,
    decide,
    predict,
    select_logits,
)
from .faults import FaultModel, FaultPattern, Site, check_trial_size, sample_pattern, trial_generator
from .identity import state_checksum, tensor_fingerprint
from .late_start import DEFAULT_CACHE_BYTES, LateStart
from .mitigation import Mitigation
from .qmodel import SiteUnreachableError
from .quantization import QuantizedModel, require_exact_view
from .spec import CampaignSpec
from .stats import Decision, SequentialPlan, Threshold, Verdict, clopper_pearson_interval

RESULT_SCHEMA = 1
INCOMPLETE = "incomplete"  # verdict of a campaign whose trials stop short of its next checkpoint (a lost shard)


def _pack(mask: torch.Tensor) -> str:
    """Per-image booleans as a hex string (bit i of byte i//8 is image i)."""
    bits = mask.to(torch.uint8).cpu()
    pad = (-len(bits)) % 8
    bits = torch.cat([bits, torch.zeros(pad, dtype=torch.uint8)]).reshape(-1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
    return bytes((bits.to(torch.int32) * weights).sum(1).to(torch.uint8).tolist()).hex()


def unpack_mask(hexstr: str, images: int) -> list[bool]:
    data = bytes.fromhex(hexstr)
    return [bool(data[i // 8] >> (i % 8) & 1) for i in range(images)]


@dataclass(frozen=True)
class TrialResult:
    """The outcome of one trial, as JSON-safe builtins."""

    trial: int
    images: int
    correct: int
    critical: int  # images whose prediction differs from the fault-free quantized prediction
    nonfinite: int  # images whose logits held NaN or Inf (counted as misclassified)
    faults: int  # faults injected
    faulty_images: int  # images holding at least one fault (all of them for weight faults)
    correct_mask: str  # per-image correctness, packed (see unpack_mask)
    layer_faults: dict[str, int] = field(default_factory=dict)
    layer_exposure: dict[str, float] = field(default_factory=dict)  # images (or trials) hit in this layer
    layer_damage: dict[str, float] = field(default_factory=dict)  # of those, the critical ones
    # detected unrecoverable errors (DUE): images whose logits held NaN or Inf, and every image of a trial whose
    # weight memory's ECC detected an uncorrectable word; none is a correct prediction
    detected: int = 0
    silent: int | None = None  # images whose prediction changed and nothing flagged (silent data corruption)
    corrected: int = 0  # faults a mitigation removed (protected layers, ECC-corrected words)
    unmitigated_correct: int | None = None  # a mitigated campaign: correct images under the same faults, unmitigated

    @property
    def accuracy(self) -> float:
        return self.correct / self.images

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialResult:
        return cls(**dict(data))


@dataclass(frozen=True)
class Outcome:
    """What a campaign result says at its deciding checkpoint."""

    verdict: str  # pass, fail, inconclusive (budget spent) or incomplete (trials missing before a decision)
    trials: int  # trials the numbers below are computed on (a prefix)
    accuracy: float
    ci_low: float
    ci_high: float
    confidence: float
    required: float
    method: str
    critical_rate: float
    nonfinite: int
    faults_per_trial: float
    complete: bool
    detected: int = 0  # DUE images over the trials used
    silent: int | None = None  # images whose prediction changed unflagged (None: trials from before it was counted)
    corrected: int = 0  # faults the mitigations removed
    # a mitigated campaign: the unmitigated model's accuracy under the same faults, judged as the gate is
    unmitigated: Decision | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CampaignResult:
    """A (possibly partial) set of trial outcomes of one campaign, plus its fault-free baselines."""

    campaign_id: str
    name: str
    spec: CampaignSpec
    images: int
    float_accuracy: float
    quantized_accuracy: float
    layers: list[dict[str, Any]]
    trials: dict[int, TrialResult] = field(default_factory=dict)
    seconds: float = 0.0
    identity: dict[str, str] = field(default_factory=dict)  # fingerprints of the model and data it was run on
    coverage: dict[str, Any] = field(default_factory=dict)  # coverage.Coverage.to_dict() of the quantized view
    # where the codes came from: "calibrated" (quantized here) or the deployed format read (`deployed.FORMATS`)
    model_format: str = "calibrated"
    # a mitigated campaign: `mitigation.Mitigation.describe()` (its name, protected layers and cost)
    mitigation: dict[str, Any] = field(default_factory=dict)
    # what the reader of a deployed model knows it does not reproduce, or leaves outside the fault sites, in words
    # (`deployed.Deployed.notes`, and for a compiled model the load check against it)
    model_notes: list[str] = field(default_factory=list)
    # the load checks' notes on a deployed model's view computing otherwise than the model, judged anyway
    # (allow_inexact_view=True); empty when the view computes what the model does
    inexact_view: list[str] = field(default_factory=list)

    # -- merging -------------------------------------------------------------------------------------------------
    def merge(self, other: CampaignResult) -> CampaignResult:
        """Union of the trials of two partial results of the same campaign; order does not matter."""
        if other.campaign_id != self.campaign_id:
            raise ValueError(f"cannot merge campaign {other.campaign_id} ({other.name}) into {self.campaign_id}")
        if other.spec != self.spec:
            changed = {k: (v, other.spec.to_dict()[k]) for k, v in self.spec.to_dict().items()
                       if other.spec.to_dict()[k] != v}
            raise ValueError(f"partial results of {self.name} disagree on the campaign's settings "
                             + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in changed.items()))
        for key in sorted(set(self.identity) & set(other.identity)):
            if self.identity[key] != other.identity[key]:
                what = {"model": "models", "data": "data"}.get(key, key)
                raise ValueError(f"partial results of {self.name} were run on different {what} (fingerprint "
                                 f"{self.identity[key][:12]} vs {other.identity[key][:12]}): build the model and "
                                 "data deterministically (seeded, thread-count independent) in every part")
        for attr in ("images", "float_accuracy", "quantized_accuracy"):
            if getattr(self, attr) != getattr(other, attr):
                raise ValueError(f"partial results of {self.name} disagree on {attr}: "
                                 f"{getattr(self, attr)} vs {getattr(other, attr)}: they were run on different "
                                 "models or data")
        trials = dict(self.trials)
        for index, trial in other.trials.items():
            if index in trials and trials[index] != trial:
                raise ValueError(f"trial {index} of {self.name} differs between partial results, although trials are "
                                 "deterministic: the parts ran different models, data or plugin versions")
            trials[index] = trial
        return CampaignResult(self.campaign_id, self.name, self.spec, self.images, self.float_accuracy,
                              self.quantized_accuracy, self.layers, dict(sorted(trials.items())),
                              max(self.seconds, other.seconds), self.identity or other.identity,
                              self.coverage or other.coverage, self.model_format,
                              self.mitigation or other.mitigation, self.model_notes or other.model_notes,
                              self.inexact_view or other.inexact_view)

    def trimmed(self) -> CampaignResult:
        """Only the trials the outcome is computed on: the same result however many extra trials ran."""
        keep = self.outcome().trials if self.decided() else self.contiguous()
        return CampaignResult(self.campaign_id, self.name, self.spec, self.images, self.float_accuracy,
                              self.quantized_accuracy, self.layers, {i: self.trials[i] for i in range(keep)},
                              self.seconds, self.identity, self.coverage, self.model_format, self.mitigation,
                              self.model_notes, self.inexact_view)

    def contiguous(self) -> int:
        """T such that trials 0..T-1 are all present."""
        t = 0
        while t in self.trials:
            t += 1
        return t

    # -- deciding ------------------------------------------------------------------------------------------------
    def plan(self) -> SequentialPlan:
        return SequentialPlan(confidence=self.spec.confidence, first=self.spec.first, budget=self.spec.budget)

    def required_accuracy(self) -> float:
        threshold = Threshold(min_acc=self.spec.min_acc, max_drop=self.spec.max_drop)
        return threshold.required_accuracy(self.quantized_accuracy)

    def _decision(self, plan: SequentialPlan, trials: int, required: float) -> Decision:
        chosen = [self.trials[i] for i in range(trials)]
        if self.spec.transient:
            return plan.decide_binomial(sum(t.correct for t in chosen), sum(t.images for t in chosen), trials,
                                        required)
        return plan.decide_bounded([t.accuracy for t in chosen], required)

    def outcome(self) -> Outcome:
        """The verdict at the first checkpoint that decides, computed on exactly that prefix of trials."""
        plan, required, available = self.plan(), self.required_accuracy(), self.contiguous()
        decision: Decision | None = None
        used = 0
        for checkpoint in plan.checkpoints():
            if checkpoint > available:
                return self._outcome(INCOMPLETE, used, decision, required, complete=False)
            decision, used = self._decision(plan, checkpoint, required), checkpoint
            if decision.verdict is not Verdict.INCONCLUSIVE:
                return self._outcome(decision.verdict.value, used, decision, required, complete=True)
        return self._outcome(Verdict.INCONCLUSIVE.value, used, decision, required, complete=True)

    def decided(self) -> bool:
        """True once no further trial can change the outcome."""
        return self.outcome().complete

    def next_checkpoint(self) -> int | None:
        available = self.contiguous()
        for checkpoint in self.plan().checkpoints():
            if checkpoint > available:
                return checkpoint
        return None

    def _outcome(self, verdict: str, used: int, decision: Decision | None, required: float,
                 complete: bool) -> Outcome:
        chosen = [self.trials[i] for i in range(used)]
        images = sum(t.images for t in chosen)
        unmitigated = None
        if used and self.spec.mitigated and all(t.unmitigated_correct is not None for t in chosen):
            plan = self.plan()
            if self.spec.transient:
                unmitigated = plan.decide_binomial(sum(t.unmitigated_correct or 0 for t in chosen), images, used,
                                                   required)
            else:
                unmitigated = plan.decide_bounded([(t.unmitigated_correct or 0) / t.images for t in chosen], required)
        silent = [t.silent for t in chosen]
        return Outcome(
            verdict=verdict,
            trials=used,
            accuracy=decision.estimate if decision else float("nan"),
            ci_low=decision.ci_low if decision else 0.0,
            ci_high=decision.ci_high if decision else 1.0,
            confidence=self.spec.confidence,
            required=required,
            method=decision.method if decision else "",
            critical_rate=sum(t.critical for t in chosen) / images if images else float("nan"),
            nonfinite=sum(t.nonfinite for t in chosen),
            faults_per_trial=sum(t.faults for t in chosen) / used if used else 0.0,
            complete=complete,
            detected=sum(t.detected for t in chosen),
            silent=None if any(v is None for v in silent) else sum(v or 0 for v in silent),
            corrected=sum(t.corrected for t in chosen),
            unmitigated=unmitigated,
        )

    def layer_vulnerability(self, trials: int | None = None) -> list[dict[str, Any]]:
        """Per layer: faults, and the share of fault-hit images (trials, for weights) that became critical.

        An image hit in several layers is credited to each of them, so this ranks layers; it is not a causal
        decomposition."""
        used = self.outcome().trials if trials is None else trials
        faults: dict[str, int] = {}
        exposure: dict[str, float] = {}
        damage: dict[str, float] = {}
        for i in range(used):
            t = self.trials[i]
            for name, count in t.layer_faults.items():
                faults[name] = faults.get(name, 0) + count
                exposure[name] = exposure.get(name, 0.0) + t.layer_exposure.get(name, 0.0)
                damage[name] = damage.get(name, 0.0) + t.layer_damage.get(name, 0.0)
        rows = []
        total = sum(faults.values())
        for layer in self.layers:
            name = layer["name"]
            hit, harmed = exposure.get(name, 0.0), damage.get(name, 0.0)
            low, high = self._vulnerability_interval(harmed, hit)
            rows.append({**layer, "faults": faults.get(name, 0), "fault_share": faults.get(name, 0) / total if total
                         else 0.0, "vulnerability": harmed / hit if hit else 0.0, "vulnerability_low": low,
                         "vulnerability_high": high})
        # exposure: the bits faults can strike in the layer x its vulnerability (the faults drawn there, for
        # results from before site bits were recorded), as a share of the model's
        weights = [row.get("site_bits", row["faults"]) * row["vulnerability"] for row in rows]
        whole = sum(weights)
        for row, weight in zip(rows, weights):
            row["exposure_share"] = weight / whole if whole else 0.0
        return rows

    def _vulnerability_interval(self, harmed: float, hit: float) -> tuple[float, float]:
        """At the campaign's confidence: Clopper-Pearson over fault-hit images (transient sites: counts), Hoeffding
        over fault-hit trials (weights: each trial's critical share, in [0, 1]); (0, 1) for a layer never hit."""
        if not hit:
            return 0.0, 1.0
        if self.spec.transient:
            return clopper_pearson_interval(int(round(harmed)), int(round(hit)), self.spec.confidence)
        half = math.sqrt(math.log(2.0 / (1.0 - self.spec.confidence)) / (2.0 * hit))
        mean = harmed / hit
        return max(0.0, mean - half), min(1.0, mean + half)

    # -- serialising ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RESULT_SCHEMA,
            "campaign_id": self.campaign_id,
            "name": self.name,
            "spec": self.spec.to_dict(),
            "images": self.images,
            "float_accuracy": self.float_accuracy,
            "quantized_accuracy": self.quantized_accuracy,
            "layers": self.layers,
            "trials": [self.trials[i].to_dict() for i in sorted(self.trials)],
            "seconds": self.seconds,
            "identity": self.identity,
            "coverage": self.coverage,
            "model_format": self.model_format,
            **({"mitigation": self.mitigation} if self.mitigation else {}),
            **({"model_notes": self.model_notes} if self.model_notes else {}),
            **({"inexact_view": self.inexact_view} if self.inexact_view else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CampaignResult:
        if data.get("schema") != RESULT_SCHEMA:
            raise ValueError(f"campaign result schema {data.get('schema')!r} is not {RESULT_SCHEMA}")
        trials = {t["trial"]: TrialResult.from_dict(t) for t in data["trials"]}
        return cls(data["campaign_id"], data["name"], CampaignSpec.from_dict(data["spec"]), data["images"],
                   data["float_accuracy"], data["quantized_accuracy"], list(data["layers"]), trials,
                   data.get("seconds", 0.0), dict(data.get("identity") or {}), dict(data.get("coverage") or {}),
                   str(data.get("model_format", "calibrated")), dict(data.get("mitigation") or {}),
                   [str(note) for note in data.get("model_notes") or []],
                   [str(note) for note in data.get("inexact_view") or []])


def _first_persistent_layer(pattern: FaultPattern, layer_position: Mapping[str, int]) -> int | None:
    """The position of the first layer the pattern's faults touch, when they are weight or qparams faults only
    (each tied to one layer); None for any other pattern (a faulty PE reaches every layer, transient faults are
    per image)."""
    positions = []
    for (site, layer), group in pattern.groups.items():
        if not len(group):
            continue
        if site not in (Site.WEIGHT, Site.QPARAMS) or layer not in layer_position:
            return None
        positions.append(layer_position[layer])
    return min(positions, default=None)


@dataclass
class FaultFreeRuns:
    """What fault-free passes over one set of images tell every campaign on one quantized view: late start's cache
    (the same pass as the golden run), the golden and the float predictions. A suite gates one model at several
    sites and BERs, and the advisor runs a campaign per layer: each would repeat these passes. They stay true for
    the view's lifetime, since every trial restores its weights bit for bit."""

    qmodel: QuantizedModel  # held, so that its id in the key is not reused while this lives
    late_start: LateStart | None = None
    golden: Predictions | None = None
    float_predictions: Predictions | None = None


# The most recent campaign's fault-free runs (one entry: late start's cache may hold 256 MiB), keyed on the view and
# its state (a view whose weights someone changed since is another model), the images, the batch size and the cache
# budget. A campaign on other images or another view replaces it.
_FAULT_FREE: dict[tuple[Any, ...], FaultFreeRuns] = {}


def fault_free_runs(qmodel: QuantizedModel, inputs: Batch, data: str | None, batch_size: int,
                    cache_bytes: int) -> FaultFreeRuns:
    """The shared fault-free runs of `qmodel` on `inputs` (`data`: their fingerprint, where known)."""
    key = (id(qmodel), state_checksum(qmodel.module),
           data or tensor_fingerprint(*(inputs.tensors if isinstance(inputs, Inputs) else (inputs,))), len(inputs),
           batch_size, cache_bytes)
    runs = _FAULT_FREE.get(key)
    if runs is None or runs.qmodel is not qmodel:
        _FAULT_FREE.clear()  # before the new cache is filled: at most one in memory
        runs = _FAULT_FREE[key] = FaultFreeRuns(qmodel)
    return runs


class Campaign:
    """Runs the trials of one campaign on one quantized model and evaluation set."""

    def __init__(self, qmodel: QuantizedModel, inputs: Batch, labels: torch.Tensor, spec: CampaignSpec,
                 name: str, *, identity: dict[str, str] | None = None, batch_size: int = 256,
                 drop_fault_free: bool = True, late_start: bool = True,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, paired: bool = True, notes: Sequence[str] = ()) -> None:
        """`notes`: what the report should say about the model as given, ahead of the view's own notes."""
        if spec.bits != qmodel.config["bits"]:
            raise ValueError(f"campaign asks for bits={spec.bits} but the model was quantized to "
                             f"{qmodel.config['bits']} bits")
        if spec.samples is not None:
            if len(inputs) < spec.samples:  # a verdict on fewer images would be about another set
                raise DataError(f"samples={spec.samples} but the evaluation data holds {len(inputs)} labelled "
                                f"images: give more data, or ask for samples={len(inputs)} or fewer")
            inputs, labels = inputs[: spec.samples], labels[: spec.samples]
        self.qmodel, self.inputs, self.labels, self.spec, self.name = qmodel, inputs, labels, spec, name
        self.inexact_view = require_exact_view(qmodel, spec.allow_inexact_view)  # before any pass: it is known
        self.notes = list(notes)
        self.batch_size = batch_size
        self.drop_fault_free = drop_fault_free
        self.use_late_start, self.cache_bytes = late_start, cache_bytes
        # the images' fingerprint: the identity's (of all the images and their labels) unless `samples` cut them
        data = identity.get("data") if identity and spec.samples is None else None
        self.fault_free = fault_free_runs(qmodel, inputs, data, batch_size, cache_bytes)
        self.campaign_id = spec.campaign_id(name)
        self.draw_id = spec.draw_id(name)  # a mitigated campaign meets the faults its unmitigated twin meets
        self.fault_model = FaultModel(Site(spec.site), spec.ber, Kind(spec.kind), spec.bit_positions,
                                      spec.layer_selectors(), spec.burst)
        self.targets = qmodel.targets(self.fault_model.site, self.fault_model.layers)
        if not self.targets:  # every trial would be fault-free, and pass
            raise SiteUnreachableError(qmodel.nothing_to_fault(self.fault_model.site, self.fault_model.layers))
        check_trial_size(self.fault_model, self.targets, len(inputs))  # before the golden run, not at trial 0
        check_repeatable(qmodel, inputs)
        # Faulty images resume from late start's cache; the pass that fills it is also the golden run.
        cache = self.late_start() if self.fault_model.site is not Site.PE else None
        golden = self.fault_free.golden
        if golden is None:
            if cache is not None and cache.fault_free_output is not None:
                golden = decide(cache.fault_free_output.cpu())
            else:
                golden = predict(qmodel, inputs, batch_size=batch_size)
            self.fault_free.golden = golden
        check_classification(golden, labels)
        self.coverage = require_coverage(qmodel, inputs, spec.min_coverage, spec.site,
                                         None if self.fault_model.site is Site.PE else self.fault_model.layers)
        self.golden, self.golden_nonfinite = golden.predicted, golden.nonfinite
        self.quantized_accuracy = float(golden.correct(labels).float().mean())
        if self.fault_free.float_predictions is None:
            self.fault_free.float_predictions = predict(qmodel, inputs, quantized=False, batch_size=batch_size)
        self.float_accuracy = float(self.fault_free.float_predictions.correct(labels).float().mean())
        self.identity = dict(identity or {})
        if spec.max_drop is not None and self.quantized_accuracy < baseline_floor(labels):
            raise EvaluationError(
                f"max_drop={spec.max_drop:g} is measured from the fault-free quantized accuracy, which is "
                f"{self.quantized_accuracy:.4f} (float {self.float_accuracy:.4f}): not above chance "
                f"({baseline_floor(labels):.4f} needed; the most frequent label alone scores "
                f"{chance_accuracy(labels):.4f}), so any drop would pass. Check the "
                "model, its labels and its quantization (hwfault.quantize(...).summary()), or gate with min_acc=")
        # a mitigated campaign also runs each trial unmitigated (`paired`), for the side-by-side accuracies
        self.paired = paired
        self.mitigation = Mitigation(qmodel, inputs, spec, batch_size) if spec.mitigated else None

    def empty_result(self) -> CampaignResult:
        site_bits = {t.layer: t.numel * len(self.fault_model.positions_for(t)) for t in self.targets}
        layers = [{**row, "site_bits": site_bits.get(row["name"], 0)} for row in self.qmodel.summary()]
        return CampaignResult(self.campaign_id, self.name, self.spec, len(self.inputs), self.float_accuracy,
                              self.quantized_accuracy, layers, identity=dict(self.identity),
                              coverage=self.coverage.to_dict(), model_format=self.qmodel.config["source"],
                              mitigation=self.mitigation.describe() if self.mitigation is not None else {},
                              model_notes=[*self.notes, *(str(n) for n in self.qmodel.config.get("notes") or []),
                                           *(str(n) for n in self.qmodel.config.get("deployed_notes") or [])],
                              inexact_view=list(self.inexact_view))

    def pattern(self, trial: int) -> FaultPattern:
        """The exact faults of trial `trial`: replayable, exportable."""
        return sample_pattern(self.fault_model, self.targets, len(self.inputs),
                              trial_generator(self.spec.seed, self.draw_id, trial))

    def _predict(self, pattern: FaultPattern) -> Predictions:
        """Predictions under `pattern`. Fault dropping: with transient faults only, an image that holds no fault
        keeps its fault-free prediction and only the faulty images run (bit-identical, since quantized layers
        compute exact integer sums whatever the batch)."""
        if not self.drop_fault_free or pattern.has_weight_faults():
            return self._predict_persistent(pattern)
        faulty = pattern.images_with_faults()
        predicted, nonfinite = self.golden.clone(), self.golden_nonfinite.clone()
        if not len(faulty):
            return Predictions(predicted, nonfinite)
        # no `validate`: a campaign predicts only under its own draws from the model's targets (`pattern`), or
        # subsets of them (mitigation), which fit the model and the images by construction
        own = pattern.restricted_to(faulty)
        from_start = torch.ones(len(faulty), dtype=torch.bool)
        late_start = self.late_start()
        if late_start is not None:  # late start: resume each image at the cut before its first fault
            for members, logits in late_start.logits(faulty, own):
                part = decide(select_logits(logits, len(members)).cpu())  # golden predictions live on the CPU
                predicted[faulty[members]], nonfinite[faulty[members]] = part.predicted, part.nonfinite
                from_start[members] = False
        rest = from_start.nonzero().reshape(-1)
        if len(rest):
            part = predict(self.qmodel, self.inputs[faulty[rest]], own.restricted_to(rest),
                           batch_size=self.batch_size, check=False)
            predicted[faulty[rest]], nonfinite[faulty[rest]] = part.predicted, part.nonfinite
        return Predictions(predicted, nonfinite)

    def _predict_persistent(self, pattern: FaultPattern) -> Predictions:
        """Predictions under persistent faults: every image runs, with the faults applied for the whole pass. When
        they are weight or qparams faults only, late start resumes all images at the cut before the first layer
        they touch: the layers before it compute what the fault-free pass computed (bit-identical)."""
        late_start = self.late_start()
        first = _first_persistent_layer(pattern, late_start.layer_position) if late_start is not None else None
        if late_start is None or first is None:
            return predict(self.qmodel, self.inputs, pattern, batch_size=self.batch_size)
        with self.qmodel.weight_faults(pattern):  # a draw of the campaign's own: no `validate` (see `_predict`)
            logits = late_start.resume_all(first, pattern)
        if logits is None:  # no cut before that layer
            return predict(self.qmodel, self.inputs, pattern, batch_size=self.batch_size, check=False)
        return decide(logits.cpu())

    def late_start(self) -> LateStart | None:
        """The late-start cache of this campaign's images (built with the campaign, except at site pe, whose faults
        reach every layer; else at first use); None when off or unsupported (`LateStart.disabled_reason` says
        why)."""
        if not (self.use_late_start and self.drop_fault_free):
            return None
        if self.fault_free.late_start is None:  # shared with the other campaigns on these images (`FaultFreeRuns`)
            self.fault_free.late_start = LateStart(self.qmodel, self.inputs, budget_bytes=self.cache_bytes,
                                                   batch_size=self.batch_size)
        return self.fault_free.late_start if self.fault_free.late_start.enabled else None

    def _mitigated(self, pattern: FaultPattern) -> tuple[Predictions | None, FaultPattern, int, int | None]:
        """Predictions of the mitigated model under `pattern` (None when ECC detected an uncorrectable word: every
        image is a DUE), the faults that got through, the faults corrected, and (paired) the unmitigated model's
        correct images under the same faults."""
        assert self.mitigation is not None
        unmitigated = self._predict(pattern) if self.paired else None
        applied = self.mitigation.apply(pattern)
        if applied.detected:
            outcome = None
        elif unmitigated is not None and not self.mitigation.restricts and not applied.corrected:
            outcome = unmitigated  # nothing was corrected or clamped: the same computation
        else:
            with self.mitigation.active():
                outcome = self._predict(applied.pattern)
        count = None if unmitigated is None else int(unmitigated.correct(self.labels).sum())
        return outcome, applied.pattern, applied.corrected, count

    def trial(self, index: int) -> TrialResult:
        drawn = self.pattern(index)
        corrected, unmitigated = 0, None
        outcome: Predictions | None
        if self.mitigation is None:
            pattern, outcome = drawn, self._predict(drawn)
        else:
            outcome, pattern, corrected, unmitigated = self._mitigated(drawn)
        if outcome is None:  # a detected uncorrectable weight word: no image gets a prediction
            correct = torch.zeros(len(self.inputs), dtype=torch.bool)
            critical = torch.zeros(len(self.inputs), dtype=torch.bool)
            due = torch.ones(len(self.inputs), dtype=torch.bool)
        else:
            correct = outcome.correct(self.labels)
            critical = outcome.predicted != self.golden
            due = outcome.nonfinite.cpu()
        layer_faults: dict[str, int] = {}
        exposure: dict[str, float] = {}
        damage: dict[str, float] = {}
        hits: list[tuple[str, torch.Tensor]] = []  # per transient group: the images it hit
        for (site, layer), group in pattern.groups.items():
            layer_faults[layer] = layer_faults.get(layer, 0) + len(group)
            if site.transient:
                hits.append((layer, group.images()))
            else:
                exposure[layer] = 1.0
                damage[layer] = float(critical.float().mean())
        if hits:  # the critical images among each group's hit images, counted for all groups at once
            sizes = torch.tensor([len(hit) for _, hit in hits])
            owner = torch.repeat_interleave(torch.arange(len(hits)), sizes)
            counts = torch.zeros(len(hits), dtype=torch.float64).index_add_(
                0, owner, critical.cpu()[torch.cat([hit.cpu() for _, hit in hits])].double()).tolist()
            for (layer, hit), count in zip(hits, counts):
                exposure[layer] = exposure.get(layer, 0.0) + float(len(hit))
                damage[layer] = damage.get(layer, 0.0) + count
        faulty_images = len(self.inputs) if drawn.has_weight_faults() else int(drawn.images_with_faults().numel())
        return TrialResult(
            trial=index,
            images=len(self.inputs),
            correct=int(correct.sum()),
            critical=int(critical.sum()),
            nonfinite=0 if outcome is None else int(outcome.nonfinite.sum()),
            faults=len(drawn),
            faulty_images=faulty_images,
            correct_mask=_pack(correct),
            layer_faults=layer_faults,
            layer_exposure=exposure,
            layer_damage=damage,
            detected=int(due.sum()),
            silent=int((critical.cpu() & ~due).sum()),
            corrected=corrected,
            unmitigated_correct=unmitigated,
        )

    def run(
        self,
        trials: Iterable[int] | None = None,
        *,
        on_trial: Callable[[CampaignResult, TrialResult], None] | None = None,
    ) -> CampaignResult:
        """Run `trials` (default: 0, 1, ... up to the budget) in the order given, stopping as soon as the
        result decides."""
        result = self.empty_result()
        start = time.perf_counter()
        for index in range(self.spec.budget) if trials is None else trials:
            trial = result.trials[index] = self.trial(index)
            result.seconds = time.perf_counter() - start
            if on_trial is not None:
                on_trial(result, trial)
            if result.decided():
                break
        return result
