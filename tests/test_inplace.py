"""The model's own ReLUs and sums run in place on the engine's fresh layer outputs (`inplace`, `graph.in_place_chains`):
which ops qualify, found on the traced graph; and every trial bit for bit what the model's ops as written give, at
every site, batch split, kernel path and on torch's eager chains; never where something else could read the
layer's output before them (a second reader, a hook of the user's, a global hook, `explain`'s codes, recorded or
restricted ranges, a value a late-start cut keeps)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded, threads
from torch import nn

from pytest_hwfault import FaultModel, late_start, native, quantize
from pytest_hwfault.campaign import Campaign
from pytest_hwfault.cifar_resnet import CifarResNet, recalibrate_bn
from pytest_hwfault.explain import describe_faults
from pytest_hwfault.faults import Fault, FaultPattern, Site, sample_pattern, trial_generator
from pytest_hwfault.graph import in_place_chains
from pytest_hwfault.late_start import LateStart
from pytest_hwfault.spec import CampaignSpec


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _both(qmodel, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:  # noqa: ANN001
    """`run` with the model's ops as written, then in place: both results, and how many ops ran in place."""
    qmodel.own_ops_in_place = False
    try:
        written = run()
    finally:
        qmodel.own_ops_in_place = True
    before = qmodel.own_ops_run
    in_place = run()
    return written, in_place, qmodel.own_ops_run - before


# -- which ops qualify -------------------------------------------------------------------------------------------------
class _Net(nn.Module):
    """One conv (`conv`) whose output the given function reads; `other` is a second conv of the same shape."""

    def __init__(self, body: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.conv, self.other, self.relu = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()
        self.relu_ = nn.ReLU(inplace=True)
        self.id, self.body = nn.Identity(), body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self, x)


BODIES: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]] = {
    "relu": (lambda m, x: F.relu(m.conv(x)), ("relu",)),
    "torch.relu": (lambda m, x: torch.relu(m.conv(x)), ("relu",)),
    "method": (lambda m, x: m.conv(x).relu(), ("relu",)),
    "module": (lambda m, x: m.relu(m.conv(x)), ("relu",)),
    "module in place": (lambda m, x: m.relu_(m.conv(x)), ("relu",)),
    "through an identity": (lambda m, x: m.id(m.conv(x)).relu(), ("relu",)),
    "sum then relu": (lambda m, x: F.relu(m.conv(x) + x), ("add", "relu")),
    "sum as second operand": (lambda m, x: F.relu(x + m.conv(x)), ("add", "relu")),
    "torch.add, method add": (lambda m, x: torch.add(x, m.conv(x)).add(x).relu(), ("add", "add", "relu")),
    "relu then sum": (lambda m, x: F.relu(m.conv(x)) + m.other(x), ("relu", "add")),
    "second reader": (lambda m, x: (lambda y: F.relu(y) + y)(m.conv(x)), ()),
    "read twice by one op": (lambda m, x: (lambda y: y + y)(m.conv(x)), ()),
    "sum with alpha": (lambda m, x: torch.add(m.conv(x), x, alpha=2.0), ()),
    "sum with a number": (lambda m, x: m.conv(x) + 1.0, ()),
    "relu6": (lambda m, x: F.relu6(m.conv(x)), ()),
    "relu then a second reader": (lambda m, x: (lambda y: y * y)(F.relu(m.conv(x))), ("relu",)),
}


@pytest.mark.parametrize("body", BODIES)
def test_chains_follow_the_only_reader(body: str) -> None:
    function, chain = BODIES[body]
    with seeded(0):
        model = _Net(function).eval()
    chains = in_place_chains(model, {"conv", "other"})
    assert chains.get("conv", ()) == chain


def test_a_layer_called_twice_or_an_untraceable_model_has_no_chain() -> None:
    with seeded(0):
        twice = _Net(lambda m, x: F.relu(m.conv(m.conv(x)))).eval()
        branching = _Net(lambda m, x: F.relu(m.conv(x)) if x.sum() > 0 else x).eval()
    assert in_place_chains(twice, {"conv"}) == {}
    assert in_place_chains(branching, {"conv"}) == {}


# -- the same numbers --------------------------------------------------------------------------------------------------
def _resnet(depth: int, images: int) -> tuple[nn.Module, torch.Tensor]:
    with seeded(0):
        x = torch.randn(images, 3, 32, 32)
        return recalibrate_bn(CifarResNet(depth), x), x


@pytest.fixture(scope="module")
def resnet20() -> tuple[nn.Module, torch.Tensor]:
    return _resnet(20, 12)


def _patterns(qmodel, images: int) -> dict[str, FaultPattern | None]:  # noqa: ANN001
    patterns: dict[str, FaultPattern | None] = {"clean": None}
    for i, (site, ber) in enumerate({"act": 2e-3, "weight": 1e-3, "acc": 1e-3, "input": 1e-3,
                                     "qparams": 2e-3}.items()):
        fault_model = FaultModel(site, ber)
        patterns[site] = sample_pattern(fault_model, qmodel.targets(fault_model.site), images,
                                        trial_generator(4, "inplace", i))
    patterns["pe"] = FaultPattern.from_faults([("pe", "ws8x8.acc", 9, 20, "flip")])
    return patterns


