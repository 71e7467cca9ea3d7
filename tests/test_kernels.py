"""The int8 execution path (`kernels`): each kernel's accumulator against float64 integer arithmetic, and trials
bit-identical between kernel="int8" and kernel="emulated" at every site, batch split and thread count. The
emulated reference runs on torch's eager ops alone (`native.disabled`); the int8 path runs with the fused native
passes where this machine builds them, and without."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TextClassifier, seeded, threads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_hwfault import FaultModel, native, quantize
from pytest_hwfault.cifar_resnet import CifarResNet, recalibrate_bn
from pytest_hwfault.faults import FaultPattern, sample_pattern, trial_generator
from pytest_hwfault.kernels import (
    CHUNK_WEIGHT_SUM,
    Int8Forward,
    available,
    conv2d_int32,
    conv2d_packs,
    linear_int32,
    padded_batch,
    weight_chunks,
)

needs_conv = pytest.mark.skipif(not available("conv2d"), reason="no exact int8 convolution on this machine")
needs_linear = pytest.mark.skipif(not available("linear"), reason="no exact torch._int_mm on this machine")


def _codes(data: st.DataObject, shape: tuple[int, ...], low: int, high: int, label: str) -> torch.Tensor:
    """Codes in [low, high]: random, or all at an extreme, or random with the extremes at random positions, or random
    near the top (large sums of one sign with random low bits: a float32 sum past 2^24 rounds them)."""
    mode = data.draw(st.sampled_from(["random", "low", "high", "extremes", "near high"]), f"{label} mode")
    seed = data.draw(st.integers(0, 2**31 - 1), f"{label} seed")
    generator = torch.Generator().manual_seed(seed)
    if mode == "low":
        return torch.full(shape, low)
    if mode == "high":
        return torch.full(shape, high)
    if mode == "near high":
        return torch.randint(high - (high - low) // 8, high + 1, shape, generator=generator)
    codes = torch.randint(low, high + 1, shape, generator=generator)
    if mode == "extremes":
        where = torch.randint(0, 3, shape, generator=generator)
        codes = torch.where(where == 0, low, torch.where(where == 1, high, codes))
    return codes


# -- each kernel against float64 integer arithmetic --------------------------------------------------------------------
@needs_conv
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_conv2d_accumulator_is_exact(data: st.DataObject) -> None:
    groups = data.draw(st.sampled_from([1, 1, 2, 4]), "groups")
    kernel = data.draw(st.sampled_from([1, 3, 5]), "kernel")
    # float64: a wide layer's accumulator, whose chunks' float32 results are summed past 2^24
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), "accumulator dtype")
    fan_in = 1023 if dtype == torch.float32 else 4000
    per_group = data.draw(st.integers(1, max(1, fan_in // (kernel * kernel))), "channels per group")
    channels = per_group * groups
    out = data.draw(st.integers(1, 6), "out per group") * groups
    size = data.draw(st.integers(kernel, 9), "size")
    batch = data.draw(st.integers(1, 3), "batch")
    stride, padding = data.draw(st.integers(1, 2), "stride"), data.draw(st.integers(0, 2), "padding")
    dilation = data.draw(st.integers(1, 2), "dilation") if size >= 2 * kernel - 1 else 1
    zero_point = data.draw(st.sampled_from([128, 0, 77]), "zero point")  # signed codes, unsigned ones
    low = -zero_point
    x = _codes(data, (batch, channels, size, size), low, low + 255, "x")
    w = _codes(data, (out, per_group, kernel, kernel), -128, 127, "w")
    layout = data.draw(st.sampled_from([torch.contiguous_format, torch.channels_last]), "layout")
    reference = F.conv2d(x.double(), w.double(), stride=stride, padding=padding, dilation=dilation, groups=groups)
    geometry = ((stride,) * 2, (padding,) * 2, (dilation,) * 2, groups)
    packs = conv2d_packs(w, zero_point, *geometry)
    chunks = weight_chunks(w)
    assert packs is not None and chunks is not None and len(packs) == len(chunks)
    _assert_chunked_within_bound(w, chunks)
    u8 = (x + zero_point).to(torch.uint8).contiguous(memory_format=layout)
    results = []
    for n in (1, 2):
        with threads(n):
            results.append(conv2d_int32(u8, packs, out, zero_point, *geometry, dtype))
    for got in results:
        assert got.dtype == dtype
        if dtype == torch.float64 or reference.abs().max() < 1 << 24:  # the dtype holds it exactly: the kernel
            assert torch.equal(got.double(), reference)  # must give it
    assert torch.equal(results[0], results[1])


def _assert_chunked_within_bound(w: torch.Tensor, chunks: list[tuple[int, int]]) -> None:
    """Consecutive ranges covering every input channel, each within the bound for every output channel, and no two
    neighbours that would fit in one (greedy: as few convolutions as the order allows)."""
    per_channel = w.abs().flatten(2).sum(2)  # [out, in per group]
    assert chunks[0][0] == 0 and chunks[-1][1] == w.shape[1]
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])) and all(start < stop for start, stop in chunks)
    assert all(int(per_channel[:, start:stop].sum(1).max()) <= CHUNK_WEIGHT_SUM for start, stop in chunks)
    assert all(int(per_channel[:, start:stop + 1].sum(1).max()) > CHUNK_WEIGHT_SUM for start, stop in chunks[:-1])


@needs_conv
@pytest.mark.parametrize("sign", [-1, 1])
def test_conv2d_at_the_chunk_bound_is_exact(sign: int) -> None:
    """The largest raw sum one chunk may hold, 255 x 65793 = 2^24 - 1: every input byte 255, and the output channel's
    |weight codes| summing to the bound in one conv, either sign; one more makes two chunks."""
    w = torch.zeros(2, 64, 3, 3, dtype=torch.int64)
    if sign < 0:  # 514 x 128 + 1
        w.view(2, -1)[0, :514], w.view(2, -1)[0, 514] = -128, -1
    else:  # 518 x 127 + 7
        w.view(2, -1)[0, :518], w.view(2, -1)[0, 518] = 127, 7
    w.view(2, -1)[1, :300] = 127 * sign
    assert int(w[0].abs().sum()) == CHUNK_WEIGHT_SUM
    assert weight_chunks(w) == [(0, 64)]
    x = torch.full((2, 64, 5, 5), 127)  # bytes 255 with zero point 128
    packs = conv2d_packs(w, 128, (1, 1), (0, 0), (1, 1), 1)
    assert packs is not None and len(packs) == 1
    got = conv2d_int32((x + 128).to(torch.uint8), packs, 2, 128, (1, 1), (0, 0), (1, 1), 1)
    reference = F.conv2d(x.double(), w.double())
    assert torch.equal(got.double(), reference)
    w.view(2, -1)[0, 519] = sign
    assert weight_chunks(w) == [(0, 57), (57, 64)]  # input channel 57 holds products 513-521 of the window


def test_weights_of_a_trained_size_are_one_chunk() -> None:
    """Random-init ResNet56's widest convolution (64 x 64 x 3 x 3, fan-in 576) quantized per channel: mean |code|
    ~30, far below the bound, so one conv where the fixed cut of 513 products made two."""
    from pytest_hwfault.quantization import _weight_codes

    with seeded(0):
        conv = nn.Conv2d(64, 64, 3)
    nn.init.kaiming_normal_(conv.weight)
    codes, _ = _weight_codes(conv.weight, 8, "per_channel")
    assert weight_chunks(codes) == [(0, 64)]
    assert weight_chunks(torch.full((4, 64, 3, 3), -128)) == [(0, 57), (57, 64)]


def test_conv2d_in_one_chunk_is_inexact_past_2_to_24() -> None:
    """Why the fan-in is chunked: one oneDNN conv whose raw uint8 x int8 sums pass 2^24 is off (or this build
    happens to be exact, in which case chunking costs a little and changes nothing)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(250, 256, (4, 112, 6, 6), generator=generator) - 128
    w = torch.randint(120, 128, (32, 112, 3, 3), generator=generator)
    w[::2] *= -1
    reference = F.conv2d(x.double(), w.double(), padding=1)
    assert reference.abs().max() < 1 << 24
    chunked = conv2d_packs(w, 128, (1, 1), (1, 1), (1, 1), 1)
    assert chunked is not None and len(chunked) == 2
    got = conv2d_int32((x + 128).to(torch.uint8), chunked, 32, 128, (1, 1), (1, 1), (1, 1), 1)
    assert torch.equal(got.double(), reference)


