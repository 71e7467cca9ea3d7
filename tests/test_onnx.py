"""ONNX QDQ models (onnxruntime's quantize_static) keep their own codes and compute as onnxruntime's CPU kernels do."""

from __future__ import annotations

import copy
import pathlib
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from deployed_models import ResNetStyle, agreement, images, to_onnx_qdq, trained_resnet_style

from pytest_hwfault import FaultModel, FaultPattern, accuracy, quantize
from pytest_hwfault.cifar_resnet import recalibrate_bn
from pytest_hwfault.coverage import measure_coverage
from pytest_hwfault.deployed import DeployedFormatError
from pytest_hwfault.faults import sample_pattern
from pytest_hwfault.quantization import DeployedMismatchWarning

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def qdq(digits, tmp_path_factory):  # noqa: ANN001, ANN201
    """The ResNet-style model exported to ONNX and quantized by onnxruntime (QDQ, per-channel int8 weights), with
    uint8 and with int8 activations: {"u8": path, "s8": path}."""
    folder = tmp_path_factory.mktemp("onnx")
    model, calibration = trained_resnet_style(digits), images(digits.x_train[:500])
    return {name: to_onnx_qdq(model, calibration, folder, name) for name in ("u8", "s8")}


def run_ort(model: Any, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    """onnxruntime's CPU provider with its default (all) graph optimizations: the integer QLinear kernels."""
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def quantized_output(model: Any, node_name: str) -> str:
    """The QuantizeLinear output that re-grids node `node_name`'s output."""
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == node.output[0])


LAYERS = ["stem_Conv", "block1_conv1_Conv", "block1_conv2_Conv", "block2_conv1_Conv", "block2_conv2_Conv", "fc_Gemm"]


@pytest.mark.parametrize("activations", ["u8", "s8"])
def test_outputs_match_onnxruntime(qdq, digits, activations) -> None:  # noqa: ANN001
    path = qdq[activations]
    x = images(digits.x_test)
    qmodel = quantize(path, x[:64])
    assert qmodel.config["source"] == "onnx" and list(qmodel.layers) == LAYERS
    proto = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    conv = next(n for n in proto.graph.node if n.name == "/block1/conv1/Conv")
    weight_dq = next(n for n in proto.graph.node if n.output[0] == conv.input[1])
    layer = qmodel.layers["block1_conv1_Conv"]
    assert torch.equal(layer.weight_codes.cpu(), torch.from_numpy(inits[weight_dq.input[0]].astype(np.int32)))
    assert torch.equal(layer.weight_scale.cpu(), torch.from_numpy(inits[weight_dq.input[1]]))
    signed = activations == "s8"
    assert layer.signed_activations is signed and layer.signed_inputs is signed
    stem_q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert qmodel.layers["stem_Conv"].input_zero_point == int(inits[stem_q.input[2]])

    reference = torch.from_numpy(run_ort(path, {"x": x.numpy()})[0])
    ours = qmodel(x)
    figures = agreement(reference, ours, qmodel.layers["fc_Gemm"].act_scale)
    assert figures["predictions"] == 1.0, figures
    if activations == "u8":  # every group runs as an integer kernel (QLinearConv, QLinearAdd, ...): bit-exact
        assert figures["exact"] == 1.0, figures
    else:
        # Measured: 0.99924 (3 of 3970 logits, all of one image, one code). onnxruntime keeps the stem and
        # block1.conv1 of the int8-activation model as float Conv between DequantizeLinear and QuantizeLinear:
        # its float32 sum put one stem output (exact value 25.50000025 codes) just under the half code.
        assert figures["exact"] >= 0.999 and figures["max_codes"] < 1.001, figures


def test_single_faults_match_an_edited_onnxruntime_model(qdq, digits, tmp_path) -> None:  # noqa: ANN001
    path = qdq["u8"]
    x = images(digits.x_test[:8])
    qmodel = quantize(path, x)
    step = qmodel.layers["fc_Gemm"].act_scale
    proto = onnx.load(str(path))

    # weight: bit 7 (the sign bit of an int8 code) and bit 2 of two codes of block2.conv1, in the initializer; each
    # the first code from a fixed index whose flip changes the logits of these images (which codes do depends on the
    # trained weights, so on the CPU that trained them): a fault that changes nothing would prove nothing
    conv = next(n for n in proto.graph.node if n.name == "/block2/conv1/Conv")
    weight_name = next(n for n in proto.graph.node if n.output[0] == conv.input[1]).input[0]
    fault_free = qmodel(x)

    def first_that_matters(start: int, bit: int) -> int:
        for index in range(start, start + 256):
            pattern = FaultPattern.from_faults([("weight", "block2_conv1_Conv", index, bit, "flip")])
            if not torch.equal(qmodel(x, pattern), fault_free):
                return index
        raise AssertionError(f"no flip of bit {bit} in codes {start}..{start + 255} changes the logits")

    for index, bit in ((first_that_matters(37, 7), 7), (first_that_matters(1000, 2), 2)):
        edited = copy.deepcopy(proto)
        init = next(i for i in edited.graph.initializer if i.name == weight_name)
        codes = onnx.numpy_helper.to_array(init).copy()
        flat = codes.reshape(-1).view(np.uint8)
        flat[index] ^= 1 << bit
        init.CopyFrom(onnx.numpy_helper.from_array(codes, weight_name))
        reference = torch.from_numpy(run_ort(edited, {"x": x.numpy()})[0])
        ours = qmodel(x, FaultPattern.from_faults([("weight", "block2_conv1_Conv", index, bit, "flip")]))
        assert not torch.equal(ours, fault_free), (index, bit)
        figures = agreement(reference, ours, step)
        assert figures["predictions"] == 1.0 and figures["exact"] == 1.0, (index, bit, figures)

    # act: a stored uint8 code of block1.conv2's output (zero point 117), which feeds a QLinearAdd: the graph is
    # cut after that QuantizeLinear, the code edited in numpy, and the rest of the graph run on it
    stem_q, conv2_q = quantized_output(proto, "/stem/Conv"), quantized_output(proto, "/block1/conv2/Conv")
    head, tail = tmp_path / "head.onnx", tmp_path / "tail.onnx"
    onnx.utils.extract_model(str(path), str(head), ["x"], [stem_q, conv2_q])
    onnx.utils.extract_model(str(path), str(tail), [stem_q, conv2_q], ["logits"])
    stem_codes, conv2_codes = run_ort(head, {"x": x.numpy()})
    for index, bit, image in ((200, 7, 0), (515, 3, 5), (1023, 0, 2)):
        edited = conv2_codes.copy()
        edited[image].reshape(-1)[index] ^= 1 << bit
        reference = torch.from_numpy(run_ort(tail, {stem_q: stem_codes, conv2_q: edited})[0])
        ours = qmodel(x, FaultPattern.from_faults([("act", "block1_conv2_Conv", index, bit, "flip", image)]))
        figures = agreement(reference, ours, step)
        assert figures["predictions"] == 1.0 and figures["exact"] == 1.0, (index, bit, figures)
        changed = (ours != qmodel(x)).any(1)
        assert not changed[[i for i in range(len(x)) if i != image]].any()


@pytest.mark.parametrize(("site", "ber"), [("act", 1e-3), ("act", 1e-2), ("weight", 1e-3)])
def test_a_trials_faults_are_onnxruntimes_running_the_same_faults(qdq, digits, site, ber) -> None:  # noqa: ANN001
    """A whole trial's faults (act: thousands of codes at once, saturating, feeding QLinearAdd and the pools; weight:
    the int8 initializers' codes) against onnxruntime running the model under the same faults (`onnx_under_faults`:
    each faulted layer's stored output codes XORed with the same masks, the weight codes flipped): its own kernels on
    the same faulty codes, logits equal bit for bit."""
    from deployed_models import onnx_under_faults

    path, x = qdq["u8"], images(digits.x_test[:32])
    qmodel = quantize(path, x)
    fault_model = FaultModel(site, ber)
    pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x),
                             torch.Generator().manual_seed(int(1 / ber)))
    assert len(pattern.groups) >= (len(qmodel.layers) if site == "act" else 4)  # the head's few weights: maybe none
    proto, masks = onnx_under_faults(path, qmodel, pattern, len(x))
    theirs = torch.from_numpy(run_ort(proto, {"x": x.numpy(), **masks})[0])
    ours = qmodel(x, pattern)
    assert (ours != qmodel(x)).float().mean() > 0.5  # the faults reach the logits
    assert torch.equal(ours, theirs)


def test_the_load_check_runs_the_model_under_faults_too(qdq, digits, monkeypatch) -> None:  # noqa: ANN001
    """At load, after the fault-free check, the view and onnxruntime run one trial of act faults on the same
    images (`onnx_faults.agreement_under_faults`): said in the second note. A difference that only faults show is a
    DeployedMismatchWarning (here the reference is made to miss a layer's faults), also where the notes name parts
    computed otherwise (the int8 model's float-run convolutions: before, no warning, and its gates passed unmarked);
    a check that cannot run says why, and no more."""
    from pytest_hwfault import onnx_faults

    x = images(digits.x_test[:32])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)
        notes = quantize(qdq["u8"], x).config["deployed_notes"]
    assert "under a trial of act faults" in notes[1] and notes[1].endswith("outputs equal bit for bit"), notes[1]

    real = onnx_faults.onnx_under_faults

    def missing_a_layer(model, qmodel, pattern, images):  # noqa: ANN001, ANN202
        kept = FaultPattern({key: group for key, group in pattern.groups.items() if key[1] != "block1_conv2_Conv"})
        return real(model, qmodel, kept, images)

    monkeypatch.setattr(onnx_faults, "onnx_under_faults", missing_a_layer)
    with pytest.warns(DeployedMismatchWarning, match="under a trial of act faults .* outputs differ"):
        quantize(qdq["u8"], x)
    with pytest.warns(DeployedMismatchWarning, match="expected where the notes name parts"):  # named, but apart
        s8 = quantize(qdq["s8"], x)
    notes = s8.config["deployed_notes"]
    assert "outputs differ" in notes[1] and "expected where the notes name parts" in notes[1], notes[1]
    assert s8.config["view_mismatch"] == [notes[1]]  # a campaign on it needs allow_inexact_view=True

    def refused(*args):  # noqa: ANN002, ANN202
        raise ValueError("no such layer")

    monkeypatch.setattr(onnx_faults, "onnx_under_faults", refused)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)
        notes = quantize(qdq["u8"], x).config["deployed_notes"]
    assert notes[1].startswith("not checked against onnxruntime under faults (ValueError: no such layer)"), notes[1]


