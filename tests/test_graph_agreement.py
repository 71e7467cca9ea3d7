"""The part-by-part check's rule (`graph_agreement.codes_explained`, `float_explained`): a code apart between the
view and a PT2E graph is explained exactly where the graph's float32 rounding of a sum carries it across the half
code that the exact sum does not cross (or the two sit within a few float32 steps of it), and nowhere else: a view
off by more than those steps, by two codes, or a graph value that is not the sum is never explained."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_hwfault.graph_agreement import codes_explained, float_explained

SCALES = st.floats(1e-3, 1.0).map(lambda s: float(torch.tensor(s, dtype=torch.float32)))
CODES = st.integers(-128, 126)
ZEROS = st.integers(0, 255)


def _graph_codes(value: torch.Tensor, scale: float) -> torch.Tensor:
    """torch's quantize_per_tensor on a float32 value: times float32(1 / scale), rounded half to even."""
    inverse = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    return torch.round(value.float() * inverse).double()


def _rule(ours: torch.Tensor, stored: torch.Tensor, graph: torch.Tensor, exact: torch.Tensor, bound: float,
          scale: float, zero: int) -> bool:
    size = exact.abs()
    return bool(codes_explained(ours, stored, graph, exact, size, torch.tensor(bound, dtype=torch.float64), scale,
                                zero).item())


@settings(max_examples=300, deadline=None)
@given(SCALES, CODES, ZEROS, st.floats(-2e-4, 2e-4), st.floats(0.0, 1e-3), st.floats(-1.0, 1.0))
def test_a_graph_rounding_a_near_tie_across_the_half_code_is_explained(scale: float, code: int, zero: int,
                                                                      offset: float, bound: float,
                                                                      share: float) -> None:
    """An exact sum near a half code, the graph's float32 value anywhere within its rounding bound of it: wherever
    the graph's codes and the exact rounding differ, the rule explains it."""
    exact = torch.tensor((code + 0.5 + offset) * scale, dtype=torch.float64)
    graph = (exact + share * bound * scale).float().double()  # the graph's float32 sum, within the bound
    if abs(float(graph - exact)) > bound * scale:
        return  # float32 storage moved it past the bound drawn: not this case
    stored = _graph_codes(graph, scale)
    for ours in (torch.round(exact / scale), _graph_codes(exact, scale)):  # exact rounding, or in float32 steps
        if not torch.equal(ours, stored):
            assert _rule(ours, stored, graph, exact, bound * scale, scale, zero)


@settings(max_examples=300, deadline=None)
@given(SCALES, CODES, ZEROS, st.floats(1e-3, 0.499), st.sampled_from([-1, 1]), st.sampled_from([-1, 1, 2, -2]))
def test_a_view_off_where_the_graph_is_not_at_a_tie_is_never_explained(scale: float, code: int, zero: int,
                                                                       distance: float, side: int,
                                                                       wrong_by: int) -> None:
    """The exact sum at least 1e-3 codes from every half code and the graph's value equal to it: a view one (or
    two) codes away from the graph's code computes otherwise, and the rule says so."""
    exact = torch.tensor((code + 0.5 + side * distance) * scale, dtype=torch.float64)
    graph = exact.float().double()
    stored = _graph_codes(graph, scale)
    assert not _rule(stored + wrong_by, stored, graph, exact, 1e-4 * scale, scale, zero)


@settings(max_examples=200, deadline=None)
@given(SCALES, CODES, ZEROS, st.floats(-2e-4, 2e-4), st.floats(1e-2, 1.0))
def test_a_graph_value_that_is_not_the_sum_explains_nothing(scale: float, code: int, zero: int, offset: float,
                                                           away: float) -> None:
    """Past the bound on its float32 rounding, the graph's value is not this sum: no tie it rounds is explained."""
    exact = torch.tensor((code + 0.5 + offset) * scale, dtype=torch.float64)
    bound = 1e-5 * scale
    graph = exact + (bound + away * scale) * (1 if offset < 0 else -1)  # across the half, beyond the bound
    stored, ours = _graph_codes(graph, scale), torch.round(exact / scale)
    if not torch.equal(ours, stored):
        assert not _rule(ours, stored, graph, exact, bound, scale, zero)


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e3, 1e3).filter(lambda v: abs(v) > 1e-6), st.floats(-2.0, 2.0), st.floats(1e-5, 1e-2))
def test_a_float_result_must_be_the_exact_sum_up_to_float32_scaling(value: float, steps: float,
                                                                   relative: float) -> None:
    """A float result a few float32 steps from the exact sum is the view computing it; one 1e-5 or more away is
    not."""
    exact = torch.tensor([value], dtype=torch.float64)
    size, bound = exact.abs(), exact.abs() * 1e-4
    close = (exact * (1 + steps * 2.0 ** -24)).float().double()
    assert bool(float_explained(close, exact, exact, size, bound).all())
    far = exact * (1 + relative)
    assert not bool(float_explained(far, exact, exact, size, bound).any())
    # and the graph's value must be the sum: past its bound, even the exact result is not explained
    assert not bool(float_explained(exact, exact + 2 * bound + 1e-9, exact, size, bound).any())


def test_the_flow_check_compares_a_part_only_where_every_module_before_it_is_a_replaced_part() -> None:
    """`_replaced_before`: a part's input is compared only where what it is computed from, back to the graph's
    inputs or to other parts' outputs (which the check replaces by the graph's), passes no other module (a module the
    reader wrote for Inductor rounds on its own, so the view's input may differ from the graph's there by rounding);
    ops the view copied from the graph (a ReLU, a sum of two parts) are followed through."""
    from torch import fx

    from pytest_hwfault.graph_agreement import _replaced_before

    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_module("a", (x,))
    rewritten = graph.call_module("rewritten", (a,))
    c = graph.call_module("c", (graph.call_function(torch.relu, (a,)),))
    d = graph.call_module("d", (graph.call_function(torch.add, (a, c)),))
    e = graph.call_module("e", (graph.call_function(torch.add, (c, rewritten)),))
    f = graph.call_module("f", (rewritten,))
    graph.output((d, e, f))
    assert _replaced_before(graph, {"a", "c", "d", "e", "f"}) == {"a": True, "c": True, "d": True, "e": False,
                                                                 "f": False}
