"""Models quantized with torchao PT2E (`prepare_pt2e` / `convert_pt2e`) run with the graph's own codes and scales."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from deployed_models import agreement, images, to_pt2e, trained_resnet_style
from torch import fx

from pytest_hwfault import FaultModel, FaultPattern, accuracy, quantize
from pytest_hwfault.deployed import DeployedFormatError, Requantize
from pytest_hwfault.faults import Site, sample_pattern
from pytest_hwfault.quantization import state_checksum

pytest.importorskip("torchao")

QUANTIZE = "quantized_decomposed.quantize_per_tensor"


@pytest.fixture(scope="module")
def pt2e_model(digits):  # noqa: ANN001, ANN201
    return to_pt2e(trained_resnet_style(digits), images(digits.x_train[:512]))


@pytest.fixture(scope="module")
def pt2e_qmodel(pt2e_model, digits):  # noqa: ANN001, ANN201
    return quantize(pt2e_model, images(digits.x_train[:256]))


class Edited(fx.Interpreter):
    """Runs a PT2E graph as it is, recording every quantize node's codes by the name of the value it quantizes;
    `act`: (value name, image, flat index, bit) flips one stored code; `weights`: get_attr targets replaced."""

    def __init__(self, model: fx.GraphModule, act: tuple[str, int, int, int] | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(model)
        self.act, self.weights, self.codes = act, weights or {}, {}

    def fetch_attr(self, target: str) -> Any:
        return self.weights[target] if target in self.weights else super().fetch_attr(target)

    def run_node(self, node: fx.Node) -> Any:
        out = super().run_node(node)
        if node.op == "call_function" and QUANTIZE in str(node.target):
            source = node.args[0].name  # type: ignore[union-attr]
            if self.act is not None and self.act[0] == source:
                _, image, index, bit = self.act
                out = out.clone()
                flat = out[image].view(-1)
                flat[index] = int(flat[index]) ^ (1 << bit)  # uint8 codes: no sign extension
            self.codes[source] = out
        return out


def run_graph(model: fx.GraphModule, x: torch.Tensor, **edits: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    interpreter = Edited(model, **edits)
    with torch.no_grad():
        return interpreter.run(x), interpreter.codes


def engine_codes(qmodel: Any, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's logits and the codes of its Requantize module `name`."""
    module = qmodel.module.get_submodule(name)
    assert isinstance(module, Requantize)
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        logits = qmodel(x)
    finally:
        handle.remove()
    return logits, (seen[0] / module.scale).round() + module.zero_point


def weight_attr(model: fx.GraphModule, layer: str) -> str:
    """The get_attr target of the int8 weight codes of the conv/linear of module `layer`."""
    for node in model.graph.nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if node.op == "call_function" and ("conv" in str(node.target) or "linear" in str(node.target)) and stack \
                and stack[-1][0] == layer:
            return str(node.args[1].args[0].target)
    raise AssertionError(layer)


