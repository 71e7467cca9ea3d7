"""Transformers exported to ONNX and quantized by onnxruntime (quantize_static QDQ, quantize_dynamic): the reader
runs their float and shape ops (`onnx_float`), reproduces the integer kernels it knows bit for bit, and names
what it computes otherwise than onnxruntime."""

from __future__ import annotations

import contextlib
import math
import pathlib
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from deployed_models import (
    Encoder,
    encoder_dynamic,
    encoder_inputs,
    encoder_static,
    export_encoder,
    export_gpt2,
    gpt2_quantized,
    onnx_under_faults,
    run_onnxruntime,
    run_onnxruntime_ids,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_hwfault import FaultModel, accuracy, native, onnx_float, onnx_reader, quantize
from pytest_hwfault.coverage import measure_coverage
from pytest_hwfault.deployed import DeployedFormatError
from pytest_hwfault.faults import sample_pattern
from pytest_hwfault.qmodel import SiteUnreachableError, UnsupportedModelError
from pytest_hwfault.quantization import DeployedMismatchWarning

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    folder = tmp_path_factory.mktemp("onnx_transformer")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        full, plain = Encoder(), Encoder(plain=True)
    full_path, plain_path = export_encoder(full, folder, "encoder"), export_encoder(plain, folder, "plain")
    return {"static": encoder_static(full_path), "dynamic": encoder_dynamic(full_path),
            "plain_u8": encoder_static(plain_path), "plain_s8": encoder_static(plain_path, "s8")}


@pytest.mark.parametrize("activations", ["u8", "s8"])
def test_a_transformer_of_kernels_the_reader_knows_is_onnxruntimes_bit_for_bit(encoders, activations) -> None:  # noqa: ANN001
    """QLinearMatMul of weights and of two activations (the attention's scores and mix), QLinearAdd of a bias and
    of a residual, the exporter's Shape/Gather/Concat/Reshape arithmetic, Transpose and ReduceMean: equal bit for
    bit, checked at load with no warning; every site runs."""
    path, x = encoders[f"plain_{activations}"], encoder_inputs(64, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)
        qmodel = quantize(path, x)
    assert qmodel.config["deployed_notes"][0].endswith("fault-free outputs equal bit for bit")
    assert len(qmodel.layers) == 14  # embed, 2 x (q, k, v, o, up, down), head
    ours, theirs = qmodel(x), run_onnxruntime(path, x)
    assert torch.equal(ours, theirs)  # equal values (a zero logit may be -0.0 here, +0.0 there)
    assert not any("integer kernels the reader does not reproduce" in n for n in qmodel.config["deployed_notes"])
    # the attention's products are onnxruntime's integer kernels, not fault sites: named as unfaulted MACs
    coverage = measure_coverage(qmodel, x[:2])
    assert 0.9 < coverage.macs < 1.0
    assert sorted(entry["module"] for entry in coverage.to_dict()["uncovered"]) == [
        "blocks_blocks_0_MatMul", "blocks_blocks_0_MatMul_1", "blocks_blocks_1_MatMul", "blocks_blocks_1_MatMul_1"]
    assert "integer QLinearMatMul of two activations" in coverage.describe()
    labels = ours.argmax(1)
    for site in ("act", "weight", "acc", "input"):
        assert 0.0 <= accuracy(qmodel, (x, labels), FaultModel(site, 1e-3), seed=1) < 1.0, site


def test_a_static_transformer_runs_and_names_what_it_computes_otherwise(encoders) -> None:  # noqa: ANN001
    """onnxruntime fuses the QDQ Softmax and GELU's products into QLinearSoftmax and QLinearMul, which the reader
    reproduces, as it does onnxruntime's LayerNormalization and Erf (checked on the installed one at load);
    ReduceMean stays a float op whose kernel rounds otherwise than torch's: a note names it (the load check says how
    far apart the outputs are), logits equal on nearly every value."""
    path, x = encoders["static"], encoder_inputs(400, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployedMismatchWarning)
        qmodel = quantize(path, x[:64])
    notes = " | ".join(qmodel.config["deployed_notes"])
    assert notes.startswith("checked against onnxruntime on 64 calibration images")
    # Erf certified where the installed onnxruntime runs the erf kernel measured (MLAS's AVX-512F one), else named
    erf = onnx_reader.runtime_op_agrees("Erf")
    assert erf or not MLAS_AVX512
    assert ("by an ulp: ReduceMean x1 |" if erf else "by an ulp: Erf x2, ReduceMean x1 |") in notes
    assert "integer kernels the reader does not reproduce" not in notes
    softmaxes = [m for m in qmodel.module.modules() if type(m).__name__ == "QLinearSoftmax"]
    muls = [m for m in qmodel.module.modules() if type(m).__name__ == "QLinearMul"]
    assert len(softmaxes) == 2 and len(muls) == 4
    assert len(qmodel.layers) == 14
    ours, theirs = qmodel(x), run_onnxruntime(path, x)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert float((ours == theirs).float().mean()) >= 0.95
    assert float((ours - theirs).abs().max()) < 0.05 * float(theirs.abs().max())
    assert accuracy(qmodel, (x, theirs.argmax(1)), FaultModel("weight", 1e-3), seed=1) < 1.0


def test_a_dynamic_transformer_runs_at_the_sites_it_has(encoders) -> None:  # noqa: ANN001
    """onnxruntime's quantize_dynamic of the transformer: 14 dynamic MatMul layers whose inputs are LayerNorm and
    attention outputs; the kernels onnxruntime fuses (Gelu, FusedMatMul, SkipLayerNormalization) computed as it
    does; logits onnxruntime's bit for bit one input at a time; what is not certified named; no act site."""
    path, x = encoders["dynamic"], encoder_inputs(32, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployedMismatchWarning)  # the float ops round as torch's (asserted below)
        qmodel = quantize(path, x)
    notes = qmodel.config["deployed_notes"]
    assert notes[0].startswith("checked against the model run one image at a time")
    # onnxruntime fuses one LayerNormalization with the float Add before it (SkipLayerNormalization: Welford's
    # running mean and variance), followed; the four it runs as LayerNormalization are reproduced, not named
    assert any("into its SkipLayerNormalization kernel" in n for n in notes)
    # its attention scores' MatMul fused with their scaling (FusedMatMul) is computed as onnxruntime's kernel, but
    # the head width its reshapes compute cannot be inferred: not certified, so named (and the mean over tokens)
    assert any("into its FusedMatMul kernel" in n for n in notes)
    assert any("by an ulp: FusedMatMul x2, MatMul x2, ReduceMean x1" in n for n in notes)
    assert len(qmodel.layers) == 14 and all(layer.raw_output for layer in qmodel.layers.values())
    ours = torch.cat([qmodel(x[i:i + 1]) for i in range(len(x))])
    theirs = run_onnxruntime(path, x, each=True)
    gelu = onnx_reader.runtime_gelu_agrees("Gelu", False)  # its GELUs: MLAS's erf, as measured with AVX-512F
    assert gelu or not MLAS_AVX512
    assert torch.equal(ours, theirs) if gelu else torch.equal(ours.argmax(1), theirs.argmax(1))
    labels = theirs.argmax(1)
    for site in ("weight", "acc", "input"):
        assert accuracy(qmodel, (x, labels), FaultModel(site, 1e-3), seed=1) <= 1.0, site
    with pytest.raises(SiteUnreachableError, match="site 'act' has nothing to fault"):
        accuracy(qmodel, (x, labels), FaultModel("act", 1e-3), seed=1)


def test_torchs_default_exporter_is_read_too(tmp_path: pathlib.Path) -> None:
    """torch.onnx.export's default (dynamo) exporter writes opset 20 graphs (axes as inputs, every Reshape with
    allowzero=1, constant shapes): static and dynamic quantizations read, the ops rounded otherwise named."""
    pytest.importorskip("onnxscript")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        plain = Encoder(plain=True)
    path = export_encoder(plain, tmp_path, "plain", dynamo=True)
    assert any(a.name == "allowzero" and a.i == 1 for n in onnx.load(str(path)).graph.node if n.op_type == "Reshape"
               for a in n.attribute)
    x = encoder_inputs(64, seed=6)
    for quantized, each in ((encoder_static(path), False), (encoder_dynamic(path), True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeployedMismatchWarning)  # onnxruntime's ReduceMean sums otherwise
            qmodel = quantize(quantized, x)
        assert len(qmodel.layers) == 14
        assert any("ReduceMean x1" in note for note in qmodel.config["deployed_notes"])
        ours = torch.cat([qmodel(x[i:i + 1]) for i in range(len(x))]) if each else qmodel(x)
        theirs = run_onnxruntime(quantized, x, each)
        assert torch.equal(ours.argmax(1), theirs.argmax(1))
        assert float((ours - theirs).abs().max()) < 0.05 * float(theirs.abs().max())


def _faults_match_onnxruntime(path: pathlib.Path, x: torch.Tensor, site: str, seed: int) -> None:
    """One trial of faults at `site` (BER 1e-3) in the view against onnxruntime running the model under the same
    faults (`onnx_under_faults`): the faults move most logits, and the logits are equal bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployedMismatchWarning)
        qmodel = quantize(path, x)
    fault_model = FaultModel(site, 1e-3)
    pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x),
                             torch.Generator().manual_seed(seed))
    proto, masks = onnx_under_faults(path, qmodel, pattern, len(x))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = torch.from_numpy(session.run(None, {"x": x.numpy(), **masks})[0])
    ours = qmodel(x, pattern)
    assert (ours != qmodel(x)).float().mean() > 0.5
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("site", ["act", "weight"])
@pytest.mark.parametrize("model", ["plain_u8", "static"])
def test_faults_in_a_transformer_are_onnxruntimes_running_the_same_faults(encoders, model, site) -> None:  # noqa: ANN001
    """A trial's faults in every layer of the encoder (the attention's QLinearMatMul, QLinearSoftmax, QLinearAdd,
    LayerNorm and GELU downstream of them; the weights of MatMuls the view holds transposed) against onnxruntime
    running the model under the same faults: logits equal bit for bit. (The s8 encoder's q/k/v projections, which
    onnxruntime runs in float, named in the notes, round their sums of faulty inputs otherwise: 0.5% of its logits
    differed on one trial.)"""
    _faults_match_onnxruntime(encoders[model], encoder_inputs(64, seed=3), site, 9)


@pytest.fixture(scope="module")
def row_encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """The plain encoder with its linear layers on [batch x tokens, width] image by image ("merged", as GPT-2's
    Conv1D) and token by token ("sequence", as a sequence-first export): the same weights, static QDQ u8."""
    folder = tmp_path_factory.mktemp("onnx_rows")
    paths = {}
    for rows in ("merged", "sequence"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = Encoder(plain=True, rows=rows)
        paths[rows] = encoder_static(export_encoder(model, folder, rows))
    return paths


def test_weight_faults_in_a_dynamic_transformer_are_onnxruntimes_running_them(encoders) -> None:  # noqa: ANN001
    """quantize_dynamic's MatMulInteger weights (int8 initializers the view holds as [out, in]) flipped by a trial
    of weight faults: the view, each input on its own range, against onnxruntime running the faulty model one input at
    a time: logits equal bit for bit."""
    path, x = encoders["dynamic"], encoder_inputs(24, seed=5)
    qmodel = quantize(path, x)
    fault_model = FaultModel("weight", 1e-3)
    pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), torch.Generator().manual_seed(6))
    proto, masks = onnx_under_faults(path, qmodel, pattern, len(x))
    assert not masks  # weight faults only: the initializers themselves
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = torch.cat([torch.from_numpy(session.run(None, {"x": x[i:i + 1].numpy()})[0]) for i in range(len(x))])
    ours = qmodel(x, pattern)
    assert (ours != qmodel(x)).float().mean() > 0.5
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("rows", ["merged", "sequence"])
def test_act_faults_on_merged_rows_are_onnxruntimes_running_the_same_faults(row_encoders, rows) -> None:  # noqa: ANN001
    """Faults placed per image in layers an exporter ran on the batch merged with the tokens (image by image, or
    sequence first: image i's row t is row t x N + i) land on the codes onnxruntime holds at those rows: logits
    equal bit for bit with onnxruntime running the same faulty codes."""
    _faults_match_onnxruntime(row_encoders[rows], encoder_inputs(64, seed=4), "act", 2)


def test_layers_on_merged_rows_are_read_per_image_bit_for_bit(row_encoders) -> None:  # noqa: ANN001
    """Each layer an exporter ran on the batch merged with the tokens computes on the per-image view: onnxruntime's
    numbers bit for bit, checked at load with no warning, and the notes say which layers and how."""
    x = encoder_inputs(64, seed=1)
    for rows, how in (("merged", "image by image"), ("sequence", "row by row (sequence first)")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeployedMismatchWarning)
            qmodel = quantize(row_encoders[rows], x)
        notes = qmodel.config["deployed_notes"]
        # every layer's stored codes compared, the merged ones' rows taken back per image
        assert notes[0].endswith("output codes of its 14 quantized layers equal, and fault-free outputs equal bit "
                                 "for bit")
        assert any(note.startswith(f"13 layer(s) run on the batch merged with 8 rows per image, {how}")
                   for note in notes), notes
        assert len(qmodel.layers) == 14  # the head is batch first
        assert torch.equal(qmodel(x), run_onnxruntime(row_encoders[rows], x))


@pytest.mark.parametrize("rows", ["merged", "sequence"])
def test_a_misread_merged_layer_the_outputs_do_not_show_is_found_by_its_codes(tmp_path, monkeypatch, rows) -> None:  # noqa: ANN001
    """The layer check compared the codes onnxruntime stores only for layers on batch-first rows: of a GPT-2-style
    export (its layers on [batch x tokens, width]), the head alone. Behind a head with zero weights, a view that
    misread an earlier layer agreed at the outputs and was judged. Each merged layer's codes are now taken back per
    image (`merged_batch.to_images`) and compared: the misread layer is named and the view refused."""
    from pytest_hwfault import onnx_reader

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Encoder(plain=True, rows=rows)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    path, x = encoder_static(export_encoder(model, tmp_path, rows)), encoder_inputs(16, seed=3)
    mac = onnx_reader._Builder.mac

    def misread(self, node, index, module, weight, w, channel_axis):  # noqa: ANN001, ANN202
        if weight is not None and "blocks.0/q/" in node.name:
            weight.codes = weight.codes.copy()
            weight.codes[..., 0] //= 2  # the first input's weight in every output
        return mac(self, node, index, module, weight, w, channel_axis)

    monkeypatch.setattr(onnx_reader._Builder, "mac", misread)
    with pytest.warns(DeployedMismatchWarning, match=r"fault-free outputs equal, but not layer by layer: the first "
                                                     r"module whose output differs: 'blocks_blocks_0_q_\w+'"):
        qmodel = quantize(path, x)
    assert torch.equal(qmodel(x), run_onnxruntime(path, x))  # the outputs cannot tell
    assert qmodel.config["view_mismatch"]


def test_faults_in_merged_rows_land_in_their_own_image(row_encoders) -> None:  # noqa: ANN001
    """A differential test of the placement: the image-by-image and the token-by-token exports of one model give the
    same quantization, and a fault (image, index, bit) gives the same logits in both, in every layer at every site
    (their rows are laid out differently: a fault placed by row would differ); only the faulty images change; a
    campaign re-running only its faulty images gives the trials of one running every image."""
    from pytest_hwfault import Fault, FaultPattern
    from pytest_hwfault.campaign import Campaign
    from pytest_hwfault.spec import CampaignSpec

    x = encoder_inputs(24, seed=2)
    merged, sequence = quantize(row_encoders["merged"], x), quantize(row_encoders["sequence"], x)
    clean = merged(x)
    assert torch.equal(clean, sequence(x)) and list(merged.layers) == list(sequence.layers)
    changed_any = 0
    for layer in list(merged.layers)[:-1]:
        for site, bit in (("act", 6), ("input", 7), ("acc", 20)):
            pattern = FaultPattern.from_faults([Fault(site, layer, 5 * 8 + 3, bit, image=3),
                                                Fault(site, layer, 2 * 8 + 1, bit, image=10)])
            ours = merged(x, faults=pattern)
            assert torch.equal(ours, sequence(x, faults=pattern)), (layer, site)
            changed = set((ours != clean).any(1).nonzero().flatten().tolist())
            assert changed <= {3, 10}, (layer, site, changed)
            changed_any += bool(changed)
        weight = FaultPattern.from_faults([Fault("weight", layer, 7, 6)])
        assert torch.equal(merged(x, faults=weight), sequence(x, faults=weight)), layer
    assert changed_any >= 20
    labels = clean.argmax(1)
    # attention's QLinearMatMuls of two activations are computed outside the fault sites (6% of the MACs)
    spec = CampaignSpec(site="act", ber=2e-5, min_acc=0.5, budget=3, first=3, seed=1, min_coverage=0.9)
    dropped = [Campaign(merged, x, labels, spec, "rows", batch_size=8).trial(i) for i in range(3)]
    assert [Campaign(merged, x, labels, spec, "rows", batch_size=8, drop_fault_free=False).trial(i)
            for i in range(3)] == dropped
    assert any(trial.faulty_images < len(x) for trial in dropped)


class _Mixed(nn.Module):
    """A layer on rows that each hold several images' values (a permute before the merge): no layout places them."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.head = nn.Linear(8, 8), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rows = x.reshape(n, 8, 8).permute(1, 2, 0).reshape(-1, 8)
        return self.head(self.mix(rows).reshape(8, 8, n).permute(2, 0, 1).reshape(n, 64))


def test_rows_that_mix_images_are_refused_with_the_reason(tmp_path: pathlib.Path) -> None:
    """A layer whose rows no layout places (changing one image changes rows of others) is refused, saying why, never
    faulted per row as if per image."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Mixed()
    path = encoder_static(export_encoder(model, tmp_path, "mixed"))
    with pytest.raises(UnsupportedModelError, match=r"its first dimension is 128 = 8 x the batch of 16: .* merged the "
                                                    r"batch into another dimension.*changing one calibration image "
                                                    r"alone changed rows that are not its own"):
        quantize(path, encoder_inputs(16, seed=4))


def test_a_seq_first_attention_export_is_read_per_image(tmp_path: pathlib.Path) -> None:
    """torch's nn.TransformerEncoderLayer exports its attention sequence first: its input projection on [tokens,
    batch, width], its output projection on [tokens x batch, width]. Static and dynamic quantizations read, each
    such layer on the per-image view (dynamic: each image's range its own tokens', as onnxruntime computes one input
    at a time)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer, self.head = layer, nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.layer(x.reshape(x.shape[0], 8, 8)).mean(1))

    float_path = export_encoder(Seq(), tmp_path, "seq")
    x = encoder_inputs(16, seed=4)
    for path, each in ((encoder_static(float_path), False), (encoder_dynamic(float_path), True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeployedMismatchWarning)  # LayerNorm, Softmax: onnxruntime rounds otherwise
            qmodel = quantize(path, x)
        notes = qmodel.config["deployed_notes"]
        assert any("run on the batch merged with 8 rows per image, row by row (sequence first)" in n for n in notes)
        ours = torch.cat([qmodel(x[i:i + 1]) for i in range(len(x))]) if each else qmodel(x)
        theirs = run_onnxruntime(path, x, each)
        assert torch.equal(ours.argmax(1), theirs.argmax(1))
        assert float((ours - theirs).abs().max()) < 1e-3 * float(theirs.abs().max())
        labels = ours.argmax(1)
        for site in ("weight", "input") if each else ("act", "weight", "input"):
            assert 0.0 <= accuracy(qmodel, (x, labels), FaultModel(site, 1e-3), seed=1) <= 1.0


def test_hugging_face_gpt2_exported_to_onnx_is_read_per_image(tmp_path: pathlib.Path) -> None:
    """GPT-2's projections (Conv1D) export as Gemms on [batch x tokens, width]: read, static and dynamic, each on the
    per-image view; the dynamic ones quantize each image's input on that image's rows (onnxruntime run one input at a
    time: within float32 rounding of its float attention), every site runs. quantize_static's defaults give the
    causal mask an infinite scale, and the attention output is then the same for every image (in onnxruntime too):
    the layer after it is placed by which image's outputs its rows change, and the view computes finite logits as
    onnxruntime does (they were NaN), the degenerate grid named."""
    pytest.importorskip("transformers")
    from pytest_hwfault.data import Inputs

    float_path, ids = export_gpt2(tmp_path)
    for kind, path in gpt2_quantized(float_path, ids).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeployedMismatchWarning)  # LayerNorm, Softmax, Tanh round otherwise
            qmodel = quantize(path, Inputs((ids,)))
        assert any(note.startswith("8 layer(s) run on the batch merged with 12 rows per image, image by image")
                   for note in qmodel.config["deployed_notes"])
        theirs = run_onnxruntime_ids(path, ids)
        ours = torch.cat([qmodel(Inputs((ids[i:i + 1],))) for i in range(len(ids))])
        assert torch.equal(ours.argmax(1), theirs.argmax(1))
        # bit for bit, static and dynamic (each image quantized on the range of its own rows, as onnxruntime run
        # one input at a time): its float kernels, its merged QDQ pairs and its fused GELU reproduced
        static = kind.startswith("static")
        assert torch.equal(ours, theirs)
        notes = " | ".join(qmodel.config["deployed_notes"])
        # static: onnxruntime merges the position embeddings' double QDQ pair; dynamic: it fuses the GELUs into
        # its FastGelu kernel: the view computes both as onnxruntime does
        assert ("DoubleQDQPairsRemover" if static else "GELU(s) into its FastGelu kernel") in notes
        if kind == "static, mask quantized":
            assert any("quantizes with scale inf" in note for note in qmodel.config["deployed_notes"])
        labels = ours.argmax(1)
        for site in ("act", "weight", "input") if static else ("weight", "input"):
            assert 0.0 <= accuracy(qmodel, (Inputs((ids,)), labels), FaultModel(site, 1e-3), seed=1) <= 1.0


