"""Tests for pytest_hwfault.report: records, validation, shard merging, baselines, messages, table, plots, CLI.

Campaign results are built directly from TrialResult objects with chosen counts (no model runs), so every verdict
and number below is known in advance and the whole file runs in a few seconds.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_hwfault import report as rp
from pytest_hwfault.campaign import CampaignResult, TrialResult, _pack
from pytest_hwfault.spec import CampaignSpec

ENV = {"machine": {"node": "test"}, "python": "3", "torch": "x", "plugin": "0", "created": "2024-01-01T00:00:00"}
IMAGES = 100
NODE = "tests/models/test_resnet.py::test_resilience"


def _layer(name: str, type_: str, weight_scale: float, act_scale: float) -> dict[str, Any]:
    """A row as QuantizedModel.summary() gives it."""
    return {"name": name, "type": type_, "bits": 8, "weight_scale_max": weight_scale,
            "weight_scale_mean": weight_scale / 2, "input_scale": 0.02, "act_scale": act_scale,
            "act_clip_rate": 0.0, "input_clip_rate": 0.0, "input_source": None, "output_shape": [4, 8, 8]}


LAYERS = [
    _layer("conv1", "Conv2d", 0.011, 0.05),
    _layer("layer1.0.conv1", "Conv2d", 0.0042, 0.125),
    _layer("fc", "Linear", 0.0031, 0.3),
    _layer("layer2.0.conv2", "Conv2d", 0.007, 0.02),
]


def _trial(index: int, correct: int, site: str) -> TrialResult:
    """Trial `index`: conv1 is hit but never harmed, layer1.0.conv1 half the time, fc (odd trials) always."""
    critical = IMAGES - correct
    faults = {"conv1": 1, "layer1.0.conv1": 2}
    exposure = {"conv1": 1.0, "layer1.0.conv1": 2.0}
    damage = {"conv1": 0.0, "layer1.0.conv1": 1.0}
    if index % 2:
        faults["fc"], exposure["fc"], damage["fc"] = 1, 1.0, 1.0
    if site == "weight":  # persistent faults: one trial is one exposure, damage is the critical share
        exposure = dict.fromkeys(faults, 1.0)
        damage = {name: {"conv1": 0.0, "layer1.0.conv1": 0.5, "fc": 1.0}[name] for name in faults}
    return TrialResult(
        trial=index, images=IMAGES, correct=correct, critical=critical, nonfinite=int(index % 3 == 0),
        faults=sum(faults.values()), faulty_images=IMAGES if site == "weight" else sum(faults.values()),
        correct_mask=_pack(torch.arange(IMAGES) < correct), layer_faults=faults, layer_exposure=exposure,
        layer_damage=damage,
    )


def _result(spec: CampaignSpec, corrects: list[int], *, nodeid: str = NODE, indices: list[int] | None = None,
            quantized: float = 0.92, seconds: float = 2.5) -> CampaignResult:
    """A result holding trials `indices` (default all) of a campaign whose trial i has corrects[i] correct images."""
    trials = {i: _trial(i, corrects[i], spec.site) for i in (range(len(corrects)) if indices is None else indices)}
    return CampaignResult(spec.campaign_id(nodeid), nodeid, spec, IMAGES, 0.95, quantized, copy.deepcopy(LAYERS),
                          trials, seconds)


PASS_SPEC = CampaignSpec(site="act", ber=1e-4, min_acc=0.8, budget=16, first=4, seed=7)
FAIL_SPEC = CampaignSpec(site="act", ber=1e-3, min_acc=0.8, budget=16, first=4, seed=7)
INCONCLUSIVE_SPEC = CampaignSpec(site="act", ber=1e-2, min_acc=0.8, budget=16, first=4, seed=7)
WEIGHT_SPEC = CampaignSpec(site="weight", ber=1e-5, max_drop=0.1, budget=64, first=4, seed=3)


def _campaigns() -> list[tuple[str, CampaignSpec, list[int]]]:
    """(nodeid, spec, per-trial correct counts) of a small suite with every verdict and several checkpoints."""
    return [
        (f"{NODE}[act-ber0.0001]", PASS_SPEC, [95] * 16),
        (f"{NODE}[act-ber0.001]", FAIL_SPEC, [50, 52, 48, 51] + [50] * 12),
        (f"{NODE}[act-ber0.01]", INCONCLUSIVE_SPEC, [80] * 16),
        ("tests/test_weights.py::test_weight_faults", WEIGHT_SPEC, [100, 99] * 32),
    ]


def _report(indices: dict[str, list[int]] | None = None, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Report of the suite; `indices` limits each campaign (by nodeid) to some trials, as a shard computes them."""
    records = []
    for nodeid, spec, corrects in _campaigns():
        if nodeid in skip:
            continue
        chosen = None if indices is None else indices.get(nodeid, list(range(len(corrects))))
        result = _result(spec, corrects, nodeid=nodeid, indices=chosen)
        if chosen is None:  # a single full run stops at the deciding checkpoint
            result = result.trimmed()
        records.append(rp.campaign_record(result, nodeid))
    return rp.build_report(records, dict(ENV))


def _record(verdict: str) -> dict[str, Any]:
    by_verdict = {rec["verdict"]: rec for rec in _report()["campaigns"]}
    return by_verdict[verdict]


# ----------------------------------------------------------------------------------------------------------------
# records


