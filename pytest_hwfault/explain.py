"""A found fault pattern, explained and replayed: per fault, where it lies and what it does to its code
(`describe_faults`, `format_details`), and the Python that rebuilds the exact pattern (`pattern_of`,
`replay_expression`, `replay_lines`).

A search reports its counterexample with these; a user replays it with `pattern_of`. Nothing here needs hypothesis
(this module does not import it), so a found pattern replays wherever the engine runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .bits import KIND_CODES, fault_delta
from .data import Batch
from .faults import Fault, FaultPattern, LayerFaults, Site, parse_kind, parse_site
from .spec import Kind
from .systolic import Array

if TYPE_CHECKING:
    from .qmodel import QuantizedModel


# -- explaining ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaultDetail:
    """One fault, in the numbers a person checks: where, which bit, the code and value before and after."""

    fault: Fault
    position: tuple[int, ...]  # multi-index into the weight tensor, or into one image's tensor
    width: int
    code_before: int
    code_after: int
    scale: float
    image: int | None  # the image whose codes are shown (transient sites); None for weights
    every_image: bool  # transient fault pinned to every image (before/after shown for `image`)
    note: str = ""  # what the fault is, in words, where no single stored code shows it (a PE's register)

    @property
    def value_before(self) -> float:
        return self.code_before * self.scale

    @property
    def value_after(self) -> float:
        return self.code_after * self.scale

    def to_dict(self) -> dict[str, Any]:
        f = self.fault
        return {"site": f.site, "layer": f.layer, "index": f.index, "position": list(self.position), "bit": f.bit,
                "kind": f.kind, "image": f.image, "every_image": self.every_image, "shown_image": self.image,
                "code_before": self.code_before, "code_after": self.code_after, "value_before": self.value_before,
                "value_after": self.value_after, "scale": self.scale, "note": self.note}


def _unravel(index: int, shape: Sequence[int]) -> tuple[int, ...]:
    position = []
    for size in reversed(shape):
        position.append(index % size)
        index //= size
    return tuple(reversed(position))


def _clean_codes(qmodel: QuantizedModel, site: Any, layer: str, x: Batch) -> torch.Tensor:
    """Fault-free codes of one image at a transient site of `layer`, flat: read with hooks placed around the
    engine's own (the accumulator before requantization, the output codes after it, the input codes after
    quantization)."""
    q = qmodel.layers[layer]
    seen: dict[str, torch.Tensor] = {}
    module = q.module
    if site is Site.INPUT:
        handle = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("codes", a[0].detach().clone()))
    elif site is Site.ACC:  # the module's own output lacks the bias, which the engine adds next
        bias = q.bias_codes if q.bias_codes is not None else 0.0
        handle = module.register_forward_hook(lambda m, a, o: seen.__setitem__("codes", o.detach() + bias),
                                              prepend=True)
    else:
        handle = module.register_forward_hook(
            lambda m, a, o: seen.__setitem__("codes", (o.detach() / q.handed_on_scale).round()))
    try:
        qmodel(x[None])
    finally:
        handle.remove()
    return seen["codes"].reshape(-1).round().to(dtype=seen["codes"].dtype)


def describe_faults(qmodel: QuantizedModel, faults: Sequence[Fault], inputs: Batch | None = None
                    ) -> list[FaultDetail]:
    """Per fault: its position, code before and after (faults on one code compose in order), dequantized values and
    scale. At transient sites the codes are those of the fault's image (image 0 when it strikes every image)."""
    details = []
    current: dict[tuple[str, str, int, int | None], int] = {}
    clean: dict[tuple[str, str, int | None], Any] = {}
    for fault in faults:
        site = Site(fault.site)
        if site is Site.PE:  # a register of the array: its value changes with every partial sum it holds
            array = Array.parse(fault.layer)
            details.append(FaultDetail(fault, array.position(fault.index), array.width, 0, 0, 0.0, None, False,
                                       array.describe(fault.index, fault.bit, fault.kind)))
            continue
        q = qmodel.layers[fault.layer]
        width = q.site_bits(site)
        shown = None if not site.transient else (fault.image if fault.image is not None else 0)
        if site is Site.WEIGHT:
            shape: Sequence[int] = tuple(q.weight_codes.shape)
            scale = float(q.weight_scale[q.weight_channel(fault.index)])
            codes = q.weight_codes.reshape(-1)
        elif site is Site.QPARAMS:  # raw words: a multiplier's IEEE-754 bits, or the zero point register
            codes = q.qparam_words()
            shape, scale = tuple(codes.shape), 1.0
        else:
            shape = q.input_shape if site is Site.INPUT else q.output_shape
            if inputs is None:
                raise ValueError("describing transient faults needs the inputs")
            key = (fault.site, fault.layer, shown)
            if key not in clean:
                clean[key] = _clean_codes(qmodel, site, fault.layer, inputs[shown or 0])
            codes = clean[key]
            if site is Site.INPUT:
                scale = q.input_scale
            elif site is Site.ACT:
                scale = q.act_scale
            else:
                scale = float(q.acc_scale[q.output_channel(fault.index)])
        slot = (fault.site, fault.layer, fault.index, shown)
        before = current.get(slot, int(codes[fault.index]))
        after = before + fault_delta(before, fault.bit, Kind(fault.kind), width)
        current[slot] = after
        details.append(FaultDetail(fault, _unravel(fault.index, shape), width, before, after, scale, shown,
                                   site.transient and fault.image is None))
    return details


