"""Mitigations a gate can apply, simulated exactly on the integer codes (issue 18).

A mitigated campaign (`CampaignSpec.mitigated`) draws trial i's faults exactly as its unmitigated twin does (both
are seeded by the unmitigated campaign's id, `CampaignSpec.draw_id`), then:

- ``protect=[globs]`` (TMR or duplication of whole layers): every fault in a protected layer is corrected, at any
  site; the cost is the protected layers' share of the weight bits and 2x their MACs (two extra copies) as a share
  of the quantized layers' MACs (`protection_cost`);
- ``ecc="secded"`` on weight memory: the weight codes of a layer are stored row-major in words of
  ``ecc_word_bits`` data bits (64: eight int8 codes; word w holds codes [w*k, (w+1)*k) of the flattened weight,
  k = word bits / code bits). Per trial the faults are grouped by (layer, word) and the word's *actual* bit errors
  counted (original XOR faulty codes, so a stuck-at that matches the stored bit is no error): 1 error: corrected
  (its faults dropped); 2: detected, and since weights are read by every inference, every image of the trial is a
  detected unrecoverable error (DUE: no prediction is delivered, which the accuracy counts as not correct); 3 or
  more: modelled as silent (the faults stay), conservatively: a real SECDED decoder miscorrects an odd count
  (adding a fourth wrong bit) and may detect an even one. The check bits are not faulted (a check-bit error alone
  is corrected like a data-bit error; with a data-bit error it would make a detected double error, so the DUE
  rate is slightly underestimated). The cost is the check bits per data bit (8 per 64);
- ``mitigation="range_restriction"`` (Ranger-style): each quantized layer's output codes, after its act faults,
  are clamped per output channel to the [min, max] that channel produced on the campaign's own evaluation images
  without faults (recorded by one fault-free pass when the campaign starts), so range restriction never changes a
  fault-free prediction and fault dropping and late start stay exact. Ranger keeps one bound pair per layer, after
  the activation function; here the quantized layer's output is the pre-activation, whose per-layer range is about
  the whole calibrated code range (symmetric calibration puts one end at the largest code), so one pair per layer
  clamps almost nothing; a pair per channel is as cheap in hardware (two registers per channel, beside its
  requantization multiplier) and tighter. A deployment would profile the bounds on its training data; bounds from
  the evaluated images are the tightest that lose nothing on them. Layers that hand on float results
  (`QuantLayer.float_output`) have no codes and are not clamped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .bits import apply_bit_faults, to_unsigned
from .data import Batch
from .evaluate import EvaluationError
from .faults import FaultPattern, LayerFaults, Site
from .qmodel import QuantizedModel
from .spec import CampaignSpec


class MitigationError(EvaluationError):
    """A mitigation that cannot be applied to this model (e.g. a protect glob that matches no layer)."""


# -- SECDED --------------------------------------------------------------------------------------------------------
CLEAN, CORRECTED, DETECTED, SILENT = "clean", "corrected", "detected", "silent"


def secded_check_bits(data_bits: int) -> int:
    """Check bits of a SECDED (extended Hamming) code over `data_bits`: r with 2^r >= data + r + 1, plus the
    overall parity bit (64 -> 8, 32 -> 7, 8 -> 5)."""
    r = 1
    while (1 << r) < data_bits + r + 1:
        r += 1
    return r + 1


def word_outcome(errors: int) -> str:
    """What a SECDED word with `errors` faulty bits reads back as (see the module docstring)."""
    return CLEAN if errors == 0 else CORRECTED if errors == 1 else DETECTED if errors == 2 else SILENT


def read_word(codes: Sequence[int], faults: Sequence[tuple[int, int, str]], bits: int) -> tuple[str, list[int]]:
    """One SECDED word of `codes` (signed `bits`-bit codes) under `faults` ((code index in the word, bit, kind),
    applied in order): its outcome and the codes it reads back (the original ones when corrected or clean, the
    faulty ones when silent, and the faulty ones, flagged, when detected). Plain integers: the reference of
    `secded`."""
    raw = [c & ((1 << bits) - 1) for c in codes]
    faulty = list(raw)
    for index, bit, kind in faults:
        mask = 1 << bit
        faulty[index] = faulty[index] ^ mask if kind == "flip" else faulty[index] & ~mask if kind == "stuck0" \
            else faulty[index] | mask
    errors = sum(bin(a ^ b).count("1") for a, b in zip(raw, faulty))
    outcome = word_outcome(errors)
    back = raw if outcome in (CLEAN, CORRECTED) else faulty
    return outcome, [r - (1 << bits) if r >= 1 << (bits - 1) else r for r in back]


@dataclass
class EccResult:
    """The weight faults that get past SECDED, and what it did with the rest."""

    pattern: FaultPattern
    corrected_words: int = 0
    detected_words: int = 0
    silent_words: int = 0

    @property
    def detected(self) -> bool:
        return self.detected_words > 0


def _popcount(raw: torch.Tensor, bits: int) -> torch.Tensor:
    return sum(((raw >> b) & 1 for b in range(bits)), torch.zeros_like(raw))


def secded(pattern: FaultPattern, codes_of: Callable[[str], torch.Tensor], bits_of: Callable[[str], int],
           word_bits: int) -> EccResult:
    """`pattern` as SECDED-protected weight memory lets it through: faults of corrected words dropped, those of
    silent (3+ errors) and clean words kept; the counts of corrected, detected and silent words. `codes_of(layer)`
    gives a layer's flat signed weight codes (int64), `bits_of(layer)` their width. Faults at other sites pass
    unchanged. Vectorised; several faults on one code are applied in pattern order."""
    groups: dict[tuple[Site, str], LayerFaults] = {}
    result = EccResult(FaultPattern(groups))
    for key, group in pattern.groups.items():
        site, layer = key
        if site is not Site.WEIGHT or not len(group):
            groups[key] = group
            continue
        bits = bits_of(layer)
        per_word = word_bits // bits
        codes = codes_of(layer).reshape(-1).to(torch.int64).cpu()
        index, bit, kind = group.index.cpu(), group.bit.cpu(), group.kind.cpu()
        touched, inverse = torch.unique(index, return_inverse=True)
        original = codes[touched]
        counts = torch.bincount(inverse, minlength=len(touched))
        single = counts[inverse] == 1
        faulty = original.clone()
        faulty[inverse[single]] = apply_bit_faults(original[inverse[single]], bit[single], kind[single], bits)
        for position in (counts > 1).nonzero().reshape(-1).tolist():  # rare: several faults on one code, in order
            code = original[position : position + 1]
            for f in (inverse == position).nonzero().reshape(-1).tolist():
                code = apply_bit_faults(code, bit[f : f + 1], kind[f : f + 1], bits)
            faulty[position] = code[0]
        errors = _popcount(to_unsigned(original, bits) ^ to_unsigned(faulty, bits), bits)
        words, word_of = torch.unique(touched // per_word, return_inverse=True)
        word_errors = torch.zeros(len(words), dtype=torch.int64).index_add_(0, word_of, errors)
        result.corrected_words += int((word_errors == 1).sum())
        result.detected_words += int((word_errors == 2).sum())
        result.silent_words += int((word_errors >= 3).sum())
        keep = (word_errors[word_of] != 1)[inverse].to(group.index.device)
        if bool(keep.any()):
            groups[key] = group.subset(keep)
    return result


def without_layers(pattern: FaultPattern, layers: frozenset[str]) -> FaultPattern:
    """`pattern` without the faults of `layers` (protected: corrected by TMR or duplication)."""
    return FaultPattern({key: group for key, group in pattern.groups.items() if key[1] not in layers})


# -- costs ---------------------------------------------------------------------------------------------------------
def protection_cost(qmodel: QuantizedModel, names: Sequence[str]) -> dict[str, Any]:
    """What protecting `names` with TMR costs: their weight bits (share and count) and 2x their MACs (two extra
    copies), as a share of all quantized layers' weight bits and MACs per image."""
    chosen = set(names)
    # stored weight bits: a tied weight (`QuantLayer.weight_group`) counts once, under the first layer of its group
    bits = {name: layer.weight_bits() if layer.weight_group[:1] in ((), (name,)) else 0
            for name, layer in qmodel.layers.items()}
    macs = {name: layer.macs() for name, layer in qmodel.layers.items()}
    total_bits, total_macs = sum(bits.values()) or 1, sum(macs.values()) or 1
    protected_bits = sum(bits[n] for n in chosen)
    extra = 2 * sum(macs[n] for n in chosen)
    return {"scheme": "tmr", "weight_bits": protected_bits / total_bits, "protected_weight_bits": protected_bits,
            "extra_macs": extra / total_macs, "extra_macs_per_image": extra}