def test_the_load_check_compares_every_layers_stored_codes_with_onnxruntimes(qdq, digits, monkeypatch) -> None:  # noqa: ANN001
    """The load check compared outputs only, which a layer whose output does not reach them (a collapsed head) can
    hide. Each layer's stored codes (its QuantizeLinear's output, made a graph output) are now compared with the
    view's too, fault-free and under the trial of faults: equal on this model's layers; a difference the outputs do
    not show (here onnxruntime's codes of one layer made to differ by one) is a DeployedMismatchWarning naming
    the layer."""
    from pytest_hwfault import onnx_faults

    x = images(digits.x_test[:32])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)
        qmodel = quantize(qdq["u8"], x)
    notes, layers = qmodel.config["deployed_notes"], len(qmodel.layers)
    assert notes[0] == (f"checked against onnxruntime on 32 calibration images: output codes of its {layers} "
                        "quantized layers equal, and fault-free outputs equal bit for bit"), notes[0]
    assert notes[1].endswith(f"output codes of its {layers} quantized layers equal, and outputs equal bit for bit")
    real = onnx_faults.onnxruntime_layer_codes
    first = next(iter(qmodel.layers))

    def one_code_apart(*args):  # noqa: ANN002, ANN202
        codes = real(*args)
        codes[first][0, 0] += 1
        return codes

    monkeypatch.setattr(onnx_faults, "onnxruntime_layer_codes", one_code_apart)
    with pytest.warns(DeployedMismatchWarning, match="fault-free outputs equal, but not layer by layer"):
        qmodel = quantize(qdq["u8"], x)
    note = qmodel.config["deployed_notes"][0]
    assert f"the first module whose output differs: {first!r}" in note, note
    assert qmodel.config["view_mismatch"] == [note]

    def apart_under_faults(proto, qmodel, images, masks=None):  # noqa: ANN001, ANN202
        codes = real(proto, qmodel, images, masks)
        if masks:
            codes[first][0, 0] += 1
        return codes

    monkeypatch.setattr(onnx_faults, "onnxruntime_layer_codes", apart_under_faults)
    with pytest.warns(DeployedMismatchWarning, match="under a trial of act faults .* outputs equal bit for bit; "
                                                     "layer by layer: the first module"):
        qmodel = quantize(qdq["u8"], x)
    assert qmodel.config["view_mismatch"] == [qmodel.config["deployed_notes"][1]]


def test_every_site_runs_and_paths_and_protos_are_accepted(qdq, digits) -> None:  # noqa: ANN001
    path = qdq["u8"]
    x, y = images(digits.x_test[:16]), digits.y_test[:16]
    qmodel = quantize(path, x)
    models: tuple[Any, ...] = (str(path), pathlib.Path(path), onnx.load(str(path)))
    for model in models:
        other = quantize(model, x)
        assert other.config["source"] == "onnx" and torch.equal(other(x), qmodel(x))
    sites: tuple[Any, ...] = ("act", "weight", "acc", "input")
    for site in sites:
        # `accuracy` draws one trial with torch.Generator().manual_seed(seed): the same pattern, drawn here
        fault_model = FaultModel(site, 1e-3)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x),
                                 torch.Generator().manual_seed(1))
        assert len(pattern) > 0, site
        expected = sum(int(row.argmax()) == int(label) for row, label in zip(qmodel(x, pattern), y)) / len(x)
        assert accuracy(qmodel, (x, y), fault_model, seed=1) == expected, site
    # the float baseline: the QDQ model's float function, as accurate as the int8 model
    float_accuracy = float((qmodel.float_forward(x).argmax(1) == y).float().mean())
    int8_accuracy = float((qmodel(x).argmax(1) == y).float().mean())
    assert abs(float_accuracy - int8_accuracy) <= 1 / 16 and int8_accuracy > 0.8


def test_unsupported_op_names_the_node(qdq, digits) -> None:  # noqa: ANN001
    proto = onnx.load(str(qdq["u8"]))
    node = next(n for n in proto.graph.node if n.op_type == "Flatten")
    node.op_type = "Softsign"
    with pytest.raises(DeployedFormatError, match=r"onnx: node '/Flatten' of type 'Softsign'.*not supported"):
        quantize(proto, images(digits.x_test[:4]))
    # asymmetric weights are refused, naming the node
    proto = onnx.load(str(qdq["u8"]))
    conv = next(n for n in proto.graph.node if n.name == "/stem/Conv")
    dq = next(n for n in proto.graph.node if n.output[0] == conv.input[1])
    init = next(i for i in proto.graph.initializer if i.name == dq.input[2])
    zero = onnx.numpy_helper.to_array(init).copy()
    zero[0] = 3
    init.CopyFrom(onnx.numpy_helper.from_array(zero, init.name))
    with pytest.raises(DeployedFormatError, match=r"node '/stem/Conv' \(Conv\): asymmetric weights"):
        quantize(proto, images(digits.x_test[:4]))


class Pools(torch.nn.Module):
    """Clip, MaxPool, AveragePool (with and without pads), Concat of two grids, Reshape, Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.fc = torch.nn.Conv2d(8, 8, 1), torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(self.c1(x), 0, 6)
        a, b = torch.nn.functional.max_pool2d(x, 2), torch.nn.functional.avg_pool2d(self.c2(x), 2)
        y = torch.cat([self.c3(a), b], 1)
        y = torch.nn.functional.avg_pool2d(y, 3, stride=2, padding=1, count_include_pad=False)
        return self.fc(y.reshape(-1, 64))


@pytest.mark.parametrize("activations", ["u8", "s8"])
def test_a_wide_layer_onnxruntime_runs_in_float_is_named(activations: str, tmp_path: pathlib.Path) -> None:
    """Where onnxruntime's optimizer leaves a conv in float (int8 activations: the first conv of each block here),
    its float32 sum rounds once it passes 2^24, which the exact integer sum does not: with 128 channels (fan-in
    1152) outputs near a half code came out one code apart in ~1% of logits. The notes name each such layer; the
    layers it runs on integer kernels are not named, and with uint8 activations every output code is equal."""
    generator = torch.Generator().manual_seed(0)
    calibration, x = torch.rand(64, 1, 8, 8, generator=generator), torch.rand(128, 1, 8, 8, generator=generator)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = recalibrate_bn(ResNetStyle(channels=128), calibration)
    path = to_onnx_qdq(net, calibration, tmp_path, activations)
    qmodel = quantize(path, calibration)
    named = sorted(note.split("'")[1] for note in qmodel.config["deployed_notes"] if "runs it as a float" in note)
    kernels = {node.name: node.op_type for node in _optimized(path).graph.node}
    in_float = sorted(name for name in named if kernels.get(name) == "Conv")
    assert named == in_float
    measured = agreement(torch.from_numpy(run_ort(onnx.load(path), {"x": x.numpy()})[0]), qmodel(x),
                         qmodel.layers["fc_Gemm"].act_scale)
    if activations == "u8":
        assert named == [] and measured["exact"] == 1.0, (named, measured)
    else:
        assert named == ["/block1/conv1/Conv", "/block2/conv1/Conv"], named


def _optimized(path: pathlib.Path) -> Any:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


@pytest.mark.parametrize("activations", ["u8", "s8"])
def test_pooling_and_concat_match_onnxruntime(digits, tmp_path, activations) -> None:  # noqa: ANN001
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Pools().eval()
    path = to_onnx_qdq(net, images(digits.x_train[:300]), tmp_path, activations)
    x = images(digits.x_test)
    qmodel = quantize(path, x[:64])
    assert list(qmodel.layers) == ["c1_Conv", "c2_Conv", "c3_Conv", "fc_Gemm"]
    reference = torch.from_numpy(run_ort(path, {"x": x.numpy()})[0])
    # measured: bit-exact for both (int8: onnxruntime runs the average pools on uint8 codes, zero point + 128,
    # which changes where float32 y / scale + zero point rounds; the reader uses the kernel's zero point)
    figures = agreement(reference, qmodel(x), qmodel.layers["fc_Gemm"].act_scale)
    assert figures["predictions"] == 1.0 and figures["exact"] == 1.0, figures


@pytest.mark.parametrize("activations", ["u8", "s8"])
@pytest.mark.parametrize("kind", ["resnet", "pools"])
def test_a_qoperator_model_is_onnxruntimes_bit_for_bit(digits, tmp_path, kind, activations) -> None:  # noqa: ANN001
    """onnxruntime's other format (its kernels as QLinearConv/QGemm/QLinearAdd/QLinear pool/QLinearConcat nodes, as
    the ONNX Model Zoo's int8 models hold them) is read as its QDQ equivalent: the same layers, and logits equal to
    onnxruntime running the QOperator model itself, bit for bit; a weight fault too."""
    calibration = images(digits.x_train[:300])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = trained_resnet_style(digits) if kind == "resnet" else Pools().eval()
    path = to_onnx_qdq(model, calibration, tmp_path, activations, qoperator=True)
    proto = onnx.load(str(path))
    kernels = {n.op_type for n in proto.graph.node}
    assert {"QLinearConv", "QGemm"} <= kernels and not kernels & {"Conv", "Gemm"}, kernels
    x = images(digits.x_test)
    qmodel = quantize(path, x[:64])
    notes = qmodel.config["deployed_notes"]
    assert any("QOperator format" in note for note in notes)
    # checked under faults too, on the QOperator model itself: its kernels' outputs XORed where they are stored
    assert "under a trial of act faults" in notes[1], notes[1]
    if activations == "u8":  # (int8: the first conv of each block onnxruntime runs in float, named)
        assert notes[1].endswith("outputs equal bit for bit"), notes[1]
    assert len(qmodel.layers) == sum(n.op_type in ("QLinearConv", "QGemm") for n in proto.graph.node)
    reference = torch.from_numpy(run_ort(path, {"x": x.numpy()})[0])
    last = list(qmodel.layers)[-1]
    figures = agreement(reference, qmodel(x), qmodel.layers[last].act_scale)
    assert figures["predictions"] == 1.0 and figures["exact"] == 1.0, figures
    if kind == "resnet":  # here the quantizer gives both formats the same codes and grids: the same numbers
        qdq_view = quantize(to_onnx_qdq(model, calibration, tmp_path, activations), x[:64])
        assert torch.equal(qdq_view(x), qmodel(x))
    # a weight fault: the QOperator model's own initializer edited, run by onnxruntime
    conv = next(n for n in proto.graph.node if n.op_type == "QLinearConv")
    layer = next(name for name in qmodel.layers if name.startswith(re.sub(r"\W", "_", conv.name.strip("/"))))
    pattern = FaultPattern.from_faults([("weight", layer, 5, 7, "flip")])
    edited = copy.deepcopy(proto)
    init = next(i for i in edited.graph.initializer if i.name == conv.input[3])
    codes = onnx.numpy_helper.to_array(init).copy()
    codes.reshape(-1).view(np.uint8)[5] ^= 1 << 7
    init.CopyFrom(onnx.numpy_helper.from_array(codes, conv.input[3]))
    faulty = torch.from_numpy(run_ort(edited, {"x": x.numpy()})[0])
    assert not torch.equal(faulty, reference)
    figures = agreement(faulty, qmodel(x, pattern), qmodel.layers[last].act_scale)
    assert figures["exact"] == 1.0, figures


def test_a_qoperator_node_without_a_qdq_form_is_refused_by_name(digits, tmp_path) -> None:  # noqa: ANN001
    path = to_onnx_qdq(trained_resnet_style(digits), images(digits.x_train[:100]), tmp_path, "u8", qoperator=True)
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.op_type == "QLinearAdd")
    node.op_type = "QLinearMul"  # same inputs, no QDQ equivalent here
    with pytest.raises(DeployedFormatError, match=r"node .* of type 'QLinearMul' \(domain 'com.microsoft'\) is not "
                                                  r"supported"):
        quantize(proto, images(digits.x_test[:8]))


def test_a_file_that_is_not_onnx_is_refused_by_name(tmp_path, digits) -> None:  # noqa: ANN001
    path = tmp_path / "model.onnx"
    path.write_text("not a model")
    with pytest.raises(DeployedFormatError, match=r"onnx: '.*model.onnx' is not a readable ONNX model"):
        quantize(path, images(digits.x_train[:8]))
    with pytest.raises(FileNotFoundError):
        quantize(tmp_path / "missing.onnx", images(digits.x_train[:8]))


# -- dynamic quantization: onnxruntime's quantize_dynamic --------------------------------------------------------------
class Tokens(torch.nn.Module):
    """Linear layers on [N, 5, 67] tokens, then a head on the flattened tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(67, 48), torch.nn.Linear(5 * 48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).flatten(1))


