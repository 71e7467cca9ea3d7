"""Merge partial reports (xdist shards, CI slices) into the report one full run would give."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from .document import ReportError, build_report, campaign_record, validate_report


def _merged_environment(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The shards' environments, flattened (a merge of merges lists every shard once)."""
    from .. import __version__

    shards: list[Any] = []
    for report in reports:
        env = report["environment"]
        shards.extend(env["merged_from"] if isinstance(env.get("merged_from"), list) else [env])
    return {"plugin": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "merged_from": shards}


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Union of partial reports: records of the same campaign are recomputed from the union of their trials.

    Since a verdict depends only on the trial outcomes (each trial is seeded by its index), the merged record equals
    the one a single full run would give, whatever the order of the inputs (trials past the deciding checkpoint
    are dropped, as a single run never computes them). A campaign that some shards lack keeps its
    partial result and so may stay "incomplete"."""
    if not reports:
        raise ReportError("nothing to merge: no reports given")
    for index, report in enumerate(reports):
        try:
            validate_report(report)
        except ReportError as error:
            raise ReportError(f"report {index + 1} of {len(reports)}: {error}") from None
    from ..campaign import CampaignResult

    groups: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        for record in report["campaigns"]:
            groups.setdefault(record["campaign_id"], []).append(record)
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
        records.append(campaign_record(merged.trimmed() if merged.decided() else merged, nodeids[0]))
    return build_report(records, _merged_environment(reports))

