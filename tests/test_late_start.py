"""Late start: resuming faulty images at the cut before their first fault gives bit-identical trials."""

from __future__ import annotations

import pytest
import torch
from conftest import Digits, seeded, trained
from torch import nn

from pytest_hwfault import late_start, quantize
from pytest_hwfault.campaign import Campaign
from pytest_hwfault.coverage import MEASURED_IMAGES
from pytest_hwfault.evaluate import REPEAT_IMAGES
from pytest_hwfault.late_start import LateStart
from pytest_hwfault.spec import CampaignSpec


class Block(nn.Module):
    """A torchvision-style residual block: in-place ReLU and an in-place residual sum, which must not reach the
    cached values."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.blocks = nn.Sequential(Block(8), Block(8), Block(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h.relu()
        return self.fc2(h)


@pytest.fixture(scope="module")
def trained_resnet(digits: Digits) -> nn.Module:
    return trained(SmallResNet, digits, init_seed=11, steps=40, seed=12)


@pytest.fixture(scope="module")
def resnet(trained_resnet: nn.Module, digits: Digits):  # noqa: ANN201
    return quantize(trained_resnet, digits.x_train[:256]), digits.x_test[:160], digits.y_test[:160]


@pytest.fixture
def resume_every_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cost for resuming one more group: every faulty image resumes at its own latest cut, so that exactness is
    tested on as many resumed images as the faults allow, whatever the grouping policy."""
    monkeypatch.setattr(late_start, "BUCKET_OVERHEAD_IMAGES", 0)


@pytest.mark.usefixtures("resume_every_group")
@pytest.mark.parametrize(("site", "ber"), [("act", 2e-4), ("act", 3e-5), ("acc", 2e-5), ("input", 2e-4),
                                         ("weight", 1e-4), ("qparams", 1e-3)])
def test_late_start_is_bit_identical(resnet, site: str, ber: float) -> None:  # noqa: ANN001
    qmodel, x, y = resnet
    spec = CampaignSpec(site=site, ber=ber, min_acc=0.5, budget=6, first=6, seed=3)
    plain = Campaign(qmodel, x, y, spec, "t", batch_size=64, drop_fault_free=False)
    dropping = Campaign(qmodel, x, y, spec, "t", batch_size=64, late_start=False)
    late = Campaign(qmodel, x, y, spec, "t", batch_size=64)
    few_cuts = Campaign(qmodel, x, y, spec, "t", batch_size=64, cache_bytes=2 * 8 * 64 * 4 * len(x))
    expected = [plain.trial(i) for i in range(6)]
    assert [dropping.trial(i) for i in range(6)] == expected
    assert [late.trial(i) for i in range(6)] == expected
    assert [few_cuts.trial(i) for i in range(6)] == expected
    assert [late.trial(i) for i in range(6)] == expected  # the cache survives the suffix's in-place ops
    cache = late.late_start()
    assert cache is not None and cache.resumed_images > 0 and cache.layers_skipped > 0
    few = few_cuts.late_start()
    assert few is not None and 1 <= len(few.cuts) < len(cache.cuts)


@pytest.mark.usefixtures("resume_every_group")
@pytest.mark.parametrize("site", ["act", "acc", "input"])
def test_trials_do_not_depend_on_the_memory_layout_or_code_passing(trained_resnet: nn.Module, digits: Digits,
                                                                    site: str) -> None:
    """Channels-last tensors in the cache, in the resumed suffixes and under the faults, and codes handed from
    layer to layer (also across cuts) give the same trials."""
    x, y = digits.x_test[:160], digits.y_test[:160]
    spec = CampaignSpec(site=site, ber=1e-4, min_acc=0.5, budget=4, first=4, seed=8)
    trials = {}
    for fmt, pass_codes in (("preserve", False), ("channels_last", True), ("preserve", True)):
        qmodel = quantize(trained_resnet, digits.x_train[:256], memory_format=fmt, pass_codes=pass_codes)
        assert [n for n, layer in qmodel.layers.items() if layer.hands_on_codes] == (
            ["blocks.0.conv1", "blocks.1.conv1", "blocks.2.conv1"] if pass_codes else [])
        campaign = Campaign(qmodel, x, y, spec, "t", batch_size=64)
        trials[fmt, pass_codes] = [campaign.trial(i) for i in range(4)]
        cache = campaign.late_start()
        assert cache is not None and cache.resumed_images > 0
        assert all(t.is_contiguous(memory_format=torch.channels_last) == (fmt == "channels_last")
                   for t in cache.cache.values() if t.dim() == 4 and t.shape[1] > 1)
    reference = trials["preserve", False]
    assert trials["channels_last", True] == reference and trials["preserve", True] == reference
    assert any(t.critical > 0 for t in reference)  # the faults changed predictions


def test_the_pass_that_fills_the_cache_is_the_golden_run(resnet) -> None:  # noqa: ANN001
    qmodel, x, y = resnet
    spec = CampaignSpec(site="act", ber=1e-4, min_acc=0.5, budget=2, first=2, seed=1)
    first_layer = next(iter(qmodel.layers.values())).module
    images_run: list[int] = []
    handle = first_layer.register_forward_hook(lambda module, args, out: images_run.append(len(out)))
    try:
        late = Campaign(qmodel, x, y, spec, "t", batch_size=64)
    finally:
        handle.remove()
    # the two passes that show the forward repeatable, a faulty one between them and one over one image (its
    # logits keep the batch dimension), one image and two to learn the live shapes, coverage's measuring pass, then
    # each image once
    assert sum(images_run) == 3 * REPEAT_IMAGES + 1 + (1 + 2) + MEASURED_IMAGES + len(x)
    plain = Campaign(qmodel, x, y, spec, "t", batch_size=64, late_start=False)
    assert torch.equal(late.golden, plain.golden) and torch.equal(late.golden_nonfinite, plain.golden_nonfinite)
    assert late.quantized_accuracy == plain.quantized_accuracy
    assert [late.trial(i) for i in range(2)] == [plain.trial(i) for i in range(2)]


