"""A PT2E model as it is deployed on an x86 CPU: ``torch.compile`` with freezing lowers each conv/linear onto oneDNN's
int8 kernels (X86InductorQuantizer's purpose). Given the compiled model, the engine computes what those kernels
compute, bit for bit, checked here against the compiled model itself."""

from __future__ import annotations

import copy
import struct
from collections.abc import Iterator
from fractions import Fraction

import pytest
import torch
from deployed_models import images, to_pt2e, trained_resnet_style
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_hwfault import FaultModel, FaultPattern, quantize
from pytest_hwfault.deployed import KernelSum, fused_multiply_add
from pytest_hwfault.faults import sample_pattern

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def freezing() -> Iterator[None]:
    """Inductor's freezing, as torchao's X86InductorQuantizer recipe sets it, for this module's compiled models."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        yield


@pytest.fixture(scope="module")
def pt2e_model(digits):  # noqa: ANN001, ANN201
    return to_pt2e(trained_resnet_style(digits), images(digits.x_train[:512]))


@pytest.fixture(scope="module")
def compiled(pt2e_model, freezing):  # noqa: ANN001, ANN201
    # static shapes: torch 2.14's dynamic-batch recompile of a quantized conv fails its own stride check
    return torch.compile(pt2e_model, dynamic=False)


@pytest.fixture(scope="module")
def inductor_qmodel(compiled, digits, freezing):  # noqa: ANN001, ANN201
    return quantize(compiled, images(digits.x_train[:256]))


def test_compiled_pt2e_model_is_reproduced_bit_for_bit(compiled, inductor_qmodel, pt2e_model, digits,
                                                       freezing) -> None:  # noqa: ANN001
    x = images(digits.x_test)
    qmodel = inductor_qmodel
    assert qmodel.config["source"] == "pt2e" and qmodel.config["compiled"] == []
    # every layer scaled in oneDNN's steps (the input scale first; 1 / output scale last, none for a float result)
    for name, layer in qmodel.layers.items():
        assert layer.step_scales is not None and layer.step_scales[0] == layer.input_scale, name
        assert (layer.step_scales[1] == 1.0) == layer.float_output, name
    # the residual sums Inductor fuses into their convolutions (oneDNN's sum post-op)
    sums = [m for m in qmodel.module.modules() if isinstance(m, KernelSum)]
    assert len(sums) == 2 and all(m.relu for m in sums)
    notes = qmodel.config["deployed_notes"]
    assert "fault-free outputs equal bit for bit" in notes[0], notes
    # and part by part against the graph Inductor compiled: each layer computes the graph's sum (oneDNN's float32
    # steps around the exact integer sum round near-ties otherwise than the graph's float32 sum, and only those)
    assert notes[1].startswith("checked part by part against the graph") and "every part computes" in notes[1]
    # and the view's data flow: every part's input, each part's output and each fused sum's (the reader's stand-in
    # for Inductor's lowering) replaced by the graph's, is the graph's; none left out after a fused sum
    assert notes[1].endswith("each part's input, computed by the view from the graph's outputs of the parts before "
                             "it, is the graph's (9 parts)"), notes[1]
    assert qmodel.config["view_mismatch"] == []
    assert not any("computes each conv/linear in float32" in note for note in notes)
    with torch.no_grad():
        theirs = compiled(x)
    assert torch.equal(qmodel(x), theirs)
    # the graph's own arithmetic (the converted model read as it is) is another function: measured 92.5% of these
    # logits equal to the compiled model's, 36% to the graph's
    graph_view = quantize(pt2e_model, images(digits.x_train[:256]))
    assert not torch.equal(graph_view(x), theirs)


def test_compiled_pt2e_weight_fault_matches_the_recompiled_faulty_model(pt2e_model, inductor_qmodel, digits,
                                                                        freezing) -> None:  # noqa: ANN001
    """A flipped weight bit of the convolution that carries a fused residual sum: the engine under that fault equals
    the compiled model whose int8 weight constant holds the flipped code."""
    x = images(digits.x_test[:64])
    layer, index, bit = "block1.conv2", 1000, 6
    faulty = copy.deepcopy(pt2e_model)
    target = next(str(node.args[1].args[0].target) for node in faulty.graph.nodes  # the layer's int8 constant
                  if node.op == "call_function" and "conv" in str(node.target)
                  and list((node.meta.get("nn_module_stack") or {}).values())[-1][0] == layer)
    codes = getattr(faulty, target)
    codes.view(torch.uint8).view(-1)[index] ^= 1 << bit
    with torch.no_grad():
        theirs = torch.compile(faulty, dynamic=False)(x)
        clean = inductor_qmodel(x)
    ours = inductor_qmodel(x, FaultPattern.from_faults([("weight", layer, index, bit, "flip")]))
    assert not torch.equal(theirs, clean)
    assert torch.equal(ours, theirs)


def test_compiled_pt2e_weight_trial_matches_the_recompiled_faulty_model(pt2e_model, inductor_qmodel, digits,
                                                                        freezing) -> None:  # noqa: ANN001
    """A whole trial of weight faults (BER 1e-3, every conv and the linear head): the engine under those faults
    equals the compiled model whose int8 weight constants hold the flipped codes, recompiled."""
    x = images(digits.x_test[:64])
    fault_model = FaultModel("weight", 1e-3)
    pattern = sample_pattern(fault_model, inductor_qmodel.targets(fault_model.site), len(x),
                             torch.Generator().manual_seed(4))
    faulty = copy.deepcopy(pt2e_model)
    constants = {list((node.meta.get("nn_module_stack") or {}).values())[-1][0]: str(node.args[1].args[0].target)
                 for node in faulty.graph.nodes if node.op == "call_function"
                 and ("conv" in str(node.target) or "linear" in str(node.target))}
    assert len(pattern.groups) >= 4
    for (_, layer), group in pattern.groups.items():
        flat = getattr(faulty, constants[layer]).view(torch.uint8).view(-1)  # int8 two's complement codes
        for index, bit in zip(group.index.tolist(), group.bit.tolist()):
            flat[index] ^= 1 << bit
    with torch.no_grad():
        theirs = torch.compile(faulty, dynamic=False)(x)
    ours = inductor_qmodel(x, pattern)
    assert (ours != inductor_qmodel(x)).float().mean() > 0.5
    assert torch.equal(ours, theirs)


def test_compiled_pt2e_trials_are_identical_on_both_paths(compiled, digits, freezing) -> None:  # noqa: ANN001
    x = images(digits.x_test[:32])
    calibration = images(digits.x_train[:256])
    views = {kernel: quantize(compiled, calibration, kernel=kernel) for kernel in ("int8", "emulated")}
    assert "int8" in views["int8"].kernels.values()
    for site in ("act", "weight", "acc", "input", "qparams"):
        model = FaultModel(site, 1e-3)
        pattern = sample_pattern(model, views["int8"].targets(model.site), len(x), torch.Generator().manual_seed(3))
        assert torch.equal(views["int8"](x, pattern), views["emulated"](x, pattern)), site


def test_without_freezing_the_compiled_model_is_read_as_its_graph(pt2e_model, digits) -> None:  # noqa: ANN001
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=False):
        qmodel = quantize(torch.compile(pt2e_model), images(digits.x_train[:64]))
    assert qmodel.config["compiled"] == ["<model>"]
    notes = qmodel.config["deployed_notes"]  # the load check first: the view against the graph Inductor runs
    assert notes[0].startswith("checked part by part against the graph") and not qmodel.config["view_mismatch"]
    assert "without torch._inductor.config.freezing" in notes[1]
    assert not any(isinstance(m, KernelSum) for m in qmodel.module.modules())


# -- the fused multiply-add of the sum post-op, against exact rational arithmetic --------------------------------------
def _float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


def _round_to_float32(exact: Fraction) -> float:
    """`exact` rounded to the nearest float32, ties to an even significand."""
    guess = _float32(float(exact))  # within one float32 step of the answer
    candidates = {guess, *(float(torch.nextafter(torch.tensor(guess, dtype=torch.float32),
                                                 torch.tensor(d, dtype=torch.float32))) for d in (-1e38, 1e38))}
    best = min(abs(Fraction(c) - exact) for c in candidates)
    nearest = sorted(c for c in candidates if abs(Fraction(c) - exact) == best)
    if len(nearest) == 1:
        return nearest[0]
    return next(c for c in nearest if struct.unpack("I", struct.pack("f", c))[0] % 2 == 0)


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-(2.0 ** 100), max_value=2.0 ** 100)


@settings(max_examples=400, deadline=None)
@given(st.integers(-255, 255), st.floats(width=32, min_value=2.0 ** -20, max_value=1024.0), finite32, st.booleans())
def test_fused_multiply_add_rounds_once(code: int, scale: float, addend: float, near_half: bool) -> None:
    if near_half:  # aim the sum at a point halfway between two float32 values, where a second rounding shows
        low = _float32(addend)
        high = float(torch.nextafter(torch.tensor(low, dtype=torch.float32), torch.tensor(1e38)))
        addend = _float32(float((Fraction(low) + Fraction(high)) / 2 - Fraction(code) * Fraction(scale)))
    a, b, c = (torch.tensor([v], dtype=torch.float32) for v in (float(code), scale, addend))
    exact = Fraction(code) * Fraction(scale) + Fraction(addend)
    assert float(fused_multiply_add(a, b, c)[0]) == _round_to_float32(exact)


class _Wrapped(torch.nn.Module):
    """Stands in a compiled model whose outputs are `view`'s, changed by `change`."""

    def __init__(self, view, change) -> None:  # noqa: ANN001
        super().__init__()
        self.view, self.change = view, change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.change(self.view(x))