def test_campaign_record_fields_and_types() -> None:
    result = _result(PASS_SPEC, [95] * 16)
    record = rp.campaign_record(result, NODE)
    json.dumps(record, allow_nan=False)  # strict JSON
    assert record["nodeid"] == NODE and record["campaign_id"] == PASS_SPEC.campaign_id(NODE)
    assert record["label"] == "act-ber0.0001" and record["site"] == "act" and record["kind"] == "flip"
    assert record["ber"] == 1e-4 and record["bits"] == 8 and record["seed"] == 7 and record["seconds"] == 2.5
    assert record["verdict"] == "pass" and record["complete"] is True
    assert record["contiguous"] == 16 and record["next_checkpoint"] is None and record["missing_trials"] == []
    assert record["trials"] == 4  # decided at the first checkpoint; later trials are ignored
    assert record["accuracy"] == pytest.approx(0.95)
    assert 0.8 <= record["ci_low"] < 0.95 < record["ci_high"] <= 1.0
    assert record["confidence"] == 0.95
    assert record["threshold"] == {"min_acc": 0.8, "max_drop": None, "required": 0.8}
    assert record["float_accuracy"] == 0.95 and record["quantized_accuracy"] == 0.92
    assert record["critical_rate"] == pytest.approx(0.05)
    assert record["nonfinite"] == 2 and isinstance(record["nonfinite"], int)  # trials 0 and 3 of the first 4
    assert record["faults_per_trial"] == pytest.approx(3.5)
    layers = {layer["name"]: layer for layer in record["layers"]}
    assert [layer["name"] for layer in record["layers"]] == [layer["name"] for layer in LAYERS]
    assert layers["fc"]["vulnerability"] == 1.0 and layers["fc"]["faults"] == 2
    assert layers["layer1.0.conv1"]["vulnerability"] == 0.5 and layers["conv1"]["vulnerability"] == 0.0
    assert layers["layer2.0.conv2"]["faults"] == 0
    assert layers["fc"]["act_scale"] == 0.3 and layers["fc"]["weight_scale_max"] == 0.0031
    assert record["result"] == result.to_dict()
    assert CampaignResult.from_dict(record["result"]).outcome() == result.outcome()


def test_record_of_empty_result_is_json_safe_and_incomplete() -> None:
    record = rp.campaign_record(_result(PASS_SPEC, [95] * 16, indices=[1, 2]), NODE)
    json.dumps(record, allow_nan=False)
    assert record["verdict"] == "incomplete" and record["complete"] is False
    assert record["trials"] == 0 and record["accuracy"] is None and record["critical_rate"] is None
    assert record["contiguous"] == 0 and record["next_checkpoint"] == 4 and record["missing_trials"] == [0, 3]
    rp.validate_report(rp.build_report([record], ENV))


def test_max_drop_threshold_record() -> None:
    record = rp.campaign_record(_result(WEIGHT_SPEC, [100, 99] * 32, quantized=0.9), "t.py::w")
    assert record["threshold"] == {"min_acc": None, "max_drop": 0.1, "required": pytest.approx(0.8)}
    assert record["verdict"] == "pass" and record["site"] == "weight"


def test_environment_and_build_report() -> None:
    env = rp.environment()
    assert {"machine", "python", "torch", "plugin", "created"} <= set(env)
    assert {"node", "machine", "processor", "cpu_count"} <= set(env["machine"])
    assert env["torch"] == torch.__version__ and env["plugin"] == "0.1.0"
    assert env["created"].endswith("+00:00")
    records = list(reversed(_report()["campaigns"]))
    report = rp.build_report(records)
    assert report["schema"] == rp.REPORT_SCHEMA and report["version"] == rp.REPORT_VERSION == 1
    keys = [(r["nodeid"], r["campaign_id"]) for r in report["campaigns"]]
    assert keys == sorted(keys) and len(keys) == 4
    json.dumps(report, allow_nan=False)


# ----------------------------------------------------------------------------------------------------------------
# files and validation


def test_write_load_round_trip(tmp_path: Path) -> None:
    report = _report()
    path = rp.write_report(tmp_path / "sub" / "report.json", report)
    assert path == tmp_path / "sub" / "report.json"
    assert rp.load_report(path) == report
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary left behind


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["campaigns"][1].pop("verdict"), "$.campaigns[1].verdict: missing required key"),
        (lambda r: r["campaigns"][0].update(verdict="maybe"), "$.campaigns[0].verdict: 'maybe' is not one of"),
        (lambda r: r["campaigns"][2].update(accuracy="high"), "$.campaigns[2].accuracy: expected number or null"),
        (lambda r: r["campaigns"][0].update(accuracy=math.nan), "$.campaigns[0].accuracy"),
        (lambda r: r["campaigns"][0].update(ci_high=1.5), "$.campaigns[0].ci_high: 1.5 is above the maximum"),
        (lambda r: r["campaigns"][0]["threshold"].pop("required"), "$.campaigns[0].threshold.required: missing"),
        (lambda r: r["campaigns"][3]["layers"][1].update(faults=-1), "$.campaigns[3].layers[1].faults"),
        (lambda r: r["campaigns"][0]["result"].pop("trials"), "$.campaigns[0].result.trials: missing"),
        (lambda r: r["campaigns"][0]["result"].update(campaign_id="x"), "$.campaigns[0].result.campaign_id"),
        (lambda r: r["campaigns"][0].update(ci_low=0.99, ci_high=0.98), "$.campaigns[0].ci_low"),
        (lambda r: r.pop("campaigns"), "$.campaigns: missing required key"),
        (lambda r: r.update(campaigns={}), "$.campaigns: expected array, got object"),
        (lambda r: r.update(schema="other"), "$.schema: 'other' is not 'pytest-hwfault/report'"),
        (lambda r: r.update(version=2), "newer than this pytest-hwfault understands"),
        (lambda r: r.update(version="1"), "$.version: '1' is not 1"),
    ],
)
def test_validate_report_names_the_problem(mutate: Any, expected: str) -> None:
    report = _report()
    rp.validate_report(report)
    mutate(report)
    with pytest.raises(rp.ReportError) as info:
        rp.validate_report(report)
    assert expected in str(info.value)


