"""The seed study's report: every checkpoint of the plan under activation bit flips; writes RESULTS.md and plots.

    python examples/resnet56/report.py              # the whole plan (examples/resnet56/study.py), both stand-ins

For each checkpoint of the plan: quantize it with pytest-hwfault (int8, per-channel weights, per-tensor activations,
max calibration on the first 512 training images), read its scales, and run a fixed number of statistical bit-flip
trials at every BER of the grid with `pytest_hwfault.campaign.Campaign`, on the whole test split. Models of one depth
see the same fault draws (common random numbers: trial i flips the same bits in every ResNet56), which makes the
comparisons paired. Accuracy under faults is pooled over trials x images, with a 95% Clopper-Pearson interval.

Resilience is summarised three ways:

* ``AUC``: the mean accuracy under faults over log10(BER) across the grid (trapezoids), in [0, 1];
* ``retained``: AUC / fault-free int8 accuracy: the share of its accuracy a model keeps under faults, apart from
  how accurate it is without them (AUC and acc@ref mix the two);
* ``acc@ref``: accuracy at the reference BER of a data set and depth, the first grid BER where the vanilla models
  (mean over seeds) have lost at least 10 points of their fault-free int8 accuracy.

Seed-level statistics: for each claim the per-seed differences (paired by training seed), their mean with a 95%
t-interval, and a paired t-test over seeds. Measurements are cached per checkpoint in ``results/<stem>.json`` (keyed
by the checkpoint's SHA-256 and the campaign settings), so a rerun only measures what changed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import DIGITS, PHOTOS, Split, load  # noqa: E402
from study import (  # noqa: E402
    DEPTH_CHECK,
    HEADLINE_DEPTH,
    SEEDS,
    STAND_INS,
    SWEEP_DEPTH,
    Run,
    base,
    depth_check,
    eps_points,
    headline,
    wd_points,
)
from train import EPS, RECIPES, eps_text, evaluate  # noqa: E402

from pytest_hwfault import quantize  # noqa: E402
from pytest_hwfault.campaign import Campaign, unpack_mask  # noqa: E402
from pytest_hwfault.cifar_resnet import CifarResNet  # noqa: E402
from pytest_hwfault.spec import CampaignSpec  # noqa: E402
from pytest_hwfault.stats import clopper_pearson_interval  # noqa: E402

BERS = (1e-4, 3e-4, 1e-3, 2e-3, 4e-3, 8e-3)  # around the knees of ResNet20 and ResNet56 on both stand-ins
CALIBRATION_IMAGES = 512
REFERENCE_DROP = 0.10
ALPHA = 0.05
UNDERTRAINED = 0.10  # sweep points this far below vanilla's fault-free accuracy are not judged for resilience
PGD_MARGIN = 0.03  # the remedy keeps robustness: PGD accuracy >= adversarial - 3 points (per seed, on average)
RESULTS = HERE / "results"
LABELS = {"vanilla": "vanilla", "adversarial": "adversarial (PGD-7)", "adversarial_wd": "adversarial + wd 1e-2"}
DATA_LABELS = {DIGITS: "digits (scikit-learn, 8x8 upsampled)", PHOTOS: "photos (scikit-image crops)"}


# -- measuring one checkpoint ----------------------------------------------------------------------------------------
@dataclass
class Point:
    ber: float
    accuracy: float
    ci_low: float
    ci_high: float
    faults_per_image: float
    correct: str = field(repr=False)  # hex of the packed per-(trial, image) correctness: the paired comparisons

    def mask(self) -> list[bool]:
        bits = bin(int(self.correct, 16))[3:]  # a leading 1 keeps the leading zeros
        return [b == "1" for b in bits]


@dataclass
class Measured:
    stem: str
    key: dict
    provenance: dict
    quantized_accuracy: float
    act_scale_mean: float
    act_scale_max: float
    weight_scale_max: float
    curve: list[Point]
    pgd_8_255: float  # PGD-7 at 8/255 (step 2/255) on the whole test split: one yardstick across the eps sweep

    def at(self, ber: float) -> Point:
        return next(p for p in self.curve if p.ber == ber)

    @property
    def retained(self) -> float:
        """The AUC relative to the fault-free int8 accuracy: what faults take away, apart from how accurate the
        model is without them (AUC alone mixes the two)."""
        return self.auc / self.quantized_accuracy if self.quantized_accuracy > 0 else math.nan

    @property
    def auc(self) -> float:
        """Mean accuracy over log10(BER): trapezoids, normalised by the log-BER span."""
        xs = [math.log10(p.ber) for p in self.curve]
        ys = [p.accuracy for p in self.curve]
        area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
        return area / (xs[-1] - xs[0])


def _pack(mask: list[bool]) -> str:
    return format(int("1" + "".join("1" if ok else "0" for ok in mask), 2), "x")


def load_checkpoint(run: Run) -> tuple[CifarResNet, dict]:
    from study import CHECKPOINTS

    path = CHECKPOINTS / f"{run.stem}.pt"
    if not path.exists():
        raise SystemExit(f"{path} is missing: train it with python examples/resnet56/study.py train "
                         f"(or: python {shlex.join(run.argv())})")
    model = CifarResNet(run.depth)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval(), json.loads((CHECKPOINTS / f"{run.stem}.json").read_text())


def measure(run: Run, split: Split, args: argparse.Namespace) -> Measured:
    """Scales, the fault curve and PGD at 8/255 of one checkpoint, from the cache when its key matches."""
    model, provenance = load_checkpoint(run)
    key = {"state_sha256": provenance["state_sha256"], "bers": list(args.bers), "trials": args.trials,
           "images": len(split.x_test), "fault_seed": args.fault_seed, "calibration_images": CALIBRATION_IMAGES}
    cache = args.cache / f"{run.stem}.json"
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored["key"] == key:
            stored["curve"] = [Point(**p) for p in stored["curve"]]
            return Measured(**{**stored, "provenance": provenance})
    start = time.perf_counter()
    x, y = split.test
    qmodel = quantize(model, split.x_train[:CALIBRATION_IMAGES])
    layers = qmodel.summary()
    curve, quantized = [], math.nan
    for ber in args.bers:
        # min_acc=0 only satisfies the spec's "one threshold" rule: every trial is run, no verdict is used
        spec = CampaignSpec(site="act", ber=ber, min_acc=0.0, budget=args.trials, seed=args.fault_seed)
        campaign = Campaign(qmodel, x, y, spec, name="examples/resnet56/report.py::act")  # one name: paired draws
        quantized = campaign.quantized_accuracy
        trials = [campaign.trial(i) for i in range(args.trials)]
        correct, images = sum(t.correct for t in trials), sum(t.images for t in trials)
        low, high = clopper_pearson_interval(correct, images, 0.95)
        mask = [ok for t in trials for ok in unpack_mask(t.correct_mask, t.images)]
        curve.append(Point(ber, correct / images, low, high, sum(t.faults for t in trials) / images, _pack(mask)))
    pgd = provenance["pgd_accuracy"] if provenance["pgd"]["eps"] == EPS and provenance["pgd_images"] == len(x) \
        else evaluate(model, x, y, attack=True, seed=run.seed)
    measured = Measured(run.stem, key, provenance, quantized,
                        sum(layer["act_scale"] for layer in layers) / len(layers),
                        max(layer["act_scale"] for layer in layers),
                        max(layer["weight_scale_max"] for layer in layers), curve, pgd)
    args.cache.mkdir(parents=True, exist_ok=True)
    record = asdict(measured)
    del record["provenance"]
    cache.write_text(json.dumps(record, indent=1) + "\n")
    print(f"measured {run.stem} in {time.perf_counter() - start:.0f} s: int8 {quantized:.4f}, AUC "
          f"{measured.auc:.3f}, act scale mean {measured.act_scale_mean:.4f}", flush=True)
    return measured


# -- statistics ------------------------------------------------------------------------------------------------------
def mcnemar(a: Point, b: Point) -> float:
    """Exact two-sided McNemar p-value of two models on the same (trial, image) pairs."""
    ma, mb = a.mask(), b.mask()
    only_a = sum(1 for x, y in zip(ma, mb) if x and not y)
    only_b = sum(1 for x, y in zip(ma, mb) if y and not x)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


@dataclass(frozen=True)
class Paired:
    """Per-seed differences of a metric between two recipes, with a t-interval and a paired t-test over seeds."""

    diffs: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.diffs) / len(self.diffs)

    @property
    def sd(self) -> float:
        n = len(self.diffs)
        return math.sqrt(sum((d - self.mean) ** 2 for d in self.diffs) / (n - 1)) if n > 1 else math.nan

    def interval(self) -> tuple[float, float]:
        from scipy import stats

        n = len(self.diffs)
        if n < 2:
            return math.nan, math.nan
        half = stats.t.ppf(1 - ALPHA / 2, n - 1) * self.sd / math.sqrt(n)
        return self.mean - half, self.mean + half

    @property
    def p(self) -> float:
        from scipy import stats

        if len(self.diffs) < 2:
            return math.nan
        if self.sd == 0:
            return 0.0 if self.mean != 0 else 1.0
        return float(stats.ttest_1samp(self.diffs, 0.0).pvalue)

    def verdict(self, claimed_sign: int) -> str:
        """holds / reversed / not significant, for a claim that the difference has `claimed_sign`."""
        agree = sum(1 for d in self.diffs if d * claimed_sign > 0)
        if self.p < ALPHA:
            return "holds" if self.mean * claimed_sign > 0 else "reversed"
        lean = "same direction" if self.mean * claimed_sign > 0 else "opposite direction"
        return f"not significant ({lean}, {agree} of {len(self.diffs)} seeds agree)"


def paired(results: dict[tuple[str, int], Measured], a: str, b: str, metric) -> Paired:
    return Paired(tuple(metric(results[a, s]) - metric(results[b, s]) for s in SEEDS if (a, s) in results
                        and (b, s) in results))


def reference_ber(vanillas: list[Measured], bers: tuple[float, ...]) -> float | None:
    """First grid BER where the vanilla models, averaged, lose REFERENCE_DROP of their fault-free int8 accuracy."""
    clean = sum(m.quantized_accuracy for m in vanillas) / len(vanillas)
    for ber in bers:
        if sum(m.at(ber).accuracy for m in vanillas) / len(vanillas) <= clean - REFERENCE_DROP:
            return ber
    return None


# -- the report ------------------------------------------------------------------------------------------------------
def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def mean_sd(values: list[float], fmt: str) -> str:
    m = sum(values) / len(values)
    if len(values) < 2:
        return format(m, fmt)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{format(m, fmt)} ± {format(sd, fmt)}"


@dataclass
class Claim:
    data: str
    name: str
    verdict: str
    detail: str


def headline_section(data: str, results: dict[tuple[str, int], Measured], bers: tuple[float, ...],
                     claims: list[Claim]) -> list[str]:
    vanillas = [m for (r, _), m in results.items() if r == "vanilla"]
    ref = reference_ber(vanillas, bers)
    prov = next(iter(results.values())).provenance
    out = [f"## {DATA_LABELS[data]}: CifarResNet-{HEADLINE_DEPTH[data]}, 3 recipes x {len(SEEDS)} seeds", "",
           f"{prov['train_images']} train / {prov['test_images']} test images; {prov['epochs']} epochs, one-cycle "
           f"SGD to lr {prov['optimizer']['lr_max']:g}. Reference BER (the vanilla models lose "
           f"{pct(REFERENCE_DROP)} points on average): " + (f"**{ref:g}**." if ref else "none in the grid."), "",
           "| recipe | seed | clean | PGD-7 | int8 | act scale mean | act scale max | weight scale max "
           f"| acc@ref{f' ({ref:g})' if ref else ''} | AUC | retained |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (recipe, seed), m in sorted(results.items(), key=lambda kv: (list(RECIPES).index(kv[0][0]), kv[0][1])):
        p = m.at(ref) if ref else None
        out.append(f"| {LABELS[recipe]} | {seed} | {pct(m.provenance['clean_accuracy'])}% "
                   f"| {pct(m.provenance['pgd_accuracy'])}% | {pct(m.quantized_accuracy)}% | {m.act_scale_mean:.4f} "
                   f"| {m.act_scale_max:.4f} | {m.weight_scale_max:.4f} "
                   f"| {f'{pct(p.accuracy)}% [{pct(p.ci_low)}, {pct(p.ci_high)}]' if p else '-'} | {m.auc:.3f} "
                   f"| {m.retained:.3f} |")
    out += ["", "Mean ± standard deviation over seeds:", "",
            "| recipe | seeds | clean | PGD-7 | act scale mean | act scale max | acc@ref | AUC | retained |",
            "|---|---|---|---|---|---|---|---|---|"]
    for recipe in RECIPES:
        ms = [m for (r, _), m in results.items() if r == recipe]
        if not ms:
            continue
        cells = [mean_sd([100 * m.provenance["clean_accuracy"] for m in ms], ".1f"),
                 mean_sd([100 * m.provenance["pgd_accuracy"] for m in ms], ".1f"),
                 mean_sd([m.act_scale_mean for m in ms], ".4f"), mean_sd([m.act_scale_max for m in ms], ".4f"),
                 mean_sd([100 * m.at(ref).accuracy for m in ms], ".1f") if ref else "-",
                 mean_sd([m.auc for m in ms], ".3f"), mean_sd([m.retained for m in ms], ".3f")]
        out.append(f"| {LABELS[recipe]} | {len(ms)} | " + " | ".join(cells) + " |")
    out += ["", f"![accuracy vs BER, {data}](accuracy_vs_ber_{data}.png)", "",
            "Paired over training seeds (seed k of one recipe against seed k of the other; 95% t-interval of the "
            "mean difference; paired t-test, two-sided):", "",
            "| claim of the paper | metric | per-seed differences | mean [95% CI] | p | verdict |",
            "|---|---|---|---|---|---|"]

    def row(name: str, a: str, b: str, metric, label: str, sign: int, fmt: str, scale: float = 1.0) -> None:
        d = paired(results, a, b, metric)
        if not d.diffs:
            return
        low, high = d.interval()
        verdict = d.verdict(sign)
        extra = ""
        if metric is acc_ref and ref:  # the image-level tests of each seed, beside the seed-level one
            ps = [mcnemar(results[a, s].at(ref), results[b, s].at(ref)) for s in SEEDS
                  if (a, s) in results and (b, s) in results]
            extra = f"; per-seed McNemar p: {', '.join(f'{q:.2g}' for q in ps)}"
        out.append(f"| {name} | {label} | {', '.join(format(scale * v, fmt) for v in d.diffs)} "
                   f"| {format(scale * d.mean, fmt)} [{format(scale * low, fmt)}, {format(scale * high, fmt)}] "
                   f"| {d.p:.2g} | {verdict} |")
        claims.append(Claim(data, name, verdict, f"{label}: mean difference {format(scale * d.mean, fmt)} "
                            f"[{format(scale * low, fmt)}, {format(scale * high, fmt)}], p = {d.p:.2g}, "
                            f"{len(d.diffs)} seeds{extra}"))

    def acc_ref(m: Measured) -> float:
        return m.at(ref).accuracy

    row("adversarial training enlarges the activation scales", "adversarial", "vanilla",
        lambda m: m.act_scale_mean, "act scale mean, adversarial - vanilla", +1, "+.4f")
    if ref:
        row("adversarially trained models are less resilient", "adversarial", "vanilla", acc_ref,
            f"acc@{ref:g} (points), adversarial - vanilla", -1, "+.1f", 100)
    row("adversarially trained models are less resilient (AUC)", "adversarial", "vanilla", lambda m: m.auc,
        "AUC, adversarial - vanilla", -1, "+.3f")
    row("adversarially trained models are less resilient (retained AUC)", "adversarial", "vanilla",
        lambda m: m.retained, "AUC / int8 accuracy, adversarial - vanilla", -1, "+.3f")
    row("strong weight decay shrinks the activation scales", "adversarial_wd", "adversarial",
        lambda m: m.act_scale_mean, "act scale mean, wd - adversarial", -1, "+.4f")
    if ref:
        row("strong weight decay improves resilience", "adversarial_wd", "adversarial", acc_ref,
            f"acc@{ref:g} (points), wd - adversarial", +1, "+.1f", 100)
    row("strong weight decay improves resilience (AUC)", "adversarial_wd", "adversarial", lambda m: m.auc,
        "AUC, wd - adversarial", +1, "+.3f")
    row("strong weight decay improves resilience (retained AUC)", "adversarial_wd", "adversarial",
        lambda m: m.retained, "AUC / int8 accuracy, wd - adversarial", +1, "+.3f")
    d = paired(results, "adversarial_wd", "adversarial", lambda m: m.provenance["pgd_accuracy"])
    if d.diffs:
        low, high = d.interval()
        keeps = low >= -PGD_MARGIN
        verdict = "holds" if keeps else ("reversed" if high < -PGD_MARGIN else "not significant")
        out.append(f"| weight decay keeps adversarial robustness | PGD-7 (points), wd - adversarial; holds when the "
                   f"interval's low end is above -{pct(PGD_MARGIN)} | "
                   f"{', '.join(format(100 * v, '+.1f') for v in d.diffs)} | {100 * d.mean:+.1f} "
                   f"[{100 * low:+.1f}, {100 * high:+.1f}] | - | {verdict} |")
        claims.append(Claim(data, "weight decay keeps adversarial robustness", verdict,
                            f"PGD-7 difference {100 * d.mean:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}]"))
    if ref:
        gains = [results["adversarial_wd", s].at(ref).accuracy / results["adversarial", s].at(ref).accuracy - 1
                 for s in SEEDS if ("adversarial_wd", s) in results and ("adversarial", s) in results]
        out += ["", f"The remedy's relative gain at BER {ref:g}, acc(wd) / acc(adversarial) - 1, per seed: "
                + ", ".join(f"{g:+.1%}" for g in gains) + " (the paper: +25% for ResNet56 under large-scale "
                "activation bit flips, on CIFAR-10)."]
    return out + [""]


def sweep_rows(points: list[tuple[float, Measured]], vanilla: Measured, ref: float | None, x_label: str,
               x_format) -> list[str]:
    out = [f"| {x_label} | clean | PGD-7 at its eps | PGD-7 at 8/255 | act scale mean | act scale max "
           f"| weight scale max | acc@ref{f' ({ref:g})' if ref else ''} | vs vanilla (McNemar p) | AUC | retained |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [("vanilla", vanilla)] + [(x_format(x), m) for x, m in points]
    for label, m in rows:
        p = m.at(ref) if ref else None
        versus = "-" if m is vanilla or not ref else \
            f"{100 * (p.accuracy - vanilla.at(ref).accuracy):+.1f} (p = {mcnemar(p, vanilla.at(ref)):.2g})"
        out.append(f"| {label} | {pct(m.provenance['clean_accuracy'])}% | {pct(m.provenance['pgd_accuracy'])}% "
                   f"| {pct(m.pgd_8_255)}% | {m.act_scale_mean:.4f} | {m.act_scale_max:.4f} "
                   f"| {m.weight_scale_max:.4f} | {f'{pct(p.accuracy)}%' if p else '-'} | {versus} | {m.auc:.3f} "
                   f"| {m.retained:.3f} |")
    return out


def spearman(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Spearman's rho and its exact two-sided permutation p-value (the few points of a sweep: n! orderings)."""
    from itertools import permutations

    from scipy import stats

    rho = float(stats.spearmanr(xs, ys).statistic)
    rx, ry = stats.rankdata(xs), stats.rankdata(ys)
    n = len(xs)
    extreme = total = 0
    for order in permutations(range(n)):
        total += 1
        shuffled = [ry[i] for i in order]
        extreme += abs(float(stats.pearsonr(rx, shuffled).statistic)) >= abs(rho) - 1e-12
    return rho, extreme / total


