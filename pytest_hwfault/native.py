"""The engine's elementwise chains as single fused passes, compiled from C (`_fused.c`) at first use.

A quantized layer's input quantization (multiply, round, clamp), its conversion to the bytes an int8 kernel reads
(copy, xor) and its requantization (bias, multiplier, round, clamp, scale) are three to five eager torch ops, each
streaming the whole activation through memory: on ResNet56 they took ~45% of an int8 forward. The C functions
do the same IEEE float32 operations per element in the same order (no FP contraction, no fast-math), in one pass.
At a high BER the same holds for a trial's bookkeeping: the sampler's gaps after torch's log (float64 division,
floor, clamp, running sum) and each tensor's faults folded into edits and placed in its layout are one pass each.

- **Same numbers.** `library` checks every function on this machine against the eager torch chain, bit for bit
  (ties, signed zeros, infinities, NaN, every optional step), before anything uses it; a mismatch turns it off.
- **Optional.** It needs a C compiler (``$CC``, else ``cc``) with OpenMP; without one, or with
  ``PYTEST_HWFAULT_NATIVE=0``, every caller runs its eager chain, which computes the same numbers. `status` says
  which, and why.
- The shared library is cached per source, compiler and CPU (``-march=native``) under ``$PYTEST_HWFAULT_CACHE``,
  else ``$XDG_CACHE_HOME/pytest-hwfault`` or ``~/.cache/pytest-hwfault``; processes that compile at once each
  write their own file and rename it into place.

Each wrapper returns False, having done nothing, where its tensors are not what the C function reads (not CPU
float32, not dense, layouts that differ, autograd recording): the caller then runs its eager chain.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.autograd.graph import increment_version

from .layout import channels_last_strides, contiguous_strides, is_dense

SOURCE = Path(__file__).with_name("_fused.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c11")
ENV_SWITCH = "PYTEST_HWFAULT_NATIVE"

_P, _I, _F, _D, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_int
_SIGNATURES = {
    "hw_quantize": [_P, _P, _I, _F, _F, _F, _C],
    "hw_to_bytes": [_P, _P, _I, _F, _C],
    "hw_to_bytes_f64": [_P, _P, _I, _D, _C],
    "hw_quantize_to_bytes": [_P, _P, _I, _F, _F, _F, _F, _C],
    "hw_requantize": [_P, _I, _I, _I, _P, _P, _P, _F, _F, _F, _F, _F, _C],
    "hw_add_relu": [_P, _P, _I, _C],
    "hw_apply_edit": [_P, _I, _P, _I, _P, _P, _P, _C, _C, _F, _C, _I, _C, _C],
    "hw_requantize_edit_relu": [_P, _I, _I, _I, _P, _P, _P, _F, _F, _F, _F, _F, _F, _P, _I, _P, _P, _P, _C, _C, _I,
                                _C, _P, _C],
    "hw_requantize_wide": [_P, _P, _I, _I, _I, _P, _P, _P, _D, _D, _D, _D, _F, _C, _C],
    "hw_gap_positions": [_P, _I, _D, _D, _I, _P],
    "hw_compose_place": [_P, _P, _I, _I, _I, _P, _P, _C],
    "hw_decode_faults": [_P, _I, _P, _P, _P, _C, _P, _P, _P, _P, _C],
    "hw_layer_norm_ort": [_P, _P, _P, _P, _I, _I, _F, _C],
    "hw_tanh_mlas": [_P, _P, _I, _P, _C],
    "hw_logistic_mlas": [_P, _P, _I, _P, _C],
    "hw_erf_mlas": [_P, _P, _I, _P, _C],
    "hw_gelu_ort": [_P, _P, _P, _I, _I, _C, _P, _C],
    "hw_skip_layer_norm_ort": [_P, _P, _P, _P, _P, _P, _I, _I, _F, _C],
    "hw_matmul_fma": [_P, _P, _P, _I, _I, _I, _I, _I, _C],
    "hw_softmax_mlas": [_P, _P, _I, _I, _P, _C],
    "hw_qlinear_binary": [_P, _P, _P, _I, _I, _I, _C, _P, _C],
}
_RETURNS = {"hw_apply_edit": ctypes.c_int, "hw_requantize_edit_relu": ctypes.c_int,
            "hw_compose_place": ctypes.c_int64}

_UNBOUNDED = (float("-inf"), float("inf"))  # a clamp that is the identity, NaN included

_switched_off = False  # `disabled()`: the eager chains everywhere, for tests that compare both
_why_not: str | None = None  # why `library` is None, once it was asked


# -- building and checking the library -------------------------------------------------------------------------------
def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the platform's processor name."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return flags or f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    explicit = os.environ.get("PYTEST_HWFAULT_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-hwfault"


_SMOKE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
n = 4096
x, out = (ctypes.c_float * n)(*[i * 0.37 - 700.0 for i in range(n)]), (ctypes.c_float * n)()
lib.hw_quantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_float,
                            ctypes.c_float, ctypes.c_int]
lib.hw_quantize(x, out, n, ctypes.c_float(2.5), ctypes.c_float(-128.0), ctypes.c_float(127.0), 1)
assert out[0] == -128.0 and out[n - 1] == 127.0
"""


def _build(compiler: str) -> Path:
    """The compiled library, from the cache or compiled now (raises OSError/CalledProcessError on failure)."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_key().encode(),
                                     torch.__version__.encode()])).hexdigest()[:20]
    target = _cache_dir() / f"fused-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        # a compiler without OpenMP (Apple's clang) builds single-threaded passes; one that does not know
        # -march=native builds generic ones; the first error is the one reported
        ladders = [FLAGS, tuple(f for f in FLAGS if f != "-fopenmp"),
                   tuple(f for f in FLAGS if f not in ("-fopenmp", "-march=native"))]
        failure: subprocess.CalledProcessError | None = None
        for flags in ladders:
            try:
                subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], check=True,
                               capture_output=True, text=True, timeout=300)
                # run once in a child: an instruction this CPU (or its hypervisor) refuses kills the child, not us
                subprocess.run([sys.executable, "-c", _SMOKE, str(built)], check=True, capture_output=True, text=True,
                               timeout=120)
                break
            except subprocess.CalledProcessError as error:
                failure = failure or error
        else:
            assert failure is not None
            raise failure
        os.replace(built, target)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, _RETURNS.get(name)
    return lib


@cache
def library() -> ctypes.CDLL | None:
    """The checked library, or None (`status` says why). Loaded after torch, so its OpenMP runtime is torch's."""
    global _why_not
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        _why_not = f"off ({ENV_SWITCH}={os.environ[ENV_SWITCH]})"
        return None
    compiler = _compiler()
    if compiler is None:
        _why_not = "no C compiler found ($CC, cc, gcc)"
        return None
    try:
        lib = _bind(_build(compiler))
    except subprocess.CalledProcessError as error:
        _why_not = f"{compiler} failed: {(error.stderr or '').strip().splitlines()[-1:] or error}"
        return None
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        _why_not = f"could not build or load the fused passes: {error}"
        return None
    problem = _self_check(lib)
    if problem is not None:
        _why_not = f"disagreed with torch on this machine ({problem}): off"
        return None
    return lib


def status() -> str:
    """'native' or why the eager chains run instead."""
    if _switched_off:
        return "off (switched off in this process)"
    return "native" if library() is not None else f"eager: {_why_not}"


def switch_off() -> None:
    """The eager chains everywhere in this process from now on (`--hwfault-native=off`)."""
    global _switched_off
    _switched_off = True


@contextmanager
def disabled() -> Iterator[None]:
    """Every caller runs its eager chain inside (for tests that compare both ways)."""
    global _switched_off
    previous, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = previous


def _active() -> ctypes.CDLL | None:
    return None if _switched_off else library()


# -- the eager chains each function must equal -----------------------------------------------------------------------
def eager_quantize(x: torch.Tensor, out: torch.Tensor, inv_scale: float, low: float | None, high: float | None
                   ) -> torch.Tensor:
    out = torch.mul(x, inv_scale, out=out).round_()
    return out if low is None or high is None else out.clamp_(low, high)


def eager_to_bytes(x: torch.Tensor, out: torch.Tensor, offset: int) -> torch.Tensor:
    return out.copy_(x.add(offset) if offset else x)


def eager_requantize(acc: torch.Tensor, bias: torch.Tensor | None, multiplier: torch.Tensor,
                     bias_after: torch.Tensor | None, pre_round: float | None, post_round: float | None,
                     low: float, high: float, scale: float | None) -> torch.Tensor:
    if bias is not None:
        acc.add_(bias)
    acc.mul_(multiplier)
    if bias_after is not None:
        acc.add_(bias_after)
    if pre_round is not None:
        acc.add_(pre_round)
    acc.round_()
    if post_round is not None:
        acc.add_(post_round)
    acc.clamp_(low, high)
    return acc if scale is None else acc.mul_(scale)


def eager_requantize_wide(acc: torch.Tensor, bias: torch.Tensor | None, multiplier: torch.Tensor,
                          bias_after: torch.Tensor | None, pre_round: float | None, post_round: float | None,
                          low: float, high: float, scale: float | None, in_float32: bool) -> torch.Tensor:
    """A wide layer's float64 accumulator requantized as the engine's eager chain does it (`qmodel`): the bias
    added in float64, then the rest in float64, or (`in_float32`: a deployed runtime) in float32 after converting;
    the codes in float32, times `scale`. Returns the float32 result (acc is overwritten)."""
    if in_float32:
        if bias is not None:
            acc.add_(bias)
        return eager_requantize(acc.float(), None, multiplier, bias_after, pre_round, post_round, low, high, scale)
    out = eager_requantize(acc, bias, multiplier, bias_after, pre_round, post_round, low, high, None).float()
    return out if scale is None else out.mul_(scale)


