"""Merge partial reports (xdist shards, CI slices) into the report one full run would give."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from .document import ReportError, build_report, campaign_record, validate_report

VERSIONED = ("plugin", "torch")  # what must be the same in every part for its trials to be comparable


def _environments(reports: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The parts' environments, flattened (a merge of merges lists every part once)."""
    parts: list[Any] = []
    for report in reports:
        env = report["environment"]
        parts.extend(env["merged_from"] if isinstance(env.get("merged_from"), list) else [env])
    return parts


def _check_versions(parts: Sequence[Any]) -> None:
    for key in VERSIONED:
        seen = sorted({str(env[key]) for env in parts if isinstance(env, Mapping) and env.get(key) is not None})
        if len(seen) > 1:
            raise ReportError(f"the parts were made by different {key} versions ({', '.join(seen)}): their numbers "
                              "need not agree; rerun them with one version, or pass --allow-mixed-versions")


def _check_one_campaign_per_name(groups: Mapping[str, list[dict[str, Any]]]) -> None:
    """Parts of one run hold the same campaigns: one test's campaign under two ids means two different runs."""
    by_name: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for group in groups.values():
        record = group[0]
        by_name.setdefault((record["nodeid"], record.get("name", record["nodeid"]) + record["label"]),
                           []).append(record)
    for records in by_name.values():
        if len(records) > 1:
            specs = [r["result"]["spec"] for r in records]
            differ = sorted({k for s in specs for k in s if any(o.get(k) != s.get(k) for o in specs)})
            detail = "; ".join(f"{k}: {', '.join(repr(s.get(k)) for s in specs)}" for k in differ)
            raise ReportError(f"{records[0]['nodeid']} [{records[0]['label']}] appears as {len(records)} different "
                              f"campaigns ({detail or 'different ids'}): these are not parts of one run; merge "
                              "the parts of one run (same seed and settings) only")


def _merged_environment(parts: list[Any]) -> dict[str, Any]:
    from .. import __version__

    return {"plugin": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "merged_from": parts}


def merge_reports(reports: list[dict[str, Any]], *, allow_mixed_versions: bool = False) -> dict[str, Any]:
    """Union of partial reports: records of the same campaign are recomputed from the union of their trials.

    Since a verdict depends only on the trial outcomes (each trial is seeded by its index), the merged record equals
    the one a single full run would give, whatever the order of the inputs (trials past the deciding checkpoint
    are dropped, as a single run never computes them). A campaign that some shards lack keeps its
    partial result and so may stay "incomplete"; one whose part is invalid stays invalid. Parts that cannot be of
    one run (other settings or models for one campaign, one test's campaign under two ids, other plugin or torch
    versions unless `allow_mixed_versions`) are refused with a ReportError."""
    if not reports:
        raise ReportError("nothing to merge: no reports given")
    for index, report in enumerate(reports):
        try:
            validate_report(report)
        except ReportError as error:
            raise ReportError(f"report {index + 1} of {len(reports)}: {error}") from None
    parts = _environments(reports)
    if not allow_mixed_versions:
        _check_versions(parts)
    from ..campaign import CampaignResult

    groups: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        for record in report["campaigns"]:
            groups.setdefault(record["campaign_id"], []).append(record)
    _check_one_campaign_per_name(groups)
    records = []
    for campaign_id, group in groups.items():
        nodeids = sorted({record["nodeid"] for record in group})
        if len(nodeids) > 1:
            raise ReportError(f"campaign {campaign_id} is reported under different tests: {', '.join(nodeids)}")
        try:
            merged = CampaignResult.from_dict(group[0]["result"])
            for record in group[1:]:
                merged = merged.merge(CampaignResult.from_dict(record["result"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ReportError(f"cannot merge campaign {campaign_id} of {nodeids[0]} "
                              f"[{group[0]['label']}]: {error}") from None
        # keep only the trials the outcome is computed on: shards may have run past the deciding checkpoint
        problems = sorted({record["problem"] for record in group if record.get("problem")})
        record = campaign_record(merged.trimmed() if merged.decided() else merged, nodeids[0],
                                 "; ".join(problems) or None)
        # the advisor's suggestion is no function of the trials: kept from the part that made it
        record["advice"] = next((r["advice"] for r in group if r.get("advice")), None)
        records.append(record)
    return build_report(records, _merged_environment(parts))



def merge_shard_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per campaign from the records the shards of one session report (each carries ``shard``:
    [index, count], and ``shards_run``: those the session selected). A campaign that lost a shard it selected (its
    worker crashed, the session stopped before it ran) is ``incomplete`` with ``lost_shards``; one
    whose shards cannot be merged (different models or data) is ``invalid`` with the ``problem``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["campaign_id"], []).append(dict(record))
    merged = []
    for group in groups.values():
        try:
            record = merge_reports([build_report(group, {})])["campaigns"][0]
        except ReportError as error:
            record = {**group[0], "verdict": "invalid", "problem": str(error)}
        count = max(r.get("shard", [1, 1])[1] for r in group)
        selected = set().union(*(r.get("shards_run", range(1, count + 1)) for r in group))
        lost = sorted(selected - {r.get("shard", [1, 1])[0] for r in group})
        if lost and record["verdict"] != "invalid":
            record.update(verdict="incomplete", lost_shards=lost)
        merged.append(record)
    return sorted(merged, key=lambda r: (r["nodeid"], r["campaign_id"]))
