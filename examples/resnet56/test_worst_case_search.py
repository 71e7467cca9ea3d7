"""Placeholder for the worst-case search example (pytest_hwfault.search, docs/search.md), on the example's models.

A campaign (test_resilience.py) measures the *average* accuracy under random bit flips; a search asks whether *any*
pattern of at most k faults takes the accuracy below a threshold, and shrinks the first one it finds. This file only
shows the marker-driven call on the vanilla model: one weight bit flip, a small hypothesis budget, a fixed seed
(which also keeps hypothesis's example database out of it). The search engine is new; read docs/search.md (its API,
its power, its costs) before building a release gate on it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")

from pytest_hwfault import resilience  # noqa: E402


@resilience(search="weight", max_flips=1, max_drop=0.25, examples=40, samples=128, seed=0)
def test_no_single_weight_flip_is_fatal(hwfault, models, val_data, calibration):
    hwfault.search(models["vanilla"].model, val_data, calibration_data=calibration)
