"""`from pytest_hwfault import resilience`: the marker, with its arguments checked when the module is imported."""

from __future__ import annotations

from typing import Any

import pytest

from .spec import expand, expand_search

MARKER = "resilience"
MARKER_HELP = (
    "resilience(ber, site, min_acc=None, max_drop=None, bits=8, kind='flip', bit_positions=None, layers=None, "
    "confidence=0.95, budget=64, samples=None, seed=0, min_coverage=1.0): gate this test on accuracy under "
    "hardware bit flips; "
    "run with --hwfault"
)


def resilience(**kwargs: Any) -> pytest.MarkDecorator:
    """``pytest.mark.resilience``, checked eagerly: a bad argument fails at import, naming it."""
    if "search" in kwargs:
        expand_search(kwargs)
    else:
        expand(kwargs)
    return getattr(pytest.mark, MARKER)(**kwargs)
