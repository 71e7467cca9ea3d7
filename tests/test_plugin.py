"""End-to-end tests of the pytest plugin, each in a fresh pytest subprocess (pytester)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from suites import DIGITS_CONFTEST


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(DIGITS_CONFTEST)
    return pytester


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


GATES = '''
from pytest_hwfault import resilience

@resilience(ber=1e-4, site="act", min_acc=0.5, budget=16)
def test_passes(hwfault, model, val_data):
    result = hwfault.assess(model, val_data)
    assert result.outcome().verdict == "pass"

@resilience(ber=1e-4, site="act", min_acc=0.995, budget=16)
def test_fails(hwfault, model, val_data):
    hwfault.assess(model, val_data)
'''


def test_loading_the_plugin_imports_no_torch() -> None:
    code = "import sys, pytest_hwfault.plugin, pytest_hwfault; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_skipped_without_option(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_gates=GATES)
    result = _run(suite, "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*pass --hwfault to run hardware-fault campaigns*"])


def test_passing_and_failing_gates(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_gates=GATES)
    report = suite.path / "report.json"
    junit = suite.path / "junit.xml"
    result = _run(suite, "--hwfault", "-rA", f"--hwfault-report={report}", f"--junitxml={junit}")
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == 1
    out = result.stdout.str()
    # the failure message a person can act on
    failed_block = out[out.index("test_fails"):]
    for piece in ("site=act", "BER=0.0001", "8-bit", "kind=flip", "trials", "min_acc=0.995", "float",
                  "quantized", "most vulnerable layers", "act scale", "seed",
                  "pytest test_gates.py::test_fails --hwfault"):
        assert piece in failed_block, piece
    assert "Traceback" not in out
    assert re.search(r"FAILED test_gates.py::test_fails", out)
    # summary table
    result.stdout.fnmatch_lines(["*hwfault campaigns*", "*test_fails*act*FAIL*"])
    result.stdout.fnmatch_lines(["*hwfault campaigns*", "*test_passes*act*PASS*"])
    # junitxml: one failed testcase with the message
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert cases["test_fails"].find("failure") is not None
    assert cases["test_passes"].find("failure") is None
    # JSON report and its schema
    data = json.loads(report.read_text())
    assert data["schema"] == "pytest-hwfault/report" and data["version"] == 1
    assert {"torch", "plugin", "machine"} <= set(data["environment"])
    by_test = {c["nodeid"].split("::")[-1]: c for c in data["campaigns"]}
    assert by_test["test_passes"]["verdict"] == "pass" and by_test["test_fails"]["verdict"] == "fail"
    record = by_test["test_fails"]
    for key in ("nodeid", "site", "ber", "bits", "kind", "trials", "float_accuracy", "quantized_accuracy",
                "accuracy", "ci_low", "ci_high", "confidence", "threshold", "verdict", "seed", "layers"):
        assert key in record, key
    assert record["ci_high"] < 0.995 <= 1.0
    assert record["layers"] and {"name", "act_scale", "vulnerability"} <= set(record["layers"][0])


def test_late_start_cache_option_leaves_numbers_unchanged(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_gate='''
from pytest_hwfault import resilience

@resilience(ber=[3e-5, 1e-3], site="act", min_acc=0.5, budget=8, first=8)
def test_gate(hwfault, model, val_data):
    hwfault.assess(model, val_data)
''')
    records = []
    for option in ("--hwfault-cache-mb=0", "--hwfault-cache-mb=64"):
        report = suite.path / f"report{option[-2:]}.json"
        _run(suite, "--hwfault", option, f"--hwfault-report={report}").assert_outcomes(passed=2)
        campaigns = json.loads(report.read_text())["campaigns"]
        records.append([{k: c[k] for k in ("nodeid", "trials", "accuracy", "ci_low", "ci_high", "verdict")}
                        for c in campaigns])
    assert records[0] == records[1]


def test_native_option_switches_the_fused_passes_off_with_the_same_numbers(suite: pytest.Pytester) -> None:
    """--hwfault-native=off (and its ini twin) runs torch's eager chains in every process, xdist workers included,
    and the campaign's numbers do not move."""
    suite.makepyfile(test_gate='''
from pytest_hwfault import resilience

@resilience(ber=1e-3, site="act", min_acc=0.5, budget=8, first=8)
def test_gate(hwfault, model, val_data, record_property):
    hwfault.assess(model, val_data)
    from pytest_hwfault import native
    record_property("native", native.status())
''')
    runs = {}
    for label, args in (("default", ()), ("off", ("--hwfault-native=off",)), ("off_n2", ("--hwfault-native=off",
                                                                                          "-n", "2")),
                        ("ini", ("-o", "hwfault_native=off"))):
        report, junit = suite.path / f"{label}.json", suite.path / f"{label}.xml"
        _run(suite, "--hwfault", *args, f"--hwfault-report={report}", f"--junitxml={junit}").assert_outcomes(
            passed=2 if label == "off_n2" else 1)
        statuses = [p.get("value") for p in ET.parse(junit).iter("property") if p.get("name") == "native"]
        runs[label] = ([{k: c[k] for k in ("trials", "accuracy", "ci_low", "ci_high", "verdict")}
                        for c in json.loads(report.read_text())["campaigns"]], statuses)
    from pytest_hwfault import native

    assert all(status.startswith("eager: off") for label in ("off", "off_n2", "ini") for status in runs[label][1])
    assert len(runs["off_n2"][1]) == 2 and runs["default"][1] == [native.status()]  # as here: same machine
    assert runs["default"][0] == runs["off"][0] == runs["off_n2"][0] == runs["ini"][0]


