"""Run the campaign a gate asks for, reusing quantized models: the plugin's engine room, free of pytest.

`prepare` is the one place where a gate's data and model are made ready (tensors checked, calibration chosen, the
model quantized once per process); `assess`, the fixture's `quantize` and its `search` all go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .campaign import Campaign, CampaignResult, TrialResult
from .data import (
    Batch,
    DataError,
    Inputs,
    as_tensors,
    bounded,
    check_finite,
    check_not_duplicated,
    check_stable,
    concat,
    iter_batches,
)
from .identity import attributes_fingerprint, model_fingerprint, outputs_fingerprint, tensor_fingerprint
from .late_start import DEFAULT_CACHE_BYTES
from .quantization import QuantizedModel, quantize, refuse_non_model, refuse_ungateable
from .sharding import RunDir, Slice, take_part
from .spec import CampaignSpec

DEFAULT_CALIBRATION_SAMPLES = 512


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--hwfault-device=cuda but torch.cuda.is_available() is False")
    return torch.device(choice)


@dataclass
class ModelCache:
    """Quantized views by (model architecture and state, what the model computes, calibration data, quantization
    options): quantize once per process. Equal weights do not make equal models: the architecture is part of the
    key, and so are every module's own attributes (a function kept as ``self.act``) and the float outputs of a
    private copy on a few calibration images (a module global changed between two tests), since a view handed to
    another model is a verdict about a model the gate did not test."""

    entries: dict[tuple[str, ...], QuantizedModel] = field(default_factory=dict)
    hits: int = 0

    def get(self, model: nn.Module, calibration: Batch, device: torch.device, bits: int,
            options: dict[str, Any], fingerprint: str | None = None) -> QuantizedModel:
        computes = (attributes_fingerprint(model), outputs_fingerprint(model, calibration)) \
            if isinstance(model, nn.Module) else ()  # an ONNX model is its bytes
        key = (fingerprint or model_fingerprint(model), *computes, tensor_fingerprint(*_tensors(calibration)),
               str(device), str(bits), repr(sorted(options.items())))
        if key in self.entries:
            self.hits += 1
            return self.entries[key]
        qmodel = quantize(model, calibration, bits=bits, device=device, **options)
        self.entries[key] = qmodel
        return qmodel


@dataclass(frozen=True)
class Prepared:
    """A gate's model and data, ready for a campaign or a search."""

    qmodel: QuantizedModel
    inputs: Batch
    labels: torch.Tensor
    identity: dict[str, str]  # fingerprints of the model and the evaluation data; shards must agree on them


def calibration_tensor(calibration_data: Any) -> Batch:
    """The inputs of `calibration_data` (a tensor, (X, y), a DataLoader or a Dataset), checked finite."""
    batches = list(bounded(calibration_data, iter_batches(calibration_data), None, "the calibration data",
                           "Give the images to calibrate on as a tensor or a Dataset"))
    if not batches:
        raise DataError("the calibration data is empty")
    check_stable(calibration_data, *batches[0], "the calibration data")
    calibration = concat([x for x, _ in batches])
    check_finite(calibration, "the calibration data")
    return calibration


def quantized(model: nn.Module | QuantizedModel, calibration: Batch, *, cache: ModelCache,
              device: torch.device, bits: int, options: dict[str, Any] | None = None,
              fingerprint: str | None = None) -> QuantizedModel:
    """`model` itself when it is already a quantized view, else its cached quantized view."""
    if isinstance(model, QuantizedModel):
        return model
    return cache.get(model, calibration, device, bits, dict(options or {}), fingerprint)


def prepare(model: nn.Module | QuantizedModel, data: Any, *, samples: int | None, bits: int, cache: ModelCache,
            device: torch.device, calibration_data: Any = None,
            quantize_options: dict[str, Any] | None = None) -> Prepared:
    inputs, labels = as_tensors(data, samples)
    check_finite(inputs, "the evaluation inputs")
    check_not_duplicated(data, inputs)
    if isinstance(model, nn.Module):  # before its fingerprint, which reads the forward's code
        refuse_ungateable(model, type(model).__qualname__)
    elif not isinstance(model, QuantizedModel):
        refuse_non_model(model)
    fingerprint = model_fingerprint(model.module if isinstance(model, QuantizedModel) else model)
    calibration = (inputs[:DEFAULT_CALIBRATION_SAMPLES] if calibration_data is None
                   else calibration_tensor(calibration_data))
    qmodel = quantized(model, calibration, cache=cache, device=device, bits=bits,
                       options=quantize_options, fingerprint=fingerprint)
    return Prepared(qmodel, inputs, labels, {"model": fingerprint,
                                             "data": tensor_fingerprint(*_tensors(inputs), labels)})


