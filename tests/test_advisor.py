"""The advisor and stratified per-layer vulnerability (issue 18) on a CNN with a planted weak layer, and the marker's
mitigation arguments and --hwfault-advise end to end (pytester)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import one_thread

from pytest_hwfault import quantize
from pytest_hwfault import report as rp
from pytest_hwfault.advisor import advise, stratified_vulnerability
from pytest_hwfault.campaign import Campaign
from pytest_hwfault.spec import CampaignSpec

pytestmark = pytest.mark.usefixtures("single_threaded")

# A conv net whose first conv is planted weak: its channel 7 outputs a large constant nothing reads, so the layer's
# activation scale is 16x what its real channels need, and a fault in its output codes is 16x as large.
PLANTED = '''
import torch
from torch import nn


def planted(x, y):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(8 * 16, 10))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        for _ in range(80):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        top = net[:3](x[:256]).abs().max()
        net[1].weight[7] = 0.01
        net[1].bias[7] = 16 * top  # the planted outlier channel of layer "1"
        net[3].weight[:, 7] = 0  # which nothing reads
    return net
'''
SPEC = {"site": "act", "ber": 3e-4, "min_acc": 0.85, "budget": 32, "first": 4}


@pytest.fixture(scope="module")
def planted(digits: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    namespace: dict[str, Any] = {}
    exec(PLANTED, namespace)
    with one_thread():
        net = namespace["planted"](digits.x_train[:1200], digits.y_train[:1200])
        qmodel = quantize(net, digits.x_train[:256])
    return qmodel, digits.x_train[1200:1400], digits.y_train[1200:1400]


def test_the_advisor_names_the_planted_layer_and_its_protection_passes_the_gate(planted: Any) -> None:
    qmodel, x, y = planted
    spec = CampaignSpec(**SPEC)
    failing = Campaign(qmodel, x, y, spec, "tests::advisor").run()
    assert failing.outcome().verdict == "fail"
    rows = {row["name"]: row for row in failing.layer_vulnerability()}
    assert max(rows, key=lambda name: rows[name]["exposure_share"]) == "1"
    assert rows["1"]["vulnerability"] > rows["3"]["vulnerability"]  # the same act bits per image, more harm
    assert sum(row["exposure_share"] for row in rows.values()) == pytest.approx(1.0)
    advice = advise(qmodel, x, y, failing)
    assert advice["protect"] and advice["protect"][0] == "1" and advice["verdict"] == "pass"
    assert 1 <= advice["campaigns"] <= 4 and advice["ci_low"] >= 0.85
    # an independent check: the same campaign with those layers protected passes, meeting the same faults
    confirmed = Campaign(qmodel, x, y, spec.with_overrides(protect=advice["protect"]), "tests::advisor").run()
    assert confirmed.outcome().verdict == "pass" and confirmed.outcome().accuracy == advice["accuracy"]
    assert [t.faults for t in confirmed.trials.values()] == [t.faults for t in failing.trials.values()][
        : len(confirmed.trials)]
    bits = sum(layer.weight_bits() for layer in qmodel.layers.values())
    assert advice["cost"]["weight_bits"] == sum(qmodel.layers[n].weight_bits() for n in advice["protect"]) / bits
    record = rp.campaign_record(failing, "tests::advisor")
    record["advice"] = advice
    rp.validate_report(rp.build_report([record], {}))
    text = rp.failure_message(record, "pytest x")
    assert "advice       protect 1 (" in text and "of weight bits" in text and ">= 0.8500" in text


def test_no_protection_helps_a_model_below_the_threshold_fault_free(planted: Any) -> None:
    qmodel, x, y = planted
    result = Campaign(qmodel, x, y, CampaignSpec(**{**SPEC, "min_acc": 0.999}), "tests::hopeless").run()
    advice = advise(qmodel, x, y, result)
    assert advice["protect"] == [] and advice["campaigns"] == 0 and "no protection" in advice["reason"]


def test_stratified_vulnerability_ranks_the_planted_layer_first(planted: Any) -> None:
    qmodel, x, y = planted
    rows = stratified_vulnerability(qmodel, x, y, CampaignSpec(**{**SPEC, "ber": 1e-3}), "tests::strat", trials=4)
    assert [row["name"] for row in rows] == list(qmodel.layers)
    by_name = {row["name"]: row for row in rows}
    assert by_name["1"]["vulnerability_low"] > by_name["3"]["vulnerability_high"]
    for row in rows:
        assert row["vulnerability_low"] <= row["vulnerability"] <= row["vulnerability_high"]
        assert row["site_bits"] == qmodel.layers[row["name"]].numel(__import__("pytest_hwfault").faults.Site.ACT) * 8
    assert sum(row["exposure_share"] for row in rows) == pytest.approx(1.0)


# -- end to end ----------------------------------------------------------------------------------------------------
CONFTEST = '''
import pytest, torch
from sklearn.datasets import load_digits
from planted import planted


@pytest.fixture(scope="session")
def digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


@pytest.fixture(scope="session")
def model(digits):
    x, y = digits
    return planted(x[:1200], y[:1200])


@pytest.fixture(scope="session")
def val_data(digits):
    x, y = digits
    return x[1200:1400], y[1200:1400]
'''


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(planted=PLANTED)
    pytester.makeconftest(CONFTEST)
    return pytester


def test_the_marker_takes_mitigations_and_the_advisor_prints_its_suggestion(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_gates='''
from pytest_hwfault import resilience


@resilience(site="act", ber=3e-4, min_acc=0.85, budget=32)
def test_weak(hwfault, model, val_data):
    hwfault.assess(model, val_data)


@resilience(site="act", ber=3e-4, min_acc=0.85, budget=32, protect=["1"])
def test_protected(hwfault, model, val_data):
    result = hwfault.assess(model, val_data)
    assert result.outcome().unmitigated.estimate < result.outcome().accuracy


@resilience(site="act", ber=2e-4, min_acc=0.5, budget=8, mitigation="range_restriction")
def test_ranger(hwfault, model, val_data):
    hwfault.assess(model, val_data)


@resilience(site="weight", ber=1e-4, min_acc=0.0, budget=8, ecc="secded", ecc_word_bits=32)
def test_ecc(hwfault, model, val_data):
    hwfault.assess(model, val_data)


def test_vulnerability(hwfault, model, val_data):
    rows = hwfault.vulnerability(model, val_data, site="act", ber=1e-3, trials=4)
    assert [r["name"] for r in rows][0] == "1" and max(rows, key=lambda r: r["vulnerability"])["name"] == "1"
''')
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "--hwfault", "--hwfault-advise", "-p", "no:xdist",
                                        "--hwfault-report=report.json")
    result.assert_outcomes(passed=4, failed=1)
    out = result.stdout.str()
    assert "test_weak" in out and "advice       protect 1 (" in out and "of weight bits" in out
    assert "confirmed by a campaign with the same seed and faults" in out
    report = json.loads((suite.path / "report.json").read_text())
    by_test = {r["nodeid"].split("::")[1]: r for r in report["campaigns"]}
    assert by_test["test_weak"]["advice"]["protect"][0] == "1"
    assert by_test["test_weak"]["advice"]["verdict"] == "pass"
    assert by_test["test_protected"]["mitigation"]["protected"] == ["1"]
    assert by_test["test_protected"]["mitigation"]["unmitigated_accuracy"] < by_test["test_protected"]["accuracy"]
    assert by_test["test_ranger"]["mitigation"]["name"] == "range_restriction"
    assert by_test["test_ecc"]["mitigation"]["cost"]["ecc"]["check_bits"] == 7
    assert all(r["silent"] is not None and r["detected"] is not None for r in report["campaigns"])


def test_bad_mitigation_arguments_are_collection_errors(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_bad_a='''
import pytest


@pytest.mark.resilience(site="act", ber=1e-3, min_acc=0.5, mitigation="tmr")
def test_a(hwfault):
    pass
''', test_bad_b='''
import pytest


@pytest.mark.resilience(site="act", ber=1e-3, min_acc=0.5, ecc="secded")
def test_b(hwfault):
    pass
''')
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    out = result.stdout.str()
    assert "test_a: @resilience argument mitigation: 'tmr' is not a mitigation; allowed: 'range_restriction'" in out
    assert "test_b: @resilience argument ecc: ecc='secded' protects weight memory" in out
    assert result.ret == pytest.ExitCode.INTERRUPTED


def test_without_the_option_a_failing_gate_gets_no_advice(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_gate='''
from pytest_hwfault import resilience


@resilience(site="act", ber=3e-4, min_acc=0.85, budget=32)
def test_weak(hwfault, model, val_data):
    hwfault.assess(model, val_data)
''')
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "--hwfault", "-p", "no:xdist")
    result.assert_outcomes(failed=1)
    assert "advice       protect" not in result.stdout.str() and "--hwfault-advise finds a set" in result.stdout.str()


def test_a_vulnerability_table_of_a_site_with_nothing_to_fault_is_refused() -> None:
    """An empty table would read as "no layer is vulnerable": refused, as a campaign on that site is."""
    from torch import nn

    from pytest_hwfault.qmodel import SiteUnreachableError

    class Gram(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.matmul(x, x.transpose(1, 2)).flatten(1)

    torch.manual_seed(0)
    x = torch.randn(16, 4, 3)
    qmodel = quantize(Gram(), x)
    with pytest.raises(SiteUnreachableError, match="site 'weight' has nothing to fault"):
        stratified_vulnerability(qmodel, x, qmodel(x).argmax(1), CampaignSpec(site="weight", ber=1e-3, min_acc=0.0),
                                 "gram", trials=2)
