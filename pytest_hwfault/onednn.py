"""oneDNN's float32 arithmetic for the post-ops x86 Inductor fuses into an int8 convolution, reproduced on torch's ops
bit for bit: the sum's fused multiply-add, hard-swish, and swish with oneDNN's own exponential (a range reduction
and a degree-5 polynomial evaluated with fused multiply-adds, constants as oneDNN's eltwise injector holds them).
Each was measured against ``onednn::qconv_pointwise`` on millions of outputs (benchmarks/README.md)."""

from __future__ import annotations

import struct

import torch

F32 = torch.float32


def _constant(bits: int) -> float:
    """The float32 whose bit pattern is `bits` (oneDNN's tables hold them so)."""
    return float(struct.unpack("f", struct.pack("I", bits))[0])


LOG2E, LN_FLT_MAX, LN_FLT_MIN, LN2 = (_constant(b) for b in (0x3FB8AA3B, 0x42B17218, 0xC2AEAC50, 0x3F317218))
EXP_POLYNOMIAL = tuple(_constant(b) for b in (0x3F7FFFFB, 0x3EFFFEE3, 0x3E2AAD40, 0x3D2B9D0D, 0x3C07CFCE))  # p1..p5


def fused_multiply_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a x b + c rounded once (C's fmaf, an FMA instruction), for float32 `b`, `c` and `a` float32 or an integer
    below 2^29 in magnitude: the product is then exact in float64, the float64 sum's own rounding error is recovered
    exactly (Knuth's TwoSum), and where the float64 sum lies exactly halfway between two float32 values, that error
    decides the side."""
    f64 = torch.float64
    product, addend = a.to(f64) * b.to(f64), c.to(f64)
    total = product + addend
    back = total - product
    error = (product - (total - back)) + (addend - back)
    rounded = total.to(torch.float32)
    diff = total - rounded.to(f64)
    inf = torch.tensor(float("inf"), dtype=torch.float32)
    neighbour = torch.nextafter(rounded, torch.where(diff > 0, inf, -inf))
    halfway = (diff != 0) & ((rounded.to(f64) + neighbour.to(f64)) * 0.5 == total)
    return torch.where(halfway & (error * diff > 0), neighbour, rounded)


def exp(x: torch.Tensor) -> torch.Tensor:
    """oneDNN's exp of float32 `x`: n = floor(x log2(e) + 1/2), r = x - n ln 2 (fused), a degree-5 polynomial in r
    by fused multiply-adds, times 2^(n-1) times 2; zero below ln(FLT_MIN)."""
    small = x < LN_FLT_MIN
    x = x.clamp(LN_FLT_MIN, LN_FLT_MAX)
    n = x.mul(LOG2E).add_(0.5).floor_()
    r = fused_multiply_add(-n, torch.full_like(x, LN2), x)
    power = (n.sub(1).to(torch.int32).add_(127) << 23).view(F32)  # 2^(n-1) from its bits
    power = power.masked_fill_(small, 0.0)
    p = torch.full_like(x, EXP_POLYNOMIAL[4])
    for coefficient in (*EXP_POLYNOMIAL[3::-1], 1.0):
        p = fused_multiply_add(p, r, torch.full_like(x, coefficient))
    return p.mul_(power).mul_(2.0)


def logistic(x: torch.Tensor) -> torch.Tensor:
    """oneDNN's sigmoid: e = exp(-|x|), y = e / (e + 1), then y for negative x (by the sign bit), 1 - y otherwise."""
    bits = x.contiguous().view(torch.int32)
    e = exp((bits | torch.tensor(-(2**31), dtype=torch.int32)).view(F32))
    y = e / (e + 1.0)
    return torch.where(bits < 0, y, 1.0 - y)


def swish(x: torch.Tensor) -> torch.Tensor:
    """oneDNN's swish post-op (torch's SiLU, alpha 1): x x logistic(x)."""
    return logistic(x) * x


def hardswish(x: torch.Tensor) -> torch.Tensor:
    """oneDNN's hard-swish post-op: x x clamp(x x float32(1/6) + 0.5, 0, 1), each step rounding in float32 (torch's
    x x relu6(x + 3) / 6 rounds otherwise)."""
    gate = torch.mul(x, torch.tensor(1.0 / 6.0, dtype=F32)).add_(0.5).clamp_(0.0, 1.0)
    return gate.mul_(x)


POST_OPS = {"hardswish": hardswish, "swish": swish}
