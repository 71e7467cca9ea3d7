"""The report document: campaign records, the JSON schema and its validator, atomic write, validated load.

A report is plain JSON so that CI shards, other machines and later sessions can read it without running a model.
Each campaign record carries both the numbers a person reads (verdict, accuracy and interval, per-layer scales) and
the raw trials (``result``), so partial reports can be merged exactly (see :mod:`.merge`).
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import os
import platform
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..spec import KINDS, SITES
from ..verdicts import VERDICTS

if TYPE_CHECKING:
    from ..campaign import CampaignResult

REPORT_SCHEMA = "pytest-hwfault/report"
REPORT_VERSION = 1


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


def campaign_record(result: CampaignResult, nodeid: str, problem: str | None = None) -> dict[str, Any]:
    """One JSON-safe record: the verdict and numbers a person reads, plus the raw trials for exact merging.

    A `problem` (e.g. the shards of the campaign saw different models) makes the campaign ``invalid``: whatever its
    trials say, no verdict about one model can be drawn from them."""
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
        "burst": spec.burst,
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
        "verdict": outcome.verdict if problem is None else "invalid",
        "problem": problem,
        "complete": outcome.complete,
        "contiguous": result.contiguous(),
        "next_checkpoint": next_checkpoint,
        "missing_trials": _missing_trials(result.trials, next_checkpoint),
        "seed": spec.seed,
        "seconds": result.seconds,
        "critical_rate": outcome.critical_rate,
        "nonfinite": outcome.nonfinite,
        "faults_per_trial": outcome.faults_per_trial,
        "silent": outcome.silent,
        "detected": outcome.detected,
        "layers": result.layer_vulnerability(),
        "coverage": result.coverage or None,
        "model_format": result.model_format,
        "model_notes": list(result.model_notes),
        "inexact_view": list(result.inexact_view),
        "result": result.to_dict(),
        "mitigation": None,
        "advice": None,  # the advisor's (--hwfault-advise) suggestion, added by the plugin
    }
    if spec.mitigated:
        unmitigated = outcome.unmitigated
        record["mitigation"] = {
            "name": spec.mitigation_name(),
            "protected": result.mitigation.get("protected", []),
            "unmitigated_accuracy": None if unmitigated is None else unmitigated.estimate,
            "unmitigated_ci_low": None if unmitigated is None else unmitigated.ci_low,
            "unmitigated_ci_high": None if unmitigated is None else unmitigated.ci_high,
            "corrected": outcome.corrected,
            "cost": result.mitigation.get("cost", {}),
        }
    return dict(_json_safe(record))


def environment() -> dict[str, Any]:
    """Where the numbers came from, so that a surprising report can be traced to a machine and versions."""
    from .. import __version__

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
                "burst": {"type": "integer", "minimum": 1,
                          "description": "adjacent bits one fault event changes in one code (1: single-bit faults)"},
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
                "problem": {"type": ["string", "null"]},
                "coverage": {"type": ["object", "null"],
                             "description": "share of the MACs (macs) and weights (weights) faults can reach, "
                                            "and what is left in float (uncovered, uncounted); with a layers= "
                                            "that chooses some quantized layers, selection: their shares "
                                            "(macs, weights), which the campaign's faults reach"},
                "model_format": {"type": "string",
                                 "description": "where the codes came from: 'calibrated' (quantized by the plugin) "
                                                "or the deployed int8 format read: torch.ao eager, torch.ao fx, "
                                                "pt2e, onnx"},
                "model_notes": {"type": "array", "items": {"type": "string"},
                                "description": "a deployed model's reader on what it does not reproduce bit for "
                                               "bit or leaves outside the fault sites (e.g. layers with no act "
                                               "site), and a compiled model's check against the view"},
                "inexact_view": {"type": "array", "items": {"type": "string"},
                                 "description": "the load checks' notes on how the view of a deployed model "
                                                "computes otherwise than the model (or could not be checked "
                                                "against it), judged because allow_inexact_view=True; empty when "
                                                "the view computes what the model computes"},
                "shard": {"type": "array", "items": {"type": "integer", "minimum": 1},
                          "description": "[index, count] of the xdist shard that reported the record"},
                "shards_run": {"type": "array", "items": {"type": "integer", "minimum": 1},
                               "description": "the shards of the campaign the session selected (-k, --lf and "
                                              "--deselect may leave some out); the last of them carries the "
                                              "verdict"},
                "lost_shards": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "complete": {"type": "boolean"},
                "contiguous": _COUNT,
                "next_checkpoint": {"type": ["integer", "null"], "minimum": 1},
                "missing_trials": {"type": "array", "items": _COUNT},
                "seed": _COUNT,
                "seconds": {"type": "number", "minimum": 0},
                "critical_rate": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "nonfinite": _COUNT,
                "faults_per_trial": {"type": "number", "minimum": 0},
                "silent": {"type": ["integer", "null"], "minimum": 0,
                           "description": "silent data corruption: images (over the trials used) whose prediction "
                                          "changed from the fault-free one with nothing flagging it"},
                "detected": {"type": "integer", "minimum": 0,
                             "description": "detected unrecoverable errors (DUE): images whose logits held NaN or "
                                            "Inf, and every image of a trial whose weight ECC detected an "
                                            "uncorrectable word; a DUE is not a correct prediction"},
                "mitigation": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/mitigation"}]},
                "advice": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/advice"}]},
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
        "mitigation": {
            "type": "object",
            "description": "a mitigated campaign (mitigation=, ecc=, protect=): the gate ran on the mitigated model; "
                           "the unmitigated model's accuracy is measured under the same faults (same trial seeds)",
            "required": ["name", "unmitigated_accuracy", "cost"],
            "properties": {
                "name": {"type": "string", "description": "the mitigations, e.g. range_restriction+secded64"},
                "protected": {"type": "array", "items": {"type": "string"},
                              "description": "the layers protect= matched"},
                "unmitigated_accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "unmitigated_ci_low": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "unmitigated_ci_high": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "corrected": {"type": "integer", "minimum": 0,
                              "description": "faults removed: in protected layers, or in ECC-corrected words"},
                "cost": {"type": "object",
                         "description": "per mitigation: protect (weight_bits: share of the weight bits "
                                        "protected, extra_macs: 2x their MACs as a share of the quantized MACs), ecc "
                                        "(check bits per word, memory_overhead), range_restriction (comparisons "
                                        "and bound registers)"},
            },
        },
        "advice": {
            "type": "object",
            "description": "the advisor's suggestion for a gate that did not pass (--hwfault-advise): layers whose "
                           "protection made a confirming campaign (same seed, same faults) pass, or the best set "
                           "tried when none did",
            "required": ["protect", "verdict"],
            "properties": {
                "protect": {"type": "array", "items": {"type": "string"}},
                "accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "ci_low": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "ci_high": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "required": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "verdict": {"type": "string", "description": "the confirming campaign's verdict"},
                "campaigns": {"type": "integer", "minimum": 0, "description": "confirming campaigns run"},
                "cost": {"type": "object", "description": "as mitigation.cost.protect"},
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
                "vulnerability_low": _PROBABILITY,
                "vulnerability_high": _PROBABILITY,
                "fault_share": _PROBABILITY,
                "faults": _COUNT,
                "site_bits": {"type": "integer", "minimum": 0,
                              "description": "bits faults can strike in the layer at the campaign's site (per image "
                                             "at transient sites)"},
                "exposure_share": {**_PROBABILITY,
                                   "description": "the layer's site bits x vulnerability, as a share of the model's"},
                "weight_bits": _COUNT,
                "macs": {**_COUNT, "description": "multiply-accumulates per image"},
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


_LARGEST = 2**1023  # integers beyond a float's range are no accuracy, count or seed a report holds


def _is_type(value: Any, kind: str) -> bool:
    actual = _json_type(value)
    if actual == "integer" and not -_LARGEST < value < _LARGEST:
        return False
    if kind == "number":
        return actual in ("integer", "number") and math.isfinite(value)
    if kind == "integer" and actual == "number":
        return math.isfinite(value) and float(value).is_integer()  # JSON Schema: 1.0 is an integer
    return actual == kind


def _check(value: Any, schema: Mapping[str, Any], path: str) -> None:
    """The subset of JSON Schema that REPORT_JSON_SCHEMA uses, so validation needs no jsonschema package."""
    if "anyOf" in schema:  # null, or the one object schema
        if value is None:
            return
        schema = next(s for s in schema["anyOf"] if s.get("type") != "null")
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
        spec = record["result"]["spec"]
        said = {**{key: record[key] for key in ("site", "ber", "bits", "kind", "seed") if key in record},
                "min_acc": record["threshold"]["min_acc"], "max_drop": record["threshold"]["max_drop"]}
        for key, value in said.items():
            if key in spec and spec[key] != value:
                raise ReportError(f"{path}: {key} {value!r} does not match the campaign's own setting "
                                  f"{spec[key]!r} (result.spec.{key}): the record was altered")


# --------------------------------------------------------------------------------------------------------------
# files


def check_writable(path: str | os.PathLike[str], what: str = "report") -> None:
    """Raise ReportError unless a file can be written at `path`: checked before any campaign runs, so that an
    unwritable path is a usage error, not a traceback after an hour of campaigns."""
    target = Path(path)
    if target.is_dir():
        raise ReportError(f"{target}: is a directory; give a file path for the {what}")
    if target.exists() and not target.is_file():  # a device or FIFO: written in place, never replaced
        if not os.access(target, os.W_OK):
            raise ReportError(f"{target}: not writable")
        return
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ReportError(f"{target}: {ancestor} is not a directory, so the {what} cannot be written there")
    try:
        fd, probe = tempfile.mkstemp(prefix=".hwfault-probe.", dir=ancestor)
    except OSError as error:
        raise ReportError(f"{target}: cannot write in {ancestor}: {error.strerror or error}") from None
    os.close(fd)
    os.unlink(probe)


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Validate, then write strict JSON atomically, so that a reader never sees half a report. A target that
    exists and is not a regular file (/dev/null, a FIFO) is written in place: only regular files are replaced."""
    target = Path(path)
    try:
        validate_report(report)
    except ReportError as error:
        raise ReportError(f"{target}: refusing to write an invalid report: {error}") from None
    return write_atomically(target, json.dumps(report, indent=1, allow_nan=False) + "\n")


def write_atomically(target: Path, text: str, shared: bool = False) -> Path:
    """Write `text` so that a reader never sees half a file: a temporary file beside it, then one rename. A target
    that exists and is not a regular file (/dev/null, a FIFO) is written in place: only regular files are replaced.
    `shared`: readable by others as the umask allows (mkstemp's 0600 would hide a page from a web server)."""
    if target.is_dir():
        raise ReportError(f"{target}: is a directory")
    if target.exists() and not target.is_file():
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(text)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        if shared:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    except RecursionError:
        raise ReportError(f"{source}: JSON nested too deeply to be a report") from None
    except ValueError as error:  # e.g. an integer literal longer than Python converts
        raise ReportError(f"{source}: not a report: {error}") from None
    try:
        validate_report(report)
    except ReportError as error:
        raise ReportError(f"{source}: {error}") from None
    return dict(report)

