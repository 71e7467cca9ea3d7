"""JSON reports of fault campaigns: write, validate, merge across shards, compare with baselines, summarise, plot.

A report is plain JSON so that CI shards, other machines and later sessions can read it without running a model.
Each campaign record carries both the numbers a person reads (verdict, accuracy and interval, per-layer scales) and
the raw trials (``result``), so partial reports from ``--hwfault-shard i/n`` can be merged exactly: the merged record
is recomputed from the union of the trials and therefore equals what one full run would have reported.

This module imports neither pytest nor, at import time, torch or matplotlib: ``show`` and ``compare`` run on the
JSON alone; merging needs torch (via :class:`~pytest_hwfault.campaign.CampaignResult`), plotting needs the ``plots``
extra. Run it as ``python -m pytest_hwfault.report {show,merge,compare,plot} ...``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import numbers
import os
import platform
import re
import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .spec import KINDS, SITES

if TYPE_CHECKING:
    from .campaign import CampaignResult

__all__ = [
    "REPORT_JSON_SCHEMA",
    "REPORT_SCHEMA",
    "REPORT_VERSION",
    "VERDICTS",
    "Regression",
    "ReportError",
    "build_report",
    "campaign_record",
    "compare_to_baseline",
    "environment",
    "failure_message",
    "format_table",
    "load_baseline",
    "load_report",
    "main",
    "merge_reports",
    "plot_report",
    "save_baseline",
    "unmatched",
    "validate_report",
    "write_report",
]

REPORT_SCHEMA = "pytest-hwfault/report"
REPORT_VERSION = 1
VERDICTS = ("pass", "fail", "inconclusive", "incomplete")
TOP_LAYERS = 3  # most vulnerable layers named in a failure message


class ReportError(ValueError):
    """A report that cannot be read, validated, merged or compared; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------------------
# records


def _json_safe(value: Any) -> Any:
    """Strict-JSON builtins: non-finite floats become None (JSON has no NaN), tuples lists, unknown objects text."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return str(value)


def _missing_trials(present: Sequence[int] | Mapping[int, Any], upto: int | None) -> list[int]:
    """Trial indices below the next checkpoint that no shard computed: what an incomplete campaign waits for."""
    if upto is None:
        return []
    return [i for i in range(upto) if i not in present]


def campaign_record(result: CampaignResult, nodeid: str) -> dict[str, Any]:
    """One JSON-safe record: the verdict and numbers a person reads, plus the raw trials for exact merging."""
    spec = result.spec
    outcome = result.outcome()
    next_checkpoint = None if outcome.complete else result.next_checkpoint()  # what an incomplete one waits for
    record = {
        "nodeid": nodeid,
        "campaign_id": result.campaign_id,
        "name": result.name,
        "label": spec.label(),
        "site": spec.site,
        "ber": spec.ber,
        "bits": spec.bits,
        "kind": spec.kind,
        "bit_positions": None if spec.bit_positions is None else list(spec.bit_positions),
        "images": result.images,
        "trials": outcome.trials,
        "budget": spec.budget,
        "float_accuracy": result.float_accuracy,
        "quantized_accuracy": result.quantized_accuracy,
        "accuracy": outcome.accuracy,
        "ci_low": outcome.ci_low,
        "ci_high": outcome.ci_high,
        "confidence": outcome.confidence,
        "method": outcome.method,
        "threshold": {"min_acc": spec.min_acc, "max_drop": spec.max_drop, "required": outcome.required},
        "verdict": outcome.verdict,
        "complete": outcome.complete,
        "contiguous": result.contiguous(),
        "next_checkpoint": next_checkpoint,
        "missing_trials": _missing_trials(result.trials, next_checkpoint),
        "seed": spec.seed,
        "seconds": result.seconds,
        "critical_rate": outcome.critical_rate,
        "nonfinite": outcome.nonfinite,
        "faults_per_trial": outcome.faults_per_trial,
        "layers": result.layer_vulnerability(),
        "result": result.to_dict(),
    }
    return dict(_json_safe(record))


def environment() -> dict[str, Any]:
    """Where the numbers came from, so that a surprising report can be traced to a machine and versions."""
    from . import __version__

    torch_version: str | None
    if "torch" in sys.modules:  # already paid for: ask it directly
        torch_version = str(sys.modules["torch"].__version__)
    else:  # do not import torch (seconds) just to name its version
        try:
            from importlib.metadata import version

            torch_version = version("torch")
        except Exception:  # any failure means "unknown", never a broken report
            torch_version = None
    return {
        "machine": {
            "node": platform.node(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
        "python": platform.python_version(),
        "torch": torch_version,
        "plugin": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def build_report(records: list[dict[str, Any]], env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report document; records are sorted so that reports of the same campaigns compare equal.

    ``env`` defaults to :func:`environment` of this process."""
    return {
        "schema": REPORT_SCHEMA,
        "version": REPORT_VERSION,
        "environment": environment() if env is None else env,
        "campaigns": sorted(records, key=lambda r: (r["nodeid"], r["campaign_id"])),
    }