def _dynamic_onnx(folder: pathlib.Path, per_channel: bool, zero_head: bool = False) -> pathlib.Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Tokens().eval()
    if zero_head:  # every input's logits its bias: the outputs cannot show a layer before it
        with torch.no_grad():
            model.b.weight.zero_()
    float_path, path = folder / "tokens.onnx", folder / f"tokens_dynamic_{per_channel}_{zero_head}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 5, 67),), str(float_path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
                          opset_version=17)
    quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QInt8, per_channel=per_channel)
    return path


def _tokens(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, 67, generator=generator) * torch.logspace(-4, 3, n).reshape(-1, 1, 1)
    x[1::5] = x[1::5].abs()
    x[2::5] = 0.0
    return x


def _ort_each(path: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.from_numpy(run_ort(path, {"x": x[i : i + 1].numpy()})[0]) for i in range(len(x))])


def _view_each(qmodel: Any, x: torch.Tensor, pattern: FaultPattern | None = None) -> torch.Tensor:
    return torch.cat([qmodel(x[i : i + 1], pattern, i) for i in range(len(x))])


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_a_dynamically_quantized_model_is_onnxruntimes_one_image_at_a_time(tmp_path, per_channel) -> None:  # noqa: ANN001
    """DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add, which onnxruntime fuses into
    DynamicQuantizeMatMul: bit for bit on 60 inputs whose magnitudes span seven decades (zero and one-signed ones
    too), each run alone; checked at load; every layer a raw-output layer with no act site; late start traces."""
    path = _dynamic_onnx(tmp_path, per_channel)
    assert {n.op_type for n in _optimized(path).graph.node} >= {"DynamicQuantizeMatMul"}
    x = _tokens(60, seed=1)
    qmodel = quantize(path, x)
    assert qmodel.config["deployed_notes"][0].endswith("fault-free outputs equal bit for bit")
    assert len(qmodel.layers) == 2 and all(layer.raw_output for layer in qmodel.layers.values())
    assert qmodel.trace_error is None
    ours, theirs = _view_each(qmodel, x), _ort_each(path, x)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    assert torch.equal(qmodel(x), ours)  # no float layer that blocks by batch size here


def test_a_misread_dynamic_layer_the_outputs_do_not_show_is_found_layer_by_layer(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The load check compared a dynamically quantized ONNX model's outputs only (one input at a time). A head with
    zero weights gives every input the same logits, so a view that misread the layer before it agreed with
    onnxruntime bit for bit, and a gate judged it. Each dynamic layer's float result (its MatMulInteger chain's last
    tensor, made a graph output) is now compared too: the misread layer is named and the view refused."""
    from pytest_hwfault import onnx_reader

    path, x = _dynamic_onnx(tmp_path, per_channel=False, zero_head=True), _tokens(20, seed=1)
    qmodel = quantize(path, x)  # as read: equal layer by layer too
    assert qmodel.config["deployed_notes"][0].endswith(
        "outputs of its 2 dynamic layers equal on 4 of them, and fault-free outputs equal bit for bit")
    first = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulInteger")
    read = onnx_reader._Builder.op_MatMulInteger

    def misread(self, node, index):  # noqa: ANN001, ANN202
        if node.name == first.name:
            codes = self.consts[node.input[1]].copy()
            codes[0] //= 2  # the first input's weight in every output
            self.consts[node.input[1]] = codes
        return read(self, node, index)

    monkeypatch.setattr(onnx_reader._Builder, "op_MatMulInteger", misread)
    with pytest.warns(DeployedMismatchWarning, match=r"fault-free outputs equal, but not layer by layer on 4 of "
                                                     r"them: the first module whose output differs: '\w+' \(a "
                                                     r"dynamic MatMulInteger's float result\)"):
        qmodel = quantize(path, x)
    assert torch.equal(_view_each(qmodel, x), _ort_each(path, x))  # the outputs cannot tell
    assert len(qmodel.config["view_mismatch"]) == 1


def test_dynamic_quantize_linear_is_onnxruntimes_division() -> None:
    """The codes of one tensor against onnxruntime's own DynamicQuantizeLinear on 4M values: a division by the
    scale (x x float32(1 / scale) differs on about one value in a million), the scale and the zero point."""
    from onnx import TensorProto, helper

    from pytest_hwfault.onnx_reader import OrtDynamicQuantize

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [None]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("z", TensorProto.UINT8, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = (rng.standard_normal(200_003) * 10 ** rng.uniform(-4, 3) + rng.uniform(-1, 1)).astype(np.float32)
        codes, scale, zero = run_ort(model, {"x": x})
        ours = OrtDynamicQuantize()(torch.from_numpy(x).reshape(1, -1))
        assert float(ours[1][0]) == float(scale) and int(ours[2][0]) == int(zero)
        assert np.array_equal(ours[0].reshape(-1).numpy().astype(np.uint8), codes)


def test_dynamic_weight_and_scale_faults_are_onnxruntimes_with_that_initializer(tmp_path) -> None:  # noqa: ANN001
    path = _dynamic_onnx(tmp_path, per_channel=True)
    x = _tokens(10, seed=2)
    qmodel = quantize(path, x)
    proto = onnx.load(str(path))
    matmul = next(n for n in proto.graph.node if n.op_type == "MatMulInteger")
    layer = next(iter(qmodel.layers))
    scale_mul = next(n for n in proto.graph.node if n.op_type == "Mul" and "x_scale" in n.input)
    weight_scale = next(i for i in scale_mul.input if i != "x_scale")
    # weight code [k=3, n=7] of B [67, 48] is the layer's code [7, 3]: index 7 x 67 + 3; a weight scale's exponent bit
    for site, initializer, position, index, bit in (("weight", matmul.input[1], 3 * 48 + 7, 7 * 67 + 3, 7),
                                                    ("qparams", weight_scale, 11, 11, 24)):
        edited = copy.deepcopy(proto)
        init = next(i for i in edited.graph.initializer if i.name == initializer)
        values = onnx.numpy_helper.to_array(init).copy()
        values.reshape(-1).view(np.uint8 if site == "weight" else np.uint32)[position] ^= 1 << bit
        init.CopyFrom(onnx.numpy_helper.from_array(values, initializer))
        reference = _ort_each(edited, x)
        assert not torch.equal(reference, _ort_each(path, x)), site
        ours = _view_each(qmodel, x, FaultPattern.from_faults([(site, layer, index, bit, "flip")]))
        assert torch.equal(ours.view(torch.int32), reference.view(torch.int32)), site


@pytest.mark.parametrize("model", ["tokens", "conv2d"])
@pytest.mark.parametrize("site", ["input", "acc", "weight"])
def test_dynamic_trials_resume_late_with_the_same_numbers(tmp_path, site, model) -> None:  # noqa: ANN001
    from pytest_hwfault.campaign import Campaign
    from pytest_hwfault.spec import CampaignSpec

    if model == "tokens":
        path, x = _dynamic_onnx(tmp_path, per_channel=False), _tokens(40, seed=3)
    else:
        path, x = _dynamic_cnn_onnx(tmp_path, 2), _signals(40, 2, seed=3)
    qmodel = quantize(path, x)
    labels = qmodel(x).argmax(1)
    spec = CampaignSpec(site=site, ber=3e-3, min_acc=0.5, budget=4, first=4, seed=1)
    expected = [Campaign(qmodel, x, labels, spec, "t", batch_size=8, drop_fault_free=False).trial(i) for i in range(4)]
    assert any(trial.critical for trial in expected)
    late = Campaign(qmodel, x, labels, spec, "t", batch_size=8)
    assert late.late_start() is not None
    assert [late.trial(i) for i in range(4)] == expected


# -- dynamic quantization of convolutions: ConvInteger ----------------------------------------------------------------
class DynamicCNN(torch.nn.Module):
    """Convolutions with padding, stride, dilation and groups, a residual sum, then (2-d) a float
    GlobalAveragePool, or a flattened head; `dims`: 1, 2 or 3 spatial dimensions."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[dims - 1]
        self.dims = dims
        self.a = conv(3, 16, 3, padding=1)
        self.depthwise = conv(16, 16, 3, padding=1, groups=16)
        self.b = conv(16, 8, 3, stride=2, dilation=2, padding=2, groups=2)
        self.fc = torch.nn.Linear(8 if dims == 2 else 8 * 3**dims, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        y = torch.relu(self.b(y + torch.relu(self.depthwise(y))))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1) if self.dims == 2 else y.flatten(1))