def _double_qdq(grids: list[tuple[float, int]], signed: bool, cast: bool, fused: bool) -> onnx.ModelProto:
    """x -> Q1 -> DQ1 (-> Cast to float) -> Q2 -> DQ2 -> (a float Add and its QDQ, or nothing) -> a quantized
    MatMul: the double QDQ pair onnxruntime's optimizer merges, its DQ2 kept or fused into the layer's kernel."""
    from onnx import helper, numpy_helper

    zero = np.int8 if signed else np.uint8
    (s1, z1), (s2, z2) = grids
    inits = [numpy_helper.from_array(np.array(s1, np.float32), "s1"), numpy_helper.from_array(np.array(z1, zero), "z1"),
             numpy_helper.from_array(np.array(s2, np.float32), "s2"), numpy_helper.from_array(np.array(z2, zero), "z2"),
             numpy_helper.from_array(np.random.default_rng(0).integers(-127, 128, (8, 4)).astype(np.int8), "w"),
             numpy_helper.from_array(np.array(0.01, np.float32), "sw"),
             numpy_helper.from_array(np.array(0, np.int8), "zw"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s3"),
             numpy_helper.from_array(np.array(9, zero), "z3")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["q1"], name="Q1"),
             helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["d1"], name="DQ1")]
    if cast:
        nodes.append(helper.make_node("Cast", ["d1"], ["c"], name="Cast", to=1))
    nodes += [helper.make_node("QuantizeLinear", ["c" if cast else "d1", "s2", "z2"], ["q2"], name="Q2"),
              helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["d2"], name="DQ2")]
    if not fused:
        nodes += [helper.make_node("Add", ["d2", "d2"], ["a"], name="Add"),
                  helper.make_node("QuantizeLinear", ["a", "s2", "z2"], ["qa"], name="Qa"),
                  helper.make_node("DequantizeLinear", ["qa", "s2", "z2"], ["da"], name="DQa")]
    nodes += [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="DQw"),
              helper.make_node("MatMul", ["d2" if fused else "da", "wd"], ["mm"], name="MatMul"),
              helper.make_node("QuantizeLinear", ["mm", "s3", "z3"], ["q3"], name="Q3"),
              helper.make_node("DequantizeLinear", ["q3", "s3", "z3"], ["y"], name="DQ3")]
    graph = helper.make_graph(nodes, "double_qdq",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=40, deadline=None)