# --------------------------------------------------------------------------------------------------------------
# schema and validation

_NUMBER: dict[str, Any] = {"type": "number"}
_PROBABILITY: dict[str, Any] = {"type": "number", "minimum": 0, "maximum": 1}
_COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}

REPORT_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "urn:pytest-hwfault:report:1",
    "title": "pytest-hwfault report",
    "description": "Fault-injection campaigns run by pytest-hwfault, with their verdicts and raw trials.",
    "type": "object",
    "required": ["schema", "version", "environment", "campaigns"],
    "properties": {
        "schema": {"const": REPORT_SCHEMA},
        "version": {"const": REPORT_VERSION},
        "environment": {"type": "object"},
        "campaigns": {"type": "array", "items": {"$ref": "#/$defs/campaign"}},
    },
    "$defs": {
        "campaign": {
            "type": "object",
            "required": [
                "nodeid", "campaign_id", "label", "site", "ber", "bits", "kind", "trials", "float_accuracy",
                "quantized_accuracy", "accuracy", "ci_low", "ci_high", "confidence", "threshold", "verdict", "seed",
                "seconds", "critical_rate", "nonfinite", "faults_per_trial", "layers", "result",
            ],
            "properties": {
                "nodeid": {"type": "string"},
                "campaign_id": {"type": "string", "minLength": 1},
                "name": {"type": "string"},
                "label": {"type": "string"},
                "site": {"enum": list(SITES)},
                "ber": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "bits": {"type": "integer", "minimum": 1},
                "kind": {"enum": list(KINDS)},
                "bit_positions": {"type": ["array", "null"], "items": _COUNT},
                "images": _COUNT,
                "trials": _COUNT,
                "budget": {"type": "integer", "minimum": 1},
                "float_accuracy": _PROBABILITY,
                "quantized_accuracy": _PROBABILITY,
                "accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "ci_low": _PROBABILITY,
                "ci_high": _PROBABILITY,
                "confidence": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "method": {"type": "string"},
                "threshold": {"$ref": "#/$defs/threshold"},
                "verdict": {"enum": list(VERDICTS)},
                "complete": {"type": "boolean"},
                "contiguous": _COUNT,
                "next_checkpoint": {"type": ["integer", "null"], "minimum": 1},
                "missing_trials": {"type": "array", "items": _COUNT},
                "seed": _COUNT,
                "seconds": {"type": "number", "minimum": 0},
                "critical_rate": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "nonfinite": _COUNT,
                "faults_per_trial": {"type": "number", "minimum": 0},
                "layers": {"type": "array", "items": {"$ref": "#/$defs/layer"}},
                "result": {"$ref": "#/$defs/result"},
            },
        },
        "threshold": {
            "type": "object",
            "required": ["min_acc", "max_drop", "required"],
            "properties": {
                "min_acc": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "max_drop": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "required": _PROBABILITY,
            },
        },
        "layer": {
            "type": "object",
            "required": ["name", "vulnerability", "faults"],
            "properties": {
                "name": {"type": "string"},
                "type": {"type": "string"},
                "weight_scale_max": {"type": ["number", "null"]},
                "act_scale": {"type": ["number", "null"]},
                "input_scale": {"type": ["number", "null"]},
                "vulnerability": _PROBABILITY,
                "faults": _COUNT,
            },
        },
        "result": {
            "description": "CampaignResult.to_dict(): the raw trials, merged exactly across partial reports.",
            "type": "object",
            "required": ["schema", "campaign_id", "name", "spec", "images", "float_accuracy", "quantized_accuracy",
                         "layers", "trials"],
            "properties": {
                "schema": {"type": "integer"},
                "campaign_id": {"type": "string"},
                "name": {"type": "string"},
                "spec": {"type": "object"},
                "images": _COUNT,
                "float_accuracy": _PROBABILITY,
                "quantized_accuracy": _PROBABILITY,
                "layers": {"type": "array", "items": {"type": "object"}},
                "trials": {"type": "array", "items": {"type": "object", "required": ["trial"],
                                                      "properties": {"trial": _COUNT}}},
            },
        },
    },
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_type(value: Any, kind: str) -> bool:
    actual = _json_type(value)
    if kind == "number":
        return actual in ("integer", "number") and math.isfinite(value)
    if kind == "integer" and actual == "number":
        return math.isfinite(value) and float(value).is_integer()  # JSON Schema: 1.0 is an integer
    return actual == kind


