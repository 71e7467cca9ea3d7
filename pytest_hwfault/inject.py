"""Apply faults to integer codes during one forward pass.

Codes are never materialised for a whole tensor: a fake-quantized tensor holds code x scale exactly, so the code of
one element is recovered as round(value / scale) and only the faulty elements are read and rewritten. The cost of
injection therefore grows with the number of faults, not with the size of the tensors.

Several faults on one code compose: a sequence of bit flips and stuck-at bits is one map
``raw -> ((raw & keep) | set) ^ flip`` on the code's raw bits. `compose` folds a fault list into one such `Edit`
per code ahead of the forward pass, so the hook itself runs a handful of vectorised ops per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .bits import KIND_CODES, Kind
from .faults import LayerFaults
from .layout import contiguous_strides, is_dense, relayout

_FLIP, _STUCK0, _STUCK1 = KIND_CODES[Kind.FLIP], KIND_CODES[Kind.STUCK0], KIND_CODES[Kind.STUCK1]


@dataclass
class Edit:
    """Per faulty code (flat position `linear`, unique): raw -> ((raw & keep) | set) ^ flip, then x `scale`.

    `strides`: the memory layout the positions are in. None: plain flat indices (a contiguous tensor's
    `view(-1)`). Otherwise the positions are memory offsets in a dense tensor with these strides, so that a
    channels-last tensor is edited where it lies, without a layout copy; `apply_edit_to` checks the layout."""

    linear: torch.Tensor
    keep: torch.Tensor
    set: torch.Tensor
    flip: torch.Tensor
    scale: torch.Tensor
    strides: tuple[int, ...] | None = None

    def to(self, device: torch.device) -> Edit:
        return Edit(self.linear.to(device), self.keep.to(device), self.set.to(device), self.flip.to(device),
                    self.scale.to(device), strides=self.strides)


def _ranks(linear: torch.Tensor) -> torch.Tensor:
    """For each fault, how many earlier faults (in pattern order) hit the same code."""
    order = torch.sort(linear, stable=True).indices
    sorted_lin = linear[order]
    starts = torch.ones_like(sorted_lin, dtype=torch.bool)
    starts[1:] = sorted_lin[1:] != sorted_lin[:-1]
    positions = torch.arange(linear.numel(), device=linear.device)
    group_start = torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), 0).values
    ranks = torch.empty_like(positions)
    ranks[order] = positions - group_start
    return ranks


def compose(linear: torch.Tensor, bit: torch.Tensor, kind: torch.Tensor, scale: torch.Tensor) -> Edit:
    """Fold faults (applied in list order) into one edit per distinct code. `scale` is per fault."""
    unique, inverse = torch.unique(linear, return_inverse=True)
    mask = torch.ones_like(bit) << bit
    if unique.numel() == linear.numel():  # one fault per code: no composition needed
        order = torch.empty_like(inverse)
        order[inverse] = torch.arange(inverse.numel(), device=inverse.device)
        mask, kind, scale = mask[order], kind[order], scale[order]
        zero = torch.zeros_like(mask)
        return Edit(unique, torch.where(kind == _FLIP, ~zero, ~mask), torch.where(kind == _STUCK1, mask, zero),
                    torch.where(kind == _FLIP, mask, zero), scale)
    keep = torch.full_like(unique, -1)
    set_, flip = torch.zeros_like(unique), torch.zeros_like(unique)
    code_scale = torch.empty(unique.numel(), dtype=scale.dtype, device=scale.device)
    code_scale[inverse] = scale
    ranks = _ranks(linear)
    for rank in range(int(ranks.max()) + 1):
        select = ranks == rank
        u, m, k = inverse[select], mask[select], kind[select]
        is_flip = k == _FLIP
        flip[u] = torch.where(is_flip, flip[u] ^ m, flip[u] & ~m)
        keep[u] = torch.where(is_flip, keep[u], keep[u] & ~m)
        set_[u] = torch.where(is_flip, set_[u], torch.where(k == _STUCK1, set_[u] | m, set_[u] & ~m))
    return Edit(unique, keep, set_, flip, code_scale)


def apply_edit(flat: torch.Tensor, edit: Edit, bits: int, zero_point: int = 0, signed: bool = True) -> None:
    """In place on `flat`, whose values are code x scale (scale 1 for tensors that hold the codes themselves):
    rewrite the edited codes. The stored code is code + zero_point: two's complement when `signed`, else an
    unsigned (affine, torch.ao quint8) code. Runs in every faulty layer of every forward, so it is a handful of
    in-place ops on the faulty codes only."""
    codes = torch.round(flat[edit.linear] / edit.scale).to(torch.int64)
    if zero_point:
        codes += zero_point
    # raw bits -> ((raw & keep) | set) ^ flip, on the low `bits` bits (two's complement of a negative code)
    raw = codes.bitwise_and_((1 << bits) - 1).bitwise_and_(edit.keep).bitwise_or_(edit.set).bitwise_xor_(edit.flip)
    if signed:  # sign-extend: subtract 2^bits where the top bit is set
        raw -= raw.bitwise_right_shift(bits - 1).bitwise_left_shift_(bits)
    if zero_point:
        raw -= zero_point
    flat[edit.linear] = raw.to(flat.dtype).mul_(edit.scale)


def apply_edit_to(tensor: torch.Tensor, edit: Edit, bits: int, zero_point: int = 0, signed: bool = True
                  ) -> torch.Tensor:
    """`apply_edit` on a whole tensor in whatever memory layout it has, in place; returns the edited tensor (a
    contiguous copy only for a tensor that is not dense). The positions are mapped to the tensor's layout when
    it is not the one the edit was prepared for (a few vectorised ops on the faulty codes)."""
    shape, strides = tuple(tensor.shape), tensor.stride()
    placed_for = edit.strides if edit.strides is not None else contiguous_strides(shape)
    if not is_dense(shape, strides):
        tensor = tensor.contiguous()
        strides = tensor.stride()
    if strides != placed_for:
        edit = replace(edit, linear=relayout(edit.linear, shape, placed_for, strides))
    apply_edit(tensor.as_strided((tensor.numel(),), (1,)), edit, bits, zero_point, signed)
    return tensor


def check_bounds(faults: LayerFaults, numel: int, what: str) -> None:
    if len(faults) and int(faults.index.max()) >= numel:
        bad = int(faults.index.max())
        raise IndexError(f"fault index {bad} is out of range for {what}: allowed 0..{numel - 1}")