def test_lists_expand_into_campaigns(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_lists='''
import pytest

@pytest.mark.resilience(ber=[1e-5, 1e-4], site=["act", "weight"], max_drop=0.5, budget=16)
def test_grid(hwfault, model, val_data):
    hwfault.assess(model, val_data)

@pytest.mark.resilience(ber=1e-4, site=["act", "weight"], max_drop=0.5, budget=16)
def test_collapsed(hwfault, model, val_data):
    hwfault.assess(model, val_data, site="acc")

@pytest.mark.resilience(ber=1e-4, site="act", max_drop=0.5, budget=16)
def test_overridden(hwfault, model, val_data):
    hwfault.assess(model, val_data, ber=1e-5)
''')
    result = _run(suite, "--hwfault", "-v", "--strict-markers")
    result.assert_outcomes(passed=5, failed=2)
    result.stdout.fnmatch_lines([
        "*test_grid?act-ber1e-05? PASSED*",
        "*test_grid?act-ber0.0001? PASSED*",
        "*test_grid?weight-ber1e-05? PASSED*",
        "*test_grid?weight-ber0.0001? PASSED*",
        "*test_overridden PASSED*",
    ], consecutive=False)
    # an override of a list's axis would run one campaign under each of the list's names
    # (counted in the failures' headers: the short summary repeats them only where the terminal is wide enough)
    refused = [line for line in result.stdout.lines if line.startswith("test_lists.py::test_collapsed[")
               and "hwfault.assess() argument site='acc' overrides the site of a campaign that the marker's list "
                   "site=['act', 'weight'] made" in line]
    assert len(refused) == 2


