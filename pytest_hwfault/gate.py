"""Run the campaign a gate asks for, reusing quantized models: the plugin's engine room, free of pytest."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .campaign import Campaign, CampaignResult, TrialResult
from .data import as_tensors, iter_batches
from .late_start import DEFAULT_CACHE_BYTES
from .quantization import QuantizedModel, quantize, state_checksum
from .sharding import RunDir, Slice
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


@dataclass(frozen=True)
class Execution:
    """How this process takes part in a campaign: its xdist shard and CI slice, and the shared run directory."""

    shard: int = 1
    shards: int = 1
    ci_slice: Slice = Slice()
    run_root: Path | None = None


@dataclass
class Assessment:
    result: CampaignResult
    final: bool  # True when `result` carries the campaign's verdict; False for a shard's partial share


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
    on_trial: Callable[[CampaignResult, TrialResult], None] | None = None,
    execution: Execution = Execution(),
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Assessment:
    """Quantize (or reuse) `model`, then run this process's part of the campaign `spec` on `data`.

    Calibration uses `calibration_data` when given, else the first DEFAULT_CALIBRATION_SAMPLES images of `data`.
    `cache_bytes` bounds the late-start cache (0: no late start).
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
    campaign = Campaign(qmodel, inputs, labels, spec, name, late_start=cache_bytes > 0, cache_bytes=cache_bytes)
    allowed = execution.ci_slice.trials(spec.budget)
    whole = execution.ci_slice.count == 1
    if execution.shards == 1 or execution.run_root is None or not execution.run_root.is_dir():
        if execution.shard > 1:  # no shared run directory (a remote gateway): shard 1 runs everything
            return Assessment(campaign.empty_result(), final=False)
        result = campaign.run(allowed, on_trial=on_trial)
        return Assessment(result.trimmed() if whole else result, final=whole)
    run_dir = RunDir(execution.run_root, campaign.campaign_id)
    shared = campaign.empty_result()

    def claims() -> Iterator[int]:
        while not run_dir.collect(shared).decided():
            index = run_dir.claim(allowed)
            if index is None:
                return
            yield index

    mine = campaign.empty_result()
    start = time.perf_counter()
    for index in claims():
        trial = mine.trials[index] = campaign.trial(index)
        run_dir.publish(trial)
    mine.seconds = time.perf_counter() - start
    if run_dir.finish(execution.shard, execution.shards):
        merged = run_dir.collect(campaign.empty_result())
        merged.seconds = mine.seconds
        return Assessment(merged.trimmed() if whole else merged, final=whole)
    return Assessment(mine, final=False)