def _check(value: Any, schema: Mapping[str, Any], path: str) -> None:
    """The subset of JSON Schema that REPORT_JSON_SCHEMA uses, so validation needs no jsonschema package."""
    if "$ref" in schema:
        schema = REPORT_JSON_SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    if "const" in schema and (value != schema["const"] or _json_type(value) != _json_type(schema["const"])):
        raise ReportError(f"{path}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise ReportError(f"{path}: {value!r} is not one of {', '.join(map(str, schema['enum']))}")
    if "type" in schema:
        kinds = [schema["type"]] if isinstance(schema["type"], str) else list(schema["type"])
        if not any(_is_type(value, kind) for kind in kinds):
            raise ReportError(f"{path}: expected {' or '.join(kinds)}, got {_json_type(value)} {value!r:.60}")
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise ReportError(f"{path}: {value!r} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ReportError(f"{path}: {value!r} is above the maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise ReportError(f"{path}: {value!r} must be greater than {schema['exclusiveMinimum']}")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            raise ReportError(f"{path}: {value!r} must be less than {schema['exclusiveMaximum']}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        raise ReportError(f"{path}: must not be empty")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                raise ReportError(f"{path}.{key}: missing required key")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{index}]")


def validate_report(report: Any) -> None:
    """Raise ReportError naming the JSON path of the first problem, so a broken shard is found before it is merged."""
    if not isinstance(report, dict):
        raise ReportError(f"$: expected a report object, got {_json_type(report)}")
    if report.get("schema") != REPORT_SCHEMA:
        raise ReportError(f"$.schema: {report.get('schema')!r} is not {REPORT_SCHEMA!r}; not a pytest-hwfault report")
    version = report.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > REPORT_VERSION:
        raise ReportError(f"$.version: report version {version} is newer than this pytest-hwfault understands "
                          f"({REPORT_VERSION}); upgrade pytest-hwfault")
    _check(report, REPORT_JSON_SCHEMA, "$")
    for index, record in enumerate(report["campaigns"]):
        path = f"$.campaigns[{index}]"
        if record["result"]["campaign_id"] != record["campaign_id"]:
            raise ReportError(f"{path}.result.campaign_id: {record['result']['campaign_id']!r} does not match "
                              f"campaign_id {record['campaign_id']!r}")
        if record["ci_low"] > record["ci_high"]:
            raise ReportError(f"{path}.ci_low: {record['ci_low']!r} is above ci_high {record['ci_high']!r}")


# --------------------------------------------------------------------------------------------------------------
# files


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Validate, then write strict JSON atomically, so that a reader never sees half a report."""
    target = Path(path)
    try:
        validate_report(report)
    except ReportError as error:
        raise ReportError(f"{target}: refusing to write an invalid report: {error}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a report; every problem (missing file, bad JSON, wrong schema) is a ReportError."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{source}: no such report file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(f"{source}: cannot read: {error}") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as error:
        raise ReportError(f"{source}: not valid JSON: {error}") from None
    try:
        validate_report(report)
    except ReportError as error:
        raise ReportError(f"{source}: {error}") from None
    return dict(report)


# --------------------------------------------------------------------------------------------------------------
# merging


def _merged_environment(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The shards' environments, flattened (a merge of merges lists every shard once)."""
    from . import __version__

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
    from .campaign import CampaignResult

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


# --------------------------------------------------------------------------------------------------------------
# text


def _short_nodeid(nodeid: str, width: int = 56) -> str:
    """Drop the test file's directories, then elide the middle, keeping the file::function head and the id tail."""
    path, sep, rest = nodeid.partition("::")
    text = path.rsplit("/", 1)[-1] + sep + rest
    if len(text) <= width:
        return text
    head = (width - 3) // 2
    return text[:head] + "..." + text[len(text) - (width - 3 - head):]


def _num(value: Any, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _threshold_text(record: Mapping[str, Any]) -> str:
    threshold = record["threshold"]
    if threshold["min_acc"] is not None:
        return f"min_acc={threshold['min_acc']:g}"
    return f"max_drop={threshold['max_drop']:g} (>={threshold['required']:.4f})"


def _accuracy_text(record: Mapping[str, Any]) -> str:
    if record["accuracy"] is None:
        return "n/a"
    return f"{record['accuracy']:.4f} [{record['ci_low']:.4f}, {record['ci_high']:.4f}]"


_TABLE_COLUMNS = (  # header, right-aligned
    ("test", False), ("site", False), ("BER", True), ("trials", True), ("accuracy [lo, hi]", False),
    ("threshold", False), ("verdict", False), ("time", True),
)


def format_table(records: list[dict[str, Any]]) -> list[str]:
    """Terminal summary, one aligned row per campaign, for the pytest summary and the CLI."""
    rows = [[
        _short_nodeid(record["nodeid"]),
        record["site"],
        f"{record['ber']:g}",
        str(record["trials"]),
        _accuracy_text(record),
        _threshold_text(record),
        record["verdict"].upper(),
        f"{record['seconds']:.1f}s",
    ] for record in records]
    header = [name for name, _ in _TABLE_COLUMNS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(width) if right else cell.ljust(width)
                         for cell, width, (_, right) in zip(cells, widths, _TABLE_COLUMNS)).rstrip()

    return [line(header), line(["-" * width for width in widths]), *(line(row) for row in rows)]


def _ranges(indices: Sequence[int]) -> str:
    """[3, 5, 6, 7] -> "3, 5-7": missing trials are usually whole blocks of a lost shard."""
    blocks: list[list[int]] = []
    for i in sorted(indices):
        if blocks and i == blocks[-1][1] + 1:
            blocks[-1][1] = i
        else:
            blocks.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in blocks)


def _most_vulnerable(record: Mapping[str, Any], count: int = TOP_LAYERS) -> list[dict[str, Any]]:
    hit = [layer for layer in record["layers"] if layer.get("faults", 0) > 0]
    return sorted(hit, key=lambda layer: (-layer["vulnerability"], -layer["faults"], layer["name"]))[:count]


def failure_message(record: dict[str, Any], reproduce: str) -> str:
    """Everything a person needs to act on a gate that did not pass, ending with the command that reproduces it."""
    verdict = record["verdict"]
    threshold = record["threshold"]
    headline = {
        "pass": "accuracy under faults meets the threshold",
        "fail": "accuracy under faults is below the threshold",
        "inconclusive": "the trial budget was spent without a decision",
        "incomplete": "trials are missing, so no decision could be made",
    }.get(verdict, verdict)
    label = "" if record["label"] in record["nodeid"] else f" [{record['label']}]"  # parametrized ids name it
    lines = [f"hwfault {verdict.upper()}: {record['nodeid']}{label}: {headline}"]

    def row(key: str, text: str) -> None:
        lines.append(f"  {key:<13}{text}")

    positions = "" if not record.get("bit_positions") else f", bit positions {record['bit_positions']}"
    row("fault model", f"site={record['site']}, BER={record['ber']:g}, {record['bits']}-bit codes, "
                       f"kind={record['kind']}{positions}")
    budget = f" of budget {record['budget']}" if "budget" in record else ""
    images = f", {record['images']} images each" if "images" in record else ""
    row("trials", f"{record['trials']}{budget}{images}")
    if record["accuracy"] is None:
        row("accuracy", "n/a (no checkpoint reached)")
    else:
        method = f" ({record['method']})" if record.get("method") else ""
        row("accuracy", f"{record['accuracy']:.4f} [{record['ci_low']:.4f}, {record['ci_high']:.4f}] at "
                        f"{record['confidence']:.0%} confidence{method}")
    if threshold["min_acc"] is not None:
        row("threshold", f"min_acc={threshold['min_acc']:g}: required accuracy >= {threshold['required']:.4f}")
    else:
        row("threshold", f"max_drop={threshold['max_drop']:g} from the quantized accuracy: required accuracy "
                         f">= {threshold['required']:.4f}")
    row("fault-free", f"float {record['float_accuracy']:.4f}, quantized {record['quantized_accuracy']:.4f}")
    if record["trials"]:
        row("damage", f"{_num(record['critical_rate'], '.2%')} of images changed prediction, "
                      f"{record['nonfinite']} with non-finite logits, {record['faults_per_trial']:.3g} faults/trial")
    top = _most_vulnerable(record)
    if top:
        lines.append("  most vulnerable layers (share of fault-hit images that became critical):")
        for rank, layer in enumerate(top, 1):
            lines.append(f"    {rank}. {layer['name']} ({layer.get('type', '?')}): vulnerability "
                         f"{layer['vulnerability']:.3f}, act scale {_num(layer.get('act_scale'), '.4g')}, "
                         f"max weight scale {_num(layer.get('weight_scale_max'), '.4g')}, {layer['faults']} faults")
    else:
        row("layers", "no faults landed in the trials used")
    if verdict == "fail":
        lines.append(f"  the upper confidence bound {record['ci_high']:.4f} is below the required "
                     f"{threshold['required']:.4f}: protect the layers above (clipping, ECC) or lower the BER.")
    elif verdict == "inconclusive":
        unit = ("for site='weight' each trial is one observation, so raise budget=" if record["site"] == "weight"
                else "raise budget= (more trials) or samples= (more images per trial)")
        lines.append(f"  the interval still contains the required accuracy {threshold['required']:.4f} after all "
                     f"{record['trials']} trials: {unit} to narrow it.")
    elif verdict == "incomplete":
        missing = record.get("missing_trials") or []
        contiguous = record.get("contiguous", record["trials"])
        needed = record.get("next_checkpoint")
        present = f"only the first {contiguous} trials (0..{contiguous - 1}) are present" if contiguous else \
            "trial 0 is missing"
        lines.append(f"  {present}, but the next checkpoint needs {needed}; missing: {_ranges(missing) or 'unknown'}.")
        lines.append("  an incomplete campaign is never passed: merge the reports of all shards "
                     "(python -m pytest_hwfault.report merge ...) or rerun without --hwfault-shard.")
    row("seed", str(record["seed"]))
    row("reproduce", reproduce)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# baselines

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


# --------------------------------------------------------------------------------------------------------------
# plots


def _test_function(nodeid: str) -> str:
    """The nodeid without its parametrization id: campaigns of one test at several BERs form one curve."""
    return nodeid.split("[", 1)[0]


def _layer_tables(records: Sequence[Mapping[str, Any]], limit: int = 4) -> list[tuple[str, list[dict[str, Any]]]]:
    """(title, layers) per quantized model: scales do not depend on the fault model, so each test function's first
    campaign stands for it, and test functions that show the same table (the same model) share one panel."""
    tables: dict[tuple[Any, ...], tuple[list[str], list[dict[str, Any]]]] = {}
    seen: set[str] = set()
    for record in records:
        function = _test_function(record["nodeid"])
        if not record["layers"] or function in seen:
            continue
        seen.add(function)
        key = tuple((layer["name"], layer.get("act_scale"), layer.get("weight_scale_max"))
                    for layer in record["layers"])
        tables.setdefault(key, ([], record["layers"]))[0].append(function)
    return [(", ".join(_short_nodeid(f, 60) for f in functions), layers)
            for functions, layers in list(tables.values())[:limit]]


_MARKERS = {"pass": "o", "fail": "X", "inconclusive": "^", "incomplete": "s"}


def _plot_curves(ax: Any, records: Sequence[Mapping[str, Any]]) -> None:
    """One curve per (test function, site, kind) over BER, with its confidence band and dashed required accuracy."""
    curves: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        if record["accuracy"] is not None:
            curves.setdefault((_test_function(record["nodeid"]), record["site"], record["kind"]), []).append(record)
    for index, ((function, site, kind), points) in enumerate(sorted(curves.items())):
        points.sort(key=lambda r: r["ber"])
        color = f"C{index % 10}"
        ber = [r["ber"] for r in points]
        acc = [r["accuracy"] for r in points]
        low = [r["ci_low"] for r in points]
        high = [r["ci_high"] for r in points]
        label = f"{_short_nodeid(function, 40)} ({site}{'' if kind == 'flip' else ', ' + kind})"
        ax.errorbar(ber, acc, yerr=[[a - lo for a, lo in zip(acc, low)], [hi - a for a, hi in zip(acc, high)]],
                    color=color, capsize=3, label=label)
        if len(points) > 1:
            ax.fill_between(ber, low, high, color=color, alpha=0.15, linewidth=0)
        for record in points:
            ax.plot(record["ber"], record["accuracy"], linestyle="none", color=color,
                    marker=_MARKERS.get(record["verdict"], "o"), markersize=7)
        required = [r["threshold"]["required"] for r in points]
        if len(set(required)) == 1:
            ax.axhline(required[0], color=color, linestyle="--", linewidth=1)
        else:
            ax.plot(ber, required, color=color, linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("bit error rate")
    ax.set_ylabel("accuracy under faults")
    ax.set_title("accuracy vs BER (bars/band: confidence interval; dashed: required accuracy; "
                 "o pass, X fail, ^ inconclusive, s incomplete)", fontsize=9)
    if curves:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no campaign reached a checkpoint", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(1e-8, 1e-1)


def _plot_scales(ax: Any, title: str, layers: Sequence[Mapping[str, Any]]) -> None:
    """Act scale and max weight scale per layer (log scale): a large scale makes a flipped high bit costly."""
    positions = list(range(len(layers)))
    width = 0.4
    for offset, key, label in ((-width / 2, "act_scale", "act scale"),
                               (width / 2, "weight_scale_max", "max weight scale")):
        values = [layer.get(key) for layer in layers]
        ax.bar([p + offset for p in positions], [v if v and v > 0 else math.nan for v in values], width,
               label=label)
    ax.set_yscale("log")
    ax.set_xticks(positions)
    ax.set_xticklabels([layer["name"] for layer in layers], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("quantization scale")
    ax.set_title(f"per-layer scales: {title}", fontsize=9)
    ax.legend(fontsize=8)


def plot_report(report: dict[str, Any], out: Path) -> Path:
    """PNG with accuracy-vs-BER curves (CI band, dashed thresholds) and the per-layer scales of each model.

    Draws on a bare Figure with the Agg canvas, so it never touches pyplot's global state or needs a display."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'pytest-hwfault[plots]'") from None

    records = report["campaigns"]
    tables = _layer_tables(records)
    fig = Figure(figsize=(11, 4.5 + 3.8 * len(tables)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1 + len(tables), 1, squeeze=False)[:, 0]
    _plot_curves(axes[0], records)
    for ax, (title, layers) in zip(axes[1:], tables):
        _plot_scales(ax, title, layers)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png", dpi=100)
    return target


# --------------------------------------------------------------------------------------------------------------
# command line


def _passed(record: Mapping[str, Any], allow_inconclusive: bool) -> bool:
    return record["verdict"] == "pass" or (allow_inconclusive and record["verdict"] == "inconclusive")


def _print_summary(report: Mapping[str, Any], verbose: bool) -> None:
    records = report["campaigns"]
    for line in format_table(records):
        print(line)
    counts = {verdict: sum(r["verdict"] == verdict for r in records) for verdict in VERDICTS}
    print(f"{len(records)} campaigns: " + ", ".join(f"{n} {verdict}" for verdict, n in counts.items() if n))
    if verbose:
        for record in records:
            if record["verdict"] != "pass":
                print()
                print(failure_message(record, f"pytest {shlex.quote(record['nodeid'])}"))


def _cmd_show(args: argparse.Namespace) -> int:
    _print_summary(load_report(args.report), args.verbose)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    merged = merge_reports([load_report(path) for path in args.reports])
    if args.output is not None:
        write_report(args.output, merged)
    _print_summary(merged, args.verbose)
    if args.output is not None:
        print(f"merged {len(args.reports)} reports into {args.output}")
    return 0 if all(_passed(record, args.allow_inconclusive) for record in merged["campaigns"]) else 1


def _cmd_compare(args: argparse.Namespace) -> int:
    report, baseline = load_report(args.report), load_report(args.baseline)
    regressions = compare_to_baseline(report, baseline, args.tolerance)
    new, gone = unmatched(report, baseline)
    for regression in regressions:
        print(f"REGRESSION {regression}")
    for record in new:
        print(f"not in baseline: {record['nodeid']} [{record['label']}]")
    for record in gone:
        print(f"missing from report: {record['nodeid']} [{record['label']}]")
    compared = len(report["campaigns"]) - len(new)
    print(f"{compared} campaigns compared with tolerance {args.tolerance:g}: {len(regressions)} regressions")
    return 1 if regressions else 0


def _cmd_plot(args: argparse.Namespace) -> int:
    path = plot_report(load_report(args.report), Path(args.output))
    print(f"wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_hwfault.report",
        description="Inspect, merge, compare and plot pytest-hwfault JSON reports. Exit codes: 0 ok, 1 gate "
                    "failed (merge: a campaign did not pass; compare: a regression), 2 usage or file error.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = commands.add_parser("show", help="print the summary table of a report")
    show.add_argument("report", help="REPORT.json")
    show.add_argument("-v", "--verbose", action="store_true", help="also print the message of every non-pass")
    show.set_defaults(func=_cmd_show)

    merge = commands.add_parser(
        "merge", help="merge partial (shard) reports; exit 1 unless every campaign passes",
        description="Merge partial reports, e.g. of CI shards run with --hwfault-shard 1/2 and 2/2: the trials of "
                    "each campaign are united and its verdict recomputed. Exits 1 if any merged campaign is not "
                    "'pass' (fail, incomplete, or inconclusive unless --allow-inconclusive), else 0.")
    merge.add_argument("reports", nargs="+", help="partial REPORT.json files")
    merge.add_argument("-o", "--output", help="write the merged report here")
    merge.add_argument("--allow-inconclusive", action="store_true",
                       help="count 'inconclusive' (budget spent without a decision) as passing")
    merge.add_argument("-v", "--verbose", action="store_true", help="also print the message of every non-pass")
    merge.set_defaults(func=_cmd_merge)

    compare = commands.add_parser("compare", help="compare a report with a baseline; exit 1 on a regression")
    compare.add_argument("report", help="REPORT.json")
    compare.add_argument("baseline", help="BASELINE.json (a report saved earlier)")
    compare.add_argument("--tolerance", type=float, default=0.0,
                         help="allowed accuracy drop before a campaign counts as regressed (default 0)")
    compare.set_defaults(func=_cmd_compare)

    plot = commands.add_parser("plot", help="plot accuracy vs BER and per-layer scales (needs matplotlib)")
    plot.add_argument("report", help="REPORT.json")
    plot.add_argument("-o", "--output", required=True, help="OUT.png")
    plot.set_defaults(func=_cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; errors print one line to stderr and return 2, never a traceback."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help and usage errors; keep the int contract
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return int(args.func(args))
    except (ReportError, OSError, ImportError, ValueError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
