"""Cost of one campaign trial across a BER sweep, against the fault-free quantized forward of the same images.

    python benchmarks/bench_ber_sweep.py [--rounds 9] [--batch 128] [--threads N] [--json out.json]

Model: CIFAR-style ResNet56 (random init, BatchNorm statistics recalibrated on random inputs, eval mode), quantized
to int8 by `quantize()` on the evaluation batch; a fixed set of `--batch` random 32x32x3 images with random labels.

Per variant, each round times one `Campaign.trial(t)` (drawing the trial's fault pattern, fault dropping on: only
the images that hold a fault are re-run, the others keep their fault-free prediction; then the per-image and
per-layer bookkeeping) next to one fault-free quantized pass over the same images (`predict`, the pass a campaign
makes without faults). The two run back to back, in alternating order from round to round, and the figure is the
median of the per-round ratios. Trial t differs in every round, so the fault counts vary; their mean is reported,
with the images actually re-run.

Variants: act site at BER 1e-8, 1e-7, ..., 1e-2; weight site at BER 1e-6 and 1e-5 (weight faults persist for the
whole trial, so every image runs, with the touched weights edited in place and restored afterwards; late start
resumes them all at the cut before the first layer a fault touches). `--compare-late-start` pairs every variant
with the same campaign without late start.

Targets: act BER 1e-8 trial <= 0.25x the fault-free forward; act BER 1e-3 <= 1.3x; weight trial <= 1.05x.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _common import environment, machine_line, save_json  # benchmarks/_common.py, beside this script

from pytest_hwfault import quantize
from pytest_hwfault.campaign import Campaign
from pytest_hwfault.cifar_resnet import recalibrate_bn, resnet56
from pytest_hwfault.evaluate import predict
from pytest_hwfault.spec import CampaignSpec

ACT_BERS = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
WEIGHT_BERS = (1e-6, 1e-5)
TARGET_ACT_1E8 = 0.25
TARGET_ACT_1E3 = 1.3
TARGET_WEIGHT = 1.05


def _late_start_info(campaigns: dict[str, Campaign]) -> dict[str, Any]:
    for campaign in campaigns.values():
        cache = campaign.late_start()
        if cache is not None:
            return {"cuts": len(cache.cuts), "cache_mib": round(cache.cache_bytes / 2**20, 1),
                    "budget_mib": round(cache.budget_bytes / 2**20, 1)}
    return {"cuts": 0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--act-bers", type=float, nargs="*", default=list(ACT_BERS))
    parser.add_argument("--weight-bers", type=float, nargs="*", default=list(WEIGHT_BERS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-late-start", action="store_true", help="fault dropping only, every re-run from layer 0")
    parser.add_argument("--compare-late-start", action="store_true",
                        help="also time every variant without late start, paired in the same rounds")
    parser.add_argument("--json", help="save the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = recalibrate_bn(resnet56(), torch.randn(args.batch, 3, 32, 32))
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(10, (args.batch,))
    qmodel = quantize(model, x)

    campaigns: dict[str, Campaign] = {}
    for site, bers in (("act", args.act_bers), ("weight", args.weight_bers)):
        for ber in bers:
            name = f"{site} {ber:g}"
            # min_acc=0: random labels, so no verdict; max_drop would be refused (not above chance)
            spec = CampaignSpec(site=site, ber=ber, min_acc=0.0, seed=args.seed)
            campaigns[name] = Campaign(qmodel, x, y, spec, f"bench_ber_sweep-{site}-{ber:g}", batch_size=args.batch,
                                       drop_fault_free=True, late_start=not args.no_late_start)
            if args.compare_late_start and not args.no_late_start:
                campaigns[f"{name} no-late-start"] = Campaign(
                    qmodel, x, y, spec, f"bench_ber_sweep-{site}-{ber:g}", batch_size=args.batch,
                    drop_fault_free=True, late_start=False)  # same name, so the same faults per trial

    def baseline() -> float:
        start = time.perf_counter()
        predict(qmodel, x, batch_size=args.batch)
        return time.perf_counter() - start

    stats: dict[str, dict[str, list[float]]] = {
        name: {"trial": [], "baseline": [], "ratio": [], "faults": [], "rerun_images": []} for name in campaigns
    }

    def run_trial(name: str, index: int) -> float:
        start = time.perf_counter()
        result = campaigns[name].trial(index)
        elapsed = time.perf_counter() - start
        stats[name]["faults"].append(result.faults)
        stats[name]["rerun_images"].append(result.faulty_images)
        return elapsed

    baseline()  # warm-up
    for campaign in campaigns.values():
        campaign.trial(10**6)  # warm-up, a trial index no round uses
    for r in range(args.rounds):
        for name in campaigns:
            if r % 2 == 0:
                base = baseline()
                trial = run_trial(name, r)
            else:
                trial = run_trial(name, r)
                base = baseline()
            s = stats[name]
            s["trial"].append(trial)
            s["baseline"].append(base)
            s["ratio"].append(trial / base)

    rows: dict[str, dict[str, Any]] = {}
    for name, s in stats.items():
        site, ber, *variant = name.split()
        rows[name] = {
            "site": site,
            "ber": float(ber),
            "late_start": not variant and not args.no_late_start,
            "ratio_vs_fault_free": statistics.median(s["ratio"]),
            "median_trial_seconds": statistics.median(s["trial"]),
            "median_fault_free_seconds": statistics.median(s["baseline"]),
            "mean_faults_per_trial": statistics.mean(s["faults"]),
            "mean_images_rerun": statistics.mean(s["rerun_images"]),
            **s,
        }

    print(f"ResNet56 int8, {args.batch} images, {args.threads} threads, {args.rounds} alternating rounds "
          f"(median of per-round trial / fault-free quantized forward)")
    print(machine_line())
    print(f"  {'site':<7} {'BER':>6} {'late':>5} {'trial ms':>9} {'fault-free ms':>14} {'ratio':>8} "
          f"{'faults/trial':>13} {'images re-run':>14}")
    for row in rows.values():
        print(f"  {row['site']:<7} {row['ber']:>6.0e} {'yes' if row['late_start'] else 'no':>5} "
              f"{row['median_trial_seconds'] * 1e3:9.1f} "
              f"{row['median_fault_free_seconds'] * 1e3:14.1f} {row['ratio_vs_fault_free']:7.3f}x "
              f"{row['mean_faults_per_trial']:13.1f} {row['mean_images_rerun']:9.1f}/{args.batch}")

    late = _late_start_info(campaigns)
    print(f"late start: {late}")
    summary: dict[str, Any] = {}
    act_low = rows.get("act 1e-08")
    if act_low is not None:
        summary["act_1e-8_vs_fault_free"] = act_low["ratio_vs_fault_free"]
        print(f"act BER 1e-8 trial / fault-free forward: {act_low['ratio_vs_fault_free']:.3f}x "
              f"(target <= {TARGET_ACT_1E8})")
    act_high = rows.get(f"act {1e-3:g}")
    if act_high is not None:
        summary["act_1e-3_vs_fault_free"] = act_high["ratio_vs_fault_free"]
        print(f"act BER 1e-3 trial / fault-free forward: {act_high['ratio_vs_fault_free']:.3f}x "
              f"(target <= {TARGET_ACT_1E3})")
    for row in rows.values():
        if row["site"] == "weight" and row["late_start"] != args.no_late_start:  # the campaigns as configured
            summary[f"weight_{row['ber']:g}_vs_fault_free"] = row["ratio_vs_fault_free"]
            print(f"weight BER {row['ber']:g} trial / fault-free forward: {row['ratio_vs_fault_free']:.3f}x "
                  f"(target <= {TARGET_WEIGHT})")

    result = {
        "benchmark": "ber_sweep",
        "model": "resnet56 (random init, BatchNorm statistics recalibrated on random inputs, eval mode), int8",
        "images": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "seed": args.seed,
        "drop_fault_free": True,
        "late_start": _late_start_info(campaigns),
        "variants": rows,
        "summary": summary,
        "targets": {"act_1e-8_vs_fault_free_max": TARGET_ACT_1E8, "act_1e-3_vs_fault_free_max": TARGET_ACT_1E3,
                    "weight_vs_fault_free_max": TARGET_WEIGHT},
        "meets_targets": {k: v <= {"act_1e-8": TARGET_ACT_1E8, "act_1e-3": TARGET_ACT_1E3}.get(k[:8], TARGET_WEIGHT)
                          for k, v in summary.items()},
        **environment(),
    }
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
