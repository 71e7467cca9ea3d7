"""Fault injection through the quantized view, end to end: exact deltas, an integer reference model as the oracle,
replay, campaigns that leave every model as they found it, and the evaluation helpers."""

from __future__ import annotations

import copy
import functools
import json
import math
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_requantized, input_codes, integer_acc, oracle, seeded, watch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytest_hwfault.data import DataError, as_tensors
from pytest_hwfault.evaluate import accuracy, predict
from pytest_hwfault.faults import Fault, FaultModel, FaultPattern, Site, sample_pattern, trial_generator
from pytest_hwfault.inject import Edit, apply_edit, apply_edit_to, code_dtype, compose, compose_canonical
from pytest_hwfault.layout import channels_last_strides, contiguous_strides, is_dense, place, relayout
from pytest_hwfault.quantization import QuantizedModel, quantize, state_checksum

SITES = ("act", "weight", "acc", "input")
TORCH_PROPERTY = settings(max_examples=60, deadline=None)


pytestmark = pytest.mark.usefixtures("single_threaded")  # tiny tensors: one thread is fastest


def f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _target(qmodel: QuantizedModel, site: str, layer: str):
    return next(t for t in qmodel.targets(Site(site)) if t.layer == layer)


def _ber_for(qmodel: QuantizedModel, site: str, n_images: int, faults: float) -> float:
    targets = qmodel.targets(Site(site))
    n_bits = sum(t.numel * t.bits for t in targets) * (n_images if Site(site).transient else 1)
    return min(1.0, faults / n_bits)


# -- single-layer models with an integer reference -------------------------------------------------------------------
@functools.cache
def single(kind: str, bits: int) -> tuple[QuantizedModel, torch.Tensor, nn.Module]:
    """A one-layer model "0" (its output IS the act site) with bias and per-channel scales that differ; 4 inputs;
    and the user's model (left as it was)."""
    with seeded(100 + bits):
        if kind == "linear":
            layer: nn.Module = nn.Linear(8, 6)
            calibration, x = torch.randn(64, 8) * 2, torch.randn(4, 8) * 2
        elif kind == "conv":
            layer = nn.Conv2d(2, 3, 3, padding=1)
            calibration, x = torch.randn(32, 2, 5, 5), torch.randn(4, 2, 5, 5)
        elif kind == "conv1d":
            layer = nn.Conv1d(3, 4, 3, stride=2)
            calibration, x = torch.randn(32, 3, 9), torch.randn(4, 3, 9)
        else:
            layer = nn.Conv3d(2, 3, 2, padding=1)
            calibration, x = torch.randn(16, 2, 3, 3, 3), torch.randn(4, 2, 3, 3, 3)
        with torch.no_grad():
            out = layer.weight.shape[0]
            layer.weight.mul_(torch.arange(1.0, out + 1).reshape(-1, *([1] * (layer.weight.dim() - 1))))
    model = nn.Sequential(layer).eval()
    return quantize(model, calibration, bits=bits), x, model


@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d", "conv3d"])
@pytest.mark.parametrize("bits", [4, 8, 12])
def test_fault_free_output_matches_the_integer_reference(kind: str, bits: int) -> None:
    qmodel, x, model = single(kind, bits)
    acc, slack = integer_acc(model, qmodel, "0", input_codes(qmodel.layers["0"], x))
    assert_requantized(qmodel, "0", qmodel(x), acc, slack)


@TORCH_PROPERTY
@given(
    kind=st.sampled_from(["linear", "conv", "conv1d", "conv3d"]),
    bits=st.sampled_from([4, 8]),
    site=st.sampled_from(["acc", "input", "weight"]),
    data=st.data(),
)
def test_one_fault_matches_the_integer_reference(kind: str, bits: int, site: str, data) -> None:
    """Differential test: the engine against an integer model of the layer with the fault applied by the oracle."""
    qmodel, x, model = single(kind, bits)
    layer = qmodel.layers["0"]
    target = _target(qmodel, site, "0")
    index = data.draw(st.integers(0, target.numel - 1), label="index")
    bit = data.draw(st.integers(0, target.bits - 1), label="bit")
    fault_kind = data.draw(st.sampled_from(["flip", "stuck0", "stuck1"]), label="kind")
    image = None if site == "weight" else data.draw(st.integers(0, len(x) - 1), label="image")
    out = qmodel(x, faults=FaultPattern.from_faults([Fault(site, "0", index, bit, fault_kind, image)]))

    in_codes = input_codes(layer, x)
    weight_codes = layer.weight_codes.to(torch.int64).clone()
    if site == "input":
        flat = in_codes[image].view(-1)
        flat[index] = oracle(int(flat[index]), bit, fault_kind, bits)
    elif site == "weight":
        flat = weight_codes.view(-1)
        flat[index] = oracle(int(flat[index]), bit, fault_kind, bits)
    acc, slack = integer_acc(model, qmodel, "0", in_codes, weight_codes)
    if site == "acc":
        flat = acc[image].view(-1)
        flat[index] = oracle(int(flat[index]), bit, fault_kind, 32)
    assert_requantized(qmodel, "0", out, acc, slack)


