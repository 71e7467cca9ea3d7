"""Mitigations (issue 18) against exact references: SECDED against a real extended-Hamming codec and plain integers,
range restriction's bounds, protection's cost from the layers' shapes, paired draws, silent vs detected."""

from __future__ import annotations

import importlib.util
import subprocess
from typing import Any

import pytest
import torch
from conftest import one_thread
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_hwfault import quantize
from pytest_hwfault import report as rp
from pytest_hwfault.campaign import Campaign
from pytest_hwfault.faults import FaultPattern, Site
from pytest_hwfault.mitigation import (
    CORRECTED,
    DETECTED,
    SILENT,
    Mitigation,
    MitigationError,
    read_word,
    secded,
    secded_check_bits,
)
from pytest_hwfault.spec import CampaignSpec, SpecError, expand

pytestmark = pytest.mark.usefixtures("single_threaded")


# -- a real SECDED codec (extended Hamming), plain integers ---------------------------------------------------
def _hamming_positions(data_bits: int) -> list[int]:
    """Codeword positions (1-based, powers of two are check bits) of the data bits, in order."""
    positions, p = [], 1
    while len(positions) < data_bits:
        if p & (p - 1):
            positions.append(p)
        p += 1
    return positions


def encode(data: list[int]) -> list[int]:
    """Codeword bits [overall parity, c1, c2, d, c4, ...] of data bits (least significant first)."""
    positions = _hamming_positions(len(data))
    n = positions[-1]
    word = [0] * (n + 1)
    for bit, p in zip(data, positions):
        word[p] = bit
    r = 1
    while r <= n:
        word[r] = sum(word[i] for i in range(1, n + 1) if i & r and i != r) % 2
        r <<= 1
    word[0] = sum(word[1:]) % 2
    return word


def decode(word: list[int], data_bits: int) -> tuple[str, list[int]]:
    """("ok" | "corrected" | "detected", data bits) as a SECDED decoder reads them."""
    word = list(word)
    n = len(word) - 1
    syndrome = 0
    for i in range(1, n + 1):
        if word[i]:
            syndrome ^= i
    parity = sum(word) % 2
    status = "ok"
    if syndrome and parity:
        if syndrome <= n:
            word[syndrome] ^= 1
        status = "corrected"
    elif syndrome and not parity:
        status = "detected"
    elif parity:  # only the overall parity bit flipped
        status = "corrected"
    return status, [word[p] for p in _hamming_positions(data_bits)]


def _bits_of(codes: list[int], bits: int) -> list[int]:
    return [(c >> b) & 1 for c in codes for b in range(bits)]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.data())
