"""Faults in the stored quantization parameters (site="qparams"): each layer's float32 requantization multipliers
and its output zero point register, persistent for a trial and restored bit-exactly after it."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_hwfault import FaultModel, FaultPattern, accuracy, quantize
from pytest_hwfault.faults import Site, sample_pattern
from pytest_hwfault.spec import CampaignSpec

pytestmark = pytest.mark.usefixtures("single_threaded")


def _float_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _from_bits(raw: int) -> float:
    return struct.unpack("<f", struct.pack("<i", raw))[0]


def _out_codes(qmodel, name: str, x: torch.Tensor, pattern: FaultPattern | None = None) -> torch.Tensor:  # noqa: ANN001
    layer = qmodel.layers[name]
    seen: list[torch.Tensor] = []
    handle = layer.module.register_forward_hook(lambda m, a, o: seen.append(layer.dequantize_output(o.clone())))
    try:
        logits = qmodel(x, pattern)
    finally:
        handle.remove()
    return torch.round(seen[0].double() / layer.act_scale), logits


@pytest.fixture(scope="module", params=["symmetric", "asymmetric"])
def qmodel(request, digits, trained_cnn):  # noqa: ANN001, ANN201
    return quantize(trained_cnn, digits.x_train[:256], act_scheme=request.param)


def test_qparams_words_are_the_multipliers_then_the_zero_point(qmodel) -> None:  # noqa: ANN001
    for name, layer in qmodel.layers.items():
        channels = layer.weight_scale.numel()
        assert layer.numel(Site.QPARAMS) == channels + 1 and layer.site_bits(Site.QPARAMS) == 32
        target = next(t for t in qmodel.targets(Site.QPARAMS) if t.layer == name)
        assert (target.numel, target.bits) == (channels + 1, 32)


def test_a_multiplier_fault_rescales_one_channel_exactly(qmodel, digits) -> None:  # noqa: ANN001
    """Bit 23 (the exponent's lowest bit) of channel c's float32 multiplier doubles or halves it: that channel's
    output codes become round(acc x 2m) (or x m/2) and saturate; other channels are untouched."""
    x = digits.x_test[:8]
    layer = qmodel.layers["1"]
    channel = 3
    m = float(layer.requant_multiplier().reshape(-1)[channel])
    changed = _from_bits(_float_bits(m) ^ (1 << 23))
    assert changed in (2 * m, m / 2)
    clean, _ = _out_codes(qmodel, "1", x)
    faulty, _ = _out_codes(qmodel, "1", x, FaultPattern.from_faults([("qparams", "1", channel, 23, "flip")]))
    others = [c for c in range(clean.shape[1]) if c != channel]
    assert torch.equal(clean[:, others], faulty[:, others])
    low, high = layer.act_range
    # the clean code c came from an accumulator a with round(a m) = c; now the code is clamp(round(a m'))
    ratio = changed / m
    expected = torch.clamp(clean[:, channel] * ratio, low, high)  # exact away from rounding ties
    assert float((faulty[:, channel] - expected).abs().max()) <= abs(ratio) / 2 + 0.5
    assert not torch.equal(clean[:, channel], faulty[:, channel])


def test_a_zero_point_fault_shifts_every_code_before_saturation(qmodel, digits) -> None:  # noqa: ANN001
    x = digits.x_test[:8]
    name = list(qmodel.layers)[-1]
    layer = qmodel.layers[name]
    word = layer.weight_scale.numel()  # the zero point register
    clean, _ = _out_codes(qmodel, name, x)
    for bit, kind in [(2, "flip"), (0, "stuck1"), (31, "flip")]:
        zero = layer.act_zero_point
        register = zero ^ (1 << bit) if kind == "flip" else zero | (1 << bit)
        register = register - (1 << 32) if register >= 1 << 31 else register
        faulty, _ = _out_codes(qmodel, name, x, FaultPattern.from_faults([("qparams", name, word, bit, kind)]))
        low, high = layer.act_range
        assert torch.equal(faulty, torch.clamp(clean + (register - zero), low, high)), (bit, kind)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_qparams_faults_are_restored_bit_exactly(qmodel, digits, data) -> None:  # noqa: ANN001
    x = digits.x_test[:4]
    faults = []
    for _ in range(data.draw(st.integers(1, 4), "faults")):
        name = data.draw(st.sampled_from(list(qmodel.layers)), "layer")
        index = data.draw(st.integers(0, qmodel.layers[name].numel(Site.QPARAMS) - 1), "index")
        faults.append(("qparams", name, index, data.draw(st.integers(0, 31), "bit"),
                       data.draw(st.sampled_from(["flip", "stuck0", "stuck1"]), "kind")))
    before = {name: m.clone() for name, m in qmodel._multipliers.items()}
    clean = qmodel(x)
    qmodel(x, FaultPattern.from_faults(faults))  # may be NaN/Inf: counted as wrong by the campaign
    for name, m in qmodel._multipliers.items():
        assert torch.equal(m.view(torch.int32), before[name].view(torch.int32)), name
    assert not qmodel._runtime.zero_offsets
    assert torch.equal(qmodel(x), clean)


def test_a_qparams_campaign_draws_per_trial_faults_and_counts_them(qmodel, digits) -> None:  # noqa: ANN001
    x, y = digits.x_test[:64], digits.y_test[:64]
    model = FaultModel("qparams", 1e-2)
    pattern = sample_pattern(model, qmodel.targets(Site.QPARAMS), len(x), torch.Generator().manual_seed(1))
    assert len(pattern) > 0 and all(f.image is None and f.bit < 32 for f in pattern.faults())
    expected = sum(int(row.argmax()) == int(label) for row, label in zip(qmodel(x, pattern), y)) / len(x)
    assert accuracy(qmodel, (x, y), model, seed=1) == expected
    spec = CampaignSpec(site="qparams", ber=1e-3, min_acc=0.5, bit_positions=[30, 31])
    assert not spec.transient
