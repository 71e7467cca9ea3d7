"""Fault models and fault patterns: what goes wrong, as plain data.

A `FaultPattern` is the one language of the project: sampling produces it, the injector consumes it, a campaign
exports it, the hypothesis search shrinks it, and a user pastes it into a test to replay a failure. It lists
single-bit faults on integer codes; a `FaultModel` (a bit error rate at one site) is a recipe for drawing one.

Sampling never builds a mask of every bit: all targets' bits form one space, whose faulty positions are drawn as a
Bernoulli(ber) process through its geometric gaps (`bernoulli_positions`), so the cost grows with the number of
faults, and they come out sorted and distinct. A multi-bit upset (`FaultModel.burst` = k) is one such draw of its
first bit, expanded into k adjacent single-bit faults of the same code. One trial holds every image's faults at
once; `check_trial_size` refuses a trial that would not fit in memory.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from . import native
from .bits import KIND_CODES, KINDS_BY_CODE, check_width
from .spec import WIDE_ACC_BITS, Kind, Site


def parse_site(value: object, argument: str = "site") -> Site:
    try:
        return Site(value)
    except ValueError:
        allowed = ", ".join(repr(s.value) for s in Site)
        raise ValueError(f"{argument}={value!r} is not a fault site; allowed: {allowed}") from None


def parse_kind(value: object, argument: str = "kind") -> Kind:
    try:
        return Kind(value)
    except ValueError:
        allowed = ", ".join(repr(k.value) for k in Kind)
        raise ValueError(f"{argument}={value!r} is not a fault kind; allowed: {allowed}") from None


LayerSelector = str | type


@dataclass(frozen=True)
class FaultTarget:
    """One place faults can land: a site of one layer, with its number of codes and their width."""

    site: Site
    layer: str
    numel: int  # codes per image at transient sites; codes in the weight tensor at the weight site
    bits: int


@dataclass(frozen=True)
class FaultModel:
    """Independent bit faults at rate `ber` on every selected code bit of one site."""

    site: Site
    ber: float
    kind: Kind = Kind.FLIP
    bit_positions: tuple[int, ...] | None = None  # None: every bit of the code
    layers: tuple[LayerSelector, ...] | None = None  # None: every quantized layer
    # A multi-bit upset: each fault event changes `burst` adjacent bits of one code, from the drawn bit upwards;
    # the drawn bit is one where the burst fits (of bit_positions, if given), and ber is the rate of events per bit.
    burst: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", parse_site(self.site))
        object.__setattr__(self, "kind", parse_kind(self.kind))
        if isinstance(self.ber, bool) or not isinstance(self.ber, (int, float)) or not 0.0 <= self.ber <= 1.0:
            raise ValueError(f"ber={self.ber!r} must be a number in [0, 1]")
        object.__setattr__(self, "ber", float(self.ber))
        if self.bit_positions is not None:
            positions = tuple(self.bit_positions)
            if not positions or any(
                isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < WIDE_ACC_BITS for b in positions
            ):
                raise ValueError(
                    f"bit_positions={self.bit_positions!r} must be a non-empty list of bit indices in "
                    f"[0, {WIDE_ACC_BITS})"
                )
            if len(set(positions)) != len(positions):
                raise ValueError(f"bit_positions={self.bit_positions!r} repeats a bit")
            object.__setattr__(self, "bit_positions", tuple(sorted(positions)))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, (str, type)) else tuple(self.layers)
            object.__setattr__(self, "layers", layers)
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or not 1 <= self.burst <= WIDE_ACC_BITS:
            raise ValueError(f"burst={self.burst!r} must be a number of adjacent bits in [1, {WIDE_ACC_BITS}]")

    def positions_for(self, target: FaultTarget) -> tuple[int, ...]:
        """The bits a fault event may start at in the target's codes."""
        if self.burst > target.bits:
            raise ValueError(f"burst={self.burst} does not fit the {target.bits}-bit {target.site.value} codes of "
                             f"layer {target.layer!r}")
        if self.bit_positions is None:
            return tuple(range(target.bits - self.burst + 1))
        too_high = [b for b in self.bit_positions if b >= target.bits]
        if too_high:
            raise ValueError(
                f"bit_positions {too_high} do not exist in the {target.bits}-bit {target.site.value} codes of layer "
                f"{target.layer!r}; allowed: 0..{target.bits - 1}"
            )
        starts = tuple(b for b in self.bit_positions if b + self.burst <= target.bits)
        if not starts:
            raise ValueError(f"no bit of bit_positions {list(self.bit_positions)} leaves room for a burst of "
                             f"{self.burst} bits in the {target.bits}-bit codes of layer {target.layer!r}")
        return starts


