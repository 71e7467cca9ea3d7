"""Quantize any PyTorch model into a fault-injectable *view*, leaving the user's module untouched.

What is quantized, and where (see also docs/architecture.md):

- The view works on a private deep copy of the model in eval mode (and a second, float copy for the float
  baseline); the user's parameters, buffers, hooks and training flag are never touched.
- BatchNorm that directly follows a conv/linear (found by torch.fx tracing) is folded into it first, as an
  accelerator does. A model that fx cannot trace keeps its BatchNorm in float after the quantized layer
  (`QuantizedModel.bn_kept` lists them, `fold_error` says why).
- Every Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear module becomes a quantized layer that computes in integers,
  as the accelerator:
  * input: the tensor entering the layer is quantized to symmetric signed int-N codes with a calibrated scale
    (the codes the accelerator reads from its activation buffer: fault site ``input``);
  * weights: symmetric signed int-N codes, per output channel or per tensor (fault site ``weight``);
  * bias: int32 codes at the accumulator scale (weight scale x input scale), added to the accumulator by the
    engine after the conv/linear (`QuantLayer.bias_codes`; the module itself has no bias);
  * accumulator: the conv/linear of input codes with weight codes, an exact integer (fault site ``acc``);
  * output: the accumulator requantized (x weight scale x input scale / act scale, rounded, saturated) to
    symmetric signed int-N codes, handed on as code x act scale (fault site ``act``).
  The layer's module holds integer codes as float32, so its sums are exact (independent of thread count and
  batch composition) while every partial sum stays below 2^24: guaranteed for int8 with fan-in <= 1040. On a
  CUDA device, TF32 is switched off during the quantized forward (`exact_float32`).
- A layer whose input is another quantized layer's output passed only through ReLU, max-pooling or reshapes
  reads those codes as they are (same scale), as an accelerator reads its output buffer. Where such readers are
  the producer's only users, the producer hands its codes on without dequantizing them
  (`QuantLayer.hands_on_codes`; `dequantize_output`/`dequantize_input` give values for hooks of your own).
- Everything between quantized layers stays as the model wrote it and runs in float on dequantized values: ReLU
  (module or functional), pooling, residual additions, concatenations, kept BatchNorm. A residual addition
  therefore sums two dequantized tensors, and the next layer's input quantization re-grids the result. (Between a
  producer that hands on codes and its readers, ReLU, max-pooling and reshapes run on the codes: same result.)
- A deployed int8 model (torch.ao eager or FX, torchao PT2E, ONNX QDQ) keeps its own codes, scales, zero points
  and arithmetic (see `deployed.py` and its readers).
- Codes are symmetric with the restricted range [-(2^(N-1)-1), 2^(N-1)-1]; a fault may produce -2^(N-1).
- Dequantized value == code x scale exactly, in float32.
- Scales come from calibration over the data given: torch.ao observers (MinMax / PerChannelMinMax) for
  ``calibration="max"``; the given percentile of |x| for ``calibration="percentile"``, whose clip rate (the share
  of calibration values beyond the quantization range) is then reported per layer.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver
from torch.overrides import TorchFunctionMode

from .data import Batch, DataError, Inputs, call_model, check_stable, iter_batches
from .decompose import Einsum, FusedAttentionOff, MatMul, decompose, fix_packed_steps
from .deployed import (
    ONEDNN_STEPS,
    BiasMode,
    Deployed,
    DeployedLayer,
    Scaling,
    detect,
    float32_multiplier,
    float_function,
    read,
)
from .functional import FunctionalPlan, discover, quantized_forward
from .graph import CodeLinks, code_links, fold_batchnorm, in_place_chains, trace_disagreement
from .identity import private_copy, state_checksum
from .kernels import KERNELS
from .merged_batch import unmerge_batches
from .qmodel import (
    CONTROL_FLOW,
    ControlFlowError,
    QuantizedModel,
    QuantLayer,
    UnsupportedModelError,
    exact_float32,
    output_channel_groups,
    positional_input,
    user_hooks,
)
from .spec import MAX_WEIGHT_ACT_BITS, acc_bits_for

__all__ = ["NoQuantizableLayerError", "QuantLayer", "QuantizedModel", "UnsupportedModelError", "exact_float32",
           "quantize", "state_checksum"]

QUANTIZABLE: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                             nn.ConvTranspose3d, nn.Linear, MatMul)
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
ACT_GRANULARITIES = ("per_tensor",)
CALIBRATIONS = ("max", "percentile")
MEMORY_FORMATS = ("auto", "channels_last", "preserve")
ACT_SCHEMES = ("symmetric", "asymmetric")
_PERCENTILE_SAMPLES_PER_BATCH = 1 << 16


class NoQuantizableLayerError(ValueError):
    pass


def _tensors(x: Any) -> tuple[torch.Tensor, ...]:
    return x.tensors if isinstance(x, Inputs) else (x,)


def _inputs_text(example: Any) -> str:
    """'float32 [2, 3, 32, 32]', or one such per named input."""
    if isinstance(example, Inputs):
        names = example.names or tuple(str(i) for i in range(len(example.tensors)))
        return ", ".join(f"{name}: {t.dtype} {list(t.shape)}".replace("torch.", "")
                         for name, t in zip(names, example.tensors))
    return f"{example.dtype} {list(example.shape)}".replace("torch.", "")


def _batch_guard_hint(work: nn.Module, error: Exception) -> str:
    """Why a graph from torch.export may fail on two images: it was exported for one batch size."""
    if isinstance(work, torch.fx.GraphModule) and "Guard failed" in str(error) and ".size()[0] ==" in str(error):
        return (". The graph was exported for one batch size, and a campaign runs any number of images: export it "
                "with a dynamic batch dimension, torch.export.export(model, (x,), dynamic_shapes=({0: "
                "torch.export.Dim('batch')},))")
    return ""


def _dtype_hint(work: nn.Module, example: Any) -> str:
    """Why a forward may fail on its inputs' dtype: inputs in a floating dtype the parameters are not in."""
    weights = {p.dtype for p in work.parameters() if p.is_floating_point()}
    inputs = {t.dtype for t in _tensors(example) if t.is_floating_point()}
    if len(weights) == 1 and inputs and inputs != weights:
        given = ", ".join(map(str, sorted(inputs, key=str)))
        return (f". Its parameters are {next(iter(weights))} and the inputs {given}: "
                "the engine quantizes float32 models, so pass a float32 model and float32 inputs (model.float(), "
                "x.float())").replace("torch.", "")
    return ""


def refuse_input_writes(work: nn.Module, example: Any, source_name: str) -> None:
    """Refuse a model whose forward writes its input tensors in place (``x.sub_(mean)``, ``x.data.mul_(2)``),
    found by one forward of the private copy on a copy of two calibration images. A campaign runs the same images
    many times (calibration, golden run, every trial): each run would see the previous one's writes, and the
    user's own data would be changed. In a training loop each batch is fresh, so such a forward goes unnoticed
    there."""
    probe = Inputs(tuple(t.clone() for t in example.tensors), example.names) if isinstance(example, Inputs) else \
        example.clone()
    versions = [t._version for t in _tensors(probe)]
    try:
        with torch.no_grad(), FusedAttentionOff():
            call_model(work, probe)
    except (UnsupportedModelError, DataError):
        raise
    except Exception as error:  # the model's own error, on the user's own inputs: say where it came from
        raise UnsupportedModelError(
            f"{source_name} fails in float on two calibration images ({_inputs_text(example)}), before anything is "
            f"quantized: {type(error).__name__}: {error}{_dtype_hint(work, example)}{_batch_guard_hint(work, error)}"
        ) from error
    for index, (before, after, version) in enumerate(zip(_tensors(example), _tensors(probe), versions)):
        if after._version == version and torch.equal(before, after):
            continue
        which = "its input" if not isinstance(example, Inputs) else \
            f"its input {example.names[index]!r}" if example.names else f"its input tensor {index}"
        raise UnsupportedModelError(
            f"{source_name}'s forward writes {which} in place (an in-place op on the tensor it was given, such as "
            "x.sub_(mean), x.clamp_(0, 1) or x.data.mul_(2)): a campaign runs the same images many times, so each "
            "run would see the previous run's writes, and your data would be changed. Compute on a new tensor "
            "(x = x - mean), or gate a wrapper module whose forward returns model(x.clone())")