@settings(max_examples=120, deadline=None)
@given(
    width=st.integers(2, 16),
    kind=st.sampled_from(["linear", "conv", "conv1d", "conv3d"]),
    data=st.data(),
)
def test_one_act_flip_moves_the_value_by_the_twos_complement_delta_times_scale(width: int, kind: str, data) -> None:
    qmodel, x, _ = single(kind, width)
    layer = qmodel.layers["0"]
    per_image = math.prod(layer.output_shape)
    image = data.draw(st.integers(0, len(x) - 1), label="image")
    index = data.draw(st.integers(0, per_image - 1), label="index")
    bit = data.draw(st.integers(0, width - 1), label="bit")
    clean = qmodel(x)
    faulted = qmodel(x, faults=FaultPattern.from_faults([("act", "0", index, bit, "flip", image)]))
    scale = layer.act_scale
    value = clean[image].reshape(-1)[index]
    code = int(torch.round(value / scale))
    assert abs(code) <= layer.qmax
    magnitude = 2**bit
    was_set = (code % 2**width) // magnitude % 2 == 1
    delta = (magnitude if was_set else -magnitude) if bit == width - 1 else (-magnitude if was_set else magnitude)
    new_value = faulted[image].reshape(-1)[index]
    assert torch.equal(new_value, f32(code + delta) * f32(scale))  # exactly the new code x scale, in float32
    assert int(torch.round(new_value / scale)) - code == delta
    # and as floats: the difference is delta x scale up to the float32 rounding of the two products
    eps = torch.finfo(torch.float32).eps * (abs(float(value)) + abs(float(new_value)))
    assert float(new_value.double() - value.double()) == pytest.approx(delta * scale, rel=1e-6, abs=eps)
    # nothing else moved
    changed = (faulted != clean).reshape(len(x), -1)
    assert changed.sum() == 1 and bool(changed[image, index])


# -- the same properties on a multi-layer model ----------------------------------------------------------------------
def _draw_fault(qmodel: QuantizedModel, data, sites=SITES, kinds=("flip",), n_images: int = 8) -> Fault:
    site = data.draw(st.sampled_from(sites), label="site")
    layer = data.draw(st.sampled_from(list(qmodel.layers)), label="layer")
    target = _target(qmodel, site, layer)
    index = data.draw(st.integers(0, target.numel - 1), label="index")
    bit = data.draw(st.integers(0, target.bits - 1), label="bit")
    kind = data.draw(st.sampled_from(kinds), label="kind")
    image = None if site == "weight" else data.draw(st.integers(0, n_images - 1), label="image")
    return Fault(site, layer, index, bit, kind, image)


@TORCH_PROPERTY
@given(which=st.sampled_from(["mlp", "cnn"]), data=st.data())
def test_a_fault_listed_twice_flips_back(which: str, data, q_mlp, q_cnn, digits) -> None:
    qmodel = q_mlp if which == "mlp" else q_cnn
    x = digits.x_test[:8]
    fault = _draw_fault(qmodel, data)
    clean = qmodel(x)
    twice = qmodel(x, faults=FaultPattern.from_faults([fault, fault]))
    assert torch.equal(twice, clean), fault


@settings(max_examples=30, deadline=None)
@given(which=st.sampled_from(["mlp", "cnn"]), data=st.data())
def test_stuck_at_applied_twice_equals_once(which: str, data, q_mlp, q_cnn, digits) -> None:
    qmodel = q_mlp if which == "mlp" else q_cnn
    x = digits.x_test[:8]
    fault = _draw_fault(qmodel, data, kinds=("stuck0", "stuck1"))
    once = qmodel(x, faults=FaultPattern.from_faults([fault]))
    twice = qmodel(x, faults=FaultPattern.from_faults([fault, fault]))
    assert torch.equal(once, twice), fault


@TORCH_PROPERTY
@given(which=st.sampled_from(["mlp", "cnn"]), data=st.data())
def test_faulted_layer_matches_the_oracle(which: str, data, q_mlp, q_cnn, trained_mlp, trained_cnn,
                                          noisy_digits) -> None:
    """Differential test on models with several layers (BN folded; a layer that reads its producer's codes):
    an act fault leaves the oracle's code x act scale at its position and nothing else; an input or weight
    fault gives the layer output of the integer reference fed the oracle's code."""
    qmodel, model = (q_mlp, trained_mlp) if which == "mlp" else (q_cnn, trained_cnn)
    x = noisy_digits[:8]
    fault = _draw_fault(qmodel, data, sites=("act", "input", "weight"), kinds=("flip", "stuck0", "stuck1"))
    layer = qmodel.layers[fault.layer]
    pattern = FaultPattern.from_faults([fault])
    with watch(qmodel, fault.layer) as clean:
        qmodel(x)
    with watch(qmodel, fault.layer) as faulted:
        qmodel(x, faults=pattern)
    assert torch.equal(faulted["raw"], clean["raw"])  # nothing upstream of the layer moved
    if fault.site == "act":
        before = clean["out"].reshape(len(x), -1)
        after = faulted["out"].reshape(len(x), -1).clone()
        code = int(torch.round(before[fault.image, fault.index] / layer.act_scale))
        assert abs(code) <= layer.qmax
        expected = f32(oracle(code, fault.bit, fault.kind, layer.bits)) * f32(layer.act_scale)
        assert torch.equal(after[fault.image, fault.index], expected)
        after[fault.image, fault.index] = before[fault.image, fault.index]
        assert torch.equal(after, before)
        return
    in_codes = input_codes(layer, clean["raw"])
    weight_codes = layer.weight_codes.to(torch.int64).clone()
    if fault.site == "input":
        flat = in_codes[fault.image].view(-1)
    else:
        flat = weight_codes.view(-1)
    flat[fault.index] = oracle(int(flat[fault.index]), fault.bit, fault.kind, layer.bits)
    acc, slack = integer_acc(model, qmodel, fault.layer, in_codes, weight_codes)
    assert_requantized(qmodel, fault.layer, faulted["out"], acc, slack)
    if fault.site == "weight":  # and the weight is back afterwards
        with watch(qmodel, fault.layer) as again:
            qmodel(x)
        assert torch.equal(again["out"], clean["out"])


