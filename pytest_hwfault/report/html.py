"""One self-contained HTML page of a run's campaigns (``--hwfault-html``, ``python -m pytest_hwfault.report html``).

The page needs nothing but itself: CSS is inline, plots are PNGs inlined as ``data:`` URIs, there is no script,
and a Content-Security-Policy forbids fetching anything, so it can be mailed, archived as a CI artifact or opened
offline. Every text taken from a record (nodeids, layer names, problems) is escaped. matplotlib is imported only to
draw the accuracy-vs-BER curves; without it the page says so and shows everything else.

Sections: the campaign table; accuracy vs BER with confidence intervals, one plot per (test, site, kind); the
per-layer vulnerability heat map (layer x campaign, per model); the per-layer quantization scales; the advisor's
suggestions (a record's ``advice``); silent vs detected faults (a record's ``detected``/``due``/``silent``, when
present); and, for every campaign that did not pass, its failure message and the command that reproduces it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..spec import SITES
from .document import write_atomically
from .plot import _MARKERS, _plot_curves, _test_function
from .text import (
    INEXACT_LEGEND,
    INEXACT_MARK,
    _accuracy_text,
    _reach,
    _short_nodeid,
    _threshold_text,
    failure_message,
    printable,
)

MAX_PLOTS = 48  # accuracy-vs-BER figures drawn; more curves are listed, not drawn
DETECTION_KEYS = ("silent", "detected", "due")  # counts another part of the plugin may add to records
_VERDICT_CLASSES = {"pass": "pass", "fail": "fail", "inconclusive": "inconclusive", "incomplete": "incomplete",
                    "invalid": "invalid"}
# the heat map's colour ramp (vulnerability 0 -> 1), ColorBrewer "Reds"
_RAMP = ((255, 245, 240), (252, 187, 161), (251, 106, 74), (203, 24, 29), (103, 0, 13))
_SITE_ORDER = {site: index for index, site in enumerate(SITES)}


def esc(value: Any) -> str:
    """`value` as text safe in HTML content and quoted attributes; control characters shown escaped."""
    return html.escape(printable(str(value)), quote=True)


def esc_lines(text: str) -> str:
    """Multi-line `text` escaped line by line, so that its newlines stay line breaks."""
    return "\n".join(esc(line) for line in text.split("\n"))


def _num(value: Any, spec: str = ".4f", missing: str = "–") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return missing if value is None else esc(value)
    if isinstance(value, float) and not math.isfinite(value):
        return missing
    return format(value, spec)


def reproduce_command(record: Mapping[str, Any]) -> str:
    """The command that reruns the campaign with its seed, budget and confidence (as the plugin's failure message
    gives it)."""
    args = ["pytest", str(record["nodeid"]), "--hwfault", f"--hwfault-seed={record['seed']}"]
    if record.get("budget") is not None:
        args.append(f"--hwfault-budget={record['budget']}")
    if record.get("confidence") is not None:
        args.append(f"--hwfault-confidence={record['confidence']}")
    return shlex.join(args)


def _verdict_class(verdict: Any) -> str:
    return _VERDICT_CLASSES.get(str(verdict), "other")


def _verdict_badge(verdict: Any) -> str:
    return f'<span class="verdict v-{_verdict_class(verdict)}">{esc(str(verdict).upper())}</span>'


def _kind_text(record: Mapping[str, Any]) -> str:
    burst = record.get("burst") or 1
    text = str(record.get("kind", "flip"))
    if burst != 1:
        text += f", burst {burst}"
    if record.get("bit_positions"):
        text += f", bits {record['bit_positions']}"
    return text


def _campaign_title(record: Mapping[str, Any]) -> str:
    """The nodeid, and the campaign's label unless the nodeid's parametrization already names it."""
    label = str(record.get("label", ""))
    return str(record["nodeid"]) if not label or label in str(record["nodeid"]) else f"{record['nodeid']} [{label}]"


def _anchor(index: int) -> str:
    return f"campaign-{index}"


# -- sections ---------------------------------------------------------------------------------------------------
def _header(records: Sequence[Mapping[str, Any]], environment: Mapping[str, Any] | None) -> str:
    counts: dict[str, int] = {}
    for record in records:
        counts[str(record["verdict"])] = counts.get(str(record["verdict"]), 0) + 1
    badges = " ".join(f'<span class="verdict v-{_verdict_class(v)}">{n} {esc(v)}</span>' for v, n in counts.items())
    parts = ["<h1>pytest-hwfault report</h1>",
             f'<p class="summary">{len(records)} campaign{"" if len(records) == 1 else "s"} {badges}</p>']
    if environment:
        machine = environment.get("machine")
        where = ""
        if isinstance(machine, Mapping):
            where = ", ".join(str(machine[key]) for key in ("node", "platform") if machine.get(key))
        elif machine:
            where = str(machine)
        facts = [("created", environment.get("created")), ("pytest-hwfault", environment.get("plugin")),
                 ("python", environment.get("python")), ("torch", environment.get("torch")), ("machine", where)]
        parts.append('<p class="env">' + " · ".join(f"{esc(k)} <b>{esc(v)}</b>" for k, v in facts if v) + "</p>")
    return "\n".join(parts)


def _table(records: Sequence[Mapping[str, Any]]) -> str:
    head = ("test", "site", "BER", "kind", "bits", "trials", "accuracy [interval]", "threshold", "fault-free",
            "reach", "verdict", "format", "time")
    rows = []
    for index, record in enumerate(records):
        verdict = _verdict_badge(record["verdict"])
        if record["verdict"] != "pass":
            verdict = f'<a href="#{_anchor(index)}-details">{verdict}</a>'
        if record.get("inexact_view"):
            verdict += (f'<span class="inexact" title="{esc(" / ".join(map(str, record["inexact_view"])))}">'
                        f"{INEXACT_MARK}</span>")
        budget = f"/{record['budget']}" if record.get("budget") is not None else ""
        conf = f' title="at {_num(record.get("confidence"), ".0%")} confidence, {esc(record.get("method", ""))}"'
        fault_free = (f"{_num(record.get('quantized_accuracy'))}"
                      f'<small class="muted">float {_num(record.get("float_accuracy"))}</small>')
        seconds = record.get("seconds")
        rows.append(
            f'<tr id="{_anchor(index)}" class="row-{_verdict_class(record["verdict"])}">'
            f'<td class="test" title="{esc(_campaign_title(record))}">{esc(_short_nodeid(str(record["nodeid"]), 70))}'
            f'</td><td>{esc(record["site"])}</td><td class="num">{_num(record["ber"], "g")}</td>'
            f"<td>{esc(_kind_text(record))}</td><td class=\"num\">{esc(record.get('bits', ''))}</td>"
            f'<td class="num">{esc(record["trials"])}{budget}</td>'
            f'<td class="num"{conf}>{esc(_accuracy_text(record))}</td><td>{esc(_threshold_text(record))}</td>'
            f'<td class="num">{fault_free}</td><td class="num">{esc(_reach(record))}</td><td>{verdict}</td>'
            f'<td>{esc(record.get("model_format", "calibrated"))}</td>'
            f'<td class="num">{_num(seconds, ".1f")}{"s" if seconds is not None else ""}</td></tr>')
    header = "".join(f"<th>{esc(h)}</th>" for h in head)
    note = ("accuracy: accuracy under faults with its confidence interval; reach: share of the MACs (weights, for "
            "site=weight) that faults can hit; fault-free: quantized (float) accuracy without faults.")
    if any(record.get("inexact_view") for record in records):
        note += f" {INEXACT_LEGEND} (the mark's tooltip)."
    return (f'<h2 id="campaigns">Campaigns</h2>\n<div class="wide"><table class="campaigns"><thead><tr>{header}'
            "</tr></thead><tbody>\n" + "\n".join(rows) + f'\n</tbody></table></div>\n<p class="note">{note}</p>')


def _curve_groups(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], list[Mapping[str, Any]]]:
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        if record.get("accuracy") is not None:
            key = (_test_function(str(record["nodeid"])), str(record["site"]), str(record["kind"]))
            groups.setdefault(key, []).append(record)
    return dict(sorted(groups.items()))


def _png_data_uri(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _curves(records: Sequence[Mapping[str, Any]]) -> str:
    groups = _curve_groups(records)
    title = '<h2 id="curves">Accuracy vs bit error rate</h2>'
    if not groups:
        return title + '\n<p class="muted">No campaign reached a checkpoint, so there is no accuracy to plot.</p>'
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return (title + "\n<p class=\"muted\">matplotlib is not installed (pip install 'pytest-hwfault[plots]'), "
                "so the curves are left out; the campaign table holds their numbers.</p>")
    figures = []
    for (function, site, kind), points in list(groups.items())[:MAX_PLOTS]:
        fig = Figure(figsize=(4.2, 2.9), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        _plot_curves(ax, points)
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
        ax.set_title(f"site={site}" + ("" if kind == "flip" else f", kind={kind}"), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
        alt = f"accuracy vs BER of {function}, site {site}, kind {kind}"
        figures.append(f'<figure><img alt="{esc(alt)}" src="{_png_data_uri(fig)}">'
                       f'<figcaption title="{esc(function)}">{esc(_short_nodeid(function, 60))}<br>'
                       f"site={esc(site)}{'' if kind == 'flip' else ', kind=' + esc(kind)}</figcaption></figure>")
    markers = ", ".join(f"{m} {v}" for v, m in _MARKERS.items())
    more = ""
    if len(groups) > MAX_PLOTS:
        rest = ", ".join(esc(f"{_short_nodeid(f, 60)} ({s}, {k})") for f, s, k in list(groups)[MAX_PLOTS:])
        more = f'<p class="note">Not drawn ({len(groups) - MAX_PLOTS} more curves): {rest}</p>'
    return (title + f'\n<p class="note">Bars and band: confidence interval; dashed line: required accuracy; '
            f"markers: {esc(markers)}.</p>\n<div class=\"figures\">" + "".join(figures) + "</div>" + more)


def _model_groups(records: Sequence[Mapping[str, Any]], key: str) -> list[list[Mapping[str, Any]]]:
    """Records grouped by the model they ran on, recognised by the layer names (and format) of their ``layers``."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for record in records:
        layers = _layer_rows(record, key)
        if layers:
            signature = (record.get("model_format"), tuple(str(layer.get("name")) for layer in layers))
            groups.setdefault(signature, []).append(record)
    return list(groups.values())