def test_the_load_check_says_how_far_a_compiled_model_is(inductor_qmodel, digits) -> None:  # noqa: ANN001
    from pytest_hwfault.quantization import compiled_agreement

    x = images(digits.x_train[:16])
    same = compiled_agreement(_Wrapped(inductor_qmodel, lambda out: out.clone()), inductor_qmodel, x)
    assert "equal bit for bit" in same

    def nudge(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[3, 2] = torch.nextafter(out[3, 2], torch.tensor(1e9))
        return out

    differ = compiled_agreement(_Wrapped(inductor_qmodel, nudge), inductor_qmodel, x)
    assert "differ (159 of 160 values exactly equal" in differ and "not reproduce" in differ
    shapes = compiled_agreement(_Wrapped(inductor_qmodel, lambda out: out[:, :5]), inductor_qmodel, x)
    assert "other shapes" in shapes

    def broken(out: torch.Tensor) -> torch.Tensor:
        raise AssertionError("expected size 16==16, stride 1==64 at dim=1")

    failed = compiled_agreement(_Wrapped(inductor_qmodel, broken), inductor_qmodel, x)
    assert failed.startswith("could not run the compiled model") and "AssertionError" in failed


# -- each oneDNN op Inductor lowers to, against the engine's arithmetic for it, on random codes ------------------------
def _onednn_case(seed: int, channels: int = 32, size: int = 32):  # noqa: ANN202
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (32, channels, size, size), dtype=torch.uint8, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-127, 128, (channels, channels, 1, 1), dtype=torch.int8, generator=generator)
    s_in = float(torch.rand((), generator=generator) * 0.01 + 0.001)
    w_scale = (torch.rand(channels, generator=generator) * 0.004 + 0.0005).float()
    bias = (torch.randn(channels, generator=generator) * 2).float()
    packed = torch.ops.onednn.qconv_prepack(w, w_scale, s_in, 3, [1, 1], [0, 0], [1, 1], 1, x.shape)
    acc = torch.nn.functional.conv2d(x.double() - 3, w.double()).float()  # exact: |acc| < 2^24
    # the engine's float result of such a layer (Scaling.INDUCTOR): acc x input scale x weight scale + bias
    result = acc * torch.tensor(s_in, dtype=torch.float32) * w_scale[:, None, None] + bias[:, None, None]
    args = (torch.tensor(s_in), torch.tensor(3, dtype=torch.int32), packed, w_scale,
            torch.zeros(channels, dtype=torch.long))
    return x, args, bias, result


