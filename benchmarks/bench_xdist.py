"""Wall time of one ResNet-sized campaign run by `pytest -n 2` against `pytest -n 0`, in one run.

    python benchmarks/bench_xdist.py [--rounds 3] [--depth 56] [--trials 32] [--campaigns 1] [--json out.json]

The suite is written to a temporary directory: one @resilience test on a CIFAR-style ResNet (random init, BN
statistics from a few batches) over 256 images, with `first == budget` so every run computes exactly `--trials`
trials whatever the verdict. Each round times the commands back to back (the CPU's speed drifts); the figure is
the median of the per-round ratios. Both include pytest start-up, quantization and the golden run (per worker
under xdist), as a user's CI would pay them. Target (issue 16): -n 2 at least 1.0x the speed of -n 0 on 2 cores.

Every command writes its JSON report (`--hwfault-report`); the script checks that the campaign's numbers are
identical in all of them (everything but the timings), and fails if they are not. From the reports it also takes
the time spent in trials alone (a result's `seconds`), so the wall time splits into trials and the rest
(start-up, fixtures, quantization, golden and float passes): the trials' speed-up is the most xdist can give.

A third command, `-n 0` with OMP_NUM_THREADS=1, shows how the workers themselves scale: plain `-n 0` already uses
every core through torch's intra-op threads (the plugin gives each xdist worker cores / workers threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, machine_line, save_json  # benchmarks/_common.py, beside this script

CONFTEST = '''
import pytest, torch
from pytest_hwfault.cifar_resnet import CifarResNet

@pytest.fixture(scope="session")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same model in every process, whatever its thread count
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = CifarResNet({depth}).train()
        with torch.no_grad():
            for _ in range(3):
                net(torch.randn(64, 3, 32, 32))
    torch.set_num_threads(threads)
    return net.eval()

@pytest.fixture(scope="session")
def val_data(model):
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y
'''

SUITE = '''
from pytest_hwfault import resilience

@resilience(ber={bers}, site="act", min_acc=0.0, budget={trials}, first={trials})
def test_campaign(hwfault, model, val_data):
    hwfault.assess(model, val_data)
'''


def _time(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


def _numbers(report: Path) -> tuple[list[dict], float]:
    """The campaigns' records without their timings (in test order), and the seconds their trials took (the
    shard that carried each verdict, under xdist)."""
    records = sorted(json.loads(report.read_text())["campaigns"], key=lambda record: record["nodeid"])
    seconds = 0.0
    for record in records:
        seconds += record.pop("seconds")
        record["result"].pop("seconds")
    return records, seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--campaigns", type=int, default=1,
                        help="campaigns on the same model and images (act BER 1e-4, 2e-4, ...), as a suite gates one "
                             "model at several BERs: each process then pays its start-up and set-up once for all")
    parser.add_argument("--json", help="save the results to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hwfault-bench-xdist-") as tmp:
        root = Path(tmp)
        (root / "conftest.py").write_text(CONFTEST.format(depth=args.depth))
        bers = [round(1e-4 * (k + 1), 6) for k in range(args.campaigns)]
        (root / "test_campaign.py").write_text(SUITE.format(trials=args.trials, bers=bers[0] if len(bers) == 1
                                                            else bers))
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hwfault"]
        one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
        commands = {"n0": (["-n", "0"], None), "n0_1thread": (["-n", "0"], one_thread),
                    f"n{args.workers}": (["-n", str(args.workers)], None)}
        times: dict[str, list[float]] = {k: [] for k in commands}
        trial_seconds: dict[str, list[float]] = {k: [] for k in commands}
        records: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for name, (options, env) in commands.items():
                report = root / f"{name}.json"
                times[name].append(_time([*base, *options, f"--hwfault-report={report}"], root, env))
                records[name], seconds = _numbers(report)
                trial_seconds[name].append(seconds)
                if records[name] != records["n0"]:
                    raise SystemExit(f"the campaign's numbers differ between -n 0 and {name}: "
                                     f"{json.dumps(records['n0'])[:2000]}\n{json.dumps(records[name])[:2000]}")
    parallel = f"n{args.workers}"
    speedups = [a / b for a, b in zip(times["n0"], times[parallel])]
    worker_scaling = [a / b for a, b in zip(times["n0_1thread"], times[parallel])]
    trial_speedups = [a / b for a, b in zip(trial_seconds["n0"], trial_seconds[parallel])]
    result = {
        "benchmark": "xdist",
        "depth": args.depth,
        "trials": args.trials,
        "campaigns": args.campaigns,
        "images": 256,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "seconds": times,
        "trial_seconds": trial_seconds,
        "identical_numbers": True,  # checked above: the script stops when they differ
        "median_speedup": statistics.median(speedups),
        "median_speedup_vs_one_thread": statistics.median(worker_scaling),
        "median_trial_speedup": statistics.median(trial_speedups),
        **environment(),
    }
    print(f"ResNet{args.depth}, {args.campaigns} campaign(s) of {args.trials} trials x 256 images, act BER 1e-4"
          f"{' and up' if args.campaigns > 1 else ''}, {args.rounds} rounds, {os.cpu_count()} CPUs")
    print(machine_line())
    for name, label in (("n0", "pytest -n 0"), (parallel, f"pytest -n {args.workers}"),
                        ("n0_1thread", "pytest -n 0, OMP_NUM_THREADS=1")):
        wall, trials = statistics.median(times[name]), statistics.median(trial_seconds[name])
        print(f"  {label:32s} median {wall:6.1f} s   trials {trials:6.1f} s   rest {wall - trials:5.1f} s")
    print(f"  speed-up -n {args.workers} vs -n 0             median {result['median_speedup']:.2f}x  (target >= 1.0x)")
    if args.campaigns == 1:  # several campaigns' shards overlap under xdist: their trial times do not add up
        print(f"  speed-up of the trials alone      median {result['median_trial_speedup']:.2f}x  (the most xdist "
              "can give here)")
    else:
        print("  (trials and rest: under xdist, summed over campaigns whose shards ran at once, so not a split)")
    print(f"  speed-up -n {args.workers} vs -n 0 on 1 thread median {result['median_speedup_vs_one_thread']:.2f}x  "
          "(how xdist workers scale)")
    print("  the campaign's numbers: identical in every report")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