def test_pt2e_codes_and_scales_are_used_and_outputs_match(pt2e_model, pt2e_qmodel, digits) -> None:  # noqa: ANN001
    x = images(digits.x_test)
    qmodel = pt2e_qmodel
    assert qmodel.config["source"] == "pt2e"
    # x86's PT2E pattern quantizes conv(+relu) outputs; a conv feeding a residual add and the last linear keep a
    # float result: layers with an integer accumulator and no output codes (noted)
    assert list(qmodel.layers) == ["stem", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "fc"]
    float_out = [name for name, layer in qmodel.layers.items() if layer.float_output]
    assert float_out == ["block1.conv2", "block2.conv2", "fc"]
    assert sum("no act site" in note for note in qmodel.config["deployed_notes"]) == 3
    # the graph's float32 conv sums, against the engine's exact integer ones: each part compared on the graph's own
    # input at load, fault-free and under act faults; codes apart only at near-ties of the float sums
    check = qmodel.config["deployed_notes"][0]
    assert check.startswith("checked part by part against the graph (torch running it) on 16 calibration images, "
                            "fault-free and under act faults (BER 0.01 in every activation code the graph stores), "
                            "each of its 6 quantized layers and 5 re-griddings given the graph's own input: every "
                            "part computes the graph's arithmetic")
    assert qmodel.config["view_mismatch"] == []
    assert all(qmodel.layers[name].numel(Site.ACT) == 0 for name in float_out)
    assert {t.layer for t in qmodel.targets(Site.ACC)} == set(qmodel.layers)
    stem = qmodel.layers["stem"]
    assert torch.equal(stem.weight_codes, getattr(pt2e_model, weight_attr(pt2e_model, "stem")).to(torch.int32))
    assert stem.act_zero_point == 0 and stem.act_range == (0, 255) and stem.input_range == (0, 255)

    reference, graph_codes = run_graph(pt2e_model, x)
    ours, fc_codes = engine_codes(qmodel, x, "requantize_flatten")
    # the codes the last linear reads (uint8, after pooling): measured 6349 of 6352 equal, 3 one code apart
    scale = qmodel.module.get_submodule("requantize_flatten").scale
    codes = agreement(graph_codes["flatten"].float() * scale, fc_codes * scale, scale)
    assert codes["exact"] >= 0.999 and codes["max_codes"] < 1.01, codes
    # each layer's output codes: measured 2 (block1.conv1) and 26 (block2.conv1) of 406528 one code apart on an Intel
    # CPU with AMX, 90 (block2.conv1) on an AMD EPYC: the graph's float convolution rounds its sums the CPU's way,
    # where the engine's are exact integers, so a code at a rounding tie may land one apart
    for name, value in (("stem", "relu"), ("block1.conv1", "relu_1"), ("block2.conv1", "relu_3")):
        layer = qmodel.layers[name]
        seen: list[torch.Tensor] = []
        handle = layer.module.register_forward_hook(
            lambda m, a, out, layer=layer, seen=seen: seen.append(layer.dequantize_output(out)))
        try:
            qmodel(x)
        finally:
            handle.remove()
        differ = ((seen[0] / layer.act_scale).round() - graph_codes[value].float()).abs()
        assert float(differ.max()) <= 1.0 and float((differ == 0).float().mean()) >= 0.999, name
    # logits (the float result of the last linear): equal predictions; wherever the fc codes are equal, equal up to
    # float32 rounding (the engine scales its exact integer accumulator, the graph sums float products)
    assert torch.equal(reference.argmax(1), ours.argmax(1))
    same_codes = (graph_codes["flatten"].float() == fc_codes).all(1)
    assert_float_equal(ours[same_codes], reference[same_codes])
    assert float(same_codes.float().mean()) >= 0.99


