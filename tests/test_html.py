"""The self-contained HTML report (`--hwfault-html`, `report.html`): page contents, escaping, the plugin option,
pytest-html extras, and (slow) a real render in headless Chromium."""

from __future__ import annotations

import base64
import copy
import html
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import Digits, one_thread
from suites import DIGITS_CONFTEST

from pytest_hwfault import report as rp
from pytest_hwfault.campaign import Campaign
from pytest_hwfault.report.html import extras_snippet, render_html, reproduce_command, write_html
from pytest_hwfault.spec import CampaignSpec

NODE = "tests/models/test_digits.py::test_resilience"
HOSTILE = "tests/test_x.py::test_x[<script>alert('x')</script>&]"
ENV = {"machine": {"node": "ci-runner", "platform": "Linux"}, "python": "3.11", "torch": "2.x", "plugin": "0.1.0",
       "created": "2024-01-01T00:00:00+00:00"}
CAMPAIGNS = (  # nodeid, spec: two BERs of one site (a curve), a weight campaign, a failing one, a hostile nodeid
    (f"{NODE}[act-ber0.001]", CampaignSpec(site="act", ber=1e-3, min_acc=0.5, budget=8, first=4, seed=1)),
    (f"{NODE}[act-ber0.02]", CampaignSpec(site="act", ber=2e-2, min_acc=0.99, budget=8, first=4, seed=1)),
    (f"{NODE}[weight-ber0.001]", CampaignSpec(site="weight", ber=1e-3, max_drop=0.5, budget=8, first=4, seed=1)),
    (HOSTILE, CampaignSpec(site="act", ber=1e-3, min_acc=0.5, budget=8, first=4, seed=2)),
)


@pytest.fixture(scope="module")
def records(q_cnn: Any, digits: Digits) -> list[dict[str, Any]]:
    """Records of real campaigns on the quantized digits CNN."""
    x, y = digits.x_test[:200], digits.y_test[:200]
    out = []
    with one_thread():
        for nodeid, spec in CAMPAIGNS:
            result = Campaign(q_cnn, x, y, spec, nodeid).run()
            out.append(rp.campaign_record(result, nodeid))
    return out


@pytest.fixture(scope="module")
def page(records: list[dict[str, Any]]) -> str:
    return render_html(records, ENV)


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text, of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    parser.close()
    return parser


def _section(page: str, anchor: str) -> str:
    """The page from the heading with id `anchor` to the next h2."""
    start = page.index(f'<h2 id="{anchor}">')
    end = page.find("<h2 ", start + 1)
    return page[start:] if end < 0 else page[start:end]


def test_records_cover_the_verdicts_the_page_shows(records: list[dict[str, Any]]) -> None:
    verdicts = {record["nodeid"]: record["verdict"] for record in records}
    assert verdicts[f"{NODE}[act-ber0.001]"] == "pass"
    assert verdicts[f"{NODE}[act-ber0.02]"] == "fail"
    assert all(record["layers"] and any(layer["faults"] for layer in record["layers"]) for record in records)


