"""Turn what users pass as data (DataLoader, Dataset, (X, y) tensors) into fixed tensors.

A campaign must see the same images in the same order in every trial and every process, so the evaluation set is
materialised once as tensors. Large sets should be cut with `samples`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

# What a campaign reads of a stream that has no length (an IterableDataset, or a DataLoader over one) when no
# `samples=` bounds it, before it asks for one: such a stream may never end, and its images are held in memory.
UNBOUNDED_STREAM_BYTES = 4 << 30


class DataError(TypeError):
    pass


def _describe(data: Any) -> str:
    return f"{type(data).__module__}.{type(data).__qualname__}"


class Inputs:
    """A batch of several input tensors (e.g. ``input_ids`` and ``attention_mask``), passed to the model as the
    data gives them: positionally, or as keyword arguments when the data names them (dict batches). It indexes
    like a tensor, by image, so that campaigns slice it as they slice a tensor of inputs."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], names: tuple[str, ...] | None = None) -> None:
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise DataError(f"the model's inputs have different batch sizes: {[len(t) for t in tensors]}")
        self.tensors, self.names = tensors, names

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: Any) -> Inputs:
        return Inputs(tuple(t[index] for t in self.tensors), self.names)

    def to(self, device: torch.device | str) -> Inputs:
        return Inputs(tuple(t.to(device) for t in self.tensors), self.names)

    def call(self, module: Any) -> Any:
        if self.names is None:
            return module(*self.tensors)
        return module(**dict(zip(self.names, self.tensors)))

    def __repr__(self) -> str:
        named = self.names or tuple(str(i) for i in range(len(self.tensors)))
        return f"Inputs({', '.join(f'{n}: {tuple(t.shape)}' for n, t in zip(named, self.tensors))})"


Batch = torch.Tensor | Inputs  # what a model is called with: one input tensor, or several


def call_model(module: Any, x: Batch) -> Any:
    """`module` called on a batch of inputs: ``module(x)``, or with each of several input tensors."""
    return x.call(module) if isinstance(x, Inputs) else module(x)


