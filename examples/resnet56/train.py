"""Train one recipe of the seed study: vanilla, adversarial (PGD-7, Madry) or adversarial + strong weight decay.

    python examples/resnet56/train.py --recipe vanilla --depth 20 --epochs 12 --seed 0 --data digits \
        --out examples/resnet56/checkpoints/

writes ``<out>/<recipe>_resnet<depth>_<data>_seed<seed>.pt`` (a ``state_dict`` only, loadable with
``torch.load(path, weights_only=True)``) and a provenance JSON beside it (same name, ``.json``): the command, seed,
data, epochs, every hyperparameter, clean and PGD-7 accuracy on the test split, torch version, wall time.

The full ResNet56 of the paper is the same command with ``--depth 56 --data /path/to/cifar10`` (slow on a CPU:
hours per adversarial epoch). Every choice below is a declared assumption (the paper's settings are not known to
us); docs/examples.md lists them.

Determinism: the run is seeded (model init, shuffling, augmentation, PGD random starts all from ``--seed``) and uses
``--threads`` intra-op threads (default 1) with ``torch.use_deterministic_algorithms(True)``, so rerunning the same
command on the same machine and torch build gives a bit-identical state (``state_sha256`` in the JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import DIGITS, PHOTOS, Split, load  # noqa: E402

from pytest_hwfault.cifar_resnet import CifarResNet  # noqa: E402

# -- the threat model (Madry et al. 2018, CIFAR-10 settings, on [0, 1] images) ---------------------------------------
EPS = 8 / 255
STEP = 2 / 255  # = EPS / 4; an --eps override keeps that ratio (7 steps travel 1.75 eps)
PGD_STEPS = 7


@dataclass(frozen=True)
class Recipe:
    name: str
    adversarial: bool
    weight_decay: float
    description: str


RECIPES = {
    "vanilla": Recipe("vanilla", False, 1e-4,
                      "clean training; SGD momentum 0.9, weight decay 1e-4 (He et al. 2016's CIFAR ResNets)"),
    "adversarial": Recipe("adversarial", True, 1e-4,
                          "PGD-7 adversarial training (Madry): only the training inputs differ from vanilla"),
    "adversarial_wd": Recipe("adversarial_wd", True, 1e-2,
                             "the remedy: the adversarial recipe with 100x stronger weight decay (1e-2)"),
}
LR = 0.1  # peak of the one-cycle schedule; --lr overrides it (ResNet56 on digits diverges at 0.1 in 4 epochs)
MOMENTUM = 0.9
DEFAULT_BATCH = {DIGITS: 32, PHOTOS: 32}  # CIFAR-10: 128


def data_tag(source: str) -> str:
    return str(source) if str(source) in (DIGITS, PHOTOS) else "cifar10"


def parse_eps(text: str) -> float:
    """An L-inf budget on [0, 1] images: '8/255' or '0.1'."""
    try:
        parts = text.split("/")
        value = float(parts[0]) / float(parts[1]) if len(parts) == 2 else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--eps {text!r}: expected a number in (0, 1] such as 0.1 or 8/255") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"--eps {text!r}: expected a number in (0, 1] such as 0.1 or 8/255")
    return value


def eps_text(eps: float) -> str:
    """'0.1' for 0.1, '8/255' for 8/255: the shortest form that parse_eps reads back to the same float."""
    if float(f"{eps:g}") == eps:
        return f"{eps:g}"
    k = round(eps * 255)
    if k / 255 == eps:
        return f"{k}/255"
    return repr(eps)


def eps_label(eps: float) -> str:
    """The file-name form of a budget: '8-255', '0.1'."""
    return eps_text(eps).replace("/", "-")


def checkpoint_name(recipe: str, depth: int, source: str, seed: int, weight_decay: float | None = None,
                    eps: float | None = None) -> str:
    """File stem of a run; a --weight-decay or --eps override is part of the name, so it never replaces a recipe's
    run."""
    suffix = "" if weight_decay is None else f"_wd{weight_decay:g}"
    suffix += "" if eps is None else f"_eps{eps_label(eps)}"
    return f"{recipe}_resnet{depth}_{data_tag(source)}_seed{seed}{suffix}"


def state_sha256(model: nn.Module) -> str:
    """SHA-256 over the state_dict's names, dtypes and bytes: bit-exact identity of a trained model."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- PGD -------------------------------------------------------------------------------------------------------------
@contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Keep BatchNorm's running statistics as they are (momentum 0) while the attack runs in train mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


@contextmanager
def no_param_grads(model: nn.Module) -> Iterator[None]:
    """The attack needs gradients with respect to the input only: skip the weight gradients (a third faster)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *, eps: float = EPS,
        step: float = STEP, steps: int = PGD_STEPS) -> torch.Tensor:
    """L-inf PGD with a uniform random start in the eps-ball (Madry et al.), images kept in [0, 1].

    Runs in whatever mode the model is in (train mode during training: batch statistics, as in Madry's and Rice et
    al.'s reference code, with the running statistics frozen; eval mode for evaluation)."""
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    adv = (x + delta).clamp_(0.0, 1.0)
    with no_param_grads(model), frozen_batchnorm_stats(model):
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = adv + step * grad.sign()
                adv = torch.min(torch.max(adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return adv.detach()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: bool, seed: int = 0,
             batch_size: int = 200, eps: float = EPS) -> float:
    """Clean accuracy, or accuracy under PGD-7 at budget `eps` (step eps/4; eval mode, seeded random starts)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i: i + batch_size], y[i: i + batch_size]
        if attack:
            xb = pgd(model, xb, yb, generator, eps=eps, step=eps / 4)
        with torch.no_grad():
            correct += int((model(xb).argmax(1) == yb).sum())
    return correct / len(x)


# -- training --------------------------------------------------------------------------------------------------------
def augment(x: torch.Tensor, generator: torch.Generator, *, pad: int, flip: bool) -> torch.Tensor:
    """Random crops (zero padding `pad`) and, for CIFAR-10, horizontal flips: seeded, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    crops = torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(n)])
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        crops[mirror] = crops[mirror].flip(3)
    return crops


