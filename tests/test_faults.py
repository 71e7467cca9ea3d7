"""Fault models, patterns and sampling (pytest_hwfault.faults): validation, serialisation, seeding and the
statistics of sampled patterns (scipy serves as the oracle of the distributions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from pytest_hwfault.bits import Kind
from pytest_hwfault.faults import (
    Fault,
    FaultModel,
    FaultPattern,
    FaultTarget,
    LayerFaults,
    Site,
    bernoulli_positions,
    sample_pattern,
    trial_generator,
    trial_seed,
)
from pytest_hwfault.inject import check_bounds

ALPHA = 1e-3  # every goodness-of-fit test below runs on a fixed seed; this only says how strict each one is


pytestmark = pytest.mark.usefixtures("single_threaded")  # tiny tensors: one thread is fastest


def _binomial_gof_pvalue(counts: list[int], n: int, p: float) -> float:
    """Chi-square goodness of fit of `counts` to Binomial(n, p), bins merged until each expects >= 5."""
    counts_a = np.asarray(counts)
    lo, hi = int(stats.binom.ppf(1e-6, n, p)), int(stats.binom.ppf(1 - 1e-6, n, p))
    ks = np.arange(lo, hi + 1)
    expected = np.concatenate([[stats.binom.cdf(lo - 1, n, p)], stats.binom.pmf(ks, n, p), [stats.binom.sf(hi, n, p)]])
    observed = np.concatenate([[np.sum(counts_a < lo)], [np.sum(counts_a == k) for k in ks], [np.sum(counts_a > hi)]])
    expected = expected / expected.sum() * len(counts_a)
    obs_bins, exp_bins, o_acc, e_acc = [], [], 0.0, 0.0
    for o, e in zip(observed, expected):
        o_acc, e_acc = o_acc + o, e_acc + e
        if e_acc >= 5:
            obs_bins.append(o_acc)
            exp_bins.append(e_acc)
            o_acc = e_acc = 0.0
    obs_bins[-1] += o_acc
    exp_bins[-1] += e_acc
    assert len(obs_bins) >= 4, "too few bins for a meaningful test"
    return float(stats.chisquare(obs_bins, exp_bins).pvalue)


def _uniform_pvalue(values: list[int], weights: list[float]) -> float:
    counts = Counter(values)
    observed = [counts.get(i, 0) for i in range(len(weights))]
    total = sum(observed)
    expected = [w / sum(weights) * total for w in weights]
    assert min(expected) >= 5
    return float(stats.chisquare(observed, expected).pvalue)


# -- FaultModel ------------------------------------------------------------------------------------------------------
def test_fault_model_normalises_its_fields() -> None:
    model = FaultModel("weight", 1e-3, "stuck1", bit_positions=[7, 0, 3], layers="layer1.*")
    assert model.site is Site.WEIGHT
    assert model.kind is Kind.STUCK1
    assert model.bit_positions == (0, 3, 7)
    assert model.layers == ("layer1.*",)
    assert FaultModel(Site.ACT, 0).ber == 0.0 and isinstance(FaultModel(Site.ACT, 1).ber, float)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"site": "bus", "ber": 0.1}, "'bus' is not a fault site; allowed: 'act', 'weight', 'acc', 'input'"),
        ({"site": "act", "ber": 0.1, "kind": "flop"}, "is not a fault kind; allowed: 'flip', 'stuck0', 'stuck1'"),
        ({"site": "act", "ber": -0.1}, "must be a number in [0, 1]"),
        ({"site": "act", "ber": 1.5}, "must be a number in [0, 1]"),
        ({"site": "act", "ber": True}, "must be a number in [0, 1]"),
        ({"site": "act", "ber": "0.1"}, "must be a number in [0, 1]"),
        ({"site": "act", "ber": 0.1, "bit_positions": []}, "non-empty list of bit indices in [0, 48)"),
        ({"site": "act", "ber": 0.1, "bit_positions": [48]}, "non-empty list of bit indices in [0, 48)"),
        ({"site": "act", "ber": 0.1, "bit_positions": [-1]}, "non-empty list of bit indices in [0, 48)"),
        ({"site": "act", "ber": 0.1, "bit_positions": [1, 1]}, "repeats a bit"),
    ],
)
def test_fault_model_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        FaultModel(**kwargs)
    assert message in str(info.value)


def test_bit_positions_beyond_the_code_width_are_rejected_when_sampling() -> None:
    target = FaultTarget(Site.ACT, "conv", 10, 8)
    model = FaultModel(Site.ACT, 0.5, bit_positions=(3, 8))
    with pytest.raises(ValueError, match=r"bit_positions \[8\] do not exist in the 8-bit act codes of layer 'conv'"):
        sample_pattern(model, [target], 2, torch.Generator().manual_seed(0))


# -- FaultPattern construction and serialisation ---------------------------------------------------------------------
FAULTS = [
    Fault("act", "fc", 3, 7, "flip", 0),
    ("weight", "conv", 17, 2, "stuck1"),
    Fault("act", "fc", 3, 7, "flip", 0),  # the same fault twice: kept, in order
    ("acc", "conv", 100, 31, "flip", 5),
    ("input", "fc", 0, 0, "stuck0", 1),
    Fault("act", "fc", 9, 1, "stuck0", 0),
]


def test_from_faults_keeps_every_fault() -> None:
    pattern = FaultPattern.from_faults(FAULTS)
    assert len(pattern) == 6 and bool(pattern)
    assert sorted(pattern.to_list()) == sorted(f if isinstance(f, Fault) else Fault(*f) for f in FAULTS)
    assert pattern.has_weight_faults()
    assert pattern.images_with_faults().tolist() == [0, 1, 5]
    assert not FaultPattern() and len(FaultPattern()) == 0
    assert not FaultPattern.from_faults([("act", "fc", 0, 0, "flip", 0)]).has_weight_faults()


def test_pattern_round_trips_through_json_and_lists() -> None:
    pattern = FaultPattern.from_faults(FAULTS)
    rows = pattern.to_json()
    assert all(isinstance(r, list) and len(r) == 6 for r in rows)
    text = json.dumps(rows)
    again = FaultPattern.from_json(json.loads(text))
    assert again.to_json() == rows
    assert FaultPattern.from_faults(pattern.to_list()).to_json() == rows
    weight_row = next(r for r in rows if r[0] == "weight")
    assert weight_row == ["weight", "conv", 17, 2, "stuck1", None]


def test_order_of_faults_on_one_code_survives_serialisation() -> None:
    faults = [("act", "fc", 4, 2, "stuck1", 3), ("act", "fc", 1, 0, "flip", 0), ("act", "fc", 4, 2, "flip", 3)]
    rows = FaultPattern.from_faults(faults).to_json()
    on_code = [r for r in rows if r[2] == 4]
    assert [r[4] for r in on_code] == ["stuck1", "flip"]
    assert FaultPattern.from_json(rows).to_json() == rows


@pytest.mark.parametrize(
    "fault, message",
    [
        (("act", "fc", 0, 0, "flip"), "needs an image"),
        (("input", "fc", 0, 0, "flip", None), "needs an image"),
        (("weight", "fc", 0, 0, "flip", 0), "give no image"),
        (("act", "fc", -1, 0, "flip", 0), "must be non-negative"),
        (("act", "fc", 0, -1, "flip", 0), "must be non-negative"),
        (("act", "fc", 0, 0, "flip", -2), "must be non-negative"),
        (("wire", "fc", 0, 0, "flip", 0), "not a fault site"),
        (("act", "fc", 0, 0, "toggle", 0), "not a fault kind"),
    ],
)
def test_from_faults_rejects_malformed_faults(fault: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultPattern.from_faults([fault])


def test_fault_repr_is_pasteable() -> None:
    fault = Fault("act", "layer1.0.conv1", 12, 3, "flip", 7)
    assert eval(repr(fault), {"Fault": Fault}) == fault  # noqa: S307 - the repr is meant to be pasted into tests
    weight = Fault("weight", "fc", 1, 2, "stuck0")
    assert eval(repr(weight), {"Fault": Fault}) == weight  # noqa: S307


# -- sampling: distributions -----------------------------------------------------------------------------------------
def _draw(model: FaultModel, targets: list[FaultTarget], n_images: int, trials: int, seed: int) -> list[FaultPattern]:
    generator = torch.Generator().manual_seed(seed)
    return [sample_pattern(model, targets, n_images, generator) for _ in range(trials)]


@pytest.mark.parametrize(
    "numel, bits, n_images, ber",
    [
        (100, 8, 10, 1e-3),  # mean 8 faults
        (1000, 8, 50, 5e-4),  # mean 200 faults
        (50_000, 32, 64, 1e-6),  # many bits, rare faults: mean ~102
    ],
)
def test_number_of_faults_is_binomial(numel: int, bits: int, n_images: int, ber: float) -> None:
    target = FaultTarget(Site.ACT, "layer", numel, bits)
    patterns = _draw(FaultModel(Site.ACT, ber), [target], n_images, trials=800, seed=11)
    counts = [len(p) for p in patterns]
    n = numel * bits * n_images
    assert _binomial_gof_pvalue(counts, n, ber) > ALPHA
    assert abs(np.mean(counts) - n * ber) < 5 * np.sqrt(n * ber * (1 - ber) / len(counts))


def test_total_faults_over_several_layers_are_binomial_in_all_bits() -> None:
    targets = [
        FaultTarget(Site.INPUT, "a", 300, 8),
        FaultTarget(Site.INPUT, "b", 50, 4),
        FaultTarget(Site.INPUT, "c", 1000, 16),
    ]
    n_images, ber = 8, 2e-4
    patterns = _draw(FaultModel(Site.INPUT, ber), targets, n_images, trials=1000, seed=12)
    n = sum(t.numel * t.bits for t in targets) * n_images
    assert _binomial_gof_pvalue([len(p) for p in patterns], n, ber) > ALPHA


def test_weight_faults_are_binomial_over_the_weight_bits_only() -> None:
    # weights are shared by every image: n_images must not multiply the number of bits at risk
    target = FaultTarget(Site.WEIGHT, "w", 2000, 8)
    patterns = _draw(FaultModel(Site.WEIGHT, 1e-3), [target], 64, trials=1000, seed=13)
    assert _binomial_gof_pvalue([len(p) for p in patterns], 2000 * 8, 1e-3) > ALPHA
    for p in patterns[:50]:
        assert all(f.image is None and f.site == "weight" for f in p.to_list())


def test_fault_positions_are_uniform_over_images_layers_bits_and_indices() -> None:
    targets = [FaultTarget(Site.ACT, "small", 40, 8), FaultTarget(Site.ACT, "big", 160, 8)]
    n_images = 16
    patterns = _draw(FaultModel(Site.ACT, 2e-3), targets, n_images, trials=400, seed=14)
    faults = [f for p in patterns for f in p.to_list()]
    assert len(faults) > 3000
    assert _uniform_pvalue([f.image for f in faults], [1.0] * n_images) > ALPHA
    assert _uniform_pvalue([f.bit for f in faults], [1.0] * 8) > ALPHA
    layer_ids = [0 if f.layer == "small" else 1 for f in faults]
    assert _uniform_pvalue(layer_ids, [40.0, 160.0]) > ALPHA  # in proportion to the layers' bits
    small = [f.index // 4 for f in faults if f.layer == "small"]  # 10 bins of 4 codes
    assert _uniform_pvalue(small, [1.0] * 10) > ALPHA
    assert all(0 <= f.index < (40 if f.layer == "small" else 160) for f in faults)


def test_faults_within_a_pattern_are_distinct_and_in_range() -> None:
    targets = [FaultTarget(Site.ACT, "a", 30, 4), FaultTarget(Site.ACT, "b", 7, 8)]
    for ber in (0.01, 0.3, 0.9):  # both the sparse and the dense way of drawing positions
        for pattern in _draw(FaultModel(Site.ACT, ber), targets, 5, trials=20, seed=15):
            keys = [(f.layer, f.image, f.index, f.bit) for f in pattern.to_list()]
            assert len(keys) == len(set(keys))
            for layer, image, index, bit in keys:
                assert 0 <= image < 5
                assert 0 <= index < (30 if layer == "a" else 7)
                assert 0 <= bit < (4 if layer == "a" else 8)


def test_ber_zero_gives_no_fault_and_ber_one_hits_every_selected_bit() -> None:
    target = FaultTarget(Site.ACT, "a", 6, 8)
    generator = torch.Generator().manual_seed(0)
    assert len(sample_pattern(FaultModel(Site.ACT, 0.0), [target], 3, generator)) == 0
    full = sample_pattern(FaultModel(Site.ACT, 1.0, "stuck0", bit_positions=(1, 6)), [target], 3, generator)
    keys = sorted((f.image, f.index, f.bit) for f in full.to_list())
    assert keys == [(i, j, b) for i in range(3) for j in range(6) for b in (1, 6)]
    assert {f.kind for f in full.to_list()} == {"stuck0"}


def test_bit_positions_restrict_the_faulty_bits() -> None:
    target = FaultTarget(Site.ACC, "a", 500, 32)
    patterns = _draw(FaultModel(Site.ACC, 0.01, bit_positions=(30, 31)), [target], 4, trials=30, seed=16)
    bits = Counter(f.bit for p in patterns for f in p.to_list())
    assert set(bits) == {30, 31}
    # the bits at risk are only those positions: 500 codes x 2 bits x 4 images
    assert abs(sum(bits.values()) / 30 - 500 * 2 * 4 * 0.01) < 4


def test_each_image_of_a_transient_site_gets_independent_faults() -> None:
    target = FaultTarget(Site.ACT, "a", 512, 8)
    pattern = sample_pattern(FaultModel(Site.ACT, 5e-3), [target], 64, torch.Generator().manual_seed(17))
    per_image: dict[int, set] = {}
    for f in pattern.to_list():
        per_image.setdefault(f.image, set()).add((f.index, f.bit))
    assert sorted(per_image) == list(range(64))  # every image is covered (mean ~20 faults each)
    sizes = [len(s) for s in per_image.values()]
    assert len(set(sizes)) > 5  # counts vary from image to image
    assert len({frozenset(s) for s in per_image.values()}) == 64  # no two images share their faults
    # per-image counts follow Binomial(512*8, ber): a seeded KS-style check on their mean and spread
    assert abs(np.mean(sizes) - 512 * 8 * 5e-3) < 3
    assert 2 < np.std(sizes) < 7


# -- seeding ---------------------------------------------------------------------------------------------------------
def test_same_generator_seed_gives_the_same_pattern_and_other_seeds_differ() -> None:
    targets = [FaultTarget(Site.ACT, "a", 256, 8), FaultTarget(Site.ACT, "b", 64, 8)]
    model = FaultModel(Site.ACT, 1e-3)
    first = sample_pattern(model, targets, 32, trial_generator(5, "campaign", 0))
    again = sample_pattern(model, targets, 32, trial_generator(5, "campaign", 0))
    assert first.to_json() == again.to_json() and len(first) > 0
    others = {json.dumps(sample_pattern(model, targets, 32, trial_generator(5, "campaign", t)).to_json())
              for t in range(1, 6)}
    others |= {json.dumps(sample_pattern(model, targets, 32, trial_generator(6, "campaign", 0)).to_json())}
    others |= {json.dumps(sample_pattern(model, targets, 32, trial_generator(5, "other", 0)).to_json())}
    assert json.dumps(first.to_json()) not in others
    assert len(others) == 7


def test_sampling_does_not_use_the_global_rng() -> None:
    targets = [FaultTarget(Site.ACT, "a", 256, 8)]
    model = FaultModel(Site.ACT, 1e-2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        first = sample_pattern(model, targets, 8, torch.Generator().manual_seed(3)).to_json()
        torch.manual_seed(2)
        second = sample_pattern(model, targets, 8, torch.Generator().manual_seed(3)).to_json()
    assert first == second


def test_trial_seed_depends_only_on_its_arguments() -> None:
    seed = trial_seed(0, "act@1e-3", 7)
    assert isinstance(seed, int) and 0 <= seed < 2**63
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        assert trial_seed(0, "act@1e-3", 7) == seed
    variants = {trial_seed(1, "act@1e-3", 7), trial_seed(0, "act@1e-4", 7), trial_seed(0, "act@1e-3", 8),
                trial_seed(0, "act@1e-3", 6)}
    assert seed not in variants and len(variants) == 4
    # no separator ambiguity: ("1", "2") and ("12", "") must not collide through string concatenation
    assert trial_seed(1, "2", 3) != trial_seed(12, "", 3) and trial_seed(1, "23", 4) != trial_seed(1, "2", 34)
    g1, g2 = trial_generator(0, "act@1e-3", 7), trial_generator(0, "act@1e-3", 7)
    assert torch.equal(torch.randint(1 << 30, (20,), generator=g1), torch.randint(1 << 30, (20,), generator=g2))
    assert trial_generator(0, "act@1e-3", 7).initial_seed() == seed


def test_trial_seed_is_the_same_in_another_process() -> None:
    code = "from pytest_hwfault.faults import trial_seed; print(trial_seed(3, 'camp', 11))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert int(out.stdout.strip()) == trial_seed(3, "camp", 11)


# -- the position sampler: a Bernoulli process drawn through its geometric gaps ---------------------------------------
@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 5000), p=st.floats(1e-4, 1.0), seed=st.integers(0, 2**32))
def test_bernoulli_positions_are_sorted_distinct_and_in_range(total: int, p: float, seed: int) -> None:
    drawn = bernoulli_positions(total, p, torch.Generator().manual_seed(seed))
    assert drawn.dtype == torch.int64
    assert bool((drawn[1:] > drawn[:-1]).all()) and (len(drawn) == 0 or 0 <= int(drawn[0]) <= int(drawn[-1]) < total)
    again = bernoulli_positions(total, p, torch.Generator().manual_seed(seed))
    assert torch.equal(drawn, again)
    if p == 1.0:
        assert drawn.tolist() == list(range(total))


def test_bernoulli_positions_include_each_position_with_probability_p_independently() -> None:
    # every position's inclusion frequency is p (a chi-square over positions), and the number drawn is Binomial,
    # also when the expected count is large enough that the sampler tops up its first chunk of gaps
    total, p, trials = 200, 0.05, 4000
    generator = torch.Generator().manual_seed(21)
    hits = torch.zeros(total)
    counts = []
    for _ in range(trials):
        drawn = bernoulli_positions(total, p, generator)
        hits[drawn] += 1
        counts.append(len(drawn))
    assert stats.chisquare(hits.numpy()).pvalue > ALPHA
    assert _binomial_gof_pvalue(counts, total, p) > ALPHA
    big = [len(bernoulli_positions(10**7, 1e-3, generator)) for _ in range(40)]
    assert abs(np.mean(big) - 1e4) < 5 * np.sqrt(1e4 * (1 - 1e-3) / 40)


def test_sampled_patterns_come_sorted_by_layer_image_and_code() -> None:
    # the order inject.compose's fast path relies on (codes grouped in runs, no sort)
    targets = [FaultTarget(Site.ACT, "a", 300, 8), FaultTarget(Site.ACT, "b", 50, 8)]
    for pattern in _draw(FaultModel(Site.ACT, 0.05, burst=2), targets, 6, trials=5, seed=22):
        for (_, layer), group in pattern.groups.items():
            key = group.image * 10**6 + group.index
            assert bool((key[1:] >= key[:-1]).all()), layer


def _decoded_by_hand(model: FaultModel, targets: list[FaultTarget], n_images: int, seed: int) -> list[tuple]:
    """The faults a Bernoulli draw over the targets' bit space means, decoded in Python ints: (site, layer, image,
    index, bit) in the space's order (target, image, code, bit)."""
    spaces = []
    for target in targets:
        starts = model.positions_for(target)
        spaces.append((target, starts, n_images if target.site.transient else 1))
    total = sum(t.numel * len(starts) * images for t, starts, images in spaces)
    faults = []
    for position in bernoulli_positions(total, model.ber, torch.Generator().manual_seed(seed)).tolist():
        for target, starts, images in spaces:
            size = target.numel * len(starts) * images
            if position < size:
                image, rest = divmod(position, target.numel * len(starts))
                index, which = divmod(rest, len(starts))
                for extra in range(model.burst):
                    faults.append((target.site.value, target.layer, image if target.site.transient else None, index,
                                   starts[which] + extra))
                break
            position -= size
    return faults


