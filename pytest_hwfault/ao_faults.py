"""A torch.ao model run by torch's own quantized kernels under a fault pattern, and the load check built on it.

The view of a static torch.ao model is checked against the model fault-free when read; faults move codes where
calibration never goes (a flipped high bit), where a kernel can compute otherwise (a saturating sum, another
engine's arithmetic). `agreement_under_faults` runs one trial of act faults through both, as `onnx_faults` does for
onnxruntime.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def ao_under_faults(model: nn.Module, pattern: Any) -> nn.Module:
    """A copy of the torch.ao model (eager or FX) under the faults of `pattern`, computed by torch's own quantized
    kernels: each faulted layer's output codes XORed with the pattern's masks by a forward hook (act), its int8
    weight codes flipped and repacked (weight)."""
    faulty = copy.deepcopy(model)
    for (site, name), group in pattern.groups.items():
        # a dynamic layer's view is named after the Linear inside the model's wrapper ("fc.linear" for "fc")
        module: Any = faulty.get_submodule(name if _has_submodule(faulty, name) else name.rsplit(".", 1)[0])
        masks = (torch.ones_like(group.bit) << group.bit).to(torch.uint8)
        if site.value == "weight":
            weight = module.weight()
            # an int8 code's bits, row-major (qnnpack hands its weight back channels-last)
            edited = weight.int_repr().contiguous().clone().view(-1).view(torch.uint8)
            for index, mask in zip(group.index.tolist(), masks.tolist()):
                edited[index] ^= mask
            codes = edited.view(torch.int8).view(weight.shape)
            if weight.qscheme() == torch.per_channel_affine:
                weight = torch._make_per_channel_quantized_tensor(codes, weight.q_per_channel_scales(),
                                                                  weight.q_per_channel_zero_points(),
                                                                  weight.q_per_channel_axis())
            else:
                weight = torch._make_per_tensor_quantized_tensor(codes, weight.q_scale(), weight.q_zero_point())
            module.set_weight_bias(weight, module.bias())
            continue
        assert site.value == "act", site

        def edit(module: nn.Module, args: tuple, out: torch.Tensor, group: Any = group,
                 masks: torch.Tensor = masks) -> torch.Tensor:
            codes = out.int_repr().contiguous().clone().view(len(out), -1)  # the runtime computes channels-last
            for image, index, mask in zip(group.image.tolist(), group.index.tolist(), masks.tolist()):
                codes[image, index] ^= mask  # quint8 codes: bit 7 is worth 128 codes, no sign
            edited = torch._make_per_tensor_quantized_tensor(codes.view(out.shape), out.q_scale(), out.q_zero_point())
            if out.dim() == 4 and not out.is_contiguous():  # the layout the runtime gave it: kernels that follow
                edited = edited.contiguous(memory_format=torch.channels_last)  # (a mean) compute by layout
            return edited

        module.register_forward_hook(edit)
    return faulty


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def agreement_under_faults(model: nn.Module, qmodel: Any, images: torch.Tensor, ber: float = 1e-3
                           ) -> tuple[str, bool | None]:
    """The view of a static torch.ao model under one trial of act faults at `ber` (a fixed seed) against the model
    under the same faults (`ao_under_faults`), on `images`, in words, and whether the outputs are equal bit for bit
    (None: not checked, saying why)."""
    from torch.utils._pytree import tree_leaves

    from .data import call_model
    from .deployed import load_check_pattern, trial_agreement
    from .layer_agreement import layer_agreement
    from .quantization import LAYER_CHECK_IMAGES

    pattern = load_check_pattern(qmodel, len(images), ber, "torch.ao load check under faults")
    if pattern is None:
        return "not checked against the model under faults: the view has no act site", None
    engine = torch.backends.quantized.engine
    try:
        with torch.no_grad():
            faulty = ao_under_faults(model, pattern).eval()
            theirs = [t.dequantize() if t.is_quantized else t for t in tree_leaves(call_model(faulty, images))
                      if isinstance(t, torch.Tensor)]
    except Exception as error:  # noqa: BLE001 - no check, said so: the fault-free one stands alone
        reason = str(error).splitlines()[0][:200] if str(error) else ""
        return (f"not checked against the model under faults ({type(error).__name__}: {reason}): its arithmetic on "
                "faulty codes is known from the fault-free check and the kernels' probes only"), None
    against = f"the model (torch's quantized kernels, engine {engine!r})"
    cause = ": the model's kernels compute faulty codes otherwise than the engine reproduces them"
    note, equal = trial_agreement(qmodel, images, pattern, theirs, against, ber, cause)
    few = images[:LAYER_CHECK_IMAGES]
    restricted = pattern.restricted_to(torch.arange(len(few)))
    with torch.no_grad():
        faulty = ao_under_faults(model, restricted).eval()
    layers_apart = layer_agreement(faulty, qmodel, lambda: call_model(faulty, few), lambda: qmodel(few, restricted))
    if layers_apart.apart:
        return f"{note}; layer by layer on {len(few)} of the images: {layers_apart.describe()}{cause}", False
    layers = f"output codes of its {layers_apart.compared} quantized layers equal on {len(few)} of them, and"
    return note.replace(": outputs equal bit for bit", f": {layers} outputs equal bit for bit"), equal