def test_cache_respects_its_budget_and_spreads_cuts(resnet) -> None:  # noqa: ANN001
    qmodel, x, _ = resnet
    full = LateStart(qmodel, x, budget_bytes=1 << 30)
    assert [c.layer for c in full.cuts] == list(qmodel.layers)[1:]  # every layer after the first can be a cut
    assert all(len(c.live) >= 1 for c in full.cuts)
    for budget in (full.cache_bytes // 2, full.cache_bytes // 4):
        part = LateStart(qmodel, x, budget_bytes=budget)
        assert 0 < part.cache_bytes <= budget and part.enabled
        positions = [c.position for c in part.cuts]
        gaps = [b - a for a, b in zip(positions, positions[1:])]
        assert max(gaps) - min(gaps) <= 1  # evenly spaced
    none = LateStart(qmodel, x, budget_bytes=100)
    assert not none.enabled and "no cut fits a cache of 100 bytes" in str(none.disabled_reason)


def test_untraceable_model_runs_without_late_start(digits: Digits) -> None:
    with seeded(5):
        model = Untraceable().eval()
    qmodel = quantize(model, digits.x_train[:64])
    late = LateStart(qmodel, digits.x_test[:32])
    assert not late.enabled and "torch.fx cannot trace" in str(late.disabled_reason)
    spec = CampaignSpec(site="act", ber=1e-3, min_acc=0.5, budget=3, first=3)
    campaign = Campaign(qmodel, digits.x_test[:32], digits.y_test[:32], spec, "t")
    plain = Campaign(qmodel, digits.x_test[:32], digits.y_test[:32], spec, "t", drop_fault_free=False)
    assert [campaign.trial(i) for i in range(3)] == [plain.trial(i) for i in range(3)]
    assert campaign.late_start() is None


class OneRowConstant(nn.Module):
    """A value of one row computed before the first layer and read after the last: [1], but not one row per image
    (a constant gain; an ONNX graph's batch size, unsqueezed, looks the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = (x.sum() * 0 + 2).reshape(1)
        h = torch.relu(self.b(torch.relu(self.a(x.flatten(1)))))
        return self.c(h) * gain


def test_a_one_row_value_that_is_not_per_image_is_never_cached_per_image(digits: Digits,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-image values are told by running one image and two: a [1] constant live across every cut keeps its
    size, so no cut is taken (cached per image, a resumed group of five images read it as [5] and the suffix
    failed), and the trials are those of a campaign without late start."""
    with seeded(6):
        model = OneRowConstant().eval()
    qmodel = quantize(model, digits.x_train[:64])
    x, y = digits.x_test[:64], digits.y_test[:64]
    late = LateStart(qmodel, x)
    assert not late.enabled and "no cut has only per-image tensors live across it" in str(late.disabled_reason)
    monkeypatch.setattr(late_start, "BUCKET_OVERHEAD_IMAGES", 0)  # resume every group, however small
    spec = CampaignSpec(site="act", ber=2e-3, min_acc=0.1, budget=4, first=4, seed=1)
    campaign = Campaign(qmodel, x, y, spec, "t")
    plain = Campaign(qmodel, x, y, spec, "t", late_start=False)
    assert [campaign.trial(i) for i in range(4)] == [plain.trial(i) for i in range(4)]


def test_first_faulty_layer(resnet) -> None:  # noqa: ANN001
    from pytest_hwfault.faults import FaultPattern

    qmodel, x, _ = resnet
    late = LateStart(qmodel, x[:4])
    names = list(qmodel.layers)
    pattern = FaultPattern.from_faults([("act", names[3], 0, 1, "flip", 0), ("acc", names[1], 5, 2, "flip", 0),
                                        ("input", names[5], 2, 0, "stuck1", 2)])
    assert late.first_faulty_layer(pattern, 4).tolist() == [1, len(names), 5, len(names)]


def test_groups_merge_when_resuming_one_more_costs_more_than_it_skips(resnet, monkeypatch: pytest.MonkeyPatch
                                                                      ) -> None:  # noqa: ANN001
    """The grouping policy: free groups resume every image at its own latest cut; costly ones merge the images into
    one group from the earliest of their cuts (still exact: any cut before an image's first fault is)."""
    qmodel, x, _ = resnet
    cache = LateStart(qmodel, x)
    assert len(cache.cuts) >= 3
    starts = [0, *(c.position for c in cache.cuts)]
    admissible = torch.tensor([1, 3, 3, 2, 1, 3])
    monkeypatch.setattr(late_start, "BUCKET_OVERHEAD_IMAGES", 0)
    assert cache._plan(admissible, starts).tolist() == admissible.tolist()
    monkeypatch.setattr(late_start, "BUCKET_OVERHEAD_IMAGES", 10**6)
    assert cache._plan(admissible, starts).tolist() == [1] * 6
