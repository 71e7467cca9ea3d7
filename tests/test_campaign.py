"""Campaigns: deterministic trials, exact merges of shards, early verdicts, fault dropping."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_hwfault import quantize
from pytest_hwfault.campaign import Campaign, CampaignResult
from pytest_hwfault.evaluate import EvaluationError, decide, predict
from pytest_hwfault.faults import trial_seed
from pytest_hwfault.spec import CampaignSpec, SpecError, expand

SCRIPT = """
import json, sys, torch
from torch import nn
from sklearn.datasets import load_digits
from pytest_hwfault import quantize
from pytest_hwfault.campaign import Campaign
from pytest_hwfault.spec import CampaignSpec

torch.set_num_threads(int(sys.argv[1]))
d = load_digits()
x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
y = torch.tensor(d.target)
with torch.random.fork_rng():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
qmodel = quantize(net, x[:256])
spec = CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=4, first=4, seed=5)
result = Campaign(qmodel, x[1500:], y[1500:], spec, "script::campaign").run()
print(json.dumps(result.to_dict()["trials"]))
"""


@pytest.fixture(scope="module")
def setup(digits):  # noqa: ANN001 - the conftest's Digits
    with torch.random.fork_rng():
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.Adam(net.parameters(), 2e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(net(digits.x_train), digits.y_train).backward()
            opt.step()
    net.eval()
    return quantize(net, digits.x_train[:256]), digits.x_test[:200], digits.y_test[:200]


def _campaign(setup, **spec) -> Campaign:  # noqa: ANN001
    qmodel, x, y = setup
    arguments = {"site": "act", "ber": 2e-3, "min_acc": 0.5, "budget": 16, "first": 4, **spec}
    return Campaign(qmodel, x, y, CampaignSpec(**arguments), "tests::campaign")


def test_trial_seed_depends_only_on_seed_campaign_and_index() -> None:
    assert trial_seed(1, "abc", 3) == trial_seed(1, "abc", 3)
    assert len({trial_seed(1, "abc", i) for i in range(100)}) == 100
    assert trial_seed(1, "abc", 3) != trial_seed(2, "abc", 3) != trial_seed(1, "abd", 3)


def test_campaign_id_is_stable_and_names_the_test() -> None:
    spec = CampaignSpec(site="act", ber=1e-5, min_acc=0.8)
    assert spec.campaign_id("t.py::a") == CampaignSpec(site="act", ber=1e-5, min_acc=0.8).campaign_id("t.py::a")
    assert spec.campaign_id("t.py::a") != spec.campaign_id("t.py::b")
    # fixed value: changing how ids are derived would silently change every stored seed and baseline
    assert spec.campaign_id("t.py::a") == CampaignSpec.from_dict(spec.to_dict()).campaign_id("t.py::a")


def test_same_seed_same_trials_across_processes_and_thread_counts() -> None:
    outputs = [subprocess.run([sys.executable, "-c", SCRIPT, threads], capture_output=True, text=True, check=True)
               .stdout for threads in ("1", "2")]
    assert outputs[0] == outputs[1]
    assert len(json.loads(outputs[0])) == 4


def test_trials_are_reproducible_and_differ(setup) -> None:  # noqa: ANN001
    campaign = _campaign(setup)
    first = [campaign.trial(i) for i in range(4)]
    assert [campaign.trial(i) for i in range(4)] == first
    assert len({t.correct_mask for t in first}) > 1  # different faults, different outcomes
    assert all(t.faults > 0 for t in first)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_partition_of_trials_merges_to_the_single_run(setup, data) -> None:  # noqa: ANN001
    campaign = _campaign(setup, budget=8, min_acc=0.95)  # near the accuracy: runs to several checkpoints
    single = campaign.run()
    total = len(single.trials)
    shards = data.draw(st.lists(st.integers(0, 3), min_size=total, max_size=total))
    parts = []
    for shard in range(4):
        part = campaign.empty_result()
        for i in range(total):
            if shards[i] == shard:
                part.trials[i] = single.trials[i]
        parts.append(part)
    order = data.draw(st.permutations(parts))
    merged = order[0]
    for part in order[1:]:
        merged = merged.merge(part)
    merged.seconds = single.seconds
    assert merged.to_dict() == single.to_dict()
    assert merged.outcome() == single.outcome()
    # and through JSON
    assert CampaignResult.from_dict(json.loads(json.dumps(merged.to_dict()))).outcome() == single.outcome()


def test_early_stop_far_from_threshold_and_inconclusive_near_it(setup) -> None:  # noqa: ANN001
    far = _campaign(setup, min_acc=0.3).run()
    assert far.outcome().verdict == "pass" and len(far.trials) == 4
    fail = _campaign(setup, min_acc=0.999).run()
    assert fail.outcome().verdict == "fail" and len(fail.trials) == 4
    quantized = _campaign(setup).quantized_accuracy
    near = _campaign(setup, ber=1e-6, min_acc=quantized, budget=8).run()
    assert near.outcome().verdict == "inconclusive" and len(near.trials) == 8


def test_merge_refuses_other_campaigns_and_conflicting_trials(setup) -> None:  # noqa: ANN001
    a = _campaign(setup).run()
    b = _campaign(setup, seed=1).run()
    with pytest.raises(ValueError, match="cannot merge campaign"):
        a.merge(b)
    forged = CampaignResult.from_dict(a.to_dict())
    t0 = forged.trials[0]
    forged.trials[0] = type(t0)(**{**t0.to_dict(), "correct": t0.correct - 1})
    with pytest.raises(ValueError, match="differs between partial results"):
        a.merge(forged)


def test_lost_trials_make_the_result_incomplete(setup) -> None:  # noqa: ANN001
    result = _campaign(setup, min_acc=0.95).run()
    del result.trials[1]
    assert result.outcome().verdict == "incomplete" and not result.decided()


@pytest.mark.parametrize("site", ["act", "acc", "input", "weight"])
def test_fault_dropping_is_bit_identical(setup, site: str) -> None:  # noqa: ANN001
    qmodel, x, y = setup
    spec = CampaignSpec(site=site, ber=3e-5 if site == "acc" else 3e-4, min_acc=0.5, budget=6, first=6)
    plain = Campaign(qmodel, x, y, spec, "t", batch_size=64, drop_fault_free=False)
    dropping = Campaign(qmodel, x, y, spec, "t", batch_size=64, drop_fault_free=True)
    trials = [plain.trial(i) for i in range(6)]
    assert trials == [dropping.trial(i) for i in range(6)]
    if site != "weight":
        assert any(t.faulty_images < t.images for t in trials)  # dropping had images to drop


def test_spec_expansion_and_errors() -> None:
    specs = expand({"ber": [1e-5, 1e-4], "site": ["act", "weight"], "min_acc": 0.8})
    assert [s.label() for s in specs] == ["act-ber1e-05", "act-ber0.0001", "weight-ber1e-05", "weight-ber0.0001"]
    for kwargs, argument in [
        ({"ber": 0.0, "site": "act", "min_acc": 0.5}, "ber"),
        ({"ber": 1e-5, "site": "act"}, "min_acc"),
        ({"ber": 1e-5, "site": "act", "min_acc": 0.5, "bit_positions": [8]}, "bit_positions"),
        ({"ber": 1e-5, "site": "acc", "min_acc": 0.5, "bit_positions": [32]}, "bit_positions"),
        ({"ber": [1e-5, 1e-5], "site": "act", "min_acc": 0.5}, "ber"),
        ({"ber": 1e-5, "site": "act", "min_acc": 0.5, "budget": 2.5}, "budget"),
        ({"ber": 1e-5, "site": "act", "min_acc": 0.5, "speed": 1}, "speed"),
    ]:
        with pytest.raises(SpecError) as info:
            expand(kwargs)
        assert info.value.argument == argument
    assert CampaignSpec(site="acc", ber=1e-5, min_acc=0.5, bit_positions=[31]).bit_positions == (31,)


class _Heads(nn.Module):
    """The same logits, returned as a tensor, a dict, a ModelOutput-like object or a tuple."""

    def __init__(self, form: str) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(5)
            self.body = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
        self.form = form

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.body(x)
        if self.form == "dict":
            return {"features": x, "logits": logits}
        if self.form == "object":
            return SimpleNamespace(logits=logits, hidden=x)
        if self.form == "tuple":
            return logits, x.mean(1)
        return logits


@pytest.mark.parametrize("site", ["act", "weight"])
def test_outputs_other_than_a_tensor_give_the_logits_numbers(digits, site: str) -> None:  # noqa: ANN001
    x, y = digits.x_test[:120], digits.y_test[:120]
    spec = CampaignSpec(site=site, ber=2e-3, min_acc=0.0, budget=4)
    results, golden = {}, {}
    for form in ("tensor", "dict", "object", "tuple"):
        campaign = Campaign(quantize(_Heads(form).eval(), x), x, y, spec, "t")
        results[form] = campaign.run().to_dict() | {"seconds": 0, "identity": {}}
        golden[form] = campaign.golden
    assert results["dict"] == results["tuple"] == results["tensor"]
    # torch.fx cannot trace a forward that builds an object, so its layers requantize their inputs on their own
    # scales (no code passing, no late start): other numbers under faults, the same fault-free predictions here
    assert torch.equal(golden["object"], golden["tensor"])
    assert len(results["object"]["trials"]) == len(results["tensor"]["trials"])
    with pytest.raises(EvaluationError, match=r"keys \['a', 'b'\] and no 'logits'"):
        decide({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)})


def test_weight_faults_on_a_channels_last_model_land_as_on_its_contiguous_twin() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(6)
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                              nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
        x = torch.randn(48, 3, 6, 6)
    y = model(x).argmax(1).detach()
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert not twin[2].weight.is_contiguous()  # a channels-last conv weight (fbgemm's fused weights are too)
    spec = CampaignSpec(site="weight", ber=3e-3, min_acc=0.0, budget=4)
    runs = [Campaign(quantize(m, x), x, y, spec, "t").run().to_dict() | {"seconds": 0, "identity": {}}
            for m in (model, twin)]
    # the float model's own channels-last convolutions sum in another order: calibrated scales may differ by an ulp
    for ours, theirs in zip(runs[0]["layers"], runs[1]["layers"]):
        assert ours["act_scale"] == pytest.approx(theirs["act_scale"], rel=1e-6)
    assert runs[0]["trials"] == runs[1]["trials"] and sum(t["faults"] for t in runs[0]["trials"]) > 0


class _Unrepeatable(nn.Module):
    """`how`: dropout left on in eval mode, a random op, or a buffer the forward updates."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        if self.how == "dropout":
            h = torch.nn.functional.dropout(h, 0.5, training=True)
        elif self.how == "noise":
            h = h + 0.1 * torch.randn_like(h)
        elif self.how != "none":
            self.calls += 1
            h = h * self.calls
        return self.head(h)