DYNAMIC_CNN_SIZES = {1: (3, 6), 2: (3, 9, 10), 3: (3, 5, 6, 6)}


def _exported_dynamic(model: torch.nn.Module, folder: pathlib.Path, name: str, example: tuple[int, ...]
                      ) -> pathlib.Path:
    """`model` exported at opset 17 with a dynamic batch and quantized by onnxruntime's
    quantize_dynamic (int8 weights): the path of the quantized model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_path, path = folder / f"{name}.onnx", folder / f"{name}_dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *example),), str(float_path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17)
        quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QInt8)
    return path


def _dynamic_cnn_onnx(folder: pathlib.Path, dims: int) -> pathlib.Path:
    with torch.random.fork_rng():
        torch.manual_seed(dims)
        model = DynamicCNN(dims).eval()
    return _exported_dynamic(model, folder, f"cnn{dims}d", DYNAMIC_CNN_SIZES[dims])


def _signals(n: int, dims: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = DYNAMIC_CNN_SIZES[dims]
    x = torch.randn(n, *shape, generator=generator) * torch.logspace(-4, 3, n).reshape(-1, *([1] * len(shape)))
    x[1::5] = x[1::5].abs()
    x[2::5] = 0.0
    return x


class DenseBlock(torch.nn.Module):
    """DenseNet's pattern: a BatchNorm on concatenated features (no convolution before it to fold into), then a
    ReLU and a convolution, a float GlobalAveragePool, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(11, 6, 3, padding=1)
        self.norm, self.fc = torch.nn.BatchNorm2d(11), torch.nn.Linear(6, 4)
        with torch.no_grad():  # statistics of their own, as a trained model's
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.05, 3)
            self.norm.weight.uniform_(0.5, 2)
            self.norm.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(torch.relu(self.norm(torch.cat([x, torch.relu(self.stem(x))], 1))))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.relu(y), 1).flatten(1))


def test_a_float_batch_norm_is_onnxruntimes_bit_for_bit(tmp_path) -> None:  # noqa: ANN001
    """A BatchNormalization the exporter leaves in the graph (DenseNet's, after a concatenation) was refused as an
    unsupported op: it is a float op now, computed as onnxruntime's kernel does (per channel 1 / sqrt(var + eps) x
    scale, bias - mean x that, then x s + b; certified by a probe, torch's batch_norm agrees on 50-75% of values):
    the dynamic model's layers and logits bit for bit, no float op named."""
    from pytest_hwfault.onnx_reader import runtime_batch_norm_agrees

    assert runtime_batch_norm_agrees()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = DenseBlock().eval()
    path = _exported_dynamic(model, tmp_path, "dense", (3, 9, 9))
    assert "BatchNormalization" in {n.op_type for n in _optimized(path).graph.node}
    x = torch.randn(30, 3, 9, 9, generator=torch.Generator().manual_seed(5)) * torch.logspace(-2, 2, 30).reshape(
        -1, 1, 1, 1)
    qmodel = quantize(path, x)
    notes = qmodel.config["deployed_notes"]
    assert notes[0].endswith("outputs of its 3 dynamic layers equal on 4 of them, and fault-free outputs equal bit "
                             "for bit"), notes
    assert not any("not certified" in note for note in notes), notes
    assert torch.equal(_view_each(qmodel, x).view(torch.int32), _ort_each(path, x).view(torch.int32))


class MeanHead(torch.nn.Module):
    """A convolution, then the mean over its feature map (exported as ReduceMean over the trailing axes), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize(("side", "certified"), [(8, True), (4, True), (7, False)])
def test_a_mean_over_a_feature_map_is_onnxruntimes_where_its_rows_are_whole_packets(tmp_path, side: int,  # noqa: ANN001
                                                                                   certified: bool) -> None:
    """ReduceMean ran as torch's mean (under half of the values equal to onnxruntime's) and was named: it made a
    dynamic MnasNet inexact. Over trailing axes of a multiple of 4 values per row, every row starts 16-byte aligned
    whatever the batch, and Eigen's sum (two accumulators of 4 lanes, then the lanes paired) is computed: certified by
    a probe, the layers and logits bit for bit. A 7 x 7 map's rows start unaligned, by their position in the batch:
    torch's mean, named."""
    from pytest_hwfault.onnx_reader import runtime_reduce_mean_agrees

    with torch.random.fork_rng():
        torch.manual_seed(6)
        model = MeanHead().eval()
    path = _exported_dynamic(model, tmp_path, "mean", (3, side, side))
    assert "ReduceMean" in {n.op_type for n in _optimized(path).graph.node}
    x = torch.randn(40, 3, side, side, generator=torch.Generator().manual_seed(7)) * torch.logspace(-2, 3, 40).reshape(
        -1, 1, 1, 1)
    if certified:
        qmodel = quantize(path, x)
        assert runtime_reduce_mean_agrees()
        assert not [note for note in qmodel.config["deployed_notes"] if "not certified" in note]
        assert torch.equal(_view_each(qmodel, x).view(torch.int32), _ort_each(path, x).view(torch.int32))
    else:  # the load check finds the outputs apart: a view a gate refuses
        with pytest.warns(DeployedMismatchWarning, match="fault-free outputs differ"):
            qmodel = quantize(path, x)
        named = [note for note in qmodel.config["deployed_notes"] if "not certified" in note]
        assert len(named) == 1 and named[0].endswith("ReduceMean x1") and qmodel.config["view_mismatch"], named


