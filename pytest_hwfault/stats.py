"""Intervals, sample sizes and sequential release verdicts for fault-injection campaigns.

Pure Python (stdlib only) so that verdicts can be recomputed, merged and audited without torch.

How a campaign is judged
------------------------
A campaign runs trials 0, 1, 2, ...; each trial evaluates M images under freshly sampled faults. A
:class:`SequentialPlan` fixes, *before* the campaign starts, the trial counts (checkpoints) at which the verdict is
evaluated and the error probability ``alpha_k`` spent at look ``k``.

Anytime-valid guarantee. Look ``k`` uses an interval at level ``1 - alpha_k`` with
``sum_k alpha_k <= alpha = 1 - confidence``. By the union bound over the finite set of checkpoints, the probability
that *any* look's interval misses the true accuracy is at most ``alpha``. A wrong PASS (``ci_low >= required`` while
the true accuracy is below ``required``) or a wrong FAIL (``ci_high < required`` while it is at or above) needs such
a miss, so the probability that any look gives a wrong verdict is at most ``alpha``, however early the campaign stops
and whichever look it stops at. (Each wrong direction needs a miss on one particular side of a two-sided interval, so
it is in fact at most ``alpha / 2``; the reported ``[ci_low, ci_high]`` form an honest two-sided confidence sequence
at level ``confidence``.) Judging every look at the full ``alpha`` instead inflates the error well above ``alpha``
(about 2 alpha per direction with 7 looks near the threshold; tests/test_sequential_simulation.py shows it).

Transient sites ("act", "acc", "input"): image outcomes are pooled as one binomial count (successes = correct images,
n = trials * M), judged with an exact Clopper-Pearson interval. Pooling is conservative when images differ in how
often they survive: with independent per-image Bernoulli(p_i) outcomes the variance
``sum p_i (1 - p_i) = n p(1-p) - sum (p_i - p)^2`` never exceeds the binomial variance at the pooled mean p, and
Hoeffding (1956) shows the binomial also has the heavier tails beyond one unit from the mean, which is where the
interval's bounds sit. This needs transient faults drawn independently per image.

Persistent site ("weight"): one sampled fault set is shared by all M images of a trial, so the images' outcomes are
correlated (a fault that breaks one image tends to break many). Pooling them would overstate the information by up to
a factor M. The trial is therefore the unit: the observations are per-trial accuracies in [0, 1], i.i.d. across
trials, judged with a bound that holds for any distribution on [0, 1] (empirical Bernstein intersected with the
relative-entropy form of Hoeffding's bound).

Fixed-size planning (Leveugle et al., DATE 2009) is provided for comparison and for single-fault enumerations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

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


def _bernoulli_kl(p: float, q: float) -> float:
    """KL(Bernoulli(p) || Bernoulli(q)); infinite when q sits on a boundary that p does not."""
    total = 0.0
    if p > 0.0:
        if q <= 0.0:
            return math.inf
        total += p * math.log(p / q)
    if p < 1.0:
        if q >= 1.0:
            return math.inf
        total += (1.0 - p) * math.log((1.0 - p) / (1.0 - q))
    return total


def _kl_bound(mean: float, level: float, upper: bool) -> float:
    """Farthest q on one side of mean with kl(mean, q) <= level (bisection; kl grows monotonically away from mean)."""
    near, far = mean, (1.0 if upper else 0.0)
    if _bernoulli_kl(mean, far) <= level:
        return far
    for _ in range(100):
        mid = 0.5 * (near + far)
        if _bernoulli_kl(mean, mid) <= level:
            near = mid
        else:
            far = mid
        if abs(far - near) <= 1e-15:
            break
    return near


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

    Rounding forgives a relative excess of 1e-6 before rounding up: the published table has 9,581 for
    N = 4,063,170 at 95% / 1%, where the formula gives 9,581.004. The achieved margin then exceeds the requested one
    by at most 5e-7 relative, far below the precision of the normal approximation itself.
    """
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population!r}")
    _check_probability(confidence, "confidence", open_interval=True)
    _check_probability(margin, "margin", open_interval=True)
    _check_probability(p, "p", open_interval=True)
    t = normal_quantile(0.5 + 0.5 * confidence)
    raw = population / (1.0 + margin * margin * (population - 1) / (t * t * p * (1.0 - p)))
    n = max(1, min(population, math.ceil(raw * (1.0 - 1e-6))))
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
        if (self.min_acc is None) == (self.max_drop is None):
            raise ValueError("set exactly one of min_acc or max_drop (each in [0, 1])")
        for name, value in (("min_acc", self.min_acc), ("max_drop", self.max_drop)):
            if value is not None:
                _check_probability(value, name, open_interval=False)

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

    ``ci_low``/``ci_high`` are the bounds at this look's level ``1 - alpha_k``; the sequence of them over all looks
    is simultaneously valid at ``confidence`` (the plan's overall level), which is what is stored here.
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


@dataclass(frozen=True)
class SequentialPlan:
    """Checkpoints (trial counts) at which the verdict is evaluated, and the alpha spent at each.

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
        """Weight site: per-trial accuracies in [0, 1], one observation per trial.

        The look's alpha_k is split evenly between two bounds that hold for any distribution on [0, 1], and their
        intersection is reported (valid by the union bound):
        - empirical Bernstein (Maurer & Pontil 2009, Thm 4), tight once the per-trial spread is small and n large;
        - Hoeffding's relative-entropy bound (Hoeffding 1963, Thm 1), tight for small n and means near 0 or 1. It
          implies the familiar sqrt(ln(2/delta) / 2n) form (Pinsker), so it is never wider.

        Distribution-free bounds are expensive: Maurer-Pontil's 7 ln(8/alpha_k) / (3(n-1)) term alone must fall
        below the gap to the threshold, so a 3-point gap at 99% takes about 2,000 trials whatever the spread
        (benchmarks/bench_sequential.py). Some of that is inherent (a few catastrophic trials can hide behind many
        good ones, so tens of trials never suffice without assumptions); betting confidence sequences
        (Waudby-Smith & Ramdas 2023) would be tighter, at the cost of a more complex computation.
        """
        look = self._look(len(values))
        _check_probability(required, "required", open_interval=False)
        for v in values:
            _check_probability(v, "each value", open_interval=False)
        n = len(values)
        alpha_k = self.alpha_at(look)
        mean = math.fsum(values) / n
        # Hoeffding-KL, two-sided at alpha_k / 2: each side alpha_k / 4.
        level = math.log(4.0 / alpha_k) / n
        low, high = _kl_bound(mean, level, upper=False), _kl_bound(mean, level, upper=True)
        if n >= 2:
            # Maurer-Pontil: E X <= mean + sqrt(2 V ln(2/d) / n) + 7 ln(2/d) / (3 (n-1)), per side d = alpha_k / 4.
            var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
            log_term = math.log(8.0 / alpha_k)
            half = math.sqrt(2.0 * var * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))
            low, high = max(low, mean - half), min(high, mean + half)
        low, high = max(0.0, low), min(1.0, high)
        return Decision(
            verdict=_verdict(low, high, required),
            estimate=mean,
            ci_low=low,
            ci_high=high,
            confidence=self.confidence,
            look=look,
            method="empirical-bernstein+hoeffding-kl+alpha-spending",
        )