@pytest.mark.parametrize("kernel", ["int8", "emulated"])
def test_trials_are_bit_identical_to_the_ops_as_written(resnet20: tuple[nn.Module, torch.Tensor],
                                                        kernel: str) -> None:
    """Every site, a faulty PE, whole and split, fused passes and torch's eager chains: the same bits."""
    model, x = resnet20
    qmodel = quantize(model, x, kernel=kernel)
    chains = [layer.in_place for layer in qmodel.layers.values()]
    assert chains.count(("relu",)) == 10 and chains.count(("add", "relu")) == 9  # each block's two, the stem's
    for site, pattern in _patterns(qmodel, len(x)).items():
        for split, eager in ((None, False), (5, False), (None, True)):
            step = split or len(x)
            with threads(1), native.disabled() if eager else contextlib.nullcontext():
                written, in_place, steps = _both(qmodel, lambda: torch.cat(
                    [qmodel(x[s:s + step], pattern, s) for s in range(0, len(x), step)]))  # noqa: B023
            assert torch.equal(_bits(written), _bits(in_place)), (site, split, eager)
            assert steps >= 28 * (len(x) // step), (site, split, eager)  # every chain's steps, every batch
    assert not torch.equal(qmodel(x, _patterns(qmodel, len(x))["act"]), qmodel(x))  # the faults bite


def test_act_faults_and_the_relu_after_them_are_one_pass(resnet20: tuple[nn.Module, torch.Tensor],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer with act faults whose ReLU alone reads its output: its requantization, the edits and the ReLU are
    one native pass (where the passes are built), with the bits of the model's ReLU run after the edits."""
    model, x = resnet20
    qmodel = quantize(model, x)
    fused: list[bool] = []
    original = native.requantize_edit_relu
    monkeypatch.setattr(native, "SPARSE_EDITS", 1)  # fused at any density: this BER's faults are dense
    monkeypatch.setattr(native, "requantize_edit_relu", lambda *args: fused.append(original(*args)) or fused[-1])
    pattern = _patterns(qmodel, len(x))["act"]
    assert pattern is not None
    written, in_place, _ = _both(qmodel, lambda: qmodel(x, pattern))
    assert torch.equal(_bits(written), _bits(in_place))
    faulty = {name for site, name in pattern.groups if site is Site.ACT}
    relu_first = {name for name, layer in qmodel.layers.items() if layer.in_place[:1] == ("relu",)}
    assert len(faulty & relu_first) >= 5
    assert fused.count(True) == (len(faulty & relu_first) if native.library() is not None else 0)


def test_campaign_trials_with_late_start_are_bit_identical(resnet20: tuple[nn.Module, torch.Tensor],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Late start's suffixes run the chains in place too; the cached values are not touched."""
    monkeypatch.setattr(late_start, "BUCKET_OVERHEAD_IMAGES", 0)  # every faulty image resumes at its latest cut
    model, x = resnet20
    labels = torch.arange(len(x)) % 10
    spec = CampaignSpec(site="act", ber=2e-6, min_acc=0.0, budget=4, first=4, seed=5)
    qmodel = quantize(model, x)
    campaign = Campaign(qmodel, x, labels, spec, "tests::inplace", batch_size=6)
    written, in_place, steps = _both(qmodel, lambda: [campaign.trial(i) for i in range(4)])  # type: ignore[arg-type,return-value]
    assert written == in_place and steps > 0
    cache = campaign.late_start()
    assert cache is not None and cache.resumed_images > 0


class _Branches(nn.Module):
    """`a` waits for its ReLU while `b` runs: a late-start cut before `b` keeps `a` as it was."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        b = self.b(x)
        y = self.c(F.relu(a) + b)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_a_value_a_cut_keeps_is_cached_before_its_relu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass that fills the cache runs the model's ops as written: `a`, kept across the cut before `b`, is
    cached as `a` returned it, not as the sum it becomes in place later in that pass."""
    monkeypatch.setattr(late_start, "BUCKET_OVERHEAD_IMAGES", 0)
    with seeded(1):
        model, x = _Branches().eval(), torch.randn(16, 3, 8, 8)
    qmodel = quantize(model, x)
    assert qmodel.layers["a"].in_place == ("relu", "add")
    cache = LateStart(qmodel, x)
    assert [cut.layer for cut in cache.cuts] == ["b", "c", "fc"]
    images = torch.arange(3, 11)
    pattern = FaultPattern.from_faults([("act", "b", 37 * k, 6, "flip", k) for k in range(len(images))])
    resumed = cache.logits(images, pattern)
    assert [positions.tolist() for positions, _ in resumed] == [list(range(len(images)))]
    in_place = cache.qmodel.own_ops_run
    assert torch.equal(_bits(resumed[0][1]), _bits(qmodel(x[images], pattern)))
    assert cache.qmodel.own_ops_run > in_place
    assert not torch.equal(resumed[0][1], qmodel(x[images]))  # the faults bite


def test_layouts_that_differ_run_the_sum_as_written() -> None:
    """A channels-last conv output plus a row-major input: the sum is not taken in place (its result's layout
    would differ), and the numbers are the same."""
    with seeded(2):
        model, x = _Net(lambda m, x: F.relu(m.conv(x) + x)).eval(), torch.randn(6, 3, 8, 8)
    qmodel = quantize(model, x, memory_format="auto")
    assert qmodel.layers["conv"].in_place == ("add", "relu")
    written, in_place, steps = _both(qmodel, lambda: qmodel(x))
    assert torch.equal(_bits(written), _bits(in_place)) and steps == 0


# -- never where something else reads the output -----------------------------------------------------------------------
def _stem(x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    with seeded(3):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                              nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    return model, x


def test_a_hook_of_the_users_turns_it_off() -> None:
    """A hook that keeps a layer's output sees it as the layer returned it, after the forward pass too."""
    model, x = _stem(torch.randn(6, 3, 8, 8))
    kept: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda module, args, out: kept.append(out))
    qmodel = quantize(model, x)
    assert all(not layer.in_place for layer in qmodel.layers.values())
    kept.clear()
    qmodel(x)
    assert len(kept) == 1 and bool((kept[0] < 0).any())


def test_a_global_hook_turns_it_off() -> None:
    model, x = _stem(torch.randn(6, 3, 8, 8))
    qmodel = quantize(model, x)
    assert qmodel.layers["0"].in_place == ("relu",)
    kept: list[torch.Tensor] = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: kept.append(out) if module is qmodel.module[0] else None)
    try:
        before = qmodel.own_ops_run
        out = qmodel(x)
    finally:
        handle.remove()
    assert qmodel.own_ops_run == before and bool((kept[0] < 0).any())
    assert torch.equal(out, qmodel(x)) and qmodel.own_ops_run > before


def test_a_hook_added_to_the_view_turns_it_off_while_it_is_there() -> None:
    model, x = _stem(torch.randn(6, 3, 8, 8))
    qmodel = quantize(model, x)
    kept: list[torch.Tensor] = []
    handle = qmodel.module[1].register_forward_pre_hook(lambda module, args: kept.append(args[0]))
    before = qmodel.own_ops_run
    out = qmodel(x)
    assert qmodel.own_ops_run == before and bool((kept[0] < 0).any())  # the ReLU module's input, unchanged
    handle.remove()
    assert torch.equal(qmodel(x), out) and qmodel.own_ops_run > before


def test_the_modules_are_walked_for_hooks_only_after_a_hook_was_added_somewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _stem(torch.randn(6, 3, 8, 8))
    qmodel = quantize(model, x)
    walks: list[int] = []
    counts = qmodel._hook_counts
    monkeypatch.setattr(qmodel, "_hook_counts", lambda: walks.append(1) or counts())
    qmodel(x)
    qmodel(x)
    assert walks == []  # nothing registered a hook since the view was built
    elsewhere = nn.Linear(2, 2).register_forward_hook(lambda *args: None)  # any hook, on any module, moves the counter
    before = qmodel.own_ops_run
    qmodel(x)
    qmodel(x)
    assert len(walks) == 1 and qmodel.own_ops_run > before  # one walk found the view as built
    elsewhere.remove()
    handle = qmodel.module[1].register_forward_pre_hook(lambda module, args: None)
    before = qmodel.own_ops_run
    qmodel(x)
    qmodel(x)
    assert len(walks) == 3 and qmodel.own_ops_run == before  # a hook on the view: walked at every pass, and off
    handle.remove()


def test_explain_reads_the_codes_before_the_relu() -> None:
    """The act site's fault-free codes include the negative ones the ReLU then clamps."""
    model, x = _stem(torch.randn(6, 3, 8, 8))
    qmodel = quantize(model, x)
    details = describe_faults(qmodel, [Fault("act", "0", k, 7, "flip", 0) for k in range(64)], x[:1])
    assert min(detail.code_before for detail in details) < 0


def test_recorded_and_restricted_ranges_are_unchanged() -> None:
    model, x = _stem(torch.randn(12, 3, 8, 8))
    qmodel = quantize(model, x)
    written, in_place, _ = _both(qmodel, lambda: qmodel.output_ranges(x)["0"][0])  # type: ignore[index]
    assert bool((written < 0).any()) and torch.equal(_bits(written), _bits(in_place))
    bounds = qmodel.output_ranges(x)
    low, high = bounds["0"]
    bounds["0"] = (low, torch.where(torch.arange(len(high)).reshape(high.shape) == 0, low, high))  # a channel < 0
    faults = [("act", "2", 11 * k, 7, "flip", k) for k in range(len(x))]  # none in layer 0: its ReLU could fuse
    with qmodel.restricted(bounds):
        for pattern in (None, FaultPattern.from_faults(faults)):
            written, in_place, steps = _both(qmodel, lambda: qmodel(x, pattern))  # noqa: B023
            assert torch.equal(_bits(written), _bits(in_place)) and steps > 0
