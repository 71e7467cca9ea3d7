"""Coverage: the share of a model's multiply-accumulates (and weights) that faults can reach, and what is left in
float, measured on ordinary architectures with weights=None and small inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded
from torch import nn

from pytest_hwfault.campaign import Campaign
from pytest_hwfault.cifar_resnet import CifarResNet
from pytest_hwfault.coverage import measure_coverage
from pytest_hwfault.evaluate import EvaluationError
from pytest_hwfault.quantization import quantize
from pytest_hwfault.spec import CampaignSpec


class TextClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(16, 32, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class Functional(nn.Module):
    """A convolution and a matmul of its own parameters, then an nn.Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.mix = nn.Parameter(torch.randn(64, 64) / 8)
        self.head = nn.Linear(4 * 64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x.reshape(-1, 1, 8, 8), self.kernel, padding=1).flatten(2) @ self.mix
        return self.head(x.flatten(1))


def _coverage(model: nn.Module, x: torch.Tensor):
    return measure_coverage(quantize(model.eval(), x), x)


def test_a_cnn_is_covered_whole() -> None:
    with seeded(0):
        model, x = CifarResNet(20), torch.randn(4, 3, 32, 32)
    coverage = _coverage(model, x)
    assert coverage.macs == 1.0 and coverage.weights == 1.0 and coverage.complete
    assert coverage.uncovered == [] and coverage.uncounted == []
    assert 38e6 < coverage.total_macs < 42e6  # ResNet20 on 32x32: ~40.6M MACs per image


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_cells_are_named_as_left_in_float(cell: type[nn.Module]) -> None:
    with seeded(1):
        model, x = Recurrent(cell), torch.randn(3, 7, 16)
    coverage = _coverage(model, x)
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cell]
    rnn_macs = 7 * gates * 32 * (16 + 32)  # per image: steps x gates x hidden x (input + hidden)
    assert coverage.uncovered[0]["module"] == "rnn"
    assert coverage.macs == pytest.approx(32 * 5 / (rnn_macs + 32 * 5), rel=1e-6)
    assert not coverage.reaches(0.5, "act") and coverage.reaches(0.0, "act")


def test_attention_outside_linear_modules_is_named() -> None:
    with seeded(2):
        model, x = TextClassifier(), torch.randn(3, 7, 16)
    coverage = _coverage(model, x)
    # the attention projections are parameters of MultiheadAttention, not Linear modules: their weights stay float
    coded = 16 * 32 + 2 * (32 * 64 + 64 * 32) + 32 * 5
    attention = 2 * (3 * 32 * 32 + 32 * 32)
    assert coverage.weights == pytest.approx(coded / (coded + attention), rel=1e-9)
    # its fused kernel has no MAC count: coverage is unknown, and only min_coverage=0 accepts it
    assert "aten._native_multi_head_attention" in coverage.uncounted and not coverage.complete
    assert not coverage.reaches(0.01, "act") and not coverage.reaches(0.01, "weight")
    assert coverage.reaches(0.0, "act") and coverage.accepting("act") == 0.0
    assert "MACs not countable (coverage unknown) in: aten._native_multi_head_attention" in coverage.describe()


def test_functional_compute_is_named_with_its_share() -> None:
    with seeded(3):
        model, x = Functional(), torch.rand(5, 64)
    coverage = _coverage(model, x)
    conv, mix, head = 4 * 9 * 64, 4 * 64 * 64, 4 * 64 * 5
    assert coverage.macs == pytest.approx(head / (conv + mix + head), rel=1e-6)
    assert coverage.uncovered == [{"module": "", "ops": ["aten.convolution", "aten.mm"],
                                   "share": pytest.approx((conv + mix) / (conv + mix + head), rel=1e-6)}]
    assert coverage.weights == pytest.approx(4 * 64 * 5 / (4 * 9 + 64 * 64 + 4 * 64 * 5))
    assert "<model> (aten.convolution, aten.mm" in coverage.describe()


def test_a_campaign_refuses_a_model_below_its_min_coverage() -> None:
    with seeded(4):
        model, x = Recurrent(nn.LSTM).eval(), torch.randn(40, 7, 16)
    y = model(x).argmax(1).detach()
    qmodel = quantize(model, x)
    spec = CampaignSpec(site="act", ber=1e-4, min_acc=0.0, budget=4)
    with pytest.raises(EvaluationError, match=r"min_coverage=1: faults reach 0\.\d% of the MACs.*rnn \(aten"):
        Campaign(qmodel, x, y, spec, "t")
    accepted = Campaign(qmodel, x, y, CampaignSpec(**{**spec.to_dict(), "min_coverage": 0.0}), "t")
    assert accepted.empty_result().coverage["uncovered"][0]["module"] == "rnn"
    with pytest.raises(ValueError, match="min_coverage"):
        CampaignSpec(site="act", ber=1e-4, min_acc=0.0, min_coverage=1.5)
