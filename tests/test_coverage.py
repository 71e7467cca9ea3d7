"""Coverage: the share of a model's multiply-accumulates (and weights) that faults can reach, and what is left in
float, measured on ordinary architectures with weights=None and small inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded
from torch import nn

from pytest_hwfault.campaign import Campaign
from pytest_hwfault.cifar_resnet import CifarResNet
from pytest_hwfault.coverage import _OP_REASONS, PRODUCT_SUM, measure_coverage
from pytest_hwfault.evaluate import EvaluationError
from pytest_hwfault.quantization import quantize
from pytest_hwfault.spec import CampaignSpec


class Decoder(nn.Module):
    """A linear stem, a transposed convolution and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 8 * 4 * 4)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(self.stem(x).reshape(-1, 8, 4, 4))).flatten(1))


class PairDecoder(nn.Module):
    """A linear stem, a bilinear layer (which the engine has no layer kind for) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 8)
        self.pair = nn.Bilinear(8, 8, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(self.pair(h, h)))


class BiasedAttention(nn.Module):
    """nn.MultiheadAttention with add_bias_kv, which the rewrite into pieces does not reproduce."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, add_bias_kv=True, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0].mean(1))


class ComputedWeight(nn.Module):
    """A convolution by kernels computed from each image (dynamic filters: a kernel per image, run as one grouped
    convolution over the batch), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.head = nn.Linear(4 * 64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        n = len(x)
        kernels = (self.kernel * (1 + x.mean((1, 2, 3))).reshape(n, 1, 1, 1, 1)).reshape(n * 4, 1, 3, 3)
        return self.head(F.conv2d(x.reshape(1, n, 8, 8), kernels, padding=1, groups=n).reshape(n, 4 * 64))


def _coverage(model: nn.Module, x: torch.Tensor):
    return measure_coverage(quantize(model.eval(), x), x)


def test_a_cnn_is_covered_whole() -> None:
    with seeded(0):
        model, x = CifarResNet(20), torch.randn(4, 3, 32, 32)
    coverage = _coverage(model, x)
    assert coverage.macs == 1.0 and coverage.weights == 1.0 and coverage.complete
    assert coverage.uncovered == [] and coverage.uncounted == []
    assert 38e6 < coverage.total_macs < 42e6  # ResNet20 on 32x32: ~40.6M MACs per image


def test_a_module_without_a_layer_is_named_with_its_share() -> None:
    with seeded(1):
        model, x = PairDecoder(), torch.randn(3, 16)
    coverage = _coverage(model, x)
    stem, pair, head = 16 * 8, 8 * 8 * 32, 32 * 5
    assert coverage.uncovered == [{"module": "pair", "ops": ["aten._trilinear"],
                                   "share": pytest.approx(pair / (stem + pair + head), rel=1e-6)}]
    assert coverage.macs == pytest.approx((stem + head) / (stem + pair + head), rel=1e-6)
    # the weights read by MACs: the quantized layers' codes, and the bilinear weight (its bias is added apart)
    assert coverage.weights == pytest.approx((stem + head) / (stem + head + pair), rel=1e-9)
    assert not coverage.reaches(0.9, "act") and coverage.reaches(0.1, "act")
    assert "left in float: pair (aten._trilinear: " in coverage.describe()


def test_a_transposed_convolution_is_a_layer() -> None:
    with seeded(1):
        model, x = Decoder(), torch.randn(3, 16)
    qmodel = quantize(model.eval(), x)
    assert list(qmodel.layers) == ["stem", "up", "head"]
    coverage = measure_coverage(qmodel, x)
    assert coverage.complete and coverage.macs == 1.0 and coverage.weights == 1.0, coverage.describe()
    # every input code meets every weight: in x out x kernel x input pixels
    assert qmodel.layers["up"].macs() == 8 * 4 * 16 * 4 * 4
    assert coverage.total_macs == 16 * 128 + 8 * 4 * 16 * 4 * 4 + 256 * 5


def test_attention_the_rewrite_does_not_reproduce_is_quantized_call_by_call() -> None:
    with seeded(2):
        model, x = BiasedAttention(), torch.randn(3, 7, 32)
    qmodel = quantize(model.eval(), x)
    # nn.MultiheadAttention runs F.multi_head_attention_forward, whose calls are dispatched one by one: the packed
    # input projection (on [T, N, E]), the two attention matmuls and the output projection (on step-major rows) are
    # layers (it all ran in float before: 0.2% covered); bias_k and bias_v are parameters no MAC reads directly
    assert list(qmodel.layers) == ["attn.linear()", "attn.bmm()", "attn.bmm_2()", "attn.linear_2()", "head"]
    coverage = measure_coverage(qmodel, x)
    assert coverage.complete and coverage.macs == 1.0 and coverage.weights == 1.0, coverage.describe()
    assert {row["parameter"] for row in coverage.unfaulted} == {"attn.bias_k", "attn.bias_v"}


def test_a_kernel_computed_from_the_images_is_named_with_why() -> None:
    with seeded(3):
        model, x = ComputedWeight(), torch.rand(5, 64)
    coverage = _coverage(model, x)
    conv, head = 4 * 9 * 64, 4 * 64 * 5
    assert coverage.macs == pytest.approx(head / (conv + head), rel=1e-6)
    assert coverage.uncovered == [{"module": "", "ops": ["aten.convolution"],
                                   "share": pytest.approx(conv / (conv + head), rel=1e-6),
                                   "why": ["conv2d: its weight is computed or selected from the images (a kernel "
                                           "per image, an expert chosen by routing), not a stored tensor"]}]
    assert "<model> (aten.convolution: " in coverage.describe()
    assert not coverage.reaches(1.0, "act")
    # the kernels are activations, not weights; the parameter they are made from is multiplied elementwise
    assert coverage.weights == 1.0
    assert coverage.unfaulted == [{"parameter": "kernel", "elements": 36, "ops": ["aten.mul"]}]


class PairScorer(nn.Module):
    """Ops that multiply-accumulate without a flop formula in torch: nn.Bilinear (aten._trilinear), torch.cdist
    against learned centres, and a head written as an elementwise product and a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 12)
        self.pair = nn.Bilinear(12, 12, 6)
        self.centres = nn.Parameter(torch.randn(5, 6))
        self.scale = nn.Parameter(torch.ones(5, 6))
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        z = self.norm(self.pair(h, h))
        return -torch.cdist(z, self.centres) + (z[:, None, :] * self.scale).sum(-1)