BAD_MARKERS = {
    "ber": "@resilience(ber=2.0, site='act', min_acc=0.5)",
    "site": "@resilience(ber=1e-5, site='memory', min_acc=0.5)",
    "min_acc": "@resilience(ber=1e-5, site='act', min_acc=0.5, max_drop=0.1)",
    "bits": "@resilience(ber=1e-5, site='act', min_acc=0.5, bits=1)",
    "kind": "@resilience(ber=1e-5, site='act', min_acc=0.5, kind='toggle')",
    "bit_positions": "@resilience(ber=1e-5, site='act', min_acc=0.5, bit_positions=[8])",
    "layers": "@resilience(ber=1e-5, site='act', min_acc=0.5, layers=[3])",
    "confidence": "@resilience(ber=1e-5, site='act', min_acc=0.5, confidence=1.5)",
    "budget": "@resilience(ber=1e-5, site='act', min_acc=0.5, budget=0)",
    "samples": "@resilience(ber=1e-5, site='act', min_acc=0.5, samples=-3)",
    "seed": "@resilience(ber=1e-5, site='act', min_acc=0.5, seed='x')",
    "colour": "@resilience(ber=1e-5, site='act', min_acc=0.5, colour='red')",
}


def test_every_bad_marker_argument_is_a_clean_collection_error(suite: pytest.Pytester) -> None:
    for argument, decorator in BAD_MARKERS.items():
        suite.makepyfile(**{f"test_bad_{argument}": f'''
import pytest
resilience = pytest.mark.resilience

{decorator}
def test_gate(hwfault, model, val_data):
    hwfault.assess(model, val_data)
'''})
    result = _run(suite, "--hwfault")
    out = result.stdout.str()
    assert result.ret == 2  # collection errors interrupt the session
    for argument in BAD_MARKERS:
        line = next((x for x in out.splitlines() if f"test_bad_{argument}.py::test_gate" in x
                     and "@resilience argument" in x), None)
        assert line is not None, f"no clean error for {argument}:\n{out}"
        assert f"argument {argument}:" in line
    assert "Traceback" not in out and "spec.py" not in out


def test_eager_marker_check_at_import(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_eager='''
from pytest_hwfault import resilience

@resilience(ber=1e-5, site="act")
def test_gate(hwfault):
    pass
''')
    result = _run(suite)
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*min_acc: give exactly one of min_acc*"])


def test_a_marked_function_pytest_does_not_collect_is_a_collection_error(suite: pytest.Pytester) -> None:
    """`@resilience` on `check_release` (a name python_functions does not match): pytest never ran it, so the gate
    never ran and the suite passed. It is a collection error naming the function; a marked test collected under
    another attribute name (a test built by a factory) is collected as before."""
    source = '''
from pytest_hwfault import resilience

@resilience(ber=1e-5, site="act", min_acc=0.5)
def check_release(hwfault):
    hwfault.assess(None, None)

def _factory():
    @resilience(ber=1e-5, site="act", min_acc=0.5)
    def gate(hwfault):
        pass
    return gate

test_built = _factory()
_shared = _factory()
test_shared = _shared  # collected under this name: its other name is not an error

def test_plain():
    pass
'''
    suite.makepyfile(test_named=source)
    result = _run(suite, "--collect-only", "-q")
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*test_named.py::check_release: is marked @resilience but pytest does not collect it "
                                 "as a test*so its gate would never run*"])
    suite.makepyfile(test_named=source.replace("def check_release", "def test_release"))
    result = _run(suite, "--collect-only", "-q")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*test_named.py::test_release*", "*test_named.py::test_built*",
                                 "*test_named.py::test_shared*"])


def test_marker_without_fixture_and_gate_never_run(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_nofixture='''
import pytest

@pytest.mark.resilience(ber=1e-5, site="act", min_acc=0.5)
def test_gate(model):
    pass
''', test_testcase='''
import unittest

import pytest

class TestRelease(unittest.TestCase):
    @pytest.mark.resilience(ber=1e-5, site="act", min_acc=0.5)
    def test_gate(self):
        pass
''', test_noassess='''
import pytest

@pytest.mark.resilience(ber=1e-5, site="act", min_acc=0.5)
def test_gate(hwfault):
    pass
''')
    result = _run(suite, "--hwfault")
    result.stdout.fnmatch_lines(["*test_nofixture.py::test_gate: uses @resilience but does not request*"])
    # a TestCase method cannot take the fixture as an argument: the advice says what can
    result = _run(suite, "--hwfault", "test_testcase.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*test_testcase.py::TestRelease::test_gate: uses @resilience in a unittest.TestCase,"
                                 " whose methods cannot request pytest fixtures*write the gate as a pytest test "
                                 "function*"])
    result = _run(suite, "--hwfault", "test_noassess.py")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*never ran*hwfault.assess*"])


