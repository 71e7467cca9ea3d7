"""Read a torchao PT2E model (`prepare_pt2e` / `convert_pt2e`) as its graph computes it.

A converted PT2E graph is its own runtime's reference: it quantizes and dequantizes activations with
``quantized_decomposed.quantize_per_tensor`` / ``dequantize_per_tensor`` (codes round(x x float32(1 / scale)) + zero
point, rounded half to even, clamped to quant_min..quant_max), holds int8 weight codes as constants dequantized by
``dequantize_per_channel`` (or per tensor), and runs aten conv/linear on the dequantized float values with a float
bias. The reader rewrites a copy of the graph into the engine's form (`deployed.Deployed`):

- each aten conv1d/conv2d/conv3d/linear on a dequantized activation and dequantized int8 weights whose result is
  quantized (directly or through a ReLU) becomes a call of a plain ``nn.Conv*d`` / ``nn.Linear`` (dequantized
  weights, float bias) named after the model's module, with a `DeployedLayer`: the weight codes and scales, the input
  grid of its dequantize node, the output grid of the quantize node that consumes it, a fused ReLU when a ReLU sits
  between them, and the float bias added after scaling (`BiasMode.FLOAT`, as the graph adds it in float). The
  quantize/dequantize pair after the layer is dropped: the engine's layer produces those codes;
- a conv/linear whose float result is not quantized (x86's conv + residual add fused pattern, whose quantize comes
  after the add, and the last linear, whose output stays float) is a layer with a float output (`DeployedLayer`
  with act_scale None): its input codes, weights and integer accumulator are fault sites, and its accumulator is
  scaled to values and its float bias added, with no output codes (no act site; listed in `Deployed.notes`);
- every other quantize -> dequantize pair on an activation (the model input, after a residual add, after a pooling
  or a flatten) is a `Requantize` (multiplying by 1 / scale, as quantize_per_tensor does): the graph averages,
  adds and reshapes float values and then re-grids them.

Anything else on quantized codes (a quantize whose codes feed something other than a dequantize, a dequantize of an
unknown dtype or with a tensor scale, lowered quantized ops, a conv/linear whose weight is not int8) is a
`DeployedFormatError` naming the node. A conv/linear on an unquantized input stays in float, a module of its own.

Given the ``torch.compile``d model with freezing on (`inductor=True`), the reader reproduces what x86 Inductor lowers
it to instead: oneDNN's int8 conv/linear steps (`Scaling.INDUCTOR`), a residual sum after a conv as its sum post-op
(`KernelSum`), a conv's hard-swish or SiLU as oneDNN's post-op (`KernelEltwise`), inference BatchNorms and global
averages as Inductor's generated code computes them (`InductorBatchNorm`, `RasterMean`).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from .deployed import (
    BiasMode,
    Deployed,
    DeployedFormatError,
    DeployedLayer,
    KernelSum,
    Requantize,
    Scaling,
    check_fixed_batch,
)
from .graph_agreement import Origin

FORMAT = "pt2e"
_CODE_DTYPES = {torch.uint8: (False, 0, 255), torch.int8: (True, -128, 127)}
_RELUS = ("aten.relu.default", "aten.relu_.default")
# activations Inductor fuses into a 2-d convolution as oneDNN post-ops
_POST_OPS = {"aten.hardswish.default": "hardswish", "aten.hardswish_.default": "hardswish",
             "aten.silu.default": "swish", "aten.silu_.default": "swish"}
# aten operations whose values do not depend on their inputs' memory layout (elementwise, reshapes)
_LAYOUT_FREE = {"add", "sub", "mul", "div", "neg", "relu", "relu_", "clamp", "clamp_min", "clamp_max", "hardtanh",
                "hardtanh_", "sigmoid", "tanh", "flatten", "view", "reshape", "permute", "transpose", "squeeze",
                "unsqueeze", "contiguous", "clone", "_assert_tensor_metadata", "sym_size", "sym_numel"}


def _ops() -> dict[str, Any]:
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed

    qd, aten = torch.ops.quantized_decomposed, torch.ops.aten
    return {
        "quantize": qd.quantize_per_tensor.default,
        "dequantize": qd.dequantize_per_tensor.default,
        "dequantize_channel": qd.dequantize_per_channel.default,
        "layers": {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d, aten.conv3d.default: nn.Conv3d,
                   aten.linear.default: nn.Linear},
    }


def _error(node: fx.Node, why: str) -> DeployedFormatError:
    return DeployedFormatError(f"{FORMAT}: node {node.name!r} ({node.format_node()}) {why}")


def _is_quantized_decomposed(node: fx.Node) -> bool:
    return node.op == "call_function" and "quantized_decomposed" in str(node.target)


def _grid(node: fx.Node) -> tuple[float, int, int, int, bool]:
    """(scale, zero point, quant_min, quant_max, signed) of a quantize/dequantize_per_tensor node."""
    scale, zero, low, high, dtype = node.args[1:6]
    if not isinstance(dtype, torch.dtype) or dtype not in _CODE_DTYPES or not isinstance(scale, float) \
            or not all(isinstance(v, int) for v in (zero, low, high)):
        raise _error(node, "quantizes to an unsupported grid: supported are uint8 and int8 codes with a constant "
                           "scale and zero point (the .default overload)")
    assert isinstance(zero, int) and isinstance(low, int) and isinstance(high, int)
    signed, dtype_low, dtype_high = _CODE_DTYPES[dtype]
    if not (dtype_low <= low <= high <= dtype_high):
        raise _error(node, f"has quant range [{low}, {high}] outside its dtype {dtype}")
    return scale, zero, low, high, signed


def _attr(model: nn.Module, node: fx.Node) -> Any:
    return operator.attrgetter(str(node.target))(model)


def _constant(model: nn.Module, node: Any) -> Any:
    """The value of a get_attr node (or a plain constant)."""
    return _attr(model, node) if isinstance(node, fx.Node) and node.op == "get_attr" else node


def _module_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    entries = list(stack.values())
    return str(entries[-1][0]) if entries and entries[-1][0] else node.name


def _weight(model: nn.Module, node: fx.Node, layer: fx.Node, ops: dict[str, Any]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int32 codes, float32 per-output-channel scales, the graph's dequantized float weight) of a layer's weight."""
    if not isinstance(node, fx.Node) or node.target not in (ops["dequantize"], ops["dequantize_channel"]):
        raise _error(layer, "has a weight that is not a dequantized int8 constant: every conv/linear of a PT2E "
                            "model must run on int8 weight codes")
    source = node.args[0]
    codes = _constant(model, source)
    if not isinstance(source, fx.Node) or source.op != "get_attr" or not isinstance(codes, torch.Tensor) \
            or codes.dtype != torch.int8 or node.args[-1] != torch.int8:
        raise _error(layer, f"has a weight dequantized by {node.name!r} from something other than an int8 constant")
    args = [_constant(model, a) for a in node.args]
    weight = ops["dequantize" if node.target == ops["dequantize"] else "dequantize_channel"](*args)
    if node.target == ops["dequantize"]:
        scale, zero = args[1], args[2]
        if not isinstance(scale, float) or not isinstance(zero, int):
            raise _error(node, "dequantizes a weight with a tensor scale: only constant scales are supported")
        scales, zeros = torch.full((codes.shape[0],), scale, dtype=torch.float32), torch.tensor([zero])
    else:
        scales, zeros, axis = args[1], args[2], args[3]
        if axis != 0:
            raise _error(node, f"dequantizes a weight along axis {axis}: only output channels (axis 0) are supported")
        scales = scales.float()
        zeros = torch.zeros(1) if zeros is None else zeros
    if bool((zeros != 0).any()):
        raise _error(node, "has asymmetric weights (non-zero zero points); only symmetric int8 weights are supported")
    return codes.to(torch.int32), scales, weight.float()


