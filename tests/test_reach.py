"""Faults reach every multiply-accumulate: attention (nn.MultiheadAttention, F.scaled_dot_product_attention),
recurrent cells (LSTM/GRU gate matmuls, one fault range per time step), functional convs/linears/matmuls/einsums,
transposed convolutions, on ordinary architectures with weights=None and small inputs. Each model is covered whole,
and single faults in its attention projections, attention matmuls, recurrent gates, transposed convolutions and
functional layers change the layer's output exactly
as an integer reference of that layer predicts (plain integer arithmetic in float64 on the layer's public codes and
scales, fed the tensors that entered it)."""

from __future__ import annotations

import inspect
import math
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TextClassifier, oracle, seeded
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_hwfault.coverage import measure_coverage
from pytest_hwfault.decompose import Einsum, MatMul
from pytest_hwfault.faults import FaultPattern, Site
from pytest_hwfault.functional import CallOrderError
from pytest_hwfault.quantization import quantize
from pytest_hwfault.spec import SITES

pytestmark = pytest.mark.usefixtures("single_threaded")  # tiny tensors: one thread is fastest


# -- the models --------------------------------------------------------------------------------------------------------
class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], **options: Any) -> None:
        super().__init__()
        self.rnn = cell(6, 12, batch_first=True, **options)
        self.head = nn.Linear(12 * (2 if options.get("bidirectional") else 1), 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class FunctionalOnly(nn.Module):
    """Every MAC a functional call on the model's own parameters or between activations: F.conv2d, F.linear,
    x @ W, torch.bmm and torch.einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 3, 3, 3) / 4)
        self.kernel_bias = nn.Parameter(torch.randn(4) / 10)
        self.w1 = nn.Parameter(torch.randn(16, 64) / 8)
        self.b1 = nn.Parameter(torch.randn(16) / 10)
        self.w2 = nn.Parameter(torch.randn(16, 5) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(x, self.kernel, self.kernel_bias, stride=2, padding=1))  # [N, 4, 4, 4]
        g = h.flatten(2)  # [N, 4, 16]
        mixed = torch.bmm(g, g.transpose(1, 2))  # [N, 4, 4]
        h = torch.einsum("nij,njk->nik", mixed, g).flatten(1)  # [N, 64]
        h = F.relu(F.linear(h, self.w1, self.b1))
        return h @ self.w2


class Upsampler(nn.Module):
    """A decoder: a transposed convolution with BatchNorm (folded), a grouped, dilated one with output padding, and a
    functional F.conv_transpose2d on the model's own kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.grouped = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2)
        self.kernel = nn.Parameter(torch.randn(4, 3, 2, 2) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.up(F.relu(self.stem(x)))))
        h = F.relu(self.grouped(h))
        return F.conv_transpose2d(h, self.kernel, stride=2).mean((2, 3))


class WindowAttention(nn.Module):
    """Swin-style attention: each image's 4x4 grid of tokens cut into four 2x2 windows folded into the batch
    dimension (k = 4 rows per image), then F.linear / matmul / matmul / F.linear on the folded rows, as torchvision's
    shifted_window_attention. `order`: the windows folded image by image, window by window (all the images' first
    window, then their second...), or "scrambled" (by window row, then image, then window column)."""

    def __init__(self, order: str = "image", sdpa: bool = False) -> None:
        super().__init__()
        self.order, self.sdpa = order, sdpa
        self.bias_table = nn.Parameter(torch.randn(2, 4, 4) / 4)  # a relative-position bias per head, as timm's
        self.embed = nn.Linear(3, 8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.embed(x.permute(0, 2, 3, 1))  # [n, 4, 4, 8]
        windows = h.reshape(n, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5)  # [n, wy, wx, 2, 2, 8]
        if self.order == "window":
            windows = windows.permute(1, 2, 0, 3, 4, 5)
        elif self.order == "scrambled":
            windows = windows.permute(1, 0, 2, 3, 4, 5)
        rows = windows.reshape(-1, 4, 8)  # [n x 4 windows, 4 tokens, 8]
        qkv = F.linear(rows, self.qkv.weight, self.qkv.bias).reshape(-1, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.sdpa:  # timm's fused path: the bias as a mask expanded to every folded row
            mask = self.bias_table.expand(len(q), -1, -1, -1)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
        else:
            context = torch.softmax(q.matmul(k.transpose(-2, -1)) * 0.5, dim=-1).matmul(v)
        out = F.linear(context.transpose(1, 2).reshape(-1, 4, 8), self.proj.weight, self.proj.bias)
        if self.order == "window":
            out = out.reshape(2, 2, n, 4, 8).permute(2, 0, 1, 3, 4)
        elif self.order == "scrambled":
            out = out.reshape(2, n, 2, 4, 8).permute(1, 0, 2, 3, 4)
        return self.head(out.reshape(n, -1, 8).mean(1))


class TwoHeads(nn.Module):
    """A model that returns a dict: the gate reads its "logits"."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 16), nn.ReLU())
        self.cls, self.aux = nn.Linear(16, 3), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"aux": self.aux(h), "logits": self.cls(h)}


def _vit() -> tuple[nn.Module, torch.Tensor]:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.3)  # torchvision zero-initialises the head
    return model, torch.randn(6, 3, 16, 16)


def _bert() -> tuple[nn.Module, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config), torch.randint(0, 60, (6, 10))


def _gpt2() -> tuple[nn.Module, torch.Tensor]:
    """A small causal language model: GPT-2's Conv1D layers (addmm on batch and sequence merged) and causal SDPA."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=60, n_positions=16, n_embd=32, n_layer=2, n_head=4, num_labels=3,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return transformers.GPT2ForSequenceClassification(config), torch.randint(1, 60, (6, 10))


BUILDERS = {
    "vit": _vit,
    "transformer": lambda: (TextClassifier(), torch.randint(0, 40, (6, 9))),
    "lstm": lambda: (Recurrent(nn.LSTM, num_layers=2, bidirectional=True), torch.randn(6, 5, 6)),
    "gru": lambda: (Recurrent(nn.GRU), torch.randn(6, 5, 6)),
    "packed": lambda: (Packed(nn.LSTM, bidirectional=True), _packed_inputs()),
    "functional": lambda: (FunctionalOnly(), torch.randn(6, 3, 8, 8)),
    "decoder": lambda: (Upsampler(), torch.randn(6, 3, 5, 5)),
    "windows": lambda: (WindowAttention(), torch.randn(6, 3, 4, 4)),
    "video": lambda: (FrameCNN(), torch.randn(6, 3, 3, 5, 5)),
    "video_frame_major": lambda: (FrameCNN(frame_major=True), torch.randn(6, 3, 3, 5, 5)),
    "bert": _bert,
    "gpt2": _gpt2,
}
# per model: an attention projection, an attention matmul, a recurrent gate, functional layers
PROBED = {
    "vit": ["encoder.layers.encoder_layer_0.self_attention.q_proj",
            "encoder.layers.encoder_layer_0.self_attention.scores",
            "encoder.layers.encoder_layer_1.self_attention.context"],
    "transformer": ["encoder.layers.0.self_attn.v_proj", "encoder.layers.1.self_attn.scores",
                    "encoder.layers.0.self_attn.context"],
    "lstm": ["rnn.cells.l0.hh", "rnn.cells.l1_reverse.hh", "rnn.cells.l0.ih"],
    "gru": ["rnn.cells.l0.hh", "rnn.cells.l0.ih"],
    "packed": ["rnn.cells.l0.hh", "rnn.cells.l0_reverse.hh", "rnn.cells.l0.ih"],
    "functional": ["conv2d()", "bmm()", "einsum()", "linear()", "matmul()"],
    "decoder": ["up", "grouped", "conv_transpose2d()"],
    "windows": ["linear()", "matmul()", "matmul_2()", "linear_2()"],
    "video": ["stem.conv2d()", "block.conv2d()"],
    "video_frame_major": ["stem.conv2d()", "block.conv2d()"],
    "bert": ["bert.encoder.layer.0.attention.self.query",
             "bert.encoder.layer.0.attention.self.scaled_dot_product_attention().scores",
             "bert.encoder.layer.1.attention.self.scaled_dot_product_attention().context"],
    "gpt2": ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.scaled_dot_product_attention().scores",
             "transformer.h.0.attn.scaled_dot_product_attention().context", "transformer.h.1.mlp.c_proj"],
}
_VIEWS: dict[tuple[str, int], Any] = {}


def view(name: str, bits: int = 8) -> tuple[Any, nn.Module, torch.Tensor]:
    """(quantized view, the user's model, inputs), built once per model and width."""
    key = (name, bits)
    if key not in _VIEWS:
        with seeded(7):
            model, x = BUILDERS[name]()
        model.eval()
        _VIEWS[key] = (quantize(model, x, bits=bits, batch_size=4), model, x)  # calibrated over two batches
    return _VIEWS[key]


# -- coverage ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_multiply_accumulate_is_quantized(name: str) -> None:
    qmodel, model, x = view(name)
    coverage = measure_coverage(qmodel, x)
    assert coverage.complete and coverage.uncovered == [] and coverage.uncounted == [], coverage.describe()
    assert coverage.macs == 1.0 and coverage.weights == 1.0
    assert all(coverage.reaches(1.0, site) for site in SITES if site != "pe")
    for layer in PROBED[name]:
        assert layer in qmodel.layers, list(qmodel.layers)
    # the view computes the model's function: its logits follow the float model's
    with torch.no_grad():
        reference = _logits(model(x))
    quantized = _logits(qmodel(x))
    assert float((quantized - reference).abs().max()) < 0.1 * float(reference.abs().max()) + 1e-3
    assert not torch.equal(quantized, reference)  # and it is quantized


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def test_attention_matmuls_have_two_input_sites_and_no_weight() -> None:
    qmodel, _, x = view("transformer")
    scores = qmodel.layers["encoder.layers.0.self_attn.scores"]
    # [N, heads, L, d] @ [N, heads, d, L]: both operands' codes are the input site, in that order; no weight
    assert scores.input_shape == (4, 9, 8) and scores.second_input_shape == (4, 8, 9)
    assert scores.numel(Site.INPUT) == 2 * 4 * 9 * 8 and scores.numel(Site.WEIGHT) == 0
    assert scores.output_shape == (4, 9, 9)
    assert "encoder.layers.0.self_attn.scores" not in [t.layer for t in qmodel.targets(Site.WEIGHT)]
    assert "encoder.layers.0.self_attn.scores" in [t.layer for t in qmodel.targets(Site.INPUT)]


def test_a_recurrent_cell_runs_its_hidden_matmul_once_per_step() -> None:
    qmodel, _, x = view("lstm")
    hh, ih = qmodel.layers["rnn.cells.l0.hh"], qmodel.layers["rnn.cells.l0.ih"]
    steps = x.shape[1]
    assert hh.calls == steps and ih.calls == 1
    assert hh.numel(Site.ACT) == steps * 4 * 12 and ih.numel(Site.ACT) == steps * 4 * 12
    assert hh.numel(Site.WEIGHT) == 4 * 12 * 12  # one stored weight, whatever the steps


class Packed(nn.Module):
    """A text classifier that packs its variable-length sequences before its recurrent module, as torch's tutorials
    do: each sequence's length is where its first feature stops being above -5."""

    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM, **options: Any) -> None:
        super().__init__()
        self.rnn = cell(5, 12, batch_first=True, **options)
        self.head = nn.Linear(12 * (2 if options.get("bidirectional") else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = (x[:, :, 0] > -5).sum(1).clamp(min=1)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return self.head(padded[torch.arange(len(x)), lengths - 1])  # each sequence's output at its last step


def _packed_inputs(lengths: tuple[int, ...] = (1, 3, 5, 2, 4, 7), steps: int = 7) -> torch.Tensor:
    """Images of these lengths, padded with -10 (the longest one last: calibrated in batches of 4, the first batch's
    longest sequence is shorter than the data's)."""
    x = torch.randn(len(lengths), steps, 5)
    for image, length in enumerate(lengths):
        x[image, length:] = -10
    return x


RECURRENT = {"lstm": (nn.LSTM, {}), "gru_stacked_bidirectional": (nn.GRU, {"num_layers": 2, "bidirectional": True}),
             "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
             "lstm_projected_bidirectional": (nn.LSTM, {"proj_size": 4, "bidirectional": True, "num_layers": 2})}


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("kind", list(RECURRENT))
def test_the_unrolled_module_runs_a_packed_batch_as_torchs_module(kind: str, enforce_sorted: bool,
                                                                 batch_first: bool) -> None:
    """A PackedSequence was refused ("a packed step's rows are no fixed images"). The unrolled module now runs it one
    row per image on the padded batch, each image's steps past its length on zeros, discarded: torch's own packed
    module (sorted and unsorted batches, both layouts, reverse directions starting at each sequence's last step,
    an initial state in the batch's order) gives the same packed output and final states, to float rounding."""
    from pytest_hwfault.decompose import UnrolledRecurrent

    cell, options = RECURRENT[kind]
    with seeded(3):
        rnn = cell(5, 12, batch_first=batch_first, **options).eval()
        lengths = torch.tensor([7, 5, 5, 3, 2, 1]) if enforce_sorted else torch.tensor([3, 7, 1, 5, 7, 2])
        x = torch.randn(6, 7, 5)
        layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
        h0 = torch.randn(layers, 6, options.get("proj_size") or 12)
        hx = (h0, torch.randn(layers, 6, 12)) if cell is nn.LSTM else h0
    unrolled = UnrolledRecurrent(rnn)
    packed = nn.utils.rnn.pack_padded_sequence(x if batch_first else x.transpose(0, 1), lengths,
                                               batch_first=batch_first, enforce_sorted=enforce_sorted)
    with torch.no_grad():
        for state in (None, hx):
            expected, expected_state = rnn(packed, state)
            out, out_state = unrolled(packed, state)
            assert isinstance(out, nn.utils.rnn.PackedSequence)
            for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
                assert _same_or_none(getattr(out, field), getattr(expected, field)), field
            torch.testing.assert_close(out.data, expected.data, rtol=1e-5, atol=1e-6)
            for got, want in zip(*(s if isinstance(s, tuple) else (s,) for s in (out_state, expected_state))):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _same_or_none(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b is None or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("kind", ["lstm", "gru_stacked_bidirectional"])
def test_a_packed_batch_is_quantized_one_row_per_image_for_the_calibrations_longest_steps(kind: str) -> None:
    """The view of a model that packs its batch: every forward pass calls the hidden matmuls once per step of the
    calibration data's longest sequence (found over all calibration batches: the first one's is shorter), so a
    trial's few faulty images run the same calls; each image's result is its own whatever the batch; a fault at a
    step past an image's length changes nothing, one within it does; the report says what share of the per-step
    codes are such padding steps."""
    cell, options = RECURRENT[kind]
    with seeded(5):
        model, x = Packed(cell, **options).eval(), _packed_inputs()
    qmodel = quantize(model, x, batch_size=4)  # the first batch's longest sequence has 5 steps, the data's 7
    hh = qmodel.layers["rnn.cells.l0.hh"]
    assert hh.calls == 7 and qmodel.layers["rnn.cells.l0.ih"].calls == 1
    padding = 1 - (1 + 3 + 5 + 2 + 4 + 7) / (6 * 7)
    assert qmodel.config["notes"] == [
        f"rnn (nn.{cell.__name__}) runs packed batches one row per image for 7 steps, the calibration data's longest "
        "sequence: an image's steps past its length compute on zeros and are discarded, so faults drawn at them "
        f"({padding:.1%} of its layers' per-step codes on the calibration data) change nothing, as on hardware that "
        "skips those steps; fault counts include them"]
    clean = qmodel(x)
    assert torch.equal(torch.cat([qmodel(x[i:i + 1]) for i in range(6)]), clean)
    assert torch.equal(qmodel(x[:2]), clean[:2])  # a batch whose longest sequence is shorter: the same calls
    per_step = hh.numel(Site.ACT) // hh.calls  # an image's act codes at one step
    for step, moved in ((3, False), (0, True)):  # image 0 has one step: 1..6 are padding; unit 29: the cell input
        pattern = FaultPattern.from_faults([("act", "rnn.cells.l0.hh", step * per_step + 29, 7, "flip", 0)])
        faulty = qmodel(x, faults=pattern)
        assert torch.equal(faulty[1:], clean[1:])
        assert torch.equal(faulty[0], clean[0]) is not moved, step


def test_a_packed_sequence_longer_than_the_calibrations_is_refused_saying_how_to_calibrate() -> None:
    """Past the calibration data's longest sequence, a forward pass would call the hidden matmuls more often than
    the faults are placed for: refused, naming both lengths and the fix."""
    from pytest_hwfault.qmodel import UnsupportedModelError

    with seeded(0):
        model, x = Packed().eval(), _packed_inputs()
    qmodel = quantize(model, x[:4])  # lengths 1, 3, 5, 2: the longest has 5 steps
    assert qmodel(x[:5]).shape == (5, 3)  # the fifth image has 4
    with pytest.raises(UnsupportedModelError, match=r"^the model passes its nn\.LSTM a packed sequence of 7 steps, "
                                                    r"where the longest in the calibration data has 5: .*"
                                                    r"\(calibration_data=\.\.\.\)$"):
        qmodel(x)


@pytest.mark.parametrize("core_aten", [False, True], ids=["exported", "core-aten"])
def test_a_graph_from_torch_export_is_quantized_as_its_eager_model(core_aten: bool) -> None:
    """`torch.export.export(model, ...).module()` calls aten.conv2d / aten.linear by name (and, decomposed to core
    ATen by `run_decompositions()`, aten.convolution / aten.addmm), which no layer caught: it was refused as having
    no quantizable layer. Its calls are layers now, with the eager model's layers' codes (the linear quantizes its
    own input: the graph's ReLU is no module to hand codes on through), and faults reach them; one exported for
    one batch size is refused saying how to export it."""
    from pytest_hwfault.qmodel import UnsupportedModelError

    with seeded(21):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
        x = torch.randn(32, 3, 8, 8)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    exported = (program.run_decompositions() if core_aten else program).module()
    eager, graph = quantize(model, x), quantize(exported, x)
    linear = "mm()" if core_aten else "linear()"  # addmm(b, x, W.T) runs as b + mm(x, W.T): x @ W.t(), a Linear
    assert list(graph.layers) == ["conv2d()", linear] and measure_coverage(graph, x).complete
    for site in ("act", "weight"):
        assert [graph.layers[name].numel(Site(site)) for name in graph.layers] == \
            [eager.layers[name].numel(Site(site)) for name in eager.layers]
    with torch.no_grad():
        reference, view = model(x), graph(x)
    assert (view - reference).abs().max() < 0.05 * reference.abs().max()
    # bit 6 of the second image's first output code of the linear: that logit moves by 64 steps, nothing else
    act_scale = next(row["act_scale"] for row in graph.summary() if row["name"] == linear)
    with torch.no_grad():
        faulty = graph(x, FaultPattern.from_faults([("act", linear, 0, 6, "flip", 1)]))
    moved = (faulty != view).nonzero().tolist()
    assert moved == [[1, 0]] and abs(float(faulty[1, 0] - view[1, 0])) == pytest.approx(64 * act_scale, rel=1e-4)
    # bit 6 of the linear's first weight code (class 0, feature 0): only class 0's logits move
    with torch.no_grad():
        faulty = graph(x, FaultPattern.from_faults([("weight", linear, 0, 6, "flip")]))
    assert torch.equal(faulty[:, 1:], view[:, 1:]) and not torch.equal(faulty[:, 0], view[:, 0])
    fixed = torch.export.export(model, (x,)).module()
    with pytest.raises(UnsupportedModelError, match=r"exported for one batch size.*dynamic_shapes"):
        quantize(fixed, x)


@pytest.mark.filterwarnings("ignore:The tensor attributes:UserWarning")  # torch.export's, on an LSTM's weights
@pytest.mark.parametrize("kind, options", [(nn.LSTM, {"num_layers": 2, "bidirectional": True}), (nn.GRU, {})],
                         ids=["lstm-2-layers-bidirectional", "gru"])
def test_an_exported_recurrent_op_is_the_eager_modules_layers(kind: type[nn.RNNBase], options: dict[str, Any]
                                                              ) -> None:
    """An exported graph calls aten.lstm / aten.gru on the module's flat weights, which ran in float (99.3% of an
    LSTM classifier's MACs). The op becomes the module it was exported from, unrolled as the eager module is: the
    same layers (one per gate matmul, called once per step), and the same logits bit for bit, fault-free and under
    the same act faults."""
    with seeded(22):
        model, x = Recurrent(kind, **options).eval(), torch.randn(16, 5, 6)
    graph_module = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    eager, graph = quantize(model, x), quantize(graph_module, x)
    prefix = f"{kind.__name__.lower()}_module."
    assert [name.removeprefix(prefix) for name in graph.layers][:-1] == list(eager.layers)[:-1]
    assert measure_coverage(graph, x).complete
    with torch.no_grad():
        assert torch.equal(graph(x), eager(x))
        for layer, image in (("rnn.cells.l0.hh", 3), ("rnn.cells.l0.ih", 0)):  # the top bits of 40 codes
            faults = [(index, bit) for index in range(0, 160, 8) for bit in (6, 7)]
            pattern = FaultPattern.from_faults([("act", layer, i, bit, "flip", image) for i, bit in faults])
            moved = FaultPattern.from_faults([("act", prefix + layer, i, bit, "flip", image) for i, bit in faults])
            faulty = eager(x, pattern)
            assert torch.equal(graph(x, moved), faulty)
            assert (faulty != eager(x)).any(1).nonzero().flatten().tolist() == [image]


def test_functional_layers_are_named_by_their_caller_and_op() -> None:
    qmodel, _, _ = view("functional")
    assert list(qmodel.layers) == ["conv2d()", "bmm()", "einsum()", "linear()", "matmul()"]
    assert qmodel.layers["matmul()"].module_type == "Linear"  # x @ W: W's codes are a weight site
    assert qmodel.layers["matmul()"].numel(Site.WEIGHT) == 16 * 5
    assert qmodel.layers["bmm()"].numel(Site.WEIGHT) == 0


def test_a_dict_output_is_gated_on_its_logits() -> None:
    from pytest_hwfault.evaluate import predict

    with seeded(2):
        model, x = TwoHeads().eval(), torch.randn(20, 10)
    qmodel = quantize(model, x)
    assert measure_coverage(qmodel, x).complete
    out = qmodel(x)
    assert set(out) == {"aux", "logits"}
    assert torch.equal(predict(qmodel, x).predicted, out["logits"].argmax(1))


def test_a_model_whose_functional_calls_change_is_refused() -> None:
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.linear(x, self.w)
            return F.linear(x, self.w) if bool(x.sum() > 0) else torch.relu(x)

    with seeded(5):
        model = Branching().eval()
        x = torch.randn(64, 4)
    positive = x[(model(x).sum(1) > 0)][:1]
    x = torch.cat([positive, -positive.abs() * 100])  # first batch of one takes the branch, the second not
    with pytest.raises(ValueError, match=r"functional .* calls? .* the model must make the same functional calls in "
                                         r"every forward pass"):
        quantize(model, x, batch_size=1)


class _NormalisedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)


class _SummingLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.weight.sum()


class _TwiceLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(x, self.weight)), self.weight, self.bias)