def test_a_test_cannot_swallow_its_gates_failure(suite: pytest.Pytester) -> None:
    """A gate that does not pass fails its test even when the test catches the exception (try/except, pytest.raises,
    a skip after it): CI must never be green on a failing gate. Expecting a failure is said with xfail(strict). A
    refusal (bad data: no verdict was drawn) may be caught and asserted by the test."""
    suite.makepyfile(test_swallow='''
import pytest
from pytest_hwfault import resilience

@resilience(ber=1e-4, site="act", min_acc=0.995, budget=16)
def test_caught(hwfault, model, val_data):
    try:
        hwfault.assess(model, val_data)
    except BaseException:
        pass

@resilience(ber=1e-4, site="act", min_acc=0.995, budget=16)
def test_raises(hwfault, model, val_data):
    with pytest.raises(pytest.fail.Exception):
        hwfault.assess(model, val_data)

@resilience(ber=1e-4, site="act", min_acc=0.995, budget=16)
def test_skipped_after(hwfault, model, val_data):
    try:
        hwfault.assess(model, val_data)
    except BaseException:
        pytest.skip("not today")

@resilience(ber=1e-4, site="act", min_acc=0.995, budget=16)
def test_refusal_caught(hwfault, model, val_data):
    try:
        hwfault.assess(model, (val_data[0], val_data[1].float()))
    except BaseException:
        pass

@pytest.mark.xfail(strict=True, reason="this model is expected to fail the gate")
@resilience(ber=1e-4, site="act", min_acc=0.995, budget=16)
def test_expected_to_fail(hwfault, model, val_data):
    hwfault.assess(model, val_data)

@resilience(ber=1e-4, site="act", min_acc=0.5, budget=16)
def test_passes(hwfault, model, val_data):
    try:
        hwfault.assess(model, val_data)
    except BaseException:
        raise AssertionError("a passing gate raised")
''')
    result = _run(suite, "--hwfault", "-p", "no:randomly")
    result.assert_outcomes(failed=3, passed=2, xfailed=1)
    out = result.stdout.str()
    for name, outcome in (("caught", "passed"), ("raises", "passed"), ("skipped_after", "skipped")):
        assert f"test_swallow.py::test_{name}: the test {outcome} after catching the failure of its gate" in out
    assert "gate: a gate's verdict fails the test whatever the test does with the exception.\nhwfault FAIL: " \
           "test_swallow.py::test_caught" in out


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--hwfault-confidence=2", "outside [0.5, 1)"),
        ("--hwfault-confidence=abc", "not a number"),
        ("--hwfault-budget=0", "expected a positive integer"),
        ("--hwfault-budget=-1", "below 1; expected a positive integer"),  # said "non-negative", which 0 is not
        ("--hwfault-seed=-1", "non-negative"),
        ("--hwfault-device=tpu", "not one of: cpu, cuda, auto"),
        ("--hwfault-inconclusive=maybe", "not one of: fail, pass"),
        ("--hwfault-compare-tolerance=3", "outside [0, 1]"),
        ("--hwfault-save=../x", "no spaces or path separators"),
        ("--hwfault-cache-mb=-5", "non-negative"),
        ("--hwfault-native=fast", "not one of: auto, off"),
    ],
)
def test_bad_cli_values_are_refused_when_parsed(pytester: pytest.Pytester, option: str, message: str) -> None:
    result = _run(pytester, option)
    assert result.ret == 4  # usage error
    name = option.split("=")[0]
    pattern = message.replace("[", "?").replace("]", "?")
    result.stderr.fnmatch_lines([f"*argument {name}:*{pattern}*"])
    assert "Traceback" not in result.stderr.str()