@pytest.mark.parametrize("how", ["dropout", "noise", "state"])
def test_a_model_whose_forward_is_not_repeatable_is_refused(how: str) -> None:
    """Critical faults are images whose prediction differs from the fault-free one: a forward that changes by
    itself would count its own randomness as faults (and its accuracy would be luck). Refused before the golden
    run, saying why; the same model with its forward made repeatable runs."""
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model, x = _Unrepeatable(how).eval(), torch.randn(40, 16)
        y = torch.randint(0, 4, (40,))
        spec = CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=2)
        qmodel = quantize(model, x)
        cause = r"forward writes 1 buffer\(s\) at every call \(calls\)" if how == "state" else \
            r"fault-free output differs between two passes over the same 2 images .*not repeatable"
        with pytest.raises(EvaluationError, match=cause):
            Campaign(qmodel, x, y, spec, "t")
        model.how = "none"
        Campaign(quantize(model, x), x, y, spec, "t").run()


class _RangeKept(nn.Module):
    """A layer whose output is fake-quantized on the range it has seen so far (a running min and max, as torch.ao's
    FakeQuantize with a MinMaxObserver keeps it in a QAT-prepared model): two passes over the same images agree."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 4)
        self.register_buffer("low", torch.tensor(float("inf")))
        self.register_buffer("high", torch.tensor(float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        self.low.copy_(torch.minimum(self.low, h.min()))
        self.high.copy_(torch.maximum(self.high, h.max()))
        step = (self.high - self.low) / 15
        return self.head(torch.round((h - self.low) / step) * step + self.low)


def test_a_forward_that_keeps_a_range_is_refused() -> None:
    """A forward that updates a running range at every call ran: two fault-free passes over the same images agree,
    but each trial's faults widened the range every later trial was computed on, so the numbers depended on the
    trials' order and their split between workers. A pass over other images now runs between the two, and a
    changed buffer is refused, naming it."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model, x = _RangeKept().eval(), torch.randn(40, 16)
        y = torch.randint(0, 4, (40,))
    qmodel = quantize(model, x)
    first, again = qmodel(x[:2]), qmodel(x[:2])
    assert torch.equal(first, again)  # the passes the check ran before agree
    with pytest.raises(EvaluationError, match=r"forward writes [12] buffer\(s\) at every call \((high|low)"):
        Campaign(qmodel, x, y, CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=2), "t")