def _float_twin(kind: type, args: tuple[Any, ...], weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A float conv/linear with the aten call's geometry, the graph's dequantized weight and float bias."""
    if kind is nn.Linear:
        module: Any = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        stride, padding, dilation, groups = (list(args[3:7]) + [1, 0, 1, 1][len(args[3:7]):])
        module = kind(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding, dilation,
                      groups, bias=bias is not None)
    with torch.no_grad():
        module.weight = nn.Parameter(weight.clone(), requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return module.requires_grad_(False)


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _dequantize_users(q: fx.Node, ops: dict[str, Any]) -> list[fx.Node]:
    """The dequantize nodes reading a quantize node's codes; anything else reading them is an error."""
    grid = _grid(q)
    users = list(q.users)
    for user in users:
        if user.target != ops["dequantize"]:
            raise _error(user, f"reads the int8/uint8 codes of {q.name!r} directly: only dequantize_per_tensor may "
                               "read activation codes in a graph the reader reproduces")
        if _grid(user) != grid:
            raise _error(user, f"dequantizes the codes of {q.name!r} with another grid than they were quantized with")
    return users


def _in_graph_layout(graph: fx.Graph, layers: set[str], modules: dict[str, Any]) -> None:
    """Operations whose float result depends on the memory layout of their input (poolings, float convolutions:
    their sums run in another order) read contiguous tensors, as in the PT2E graph run on a contiguous input: the
    engine may hand its layers' outputs on channels-last, and an average of 64 codes then rounds its ties (one
    average in 64 lies exactly halfway between two codes) differently. Elementwise operations and reshapes
    compute the same values in any layout and are left as they are."""
    for node in list(graph.nodes):
        if node.op == "call_function":
            name = str(getattr(node.target, "__name__", node.target)).split(".")[0]
            if node.target is operator.getitem or name in _LAYOUT_FREE:
                continue
        elif not (node.op == "call_module" and str(node.target) not in layers
                  and not isinstance(modules.get(str(node.target)), _KERNEL_MODULES)):
            continue
        for value in {a for a in node.all_input_nodes if a.op != "get_attr"
                      and isinstance(a.meta.get("val", torch.empty(0)), torch.Tensor)}:  # not a symbolic size
            with graph.inserting_before(node):
                dense = graph.call_method("contiguous", (value,))
            node.replace_input_with(value, dense)


class KernelEltwise(nn.Module):
    """An activation x86 Inductor fuses into the 2-d convolution before it, as oneDNN's post-op computes it
    (`onednn.POST_OPS`: hard-swish, swish), not as torch does (measured against ``qconv_pointwise`` on 8.4M outputs
    each: 0 differ; torch's hardswish differs on 13, its SiLU on half of the float outputs)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import onednn

        return onednn.POST_OPS[self.kind](x)

    def extra_repr(self) -> str:
        return self.kind


class InductorBatchNorm(nn.Module):
    """An inference BatchNorm the graph keeps (nothing to fold it into: DenseNet's), as Inductor decomposes it:
    ((x - mean) x rsqrt(var + eps)) x weight + bias, each step rounding in float32, the rsqrt a constant it folds when
    freezing. ATen's kernel computes x x a + b with a and b folded per channel first, which rounds otherwise."""

    mean: torch.Tensor
    invstd: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                 eps: float) -> None:
        super().__init__()
        f32 = torch.float32
        self.register_buffer("mean", mean.detach().to(f32).clone())
        self.register_buffer("invstd", torch.rsqrt(var.detach().to(f32) + eps))
        self.register_buffer("weight", None if weight is None else weight.detach().to(f32).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(f32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1, *([1] * (x.dim() - 2)))
        out = (x - self.mean.reshape(shape)) * self.invstd.reshape(shape)
        if self.weight is not None:
            out = out * self.weight.reshape(shape)
        return out + self.bias.reshape(shape) if self.bias is not None else out


class RasterMean(nn.Module):
    """A global average over the spatial positions as x86 Inductor's generated code computes it on a channels-last
    activation: each channel's values (code - zero point) x scale, in float32, summed one position after the other
    in raster order, then divided by their number. ATen's pooling sums in another order, and the mean's codes then
    differ (measured: 30 of 6,352 pooled codes on a trained ResNet-style model)."""

    def __init__(self, keepdim: bool) -> None:
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x.flatten(2)
        total = torch.zeros(values.shape[:2], dtype=values.dtype, device=values.device)
        for position in range(values.shape[2]):
            total += values[:, :, position]
        mean = total / float(values.shape[2])
        return mean[:, :, None, None] if self.keepdim else mean


def _global_mean(node: fx.Node) -> bool | None:
    """For an aten global average over the last two dimensions of a 4-d value: whether it keeps them; else None."""
    if node.op != "call_function" or node.kwargs:
        return None
    dims = node.args[1] if len(node.args) > 1 else None
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    if node.target == torch.ops.aten.adaptive_avg_pool2d.default and list(dims) == [1, 1]:
        return True
    if node.target == torch.ops.aten.mean.dim and sorted(int(d) % 4 for d in dims) == [2, 3]:
        return bool(node.args[2]) if len(node.args) > 2 else False
    return None


# elementwise: the same values in any memory layout
_KERNEL_MODULES = (Requantize, KernelSum, RasterMean, KernelEltwise, InductorBatchNorm)


def _fused_sum(node: fx.Node, ops: dict[str, Any]) -> tuple[fx.Node, float, fx.Node | None, fx.Node] | None:
    """Where x86 Inductor fuses the float result of layer `node` into a residual sum (oneDNN's sum post-op): its one
    user an aten add of a dequantized activation, whose result is quantized, directly or after a ReLU. Returns (the
    add, the other operand's scale, the ReLU or None, the quantize). Read before the rewrite replaces dequantize
    nodes."""
    add = _single_user(node)
    if add is None or add.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor) or add.kwargs or \
            len(add.args) != 2:  # an in-place sum (MobileNetV3's `result += input`) writes the layer's own result
        return None
    others = [a for a in add.args if a is not node]
    other = others[0] if len(others) == 1 else None
    if not isinstance(other, fx.Node) or other.target != ops["dequantize"]:
        return None
    after = _single_user(add)
    relu = after if after is not None and str(after.target) in _RELUS and not after.kwargs else None
    quant = _single_user(relu) if relu is not None else after
    if quant is None or quant.target != ops["quantize"]:
        return None
    return add, _grid(other)[0], relu, quant


def _replace(graph: fx.Graph, node: fx.Node, name: str, args: tuple[Any, ...]) -> fx.Node:
    """`node` replaced by a call of module `name` on `args`."""
    with graph.inserting_before(node):
        call = graph.call_module(name, args)
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    return call


def _stand_in(node: fx.Node) -> Origin:
    """A module standing for the graph's float `node`, with arithmetic of its own (Inductor's lowering) or none to
    compare (a layer left in float): the part check leaves it out, its data-flow check hands on the graph's value in
    its place (`graph_agreement`)."""
    return Origin("", node.name, node.name, None, 0)


def _inductor_post_ops(graph: fx.Graph, layers: dict[str, DeployedLayer], modules: dict[str, Any],
                       unique: Callable[[str], str], ops: dict[str, Any], origins: dict[str, Origin]) -> set[fx.Node]:
    """Inductor fuses a hard-swish or SiLU after a 2-d convolution's float result into its kernel (oneDNN's post-op,
    its own arithmetic: `KernelEltwise`), and a quantize right after it too; returns those quantize nodes (the zero
    point added before rounding). After a linear it stays generated code, torch's formula."""
    zero_first: set[fx.Node] = set()
    for node in list(graph.nodes):
        source = node.args[0] if node.op == "call_function" and node.args else None
        if str(node.target) not in _POST_OPS or node.kwargs or not isinstance(source, fx.Node) or \
                source.op != "call_module" or str(source.target) not in layers or len(source.users) != 1 or \
                type(modules[str(source.target)]) is not nn.Conv2d:
            continue
        name = unique(f"kernel_{node.name}")
        modules[name] = KernelEltwise(_POST_OPS[str(node.target)])
        origins[name] = _stand_in(node)
        after = _single_user(_replace(graph, node, name, (source,)))
        if after is not None and after.target == ops["quantize"]:
            zero_first.add(after)
    return zero_first


def _inductor_batch_norms(graph: fx.Graph, model: Any, modules: dict[str, Any], unique: Callable[[str], str],
                          origins: dict[str, Origin]) -> None:
    """Inference BatchNorms as Inductor decomposes them (`InductorBatchNorm`)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs or node.target != torch.ops.aten.batch_norm.default or \
                len(node.args) < 8 or node.args[5] is not False:
            continue
        weight, bias, mean, var = (_constant(model, a) for a in node.args[1:5])
        if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
            continue
        name = unique(f"batch_norm_{node.name}")
        modules[name] = InductorBatchNorm(weight, bias, mean, var, float(node.args[7]))
        origins[name] = _stand_in(node)
        _replace(graph, node, name, (node.args[0],))


def _inductor_means(graph: fx.Graph, modules: dict[str, Any], unique: Callable[[str], str],
                    origins: dict[str, Origin]) -> None:
    """Global averages as Inductor's generated code sums them (`RasterMean`)."""
    for node in list(graph.nodes):
        keepdim = _global_mean(node)
        value = node.args[0] if node.args else None
        if keepdim is None or not isinstance(value, fx.Node) or \
                len(getattr(node.meta.get("val"), "shape", ())) != (4 if keepdim else 2):
            continue  # not a global average of a batch of [C, H, W] values
        name = unique(f"mean_{node.name}")
        modules[name] = RasterMean(keepdim)
        origins[name] = _stand_in(node)
        _replace(graph, node, name, (value,))


def read_pt2e(model: Any, calibration_data: Any, batch_size: int, device: torch.device | str,
              inductor: bool = False) -> Deployed:
    """A converted PT2E GraphModule in the engine's form. `model` is not modified: the reader rewrites a copy of its
    graph into a new GraphModule (which, unlike a converted PT2E model, accepts `.eval()`).

    `inductor`: as x86 Inductor compiles it (``torch.compile`` with ``torch._inductor.config.freezing``), where each
    conv/linear is oneDNN's int8 kernel with its own float32 steps (`Scaling.INDUCTOR`, the zero point added before
    rounding) and a residual add after a convolution is that convolution's sum post-op (`KernelSum`)."""
    scaling = Scaling.INDUCTOR if inductor else Scaling.COMBINED
    ops = _ops()
    graph = copy.deepcopy(model.graph)
    modules: dict[str, Any] = {}
    layers: dict[str, DeployedLayer] = {}
    notes: list[str] = []
    used: set[str] = set()

    def unique(name: str) -> str:
        base, k = name, 1
        while name in used or any(u.startswith(f"{name}.") or name.startswith(f"{u}.") for u in used):
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        return name

    # each layer's input grid, and the sums Inductor fuses into a layer, read before the rewrite below replaces
    # dequantize nodes
    input_grids: dict[fx.Node, tuple[float, int, int, int, bool]] = {}
    sums: dict[fx.Node, tuple[fx.Node, float, fx.Node | None, fx.Node]] = {}
    float_layers: list[fx.Node] = []
    # where each part of the view comes from in the graph (`graph_agreement`): the copy's nodes keep their names
    origins: dict[str, Origin] = {}
    given: dict[fx.Node, str] = {}
    copied = set(graph.nodes)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in ops["layers"]:
            fused = _fused_sum(node, ops) if inductor else None
            if fused is not None:
                sums[node] = fused
            source = node.args[0]
            if not isinstance(source, fx.Node) or source.target != ops["dequantize"]:
                float_layers.append(node)  # the quantizer left it in float: it stays so, outside the fault sites
                continue
            input_grids[node] = _grid(source)
            given[node] = source.name  # before a layer's rewrite hands its dequantize's users its own call

    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            graph.erase_node(node)  # export's input-shape guard: a check, not part of the function
            continue
        kind = ops["layers"].get(node.target) if node.op == "call_function" else None
        if kind is None or node not in input_grids:
            continue
        args = tuple(node.args)
        if node.kwargs:
            raise _error(node, "has keyword arguments the reader does not read")
        source, weight_node = args[0], args[1]
        bias = _constant(model, args[2]) if len(args) > 2 else None
        codes, scales, weight = _weight(model, weight_node, node, ops)
        in_scale, in_zero, in_low, in_high, in_signed = input_grids[node]
        name = unique(_module_name(node))
        modules[name] = _float_twin(kind, args, weight, bias)
        # the layer's output codes: its result quantized directly, or after a ReLU
        relu = _single_user(node)
        quant = relu if relu is not None and relu.target == ops["quantize"] else None
        fused_relu = False
        if quant is None and relu is not None and str(relu.target) in _RELUS and not relu.kwargs:
            after = _single_user(relu)
            if after is not None and after.target == ops["quantize"]:
                quant, fused_relu = after, True
        with graph.inserting_before(node):
            call = graph.call_module(name, (source,))
        call.meta = dict(node.meta)
        fused = sums.get(node) if quant is None else None
        if fused is not None:  # Inductor's convolution with the sum post-op: the sum re-grids the float result
            add, other_scale, sum_relu, sum_quant = fused
            sum_scale, sum_zero, sum_low, sum_high, _ = _grid(sum_quant)
            sum_name = unique(f"sum_{add.name}")
            modules[sum_name] = KernelSum(other_scale, sum_scale, sum_zero, sum_low, sum_high, sum_relu is not None)
            origins[sum_name] = Origin("", sum_quant.name, sum_quant.name, (sum_scale, sum_zero), 0)  # a stand-in
            other = next(a for a in add.args if a is not node)  # the dequantize, or what replaced it by now
            with graph.inserting_before(add):
                summed = graph.call_module(sum_name, (call, other))
            summed.meta = dict(add.meta)
            for dq in _dequantize_users(sum_quant, ops):
                dq.replace_all_uses_with(summed)
                graph.erase_node(dq)
            for erased in (sum_quant, sum_relu, add):
                if erased is not None:
                    graph.erase_node(erased)
        if quant is None:  # a float result (it feeds a residual add, or is the logits): no output codes
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            if in_low != _CODE_DTYPES[torch.int8 if in_signed else torch.uint8][1]:
                raise _error(node, f"has input codes from {in_low}: the engine's layers hold full-range uint8/int8 "
                                   "codes")
            origins[name] = Origin(given[node], node.name, node.name, None, codes[0].numel(), node.name)
            layers[name] = DeployedLayer(codes, scales, in_scale, in_zero, None, 0,
                                         bias=None if bias is None else bias.detach().float().clone(),
                                         bias_mode=BiasMode.FLOAT, input_signed=in_signed, scaling=scaling)
            notes.append(f"layer {name!r}: the PT2E graph keeps its result in float (it feeds "
                         f"{', '.join(u.name for u in call.users) or 'nothing'}): integer accumulator, no output "
                         "codes, so faults reach its input, weights and accumulator (sites input, weight, acc, "
                         "qparams) but no act site")
            continue
        act_scale, act_zero, act_low, act_high, act_signed = _grid(quant)
        for what, (low, high, signed) in {"input": (in_low, in_high, in_signed),
                                          "output": (act_low, act_high, act_signed)}.items():
            if (low, high) != _CODE_DTYPES[torch.int8 if signed else torch.uint8][1:]:
                raise _error(node, f"has {what} codes in [{low}, {high}]: the engine's layers hold full-range "
                                   "uint8/int8 codes")
        before = quant.args[0]
        assert isinstance(before, fx.Node)
        origins[name] = Origin(given[node], quant.name, before.name, (act_scale, act_zero), codes[0].numel(),
                               node.name)
        layers[name] = DeployedLayer(codes, scales, in_scale, in_zero, act_scale, act_zero,
                                     bias=None if bias is None else bias.detach().float().clone(),
                                     bias_mode=BiasMode.FLOAT, input_signed=in_signed, act_signed=act_signed,
                                     relu=fused_relu, zero_point_before_rounding=inductor, scaling=scaling)
        for dq in _dequantize_users(quant, ops):  # the layer's own output codes: the engine produces them
            dq.replace_all_uses_with(call)
            graph.erase_node(dq)
        graph.erase_node(quant)
        if fused_relu:
            assert relu is not None
            graph.erase_node(relu)
        graph.erase_node(node)

    zero_first = _inductor_post_ops(graph, layers, modules, unique, ops, origins) if inductor else set()
    # every other quantize -> dequantize pair on an activation: the graph re-grids a float value
    for node in list(graph.nodes):
        if node.target != ops["quantize"]:
            continue
        scale, zero, low, high, _ = _grid(node)
        name = unique(f"requantize_{node.args[0].name}" if isinstance(node.args[0], fx.Node) else "requantize")
        modules[name] = Requantize(scale, zero, low, high, divide=False, zero_first=node in zero_first)
        value = node.args[0]
        if isinstance(value, fx.Node) and value in copied:
            origins[name] = Origin(value.name, node.name, value.name, (scale, zero), 0)
        else:  # of a value a rewrite for Inductor computes (a post-op): a stand-in, its input not the graph's node
            origins[name] = Origin("", node.name, node.name, (scale, zero), 0)
        dequantizes = _dequantize_users(node, ops)
        with graph.inserting_before(node):
            call = graph.call_module(name, (node.args[0],))
        for dq in dequantizes:
            dq.replace_all_uses_with(call)
            graph.erase_node(dq)
        graph.erase_node(node)
    for node in float_layers:  # a module of its own, in float, so that the coverage names it
        stored = node.args[1] if len(node.args) > 1 else None
        if isinstance(stored, fx.Node) and stored.target in (ops["dequantize"], ops["dequantize_channel"]):
            weight = _weight(model, stored, node, ops)[2]  # weight-only int8: the graph's float weight
        else:
            weight = _constant(model, stored)
        bias = _constant(model, node.args[2]) if len(node.args) > 2 else None
        name = unique(_module_name(node))
        kind = ops["layers"][node.target]
        op = str(node.target).split(".")[-2]
        notes.append(f"layer {name!r} ({op}): the PT2E graph runs it in float on an unquantized input; it stays in "
                     "float, outside the fault sites (the coverage counts its MACs as uncovered)")
        if not isinstance(weight, torch.Tensor) or not (bias is None or isinstance(bias, torch.Tensor)) or node.kwargs:
            continue  # a weight computed in the graph: the call stays as it is
        modules[name] = _float_twin(kind, tuple(node.args), weight.float(), bias)
        origins[name] = _stand_in(node)
        with graph.inserting_before(node):
            call = graph.call_module(name, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    for node in reversed(list(graph.nodes)):  # the weights' dequantize nodes and constants the layers replaced
        if not node.users and (node.op == "get_attr" or _is_quantized_decomposed(node)):
            graph.erase_node(node)

    if inductor:
        _inductor_batch_norms(graph, model, modules, unique, origins)
        _inductor_means(graph, modules, unique, origins)
    _in_graph_layout(graph, set(layers), modules)
    for node in graph.nodes:
        if _is_quantized_decomposed(node) or (node.op == "call_function" and any(
                space in str(node.target) for space in ("quantized.", "onednn.", "quantized_decomposed"))):
            raise _error(node, "is a quantized operation the reader does not reproduce: supported are aten "
                               "conv1d/2d/3d and linear on dequantized int8 weights and activations, quantize -> "
                               "dequantize pairs of activations, and float operations between them")
        if node.op == "get_attr" and str(node.target) not in modules:
            value = _attr(model, node)
            if isinstance(value, torch.Tensor) and not value.is_floating_point():
                raise _error(node, f"is a {value.dtype} constant used other than as a conv/linear weight")
            modules[str(node.target)] = copy.deepcopy(value)
        elif node.op == "call_module" and str(node.target) not in modules:
            modules[str(node.target)] = copy.deepcopy(_attr(model, node))
    graph.lint()
    module = fx.GraphModule(modules, graph, class_name="PT2EDeployed").to(device)
    fixed = _fixed_batch(graph)
    if fixed is not None:
        size, declared = fixed
        notes.append(check_fixed_batch(
            FORMAT, size, f"inputs {declared}, as torch.export.export specialized them", module, calibration_data,
            runtime=f"the exported program accepts {size} image(s) per call",
            fix="export it with a dynamic batch dimension, torch.export.export(model, (x,), dynamic_shapes=({0: "
                "torch.export.Dim('batch')},)), before prepare_pt2e and convert_pt2e"))
    return Deployed(module, layers, FORMAT, float_module=None, origins=origins, notes=[
        "the float baseline is the float function of the int8 graph (dequantized weights, unquantized "
        "activations), not the float model it was converted from", *notes])


def _fixed_batch(graph: fx.Graph) -> tuple[int, str] | None:
    """The batch size every tensor input of an exported graph was specialized to (exported without
    `dynamic_shapes`: the graph's views may hold it), with their shapes; None where dim 0 is symbolic."""
    shapes = {node.name: node.meta["val"].shape for node in graph.nodes if node.op == "placeholder"
              and isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].dim() > 0}
    sizes = [shape[0] for shape in shapes.values()]
    if not sizes or not all(type(size) is int for size in sizes) or len(set(sizes)) != 1:
        return None
    return sizes[0], ", ".join(f"{name!r} {list(shape)}" for name, shape in shapes.items())
