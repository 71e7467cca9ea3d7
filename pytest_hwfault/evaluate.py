"""Accuracy of a quantized model, with or without faults, over fixed evaluation tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import Batch, as_tensors
from .faults import FaultModel, FaultPattern, Site, sample_pattern
from .qmodel import SiteUnreachableError
from .quantization import QuantizedModel

DEFAULT_BATCH_SIZE = 256
BASELINE_MARGIN = 0.1  # a max_drop gate needs fault-free accuracy above chance by this share of the headroom


class EvaluationError(ValueError):
    """The model's outputs or the labels cannot be judged as a classification: no verdict would mean anything."""


@dataclass
class Predictions:
    """Per-image outcome of one pass over the evaluation set."""

    predicted: torch.Tensor  # int64 [M]; -1 where the logits were not finite
    nonfinite: torch.Tensor  # bool [M]
    output_shape: tuple[int, ...] = ()  # the model's output per image, e.g. (classes,)

    def correct(self, labels: torch.Tensor) -> torch.Tensor:
        return (self.predicted == labels.to(self.predicted.device)) & ~self.nonfinite


def select_logits(output: Any, images: int | None = None) -> torch.Tensor:
    """The class logits in what a model returns: the tensor itself; else ``logits`` (a key, as in a dict, or an
    attribute, as in Hugging Face's ModelOutput); else the first element of a tuple or list (``(logits, aux)``).
    `images`: the batch they are for; logits whose first dimension is not that batch are refused (a ``.squeeze()``
    that drops it for one image would make every logit an image of its own)."""
    logits = _find_logits(output)
    if images is not None and (logits.dim() == 0 or logits.shape[0] != images):
        raise EvaluationError(
            f"the model returned logits of shape {list(logits.shape)} for a batch of {images} image(s): their first "
            "dimension must be the batch, for every batch size (a .squeeze() drops it for one image; use "
            ".flatten(1), or squeeze named dimensions)")
    return logits


def _find_logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        raise EvaluationError(f"the model returned a {type(output).__qualname__} with keys {sorted(map(str, output))}"
                              " and no 'logits': return the logits, or name them 'logits'")
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise EvaluationError(f"the model returned {type(output).__qualname__}; a gate needs class logits [N, classes]:"
                          " a tensor, a mapping or object with 'logits', or a tuple whose first element they are")


def decide(output: Any, images: int | None = None) -> Predictions:
    """Predicted class per row of a batch of logits (`select_logits` finds them in what the model returned, for a
    batch of `images`); a row with NaN/Inf counts as misclassified (predicted -1), never crashes."""
    logits = select_logits(output, images)
    shape = tuple(logits.shape[1:])
    logits = logits.reshape(len(logits), -1)
    nonfinite = ~torch.isfinite(logits).all(dim=1)
    predicted = torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0).argmax(dim=1)
    return Predictions(torch.where(nonfinite, torch.full_like(predicted, -1), predicted), nonfinite, shape)


def check_classification(golden: Predictions, labels: torch.Tensor) -> None:
    """Refuse what no accuracy can be computed on: outputs that are not [N, classes] logits, labels that are not
    class indices of those outputs."""
    if len(golden.output_shape) != 1 or golden.output_shape[0] < 2:
        shown = ", ".join(map(str, ("N", *golden.output_shape)))
        binary = "; a binary classifier's one logit z (class 1 where z > 0) as the two logits [-z, z] of a wrapper " \
                 "module, whose argmax is that decision: torch.cat([-z, z], dim=1) on [N, 1], " \
                 "torch.stack([-z, z], dim=1) on [N]"
        raise EvaluationError(f"the model's output has shape [{shown}]; a gate needs class logits of shape "
                              "[N, classes] (at least 2 classes): return logits from forward (flatten or pool "
                              "spatial maps, pick the logits out of a tuple or dict in a wrapper module)" + (
                                  binary if golden.output_shape in ((), (1,)) else ""))
    classes = golden.output_shape[0]
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise EvaluationError(f"the labels are {labels.dtype} of shape {list(labels.shape)}; a gate needs one "
                              "integer class index per image (not one-hot, not floats)")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        outside = int(((labels < 0) | (labels >= classes)).sum())
        raise EvaluationError(f"{outside} of {len(labels)} labels lie outside the model's {classes} output classes "
                              f"(labels range over [{low}, {high}], logits over [0, {classes - 1}]): the labels "
                              "do not belong to this model's outputs")


REPEAT_IMAGES = 2  # images in the two fault-free passes that show a forward is repeatable