def sweep(measured: dict[str, Measured], data: str, bers: tuple[float, ...], points_of
          ) -> tuple[Measured, float | None, list[tuple[float, Measured]]] | None:
    """A sweep's vanilla ResNet20, its reference BER and its measured points; None without the vanilla model."""
    vanilla = measured.get(Run("base", "vanilla", SWEEP_DEPTH, data, 0).stem)
    if vanilla is None:
        return None
    points = [(x, measured[run.stem]) for x, run in points_of(data) if run.stem in measured]
    return vanilla, reference_ber([vanilla], bers), points


def sweep_section(measured: dict[str, Measured], bers: tuple[float, ...], data_sets: list[str],
                  claims: list[Claim]) -> list[str]:
    out = [f"## Attack-strength sweep (CifarResNet-{SWEEP_DEPTH}, seed 0)", "",
           "Adversarial training at each budget (PGD-7, step eps/4, random start), against the vanilla ResNet20 of "
           "the same data. PGD-7 at its eps: the model's robustness under its own training budget; at 8/255: one "
           "yardstick for all. One training seed per point: the image-level McNemar test says whether the "
           "resilience difference is beyond the fault and image sampling, not beyond the training seed.", ""]
    for data in data_sets:
        if (found := sweep(measured, data, bers, eps_points)) is None:
            continue
        vanilla, ref, points = found
        out += [f"### {DATA_LABELS[data]}", "", *sweep_rows(points, vanilla, ref, "eps", eps_text), ""]
        # a model far less accurate than vanilla without faults is also "less resilient" in accuracy under faults:
        # such points are named, not judged
        untrained = [(e, m) for e, m in points if m.quantized_accuracy < vanilla.quantized_accuracy - UNDERTRAINED]
        judged = [(e, m) for e, m in points if (e, m) not in untrained]
        larger = [eps_text(e) for e, m in judged if m.act_scale_mean > vanilla.act_scale_mean]
        weaker = [eps_text(e) for e, m in judged if ref and m.at(ref).accuracy < vanilla.at(ref).accuracy
                  and mcnemar(m.at(ref), vanilla.at(ref)) < ALPHA]
        stronger = [eps_text(e) for e, m in judged if ref and m.at(ref).accuracy > vanilla.at(ref).accuracy
                    and mcnemar(m.at(ref), vanilla.at(ref)) < ALPHA]
        both = [e for e in larger if e in weaker]
        summary = (f"act scales above vanilla's at eps {', '.join(larger) or 'none'}; significantly less resilient "
                   f"than vanilla at {', '.join(weaker) or 'none'}; significantly more resilient at "
                   f"{', '.join(stronger) or 'none'}")
        if untrained:
            summary += ("; not judged, int8 accuracy more than " f"{pct(UNDERTRAINED)} points below vanilla's "
                        f"({pct(vanilla.quantized_accuracy)}%): "
                        + ", ".join(f"{eps_text(e)} ({pct(m.quantized_accuracy)}%)" for e, m in untrained))
        verdict = (f"appears at eps {', '.join(both)}" if both else "does not appear at any eps of the sweep")
        claims.append(Claim(data, "the paper's ordering (larger scales and less resilience) across eps",
                            verdict, summary))
        out += [f"The paper's ordering (adversarial: larger scales, less resilient) {verdict}: {summary}.", "",
                f"![eps sweep, {data}](eps_sweep_{data}.png)", ""]
    out += [f"## Weight-decay dose-response (CifarResNet-{SWEEP_DEPTH}, adversarial at 8/255, seed 0)", "",
            "Spearman's rank correlation over the five weight decays (n = 5: p < 0.05 needs a perfectly monotone "
            "trend).", ""]
    for data in data_sets:
        if (found := sweep(measured, data, bers, wd_points)) is None:
            continue
        vanilla, ref, points = found
        out += [f"### {DATA_LABELS[data]}", "", *sweep_rows(points, vanilla, ref, "weight decay", lambda w: f"{w:g}"),
                ""]
        if len(points) >= 3:
            wds = [w for w, _ in points]
            rho_scale, p_scale = spearman(wds, [m.act_scale_mean for _, m in points])
            rho_auc, p_auc = spearman(wds, [m.auc for _, m in points])
            shrinks = "holds" if rho_scale < 0 and p_scale < ALPHA else "not significant" if p_scale >= ALPHA \
                else "reversed"
            improves = "holds" if rho_auc > 0 and p_auc < ALPHA else "not significant" if p_auc >= ALPHA \
                else "reversed"
            claims.append(Claim(data, "more weight decay, smaller activation scales (dose-response)", shrinks,
                                f"Spearman rho {rho_scale:+.2f}, p = {p_scale:.2g}"))
            claims.append(Claim(data, "more weight decay, more resilience (dose-response, AUC)", improves,
                                f"Spearman rho {rho_auc:+.2f}, p = {p_auc:.2g}"))
            rho_kept, p_kept = spearman(wds, [m.retained for _, m in points])
            claims.append(Claim(data, "more weight decay, more resilience (dose-response, retained AUC)",
                                "holds" if rho_kept > 0 and p_kept < ALPHA else "not significant" if p_kept >= ALPHA
                                else "reversed", f"Spearman rho {rho_kept:+.2f}, p = {p_kept:.2g}"))
            out += [f"Act scale mean vs weight decay: Spearman rho {rho_scale:+.2f} (p = {p_scale:.2g}); AUC vs "
                    f"weight decay: rho {rho_auc:+.2f} (p = {p_auc:.2g}).", "",
                    f"![weight decay, {data}](weight_decay_{data}.png)", ""]
    return out


