"""``python -m pytest_hwfault.report {show,merge,compare,plot,html}``: read, merge, compare, plot and render
reports."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..verdicts import VERDICTS, VerdictPolicy
from .baseline import DEFAULT_TOLERANCE, baseline_failures, compare_to_baseline, parse_tolerance, unmatched
from .document import ReportError, load_report, write_report
from .merge import merge_reports
from .plot import plot_report
from .text import failure_message, format_table, printable


def _say(text: str = "") -> None:
    """Print `text` line by line with control characters escaped: reports come from other machines."""
    for line in text.split("\n"):
        print(printable(line))


def _print_summary(report: Mapping[str, Any], verbose: bool) -> None:
    records = report["campaigns"]
    for line in format_table(records):
        _say(line)
    counts = {verdict: sum(r["verdict"] == verdict for r in records) for verdict in VERDICTS}
    _say(f"{len(records)} campaigns: " + ", ".join(f"{n} {verdict}" for verdict, n in counts.items() if n))
    if verbose:
        for record in records:
            if record["verdict"] != "pass":
                _say()
                _say(failure_message(record, f"pytest {shlex.quote(record['nodeid'])}"))


def _cmd_show(args: argparse.Namespace) -> int:
    _print_summary(load_report(args.report), args.verbose)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    merged = merge_reports([load_report(path) for path in args.reports],
                           allow_mixed_versions=args.allow_mixed_versions)
    if args.output is not None:
        write_report(args.output, merged)
    _print_summary(merged, args.verbose)
    if args.output is not None:
        _say(f"merged {len(args.reports)} reports into {args.output}")
    policy = VerdictPolicy(inconclusive_passes=args.allow_inconclusive)  # a merge is final: nothing is deferred
    return 0 if all(policy.outcome(record["verdict"]) == "pass" for record in merged["campaigns"]) else 1


def _cmd_compare(args: argparse.Namespace) -> int:
    report, baseline = load_report(args.report), load_report(args.baseline)
    regressions = compare_to_baseline(report, baseline, args.tolerance)
    failures = baseline_failures(report, baseline, args.tolerance, allow_new=args.allow_new)
    new, gone = unmatched(report, baseline)
    for line in failures:
        _say(line)
    if args.allow_new:
        for record in new:
            _say(f"not in baseline (allowed): {record['nodeid']} [{record['label']}]")
    for record in gone:
        _say(f"missing from report: {record['nodeid']} [{record['label']}]")
    compared = len(report["campaigns"]) - len(new)
    _say(f"{compared} campaigns compared with tolerance {args.tolerance:g}: {len(regressions)} regressions, "
         f"{len(failures) - len(regressions)} not comparable")
    return 1 if failures else 0


def _cmd_plot(args: argparse.Namespace) -> int:
    path = plot_report(load_report(args.report), Path(args.output))
    _say(f"wrote {path}")
    return 0


def _cmd_html(args: argparse.Namespace) -> int:
    from .html import write_html

    report = load_report(args.report)
    path = write_html(report["campaigns"], Path(args.output), report["environment"])
    _say(f"wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_hwfault.report",
        description="Inspect, merge, compare, plot and render (HTML) pytest-hwfault JSON reports. Exit codes: 0 "
                    "ok, 1 gate failed (merge: a campaign did not pass; compare: a regression or a campaign not "
                    "compared), 2 usage or file error.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = commands.add_parser("show", help="print the summary table of a report")
    show.add_argument("report", help="REPORT.json")
    show.add_argument("-v", "--verbose", action="store_true", help="also print the message of every non-pass")
    show.set_defaults(func=_cmd_show)

    merge = commands.add_parser(
        "merge", help="merge partial (shard) reports; exit 1 unless every campaign passes",
        description="Merge partial reports, e.g. of CI shards run with --hwfault-shard 1/2 and 2/2: the trials of "
                    "each campaign are united and its verdict recomputed. Exits 1 if any merged campaign is not "
                    "'pass' (fail, invalid, incomplete, or inconclusive unless --allow-inconclusive), else 0. "
                    "Parts that cannot come from one run are refused (exit 2).")
    merge.add_argument("reports", nargs="+", help="partial REPORT.json files")
    merge.add_argument("-o", "--output", help="write the merged report here")
    merge.add_argument("--allow-inconclusive", action="store_true",
                       help="count 'inconclusive' (budget spent without a decision) as passing")
    merge.add_argument("--allow-mixed-versions", action="store_true",
                       help="merge parts made by different pytest-hwfault or torch versions")
    merge.add_argument("-v", "--verbose", action="store_true", help="also print the message of every non-pass")
    merge.set_defaults(func=_cmd_merge)

    compare = commands.add_parser(
        "compare", help="compare a report with a baseline; exit 1 on a regression or a campaign not compared")
    compare.add_argument("report", help="REPORT.json")
    compare.add_argument("baseline", help="BASELINE.json (a report saved earlier)")
    compare.add_argument("--tolerance", type=parse_tolerance, default=DEFAULT_TOLERANCE,
                         help=f"allowed accuracy drop before a campaign counts as regressed "
                              f"(default {DEFAULT_TOLERANCE:g}, as --hwfault-compare-tolerance)")
    compare.add_argument("--allow-new", action="store_true",
                         help="campaigns the baseline lacks pass (default: they fail, as nothing was compared)")
    compare.set_defaults(func=_cmd_compare)

    plot = commands.add_parser("plot", help="plot accuracy vs BER and per-layer scales (needs matplotlib)")
    plot.add_argument("report", help="REPORT.json")
    plot.add_argument("-o", "--output", required=True, help="OUT.png")
    plot.set_defaults(func=_cmd_plot)

    page = commands.add_parser("html", help="write one self-contained HTML page of a report (as --hwfault-html)")
    page.add_argument("report", help="REPORT.json")
    page.add_argument("-o", "--output", required=True, help="OUT.html")
    page.set_defaults(func=_cmd_html)
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
    except (ReportError, OSError, ImportError, ValueError, RecursionError, OverflowError, MemoryError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2

