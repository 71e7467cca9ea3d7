"""The float model every deployed-int8 reader is tested on: ResNet-style (fused conv+bn+relu, residual adds,
average pooling, a linear head), trained on the digits, and the helpers the reader tests share.

`ResNetStyle(eager=True)` is the same network written for torch.ao eager mode (QuantStub/DeQuantStub and
FloatFunctional adds); the others trace it as it is (FX, torch.export, ONNX export).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
def to_ao_eager(model: nn.Module, calibration: torch.Tensor, fusions: list[list[str]] | None = None) -> nn.Module:
    """An eager-mode model (QuantStub/DeQuantStub, FloatFunctional adds) fused, prepared with the x86 qconfig,
    calibrated on `calibration` and converted by torch.ao eager mode."""
    import copy
    import warnings

    import torch.ao.quantization as tq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = copy.deepcopy(model).eval()
        if fusions:
            net = tq.fuse_modules(net, fusions)
        net.qconfig = tq.get_default_qconfig("x86")
        prepared = tq.prepare(net)
        with torch.no_grad():
            prepared(calibration)
        return tq.convert(prepared)


def to_ao_fx(model: nn.Module, calibration: torch.Tensor) -> torch.fx.GraphModule:
    """`model` quantized with torch.ao FX mode (x86 default qconfig mapping), calibrated on `calibration`."""
    import copy
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calibration[:1],))
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