def select_layers(names: Sequence[str], types: Sequence[type], selectors: Iterable[LayerSelector] | None) -> list[str]:
    """Names (in execution order) matching any glob or module type; every selector must match something."""
    if selectors is None:
        return list(names)
    chosen: set[str] = set()
    for selector in selectors:
        if isinstance(selector, str):
            hits = {n for n in names if fnmatch.fnmatchcase(n, selector)}
        elif isinstance(selector, type):
            hits = {n for n, t in zip(names, types) if issubclass(t, selector)}
        else:
            raise TypeError(f"layers entries must be glob strings or module types, got {selector!r}")
        if not hits:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"layers selector {selector!r} matched no quantized layer; layers are: {shown}")
        chosen |= hits
    return [n for n in names if n in chosen]


@dataclass(frozen=True, order=True)
class Fault:
    """One single-bit fault. `index` is the flat index of the code within one image's tensor (transient sites) or
    within the weight tensor; `image` is the image's position in the evaluated data (None for weights)."""

    site: str
    layer: str
    index: int
    bit: int
    kind: str = "flip"
    image: int | None = None

    def __repr__(self) -> str:
        image = "" if self.image is None else f", image={self.image}"
        return f"Fault({self.site!r}, {self.layer!r}, {self.index}, {self.bit}, {self.kind!r}{image})"


@dataclass
class LayerFaults:
    """The faults of one (site, layer) as parallel int64 tensors, sorted by image (stable)."""

    image: torch.Tensor
    index: torch.Tensor
    bit: torch.Tensor
    kind: torch.Tensor
    # Sampled faults, and every subset of them: also sorted by code within an image, no (image, index, bit) twice,
    # and one kind, so composing them needs no sort and no fold (`inject.compose_canonical`). False: unknown.
    canonical: bool = False
    # Every index is below this bound (known where the sampler drew them from a target of that many codes, and kept
    # by subsets): `inject.check_bounds` need not look. None: unknown.
    index_bound: int | None = field(default=None, compare=False)
    _images: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    # (codes per image, image x codes + index): the sampler computes it on its way to image and index
    _linear: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.index.numel())

    def linear(self, numel: int) -> torch.Tensor:
        """Each fault's code as a row-major position in a batch of images of `numel` codes each (image x numel +
        index); a fresh tensor, or the sampler's (callers do not modify it)."""
        if self._linear is not None and self._linear[0] == numel:
            return self._linear[1]
        return torch.add(self.index, self.image, alpha=numel)

    def images(self) -> torch.Tensor:
        """The images holding these faults, sorted (computed once: a trial asks several times)."""
        if self._images is None:
            self._images = torch.unique_consecutive(self.image)
        return self._images

    def for_images(self, start: int, stop: int) -> LayerFaults | None:
        """The faults of images [start, stop), with images renumbered from 0; None when there are none."""
        lo = int(torch.searchsorted(self.image, start, side="left"))
        hi = int(torch.searchsorted(self.image, stop, side="left"))
        if lo == hi:
            return None
        return LayerFaults(self.image[lo:hi] - start, self.index[lo:hi], self.bit[lo:hi], self.kind[lo:hi],
                           self.canonical, self.index_bound)

    def to(self, device: torch.device | str) -> LayerFaults:
        if self.index.device == torch.device(device):
            return self
        return LayerFaults(self.image.to(device), self.index.to(device), self.bit.to(device), self.kind.to(device),
                           self.canonical, self.index_bound)

    def subset(self, chosen: torch.Tensor, image: torch.Tensor | None = None) -> LayerFaults:
        """The faults where the mask or sorted indices `chosen` select, with images renumbered to `image` (given
        in the same order); subsets keep the order, so a canonical group stays canonical."""
        return LayerFaults(self.image[chosen] if image is None else image, self.index[chosen], self.bit[chosen],
                           self.kind[chosen], self.canonical, self.index_bound)


