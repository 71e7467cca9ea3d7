"""Multi-bit upsets (`burst=k`): one fault event changes k adjacent bits of one code."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_hwfault import FaultModel, FaultPattern
from pytest_hwfault.faults import FaultTarget, Site, sample_pattern
from pytest_hwfault.spec import CampaignSpec, SpecError

pytestmark = pytest.mark.usefixtures("single_threaded")


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 16), data=st.data())
def test_a_sampled_burst_is_k_adjacent_bits_of_one_code(bits: int, data: st.DataObject) -> None:
    burst = data.draw(st.integers(1, bits), "burst")
    site = data.draw(st.sampled_from(list(Site)), "site")
    targets = [FaultTarget(site, f"l{i}", data.draw(st.integers(1, 40), "numel"), bits) for i in range(3)]
    seed = data.draw(st.integers(0, 2**32), "seed")
    pattern = sample_pattern(FaultModel(site, 0.05, burst=burst), targets, 3, torch.Generator().manual_seed(seed))
    for group in pattern.groups.values():
        assert len(group) % burst == 0
        rows = torch.stack([group.image, group.index, group.bit], 1).reshape(-1, burst, 3)
        # each event: one image, one code, bits start..start+k-1, all inside the code
        assert bool((rows[:, :, :2] == rows[:, :1, :2]).all())
        start = rows[:, 0, 2]
        assert torch.equal(rows[:, :, 2], start[:, None] + torch.arange(burst))
        assert bool((start + burst <= bits).all())


def test_burst_events_follow_the_ber_over_the_bits_they_can_start_at() -> None:
    target = FaultTarget(Site.ACT, "l", 1000, 8)
    model = FaultModel(Site.ACT, 1e-3, burst=3)
    events = [len(sample_pattern(model, [target], 50, torch.Generator().manual_seed(s))) // 3 for s in range(200)]
    expected = 1000 * 50 * (8 - 3 + 1) * 1e-3  # 300 per trial: starts at bits 0..5
    mean = sum(events) / len(events)
    assert abs(mean - expected) < 4 * (expected / len(events)) ** 0.5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_burst_changes_exactly_k_adjacent_bits_of_the_stored_code(q_cnn, digits, data) -> None:  # noqa: ANN001
    """Through the engine: the code's raw bits before and after differ in exactly the burst's k adjacent bits
    (flip), or are forced there (stuck-at), and no other code of the layer changes."""
    qmodel = q_cnn
    x = digits.x_test[:2]
    name = data.draw(st.sampled_from(list(qmodel.layers)), "layer")
    layer = qmodel.layers[name]
    burst = data.draw(st.integers(2, layer.bits), "burst")
    start = data.draw(st.integers(0, layer.bits - burst), "start")
    index = data.draw(st.integers(0, layer.numel(Site.ACT) - 1), "index")
    kind = data.draw(st.sampled_from(["flip", "stuck0", "stuck1"]), "kind")
    pattern = FaultPattern.from_faults([("act", name, index, start + j, kind, 0) for j in range(burst)])
    seen: list[torch.Tensor] = []
    handle = layer.module.register_forward_hook(lambda m, a, o: seen.append(layer.dequantize_output(o.clone())))
    try:
        qmodel(x)
        qmodel(x, pattern)
    finally:
        handle.remove()
    clean, faulty = (torch.round(t[0].reshape(-1).double() / layer.act_scale).to(torch.int64) for t in seen)
    width_mask = (1 << layer.bits) - 1
    mask = ((1 << burst) - 1) << start
    before, after = int(clean[index]) & width_mask, int(faulty[index]) & width_mask
    if kind == "flip":
        assert before ^ after == mask
    else:
        assert after == (before & ~mask if kind == "stuck0" else before | mask)
    others = torch.ones_like(clean, dtype=torch.bool)
    others[index] = False
    assert torch.equal(clean[others], faulty[others])


def test_burst_is_checked_and_named_and_keeps_single_bit_campaign_ids() -> None:
    plain = CampaignSpec(site="act", ber=1e-5, min_acc=0.5)
    assert CampaignSpec(site="act", ber=1e-5, min_acc=0.5, burst=1).campaign_id("t") == plain.campaign_id("t")
    assert "burst" not in plain.to_dict()
    burst = CampaignSpec(site="act", ber=1e-5, min_acc=0.5, burst=3)
    assert burst.label() == "act-ber1e-05-burst3" and burst.campaign_id("t") != plain.campaign_id("t")
    assert CampaignSpec.from_dict(burst.to_dict()) == burst
    assert CampaignSpec(site="acc", ber=1e-5, min_acc=0.5, burst=20).burst == 20  # 32-bit accumulator
    with pytest.raises(SpecError, match=r"burst: 9 must be a number of adjacent bits in \[1, 8\] for 8-bit act"):
        CampaignSpec(site="act", ber=1e-5, min_acc=0.5, burst=9)
    with pytest.raises(SpecError, match="none leaves room for it"):
        CampaignSpec(site="weight", ber=1e-5, min_acc=0.5, burst=2, bit_positions=[7])
    with pytest.raises(SpecError, match="burst: 0 must be"):
        CampaignSpec(site="weight", ber=1e-5, min_acc=0.5, burst=0)