@given(data=st.data(), signed=st.booleans(), cast=st.booleans(), fused=st.booleans())
def test_a_double_qdq_pair_is_merged_as_onnxruntime_merges_it(data: st.DataObject, signed: bool, cast: bool,
                                                               fused: bool) -> None:
    """Q1 -> DQ1 (-> Cast) -> Q2 -> DQ2 on two grids: onnxruntime's optimizer merges the pairs into one on a new grid
    (its DoubleQDQPairsRemover: the range both cover), so the values are not the graph's two roundings. The view
    computes onnxruntime's grid (read from its optimized graph, or by its formula where DQ2 is fused into the
    layer's kernel): bit for bit, and the notes say so; ranges that share only zero (a degenerate merged grid)
    give zeros both ways."""
    low, high = (-128, 127) if signed else (0, 255)
    grids = [(data.draw(st.floats(1e-3, 0.1), label=f"scale {k}"), data.draw(st.integers(low, high), label=f"zp {k}"))
             for k in (1, 2)]
    model = _double_qdq(grids, signed, cast, fused)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((256, 8)).astype(np.float32) * 3.0)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)  # the load check must find them equal
        qmodel = quantize(model, x[:64])
    assert torch.equal(qmodel(x), theirs)
    notes = " | ".join(qmodel.config["deployed_notes"])
    ranges = [((low - z) * s, (high - z) * s) for s, z in grids]
    if tuple(grids[0]) != tuple(grids[1]) and min(r[1] for r in ranges) > max(r[0] for r in ranges):
        assert "DoubleQDQPairsRemover" in notes


@pytest.mark.parametrize("fused", [False, True])
def test_double_qdq_pairs_whose_ranges_share_only_zero_read_as_onnxruntime_runs_them(fused: bool) -> None:
    """u8 grids [0, 15.9] and [-15.9, 0]: onnxruntime's merged grid would have scale 0 (its formula divides by it);
    the reader keeps the graph's two roundings, which give the same zeros, and reads without error."""
    model = _double_qdq([(0.0625, 0), (0.0625, 255)], False, False, fused)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32) * 3.0)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeployedMismatchWarning)
        qmodel = quantize(model, x)
    assert torch.equal(qmodel(x), torch.from_numpy(session.run(None, {"x": x.numpy()})[0]))


def test_an_unknown_op_is_still_refused_by_name(encoders) -> None:  # noqa: ANN001
    proto = onnx.load(str(encoders["dynamic"]))
    node = next(n for n in proto.graph.node if n.op_type == "Erf")
    node.op_type = "Softsign"
    with pytest.raises(DeployedFormatError, match=r"of type 'Softsign'.*not supported.*float ops: "):
        quantize(proto, encoder_inputs(4, seed=5))


# -- the float ops against onnxruntime's own kernels, one node at a time ---------------------------------------------
def _node_model(op: str, inputs: list[np.ndarray], constants: dict[int, np.ndarray], outputs: int = 1,
                **attrs: Any) -> Any:
    from onnx import helper, numpy_helper

    names = [f"i{k}" if a is not None else "" for k, a in enumerate(inputs)]
    graph_inputs = [helper.make_tensor_value_info(names[k], helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                    for k, a in enumerate(inputs) if a is not None and k not in constants]
    initializers = [numpy_helper.from_array(a, names[k]) for k, a in constants.items()]
    outs = [f"o{k}" for k in range(outputs)]
    node = helper.make_node(op, names, outs, **attrs)
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outs],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _against_onnxruntime(op: str, inputs: list[np.ndarray | None], constants: tuple[int, ...] = (), outputs: int = 1,
                         **attrs: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(onnxruntime's outputs, onnx_float's) of one node on `inputs` (None: an input left out)."""
    const = {k: inputs[k] for k in constants if inputs[k] is not None}
    model = _node_model(op, inputs, const, outputs, **attrs)  # type: ignore[arg-type]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {f"i{k}": a for k, a in enumerate(inputs) if a is not None and k not in const}
    theirs = session.run(None, feeds)
    fn = onnx_float.function(op, {**attrs, "_outputs": outputs}, 17)
    assert fn is not None
    args = [None if a is None else torch.from_numpy(np.array(a)) for a in inputs]
    while args and args[-1] is None:
        args.pop()
    result = fn(*args)
    ours = [t.numpy() for t in (result if isinstance(result, tuple) else (result,))]
    return theirs, ours


def _same(theirs: list[np.ndarray], ours: list[np.ndarray]) -> None:
    assert len(theirs) == len(ours)
    for a, b in zip(theirs, ours):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        assert np.array_equal(a.reshape(-1).view(np.uint8), np.ascontiguousarray(b).reshape(-1).view(np.uint8))


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow"])
def test_elementwise_float_ops_are_onnxruntimes_bit_for_bit(op: str) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 5)).astype(np.float32) * 10
    b = rng.standard_normal((4, 1)).astype(np.float32) + (2.0 if op == "Pow" else 0.0)
    if op == "Pow":
        a = np.abs(a)
    _same(*_against_onnxruntime(op, [a, b]))


@pytest.mark.parametrize("op", ["Neg", "Abs", "Reciprocal", "Floor", "Ceil", "Relu", "Sqrt"])
def test_exact_unary_ops_are_onnxruntimes_bit_for_bit(op: str) -> None:
    a = np.abs(np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)) * 7 + 0.01
    _same(*_against_onnxruntime(op, [a]))


@pytest.mark.parametrize("op", ["Sigmoid", "Exp", "LayerNormalization", "ReduceMean"])
def test_rounded_float_ops_agree_with_onnxruntime_to_an_ulp_or_two(op: str) -> None:
    """onnxruntime's own approximations and summation orders: not bit for bit (the load check measures it), but
    within a few float32 ulps (a LayerNormalization of rows whose width is not a multiple of 8 too)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 8, 36)).astype(np.float32)
    inputs: list[np.ndarray | None] = [x]
    attrs: dict[str, Any] = {}
    if op == "LayerNormalization":
        inputs += [rng.standard_normal(36).astype(np.float32), rng.standard_normal(36).astype(np.float32)]
    if op == "ReduceMean":
        attrs = {"axes": [1], "keepdims": 0}
    theirs, ours = _against_onnxruntime(op, inputs, constants=(1, 2) if op == "LayerNormalization" else (), **attrs)
    assert theirs[0].shape == ours[0].shape
    np.testing.assert_allclose(ours[0], theirs[0], rtol=3e-6, atol=3e-7)


# onnxruntime's MLAS dispatches its AVX2 + FMA3 kernels (LayerNorm, Tanh) on such CPUs, which these tests measure;
# elsewhere it runs other kernels, and the reader's probes must then say so
MLAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
MLAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"  # its erf kernel, as measured


@pytest.mark.parametrize(("shape", "axis"), [((200, 12), -1), ((50, 17), -1), ((8, 768), -1), ((4, 5, 100), 1),
                                           ((30, 1), -1), ((6, 48, 3), -2)])
