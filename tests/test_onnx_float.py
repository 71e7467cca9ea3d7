"""The float ops of an ONNX graph (`onnx_float`), one node at a time against onnxruntime: each attribute read with
ONNX's default and meaning for its opset, or the node refused by name. Each case here was computed otherwise
before (an audit of every op against the operator spec and onnxruntime 1.32)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from pytest_hwfault import onnx_float
from pytest_hwfault.deployed import DeployedFormatError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
helper, numpy_helper, TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto


def _one_node(op: str, inputs: list[tuple[str, np.ndarray | None]], attributes: dict[str, Any], opset: int,
              outputs: tuple[str, ...] = ("y",)) -> tuple[list[np.ndarray], Any]:
    """(onnxruntime's outputs, the module's result) for one node; an input named "" is left out."""
    node = helper.make_node(op, [name for name, _ in inputs], list(outputs), **attributes)
    given = [(name, value) for name, value in inputs if name and value is not None]
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info(
        name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)) for name, value in given],
        [onnx.ValueInfoProto(name=name) for name in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, dict(given))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if op in ("Split", "Dropout"):  # told their outputs, as the reader tells them
        attrs["_outputs"] = len(outputs)
    function = onnx_float.function(op, attrs, opset)
    assert function is not None
    module = onnx_float.OnnxOp(op, function, [not name for name, _ in inputs])
    return theirs, module(*[torch.from_numpy(np.array(value)) for _, value in given])


def _same(theirs: np.ndarray, ours: torch.Tensor) -> bool:
    """Equal bit for bit, in shape and type too."""
    mine = ours.numpy()
    return mine.dtype == theirs.dtype and mine.shape == theirs.shape and np.array_equal(mine, theirs, equal_nan=True)


def _f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


EXACT = {
    # the sums of the elements before each: x - y lost the 1 under 1e8 (float32)
    "CumSum exclusive": ("CumSum", [("x", _f32(1, 1e8, 1)), ("axis", np.array(0))], {"exclusive": 1}, 14),
    "CumSum exclusive reverse": ("CumSum", [("x", _f32(1, 1e8, 1)), ("axis", np.array(0))],
                                 {"exclusive": 1, "reverse": 1}, 14),
    "IsInf detect_negative=0": ("IsInf", [("x", _f32(np.inf, -np.inf, 1))], {"detect_negative": 0}, 20),
    "IsInf detect_positive=0": ("IsInf", [("x", _f32(np.inf, -np.inf, 1))], {"detect_positive": 0}, 10),
    # onnxruntime adds delta step by step; arange multiplies (20 of 30 values an ulp apart)
    "Range float32": ("Range", [("a", np.array(0, np.float32)), ("b", np.array(3, np.float32)),
                                ("d", np.array(0.1, np.float32))], {}, 11),
    # the base's type: pow in double, truncated
    "Pow int64 ** float": ("Pow", [("a", np.array([2, 3, 5], np.int64)), ("b", _f32(0.5, 2, 1.5))], {}, 15),
    "Squeeze empty axes": ("Squeeze", [("x", np.zeros((1, 3, 1), np.float32)), ("axes", np.zeros(0, np.int64))],
                           {}, 13),
    "DequantizeLinear blocked": ("DequantizeLinear", [("x", np.arange(16, dtype=np.int8).reshape(4, 4)),
                                                      ("s", _f32(1, 2, 3, 4).reshape(1, 4))],
                                 {"axis": 0, "block_size": 4}, 21),
    "DequantizeLinear blocked, ragged": ("DequantizeLinear", [("x", np.arange(15, dtype=np.int8).reshape(3, 5)),
                                                              ("s", _f32(1, 2, 3, 4, 5, 6).reshape(3, 2)),
                                                              ("z", np.array([[1, 2], [3, 4], [5, 6]], np.int8))],
                                         {"axis": 1, "block_size": 3}, 21),
    "DequantizeLinear float16 scale": ("DequantizeLinear", [("x", np.array([1, 2, 3], np.int8)),
                                                            ("s", np.array(0.1, np.float16))], {}, 19),
    "Elu tiny negatives": ("Elu", [("x", _f32(-1e-7, -1e-5, -3, 2))], {}, 13),
    # onnxruntime's output length is float32(10) x float32(1.3) = 13, torch's float64 product floors to 12
    "Resize nearest scale 1.3": ("Resize", [("x", np.arange(10, dtype=np.float32).reshape(1, 1, 10)), ("", None),
                                            ("scales", _f32(1, 1, 1.3))],
                                 {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                  "nearest_mode": "floor"}, 13),
    "Resize nearest scale 0.7": ("Resize", [("x", np.arange(10, dtype=np.float32).reshape(1, 1, 10)), ("", None),
                                            ("scales", _f32(1, 1, 0.7))],
                                 {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                  "nearest_mode": "floor"}, 13),
    # an unchanged length: onnxruntime copies the input whatever the scale
    "Resize nearest same length": ("Resize", [("x", _f32(0, 1).reshape(1, 1, 2)), ("", None),
                                              ("scales", _f32(1, 1, 1.3))],
                                   {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                    "nearest_mode": "floor"}, 13),
    "Resize to nothing": ("Resize", [("x", np.ones((1, 2, 1, 6), np.float32)), ("", None),
                                     ("scales", _f32(1, 1, 0.5, 3))],
                          {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 13),
    # pytorch_half_pixel maps an output of length 1 to the first input position (torch's half-pixel: the middle)
    "Resize pytorch_half_pixel to 1": ("Resize", [("x", np.arange(8, dtype=np.float32).reshape(1, 2, 4)),
                                                  ("", None), ("", None), ("sizes", np.array([1, 2, 1]))],
                                       {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, 13),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_float_ops_equal_onnxruntime_bit_for_bit(case: str) -> None:
    op, inputs, attributes, opset = EXACT[case]
    theirs, ours = _one_node(op, inputs, attributes, opset)
    assert _same(theirs[0], ours), (theirs[0], ours)


@pytest.mark.parametrize("transform", ["half_pixel", "pytorch_half_pixel", "align_corners"])
def test_linear_resize_by_scales_has_onnxruntimes_lengths_and_values(transform: str) -> None:
    """Linear interpolation rounds otherwise than onnxruntime's kernel (within 1e-5), but lengths and coordinates
    are its own: scales and sizes on 1-d and 2-d images, lengths down to 1."""
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 10), (2, 3, 5, 7), (1, 2, 1, 6)]:
        x = rng.standard_normal(shape).astype(np.float32)
        spatial = len(shape) - 2
        given: list[tuple[str, np.ndarray]] = [("scales", _f32(1, 1, *[scale] * spatial))
                                               for scale in (0.3, 0.7, 1.3, 1.7, 2.5)]
        given += [("sizes", np.array([*shape[:2], *[size] * spatial])) for size in (1, 3, 13)]
        for name, value in given:
            inputs = [("x", x), ("", None), (name, value)] if name == "scales" else \
                [("x", x), ("", None), ("", None), (name, value)]
            theirs, ours = _one_node("Resize", inputs, {"mode": "linear", "coordinate_transformation_mode": transform},
                                     13)
            assert tuple(ours.shape) == theirs[0].shape, (shape, name, value)
            np.testing.assert_allclose(ours.numpy(), theirs[0], rtol=1e-5, atol=1e-5)


REFUSED = {
    "Resize keep_aspect_ratio_policy": ("Resize", {"mode": "linear", "keep_aspect_ratio_policy": "not_larger"}, 18,
                                        (np.ones((1, 1, 4, 4), np.float32), None, None, np.array([1, 1, 2, 8])),
                                        "keep_aspect_ratio_policy='not_larger' is not supported"),
    "Resize of channels": ("Resize", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                      "nearest_mode": "floor"}, 13,
                           (np.ones((1, 2, 2, 2), np.float32), None, _f32(1, 2, 1, 1)),
                           r"changes the batch or channel axes"),
    "Resize of opset 10": ("Resize", {"mode": "linear"}, 10, (np.ones((1, 1, 2, 2), np.float32), _f32(1, 1, 2, 2)),
                           "Resize of opset 10 .* is not supported: export with opset 11 or later"),
    "Dropout in training": ("Dropout", {}, 13, (np.ones((2, 4), np.float32), np.array(0.5, np.float32),
                                                np.array(True)), "training mode"),
    "Mod fmod=0 on floats": ("Mod", {}, 13, (_f32(5.5), _f32(2)), "fmod=0 on floating-point inputs"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_modes_the_module_does_not_compute_are_refused_by_name(case: str) -> None:
    op, attributes, opset, inputs, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        function = onnx_float.function(op, attributes, opset)
        assert function is not None
        function(*[None if value is None else torch.from_numpy(np.array(value)) for value in inputs])


def test_optional_outputs_are_computed_or_refused_by_the_reader() -> None:
    """A multi-output node's function returned one tensor, which the reader indexed: a Dropout's mask was the
    input's second row, a LayerNormalization's Mean its output's second row."""
    from pytest_hwfault import onnx_reader

    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    dropout = helper.make_model(helper.make_graph(
        [helper.make_node("Dropout", ["x"], ["y", "mask"], name="d"), helper.make_node("Cast", ["mask"], ["m"], to=1)],
        "d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 13)],
        ir_version=10)
    theirs = ort.InferenceSession(dropout.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    ours = onnx_reader._Builder(dropout, None, exact=False).build()(torch.from_numpy(x))
    assert _same(theirs, ours)
    norm = helper.make_model(helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "s"], ["y", "mean"], name="ln")], "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(8, np.float32), "s")]), opset_imports=[helper.make_opsetid("", 17)],
        ir_version=10)
    with pytest.raises(DeployedFormatError, match=r"node 'ln' \(LayerNormalization\): its output 1 \('mean'\) is "
                                                  r"read, which the reader does not compute"):
        onnx_reader._Builder(norm, None, exact=False).build()
