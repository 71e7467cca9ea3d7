"""The hypothesis-driven worst-fault search: strategies and their shrink order, the oracle, the plugin-driven search
(`hypothesis.find`), its failure report and replay, the example database and the ci profile.

The models are small digits MLPs built here (self-contained, one thread, fixed seeds):

- `robust`: 64 -> 16 -> ReLU -> 10, trained. No single weight flip costs it more than a few points.
- `planted`: the same trained units plus 112 *dormant* hidden units (16..127). A dormant unit's weights are all the
  int8 code -1 (a small negative weight; the row's scale is set by one large outlier weight on pixel 0, blank in
  every digit), its bias keeps it off on every image, and it feeds one class with a large weight. Flipping the
  sign bit (bit 7) of one of its -1 codes turns it into +127: on images where that pixel is lit the unit wakes up
  at the top of the activation range and votes for its class, taking the accuracy from 0.96 to below 0.76
  (MAX_DROP = 0.2). Every lower bit of a -1 code is already 1, so flipping it only makes the weight more negative:
  the sign bit is the only fatal bit, and only in layer "0".

Checked exhaustively while designing these tests (all single flips, max_drop 0.2): of the planted model's 83,968
single flips exactly 4,615 are fatal, all sign-bit flips in dormant rows of layer "0" (64% of their codes); no other
flip costs more than 11 points. No single flip of the robust model costs more than 9.4 points.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from torch import nn

from pytest_hwfault.evaluate import accuracy
from pytest_hwfault.explain import describe_faults, pattern_of
from pytest_hwfault.faults import Fault, FaultPattern
from pytest_hwfault.quantization import QuantizedModel, quantize
from pytest_hwfault.search import (
    DROP_LABEL,
    MARGIN_LABEL,
    FaultOracle,
    FaultSearchFailure,
    mutations,
    search_database_key,
    search_faults,
    subset_indices,
)
from pytest_hwfault.spec import SearchSpec, SpecError, expand_search
from pytest_hwfault.strategies import DrawnPattern, bit_flips, fault_lists, stuck_at

TRAINED = 16
DORMANT = 112
MAX_DROP = 0.2
EXAMPLES = 500  # measured: the weakness is found in ~80% of seeds with 100 examples, 30 of 30 with 500
QUIET = settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))


@contextmanager
def one_thread(seed: int) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Models:
    robust: QuantizedModel
    planted: QuantizedModel
    val: tuple[torch.Tensor, torch.Tensor]


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x_t, y_t = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x_t), generator=torch.Generator().manual_seed(0))
    x_t, y_t = x_t[order], y_t[order]
    return x_t[:1400], y_t[:1400], x_t[1400:], y_t[1400:]


def train_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int) -> nn.Sequential:
    with one_thread(1):
        model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(100):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def plant_dormant_units(model: nn.Sequential, x: torch.Tensor, dormant: int, reach: float = 3.0) -> nn.Sequential:
    """`model` with `dormant` extra hidden units that never fire, each one sign-bit flip away from firing (see the
    module docstring). `reach`: how far (in multiples of the trained units' largest pre-activation) the dormant
    units' pre-activations go, which sets the top of the activation range a woken unit reaches."""
    trained = model[0].out_features
    hidden = trained + dormant
    planted = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).eval()
    with torch.no_grad():
        top = float(model[0](x).abs().max())
        totals = x.sum(dim=1)
        offset = float(totals.min()) - 2.0  # the bias keeps sum(-s * x) + bias <= -2s on every image
        s = reach * top / (float(totals.max()) - offset)
        planted[0].weight.zero_()
        planted[0].bias.zero_()
        planted[2].weight.zero_()
        planted[0].weight[:trained] = model[0].weight
        planted[0].bias[:trained] = model[0].bias
        planted[2].weight[:, :trained] = model[2].weight
        planted[2].bias.copy_(model[2].bias)
        for k in range(dormant):
            unit = trained + k
            planted[0].weight[unit] = -s  # code -1 of a per-channel scale of s ...
            planted[0].weight[unit, 0] = 127 * s  # ... set by pixel 0, which is 0 in every digit
            planted[0].bias[unit] = s * offset
            planted[2].weight[k % 10, unit] = planted[2].weight[k % 10, :trained].abs().max()
    return planted


