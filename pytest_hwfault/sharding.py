"""Split one campaign over xdist workers and CI machines without changing a number.

A campaign's result is a function of its trial prefix, so executors only decide *which process computes which
trial*. Under xdist every campaign becomes S shard items (one per worker, or ``--hwfault-xdist-shards``); the
shards claim trial indices one at a time from a shared run directory (so an idle shard steals work and nobody
computes far past the deciding checkpoint), publish each finished trial there, and stop as soon as the published
prefix decides, so every shard ends knowing the verdict; the last shard to finish carries it. Before any trial,
each shard records the fingerprints of the model and data it built: shards that disagree fail the campaign instead
of merging trials of different models. A CI shard (``--hwfault-shard K/M``) computes trials i with i % M == K-1
and leaves the verdict to ``python -m pytest_hwfault.report merge``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the plugin imports this module at start-up: keep torch out of it
    from .campaign import Campaign, CampaignResult, TrialResult

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
    """Files shared by the shards of one campaign: what they saw, a claim counter, published trials, finished
    shards. Every write is atomic (a temporary file renamed into place), and a counter that cannot be read (a torn
    write by a killed process) only costs duplicated trials, never a wrong one: trials are deterministic."""

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

    def _write(self, target: Path, text: str) -> None:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)

    def agree(self, identity: dict[str, Any]) -> str | None:
        """Record what this shard saw (model and data fingerprints), or compare it with what the first shard
        recorded. Returns the problem when they differ (and records it for the other shards), else None."""
        with self._locked():
            first = self.path / "identity.json"
            if not first.exists():
                self._write(first, json.dumps(identity, sort_keys=True))
                return self.problem()
            seen = json.loads(first.read_text())
            if {k: seen.get(k) for k in IDENTITY_KEYS} != {k: identity.get(k) for k in IDENTITY_KEYS}:
                self._write(self.path / "problem.txt", _mismatch(seen, identity))
            return self.problem()

    def problem(self) -> str | None:
        path = self.path / "problem.txt"
        return path.read_text() if path.exists() else None

    def claim(self, allowed: list[int], done: Container[int] = ()) -> int | None:
        """The next unclaimed trial of `allowed` (ascending) that is not in `done`, or None when all are taken."""
        with self._locked():
            counter = self.path / "claimed"
            try:
                taken = int(counter.read_text()) if counter.exists() else 0
            except ValueError:  # torn: start over; published trials are skipped, the rest recomputed identically
                taken = 0
            while taken < len(allowed) and allowed[taken] in done:
                taken += 1
            if taken >= len(allowed):
                return None
            self._write(counter, str(taken + 1))
            return allowed[taken]

    def publish(self, trial: TrialResult) -> None:
        self._write(self.path / "trials" / f"{trial.trial}.json", json.dumps(trial.to_dict()))

    def collect(self, into: CampaignResult) -> CampaignResult:
        """Add the trials published so far (and not yet in `into`) to `into`."""
        from .campaign import TrialResult

        for entry in os.scandir(self.path / "trials"):
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                index = int(entry.name[:-5])
                if index not in into.trials:
                    into.trials[index] = TrialResult.from_dict(json.loads(Path(entry.path).read_text()))
        return into

    def finish(self, shard: int, running: Sequence[int]) -> bool:
        """Mark shard `shard` done; True for exactly one shard: the last of the shards `running` (those the
        session selected: -k, --lf or --deselect may leave some out) to finish."""
        with self._locked():
            (self.path / f"done-{shard}").touch()
            return all((self.path / f"done-{i}").exists() for i in running)


IDENTITY_KEYS = ("model", "data")


def _mismatch(first: dict[str, Any], other: dict[str, Any]) -> str:
    def seen(identity: dict[str, Any]) -> str:
        accuracy = identity.get("float_accuracy")
        shown = "" if accuracy is None else f", float accuracy {accuracy:.4f}"
        return (f"shard {identity.get('shard', '?')}: model {str(identity.get('model'))[:12]}, "
                f"data {str(identity.get('data'))[:12]}{shown}")

    what = " and ".join({"model": "models", "data": "data"}[k] for k in IDENTITY_KEYS if first.get(k) != other.get(k))
    return (f"the shards of this campaign saw different {what}: "
            f"{seen(first)}; {seen(other)}. Their trials cannot be merged into one verdict. Every xdist worker "
            "builds the model and data itself, so building them must give the same result on every worker: seed "
            "the model's construction (torch.manual_seed), keep training independent of the thread count "
            "(torch.set_num_threads(1) while training; workers run fewer threads than -n 0), or load a "
            "checkpoint.")


@dataclass
class Part:
    """What one shard knows at the end: the campaign's trials (decided unless a CI slice or a problem), whether
    it is the last shard to finish (the one that carries the verdict), and any problem."""

    result: CampaignResult
    last: bool
    problem: str | None


def take_part(run_dir: RunDir, campaign: Campaign, allowed: list[int], shard: int, running: Sequence[int]
              ) -> Part:
    """Claim, compute and publish trials until the published trials decide the campaign (or every allowed trial
    is published); `running`: the campaign's shards this session runs, the last of which carries the verdict.
    When every trial is claimed but some are still in flight on other shards, compute them too (identically, as
    trials are deterministic): no shard ever waits for another, so a shard queued behind this one on the same
    worker, or a crashed one, cannot stall it, and every shard ends knowing the verdict."""
    shared = campaign.empty_result()
    identity = {**shared.identity, "shard": shard, "float_accuracy": shared.float_accuracy}
    problem = run_dir.agree(identity)
    start = time.perf_counter()
    while problem is None and not run_dir.collect(shared).decided():
        index = run_dir.claim(allowed, shared.trials)
        if index is None:  # all claimed: take over the ones still in flight elsewhere
            index = next((i for i in allowed if i not in shared.trials), None)
            if index is None:
                break
        trial = shared.trials[index] = campaign.trial(index)
        run_dir.publish(trial)
        problem = run_dir.problem()
    shared.seconds = time.perf_counter() - start
    last = run_dir.finish(shard, running)
    return Part(shared, last, problem or run_dir.problem())