def test_read_word_matches_a_real_secded_decoder(data: st.DataObject) -> None:
    """One faulty bit reads back corrected, two are detected; three or more, which the simulator keeps as silent
    corruption, never read back as the stored data without a flag from the real decoder either."""
    bits = data.draw(st.sampled_from([4, 8]))
    per_word = data.draw(st.sampled_from([1, 2, 4, 8]))
    codes = data.draw(st.lists(st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1), min_size=per_word,
                               max_size=per_word))
    flipped = data.draw(st.sets(st.integers(0, bits * per_word - 1), min_size=1, max_size=5))
    faults = [(position // bits, position % bits, "flip") for position in sorted(flipped)]
    outcome, back = read_word(codes, faults, bits)
    stored = _bits_of(codes, bits)
    codeword = encode(stored)
    for position in flipped:
        codeword[_hamming_positions(len(stored))[position]] ^= 1
    status, read = decode(codeword, len(stored))
    if len(flipped) == 1:
        assert outcome == CORRECTED and status == "corrected" and read == stored and back == codes
    elif len(flipped) == 2:
        assert outcome == DETECTED and status == "detected"
    else:
        assert outcome == SILENT and not (status in ("ok", "corrected") and read == stored)
        assert back != codes


def test_secded_check_bits() -> None:
    assert [secded_check_bits(k) for k in (8, 16, 32, 64, 128)] == [5, 6, 7, 8, 9]
    assert len(encode([0] * 64)) == 72 and len(encode([0] * 32)) == 39


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.data())
def test_secded_on_patterns_equals_the_word_by_word_reference(data: st.DataObject) -> None:
    """The vectorised filter of a trial's weight faults agrees word by word with `read_word` (plain integers),
    stuck-at faults (an error only where the stored bit differs) and several faults on one code included."""
    bits = data.draw(st.sampled_from([4, 8]))
    word_bits = bits * data.draw(st.sampled_from([1, 2, 8]))
    per_word = word_bits // bits
    numel = data.draw(st.integers(1, 24))
    codes = data.draw(st.lists(st.integers(-(1 << (bits - 1)) + 1, (1 << (bits - 1)) - 1), min_size=numel,
                               max_size=numel))
    faults = data.draw(st.lists(st.tuples(st.integers(0, numel - 1), st.integers(0, bits - 1),
                                          st.sampled_from(["flip", "stuck0", "stuck1"])), min_size=1, max_size=12))
    pattern = FaultPattern.from_faults(("weight", "w", i, b, k) for i, b, k in faults)
    result = secded(pattern, lambda _: torch.tensor(codes), lambda _: bits, word_bits)
    outcomes: dict[str, int] = {}
    expected_back = list(codes)
    for word in range(0, numel, per_word):
        mine = [(i - word, b, k) for i, b, k in faults if word <= i < word + per_word]
        outcome, back = read_word(codes[word:word + per_word], mine, bits)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        expected_back[word:word + per_word] = back
    assert (result.corrected_words, result.detected_words, result.silent_words) == (
        outcomes.get(CORRECTED, 0), outcomes.get(DETECTED, 0), outcomes.get(SILENT, 0))
    # what gets through, applied to the stored codes, is what the memory reads back (detected words: faulty)
    read = list(codes)
    for fault in result.pattern.faults():
        raw = read[fault.index] & ((1 << bits) - 1)
        mask = 1 << fault.bit
        raw = raw ^ mask if fault.kind == "flip" else raw & ~mask if fault.kind == "stuck0" else raw | mask
        read[fault.index] = raw - (1 << bits) if raw >= 1 << (bits - 1) else raw
    assert read == expected_back


# -- a small ReLU CNN on the digits ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(digits: Any) -> tuple[Any, torch.Tensor, torch.Tensor, nn.Module]:
    with torch.random.fork_rng(), one_thread():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(8 * 16, 10))
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(net(digits.x_train), digits.y_train).backward()
            opt.step()
    net.eval()
    return quantize(net, digits.x_train[:256]), digits.x_test[:300], digits.y_test[:300], net


def _run(setup: Any, **spec: Any) -> Any:
    qmodel, x, y, _ = setup
    arguments = {"site": "act", "ber": 3e-3, "min_acc": 0.0, "budget": 8, "first": 8, **spec}
    return Campaign(qmodel, x, y, CampaignSpec(**arguments), "tests::mitigation").run()


def test_ecc_on_a_real_model_corrects_one_bit_and_detects_two(setup: Any) -> None:
    qmodel, x, y, _ = setup
    spec = CampaignSpec(site="weight", ber=1e-4, min_acc=0.0, ecc="secded")
    mitigation = Mitigation(qmodel, x, spec)
    codes = qmodel.layers["3"].weight_codes.reshape(-1)
    one = FaultPattern.from_faults([("weight", "3", 9, 7, "flip")])  # code 9: the second word's second code
    applied = mitigation.apply(one)
    assert not applied.detected and applied.corrected == 1 and len(applied.pattern) == 0
    two = FaultPattern.from_faults([("weight", "3", 8, 0, "flip"), ("weight", "3", 15, 6, "flip")])  # one word
    assert mitigation.apply(two).detected
    apart = FaultPattern.from_faults([("weight", "3", 7, 0, "flip"), ("weight", "3", 8, 0, "flip")])  # two words
    applied = mitigation.apply(apart)
    assert not applied.detected and applied.corrected == 2
    # a stuck-at that matches the stored bit is no error: with a flip in the same word, that is one error
    bit = next(b for b in range(8) if not (int(codes[8]) & 0xFF) >> b & 1)  # a bit of code 8 that holds 0 ...
    same = FaultPattern.from_faults([("weight", "3", 8, bit, "stuck0"), ("weight", "3", 10, 3, "flip")])
    applied = mitigation.apply(same)
    assert not applied.detected and len(applied.pattern) == 0
    # the model reads back its fault-free weights: predictions are the fault-free ones
    golden = qmodel(x).argmax(1)
    assert torch.equal(qmodel(x, faults=mitigation.apply(one).pattern).argmax(1), golden)


def test_a_detected_word_makes_every_image_of_its_trial_a_due(setup: Any) -> None:
    result = _run(setup, site="weight", ber=2e-3, ecc="secded", budget=8, first=8)
    trials = list(result.trials.values())
    due = [t for t in trials if t.detected == t.images]
    assert due and all(t.correct == 0 and t.silent == 0 for t in due)
    record = rp.campaign_record(result, "tests::ecc")
    assert record["detected"] == sum(t.detected for t in trials)
    assert record["silent"] == sum(t.silent for t in trials)
    assert record["mitigation"]["cost"]["ecc"] == {"scheme": "secded", "word_bits": 64, "check_bits": 8,
                                                   "memory_overhead": 0.125}
    message = rp.failure_message(record, "pytest x")
    assert "silent/DUE" in message and "detected unrecoverable" in message and "secded64" in message