@pytest.mark.parametrize("site", SITES)
def test_a_single_high_bit_fault_changes_the_output_at_every_site(site: str, q_cnn, digits) -> None:
    # the counterpart of the "listed twice" property: one fault alone is not a no-op
    x = digits.x_test[:8]
    target = _target(q_cnn, site, "1")
    fault = Fault(site, "1", target.numel // 2 + 3, target.bits - 2, "flip", None if site == "weight" else 2)
    assert not torch.equal(q_cnn(x, faults=FaultPattern.from_faults([fault])), q_cnn(x))


@pytest.mark.parametrize("site", ["act", "weight"])
def test_faults_on_one_code_apply_in_the_order_listed(site: str) -> None:
    qmodel, x, _ = single("linear", 8)
    image = None if site == "weight" else 1
    bit = 6

    def run(*kinds: str) -> torch.Tensor:
        return qmodel(x, faults=FaultPattern.from_faults([(site, "0", 4, bit, k, image) for k in kinds]))

    assert torch.equal(run("stuck1", "flip"), run("stuck0"))
    assert torch.equal(run("flip", "stuck1"), run("stuck1"))
    assert torch.equal(run("stuck0", "flip", "flip"), run("stuck0"))
    assert torch.equal(run("flip", "stuck0", "stuck1"), run("stuck1"))
    assert not torch.equal(run("stuck0"), run("stuck1"))


# -- memory layout ---------------------------------------------------------------------------------------------------
@st.composite
def _laid_out_codes(draw):  # noqa: ANN001, ANN202
    """Integer codes of a random shape, stored in a random dimension order (dense, usually not contiguous)."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=5)))
    order = draw(st.permutations(range(len(shape))))
    with seeded(draw(st.integers(0, 2**16))):
        codes = torch.randint(-127, 128, shape).float()
    laid_out = codes.permute(*order).contiguous().permute(*sorted(range(len(shape)), key=order.__getitem__))
    assert torch.equal(laid_out, codes)
    return codes, laid_out


@settings(max_examples=150, deadline=None)
@given(case=_laid_out_codes(), data=st.data())
def test_an_edit_lands_on_the_same_elements_in_every_memory_layout(case, data) -> None:
    codes, laid_out = case
    n = codes.numel()
    linear = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=min(n, 6), unique=True)))
    bit = torch.tensor(data.draw(st.lists(st.integers(0, 7), min_size=len(linear), max_size=len(linear))))
    kind = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=len(linear), max_size=len(linear))))
    edit = compose(linear, bit, kind, torch.ones(len(linear)))
    expected = codes.clone()
    apply_edit(expected.view(-1), edit, 8)
    # positions in row-major order (no layout given): mapped to the tensor's layout when applied
    got = apply_edit_to(laid_out.clone(), edit, 8)
    assert torch.equal(got, expected)
    # positions already in the tensor's layout, as `prepare` gives them after a forward pass
    shape, strides = tuple(codes.shape), laid_out.stride()
    placed = Edit(relayout(edit.linear, shape, contiguous_strides(shape), strides), edit.keep, edit.set, edit.flip,
                  edit.scale, strides=strides)
    target = laid_out.clone(memory_format=torch.preserve_format)
    assert apply_edit_to(target, placed, 8) is target and target.stride() == strides  # edited where it lies
    assert torch.equal(target, expected)
    # a layout other than the one the positions were placed in, and a tensor that is not dense
    assert torch.equal(apply_edit_to(codes.clone(), placed, 8), expected)
    for positions in (placed, edit):
        wide = torch.zeros(*shape[:-1], 2 * shape[-1])
        wide[..., ::2] = codes
        gappy = wide[..., ::2]  # every other element of its memory
        assert is_dense(shape, gappy.stride()) == (n == 1)
        assert torch.equal(apply_edit_to(gappy, positions, 8), expected)


@pytest.mark.parametrize("site", SITES)
def test_results_do_not_depend_on_the_memory_layout_or_code_passing(site: str, trained_cnn, digits) -> None:
    x = digits.x_test[:48]
    options = {"preserve": {"memory_format": "preserve"}, "channels_last": {"memory_format": "channels_last"},
               "values": {"memory_format": "channels_last", "pass_codes": False}}
    views = {name: quantize(trained_cnn, digits.x_train[:512], **kwargs) for name, kwargs in options.items()}
    ber = _ber_for(views["preserve"], site, len(x), faults=300)
    patterns = [sample_pattern(FaultModel(site, ber), views["preserve"].targets(Site(site)), len(x),
                               trial_generator(4, site, t)) for t in range(3)]
    # the first pattern runs before any forward pass (no layout seen yet), the others after one
    runs = {name: [qmodel(x, faults=p) for p in patterns] + [qmodel(x)] for name, qmodel in views.items()}
    for name in ("channels_last", "values"):
        for a, b in zip(runs["preserve"], runs[name]):
            assert torch.equal(a, b)
    assert not torch.equal(runs["preserve"][0], runs["preserve"][-1])
    seen = {name: qmodel._runtime.strides[(Site.ACT, "1")] for name, qmodel in views.items()}
    assert seen == {"preserve": (8 * 64, 64, 8, 1), "channels_last": (8 * 64, 1, 8 * 8, 8),
                    "values": (8 * 64, 1, 8 * 8, 8)}
    # conv "1" feeds only (through ReLU, max-pooling and a flatten) linear "6", which reads its codes
    handing_on = {name: [n for n, layer in qmodel.layers.items() if layer.hands_on_codes]
                  for name, qmodel in views.items()}
    assert handing_on == {"preserve": ["1"], "channels_last": ["1"], "values": []}
    assert views["preserve"].layers["6"].reads_codes and not views["values"].layers["6"].reads_codes


class Transposed(nn.Module):
    """A Linear reading a transposed tensor (dense, neither row-major nor channels-last), or, with `contiguous`
    set, a row-major copy of it: the same values."""

    def __init__(self) -> None:
        super().__init__()
        self.contiguous = False
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, 8, 8).transpose(1, 2)
        h = torch.relu(self.fc1(h.contiguous() if self.contiguous else h))
        return self.fc2(h.flatten(1))


@pytest.mark.parametrize("site", ["input", "act", "acc"])
def test_faults_land_on_the_same_elements_of_a_transposed_tensor(site: str, digits) -> None:
    with seeded(22):
        qmodel = quantize(Transposed().eval(), digits.x_train[:256])
    x = digits.x_test[:32]
    ber = _ber_for(qmodel, site, len(x), faults=400)
    pattern = sample_pattern(FaultModel(site, ber), qmodel.targets(Site(site)), len(x), trial_generator(5, site, 0))

    def run(contiguous: bool) -> torch.Tensor:
        qmodel.module.contiguous = contiguous  # the view's private copy: read at every forward
        return qmodel(x, faults=pattern)

    first = run(False)  # no layout recorded yet: the hook maps the positions
    assert qmodel._runtime.strides[(Site.INPUT, "fc1")] == (64, 1, 8)
    assert torch.equal(run(False), first)  # positions prepared in the recorded transposed layout
    assert torch.equal(run(True), first)  # prepared for the transposed layout, applied to a row-major tensor
    assert qmodel._runtime.strides[(Site.INPUT, "fc1")] == (64, 8, 1)
    assert torch.equal(run(True), first)
    assert not torch.equal(first, qmodel(x))


class Branching(nn.Module):
    """One conv's codes read by two convs (which hand on values: a concatenation follows them)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.left, self.right = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.stem(x.reshape(-1, 1, 8, 8))), 2)
        both = torch.cat([self.left(h), self.right(h)], 1)
        return self.head(both.flatten(1))


@pytest.mark.parametrize("site", SITES)
def test_a_layer_reading_shared_codes_edits_its_own_copy(site: str, digits) -> None:
    with seeded(21):
        model = Branching().eval()
    x = digits.x_test[:32]
    views = {passing: quantize(model, digits.x_train[:256], pass_codes=passing) for passing in (True, False)}
    layers = views[True].layers
    assert layers["stem"].hands_on_codes and layers["left"].reads_codes and layers["right"].reads_codes
    assert not any(layer.hands_on_codes for name, layer in layers.items() if name != "stem")
    image, high = (None if site == "weight" else 3), (24 if site == "acc" else 6)
    # an input fault of "left" must not reach "right", which reads the same codes
    pattern = FaultPattern.from_faults([(site, "left", 5, high, "flip", image),
                                        (site, "stem", 9, high + 1, "flip", image)])
    outputs = {passing: qmodel(x, faults=pattern) for passing, qmodel in views.items()}
    assert torch.equal(outputs[True], outputs[False])
    assert not torch.equal(outputs[True], views[True](x))
    assert torch.equal(views[True](x), views[False](x))


# -- replay ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", SITES)
def test_exported_patterns_replay_bit_exactly(site: str, q_cnn, digits) -> None:
    x, y = digits.x_test[:64], digits.y_test[:64]
    ber = _ber_for(q_cnn, site, len(x), faults=200)
    pattern = sample_pattern(FaultModel(site, ber), q_cnn.targets(Site(site)), len(x), trial_generator(9, site, 0))
    assert len(pattern) > 50
    logits = q_cnn(x, faults=pattern)
    assert not torch.equal(logits, q_cnn(x))
    replays = [
        FaultPattern.from_json(json.loads(json.dumps(pattern.to_json()))),
        FaultPattern.from_faults(pattern.to_list()),
        FaultPattern.from_faults(tuple(f) for f in pattern.to_json()),
    ]
    reference = predict(q_cnn, x, pattern, batch_size=64)
    for replay in replays:
        assert replay.to_json() == pattern.to_json()
        assert torch.equal(q_cnn(x, faults=replay), logits)
        again = predict(q_cnn, x, replay, batch_size=13)  # other batch boundaries: images keep their faults
        assert torch.equal(again.predicted, reference.predicted)
        assert accuracy(q_cnn, (x, y), replay) == accuracy(q_cnn, (x, y), pattern)


def test_image_offset_places_a_batch_in_the_pattern(q_cnn, digits) -> None:
    x = digits.x_test[:64]
    pattern = sample_pattern(FaultModel("act", 3e-3), q_cnn.targets(Site.ACT), 64, torch.Generator().manual_seed(5))
    full = q_cnn(x, faults=pattern)
    for start in (0, 16, 40):
        part = q_cnn(x[start : start + 16], faults=pattern, image_offset=start)
        assert torch.equal(part, full[start : start + 16])
    assert not torch.equal(q_cnn(x[16:32], faults=pattern), full[16:32])  # offset 0 reads other images' faults


@pytest.mark.parametrize("site", ["act", "acc", "input"])
def test_each_image_gets_its_own_faults(site: str, q_cnn, digits) -> None:
    x = digits.x_test[:64]
    ber = _ber_for(q_cnn, site, 64, faults=64 * 12)
    pattern = sample_pattern(FaultModel(site, ber), q_cnn.targets(Site(site)), 64, torch.Generator().manual_seed(6))
    assert pattern.images_with_faults().tolist() == list(range(64))
    per_image = Counter(f.image for f in pattern.to_list())
    assert len(set(per_image.values())) > 4
    positions = {}
    for f in pattern.to_list():
        positions.setdefault(f.image, set()).add((f.layer, f.index, f.bit))
    assert len({frozenset(p) for p in positions.values()}) == 64
    clean, full = q_cnn(x), q_cnn(x, faults=pattern)
    for k in (0, 31, 63):
        alone = FaultPattern.from_faults([f for f in pattern.to_list() if f.image == k])
        out = q_cnn(x, faults=alone)
        assert torch.equal(out[k], full[k])
        others = torch.arange(64) != k
        assert torch.equal(out[others], clean[others])


# -- campaigns leave every model as they found it --------------------------------------------------------------------
def _hooks(model: nn.Module) -> list[str]:
    return [
        f"{name or '<root>'}.{attr}"
        for name, m in model.named_modules()
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        if getattr(m, attr, None)
    ]


@pytest.fixture
def campaign_model(digits_cnn, digits):
    """A user model left in training mode with trainable parameters, and its quantized view."""
    user = digits_cnn.train()
    for p in user.parameters():
        p.requires_grad_(True)
    before = state_checksum(user)
    qmodel = quantize(user, digits.x_train[:512])
    assert state_checksum(user) == before
    return user, qmodel


def _hook_counts(model: nn.Module) -> dict[str, int]:
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.named_modules()}