@pytest.mark.parametrize(("kind", "seed"), [("hardswish", 0), ("hardswish", 1), ("swish", 0), ("swish", 1)])
def test_activation_post_ops_are_onednns(kind: str, seed: int) -> None:
    """u8 codes and float results of a convolution with oneDNN's hard-swish or swish (SiLU) post-op, against the
    engine's arithmetic for them: equal bit for bit on 1M outputs each, where torch's own activation is not."""
    from pytest_hwfault.deployed import Requantize
    from pytest_hwfault.pt2e import KernelEltwise

    x, args, bias, result = _onednn_case(seed)
    scale, zero = 0.03, 37
    requantize = Requantize(scale, zero, 0, 255, divide=False, zero_first=True)
    codes = torch.ops.onednn.qconv_pointwise.tensor(x, *args, bias, [1, 1], [0, 0], [1, 1], 1, scale, zero,
                                                    torch.uint8, kind, [None], "")
    floats = torch.ops.onednn.qconv_pointwise.tensor(x, *args, bias, [1, 1], [0, 0], [1, 1], 1, 1.0, 0,
                                                     torch.float32, kind, [None], "")
    ours = KernelEltwise(kind)(result)
    assert torch.equal(ours, floats)
    assert torch.equal(requantize(ours), (codes.float() - zero) * torch.tensor(scale, dtype=torch.float32))
    torch_activation = {"hardswish": torch.nn.functional.hardswish, "swish": torch.nn.functional.silu}[kind]
    assert not torch.equal(torch_activation(result), floats)


