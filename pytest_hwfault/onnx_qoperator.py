"""ONNX models in onnxruntime's QOperator format (QLinearConv, QLinearMatMul, QGemm, QLinearAdd, the QLinear pools and
QLinearConcat: the integer kernels as nodes, as `quantize_static(quant_format=QuantFormat.QOperator)` and the ONNX
Model Zoo's int8 models hold them) rewritten into the equivalent QDQ graph (DequantizeLinear -> float op ->
QuantizeLinear), which `onnx_reader` reads. onnxruntime fuses each such group back into the very kernel the
QOperator node names, with the same codes, scales, zero points and int32 bias: the arithmetic is the same (checked
against onnxruntime running the QOperator model itself in `tests/test_onnx.py`). Uint8/int8 tensors between the
kernels (MaxPool, Flatten, Reshape on codes) stay as they are: the reader follows their grid.

Nodes without a QDQ equivalent here (QLinearSigmoid, QLinearLeakyRelu, QAttention, ...) are kept, and the reader
refuses them by name."""

from __future__ import annotations

from typing import Any

import numpy as np

# node -> (its QDQ float op, the positions of (tensor, scale, zero point) operands, the output's (scale, zero point)
# positions or None for a float output); QLinearConcat's operands are read from its inputs instead
_LAYOUTS: dict[str, tuple[str, list[tuple[int, int, int]], tuple[int, int] | None]] = {
    "QLinearConv": ("Conv", [(0, 1, 2), (3, 4, 5)], (6, 7)),
    "QLinearMatMul": ("MatMul", [(0, 1, 2), (3, 4, 5)], (6, 7)),
    "QGemm": ("Gemm", [(0, 1, 2), (3, 4, 5)], (7, 8)),
    "QLinearAdd": ("Add", [(0, 1, 2), (3, 4, 5)], (6, 7)),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", [(0, 1, 2)], (3, 4)),
    "QLinearAveragePool": ("AveragePool", [(0, 1, 2)], (3, 4)),
}
QOPERATOR = (*_LAYOUTS, "QLinearConcat")
# a bias (int32 codes at input scale x weight scale) at this input position
_BIAS = {"QLinearConv": 8, "QGemm": 6}


def is_qoperator(proto: Any) -> bool:
    return any(node.op_type in QOPERATOR for node in proto.graph.node)


class _Rewrite:
    def __init__(self, proto: Any) -> None:
        from onnx import ModelProto, numpy_helper

        self.model = ModelProto()
        self.model.CopyFrom(proto)
        self.graph = self.model.graph
        self.consts = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.nodes: list[Any] = []
        self.fresh = 0
        self.per_channel = False

    def name(self, base: str) -> str:
        self.fresh += 1
        return f"{base}_hwfault_qdq_{self.fresh}"

    def operand(self, node: Any, i: int) -> str:
        return node.input[i] if i < len(node.input) else ""

    def dequantize(self, node: Any, tensor: str, scale: str, zero: str, axis: int) -> str:
        from onnx import helper

        out = self.name(tensor)
        size = self.consts[scale].size if scale in self.consts else 1
        self.per_channel |= size > 1
        inputs = [tensor, scale] + ([zero] if zero else [])
        made = helper.make_node("DequantizeLinear", inputs, [out], name=self.name(node.name))
        if size > 1:  # per channel
            made.attribute.append(helper.make_attribute("axis", axis))
        self.nodes.append(made)
        return out

    def quantize(self, node: Any, value: str, scale: str, zero: str, output: str) -> None:
        from onnx import helper

        inputs = [value, scale] + ([zero] if zero else [])
        self.nodes.append(helper.make_node("QuantizeLinear", inputs, [output], name=self.name(node.name)))

    def bias(self, node: Any, position: int, x_scale: str, w_scale: str) -> str:
        """The int32 bias dequantized at float32(input scale x weight scale), as a QDQ model holds it."""
        from onnx import numpy_helper

        scale = np.float32(self.consts[x_scale]).reshape(()) * self.consts[w_scale].astype(np.float32).reshape(-1)
        name = self.name(f"{node.name}_bias_scale")
        self.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), name))
        self.consts[name] = scale
        return self.dequantize(node, node.input[position], name, "", 0)

    def rewrite(self, node: Any) -> None:
        from onnx import helper

        op = node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        output: tuple[str, str] | None
        if op == "QLinearConcat":
            y_scale, y_zero = node.input[0], node.input[1]
            triples = [(i, i + 1, i + 2) for i in range(2, len(node.input), 3)]
            float_op, output = "Concat", (y_scale, y_zero)
        else:
            float_op, triples, output_pos = _LAYOUTS[op]
            output = None if output_pos is None or not self.operand(node, output_pos[0]) else \
                (node.input[output_pos[0]], self.operand(node, output_pos[1]))
        if attrs.pop("channels_last", 0):
            raise ValueError(f"node {node.name!r} ({op}) computes channels-last; only NCHW is supported")
        inputs = []
        for k, (tensor, scale, zero) in enumerate(triples):
            # a weight's scales per output channel: axis 0 for a conv and a transposed Gemm B, 1 for a MatMul B
            axis = 0 if k == 0 or op == "QLinearConv" or (op == "QGemm" and attrs.get("transB", 0)) else 1
            inputs.append(self.dequantize(node, node.input[tensor], node.input[scale], self.operand(node, zero),
                                          axis))
        if op in _BIAS and self.operand(node, _BIAS[op]):
            inputs.append(self.bias(node, _BIAS[op], node.input[triples[0][1]], node.input[triples[1][1]]))
        if op == "QGemm" and output is None:  # a float result: the Gemm itself gives it
            self.nodes.append(helper.make_node(float_op, inputs, [node.output[0]], name=node.name, **attrs))
            return
        assert output is not None
        value = self.name(node.output[0])
        self.nodes.append(helper.make_node(float_op, inputs, [value], name=node.name, **attrs))
        self.quantize(node, value, output[0], output[1], node.output[0])

    def run(self) -> Any:
        for node in self.graph.node:
            if node.op_type in QOPERATOR and node.domain in ("", "ai.onnx", "com.microsoft"):
                self.rewrite(node)
            else:
                self.nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        if self.per_channel:  # DequantizeLinear's axis needs opset 13 (the reader's ops mean the same from 10 on)
            for opset in self.model.opset_import:
                if opset.domain in ("", "ai.onnx") and opset.version < 13:
                    opset.version = 13
        return self.model


def to_qdq(proto: Any) -> Any:
    """A copy of the QOperator model `proto` with each integer kernel node as its QDQ group (see the module doc)."""
    return _Rewrite(proto).run()