def test_a_qat_prepared_model_is_refused_until_its_observers_are_frozen() -> None:
    """torch.ao's FakeQuantize modules in a QAT-prepared model update their ranges and scales at every call, in eval
    mode too: refused, naming the ways out; with its observers disabled the same model runs."""
    import warnings

    import torch.ao.quantization as tq

    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao's eager quantization API
        warnings.filterwarnings("ignore", "Please use quant_min and quant_max", UserWarning)  # its x86 qconfig
        torch.manual_seed(6)
        model = nn.Sequential(tq.QuantStub(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4), tq.DeQuantStub())
        model.qconfig = tq.get_default_qat_qconfig("x86")
        tq.prepare_qat(model.train(), inplace=True)
        x, y = torch.randn(40, 16), torch.randint(0, 4, (40,))
        model(x)
        model.eval()
        spec = CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=2)
        with pytest.raises(EvaluationError, match=r"forward writes \d+ buffer\(s\).*torch.ao.*disable_observer"):
            Campaign(quantize(model, x), x, y, spec, "t")
        model.apply(tq.disable_observer)
        Campaign(quantize(model, x), x, y, spec, "t").run()


class _Counting(nn.Module):
    """A forward that advances a call counter and changes its output from the third call on: two passes agree."""

    def __init__(self, lazy: bool = False) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(16, 8), nn.Linear(8, 4)
        self.calls, self.lazy, self.ready = 0, lazy, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lazy:  # set up on the first call only, then constant
            self.ready = True
            return self.head(torch.relu(self.fc(x)))
        self.calls += 1
        out = self.head(torch.relu(self.fc(x)))
        return out if self.calls < 3 else out.flip(1)


