"""The runtime view of a quantized model: `QuantizedModel` and its `QuantLayer`s (built by `quantization.quantize`).

What one forward pass of the view does, per quantized layer (see `quantization` for what is quantized and how the
scales are calibrated):

- a forward pre-hook turns the tensor entering the layer into its input codes (or reads the codes a producer handed
  on), written in the layer's compute layout (`layout.IMAGE_LAYOUTS`), and applies this batch's ``input`` faults;
- the layer's module (holding integer weight codes as float32) computes the exact accumulator; a forward hook adds
  the bias codes, applies ``acc`` faults, requantizes to output codes, applies ``act`` faults, and hands on codes or
  values (`QuantLayer.hands_on_codes`);
- ``weight`` faults are written into the module's weight codes for a whole pass and restored bit-exactly after it
  (`QuantizedModel.weight_faults`).

Transient faults reach the hooks as `inject.Edit`s prepared once per batch for every layer at once
(`QuantizedModel.prepare`), their positions placed in the memory layout each tensor had in the last forward pass
(`layout.in_layouts`). On a CUDA device, TF32 is switched off during the quantized forward (`exact_float32`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Any

import torch
from torch import nn

from . import native
from .bits import KINDS_BY_CODE, apply_bit_faults, fault_delta
from .data import Batch, Inputs, as_args, call_model
from .faults import FaultPattern, FaultTarget, LayerFaults, LayerSelector, Site, select_layers
from .inject import (
    Edit,
    apply_edit,
    apply_edit_to,
    check_bounds,
    code_dtype,
    compose,
    compose_canonical,
    compose_placed,
)
from .inplace import OwnOpsInPlace
from .layout import CHANNELS_LAST, IMAGE_LAYOUTS, contiguous_strides, in_layouts, is_dense
from .spec import ACC_BITS, QPARAM_BITS
from .systolic import Array, PEFault, layer_error, on_array

# Faults per faulty tensor from which `prepare` composes each tensor on its own (`_prepare_per_tensor`); below it
# one pass over all layers' faults at once costs less than ~15 small ops per tensor. Measured on ResNet56, batch
# 128 (act site): the two cost the same at ~300 faults per tensor (BER 3e-5); at 1k (1e-4) 2.7 vs 3.9 ms; at 9.8k
# (1e-3) 9.3 vs 54 ms; at 100 (1e-5) 2.1 vs 1.0 ms.
PER_TENSOR_FAULTS = 512

CONTROL_FLOW = ("the model's control flow depends on its input or batch size, so some inputs would run compute that "
                "is not quantized and that no fault reaches; pytest-hwfault gates models whose forward runs the same "
                "layers for every batch")

class UnsupportedModelError(ValueError):
    """A model the engine cannot quantize faithfully (its dtype, TorchScript, parametrized weights): the message
    says why and what to pass instead."""


class ControlFlowError(UnsupportedModelError):
    """The model's forward ran other layers, or other modules, than when it was quantized: its control flow depends
    on its input or batch, so some inputs would run unquantized compute that no fault reaches."""


class SiteUnreachableError(ValueError):
    """A fault site that cannot reach part of the model's compute (e.g. site pe on layers no systolic array
    computes): refused, naming what it misses, rather than judged on the rest."""


def positional_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The first pre-hook of every candidate layer (on the private copy): a layer called with its input by keyword
    (``self.fc(input=x)``) gets it positionally, so the calibration and the engine's hooks, which read `args`, see
    the input they quantize rather than nothing."""
    if not kwargs:
        return None
    # the class's forward: the engine's int8 kernels replace the instance's `forward` with their own signature
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    return bound.args[1:], bound.kwargs


def output_channel_groups(module: nn.Module) -> int | None:
    """A transposed convolution's groups (its weight is [in, out / groups, k...]: output channels along dim 1 within
    each group); None for a layer whose weight holds its output channels along dim 0."""
    return int(module.groups) if isinstance(module, nn.modules.conv._ConvTransposeNd) else None


def user_hooks(module: nn.Module) -> tuple[bool, bool]:
    """Whether the module has forward pre-hooks, and forward hooks, of the user's (copied with the model), beside
    the view's own `positional_input`."""
    pre = any(hook is not positional_input for hook in module._forward_pre_hooks.values())
    return pre, bool(module._forward_hooks)


def _next_hook_id() -> int | None:
    """The id torch gives the next hook handle (any hook, anywhere), or None where it keeps no such counter."""
    from torch.utils.hooks import RemovableHandle

    next_id = getattr(RemovableHandle, "next_id", None)
    return next_id if isinstance(next_id, int) else None


def _edits_codes_in_layout(edit: Edit, tensor: torch.Tensor) -> bool:
    """Whether `edit` rewrites codes (its scale 1.0) at positions laid out as `tensor` is, so a native pass may apply
    it to the codes it computes for `tensor`."""
    placed_for = edit.strides if edit.strides is not None else contiguous_strides(tuple(tensor.shape))
    return isinstance(edit.scale, float) and edit.scale == 1.0 and placed_for == tensor.stride()


