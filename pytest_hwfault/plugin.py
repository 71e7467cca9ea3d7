"""The pytest plugin: options, the `resilience` marker, the `hwfault` fixture and reporting hooks.

Only wiring lives here; campaigns run in `gate`/`campaign`, reports are built in `report`. torch is imported only
when a resilience test actually runs, so `pytest` stays fast for suites that never pass --hwfault.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from .marker import MARKER, MARKER_HELP
from .report.baseline import DEFAULT_TOLERANCE
from .sharding import Slice, campaign_name, shard_id
from .spec import LIST_ARGUMENTS, CampaignSpec, SpecError, expand
from .verdicts import VerdictPolicy

if TYPE_CHECKING:
    from .campaign import CampaignResult
    from .gate import ModelCache

SKIP_REASON = "pass --hwfault to run hardware-fault campaigns"
SPEC_FIXTURE = "_hwfault_spec"
SHARD_FIXTURE = "_hwfault_shard"
RUN_ROOT_KEY = "hwfault_run_root"

OPT_ENABLE = "--hwfault"
OPT_SEED = "--hwfault-seed"
OPT_BUDGET = "--hwfault-budget"
OPT_CONFIDENCE = "--hwfault-confidence"
OPT_DEVICE = "--hwfault-device"
OPT_REPORT = "--hwfault-report"
OPT_HTML = "--hwfault-html"
OPT_INCONCLUSIVE = "--hwfault-inconclusive"
OPT_SAVE = "--hwfault-save"
OPT_COMPARE = "--hwfault-compare"
OPT_TOLERANCE = "--hwfault-compare-tolerance"
OPT_STORAGE = "--hwfault-storage"
OPT_SHARD = "--hwfault-shard"
OPT_CACHE = "--hwfault-cache-mb"
OPT_XDIST_SHARDS = "--hwfault-xdist-shards"
OPT_ALLOW_NEW = "--hwfault-compare-allow-new"
OPT_ADVISE = "--hwfault-advise"
OPT_NATIVE = "--hwfault-native"
NATIVE_MODES = ("auto", "off")
NATIVE_ENV_SWITCH = "PYTEST_HWFAULT_NATIVE"  # = native.ENV_SWITCH (that module imports torch: not at start-up)
DEVICES = ("cpu", "cuda", "auto")
INCONCLUSIVE_POLICIES = ("fail", "pass")


# -- argument parsers: reject bad values while options are parsed -------------------------------------------------
def _integer_from(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected {expected}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} is below {low}; expected {expected}")
    return value


def _non_negative_int(text: str) -> int:
    return _integer_from(text, 0, "a non-negative integer")


def _positive_int(text: str) -> int:
    return _integer_from(text, 1, "a positive integer")


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a confidence in [0.5, 1)") from None
    if not 0.5 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is outside [0.5, 1); e.g. 0.95")
    return value


def _tolerance(text: str) -> float:
    from .report.baseline import parse_tolerance

    return parse_tolerance(text)


def _choice(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of: {', '.join(allowed)}")
        return text

    parse.__name__ = "choice"
    return parse


def _slice(text: str) -> Slice:
    try:
        return Slice.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; expected K/M with 1 <= K <= M, e.g. 2/4") from None


def _xdist_shards(text: str) -> str:
    """"workers" (one shard item per xdist worker) or a positive number of shard items per campaign."""
    if text.strip() == "workers":
        return "workers"
    try:
        return str(_positive_int(text))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'workers' or a positive integer, e.g. 1") from None


def _name(text: str) -> str:
    from .report import ReportError
    from .report.baseline import check_name

    try:
        return check_name(text)
    except ReportError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# option, ini key, parser, default, help
_VALUED_OPTIONS: tuple[tuple[str, str, Callable[[str], Any], Any, str], ...] = (
    (OPT_SEED, "hwfault_seed", _non_negative_int, 0, "base seed of every campaign whose marker sets none"),
    (OPT_BUDGET, "hwfault_budget", _positive_int, 64, "maximum trials of a campaign whose marker sets no budget"),
    (OPT_CONFIDENCE, "hwfault_confidence", _confidence, 0.95, "confidence of campaigns whose marker sets none"),
    (OPT_DEVICE, "hwfault_device", _choice(DEVICES), "auto", "device of the campaigns: cpu, cuda or auto"),
    (OPT_REPORT, "hwfault_report", str, None, "write the campaigns' JSON report to this path"),
    (OPT_HTML, "hwfault_html", str, None,
     "write a self-contained HTML report of the campaigns (table, curves, per-layer heat map) to this path"),
    (OPT_INCONCLUSIVE, "hwfault_inconclusive", _choice(INCONCLUSIVE_POLICIES), "fail",
     "how a campaign that spends its budget without a verdict counts: fail (default) or pass"),
    (OPT_SAVE, "hwfault_save", _name, None, "save this run's results as baseline NAME"),
    (OPT_COMPARE, "hwfault_compare", _name, None, "fail campaigns whose accuracy regressed against baseline NAME"),
    (OPT_TOLERANCE, "hwfault_compare_tolerance", _tolerance, DEFAULT_TOLERANCE,
     f"accuracy drop against the baseline that still passes (default {DEFAULT_TOLERANCE:g})"),
    (OPT_STORAGE, "hwfault_storage", str, ".hwfault", "directory of saved baselines (default .hwfault)"),
    (OPT_SHARD, "hwfault_shard", _slice, Slice(),
     "compute only part K/M of every campaign (a CI matrix job); merge the reports with "
     "python -m pytest_hwfault.report merge"),
    (OPT_CACHE, "hwfault_cache_mb", _non_negative_int, 256,
     "memory (MiB) per campaign for late start's cache of fault-free values; 0 turns late start off"),
    (OPT_NATIVE, "hwfault_native", _choice(NATIVE_MODES), "auto",
     "the engine's fused native passes: auto (compiled with the machine's C compiler where one is found) or off "
     "(torch's eager ops: the same numbers, slower)"),
    (OPT_XDIST_SHARDS, "hwfault_xdist_shards", _xdist_shards, "workers",
     "under xdist, the shard items each campaign becomes: 'workers' (default: one per worker, for a few long "
     "campaigns) or N; 1 runs each campaign whole on one worker, side by side with the others (for suites of "
     "many campaigns: no setup repeated per shard)"),
)


@dataclass(frozen=True)
class Settings:
    enabled: bool
    seed: int
    budget: int
    confidence: float
    device: str
    report: str | None
    inconclusive: str
    save: str | None
    compare: str | None
    compare_tolerance: float
    storage: str
    shard: Slice
    cache_mb: int
    xdist_shards: str = "workers"
    native: str = "auto"
    compare_allow_new: bool = False
    html: str | None = None
    advise: bool = False

    def marker_defaults(self) -> dict[str, Any]:
        return {"seed": self.seed, "budget": self.budget, "confidence": self.confidence}

    def policy(self) -> VerdictPolicy:
        return VerdictPolicy(inconclusive_passes=self.inconclusive == "pass", partial=self.shard.count > 1)


@dataclass
class SessionState:
    """What one process keeps for the whole session."""

    cache: ModelCache | None = None
    baseline: dict[str, Any] | None = None
    # campaign name -> its shards this session runs (after -k, --lf, --deselect); a campaign not listed runs all
    selected_shards: dict[str, tuple[int, ...]] = field(default_factory=dict)


SETTINGS_KEY = pytest.StashKey[Settings]()
STATE_KEY = pytest.StashKey[SessionState]()
ITEM_RECORDS_KEY = pytest.StashKey[list]()
SEARCH_RECORDS_KEY = pytest.StashKey[list]()
RUN_ROOT_STASH = pytest.StashKey[Path]()
MARKER_PROBLEM_KEY = pytest.StashKey[str]()
CALLED_KEY = pytest.StashKey[bool]()  # hwfault.assess()/search() was called, even if it then refused
GATE_FAILURES_KEY = pytest.StashKey[list]()  # the verdicts hwfault.assess()/search() failed the test with


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hwfault", "hardware-fault resilience campaigns (pytest-hwfault)")
    group.addoption(OPT_ENABLE, action="store_true", default=None, dest="hwfault",
                    help="run the campaigns of tests marked @resilience (otherwise they are skipped)")
    parser.addini("hwfault", type="bool", default=False, help="run hardware-fault campaigns as if --hwfault")
    for option, ini, parse, _default, text in _VALUED_OPTIONS:
        group.addoption(option, dest=_dest(option), type=parse, default=None, help=f"{text} [ini: {ini}]")
        parser.addini(ini, help=text, default=None)
    group.addoption(OPT_ALLOW_NEW, action="store_true", default=None, dest=_dest(OPT_ALLOW_NEW),
                    help="with --hwfault-compare: campaigns the baseline lacks pass (default: they fail, since "
                         "nothing was compared) [ini: hwfault_compare_allow_new]")
    parser.addini("hwfault_compare_allow_new", type="bool", default=False,
                  help="campaigns missing from the --hwfault-compare baseline pass")
    group.addoption(OPT_ADVISE, action="store_true", default=None, dest=_dest(OPT_ADVISE),
                    help="for a gate that does not pass, find layers whose protection makes it pass (up to 4 "
                         "confirming campaigns) and print the suggestion [ini: hwfault_advise]")
    parser.addini("hwfault_advise", type="bool", default=False,
                  help="run the advisor on gates that do not pass, as if --hwfault-advise")


def _settings(config: pytest.Config) -> Settings:
    values: dict[str, Any] = {}
    for option, ini, parse, default, _ in _VALUED_OPTIONS:
        value = config.getoption(_dest(option))
        if value is None:
            raw = config.getini(ini)
            if raw not in (None, "", []):
                try:
                    value = parse(str(raw).strip())
                except argparse.ArgumentTypeError as exc:
                    raise pytest.UsageError(f"ini option {ini} = {raw!r}: {exc}") from None
        values[_dest(option).removeprefix("hwfault_")] = default if value is None else value
    enabled = config.getoption("hwfault")
    allow_new = config.getoption(_dest(OPT_ALLOW_NEW))
    advise = config.getoption(_dest(OPT_ADVISE))
    return Settings(enabled=bool(config.getini("hwfault")) if enabled is None else True,
                    compare_allow_new=bool(config.getini("hwfault_compare_allow_new")) if allow_new is None else True,
                    advise=bool(config.getini("hwfault_advise")) if advise is None else True,
                    **values)


def _check_settings(settings: Settings) -> None:
    """Refuse, before any campaign runs, what could only fail (or silently do nothing) at the end."""
    if settings.shard.count > 1:
        for option, value in ((OPT_COMPARE, settings.compare), (OPT_SAVE, settings.save)):
            if value is not None:
                raise pytest.UsageError(
                    f"{option}={value} with {OPT_SHARD}={settings.shard.index}/{settings.shard.count}: a slice holds "
                    "no final result to compare or save; merge the slices' reports (python -m pytest_hwfault.report "
                    "merge part-*.json -o merged.json), then compare the merged report "
                    "(python -m pytest_hwfault.report compare merged.json BASELINE.json)")
    from .report import ReportError
    from .report.baseline import load_baseline
    from .report.document import check_writable

    try:
        if settings.report:
            check_writable(settings.report, f"report ({OPT_REPORT})")
        if settings.html:
            check_writable(settings.html, f"HTML report ({OPT_HTML})")
        if settings.save:
            check_writable(Path(settings.storage) / f"{settings.save}.json", f"baseline ({OPT_SAVE})")
        if settings.compare:
            load_baseline(Path(settings.storage), settings.compare)
    except ReportError as exc:
        raise pytest.UsageError(str(exc)) from None


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    settings = _settings(config)
    config.stash[SETTINGS_KEY] = settings
    if settings.native == "off":  # `native.ENV_SWITCH`, read when the passes are first used; workers inherit it
        os.environ[NATIVE_ENV_SWITCH] = "0"
        native = sys.modules.get("pytest_hwfault.native")  # imported already (it imports torch): switch it too
        if native is not None:
            native.switch_off()
    if settings.enabled and not _is_worker(config):
        _check_settings(settings)
    config.stash[STATE_KEY] = SessionState()
    config.pluginmanager.register(ResultCollector(config), "hwfault-results")
    if settings.enabled and not _is_worker(config) and config.pluginmanager.hasplugin("xdist"):
        run_root = Path(tempfile.mkdtemp(prefix="hwfault-run-"))
        config.stash[RUN_ROOT_STASH] = run_root
        config.pluginmanager.register(XdistHooks(run_root), "hwfault-xdist")
    if settings.enabled and config.pluginmanager.hasplugin("html"):
        config.pluginmanager.register(HtmlExtras(), "hwfault-pytest-html")
    if settings.enabled and _is_worker(config):
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


# -- collection: expand and check markers, skip without --hwfault ---------------------------------------------
def _marker_error(nodeid: str, exc: SpecError | str) -> pytest.Collector.CollectError:
    if isinstance(exc, SpecError):
        return pytest.Collector.CollectError(f"{nodeid}: @resilience argument {exc}")
    return pytest.Collector.CollectError(f"{nodeid}: {exc}")


def _specs(config: pytest.Config, nodeid: str, marker: pytest.Mark) -> list[CampaignSpec]:
    if marker.args:
        raise _marker_error(nodeid, f"@resilience takes keyword arguments only, got positional {marker.args!r}")
    try:
        if "search" in marker.kwargs:  # a worst-case search, not a campaign (imports no torch)
            from .spec import expand_search

            # no --hwfault-seed default: a seeded search turns hypothesis's example database off
            return expand_search(marker.kwargs)  # type: ignore[return-value]
        return expand(marker.kwargs, config.stash[SETTINGS_KEY].marker_defaults())
    except SpecError as exc:
        raise _marker_error(nodeid, exc) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is None:
        return
    nodeid = metafunc.definition.nodeid
    specs = _specs(metafunc.config, nodeid, marker)
    if "hwfault" not in metafunc.fixturenames:
        raise _marker_error(nodeid, "uses @resilience but does not request the `hwfault` fixture, "
                                    "so no campaign would run; add a `hwfault` argument and call hwfault.assess()")
    if len(specs) > 1:
        metafunc.parametrize(SPEC_FIXTURE, specs, ids=[spec.label() for spec in specs])
    shards = _shard_count(metafunc.config)
    if shards > 1 and metafunc.config.stash[SETTINGS_KEY].enabled and "search" not in marker.kwargs:
        metafunc.parametrize(SHARD_FIXTURE, [(k, shards) for k in range(1, shards + 1)],
                             ids=[shard_id(k, shards) for k in range(1, shards + 1)])


def _shard_count(config: pytest.Config) -> int:
    """Shards per campaign under xdist: `--hwfault-xdist-shards`, by default the number of workers, read from the
    environment xdist gives every worker, so that collection is identical on all of them."""
    if not _is_worker(config):
        return 1
    chosen = config.stash[SETTINGS_KEY].xdist_shards
    if chosen != "workers":
        return int(chosen)
    return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def _item_marker_problem(item: pytest.Item) -> str | None:
    """A marker the function-level checks never saw (applied through ``pytest.param(..., marks=...)``): check it
    here, and refuse lists, which only a function-level marker can expand into campaigns."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return None
    try:
        specs = _specs(item.config, item.nodeid, marker)
    except pytest.Collector.CollectError as exc:
        return str(exc)
    callspec = getattr(item, "callspec", None)
    if len(specs) > 1 and (callspec is None or SPEC_FIXTURE not in callspec.params):
        return (f"{item.nodeid}: @resilience argument ber/site: a list gives several campaigns, which only a marker "
                "on the test function expands; in pytest.param(..., marks=resilience(...)) give one site and one "
                "ber, or put the marker on the function")
    if "hwfault" not in getattr(item, "fixturenames", ()):
        if isinstance(item, pytest.Function) and item.cls is not None and _is_testcase(item.cls):
            return (f"{item.nodeid}: uses @resilience in a unittest.TestCase, whose methods cannot request pytest "
                    "fixtures, so no campaign would run; write the gate as a pytest test function (or a method of "
                    "a plain class) with a `hwfault` argument, and call hwfault.assess()")
        return (f"{item.nodeid}: uses @resilience but does not request the `hwfault` fixture, so no campaign would "
                "run; add a `hwfault` argument and call hwfault.assess()")
    return None


