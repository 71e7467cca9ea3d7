"""Simulated campaigns: the sequential plan's wrong-verdict rate stays within alpha, and peeking without
alpha spending (binomial gate) or with a fixed-n interval (bounded gate) does not.

Transient sites: Clopper-Pearson with alpha spending across looks. Weight site: the betting confidence sequence,
valid at every trial count at once, judged at the full alpha at every look; here its coverage (the true mean inside
the CS at every checkpoint of a stream), its wrong-verdict rate and its speed to a verdict are simulated, with the
distribution-free limit on that speed.

Every simulation is seeded (one ``random.Random`` per campaign, so two decision rules can be run on identical data)
and sized to finish in a few seconds on one core. Rates are compared with binomial bounds at the 1e-3 level, so a
pass is not luck of the seed, and a broken guarantee (e.g. alpha not split across looks) fails by a wide margin, as
the negative controls show.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable
from functools import cache

import pytest
from scipy import stats as sps

from pytest_hwfault.stats import SequentialPlan, Verdict, _excludes, clopper_pearson_interval, t_interval

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
M = 64  # images per trial
REQUIRED = 0.80
CAMPAIGNS = 1000
PLAN = SequentialPlan(confidence=CONFIDENCE, first=4, budget=256)  # looks at 4, 8, ..., 256 trials

# A look's verdict from the data seen so far: (trials, cumulative successes or per-trial values) -> Verdict.
Decide = Callable[[int, int], Verdict]


@cache
def _cdf_table(m: int, p: float) -> tuple[float, ...]:
    """Cumulative Binomial(m, p) probabilities, for exact inverse-CDF draws of a trial's correct-image count."""
    total, table = 0.0, []
    for k in range(m + 1):
        total += math.comb(m, k) * p**k * (1 - p) ** (m - k)
        table.append(total)
    return tuple(table)


def _draw(rng: random.Random, table: tuple[float, ...]) -> int:
    """One trial: the number of successes among len(table) - 1 Bernoulli images (same law as summing them)."""
    return min(bisect.bisect_right(table, rng.random() * table[-1]), len(table) - 1)


def _upper_count(n: int, rate: float) -> int:
    """Largest count still consistent (at the 1e-3 level) with a true rate <= ``rate``."""
    return int(sps.binom.isf(1e-3, n, rate))


def _rate_lower_bound(count: int, n: int) -> float:
    """One-sided 99.9% lower confidence bound on a rate (scipy, independent of the module)."""
    return float(sps.binomtest(count, n).proportion_ci(confidence_level=0.998, method="exact").low)


# ----------------------------------------------------------------------------------------------------------------
# transient sites: pooled binomial counts


def _run_binomial(p: float, decide: Decide, seed: int, plan: SequentialPlan = PLAN) -> list[tuple[Verdict, int]]:
    """Campaigns of M Bernoulli(p) images per trial; each stops at its first decisive look."""
    table = _cdf_table(M, p)
    results = []
    for campaign in range(CAMPAIGNS):
        rng = random.Random(seed * 1_000_003 + campaign)
        successes, trials = 0, 0
        verdict = Verdict.INCONCLUSIVE
        for checkpoint in plan.checkpoints():
            while trials < checkpoint:
                successes += _draw(rng, table)
                trials += 1
            verdict = decide(trials, successes)
            if verdict is not Verdict.INCONCLUSIVE:
                break
        results.append((verdict, trials))
    return results


@cache
def _sequential(trials: int, successes: int) -> Verdict:
    return PLAN.decide_binomial(successes, trials * M, trials, REQUIRED).verdict


@cache
def _naive(trials: int, successes: int) -> Verdict:
    """The mistake the plan prevents: a full-alpha 95% interval at every look."""
    low, high = clopper_pearson_interval(successes, trials * M, CONFIDENCE)
    return Verdict.PASS if low >= REQUIRED else Verdict.FAIL if high < REQUIRED else Verdict.INCONCLUSIVE