TRAINING_MODE_NOTE = ("the model was given in training mode; it is gated as it runs in eval mode (a private copy: "
                      "BatchNorm on its running statistics, dropout off), and its float accuracy too")


def model_notes(model: Any) -> list[str]:
    """What a report should say about the model as given, which its (cached) quantized view cannot know."""
    return [TRAINING_MODE_NOTE] if isinstance(model, nn.Module) and model.training else []


def _tensors(batch: Batch) -> tuple[torch.Tensor, ...]:
    return batch.tensors if isinstance(batch, Inputs) else (batch,)


@dataclass(frozen=True)
class Execution:
    """How this process takes part in a campaign: its xdist shard and CI slice, and the shared run directory."""

    shard: int = 1
    shards: int = 1
    ci_slice: Slice = Slice()
    run_root: Path | None = None
    selected: tuple[int, ...] = ()  # the campaign's shards this session runs (-k, --lf); () for all of them

    def running(self) -> tuple[int, ...]:
        return self.selected or tuple(range(1, self.shards + 1))


@dataclass
class Assessment:
    result: CampaignResult
    final: bool  # True when this process carries the campaign's verdict; False for a shard's share
    problem: str | None = None  # why the campaign cannot be judged (its shards saw different models or data)


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
    `cache_bytes` bounds the late-start cache (0: no late start). Under xdist every shard returns the campaign's
    decided result (so the test's own code sees the same numbers on every shard); one of them carries the verdict.
    """
    prepared = prepare(model, data, samples=spec.samples, bits=spec.bits, cache=cache, device=device,
                       calibration_data=calibration_data, quantize_options=quantize_options)
    campaign = Campaign(prepared.qmodel, prepared.inputs, prepared.labels, spec, name, identity=prepared.identity,
                        late_start=cache_bytes > 0, cache_bytes=cache_bytes, notes=model_notes(model))
    allowed = execution.ci_slice.trials(spec.budget)
    whole = execution.ci_slice.count == 1
    if execution.shards == 1 or execution.run_root is None or not execution.run_root.is_dir():
        if execution.shard != min(execution.running()):  # no shared run directory (a remote gateway): the
            # first shard the session runs runs everything
            return Assessment(campaign.empty_result(), final=False)
        result = campaign.run(allowed, on_trial=on_trial)
        return Assessment(result.trimmed() if whole else result, final=whole)
    part = take_part(RunDir(execution.run_root, campaign.campaign_id), campaign, allowed, execution.shard,
                     execution.running())
    result = part.result.trimmed() if whole and part.problem is None else part.result
    return Assessment(result, final=part.last and whole, problem=part.problem)


def advise(model: nn.Module | QuantizedModel, data: Any, result: CampaignResult, *, cache: ModelCache,
           device: torch.device, calibration_data: Any = None, quantize_options: dict[str, Any] | None = None,
           ) -> dict[str, Any]:
    """The advisor's suggestion (`advisor.advise`) for the gate that gave `result`, on the same (cached) quantized
    view and data: confirming campaigns run whole, in this process."""
    from .advisor import advise as suggest

    spec = result.spec
    prepared = prepare(model, data, samples=spec.samples, bits=spec.bits, cache=cache, device=device,
                       calibration_data=calibration_data, quantize_options=quantize_options)
    return suggest(prepared.qmodel, prepared.inputs, prepared.labels, result)


def vulnerability(model: nn.Module | QuantizedModel, data: Any, spec: CampaignSpec, name: str, *, trials: int,
                  cache: ModelCache, device: torch.device, calibration_data: Any = None,
                  quantize_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per-layer vulnerability by one campaign per layer (`advisor.stratified_vulnerability`)."""
    from .advisor import stratified_vulnerability

    prepared = prepare(model, data, samples=spec.samples, bits=spec.bits, cache=cache, device=device,
                       calibration_data=calibration_data, quantize_options=quantize_options)
    return stratified_vulnerability(prepared.qmodel, prepared.inputs, prepared.labels, spec, name, trials=trials)