def test_page_is_self_contained(page: str) -> None:
    parsed = _parse(page)
    tags = [tag for tag, _ in parsed.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags and "object" not in tags
    assert not re.search(r"https?://", page)
    assert "@import" not in page and "url(" not in page
    for _, attrs in parsed.tags:
        for name in ("src", "href", "srcset", "action", "data"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("data:image/png;base64,", "#")), (name, value[:60])
    images = [attrs["src"] for tag, attrs in parsed.tags if tag == "img"]
    # one plot per (test function, site, kind): act of test_resilience, weight of test_resilience, act of test_x
    assert len(images) == 3
    for src in images:
        assert src is not None
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
    csp = [attrs for tag, attrs in parsed.tags if tag == "meta" and attrs.get("http-equiv")]
    assert csp and "default-src 'none'" in (csp[0]["content"] or "")


def test_campaign_table_has_a_row_per_campaign(page: str, records: list[dict[str, Any]]) -> None:
    table = _section(page, "campaigns")
    rows = re.findall(r'<tr id="campaign-(\d+)" class="row-(\w+)">(.*?)</tr>', table, re.S)
    assert len(rows) == len(records)
    ordered = sorted(records, key=lambda r: (r["nodeid"], r["campaign_id"]))
    for (index, verdict_class, row), record in zip(rows, ordered):
        assert int(index) == ordered.index(record) and verdict_class == record["verdict"]
        text = html.unescape(re.sub(r"<[^>]+>", " ", row))
        assert f"{record['ber']:g}" in text and record["site"] in text
        assert f"{record['accuracy']:.4f} [{record['ci_low']:.4f}, {record['ci_high']:.4f}]" in text
        assert record["verdict"].upper() in text and "calibrated" in text and "100%" in text
        assert f"{record['trials']}/{record['budget']}" in text
    assert 'class="verdict v-fail"' in table and 'class="verdict v-pass"' in table
    assert "max_drop=0.5" in table and "min_acc=0.99" in table
    # a verdict other than pass links to its details
    assert '<a href="#campaign-1-details">' in table and 'id="campaign-1-details"' in page


def test_text_from_records_is_escaped(page: str, records: list[dict[str, Any]]) -> None:
    assert "<script" not in page and "alert('x')" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in page
    parsed = _parse(page)
    assert any("<script>alert('x')</script>&]" in text for text in parsed.text)  # shown to the reader as written
    hostile = copy.deepcopy(records[0])
    hostile["layers"][0]["name"] = '"><img src=x onerror=alert(1)>'
    hostile["model_format"] = "<b>onnx</b>"
    hostile["advice"] = {"protect": ["<i>conv</i>"], "cost": "<u>x</u>"}
    other = render_html([hostile], ENV)
    assert "<img src=x" not in other and "<i>conv" not in other and "<b>onnx" not in other and "<u>x" not in other
    assert "&lt;img src=x onerror=alert(1)&gt;" in other


def test_heat_map_shows_each_layer_and_campaign(page: str, records: list[dict[str, Any]]) -> None:
    heat = _section(page, "heatmap")
    assert heat.count('<table class="heat">') == 1  # one model: every campaign is a column of one table
    layers = [layer["name"] for layer in records[0]["layers"]]
    rows = re.findall(r'<tr><th class="layer">(.*?)</tr>', heat[heat.index("<tbody>"):], re.S)
    assert len(rows) == len(layers)
    for row, name in zip(rows, layers):
        assert row.startswith(f"{name} ")
        assert len(re.findall(r'<td class="cell', row)) == len(records)
    # a hit layer shows its vulnerability and interval on a colour of the ramp; a layer never hit shows "–"
    for record in records:
        for layer in record["layers"]:
            if layer["faults"]:
                value = f"{layer['vulnerability']:.2f}<small>[{layer['vulnerability_low']:.2f}, " \
                        f"{layer['vulnerability_high']:.2f}]</small>"
                assert value in heat
    cells = re.findall(r'<td class="cell" style="background:(#[0-9a-f]{6});color:(#[0-9a-f]{3})"', heat)
    assert cells and all(text in ("#fff", "#222") for _, text in cells)
    never_hit = copy.deepcopy(records[0])
    for layer in never_hit["layers"]:
        layer["faults"] = 0
    assert '<td class="cell none" title="no fault landed in this layer">–</td>' in render_html([never_hit], ENV)


def test_heat_map_colours_follow_the_vulnerability(records: list[dict[str, Any]]) -> None:
    record = copy.deepcopy(records[0])
    for layer, value in zip(record["layers"], (0.0, 1.0)):
        layer.update(faults=3, vulnerability=value, vulnerability_low=value / 2, vulnerability_high=1.0)
    heat = _section(render_html([record], ENV), "heatmap")
    assert 'style="background:#fff5f0;color:#222"' in heat  # 0: the lightest colour, dark text
    assert 'style="background:#67000d;color:#fff"' in heat  # 1: the darkest, white text


def test_scales_table_shows_each_layers_scales(page: str, records: list[dict[str, Any]]) -> None:
    scales = _section(page, "scales")
    assert scales.count('<table class="scales">') == 1  # the same model's scales once
    for layer in records[0]["result"]["layers"]:
        row = re.search(rf'<tr><th class="layer">{re.escape(layer["name"])}</th>(.*?)</tr>', scales, re.S)
        assert row is not None, layer["name"]
        for key in ("input_scale", "act_scale", "weight_scale_max", "weight_scale_mean"):
            assert f'<td class="num">{layer[key]:.4g}</td>' in row.group(1), key
        assert '<span class="bar act"' in row.group(1) and '<span class="bar weight"' in row.group(1)


def test_advisor_shows_advice_or_says_there_is_none(page: str, records: list[dict[str, Any]]) -> None:
    assert "No suggestion: no campaign in this report carries advice." in _section(page, "advisor")
    advised = copy.deepcopy(records)
    advised[1]["advice"] = {"protect": ["0", {"layer": "4", "bits": [6, 7]}], "accuracy": 0.97, "ci_low": 0.95,
                            "ci_high": 0.985, "cost": 0.125, "note": "ECC on two words"}
    advisor = _section(render_html(advised, ENV), "advisor")
    assert "protect <code>0</code>, <code>layer=4, bits=6, 7</code>" in advisor
    assert "expected accuracy 0.9700 [0.9500, 0.9850]" in advisor and "cost 0.125" in advisor
    assert "note: ECC on two words" in advisor
    assert advisor.count("no suggestion") == len(records) - 1


def test_detection_counts_appear_only_when_records_carry_them(page: str, records: list[dict[str, Any]]) -> None:
    assert 'id="detection"' in page  # campaign records carry silent and detected counts
    bare = [{key: value for key, value in r.items() if key not in ("silent", "detected")} for r in records]
    assert "Silent vs detected" not in render_html(bare, ENV)
    counted = copy.deepcopy(bare)
    counted[0].update(detected=12, due=3)
    section = _section(render_html(counted, ENV), "detection")
    assert "<th>detected</th><th>due</th>" in section and "<th>silent</th>" not in section
    assert '<td class="num">12</td><td class="num">3</td>' in section
    assert section.count('<td class="num">–</td><td class="num">–</td>') == len(records) - 1


def test_failing_campaign_shows_its_message_and_reproduce_command(page: str, records: list[dict[str, Any]]) -> None:
    failures = _section(page, "failures")
    failing = [r for r in records if r["verdict"] != "pass"]
    assert failing and failures.count('<div class="failure"') == len(failing)
    for record in failing:
        command = reproduce_command(record)
        assert shlex.split(command) == ["pytest", record["nodeid"], "--hwfault", f"--hwfault-seed={record['seed']}",
                                        f"--hwfault-budget={record['budget']}",
                                        f"--hwfault-confidence={record['confidence']}"]
        assert f'<pre class="cmd">{html.escape(command)}</pre>' in failures
    assert "accuracy under faults is below the threshold" in failures and "most vulnerable layers" in failures
    message = re.search(r"<details open><summary>failure message</summary><pre>(.*?)</pre>", failures, re.S)
    assert message is not None and "\\n" not in message.group(1)  # line breaks kept, not shown escaped
    assert message.group(1).count("\n") > 8 and "\n  fault model  site=act" in message.group(1)
    assert "Every campaign passed." in render_html([r for r in records if r["verdict"] == "pass"], ENV)


def test_header_summarises_verdicts_and_environment(page: str) -> None:
    head = page[: page.index('<h2 id="campaigns">')]
    assert '<span class="verdict v-pass">' in head and '<span class="verdict v-fail">1 fail</span>' in head
    assert "ci-runner, Linux" in head and "2024-01-01T00:00:00+00:00" in head and "torch <b>2.x</b>" in head


def test_without_matplotlib_the_page_says_so(monkeypatch: pytest.MonkeyPatch, records: list[dict[str, Any]]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    page = render_html(records, ENV)
    assert "<img" not in page and "matplotlib is not installed" in _section(page, "curves")
    assert '<table class="heat">' in page  # everything else is still there


def test_empty_run() -> None:
    page = render_html([], ENV)
    assert "0 campaigns" in page and "No campaign reached a checkpoint" in page
    assert "No campaign carries per-layer rows" in page and "Every campaign passed." in page


def test_write_html_is_atomic_and_readable(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    target = write_html(records, tmp_path / "sub" / "report.html", ENV)
    assert target.read_text(encoding="utf-8") == render_html(records, ENV)
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]  # no temporary left behind
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(rp.ReportError, match="is a directory"):
        write_html(records, tmp_path, ENV)
    write_html(records, os.devnull, ENV)  # written in place, never replaced
    assert Path(os.devnull).exists() and not Path(os.devnull).is_file()


def test_cli_renders_a_report_file(tmp_path: Path, records: list[dict[str, Any]],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    report = rp.write_report(tmp_path / "report.json", rp.build_report(records, ENV))
    out = tmp_path / "page.html"
    assert rp.main(["html", str(report), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8") == render_html(rp.load_report(report)["campaigns"], ENV)
    assert rp.main(["html", str(tmp_path / "missing.json"), "-o", str(out)]) == 2


def test_extras_snippet(records: list[dict[str, Any]]) -> None:
    snippet = extras_snippet([records[1], records[3]])
    assert snippet.count('<div class="hwfault-campaign">') == 2
    record = records[1]
    assert f"{record['accuracy']:.4f} [{record['ci_low']:.4f}, {record['ci_high']:.4f}]" in snippet
    assert "FAIL" in snippet and f"vs required {record['threshold']['required']:.4f}" in snippet


# -- the plugin ------------------------------------------------------------------------------------------------
GATES = '''
from pytest_hwfault import resilience

@resilience(ber=[1e-4, 1e-3], site="act", min_acc=0.5, budget=8)
def test_passes(hwfault, model, val_data):
    hwfault.assess(model, val_data)

@resilience(ber=1e-3, site="act", min_acc=0.995, budget=8)
def test_fails(hwfault, model, val_data):
    hwfault.assess(model, val_data)
'''


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(DIGITS_CONFTEST)
    pytester.makepyfile(test_gates=GATES)
    return pytester


def test_option_writes_the_page(suite: pytest.Pytester) -> None:
    page = suite.path / "out" / "hwfault.html"
    report = suite.path / "report.json"
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:html", "--hwfault",
                                        f"--hwfault-html={page}", f"--hwfault-report={report}")
    result.assert_outcomes(passed=2, failed=1)
    text = page.read_text(encoding="utf-8")
    campaigns = rp.load_report(report)["campaigns"]
    assert text == render_html(campaigns, rp.load_report(report)["environment"])  # the JSON's records, rendered
    assert len(re.findall(r'<tr id="campaign-\d+"', text)) == 3
    for name in ("test_gates.py::test_passes[act-ber0.0001]", "test_gates.py::test_passes[act-ber0.001]",
                 "test_gates.py::test_fails"):
        assert name in text
    assert text.count("<img ") == 2 and '<table class="heat">' in text and '<table class="scales">' in text
    assert "pytest test_gates.py::test_fails --hwfault --hwfault-seed=0 --hwfault-budget=8" in text


def test_unwritable_page_path_is_a_usage_error(pytester: pytest.Pytester) -> None:
    (pytester.path / "taken").mkdir()
    pytester.makeini("[pytest]\nhwfault_html = taken\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hwfault")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*taken: is a directory; give a file path for the HTML report (--hwfault-html)*"])


def test_pytest_html_extras(suite: pytest.Pytester) -> None:
    pytest.importorskip("pytest_html")
    report = suite.path / "pytest-report.html"
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "--hwfault", f"--html={report}",
                                        "--self-contained-html", "-k", "test_fails")
    result.assert_outcomes(failed=1, deselected=2)
    blob = re.search(r'data-jsonblob="([^"]*)"', report.read_text(encoding="utf-8"))
    assert blob is not None  # pytest-html 4 keeps its rows in a JSON attribute
    rows = json.loads(html.unescape(blob.group(1)))["tests"]["test_gates.py::test_fails"]
    snippets = [extra["content"] for row in rows for extra in row["extras"] if extra["format_type"] == "html"]
    assert len(snippets) == 1
    assert '<div class="hwfault-campaign">hwfault <b>act-ber0.001</b>' in snippets[0]
    assert re.search(r"FAIL</span>, accuracy \d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\] vs required 0\.9950", snippets[0])


# -- a real render ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_page_renders_in_headless_chromium(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("headless rendering needs chromium (e.g. apt-get install chromium); it is not installed")
    page = write_html(records, tmp_path / "report.html", ENV)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    colours = {tuple(p) for p in (pixels[::7, ::7, :3] * 255).astype(int).reshape(-1, 3).tolist()}
    assert len(colours) > 50  # text, plots and heat-map colours, not a blank page


def test_a_verdict_on_an_inexact_view_is_marked_with_its_note(records: list[dict[str, Any]]) -> None:
    """A deployed model judged with allow_inexact_view=True: the table's verdict carries a mark whose tooltip holds
    the load check's note (escaped), and the note under the table says what the mark means."""
    marked = copy.deepcopy(records[0])
    marked["inexact_view"] = ["fault-free outputs differ (<b>394</b> of 640 values exactly equal)"]
    table = _section(render_html([marked, records[0]], ENV), "campaigns")
    assert table.count('<span class="inexact"') == 1
    assert ('<span class="inexact" title="fault-free outputs differ (&lt;b&gt;394&lt;/b&gt; of 640 values exactly '
            'equal)">*</span>') in table
    assert "judged on a view of the deployed model that computes otherwise than the model" in table
    assert "judged on a view" not in _section(render_html([records[0]], ENV), "campaigns")
