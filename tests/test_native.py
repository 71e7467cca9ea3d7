"""The fused native passes (`native`) against the eager torch chains they replace, bit for bit, and their fallback:
a machine without a compiler, or with the passes switched off, computes the same numbers on torch's eager ops."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import threads
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_hwfault import FaultModel, native, quantize
from pytest_hwfault.cifar_resnet import CifarResNet, recalibrate_bn
from pytest_hwfault.faults import FaultPattern, sample_pattern, trial_generator
from pytest_hwfault.inject import Edit, apply_edit, code_dtype, compose_canonical
from pytest_hwfault.layout import channels_last_strides, contiguous_strides, place

needs_native = pytest.mark.skipif(native.library() is None, reason=f"fused passes unavailable: {native.status()}")
PROPERTY = settings(max_examples=60, deadline=None)

# float32 values, special ones included (ties at every parity, signed zeros, infinities, huge and tiny numbers)
FLOATS = st.one_of(st.floats(width=32, allow_nan=False),
                   st.integers(-400, 400).map(lambda k: k + 0.5),
                   st.sampled_from([0.0, -0.0, 127.0, -128.0, 255.0, 127.5, -127.5, 2.0**24 + 2, float("inf"),
                                    float("-inf")]))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (-0.0 is not 0.0); NaNs of any payload count as equal."""
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and bool(
        torch.equal(a.isnan(), b.isnan()) and torch.equal(a.view(torch.int32)[~a.isnan()],
                                                          b.view(torch.int32)[~b.isnan()]))


@st.composite
def activations(draw: st.DrawFn) -> torch.Tensor:
    """A 4-d tensor in NCHW or channels-last memory, small or big enough that the passes use a thread team."""
    channels, side = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    images = draw(st.sampled_from([1, 3, 2048]))
    values = torch.tensor(draw(st.lists(FLOATS, min_size=1, max_size=64)), dtype=torch.float32)
    flat = values.repeat(-(-images * channels * side * side // len(values)))[: images * channels * side * side]
    x = flat.reshape(images, channels, side, side)
    return x.contiguous(memory_format=torch.channels_last) if draw(st.booleans()) else x


@needs_native
@PROPERTY
@given(x=activations(), inv_scale=st.floats(1 / 1024, 1024, width=32), bounded=st.booleans(),
       n_threads=st.sampled_from([1, 2]))
def test_quantize_equals_the_eager_chain(x: torch.Tensor, inv_scale: float, bounded: bool, n_threads: int) -> None:
    low, high = (-128.0, 127.0) if bounded else (None, None)
    want = native.eager_quantize(x, torch.empty_like(x), inv_scale, low, high)
    got = torch.empty_like(x)
    with threads(n_threads):
        assert native.quantize(x, got, inv_scale, low, high)
    assert same_bits(got, want)


@needs_native
@PROPERTY
@given(a=activations(), seed=st.integers(0, 2**31 - 1), nan=st.booleans(), n_threads=st.sampled_from([1, 2]))
def test_add_relu_equals_the_eager_chain(a: torch.Tensor, seed: int, nan: bool, n_threads: int) -> None:
    """The model's residual sum and its ReLU in one pass (`inplace`): signed zeros, NaN, infinities and
    cancellations as torch's add_ then relu_ give them; refused where the layouts differ."""
    b = a.flatten()[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(seed))].reshape(a.shape)
    b = torch.where(torch.rand(a.shape, generator=torch.Generator().manual_seed(seed + 1)) < 0.3, -a, b)
    if nan:
        b.view(-1)[:: 7] = float("nan")
    b = b.contiguous(memory_format=torch.channels_last) if not a.is_contiguous() else b.contiguous()
    want = native.eager_add_relu(a.clone(), b)
    got = a.clone()
    with threads(n_threads):
        assert native.add_relu(got, b)
    assert same_bits(got, want)
    other = b.contiguous() if not b.is_contiguous() else b.contiguous(memory_format=torch.channels_last)
    if other.stride() != a.stride():
        assert not native.add_relu(a.clone(), other)


@needs_native
@PROPERTY
@given(x=activations(), inv_scale=st.floats(1 / 128, 128, width=32), zero_point=st.sampled_from([0, 128, 255, 17]),
       n_threads=st.sampled_from([1, 2]))
def test_quantize_to_bytes_equals_the_eager_chain(x: torch.Tensor, inv_scale: float, zero_point: int,
                                                  n_threads: int) -> None:
    low, high = float(-zero_point), float(255 - zero_point)  # the codes + zero point fill uint8
    codes = native.eager_quantize(x, torch.empty_like(x), inv_scale, low, high)
    want = native.eager_to_bytes(codes, torch.empty_like(x, dtype=torch.uint8), zero_point)
    got, also, wide = torch.empty_like(want), torch.empty_like(want), torch.empty_like(want)
    with threads(n_threads):
        assert native.quantize_to_bytes(x, got, inv_scale, low, high, zero_point)
        assert native.to_bytes(codes, also, zero_point)
        assert native.to_bytes(codes.double(), wide, zero_point)  # a wide layer's float64 codes
    assert torch.equal(got, want) and torch.equal(also, want) and torch.equal(wide, want)


@st.composite
def accumulators(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """An integer-valued accumulator (conv: NCHW or channels-last; linear: [..., C]) and its channel dim."""
    channels = draw(st.integers(1, 24))
    kind = draw(st.sampled_from(["conv", "conv_cl", "linear", "linear3"]))
    images = draw(st.sampled_from([2, 700]))
    height = draw(st.sampled_from([3, 4]))  # 4 x 4: a power-of-two stride between channels (shifts, not divisions)
    shape = {"conv": (images, channels, height, 4), "conv_cl": (images, channels, height, 4),
             "linear": (images, channels),
             "linear3": (images, 5, channels)}[kind]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    magnitude = draw(st.sampled_from([10.0, 1e4, 4e6]))
    acc = torch.round(torch.randn(shape, generator=generator) * magnitude)
    if kind == "conv_cl":
        acc = acc.contiguous(memory_format=torch.channels_last)
    return acc, 1 if kind.startswith("conv") else acc.dim() - 1


@needs_native
@PROPERTY
@given(case=accumulators(), data=st.data(), n_threads=st.sampled_from([1, 2]))
def test_requantize_equals_the_eager_chain(case: tuple[torch.Tensor, int], data: st.DataObject,
                                           n_threads: int) -> None:
    acc, dim = case
    channels = acc.shape[dim]
    shape = [1] * (acc.dim() - dim)
    shape[0] = channels
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))

    def per_channel(scale: float) -> torch.Tensor:
        return (torch.randn(channels, generator=generator) * scale).reshape(shape)

    bias = data.draw(st.sampled_from([None, "codes"]), label="bias")
    bias_t = None if bias is None else per_channel(1e3).round()
    # small random multipliers (the usual), powers of two (every odd product is a tie) and ones near 1 (sums near
    # 2^24, where the order of the additions shows after rounding)
    kind = data.draw(st.sampled_from(["small", "power of two", "near one"]), label="multiplier")
    per_tensor = data.draw(st.booleans(), label="per tensor")
    size = 1 if per_tensor else channels
    multiplier = {"small": torch.rand(size, generator=generator) * 1e-2,
                  "power of two": 2.0 ** -torch.randint(0, 9, (size,), generator=generator).float(),
                  "near one": 0.5 + torch.rand(size, generator=generator) * 1.5}[kind]
    multiplier = multiplier if per_tensor else multiplier.reshape(shape)
    after = data.draw(st.sampled_from([None, "random", "halves"]), label="bias after")
    bias_after = None if after is None else per_channel(5.0) if after == "random" else \
        (per_channel(4.0).round() + 0.5)
    zero = data.draw(st.sampled_from([None, 0, 3, -128]), label="zero point first")
    pre, post = (None, None) if zero is None else (float(zero + 1) + 0.25, float(-zero))
    if zero is None and data.draw(st.booleans(), label="offset"):
        post = 2.0
    low, high = data.draw(st.sampled_from([(-127.0, 127.0), (0.0, 255.0), (-8.0, 7.0)]), label="bounds")
    scale = data.draw(st.sampled_from([None, 0.0173, 1.0, 3.5]), label="scale")
    want = native.eager_requantize(acc.clone(), bias_t, multiplier, bias_after, pre, post, low, high, scale)
    got = acc.clone()
    with threads(n_threads):
        assert native.requantize(got, bias_t, multiplier, bias_after, pre, post, low, high, scale)
    assert same_bits(got, want)