def test_macs_without_a_torch_flop_formula_are_counted_and_named() -> None:
    """nn.Bilinear and torch.cdist compute most of this model's MACs in float: before, the coverage counted neither
    and claimed 100% (a gate would have passed on its Linear stem alone). The head's product-and-sum is counted too
    (it was named only as a parameter an elementwise op multiplies)."""
    with seeded(5):
        model, x = PairScorer(), torch.randn(3, 16)
    coverage = _coverage(model, x)
    stem, pair, cdist, head = 16 * 12, 12 * 12 * 6, 5 * 6, 5 * 6
    total = stem + pair + cdist + head
    assert coverage.macs == pytest.approx(stem / total, rel=1e-6)
    assert coverage.uncovered == [
        {"module": "pair", "ops": ["aten._trilinear"], "share": pytest.approx(pair / total, rel=1e-6)},
        {"module": "", "ops": ["aten._cdist_forward", PRODUCT_SUM],
         "share": pytest.approx((cdist + head) / total, rel=1e-6), "why": [_OP_REASONS[PRODUCT_SUM]]}]
    # every element of a weight read by a MAC is one MAC per image here: the weight share is the MAC share
    assert coverage.weights == pytest.approx(stem / total, rel=1e-9)
    assert not coverage.reaches(0.5, "act") and not coverage.reaches(0.5, "weight")
    # what no MAC op reads is named with the ops that read it: the norm, the biases
    assert {row["parameter"]: row["ops"] for row in coverage.unfaulted} == {
        "norm.weight": ["aten.native_layer_norm"], "norm.bias": ["aten.native_layer_norm"], "pair.bias": ["aten.add"]}
    assert coverage.unfaulted_parameters == 6 + 6 + 6
    assert "<model> (aten._cdist_forward, aten.mul+aten.sum: " in coverage.describe()


@pytest.mark.parametrize("shapes", [((4, 7), (5, 7)), ((2, 3, 7), (5, 7)), ((2, 30, 7), (2, 40, 7))],
                         ids=["rows", "batched", "euclidean-by-matmul"])
def test_distance_macs_are_counted_on_both_of_cdists_kernels(shapes) -> None:
    from pytest_hwfault.coverage import _MacCounter

    a, b = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    counter = _MacCounter()
    with counter.counting():
        torch.cdist(a, b)
    batch = a.shape[0] if a.dim() == 3 else 1
    assert sum(counter.flop_counts["Global"].values()) == 2 * batch * a.shape[-2] * b.shape[-2] * a.shape[-1]
    assert not counter.uncounted


@pytest.mark.parametrize("case", ["routed-rows", "cut-contraction", "batched"])
def test_grouped_matmul_macs_are_the_sum_of_its_groups(case: str) -> None:
    """torch._grouped_mm (Mixtral's and Qwen-MoE's experts in Hugging Face) had no flop formula, so a mixture of
    experts made the coverage unknown, which only min_coverage=0 accepts. Its MACs are the sum of one matmul per
    group, counted by torch's own formula on that loop."""
    from torch.utils.flop_counter import FlopCounterMode

    from pytest_hwfault.coverage import _MacCounter

    ends = [3, 7, 10] if case == "routed-rows" else [4, 8, 12]
    starts = [0, *ends[:-1]]
    if case == "routed-rows":  # [M, K] rows routed to 3 experts [3, K, N]
        a, b = torch.randn(10, 8), torch.randn(3, 8, 4)
        groups = [(a[s:e], b[g]) for g, (s, e) in enumerate(zip(starts, ends))]
    elif case == "cut-contraction":  # [M, K] x [K, N], K cut into 3 groups: [3, M, N]
        a, b = torch.randn(5, 12), torch.randn(12, 4)
        groups = [(a[:, s:e], b[s:e]) for s, e in zip(starts, ends)]
    else:
        a, b = torch.randn(3, 5, 8), torch.randn(3, 8, 4)
        groups = [(a[g], b[g]) for g in range(3)]
    offs = None if case == "batched" else torch.tensor(ends, dtype=torch.int32)
    counter = _MacCounter()
    with counter.counting():
        torch._grouped_mm(a, b, offs)
    reference = FlopCounterMode(display=False)
    with reference:
        for left, right in groups:
            torch.mm(left, right)
    assert sum(counter.flop_counts["Global"].values()) == reference.get_total_flops() > 0
    assert not counter.uncounted


def test_a_campaign_refuses_a_model_below_its_min_coverage() -> None:
    with seeded(4):
        model, x = PairDecoder().eval(), torch.randn(40, 16)
    y = model(x).argmax(1).detach()
    qmodel = quantize(model, x)
    spec = CampaignSpec(site="act", ber=1e-4, min_acc=0.0, budget=4)
    with pytest.raises(EvaluationError, match=r"min_coverage=1: faults reach \d+\.\d% of the MACs.*pair \(aten"):
        Campaign(qmodel, x, y, spec, "t")
    accepted = Campaign(qmodel, x, y, CampaignSpec(**{**spec.to_dict(), "min_coverage": 0.0}), "t")
    assert accepted.empty_result().coverage["uncovered"][0]["module"] == "pair"
    with pytest.raises(ValueError, match="min_coverage"):
        CampaignSpec(site="act", ber=1e-4, min_acc=0.0, min_coverage=1.5)


