"""End to end: a `@resilience` gate on the int8 model a user deploys, in each format (torch.ao eager and FX, torchao
PT2E, ONNX QDQ), at every site, through `hwfault.assess`; the JSON report names each model's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torchao")
pytest.importorskip("onnxruntime")

TESTS = Path(__file__).parent

CONFTEST = f'''
import sys
sys.path.insert(0, {str(TESTS)!r})

import pytest, torch
from sklearn.datasets import load_digits
import deployed_models as dm


class Digits:
    def __init__(self):
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.int64)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        self.x_train, self.y_train = x[order][:1400], y[order][:1400]
        self.x_test, self.y_test = x[order][1400:], y[order][1400:]


@pytest.fixture(scope="session")
def digits():
    return Digits()


@pytest.fixture(scope="session")
def deployed(digits, tmp_path_factory):
    """The same trained network, deployed in each format."""
    calibration = dm.images(digits.x_train[:500])
    # 60 steps: 30 trained it to 0.495 on one CPU (an AMD EPYC) where another reached far more, and the gates' outcomes
    # below assume a model well above min_acc=0.3 (60 steps: 0.985 on both)
    net, eager = dm.trained_resnet_style(digits), dm.trained_resnet_style(digits, eager=True)
    return {{
        "ao-eager": dm.to_ao_eager(eager, calibration, dm.ResNetStyle.FUSIONS),
        "ao-fx": dm.to_ao_fx(net, calibration),
        "pt2e": dm.to_pt2e(net, calibration),
        "onnx": dm.to_onnx_qdq(net, calibration, tmp_path_factory.mktemp("onnx")),
    }}


@pytest.fixture(scope="session")
def val_data(digits):
    return dm.images(digits.x_test[:200]), digits.y_test[:200]
'''

GATES = '''
import pytest
from pytest_hwfault import resilience

FORMATS = ["ao-eager", "ao-fx", "pt2e", "onnx"]


@pytest.mark.parametrize("fmt", FORMATS)
@resilience(ber=1e-4, site=["act", "weight", "acc", "input", "qparams"], min_acc=0.3, budget=8, first=4)
def test_deployed_model(hwfault, deployed, val_data, fmt):
    result = hwfault.assess(deployed[fmt], val_data)
    assert result.trials


@pytest.mark.parametrize("fmt", FORMATS)
@resilience(ber=1e-3, site="act", bit_positions=[7], min_acc=0.999, budget=8, first=4)
def test_too_strict_gate_fails(hwfault, deployed, val_data, fmt):
    hwfault.assess(deployed[fmt], val_data)
'''

FORMAT_NAMES = {"ao-eager": "torch.ao eager", "ao-fx": "torch.ao fx", "pt2e": "pt2e", "onnx": "onnx"}


def test_a_gate_runs_on_each_deployed_format_at_every_site(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_deployed=GATES)
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hwfault", f"--hwfault-report={report}",
                                           "-q")
    result.assert_outcomes(passed=20, failed=4)
    records = json.loads(report.read_text())["campaigns"]
    assert len(records) == 24
    for record in records:
        fmt = next(name for name in FORMAT_NAMES if f"-{name}]" in record["nodeid"] or f"[{name}" in record["nodeid"])
        assert record["model_format"] == FORMAT_NAMES[fmt], record["nodeid"]
        assert record["coverage"]["macs"] == 1.0, record["nodeid"]
        passed = "test_deployed_model" in record["nodeid"]
        assert record["verdict"] == ("pass" if passed else "fail"), record["nodeid"]
    sites = {(r["model_format"], r["site"]) for r in records if "test_deployed_model" in r["nodeid"]}
    assert sites == {(f, s) for f in FORMAT_NAMES.values() for s in ("act", "weight", "acc", "input", "qparams")}
    out = result.stdout.str()
    assert "deployed pt2e int8 model: its own codes, scales and arithmetic" in out
    assert "float function of its int8 weights" in out
    # the readers' notes reach the record and the failure text: here the layers with no act site
    for record in records:
        if record["model_format"] == "pt2e":
            assert sum("no act site" in note for note in record["model_notes"]) == 3, record["nodeid"]
            assert record["result"]["model_notes"] == record["model_notes"]
    assert "model note" in out and "no act site" in out
