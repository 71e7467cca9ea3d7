"""Engine overhead on a CIFAR-style ResNet56, batch 128, 32x32x3 (or a ViT-small-sized transformer), as ratios
measured in one run.

    python benchmarks/bench_engine.py [--rounds 9] [--model resnet56|vit_small] [--kernel auto|emulated]
                                      [--json out.json]

`--model vit_small`: torchvision's VisionTransformer with ViT-S/16's width (12 layers, 6 heads, hidden 384, MLP 1536)
on 32x32 images in 4x4 patches (65 tokens), batch 16 by default: every attention projection, both attention
matmuls and the MLP run as quantized layers.

Prints, as medians over alternating rounds (the CPU's speed drifts, so every variant is timed next to its
baseline in the same round):
- fault-free quantized forward / float forward           (target <= 1.10)
- BER 1e-5 activation-fault forward / float forward      (target <= 1.10)
The fault forward includes drawing the trial's faults. The float forward is the model as the user gives it
(contiguous NCHW tensors). The engine computes channels-last on the CPU (`quantize(memory_format="auto")`), so
both are also reported against the float model run channels-last, the fastest float forward on this machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from _common import environment, paired_rounds, save_json  # benchmarks/_common.py, beside this script

from pytest_hwfault import FaultModel, quantize
from pytest_hwfault.cifar_resnet import resnet56
from pytest_hwfault.faults import sample_pattern, trial_generator


def _vit_small() -> torch.nn.Module:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=4, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536,
                              num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--model", choices=("resnet56", "vit_small"), default="resnet56")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 (resnet56), 16 (vit_small)")
    parser.add_argument("--ber", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--kernel", choices=("auto", "int8", "emulated"), default="auto",
                        help="quantize(kernel=): int8 kernels where exact (auto) or the float-emulated path")
    parser.add_argument("--json", help="save the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    args.batch = args.batch or (128 if args.model == "resnet56" else 16)
    model = (resnet56() if args.model == "resnet56" else _vit_small()).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    qmodel = quantize(model, x, kernel=args.kernel)
    fault_model = FaultModel("act", args.ber)
    targets = qmodel.targets(fault_model.site)
    trial = iter(range(10**9))

    def float_forward() -> None:
        with torch.inference_mode():
            model(x)

    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def float_channels_last() -> None:
        with torch.inference_mode():
            model_cl(x_cl)

    def quantized_forward() -> None:
        qmodel(x)

    flips: list[int] = []

    def faulty_forward() -> None:
        pattern = sample_pattern(fault_model, targets, len(x), trial_generator(0, "bench", next(trial)))
        flips.append(len(pattern))
        qmodel(x, pattern)

    variants = {"float_channels_last": float_channels_last, "quantized": quantized_forward,
                "act_faults": faulty_forward}
    float_forward()  # warm-up
    for fn in variants.values():
        fn()
    # Each variant is paired with a float forward right next to it (see _common.paired_rounds).
    times, float_times = paired_rounds(variants, float_forward, args.rounds)
    times["float"] = [t for name in variants for t in float_times[name]]
    ratios = {
        "quantized_vs_float": statistics.median(
            q / f for q, f in zip(times["quantized"], float_times["quantized"])),
        "act_ber_vs_float": statistics.median(
            a / f for a, f in zip(times["act_faults"], float_times["act_faults"])),
        "float_channels_last_vs_float": statistics.median(
            c / f for c, f in zip(times["float_channels_last"], float_times["float_channels_last"])),
        # same round, not adjacent: less exact than the paired ratios above
        "quantized_vs_float_channels_last": statistics.median(
            q / c for q, c in zip(times["quantized"], times["float_channels_last"])),
        "act_ber_vs_float_channels_last": statistics.median(
            a / c for a, c in zip(times["act_faults"], times["float_channels_last"])),
    }
    result = {
        "benchmark": "engine",
        "model": args.model,
        "batch": args.batch,
        "ber": args.ber,
        "threads": args.threads,
        "kernel": args.kernel,
        "rounds": args.rounds,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "ratios": ratios,
        "mean_flips_per_batch": statistics.mean(flips),
        **environment(),
    }
    med = result["median_seconds"]
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds of order-alternating pairs "
          "(median)")
    print(f"  float forward            {med['float'] * 1e3:8.1f} ms  ({args.batch / med['float']:.0f} img/s)")
    print(f"  float, channels-last     {med['float_channels_last'] * 1e3:8.1f} ms  ratio "
          f"{ratios['float_channels_last_vs_float']:.3f}x")
    print(f"  quantized forward        {med['quantized'] * 1e3:8.1f} ms  ratio {ratios['quantized_vs_float']:.3f}x"
          f"  ({ratios['quantized_vs_float_channels_last']:.3f}x float channels-last)")
    print(f"  act faults, BER {args.ber:g}  {med['act_faults'] * 1e3:8.1f} ms  ratio {ratios['act_ber_vs_float']:.3f}x"
          f"  ({ratios['act_ber_vs_float_channels_last']:.3f}x float channels-last; "
          f"{result['mean_flips_per_batch']:.0f} flips/batch)")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
