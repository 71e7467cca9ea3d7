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

from . import native
from .bits import KIND_CODES, Kind
from .faults import LayerFaults
from .layout import contiguous_strides, is_dense, place, relayout

_FLIP, _STUCK0, _STUCK1 = KIND_CODES[Kind.FLIP], KIND_CODES[Kind.STUCK0], KIND_CODES[Kind.STUCK1]


@dataclass
class Edit:
    """Per faulty code (flat position `linear`, unique): raw -> ((raw & keep) | set) ^ flip, then x `scale`.

    `strides`: the memory layout the positions are in. None: plain flat indices (a contiguous tensor's
    `view(-1)`). Otherwise the positions are memory offsets in a dense tensor with these strides, so that a
    channels-last tensor is edited where it lies, without a layout copy; `apply_edit_to` checks the layout."""

    linear: torch.Tensor
    keep: torch.Tensor | None  # None: keep every bit
    set: torch.Tensor | None  # None: set none
    flip: torch.Tensor | None  # None: flip none
    # per code, or one for all (0-dim, or a float: 1.0 for a tensor that holds the codes themselves, as every edit
    # `QuantizedModel.prepare` makes does)
    scale: torch.Tensor | float
    strides: tuple[int, ...] | None = None

    def to(self, device: torch.device) -> Edit:
        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        scale = self.scale if isinstance(self.scale, float) else self.scale.to(device)
        return Edit(self.linear.to(device), moved(self.keep), moved(self.set), moved(self.flip), scale,
                    strides=self.strides)


def _sorted_ranks(sorted_lin: torch.Tensor) -> torch.Tensor:
    """For each fault of a sorted list, how many earlier faults hit the same code."""
    starts = torch.ones_like(sorted_lin, dtype=torch.bool)
    starts[1:] = sorted_lin[1:] != sorted_lin[:-1]
    positions = torch.arange(sorted_lin.numel(), device=sorted_lin.device)
    group_start = torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), 0).values
    return positions - group_start


