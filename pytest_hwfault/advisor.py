"""What to protect: per-layer vulnerability by stratified campaigns, and the hardening advisor (issue 18).

`stratified_vulnerability` runs one campaign per layer (``layers=`` that layer alone) and reports, per layer, the
probability that a fault there changes the top-1 prediction, with an interval at the campaign's confidence
(Clopper-Pearson over fault-hit images at transient sites; Hoeffding over fault-hit trials for weights, whose faults
every image of a trial shares), and its share of the model's exposure (its bits x its vulnerability).

`advise` turns a gate that did not pass into a suggestion. Greedy by exposure per protected bit: the layers the
campaign's faults reached are ranked by exposure (site bits x vulnerability, from the campaign's own trials) per bit
protection costs (the layer's weight bits; its site bits for a matmul of two activations); the smallest prefix of
that ranking whose protection is predicted to lift the accuracy to the required one (assuming the loss is spread
over the layers in proportion to their exposure: small sets first) is confirmed by a campaign with ``protect=``
that set, the same seed and spec, and so the same faults. If it does not pass, the layers still
exposed are re-ranked from the confirming campaign's own trials and the prefix grows; at most `MAX_CONFIRMATIONS`
campaigns run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .campaign import Campaign, CampaignResult
from .data import Batch
from .faults import Site
from .mitigation import escape_glob, protection_cost
from .qmodel import SiteUnreachableError
from .quantization import QuantizedModel
from .spec import CampaignSpec

MAX_CONFIRMATIONS = 4


def stratified_vulnerability(qmodel: QuantizedModel, inputs: Batch, labels: torch.Tensor, spec: CampaignSpec,
                             name: str, *, trials: int = 16, batch_size: int = 256) -> list[dict[str, Any]]:
    """Per layer of `spec.layers` (all quantized layers by default) with codes at `spec.site`: a campaign of
    `trials` trials whose faults strike that layer alone (seeded by `name`, the layer and the spec), and its
    vulnerability with interval. Rows in execution order: name, type, faults, hit (fault-hit images, or trials for
    weights), vulnerability, vulnerability_low, vulnerability_high, site_bits, exposure_share."""
    if spec.site == "pe":
        raise ValueError("site 'pe' faults one systolic array that computes every layer: there is no layer to "
                         "stratify by")
    site_layers = [target.layer for target in qmodel.targets(Site(spec.site), spec.layers)]
    if not site_layers:  # an empty table would read as "no layer is vulnerable"
        raise SiteUnreachableError(qmodel.nothing_to_fault(Site(spec.site), spec.layers))
    rows = []
    for layer in site_layers:
        one = spec.with_overrides(layers=(escape_glob(layer),), min_acc=0.0, budget=trials, first=trials,
                                  min_coverage=0.0)  # one layer's faults: a measurement, not a verdict
        result = Campaign(qmodel, inputs, labels, one, f"{name}#vulnerability:{layer}",
                          batch_size=batch_size).run()
        row = next(r for r in result.layer_vulnerability() if r["name"] == layer)
        hit = sum(t.layer_exposure.get(layer, 0.0) for t in result.trials.values())
        rows.append({"name": layer, "type": row.get("type"), "faults": row["faults"], "hit": hit,
                     "vulnerability": row["vulnerability"], "vulnerability_low": row["vulnerability_low"],
                     "vulnerability_high": row["vulnerability_high"], "site_bits": row.get("site_bits", 0),
                     "trials": len(result.trials)})
    whole = sum(r["site_bits"] * r["vulnerability"] for r in rows)
    for r in rows:
        r["exposure_share"] = r["site_bits"] * r["vulnerability"] / whole if whole else 0.0
    return rows


def _ranking(result: CampaignResult, exclude: set[str]) -> list[tuple[str, float]]:
    """(layer, exposure share) of the layers the campaign's faults reached, best exposure per protected bit first."""
    rows = [r for r in result.layer_vulnerability() if r["faults"] > 0 and r["name"] not in exclude]

    def cost(row: dict[str, Any]) -> float:
        return float(row.get("weight_bits") or row.get("site_bits") or row["faults"] or 1)
    exposure = {r["name"]: r.get("site_bits", r["faults"]) * r["vulnerability"] for r in rows}
    ranked = sorted(rows, key=lambda r: (-exposure[r["name"]] / cost(r), -exposure[r["name"]], r["name"]))
    whole = sum(exposure.values())
    return [(r["name"], exposure[r["name"]] / whole if whole else 0.0) for r in ranked]


def _prefix(ranking: Sequence[tuple[str, float]], accuracy: float, ceiling: float, target: float) -> int:
    """The smallest prefix of `ranking` predicted to lift `accuracy` to `target`, the loss (`ceiling` -
    `accuracy`) spread over the layers by exposure share; the whole ranking when none is."""
    gained = 0.0
    for count, (_, share) in enumerate(ranking, 1):
        gained += share
        if accuracy + (ceiling - accuracy) * gained >= target:
            return count
    return len(ranking)


def advise(qmodel: QuantizedModel, inputs: Batch, labels: torch.Tensor, result: CampaignResult, *,
           confirmations: int = MAX_CONFIRMATIONS, batch_size: int = 256,
           on_campaign: Callable[[CampaignResult], None] | None = None) -> dict[str, Any]:
    """A set of layers whose protection makes the gate of `result` pass, confirmed by a campaign with the same seed
    and spec (so the same faults), as the record's ``advice``: protect (layer names), accuracy, ci_low, ci_high,
    required, verdict (the confirming campaign's), campaigns (how many ran), cost (`protection_cost`). When no set
    passes within `confirmations` campaigns, the last set tried with its verdict; when the fault-free quantized
    accuracy itself misses the threshold, no set can help: empty protect and the reason."""
    spec = result.spec
    outcome = result.outcome()
    required = outcome.required
    if result.quantized_accuracy < required:
        return {"protect": [], "verdict": "fail", "campaigns": 0, "required": required,
                "reason": f"the fault-free quantized accuracy {result.quantized_accuracy:.4f} is below the required "
                          f"{required:.4f}: no protection can make the gate pass"}
    already = set(spec.protect or ())
    protected: list[str] = []
    latest, tried = result, 0
    advice: dict[str, Any] = {"protect": [], "verdict": outcome.verdict, "campaigns": 0, "required": required}
    while tried < confirmations:
        ranking = _ranking(latest, set(protected))
        if not ranking:
            break
        o = latest.outcome()
        accuracy = o.accuracy if o.accuracy == o.accuracy else 0.0  # NaN before any checkpoint
        count = _prefix(ranking, accuracy, latest.quantized_accuracy, required)
        protected += [layer for layer, _ in ranking[:count]]
        globs = tuple(sorted(already)) + tuple(escape_glob(layer) for layer in protected)
        confirming = Campaign(qmodel, inputs, labels, spec.with_overrides(protect=globs), result.name,
                              batch_size=batch_size, paired=False)
        latest = confirming.run()
        tried += 1
        if on_campaign is not None:
            on_campaign(latest)
        checked = latest.outcome()
        advice = {"protect": list(protected), "accuracy": checked.accuracy, "ci_low": checked.ci_low,
                  "ci_high": checked.ci_high, "required": required, "verdict": checked.verdict, "campaigns": tried,
                  "cost": protection_cost(qmodel, protected)}
        if checked.verdict == "pass":
            break
    return advice