def _assert_user_model_untouched(user: nn.Module, checksum: str) -> None:
    assert state_checksum(user) == checksum
    assert _hooks(user) == []
    assert all(m.training for m in user.modules())
    assert all(p.requires_grad for p in user.parameters())


def test_a_campaign_at_every_site_leaves_both_models_as_they_were(campaign_model, digits) -> None:
    user, qmodel = campaign_model
    user_sum, view_sum = state_checksum(user), state_checksum(qmodel.module)
    view_hooks = _hook_counts(qmodel.module)
    x, y = digits.x_test[:96], digits.y_test[:96]
    clean = qmodel(x)
    clean_accuracy = accuracy(qmodel, (x, y))
    hurt = False
    for site in SITES:
        ber = _ber_for(qmodel, site, len(x), faults=150)
        model = FaultModel(site, ber)
        for trial in range(3):
            pattern = sample_pattern(model, qmodel.targets(Site(site)), len(x), trial_generator(1, site, trial))
            assert len(pattern) > 0
            outcome = predict(qmodel, x, pattern, batch_size=40)
            qmodel(x, faults=pattern)
            hurt |= accuracy(qmodel, (x, y), model, seed=trial, batch_size=32) < clean_accuracy
            assert outcome.predicted.shape == (len(x),)
            assert state_checksum(qmodel.module) == view_sum, (site, trial)
            assert state_checksum(user) == user_sum
    assert hurt  # the campaign did inject something
    assert torch.equal(qmodel(x), clean)
    assert accuracy(qmodel, (x, y)) == clean_accuracy
    _assert_user_model_untouched(user, user_sum)
    assert _hook_counts(qmodel.module) == view_hooks  # no hook piles up on the view either