@pytest.mark.parametrize("native_passes", [True, False])
def test_softmax_is_onnxruntimes_bit_for_bit(shape: tuple[int, ...], axis: int, native_passes: bool) -> None:
    """MLAS's AVX-512F softmax (exponentials by its polynomial in fused multiply-adds, the sum in 16 lanes folded as
    its kernel does, times 1 / sum), along the last axis and others, rows spread up to 300 with an infinity: bit
    for bit natively and on the eager chain where MLAS runs that kernel; the reader's probe agrees."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2.5, shape)).astype(np.float32)
    x.reshape(-1)[3] = -np.inf
    with contextlib.nullcontext() if native_passes else native.disabled():
        theirs, ours = _against_onnxruntime("Softmax", [x], axis=axis)
    agrees = onnx_reader.runtime_softmax_agrees()
    assert agrees or torch.backends.cpu.get_cpu_capability() != "AVX512"
    if agrees:  # bit for bit, a NaN of any sign or payload counted equal (the row holding the infinity of width 1)
        nan = np.isnan(theirs[0])
        assert np.array_equal(nan, np.isnan(ours[0]))
        assert np.array_equal(theirs[0][~nan].view(np.uint32), ours[0][~nan].view(np.uint32))
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("kernel", "bias"), [("FastGelu", True), ("FastGelu", False), ("Gelu", False),
                                            ("BiasGelu", True)])
def test_fused_gelus_are_onnxruntimes_bit_for_bit(kernel: str, bias: bool) -> None:
    """onnxruntime's GELU kernels (com.microsoft), which it fuses from a GELU's exported ops: FastGelu's float32
    steps around MLAS's tanh, Gelu's and BiasGelu's around MLAS's erf; the probe the reader follows the fusion by
    agrees where MLAS dispatches the kernels measured, and the function is a GELU."""
    agrees = onnx_reader.runtime_gelu_agrees(kernel, bias)
    assert agrees or not (MLAS_AVX2 if kernel == "FastGelu" else MLAS_AVX512)
    x = torch.linspace(-9.0, 9.0, 4096).view(32, 128)
    b = torch.linspace(-1.0, 1.0, 128) if bias else None
    v = x if b is None else x + b
    if kernel == "FastGelu":
        plain = 0.5 * v * (1 + torch.tanh(0.7978845608028654 * (v + 0.044715 * v**3)))
    else:
        plain = 0.5 * v * (1 + torch.erf(v / math.sqrt(2.0)))
    torch.testing.assert_close(onnx_float.ORT_GELUS[kernel](x, b), plain, rtol=1e-5, atol=1e-6)


def _dynamic_mlp(cls: type[nn.Module], arg: Any, folder: pathlib.Path, opset: int) -> torch.Tensor:
    """`cls(arg)` (random init, seed 0) exported at `opset` and quantized by quantize_dynamic into
    folder/dynamic.onnx; 64 inputs of 16 features returned."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cls(arg).eval()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), str(folder / "float.onnx"), dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
        quantize_dynamic(str(folder / "float.onnx"), str(folder / "dynamic.onnx"), weight_type=QuantType.QInt8)
    return x


class _GeluMLP(nn.Module):
    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.up, self.down, self.approximate = nn.Linear(16, 64), nn.Linear(64, 3), approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x), approximate=self.approximate))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_onnx_gelu_of_opset_20_is_onnxruntimes_bit_for_bit(tmp_path: pathlib.Path, approximate: str) -> None:
    """ONNX's own Gelu (opset 20, as torch's exporter writes a GELU there), which onnxruntime runs on the code of
    its Gelu and FastGelu kernels: computed as it does and certified by a probe, so not named; a dynamically
    quantized MLP around it is onnxruntime's bit for bit one input at a time (before: 67% and 86% of logits)."""
    x = _dynamic_mlp(_GeluMLP, approximate, tmp_path, 20)
    assert "Gelu" in [n.op_type for n in onnx.load(str(tmp_path / "dynamic.onnx")).graph.node]
    agrees = onnx_reader.runtime_gelu_op_agrees(approximate)
    assert agrees or not (MLAS_AVX512 if approximate == "none" else MLAS_AVX2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployedMismatchWarning)
        qmodel = quantize(tmp_path / "dynamic.onnx", x)
    named = any("float ops outside the fault sites" in n and "Gelu x1" in n for n in qmodel.config["deployed_notes"])
    assert named != agrees  # certified, or named: never both, never neither
    if agrees:
        assert qmodel.config["deployed_notes"][0].endswith("fault-free outputs equal bit for bit")
        ours = torch.cat([qmodel(x[i:i + 1]) for i in range(len(x))])
        assert torch.equal(ours, run_onnxruntime(tmp_path / "dynamic.onnx", x, each=True))


class _LayerNormMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(16, width), nn.LayerNorm(width), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.up(x)))


@pytest.mark.parametrize("width", [64, 60])
def test_a_layer_norm_exported_before_opset_17_is_followed_into_onnxruntimes_kernel(tmp_path: pathlib.Path,
                                                                                  width: int) -> None:
    """torch's exporter writes a LayerNorm as ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add before
    opset 17; onnxruntime fuses them back into its LayerNormalization kernel, which the view then computes (before:
    the exported ops on torch's kernels, 76% of logits exact, ReduceMean etc. named). Certified where the kernel's
    order is known (rows of a multiple of 8); followed but named otherwise."""
    x = _dynamic_mlp(_LayerNormMLP, width, tmp_path, 14)
    assert "ReduceMean" in [n.op_type for n in onnx.load(str(tmp_path / "dynamic.onnx")).graph.node]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployedMismatchWarning)
        qmodel = quantize(tmp_path / "dynamic.onnx", x)
    notes = " | ".join(qmodel.config["deployed_notes"])
    assert "LayerNorm(s) exported as ReduceMean" in notes
    certified = width % 8 == 0 and onnx_reader.runtime_layer_norm_agrees(width, 1e-5, True)
    assert certified or width % 8 or not MLAS_AVX2
    assert ("by an ulp: LayerNormalization x1" in notes) != certified  # certified, or named
    assert "ReduceMean x" not in notes  # the exported ops are not what runs: never named
    if certified:
        ours = torch.cat([qmodel(x[i:i + 1]) for i in range(len(x))])
        assert torch.equal(ours, run_onnxruntime(tmp_path / "dynamic.onnx", x, each=True))


def test_erf_is_onnxruntimes_bit_for_bit() -> None:
    """MLAS's erf as onnxruntime runs it with AVX-512F (measured on all 2^32 float32 inputs; no clamp above, NaN
    kept): every 257th float32 bit pattern (16.7M values: both branches, subnormals, infinities, NaNs) natively,
    a million of them on the eager chain; the reader's probe agrees with what is seen."""
    bits = np.arange(0, 2**32, 257, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits.view(np.float32), np.float32([0.921875, -0.921875, 3.725, 1e-45, np.inf, -np.inf])])
    theirs, ours = _against_onnxruntime("Erf", [x])
    nan = np.isnan(theirs[0])
    exact = bool(np.array_equal(nan, np.isnan(ours[0])) and
                 np.array_equal(theirs[0][~nan].view(np.uint32), ours[0][~nan].view(np.uint32)))
    with native.disabled():
        assert native.same_bits(onnx_float.function("Erf", {}, 17)(torch.from_numpy(x[::16].copy())),
                                torch.from_numpy(ours[0][::16].copy()))
    assert exact == onnx_reader.runtime_op_agrees("Erf")
    assert exact or not MLAS_AVX512
    np.testing.assert_allclose(ours[0][~nan], theirs[0][~nan], rtol=3e-7, atol=1e-37)


@pytest.mark.parametrize(("a_shape", "b_shape"), [((12, 8), (8, 12)), ((2, 4, 64, 64), (2, 4, 64, 64)),
                                                   ((3, 17, 256), (3, 256, 5))])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("alpha", [0.1249999925494194, 1.7])
def test_fused_matmul_is_onnxruntimes_bit_for_bit(a_shape: tuple[int, ...], b_shape: tuple[int, ...], trans_b: bool,
                                                 alpha: float) -> None:
    """onnxruntime's FusedMatMul (a float MatMul it fuses with the scalings of its operands, e.g. an attention's
    scores scaled by 1 / sqrt(d) on both sides): its SGEMM's chains times float32(alpha), bit for bit where the
    order is known; the probe the reader follows the fusion by agrees."""
    generator = torch.Generator().manual_seed(len(a_shape) + a_shape[-1])
    a, b = torch.randn(a_shape, generator=generator), torch.randn(b_shape, generator=generator)
    stored = b.transpose(-1, -2).contiguous() if trans_b else b
    theirs = onnx_reader._one_node("FusedMatMul", {"a": a, "b": stored}, {}, domain="com.microsoft", alpha=alpha,
                                   transB=int(trans_b))
    assert theirs is not None
    ours = onnx_float.ort_fused_matmul(alpha, trans_b)(a, stored)
    assert torch.equal(ours, theirs) or not MLAS_AVX2
    assert onnx_reader.runtime_fused_matmul_agrees(alpha, trans_b) or not MLAS_AVX2
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [8, 100, 768])
@pytest.mark.parametrize(("beta", "bias"), [(True, False), (False, False), (True, True), (False, True)])
def test_skip_layer_normalization_is_onnxruntimes_bit_for_bit(width: int, beta: bool, bias: bool) -> None:
    """onnxruntime's SkipLayerNormalization (a residual Add and the LayerNorm after it, fused in float graphs): not
    its LayerNormalization's kernel nor its source's two sums, but Welford's running mean and variance in float32
    (measured on its Mean and InvStdDev outputs): bit for bit, rows of six decades of spread and large offsets; the
    probe the reader follows the fusion by agrees."""
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(4, 50, width, generator=generator) * torch.logspace(-3, 3, 50).view(1, 50, 1)
    skip = torch.randn(4, 50, width, generator=generator) + 1e3 * torch.randn(4, 50, 1, generator=generator)
    gamma, beta_value, bias_value = (torch.randn(width, generator=generator) for _ in range(3))
    names = ["x", "skip", "gamma", "beta" if beta else "", "bias" if bias else ""]
    while not names[-1]:
        names.pop()
    constants = {n: t for n, t in (("gamma", gamma), ("beta", beta_value), ("bias", bias_value)) if n in names}
    theirs = onnx_reader._one_node("SkipLayerNormalization", {"x": x, "skip": skip}, constants,
                                   domain="com.microsoft", names=names, epsilon=1e-12)
    fn = onnx_float.ort_skip_layer_norm(1e-12)
    for context in (contextlib.nullcontext(), native.disabled()):
        with context:
            ours = fn(x, skip, gamma, beta_value if beta else None, bias_value if bias else None)
        assert torch.equal(ours, theirs)
    assert onnx_reader.runtime_skip_layer_norm_agrees(beta, bias)