def test_a_mean_over_middle_axes_is_never_taken_for_a_trailing_one() -> None:
    """A first rule read the reduced axes off the shapes: a mean over tokens of [N, 16, 16] (keepdims=0) looked like
    one over the last axis and was certified. The axes are the node's own now (attribute or constant input)."""
    from onnx import helper, numpy_helper

    from pytest_hwfault.onnx_reader import _reduce_axes, _trailing_mean_of_whole_packets

    shapes: dict[str, list[int | None]] = {"x": [None, 16, 16], "y": [None, 16]}
    tokens = helper.make_node("ReduceMean", ["x"], ["y"], name="tokens", axes=[1], keepdims=0)
    last = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="last", keepdims=0)
    everything = helper.make_node("ReduceMean", ["x"], ["y"], name="all", keepdims=0)
    graph = helper.make_graph([tokens, last, everything], "g", [], [],
                              [numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")])
    axes = _reduce_axes(helper.make_model(graph), [tokens, last, everything])
    assert axes == {"tokens": [1], "last": [-1], "all": []}
    assert not _trailing_mean_of_whole_packets(tokens, shapes, axes["tokens"])
    assert _trailing_mean_of_whole_packets(last, shapes, axes["last"])
    assert not _trailing_mean_of_whole_packets(everything, shapes, axes["all"])  # the batch's size is not known
    assert not _trailing_mean_of_whole_packets(last, {"x": [None, 16, 7]}, axes["last"])  # rows of 7 values


class HardGated(torch.nn.Module):
    """MobileNetV3's activations: a hard-swish, and a hard-sigmoid gate."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate, self.b = torch.nn.Linear(67, 48), torch.nn.Linear(67, 48), torch.nn.Linear(5 * 48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.hardswish(self.a(x)) * torch.nn.functional.hardsigmoid(self.gate(x))
        return self.b(y.flatten(1))


def test_hard_sigmoids_are_certified_and_a_decomposed_hard_swish_named(tmp_path) -> None:  # noqa: ANN001
    """HardSigmoid (x alpha + beta, clamped, each a float32 step) was named though computed as onnxruntime does: a
    probe of the node's own alpha and beta certifies it now. onnxruntime decomposes a HardSwish into a HardSigmoid
    and a Mul of its own, with no name to follow them by: the same arithmetic here (the logits equal), but named."""
    from pytest_hwfault.onnx_reader import runtime_hard_activation_agrees

    assert runtime_hard_activation_agrees("HardSigmoid", 1 / 6, 0.5) and runtime_hard_activation_agrees("HardSwish",
                                                                                                          0.2, 0.5)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = HardGated().eval()
    path = _exported_dynamic(model, tmp_path, "hard", (5, 67))
    x = _tokens(40, seed=5)
    qmodel = quantize(path, x)
    named = [note for note in qmodel.config["deployed_notes"] if "not certified" in note]
    assert len(named) == 1 and named[0].endswith("by an ulp: HardSwish x1"), named
    assert torch.equal(_view_each(qmodel, x).view(torch.int32), _ort_each(path, x).view(torch.int32))


class Gated(torch.nn.Module):
    """A SiLU (x * sigmoid(x), which onnxruntime fuses into its QuickGelu) and a sigmoid gate (a plain Sigmoid)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate, self.b = torch.nn.Linear(67, 48), torch.nn.Linear(67, 48), torch.nn.Linear(5 * 48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.silu(self.a(x)) * torch.sigmoid(self.gate(x))
        return self.b(y.flatten(1))


def test_sigmoids_and_silus_are_onnxruntimes_bit_for_bit(tmp_path) -> None:  # noqa: ANN001
    """A Sigmoid ran as torch.sigmoid (about a third of values equal to onnxruntime's) and was named; the SiLUs of
    an EfficientNet made its dynamic view inexact. Now MLAS's logistic (certified by a probe), and a SiLU
    onnxruntime fuses into its QuickGelu followed as that kernel computes it: the dynamic model's layers and logits
    bit for bit, no float op named, the fusion said."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = Gated().eval()
    path = _exported_dynamic(model, tmp_path, "gated", (5, 67))
    assert {n.op_type for n in _optimized(path).graph.node} >= {"QuickGelu", "Sigmoid"}
    x = _tokens(60, seed=4) * 20  # past the logistic's clamp at 18 too
    qmodel = quantize(path, x)
    notes = qmodel.config["deployed_notes"]
    assert notes[0].endswith("outputs of its 3 dynamic layers equal on 4 of them, and fault-free outputs equal bit "
                             "for bit"), notes
    assert any(note.startswith("onnxruntime fuses 1 SiLU(s) or QuickGELU(s)") for note in notes), notes
    assert not any("not certified" in note for note in notes), notes
    assert torch.equal(_view_each(qmodel, x).view(torch.int32), _ort_each(path, x).view(torch.int32))


@pytest.mark.parametrize("dims", [1, 2, 3], ids=["conv1d", "conv2d", "conv3d"])
def test_a_dynamically_quantized_cnn_is_onnxruntimes_one_image_at_a_time(tmp_path, dims: int) -> None:  # noqa: ANN001
    """quantize_dynamic's convolutions (DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul -> Add), refused before:
    ConvInteger pads its codes with their zero point, which the view's exact sums take off over the taps inside the
    image only. Bit for bit against onnxruntime on 40 inputs whose magnitudes span seven decades (zero and one-signed
    ones too), each run alone, through padding, stride, dilation, groups, a residual sum and (2-d) onnxruntime's
    float GlobalAveragePool (MLAS's four-lane sum, certified: not named); the same on the int8 kernels and the
    emulated path; checked at load layer by layer."""
    path = _dynamic_cnn_onnx(tmp_path, dims)
    assert sum(n.op_type == "ConvInteger" for n in onnx.load(str(path)).graph.node) == 3
    x = _signals(40, dims, seed=1)
    qmodel = quantize(path, x)
    notes = qmodel.config["deployed_notes"]
    assert notes[0].endswith("outputs of its 4 dynamic layers equal on 4 of them, and fault-free outputs equal bit "
                             "for bit"), notes
    assert "dynamic quantization (4 Conv or MatMul layer(s)" in notes[1]
    assert not any("not certified" in note for note in notes), notes
    assert len(qmodel.layers) == 4 and all(layer.raw_output for layer in qmodel.layers.values())
    assert qmodel.trace_error is None
    ours, theirs = _view_each(qmodel, x), _ort_each(path, x)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    emulated = quantize(path, x, kernel="emulated")
    assert torch.equal(_view_each(emulated, x).view(torch.int32), ours.view(torch.int32))


def test_a_dynamic_conv_weight_fault_is_onnxruntimes_with_that_initializer(tmp_path) -> None:  # noqa: ANN001
    """A flipped weight code of a ConvInteger (its kernel [out, in / groups, k, k] indexed as the layer's codes):
    onnxruntime with that initializer edited, bit for bit, for a tap at the image's border and one inside."""
    path = _dynamic_cnn_onnx(tmp_path, 2)
    x = _signals(10, 2, seed=2)
    qmodel = quantize(path, x)
    proto = onnx.load(str(path))
    conv = next(n for n in proto.graph.node if n.op_type == "ConvInteger")
    layer = next(name for name in qmodel.layers if name.startswith("a_"))
    for index, bit in ((5 * 27 + 0, 7), (11 * 27 + 2 * 9 + 4, 6)):  # [5, 0, 0, 0]: a corner tap; [11, 2, 1, 1]
        edited = copy.deepcopy(proto)
        init = next(i for i in edited.graph.initializer if i.name == conv.input[1])
        values = onnx.numpy_helper.to_array(init).copy()
        values.reshape(-1).view(np.uint8)[index] ^= 1 << bit
        init.CopyFrom(onnx.numpy_helper.from_array(values, conv.input[1]))
        reference = _ort_each(edited, x)
        assert not torch.equal(reference, _ort_each(path, x))
        ours = _view_each(qmodel, x, FaultPattern.from_faults([("weight", layer, index, bit, "flip")]))
        assert torch.equal(ours.view(torch.int32), reference.view(torch.int32)), index


@pytest.mark.parametrize("largest", [5000, 2**30, 2**31 - 1], ids=["float32", "float64", "wraps"])
def test_dynamic_conv_output_takes_the_zero_point_off_the_taps_inside_the_image(largest: int) -> None:
    """`OrtDynamicConvOutput` against plain integer arithmetic: sum((code - zero point) x weight) over the taps
    inside the image (the view's accumulator pads with 0, ConvInteger with the zero point), wrapped to int32 (an
    accumulator fault can take it past 2^31), to float32, times the float32 product of the scales, plus the bias."""
    import torch.nn.functional as F

    from pytest_hwfault.onnx_reader import OrtDynamicConvOutput

    generator = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(6, 4, 3, stride=2, padding=2, dilation=2, groups=2)
    weight = torch.randint(-128, 128, (4, 3, 3, 3), generator=generator).double()
    output = OrtDynamicConvOutput("layer", torch.full((4,), 3e-3), torch.randn(4, generator=generator), "y", conv)
    codes = torch.randint(0, 256, (3, 6, 7, 8), generator=generator).double()
    scale, zero = torch.rand(3, generator=generator) * 0.1, torch.tensor([0.0, 17.0, 255.0])
    acc = F.conv2d(codes, weight, None, 2, 2, 2, 2)  # zero-padded codes
    acc.view(-1)[5] = float(largest)  # an accumulator fault's value
    ours = output(acc.float() if largest < 2**24 else acc, scale, zero, weight, codes)
    centered = F.conv2d(codes - zero.reshape(-1, 1, 1, 1), weight, None, 2, 2, 2, 2)  # padded with the zero point
    raw = centered.to(torch.int64)
    fault_free = F.conv2d(codes, weight, None, 2, 2, 2, 2).view(-1)[5]
    raw.view(-1)[5] = largest - (int(fault_free) - int(centered.view(-1)[5]))  # the faulty sum minus its correction
    wrapped = (raw + 2**31) % 2**32 - 2**31
    product = (scale.unsqueeze(1) * output.weight_scale).reshape(3, 4, 1, 1)  # float32 products
    expected = wrapped.float() * product + output.bias.reshape(1, 4, 1, 1)
    assert torch.equal(ours.view(torch.int32), expected.view(torch.int32))


def test_onnxruntimes_float_global_average_pool_is_reproduced_and_its_nchwc_kernel_named() -> None:
    """A float GlobalAveragePool ran as torch's mean and was not named: MLAS's kernel sums four lanes, then the rest,
    and differs from torch's by an ulp on most channels. It is reproduced (certified by a probe against the installed
    onnxruntime) where onnxruntime's optimized graph keeps it, and named where onnxruntime runs its NCHWc kernel
    (blocked channels, another order: it does so where it knows the channels, as after a float convolution)."""
    from onnx import TensorProto, helper, numpy_helper

    from pytest_hwfault.onnx_reader import (
        OrtGlobalAveragePool,
        _reproduced,
        _runtime_kernels,
        runtime_global_pool_agrees,
    )

    assert runtime_global_pool_agrees()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 13, 11, generator=generator) * torch.logspace(-3, 3, 8).reshape(1, -1, 1, 1)
    node = helper.make_node("GlobalAveragePool", ["x"], ["y"], name="gap")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    theirs = torch.from_numpy(run_ort(model, {"x": x.numpy()})[0])
    assert torch.equal(OrtGlobalAveragePool()(x).view(torch.int32), theirs.view(torch.int32))
    assert not torch.equal(x.mean((2, 3), keepdim=True).view(torch.int32), theirs.view(torch.int32))
    channels_last = x.contiguous(memory_format=torch.channels_last)  # the same values in another memory order
    assert torch.equal(OrtGlobalAveragePool()(channels_last).view(torch.int32), theirs.view(torch.int32))
    assert _reproduced(node, {}, {}, _runtime_kernels(model))
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16, 3, 3)).astype(np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    after_conv = helper.make_node("GlobalAveragePool", ["c"], ["y"], name="gap")
    graph = helper.make_graph([conv, after_conv], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    kernels = _runtime_kernels(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert kernels is not None and kernels["y_nchwc"][0] == "NCHWc GlobalAveragePool"  # renamed by its output
    assert not _reproduced(after_conv, {}, {}, kernels)


# -- 1-d and 3-d convolutions ----------------------------------------------------------------------------------------
class Signal(torch.nn.Module):
    """A 1-d convolutional model of a 64-sample signal: padding, stride, dilation, groups, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv1d(1, 16, 5, padding=2)
        self.c2 = torch.nn.Conv1d(16, 32, 3, stride=2, padding=1)
        self.c3 = torch.nn.Conv1d(32, 32, 3, padding=2, dilation=2, groups=4)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x.reshape(x.shape[0], 1, 64)))
        x = torch.relu(self.c2(x))
        return self.fc((torch.relu(self.c3(x)) + x).mean(-1))


class Volume(torch.nn.Module):
    """A 3-d convolutional model of a 4 x 4 x 4 volume, global average pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.Conv3d(8, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x.reshape(x.shape[0], 1, 4, 4, 4)))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool3d(x, 1), 1))


@pytest.mark.parametrize("activations", ["u8", "s8"])
@pytest.mark.parametrize("architecture", [Signal, Volume], ids=["conv1d", "conv3d"])
def test_1d_and_3d_convolutions_are_onnxruntimes(digits, tmp_path, activations, architecture) -> None:  # noqa: ANN001
    """QLinearConv on 1-d and 3-d inputs: logits equal to onnxruntime's, checked at load with no warning; a weight
    fault in the first convolution equal to onnxruntime running the edited initializer; every site runs."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = architecture().eval()
    x = images(digits.x_train[:64])
    path = to_onnx_qdq(model, x, tmp_path, activations)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qmodel = quantize(path, x)
    assert qmodel.config["deployed_notes"][0].endswith("fault-free outputs equal bit for bit")
    first = list(qmodel.layers)[0]
    assert len(qmodel.layers) == (4 if architecture is Signal else 3) and first == "c1_Conv"
    assert torch.equal(qmodel(x), torch.from_numpy(run_ort(path, {"x": x.numpy()})[0]))
    proto = onnx.load(str(path))
    conv = next(n for n in proto.graph.node if n.name == "/c1/Conv")
    weight_name = next(n for n in proto.graph.node if n.output[0] == conv.input[1]).input[0]
    init = next(i for i in proto.graph.initializer if i.name == weight_name)
    codes = onnx.numpy_helper.to_array(init).copy()
    codes.reshape(-1).view(np.uint8)[5] ^= 1 << 6
    init.CopyFrom(onnx.numpy_helper.from_array(codes, weight_name))
    ours = qmodel(x, FaultPattern.from_faults([("weight", first, 5, 6, "flip")]))
    assert not torch.equal(ours, qmodel(x))
    assert torch.equal(ours, torch.from_numpy(run_ort(proto, {"x": x.numpy()})[0]))
    labels = qmodel(x).argmax(1)
    for site in ("act", "weight", "acc", "input"):
        assert 0.0 <= accuracy(qmodel, (x, labels), FaultModel(site, 1e-3), seed=1) <= 1.0, site


class Swish(torch.nn.Module):
    """SiLU (x sigmoid(x): QLinearSigmoid, then QLinearMul) and LeakyReLU (QLinearLeakyRelu) between convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.silu(self.c1(x))
        x = torch.nn.functional.leaky_relu(self.c2(x), 0.1)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("activations", ["u8", "s8"])
def test_lookup_table_kernels_are_onnxruntimes(digits, tmp_path, activations) -> None:  # noqa: ANN001
    """onnxruntime runs a QDQ Sigmoid and LeakyRelu as lookup tables over the 256 input codes (QLinearSigmoid,
    QLinearLeakyRelu); the reader measures each table from onnxruntime itself: logits bit for bit, no kernel named as
    computed otherwise; faults at the act site run through the tables."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Swish().eval()
    x = images(digits.x_train[:64])
    path = to_onnx_qdq(model, x, tmp_path, activations)
    kernels = {node.op_type for node in _optimized(path).graph.node}
    qmodel = quantize(path, x)
    tables = [m for m in qmodel.module.modules() if type(m).__name__ == "CodeTable"]
    notes = " | ".join(qmodel.config["deployed_notes"])
    assert "does not reproduce" not in notes
    if activations == "u8":
        assert {"QLinearSigmoid", "QLinearLeakyRelu", "QLinearMul"} <= kernels and len(tables) == 2
        assert torch.equal(qmodel(x), torch.from_numpy(run_ort(path, {"x": x.numpy()})[0]))
    else:  # with int8 activations onnxruntime leaves the first conv, its Sigmoid and the Mul in float: the conv
        # named (its float32 sums round), the Sigmoid computed as its kernel does (MLAS's logistic, certified)
        assert "QLinearLeakyRelu" in kernels and "Sigmoid" in kernels and len(tables) == 1
        assert "('/c1/Conv')" in notes and "not certified" not in notes
        assert torch.equal(qmodel(x), torch.from_numpy(run_ort(path, {"x": x.numpy()})[0]))
    labels = qmodel(x).argmax(1)
    assert accuracy(qmodel, (x, labels), FaultModel("act", 1e-2), seed=1) < 1.0


class Decoder(torch.nn.Module):
    """An encoder-decoder (U-Net-like): max pooling down, then up by a transposed convolution or a Resize (nearest
    or bilinear), a skip concatenation, a constant Pad."""

    def __init__(self, up: str) -> None:
        super().__init__()
        self.up = up
        self.e1, self.e2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 16, 3, padding=1)
        self.t = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.d, self.fc = torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.e1(x))
        b = torch.relu(self.e2(torch.nn.functional.max_pool2d(a, 2)))
        u = self.t(b) if self.up == "transposed" else \
            torch.nn.functional.interpolate(b, scale_factor=2, mode=self.up)[:, :8]
        c = torch.nn.functional.pad(torch.relu(self.d(torch.cat([a, u], 1))), (1, 1, 1, 1))
        return self.fc(c.mean((2, 3)))


@pytest.mark.parametrize("up", ["transposed", "nearest", "bilinear"])
def test_an_encoder_decoder_is_read(digits, tmp_path, up) -> None:  # noqa: ANN001
    """ConvTranspose, Resize and Pad (float ops: onnxruntime runs them in float too): a transposed convolution and a
    nearest Resize give onnxruntime's logits bit for bit; a bilinear Resize, whose float kernel rounds otherwise, is
    named; the transposed convolution's MACs are counted as float ones the faults do not reach."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Decoder(up).eval()
    x = images(digits.x_train[:64])
    path = to_onnx_qdq(model, x, tmp_path, "u8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployedMismatchWarning)
        qmodel = quantize(path, x)
    notes = " | ".join(qmodel.config["deployed_notes"])
    theirs = torch.from_numpy(run_ort(path, {"x": x.numpy()})[0])
    assert len(qmodel.layers) == 4 and "Pad" not in notes.split("by an ulp: ")[-1].split(" | ")[0]
    if up == "bilinear":
        assert "Resize x1" in notes
        assert torch.equal(qmodel(x).argmax(1), theirs.argmax(1))
    else:
        assert torch.equal(qmodel(x), theirs) and "Resize x1" not in notes
    uncovered = [row["module"] for row in measure_coverage(qmodel, x[:2]).uncovered]
    assert uncovered == (["t_ConvTranspose"] if up == "transposed" else [])


@pytest.mark.parametrize(("mode", "exact"), [("nearest", True), ("linear", False)])
def test_resize_and_pad_against_onnxruntime(mode: str, exact: bool) -> None:
    """Resize as torch's exporter writes it (nearest/asymmetric/floor; linear/pytorch_half_pixel) and Pad in three
    modes, one node each, against onnxruntime."""
    from onnx import helper, numpy_helper

    from pytest_hwfault import onnx_float

    x = np.random.default_rng(7).standard_normal((2, 3, 5, 6)).astype(np.float32)
    attrs = {"mode": mode, "coordinate_transformation_mode": "asymmetric" if mode == "nearest" else
             "pytorch_half_pixel", "nearest_mode": "floor"}
    scales = np.array([1, 1, 2, 3], dtype=np.float32)
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(scales, "scales")])
    theirs = run_ort(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": x})[0]
    resize = onnx_float.function("Resize", attrs, 17)
    assert resize is not None
    ours = resize(torch.from_numpy(x), None, torch.from_numpy(scales)).numpy()
    if exact:
        assert np.array_equal(ours, theirs)
    else:
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    for pad_mode in ("constant", "reflect", "edge"):
        pads = np.array([0, 0, 1, 2, 0, 0, 2, 1], dtype=np.int64)
        node = helper.make_node("Pad", ["x", "pads"], ["y"], mode=pad_mode)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(pads, "pads")])
        theirs = run_ort(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": x})[0]
        pad = onnx_float.function("Pad", {"mode": pad_mode}, 17)
        assert pad is not None
        assert np.array_equal(pad(torch.from_numpy(x), torch.from_numpy(pads)).numpy(), theirs), pad_mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("largest", [5000, 2**23, 2**30, 2**31 - 1], ids=["small", "float32", "float64", "wraps"])
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "rows"])
def test_dynamic_output_wraps_its_int32_sum_as_the_kernel_does(dtype: torch.dtype, largest: int, tokens: bool) -> None:
    """`OrtDynamicOutput` against plain integer arithmetic: the accumulator minus zero point x the weight codes'
    column sums, wrapped to int32 (an accumulator fault can take it past 2^31), to float32, times the float32
    product of the scales, plus the bias; for each way it computes it (the difference in float32 below 2^24, in
    float64 below 2^31, in int64 with the wrap past it), float32 and float64 accumulators, [N, T, C] and [N, C]."""
    from pytest_hwfault.onnx_reader import OrtDynamicOutput

    generator = torch.Generator().manual_seed(3)
    weight = torch.randint(-128, 128, (6, 40), generator=generator).float()  # [out, in]
    output = OrtDynamicOutput("layer", torch.rand(6, generator=generator) * 1e-2, torch.randn(6, generator=generator))
    acc = torch.randint(-largest, largest + 1, (4, 3, 6) if tokens else (4, 6), generator=generator).to(dtype)
    acc[0] = torch.randint(-5000, 5000, acc.shape[1:], generator=generator).to(dtype)
    acc.view(-1)[7] = largest  # the largest magnitude reached, whatever the draw
    scale, zero = torch.rand(4, generator=generator) * 0.1, torch.tensor([0.0, 17.0, 128.0, 255.0])
    if largest == 5000:
        zero.zero_()  # the correction small too: the float32 difference
    ours = output(acc, scale, zero, weight)
    sums = [int(v) for v in weight.sum(1).tolist()]
    flat_acc, flat_ours = acc.reshape(4, -1, 6), ours.reshape(4, -1, 6)
    for n in range(4):
        product = (scale[n] * output.weight_scale).tolist()  # float32 products
        for t in range(flat_acc.shape[1]):
            for o in range(6):
                raw = int(flat_acc[n, t, o]) - int(zero[n]) * sums[o]
                raw = (raw + 2**31) % 2**32 - 2**31
                expected = torch.tensor(float(raw), dtype=torch.float32) * torch.tensor(product[o]) + output.bias[o]
                assert flat_ours[n, t, o].view(torch.int32) == expected.view(torch.int32), (n, t, o)