def _layer_rows(record: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    if key == "result":
        result = record.get("result")
        layers = result.get("layers") if isinstance(result, Mapping) else None
        if layers:
            return [layer for layer in layers if isinstance(layer, Mapping)]
    return [layer for layer in record.get("layers") or () if isinstance(layer, Mapping)]


def _functions(group: Iterable[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(_test_function(str(record["nodeid"])) for record in group))


def _ramp(value: float) -> tuple[str, str]:
    """Background and text colour of a heat-map cell for a vulnerability in [0, 1]."""
    value = min(1.0, max(0.0, value))
    position = value * (len(_RAMP) - 1)
    low = min(int(position), len(_RAMP) - 2)
    t = position - low
    rgb = tuple(round(a + (b - a) * t) for a, b in zip(_RAMP[low], _RAMP[low + 1]))
    return f"#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x}", "#fff" if value > 0.55 else "#222"


def _heat_cell(layer: Mapping[str, Any] | None) -> str:
    if layer is None:
        return '<td class="cell none" title="not in this campaign">·</td>'
    faults = layer.get("faults", 0) or 0
    if not faults:
        return '<td class="cell none" title="no fault landed in this layer">–</td>'
    value = float(layer.get("vulnerability", 0.0))
    background, color = _ramp(value)
    low, high = layer.get("vulnerability_low"), layer.get("vulnerability_high")
    interval = f"[{_num(low, '.2f')}, {_num(high, '.2f')}]" if low is not None and high is not None else ""
    share = layer.get("fault_share")
    tip = (f"vulnerability {value:.3f} {interval}, {faults} faults"
           + (f" ({share:.0%} of the campaign's faults)" if isinstance(share, (int, float)) else ""))
    return (f'<td class="cell" style="background:{background};color:{color}" title="{esc(tip)}">{value:.2f}'
            f'<small>{esc(interval)}</small></td>')


def _heatmap(records: Sequence[Mapping[str, Any]]) -> str:
    title = '<h2 id="heatmap">Per-layer vulnerability</h2>'
    groups = _model_groups(records, "layers")
    if not groups:
        return title + '\n<p class="muted">No campaign carries per-layer rows.</p>'
    stops = ", ".join(f"rgb{rgb}" for rgb in _RAMP)
    parts = [title, '<p class="note">Share of the fault-hit images (trials, for site=weight) that became critical '
                    "(changed prediction), with its confidence interval; an image hit in several layers counts for "
                    "each, so this ranks layers. – : no fault landed. "
                    f'<span class="ramp" style="background:linear-gradient(to right, {stops})"></span> 0 → 1</p>']
    for group in groups:
        functions = _functions(group)
        columns = sorted(group, key=lambda r: (functions.index(_test_function(str(r["nodeid"]))),
                                               _SITE_ORDER.get(str(r["site"]), 99), str(r["kind"]), r["ber"],
                                               str(r["nodeid"])))
        head = []
        for record in columns:
            label = f"{esc(record['site'])}<br>{_num(record['ber'], 'g')}"
            if record.get("kind") != "flip" or (record.get("burst") or 1) != 1:
                label += f"<br>{esc(_kind_text(record))}"
            head.append(f'<th class="col" title="{esc(_campaign_title(record))}">{label}</th>')
        corner = '<th class="layer"{}>layer \\ site, BER</th>'
        if len(functions) > 1:  # a row naming each test function above its columns
            spans = [sum(_test_function(str(r["nodeid"])) == f for r in columns) for f in functions]
            names_row = "".join(f'<th class="fn" colspan="{n}" title="{esc(f)}">{esc(f.rpartition("::")[2])}</th>'
                                for f, n in zip(functions, spans))
            header = "<tr>" + corner.format(' rowspan="2"') + f'{names_row}</tr><tr>{"".join(head)}</tr>'
        else:
            header = f'<tr>{corner.format("")}{"".join(head)}</tr>'
        names = [str(layer.get("name")) for layer in _layer_rows(columns[0], "layers")]
        by_record = [{str(layer.get("name")): layer for layer in _layer_rows(r, "layers")} for r in columns]
        body = []
        for name in names:
            kind = next((layer.get("type") for rows in by_record if (layer := rows.get(name)) is not None), "")
            cells = "".join(_heat_cell(rows.get(name)) for rows in by_record)
            body.append(f'<tr><th class="layer">{esc(name)} <span class="muted">{esc(kind or "")}</span></th>'
                        f"{cells}</tr>")
        parts.append(f'<h3>{", ".join(esc(_short_nodeid(f, 70)) for f in functions)} '
                     f'<span class="muted">({esc(columns[0].get("model_format", "calibrated"))})</span></h3>'
                     f'<div class="wide"><table class="heat"><thead>{header}</thead>'
                     f"<tbody>{''.join(body)}</tbody></table></div>")
    return "\n".join(parts)


def _scale_bar(value: Any, lo: float, hi: float, css: str) -> str:
    if not isinstance(value, (int, float)) or value <= 0 or not math.isfinite(value):
        return ""
    width = 100.0 if hi <= lo else 8 + 92 * (math.log10(value) - lo) / (hi - lo)
    return f'<span class="bar {css}" style="width:{width:.0f}%"></span>'


def _scales(records: Sequence[Mapping[str, Any]]) -> str:
    title = '<h2 id="scales">Per-layer scales</h2>'
    groups = _model_groups(records, "result")
    if not groups:
        return title + '\n<p class="muted">No campaign carries per-layer scales.</p>'
    parts = [title, '<p class="note">Quantization scales of each layer (value of one code step): a large scale '
                    "makes a flipped high bit costly. Bars: log scale within the table (blue: activation scale, "
                    "orange: largest weight scale). Activation scale – : the layer keeps a float result.</p>"]
    columns = (("input_scale", "input scale", ".4g"), ("act_scale", "act scale", ".4g"),
               ("weight_scale_max", "max weight scale", ".4g"), ("weight_scale_mean", "mean weight scale", ".4g"),
               ("act_clip_rate", "act clip rate", ".2%"), ("input_clip_rate", "input clip rate", ".2%"))
    seen: set[tuple[Any, ...]] = set()
    for group in groups:
        layers = _layer_rows(group[0], "result")
        signature = tuple((str(layer.get("name")), layer.get("act_scale"), layer.get("weight_scale_max"))
                          for layer in layers)
        if signature in seen:
            continue
        seen.add(signature)
        present = [c for c in columns if any(c[0] in layer for layer in layers)]
        logs = [math.log10(v) for layer in layers for v in (layer.get("act_scale"), layer.get("weight_scale_max"))
                if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
        lo, hi = (min(logs), max(logs)) if logs else (0.0, 0.0)
        head = "".join(f"<th>{esc(label)}</th>" for _, label, _ in present)
        body = []
        for layer in layers:
            cells = "".join(f'<td class="num">{_num(layer.get(key), spec)}</td>' for key, _, spec in present)
            bars = (_scale_bar(layer.get("act_scale"), lo, hi, "act")
                    + _scale_bar(layer.get("weight_scale_max"), lo, hi, "weight"))
            body.append(f'<tr><th class="layer">{esc(layer.get("name"))}</th><td>{esc(layer.get("type", ""))}</td>'
                        f"<td>{esc(layer.get('bits', ''))}</td>{cells}<td class=\"bars\">{bars}</td></tr>")
        functions = _functions(group)
        parts.append(f'<h3>{", ".join(esc(_short_nodeid(f, 70)) for f in functions)} '
                     f'<span class="muted">({esc(group[0].get("model_format", "calibrated"))})</span></h3>'
                     f'<table class="scales"><thead><tr><th>layer</th><th>type</th><th>bits</th>{head}'
                     f'<th>relative size</th></tr></thead><tbody>{"".join(body)}</tbody></table>')
    return "\n".join(parts)


def _value_text(value: Any) -> str:
    """A value of an optional field another part of the plugin fills in: numbers formatted, mappings as k=v."""
    if isinstance(value, Mapping):
        return ", ".join(f"{esc(k)}={_value_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_value_text(v) for v in value)
    if isinstance(value, float):
        return _num(value, ".4g")
    return esc(value)


def _advice_html(advice: Any) -> str:
    if not advice:
        return '<span class="muted">no suggestion</span>'
    if not isinstance(advice, Mapping):
        return _value_text(advice)
    parts = []
    protect = advice.get("protect")
    if protect:
        items = protect if isinstance(protect, (list, tuple)) else [protect]
        parts.append("protect " + ", ".join(f"<code>{_value_text(item)}</code>" for item in items))
    if advice.get("accuracy") is not None:
        interval = ""
        if advice.get("ci_low") is not None and advice.get("ci_high") is not None:
            interval = f" [{_num(advice['ci_low'])}, {_num(advice['ci_high'])}]"
        parts.append(f"expected accuracy {_num(advice['accuracy'])}{interval}")
    if advice.get("cost") is not None:
        parts.append(f"cost {_value_text(advice['cost'])}")
    known = {"protect", "accuracy", "ci_low", "ci_high", "cost"}
    parts.extend(f"{esc(key)}: {_value_text(value)}" for key, value in advice.items() if key not in known)
    return "; ".join(parts) if parts else '<span class="muted">no suggestion</span>'


def _advisor(records: Sequence[Mapping[str, Any]]) -> str:
    title = '<h2 id="advisor">Advisor</h2>'
    if not any(record.get("advice") for record in records):
        return title + '\n<p class="muted">No suggestion: no campaign in this report carries advice.</p>'
    rows = "".join(
        f'<tr><td class="test" title="{esc(_campaign_title(r))}">{esc(_short_nodeid(str(r["nodeid"]), 70))}</td>'
        f'<td>{esc(r.get("label", ""))}</td><td>{_verdict_badge(r["verdict"])}</td>'
        f"<td>{_advice_html(r.get('advice'))}</td></tr>" for r in records)
    return (title + '\n<table class="advice"><thead><tr><th>test</th><th>campaign</th><th>verdict</th>'
            f"<th>suggestion</th></tr></thead><tbody>{rows}</tbody></table>")


def _detection(records: Sequence[Mapping[str, Any]]) -> str:
    keys = [key for key in DETECTION_KEYS if any(record.get(key) is not None for record in records)]
    if not keys:
        return ""
    head = "".join(f"<th>{esc(key)}</th>" for key in keys)
    rows = "".join(
        f'<tr><td class="test" title="{esc(_campaign_title(r))}">{esc(_short_nodeid(str(r["nodeid"]), 70))}</td>'
        f'<td>{esc(r.get("label", ""))}</td>'
        + "".join(f'<td class="num">{_value_text(r.get(key)) if r.get(key) is not None else "–"}</td>'
                  for key in keys) + "</tr>" for r in records)
    return ('<h2 id="detection">Silent vs detected faults</h2>\n<p class="note">detected: faults a check caught; '
            "due: detected but unrecoverable errors; silent: faults that went unnoticed.</p>\n"
            f'<table class="detection"><thead><tr><th>test</th><th>campaign</th>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def _failures(records: Sequence[Mapping[str, Any]]) -> str:
    title = '<h2 id="failures">Campaigns that did not pass</h2>'
    items = []
    for index, record in enumerate(records):
        if record["verdict"] == "pass":
            continue
        command = reproduce_command(record)
        try:
            message = failure_message(dict(record), command)
        except (KeyError, TypeError, ValueError):  # a record missing optional numbers: the command still helps
            message = f"hwfault {str(record['verdict']).upper()}: {_campaign_title(record)}"
        items.append(f'<div class="failure" id="{_anchor(index)}-details"><h3>{_verdict_badge(record["verdict"])} '
                     f"{esc(_campaign_title(record))}</h3><p>reproduce:</p><pre class=\"cmd\">{esc(command)}</pre>"
                     f"<details open><summary>failure message</summary><pre>{esc_lines(message)}</pre></details></div>")
    if not items:
        return title + '\n<p class="muted">Every campaign passed.</p>'
    return title + "\n" + "\n".join(items)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 6px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:14px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0}th,td{padding:3px 7px;border:1px solid #e2e2e2;vertical-align:middle}
thead th{background:#f4f5f7;font-weight:600;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.test{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;max-width:340px;
overflow-wrap:anywhere}
table.campaigns{font-size:13px}td.num small{display:block;font-size:10px}.wide{overflow-x:auto;max-width:100%}
.campaigns tbody tr:nth-child(even){background:#fafafa}
.verdict{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600;color:#fff}
.v-pass{background:#2e7d32}.v-fail{background:#c62828}.v-inconclusive{background:#ef8f00}
.v-incomplete{background:#546e7a}.v-invalid{background:#6a1b9a}.v-other{background:#424242}
a .verdict{text-decoration:underline}
.muted{color:#777}.note{color:#555;font-size:12px;max-width:1100px}.env{color:#555;font-size:12px}
.summary .verdict{margin-left:4px}
.figures{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;border:1px solid #e2e2e2;padding:4px;background:#fff}
figure img{display:block;width:378px;height:261px}
figcaption{font-size:11px;color:#444;font-family:ui-monospace,monospace;max-width:378px;overflow-wrap:anywhere}
table.heat th.layer{text-align:left;font-family:ui-monospace,monospace;font-size:12px;font-weight:normal;
white-space:nowrap}
table.heat th.col{font-size:11px;text-align:center;font-weight:600}
table.heat th.fn{font-size:11px;text-align:center;font-family:ui-monospace,monospace;font-weight:600}
td.cell{text-align:center;font-variant-numeric:tabular-nums;min-width:56px;font-size:13px}
td.cell small{display:block;font-size:10px;opacity:.85}td.cell.none{color:#aaa;background:#fcfcfc}
.ramp{display:inline-block;width:120px;height:10px;vertical-align:middle;border:1px solid #ccc}
table.scales th.layer{text-align:left;font-family:ui-monospace,monospace;font-size:12px;font-weight:normal}
td.bars{width:180px}.bar{display:block;height:6px;margin:1px 0;border-radius:2px}
.bar.act{background:#1f77b4}.bar.weight{background:#ff7f0e}
pre{background:#f6f8fa;border:1px solid #e2e2e2;padding:8px;overflow-x:auto;font-size:12px;white-space:pre-wrap}
pre.cmd{background:#1e1e1e;color:#e8e8e8}
.failure{margin-bottom:14px}details summary{cursor:pointer;color:#333}
code{font-family:ui-monospace,monospace;font-size:12px;background:#f3f3f3;padding:0 3px;border-radius:3px}
nav a{margin-right:12px}
"""


def render_html(records: Sequence[Mapping[str, Any]], environment: Mapping[str, Any] | None = None) -> str:
    """The page of `records` (campaign records, as in a report's ``campaigns``), as one string."""
    ordered = sorted(records, key=lambda r: (str(r["nodeid"]), str(r.get("campaign_id", ""))))
    sections = [_table(ordered), _curves(ordered), _heatmap(ordered), _scales(ordered), _advisor(ordered)]
    detection = _detection(ordered)
    if detection:
        sections.append(detection)
    sections.append(_failures(ordered))
    links = [("campaigns", "campaigns"), ("curves", "accuracy vs BER"), ("heatmap", "vulnerability"),
             ("scales", "scales"), ("advisor", "advisor")]
    if detection:
        links.append(("detection", "silent vs detected"))
    links.append(("failures", "failures"))
    nav = "<nav>" + "".join(f'<a href="#{target}">{esc(text)}</a>' for target, text in links) + "</nav>"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>pytest-hwfault report</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + _header(ordered, environment) + "\n" + nav + "\n" + "\n".join(sections) + "\n</body>\n</html>\n")


def write_html(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str],
               environment: Mapping[str, Any] | None = None) -> Path:
    """Write the page atomically (a reader never sees half of it); `environment` defaults to this process's.
    A target that exists and is not a regular file (/dev/null, a FIFO) is written in place."""
    if environment is None:
        from .document import environment as current

        environment = current()
    return write_atomically(Path(path), render_html(records, environment), shared=True)


def extras_snippet(records: Sequence[Mapping[str, Any]]) -> str:
    """A small HTML block for one test's row in a pytest-html report: each campaign's verdict and accuracy."""
    colors = {"pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#ef8f00", "incomplete": "#546e7a",
              "invalid": "#6a1b9a"}
    lines = []
    for record in records:
        verdict = str(record["verdict"])
        required = record.get("threshold", {}).get("required")
        lines.append(
            f'<div class="hwfault-campaign">hwfault <b>{esc(record.get("label", ""))}</b>: '
            f'<span style="color:{colors.get(verdict, "#424242")};font-weight:bold">{esc(verdict.upper())}</span>'
            f", accuracy {esc(_accuracy_text(record))} vs required {_num(required)} "
            f"({esc(record['trials'])} trials, site={esc(record['site'])}, BER={_num(record['ber'], 'g')})</div>")
    return '<div class="hwfault">' + "".join(lines) + "</div>"