def depth_section(measured: dict[str, Measured], bers: tuple[float, ...], data_sets: list[str]) -> list[str]:
    """The seed-0 models at the other depth, beside the headline's seed 0: does the depth change the ordering?"""
    out: list[str] = []
    for data in data_sets:
        deep = [measured[run.stem] for run in depth_check(data) if run.stem in measured]
        if len(deep) < len(RECIPES):
            continue
        shallow = [measured[run.stem] for run in headline(data) if run.seed == 0 and run.stem in measured]
        out += [f"## Depth check: {data}, seed 0, CifarResNet-{HEADLINE_DEPTH[data]} and -{DEPTH_CHECK}", "",
                "One training seed per model: the reference BER is each depth's own (its vanilla model loses "
                f"{pct(REFERENCE_DROP)} points); McNemar p against the vanilla model of the same depth.", "",
                "| depth | recipe | clean | PGD-7 | int8 | act scale mean | act scale max | acc@ref | vs vanilla "
                "| AUC | retained |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for depth, models in ((HEADLINE_DEPTH[data], shallow), (DEPTH_CHECK, deep)):
            if len(models) < len(RECIPES):
                continue
            ref = reference_ber([models[0]], bers)
            for recipe, m in zip(RECIPES, models):
                p = m.at(ref) if ref else None
                versus = "-" if recipe == "vanilla" or not ref else \
                    f"{100 * (p.accuracy - models[0].at(ref).accuracy):+.1f} (p = {mcnemar(p, models[0].at(ref)):.2g})"
                out.append(f"| {depth} | {LABELS[recipe]} | {pct(m.provenance['clean_accuracy'])}% "
                           f"| {pct(m.provenance['pgd_accuracy'])}% | {pct(m.quantized_accuracy)}% "
                           f"| {m.act_scale_mean:.4f} | {m.act_scale_max:.4f} "
                           f"| {f'{pct(p.accuracy)}% at {ref:g}' if p else '-'} | {versus} | {m.auc:.3f} "
                           f"| {m.retained:.3f} |")
        out.append("")
    return out


def markdown(headlines: dict[str, dict[tuple[str, int], Measured]], measured: dict[str, Measured],
             missing: list[Run], args: argparse.Namespace, command: str, seconds: float) -> str:
    claims: list[Claim] = []
    body: list[str] = []
    for data, results in headlines.items():
        if any(r == "vanilla" for r, _ in results):
            body += headline_section(data, results, args.bers, claims)
    body += sweep_section(measured, args.bers, list(headlines), claims)
    body += depth_section(measured, args.bers, list(headlines))
    out = ["# Seed study: adversarial vs weight-decayed ResNets under activation bit flips", "",
           f"Produced by `{command}` (torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
           f"{seconds / 60:.1f} min, measurements cached in `examples/resnet56/results/`).", "",
           "**Data.** Two offline stand-ins (examples/resnet56/data.py): *digits*, scikit-learn's 8x8 handwritten "
           "digits upsampled to 3x32x32, and *photos*, 32x32 RGB crops of ten photographs that ship inside "
           "scikit-image (train and test crops from disjoint parts of each photo). Neither is CIFAR-10: the numbers "
           "say what this pipeline measures on them, not what the paper measured. Assumptions and costs: "
           "`docs/examples.md`; how each checkpoint was trained: `examples/resnet56/checkpoints/*.json`.", "",
           f"**Models.** The three recipes x {len(SEEDS)} training seeds: CifarResNet-{HEADLINE_DEPTH[DIGITS]} on "
           f"digits, CifarResNet-{HEADLINE_DEPTH[PHOTOS]} on photos, with CifarResNet-{DEPTH_CHECK} at seed 0 as a "
           f"depth check; CifarResNet-{SWEEP_DEPTH} for the eps sweep and the weight-decay dose-response. The CPU "
           "budget (2 cores, one session) decided which runs are ResNet56: docs/examples.md gives the costs.", "",
           f"**Faults.** int8 quantization (per-channel symmetric weights, per-tensor symmetric activations, "
           f"BatchNorm folded, max calibration on the first {CALIBRATION_IMAGES} training images); single-bit flips in "
           f"the int8 output codes of every conv/linear layer (site `act`), each bit flipped with probability BER, "
           f"fresh faults per image; {args.trials} trials x the whole test split per BER; BER grid "
           f"{', '.join(f'{b:g}' for b in args.bers)}; intervals are 95% Clopper-Pearson over pooled images.", "",
           "**Resilience.** *AUC*: mean accuracy under faults over log10(BER) across the grid. *retained*: AUC / "
           "fault-free int8 accuracy, the share of its accuracy a model keeps under faults (AUC and acc@ref also "
           "count how accurate the model is without faults; retained does not). *acc@ref*: accuracy at the "
           "reference BER, where the vanilla models lose 10 points on average.", "",
           "## The paper's claims, per data set", "",
           "| data | claim | verdict | evidence |", "|---|---|---|---|"]
    out += [f"| {c.data} | {c.name} | **{c.verdict}** | {c.detail} |" for c in claims]
    if missing:
        out = ["> **Incomplete**: " + f"{len(missing)} checkpoints of the plan are not trained yet and are left out: "
               + ", ".join(f"`{run.stem}`" for run in missing) + ".", "", *out]
    return "\n".join(out + ["", *body])


# -- plots -----------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_headline(data: str, results: dict[tuple[str, int], Measured], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for recipe in RECIPES:
        ms = [m for (r, _), m in sorted(results.items()) if r == recipe]
        if not ms:
            continue
        bers = [p.ber for p in ms[0].curve]
        accs = [[m.curve[i].accuracy for m in ms] for i in range(len(bers))]
        mean = [sum(a) / len(a) for a in accs]
        line, = ax.plot(bers, mean, marker="o", ms=4, label=f"{LABELS[recipe]} (mean of {len(ms)} seeds)")
        ax.fill_between(bers, [min(a) for a in accs], [max(a) for a in accs], color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("bit error rate (int8 activation codes)")
    ax.set_ylabel("accuracy under faults")
    ax.set_title(f"CifarResNet-{HEADLINE_DEPTH[data]} on {data}: band = min-max over seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(points: list[tuple[float, Measured]], vanilla: Measured, ref: float | None, x_label: str,
               title: str, path: Path) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8), dpi=110)
    xs = [x for x, _ in points]
    left.plot(xs, [m.act_scale_mean for _, m in points], marker="o", label="adversarial: mean act scale")
    left.plot(xs, [m.act_scale_max for _, m in points], marker="s", label="adversarial: max act scale")
    left.axhline(vanilla.act_scale_mean, color="grey", ls="--", label="vanilla: mean")
    left.axhline(vanilla.act_scale_max, color="grey", ls=":", label="vanilla: max")
    left.set_ylabel("int8 activation scale")
    right.plot(xs, [m.auc for _, m in points], marker="o", label="adversarial: AUC")
    right.axhline(vanilla.auc, color="grey", ls="--", label="vanilla: AUC")
    if ref:
        right.plot(xs, [m.at(ref).accuracy for _, m in points], marker="s", label=f"adversarial: acc@{ref:g}")
        right.axhline(vanilla.at(ref).accuracy, color="grey", ls=":", label=f"vanilla: acc@{ref:g}")
    right.set_ylabel("resilience")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", action="append", choices=STAND_INS, help="stand-ins to report (default: both)")
    p.add_argument("--bers", type=lambda s: tuple(float(b) for b in s.split(",")), default=BERS)
    p.add_argument("--trials", type=int, default=2, help="trials per BER (each over the whole test split)")
    p.add_argument("--fault-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads (the numbers do not depend on it)")
    p.add_argument("--out", type=Path, default=HERE, help="folder of RESULTS.md and the plots")
    p.add_argument("--cache", type=Path, default=RESULTS, help="folder of the per-checkpoint measurements")
    p.add_argument("--allow-missing", action="store_true",
                   help="report the trained part of the plan, listing the missing checkpoints at the top")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data_sets = list(args.data or STAND_INS)
    headlines: dict[str, dict[tuple[str, int], Measured]] = {}
    measured: dict[str, Measured] = {}
    missing: list[Run] = []
    for data in data_sets:
        split = load(data)
        runs = headline(data) + base(data) + [run for _, run in eps_points(data) + wd_points(data)] + \
            depth_check(data)
        for run in dict.fromkeys(runs):  # in order, once
            if run.trained or not args.allow_missing:
                measured[run.stem] = measure(run, split, args)
            else:
                missing.append(run)
        headlines[data] = {(run.recipe, run.seed): measured[run.stem] for run in headline(data)
                           if run.stem in measured}
    seconds = time.perf_counter() - start
    command = shlex.join(["python", "examples/resnet56/report.py", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "RESULTS.md").write_text(markdown(headlines, measured, missing, args, command, seconds))
    for data in data_sets:
        if headlines[data]:
            plot_headline(data, headlines[data], args.out / f"accuracy_vs_ber_{data}.png")
        for points_of, x_label, what, stem in ((eps_points, "PGD budget eps", "adversarial training at each eps",
                                                "eps_sweep"),
                                               (wd_points, "weight decay", "adversarial (8/255) at each weight decay",
                                                "weight_decay")):
            if (found := sweep(measured, data, args.bers, points_of)) is not None:
                vanilla, ref, points = found
                plot_sweep(points, vanilla, ref, x_label, f"CifarResNet-{SWEEP_DEPTH} on {data}: {what}",
                           args.out / f"{stem}_{data}.png")
    print(f"wrote {args.out / 'RESULTS.md'} and the plots in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
