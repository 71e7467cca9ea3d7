"""Unit and property tests for pytest_hwfault.stats; scipy serves only as an independent oracle."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from pytest_hwfault.stats import (
    Decision,
    SampleSize,
    SequentialPlan,
    Threshold,
    Verdict,
    _betting_cs,
    _CapitalProcesses,
    clopper_pearson_interval,
    leveugle_margin,
    leveugle_sample_size,
    normal_quantile,
    t_interval,
    wilson_interval,
)

CONFIDENCES = (0.5, 0.8, 0.9, 0.95, 0.99, 0.9999)


def _grid(ns: tuple[int, ...]) -> list[tuple[int, int]]:
    cases = []
    for n in ns:
        for k in sorted({0, 1, 2, n // 4, n // 2, n - 2, n - 1, n}):
            if 0 <= k <= n:
                cases.append((k, n))
    return cases


COUNT_GRID = _grid((1, 2, 3, 7, 20, 64, 256, 1000, 16384, 200_000))


# ----------------------------------------------------------------------------------------------------------------
# against scipy


@pytest.mark.parametrize("confidence", CONFIDENCES)
def test_clopper_pearson_matches_scipy(confidence: float) -> None:
    for k, n in COUNT_GRID:
        low, high = clopper_pearson_interval(k, n, confidence)
        ref = sps.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
        assert low == pytest.approx(ref.low, abs=1e-10), (k, n)
        assert high == pytest.approx(ref.high, abs=1e-10), (k, n)


def test_clopper_pearson_edges_are_exact() -> None:
    # k = 0 and k = n have closed forms; the interval must touch 0 / 1 exactly there.
    n, conf = 50, 0.95
    assert clopper_pearson_interval(0, n, conf) == (0.0, pytest.approx(1 - 0.025 ** (1 / n), abs=1e-15))
    assert clopper_pearson_interval(n, n, conf) == (pytest.approx(0.025 ** (1 / n), abs=1e-15), 1.0)
    assert clopper_pearson_interval(0, 0, conf) == (0.0, 1.0)


@pytest.mark.parametrize("confidence", CONFIDENCES)
def test_wilson_matches_scipy(confidence: float) -> None:
    for k, n in COUNT_GRID:
        low, high = wilson_interval(k, n, confidence)
        ref = sps.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
        assert low == pytest.approx(ref.low, abs=1e-12), (k, n)
        assert high == pytest.approx(ref.high, abs=1e-12), (k, n)


@pytest.mark.parametrize(
    "p", [1e-300, 1e-100, 1e-12, 1e-6, 0.001, 0.02425, 0.025, 0.2, 0.5, 0.7, 0.975, 0.995, 1 - 1e-9, 1 - 1e-15]
)
def test_normal_quantile_matches_scipy(p: float) -> None:
    ref = sps.norm.ppf(p)
    assert normal_quantile(p) == pytest.approx(ref, rel=1e-13, abs=1e-15)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_normal_quantile_rejects_outside_open_unit_interval(p: float) -> None:
    with pytest.raises(ValueError, match="p must be in"):
        normal_quantile(p)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 16, 31, 100, 1000])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99, 0.999999])
def test_t_interval_matches_scipy(n: int, confidence: float) -> None:
    unit = [math.sin(1.7 * i + 0.3) for i in range(n)]
    unit_mean = sum(unit) / n
    unit_sd = math.sqrt(sum((u - unit_mean) ** 2 for u in unit) / (n - 1))
    t_ref = sps.t.ppf(0.5 + confidence / 2, n - 1)
    scale = 0.1 / (t_ref * unit_sd / math.sqrt(n))  # half-width 0.1: no clipping, full relative precision
    values = [0.5 + scale * (u - unit_mean) for u in unit]
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_ref * sd / math.sqrt(n)
    low, high = t_interval(values, confidence)
    assert (high - low) / 2 == pytest.approx(half, rel=1e-11)
    assert (high + low) / 2 == pytest.approx(mean, abs=1e-14)


def test_t_interval_small_samples_and_clipping() -> None:
    assert t_interval([], 0.95) == (0.0, 1.0)
    assert t_interval([0.7], 0.95) == (0.0, 1.0)
    assert t_interval([0.6, 0.6, 0.6], 0.95) == (0.6, 0.6)
    low, high = t_interval([0.0, 1.0], 0.95)  # t(0.975, 1) = 12.7: far outside, clipped
    assert (low, high) == (0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Leveugle


def test_leveugle_reproduces_field_notes_table() -> None:
    assert leveugle_sample_size(4_063_170, confidence=0.95, margin=0.05).n == 385
    assert leveugle_sample_size(4_063_170, confidence=0.95, margin=0.01).n == 9_581
    # ResNet-20 (269,722 fp32 parameters incl. BN affine) x 32 bits x stuck-at-0/1: "about 16.6k"
    resnet20 = leveugle_sample_size(269_722 * 32 * 2, confidence=0.99, margin=0.01)
    assert 16_500 <= resnet20.n <= 16_700
    assert resnet20 == SampleSize(n=resnet20.n, population=17_262_208, confidence=0.99, margin=0.01, p=0.5)


def test_leveugle_small_population_is_capped() -> None:
    assert leveugle_sample_size(10, confidence=0.99, margin=0.01).n == 10
    assert leveugle_margin(10, 10, 0.99, 0.5) == 0.0
    assert leveugle_margin(1, 1, 0.99, 0.5) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    population=st.integers(2, 10**9),
    confidence=st.floats(0.5, 0.9999),
    margin=st.floats(0.001, 0.2),
    p=st.floats(0.01, 0.99),
)
# n is 2/3 of N here, where a 1e-6 relative slack in n moved the margin by 1.3e-6 (found by CI)
@example(population=131071, confidence=0.850558611761707, margin=0.001, p=0.850558611761707)
def test_leveugle_margin_round_trips(population: int, confidence: float, margin: float, p: float) -> None:
    size = leveugle_sample_size(population, confidence, margin, p)
    assert 1 <= size.n <= population
    achieved = leveugle_margin(population, size.n, confidence, p)
    assert achieved <= margin * (1 + 1e-6) * (1 + 1e-12)  # a 1e-6 relative excess is forgiven (see docstring)
    if size.n > 1:  # and n is the smallest such size
        assert leveugle_margin(population, size.n - 1, confidence, p) > margin


def test_leveugle_validation() -> None:
    with pytest.raises(ValueError, match="population"):
        leveugle_sample_size(0)
    with pytest.raises(ValueError, match="margin"):
        leveugle_sample_size(100, margin=0.0)
    with pytest.raises(ValueError, match="n <= population"):
        leveugle_margin(100, 101, 0.95, 0.5)


# ----------------------------------------------------------------------------------------------------------------
# interval properties

counts = st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))
levels = st.floats(0.5, 0.9999)
INTERVALS = [wilson_interval, clopper_pearson_interval]


@settings(max_examples=150, deadline=None)
@given(kn=counts, confidence=levels)
def test_binomial_intervals_contain_estimate_and_lie_in_unit_interval(
    kn: tuple[int, int], confidence: float
) -> None:
    k, n = kn
    for interval in INTERVALS:
        low, high = interval(k, n, confidence)
        assert 0.0 <= low <= k / n <= high <= 1.0, interval.__name__
        assert low < high


@settings(max_examples=150, deadline=None)
@given(kn=counts, confidence=levels)
def test_binomial_intervals_shrink_as_n_grows(kn: tuple[int, int], confidence: float) -> None:
    k, n = kn
    for interval in INTERVALS:
        low1, high1 = interval(k, n, confidence)
        low2, high2 = interval(2 * k, 2 * n, confidence)  # same proportion, twice the data
        assert high2 - low2 < high1 - low1, interval.__name__


@settings(max_examples=150, deadline=None)
@given(kn=counts, c1=levels, c2=levels)
def test_binomial_intervals_widen_with_confidence(kn: tuple[int, int], c1: float, c2: float) -> None:
    k, n = kn
    lo_c, hi_c = min(c1, c2), max(c1, c2)
    for interval in INTERVALS:
        low1, high1 = interval(k, n, lo_c)
        low2, high2 = interval(k, n, hi_c)
        assert low2 <= low1 + 1e-15 and high1 <= high2 + 1e-15, interval.__name__


def test_clopper_pearson_is_wider_than_wilson_in_the_middle() -> None:
    # the exact interval is conservative; Wilson is not, and is therefore not used for gating
    cp, wi = clopper_pearson_interval(40, 50, 0.95), wilson_interval(40, 50, 0.95)
    assert cp[0] < wi[0] and cp[1] > wi[1]


values_lists = st.lists(st.floats(0.0, 1.0), min_size=2, max_size=60)


@settings(max_examples=150, deadline=None)
@given(values=values_lists, c1=levels, c2=levels)
def test_t_interval_properties(values: list[float], c1: float, c2: float) -> None:
    mean = math.fsum(values) / len(values)
    lo_c, hi_c = min(c1, c2), max(c1, c2)
    low1, high1 = t_interval(values, lo_c)
    low2, high2 = t_interval(values, hi_c)
    assert 0.0 <= low1 <= high1 <= 1.0
    assert low1 <= mean + 1e-12 and mean - 1e-12 <= high1
    assert low2 <= low1 + 1e-12 and high1 <= high2 + 1e-12


@settings(max_examples=60, deadline=None)
@given(p=st.floats(0.05, 0.95), n=st.integers(10, 200))
def test_t_interval_shrinks_as_n_grows(p: float, n: int) -> None:
    # two-point samples with the same proportion of ones: doubling n must narrow the interval
    ones = max(1, min(n - 1, round(p * n)))
    values = [1.0] * ones + [0.0] * (n - ones)
    low1, high1 = t_interval(values, 0.95)
    low2, high2 = t_interval(values * 2, 0.95)
    assert high2 - low2 < high1 - low1


@pytest.mark.parametrize("bad", [(-1, 5), (6, 5), (0, -1)])
def test_interval_count_validation(bad: tuple[int, int]) -> None:
    for interval in INTERVALS:
        with pytest.raises(ValueError, match="successes"):
            interval(bad[0], bad[1], 0.95)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.2, math.nan])
def test_interval_confidence_validation(confidence: float) -> None:
    for interval in INTERVALS:
        with pytest.raises(ValueError, match="confidence"):
            interval(3, 10, confidence)
    with pytest.raises(ValueError, match="confidence"):
        t_interval([0.1, 0.2], confidence)


# ----------------------------------------------------------------------------------------------------------------
# sequential plan

plans = st.builds(
    SequentialPlan,
    confidence=st.floats(0.5, 0.9999),
    first=st.integers(1, 64),
    budget=st.integers(64, 5000),
    schedule=st.sampled_from(["doubling", "fixed"]),
)


@settings(max_examples=200, deadline=None)
@given(plan=plans)
def test_alpha_spending_never_exceeds_alpha(plan: SequentialPlan) -> None:
    points = plan.checkpoints()
    spent = [plan.alpha_at(k) for k in range(len(points))]
    assert all(a > 0 for a in spent)
    assert all(a > b for a, b in zip(spent, spent[1:]))
    assert math.fsum(spent) <= 1 - plan.confidence


@settings(max_examples=200, deadline=None)
@given(plan=plans)
def test_checkpoints_increase_strictly_and_end_at_budget(plan: SequentialPlan) -> None:
    points = plan.checkpoints()
    assert len(points) == plan._num_looks()
    assert points[0] == min(plan.first, plan.budget)
    assert points[-1] == plan.budget
    assert all(a < b for a, b in zip(points, points[1:]))
    inner = points[:-1]
    if plan.schedule == "doubling":
        assert inner == [plan.first * 2**i for i in range(len(inner))]
    else:
        assert inner == [plan.first * (i + 1) for i in range(len(inner))]


def test_checkpoint_examples() -> None:
    assert SequentialPlan(first=4, budget=256).checkpoints() == [4, 8, 16, 32, 64, 128, 256]
    assert SequentialPlan(first=4, budget=100).checkpoints() == [4, 8, 16, 32, 64, 100]
    assert SequentialPlan(first=10, budget=35, schedule="fixed").checkpoints() == [10, 20, 30, 35]
    assert SequentialPlan(first=8, budget=8).checkpoints() == [8]
    plan = SequentialPlan(confidence=0.95)
    assert plan.alpha_at(0) == pytest.approx(0.05 * 6 / math.pi**2)
    assert plan.alpha_at(3) == pytest.approx(0.05 * 6 / (16 * math.pi**2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"confidence": 1.0}, "confidence"),
        ({"first": 0}, "first"),
        ({"first": 10, "budget": 5}, "budget"),
        ({"schedule": "linear"}, "schedule"),
    ],
)
def test_plan_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SequentialPlan(**kwargs)  # type: ignore[arg-type]


def test_alpha_at_rejects_looks_outside_the_plan() -> None:
    plan = SequentialPlan(first=4, budget=16)
    with pytest.raises(ValueError, match="look"):
        plan.alpha_at(3)
    with pytest.raises(ValueError, match="look"):
        plan.alpha_at(-1)


def test_decide_binomial_uses_clopper_pearson_at_the_looks_level() -> None:
    plan = SequentialPlan(confidence=0.95, first=4, budget=64)
    m = 64
    for look, trials in enumerate(plan.checkpoints()):
        n = trials * m
        k = round(0.83 * n)
        d = plan.decide_binomial(k, n, trials, required=0.80)
        low, high = clopper_pearson_interval(k, n, 1 - plan.alpha_at(look))
        assert (d.ci_low, d.ci_high) == (low, high)
        assert d.look == look and d.estimate == k / n and d.confidence == 0.95
        expected = Verdict.PASS if low >= 0.80 else Verdict.FAIL if high < 0.80 else Verdict.INCONCLUSIVE
        assert d.verdict is expected
        assert d.method == "clopper-pearson+alpha-spending"
    # with this much data 0.83 is clearly above 0.80, and clearly below 0.86
    assert plan.decide_binomial(round(0.83 * 4096), 4096, 64, 0.80).verdict is Verdict.PASS
    assert plan.decide_binomial(round(0.83 * 4096), 4096, 64, 0.86).verdict is Verdict.FAIL
    assert plan.decide_binomial(round(0.83 * 256), 256, 4, 0.82).verdict is Verdict.INCONCLUSIVE


def test_decide_binomial_spends_less_than_a_fixed_look() -> None:
    # the same data judged at look 3 must get a wider interval than a single 95% interval
    plan = SequentialPlan(confidence=0.95, first=4, budget=64)
    d = plan.decide_binomial(1700, 2048, 32, 0.80)
    fixed = clopper_pearson_interval(1700, 2048, 0.95)
    assert d.ci_low < fixed[0] and d.ci_high > fixed[1]


def test_decide_binomial_validation() -> None:
    plan = SequentialPlan(first=4, budget=64)
    with pytest.raises(ValueError, match="not a checkpoint"):
        plan.decide_binomial(100, 128, 5, 0.8)
    with pytest.raises(ValueError, match="successes"):
        plan.decide_binomial(300, 256, 4, 0.8)
    with pytest.raises(ValueError, match="required"):
        plan.decide_binomial(200, 256, 4, 1.5)


def test_decide_binomial_trivial_requirements() -> None:
    plan = SequentialPlan(first=4, budget=64)
    assert plan.decide_binomial(0, 256, 4, 0.0).verdict is Verdict.PASS
    assert plan.decide_binomial(255, 256, 4, 1.0).verdict is Verdict.FAIL
    assert plan.decide_binomial(256, 256, 4, 1.0).verdict is Verdict.INCONCLUSIVE  # never provably perfect


# ----------------------------------------------------------------------------------------------------------------
# bounded (weight-site) gate: betting confidence sequence

BET_CAP = 0.85  # c in the docstring of decide_bounded; the oracle below hard-codes the construction independently
BETTING = "betting-cs (hedged, Waudby-Smith & Ramdas 2023)"


def _reference_log_sup_wealth(values: list[float], alpha: float, m: float, side: int) -> float:
    """Plain-loop transcription of the documented construction: ln max_s K_s(m) for side +1 (K+) or -1 (K-)."""
    total, squares = 0.0, 0.25  # one fake observation: mean 1/2, variance 1/4
    log_wealth, best = 0.0, -math.inf
    for t, x in enumerate(values, start=1):
        var_prev = squares / t  # sigma2_{t-1} = (1/4 + sum_{i<t} (x_i - mu_i)^2) / t
        bet = math.sqrt(2 * math.log(2 / alpha) / (var_prev * t * math.log(1 + t)))
        room = m if side > 0 else 1 - m
        if room > 0:
            bet = min(bet, BET_CAP / room)
        log_wealth += math.log(1 + bet * side * (x - m))
        best = max(best, log_wealth)
        total += x
        squares += (x - (0.5 + total) / (t + 1)) ** 2
    return best


def _reference_rejects(values: list[float], alpha: float, m: float, side: int) -> bool:
    """theta K >= 1/alpha with theta = 1/2, i.e. ln K >= ln(2/alpha)."""
    return _reference_log_sup_wealth(values, alpha, m, side) >= math.log(2 / alpha)


def _reference_cs(values: list[float], alpha: float) -> tuple[float, float]:
    """Bounds of the non-rejected m, by plain bisection (60 halvings) on the monotone rejection of each side."""
    def boundary(side: int) -> float:
        rejected, accepted = (0.0, 1.0) if side > 0 else (1.0, 0.0)
        if not _reference_rejects(values, alpha, rejected, side):
            return rejected
        for _ in range(60):
            mid = 0.5 * (rejected + accepted)
            if _reference_rejects(values, alpha, mid, side):
                rejected = mid
            else:
                accepted = mid
        return rejected

    return boundary(+1), boundary(-1)


def _expected_verdict(low: float, high: float, required: float) -> Verdict:
    return Verdict.PASS if low >= required else Verdict.FAIL if high < required else Verdict.INCONCLUSIVE


def _single_look(n: int, confidence: float) -> SequentialPlan:
    return SequentialPlan(confidence=confidence, first=n, budget=n)


unit_values = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(values=unit_values, confidence=st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99]), required=st.floats(0.0, 1.0))
def test_decide_bounded_matches_reference_implementation(values: list[float], confidence: float,
                                                         required: float) -> None:
    alpha = 1 - confidence
    d = _single_look(len(values), confidence).decide_bounded(values, required)
    ref_low, ref_high = _reference_cs(values, alpha)
    if ref_low > ref_high + 1e-6:  # empty CS (probability <= alpha under the model): reported as [0, 1]
        assert (d.ci_low, d.ci_high) == (0.0, 1.0)
        assert d.verdict is _expected_verdict(0.0, 1.0, required)
        return
    assert d.ci_low == pytest.approx(ref_low, abs=1e-6)
    assert d.ci_high == pytest.approx(ref_high, abs=1e-6)
    # the verdict follows from whether `required` itself is rejected, not from the rounded bounds
    # (required = 0 is a PASS whatever the data: every mean is >= 0)
    if required == 0.0 or _reference_rejects(values, alpha, required, +1):
        expected = Verdict.PASS
    elif _reference_rejects(values, alpha, required, -1):
        expected = Verdict.FAIL
    else:
        expected = Verdict.INCONCLUSIVE
    assert d.verdict is expected


@settings(max_examples=200, deadline=None)
@given(values=unit_values, confidence=levels, required=st.floats(0.0, 1.0))
def test_decide_bounded_properties(values: list[float], confidence: float, required: float) -> None:
    d = _single_look(len(values), confidence).decide_bounded(values, required)
    assert 0.0 <= d.ci_low <= d.ci_high <= 1.0
    assert d.verdict is _expected_verdict(d.ci_low, d.ci_high, required)
    assert d.estimate == pytest.approx(math.fsum(values) / len(values), abs=1e-15)
    assert (d.look, d.confidence, d.method) == (0, confidence, BETTING)
    # the lower side can only reject m below some observation, the upper side m above some observation
    assert d.ci_low <= max(values) and d.ci_high >= min(values)
    # the reported bounds are those of the CS (empty: [0, 1]; a FAIL's upper bound strictly below `required`)
    low, high, _, below = _betting_cs(values, 1 - confidence, required)
    if low > high or (below and low > math.nextafter(required, -math.inf)):
        assert (d.ci_low, d.ci_high) == (0.0, 1.0)
    else:
        assert (d.ci_low, d.ci_high) == (low, min(high, math.nextafter(required, -math.inf)) if below else high)


@settings(max_examples=150, deadline=None)
@given(value=st.floats(0.0, 1.0), n=st.integers(1, 300), confidence=levels)
def test_decide_bounded_identical_observations(value: float, n: int, confidence: float) -> None:
    """n identical observations: the CS contains their mean, and n more of them shrink it strictly."""
    d1 = _single_look(n, confidence).decide_bounded([value] * n, 0.5)
    d2 = _single_look(2 * n, confidence).decide_bounded([value] * (2 * n), 0.5)
    assert d1.ci_low <= value <= d1.ci_high
    assert d2.ci_low <= value <= d2.ci_high
    assert d1.ci_low - 1e-7 <= d2.ci_low and d2.ci_high <= d1.ci_high + 1e-7
    if (d1.ci_low, d1.ci_high) != (0.0, 1.0):  # once anything is ruled out, every further observation narrows it
        assert d2.ci_high - d2.ci_low < d1.ci_high - d1.ci_low


@settings(max_examples=150, deadline=None)
@given(head=unit_values, tail=unit_values, confidence=levels)
def test_betting_cs_is_nested(head: list[float], tail: list[float], confidence: float) -> None:
    """The CS at n is intersected over all s <= n, so more observations never widen it (up to the root finder's
    1e-7 tolerance): a miss at any earlier time is also a miss at n."""
    low1, high1, _, _ = _betting_cs(head, 1 - confidence, 0.5)
    low2, high2, _, _ = _betting_cs(head + tail, 1 - confidence, 0.5)
    assert low2 >= low1 - 2e-7
    assert high2 <= high1 + 2e-7


def test_decide_bounded_spends_no_alpha_across_looks() -> None:
    """The CS is valid at every n at once: the same 64 trials get the same interval whether they are the plan's first
    look or its fifth, at the full confidence (the binomial gate, by contrast, widens later looks)."""
    values = [0.8 + 0.1 * math.sin(i) for i in range(64)]
    first = SequentialPlan(confidence=0.95, first=64, budget=256).decide_bounded(values, 0.8)
    fifth = SequentialPlan(confidence=0.95, first=4, budget=256).decide_bounded(values, 0.8)
    assert (first.look, fifth.look) == (0, 4)
    assert (first.ci_low, first.ci_high, first.verdict) == (fifth.ci_low, fifth.ci_high, fifth.verdict)
    binomial = [SequentialPlan(confidence=0.95, first=f, budget=256).decide_binomial(3000, 4096, 64, 0.7)
                for f in (64, 4)]
    assert binomial[1].ci_low < binomial[0].ci_low


def test_decide_bounded_verdicts() -> None:
    plan = SequentialPlan(confidence=0.95, first=16, budget=256)
    high = [0.99, 0.98, 1.0, 0.97] * 64
    assert plan.decide_bounded(high, 0.5).verdict is Verdict.PASS
    assert plan.decide_bounded(high[:16], 0.5).verdict is Verdict.PASS
    low = [0.1, 0.05, 0.0, 0.15] * 4
    assert plan.decide_bounded(low, 0.6).verdict is Verdict.FAIL
    mixed = [0.8, 0.9] * 8
    d = plan.decide_bounded(mixed, 0.85)
    assert d.verdict is Verdict.INCONCLUSIVE and d.look == 0
    assert d.method == BETTING
    # trivial requirements: everything is >= 0; nothing is provably perfect
    assert plan.decide_bounded([0.0] * 16, 0.0).verdict is Verdict.PASS
    assert plan.decide_bounded([1.0] * 256, 1.0).verdict is Verdict.INCONCLUSIVE
    # a FAIL's upper bound lies strictly below the requirement even when the boundary is within the tolerance of it
    d = plan.decide_bounded(low, 0.6)
    assert d.ci_high < 0.6


def test_decide_bounded_sample_mean_can_lie_outside_the_cs() -> None:
    """A CS keeps the evidence of every earlier time, so an unusual order can exclude the final sample mean: five
    zeros already rule out a mean of 1/2 at 90% (a fair coin shows them with probability 1/32 < alpha / 2)."""
    d = SequentialPlan(confidence=0.9, first=10, budget=10).decide_bounded([0.0] * 5 + [1.0] * 5, 0.5)
    assert d.estimate == 0.5 and d.ci_high < 0.5 and d.verdict is Verdict.FAIL


def test_decide_bounded_empty_cs_is_inconclusive() -> None:
    """Two perfect trials followed by 39 failed ones: each side rejects what the other keeps. Under the model this
    has probability <= alpha; it is reported as [0, 1], i.e. no verdict."""
    values = [1.0] * 2 + [0.0] * 39
    low, high, _, _ = _betting_cs(values, 0.1, 0.5)
    assert low > high
    d = SequentialPlan(confidence=0.9, first=41, budget=41).decide_bounded(values, 0.5)
    assert (d.ci_low, d.ci_high, d.verdict) == (0.0, 1.0, Verdict.INCONCLUSIVE)
    assert _reference_cs(values, 0.1)[0] > _reference_cs(values, 0.1)[1]


def test_decide_bounded_cost_is_a_few_passes_over_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Speed, measured deterministically: the verdict and both bounds take a bounded number of O(n) evaluations of
    the capital processes (each a few C-level passes over the trials), at small n and at n = 4096."""
    calls = []
    original = _CapitalProcesses.log_sup_wealth

    def counting(self: _CapitalProcesses, m: float, upper: bool) -> float:
        calls.append(m)
        return original(self, m, upper)

    monkeypatch.setattr(_CapitalProcesses, "log_sup_wealth", counting)
    for n in (4, 64, 4096):
        values = [min(1.0, max(0.0, 0.83 + 0.04 * math.sin(2.3 * i))) for i in range(n)]
        calls.clear()
        _single_look(n, 0.99).decide_bounded(values, 0.8)
        assert len(calls) <= 24, (n, len(calls))