def _output_codes(qmodel: Any) -> tuple[dict[str, list[torch.Tensor]], list[Any]]:
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [layer.module.register_forward_hook(
        lambda module, args, out, name=name: seen.setdefault(name, []).append(out.clone()))
        for name, layer in qmodel.layers.items()]
    return seen, handles


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.data())
def test_a_range_restricted_activation_never_exceeds_its_bounds(setup: Any, data: st.DataObject) -> None:
    qmodel, x, _, _ = setup
    images = x[:6]
    bounds = qmodel.output_ranges(images)
    faults = data.draw(st.lists(st.tuples(st.sampled_from(["1", "3", "7"]), st.integers(0, 511),
                                          st.integers(0, 7), st.integers(0, 5),
                                          st.sampled_from(["flip", "stuck0", "stuck1"])), min_size=1, max_size=20))
    site = data.draw(st.sampled_from(["act", "acc", "input"]))
    distinct = {(layer, index % qmodel.layers[layer].numel(Site(site)), bit, image): kind
                for layer, index, bit, image, kind in faults}  # one fault per bit
    pattern = FaultPattern.from_faults((site, layer, index, bit, kind, image)
                                       for (layer, index, bit, image), kind in distinct.items())
    seen, handles = _output_codes(qmodel)
    try:
        with qmodel.restricted(bounds):
            qmodel(images, faults=pattern)
    finally:
        for handle in handles:
            handle.remove()
    for name, (low, high) in bounds.items():
        out = seen[name][0]
        assert bool((out >= low).all()) and bool((out <= high).all()), name
        # the bounds are what the layer handed on without faults, per output channel
        assert low.numel() == qmodel.layers[name].output_shape[qmodel.layers[name].channel_axis]


def test_range_restriction_changes_no_fault_free_value_and_helps_under_act_faults(setup: Any) -> None:
    qmodel, x, _, _ = setup
    bounds = qmodel.output_ranges(x)
    with qmodel.restricted(bounds):
        restricted = qmodel(x)
    assert torch.equal(restricted, qmodel(x))
    plain = _run(setup, budget=16, first=16)
    ranger = _run(setup, budget=16, first=16, mitigation="range_restriction")
    # paired: the same faults, trial by trial; the unmitigated numbers are those of the plain campaign
    assert [t.unmitigated_correct for t in ranger.trials.values()] == [t.correct for t in plain.trials.values()]
    assert [t.faults for t in ranger.trials.values()] == [t.faults for t in plain.trials.values()]
    assert ranger.outcome().accuracy > plain.outcome().accuracy
    assert sum(t.correct >= u.correct for t, u in zip(ranger.trials.values(), plain.trials.values())) >= 15
    record = rp.campaign_record(ranger, "tests::ranger")
    assert record["mitigation"]["unmitigated_accuracy"] == plain.outcome().accuracy
    assert record["mitigation"]["name"] == "range_restriction"
    assert "vs unmitigated" in rp.failure_message(record, "pytest x")


def test_protecting_layers_drops_their_faults_and_costs_what_their_shapes_say(setup: Any) -> None:
    qmodel, *_ = setup
    everything = _run(setup, protect="*")
    assert all(t.correct == round(everything.quantized_accuracy * t.images) for t in everything.trials.values())
    assert all(t.corrected == t.faults for t in everything.trials.values())
    cost = rp.campaign_record(everything, "t")["mitigation"]["cost"]["protect"]
    assert cost["weight_bits"] == 1.0 and cost["extra_macs"] == 2.0
    one = _run(setup, protect=["3"])
    assert all(t.layer_faults.get("3", 0) == 0 for t in one.trials.values())
    # plain integer arithmetic from the architecture: conv 8->8 3x3 on 8x8, conv 1->8 3x3, linear 128->10
    weight_bits = {"1": 1 * 8 * 9 * 8, "3": 8 * 8 * 9 * 8, "7": 128 * 10 * 8}
    macs = {"1": 8 * 64 * 9, "3": 8 * 64 * 72, "7": 10 * 128}
    cost = one.mitigation["cost"]["protect"]
    assert cost["protected_weight_bits"] == weight_bits["3"]
    assert cost["weight_bits"] == weight_bits["3"] / sum(weight_bits.values())
    assert cost["extra_macs"] == 2 * macs["3"] / sum(macs.values())
    assert {row["name"]: (row["weight_bits"], row["macs"]) for row in qmodel.summary()} == {
        n: (weight_bits[n], macs[n]) for n in weight_bits}
    with pytest.raises(MitigationError, match="'nope' matches no quantized layer"):
        _run(setup, protect=["nope"])


