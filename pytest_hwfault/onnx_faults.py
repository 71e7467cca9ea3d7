"""A deployed ONNX model under a fault pattern, as onnxruntime's own kernels compute it: the independent reference the
view is checked against under faults (at load, `agreement_under_faults`; and by the tests).

- act site: each faulted layer's stored output codes (its QuantizeLinear's output) XORed with a mask fed as a graph
  input, through BitwiseXor (the model brought to opset 18 by onnx's version converter where older), before anything
  reads them; the masks laid out as the graph holds the rows where an exporter merged the batch
  (`merged_batch.from_images`);
- weight site: the int8 weight initializer's codes flipped (transposed where the view holds a MatMul's, a
  MatMulInteger's or a Gemm's weight as [out, in]).

Nothing else changes: onnxruntime fuses the same integer kernels around the XOR nodes and runs them on the same faulty
codes the engine computes with.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

ACT_MASK_SUFFIX = "__fault_mask"


def merged_layers(qmodel: Any) -> dict[str, Any]:
    """The layers an exporter ran on the batch merged with its rows (the view computes them on [images, k, ...]),
    with the layout of their rows."""
    from .merged_batch import to_images

    return {node.target: node.args[0].args[1] for node in qmodel.module.graph.nodes
            if node.op == "call_module" and node.target in qmodel.layers and node.args
            and getattr(node.args[0], "target", None) is to_images}


def onnxruntime_layer_codes(proto: Any, qmodel: Any, images: Any, masks: dict[str, np.ndarray] | None = None
                            ) -> dict[str, torch.Tensor]:
    """Each layer's stored output codes (its QuantizeLinear's output; after the fault's XOR where `proto` is
    `onnx_under_faults`'s, fed `masks`) as onnxruntime computes them on `images`: code - zero point, one row per
    image (a layer whose rows an exporter merged with the batch: its rows taken back per image, as the view computes
    it). The graph's tensors are made graph outputs; layers that store no codes are left out."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from .merged_batch import SECOND, to_images

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    produced = {output for node in graph.node for output in node.output}
    outputs = {output.name for output in graph.output}
    merged = merged_layers(qmodel)
    wanted: dict[str, str] = {}
    for name, layer in qmodel.layers.items():
        codes = getattr(layer.module, "onnx_codes", None)
        if codes is None or layer.act_scale is None:
            continue
        if f"{codes}__faulty" in produced:  # the codes as the layers after it read them
            codes = f"{codes}__faulty"
        if codes not in produced:
            continue
        wanted[name] = codes
        if codes not in outputs:
            element = onnx.TensorProto.INT8 if layer.signed_activations else onnx.TensorProto.UINT8
            graph.output.append(helper.make_tensor_value_info(codes, element, None))
            outputs.add(codes)
    if not wanted:
        return {}
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    results = session.run(list(wanted.values()), {**_feeds(proto, images), **(masks or {})})
    count = len(images)
    kept = {}
    for name, codes in zip(wanted, results):
        rows = torch.from_numpy(codes.astype(np.int64))
        if name in merged:  # [images x k, ...] or [k, images, ...] as the graph holds them -> [images, k, ...]
            rows = to_images(rows, merged[name], 0 if merged[name] == SECOND else len(rows) // count)
        kept[name] = rows.reshape(count, -1) - qmodel.layers[name].act_zero_point
    return kept


def _feeds(proto: Any, images: Any) -> dict[str, np.ndarray]:
    """The graph's inputs (its initializers and the fault masks left out) fed with `images`, an `Inputs` in order."""
    initializers = {i.name for i in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers and not i.name.endswith(ACT_MASK_SUFFIX)]
    tensors = images.tensors if hasattr(images, "tensors") else (images,)
    return {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)}


