"""The plan of the seed study: which checkpoints exist, how each was trained, and how to train the missing ones.

    python examples/resnet56/study.py list                  # every run of the plan, and whether it is trained
    python examples/resnet56/study.py train --jobs 2        # train the missing ones, one process per job
    python examples/resnet56/study.py train --only headline --data digits

Four parts, on each offline stand-in (``digits`` and ``photos``, examples/resnet56/data.py):

* ``headline``: the three recipes (vanilla, adversarial PGD-7 at 8/255, adversarial + weight decay 1e-2) x ``SEEDS``
  training seeds; CifarResNet-56 on digits (the example suite gates the seed-0 models), CifarResNet-20 on photos
  (the CPU budget: see docs/examples.md). The report gives every claim with a seed-level interval.
* ``depth``: CifarResNet-56 on photos, seed 0: whether the photos findings carry over to the deeper model.
* ``eps``: the attack-strength sweep. Adversarial training at each budget of ``EPS_SWEEP`` (step eps/4, 7 steps),
  CifarResNet-20 (ResNet56 does not fit the CPU budget for 2 data sets x 5 budgets; see docs/examples.md).
* ``wd``: the remedy's dose-response. Adversarial training at 8/255 with each weight decay of ``WD_SWEEP``,
  CifarResNet-20.

The sweeps share their 8/255 and 1e-4 / 1e-2 points with the ResNet20 recipe runs (``base``). Every run is one
``train.py`` command with one intra-op thread, so it is bit-exact on a rerun; ``--jobs`` runs several at once.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHECKPOINTS = HERE / "checkpoints"
sys.path.insert(0, str(HERE))

from data import DIGITS, PHOTOS  # noqa: E402
from train import EPS, RECIPES, checkpoint_name, eps_text  # noqa: E402

STAND_INS = (DIGITS, PHOTOS)
SEEDS = (0, 1, 2)
EPOCHS = 4
HEADLINE_DEPTH = {DIGITS: 56, PHOTOS: 20}
SWEEP_DEPTH = 20
DEPTH_CHECK = 56
LR = {56: 0.05, 20: 0.1}  # one-cycle peak; ResNet56 diverges at 0.1 within 4 epochs on the stand-ins
EPS_SWEEP = (2 / 255, 8 / 255, 0.1, 0.2, 0.3)
WD_SWEEP = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2)


@dataclass(frozen=True)
class Run:
    """One training run of the plan; `eps` and `weight_decay` are None for the recipe's own values."""

    part: str
    recipe: str
    depth: int
    data: str
    seed: int
    eps: float | None = None
    weight_decay: float | None = None

    @property
    def stem(self) -> str:
        return checkpoint_name(self.recipe, self.depth, self.data, self.seed, self.weight_decay, self.eps)

    @property
    def trained(self) -> bool:
        return (CHECKPOINTS / f"{self.stem}.pt").exists() and (CHECKPOINTS / f"{self.stem}.json").exists()

    @property
    def effective_eps(self) -> float:
        return EPS if self.eps is None else self.eps

    @property
    def effective_weight_decay(self) -> float:
        return RECIPES[self.recipe].weight_decay if self.weight_decay is None else self.weight_decay

    def argv(self) -> list[str]:
        argv = ["examples/resnet56/train.py", "--recipe", self.recipe, "--depth", str(self.depth), "--epochs",
                str(EPOCHS), "--seed", str(self.seed), "--data", self.data, "--lr", f"{LR[self.depth]:g}",
                "--out", "examples/resnet56/checkpoints/"]
        if self.eps is not None:
            argv += ["--eps", eps_text(self.eps)]
        if self.weight_decay is not None:
            argv += ["--weight-decay", f"{self.weight_decay:g}"]
        return argv


def headline(data: str) -> list[Run]:
    return [Run("headline", recipe, HEADLINE_DEPTH[data], data, seed) for seed in SEEDS for recipe in RECIPES]