def _is_testcase(cls: type) -> bool:
    import unittest

    return issubclass(cls, unittest.TestCase)


def _has_marker(obj: object) -> bool:
    """Whether `obj` (any attribute of a test module or class) carries the @resilience marker."""
    try:
        marks = getattr(obj, "pytestmark", None)
    except Exception:  # noqa: BLE001 - an attribute of anything a test module imports (a lazy proxy)
        return False
    return isinstance(marks, list) and any(getattr(mark, "name", None) == MARKER for mark in marks)


def _collected_elsewhere(collector: pytest.Module | pytest.Class, name: str, obj: object) -> bool:
    """Whether `obj` is also bound to a name the collector collects (`_gate = ...; test_gate = _gate`)."""
    namespace = getattr(collector.obj, "__dict__", {})
    return any(value is obj and other != name and (collector.istestfunction(value, other)
                                                  or collector.istestclass(value, other))
               for other, value in list(namespace.items()))


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(collector: pytest.Module | pytest.Class, name: str, obj: object) -> Any:
    """A function or class marked @resilience that pytest does not collect (a name `python_functions` does not
    match, such as `check_release`) would never run its gate, and the suite would pass: a collection error."""
    result = yield
    if not result and _has_marker(obj) and not _collected_elsewhere(collector, name, obj):
        raise pytest.Collector.CollectError(
            f"{collector.nodeid}::{name}: is marked @resilience but pytest does not collect it as a test (its name "
            "does not match python_functions / python_classes, or it is not a function), so its gate would never "
            "run: name it test_...")
    return result


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    enabled = config.stash[SETTINGS_KEY].enabled
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker(MARKER) is None:
            continue
        problem = _item_marker_problem(item)
        if problem is not None:
            item.stash[MARKER_PROBLEM_KEY] = problem
        elif not enabled:
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Note which shards of each campaign the session runs, once -k, --lf and --deselect have chosen: the last of
    those to finish carries the verdict, and only those can be lost. A shard nobody runs is never waited for (with
    --lf rerunning only the shard that failed, the campaign was 'incomplete, a worker crashed')."""
    selected: dict[str, set[int]] = {}
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if SHARD_FIXTURE in params:
            selected.setdefault(campaign_name(item.nodeid), set()).add(params[SHARD_FIXTURE][0])
    session.config.stash[STATE_KEY].selected_shards = {name: tuple(sorted(shards)) for name, shards in
                                                       selected.items()}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    problem = item.stash.get(MARKER_PROBLEM_KEY, None)
    if problem is not None:
        pytest.fail(problem, pytrace=False)


# -- the fixture ---------------------------------------------------------------------------------------------
@pytest.fixture
def _hwfault_spec(request: pytest.FixtureRequest) -> CampaignSpec | None:
    """The campaign of a test with one (site, ber); tests with lists are parametrized over this fixture."""
    marker = request.node.get_closest_marker(MARKER)
    return None if marker is None else _specs(request.config, request.node.nodeid, marker)[0]


@pytest.fixture
def _hwfault_shard() -> tuple[int, int]:
    """(this item's shard of its campaign, the campaign's shard count): (1, 1) when not sharded."""
    return (1, 1)


class HwFault:
    """The `hwfault` fixture: runs the campaign the marker describes and fails the test when the gate fails."""

    def __init__(self, item: pytest.Item, spec: CampaignSpec | None, shard: tuple[int, int]) -> None:
        self._item = item
        self._shard, self._shards = shard
        self._config = item.config
        self._settings = item.config.stash[SETTINGS_KEY]
        self._state = item.config.stash[STATE_KEY]
        self.spec = spec
        item.stash[ITEM_RECORDS_KEY] = []
        item.stash[SEARCH_RECORDS_KEY] = []
        item.stash[CALLED_KEY] = False

    # engine access for custom assertions
    def quantize(self, model: Any, calibration_data: Any, **options: Any) -> Any:
        """Quantize once per process (cached on the model's architecture and state, the data and the options)."""
        from .gate import calibration_tensor, quantized

        bits = options.pop("bits", 8)
        with self._refusals("hwfault.quantize()"):
            return quantized(model, calibration_tensor(calibration_data), cache=self._cache(),
                             device=self._device(), bits=bits, options=options)

    def accuracy(self, model: Any, data: Any, faults: Any = None, **kwargs: Any) -> float:
        from .evaluate import accuracy
        from .quantization import QuantizedModel

        qmodel = model if isinstance(model, QuantizedModel) else self.quantize(model, data)
        return accuracy(qmodel, data, faults, **kwargs)

    def _cache(self) -> ModelCache:
        if self._state.cache is None:
            from .gate import ModelCache

            self._state.cache = ModelCache()
        return self._state.cache

    def _device(self) -> Any:
        from .gate import resolve_device

        try:
            return resolve_device(self._settings.device)
        except RuntimeError as exc:
            pytest.fail(f"{self._item.nodeid}: {exc}", pytrace=False)

    @contextmanager
    def _refusals(self, call: str) -> Iterator[None]:
        """Bad data or a model no verdict can be drawn on fail the test with the cause, not a traceback: data that
        cannot be read, outputs that cannot be judged, a deployed model the readers cannot reproduce, a model with no
        quantizable layer or one it cannot quantize faithfully (dtype, TorchScript, changing functional calls), a
        fault site that cannot reach the model's compute."""
        from .data import DataError
        from .deployed import DeployedFormatError
        from .evaluate import EvaluationError
        from .functional import CallOrderError
        from .qmodel import SiteUnreachableError
        from .quantization import NoQuantizableLayerError, UnsupportedModelError

        try:
            yield
        except (DataError, EvaluationError, DeployedFormatError, NoQuantizableLayerError, UnsupportedModelError,
                CallOrderError, SiteUnreachableError) as exc:  # said once: not chained to the refusal's traceback
            raise pytest.fail.Exception(f"{self._item.nodeid}: {call} refused: {exc}", pytrace=False) from None

    def _fail_gate(self, message: str) -> NoReturn:
        """Fail the test on its gate's verdict, noted on the item so that a test that catches the exception still
        fails (`pytest_runtest_makereport`): a verdict is not the test's to swallow. (A refusal, which draws no
        verdict, may be asserted by the test.)"""
        self._item.stash.setdefault(GATE_FAILURES_KEY, []).append(message)
        pytest.fail(message, pytrace=False)

    def _start(self, call: str) -> None:
        """What every campaign or search call checks first."""
        self._item.stash[CALLED_KEY] = True
        if not self._settings.enabled:  # a test without the marker: as a marked one, it needs --hwfault
            pytest.skip(f"{SKIP_REASON} ({call} was called)")

    def _reproduce(self, spec: CampaignSpec) -> str:
        return shlex.join(["pytest", campaign_name(self._item.nodeid), OPT_ENABLE, f"{OPT_SEED}={spec.seed}",
                           f"{OPT_BUDGET}={spec.budget}", f"{OPT_CONFIDENCE}={spec.confidence}"])

    def _progress(self, label: str) -> Callable[[CampaignResult, Any], None] | None:
        reporter = self._config.pluginmanager.get_plugin("terminalreporter")
        capture = self._config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or capture is None or self._config.get_verbosity() < 1 or _is_worker(self._config):
            return None
        checkpoints: set[int] = set()

        def show(result: CampaignResult, trial: Any) -> None:
            if not checkpoints:
                checkpoints.update(result.plan().checkpoints())
            done = result.contiguous()
            if done in checkpoints:
                o = result.outcome()
                with capture.global_and_fixture_disabled():
                    reporter.ensure_newline()
                    reporter.write_line(f"    hwfault {label}: {done}/{result.spec.budget} trials, accuracy "
                                        f"{o.accuracy:.4f} [{o.ci_low:.4f}, {o.ci_high:.4f}] vs {o.required:.4f}")

        return show

    def _campaign_spec(self, overrides: dict[str, Any]) -> CampaignSpec:
        nodeid = self._item.nodeid
        if self.spec is None:
            missing = [name for name in ("site", "ber") if name not in overrides]
            if "min_acc" not in overrides and "max_drop" not in overrides:
                missing.append("min_acc or max_drop")
            if missing:
                pytest.fail(f"{nodeid}: hwfault.assess() has no campaign to run: the test has no @resilience marker "
                            f"and the call lacks {', '.join(missing)}; mark the test, e.g. "
                            "@resilience(ber=1e-5, site='act', min_acc=0.8), or pass those arguments",
                            pytrace=False)
        marker = self._item.get_closest_marker(MARKER)
        for name in LIST_ARGUMENTS:  # a list the marker expanded into campaigns, one value each
            given = marker.kwargs.get(name) if marker is not None else None
            if name in overrides and isinstance(given, (list, tuple)) and len(given) > 1:
                pytest.fail(f"{nodeid}: hwfault.assess() argument {name}={overrides[name]!r} overrides the {name} of "
                            f"a campaign that the marker's list {name}={list(given)!r} made: every campaign of the "
                            f"list would run {name}={overrides[name]!r} under its own name. Give the values in the "
                            f"marker, or a single {name} there to override", pytrace=False)
        try:
            if self.spec is None:
                return CampaignSpec.from_dict({**self._settings.marker_defaults(), **overrides})
            return self.spec.with_overrides(**overrides)
        except SpecError as exc:
            pytest.fail(f"{nodeid}: hwfault.assess() argument {exc}", pytrace=False)

    def assess(self, model: Any, data: Any, *, calibration_data: Any = None,
               quantize_options: dict[str, Any] | None = None, input_key: str | None = None,
               label_key: str | None = None, **overrides: Any) -> CampaignResult:
        """Run the campaign of the marker (with `overrides`, any marker argument) and gate on its verdict.
        `input_key`/`label_key`: for data whose batches are dicts, the keys of the model's input and the label."""
        from .spec import SearchSpec

        data, calibration_data = self._keyed("hwfault.assess()", data, calibration_data, input_key, label_key)
        if isinstance(self.spec, SearchSpec):
            return self.search(model, data, calibration_data=calibration_data,
                               quantize_options=quantize_options, **overrides)
        self._start("hwfault.assess()")
        spec = self._campaign_spec(overrides)
        from .gate import Execution, assess
        from .report import campaign_record, failure_message

        records = self._item.stash[ITEM_RECORDS_KEY]
        base = campaign_name(self._item.nodeid)
        name = base if not records else f"{base}#{len(records)}"
        run_root = getattr(self._config, "workerinput", {}).get(RUN_ROOT_KEY)
        execution = Execution(shard=self._shard, shards=self._shards, ci_slice=self._settings.shard,
                              run_root=Path(run_root) if run_root else None,
                              selected=self._state.selected_shards.get(base, ()))
        start = time.perf_counter()
        with self._refusals("hwfault.assess()"):
            assessment = assess(model, data, spec, name, cache=self._cache(), device=self._device(),
                                calibration_data=calibration_data, quantize_options=quantize_options,
                                on_trial=self._progress(spec.label()), execution=execution,
                                cache_bytes=self._settings.cache_mb << 20)
        record = campaign_record(assessment.result, base, assessment.problem)
        record["seconds"] = time.perf_counter() - start
        record["shard"] = [execution.shard, execution.shards]
        record["shards_run"] = list(execution.running())
        records.append(record)
        if assessment.problem is not None:
            self._fail_gate(failure_message(record, self._reproduce(spec)))
        if not assessment.final and self._settings.shard.count > 1:
            return assessment.result  # a CI slice: the merge of all slices carries the verdict
        fails = self._settings.policy().fails(record["verdict"])
        if fails and assessment.final and self._settings.advise and record["verdict"] in ("fail", "inconclusive"):
            record["advice"] = self._advise(model, data, assessment.result, calibration_data, quantize_options)
        failure = (failure_message(record, self._reproduce(spec)) if fails else self._baseline_failure(record))
        if failure is None:
            return assessment.result
        if not assessment.final:  # stop here too: the shard carrying the verdict fails here
            pytest.skip(f"shard {execution.shard} of {execution.shards}: campaign {spec.label()} does not pass; "
                        "the shard of this campaign that finishes last reports it")
        self._fail_gate(failure)

    def _advise(self, model: Any, data: Any, result: CampaignResult, calibration_data: Any,
                quantize_options: dict[str, Any] | None) -> dict[str, Any] | None:
        """The advisor's suggestion for a gate that did not pass (`--hwfault-advise`), JSON-safe."""
        from .gate import advise
        from .report.document import _json_safe

        with self._refusals("the advisor (--hwfault-advise)"):
            advice = advise(model, data, result, cache=self._cache(), device=self._device(),
                            calibration_data=calibration_data, quantize_options=quantize_options)
        return dict(_json_safe(advice))

    def vulnerability(self, model: Any, data: Any, *, site: str, ber: float, trials: int = 16,
                      calibration_data: Any = None, quantize_options: dict[str, Any] | None = None,
                      input_key: str | None = None, label_key: str | None = None,
                      **arguments: Any) -> list[dict[str, Any]]:
        """Per-layer vulnerability by stratified campaigns: for each quantized layer, `trials` trials whose faults
        (`site`, `ber`, and any campaign argument such as kind=, bits=, bit_positions=, samples=, seed=) strike that
        layer alone. Returns one row per layer: name, faults, hit (fault-hit images; trials for weights),
        vulnerability (share of those whose top-1 prediction changed) with vulnerability_low/high at the confidence,
        site_bits and exposure_share. Skipped without --hwfault, as campaigns are."""
        data, calibration_data = self._keyed("hwfault.vulnerability()", data, calibration_data, input_key,
                                             label_key)
        if not self._settings.enabled:
            pytest.skip(f"{SKIP_REASON} (hwfault.vulnerability() was called)")
        if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
            pytest.fail(f"{self._item.nodeid}: hwfault.vulnerability() argument trials: {trials!r} must be a "
                        "positive number of trials per layer", pytrace=False)
        try:
            spec = CampaignSpec.from_dict({**self._settings.marker_defaults(), **arguments, "site": site, "ber": ber,
                                           "min_acc": 0.0})
        except (SpecError, TypeError) as exc:
            pytest.fail(f"{self._item.nodeid}: hwfault.vulnerability() argument {exc}", pytrace=False)
        from .gate import vulnerability

        with self._refusals("hwfault.vulnerability()"):
            try:
                return vulnerability(model, data, spec, campaign_name(self._item.nodeid), trials=trials,
                                     cache=self._cache(), device=self._device(), calibration_data=calibration_data,
                                     quantize_options=quantize_options)
            except ValueError as exc:
                pytest.fail(f"{self._item.nodeid}: hwfault.vulnerability() refused: {exc}", pytrace=False)

    def _keyed(self, call: str, data: Any, calibration_data: Any, input_key: str | None, label_key: str | None
               ) -> tuple[Any, Any]:
        """Data and calibration data of dict batches, read by their keys."""
        from .data import DataError, Keyed

        if input_key is None and label_key is None or isinstance(data, Keyed):
            return data, calibration_data
        try:
            data = Keyed(data, input_key, label_key)  # type: ignore[arg-type]
            if calibration_data is not None and not isinstance(calibration_data, Keyed):
                calibration_data = Keyed(calibration_data, input_key, None)  # type: ignore[arg-type]
        except DataError as exc:
            pytest.fail(f"{self._item.nodeid}: {call} {exc}", pytrace=False)
        return data, calibration_data

    def search(self, model: Any, data: Any, *, calibration_data: Any = None,
               quantize_options: dict[str, Any] | None = None, settings: Any = None, input_key: str | None = None,
               label_key: str | None = None, **overrides: Any) -> Any:
        """Search for the smallest fault pattern that breaks the model: the marker's search (``search=...``), or
        one given entirely by `overrides`; fails the test with the shrunk pattern and its replay when one is found.
        `settings`: hypothesis settings to start from (default: the active profile). `input_key`/`label_key`: as
        for `assess`."""
        from .search import run_marker_search
        from .spec import SearchSpec

        data, calibration_data = self._keyed("hwfault.search()", data, calibration_data, input_key, label_key)
        self._start("hwfault.search()")
        nodeid = self._item.nodeid
        try:
            if isinstance(self.spec, SearchSpec):
                spec = self.spec.with_overrides(**overrides)
            else:
                given = dict(overrides)
                if "search" in given:
                    given["site"] = given.pop("search")
                spec = SearchSpec(**given)
        except (SpecError, TypeError) as exc:
            pytest.fail(f"{nodeid}: hwfault.search() argument {exc}", pytrace=False)
        from .coverage import require_coverage
        from .gate import prepare
        from .quantization import require_exact_view

        with self._refusals("hwfault.search()"):
            prepared = prepare(model, data, samples=spec.samples, bits=spec.bits, cache=self._cache(),
                               device=self._device(), calibration_data=calibration_data,
                               quantize_options=quantize_options)
            inexact_view = require_exact_view(prepared.qmodel, spec.allow_inexact_view)
            require_coverage(prepared.qmodel, prepared.inputs, spec.min_coverage, spec.site,
                             None if spec.site == "pe" else spec.layers)
            result = run_marker_search(prepared.qmodel, prepared.inputs, prepared.labels, spec, nodeid=nodeid,
                                       settings=settings)
        record = result.to_dict()
        if inexact_view:
            record["inexact_view"] = inexact_view
        self._item.stash[SEARCH_RECORDS_KEY].append(record)
        if result.found:
            self._fail_gate(result.message)
        return result

    def _baseline_failure(self, record: dict[str, Any]) -> str | None:
        """Why the campaign does not hold up against the --hwfault-compare baseline, or None."""
        if self._settings.compare is None:
            return None
        from .report import ReportError, build_report, load_baseline
        from .report.baseline import baseline_failures

        if self._state.baseline is None:
            try:
                self._state.baseline = load_baseline(Path(self._settings.storage), self._settings.compare)
            except ReportError as exc:
                return f"{self._item.nodeid}: {OPT_COMPARE}: {exc}"
        failures = baseline_failures(build_report([record], {}), self._state.baseline,
                                     self._settings.compare_tolerance, allow_new=self._settings.compare_allow_new)
        return f"against baseline {self._settings.compare!r}: " + "\n".join(failures) if failures else None


@pytest.fixture
def hwfault(request: pytest.FixtureRequest, _hwfault_spec: CampaignSpec | None,
            _hwfault_shard: tuple[int, int]) -> HwFault:
    """Run hardware-fault campaigns: ``hwfault.assess(model, data)`` gates the test on the @resilience marker."""
    return HwFault(request.node, _hwfault_spec, _hwfault_shard)


# -- results: carried on test reports, so xdist workers hand them to the controller ---------------------------
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if call.when != "call":
        return report
    records = item.stash.get(ITEM_RECORDS_KEY, None)
    searches = item.stash.get(SEARCH_RECORDS_KEY, None)
    if searches:
        report.hwfault_search = searches
    if records:
        report.hwfault = records
    failures = item.stash.get(GATE_FAILURES_KEY, None)
    if failures and report.outcome in ("passed", "skipped") and not hasattr(report, "wasxfail"):
        report.longrepr = (f"{item.nodeid}: the test {report.outcome} after catching the failure of its gate: "
                           "a gate's verdict fails the test whatever the test does with the exception.\n"
                           + "\n".join(failures))
        report.outcome = "failed"
    elif (report.passed and item.get_closest_marker(MARKER) is not None and item.config.stash[SETTINGS_KEY].enabled
          and not item.stash.get(CALLED_KEY, False)):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid}: the @resilience gate never ran: the test passed without calling "
                           "hwfault.assess(model, data)")
    return report


