"""Plots of a report: accuracy vs BER with confidence bands, and per-layer scales (needs the ``plots`` extra)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .text import _short_nodeid


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

