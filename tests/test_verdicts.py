"""The one verdict policy: what each verdict means for a test, a session and a merge."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_hwfault.verdicts import VERDICTS, VerdictPolicy

TABLE = {  # verdict -> outcome under (default, inconclusive passes, CI slice)
    "pass": ("pass", "pass", "pass"),
    "fail": ("fail", "fail", "fail"),
    "inconclusive": ("fail", "pass", "fail"),
    "incomplete": ("fail", "fail", "deferred"),
    "invalid": ("fail", "fail", "fail"),
}


@pytest.mark.parametrize("verdict", VERDICTS)
def test_each_verdict_under_each_policy(verdict: str) -> None:
    policies = (VerdictPolicy(), VerdictPolicy(inconclusive_passes=True), VerdictPolicy(partial=True))
    assert tuple(policy.outcome(verdict) for policy in policies) == TABLE[verdict]
    assert set(TABLE) == set(VERDICTS)


@given(verdict=st.text(), inconclusive=st.booleans(), partial=st.booleans())
def test_nothing_unknown_ever_passes(verdict: str, inconclusive: bool, partial: bool) -> None:
    policy = VerdictPolicy(inconclusive_passes=inconclusive, partial=partial)
    if verdict not in ("pass", "inconclusive", "incomplete"):
        assert policy.outcome(verdict) == "fail" and policy.fails(verdict)
    if verdict == "invalid":
        assert policy.fails(verdict)