class QuantizedModel:
    """A quantized, fault-injectable view of a model. Call it like the model: ``qmodel(x, faults=pattern)``."""

    def __init__(
        self,
        module: nn.Module,
        float_module: nn.Module,
        layers: dict[str, QuantLayer],
        config: dict[str, Any],
        folded: list[tuple[str, str]],
        bn_kept: list[str],
        fold_error: str | None,
        source_name: str,
        functional: Any = None,
        trace_error: str | None = None,
    ) -> None:
        self.module = module
        self.float_module = float_module
        self.layers = layers
        self.config = config
        self.folded = folded
        self.bn_kept = bn_kept
        self.fold_error = fold_error
        self.source_name = source_name
        self.functional = functional  # the functional calls that run as layers (`functional.FunctionalPlan`)
        # why the graph torch.fx traces does not stand for the forward (`graph.trace_disagreement`), or None: then
        # nothing that reads it applies (BN folding, code links, in-place own ops, late start)
        self.trace_error = trace_error
        self._runtime = _Runtime()
        self._multipliers: dict[str, torch.Tensor] = {}
        # a layer's own F.linear/F.conv call passes through the functional dispatch: it is known by its weight
        self._layer_weights = {id(w) for w in (getattr(layer.module, "weight", None) for layer in layers.values())
                               if isinstance(w, torch.Tensor)}
        self._handles = [h for layer in layers.values() for h in self._install(layer)]
        # Whether the model's own ReLUs and sums on layer outputs run in place (`inplace`): the same numbers, less
        # memory traffic. Off: the model's ops run as written (tests compare the two).
        self.own_ops_in_place = True
        self.own_ops_run = 0  # how many of the model's ops ran in place, over every forward pass
        self._hooks_when_built = self._hook_counts()
        self._hooks_seen_at = _next_hook_id()  # the hook-handle counter when they were last found as built
        self._choose_layout()
        self.kernels: dict[str, str] = {}  # per layer: "int8" or "emulated" (`use_kernel`)
        self.use_kernel(config.get("kernel", "emulated"))

    def use_kernel(self, kernel: str) -> dict[str, str]:
        """Compute each Conv2d/Linear layer's accumulator on an int8 kernel where it qualifies ("auto"; "int8":
        the same, an error where this machine has no exact int8 kernel) or on the float-emulated conv/linear
        ("emulated"); see `kernels`. No number changes. Returns the kernel of each layer."""
        from . import kernels

        if kernel not in kernels.KERNELS:
            raise ValueError(f"kernel={kernel!r} is not supported; allowed: {', '.join(map(repr, kernels.KERNELS))}")
        if kernel == "int8" and not (kernels.available("conv2d", self.device.type)
                                     or kernels.available("linear", self.device.type)):
            raise ValueError(f"kernel='int8': this machine ({self.device.type}, torch {torch.__version__}) has no "
                             "int8 kernel that computes the accumulator exactly; use kernel='auto' or 'emulated'")
        kernels.uninstall(self.layers)
        self.kernels = kernels.install(self.layers, kernel)
        self.config["kernel"] = kernel
        return dict(self.kernels)

    def _choose_layout(self) -> None:
        policy = self.config.get("memory_format", "preserve")
        self._runtime.channels_last = policy == "channels_last" or (policy == "auto" and self.device.type == "cpu")

    @property
    def channels_last(self) -> bool:
        """Whether image layers compute channels-last (`quantize`'s `memory_format`, on this device)."""
        return self._runtime.channels_last

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        self._runtime.channels_last = value

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _install(self, layer: QuantLayer) -> list[Any]:
        runtime, name, bits, acc_bits = self._runtime, layer.name, layer.bits, layer.acc_bits
        inv_input_scales = [1.0 / layer.input_scale] + (
            [1.0 / layer.second_input_scale] if layer.second_input_shape is not None else [])
        operands, calls, act_scale = len(inv_input_scales), layer.calls, layer.act_scale
        (in_low, in_high), (act_low, act_high) = layer.input_range or (0, 0), layer.act_range or (0, 0)
        in_zero, act_zero, signed = layer.input_zero_point, layer.act_zero_point, layer.signed_activations
        in_signed = signed if layer.signed_inputs is None else layer.signed_inputs
        requant, bias_after, bias_before = layer.requant_multiplier(), layer.float_bias_codes, layer.float_bias_before
        steps = None if layer.step_scales is None else tuple(torch.tensor(v, dtype=torch.float32, device=self.device)
                                                            for v in layer.step_scales)
        # a kernel's own steps run on torch's ops (the fused passes compute the one-multiplier form)
        fusable = steps is None and bias_before is None
        self._multipliers[name] = requant  # the stored multipliers: qparams faults edit them in place
        # a deployed model's runtime scales its accumulator in float32: a wide (float64) sum is rounded to float32
        # first, as its int32 -> float conversion does
        runtime_float32 = layer.multiplier is not None
        float_output, channel_axis, raw_output = layer.float_output, layer.channel_axis, layer.raw_output
        zero_first = layer.zero_point_before_rounding and act_zero != 0
        image_layout = IMAGE_LAYOUTS.get(type(layer.module))
        hands_on_codes, reads_codes = layer.hands_on_codes, layer.reads_codes
        wide = None if layer.compute_dtype == torch.float32 else layer.compute_dtype
        # the user's own hooks on the layer (copied with the model) read its input as float codes
        user_hooked = any(user_hooks(layer.module))

        def key(site: Site, part: int) -> tuple[Any, ...]:  # as `prepare` names the site's tensors
            single = calls == 1 and (operands == 1 or site is not Site.INPUT)
            return (site, name) if single else (site, name, part)

        def to_input_codes(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            call = runtime.calls.get(name, 0)
            if call >= calls:
                raise ControlFlowError(f"layer {name!r} ran more than the {calls} time(s) per forward pass it ran "
                                       f"while it was calibrated: {CONTROL_FLOW}")
            codes = []
            for operand, inv_scale in enumerate(inv_input_scales):
                x, part = args[operand], call * operands + operand
                edit = runtime.batch.get(key(Site.INPUT, part))
                # an int8 kernel's input bytes written here where nothing else reads the float codes (no input
                # fault, no faulty PE, no hook of the user's): one pass instead of two
                forward = module.__dict__.get("forward") if edit is None and runtime.pe is None and \
                    operands == 1 and not user_hooked else None
                byte_input = getattr(forward, "byte_input", None)
                if reads_codes and operand == 0:  # the producer's codes as they are; others may read them too
                    if wide is not None and forward is not None and byte_input is not None and \
                            forward.usable(x, wide):  # a wide layer's bytes from its producer's float32 codes
                        target = byte_input(x)
                        if target is not None and native.to_bytes(x, target, forward.zero_point):
                            runtime.strides[key(Site.INPUT, part)] = x.stride()
                            codes.append(target)
                            continue
                    if edit is not None or wide is not None:
                        x = runtime.input_buffer(x, None, wide, operand).copy_(x)
                else:  # written in the layer's compute layout while they are computed: no extra pass
                    layout = image_layout if runtime.channels_last and CHANNELS_LAST.get(x.dim()) is image_layout \
                        else None
                    # a producer's codes are in range already
                    low, high = (in_low, in_high) if layer.input_source is None or operand else (None, None)
                    # the bytes straight from the values (a wide layer's codes are the same float32 quantizer's)
                    if forward is not None and byte_input is not None and forward.usable(x, wide):
                        out = runtime.input_buffer(x, layout, None, operand)  # where the codes would be laid out
                        target = byte_input(out)
                        if target is not None and native.quantize_to_bytes(x, target, inv_scale, low, high,
                                                                           forward.zero_point):
                            runtime.strides[key(Site.INPUT, part)] = out.stride()
                            codes.append(target)
                            continue
                    if wide is None:
                        out = runtime.input_buffer(x, layout, None, operand)
                        x = out if native.quantize(x, out, inv_scale, low, high) else \
                            native.eager_quantize(x, out, inv_scale, low, high)
                    else:  # the same float32 quantizer, then the codes in the wide compute dtype
                        x = runtime.input_buffer(x, layout, wide, operand).copy_(torch.mul(x, inv_scale).round_())
                        if low is not None:
                            x.clamp_(low, high)
                runtime.strides[key(Site.INPUT, part)] = x.stride()
                if edit is not None:
                    x = apply_edit_to(x, edit, bits, in_zero, in_signed)
                codes.append(x)
            return (*codes, *args[operands:])

        def requantize(module: nn.Module, args: tuple[Any, ...], acc: torch.Tensor, relu: bool) -> torch.Tensor:
            """The layer's output from its accumulator; with `relu`, the ReLU that alone reads it done too (the
            codes clamped at zero: the same values, as code x scale with scale > 0)."""
            call = runtime.calls.get(name, 0)
            runtime.calls[name] = call + 1
            if runtime.pe is not None:  # faulty PEs of the systolic array corrupt its partial sums (systolic.py)
                rows, cols, pe_faults = runtime.pe
                weight = module.weight
                assert isinstance(weight, torch.Tensor)
                # the array's own arithmetic, not a call of the model's: past the functional dispatch, if active
                with torch._C.DisableTorchFunction():
                    error = layer_error(module, args[0], weight, pe_faults, rows, cols, acc.shape)
                acc.add_(error.to(acc.dtype))
            acc_key, act_key = key(Site.ACC, call), key(Site.ACT, call)
            acc_edit, act_edit = runtime.batch.get(acc_key), runtime.batch.get(act_key)
            # a faulty output zero point register (site qparams): every code shifts before saturation
            offset = runtime.zero_offsets.get(name, 0) if runtime.zero_offsets else 0
            bias = layer.bias_codes
            if acc_edit is not None:  # the accumulator's faults land after the bias is added
                if bias is not None:
                    acc.add_(bias)
                    bias = None
                runtime.strides[acc_key] = acc.stride()
                acc = apply_edit_to(acc, acc_edit, acc_bits)
            if raw_output:  # the module after the layer scales it (a dynamic layer: by each image's input scale)
                if acc_edit is None:
                    runtime.strides[acc_key] = acc.stride()
                return acc
            # With `relu`, the ReLU after the act faults: with none, it is the clamp's floor; with some, the codes are
            # clamped as usual, edited, then ReLU'd (in the same pass where the native one applies)
            relu_after_edit = relu and act_edit is not None
            act_floor = max(act_low, 0) if relu and not relu_after_edit else act_low
            pre_round, post_round = act_zero + offset if zero_first else None, -act_zero if zero_first else (
                offset or None)
            if relu_after_edit and act_edit is not None and not float_output and fusable and \
                    _edits_codes_in_layout(act_edit, acc) and \
                    native.requantize_edit_relu(acc, bias, requant, bias_after, pre_round, post_round, act_low,
                                                act_high, None if hands_on_codes else act_scale, act_edit.linear,
                                                act_edit.keep, act_edit.set, act_edit.flip, bits, act_zero, signed):
                if acc_edit is None:
                    runtime.strides[acc_key] = acc.stride()
                runtime.strides[act_key] = acc.stride()
                return acc
            # the whole chain below in one pass where it applies (`native`: the same numbers); a wide layer's
            # float64 accumulator into float32 values of its own
            fused = None
            if not float_output and fusable:
                if wide is None:
                    fused = acc if native.requantize(acc, bias, requant, bias_after, pre_round, post_round, act_floor,
                                                     act_high, None if hands_on_codes else act_scale) else None
                else:
                    values = torch.empty_like(acc, dtype=torch.float32)
                    fused = values if native.requantize_wide(
                        acc, values, bias, requant, bias_after, pre_round, post_round, act_floor, act_high,
                        None if hands_on_codes else act_scale, runtime_float32) else None
            if fused is not None:
                if acc_edit is None:
                    runtime.strides[acc_key] = acc.stride()
                runtime.strides[act_key] = fused.stride()
                out = fused
                if act_edit is not None:  # on the faulty values only: code = round(value / scale) exactly, and the
                    # new code x scale is the float32 product the eager chain makes (no second pass over the tensor)
                    out = apply_edit_to(out, act_edit if hands_on_codes else replace(act_edit, scale=act_scale), bits,
                                        act_zero, signed)
                    if relu_after_edit:
                        out = out.relu_()
            else:
                # The bias is added here, in place, not inside the conv: oneDNN's fused bias costs ~10x this pass.
                if bias is not None:
                    acc.add_(bias)
                if acc_edit is None:
                    runtime.strides[acc_key] = acc.stride()
                if wide is not None and runtime_float32:
                    acc = acc.float()
                if bias_before is not None:  # fbgemm: a float bias on the float32 accumulator
                    acc.add_(bias_before)
                if steps is not None:  # oneDNN: the input scale first
                    acc.mul_(steps[0])
                # In place on the layer's own fresh result: torch's fake_quantize_per_tensor_affine is ~10x slower
                # on CPU (it also builds a gradient mask).
                out = acc.mul_(requant)
                if bias_after is not None:  # a runtime that adds its float bias after scaling (`deployed.BiasMode`)
                    out.add_(bias_after)
                if steps is not None:  # oneDNN: 1 / output scale last
                    out.mul_(steps[1])
                if float_output:  # the runtime keeps this layer's result in float: no output codes, no act site
                    return out.float() if out.dtype != torch.float32 else out
                if zero_first:  # the runtime adds the zero point in float32, then rounds (oneDNN)
                    out = out.add_(act_zero + offset).round_().sub_(act_zero)
                else:
                    out = out.round_()
                    if offset:
                        out.add_(offset)
                out = out.clamp_(act_floor, act_high)
                if out.dtype != torch.float32:  # codes fit float32 exactly; values are code x scale in float32
                    out = out.float()
                runtime.strides[act_key] = out.stride()
                # act faults rewrite the codes before they are scaled: the same values as editing code x scale
                # (whose code round((code x scale) / scale) is exact), two passes over the faults fewer
                if act_edit is not None:
                    out = apply_edit_to(out, act_edit, bits, act_zero, signed)
                if not hands_on_codes:
                    out.mul_(act_scale)
                if relu_after_edit:
                    out = out.relu_()
            if runtime.ranges is not None:  # a fault-free pass recording what the layer hands on (`output_ranges`)
                channel = channel_axis + 1 if channel_axis >= 0 else out.dim() - 1
                dims = [d for d in range(out.dim()) if d != channel]
                shape = (-1, *([1] * (out.dim() - 1 - channel)))
                low, high = out.amin(dim=dims).reshape(shape), out.amax(dim=dims).reshape(shape)
                seen = runtime.ranges.get(name)
                runtime.ranges[name] = (low, high) if seen is None else (torch.minimum(seen[0], low),
                                                                         torch.maximum(seen[1], high))
            if runtime.bounds is not None and name in runtime.bounds:  # range restriction, after the act faults
                low, high = runtime.bounds[name]
                out = out.clamp_(low, high)
            return out

        # The hooks' own torch calls bypass the forward pass's TorchFunctionModes (the functional dispatch, the
        # in-place own ops): they are the engine's work, not the model's, and each call would cost a Python call.
        def input_codes_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            with torch._C.DisableTorchFunction():
                return to_input_codes(module, args)

        def output_hook(module: nn.Module, args: tuple[Any, ...], acc: torch.Tensor) -> torch.Tensor:
            own_ops, chain = runtime.own_ops, layer.in_place
            # A ReLU that alone reads the output is done by the requantization (its clamp's floor, or after the
            # layer's act faults), where nothing else reads the codes before it: no recorded or restricted ranges,
            # no other forward hook (`explain` reads the codes with one).
            relu = own_ops is not None and chain[:1] == ("relu",) and not float_output and \
                runtime.ranges is None and runtime.bounds is None and len(module._forward_hooks) == 1
            with torch._C.DisableTorchFunction():
                out = requantize(module, args, acc, relu)
            if own_ops is not None and chain:  # a fresh tensor that only the model's own ops read next
                own_ops.mark(out, chain, done=relu)
            return out

        return [
            layer.module.register_forward_pre_hook(input_codes_hook),
            # first among the module's forward hooks: a user's hook (copied with the model) sees the layer's values
            layer.module.register_forward_hook(output_hook, prepend=True),
        ]

    def _weight_edit(self, faults: LayerFaults) -> Edit:
        """The edit of one layer's weight codes (held as integers: scale 1), on the model's device; sampled faults
        (sorted, distinct, one kind) composed without the general fold, a few ops fewer per faulty layer."""
        faults = faults.to(self.device)
        if faults.canonical and len(faults):
            return compose_canonical(faults.index, faults.bit, int(faults.kind[0]), 1.0)
        return compose(faults.index, faults.bit, faults.kind, 1.0)

    def prepare(self, faults: FaultPattern | None, start: int, stop: int) -> dict[tuple[Any, ...], Edit]:
        """The transient faults of images [start, stop), as edits the hooks apply.

        Done for all layers at once: a BER campaign spreads a few faults over every layer, and per-layer tensor
        ops (~60 per layer, a few microseconds each) would cost more than the faults themselves. A site made of
        several tensors (a layer that runs once per time step, a matmul's two operands) gets one edit per tensor
        (`QuantLayer.parts`)."""
        if faults is None:
            return {}
        entries = self._edit_groups(faults)
        if not entries:
            return {}
        if (all(group.canonical for _, _, group, _ in entries)
                and sum(len(group) for _, _, group, _ in entries) >= PER_TENSOR_FAULTS * len(entries)):
            return self._prepare_per_tensor(entries, start, stop)
        device = self.device
        keys = [key for key, _, _, _ in entries]
        groups = [group for _, _, group, _ in entries]
        sizes = torch.tensor([len(g) for g in groups], device=device)
        group_id = torch.repeat_interleave(torch.arange(len(keys), device=device), sizes)
        image, index, bit, kind = (torch.cat([getattr(g, f) for g in groups]).to(device)
                                   for f in ("image", "index", "bit", "kind"))
        in_batch = (image >= start) & (image < stop)
        if not bool(in_batch.all()):
            group_id, image, index, bit, kind = (t[in_batch] for t in (group_id, image, index, bit, kind))
        numel_of = [math.prod(shape) for _, _, _, shape in entries]
        numel = torch.tensor(numel_of, device=device)[group_id]
        out_of_range = index >= numel
        if bool(out_of_range.any()):
            g = int(group_id[out_of_range][0])
            check_bounds(groups[g], numel_of[g], f"site {keys[g][0].value!r} of layer {keys[g][1]!r}")
        # One key space for every (layer, code): layer g's codes of this batch occupy [g * span, (g + 1) * span).
        span = max(numel_of) * (stop - start)
        if span * len(keys) >= 1 << 62:
            raise ValueError(f"{len(keys)} layers of up to {max(numel_of)} codes x {stop - start} images exceed "
                             "int64 positions; use a smaller batch")
        # every site's tensor holds codes when its edit is applied (act: before the scaling): scale 1
        edit = compose(group_id * span + (image - start) * numel + index, bit, kind, 1.0)
        group = torch.div(edit.linear, span, rounding_mode="floor")
        counts = torch.bincount(group, minlength=len(keys)).tolist()
        shapes = [(stop - start, *shape) for _, _, _, shape in entries]
        layouts = [self._expected_strides(key, shape) for key, shape in zip(keys, shapes)]
        edit.linear = in_layouts(edit.linear % span, group, shapes, layouts)
        # the masks in the dtype the hooks work in (`code_dtype`), so that their bit operations do not mix dtypes
        dtype = code_dtype(max(layer.site_bits(key[0]) for key, layer, _, _ in entries))
        linear = torch.split(edit.linear, counts)
        keep, set_, flip = ([None] * len(keys) if t is None else torch.split(t.to(dtype), counts)
                            for t in (edit.keep, edit.set, edit.flip))  # None: flips only (no keep or set masks)
        return {key: Edit(linear[g], keep[g], set_[g], flip[g], 1.0, strides=layouts[g])
                for g, key in enumerate(keys) if counts[g]}

    def _prepare_per_tensor(self, entries: list[tuple[tuple[Any, ...], QuantLayer, LayerFaults, tuple[int, ...]]],
                            start: int, stop: int) -> dict[tuple[Any, ...], Edit]:
        """`prepare` of canonical faults (sampled: sorted, distinct, one kind), tensor by tensor: at a high BER
        each tensor holds thousands of faults, and a few passes with its own scalars cost less than the all-layer
        path's gathers of per-fault sizes and scales."""
        edits = {}
        for key, layer, group, shape in entries:
            faults = group if start == 0 and int(group.image[-1]) < stop else group.for_images(start, stop)
            if faults is None:
                continue
            faults = faults.to(self.device)
            numel = math.prod(shape)
            check_bounds(faults, numel, f"site {key[0].value!r} of layer {key[1]!r}")
            batch = (stop - start, *shape)
            edits[key] = compose_placed(faults.linear(numel), faults.bit, int(faults.kind[0]), batch,
                                        self._expected_strides(key, batch), code_dtype(layer.site_bits(key[0])))
        return edits

    def _edit_groups(self, faults: FaultPattern) -> list[tuple[tuple[Any, ...], QuantLayer, LayerFaults,
                                                                 tuple[int, ...]]]:
        """(edit key, layer, its faults with indices local to that tensor, the tensor's per-image shape) for each
        faulty tensor of a transient site."""
        entries: list[tuple[tuple[Any, ...], QuantLayer, LayerFaults, tuple[int, ...]]] = []
        for (site, name), group in faults.groups.items():
            if not site.transient or not len(group):
                continue
            layer = self._layer(name)
            parts = layer.parts(site)
            if len(parts) == 1:
                entries.append(((site, name), layer, group, parts[0]))
                continue
            check_bounds(group, layer.numel(site), f"site {site.value!r} of layer {name!r}")
            starts = list(accumulate([0] + [math.prod(p) for p in parts[:-1]]))
            part = torch.searchsorted(torch.tensor(starts[1:], device=group.index.device), group.index, right=True)
            for p in torch.unique(part).tolist():
                chosen = part == p
                local = LayerFaults(group.image[chosen], group.index[chosen] - starts[p], group.bit[chosen],
                                    group.kind[chosen], group.canonical)
                entries.append(((site, name, p), layer, local, parts[p]))
        return entries

    def _expected_strides(self, key: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
        """The strides the tensor of edit `key` had in the last forward pass, if dense; else contiguous ones."""
        seen = self._runtime.strides.get(key)
        if seen is not None and len(seen) == len(shape) and is_dense(shape, seen):
            return seen
        return contiguous_strides(shape)

    # -- running -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).weight_scale.device

    def to(self, device: torch.device | str) -> QuantizedModel:
        device = torch.device(device)
        self.module.to(device)
        self.float_module.to(device)
        for module in (self.functional.layers() if self.functional else {}).values():
            module.to(device)
        for layer in self.layers.values():
            layer.weight_codes = layer.weight_codes.to(device)
            layer.weight_scale = layer.weight_scale.to(device)
            if layer.bias_codes is not None:
                layer.bias_codes = layer.bias_codes.to(device)
        self._choose_layout()
        return self

    def __call__(self, x: Batch, faults: FaultPattern | None = None, image_offset: int = 0) -> torch.Tensor:
        return self.forward(x, faults, image_offset)

    def forward(self, x: Batch, faults: FaultPattern | None = None, image_offset: int = 0) -> torch.Tensor:
        """Quantized forward of a batch whose first image is image `image_offset` of the faults' numbering."""
        if faults is not None:
            self._check_bits(faults)
        if faults is not None and faults.has_weight_faults():
            with self.weight_faults(faults):
                return self._forward(x, faults, image_offset)
        return self._forward(x, faults, image_offset)

    def _forward(self, x: Batch, faults: FaultPattern | None, image_offset: int) -> torch.Tensor:
        return self.run_batch(x, self.prepare(faults, image_offset, image_offset + len(x)))

    def run_batch(self, x: Batch, edits: dict[tuple[Any, ...], Edit]) -> torch.Tensor:
        """Quantized forward of one batch with prepared transient edits (see `prepare`); refused where the forward
        did not run every layer as often as it did while calibrated (a branch that skips quantized layers)."""
        args, kwargs = as_args(x.to(self.device))
        ran: dict[str, int] = {}
        out = self.run_graph(self.module, args, edits, kwargs, ran)
        if len(ran) != len(self.layers) or any(ran.get(name, 0) != layer.calls for name, layer in self.layers.items()):
            name = next(n for n, layer in self.layers.items() if ran.get(n, 0) != layer.calls)
            raise ControlFlowError(f"layer {name!r} ran {ran.get(name, 0)} time(s) in a forward pass of "
                                   f"{len(next(iter(args), x))} input(s) where it ran {self.layers[name].calls} "
                                   f"while it was calibrated: {CONTROL_FLOW}")
        return out

    def run_graph(self, module: nn.Module, args: tuple[Any, ...], edits: dict[tuple[Any, ...], Edit],
                  kwargs: dict[str, Any] | None = None, ran: dict[str, int] | None = None,
                  in_place: bool | None = None) -> Any:
        """Call `module` (a graph over this view's layers, such as a torch.fx suffix of it) with prepared transient
        edits active, as `run_batch` does for the whole model; `ran` receives how often each layer ran.
        `in_place`: whether the model's own ReLUs and sums run in place on layer outputs (`inplace`), which holds
        for the whole model and for a graph that keeps every reader of each layer output it computes (a suffix);
        by default only for the whole model."""
        self._runtime.batch, self._runtime.calls = edits, {}
        own_ops = self._own_ops(module is self.module if in_place is None else in_place)
        self._runtime.own_ops = own_ops
        try:
            # the whole model reads the images on dim 0 of its inputs (a graph suffix, its own tensors)
            first = (args[0].tensors[0] if isinstance(args[0], Inputs) else args[0]) if args and module is \
                self.module else None
            images = len(first) if isinstance(first, torch.Tensor) and first.dim() else None
            with torch.inference_mode(), exact_float32(self.device), self.dispatch(images), own_ops or nullcontext():
                return module(*args, **(kwargs or {}))
        finally:
            if ran is not None:
                ran.update(self._runtime.calls)
            if own_ops is not None:
                self.own_ops_run += own_ops.steps
            self._runtime.batch, self._runtime.calls, self._runtime.own_ops = {}, {}, None

    @property
    def _in_place_layers(self) -> bool:
        return any(layer.in_place for layer in self.layers.values())

    def _own_ops(self, wanted: bool) -> OwnOpsInPlace | None:
        """The mode running the model's own ops in place in this forward pass, or None: where no layer has such
        ops, where they are turned off (`own_ops_in_place`), or where a hook could keep a layer's output before
        they run: a global module hook (registered by anyone), or a hook added to the view's modules since it was
        built."""
        if not (wanted and self.own_ops_in_place and self._in_place_layers):
            return None
        module_hooks = nn.modules.module
        if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
            return None
        if not self._hooks_as_built():  # a hook added to the view since: it may keep an output
            return None
        return OwnOpsInPlace()

    def _hooks_as_built(self) -> bool:
        """Whether every module of the view holds as many forward hooks and pre-hooks as when it was built. A hook is
        added only through a handle, and each handle takes the next id of one counter: while it has not moved since
        they were last found as built, nothing was added anywhere, and the walk over the modules (~0.1 ms on a
        ResNet56, at every forward pass) is skipped."""
        now = _next_hook_id()
        if now is not None and now == self._hooks_seen_at:
            return True
        if self._hook_counts() != self._hooks_when_built:
            return False
        self._hooks_seen_at = now
        return True

    def _hook_counts(self) -> tuple[tuple[int, int], ...]:
        return tuple((len(m._forward_hooks), len(m._forward_pre_hooks)) for m in self.module.modules())

    def stored_multiplier(self, name: str) -> torch.Tensor:
        """Layer `name`'s stored multiplier words, the tensor qparams faults edit in place: a module that scales a
        raw-output layer's accumulator (`QuantLayer.raw_output`) reads them from here."""
        return self._multipliers[name]

    def dispatch(self, images: int | None = None) -> Any:
        """The context in which the model's functional multiply-accumulates run as this view's layers
        (`functional.Dispatch`), and torch's fused attention fast path is off (its kernels bypass the layers).
        `images`: the forward pass's number of images, where known (folded calls are checked against it)."""
        from .functional import quantized_forward

        return quantized_forward(self.functional, self._layer_weights, images)

    def float_forward(self, x: Batch) -> torch.Tensor:
        """The float model (a private eval-mode copy), for the float baseline accuracy; image batches go in in the
        layout the quantized view computes in."""
        x = x.to(self.device)
        if isinstance(x, Inputs):
            with torch.inference_mode():
                return call_model(self.float_module, x)
        if self._runtime.channels_last and x.dim() in CHANNELS_LAST:
            x = x.contiguous(memory_format=CHANNELS_LAST[x.dim()])
        with torch.inference_mode():
            return self.float_module(x)

    @contextmanager
    def weight_faults(self, pattern: FaultPattern) -> Iterator[None]:
        """Apply the pattern's persistent faults (weight codes, stored qparams) in place for the duration of the
        block, then restore every touched word bit-exactly, also when the block raises. Cost: proportional to the
        number of faults."""
        saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        versions: dict[str, Any] = {}  # each edited weight's version before its first edit
        try:
            with torch.no_grad():
                for (site, name), group in pattern.groups.items():
                    if site.transient:
                        continue
                    if site is Site.PE:
                        self._apply_pe(name, group)
                        continue
                    layer = self._layer(name)
                    check_bounds(group, layer.numel(site), f"the {site.value} words of layer {name!r}")
                    if site is Site.QPARAMS:
                        self._apply_qparams(layer, group, saved)
                        continue
                    edit = self._weight_edit(group)
                    for holder in layer.weight_group or (name,):  # tied weights: one stored tensor, every reader
                        weight = self.layers[holder].module.weight
                        assert isinstance(weight, torch.Tensor)
                        flat = weight.view(-1)  # holds the integer codes
                        versions.setdefault(holder, (weight.data_ptr(), weight._version))
                        saved.append((flat, edit.linear, flat[edit.linear].clone()))
                        apply_edit(flat, edit, layer.bits)
            yield
        finally:
            self._runtime.zero_offsets.clear()
            self._runtime.pe = None
            with torch.no_grad():
                for flat, touched, original in reversed(saved):
                    flat[touched] = original
            for holder, before in versions.items():  # an int8 kernel's original pack serves the restored codes
                restored = getattr(self.layers[holder].module.__dict__.get("forward"), "weight_restored", None)
                if restored is not None:
                    restored(before)

    def _apply_pe(self, name: str, faults: LayerFaults) -> None:
        """Faulty PE registers of a systolic array: the hooks add their error to every layer the array computes."""
        array = Array.parse(name)
        self.check_on_array()
        check_bounds(faults, array.pes, f"the PEs of array {name!r}")
        found = [PEFault(*array.position(index), array.register, bit, kind)
                 for index, bit, kind in zip(faults.index.tolist(), faults.bit.tolist(), faults.kind.tolist())]
        if self._runtime.pe is not None and self._runtime.pe[:2] != (array.rows, array.cols):
            raise ValueError("one pattern faults two systolic arrays of different shapes; a model runs on one array")
        known = [] if self._runtime.pe is None else self._runtime.pe[2]
        self._runtime.pe = (array.rows, array.cols, known + found)

    def _apply_qparams(self, layer: QuantLayer, faults: LayerFaults,
                       saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Faults on a layer's stored requantization words: word c < channels is channel c's float32 multiplier
        (its IEEE-754 bits), the last word the output zero point's int32 register. Applied in pattern order."""
        words = self._multipliers[layer.name].view(-1)
        raw = words.view(torch.int32)
        zero = layer.act_zero_point
        register = zero
        for index, bit, kind in zip(faults.index.tolist(), faults.bit.tolist(), faults.kind.tolist()):
            if index == words.numel():
                register += fault_delta(register, bit, KINDS_BY_CODE[kind], QPARAM_BITS)
                continue
            position = torch.tensor([index], device=raw.device)
            saved.append((raw, position, raw[position].clone()))
            changed = apply_bit_faults(raw[position].to(torch.int64), torch.tensor(bit), torch.tensor(kind),
                                       QPARAM_BITS)
            raw[position] = changed.to(torch.int32)
        if register != zero:
            self._runtime.zero_offsets[layer.name] = register - zero

    # -- range restriction (mitigation.py) -----------------------------------------------------------------------
    def output_ranges(self, inputs: Batch, batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer with output codes and per output channel: the [min, max] of what it hands on (codes, or code x
        scale values) over one fault-free pass of `inputs`, shaped to broadcast over a batch of its outputs: the
        bounds of range restriction. Elements of the handed-on tensors, so clamping to them leaves every fault-free
        value as it is."""
        ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._runtime.ranges = ranges
        try:
            for start in range(0, len(inputs), batch_size):
                self.run_batch(inputs[start : start + batch_size], {})
        finally:
            self._runtime.ranges = None
        return ranges

    @contextmanager
    def restricted(self, bounds: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        """Within the block, every listed layer's output (after its act faults) is clamped to its bounds."""
        saved = self._runtime.bounds
        self._runtime.bounds = bounds
        try:
            yield
        finally:
            self._runtime.bounds = saved

    # -- describing ----------------------------------------------------------------------------------------------
    def _layer(self, name: str) -> QuantLayer:
        try:
            return self.layers[name]
        except KeyError:
            known = list(self.layers)
            raise KeyError(f"{name!r} is not a quantized layer of {self.source_name}; layers: {known}") from None

    def select(self, selectors: tuple[LayerSelector, ...] | None) -> list[str]:
        names = list(self.layers)
        types = [type(layer.module) for layer in self.layers.values()]
        return select_layers(names, types, selectors)

    def targets(self, site: Site, layers: tuple[LayerSelector, ...] | None = None) -> list[FaultTarget]:
        site = Site(site)
        if site is Site.PE:  # the "layers" are systolic arrays by name, e.g. "ws32x32.acc"
            if not layers:
                raise ValueError("site 'pe' faults a systolic array: name it, e.g. layers=('ws32x32.acc',)")
            self.check_on_array()
            arrays = [Array.parse(str(name)) for name in layers]
            return [FaultTarget(site, array.name, array.pes, array.width) for array in arrays]
        names = self.select(layers)
        # a tied weight is stored once: faulted under the first of its layers selected (weight_faults edits all)
        stored = {name: next(n for n in self.layers[name].weight_group if n in names)
                  for name in names if self.layers[name].weight_group} if site is Site.WEIGHT else {}
        return [
            FaultTarget(site, name, self.layers[name].numel(site), self.layers[name].site_bits(site))
            for name in names if self.layers[name].numel(site)  # a matmul of activations: no weight
            and stored.get(name, name) == name
        ]

    def nothing_to_fault(self, site: Site, layers: tuple[LayerSelector, ...] | None = None) -> str:
        """Why `targets(site, layers)` is empty, in words (a campaign on it would run fault-free trials and pass)."""
        names = self.select(layers)
        where = f"the layers selected by layers={layers!r}" if layers else "this model"
        if not names:
            return f"site {site.value!r}: layers={layers!r} selects no quantized layer"
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        why = {
            Site.ACT: "keeps its result in float, with no output codes to flip (a deployed layer feeding a float "
                      "op, a dynamic Linear): fault their accumulators (site='acc') or input codes (site='input')",
            Site.WEIGHT: "holds no weights (a matmul of two activations): fault its inputs or accumulator",
        }.get(site, f"has no {site.value} codes")
        return f"site {site.value!r} has nothing to fault in {where}: each of its quantized layers ({shown}) {why}"

    def check_on_array(self) -> None:
        """Site pe maps conv1d/conv2d/linear layers onto the array; a model with other quantized layers would have
        compute the faults do not reach: refused, naming them."""
        off = [f"{name} ({layer.module_type})" for name, layer in self.layers.items() if not on_array(layer.module)]
        if off:
            raise SiteUnreachableError(
                f"site 'pe': the systolic array computes conv1d/conv2d/linear layers; these quantized layers are not "
                f"mapped onto it, so its faults would not reach them: {', '.join(off)}")

    def _check_bits(self, pattern: FaultPattern) -> None:
        """A fault's bit must exist in its site's codes (a "bit 6" flip of a 4-bit code would make code -65)."""
        for (site, name), group in pattern.groups.items():
            width = Array.parse(name).width if site is Site.PE else self._layer(name).site_bits(site)
            if len(group) and int(group.bit.max()) >= width:
                raise ValueError(f"bit {int(group.bit.max())} does not exist in the {width}-bit "
                                 f"{site.value} codes of {'array' if site is Site.PE else 'layer'} {name!r}")

    def validate(self, pattern: FaultPattern, n_images: int) -> None:
        """Raise a clear error if a pattern does not fit this model and `n_images` images."""
        self._check_bits(pattern)
        for (site, name), group in pattern.groups.items():
            if site is Site.PE:
                check_bounds(group, Array.parse(name).pes, f"the PEs of array {name!r}")
                continue
            layer = self._layer(name)
            check_bounds(group, layer.numel(site), f"site {site.value!r} of layer {name!r}")
            if site.transient and len(group) and int(group.image[-1]) >= n_images:  # a group is sorted by image
                raise IndexError(f"fault on image {int(group.image[-1])} but only {n_images} images are evaluated")

    def summary(self) -> list[dict[str, Any]]:
        return [layer.summary() for layer in self.layers.values()]

    def __repr__(self) -> str:
        return (f"QuantizedModel({self.source_name}, {len(self.layers)} layers, bits={self.config['bits']}, "
                f"bn_folded={len(self.folded)}, bn_kept={len(self.bn_kept)})")


@dataclass
class QuantLayer:
    """One quantized conv/linear layer: its codes, scales and shapes."""

    name: str
    module_type: str
    module: nn.Module = field(repr=False)
    bits: int
    weight_codes: torch.Tensor = field(repr=False)  # int32, the weight's shape
    weight_scale: torch.Tensor = field(repr=False)  # float32 [out_channels] (all equal when per-tensor)
    input_scale: float
    act_scale: float
    input_shape: tuple[int, ...]  # per image
    output_shape: tuple[int, ...]  # per image
    channel_axis: int  # of the per-image output: 0 for conv, -1 for linear
    input_source: str | None = None  # the quantized layer whose output codes this layer reads directly
    # Whether the module hands on its output codes as they are (every reader of its output reads codes), and
    # whether the tensor entering the module holds its input codes already (handed on so by `input_source`).
    hands_on_codes: bool = False
    reads_codes: bool = False
    # Code ranges, as code - zero point. Own quantization: symmetric signed, zero point 0. A torch.ao model's
    # activations: unsigned quint8 codes q with (q - zero point) x scale; a fused ReLU clamps at the zero point.
    input_range: tuple[int, int] | None = None
    act_range: tuple[int, int] | None = None
    input_zero_point: int = 0
    act_zero_point: int = 0
    signed_activations: bool = True  # stored codes: two's complement (int8) or unsigned (uint8)
    signed_inputs: bool | None = None  # the input codes' signedness where it differs from the output's
    act_clip_rate: float = 0.0
    input_clip_rate: float = 0.0
    # int32 bias codes at the accumulator scale (float32, shaped to broadcast over a batch of outputs), added to
    # the accumulator by the engine: None when the layer has no bias.
    bias_codes: torch.Tensor | None = field(default=None, repr=False)
    # A deployed model's requantization as its runtime computes it (`deployed.BiasMode`): the per-channel float32
    # multiplier acc_scale / act_scale in the runtime's arithmetic, and a float bias / act_scale added unrounded
    # after scaling (shaped like bias_codes; None where the bias is integer or absent).
    multiplier: torch.Tensor | None = field(default=None, repr=False)
    float_bias_codes: torch.Tensor | None = field(default=None, repr=False)
    # A torch.ao kernel's own float32 steps (`deployed.Scaling`): fbgemm adds a float bias to the float32 accumulator
    # before the multiplier (here, the bias / (input scale x weight scale)); oneDNN multiplies by the input scale
    # first and by 1 / output scale last (`step_scales`: those two; the multiplier is then the weight scale, and
    # float_bias_codes the bias as it is, added between them).
    float_bias_before: torch.Tensor | None = field(default=None, repr=False)
    step_scales: tuple[float, float] | None = None
    # A deployed layer whose runtime keeps its result in float (a PT2E conv feeding a residual add, the logits):
    # the multiplier turns the accumulator into values, the float bias is added as it is, nothing is rounded, and
    # the layer has no output codes (no act site, no output zero point register).
    float_output: bool = False
    # A float-output layer that hands on its raw accumulator (exact, in its compute dtype) for a module after it to
    # scale (`deployed.DeployedLayer.raw_output`: a dynamic layer); its multiplier is the weight scale that module
    # reads, so qparams faults still reach it.
    raw_output: bool = False
    zero_point_before_rounding: bool = False  # `deployed.DeployedLayer.zero_point_before_rounding`
    calls: int = 1  # runs per forward pass (a recurrent cell's hidden matmul: one per time step)
    # A matmul of two activations: its second operand's per-image shape and scale (its weight_codes are empty and
    # its weight_scale holds this scale, so that acc_scale is the product of the two input scales).
    second_input_shape: tuple[int, ...] | None = None
    second_input_scale: float = 1.0
    acc_bits: int = ACC_BITS  # the accumulator's width (`spec.acc_bits_for`)
    # float32 holds every partial sum exactly below 2^24; wider sums are computed in float64 (exact below 2^53)
    compute_dtype: torch.dtype = torch.float32
    # Layers whose modules share one weight tensor in the model (tied weights) share its stored codes: memory holds
    # them once, so one fault reaches every layer that reads them. All names of the group, this one included.
    weight_group: tuple[str, ...] = ()
    # The model's own ops that read the layer's output and nothing else does, one after the other ("relu", "add":
    # `graph.in_place_chains`): they run in place on it (`inplace.OwnOpsInPlace`), with the same values.
    in_place: tuple[str, ...] = ()

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def acc_scale(self) -> torch.Tensor:
        return self.weight_scale * self.input_scale

    def __post_init__(self) -> None:
        if self.input_range is None:
            self.input_range = (-self.qmax, self.qmax)
        if self.act_range is None:
            self.act_range = (-self.qmax, self.qmax)

    def requant_multiplier(self) -> torch.Tensor:
        """acc_scale / act_scale per output channel, shaped to broadcast over the layer's output."""
        m = self.multiplier if self.multiplier is not None else (
            self.weight_scale.double() * self.input_scale / self.act_scale).float()
        return m.reshape(self.channel_shape())

    def channel_shape(self) -> tuple[int, ...]:
        """The shape of a per-output-channel tensor that broadcasts over a batch of the layer's outputs."""
        if self.channel_axis == -1:
            return (-1,)
        return (-1, *([1] * (len(self.output_shape) - 1 - self.channel_axis)))

    def output_channel(self, index: int) -> int:
        """The output channel of element `index` of an image's output (row-major)."""
        shape = self.output_shape
        if self.channel_axis == -1:
            return index % shape[-1]
        return index // max(1, math.prod(shape[self.channel_axis + 1:])) % shape[self.channel_axis]

    @property
    def handed_on_scale(self) -> float:
        """The scale of what the module hands on: 1 when it hands on codes, else the activation scale."""
        return 1.0 if self.hands_on_codes else self.act_scale

    def dequantize_output(self, out: torch.Tensor) -> torch.Tensor:
        """What the module handed on, as values (code x act scale)."""
        return out * self.act_scale if self.hands_on_codes else out

    def dequantize_input(self, received: torch.Tensor) -> torch.Tensor:
        """The tensor entering the module (before the engine's hooks), as values."""
        return received * self.input_scale if self.reads_codes else received

    def parts(self, site: Site) -> list[tuple[int, ...]]:
        """The per-image shapes of the tensors that make up one site, in the order fault indices count them: per
        call (a recurrent cell's hidden matmul runs once per time step), each operand (a matmul of two activations
        reads two input-code tensors)."""
        if site is Site.WEIGHT:
            return [tuple(self.weight_codes.shape)]
        if site is Site.QPARAMS:  # a multiplier per output channel, then the output zero point
            return [(self.weight_scale.numel() + (0 if self.float_output else 1),)]
        if site is Site.ACT and self.float_output:
            return []
        if site is Site.INPUT:
            per_call = [self.input_shape] + ([self.second_input_shape] if self.second_input_shape is not None else [])
        else:
            per_call = [self.output_shape]
        return per_call * self.calls

    def numel(self, site: Site) -> int:
        return sum(math.prod(shape) for shape in self.parts(site))

    def weight_bits(self) -> int:
        """Bits of the stored weight codes (0 for a matmul of two activations)."""
        return int(self.weight_codes.numel()) * self.bits

    def macs(self) -> int:
        """Multiply-accumulates of one image through the layer: each output code sums fan-in products, per call."""
        if output_channel_groups(self.module) is not None:  # a transposed conv: every input code meets every weight
            return math.prod(self.input_shape) * math.prod(self.weight_codes.shape[1:]) * self.calls
        if self.weight_codes.numel():
            fan_in = math.prod(self.weight_codes.shape[1:])
        else:  # a matmul of activations: the first operand's last dimension is the contraction
            fan_in = self.input_shape[-1] if self.input_shape else 1
        return math.prod(self.output_shape) * int(fan_in) * self.calls

    def weight_channel(self, index: int) -> int:
        """The output channel whose weights hold the flat (row-major) weight code `index`."""
        shape = tuple(self.weight_codes.shape)
        groups = output_channel_groups(self.module)
        if groups is None:
            return index // max(1, math.prod(shape[1:]))
        row, column = index // math.prod(shape[1:]), index // math.prod(shape[2:]) % shape[1]
        return row // (shape[0] // groups) * shape[1] + column

    def qparam_words(self) -> torch.Tensor:
        """The stored words of site qparams as signed 32-bit integers: each channel's float32 multiplier's raw bits,
        then the output zero point."""
        raw = self.requant_multiplier().reshape(-1).contiguous().view(torch.int32).to(torch.int64).cpu()
        return raw if self.float_output else torch.cat([raw, torch.tensor([self.act_zero_point])])

    def site_bits(self, site: Site) -> int:
        return self.acc_bits if site is Site.ACC else QPARAM_BITS if site is Site.QPARAMS else self.bits

    def scale_of(self, site: Site) -> float:
        """A representative scale of one site (max over channels where per-channel)."""
        if site is Site.ACT:
            return self.act_scale
        if site is Site.INPUT:
            return self.input_scale
        scale = self.weight_scale if site is Site.WEIGHT else self.acc_scale
        return float(scale.max())

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.module_type,
            "bits": self.bits,
            "weight_scale_max": float(self.weight_scale.max()),
            "weight_scale_mean": float(self.weight_scale.mean()),
            "input_scale": self.input_scale,
            "act_scale": self.act_scale,
            "input_zero_point": self.input_zero_point,
            "act_zero_point": self.act_zero_point,
            "signed_activations": self.signed_activations,
            "act_clip_rate": self.act_clip_rate,
            "input_clip_rate": self.input_clip_rate,
            "input_source": self.input_source,
            "hands_on_codes": self.hands_on_codes,
            "output_shape": list(self.output_shape),
            "weight_bits": self.weight_bits(),
            "macs": self.macs(),
            "weight_shared_with": [name for name in self.weight_group if name != self.name],
        }


@dataclass
class _Runtime:
    """What the hooks of one forward pass read: this batch's transient faults, and scratch buffers; and what they
    leave for the next batch: the strides of each layer's input and output tensors in the last forward pass, so
    that `prepare` can place the next faults in the memory layout the tensors will have."""

    batch: dict[tuple[Any, ...], Edit] = field(default_factory=dict)
    scratch: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)
    strides: dict[tuple[Any, ...], tuple[int, ...]] = field(default_factory=dict)  # per edit key (see `prepare`)
    calls: dict[str, int] = field(default_factory=dict)  # this forward pass: how often each layer ran so far
    # the model's own ReLUs and sums that run in place on layer outputs in this forward pass, if any (`inplace`)
    own_ops: OwnOpsInPlace | None = None
    # qparams faults of this trial: the output zero point register's value minus the zero point, per faulty layer
    zero_offsets: dict[str, int] = field(default_factory=dict)
    # pe faults of this trial: the systolic array's (rows, cols) and its faulty PE registers
    pe: tuple[int, int, list[PEFault]] | None = None
    # range restriction: per layer, the [min, max] its handed-on output is clamped to after act faults; and, in a
    # recording pass (`QuantizedModel.output_ranges`), the ranges seen so far
    bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    channels_last: bool = False  # image layers compute channels-last (see `quantize`'s `memory_format`)

    def input_buffer(self, like: torch.Tensor, layout: torch.memory_format | None, dtype: torch.dtype | None = None,
                     operand: int = 0) -> torch.Tensor:
        """A reusable tensor shaped like `like`, for a layer's input codes: in memory `layout`, or laid out like
        `like` when None.

        A fresh 8 MB tensor costs ~6x an in-place pass over it on CPU (the allocator returns the pages and they
        fault back in); one buffer per per-image shape and layout serves every layer, because a layer's input
        codes are dead once its conv/linear has run, and each layer runs once per forward. Only in inference mode:
        autograd would keep the input for backward."""
        layout, dtype = layout or torch.preserve_format, dtype or like.dtype
        if not torch.is_inference_mode_enabled():
            return torch.empty_like(like, memory_format=layout, dtype=dtype)
        # a matmul's two operands are live at once: one buffer each
        key = (tuple(like.shape[1:]), layout, like.stride()[1:], dtype, like.device, operand)
        buffer = self.scratch.get(key)
        if buffer is None or buffer.shape[0] < like.shape[0]:
            buffer = torch.empty_like(like, memory_format=layout, dtype=dtype)
            self.scratch[key] = buffer
        return buffer[: like.shape[0]]


@contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """TF32 off for the block on a CUDA device: cuDNN convolutions use TF32 by default on Ampere and later GPUs,
    which keeps 10 mantissa bits of each input, so codes wider than 11 bits would not be summed exactly."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
