"""The float model every deployed-int8 reader is tested on: ResNet-style (fused conv+bn+relu, residual adds,
average pooling, a linear head), trained on the digits, and the helpers the reader tests share.

`ResNetStyle(eager=True)` is the same network written for torch.ao eager mode (QuantStub/DeQuantStub and
FloatFunctional adds); the others trace it as it is (FX, torch.export, ONNX export).
"""

from __future__ import annotations

import torch
from conftest import Digits, trained
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


def trained_resnet_style(digits: Digits, eager: bool = False) -> ResNetStyle:
    """Trained deterministically (seeded, one thread): the same weights for eager=True and False."""

    class OnImages(nn.Module):  # the trainer feeds flat vectors
        def __init__(self) -> None:
            super().__init__()
            self.net = ResNetStyle(eager=eager)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(images(x))

    return trained(OnImages, digits, init_seed=5, steps=60, seed=6).net.eval()


def agreement(reference: torch.Tensor, ours: torch.Tensor, scale: float) -> dict[str, float]:
    """How far the engine's output codes are from a runtime's: share of equal predictions, of exactly equal codes,
    and the largest difference in codes."""
    codes = (reference - ours).abs() / scale
    return {"predictions": float((reference.argmax(1) == ours.argmax(1)).float().mean()),
            "exact": float((codes < 0.5).float().mean()), "max_codes": float(codes.max())}
