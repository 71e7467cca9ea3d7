"""Hypothesis strategies that draw exact fault patterns for a `QuantizedModel`, built to shrink well.

A drawn pattern is a list of 1..`max_flips` distinct single-bit faults at one site. Each fault is drawn as the
choices (bit, layer, code index[, image][, kind]), in that order, and hypothesis shrinks a failing example toward
fewer choices first and then toward smaller choices, earliest first. A counterexample therefore shrinks toward:

1. fewer faults;
2. then, fault by fault, a lower bit position (bit 0 is the least significant bit; the int-N sign bit is N-1);
3. then an earlier layer (the model's quantized layers in execution order);
4. then a lower flat code index in that layer (row-major: into the weight tensor at the weight site, into one
   image's tensor at the act, input and acc sites);
5. then a lower image (per-image transient faults only);
6. then stuck0 before stuck1 (stuck-at faults of either value only).

Shrinking is hypothesis's local search: the pattern it reports is minimal in the sense that none of the steps it
tries (removing a fault, lowering a bit, a layer, an index, ...) still fails; it is not a proof that no smaller
pattern exists elsewhere.

Transient sites (act, input, acc) need an image for every fault. By default a drawn fault strikes its code on every
evaluated image (a fault pinned to one buffer cell or accumulator for the whole evaluation: a stuck cell, or a
transient upset that repeats), so the accuracy drop it causes can be measured on any set of images. With
``per_image=True`` each fault strikes one image drawn from ``[0, images)`` instead: the question "can k transient
flips change this image's prediction?", whose accuracy drop is at most k images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

# pattern_of and replay_expression live in explain.py (which needs no hypothesis); importable from here as well.
from .explain import pattern_of as pattern_of
from .explain import replay_expression
from .faults import Fault, FaultPattern, LayerSelector, Site, parse_kind, parse_site
from .qmodel import QuantizedModel
from .spec import DEFAULT_MAX_FLIPS, Kind


def _layer_selectors(layers: LayerSelector | Iterable[LayerSelector] | None) -> tuple[LayerSelector, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, (str, type)):
        return (layers,)
    return tuple(layers)


def _check_count(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return value


@dataclass(frozen=True)
class FaultSpace:
    """Where faults may land: one site, the selected layers (execution order), their code counts and the bit
    positions that may fail. `fault_lists` draws from it."""

    site: Site
    layers: tuple[str, ...]
    numels: tuple[int, ...]
    width: int
    bit_positions: tuple[int, ...] | None  # None: every bit of the code, 0..width-1
    kinds: tuple[Kind, ...]

    @classmethod
    def of(
        cls,
        qmodel: QuantizedModel,
        site: Site | str = "weight",
        *,
        layers: LayerSelector | Iterable[LayerSelector] | None = None,
        bit_positions: Iterable[int] | None = None,
        kinds: Iterable[Kind | str] = (Kind.FLIP,),
    ) -> FaultSpace:
        site = parse_site(site)
        targets = qmodel.targets(site, _layer_selectors(layers))
        if not targets:
            raise ValueError(qmodel.nothing_to_fault(site, _layer_selectors(layers)))
        widths = {t.bits for t in targets}
        if len(widths) != 1:
            raise ValueError(f"the selected layers have {site.value} codes of different widths {sorted(widths)}; "
                             "search one width at a time (select layers with `layers=`)")
        width = widths.pop()
        positions = None
        if bit_positions is not None:
            positions = tuple(sorted(set(bit_positions)))
            bad = [b for b in positions if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < width]
            if not positions or bad:
                raise ValueError(f"bit_positions={list(bit_positions)!r} must be bit indices in [0, {width}) for the "
                                 f"{width}-bit {site.value} codes")
        kind_tuple = tuple(dict.fromkeys(parse_kind(k) for k in kinds))
        if not kind_tuple:
            raise ValueError("kinds is empty")
        return cls(site, tuple(t.layer for t in targets), tuple(t.numel for t in targets), width, positions,
                   kind_tuple)

    def bits(self) -> st.SearchStrategy[int]:
        """Shrinks toward the lowest allowed bit."""
        if self.bit_positions is None:
            return st.integers(0, self.width - 1)
        return st.sampled_from(self.bit_positions)


@st.composite
def _one_fault(draw: Any, space: FaultSpace, images: int | None, per_image: bool) -> Fault:
    bit = draw(space.bits())
    which = draw(st.sampled_from(range(len(space.layers))))
    index = draw(st.integers(0, space.numels[which] - 1))
    image = draw(st.integers(0, images - 1)) if per_image and images is not None else None
    kind = draw(st.sampled_from(space.kinds)) if len(space.kinds) > 1 else space.kinds[0]
    return Fault(space.site.value, space.layers[which], index, bit, kind.value, image)


def _fault_key(fault: Fault) -> tuple[str, int, int | None, int]:
    return fault.layer, fault.index, fault.image, fault.bit


def fault_lists(
    qmodel: QuantizedModel,
    site: Site | str = "weight",
    *,
    layers: LayerSelector | Iterable[LayerSelector] | None = None,
    bit_positions: Iterable[int] | None = None,
    max_flips: int = DEFAULT_MAX_FLIPS,
    min_flips: int = 1,
    kinds: Iterable[Kind | str] = (Kind.FLIP,),
    per_image: bool = False,
    images: int | None = None,
) -> st.SearchStrategy[tuple[Fault, ...]]:
    """The search's own representation: tuples of 1..max_flips distinct `Fault`s (never two on the same bit of the
    same code), in the shrink order of this module. A transient fault with ``image=None`` strikes every evaluated
    image (see `pattern_of`); with ``per_image=True`` each fault gets an image in ``[0, images)``."""
    space = FaultSpace.of(qmodel, site, layers=layers, bit_positions=bit_positions, kinds=kinds)
    max_flips = _check_count("max_flips", max_flips, 1)
    min_flips = _check_count("min_flips", min_flips, 0)
    if min_flips > max_flips:
        raise ValueError(f"min_flips={min_flips} exceeds max_flips={max_flips}")
    if per_image:
        if not space.site.transient:
            raise ValueError("per_image=True needs a transient site (act, input, acc): weight faults strike every "
                             "image")
        images = _check_count("images", images, 1)
    one = _one_fault(space, images, per_image)
    return st.lists(one, min_size=min_flips, max_size=max_flips, unique_by=_fault_key).map(tuple)


@dataclass(repr=False, eq=False)
class DrawnPattern(FaultPattern):
    """A `FaultPattern` drawn by `bit_flips`/`stuck_at`, which remembers the faults as drawn (pinned transient
    faults once, with ``image=None``) and prints as the Python expression that rebuilds it."""

    drawn: tuple[Fault, ...] = ()
    images: int | None = None

    def __repr__(self) -> str:
        return replay_expression(self.drawn, self.images)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints a failing example
        printer.text(repr(self))


def _patterns(faults: st.SearchStrategy[tuple[Fault, ...]], images: int | None) -> st.SearchStrategy[DrawnPattern]:
    def build(drawn: tuple[Fault, ...]) -> DrawnPattern:
        return DrawnPattern(pattern_of(drawn, images).groups, drawn, images)

    return faults.map(build)


def _needs_images(site: Site | str, images: int | None) -> None:
    if parse_site(site).transient and images is None:
        raise ValueError(f"site={Site(site).value!r} is transient: give images=N, the number of images the pattern "
                         "is evaluated on (each fault strikes every one of them unless per_image=True)")


def bit_flips(
    qmodel: QuantizedModel,
    site: Site | str = "weight",
    *,
    layers: LayerSelector | Iterable[LayerSelector] | None = None,
    bit_positions: Iterable[int] | None = None,
    max_flips: int = DEFAULT_MAX_FLIPS,
    min_flips: int = 1,
    images: int | None = None,
    per_image: bool = False,
) -> st.SearchStrategy[DrawnPattern]:
    """Patterns of `min_flips`..`max_flips` distinct bit flips at `site` of the selected `layers` (globs or module
    types, as everywhere in pytest-hwfault), on `bit_positions` (default: every bit).

    At a transient site give ``images``, the number of images the pattern will be evaluated on: each fault then
    strikes its code on all of them (or on one of them, drawn, with ``per_image=True``). Shrinks toward fewer faults,
    lower bits, earlier layers and lower indices (see the module docstring)."""
    _needs_images(site, images)
    faults = fault_lists(qmodel, site, layers=layers, bit_positions=bit_positions, max_flips=max_flips,
                         min_flips=min_flips, kinds=(Kind.FLIP,), per_image=per_image, images=images)
    return _patterns(faults, images)


def stuck_at(
    qmodel: QuantizedModel,
    site: Site | str = "weight",
    value: int | None = None,
    *,
    layers: LayerSelector | Iterable[LayerSelector] | None = None,
    bit_positions: Iterable[int] | None = None,
    max_flips: int = DEFAULT_MAX_FLIPS,
    min_flips: int = 1,
    images: int | None = None,
    per_image: bool = False,
) -> st.SearchStrategy[DrawnPattern]:
    """Like `bit_flips`, with stuck-at bits: stuck at `value` (0 or 1), or at either (drawn; shrinks toward 0) when
    `value` is None. A stuck bit that already holds its value changes nothing: the shrinker drops such faults."""
    if value not in (None, 0, 1) or isinstance(value, bool):
        raise ValueError(f"value={value!r} must be 0, 1 or None (either)")
    kinds = (Kind.STUCK0, Kind.STUCK1) if value is None else ((Kind.STUCK0,) if value == 0 else (Kind.STUCK1,))
    _needs_images(site, images)
    faults = fault_lists(qmodel, site, layers=layers, bit_positions=bit_positions, max_flips=max_flips,
                         min_flips=min_flips, kinds=kinds, per_image=per_image, images=images)
    return _patterns(faults, images)