@needs_native
@PROPERTY
@given(batch=st.integers(1, 3), m=st.integers(1, 6), k=st.integers(1, 300), n=st.integers(1, 6),
       block=st.sampled_from([0, 1, 7, 256]), data=st.data(), n_threads=st.sampled_from([1, 2]))
def test_fma_chain_matmul_equals_the_eager_chain(batch: int, m: int, k: int, n: int, block: int,
                                                 data: st.DataObject, n_threads: int) -> None:
    """onnxruntime's float MatMul (`native.matmul_fma`) against its eager chain: any shape, whole chains and blocks
    (a partial last one), values over six decades, exact cancellations (signed zeros)."""
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    a = torch.randn(batch, m, k, generator=generator) * 10.0 ** (torch.rand(k, generator=generator) * 6 - 3)
    b = torch.randn(batch, k, n, generator=generator)
    if data.draw(st.booleans(), label="zero rows"):
        a[:, 0] = 0.0
    with threads(n_threads):
        got = native.matmul_fma(a, b, block)
    assert same_bits(got, native.eager_matmul_fma(a, b, block))


@needs_native
@PROPERTY
@given(rows=st.integers(1, 8), d=st.integers(1, 80), log_spread=st.floats(-3, 2.5), data=st.data(),
       n_threads=st.sampled_from([1, 2]))
def test_mlas_softmax_equals_the_eager_chain(rows: int, d: int, log_spread: float, data: st.DataObject,
                                             n_threads: int) -> None:
    """onnxruntime's Softmax (`native.softmax_mlas`) against its eager chain: any width (the 16 lanes' tail), rows
    from nearly constant to spreads whose exponentials underflow into subnormals and the lower clamp, infinities."""
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    x = torch.randn(rows, d, generator=generator) * 10.0**log_spread
    if data.draw(st.booleans(), label="an infinity"):
        where = data.draw(st.integers(0, d - 1), label="where")
        x[0, where] = data.draw(st.sampled_from([float("inf"), float("-inf")]), label="infinity")
    with threads(n_threads):
        got = native.softmax_mlas(x)
    assert same_bits(got, native.eager_softmax_mlas(x))