# p within 0.03 standard errors of the threshold even at the last look (sd of the pooled mean there is 0.0031):
# the hardest case for the guarantee, since almost every miss of the interval turns into a wrong verdict.
NEAR = [pytest.param(0.7999, Verdict.PASS, id="p=0.7999-wrong-is-PASS"),
        pytest.param(0.8001, Verdict.FAIL, id="p=0.8001-wrong-is-FAIL")]


@cache
def _near_results(p: float, rule: str) -> tuple[tuple[Verdict, int], ...]:
    decide = _sequential if rule == "sequential" else _naive
    return tuple(_run_binomial(p, decide, seed=7))


@pytest.mark.parametrize(("p", "wrong"), NEAR)
def test_wrong_verdicts_within_alpha_near_threshold(p: float, wrong: Verdict) -> None:
    results = _near_results(p, "sequential")
    n_wrong = sum(v is wrong for v, _ in results)
    # The documented guarantee: P(any look gives a wrong verdict) <= alpha ...
    assert n_wrong <= _upper_count(CAMPAIGNS, ALPHA)
    # ... and, since only one side of the two-sided interval can produce this wrong verdict, <= alpha / 2.
    assert n_wrong <= _upper_count(CAMPAIGNS, ALPHA / 2)
    # The simulation is not vacuous: the guarantee is nearly used up (exact value about 0.018 for both p).
    assert n_wrong >= 5
    assert all(t in PLAN.checkpoints() for _, t in results)


@pytest.mark.parametrize(("p", "wrong"), NEAR)
def test_negative_control_full_alpha_at_every_look_exceeds_alpha(p: float, wrong: Verdict) -> None:
    """Same campaigns (same seeds), judged without alpha spending: the error rate must clearly exceed alpha."""
    naive = _near_results(p, "naive")
    n_wrong = sum(v is wrong for v, _ in naive)
    assert _rate_lower_bound(n_wrong, CAMPAIGNS) > ALPHA  # exact value about 0.10
    sequential = _near_results(p, "sequential")
    assert sum(v is wrong for v, _ in sequential) < n_wrong


@pytest.mark.parametrize(("p", "expected"), [(0.95, Verdict.PASS), (0.65, Verdict.FAIL)])
def test_far_from_threshold_decides_at_first_or_second_look(p: float, expected: Verdict) -> None:
    results = _run_binomial(p, _sequential, seed=11)
    assert all(v is expected for v, _ in results)
    mean_trials = sum(t for _, t in results) / len(results)
    assert mean_trials <= PLAN.checkpoints()[1]


def test_three_points_above_threshold_stops_well_before_budget() -> None:
    # p = 0.83 vs 0.80: a fixed design would need the whole budget's precision; the plan stops around 32-64 trials
    results = _run_binomial(0.83, _sequential, seed=13)
    wrong = sum(v is Verdict.FAIL for v, _ in results)
    assert wrong <= _upper_count(CAMPAIGNS, ALPHA / 2)
    assert sum(v is Verdict.PASS for v, _ in results) >= 0.99 * CAMPAIGNS
    assert sum(t for _, t in results) / len(results) <= 64


# ----------------------------------------------------------------------------------------------------------------
# weight site: one value (the trial's accuracy) per trial


def _mixture_sampler(components: list[tuple[float, float]]) -> Callable[[random.Random], float]:
    """Trial accuracy = Binomial(M, p_trial) / M, p_trial drawn from weighted components (weight, p_trial).

    A persistent fault set is shared by the trial's images, so p_trial varies from trial to trial; a minority of
    "catastrophic" trials (a high bit of a large weight) makes the distribution skewed, as in real weight campaigns.
    """
    weights, tables = [], []
    total = 0.0
    for weight, p_trial in components:
        total += weight
        weights.append(total)
        tables.append(_cdf_table(M, p_trial))

    def sample(rng: random.Random) -> float:
        table = tables[min(bisect.bisect_right(weights, rng.random() * total), len(tables) - 1)]
        return _draw(rng, table) / M

    return sample


BoundedDecide = Callable[[list[float]], Verdict]


