"""The verdict policy: what a campaign's verdict means for a test, a session and a merge (one place, no deps).

A campaign ends in one of five verdicts. ``pass`` and ``fail`` are decisions. ``inconclusive`` (the budget was spent
with the interval still around the threshold) fails unless the user opted in (``--hwfault-inconclusive=pass``,
``merge --allow-inconclusive``). ``incomplete`` (trials missing before a checkpoint: a lost shard) fails, except in
a CI slice (``--hwfault-shard K/M``), where it is the expected state and the merge decides. ``invalid`` (the parts of
one campaign saw different models or data, or the campaign could not be judged) always fails. Nothing unknown
ever passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

VERDICTS = ("pass", "fail", "inconclusive", "incomplete", "invalid")
Outcome = Literal["pass", "fail", "deferred"]


@dataclass(frozen=True)
class VerdictPolicy:
    """How verdicts count: used by the fixture (the test's outcome), the controller (the session's exit status)
    and the CLI's merge (its exit code)."""

    inconclusive_passes: bool = False
    partial: bool = False  # a CI slice: its campaigns are incomplete by design; the merge carries the verdict

    def outcome(self, verdict: str) -> Outcome:
        if verdict == "pass":
            return "pass"
        if verdict == "inconclusive" and self.inconclusive_passes:
            return "pass"
        if verdict == "incomplete" and self.partial:
            return "deferred"
        return "fail"  # fail, invalid, incomplete, inconclusive (not opted in), and anything unknown

    def fails(self, verdict: str) -> bool:
        return self.outcome(verdict) == "fail"