@needs_native
@PROPERTY
@given(signed=st.booleans(), op=st.sampled_from(["add", "mul"]), data=st.data(), n_threads=st.sampled_from([1, 2]))
def test_qlinear_add_and_mul_in_one_pass_equal_the_readers_chains(signed: bool, op: str, data: st.DataObject,
                                                                 n_threads: int) -> None:
    """onnxruntime's QLinearAdd and QLinearMul (`native.qlinear_binary`) against the reader's eager chains: grids
    of any scale and zero point, inputs on and off them (a fault's values), broadcast either way, NaN; and the
    check the reader runs before it uses the pass agrees."""
    from pytest_hwfault.onnx_reader import QLinearAdd, QLinearMul, _native_qlinear_agrees

    low, high = (-128, 127) if signed else (0, 255)
    grids = [(data.draw(st.floats(1e-4, 10.0), label=f"scale {k}"), data.draw(st.integers(low, high), label=f"zp {k}"))
             for k in "abc"]
    module = (QLinearAdd if op == "add" else QLinearMul)(grids[0], grids[1], grids[2], signed)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3), label="shape"))
    a = (torch.randint(low, high + 1, shape, generator=generator).float() - grids[0][1]) * np.float32(grids[0][0])
    if data.draw(st.booleans(), label="off the grid"):
        a = a + torch.randn(shape, generator=generator) * grids[0][0]
    b_shape = data.draw(st.sampled_from([shape, shape[-1:], (1,) * len(shape), shape[:1] + (1,) * (len(shape) - 1)]),
                        label="b's shape")
    b = (torch.randint(low, high + 1, b_shape, generator=generator).float() - grids[1][1]) * np.float32(grids[1][0])
    if data.draw(st.booleans(), label="a NaN"):
        a.view(-1)[0] = float("nan")
    x, y = (a, b) if data.draw(st.booleans(), label="b second") else (b, a)
    with threads(n_threads):
        got = native.qlinear_binary(0 if op == "add" else 1, x, y, module._params())
    assert got is not None and same_bits(got, module.eager(x, y))
    assert _native_qlinear_agrees()


@needs_native
@PROPERTY
@given(values=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=300),
       n_threads=st.sampled_from([1, 2]))
def test_mlas_tanh_equals_the_eager_chain(values: list[float], n_threads: int) -> None:
    """onnxruntime's Tanh (`native.tanh_mlas`) against its eager chain on any float32 values: subnormals, the
    clamp's edges, infinities."""
    x = torch.tensor(values, dtype=torch.float32)
    with threads(n_threads):
        got = native.tanh_mlas(x)
    assert same_bits(got, native.eager_tanh_mlas(x))


@needs_native
@PROPERTY
@given(values=st.lists(st.floats(width=32) | st.sampled_from([17.844, -18.0, 18.0, 17.999998]), min_size=1,
                      max_size=300),
       n_threads=st.sampled_from([1, 2]))
def test_mlas_logistic_equals_the_eager_chain(values: list[float], n_threads: int) -> None:
    """onnxruntime's Sigmoid (`native.logistic_mlas`) against its eager chain on any float32 values: the clamp's
    edges, where it passes 1, subnormals, infinities, NaNs."""
    x = torch.tensor(values, dtype=torch.float32)
    with threads(n_threads):
        got = native.logistic_mlas(x)
    assert same_bits(got, native.eager_logistic_mlas(x))


@needs_native
@PROPERTY
@given(values=st.lists(st.floats(width=32) | st.sampled_from([0.921875, -0.921875, 0.9218749, 3.725]), min_size=1,
                      max_size=300),
       n_threads=st.sampled_from([1, 2]))
def test_mlas_erf_equals_the_eager_chain(values: list[float], n_threads: int) -> None:
    """onnxruntime's Erf (`native.erf_mlas`) against its eager chain on any float32 values: both branches and the
    split between them, subnormals, infinities, NaNs."""
    x = torch.tensor(values, dtype=torch.float32)
    with threads(n_threads):
        got = native.erf_mlas(x)
    assert same_bits(got, native.eager_erf_mlas(x))


@needs_native
@PROPERTY
@given(rows=st.integers(1, 30), width=st.integers(1, 5000), erf=st.booleans(), bias=st.booleans(),
       scale=st.sampled_from([0.1, 3.0, 30.0]), seed=st.integers(0, 2**16), n_threads=st.sampled_from([1, 2]))
