"""Run a benchmark script in several fresh processes and report each ratio's spread across them.

    python benchmarks/across_processes.py --processes 3 -- benchmarks/bench_kernels.py --rounds 5 --threads 2

On the development machines a ratio differs more between processes than between rounds of one process: the
allocator's page faults (glibc's adaptive mmap and trim thresholds) land differently in each process, on both sides
of a ratio, and a figure one process meets another misses. This runs the script (which must take `--json PATH`)
once per process, one after the other, and prints for every ratio in its JSON (a numeric value whose key names a
ratio, at any depth) each process's figure and their median: the figure to quote where one process's is not enough.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import environment, machine_line, save_json  # benchmarks/_common.py, beside this script


def ratios(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key path, value) of every number in `value` whose own key, or its parent's, names a ratio (the
    scripts' `targets` left out: constants)."""
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if inner == "targets":
                continue
            if isinstance(item, (int, float)) and not isinstance(item, bool) and (
                    "ratio" in str(key) or "_vs_" in str(key) or "ratio" in path.rsplit(".", 1)[-1]):
                yield inner, float(item)
            else:
                yield from ratios(item, inner)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3, help="fresh processes, run one after the other")
    parser.add_argument("--json", help="save every process's ratios and their medians to this file")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- then the benchmark script and its arguments")
    args = parser.parse_args(argv)
    command = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not command or args.processes < 1:
        parser.error("give --processes >= 1 and, after --, a benchmark script that takes --json")
    per_process: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.processes):
            out = Path(tmp) / f"process{index}.json"
            print(f"process {index + 1} of {args.processes}: {' '.join(command)}", flush=True)
            subprocess.run([sys.executable, *command, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
            per_process.append(dict(ratios(json.loads(out.read_text()))))
    keys = [key for key in per_process[0] if all(key in p for p in per_process)]
    medians = {key: statistics.median(p[key] for p in per_process) for key in keys}
    print(f"{' '.join(command)}: {args.processes} processes")
    print(machine_line())
    for key in keys:
        figures = ", ".join(f"{p[key]:.3f}" for p in per_process)
        print(f"  {key:<60} median {medians[key]:.3f}  ({figures})")
    result = {"benchmark": "across_processes", "command": command, "processes": args.processes,
              "per_process": per_process, "medians": medians, **environment()}
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
