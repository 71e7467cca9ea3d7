"""Baselines: save a report under a name and compare later runs against it (as pytest-benchmark's --save)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .document import ReportError, load_report, write_report

_BASELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_TOLERANCE = 0.01  # allowed accuracy drop against a baseline, for the plugin and the CLI alike


def parse_tolerance(text: str) -> float:
    """An allowed accuracy drop in [0, 1], for option parsers (argparse's and pytest's)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected an accuracy drop in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is outside [0, 1]")
    return value


def check_name(name: str) -> str:
    """`name` if it is a plain baseline name (it becomes a file name), else ReportError saying what is allowed."""
    if not _BASELINE_NAME.match(name):
        raise ReportError(f"baseline name {name!r} must start with a letter or digit and hold only letters, digits, "
                          "'.', '_' or '-' (no spaces or path separators)")
    return name


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
    return Path(directory) / f"{check_name(name)}.json"


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



def baseline_failures(report: dict[str, Any], baseline: dict[str, Any], tolerance: float, *,
                      allow_new: bool = False) -> list[str]:
    """Why `report` does not hold up against `baseline`, one line per campaign: a regression, a campaign the
    baseline lacks (unless `allow_new`), or one the baseline holds without an accuracy to compare with. Empty when
    every campaign was compared and held."""
    failures = [f"REGRESSION {regression}" for regression in compare_to_baseline(report, baseline, tolerance)]
    match = _matcher(baseline)
    for record in report["campaigns"]:
        old = match(record)
        where = f"{record['nodeid']} [{record['label']}]"
        if old is None:
            if not allow_new:
                failures.append(f"NOT IN BASELINE {where}: the baseline holds no such campaign, so nothing was "
                                "compared (allow new campaigns with --hwfault-compare-allow-new / --allow-new, or "
                                "save a new baseline)")
        elif old["accuracy"] is None:
            failures.append(f"NO BASELINE ACCURACY {where}: the baseline's campaign has no accuracy (it was "
                            f"{old['verdict']} there), so nothing was compared; save a complete baseline")
    return failures