def mitigation_cost(qmodel: QuantizedModel, spec: CampaignSpec, protected: Sequence[str]) -> dict[str, Any]:
    """The cost of a spec's mitigations, one entry each."""
    cost: dict[str, Any] = {}
    if spec.protect is not None:
        cost["protect"] = protection_cost(qmodel, protected)
    if spec.ecc is not None:
        check = secded_check_bits(spec.ecc_word_bits)
        cost["ecc"] = {"scheme": spec.ecc, "word_bits": spec.ecc_word_bits, "check_bits": check,
                       "memory_overhead": check / spec.ecc_word_bits}
    if spec.mitigation and "range_restriction" in spec.mitigation:
        clamped = sum(layer.numel(Site.ACT) for layer in qmodel.layers.values())
        bounds = sum(int(layer.weight_scale.numel()) for layer in qmodel.layers.values() if not layer.float_output)
        cost["range_restriction"] = {"comparisons_per_image": 2 * clamped, "bound_registers": 2 * bounds}
    return cost


def cost_text(cost: Mapping[str, Any]) -> str:
    """A mitigation cost in words, for failure messages."""
    parts = []
    if "protect" in cost:
        p = cost["protect"]
        parts.append(f"TMR of {p['weight_bits']:.1%} of weight bits, +{p['extra_macs']:.1%} MACs")
    if "ecc" in cost:
        e = cost["ecc"]
        parts.append(f"{e['scheme'].upper()} ({e['check_bits']} check bits per {e['word_bits']}: "
                     f"+{e['memory_overhead']:.1%} weight memory)")
    if "range_restriction" in cost:
        parts.append(f"range restriction ({cost['range_restriction']['comparisons_per_image']} comparisons per image)")
    return "; ".join(parts)


