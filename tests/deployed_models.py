"""The float model every deployed-int8 reader is tested on: ResNet-style (fused conv+bn+relu, residual adds,
average pooling, a linear head), trained on the digits, and the helpers the reader tests share.

`ResNetStyle(eager=True)` is the same network written for torch.ao eager mode (QuantStub/DeQuantStub and
FloatFunctional adds); the others trace it as it is (FX, torch.export, ONNX export).
"""

from __future__ import annotations

import math
import pathlib
import warnings
from typing import Any

import torch
from torch import nn

from pytest_hwfault.ao_faults import ao_under_faults  # noqa: F401 - the tests' helper too
from pytest_hwfault.onnx_faults import onnx_under_faults  # noqa: F401 - the tests' helper too


class Block(nn.Module):
    def __init__(self, channels: int, eager: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.add = torch.ao.nn.quantized.FloatFunctional() if eager else None
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.add.add(x, y) if self.add is not None else x + y)


class ResNetStyle(nn.Module):
    """8x8 digits as [N, 1, 8, 8]: stem conv-bn-relu, two residual blocks, global average pool, linear."""

    def __init__(self, channels: int = 16, eager: bool = False) -> None:
        super().__init__()
        self.eager = eager
        self.quant = torch.ao.quantization.QuantStub() if eager else nn.Identity()
        self.stem, self.bn, self.relu = nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
        self.block1, self.block2 = Block(channels, eager), Block(channels, eager)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 10)
        self.dequant = torch.ao.quantization.DeQuantStub() if eager else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(self.quant(x))))
        x = self.pool(self.block2(self.block1(x)))
        return self.dequant(self.fc(torch.flatten(x, 1)))

    #: the conv+bn(+relu) groups, for torch.ao eager's fuse_modules
    FUSIONS = [["stem", "bn", "relu"], ["block1.conv1", "block1.bn1", "block1.relu1"], ["block1.conv2", "block1.bn2"],
               ["block2.conv1", "block2.bn1", "block2.relu1"], ["block2.conv2", "block2.bn2"]]


def images(x: torch.Tensor) -> torch.Tensor:
    """Digits' flat 64-vectors as [N, 1, 8, 8] images."""
    return x.reshape(-1, 1, 8, 8)


def trained_resnet_style(digits: Any, eager: bool = False, steps: int = 60) -> ResNetStyle:
    """Trained deterministically (seeded, one thread, as conftest's `trained`) on `digits` (conftest's `Digits`:
    x_train, y_train): the same weights for eager=True and False. Self-contained, so that the pytester suites can
    build it too."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        net = ResNetStyle(eager=eager)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        torch.set_num_threads(1)
        try:
            optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
            net.train()
            x = images(digits.x_train)
            for _ in range(steps):
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x), digits.y_train).backward()
                optimizer.step()
        finally:
            torch.set_num_threads(threads)
    return net.eval()


def agreement(reference: torch.Tensor, ours: torch.Tensor, scale: float) -> dict[str, float]:
    """How far the engine's output codes are from a runtime's: share of equal predictions, of exactly equal codes,
    and the largest difference in codes."""
    codes = (reference - ours).abs() / scale
    return {"predictions": float((reference.argmax(1) == ours.argmax(1)).float().mean()),
            "exact": float((codes < 0.5).float().mean()), "max_codes": float(codes.max())}


# -- the four deployed formats, built the way their users build them ---------------------------------------------------
def to_ao_eager(model: nn.Module, calibration: torch.Tensor, fusions: list[list[str]] | None = None,
                engine: str = "x86") -> nn.Module:
    """An eager-mode model (QuantStub/DeQuantStub, FloatFunctional adds) fused, prepared with `engine`'s qconfig,
    calibrated on `calibration` and converted by torch.ao eager mode (under the engine set now)."""
    import copy
    import warnings

    import torch.ao.quantization as tq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = copy.deepcopy(model).eval()
        if fusions:
            net = tq.fuse_modules(net, fusions)
        net.qconfig = tq.get_default_qconfig(engine)
        prepared = tq.prepare(net)
        with torch.no_grad():
            prepared(calibration)
        return tq.convert(prepared)


def to_ao_fx(model: nn.Module, calibration: torch.Tensor, engine: str = "x86") -> torch.fx.GraphModule:
    """`model` quantized with torch.ao FX mode (`engine`'s default qconfig mapping), calibrated on `calibration`."""
    import copy
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(engine), (calibration[:1],))
        with torch.no_grad():
            prepared(calibration)
        return convert_fx(prepared)