def _mlas_elementwise_is_onnxruntimes(op: str, x: np.ndarray) -> np.ndarray:
    """`op` on `x` natively and on the eager chain, each against onnxruntime's node: bit for bit wherever the reader's
    probe says so (and on a CPU with AVX2, where MLAS runs its FMA3 kernels), within a few ulps anyway; returns
    onnxruntime's values."""
    seen = []
    for context in (contextlib.nullcontext(), native.disabled()):
        with context:
            theirs, ours = _against_onnxruntime(op, [x])
        seen.append(np.array_equal(theirs[0].view(np.uint32), ours[0].view(np.uint32)))
        np.testing.assert_allclose(ours[0], theirs[0], rtol=3e-6, atol=3e-7)
    assert seen[0] == seen[1] == onnx_reader.runtime_op_agrees(op)
    assert seen[0] or not MLAS_AVX2
    return theirs[0]


def test_tanh_is_onnxruntimes_bit_for_bit() -> None:
    """MLAS's FMA3 tanh (clamp to [-9, 9], Eigen's rational polynomial by fused multiply-adds): a dense sweep and
    random values of six decades, natively and on the eager chain; the reader's probe agrees with what is seen."""
    rng = np.random.default_rng(6)
    x = np.concatenate([np.linspace(-12, 12, 100_001), rng.standard_normal(50_000) * 10.0 ** rng.uniform(-6, 1, 50_000),
                        [0.0, -0.0, 9.0, -9.0, np.inf, -np.inf]]).astype(np.float32)
    _mlas_elementwise_is_onnxruntimes("Tanh", x)


def test_sigmoid_is_onnxruntimes_bit_for_bit() -> None:
    """MLAS's FMA3 logistic (clamp to [-18, 18], Eigen's rational polynomial by fused multiply-adds, + 0.5, raised to
    0, never lowered to 1: it passes 1 by an ulp near 17.8): a dense sweep and random values of six decades,
    natively and on the eager chain, against about a third of values for torch.sigmoid; the probe agrees."""
    rng = np.random.default_rng(8)
    x = np.concatenate([np.linspace(-40, 40, 200_001), rng.standard_normal(50_000) * 10.0 ** rng.uniform(-6, 1, 50_000),
                        [0.0, -0.0, 18.0, -18.0, 17.844, np.inf, -np.inf]]).astype(np.float32)
    theirs = _mlas_elementwise_is_onnxruntimes("Sigmoid", x)
    assert float((torch.sigmoid(torch.from_numpy(x)).numpy() == theirs).mean()) < 0.6


@pytest.mark.parametrize("alpha", [1.0, 1.702, 0.5])
def test_quick_gelu_is_onnxruntimes_bit_for_bit(alpha: float) -> None:
    """onnxruntime's QuickGelu (x * sigmoid(alpha x), which it fuses from a SiLU's or QuickGELU's Sigmoid and Mul):
    at alpha 1 its logistic is kept at or below 1 (x = 17.844 tells: the Sigmoid op's passes 1 there), at other
    alphas not (x alpha = 17.844); natively and on the eager chain; the reader's probe agrees."""
    x = torch.from_numpy(np.concatenate([np.linspace(-40, 40, 400_001), [17.844, 17.844 / alpha, 0.0, -0.0, np.inf,
                                                                          -np.inf]]).astype(np.float32))
    theirs = onnx_reader._one_node("QuickGelu", {"x": x}, {}, domain="com.microsoft", alpha=alpha)
    assert theirs is not None
    for context in (contextlib.nullcontext(), native.disabled()):
        with context:
            ours = onnx_float.ort_quick_gelu(alpha)(x)
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)) or not MLAS_AVX2
    assert onnx_reader.runtime_quick_gelu_agrees() or not MLAS_AVX2


@pytest.mark.parametrize(("a_shape", "b_shape"), [((12, 8), (8, 12)), ((2, 3, 16, 64), (2, 3, 64, 16)),
                                                   ((5, 256), (256, 2)), ((1, 40), (40, 8)), ((12, 600), (600, 16)),
                                                   ((3, 12, 32), (32, 5)), ((4, 1, 7), (7, 1))])
@pytest.mark.parametrize("constant_b", [True, False])
@pytest.mark.parametrize("native_passes", [True, False])
def test_float_matmul_is_onnxruntimes_bit_for_bit_where_its_order_is_known(
        a_shape: tuple[int, ...], b_shape: tuple[int, ...], constant_b: bool, native_passes: bool) -> None:
    """onnxruntime's SGEMM: each output a chain of fused multiply-adds over k in order, restarted every 256 for a
    constant (packed) B and the parts added: bit for bit wherever `ort_matmul_applies` (natively and on the eager
    chain); a matrix of one row or column with B an activation, or k past 256, runs other kernels: torch's matmul,
    within a few ulps. The reader's probe agrees."""
    rng = np.random.default_rng(7)
    a = (rng.standard_normal(a_shape) * 10.0 ** rng.uniform(-2, 2, a_shape[-1])).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    applies = onnx_float.ort_matmul_applies(torch.from_numpy(a), torch.from_numpy(b), constant_b)
    assert applies == (constant_b or (a_shape[-1] <= 256 and a_shape[-2] > 1 and b_shape[-1] > 1))
    with contextlib.nullcontext() if native_passes else native.disabled():
        theirs, _ = _against_onnxruntime("MatMul", [a, b], constants=(1,) if constant_b else ())
        ours = onnx_float.function("MatMul", {"_constant_b": constant_b}, 17)(torch.from_numpy(a), torch.from_numpy(b))
    agrees = onnx_reader.runtime_matmul_agrees(constant_b)
    assert agrees or not MLAS_AVX2
    if applies and agrees:
        _same(theirs, [ours.numpy()])
    np.testing.assert_allclose(ours.numpy(), theirs[0], rtol=1e-4, atol=1e-4 * float(np.abs(theirs[0]).max()))


