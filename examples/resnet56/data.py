"""Data of the example: CIFAR-10 from a local folder, or an offline stand-in built from scikit-learn's digits.

Nothing is ever downloaded.

* ``load("/path/to/cifar10")``: ``torchvision.datasets.CIFAR10(root, train=..., download=False)``; the folder must
  hold ``cifar-10-batches-py`` (the python version of the data set, as torchvision unpacks it).
* ``load("digits")``: the stand-in. scikit-learn ships the 1797 8x8 UCI handwritten digits (17 grey levels, 0-16)
  inside the package. Each image is scaled to [0, 1], bilinearly upsampled to 32x32 and replicated to 3 channels,
  so it has CIFAR-10's shape (3x32x32, values in [0, 1], 10 classes) and the CIFAR ResNets run on it unchanged.
  The train/test split is fixed: a seeded permutation (``SPLIT_SEED``) puts ``DIGITS_TEST`` images in the test
  split and the other 1397 in the train split, the same on every machine.

Both return float32 tensors ``(x, y)`` with x in [0, 1] (no normalisation: the PGD budget eps = 8/255 is defined on
[0, 1] images, and the model sees the images as they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DIGITS = "digits"
SPLIT_SEED = 20220314  # fixed: the split must not depend on the training seed
DIGITS_TEST = 400


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor  # float32 [N, 3, 32, 32] in [0, 1]
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str  # "digits" or "cifar10:<root>"

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_test, self.y_test


def digits_32x32() -> Split:
    """scikit-learn's digits as 3x32x32 images in [0, 1], with the fixed train/test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = order[:DIGITS_TEST], order[DIGITS_TEST:]
    return Split(x[train], y[train], x[test], y[test], DIGITS)


def cifar10(root: str | Path) -> Split:
    """CIFAR-10 from a local folder (never downloaded)."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    try:
        train = CIFAR10(str(root), train=True, download=False)
        test = CIFAR10(str(root), train=False, download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted."
        message = (f"{root}: no CIFAR-10 here; expected {root / 'cifar-10-batches-py'}. This example "
                   "never downloads: fetch and unpack CIFAR-10 yourself, or use --data digits.")
        raise SystemExit(message) from None

    def tensors(ds: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    x_train, y_train = tensors(train)
    x_test, y_test = tensors(test)
    return Split(x_train, y_train, x_test, y_test, f"cifar10:{root}")


def load(source: str | Path) -> Split:
    """``"digits"`` for the offline stand-in, otherwise a local CIFAR-10 folder."""
    return digits_32x32() if str(source) == DIGITS else cifar10(source)
