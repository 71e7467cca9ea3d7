"""Placeholder for the worst-case search example (pytest_hwfault.search, docs/search.md), on the example's models.

A campaign (test_resilience.py) measures the *average* accuracy under random bit flips; a search asks whether *any*
pattern of at most k faults takes the accuracy below a threshold, and shrinks the first one it finds. This file only
shows the call on the vanilla model: one weight bit flip, a small hypothesis budget, a fixed seed. The search
engine is new; see docs/search.md for its API, its power and its costs before building a release gate on it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")
search = pytest.importorskip("pytest_hwfault.search")


@pytest.mark.usefixtures("campaigns_enabled")
def test_no_single_weight_flip_is_fatal(hwfault, models, val_data, calibration):
    qmodel = hwfault.quantize(models["vanilla"].model, calibration)
    result = search.search_faults(qmodel, val_data, site="weight", max_flips=1, max_drop=0.25, examples=40,
                                  samples=128, seed=0, name="examples/resnet56::single-weight-flip")
    assert not result.found, result.message
