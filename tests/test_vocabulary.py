"""One vocabulary: the fault sites, kinds, code widths, search budget and threshold rule that several modules speak
are defined once (in `pytest_hwfault.spec`, torch-free) and every module that uses them agrees."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn

from pytest_hwfault import bits, faults, search, spec, strategies
from pytest_hwfault.quantization import quantize
from pytest_hwfault.stats import Threshold


def test_sites_agree() -> None:
    assert tuple(site.value for site in faults.Site) == spec.SITES
    assert faults.Site is spec.Site
    assert sorted(spec.SEARCH_SITES) == sorted(spec.SITES)  # the search lists the same sites in its own order
    assert [s for s in spec.SITES if spec.Site(s).transient] == ["act", "acc", "input"]
    assert [s for s in spec.SITES if not spec.Site(s).transient] == ["weight", "qparams", "pe"]


def test_kinds_agree() -> None:
    assert tuple(kind.value for kind in bits.Kind) == spec.KINDS
    assert bits.Kind is spec.Kind
    assert set(bits.KIND_CODES) == set(bits.Kind) and len(bits.KINDS_BY_CODE) == len(bits.Kind)
    assert all(bits.KINDS_BY_CODE[code] is kind for kind, code in bits.KIND_CODES.items())
    assert spec.SEARCH_KINDS == (*spec.KINDS, "stuck")


def test_widths_agree() -> None:
    assert bits.MAX_CODE_BITS == spec.WIDE_ACC_BITS == 48 and spec.ACC_BITS == 32
    assert [spec.acc_bits_for(b) for b in (2, 8, 9, 16)] == [32, 32, 48, 48]
    # the accumulator width a spec allows bit positions in follows the codes' width
    with pytest.raises(spec.SpecError, match=r"bit indices in \[0, 32\) for 32-bit acc codes"):
        spec.CampaignSpec(site="acc", ber=1e-3, min_acc=0.5, bits=8, bit_positions=[40])
    assert spec.CampaignSpec(site="acc", ber=1e-3, min_acc=0.5, bits=16, bit_positions=[40]).bit_positions == (40,)
    widest = spec.MAX_WEIGHT_ACT_BITS
    assert spec.CampaignSpec(site="act", ber=1e-3, min_acc=0.5, bits=widest).bits == widest
    assert spec.SearchSpec(min_acc=0.5, bits=widest).bits == widest
    for build in (lambda b: spec.CampaignSpec(site="act", ber=1e-3, min_acc=0.5, bits=b),
                  lambda b: spec.SearchSpec(min_acc=0.5, bits=b),
                  lambda b: quantize(nn.Linear(4, 2), torch.randn(8, 4), bits=b)):
        with pytest.raises(ValueError, match=rf"\[2, {widest}\]"):
            build(widest + 1)
    qmodel = quantize(nn.Linear(4, 2), torch.randn(8, 4), bits=widest)
    assert {t.bits for t in qmodel.targets(faults.Site.ACC)} == {spec.WIDE_ACC_BITS}  # 16-bit codes: 48-bit sums
    assert {t.bits for t in qmodel.targets(faults.Site.WEIGHT)} == {widest}
    int8 = quantize(nn.Linear(4, 2), torch.randn(8, 4), bits=8)
    assert {t.bits for t in int8.targets(faults.Site.ACC)} == {spec.ACC_BITS}
    top = spec.WIDE_ACC_BITS - 1
    assert faults.FaultModel("acc", 1e-3, bit_positions=[top]).bit_positions == (top,)
    with pytest.raises(ValueError, match=rf"\[0, {spec.WIDE_ACC_BITS}\)"):
        faults.FaultModel("acc", 1e-3, bit_positions=[spec.WIDE_ACC_BITS])


def test_max_flips_default_agrees() -> None:
    defaults = {
        "SearchSpec": spec.SearchSpec(min_acc=0.5).max_flips,
        "search_faults": inspect.signature(search.search_faults).parameters["max_flips"].default,
        "fault_lists": inspect.signature(strategies.fault_lists).parameters["max_flips"].default,
        "bit_flips": inspect.signature(strategies.bit_flips).parameters["max_flips"].default,
        "stuck_at": inspect.signature(strategies.stuck_at).parameters["max_flips"].default,
    }
    assert set(defaults.values()) == {spec.DEFAULT_MAX_FLIPS}, defaults


@pytest.mark.parametrize(("min_acc", "max_drop", "ok"), [
    (0.5, None, True),
    (None, 0.1, True),
    (None, None, False),
    (0.5, 0.1, False),
    (1.5, None, False),
    (None, -0.1, False),
])
def test_one_threshold_rule(min_acc: float | None, max_drop: float | None, ok: bool) -> None:
    """Exactly one of min_acc / max_drop, an accuracy in [0, 1]: the same answer from every place that checks it."""
    from pytest_hwfault.search import FaultOracle

    qmodel = quantize(nn.Linear(4, 2), torch.randn(8, 4))
    data = (torch.randn(4, 4), torch.zeros(4, dtype=torch.int64))
    checks = {
        "CampaignSpec": lambda: spec.CampaignSpec(site="act", ber=1e-3, min_acc=min_acc, max_drop=max_drop),
        "SearchSpec": lambda: spec.SearchSpec(min_acc=min_acc, max_drop=max_drop),
        "FaultOracle": lambda: FaultOracle(qmodel, data, min_acc=min_acc, max_drop=max_drop),
        "stats.Threshold": lambda: Threshold(min_acc=min_acc, max_drop=max_drop),
    }
    def rejects(check: Callable[[], object]) -> bool:
        try:
            check()
        except ValueError:
            return True
        return False

    assert {name: rejects(check) for name, check in checks.items()} == dict.fromkeys(checks, not ok)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_allow_inexact_view_takes_a_bool_only(value: object) -> None:
    """A truthy string would have judged an inexact view without the user meaning it."""
    for build in (spec.CampaignSpec, spec.SearchSpec):
        with pytest.raises(spec.SpecError, match=r"allow_inexact_view: .* must be True .* or False"):
            build(site="act", min_acc=0.5, allow_inexact_view=value,
                  **({"ber": 1e-5} if build is spec.CampaignSpec else {}))
    assert "allow_inexact_view" in spec.MARKER_ARGUMENTS
