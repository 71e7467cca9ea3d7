"""Shared fixtures of the engine tests: the scikit-learn digits set and two small models trained on it.

Everything is built once per session from fixed seeds, inside `torch.random.fork_rng`, so the global RNG state
of the test process is left as it was.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, each worker of this suite takes its share of the cores, and so do the pytest subprocesses its
    tests start (they inherit OMP_NUM_THREADS). With every worker's torch on every core, two heavy subprocesses at
    once oversubscribe the machine: on 2 cores the ONNX GPT-2 gate took 18 s alone, 56 s beside a 2-thread torch
    loop, 18 s when either side ran one thread. Tests of thread-count independence set their counts themselves."""
    workerinput = getattr(config, "workerinput", None)  # set in xdist's workers only
    if workerinput is not None:
        share = max(1, (os.cpu_count() or 1) // max(1, int(workerinput["workercount"])))
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the previous RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run a block on `n` intra-op threads, then restore the previous count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def one_thread() -> AbstractContextManager[None]:
    """Run a block on one intra-op thread (much faster for tiny tensors on a loaded machine), then restore."""
    return threads(1)


@pytest.fixture(scope="module")
def single_threaded() -> Iterator[None]:
    """A test module's tests on one intra-op thread, restored after the module: tiny tensors run much faster so on
    a shared machine. A module opts in with ``pytestmark = pytest.mark.usefixtures("single_threaded")``."""
    with one_thread():
        yield


# -- the oracle: two's complement from first principles, with Python ints only --------------------------------------
def oracle_digits(code: int, width: int) -> list[int]:
    """The `width` low binary digits of `code` modulo 2**width, least significant first."""
    raw = code % (2**width)
    digits = []
    for _ in range(width):
        raw, digit = divmod(raw, 2)
        digits.append(digit)
    return digits


def oracle_value(digits: list[int]) -> int:
    """The signed value of a two's-complement digit list (least significant first): the top digit weighs -2**(w-1)."""
    width = len(digits)
    return sum(d * 2**i for i, d in enumerate(digits[:-1])) - digits[-1] * 2 ** (width - 1)


def oracle(code: int, bit: int, kind: str, width: int) -> int:
    """The signed code after one fault of `kind` on bit `bit` of a `width`-bit register holding `code`."""
    digits = oracle_digits(code, width)
    if kind == "flip":
        digits[bit] = 1 - digits[bit]
    elif kind == "stuck0":
        digits[bit] = 0
    elif kind == "stuck1":
        digits[bit] = 1
    else:  # pragma: no cover - the strategies draw only the three kinds
        raise AssertionError(kind)
    return oracle_value(digits)

class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so its BatchNorm cannot be folded. Takes batches of
    `in_channels` x 8 x 8 images (or their flat vectors)."""

    def __init__(self, in_channels: int = 3, channels: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.conv.in_channels, 8, 8)
        out = torch.relu(self.bn(self.conv(x)))
        if x.sum() > 0:
            out = out + 1.0
        return self.fc(out.flatten(1))


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor  # float32 [N, 64], pixel values scaled to [0, 1]
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x_t = torch.tensor(x / 16.0, dtype=torch.float32)
    y_t = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x_t), generator=torch.Generator().manual_seed(0))
    x_t, y_t = x_t[order], y_t[order]
    return Digits(x_t[:1400], y_t[:1400], x_t[1400:], y_t[1400:])


def trained(build: Callable[[], nn.Module], data: Digits, *, init_seed: int, steps: int, seed: int) -> nn.Module:
    """`build()` initialised under `init_seed`, then trained `steps` full-batch Adam steps under `seed`."""
    with seeded(init_seed):
        model = build()
    with seeded(seed), one_thread():
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        model.train()
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train), data.y_train)
            loss.backward()
            optimizer.step()
    return model.eval()


def build_mlp() -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Linear: BN folds into layer "0"; layer "3" reads "0"'s codes directly."""
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def build_cnn() -> nn.Sequential:
    """Conv2d -> BN -> ReLU -> MaxPool -> Linear on the 8x8 digit images given as flat 64-vectors."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


@pytest.fixture(scope="session")
def trained_mlp(digits: Digits) -> nn.Module:
    """The trained MLP, shared by the session: read it, never change it (see `digits_mlp`)."""
    return trained(build_mlp, digits, init_seed=1, steps=60, seed=2)


@pytest.fixture(scope="session")
def trained_cnn(digits: Digits) -> nn.Module:
    """The trained CNN, shared by the session: read it, never change it (see `digits_cnn`)."""
    return trained(build_cnn, digits, init_seed=3, steps=60, seed=4)


@pytest.fixture
def digits_mlp(trained_mlp: nn.Module) -> nn.Module:
    """A private copy of the trained MLP (eval mode), so a test may change it freely."""
    return copy.deepcopy(trained_mlp)


@pytest.fixture
def digits_cnn(trained_cnn: nn.Module) -> nn.Module:
    """A private copy of the trained CNN (eval mode), so a test may change it freely."""
    return copy.deepcopy(trained_cnn)


@pytest.fixture(scope="session")
def q_mlp(trained_mlp: nn.Module, digits: Digits):
    """Shared quantized view of the MLP (8 bits). Tests must leave it as they found it (no hooks left behind)."""
    from pytest_hwfault.quantization import quantize

    return quantize(trained_mlp, digits.x_train[:512])


@pytest.fixture(scope="session")
def q_cnn(trained_cnn: nn.Module, digits: Digits):
    """Shared quantized view of the CNN (8 bits). Tests must leave it as they found it (no hooks left behind)."""
    from pytest_hwfault.quantization import quantize

    return quantize(trained_cnn, digits.x_train[:512])


@pytest.fixture(scope="session")
def noisy_digits(digits: Digits) -> torch.Tensor:
    """16 test images with a little noise, so that no input value sits on a rounding tie of the input grid
    (digit pixels are multiples of 1/16, and 8/16 x 127 = 63.5): the integer reference needs unambiguous codes."""
    with seeded(5):
        return digits.x_test[:16] + 0.01 * torch.randn(16, 64)


# -- an integer reference of one quantized layer, built from public data only ---------------------------------------
# It reads the user's float model, the layer's public codes and scales (QuantLayer.weight_codes, weight_scale,
# input_scale, act_scale) and the float tensor that enters the layer, never how the engine stores things inside.
def float_params(model: nn.Module, qmodel, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float weight and bias that layer `name` quantizes: the user's, with a BN the view folded fused in by
    torch's own fusion formulas."""
    module = model.get_submodule(name)
    weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
    bn_name = dict(qmodel.folded).get(name)
    if bn_name is not None:
        bn = model.get_submodule(bn_name)
        fuse = fuse_linear_bn_weights if isinstance(module, nn.Linear) else fuse_conv_bn_weights
        weight, bias = fuse(module.weight, module.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        weight, bias = weight.detach(), bias.detach()
    return weight, bias


def weights_hold_codes(layer) -> bool:
    """The layer's module holds exactly its weight codes, either as the codes themselves or as code x scale (how
    the engine stores them is its own business; that they are exact is not)."""
    codes = layer.weight_codes.float()
    weight = layer.module.weight
    view = layer.weight_scale.reshape(-1, *([1] * (codes.dim() - 1)))
    return torch.equal(weight, codes) or torch.equal(weight, codes * view)


def _channels_view(qlayer, values: torch.Tensor) -> torch.Tensor:
    """Per-output-channel `values` shaped to broadcast over a batch of the layer's outputs."""
    if qlayer.channel_axis == -1:
        return values
    return values.reshape(-1, *([1] * (len(qlayer.output_shape) - 1)))


def input_codes(qlayer, raw: torch.Tensor) -> torch.Tensor:
    """The int codes a layer reads for the float tensor `raw` entering it: round(raw / input_scale), saturated."""
    scaled = raw.double() / qlayer.input_scale
    tie = ((scaled - torch.floor(scaled)) - 0.5).abs() < 1e-5
    assert not tie.any(), "test input too close to a rounding tie of the input grid"
    return torch.clamp(torch.round(scaled), -qlayer.qmax, qlayer.qmax).to(torch.int64)


def integer_acc(model: nn.Module, qmodel, name: str, in_codes: torch.Tensor,
                weight_codes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact int accumulator of layer `name` (float64 holds these integer sums exactly), and per output channel
    the extra tolerance (in act codes) where the bias code sits on a rounding tie."""
    qlayer = qmodel.layers[name]
    module = model.get_submodule(name)
    w = (qlayer.weight_codes if weight_codes is None else weight_codes).to(torch.float64)
    acc_scale = qlayer.weight_scale.double() * qlayer.input_scale
    _, bias = float_params(model, qmodel, name)
    if bias is None:
        bias_codes, slack = torch.zeros(w.shape[0], dtype=torch.float64), torch.zeros(w.shape[0], dtype=torch.float64)
    else:
        scaled = bias.double() / acc_scale
        bias_codes = torch.clamp(torch.round(scaled), -(2**31), 2**31 - 1)
        tie = ((scaled - torch.floor(scaled)) - 0.5).abs() < 1e-4
        slack = torch.where(tie, acc_scale / qlayer.act_scale, torch.zeros_like(acc_scale))
    xin = in_codes.to(torch.float64)
    if isinstance(module, nn.Linear):
        acc = xin @ w.T + bias_codes
    else:
        conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(module)]
        acc = conv(xin, w, bias_codes, stride=module.stride, padding=module.padding, dilation=module.dilation,
                   groups=module.groups)
    return acc.round().to(torch.int64), slack


def assert_requantized(qmodel, name: str, out: torch.Tensor, acc: torch.Tensor, slack: torch.Tensor | None = None):
    """`out` (what layer `name` hands on) must be clamp(round(acc x acc_scale / act_scale)) x act_scale: on its grid,
    and each code within half a code (plus float and bias-tie slack) of the exact requantized accumulator."""
    qlayer = qmodel.layers[name]
    act = qlayer.act_scale
    codes = torch.round(out / act)
    assert torch.equal(codes.to(torch.float32) * torch.tensor(act, dtype=torch.float32), out), "output off its grid"
    acc_scale = _channels_view(qlayer, qlayer.weight_scale.double() * qlayer.input_scale)
    real = acc.to(torch.float64) * acc_scale / act
    clamped = torch.clamp(real, -qlayer.qmax, qlayer.qmax)
    tolerance = 0.5 + 1e-4 + 4e-7 * real.abs()
    if slack is not None:
        tolerance = tolerance + _channels_view(qlayer, slack)
    bad = ((codes.double() - clamped).abs() > tolerance).nonzero().tolist()[:5]
    assert not bad, [(i, float(codes[tuple(i)]), float(real[tuple(i)])) for i in bad]


@contextmanager
def watch(qmodel, name: str) -> Iterator[dict[str, torch.Tensor]]:
    """The float tensor entering layer `name` ("raw", seen before the engine's own hooks) and what the layer hands on
    ("out", seen after them)."""
    seen: dict[str, torch.Tensor] = {}
    layer = qmodel.layers[name]
    module = layer.module
    handles = [  # as values, also where the engine passes codes from layer to layer
        module.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("raw", layer.dequantize_input(a[0].detach().clone())), prepend=True),
        module.register_forward_hook(
            lambda m, a, o: seen.__setitem__("out", layer.dequantize_output(o.detach().clone()))),
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class TextClassifier(nn.Module):
    """Token embedding, a two-layer nn.TransformerEncoder (torch's fused fast path applies to it in eval mode), mean
    pooling and a head."""

    def __init__(self, vocab: int = 40, width: int = 32, heads: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))