def _weight_pattern(qmodel: QuantizedModel, seed: int = 3) -> FaultPattern:
    ber = _ber_for(qmodel, "weight", 1, faults=100)
    generator = torch.Generator().manual_seed(seed)
    return sample_pattern(FaultModel("weight", ber), qmodel.targets(Site.WEIGHT), 1, generator)


def test_weights_are_restored_when_the_block_raises(campaign_model, digits) -> None:
    user, qmodel = campaign_model
    user_sum, view_sum = state_checksum(user), state_checksum(qmodel.module)
    x = digits.x_test[:32]
    clean = qmodel(x)
    pattern = _weight_pattern(qmodel)
    with pytest.raises(RuntimeError, match="mid-trial"):
        with qmodel.weight_faults(pattern):
            assert state_checksum(qmodel.module) != view_sum  # the faults are really in the weights
            assert not torch.equal(qmodel(x), clean)
            raise RuntimeError("mid-trial")
    assert state_checksum(qmodel.module) == view_sum
    assert torch.equal(qmodel(x), clean)
    _assert_user_model_untouched(user, user_sum)


def test_weights_are_restored_when_the_forward_raises(campaign_model, digits) -> None:
    user, qmodel = campaign_model
    user_sum, view_sum = state_checksum(user), state_checksum(qmodel.module)
    x = digits.x_test[:32]
    clean = qmodel(x)
    wrong = torch.randn(4, 65)  # the model expects 64 features
    weights = _weight_pattern(qmodel)
    mixed = FaultPattern.from_faults(weights.to_list() + [Fault("act", "1", 5, 6, "flip", 0)])
    for pattern in (weights, mixed):
        with pytest.raises(RuntimeError):
            qmodel(wrong, faults=pattern)
        assert state_checksum(qmodel.module) == view_sum
        with pytest.raises(RuntimeError):
            predict(qmodel, wrong, pattern)
        assert state_checksum(qmodel.module) == view_sum
        assert torch.equal(qmodel(x), clean)  # nor are transient faults left armed
    _assert_user_model_untouched(user, user_sum)


def test_weights_are_restored_when_a_pattern_does_not_fit(campaign_model, digits) -> None:
    user, qmodel = campaign_model
    view_sum = state_checksum(qmodel.module)
    x = digits.x_test[:32]
    clean = qmodel(x)
    n_weights = _target(qmodel, "weight", "6").numel
    # the first layer's faults are applied before the second layer's out-of-range index is found
    bad = FaultPattern.from_faults([("weight", "1", 0, 7, "flip"), ("weight", "1", 5, 6, "flip"),
                                    ("weight", "6", n_weights, 0, "flip")])
    with pytest.raises(IndexError, match=rf"fault index {n_weights} is out of range"):
        with qmodel.weight_faults(bad):
            pass
    assert state_checksum(qmodel.module) == view_sum
    n_act = _target(qmodel, "act", "1").numel
    late = FaultPattern.from_faults(_weight_pattern(qmodel).to_list() + [("act", "1", n_act, 0, "flip", 0)])
    with pytest.raises(IndexError, match=r"out of range for site 'act' of layer '1'"):
        qmodel(x, faults=late)
    assert state_checksum(qmodel.module) == view_sum
    assert torch.equal(qmodel(x), clean)


def test_predict_validates_a_pattern_against_the_model(q_cnn, digits) -> None:
    x = digits.x_test[:10]
    n_act = _target(q_cnn, "act", "6").numel
    cases = [
        ([("act", "6", n_act, 0, "flip", 0)], IndexError, rf"fault index {n_act} is out of range for site 'act'"),
        ([("act", "6", 0, 8, "flip", 0)], ValueError, r"bit 8 does not exist in the 8-bit act codes of layer '6'"),
        ([("acc", "6", 0, 32, "flip", 0)], ValueError, r"bit 32 does not exist in the 32-bit acc codes"),
        ([("weight", "1", 0, 8, "flip")], ValueError, r"bit 8 does not exist in the 8-bit weight codes"),
        ([("input", "6", 0, 0, "flip", 10)], IndexError, r"fault on image 10 but only 10 images are evaluated"),
        ([("act", "nope", 0, 0, "flip", 0)], KeyError, r"'nope' is not a quantized layer"),
    ]
    for faults, error, message in cases:
        with pytest.raises(error, match=message):
            predict(q_cnn, x, FaultPattern.from_faults(faults))