def test_a_forward_that_counts_its_calls_is_refused_and_a_lazy_set_up_is_not() -> None:
    """A model whose output depends on how often its forward ran gave equal passes at the repeatability check (the
    counter had not reached its step) and then flipped its logits for the rest of the campaign: its accuracy was
    measured on another function than the one checked. A plain attribute that changes between the check's two
    passes is refused, naming it; one set on the first call only (lazy set-up) is not."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        x, y = torch.randn(40, 16), torch.randint(0, 4, (40,))
        spec = CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=2)
        counting = _Counting().eval()
        qmodel = quantize(counting, x)
        counting_view = qmodel.module
        counting_view.calls = -100  # far from its step: the check's passes agree
        with pytest.raises(EvaluationError, match=r"changes 1 attribute\(s\) at every call \(\(the model\)\.calls: "
                                                  r"-99 -> -97\)"):
            Campaign(qmodel, x, y, spec, "t")
        Campaign(quantize(_Counting(lazy=True).eval(), x), x, y, spec, "t").run()


class _BatchMixing(nn.Module):
    """Self-attention over [N, T, D] inputs; `batch_first=False` (nn.MultiheadAttention's default) attends across
    the N images at each position instead of across the T positions of each image."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))


def test_a_model_whose_images_read_each_other_is_refused() -> None:
    """A trial re-runs only the images that hold faults: a model in which each image's output reads the others
    (attention across the batch) would have faults in one image left out of the others' predictions, and batches of
    other sizes would change every prediction. Refused, naming the cause; the batch-first model runs."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        x, y = torch.randn(24, 6, 16), torch.randint(0, 4, (24,))
        mixing = _BatchMixing(batch_first=False).eval()
        own = _BatchMixing(batch_first=True).eval()
        own.load_state_dict(mixing.state_dict())
    spec = CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=2)
    with pytest.raises(EvaluationError, match=r"output for one image depends on the other images in its batch: "
                                              r"image 0 alone and with 1 other\(s\).*batch_first=True"):
        Campaign(quantize(mixing, x), x, y, spec, "t")
    Campaign(quantize(own, x), x, y, spec, "t").run()


class _Squeezed(nn.Module):
    """Pools to [N, C, 1, 1] and squeezes every dimension of one: for a single image the batch goes too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3), keepdim=True).squeeze())