@pytest.mark.parametrize(("shape", "axis"), [((64, 8, 32), -1), ((16, 12, 768), -1), ((32, 4, 8), -2),
                                           ((8, 10, 16), 1), ((100, 8), -1), ((20, 6, 40), -1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("native_passes", [True, False])
def test_layer_normalization_is_onnxruntimes_bit_for_bit(shape: tuple[int, ...], axis: int, bias: bool,
                                                          native_passes: bool) -> None:
    """Rows whose width is a multiple of 8 (axis -1 and earlier ones), spread over four decades with offsets up to
    50x their spread, epsilons 1e-12 to 0.1: onnxruntime's kernel bit for bit (its float64 mean, its variance by
    fused multiply-adds in 8 lanes, its fused multiply-add of scale and bias), natively and on the eager chain; the
    probe the reader certifies a model's LayerNormalization nodes with agrees."""
    rng = np.random.default_rng(5)
    rows = (shape[0],) + (1,) * (len(shape) - 1)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 100, rows) + rng.uniform(-50, 50, rows)).astype(np.float32)
    norm = shape[axis % len(shape):]
    operands = [rng.standard_normal(norm).astype(np.float32) for _ in range(2 if bias else 1)]
    for eps in (1e-5, 1e-12, 0.1):
        with contextlib.nullcontext() if native_passes else native.disabled():
            theirs, ours = _against_onnxruntime("LayerNormalization", [x, *operands], constants=(1, 2)[:len(operands)],
                                                axis=axis, epsilon=eps)
        agrees = onnx_reader.runtime_layer_norm_agrees(math.prod(norm), float(np.float32(eps)), bias)
        if MLAS_AVX2 or agrees:
            _same(theirs, ours)
        assert agrees or not MLAS_AVX2
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", sorted(onnx_float.RUNTIME_KERNELS))
def test_a_view_with_runtime_kernels_still_traces(op: str) -> None:
    """The ops computed as onnxruntime's kernels branch on dtypes and call native passes, which torch.fx cannot trace
    into: a traced graph keeps each as one node, computing the same bits (before, a view with a float Softmax or
    Sqrt traced; it must still, for late start and the graph analyses)."""
    from pytest_hwfault.graph import trace

    attrs: dict[str, Any] = {"axis": -1, "epsilon": 1e-5} if op == "LayerNormalization" else \
        {"axis": -1} if op == "Softmax" else {}
    operands = [torch.randn(8)] * 2 if op == "LayerNormalization" else \
        [torch.randn(8, 4)] if op in ("MatMul", "FusedMatMul") else [torch.randn(8)] if op == "BiasGelu" else \
        [torch.randn(3, 5, 8), torch.randn(8)] if op == "SkipLayerNormalization" else []
    fn = onnx_float.ort_fused(op, {"alpha": 0.5}) if op in onnx_float.ORT_FUSED else onnx_float.function(op, attrs, 17)
    assert fn is not None
    node = onnx_float.OnnxOp(op, fn, [False] * (1 + len(operands)))

    class View(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.node = node

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.node(torch.relu(x) + 0.5, *operands)

    x = torch.randn(3, 5, 8)
    traced = trace(View())
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["node"]
    assert torch.equal(traced(x).view(torch.int32), View()(x).view(torch.int32))


def test_integer_div_and_mod_follow_onnx() -> None:
    a = np.array([7, -7, 7, -7, 0, 9], dtype=np.int64)
    b = np.array([2, 2, -2, -2, 3, -4], dtype=np.int64)
    _same(*_against_onnxruntime("Div", [a, b]))
    _same(*_against_onnxruntime("Mod", [a, b]))
    _same(*_against_onnxruntime("Mod", [a, b], fmod=1))


@settings(max_examples=60, deadline=None)
@given(dims=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data())
def test_slice_is_onnxruntimes(dims: list[int], data: st.DataObject) -> None:
    """Starts and ends past either end, negative ones, negative and positive steps: onnxruntime's Slice."""
    x = np.arange(int(np.prod(dims)), dtype=np.float32).reshape(dims)
    axes = data.draw(st.lists(st.integers(-len(dims), len(dims) - 1), min_size=1, max_size=len(dims),
                              unique_by=lambda a: a % len(dims)))
    steps = [data.draw(st.sampled_from([-3, -2, -1, 1, 2, 3])) for _ in axes]
    starts = [data.draw(st.integers(-7, 7)) for _ in axes]
    # as exporters write "to the end": +2^63 - 1 stepping forward, -2^63 stepping back (x[::-1])
    ends = [data.draw(st.one_of(st.integers(-7, 7), st.just(2**63 - 1 if step > 0 else -(2**63)))) for step in steps]
    arrays = [x, np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64), np.array(axes, dtype=np.int64),
              np.array(steps, dtype=np.int64)]
    _same(*_against_onnxruntime("Slice", list(arrays), constants=(1, 2, 3, 4)))


@settings(max_examples=40, deadline=None)
@given(dims=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data())
def test_gather_unsqueeze_squeeze_and_transpose_are_onnxruntimes(dims: list[int], data: st.DataObject) -> None:
    x = np.arange(int(np.prod(dims)), dtype=np.float32).reshape(dims)
    axis = data.draw(st.integers(-len(dims), len(dims) - 1))
    size = dims[axis]
    index_shape = data.draw(st.lists(st.integers(1, 3), max_size=2))
    indices = np.array(data.draw(st.lists(st.integers(-size, size - 1), min_size=int(np.prod(index_shape)),
                                          max_size=int(np.prod(index_shape)))), dtype=np.int64).reshape(index_shape)
    _same(*_against_onnxruntime("Gather", [x, indices], constants=(1,), axis=axis))
    new = data.draw(st.lists(st.integers(-len(dims) - 2, len(dims) + 1), min_size=1, max_size=2,
                             unique_by=lambda a: a % (len(dims) + 2)))
    if len(new) == 2 or abs(new[0]) <= len(dims):  # axes valid for the output rank
        rank = len(dims) + len(new)
        if all(-rank <= a < rank for a in new) and len({a % rank for a in new}) == len(new):
            _same(*_against_onnxruntime("Unsqueeze", [x, np.array(new, dtype=np.int64)], constants=(1,)))
    ones = [a for a in range(len(dims)) if dims[a] == 1]
    _same(*_against_onnxruntime("Squeeze", [x]))
    if ones:
        _same(*_against_onnxruntime("Squeeze", [x, np.array(ones[:1], dtype=np.int64)], constants=(1,)))
    perm = data.draw(st.permutations(range(len(dims))))
    _same(*_against_onnxruntime("Transpose", [x], perm=list(perm)))


def test_shape_arithmetic_and_dynamic_reshape_are_onnxruntimes() -> None:
    x = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    _same(*_against_onnxruntime("Shape", [x]))
    _same(*_against_onnxruntime("Shape", [x], start=1))
    _same(*_against_onnxruntime("Reshape", [x, np.array([0, -1], dtype=np.int64)]))
    _same(*_against_onnxruntime("Expand", [x[:, :1], np.array([2, 3, 4], dtype=np.int64)], constants=(1,)))
    _same(*_against_onnxruntime("Split", [x, np.array([1, 3], dtype=np.int64)], constants=(1,), outputs=2, axis=2))
    _same(*_against_onnxruntime("Split", [x], outputs=3, axis=1))
    _same(*_against_onnxruntime("Where", [x > 0, x, -x]))
    _same(*_against_onnxruntime("Cast", [x], to=7))
    _same(*_against_onnxruntime("ConstantOfShape", [np.array([2, 3], dtype=np.int64)],
                                value=onnx.numpy_helper.from_array(np.array([1.5], dtype=np.float32))))
    _same(*_against_onnxruntime("Range", [np.array(1, dtype=np.int64), np.array(9, dtype=np.int64),
                                          np.array(3, dtype=np.int64)]))
    _same(*_against_onnxruntime("Flatten", [x[:, 0, 0]], axis=1))  # rank == axis: [N, 1]
    from pytest_hwfault.onnx_reader import OnnxFlatten  # the reader's own (traceable) Flatten, likewise

    assert OnnxFlatten(1)(torch.from_numpy(x[:, 0, 0])).shape == (2, 1)
    assert OnnxFlatten(2)(torch.from_numpy(x)).shape == (6, 4)
    _same(*_against_onnxruntime("GatherElements", [x, np.array([[[0], [-1], [2]]] * 2, dtype=np.int64)], axis=2))
    # GatherND: whole rows (m = 1), elements (m = 3), pairs (m = 2, as the dynamo exporter picks each sequence's last
    # token), negative indices, and batch_dims 1 and 2
    for indices, batch_dims in ((np.array([[1], [-2]]), 0), (np.array([[0, 1, 2], [1, -1, -4]]), 0),
                                (np.array([[0, 2], [1, -1], [1, 0]]), 0), (np.array([[2], [-1]]), 1),
                                (np.array([[[1, 3]], [[2, -1]]]), 1), (np.array([[[3], [0], [-2]]] * 2), 2)):
        _same(*_against_onnxruntime("GatherND", [x, indices.astype(np.int64)], batch_dims=batch_dims))
    _same(*_against_onnxruntime("IsNaN", [np.array([0.0, np.nan, -np.inf], dtype=np.float32)]))
    ties = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, -1.0, 2.0]], dtype=np.float32)
    for op in ("ArgMax", "ArgMin"):
        for last in (0, 1):
            _same(*_against_onnxruntime(op, [ties], axis=1, keepdims=0, select_last_index=last))
    square = np.arange(20, dtype=np.float32).reshape(4, 5)
    for upper in (0, 1):
        _same(*_against_onnxruntime("Trilu", [square, np.array(1, dtype=np.int64)], constants=(1,), upper=upper))
    _same(*_against_onnxruntime("Tile", [x, np.array([1, 2, 1], dtype=np.int64)], constants=(1,)))
    ints = np.arange(12, dtype=np.int64).reshape(3, 4)  # integers: sums with no rounding to differ in
    for exclusive, reverse in ((0, 0), (1, 0), (0, 1), (1, 1)):
        _same(*_against_onnxruntime("CumSum", [ints, np.array(1, dtype=np.int64)], constants=(1,),
                                    exclusive=exclusive, reverse=reverse))
    # codes picked from a quantized table, then dequantized (a dynamically quantized embedding)
    codes = np.random.default_rng(4).integers(0, 256, (5, 7)).astype(np.uint8)
    _same(*_against_onnxruntime("DequantizeLinear", [codes, np.array(0.037, dtype=np.float32),
                                                     np.array(131, dtype=np.uint8)], constants=(1, 2)))


# -- a Hugging Face BERT exported to ONNX --------------------------------------------------------------------------
class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).logits


