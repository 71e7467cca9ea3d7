"""The project's own quantizer with act_scheme="asymmetric": unsigned activation codes with a zero point, checked
against an integer reference in plain float64 arithmetic, and faults that hit the stored unsigned code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import float_params, watch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_hwfault import FaultPattern, quantize
from pytest_hwfault.faults import Site

pytestmark = pytest.mark.usefixtures("single_threaded")


def stored_codes(layer, values: torch.Tensor, which: str) -> torch.Tensor:  # noqa: ANN001
    """The unsigned codes q a tensor of values (q - zero point) x scale is stored as."""
    scale, zero = (layer.act_scale, layer.act_zero_point) if which == "act" else (layer.input_scale,
                                                                                   layer.input_zero_point)
    return torch.round(values.double() / scale).to(torch.int64) + zero


def reference_output_codes(model: nn.Module, qmodel, name: str, raw: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Stored output codes of layer `name` for the float tensor `raw` entering it, from public data only."""
    layer = qmodel.layers[name]
    top = (1 << layer.bits) - 1
    q_in = torch.clamp(torch.round(raw.double() / layer.input_scale) + layer.input_zero_point, 0, top)
    x = q_in - layer.input_zero_point
    w = layer.weight_codes.double()
    acc_scale = layer.weight_scale.double() * layer.input_scale
    _, bias = float_params(model, qmodel, name)
    bias_codes = None if bias is None else torch.round(bias.double() / acc_scale)
    module = model.get_submodule(name)
    if isinstance(module, nn.Linear):
        acc = x @ w.T + (0 if bias_codes is None else bias_codes)
        real = acc * acc_scale / layer.act_scale
    else:
        acc = F.conv2d(x, w, bias_codes, module.stride, module.padding)
        real = acc * (acc_scale / layer.act_scale).reshape(-1, 1, 1)
    return torch.clamp(torch.round(real) + layer.act_zero_point, 0, top), real


@pytest.fixture(scope="module", params=[8, 4, 12])
def asymmetric(request, digits, trained_cnn):  # noqa: ANN001, ANN201
    return quantize(trained_cnn, digits.x_train[:256], bits=request.param, act_scheme="asymmetric"), request.param


def test_asymmetric_layers_hold_unsigned_codes_with_zero_points(asymmetric, digits, trained_cnn) -> None:  # noqa: ANN001
    qmodel, bits = asymmetric
    top = (1 << bits) - 1
    x = digits.x_test[:64]
    for name, layer in qmodel.layers.items():
        assert not layer.signed_activations
        assert layer.act_range == (-layer.act_zero_point, top - layer.act_zero_point)
        assert layer.input_range == (-layer.input_zero_point, top - layer.input_zero_point)
        with watch(qmodel, name) as seen:
            qmodel(x)
        codes = stored_codes(layer, seen["out"], "act")
        assert int(codes.min()) >= 0 and int(codes.max()) <= top
        expected, real = reference_output_codes(trained_cnn, qmodel, name, seen["raw"])
        off = (codes.double() - expected).abs()
        # equal, except where the exact value sits on a rounding tie (float32 requantization may round it either way)
        tie = ((real - torch.floor(real)) - 0.5).abs() < 1e-4
        assert bool((off[~tie] == 0).all()) and bool((off <= 1).all()), (name, float(off.max()))
    # the conv's ReLU output feeds the linear through max-pooling: the linear reads its codes, zero point included
    linear = qmodel.layers["6"]
    assert linear.input_source == "1" and linear.input_zero_point == qmodel.layers["1"].act_zero_point


def test_asymmetric_calibration_uses_the_zero_point_range() -> None:
    """A ReLU output in [0, 3]: symmetric int8 spends half its codes on negatives, asymmetric uint8 none."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    symmetric, affine = quantize(model, x), quantize(model, x, act_scheme="asymmetric")
    for name in ("0", "2"):
        s, a = symmetric.layers[name], affine.layers[name]
        assert a.act_scale < s.act_scale * 0.6 or a.act_zero_point not in (0, 255)
    assert affine.config["act_scheme"] == "asymmetric" and symmetric.config["act_scheme"] == "symmetric"
    with pytest.raises(ValueError, match="act_scheme='unsigned' is not supported; allowed: 'symmetric', 'asymmetric'"):
        quantize(model, x, act_scheme="unsigned")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_fault_hits_the_stored_unsigned_code(asymmetric, digits, data) -> None:  # noqa: ANN001
    """Flip, stuck-at-0 or stuck-at-1 of one bit of one stored act or input code: that code and only that code
    changes, to the stored code with the bit changed (no sign extension: the top bit of a uint8 code is worth
    +-128 x scale)."""
    qmodel, bits = asymmetric
    x = digits.x_test[:2]
    name = data.draw(st.sampled_from(list(qmodel.layers)), "layer")
    site = data.draw(st.sampled_from(["act", "input"]), "site")
    layer = qmodel.layers[name]
    index = data.draw(st.integers(0, layer.numel(Site(site)) - 1), "index")
    bit = data.draw(st.integers(0, bits - 1), "bit")
    kind = data.draw(st.sampled_from(["flip", "stuck0", "stuck1"]), "kind")
    pattern = FaultPattern.from_faults([(site, name, index, bit, kind, 1)])
    captured: list[torch.Tensor] = []

    def grab(module, args, out=None):  # noqa: ANN001, ANN202
        if site == "act":
            captured.append(layer.dequantize_output(out.detach().clone()))
        else:  # the input codes after the engine's own pre-hook: registered after it
            captured.append(args[0].detach().clone() * layer.input_scale)

    handle = (layer.module.register_forward_hook(grab) if site == "act"
              else layer.module.register_forward_pre_hook(grab))
    try:
        qmodel(x)
        qmodel(x, pattern)
    finally:
        handle.remove()
    clean, faulty = (stored_codes(layer, t, site)[1].reshape(-1) for t in captured)
    expected = clean.clone()
    mask = 1 << bit
    raw = int(clean[index])
    expected[index] = raw ^ mask if kind == "flip" else (raw & ~mask if kind == "stuck0" else raw | mask)
    assert torch.equal(faulty, expected)
    assert 0 <= int(faulty[index]) < (1 << bits)
