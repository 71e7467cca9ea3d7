"""The int8 execution path against the float-emulated one (issue 16): ResNet56, batch 128, as ratios measured in one
run.

    python benchmarks/bench_kernels.py [--rounds 9] [--threads 2] [--ber 1e-5] [--json out.json]
    python benchmarks/bench_kernels.py --model resnet18 --batch 32 [--image-size 224]

`--model resnet18` / `resnet50`: torchvision's ImageNet ResNets (random init, 224 x 224 images), whose layers from
128 input channels on can sum past 2^24 and so accumulate in float64 ("wide" layers: on the int8 path their
chunks' exact float32 results are summed in float64; emulated, they are float64 convolutions).

The same random-init model (BatchNorm statistics recalibrated on the batch) is quantized twice, with
``kernel="int8"`` and ``kernel="emulated"`` (identical calibration, so identical numbers: checked once per run).
Prints, as medians of per-round ratios (every variant timed next to a float forward, pair order alternating
between rounds):
- fault-free quantized forward / float forward, on each path              (issue 16 target, int8: <= 0.35)
- act BER 1e-5 trial (fault sampling + faulty forward) / float forward     (issue 16 target, int8: <= 0.40)
- weight and acc BER 1e-5 trials likewise (weight target <= 0.40; acc: stated)
- the int8 path's fault-free forward and act trial once more with the model's own ReLUs and sums as written (out
  of place: `own_ops_in_place = False`) and once more on torch's eager chains (`native.disabled()`): what running
  them in place and the fused native passes save
The float forward is the model as given (NCHW). Then, from one profiled int8 forward, where its time goes: the int8
convolutions, the engine's fused native passes (quantize, bytes, requantize: timed around each call) or, without
them, its eager quantize/requantize ops and conversions, the model's own ops between layers (ReLU, residual
additions), and the time in no op (Python, hooks, dispatch), each as a share of the profiled call's wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import environment, machine_line, paired_rounds, save_json  # benchmarks/_common.py, beside this script

from pytest_hwfault import FaultModel, native, quantize
from pytest_hwfault.cifar_resnet import recalibrate_bn, resnet56
from pytest_hwfault.faults import sample_pattern, trial_generator

MODELS = ("resnet56", "resnet18", "resnet50")
LABELS = {"resnet56": "ResNet56", "resnet18": "torchvision ResNet18", "resnet50": "torchvision ResNet50"}


def _model(name: str) -> torch.nn.Module:
    if name == "resnet56":
        return resnet56()
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


# profiler op name -> category of the int8 forward's time
CATEGORIES = {
    "onednn::qconv2d_pointwise": "int8 conv (oneDNN)",
    "aten::_int_mm": "int8 matmul",
    "aten::copy_": "float -> int8 conversion",
    "aten::bitwise_xor_": "float -> int8 conversion",
    "aten::round_": "engine: quantize / requantize passes",
    "aten::mul_": "engine: quantize / requantize passes",
    "aten::mul": "engine: quantize / requantize passes",
    "aten::clamp_": "engine: quantize / requantize passes",
    "aten::add_": "engine: bias add, chunk sums; model: sums in place",
    "aten::clamp_min": "model: ReLU (allocates its output)",
    "aten::clamp_min_": "model: ReLU in place",
    "aten::add": "model: residual additions",
}


class _TimedLibrary:
    """The fused passes' library, timing each call (the profiler does not see calls into a C library)."""

    def __init__(self, lib: object) -> None:
        self.lib, self.seconds = lib, 0.0

    def __getattr__(self, name: str) -> Callable[..., None]:
        function = getattr(self.lib, name)

        def timed(*args: object) -> None:
            start = time.perf_counter()
            function(*args)
            self.seconds += time.perf_counter() - start
        return timed