# -- saturation and non-finite logits --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv", "conv3d"])
def test_high_accumulator_bits_saturate_at_requantization(kind: str) -> None:
    qmodel, x, model = single(kind, 8)
    layer = qmodel.layers["0"]
    top = layer.qmax * layer.act_scale
    acc, _ = integer_acc(model, qmodel, "0", input_codes(layer, x))
    per_image = math.prod(layer.output_shape)
    for bit in (24, 30, 31):
        for index in (0, per_image // 2, per_image - 1):
            out = qmodel(x, faults=FaultPattern.from_faults([("acc", "0", index, bit, "flip", 1)]))
            assert float(out.abs().max()) <= top * (1 + 1e-6)
            value = out[1].reshape(-1)[index]
            code = int(acc[1].reshape(-1)[index])
            sign = 1 if oracle(code, bit, "flip", 32) > code else -1
            assert torch.equal(value, f32(sign * layer.qmax) * f32(layer.act_scale)), (bit, index)
    # a dense rain of high-bit faults: every output stays in range and finite
    pattern = sample_pattern(FaultModel("acc", 0.3, bit_positions=tuple(range(24, 32))), qmodel.targets(Site.ACC),
                             len(x), torch.Generator().manual_seed(0))
    out = qmodel(x, faults=pattern)
    assert torch.isfinite(out).all() and float(out.abs().max()) <= top * (1 + 1e-6)
    assert float(out.abs().max()) == pytest.approx(top, rel=1e-6)


class LogHead(nn.Module):
    """A float op after the last quantized layer: log(0) = -inf, log(negative) = nan."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def test_non_finite_logits_count_as_misclassified() -> None:
    with seeded(30):
        linear = nn.Linear(4, 3)
        with torch.no_grad():
            linear.weight.mul_(0.1)
            linear.bias.fill_(5.0)
        model = nn.Sequential(linear, LogHead())
        x = torch.randn(8, 4)
    qmodel = quantize(model, x)
    clean = qmodel(x)
    assert torch.isfinite(clean).all()
    labels = clean.argmax(1)
    assert accuracy(qmodel, (x, labels)) == 1.0
    zero_code = [("act", "0", 0, b, "stuck0", 3) for b in range(8)]  # image 3: code 0 -> log(0) = -inf
    negative = [("act", "0", 1, 7, "flip", 5)]  # image 5: sign bit -> log(negative) = nan
    pattern = FaultPattern.from_faults(zero_code + negative)
    logits = qmodel(x, faults=pattern)
    assert torch.isneginf(logits[3, 0]) and torch.isnan(logits[5, 1])
    outcome = predict(qmodel, x, pattern)
    assert outcome.nonfinite.tolist() == [i in (3, 5) for i in range(8)]
    assert outcome.predicted[3] == -1 and outcome.predicted[5] == -1
    keep = torch.tensor([i not in (3, 5) for i in range(8)])
    assert torch.equal(outcome.predicted[keep], labels[keep])
    assert accuracy(qmodel, (x, labels), pattern) == 6 / 8
    assert outcome.correct(labels).tolist() == keep.tolist()


# -- evaluation helpers ----------------------------------------------------------------------------------------------
def test_accuracy_accepts_every_data_form_alike(q_mlp, digits) -> None:
    x, y = digits.x_test[:200], digits.y_test[:200]
    dataset = TensorDataset(x, y)
    forms = [(x, y), [x, y], dataset, DataLoader(dataset, batch_size=32, shuffle=False)]
    model = FaultModel("act", 2e-3)
    for faults in (None, model):
        values = [accuracy(q_mlp, form, faults, seed=4) for form in forms]
        assert len(set(values)) == 1, values
    assert 0.85 < accuracy(q_mlp, (x, y)) <= 1.0
    assert accuracy(q_mlp, (x, y), samples=50) == float((q_mlp(x[:50]).argmax(1) == y[:50]).float().mean())


def test_a_shuffling_data_loader_is_rejected(q_mlp, digits) -> None:
    loader = DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=32, shuffle=True)
    with pytest.raises(DataError, match=r"shuffle=True.*fixed image order"):
        accuracy(q_mlp, loader)
    with pytest.raises(DataError, match="needs labels"):
        accuracy(q_mlp, digits.x_test)
    with pytest.raises(DataError, match="different lengths"):
        accuracy(q_mlp, (digits.x_test, digits.y_test[:-1]))
    assert issubclass(DataError, TypeError)


class _Augmenting(torch.utils.data.Dataset):
    """Items with noise from the global generator: a training-time transform handed to a gate."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, noise: float) -> None:
        self.x, self.y, self.noise = x, y, noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + self.noise * torch.rand_like(self.x[i]), self.y[i]


def test_data_that_reads_differently_twice_is_refused(q_mlp, digits) -> None:
    # A random transform in the data gated one draw of images, different in every run: under -n 0 it passed, under
    # -n 2 each shard read its own draw and the campaign was invalid. Both now refuse it before any trial.
    x, y = digits.x_test[:300], digits.y_test[:300]
    for data in (_Augmenting(x, y, 0.3), DataLoader(_Augmenting(x, y, 0.3), batch_size=64)):
        with pytest.raises(DataError, match=r"different images when read twice.*pass them as tensors"):
            accuracy(q_mlp, data)
    # the same data without noise is read as tensors (equal to the tensors themselves), NaN inputs included
    assert accuracy(q_mlp, _Augmenting(x, y, 0.0)) == accuracy(q_mlp, (x, y))
    holed = x.clone()
    holed[1, 3] = float("nan")
    inputs, labels = as_tensors(_Augmenting(holed, y, 0.0))
    assert torch.equal(inputs.nan_to_num(), holed.nan_to_num()) and torch.equal(labels, y)
    # a stream that can be read once (an IterableDataset that does not restart) is read once, as before the check

    class Once(torch.utils.data.IterableDataset):
        def __init__(self) -> None:
            self.read = False

        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            if self.read:
                return iter(())
            self.read = True
            return iter(zip(x, y))

    inputs, labels = as_tensors(DataLoader(Once(), batch_size=64))
    assert torch.equal(inputs, x) and torch.equal(labels, y)


def test_accuracy_is_deterministic_in_its_seed(q_mlp, digits) -> None:
    data = (digits.x_test, digits.y_test)
    model = FaultModel("weight", 2e-3)
    first = [accuracy(q_mlp, data, model, seed=s) for s in range(5)]
    again = [accuracy(q_mlp, data, model, seed=s) for s in range(5)]
    assert first == again
    assert len(set(first)) > 1  # the seed picks the faults
    assert min(first) < accuracy(q_mlp, data)
    targets = q_mlp.targets(Site.WEIGHT)
    p1 = sample_pattern(model, targets, 1, trial_generator(0, "c", 1))
    p2 = sample_pattern(model, targets, 1, trial_generator(0, "c", 1))
    p3 = sample_pattern(model, targets, 1, trial_generator(0, "c", 2))
    assert p1.to_json() == p2.to_json() != p3.to_json()


def test_a_root_module_layer_can_be_faulted() -> None:
    with seeded(31):
        model = nn.Linear(5, 4)
        x = torch.randn(6, 5)
    qmodel = quantize(model, x)
    assert list(qmodel.layers) == [""]
    clean = qmodel(x)
    out = qmodel(x, faults=FaultPattern.from_faults([("act", "", 2, 6, "flip", 4)]))
    assert (out != clean).sum() == 1 and out[4, 2] != clean[4, 2]
    keep = copy.deepcopy(model.state_dict())
    accuracy(qmodel, (x, clean.argmax(1)), FaultModel("weight", 0.05), seed=1)
    assert all(torch.equal(v, keep[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("layer", ["1", "6"])
def test_accumulator_bits_flipped_twice_restore_the_output_exactly(layer: str, q_cnn, digits) -> None:
    # the int32 accumulator of hardware is restored exactly by a second flip, high bits included; the float
    # reconstruction of the accumulator must not leave a rounding residue that moves an output code
    x = digits.x_test[:8]
    clean = q_cnn(x)
    numel = _target(q_cnn, "acc", layer).numel
    faults = [Fault("acc", layer, index, bit, "flip", image)
              for bit in range(32) for image in range(8) for index in range(image, numel, max(1, numel // 12))]
    pattern = FaultPattern.from_faults(faults + faults)
    assert torch.equal(q_cnn(x, faults=pattern), clean)
    for bit in (20, 26, 29, 30, 31):
        one = [f for f in faults if f.bit == bit]
        assert torch.equal(q_cnn(x, faults=FaultPattern.from_faults(one + one)), clean), bit


def test_a_parametrized_weight_is_quantized_and_faulted_or_refused() -> None:
    # weight_norm computes `weight` from two parametrization tensors at every call: writing into `module.weight`
    # changes nothing that lasts. The engine must then either refuse the model clearly or still quantize and
    # fault what the layer really uses; never silently run float weights with no-op weight faults.
    from torch.nn.utils.parametrizations import weight_norm

    with seeded(32):
        model = nn.Sequential(weight_norm(nn.Linear(8, 6)), nn.ReLU(), nn.Linear(6, 3)).eval()
        x = torch.randn(32, 8)
    try:
        qmodel = quantize(model, x)
    except (ValueError, TypeError, NotImplementedError) as error:
        assert "parametriz" in str(error).lower()
        return
    with torch.no_grad():
        reference = model(x)
    clean = qmodel(x)
    assert (clean - reference).abs().max() < 0.05 * reference.abs().max()
    n = _target(qmodel, "weight", "0").numel
    sign_bits = FaultPattern.from_faults([("weight", "0", i, 7, "flip") for i in range(n)])
    assert not torch.equal(qmodel(x, faults=sign_bits), clean), f"{n} sign-bit weight faults changed nothing"


# -- composing faults: the fast path for sorted patterns and the general one agree with plain integer arithmetic ----
def _reference_codes(codes: list[int], faults: list[tuple[int, int, int]], bits: int = 8) -> list[int]:
    """Each fault (position, bit, kind) applied in list order to the raw two's-complement bits, in Python ints."""
    raw = [c & ((1 << bits) - 1) for c in codes]
    for position, bit, kind in faults:
        if kind == 0:
            raw[position] ^= 1 << bit
        elif kind == 1:
            raw[position] &= ~(1 << bit)
        else:
            raw[position] |= 1 << bit
    return [r - (1 << bits) if r >> (bits - 1) else r for r in raw]


@settings(max_examples=200, deadline=None)
@given(codes=st.lists(st.integers(-128, 127), min_size=1, max_size=12), data=st.data())
def test_composed_edits_equal_faults_applied_one_by_one(codes: list[int], data) -> None:
    n = len(codes)
    faults = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7), st.integers(0, 2)), min_size=1,
                                max_size=24))
    if data.draw(st.booleans()):  # as sample_pattern hands them over: sorted by code, list order kept per code
        faults = sorted(faults, key=lambda f: f[0])
    expected = _reference_codes(codes, faults)
    linear, bit, kind = (torch.tensor([f[i] for f in faults]) for i in range(3))
    edit = compose(linear, bit, kind, torch.ones(len(faults)))
    got = torch.tensor(codes, dtype=torch.float32)
    apply_edit(got, edit, 8)
    assert got.to(torch.int64).tolist() == expected
    assert edit.linear.tolist() == sorted(set(linear.tolist()))


@settings(max_examples=200, deadline=None)
@given(codes=st.lists(st.integers(-128, 127), min_size=1, max_size=12), kind=st.integers(0, 2), data=st.data())
def test_canonical_edits_equal_faults_applied_one_by_one(codes: list[int], kind: int, data) -> None:
    """compose_canonical (sorted, distinct (code, bit), one kind: what sampling gives) against Python ints and
    against the general compose."""
    n = len(codes)
    pairs = sorted(data.draw(st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=30)))
    faults = [(position, bit, kind) for position, bit in pairs]
    linear, bit = torch.tensor([p for p, _ in pairs]), torch.tensor([b for _, b in pairs])
    edit = compose_canonical(linear, bit, kind, torch.tensor(1.0))
    got = torch.tensor(codes, dtype=torch.float32)
    apply_edit(got, edit, 8)
    assert got.to(torch.int64).tolist() == _reference_codes(codes, faults)
    general = torch.tensor(codes, dtype=torch.float32)
    apply_edit(general, compose(linear, bit, torch.full_like(bit, kind), torch.ones(len(bit))), 8)
    assert torch.equal(got, general)
    assert edit.linear.tolist() == sorted({p for p, _ in pairs})


@settings(max_examples=300, deadline=None)
@given(bits=st.sampled_from([2, 4, 7, 8, 12, 16, 24, 32]), signed=st.booleans(), unit=st.booleans(),
       canonical=st.booleans(), data=st.data())
def test_apply_edit_equals_integer_arithmetic_at_every_width(bits: int, signed: bool, unit: bool, canonical: bool,
                                                              data) -> None:
    """apply_edit's int32/int64 arithmetic (two-op sign extension, zero point added and taken off) against Python
    ints: codes stored signed, or unsigned with a zero point; values held as codes or as code x scale; masks in
    the dtype the hook works in or not."""
    width = 1 << bits
    # the stored code is code + zero (two's complement when signed: int8 codes with a zero point, as ONNX s8 has)
    zero = data.draw(st.integers(-(width >> 1), (width >> 1) - 1) if signed else st.integers(0, width - 1))
    low, high = (-(width >> 1) - zero, (width >> 1) - 1 - zero) if signed else (-zero, width - 1 - zero)
    codes = data.draw(st.lists(st.integers(low, high), min_size=1, max_size=10))
    n = len(codes)
    if canonical:
        kind = data.draw(st.integers(0, 2))
        pairs = sorted(data.draw(st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, bits - 1)), min_size=1,
                                         max_size=20)))
        faults = [(position, bit, kind) for position, bit in pairs]
        dtype = data.draw(st.sampled_from([torch.int64, code_dtype(bits)]))
        edit = compose_canonical(torch.tensor([p for p, _ in pairs]), torch.tensor([b for _, b in pairs]), kind,
                                 1.0, dtype)
    else:
        faults = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, bits - 1), st.integers(0, 2)),
                                    min_size=1, max_size=20))
        linear, bit, kind_ = (torch.tensor([f[i] for f in faults]) for i in range(3))
        edit = compose(linear, bit, kind_, 1.0)
    raw = [(code + zero) & (width - 1) for code in codes]  # the stored bits (two's complement if signed)
    for position, bit, kind in faults:
        raw[position] = raw[position] ^ (1 << bit) if kind == 0 else \
            raw[position] & ~(1 << bit) if kind == 1 else raw[position] | (1 << bit)
    expected = [(r - width if signed and r >> (bits - 1) else r) - zero for r in raw]
    dtype = torch.float64 if bits > 16 else torch.float32  # codes a float32 holds exactly up to 2^24
    if unit:
        got = torch.tensor(codes, dtype=dtype)
    else:
        scale = data.draw(st.floats(2.0**-10, 4.0, width=32))
        edit.scale = torch.tensor(scale, dtype=dtype)
        got = torch.tensor(codes, dtype=dtype) * edit.scale
    apply_edit(got, edit, bits, zero, signed)
    assert (got if unit else (got / edit.scale).round()).to(torch.int64).tolist() == expected