def check_repeatable(qmodel: QuantizedModel, inputs: Batch, images: int = REPEAT_IMAGES) -> None:
    """Refuse a view whose fault-free output changes between two passes over the same images (dropout left on in
    eval mode, random ops, state a forward updates): a trial's critical faults are images whose prediction differs
    from the fault-free one, and faults could not be told from the model's own randomness. So is one whose passes
    agree but change a buffer or a module's plain attribute (`_check_buffers_kept`, `_check_attributes_kept`), with
    a faulty pass between them (`_faulty_pass`). Also one pass over one image: trials
    run the faulty images alone, so a batch of one must keep its batch dimension."""
    x = inputs[:images]
    first = select_logits(qmodel._forward(x, None, 0), len(x)).detach()
    state = _plain_attributes(qmodel.module)  # after one pass: a lazy first-call set-up is no change
    buffers = _buffer_values(qmodel.module)
    _faulty_pass(qmodel, x)
    second = select_logits(qmodel._forward(x, None, 0), len(x)).detach()
    state_after, buffers_after = _plain_attributes(qmodel.module), _buffer_values(qmodel.module)
    alone = select_logits(qmodel._forward(x[:1], None, 0), 1).detach()
    if first.shape == second.shape and torch.equal(torch.nan_to_num(first), torch.nan_to_num(second)) and \
            torch.equal(first.isnan(), second.isnan()):
        _check_buffers_kept(buffers, buffers_after)
        _check_attributes_kept(state, state_after)
        _check_images_independent(first, alone)
        return
    _check_buffers_kept(buffers, buffers_after)  # the cause where it shows
    differs = "shape" if first.shape != second.shape else \
        f"largest difference {float((torch.nan_to_num(first) - torch.nan_to_num(second)).abs().max()):.4g}"
    raise EvaluationError(
        f"the quantized model's fault-free output differs between two passes over the same {len(x)} images "
        f"({differs}): its forward is not repeatable (dropout active in eval mode, e.g. F.dropout(x, training=True); "
        "random ops; state updated in forward), so the faults' effect cannot be told from its own randomness. "
        "Make the forward deterministic in eval mode (F.dropout(x, training=self.training))")

def _plain_attributes(model: nn.Module) -> dict[tuple[str, str], Any]:
    """Every module's attributes that are plain values (numbers, strings, None), by (module, attribute)."""
    return {(name, attribute): value for name, module in model.named_modules()
            for attribute, value in vars(module).items() if isinstance(value, (bool, int, float, str, type(None)))}


def _check_attributes_kept(before: dict[tuple[str, str], Any], after: dict[tuple[str, str], Any]) -> None:
    """Refuse a forward that changes a module's plain attribute at every call (a call counter, a step the forward
    advances): its output may depend on how often it ran, which two equal passes cannot show, and a campaign runs
    the forward many times."""
    changed = [(key, before.get(key), after.get(key)) for key in sorted(before.keys() | after.keys(), key=str)
               if before.get(key, _MISSING) != after.get(key, _MISSING)
               and not (isinstance(before.get(key), float) and math.isnan(before[key])
                        and isinstance(after.get(key), float) and math.isnan(after[key]))]
    if changed:
        shown = ", ".join(f"{name or '(the model)'}.{attribute}: {old!r} -> {new!r}"
                          for (name, attribute), old, new in changed[:3])
        raise EvaluationError(
            f"the model's forward changes {len(changed)} attribute(s) at every call ({shown}): its output may depend "
            "on how often it ran (a call counter, a schedule the forward advances), which a campaign's many passes "
            "would confound with the faults. Keep such state out of the eval-mode forward")


_MISSING = object()


def _same_value(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and elements, NaN equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    return torch.equal(a, b)


FAULTY_PASS_BER = 0.25  # act faults in the pass between the two fault-free ones: codes all over their grid


def _faulty_pass(qmodel: QuantizedModel, x: Batch) -> None:
    """One pass over `x` with act faults (a fixed draw at `FAULTY_PASS_BER`): whatever a trial leaves behind (a
    range, a scale or a statistic the forward keeps) then shows in the fault-free pass after it."""
    try:
        targets = qmodel.targets(Site.ACT)
    except (ValueError, SiteUnreachableError):
        return
    pattern = sample_pattern(FaultModel(Site.ACT, FAULTY_PASS_BER), targets, len(x), torch.Generator().manual_seed(0))
    if pattern:
        qmodel._forward(x, pattern, 0)


def _buffer_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every buffer's value, by name."""
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers(remove_duplicate=False)}