def eager_requantize_edit_relu(acc: torch.Tensor, bias: torch.Tensor | None, multiplier: torch.Tensor,
                               bias_after: torch.Tensor | None, pre_round: float | None, post_round: float | None,
                               low: float, high: float, scale: float | None, edit: Any, bits: int, zero_point: int,
                               signed: bool) -> torch.Tensor:
    """The chain `requantize_edit_relu` fuses, on torch's ops: requantize (clamp low..high), the act edit on the
    codes (on code x scale where the layer hands on values, as `qmodel` applies it), the model's ReLU in place."""
    from .inject import apply_edit  # inject calls this module: imported here

    eager_requantize(acc, bias, multiplier, bias_after, pre_round, post_round, low, high, scale)
    with disabled():
        apply_edit(acc.as_strided((acc.numel(),), (1,)), edit if scale is None else
                   type(edit)(edit.linear, edit.keep, edit.set, edit.flip, scale), bits, zero_point, signed)
    return acc.relu_()


def eager_add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.add_(b).relu_()


def eager_gap_positions(logged: torch.Tensor, log_q: float, total: int, last: int) -> torch.Tensor:
    """The positions of a Bernoulli process from its logged uniforms log(1 - u) (`faults.bernoulli_positions`), on
    torch's ops, in place on `logged`: geometric gaps by inversion, clamped to `total`, summed from `last`."""
    gaps = logged.div_(log_q).floor_().clamp_(max=float(total)).to(torch.int64).add_(1)
    return torch.cumsum(gaps, 0).add_(last)