def onnx_dynamic_layer_agreement(model: Any, qmodel: Any, images: Any) -> Any:
    """A dynamically quantized ONNX model against its view layer by layer: the float result of each dynamic layer
    (the tensor its MatMulInteger -> Cast -> Mul -> Add chain ends in, made a graph output, which onnxruntime's fused
    DynamicQuantizeMatMul computes) and the view's (`onnx_reader.OrtDynamicOutput`), one input at a time as the
    runtime quantizes each call's input on its own range, bit for bit. Outputs alone miss a layer whose result does
    not reach them (a collapsed head)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from .layer_agreement import LayerAgreement, _run_hooked
    from .onnx_reader import load

    copy = onnx.ModelProto()
    copy.CopyFrom(load(model))
    graph = copy.graph
    results = {name: module for name, module in qmodel.module.named_modules() if getattr(module, "onnx_output", "")}
    outputs = {output.name for output in graph.output}
    for module in results.values():
        if module.onnx_output not in outputs:
            graph.output.append(helper.make_tensor_value_info(module.onnx_output, onnx.TensorProto.FLOAT, None))
            outputs.add(module.onnx_output)
    theirs: dict[str, list[torch.Tensor]] = {name: [] for name in results}
    ours: dict[str, list[torch.Tensor]] = {name: [] for name in results}
    if not results:
        return LayerAgreement(0, (), "values")
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    tensors = [module.onnx_output for module in results.values()]
    for i in range(len(images)):
        for name, value in zip(results, session.run(tensors, _feeds(copy, images[i : i + 1]))):
            theirs[name].append(torch.from_numpy(value).reshape(-1))

    def keeper(name: str) -> Any:
        def keep(module: Any, args: Any, out: Any) -> None:  # returns None: the output stays
            ours[name].append(out.detach().float().cpu().reshape(-1).clone())
        return keep

    _run_hooked([(module, keeper(name)) for name, module in results.items()],
                *[lambda i=i: qmodel(images[i : i + 1]) for i in range(len(images))])
    apart = []
    for name, module in results.items():  # in the graph's order of nodes
        runtime, mine = theirs[name], ours[name]
        total = sum(t.numel() for t in runtime)
        what = f"a dynamic {'ConvInteger' if hasattr(module, 'window_sums') else 'MatMulInteger'}'s float result"
        if len(mine) != len(runtime) or any(a.shape != b.shape for a, b in zip(runtime, mine)):
            apart.append((module.scales_layer, what, 0, total, True))
        elif not all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(runtime, mine)):
            equal = sum(int((a.view(torch.int32) == b.view(torch.int32)).sum()) for a, b in zip(runtime, mine))
            apart.append((module.scales_layer, what, equal, total, True))
    return LayerAgreement(len(results), tuple(apart), "values")


def onnx_layer_agreement(model: Any, qmodel: Any, images: Any, pattern: Any = None) -> Any:
    """The view's layers against onnxruntime's stored codes of them (`layer_agreement.codes_agreement`), fault-free
    or under the act faults of `pattern` (drawn for `images`), on the first `LAYER_CHECK_IMAGES` of `images` (all of
    them where the graph fixes its batch size)."""
    from .layer_agreement import codes_agreement, view_layer_codes
    from .onnx_reader import fixed_batch, load
    from .quantization import LAYER_CHECK_IMAGES

    original = load(model)
    fixed = fixed_batch(original)
    count = min(len(images), fixed[0] if fixed is not None else LAYER_CHECK_IMAGES)
    few = images[:count]
    if pattern is None:
        proto, masks, faults = original, None, None
    else:
        faults = pattern.restricted_to(torch.arange(count))
        proto, masks = onnx_under_faults(original, qmodel, faults, count)
    theirs = onnxruntime_layer_codes(proto, qmodel, few, masks)
    ours = view_layer_codes(qmodel, lambda: qmodel(few, faults))
    return codes_agreement(theirs, ours, "a QuantizeLinear's codes")


def onnx_under_faults(model: Any, qmodel: Any, pattern: Any, images: int) -> tuple[Any, dict[str, np.ndarray]]:
    """`model` (a ModelProto or an .onnx path, QDQ) under the act and weight faults of `pattern` for a batch of
    `images` inputs, read by `qmodel` (its layers know their graph nodes): the model, and the masks to feed with the
    inputs. Raises ValueError for faults at other sites, or a layer the graph does not show."""
    import onnx
    from onnx import helper, version_converter

    from .merged_batch import from_images
    from .onnx_reader import load

    proto = onnx.ModelProto()
    proto.CopyFrom(load(model))
    if next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) < 18:
        proto = version_converter.convert_version(proto, 18)
    graph = proto.graph
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    # a layer an exporter ran on the batch merged with its rows computes on the view's [images, k, ...]
    layouts = merged_layers(qmodel)

    def readers(name: str) -> list[Any]:
        return [n for n in graph.node if name in n.input]

    feeds: dict[str, np.ndarray] = {}
    after: dict[str, list[Any]] = {}  # nodes to insert right after the node that computes each faulted tensor
    for (site, layer), group in pattern.groups.items():
        module = qmodel.layers[layer].module
        node = nodes.get(getattr(module, "onnx_node", None) or "")
        if node is None:
            raise ValueError(f"layer {layer!r}: no node of the graph is known to compute it")
        masks = (np.ones(len(group), dtype=np.uint8) << group.bit.numpy().astype(np.uint8))
        if site.value == "weight":
            producer = next((n for n in graph.node if n.output[0] == node.input[1]), None)  # a DequantizeLinear
            init = inits[producer.input[0] if producer is not None else node.input[1]]
            codes = onnx.numpy_helper.to_array(init).copy()
            transposed = node.op_type in ("MatMul", "MatMulInteger") or (node.op_type == "Gemm" and not any(
                a.name == "transB" and a.i for a in node.attribute))
            view = np.ascontiguousarray(codes.T if transposed else codes).view(np.uint8)  # the view's order
            flat = view.reshape(-1)
            np.bitwise_xor.at(flat, group.index.numpy(), masks)
            edited = flat.reshape(view.shape).view(codes.dtype)
            init.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(edited.T if transposed else edited),
                                                       init.name))
            continue
        if site.value != "act":
            raise ValueError(f"site {site.value!r}: onnxruntime's kernels expose no such value to fault")
        codes_name = getattr(module, "onnx_codes", None)
        if codes_name is None:
            raise ValueError(f"layer {layer!r}: no stored output codes in the graph")
        shape = qmodel.layers[layer].output_shape
        mask = np.zeros((images, math.prod(shape)), dtype=np.uint8)
        np.bitwise_xor.at(mask, (group.image.numpy(), group.index.numpy()), masks)
        if layer in layouts:
            mask = from_images(torch.from_numpy(mask).reshape(images, *shape), layouts[layer]).reshape(
                images, -1).numpy()
        if not any(codes_name in n.output for n in graph.node):
            raise ValueError(f"layer {layer!r}: the graph computes no tensor {codes_name!r}")
        signed = qmodel.layers[layer].signed_activations  # int8 or uint8 stored codes, as the graph holds them
        name = f"{codes_name}{ACT_MASK_SUFFIX}"
        feeds[name] = mask.view(np.int8) if signed else mask
        element = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
        graph.input.append(helper.make_tensor_value_info(name, element, [images, mask.shape[1]]))
        faulty = f"{codes_name}__faulty"
        for reader in readers(codes_name):
            for i, inp in enumerate(reader.input):
                if inp == codes_name:
                    reader.input[i] = faulty
        after[codes_name] = [helper.make_node("Shape", [codes_name], [f"{name}_shape"]),
                             helper.make_node("Reshape", [name, f"{name}_shape"], [f"{name}_shaped"]),
                             helper.make_node("BitwiseXor", [codes_name, f"{name}_shaped"], [faulty])]
        if any(output.name == codes_name for output in graph.output):
            raise ValueError(f"layer {layer!r}: its stored codes are a graph output")
    order = []
    for node in graph.node:  # the graph is in topological order: each XOR right after the codes it edits
        order.append(node)
        for output in node.output:
            order.extend(after.get(output, ()))
    del graph.node[:]
    graph.node.extend(order)
    return proto, feeds


def agreement_under_faults(model: Any, qmodel: Any, images: Any, ber: float = 1e-3) -> tuple[str, bool | None]:
    """The view of a static ONNX model under one trial of act faults at `ber` (a fixed seed) against onnxruntime
    running the model under the same faults (`onnx_under_faults`), on `images`, in words, and whether the outputs
    are equal bit for bit (None: not checked, saying why). Faults move values where calibration never goes
    (saturated codes, sums far from the usual): a fault-free check does not show the arithmetic agrees there."""
    from .deployed import load_check_pattern, trial_agreement
    from .onnx_reader import fixed_batch, load

    fixed = fixed_batch(load(model))
    if fixed is not None and fixed[0] < len(images):  # the graph runs that many images at a time: one call's worth
        images = images[: fixed[0]]
    count = len(images)
    pattern = load_check_pattern(qmodel, count, ber, "onnx load check under faults")
    if pattern is None:
        return "not checked against onnxruntime under faults: the model has no act site", None
    try:
        import onnxruntime as ort

        original = load(model)
        initializers = {i.name for i in original.graph.initializer}
        names = [i.name for i in original.graph.input if i.name not in initializers]
        proto, masks = onnx_under_faults(original, qmodel, pattern, count)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        tensors = images.tensors if hasattr(images, "tensors") else (images,)
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)}
        theirs = [torch.from_numpy(out) for out in session.run(None, {**feeds, **masks})]
    except Exception as error:  # noqa: BLE001 - no check, said so: the fault-free one stands alone
        reason = str(error).splitlines()[0][:200] if str(error) else ""
        return (f"not checked against onnxruntime under faults ({type(error).__name__}: {reason}): its arithmetic on "
                "faulty values is known from the fault-free check and the kernels' probes only"), None
    note, equal = trial_agreement(qmodel, images, pattern, theirs, "onnxruntime", ber)
    try:
        layers = onnx_layer_agreement(model, qmodel, images, pattern)
    except Exception as error:  # noqa: BLE001 - the outputs' check stands alone, said so
        reason = str(error).splitlines()[0][:200] if str(error) else ""
        return f"{note} (its layers' codes not compared: {type(error).__name__}: {reason})", equal
    if layers.apart:
        return f"{note}; layer by layer: {layers.describe()}", False
    if not layers.compared:
        return note, equal
    compared = f"output codes of its {layers.compared} quantized layers equal, and"
    return note.replace(": outputs equal bit for bit", f": {compared} outputs equal bit for bit"), equal