class Padded(torch.nn.Module):
    """A convolution, a constant Pad of its output, another convolution on the padded codes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 8, 3)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.pad(torch.relu(self.c1(x)), (1, 1, 1, 1))
        return self.fc(torch.relu(self.c2(y)).mean((2, 3)))


def test_a_pad_with_a_value_off_the_grid_is_regridded_as_onnxruntime_does(digits, tmp_path) -> None:  # noqa: ANN001
    """A constant Pad of a quantized value with a value its grid does not hold (0.3, given as the op's input, as
    opset 11 on writes it): the value is read (not the attribute's default 0), and the padded tensor is not taken as
    already on the grid; the logits are onnxruntime's."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Padded().eval()
    x = images(digits.x_train[:64])
    proto = onnx.load(str(to_onnx_qdq(model, x, tmp_path, "u8")))
    pad = next(n for n in proto.graph.node if n.op_type == "Pad")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.3, dtype=np.float32), "pad_value"))
    while len(pad.input) < 3:
        pad.input.append("")
    pad.input[2] = "pad_value"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployedMismatchWarning)
        qmodel = quantize(proto, x)
    assert torch.equal(qmodel(x), torch.from_numpy(run_ort(proto, {"x": x.numpy()})[0]))


def _fixed_batch_qdq(model: torch.nn.Module, calibration: torch.Tensor, folder: pathlib.Path) -> pathlib.Path:
    """`model` exported with no dynamic axis (its input and output fixed to batch 1, as torch.onnx.export gives
    by default) and quantized by onnxruntime, calibrated one image at a time, as such a graph runs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_path, path = folder / "float.onnx", folder / "qdq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (calibration[:1],), str(float_path), dynamo=False, input_names=["x"],
                          output_names=["logits"], opset_version=17)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.images = iter([{"x": calibration[i:i + 1].numpy()} for i in range(len(calibration))])

        def get_next(self) -> dict | None:
            return next(self.images, None)

    quantize_static(str(float_path), str(path), Reader(), per_channel=True, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


class _Head(torch.nn.Module):
    def __init__(self, reshape_to_one: bool) -> None:
        super().__init__()
        self.conv, self.fc, self.reshape_to_one = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Linear(8 * 64, 10), \
            reshape_to_one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.reshape(1, -1) if self.reshape_to_one else h.flatten(1))


def test_a_graph_with_a_fixed_batch_size_is_checked_as_it_runs_or_refused_saying_how_to_export_it(
        digits, tmp_path) -> None:  # noqa: ANN001
    """A model exported without a dynamic batch axis runs one image per call on onnxruntime: the load check fed it
    64 images, onnxruntime refused, and the view was gated unchecked ('its arithmetic is not known to be the
    engine's'); a graph that reshapes to [1, -1] died in a bare 'mat1 and mat2 shapes cannot be multiplied'. The
    check now runs onnxruntime one image at a time (fault-free and under faults), and a graph that cannot compute
    a batch is refused naming its input and the export option."""
    torch.manual_seed(0)
    calibration = images(digits.x_train[:32])
    x = images(digits.x_test[:40])
    flat = _fixed_batch_qdq(_Head(False), calibration, tmp_path)
    qmodel = quantize(flat, calibration)
    notes = qmodel.config["deployed_notes"]
    assert notes[0] == ("checked against onnxruntime on 32 calibration images: output codes of its 2 quantized layers "
                        "equal, and fault-free outputs equal bit for bit")
    assert notes[1].startswith("checked against onnxruntime under a trial of act faults") and \
        notes[1].endswith("on 1 calibration images: output codes of its 2 quantized layers equal, and outputs equal "
                          "bit for bit"), notes[1]
    assert any(note.startswith("the graph fixes its batch size to 1 (inputs 'x' [1, 1, 8, 8])") for note in notes)
    theirs = torch.cat([torch.from_numpy(run_ort(flat, {"x": x[i:i + 1].numpy()})[0]) for i in range(len(x))])
    with torch.no_grad():
        assert torch.equal(qmodel(x), theirs)
    folder = tmp_path / "one"
    folder.mkdir()
    reshaped = _fixed_batch_qdq(_Head(True), calibration, folder)
    with pytest.raises(DeployedFormatError, match=r"onnx: the graph fixes its batch size to 1 \(inputs 'x' "
                                                  r"\[1, 1, 8, 8\]\) and does not compute a batch of 2 images "
                                                  r"\(RuntimeError: .*\): the engine runs images in batches\. "
                                                  r"To gate it, export the model with a dynamic batch dimension"):
        quantize(reshaped, calibration)


def _qdq(value: str, scale: str, name: str) -> list[Any]:
    """QuantizeLinear -> DequantizeLinear of activation `value` on (`scale`, zero point "z"): `value`q, `value`d."""
    return [onnx.helper.make_node("QuantizeLinear", [value, scale, "z"], [f"{value}q"], name=f"q{name}"),
            onnx.helper.make_node("DequantizeLinear", [f"{value}q", scale, "z"], [f"{value}d"], name=f"dq{name}")]


def _grid_constants() -> list[Any]:
    """Input scale xs, activation scale ys, uint8 zero point z."""
    return [onnx.numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
            onnx.numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
            onnx.numpy_helper.from_array(np.array(128, np.uint8), "z")]


def _two_matmuls(first_weight: onnx.TensorProto, scale: np.ndarray, attributes: dict[str, int]) -> Any:
    """x (uint8 QDQ) -> MatMul(first_weight, DequantizeLinear with `attributes`) -> QDQ -> MatMul (per-tensor int8
    weight) -> QDQ: opset 21."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    width = onnx.numpy_helper.to_array(first_weight).shape[1]
    constants = [first_weight, numpy_helper.from_array(scale, "ws"),
                 numpy_helper.from_array(rng.integers(-127, 128, size=(width, 4)).astype(np.int8), "W2"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "w2s"), *_grid_constants()]
    nodes = [*_qdq("x", "xs", "x"),
             helper.make_node("DequantizeLinear", ["W", "ws"], ["Wd"], name="dqw", **attributes),
             helper.make_node("MatMul", ["xd", "Wd"], ["h"], name="first"),
             *_qdq("h", "ys", "h"),
             helper.make_node("DequantizeLinear", ["W2", "w2s"], ["W2d"], name="dqw2"),
             helper.make_node("MatMul", ["hd", "W2d"], ["y0"], name="second"),
             helper.make_node("QuantizeLinear", ["y0", "ys", "z"], ["yq"], name="qy"),
             helper.make_node("DequantizeLinear", ["yq", "ys", "z"], ["y"], name="dqy")]
    inputs = onnx.numpy_helper.to_array(first_weight).shape[0]
    graph = helper.make_graph(nodes, "blocked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("axis", "block"), [(0, 4), (1, 3), (1, 16)])
def test_blocked_and_int4_weights_run_in_float_as_onnxruntime_computes_them_named(axis: int, block: int) -> None:
    """Opset 21's blocked quantization (a scale per `block_size` codes along an axis) was read as per-channel scales:
    a 16x16 weight blocked along its output axis passed as a layer with the wrong scales (2% of outputs equal to
    onnxruntime's, a DeployedMismatchWarning its only sign), other shapes died in a bare numpy broadcast error. The
    engine's layers hold one scale per output channel: such a weight is dequantized as onnxruntime does and its
    MatMul runs in float, named; so is an int4 weight."""
    rng = np.random.default_rng(1)
    codes = rng.integers(-127, 128, size=(16, 16)).astype(np.int8)
    shape = [16, 16]
    shape[axis] = -(-16 // block)
    scale = (rng.random(shape) * 0.01 + 0.001).astype(np.float32)
    blocked = _two_matmuls(onnx.numpy_helper.from_array(codes, "W"), scale, {"axis": axis, "block_size": block})
    x = torch.from_numpy(rng.standard_normal((32, 16)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)
        qmodel = quantize(blocked, x)
    assert list(qmodel.layers) == ["second"]
    assert f"node 'first' (MatMul) runs in float, outside the fault sites: its weight is quantized in blocks " \
           f"({block} codes along axis {axis} share a scale)" in " ".join(qmodel.config["deployed_notes"])
    with torch.no_grad():
        assert torch.equal(qmodel(x), torch.from_numpy(run_ort(blocked, {"x": x.numpy()})[0]))
    report = measure_coverage(qmodel, x[:4])
    assert report.macs == pytest.approx(64 / (16 * 16 + 64)) and report.uncovered[0]["module"] == "first", report
    ml_dtypes = pytest.importorskip("ml_dtypes")
    int4 = _two_matmuls(onnx.numpy_helper.from_array(rng.integers(-8, 8, size=(16, 16)).astype(ml_dtypes.int4), "W"),
                        scale[:1].reshape(-1)[:1].reshape(()) if axis == 0 else np.full(16, 0.01, np.float32), {})
    qmodel = quantize(int4, x)
    assert "its weight is not a dequantized int8 initializer (int4 codes)" in " ".join(qmodel.config["deployed_notes"])
    with torch.no_grad():
        assert torch.equal(qmodel(x), torch.from_numpy(run_ort(int4, {"x": x.numpy()})[0]))


def test_blocked_scales_of_the_wrong_shape_are_refused_by_node() -> None:
    codes = np.ones((16, 16), np.int8)
    model = _two_matmuls(onnx.numpy_helper.from_array(codes, "W"), np.full((16, 4), 0.01, np.float32),
                         {"axis": 0, "block_size": 4})
    with pytest.raises(DeployedFormatError, match=r"onnx: node 'dqw' \(DequantizeLinear\): blocked scales of shape "
                                                  r"\[16, 4\] .* for codes of shape \[16, 16\], block_size 4 along "
                                                  r"axis 0"):
        quantize(model, torch.zeros(4, 16))


def test_codes_typed_by_output_dtype_without_a_zero_point_are_signed() -> None:
    """A QuantizeLinear without a zero point takes its codes' type from `output_dtype` (opset 21): int8 codes were
    read as uint8, clamping every negative activation to zero (2% of outputs equal to onnxruntime's, 9.75 apart; a
    DeployedMismatchWarning its only sign)."""
    rng = np.random.default_rng(2)
    model = _two_matmuls(onnx.numpy_helper.from_array(rng.integers(-127, 128, size=(16, 8)).astype(np.int8), "W"),
                         np.array(0.01, np.float32), {})
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] not in ("W", "W2"):
            del node.input[2]
            if node.op_type == "QuantizeLinear":
                node.attribute.append(onnx.helper.make_attribute("output_dtype", onnx.TensorProto.INT8))
    onnx.checker.check_model(model)
    x = torch.from_numpy(rng.standard_normal((32, 16)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployedMismatchWarning)  # onnxruntime runs such layers in float (named)
        qmodel = quantize(model, x)
    assert all(layer.signed_activations and layer.act_zero_point == 0 for layer in qmodel.layers.values())
    theirs = torch.from_numpy(run_ort(model, {"x": x.numpy()})[0])
    assert theirs.min() < 0
    with torch.no_grad():
        figures = agreement(theirs, qmodel(x), qmodel.layers["second"].act_scale)
    assert figures["exact"] >= 0.99 and figures["max_codes"] < 1.001, figures
    uint16 = copy.deepcopy(model)
    for node in uint16.graph.node:
        for attribute in node.attribute:
            if attribute.name == "output_dtype":
                attribute.i = onnx.TensorProto.UINT16
    with pytest.raises(DeployedFormatError, match=r"node 'qx' \(QuantizeLinear\): activation codes of type uint16 "
                                                  r"are not supported \(int8/uint8 only\)"):
        quantize(uint16, x)


def test_a_dequantize_linear_on_another_grid_than_its_quantize_linear_is_refused_by_node() -> None:
    """A DequantizeLinear reading a QuantizeLinear's codes with another scale: the view kept the QuantizeLinear's
    values (32% of outputs equal to onnxruntime's, 1.8 apart; a DeployedMismatchWarning its only sign)."""
    rng = np.random.default_rng(3)
    model = _two_matmuls(onnx.numpy_helper.from_array(rng.integers(-127, 128, size=(16, 8)).astype(np.int8), "W"),
                         np.array(0.01, np.float32), {})
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.07, np.float32), "other"))
    dequantize = next(node for node in model.graph.node if node.name == "dqh")
    dequantize.input[1] = "other"
    x = torch.from_numpy(rng.standard_normal((8, 16)).astype(np.float32))
    with pytest.raises(DeployedFormatError, match=r"onnx: node 'dqh' \(DequantizeLinear\): reads the codes of "
                                                  r"QuantizeLinear 'qh' \(scale 0.05.*, zero point 128\) with scale "
                                                  r"\[0.07.*\] and zero point \[128\]: only a DequantizeLinear on "
                                                  r"its QuantizeLinear's own scale and zero point is supported"):
        quantize(model, x)