class _Ids(nn.Module):
    """A model called with token ids alone (its `mask` argument left out)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model(input_ids=ids).logits


def test_a_hugging_face_bert_exported_to_onnx_is_read_dynamic_and_static(tmp_path: pathlib.Path) -> None:
    """A tiny random-init BertForSequenceClassification (token ids and an attention mask in) exported by torch's
    exporter: its mask arithmetic (Where, Equal, Expand, ConstantOfShape, IsNaN), the dynamically quantized
    embedding table (Gather of codes, then DequantizeLinear), the pooler's Tanh. quantize_dynamic: 14 dynamic
    layers, onnxruntime's predictions one input at a time, LayerNorm parameters listed by name as unfaulted.
    quantize_static: its attention-mask add quantized with an infinite scale is named in the notes."""
    transformers = pytest.importorskip("transformers")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from pytest_hwfault.data import Inputs

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Logits(transformers.BertForSequenceClassification(config)).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (32, 12), generator=generator)
    mask = torch.ones(32, 12, dtype=torch.long)
    mask[::3, 7:] = 0
    float_path = tmp_path / "bert.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids[:2], mask[:2]), str(float_path), dynamo=False, input_names=["ids", "mask"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"ids": {0: "n"}, "mask": {0: "n"}, "logits": {0: "n"}})
        quantize_dynamic(str(float_path), str(tmp_path / "dynamic.onnx"), weight_type=QuantType.QInt8)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"ids": ids.numpy(), "mask": mask.numpy()}])

            def get_next(self) -> dict | None:
                return next(self.batches, None)

        quantize_static(str(float_path), str(tmp_path / "static.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    inputs = Inputs((ids, mask))
    session = ort.InferenceSession(str(tmp_path / "dynamic.onnx"), providers=["CPUExecutionProvider"])
    theirs = torch.cat([torch.from_numpy(session.run(None, {"ids": ids[i:i + 1].numpy(),
                                                            "mask": mask[i:i + 1].numpy()})[0]) for i in range(32)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployedMismatchWarning)
        qmodel = quantize(tmp_path / "dynamic.onnx", inputs)
    assert len(qmodel.layers) == 14 and all(layer.raw_output for layer in qmodel.layers.values())
    ours = torch.cat([qmodel(inputs[i:i + 1]) for i in range(32)])
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    coverage = measure_coverage(qmodel, inputs[:2]).to_dict()
    assert coverage["weights"] == 1.0 and 0.85 < coverage["macs"] < 1.0
    # the attention's products: the scores' MatMul onnxruntime fuses with the scalings of Q and K (FusedMatMul,
    # computed as it does; the exported MatMul and Mul nodes dropped), the mix's MatMul as it is
    assert sorted(row["why"][0] for row in coverage["uncovered"]) == \
        ["a float FusedMatMul of the ONNX graph (onnxruntime runs it in float too)"] * 2 + \
        ["a float MatMul of the ONNX graph (onnxruntime runs it in float too)"] * 2
    unfaulted = {row["parameter"] for row in coverage["unfaulted"]}
    assert "model_bert_embeddings_LayerNorm_weight.value" in unfaulted
    # its GELUs (onnxruntime's Gelu kernel, MLAS's erf, where the probe agrees), attention products and the
    # LayerNorms it fuses with the residual Add before them (SkipLayerNormalization) are onnxruntime's: no float op
    # named, logits bit for bit
    erf = onnx_reader.runtime_op_agrees("Erf")
    assert erf or not MLAS_AVX512
    if erf:
        assert not any("float ops outside the fault sites" in n for n in qmodel.config["deployed_notes"])
        assert torch.equal(ours, theirs)
    assert accuracy(qmodel, (inputs, theirs.argmax(1)), FaultModel("weight", 1e-3), seed=1) <= 1.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployedMismatchWarning)
        static = quantize(tmp_path / "static.onnx", inputs)
    notes = " | ".join(static.config["deployed_notes"])
    assert notes.startswith("checked against onnxruntime on 32 calibration images")
    assert "attention/self/Add_output_0_QuantizeLinear' (QuantizeLinear) quantizes with scale inf" in notes
    assert len(static.layers) == 14
    # every kernel reproduced (QLinearAdd's broadcast mask and embeddings, QLinearSoftmax, Erf, LayerNorm): the
    # logits are onnxruntime's bit for bit
    if erf:
        assert "float ops outside the fault sites" not in notes
        static_session = ort.InferenceSession(str(tmp_path / "static.onnx"), providers=["CPUExecutionProvider"])
        expected = torch.from_numpy(static_session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0])
        assert torch.equal(static(inputs), expected)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
def test_qlinear_matmul_of_two_activations_is_onnxruntimes(relu: bool, signed: bool) -> None:
    """The reader's QLinearMatMul against onnxruntime fusing DequantizeLinear x2 -> MatMul (-> Relu) ->
    QuantizeLinear on random codes of batched [N, heads, tokens, d] operands."""
    from onnx import helper, numpy_helper

    from pytest_hwfault.onnx_reader import QLinearMatMul

    rng = np.random.default_rng(5)
    dtype, low, high = (np.int8, -128, 128) if signed else (np.uint8, 0, 256)
    a = rng.integers(low, high, (16, 4, 8, 8)).astype(dtype)
    b = rng.integers(low, high, (16, 4, 8, 8)).astype(dtype)
    grids = {"a": (0.021, 3), "b": (0.017, -5 if signed else 140), "y": (0.9, 7 if signed else 120)}
    inits = [numpy_helper.from_array(np.array(scale, dtype=np.float32), f"s{name}") for name, (scale, _) in
             grids.items()] + [numpy_helper.from_array(np.array(zero, dtype=dtype), f"z{name}")
                               for name, (_, zero) in grids.items()]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             helper.make_node("MatMul", ["fa", "fb"], ["p"])]
    if relu:
        nodes.append(helper.make_node("Relu", ["p"], ["r"]))
    nodes += [helper.make_node("QuantizeLinear", ["r" if relu else "p", "sy", "zy"], ["q"]),
              helper.make_node("DequantizeLinear", ["q", "sy", "zy"], ["y"])]
    element = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, element, a.shape) for n in ("a", "b")],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": a, "b": b})[0]
    matmul = QLinearMatMul(grids["a"], grids["b"], grids["y"], signed, relu)

    def values(codes: np.ndarray, grid: tuple[float, int]) -> torch.Tensor:
        return torch.from_numpy((codes.astype(np.int32) - grid[1]).astype(np.float32) * np.float32(grid[0]))

    ours = matmul(values(a, grids["a"]), values(b, grids["b"])).numpy()
    assert np.array_equal(ours, theirs)


def _qdq_node_model(op: str, inputs: dict[str, np.ndarray], grids: dict[str, tuple[float, int]], signed: bool,
                    constants: tuple[str, ...] = (), **attrs: Any) -> tuple[np.ndarray, list[str]]:
    """onnxruntime's output codes for DequantizeLinear(s) -> `op` -> QuantizeLinear (grid "y"), and the kernels it
    ran: the QDQ group its graph optimizer fuses into a QLinear kernel."""
    from onnx import helper, numpy_helper

    dtype = np.int8 if signed else np.uint8
    element = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
    inits = [numpy_helper.from_array(np.array(scale, dtype=np.float32), f"s_{n}") for n, (scale, _) in grids.items()]
    inits += [numpy_helper.from_array(np.array(zero, dtype=dtype), f"z_{n}") for n, (_, zero) in grids.items()]
    inits += [numpy_helper.from_array(inputs[n], n) for n in constants]
    nodes = [helper.make_node("DequantizeLinear", [n, f"s_{n}", f"z_{n}"], [f"f_{n}"]) for n in inputs]
    nodes += [helper.make_node(op, [f"f_{n}" for n in inputs], ["r"], **attrs),
              helper.make_node("QuantizeLinear", ["r", "s_y", "z_y"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, element, a.shape) for n, a in inputs.items()
                                           if n not in constants],
                              [helper.make_tensor_value_info("y", element, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.optimized_model_filepath = f"{folder}/optimized.onnx"
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        kernels = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    out = session.run(None, {n: a for n, a in inputs.items() if n not in constants})[0]
    return out, kernels


def _grid_values(codes: np.ndarray, grid: tuple[float, int]) -> torch.Tensor:
    return torch.from_numpy((codes.astype(np.int32) - grid[1]).astype(np.float32) * np.float32(grid[0]))


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize(("shape", "axis"), [((256, 3), -1), ((64, 8), -1), ((4, 4, 128), -1), ((6, 5, 7), 1)])
def test_qlinear_softmax_is_onnxruntimes(signed: bool, shape: tuple[int, ...], axis: int) -> None:
    """The reader's QLinearSoftmax (the lookup table, the float32 row sums, int8's saturation at 127) against
    onnxruntime's kernel on random codes, rows of 3 to 128, the last axis and a middle one."""
    from pytest_hwfault.onnx_reader import QLinearSoftmax

    rng = np.random.default_rng(len(shape) * 10 + shape[-1])
    low, high = (-128, 128) if signed else (0, 256)
    x = rng.integers(low, high, shape).astype(np.int8 if signed else np.uint8)
    grids = {"x": (0.031, 3 if signed else 100), "y": (1 / 256 if signed else 1 / 255, -128 if signed else 0)}
    theirs, kernels = _qdq_node_model("Softmax", {"x": x}, grids, signed, axis=axis)
    assert kernels == ["QLinearSoftmax"]
    softmax = QLinearSoftmax(grids["x"][0], grids["y"], signed, axis, 17)
    ours = softmax(_grid_values(x, grids["x"]))
    expected = _grid_values(theirs, grids["y"])
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("width", [3, 12, 33, 64])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_qlinear_softmax_rounds_as_onnxruntime_on_a_million_values(signed: bool, width: int,
                                                                  data: st.DataObject) -> None:
    """Ties are rare (about 1 value in 10^6 with the float32 quotient): on ~10^6 random codes per example, on random
    grids, the reader's table (C's float32 logf in its shift) and its float64 quotient give onnxruntime's codes."""
    from pytest_hwfault.onnx_reader import QLinearSoftmax

    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    low, high = (-128, 128) if signed else (0, 256)
    x = rng.integers(low, high, (2**20 // width, width)).astype(np.int8 if signed else np.uint8)
    x_grid = (data.draw(st.floats(1e-3, 0.03), label="x_scale"), 0)
    y_grid = (data.draw(st.floats(1 / 400, 1 / 100), label="y_scale"),
              data.draw(st.integers(-128, -100) if signed else st.integers(0, 20), label="y_zero"))
    grids = {"x": (float(np.float32(x_grid[0])), 0), "y": (float(np.float32(y_grid[0])), y_grid[1])}
    theirs, kernels = _qdq_node_model("Softmax", {"x": x}, grids, signed, axis=-1)
    assert kernels == ["QLinearSoftmax"]
    softmax = QLinearSoftmax(grids["x"][0], grids["y"], signed, -1, 17)
    assert torch.equal(softmax(_grid_values(x, grids["x"])), _grid_values(theirs, grids["y"]))


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("b_shape", [(64, 8, 32), (32,), (1,)], ids=["same", "row", "scalar"])
def test_qlinear_mul_is_onnxruntimes(signed: bool, b_shape: tuple[int, ...]) -> None:
    """The reader's QLinearMul against onnxruntime's, a second operand of the same shape, broadcast along rows,
    and a constant scalar (GELU's x 0.5)."""
    from pytest_hwfault.onnx_reader import QLinearMul

    rng = np.random.default_rng(b_shape[0])
    low, high = (-128, 128) if signed else (0, 256)
    dtype = np.int8 if signed else np.uint8
    a, b = rng.integers(low, high, (64, 8, 32)).astype(dtype), rng.integers(low, high, b_shape).astype(dtype)
    grids = {"a": (0.021, 2 if signed else 130), "b": (0.013, -7 if signed else 139),
             "y": (0.0173, 1 if signed else 128)}
    constants = ("b",) if b_shape == (1,) else ()
    theirs, kernels = _qdq_node_model("Mul", {"a": a, "b": b}, grids, signed, constants)
    assert kernels == ["QLinearMul"]
    mul = QLinearMul(grids["a"], grids["b"], grids["y"], signed)
    ours = mul(_grid_values(a, grids["a"]), _grid_values(b, grids["b"]))
    assert torch.equal(ours, _grid_values(theirs, grids["y"]))


# QLinearAdd's operand layouts, each as onnxruntime's broadcast hands them to its kernel: both whole, B along rows,
# B one value per row (its scalar operand), A one value per row and A one value (then passed as the second)
_ADD_LAYOUTS = {"same": ((256, 256), (256, 256)), "b_rows": ((256, 256), (1, 256)), "b_scalar": ((256, 256), (256, 1)),
                "a_scalar": ((256, 1), (256, 256)), "a_one": ((1,), (256, 256)),
                "nchw": ((4, 64, 1, 1), (1, 64, 4, 4))}


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("layout", list(_ADD_LAYOUTS))
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_qlinear_add_is_onnxruntimes_on_every_code_pair(signed: bool, layout: str, data: st.DataObject) -> None:
    """The reader's QLinearAdd against onnxruntime's kernel on every pair of codes (A's codes down the rows, B's
    along them; per row where one operand holds one value per row), on random grids: its fixed part is
    zC - fma(rA, zA, rB zB), which the sum of two roundings misses near ties, and its operands swap where A is the
    scalar one (before: 2 to 9 grids in 50 to 150 differed on a code)."""
    from pytest_hwfault.onnx_reader import QLinearAdd

    low, high = (-128, 127) if signed else (0, 255)
    dtype = np.int8 if signed else np.uint8
    scale = st.floats(1e-4, 0.1).map(lambda v: float(np.float32(v)))
    grids = {name: (data.draw(scale, label=f"s_{name}"), data.draw(st.integers(low, high), label=f"z_{name}"))
             for name in ("a", "b", "y")}
    a_shape, b_shape = _ADD_LAYOUTS[layout]
    codes = np.arange(low, high + 1)
    down, along = np.repeat(codes, 256), np.tile(codes, 256)  # [256, 256]: A's code by row, B's by column
    one = np.array([data.draw(st.integers(low, high), label="a")])
    a = {"same": down, "b_rows": down, "b_scalar": along, "a_one": one}.get(layout, codes)
    b = {"b_rows": codes, "b_scalar": codes}.get(layout, along)
    a, b = np.resize(a, a_shape).astype(dtype), np.resize(b, b_shape).astype(dtype)
    theirs, kernels = _qdq_node_model("Add", {"a": a, "b": b}, grids, signed)
    assert kernels == ["QLinearAdd"]
    add = QLinearAdd(grids["a"], grids["b"], grids["y"], signed)
    ours = add(_grid_values(a, grids["a"]), _grid_values(b, grids["b"]))
    assert torch.equal(ours, _grid_values(theirs, grids["y"]))
    with native.disabled():
        assert torch.equal(add(_grid_values(a, grids["a"]), _grid_values(b, grids["b"])), ours)


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_qlinear_mul_is_onnxruntimes_on_every_code_pair(signed: bool, data: st.DataObject) -> None:
    """The reader's QLinearMul against onnxruntime's kernel on every pair of codes, on random grids and on decimal
    ones (whose products land on ties): MLAS adds the output zero point before it rounds, so a tie goes to the even
    code, not to the even offset from an odd zero point (before: 226 of 65,536 pairs differed for scales 0.05,
    0.085, 0.1 and zero points 3, 0, 7; the per-node probe found it)."""
    from pytest_hwfault.onnx_reader import QLinearMul

    low, high = (-128, 127) if signed else (0, 255)
    dtype = np.int8 if signed else np.uint8
    decimal = st.integers(1, 300).map(lambda k: float(np.float32(k / 1000)))
    scale = st.one_of(decimal, st.floats(1e-4, 0.3).map(lambda v: float(np.float32(v))))
    grids = {name: (data.draw(scale, label=f"s_{name}"), data.draw(st.integers(low, high), label=f"z_{name}"))
             for name in ("a", "b", "y")}
    codes = np.arange(low, high + 1)
    a, b = np.repeat(codes, 256).astype(dtype), np.tile(codes, 256).astype(dtype)  # every pair
    theirs, kernels = _qdq_node_model("Mul", {"a": a, "b": b}, grids, signed)
    assert kernels == ["QLinearMul"]
    mul = QLinearMul(grids["a"], grids["b"], grids["y"], signed)
    ours = mul(_grid_values(a, grids["a"]), _grid_values(b, grids["b"]))
    assert torch.equal(ours, _grid_values(theirs, grids["y"]))
    with native.disabled():
        assert torch.equal(mul(_grid_values(a, grids["a"]), _grid_values(b, grids["b"])), ours)


def test_qlinear_mul_rounds_a_tie_after_its_zero_point() -> None:
    """The grid the probe found: 1 x 200 products at ratio 0.0425 land on 8.5, which onnxruntime rounds as
    8.5 + 7 = 15.5 -> 16, not round(8.5) + 7 = 15."""
    from pytest_hwfault.onnx_reader import QLinearMul

    grids = {"a": (0.05, 3), "b": (0.085, 0), "y": (0.1, 7)}
    a, b = np.array([4, 5, 7], dtype=np.uint8), np.array([200, 100, 50], dtype=np.uint8)
    theirs, _ = _qdq_node_model("Mul", {"a": a, "b": b}, grids, False)
    assert theirs.tolist() == [16, 16, 16]
    mul = QLinearMul(grids["a"], grids["b"], grids["y"], False)
    assert torch.equal(mul(_grid_values(a, grids["a"]), _grid_values(b, grids["b"])), _grid_values(theirs, grids["y"]))


_DEGENERATE_CASES = [(op, degenerate, signed) for op, degenerate in (
    ("Add", "b"), ("Add", "y"), ("Mul", "b"), ("Mul", "y"), ("MatMul", "b"), ("MatMul", "y"), ("Softmax", "x"),
    ("Add", "huge"), ("Mul", "huge"), ("MatMul", "huge")) for signed in (False, True) if op != "Softmax" or not signed]


@pytest.mark.parametrize(("op", "degenerate", "signed"), _DEGENERATE_CASES,
                         ids=[f"{op}-{deg}-{'s8' if signed else 'u8'}" for op, deg, signed in _DEGENERATE_CASES])
def test_degenerate_and_huge_scales_give_onnxruntimes_codes(op: str, degenerate: str, signed: bool) -> None:
    """A grid with an infinite scale (quantize_static's calibration of an attention mask holding float32's minimum:
    its codes carry no information, named in the notes; such a quantize node writes its zero point, or its lowest
    code for a NaN): onnxruntime's kernels turn the NaNs it makes into the lowest code, and so do the reader's (or,
    where onnxruntime runs the group in float, its QuantizeLinear). Scales of 1e10 ("huge"): QLinearAdd and
    QLinearMul convert a result outside the int32 range to the lowest code, QLinearMatMul clamps it; the reader's
    kernels too. (onnxruntime's float Softmax of a row of NaNs, an int8 group it leaves unfused, is not reproduced.)"""
    from pytest_hwfault.deployed import Requantize
    from pytest_hwfault.onnx_reader import QLinearAdd, QLinearMatMul, QLinearMul, QLinearSoftmax

    rng = np.random.default_rng(len(op) * 7 + len(degenerate))
    low, high = (-128, 128) if signed else (0, 256)
    dtype = np.int8 if signed else np.uint8
    names = ("x",) if op == "Softmax" else ("a", "b")
    grids = {"x": (0.031, 3), "a": (0.021, 2 if signed else 130), "b": (0.013, -7 if signed else 139),
             "y": (1 / 256, -128 if signed else 0) if op == "Softmax" else (0.0173, 1 if signed else 128)}
    grids = {n: (float("inf"), zero) if n == degenerate else (1e10, zero) if degenerate == "huge" and n != "y" else
             (scale, zero) for n, (scale, zero) in grids.items() if n in (*names, "y")}
    # the codes an infinite-scale QuantizeLinear writes: its zero point for a finite value, the lowest for a NaN
    inputs = {n: np.where(rng.random((4, 16, 16)) < 0.3, low, grids[n][1]) if n == degenerate else
              rng.integers(low, high, (4, 16, 16)) for n in names}
    inputs = {n: codes.astype(dtype) for n, codes in inputs.items()}
    theirs, kernels = _qdq_node_model(op, inputs, grids, signed, axis=-1) if op == "Softmax" else \
        _qdq_node_model(op, inputs, grids, signed)
    values = [_grid_values(inputs[n], grids[n]) for n in names]
    if kernels == [f"QLinear{op}"]:
        kernel: Any = {"Add": lambda: QLinearAdd(grids["a"], grids["b"], grids["y"], signed),
                       "Mul": lambda: QLinearMul(grids["a"], grids["b"], grids["y"], signed),
                       "MatMul": lambda: QLinearMatMul(grids["a"], grids["b"], grids["y"], signed),
                       "Softmax": lambda: QLinearSoftmax(grids["x"][0], grids["y"], signed, -1, 17)}[op]()
        ours = kernel(*values)
    else:  # onnxruntime runs the group in float: the float op, then its QuantizeLinear
        float_op = {"Add": torch.add, "Mul": torch.mul, "MatMul": torch.matmul}[op]
        assert "QuantizeLinear" in kernels
        ours = Requantize(*grids["y"], low, high - 1)(float_op(*values))
    torch.testing.assert_close(ours, _grid_values(theirs, grids["y"]), rtol=0, atol=0, equal_nan=True)


def test_a_gpt2_from_the_dynamo_exporter_is_read_per_image(tmp_path: pathlib.Path) -> None:
    """torch's default (dynamo) exporter writes GPT-2's classification head as a GatherND of each sequence's last
    token: read (as a float op, tested node by node against onnxruntime), static and dynamic, with the projections
    on the per-image view."""
    pytest.importorskip("transformers")
    pytest.importorskip("onnxscript")
    from pytest_hwfault.data import Inputs

    float_path, ids = export_gpt2(tmp_path, dynamo=True)
    assert any(n.op_type == "GatherND" for n in onnx.load(str(float_path)).graph.node)
    paths = gpt2_quantized(float_path, ids)
    for kind in ("static", "dynamic"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeployedMismatchWarning)
            qmodel = quantize(paths[kind], Inputs((ids,)))
        assert any(note.startswith("8 layer(s) run on the batch merged with 12 rows per image, image by image")
                   for note in qmodel.config["deployed_notes"])
        theirs = run_onnxruntime_ids(paths[kind], ids)
        ours = torch.cat([qmodel(Inputs((ids[i:i + 1],))) for i in range(len(ids))])
        assert torch.equal(ours.argmax(1), theirs.argmax(1))
        assert float((ours - theirs).abs().max()) < (0.03 if kind == "static" else 1e-6) * float(theirs.abs().max())


GPT2_CONFTEST = f'''
import sys
sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})

import pytest, torch
import deployed_models as dm
from pytest_hwfault.data import Inputs


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 deployed through ONNX (quantize_static's defaults), and 64 token sequences labelled with
    onnxruntime's own predictions."""
    float_path, ids = dm.export_gpt2(tmp_path_factory.mktemp("gpt2"), images=64)
    path = dm.gpt2_quantized(float_path, ids)["static, mask quantized"]
    return path, (Inputs((ids,)), dm.run_onnxruntime_ids(path, ids).argmax(1))
'''

GPT2_GATES = '''
from pytest_hwfault import resilience


@resilience(ber=1e-5, site=["act", "weight", "input"], min_acc=0.5, budget=8, first=4, min_coverage=0.8)
def test_release_candidate(hwfault, gpt2):
    path, val_data = gpt2
    hwfault.assess(path, val_data)


@resilience(ber=1e-2, site="weight", min_acc=0.99, budget=8, first=4, min_coverage=0.8)
def test_too_strict(hwfault, gpt2):
    path, val_data = gpt2
    hwfault.assess(path, val_data)
'''


def test_a_gate_runs_on_a_gpt2_deployed_through_onnx(pytester: pytest.Pytester) -> None:
    """End to end: `@resilience` gates on a GPT-2 whose projections run on merged rows, given as an .onnx path and
    token ids: they run and judge (a strict gate does not pass), and the report carries the reader's notes (the
    layers viewed per image, the degenerate mask grid) and the coverage, short of the attention's products."""
    pytest.importorskip("transformers")
    import json

    pytester.makeconftest(GPT2_CONFTEST)
    pytester.makepyfile(test_gpt2=GPT2_GATES)
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hwfault", f"--hwfault-report={report}", "-q")
    result.assert_outcomes(passed=3, failed=1)
    records = json.loads(report.read_text())["campaigns"]
    # the strict gate's interval still holds its threshold after its budget: inconclusive, which fails the test
    assert {(r["site"], r["verdict"]) for r in records} == {("act", "pass"), ("weight", "pass"), ("input", "pass"),
                                                            ("weight", "inconclusive")}
    for record in records:
        assert record["model_format"] == "onnx"
        notes = " | ".join(record["model_notes"])
        assert "8 layer(s) run on the batch merged with 12 rows per image, image by image" in notes
        assert "quantizes with scale inf" in notes
        assert 0.8 < record["coverage"]["macs"] < 1.0
