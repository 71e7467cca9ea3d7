"""Images needed for a release verdict: sequential plan vs the fixed Leveugle sample size.

Simulates campaigns whose true accuracy sits ``--gap`` above and below the threshold and reports the mean number of
trials and of images evaluated until the plan's verdict (campaigns that end INCONCLUSIVE count their whole budget).
The reference is Leveugle et al. (DATE 2009) at 99% / 1% margin, whose n counts single-fault injections, i.e. one
image evaluated each; the sequential plan evaluates trials * M images. Pure Python: needs only pytest_hwfault.stats.

Gates: act site, pooled Clopper-Pearson with alpha spending across looks; weight site, the betting confidence
sequence of SequentialPlan.decide_bounded (Waudby-Smith & Ramdas 2023), valid at every trial count and therefore
judged at the full alpha at every look. The weight site's previous gate (empirical Bernstein with Hoeffding-KL and
alpha spending) needed 2,018 trials on average on the "weight" rows at the defaults (2000 campaigns, seed 0;
Lev/seq 0.06). Column "<=256" is the share of campaigns decided within 256 trials, the budget of a real campaign.

Populations (N, the number of possible faults):
- act site: ResNet56 (CIFAR, option A shortcuts) int8 outputs of every conv/linear layer for one 32x32 image,
  532,490 values x 8 bits = 4,259,920. (Counting all 10,000 test images multiplies N, which changes n by < 0.5%.)
- weight site: ResNet-20 fp32 parameters x 32 bits x stuck-at-0/1 = 269,722 x 64 = 17,262,208 (field notes, ~16.6k).

Trial models (stated assumptions, not measurements):
- act (transient, pooled): each trial is M independent Bernoulli(p) images (Binomial(M, p) drawn exactly).
- weight (persistent, trial is the unit): trial accuracy = Binomial(M, p_t) / M with p_t ~ Normal(p, --trial-sd)
  rounded to 0.001 and clipped to [0, 1] (one shared fault set per trial moves all its images together).
- weight-skewed: the same, except that a share --catastrophic of the trials (a high bit of a large weight) has
  p_t = --catastrophic-acc; the other trials' p is raised so that the mean stays at the row's true accuracy. This is
  the hard case for any distribution-free gate: a few bad trials can hide behind many good ones.

Example: python benchmarks/bench_sequential.py --campaigns 2000 --seed 0 --json /tmp/bench_sequential.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_hwfault.stats import SequentialPlan, Verdict, leveugle_sample_size, normal_quantile  # noqa: E402

RESNET56_ACT_BITS = 532_490 * 8
RESNET20_WEIGHT_STUCK_AT = 269_722 * 32 * 2


@cache
def _cdf_table(m: int, p: float) -> tuple[float, ...]:
    total, table = 0.0, []
    for k in range(m + 1):
        total += math.comb(m, k) * p**k * (1.0 - p) ** (m - k)
        table.append(total)
    return tuple(table)


def _draw(rng: random.Random, m: int, p: float) -> int:
    table = _cdf_table(m, p)
    return min(bisect.bisect_right(table, rng.random() * table[-1]), m)


@dataclass
class Row:
    site: str
    population: int
    leveugle_n: int
    fixed_n_same_power: int | None
    true_acc: float
    required: float
    campaigns: int
    pass_rate: float
    fail_rate: float
    inconclusive_rate: float
    wrong_rate: float
    mean_trials: float
    mean_images: float
    p95_images: float
    leveugle_over_sequential: float
    decided_by_256: float
    seconds: float


class _BinomialStep:
    def __init__(self, plan: SequentialPlan, m: int, p: float, required: float) -> None:
        self.plan, self.m, self.p, self.required = plan, m, p, required
        self.successes = self.trials = 0
        self._decide = cache(self._decide_uncached)

    def reset(self) -> None:
        self.successes = self.trials = 0

    def _decide_uncached(self, successes: int, trials: int) -> Verdict:
        return self.plan.decide_binomial(successes, trials * self.m, trials, self.required).verdict

    def __call__(self, rng: random.Random, checkpoint: int) -> Verdict:
        while self.trials < checkpoint:
            self.successes += _draw(rng, self.m, self.p)
            self.trials += 1
        return self._decide(self.successes, self.trials)


class _BoundedStep:
    def __init__(self, plan: SequentialPlan, m: int, p: float, sd: float, required: float,
                 catastrophic: float = 0.0, catastrophic_acc: float = 0.0) -> None:
        self.plan, self.m, self.sd, self.required = plan, m, sd, required
        self.catastrophic, self.catastrophic_acc = catastrophic, catastrophic_acc
        # benign trials' mean, so that the mixture's mean is p
        self.p = (p - catastrophic * catastrophic_acc) / (1.0 - catastrophic)
        self.values: list[float] = []

    def reset(self) -> None:
        self.values = []

    def __call__(self, rng: random.Random, checkpoint: int) -> Verdict:
        while len(self.values) < checkpoint:
            if self.catastrophic and rng.random() < self.catastrophic:
                p_t = self.catastrophic_acc
            else:
                p_t = min(1.0, max(0.0, round(rng.gauss(self.p, self.sd), 3)))
            self.values.append(_draw(rng, self.m, p_t) / self.m)
        return self.plan.decide_bounded(self.values, self.required).verdict


def _simulate(
    plan: SequentialPlan, campaigns: int, seed: int, step: _BinomialStep | _BoundedStep
) -> list[tuple[Verdict, int]]:
    """step(rng, checkpoint) draws trials up to checkpoint and returns the look's verdict."""
    out = []
    for c in range(campaigns):
        rng = random.Random(seed * 1_000_003 + c)
        step.reset()
        verdict, trials = Verdict.INCONCLUSIVE, 0
        for trials in plan.checkpoints():
            verdict = step(rng, trials)
            if verdict is not Verdict.INCONCLUSIVE:
                break
        out.append((verdict, trials))
    return out


