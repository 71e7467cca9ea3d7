"""Run the campaign a gate asks for, reusing quantized models: the plugin's engine room, free of pytest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .campaign import Campaign, CampaignResult
from .data import as_tensors, iter_batches
from .quantize import QuantizedModel, quantize, state_checksum
from .spec import CampaignSpec

DEFAULT_CALIBRATION_SAMPLES = 512


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--hwfault-device=cuda but torch.cuda.is_available() is False")
    return torch.device(choice)


@dataclass
class ModelCache:
    """Quantized views by (model state, calibration data, quantization options): quantize once per process."""

    entries: dict[tuple[str, ...], QuantizedModel] = field(default_factory=dict)
    hits: int = 0

    def get(self, model: nn.Module, calibration: torch.Tensor, device: torch.device, bits: int,
            options: dict[str, Any]) -> QuantizedModel:
        key = (type(model).__qualname__, state_checksum(model), tensor_fingerprint(calibration), str(device),
               str(bits), repr(sorted(options.items())))
        if key in self.entries:
            self.hits += 1
            return self.entries[key]
        qmodel = quantize(model, calibration, bits=bits, device=device, **options)
        self.entries[key] = qmodel
        return qmodel


def assess(
    model: nn.Module | QuantizedModel,
    data: Any,
    spec: CampaignSpec,
    name: str,
    *,
    cache: ModelCache,
    device: torch.device,
    calibration_data: Any = None,
    quantize_options: dict[str, Any] | None = None,
    on_trial: Callable[[CampaignResult], None] | None = None,
    trials: Any = None,
) -> CampaignResult:
    """Quantize (or reuse) `model`, then run the campaign `spec` on `data` until it decides.

    Calibration uses `calibration_data` when given, else the first DEFAULT_CALIBRATION_SAMPLES images of `data`.
    """
    inputs, labels = as_tensors(data, spec.samples)
    if isinstance(model, QuantizedModel):
        qmodel = model
    else:
        if calibration_data is None:
            calibration = inputs[:DEFAULT_CALIBRATION_SAMPLES]
        else:
            calibration = torch.cat([x for x, _ in iter_batches(calibration_data)])
        qmodel = cache.get(model, calibration, device, spec.bits, dict(quantize_options or {}))
    campaign = Campaign(qmodel, inputs, labels, spec, name)
    return campaign.run(trials, on_trial=on_trial)