def _layer_faults(image: torch.Tensor, index: torch.Tensor, bit: torch.Tensor, kind: torch.Tensor) -> LayerFaults:
    order = torch.sort(image, stable=True).indices
    return LayerFaults(image[order], index[order], bit[order], kind[order])


@dataclass
class FaultPattern:
    """An exact, replayable set of faults, grouped by (site, layer)."""

    groups: dict[tuple[Site, str], LayerFaults] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def __bool__(self) -> bool:
        return len(self) > 0

    @classmethod
    def from_faults(cls, faults: Iterable[Fault | tuple]) -> FaultPattern:
        """Build a pattern from `Fault`s or (site, layer, index, bit, kind[, image]) tuples, in the order given:
        several faults on one code are applied in that order."""
        rows: dict[tuple[Site, str], list[tuple[int, int, int, int]]] = {}
        for item in faults:
            fault = item if isinstance(item, Fault) else Fault(*item)
            site = parse_site(fault.site)
            kind = parse_kind(fault.kind)
            if site.transient and fault.image is None:
                raise ValueError(f"{fault!r}: a fault at transient site {site.value!r} needs an image")
            if not site.transient and fault.image is not None:
                raise ValueError(f"{fault!r}: weight faults are shared by every image; give no image")
            if fault.index < 0 or fault.bit < 0 or (fault.image is not None and fault.image < 0):
                raise ValueError(f"{fault!r}: index, bit and image must be non-negative")
            rows.setdefault((site, fault.layer), []).append(
                (-1 if fault.image is None else fault.image, fault.index, fault.bit, KIND_CODES[kind])
            )
        groups = {}
        for key, values in rows.items():
            t = torch.tensor(values, dtype=torch.int64).reshape(-1, 4)
            groups[key] = _layer_faults(t[:, 0], t[:, 1], t[:, 2], t[:, 3])
        return cls(groups)

    def faults(self) -> Iterator[Fault]:
        for (site, layer), g in self.groups.items():
            for image, index, bit, kind in zip(g.image.tolist(), g.index.tolist(), g.bit.tolist(), g.kind.tolist()):
                yield Fault(site.value, layer, index, bit, KINDS_BY_CODE[kind].value, None if image < 0 else image)

    def to_list(self) -> list[Fault]:
        return list(self.faults())

    def to_json(self) -> list[list]:
        return [[f.site, f.layer, f.index, f.bit, f.kind, f.image] for f in self.faults()]

    @classmethod
    def from_json(cls, rows: Iterable[Sequence]) -> FaultPattern:
        return cls.from_faults(Fault(*row) for row in rows)

    def images_with_faults(self) -> torch.Tensor:
        """Sorted indices of the images that hold at least one transient fault."""
        if not any(site.transient for site, _ in self.groups):
            return torch.empty(0, dtype=torch.int64)
        # each group is sorted by image: runs shrink it in linear time before the (small) final sort
        return torch.unique(torch.cat([g.images() for (site, _), g in self.groups.items() if site.transient]))

    def restricted_to(self, images: torch.Tensor) -> FaultPattern:
        """The transient faults of `images` (sorted indices), renumbered to their positions in `images`: the
        pattern of a forward pass over just those images. Weight faults are kept as they are."""
        if len(images) and int(images[-1]) == len(images) - 1:  # images 0..k-1: no renumbering, often no change
            kept = {key: g if not key[0].transient or not len(g) or int(g.image[-1]) < len(images)  # sorted
                    else g.subset(g.image < len(images))
                    for key, g in self.groups.items()}
            return FaultPattern({key: g for key, g in kept.items() if len(g) or not key[0].transient})
        groups: dict[tuple[Site, str], LayerFaults] = {}
        for key, g in self.groups.items():
            if not key[0].transient:
                groups[key] = g
                continue
            position = torch.searchsorted(images, g.image)
            inside = (position < len(images)) & (images[position.clamp(max=len(images) - 1)] == g.image)
            if bool(inside.any()):
                groups[key] = g.subset(inside, position[inside])
        return FaultPattern(groups)

    def has_weight_faults(self) -> bool:
        return any(not site.transient and len(g) for (site, _), g in self.groups.items())


