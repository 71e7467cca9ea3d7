"""Two's-complement bit faults on code tensors (pytest_hwfault.bits), checked against a plain-Python oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import oracle, oracle_digits
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_hwfault.bits import Kind, apply_bit_faults, fault_delta, to_signed, to_unsigned

KIND_CODE = {"flip": 0, "stuck0": 1, "stuck1": 2}  # the documented kind codes of apply_bit_faults
KINDS = tuple(KIND_CODE)
PROPERTY = settings(max_examples=75, deadline=None)


def test_oracle_itself() -> None:
    # A few hand-checked values, so that the oracle is not just trusted.
    assert oracle(0, 0, "flip", 8) == 1
    assert oracle(1, 7, "flip", 8) == -127
    assert oracle(-1, 7, "flip", 8) == 127
    assert oracle(-128, 7, "flip", 8) == 0
    assert oracle(127, 0, "stuck0", 8) == 126
    assert oracle(0, 1, "stuck1", 2) == -2
    assert oracle(5, 2, "stuck1", 8) == 5
    assert oracle(300, 0, "stuck0", 8) == 44  # wrapped first: 300 mod 256 = 44
    assert oracle(2**31 - 1, 31, "flip", 32) == -1


@st.composite
def faults_of_width(draw, min_width: int = 2, max_width: int = 32, in_range: bool = False):
    width = draw(st.integers(min_width, max_width))
    lo, hi = (-(2 ** (width - 1)), 2 ** (width - 1) - 1) if in_range else (-(2**40), 2**40)
    rows = draw(
        st.lists(
            st.tuples(st.integers(lo, hi), st.integers(0, width - 1), st.sampled_from(KINDS)),
            min_size=1,
            max_size=40,
        )
    )
    return width, rows


def _apply(rows: list[tuple[int, int, str]], width: int) -> torch.Tensor:
    codes = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    bit = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    kind = torch.tensor([KIND_CODE[r[2]] for r in rows], dtype=torch.int64)
    return apply_bit_faults(codes, bit, kind, width)


@PROPERTY
@given(faults_of_width())
def test_apply_bit_faults_matches_oracle(case) -> None:
    width, rows = case
    out = _apply(rows, width)
    assert out.dtype == torch.int64
    assert out.tolist() == [oracle(c, b, k, width) for c, b, k in rows]


@PROPERTY
@given(faults_of_width(in_range=True))
def test_fault_delta_matches_oracle(case) -> None:
    width, rows = case
    for code, bit, kind in rows:
        assert fault_delta(code, bit, Kind(kind), width) == oracle(code, bit, kind, width) - code


@PROPERTY
@given(faults_of_width(in_range=True))
def test_flipping_a_bit_twice_is_the_identity(case) -> None:
    width, rows = case
    codes = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    bit = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    flip = torch.zeros_like(bit)
    once = apply_bit_faults(codes, bit, flip, width)
    assert not torch.equal(once, codes)  # a flip always changes the code
    assert torch.equal(apply_bit_faults(once, bit, flip, width), codes)


@PROPERTY
@given(faults_of_width(in_range=True), st.sampled_from(["stuck0", "stuck1"]))
def test_stuck_at_is_idempotent(case, kind: str) -> None:
    width, rows = case
    codes = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    bit = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    kinds = torch.full_like(bit, KIND_CODE[kind])
    once = apply_bit_faults(codes, bit, kinds, width)
    assert torch.equal(apply_bit_faults(once, bit, kinds, width), once)
    # and the bit reads as stuck afterwards
    want = 1 if kind == "stuck1" else 0
    assert (((to_unsigned(once, width) >> bit) & 1) == want).all()


@PROPERTY
@given(faults_of_width(in_range=True))
def test_one_flip_changes_the_code_by_a_power_of_two(case) -> None:
    """A flip of bit b moves the value by +-2**b; on the sign bit by -2**(w-1) when setting it."""
    width, rows = case
    out = _apply([(c, b, "flip") for c, b, _ in rows], width)
    for (code, bit, _), new in zip(rows, out.tolist()):
        was_set = oracle_digits(code, width)[bit] == 1
        magnitude = 2**bit
        if bit == width - 1:
            expected = magnitude if was_set else -magnitude
        else:
            expected = -magnitude if was_set else magnitude
        assert new - code == expected


@PROPERTY
@given(st.integers(2, 32), st.data())
def test_unsigned_signed_round_trip(width: int, data) -> None:
    lo, hi = -(2 ** (width - 1)), 2 ** (width - 1) - 1
    values = data.draw(st.lists(st.integers(lo, hi), min_size=1, max_size=50))
    codes = torch.tensor(values, dtype=torch.int64)
    raw = to_unsigned(codes, width)
    assert raw.dtype == torch.int64
    assert int(raw.min()) >= 0 and int(raw.max()) < 2**width
    assert raw.tolist() == [v % 2**width for v in values]
    assert to_signed(raw, width).tolist() == values


def test_extreme_codes_of_every_width() -> None:
    for width in range(2, 33):
        lo, hi = -(2 ** (width - 1)), 2 ** (width - 1) - 1
        codes = torch.tensor([lo, hi, 0, -1], dtype=torch.int64)
        top = torch.full((4,), width - 1, dtype=torch.int64)
        out = apply_bit_faults(codes, top, torch.zeros(4, dtype=torch.int64), width)
        assert out.tolist() == [0, -1, lo, hi], width


def test_bit_and_kind_broadcast_against_codes() -> None:
    codes = torch.tensor([[0, 1, 2], [-3, -2, -1]], dtype=torch.int64)
    out = apply_bit_faults(codes, torch.tensor(1), torch.tensor(KIND_CODE["stuck1"]), 8)
    assert out.shape == codes.shape
    assert out.tolist() == [[oracle(c, 1, "stuck1", 8) for c in row] for row in codes.tolist()]
    per_column = apply_bit_faults(codes, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 4)
    assert per_column.tolist() == [
        [oracle(c, b, k, 4) for c, b, k in zip(row, (0, 1, 2), KINDS)] for row in codes.tolist()
    ]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64])
def test_apply_bit_faults_accepts_integer_dtypes_and_does_not_mutate(dtype: torch.dtype) -> None:
    codes = torch.tensor([-5, 0, 7], dtype=dtype)
    before = codes.clone()
    out = apply_bit_faults(codes, torch.tensor([0, 3, 2]), torch.tensor([0, 2, 1]), 8)
    assert torch.equal(codes, before)
    assert out.tolist() == [oracle(-5, 0, "flip", 8), oracle(0, 3, "stuck1", 8), oracle(7, 2, "stuck0", 8)]


def test_kind_values() -> None:
    assert [k.value for k in Kind] == ["flip", "stuck0", "stuck1"]
    assert Kind("stuck1") is Kind.STUCK1