def format_details(details: Sequence[FaultDetail]) -> list[str]:
    rows = [("#", "site", "layer", "index [position]", "bit", "kind", "code before -> after",
             "value before -> after", "scale", "image")]
    for i, d in enumerate(details, 1):
        f = d.fault
        sign = " (sign)" if f.bit == d.width - 1 else ""
        image = "-" if d.image is None else (f"every (shown: {d.image})" if d.every_image else str(d.image))
        if d.note:
            rows.append((str(i), f.site, repr(f.layer), f"{f.index} {list(d.position)}", str(f.bit), f.kind, d.note,
                         "-", "-", image))
            continue
        rows.append((str(i), f.site, repr(f.layer), f"{f.index} {list(d.position)}", f"{f.bit}{sign}", f.kind,
                     f"{d.code_before} -> {d.code_after}", f"{d.value_before:.6g} -> {d.value_after:.6g}",
                     f"{d.scale:.6g}", image))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


# -- replaying ------------------------------------------------------------------------------------------------------
def pattern_of(faults: Iterable[Fault], images: int | None = None) -> FaultPattern:
    """The exact `FaultPattern` of search faults over `images` evaluated images: a transient fault without an image
    strikes its code on each of images 0..images-1; every other fault is kept as it is. Faults on one code are
    applied in the order given."""
    rows: dict[tuple[Site, str], list[tuple[int, int, int, int]]] = {}
    pinned: set[tuple[Site, str]] = set()
    for fault in faults:
        site = parse_site(fault.site)
        code = KIND_CODES[parse_kind(fault.kind)]
        key = (site, fault.layer)
        if fault.index < 0 or fault.bit < 0 or (fault.image is not None and fault.image < 0):
            raise ValueError(f"{fault!r}: index, bit and image must be non-negative")
        if not site.transient and fault.image is not None:
            raise ValueError(f"{fault!r}: weight faults are shared by every image; give no image")
        if site.transient and fault.image is None:
            if images is None:
                raise ValueError(f"{fault!r} strikes every image: give the number of evaluated images")
            pinned.add(key)
            rows.setdefault(key, []).append((-2, fault.index, fault.bit, code))
        else:
            rows.setdefault(key, []).append((-1 if fault.image is None else fault.image, fault.index, fault.bit, code))
    groups: dict[tuple[Site, str], LayerFaults] = {}
    for key, values in rows.items():
        table = torch.tensor(values, dtype=torch.int64).reshape(-1, 4)
        table = torch.cat([table, torch.arange(len(table), dtype=torch.int64)[:, None]], dim=1)  # list order
        if key in pinned:
            assert images is not None
            every = table[:, 0] == -2
            spread = table[every].repeat(images, 1)  # each pinned fault once per image
            spread[:, 0] = torch.arange(images, dtype=torch.int64).repeat_interleave(int(every.sum()))
            table = torch.cat([table[~every], spread])
            table = table[torch.sort(table[:, 4], stable=True).indices]
        t = table[torch.sort(table[:, 0], stable=True).indices]  # by image; list order within an image
        groups[key] = LayerFaults(t[:, 0].contiguous(), t[:, 1].contiguous(), t[:, 2].contiguous(),
                                  t[:, 3].contiguous())
    return FaultPattern(groups)


def replay_expression(faults: Sequence[Fault], images: int | None = None) -> str:
    """Python source that rebuilds the pattern: ``FaultPattern.from_faults([...])``, or ``pattern_of([...],
    images=N)`` when a transient fault strikes every image."""
    listed = "[" + ", ".join(repr(f) for f in faults) + "]"
    if any(Site(f.site).transient and f.image is None for f in faults):
        return f"pattern_of({listed}, images={images if images is not None else 'len(x)'})"
    return f"FaultPattern.from_faults({listed})"


def replay_lines(faults: Sequence[Fault], images: int, required: float, accuracy: float) -> list[str]:
    expression = replay_expression(faults, images)
    imports = "from pytest_hwfault import Fault, FaultPattern, accuracy"
    if expression.startswith("pattern_of("):
        imports += "\nfrom pytest_hwfault.explain import pattern_of"
        expression = expression.replace(f"images={images})", "images=len(x))")
    return [*imports.splitlines(), f"pattern = {expression}",
            f"assert accuracy(qmodel, (x, y), faults=pattern) >= {required:.4f}  # {accuracy:.4f} here"]