def test_a_campaign_on_some_layers_reaches_their_share_only() -> None:
    """`layers=` draws faults in the layers it selects; the others compute fault-free, as float layers do. The
    report said 100% reach and the default min_coverage=1 passed a gate whose faults hit 13% of the MACs. What the
    faults reach is now the selected layers' share: refused below min_coverage, shown in the table's reach."""
    from pytest_hwfault.report.document import build_report, campaign_record, validate_report
    from pytest_hwfault.report.text import format_table

    with seeded(5):
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
        x = torch.randn(40, 64)
    y = model(x).argmax(1).detach()
    qmodel = quantize(model, x)
    total = 64 * 32 + 32 * 16 + 16 * 10
    spec = CampaignSpec(site="act", ber=1e-4, min_acc=0.0, budget=4, layers=("2", "4"))
    share = (32 * 16 + 16 * 10) / total
    with pytest.raises(EvaluationError, match=r"min_coverage=1: faults reach 24\.7% of the MACs and 24\.7% of the "
                                              r"weights: layers='2', '4' selects '2', '4', and the other quantized "
                                              r"layers compute without faults \(all quantized layers: 100\.0% .*"
                                              r"about the selected layers only.*min_coverage=0\.24 accepts it"):
        Campaign(qmodel, x, y, spec, "t")
    for site in ("act", "weight"):
        accepted = Campaign(qmodel, x, y, spec.with_overrides(site=site, min_coverage=0.24), "t")
        assert accepted.coverage.share(site) == pytest.approx(share, rel=1e-9)
        assert accepted.coverage.selection["names"] == ["2", "4"]
        record = campaign_record(accepted.run(), "t")
        validate_report(build_report([record], {}))
        assert "  25%  " in format_table([record])[2]
    # every layer selected (a glob), or none given: the whole view's shares, no selection
    for layers in (("*",), None):
        whole = Campaign(qmodel, x, y, spec.with_overrides(layers=layers), "t")
        assert whole.coverage.share("act") == 1.0 and not whole.coverage.selection