def test_logits_that_lose_the_batch_dimension_for_one_image_are_refused() -> None:
    """Trials run faulty images alone or in small groups: logits [classes] for one image would count each logit
    as an image (predict gave 6 predictions for 3 images in batches of 2). Refused before the golden run, and
    wherever a batch's logits do not match it."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model, x = _Squeezed().eval(), torch.randn(40, 3, 8, 8)
        y = torch.randint(0, 4, (40,))
    qmodel = quantize(model, x)
    message = r"logits of shape \[4\] for a batch of 1 image\(s\): their first dimension must be the batch"
    with pytest.raises(EvaluationError, match=message):
        Campaign(qmodel, x, y, CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=2), "t")
    with pytest.raises(EvaluationError, match=message):
        predict(qmodel, x[:3], batch_size=2)


def test_a_trial_too_large_for_memory_is_refused_before_the_golden_run(setup, monkeypatch) -> None:  # noqa: ANN001
    """One trial holds every image's faults at once: past MAX_FAULTS_PER_TRIAL (measured ~40 bytes a fault) the
    campaign refuses at construction, with the numbers and what to change, instead of dying in the OOM killer."""
    import pytest_hwfault.faults as faults_module

    qmodel, x, y = setup
    spec = CampaignSpec(site="act", ber=0.5, min_acc=0.0)
    bits = faults_module.drawable_bits(faults_module.FaultModel("act", 0.5), qmodel.targets(faults_module.Site.ACT),
                                       len(x))
    monkeypatch.setattr(faults_module, "MAX_FAULTS_PER_TRIAL", bits // 4)  # half the expected faults
    golden = []
    monkeypatch.setattr(qmodel, "run_batch", lambda *args, **kwargs: golden.append(1))
    with pytest.raises(ValueError, match=r"ber=0.5 over [\d,]+ bits at site 'act' \(\d+ images\).*samples=.*layers="):
        Campaign(qmodel, x, y, spec, "tests::too_large")
    assert not golden  # refused before any forward pass
    monkeypatch.undo()  # the default limit: the same campaign runs
    assert Campaign(qmodel, x, y, spec, "tests::too_large").trial(0).faults > 0


def test_campaigns_on_one_view_and_one_set_of_images_share_their_fault_free_runs(digits_cnn: nn.Module,
                                                                                 digits: Any) -> None:
    """Late start's cache, the golden and the float predictions are computed once for every campaign on the same
    view and images (a suite's sites and BERs, the advisor's per-layer campaigns), and each campaign's trials are
    what a campaign with runs of its own computes; other images, or a cut by `samples`, get runs of their own."""
    from pytest_hwfault import campaign as campaign_module

    x, y = digits.x_test[:96], digits.y_test[:96]
    qmodel = quantize(digits_cnn, digits.x_train[:256])
    specs = [CampaignSpec(site=site, ber=1e-3, min_acc=0.0, seed=3, **extra) for site, extra in
             (("act", {}), ("weight", {}), ("act", {"burst": 2}), ("pe", {"array": (8, 8)}))]
    campaigns = [Campaign(qmodel, x, y, spec, f"shared-{i}", identity={"data": "d1"}) for i, spec in enumerate(specs)]
    first = campaigns[0]
    assert all(c.fault_free is first.fault_free for c in campaigns)
    assert first.late_start() is not None and campaigns[1].late_start() is first.late_start()
    shared = [[c.trial(i) for i in range(3)] for c in campaigns]
    campaign_module._FAULT_FREE.clear()  # each campaign again, with runs of its own
    for spec, trials, i in zip(specs, shared, range(len(specs))):
        campaign_module._FAULT_FREE.clear()
        alone = Campaign(qmodel, x, y, spec, f"shared-{i}", identity={"data": "d1"})
        assert alone.fault_free is not first.fault_free
        assert [alone.trial(t) for t in range(3)] == trials, spec.site
        assert torch.equal(alone.golden, campaigns[i].golden) and alone.float_accuracy == campaigns[i].float_accuracy
    # other images: runs of their own, which replace the one entry; the same images cut by `samples` (their own
    # fingerprint, not the identity's of all of them) share them
    other = Campaign(qmodel, x[:64], y[:64], specs[0], "other")
    assert other.fault_free is not first.fault_free and len(campaign_module._FAULT_FREE) == 1
    cut = Campaign(qmodel, x, y, CampaignSpec(site="act", ber=1e-3, min_acc=0.0, samples=64), "cut",
                   identity={"data": "d1"})
    assert cut.fault_free is other.fault_free and torch.equal(other.golden, cut.golden)
    # a view whose state changed since (someone edited its weights) is another model: runs of its own
    weight = qmodel.layers["fc1" if "fc1" in qmodel.layers else next(iter(qmodel.layers))].module.weight
    with torch.no_grad():
        weight.mul_(-1)
    try:
        assert Campaign(qmodel, x[:64], y[:64], specs[0], "edited").fault_free is not other.fault_free
    finally:
        with torch.no_grad():
            weight.mul_(-1)


class _Gram(nn.Module):
    """Its only multiply-accumulate is a matmul of two activations: no weight to fault."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, x.transpose(1, 2)).flatten(1)


def test_a_site_with_nothing_to_fault_is_refused_not_passed() -> None:
    """Trials drawn from no targets are all fault-free, and would pass any threshold the model meets: refused before
    the golden run, naming the layers and why (here: a matmul of activations holds no weights; `layers=` selecting
    none)."""
    from pytest_hwfault.qmodel import SiteUnreachableError

    torch.manual_seed(0)
    x = torch.randn(32, 4, 3)
    qmodel = quantize(_Gram(), x)
    labels = qmodel(x).argmax(1)
    with pytest.raises(SiteUnreachableError, match=r"site 'weight' has nothing to fault in this model: each of its "
                                                   r"quantized layers \(matmul\(\)\) holds no weights"):
        Campaign(qmodel, x, labels, CampaignSpec(site="weight", ber=1e-3, min_acc=0.5), "gram")
    Campaign(qmodel, x, labels, CampaignSpec(site="act", ber=1e-3, min_acc=0.5), "gram")  # its act codes: fine