class _Reads(nn.Module):
    """A Linear `fc` whose weight or bias the model also reads elsewhere (`how`), then a head."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        kind = {"normalised": _NormalisedLinear, "summed": _SummingLinear, "twice": _TwiceLinear}.get(how, nn.Linear)
        self.fc, self.head = kind(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "call-then-module":
            x = self.fc(torch.relu(F.linear(x, self.fc.weight)))
        elif self.how == "module-then-call":
            x = F.linear(torch.relu(self.fc(x)), self.fc.weight)
        elif self.how == "weight-read":
            x = self.fc(x) + self.fc.weight.abs().mean()
        elif self.how == "bias-read":
            x = self.fc(x) - self.fc.bias
        else:
            x = self.fc(x)
        return self.head(torch.relu(x))


@pytest.mark.parametrize("how", ["call-then-module", "module-then-call", "weight-read", "bias-read", "normalised",
                                 "summed", "twice"])
def test_a_module_whose_weight_something_else_reads_is_not_a_layer(how: str) -> None:
    """A layer's weight and bias become its codes, so any other read of them would see codes: a functional call
    with the weight outside the module, a read by the model, a custom forward that normalises or sums its weight or
    calls it twice. Such a module is left out (`config["not_layers"]` says what read it); its linear calls become
    functional layers with their own copy of the weight, so the view computes what the model computes: at 16 bits
    it agrees with the float model to quantization error (on codes it would be off by the weight's scale)."""
    with seeded(6):
        model, x = _Reads(how).eval(), torch.randn(32, 8)
    qmodel = quantize(model, x, bits=16)
    assert "fc" not in qmodel.layers and "head" in qmodel.layers
    assert set(qmodel.config["not_layers"]) == {"fc"} and qmodel.config["not_layers"]["fc"]
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(qmodel(x), expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
    coverage = measure_coverage(qmodel, x)
    assert coverage.complete  # a weight the forward computes from stored tensors is held as that layer's codes


class _LoRALinear(nn.Linear):
    """A Linear subclass whose forward adds a low-rank branch to its own call (as adapter libraries write it)."""

    def __init__(self, features: int, out: int, how: str) -> None:
        super().__init__(features, out)
        self.how = how
        self.down, self.up = nn.Parameter(torch.randn(features, 4)), nn.Parameter(torch.randn(4, out) * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.how == "in-place":
            return y.mul_(2.0)  # the call's own result, changed after it
        if self.how == "plain":
            return y  # what timm's Linear subclass does: its own call's result, untouched
        return y + x @ self.down @ self.up


def test_a_forward_set_on_the_instance_that_reads_another_modules_weight_is_named() -> None:
    """`fc.forward = lambda h: F.linear(h, fc.weight, fc.bias)` closes over the user's module, not the view's copy:
    the copy was a layer that made no call of its own, its kernel replaced the lambda and the view's first forward
    failed with a call-order error. It is left out saying so, and its call (on the user's float weight) is named
    as float compute, which min_coverage=1 refuses."""
    with seeded(22):
        model, x = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval(), torch.randn(64, 16)
    fc = model[2]
    fc.forward = lambda h: F.linear(h, fc.weight, fc.bias)  # type: ignore[method-assign]
    qmodel = quantize(model, x)
    assert list(qmodel.layers) == ["0"]
    assert qmodel.config["not_layers"] == {
        "2": ["its forward (Linear.forward, set on the instance) makes no call of its own on its weight"]}
    coverage = measure_coverage(qmodel, x)
    assert coverage.uncovered[0]["module"] == "2" and "a parameter outside the model" in coverage.uncovered[0]["why"][0]
    assert not coverage.reaches(1.0, "act")
    # the weight it reads is one no weight fault reaches (the weights share said 100%, and a weight gate passed)
    assert coverage.weights == pytest.approx(16 * 32 / (16 * 32 + 32 * 10), rel=1e-9)
    assert not coverage.reaches(1.0, "weight")


@pytest.mark.parametrize("how", ["subclass", "in-place", "instance", "plain"])
def test_a_module_whose_forward_computes_more_than_its_call_is_not_a_layer(how: str) -> None:
    """The engine computes a layer module as its own linear/conv call. A Linear whose forward did more (a subclass
    adding a LoRA branch, a forward set on the instance, the call's result scaled in place) was still a layer, and
    the view computed its call alone: a gate judged the model without its adapter (its logits off by their own
    size). Such a module is left out, naming why; its calls become layers and the view computes the model."""
    with seeded(21):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), _LoRALinear(32, 10, how)).eval()
        x = torch.randn(64, 16)
    if how == "instance":  # a plain Linear whose forward is replaced on the instance (bound: copied with it)
        fc = nn.Linear(32, 10)
        fc.down, fc.up = model[2].down, model[2].up

        def adapted(self: nn.Linear, h: torch.Tensor) -> torch.Tensor:
            return F.linear(h, self.weight, self.bias) + h @ self.down @ self.up

        fc.forward = types.MethodType(adapted, fc)  # type: ignore[method-assign]
        model[2] = fc
    qmodel = quantize(model, x, bits=16)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(qmodel(x), expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
    if how == "plain":
        assert "2" in qmodel.layers and qmodel.config["not_layers"] == {}
        return
    assert "2" not in qmodel.layers and "2.linear()" in qmodel.layers
    reason = qmodel.config["not_layers"]["2"]
    assert len(reason) == 1 and "returns more than its own linear call computes" in reason[0], reason
    assert ("set on the instance" in reason[0]) == (how == "instance")


class _Preprocessing(nn.Conv2d):
    """A Conv2d subclass whose forward transforms its input before its own call."""

    def __init__(self, how: str) -> None:
        super().__init__(3, 8, 3, padding=0 if how in ("zero-pad", "reflect", "one-pad") else 1)
        self.how = how
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("gain", torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = {"normalise": lambda: (x - self.mean) / 0.25, "clamp": lambda: x.clamp(-0.5, 0.5),
             "one-pad": lambda: F.pad(x, (1, 1, 1, 1), value=1.0), "scale": lambda: 2.0 * x * self.gain,
             "zero-pad": lambda: F.pad(x, (1, 1, 1, 1)), "reflect": lambda: F.pad(x, (1, 1, 1, 1), mode="reflect"),
             "view": lambda: x.contiguous()[:, :].reshape(x.shape)}[self.how]()
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


@pytest.mark.parametrize("how", ["normalise", "clamp", "one-pad", "scale", "zero-pad", "reflect", "view"])
def test_a_layer_whose_forward_transforms_its_input_is_a_layer_only_where_codes_stay_codes(how: str) -> None:
    """The engine hands a layer module's forward its input's integer codes. A forward that normalised, clamped or
    padded them with a non-zero value computed on codes as if they were values (the view off by 55-107% of the
    logits' size at 16 bits: a first conv that normalises its images gated as another model); one that scaled them
    computed the right values from an accumulator that was no integer sum of codes. Such a module is left out,
    naming the call, and its call quantizes its own input; a rearrangement and a zero or reflection padding keep
    codes codes (timm's Conv2dSame pads), so the module stays a layer."""
    with seeded(23):
        model = nn.Sequential(_Preprocessing(how), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
        x = torch.rand(32, 3, 8, 8)
    qmodel = quantize(model, x, bits=16)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(qmodel(x), expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
    if how in ("zero-pad", "reflect", "view"):
        assert "0" in qmodel.layers and qmodel.config["not_layers"] == {}
        return
    assert "0" not in qmodel.layers and "0.conv2d()" in qmodel.layers
    call = {"normalise": "div", "clamp": "clamp", "one-pad": "pad", "scale": "mul"}[how]
    assert qmodel.config["not_layers"] == {"0": [f"its forward computes its own conv2d call's input with {call} from "
                                                 "its input (the engine hands a layer its input's integer codes, "
                                                 "which only a rearrangement or a zero padding keeps)"]}


class _ScaledLSTM(nn.LSTM):
    def forward(self, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, Any]:  # type: ignore[override]
        out, state = super().forward(x, hx)
        return out * 3.0 + 1.0, state


class _ScaledAttention(nn.MultiheadAttention):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out, weights = super().forward(q, k, v, **kwargs)
        return out * 3.0 + 1.0, weights


@pytest.mark.parametrize("kind", ["lstm", "attention"])
def test_a_recurrent_or_attention_subclass_with_its_own_forward_keeps_it(kind: str) -> None:
    """The rewrites of nn.LSTM and nn.MultiheadAttention reproduce those classes' forwards. A subclass whose forward
    scaled their outputs was rewritten as the base class (the view off by 66-72% of the logits' size at 16 bits,
    at 100% reach). It keeps its forward: the attention's calls become layers one by one, the recurrent op runs in
    float and the coverage says why, which min_coverage=1 refuses."""
    with seeded(24):
        inner = _ScaledLSTM(8, 16, batch_first=True) if kind == "lstm" else _ScaledAttention(8, 2, batch_first=True)
        head = nn.Linear(16 if kind == "lstm" else 8, 4)
        x = torch.randn(16, 5, 8)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.head = inner, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.inner(x)[0] if kind == "lstm" else self.inner(x, x, x, need_weights=False)[0]
            return self.head(out.mean(1))

    model = Net().eval()
    qmodel = quantize(model, x, bits=16)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(qmodel(x), expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
    coverage = measure_coverage(qmodel, x)
    if kind == "attention":
        assert "inner.linear()" in qmodel.layers and coverage.complete, coverage.describe()
        return
    assert list(qmodel.layers) == ["head"] and not coverage.reaches(1.0, "act")
    assert coverage.uncovered[0]["module"] == "inner" and coverage.uncovered[0]["why"] == [
        "_ScaledLSTM runs its own forward, not LSTM's: the engine rewrites only LSTM's own forward into quantized "
        "pieces, so its recurrent MACs run in float"]


def test_an_embedding_tied_to_a_linear_head_keeps_the_head_a_layer() -> None:
    """Tied language-model heads: the embedding reads the table through itself, and keeps its float values when
    the head's weight becomes codes, so the head stays a layer."""
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.mid = nn.Embedding(20, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mid(self.embed(tokens)))).mean(1)

    with seeded(8):
        model, tokens = Tied().eval(), torch.randint(0, 20, (32, 5))
    qmodel = quantize(model, tokens, bits=16)
    assert set(qmodel.layers) == {"mid", "head"} and qmodel.config["not_layers"] == {}
    with torch.no_grad():
        expected = model(tokens)
    assert torch.allclose(qmodel(tokens), expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


def test_a_layer_on_learned_latent_queries_runs_in_float_and_is_named() -> None:
    """A Linear applied to a parameter (Perceiver-style latent queries, no batch dimension) computes one thing for
    every image: no per-image fault site. It stays float, and the coverage names it and why (it was refused with a
    shape error before)."""
    class Latents(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.latents = nn.Parameter(torch.randn(5, 16))
            self.q, self.k, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scores = torch.einsum("ld,ntd->nlt", self.q(self.latents), self.k(x))
            return self.head(torch.einsum("nlt,ntd->nld", torch.softmax(scores, -1), x).mean(1))

    with seeded(12):
        model, x = Latents().eval(), torch.randn(24, 7, 16)
    qmodel = quantize(model, x, bits=16)
    assert "q" not in qmodel.layers and {"k", "head"} <= set(qmodel.layers)
    assert qmodel.config["not_layers"] == {"q": ["a call on a tensor without the batch dimension"]}
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(qmodel(x), expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
    uncovered = {entry["module"]: entry["why"] for entry in measure_coverage(qmodel, x).uncovered}
    assert uncovered["q"] == ["linear: its result has no batch dimension"]


def test_a_module_that_never_runs_lends_its_weight_to_the_functional_call() -> None:
    """nn.MultiheadAttention-style: the module holding the weight never runs, so the call is the layer, exact."""
    class Borrowed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(F.linear(x, self.proj.weight, self.proj.bias)))

    with seeded(7):
        model, x = Borrowed().eval(), torch.randn(16, 8)
    qmodel = quantize(model, x)
    assert set(qmodel.layers) == {"linear()", "head"}
    assert measure_coverage(qmodel, x).complete


# -- single faults against an integer reference ------------------------------------------------------------------------
@contextmanager
def _capture(qmodel: Any, name: str) -> Iterator[dict[str, list[Any]]]:
    """Per call of layer `name`: the float operands that entered it (before the engine's hooks) and what it handed
    on (as values)."""
    layer = qmodel.layers[name]
    seen: dict[str, list[Any]] = {"in": [], "out": []}
    operands = 2 if layer.second_input_shape is not None else 1

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        raw = [a.detach().clone() for a in args[:operands]]
        raw[0] = layer.dequantize_input(raw[0])
        seen["in"].append(raw)

    def after(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        seen["out"].append(layer.dequantize_output(out.detach()).clone(memory_format=torch.contiguous_format))

    handles = [layer.module.register_forward_pre_hook(before, prepend=True), layer.module.register_forward_hook(after)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _codes(values: torch.Tensor, scale: float, qmax: int) -> torch.Tensor:
    """The quantizer: round(x x (1 / scale)) in float32, saturated."""
    scaled = (values.float() * torch.tensor(1.0 / scale, dtype=torch.float32)).double()
    return torch.clamp(torch.round(scaled), -qmax, qmax).contiguous()  # row-major, as fault indices count


def _reference_acc(layer: Any, operands: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The layer's exact integer accumulator (float64 holds these sums exactly) from its operand codes."""
    module = layer.module
    if isinstance(module, Einsum):
        acc = torch.einsum(module.equation, *operands)
    elif isinstance(module, MatMul):
        acc = torch.matmul(*operands)
    elif isinstance(module, nn.Linear):
        acc = operands[0] @ weight.T
    elif isinstance(module, nn.ConvTranspose2d):
        acc = F.conv_transpose2d(operands[0], weight, None, module.stride, module.padding, module.output_padding,
                                 module.groups, module.dilation)
    else:
        conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(module).__mro__[
            1 if layer.channel_axis == 1 else 0]]  # a convolution of frames folded into the batch: [N, T, C, ...]
        x = operands[0]
        acc = conv(x.flatten(0, 1) if layer.channel_axis == 1 else x, weight, None, module.stride, module.padding,
                   module.dilation, module.groups)
        acc = acc.unflatten(0, (len(x), -1)) if layer.channel_axis == 1 else acc
    if layer.bias_codes is not None:
        acc = acc + layer.bias_codes.double()
    return acc


def _assert_requantized(layer: Any, out: torch.Tensor, acc: torch.Tensor) -> None:
    codes = torch.round(out.double() / layer.act_scale)
    scale = layer.weight_scale.double() * layer.input_scale
    if layer.channel_axis >= 0:  # an image's output [O, ...], or [T, O, ...] for frames folded into the batch
        scale = scale.reshape(-1, *([1] * (len(layer.output_shape) - 1 - layer.channel_axis)))
    real = torch.clamp(acc * scale / layer.act_scale, -layer.qmax, layer.qmax)
    bad = ((codes - real).abs() > 0.5 + 1e-4 + 4e-7 * real.abs()).nonzero().tolist()[:3]
    assert not bad, [(i, float(codes[tuple(i)]), float(real[tuple(i)])) for i in bad]


def check_one_fault(qmodel: Any, name: str, x: torch.Tensor, site: str, index: int, bit: int, kind: str,
                    image: int) -> None:
    """Run the fault; the layer's output at the faulty call must be the reference's, computed from the codes of the
    tensors that entered it with the oracle's code at the fault."""
    layer = qmodel.layers[name]
    pattern = FaultPattern.from_faults([(site, name, index, bit, kind, None if site == "weight" else image)])
    with _capture(qmodel, name) as clean:
        qmodel(x)
    with _capture(qmodel, name) as faulty:
        qmodel(x, faults=pattern)
    per_call = {s: sum(math.prod(p) for p in layer.parts(Site(s))) // layer.calls for s in ("input", "act", "acc")}
    call = 0 if site == "weight" else index // per_call[site]
    local = 0 if site == "weight" else index % per_call[site]
    weight = layer.weight_codes.double().clone()
    if site == "weight":
        weight.view(-1)[index] = oracle(int(weight.view(-1)[index]), bit, kind, layer.bits)
    scales = [layer.input_scale, layer.second_input_scale]
    operands = [_codes(t, s, layer.qmax) for t, s in zip(faulty["in"][call], scales)]
    if site == "input":
        sizes = [math.prod(t.shape[1:]) for t in operands]
        which = 0 if local < sizes[0] else 1
        flat = operands[which][image].view(-1)
        at = local - (sizes[0] if which else 0)
        flat[at] = oracle(int(flat[at]), bit, kind, layer.bits)
    acc = _reference_acc(layer, operands, weight).contiguous()
    if site == "acc":
        flat = acc[image].view(-1)
        flat[local] = oracle(int(flat[local]), bit, kind, layer.acc_bits)
    out = faulty["out"][call]
    if site == "act":
        expected = clean["out"][call].clone()
        code = int(torch.round(expected[image].reshape(-1)[local] / layer.act_scale))
        expected[image].view(-1)[local] = oracle(code, bit, kind, layer.bits) * torch.tensor(layer.act_scale)
        assert torch.equal(out, expected)
    else:
        _assert_requantized(layer, out, acc)
    for other in range(len(clean["out"])):  # earlier calls of the layer did not move
        if other < call and site != "weight":
            assert torch.equal(faulty["out"][other], clean["out"][other])


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(list(BUILDERS)), data=st.data())
def test_one_fault_in_attention_recurrent_and_functional_layers_matches_the_reference(name: str, data) -> None:
    qmodel, _, x = view(name)
    layer_name = data.draw(st.sampled_from(PROBED[name]), label="layer")
    layer = qmodel.layers[layer_name]
    sites = [s for s in ("act", "weight", "acc", "input") if layer.numel(Site(s))]  # qparams, pe: own tests
    site = data.draw(st.sampled_from(sites), label="site")
    index = data.draw(st.integers(0, layer.numel(Site(site)) - 1), label="index")
    bit = data.draw(st.integers(0, layer.site_bits(Site(site)) - 1), label="bit")
    kind = data.draw(st.sampled_from(["flip", "stuck0", "stuck1"]), label="kind")
    image = data.draw(st.integers(0, len(x) - 1), label="image")
    check_one_fault(qmodel, layer_name, x, site, index, bit, kind, image)


@pytest.mark.parametrize("name", ["transformer", "lstm"])
@pytest.mark.parametrize("site", ["input", "act"])
def test_a_fault_at_the_last_step_or_second_operand_is_placed_there(name: str, site: str) -> None:
    """The last index of a site is the last call's (an LSTM's last step) or the second operand's last code."""
    qmodel, _, x = view(name)
    layer_name = PROBED[name][1]
    layer = qmodel.layers[layer_name]
    check_one_fault(qmodel, layer_name, x, site, layer.numel(Site(site)) - 1, layer.bits - 1, "flip", len(x) - 1)


# -- every width -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 17))
def test_every_width_is_exact_on_an_attention_model(bits: int) -> None:
    qmodel, _, x = view("transformer", bits)
    for name, layer in qmodel.layers.items():
        assert layer.acc_bits == (32 if bits <= 8 else 48)
        with _capture(qmodel, name) as seen:
            qmodel(x)
        scales = [layer.input_scale, layer.second_input_scale]
        for operands, out in zip(seen["in"], seen["out"]):
            codes = [_codes(t, s, layer.qmax) for t, s in zip(operands, scales)]
            _assert_requantized(layer, out, _reference_acc(layer, codes, layer.weight_codes.double()))
    for name in PROBED["transformer"]:
        layer = qmodel.layers[name]
        check_one_fault(qmodel, name, x, "acc", layer.numel(Site.ACC) - 1, layer.acc_bits - 1, "flip", 0)


# -- dict batches, end to end ------------------------------------------------------------------------------------------
def _token_batches() -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
    with seeded(11):
        tokens = torch.randint(0, 40, (48, 9))
        labels = torch.randint(0, 5, (48,))
    items = [{"input_ids": t, "labels": y, "attention_mask": torch.ones(9)} for t, y in zip(tokens, labels)]
    return items, tokens, labels


def test_dict_batches_are_read_by_their_keys() -> None:
    from torch.utils.data import DataLoader

    from pytest_hwfault.data import DataError, Keyed, as_tensors

    items, tokens, labels = _token_batches()
    loader = DataLoader(items, batch_size=8)  # collates into dicts of batched tensors, as Hugging Face loaders do
    x, y = as_tensors(Keyed(loader, "input_ids", "labels"))
    assert torch.equal(x, tokens) and torch.equal(y, labels)
    x, y = as_tensors(Keyed(items, "input_ids", "labels"), samples=10)  # a Dataset of dict items
    assert torch.equal(x, tokens[:10]) and torch.equal(y, labels[:10])
    with pytest.raises(DataError, match=r"batches are dicts \(keys \['attention_mask', 'input_ids', 'labels'\]\): "
                                        r"pass input_key= and label_key="):
        as_tensors(loader)
    with pytest.raises(DataError, match=r"label_key='label' is not in the data's batches: \['attention_mask'"):
        as_tensors(Keyed(loader, "input_ids", "label"))


DICT_CONFTEST = '''
import pytest, torch
from torch import nn
from torch.utils.data import DataLoader
from contextlib import contextmanager

@contextmanager
def seeded(seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield

''' + inspect.getsource(TextClassifier) + "\n\n" + inspect.getsource(_token_batches) + '''


@pytest.fixture(scope="session")
def text_model():
    torch.manual_seed(0)
    return TextClassifier().eval()


@pytest.fixture(scope="session")
def loader(text_model):
    items, tokens, _ = _token_batches()
    with torch.no_grad():
        predicted = text_model(tokens).argmax(1)  # the float model's own predictions: accuracy 1.0
    for item, label in zip(items, predicted):
        item["labels"] = label
    return DataLoader(items, batch_size=8)
'''


def test_a_transformer_on_dict_batches_is_gated_with_full_coverage(pytester: pytest.Pytester) -> None:
    import json

    pytester.makeconftest(DICT_CONFTEST)
    pytester.makepyfile(test_text='''
from pytest_hwfault import resilience

@resilience(ber=1e-4, site=["act", "weight"], min_acc=0.2, budget=8)
def test_text(hwfault, text_model, loader):
    hwfault.assess(text_model, loader, input_key="input_ids", label_key="labels")

@resilience(ber=1e-4, site="act", min_acc=0.2, budget=8)
def test_without_keys(hwfault, text_model, loader):
    hwfault.assess(text_model, loader)
''')
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hwfault", f"--hwfault-report={report}")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_without_keys*", "*pass input_key= and label_key=*"])
    campaigns = json.loads(report.read_text())["campaigns"]
    assert len(campaigns) == 2
    for campaign in campaigns:
        assert campaign["coverage"]["macs"] == 1.0 and campaign["coverage"]["weights"] == 1.0, campaign["coverage"]
        assert campaign["coverage"]["uncovered"] == [] and campaign["verdict"] == "pass"
        assert any("self_attn.scores" in layer["name"] for layer in campaign["layers"]), campaign["layers"][:3]


def test_sixteen_bit_codes_keep_a_resnet18_exact_without_saturating_its_bias() -> None:
    """int32 bias codes saturated in 7 of resnet18's 21 layers at 16 bits: a 48-bit accumulator holds them, and the
    layers whose sums can pass 2^24 sum in float64."""
    from torchvision.models import resnet18

    with seeded(9):
        model, x = resnet18(weights=None, num_classes=10).eval(), torch.randn(4, 3, 32, 32)
        for module in model.modules():  # BatchNorm with statistics of its own, so that folding matters
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.data.normal_(0, 0.5)
    qmodel = quantize(model, x, bits=16)
    assert {layer.acc_bits for layer in qmodel.layers.values()} == {48}
    assert {layer.compute_dtype for layer in qmodel.layers.values()} == {torch.float64}
    biased = [layer for layer in qmodel.layers.values() if layer.bias_codes is not None]
    assert len(biased) == 21 and max(float(layer.bias_codes.abs().max()) for layer in biased) > 2**31
    with torch.no_grad():
        reference = model(x)
    assert float((qmodel(x) - reference).abs().max()) < 2e-3 * float(reference.abs().max())
    for name, layer in qmodel.layers.items():
        with _capture(qmodel, name) as seen:
            qmodel(x)
        codes = _codes(seen["in"][0][0], layer.input_scale, layer.qmax)
        _assert_requantized(layer, seen["out"][0], _reference_acc(layer, [codes], layer.weight_codes.double()))


def test_a_fault_on_a_bit_the_code_does_not_have_is_refused() -> None:
    qmodel, _, x = view("functional", 4)
    with pytest.raises(ValueError, match=r"bit 6 does not exist in the 4-bit act codes of layer 'linear\(\)'"):
        qmodel(x, faults=FaultPattern.from_faults([("act", "linear()", 0, 6, "flip", 0)]))
    with pytest.raises(ValueError, match=r"bit 32 does not exist in the 32-bit acc codes of layer 'bmm\(\)'"):
        qmodel(x, faults=FaultPattern.from_faults([("acc", "bmm()", 0, 32, "flip", 0)]))


# -- several input tensors per batch ------------------------------------------------------------------------------
class Scaled(nn.Module):
    """Two inputs: features and a per-image scale (traceable, so late start resumes it from cached values)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) * scale[:, None])


def test_tuple_batches_of_several_inputs_are_passed_as_the_data_gives_them() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from pytest_hwfault.data import DataError, Inputs, Keyed, as_tensors
    from pytest_hwfault.evaluate import predict

    with seeded(12):
        model, x, scale = Scaled().eval(), torch.randn(40, 10), torch.rand(40) + 0.5
        y = model(x, scale).argmax(1).detach()
    loader = DataLoader(TensorDataset(x, scale, y), batch_size=16)
    with pytest.raises(DataError, match=r"batches hold 3 values, not an \(input, label\) pair: .* "
                                        r"input_key=\(0, 1\), label_key=2"):
        as_tensors(loader)
    inputs, labels = as_tensors(Keyed(loader, (0, 1), 2))
    assert isinstance(inputs, Inputs) and inputs.names is None and len(inputs) == 40
    assert torch.equal(inputs.tensors[0], x) and torch.equal(inputs.tensors[1], scale) and torch.equal(labels, y)
    qmodel = quantize(model, inputs)
    assert measure_coverage(qmodel, inputs).complete
    with torch.no_grad():
        reference = model(x, scale)
    assert float((qmodel(inputs) - reference).abs().max()) < 0.05 * float(reference.abs().max())
    assert torch.equal(predict(qmodel, inputs, batch_size=7).predicted, qmodel(inputs).argmax(1))


def test_late_start_resumes_a_model_of_several_inputs_bit_exactly() -> None:
    from pytest_hwfault.campaign import Campaign
    from pytest_hwfault.data import Inputs
    from pytest_hwfault.spec import CampaignSpec

    with seeded(13):
        model, x, scale = Scaled().eval(), torch.randn(64, 10), torch.rand(64) + 0.5
        y = model(x, scale).argmax(1).detach()
    inputs = Inputs((x, scale))
    qmodel = quantize(model, inputs)
    spec = CampaignSpec(site="act", ber=3e-3, min_acc=0.0, budget=4, first=4)
    late = Campaign(qmodel, inputs, y, spec, "t", late_start=True)
    assert late.late_start() is not None  # resumes from cached values of both inputs' paths
    full = Campaign(qmodel, inputs, y, spec, "t", late_start=False)
    for trial in range(4):
        assert late.trial(trial) == full.trial(trial)


def test_bert_with_an_attention_mask_from_dict_batches() -> None:
    from torch.utils.data import DataLoader

    from pytest_hwfault.data import Inputs, Keyed, as_tensors

    model, _ = view("bert")[1], None
    with seeded(14):
        ids = torch.randint(0, 60, (8, 10))
        mask = torch.ones(8, 10, dtype=torch.int64)
        mask[::2, 6:] = 0  # padded sequences
    items = [{"input_ids": i, "attention_mask": m, "labels": torch.tensor(0)} for i, m in zip(ids, mask)]
    inputs, _ = as_tensors(Keyed(DataLoader(items, batch_size=4), ("input_ids", "attention_mask"), "labels"))
    assert isinstance(inputs, Inputs) and inputs.names == ("input_ids", "attention_mask")
    qmodel = quantize(model, inputs, batch_size=4)
    assert measure_coverage(qmodel, inputs).complete
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    out = qmodel(inputs).logits
    assert float((out - reference).abs().max()) < 0.05 * float(reference.abs().max())
    # the mask reaches the quantized attention: tokens it hides do not change the classification at all, and do
    # when no mask is passed
    other = ids.clone()
    other[::2, 6:] = (ids[::2, 6:] + 1) % 60
    assert torch.equal(qmodel(Inputs((other, mask), inputs.names)).logits[::2], out[::2])
    alone = [qmodel(Inputs((t,), ("input_ids",))).logits[::2] for t in (ids, other)]
    assert not torch.equal(*alone)
    name = "bert.encoder.layer.0.attention.self.scaled_dot_product_attention().scores"
    layer = qmodel.layers[name]
    for site in ("input", "act", "acc"):
        check_one_fault(qmodel, name, inputs, site, layer.numel(Site(site)) // 2 + 3, 5, "flip", 6)


@pytest.mark.parametrize("name", ["transformer", "lstm", "functional"])
def test_results_do_not_depend_on_the_batch_split_or_the_thread_count(name: str) -> None:
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    qmodel, _, x = view(name)
    for site in (s for s in SITES if s != "pe"):  # pe: these models' activation matmuls are not on an array
        targets = qmodel.targets(Site(site))
        bits = sum(t.numel * t.bits for t in targets) * (len(x) if Site(site).transient else 1)
        pattern = sample_pattern(FaultModel(site, 40 / bits), targets, len(x), trial_generator(3, name, 0))
        whole = _logits(qmodel(x, faults=pattern))
        split = torch.cat([_logits(qmodel(x[:2], faults=pattern)),
                           _logits(qmodel(x[2:], faults=pattern, image_offset=2))])
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            two_threads = _logits(qmodel(x, faults=pattern))
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(whole, split) and torch.equal(whole, two_threads), site
        assert not torch.equal(whole, _logits(qmodel(x))), site  # the faults did something


class GroupedQueryAttention(nn.Module):
    """Four query heads sharing two key/value heads through F.scaled_dot_product_attention(enable_gqa=True), or,
    with `explicit`, the same computed as torch's reference does: key/value heads repeated, then plain attention."""

    def __init__(self, explicit: bool = False) -> None:
        super().__init__()
        self.explicit = explicit
        self.q, self.kv, self.out = nn.Linear(16, 4 * 8), nn.Linear(16, 2 * 2 * 8), nn.Linear(4 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q = self.q(x).reshape(n, length, 4, 8).transpose(1, 2)
        k, v = self.kv(x).reshape(n, length, 2, 2, 8).permute(2, 0, 3, 1, 4)
        if self.explicit:
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(context.transpose(1, 2).reshape(n, length, 32).mean(1))


def test_grouped_query_attention_is_quantized_whole_as_torch_computes_it() -> None:
    """enable_gqa=True ran in float and made the coverage unknown (torch's CPU flash-attention kernel has no flop
    formula), so only min_coverage=0 accepted it. Its matmuls are now layers: fully covered, and every site's
    trial identical to the same model with key/value heads repeated."""
    with seeded(11):
        model, x = GroupedQueryAttention().eval(), torch.randn(6, 7, 16)
    twin = GroupedQueryAttention(explicit=True).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(x), twin(x), atol=1e-6)
    qmodel, qtwin = quantize(model, x), quantize(twin, x)
    assert list(qmodel.layers) == list(qtwin.layers)
    assert "scaled_dot_product_attention().scores" in qmodel.layers
    coverage = measure_coverage(qmodel, x)
    assert coverage.complete and coverage.macs == 1.0, coverage.describe()
    assert torch.equal(qmodel(x), qtwin(x))
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    for site in ("act", "input", "acc", "weight"):
        fault_model = FaultModel(site, 3e-3)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(1, site, 0))
        assert len(pattern) > 0
        assert torch.equal(qmodel(x, pattern), qtwin(x, pattern)), site


@pytest.mark.parametrize("layer_name", PROBED["decoder"])
@pytest.mark.parametrize("site", ["act", "weight", "acc", "input"])
def test_one_fault_in_a_transposed_convolution_matches_the_reference(layer_name: str, site: str) -> None:
    """First, middle and last code of each site, on the last image: grouped and dilated, with output padding, BN
    folded, and a functional call."""
    qmodel, _, x = view("decoder")
    numel = qmodel.layers[layer_name].numel(Site(site))
    for index, bit in ((0, 0), (numel // 2, 3), (numel - 1, qmodel.layers[layer_name].site_bits(Site(site)) - 1)):
        check_one_fault(qmodel, layer_name, x, site, index, bit, "flip", len(x) - 1)


def test_a_grouped_transposed_convolution_has_a_scale_per_output_channel() -> None:
    """Its weight [in, out / groups, k, k] holds output channel g x (out / groups) + j at [g's inputs, j]: each
    output channel's scale is the largest |weight| of its own kernels / 127, and the codes reproduce the weight."""
    qmodel, model, _ = view("decoder")
    layer = qmodel.layers["grouped"]
    weight = model.grouped.weight.detach()  # [6, 2, 3, 3], groups 2
    per_output = weight.reshape(2, 3, 2, 9).transpose(1, 2).reshape(4, -1)
    assert torch.allclose(layer.weight_scale, per_output.abs().amax(1) / 127, rtol=1e-6)
    scales = torch.stack([layer.weight_scale[layer.weight_channel(i)] for i in range(weight.numel())])
    assert (layer.weight_codes.reshape(-1) * scales - weight.reshape(-1)).abs().le(scales / 2 + 1e-7).all()
    # inputs 0-2 (group 0) feed outputs 0, 1; inputs 3-5 feed outputs 2, 3
    assert [layer.weight_channel(i) for i in (0, 9, 18, 27, 53, 54, 63, 107)] == [0, 1, 0, 1, 1, 2, 3, 3]
    assert qmodel.folded == [("up", "bn")]


def test_windows_folded_into_the_batch_dimension_are_layers_placed_per_image() -> None:
    """Swin's window attention folds each image's windows into the batch dimension: its linears and matmuls ran in
    float ("its result has no batch dimension", 14% of swin_t's MACs). Folded image by image (checked on the
    model), they are layers on [images, windows, ...]: covered whole, and a trial's results do not depend on the
    batch split, so each image's faults stay in its own rows."""
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    qmodel, _, x = view("windows")
    layer = qmodel.layers["linear()"]
    assert layer.input_shape == (4, 4, 8) and layer.output_shape == (4, 4, 24)  # 4 windows of 4 tokens per image
    assert qmodel.layers["matmul()"].input_shape == (4, 2, 4, 4)
    for site in ("act", "input", "acc"):
        fault_model = FaultModel(site, 2e-3)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(3, site, 0))
        whole = qmodel(x, pattern)
        split = torch.cat([qmodel(x[:2], pattern), qmodel(x[2:], pattern, image_offset=2)])
        assert torch.equal(whole, split), site
        assert not torch.equal(whole, qmodel(x)), site


def test_windows_folded_out_of_image_order_stay_in_float_and_are_named() -> None:
    """Folded neither image by image nor step by step, an image's rows follow no pattern the view can place faults
    in: they would land in other images. Those calls run in float, named with why; so do all folded calls when one
    image cannot show the order."""
    with seeded(7):
        model, x = WindowAttention(order="scrambled").eval(), torch.randn(6, 3, 4, 4)
    qmodel = quantize(model, x)
    assert list(qmodel.layers) == ["embed", "head"]
    coverage = measure_coverage(qmodel, x)
    assert coverage.macs < 0.9
    assert any("in another order than image by image" in why for row in coverage.uncovered for why in row["why"])
    with seeded(7):
        model = WindowAttention().eval()
    single = quantize(model, x, batch_size=1)
    assert list(single.layers) == ["embed", "head"]
    reasons = {call.reason for call in single.functional.calls}
    assert reasons == {"it folds images into its batch dimension, and the first calibration batch has one image: "
                       "give two or more, to check that each image's rows lie together"}


def test_swin_t_is_covered_whole() -> None:
    from torchvision.models import swin_t

    with seeded(7):
        model, x = swin_t(num_classes=5).eval(), torch.randn(2, 3, 64, 64)
    qmodel = quantize(model, x)
    coverage = measure_coverage(qmodel, x)
    assert coverage.complete and coverage.macs == 1.0 and coverage.weights == 1.0, coverage.describe()
    assert "features.1.0.attn.matmul_2()" in qmodel.layers


class ComputedBias(nn.Module):
    """A functional linear whose bias the forward computes from a parameter, as Swin V2 zeroes the key's share of
    its qkv bias; or (`from_input`) one that changes with the input; or (`stored`) the same bias as a parameter."""

    def __init__(self, mode: str = "computed") -> None:
        super().__init__()
        self.mode = mode
        self.w, self.b = nn.Parameter(torch.randn(24, 8) / 3), nn.Parameter(torch.randn(24) / 4)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "stored":
            bias = self.b
        else:
            bias = self.b.clone()
            bias[8:16].zero_()
            if self.mode == "from_input":
                bias = bias * x.mean()
        return self.head(F.relu(F.linear(x, self.w, bias)))


def test_a_bias_computed_from_stored_tensors_is_the_layers_bias() -> None:
    """Swin V2's qkv calls ran in float (51% of swin_v2_t's MACs) because their bias is computed in the forward pass.
    A linear with a parameter weight and a computed bias is a layer holding that bias: the same numbers as the
    model that stores it, faulty or not; a bias that changes with the input is refused, not silently frozen."""
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator
    from pytest_hwfault.functional import CallOrderError

    with seeded(5):
        model, x = ComputedBias().eval(), torch.randn(16, 8)
    stored = ComputedBias("stored").eval()
    stored.load_state_dict(model.state_dict())
    with torch.no_grad():
        stored.b[8:16] = 0
    qmodel, qstored = quantize(model, x), quantize(stored, x)
    assert list(qmodel.layers) == ["linear()", "head"]
    assert measure_coverage(qmodel, x).macs == 1.0
    for site in ("act", "acc", "weight"):
        fault_model = FaultModel(site, 1e-2)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(5, site, 0))
        assert torch.equal(qmodel(x, pattern), qstored(x, pattern)), site
    assert torch.equal(qmodel(x), qstored(x))
    changing = ComputedBias("from_input").eval()
    changing.load_state_dict(model.state_dict())
    with pytest.raises(CallOrderError, match=r"'linear\(\)' was made with another computed bias"):
        quantize(changing, torch.randn(32, 8), batch_size=16)


def test_swin_v2_t_is_covered_but_its_position_bias_mlp() -> None:
    from torchvision.models import swin_v2_t

    with seeded(7):
        model, x = swin_v2_t(num_classes=5).eval(), torch.randn(2, 3, 64, 64)
    coverage = measure_coverage(quantize(model, x), x)
    # left in float: only the continuous position bias MLPs, computed from a coordinate table, the same for every
    # image (as hardware would store their result)
    assert {row["module"].rsplit(".", 1)[0] for row in coverage.uncovered} <= {
        f"features.{stage}.{block}.attn.cpb_mlp" for stage in (1, 3, 5, 7) for block in range(6)}
    assert coverage.macs > 0.98, coverage.describe()


def test_folded_fused_attention_is_two_layers_placed_per_image() -> None:
    """timm's Swin runs F.scaled_dot_product_attention on its folded windows with the position bias as a mask per
    row: its matmuls are layers on [images, windows, ...], the mask folded the same way."""
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    with seeded(7):
        model, x = WindowAttention(sdpa=True).eval(), torch.randn(6, 3, 4, 4)
    qmodel = quantize(model, x)
    assert "scaled_dot_product_attention().scores" in qmodel.layers
    assert qmodel.layers["scaled_dot_product_attention().scores"].input_shape == (4, 2, 4, 4)
    coverage = measure_coverage(qmodel, x)
    assert coverage.complete and coverage.macs == 1.0, coverage.describe()
    with torch.no_grad():
        reference = model(x)
    assert float((qmodel(x) - reference).abs().max()) < 0.1 * float(reference.abs().max())
    for site in ("act", "input"):
        fault_model = FaultModel(site, 2e-3)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(4, site, 0))
        whole = qmodel(x, pattern)
        assert torch.equal(whole, torch.cat([qmodel(x[:2], pattern), qmodel(x[2:], pattern, image_offset=2)]))
        assert not torch.equal(whole, qmodel(x)), site


class Im2colConv(nn.Module):
    """A convolution written as unfold and `W @ cols`: a stored [out, in] matrix as the left operand, whose first
    dimension (8) is the calibration batch size below. `explicit`: the same as a Linear over the columns."""

    def __init__(self, explicit: bool = False) -> None:
        super().__init__()
        self.explicit = explicit
        if explicit:
            self.mix = nn.Linear(27, 8, bias=False)
        else:
            self.w = nn.Parameter(torch.randn(8, 27) / 4)
        self.head = nn.Linear(8 * 64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(x, 3, padding=1)  # [N, 27, 64]
        h = self.mix(cols.transpose(-1, -2)).transpose(-1, -2) if self.explicit else self.w @ cols
        return self.head(torch.relu(h).flatten(1))


def test_a_stored_left_operand_is_a_weight_even_where_its_rows_match_the_batch_size() -> None:
    """`W @ x` with W a parameter of 8 rows, calibrated on 8 images: W was taken for an activation holding 8 images
    (input faults on its rows as if they were images; no weight site). It is a weight layer, the same at every site
    as the model that computes it with a Linear."""
    with seeded(13):
        model, x = Im2colConv().eval(), torch.randn(8, 3, 8, 8)
    twin = Im2colConv(explicit=True).eval()
    with torch.no_grad():
        twin.mix.weight.copy_(model.w)
        twin.head.load_state_dict(model.head.state_dict())
    qmodel, qtwin = quantize(model, x), quantize(twin, x)
    assert set(qmodel.layers) == {"matmul()", "head"} and qmodel.layers["matmul()"].module_type == "Linear"
    assert {t.layer: t.numel for t in qmodel.targets(Site("weight"))}["matmul()"] == 8 * 27
    coverage = measure_coverage(qmodel, x)
    assert coverage.complete and coverage.macs == 1.0 and coverage.weights == 1.0, coverage.describe()
    assert torch.equal(qmodel(x), qtwin(x))
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    for site in ("act", "input", "acc", "weight"):
        fault_model = FaultModel(site, 3e-3)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(2, site, 0))
        renamed = FaultPattern({(key_site, "mix" if layer == "matmul()" else layer): group
                                for (key_site, layer), group in pattern.groups.items()})
        assert any(layer == "matmul()" for _, layer in pattern.groups), site
        assert torch.equal(qmodel(x, pattern), qtwin(x, renamed)), site
        assert torch.equal(qmodel(x[:3], pattern.restricted_to(torch.arange(3))),
                           qmodel(x, pattern)[:3]), site  # any batch: W holds no image


class StoredEinsum(nn.Module):
    """An einsum of a stored [8, 27] tensor (first dimension the calibration batch size) and the image's columns."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 27) / 4)
        self.head = nn.Linear(8 * 64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("ok,nkl->nol", self.w * 2.0, F.unfold(x, 3, padding=1))
        return self.head(torch.relu(mixed).flatten(1))


def test_a_tensor_computed_from_stored_ones_is_never_taken_for_a_batch_of_images() -> None:
    """`self.w * 2.0` has 8 rows on a batch of 8: it was an einsum layer's activation operand, its rows faulted as
    images. Computed from stored tensors alone, it is the same for every image: the call stays in float, named."""
    with seeded(14):
        model, x = StoredEinsum().eval(), torch.randn(8, 3, 8, 8)
    qmodel = quantize(model, x)
    assert set(qmodel.layers) == {"head"}
    uncovered = {entry["module"]: entry["why"] for entry in measure_coverage(qmodel, x).uncovered}
    assert uncovered[""] == ["einsum: einsum of other than two per-image operands or one and a stored matrix"]


class TransposedWeight(nn.Module):
    """One parameter read by F.linear and by `@ W.t()` (another call kind), and a language-model head written as
    `h @ embed.weight.T` on a table the embedding reads too. `explicit`: every such matmul as F.linear."""

    def __init__(self, explicit: bool = False) -> None:
        super().__init__()
        self.explicit = explicit
        self.embed = nn.Embedding(30, 16)
        self.w = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.linear(self.embed(tokens), self.w))
        h = torch.relu(F.linear(h, self.w) if self.explicit else h @ self.w.t())
        return (F.linear(h, self.embed.weight) if self.explicit else h @ self.embed.weight.T).mean(1)


def test_a_matmul_on_a_transposed_parameter_is_a_linear_layer_tied_to_its_other_readers() -> None:
    """`x @ W.t()` ran in float ("not a 2-D parameter": a new view of W every call), so W's second reader and a tied
    head written as a matmul escaped every fault. Each is a Linear layer on W, stored once with F.linear's reader:
    every site's trial equals the twin's that calls F.linear."""
    with seeded(15):
        model, tokens = TransposedWeight().eval(), torch.randint(0, 30, (6, 5))
    twin = TransposedWeight(explicit=True).eval()
    twin.load_state_dict(model.state_dict())
    qmodel, qtwin = quantize(model, tokens), quantize(twin, tokens)
    assert list(qmodel.layers) == ["linear()", "matmul()", "matmul_2()"]
    names = dict(zip(qmodel.layers, qtwin.layers))
    coverage = measure_coverage(qmodel, tokens)
    assert coverage.complete and coverage.macs == 1.0 and coverage.weights == 1.0, coverage.describe()
    assert [t.layer for t in qmodel.targets(Site("weight"))] == ["linear()", "matmul_2()"]  # w stored once
    assert torch.equal(qmodel(tokens), qtwin(tokens))
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    for site in ("act", "input", "acc", "weight"):
        fault_model = FaultModel(site, 1e-2)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(tokens),
                                 trial_generator(4, site, 0))
        renamed = FaultPattern({(key_site, names[layer]): group for (key_site, layer), group in pattern.groups.items()})
        assert torch.equal(qmodel(tokens, pattern), qtwin(tokens, renamed)), site


class AlibiScores(nn.Module):
    """BLOOM-style attention scores: heads folded into the batch dimension and `torch.baddbmm(bias, q, k^T,
    beta=, alpha=)` with a per-row ALiBi bias and a broadcast one. `explicit`: the same as a matmul, scaled, plus."""

    def __init__(self, explicit: bool = False) -> None:
        super().__init__()
        self.explicit, self.heads = explicit, 2
        self.q, self.k, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.slopes = nn.Parameter(torch.tensor([0.5, 0.25]).reshape(1, 2, 1, 1), requires_grad=False)
        self.shared = nn.Parameter(torch.randn(1, 5, 5) / 4, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q = self.q(x).reshape(n, t, self.heads, 8).transpose(1, 2).reshape(n * self.heads, t, 8)
        k = self.k(x).reshape(n, t, self.heads, 8).permute(0, 2, 3, 1).reshape(n * self.heads, 8, t)
        alibi = (self.slopes * torch.arange(t).float() * x[:, :1, :1, None].sign()).reshape(n * self.heads, 1, t)
        if self.explicit:
            scores = torch.matmul(q, k) * 0.35 + alibi * 0.5
            scores = torch.matmul(q, k) * 0.35 + scores.softmax(-1) * 2.0 + self.shared
        else:
            scores = torch.baddbmm(alibi, q, k, beta=0.5, alpha=0.35)
            scores = torch.baddbmm(scores.softmax(-1) * 2.0 + self.shared, q, k, alpha=0.35)
        return self.head((torch.softmax(scores, -1).reshape(n, -1, t).mean(1, keepdim=True) @ x).squeeze(1))


def test_baddbmm_attention_scores_are_a_layer_per_image() -> None:
    """BLOOM's scores (torch.baddbmm on heads folded into the batch dimension, an ALiBi bias added) ran in float:
    3% of a small BLOOM's MACs. The product is a matmul layer on the per-image view; every site's trial equals the
    twin's that computes the same with torch.matmul."""
    with seeded(16):
        model, x = AlibiScores().eval(), torch.randn(6, 5, 16)
    twin = AlibiScores(explicit=True).eval()
    twin.load_state_dict(model.state_dict())
    qmodel, qtwin = quantize(model, x), quantize(twin, x)
    assert list(qmodel.layers) == ["q", "k", "baddbmm()", "baddbmm_2()", "matmul()", "head"]
    names = dict(zip(qmodel.layers, qtwin.layers))
    coverage = measure_coverage(qmodel, x)
    assert coverage.complete and coverage.macs == 1.0, coverage.describe()
    assert torch.equal(qmodel(x), qtwin(x))
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    for site in ("act", "input", "acc"):
        fault_model = FaultModel(site, 3e-3)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(5, site, 0))
        assert any(layer.startswith("baddbmm") for _, layer in pattern.groups), site
        renamed = FaultPattern({(key_site, names[layer]): group for (key_site, layer), group in pattern.groups.items()})
        assert torch.equal(qmodel(x, pattern), qtwin(x, renamed)), site
        assert torch.equal(qmodel(x[:4], pattern.restricted_to(torch.arange(4))), qmodel(x, pattern)[:4]), site


def test_a_small_bloom_is_covered_whole() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=100, num_labels=3,
                                      pad_token_id=0)
    with seeded(17):
        model = transformers.BloomForSequenceClassification(config).eval()
        tokens = torch.randint(1, 100, (4, 12))
    qmodel = quantize(model, tokens)
    assert {f"transformer.h.{i}.self_attention.baddbmm()" for i in (0, 1)} <= set(qmodel.layers)
    coverage = measure_coverage(qmodel, tokens)
    assert coverage.complete and coverage.macs == 1.0, coverage.describe()


class SequenceFirst(nn.Module):
    """nn.TransformerEncoder in its default layout, [T, N, D] (`batch_first=False`); `batch_first`: the twin."""

    def __init__(self, batch_first: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed, self.head = nn.Linear(8, 32), nn.Linear(32, 3)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.batch_first:
            return self.head(self.encoder(h).mean(1))
        return self.head(self.encoder(h.transpose(0, 1)).mean(0))


@pytest.mark.parametrize(("images", "steps"), [(4, 6), (4, 8), (5, 5)])
def test_a_sequence_first_transformer_is_covered_and_equals_its_batch_first_twin(images: int, steps: int) -> None:
    """The feed-forward Linears of a [T, N, D] encoder ran in float (47% of its MACs: "no batch dimension", or a fold
    out of image order where T is a multiple of N); where T = N they were layers whose 'images' were time steps
    (faults of image i placed in step i of every image). They compute on the [N, T, D] view, the layout told by a
    forward on another number of images: every site's trial equals the batch-first twin's, bit for bit."""
    with seeded(18):
        model, x = SequenceFirst().eval(), torch.randn(images, steps, 8)
    twin = SequenceFirst(batch_first=True).eval()
    twin.load_state_dict(model.state_dict())
    qmodel, qtwin = quantize(model, x), quantize(twin, x)
    assert "encoder.layers.0.linear1.linear()" in qmodel.layers and len(qmodel.layers) == len(qtwin.layers) == 18
    coverage = measure_coverage(qmodel, x)
    assert coverage.complete and coverage.macs == 1.0, coverage.describe()
    assert torch.equal(qmodel(x), qtwin(x))
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    names = dict(zip(qmodel.layers, qtwin.layers))
    for site in ("act", "input", "acc", "weight"):
        fault_model = FaultModel(site, 3e-3)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(6, site, 0))
        renamed = FaultPattern({(key_site, names[layer]): group for (key_site, layer), group in pattern.groups.items()})
        assert torch.equal(qmodel(x, pattern), qtwin(x, renamed)), site
        assert torch.equal(qmodel(x[:2], pattern.restricted_to(torch.arange(2))), qmodel(x, pattern)[:2]), site


class StepTable(nn.Module):
    """A Linear on a table computed from the sequence length ([T, 1] positions), the same for every image."""

    def __init__(self) -> None:
        super().__init__()
        self.positions, self.head = nn.Linear(1, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(x.shape[1], dtype=torch.float32).unsqueeze(1) / x.shape[1]
        return self.head(torch.relu(x + self.positions(steps)).mean(1))


def test_a_table_as_long_as_the_batch_is_not_taken_for_the_images() -> None:
    """T = N = 5: the [5, 1] position table reads as five images on that batch alone, and its Linear was a layer
    whose 'images' were positions. The same forward on two images shows it: the call stays in float, named, and the
    gate's default min_coverage refuses the view."""
    with seeded(19):
        model, x = StepTable().eval(), torch.randn(5, 5, 8)
    qmodel = quantize(model, x)
    assert set(qmodel.layers) == {"head"}
    uncovered = {entry["module"]: entry["why"] for entry in measure_coverage(qmodel, x).uncovered}
    assert uncovered["positions"] == [
        "linear: its images' dimension did not follow the batch size (the same size for 5 and 2 image(s)): it does "
        "not hold the images (a sequence-first [T, N, ...] input with T = N?)"]
    assert quantize(model, torch.randn(4, 5, 8)).config["not_layers"]["positions"] == [
        "a call on a tensor without the batch dimension"]  # told by its size where it differs from the batch


class Reparametrized(nn.Module):
    """wav2vec2's positional convolution (weight_norm over the kernel dimension), a spectrally normed Linear head.
    `plain`: the same weights as plain parameters."""

    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import spectral_norm, weight_norm

        self.conv, self.head = nn.Conv1d(8, 8, 5, padding=2, groups=2), nn.Linear(8 * 12, 3)
        if not plain:
            self.conv = weight_norm(self.conv, name="weight", dim=2)
            self.head = spectral_norm(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.gelu(self.conv(x)).flatten(1))


def test_a_parametrized_weight_is_held_at_its_value_and_the_users_model_keeps_it() -> None:
    """weight_norm and spectral_norm models (wav2vec2, HuBERT, WavLM) were refused: removing a parametrization from
    the private copy would have deleted it from the class the user's module shares. The copy now holds the value the
    forward computes as a plain weight: every site equals the twin built with plain weights, and the user's model is
    still parametrized and computes what it did."""
    from torch.nn.utils import parametrize

    with seeded(20):
        model, x = Reparametrized().eval(), torch.randn(6, 8, 12)
        with torch.no_grad():
            before = model(x)
    twin = Reparametrized(plain=True).eval()
    with torch.no_grad():
        twin.conv.weight.copy_(model.conv.weight)
        twin.conv.bias.copy_(model.conv.bias)
        twin.head.weight.copy_(model.head.weight)
        twin.head.bias.copy_(model.head.bias)
    qmodel, qtwin = quantize(model, x), quantize(twin, x)
    assert set(qmodel.layers) == {"conv", "head"}
    assert torch.equal(qmodel(x), qtwin(x))
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    for site in ("act", "input", "acc", "weight"):
        fault_model = FaultModel(site, 3e-3)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(7, site, 0))
        assert torch.equal(qmodel(x, pattern), qtwin(x, pattern)), site
    assert parametrize.is_parametrized(model.conv) and parametrize.is_parametrized(model.head)
    assert type(model.conv).__name__ == "ParametrizedConv1d" and hasattr(type(model.conv), "weight")
    with torch.no_grad():
        assert torch.equal(model(x), before)


class ConvBnHead(nn.Module):
    """A convolution with a BatchNorm after it and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8 * 36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_a_pruned_model_is_gated_on_its_pruned_weights_and_keeps_its_pruning() -> None:
    """`torch.nn.utils.prune` keeps a layer's weight as `weight_orig * weight_mask`, set by a forward pre-hook as a
    plain attribute that is no graph leaf: quantizing such a model died in `copy.deepcopy` ("Only Tensors created
    explicitly by the user ... support the deepcopy protocol"), a bare error for a common way to make an edge model;
    with that fixed, folding the BatchNorm set a Parameter where the hook assigns the weight (a TypeError in the
    first forward). The private copy now takes such a tensor detached, and a layer whose weight a hook computes keeps
    its BatchNorm. Every site equals the twin that holds the pruned weights as plain parameters (BatchNorm kept
    there too), and the user's model is still pruned and computes what it did."""
    import torch.nn.utils.prune as prune

    with seeded(21):
        model, x = ConvBnHead(), torch.randn(6, 3, 6, 6)
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    prune.l1_unstructured(model.conv, "weight", amount=0.5)
    prune.random_unstructured(model.head, "weight", amount=0.3)
    model.eval()
    before = model(x).detach()  # with grad on, as after pruning: the hook's weight is no graph leaf
    assert not model.conv.weight.is_leaf and not model.head.weight.is_leaf
    state = {name: value.clone() for name, value in model.state_dict().items()}
    twin = ConvBnHead().eval()
    twin.load_state_dict({name: model.state_dict()[name] for name in twin.state_dict() if name in state}, strict=False)
    with torch.no_grad():
        twin.conv.weight.copy_(model.conv.weight)
        twin.head.weight.copy_(model.head.weight)
    qmodel, qtwin = quantize(model, x), quantize(twin, x, fold_bn=False)
    assert torch.equal(qmodel(x), qtwin(x))
    coverage = measure_coverage(qmodel, x)
    assert coverage.macs == coverage.weights == 1.0
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    assert list(qmodel.layers) == ["conv.conv2d()", "head.linear()"]  # calls on a weight the hook computes
    for site in ("act", "input", "acc", "weight"):  # the same faults: the layers in the same order and sizes
        fault_model = FaultModel(site, 3e-3)
        pattern, twins = (sample_pattern(fault_model, q.targets(site), len(x), trial_generator(7, site, 0))
                          for q in (qmodel, qtwin))
        assert len(pattern) > 0 and torch.equal(qmodel(x, pattern), qtwin(x, twins)), site
    assert prune.is_pruned(model) and state.keys() == model.state_dict().keys()
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert torch.equal(model(x), before)


class FunctionalAttention(nn.Module):
    """Self-attention through F.multi_head_attention_forward with the model's own projections (as WavLM calls it)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.out_proj, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(0, 1)  # [T, N, E]
        bias = torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))
        attended, _ = F.multi_head_attention_forward(
            h, h, h, 16, 4, torch.empty([0]), bias, None, None, False, 0.0, self.out_proj.weight,
            self.out_proj.bias, training=False, need_weights=False, use_separate_proj_weight=True,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight)
        return self.head(attended.mean(0))


def test_the_functional_multi_head_attention_is_quantized_call_by_call() -> None:
    """F.multi_head_attention_forward reached the view whole: its projections and attention matmuls ran in float
    (WavLM: 44% covered). Its calls are watched and routed one by one: the projections, the attention and the output
    projection (on rows laid out step by step) are layers placed per image: the numbers do not depend on the batch
    split, and faults reach them (WavLM: 100%)."""
    with seeded(21):
        model, x = FunctionalAttention().eval(), torch.randn(6, 5, 16)
    qmodel = quantize(model, x)
    assert {"linear()", "linear_2()", "linear_3()", "scaled_dot_product_attention().scores",
            "scaled_dot_product_attention().context", "linear_4()", "head"} == set(qmodel.layers)
    coverage = measure_coverage(qmodel, x)
    assert coverage.complete and coverage.macs == 1.0, coverage.describe()
    with torch.no_grad():
        expected = model(x)
    clean = qmodel(x)
    assert torch.allclose(clean, expected, rtol=0, atol=0.05 * float(expected.abs().max()))
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    for site in ("act", "input", "acc", "weight"):
        fault_model = FaultModel(site, 1e-2)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(8, site, 0))
        faulty = qmodel(x, pattern)
        assert not torch.equal(faulty, clean), site
        if site != "weight":
            assert torch.equal(qmodel(x[:3], pattern.restricted_to(torch.arange(3))), faulty[:3]), site


@pytest.mark.parametrize("sdpa", [False, True])
def test_windows_folded_window_by_window_are_layers_placed_per_image(sdpa: bool) -> None:
    """Windows folded window by window (row w x N + i is image i's window w) ran in float. Checked step by step the
    same way, each call computes on the [N, k, ...] view: every site's trial equals the image-by-image fold's."""
    with seeded(22):
        model, x = WindowAttention(order="window", sdpa=sdpa).eval(), torch.randn(6, 3, 4, 4)
    twin = WindowAttention(sdpa=sdpa).eval()
    twin.load_state_dict(model.state_dict())
    qmodel, qtwin = quantize(model, x), quantize(twin, x)
    assert list(qmodel.layers) == list(qtwin.layers) and len(qmodel.layers) > 2
    assert measure_coverage(qmodel, x).macs == 1.0
    assert torch.equal(qmodel(x), qtwin(x))
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    for site in ("act", "input", "acc", "weight"):
        fault_model = FaultModel(site, 1e-2)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(9, site, 0))
        assert torch.equal(qmodel(x, pattern), qtwin(x, pattern)), site


class EinsumProjection(nn.Module):
    """A projection written as an einsum with a stored matrix. `equation`'s matrix is [in, out] or [out, in];
    `explicit`: the same as `x @ W` or F.linear."""

    def __init__(self, equation: str, explicit: bool = False) -> None:
        super().__init__()
        self.equation, self.explicit = equation, explicit
        self.w = nn.Parameter(torch.randn(16, 12) / 4 if equation.split(",")[1][0] == equation[equation.index(",") - 1]
                              else torch.randn(12, 16) / 4)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit:
            h = x @ self.w if self.w.shape[0] == 16 else F.linear(x, self.w)
        else:
            h = torch.einsum(self.equation, x, self.w)
        return self.head(torch.relu(h).reshape(len(x), -1, 12).mean(1))


@pytest.mark.parametrize("equation", ["bld,dk->blk", "...d,kd->...k", "bd,dk->bk"])
def test_an_einsum_with_a_stored_matrix_is_a_linear_layer(equation: str) -> None:
    """An einsum that maps the last dimension by a stored matrix ran in float ("einsum of other than two per-image
    operands"). It is a Linear layer holding the matrix as weight codes: every site equals the twin's that writes it
    as `x @ W` or F.linear."""
    with seeded(23):
        x = torch.randn(6, 5, 16) if equation.startswith(("b", ".")) and "l" in equation or "..." in equation \
            else torch.randn(6, 16)
        model = EinsumProjection(equation).eval()
    twin = EinsumProjection(equation, explicit=True).eval()
    twin.load_state_dict(model.state_dict())
    qmodel, qtwin = quantize(model, x), quantize(twin, x)
    assert list(qmodel.layers) == ["einsum()", "head"] and qmodel.layers["einsum()"].module_type == "Linear"
    assert len(qtwin.layers) == 2 and measure_coverage(qmodel, x).macs == 1.0
    assert_same_trials_as_twin(qmodel, qtwin, x, seed=10)


def assert_same_trials_as_twin(qmodel: Any, qtwin: Any, x: torch.Tensor, seed: int) -> None:
    """Fault-free, and at every site a trial with faults at BER 1e-2, the view computes what its twin does, the
    twin's layers taken in the same order."""
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    names = dict(zip(qmodel.layers, qtwin.layers))
    assert torch.equal(qmodel(x), qtwin(x))
    for site in ("act", "input", "acc", "weight"):
        fault_model = FaultModel(site, 1e-2)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(seed, site, 0))
        renamed = FaultPattern({(key_site, names[layer]): group for (key_site, layer), group in pattern.groups.items()})
        assert torch.equal(qmodel(x, pattern), qtwin(x, renamed)), site


class PermutedEinsum(nn.Module):
    """An einsum of the input and a stored matrix that is a linear map with the contracted dimension elsewhere
    than last, the matrix first, or the output's dimensions in another order; `explicit` writes it as the matmul or
    F.linear (with transposes) it computes."""

    FORMS = {"kd,bld->blk": lambda x, w: F.linear(x, w), "bdl,dk->blk": lambda x, w: x.transpose(1, 2) @ w,
             "bld,dk->bkl": lambda x, w: (x @ w).transpose(1, 2), "ok,nkl->nol": lambda x, w: w @ x,
             "nkl,ok->nlo": lambda x, w: x.transpose(1, 2) @ w.t()}

    def __init__(self, equation: str, explicit: bool = False) -> None:
        super().__init__()
        self.equation, self.explicit = equation, explicit
        self.w = nn.Parameter(torch.randn(12, 16) / 4 if equation[0] in "ko" or equation.endswith("o")
                              else torch.randn(16, 12) / 4)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, _, second = self.equation.partition("->")[0].partition(",")
        if self.explicit:
            h = self.FORMS[self.equation](x, self.w)
        else:
            h = torch.einsum(self.equation, *((self.w, x) if first in ("kd", "ok") else (x, self.w)))
        return self.head(torch.relu(h).reshape(len(x), -1, 12).mean(1))


@pytest.mark.parametrize("equation", list(PermutedEinsum.FORMS))
def test_an_einsum_of_a_stored_matrix_in_any_layout_is_a_linear_layer(equation: str) -> None:
    """An einsum mapping a dimension of the input other than its last by a stored matrix, or with the matrix first
    (an im2col convolution written "ok,nkl->nol"), ran in float: 73% of a probe's MACs. It is a Linear layer now;
    every site equals the twin's that writes it as a matmul or F.linear with transposes."""
    with seeded(24):
        x = torch.randn(6, 16, 5) if equation.startswith(("bdl", "ok", "nkl")) else torch.randn(6, 5, 16)
        model = PermutedEinsum(equation).eval()
    twin = PermutedEinsum(equation, explicit=True).eval()
    twin.load_state_dict(model.state_dict())
    qmodel, qtwin = quantize(model, x), quantize(twin, x)
    assert list(qmodel.layers) == ["einsum()", "head"] and len(qtwin.layers) == 2
    assert measure_coverage(qmodel, x).macs == 1.0
    assert_same_trials_as_twin(qmodel, qtwin, x, seed=11)


def test_only_linear_einsums_with_a_stored_matrix_become_layers() -> None:
    from pytest_hwfault.functional import _einsum_linear

    x, w = torch.randn(2, 3, 4), nn.Parameter(torch.randn(4, 5))
    stored = {id(w)}
    for equation, operands, plan in [("bld,dk->blk", (x, w), (0, -1, None, False)),
                                     ("bld,kd->blk", (x, w), (0, -1, None, True)),
                                     ("...d,dk->...k", (x, w), (0, -1, None, False)),
                                     ("kd,bld->blk", (w, x), (1, -1, None, True)),
                                     ("bdl,dk->blk", (x, w), (0, -2, None, False)),
                                     ("bld,dk->bkl", (x, w), (0, -1, (0, 2, 1), False)),
                                     ("ok,nkl->nol", (w, x), (1, -2, (0, 2, 1), True))]:
        found = _einsum_linear(equation, operands, stored)
        assert found is not None and (found.activation, found.contracted, found.order, found.holds_w) == plan, equation
    for other in ("bld,dl->bl", "bld,dd->bld", "bld,dk->bk", "bll,lk->blk", "bld,dk->kbl", "dlb,dk->klb",
                  "bld,dk", "bld,dk,kj->blj"):
        assert _einsum_linear(other, (x, w), stored) is None, other
    assert _einsum_linear("bld,dk->blk", (x, w.detach().clone()), stored) is None  # not a stored tensor


class _StandardisedConv(nn.Conv2d):
    """timm's StdConv2d (BiT), and with `gain` its ScaledStdConv2d (NFNet): the weight standardised per output
    channel at every forward, then F.conv2d."""

    def __init__(self, *args: Any, gain: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5) if gain else None

    def computed(self) -> torch.Tensor:
        gain = None if self.gain is None else (self.gain * self.in_channels ** -0.5).view(-1)
        return F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=gain, training=True,
                            momentum=0.0, eps=1e-6).reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.computed(), self.bias, self.stride, self.padding)


class _WeightNormalisedLinear(nn.Module):
    """g x v / ||v|| written out in the forward (weight normalisation without torch's parametrization)."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.v, self.g = nn.Parameter(torch.randn(fan_out, fan_in)), nn.Parameter(torch.rand(fan_out, 1) + 0.5)

    def computed(self) -> torch.Tensor:
        return self.g * self.v / self.v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.computed())


class _Stored(nn.Module):
    """The functional call of `computed` on a parameter holding the weight it computed."""

    def __init__(self, computed: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(computed.computed().detach().clone())  # type: ignore[operator]
        self.bias = getattr(computed, "bias", None)
        self.padding = getattr(computed, "padding", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding is None:
            return F.linear(x, self.weight)
        return F.conv2d(x, self.weight, self.bias, 1, self.padding)


class _ComputedWeights(nn.Module):
    """Three layers whose weights the forward computes from parameters alone; `c2` runs twice. With `twin`, the same
    functional calls on parameters holding those computed weights."""

    def __init__(self, twin: _ComputedWeights | None = None) -> None:
        super().__init__()
        self.c1: nn.Module
        self.c2: nn.Module
        self.fc: nn.Module
        if twin is None:
            self.c1 = _StandardisedConv(3, 8, 3, padding=1)  # 8 output channels: the calibration batch size too
            self.c2 = _StandardisedConv(8, 8, 3, padding=1, gain=True)
            self.fc = _WeightNormalisedLinear(8, 5)
        else:
            self.c1, self.c2, self.fc = _Stored(twin.c1), _Stored(twin.c2), _Stored(twin.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(self.c2(x).mean((2, 3)))


def test_a_weight_computed_from_parameters_is_held_as_codes() -> None:
    """Weight standardisation (BiT, NFNet), weight normalisation written out: the forward computes the weight from
    parameters alone, a new tensor at every call, so these convolutions ran in float (BiT: every convolution). The
    layer holds the computed value as its weight codes, as a deployed model stores it: every site equals the twin's
    whose plain layers hold those weights, the two calls of `c2` share their codes, and the parameters the weights
    are computed from are not listed as unfaulted."""
    with seeded(31):
        model, x = _ComputedWeights().eval(), torch.randn(8, 3, 6, 6)
    twin = _ComputedWeights(model).eval()
    qmodel, qtwin = quantize(model, x), quantize(twin, x)
    assert list(qmodel.layers) == ["c1.conv2d()", "c2.conv2d()", "c2.conv2d_2()", "fc.linear()"]
    assert len(qtwin.layers) == 4
    assert qmodel.layers["c2.conv2d()"].weight_group == ("c2.conv2d()", "c2.conv2d_2()")
    assert list(qmodel.kernels.values()) == list(qtwin.kernels.values())
    coverage = measure_coverage(qmodel, x)
    assert coverage.macs == 1.0 and coverage.weights == 1.0 and coverage.unfaulted == [], coverage.describe()
    assert_same_trials_as_twin(qmodel, qtwin, x, seed=12)


def test_a_computed_weight_that_changes_is_refused() -> None:
    """The layer holds the weight computed at quantization; a forward that computes another one is refused."""
    with seeded(32):
        model, x = _ComputedWeights().eval(), torch.randn(4, 3, 6, 6)
    qmodel = quantize(model, x)
    with torch.no_grad():
        qmodel.module.c1.weight.add_(torch.randn_like(qmodel.module.c1.weight))  # the view's copy only
    with pytest.raises(CallOrderError, match="'c1.conv2d\\(\\)' was made with another computed weight"):
        qmodel(x)


class _RowLSTM(nn.Module):
    """Sequencer2D's token mixing: a bidirectional LSTM along each row of an image, the rows folded into the LSTM's
    batch image by image ([B x H, W, C]) or row by row (`step_major`: [H x B, W, C])."""

    def __init__(self, step_major: bool) -> None:
        super().__init__()
        self.step_major = step_major
        self.rnn = nn.LSTM(8, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        rows = x.transpose(0, 1) if self.step_major else x
        y, _ = self.rnn(rows.reshape(b * h, w, c))
        y = y.reshape(h, b, w, -1).transpose(0, 1) if self.step_major else y.reshape(b, h, w, -1)
        return self.head(y.mean((1, 2)))


@pytest.mark.parametrize("step_major", [False, True])
def test_a_recurrent_cell_on_folded_rows_is_covered_from_its_first_step(step_major: bool) -> None:
    """The first step of a recurrent cell reads its zero initial state, so no image changes its result and the
    fold check saw no order: it ran in float ("folded in another order", 6% of this model's MACs, 0.8% of
    sequencer2d_s's), which the default min_coverage refuses. It takes the order of the cell's later steps (same
    weight, same fold) and shares their calibration (its own inputs are all zeros): covered whole, and a trial's
    results do not depend on the batch split."""
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    with seeded(33):
        model, x = _RowLSTM(step_major).eval(), torch.randn(4, 3, 5, 8)
    qmodel = quantize(model, x)
    assert measure_coverage(qmodel, x).macs == 1.0
    first, second = qmodel.layers["rnn.cells.l0.hh.linear()"], qmodel.layers["rnn.cells.l0.hh.linear_2()"]
    assert first.input_scale == second.input_scale and first.act_scale == second.act_scale
    for site in ("act", "input", "acc", "weight"):
        fault_model = FaultModel(site, 5e-3)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(4, site, 0))
        assert any(layer == "rnn.cells.l0.hh.linear()" for _, layer in pattern.groups) or site == "weight"
        whole = qmodel(x, pattern)
        split = torch.cat([qmodel(x[:1], pattern), qmodel(x[1:], pattern, image_offset=1)])
        assert torch.equal(whole, split), site
        assert not torch.equal(whole, qmodel(x)), site


class FrameCNN(nn.Module):
    """A video classifier that runs a 2-D CNN on every frame, the frames folded into the batch dimension image by
    image ([N x T, C, H, W]) or frame by frame (`frame_major`: [T x N, ...]). With `conv3d`, the same network as
    (1, 3, 3) 3-D convolutions on [N, C, T, H, W]: no folding."""

    def __init__(self, frame_major: bool = False, conv3d: bool = False) -> None:
        super().__init__()
        self.frame_major, self.conv3d = frame_major, conv3d
        if conv3d:
            self.stem = nn.Conv3d(3, 6, (1, 3, 3), padding=(0, 1, 1))
            self.block = nn.Conv3d(6, 6, (1, 3, 3), padding=(0, 1, 1), groups=2)
        else:
            self.stem, self.block = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.head = nn.Linear(6, 4)

    def load_2d(self, other: FrameCNN) -> FrameCNN:
        with torch.no_grad():
            for mine, theirs in ((self.stem, other.stem), (self.block, other.block)):
                mine.weight.copy_(theirs.weight.unsqueeze(2))
                mine.bias.copy_(theirs.bias)
            self.head.load_state_dict(other.head.state_dict())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, C, H, W]
        n, t = x.shape[:2]
        if self.conv3d:
            return self.head(self.block(torch.relu(self.stem(x.transpose(1, 2)))).mean((2, 3, 4)))
        frames = (x.transpose(0, 1) if self.frame_major else x).flatten(0, 1)
        h = self.block(torch.relu(self.stem(frames))).mean((2, 3))
        h = h.reshape(t, n, -1).transpose(0, 1) if self.frame_major else h.reshape(n, t, -1)
        return self.head(h.mean(1))


def _frame_to_channel_major(index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-image index in [T, C, H, W] (the folded layer's view) -> the same element's index in [C, T, H, W]."""
    frames, channels, plane = shape[0], shape[1], math.prod(shape[2:])
    t, rest = index // (channels * plane), index % (channels * plane)
    return (rest // plane) * (frames * plane) + t * plane + rest % plane


@pytest.mark.parametrize("frame_major", [False, True])
def test_convolutions_on_frames_folded_into_the_batch_are_layers_placed_per_image(frame_major: bool) -> None:
    """A video model's 2-D convolutions on [N x T, C, H, W] ran in float ("its result has no batch dimension": the
    whole network of such a model; EfficientViT-M's window attention 2%). They are layers on the [N, T, C, H, W]
    view, as folded linears are: covered whole, and at every site a trial equals the one of the same network
    written with (1, 3, 3) 3-D convolutions, each fault moved to the same element of the 3-D layer."""
    from pytest_hwfault.faults import FaultModel, LayerFaults, sample_pattern, trial_generator

    with seeded(34):
        model, x = FrameCNN(frame_major).eval(), torch.randn(4, 3, 3, 5, 5)
    twin = FrameCNN(conv3d=True).load_2d(model).eval()
    qmodel, qtwin = quantize(model, x), quantize(twin, x)
    names = {"stem.conv2d()": "stem", "block.conv2d()": "block", "head": "head"}
    assert sorted(qmodel.layers) == sorted(names) and measure_coverage(qmodel, x).macs == 1.0
    assert qmodel.layers["stem.conv2d()"].input_shape == (3, 3, 5, 5)  # each image's 3 frames
    assert torch.equal(qmodel(x), qtwin(x))
    for site in ("act", "input", "acc", "weight"):
        fault_model = FaultModel(site, 1e-2)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(13, site, 0))
        moved = {}
        for (key_site, layer), group in pattern.groups.items():
            index = group.index
            if layer != "head" and site != "weight":
                q = qmodel.layers[layer]
                shape = q.input_shape if site == "input" else q.output_shape
                index = _frame_to_channel_major(index, shape)
            moved[(key_site, names[layer])] = LayerFaults(group.image, index, group.bit, group.kind)
        faulty = qmodel(x, pattern)
        assert not torch.equal(faulty, qmodel(x)), site
        assert torch.equal(faulty, qtwin(x, FaultPattern(moved))), site


class _ContentRouted(nn.Module):
    """The tokens whose first feature is positive go through `expert`, gathered in order (image by image), the
    others pass as zeros: the number of rows the expert reads is what the content routes there."""

    def __init__(self) -> None:
        super().__init__()
        self.expert, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, 4]
        flat = x.reshape(-1, 4)
        chosen = (flat[:, 0] > 0).nonzero().squeeze(1)
        out = torch.zeros_like(flat).index_copy(0, chosen, self.expert(flat[chosen]))
        return self.head(out.reshape(x.shape).mean(1))


def _routed_tokens(first_features: list[list[float]]) -> torch.Tensor:
    with seeded(35):
        x = torch.randn(len(first_features), len(first_features[0]), 4)
    x[..., 0] = torch.tensor(first_features)
    return x


def test_a_folded_call_reading_as_many_rows_as_the_content_routes_is_refused_when_they_change() -> None:
    """On calibration images that each route two tokens, the expert's call reads 2 rows per image, in image order:
    a folded layer. Images routing another number of tokens would have their faults placed in other images' rows:
    the forward pass is refused, naming why. A call whose number of rows changed when the fold check changed an
    image crashed the quantization (JetMoE); it stays in float, named."""
    two_each = _routed_tokens([[1, 1, -1, -1, -1]] * 4)
    model = _ContentRouted().eval()
    qmodel = quantize(model, two_each)
    assert "expert.linear()" in qmodel.layers and measure_coverage(qmodel, two_each).macs == 1.0
    qmodel(two_each)
    uneven = _routed_tokens([[1, 1, 1, -1, -1]] + [[1, 1, -1, -1, -1]] * 3)
    with pytest.raises(CallOrderError, match=r"'expert.linear\(\)' read 9 rows for 4 image\(s\), where it read 2 per "
                                             r"image .* routed by content"):
        qmodel(uneven)

    # 3 + 3 + 2 + 4 rows: 3 per image, by chance, also on the first two images alone
    varying = _routed_tokens([[1, 1, 1, -1, -1], [-1, 1, 1, 1, -1], [1, -1, -1, -1, 1], [1, 1, 1, -1, 1]])
    qvarying = quantize(model, varying)
    assert "expert.linear()" not in qvarying.layers
    uncovered = {entry["module"]: entry.get("why") for entry in measure_coverage(qvarying, varying).uncovered}
    assert uncovered == {"expert": ["linear: its rows are not a fixed number per image: their number changed with the "
                                    "images' content (tokens routed by content, as in a mixture of experts), so "
                                    "faults could not be placed per image"]}


class _Reordered(nn.Module):
    """`fc` reads the batch reordered, its result put back in order: the images reversed along dim 0 (`"rows"`), or
    sequence first ([T, N, D]) with the images reversed along dim 1 (`"columns"`)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, 8]
        back = torch.arange(len(x) - 1, -1, -1)
        if self.how == "rows":
            h = self.fc(x[back])[back]
        else:
            h = self.fc(x.transpose(0, 1)[:, back])[:, back].transpose(0, 1)
        return self.head(torch.relu(h).mean(1))


@pytest.mark.parametrize("how", ["rows", "columns"])
def test_a_layer_reading_the_batch_reordered_stays_in_float_named(how: str) -> None:
    """A layer whose rows (sequence first: columns) hold the images in another order got image i's faults in
    another image's data, so a trial's results depended on the batch split; nothing refused it (its images do not
    read each other). Changing each calibration image in turn must change that image's rows only: `fc` stays in
    float, named with why, and the layers left are placed per image."""
    from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

    with seeded(36):
        model, x = _Reordered(how).eval(), torch.randn(4, 5, 8)
    qmodel = quantize(model, x)
    assert list(qmodel.layers) == ["head"]
    why = ("linear: its images are not in their own rows: changing one image changed another image's rows (a batch "
           "reordered before it?), so faults could not be placed per image")
    assert [(entry["module"], entry.get("why")) for entry in measure_coverage(qmodel, x).uncovered] == [("fc", [why])]
    for site in ("act", "input", "acc"):
        fault_model = FaultModel(site, 2e-2)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(5, site, 0))
        split = torch.cat([qmodel(x[:2], pattern), qmodel(x[2:], pattern, image_offset=2)])
        assert torch.equal(qmodel(x, pattern), split), site


def test_repeated_calibration_images_are_skipped_when_placement_is_checked() -> None:
    """The placement check changes one of the first calibration images into another: with the first four the same
    (zero padding images, a repeated sample) it showed nothing, and every layer was left out with a message
    listing the very Conv2d and Linear it could not use. It now takes the first distinct images, and where the
    batch holds copies of one image only, refuses saying so."""
    from pytest_hwfault.quantization import NoQuantizableLayerError

    with seeded(37):
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
        x = torch.rand(16, 1, 8, 8)
    x[:6] = 0.0  # the first six images the same
    qmodel = quantize(model, x)
    assert list(qmodel.layers) == ["0", "3"]
    for site in ("act", "input"):  # each image's faults in its own rows: the same results however the batch splits
        from pytest_hwfault.faults import FaultModel, sample_pattern, trial_generator

        fault_model = FaultModel(site, 2e-2)
        pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x), trial_generator(6, site, 0))
        split = torch.cat([qmodel(x[:7], pattern), qmodel(x[7:], pattern, image_offset=7)])
        assert torch.equal(qmodel(x, pattern), split), site
    with pytest.raises(NoQuantizableLayerError, match=r"left out 0, 3, because the first calibration batch holds "
                                                      r"copies of one image"):
        quantize(model, torch.zeros(16, 1, 8, 8))