@settings(max_examples=150, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 6), st.integers(1, 6)),
       data=st.data())
def test_placing_positions_in_a_channels_last_tensor_matches_relayout(shape: tuple[int, ...], data) -> None:
    """layout.place (scalar arithmetic, shifts for powers of two) against the general per-dimension relayout."""
    numel = math.prod(shape)
    positions = torch.tensor(sorted(data.draw(st.sets(st.integers(0, numel - 1), min_size=1, max_size=40))))
    for layout in (channels_last_strides(shape), contiguous_strides(shape), (1, shape[0], shape[0] * shape[1],
                                                                               shape[0] * shape[1] * shape[2])):
        expected = relayout(positions, shape, contiguous_strides(shape), layout)
        assert torch.equal(place(positions.clone(), shape, layout), expected), layout


class _OddConv(nn.Module):
    """Channel counts and spatial sizes that are not powers of two, and one that is."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 8, 3), nn.Conv2d(8, 3, 1)
        self.fc = nn.Linear(3 * 4 * 4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c(F.relu(self.b(F.relu(self.a(x))))).flatten(1))


@pytest.mark.parametrize("memory_format", ["preserve", "channels_last"])
def test_per_tensor_prepare_equals_the_all_layer_path(memory_format: str, monkeypatch) -> None:
    """At a high BER `prepare` composes each tensor on its own (`_prepare_per_tensor`); below
    PER_TENSOR_FAULTS per tensor it takes one pass over all layers. Both give the same logits at every transient
    site and kind, whole and in batches that start mid-pattern."""
    import pytest_hwfault.qmodel as qmodel_module

    with seeded(3):
        model, x = _OddConv().eval(), torch.randn(10, 3, 6, 6)
    qmodel = quantize(model, x, memory_format=memory_format)
    for site in ("act", "acc", "input"):
        for kind in ("flip", "stuck0", "stuck1"):
            pattern = sample_pattern(FaultModel(site, 0.02, kind=kind), qmodel.targets(Site(site)), len(x),
                                     trial_generator(4, f"{site}-{kind}", 0))
            assert all(group.canonical for group in pattern.groups.values())
            outputs = []
            for threshold in (0, 10**9):  # per tensor, all layers at once
                monkeypatch.setattr(qmodel_module, "PER_TENSOR_FAULTS", threshold)
                outputs.append(torch.cat([qmodel(x, pattern)] + [qmodel(x[s:s + 4], pattern, s) for s in (0, 4, 8)]))
            assert torch.equal(outputs[0], outputs[1]), (site, kind)
            assert not torch.equal(outputs[0][:10], qmodel(x)), (site, kind)  # the faults bite