def _pooled(pool: str, attributes: dict[str, Any]) -> Any:
    """x (uint8 QDQ) -> Conv -> QDQ -> `pool` -> QDQ -> Conv -> QDQ, on 1 x 12 x 12 images (opset 19)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    constants = [numpy_helper.from_array(rng.integers(-127, 128, size=(4, 1, 3, 3)).astype(np.int8), "W"),
                 numpy_helper.from_array(rng.integers(-127, 128, size=(4, 4, 3, 3)).astype(np.int8), "W2"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "ws"), *_grid_constants()]
    nodes = [*_qdq("x", "xs", "x"),
             helper.make_node("DequantizeLinear", ["W", "ws"], ["Wd"], name="dqw"),
             helper.make_node("Conv", ["xd", "Wd"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             *_qdq("h", "ys", "h"),
             helper.make_node(pool, ["hd"], ["p"], name="pool", **attributes),
             *_qdq("p", "ys", "p"),
             helper.make_node("DequantizeLinear", ["W2", "ws"], ["W2d"], name="dqw2"),
             helper.make_node("Conv", ["pd", "W2d"], ["y0"], name="c2"),
             helper.make_node("QuantizeLinear", ["y0", "ys", "z"], ["yq"], name="qy"),
             helper.make_node("DequantizeLinear", ["yq", "ys", "z"], ["y"], name="dqy")]
    graph = helper.make_graph(nodes, "pooled",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def test_pool_attributes_are_read_as_onnx_defines_them_or_refused() -> None:
    """ONNX's MaxPool strides default to 1, not to the kernel (PyTorch's default): a MaxPool without strides was
    read with stride 2 (outputs 4 x 4 where onnxruntime's are 9 x 9, a DeployedMismatchWarning its only sign). An
    AveragePool's dilations (opset 19) were ignored; onnxruntime's fused kernel has none (its session fails), so
    the reader refuses them by name."""
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((16, 1, 12, 12)).astype(np.float32))
    for attributes in ({"kernel_shape": [2, 2]}, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "dilations": [2, 2]}):
        model = _pooled("MaxPool", attributes)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeployedMismatchWarning)
            qmodel = quantize(model, x)
        with torch.no_grad():
            assert torch.equal(qmodel(x), torch.from_numpy(run_ort(model, {"x": x.numpy()})[0])), attributes
    with pytest.raises(DeployedFormatError, match=r"node 'pool' \(AveragePool\): only 2-d AveragePool with explicit "
                                                  r"pads, ceil_mode=0 and no dilations is supported"):
        quantize(_pooled("AveragePool", {"kernel_shape": [2, 2], "dilations": [2, 2]}), x)


def test_a_model_with_external_data_is_read_from_its_path_or_refused_unloaded(qdq, digits, tmp_path) -> None:  # noqa: ANN001
    """Initializers kept as external data (a large model's usual form): read from the path or a ModelProto that
    loaded them; a ModelProto loaded without them died in onnx's ValidationError, naming a file, not what to do."""
    saved = tmp_path / "external.onnx"
    onnx.save_model(onnx.load(str(qdq["u8"])), str(saved), save_as_external_data=True, location="external.data",
                    size_threshold=0)
    x = images(digits.x_test[:16])
    for given in (saved, onnx.load(str(saved))):
        assert list(quantize(given, x).layers) == LAYERS
    with pytest.raises(DeployedFormatError, match=r"onnx: the ModelProto holds \d+ initializer\(s\) as external data "
                                                  r"it did not load .*: pass the model's path, or onnx.load\(path\) "
                                                  r"with load_external_data=True"):
        quantize(onnx.load(str(saved), load_external_data=False), x)


def test_a_gemm_bias_per_row_is_refused_by_node() -> None:
    """A Gemm's C broadcast over its rows ([M, N] or [M, 1]) is no bias per output: it died in a bare RuntimeError
    ("The size of tensor a (8) must match the size of tensor b (256)")."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((4, 16)).astype(np.float32))
    for shape, refused in (((8,), False), ((1, 8), False), ((1,), False), ((4, 8), True), ((4, 1), True)):
        model = _two_matmuls(onnx.numpy_helper.from_array(rng.integers(-127, 128, size=(16, 8)).astype(np.int8),
                                                          "W"), np.array(0.01, np.float32), {})
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.full(shape, 0.1, np.float32), "C"))
        first = next(node for node in model.graph.node if node.name == "first")
        first.op_type = "Gemm"
        first.input.append("C")
        if refused:
            with pytest.raises(DeployedFormatError, match=rf"onnx: node 'first' \(Gemm\): a bias of shape "
                                                          rf"\[{', '.join(map(str, shape))}\] \(not one value per "
                                                          r"output.*only a bias of shape \[8\] or \[1\] is supported"):
                quantize(model, x)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeployedMismatchWarning)  # a float bias: onnxruntime's float Gemm
                assert list(quantize(model, x).layers) == ["first", "second"]