def train(args: argparse.Namespace) -> dict:
    recipe = RECIPES[args.recipe]
    weight_decay = recipe.weight_decay if args.weight_decay is None else args.weight_decay
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    split: Split = load(args.data)
    digits = data_tag(args.data) == DIGITS
    eps = EPS if args.eps is None else args.eps
    batch_size = args.batch_size or DEFAULT_BATCH.get(data_tag(args.data), 128)
    pad, flip = (2, False) if digits else (4, True)  # digits are not mirror-symmetric

    model = CifarResNet(args.depth, num_classes=10)
    # weight decay on every parameter, BatchNorm's scale and shift included: they set the activation ranges
    lr = LR if args.lr is None else args.lr
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)
    steps_per_epoch = -(-len(split.x_train) // batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=0.15,
                                                    anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0,
                                                    cycle_momentum=False)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train = split.train

    start = time.perf_counter()
    progress = _progress(total, f"{args.recipe} resnet{args.depth}")
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        seen = correct = 0
        loss_sum = 0.0
        for i in range(0, len(order), batch_size):
            index = order[i: i + batch_size]
            xb = augment(x_train[index], generator, pad=pad, flip=flip)
            yb = y_train[index]
            if recipe.adversarial:
                xb = pgd(model, xb, yb, generator, eps=eps, step=eps / 4)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += float(loss.detach()) * len(yb)
            progress.update(epoch, loss_sum / seen, correct / seen)
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen,
                        ("adversarial_" if recipe.adversarial else "") + "train_accuracy": correct / seen})
    progress.close()
    train_seconds = time.perf_counter() - start

    x_test, y_test = split.test
    pgd_x, pgd_y = (x_test, y_test) if args.pgd_samples is None else (x_test[: args.pgd_samples],
                                                                      y_test[: args.pgd_samples])
    clean = evaluate(model, x_test, y_test, attack=False)
    robust = evaluate(model, pgd_x, pgd_y, attack=True, seed=args.seed, eps=eps)
    wall = time.perf_counter() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = checkpoint_name(args.recipe, args.depth, args.data, args.seed, args.weight_decay, args.eps)
    state = model.eval().state_dict()
    torch.save(state, out / f"{stem}.pt")
    provenance = {
        "command": shlex.join(["python", *sys.argv]),
        "recipe": asdict(recipe) | {"weight_decay": weight_decay},
        "model": f"CifarResNet(depth={args.depth}) from pytest_hwfault.cifar_resnet",
        "depth": args.depth,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": split.name,
        "train_images": len(x_train),
        "test_images": len(x_test),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": batch_size,
        "optimizer": {"name": "SGD", "lr_max": lr, "momentum": MOMENTUM, "weight_decay": weight_decay,
                      "schedule": "one-cycle (torch OneCycleLR, cosine in both phases): 15% warm-up from lr/10, "
                                  "then down to lr/1000",
                      "decayed": "all parameters (BatchNorm weight and bias included)"},
        "augmentation": f"random crop (zero padding {pad})" + (", horizontal flip" if flip else ""),
        "pgd": {"eps": eps, "eps_255": round(eps * 255, 6), "step": eps / 4, "step_255": round(eps * 255 / 4, 6),
                "steps": PGD_STEPS, "random_start": True,
                "used_in_training": recipe.adversarial,
                "norm": "linf", "images": "[0, 1]",
                "train_mode": "batch statistics, running statistics frozen during the attack",
                "eval_mode": "eval (running statistics), seeded random start"},
        "clean_accuracy": clean,
        "pgd_accuracy": robust,
        "pgd_images": len(pgd_x),
        "history": history,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall, 1),
        "state_sha256": state_sha256(model),
        "checkpoint": f"{stem}.pt",
    }
    (out / f"{stem}.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"{stem}: clean {clean:.4f}, PGD-{PGD_STEPS} {robust:.4f}, {wall:.0f} s -> {out / (stem + '.pt')}",
          flush=True)
    return provenance


class _progress:
    """tqdm when it is installed, else one progress line per epoch."""

    def __init__(self, total: int, label: str) -> None:
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="step", dynamic_ncols=True, mininterval=1.0)
        except ImportError:
            self.bar = None
        self.label, self.total, self.done, self.epoch = label, total, 0, -1

    def update(self, epoch: int, loss: float, acc: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", acc=f"{acc:.3f}", refresh=False)
            self.bar.update(1)
        elif epoch != self.epoch or self.done == self.total:
            print(f"{self.label}: step {self.done}/{self.total} epoch {epoch + 1} loss {loss:.3f} acc {acc:.3f}",
                  flush=True)
        self.epoch = epoch

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    p.add_argument("--depth", type=int, default=20, help="6n+2: 20 (stand-in checkpoints) or 56 (the paper's)")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DIGITS,
                   help="'digits' or 'photos' (offline stand-ins, examples/resnet56/data.py) or a CIFAR-10 folder")
    p.add_argument("--eps", type=parse_eps, default=None,
                   help="PGD budget for training and the PGD evaluation, e.g. 0.3 or 8/255 (default 8/255)")
    p.add_argument("--out", default=str(HERE / "checkpoints"))
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on the stand-ins, 128 on CIFAR-10")
    p.add_argument("--weight-decay", type=float, default=None, help="override the recipe's weight decay")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {LR})")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: bit-exact reruns)")
    p.add_argument("--pgd-samples", type=int, default=None, help="PGD-evaluate only the first N test images")
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse())