def _row(site: str, population: int, args: argparse.Namespace, plan: SequentialPlan, true_acc: float) -> Row:
    leveugle = leveugle_sample_size(population, confidence=args.confidence, margin=0.01).n
    # What a fixed design would need if the gap were known in advance: a single 99% interval that excludes the
    # threshold with probability 0.99 at this gap (normal approximation, binomial variance at the threshold).
    z = normal_quantile(0.5 + 0.5 * args.confidence) + normal_quantile(0.99)
    same_power = math.ceil((z / args.gap) ** 2 * args.required * (1.0 - args.required)) if site == "act" else None
    step: _BinomialStep | _BoundedStep
    if site == "act":
        step = _BinomialStep(plan, args.images_per_trial, true_acc, args.required)
    elif site == "weight":
        step = _BoundedStep(plan, args.images_per_trial, true_acc, args.trial_sd, args.required)
    else:
        step = _BoundedStep(plan, args.images_per_trial, true_acc, args.trial_sd, args.required,
                            args.catastrophic, args.catastrophic_acc)
    start = time.perf_counter()
    results = _simulate(plan, args.campaigns, args.seed, step)
    seconds = time.perf_counter() - start
    n = len(results)
    images = sorted(t * args.images_per_trial for _, t in results)
    wrong = Verdict.PASS if true_acc < args.required else Verdict.FAIL
    mean_images = sum(images) / n
    return Row(
        site=site,
        population=population,
        leveugle_n=leveugle,
        fixed_n_same_power=same_power,
        true_acc=true_acc,
        required=args.required,
        campaigns=n,
        pass_rate=sum(v is Verdict.PASS for v, _ in results) / n,
        fail_rate=sum(v is Verdict.FAIL for v, _ in results) / n,
        inconclusive_rate=sum(v is Verdict.INCONCLUSIVE for v, _ in results) / n,
        wrong_rate=sum(v is wrong for v, _ in results) / n,
        mean_trials=sum(t for _, t in results) / n,
        mean_images=mean_images,
        p95_images=images[min(n - 1, math.ceil(0.95 * n) - 1)],
        leveugle_over_sequential=leveugle / mean_images,
        decided_by_256=sum(v is not Verdict.INCONCLUSIVE and t <= 256 for v, t in results) / n,
        seconds=seconds,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--campaigns", type=int, default=2000, help="simulated campaigns per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--confidence", type=float, default=0.99)
    parser.add_argument("--required", type=float, default=0.80, help="accuracy threshold")
    parser.add_argument("--gap", type=float, default=0.03, help="|true accuracy - threshold|")
    parser.add_argument("--images-per-trial", type=int, default=128, help="M (one batch of 128)")
    parser.add_argument("--first", type=int, default=4, help="first checkpoint, trials")
    parser.add_argument("--budget", type=int, default=256, help="act-site budget, trials")
    parser.add_argument("--weight-budget", type=int, default=4096, help="weight-site budget, trials")
    parser.add_argument("--trial-sd", type=float, default=0.02, help="sd of the weight site's per-trial accuracy")
    parser.add_argument("--catastrophic", type=float, default=0.1, help="weight-skewed: share of catastrophic trials")
    parser.add_argument("--catastrophic-acc", type=float, default=0.2,
                        help="weight-skewed: accuracy of a catastrophic trial")
    parser.add_argument("--sites", default="act,weight,weight-skewed",
                        help="comma-separated subset of act,weight,weight-skewed")
    args = parser.parse_args(argv)

    rows: list[Row] = []
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    for site in sites:
        if site not in ("act", "weight", "weight-skewed"):
            parser.error(f"unknown site {site!r}")
        budget = args.budget if site == "act" else args.weight_budget
        plan = SequentialPlan(confidence=args.confidence, first=args.first, budget=budget)
        population = RESNET56_ACT_BITS if site == "act" else RESNET20_WEIGHT_STUCK_AT
        for sign in (+1, -1):
            rows.append(_row(site, population, args, plan, round(args.required + sign * args.gap, 6)))

    print(f"confidence {args.confidence}, threshold {args.required}, gap {args.gap}, M = {args.images_per_trial} "
          f"images/trial, doubling from {args.first} trials, {args.campaigns} campaigns/scenario, seed {args.seed}")
    print("populations: act = ResNet56 int8 act bits 4,259,920; weight = ResNet-20 fp32 weights x 32 x stuck-at-0/1 "
          "17,262,208")
    header = (f"{'site':13} {'true':>5} {'Leveugle n':>10} {'fixed n':>8} {'pass':>6} {'fail':>6} {'inc':>6} "
              f"{'wrong':>6} {'trials':>8} {'images':>9} {'p95 img':>8} {'Lev/seq':>8} {'<=256':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        fixed = "-" if r.fixed_n_same_power is None else f"{r.fixed_n_same_power:,d}"
        print(f"{r.site:13} {r.true_acc:5.2f} {r.leveugle_n:10,d} {fixed:>8} {r.pass_rate:6.3f} "
              f"{r.fail_rate:6.3f} {r.inconclusive_rate:6.3f} {r.wrong_rate:6.3f} {r.mean_trials:8.1f} "
              f"{r.mean_images:9,.0f} {r.p95_images:8,.0f} {r.leveugle_over_sequential:8.2f} "
              f"{r.decided_by_256:6.3f}")
    print("Lev/seq = Leveugle n (99%, e=1%) / mean images evaluated by the sequential plan (>1: sequential cheaper).")
    print("<=256 = share of campaigns decided within 256 trials.")
    print("fixed n = images a single fixed-size 99% look needs to decide with 99% power at this gap, if the gap were")
    print("known in advance (act site only; normal approximation at the threshold). Counts are means over campaigns;")
    print("INCONCLUSIVE campaigns count their whole budget.")
    if args.json is not None:
        payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