def test_onnxruntime_gelu_kernels_equal_the_eager_chain(rows: int, width: int, erf: bool, bias: bool, scale: float,
                                                        seed: int, n_threads: int) -> None:
    """onnxruntime's FastGelu, Gelu and BiasGelu in one native pass (`native.gelu_ort`) against their eager chain:
    rows shorter and longer than the pass's 4096-value chunks, a bias along rows or none, values into both of erf's
    branches and past tanh's clamp."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator) * scale
    b = torch.randn(width, generator=generator) if bias else None
    with threads(n_threads):
        got = native.gelu_ort(x, b, erf)
    assert same_bits(got, native.eager_gelu_ort(x, b, erf))


@needs_native
@PROPERTY
@given(rows=st.integers(1, 30), width=st.integers(1, 300), beta=st.booleans(), bias=st.booleans(),
       spread=st.sampled_from([1e-3, 1.0, 1e3]), offset=st.sampled_from([0.0, 10.0, 1e4]), seed=st.integers(0, 2**16),
       n_threads=st.sampled_from([1, 2]))
def test_onnxruntime_skip_layer_norm_equals_the_eager_chain(rows: int, width: int, beta: bool, bias: bool,
                                                            spread: float, offset: float, seed: int,
                                                            n_threads: int) -> None:
    """onnxruntime's SkipLayerNormalization in one native pass (`native.skip_layer_norm_ort`) against its eager
    chain (Welford's running mean and M2 column by column): any width, spreads and offsets, beta and bias or not."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator) * spread + offset
    skip = torch.randn(rows, width, generator=generator)
    gamma, b, c = (torch.randn(width, generator=generator) for _ in range(3))
    with threads(n_threads):
        got = native.skip_layer_norm_ort(x, skip, gamma, b if beta else None, c if bias else None, 1e-12)
    assert same_bits(got, native.eager_skip_layer_norm_ort(x, skip, gamma, b if beta else None, c if bias else None,
                                                           1e-12))


@needs_native
@PROPERTY
@given(width=st.integers(1, 100).map(lambda k: 8 * k), rows=st.integers(1, 40), data=st.data(),
       n_threads=st.sampled_from([1, 2]))
def test_onnxruntime_layer_norm_equals_the_eager_chain(width: int, rows: int, data: st.DataObject,
                                                       n_threads: int) -> None:
    """onnxruntime's LayerNormalization (`native.layer_norm_ort`) against its eager chain: any width the kernel's 8
    lanes divide, rows from constant to six decades of spread, offsets up to 1e6 times the spread, with and without
    a bias, tiny to large epsilons."""
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    spread = 10.0 ** data.draw(st.floats(-3, 3), label="log10 spread")
    offset = data.draw(st.sampled_from([0.0, 1.0, 1e3, 1e6]), label="offset in spreads") * spread
    x = torch.randn(rows, width, generator=generator) * spread + offset * torch.randn(rows, 1, generator=generator)
    if data.draw(st.booleans(), label="a constant row"):
        x[0] = 0.3
    scale = torch.randn(width, generator=generator)
    bias = torch.randn(width, generator=generator) if data.draw(st.booleans(), label="bias") else None
    eps = data.draw(st.sampled_from([1e-12, 1e-5, 0.5]), label="epsilon")
    want = native.eager_layer_norm_ort(x, scale, bias, eps)
    with threads(n_threads):
        got = native.layer_norm_ort(x, scale, bias, eps)
    assert same_bits(got, want)


@needs_native
@PROPERTY
@given(case=accumulators(), data=st.data(), n_threads=st.sampled_from([1, 2]))
def test_wide_requantize_equals_the_eager_chain(case: tuple[torch.Tensor, int], data: st.DataObject,
                                                n_threads: int) -> None:
    """A wide layer's float64 accumulator (sums past 2^24, odd ones the float32 conversion rounds) into float32
    values: the calibrated engine's float64 arithmetic, and a deployed runtime's float32 one after converting."""
    acc, dim = case
    channels = acc.shape[dim]
    shape = [1] * (acc.dim() - dim)
    shape[0] = channels
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    wide = acc.double() * data.draw(st.sampled_from([1.0, 2.0**20 + 1, 2.0**30 + 3]), label="widened by")
    wide = wide.contiguous(memory_format=torch.channels_last) if acc.dim() == 4 and acc.stride(1) == 1 else wide
    in_float32 = data.draw(st.booleans(), label="float32 arithmetic")
    bias_t = None if data.draw(st.booleans(), label="no bias") else \
        (torch.randn(channels, generator=generator, dtype=torch.float64) * 2.0**33).round().reshape(shape)
    if data.draw(st.booleans(), label="one off ties"):  # k + 1/2 +- 2^-20 at multiplier 2^-20: float32 would
        # drop the 1 and round to even, float64 away from the tie
        ties = (torch.randint(-128, 128, wide.shape, generator=generator, dtype=torch.float64) * 2 + 1) * 2.0**19
        wide = wide.copy_(ties + torch.randint(0, 2, wide.shape, generator=generator) * 2 - 1)
    multiplier = data.draw(st.sampled_from(["small", "power of two", "2^-20", "special"]), label="multiplier")
    multiplier_t = {"small": torch.rand(channels, generator=generator) * 2.0**-25,
                    "power of two": 2.0 ** -torch.randint(20, 40, (channels,), generator=generator).float(),
                    "2^-20": torch.full((channels,), 2.0**-20),
                    "special": torch.tensor([float("nan"), float("inf"), 0.5, -0.0] * channels)[:channels]}[multiplier]
    multiplier_t = multiplier_t.reshape(shape)
    bias_after = None if data.draw(st.booleans(), label="no bias after") else \
        (torch.randn(channels, generator=generator) * 4.0).round().add_(0.5).reshape(shape)
    zero = data.draw(st.sampled_from([None, 0, 3, -128]), label="zero point first")
    pre, post = (None, None) if zero is None else (float(zero + 1) + 0.25, float(-zero))
    low, high = data.draw(st.sampled_from([(-127.0, 127.0), (0.0, 255.0), (-8.0, 7.0)]), label="bounds")
    scale = data.draw(st.sampled_from([None, 0.0173, 3.5]), label="scale")
    want = native.eager_requantize_wide(wide.clone(), bias_t, multiplier_t, bias_after, pre, post, low, high, scale,
                                        in_float32)
    got = torch.empty_like(wide, dtype=torch.float32)
    with threads(n_threads):
        assert native.requantize_wide(wide, got, bias_t, multiplier_t, bias_after, pre, post, low, high, scale,
                                      in_float32)
    assert got.stride() == want.stride() and same_bits(got, want)


@needs_native
@PROPERTY
@given(bits=st.sampled_from([2, 4, 8, 12, 16, 24, 32]), signed=st.booleans(), data=st.data(),
       scale=st.sampled_from([1.0, 0.0173, 0.5, 3.75]), wide_words=st.booleans())
def test_fault_edits_equal_torchs(bits: int, signed: bool, data: st.DataObject, scale: float,
                                  wide_words: bool) -> None:
    """`inject.apply_edit` with the fused pass and on torch's ops, on codes or values (code x scale), with stuck-at
    and flip words of either width, zero points and positions in any order."""
    zero_point = 0 if signed else data.draw(st.integers(0, min(255, (1 << bits) - 1)), label="zero point")
    half = 1 << (bits - 1)
    low, high = (-half, half - 1) if signed else (-zero_point, (1 << bits) - 1 - zero_point)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    size = data.draw(st.sampled_from([7, 300, 30000]), label="size")  # 8192 faults and more: two threads
    codes = torch.randint(low, high + 1, (size,), generator=generator).float()
    flat = codes * scale if scale != 1.0 else codes
    linear = torch.randperm(size, generator=generator)[: data.draw(st.integers(1, size), label="faults")]
    dtype = torch.int64 if wide_words else torch.int32
    word = torch.randint(0, 1 << min(bits, 31), (3, len(linear)), generator=generator).to(dtype)
    keep, set_, flip = data.draw(st.sampled_from([(None, None, word[2]), (~word[0], word[0] & word[1], None),
                                                  (~word[0], None, word[2]), (None, word[1], None)]), label="kind")
    edit = Edit(linear, keep, set_, flip, scale)
    want, got = flat.clone(), flat.clone()
    with native.disabled():
        apply_edit(want, edit, bits, zero_point, signed)
    assert native.apply_edit(got, linear, keep, set_, flip, scale, bits, zero_point, signed)
    assert same_bits(got, want)
    assert got._version == want._version > 0  # counted as an in-place edit (the int8 kernels repack on it)
    # a position out of range writes nothing (torch's indexing then raises)
    assert not native.apply_edit(got, torch.tensor([0, size]), None, None, word[2][:2], scale, bits, zero_point,
                                 signed)
    assert same_bits(got, want)


@needs_native
@PROPERTY
@given(case=accumulators(), data=st.data(), n_threads=st.sampled_from([1, 2]))
def test_requantize_with_act_edits_and_relu_equals_the_eager_chain(case: tuple[torch.Tensor, int],
                                                                   data: st.DataObject, n_threads: int) -> None:
    """A layer with act faults whose ReLU alone reads its output: requantization, the edits and the ReLU in one
    pass, against torch's ops one after the other, on codes and values, signed and unsigned codes, in any layout,
    with the positions in the accumulator's memory order."""
    acc, dim = case
    channels = acc.shape[dim]
    shape = [1] * (acc.dim() - dim)
    shape[0] = channels
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    bias = (torch.randn(channels, generator=generator) * 1e3).round().reshape(shape)
    multiplier = (torch.rand(channels, generator=generator) * 1e-2).reshape(shape)
    bits, signed = data.draw(st.sampled_from([(8, True), (8, False), (4, True), (16, True)]), label="codes")
    zero = 0 if signed else data.draw(st.sampled_from([0, 37, 128]), label="zero point")
    half = 1 << (bits - 1)
    low, high = (-(half - 1), half - 1) if signed else (-zero, (1 << bits) - 1 - zero)
    pre, post = data.draw(st.sampled_from([(None, None), (float(zero), float(-zero)), (None, 2.0)]), label="steps")
    scale = data.draw(st.sampled_from([None, 0.0173, 3.5]), label="scale")
    linear = torch.randperm(acc.numel(), generator=generator)[: data.draw(st.integers(1, acc.numel()), label="n")]
    word = torch.randint(0, 1 << bits, (3, len(linear)), generator=generator).to(
        data.draw(st.sampled_from([torch.int32, torch.int64]), label="words"))
    keep, set_, flip = data.draw(st.sampled_from([(None, None, word[2]), (~word[0], word[0] & word[1], None),
                                                  (~word[0], None, word[2])]), label="kind")
    want = native.eager_requantize_edit_relu(acc.clone(), bias, multiplier, None, pre, post, low, high, scale,
                                             Edit(linear, keep, set_, flip, 1.0), bits, zero, signed)
    got = acc.clone()
    sparse = native.SPARSE_EDITS
    native.SPARSE_EDITS = 1  # at any density (the engine takes this pass for sparse faults only: faster there)
    try:
        with threads(n_threads):
            assert native.requantize_edit_relu(got, bias, multiplier, None, pre, post, low, high, scale, linear,
                                               keep, set_, flip, bits, zero, signed)
        assert same_bits(got, want)
        assert float(got.min()) >= 0.0  # the ReLU, on every element
        # a position out of range writes nothing
        before = got.clone()
        assert not native.requantize_edit_relu(got, bias, multiplier, None, pre, post, low, high, scale,
                                               torch.tensor([acc.numel()]), None, None, word[2][:1], bits, zero,
                                               signed)
        assert same_bits(got, before)
    finally:
        native.SPARSE_EDITS = sparse
    # denser faults than one per SPARSE_EDITS elements: declined, nothing written (the caller's passes are faster)
    dense = acc.clone()
    assert native.requantize_edit_relu(dense, bias, multiplier, None, pre, post, low, high, scale, linear, keep,
                                       set_, flip, bits, zero, signed) == (len(linear) * sparse <= acc.numel())
    assert same_bits(dense, want) or same_bits(dense, acc)


@needs_native
@PROPERTY
@given(log10_p=st.floats(-14, -0.0005), total=st.integers(1, 2**62), last=st.integers(-1, 2**40),
       seed=st.integers(0, 2**16), n=st.sampled_from([1, 100, 70000]))
def test_fault_positions_equal_the_eager_chain(log10_p: float, total: int, last: int, seed: int, n: int) -> None:
    """The sampler's geometric gaps summed into positions (`faults.bernoulli_positions`) in one pass, from the same
    logged uniforms as torch's chain: rare and near-certain faults, gaps clamped to the total, log(1 - u) = 0."""
    logged = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).neg_().add_(1.0)
    logged[0] = 1.0
    logged.log_()
    log_q = math.log1p(-(10**log10_p))
    got = native.gap_positions(logged, log_q, total, last)
    want = native.eager_gap_positions(logged.clone(), log_q, total, last)
    assert got is not None and torch.equal(got, want)
    assert native.gap_positions(logged.float(), log_q, total, last) is None  # not what it reads


