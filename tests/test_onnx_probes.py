"""The per-node probes of onnxruntime's integer kernels (`onnx_probes`): they agree with the installed onnxruntime
on random grids (the reproduced kernels are its arithmetic), they disagree when the view's arithmetic is off by a
rounding, and a disagreeing node is named in the model's notes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deployed_models import images, to_onnx_qdq, trained_resnet_style
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_hwfault import onnx_probes, onnx_reader, quantize

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("single_threaded")

# scales as float32 values; decimal ones make ties (products landing on half codes)
SCALES = st.one_of(st.integers(1, 300).map(lambda k: float(np.float32(k / 1000))),
                   st.floats(1e-3, 0.3).map(lambda v: float(np.float32(v))))


def _grid(data: st.DataObject, name: str, signed: bool) -> tuple[float, int]:
    low = -128 if signed else 0
    return data.draw(SCALES, label=f"s_{name}"), data.draw(st.integers(low, low + 255), label=f"z_{name}")


def _uncached(probe: object) -> object:
    return probe.__wrapped__  # type: ignore[attr-defined]


@settings(max_examples=10, deadline=None)
@given(data=st.data(), signed=st.booleans(), op=st.sampled_from(["QLinearAdd", "QLinearMul"]))
def test_binary_probes_agree_on_random_grids(data: st.DataObject, signed: bool, op: str) -> None:
    a, b, c = (_grid(data, name, signed) for name in "abc")
    assert _uncached(onnx_probes.binary_agrees)(op, a, b, c, signed)


@settings(max_examples=8, deadline=None)
@given(data=st.data(), signs=st.sampled_from([(False, False, False), (True, True, True), (False, True, False)]),
       relu=st.booleans())
def test_matmul_probe_agrees_on_random_grids(data: st.DataObject, signs: tuple[bool, bool, bool],
                                             relu: bool) -> None:
    grids = [(*_grid(data, name, signed), signed) for name, signed in zip("aby", signs)]
    assert _uncached(onnx_probes.matmul_agrees)(*grids, relu)


@settings(max_examples=8, deadline=None)
@given(data=st.data(), signed=st.booleans(), opset=st.sampled_from([11, 13]),
       width=st.one_of(st.none(), st.integers(1, 300)))
def test_softmax_probe_agrees_on_random_grids(data: st.DataObject, signed: bool, opset: int,
                                              width: int | None) -> None:
    x = _grid(data, "x", signed)
    y = (data.draw(st.integers(100, 400), label="1 / s_y") ** -1, data.draw(st.integers(-128 if signed else 0,
                                                                                          -120 if signed else 8)))
    assert _uncached(onnx_probes.softmax_agrees)(x, (float(np.float32(y[0])), y[1]), signed, opset, width)


@settings(max_examples=6, deadline=None)
@given(data=st.data(), signed=st.booleans(), geometry=st.sampled_from([
    ((3, 3), (1, 1), (1, 1, 1, 1), False), ((2, 2), (2, 2), (0, 0, 0, 0), True), ((3, 3), (2, 2), (1, 0, 1, 0), True)]))
def test_pool_probes_agree_on_random_grids(data: st.DataObject, signed: bool, geometry: tuple) -> None:
    x, y = _grid(data, "x", signed), _grid(data, "y", signed)
    assert _uncached(onnx_probes.global_pool_agrees)(x, y, signed, data.draw(st.sampled_from([None, 5])))
    assert _uncached(onnx_probes.average_pool_agrees)(x, y, signed, *geometry)


def test_a_probe_sees_a_rounding_the_view_gets_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each probe fails when the view's arithmetic rounds otherwise than onnxruntime's: QLinearMul's zero point
    added after the rounding (the reader's error before the probe found it), QLinearAdd's fixed part as a sum of
    two roundings, QLinearMatMul's multiplier one ulp off."""
    grids = ((0.05, 3), (0.085, 0), (0.1, 7))

    def mul_rounding_first(self: onnx_reader.QLinearMul, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        qa = onnx_reader.stored_codes(a, self.sa, self.za).sub_(self.za)
        qb = onnx_reader.stored_codes(b, self.sb, self.zb).sub_(self.zb)
        out = torch.mul(qa, qb).mul_(torch.tensor(self.ratio, dtype=torch.float32)).round_().add_(self.zc)
        return onnx_reader.code_values(onnx_reader._saturate(out, self.low, self.high), self.sc, self.zc)

    assert _uncached(onnx_probes.binary_agrees)("QLinearMul", *grids, False)
    with monkeypatch.context() as patch:
        patch.setattr(onnx_reader.QLinearMul, "forward", mul_rounding_first)
        assert _uncached(onnx_probes.binary_agrees)("QLinearMul", *grids, False) is False

    # the sum of two roundings misses a code on some grids (5 of these 30)
    found = []
    rng = np.random.default_rng(0)
    with monkeypatch.context() as patch:
        patch.setattr(onnx_reader, "_fma_f32", lambda a, b, c: float(np.float32(np.float32(a) * np.float32(b))
                                                                       + np.float32(c)))
        for _ in range(30):
            trial = tuple((float(np.float32(rng.uniform(0.01, 0.2))), int(rng.integers(0, 256))) for _ in range(3))
            if _uncached(onnx_probes.binary_agrees)("QLinearAdd", *trial, False) is False:
                found.append(trial)
        assert found
    assert all(_uncached(onnx_probes.binary_agrees)("QLinearAdd", *trial, False) for trial in found)

    matmul = ((0.05, 3, False), (0.02, 127, False), (0.3, 9, False))
    assert _uncached(onnx_probes.matmul_agrees)(*matmul, False)
    with monkeypatch.context() as patch:
        original = onnx_reader.QLinearMatMul.__init__

        def off_by_an_ulp(self: onnx_reader.QLinearMatMul, *args: object, **kwargs: object) -> None:
            original(self, *args, **kwargs)
            self.multiplier = float(np.nextafter(np.float32(self.multiplier), np.float32(1)))

        patch.setattr(onnx_reader.QLinearMatMul, "__init__", off_by_an_ulp)
        assert _uncached(onnx_probes.matmul_agrees)(*matmul, False) is False


def test_a_disagreeing_kernel_is_named_in_the_notes(digits, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A ResNet-style QDQ model's residual Adds run as QLinearAdd: certified by their probes, no note; where the
    probe disagrees (here: made to), each node is named, and the view still computes it."""
    model, calibration = trained_resnet_style(digits), images(digits.x_train[:200])
    path = to_onnx_qdq(model, calibration, tmp_path, "u8")
    x = images(digits.x_test[:32])
    notes = quantize(path, x).config["deployed_notes"]
    assert not any("disagree" in str(note) for note in notes), notes
    monkeypatch.setattr(onnx_probes, "binary_agrees", lambda *args: False)
    qmodel = quantize(path, x)
    named = [str(note) for note in qmodel.config["deployed_notes"] if "disagree" in str(note)]
    adds = [n for n, m in qmodel.module.named_modules() if type(m).__name__ == "QLinearAdd"]
    assert adds and len(named) == 1 and f"QLinearAdd x{len(adds)} (" in named[0], named
    # a probe onnxruntime cannot run (here: made so) is named too, as not certified
    monkeypatch.setattr(onnx_probes, "binary_agrees", lambda *args: None)
    notes = [str(note) for note in quantize(path, x).config["deployed_notes"]]
    assert not any("disagree" in note for note in notes)
    named = [note for note in notes if "could not run a probe" in note]
    assert len(named) == 1 and f"QLinearAdd x{len(adds)} (" in named[0], named


def test_a_grid_that_cannot_be_probed_is_not_called_agreeing() -> None:
    """A scale of zero (or below) gives no probe: None, which the reader names as not certified, never True."""
    assert _uncached(onnx_probes.binary_agrees)("QLinearAdd", (0.0, 3), (0.1, 0), (0.1, 7), False) is None
    assert _uncached(onnx_probes.softmax_agrees)((0.1, 0), (0.0, 0), False, 13, 8) is None
    assert _uncached(onnx_probes.matmul_agrees)((0.1, 0, False), (-0.1, 0, False), (0.1, 0, False), False) is None


def test_degenerate_grids_are_probed_as_onnxruntime_runs_them() -> None:
    """An attention mask calibrated on float32's minimum gets an infinite scale (GPT-2's, quantized): its QLinearAdd
    and the QLinearSoftmax after it are probed on that grid. The softmax's NaNs (exp(0 x inf) at each row's maximum)
    become code 0 of the kernel's type, uint8 and int8 alike, not the lowest code (found by this probe)."""
    inf = float("inf")
    assert onnx_probes.binary_agrees("QLinearAdd", (0.0005346, 130), (inf, 128), (inf, 128), False)
    assert onnx_probes.softmax_agrees((inf, 128), (1 / 255, 0), False, 13, 12)
    assert onnx_probes.softmax_agrees((inf, 0), (1 / 255, -128), True, 13, 12)
    nan_row = onnx_reader.QLinearSoftmax(inf, (1 / 255, -128), True, -1, 13)(torch.full((1, 4), float("nan")))
    assert torch.equal(nan_row, torch.full((1, 4), 128 / 255, dtype=torch.float32))


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("zero", [3, 7, 0])
def test_kernels_round_ties_as_onnxruntime_with_odd_zero_points(signed: bool, zero: int) -> None:
    """Grids whose results land on half codes (power-of-two scale ratios), with odd output zero points: where a
    kernel adds its zero point (before or after the rounding) decides the code of every tie. QLinearMatMul and
    QLinearGlobalAveragePool round, then add; QLinearAveragePool and QLinearMul add, then round; the softmax's
    quotient rounds, then adds (the probes agree on each)."""
    z = zero - 128 if signed else zero
    zx = -3 if signed else 5
    unit = (1.0, 0 if signed else 128, signed)
    assert _uncached(onnx_probes.matmul_agrees)(unit, unit, (2.0, z, signed), False)
    assert _uncached(onnx_probes.matmul_agrees)((0.5, 1, signed), (0.25, 3, signed), (0.5, z, signed), False)
    assert _uncached(onnx_probes.global_pool_agrees)((0.5, zx), (0.25, z), signed, None)
    assert _uncached(onnx_probes.average_pool_agrees)((0.1, zx), (0.1, z), signed, (2, 2), (2, 2), (0, 0, 0, 0), True)
    assert _uncached(onnx_probes.softmax_agrees)((0.5, zx), (0.5, z), signed, 13, 4)
    assert _uncached(onnx_probes.binary_agrees)("QLinearMul", (0.5, zx), (0.25, zx), (0.5, z), signed)
