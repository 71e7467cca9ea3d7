"""Apply faults to integer codes during one forward pass.

Codes are never materialised for a whole tensor: a fake-quantized tensor holds code x scale exactly, so the code of
one element is recovered as round(value / scale) and only the faulty elements are read and rewritten. The cost of
injection therefore grows with the number of faults, not with the size of the tensors.
"""

from __future__ import annotations

import torch

from .bits import apply_bit_faults
from .faults import LayerFaults


def _ranks(linear: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For each fault, how many earlier faults (in pattern order) hit the same code; and the largest such rank."""
    if linear.numel() < 2:
        return torch.zeros_like(linear), 0
    order = torch.sort(linear, stable=True).indices
    sorted_lin = linear[order]
    starts = torch.ones_like(sorted_lin, dtype=torch.bool)
    starts[1:] = sorted_lin[1:] != sorted_lin[:-1]
    positions = torch.arange(linear.numel(), device=linear.device)
    group_start = torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), 0).values
    rank_sorted = positions - group_start
    ranks = torch.empty_like(rank_sorted)
    ranks[order] = rank_sorted
    return ranks, int(rank_sorted.max())


def corrupt_codes(
    flat: torch.Tensor,
    linear: torch.Tensor,
    bit: torch.Tensor,
    kind: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    on_grid: bool = True,
) -> None:
    """In place on `flat`: apply one fault per entry of `linear`, in order, to the code stored at that position.

    `scale` is the scale of each faulty element. With `on_grid` the value is rewritten as new_code x scale
    (activation, input and weight codes); otherwise the code's change is added to the value, which keeps the
    float rounding residue of a reconstructed accumulator.
    """
    ranks, top = _ranks(linear)
    for rank in range(top + 1):
        select = ranks == rank if top else slice(None)
        lin, s = linear[select], scale[select]
        values = flat[lin]
        codes = torch.round(values / s).to(torch.int64)
        new = apply_bit_faults(codes, bit[select], kind[select], bits)
        if on_grid:
            flat[lin] = (new.to(flat.dtype) * s).to(flat.dtype)
        else:
            flat[lin] = values + ((new - codes).to(flat.dtype) * s).to(flat.dtype)


def check_bounds(faults: LayerFaults, numel: int, what: str) -> None:
    if len(faults) and int(faults.index.max()) >= numel:
        bad = int(faults.index.max())
        raise IndexError(f"fault index {bad} is out of range for {what}: allowed 0..{numel - 1}")


def inject_transient(
    tensor: torch.Tensor,
    faults: LayerFaults,
    scale: torch.Tensor,
    bits: int,
    channel_of: torch.Tensor | None,
    on_grid: bool,
) -> torch.Tensor:
    """Faults of a batch on a per-image tensor. `scale` is a 1-element tensor (per-tensor) or per-channel, in
    which case `channel_of` maps each fault's per-image index to its channel."""
    out = tensor.contiguous()
    per_image = out[0].numel()
    flat = out.view(-1)
    linear = faults.image * per_image + faults.index
    per_fault_scale = scale.expand(linear.numel()) if channel_of is None else scale[channel_of]
    corrupt_codes(flat, linear, faults.bit, faults.kind, per_fault_scale, bits, on_grid)
    return out


def output_channel(index: torch.Tensor, shape: tuple[int, ...], channel_axis: int) -> torch.Tensor:
    """Channel of each per-image flat index, for an output of per-image `shape` with channels on `channel_axis`
    (0 for conv outputs (C, ...), -1 for linear outputs (..., F))."""
    if channel_axis == -1:
        return index % shape[-1]
    inner = 1
    for d in shape[1:]:
        inner *= d
    return index // inner