def _run_bounded(
    sample: Callable[[random.Random], float], decide: BoundedDecide, seed: int, plan: SequentialPlan,
    campaigns: int = CAMPAIGNS,
) -> list[tuple[Verdict, int]]:
    results = []
    for campaign in range(campaigns):
        rng = random.Random(seed * 1_000_003 + campaign)
        values: list[float] = []
        verdict = Verdict.INCONCLUSIVE
        for checkpoint in plan.checkpoints():
            while len(values) < checkpoint:
                values.append(sample(rng))
            verdict = decide(values)
            if verdict is not Verdict.INCONCLUSIVE:
                break
        results.append((verdict, len(values)))
    return results


# 90% benign trials at 0.85, 10% catastrophic at 0.35: mean exactly 0.80
SKEWED = [(0.9, 0.85), (0.1, 0.35)]
SKEWED_MEAN = 0.9 * 0.85 + 0.1 * 0.35


def _naive_t(required: float) -> BoundedDecide:
    """Common practice that the plan replaces: a 95% Student t interval at every look."""

    def decide(values: list[float]) -> Verdict:
        low, high = t_interval(values, CONFIDENCE)
        return Verdict.PASS if low >= required else Verdict.FAIL if high < required else Verdict.INCONCLUSIVE

    return decide


@pytest.mark.parametrize(("required", "wrong"), [(SKEWED_MEAN + 1e-4, Verdict.PASS),
                                                 (SKEWED_MEAN - 1e-4, Verdict.FAIL)])
def test_bounded_wrong_verdicts_within_alpha_near_threshold(required: float, wrong: Verdict) -> None:
    sample = _mixture_sampler(SKEWED)
    results = _run_bounded(sample, lambda v: PLAN.decide_bounded(v, required).verdict, seed=17, plan=PLAN)
    n_wrong = sum(v is wrong for v, _ in results)
    assert n_wrong <= _upper_count(CAMPAIGNS, ALPHA / 2)
    # Within 1e-4 of the threshold no method can tell the sides apart in 256 trials (sd of the mean there: 0.01):
    # the CS almost never commits, and then mostly by luck in either direction.
    assert sum(v is Verdict.INCONCLUSIVE for v, _ in results) >= 0.95 * CAMPAIGNS


def test_bounded_negative_control_t_interval_peeking_is_wrong_too_often() -> None:
    """Why the weight site needs a distribution-free bound: with skewed trial accuracies a t interval, judged at
    every look, PASSes a model whose mean is below the threshold far more often than alpha (a few early trials
    without a catastrophic fault look tight and high)."""
    sample = _mixture_sampler(SKEWED)
    required = SKEWED_MEAN + 1e-4
    naive = _run_bounded(sample, _naive_t(required), seed=17, plan=PLAN)
    n_wrong = sum(v is Verdict.PASS for v, _ in naive)
    assert _rate_lower_bound(n_wrong, CAMPAIGNS) > ALPHA


def test_bounded_far_from_threshold_decides_early() -> None:
    """With trial accuracies near 0.97 against a 0.5 floor the verdict comes at the second look of a plan that starts
    at 8 trials. No valid distribution-free method can decide from 4 trials here: a law that is 0 with probability
    0.48 and 0.97 otherwise has mean 0.5 and shows four high trials with probability 0.07 > alpha_0."""
    sample = _mixture_sampler([(0.8, 0.98), (0.2, 0.94)])
    plan = SequentialPlan(confidence=CONFIDENCE, first=8, budget=256)
    results = _run_bounded(sample, lambda v: plan.decide_bounded(v, 0.5).verdict, seed=19, plan=plan)
    assert all(v is Verdict.PASS for v, _ in results)
    assert sum(t for _, t in results) / len(results) <= plan.checkpoints()[1]
    # and the far FAIL side mirrors it
    low_sample = _mixture_sampler([(0.8, 0.03), (0.2, 0.08)])
    results = _run_bounded(low_sample, lambda v: plan.decide_bounded(v, 0.5).verdict, seed=23, plan=plan)
    assert all(v is Verdict.FAIL for v, _ in results)
    assert sum(t for _, t in results) / len(results) <= plan.checkpoints()[1]


