"""Fixtures of the example suite: the three ResNet56 release candidates of the seed study, and the data to judge them.

Copy this pattern: load the release candidates once per session (per xdist worker), hand `hwfault.assess` a fixed,
unshuffled evaluation set, and calibrate the quantizer on training images, never on the images you evaluate.

Run:  pytest examples/resnet56 --hwfault -n 2      (without --hwfault the @resilience gates are skipped)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from data import DIGITS, Split, load  # noqa: E402
from train import RECIPES, checkpoint_name  # noqa: E402

from pytest_hwfault.cifar_resnet import CifarResNet  # noqa: E402

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # one torch thread pool per core, not per worker
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

CHECKPOINTS = HERE / "checkpoints"
DEPTH = 56  # the paper's model, trained on the digits stand-in (examples/resnet56/study.py: headline, seed 0)
SEED = 0
LR = 0.05  # the study's peak learning rate for ResNet56
CALIBRATION_IMAGES = 512  # training images that calibrate the quantizer's scales


@dataclass(frozen=True)
class Candidate:
    """A trained model and the provenance its training run wrote."""

    recipe: str
    model: torch.nn.Module
    provenance: dict


@pytest.fixture(scope="session")
def split() -> Split:
    return load(DIGITS)


@pytest.fixture(scope="session")
def models() -> dict[str, Candidate]:
    """The three checkpoints, loaded with torch.load(weights_only=True) into the shared CifarResNet definition."""
    candidates = {}
    for recipe in RECIPES:
        stem = checkpoint_name(recipe, DEPTH, DIGITS, SEED)
        path = CHECKPOINTS / f"{stem}.pt"
        if not path.exists():
            pytest.fail(f"{path} is missing; train it: python examples/resnet56/train.py --recipe {recipe} "
                        f"--depth {DEPTH} --data {DIGITS} --seed {SEED} --epochs 4 --lr {LR}", pytrace=False)
        model = CifarResNet(DEPTH)
        model.load_state_dict(torch.load(path, weights_only=True))
        provenance = json.loads((CHECKPOINTS / f"{stem}.json").read_text())
        candidates[recipe] = Candidate(recipe, model.eval(), provenance)
    return candidates


@pytest.fixture(scope="session")
def val_data(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation set of the gates: the fixed test split as an (X, y) pair (markers use its first SAMPLES)."""
    return split.test


@pytest.fixture(scope="session")
def calibration(split: Split) -> torch.Tensor:
    """Images that calibrate the int8 scales: training images, so that evaluation images stay unseen."""
    return split.x_train[:CALIBRATION_IMAGES]


@pytest.fixture
def campaigns_enabled(request: pytest.FixtureRequest) -> None:
    """Skip a plain test that runs fault campaigns itself unless --hwfault is given, like the @resilience gates."""
    if not request.config.getoption("hwfault"):
        pytest.skip("pass --hwfault to run hardware-fault campaigns")
