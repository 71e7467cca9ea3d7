"""Intervals, sample sizes and sequential release verdicts for fault-injection campaigns.

Pure Python (stdlib only) so that verdicts can be recomputed, merged and audited without torch.

How a campaign is judged
------------------------
A campaign runs trials 0, 1, 2, ...; each trial evaluates M images under freshly sampled faults. A
:class:`SequentialPlan` fixes, *before* the campaign starts, the trial counts (checkpoints) at which the verdict is
evaluated; the campaign stops at the first checkpoint whose verdict is PASS or FAIL. A wrong PASS (the interval lies
at or above ``required`` while the true accuracy is below it) or a wrong FAIL (the interval lies below ``required``
while the true accuracy is at or above it) needs an interval that misses the true accuracy, so both gates below bound
the probability that *any* look gives a wrong verdict by ``alpha = 1 - confidence``, however early the campaign stops
and whichever look it stops at. (Each wrong direction needs a miss on one particular side, so it is in fact at most
``alpha / 2``.) Judging every look with a fixed-n interval at the full ``alpha`` instead inflates the error well above
``alpha`` (about 2 alpha per direction with 7 looks near the threshold; tests/test_sequential_simulation.py shows it).

Transient sites ("act", "acc", "input"): image outcomes are pooled as one binomial count (successes = correct images,
n = trials * M), judged with an exact Clopper-Pearson interval. A fixed-n interval is valid at one look only, so the
plan spends alpha across looks: look ``k`` uses level ``1 - alpha_k`` with ``sum_k alpha_k <= alpha``, and the union
bound over the checkpoints gives the guarantee above. Pooling is conservative when images differ in how often they
survive: with independent per-image Bernoulli(p_i) outcomes the variance
``sum p_i (1 - p_i) = n p(1-p) - sum (p_i - p)^2`` never exceeds the binomial variance at the pooled mean p, and
Hoeffding (1956) shows the binomial also has the heavier tails beyond one unit from the mean, which is where the
interval's bounds sit. This needs transient faults drawn independently per image.

Persistent site ("weight"): one sampled fault set is shared by all M images of a trial, so the images' outcomes are
correlated (a fault that breaks one image tends to break many). Pooling them would overstate the information by up to
a factor M. The trial is therefore the unit: the observations are per-trial accuracies in [0, 1], i.i.d. across
trials, and they are judged with a *confidence sequence* (CS) that holds for any distribution on [0, 1]: the
betting CS of Waudby-Smith & Ramdas ("Estimating means of bounded random variables by betting", JRSS-B 2023;
hedged capital process with predictable plug-in bets, see :meth:`SequentialPlan.decide_bounded`). A CS is a sequence
of intervals ``CS_1, CS_2, ...`` with ``P(exists n >= 1: mean not in CS_n) <= alpha``: the guarantee is uniform over
*all* trial counts at once (Ville's inequality for a nonnegative supermartingale), not over a finite list of looks.
So the weight site spends no alpha across looks: every look uses the full ``alpha``, looking at checkpoints only is
merely a subset of the times already covered, and a campaign may stop at any look (even one chosen by peeking at the
data) without voiding the guarantee. At 99% with a 3-point gap and per-trial sd 0.02, the previous gate (empirical
Bernstein with Hoeffding-KL and alpha spending) needed about 2,000 trials; this one needs 256 to PASS and about 100 to
FAIL (benchmarks/bench_sequential.py). Skewed trial accuracies (10% catastrophic trials) remain expensive, about
1,700 / 850 trials: no distribution-free gate can rule out hidden catastrophic trials quickly (see decide_bounded).

Fixed-size planning (Leveugle et al., DATE 2009) is provided for comparison and for single-fault enumerations.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import accumulate, chain, repeat
from operator import add, mul, neg, sub, truediv
from typing import Any

from .spec import check_threshold

__all__ = [
    "Decision",
    "SampleSize",
    "SequentialPlan",
    "Threshold",
    "Verdict",
    "clopper_pearson_interval",
    "leveugle_margin",
    "leveugle_sample_size",
    "normal_quantile",
    "t_interval",
    "wilson_interval",
]


class Verdict(str, Enum):
    """Outcome of a look; INCONCLUSIVE means "keep going" before the budget and "budget spent" at its end."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"

    def __str__(self) -> str:  # so that f-strings and reports show "pass", not "Verdict.PASS"
        return self.value


# --------------------------------------------------------------------------------------------------------------
# argument checks


def _check_probability(value: float, name: str, *, open_interval: bool) -> None:
    """Reject values outside (0, 1) or [0, 1]; the comparison form also rejects NaN."""
    ok = 0.0 < value < 1.0 if open_interval else 0.0 <= value <= 1.0
    if not ok:
        bounds = "(0, 1)" if open_interval else "[0, 1]"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes!r}, n={n!r}")


