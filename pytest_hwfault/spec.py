"""What a campaign or a worst-case search asks for, validated eagerly, as plain data (no torch, no pytest).

The `resilience` marker, the `hwfault.assess(...)` overrides and the JSON report all speak `CampaignSpec`; a
``resilience(search=...)`` marker speaks `SearchSpec`. Every check raises `SpecError`, which names the argument and
what is allowed, so the plugin can report it against the test at collection time.

This module is also the one home of the fault vocabulary the other modules derive from: the fault sites (`Site`,
`SITES`), the fault kinds (`Kind`, `KINDS`), the code widths (`MAX_WEIGHT_ACT_BITS`, `ACC_BITS`) and the search's
default fault budget (`DEFAULT_MAX_FLIPS`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from typing import Any


class Site(str, Enum):
    """Where in the accelerator a fault strikes."""

    ACT = "act"  # output codes of a quantized layer, per image
    WEIGHT = "weight"  # weight codes, shared by every image of a trial
    ACC = "acc"  # int32 accumulator of a conv/linear before requantization, per image
    INPUT = "input"  # input codes of a quantized layer, per image
    # a layer's stored requantization parameters: one float32 multiplier (acc scale / act scale) per output channel,
    # then the output zero point (an int32 register), shared by every image of a trial
    QPARAMS = "qparams"
    # a register bit of one processing element of a systolic array, permanent for a trial: it corrupts the partial
    # sums of every conv/linear layer the array computes (see systolic.py); its "layer" names the array
    PE = "pe"

    @property
    def transient(self) -> bool:
        return self not in (Site.WEIGHT, Site.QPARAMS, Site.PE)


class Kind(str, Enum):
    """What a fault does to its bit."""

    FLIP = "flip"
    STUCK0 = "stuck0"
    STUCK1 = "stuck1"


SITES = tuple(site.value for site in Site)
KINDS = tuple(kind.value for kind in Kind)
MAX_WEIGHT_ACT_BITS = 16  # the widest weight, input and output codes
ACC_BITS = 32  # the accumulator of codes up to 8 bits wide: int32
QPARAM_BITS = 32  # a float32 multiplier, an int32 zero point register
WIDE_ACC_BITS = 48  # the accumulator of wider codes (as DSP multiply-accumulate units have): the widest code of all


def acc_bits_for(bits: int) -> int:
    """The accumulator width for `bits`-bit codes: int32 holds any int8 sum of fan-in < 133k, 48 bits any int16
    sum of fan-in < 131k."""
    return ACC_BITS if bits <= 8 else WIDE_ACC_BITS


PE_REGISTERS = {"acc": 32, "mul": 16}  # a PE's registers and their widths (see systolic.py)


def site_width(site: str, bits: int, pe_register: str = "acc") -> int:
    """The width of one stored word at `site` for `bits`-bit weight and activation codes."""
    if site == "pe":
        return PE_REGISTERS[pe_register]
    return acc_bits_for(bits) if site == "acc" else QPARAM_BITS if site == "qparams" else bits


def check_array(array: Any, pe_register: Any, site: str, layers: Any) -> tuple[int, int] | None:
    """`array` as (rows, cols) of the systolic array that site "pe" faults; given exactly when site is "pe"."""
    if pe_register not in PE_REGISTERS:
        raise SpecError("pe_register", f"{pe_register!r}; allowed: {', '.join(map(repr, PE_REGISTERS))}")
    if site != "pe":
        if array is not None:
            raise SpecError("array", f"{array!r}: an array is the fault site of site='pe' only")
        return None
    if array is None:
        raise SpecError("array", "site='pe' needs array=(rows, cols), the systolic array's PEs, e.g. array=(32, 32)")
    try:
        rows, cols = array
    except (TypeError, ValueError):
        raise SpecError("array", f"{array!r} must be (rows, cols), two PE counts") from None
    if not (is_int(rows) and is_int(cols) and 1 <= rows <= 4096 and 1 <= cols <= 4096):
        raise SpecError("array", f"{array!r} must be (rows, cols), two PE counts in [1, 4096]")
    if layers is not None:
        raise SpecError("layers", "site='pe' faults the array, which computes every conv/linear layer; layers= "
                        "does not apply")
    return int(rows), int(cols)
# A search's sites as its marker lists them (weight, its default, first), and its kinds: "stuck" is stuck at
# either value, drawn.
SEARCH_SITES = (Site.WEIGHT.value, Site.ACT.value, Site.INPUT.value, Site.ACC.value, Site.QPARAMS.value,
                Site.PE.value)
SEARCH_KINDS = (*KINDS, "stuck")
DEFAULT_MAX_FLIPS = 4
DEFAULT_EXAMPLES = 200
DEFAULT_SUBSET = 64


class SpecError(ValueError):
    """A bad campaign argument: `argument` is its name, the message says what is allowed."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def check_bit_positions(value: Any, site: str, bits: int, pe_register: str = "acc") -> tuple[int, ...] | None:
    """`bit_positions` as a sorted tuple of distinct bit indices that exist in the site's codes."""
    if value is None:
        return None
    positions: tuple[Any, ...] = (value,) if is_int(value) else tuple(value)
    width = site_width(site, bits, pe_register)
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