def test_validate_rejects_non_object() -> None:
    with pytest.raises(rp.ReportError, match=r"\$: expected a report object, got array"):
        rp.validate_report([])


def test_write_refuses_invalid_report(tmp_path: Path) -> None:
    report = _report()
    del report["campaigns"][0]["seed"]
    with pytest.raises(rp.ReportError, match=r"bad\.json: refusing .*\$\.campaigns\[0\]\.seed"):
        rp.write_report(tmp_path / "bad.json", report)
    assert not (tmp_path / "bad.json").exists()


def test_load_report_errors_name_file_and_problem(tmp_path: Path) -> None:
    assert issubclass(rp.ReportError, ValueError)
    with pytest.raises(rp.ReportError, match=r"nope\.json: no such report file"):
        rp.load_report(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(rp.ReportError, match=r"broken\.json: not valid JSON"):
        rp.load_report(tmp_path / "broken.json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "pytest-benchmark", "version": 1}))
    with pytest.raises(rp.ReportError, match=r"other\.json: \$\.schema: .*not a pytest-hwfault report"):
        rp.load_report(tmp_path / "other.json")
    report = _report()
    report["campaigns"][0]["trials"] = -3
    (tmp_path / "neg.json").write_text(json.dumps(report))
    with pytest.raises(rp.ReportError, match=r"neg\.json: \$\.campaigns\[0\]\.trials: -3 is below the minimum 0"):
        rp.load_report(tmp_path / "neg.json")


def test_json_schema_describes_the_records() -> None:
    """The schema (which validate_report interprets) requires what campaign_record writes, and names every key."""
    campaign = rp.REPORT_JSON_SCHEMA["$defs"]["campaign"]
    record = _report()["campaigns"][0]
    assert set(campaign["required"]) <= set(record)
    assert set(campaign["properties"]) - set(record) == {"shard", "shards_run", "lost_shards"}  # a session's shards
    assert set(rp.REPORT_JSON_SCHEMA["$defs"]["layer"]["required"]) <= set(record["layers"][0])
    assert set(rp.REPORT_JSON_SCHEMA["$defs"]["result"]["required"]) <= set(record["result"])
    assert rp.REPORT_JSON_SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_json_schema_accepts_a_real_report_and_rejects_a_broken_one() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(rp.REPORT_JSON_SCHEMA)
    validator = jsonschema.Draft202012Validator(rp.REPORT_JSON_SCHEMA)
    report = json.loads(json.dumps(_report()))
    validator.validate(report)
    del report["campaigns"][0]["verdict"]
    assert not validator.is_valid(report)


# ----------------------------------------------------------------------------------------------------------------
# merging shards


def _split(predicate: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two shard reports: trial i of every campaign goes to the first iff predicate(i)."""
    first, second = {}, {}
    for nodeid, _, corrects in _campaigns():
        first[nodeid] = [i for i in range(len(corrects)) if predicate(i)]
        second[nodeid] = [i for i in range(len(corrects)) if not predicate(i)]
    return _report(first), _report(second)


@pytest.mark.parametrize("predicate", [lambda i: i % 2 == 0, lambda i: i < 5], ids=["odd-even", "prefix"])
def test_merge_of_shards_equals_full_run_in_any_order(tmp_path: Path, predicate: Any) -> None:
    full = _report()
    a, b = _split(predicate)
    assert {r["verdict"] for r in b["campaigns"]} == {"incomplete"}  # lacks trial 0: decides nothing alone
    rp.write_report(tmp_path / "a.json", a)
    rp.write_report(tmp_path / "b.json", b)
    a, b = rp.load_report(tmp_path / "a.json"), rp.load_report(tmp_path / "b.json")
    merged = rp.merge_reports([a, b])
    assert merged["campaigns"] == full["campaigns"]
    assert rp.merge_reports([b, a])["campaigns"] == full["campaigns"]
    assert rp.merge_reports([b, a, b])["campaigns"] == full["campaigns"]  # a shard given twice changes nothing
    assert [r["verdict"] for r in merged["campaigns"]] == ["pass", "fail", "inconclusive", "pass"]
    assert merged["environment"]["merged_from"] == [ENV, ENV]
    rp.validate_report(merged)
    assert rp.merge_reports([merged, merged])["environment"]["merged_from"] == [ENV] * 4  # flattened


@settings(max_examples=20, deadline=None)
@given(shards=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_merge_of_random_shards_equals_full_run(shards: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    owner = {(nodeid, i): rng.randrange(shards) for nodeid, _, corrects in _campaigns() for i in range(len(corrects))}
    parts = [_report({nodeid: [i for i in range(len(c)) if owner[nodeid, i] == s] for nodeid, _, c in _campaigns()})
             for s in range(shards)]
    rng.shuffle(parts)
    assert rp.merge_reports(parts)["campaigns"] == _report()["campaigns"]


def test_merge_with_a_missing_shard_is_incomplete() -> None:
    a, _ = _split(lambda i: i % 2 == 0)
    _, b = _split(lambda i: i % 2 == 0)
    pass_node = f"{NODE}[act-ber0.0001]"
    b["campaigns"] = [r for r in b["campaigns"] if r["nodeid"] != pass_node]  # its shard of this campaign was lost
    merged = {r["nodeid"]: r for r in rp.merge_reports([a, b])["campaigns"]}
    lost = merged[pass_node]
    assert lost["verdict"] == "incomplete" and lost["complete"] is False
    assert lost["contiguous"] == 1 and lost["next_checkpoint"] == 4 and lost["missing_trials"] == [1, 3]
    assert merged[f"{NODE}[act-ber0.001]"]["verdict"] == "fail"
    assert len(merged) == 4


def test_merge_keeps_campaigns_present_in_one_report_only() -> None:
    only_pass = _report(skip=tuple(n for n, _, _ in _campaigns()[1:]))
    rest = _report(skip=(_campaigns()[0][0],))
    assert rp.merge_reports([only_pass, rest])["campaigns"] == _report()["campaigns"]


def test_merge_past_the_deciding_checkpoint_does_not_change_numbers() -> None:
    nodeid, spec, corrects = _campaigns()[0]
    decided = rp.campaign_record(_result(spec, corrects, nodeid=nodeid, indices=[0, 1, 2, 3]), nodeid)
    merged = rp.merge_reports(list(_split(lambda i: i % 2 == 0)))["campaigns"][0]
    for key in ("verdict", "trials", "accuracy", "ci_low", "ci_high", "layers", "critical_rate"):
        assert merged[key] == decided[key], key


def test_merge_rejects_conflicting_shards() -> None:
    a, b = _split(lambda i: i % 2 == 0)
    c = copy.deepcopy(a)
    c["campaigns"][0]["result"]["trials"][0]["correct"] = 1
    with pytest.raises(rp.ReportError, match=r"cannot merge campaign .*\[act-ber0.0001\].*trial 0 .* differs"):
        rp.merge_reports([a, c])
    d = copy.deepcopy(b)
    d["campaigns"][0]["nodeid"] = "elsewhere.py::test"
    with pytest.raises(rp.ReportError, match="reported under different tests"):
        rp.merge_reports([a, d])
    e = copy.deepcopy(b)
    del e["campaigns"][2]["threshold"]
    with pytest.raises(rp.ReportError, match=r"report 2 of 2: \$\.campaigns\[2\]\.threshold"):
        rp.merge_reports([a, e])
    with pytest.raises(rp.ReportError, match="nothing to merge"):
        rp.merge_reports([])


# ----------------------------------------------------------------------------------------------------------------
# baselines


def _shifted_report(delta: int) -> dict[str, Any]:
    """The suite with every correct count of the passing campaign lowered by `delta` images."""
    records = []
    for nodeid, spec, corrects in _campaigns():
        if spec is PASS_SPEC:
            corrects = [c - delta for c in corrects]
        records.append(rp.campaign_record(_result(spec, corrects, nodeid=nodeid), nodeid))
    return rp.build_report(records, ENV)


def test_compare_flags_regressions_beyond_tolerance_only() -> None:
    baseline, current = _report(), _shifted_report(2)  # 0.95 -> 0.93
    regressions = rp.compare_to_baseline(current, baseline, tolerance=0.01)
    assert len(regressions) == 1
    reg = regressions[0]
    assert (reg.nodeid, reg.campaign_id, reg.label, reg.tolerance) == (
        f"{NODE}[act-ber0.0001]", PASS_SPEC.campaign_id(f"{NODE}[act-ber0.0001]"), "act-ber0.0001", 0.01)
    assert reg.baseline_accuracy == pytest.approx(0.95) and reg.accuracy == pytest.approx(0.93)
    assert reg.drop == pytest.approx(0.02)
    assert "0.9300 < baseline 0.9500" in str(reg)
    with pytest.raises(AttributeError):
        reg.accuracy = 1.0  # type: ignore[misc]
    assert rp.compare_to_baseline(current, baseline, tolerance=0.03) == []
    assert rp.compare_to_baseline(current, baseline, tolerance=0.02 + 1e-9) == []
    assert rp.compare_to_baseline(baseline, current, tolerance=0.0) == []  # improvements never regress
    assert rp.compare_to_baseline(baseline, baseline, tolerance=0.0) == []
    with pytest.raises(ValueError, match="tolerance"):
        rp.compare_to_baseline(current, baseline, tolerance=-0.1)


def test_compare_matches_by_nodeid_and_label_when_the_spec_changed() -> None:
    baseline = _report()
    nodeid = f"{NODE}[act-ber0.0001]"
    bigger = PASS_SPEC.with_overrides(budget=32)  # new campaign_id, same test and label
    current = rp.build_report([rp.campaign_record(_result(bigger, [90] * 32, nodeid=nodeid), nodeid)], ENV)
    assert current["campaigns"][0]["campaign_id"] != baseline["campaigns"][0]["campaign_id"]
    [reg] = rp.compare_to_baseline(current, baseline, tolerance=0.01)
    assert reg.campaign_id == current["campaigns"][0]["campaign_id"] and reg.baseline_accuracy == pytest.approx(0.95)
    new, gone = rp.unmatched(current, baseline)
    assert new == [] and [r["nodeid"] for r in gone] == [r["nodeid"] for r in baseline["campaigns"][1:]]


def test_unmatched_lists_both_sides() -> None:
    names = [n for n, _, _ in _campaigns()]
    report, baseline = _report(skip=(names[0],)), _report(skip=(names[3],))
    new, gone = rp.unmatched(report, baseline)
    assert [r["nodeid"] for r in new] == [names[3]]
    assert [r["nodeid"] for r in gone] == [names[0]]
    assert rp.compare_to_baseline(report, baseline, 0.0) == []


def test_save_and_load_baseline(tmp_path: Path) -> None:
    report = _report()
    path = rp.save_baseline(tmp_path / "baselines", "main", report)
    assert path == tmp_path / "baselines" / "main.json"
    rp.save_baseline(tmp_path / "baselines", "v0.1", report)
    assert rp.load_baseline(tmp_path / "baselines", "main") == report
    with pytest.raises(rp.ReportError, match="no baseline named 'mian'.*available: main, v0.1"):
        rp.load_baseline(tmp_path / "baselines", "mian")
    with pytest.raises(rp.ReportError, match="available: none"):
        rp.load_baseline(tmp_path / "empty", "main")
    with pytest.raises(rp.ReportError, match="no spaces or path separators"):
        rp.save_baseline(tmp_path, "../escape", report)


# ----------------------------------------------------------------------------------------------------------------
# text


def test_failure_message_for_a_fail() -> None:
    record = _record("fail")
    text = rp.failure_message(record, "pytest 'tests/models/test_resnet.py::test_resilience[act-ber0.001]'")
    assert text.startswith(f"hwfault FAIL: {record['nodeid']}: ")  # the label is in the id already: not repeated
    assert re.search(r"\n  trials +4 of budget 16, 100 images each\n", text)
    assert re.search(r"\n  seed +7\n", text)
    assert re.search(r"\n  reproduce +pytest 'tests/models/test_resnet.py::test_resilience\[act-ber0.001\]'$", text)
    for piece in ("site=act", "BER=0.001", "8-bit", "kind=flip",
                  f"{record['accuracy']:.4f} [{record['ci_low']:.4f}, {record['ci_high']:.4f}] at 95% confidence",
                  "min_acc=0.8", ">= 0.8000", "float 0.9500, quantized 0.9200"):
        assert piece in text, piece
    layers = text[text.index("most vulnerable"):]
    assert layers.index("1. fc (Linear)") < layers.index("2. layer1.0.conv1") < layers.index("3. conv1 (Conv2d)")
    # fc was hit on 2 images, both critical: Clopper-Pearson [0.025 ** (1/2), 1] at 95%
    assert "vulnerability 1.000 [0.158, 1.000], act scale 0.3, max weight scale 0.0031, 2 faults" in layers
    assert "act scale 0.125, max weight scale 0.0042" in layers
    assert "layer2.0.conv2" not in text  # never hit
    assert text.rstrip().endswith("test_resilience[act-ber0.001]'")


def test_a_calibrated_models_notes_are_printed_under_a_failing_gate() -> None:
    """The model notes were printed for deployed models only: a calibrated model's (given in training mode, a
    recurrent module's packed padding steps) were in the JSON record but not under the failing gate."""
    record = {**_record("fail"), "model_notes": ["the model was given in training mode", "rnn runs packed batches"]}
    assert record.get("model_format", "calibrated") == "calibrated"
    text = rp.failure_message(record, "pytest x")
    assert re.search(r"\n  model note +the model was given in training mode\n  model note +rnn runs packed batches\n",
                     text)
    assert "deployed" not in text


def test_failure_message_for_max_drop_and_weight_site() -> None:
    record = rp.campaign_record(_result(WEIGHT_SPEC, [20, 30] * 32, quantized=0.9), "t.py::w")
    assert record["verdict"] == "fail"
    text = rp.failure_message(record, "pytest t.py::w")
    assert "max_drop=0.1 from the quantized accuracy: required accuracy >= 0.8000" in text
    assert "site=weight, BER=1e-05" in text and "float 0.9500, quantized 0.9000" in text
    assert "[weight-ber1e-05]" in text
    # 64 per-trial accuracies around 0.65 cannot exclude 0.8: the trial, not the image, is the unit here
    record = rp.campaign_record(_result(WEIGHT_SPEC, [79, 81] * 32, quantized=0.9), "t.py::w")
    assert record["verdict"] == "inconclusive"
    text = rp.failure_message(record, "pytest t.py::w")
    assert "for site='weight' each trial is one observation, so raise budget=" in text and "samples=" not in text


def test_failure_message_for_inconclusive_suggests_more_budget() -> None:
    text = rp.failure_message(_record("inconclusive"), "pytest x")
    assert "INCONCLUSIVE" in text and "budget was spent without a decision" in text
    assert "raise budget=" in text and "samples=" in text
    assert re.search(r"trials +16 of budget 16", text)


def test_failure_message_for_incomplete_names_missing_trials() -> None:
    spec = FAIL_SPEC
    record = rp.campaign_record(_result(spec, [50] * 16, indices=[0, 1, 2, 3, 4, 6, 9]), NODE)
    assert record["verdict"] == "fail"  # decided at 4: the gaps after it do not matter
    record = rp.campaign_record(_result(INCONCLUSIVE_SPEC, [80] * 16, indices=[0, 1, 2, 3, 4, 6, 9]), NODE)
    assert record["verdict"] == "incomplete"
    text = rp.failure_message(record, "pytest x")
    assert "INCOMPLETE" in text
    assert "only the first 5 trials (0..4) are present, but the next checkpoint needs 8; missing: 5, 7." in text
    assert "never passed" in text
    assert re.search(r"trials +4 of budget 16", text)  # numbers are those of the last checkpoint reached
    empty = rp.campaign_record(_result(spec, [50] * 16, indices=[]), NODE)
    text = rp.failure_message(empty, "pytest x")
    assert "n/a (no checkpoint reached)" in text
    assert "trial 0 is missing, but the next checkpoint needs 4; missing: 0-3" in text
    assert "[act-ber0.001]: trials are missing" in text  # an unparametrized id gets the label


def test_format_table_is_aligned() -> None:
    long_node = "tests/deep/dir/test_a_very_long_module_name.py::test_with_a_long_name[resnet20-act-ber1e-05-x]"
    records = _report()["campaigns"] + [
        rp.campaign_record(_result(PASS_SPEC, [95] * 16, nodeid=long_node, indices=[]), long_node)]
    lines = rp.format_table(records)
    assert len(lines) == 2 + len(records)
    header = lines[0]
    assert header.split() == ["test", "site", "BER", "trials", "accuracy", "[lo,", "hi]", "threshold", "reach",
                              "verdict", "time"]
    assert set(lines[1]) <= {"-", " "}
    assert len({len(line) for line in lines}) == 1  # the last column is right-aligned
    starts = [header.index(name) for name in ("site", "accuracy", "threshold", "verdict")]
    for line, record in zip(lines[2:], records):
        assert line[starts[0]:].startswith(record["site"])
        assert line[starts[1]:].startswith(rp.text._accuracy_text(record))
        assert line[starts[3]:].startswith(record["verdict"].upper())
        assert line.endswith(f"{record['seconds']:.1f}s")
        for column, value in (("BER", f"{record['ber']:g}"), ("trials", str(record["trials"]))):  # right-aligned
            end = header.index(column) + len(column)
            assert line[:end].endswith(" " + value), (column, line)
    assert "0.9500 [" in lines[2] and lines[2].split()[-2] == "PASS"
    assert "test_resnet.py::test_resilience[act-ber0.0001]" in lines[2]  # directories dropped
    assert "tests/models" not in "\n".join(lines)
    long_row = lines[-1]
    assert "..." in long_row and long_row.startswith("test_a_very_long") and "n/a" in long_row
    assert "-x]" in long_row.split()[0] and len(long_row.split()[0]) <= 56
    assert any("max_drop=0.1 (>=0.8200)" in line for line in lines)


# ----------------------------------------------------------------------------------------------------------------
# plots


def test_plot_report_writes_png(tmp_path: Path) -> None:
    report = _report()
    report["campaigns"].append(rp.campaign_record(_result(PASS_SPEC, [95] * 16, indices=[]), NODE + "[empty]"))
    out = rp.plot_report(report, tmp_path / "plots" / "report.png")
    assert out == tmp_path / "plots" / "report.png"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    empty = rp.plot_report(rp.build_report([], ENV), tmp_path / "empty.png")
    assert empty.read_bytes().startswith(b"\x89PNG")


def test_layer_panels_one_per_model() -> None:
    report = _report()
    tables = rp.plot._layer_tables(report["campaigns"])
    assert len(tables) == 1  # both test functions show the same quantized model
    assert tables[0][0] == "test_resnet.py::test_resilience, test_weights.py::test_weight_faults"
    report["campaigns"][3]["layers"][0]["act_scale"] = 0.5
    assert [title for title, _ in rp.plot._layer_tables(report["campaigns"])] == [
        "test_resnet.py::test_resilience", "test_weights.py::test_weight_faults"]


# ----------------------------------------------------------------------------------------------------------------
# command line


def _write(tmp_path: Path, name: str, report: dict[str, Any]) -> str:
    return str(rp.write_report(tmp_path / name, report))


def test_cli_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "r.json", _report())
    assert rp.main(["show", path]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:-1] == rp.format_table(_report()["campaigns"])
    assert "4 campaigns: 2 pass, 1 fail, 1 inconclusive" in out
    assert rp.main(["show", "-v", path]) == 0
    out = capsys.readouterr().out
    assert "hwfault FAIL" in out and "hwfault INCONCLUSIVE" in out and "hwfault PASS" not in out
    assert re.search(r"reproduce +pytest 'tests/models/test_resnet.py::test_resilience\[act-ber0.001\]'", out)


def test_cli_merge_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _split(lambda i: i % 2 == 0)
    pa, pb = _write(tmp_path, "a.json", a), _write(tmp_path, "b.json", b)
    out = tmp_path / "all.json"
    assert rp.main(["merge", pa, pb, "-o", str(out)]) == 1  # one fail, one inconclusive
    assert rp.load_report(out)["campaigns"] == _report()["campaigns"]
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "INCONCLUSIVE" in printed and "merged 2 reports" in printed

    names = [n for n, _, _ in _campaigns()]
    passing = [_write(tmp_path, f"p{i}.json", _split(lambda i: i % 2 == 0)[i]) for i in range(2)]
    only_pass = [_write(tmp_path, f"only{i}.json", {**rp.load_report(p), "campaigns": [
        r for r in rp.load_report(p)["campaigns"] if r["verdict"] != "fail" and r["nodeid"] != names[1]]})
        for i, p in enumerate(passing)]
    assert rp.main(["merge", *only_pass]) == 1  # inconclusive counts as not passing ...
    assert rp.main(["merge", "--allow-inconclusive", *only_pass]) == 0  # ... unless allowed
    assert rp.main(["merge", "--allow-inconclusive", only_pass[0]]) == 1  # the other shard is missing: incomplete
    assert "INCOMPLETE" in capsys.readouterr().out
    assert rp.main(["merge", "--allow-inconclusive", pa, pb]) == 1  # a fail is never allowed


def test_cli_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _write(tmp_path, "base.json", _report())
    current = _write(tmp_path, "cur.json", _shifted_report(2))
    assert rp.main(["compare", current, base, "--tolerance", "0.01"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "act-ber0.0001" in out and "1 regressions" in out
    assert rp.main(["compare", current, base, "--tolerance", "0.05"]) == 0
    assert "0 regressions" in capsys.readouterr().out


def test_cli_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "r.json", _report())
    assert rp.main(["plot", path, "-o", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("command", ["show", "merge", "compare", "plot"])
def test_cli_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    good = _write(tmp_path, "good.json", _report())
    argv = {"show": ["show", str(bad)], "merge": ["merge", good, str(bad)], "compare": ["compare", good, str(bad)],
            "plot": ["plot", str(bad), "-o", str(tmp_path / "x.png")]}[command]
    assert rp.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.json: not valid JSON" in err and "Traceback" not in err
    assert rp.main([command, str(tmp_path / "missing.json")] + (["-o", "x.png"] if command == "plot" else [])
                   + ([good] if command == "compare" else [])) == 2
    assert "missing.json: no such report file" in capsys.readouterr().err


def test_cli_usage_error_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert rp.main([]) == 2
    assert rp.main(["frobnicate"]) == 2
    assert rp.main(["--help"]) == 0
    assert "merge" in capsys.readouterr().out


ROOT = Path(__file__).resolve().parents[1]


def test_cli_as_module(tmp_path: Path) -> None:
    good = _write(tmp_path, "good.json", _report())
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"schema": "something-else"}))
    shown = subprocess.run([sys.executable, "-m", "pytest_hwfault.report", "show", good], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
    assert shown.returncode == 0 and "test_resilience[act-ber0.01]" in shown.stdout
    failed = subprocess.run([sys.executable, "-m", "pytest_hwfault.report", "show", str(wrong)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.strip().count("\n") == 0 and "not a pytest-hwfault report" in failed.stderr


def test_report_module_imports_no_heavy_dependencies() -> None:
    code = ("import sys, pytest_hwfault.report as r; r.load_report; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'pytest') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


# ----------------------------------------------------------------------------------------------------------------
# parts that cannot be of one run, hostile files and paths (issue 12: items 5, 6, 9, 10)


def _with_spec_change(report: dict[str, Any], index: int, **changes: Any) -> dict[str, Any]:
    """`report` with campaign `index` run under other settings, record and raw result alike (ids kept)."""
    changed = copy.deepcopy(report)
    record = changed["campaigns"][index]
    record["result"]["spec"].update(changes)
    for key in ("min_acc", "max_drop"):
        if key in changes:
            record["threshold"][key] = changes[key]
    return changed


def test_merge_refuses_parts_with_other_settings_in_either_order() -> None:
    a, b = _split(lambda i: i % 2 == 0)
    stricter = _with_spec_change(b, 0, min_acc=0.9)
    for parts in ([a, stricter], [stricter, a]):
        with pytest.raises(rp.ReportError, match=r"disagree on the campaign's settings min_acc: 0\.(8|9) vs"):
            rp.merge_reports(parts)


def test_a_record_that_contradicts_its_own_result_is_refused() -> None:
    report = _report()
    report["campaigns"][0]["threshold"]["min_acc"] = 0.5  # the record says one threshold, its trials another
    with pytest.raises(rp.ReportError, match=r"min_acc 0.5 does not match the campaign's own setting 0.8"):
        rp.validate_report(report)


def test_merge_refuses_two_runs_of_one_test_with_different_seeds(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    seed7 = _report()
    spec = CampaignSpec(**{**PASS_SPEC.to_dict(), "seed": 8})
    nodeid = f"{NODE}[act-ber0.0001]"
    seed8 = rp.build_report([rp.campaign_record(_result(spec, [95] * 16, nodeid=nodeid).trimmed(), nodeid)], ENV)
    with pytest.raises(rp.ReportError, match=r"appears as 2 different campaigns \(seed: 7, 8\)"):
        rp.merge_reports([seed7, seed8])
    assert rp.main(["merge", _write(tmp_path, "a.json", seed7), _write(tmp_path, "b.json", seed8)]) == 2
    assert "not parts of one run" in capsys.readouterr().err


def test_merge_refuses_parts_of_other_versions_unless_allowed(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _split(lambda i: i % 2 == 0)
    b["environment"] = {**b["environment"], "torch": "2.13.0"}
    with pytest.raises(rp.ReportError, match=r"different torch versions \(2.13.0, x\)"):
        rp.merge_reports([a, b])
    assert rp.merge_reports([a, b], allow_mixed_versions=True)["campaigns"] == _report()["campaigns"]
    pa, pb = _write(tmp_path, "a.json", a), _write(tmp_path, "b.json", b)
    assert rp.main(["merge", pa, pb]) == 2
    assert "--allow-mixed-versions" in capsys.readouterr().err
    assert rp.main(["merge", "--allow-mixed-versions", pa, pb]) == 1  # merged: one fail, one inconclusive


def test_an_invalid_campaign_stays_invalid_and_fails_the_merge(tmp_path: Path) -> None:
    a, b = _split(lambda i: i % 2 == 0)
    a["campaigns"][0].update(verdict="invalid", problem="the shards of this campaign saw different models")
    merged = rp.merge_reports([a, b])["campaigns"][0]
    assert merged["verdict"] == "invalid" and "different models" in merged["problem"]
    passing = {**a, "campaigns": [a["campaigns"][0]]}
    assert rp.main(["merge", _write(tmp_path, "a.json", passing)]) == 1


def test_the_cli_and_the_plugin_share_one_default_tolerance() -> None:
    from pytest_hwfault import plugin
    from pytest_hwfault.report import baseline, cli

    args = cli._parser().parse_args(["compare", "r.json", "b.json"])
    assert args.tolerance == baseline.DEFAULT_TOLERANCE == plugin.DEFAULT_TOLERANCE == 0.01
    defaults = {option: default for option, _, _, default, _ in plugin._VALUED_OPTIONS}
    assert defaults[plugin.OPT_TOLERANCE] == baseline.DEFAULT_TOLERANCE


def test_cli_compare_fails_for_campaigns_it_could_not_compare(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    full = _report()
    base = _write(tmp_path, "base.json", {**full, "campaigns": full["campaigns"][1:]})
    current = _write(tmp_path, "cur.json", full)
    assert rp.main(["compare", current, base]) == 1
    assert "NOT IN BASELINE" in capsys.readouterr().out
    assert rp.main(["compare", current, base, "--allow-new"]) == 0
    blank = copy.deepcopy(full)
    blank["campaigns"][0]["accuracy"] = None  # a baseline campaign with no accuracy compares nothing
    assert rp.main(["compare", current, _write(tmp_path, "blank.json", blank)]) == 1
    assert "NO BASELINE ACCURACY" in capsys.readouterr().out


def test_control_characters_in_a_received_report_are_escaped(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    report = _report()
    report["campaigns"][0]["nodeid"] = "t.py::test_x\x1b[2K\r\x1b[32mALL PASS\x1b[0m\u202e"
    path = _write(tmp_path, "evil.json", report)
    others = _write(tmp_path, "others.json", {**report, "campaigns": report["campaigns"][1:]})
    for argv in (["show", "-v", path], ["merge", path], ["compare", path, others]):
        rp.main(argv)
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\r" not in out and "\u202e" not in out, argv
        assert "\\x1b[2K\\r" in out, argv


def test_hostile_json_is_an_error_of_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps(_report()).replace('"images": 100', '"images": 1' + "0" * 400, 1))
    for path in (deep, huge):
        assert rp.main(["show", str(path)]) == 2, path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and path.name in err, err


def test_writing_to_a_device_or_fifo_writes_in_place(tmp_path: Path) -> None:
    import stat
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    rp.write_report(fifo, _report())
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # not replaced by a regular file
    assert json.loads(received[0])["campaigns"] == _report()["campaigns"]
    rp.write_report("/dev/null", _report())
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_unwritable_report_paths_are_found_before_the_run(tmp_path: Path) -> None:
    from pytest_hwfault.report.document import check_writable

    (tmp_path / "plain").write_text("x")
    for path, message in ((tmp_path / "plain" / "r.json", "is not a directory"), ("/proc/x.json", "cannot write in"),
                          (tmp_path, "is a directory")):
        with pytest.raises(rp.ReportError, match=message):
            check_writable(path)
    check_writable(tmp_path / "new" / "deeper" / "r.json")  # directories are made when written
    check_writable("/dev/null")
    assert not list(tmp_path.glob(".hwfault-probe*"))


def test_shard_records_of_one_session_merge_with_lost_and_invalid_campaigns() -> None:
    from pytest_hwfault.report.merge import merge_shard_records

    a, b = _split(lambda i: i % 2 == 0)
    first, second = copy.deepcopy(a["campaigns"][0]), copy.deepcopy(b["campaigns"][0])
    first["shard"], second["shard"] = [1, 2], [2, 2]
    whole = _report()["campaigns"][0]
    assert merge_shard_records([first, second]) == [whole]
    lost = merge_shard_records([first])[0]
    assert lost["verdict"] == "incomplete" and lost["lost_shards"] == [2]
    # a shard the session did not select (-k, --lf) is not lost; one it selected is
    assert "lost_shards" not in merge_shard_records([{**second, "shards_run": [2]}])[0]
    assert merge_shard_records([{**first, "shards_run": [1, 2]}])[0]["lost_shards"] == [2]
    other = copy.deepcopy(second)
    other["result"]["float_accuracy"] = other["float_accuracy"] = 0.5  # shard 2 ran another model
    invalid = merge_shard_records([first, other])[0]
    assert invalid["verdict"] == "invalid" and "disagree on float_accuracy" in invalid["problem"]
    rp.validate_report(rp.build_report([invalid, lost], ENV))  # both are valid report records


def test_layer_vulnerability_intervals_and_fault_shares() -> None:
    transient = {row["name"]: row for row in _result(FAIL_SPEC, [50] * 16).trimmed().layer_vulnerability()}
    # 4 trials: conv1 hit on 4 images (never critical), layer1.0.conv1 on 8 (4 critical), fc on 2 (both)
    assert transient["conv1"]["vulnerability_high"] == pytest.approx(1 - 0.025 ** (1 / 4))
    assert transient["conv1"]["vulnerability_low"] == 0.0
    low, high = transient["layer1.0.conv1"]["vulnerability_low"], transient["layer1.0.conv1"]["vulnerability_high"]
    assert low < 0.5 < high and transient["layer1.0.conv1"]["vulnerability"] == 0.5
    assert (transient["layer2.0.conv2"]["vulnerability_low"], transient["layer2.0.conv2"]["vulnerability_high"]) \
        == (0.0, 1.0)  # never hit: nothing is known
    assert sum(row["fault_share"] for row in transient.values()) == pytest.approx(1.0)
    assert transient["layer1.0.conv1"]["fault_share"] == pytest.approx(8 / 14)
    weight = {row["name"]: row for row in _result(WEIGHT_SPEC, [20, 30] * 32).layer_vulnerability(trials=64)}
    half = math.sqrt(math.log(2 / 0.05) / (2 * 64))  # Hoeffding over the 64 trials that hit layer1.0.conv1
    assert weight["layer1.0.conv1"]["vulnerability_low"] == pytest.approx(0.5 - half)
    assert weight["layer1.0.conv1"]["vulnerability_high"] == pytest.approx(0.5 + half)
