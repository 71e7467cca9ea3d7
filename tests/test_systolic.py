"""site="pe": a faulty processing element of a weight-stationary systolic array, against a plain simulation of the
array that loops over PEs, tiles and rows with Python integers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_hwfault import FaultModel, FaultPattern, accuracy, quantize
from pytest_hwfault.bits import KIND_CODES, Kind
from pytest_hwfault.faults import Site, sample_pattern
from pytest_hwfault.spec import CampaignSpec, SpecError
from pytest_hwfault.systolic import Array, PEFault, array_error, layer_error

pytestmark = pytest.mark.usefixtures("single_threaded")
KINDS = ["flip", "stuck0", "stuck1"]


def simulate(a: list[list[int]], w: list[list[int]], rows: int, cols: int,
             faults: dict[tuple[int, int, str], list[tuple[int, str]]]) -> list[list[int]]:
    """out[m][n] computed by the array, PE by PE: for each K-tile, the partial sum runs down column n % cols from
    zero, each PE adding its product (through its product register) and passing the sum on (through its
    accumulator register); the output accumulator adds the tiles. `faults`: (row, col, register) -> [(bit, kind)]."""
    m_count, k_count, n_count = len(a), len(w), len(w[0])
    out = [[0] * n_count for _ in range(m_count)]
    for m in range(m_count):
        for n in range(n_count):
            col = n % cols
            for start in range(0, k_count, rows):
                psum = 0
                for row in range(rows):
                    k = start + row
                    product = a[m][k] * w[k][n] if k < k_count else 0
                    for bit, kind in faults.get((row, col, "mul"), []):
                        product = oracle(product, bit, kind, 16)
                    psum += product
                    for bit, kind in faults.get((row, col, "acc"), []):
                        psum = oracle(psum, bit, kind, 32)
                out[m][n] += psum
    return out


def _draw_faults(data: st.DataObject, rows: int, cols: int) -> list[PEFault]:
    faults = []
    for _ in range(data.draw(st.integers(1, 3), "faults")):
        register = data.draw(st.sampled_from(["acc", "mul"]), "register")
        faults.append(PEFault(data.draw(st.integers(0, rows - 1), "row"), data.draw(st.integers(0, cols - 1), "col"),
                              register, data.draw(st.integers(0, 31 if register == "acc" else 15), "bit"),
                              KIND_CODES[Kind(data.draw(st.sampled_from(KINDS), "kind"))]))
    return faults


def _as_dict(faults: list[PEFault]) -> dict[tuple[int, int, str], list[tuple[int, str]]]:
    table: dict[tuple[int, int, str], list[tuple[int, str]]] = {}
    for fault in faults:
        table.setdefault((fault.row, fault.col, fault.register), []).append((fault.bit, KINDS[fault.kind]))
    return table


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_array_error_equals_the_pe_by_pe_simulation(data: st.DataObject) -> None:
    rows, cols = data.draw(st.integers(1, 9), "rows"), data.draw(st.integers(1, 9), "cols")
    m, k, n = data.draw(st.integers(1, 4), "m"), data.draw(st.integers(1, 23), "k"), data.draw(st.integers(1, 11), "n")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), "seed"))
    a = torch.randint(0, 256, (m, k), generator=generator)  # uint8 activations
    w = torch.randint(-128, 128, (k, n), generator=generator)  # int8 weights
    faults = _draw_faults(data, rows, cols)
    # one fault per (PE, register) in the simulation's table order: composed ones are the engine's business
    faults = list({(f.row, f.col, f.register): f for f in faults}.values())
    expected = simulate(a.tolist(), w.tolist(), rows, cols, _as_dict(faults))
    got = (a.double() @ w.double() + array_error(a, w, faults, rows, cols)).round().to(torch.int64)
    assert got.tolist() == expected


@pytest.mark.parametrize(("rows", "cols"), [(4, 3), (8, 8), (1, 1), (32, 2), (5, 16)])
@pytest.mark.parametrize("layer", ["conv", "grouped", "conv1d", "linear"])
def test_layer_error_maps_conv_and_linear_onto_the_array(rows: int, cols: int, layer: str) -> None:
    """im2col order, strides, padding, dilation and groups: the layer's output with the array's error equals the
    simulation on the unfolded input."""
    generator = torch.Generator().manual_seed(rows * 100 + cols)
    if layer == "linear":
        module: nn.Module = nn.Linear(13, 7)
        x = torch.randint(0, 256, (3, 13), generator=generator).double()
    elif layer == "conv1d":
        module = nn.Conv1d(3, 5, 3, padding=1, stride=2)
        x = torch.randint(0, 256, (2, 3, 9), generator=generator).double()
    else:
        groups = 2 if layer == "grouped" else 1
        module = nn.Conv2d(4, 6, 3, padding=1, stride=(1, 2), dilation=(2, 1), groups=groups)
        x = torch.randint(0, 256, (2, 4, 6, 7), generator=generator).double()
    weight = torch.randint(-128, 128, module.weight.shape, generator=generator).double()
    faults = [PEFault(rows - 1, cols - 1, "acc", 20, KIND_CODES[Kind.STUCK1]),
              PEFault(0, 0, "mul", 14, KIND_CODES[Kind.FLIP]), PEFault(rows // 2, 0, "acc", 3, KIND_CODES[Kind.FLIP])]
    faults = list({(f.row, f.col, f.register): f for f in faults}.values())
    if isinstance(module, nn.Linear):
        clean = x @ weight.t()
    elif isinstance(module, nn.Conv1d):
        clean = F.conv1d(x, weight, None, module.stride, module.padding)
    else:
        clean = F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    got = clean + layer_error(module, x, weight, faults, rows, cols, clean.shape)
    # the reference: each group's unfolded input through the simulated array, channels in order
    if isinstance(module, nn.Linear):
        expected = torch.tensor(simulate(x.long().tolist(), weight.t().long().tolist(), rows, cols, _as_dict(faults)))
    else:
        conv2d = isinstance(module, nn.Conv2d)
        images, kernel = (x, weight) if conv2d else (x.unsqueeze(2), weight.unsqueeze(2))
        geometry = ({"dilation": module.dilation, "padding": module.padding, "stride": module.stride} if conv2d else
                    {"dilation": (1, 1), "padding": (0, module.padding[0]), "stride": (1, module.stride[0])})
        columns = F.unfold(images, kernel.shape[-2:], **geometry)  # [B, K_total, P]
        groups, outs = module.groups, []
        per_k, per_n = columns.shape[1] // groups, kernel.shape[0] // groups
        for g in range(groups):
            a = columns[:, g * per_k:(g + 1) * per_k].transpose(1, 2).reshape(-1, per_k).long().tolist()
            w = kernel[g * per_n:(g + 1) * per_n].reshape(per_n, -1).t().long().tolist()
            outs.append(torch.tensor(simulate(a, w, rows, cols, _as_dict(faults))))
        expected = torch.cat(outs, 1).reshape(clean.shape[0], -1, clean.shape[1]).transpose(1, 2).reshape(clean.shape)
    assert torch.equal(got.round().long(), expected.long())


def _mlp_cnn() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(6 * 64, 10)).eval()


def test_the_engine_adds_the_arrays_error_to_every_layer_it_computes(digits) -> None:  # noqa: ANN001
    """Through the engine: each layer's output codes are those of its exact accumulator plus the array's error."""
    model = _mlp_cnn()
    qmodel = quantize(model, digits.x_train[:128], act_scheme="asymmetric")
    x = digits.x_test[:4]
    array = Array(4, 5, "acc")
    index, bit = 2 * 5 + 3, 12  # PE (2, 3), accumulator bit 12
    pattern = FaultPattern.from_faults([("pe", array.name, index, bit, "stuck1")])
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = [layer.module.register_forward_hook(
        lambda m, a, o, name=name, layer=layer: seen.setdefault(name, []).append((a[0].clone(), o.clone())))
        for name, layer in qmodel.layers.items()]
    try:
        qmodel(x)
        qmodel(x, pattern)
    finally:
        for handle in handles:
            handle.remove()
    fault = [PEFault(2, 3, "acc", bit, KIND_CODES[Kind.STUCK1])]
    for name, layer in qmodel.layers.items():
        (_, clean_out), (codes_in, faulty_out) = seen[name]
        weight = layer.weight_codes.double()
        if isinstance(layer.module, nn.Linear):
            acc = codes_in.double() @ weight.t()
        else:
            acc = F.conv2d(codes_in.double(), weight, None, layer.module.stride, layer.module.padding)
        acc = acc + layer_error(layer.module, codes_in, weight, fault, 4, 5, acc.shape)
        bias = layer.bias_codes.double() if layer.bias_codes is not None else 0
        m = layer.requant_multiplier().double()
        low, high = layer.act_range
        expected = torch.clamp(torch.round((acc + bias) * m), low, high)
        got = torch.round(layer.dequantize_output(faulty_out).double() / layer.act_scale)
        assert float((got - expected).abs().max()) <= 1, name  # float32 requantization: ties may round either way
        assert float((got != expected).double().mean()) < 1e-3, name
        assert not torch.equal(faulty_out, clean_out), name  # the stuck bit reaches every layer on the array
    assert torch.equal(qmodel(x), qmodel(x))  # nothing left behind


def test_pe_campaigns_are_specified_sampled_and_refused_where_they_cannot_reach(digits) -> None:  # noqa: ANN001
    spec = CampaignSpec(site="pe", ber=1e-3, min_acc=0.5, array=(8, 4), pe_register="mul", kind="stuck1")
    assert spec.layer_selectors() == ("ws8x4.mul",) and not spec.transient
    assert spec.label() == "pe-8x4mul-ber0.001-stuck1"
    assert CampaignSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match=r"array: site='pe' needs array=\(rows, cols\)"):
        CampaignSpec(site="pe", ber=1e-3, min_acc=0.5)
    with pytest.raises(SpecError, match="array: .* an array is the fault site of site='pe' only"):
        CampaignSpec(site="act", ber=1e-3, min_acc=0.5, array=(4, 4))
    with pytest.raises(SpecError, match=r"bit_positions: \[20\] must be bit indices in \[0, 16\)"):
        CampaignSpec(site="pe", ber=1e-3, min_acc=0.5, array=(4, 4), pe_register="mul", bit_positions=[20])
    qmodel = quantize(_mlp_cnn(), digits.x_train[:128])
    targets = qmodel.targets(Site.PE, ("ws8x4.mul",))
    assert [(t.layer, t.numel, t.bits) for t in targets] == [("ws8x4.mul", 32, 16)]
    pattern = sample_pattern(FaultModel("pe", 0.05, Kind.STUCK1, layers=("ws8x4.mul",)), targets, 4,
                             torch.Generator().manual_seed(3))
    assert len(pattern) and all(f.image is None and f.index < 32 and f.bit < 16 for f in pattern.faults())
    x, y = digits.x_test[:32], digits.y_test[:32]
    model = FaultModel("pe", 0.05, Kind.STUCK1, layers=("ws8x4.mul",))
    expected = sum(int(r.argmax()) == int(t) for r, t in zip(qmodel(x, sample_pattern(
        model, targets, len(x), torch.Generator().manual_seed(1))), y)) / len(x)
    assert accuracy(qmodel, (x, y), model, seed=1) == expected
    attention = nn.MultiheadAttention(8, 2, batch_first=True)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = attention, nn.Linear(8, 3)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(z, z, z, need_weights=False)[0].mean(1))

    with_matmuls = quantize(Attn().eval(), torch.randn(16, 4, 8))
    with pytest.raises(ValueError, match=r"site 'pe': .* not mapped onto it.*scores \(MatMul\)"):
        with_matmuls.targets(Site.PE, ("ws4x4.acc",))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_pe_fault_is_gone_after_its_trial(digits, data) -> None:  # noqa: ANN001
    qmodel = quantize(_mlp_cnn(), digits.x_train[:64])
    x = digits.x_test[:3]
    clean = qmodel(x)
    rows, cols = data.draw(st.integers(1, 8), "rows"), data.draw(st.integers(1, 8), "cols")
    index = data.draw(st.integers(0, rows * cols - 1), "index")
    qmodel(x, FaultPattern.from_faults([("pe", f"ws{rows}x{cols}.acc", index, 30, "stuck1")]))
    assert torch.equal(qmodel(x), clean) and qmodel._runtime.pe is None


def _planted_weak_pe_model(x: torch.Tensor, y: torch.Tensor) -> tuple[nn.Module, int, int]:
    """A nearest-centroid digit classifier (non-negative weights: every product of uint8 inputs and its weights is
    non-negative) whose class 4 is recognised by one large weight on pixel 33 alone: the only product with bit 14
    set. On a 4 x 4 array that product runs through PE (33 % 4, 4 % 4) = (1, 0)."""
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    weight, bias = means.clone(), -0.5 * (means**2).sum(1)
    weight[4] = 0
    weight[4, 33], bias[4] = 20.0, -10.0  # class 4 when pixel 33 is brighter than half
    linear = nn.Linear(64, 10)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return nn.Sequential(linear).eval(), 1, 0


def test_the_worst_pe_search_finds_a_planted_weak_pe(digits) -> None:  # noqa: ANN001
    from pytest_hwfault.search import search_faults

    x, y = torch.cat([digits.x_train, digits.x_test]), torch.cat([digits.y_train, digits.y_test])
    model, row, col = _planted_weak_pe_model(x, y)
    qmodel = quantize(model, x[:512], act_scheme="asymmetric", weight_granularity="per_tensor")
    codes = qmodel.layers["0"].weight_codes
    assert int(codes[4, 33]) == 127 and int((codes >= 65).sum()) == 1
    # the plant: of the 16 PEs, stuck-at-0 on bit 14 of the product register hurts at PE (1, 0) alone
    clean = accuracy(qmodel, (x, y))
    damage = {}
    for index in range(16):
        pattern = FaultPattern.from_faults([("pe", "ws4x4.mul", index, 14, "stuck0")])
        damage[divmod(index, 4)] = clean - accuracy(qmodel, (x, y), faults=pattern)
    assert damage[(row, col)] > 0.01 and all(d == 0 for pe, d in damage.items() if pe != (row, col))
    result = search_faults(qmodel, (x, y), site="pe", array=(4, 4), pe_register="mul", kind="stuck0",
                           bit_positions=[13, 14], max_flips=2, max_drop=0.01, seed=0, examples=100, subset=None)
    assert result.found
    # one fault, at the planted PE (shrunk to the lowest bit that still breaks it: 13 also halves that product)
    assert [(f.layer, f.index, f.kind) for f in result.faults] == [("ws4x4.mul", row * 4 + col, "stuck0")]
    assert "PE (1, 0) of a 4x4 weight-stationary array, multiplier output bit" in (result.message or "")


def test_a_pe_gate_on_compute_no_array_runs_fails_cleanly(pytester: pytest.Pytester) -> None:
    """A pe gate on a model whose attention matmuls no systolic array computes fails, naming them; never a pass on
    the part the array reaches, never a traceback."""
    pytester.makepyfile(test_attention='''
import torch
from torch import nn
from pytest_hwfault import resilience


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, z):
        return self.head(self.attn(z, z, z, need_weights=False)[0].mean(1))


@resilience(ber=1e-4, site="pe", array=(4, 4), min_acc=0.0)
def test_gate(hwfault):
    torch.manual_seed(0)
    x = torch.randn(32, 4, 8)
    hwfault.assess(Attn().eval(), (x, torch.randint(0, 3, (32,))))
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hwfault")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*hwfault.assess() refused: site 'pe': the systolic array computes*not mapped onto "
                                 "it*scores (MatMul)*"])
    assert "Traceback" not in result.stdout.str()



class _FoldedFirstLayer(nn.Module):
    """A Linear 16 -> 16 on each of an image's 4 rows, then a head: as F.linear on a parameter over the images'
    rows folded into the batch dimension (`functional`), or as a module on [images, 4, 16]."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.w, self.head = nn.Parameter(torch.randn(16, 16) / 4), nn.Linear(64, 10)
        self.first = nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            h = F.linear(x.reshape(-1, 16), self.w)
        else:
            h = self.first(x.reshape(len(x), 4, 16))
        return self.head(F.relu(h).reshape(len(x), -1))


def test_pe_faults_reach_functional_layers_as_module_layers() -> None:
    """The array's error of a functional layer was computed under the functional dispatch, which took its matmul for
    a call of the model's and refused the forward (CallOrderError). It is the same error as for the module."""
    torch.manual_seed(0)
    functional, module = _FoldedFirstLayer(True).eval(), _FoldedFirstLayer(False).eval()
    with torch.no_grad():
        module.first.weight.copy_(functional.w)
        module.head.load_state_dict(functional.head.state_dict())
    x = torch.randn(12, 64)
    views = [quantize(m, x) for m in (functional, module)]
    assert list(views[0].layers) == ["linear()", "head"] and list(views[1].layers) == ["first", "head"]
    fault_model = FaultModel("pe", 0.05)
    targets = views[0].targets(fault_model.site, layers=("ws8x8.acc",))
    pattern = sample_pattern(fault_model, targets, len(x), torch.Generator().manual_seed(1))
    assert len(pattern) > 0
    faulty = views[0](x, pattern)
    assert torch.equal(faulty, views[1](x, pattern)) and not torch.equal(faulty, views[0](x))
