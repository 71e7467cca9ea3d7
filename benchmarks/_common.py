"""What every benchmark script records beside its figures, so that a saved result says where it came from."""

from __future__ import annotations

import json
import os
import platform
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