def quantize(
    model: nn.Module,
    calibration_data: Any,
    *,
    bits: int = 8,
    weight_granularity: str = "per_channel",
    act_granularity: str = "per_tensor",
    calibration: str = "max",
    percentile: float = 99.99,
    fold_bn: bool = True,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    memory_format: str = "auto",
    pass_codes: bool = True,
    act_scheme: str = "symmetric",
    kernel: str = "auto",
) -> QuantizedModel:
    """Calibrate scales over `calibration_data` and return a quantized view of `model` (which is not modified).

    `calibration_data` may be a tensor of inputs, an (X, y) pair, a DataLoader or a Dataset.
    `memory_format`: the layout the view computes in. "channels_last": Conv2d (Conv3d) layers write their input
    codes channels-last, so their outputs and what follows them are channels-last too (oneDNN's convolutions run
    ~20% faster so on a CPU: ResNet56, batch 128, 2 threads); "preserve": tensors keep the layout the model gives
    them; "auto" (default): channels-last on the CPU, preserve elsewhere. No result depends on it (the sums in a
    quantized layer are exact), and fault positions always count elements in logical, row-major (NCHW) order.
    `pass_codes`: a layer whose output only feeds layers that read its codes hands the codes on as they are
    (saves three elementwise passes per such pair); False makes every layer hand on values (code x scale), for
    forward hooks of your own added to the view that expect values (hooks already on the model run after the
    engine's, on values, whatever this says). No result depends on it.
    `act_scheme`: "symmetric" (default): signed int-N activation codes with zero point 0; "asymmetric": unsigned
    codes q in [0, 2^N - 1] with a zero point, meaning (q - zero point) x scale (torch.ao's quint8, onnxruntime's
    uint8), so a fault on the top bit moves a value by +-2^(N-1) x scale with no sign extension. The two operands
    of a matmul of activations stay symmetric. A deployed int8 model (torch.ao, PT2E, ONNX; see `deployed.py`)
    keeps its own scheme, codes and arithmetic whatever is asked here.
    `kernel`: what computes a Conv2d/Linear layer's accumulator. "auto" (default): an int8 kernel (oneDNN's int8
    convolution, ``torch._int_mm``; see `kernels`) for each layer whose codes fit int8/uint8, where this machine's
    build computes it exactly (checked once per process), else the float-emulated conv/linear; "int8": the same, but
    an error where this machine has no exact int8 kernel; "emulated": always the float-emulated path. No result
    depends on it: both give the same integer accumulator, so trials are bit-identical.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= MAX_WEIGHT_ACT_BITS:
        raise ValueError(f"bits={bits!r} must be an integer in [2, {MAX_WEIGHT_ACT_BITS}]")
    _check_choice("weight_granularity", weight_granularity, WEIGHT_GRANULARITIES)
    _check_choice("act_granularity", act_granularity, ACT_GRANULARITIES)
    _check_choice("calibration", calibration, CALIBRATIONS)
    _check_choice("memory_format", memory_format, MEMORY_FORMATS)
    _check_choice("act_scheme", act_scheme, ACT_SCHEMES)
    _check_choice("kernel", kernel, KERNELS)
    if not isinstance(pass_codes, bool):
        raise ValueError(f"pass_codes={pass_codes!r} must be True or False")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile!r} must be in (50, 100]")
    compiled = ["<model>"] if _is_compiled(model) else []
    given, model = model, getattr(model, "_orig_mod", model) if compiled else model
    source = detect(model)
    deployed: Deployed | None = None
    inductor = source == "pt2e" and bool(compiled) and _inductor_freezes()
    if source is not None:  # a deployed int8 model: its own codes, scales and arithmetic (see deployed.py)
        if bits != 8:
            raise ValueError(f"bits={bits}: a deployed {source} model holds 8-bit codes; use bits=8")
        deployed = read(model, source, calibration_data, batch_size, device or "cpu", inductor=inductor)
        if source == "pt2e" and compiled and not inductor:
            deployed.notes.insert(0, "compiled without torch._inductor.config.freezing, Inductor runs the graph's "
                                     "float convolutions (not oneDNN's int8 kernels): the engine reproduces the "
                                     "graph's arithmetic")
        if inductor:
            compiled = []  # the view computes what the compiled model computes, not the graph it compiled
        source_name = f"{type(model).__qualname__} ({source})"
        work = deployed.module.eval()
        device = device or "cpu"
        fold_bn = False
    elif not isinstance(model, nn.Module):
        refuse_non_model(model)
    else:
        source_name = type(model).__qualname__
        refuse_ungateable(model, source_name)
        work = private_copy(model).eval()
        compiled += _uncompile(work)
    for p in work.parameters():
        p.requires_grad_(False)
    # hooks of the user's anywhere in the model (copied with it) may keep a layer's output for later
    user_hooked = any(any(user_hooks(m)) for m in work.modules())
    if device is None:
        first = next(work.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    work.to(device)
    ao_layers: dict[str, DeployedLayer] = deployed.layers if deployed is not None else {}
    float_module = float_function(deployed) if deployed is not None else private_copy(work)
    float_module.to(device)
    decomposed = [] if ao_layers else decompose(work)
    first_batch = next(iter_batches(calibration_data, batch_size), None)
    if first_batch is None:
        raise ValueError("calibration_data is empty: give at least one batch of inputs")
    check_stable(calibration_data, *first_batch, "calibration_data")  # read again, as calibration will
    if deployed is not None:  # a layer an exporter ran on the batch merged with the tokens, viewed per image
        deployed.notes.extend(unmerge_batches(work, deployed.layers, first_batch[0].to(device), call_model))
    # BN folding, code links, in-place chains and late start read the traced graph: it must be the forward's, as the
    # view runs it (torch's fused attention fast path off)
    example = first_batch[0][:2].to(device)
    if not ao_layers:
        refuse_input_writes(work, example, source_name)

    def run_example(module: nn.Module) -> Any:
        with FusedAttentionOff():
            return call_model(module, example)

    trace_error = trace_disagreement(work, run_example)
    folded, bn_kept, fold_error = fold_batchnorm(work, trace_error) if fold_bn else ([], [], None)

    candidates: dict[str, nn.Module] = {name: m for name, m in work.named_modules()
                                        if isinstance(m, QUANTIZABLE) and (not ao_layers or name in ao_layers)}
    for module in candidates.values():
        _plain_weight(module)
        module.register_forward_pre_hook(positional_input, prepend=True, with_kwargs=True)
    plan = FunctionalPlan()
    not_layers: dict[str, list[str]] = {}
    if not ao_layers:  # functional multiply-accumulates: one layer per call, by call order
        # Only modules that run are layers: a module whose weight the model uses functionally (as
        # nn.MultiheadAttention does with its out_proj) is that functional call's layer instead.
        # A module whose weight or bias something else reads (which would see codes) is left out the same way:
        # its calls become functional layers with their own copy of the weight.
        plan, ran, not_layers = discover(work, first_batch[0].to(device), candidates)
        for name, module in candidates.items():  # a branch the first batch did not take would run in float
            if name not in ran and name not in not_layers:  # (a module left out ran: its calls are layers)
                module.register_forward_pre_hook(_refuse_unseen(name))
        candidates = {name: m for name, m in candidates.items() if name in ran and name not in not_layers}
        candidates.update(plan.layers())
    if not candidates:
        kinds = sorted({type(m).__qualname__ for m in work.modules()} - {type(work).__qualname__})
        reasons = sorted({reason for found in not_layers.values() for reason in found})
        left_out = f"; left out {', '.join(sorted(not_layers))}, because {'; '.join(reasons)}" if not_layers else ""
        raise NoQuantizableLayerError(
            f"{source_name} has no quantizable layer: looked for modules of type "
            f"{', '.join(t.__name__ for t in QUANTIZABLE)}, attention and recurrent modules, and functional "
            f"conv/linear/matmul/einsum/attention calls; found only: {', '.join(kinds) or 'no submodules'}{left_out}"
        )

    # a recurrent module fed packed batches runs the calibration data's longest sequence's steps in every pass
    view_notes = fix_packed_steps(work, (x.to(device) for x, _ in iter_batches(calibration_data, batch_size)),
                                  functools.partial(call_model, work), first_ran=not ao_layers)
    # asymmetric: unsigned codes with a zero point, except the two operands of a matmul of activations
    affine = {name: act_scheme == "asymmetric" and not isinstance(m, MatMul) for name, m in candidates.items()}
    stats_in = {name: _ActStats(calibration, bits, affine[name]) for name in candidates}
    stats_in2 = {name: _ActStats(calibration, bits) for name, m in candidates.items() if isinstance(m, MatMul)}
    stats_out = {name: _ActStats(calibration, bits, affine[name]) for name in candidates}
    for name, sibling in plan.shared_calibration().items():  # e.g. a recurrent cell's first step on a zero state
        stats_in[name], stats_out[name] = stats_in[sibling], stats_out[sibling]
    shapes: dict[str, list[tuple[int, ...]]] = {}  # per image: input, output (and a matmul's second input)
    calls: dict[str, int] = {}  # this batch
    calls_per_batch: dict[str, int] = {}
    order: list[str] = []
    batch = [0]

    def observe(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            tensors = [*args[:2 if name in stats_in2 else 1], out]
            if not all(isinstance(t, torch.Tensor) for t in tensors):
                return
            wrong = [t.dtype for t in tensors if t.dtype != torch.float32]
            if wrong:  # the view computes in float32 on codes: another dtype would meet float32 codes here
                raise UnsupportedModelError(
                    f"layer {name!r} ({type(module).__qualname__}) computes on {wrong[0]} tensors: quantize works on "
                    "float32 models. Pass a float32 copy and float32 inputs (model.float(), x.float()), without "
                    "torch.autocast in the forward: the quantized layers compute on integer codes, so only the float "
                    "ops between them run in float32 rather than the model's dtype")
            seen = [tuple(t.shape[1:]) for t in args[:len(tensors) - 1]] + [tuple(out.shape[1:])]
            if name not in shapes:
                order.append(name)
                shapes[name] = seen
            if seen != shapes[name] or any(t.dim() == 0 or t.shape[0] != batch[0] for t in tensors):
                first = tensors[0].shape[0] if tensors[0].dim() else 0
                placing = (": changing one calibration image alone changed rows that are not its own, or none (a "
                           "deployed graph's layer is computed per image where its rows hold the images image by "
                           "image, row by row, or along its second dimension)" if ao_layers else "")
                hint = (f" (its first dimension is {first} = {first // batch[0]} x the batch of {batch[0]}: the model, "
                        "or the exporter that wrote it, merged the batch into another dimension, as Hugging Face's "
                        f"GPT-2 Conv1D does with the tokens{placing}; keep the batch a dimension of its own)"
                        if first and first != batch[0] and first % batch[0] == 0 else
                        " (another dimension comes first: an attention exported sequence first, as torch's "
                        f"nn.MultiheadAttention exports it, has [tokens, batch, width]{placing})"
                        if tensors[0].dim() > 1 and tensors[0].shape[1] == batch[0] else "")
                raise UnsupportedModelError(
                    f"layer {name!r} ({type(module).__qualname__}) ran on tensors shaped "
                    f"{[tuple(t.shape) for t in tensors]} where a batch of {batch[0]} gave "
                    f"{[(batch[0], *shape) for shape in shapes[name]]}: faults are placed per image, so every call "
                    f"of a layer needs the batch as its first dimension and one per-image shape{hint}")
            calls[name] = calls.get(name, 0) + 1
            stats_in[name].update(args[0])
            if name in stats_in2:
                stats_in2[name].update(args[1])
            stats_out[name].update(out)

        return hook

    handles = [m.register_forward_hook(observe(name)) for name, m in candidates.items()]
    calibration_weights = _weights_of(candidates)
    batches = 0
    try:
        with torch.no_grad():
            for x, _ in iter_batches(calibration_data, batch_size):
                batch[0] = len(x)
                with quantized_forward(plan, calibration_weights):  # one per forward pass: it counts the calls
                    call_model(work, x.to(device))
                if batches == 0:
                    calls_per_batch = dict(calls)
                elif calls != calls_per_batch:
                    name = next(n for n in {*calls, *calls_per_batch} if calls.get(n) != calls_per_batch.get(n))
                    raise ControlFlowError(
                        f"layer {name!r} ran {calls_per_batch.get(name, 0)} times in the first calibration batch and "
                        f"{calls.get(name, 0)} times in batch {batches + 1}: faults are placed per call, so every "
                        f"forward pass must run each layer equally often (pad sequences to one length); "
                        f"{CONTROL_FLOW}")
                calls.clear()
                batches += 1
    finally:
        for h in handles:
            h.remove()

    links = code_links(work, set(order)) if trace_error is None else CodeLinks()
    # Hooks of the user's (copied with the model): a forward hook may change a layer's output, a pre-hook its
    # input, so neither a hooked producer's nor a pre-hooked reader's values are known to lie on the producer's
    # grid, and the hooks must see values, not codes.
    hooked = {name for name in order if user_hooks(candidates[name])[1]}
    pre_hooked = {name for name in order if user_hooks(candidates[name])[0]}
    producers = {reader: producer for reader, producer in links.producers.items()
                 if producer not in hooked and reader not in pre_hooked}
    act_grids = {name: stats_out[name].grid(percentile) for name in order}
    top = (1 << bits) - 1
    layers: dict[str, QuantLayer] = {}
    for name in order:
        module = candidates[name]
        source = producers.get(name)
        if source and affine[source] != affine[name]:  # a matmul of activations reads symmetric codes only
            source = None
        (in_scale, in_zero), (act_scale, act_zero) = act_grids[source] if source else stats_in[name].grid(
            percentile), act_grids[name]
        ranges: dict[str, Any] = {}
        if affine[name]:  # unsigned codes q meaning (q - zero point) x scale
            ranges = {"input_range": (-in_zero, top - in_zero), "act_range": (-act_zero, top - act_zero),
                      "input_zero_point": in_zero, "act_zero_point": act_zero, "signed_activations": False}
        if name in ao_layers:
            ao = ao_layers[name]
            codes, w_scale, act_scale = ao.weight_codes, ao.weight_scale, ao.act_scale or 1.0
            in_scale = ao.input_scale
            upstream = ao_layers.get(source or "")
            if upstream is None or (upstream.act_scale, upstream.act_zero_point, upstream.act_signed) != (
                    ao.input_scale, ao.input_zero_point, ao.input_signed):
                source = None
            ranges = {"input_range": ao.input_range(), "act_range": ao.act_range(),
                      "input_zero_point": ao.input_zero_point, "act_zero_point": ao.act_zero_point,
                      "signed_activations": ao.act_signed, "signed_inputs": ao.input_signed,
                      "multiplier": (ao.weight_scale.float() if ao.scaling in ONEDNN_STEPS else
                                     float32_multiplier(ao.input_scale, ao.weight_scale, ao.act_scale,
                                                        inverse=ao.scaling is Scaling.QNNPACK)).to(device),
                      "step_scales": _onednn_steps(ao) if ao.scaling in ONEDNN_STEPS else None,
                      "float_output": ao.act_scale is None, "raw_output": ao.raw_output,
                      "zero_point_before_rounding": ao.zero_point_before_rounding}
        elif isinstance(module, MatMul):  # two activations: the second operand's scale stands in the weight's
            second = stats_in2[name].grid(percentile)[0]
            codes, w_scale = torch.zeros(0, dtype=torch.int32), torch.tensor([second], dtype=torch.float32)
            ranges = {"second_input_shape": shapes[name][1], "second_input_scale": second}
        else:
            assert isinstance(module.weight, torch.Tensor)
            codes, w_scale = _weight_codes(module.weight, bits, weight_granularity, output_channel_groups(module))
        w_scale = w_scale.to(device)
        layers[name] = QuantLayer(
            name=name,
            module_type=type(module).__qualname__,
            module=module,
            bits=bits,
            weight_codes=codes.to(device),
            weight_scale=w_scale,
            input_scale=in_scale,
            act_scale=act_scale,
            input_shape=shapes[name][0],
            output_shape=shapes[name][-1],
            channel_axis=-1 if isinstance(module, (nn.Linear, MatMul)) else getattr(module, "channel_axis", 0),
            input_source=source,
            calls=calls_per_batch[name],
            acc_bits=acc_bits_for(bits),
            **ranges,
        )

    for producer in links.codes_only if pass_codes else ():  # every use reads its codes: hand them on as they are
        readers = [layers[reader] for reader, source in links.producers.items() if source == producer]
        if not layers[producer].float_output and all(reader.input_source == producer for reader in readers) and \
                producer not in hooked:
            layers[producer].hands_on_codes = True
            for reader in readers:
                reader.reads_codes = True
    if not user_hooked and trace_error is None:  # the model's own ReLUs and sums that alone read a layer's output
        # run in place on it
        for name, chain in in_place_chains(work, set(order)).items():
            if layers[name].calls == 1:
                layers[name].in_place = chain
    if calibration == "percentile" and not ao_layers:
        _measure_clip_rates(work, layers, calibration_data, batch_size, device,
                            lambda: quantized_forward(plan, calibration_weights))
    _tie_weights(layers)
    with torch.no_grad():  # the copy now computes on integer codes: exact sums, whatever the thread count
        for layer in layers.values():
            # New parameters, not in-place copies: a module that shares the weight (tied embeddings) keeps floats.
            bias = getattr(layer.module, "bias", None)
            runtime = ao_layers.get(layer.name)
            bias_codes = None
            if runtime is None:
                bias_codes = None if bias is None else _bias_codes(layer, bias)
            elif runtime.bias is not None and runtime.bias_mode is BiasMode.INTEGER:  # the runtime's int32 codes
                bias_codes = _broadcast(layer, runtime.bias.to(device).double())
            elif runtime.bias is not None and runtime.scaling is Scaling.FBGEMM:  # on the float accumulator
                f32 = torch.float32
                layer.float_bias_before = _broadcast(layer, runtime.bias.to(device).float() / (
                    torch.tensor(runtime.input_scale, dtype=f32) * runtime.weight_scale.to(device, f32)))
            elif runtime.bias is not None and runtime.scaling in ONEDNN_STEPS:  # between the scale steps
                layer.float_bias_codes = _broadcast(layer, runtime.bias.to(device).float())
            elif runtime.bias is not None:  # added unrounded after scaling, outside the accumulator
                bias_values = runtime.bias.to(device).float()
                layer.float_bias_codes = _broadcast(layer, bias_values if layer.float_output else bias_values
                                                    / torch.tensor(layer.act_scale, dtype=torch.float32))
            dtype = layer.compute_dtype = _exact_dtype(layer, bias_codes)
            if bias_codes is not None:
                layer.bias_codes = bias_codes.to(dtype)
            if bias is not None:
                setattr(layer.module, "bias", None)  # noqa: B010 - the engine adds the bias after the accumulator
            if not isinstance(layer.module, MatMul):
                # row-major, whatever the model's layout (e.g. channels-last): weight faults index codes row-major
                layer.module.weight = nn.Parameter(layer.weight_codes.to(dtype).contiguous(), requires_grad=False)

    config = {
        "bits": bits,
        "weight_granularity": weight_granularity,
        "act_granularity": act_granularity,
        "calibration": calibration,
        "percentile": percentile if calibration == "percentile" else None,
        "fold_bn": fold_bn,
        "memory_format": memory_format,
        "pass_codes": pass_codes,
        "act_scheme": act_scheme if deployed is None else None,
        "source": deployed.source if deployed is not None else "calibrated",
        "deployed_notes": list(deployed.notes) if deployed is not None else [],
        # what a report should say about how the view computes the model (e.g. a recurrent module's packed batches)
        "notes": view_notes,
        "decomposed": decomposed,
        # modules whose weight or bias something else reads (name -> what): their calls are functional layers
        "not_layers": not_layers,
        "kernel": kernel,
        # torch.compile wrappers the view left out: it runs the modules they compiled, eagerly, with its hooks
        "compiled": compiled,
        # the load checks that found the view computing otherwise than the deployed model (or could not tell):
        # a campaign refuses to judge such a view unless allow_inexact_view=True (`require_exact_view`)
        "view_mismatch": [],
    }
    qmodel = QuantizedModel(work, float_module, layers, config, folded, bn_kept, fold_error, source_name, plan,
                            trace_error=trace_error)
    _layout_that_runs(qmodel, example)
    if inductor:
        deployed_notes = config["deployed_notes"]
        assert isinstance(deployed_notes, list)
        agreement = compiled_agreement(given, qmodel, first_batch[0][:COMPILED_CHECK_IMAGES])
        deployed_notes.insert(0, agreement)
        if not agreement.endswith(COMPILED_EQUAL):  # said where a passing gate shows it too: pytest's warnings
            _mismatch(qmodel, agreement, CompiledMismatchWarning)
    if deployed is not None and deployed.origins:  # a PT2E graph: its float sums round on their own, so each part
        from .graph_agreement import graph_agreement  # is compared on the graph's own inputs (compiled: outputs
        # alone miss a part whose output does not reach them, a collapsed head)
        deployed_notes = config["deployed_notes"]
        assert isinstance(deployed_notes, list)
        note, parts_agree = graph_agreement(model, qmodel, first_batch[0][:FAULT_CHECK_IMAGES], deployed.origins)
        deployed_notes.insert(1 if inductor else 0, note)
        if not parts_agree:
            _mismatch(qmodel, note)
    raw = {name for name, layer in layers.items() if layer.raw_output}
    for module in work.modules():  # a module scaling a raw-output layer's accumulator reads its stored multiplier,
        scaled = getattr(module, "scales_layer", None)  # which qparams faults edit
        if isinstance(scaled, str) and scaled in raw:
            module.weight_scale = qmodel.stored_multiplier(scaled).reshape(-1)
    if raw:
        deployed_notes = config["deployed_notes"]
        assert isinstance(deployed_notes, list)
        assert deployed is not None  # raw-output layers come from a reader
        notes = dynamic_agreement(_runner(given, deployed.source), qmodel, first_batch[0][:DYNAMIC_CHECK_IMAGES],
                                  given if deployed.source == "onnx" else None)
        deployed_notes[0:0] = notes
        if not notes[0].endswith(COMPILED_EQUAL):
            _mismatch(qmodel, notes[0])
    elif deployed is not None and deployed.source in AO_STATIC_SOURCES:
        deployed_notes = config["deployed_notes"]
        assert isinstance(deployed_notes, list)
        note = ao_agreement(given, qmodel, first_batch[0][:COMPILED_CHECK_IMAGES])
        deployed_notes.insert(0, note)
        if not note.endswith(COMPILED_EQUAL):
            _mismatch(qmodel, note)
        elif isinstance(first_batch[0], Inputs):
            deployed_notes.insert(1, "not checked against the model under faults: the model takes several inputs; "
                                     "its arithmetic on faulty codes is known from the fault-free check and the "
                                     "kernels' probes only")
        else:  # equal fault-free: then under faults, where codes go further
            from .ao_faults import agreement_under_faults as ao_under_faults_agreement

            faulty_note, equal = ao_under_faults_agreement(given, qmodel, first_batch[0][:FAULT_CHECK_IMAGES])
            deployed_notes.insert(1, faulty_note)
            if equal is False:
                _mismatch(qmodel, faulty_note)
    elif deployed is not None and deployed.source == "onnx":
        deployed_notes = config["deployed_notes"]
        assert isinstance(deployed_notes, list)
        note = onnx_agreement(_runner(given, "onnx"), qmodel, first_batch[0][:COMPILED_CHECK_IMAGES], given)
        deployed_notes.insert(0, note)
        if not note.endswith(COMPILED_EQUAL):
            _mismatch(qmodel, note)
        elif not note.startswith("not checked"):  # equal fault-free: then under faults, where values go further
            from .onnx_faults import agreement_under_faults

            faulty_note, equal = agreement_under_faults(given, qmodel, first_batch[0][:FAULT_CHECK_IMAGES])
            if equal is False and deployed.inexact:  # the parts the notes name as rounding otherwise
                faulty_note += (f": expected where the notes name parts computed otherwise than onnxruntime "
                                f"({', '.join(deployed.inexact[:3])}{', ...' if len(deployed.inexact) > 3 else ''})")
            deployed_notes.insert(1, faulty_note)
            if equal is False:  # named or not, the view is measured computing otherwise than the runtime
                _mismatch(qmodel, faulty_note)
    return qmodel


COMPILED_CHECK_IMAGES = 64  # calibration images a compiled deployed model and its view are compared on
DYNAMIC_CHECK_IMAGES = 16  # calibration images a dynamically quantized model runs on one by one against its view
FAULT_CHECK_IMAGES = 16  # calibration images a static ONNX or torch.ao model and its view run on under act faults
LAYER_CHECK_IMAGES = 4  # of those, the images a torch.ao model's quantized layers are compared on (their codes kept)
COMPILED_EQUAL = "fault-free outputs equal bit for bit"


def _mismatch(qmodel: QuantizedModel, note: str, category: type[Warning] | None = None) -> None:
    """Say that the view computes otherwise than the deployed model (or could not be checked against it): a
    warning for whoever quantizes, and a record that campaigns read (`require_exact_view`)."""
    mismatches = qmodel.config["view_mismatch"]
    assert isinstance(mismatches, list)
    mismatches.append(note)
    warnings.warn(f"{qmodel.source_name}: {note}", category or DeployedMismatchWarning, stacklevel=3)


def require_exact_view(qmodel: QuantizedModel, allowed: bool) -> list[str]:
    """The load checks' notes on how the view of a deployed model computes otherwise than the model (or could not
    be checked against it), or EvaluationError when there are any and `allowed` is False: a verdict would be about
    the view, not about the model deployed."""
    from .evaluate import EvaluationError

    mismatches = [str(note) for note in qmodel.config.get("view_mismatch") or []]
    if mismatches and not allowed:
        raise EvaluationError(
            f"the view of the deployed model {qmodel.source_name} does not compute what the model computes: "
            f"{mismatches[0]}. A verdict would be about the view, not about the model deployed: make the model "
            "computable as its runtime computes it (what the note names), or pass allow_inexact_view=True to gate "
            "on the view knowingly (the report then marks the verdict)")
    return mismatches


class DeployedMismatchWarning(UserWarning):
    """The view of a deployed model does not compute what the deployed model computes (or could not be compared
    with it): faults would be injected into a model a little unlike the one deployed, so campaigns on that view are
    refused unless allow_inexact_view=True (`require_exact_view`)."""


class CompiledMismatchWarning(DeployedMismatchWarning):
    """`DeployedMismatchWarning` for a compiled (x86 Inductor) PT2E model."""


def _outputs_agree(theirs: list[torch.Tensor], ours: list[torch.Tensor]) -> bool:
    return len(theirs) == len(ours) and all(a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
                                            for a, b in zip(theirs, ours))


def _differ(theirs: list[torch.Tensor], ours: list[torch.Tensor]) -> str:
    """How far apart two lists of output tensors of equal shapes are, in words."""
    equal = sum(int((a.cpu() == b.cpu()).sum()) for a, b in zip(theirs, ours))
    total = sum(a.numel() for a in theirs)
    largest = max(float((a.cpu().double() - b.cpu().double()).abs().max()) for a, b in zip(theirs, ours) if a.numel())
    return f"{equal} of {total} values exactly equal, largest difference {largest:.6g}"


def _runner(model: Any, source: str | None) -> Any:
    """How to run the deployed model itself on a batch: onnxruntime for an ONNX model (None where it is not
    installed), else a private eval-mode copy of the module."""
    if source == "onnx":
        from .onnx_reader import onnxruntime_runner

        return onnxruntime_runner(model)
    return functools.partial(call_model, private_copy(model).eval())  # the module itself: its `args[0]`


def _one_at_a_time(run: Any, images: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    each = [[t for t in tree_leaves(run(images[i : i + 1])) if isinstance(t, torch.Tensor)] for i in range(len(images))]
    return [torch.cat(parts) for parts in zip(*each)]


def dynamic_agreement(run: Any, qmodel: QuantizedModel, images: Any, onnx_model: Any = None) -> list[str]:
    """Notes on the view of a dynamically quantized model against the model itself (`run`), both one image at a
    time (each call's input range is then that image's, as the view computes it): equal bit for bit, or how far
    apart; and each dynamic layer's float results on the first `LAYER_CHECK_IMAGES` (torch.ao's modules, or with
    `onnx_model` the graph's tensors onnxruntime computes). A second note where the view's float layers compute a
    batch a little otherwise than one image at a time (torch's float kernels, e.g. a convolution left in float,
    block their work by batch size)."""
    from torch.utils._pytree import tree_leaves

    count = len(images)
    where = f"checked against the model run one image at a time on {count} calibration images"
    if run is None:
        return [f"not {where}: onnxruntime is not installed; the engine's arithmetic is not known to be the "
                "runtime's"]
    with torch.no_grad():
        try:
            theirs = _one_at_a_time(run, images)
        except Exception as error:  # noqa: BLE001 - the model's own failure, reported, not raised
            return [f"could not run the dynamically quantized model on {count} calibration images one at a time to "
                    f"check the engine against it ({type(error).__name__}): its arithmetic is not known to be the "
                    "engine's"]
        ours = _one_at_a_time(qmodel, images)
        batch = [t for t in tree_leaves(qmodel(images)) if isinstance(t, torch.Tensor)]
    if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs, ours)):
        return [f"{where}: its outputs have other shapes than the view's"]
    if not _outputs_agree(theirs, ours):
        return [f"{where}: fault-free outputs differ ({_differ(theirs, ours)}): the runtime's dynamic layers compute "
                "otherwise than the engine reproduces them (torch.ao: fbgemm's dynamic linear, under "
                f"torch.backends.quantized.engine={torch.backends.quantized.engine!r} here; onnx: onnxruntime's CPU "
                "kernels, and its float ops, named in the notes, which the view runs on torch's float kernels)"]
    few = images[:LAYER_CHECK_IMAGES]
    unit = "layers" if onnx_model is not None else "modules"
    try:
        layers = _dynamic_layers(run, qmodel, few, onnx_model)
    except Exception as error:  # noqa: BLE001 - the outputs' check stands alone, said so
        reason = str(error).splitlines()[0][:200] if str(error) else ""
        layers, where = None, f"{where} (its dynamic {unit} not compared: {type(error).__name__}: {reason})"
    if layers is not None and layers.apart:
        return [f"{where}: fault-free outputs equal, but not layer by layer on {len(few)} of them: "
                f"{layers.describe()}: the model computes part of itself "
                "otherwise than the engine reproduces it, where its outputs do not show it"]
    notes = [f"{where}: {COMPILED_EQUAL}" if layers is None or not layers.compared else
             f"{where}: outputs of its {layers.compared} dynamic {unit} equal on {len(few)} of them, "
             f"and {COMPILED_EQUAL}"]
    if not _outputs_agree(ours, batch):
        notes.append(f"its float layers compute a batch of images a little otherwise than one image at a time (as "
                     f"torch's float kernels block their work by batch size): on {count} images, "
                     f"{_differ(ours, batch)}; trials run faulty images in batches of other sizes")
    return notes


def _dynamic_layers(run: Any, qmodel: QuantizedModel, images: Any, onnx_model: Any) -> Any:
    """A dynamic model against the view layer by layer, one image at a time (outputs alone miss a part whose output
    does not reach them): a torch.ao model (`run`, from `_runner`, calls the module) module by module
    (`layer_agreement.dynamic_layer_agreement`), an ONNX model by the tensors onnxruntime computes for its dynamic
    layers (`onnx_faults.onnx_dynamic_layer_agreement`); None when neither."""
    from .layer_agreement import dynamic_layer_agreement

    if onnx_model is not None:
        from .onnx_faults import onnx_dynamic_layer_agreement

        return onnx_dynamic_layer_agreement(onnx_model, qmodel, images)
    module = run.args[0] if isinstance(run, functools.partial) else None
    if not isinstance(module, nn.Module):
        return None
    return dynamic_layer_agreement(module, qmodel, lambda: _one_at_a_time(run, images),
                                   lambda: _one_at_a_time(qmodel, images))


def onnx_agreement(run: Any, qmodel: QuantizedModel, images: Any, model: Any = None) -> str:
    """The fault-free outputs of the view of a static ONNX model against onnxruntime's on `images`, in words: equal
    bit for bit, or how far apart (a layer onnxruntime leaves in float, or a float op, can round otherwise); with
    the ONNX `model`, where the outputs agree, each layer's stored codes too (`onnx_faults.onnx_layer_agreement`:
    outputs alone miss a part of the model whose output does not reach them)."""
    from torch.utils._pytree import tree_leaves

    count = len(images)
    if run is None:
        return (f"not checked against onnxruntime on {count} calibration images: onnxruntime is not installed; the "
                "engine's arithmetic is not known to be the runtime's")
    with torch.no_grad():
        try:
            theirs = run(images)
        except Exception as error:  # noqa: BLE001 - the runtime's own failure, reported, not raised
            return (f"could not run the model on onnxruntime on {count} calibration images to check the engine "
                    f"against it ({type(error).__name__}): its arithmetic is not known to be the engine's")
        ours = [t for t in tree_leaves(qmodel(images)) if isinstance(t, torch.Tensor)]
    where = f"checked against onnxruntime on {count} calibration images"
    if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs, ours)):
        return f"{where}: its outputs have other shapes than the view's"
    if _outputs_agree(theirs, ours):
        if model is None:
            return f"{where}: {COMPILED_EQUAL}"
        from .onnx_faults import onnx_layer_agreement

        try:
            layers = onnx_layer_agreement(model, qmodel, images)
        except Exception as error:  # noqa: BLE001 - the outputs' check stands alone, said so
            reason = str(error).splitlines()[0][:200] if str(error) else ""
            return f"{where} (its layers' codes not compared: {type(error).__name__}: {reason}): {COMPILED_EQUAL}"
        if layers.apart:
            return (f"{where}: fault-free outputs equal, but not layer by layer: {layers.describe()}: onnxruntime "
                    "computes part of this model otherwise than the engine reproduces it, where its outputs do not "
                    "show it")
        if not layers.compared:
            return f"{where}: {COMPILED_EQUAL}"
        return f"{where}: output codes of its {layers.compared} quantized layers equal, and {COMPILED_EQUAL}"
    return (f"{where}: fault-free outputs differ ({_differ(theirs, ours)}): onnxruntime computes part of this model "
            "otherwise than the engine reproduces it (its float ops and any layer it runs in float, named in the "
            "notes, round as torch's float kernels do, not as onnxruntime's)")


AO_STATIC_SOURCES = ("torch.ao eager", "torch.ao fx")


def _dequantized(output: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t.dequantize() if t.is_quantized else t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def ao_agreement(model: nn.Module, qmodel: QuantizedModel, images: Any) -> str:
    """The fault-free outputs of the view of a static torch.ao model (eager or FX) against the model's own, torch's
    quantized kernels under the quantized engine set now, on `images`, and every quantized layer's output codes on the
    first `LAYER_CHECK_IMAGES` (`layer_agreement`: outputs alone miss a part of the model whose output does not reach
    them), in words: equal bit for bit, or how far apart and the first module that computes otherwise (a float
    module the model runs on quantized tensors, such as a bilinear Upsample, whose quantized kernel rounds where the
    view computes in float)."""
    from .layer_agreement import layer_agreement

    count = len(images)
    reference = private_copy(model).eval()
    where = (f"checked against the model (torch's quantized kernels, engine "
             f"{torch.backends.quantized.engine!r}) on {count} calibration images")
    with torch.no_grad():
        try:
            theirs = _dequantized(call_model(reference, images))
        except Exception as error:  # noqa: BLE001 - the model's own failure, reported, not raised
            return (f"could not run the model on {count} calibration images to check the engine against it "
                    f"({type(error).__name__}): its arithmetic is not known to be the engine's")
        ours = _dequantized(qmodel(images))
    if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs, ours)):
        return f"{where}: its outputs have other shapes than the view's"
    few = images[:LAYER_CHECK_IMAGES]
    layers = layer_agreement(reference, qmodel, lambda: call_model(reference, few), lambda: qmodel(few))
    if not _outputs_agree(theirs, ours):
        apart = layers.describe()
        return (f"{where}: fault-free outputs differ ({_differ(theirs, ours)}): the model computes part of itself "
                f"otherwise than the engine reproduces it{f'; {apart}' if apart else ''}")
    if layers.apart:
        return (f"{where}: fault-free outputs equal, but not layer by layer on {len(few)} of them: "
                f"{layers.describe()}: the model computes part of itself otherwise than the engine reproduces it, "
                "where its outputs do not show it")
    return (f"{where}: output codes of its {layers.compared} quantized layers equal on {len(few)} of them, and "
            f"{COMPILED_EQUAL}")


def compiled_agreement(compiled: Any, qmodel: QuantizedModel, images: Any) -> str:
    """The fault-free outputs of the view against the compiled model's own on `images`, in words: equal bit for bit,
    or how far apart (the engine reproduces Inductor's lowering of the patterns it knows; this says whether it
    knew them all for this model)."""
    from torch.utils._pytree import tree_leaves

    count = len(images)
    with torch.no_grad():
        try:
            theirs = [t for t in tree_leaves(call_model(compiled, images)) if isinstance(t, torch.Tensor)]
        except Exception as error:  # noqa: BLE001 - the compiled model's own failure, reported, not raised
            return (f"could not run the compiled model on {count} calibration images to check the engine against "
                    f"it ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): the "
                    "engine's arithmetic is not known to be the compiled model's")
        ours = [t for t in tree_leaves(qmodel(images)) if isinstance(t, torch.Tensor)]
    if _outputs_agree(theirs, ours):
        return (f"checked against the compiled model (x86 Inductor, oneDNN's int8 kernels) on {count} calibration "
                f"images: {COMPILED_EQUAL}")
    if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs, ours)):
        return (f"checked against the compiled model on {count} calibration images: its outputs have other shapes "
                "than the view's; the engine's arithmetic is not known to be the compiled model's")
    return (f"checked against the compiled model (x86 Inductor) on {count} calibration images: fault-free outputs "
            f"differ ({_differ(theirs, ours)}): Inductor lowers "
            "part of this model in a way the engine does not reproduce bit for bit")


class _ViewsOfChannelsLast(TorchFunctionMode):
    """Notes a `.view` that fails on a tensor that is not row-major (and views a row-major copy, so the forward
    goes on)."""

    VIEWS = {torch._C.TensorBase.view, torch._C.TensorBase.view_as, torch.ops.aten.view.default}

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.VIEWS and args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            try:
                return func(*args, **kwargs)
            except RuntimeError:
                self.failed = True
                return func(args[0].contiguous(), *args[1:], **kwargs)
        return func(*args, **kwargs)


def _layout_that_runs(qmodel: QuantizedModel, images: Batch) -> None:
    """Under memory_format="auto" the view computes image layers channels-last, which the model's own code sees:
    a forward that views a conv's output (`x.view(x.size(0), -1)`, LeNet's `x.view(-1, 320)`) needs row-major
    memory and failed ('view size is not compatible with input tensor's size and stride'). Such a model keeps its
    own layout, and its notes say so. Any other failure of this forward is left to the checks that find it."""
    if qmodel.config["memory_format"] != "auto" or not qmodel.channels_last:
        return
    views = _ViewsOfChannelsLast()
    try:
        with views:
            qmodel(images)
    except Exception:  # noqa: BLE001 - not this check's to report (a branch on the batch size, ...)
        pass
    if not views.failed:
        return
    qmodel.config["memory_format"] = "preserve"
    qmodel.channels_last = False
    notes = qmodel.config["deployed_notes"]
    assert isinstance(notes, list)
    notes.append("computed in the model's own memory layout, not channels-last: its forward views a convolution's "
                 "output, which needs row-major memory; the same numbers, ~20% slower convolutions")


def _weights_of(modules: dict[str, nn.Module]) -> set[int]:
    return {id(w) for w in (getattr(m, "weight", None) for m in modules.values()) if isinstance(w, torch.Tensor)}


def _fan_in(layer: QuantLayer) -> int:
    """Products summed into one accumulator."""
    module = layer.module
    if isinstance(module, Einsum):
        inputs, _, output = module.equation.partition("->")
        sizes = dict(zip(inputs.split(",")[0], (0, *layer.input_shape)))  # index 0 is the batch
        sizes.update(zip(inputs.split(",")[-1], (0, *(layer.second_input_shape or ()))))
        if "." in module.equation or not output:
            return 1 << 30  # implicit or ellipsis: assume wide, compute in float64
        return math.prod(size for index, size in sizes.items() if index not in output and size)
    if isinstance(module, MatMul):
        return layer.input_shape[-1]
    assert isinstance(module.weight, torch.Tensor)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # [in, out / groups, k...]: one group's inputs
        return module.weight.shape[0] // module.groups * math.prod(module.weight.shape[2:])
    return module.weight[0].numel()


def _onednn_steps(layer: DeployedLayer) -> tuple[float, float]:
    """oneDNN's two scalar steps: the input scale, in float32 (torch.ao's kernels hand oneDNN its inverse, so it is
    1 / (1 / scale) there), and float32(1 / output scale) (Inductor's ops on a float result: none, i.e. 1)."""
    one, f32 = torch.tensor(1.0), torch.float32
    scale = torch.tensor(layer.input_scale, dtype=f32)
    if layer.scaling is Scaling.INDUCTOR:
        return float(scale), 1.0 if layer.act_scale is None else float(one / torch.tensor(layer.act_scale, dtype=f32))
    if layer.act_scale is None:
        raise ValueError("a torch.ao oneDNN layer without output codes: its steps are not known")
    return float(one / (one / scale)), float(one / torch.tensor(layer.act_scale, dtype=f32))


def _exact_dtype(layer: QuantLayer, bias_codes: torch.Tensor | None) -> torch.dtype:
    """float32 when no partial sum of the layer can reach 2^24 (codes and faulty codes of up to 2^(bits-1), or a
    torch.ao model's unsigned range, and the bias), else float64 (exact below 2^53, beyond any 48-bit
    accumulator)."""
    top = 1 << (layer.bits - 1)
    inputs = max(top, *(abs(v) for v in layer.input_range or (0,)))
    bias = 0 if bias_codes is None or not bias_codes.numel() else int(bias_codes.abs().max())
    return torch.float32 if _fan_in(layer) * inputs * top + bias < 1 << 24 else torch.float64


def _bias_codes(layer: QuantLayer, bias: torch.Tensor) -> torch.Tensor:
    """The bias as accumulator codes, shaped to broadcast over a batch of outputs; refused where it does not fit the
    accumulator (a saturated bias would silently change the layer)."""
    codes = torch.round(bias.double() / layer.acc_scale.double().reshape(bias.shape))
    limit = 2 ** (layer.acc_bits - 1) - 1
    if bool((codes.abs() > limit).any()) and layer.input_scale <= torch.finfo(torch.float32).eps:
        raise ValueError(f"layer {layer.name!r}: its input was zero on every calibration image, so its input scale is "
                         f"the observer's floor ({layer.input_scale:.3g}) and its bias needs codes beyond the "
                         f"{layer.acc_bits}-bit accumulator (|bias code| up to {float(codes.abs().max()):.3g}): "
                         "calibrate on images where that input is not all zero, or remove the dead layers before it")
    if bool((codes.abs() > limit).any()):
        raise ValueError(f"layer {layer.name!r}: its bias needs codes beyond the {layer.acc_bits}-bit accumulator "
                         f"at scale {float(layer.acc_scale.min()):.3g} (|bias code| up to "
                         f"{float(codes.abs().max()):.3g}): its weights or inputs are quantized too finely for "
                         "its bias; use fewer bits")
    return _broadcast(layer, codes)


def _broadcast(layer: QuantLayer, per_channel: torch.Tensor) -> torch.Tensor:
    """A per-output-channel tensor shaped to broadcast over a batch of the layer's outputs."""
    return per_channel.reshape(layer.channel_shape())


def _tie_weights(layers: dict[str, QuantLayer]) -> None:
    """Group the layers whose modules read one weight tensor of the model (``b.weight = a.weight``) and got the same
    codes: the accelerator stores that tensor once, so a fault in it reaches all of them (`QuantLayer.weight_group`).
    Called before the weights become codes, while the copies still share the model's tensor."""
    groups: dict[tuple[Any, ...], list[QuantLayer]] = {}
    for layer in layers.values():
        weight = getattr(layer.module, "weight", None)
        if isinstance(weight, torch.Tensor) and not isinstance(layer.module, MatMul) and layer.weight_codes.numel():
            # the same tensor (each module holds a Parameter object of its own on the same storage: `functional`)
            where = (weight.device, weight.untyped_storage().data_ptr(), weight.storage_offset(), weight.shape,
                     weight.stride())
            groups.setdefault(where, []).append(layer)
    for group in groups.values():
        tied = [layer for layer in group if layer.bits == group[0].bits
                and torch.equal(layer.weight_codes, group[0].weight_codes)]
        if len(tied) > 1:
            for layer in tied:
                layer.weight_group = tuple(t.name for t in tied)


def _refuse_unseen(name: str) -> Any:
    """A pre-hook for a module that did not run on the first calibration batch, so is not a layer: should it run
    later (another batch taking another branch), its MACs would run in float, out of every fault's reach."""

    def refuse(module: nn.Module, args: tuple[Any, ...]) -> None:
        raise ControlFlowError(f"module {name!r} ({type(module).__qualname__}) runs in this forward pass but did not "
                               f"run on the first calibration batch, so it is not quantized: {CONTROL_FLOW}")

    return refuse


def _inductor_freezes() -> bool:
    """Whether torch.compile freezes a model's weights now (``torch._inductor.config.freezing``), which is when x86
    Inductor lowers a PT2E model's conv/linear onto oneDNN's int8 kernels."""
    import torch._inductor.config as inductor_config

    return bool(inductor_config.freezing)


def _is_compiled(module: Any) -> bool:
    """A torch.compile wrapper (``OptimizedModule``), told without importing torch._dynamo (~1 s)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def _uncompile(work: nn.Module) -> list[str]:
    """Replace, in the private copy, every torch.compile wrapper by the module it compiled; their names. Compiled
    code inlines the hooks it saw when it compiled, recompiles when they change and, past its recompile limit,
    falls back to eager: the engine's hooks and functional dispatch would reach some calls and not others. The
    wrapper changes no number the int8 view computes (the hardware runs the weights, not torch's kernels)."""
    names: list[str] = []
    while True:  # outermost first; a wrapper inside a compiled module is found under its new name next time
        found = next(((name, module) for name, module in work.named_modules() if name and _is_compiled(module)),
                     None)
        if found is None:
            return names
        work.set_submodule(found[0], found[1]._orig_mod)
        names.append(found[0])


def refuse_non_model(model: Any) -> None:
    """What is neither a module nor an ONNX model is refused with what is allowed, before anything reads it."""
    from .deployed import is_onnx

    if not isinstance(model, nn.Module) and not is_onnx(model):
        raise TypeError(f"model must be a torch.nn.Module, a deployed int8 model (torch.ao, PT2E) or an ONNX model "
                        f"(ModelProto or .onnx path), got {type(model).__qualname__}")


def refuse_ungateable(model: nn.Module, source_name: str) -> None:
    """TorchScript runs its own graph: no hook, no functional dispatch reaches the layers inside it, so their MACs
    would run in float, unfaulted (and its parameters cannot be frozen on a copy). Refused, naming the module. So is
    a lazy module never run (nn.LazyLinear, nn.LazyConv2d), whose parameters hold no values yet, and a model on the
    meta device (built with empty weights and never loaded): no trained model."""
    from torch.nn.parameter import is_lazy

    lazy = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if is_lazy(tensor)]
    if lazy:
        raise UnsupportedModelError(
            f"{source_name}: {len(lazy)} of its parameters are not initialized ({', '.join(map(repr, lazy[:3]))}"
            f"{', ...' if len(lazy) > 3 else ''}: a lazy module, e.g. nn.LazyLinear, that never ran), so it has no "
            "weights to gate: run one forward pass on a batch of inputs and train it (or load its trained state) "
            "first")
    meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if meta:
        raise UnsupportedModelError(
            f"{source_name}: {len(meta)} of its parameters and buffers are on the meta device "
            f"({', '.join(map(repr, meta[:3]))}{', ...' if len(meta) > 3 else ''}): they hold no values (a model "
            "built under torch.device('meta') or an empty-weights context), so there is no model to gate: load its "
            "trained state first (model.load_state_dict(state, assign=True), or model.to_empty(device='cpu') then "
            "load_state_dict)")
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            where = f"its submodule {name!r}" if name else "it"
            raise UnsupportedModelError(
                f"{source_name}: {where} is a TorchScript module ({type(module).__qualname__}, from torch.jit.script "
                "or torch.jit.trace): the engine cannot reach the layers inside it. Pass the eager module it was made "
                "from")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def _plain_weight(module: nn.Module) -> None:
    """Make the (private copy's) weight a plain parameter holding its current value: weight_norm recomputes
    `.weight` at every call, which would undo the codes written into it."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        # The value the forward computes now (weight_norm's g * v / |v|, a spectral norm's in eval mode), held as a
        # plain parameter. Not remove_parametrizations: it deletes the property from the parametrized class, which a
        # deep copy shares with the user's module. The copy gets the plain class back and its own tensors.
        values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}  # type: ignore[union-attr]
        del module._modules["parametrizations"]
        module.__class__ = type(module).__bases__[0]
        for name, value in values.items():
            setattr(module, name, nn.Parameter(value, requires_grad=False))
    hook: Any
    for hook in list(module._forward_pre_hooks.values()):
        if type(hook).__name__ == "WeightNorm":  # torch.nn.utils.weight_norm (the deprecated form)
            torch.nn.utils.remove_weight_norm(module, hook.name)


class _ActStats:
    """Calibration statistics of one tensor stream: torch's MinMaxObserver, or a subsample for percentiles; they
    give a symmetric signed grid, or with `affine` an unsigned one with a zero point (torch's formulas)."""

    def __init__(self, calibration: str, bits: int, affine: bool = False) -> None:
        qmax = (1 << (bits - 1)) - 1
        self.affine, self.bits = affine, bits
        self.observer = MinMaxObserver(
            dtype=(torch.quint8 if affine else torch.qint8) if bits <= 8 else torch.qint32,
            qscheme=torch.per_tensor_affine if affine else torch.per_tensor_symmetric,
            quant_min=0 if affine else -qmax,
            quant_max=(1 << bits) - 1 if affine else qmax,
        )
        self.percentile_sample: list[torch.Tensor] | None = [] if calibration == "percentile" else None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.observer(x)
        if self.percentile_sample is not None:
            flat = (x if self.affine else x.abs()).reshape(-1)
            stride = max(1, flat.numel() // _PERCENTILE_SAMPLES_PER_BATCH)
            self.percentile_sample.append(flat[::stride].cpu())

    def grid(self, percentile: float) -> tuple[float, int]:
        """(scale, zero point)."""
        if self.percentile_sample is not None:
            sample = torch.cat(self.percentile_sample).double()
            if not self.affine:
                return _symmetric_scale(_quantile(sample, percentile), (1 << (self.bits - 1)) - 1), 0
            low, high = -_quantile(-sample, percentile), _quantile(sample, percentile)
            top = (1 << self.bits) - 1
            scale = max(max(high, 0.0) - min(low, 0.0), 1e-12) / top
            return scale, int(min(max(-round(min(low, 0.0) / scale), 0), top))
        scale, zero_point = self.observer.calculate_qparams()
        return float(scale), int(zero_point)


def _quantile(sample: torch.Tensor, percentile: float) -> float:
    if sample.numel() < (1 << 24):
        return float(torch.quantile(sample, percentile / 100.0))
    return float(torch.kthvalue(sample, max(1, int(sample.numel() * percentile / 100.0))).values)


def _symmetric_scale(absmax: float, qmax: int) -> float:
    return max(absmax, 1e-12) / qmax


def _weight_codes(weight: torch.Tensor, bits: int, granularity: str, groups: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes and a scale per output channel. `groups`: a transposed convolution's weight [in, out /
    groups, k...] holds its output channels along dim 1 within each group (`output_channel_groups`); it is
    quantized as the [out, in / groups, k...] weight it is, and its codes kept in its own layout."""
    if groups is not None:
        inner, outer = weight.shape[0] // groups, weight.shape[1]
        per_output = weight.reshape(groups, inner, outer, -1).transpose(1, 2).reshape(groups * outer, inner,
                                                                                       *weight.shape[2:])
        codes, scale = _weight_codes(per_output, bits, granularity)
        back = codes.reshape(groups, outer, inner, -1).transpose(1, 2).reshape(weight.shape)
        return back.contiguous(), scale
    qmax = (1 << (bits - 1)) - 1
    dtype = torch.qint8 if bits <= 8 else torch.qint32
    w = weight.detach().float()
    if granularity == "per_channel":
        obs: nn.Module = PerChannelMinMaxObserver(
            ch_axis=0, dtype=dtype, qscheme=torch.per_channel_symmetric, quant_min=-qmax, quant_max=qmax
        )
        obs(w)
        scale = obs.calculate_qparams()[0].float()  # type: ignore[operator]
    else:
        obs = MinMaxObserver(dtype=dtype, qscheme=torch.per_tensor_symmetric, quant_min=-qmax, quant_max=qmax)
        obs(w)
        scale = obs.calculate_qparams()[0].float().expand(w.shape[0]).clone()
    view = scale.reshape(-1, *([1] * (w.dim() - 1)))
    codes = torch.clamp(torch.round(w / view), -qmax, qmax).to(torch.int32)
    return codes, scale


def _measure_clip_rates(
    work: nn.Module, layers: dict[str, QuantLayer], data: Any, batch_size: int, device: torch.device | str,
    forward_context: Any,
) -> None:
    """Share of calibration values beyond each layer's quantization range, measured on the float model."""
    counts = {name: [0, 0, 0, 0] for name in layers}  # clipped inputs, inputs, clipped outputs, outputs

    def count(layer: QuantLayer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            c = counts[layer.name]
            c[0] += _beyond(args[0], layer.input_range, layer.input_scale)
            c[1] += args[0].numel()
            c[2] += _beyond(out, layer.act_range, layer.act_scale)
            c[3] += out.numel()

        return hook

    handles = [layer.module.register_forward_hook(count(layer)) for layer in layers.values()]
    try:
        with torch.no_grad():
            for x, _ in iter_batches(data, batch_size):
                with forward_context():
                    call_model(work, x.to(device))
    finally:
        for h in handles:
            h.remove()
    for name, layer in layers.items():
        clipped_in, n_in, clipped_out, n_out = counts[name]
        layer.input_clip_rate = clipped_in / max(1, n_in)
        layer.act_clip_rate = clipped_out / max(1, n_out)



def _beyond(x: torch.Tensor, code_range: tuple[int, int] | None, scale: float) -> int:
    """How many values lie beyond a code range (as code - zero point) by more than half a step."""
    low, high = code_range or (0, 0)
    return int(((x < (low - 0.5) * scale) | (x > (high + 0.5) * scale)).sum())