class ResultCollector:
    """Gathers campaign records from test reports (local, or replayed from xdist workers) and reports them.

    Registered on every process; only the controller (or a lone process) prints and writes reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.records: list[dict[str, Any]] = []
        self.interrupted = False

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        records = getattr(report, "hwfault", None)
        if records and report.when == "call":
            self.records.extend(records)

    def pytest_keyboard_interrupt(self) -> None:
        self.interrupted = True

    def campaigns(self) -> list[dict[str, Any]]:
        """One record per campaign: shards merged, lost shards and invalid merges marked."""
        from .report.merge import merge_shard_records

        return merge_shard_records(self.records)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if _is_worker(self.config):
            return
        campaigns = self.campaigns()
        if not campaigns:
            return
        from .report import format_table
        from .report.text import printable

        terminalreporter.write_sep("-", "hwfault campaigns")
        for line in format_table(campaigns):
            terminalreporter.write_line(line)
        for record in campaigns:
            where = printable(f"{record['nodeid']} [{record['label']}]")
            if record.get("lost_shards"):
                terminalreporter.write_line(
                    f"hwfault: {where} lost shard(s) {record['lost_shards']} (selected, but they reported nothing: "
                    "a worker crashed, or the session stopped before they ran): the campaign is incomplete and "
                    "fails", red=True)
            if record.get("problem"):
                terminalreporter.write_line(f"hwfault: {where} is invalid and fails: {printable(record['problem'])}",
                                            red=True)

    def _completed(self, session: pytest.Session) -> str | None:
        """Why the session did not run to its end (so that its results are no baseline), or None."""
        if self.interrupted or session.exitstatus == pytest.ExitCode.INTERRUPTED:
            return "the session was interrupted"
        if session.shouldfail or session.shouldstop:
            return f"the session stopped early ({session.shouldfail or session.shouldstop})"
        if session.exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
            return f"the session ended with {pytest.ExitCode(session.exitstatus).name}"
        return None

    def _say(self, text: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"hwfault: {text}", red=True)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        settings = self.config.stash[SETTINGS_KEY]
        if _is_worker(self.config) or not settings.enabled:
            return
        campaigns = self.campaigns()
        policy = settings.policy()
        failed = any(policy.fails(r["verdict"]) for r in campaigns)
        if failed and session.exitstatus == pytest.ExitCode.OK:  # e.g. a lost shard: no test of its own failed
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if not (settings.report or settings.save or settings.html):
            return
        from .report import ReportError, build_report, environment, save_baseline, write_report

        report = build_report(campaigns, environment())
        try:
            if settings.report:
                write_report(Path(settings.report), report)
            if settings.html:
                from .report.html import write_html

                write_html(report["campaigns"], Path(settings.html), report["environment"])
            if settings.save:
                unfinished = self._completed(session)
                if unfinished is None:
                    save_baseline(Path(settings.storage), settings.save, report)
                else:
                    self._say(f"baseline {settings.save!r} not saved: {unfinished}; the previous one is kept")
        except (ReportError, OSError) as exc:
            self._say(f"could not write: {exc}")
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED


class XdistHooks:
    """Registered only when pytest-xdist is active: hands every worker the shared run directory."""

    def __init__(self, run_root: Path) -> None:
        self.run_root = run_root

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[RUN_ROOT_KEY] = str(self.run_root)


class HtmlExtras:
    """Registered only when pytest-html is active: a resilience test's row in its report shows its campaigns'
    verdicts, accuracies and intervals (an ``extras`` entry; it travels with the report from xdist workers)."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        records = item.stash.get(ITEM_RECORDS_KEY, None)
        if call.when == "call" and records:
            from pytest_html import extras

            from .report.html import extras_snippet

            report.extras = [*getattr(report, "extras", []), extras.html(extras_snippet(records))]
        return report


def pytest_unconfigure(config: pytest.Config) -> None:
    run_root = config.stash.get(RUN_ROOT_STASH, None)
    if run_root is not None:
        shutil.rmtree(run_root, ignore_errors=True)
