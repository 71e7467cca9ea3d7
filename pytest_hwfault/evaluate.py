"""Accuracy of a quantized model, with or without faults, over fixed evaluation tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .data import as_tensors
from .faults import FaultModel, FaultPattern, sample_pattern
from .quantization import QuantizedModel

DEFAULT_BATCH_SIZE = 256


@dataclass
class Predictions:
    """Per-image outcome of one pass over the evaluation set."""

    predicted: torch.Tensor  # int64 [M]; -1 where the logits were not finite
    nonfinite: torch.Tensor  # bool [M]

    def correct(self, labels: torch.Tensor) -> torch.Tensor:
        return (self.predicted == labels.to(self.predicted.device)) & ~self.nonfinite


def decide(logits: torch.Tensor) -> Predictions:
    """Predicted class per row of a batch of logits; a row with NaN/Inf counts as misclassified (predicted -1),
    never crashes."""
    logits = logits.reshape(len(logits), -1)
    nonfinite = ~torch.isfinite(logits).all(dim=1)
    predicted = torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0).argmax(dim=1)
    return Predictions(torch.where(nonfinite, torch.full_like(predicted, -1), predicted), nonfinite)


def predict(
    qmodel: QuantizedModel,
    inputs: torch.Tensor,
    faults: FaultPattern | None = None,
    *,
    quantized: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Predictions:
    """Predictions for every image; weight faults are applied once for the whole pass and then restored."""
    if faults is not None:
        qmodel.validate(faults, len(inputs))
    predicted, nonfinite = [], []

    def run() -> None:
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size]
            logits = qmodel._forward(x, faults, start) if quantized else qmodel.float_forward(x)
            part = decide(logits)
            predicted.append(part.predicted.cpu())
            nonfinite.append(part.nonfinite.cpu())

    if faults is not None and faults.has_weight_faults():
        with qmodel.weight_faults(faults):
            run()
    else:
        run()
    return Predictions(torch.cat(predicted), torch.cat(nonfinite))


def accuracy(
    qmodel: QuantizedModel,
    data: Any,
    faults: FaultModel | FaultPattern | None = None,
    *,
    seed: int = 0,
    samples: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """Top-1 accuracy of `qmodel` on `data` (DataLoader, Dataset or (X, y)), under an exact fault pattern or one
    trial drawn from a fault model with `seed`."""
    x, y = as_tensors(data, samples)
    if isinstance(faults, FaultModel):
        generator = torch.Generator().manual_seed(seed)
        faults = sample_pattern(faults, qmodel.targets(faults.site, faults.layers), len(x), generator)
    outcome = predict(qmodel, x, faults, batch_size=batch_size)
    return float(outcome.correct(y).float().mean())


def float_accuracy(qmodel: QuantizedModel, data: Any, *, samples: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    x, y = as_tensors(data, samples)
    return float(predict(qmodel, x, quantized=False, batch_size=batch_size).correct(y).float().mean())