# -- what a campaign applies ---------------------------------------------------------------------------------------
def escape_glob(name: str) -> str:
    """A glob that matches exactly `name` (layer names may hold glob characters such as '[')."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@dataclass
class Applied:
    """One trial's faults as the mitigated hardware meets them."""

    pattern: FaultPattern
    detected: bool  # an ECC word detected an uncorrectable error: every image of the trial is a DUE
    corrected: int  # faults removed (protected layers, corrected ECC words)


class Mitigation:
    """The mitigations of one campaign on one quantized model and evaluation set."""

    def __init__(self, qmodel: QuantizedModel, inputs: Batch, spec: CampaignSpec, batch_size: int = 256) -> None:
        self.qmodel, self.spec = qmodel, spec
        names = list(qmodel.layers)
        self.protected: frozenset[str] = frozenset()
        if spec.protect is not None:
            chosen: set[str] = set()
            for glob in spec.protect:
                hits = {n for n in names if fnmatch.fnmatchcase(n, glob)}
                if not hits:
                    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                    raise MitigationError(f"protect={list(spec.protect)!r}: {glob!r} matches no quantized layer; "
                                          f"layers are: {shown}")
                chosen |= hits
            self.protected = frozenset(chosen)
            for name in sorted(chosen, key=names.index):
                group = set(qmodel.layers[name].weight_group)
                if spec.site == "weight" and group - chosen:
                    raise MitigationError(
                        f"protect={list(spec.protect)!r}: layer {name!r} shares its stored weight with "
                        f"{sorted(group - {name}, key=names.index)} (tied weights, stored once); a fault in it reaches "
                        "every layer that reads it, so protect the whole group or none of it")
        self.bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        if spec.mitigation and "range_restriction" in spec.mitigation:
            self.bounds = qmodel.output_ranges(inputs, batch_size)
        self.cost = mitigation_cost(qmodel, spec, [n for n in names if n in self.protected])

    @property
    def restricts(self) -> bool:
        return self.bounds is not None

    def apply(self, pattern: FaultPattern) -> Applied:
        drawn = len(pattern)
        if self.protected:
            pattern = without_layers(pattern, self.protected)
        detected = False
        if self.spec.ecc is not None and pattern.has_weight_faults():
            layers = self.qmodel.layers
            ecc = secded(pattern, lambda name: layers[name].weight_codes, lambda name: layers[name].bits,
                         self.spec.ecc_word_bits)
            pattern, detected = ecc.pattern, ecc.detected
        return Applied(pattern, detected, drawn - len(pattern))

    def active(self) -> Any:
        """The context in which the mitigated model runs (range restriction's clamps)."""
        return self.qmodel.restricted(self.bounds) if self.bounds is not None else nullcontext()

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec.mitigation_name(), "protected": sorted(self.protected, key=list(
            self.qmodel.layers).index), "cost": self.cost}