# --------------------------------------------------------------------------------------------------------------
# special functions (pure Python so the verdict path needs no scipy)

# Acklam's rational approximation of the normal quantile (relative error < 1.2e-9), polished below by one Halley
# step on math.erfc, which brings it to double precision.
_ACKLAM_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
             -3.066479806614716e01, 2.506628277459239e00)
_ACKLAM_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
             -1.328068155288572e01)
_ACKLAM_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
             4.374664141464968e00, 2.938163982698783e00)
_ACKLAM_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
_ACKLAM_P_LOW = 0.02425


def _acklam_tail(p: float) -> float:
    """Lower-tail branch, for 0 < p < _ACKLAM_P_LOW."""
    c, d = _ACKLAM_C, _ACKLAM_D
    q = math.sqrt(-2.0 * math.log(p))
    num = ((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]
    den = (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0
    return num / den


def normal_quantile(p: float) -> float:
    """Inverse standard normal CDF, accurate to about 1e-15 relative for 1e-300 < p < 1 - 1e-16."""
    _check_probability(p, "p", open_interval=True)
    if p > 0.5:  # 1 - p is exact here; working in the lower tail keeps erfc's relative precision
        return -normal_quantile(1.0 - p)
    if p < _ACKLAM_P_LOW:
        x = _acklam_tail(p)
    else:
        a, b = _ACKLAM_A, _ACKLAM_B
        q = p - 0.5
        r = q * q
        num = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
        den = ((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0
        x = num / den
    if 0.5 * x * x < 700.0:  # one Halley step on the exact CDF; skipped only where exp() would overflow
        e = 0.5 * math.erfc(-x / math.sqrt(2.0)) - p
        u = e * math.exp(0.5 * x * x + 0.5 * math.log(2.0 * math.pi))
        x = x - u / (1.0 + 0.5 * x * u)
    return x


def _stirling_correction(x: float) -> float:
    """lgamma(x) - ((x - 1/2) ln x - x + ln sqrt(2 pi)) for x >= 10 (error < 1e-14)."""
    r = 1.0 / (x * x)
    return (1.0 / 12.0 - r * (1.0 / 360.0 - r * (1.0 / 1260.0 - r * (1.0 / 1680.0 - r / 1188.0)))) / x


_LN_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _log_beta(a: float, b: float) -> float:
    """ln B(a, b) without the cancellation of lgamma(a) + lgamma(b) - lgamma(a + b) at large arguments (as R's lbeta).

    With n ~ 1e4..1e7 that naive difference loses 1e-11..1e-8 relative precision in every CDF value.
    """
    p, q = min(a, b), max(a, b)
    if p >= 10.0:
        corr = _stirling_correction(p) + _stirling_correction(q) - _stirling_correction(p + q)
        return (-0.5 * math.log(q) + _LN_SQRT_2PI + corr + (p - 0.5) * math.log(p / (p + q))
                + q * math.log1p(-p / (p + q)))
    if q >= 10.0:
        corr = _stirling_correction(q) - _stirling_correction(p + q)
        return math.lgamma(p) + corr + p - p * math.log(p + q) + (q - 0.5) * math.log1p(-p / (p + q))
    return math.lgamma(p) + math.lgamma(q) - math.lgamma(p + q)


_CF_EPS = 1e-16
_CF_TINY = 1e-300


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (modified Lentz); converges fast for x < (a+1)/(a+b+2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
    h = d
    max_iter = 1000 + int(20.0 * math.sqrt(max(a, b)))
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _CF_TINY else _CF_TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _CF_TINY else _CF_TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b): safeguarded Newton on I_x(a, b) = q, bisection whenever Newton leaves the bracket."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    if a == 1.0:  # I_x(1, b) = 1 - (1 - x)^b
        return -math.expm1(math.log1p(-q) / b)
    if b == 1.0:  # I_x(a, 1) = x^a
        return math.exp(math.log(q) / a)
    log_b = _log_beta(a, b)
    mean = a / (a + b)
    sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1.0)))
    x = mean + normal_quantile(q) * sd  # normal start: Newton then needs a handful of steps for large a + b
    lo, hi = 0.0, 1.0
    if not lo < x < hi:
        x = mean
    for _ in range(400):
        f = _beta_cdf(x, a, b) - q
        if f == 0.0:
            return x
        if f < 0.0:
            lo = x
        else:
            hi = x
        log_pdf = (a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_b
        pdf = math.exp(log_pdf) if log_pdf < 700.0 else math.inf
        x_new = x - f / pdf if pdf > 0.0 else math.nan
        if not lo < x_new < hi:  # also catches NaN
            x_new = 0.5 * (lo + hi)
        if abs(x_new - x) <= 1e-15 * x_new or hi - lo <= 1e-15 * hi:
            return x_new
        x = x_new
    raise ArithmeticError(f"beta quantile did not converge (q={q}, a={a}, b={b})")


def _t_quantile(p: float, df: float) -> float:
    """Student t quantile from the incomplete beta: P(|T| > t) = I_x(df/2, 1/2) with x = df / (df + t^2).

    Solved for x; when 1 - x is smaller than the tail mass 2(1-p) (huge df), solved again for y = 1 - x with
    y ~ Beta(1/2, df/2), whose rounding error is then the smaller one.
    """
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -_t_quantile(1.0 - p, df)
    x = _beta_ppf(2.0 * (1.0 - p), 0.5 * df, 0.5)
    if 1.0 - x < 2.0 * (1.0 - p):
        y = _beta_ppf(2.0 * p - 1.0, 0.5, 0.5 * df)
        return math.sqrt(df * y / (1.0 - y))
    return math.sqrt(df * (1.0 - x) / x)


# --------------------------------------------------------------------------------------------------------------
# intervals


def wilson_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval: cheap and well-behaved near 0 and 1, but only approximate (not for gating)."""
    _check_counts(successes, n)
    _check_probability(confidence, "confidence", open_interval=True)
    if n == 0:
        return 0.0, 1.0
    z = normal_quantile(0.5 + 0.5 * confidence)
    p_hat = successes / n
    z2n = z * z / n
    center = (p_hat + 0.5 * z2n) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p_hat * (1.0 - p_hat) / n + z2n / (4.0 * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def clopper_pearson_interval(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """Exact (conservative) binomial interval: coverage >= confidence for every p, which a gate needs."""
    _check_counts(successes, n)
    _check_probability(confidence, "confidence", open_interval=True)
    if n == 0:
        return 0.0, 1.0
    tail = 0.5 * (1.0 - confidence)
    low = 0.0 if successes == 0 else _beta_ppf(tail, successes, n - successes + 1)
    # upper bound by symmetry, so that it too is a lower-tail quantile (no 1 - tiny cancellation in the CDF)
    high = 1.0 if successes == n else 1.0 - _beta_ppf(tail, n - successes, successes + 1)
    return low, high


def t_interval(values: Sequence[float], confidence: float) -> tuple[float, float]:
    """Student t interval for a mean, clipped to [0, 1]; fixed-n only (it is not anytime-valid)."""
    _check_probability(confidence, "confidence", open_interval=True)
    n = len(values)
    if n < 2:
        return 0.0, 1.0
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = _t_quantile(0.5 + 0.5 * confidence, n - 1) * math.sqrt(var / n)
    return min(1.0, max(0.0, mean - half)), min(1.0, max(0.0, mean + half))


# --------------------------------------------------------------------------------------------------------------
# betting confidence sequence for the mean of [0, 1]-valued i.i.d. observations (Waudby-Smith & Ramdas 2023)

# c: the bet against a candidate mean m is capped at c / m (lower side) or c / (1 - m) (upper side), so every wealth
# factor is at least 1 - c > 0 whatever the observation. The paper suggests 1/2 or 3/4. A larger c pays off when the
# trials are nearly constant, where the cap is what limits the bet, and costs a little when a catastrophic trial hits
# a large bet. Chosen by simulation (95%, looks at 4, 8, ..., 256): near-constant trials 3 points above 0.80 PASS at
# 128 trials with c = 0.85 and at 256 with c = 1/2 or 3/4; with 10% catastrophic trials (90% at 0.92, 10% at 0.3, vs
# 0.80) c = 0.85 PASSes 87% of campaigns within 256 trials, c = 3/4 88%, c = 1/2 92%.
_BET_TRUNCATION = 0.85
_PRIOR_MEAN = 0.5  # one fake observation with mean 1/2 and variance 1/4 regularizes the plug-in estimates
_PRIOR_VAR = 0.25
_CS_XTOL = 1e-7  # bisection/Brent tolerance on the CS bounds; the reported bound is always on the conservative side
_GUESS_SCALE, _GUESS_STEP = 0.7, 0.3  # root finder's start: bound ~ mean -/+ scale * width; first step, in widths
_LOG_MAX_FLOAT = math.log(sys.float_info.max)
_EPS = sys.float_info.epsilon


_LOG1P_COUNTS: list[float] = []


def _log1p_counts(n: int) -> list[float]:
    """[ln 2, ln 3, ..., ln(1+n)], cached (the campaign asks for the same prefixes at every checkpoint)."""
    if len(_LOG1P_COUNTS) < n:
        _LOG1P_COUNTS.extend(map(math.log1p, range(len(_LOG1P_COUNTS) + 1, n + 1)))
    return _LOG1P_COUNTS[:n]


class _CapitalProcesses:
    """The two capital processes of the hedged betting CS on fixed observations, as functions of the candidate mean.

    Bets are the paper's predictable plug-in ``lambda_t = sqrt(2 ln(2/alpha) / (sigma2_{t-1} t ln(1+t)))`` with the
    regularized running mean ``mu_t = (1/2 + sum_{i<=t} x_i) / (t+1)`` and variance
    ``sigma2_t = (1/4 + sum_{i<=t} (x_i - mu_i)^2) / (t+1)`` (one fake observation with mean 1/2 and variance 1/4;
    sigma2_0 = 1/4). Bet t uses x_1..x_{t-1} only, which is what makes the capital processes martingales.
    ``sigma2_{t-1} t = S_{t-1}`` with S the nondecreasing running sum of squares (prior included), so the bets
    decrease strictly with t: the bets that the m-dependent cap c/m (or c/(1-m)) truncates form a prefix, which lets
    each evaluation run as a few C-level passes over the data (pure Python, no per-element branches).
    """

    def __init__(self, values: Sequence[float], alpha: float) -> None:
        xs = list(values)
        n = len(xs)
        mus = map(truediv, map(add, repeat(_PRIOR_MEAN, n), accumulate(xs)), range(2, n + 2))
        devs = list(map(sub, xs, mus))
        squares = list(accumulate(map(mul, devs, devs), initial=_PRIOR_VAR))  # S_0 .. S_n
        scale = 2.0 * math.log(2.0 / alpha)
        denominators = map(mul, squares[:-1], _log1p_counts(n))  # sigma2_{t-1} t ln(1+t)
        self.bets = list(map(math.sqrt, map(truediv, repeat(scale, n), denominators)))
        self.xs = xs
        self.variance = squares[-1] / (n + 1)  # sigma2_n, for the root finder's starting guesses
        bet_x = list(map(mul, self.bets, xs))
        self._one_plus = list(map(add, repeat(1.0, n), bet_x))  # 1 + lambda_i x_i
        self._one_minus = list(map(sub, repeat(1.0, n), bet_x))  # 1 - lambda_i x_i

    def log_sup_wealth(self, m: float, upper: bool) -> float:
        """``ln max_{1<=s<=n} K_s(m)`` for one side (lower: evidence that the mean exceeds m; upper: that it is below).

        ``K+_s(m) = prod_{i<=s} (1 + min(lambda_i, c/m) (x_i - m))``,
        ``K-_s(m) = prod_{i<=s} (1 + min(lambda_i, c/(1-m)) (m - x_i))``. Every factor is >= 1 - c > 0. K+ is
        nonincreasing in m (where the cap binds its factor is ``1 - c + c x_i / m``), K- nondecreasing, and so are
        their running maxima: each side's rejected candidates form an interval ending at 0 (resp. 1).
        """
        xs, bets = self.xs, self.bets
        n = len(xs)
        room = 1.0 - m if upper else m
        cap = _BET_TRUNCATION / room if room > 0.0 else math.inf
        j = bisect.bisect_left(bets, -cap, key=neg)  # bets[:j] exceed the cap and are truncated to it
        factors: Iterable[float]
        if upper:  # 1 + cap (m - x) on the prefix, (1 - lambda x) + lambda m on the rest
            capped = map(add, repeat(1.0 + cap * m, j), map(mul, repeat(-cap, j), xs[:j])) if j else ()
            factors = chain(capped, map(add, self._one_minus[j:], map(mul, bets[j:], repeat(m, n - j))))
        else:  # 1 + cap (x - m) on the prefix, (1 + lambda x) - lambda m on the rest
            capped = map(add, repeat(1.0 - cap * m, j), map(mul, repeat(cap, j), xs[:j])) if j else ()
            factors = chain(capped, map(sub, self._one_plus[j:], map(mul, bets[j:], repeat(m, n - j))))
        wealth = max(accumulate(factors, mul))
        # wealth >= K_1 >= 1 - c > 0 cannot underflow to 0; an overflow to inf is clipped to the largest float
        return min(math.log(wealth), _LOG_MAX_FLOAT)


def _brent_rejected_end(g: Callable[[float], float], rej: float, g_rej: float, acc: float, g_acc: float) -> float:
    """Boundary of ``{u: g(u) >= 0}`` between ``rej`` (``g >= 0``) and ``acc`` (``g < 0``), g monotone in between.

    Brent's method (zeroin: inverse quadratic / secant steps, bisection when they stall), stopped once the bracket is
    narrower than ``_CS_XTOL``. Returns the bracket's *rejected* end, so the reported bound never leaves the set of
    candidates the capital process rejects: it errs, by at most the tolerance, on the conservative side.
    """
    a, fa, b, fb = rej, g_rej, acc, g_acc  # b: latest iterate, a: previous one, c: b's opposite end of the bracket
    c, fc = a, fa
    d = e = b - a
    for iteration in range(200):
        if (fb >= 0.0) == (fc >= 0.0):  # restore the bracket: b and c on opposite sides
            c, fc = a, fa
            d = e = b - a
        if abs(fc) < abs(fb):
            a, fa, b, fb, c, fc = b, fb, c, fc, b, fb
        tol = 2.0 * _EPS * abs(b) + 0.5 * _CS_XTOL
        half = 0.5 * (c - b)
        if abs(half) <= tol or iteration == 199:
            break
        if abs(e) >= tol and abs(fa) > abs(fb):
            s = fb / fa
            if a == c:  # secant
                p, q = 2.0 * half * s, 1.0 - s
            else:  # inverse quadratic interpolation
                q, r = fa / fc, fb / fc
                p = s * (2.0 * half * q * (q - r) - (b - a) * (r - 1.0))
                q = (q - 1.0) * (r - 1.0) * (s - 1.0)
            if p > 0.0:
                q = -q
            else:
                p = -p
            if 2.0 * p < min(3.0 * half * q - abs(tol * q), abs(e * q)):
                e, d = d, p / q
            else:
                d = e = half
        else:
            d = e = half
        a, fa = b, fb
        b = b + d if abs(d) > tol else b + math.copysign(tol, half)
        fb = g(b)
    return b if fb >= 0.0 else c


def _cs_end(g: Callable[[float], float], u_out: float, u_in: float, u_known: float, g_known: float, u_guess: float,
            step: float) -> float:
    """sup of ``{u in [u_out, u_in]: g(u) >= 0}`` for g nonincreasing with ``g(u_in) < 0``, as a rejected point.

    ``u_out`` itself when g(u_out) < 0 (nothing rejected: the CS reaches that end of [0, 1]). ``u_known`` is a point
    already evaluated (the requirement); the search starts at ``u_guess`` and widens by doubling steps until it
    brackets the boundary, then hands over to Brent.
    """
    rej: tuple[float, float] | None = (u_known, g_known) if g_known >= 0.0 else None
    acc: tuple[float, float] | None = None if g_known >= 0.0 else (u_known, g_known)
    u = min(max(u_guess, u_out), u_in)
    while rej is None or acc is None:
        if rej is not None and u <= rej[0]:
            u = min(rej[0] + step, acc[0] if acc is not None else u_in)
        elif acc is not None and u >= acc[0]:
            u = max(acc[0] - step, u_out)
        gu = g(u)
        if gu >= 0.0:
            rej = (u, gu)
            u = u + step
        elif u <= u_out:
            return u_out
        else:
            acc = (u, gu)
            u = u - step
        u = min(max(u, u_out), u_in)
        step *= 2.0
    return _brent_rejected_end(g, rej[0], rej[1], acc[0], acc[1])


def _excludes(values: Sequence[float], alpha: float, m: float) -> tuple[bool, bool]:
    """Whether the CS at n = len(values) lies above m (K+ rejected every m' <= m at some s <= n) and whether it lies
    below m; either means m is not in the CS. Two evaluations: the verdict part of :func:`_betting_cs`."""
    proc = _CapitalProcesses(values, alpha)
    level = math.log(2.0 / alpha)
    return proc.log_sup_wealth(m, upper=False) >= level, proc.log_sup_wealth(m, upper=True) >= level


def _betting_cs(values: Sequence[float], alpha: float, required: float) -> tuple[float, float, bool, bool]:
    """Hedged betting CS at n = len(values), intersected over all s <= n, and whether it excludes ``required``.

    Returns ``(low, high, above, below)``: ``above`` when every m <= required is rejected (the CS lies above
    ``required``), ``below`` when every m >= required is. ``low > high`` means the CS is empty (see decide_bounded).
    """
    proc = _CapitalProcesses(values, alpha)
    level = math.log(2.0 / alpha)  # theta = 1/2: a side rejects m once theta K(m) >= 1/alpha

    def lower(u: float) -> float:  # u = m
        return proc.log_sup_wealth(u, upper=False) - level

    def upper(u: float) -> float:  # u = -m, so that rejection is again "u small"
        return proc.log_sup_wealth(-u, upper=True) - level

    n = len(values)
    mean = math.fsum(values) / n
    # starting guesses for the bounds: a Bernstein-like width, plus the cap's 1/n term
    spread = math.sqrt(2.0 * proc.variance * level / n)
    w_low = _GUESS_SCALE * (spread + level * mean / (_BET_TRUNCATION * n)) + 1e-6
    w_high = _GUESS_SCALE * (spread + level * (1.0 - mean) / (_BET_TRUNCATION * n)) + 1e-6
    g_req = lower(required)
    above = g_req >= 0.0
    low = _cs_end(lower, 0.0, 1.0, required, g_req, mean - w_low, _GUESS_STEP * w_low)
    g_req = upper(-required)
    below = g_req >= 0.0
    high = -_cs_end(upper, -1.0, 0.0, -required, g_req, -(mean + w_high), _GUESS_STEP * w_high)
    return low, high, above, below


# --------------------------------------------------------------------------------------------------------------
# Leveugle et al. (DATE 2009) fixed sample sizes


@dataclass(frozen=True)
class SampleSize:
    """A fixed number of single-fault injections and the assumptions that produced it."""

    n: int
    population: int
    confidence: float
    margin: float
    p: float


def leveugle_sample_size(
    population: int, confidence: float = 0.99, margin: float = 0.01, p: float = 0.5
) -> SampleSize:
    """n = N / (1 + e^2 (N-1) / (t^2 p (1-p))), rounded up; p = 0.5 is the worst case.

    The margin is forgiven a relative excess of 1e-6 before rounding up: the published table has 9,581 for
    N = 4,063,170 at 95% / 1%, where the exact formula gives 9,581.004. The forgiveness is applied to the margin, not
    to n, because with the finite-population correction a small relative change in n can move the margin by more
    (when n is a large share of N). So the achieved margin never exceeds the requested one by more than 1e-6 relative,
    far below the precision of the normal approximation itself, and n is the smallest size that achieves that.
    """
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population!r}")
    _check_probability(confidence, "confidence", open_interval=True)
    _check_probability(margin, "margin", open_interval=True)
    _check_probability(p, "p", open_interval=True)
    t = normal_quantile(0.5 + 0.5 * confidence)
    forgiven = margin * (1.0 + 1e-6)
    raw = population / (1.0 + forgiven * forgiven * (population - 1) / (t * t * p * (1.0 - p)))
    n = max(1, min(population, math.ceil(raw)))
    return SampleSize(n=n, population=population, confidence=confidence, margin=margin, p=p)


def leveugle_margin(population: int, n: int, confidence: float, p_hat: float) -> float:
    """Margin achieved by n injections, e = t sqrt(p(1-p)/n (N-n)/(N-1)), with finite-population correction."""
    if population < 1 or not 1 <= n <= population:
        raise ValueError(f"need 1 <= n <= population, got n={n!r}, population={population!r}")
    _check_probability(confidence, "confidence", open_interval=True)
    _check_probability(p_hat, "p_hat", open_interval=False)
    if population == 1:
        return 0.0
    t = normal_quantile(0.5 + 0.5 * confidence)
    return t * math.sqrt(p_hat * (1.0 - p_hat) / n * (population - n) / (population - 1))


# --------------------------------------------------------------------------------------------------------------
# thresholds and verdicts


def _fmt(value: float) -> str:
    """At least two decimals, up to four, without trailing zeros beyond two: 0.8 -> 0.80, 0.8512 -> 0.8512."""
    text = f"{value:.4f}".rstrip("0")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{value:.{max(2, decimals)}f}"


@dataclass(frozen=True)
class Threshold:
    """The release requirement: an absolute floor (min_acc) or an allowed drop from the fault-free quantized model."""

    min_acc: float | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        check_threshold(self.min_acc, self.max_drop)

    def required_accuracy(self, quantized_accuracy: float) -> float:
        """Accuracy the faulty model must reach; a drop below 0 is clipped (the requirement is then void)."""
        if self.min_acc is not None:
            return self.min_acc
        _check_probability(quantized_accuracy, "quantized_accuracy", open_interval=False)
        assert self.max_drop is not None
        return max(0.0, quantized_accuracy - self.max_drop)

    def describe(self, quantized_accuracy: float | None = None) -> str:
        """Human-readable form; with max_drop and a known quantized accuracy it also shows the resulting floor."""
        if self.min_acc is not None:
            return f"min_acc={_fmt(self.min_acc)}"
        assert self.max_drop is not None
        text = f"max_drop={_fmt(self.max_drop)}"
        if quantized_accuracy is not None:
            text += f" (>= {self.required_accuracy(quantized_accuracy):.4f})"
        return text


@dataclass(frozen=True)
class Decision:
    """The verdict at one look, with the interval that produced it.

    ``ci_low``/``ci_high``: for the binomial gate, the Clopper-Pearson bounds at this look's level ``1 - alpha_k``;
    for the bounded (weight) gate, the betting confidence sequence at this look. Either way the sequence of them over
    all looks is simultaneously valid at ``confidence`` (the plan's overall level), which is what is stored here.
    """

    verdict: Verdict
    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    look: int
    method: str

    def __post_init__(self) -> None:
        _check_probability(self.confidence, "confidence", open_interval=True)
        if self.look < 0:
            raise ValueError(f"look must be >= 0, got {self.look!r}")
        if not 0.0 <= self.ci_low <= self.ci_high <= 1.0:
            raise ValueError(f"need 0 <= ci_low <= ci_high <= 1, got [{self.ci_low!r}, {self.ci_high!r}]")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (verdict as its string value)."""
        return {
            "verdict": self.verdict.value,
            "estimate": self.estimate,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "confidence": self.confidence,
            "look": self.look,
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Inverse of :meth:`to_dict`; raises KeyError/ValueError on missing or malformed fields."""
        return cls(
            verdict=Verdict(data["verdict"]),
            estimate=float(data["estimate"]),
            ci_low=float(data["ci_low"]),
            ci_high=float(data["ci_high"]),
            confidence=float(data["confidence"]),
            look=int(data["look"]),
            method=str(data["method"]),
        )


def _verdict(ci_low: float, ci_high: float, required: float) -> Verdict:
    if ci_low >= required:
        return Verdict.PASS
    if ci_high < required:
        return Verdict.FAIL
    return Verdict.INCONCLUSIVE


_SCHEDULES = ("doubling", "fixed")
BETTING_METHOD = "betting-cs (hedged, Waudby-Smith & Ramdas 2023)"


@dataclass(frozen=True)
class SequentialPlan:
    """Checkpoints (trial counts) at which the verdict is evaluated, and the alpha spent at each (binomial gate).

    Alpha spending applies to :meth:`decide_binomial` only; :meth:`decide_bounded` uses a confidence sequence that is
    valid at every trial count at once and therefore judges every look at the full alpha.

    Alpha spending: look k spends ``alpha_k = alpha * 6 / (pi^2 (k+1)^2)``, whose sum over all k >= 0 is exactly
    alpha (Basel series), so any number of looks stays within alpha. It was chosen over ``alpha / 2^(k+1)`` because
    it decays polynomially: late looks, where near-threshold campaigns are decided, keep a usable level (look 6 gets
    alpha/81 instead of alpha/128; look 20, alpha/268 instead of alpha/2e6). It does not depend on the budget, so the
    plan must not be changed mid-campaign unless the looks already taken stay a prefix of the new checkpoints. The
    price: a single look (first == budget) runs at 0.61 alpha.
    """

    confidence: float = 0.95
    first: int = 4
    budget: int = 256
    schedule: str = "doubling"

    def __post_init__(self) -> None:
        _check_probability(self.confidence, "confidence", open_interval=True)
        if self.first < 1:
            raise ValueError(f"first must be >= 1, got {self.first!r}")
        if self.budget < self.first:
            raise ValueError(f"budget must be >= first ({self.first}), got {self.budget!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    def checkpoints(self) -> list[int]:
        """B, 2B, 4B, ... ("doubling") or B, 2B, 3B, ... ("fixed"), always ending exactly at the budget."""
        points: list[int] = []
        c = self.first
        while c < self.budget:
            points.append(c)
            c = 2 * c if self.schedule == "doubling" else c + self.first
        points.append(self.budget)
        return points

    def _num_looks(self) -> int:
        """len(checkpoints()) without building the list (alpha_at is called once per look)."""
        if self.schedule == "fixed":
            return -(-self.budget // self.first)
        looks, c = 1, self.first
        while c < self.budget:
            looks, c = looks + 1, 2 * c
        return looks

    def alpha_at(self, look: int) -> float:
        """Error probability spent at look ``look`` (0-based)."""
        if not 0 <= look < self._num_looks():
            raise ValueError(f"look must be in [0, {self._num_looks()}), got {look!r}")
        return self.alpha * 6.0 / (math.pi**2 * (look + 1) ** 2)

    def _look(self, trials: int) -> int:
        points = self.checkpoints()
        try:
            return points.index(trials)
        except ValueError:
            raise ValueError(f"trials={trials!r} is not a checkpoint of this plan: {points}") from None

    def decide_binomial(self, successes: int, n_obs: int, trials: int, required: float) -> Decision:
        """Transient sites: pooled image outcomes, exact Clopper-Pearson at level 1 - alpha_k."""
        look = self._look(trials)
        _check_counts(successes, n_obs)
        _check_probability(required, "required", open_interval=False)
        low, high = clopper_pearson_interval(successes, n_obs, 1.0 - self.alpha_at(look))
        return Decision(
            verdict=_verdict(low, high, required),
            estimate=successes / n_obs if n_obs else 0.0,
            ci_low=low,
            ci_high=high,
            confidence=self.confidence,
            look=look,
            method="clopper-pearson+alpha-spending",
        )

    def decide_bounded(self, values: Sequence[float], required: float) -> Decision:
        """Weight site: per-trial accuracies in [0, 1], one i.i.d. observation per trial, judged with a betting
        confidence sequence (Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting",
        JRSS-B 2023: hedged capital process with predictable plug-in bets, their Section 4).

        Construction, for a candidate mean m, with c = 0.85 and theta = 1/2 (c/0 means no cap):

        - bets ``lambda_t = sqrt(2 ln(2/alpha) / (sigma2_{t-1} t ln(1+t)))`` from the regularized running mean and
          variance of x_1..x_{t-1} (one fake observation with mean 1/2 and variance 1/4), so they are predictable;
        - ``K+_s(m) = prod_{i<=s} (1 + min(lambda_i, c/m) (x_i - m))`` and
          ``K-_s(m) = prod_{i<=s} (1 - min(lambda_i, c/(1-m)) (x_i - m))``: every factor is >= 1 - c > 0, and when
          the mean really is m (and the trials are i.i.d., or merely have conditional mean m given the past) both
          are nonnegative martingales with initial value 1;
        - m is rejected at time s when ``max(theta K+_s(m), (1-theta) K-_s(m)) >= 1/alpha``. This hedged process is at
          most ``theta K+ + (1-theta) K-``, itself a nonnegative martingale started at 1, so by Ville's inequality
          ``P(exists s: the true mean is rejected at s) <= alpha``;
        - the reported ``[ci_low, ci_high]`` at n is the set of m not rejected at *any* s <= n (the running
          intersection of the paper's C_s, still a confidence sequence, and nested: it only shrinks as trials
          arrive). K+ is nonincreasing and K- nondecreasing in m, so that set is an interval; its ends are found by
          Brent's method to 1e-7, rounded to the conservative side.

        Guarantee: ``P(exists n: mean not in [ci_low, ci_high] at n) <= alpha``, uniformly over all trial counts.
        A wrong PASS needs the true mean rejected by K+ (probability <= theta alpha = alpha/2 by Ville), a wrong FAIL
        by K- (<= alpha/2), so the probability that any look, at any time and under any stopping rule, gives a
        wrong verdict is <= alpha. Hence, unlike :meth:`decide_binomial`, no alpha is spent across looks: every
        look uses the full alpha. ``len(values)`` must still be a checkpoint (ValueError otherwise), because the
        campaign's verdict is defined on the prefix up to its first decisive checkpoint; for the CS that restriction
        is harmless (it is valid at every n), and the checkpoints' alpha_k are simply not used.

        The CS need not contain the sample mean (``estimate``): it keeps the evidence of every earlier time, so an
        unusual order can exclude it (five zeros then five ones at 90%: five zeros already rule out 1/2). An empty CS
        (each side rejecting what the other keeps: a miss, so probability <= alpha under the model, or trials that
        are not i.i.d.) is reported as [0, 1], i.e. INCONCLUSIVE.

        Cost: O(n) per evaluation of the capital processes (a few C-level passes over the trials), about 8-18
        evaluations per call: two at ``required`` decide the verdict, the rest locate the bounds. About 1 ms at
        n = 256 and 9 ms at n = 4096 on a slow shared machine (CPython 3.11).

        What distribution-freeness costs: nothing can rule out a minority of catastrophic trials that has not shown
        up yet, so PASS needs enough trials for that to be unlikely. Trials that all read x against a requirement
        m < x could come from a law putting mass just over 1 - m/x at 0 (mean below m), whose first n trials miss
        that mass with probability (m/x)^n. A gate that PASSes the constant data with probability pi by n trials
        therefore PASSes that law wrongly with probability about pi (m/x)^n, and a wrong-PASS rate <= alpha/2 needs
        pi <= (alpha/2) (x/m)^n: no valid gate PASSes reliably before n = ln(2/alpha) / ln(x/m) (3 points above 0.80
        at 95%: 100 trials; the cap c puts this one at 118, i.e. the 128-trial look). FAIL is cheaper, since the
        hidden mass would sit at 1, close to the data (3 points below 0.80: 27 trials; this gate, 64).
        """
        look = self._look(len(values))
        _check_probability(required, "required", open_interval=False)
        # fast range check: min/max may skip a NaN, the sum does not
        total = math.fsum(values) if 0.0 <= min(values) and max(values) <= 1.0 else math.nan
        if math.isnan(total):
            for v in values:
                _check_probability(v, "each value", open_interval=False)
        low, high, above, below = _betting_cs(values, self.alpha, required)
        if below:  # every m >= required is rejected: the CS lies strictly below required
            high = min(high, math.nextafter(required, -math.inf))
        if low > high:
            low, high = 0.0, 1.0
        low, high = max(0.0, low), min(1.0, high)
        return Decision(
            verdict=_verdict(low, high, required),
            estimate=total / len(values),
            ci_low=low,
            ci_high=high,
            confidence=self.confidence,
            look=look,
            method=BETTING_METHOD,
        )
