"""``python -m pytest_hwfault.report {show,merge,compare,plot}``: read, merge, compare and plot reports."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .baseline import compare_to_baseline, unmatched
from .document import VERDICTS, ReportError, load_report, write_report
from .merge import merge_reports
from .plot import plot_report
from .text import failure_message, format_table


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