# ----------------------------------------------------------------------------------------------------------------
# weight site: coverage of the betting confidence sequence

COVERAGE_STREAMS = 1000


def _beta_law(a: float, b: float) -> Callable[[random.Random], float]:
    return lambda rng: rng.betavariate(a, b)


def _two_point_law(rng: random.Random) -> float:
    """10% catastrophic trials at 0.2, the rest at 0.9 (mean 0.83): the skew that fools a t interval."""
    return 0.2 if rng.random() < 0.1 else 0.9


def _near_constant_law(center: float) -> Callable[[random.Random], float]:
    return lambda rng: center + rng.uniform(-0.005, 0.005)


COVERAGE_LAWS = [
    pytest.param(_beta_law(8, 2), 0.8, id="beta(8,2)"),
    pytest.param(_two_point_law, 0.83, id="two-point-10%-at-0.2"),
    pytest.param(_near_constant_law(0.95), 0.95, id="0.95+-0.005"),
]

Misses = Callable[[list[float], float], bool]  # (observations so far, true mean) -> the interval misses the mean


@cache
def _streams_missing_the_mean(law: Callable[[random.Random], float], mean: float, misses: Misses, seed: int) -> int:
    """Streams (of PLAN's budget) in which the interval misses the true mean at one checkpoint or more."""
    missed = 0
    for stream in range(COVERAGE_STREAMS):
        rng = random.Random(seed * 1_000_003 + stream)
        values = [law(rng) for _ in range(PLAN.budget)]
        if any(misses(values[:checkpoint], mean) for checkpoint in PLAN.checkpoints()):
            missed += 1
    return missed


def _betting_misses(values: list[float], mean: float) -> bool:
    """The mean is outside the CS at n exactly when a capital process has rejected it at some s <= n; tests/
    test_stats.py checks that decide_bounded's bounds are the edges of that set. Unlike decide_bounded, which reports
    an empty CS as [0, 1], this counts an empty CS as the miss it is."""
    return any(_excludes(values, ALPHA, mean))


def _t_misses(values: list[float], mean: float) -> bool:
    low, high = t_interval(values, CONFIDENCE)
    return not low <= mean <= high


@pytest.mark.parametrize(("law", "mean"), COVERAGE_LAWS)
def test_betting_cs_covers_the_mean_at_every_checkpoint(law: Callable[[random.Random], float], mean: float) -> None:
    """The documented guarantee, P(exists n: mean not in CS_n) <= alpha, with the full alpha at every look."""
    missed = _streams_missing_the_mean(law, mean, _betting_misses, seed=29)
    assert missed <= _upper_count(COVERAGE_STREAMS, ALPHA)


def test_betting_cs_coverage_is_not_vacuous() -> None:
    """On the two-point law the CS misses in about 2.3% of streams: about half of alpha is used, so the coverage
    test above has little slack to hide a CS that is too narrow."""
    missed = _streams_missing_the_mean(_two_point_law, 0.83, _betting_misses, seed=29)
    assert _rate_lower_bound(missed, COVERAGE_STREAMS) > ALPHA / 5


def test_betting_cs_coverage_through_decide_bounded() -> None:
    """The same check through the public method on the first 200 two-point streams: the reported bounds miss the
    mean exactly when the capital processes reject it."""
    for stream in range(200):
        rng = random.Random(29 * 1_000_003 + stream)
        values = [_two_point_law(rng) for _ in range(PLAN.budget)]
        for checkpoint in PLAN.checkpoints():
            d = PLAN.decide_bounded(values[:checkpoint], 0.5)
            assert (not d.ci_low <= 0.83 <= d.ci_high) == _betting_misses(values[:checkpoint], 0.83)


def test_coverage_negative_control_t_interval_at_every_look() -> None:
    """Same harness, same streams, with a 95% t interval at every look: four benign trials in a row (probability
    0.66) give a zero-width interval at 0.9, so the miss rate is far above alpha."""
    missed = _streams_missing_the_mean(_two_point_law, 0.83, _t_misses, seed=29)
    assert _rate_lower_bound(missed, COVERAGE_STREAMS) > 5 * ALPHA


