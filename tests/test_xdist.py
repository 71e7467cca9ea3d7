"""One campaign over xdist workers and CI shards: the same numbers for any split (pytester, subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from suites import DIGITS_CONFTEST

pytest.importorskip("xdist")

SUITE = '''
from pytest_hwfault import resilience

@resilience(ber=3e-3, site=["act", "weight"], min_acc=0.9, budget=32)
def test_grid(hwfault, model, val_data):
    hwfault.assess(model, val_data)

@resilience(ber=1e-3, site="act", min_acc=0.97, budget=16)
def test_strict(hwfault, model, val_data):
    hwfault.assess(model, val_data)
'''

NUMBERS = ("verdict", "trials", "accuracy", "ci_low", "ci_high", "float_accuracy", "quantized_accuracy",
           "critical_rate", "nonfinite", "faults_per_trial")


def _numbers(path: Path) -> dict[str, dict]:
    campaigns = json.loads(path.read_text())["campaigns"]
    return {c["campaign_id"]: {**{k: c[k] for k in NUMBERS}, "raw": c["result"]["trials"]} for c in campaigns}


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(DIGITS_CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def _run(pytester: pytest.Pytester, report: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "--hwfault", f"--hwfault-report={report}",
                                         *args)


def test_same_numbers_for_any_number_of_workers(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    results = {}
    for label, args in {"n0": ("-n", "0"), "n2": ("-n", "2"), "n3": ("-n", "3", "--dist", "worksteal"),
                        "noxdist": ("-p", "no:xdist"), "whole": ("-n", "2", "--hwfault-xdist-shards=1")}.items():
        # -n 0 on every core (this suite's own xdist workers pass one thread on), the workers on their share
        monkeypatch.setenv("OMP_NUM_THREADS", str(os.cpu_count() or 1) if label == "n0" else "1")
        run = _run(suite, f"{label}.json", *args)
        assert run.ret == 1, run.stdout.str()  # some gates fail
        results[label] = _numbers(suite.path / f"{label}.json")
        failing = sum(c["verdict"] != "pass" for c in results[label].values())
        if label == "whole":  # --hwfault-xdist-shards=1: no shard items, each campaign whole on one worker
            outcome = run.parseoutcomes()
            assert (outcome["passed"], outcome["failed"], outcome.get("skipped", 0)) == (3 - failing, failing, 0)
            assert "[3 items]" in run.stdout.str() and "shard1of" not in run.stdout.str()
        if label in ("n2", "n3"):
            count = 2 if label == "n2" else 3
            outcome = run.parseoutcomes()
            # every campaign is `count` shard items; a failing gate is exactly one failed item, its other shards
            # stop where it stops (skipped, naming the shard that reports it)
            assert outcome["failed"] == failing and outcome.get("skipped", 0) == failing * (count - 1), outcome
            assert outcome["passed"] == 3 * count - failing * count, outcome
            run.stdout.fnmatch_lines([f"PASSED test_suite.py::test_grid?act-ber0.003-shard1of{count}?"])
    assert len(results["n0"]) == 3
    verdicts = {c["verdict"] for c in results["n0"].values()}
    assert "pass" in verdicts and len(verdicts) > 1  # a passing and a failing gate
    for label in ("n2", "n3", "noxdist", "whole"):
        assert results[label] == results["n0"], label


def test_rerunning_only_some_shards_gives_the_campaigns_verdict(suite: pytest.Pytester) -> None:
    """`--lf` after a failing gate reruns only the shard item that failed (the others were skipped): the campaign
    was 'incomplete, lost shard(s) [1] (a worker crashed)' and the failure was not reproduced. The shards a
    session selects (-k, --lf, --deselect) are the campaign's: the last of them carries the verdict, the same
    numbers as the whole run; only a selected shard that reports nothing is lost."""
    # the cache provider on, as users run it
    first = suite.runpytest_subprocess("-rA", "--hwfault", "-n", "2", "--hwfault-report=whole.json")
    assert first.ret == 1
    numbers = _numbers(suite.path / "whole.json")
    failing = {k: c for k, c in numbers.items() if c["verdict"] != "pass"}
    assert failing and len(failing) < len(numbers)
    assert first.parseoutcomes()["failed"] == len(failing), first.stdout.str()  # one shard item per campaign
    rerun = suite.runpytest_subprocess("-rA", "--hwfault", "-n", "2", "--lf", "--hwfault-report=lf.json")
    assert rerun.ret == 1
    assert rerun.parseoutcomes() == {"failed": len(failing)}, rerun.stdout.str()
    assert "lost shard" not in rerun.stdout.str() and "INCOMPLETE" not in rerun.stdout.str()
    assert _numbers(suite.path / "lf.json") == failing
    # one shard chosen with -k: the campaign complete, its numbers the whole run's
    chosen = _run(suite, "k.json", "-n", "2", "-k", "test_strict and shard2of2")
    assert chosen.ret == 1 and "lost shard" not in chosen.stdout.str()
    strict = _numbers(suite.path / "k.json")
    assert len(strict) == 1 and strict.items() <= numbers.items()


def test_ci_shards_merge_to_the_single_run(suite: pytest.Pytester) -> None:
    full = _run(suite, "full.json")
    part1 = _run(suite, "p1.json", "--hwfault-shard=1/2")
    part2 = _run(suite, "p2.json", "--hwfault-shard", "2/2")
    assert full.ret == 1
    assert part1.ret == 0 and part2.ret == 0  # a CI slice defers its verdicts to the merge
    part1.stdout.fnmatch_lines(["*INCOMPLETE*"])
    merge = subprocess.run(
        [sys.executable, "-m", "pytest_hwfault.report", "merge", "p1.json", "p2.json", "-o", "merged.json"],
        cwd=suite.path, capture_output=True, text=True,
    )
    assert merge.returncode == 1, merge.stdout + merge.stderr  # test_strict fails: the merged gate fails
    merged = _numbers(suite.path / "merged.json")
    single = _numbers(suite.path / "full.json")
    assert merged == single


@pytest.mark.slow  # ~1 min more: xdist's own popen gateways, beyond -n
def test_gateways_give_the_same_numbers(suite: pytest.Pytester) -> None:
    single = _run(suite, "single.json", "-n", "0")
    gateways = _run(suite, "tx.json", "--tx", "2*popen", "--dist", "load")
    assert single.ret == gateways.ret == 1
    assert _numbers(suite.path / "tx.json") == _numbers(suite.path / "single.json")


def test_lost_shard_fails_the_campaign(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(DIGITS_CONFTEST + '''

BOMB = {"armed": False, "calls": 0}  # module state, not the model's: both shards build the same model


class Bomb(nn.Module):
    """Kills its process at its 6th forward pass when armed (calibration and baselines come first)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        BOMB["calls"] += 1
        if BOMB["armed"] and BOMB["calls"] > 6:
            import os
            os._exit(3)
        return self.net(x)