def test_decide_bounded_validation() -> None:
    plan = SequentialPlan(first=4, budget=64)
    with pytest.raises(ValueError, match="not a checkpoint"):
        plan.decide_bounded([0.5] * 5, 0.5)
    with pytest.raises(ValueError, match="each value"):
        plan.decide_bounded([0.5, 0.5, 0.5, 1.5], 0.5)
    with pytest.raises(ValueError, match="not a checkpoint"):
        plan.decide_bounded([], 0.5)


# ----------------------------------------------------------------------------------------------------------------
# thresholds and decisions


def test_threshold_required_accuracy_and_describe() -> None:
    assert Threshold(min_acc=0.8).required_accuracy(0.95) == 0.8
    assert Threshold(min_acc=0.8).describe() == "min_acc=0.80"
    drop = Threshold(max_drop=0.05)
    assert drop.required_accuracy(0.9012) == pytest.approx(0.8512)
    assert drop.describe() == "max_drop=0.05"
    assert drop.describe(0.9012) == "max_drop=0.05 (>= 0.8512)"
    assert Threshold(max_drop=0.5).required_accuracy(0.3) == 0.0
    assert Threshold(min_acc=0.8125).describe() == "min_acc=0.8125"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"min_acc": 0.8, "max_drop": 0.05}, "exactly one"),
        ({"min_acc": 1.2}, r"min_acc: 1.2 must be an accuracy in \[0, 1\]"),
        ({"min_acc": -0.1}, r"min_acc: -0.1 must be an accuracy in \[0, 1\]"),
        ({"max_drop": 2.0}, r"max_drop: 2.0 must be an accuracy in \[0, 1\]"),
        ({"max_drop": math.nan}, r"max_drop: nan must be an accuracy in \[0, 1\]"),
    ],
)
def test_threshold_validation(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Threshold(**kwargs)


@given(value=st.floats(allow_nan=False).filter(lambda v: not 0.0 <= v <= 1.0))
def test_threshold_rejects_every_value_outside_unit_interval(value: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Threshold(min_acc=value)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Threshold(max_drop=value)


def test_decision_round_trips_through_json() -> None:
    d = Decision(Verdict.PASS, 0.91, 0.88, 0.93, 0.95, 2, "clopper-pearson+alpha-spending")
    data = json.loads(json.dumps(d.to_dict()))
    assert data["verdict"] == "pass"
    assert Decision.from_dict(data) == d
    assert str(Verdict.FAIL) == "fail" and Verdict("inconclusive") is Verdict.INCONCLUSIVE


def test_decision_validation() -> None:
    with pytest.raises(ValueError, match="ci_low"):
        Decision(Verdict.PASS, 0.9, 0.95, 0.93, 0.95, 0, "x")
    with pytest.raises(ValueError, match="look"):
        Decision(Verdict.PASS, 0.9, 0.8, 0.93, 0.95, -1, "x")
    with pytest.raises(ValueError):
        Decision.from_dict({"verdict": "maybe", "estimate": 0.9, "ci_low": 0.8, "ci_high": 0.95,
                            "confidence": 0.95, "look": 0, "method": "x"})