@st.composite
def batch_layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A batch's shape (rank 2 to 5, sizes powers of two or not) and a layout: row-major, or channels-last."""
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=2, max_size=5)))
    last = channels_last_strides(shape)
    return shape, last if last is not None and draw(st.booleans()) else contiguous_strides(shape)


@needs_native
@PROPERTY
@given(batch=batch_layouts(), bits=st.sampled_from([2, 4, 8, 16, 32]), density=st.floats(0.001, 1.0),
       seed=st.integers(0, 2**16))
def test_composed_and_placed_faults_equal_torchs(batch: tuple[tuple[int, ...], tuple[int, ...]], bits: int,
                                                 density: float, seed: int) -> None:
    """A tensor's sampled flips (sorted, distinct (code, bit), several on a code) folded into one mask per code and
    placed in its layout in one pass, against `inject.compose_canonical` then `layout.place` on torch's ops."""
    shape, strides = batch
    space = math.prod(shape) * bits
    drawn = torch.randperm(space, generator=torch.Generator().manual_seed(seed))[: max(1, int(space * density))]
    drawn = drawn.sort().values
    linear, bit, dtype = drawn // bits, drawn % bits, code_dtype(bits)
    want = compose_canonical(linear, bit, 0, 1.0, dtype)
    placed = native.compose_place(linear, bit, shape, strides, dtype)
    assert placed is not None and want.flip is not None
    assert torch.equal(placed[0], place(want.linear.clone(), shape, strides)) and torch.equal(placed[1], want.flip)
    # what it does not read: faults out of order, a bit wider than the words, a layout it cannot place in
    if len(linear) > 1 and bool(linear[0] != linear[-1]):
        assert native.compose_place(linear.flip(0), bit.flip(0), shape, strides, dtype) is None
    assert native.compose_place(linear, torch.full_like(bit, 40), shape, strides, torch.int32) is None
    if len(shape) == 4 and min(shape[1:]) > 1:  # channels, then width, then height: neither layout
        other = (shape[1] * shape[2] * shape[3], 1, shape[1], shape[1] * shape[2])
        assert native.compose_place(linear, bit, shape, other, dtype) is None