''')
    pytester.makepyfile(test_crash='''
from conftest import BOMB, Bomb
from pytest_hwfault import resilience

@resilience(ber=1e-3, site="act", min_acc=0.5, budget=64, first=64)
def test_gate(hwfault, model, val_data, request):
    BOMB["armed"] = request.node.name.endswith("shard2of2]")
    hwfault.assess(Bomb(model), val_data)
''')
    run = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hwfault", "-n", "2",
                                        "--hwfault-report=crash.json")
    assert run.ret != 0
    out = run.stdout.str()
    assert "crashed" in out
    # whenever the crash comes, the surviving shard finishes every trial itself, yet the campaign lost a shard
    run.stdout.fnmatch_lines(["*lost shard(s) [[]2[]]*incomplete and fails*"])
    campaigns = json.loads((pytester.path / "crash.json").read_text())["campaigns"]
    assert len(campaigns) == 1 and campaigns[0]["verdict"] == "incomplete"


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_xdist_shards_are_a_usage_error(pytester: pytest.Pytester, value: str) -> None:
    run = pytester.runpytest("-p", "no:cacheprovider", "--hwfault", f"--hwfault-xdist-shards={value}")
    assert run.ret == pytest.ExitCode.USAGE_ERROR
    run.stderr.fnmatch_lines([f"*--hwfault-xdist-shards*{value!r}*'workers' or a positive integer*"])
