"""What every benchmark script records beside its figures, so that a saved result says where it came from."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# the instruction sets that decide how fast oneDNN's int8 kernels run (AMX tiles, VNNI dot products)
INT8_FLAGS = ("amx_int8", "amx_tile", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def cpu() -> dict[str, Any]:
    """The CPU's model name and its int8-relevant instruction sets, from /proc/cpuinfo where there is one: the
    development machine has been an Intel CPU with AMX and an AMD EPYC without, and the int8 path's figures differ
    between them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu_model": platform.processor() or None, "int8_flags": []}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name"), "int8_flags": [flag for flag in INT8_FLAGS if flag in flags]}


def machine_line() -> str:
    """One line naming the CPU, for the head of a benchmark's printout."""
    info = cpu()
    return f"  on {info['cpu_model'] or 'an unknown CPU'} ({', '.join(info['int8_flags']) or 'no int8 extensions'}), " \
        f"{os.cpu_count()} CPUs, torch {torch.__version__}"


def environment(*dists: str) -> dict[str, Any]:
    """Versions (torch, python, pytest-hwfault and `dists`) and the machine: compare figures only between runs
    whose machine (CPU model and instruction sets included) matches."""
    versions = {"torch": torch.__version__, "python": platform.python_version(),
                **{dist: package_version(dist) for dist in ("pytest-hwfault", *dists)}}
    return {"versions": versions, "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "platform": platform.platform(), "node": platform.node(),
            "cpu_count": os.cpu_count(), **cpu()}


def save_json(path: str | None, result: dict[str, Any]) -> None:
    """Write `result` to `path` (the script's --json), if given."""
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_rounds(variants: Mapping[str, Callable[[], object]], baseline: Callable[[], object], rounds: int
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Times of each variant and of the baseline run right next to it, over `rounds` rounds. The pair's order
    alternates between rounds: whichever runs second in a pair is measurably slower or faster on these machines
    (allocator and cache state), and alternating cancels that bias out of the median per-round ratio."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    baseline_times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            if r % 2 == 0:
                baseline_times[name].append(seconds(baseline))
                times[name].append(seconds(fn))
            else:
                times[name].append(seconds(fn))
                baseline_times[name].append(seconds(baseline))
    return times, baseline_times