def depth_check(data: str) -> list[Run]:
    """The deeper model on a stand-in whose headline runs are shallower (none where they are the same depth)."""
    if HEADLINE_DEPTH[data] == DEPTH_CHECK:
        return []
    return [Run("depth", recipe, DEPTH_CHECK, data, 0) for recipe in RECIPES]


def base(data: str) -> list[Run]:
    """The ResNet20 recipe runs: the sweeps' reference points."""
    return [Run("base", recipe, SWEEP_DEPTH, data, 0) for recipe in RECIPES]


def eps_sweep(data: str) -> list[Run]:
    return [Run("eps", "adversarial", SWEEP_DEPTH, data, 0, eps=e) for e in EPS_SWEEP if e != EPS]


def wd_sweep(data: str) -> list[Run]:
    recipe_wds = {r.weight_decay for r in RECIPES.values() if r.adversarial}
    return [Run("wd", "adversarial", SWEEP_DEPTH, data, 0, weight_decay=w) for w in WD_SWEEP if w not in recipe_wds]


def eps_points(data: str) -> list[tuple[float, Run]]:
    """(eps, run) for every budget of the sweep, the 8/255 point being the adversarial recipe's ResNet20 run."""
    runs = {r.effective_eps: r for r in eps_sweep(data)}
    runs[EPS] = Run("base", "adversarial", SWEEP_DEPTH, data, 0)
    return sorted(runs.items())


def wd_points(data: str) -> list[tuple[float, Run]]:
    """(weight decay, run) for every point of the dose-response, the recipes' own runs included."""
    runs = {r.effective_weight_decay: r for r in wd_sweep(data)}
    for recipe in ("adversarial", "adversarial_wd"):
        runs[RECIPES[recipe].weight_decay] = Run("base", recipe, SWEEP_DEPTH, data, 0)
    return sorted(runs.items())


PARTS = {"headline": headline, "base": base, "eps": eps_sweep, "wd": wd_sweep, "depth": depth_check}


def plan(only: tuple[str, ...] = tuple(PARTS), data: tuple[str, ...] = STAND_INS) -> list[Run]:
    """Every run once (a checkpoint may serve two parts), in training order: the models the example suite gates
    first, then the other seeds, the ResNet20 base and sweeps, and the depth check."""
    runs = list({run.stem: run for d in data for part in only for run in PARTS[part](d)}.values())

    def order(run: Run) -> int:
        if run.part == "headline":
            return 0 if run.seed == 0 and run.data == DIGITS else 1
        return {"base": 2, "eps": 3, "wd": 3, "depth": 4}[run.part]

    return sorted(runs, key=order)


def _train(run: Run) -> tuple[Run, int, float]:
    start = time.perf_counter()
    log = CHECKPOINTS / f"{run.stem}.log"
    with log.open("w") as out:
        code = subprocess.call([sys.executable, *run.argv()], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if code == 0:
        log.unlink()  # the provenance JSON keeps what matters; a failed run keeps its log
    return run, code, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("list", "train"))
    p.add_argument("--only", action="append", choices=sorted(PARTS), help="parts of the plan (default: all)")
    p.add_argument("--data", action="append", choices=STAND_INS, help="stand-ins (default: both)")
    p.add_argument("--jobs", type=int, default=1, help="training processes at once (each uses one thread)")
    args = p.parse_args(argv)
    runs = plan(tuple(args.only or PARTS), tuple(args.data or STAND_INS))
    if args.action == "list":
        for run in runs:
            print(f"{'trained' if run.trained else 'missing':8} {run.part:9} python {shlex.join(run.argv())}")
        return 0
    missing = [run for run in runs if not run.trained]
    print(f"{len(missing)} of {len(runs)} runs to train, {args.jobs} at a time", flush=True)
    failed = 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in as_completed([pool.submit(_train, run) for run in missing]):
            run, code, seconds = future.result()
            failed += code != 0
            print(f"{'ok' if code == 0 else f'FAILED ({code})':12} {run.stem} in {seconds:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
