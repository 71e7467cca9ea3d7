"""Text for people: the terminal summary table and the failure message of a gate that did not pass."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

TOP_LAYERS = 3  # most vulnerable layers named in a failure message



def printable(text: str) -> str:
    """`text` with control and format characters escaped (ESC as \\x1b, CR as \\r), so that a received report's
    nodeids cannot move the cursor, repaint rows or hide text in a terminal."""
    if text.isprintable():
        return text
    return "".join(c if unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


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
    ("threshold", False), ("reach", True), ("verdict", False), ("time", True),
)


def _reach(record: Mapping[str, Any]) -> str:
    """The share of what faults at the record's site could hit that they reach ("?" when unknown)."""
    coverage = record.get("coverage")
    if not coverage:
        return "n/a"
    if coverage.get("uncounted"):
        return "?"
    shares = coverage.get("selection") or coverage
    return f"{shares['weights' if record['site'] == 'weight' else 'macs']:.0%}"


def coverage_text(coverage: Mapping[str, Any]) -> str:
    """One line: what the faults reach and what they cannot."""
    parts = [f"{row['module'] or '<model>'} ({', '.join(row['ops'])}: {row['share']:.1%}"
             + (f"; {', '.join(row['why'])}" if row.get("why") else "") + ")"
             for row in coverage.get("uncovered", [])[:4]]
    text = f"faults reach {coverage['macs']:.1%} of the MACs and {coverage['weights']:.1%} of the weights"
    selection = coverage.get("selection")
    if selection:
        chosen = ", ".join(map(repr, selection["names"][:4])) + (f" and {len(selection['names']) - 4} more"
                                                      if len(selection["names"]) > 4 else "")
        text = (f"faults reach {selection['macs']:.1%} of the MACs and {selection['weights']:.1%} of the weights: "
                f"layers={', '.join(map(repr, selection['layers']))} selects {chosen}, and the other quantized "
                f"layers compute without faults (all quantized layers: {coverage['macs']:.1%} of the MACs, "
                f"{coverage['weights']:.1%} of the weights)")
    if parts:
        text += "; left in float: " + "; ".join(parts)
    if coverage.get("uncounted"):
        text += f"; MACs not countable (coverage unknown) in: {', '.join(coverage['uncounted'])}"
    if coverage.get("uncoded"):
        rows = coverage["uncoded"]
        named = "; ".join(f"{row['parameter']} ({row['elements']}: {row['how']})" for row in rows[:4])
        more = f"; {len(rows) - 4} more" if len(rows) > 4 else ""
        text += (f"; {sum(row['elements'] for row in rows)} weight elements MACs read are held as no codes, so "
                 f"weight faults miss them: {named}{more}")
    if coverage.get("unfaulted_parameters"):
        rows = coverage.get("unfaulted", [])
        named = "; ".join(f"{row['parameter']} ({row['elements']}: {', '.join(row['ops'])})" for row in rows[:4])
        more = f"; {len(rows) - 4} more" if len(rows) > 4 else ""
        text += (f"; {coverage['unfaulted_parameters']} parameter elements feed no MAC op and are not faulted"
                 + (f": {named}{more}" if named else ""))
    return text


INEXACT_MARK = "*"
INEXACT_LEGEND = (f"{INEXACT_MARK} judged on a view of the deployed model that computes otherwise than the model "
                  "(allow_inexact_view=True): see its inexact view notes")


def format_table(records: list[dict[str, Any]]) -> list[str]:
    """Terminal summary, one aligned row per campaign, for the pytest summary and the CLI."""
    rows = [[
        printable(_short_nodeid(record["nodeid"])),
        record["site"],
        f"{record['ber']:g}",
        str(record["trials"]),
        _accuracy_text(record),
        _threshold_text(record),
        _reach(record),
        record["verdict"].upper() + (INEXACT_MARK if record.get("inexact_view") else ""),
        f"{record['seconds']:.1f}s",
    ] for record in records]
    header = [name for name, _ in _TABLE_COLUMNS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(width) if right else cell.ljust(width)
                         for cell, width, (_, right) in zip(cells, widths, _TABLE_COLUMNS)).rstrip()

    legend = [INEXACT_LEGEND] if any(record.get("inexact_view") for record in records) else []
    return [line(header), line(["-" * width for width in widths]), *(line(row) for row in rows), *legend]


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


def detection_text(record: Mapping[str, Any]) -> str:
    """Silent data corruption vs detected unrecoverable errors, and how much of the accuracy loss was detected."""
    images = record["trials"] * record.get("images", 0)
    detected, silent = record.get("detected") or 0, record.get("silent")
    text = (f"{_num(silent, 'd')} images silently corrupted (prediction changed, nothing flagged), {detected} "
            "detected unrecoverable (NaN/Inf logits, ECC-detected words)")
    if images and record["accuracy"] is not None:
        loss = (record["quantized_accuracy"] - record["accuracy"]) * images
        if loss > 0:
            text += f"; {min(1.0, detected / loss):.0%} of the accuracy loss was detected"
    return text


def mitigation_text(record: Mapping[str, Any]) -> str:
    """The mitigated and unmitigated accuracies under the same faults, and the cost."""
    from ..mitigation import cost_text

    m = record["mitigation"]
    text = f"{m['name']}: gated accuracy {_accuracy_text(record)}"
    if m.get("unmitigated_accuracy") is not None:
        interval = (f" [{m['unmitigated_ci_low']:.4f}, {m['unmitigated_ci_high']:.4f}]"
                    if m.get("unmitigated_ci_low") is not None else "")
        text += f" vs unmitigated {m['unmitigated_accuracy']:.4f}{interval} under the same faults"
    if m.get("corrected"):
        text += f"; {m['corrected']} faults corrected"
    cost = cost_text(m.get("cost") or {})
    return text + (f"; cost: {cost}" if cost else "")