def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nhwfault_budget = many\n")
    result = _run(pytester)
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*hwfault_budget*many*not an integer*"])


def test_strict_markers_and_ini_enable(suite: pytest.Pytester) -> None:
    suite.makeini("[pytest]\nhwfault = true\nhwfault_budget = 8\n")
    suite.makepyfile(test_gates=GATES.replace(", budget=16", ""))
    result = _run(suite, "--strict-markers", "-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_passes*", "*hwfault act-ber0.0001: 4/8 trials, accuracy*"])
    assert "Captured stdout call" not in result.stdout.str()  # progress goes to the terminal, not the capture


def test_baseline_compare_fails_on_regression(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_base='''
from pytest_hwfault import resilience

@resilience(ber=1e-4, site="act", min_acc=0.1, budget=8, first=8)
def test_gate(hwfault, model, val_data):
    hwfault.assess(model, val_data)
''')
    # the campaign id depends on the test and its spec: keep both and make the model worse instead
    saved = _run(suite, "--hwfault", "--hwfault-save=v1")
    saved.assert_outcomes(passed=1)
    assert (suite.path / ".hwfault" / "v1.json").is_file()
    same = _run(suite, "--hwfault", "--hwfault-compare=v1")
    same.assert_outcomes(passed=1)
    # a regressed model: corrupt the trained net inside the conftest's model fixture
    suite.makeconftest(DIGITS_CONFTEST.replace("return net.eval()",
                                               "net[0].weight.data.mul_(0.3)\n    return net.eval()"))
    worse = _run(suite, "--hwfault", "--hwfault-compare=v1", "--hwfault-compare-tolerance=0.01")
    worse.assert_outcomes(failed=1)
    worse.stdout.fnmatch_lines(["*against baseline 'v1': REGRESSION*test_gate*"])
    missing = _run(suite, "--hwfault", "--hwfault-compare=nope")  # refused before any campaign runs
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["*no baseline named 'nope'*available: v1*"])


def test_readme_example_runs_as_written(pytester: pytest.Pytester) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "def test_release_candidate" in b)
    pytester.makepyfile(test_release=example)
    result = _run(pytester, "test_release.py", "--hwfault", "-v")
    result.assert_outcomes(passed=1)


def test_marker_driven_search(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_search_gate='''
from pytest_hwfault import resilience

@resilience(search="weight", max_flips=1, max_drop=0.9, examples=20, seed=0)
def test_robust_enough(hwfault, model, val_data):
    hwfault.assess(model, val_data)

@resilience(search="weight", max_flips=2, min_acc=0.975, examples=60, seed=0)
def test_breaks(hwfault, model, val_data):
    hwfault.assess(model, val_data)

@resilience(search="memory", max_flips=2, min_acc=0.5)
def test_bad(hwfault, model, val_data):
    hwfault.assess(model, val_data)
''')
    result = _run(suite, "--hwfault", "-rA", "test_search_gate.py", "--deselect", "test_search_gate.py::test_bad")
    assert result.ret == 2  # the bad search argument fails the import (eager check), naming argument and values
    result.stdout.fnmatch_lines(["*search: 'memory' is not a fault site; allowed: weight, act, input, acc*"])
    suite.path.joinpath("test_search_gate.py").write_text(
        suite.path.joinpath("test_search_gate.py").read_text().split("@resilience(search=\"memory\"")[0])
    result = _run(suite, "--hwfault", "-rA", "test_search_gate.py")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "FaultPattern.from_faults([Fault('weight'" in out  # the replay literal of the shrunk pattern
    assert "Traceback" not in out