pytestmark = pytest.mark.usefixtures("single_threaded")  # tiny tensors: one thread is fastest


@pytest.fixture(scope="module")
def models() -> Models:
    x_train, y_train, x_val, y_val = digits()
    assert float(x_train[:, 0].abs().max()) == 0.0  # pixel 0 is blank in every digit
    base = train_mlp(x_train, y_train, TRAINED)
    planted = plant_dormant_units(base, x_train, DORMANT)
    with one_thread(0):
        return Models(quantize(base, x_train[:512]), quantize(planted, x_train[:512]), (x_val, y_val))


@pytest.fixture(scope="module")
def planted_oracle(models: Models) -> FaultOracle:
    return FaultOracle(models.planted, models.val, max_drop=MAX_DROP)


def assert_minimal(oracle: FaultOracle, faults: tuple[Fault, ...]) -> None:
    assert oracle.fails(faults)
    for what, smaller in mutations(faults):
        assert not oracle.fails(smaller), f"not minimal: still fails {what}: {smaller}"


# -- the planted weakness is found and shrunk --------------------------------------------------------------------
def test_the_planted_model_is_as_designed(models: Models, planted_oracle: FaultOracle) -> None:
    assert planted_oracle.baseline > 0.93
    dormant_row = models.planted.layers["0"].weight_codes[TRAINED]
    assert dormant_row[0] == 127 and bool((dormant_row[1:] == -1).all())
    # one sign-bit flip in a dormant row (pixel 36 is lit in most digits) is fatal; its lower bits are harmless
    sign = (Fault("weight", "0", TRAINED * 64 + 36, 7, "flip"),)
    assert_minimal(planted_oracle, sign)
    # the same flip in a trained row is not
    assert not planted_oracle.fails((Fault("weight", "0", 36, 7, "flip"),))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_finds_one_sign_bit_flip_in_the_planted_layer(models: Models, planted_oracle: FaultOracle,
                                                            seed: int) -> None:
    result = search_faults(models.planted, models.val, max_drop=MAX_DROP, max_flips=2, examples=EXAMPLES,
                           seed=seed)
    assert result.found, result.summary()
    (fault,) = result.faults  # shrunk to exactly one flip
    assert fault.layer == "0" and fault.bit == 7  # the sign bit, in the planted layer
    assert fault.index // 64 >= TRAINED  # in a dormant unit's row
    assert_minimal(planted_oracle, result.faults)
    # confirmed on all the data, and replayable with the public API
    assert result.pattern is not None
    replayed = accuracy(models.planted, models.val, faults=result.pattern)
    assert replayed == pytest.approx(result.accuracy) and replayed < result.baseline - MAX_DROP
    (detail,) = result.details
    assert (detail.code_before, detail.code_after) == (-1, 127)
    assert detail.scale == pytest.approx(float(models.planted.layers["0"].weight_scale[fault.index // 64]))


def test_the_failure_message_explains_and_replays(models: Models) -> None:
    result = search_faults(models.planted, models.val, max_drop=MAX_DROP, max_flips=2, examples=EXAMPLES, seed=0)
    (fault,) = result.faults
    message = result.message
    row, col = divmod(fault.index, 64)
    for piece in ("site=weight", "max_flips=2", f"{fault.index} [{row}, {col}]", "7 (sign)", "-1 -> 127",
                  "fault-free quantized", f"max_drop {MAX_DROP}", "replay:", "from pytest_hwfault import",
                  f"FaultPattern.from_faults([Fault('weight', '0', {fault.index}, 7, 'flip')])",
                  "accuracy(qmodel, (x, y), faults=pattern) >="):
        assert piece in message, (piece, message)
    # the replay line is valid Python that rebuilds the same pattern
    expression = result.replay()
    pattern = eval(expression, {"Fault": Fault, "FaultPattern": FaultPattern, "pattern_of": pattern_of})
    assert pattern.to_list() == [fault]


def test_without_shrinking_the_found_pattern_is_not_minimal(models: Models, planted_oracle: FaultOracle) -> None:
    """What the tests above would see if the shrinker did not run: the first failing pattern drawn, with extra
    faults and bits that do not matter."""
    no_shrink = settings(QUIET, phases=[Phase.explicit, Phase.generate, Phase.target])
    raw = [search_faults(models.planted, models.val, max_drop=MAX_DROP, max_flips=4, examples=EXAMPLES, seed=seed,
                         settings=no_shrink).faults for seed in range(5)]
    assert all(faults for faults in raw)  # each found one ...
    assert any(len(faults) > 1 for faults in raw)  # ... and (4 in 5, measured) with faults that can go:
    assert any(planted_oracle.fails(smaller) for faults in raw for _, smaller in mutations(faults))
    shrunk = search_faults(models.planted, models.val, max_drop=MAX_DROP, max_flips=4, examples=EXAMPLES, seed=0,
                           settings=QUIET).faults
    assert len(shrunk) == 1 and shrunk[0].bit == 7


def test_target_receives_every_drop(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    import hypothesis

    seen: list[tuple[str, float]] = []
    real = hypothesis.target

    def spy(observation: float, *, label: str = "") -> float:
        seen.append((label, observation))
        return real(observation, label=label)

    monkeypatch.setattr(hypothesis, "target", spy)
    oracle = FaultOracle(models.planted, models.val, max_drop=MAX_DROP)
    strategy = fault_lists(models.planted, "weight", max_flips=2)
    with pytest.raises(hypothesis.errors.NoSuchExample):  # the condition never holds: the whole budget runs
        find(strategy, lambda faults: oracle.fails(faults) and False,
             settings=settings(QUIET, max_examples=200, derandomize=True))
    drops = [value for label, value in seen if label == DROP_LABEL]
    assert drops == oracle.observations and len(drops) >= 150  # (hypothesis does not re-run a seen pattern)
    assert len([1 for label, _ in seen if label == MARGIN_LABEL]) == len(drops)
    assert max(drops) == oracle.best_drop > 0.0


def test_check_inside_given_fails_with_the_report(models: Models, planted_oracle: FaultOracle) -> None:
    strategy = bit_flips(models.planted, "weight", max_flips=2, layers="0", bit_positions=[6, 7])

    @settings(QUIET, max_examples=100, derandomize=True)
    @given(pattern=strategy)
    def inner(pattern: DrawnPattern) -> None:
        planted_oracle.check(pattern)

    with pytest.raises(FaultSearchFailure) as info:
        inner()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "pattern=FaultPattern.from_faults([Fault('weight', '0', " in notes, notes  # the falsifying example
    assert "7 (sign)" in str(info.value) and "-1 -> 127" in str(info.value)  # shrunk from bits [6, 7] to the 7


def test_pinned_activation_search_replays_with_pattern_of(models: Models) -> None:
    result = search_faults(models.planted, models.val, site="act", max_drop=MAX_DROP, max_flips=2, examples=100,
                           seed=0)
    assert result.found, result.summary()
    assert all(f.site == "act" and f.image is None for f in result.faults)  # each strikes every image
    expression = result.replay()
    assert expression.startswith("pattern_of([Fault('act', ") and "images=397" in expression
    assert "pattern_of([Fault('act', " in result.message and "images=len(x))" in result.message
    pattern = eval(expression, {"Fault": Fault, "FaultPattern": FaultPattern, "pattern_of": pattern_of})
    assert accuracy(models.planted, models.val, faults=pattern) == pytest.approx(result.accuracy)
    assert result.accuracy < result.required


REPLAY_WITHOUT_HYPOTHESIS = """
import sys
sys.modules["hypothesis"] = None  # from here on, any import of hypothesis fails
from pytest_hwfault import Fault, FaultPattern
from pytest_hwfault.explain import pattern_of, replay_expression, replay_lines
faults = [Fault("act", "0", 3, 6, "flip"), Fault("weight", "2", 1, 7, "flip")]
rebuilt = eval(replay_expression(faults, 5), {"Fault": Fault, "FaultPattern": FaultPattern, "pattern_of": pattern_of})
assert len(rebuilt) == 6 and len(pattern_of(faults, 5)) == 6  # the act fault once per image, the weight fault once
scope = {"x": [0] * 5}
exec("\\n".join(replay_lines(faults, 5, 0.5, 0.25)[:-1]), scope)  # the printed replay, but for its assert
assert scope["pattern"].to_json() == rebuilt.to_json()
print("replayed")
"""


def test_a_found_pattern_replays_without_hypothesis() -> None:
    """`pattern_of`, `replay_expression` and the replay a report prints need no hypothesis."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", REPLAY_WITHOUT_HYPOTHESIS], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "replayed", done.stderr


def test_per_image_transient_search_is_exact(models: Models) -> None:
    """One transient flip on one image: the accuracy over all the data is computed from the struck image alone."""
    n = len(models.val[0])
    oracle = FaultOracle(models.planted, models.val, min_acc=0.5)
    floor = oracle.baseline - 0.5 / n  # any prediction lost fails
    result = search_faults(models.planted, models.val, site="act", min_acc=floor, max_flips=1, per_image=True,
                           layers="2", examples=100, seed=0)
    assert result.found, result.summary()
    (fault,) = result.faults
    assert fault.image is not None and result.confirmed > 0 and result.screened == 0
    assert result.accuracy == pytest.approx(oracle.baseline - 1 / n)
    assert accuracy(models.planted, models.val, faults=result.pattern) == pytest.approx(result.accuracy)


# -- no false failures ---------------------------------------------------------------------------------------------
def test_robust_model_reports_no_failure(models: Models) -> None:
    result = search_faults(models.robust, models.val, max_drop=0.3, max_flips=2, examples=200, seed=0)
    assert not result.found and result.faults == () and result.pattern is None
    assert result.screened >= 150  # (hypothesis does not re-run a pattern it has already seen)
    assert 0.0 < result.best_drop < 0.3
    assert "no failing pattern found" in result.summary()


def test_a_subset_failure_is_not_reported_unless_all_the_data_fails(models: Models) -> None:
    """A floor between a subset's fault-free accuracy and that of all the data: screening flags every candidate,
    confirmation on all the data rejects them all."""
    full = FaultOracle(models.robust, models.val, min_acc=0.5, subset=None)
    correct, n = full.clean_correct.float(), len(full.clean_correct)
    k = next(k for k in range(4, 64) if float(correct[subset_indices(n, k)].mean()) < full.baseline - 0.02)
    floor = (float(correct[subset_indices(n, k)].mean()) + full.baseline) / 2
    result = search_faults(models.robust, models.val, min_acc=floor, max_flips=1, bit_positions=[0], subset=k,
                           examples=30, seed=0)
    assert not result.found and result.confirmed > 0 and result.accuracy is None


# -- strategies: exact patterns, shrink order ------------------------------------------------------------------
def test_shrink_order_fewer_faults_then_lower_bits_layers_indices(models: Models) -> None:
    q = models.planted
    strategy = bit_flips(q, "weight", max_flips=4)
    assert find(strategy, lambda p: True, settings=QUIET).drawn == (Fault("weight", "0", 0, 0, "flip"),)
    assert find(strategy, lambda p: any(f.bit >= 5 for f in p.drawn), settings=QUIET).drawn == (
        Fault("weight", "0", 0, 5, "flip"),)
    assert find(strategy, lambda p: any(f.layer == "2" for f in p.drawn), settings=QUIET).drawn == (
        Fault("weight", "2", 0, 0, "flip"),)
    assert find(strategy, lambda p: any(f.index >= 100 for f in p.drawn), settings=QUIET).drawn == (
        Fault("weight", "0", 100, 0, "flip"),)
    two = find(strategy, lambda p: len(p) >= 2, settings=QUIET).drawn
    assert two == (Fault("weight", "0", 0, 0, "flip"), Fault("weight", "0", 1, 0, "flip"))


@settings(QUIET, max_examples=40)
@given(data=st.data())
def test_drawn_patterns_are_exact_and_valid(models: Models, data: st.DataObject) -> None:
    q = models.planted
    site = data.draw(st.sampled_from(["weight", "act", "input", "acc"]))
    per_image = site != "weight" and data.draw(st.booleans())
    pattern = data.draw(bit_flips(q, site, max_flips=3, images=5, per_image=per_image,
                                  bit_positions=[0, 7, 31] if site == "acc" else None))
    assert isinstance(pattern, DrawnPattern) and 1 <= len(pattern.drawn) <= 3
    keys = [(f.layer, f.index, f.image, f.bit) for f in pattern.drawn]
    assert len(set(keys)) == len(keys)  # distinct faults
    q.validate(pattern, 5)
    expected = len(pattern.drawn) * (5 if site != "weight" and not per_image else 1)
    assert len(pattern) == expected
    if per_image:
        assert all(f.image is not None and 0 <= f.image < 5 for f in pattern.drawn)
    rebuilt = eval(repr(pattern), {"Fault": Fault, "FaultPattern": FaultPattern, "pattern_of": pattern_of})
    assert sorted(rebuilt.to_list()) == sorted(pattern.to_list())


def test_pinned_transient_faults_strike_every_image(models: Models) -> None:
    q, (x, y) = models.planted, models.val
    fault = Fault("act", "0", 3, 6, "flip")
    pinned = pattern_of([fault], images=len(x))
    explicit = FaultPattern.from_faults([Fault("act", "0", 3, 6, "flip", image=i) for i in range(len(x))])
    assert sorted(pinned.to_list()) == sorted(explicit.to_list())
    assert accuracy(q, (x, y), faults=pinned) == accuracy(q, (x, y), faults=explicit)
    with pytest.raises(ValueError, match="every image"):
        pattern_of([fault])
    oracle = FaultOracle(q, (x, y), min_acc=0.5)
    assert oracle.faults_of(explicit) == (fault,)  # reported once, as a fault on every image
    assert oracle.faults_of(FaultPattern.from_faults([Fault("act", "0", 3, 6, "flip", image=2)])) == (
        Fault("act", "0", 3, 6, "flip", image=2),)
    assert not oracle.fails(())  # the empty pattern is the fault-free model


def test_stuck_at_and_bit_positions(models: Models) -> None:
    q = models.planted
    either = stuck_at(q, "weight", max_flips=2)
    assert find(either, lambda p: True, settings=QUIET).drawn == (Fault("weight", "0", 0, 0, "stuck0"),)
    assert find(either, lambda p: p.drawn[0].kind == "stuck1", settings=QUIET).drawn == (
        Fault("weight", "0", 0, 0, "stuck1"),)
    high = bit_flips(q, "weight", bit_positions=[7, 6], layers="2")
    assert find(high, lambda p: True, settings=QUIET).drawn == (Fault("weight", "2", 0, 6, "flip"),)


@pytest.mark.parametrize(("call", "match"), [
    (lambda q: bit_flips(q, "weight", max_flips=0), "max_flips"),
    (lambda q: bit_flips(q, "weight", bit_positions=[8]), "bit_positions"),
    (lambda q: bit_flips(q, "act"), "images=N"),
    (lambda q: bit_flips(q, "weight", per_image=True), "per_image"),
    (lambda q: bit_flips(q, "weight", layers="nope*"), "matched no quantized layer"),
    (lambda q: stuck_at(q, "weight", value=2), "value"),
])
def test_strategy_arguments_are_checked(models: Models, call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(models.planted)


# -- the report's numbers ------------------------------------------------------------------------------------------
def test_transient_fault_details_match_the_faulty_forward(models: Models) -> None:
    q, (x, _) = models.planted, models.val
    faults = (Fault("act", "0", 5, 6, "flip"), Fault("act", "0", 5, 1, "flip"), Fault("acc", "2", 2, 20, "flip"))
    seen: dict[str, torch.Tensor] = {}
    layer = q.layers["0"]
    handle = layer.module.register_forward_hook(lambda m, a, o: seen.__setitem__("act", layer.dequantize_output(o)))
    try:
        q(x[:1], pattern_of(faults[:2], images=1))
    finally:
        handle.remove()
    first, second, acc = describe_faults(q, faults, x)
    assert first.every_image and first.image == 0 and first.scale == q.layers["0"].act_scale
    assert second.code_before == first.code_after  # two faults on one code compose in order
    assert seen["act"][0, 5] == pytest.approx(second.value_after)
    assert acc.width == 32 and acc.scale == pytest.approx(float(q.layers["2"].acc_scale[2]))
    assert abs(acc.code_after - acc.code_before) == 2**20


# -- the database, the ci profile, the spec -------------------------------------------------------------------------
def test_database_replays_the_counterexample_first(models: Models, tmp_path) -> None:
    # derandomized (so that run 1 is the same search on every machine), with a database: settings allows the pair
    # when derandomize comes from a parent
    db = settings(settings(derandomize=True), deadline=None,
                  database=DirectoryBasedExampleDatabase(tmp_path / "examples"))
    key = search_database_key("test_x.py::test_y", SearchSpec(max_drop=MAX_DROP, max_flips=2), models.planted)
    first = search_faults(models.planted, models.val, max_drop=MAX_DROP, max_flips=2, settings=db, seed=None,
                          name="test_x.py::test_y")
    assert first.found and first.database_key == key
    again = search_faults(models.planted, models.val, max_drop=MAX_DROP, max_flips=2, settings=db, seed=None,
                          name="test_x.py::test_y")
    assert again.faults == first.faults
    assert again.screened <= 3 < first.screened  # replayed, not searched again


def test_ci_profile_is_deterministic_and_writes_no_database(models: Models, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ci = settings.get_profile("ci")
    runs = [search_faults(models.planted, models.val, max_drop=MAX_DROP, max_flips=2, settings=ci, seed=None)
            for _ in range(2)]
    assert runs[0].found and runs[0].faults == runs[1].faults and runs[0].screened == runs[1].screened
    assert not (tmp_path / ".hypothesis" / "examples").exists()  # (hypothesis may cache other things there)


def test_database_key_is_stable_and_names_the_question(models: Models) -> None:
    spec = SearchSpec(max_drop=0.2, max_flips=2)
    key = search_database_key("t.py::a", spec, models.planted)
    assert key == search_database_key("t.py::a", SearchSpec(max_drop=0.2, max_flips=2, examples=999, seed=4,
                                                            subset=8), models.planted)
    assert key != search_database_key("t.py::b", spec, models.planted)
    assert key != search_database_key("t.py::a", spec.with_overrides(site="act"), models.planted)
    assert key != search_database_key("t.py::a", spec, models.robust)  # another architecture


def test_marker_arguments_expand_and_are_checked() -> None:
    specs = expand_search({"search": ["weight", "act"], "max_flips": 2, "min_acc": 0.5, "examples": 50},
                          {"seed": 3, "budget": 64, "confidence": 0.95})
    assert [s.site for s in specs] == ["weight", "act"] and [s.label() for s in specs] == ["search-weight",
                                                                                          "search-act"]
    assert specs[0].seed == 3 and specs[0].examples == 50
    for kwargs, argument in [
        ({"search": "weight", "ber": 1e-3, "min_acc": 0.5}, "ber"),
        ({"search": "weights", "min_acc": 0.5}, "search"),
        ({"search": "weight"}, "min_acc"),
        ({"search": "weight", "min_acc": 0.5, "max_flips": 0}, "max_flips"),
        ({"search": "weight", "min_acc": 0.5, "bit_positions": [8]}, "bit_positions"),
        ({"search": "weight", "min_acc": 0.5, "per_image": True}, "per_image"),
        ({"search": "weight", "min_acc": 0.5, "subset": 0}, "subset"),
        ({"search": ["act", "act"], "min_acc": 0.5}, "search"),
    ]:
        with pytest.raises(SpecError) as info:
            expand_search(kwargs)
        assert info.value.argument == argument, kwargs
    assert SearchSpec(site="acc", min_acc=0.5, bit_positions=[31]).bit_positions == (31,)


def test_subset_is_spread_over_the_data() -> None:
    assert subset_indices(10, None) == list(range(10)) == subset_indices(10, 64)
    assert subset_indices(100, 5) == [0, 25, 50, 74, 99]


# -- a user's own @given test: oracle.check, the example database, in a fresh pytest process ---------------------
USER_TEST = '''
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
import pytest

torch.set_num_threads(1)  # a tiny model: one thread is fastest

from pytest_hwfault import quantize
from pytest_hwfault.search import FaultOracle
from pytest_hwfault.strategies import bit_flips
from helpers import digits, plant_dormant_units, train_mlp

x_train, y_train, x_val, y_val = digits()
QMODEL = quantize(plant_dormant_units(train_mlp(x_train, y_train, 16), x_train, 112), x_train[:512])
ORACLE = FaultOracle(QMODEL, (x_val, y_val), max_drop=0.2)  # once per module: no function-scoped fixtures
DB = settings(max_examples=500, deadline=None, database=DirectoryBasedExampleDatabase(".hypothesis/examples"))


@DB
@given(pattern=bit_flips(QMODEL, "weight", max_flips=2))
def test_no_two_flips_break_it(pattern):
    ORACLE.check(pattern)


@pytest.fixture(scope="module")
def oracle():
    return FaultOracle(QMODEL, (x_val, y_val), max_drop=0.2)


@DB
@given(data=st.data())
def test_with_a_module_fixture(oracle, data):
    oracle.check(data.draw(bit_flips(QMODEL, "weight", max_flips=2, layers="0", bit_positions=[7])))


def teardown_module():
    print(f"\\nSCREENED given={ORACLE.screened}")
'''


def test_a_rerun_replays_the_stored_counterexample_first(pytester: pytest.Pytester) -> None:
    import inspect

    # the subprocess trains the same models; it reads the digits from a file (importing scikit-learn takes seconds)
    torch.save(digits(), pytester.path / "digits.pt")
    header = ("from __future__ import annotations\nfrom collections.abc import Iterator\n"
              "from contextlib import contextmanager\nimport torch\nfrom torch import nn\n\n\n"
              "def digits():\n    return torch.load('digits.pt')\n\n\n")
    helpers = "\n\n".join(inspect.getsource(f) for f in (one_thread, train_mlp, plant_dormant_units))
    pytester.makepyfile(helpers=header + helpers, test_user=textwrap.dedent(USER_TEST))

    def run() -> tuple[pytest.RunResult, int, str]:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
        result.assert_outcomes(failed=2)
        out = result.stdout.str()
        count = int(out.split("SCREENED given=")[1].split()[0])
        replay = re.findall(r"pattern = (FaultPattern\.from_faults\(.*\))", out)
        return result, count, replay[0]

    first, count1, replay1 = run()
    assert (pytester.path / ".hypothesis" / "examples").is_dir()  # stored under the test's directory
    out = first.stdout.str()
    for piece in ("FaultSearchFailure", "7 (sign)", "-1 -> 127", "pattern = FaultPattern.from_faults([Fault(",
                  "pattern=FaultPattern.from_faults([Fault('weight', '0', "):  # hypothesis's failing example
        assert piece in out, piece
    second, count2, replay2 = run()
    assert replay2 == replay1  # the same minimal pattern ...
    assert count2 <= 3 < count1  # ... replayed from the database, not searched for again


class _ReadsTheBatch(nn.Module):
    """`how`: each input centred on its batch's mean (an image reads the others), or dropout left on."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "batch mean":
            x = x - 0.5 * x.mean(0, keepdim=True)
        h = torch.relu(self.fc(x))
        return self.head(nn.functional.dropout(h, 0.5, training=True) if self.how == "dropout" else h)


@pytest.mark.parametrize(("how", "message"), [("batch mean", "depends on the other images in its batch"),
                                              ("dropout", "not repeatable")])
def test_the_oracle_refuses_what_a_campaign_refuses(how: str, message: str) -> None:
    """A pattern is screened on a subset and confirmed on every image: with a forward that moves by itself or images
    that read each other, the two disagree, and a drop would be the model's own doing. Refused as campaigns are."""
    from pytest_hwfault.evaluate import EvaluationError

    with torch.random.fork_rng():
        torch.manual_seed(6)
        x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
        model = _ReadsTheBatch(how).eval()
    qmodel = quantize(model, x)
    with pytest.raises(EvaluationError, match=message):
        FaultOracle(qmodel, (x, y), min_acc=0.0)
    model.how = "none"
    FaultOracle(quantize(model, x), (x, y), min_acc=0.0)