def _breakdown(fn: Callable[[], object]) -> dict[str, float]:
    """Seconds per category of one profiled call (self CPU time of each op; the fused native passes timed around
    each call), and the rest of its wall time: Python, the hooks, dispatch."""
    from torch.profiler import profile

    from pytest_hwfault import native

    original = native.library
    timed = _TimedLibrary(original()) if original() is not None else None
    if timed is not None:
        native.library = lambda: timed  # type: ignore[assignment,misc,return-value]
    try:
        with profile() as prof:
            start = time.perf_counter()
            fn()
            wall = time.perf_counter() - start
    finally:
        native.library = original  # type: ignore[misc]
    seconds: dict[str, float] = {}
    for event in prof.key_averages():
        category = CATEGORIES.get(event.key, "other ops")
        seconds[category] = seconds.get(category, 0.0) + event.self_cpu_time_total / 1e6
    if timed is not None:
        seconds["engine: fused native passes"] = timed.seconds
    seconds["not in an op: Python, hooks, dispatch (profiled)"] = max(0.0, wall - sum(seconds.values()))
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--model", choices=MODELS, default="resnet56")
    parser.add_argument("--image-size", type=int, help="default: 32 for resnet56, 224 for the others")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ber", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="save the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    size = args.image_size or (32 if args.model == "resnet56" else 224)
    x = torch.randn(args.batch, 3, size, size)
    model = recalibrate_bn(_model(args.model), x)
    views = {"int8": quantize(model, x, kernel="int8"), "emulated": quantize(model, x, kernel="emulated")}
    on_int8 = sum(kernel == "int8" for kernel in views["int8"].kernels.values())
    wide = sum(layer.compute_dtype == torch.float64 for layer in views["int8"].layers.values())
    fault_model = FaultModel("act", args.ber)
    targets = views["int8"].targets(fault_model.site)
    others = {site: (FaultModel(site, args.ber), views["int8"].targets(FaultModel(site, args.ber).site))
              for site in ("weight", "acc")}
    trial = iter(range(10**9))

    check = sample_pattern(fault_model, targets, len(x), trial_generator(0, "bench", 10**9))
    for pattern in (None, check):
        if not torch.equal(views["int8"](x, pattern), views["emulated"](x, pattern)):
            raise AssertionError("the int8 and emulated paths disagree: the benchmark would compare different work")

    def float_forward() -> None:
        with torch.inference_mode():
            model(x)

    flips: list[int] = []

    def clean(path: str) -> Callable[[], None]:
        return lambda: views[path](x)

    def act(path: str) -> Callable[[], None]:
        def run() -> None:
            pattern = sample_pattern(fault_model, targets, len(x), trial_generator(0, "bench", next(trial)))
            flips.append(len(pattern))
            views[path](x, pattern)
        return run

    def other(path: str, site: str) -> Callable[[], None]:  # context: a weight and an acc trial
        def run() -> None:
            model_, targets_ = others[site]
            views[path](x, sample_pattern(model_, targets_, len(x), trial_generator(0, "bench", next(trial))))
        return run

    def as_written(fn: Callable[[], None]) -> Callable[[], None]:  # the model's own ReLUs and sums out of place
        def run() -> None:
            views["int8"].own_ops_in_place = False
            try:
                fn()
            finally:
                views["int8"].own_ops_in_place = True
        return run

    def eager(fn: Callable[[], None]) -> Callable[[], None]:  # torch's eager chains instead of the fused passes
        def run() -> None:
            with native.disabled():
                fn()
        return run

    variants = {"int8": clean("int8"), "int8_act": act("int8"), "int8_as_written": as_written(clean("int8")),
                "int8_act_as_written": as_written(act("int8")), "int8_eager": eager(clean("int8")),
                "int8_act_eager": eager(act("int8")), "emulated": clean("emulated"),
                "emulated_act": act("emulated"), "int8_weight": other("int8", "weight"),
                "int8_acc": other("int8", "acc"), "emulated_weight": other("emulated", "weight"),
                "emulated_acc": other("emulated", "acc")}
    float_forward()  # warm-up (the int8 view's weights are packed on its first forward)
    for fn in variants.values():
        fn()
    times, float_times = paired_rounds(variants, float_forward, args.rounds)
    times["float"] = [t for name in variants for t in float_times[name]]
    ratios = {name: statistics.median(q / f for q, f in zip(times[name], float_times[name])) for name in variants}
    ratios["int8_vs_emulated"] = statistics.median(i / e for i, e in zip(times["int8"], times["emulated"]))
    breakdown = _breakdown(clean("int8"))
    result = {
        "benchmark": "kernels",
        "model": args.model,
        "image_size": size,
        "batch": args.batch,
        "ber": args.ber,
        "threads": args.threads,
        "rounds": args.rounds,
        "layers_on_int8": on_int8,
        "layers": len(views["int8"].layers),
        "wide_layers": wide,
        "native": native.status(),
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "ratios_vs_float": ratios,
        "mean_flips_per_batch": statistics.mean(flips),
        "int8_forward_profile_seconds": breakdown,
        **environment(),
    }
    med = result["median_seconds"]
    print(f"{LABELS[args.model]}, {size}x{size}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds of "
          f"order-alternating pairs (median); {on_int8} of {len(views['int8'].layers)} layers on int8 kernels, "
          f"{wide} of them wide (float64 sums)")
    print(machine_line())
    print(f"  float forward                      {med['float'] * 1e3:8.1f} ms")
    for name, label in (("int8", "int8 path, fault-free"), ("int8_act", f"int8 path, act BER {args.ber:g}"),
                        ("int8_as_written", "  the same, own ops as written"),
                        ("int8_act_as_written", f"  act BER {args.ber:g}, own ops as written"),
                        ("int8_eager", "  the same, eager chains"),
                        ("int8_act_eager", f"  act BER {args.ber:g}, eager chains"),
                        ("emulated", "emulated, fault-free"), ("emulated_act", f"emulated, act BER {args.ber:g}"),
                        ("int8_weight", f"int8 path, weight BER {args.ber:g}"),
                        ("emulated_weight", f"emulated, weight BER {args.ber:g}"),
                        ("int8_acc", f"int8 path, acc BER {args.ber:g}"),
                        ("emulated_acc", f"emulated, acc BER {args.ber:g}")):
        print(f"  {label:<34} {med[name] * 1e3:8.1f} ms  ratio {ratios[name]:.3f}x")
    print(f"  int8 / emulated, fault-free: {ratios['int8_vs_emulated']:.3f}x; "
          f"{result['mean_flips_per_batch']:.0f} flips per act trial")
    total = sum(breakdown.values())
    print(f"one profiled int8 forward ({total * 1e3:.1f} ms under the profiler, {native.status()}):")
    for category, seconds in breakdown.items():
        print(f"  {category:<40} {seconds * 1e3:7.1f} ms  {seconds / total:6.1%}")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
