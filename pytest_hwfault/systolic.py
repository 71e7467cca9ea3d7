"""A weight-stationary systolic array, and what a faulty processing element (PE) does to the layers it computes.

Dataflow (documented, and tested against a plain loop-over-PEs simulation in tests/test_systolic.py):

- A conv or linear layer is a matrix product out[m, n] = sum_k A[m, k] W[k, n]: m runs over images and output
  pixels, k over the layer's fan-in in im2col order (input channel, then kernel row, then kernel column: the order
  of a row-major weight [n, c, kh, kw] and of ``torch.nn.functional.unfold``), n over output channels. A grouped
  conv is one such product per group, n counting that group's channels.
- The array has `rows` x `cols` PEs. K is cut into tiles of `rows` (tile t holds k = t*rows .. t*rows + rows - 1)
  and N into tiles of `cols`; for each pair of tiles the weights are loaded, PE (r, c) holding W[t*rows + r,
  u*cols + c] (zero where k or n runs past the layer), and every A[m, tile] streams through. So PE (r, c) serves
  every output channel n with n % cols == c, and row r every k with k % rows == r.
- Partial sums flow down a column: PE (r, c) multiplies its input by its weight (the product register, `mul`,
  16 bits: int8 x uint8 products fit) and adds the product to the partial sum arriving from PE (r - 1, c) (the
  accumulator register, `acc`, 32 bits, two's complement). Each K-tile's partial sums start at zero at row 0 and
  leave the bottom row into the output accumulator, which adds the tiles (and later the bias) outside the array.
- A fault is a bit of one PE's `acc` or `mul` register, stuck at 0 or 1 or inverted (`flip`), for a whole trial
  (a permanent fault of the array: it corrupts every image and every layer mapped onto the array). A PE in a row
  past the end of K (the last tile) still passes its column's partial sum on, through its faulty register.

The array is named in fault patterns as the "layer" of site ``pe``: ``ws32x32.acc`` is the accumulator registers of
a 32 x 32 weight-stationary array, and a fault's index is r * cols + c.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bits import apply_bit_faults

REGISTERS = {"acc": 32, "mul": 16}  # register -> width in bits
DATAFLOWS = {"ws": "weight-stationary"}
_NAME = re.compile(r"^(ws)(\d+)x(\d+)\.(acc|mul)$")
MAX_SIDE = 4096


@dataclass(frozen=True)
class Array:
    """A systolic array's geometry, and which register of its PEs faults strike."""

    rows: int
    cols: int
    register: str = "acc"
    dataflow: str = "ws"

    def __post_init__(self) -> None:
        for side in (self.rows, self.cols):
            if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_SIDE:
                raise ValueError(f"array=({self.rows!r}, {self.cols!r}) must be two PE counts in [1, {MAX_SIDE}]")
        if self.register not in REGISTERS:
            raise ValueError(f"pe_register={self.register!r}; allowed: {', '.join(map(repr, REGISTERS))}")
        if self.dataflow not in DATAFLOWS:
            raise ValueError(f"dataflow={self.dataflow!r}; allowed: {', '.join(map(repr, DATAFLOWS))}")

    @property
    def name(self) -> str:
        """The array as a fault pattern names it (the "layer" of site pe)."""
        return f"{self.dataflow}{self.rows}x{self.cols}.{self.register}"

    @property
    def width(self) -> int:
        return REGISTERS[self.register]

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    @classmethod
    def parse(cls, name: str) -> Array:
        match = _NAME.match(name)
        if match is None:
            raise ValueError(f"{name!r} is not a systolic array's name; expected e.g. 'ws32x32.acc' or 'ws16x8.mul' "
                             "(weight-stationary rows x cols, register acc or mul)")
        dataflow, rows, cols, register = match.groups()
        return cls(int(rows), int(cols), register, dataflow)

    def position(self, index: int) -> tuple[int, int]:
        return divmod(index, self.cols)

    def describe(self, index: int, bit: int, kind: str) -> str:
        """e.g. "PE (3, 17) of a 32x32 weight-stationary array, accumulator bit 21 stuck-at-1, permanent"."""
        row, col = self.position(index)
        register = "accumulator" if self.register == "acc" else "multiplier output"
        what = {"flip": "inverted", "stuck0": "stuck-at-0", "stuck1": "stuck-at-1"}.get(kind, kind)
        return (f"PE ({row}, {col}) of a {self.rows}x{self.cols} {DATAFLOWS[self.dataflow]} array, {register} bit "
                f"{bit} {what}, permanent")


@dataclass(frozen=True)
class PEFault:
    """One faulty register bit: PE (row, col), the register, the bit and the kind code (`bits.KIND_CODES`)."""

    row: int
    col: int
    register: str
    bit: int
    kind: int