@pytest.mark.parametrize("relu", [False, True])
def test_sum_post_op_is_onednns(relu: bool) -> None:
    x, args, bias, result = _onednn_case(2 + relu)
    generator = torch.Generator().manual_seed(7)
    other = torch.randint(0, 256, result.shape, dtype=torch.uint8, generator=generator)
    other = other.contiguous(memory_format=torch.channels_last)
    other_scale, other_zero, scale, zero = 0.02, 11, 0.05, 5
    codes = torch.ops.onednn.qconv2d_pointwise.binary_tensor(
        x, *args, other.clone(), bias, [1, 1], [0, 0], [1, 1], 1, scale, zero, torch.uint8, other_scale, other_zero,
        "sum", 1.0, "relu" if relu else "none", [None], "")
    kernel_sum = KernelSum(other_scale, scale, zero, 0, 255, relu)
    other_values = (other.float() - other_zero) * torch.tensor(other_scale, dtype=torch.float32)
    theirs = (codes.float() - zero) * torch.tensor(scale, dtype=torch.float32)
    assert torch.equal(kernel_sum(result, other_values), theirs)


class _PreActivation(torch.nn.Module):
    """Two patterns Inductor lowers its own way: an inference BatchNorm with no conv before it to fold into (here
    after a concatenation, as in DenseNet), and an in-place residual sum (MobileNetV3's `result += input`)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(3, 8, 1)
        self.norm = torch.nn.BatchNorm2d(16)
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.last = torch.nn.Conv2d(16, 16, 1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.left(x), self.right(x)], 1)
        out = self.conv(torch.relu(self.norm(x)))
        out += x
        return self.head(torch.relu(self.last(out)).mean((2, 3)))


def test_a_misread_layer_the_compiled_outputs_do_not_show_is_found_part_by_part(digits, freezing,  # noqa: ANN001
                                                                                  monkeypatch) -> None:  # noqa: ANN001
    """A compiled model was checked at its outputs only. A head that collapses (here a last linear with zero
    weights: every image gets the logits of its bias) hides every earlier layer, so a view that misread one of them
    agreed bit for bit with the compiled model, and a gate judged it. The part-by-part check against the graph
    Inductor compiled names the misread layer and the view is refused."""
    import pytest_hwfault.pt2e as pt2e
    from pytest_hwfault.quantization import CompiledMismatchWarning, DeployedMismatchWarning

    net = trained_resnet_style(digits)
    with torch.no_grad():
        net.fc.weight.zero_()
    pt2e_model = to_pt2e(net, images(digits.x_train[:512]))
    read_weight = pt2e._weight

    def misread(model, weight, read, ops):  # noqa: ANN001, ANN202
        codes, scales, values = read_weight(model, weight, read, ops)
        if read.name == "conv2d_1":  # block1.conv1
            codes = codes.clone()
            codes.view(-1)[:8] //= 2
        return codes, scales, values

    monkeypatch.setattr(pt2e, "_weight", misread)
    with pytest.warns(DeployedMismatchWarning) as caught:
        qmodel = quantize(torch.compile(pt2e_model, dynamic=False), images(digits.x_train[:64]))
    notes = qmodel.config["deployed_notes"]
    assert "fault-free outputs equal bit for bit" in notes[0]  # the outputs cannot tell
    assert not any(issubclass(w.category, CompiledMismatchWarning) for w in caught)
    assert "fault-free, 'block1.conv1' computes otherwise than the graph" in notes[1], notes[1]
    assert qmodel.config["view_mismatch"] == [notes[1]]


def test_compiled_batch_norm_and_in_place_sum_are_reproduced(freezing) -> None:  # noqa: ANN001
    from pytest_hwfault.cifar_resnet import recalibrate_bn
    from pytest_hwfault.pt2e import InductorBatchNorm

    generator = torch.Generator().manual_seed(4)
    calibration, x = torch.rand(32, 3, 16, 16, generator=generator), torch.rand(64, 3, 16, 16, generator=generator)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        net = recalibrate_bn(_PreActivation(), calibration).eval()
    compiled = torch.compile(to_pt2e(net, calibration), dynamic=False)
    qmodel = quantize(compiled, calibration)
    assert "equal bit for bit" in qmodel.config["deployed_notes"][0], qmodel.config["deployed_notes"][0]
    kinds = [type(m) for m in qmodel.module.modules()]
    assert kinds.count(InductorBatchNorm) == 1 and kinds.count(KernelSum) == 1, kinds
    with torch.no_grad():
        assert torch.equal(qmodel(x), compiled(x))


def test_batch_norm_is_inductors(freezing) -> None:  # noqa: ANN001
    """Against Inductor's own generated code for a BatchNorm on 1M random values: ATen's kernel rounds otherwise."""
    from pytest_hwfault.pt2e import InductorBatchNorm

    generator = torch.Generator().manual_seed(5)
    norm = torch.nn.BatchNorm2d(64).eval()
    with torch.no_grad():
        for tensor in (norm.weight, norm.bias, norm.running_mean):
            tensor.copy_(torch.randn(64, generator=generator))
        norm.running_var.copy_(torch.rand(64, generator=generator) + 0.1)
    x = torch.randn(64, 64, 16, 16, generator=generator) * 3
    with torch.no_grad():
        theirs = torch.compile(norm, dynamic=False)(x)
        aten = norm(x)
    ours = InductorBatchNorm(norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps)(x)
    assert torch.equal(ours, theirs)
    assert not torch.equal(aten, theirs)


def test_a_compiled_model_the_view_does_not_match_warns(pt2e_model, digits, monkeypatch) -> None:  # noqa: ANN001
    """A passing gate prints no model notes: a compiled model the engine does not reproduce bit for bit is said in
    pytest's warnings summary too (here a compiled model whose check could not run)."""
    import torch._inductor.config as inductor_config

    from pytest_hwfault.quantization import CompiledMismatchWarning

    compiled = torch.compile(pt2e_model, dynamic=False)
    monkeypatch.setattr(type(compiled), "__call__", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with inductor_config.patch(freezing=True), pytest.warns(CompiledMismatchWarning, match="could not run"):
        qmodel = quantize(compiled, images(digits.x_train[:64]))
    assert qmodel.config["deployed_notes"][0].startswith("could not run the compiled model")