@pytest.mark.parametrize("make", [
    lambda: (CifarResNet(8), torch.randn(2, 3, 32, 32)),
    lambda: (Decoder(), torch.randn(3, 16)),
    lambda: (BiasedAttention(), torch.randn(2, 6, 32)),
    lambda: (nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), torch.randn(2, 5, 32)),
    lambda: (nn.LSTM(8, 16, batch_first=True), torch.randn(2, 7, 8)),
], ids=["resnet", "conv-transpose", "attention", "transformer", "lstm"])
def test_the_mac_counter_counts_what_torchs_flop_counter_counts(make) -> None:
    """The coverage's own counting mode (which keeps Dynamo unimported) against torch's FlopCounterMode: the same
    flops per module and op, in inference mode and with gradients off (fused kernels off, as the coverage runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pytest_hwfault.coverage import _MacCounter
    from pytest_hwfault.decompose import FusedAttentionOff

    with seeded(3):
        model, x = make()
    model.eval()
    mkldnn = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        for context in (torch.no_grad, torch.inference_mode):
            reference = FlopCounterMode(display=False)
            with context(), FusedAttentionOff(), reference:
                model(x)
            ours = _MacCounter()
            with context(), FusedAttentionOff(), ours.counting():
                model(x)
            expected = {name: dict(ops) for name, ops in reference.get_flop_counts().items()}
            assert {name: dict(ops) for name, ops in ours.flop_counts.items() if ops} == expected
            assert sum(expected["Global"].values()) > 0
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)


def test_measuring_coverage_does_not_import_dynamo(tmp_path) -> None:
    """Importing torch._dynamo costs a process 1-1.6 s; a dispatch mode that asks to be hidden from Dynamo imports
    it on its first op. Measured in a fresh interpreter."""
    import subprocess
    import sys

    script = ("import sys, torch\n"
              "from pytest_hwfault.cifar_resnet import CifarResNet\n"
              "from pytest_hwfault.coverage import measure_coverage\n"
              "from pytest_hwfault.quantization import quantize\n"
              "x = torch.randn(2, 3, 32, 32)\n"
              "coverage = measure_coverage(quantize(CifarResNet(8).eval(), x), x)\n"
              "assert coverage.macs == 1.0, coverage\n"
              "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


class _SharedPositionEncoding(nn.Module):
    """Two blocks that hold one position-encoding module (CoaT shares its `cpe` and `crpe` so)."""

    def __init__(self) -> None:
        super().__init__()
        encoding = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4))
        self.first, self.second = nn.ModuleDict({"pe": encoding, "fc": nn.Conv2d(4, 4, 1)}), nn.ModuleDict(
            {"pe": encoding, "fc": nn.Conv2d(4, 4, 1)})
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.first, self.second):
            x = block["fc"](torch.relu(block["pe"](x) + x))
        return self.head(x.mean((2, 3)))


def test_a_module_shared_by_two_parents_is_covered_where_it_runs() -> None:
    """torch's module tracker names a shared module by its last parent and its submodules by the first, so the
    second block's call of the shared convolution was credited to `second.pe`, a name no layer has: 41% of this
    model reported in float (2.6% of coat_lite_tiny), which the default min_coverage refuses."""
    with seeded(5):
        model, x = _SharedPositionEncoding(), torch.randn(4, 4, 6, 6)
    coverage = _coverage(model, x)
    assert coverage.macs == 1.0 and coverage.uncovered == [], coverage.describe()


class ElementwiseHeads(nn.Module):
    """MACs written elementwise against stored tensors (a product summed, a cosine similarity to prototypes, a
    vecdot with a learned vector), beside products that are not MACs: a LayerScale, a norm, a pooling mask, a
    scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 12)
        self.gamma = nn.Parameter(torch.rand(12) + 0.5)
        self.norm = nn.LayerNorm(12)
        self.protos = nn.Parameter(torch.randn(5, 12))
        self.w = nn.Parameter(torch.randn(4, 12))
        self.v = nn.Parameter(torch.randn(12))
        self.t = nn.Parameter(torch.tensor([1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.stem(x)) * self.gamma)
        mask = (x[:, :12] > 0).float()
        pooled = (h * mask).sum(-1, keepdim=True)  # the images' values times the images' values: pooling
        scaled = (h * self.t).sum(-1, keepdim=True)  # a one-element parameter: a scaling
        cosine = F.cosine_similarity(h[:, None, :], self.protos[None], dim=-1)
        summed = (h[:, None, :] * self.w).sum(-1)
        score = torch.linalg.vecdot(h, self.v)[:, None]
        return torch.cat([cosine, summed, score, pooled, scaled], 1)


def test_multiply_accumulates_written_elementwise_are_counted_and_refused() -> None:
    """A product of the images' values with a stored tensor that a sum reduces is a MAC no flop formula counts: a
    model written so passed a gate at 100% reach while its head ran in float. They are counted as float MACs and
    their parameters as weights MACs read; products that are not MACs (scalings, norms, pooling) are not."""
    from pytest_hwfault.coverage import require_coverage
    from pytest_hwfault.evaluate import EvaluationError

    with seeded(8):
        model, x = ElementwiseHeads(), torch.randn(3, 16)
    qmodel = quantize(model.eval(), x)
    assert list(qmodel.layers) == ["stem"]
    coverage = measure_coverage(qmodel, x)
    stem, heads = 16 * 12, 5 * 12 + 4 * 12 + 12
    assert coverage.macs == pytest.approx(stem / (stem + heads), rel=1e-9)
    assert coverage.uncovered == [{"module": "", "ops": [PRODUCT_SUM], "why": [_OP_REASONS[PRODUCT_SUM]],
                                   "share": pytest.approx(heads / (stem + heads))}]
    # the prototypes count although their normalised copy is what the product reads
    assert coverage.weights == pytest.approx(stem / (stem + heads), rel=1e-9)
    assert {row["parameter"] for row in coverage.unfaulted} == {"gamma", "norm.weight", "norm.bias", "t"}
    with pytest.raises(EvaluationError, match=r"left in float: <model> \(aten\.mul\+aten\.sum: 38\.5%; "
                                                r"aten\.mul\+aten\.sum: a product of the images' values"):
        require_coverage(qmodel, x, 1.0, "act")
    assert require_coverage(qmodel, x, 0.61, "act").macs == coverage.macs


class DistanceHeads(nn.Module):
    """Distances to stored vectors written elementwise (a squared difference summed, its 2-norm, a pairwise
    distance, d * d averaged, a stored vector minus the images' values), beside what is no MAC: an L1 distance, a
    standardisation by a stored mean, a norm's own centring, and the expanded form whose MACs are a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 12)
        self.centres = nn.Parameter(torch.randn(5, 12))
        self.mu = nn.Parameter(torch.randn(12))
        self.codebook = nn.Parameter(torch.randn(3, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        c = self.centres
        squared = ((h[:, None] - c) ** 2).sum(-1)
        normed = torch.linalg.vector_norm(h[:, None] - c, dim=-1)
        pairwise = F.pairwise_distance(h[:, None], c)
        d = c - h[:, None]
        self_product = (d * d).mean(-1)
        l1 = (h[:, None] - c).abs().sum(-1)  # no product
        standardised = ((h - self.mu) / 2).sum(-1, keepdim=True)  # no square
        centred = h - h.mean(-1, keepdim=True)  # the images' own mean: a norm
        norm = (centred ** 2).mean(-1, keepdim=True)
        expanded = (h ** 2).sum(-1, keepdim=True) - 2 * h @ self.codebook.T + (self.codebook ** 2).sum(-1)
        return torch.cat([squared, normed, pairwise, self_product, l1, standardised, norm, expanded], 1)


def test_distances_to_stored_vectors_written_elementwise_are_counted() -> None:
    """A prototype head written as ((x[:, None] - c) ** 2).sum(-1) (or its 2-norm) has no flop formula: a model
    whose head was half its MACs passed min_coverage=1 at 100% reach, the head in float, while torch.cdist was
    counted. Squared differences from a stored tensor that a sum, mean or 2-norm reduces are counted as float MACs
    and the stored tensor as a weight MACs read; an L1 distance and a norm's centring are not MACs, and the
    expanded form's matmul is a quantized layer."""
    from pytest_hwfault.coverage import DISTANCE_SUM, require_coverage
    from pytest_hwfault.evaluate import EvaluationError

    with seeded(9):
        model, x = DistanceHeads(), torch.randn(3, 16)
    qmodel = quantize(model.eval(), x)
    assert list(qmodel.layers) == ["stem", "matmul()"]
    coverage = measure_coverage(qmodel, x)
    stem, codebook, distances = 16 * 12, 3 * 12, 4 * 5 * 12
    total = stem + codebook + distances
    assert coverage.macs == pytest.approx((stem + codebook) / total, rel=1e-9)
    assert coverage.uncovered == [{"module": "", "ops": [DISTANCE_SUM], "why": [_OP_REASONS[DISTANCE_SUM]],
                                   "share": pytest.approx(distances / total)}]
    # the centres are read by MACs in float (once, whatever the number of heads that read them); mu by none
    assert coverage.weights == pytest.approx((stem + codebook) / (stem + codebook + 5 * 12), rel=1e-9)
    assert {row["parameter"] for row in coverage.unfaulted} == {"mu"}
    with pytest.raises(EvaluationError, match=r"left in float: <model> \(aten\.sub\+aten\.pow\+aten\.sum: 51\.3%; "):
        require_coverage(qmodel, x, 1.0, "act")


class FourierMixing(nn.Module):
    """FNet's token mixing (a 2-d Fourier transform of the hidden states, its real part) and an FFT convolution
    along the tokens with a learned kernel: MACs no quantized layer computes, run as torch's FFT ops."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.kernel = nn.Parameter(torch.randn(4, 16) / 4)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.fft.fft2(self.embed(x)).real  # [N, 8 tokens, 16]
        spectrum = torch.fft.rfft(mixed, n=16, dim=1) * torch.fft.rfft(self.kernel, n=16, dim=0)
        convolved = torch.fft.irfft(spectrum, n=16, dim=1)[:, :8]
        return self.head(convolved.mean(1))


def test_fourier_transforms_are_float_macs_named() -> None:
    """torch's FFT ops had no flop formula and no MAC name: an FNet-style model or an FFT convolution reported 100%
    reach and passed min_coverage=1 with a third to most of its arithmetic in float. The transforms are counted
    (FFTW's convention: 5 N log2 N flops for N complex points, half for real ones) as float MACs, named with why,
    and a kernel the transform reads is a weight MACs read in float."""
    from pytest_hwfault.coverage import require_coverage

    with seeded(10):
        model, x = FourierMixing(), torch.randn(2, 8, 8)
    qmodel = quantize(model.eval(), x)
    assert list(qmodel.layers) == ["embed", "head"]
    coverage = measure_coverage(qmodel, x)
    embed, head = 2 * 8 * 8 * 16, 2 * 16 * 3  # flops per image
    fft2 = 5 * 8 * 16 * (3 + 4)  # [8, 16] (torch transforms it as complex): log2 8 + log2 16
    rfft, irfft = 2.5 * 16 * 16 * 4, 2.5 * 16 * 16 * 4  # along 16 tokens (zero-padded), for 16 features
    kernel = 2.5 * 16 * 16 * 4 / 2  # once a batch of the two measured images
    total = embed + head + fft2 + rfft + irfft + kernel
    assert coverage.macs == pytest.approx((embed + head) / total, rel=1e-9)
    reason = _OP_REASONS["aten._fft_r2c"]
    assert reason == _OP_REASONS["aten._fft_c2r"] == _OP_REASONS["aten._fft_c2c"]
    assert coverage.uncovered == [{"module": "", "ops": ["aten._fft_c2c", "aten._fft_c2r", "aten._fft_r2c"],
                                   "why": [reason],
                                   "share": pytest.approx(1 - (embed + head) / total, rel=1e-9)}]
    assert coverage.weights == pytest.approx((8 * 16 + 16 * 3) / (8 * 16 + 16 * 3 + 4 * 16), rel=1e-9)
    assert not coverage.unfaulted  # the kernel is read by a transform, in float
    with pytest.raises(EvaluationError, match=r"left in float: <model> \(aten\._fft_c2c, aten\._fft_c2r, "
                                              r"aten\._fft_r2c: 83\.5%; aten\._fft_\*: a fast Fourier transform"):
        require_coverage(qmodel, x, 1.0, "act")
    assert require_coverage(qmodel, x, 0.7, "weight").weights == coverage.weights


class ExpandedWeight(nn.Module):
    """A learned matrix expanded to the batch as torch.bmm's second operand: the bmm layer quantizes it per call,
    as an activation, so it is held as no weight codes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.w = nn.Parameter(torch.randn(32, 10) / 6)
        self.gamma = nn.Parameter(torch.ones(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))[:, None] * self.gamma
        return torch.bmm(h, self.w.expand(len(x), 32, 10))[:, 0]


def test_a_parameter_quantized_per_call_is_a_weight_that_weight_faults_miss() -> None:
    """The bmm's expanded parameter was listed among parameters that 'feed no MAC op and are not faulted' (act
    faults do reach its per-call codes) and the weights share said 100%, so min_coverage=1 at the weight site passed
    while no weight fault could land in it. It is a weight MACs read that is held as no codes, named so."""
    from pytest_hwfault.coverage import require_coverage

    with seeded(11):
        model, x = ExpandedWeight(), torch.randn(4, 16)
    qmodel = quantize(model.eval(), x)
    assert list(qmodel.layers) == ["stem", "bmm()"]
    coverage = measure_coverage(qmodel, x)
    assert coverage.macs == 1.0
    assert coverage.weights == pytest.approx(16 * 32 / (16 * 32 + 32 * 10), rel=1e-9)
    assert coverage.uncoded == [{"parameter": "w", "elements": 320,
                                 "how": "quantized per call as an activation, which act faults reach"}]
    assert [row["parameter"] for row in coverage.unfaulted] == ["gamma"]
    assert "320 weight elements MACs read are held as no codes, so weight faults miss them: w (320: " in \
        coverage.describe()
    with pytest.raises(EvaluationError, match="weight faults miss them: w"):
        require_coverage(qmodel, x, 1.0, "weight")
    assert require_coverage(qmodel, x, 1.0, "act") == coverage
    assert type(coverage).from_dict(coverage.to_dict()) == coverage


class SpectralConv(nn.Module):
    """A Fourier neural operator's spectral convolution: a complex weight mixes the lowest modes of the spectrum."""

    def __init__(self) -> None:
        super().__init__()
        self.lift = nn.Conv1d(2, 8, 1)
        self.w = nn.Parameter(torch.randn(8, 8, 4, dtype=torch.cfloat) / 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lift(x)
        spectrum = torch.fft.rfft(h)
        mixed = torch.zeros_like(spectrum)
        mixed[..., :4] = torch.einsum("bix,iox->box", spectrum[..., :4], self.w)
        return self.head(torch.relu(torch.fft.irfft(mixed, n=h.shape[-1])).mean(-1))


def test_a_complex_weight_read_in_float_counts_against_the_weights() -> None:
    """A complex parameter was skipped as no floating-point weight: the spectral convolution's weight, read by a
    complex matmul in float, left the weights share at 100%. It is a weight MACs read, held as no codes."""
    with seeded(12):
        model, x = SpectralConv(), torch.randn(2, 2, 32)
    qmodel = quantize(model.eval(), x)
    assert list(qmodel.layers) == ["lift", "head"]
    coverage = measure_coverage(qmodel, x)
    assert coverage.weights == pytest.approx((2 * 8 + 8 * 3) / (2 * 8 + 8 * 3 + 8 * 8 * 4), rel=1e-9)
    assert coverage.uncoded == [{"parameter": "w", "elements": 256, "how": "read by MACs in float"}]
    assert coverage.uncovered[0]["ops"] == ["aten._fft_c2r", "aten._fft_r2c", "aten.bmm"]


class StoredMatrixHead(nn.Module):
    """A quantized stem, then `head(h, w)`: a product of its output by a stored [32, 10] matrix written some way."""

    def __init__(self, head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.w = nn.Parameter(torch.randn(32, 10) / 6)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.stem(x)), self.w)


def _transposed_product(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`(W.T @ h.T).T`: the images along the last dimension of the product, which is left in float."""
    return (w.T @ h.T).T


def test_a_view_of_a_parameter_read_in_float_counts_once() -> None:
    """The float call's operand `W.T` was counted as a weight computed in the forward, and `W` again as a weight
    MACs read: 320 elements twice, the weights share 44% instead of 62% (with as many images as features, so that
    the images' operand `h.T` [32, 32] looks like a batch and `W.T` alone like a stored operand)."""
    with seeded(13):
        model, x = StoredMatrixHead(_transposed_product), torch.randn(32, 16)
    qmodel = quantize(model.eval(), x)
    assert list(qmodel.layers) == ["stem"]
    coverage = measure_coverage(qmodel, x)
    assert coverage.weights == pytest.approx(16 * 32 / (16 * 32 + 32 * 10), rel=1e-9)
    assert coverage.uncoded == [{"parameter": "w", "elements": 320, "how": "read by MACs in float"}]


def _bilinear_on_a_computed_weight(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`F.bilinear` (no layer kind: float) with a weight computed from W, expanded and made contiguous."""
    return F.bilinear(h[:, :8], h[:, :8], (w[:8] * 2).T.reshape(10, 8, 1).expand(10, 8, 8).contiguous())


def test_a_weight_computed_from_a_parameter_and_read_by_float_macs_is_no_weight_faults_reach() -> None:
    """A float MAC op whose operand is computed from a parameter (a bilinear weight built from W) read W through
    a tensor of its own storage: W was not counted as a weight MACs read, and the weights share said 100% with
    every weight such MACs read in float. The parameters such an operand stands for are read, where the op runs
    outside a quantized layer (inside one, its ops read the codes it computed)."""
    with seeded(15):
        model, x = StoredMatrixHead(_bilinear_on_a_computed_weight), torch.randn(4, 16)
    coverage = measure_coverage(quantize(model.eval(), x), x)
    assert list(quantize(model.eval(), x).layers) == ["stem"]
    assert coverage.weights == pytest.approx(16 * 32 / (16 * 32 + 32 * 10), rel=1e-9)
    assert coverage.uncoded == [{"parameter": "w", "elements": 320, "how": "read by MACs in float"}]


def test_products_a_running_sum_adds_are_counted() -> None:
    """`(h[:, :, None] * W).cumsum(1)`: each product added once into a running sum (a recurrence with stored decays
    unrolled as a prefix sum) is a MAC as a sum's is; it was not counted (100% reach)."""
    with seeded(14):
        model, x = StoredMatrixHead(lambda h, w: (h[:, :, None] * w).cumsum(1)[:, -1]), torch.randn(4, 16)
    coverage = measure_coverage(quantize(model.eval(), x), x)
    assert coverage.macs == coverage.weights == pytest.approx(16 * 32 / (16 * 32 + 32 * 10), rel=1e-9)
    assert coverage.uncovered[0]["ops"] == [PRODUCT_SUM]


_CARRIED = {  # a product of the images' values by the stored matrix, carried by a constant, a bias, a mask, a copy
    "scaled": lambda h, w: (h[:, :, None] * w * 0.5).sum(1),
    "negated": lambda h, w: (-(h[:, :, None] * w)).sum(1),
    "biased": lambda h, w: (h[:, :, None] * w + w).sum(1),
    "masked": lambda h, w: torch.where(w > 0, h[:, :, None] * w, 0.0).sum(1),
    "copied": lambda h, w: (h[:, :, None] * w).clone().double().sum(1).float(),
    "nansum": lambda h, w: (h[:, :, None] * w).nansum(1),
    "addcmul": lambda h, w: torch.addcmul(torch.zeros(()), h[:, :, None], w, value=0.5).sum(1),
    "divided": lambda h, w: (h[:, :, None] / (w.abs() + 1)).sum(1),  # a product with the reciprocal
}


@pytest.mark.parametrize("head", _CARRIED.values(), ids=_CARRIED.keys())
def test_products_scaled_offset_masked_or_copied_before_their_sum_are_counted(
        head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """`(h[:, :, None] * W * 0.5).sum(1)` and the like reported 100% reach (a gate at min_coverage=1 passed with
    62% of the MACs in float): one op between the product and its sum hid it. Ops that leave a tensor of products
    the same products scaled, offset or masked by constants and stored tensors, or copied, now carry it; so does
    addcmul, a product by a stored tensor plus an input, and a division by a stored tensor (`(h / W).sum`: 100%
    reach before, its MACs uncounted)."""
    with seeded(16):
        model, x = StoredMatrixHead(head), torch.randn(4, 16)
    coverage = measure_coverage(quantize(model.eval(), x), x)
    assert coverage.macs == coverage.weights == pytest.approx(16 * 32 / (16 * 32 + 32 * 10), rel=1e-9)
    assert coverage.uncovered[0]["ops"] == [PRODUCT_SUM] and not coverage.complete


_NO_FORMULA = {  # MAC ops torch's flop counter has no formula for, each computing h @ w
    "mv": lambda h, w: torch.stack([torch.mv(w.T, row) for row in h]),
    "addmv": lambda h, w: torch.stack([torch.addmv(torch.zeros(10), w.T, row) for row in h]),
    "dot": lambda h, w: torch.stack([torch.stack([torch.dot(row, column) for column in w.T]) for row in h]),
    "addbmm": lambda h, w: torch.addbmm(torch.zeros(len(h), 10), h.view(len(h), 4, 8).transpose(0, 1),
                                        w.view(4, 8, 10)),
    "conv_tbc": lambda h, w: torch.conv_tbc(h[None], w[None], torch.zeros(10))[0],
}


@pytest.mark.parametrize("head", _NO_FORMULA.values(), ids=_NO_FORMULA.keys())
def test_mac_ops_without_a_flop_formula_are_counted(head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                                                    ) -> None:
    """torch.mv, addmv, dot, addbmm and conv_tbc made the coverage unknown (no flop formula: no gate could pass,
    and the report could not say how much ran in float); they are counted, as float MACs where no layer computes
    them."""
    with seeded(18):
        model, x = StoredMatrixHead(head), torch.randn(4, 16)
    coverage = measure_coverage(quantize(model.eval(), x), x)
    assert coverage.uncounted == []
    assert coverage.macs == coverage.weights == pytest.approx(16 * 32 / (16 * 32 + 32 * 10), rel=1e-9)


def _affine_pooled(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ResMLP's head: a per-channel affine of 4 tokens of 8 channels, averaged over the tokens."""
    pooled = (h.view(-1, 4, 8) * w[:8, 0] + w[:8, 1]).mean(1)
    return torch.cat([pooled, pooled[:, :2]], 1)


@pytest.mark.parametrize("head", [
    lambda h, w: ((h * w[:, 0]) + h).mean(1, keepdim=True).expand(-1, 10),
    _affine_pooled,
], ids=["layer-scale-plus-residual", "affine-pooled"])
def test_a_scaled_pooling_is_no_multiply_accumulate(head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                                                    ) -> None:
    """A layer scale (`h * gamma`) added to the residual stream and pooled (ConvNeXt's last block), and an affine
    averaged over the tokens it scales alike (ResMLP's head: 99.997% reach with products carried through the
    offset), are no multiply-accumulates: a sum counts as MACs only where it adds products of different stored
    elements. The view stays complete."""
    with seeded(17):
        model, x = StoredMatrixHead(head), torch.randn(4, 16)
    coverage = measure_coverage(quantize(model.eval(), x), x)
    assert coverage.complete and coverage.uncovered == []


@pytest.mark.parametrize("head", [
    lambda h, w: torch.addmm(torch.ones(10), h, w, beta=0.5, alpha=2.0),
    lambda h, w: torch.full((len(h), 10), float("nan")).addmm(h, w, beta=0),  # beta=0: the input is ignored
], ids=["torch.addmm", "Tensor.addmm"])
def test_addmm_by_a_stored_matrix_is_a_layer(head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """torch.addmm(b, x, W) ran in float (named: 38% of the probe's MACs): it is beta * b + alpha * mm(x, W), and
    its mm is a layer as `x @ W` is, the scaling and the added input float."""
    with seeded(15):
        model, x = StoredMatrixHead(head), torch.randn(8, 16)
    qmodel = quantize(model.eval(), x)
    assert list(qmodel.layers) == ["stem", "mm()"]
    assert measure_coverage(qmodel, x).macs == 1.0
    with torch.no_grad():
        reference, view = model(x), qmodel(x)
    assert torch.isfinite(view).all() and (view - reference).abs().max() < 0.05 * reference.abs().max()


_CONTRACTIONS = {  # other spellings of h @ W, by the stored [32, 10] matrix W
    "linalg.matmul": (lambda h, w: torch.linalg.matmul(h, w), ["matmul()"]),
    "tensordot": (lambda h, w: torch.tensordot(h, w, dims=([1], [0])), ["matmul()"]),
    "tensordot-int": (lambda h, w: torch.tensordot(h, w, dims=1), ["matmul()"]),
    "inner": (lambda h, w: torch.inner(h, w.T), ["linear()"]),
    "multi_dot": (lambda h, w: torch.linalg.multi_dot([h, w]), ["matmul()"]),
    "chain_matmul": (lambda h, w: torch.chain_matmul(h, w), ["matmul()"]),
}


@pytest.mark.parametrize("head, layers", _CONTRACTIONS.values(), ids=_CONTRACTIONS.keys())
def test_other_spellings_of_a_product_by_a_stored_matrix_are_layers(
        head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], layers: list[str]) -> None:
    """torch.linalg.matmul (an alias of torch.matmul, another function object), torch.tensordot, torch.inner,
    torch.linalg.multi_dot and torch.chain_matmul ran in float (38-45% of the probe's MACs, counted but not named
    why): they are the matmul and linear calls they compute, each a layer where `x @ W` or `F.linear(x, W)` is."""
    import warnings

    with seeded(15):
        model, x = StoredMatrixHead(head), torch.randn(8, 16)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.chain_matmul is deprecated", UserWarning)
        qmodel = quantize(model.eval(), x)
        assert list(qmodel.layers) == ["stem", *layers]
        assert measure_coverage(qmodel, x).macs == 1.0
        with torch.no_grad():
            reference, view = model(x), qmodel(x)
    assert torch.isfinite(view).all() and (view - reference).abs().max() < 0.05 * reference.abs().max()


def test_a_sparse_operand_makes_the_coverage_unknown_not_a_crash() -> None:
    """A product by a sparse copy of a stored matrix crashed the coverage (`NotImplementedError: Cannot access
    storage of SparseTensorImpl`, a bare error at every gate): a sparse tensor is known by itself, its sparse MACs
    have no flop formula (the coverage is unknown, which only min_coverage=0 accepts) and W is named as read in
    float."""
    with seeded(15):
        model, x = StoredMatrixHead(lambda h, w: torch.sparse.mm(w.T.to_sparse(), h.T).T), torch.randn(8, 16)
    coverage = measure_coverage(quantize(model.eval(), x), x)
    assert coverage.uncounted == ["aten._sparse_addmm"] and not coverage.complete
    assert coverage.uncoded == [{"parameter": "w", "elements": 320, "how": "read by MACs in float"}]


class NumpyHead(nn.Module):
    """A quantized stem, then a head outside torch: a numpy matmul by a stored array, or a scikit-learn model."""

    def __init__(self, sklearn: bool) -> None:
        super().__init__()
        import numpy as np

        self.stem, self.sklearn = nn.Linear(16, 32), sklearn
        generator = np.random.default_rng(0)
        self.w = generator.standard_normal((32, 10)).astype(np.float32)
        if sklearn:
            from sklearn.linear_model import LogisticRegression

            self.classifier = LogisticRegression().fit(generator.standard_normal((60, 32)), np.arange(60) % 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        h = torch.relu(self.stem(x))
        if self.sklearn:
            return torch.as_tensor(self.classifier.decision_function(np.asarray(h)), dtype=torch.float32)
        return torch.from_numpy(h.detach().numpy() @ self.w)


@pytest.mark.parametrize("sklearn", [False, True], ids=["numpy-matmul", "scikit-learn"])
def test_a_forward_that_computes_outside_torch_has_an_unknown_coverage(sklearn: bool) -> None:
    """A head computed in numpy (`h.numpy() @ W`) or by a scikit-learn model on the features (`np.asarray(h)`)
    reported 100% reach: its MACs (38% of the probe's) never reached the MAC counter, and a min_coverage=1 gate
    passed with them in float, out of every fault's reach. The images' values handed to numpy now make the coverage
    unknown, named, which only min_coverage=0 accepts."""
    from pytest_hwfault.coverage import LEFT_TORCH, require_coverage

    with seeded(19):
        model, x = NumpyHead(sklearn).eval(), torch.randn(8, 16)
    qmodel = quantize(model, x)
    coverage = measure_coverage(qmodel, x)
    assert coverage.uncounted == [f"Tensor.numpy in <model>: {LEFT_TORCH}"] and not coverage.complete
    with pytest.raises(EvaluationError, match="coverage unknown.*leave torch"):
        require_coverage(qmodel, x, 1.0, "act")
    assert require_coverage(qmodel, x, 0.0, "act") == coverage


def test_an_op_of_another_library_on_the_images_values_makes_the_coverage_unknown() -> None:
    """A head run as a library's custom op (`torch.library.custom_op`, as a C++ extension's fused kernel is)
    reported 100% reach: the matmul inside it never reached the MAC counter (38% of the probe's MACs), and a
    min_coverage=1 gate passed. An op outside torch's and the int8 kernels' namespaces that reads the images'
    values outside a quantized layer now makes the coverage unknown, named. Kept as the model's attribute, the op
    also crashed quantization (deepcopy: "cannot pickle 'torch._C._DispatchModule'"): the private copy shares it."""
    from pytest_hwfault.coverage import FOREIGN_OP

    @torch.library.custom_op("hwfault_test::fused_head", mutates_args=())
    def fused_head(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return h @ w

    with seeded(20):
        model, x = StoredMatrixHead(fused_head), torch.randn(8, 16)  # the op kept as an attribute: shared
    coverage = measure_coverage(quantize(model.eval(), x), x)
    assert coverage.uncounted == [f"hwfault_test.fused_head in <model>: {FOREIGN_OP}"] and not coverage.complete


def _scripted_product(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return h @ w


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_torchscript_function_kept_as_an_attribute_runs_in_float_named() -> None:
    """A `torch.jit.script`ed function kept as the model's attribute crashed quantization (deepcopy: "ScriptFunction
    cannot be pickled", a bare error). The private copy shares it; TorchScript runs its calls below the modes
    that make layers, so its matmul stays in float, counted and named, W a weight no fault reaches."""
    with seeded(21):
        model, x = StoredMatrixHead(torch.jit.script(_scripted_product)), torch.randn(8, 16)
    qmodel = quantize(model.eval(), x)
    coverage = measure_coverage(qmodel, x)
    assert list(qmodel.layers) == ["stem"] and coverage.uncovered[0]["ops"] == ["aten.mm"]
    assert coverage.macs == pytest.approx(16 * 32 / (16 * 32 + 32 * 10), rel=1e-9)
    assert coverage.uncoded == [{"parameter": "w", "elements": 320, "how": "read by MACs in float"}]