def _names(names: Sequence[str]) -> str:
    shown = [printable(n) for n in names]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def advice_text(advice: Mapping[str, Any]) -> str:
    """The advisor's suggestion in one line: "protect a and b (4.1% of weight bits) -> accuracy 0.91 [...] >= 0.90"."""
    protect = list(advice.get("protect") or [])
    if not protect:
        return str(advice.get("reason", "no suggestion"))
    cost = advice.get("cost") or {}
    share = f" ({cost['weight_bits']:.1%} of weight bits, +{cost['extra_macs']:.1%} MACs)" if "weight_bits" in cost \
        else ""
    accuracy = "n/a" if advice.get("accuracy") is None else \
        f"{advice['accuracy']:.4f} [{advice['ci_low']:.4f}, {advice['ci_high']:.4f}]"
    passed = advice.get("verdict") == "pass"
    relation = ">=" if passed else "still not >="
    text = (f"protect {_names(protect)}{share} -> accuracy under faults {accuracy} {relation} "
            f"{_num(advice.get('required'))}")
    campaigns = advice.get("campaigns")
    if passed:
        runs = "" if not campaigns else f", {campaigns} run"
        text += f" (confirmed by a campaign with the same seed and faults{runs})"
    else:
        text += f" (best of {campaigns} confirming campaigns; no set tried passed)"
    return text


def failure_message(record: dict[str, Any], reproduce: str) -> str:
    """Everything a person needs to act on a gate that did not pass, ending with the command that reproduces it."""
    verdict = record["verdict"]
    threshold = record["threshold"]
    headline = {
        "pass": "accuracy under faults meets the threshold",
        "fail": "accuracy under faults is below the threshold",
        "inconclusive": "the trial budget was spent without a decision",
        "incomplete": "trials are missing, so no decision could be made",
        "invalid": "the campaign's trials cannot be judged together",
    }.get(verdict, verdict)
    label = "" if record["label"] in record["nodeid"] else f" [{record['label']}]"  # parametrized ids name it
    lines = [f"hwfault {verdict.upper()}: {printable(record['nodeid'] + label)}: {headline}"]

    def row(key: str, text: str) -> None:
        lines.append(f"  {key:<13}{text}")

    positions = "" if not record.get("bit_positions") else f", bit positions {record['bit_positions']}"
    burst = record.get("burst", 1)
    events = "" if burst == 1 else f", bursts of {burst} adjacent bits per event (BER counts events)"
    spec = record.get("result", {}).get("spec", {})
    if record["site"] == "pe" and spec.get("array"):
        rows, cols = spec["array"]
        register = spec.get("pe_register", "acc")
        words = "32-bit accumulator" if register == "acc" else "16-bit multiplier output"
        where = (f"the {words} registers of a {rows}x{cols} weight-stationary systolic array (permanent for a "
                 "trial, in every layer it computes)")
    elif record["site"] == "qparams":
        where = ("each layer's 32-bit requantization words (float32 multipliers, output zero point; permanent for a "
                 "trial)")
    else:
        where = f"{record['bits']}-bit codes"
    row("fault model", f"site={record['site']}, BER={record['ber']:g}, {where}, "
                       f"kind={record['kind']}{positions}{events}")
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
    deployed = record.get("model_format", "calibrated") != "calibrated"
    if deployed:
        row("model", f"deployed {record['model_format']} int8 model: its own codes, scales and arithmetic")
    for note in record.get("model_notes") or []:
        row("model note", printable(note))
    if deployed:
        for note in record.get("inexact_view") or []:
            row("inexact view", printable(f"judged anyway (allow_inexact_view=True): {note}"))
    float_kind = "float function of its int8 weights" if deployed else "float"
    row("fault-free", f"{float_kind} {record['float_accuracy']:.4f}, quantized {record['quantized_accuracy']:.4f}")
    if record.get("coverage"):
        row("coverage", printable(coverage_text(record["coverage"])))
    if record["trials"]:
        row("damage", f"{_num(record['critical_rate'], '.2%')} of images changed prediction, "
                      f"{record['nonfinite']} with non-finite logits, {record['faults_per_trial']:.3g} faults/trial")
        if record.get("detected") is not None:
            row("silent/DUE", detection_text(record))
    if record.get("mitigation"):
        row("mitigation", mitigation_text(record))
    top = _most_vulnerable(record)
    if top:
        lines.append("  most vulnerable layers (share of fault-hit images that became critical):")
        for rank, layer in enumerate(top, 1):
            interval = (f" [{layer['vulnerability_low']:.3f}, {layer['vulnerability_high']:.3f}]"
                        if "vulnerability_low" in layer else "")
            lines.append(f"    {rank}. {printable(layer['name'])} ({layer.get('type', '?')}): vulnerability "
                         f"{layer['vulnerability']:.3f}{interval}, act scale {_num(layer.get('act_scale'), '.4g')}, "
                         f"max weight scale {_num(layer.get('weight_scale_max'), '.4g')}, {layer['faults']} faults")
    else:
        row("layers", "no faults landed in the trials used")
    if record.get("problem"):
        lines.append(f"  problem: {printable(record['problem'])}")
    if record.get("advice"):
        row("advice", advice_text(record["advice"]))
    if verdict == "fail":
        lines.append(f"  the upper confidence bound {record['ci_high']:.4f} is below the required "
                     f"{threshold['required']:.4f}: protect the layers above (mitigation='range_restriction', "
                     "ecc='secded', protect=[...]; --hwfault-advise finds a set) or lower the BER.")
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