@needs_conv
def test_wide_accumulator_sums_chunks_past_2_to_24_exactly() -> None:
    """A wide layer's accumulator (float64): large sums of one sign with random low bits, cut into chunks whose
    float32 results are exact and summed in float64; summed in float32 they would be rounded."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randint(100, 128, (2, 256, 6, 6), generator=generator)
    w = torch.randint(100, 128, (8, 256, 3, 3), generator=generator)
    w[::2] *= -1
    reference = F.conv2d(x.double(), w.double(), padding=1)
    assert reference.abs().max() > 1 << 24
    packs = conv2d_packs(w, 128, (1, 1), (1, 1), (1, 1), 1)
    assert packs is not None and len(packs) > 1 and all(channels is not None for channels, _ in packs)
    u8 = (x + 128).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    got = conv2d_int32(u8, packs, 8, 128, (1, 1), (1, 1), (1, 1), 1, torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, reference)
    in_float32 = conv2d_int32(u8, packs, 8, 128, (1, 1), (1, 1), (1, 1), 1)
    assert not torch.equal(in_float32.double(), reference)  # why the sum is float64


@needs_linear
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_linear_accumulator_is_exact(data: st.DataObject) -> None:
    # k >= 2: torch 2.14's CPU _int_mm is wrong at k == 1 (`kernels.kernel_for` keeps such layers emulated)
    m, k, n = data.draw(st.integers(1, 300), "m"), data.draw(st.integers(2, 2048), "k"), data.draw(st.integers(1, 40))
    zero_point = data.draw(st.sampled_from([128, 0, 200]), "zero point")
    shift = zero_point - 128
    x = _codes(data, (m, k), -zero_point, 255 - zero_point, "x")
    w = _codes(data, (n, k), -128, 127, "w")
    w8 = w.to(torch.int8)
    sums = w8.sum(dim=1, dtype=torch.int32)
    for threads_ in (1, 2):
        with threads(threads_):
            got = linear_int32((x + shift).to(torch.int8), w8.t(), shift, sums)
        assert got.dtype == torch.int32
        assert torch.equal(got.double(), x.double() @ w.double().t())


def test_padded_batches_are_few_sizes_and_few_images_more() -> None:
    """Convolutions run at a padded batch size: never fewer images, at most 7 more past 8 (twice as many up to 8),
    and only 19 sizes up to 128 images."""
    sizes = {padded_batch(n) for n in range(1, 129)}
    assert len(sizes) == 19 and max(sizes) == 128
    for n in range(1, 2049):
        padded = padded_batch(n)
        assert n <= padded <= (2 * n if n <= 8 else n + 7) and padded_batch(padded) == padded


# -- models: the same numbers on both paths ----------------------------------------------------------------------------
def _resnet20() -> tuple[nn.Module, torch.Tensor]:
    return _resnet(20, 24)


def _resnet(depth: int, images: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(images, 3, 32, 32)
    return recalibrate_bn(CifarResNet(depth), x), x


SITES = {"act": 1e-3, "weight": 1e-3, "acc": 1e-3, "input": 1e-3, "qparams": 2e-3}


def _patterns(qmodel: object, n_images: int, pe: bool) -> dict[str, FaultPattern]:
    patterns = {}
    for site, ber in SITES.items():
        fault_model = FaultModel(site, ber)
        targets = qmodel.targets(fault_model.site)  # type: ignore[attr-defined]
        patterns[site] = sample_pattern(fault_model, targets, n_images, trial_generator(1, "kernels", len(patterns)))
        assert len(patterns[site])
    if pe:
        patterns["pe"] = FaultPattern.from_faults([("pe", "ws8x8.acc", 9, 20, "flip"), ("pe", "ws8x8.acc", 3, 5,
                                                                                      "stuck1")])
    return patterns


def _outputs(qmodel: object, x: torch.Tensor, patterns: dict[str, FaultPattern], split: int | None,
             n_threads: int, eager: bool = False) -> dict[str, torch.Tensor]:
    """Logits of a fault-free pass and of each site's trial, in batches of `split` images (on torch's eager ops
    alone where `eager`)."""
    outputs = {}
    with threads(n_threads), native.disabled() if eager else contextlib.nullcontext():
        for site, pattern in {"clean": None, **patterns}.items():
            step = split or len(x)
            outputs[site] = torch.cat([qmodel(x[s:s + step], pattern, s)  # type: ignore[operator]
                                       for s in range(0, len(x), step)])
    return outputs


def _assert_identical(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    for site, logits in reference.items():
        assert torch.equal(other[site], logits), site


@needs_conv
@pytest.mark.parametrize("memory_format", ["auto", "preserve"])
def test_resnet_trials_bit_identical(memory_format: str) -> None:
    model, x = _resnet20()
    int8 = quantize(model, x, kernel="int8", memory_format=memory_format)
    emulated = quantize(model, x, kernel="emulated", memory_format=memory_format)
    assert set(int8.kernels.values()) == {"int8"} and set(emulated.kernels.values()) == {"emulated"}
    patterns = _patterns(emulated, len(x), pe=True)
    reference = _outputs(emulated, x, patterns, None, 1, eager=True)
    assert all(not torch.equal(reference[site], reference["clean"]) for site in patterns)  # the faults bite
    # two threads once: in an xdist worker that was given one, they oversubscribe the CI machine (this test took
    # 140 s under -n 2 with three two-thread passes, 6 s alone)
    splits = ((None, 2), (8, 1), (5, 1)) if memory_format == "auto" else ((None, 1), (5, 1))
    for split, n_threads in splits:
        _assert_identical(reference, _outputs(int8, x, patterns, split, n_threads))
    _assert_identical(reference, _outputs(int8, x, patterns, 8, 1, eager=True))
    _assert_identical(reference, _outputs(emulated, x, patterns, 5, 1))
    # and after the weight faults were restored, the original packs are used again
    assert torch.equal(int8(x), reference["clean"])
    # every tensor the hooks saw had the layout it has on the emulated path (memory_format="preserve" keeps NCHW)
    assert int8._runtime.strides == emulated._runtime.strides
    forwards = [m.forward for m in int8.module.modules() if isinstance(m.__dict__.get("forward"), Int8Forward)]
    assert forwards and all(f.fallbacks == 0 for f in forwards)  # type: ignore[attr-defined]


@needs_conv
def test_resnet56_trials_bit_identical() -> None:
    """The model of the speed targets: 55 convs (the third stage's fan-in of 576 cut into chunks) and the fc on
    int8 kernels, every site and a faulty PE, whole and split (one thread: the thread counts are the ResNet20
    test's, where they cost less under xdist)."""
    model, x = _resnet(56, 8)
    int8 = quantize(model, x, kernel="int8")
    emulated = quantize(model, x, kernel="emulated")
    assert set(int8.kernels.values()) == {"int8"} and len(int8.kernels) == 56
    patterns = _patterns(emulated, len(x), pe=True)
    reference = _outputs(emulated, x, patterns, None, 1, eager=True)
    assert all(not torch.equal(reference[site], reference["clean"]) for site in patterns)
    for split in (None, 3):
        _assert_identical(reference, _outputs(int8, x, patterns, split, 1))
    _assert_identical(reference, _outputs(int8, x, patterns, None, 1, eager=True))
    assert torch.equal(int8(x), reference["clean"])


class WideConvNet(nn.Module):
    """Convolutions whose sums may pass 2^24 (fan-ins 160 x 9 and 80 x 25: float64 accumulators), one of them
    grouped, beside float32 ones; weights as initialised (mean |code| ~64), so each wide layer's codes are cut
    into chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 160, 3, padding=1)
        self.wide = nn.Conv2d(160, 160, 3, padding=1)
        self.linked = nn.Conv2d(160, 160, 3, padding=1)  # reads `wide`'s codes, through its ReLU
        self.grouped = nn.Conv2d(160, 64, 5, padding=2, groups=2, bias=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        y = self.linked(torch.relu(self.wide(y))) + y
        return self.head(torch.relu(self.grouped(y)).mean((2, 3)))


@needs_conv
@pytest.mark.parametrize("memory_format", ["auto", "preserve"])
def test_wide_convolutions_run_on_int8_kernels_bit_identical(memory_format: str) -> None:
    """A wide Conv2d (float64 accumulator) sums its chunks' exact float32 results in float64 on the int8 path: every
    site and a faulty PE give the emulated float64 convolution's numbers, whole and split, in its layouts."""
    from pytest_hwfault.kernels import Int8Conv2d

    torch.manual_seed(0)
    model, x = WideConvNet().eval(), torch.randn(10, 3, 12, 12)
    int8 = quantize(model, x, kernel="int8", memory_format=memory_format)
    emulated = quantize(model, x, kernel="emulated", memory_format=memory_format)
    assert set(int8.kernels.values()) == {"int8"}
    dtypes = {name: layer.compute_dtype for name, layer in int8.layers.items()}
    assert dtypes == {"stem": torch.float32, "wide": torch.float64, "linked": torch.float64, "grouped": torch.float64,
                      "head": torch.float32}
    assert int8.layers["linked"].reads_codes  # its input bytes from the producer's float32 codes
    wide = int8.layers["wide"].module.forward
    assert isinstance(wide, Int8Conv2d) and len(wide._weight_pack()) > 1  # several chunks, each its own channels
    grouped = int8.layers["grouped"].module.forward
    assert isinstance(grouped, Int8Conv2d) and len(grouped._weight_pack()) > 1
    patterns = _patterns(emulated, len(x), pe=True)
    reference = _outputs(emulated, x, patterns, None, 1, eager=True)
    assert all(not torch.equal(reference[site], reference["clean"]) for site in patterns)
    for split, n_threads in ((None, 2), (3, 1)):
        _assert_identical(reference, _outputs(int8, x, patterns, split, n_threads))
    _assert_identical(reference, _outputs(int8, x, patterns, 4, 1, eager=True))
    assert torch.equal(int8(x), reference["clean"])
    assert int8._runtime.strides == emulated._runtime.strides
    assert wide.fallbacks == 0 and grouped.fallbacks == 0


class Conv1dNet(nn.Module):
    """Sequence-first input transposed to [N, C, L] (channels innermost in memory), a strided Conv1d, a wide one
    (fan-in 128 x 9: float64 sums), a grouped dilated one and a Conv2d-free head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(6, 128, 5, padding=2)
        self.wide = nn.Conv1d(128, 64, 9, stride=2, padding=4)
        self.grouped = nn.Conv1d(64, 64, 3, dilation=2, groups=4, bias=False)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x.transpose(1, 2)))
        y = torch.relu(self.grouped(torch.relu(self.wide(y))))
        return self.head(y.mean(2))


@needs_conv
def test_conv1d_runs_on_int8_kernels_bit_identical() -> None:
    """A Conv1d is oneDNN's int8 convolution of height 1, a wide one included: every site, whole and split, with the
    emulated path's numbers and its row-major outputs."""
    from pytest_hwfault.kernels import Int8Conv1d

    torch.manual_seed(0)
    model, x = Conv1dNet().eval(), torch.randn(12, 40, 6)
    int8, emulated = quantize(model, x, kernel="int8"), quantize(model, x, kernel="emulated")
    assert set(int8.kernels.values()) == {"int8"}
    assert int8.layers["wide"].compute_dtype == torch.float64
    forwards = [int8.layers[name].module.forward for name in ("stem", "wide", "grouped")]
    assert all(isinstance(forward, Int8Conv1d) for forward in forwards)
    patterns = _patterns(emulated, len(x), pe=False)
    reference = _outputs(emulated, x, patterns, None, 1, eager=True)
    assert all(not torch.equal(reference[site], reference["clean"]) for site in patterns)
    for split, n_threads in ((None, 2), (5, 1)):
        _assert_identical(reference, _outputs(int8, x, patterns, split, n_threads))
    assert int8._runtime.strides == emulated._runtime.strides
    assert all(forward.fallbacks == 0 for forward in forwards)  # type: ignore[attr-defined]


@needs_conv
def test_switching_kernels_on_one_view() -> None:
    model, x = _resnet20()
    qmodel = quantize(model, x)
    assert set(qmodel.kernels.values()) == {"int8"} and qmodel.config["kernel"] == "auto"
    patterns = _patterns(qmodel, len(x), pe=False)
    fast = _outputs(qmodel, x, patterns, None, 2)
    assert set(qmodel.use_kernel("emulated").values()) == {"emulated"}
    _assert_identical(fast, _outputs(qmodel, x, patterns, 7, 1))
    qmodel.use_kernel("auto")
    _assert_identical(fast, _outputs(qmodel, x, patterns, 12, 2))


@needs_conv
def test_asymmetric_codes_bit_identical() -> None:
    """Unsigned activation codes with zero points: the conv reads code + zero point as uint8."""
    model, x = _resnet20()
    int8 = quantize(model, x, act_scheme="asymmetric", kernel="int8")
    emulated = quantize(model, x, act_scheme="asymmetric", kernel="emulated")
    assert "int8" in int8.kernels.values()
    patterns = _patterns(emulated, len(x), pe=False)
    reference = _outputs(emulated, x, patterns, None, 2, eager=True)
    _assert_identical(reference, _outputs(int8, x, patterns, 10, 1))
    _assert_identical(reference, _outputs(emulated, x, patterns, 10, 1))


@needs_linear
def test_transformer_trials_bit_identical() -> None:
    torch.manual_seed(0)
    model = TextClassifier().eval()
    tokens = torch.randint(0, 40, (12, 9))
    int8 = quantize(model, tokens, kernel="int8")
    emulated = quantize(model, tokens, kernel="emulated")
    # the projections and the MLP on _int_mm; the attention matmuls of two activations stay emulated
    assert int8.kernels == {name: ("emulated" if type(layer.module) is not nn.Linear else "int8")
                            for name, layer in int8.layers.items()}
    assert {"int8", "emulated"} <= set(int8.kernels.values())
    patterns = _patterns(emulated, len(tokens), pe=False)  # site pe refuses models with attention matmuls
    reference = _outputs(emulated, tokens, patterns, None, 2, eager=True)
    assert all(not torch.equal(reference[site], reference["clean"]) for site in patterns)  # the faults bite
    for split, n_threads in ((None, 1), (5, 2)):
        _assert_identical(reference, _outputs(int8, tokens, patterns, split, n_threads))
    _assert_identical(reference, _outputs(emulated, tokens, patterns, 5, 1))


@needs_conv
def test_wide_codes_fall_back_per_layer() -> None:
    """bits=12: no code fits int8, every layer stays emulated (also when int8 is asked for), same numbers."""
    model, x = _resnet20()
    wide = quantize(model, x, bits=12, kernel="int8")
    assert set(wide.kernels.values()) == {"emulated"}
    emulated = quantize(model, x, bits=12, kernel="emulated")
    patterns = _patterns(emulated, len(x), pe=False)
    _assert_identical(_outputs(emulated, x, patterns, None, 2), _outputs(wide, x, patterns, 8, 2))


@needs_conv
def test_mixed_model_falls_back_per_layer() -> None:
    """A conv with reflect padding (emulated) next to int8 layers: a Conv1d and a wide Linear (fan-in 1100, float64
    sums) among them."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
            self.line = nn.Conv1d(8, 4, 3)
            self.wide = nn.Linear(4 * 62, 1100)
            self.head = nn.Linear(1100, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.reflect(torch.relu(self.conv(x)))
            y = self.line(y.mean(2))
            return self.head(torch.relu(self.wide(y.flatten(1))))

    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(6, 3, 8, 64)
    int8 = quantize(model, x, kernel="int8")
    assert int8.kernels == {"conv": "int8", "reflect": "emulated", "line": "int8", "wide": "int8", "head": "int8"}
    assert int8.layers["head"].compute_dtype == torch.float64  # _int_mm's int32 sum, converted to float64
    emulated = quantize(model, x, kernel="emulated")
    patterns = _patterns(emulated, len(x), pe=False)
    _assert_identical(_outputs(emulated, x, patterns, None, 2), _outputs(int8, x, patterns, 4, 1))


def test_kernel_option_is_checked() -> None:
    model, x = _resnet20()
    with pytest.raises(ValueError, match="kernel="):
        quantize(model, x[:4], kernel="fast")
    qmodel = quantize(model, x[:4], kernel="emulated")
    with pytest.raises(ValueError, match="kernel="):
        qmodel.use_kernel("int4")


@needs_conv
def test_autograd_runs_emulated() -> None:
    """With autograd recording, the module's own forward runs (the kernel has no gradient)."""
    model, x = _resnet20()
    qmodel = quantize(model, x[:4])
    layer = qmodel.layers["conv1"]
    codes = torch.randint(-127, 128, (2, 3, 32, 32)).float().requires_grad_()
    out = layer.module.forward(codes)
    assert out.requires_grad and out.grad_fn is not None
    copy.deepcopy(qmodel.module)  # a copy drops the packs (opaque tensors) and rebuilds them when it runs


@needs_linear
def test_linear_of_one_input_feature_stays_emulated() -> None:
    """torch 2.14's CPU _int_mm is wrong for a contraction of length 1: such a Linear is not put on it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(10, 1)
    qmodel = quantize(model, x, kernel="int8")
    assert qmodel.kernels == {"0": "emulated", "2": "int8"}
    assert torch.equal(qmodel(x), quantize(model, x, kernel="emulated")(x))


@needs_conv
@pytest.mark.parametrize("fmt", ["ao_fx", "pt2e", "onnx_u8", "onnx_s8"])
def test_deployed_models_bit_identical(fmt: str, digits: object, tmp_path: object) -> None:
    """A deployed int8 model's own zero points, signedness and arithmetic: the kernels read its codes as they are."""
    from deployed_models import images, to_ao_fx, to_onnx_qdq, to_pt2e, trained_resnet_style

    pytest.importorskip("onnxruntime" if fmt.startswith("onnx") else "torchao" if fmt == "pt2e" else "torch")
    calibration = images(digits.x_train[:64])  # type: ignore[attr-defined]
    x = images(digits.x_train[64:112])  # type: ignore[attr-defined]
    net = trained_resnet_style(digits)
    model = (to_ao_fx(net, calibration) if fmt == "ao_fx" else to_pt2e(net, calibration) if fmt == "pt2e"
             else to_onnx_qdq(net, calibration, tmp_path, fmt.split("_")[1]))
    int8, emulated = quantize(model, calibration, kernel="int8"), quantize(model, calibration, kernel="emulated")
    assert set(int8.kernels.values()) == {"int8"}
    patterns = _patterns(emulated, len(x), pe=False)
    _assert_identical(_outputs(emulated, x, patterns, None, 2), _outputs(int8, x, patterns, 20, 1))


@needs_conv
@pytest.mark.parametrize("fmt", ["ao_fx", "pt2e", "onnx_u8"])
def test_deployed_wide_layers_bit_identical(fmt: str, tmp_path: object) -> None:
    """A deployed model whose convolutions sum in float64 (128 channels, 3x3: unsigned or signed codes whose sums
    may pass 2^24) computes them on int8 kernels, with the numbers of its runtime's arithmetic on the emulated path."""
    from deployed_models import ResNetStyle, to_ao_fx, to_onnx_qdq, to_pt2e

    pytest.importorskip("onnxruntime" if fmt.startswith("onnx") else "torchao" if fmt == "pt2e" else "torch")
    with seeded(0):
        calibration, x = torch.randn(32, 1, 8, 8), torch.randn(6, 1, 8, 8)
        net = recalibrate_bn(ResNetStyle(channels=128), calibration)
    model = (to_ao_fx(net, calibration) if fmt == "ao_fx" else to_pt2e(net, calibration) if fmt == "pt2e"
             else to_onnx_qdq(net, calibration, tmp_path, fmt.split("_")[1]))
    int8, emulated = quantize(model, calibration, kernel="int8"), quantize(model, calibration, kernel="emulated")
    assert set(int8.kernels.values()) == {"int8"}
    assert torch.float64 in {layer.compute_dtype for layer in int8.layers.values()}
    patterns = _patterns(emulated, len(x), pe=False)
    reference = _outputs(emulated, x, patterns, None, 1, eager=True)
    assert all(not torch.equal(reference[site], reference["clean"]) for site in patterns)
    _assert_identical(reference, _outputs(int8, x, patterns, None, 2))
    _assert_identical(reference, _outputs(int8, x, patterns, 4, 1))


@needs_conv
@pytest.mark.parametrize("site", ["act", "weight", "acc"])
def test_campaign_trials_bit_identical(site: str) -> None:
    """Campaign trials (fault dropping and late start on: the suffix graphs run the same modules) agree."""
    from dataclasses import asdict

    from pytest_hwfault.campaign import Campaign
    from pytest_hwfault.spec import CampaignSpec

    model, x = _resnet20()
    labels = torch.arange(len(x)) % 10
    spec = CampaignSpec(site=site, ber=1e-4, min_acc=0.0, budget=3, first=3, seed=2)
    results = []
    for kernel in ("int8", "emulated"):
        campaign = Campaign(quantize(model, x, kernel=kernel), x, labels, spec, "tests::kernels", batch_size=10)
        results.append([asdict(campaign.trial(i)) for i in range(3)])
    assert results[0] == results[1]
    assert any(trial["faults"] for trial in results[0])


@needs_conv
def test_weight_edits_are_seen() -> None:
    """The conv's packed weights follow in-place edits of the module's weight codes (as weight faults make them),
    and come back when the codes are restored; a weight without a version counter is compared every call."""
    model, x = _resnet20()
    qmodel = quantize(model, x[:4])
    module = qmodel.layers["layer2.0.conv1"].module
    assert isinstance(module.__dict__["forward"], Int8Forward)
    codes = torch.randint(-128, 128, (2, 16, 32, 32)).float().contiguous(memory_format=torch.channels_last)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return module.forward(codes), type(module).forward(module, codes)

    original = both()[0]
    weight = module.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[[3, 500, 4000]] = torch.tensor([-128.0, 127.0, 0.0])
    fast, slow = both()
    assert torch.equal(fast, slow) and not torch.equal(fast, original)
    with torch.no_grad():
        weight.copy_(saved)
    assert torch.equal(both()[0], original)
    with torch.inference_mode():  # an inference tensor: no version counter
        module.weight = nn.Parameter(saved.clone().neg_().clamp_(-127, 127), requires_grad=False)
    fast, slow = both()
    assert torch.equal(fast, slow) and not torch.equal(fast, original)


@needs_conv
def test_a_restored_weight_reuses_its_pack_only_where_it_was_confirmed() -> None:
    """After a weight trial the original pack serves the restored codes without comparing them, where it was
    confirmed for the codes before the trial; codes edited outside a trial are compared, never trusted."""
    from pytest_hwfault.kernels import _version

    model, x = _resnet20()
    qmodel = quantize(model, x[:4])
    clean = qmodel(x[:4])
    name = "layer3.0.conv2"  # fan-in 576: its chunks are counted
    forward = qmodel.layers[name].module.__dict__["forward"]
    weight = qmodel.layers[name].module.weight
    pattern = FaultPattern.from_faults([("weight", name, 7, 7, "flip"), ("weight", "layer1.0.conv1", 3, 6, "flip")])
    assert not torch.equal(qmodel(x[:4], pattern), clean)
    assert forward._seen == _version(weight) and torch.equal(qmodel(x[:4]), clean)
    with torch.no_grad():  # an edit outside a trial: the original pack no longer holds the codes
        weight.view(-1)[5] = 90.0 if float(weight.view(-1)[5]) != 90.0 else 80.0
    edited = qmodel(x[:4])
    assert not torch.equal(edited, clean)
    qmodel(x[:4], pattern)
    assert torch.equal(qmodel(x[:4]), edited)