@settings(max_examples=60, deadline=None)
@given(numels=st.lists(st.integers(1, 40), min_size=1, max_size=4), site=st.sampled_from(["act", "weight", "acc"]),
       positions=st.sampled_from([None, (7,), (0, 3, 6), (1, 2)]), burst=st.sampled_from([1, 2]),
       n_images=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_sampled_faults_are_the_drawn_positions_decoded(numels: list[int], site: str, positions, burst: int,
                                                        n_images: int, seed: int) -> None:
    """sample_pattern's vectorised decode against plain integer arithmetic on the same draw, and the canonical flag
    (sorted by code, distinct bits, one kind) is set exactly when it holds."""
    bits = 32 if site == "acc" else 8
    targets = [FaultTarget(Site(site), f"layer{i}", numel, bits) for i, numel in enumerate(numels)]
    model = FaultModel(site, 0.05, bit_positions=positions, burst=burst)
    assume(positions != (7,) or burst == 1 or bits > 8)  # no room for the burst: refused (tested above)
    pattern = sample_pattern(model, targets, n_images, torch.Generator().manual_seed(seed))
    got = [(f.site, f.layer, f.image, f.index, f.bit) for f in pattern.faults()]
    assert got == _decoded_by_hand(model, targets, n_images, seed)
    for group in pattern.groups.values():
        assert group.canonical == (burst == 1)
        if group.canonical:
            key = (group.image * 10**6 + group.index) * 64 + group.bit
            assert bool((key[1:] > key[:-1]).all()) and len(set(group.kind.tolist())) == 1
    # what the sampler hands on: the bound its indices were drawn under, and row-major code positions
    for (_, layer), group in pattern.groups.items():
        numel = numels[int(layer.removeprefix("layer"))]
        assert group.index_bound == numel and int(group.index.max()) < numel
        if site != "weight":
            assert torch.equal(group.linear(numel), group.image * numel + group.index)
            assert torch.equal(group.linear(numel + 1), group.image * (numel + 1) + group.index)
            some = group.subset(group.index % 2 == 0)
            assert some.index_bound == numel and torch.equal(some.linear(numel), some.image * numel + some.index)


def test_an_index_bound_spares_the_bounds_check_only_where_it_proves_it() -> None:
    """`check_bounds` trusts a group's index_bound only when it is within the tensor's size; a group built by hand
    (no bound) is always looked at."""
    group = LayerFaults(torch.tensor([0, 0]), torch.tensor([3, 9]), torch.tensor([1, 2]), torch.tensor([0, 0]))
    with pytest.raises(IndexError, match="fault index 9 is out of range for here: allowed 0..4"):
        check_bounds(group, 5, "here")
    drawn = group.subset(torch.tensor([True, False]))
    drawn.index_bound = 4  # as the sampler marks what it drew from 4 codes
    check_bounds(drawn, 4, "here")
    check_bounds(drawn, 5, "here")
    group.index_bound = 10
    with pytest.raises(IndexError, match="fault index 9"):
        check_bounds(group, 5, "here")  # a bound above the size proves nothing
