"""Two's-complement bit operations on integer code tensors.

A hardware fault corrupts a stored integer, not a float. Every fault in pytest-hwfault goes through these few
functions, so that "flip bit 7 of an int8 code" means exactly what it means on silicon: the code is taken modulo
2**bits, the bit is changed, and the result is sign-extended back.
"""

from __future__ import annotations

import torch

from .spec import WIDE_ACC_BITS, Kind

MAX_CODE_BITS = WIDE_ACC_BITS  # the (wide) accumulator's codes are the widest
KIND_CODES: dict[Kind, int] = {Kind.FLIP: 0, Kind.STUCK0: 1, Kind.STUCK1: 2}
KINDS_BY_CODE: tuple[Kind, ...] = (Kind.FLIP, Kind.STUCK0, Kind.STUCK1)


def check_width(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= MAX_CODE_BITS:
        raise ValueError(f"bits must be an integer in [2, {MAX_CODE_BITS}], got {bits!r}")


def to_unsigned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Raw bit pattern of signed codes, as non-negative int64 in [0, 2**bits)."""
    return codes.to(torch.int64) & ((1 << bits) - 1)


def to_signed(raw: torch.Tensor, bits: int) -> torch.Tensor:
    """Sign-extend a raw `bits`-wide pattern back to a signed int64 code."""
    raw = raw.to(torch.int64)
    return torch.where(raw >= (1 << (bits - 1)), raw - (1 << bits), raw)


def apply_bit_faults(codes: torch.Tensor, bit: torch.Tensor, kind: torch.Tensor, bits: int) -> torch.Tensor:
    """Return `codes` with one fault per element applied.

    `bit` holds the bit position of each element's fault and `kind` its kind code (see `KIND_CODES`); both
    broadcast against `codes`. Codes outside the `bits`-wide range are first wrapped, as a register would.
    """
    raw = to_unsigned(codes, bits)
    mask = torch.ones_like(raw) << bit.to(torch.int64)
    kind = kind.to(torch.int64)
    flipped = raw ^ mask
    cleared = raw & ~mask
    set_ = raw | mask
    stuck = torch.where(kind == KIND_CODES[Kind.STUCK0], cleared, set_)
    out = torch.where(kind == KIND_CODES[Kind.FLIP], flipped, stuck)
    return to_signed(out, bits)


def fault_delta(code: int, bit: int, kind: Kind, bits: int) -> int:
    """Change of the code's integer value caused by one fault (pure Python, for reports)."""
    raw = code & ((1 << bits) - 1)
    mask = 1 << bit
    if kind is Kind.FLIP:
        raw ^= mask
    elif kind is Kind.STUCK0:
        raw &= ~mask
    else:
        raw |= mask
    new = raw - (1 << bits) if raw >= (1 << (bits - 1)) else raw
    return new - code
