"""JSON reports of fault campaigns, one module per output (as pytest-benchmark lays out its own):

- :mod:`.document`: campaign records, the JSON schema and its validator, atomic write, validated load;
- :mod:`.merge`: partial reports (shards, CI slices) merged into the report one full run would give;
- :mod:`.baseline`: named baselines, comparison against them;
- :mod:`.text`: the terminal table and the failure message;
- :mod:`.plot`: accuracy-vs-BER and per-layer-scale plots (the ``plots`` extra);
- :mod:`.cli`: ``python -m pytest_hwfault.report {show,merge,compare,plot}``.

Nothing here imports pytest; torch is imported only to merge, matplotlib only to plot.
"""

from __future__ import annotations

from .baseline import Regression, compare_to_baseline, load_baseline, save_baseline, unmatched
from .cli import main
from .document import (
    REPORT_JSON_SCHEMA,
    REPORT_SCHEMA,
    REPORT_VERSION,
    VERDICTS,
    ReportError,
    build_report,
    campaign_record,
    environment,
    load_report,
    validate_report,
    write_report,
)
from .merge import merge_reports
from .plot import plot_report
from .text import failure_message, format_table

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