def assert_float_equal(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal up to float32 rounding of a sum of ~100 products (measured: at most ~1e-6 of the logits' range)."""
    assert float((ours - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def faulty_pair(pt2e_model, qmodel, x, fault, **edit):  # noqa: ANN001, ANN201
    reference, _ = run_graph(pt2e_model, x, **edit)
    return reference, qmodel(x, FaultPattern.from_faults([fault]))


@pytest.mark.parametrize(("layer", "value", "index", "bit"), [
    ("stem", "relu", 100, 7), ("block1.conv1", "relu_1", 5, 6), ("block2.conv1", "relu_3", 777, 7),
    ("block2.conv1", "relu_3", 300, 5)])
def test_pt2e_single_activation_fault_matches_the_edited_graph(pt2e_model, pt2e_qmodel, digits, layer, value,
                                                               index, bit) -> None:  # noqa: ANN001
    x = images(digits.x_test[:8])
    clean, _ = run_graph(pt2e_model, x)
    assert_float_equal(pt2e_qmodel(x), clean)  # these images: the same codes fault-free
    reference, ours = faulty_pair(pt2e_model, pt2e_qmodel, x, ("act", layer, index, bit, "flip", 2),
                                  act=(value, 2, index, bit))
    assert not torch.equal(reference, clean)
    assert_float_equal(ours, reference)


@pytest.mark.parametrize(("layer", "index", "bit"), [("stem", 3, 6), ("block1.conv1", 500, 7),
                                                     ("block2.conv1", 2000, 5), ("block1.conv2", 1000, 7),
                                                     ("fc", 17, 6)])
def test_pt2e_single_weight_fault_matches_the_edited_graph(pt2e_model, pt2e_qmodel, digits, layer, index,
                                                           bit) -> None:  # noqa: ANN001
    x = images(digits.x_test[:8])
    target = weight_attr(pt2e_model, layer)
    weight = getattr(pt2e_model, target).clone()
    flat = weight.view(torch.uint8).view(-1)  # int8 two's complement: bit 7 is the sign
    flat[index] ^= 1 << bit
    reference, ours = faulty_pair(pt2e_model, pt2e_qmodel, x, ("weight", layer, index, bit, "flip"),
                                  weights={target: weight})
    clean, _ = run_graph(pt2e_model, x)
    assert not torch.equal(reference, clean)
    assert torch.equal(reference.argmax(1), ours.argmax(1))
    assert_float_equal(ours, reference)


def test_pt2e_every_site_runs_and_counts_accuracy(pt2e_qmodel, digits) -> None:  # noqa: ANN001
    qmodel = pt2e_qmodel
    x, y = images(digits.x_test[:16]), digits.y_test[:16]
    for site in ("act", "weight", "acc", "input", "qparams"):
        model = FaultModel(site, 1e-3)
        pattern = sample_pattern(model, qmodel.targets(model.site), len(x), torch.Generator().manual_seed(1))
        assert len(pattern) > 0, site
        expected = sum(int(row.argmax()) == int(label) for row, label in zip(qmodel(x, pattern), y)) / len(x)
        assert accuracy(qmodel, (x, y), model, seed=1) == expected, site


def test_pt2e_model_is_not_modified_and_still_refuses_eval(pt2e_model, digits) -> None:  # noqa: ANN001
    before = state_checksum(pt2e_model)
    graph_before = str(pt2e_model.graph)
    qmodel = quantize(pt2e_model, images(digits.x_train[:64]))
    qmodel.module.eval()  # the engine's copy accepts eval()
    assert state_checksum(pt2e_model) == before and str(pt2e_model.graph) == graph_before
    with pytest.raises(NotImplementedError):
        pt2e_model.eval()  # convert_pt2e's own guard, left in place


@pytest.mark.parametrize(("node", "layer", "outputs", "unit"), [
    ("conv2d_1", "block1.conv1", 16384, "codes"),  # output codes
    ("linear", "fc", 160, "times the float32 rounding allowed"),  # a float result: the logits
])
def test_a_view_computing_a_part_of_the_graph_otherwise_is_named_and_refused(pt2e_model, digits, monkeypatch,  # noqa: ANN001
                                                                          node, layer, outputs, unit) -> None:  # noqa: ANN001
    """A converted PT2E graph had no load check: its float32 sums round near-ties otherwise than the engine's exact
    integer ones, so its outputs cannot be asked to equal the view's, and a view that misread the graph (here one
    weight code of one layer) was gated silently. Each part of the view is now given the graph's own input and must
    give the graph's output, up to the graph's float32 rounding: the misread layer is named, the view refused."""
    import pytest_hwfault.pt2e as pt2e
    from pytest_hwfault.campaign import Campaign
    from pytest_hwfault.evaluate import EvaluationError
    from pytest_hwfault.quantization import DeployedMismatchWarning
    from pytest_hwfault.spec import CampaignSpec

    read_weight = pt2e._weight

    def misread(model: Any, weight: fx.Node, read: fx.Node, ops: Any) -> Any:
        codes, scales, values = read_weight(model, weight, read, ops)
        if read.name == node:
            codes = codes.clone()
            first = codes.view(-1)
            first[0] += 1 if first[0] < 127 else -1
        return codes, scales, values

    x = images(digits.x_train[:64])
    monkeypatch.setattr(pt2e, "_weight", misread)
    with pytest.warns(DeployedMismatchWarning) as caught:
        qmodel = quantize(pt2e_model, x)
    note = qmodel.config["deployed_notes"][0]
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [note] == qmodel.config["view_mismatch"]
    assert re.search(rf"fault-free, '{layer}' computes otherwise than the graph: \d+ of {outputs} outputs apart "
                     rf"where the graph's float32 rounding does not explain it \(up to [\d.e+]+ {unit}; 1 of 11 "
                     r"parts apart\)", note), note
    spec = CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=2, first=2)
    with pytest.raises(EvaluationError, match=r"does not compute what the model computes: checked part by part"):
        Campaign(qmodel, x, qmodel(x).argmax(1), spec, "t")


def test_a_view_connecting_its_parts_otherwise_than_the_graph_is_named_and_refused(pt2e_model, digits,  # noqa: ANN001
                                                                                  monkeypatch) -> None:  # noqa: ANN001
    """Each part given the graph's own input proves each part's arithmetic, not how the view connects them: a view
    whose residual ReLU went missing between two parts passed every part's comparison, and a converted graph has no
    outputs' comparison (its float32 sums round near-ties otherwise). Each part's output is now also replaced by the
    graph's, and each part's input, as the view computes it from them, must be the graph's: the part after the
    missing op is named and the view refused."""
    import pytest_hwfault.pt2e as pt2e
    from pytest_hwfault.quantization import DeployedMismatchWarning

    read = pt2e.read_pt2e

    def without_a_relu(*args: Any, **kwargs: Any) -> Any:
        deployed = read(*args, **kwargs)
        graph = deployed.module.graph
        relu = next(node for node in graph.nodes if node.name == "relu_2")  # after block1's residual sum
        relu.replace_all_uses_with(relu.args[0])
        graph.erase_node(relu)
        deployed.module.recompile()
        return deployed

    x = images(digits.x_train[:64])
    assert "each part's input, computed by the view from the graph's outputs of the parts before it, is the " \
           "graph's (11 parts)" in quantize(pt2e_model, x).config["deployed_notes"][0]
    monkeypatch.setattr(pt2e, "read_pt2e", without_a_relu)
    with pytest.warns(DeployedMismatchWarning, match=r"every part computes the graph's arithmetic, but the view hands "
                                                     r"'requantize_relu_2' another input than the graph does: \d+ of "
                                                     r"\d+ values apart"):
        qmodel = quantize(pt2e_model, x)
    assert len(qmodel.config["view_mismatch"]) == 1


def test_the_part_by_part_check_under_faults_finds_what_calibration_values_never_show(pt2e_model, digits  # noqa: ANN001
                                                                                     ) -> None:
    """Under act faults the parts compute on codes calibration never produced. A re-gridding that is wrong only on
    inputs above anything fault-free passes the fault-free comparison and is named under faults."""
    from pytest_hwfault.graph_agreement import part_agreement
    from pytest_hwfault.pt2e import read_pt2e

    x = images(digits.x_train[:64])
    qmodel = quantize(pt2e_model, x)
    origins = read_pt2e(pt2e_model, x, 64, "cpu").origins
    name = "requantize_relu_2"  # the residual sum after its ReLU, re-gridded
    assert name in origins
    module = qmodel.module.get_submodule(name)
    assert isinstance(module, Requantize)
    seen: list[float] = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(float(args[0].max())))
    qmodel(x)
    handle.remove()
    threshold, regrid = seen[0] * 1.05, module.forward

    def wrong_above(value: torch.Tensor) -> torch.Tensor:
        out = regrid(value)
        return torch.where(value > threshold, out + module.scale, out)

    module.forward = wrong_above  # type: ignore[method-assign]
    clean = part_agreement(pt2e_model, qmodel, x, origins)
    faulty = part_agreement(pt2e_model, qmodel, x, origins, ber=1e-2)
    assert clean.apart == () and clean.parts == 11
    # the faults reach the graph (only under them is the wrong re-gridding found), and every other part agrees
    assert [part[0] for part in faulty.apart] == [name] and faulty.apart[0][3] == 1.0


def _edited(model: fx.GraphModule, edit: Any) -> fx.GraphModule:
    graph = copy.deepcopy(model.graph)
    edit(graph)
    return fx.GraphModule(model, graph)


def test_pt2e_unsupported_nodes_are_named(pt2e_model, digits) -> None:  # noqa: ANN001
    x = images(digits.x_train[:32])

    def int16_grid(graph: fx.Graph) -> None:
        node = next(n for n in graph.nodes if "dequantize_per_tensor" in str(n.target))
        node.args = (*node.args[:5], torch.int16)

    with pytest.raises(DeployedFormatError, match=r"pt2e: node 'dequantize_per_tensor_default' .*unsupported grid"):
        quantize(_edited(pt2e_model, int16_grid), x)

    def codes_read_directly(graph: fx.Graph) -> None:  # a float op on the uint8 codes of the input
        node = next(n for n in graph.nodes if QUANTIZE in str(n.target))
        with graph.inserting_after(node):
            graph.call_function(torch.ops.aten.add.Tensor, (node, node))

    with pytest.raises(DeployedFormatError, match=r"pt2e: node 'add_tensor' .*reads the int8/uint8 codes"):
        quantize(_edited(pt2e_model, codes_read_directly), x)

    def float_weight(graph: fx.Graph) -> None:
        conv = next(n for n in graph.nodes if "conv2d" in str(n.target))
        conv.args = (conv.args[0], conv.args[1].args[1], *conv.args[2:])  # the weight's float scales

    with pytest.raises(DeployedFormatError, match=r"pt2e: node 'conv2d' .*not a dequantized int8 constant"):
        quantize(_edited(pt2e_model, float_weight), x)


def test_pt2e_layer_the_quantizer_left_in_float_stays_float_and_is_named(pt2e_model, digits) -> None:  # noqa: ANN001
    """A linear on an unquantized input (a quantizer's choice: ViT's packed attention projection under
    X86InductorQuantizer) runs in float, outside the fault sites; the notes and the coverage name it."""
    from pytest_hwfault.coverage import measure_coverage

    def float_head(graph: fx.Graph) -> None:  # the last linear reads the float value its quantize node read
        linear = next(n for n in graph.nodes if "linear" in str(n.target))
        dequantize = linear.args[0]
        quant = dequantize.args[0]
        linear.args = (quant.args[0], *linear.args[1:])
        graph.erase_node(dequantize)
        graph.erase_node(quant)

    edited = _edited(pt2e_model, float_head)
    x = images(digits.x_test[:64])
    qmodel = quantize(edited, images(digits.x_train[:64]))
    assert "fc" not in qmodel.layers and len(qmodel.layers) == 5
    assert any("layer 'fc' (linear)" in note and "in float" in note for note in qmodel.config["deployed_notes"])
    coverage = measure_coverage(qmodel, x)
    assert coverage.macs < 1.0 and [row["module"] for row in coverage.uncovered] == ["fc"], coverage.describe()
    reference, _ = run_graph(edited, x)
    assert torch.equal(reference.argmax(1), qmodel(x).argmax(1))


class MergedRows(torch.nn.Module):
    """Linear layers on [batch x tokens, width], image by image (GPT-2's Conv1D pattern), then a batch-first head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = torch.relu(self.a(x.reshape(n * 8, 8)))
        return self.head(self.b(h).reshape(n, 64))


def test_pt2e_layers_on_merged_rows_are_viewed_per_image() -> None:
    """A PT2E graph's linears on the batch merged with the tokens compute on the per-image view, named in the notes:
    the graph's logits within float32 rounding (a PT2E graph's own float linears), and an act fault of image 3 in
    the merged layer changes image 3's logits alone."""
    from pytest_hwfault import Fault

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MergedRows().eval()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    deployed = to_pt2e(model, x)
    qmodel = quantize(deployed, x)
    assert any(note.startswith("2 layer(s) run on the batch merged with 8 rows per image, image by image")
               for note in qmodel.config["deployed_notes"])
    clean, reference = qmodel(x), deployed(x).detach()
    assert float((clean - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    faulty = qmodel(x, faults=FaultPattern.from_faults([Fault("act", "a", 5 * 16 + 3, 6, image=3)]))
    assert (faulty != clean).any(1).nonzero().flatten().tolist() == [3]


class _ViewedHead(torch.nn.Module):
    """A conv whose output is viewed flat before the head: `x.view(-1, 512)` (any batch), or reshaped to a batch it
    knows only once exported (`x.reshape(x.shape[0], -1)`, which torch.export specializes to its example's)."""

    def __init__(self, viewed: bool) -> None:
        super().__init__()
        self.conv, self.fc, self.viewed = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Linear(512, 10), viewed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(-1, 512) if self.viewed else h.reshape(x.shape[0], -1))


def _static_pt2e(model: torch.nn.Module, example: torch.Tensor, calibration: torch.Tensor) -> fx.GraphModule:
    """`model` exported for the batch of `example` only (no dynamic_shapes: torch.export's default) and converted."""
    import warnings

    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(torch.export.export(model.eval(), (example,)).module(),
                                xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config()))
        with torch.no_grad():
            for start in range(0, len(calibration), len(example)):
                prepared(calibration[start:start + len(example)])
        return convert_pt2e(prepared)


def test_a_graph_exported_for_one_batch_size_is_gated_where_it_computes_others_or_refused(digits) -> None:  # noqa: ANN001
    """torch.export.export(model, (x,)) without dynamic_shapes specializes the batch: a graph whose views hold it
    died at the first batch of other size in a bare 'mat1 and mat2 shapes cannot be multiplied'. It is refused,
    naming the export option; a graph that computes any batch (a view to [-1, 512]) is read, and says it was
    exported for one batch size. That view of a convolution's output also failed on the view's channels-last
    tensors ('view size is not compatible with input tensor's size and stride')."""
    torch.manual_seed(0)
    calibration, x = images(digits.x_train[:32]), images(digits.x_test[:40])
    viewed = _static_pt2e(_ViewedHead(True), calibration[:1], calibration)
    qmodel = quantize(viewed, calibration)
    assert any(note.startswith("the graph fixes its batch size to 1 (inputs 'x' [1, 1, 8, 8], as "
                               "torch.export.export specialized them)") for note in qmodel.config["deployed_notes"])
    with torch.no_grad():
        theirs = torch.cat([viewed(x[i:i + 1]) for i in range(len(x))])
    assert agreement(theirs, qmodel(x), qmodel.layers["fc"].act_scale)["predictions"] == 1.0
    reshaped = _static_pt2e(_ViewedHead(False), calibration[:8], calibration)
    with pytest.raises(DeployedFormatError, match=r"pt2e: the graph fixes its batch size to 8 \(inputs 'x' \[8, 1, 8, "
                                                  r"8\], as torch.export.export specialized them\) and does not "
                                                  r"compute a batch of 9 images \(RuntimeError: .*\): the engine runs "
                                                  r"images in batches\. To gate it, export it with a dynamic batch "
                                                  r"dimension"):
        quantize(reshaped, calibration)
