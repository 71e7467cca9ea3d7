"""Split one campaign over xdist workers and CI machines without changing a number.

A campaign's result is a function of its trial prefix, so executors only decide *which process computes which
trial*. Under xdist every campaign becomes S shard items; the shards claim trial indices one at a time from a
shared run directory (so an idle shard steals work and nobody computes far past the deciding checkpoint), publish
each finished trial there, and stop as soon as the published prefix decides. The last shard to finish merges
everything and carries the verdict. A CI shard (``--hwfault-shard K/M``) computes trials i with i % M == K-1 and
leaves the verdict to ``python -m pytest_hwfault.report merge``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the plugin imports this module at start-up: keep torch out of it
    from .campaign import CampaignResult, TrialResult

_SHARD_ID = re.compile(r"-?shard\d+of\d+")


def shard_id(index: int, count: int) -> str:
    return f"shard{index}of{count}"


def campaign_name(nodeid: str) -> str:
    """The nodeid without its shard id: the name (and so the campaign id) is the same for every -n."""
    if not nodeid.endswith("]") or "[" not in nodeid:
        return nodeid
    head, _, params = nodeid[:-1].rpartition("[")
    params = _SHARD_ID.sub("", params).strip("-")
    return f"{head}[{params}]" if params else head


@dataclass(frozen=True)
class Slice:
    """The trials of a campaign this process may compute: those with i % count == index - 1."""

    index: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 1 <= K <= M")

    def trials(self, budget: int) -> list[int]:
        return list(range(self.index - 1, budget, self.count))

    @classmethod
    def parse(cls, text: str) -> Slice:
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not match:
            raise ValueError(f"{text!r} is not K/M (e.g. 1/2)")
        return cls(int(match.group(1)), int(match.group(2)))


class RunDir:
    """Files shared by the shards of one campaign: a claim counter, published trials, finished shards."""

    def __init__(self, root: Path, campaign_id: str) -> None:
        self.path = root / campaign_id
        (self.path / "trials").mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path / "lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def claim(self, allowed: list[int]) -> int | None:
        """The next unclaimed trial of `allowed` (ascending), or None when all are taken."""
        with self._locked():
            counter = self.path / "claimed"
            taken = int(counter.read_text()) if counter.exists() else 0
            if taken >= len(allowed):
                return None
            counter.write_text(str(taken + 1))
            return allowed[taken]

    def publish(self, trial: TrialResult) -> None:
        target = self.path / "trials" / f"{trial.trial}.json"
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(trial.to_dict()))
        os.replace(tmp, target)

    def collect(self, into: CampaignResult) -> CampaignResult:
        """Add the trials published so far (and not yet in `into`) to `into`."""
        from .campaign import TrialResult

        for entry in os.scandir(self.path / "trials"):
            if entry.name.endswith(".json"):
                index = int(entry.name[:-5])
                if index not in into.trials:
                    into.trials[index] = TrialResult.from_dict(json.loads(Path(entry.path).read_text()))
        return into

    def finish(self, shard: int, count: int) -> bool:
        """Mark shard `shard` done; True for exactly one shard: the last of `count` to finish."""
        with self._locked():
            (self.path / f"done-{shard}").touch()
            return sum(1 for i in range(1, count + 1) if (self.path / f"done-{i}").exists()) == count