def bernoulli_positions(total: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """The sorted positions in [0, total) of a Bernoulli(p) process: each position is drawn with probability p,
    independently of the others, so their number is Binomial(total, p).

    The gaps between drawn positions are geometric, and they are sampled directly (inversion, float64): the cost
    grows with the number of positions drawn, not with `total`, and they come out sorted and distinct, with no sort
    or deduplication."""
    if total == 0 or p == 0.0:
        return torch.empty(0, dtype=torch.int64)
    if p == 1.0:
        return torch.arange(total, dtype=torch.int64)
    log_q = math.log1p(-p)
    chunks: list[torch.Tensor] = []
    last = -1  # the last position drawn so far
    while True:
        expected = (total - 1 - last) * p
        n = int(expected + 6.0 * math.sqrt(expected) + 64)
        # 1 - u in (0, 1], so the log stays finite; in place, as one fresh buffer (the same float operations)
        logged = torch.rand(n, generator=generator, dtype=torch.float64).neg_().add_(1.0).log_()
        positions = native.gap_positions(logged, log_q, total, last)  # one pass, where it applies
        if positions is None:
            positions = native.eager_gap_positions(logged, log_q, total, last)
        if int(positions[-1]) >= total:
            chunks.append(positions[: int(torch.searchsorted(positions, total))])
            return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        chunks.append(positions)
        last = int(positions[-1])


# One trial's pattern holds the faults of every image at once, ~40 bytes each at its peak (measured on ResNet56 at
# BER 1e-2 and 3e-2): 2^28 faults are ~11 GB. Past that, a trial is refused with the numbers, not left to the OOM
# killer.
MAX_FAULTS_PER_TRIAL = 1 << 28


def drawable_bits(model: FaultModel, targets: Sequence[FaultTarget], n_images: int) -> int:
    """The bits one trial draws its faults from (event starts, for a burst)."""
    return sum(t.numel * len(model.positions_for(t)) * (n_images if t.site.transient else 1) for t in targets)


def check_trial_size(model: FaultModel, targets: Sequence[FaultTarget], n_images: int) -> None:
    """Refuse a trial whose expected faults would not fit in memory, saying why and what to change."""
    bits = drawable_bits(model, targets, n_images)
    expected = bits * model.ber * model.burst
    if expected > MAX_FAULTS_PER_TRIAL:
        raise ValueError(
            f"ber={model.ber:g} over {bits:,} bits at site {model.site.value!r} ({n_images} images) means "
            f"~{expected:,.0f} faults in one trial; a trial holds every image's faults at once (~40 bytes each, "
            f"~{expected * 40 / 2**30:.0f} GiB), and at most {MAX_FAULTS_PER_TRIAL:,} are allowed. Lower the BER, "
            "evaluate fewer images (samples=), or select fewer layers (layers=)")


def sample_pattern(
    model: FaultModel, targets: Sequence[FaultTarget], n_images: int, generator: torch.Generator
) -> FaultPattern:
    """Draw one trial's faults for `n_images` images. Pure function of the generator's state and the arguments.

    All targets' bits form one space: a Bernoulli(ber) draw of its positions (`bernoulli_positions`: sorted,
    distinct, at a cost that grows with the number of faults), each decoded to (target, image, code index, bit) with
    vectorised arithmetic, whatever the number of layers. The faults come out sorted by target, image and code.
    """
    if not targets:
        return FaultPattern()
    positions = [model.positions_for(t) for t in targets]
    for target in targets:
        check_width(target.bits)
    check_trial_size(model, targets, n_images)
    per_image = [t.numel * len(p) for t, p in zip(targets, positions)]  # drawable bits of one image's codes
    sizes = [size * (n_images if t.site.transient else 1) for t, size in zip(targets, per_image)]
    ends = list(accumulate(sizes))
    flat = bernoulli_positions(ends[-1], model.ber, generator)
    if len(flat) == 0:
        return FaultPattern()
    # sorted positions: each target's are one slice, decoded with its own scalars (no per-fault gathers)
    bounds = [0, *torch.searchsorted(flat, torch.tensor(ends, dtype=torch.int64)).tolist()]
    # one kind for every fault: a single value seen at every position (sliced per target, never written)
    kinds = torch.tensor(KIND_CODES[model.kind], dtype=torch.int64).expand(len(flat) * model.burst)
    # every target draws from all 2^k bits of its codes (the usual case): every target's slice starts at a multiple
    # of 2^k, so two shifts of the whole draw give each fault's code and bit, and a target's codes are one subtraction
    width = len(positions[0])
    whole_codes = (model.burst == 1 and width & (width - 1) == 0
                   and all(p == tuple(range(width)) for p in positions))
    decoded = None
    if whole_codes:  # every fault's code, image, index and bit in one pass (or its torch ops)
        shift = width.bit_length() - 1
        decode = (flat, bounds, [(end - size) >> shift for end, size in zip(ends, sizes)],
                  [t.numel if t.site.transient else 0 for t in targets], shift)
        decoded = native.decode_faults(*decode)
        if decoded is None:
            decoded = native.eager_decode_faults(*decode)
    groups: dict[tuple[Site, str], LayerFaults] = {}
    for t, target in enumerate(targets):
        lo, hi = bounds[t], bounds[t + 1]
        if lo == hi:
            continue
        if decoded is not None:
            linear, image, index, bit = (row[lo:hi] for row in decoded)
        else:
            local = flat[lo:hi] - (ends[t] - sizes[t])
            width = len(positions[t])
            linear, bit = _divmod(local, width)  # image x numel + index, and the position among the code's bits
            if target.site.transient:
                image, index = _divmod(linear, target.numel)
            else:
                image, index = torch.full_like(linear, -1), linear
        if not whole_codes and positions[t] != tuple(range(width)):
            bit = torch.tensor(positions[t], dtype=torch.int64)[bit]
        # sorted by (image, index, bit) already: positions are, and each target's bits are image-major
        if model.burst > 1:  # each event: the drawn bit and the burst - 1 bits above it, in the same code
            count = len(linear)
            image, index = image.repeat_interleave(model.burst), index.repeat_interleave(model.burst)
            bit = bit.repeat_interleave(model.burst) + torch.arange(model.burst).repeat(count)
        group = LayerFaults(image, index, bit, kinds[lo * model.burst:hi * model.burst], canonical=model.burst == 1,
                            index_bound=target.numel)
        if model.burst == 1 and target.site.transient:
            group._linear = (target.numel, linear)
        groups[(target.site, target.layer)] = group
    return FaultPattern(groups)


def _divmod(values: torch.Tensor, divisor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values // divisor, values % divisor) for non-negative values: a shift and a mask when the divisor is a
    power of two (int64 division is not vectorised on the CPU and costs several times a shift)."""
    if divisor & (divisor - 1) == 0:
        return values >> (divisor.bit_length() - 1), values & (divisor - 1)
    quotient = torch.div(values, divisor, rounding_mode="floor")
    return quotient, values - quotient * divisor


def trial_seed(base_seed: int, campaign_id: str, trial: int) -> int:
    """Seed of one trial: a hash of (base seed, campaign id, trial index) and nothing else."""
    digest = hashlib.blake2b(f"{base_seed}\x1f{campaign_id}\x1f{trial}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def trial_generator(base_seed: int, campaign_id: str, trial: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(trial_seed(base_seed, campaign_id, trial))
