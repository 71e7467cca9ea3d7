"""What every benchmark script records beside its figures, so that a saved result says where it came from."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

import torch


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(*dists: str) -> dict[str, Any]:
    """Versions (torch, python, pytest-hwfault and `dists`) and the machine: compare figures only between runs
    whose machine matches."""
    versions = {"torch": torch.__version__, "python": platform.python_version(),
                **{dist: package_version(dist) for dist in ("pytest-hwfault", *dists)}}
    return {"versions": versions, "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "platform": platform.platform(), "node": platform.node(),
            "cpu_count": os.cpu_count()}


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