@needs_native
@PROPERTY
@given(numels=st.lists(st.sampled_from([0, 1, 3, 10, 16, 64, 100, 4096]), min_size=1, max_size=6),
       images=st.integers(1, 40), shift=st.sampled_from([0, 3, 4, 5]), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16), n_threads=st.sampled_from([1, 2]))
def test_decoded_fault_positions_equal_torchs(numels: list[int], images: int, shift: int, density: float, seed: int,
                                              n_threads: int) -> None:
    """A draw over whole codes decoded into each fault's code, image, index and bit in one pass, against the torch
    ops `sample_pattern` used before: codes per image a power of two or not, weight targets (0: image -1), targets
    without faults, one thread and several."""
    sizes = [(n if n else 37) * (images if n else 1) << shift for n in numels]
    ends = [sum(sizes[: t + 1]) for t in range(len(sizes))]
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(ends[-1], generator=generator)[: int(ends[-1] * density)].sort().values
    bounds = [0, *torch.searchsorted(flat, torch.tensor(ends)).tolist()]
    firsts = [(end - size) >> shift for end, size in zip(ends, sizes)]
    want = native.eager_decode_faults(flat, bounds, firsts, numels, shift)
    with threads(n_threads):
        got = native.decode_faults(flat, bounds, firsts, numels, shift)
    assert got is not None and all(torch.equal(a, b) for a, b in zip(got, want))
    # what it does not read: bounds that leave faults out, or run backwards
    assert native.decode_faults(flat, [0, *bounds[1:-1], max(0, len(flat) - 1)], firsts, numels, shift) is None \
        or len(flat) == 0
    if len(bounds) > 2 and bounds[1] > 0:
        assert native.decode_faults(flat, [0, bounds[1], 0, *bounds[3:]], firsts, numels, shift) is None


@needs_native
@PROPERTY
@given(site=st.sampled_from(["act", "weight", "acc"]), ber=st.sampled_from([1e-3, 1e-2, 0.2]),
       numels=st.lists(st.integers(1, 300), min_size=1, max_size=5), images=st.integers(1, 20),
       seed=st.integers(0, 2**16))
def test_sampled_patterns_are_the_same_with_the_native_decoding(site: str, ber: float, numels: list[int],
                                                                images: int, seed: int) -> None:
    """`sample_pattern` with its native decoding and on torch's ops: the same faults, the same order."""
    from pytest_hwfault.faults import FaultTarget

    targets = [FaultTarget(FaultModel(site, ber).site, f"layer{i}", n, 32 if site == "acc" else 8)
               for i, n in enumerate(numels)]
    fast = sample_pattern(FaultModel(site, ber), targets, images, torch.Generator().manual_seed(seed))
    with native.disabled():
        slow = sample_pattern(FaultModel(site, ber), targets, images, torch.Generator().manual_seed(seed))
    assert fast.to_json() == slow.to_json()
    for key, group in fast.groups.items():
        other = slow.groups[key]
        assert (group._linear is None) == (other._linear is None)
        if group._linear is not None and other._linear is not None:
            assert group._linear[0] == other._linear[0] and torch.equal(group._linear[1], other._linear[1])


