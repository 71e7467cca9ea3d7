"""Real architectures through the engine: torchvision ResNet18 and MobileNetV2, the CIFAR ResNet56, Conv1d/Conv3d
models, a model torch.fx cannot trace, and layer selection by glob and by type."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import Branchy, one_thread, seeded, weights_hold_codes
from torch import nn

from pytest_hwfault.cifar_resnet import recalibrate_bn, resnet56
from pytest_hwfault.evaluate import accuracy, predict
from pytest_hwfault.faults import FaultModel, FaultPattern, Site, sample_pattern
from pytest_hwfault.quantization import QuantizedModel, quantize, state_checksum

SITES = ("act", "weight", "acc", "input")


pytestmark = pytest.mark.usefixtures("single_threaded")  # tiny tensors: one thread is fastest


def _build(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    size = 32 if name == "resnet56" else 64
    with seeded(40):
        model = {
            "resnet18": lambda: torchvision.models.resnet18(weights=None),
            "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(weights=None),
            "resnet56": resnet56,
        }[name]()
        calibration = torch.randn(8, 3, size, size)
        x = torch.randn(2, 3, size, size)
    return recalibrate_bn(model, calibration), calibration, x


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2", "resnet56"])
def zoo(request) -> tuple[str, nn.Module, QuantizedModel, torch.Tensor, str]:
    with one_thread():
        model, calibration, x = _build(request.param)
        before = state_checksum(model)
        qmodel = quantize(model, calibration)
    return request.param, model, qmodel, x, before


def _pattern(qmodel: QuantizedModel, site: str, n_images: int, faults: int, seed: int = 0, layers=None) -> FaultPattern:
    targets = qmodel.targets(Site(site), layers)
    n_bits = sum(t.numel * t.bits for t in targets) * (n_images if Site(site).transient else 1)
    model = FaultModel(site, faults / n_bits, layers=layers)
    return sample_pattern(model, targets, n_images, torch.Generator().manual_seed(seed))


def test_zoo_quantizes_with_every_batchnorm_folded(zoo) -> None:
    name, model, qmodel, x, before = zoo
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert qmodel.bn_kept == [] and qmodel.fold_error is None
    assert len(qmodel.folded) == n_bn == {"resnet18": 20, "mobilenet_v2": 52, "resnet56": 55}[name]
    assert len(qmodel.layers) == n_layers
    assert state_checksum(model) == before
    out = qmodel(x)
    assert out.shape == (2, 10 if name == "resnet56" else 1000)
    assert torch.isfinite(out).all()
    assert len(out.unique()) > 10  # a live network, not all-zero codes
    if name != "mobilenet_v2":  # (MobileNetV2's depthwise layers lose more to per-tensor 8-bit activations)
        with torch.no_grad():
            reference = model(x)
        assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.95


def test_zoo_results_do_not_depend_on_threads_or_batch_split(zoo) -> None:
    # the layers sum integer codes exactly, so neither the batch composition nor the thread count can move a code
    name, model, qmodel, x, before = zoo
    with seeded(42):
        x = torch.randn(3, *x.shape[1:])
    pattern = _pattern(qmodel, "act", len(x), faults=200, seed=3)
    one = qmodel(x, faults=pattern)
    split = torch.cat([qmodel(x[:1], faults=pattern), qmodel(x[1:], faults=pattern, image_offset=1)])
    assert torch.equal(split, one)
    assert torch.equal(predict(qmodel, x, pattern, batch_size=2).predicted, one.argmax(1))
    if name == "resnet18":  # the largest fan-in (512 x 3 x 3): the hardest case for exact sums; two threads are
        threads = torch.get_num_threads()  # slow on a shared machine, so one model checks them
        torch.set_num_threads(2)
        try:
            two = qmodel(x, faults=pattern)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two)


@pytest.mark.parametrize("site", SITES)
def test_zoo_runs_faults_at_every_site(zoo, site: str) -> None:
    name, model, qmodel, x, before = zoo
    view_before = state_checksum(qmodel.module)
    clean = qmodel(x)
    pattern = _pattern(qmodel, site, len(x), faults=300)
    assert 150 < len(pattern) < 600, len(pattern)
    assert {layer for _, layer in pattern.groups} <= set(qmodel.layers)
    out = qmodel(x, faults=pattern)
    assert out.shape == clean.shape
    assert not torch.equal(out, clean), f"{name}: {len(pattern)} {site} faults changed nothing"
    assert torch.isfinite(out).all()  # every quantized layer saturates: faults cannot make inf
    outcome = predict(qmodel, x, pattern)
    assert not outcome.nonfinite.any()
    assert torch.equal(outcome.predicted, out.argmax(1))
    assert torch.equal(qmodel(x), clean)
    assert state_checksum(qmodel.module) == view_before
    assert state_checksum(model) == before


# -- layer selection -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def q56() -> tuple[QuantizedModel, torch.Tensor]:
    with one_thread():
        model, calibration, x = _build("resnet56")
        return quantize(model, calibration), x


def _outputs(qmodel: QuantizedModel, x: torch.Tensor, faults: FaultPattern | None) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [layer.module.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o.clone()))
               for name, layer in qmodel.layers.items()]
    try:
        qmodel(x, faults=faults)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("site", SITES)
def test_glob_selects_the_layers_that_get_faults(q56, site: str) -> None:
    qmodel, x = q56
    chosen = [n for n in qmodel.layers if n.startswith("layer2.")]
    assert len(chosen) == 18
    assert [t.layer for t in qmodel.targets(Site(site), ("layer2.*",))] == chosen
    pattern = _pattern(qmodel, site, len(x), faults=400, layers=("layer2.*",))
    assert len(pattern) > 100
    layers = {f.layer for f in pattern.to_list()}
    assert layers <= set(chosen) and len(layers) > 9
    clean, faulted = _outputs(qmodel, x, None), _outputs(qmodel, x, pattern)
    for name in qmodel.layers:  # everything that runs before layer2 is untouched
        if name == "conv1" or name.startswith("layer1."):
            assert torch.equal(clean[name], faulted[name]), name
    assert not torch.equal(clean["fc"], faulted["fc"])


def test_layers_are_selected_by_module_type_and_mixed_selectors(q56) -> None:
    qmodel, x = q56
    assert [t.layer for t in qmodel.targets(Site.WEIGHT, (nn.Linear,))] == ["fc"]
    assert [t.layer for t in qmodel.targets(Site.ACT, ("conv1", nn.Linear))] == ["conv1", "fc"]
    assert len(qmodel.targets(Site.ACT, (nn.Conv2d,))) == 55
    assert [t.layer for t in qmodel.targets(Site.ACT, ("layer3.8.*", "layer3.8.conv2"))] == [
        "layer3.8.conv1", "layer3.8.conv2"]  # overlapping selectors: each layer once, in execution order
    pattern = _pattern(qmodel, "act", len(x), faults=50, layers=(nn.Linear,))
    assert {f.layer for f in pattern.to_list()} == {"fc"}
    model = FaultModel("act", 0.01, layers="fc")  # a single selector needs no tuple
    assert model.layers == ("fc",)
    assert [t.layer for t in qmodel.targets(model.site, model.layers)] == ["fc"]


def test_a_selector_that_matches_nothing_is_an_error(q56) -> None:
    qmodel, x = q56
    with pytest.raises(ValueError, match=r"layers selector 'layer9\.\*' matched no quantized layer; layers are: conv1"):
        qmodel.targets(Site.ACT, ("layer1.*", "layer9.*"))
    with pytest.raises(ValueError, match=r"layers selector <class 'torch\.nn\.modules\.conv\.Conv1d'> matched no"):
        qmodel.targets(Site.WEIGHT, (nn.Conv1d,))
    with pytest.raises(ValueError, match=r"'layer9\.\*'"):
        accuracy(qmodel, (x, torch.zeros(2, dtype=torch.int64)), FaultModel("weight", 1e-3, layers=("layer9.*",)))
    with pytest.raises(TypeError, match="glob strings or module types"):
        qmodel.targets(Site.ACT, (3,))


# -- other layer kinds and a model fx cannot trace -------------------------------------------------------------------
class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 14, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(4)
        self.pool = nn.MaxPool3d(2)
        self.conv2 = nn.Conv3d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


SMALL = {
    "conv1d": (Conv1dNet, (3, 30)),
    "conv3d": (Conv3dNet, (2, 6, 6, 6)),
    "branchy": (Branchy, (3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_models_of_other_kinds_quantize_and_take_faults(name: str) -> None:
    cls, shape = SMALL[name]
    with seeded(41):
        model = cls()
        calibration, x = torch.randn(32, *shape), torch.randn(6, *shape).abs()  # abs: Branchy takes its branch
    model = recalibrate_bn(model, calibration)
    before = state_checksum(model)
    qmodel = quantize(model, calibration)
    if name == "branchy":
        assert qmodel.bn_kept == ["bn"] and qmodel.folded == []
        assert qmodel.fold_error and isinstance(qmodel.fold_error, str)
    else:
        assert qmodel.bn_kept == [] and qmodel.folded == [("conv1", "bn1")] and qmodel.fold_error is None
    conv_type = {"conv1d": nn.Conv1d, "conv3d": nn.Conv3d, "branchy": nn.Conv2d}[name]
    assert [s["type"] for s in qmodel.summary()][0] == conv_type.__name__
    for name, layer in qmodel.layers.items():
        assert weights_hold_codes(layer), name
    clean = qmodel(x)
    with torch.no_grad():
        reference = model(x)
    assert torch.nn.functional.cosine_similarity(clean.flatten(), reference.flatten(), dim=0) > 0.95
    view_before = state_checksum(qmodel.module)
    for site in SITES:
        pattern = _pattern(qmodel, site, len(x), faults=40, seed=1)
        assert len(pattern) > 10
        out = qmodel(x, faults=pattern)
        assert not torch.equal(out, clean), site
        assert torch.isfinite(out).all()
    assert state_checksum(qmodel.module) == view_before
    assert state_checksum(model) == before
    assert torch.equal(qmodel(x), clean)