def _ranks(linear: torch.Tensor, is_sorted: bool) -> torch.Tensor:
    """For each fault, how many earlier faults (in pattern order) hit the same code."""
    if is_sorted:
        return _sorted_ranks(linear)
    order = torch.sort(linear, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = _sorted_ranks(linear[order])
    return ranks


def compose(linear: torch.Tensor, bit: torch.Tensor, kind: torch.Tensor, scale: torch.Tensor | float) -> Edit:
    """Fold faults (applied in list order) into one edit per distinct code. `scale` is per fault, or a float for
    all.

    Sampled patterns arrive sorted by code (faults.sample_pattern), and then the codes are grouped by runs, with
    no sort: at a high BER this is most of the cost of preparing a trial. Each code's first fault sets its edit
    (gathers only); the rare later faults on a code are folded in rank by rank."""
    is_sorted = linear.numel() < 2 or bool((linear[1:] >= linear[:-1]).all())
    if is_sorted:
        unique, inverse = torch.unique_consecutive(linear, return_inverse=True)
    else:
        unique, inverse = torch.unique(linear, return_inverse=True)
    mask = torch.ones_like(bit) << bit
    several = unique.numel() < linear.numel()
    if not several:  # one fault per code
        if is_sorted:
            first = torch.arange(linear.numel(), device=linear.device)
        else:
            first = torch.empty_like(inverse)
            first[inverse] = torch.arange(inverse.numel(), device=inverse.device)
    else:
        ranks = _ranks(linear, is_sorted)
        leading = (ranks == 0).nonzero().reshape(-1)
        if is_sorted:
            first = leading
        else:
            first = torch.empty(unique.numel(), dtype=torch.int64, device=linear.device)
            first[inverse[leading]] = leading
    m, k = mask[first], kind[first]
    zero = torch.zeros_like(m)
    is_flip = k == _FLIP
    keep, set_, flip = torch.where(is_flip, ~zero, ~m), torch.where(k == _STUCK1, m, zero), \
        torch.where(is_flip, m, zero)
    if several:
        for rank in range(1, int(ranks.max()) + 1):
            select = (ranks == rank).nonzero().reshape(-1)
            u, m, k = inverse[select], mask[select], kind[select]
            is_flip = k == _FLIP
            flip[u] = torch.where(is_flip, flip[u] ^ m, flip[u] & ~m)
            keep[u] = torch.where(is_flip, keep[u], keep[u] & ~m)
            set_[u] = torch.where(is_flip, set_[u], torch.where(k == _STUCK1, set_[u] | m, set_[u] & ~m))
    scale = scale if isinstance(scale, float) else scale[first]
    if bool((kind == _FLIP).all()):  # flips only (the usual fault model): keep every bit, set none
        return Edit(unique, None, None, flip, scale)
    return Edit(unique, keep, set_, flip, scale)


def compose_canonical(linear: torch.Tensor, bit: torch.Tensor, kind: int, scale: torch.Tensor | float,
                      dtype: torch.dtype = torch.int64) -> Edit:
    """`compose` for faults sorted by code, with no (code, bit) twice and one kind (a sampled pattern: see
    `LayerFaults.canonical`): the faulty bits of a code are distinct, so their mask is the sum of the faults' bits,
    found with no sort and no fold. `scale` is one for all (0-dim, or a float). Edits of flips carry no keep and
    set masks, so the hooks skip those passes. `dtype`: the masks' (`code_dtype` of the codes' width, so that the
    hook's bit operations do not mix dtypes)."""
    mask = torch.bitwise_left_shift(1, bit.to(dtype))
    unique, inverse = torch.unique_consecutive(linear, return_inverse=True)
    if unique.numel() < linear.numel():  # a few codes hold several faults
        mask = torch.zeros_like(unique, dtype=dtype).index_add_(0, inverse, mask)
    if kind == _FLIP:
        return Edit(unique, None, None, mask, scale)
    return Edit(unique, ~mask, mask if kind == _STUCK1 else None, None, scale)


def compose_placed(linear: torch.Tensor, bit: torch.Tensor, kind: int, shape: tuple[int, ...],
                   strides: tuple[int, ...], dtype: torch.dtype) -> Edit:
    """`compose_canonical` of one tensor's sampled faults, their positions placed in its memory layout (`strides`,
    `layout.place`): in one native pass where it applies (a high BER's thousands of faults per tensor, otherwise
    ~8 small torch ops each), the same edit either way."""
    if kind == _FLIP:
        placed = native.compose_place(linear, bit, shape, strides, dtype)
        if placed is not None:
            return Edit(placed[0], None, None, placed[1], 1.0, strides=strides)
    edit = compose_canonical(linear, bit, kind, 1.0, dtype)
    edit.linear, edit.strides = place(edit.linear, shape, strides), strides
    return edit


def code_dtype(bits: int) -> torch.dtype:
    """The integer dtype `apply_edit` works in for `bits`-bit codes (with a zero point added): int32 up to 16 bits,
    half the memory traffic of int64."""
    return torch.int32 if bits <= 16 else torch.int64


def apply_edit(flat: torch.Tensor, edit: Edit, bits: int, zero_point: int = 0, signed: bool = True) -> None:
    """In place on `flat`, whose values are code x scale (scale 1 for tensors that hold the codes themselves):
    rewrite the edited codes. The stored code is code + zero_point: two's complement when `signed`, else an
    unsigned (affine, torch.ao quint8) code. Runs in every faulty layer of every forward, so it is a handful of
    in-place ops on the faulty codes only (int32 where the codes are narrow: half the memory traffic)."""
    if native.apply_edit(flat, edit.linear, edit.keep, edit.set, edit.flip, edit.scale, bits, zero_point, signed):
        return  # the same steps in one fused pass over the faulty positions
    scale = edit.scale
    unit = scale == 1.0 if isinstance(scale, float) else scale.dim() == 0 and bool(scale == 1)
    values = flat.take(edit.linear)  # faster than flat[linear] on a large tensor
    if not unit:  # code x scale -> code; a tensor of codes holds integers already
        values = values.div_(scale).round_()
    codes = values.to(code_dtype(bits))
    if zero_point:
        codes += zero_point
    # raw bits -> ((raw & keep) | set) ^ flip, on the low `bits` bits (two's complement of a negative code). 8 bits:
    # the conversion to uint8 keeps the low byte (modulo 256, as C++ defines it for unsigned types), and its int8
    # view is the sign-extended code: no mask, no sign extension
    byte = bits == 8
    raw = codes if byte else codes.bitwise_and_((1 << bits) - 1)
    if edit.keep is not None:
        raw.bitwise_and_(edit.keep)
    if edit.set is not None:
        raw.bitwise_or_(edit.set)
    if edit.flip is not None:
        raw.bitwise_xor_(edit.flip)
    if byte:
        low = raw.to(torch.uint8)
        out = (low.view(torch.int8) if signed else low).to(flat.dtype)
    else:
        if signed:  # sign-extend: raw in [0, 2^bits), the top bit's weight negated (two ops, no shifts)
            top = 1 << (bits - 1)
            raw.bitwise_xor_(top).sub_(top)
        out = raw.to(flat.dtype)
    if zero_point:  # integers: exact in the float dtype
        out -= zero_point
    flat[edit.linear] = out if unit else out.mul_(scale)


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
    if faults.index_bound is not None and faults.index_bound <= numel:  # drawn from that many codes or fewer
        return
    if len(faults) and int(faults.index.max()) >= numel:
        bad = int(faults.index.max())
        raise IndexError(f"fault index {bad} is out of range for {what}: allowed 0..{numel - 1}")
