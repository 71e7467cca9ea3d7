"""Where a row-major position lies in memory.

Fault positions always count elements in logical, row-major (NCHW) order, whatever the memory layout a tensor has
(the engine computes image layers channels-last on the CPU). This module maps such positions to memory offsets in a
tensor's layout: for one tensor (`relayout`), or for the tensors of many (site, layer) groups at once (`in_layouts`,
the step `QuantizedModel.prepare` runs for every trial), and says which layouts allow that (`is_dense`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import nn

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by the rank of a batch of images
# Per layer type: the channels-last layout of a batch of its images.
IMAGE_LAYOUTS: dict[type[nn.Module], torch.memory_format] = {nn.Conv2d: CHANNELS_LAST[4], nn.Conv3d: CHANNELS_LAST[5]}


def in_layouts(positions: torch.Tensor, group: torch.Tensor, shapes: list[tuple[int, ...]],
               layouts: list[tuple[int, ...]]) -> torch.Tensor:
    """Row-major positions of each group's tensor (of `shapes`) as memory offsets in its layout (`layouts`),
    vectorised over all groups; unchanged where every layout is contiguous."""
    plan = layout_plan(tuple(shapes), tuple(layouts), positions.device)
    if plan is None:
        return positions
    if isinstance(plan, tuple):  # every layout row-major or channels-last: (image, channel, spatial) arithmetic
        per_image, channels = (t[group] for t in plan)
        image = torch.div(positions, per_image, rounding_mode="floor")
        index = positions - image * per_image
        spatial = torch.div(per_image, channels, rounding_mode="floor")
        channel = torch.div(index, spatial, rounding_mode="floor")
        return image.mul_(per_image).add_(index.sub_(channel * spatial).mul_(channels)).add_(channel)
    return relayout(positions, *plan.index_select(2, group))  # any dense layouts: per fault, [rank] each


def place(positions: torch.Tensor, shape: tuple[int, ...], layout: tuple[int, ...]) -> torch.Tensor:
    """Row-major positions in one dense tensor of `shape` as memory offsets in its layout. Channels-last by scalar
    arithmetic, in place on `positions` (shifts and masks where the sizes are powers of two): an offset moves by
    s x (C - 1) - c x (S - 1) for channel c and spatial position s of S."""
    if layout == contiguous_strides(shape):
        return positions
    if layout != channels_last_strides(shape):
        return relayout(positions, shape, contiguous_strides(shape), layout)
    channels, spatial = shape[1], math.prod(shape[2:])
    if spatial & (spatial - 1) == 0 and channels & (channels - 1) == 0:
        where = positions & (spatial - 1)
        channel = (positions >> (spatial.bit_length() - 1)).bitwise_and_(channels - 1)
    else:
        where = positions.remainder(spatial)
        channel = torch.div(positions, spatial, rounding_mode="floor").remainder_(channels)
    return positions.add_(where, alpha=channels - 1).sub_(channel, alpha=spatial - 1)


@lru_cache(maxsize=64)
def layout_plan(shapes: tuple[tuple[int, ...], ...], layouts: tuple[tuple[int, ...], ...], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None:
    """How to map row-major positions to the groups' layouts. None: all row-major. Per group (elements per image,
    channels) when each layout is row-major (channels 1) or channels-last, the common case and ~5x cheaper at
    high fault counts. Else [3, rank, groups]: sizes, row-major strides and layout strides, padded to one rank.
    Cached: a campaign asks for the same few plans at every trial."""
    contiguous = [contiguous_strides(shape) for shape in shapes]
    if list(layouts) == contiguous:
        return None
    if all(lay in (row, channels_last_strides(shape)) for shape, lay, row in zip(shapes, layouts, contiguous)):
        per_image = [math.prod(shape[1:]) for shape in shapes]
        channels = [1 if lay == row else shape[1] for shape, lay, row in zip(shapes, layouts, contiguous)]
        return torch.tensor(per_image, device=device), torch.tensor(channels, device=device)
    rank = max(map(len, shapes))

    def table(rows: list[tuple[int, ...]] | tuple[tuple[int, ...], ...], pad: int) -> list[list[int]]:
        return [[*row, *([pad] * (rank - len(row)))] for row in rows]

    rows = [table(shapes, 1), table(contiguous, 1), table(layouts, 0)]
    return torch.tensor(rows, device=device).transpose(1, 2).contiguous()


def channels_last_strides(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The strides of a channels-last batch of images of `shape` (rank 4 or 5); None for other ranks."""
    if len(shape) not in (4, 5):
        return None
    channels, spatial = shape[1], shape[2:]
    strides = [channels * math.prod(spatial), 1] + [channels * math.prod(spatial[i + 1:]) for i in range(len(spatial))]
    return tuple(strides)


def relayout(positions: torch.Tensor, shape: Sequence[Any], source: Sequence[Any], target: Sequence[Any]
             ) -> torch.Tensor:
    """Memory offsets of elements in a dense tensor of `shape` with strides `source`, as offsets in one with
    strides `target`. Sizes and strides are ints, or tensors holding one per position (positions of several
    tensors at once)."""
    out = torch.zeros_like(positions)
    for size, src, dst in zip(shape, source, target):
        if not isinstance(size, int) or size != 1:
            out += torch.div(positions, src, rounding_mode="floor").remainder_(size).mul_(dst)
    return out


@lru_cache(maxsize=4096)
def is_dense(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a tensor of this shape and strides covers its memory span exactly once, in some dimension order
    (contiguous, channels-last, ...): then memory offsets and elements correspond one to one."""
    dims = sorted((stride, size) for size, stride in zip(shape, strides) if size != 1)
    step = 1
    for stride, size in dims:
        if stride != step:
            return False
        step *= size
    return True


@lru_cache(maxsize=4096)
def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))
