"""What one campaign asks for, validated eagerly, as plain data (no torch, no pytest).

The `resilience` marker, the `hwfault.assess(...)` overrides and the JSON report all speak `CampaignSpec`. Every
check raises `SpecError`, which names the argument and what is allowed, so the plugin can report it against the
test at collection time.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

SITES = ("act", "weight", "acc", "input")
KINDS = ("flip", "stuck0", "stuck1")
MAX_WEIGHT_ACT_BITS = 16
ACC_BITS = 32


class SpecError(ValueError):
    """A bad campaign argument: `argument` is its name, the message says what is allowed."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def check_bit_positions(value: Any, site: str, bits: int) -> tuple[int, ...] | None:
    """`bit_positions` as a sorted tuple of distinct bit indices that exist in the site's codes."""
    if value is None:
        return None
    positions: tuple[Any, ...] = (value,) if is_int(value) else tuple(value)
    width = ACC_BITS if site == "acc" else bits
    if not positions or not all(is_int(b) and 0 <= b < width for b in positions):
        raise SpecError("bit_positions", f"{value!r} must be bit indices in [0, {width}) for {width}-bit {site} codes")
    if len(set(positions)) != len(positions):
        raise SpecError("bit_positions", f"{value!r} repeats a bit")
    return tuple(sorted(positions))


def check_layers(value: Any) -> tuple[str, ...] | None:
    """`layers` as a tuple of non-empty layer-name globs."""
    if value is None:
        return None
    layers = (value,) if isinstance(value, str) else tuple(value)
    if not layers or not all(isinstance(glob, str) and glob for glob in layers):
        raise SpecError("layers", f"{value!r} must be a layer-name glob or a list of them")
    return layers


def one_threshold(overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` where setting one of min_acc / max_drop clears the other: a spec holds exactly one."""
    if "min_acc" in overrides and "max_drop" not in overrides:
        overrides["max_drop"] = None
    if "max_drop" in overrides and "min_acc" not in overrides:
        overrides["min_acc"] = None
    return overrides


@dataclass(frozen=True)
class CampaignSpec:
    """One statistical fault campaign: a fault model, a threshold, and how hard to look."""

    site: str
    ber: float
    min_acc: float | None = None
    max_drop: float | None = None
    bits: int = 8
    kind: str = "flip"
    bit_positions: tuple[int, ...] | None = None
    layers: tuple[str, ...] | None = None
    confidence: float = 0.95
    budget: int = 64
    first: int = 4
    samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise SpecError("site", f"{self.site!r} is not a fault site; allowed: {', '.join(SITES)}")
        if not is_number(self.ber) or not 0.0 < float(self.ber) <= 1.0:
            raise SpecError("ber", f"{self.ber!r} must be a bit error rate in (0, 1], e.g. 1e-5")
        object.__setattr__(self, "ber", float(self.ber))
        if (self.min_acc is None) == (self.max_drop is None):
            raise SpecError("min_acc", "give exactly one of min_acc (absolute floor) or max_drop "
                            "(allowed drop from the fault-free quantized accuracy)")
        for name in ("min_acc", "max_drop"):
            value = getattr(self, name)
            if value is not None and (not is_number(value) or not 0.0 <= float(value) <= 1.0):
                raise SpecError(name, f"{value!r} must be an accuracy in [0, 1]")
        if not is_int(self.bits) or not 2 <= self.bits <= MAX_WEIGHT_ACT_BITS:
            raise SpecError("bits", f"{self.bits!r} must be an integer code width in [2, {MAX_WEIGHT_ACT_BITS}]")
        if self.kind not in KINDS:
            raise SpecError("kind", f"{self.kind!r} is not a fault kind; allowed: {', '.join(KINDS)}")
        object.__setattr__(self, "bit_positions", check_bit_positions(self.bit_positions, self.site, self.bits))
        object.__setattr__(self, "layers", check_layers(self.layers))
        if not is_number(self.confidence) or not 0.5 <= float(self.confidence) < 1.0:
            raise SpecError("confidence", f"{self.confidence!r} must be in [0.5, 1), e.g. 0.95")
        if not is_int(self.budget) or self.budget < 1:
            raise SpecError("budget", f"{self.budget!r} must be a positive number of trials")
        if not is_int(self.first) or not 1 <= self.first:
            raise SpecError("first", f"{self.first!r} must be a positive number of trials")
        if self.first > self.budget:
            object.__setattr__(self, "first", self.budget)
        if self.samples is not None and (not is_int(self.samples) or self.samples < 1):
            raise SpecError("samples", f"{self.samples!r} must be a positive number of images, or None for all")
        if not is_int(self.seed) or self.seed < 0:
            raise SpecError("seed", f"{self.seed!r} must be a non-negative integer")

    # -- derived -------------------------------------------------------------------------------------------------
    @property
    def transient(self) -> bool:
        return self.site != "weight"

    def label(self) -> str:
        """Readable id used in test ids: ``act-ber1e-05``."""
        return f"{self.site}-ber{self.ber:g}" + ("" if self.kind == "flip" else f"-{self.kind}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("bit_positions", "layers"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CampaignSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(unknown[0], f"unknown campaign argument; allowed: {', '.join(sorted(known))}")
        return cls(**dict(data))

    def with_overrides(self, **overrides: Any) -> CampaignSpec:
        known = {f.name for f in fields(self)}
        for key in overrides:
            if key not in known:
                raise SpecError(key, f"unknown campaign argument; allowed: {', '.join(sorted(known))}")
        return replace(self, **one_threshold(overrides))

    def campaign_id(self, name: str) -> str:
        """Stable across processes and runs: a hash of the caller's name (a test's nodeid) and the spec."""
        payload = json.dumps({"name": name, "spec": self.to_dict()}, sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


LIST_ARGUMENTS = ("ber", "site")
MARKER_ARGUMENTS = tuple(f.name for f in fields(CampaignSpec))


def expand(kwargs: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> list[CampaignSpec]:
    """The campaigns a `resilience(...)` marker asks for: one per (site, ber) pair when lists are given.

    `defaults` (from the command line or ini) fill in what the marker leaves out."""
    unknown = sorted(set(kwargs) - set(MARKER_ARGUMENTS))
    if unknown:
        raise SpecError(unknown[0], f"unknown resilience argument; allowed: {', '.join(MARKER_ARGUMENTS)}")
    for required in ("ber", "site"):
        if required not in kwargs:
            raise SpecError(required, "is required, e.g. resilience(ber=1e-5, site='act', min_acc=0.8)")
    merged = {**(defaults or {}), **kwargs}
    axes: dict[str, list[Any]] = {}
    for name in LIST_ARGUMENTS:
        value = merged[name]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise SpecError(name, "is an empty list")
        if len(set(map(repr, values))) != len(values):
            raise SpecError(name, f"{value!r} repeats a value")
        axes[name] = values
    return [CampaignSpec(**{**merged, "site": site, "ber": ber}) for site in axes["site"] for ber in axes["ber"]]