def array_error(a: torch.Tensor, w: torch.Tensor, faults: list[PEFault], rows: int, cols: int) -> torch.Tensor:
    """The error the faulty PEs add to out = a @ w, computed exactly: `a` [M, K] and `w` [K, N] hold integers (any
    float dtype); returns [M, N] in float64. Cost: per faulty PE and K-tile, one product over its column's channels
    and the rows above it."""
    # float32 holds every partial sum exactly while rows x max|a| x max|w| < 2^24 (8-bit codes: up to 514 rows)
    exact32 = rows * float(a.abs().max()) * float(w.abs().max()) < (1 << 24) if a.numel() and w.numel() else True
    dtype = torch.float32 if exact32 else torch.float64
    a, w = a.to(dtype), w.to(dtype)
    m, k = a.shape
    n = w.shape[1]
    error = torch.zeros(m, n, dtype=torch.float64, device=a.device)
    by_column: dict[int, list[PEFault]] = {}
    for fault in faults:
        by_column.setdefault(fault.col, []).append(fault)
    for col, column_faults in by_column.items():
        if col >= n:  # a column no output channel of this layer is mapped onto
            continue
        channels = torch.arange(col, n, cols, device=a.device)
        # the order the partial sum meets them: by row; in one PE the product before the partial sum
        column_faults.sort(key=lambda f: (f.row, f.register == "acc"))
        w_col = w[:, channels]
        total = torch.zeros(m, channels.numel(), dtype=torch.float64, device=a.device)  # errors may be ~2^31
        for start in range(0, k, rows):
            err = torch.zeros_like(total)
            for fault in column_faults:
                kk = start + fault.row
                if fault.register == "mul":
                    product = (a[:, kk:kk + 1] * w_col[kk:kk + 1]).double() if kk < k else torch.zeros_like(err)
                    err = err + _stuck(product, fault, REGISTERS["mul"]) - product
                else:
                    stop = min(kk + 1, k, start + rows)
                    partial = (a[:, start:stop] @ w_col[start:stop]).double()
                    err = _stuck(partial + err, fault, REGISTERS["acc"]) - partial
            total += err
        error[:, channels] = total
    return error


def _stuck(values: torch.Tensor, fault: PEFault, width: int) -> torch.Tensor:
    """The register's value with the fault's bit changed (two's complement, `width` bits, wrapping)."""
    codes = values.round().to(torch.int64)
    return apply_bit_faults(codes, torch.tensor(fault.bit), torch.tensor(fault.kind), width).to(torch.float64)


def on_array(module: nn.Module) -> bool:
    """Whether the array computes this layer: conv1d/conv2d and linear layers with weights (not a convolution on
    images folded into its batch dimension, whose input is [N, k, C, ...])."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and getattr(module, "channel_axis", 0) == 0


def layer_error(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, faults: list[PEFault], rows: int,
                cols: int, out_shape: torch.Size) -> torch.Tensor:
    """The error of one call of a conv/linear layer on input codes `x` with weight codes `weight`, shaped like its
    output (row-major)."""
    if isinstance(module, nn.Linear):
        a = x.reshape(-1, x.shape[-1])
        return array_error(a, weight.reshape(weight.shape[0], -1).t(), faults, rows, cols).reshape(out_shape)
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    conv2d = isinstance(module, nn.Conv2d)
    images = x if conv2d else x.unsqueeze(2)
    kernel = weight if conv2d else weight.unsqueeze(2)
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise ValueError(f"site 'pe': a {type(module).__name__} with padding={module.padding!r}, "
                         f"padding_mode={module.padding_mode!r} is not mapped onto the array (zero, numeric padding "
                         "only)")
    pad: tuple[int, ...] = tuple(int(p) for p in module.padding) if conv2d else (0, int(module.padding[0]))
    stride = module.stride if conv2d else (1, module.stride[0])
    dilation = module.dilation if conv2d else (1, module.dilation[0])
    columns = F.unfold(images.float(), kernel.shape[-2:], dilation=dilation, padding=pad, stride=stride)
    batch, _, pixels = columns.shape
    groups = module.groups
    per_group_k, per_group_n = columns.shape[1] // groups, kernel.shape[0] // groups
    out = torch.empty(batch, pixels, kernel.shape[0], dtype=torch.float64, device=x.device)
    for g in range(groups):
        a = columns[:, g * per_group_k:(g + 1) * per_group_k].transpose(1, 2).reshape(-1, per_group_k)
        w = kernel[g * per_group_n:(g + 1) * per_group_n].reshape(per_group_n, -1).t()
        out[..., g * per_group_n:(g + 1) * per_group_n] = array_error(a, w, faults, rows, cols).reshape(
            batch, pixels, per_group_n)
    return out.transpose(1, 2).reshape(out_shape)
