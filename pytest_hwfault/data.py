"""Turn what users pass as data (DataLoader, Dataset, (X, y) tensors) into fixed tensors.

A campaign must see the same images in the same order in every trial and every process, so the evaluation set is
materialised once as tensors. Large sets should be cut with `samples`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


class DataError(TypeError):
    pass


def _describe(data: Any) -> str:
    return f"{type(data).__module__}.{type(data).__qualname__}"


@dataclass(frozen=True)
class Keyed:
    """Data whose batches (or items) are dicts, as Hugging Face datasets give them: the input is `input_key`'s
    value, the label `label_key`'s (None: unlabelled, for calibration). `hwfault.assess(..., input_key=...,
    label_key=...)` wraps its data so."""

    data: Any
    input_key: str
    label_key: str | None = None

    def __post_init__(self) -> None:
        for name, key in (("input_key", self.input_key), ("label_key", self.label_key)):
            if key is not None and not isinstance(key, str):
                raise DataError(f"{name}={key!r} must be the name of a key of the data's dict batches")
        if self.input_key is None:
            raise DataError("input_key= is needed to read dict batches: the key of the model's input")


def _from_dict(item: Mapping[str, Any], keys: Keyed | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if keys is None:
        raise DataError(f"the data's batches are dicts (keys {sorted(map(str, item))}): pass input_key= and "
                        "label_key= to hwfault.assess, e.g. input_key='input_ids', label_key='labels'")
    for name, key in (("input_key", keys.input_key), ("label_key", keys.label_key)):
        if key is not None and key not in item:
            raise DataError(f"{name}={key!r} is not a key of the data's dict batches: {sorted(map(str, item))}")
    label = None if keys.label_key is None else torch.as_tensor(item[keys.label_key])
    return torch.as_tensor(item[keys.input_key]), label


def _split_item(item: Any, keys: Keyed | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(item, Mapping):
        return _from_dict(item, keys)
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        x, y = item[0], item[1]
        return torch.as_tensor(x), torch.as_tensor(y)
    raise DataError(f"expected a tensor or an (input, label) pair, got {_describe(item)}")


def iter_batches(data: Any, batch_size: int = 256, keys: Keyed | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (inputs, labels-or-None) batches from any supported data form, in a fixed order."""
    if isinstance(data, Keyed):
        yield from iter_batches(data.data, batch_size, data)
    elif isinstance(data, torch.Tensor):
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size], None
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise DataError(f"(X, y) have different lengths: {len(x)} inputs, {len(y)} labels")
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
    elif isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise DataError(
                "the DataLoader shuffles (shuffle=True); fault campaigns need a fixed image order: "
                "pass a DataLoader with shuffle=False, a Dataset, or (X, y) tensors"
            )
        for item in data:
            yield _split_item(item, keys)
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        n = len(data)
        for start in range(0, n, batch_size):
            items = [_split_item(data[i], keys) for i in range(start, min(n, start + batch_size))]
            xs = torch.stack([x for x, _ in items])
            ys = None if items[0][1] is None else torch.stack([torch.as_tensor(y) for _, y in items])
            yield xs, ys
    else:
        raise DataError(
            f"unsupported data {_describe(data)}: pass a DataLoader, a Dataset, an (X, y) pair of tensors, "
            "or (for calibration) a tensor of inputs; dict batches with input_key= and label_key="
        )


def check_finite(inputs: torch.Tensor, what: str) -> None:
    """Refuse NaN or Inf inputs: faults cannot be told apart from garbage that was there before them."""
    if inputs.is_floating_point() or inputs.is_complex():
        bad = ~torch.isfinite(inputs.reshape(len(inputs), -1)).all(dim=1) if inputs.dim() else ~torch.isfinite(inputs)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0]) if inputs.dim() else 0
            raise DataError(f"{what} hold NaN or Inf values ({int(bad.sum())} of {len(inputs)} images, the first "
                            f"at index {first}): clean or drop them before gating")


def as_tensors(data: Any, samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `samples` (all when None) labelled examples of `data`, as (X, y) tensors on the CPU."""
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples={samples!r} must be a positive integer or None")
    if (
        not isinstance(data, Keyed)
        and isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and len(data[0]) == len(data[1])
    ):
        x, y = data
        return (x, y) if samples is None else (x[:samples], y[:samples])
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    count = 0
    for x, y in iter_batches(data):
        if y is None:
            raise DataError("evaluation data needs labels: give (input, label) pairs")
        xs.append(x)
        ys.append(y)
        count += len(x)
        if samples is not None and count >= samples:
            break
    if not xs:
        raise DataError("the evaluation data is empty")
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    return (x_all, y_all) if samples is None else (x_all[:samples], y_all[:samples])