@needs_native
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_requantize_adds_in_the_eager_order(layout: str) -> None:
    """Accumulators near 2^22 (float32 steps by 0.5 there) nearly cancelled by a bias after scaling, with a zero
    point added before rounding: (acc + bias) + zero point and acc + (bias + zero point) give different codes, so
    only the eager order passes. Realistic values cannot show this after the clamp; the contract is every input."""
    acc = (4194304.0 + torch.arange(-100, 100).float()).repeat(16).reshape(8, 4, 10, 10)
    if layout == "channels_last":
        acc = acc.contiguous(memory_format=torch.channels_last)
    bias_after, multiplier = torch.full((4, 1, 1), -4194303.75), torch.ones(4, 1, 1)
    want = native.eager_requantize(acc.clone(), None, multiplier, bias_after, 0.375, None, -127.0, 127.0, None)
    reordered = (acc + (bias_after + 0.375)).round().clamp(-127, 127)
    assert not torch.equal(want, reordered)  # the case tells the two orders apart
    got = acc.clone()
    assert native.requantize(got, None, multiplier, bias_after, 0.375, None, -127.0, 127.0, None)
    assert same_bits(got, want)


@needs_native
def test_the_passes_decline_what_they_cannot_read() -> None:
    """Each wrapper returns False and leaves its output untouched where the C function would read the wrong
    memory: other dtypes, strided views, layouts that differ, per-channel tensors along two dims."""
    x = torch.randn(4, 3, 5, 5)
    untouched = torch.full_like(x, 7.0)
    assert not native.quantize(x.double(), untouched.double(), 2.0, -1.0, 1.0)
    assert not native.quantize(x[:, :, ::2], untouched[:, :, ::2], 2.0, -1.0, 1.0)  # not dense
    assert not native.quantize(x, untouched.contiguous(memory_format=torch.channels_last), 2.0, -1.0, 1.0)
    assert not native.to_bytes(x, torch.empty(4, 3, 5, 5, dtype=torch.int32), 0)
    assert not native.quantize_to_bytes(x, torch.empty(4, 3, 5, 4, dtype=torch.uint8), 1.0, None, None, 0)
    acc = torch.randn(4, 3, 5, 5)
    kept = acc.clone()
    assert not native.requantize(acc, torch.ones(3, 5, 1), torch.ones(3, 1, 1), None, None, None, -1, 1, None)
    assert not native.requantize(acc, None, torch.ones(4, 1, 1), None, None, None, -1, 1, None)  # no such dim
    assert not native.requantize(acc, None, torch.ones(3, 1, 1).double(), None, None, None, -1, 1, None)
    assert torch.equal(untouched, torch.full_like(x, 7.0)) and torch.equal(acc, kept)
    with native.disabled():
        assert native.status().startswith("off") and not native.quantize(x, untouched, 2.0, -1.0, 1.0)


def test_the_passes_build_wherever_there_is_a_compiler() -> None:
    """A machine with a C compiler whose passes disagree with torch would silently lose the speed (and skip the
    property tests above): that is a failure to look at, not a skip."""
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the eager chains run (tested below)")
    assert native.library() is not None, native.status()


def _resnet() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(12, 3, 32, 32)
    return recalibrate_bn(CifarResNet(14), x), x


