"""The graph torch.fx traces stands for the forward only where both compute the same values
(`graph.trace_disagreement`): BN folding, code links, in-place own ops and late start all read it, so a forward that
branches on being traced must turn every one of them off, or the engine would test a model the user does not run."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing

from pytest_hwfault import quantize
from pytest_hwfault.campaign import Campaign
from pytest_hwfault.graph import _same_values, trace_disagreement
from pytest_hwfault.spec import CampaignSpec


def _tracing() -> bool:
    with warnings.catch_warnings():  # torch warns that torch.export sets the flag too
        warnings.simplefilter("ignore")
        return is_fx_tracing()


class TracedOtherwise(nn.Module):
    """Reads the conv's output twice in its forward, once under tracing: the trace shows one ReLU as its only
    reader (an in-place chain, a ReLU fused into the requantization), and a BN that alone reads the conv (folded)."""

    def __init__(self, fold: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if fold else nn.Identity()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = F.relu(self.bn(y))
        if not _tracing():
            z = z - 0.5 * y
        return self.fc(F.relu(self.conv2(z)).flatten(1))


class Plain(TracedOtherwise):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv2(F.relu(self.bn(self.conv(x))))).flatten(1))


def _model(cls: type[nn.Module], fold: bool) -> nn.Module:
    torch.manual_seed(0)
    model = cls(fold)  # type: ignore[call-arg]
    if fold:  # statistics of their own, so that folding changes the weights
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(32, 3, 8, 8) * 2 + 0.5)
    return model.eval()


def test_a_plain_model_is_trusted_and_its_traced_analyses_apply() -> None:
    model = _model(Plain, fold=True)
    x = torch.randn(8, 3, 8, 8)
    assert trace_disagreement(model, lambda m: m(x)) is None
    qmodel = quantize(model, x)
    assert qmodel.trace_error is None and qmodel.folded == [("conv", "bn")]
    assert qmodel.layers["conv"].in_place == ("relu",) and qmodel.layers["conv"].hands_on_codes


@pytest.mark.parametrize("fold", [True, False], ids=["with a BN to fold", "without BN"])
def test_a_forward_that_branches_on_tracing_is_run_as_written(fold: bool) -> None:
    model = _model(TracedOtherwise, fold)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    reason = trace_disagreement(model, lambda m: m(x[:2]))
    assert reason is not None and "computes other values than its forward" in reason
    qmodel = quantize(model, x[:32])
    assert qmodel.trace_error == reason
    assert qmodel.folded == [] and qmodel.bn_kept == (["bn"] if fold else [])
    assert not any(layer.in_place or layer.hands_on_codes or layer.reads_codes for layer in qmodel.layers.values())
    # what the view computes is the forward's, quantized: within a few codes of the float model on every logit
    with torch.no_grad():
        expected, got = model(x), qmodel(x)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
    # and the campaign's golden predictions (late start's fill pass, where it applies) are the forward's
    campaign = Campaign(qmodel, x, expected.argmax(1), CampaignSpec(ber=1e-3, site="act", min_acc=0.0), "traced")
    assert campaign.late_start() is None
    assert torch.equal(campaign.golden, got.argmax(1))


def test_a_transformer_is_checked_as_the_view_runs_it() -> None:
    """nn.TransformerEncoderLayer takes torch's fused fast path unless it is off, as it is wherever the view runs;
    its decomposed attention has no fused weights for that path. Checked with it on, the forward fails and the trace
    would be distrusted for nothing (no in-place ops, no code links)."""
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(F.relu(self.embed(x))).mean(1))

    torch.manual_seed(0)
    qmodel = quantize(Encoder().eval(), torch.randn(16, 5, 8))
    assert qmodel.trace_error is None
    assert qmodel.layers["embed"].in_place == ("relu",)  # what the traced graph shows applies


def test_what_trace_disagreement_reports() -> None:
    class Noisy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand_like(x)

    class FailsWhenReplayed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, :, :, None].sum(5) if _tracing() else x

    class Untraceable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    x = torch.randn(2, 3, 4, 4)
    assert "gave two different results" in str(trace_disagreement(Noisy(), lambda m: m(x)))
    assert "fails where its forward runs" in str(trace_disagreement(FailsWhenReplayed(), lambda m: m(x)))
    assert "torch.fx cannot trace the model" in str(trace_disagreement(Untraceable(), lambda m: m(x)))


def test_same_values_compares_bits_container_by_container() -> None:
    a = torch.tensor([1.0, float("nan"), 0.0])
    assert _same_values(a, a.clone()) and _same_values({"x": (a, 1)}, {"x": (a.clone(), 1)})
    assert not _same_values(a, torch.tensor([1.0, float("nan"), -0.0]))  # the sign of zero is a bit
    assert not _same_values(a, a.double()) and not _same_values((a,), [a]) and not _same_values({"x": a}, {"y": a})
    assert not _same_values(a, a[:2]) and not _same_values(a, None) and not _same_values([a], [a, a])
    assert _same_values(torch.arange(3), torch.arange(3)) and not _same_values(torch.arange(3), torch.arange(1, 4))
    # a forward's own result types: a dataclass, a plain object holding tensors (whose == has no truth value)
    assert _same_values(_Output(a, [a]), _Output(a.clone(), [a.clone()]))
    assert not _same_values(_Output(a, [a]), _Output(a, [a.neg()]))
    assert _same_values(_Holder(a), _Holder(a.clone())) and not _same_values(_Holder(a), _Holder(a + 1))


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    hidden: list[torch.Tensor]


class _Holder:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
