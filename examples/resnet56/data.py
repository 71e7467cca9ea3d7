"""Data of the example: CIFAR-10 from a local folder, or one of two offline stand-ins.

Nothing is ever downloaded.

* ``load("/path/to/cifar10")``: ``torchvision.datasets.CIFAR10(root, train=..., download=False)``; the folder must
  hold ``cifar-10-batches-py`` (the python version of the data set, as torchvision unpacks it).
* ``load("digits")``: the stand-in. scikit-learn ships the 1797 8x8 UCI handwritten digits (17 grey levels, 0-16)
  inside the package. Each image is scaled to [0, 1], bilinearly upsampled to 32x32 and replicated to 3 channels,
  so it has CIFAR-10's shape (3x32x32, values in [0, 1], 10 classes) and the CIFAR ResNets run on it unchanged.
  The train/test split is fixed: a seeded permutation (``SPLIT_SEED``) puts ``DIGITS_TEST`` images in the test
  split and the other 1397 in the train split, the same on every machine.
* ``load("photos")``: the natural-image stand-in. Ten of the photographs that scikit-image ships inside its wheel
  (``PHOTOS``) are ten classes; an image is a random crop of one of them (side 10-25% of the photo's shorter side,
  random position, mirrored with probability 1/2), resized to 32x32 RGB with an antialiased bilinear filter. Grey
  photographs are replicated to 3 channels. Train crops come from the left 75% of each photo and test crops from
  the right 25%, so no test pixel was ever seen in training. 140 train and 40 test crops per class (1400 / 400,
  the size of the digits split), all drawn from ``SPLIT_SEED``. What it is: 32x32 RGB images with natural-image
  statistics (textures, edges, colour, 256 grey levels), the shape and value range of CIFAR-10. What it is not:
  CIFAR-10. The task is "which photograph is this patch from", closer to texture and colour recognition than to
  object categories, with ten source images rather than 60,000 photographs.

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
PHOTOS = "photos"
# scikit-image's data function per class (motorcycle_left is the left view of stereo_motorcycle)
PHOTO_CLASSES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "retina", "hubble_deep_field",
                 "brick", "grass", "gravel")
PHOTO_TRAIN, PHOTO_TEST = 140, 40  # crops per class
PHOTO_TRAIN_FRACTION = 0.75  # train crops from the left 75% of a photo's width, test crops from the rest
PHOTO_CROP = (0.10, 0.25)  # crop side as a fraction of the photo's shorter side


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


def _photo(name: str) -> torch.Tensor:
    """One photograph of scikit-image's wheel as float32 [3, H, W] in [0, 1] (read from the package, no fetch)."""
    import skimage.data

    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
    x = torch.from_numpy(image.copy()).float().div_(255.0)
    return x.unsqueeze(0).expand(3, -1, -1) if x.ndim == 2 else x.permute(2, 0, 1)


def _crops(photo: torch.Tensor, count: int, columns: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """`count` random square crops inside the column range, each mirrored at random and resized to 32x32."""
    _, h, _ = photo.shape
    shorter = min(photo.shape[1:])
    low, high = (round(f * shorter) for f in PHOTO_CROP)
    out = torch.empty(count, 3, 32, 32)
    for i in range(count):
        side = int(torch.randint(low, min(high, columns[1] - columns[0]) + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
        left = int(torch.randint(columns[0], columns[1] - side + 1, (1,), generator=generator))
        crop = photo[:, top: top + side, left: left + side].unsqueeze(0)
        if bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(3)
        out[i] = F.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.clamp_(0.0, 1.0)


def photos_32x32() -> Split:
    """The natural-image stand-in: crops of ten scikit-image photographs, train and test from disjoint regions."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    train_x, train_y, test_x, test_y = [], [], [], []
    for label, name in enumerate(PHOTO_CLASSES):
        photo = _photo(name)
        width = photo.shape[2]
        cut = round(PHOTO_TRAIN_FRACTION * width)
        train_x.append(_crops(photo, PHOTO_TRAIN, (0, cut), generator))
        test_x.append(_crops(photo, PHOTO_TEST, (cut, width), generator))
        train_y.append(torch.full((PHOTO_TRAIN,), label, dtype=torch.int64))
        test_y.append(torch.full((PHOTO_TEST,), label, dtype=torch.int64))
    # interleave the classes (a seeded permutation), so that the first N test images cover every class
    x_train, y_train, x_test, y_test = (torch.cat(t) for t in (train_x, train_y, test_x, test_y))
    train = torch.randperm(len(x_train), generator=generator)
    test = torch.randperm(len(x_test), generator=generator)
    return Split(x_train[train], y_train[train], x_test[test], y_test[test], PHOTOS)


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


STAND_INS = {DIGITS: digits_32x32, PHOTOS: photos_32x32}


def load(source: str | Path) -> Split:
    """``"digits"`` or ``"photos"`` for an offline stand-in, otherwise a local CIFAR-10 folder."""
    stand_in = STAND_INS.get(str(source))
    return stand_in() if stand_in is not None else cifar10(source)