def to_pt2e(model: nn.Module, calibration: torch.Tensor) -> torch.fx.GraphModule:
    """`model` exported (dynamic batch) and quantized by torchao's PT2E flow with the X86InductorQuantizer."""
    import warnings

    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model.eval(), (calibration[:8],),
                                       dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            prepared(calibration)
        return convert_pt2e(prepared)


def to_onnx_qdq(model: nn.Module, calibration: torch.Tensor, folder, activations: str = "u8",  # noqa: ANN001, ANN201
                qoperator: bool = False):
    """`model` exported to ONNX and quantized by onnxruntime's quantize_static (QDQ, or with `qoperator` the
    QOperator format: QLinearConv etc. as nodes; per-channel int8 weights, uint8 ("u8") or int8 ("s8")
    activations), calibrated on `calibration`; returns the .onnx path."""
    import warnings
    from pathlib import Path

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    folder = Path(folder)
    float_path, path = folder / "float.onnx", folder / f"{'qop' if qoperator else 'qdq'}_{activations}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (calibration[:1],), str(float_path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
                          opset_version=17)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": calibration[i:i + 100].numpy()} for i in range(0, len(calibration), 100)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(str(float_path), str(path), Reader(), per_channel=True,
                    quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return path


# -- a transformer exported to ONNX (tests/test_onnx_transformer.py, benchmarks/deployed_fidelity.py) --------
class AttentionBlock(nn.Module):
    """A pre-norm transformer block written batch first, as Hugging Face models are: LayerNorm, multi-head
    attention (softmax of q k^T / sqrt(d)), GELU MLP, residual adds. `plain`: no LayerNorm, softmax or GELU (ReLU
    and a scaled score instead), so that every op onnxruntime runs has a form the reader reproduces exactly.
    `rows`: how its linear layers see the tokens: "batch" ([batch, tokens, width]), "merged" ([batch x tokens,
    width], image by image, as Hugging Face's GPT-2 Conv1D runs them) or "sequence" ([tokens x batch, width], token
    by token, as a sequence-first export runs them)."""

    def __init__(self, width: int = 32, heads: int = 4, plain: bool = False, rows: str = "batch") -> None:
        super().__init__()
        self.heads, self.plain, self.rows = heads, plain, rows
        self.ln1 = nn.Identity() if plain else nn.LayerNorm(width)
        self.ln2 = nn.Identity() if plain else nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        n, length, width = t.shape
        return t.reshape(n, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        q, k, v = (self.split(on_rows(layer, y, self.rows)) for layer in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2)
        weights = torch.relu(scores) if self.plain else torch.softmax(scores / math.sqrt(q.shape[-1]), -1)
        x = x + on_rows(self.o, (weights @ v).transpose(1, 2).reshape(x.shape), self.rows)
        hidden = on_rows(self.up, self.ln2(x), self.rows)
        return x + on_rows(self.down, torch.relu(hidden) if self.plain else nn.functional.gelu(hidden), self.rows)


def on_rows(layer: nn.Module, x: torch.Tensor, rows: str) -> torch.Tensor:
    """`layer` on [batch, tokens, width] as `AttentionBlock`'s `rows` says it sees them; the result batch first."""
    n, length, _ = x.shape
    if rows == "merged":
        return layer(x.reshape(n * length, -1)).reshape(n, length, -1)
    if rows == "sequence":
        return layer(x.transpose(0, 1).reshape(length * n, -1)).reshape(length, n, -1).transpose(0, 1)
    return layer(x)


class Encoder(nn.Module):
    """8x8 digits-shaped inputs as 8 tokens of 8 features: embedding, position, two blocks, mean over the tokens,
    a linear head; `rows` as in `AttentionBlock` (the head batch first)."""

    def __init__(self, plain: bool = False, rows: str = "batch") -> None:
        super().__init__()
        self.rows = rows
        self.embed = nn.Linear(8, 32)
        self.pos = nn.Parameter(torch.randn(8, 32) * 0.1)
        self.blocks = nn.Sequential(AttentionBlock(plain=plain, rows=rows), AttentionBlock(plain=plain, rows=rows))
        self.norm = nn.Identity() if plain else nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = on_rows(self.embed, x.reshape(x.shape[0], 8, 8), self.rows) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(1))


