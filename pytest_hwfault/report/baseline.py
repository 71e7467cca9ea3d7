"""Baselines: save a report under a name and compare later runs against it (as pytest-benchmark's --save)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .document import ReportError, load_report, write_report

_BASELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Regression:
    """A campaign whose accuracy under faults fell by more than the tolerance since the baseline."""

    nodeid: str
    campaign_id: str
    label: str
    baseline_accuracy: float
    accuracy: float
    tolerance: float

    @property
    def drop(self) -> float:
        return self.baseline_accuracy - self.accuracy

    def __str__(self) -> str:
        return (f"{self.nodeid} [{self.label}]: accuracy {self.accuracy:.4f} < baseline {self.baseline_accuracy:.4f}"
                f" - tolerance {self.tolerance:g} (drop {self.drop:.4f})")


def _baseline_path(directory: Path, name: str) -> Path:
    if not _BASELINE_NAME.match(name):
        raise ReportError(f"baseline name {name!r} must be letters, digits, '.', '_' or '-' (no path separators)")
    return Path(directory) / f"{name}.json"


def save_baseline(directory: Path, name: str, report: dict[str, Any]) -> Path:
    """Store a report as ``directory/NAME.json`` to compare later runs against (as pytest-benchmark's --save)."""
    return write_report(_baseline_path(directory, name), report)


def load_baseline(directory: Path, name: str) -> dict[str, Any]:
    """Load ``directory/NAME.json``; a missing name lists the available ones, since the usual mistake is a typo."""
    path = _baseline_path(directory, name)
    if not path.is_file():
        available = sorted(p.stem for p in Path(directory).glob("*.json")) if Path(directory).is_dir() else []
        listing = ", ".join(available) if available else "none"
        raise ReportError(f"{path}: no baseline named {name!r} in {directory}; available: {listing}")
    return load_report(path)


def _matcher(baseline: Mapping[str, Any]) -> Any:
    """Find a record's baseline: by campaign_id, else by (nodeid, label) when that names exactly one campaign."""
    by_id = {record["campaign_id"]: record for record in baseline["campaigns"]}
    by_label: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in baseline["campaigns"]:
        by_label.setdefault((record["nodeid"], record["label"]), []).append(record)

    def match(record: Mapping[str, Any]) -> dict[str, Any] | None:
        if record["campaign_id"] in by_id:
            return by_id[record["campaign_id"]]
        candidates = by_label.get((record["nodeid"], record["label"]), [])
        return candidates[0] if len(candidates) == 1 else None

    return match


def compare_to_baseline(report: dict[str, Any], baseline: dict[str, Any], tolerance: float) -> list[Regression]:
    """Campaigns whose accuracy fell below baseline - tolerance; campaigns without a number on either side are
    skipped (their verdict already says incomplete), unmatched ones are left to :func:`unmatched`."""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a non-negative accuracy, got {tolerance!r}")
    match = _matcher(baseline)
    regressions = []
    for record in report["campaigns"]:
        old = match(record)
        if old is None or old["accuracy"] is None or record["accuracy"] is None:
            continue
        if record["accuracy"] < old["accuracy"] - tolerance:
            regressions.append(Regression(record["nodeid"], record["campaign_id"], record["label"],
                                          float(old["accuracy"]), float(record["accuracy"]), float(tolerance)))
    return regressions


def unmatched(report: dict[str, Any], baseline: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(campaigns of the report with no baseline, baseline campaigns absent from the report), for a notice."""
    match = _matcher(baseline)
    matched_ids = set()
    new = []
    for record in report["campaigns"]:
        old = match(record)
        if old is None:
            new.append(record)
        else:
            matched_ids.add(old["campaign_id"])
    gone = [record for record in baseline["campaigns"] if record["campaign_id"] not in matched_ids]
    return new, gone