def test_silent_and_detected_split_the_changed_predictions(setup: Any) -> None:
    result = _run(setup, ber=1e-2)
    for t in result.trials.values():
        assert t.detected == t.nonfinite and t.silent == t.critical - t.nonfinite
    record = rp.campaign_record(result, "t")
    assert record["silent"] > 0 and record["detected"] == record["nonfinite"] and record["mitigation"] is None


def test_mitigation_arguments_are_validated_and_ids_of_unmitigated_campaigns_unchanged() -> None:
    bad = [({"mitigation": "ranger"}, "mitigation", "allowed: 'range_restriction'"),
           ({"mitigation": ["range_restriction", "range_restriction"]}, "mitigation", "repeats"),
           ({"ecc": "hamming"}, "ecc", "allowed: 'secded'"),
           ({"ecc": "secded", "site": "act"}, "ecc", "protects weight memory"),
           ({"ecc": "secded", "site": "weight", "ecc_word_bits": 60}, "ecc_word_bits", "multiple of the 8-bit"),
           ({"ecc_word_bits": 32, "site": "weight"}, "ecc_word_bits", "ecc='secded' only"),
           ({"protect": []}, "protect", "layer-name glob"),
           ({"protect": ["a"], "site": "pe", "array": (4, 4)}, "protect", "systolic array")]
    for extra, argument, message in bad:
        with pytest.raises(SpecError, match=message) as error:
            expand({"ber": 1e-3, "site": "act", "min_acc": 0.5, **extra})
        assert error.value.argument == argument
    plain = CampaignSpec(site="act", ber=1e-5, min_acc=0.8)
    assert set(plain.to_dict()) & {"mitigation", "ecc", "ecc_word_bits", "protect"} == set()
    # the id as the plugin computed it before mitigations existed (c2bf17b's spec.py)
    old = subprocess.run(["git", "show", "c2bf17b:pytest_hwfault/spec.py"], capture_output=True, text=True,
                         cwd=__import__("pathlib").Path(__file__).parents[1])
    if old.returncode == 0:
        module_spec = importlib.util.spec_from_loader("old_spec", loader=None)
        assert module_spec is not None
        module = importlib.util.module_from_spec(module_spec)
        import sys
        sys.modules["old_spec"] = module
        try:
            exec(compile(old.stdout, "old_spec", "exec"), module.__dict__)
            assert module.CampaignSpec(site="act", ber=1e-5, min_acc=0.8).campaign_id("t.py::a") == \
                plain.campaign_id("t.py::a")
        finally:
            del sys.modules["old_spec"]
    mitigated = plain.with_overrides(mitigation="range_restriction")
    assert mitigated.campaign_id("t") != plain.campaign_id("t") and mitigated.draw_id("t") == plain.campaign_id("t")
    assert mitigated.label() == "act-ber1e-05-range_restriction"
    assert CampaignSpec.from_dict(mitigated.to_dict()) == mitigated


def test_protecting_part_of_a_tied_weight_is_refused() -> None:
    """Two layers read one stored weight: protecting one of them at site weight would drop the faults the other
    still meets (the faults are listed under the first). Refused, naming the group; the whole group is accepted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    model[2].weight = model[0].weight
    x = torch.randn(64, 16)
    qmodel = quantize(model, x)
    assert qmodel.layers["0"].weight_group == ("0", "2")
    for protect in (["0"], ["2"]):
        spec = CampaignSpec(site="weight", ber=1e-3, min_acc=0.0, budget=2, protect=protect)
        with pytest.raises(MitigationError, match=r"shares its stored weight with \['(0|2)'\] \(tied weights"):
            Mitigation(qmodel, x, spec)
    both = Mitigation(qmodel, x, CampaignSpec(site="weight", ber=1e-3, min_acc=0.0, budget=2, protect=["0", "2"]))
    stored = 16 * 16 * 8  # once, not once per reader
    assert both.cost["protect"]["protected_weight_bits"] == stored
    assert both.cost["protect"]["weight_bits"] == stored / (stored + 16 * 4 * 8)
    Mitigation(qmodel, x, CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=2, protect=["0"]))