def encoder_inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def export_encoder(model: nn.Module, folder: pathlib.Path, name: str, dynamo: bool = False) -> pathlib.Path:
    """`model` exported to ONNX by torch's TorchScript exporter (opset 17), or with `dynamo` by its default one
    (torch.export, onnxscript: opset 20, every Reshape with allowzero=1)."""
    path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                torch.onnx.export(model.eval(), (encoder_inputs(2, 0),), str(path), dynamo=True, input_names=["x"],
                                  output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("n")}})
        else:
            torch.onnx.export(model.eval(), (encoder_inputs(2, 0),), str(path), dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
                              opset_version=17)
    return path


def encoder_static(float_path: pathlib.Path, activations: str = "u8") -> pathlib.Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": encoder_inputs(32, seed).numpy()} for seed in range(4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    path = float_path.with_name(f"{float_path.stem}_static_{activations}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(float_path), str(path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8)
    return path


def encoder_dynamic(float_path: pathlib.Path) -> pathlib.Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = float_path.with_name(f"{float_path.stem}_dynamic.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QInt8)
    return path


def run_onnxruntime(path: Any, x: torch.Tensor, each: bool = False) -> torch.Tensor:
    """onnxruntime's CPU provider on `x` (with `each`: one input at a time)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if each:
        return torch.cat([torch.from_numpy(session.run(None, {"x": x[i:i + 1].numpy()})[0]) for i in range(len(x))])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


# -- a tiny Hugging Face GPT-2 exported to ONNX (tests/test_onnx_transformer.py, benchmarks/deployed_fidelity.py) ----
class _GPT2Logits(nn.Module):
    """A sequence classifier called with token ids alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def export_gpt2(folder: pathlib.Path, images: int = 16, dynamo: bool = False) -> tuple[pathlib.Path, torch.Tensor]:
    """A random-init GPT2ForSequenceClassification (2 layers, width 32, 4 heads, vocabulary 100, 3 classes) exported by
    torch's TorchScript exporter (opset 17, token ids in, a dynamic batch), or with `dynamo` by its default one
    (its classification head picks each sequence's last token with a GatherND), and `images` x 12 random token ids.
    Its projections (Conv1D) export as Gemms on [batch x tokens, width]."""
    import transformers

    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16, num_labels=3,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _GPT2Logits(transformers.GPT2ForSequenceClassification(config)).eval()
    ids = torch.randint(3, 100, (images, 12), generator=torch.Generator().manual_seed(0))
    path = folder / ("gpt2_dynamo.onnx" if dynamo else "gpt2.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                torch.onnx.export(model, (ids[:2],), str(path), dynamo=True, input_names=["ids"],
                                  output_names=["logits"], dynamic_shapes={"ids": {0: torch.export.Dim("n")}})
        else:
            torch.onnx.export(model, (ids[:2],), str(path), dynamo=False, input_names=["ids"], output_names=["logits"],
                              dynamic_axes={"ids": {0: "n"}, "logits": {0: "n"}}, opset_version=17)
    return path, ids


def gpt2_quantized(float_path: pathlib.Path, ids: torch.Tensor) -> dict[str, pathlib.Path]:
    """onnxruntime's quantize_static (QDQ u8, calibrated on `ids` in batches of 4; "static": the causal mask's Where,
    the score Add and the Softmax left unquantized; "static, mask quantized": quantize_static's defaults, which give
    the mask's float32 minimum an infinite scale and leave the attention constant, in onnxruntime too) and
    quantize_dynamic of a GPT-2 export."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    mask = [n.name for n in onnx.load(str(float_path)).graph.node
            if any(part in n.name for part in ("/attn/Where", "/attn/Add", "/attn/Softmax"))]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"ids": ids[i:i + 4].numpy()} for i in range(0, len(ids), 4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    paths = {kind: float_path.with_name(f"{float_path.stem}_{kind.replace(', ', '_').replace(' ', '_')}.onnx")
             for kind in ("static", "static, mask quantized", "dynamic")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(float_path), str(paths["dynamic"]), weight_type=QuantType.QInt8)
        quantize_static(str(float_path), str(paths["static"]), Reader(), quant_format=QuantFormat.QDQ,
                        nodes_to_exclude=mask)
        quantize_static(str(float_path), str(paths["static, mask quantized"]), Reader(), quant_format=QuantFormat.QDQ)
    return paths


def run_onnxruntime_ids(path: pathlib.Path, ids: torch.Tensor) -> torch.Tensor:
    """onnxruntime's CPU provider on token ids, one input at a time."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.cat([torch.from_numpy(session.run(None, {"ids": ids[i:i + 1].numpy()})[0]) for i in range(len(ids))])
