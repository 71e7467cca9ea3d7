"""Unit tests of the executors' room: CI slices, campaign names, the run directory and a shard's part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from pytest_hwfault.campaign import Campaign
from pytest_hwfault.gate import ModelCache, prepare
from pytest_hwfault.sharding import RunDir, Slice, campaign_name, shard_id, take_part
from pytest_hwfault.spec import CampaignSpec


@given(count=st.integers(1, 9), budget=st.integers(1, 80))
def test_slices_partition_the_trials(count: int, budget: int) -> None:
    parts = [Slice(k, count).trials(budget) for k in range(1, count + 1)]
    assert sorted(i for part in parts for i in part) == list(range(budget))


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0", ""])
def test_bad_slices_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Slice.parse(text)


def test_slice_parse() -> None:
    assert Slice.parse(" 2/4 ") == Slice(2, 4)


@pytest.mark.parametrize(("nodeid", "name"), [
    ("t.py::test_x", "t.py::test_x"),
    (f"t.py::test_x[{shard_id(2, 3)}]", "t.py::test_x"),
    (f"t.py::test_x[act-ber1e-05-{shard_id(1, 2)}]", "t.py::test_x[act-ber1e-05]"),
    ("t.py::test_x[act-ber1e-05]", "t.py::test_x[act-ber1e-05]"),
])
def test_campaign_name_drops_only_the_shard_id(nodeid: str, name: str) -> None:
    assert campaign_name(nodeid) == name


def test_run_dir_claims_each_trial_once_and_names_one_last_finisher(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path, "c")
    claimed = [run_dir.claim([4, 5, 6, 7]) for _ in range(5)]
    assert claimed == [4, 5, 6, 7, None]
    assert [run_dir.finish(shard, (1, 2, 3)) for shard in (2, 1, 3)] == [False, False, True]


def test_run_dir_agreement(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path, "c")
    seen = {"model": "m1", "data": "d1", "shard": 1, "float_accuracy": 0.9}
    assert run_dir.agree(seen) is None
    assert run_dir.agree({**seen, "shard": 2}) is None  # the same model and data from another shard
    problem = run_dir.agree({**seen, "model": "m2", "shard": 3, "float_accuracy": 0.8})
    assert problem is not None and "saw different models" in problem and "seed" in problem
    assert "shard 1: model m1" in problem and "shard 3: model m2" in problem
    assert run_dir.problem() == problem and run_dir.agree(seen) == problem  # every shard learns it


def _campaign(seed: int = 0) -> Campaign:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4)).eval()
        x = torch.randn(96, 16)
    y = model(x).argmax(1).detach()
    spec = CampaignSpec(site="act", ber=3e-3, min_acc=0.5, budget=16, first=4)
    prepared = prepare(model, (x, y), samples=None, bits=8, cache=ModelCache(), device=torch.device("cpu"))
    return Campaign(prepared.qmodel, prepared.inputs, prepared.labels, spec, "t.py::test", identity=prepared.identity)


def test_every_shard_ends_knowing_the_verdict_of_a_single_run(tmp_path: Path) -> None:
    single = _campaign().run().trimmed()
    first = take_part(RunDir(tmp_path, "c"), _campaign(), list(range(16)), 1, (1, 2))
    second = take_part(RunDir(tmp_path, "c"), _campaign(), list(range(16)), 2, (1, 2))
    assert not first.last and second.last and first.problem is None and second.problem is None
    for part in (first, second):
        assert part.result.trimmed().to_dict() | {"seconds": 0} == single.to_dict() | {"seconds": 0}


def test_a_shard_takes_over_trials_in_flight_elsewhere(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path, "c")
    assert [run_dir.claim(list(range(16))) for _ in range(16)] == list(range(16))  # a crashed shard claimed all
    part = take_part(run_dir, _campaign(), list(range(16)), 1, (1, 2))
    assert part.result.decided() and not part.last  # it computed them itself; the other shard never finishes


def test_shards_of_different_models_fail_the_campaign(tmp_path: Path) -> None:
    take_part(RunDir(tmp_path, "c"), _campaign(seed=0), list(range(16)), 1, (1, 2))
    part = take_part(RunDir(tmp_path, "c"), _campaign(seed=1), list(range(16)), 2, (1, 2))
    assert part.problem is not None and "saw different models and data" in part.problem