def eager_decode_faults(flat: torch.Tensor, bounds: list[int], firsts: list[int], numels: list[int], shift: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`faults.sample_pattern`'s decoding of a draw over whole codes, on torch's ops (`decode_faults`): (linear, image,
    index, bit) of every fault; target t's faults are flat[bounds[t]:bounds[t + 1]], its codes numbered from
    firsts[t] in the draw's codes, numels[t] codes per image (0: a weight target, image -1)."""
    from .faults import _divmod  # faults calls this module: imported here

    codes, bit = flat >> shift, flat & ((1 << shift) - 1)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for t, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        linear = codes[lo:hi] - firsts[t]
        image, index = _divmod(linear, numels[t]) if numels[t] else (torch.full_like(linear, -1), linear)
        parts.append((linear, image, index))
    if not parts:
        empty = flat[:0]
        return empty, empty, empty, bit
    linear, image, index = (torch.cat([p[i] for p in parts]) for i in range(3))
    return linear, image, index, bit


def eager_layer_norm_ort(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, eps: float
                         ) -> torch.Tensor:
    """`hw_layer_norm_ort` on torch's ops: x is [rows, c] float32 with c a multiple of 8, scale and bias [c]. The
    mean's four float64 lanes summed in order by a cumulative sum (sequential in float64 on the CPU), the lanes'
    fused multiply-adds through `onednn.fused_multiply_add` (exact: the product of two float32 is exact in
    float64)."""
    from .onednn import fused_multiply_add

    rows, c = x.shape
    sums = torch.cumsum(x.double().view(rows, c // 4, 4), dim=1)[:, -1]
    mean = (((sums[:, 0] + sums[:, 2]) + (sums[:, 1] + sums[:, 3])) / c).float().unsqueeze(1)
    diff = x - mean
    lanes = torch.zeros(rows, 8)
    for block in diff.view(rows, c // 8, 8).unbind(1):
        lanes = fused_multiply_add(block, block, lanes)
    lanes = lanes[:, :4] + lanes[:, 4:]
    lanes = lanes[:, :2] + lanes[:, 2:]
    var = (lanes[:, :1] + lanes[:, 1:]) / torch.tensor(float(c)) + torch.tensor(eps, dtype=torch.float32)
    # torch's float32 sqrt is not correctly rounded on every CPU (83% of values here); float64's, rounded, is
    q = diff * (torch.tensor(1.0) / var.double().sqrt().float())
    if bias is None:
        return q * scale
    return fused_multiply_add(q, scale.expand_as(q).contiguous(), bias.expand_as(q).contiguous())


# MLAS's `MlasTanhConstants` (the polynomial Eigen uses): alpha_13 .. alpha_1, beta_6 .. beta_0, as float32
MLAS_TANH = torch.tensor([-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
                          1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03, 1.19825839466702e-06,
                          1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03], dtype=torch.float32)


def eager_tanh_mlas(x: torch.Tensor) -> torch.Tensor:
    """`hw_tanh_mlas` on torch's ops: clamp to [-9, 9] (a NaN kept), Horner steps by exact fused multiply-adds."""
    from .onednn import fused_multiply_add

    v = x.clamp(-9.0, 9.0)
    v2 = v * v
    a13, a11, a9, a7, a5, a3, a1, b6, b4, b2, b0 = (torch.full_like(v, float(c)) for c in MLAS_TANH)
    p = fused_multiply_add(v2, a13, a11)
    for a in (a9, a7, a5, a3, a1):
        p = fused_multiply_add(p, v2, a)
    q = fused_multiply_add(v2, b6, b4)
    for b in (b2, b0):
        q = fused_multiply_add(q, v2, b)
    return (p * v) / q


# MLAS's `MlasLogisticConstants` (the polynomial Eigen uses): alpha_9 .. alpha_1, beta_10 .. beta_0, as float32
MLAS_LOGISTIC = torch.tensor([4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
                              2.48287947061529e-01, 6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06,
                              1.70198817374094e-03, 1.16817656904453e-01, 9.93151921023180e-01], dtype=torch.float32)


def eager_logistic_mlas(x: torch.Tensor) -> torch.Tensor:
    """`hw_logistic_mlas` on torch's ops: clamp to [-18, 18] (a NaN kept), Horner steps by exact fused multiply-adds,
    p / q + 0.5 raised to 0 where below it (a NaN kept)."""
    from .onednn import fused_multiply_add

    v = x.clamp(-18.0, 18.0)
    v2 = v * v
    a9, a7, a5, a3, a1, b10, b8, b6, b4, b2, b0 = (torch.full_like(v, float(c)) for c in MLAS_LOGISTIC)
    p = fused_multiply_add(v2, a9, a7)
    for a in (a5, a3, a1):
        p = fused_multiply_add(p, v2, a)
    q = fused_multiply_add(v2, b10, b8)
    for b in (b6, b4, b2, b0):
        q = fused_multiply_add(q, v2, b)
    r = (p * v) / q + 0.5
    return torch.where(r < 0, 0.0, r)


# MLAS's `MlasErfConstants` in `hw_erf_mlas`'s order: the split; the small branch's polynomial and the large one's,
# from the highest degree down (each constant term minus one); the exponential's lower bound, 1 / ln 2, -ln 2 high
# and low, its polynomial from the highest degree down; the rounding bias 1.5 x 2^23
MLAS_ERF = torch.tensor([0.921875, -5.99104969e-4, 4.99339588e-3, -2.67667342e-2, 1.12818025e-1, -3.76124859e-1,
                         1.28379151e-1, 1.72948930e-5, -3.83208680e-4, 3.88393435e-3, -2.42545605e-2, 1.06777847e-1,
                         6.34846687e-1, 1.28717512e-1, -88.3762626647949, 1.44269504088896341, -6.93145752e-1,
                         -1.42860677e-6, 1.38319808e-3, 8.37550033e-3, 4.16689515e-2, 1.66664466e-1, 4.99999851e-1,
                         1.0, 1.0, 12582912.0], dtype=torch.float32)


def eager_erf_mlas(x: torch.Tensor) -> torch.Tensor:
    """`hw_erf_mlas` on torch's ops: the sign split off by bits, both branches by exact fused multiply-adds (the
    other branch's input zeroed), 2^m from its exponent field, the results merged by bits as MLAS merges them."""
    from .onednn import fused_multiply_add

    bits = x.view(torch.int32)
    sign = bits & torch.iinfo(torch.int32).min
    a = (bits & torch.iinfo(torch.int32).max).view(torch.float32)
    split, *c = (torch.full_like(a, float(v)) for v in MLAS_ERF)
    big = split <= a  # false for a NaN, which the small branch carries
    p, square = c[0], a * a
    for coefficient in c[1:6]:
        p = fused_multiply_add(p, square, coefficient)
    small = torch.where(big, 0.0, fused_multiply_add(p, a, a))
    b = torch.where(big, a, 0.0)
    q = c[6]
    for coefficient in c[7:13]:
        q = fused_multiply_add(q, b, coefficient)
    lower, log2e, ln2_high, ln2_low, *exp_poly, bias = c[13:]
    t = torch.maximum(-fused_multiply_add(q, b, b), lower)
    m = fused_multiply_add(log2e, t, bias) - bias
    f = fused_multiply_add(m, ln2_low, fused_multiply_add(m, ln2_high, t))
    e = exp_poly[0]
    for coefficient in exp_poly[1:]:
        e = fused_multiply_add(e, f, coefficient)
    scale = ((m.to(torch.int32) + 127) << 23).view(torch.float32)  # m in -127 .. 0: 2^m
    large = (1.0 - e * scale).view(torch.int32)
    return (large | small.view(torch.int32) | sign).view(torch.float32)


# onnxruntime's GELU kernels' constants: FastGelu's B = sqrt(2 / pi) and C = 0.044715 B, Gelu's 1 / sqrt 2 (each as
# float32), then MLAS's tanh constants (FastGelu) or its erf constants (Gelu, BiasGelu), as `hw_gelu_ort` reads them
GELU_CONSTANTS = (0.7978845608028654, 0.035677408136300125, math.sqrt(0.5))
_GELU_TANH = torch.cat([torch.tensor(GELU_CONSTANTS, dtype=torch.float32), MLAS_TANH])
_GELU_ERF = torch.cat([torch.tensor(GELU_CONSTANTS, dtype=torch.float32), MLAS_ERF])


def _gelu_chain(x: torch.Tensor, bias: torch.Tensor | None, erf: bool, tanh_fn: Any, erf_fn: Any) -> torch.Tensor:
    b, c, root_half = (torch.tensor(v, dtype=torch.float32) for v in GELU_CONSTANTS)
    v = x if bias is None else x + bias
    t = erf_fn((v * root_half).contiguous()) if erf else tanh_fn((v * ((c * v * v) + b)).contiguous())
    return (0.5 * v) * (t + 1.0)


def eager_gelu_ort(x: torch.Tensor, bias: torch.Tensor | None, erf: bool) -> torch.Tensor:
    """`hw_gelu_ort` on torch's ops: v = x (+ bias); FastGelu's v x ((C x v) x v + B) through MLAS's tanh, or Gelu's
    v x float32(1 / sqrt 2) through its erf; then (0.5 x v) x (that + 1), each a float32 operation."""
    return _gelu_chain(x, bias, erf, eager_tanh_mlas, eager_erf_mlas)


def eager_skip_layer_norm_ort(x: torch.Tensor, skip: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`hw_skip_layer_norm_ort` on torch's ops, for [rows, width] float32 `x` and `skip` of as many rows: Welford's
    running mean and M2 one column at a time, then each step of the normalization a float32 operation."""
    v = x + skip if bias is None else (x + skip) + bias
    rows, width = v.shape
    mean, m2 = torch.zeros(rows), torch.zeros(rows)
    for j in range(width):
        d = v[:, j] - mean
        mean = mean + d / torch.tensor(float(j + 1))
        m2 = m2 + d * (v[:, j] - mean)
    s = (m2 / torch.tensor(float(width)) + torch.tensor(eps, dtype=torch.float32)).double().sqrt().float()
    q = ((v - mean.unsqueeze(1)) / s.unsqueeze(1)) * gamma
    return q if beta is None else q + beta


def eager_matmul_fma(a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
    """`hw_matmul_fma` on torch's ops: a [batch, m, k], b [batch, k, n], float32; the chain over k by exact fused
    multiply-adds, restarted every `block` values of k (0: never) and the blocks added in order."""
    from .onednn import fused_multiply_add

    batch, m, k = a.shape
    n = b.shape[2]
    step = block if block > 0 else k
    out = None
    for k0 in range(0, k, step):
        acc = torch.zeros(batch, m, n)
        for kk in range(k0, min(k0 + step, k)):
            acc = fused_multiply_add(a[:, :, kk:kk + 1].expand(batch, m, n).contiguous(),
                                     b[:, kk:kk + 1, :].expand(batch, m, n).contiguous(), acc)
        out = acc if out is None else out + acc
    assert out is not None
    return out


# MLAS's `MlasExpConstants` as its AVX-512F sum-of-exponentials kernel reads them: the lower clamp, the rounding
# bias (1.5 x 2^23), log2(e), ln 2 high and low, poly_0 .. poly_4, poly_56
MLAS_EXP = torch.tensor([-103.9720840454, 12582912.0, 1.44269504088896341, -6.93145752e-1, -1.42860677e-6,
                         float.fromhex("0x1.694000p-10"), float.fromhex("0x1.125edcp-7"),
                         float.fromhex("0x1.555b5ap-5"), float.fromhex("0x1.555450p-3"),
                         float.fromhex("0x1.fffff6p-2"), 1.0], dtype=torch.float32)


def eager_softmax_mlas(x: torch.Tensor) -> torch.Tensor:
    """`hw_softmax_mlas` on torch's ops, for [rows, d] float32 `x`: the exponentials by exact fused multiply-adds,
    2^m applied in float64 and rounded once (as vscalefps), the 16 lanes summed chunk by chunk."""
    from .onednn import fused_multiply_add

    rows, d = x.shape
    lower, bias, log2e, ln2_high, ln2_low, *poly = (torch.full_like(x, float(c)) for c in MLAS_EXP)
    v = torch.maximum(lower, x - x.max(dim=1, keepdim=True).values)
    biased = fused_multiply_add(v, log2e, bias)
    m = biased - bias
    v = fused_multiply_add(m, ln2_low, fused_multiply_add(m, ln2_high, v))
    p = fused_multiply_add(poly[0], v, poly[1])
    for c in (*poly[2:], poly[-1]):
        p = fused_multiply_add(p, v, c)
    e = (p.double() * torch.pow(2.0, m.double())).float()
    chunks = torch.cat([e, torch.zeros(rows, -d % 16)], 1).view(rows, -1, 16)
    lanes = torch.zeros(rows, 16)
    for chunk in chunks.unbind(1):
        lanes = lanes + chunk
    y = lanes[:, 8:] + lanes[:, :8]
    total = ((y[:, 0] + y[:, 1]) + (y[:, 2] + y[:, 3])) + ((y[:, 4] + y[:, 5]) + (y[:, 6] + y[:, 7]))
    return e * (torch.tensor(1.0) / total).unsqueeze(1)


def _special_values(generator: torch.Generator) -> torch.Tensor:
    """Values where an implementation could differ: ties of every parity, signed zeros, the clamp bounds and
    beyond, infinities, NaN, huge and tiny numbers, then random ones at several magnitudes."""
    ties = torch.arange(-300, 301, dtype=torch.float32) + 0.5
    specials = torch.tensor([0.0, -0.0, 127.0, -128.0, 255.0, 127.49999, -127.5, -128.5, 255.5, 1e30, -1e30, 1e-30,
                             float("inf"), float("-inf"), float("nan"), 2.0**24 + 1, -(2.0**24) - 3])
    random = torch.cat([torch.randn(4096, generator=generator) * scale for scale in (1.0, 100.0, 1e5, 3e6)])
    return torch.cat([ties, specials, random, ties.neg()])


def _self_check(lib: ctypes.CDLL) -> str | None:
    """None when every function equals its eager chain bit for bit on this machine (both loop shapes of the
    requantization, every optional step, one and several threads), else the first disagreement."""
    generator = torch.Generator().manual_seed(16)
    values = _special_values(generator)
    channels = 7
    count = values.numel() // channels * channels
    flat = values[:count]
    for threads in (1, max(2, torch.get_num_threads())):
        for inv_scale, bounds in ((1 / 0.37, (-128.0, 127.0)), (3.0, (0.0, 255.0)), (0.5, None)):
            low, high = bounds or (None, None)
            want = eager_quantize(flat, torch.empty_like(flat), inv_scale, low, high)
            got = torch.empty_like(flat)
            lib.hw_quantize(flat.data_ptr(), got.data_ptr(), count, inv_scale, *(bounds or _UNBOUNDED), threads)
            if not same_bits(got, want):
                return f"quantize at inverse scale {inv_scale}, bounds {bounds}"
        for offset, low, dtype in ((128, -128, torch.uint8), (0, 0, torch.uint8), (255, -255, torch.uint8),
                                   (-128, 0, torch.int8), (0, -128, torch.int8), (-100, -28, torch.int8)):
            codes = torch.randint(low, low + 256, (100_000,), generator=generator).float()
            for function, given in ((lib.hw_to_bytes, codes), (lib.hw_to_bytes_f64, codes.double())):
                want_bytes = eager_to_bytes(given, torch.empty(codes.shape, dtype=dtype), offset)
                got_bytes = torch.empty_like(want_bytes)
                function(given.data_ptr(), got_bytes.data_ptr(), given.numel(), float(offset), threads)
                if not torch.equal(got_bytes, want_bytes):
                    return f"byte conversion of {given.dtype} codes at offset {offset}"
        for inv_scale, bounds, offset in ((1 / 0.37, (-128.0, 127.0), 128), (3.0, (0.0, 255.0), 0),
                                          (0.5, (-20.0, 20.0), 20)):
            want_bytes = eager_to_bytes(eager_quantize(flat, torch.empty_like(flat), inv_scale, *bounds),
                                        torch.empty(flat.shape, dtype=torch.uint8), offset)
            got_bytes = torch.empty_like(want_bytes)
            lib.hw_quantize_to_bytes(flat.data_ptr(), got_bytes.data_ptr(), count, inv_scale, *bounds, float(offset),
                                     threads)
            if not torch.equal(got_bytes[~flat.isnan()], want_bytes[~flat.isnan()]):
                return f"quantize to bytes at inverse scale {inv_scale}, bounds {bounds}"
        for inner in (1, 5):
            shape = (count // (channels * inner), channels, inner)
            # an accumulator holds integers (odd ones times a power of two are ties), with the specials kept
            acc = flat[: math.prod(shape)].reshape(shape) * 3.0
            acc = torch.where(acc.isfinite(), acc.round(), acc)
            # accumulators near 2^22, where float32 steps by 0.5, nearly cancelled by a bias after scaling: whether
            # acc + bias or bias + zero point is added first then shows in the codes
            near = 4194304.0 + (torch.arange(acc.numel()) % 200 - 100).float().reshape(shape)
            per_channel = torch.randn(channels, 1, generator=generator)
            halves = torch.randint(-9, 9, (channels, 1), generator=generator) + 0.5
            for values, bias, bias_after, pre, post, scale, multiplier in (
                    # small multipliers; powers of two (odd products are ties); near one; a single multiplier
                    (acc, per_channel.round(), None, None, None, 0.0173,
                     torch.rand(channels, 1, generator=generator) / 20),
                    (acc, None, per_channel * 0.3, 4.25, -4.0, None,
                     2.0 ** -torch.randint(0, 9, (channels, 1), generator=generator).float()),
                    (acc, per_channel.round(), halves, None, 3.0, 0.5,
                     0.5 + torch.rand(channels, 1, generator=generator)),
                    (acc, None, per_channel, 1.5, None, None, torch.full((1, 1), 0.75)),
                    (near, None, torch.full((channels, 1), -4194303.75), 0.375, None, None, torch.ones(channels, 1))):
                want = eager_requantize(values.clone(), bias, multiplier, bias_after, pre, post, -127.0, 127.0,
                                        scale)
                got = values.clone()
                _requantize(lib, got, inner, channels, bias, multiplier, bias_after, pre, post, -127.0, 127.0, scale,
                            threads)
                if not same_bits(got, want):
                    return f"requantize with inner {inner}, bias {bias is not None}, steps {pre, post}"
        # sums of every pair of special values (signed zeros, NaN, infinities, cancellations)
        other = values.roll(1).neg_()
        other[::3] = values[::3]
        other[1::3] = -0.0
        want = eager_add_relu(values.clone(), other)
        got = values.clone()
        lib.hw_add_relu(got.data_ptr(), other.data_ptr(), got.numel(), threads)
        if not same_bits(got, want):
            return "add then ReLU"
    return (_check_edits(lib) or _check_requantize_edits(lib) or _check_requantize_wide(lib)
            or _check_sampling(lib) or _check_layer_norm(lib) or _check_tanh(lib) or _check_logistic(lib)
            or _check_erf(lib) or _check_gelu(lib) or _check_skip_layer_norm(lib) or _check_matmul(lib)
            or _check_softmax(lib))


def _check_softmax(lib: ctypes.CDLL) -> str | None:
    """hw_softmax_mlas against `eager_softmax_mlas`: widths 1 to 100 (the lanes' tail), spreads up to 300 (the
    exponentials' subnormal range and the clamp), rows with an infinity or a NaN, one thread and several."""
    generator = torch.Generator().manual_seed(23)
    for d in (1, 5, 16, 17, 100):
        x = torch.randn(64, d, generator=generator) * torch.logspace(-2, 2.5, 64).unsqueeze(1)
        x[0, 0], x[1, -1], x[2, 0] = float("inf"), float("-inf"), float("nan")
        want = eager_softmax_mlas(x)
        for threads in (1, max(2, torch.get_num_threads())):
            got = torch.empty_like(x)
            lib.hw_softmax_mlas(x.data_ptr(), got.data_ptr(), 64, d, MLAS_EXP.data_ptr(), threads)
            if not same_bits(got, want):
                return f"MLAS's softmax of width {d}"
    return None


def _check_matmul(lib: ctypes.CDLL) -> str | None:
    """hw_matmul_fma against `eager_matmul_fma`: whole chains and blocks of 64 (a K of 150: a partial last block),
    products that cancel (signed zeros), several batches and threads."""
    generator = torch.Generator().manual_seed(21)
    for batch, m, k, n, block in ((3, 5, 150, 7, 64), (2, 4, 9, 3, 0), (1, 1, 40, 6, 0)):
        a = torch.randn(batch, m, k, generator=generator) * torch.logspace(-2, 2, k)
        b = torch.randn(batch, k, n, generator=generator)
        a[0, 0, :] = 0.0
        b[0, :, 0] = -b[0, :, 0].abs()
        want = eager_matmul_fma(a, b, block)
        for threads in (1, max(2, torch.get_num_threads())):
            got = torch.empty(batch, m, n)
            lib.hw_matmul_fma(a.data_ptr(), b.data_ptr(), got.data_ptr(), batch, m, k, n, block, threads)
            if not same_bits(got, want):
                return f"the FMA-chain matmul of [{m}, {k}] x [{k}, {n}], block {block}"
    return None


def _check_unary(function: Any, constants: torch.Tensor, eager: Any, values: torch.Tensor) -> bool:
    """An elementwise native pass (x, y, n, constants, threads) against its eager chain, one thread and several."""
    want = eager(values)
    for threads in (1, max(2, torch.get_num_threads())):
        got = torch.empty_like(values)
        function(values.data_ptr(), got.data_ptr(), values.numel(), constants.data_ptr(), threads)
        if not same_bits(got, want):
            return False
    return True


def _check_tanh(lib: ctypes.CDLL) -> str | None:
    """hw_tanh_mlas against `eager_tanh_mlas`: the special values, the clamp's edges, a dense sweep of -12..12."""
    values = torch.cat([_special_values(torch.Generator().manual_seed(20)), torch.linspace(-12.0, 12.0, 200_001),
                        torch.tensor([-9.0, 9.0, -8.999999, 8.999999, 1e-30, -1e-30])])
    return None if _check_unary(lib.hw_tanh_mlas, MLAS_TANH, eager_tanh_mlas, values) else "MLAS's tanh"


def _check_logistic(lib: ctypes.CDLL) -> str | None:
    """hw_logistic_mlas against `eager_logistic_mlas`: the special values, the clamp's edges, a dense sweep of
    -24..24."""
    values = torch.cat([_special_values(torch.Generator().manual_seed(21)), torch.linspace(-24.0, 24.0, 200_001),
                        torch.tensor([-18.0, 18.0, -17.999998, 17.999998, 1e-30, -1e-30])])
    return None if _check_unary(lib.hw_logistic_mlas, MLAS_LOGISTIC, eager_logistic_mlas, values) \
        else "MLAS's logistic"


def _check_erf(lib: ctypes.CDLL) -> str | None:
    """hw_erf_mlas against `eager_erf_mlas`: the special values, the split and its neighbours, a dense sweep of
    -12..12 (both branches, the exponential's lower bound), subnormals."""
    split = MLAS_ERF[:1]
    near = torch.cat([split, torch.nextafter(split, torch.zeros(1)), torch.nextafter(split, torch.ones(1))])
    values = torch.cat([_special_values(torch.Generator().manual_seed(27)), torch.linspace(-12.0, 12.0, 200_001),
                        near, -near, torch.tensor([1e-40, -1e-40, 1e-45, 3.0e38, -3.0e38])])
    return None if _check_unary(lib.hw_erf_mlas, MLAS_ERF, eager_erf_mlas, values) else "MLAS's erf"


def _check_skip_layer_norm(lib: ctypes.CDLL) -> str | None:
    """hw_skip_layer_norm_ort against `eager_skip_layer_norm_ort`: widths 1 to 768, rows near constant and offset,
    with and without beta and bias, one thread and several."""
    generator = torch.Generator().manual_seed(30)
    for width in (1, 7, 64, 768):
        x = torch.randn(40, width, generator=generator) * torch.logspace(-3, 3, 40).unsqueeze(1)
        x[0] = 5.0
        skip = torch.randn(40, width, generator=generator) + 100.0 * torch.randn(40, 1, generator=generator)
        gamma, beta, bias = (torch.randn(width, generator=generator) for _ in range(3))
        for b, c in ((beta, None), (None, bias), (beta, bias)):
            want = eager_skip_layer_norm_ort(x, skip, gamma, b, c, 1e-12)
            for threads in (1, max(2, torch.get_num_threads())):
                got = torch.empty_like(x)
                lib.hw_skip_layer_norm_ort(x.data_ptr(), skip.data_ptr(), None if c is None else c.data_ptr(),
                                           gamma.data_ptr(), None if b is None else b.data_ptr(), got.data_ptr(),
                                           40, width, 1e-12, threads)
                if not same_bits(got, want):
                    return f"onnxruntime's SkipLayerNormalization of width {width}"
    return None


def _check_gelu(lib: ctypes.CDLL) -> str | None:
    """hw_gelu_ort against `eager_gelu_ort`: both forms, with a bias along rows and without, rows shorter and longer
    than the pass's chunks, one thread and several."""
    generator = torch.Generator().manual_seed(29)
    for erf in (False, True):
        for shape in ((3, 5), (70, 130), (2, 9000)):
            x = torch.randn(shape, generator=generator) * 4
            x[0, 0], x[-1, -1] = float("nan"), float("inf")
            for bias in (None, torch.randn(shape[-1], generator=generator)):
                want = eager_gelu_ort(x, bias, erf)
                for threads in (1, max(2, torch.get_num_threads())):
                    got = torch.empty_like(x)
                    lib.hw_gelu_ort(x.data_ptr(), None if bias is None else bias.data_ptr(), got.data_ptr(),
                                    x.numel(), 0 if bias is None else bias.numel(), int(erf),
                                    (_GELU_ERF if erf else _GELU_TANH).data_ptr(), threads)
                    if not same_bits(got, want):
                        return f"onnxruntime's {'Gelu' if erf else 'FastGelu'} of {list(shape)}"
    return None


def _check_layer_norm(lib: ctypes.CDLL) -> str | None:
    """hw_layer_norm_ort against `eager_layer_norm_ort`: widths 8 to 768, rows near constant (a variance that
    cancels), large offsets, with and without a bias, one thread and several."""
    generator = torch.Generator().manual_seed(19)
    for c in (8, 32, 120, 768):
        x = torch.randn(40, c, generator=generator) * torch.logspace(-3, 3, 40).unsqueeze(1)
        x[:8] += torch.randn(8, 1, generator=generator) * 1e4  # offsets far larger than the spread
        x[8] = 1.5  # a constant row: the variance is zero
        scale, bias = torch.randn(c, generator=generator), torch.randn(c, generator=generator)
        for b in (bias, None):
            want = eager_layer_norm_ort(x, scale, b, 1e-5)
            for threads in (1, max(2, torch.get_num_threads())):
                got = torch.empty_like(x)
                lib.hw_layer_norm_ort(x.data_ptr(), scale.data_ptr(), None if b is None else b.data_ptr(),
                                      got.data_ptr(), x.shape[0], c, 1e-5, threads)
                if not same_bits(got, want):
                    return f"onnxruntime's LayerNormalization of width {c}, bias {b is not None}"
    return None


def _check_requantize_wide(lib: ctypes.CDLL) -> str | None:
    """hw_requantize_wide against `eager_requantize_wide`: both loop shapes, float64 and float32 arithmetic,
    accumulators past 2^24 and near 2^53 (odd ones: the float32 conversion rounds them), ties after scaling, bias
    codes past 2^24, every optional step, special multipliers (a qparams fault's NaN, infinities, zero), one thread
    and several."""
    generator = torch.Generator().manual_seed(18)
    channels = 7
    for inner in (1, 5):
        shape = (1200, channels, inner)
        magnitude = 2.0 ** torch.randint(0, 52, shape, generator=generator).double()
        acc = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(magnitude).round_()
        acc.view(-1)[:600] = torch.arange(-300, 300, dtype=torch.float64) * 2 + 1  # odd: ties at multiplier 1/2
        # one off a tie at multiplier 2^-20 (k + 1/2 +- 2^-20): float64 rounds it away from the tie, a float32
        # conversion (which drops the 1) to the even code
        ties = (torch.arange(-128, 128, dtype=torch.float64) * 2 + 1) * 2.0**19
        acc.view(-1)[600:1112] = torch.cat([ties + 1, ties - 1])
        bias = torch.randint(-(1 << 30), 1 << 30, (channels, 1), generator=generator).double()
        multipliers = (torch.rand(channels, 1, generator=generator) / 2 ** 20,
                       2.0 ** -torch.randint(0, 30, (channels, 1), generator=generator).float(),
                       torch.tensor([[0.5], [float("nan")], [float("inf")], [-float("inf")], [0.0], [-0.0], [3.0]]))
        for in_float32 in (False, True):
            for multiplier, bias_, bias_after, pre, post, scale in (
                    (multipliers[0], bias, None, None, None, 0.0173),
                    (multipliers[1], None, torch.randn(channels, 1, generator=generator) * 3, 4.25, -4.0, None),
                    (multipliers[2], bias, torch.full((channels, 1), 0.5), None, 3.0, 0.5),
                    (torch.full((1, 1), 2.0 ** -24), bias, None, 1.5, None, None),
                    (torch.full((channels, 1), 2.0 ** -20), None, None, None, None, 0.25)):
                want = eager_requantize_wide(acc.clone(), bias_, multiplier, bias_after, pre, post, -127.0, 127.0,
                                             scale, in_float32)
                arrays = _arrays_wide(channels, bias_, multiplier, bias_after)
                for threads in (1, max(2, torch.get_num_threads())):
                    got = torch.empty(shape)
                    lib.hw_requantize_wide(acc.data_ptr(), got.data_ptr(), acc.numel(), channels, inner,
                                           *(t.data_ptr() for t in arrays), -0.0 if pre is None else pre,
                                           -0.0 if post is None else post, -127.0, 127.0,
                                           1.0 if scale is None else scale, in_float32, threads)
                    if not same_bits(got, want):
                        return (f"wide requantize with inner {inner}, float32 arithmetic {in_float32}, bias "
                                f"{bias_ is not None}, steps {pre, post}")
    return None


def _check_edits(lib: ctypes.CDLL) -> str | None:
    """hw_apply_edit against `inject.apply_edit` on torch's ops: widths 4 to 32, signed and unsigned, zero points,
    codes and values (code x scale), every kind of fault, int32 and int64 fault words, enough faults for threads."""
    from .inject import Edit, apply_edit  # inject calls this module: imported here, once

    generator = torch.Generator().manual_seed(16)
    for bits, signed, zero_point, scale in ((8, True, 0, 1.0), (8, True, 0, 0.0173), (8, False, 128, 0.05),
                                            (4, True, 0, 0.31), (16, True, 3, 1.0), (4, False, 7, 1.0),
                                            (32, True, 0, 1.0), (24, False, 5, 1.0)):
        half = 1 << (bits - 1)
        low, high = (-half, half - 1) if signed else (-zero_point, (1 << bits) - 1 - zero_point)
        codes = torch.randint(low, high + 1, (20000,), generator=generator).float()
        flat = codes * scale if scale != 1.0 else codes
        linear = torch.randperm(20000, generator=generator)[:9000]
        for dtype in (torch.int32, torch.int64):
            word = torch.randint(0, 1 << min(bits, 31), (3, 9000), generator=generator).to(dtype)
            for keep, set_, flip in ((None, None, word[2]), (~word[0], word[0] & word[1], None),
                                     (~word[0], None, word[2])):
                edit = Edit(linear, keep, set_, flip, scale)
                want, got = flat.clone(), flat.clone()
                with disabled():
                    apply_edit(want, edit, bits, zero_point, signed)
                status = lib.hw_apply_edit(got.data_ptr(), got.numel(), linear.data_ptr(), len(linear),
                                           *(None if t is None else t.data_ptr() for t in (keep, set_, flip)),
                                           dtype == torch.int64, scale == 1.0, scale, bits, zero_point, signed,
                                           max(2, torch.get_num_threads()))
                if status != 0 or not same_bits(got, want):
                    return (f"fault edits of {bits}-bit codes (signed {signed}, zero point {zero_point}, scale "
                            f"{scale}, {dtype} words)")
    return None


def _check_requantize_edits(lib: ctypes.CDLL) -> str | None:
    """hw_requantize_edit_relu against `eager_requantize_edit_relu`: both loop shapes, codes and values (code x
    scale), signed and unsigned codes with zero points, a zero point added before rounding, every kind of fault,
    int32 and int64 fault words, one thread and several."""
    from .inject import Edit  # inject calls this module: imported here, once

    generator = torch.Generator().manual_seed(17)
    channels = 7
    for inner in (1, 5):
        shape = (2000, channels, inner)
        acc = torch.randint(-3000, 3001, shape, generator=generator).float()
        bias = torch.randint(-500, 501, (channels, 1), generator=generator).float()
        multiplier = torch.rand(channels, 1, generator=generator) / 20
        arrays = _arrays(channels, bias, multiplier, None)
        linear = torch.randperm(acc.numel(), generator=generator)[:9000]
        for bits, signed, zero, scale, zero_first, dtype in (
                (8, True, 0, None, False, torch.int32), (8, True, 0, 0.0173, False, torch.int64),
                (8, False, 100, 0.05, False, torch.int32), (8, False, 37, None, True, torch.int64),
                (4, True, 0, 0.31, False, torch.int32)):
            half = 1 << (bits - 1)
            low, high = (-(half - 1), half - 1) if signed else (-zero, (1 << bits) - 1 - zero)
            pre, post = (float(zero), float(-zero)) if zero_first else (-0.0, -0.0)
            word = torch.randint(0, 1 << bits, (3, len(linear)), generator=generator).to(dtype)
            for keep, set_, flip in ((None, None, word[2]), (~word[0], word[0] & word[1], None),
                                     (~word[0], None, word[2])):
                want = eager_requantize_edit_relu(acc.clone(), bias, multiplier, None, pre if zero_first else None,
                                                  post if zero_first else None, low, high, scale,
                                                  Edit(linear, keep, set_, flip, 1.0), bits, zero, signed)
                for threads in (1, max(2, torch.get_num_threads())):
                    got, faulty = acc.clone(), torch.empty(len(linear))  # held while the C function runs
                    status = lib.hw_requantize_edit_relu(
                        got.data_ptr(), got.numel(), channels, inner, *(t.data_ptr() for t in arrays), pre, post,
                        low, high, max(low, 0.0), 1.0 if scale is None else scale, linear.data_ptr(), len(linear),
                        *(None if t is None else t.data_ptr() for t in (keep, set_, flip)), dtype == torch.int64,
                        bits, zero, signed, faulty.data_ptr(), threads)
                    if status != 0 or not same_bits(got, want):
                        return (f"requantize, act edits and ReLU with inner {inner} ({bits}-bit codes, signed "
                                f"{signed}, zero point {zero}, scale {scale}, {dtype} words)")
    return None


def _check_sampling(lib: ctypes.CDLL) -> str | None:
    """hw_gap_positions against `eager_gap_positions` (rare, common and near-certain draws, gaps clamped to the
    total, log(1 - u) = 0), hw_compose_place against `inject.compose_canonical` then `layout.place` (row-major
    and channels-last, sizes powers of two and not, several faults on a code, int32 and int64 words), and
    hw_decode_faults against `eager_decode_faults` (codes per image a power of two and not, a weight target, a target
    without faults, one thread and several)."""
    from .inject import compose_canonical  # inject calls this module: imported here, once
    from .layout import place

    generator = torch.Generator().manual_seed(16)
    for p, total, last in ((1e-3, 10**9, -1), (0.3, 10**6, 17), (1e-12, 10**4, -1), (0.999, 10**5, 5)):
        logged = torch.rand(20000, generator=generator, dtype=torch.float64).neg_().add_(1.0)
        logged[:4] = torch.tensor([1.0, 1.0 - 2.0**-53, 2.0**-1074, 0.5])
        logged.log_()
        want = eager_gap_positions(logged.clone(), math.log1p(-p), total, last)
        got = torch.empty_like(want)
        lib.hw_gap_positions(logged.data_ptr(), logged.numel(), math.log1p(-p), float(total), last, got.data_ptr())
        if not torch.equal(got, want):
            return f"fault positions at p={p}"
    for shape, strides in (((3, 16, 8, 8), None), ((3, 16, 8, 8), channels_last_strides((3, 16, 8, 8))),
                           ((2, 6, 7, 5), channels_last_strides((2, 6, 7, 5))), ((4, 30), None),
                           ((2, 3, 4, 5, 6), channels_last_strides((2, 3, 4, 5, 6)))):
        strides = strides or contiguous_strides(shape)
        for bits, dtype in ((8, torch.int32), (16, torch.int32), (32, torch.int64)):
            drawn = torch.randperm(math.prod(shape) * bits, generator=generator)[: math.prod(shape) * bits // 3]
            drawn = drawn.sort().values
            linear, bit = drawn // bits, drawn % bits
            composed = compose_canonical(linear, bit, 0, 1.0, dtype)
            want_offsets, want_masks = place(composed.linear.clone(), shape, strides), composed.flip
            offsets, masks = torch.empty_like(linear), torch.empty(len(linear), dtype=dtype)
            codes = lib.hw_compose_place(linear.data_ptr(), bit.data_ptr(), len(linear), *_channels_spatial(
                shape, strides), offsets.data_ptr(), masks.data_ptr(), dtype == torch.int64)
            assert want_masks is not None
            if not (torch.equal(offsets[:codes], want_offsets) and torch.equal(masks[:codes], want_masks)):
                return f"composing and placing {bits}-bit faults in a tensor of shape {shape}, strides {strides}"
    # a draw over whole codes of four targets: row-major codes of 16 and 10 per image, a weight tensor, one with none
    for shift, threads in ((3, 1), (3, max(2, torch.get_num_threads())), (0, 1), (5, 2)):
        numels, images = [16, 10, 0, 7], [300, 4000, 1, 2]
        sizes = [(n if n else 50) * i << shift for n, i in zip(numels, images)]
        ends = [sum(sizes[: t + 1]) for t in range(len(sizes))]
        flat = torch.randperm(ends[-1], generator=generator)[: ends[-1] // 3].sort().values
        flat = flat[(flat < ends[2]) | (flat >= ends[3])]  # the fourth target draws nothing
        bounds = [0, *torch.searchsorted(flat, torch.tensor(ends)).tolist()]
        firsts = [(end - size) >> shift for end, size in zip(ends, sizes)]
        decoded = eager_decode_faults(flat, bounds, firsts, numels, shift)
        out = torch.empty(4, flat.numel(), dtype=torch.int64)
        table = torch.tensor([*bounds, *firsts, *numels], dtype=torch.int64)
        lib.hw_decode_faults(flat.data_ptr(), len(firsts), table.data_ptr(), table[len(firsts) + 1:].data_ptr(),
                             table[2 * len(firsts) + 1:].data_ptr(), shift, *(row.data_ptr() for row in out), threads)
        if not all(torch.equal(got, expected) for got, expected in zip(out, decoded)):
            return f"decoding fault positions over codes of {1 << shift} bits"
    return None


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as bit patterns (so -0.0 differs from 0.0), NaNs of any payload counted equal."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


# -- what the engine calls -------------------------------------------------------------------------------------------
def _plain(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """A CPU tensor of `dtype` the C functions may read and write as one flat array."""
    return (t.dtype == dtype and t.device.type == "cpu" and not t.requires_grad
            and is_dense(tuple(t.shape), t.stride()))


def quantize(x: torch.Tensor, out: torch.Tensor, inv_scale: float, low: float | None, high: float | None) -> bool:
    """out = clamp(round(x * inv_scale), low, high) (no clamp where low is None), as `eager_quantize`; False, having
    done nothing, where the fused pass does not apply."""
    lib = _active()
    if (lib is None or not _plain(x) or not _plain(out) or x.shape != out.shape or x.stride() != out.stride()
            or x.numel() == 0):
        return False
    bounds = _UNBOUNDED if low is None or high is None else (low, high)
    lib.hw_quantize(x.data_ptr(), out.data_ptr(), x.numel(), inv_scale, *bounds, torch.get_num_threads())
    increment_version(out)  # written in place, as torch's ops count it
    return True


def quantize_to_bytes(x: torch.Tensor, out: torch.Tensor, inv_scale: float, low: float | None,
                      high: float | None, offset: int) -> bool:
    """out (uint8 or int8) = clamp(round(x * inv_scale), low, high) + offset, as `eager_quantize` then
    `eager_to_bytes` (the codes + offset must fit out's dtype); False, having done nothing, where the fused pass
    does not apply."""
    lib = _active()
    if (lib is None or not _plain(x) or out.dtype not in (torch.uint8, torch.int8) or out.device.type != "cpu"
            or x.shape != out.shape or x.stride() != out.stride() or x.numel() == 0):
        return False
    bounds = _UNBOUNDED if low is None or high is None else (low, high)
    lib.hw_quantize_to_bytes(x.data_ptr(), out.data_ptr(), x.numel(), inv_scale, *bounds, float(offset),
                             torch.get_num_threads())
    increment_version(out)  # written in place, as torch's ops count it
    return True


def to_bytes(x: torch.Tensor, out: torch.Tensor, offset: int) -> bool:
    """out (uint8 or int8) = x + offset, for integer-valued float32 or float64 codes that land in out's range, as
    `eager_to_bytes`; False, having done nothing, where the fused pass does not apply."""
    lib = _active()
    wide = x.dtype == torch.float64 and _plain(x, torch.float64)
    if (lib is None or not (_plain(x) or wide) or out.dtype not in (torch.uint8, torch.int8)
            or out.device.type != "cpu" or x.shape != out.shape or x.stride() != out.stride() or x.numel() == 0):
        return False
    function = lib.hw_to_bytes_f64 if wide else lib.hw_to_bytes
    function(x.data_ptr(), out.data_ptr(), x.numel(), float(offset), torch.get_num_threads())
    increment_version(out)  # written in place, as torch's ops count it
    return True


@lru_cache(maxsize=1024)
def _broadcast_dim(acc_shape: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> tuple[int, int] | None:
    """(the dim of a tensor of `acc_shape` that tensors of `shapes` broadcast along, its size) as torch's
    broadcasting aligns them: each has one dim of more than one value matching that dim, or a single value; None
    where they are anything else or disagree."""
    found: tuple[int, int] | None = None
    for shape in shapes:
        if len(shape) > len(acc_shape):
            return None
        wide = [d for d, size in enumerate(shape) if size != 1]
        if not wide:
            continue
        if len(wide) > 1:
            return None
        dim = len(acc_shape) - len(shape) + wide[0]
        if acc_shape[dim] != shape[wide[0]] or (found is not None and found != (dim, shape[wide[0]])):
            return None
        found = (dim, shape[wide[0]])
    return found or (0, 1)


@lru_cache(maxsize=256)
def _identity_add(channels: int) -> torch.Tensor:
    return torch.full((channels,), -0.0)  # x + -0.0 == x for every x (x + 0.0 is not: -0.0 + 0.0 == 0.0)


def requantize(acc: torch.Tensor, bias: torch.Tensor | None, multiplier: torch.Tensor,
               bias_after: torch.Tensor | None, pre_round: float | None, post_round: float | None,
               low: float, high: float, scale: float | None) -> bool:
    """`eager_requantize` on `acc` in place (bias, multiplier and bias_after broadcast over it: per channel, or a
    single value); False, having done nothing, where the fused pass does not apply."""
    lib = _active()
    if lib is None or not _plain(acc) or acc.numel() == 0:
        return False
    prepared = _prepared(tuple(acc.shape), bias, multiplier, bias_after)
    if prepared is None:
        return False
    dim, channels, arrays = prepared
    lib.hw_requantize(acc.data_ptr(), acc.numel(), channels, acc.stride(dim) if channels > 1 else 1,
                      *(t.data_ptr() for t in arrays), -0.0 if pre_round is None else pre_round,
                      -0.0 if post_round is None else post_round, low, high, 1.0 if scale is None else scale,
                      torch.get_num_threads())
    increment_version(acc)  # written in place, as torch's ops count it
    return True


# A layer's requantization parameters, checked and laid out for hw_requantize once per (acc shape, tensors and their
# versions: a qparams fault edits a multiplier in place, which bumps its version): (the tensors, the result).
_PREPARED: dict[tuple[Any, ...], tuple[tuple[torch.Tensor | None, ...], tuple[int, int, list[torch.Tensor]] | None]] \
    = {}


def _prepared(acc_shape: tuple[int, ...], *tensors: torch.Tensor | None
              ) -> tuple[int, int, list[torch.Tensor]] | None:
    """(the dim the per-channel tensors broadcast along, its size, the three arrays hw_requantize reads: absent
    steps given their identity, a single value spread over the channels), or None where the pass does not apply."""
    try:
        key = (acc_shape, *((id(t), t._version) if t is not None else None for t in tensors))
    except RuntimeError:  # an inference tensor has no version counter: nothing to key it on
        key = None
    hit = _PREPARED.get(key) if key is not None else None
    if hit is not None and all(a is b for a, b in zip(hit[0], tensors)):
        return hit[1]
    result: tuple[int, int, list[torch.Tensor]] | None = None
    if all(t is None or (_plain(t) and t.is_contiguous()) for t in tensors):
        found = _broadcast_dim(acc_shape, tuple(tuple(t.shape) for t in tensors if t is not None))
        if found is not None:
            dim, channels = found
            result = (dim, channels, _arrays(channels, *tensors))
    if key is not None:
        if len(_PREPARED) > 4096:  # tensors come and go: keep the memo bounded
            _PREPARED.clear()
        _PREPARED[key] = (tensors, result)
    return result


def _arrays(channels: int, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    """hw_requantize's three per-channel arrays: an absent step given its identity, one value spread over the
    channels."""
    return [_identity_add(channels) if t is None else t.reshape(1).expand(channels).contiguous()
            if t.numel() == 1 and channels > 1 else t for t in tensors]


def _requantize(lib: ctypes.CDLL, acc: torch.Tensor, inner: int, channels: int, bias: torch.Tensor | None,
                multiplier: torch.Tensor, bias_after: torch.Tensor | None, pre_round: float | None,
                post_round: float | None, low: float, high: float, scale: float | None, threads: int) -> None:
    """hw_requantize with every absent step given its identity. In any dense layout, the element at memory offset
    i is in channel (i // inner) % channels, where inner is the channel dim's stride."""
    arrays = _arrays(channels, bias, multiplier, bias_after)  # held while the C function reads them
    lib.hw_requantize(acc.data_ptr(), acc.numel(), channels, inner, *(t.data_ptr() for t in arrays),
                      -0.0 if pre_round is None else pre_round, -0.0 if post_round is None else post_round,
                      low, high, 1.0 if scale is None else scale, threads)


def requantize_wide(acc: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, multiplier: torch.Tensor,
                    bias_after: torch.Tensor | None, pre_round: float | None, post_round: float | None,
                    low: float, high: float, scale: float | None, in_float32: bool) -> bool:
    """`eager_requantize_wide` of a float64 accumulator into float32 `out` (laid out like acc); False, having done
    nothing, where the fused pass does not apply."""
    lib = _active()
    if (lib is None or acc.dtype != torch.float64 or acc.device.type != "cpu" or acc.requires_grad
            or not _plain(out) or out.shape != acc.shape or out.stride() != acc.stride() or acc.numel() == 0
            or not is_dense(tuple(acc.shape), acc.stride())
            # float32 arithmetic reads float32 multipliers and biases (torch would compute a float64 one's product
            # in float64)
            or (in_float32 and any(t is not None and t.dtype != torch.float32 for t in (multiplier, bias_after)))):
        return False
    prepared = _prepared_wide(tuple(acc.shape), bias, multiplier, bias_after)
    if prepared is None:
        return False
    dim, channels, arrays = prepared
    lib.hw_requantize_wide(acc.data_ptr(), out.data_ptr(), acc.numel(), channels,
                           acc.stride(dim) if channels > 1 else 1, *(t.data_ptr() for t in arrays),
                           -0.0 if pre_round is None else pre_round, -0.0 if post_round is None else post_round,
                           low, high, 1.0 if scale is None else scale, in_float32, torch.get_num_threads())
    increment_version(out)
    return True


# hw_requantize_wide's float64 arrays per (acc shape, tensors and their versions), as `_PREPARED`
_PREPARED_WIDE: dict[tuple[Any, ...], tuple[tuple[torch.Tensor | None, ...],
                                             tuple[int, int, list[torch.Tensor]] | None]] = {}


def _prepared_wide(acc_shape: tuple[int, ...], *tensors: torch.Tensor | None
                   ) -> tuple[int, int, list[torch.Tensor]] | None:
    try:
        key = (acc_shape, *((id(t), t._version) if t is not None else None for t in tensors))
    except RuntimeError:
        key = None
    hit = _PREPARED_WIDE.get(key) if key is not None else None
    if hit is not None and all(a is b for a, b in zip(hit[0], tensors)):
        return hit[1]
    result: tuple[int, int, list[torch.Tensor]] | None = None
    if all(t is None or (t.dtype in (torch.float32, torch.float64) and t.device.type == "cpu"
                         and not t.requires_grad and t.is_contiguous()) for t in tensors):
        found = _broadcast_dim(acc_shape, tuple(tuple(t.shape) for t in tensors if t is not None))
        if found is not None:
            dim, channels = found
            result = (dim, channels, _arrays_wide(channels, *tensors))
    if key is not None:
        if len(_PREPARED_WIDE) > 4096:
            _PREPARED_WIDE.clear()
        _PREPARED_WIDE[key] = (tensors, result)
    return result


def _arrays_wide(channels: int, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    """hw_requantize_wide's three per-channel float64 arrays (every float32 value held exactly)."""
    return [torch.full((channels,), -0.0, dtype=torch.float64) if t is None
            else t.double().reshape(-1).expand(channels).contiguous() if t.numel() == 1
            else t.double().reshape(channels).contiguous() for t in tensors]


def add_relu(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a = relu(a + b) in place, as `eager_add_relu`, for a and b of one shape and layout; False, having done
    nothing, where the fused pass does not apply."""
    lib = _active()
    if (lib is None or not _plain(a) or not _plain(b) or a.shape != b.shape or a.stride() != b.stride()
            or a.numel() == 0):
        return False
    lib.hw_add_relu(a.data_ptr(), b.data_ptr(), a.numel(), torch.get_num_threads())
    increment_version(a)  # written in place, as torch's ops count it
    return True


def apply_edit(flat: torch.Tensor, linear: torch.Tensor, keep: torch.Tensor | None, set_: torch.Tensor | None,
               flip: torch.Tensor | None, scale: object, bits: int, zero_point: int, signed: bool) -> bool:
    """`inject.apply_edit` on a flat float32 tensor in one pass over its faulty positions (no per-op dispatch: at a
    high BER that is most of a trial's editing); False, having done nothing, where it does not apply (a per-code
    scale, codes wider than 62 bits, other dtypes, a position out of range: torch's ops then run, and raise)."""
    lib = _active()
    if (lib is None or not isinstance(scale, float) or bits > 62 or flat.dtype != torch.float32
            or flat.device.type != "cpu" or flat.dim() != 1 or flat.stride(0) != 1 or flat.requires_grad):
        return False
    dtype = _edit_words(linear, keep, set_, flip)
    if dtype is None:
        return False
    status = lib.hw_apply_edit(flat.data_ptr(), flat.numel(), linear.data_ptr(), linear.numel(),
                               *(None if t is None else t.data_ptr() for t in (keep, set_, flip)),
                               dtype == torch.int64, scale == 1.0, scale, bits, zero_point, signed,
                               torch.get_num_threads())
    if status != 0:
        return False
    # an in-place edit, as torch's ops would have counted it: the int8 kernels repack a weight when its version moves
    increment_version(flat)
    return True


def _edit_words(linear: torch.Tensor, keep: torch.Tensor | None, set_: torch.Tensor | None,
                flip: torch.Tensor | None) -> torch.dtype | None:
    """The dtype of an edit's fault words (int32 or int64) where the C functions can read them and its positions,
    else None."""
    if linear.dtype != torch.int64 or linear.device.type != "cpu" or not linear.is_contiguous():
        return None
    words = [t for t in (keep, set_, flip) if t is not None]
    dtype = words[0].dtype if words else torch.int32
    if dtype not in (torch.int32, torch.int64) or not all(
            t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() and t.numel() == linear.numel()
            for t in words):
        return None
    return dtype


# `requantize_edit_relu` reads and writes each fault's element twice more, at random, to save the ReLU's pass over
# the tensor: a gain while the faults are sparse. Measured on ResNet56 int8 (2 threads, AMD EPYC), a forward with
# act faults against the other path in the same process: -1.6 ms at BER 1e-5 (~0.005% of the codes), -0.8 ms at
# 3e-4 (0.24%), +0.8 ms at 1e-3 (0.8%; +3.9 ms while each fault's channel took a 64-bit division).
SPARSE_EDITS = 256  # at most one fault per this many elements


def requantize_edit_relu(acc: torch.Tensor, bias: torch.Tensor | None, multiplier: torch.Tensor,
                         bias_after: torch.Tensor | None, pre_round: float | None, post_round: float | None,
                         low: float, high: float, scale: float | None, linear: torch.Tensor,
                         keep: torch.Tensor | None, set_: torch.Tensor | None, flip: torch.Tensor | None, bits: int,
                         zero_point: int, signed: bool) -> bool:
    """`eager_requantize` on `acc` in place (clamp low..high), `apply_edit` of the codes at memory offsets `linear`
    (an act edit on codes: the scale its own), then `relu_`, in one pass over `acc` (`eager_requantize_edit_relu`):
    a layer with act faults whose output its ReLU alone reads. False, having done nothing, where it does not apply
    (`requantize`'s and `apply_edit`'s conditions; a position out of range)."""
    lib = _active()
    if lib is None or not _plain(acc) or acc.numel() == 0 or bits > 62 or (scale is not None and scale <= 0) or \
            linear.numel() * SPARSE_EDITS > acc.numel():
        return False
    dtype = _edit_words(linear, keep, set_, flip)
    prepared = _prepared(tuple(acc.shape), bias, multiplier, bias_after)
    if dtype is None or prepared is None:
        return False
    dim, channels, arrays = prepared
    faulty = torch.empty(linear.numel(), dtype=torch.float32)
    status = lib.hw_requantize_edit_relu(
        acc.data_ptr(), acc.numel(), channels, acc.stride(dim) if channels > 1 else 1,
        *(t.data_ptr() for t in arrays), -0.0 if pre_round is None else pre_round,
        -0.0 if post_round is None else post_round, low, high, max(low, 0.0), 1.0 if scale is None else scale,
        linear.data_ptr(), linear.numel(), *(None if t is None else t.data_ptr() for t in (keep, set_, flip)),
        dtype == torch.int64, bits, zero_point, signed, faulty.data_ptr(), torch.get_num_threads())
    if status != 0:
        return False
    increment_version(acc)  # written in place, as torch's ops count it
    return True


def decode_faults(flat: torch.Tensor, bounds: list[int], firsts: list[int], numels: list[int], shift: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`eager_decode_faults` in one pass (four fresh tensors); None where it does not apply (not a flat CPU int64
    tensor, the bounds not covering it)."""
    lib = _active()
    if (lib is None or flat.dtype != torch.int64 or flat.device.type != "cpu" or flat.dim() != 1
            or not flat.is_contiguous() or len(bounds) != len(firsts) + 1 or len(firsts) != len(numels)
            or not bounds or bounds[0] != 0 or bounds[-1] != flat.numel() or not 0 <= shift < 63
            or any(a > b for a, b in zip(bounds, bounds[1:])) or min(numels, default=0) < 0):
        return None
    out = torch.empty(4, flat.numel(), dtype=torch.int64)
    table = torch.tensor([*bounds, *firsts, *numels], dtype=torch.int64)
    targets = len(firsts)
    lib.hw_decode_faults(flat.data_ptr(), targets, table.data_ptr(), table[targets + 1:].data_ptr(),
                         table[2 * targets + 1:].data_ptr(), shift, *(row.data_ptr() for row in out),
                         torch.get_num_threads())
    return out[0], out[1], out[2], out[3]


def gap_positions(logged: torch.Tensor, log_q: float, total: int, last: int) -> torch.Tensor | None:
    """`eager_gap_positions` in one pass (a fresh tensor; `logged` is left as it is); None where it does not apply
    (not a flat CPU float64 tensor)."""
    lib = _active()
    if (lib is None or logged.dtype != torch.float64 or logged.device.type != "cpu" or logged.dim() != 1
            or not logged.is_contiguous()):
        return None
    out = torch.empty(logged.numel(), dtype=torch.int64)
    lib.hw_gap_positions(logged.data_ptr(), logged.numel(), log_q, float(total), last, out.data_ptr())
    return out


def layer_norm_ort(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """onnxruntime's LayerNormalization of the rows of [rows, c] float32 `x` (c a multiple of 8; scale and bias [c]):
    one native pass, or its eager chain."""
    lib = _active()
    tensors = (x, scale) if bias is None else (x, scale, bias)
    if lib is None or not all(_plain(t) for t in tensors):
        return eager_layer_norm_ort(x, scale, bias, eps)
    out = torch.empty_like(x)
    lib.hw_layer_norm_ort(x.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
                          x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out


def _unary(name: str, constants: torch.Tensor, eager: Any, x: torch.Tensor) -> torch.Tensor:
    """An elementwise kernel of float32 `x`: the native pass `name` (x, y, n, constants, threads), or its eager
    chain."""
    lib = _active()
    if lib is None or not _plain(x):
        return eager(x)
    out = torch.empty_like(x)
    getattr(lib, name)(x.data_ptr(), out.data_ptr(), x.numel(), constants.data_ptr(), torch.get_num_threads())
    return out


def tanh_mlas(x: torch.Tensor) -> torch.Tensor:
    """onnxruntime's CPU Tanh of float32 `x` (MLAS's FMA3 kernel): one native pass, or its eager chain."""
    return _unary("hw_tanh_mlas", MLAS_TANH, eager_tanh_mlas, x)


def logistic_mlas(x: torch.Tensor) -> torch.Tensor:
    """onnxruntime's CPU Sigmoid of float32 `x` (MLAS's FMA3 logistic kernel): one native pass, or its eager chain."""
    return _unary("hw_logistic_mlas", MLAS_LOGISTIC, eager_logistic_mlas, x)


def erf_mlas(x: torch.Tensor) -> torch.Tensor:
    """onnxruntime's CPU Erf of float32 `x` (MLAS's erf, as measured with AVX-512F): one native pass, or its eager
    chain."""
    return _unary("hw_erf_mlas", MLAS_ERF, eager_erf_mlas, x)


def gelu_ort(x: torch.Tensor, bias: torch.Tensor | None, erf: bool) -> torch.Tensor:
    """onnxruntime's CPU FastGelu (`erf` False) or Gelu / BiasGelu (`erf` True) of float32 `x`, a bias along its last
    dimension or none: one native pass, or the chain of `eager_gelu_ort` (its tanh or erf still native)."""
    lib = _active()
    fits = bias is None or (_plain(bias) and bias.dim() == 1 and x.dim() > 0 and x.shape[-1] == bias.numel())
    if lib is None or not _plain(x) or not fits:
        return _gelu_chain(x, bias, erf, tanh_mlas, erf_mlas)
    out = torch.empty_like(x)
    lib.hw_gelu_ort(x.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), x.numel(),
                    0 if bias is None else bias.numel(), int(erf), (_GELU_ERF if erf else _GELU_TANH).data_ptr(),
                    torch.get_num_threads())
    return out


def skip_layer_norm_ort(x: torch.Tensor, skip: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """onnxruntime's CPU SkipLayerNormalization of [rows, width] float32 `x` and a `skip` of the same shape (see
    `hw_skip_layer_norm_ort`): one native pass, or its eager chain."""
    lib = _active()
    tensors = [t for t in (x, skip, gamma, beta, bias) if t is not None]
    if lib is None or not all(_plain(t) for t in tensors):
        return eager_skip_layer_norm_ort(x, skip, gamma, beta, bias, eps)
    out = torch.empty_like(x)
    lib.hw_skip_layer_norm_ort(x.data_ptr(), skip.data_ptr(), None if bias is None else bias.data_ptr(),
                               gamma.data_ptr(), None if beta is None else beta.data_ptr(), out.data_ptr(),
                               x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out


def matmul_fma(a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
    """onnxruntime's float MatMul of [batch, m, k] x [batch, k, n] float32 (see `hw_matmul_fma`): one native pass,
    or its eager chain."""
    lib = _active()
    if lib is None or not (_plain(a) and _plain(b) and a.is_contiguous() and b.is_contiguous()):
        return eager_matmul_fma(a, b, block)
    batch, m, k = a.shape
    n = b.shape[2]
    out = torch.empty(batch, m, n)
    lib.hw_matmul_fma(a.data_ptr(), b.data_ptr(), out.data_ptr(), batch, m, k, n, block, torch.get_num_threads())
    return out


def softmax_mlas(x: torch.Tensor) -> torch.Tensor:
    """onnxruntime's CPU Softmax of the rows of [rows, d] float32 `x`: one native pass, or its eager chain."""
    lib = _active()
    if lib is None or not _plain(x):
        return eager_softmax_mlas(x)
    out = torch.empty_like(x)
    lib.hw_softmax_mlas(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], MLAS_EXP.data_ptr(),
                        torch.get_num_threads())
    return out


def qlinear_binary(op: int, a: torch.Tensor, b: torch.Tensor, params: list[float]) -> torch.Tensor | None:
    """onnxruntime's QLinearAdd (op 0) or QLinearMul (op 1) in one native pass (`hw_qlinear_binary`; its reference
    is the reader's eager chain, which checks it before use), on float32 CPU tensors broadcast as torch does (an
    operand that repeats along the leading dimensions is read in place, any other broadcast expanded first); None
    where the pass declines (the caller runs its chain)."""
    lib = _active()
    if lib is None or not all(t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad
                              for t in (a, b)):
        return None
    try:
        shape = tuple(torch.broadcast_shapes(a.shape, b.shape))
    except RuntimeError:
        return None
    n = math.prod(shape)
    if n == 0:
        return None

    def flat(t: torch.Tensor) -> tuple[torch.Tensor, int]:
        dims = tuple(t.shape)
        while dims and dims[0] == 1:
            dims = dims[1:]
        if dims == shape[len(shape) - len(dims):]:  # repeats along the leading dimensions (or is the whole)
            return t.contiguous(), t.numel()
        return t.expand(shape).contiguous(), n

    (fa, period_a), (fb, period_b) = flat(a), flat(b)
    out = torch.empty(shape)
    constants = torch.tensor(params, dtype=torch.float32)
    lib.hw_qlinear_binary(fa.data_ptr(), fb.data_ptr(), out.data_ptr(), n, period_a, period_b, op,
                          constants.data_ptr(), torch.get_num_threads())
    return out


def _channels_spatial(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int]:
    """hw_compose_place's description of a layout: (1, 1) row-major, else (channels, spatial) channels-last."""
    return (1, 1) if strides == contiguous_strides(shape) else (shape[1], math.prod(shape[2:]))


def compose_place(linear: torch.Tensor, bit: torch.Tensor, shape: tuple[int, ...], strides: tuple[int, ...],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`inject.compose_canonical` of flips then `layout.place` in one pass: (each faulty code's memory offset in a
    tensor of `shape` and `strides`, its mask of flipped bits in `dtype`). None where it does not apply: a layout
    neither row-major nor channels-last, words other than int32/int64, faults not sorted or a bit wider than the
    words (the torch ops then run, and compute the same, or raise)."""
    lib = _active()
    if (lib is None or dtype not in (torch.int32, torch.int64) or linear.numel() != bit.numel()
            or not all(t.dtype == torch.int64 and t.device.type == "cpu" and t.dim() == 1 and t.is_contiguous()
                       for t in (linear, bit))
            or (strides != contiguous_strides(shape) and strides != channels_last_strides(shape))):
        return None
    offsets, masks = torch.empty_like(linear), torch.empty(linear.numel(), dtype=dtype)
    codes = lib.hw_compose_place(linear.data_ptr(), bit.data_ptr(), linear.numel(), *_channels_spatial(shape, strides),
                                 offsets.data_ptr(), masks.data_ptr(), dtype == torch.int64)
    if codes < 0:
        return None
    return offsets[:codes], masks[:codes]