# ----------------------------------------------------------------------------------------------------------------
# weight site: trials to a verdict, and the distribution-free limit on them

DECISIVE_CAMPAIGNS = 200


def _trials_to_verdict(center: float, required: float) -> list[tuple[Verdict, int]]:
    """Campaigns of near-constant trial accuracies (center +- 0.005), 95%, looks at 4, 8, ..., 256 trials."""
    sample = _near_constant_law(center)
    results = []
    for campaign in range(DECISIVE_CAMPAIGNS):
        rng = random.Random(31 * 1_000_003 + campaign)
        values: list[float] = []
        verdict = Verdict.INCONCLUSIVE
        for checkpoint in PLAN.checkpoints():
            values.extend(sample(rng) for _ in range(checkpoint - len(values)))
            verdict = PLAN.decide_bounded(values, required).verdict
            if verdict is not Verdict.INCONCLUSIVE:
                break
        results.append((verdict, len(values)))
    return results


@pytest.mark.parametrize(
    ("center", "expected", "max_trials"),
    [
        pytest.param(0.77, Verdict.FAIL, 64, id="3-points-below"),
        pytest.param(0.70, Verdict.FAIL, 16, id="10-points-below"),
        pytest.param(0.83, Verdict.PASS, 128, id="3-points-above"),
        pytest.param(0.90, Verdict.PASS, 64, id="10-points-above"),
    ],
)
def test_bounded_trials_to_verdict_near_constant_accuracies(center: float, expected: Verdict,
                                                            max_trials: int) -> None:
    """Every campaign decides, correctly, at ``max_trials`` against a 0.80 floor. The empirical-Bernstein/Hoeffding
    gate with alpha spending that this replaced needed 1,024, 256, 1,024 and 256 trials for these four cases. PASS
    takes longer than FAIL: the next test shows why no valid gate can PASS the 3- and 10-point cases by 64 and 16."""
    results = _trials_to_verdict(center, REQUIRED)
    assert all(v is expected for v, _ in results)
    trials = [t for _, t in results]
    assert max(trials) <= max_trials
    assert sum(trials) / len(trials) == max_trials  # and not earlier: the doubling grid lands every campaign here


@pytest.mark.parametrize(("center", "first_possible"), [(0.83, 128), (0.90, 32)])
def test_no_valid_gate_passes_earlier(center: float, first_possible: int) -> None:
    """The distribution-free limit. Mix the near-constant law P (mean ``center``) with a point mass at 0 of weight
    q = 1 - 0.80/center + 1e-3: the mixture P' has mean below 0.80, and its first n trials all come from P with
    probability (1-q)^n. A gate that PASSes P by n trials with probability pi therefore PASSes P' wrongly with
    probability >= pi (1-q)^n; a wrong-PASS rate <= alpha/2 (half of alpha for each direction, as here) forces
    pi <= alpha / (2 (1-q)^n). At the look before ``first_possible`` no such gate PASSes even half the time (one
    that spent all of alpha on wrong PASSes: at most 56% and 34%); from ``first_possible`` on, nothing forbids PASSing
    every time. This gate PASSes at 128 and 64 (previous test). And P' is not a straw man: run on it, the betting
    gate PASSes wrongly within alpha/2."""
    q = 1 - REQUIRED / center + 1e-3
    looks = PLAN.checkpoints()
    before = looks[looks.index(first_possible) - 1]
    assert ALPHA / 2 / (1 - q) ** before < 0.5
    assert ALPHA / (1 - q) ** before < 0.6
    assert ALPHA / 2 / (1 - q) ** first_possible >= 1.0
    sample = _near_constant_law(center)

    def mixture(rng: random.Random) -> float:
        return 0.0 if rng.random() < q else sample(rng)

    results = _run_bounded(mixture, lambda v: PLAN.decide_bounded(v, REQUIRED).verdict, seed=37, plan=PLAN,
                           campaigns=DECISIVE_CAMPAIGNS)
    assert sum(v is Verdict.PASS for v, _ in results) <= _upper_count(DECISIVE_CAMPAIGNS, ALPHA / 2)