def check_threshold(min_acc: Any, max_drop: Any) -> None:
    """The release requirement: exactly one of min_acc (absolute floor) or max_drop (allowed drop), an accuracy."""
    if (min_acc is None) == (max_drop is None):
        raise SpecError("min_acc", "give exactly one of min_acc (absolute floor) or max_drop "
                        "(allowed drop from the fault-free quantized accuracy)")
    for name, value in (("min_acc", min_acc), ("max_drop", max_drop)):
        if value is not None and (not is_number(value) or not 0.0 <= float(value) <= 1.0):
            raise SpecError(name, f"{value!r} must be an accuracy in [0, 1]")


def check_min_coverage(value: Any) -> float:
    """`min_coverage` as a float: the share of what faults could hit (MACs; weights for site="weight") that they
    must reach for a verdict to be drawn at all."""
    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise SpecError("min_coverage", f"{value!r} must be a share in [0, 1] of the model's multiply-accumulates "
                        "(of its weights, for site='weight') that faults must reach")
    return float(value)


def check_allow_inexact_view(value: Any) -> None:
    if not isinstance(value, bool):
        raise SpecError("allow_inexact_view", f"{value!r} must be True (judge a deployed model's view that its load "
                        "check found computing otherwise than the model) or False")


def one_threshold(overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` where setting one of min_acc / max_drop clears the other: a spec holds exactly one."""
    if "min_acc" in overrides and "max_drop" not in overrides:
        overrides["max_drop"] = None
    if "max_drop" in overrides and "min_acc" not in overrides:
        overrides["min_acc"] = None
    return overrides


def _record(spec: CampaignSpec | SearchSpec) -> dict[str, Any]:
    """A spec as JSON-ready data: its fields, with tuples as lists. A single-bit campaign (burst 1) leaves `burst`
    out, so that its campaign id is the one it had before bursts existed."""
    data = asdict(spec)
    for key in ("bit_positions", "layers", "array"):
        if data.get(key) is not None:
            data[key] = list(data[key])
    for key in ("mitigation", "protect"):
        if data.get(key) is not None:
            data[key] = list(data[key])
    # ids from before they existed: an unmitigated campaign keeps its id, and so its fault draws
    for key, default in (("burst", 1), ("array", None), ("pe_register", "acc"), ("allow_inexact_view", False),
                         *MITIGATION_DEFAULTS.items()):
        if key in data and data[key] == default:
            del data[key]
    return data


# -- mitigations (see mitigation.py): simulated exactly on the codes, chosen by marker arguments -------------------
MITIGATIONS = ("range_restriction",)  # what `mitigation=` names; ECC and protection have their own arguments
ECC_SCHEMES = ("secded",)
DEFAULT_ECC_WORD_BITS = 64
MITIGATION_DEFAULTS: dict[str, Any] = {"mitigation": None, "ecc": None, "ecc_word_bits": DEFAULT_ECC_WORD_BITS,
                                       "protect": None}


def check_mitigation(value: Any, site: str) -> tuple[str, ...] | None:
    """`mitigation` as a tuple of mitigation names (one name or a list of them)."""
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    allowed = ", ".join(map(repr, MITIGATIONS))
    if not names or not all(isinstance(n, str) and n in MITIGATIONS for n in names):
        raise SpecError("mitigation", f"{value!r} is not a mitigation; allowed: {allowed} (ECC weight memory: "
                        "ecc='secded'; correcting whole layers: protect=[layer globs])")
    if len(set(names)) != len(names):
        raise SpecError("mitigation", f"{value!r} repeats a mitigation")
    return names


def check_ecc(ecc: Any, word_bits: Any, site: str, bits: int) -> None:
    """`ecc` protects weight memory: per word of `word_bits` data bits, one faulty bit corrected, two detected."""
    if ecc is not None and ecc not in ECC_SCHEMES:
        raise SpecError("ecc", f"{ecc!r} is not an ECC scheme; allowed: {', '.join(map(repr, ECC_SCHEMES))}")
    if ecc is not None and site != "weight":
        raise SpecError("ecc", f"ecc={ecc!r} protects weight memory, and site={site!r} faults are not in it; "
                        "use it with site='weight' (activations: mitigation='range_restriction'; a layer's "
                        "compute: protect=[...])")
    if not is_int(word_bits) or word_bits < bits or word_bits % bits or word_bits > 4096:
        raise SpecError("ecc_word_bits", f"{word_bits!r} must be the data bits of one protected word: a multiple "
                        f"of the {bits}-bit weight codes, at most 4096 (default {DEFAULT_ECC_WORD_BITS}: eight "
                        "int8 codes)")
    if ecc is None and word_bits != DEFAULT_ECC_WORD_BITS:
        raise SpecError("ecc_word_bits", "applies to ecc='secded' only; give ecc='secded' too")


def check_protect(value: Any, site: str) -> tuple[str, ...] | None:
    """`protect` as a tuple of layer-name globs whose faults are corrected (TMR or duplication)."""
    if value is None:
        return None
    layers = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if not layers or not all(isinstance(glob, str) and glob for glob in layers):
        raise SpecError("protect", f"{value!r} must be a layer-name glob or a list of them, e.g. "
                        "protect=['layer3.*', 'fc']")
    if site == "pe":
        raise SpecError("protect", "site='pe' faults the systolic array, which computes every layer; protecting "
                        "layers does not apply")
    return layers


def check_burst(value: Any, site: str, bits: int, bit_positions: tuple[int, ...] | None,
                pe_register: str = "acc") -> int:
    """`burst` as the number of adjacent bits one fault event changes in one code (a multi-bit upset)."""
    width = site_width(site, bits, pe_register)
    if not is_int(value) or not 1 <= value <= width:
        raise SpecError("burst", f"{value!r} must be a number of adjacent bits in [1, {width}] for {width}-bit "
                        f"{site} codes")
    if bit_positions is not None and value > 1 and not any(b + value <= width for b in bit_positions):
        raise SpecError("burst", f"a burst of {value} bits starts at one of bit_positions {list(bit_positions)}, "
                        f"and none leaves room for it in {width}-bit {site} codes")
    return int(value)


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
    min_coverage: float = 1.0  # share of the MACs (weights, for site="weight") faults must reach to judge at all
    burst: int = 1  # adjacent bits one fault event changes in one code (a multi-bit upset); ber counts events
    array: tuple[int, int] | None = None  # site "pe": the systolic array's (rows, cols)
    pe_register: str = "acc"  # site "pe": the PE register faults strike, "acc" (32-bit) or "mul" (16-bit)
    # mitigations (mitigation.py), applied to the same fault draws as the unmitigated campaign's
    mitigation: tuple[str, ...] | None = None  # "range_restriction": clip output codes to their fault-free range
    ecc: str | None = None  # "secded": weight memory words correct one faulty bit, detect two
    ecc_word_bits: int = DEFAULT_ECC_WORD_BITS  # data bits per ECC word
    protect: tuple[str, ...] | None = None  # layer globs whose faults are corrected (TMR)
    # judge a deployed model whose view its load check found computing otherwise than the model (a float op its
    # runtime rounds otherwise); the report marks such a verdict. Not part of the campaign's id or its faults
    allow_inexact_view: bool = False

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise SpecError("site", f"{self.site!r} is not a fault site; allowed: {', '.join(SITES)}")
        if not is_number(self.ber) or not 0.0 < float(self.ber) <= 1.0:
            raise SpecError("ber", f"{self.ber!r} must be a bit error rate in (0, 1], e.g. 1e-5")
        object.__setattr__(self, "ber", float(self.ber))
        check_threshold(self.min_acc, self.max_drop)
        if not is_int(self.bits) or not 2 <= self.bits <= MAX_WEIGHT_ACT_BITS:
            raise SpecError("bits", f"{self.bits!r} must be an integer code width in [2, {MAX_WEIGHT_ACT_BITS}]")
        if self.kind not in KINDS:
            raise SpecError("kind", f"{self.kind!r} is not a fault kind; allowed: {', '.join(KINDS)}")
        object.__setattr__(self, "array", check_array(self.array, self.pe_register, self.site, self.layers))
        object.__setattr__(self, "bit_positions", check_bit_positions(self.bit_positions, self.site, self.bits,
                                                                       self.pe_register))
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
        object.__setattr__(self, "min_coverage", check_min_coverage(self.min_coverage))
        object.__setattr__(self, "burst", check_burst(self.burst, self.site, self.bits, self.bit_positions,
                                                      self.pe_register))
        object.__setattr__(self, "mitigation", check_mitigation(self.mitigation, self.site))
        check_ecc(self.ecc, self.ecc_word_bits, self.site, self.bits)
        object.__setattr__(self, "protect", check_protect(self.protect, self.site))
        check_allow_inexact_view(self.allow_inexact_view)

    # -- derived -------------------------------------------------------------------------------------------------
    @property
    def transient(self) -> bool:
        return Site(self.site).transient

    def label(self) -> str:
        """Readable id used in test ids: ``act-ber1e-05``."""
        array = "" if self.array is None else f"-{self.array[0]}x{self.array[1]}{self.pe_register}"
        return (f"{self.site}{array}-ber{self.ber:g}" + ("" if self.kind == "flip" else f"-{self.kind}")
                + ("" if self.burst == 1 else f"-burst{self.burst}")
                + ("" if not self.mitigated else f"-{self.mitigation_name()}"))

    @property
    def mitigated(self) -> bool:
        return self.mitigation is not None or self.ecc is not None or self.protect is not None

    def mitigation_name(self) -> str:
        """The mitigations in words, e.g. ``range_restriction+secded64+protect(2)``; "" when none."""
        parts = list(self.mitigation or ())
        if self.ecc is not None:
            parts.append(f"{self.ecc}{self.ecc_word_bits}")
        if self.protect is not None:
            parts.append(f"protect({','.join(self.protect)})")
        return "+".join(parts)

    def unmitigated(self) -> CampaignSpec:
        """The same campaign without its mitigations: its id seeds the fault draws of both, so they are paired."""
        return replace(self, **MITIGATION_DEFAULTS)

    def draw_id(self, name: str) -> str:
        """The id that seeds trial i's faults: the unmitigated campaign's, so a mitigated campaign meets exactly
        the faults its unmitigated twin meets (equal to `campaign_id` when unmitigated)."""
        return self.unmitigated().campaign_id(name)

    def layer_selectors(self) -> tuple[str, ...] | None:
        """What the campaign's faults are drawn over: the layers, or for site "pe" the array (`systolic.Array`)."""
        if self.array is not None:
            return (f"ws{self.array[0]}x{self.array[1]}.{self.pe_register}",)
        return self.layers

    def to_dict(self) -> dict[str, Any]:
        return _record(self)

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
        spec = self.to_dict()
        spec.pop("allow_inexact_view", None)  # whether a verdict may be drawn, not which campaign or faults
        payload = json.dumps({"name": name, "spec": spec}, sort_keys=True)
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


# -- what a worst-case search asks for (the search marker's twin of CampaignSpec) ------------------------------------
@dataclass(frozen=True)
class SearchSpec:
    """One worst-case fault search: a site, a fault budget, a threshold, and how hard to look."""

    site: str = "weight"
    min_acc: float | None = None
    max_drop: float | None = None
    max_flips: int = DEFAULT_MAX_FLIPS
    kind: str = "flip"
    bits: int = 8
    bit_positions: tuple[int, ...] | None = None
    layers: tuple[str, ...] | None = None
    per_image: bool = False
    examples: int = DEFAULT_EXAMPLES
    subset: int | None = DEFAULT_SUBSET
    samples: int | None = None
    seed: int | None = None
    min_coverage: float = 1.0
    array: tuple[int, int] | None = None  # site "pe": the systolic array's (rows, cols)
    pe_register: str = "acc"
    allow_inexact_view: bool = False  # as CampaignSpec's

    def __post_init__(self) -> None:
        if self.site not in SEARCH_SITES:
            raise SpecError("search", f"{self.site!r} is not a fault site; allowed: {', '.join(SEARCH_SITES)}")
        check_threshold(self.min_acc, self.max_drop)
        object.__setattr__(self, "array", check_array(self.array, self.pe_register, self.site, self.layers))
        if not is_int(self.max_flips) or self.max_flips < 1:
            raise SpecError("max_flips", f"{self.max_flips!r} must be a positive number of faults")
        if self.kind not in SEARCH_KINDS:
            raise SpecError("kind", f"{self.kind!r} is not a fault kind; allowed: {', '.join(SEARCH_KINDS)}")
        if not is_int(self.bits) or not 2 <= self.bits <= MAX_WEIGHT_ACT_BITS:
            raise SpecError("bits", f"{self.bits!r} must be an integer code width in [2, {MAX_WEIGHT_ACT_BITS}]")
        object.__setattr__(self, "bit_positions", check_bit_positions(self.bit_positions, self.site, self.bits,
                                                                       self.pe_register))
        object.__setattr__(self, "layers", check_layers(self.layers))
        if not isinstance(self.per_image, bool):
            raise SpecError("per_image", f"{self.per_image!r} must be True or False")
        if self.per_image and not Site(self.site).transient:
            raise SpecError("per_image", f"{self.site} faults strike every image; per_image=True needs a transient "
                            "site")
        if not is_int(self.examples) or self.examples < 1:
            raise SpecError("examples", f"{self.examples!r} must be a positive number of hypothesis examples")
        for name in ("subset", "samples"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise SpecError(name, f"{value!r} must be a positive number of images, or None for all")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise SpecError("seed", f"{self.seed!r} must be a non-negative integer, or None for hypothesis's own "
                            "randomness (derandomized under its ci profile)")
        object.__setattr__(self, "min_coverage", check_min_coverage(self.min_coverage))
        check_allow_inexact_view(self.allow_inexact_view)

    def label(self) -> str:
        """Readable id used in test ids: ``search-weight``."""
        array = "" if self.array is None else f"-{self.array[0]}x{self.array[1]}{self.pe_register}"
        return f"search-{self.site}{array}" + ("" if self.kind == "flip" else f"-{self.kind}")

    def layer_selectors(self) -> tuple[str, ...] | None:
        """What the search draws faults over: the layers, or for site "pe" the array (`systolic.Array`)."""
        if self.array is not None:
            return (f"ws{self.array[0]}x{self.array[1]}.{self.pe_register}",)
        return self.layers

    def kinds(self) -> tuple[str, ...]:
        return ("stuck0", "stuck1") if self.kind == "stuck" else (self.kind,)

    def to_dict(self) -> dict[str, Any]:
        return _record(self)

    def with_overrides(self, **overrides: Any) -> SearchSpec:
        if "search" in overrides:
            overrides["site"] = overrides.pop("search")
        known = {f.name for f in fields(self)}
        for key in overrides:
            if key not in known:
                raise SpecError(key, f"unknown search argument; allowed: {', '.join(SEARCH_ARGUMENTS)}")
        return replace(self, **one_threshold(overrides))

    def question(self) -> dict[str, Any]:
        """What defines the search's question, not how hard it looks (examples, seed, subset): the database key."""
        data = self.to_dict()
        for budget in ("examples", "seed", "subset"):
            del data[budget]
        return data


# The marker says `search="weight"` (or a list of sites, one test each) where a campaign says `site=`.
SEARCH_ARGUMENTS = ("search", *(f.name for f in fields(SearchSpec) if f.name != "site"))


def expand_search(kwargs: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> list[SearchSpec]:
    """The searches a ``resilience(search=..., ...)`` marker asks for: one per site when `search` is a list.

    `defaults` (e.g. the plugin's ``{"seed": ..., "budget": ..., "confidence": ...}``) fill in what the marker
    leaves out; keys that a search does not take are ignored."""
    unknown = sorted(set(kwargs) - set(SEARCH_ARGUMENTS))
    if unknown:
        hint = " (ber and site belong to campaigns; a search marker names its site with search=)" if {
            "ber", "site"} & set(unknown) else ""
        raise SpecError(unknown[0], f"unknown argument of a search marker{hint}; allowed: "
                        f"{', '.join(SEARCH_ARGUMENTS)}")
    known = {f.name for f in fields(SearchSpec)}
    merged = {k: v for k, v in (defaults or {}).items() if k in known and k != "site"}
    merged.update({k: v for k, v in kwargs.items() if k != "search"})
    value = kwargs["search"]
    sites = list(value) if isinstance(value, (list, tuple)) else [value]
    if not sites:
        raise SpecError("search", "is an empty list")
    if len(set(map(repr, sites))) != len(sites):
        raise SpecError("search", f"{value!r} repeats a site")
    return [SearchSpec(site=site, **merged) for site in sites]