def as_args(x: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments a batch is passed to the model as."""
    if not isinstance(x, Inputs):
        return (x,), {}
    if x.names is None:
        return x.tensors, {}
    return (), dict(zip(x.names, x.tensors))


def concat(parts: list[Any]) -> Any:
    """Batches joined along the image dimension."""
    if isinstance(parts[0], Inputs):
        return Inputs(tuple(torch.cat(ts) for ts in zip(*(p.tensors for p in parts))), parts[0].names)
    return torch.cat(parts)


def _stack(items: list[Any]) -> Any:
    if isinstance(items[0], Inputs):
        return Inputs(tuple(torch.stack(ts) for ts in zip(*(i.tensors for i in items))), items[0].names)
    return torch.stack(items)


Key = str | int


@dataclass(frozen=True)
class Keyed:
    """Data whose batches (or items) are dicts (as Hugging Face datasets give them) or tuples of more than an
    (input, label) pair: the model's input is `input_key`'s value (several keys: several inputs, passed in that
    order, by name for dict batches), the label `label_key`'s (None: unlabelled, for calibration).
    `hwfault.assess(..., input_key=..., label_key=...)` wraps its data so."""

    data: Any
    input_key: Key | tuple[Key, ...]
    label_key: Key | None = None

    def __post_init__(self) -> None:
        if self.input_key is None:
            raise DataError("input_key= is needed to read dict batches: the key of the model's input")
        keys = self.input_key if isinstance(self.input_key, tuple) else (self.input_key,)
        for name, key in [*(("input_key", k) for k in keys), ("label_key", self.label_key)]:
            if key is not None and (isinstance(key, bool) or not isinstance(key, (str, int))):
                raise DataError(f"{name}={key!r} must be a key (dict batches) or an index (tuple batches) of the "
                                "data's batches")

    def inputs(self) -> tuple[Key, ...]:
        return self.input_key if isinstance(self.input_key, tuple) else (self.input_key,)


def _pick(item: Any, key: Key, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(item[key])
    except (KeyError, IndexError, TypeError):
        shown = sorted(map(str, item)) if isinstance(item, Mapping) else f"indices 0..{len(item) - 1}"
        raise DataError(f"{name}={key!r} is not in the data's batches: {shown}") from None


def _keyed_item(item: Any, keys: Keyed) -> tuple[Batch, torch.Tensor | None]:
    chosen = [_pick(item, key, "input_key") for key in keys.inputs()]
    x: Batch = chosen[0]
    if isinstance(keys.input_key, tuple):
        named = all(isinstance(key, str) for key in keys.inputs())
        x = Inputs(tuple(chosen), tuple(map(str, keys.inputs())) if named else None)
    label = None if keys.label_key is None else _pick(item, keys.label_key, "label_key")
    return x, label


def _split_item(item: Any, keys: Keyed | None = None) -> tuple[Batch, torch.Tensor | None]:
    if keys is not None and isinstance(item, (Mapping, tuple, list)):
        return _keyed_item(item, keys)
    if isinstance(item, Mapping):
        raise DataError(f"the data's batches are dicts (keys {sorted(map(str, item))}): pass input_key= and "
                        "label_key= to hwfault.assess, e.g. input_key='input_ids', label_key='labels' (several "
                        "inputs: input_key=('input_ids', 'attention_mask'))")
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) == 2:
        x, y = item[0], item[1]
        return torch.as_tensor(x), torch.as_tensor(y)
    if isinstance(item, (tuple, list)) and len(item) > 2:
        raise DataError(f"the data's batches hold {len(item)} values, not an (input, label) pair: say which are "
                        f"the model's inputs and which the label, e.g. input_key=(0, 1), label_key={len(item) - 1}")
    raise DataError(f"expected a tensor or an (input, label) pair, got {_describe(item)}")


def iter_batches(data: Any, batch_size: int = 256, keys: Keyed | None = None
                 ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
    """Yield (inputs, labels-or-None) batches from any supported data form, in a fixed order."""
    if isinstance(data, Keyed):
        yield from iter_batches(data.data, batch_size, data)
    elif isinstance(data, Mapping):
        yield from _column_batches(data, batch_size, keys)
    elif isinstance(data, (torch.Tensor, Inputs)):
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size], None
    elif (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, Inputs))
          and isinstance(data[1], torch.Tensor)):
        x, y = data
        if len(x) != len(y):
            raise DataError(f"(X, y) have different lengths: {len(x)} inputs, {len(y)} labels")
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
    elif isinstance(data, (tuple, list)) and len(data) == 2 and _array_like(data[0]) and _array_like(data[1]):
        raise DataError(f"(X, y) must be tensors, got ({_describe(data[0])}, {_describe(data[1])}): pass "
                        "(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)), in the dtype the model "
                        "computes in")
    elif isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise DataError(
                "the DataLoader shuffles (shuffle=True); fault campaigns need a fixed image order: "
                "pass a DataLoader with shuffle=False, a Dataset, or (X, y) tensors"
            )
        for item in data:
            yield _split_item(item, keys)
    elif isinstance(data, IterableDataset):
        yield from _stream_batches(data, batch_size, keys)
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        n = len(data)
        for start in range(0, n, batch_size):
            items = [_split_item(data[i], keys) for i in range(start, min(n, start + batch_size))]
            xs = _stack([x for x, _ in items])
            ys = None if items[0][1] is None else torch.stack([torch.as_tensor(y) for _, y in items])
            if ys is not None and ys.dim() > 1 and isinstance(data, (tuple, list)):
                raise DataError(f"the data is a {type(data).__name__} whose items hold {ys.shape[1]} labels each "
                                f"(shape {list(ys.shape[1:])}), not one label per image: a list of (inputs, "
                                "labels) batches is read as a list of images; join the batches, "
                                "(torch.cat(xs), torch.cat(ys)), or pass a DataLoader")
            yield xs, ys
    else:
        raise DataError(
            f"unsupported data {_describe(data)}: pass a DataLoader, a Dataset, an (X, y) pair of tensors, "
            "or (for calibration) a tensor of inputs; dict batches with input_key= and label_key="
        )


def _stream_batches(data: IterableDataset[Any], batch_size: int, keys: Keyed | None
                    ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
    """Batches of an IterableDataset's items, in the order it yields them (as a DataLoader over it would batch
    them, without the worker processes)."""
    items: list[tuple[Batch, torch.Tensor | None]] = []
    for item in data:
        items.append(_split_item(item, keys))
        if len(items) == batch_size:
            yield _stacked(items)
            items = []
    if items:
        yield _stacked(items)


def _stacked(items: list[tuple[Batch, torch.Tensor | None]]) -> tuple[Batch, torch.Tensor | None]:
    if any((y is None) != (items[0][1] is None) for _, y in items):
        raise DataError("the data's items are labelled and unlabelled alike: give every item a label, or none")
    return _stack([x for x, _ in items]), (
        None if items[0][1] is None else torch.stack([torch.as_tensor(y) for _, y in items]))


def bounded(data: Any, batches: Iterator[tuple[Batch, torch.Tensor | None]], samples: int | None,
            what: str = "the evaluation data", advice: str = "Say how many to judge with samples= (the marker's "
            "argument), or give a Dataset or tensors of the images you mean"
            ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
    """`batches` of `data`, refused past UNBOUNDED_STREAM_BYTES when `data` has no length and `samples` is None:
    an endless stream would otherwise be read until memory runs out, a CI job hanging without a word."""
    if samples is not None or _sized(data):
        yield from batches
        return
    held, images = 0, 0
    for x, y in batches:
        images += len(x)
        held += sum(t.numel() * t.element_size() for t in (x.tensors if isinstance(x, Inputs) else (x,)))
        if held > UNBOUNDED_STREAM_BYTES:
            raise DataError(
                f"{what} ({_describe(data)}) has no length and gave {images} images ({held / 2**30:.1f} GiB) "
                f"without ending; a campaign holds its images in memory. {advice}")
        yield x, y


def _sized(data: Any) -> bool:
    if isinstance(data, Keyed):
        return _sized(data.data)
    try:
        len(data)
    except TypeError:
        return False
    return True


def _array_like(value: Any) -> bool:
    """A tensor, a numpy array or a list of numbers: half of what was meant as an (X, y) pair."""
    return isinstance(value, torch.Tensor) or type(value).__module__ == "numpy" or (
        isinstance(value, list) and bool(value) and all(isinstance(v, (int, float)) for v in value))


def _column_batches(data: Mapping[Any, Any], batch_size: int, keys: Keyed | None
                    ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
    """Batches of a mapping of whole columns (``{"input_ids": ..., "labels": ...}``, a tokenizer's output with
    the labels added), each column cut alike, read by `keys`."""
    if keys is None:
        raise DataError(f"the data is a mapping (keys {sorted(map(str, data))}): say which are the model's inputs "
                        "and which the label with input_key= and label_key= (e.g. input_key='input_ids', "
                        "label_key='labels'), or pass (X, y) tensors")
    columns = {key: _pick(data, key, name) for key, name in
               [*((k, "input_key") for k in keys.inputs()),
                *(((keys.label_key, "label_key"),) if keys.label_key is not None else ())]}
    lengths = {str(key): len(column) if column.dim() else 0 for key, column in columns.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"the data's columns have different lengths: {lengths}")
    count = next(iter(lengths.values()))
    for start in range(0, count, batch_size):
        yield _keyed_item({key: column[start : start + batch_size] for key, column in columns.items()}, keys)


def check_finite(inputs: Batch, what: str) -> None:
    """Refuse NaN or Inf inputs: faults cannot be told apart from garbage that was there before them."""
    if isinstance(inputs, Inputs):
        for tensor in inputs.tensors:
            check_finite(tensor, what)
        return
    if inputs.is_floating_point() or inputs.is_complex():
        bad = ~torch.isfinite(inputs.reshape(len(inputs), -1)).all(dim=1) if inputs.dim() else ~torch.isfinite(inputs)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0]) if inputs.dim() else 0
            raise DataError(f"{what} hold NaN or Inf values ({int(bad.sum())} of {len(inputs)} images, the first "
                            f"at index {first}): clean or drop them before gating")


def check_not_duplicated(data: Any, inputs: Batch, what: str = "the evaluation data") -> None:
    """Refuse what a DataLoader over an IterableDataset with num_workers > 1 read as each item once per worker (the
    dataset does not split its items between the workers): a gate on every image k times over, not on the data
    meant. Copies in other data stand: under transient faults each copy is a trial of its own, and a campaign
    bounds accuracy on the images as given."""
    loader = data.data if isinstance(data, Keyed) else data
    if not (isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset)
            and loader.num_workers > 1):
        return
    tensors = inputs.tensors if isinstance(inputs, Inputs) else (inputs,)
    count = len(tensors[0])
    parts = [t.reshape(count, -1).contiguous().view(torch.uint8) for t in tensors if t.numel()]
    if count < 2 or not parts:
        return
    distinct = len(torch.unique(torch.cat(parts, dim=1), dim=0))
    if 2 * distinct <= count:
        raise DataError(
            f"{what} ({_describe(loader.dataset)} read by a DataLoader with num_workers={loader.num_workers}) gave "
            f"{count} images of which only {distinct} differ: an IterableDataset is iterated whole in every worker "
            "unless it splits its items between them (torch.utils.data.get_worker_info()), so each image came "
            "once per worker. Split the items in the dataset's __iter__, or read it with num_workers=0")


def as_tensors(data: Any, samples: int | None = None) -> tuple[Batch, torch.Tensor]:
    """The first `samples` (all when None) labelled examples of `data`, as (X, y) tensors on the CPU."""
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples={samples!r} must be a positive integer or None")
    if (
        not isinstance(data, Keyed)
        and isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (torch.Tensor, Inputs))
        and isinstance(data[1], torch.Tensor)
        and len(data[0]) == len(data[1])
    ):
        x, y = data
        if len(x) == 0:
            raise DataError("the evaluation data is empty: (X, y) hold no images")
        _check_enough(len(x), samples)
        return (x, y) if samples is None else (x[:samples], y[:samples])
    xs: list[Batch] = []
    ys: list[torch.Tensor] = []
    count = 0
    for x, y in bounded(data, iter_batches(data), samples):
        if y is None:
            raise DataError("evaluation data needs labels: give (input, label) pairs")
        xs.append(x)
        ys.append(y)
        count += len(x)
        if samples is not None and count >= samples:
            break
    if not xs:
        raise DataError("the evaluation data is empty")
    check_stable(data, xs[0], ys[0])
    x_all, y_all = concat(xs), torch.cat(ys)
    _check_enough(len(x_all), samples)
    return (x_all, y_all) if samples is None else (x_all[:samples], y_all[:samples])


def check_stable(data: Any, inputs: Batch, labels: torch.Tensor | None, what: str = "the evaluation data") -> None:
    """Refuse data whose first batch (`inputs`, `labels`: as first read) reads differently a second time (a random
    augmentation in a Dataset's `__getitem__`, a loader's transform): a campaign run on one draw of such images is
    a gate on that draw, its numbers change from run to run, and xdist shards (each reading the data itself) would
    judge different images, or calibrate different models. Tensors given as such are not read again."""
    if isinstance(data, (torch.Tensor, Inputs)) or (isinstance(data, (tuple, list)) and len(data) == 2
                                                     and isinstance(data[0], (torch.Tensor, Inputs))):
        return
    first = next(iter_batches(data), None)
    if first is None:  # a stream read once (an IterableDataset that does not restart): this process's read stands
        return
    again, again_labels = first
    n = min(len(again), len(inputs))  # a Dataset read in batches of another size: its first images
    if not n or not _same(again[:n], inputs[:n]) or (again_labels is None) != (labels is None) or \
            (labels is not None and again_labels is not None and not _same(again_labels[:n], labels[:n])):
        raise DataError(
            f"{what} ({_describe(data)}) gives different images when read twice: its first batch "
            "changed between two reads, as a random transform (augmentation, noise, a random crop) or a stream "
            "that does not restart where it began makes it. A gate must judge fixed images: use the evaluation "
            "transforms (deterministic resize, crop and normalisation), or draw the images you mean to use once, "
            "with a seeded generator, and pass them as tensors ((X, y) for evaluation data)")


def _same(a: Batch, b: Batch) -> bool:
    """Bit-for-bit equal tensors (NaN at the same places counts as equal: `check_finite` reports NaN inputs)."""
    if isinstance(a, Inputs) or isinstance(b, Inputs):
        return (isinstance(a, Inputs) and isinstance(b, Inputs) and len(a.tensors) == len(b.tensors)
                and all(_same(s, t) for s, t in zip(a.tensors, b.tensors)))
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _check_enough(images: int, samples: int | None) -> None:
    """A campaign asked to judge `samples` images is not run on fewer: its verdict would be about another set."""
    if samples is not None and images < samples:
        raise DataError(f"samples={samples} but the evaluation data holds {images} labelled images: give more data, "
                        f"or ask for samples={images} or fewer")
