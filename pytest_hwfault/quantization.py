"""Quantize any PyTorch model into a fault-injectable *view*, leaving the user's module untouched.

What is quantized, and where (see also docs/architecture.md):

- The view works on a private deep copy of the model in eval mode (and a second, float copy for the float
  baseline); the user's parameters, buffers, hooks and training flag are never touched.
- BatchNorm that directly follows a conv/linear (found by torch.fx tracing) is folded into it first, as an
  accelerator does. A model that fx cannot trace keeps its BatchNorm in float after the quantized layer
  (`QuantizedModel.bn_kept` lists them, `fold_error` says why).
- Every Conv1d/2d/3d and Linear module becomes a quantized layer that computes in integers, as the accelerator:
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
- A model already quantized with torch.ao eager mode keeps its own int8 weight codes and scales and its quint8
  activation scales and zero points (see `ao.py`).
- Codes are symmetric with the restricted range [-(2^(N-1)-1), 2^(N-1)-1]; a fault may produce -2^(N-1).
- Dequantized value == code x scale exactly, in float32.
- Scales come from calibration over the data given: torch.ao observers (MinMax / PerChannelMinMax) for
  ``calibration="max"``; the given percentile of |x| for ``calibration="percentile"``, whose clip rate (the share
  of calibration values beyond the quantization range) is then reported per layer.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from .ao import AoLayer, convert_ao_modules, has_ao_modules
from .data import iter_batches
from .faults import ACC_BITS, FaultPattern, FaultTarget, LayerFaults, LayerSelector, Site, select_layers
from .graph import code_links, fold_batchnorm
from .inject import Edit, apply_edit, apply_edit_to, check_bounds, compose, contiguous_strides, is_dense, relayout

QUANTIZABLE: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
ACT_GRANULARITIES = ("per_tensor",)
CALIBRATIONS = ("max", "percentile")
MEMORY_FORMATS = ("auto", "channels_last", "preserve")
MAX_LAYER_BITS = 16
_PERCENTILE_SAMPLES_PER_BATCH = 1 << 16


class NoQuantizableLayerError(ValueError):
    pass


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
    signed_activations: bool = True
    act_clip_rate: float = 0.0
    input_clip_rate: float = 0.0
    # int32 bias codes at the accumulator scale (float32, shaped to broadcast over a batch of outputs), added to
    # the accumulator by the engine: None when the layer has no bias.
    bias_codes: torch.Tensor | None = field(default=None, repr=False)

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
        m = (self.weight_scale.double() * self.input_scale / self.act_scale).float()
        if self.channel_axis == -1:
            return m
        return m.reshape(-1, *([1] * (len(self.output_shape) - 1)))

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

    def numel(self, site: Site) -> int:
        if site is Site.WEIGHT:
            return self.weight_codes.numel()
        shape = self.input_shape if site is Site.INPUT else self.output_shape
        return math.prod(shape)

    def site_bits(self, site: Site) -> int:
        return ACC_BITS if site is Site.ACC else self.bits

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
            "act_clip_rate": self.act_clip_rate,
            "input_clip_rate": self.input_clip_rate,
            "input_source": self.input_source,
            "hands_on_codes": self.hands_on_codes,
            "output_shape": list(self.output_shape),
        }


@dataclass
class _Runtime:
    """What the hooks of one forward pass read: this batch's transient faults, and scratch buffers; and what they
    leave for the next batch: the strides of each layer's input and output tensors in the last forward pass, so
    that `prepare` can place the next faults in the memory layout the tensors will have."""

    batch: dict[tuple[Site, str], Edit] = field(default_factory=dict)
    scratch: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)
    input_strides: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output_strides: dict[str, tuple[int, ...]] = field(default_factory=dict)

    channels_last: bool = False  # image layers compute channels-last (see `quantize`'s `memory_format`)

    def input_buffer(self, like: torch.Tensor, layout: torch.memory_format | None) -> torch.Tensor:
        """A reusable tensor shaped like `like`, for a layer's input codes: in memory `layout`, or laid out like
        `like` when None.

        A fresh 8 MB tensor costs ~6x an in-place pass over it on CPU (the allocator returns the pages and they
        fault back in); one buffer per per-image shape and layout serves every layer, because a layer's input
        codes are dead once its conv/linear has run, and each layer runs once per forward. Only in inference mode:
        autograd would keep the input for backward."""
        layout = layout or torch.preserve_format
        if not torch.is_inference_mode_enabled():
            return torch.empty_like(like, memory_format=layout)
        key = (tuple(like.shape[1:]), layout, like.stride()[1:], like.dtype, like.device)
        buffer = self.scratch.get(key)
        if buffer is None or buffer.shape[0] < like.shape[0]:
            buffer = torch.empty_like(like, memory_format=layout)
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


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by the rank of a batch of images
# Per layer type: the channels-last layout of a batch of its images.
_IMAGE_LAYOUTS: dict[type[nn.Module], torch.memory_format] = {nn.Conv2d: CHANNELS_LAST[4], nn.Conv3d: CHANNELS_LAST[5]}


def _in_layouts(positions: torch.Tensor, group: torch.Tensor, shapes: list[tuple[int, ...]],
                layouts: list[tuple[int, ...]]) -> torch.Tensor:
    """Row-major positions of each group's tensor (of `shapes`) as memory offsets in its layout (`layouts`),
    vectorised over all groups; unchanged where every layout is contiguous."""
    plan = _layout_plan(tuple(shapes), tuple(layouts), positions.device)
    if plan is None:
        return positions
    if isinstance(plan, tuple):  # every layout row-major or channels-last: (image, channel, spatial) arithmetic
        per_image, channels = (t[group] for t in plan)
        image = torch.div(positions, per_image, rounding_mode="floor")
        index = positions - image * per_image
        spatial = torch.div(per_image, channels, rounding_mode="floor")
        channel = torch.div(index, spatial, rounding_mode="floor")
        return image.mul_(per_image).add_(index.sub_(channel * spatial).mul_(channels)).add_(channel)
    return relayout(positions, *plan.index_select(2, group))  # any dense layouts: per fault, [rank] each


def _channels_last_strides(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(shape) not in (4, 5):
        return None
    channels, spatial = shape[1], shape[2:]
    strides = [channels * math.prod(spatial), 1] + [channels * math.prod(spatial[i + 1:]) for i in range(len(spatial))]
    return tuple(strides)


@lru_cache(maxsize=64)
def _layout_plan(shapes: tuple[tuple[int, ...], ...], layouts: tuple[tuple[int, ...], ...], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None:
    """How to map row-major positions to the groups' layouts. None: all row-major. Per group (elements per image,
    channels) when each layout is row-major (channels 1) or channels-last, the common case and ~5x cheaper at
    high fault counts. Else [3, rank, groups]: sizes, row-major strides and layout strides, padded to one rank.
    Cached: a campaign asks for the same few plans at every trial."""
    contiguous = [contiguous_strides(shape) for shape in shapes]
    if list(layouts) == contiguous:
        return None
    if all(lay in (row, _channels_last_strides(shape)) for shape, lay, row in zip(shapes, layouts, contiguous)):
        per_image = [math.prod(shape[1:]) for shape in shapes]
        channels = [1 if lay == row else shape[1] for shape, lay, row in zip(shapes, layouts, contiguous)]
        return torch.tensor(per_image, device=device), torch.tensor(channels, device=device)
    rank = max(map(len, shapes))

    def table(rows: list[tuple[int, ...]] | tuple[tuple[int, ...], ...], pad: int) -> list[list[int]]:
        return [[*row, *([pad] * (rank - len(row)))] for row in rows]

    rows = [table(shapes, 1), table(contiguous, 1), table(layouts, 0)]
    return torch.tensor(rows, device=device).transpose(1, 2).contiguous()


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def _symmetric_scale(absmax: float, qmax: int) -> float:
    return max(absmax, 1e-12) / qmax


class _ActStats:
    """Calibration statistics of one tensor stream: torch's MinMaxObserver, or a subsample for percentiles."""

    def __init__(self, calibration: str, bits: int) -> None:
        qmax = (1 << (bits - 1)) - 1
        self.observer = MinMaxObserver(
            dtype=torch.qint8 if bits <= 8 else torch.qint32,
            qscheme=torch.per_tensor_symmetric,
            quant_min=-qmax,
            quant_max=qmax,
        )
        self.percentile_sample: list[torch.Tensor] | None = [] if calibration == "percentile" else None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.observer(x)
        if self.percentile_sample is not None:
            flat = x.abs().reshape(-1)
            stride = max(1, flat.numel() // _PERCENTILE_SAMPLES_PER_BATCH)
            self.percentile_sample.append(flat[::stride].cpu())

    def scale(self, qmax: int, percentile: float) -> float:
        if self.percentile_sample is not None:
            sample = torch.cat(self.percentile_sample).double()
            absmax = float(torch.quantile(sample, percentile / 100.0)) if sample.numel() < (1 << 24) else float(
                torch.kthvalue(sample, max(1, int(sample.numel() * percentile / 100.0))).values
            )
            return _symmetric_scale(absmax, qmax)
        return float(self.observer.calculate_qparams()[0])


def _weight_codes(weight: torch.Tensor, bits: int, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def _plain_weight(module: nn.Module) -> None:
    """Make the (private copy's) weight a plain parameter holding its current value: weight_norm recomputes
    `.weight` at every call, which would undo the codes written into it."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        # Removing a parametrization from a deep copy deletes the property from the class that the copy shares
        # with the user's module, which would break the user's model: refuse instead.
        raise ValueError(
            f"{type(module).__qualname__} has parametrized tensors {list(module.parametrizations.keys())} "  # type: ignore[union-attr,operator]
            "(weight_norm, spectral_norm, ...); quantize a copy after "
            "torch.nn.utils.parametrize.remove_parametrizations(module, name, leave_parametrized=True)"
        )
    hook: Any
    for hook in list(module._forward_pre_hooks.values()):
        if type(hook).__name__ == "WeightNorm":  # torch.nn.utils.weight_norm (the deprecated form)
            torch.nn.utils.remove_weight_norm(module, hook.name)


def state_checksum(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, names and bytes: bit-exact identity of a model's state."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        if not isinstance(tensor, torch.Tensor):  # e.g. the dtype entry of torch.ao packed parameters
            digest.update(repr(tensor).encode())
            continue
        if tensor.is_quantized:
            digest.update(repr(tensor.qscheme()).encode())
            tensor = tensor.int_repr()
        t = tensor.detach().cpu().contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


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
    ) -> None:
        self.module = module
        self.float_module = float_module
        self.layers = layers
        self.config = config
        self.folded = folded
        self.bn_kept = bn_kept
        self.fold_error = fold_error
        self.source_name = source_name
        self._runtime = _Runtime()
        self._handles = [h for layer in layers.values() for h in self._install(layer)]
        self._choose_layout()

    def _choose_layout(self) -> None:
        policy = self.config.get("memory_format", "preserve")
        self._runtime.channels_last = policy == "channels_last" or (policy == "auto" and self.device.type == "cpu")

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _install(self, layer: QuantLayer) -> list[Any]:
        runtime, name, bits = self._runtime, layer.name, layer.bits
        inv_input_scale, act_scale = 1.0 / layer.input_scale, layer.act_scale
        (in_low, in_high), (act_low, act_high) = layer.input_range or (0, 0), layer.act_range or (0, 0)
        in_zero, act_zero, signed = layer.input_zero_point, layer.act_zero_point, layer.signed_activations
        requant = layer.requant_multiplier()
        image_layout = _IMAGE_LAYOUTS.get(type(layer.module))
        hands_on_codes, reads_codes = layer.hands_on_codes, layer.reads_codes

        def to_input_codes(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            edit = runtime.batch.get((Site.INPUT, name))
            if reads_codes:  # the producer's codes as they are; others may read them too, so edit a copy
                if edit is not None:
                    x = runtime.input_buffer(x, None).copy_(x)
            else:  # written in the layer's compute layout while they are computed: no extra pass
                layout = image_layout if runtime.channels_last and CHANNELS_LAST.get(x.dim()) is image_layout else None
                x = torch.mul(x, inv_input_scale, out=runtime.input_buffer(x, layout)).round_()
                if layer.input_source is None:  # a producer's codes are in range already
                    x.clamp_(in_low, in_high)
            runtime.input_strides[name] = x.stride()
            if edit is not None:
                x = apply_edit_to(x, edit, bits, in_zero, signed)
            return (x, *args[1:])

        def requantize(module: nn.Module, args: tuple[Any, ...], acc: torch.Tensor) -> torch.Tensor:
            # The bias is added here, in place, not inside the conv: oneDNN's fused bias costs ~10x this pass.
            if layer.bias_codes is not None:
                acc.add_(layer.bias_codes)
            runtime.output_strides[name] = acc.stride()
            edit = runtime.batch.get((Site.ACC, name))
            if edit is not None:
                acc = apply_edit_to(acc, edit, ACC_BITS)
            # In place on the layer's own fresh result. Four vectorised passes: torch's
            # fake_quantize_per_tensor_affine is ~10x slower on CPU (it also builds a gradient mask).
            out = acc.mul_(requant).round_().clamp_(act_low, act_high)
            if not hands_on_codes:
                out.mul_(act_scale)
            edit = runtime.batch.get((Site.ACT, name))
            if edit is not None:
                out = apply_edit_to(out, edit, bits, act_zero, signed)
            return out

        return [
            layer.module.register_forward_pre_hook(to_input_codes),
            layer.module.register_forward_hook(requantize),
        ]

    def _weight_edit(self, faults: LayerFaults) -> Edit:
        """The edit of one layer's weight codes (held as integers: scale 1), on the model's device."""
        faults = faults.to(self.device)
        return compose(faults.index, faults.bit, faults.kind, torch.ones(len(faults), device=self.device))

    def prepare(self, faults: FaultPattern | None, start: int, stop: int) -> dict[tuple[Site, str], Edit]:
        """The transient faults of images [start, stop), as edits the hooks apply.

        Done for all layers at once: a BER campaign spreads a few faults over every layer, and per-layer tensor
        ops (~60 per layer, a few microseconds each) would cost more than the faults themselves."""
        if faults is None:
            return {}
        keys = [key for key, group in faults.groups.items() if key[0].transient and len(group)]
        if not keys:
            return {}
        device = self.device
        layers = [self._layer(name) for _, name in keys]
        groups = [faults.groups[key] for key in keys]
        sizes = torch.tensor([len(g) for g in groups], device=device)
        group_id = torch.repeat_interleave(torch.arange(len(keys), device=device), sizes)
        image, index, bit, kind = (torch.cat([getattr(g, f) for g in groups]).to(device)
                                   for f in ("image", "index", "bit", "kind"))
        in_batch = (image >= start) & (image < stop)
        if not bool(in_batch.all()):
            group_id, image, index, bit, kind = (t[in_batch] for t in (group_id, image, index, bit, kind))
        numel_of = [layer.numel(site) for layer, (site, _) in zip(layers, keys)]
        numel = torch.tensor(numel_of, device=device)[group_id]
        out_of_range = index >= numel
        if bool(out_of_range.any()):
            g = int(group_id[out_of_range][0])
            check_bounds(faults.groups[keys[g]], numel_of[g], f"site {keys[g][0].value!r} of layer {keys[g][1]!r}")
        # One key space for every (layer, code): layer g's codes of this batch occupy [g * span, (g + 1) * span).
        span = max(numel_of) * (stop - start)
        if span * len(keys) >= 1 << 62:
            raise ValueError(f"{len(keys)} layers of up to {max(numel_of)} codes x {stop - start} images exceed "
                             "int64 positions; use a smaller batch")
        scales = torch.tensor([layer.handed_on_scale if site is Site.ACT else 1.0
                               for layer, (site, _) in zip(layers, keys)], dtype=torch.float32, device=device)
        edit = compose(group_id * span + (image - start) * numel + index, bit, kind, scales[group_id])
        group = torch.div(edit.linear, span, rounding_mode="floor")
        counts = torch.bincount(group, minlength=len(keys)).tolist()
        shapes = [(stop - start, *(layer.input_shape if site is Site.INPUT else layer.output_shape))
                  for layer, (site, _) in zip(layers, keys)]
        layouts = [self._expected_strides(site, name, shape) for (site, name), shape in zip(keys, shapes)]
        edit.linear = _in_layouts(edit.linear % span, group, shapes, layouts)
        linear, keep, set_, flip, scale = (torch.split(t, counts) for t in (edit.linear, edit.keep, edit.set,
                                                                           edit.flip, edit.scale))
        return {key: Edit(linear[g], keep[g], set_[g], flip[g], scale[g], strides=layouts[g])
                for g, key in enumerate(keys) if counts[g]}

    def _expected_strides(self, site: Site, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The strides the (site, layer) tensor had in the last forward pass, if dense; else contiguous ones."""
        seen = (self._runtime.input_strides if site is Site.INPUT else self._runtime.output_strides).get(name)
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
        for layer in self.layers.values():
            layer.weight_codes = layer.weight_codes.to(device)
            layer.weight_scale = layer.weight_scale.to(device)
            if layer.bias_codes is not None:
                layer.bias_codes = layer.bias_codes.to(device)
        self._choose_layout()
        return self

    def __call__(self, x: torch.Tensor, faults: FaultPattern | None = None, image_offset: int = 0) -> torch.Tensor:
        return self.forward(x, faults, image_offset)

    def forward(self, x: torch.Tensor, faults: FaultPattern | None = None, image_offset: int = 0) -> torch.Tensor:
        """Quantized forward of a batch whose first image is image `image_offset` of the faults' numbering."""
        if faults is not None and faults.has_weight_faults():
            with self.weight_faults(faults):
                return self._forward(x, faults, image_offset)
        return self._forward(x, faults, image_offset)

    def _forward(self, x: torch.Tensor, faults: FaultPattern | None, image_offset: int) -> torch.Tensor:
        return self.run_batch(x, self.prepare(faults, image_offset, image_offset + len(x)))

    def run_batch(self, x: torch.Tensor, edits: dict[tuple[Site, str], Edit]) -> torch.Tensor:
        """Quantized forward of one batch with prepared transient edits (see `prepare`)."""
        return self.run_graph(self.module, (x.to(self.device),), edits)

    def run_graph(self, module: nn.Module, args: tuple[Any, ...], edits: dict[tuple[Site, str], Edit]) -> Any:
        """Call `module` (a graph over this view's layers, such as a torch.fx suffix of it) with prepared transient
        edits active, as `run_batch` does for the whole model."""
        self._runtime.batch = edits
        try:
            with torch.inference_mode(), exact_float32(self.device):
                return module(*args)
        finally:
            self._runtime.batch = {}

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The float model (a private eval-mode copy), for the float baseline accuracy; image batches go in in the
        layout the quantized view computes in."""
        x = x.to(self.device)
        if self._runtime.channels_last and x.dim() in CHANNELS_LAST:
            x = x.contiguous(memory_format=CHANNELS_LAST[x.dim()])
        with torch.inference_mode():
            return self.float_module(x)

    @contextmanager
    def weight_faults(self, pattern: FaultPattern) -> Iterator[None]:
        """Apply the pattern's weight faults in place for the duration of the block, then restore every touched
        weight bit-exactly, also when the block raises. Cost: proportional to the number of faults."""
        saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for (site, name), group in pattern.groups.items():
                    if site.transient:
                        continue
                    layer = self._layer(name)
                    check_bounds(group, layer.numel(Site.WEIGHT), f"the weights of layer {name!r}")
                    edit = self._weight_edit(group)
                    weight = layer.module.weight
                    assert isinstance(weight, torch.Tensor)
                    flat = weight.view(-1)  # holds the integer codes
                    saved.append((flat, edit.linear, flat[edit.linear].clone()))
                    apply_edit(flat, edit, layer.bits)
            yield
        finally:
            with torch.no_grad():
                for flat, touched, original in reversed(saved):
                    flat[touched] = original

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
        return [
            FaultTarget(site, name, self.layers[name].numel(site), self.layers[name].site_bits(site))
            for name in self.select(layers)
        ]

    def validate(self, pattern: FaultPattern, n_images: int) -> None:
        """Raise a clear error if a pattern does not fit this model and `n_images` images."""
        for (site, name), group in pattern.groups.items():
            layer = self._layer(name)
            check_bounds(group, layer.numel(site), f"site {site.value!r} of layer {name!r}")
            if len(group) and int(group.bit.max()) >= layer.site_bits(site):
                raise ValueError(f"bit {int(group.bit.max())} does not exist in the {layer.site_bits(site)}-bit "
                                 f"{site.value} codes of layer {name!r}")
            if site.transient and len(group) and int(group.image.max()) >= n_images:
                raise IndexError(f"fault on image {int(group.image.max())} but only {n_images} images are evaluated")

    def summary(self) -> list[dict[str, Any]]:
        return [layer.summary() for layer in self.layers.values()]

    def __repr__(self) -> str:
        return (f"QuantizedModel({self.source_name}, {len(self.layers)} layers, bits={self.config['bits']}, "
                f"bn_folded={len(self.folded)}, bn_kept={len(self.bn_kept)})")


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
    forward hooks of your own that expect values. No result depends on it.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= MAX_LAYER_BITS:
        raise ValueError(f"bits={bits!r} must be an integer in [2, {MAX_LAYER_BITS}]")
    _check_choice("weight_granularity", weight_granularity, WEIGHT_GRANULARITIES)
    _check_choice("act_granularity", act_granularity, ACT_GRANULARITIES)
    _check_choice("calibration", calibration, CALIBRATIONS)
    _check_choice("memory_format", memory_format, MEMORY_FORMATS)
    if not isinstance(pass_codes, bool):
        raise ValueError(f"pass_codes={pass_codes!r} must be True or False")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile!r} must be in (50, 100]")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__qualname__}")
    source_name = type(model).__qualname__

    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    if device is None:
        first = next(work.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    work.to(device)
    ao_layers: dict[str, AoLayer] = {}
    if has_ao_modules(work):  # already quantized with torch.ao: use its codes and scales
        if bits != 8:
            raise ValueError(f"bits={bits}: a torch.ao quantized model holds 8-bit codes; use bits=8")
        ao_layers = convert_ao_modules(work, calibration_data, batch_size, device)
        fold_bn = False
    float_module = copy.deepcopy(work)
    folded, bn_kept, fold_error = fold_batchnorm(work) if fold_bn else ([], [], None)

    candidates = {name: m for name, m in work.named_modules()
                  if isinstance(m, QUANTIZABLE) and (not ao_layers or name in ao_layers)}
    for module in candidates.values():
        _plain_weight(module)
    if not candidates:
        kinds = sorted({type(m).__qualname__ for m in work.modules()} - {type(work).__qualname__})
        raise NoQuantizableLayerError(
            f"{source_name} has no quantizable layer: looked for modules of type "
            f"{', '.join(t.__name__ for t in QUANTIZABLE)}; "
            f"found only: {', '.join(kinds) or 'no submodules'}"
        )

    qmax = (1 << (bits - 1)) - 1
    stats_in = {name: _ActStats(calibration, bits) for name in candidates}
    stats_out = {name: _ActStats(calibration, bits) for name in candidates}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    calls: dict[str, int] = {}
    order: list[str] = []

    def observe(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
                return
            if name not in shapes:
                order.append(name)
                shapes[name] = (tuple(args[0].shape[1:]), tuple(out.shape[1:]))
            calls[name] = calls.get(name, 0) + 1
            stats_in[name].update(args[0])
            stats_out[name].update(out)

        return hook

    handles = [m.register_forward_hook(observe(name)) for name, m in candidates.items()]
    batches = 0
    try:
        with torch.no_grad():
            for x, _ in iter_batches(calibration_data, batch_size):
                work(x.to(device))
                batches += 1
    finally:
        for h in handles:
            h.remove()
    if batches == 0:
        raise ValueError("calibration_data is empty: give at least one batch of inputs")
    shared = [n for n in order if calls[n] != batches]
    if shared:
        raise ValueError(f"layers {shared} run more than once per forward pass; a module reused within one "
                         "forward cannot have per-call fault indices. Give each use its own module.")

    links = code_links(work, set(order))
    producers = links.producers
    act_scales = {name: stats_out[name].scale(qmax, percentile) for name in order}
    layers: dict[str, QuantLayer] = {}
    for name in order:
        module = candidates[name]
        source = producers.get(name)
        in_scale = act_scales[source] if source else stats_in[name].scale(qmax, percentile)
        act_scale = act_scales[name]
        ranges: dict[str, Any] = {}
        if name in ao_layers:
            ao = ao_layers[name]
            codes, w_scale, act_scale = ao.weight_codes, ao.weight_scale, ao.act_scale
            in_scale = ao.input_scale
            upstream = ao_layers.get(source or "")
            if upstream is None or (upstream.act_scale, upstream.act_zero_point) != (ao.input_scale,
                                                                                     ao.input_zero_point):
                source = None
            ranges = {"input_range": (-ao.input_zero_point, 255 - ao.input_zero_point),
                      "act_range": (0 if ao.fused_relu else -ao.act_zero_point, 255 - ao.act_zero_point),
                      "input_zero_point": ao.input_zero_point, "act_zero_point": ao.act_zero_point,
                      "signed_activations": False}
        else:
            assert isinstance(module.weight, torch.Tensor)
            codes, w_scale = _weight_codes(module.weight, bits, weight_granularity)
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
            output_shape=shapes[name][1],
            channel_axis=-1 if isinstance(module, nn.Linear) else 0,
            input_source=source,
            **ranges,
        )
    for producer in links.codes_only if pass_codes else ():  # every use reads its codes: hand them on as they are
        readers = [layers[reader] for reader, source in producers.items() if source == producer]
        if all(reader.input_source == producer for reader in readers):
            layers[producer].hands_on_codes = True
            for reader in readers:
                reader.reads_codes = True
    if calibration == "percentile" and not ao_layers:
        _measure_clip_rates(work, layers, calibration_data, batch_size, device)
    with torch.no_grad():  # the copy now computes on integer codes: exact sums, whatever the thread count
        for layer in layers.values():
            # New parameters, not in-place copies: a module that shares the weight (tied embeddings) keeps floats.
            bias = getattr(layer.module, "bias", None)
            if bias is not None:
                bias_codes = torch.clamp(torch.round(bias / layer.acc_scale.reshape(bias.shape)), -(2**31), 2**31 - 1)
                shape = (-1,) if layer.channel_axis == -1 else (-1, *([1] * (len(layer.output_shape) - 1)))
                layer.bias_codes = bias_codes.float().reshape(shape)
                setattr(layer.module, "bias", None)  # noqa: B010 - the engine adds bias_codes to the accumulator
            layer.module.weight = nn.Parameter(layer.weight_codes.float(), requires_grad=False)

    config = {
        "bits": bits,
        "weight_granularity": weight_granularity,
        "act_granularity": act_granularity,
        "calibration": calibration,
        "percentile": percentile if calibration == "percentile" else None,
        "fold_bn": fold_bn,
        "memory_format": memory_format,
        "pass_codes": pass_codes,
        "source": "torch.ao" if ao_layers else "calibrated",
    }
    return QuantizedModel(work, float_module, layers, config, folded, bn_kept, fold_error, source_name)


def _measure_clip_rates(
    work: nn.Module, layers: dict[str, QuantLayer], data: Any, batch_size: int, device: torch.device | str
) -> None:
    """Share of calibration values beyond each layer's quantization range, measured on the float model."""
    counts = {name: [0, 0, 0, 0] for name in layers}  # clipped inputs, inputs, clipped outputs, outputs

    def count(layer: QuantLayer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            c = counts[layer.name]
            c[0] += int((args[0].abs() > (layer.qmax + 0.5) * layer.input_scale).sum())
            c[1] += args[0].numel()
            c[2] += int((out.abs() > (layer.qmax + 0.5) * layer.act_scale).sum())
            c[3] += out.numel()

        return hook

    handles = [layer.module.register_forward_hook(count(layer)) for layer in layers.values()]
    try:
        with torch.no_grad():
            for x, _ in iter_batches(data, batch_size):
                work(x.to(device))
    finally:
        for h in handles:
            h.remove()
    for name, layer in layers.items():
        clipped_in, n_in, clipped_out, n_out = counts[name]
        layer.input_clip_rate = clipped_in / max(1, n_in)
        layer.act_clip_rate = clipped_out / max(1, n_out)
