"""The seed study's plumbing: the natural-image stand-in, the plan of runs and its checkpoints, the report's statistics.

Fast (no campaign, no training): runs with or without --hwfault.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from data import PHOTO_CLASSES, PHOTO_TEST, PHOTO_TRAIN, _crops, photos_32x32
from report import Paired, Point, _pack, mcnemar
from study import CHECKPOINTS, HEADLINE_DEPTH, SEEDS, STAND_INS, plan
from train import RECIPES, checkpoint_name, parse, parse_eps


# -- the photos stand-in ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos():
    return photos_32x32()


def test_photos_split_has_cifar_shape_and_balanced_classes(photos) -> None:
    assert photos.x_train.shape == (PHOTO_TRAIN * len(PHOTO_CLASSES), 3, 32, 32)
    assert photos.x_test.shape == (PHOTO_TEST * len(PHOTO_CLASSES), 3, 32, 32)
    assert 0.0 <= float(photos.x_train.min()) and float(photos.x_train.max()) <= 1.0
    assert torch.bincount(photos.y_train).tolist() == [PHOTO_TRAIN] * len(PHOTO_CLASSES)
    assert torch.bincount(photos.y_test).tolist() == [PHOTO_TEST] * len(PHOTO_CLASSES)
    assert len(set(photos.y_test[:40].tolist())) >= 8  # interleaved: a prefix covers (nearly) every class
    assert photos.x_train.std() > 0.1  # natural images, not blank crops


def test_photos_split_is_the_same_on_every_load(photos) -> None:
    again = photos_32x32()
    assert torch.equal(again.x_train, photos.x_train) and torch.equal(again.y_test, photos.y_test)


def test_crops_stay_inside_their_columns() -> None:
    # a photo whose left part is 0 and right part is 1: train-side crops must be all 0, test-side ones all 1
    photo = torch.zeros(3, 120, 200)
    photo[:, :, 150:] = 1.0
    generator = torch.Generator().manual_seed(0)
    left = _crops(photo, 30, (0, 150), generator)
    right = _crops(photo, 30, (150, 200), generator)
    assert float(left.max()) == 0.0 and float(right.min()) == 1.0


# -- the plan and its checkpoints ------------------------------------------------------------------------------------
def test_plan_runs_are_distinct_and_their_commands_name_their_checkpoints() -> None:
    runs = plan()
    assert len({run.stem for run in runs}) == len(runs)
    for run in runs:
        args = parse(run.argv()[1:])
        assert checkpoint_name(args.recipe, args.depth, args.data, args.seed, args.weight_decay, args.eps) == run.stem
    for data in STAND_INS:
        headline = {(r.recipe, r.seed) for r in runs if r.data == data and r.depth == HEADLINE_DEPTH[data]
                    and r.eps is None and r.weight_decay is None}
        assert headline >= {(recipe, seed) for recipe in RECIPES for seed in SEEDS}


@pytest.mark.parametrize("text", ["0", "-0.1", "1.5", "8/0", "eight", "8/255/2"])
def test_bad_eps_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--eps"):
        parse_eps(text)


def test_committed_checkpoints_carry_the_provenance_of_their_run() -> None:
    trained = [run for run in plan() if run.trained]
    assert any(run.depth == 56 for run in trained)
    for run in trained:
        p = json.loads((CHECKPOINTS / f"{run.stem}.json").read_text())
        assert p["checkpoint"] == f"{run.stem}.pt"
        assert (p["recipe"]["name"], p["depth"], p["seed"]) == (run.recipe, run.depth, run.seed)
        assert p["recipe"]["weight_decay"] == run.effective_weight_decay
        assert math.isclose(p["pgd"]["eps"], run.effective_eps) and p["pgd"]["steps"] == 7
        assert p["data"] == run.data and p["threads"] == 1
        assert p["clean_accuracy"] > 0.15, run.stem  # above chance (10%): strong-eps runs barely train (RESULTS.md)


# -- the report's statistics -----------------------------------------------------------------------------------------
def test_paired_seed_statistics_agree_with_scipy() -> None:
    from scipy import stats

    a, b = [0.9, 0.85, 0.88], [0.7, 0.72, 0.69]
    d = Paired(tuple(x - y for x, y in zip(a, b)))
    assert math.isclose(d.p, stats.ttest_rel(a, b).pvalue, rel_tol=1e-9)
    low, high = d.interval()
    assert low < d.mean < high and low > 0
    assert d.verdict(+1) == "holds" and d.verdict(-1) == "reversed"
    noisy = Paired((0.05, -0.04, 0.01))
    assert noisy.verdict(+1).startswith("not significant (same direction, 2 of 3 seeds agree")


def test_mcnemar_counts_only_discordant_pairs() -> None:
    def point(mask: list[bool]) -> Point:
        return Point(1e-3, sum(mask) / len(mask), 0.0, 1.0, 1.0, _pack(mask))

    same = point([True, False, True, True])
    assert mcnemar(same, same) == 1.0
    assert point([True, False, False]).mask() == [True, False, False]  # leading bits survive the packing
    better, worse = point([True] * 20), point([False] * 20)
    assert mcnemar(better, worse) == pytest.approx(2 / 2**20)


def test_spearman_p_value_is_exact_for_a_short_sweep() -> None:
    from report import spearman

    rho, p = spearman([1e-4, 5e-4, 1e-3, 5e-3, 1e-2], [0.05, 0.045, 0.043, 0.033, 0.021])
    assert rho == pytest.approx(-1.0) and p == pytest.approx(2 / 120)  # 2 of the 5! orderings are as extreme
    rho, p = spearman([1, 2, 3, 4, 5], [1, 2, 3, 5, 4])
    assert rho == pytest.approx(0.9) and p == pytest.approx(10 / 120)