class OddConvs(torch.nn.Module):
    """A dilated conv, a strided depthwise conv, a 1x1 conv of odd width, a Conv1d (row-major accumulators: the
    requantization's other loop) and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.c1, self.dw = nn.Conv2d(3, 12, 3, padding=2, dilation=2), nn.Conv2d(12, 12, 3, 2, 1, groups=12)
        self.c3, self.c1d, self.fc = nn.Conv2d(12, 7, 1), nn.Conv1d(7, 5, 3, padding=1), nn.Linear(5 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c3(torch.relu(self.dw(torch.relu(self.c1(x))))).flatten(2)
        return self.fc(torch.tanh(self.c1d(h)).flatten(1))


def _odd() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return OddConvs().eval(), torch.randn(20, 3, 16, 16)


@needs_native
@pytest.mark.parametrize("kernel", ["auto", "emulated"])
@pytest.mark.parametrize("case", ["resnet", "odd convs, asymmetric"])
def test_trials_are_the_same_with_and_without_the_fused_passes(kernel: str, case: str) -> None:
    """Every site's trial, and what the hooks recorded about each tensor's layout, with the passes on and off."""
    model, x = _resnet() if case == "resnet" else _odd()
    qmodel = quantize(model, x, kernel=kernel, act_scheme="symmetric" if case == "resnet" else "asymmetric")
    def draws() -> list[FaultPattern | None]:  # at act, input and acc: the high-BER path, tensor by tensor
        return [None, *(sample_pattern(FaultModel(site, 1e-3), qmodel.targets(FaultModel(site, 1e-3).site), len(x),
                                       trial_generator(3, "native", number))
                        for number, site in enumerate(("act", "weight", "acc", "input", "qparams")))]

    with native.disabled():
        eager_patterns = draws()
        eager = [qmodel(x, pattern) for pattern in eager_patterns]
        eager_strides = dict(qmodel._runtime.strides)
    patterns = draws()
    for pattern, eager_pattern in zip(patterns[1:], eager_patterns[1:]):  # the same faults drawn
        assert pattern is not None and eager_pattern is not None
        assert pattern.groups.keys() == eager_pattern.groups.keys()
        assert all(torch.equal(getattr(group, field), getattr(eager_pattern.groups[key], field))
                   for key, group in pattern.groups.items() for field in ("image", "index", "bit", "kind"))
    fused = [qmodel(x, pattern) for pattern in patterns]
    assert all(torch.equal(a, b) for a, b in zip(eager, fused))
    assert qmodel._runtime.strides == eager_strides
    assert all(not torch.equal(eager[0], faulty) for faulty in eager[1:])  # each site's faults bite


def _run(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


CHECK = """
import torch
from pytest_hwfault import native, quantize
from pytest_hwfault.cifar_resnet import CifarResNet
torch.manual_seed(0)
x = torch.randn(6, 3, 32, 32)
out = quantize(CifarResNet(8).eval(), x)(x)
print(native.status(), '|', out.sum().item(), '|', (out * 1000).round().int().tolist()[0][:4])
"""


def test_without_a_compiler_or_switched_off_the_eager_chains_give_the_same_numbers(tmp_path) -> None:
    off = _run(CHECK, {"PYTEST_HWFAULT_NATIVE": "0"})
    no_compiler = _run(CHECK, {"CC": str(tmp_path / "no-such-compiler"), "PYTEST_HWFAULT_CACHE": str(tmp_path)})
    assert off.startswith("eager: off (PYTEST_HWFAULT_NATIVE=0)")
    assert no_compiler.startswith("eager: could not build") and "no-such-compiler" in no_compiler
    assert off.split("|")[1:] == no_compiler.split("|")[1:]
    if native.library() is not None:
        on = _run(CHECK, {"PYTEST_HWFAULT_CACHE": str(tmp_path / "cache")})
        assert on.startswith("native") and on.split("|")[1:] == off.split("|")[1:]
        assert len(list((tmp_path / "cache").glob("fused-*.so"))) == 1  # built once, then read from the cache
        assert _run(CHECK, {"PYTEST_HWFAULT_CACHE": str(tmp_path / "cache")}) == on


@needs_native
def test_a_compiler_without_openmp_builds_single_threaded_passes(tmp_path) -> None:
    """Apple's clang has no -fopenmp: the passes are built without it (the pragmas ignored), and give the same
    numbers."""
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text('#!/bin/sh\nfor arg in "$@"; do\n  [ "$arg" = -fopenmp ] && { echo "unsupported option '
                       "'-fopenmp'\" >&2; exit 1; }\ndone\nexec " + native._compiler() + ' "$@"\n')
    wrapper.chmod(0o755)
    built = _run(CHECK, {"CC": str(wrapper), "PYTEST_HWFAULT_CACHE": str(tmp_path / "cache")})
    off = _run(CHECK, {"PYTEST_HWFAULT_NATIVE": "0"})
    assert built.startswith("native") and built.split("|")[1:] == off.split("|")[1:]
    assert "GOMP" not in (next((tmp_path / "cache").glob("fused-*.so"))).read_bytes().decode("latin-1")


@needs_native
def test_a_build_that_dies_on_this_cpu_is_replaced_by_a_generic_one(tmp_path) -> None:
    """A -march=native build whose instructions the CPU refuses (simulated: an illegal instruction when it loads)
    kills only the child that tries it once; the generic build is used, with the same numbers."""
    trap = tmp_path / "illegal_on_load.c"
    trap.write_text("__attribute__((constructor)) static void die_on_load(void) { __builtin_trap(); }\n")
    wrapper = tmp_path / "cc-native-dies"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in\n  *" -march=native "*) exec {native._compiler()} "$@" {trap} ;;\n'
                       f'esac\nexec {native._compiler()} "$@"\n')
    wrapper.chmod(0o755)
    built = _run(CHECK, {"CC": str(wrapper), "PYTEST_HWFAULT_CACHE": str(tmp_path / "cache")})
    off = _run(CHECK, {"PYTEST_HWFAULT_NATIVE": "0"})
    assert built.startswith("native") and built.split("|")[1:] == off.split("|")[1:]


@needs_native
def test_a_library_that_disagrees_with_torch_is_not_used(tmp_path) -> None:
    """Built with fast-math (NaN and signed-zero rules relaxed), the passes are caught by the check at load."""
    code = ("from pytest_hwfault import native\n"
            "native.FLAGS = native.FLAGS + ('-ffast-math',)\n"
            "print(native.status())")
    assert _run(code, {"PYTEST_HWFAULT_CACHE": str(tmp_path)}).startswith("eager: disagreed with torch")


@needs_native
@pytest.mark.parametrize("channels", [1, 16])
def test_requantize_follows_in_place_edits_of_its_parameters(channels: int) -> None:
    """The laid-out parameters are remembered per tensor and version: a qparams fault's in-place edit of a
    multiplier (a single value is spread over the channels, a copy) is seen at the next call."""
    acc = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3)) * 300
    multiplier, bias = torch.rand(channels, 1, 1), torch.randn(16, 1, 1).round()
    for value in (0.5, 0.25, 0.75):
        multiplier.fill_(value)
        bias.add_(1.0)
        want = native.eager_requantize(acc.clone(), bias, multiplier, None, None, None, -127.0, 127.0, 0.1)
        got = acc.clone()
        assert native.requantize(got, bias, multiplier, None, None, None, -127.0, 127.0, 0.1)
        assert same_bits(got, want), value