def _check_buffers_kept(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """Refuse a forward that changes a buffer (torch.ao's observers and FakeQuantize modules in a prepared or
    QAT-prepared model keep updating their ranges and scales in eval mode): every trial would start from the
    state the previous trials left, faulty values included, so the numbers would depend on the trials' order and
    on how they are split between workers. Two passes over the same images do not show it where they agree (a
    running maximum stays put): `check_repeatable` runs a faulty pass between them."""
    changed = [name for name in sorted(before.keys() | after.keys())
               if name not in before or name not in after or not _same_value(before[name], after[name])]
    if not changed:
        return
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    observed = any(part in name for name in changed for part in ("activation_post_process", "fake_quant"))
    raise EvaluationError(
        f"the model's forward writes {len(changed)} buffer(s) at every call ({shown}): every trial would start from "
        "the state the previous trials (and their faults) left, so the numbers would depend on the trials' order "
        "and split. Keep such state out of the eval-mode forward" + (
            "; a model prepared by torch.ao (prepare, prepare_qat) updates its observers at every call: gate the "
            "converted int8 model (torch.ao.quantization.convert), the float model before prepare, or freeze the "
            "fake-quantizers: model.apply(torch.ao.quantization.disable_observer)" if observed else ""))

# How far one image's logits computed alone may lie from the same image's in a batch, as a share of the batch's
# largest logit: float ops between layers may round differently for another batch size, and a downstream layer may
# then pick a neighbouring code (a step is 1/127 of its range at 8 bits); an image that reads the others moves more.
INDEPENDENCE_TOLERANCE = 0.05


def _check_images_independent(batched: torch.Tensor, alone: torch.Tensor) -> None:
    """Refuse a model whose output for one image depends on the other images of its batch: a trial runs only the
    images that hold faults, in batches of any size, so each image's prediction must be its own."""
    if len(batched) < 2 or alone.shape[1:] != batched.shape[1:]:
        return
    difference = float((torch.nan_to_num(alone[0]) - torch.nan_to_num(batched[0])).abs().max())
    scale = float(torch.nan_to_num(batched).abs().max())
    if difference <= INDEPENDENCE_TOLERANCE * scale or torch.equal(alone[0].isnan(), batched[0].isnan()) and \
            difference == 0.0:
        return
    raise EvaluationError(
        f"the quantized model's output for one image depends on the other images in its batch: image 0 alone and "
        f"with {len(batched) - 1} other(s) gives logits {difference:.4g} apart (largest logit {scale:.4g}). A trial "
        "re-runs only the images that hold faults, so each image's prediction must depend on that image alone. "
        "Look for a layer that mixes the batch: nn.MultiheadAttention without batch_first=True on [N, T, D] "
        "inputs, a reduction over dim 0, BatchNorm in training mode")


def chance_accuracy(labels: torch.Tensor) -> float:
    """Accuracy of always predicting the most frequent label: what a model that learned nothing reaches."""
    return float(torch.bincount(labels.reshape(-1).to(torch.int64)).max()) / len(labels)


def baseline_floor(labels: torch.Tensor) -> float:
    """The fault-free accuracy a max_drop gate needs: chance plus BASELINE_MARGIN of the headroom above it."""
    chance = chance_accuracy(labels)
    return chance + BASELINE_MARGIN * (1.0 - chance)


def predict(
    qmodel: QuantizedModel,
    inputs: Batch,
    faults: FaultPattern | None = None,
    *,
    quantized: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    check: bool = True,
) -> Predictions:
    """Predictions for every image; weight faults are applied once for the whole pass and then restored.
    `check=False`: the caller validated `faults` against the model and these images."""
    if faults is not None and check:
        qmodel.validate(faults, len(inputs))
    predicted, nonfinite = [], []
    shapes: set[tuple[int, ...]] = set()

    def run() -> None:
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size]
            logits = qmodel._forward(x, faults, start) if quantized else qmodel.float_forward(x)
            part = decide(logits, len(x))
            predicted.append(part.predicted.cpu())
            nonfinite.append(part.nonfinite.cpu())
            shapes.add(part.output_shape)

    if faults is not None and faults.has_weight_faults():
        with qmodel.weight_faults(faults):
            run()
    else:
        run()
    return Predictions(torch.cat(predicted), torch.cat(nonfinite), shapes.pop() if len(shapes) == 1 else ())


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
        targets = qmodel.targets(faults.site, faults.layers)
        if not targets:  # a fault-free trial would pass for one under faults
            raise SiteUnreachableError(qmodel.nothing_to_fault(faults.site, faults.layers))
        generator = torch.Generator().manual_seed(seed)
        faults = sample_pattern(faults, targets, len(x), generator)
    outcome = predict(qmodel, x, faults, batch_size=batch_size)
    return float(outcome.correct(y).float().mean())

