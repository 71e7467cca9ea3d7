"""Fingerprints of what a campaign tests: the model (architecture and state) and the evaluation data.

A quantized view is reused across tests only when both the architecture and the weights match, and the shards of
one campaign must have seen the same model and data for their trials to be merged. Weights alone do not identify
a model: two nets with equal state dicts and a ReLU vs a Hardtanh between the layers compute different functions.
"""

from __future__ import annotations

import copy
import enum
import functools
import hashlib
import pickle
import types
import uuid
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

_PLAIN = (bool, int, float, str, type(None))


def _code_digest(code: types.CodeType, digest: Any, depth: int = 0) -> None:
    """The bytecode, names and constants of `code` and of the functions nested in it."""
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and depth < 8:
            _code_digest(const, digest, depth + 1)
        else:
            digest.update(repr(const).encode())


def _function_digest(function: Any, digest: Any) -> None:
    function = getattr(function, "__func__", function)
    code = getattr(function, "__code__", None)
    if code is not None:
        _code_digest(code, digest)
    else:
        digest.update(repr(getattr(function, "__qualname__", type(function).__qualname__)).encode())


def _plain_attributes(module: nn.Module) -> list[tuple[str, str]]:
    """Public non-tensor attributes that steer a forward (e.g. ``self.scale = 0.5``, ``inplace``)."""
    items = []
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
            items.append((key, repr(value)))
    return items


def structure_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every submodule's name, class, settings, forward code and hooks."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        cls = type(module)
        digest.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{module.extra_repr()}".encode())
        digest.update(repr(_plain_attributes(module)).encode())
        _function_digest(cls.forward, digest)
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                _function_digest(hook, digest)
    return digest.hexdigest()


def _digest_value(digest: Any, value: Any) -> None:
    """Feed one state entry to `digest`, bit for bit: a tensor's bytes (a quantized one's codes and grid), and the
    contents of what torch.ao keeps beside tensors, never their repr (a tensor's repr elides the middle of a large
    one, a packed parameter's repr is its memory address)."""
    if isinstance(value, torch.Tensor):
        if value.is_quantized:  # the codes and their grid: scales and zero points are the model too
            digest.update(repr(value.qscheme()).encode())
            if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                grid = (value.q_per_channel_scales(), value.q_per_channel_zero_points())
            else:
                grid = (torch.tensor([value.q_scale()]), torch.tensor([value.q_zero_point()]))
            digest.update(tensor_fingerprint(*grid).encode())
            value = value.int_repr()
        t = value.detach().cpu().contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, (tuple, list)):  # e.g. a torch.ao Linear's (weight, bias)
        digest.update(f"{type(value).__name__}[{len(value)}]".encode())
        for item in value:
            _digest_value(digest, item)
    elif isinstance(value, dict):
        digest.update(f"dict[{len(value)}]".encode())
        for key in sorted(value, key=str):
            _digest_value(digest, key)
            _digest_value(digest, value[key])
    elif isinstance(value, torch.ScriptObject) and hasattr(value, "__getstate__"):  # packed parameters
        digest.update(str(value._type().qualified_name()).encode() if hasattr(value, "_type") else b"ScriptObject")
        _digest_value(digest, value.__getstate__())
    elif value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        digest.update(repr(value).encode())
    else:  # anything else by its pickled bytes, or its type alone where it has none (never an address)
        try:
            digest.update(pickle.dumps(value))
        except Exception:  # noqa: BLE001 - an unpicklable extra state
            digest.update(type(value).__qualname__.encode())


def state_checksum(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (and what torch.ao packs beside them), names and bytes: bit-exact
    identity of a model's state."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        _digest_value(digest, value)
    return digest.hexdigest()


def model_fingerprint(model: Any) -> str:
    """Architecture and state together: equal only for models that compute the same function. An ONNX model (a
    ModelProto or an .onnx path) is its serialized bytes."""
    from .deployed import is_onnx

    if is_onnx(model):
        return hashlib.sha256(_onnx_bytes(model)).hexdigest()
    return hashlib.sha256(f"{structure_fingerprint(model)}|{state_checksum(model)}".encode()).hexdigest()


# -- what a forward computes, for the quantize-once cache: beyond the architecture and the state -------------------
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_compiled_call_impl", "_flat_weight_refs"}
_DEPTH = 3  # how deep attributes' contents are followed (a config object's dicts; a closure's cells)


def _digest_attribute(digest: Any, value: Any, depth: int = 0) -> None:
    """Feed one attribute's value to `digest`, deterministically (never an address, never a set's hash order):
    what it computes where it is a function, its bytes where it is a tensor, its contents where it is a container
    or a plain object, else its type."""
    if depth > _DEPTH:
        digest.update(b"...")
    elif isinstance(value, _PLAIN) or isinstance(value, (bytes, torch.dtype, torch.device, enum.Enum)):
        digest.update(repr(value).encode())
    elif isinstance(value, torch.Tensor):
        _digest_value(digest, value)
    elif isinstance(value, (tuple, list)):
        digest.update(f"{type(value).__name__}[{len(value)}]".encode())
        for item in value:
            _digest_attribute(digest, item, depth + 1)
    elif isinstance(value, dict):
        digest.update(f"dict[{len(value)}]".encode())
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _digest_attribute(digest, value[key], depth + 1)
    elif isinstance(value, (set, frozenset)):
        digest.update(repr(sorted(map(repr, value))).encode())
    elif isinstance(value, functools.partial):
        digest.update(b"partial")
        _digest_attribute(digest, value.func, depth + 1)
        _digest_attribute(digest, value.args, depth + 1)
        _digest_attribute(digest, value.keywords, depth + 1)
    elif isinstance(value, type):
        digest.update(f"{value.__module__}.{value.__qualname__}".encode())
    elif isinstance(value, nn.Module):  # one kept outside the module tree: its kind (the tree is hashed apart)
        digest.update(f"{type(value).__module__}.{type(value).__qualname__}|{value.extra_repr()}".encode())
    elif callable(value) and (hasattr(value, "__code__") or hasattr(value, "__func__")
                              or isinstance(value, types.BuiltinFunctionType)):
        _function_digest(value, digest)
        function = getattr(value, "__func__", value)
        _digest_attribute(digest, getattr(function, "__defaults__", None), depth + 1)
        _digest_attribute(digest, getattr(function, "__kwdefaults__", None), depth + 1)
        for cell in getattr(function, "__closure__", None) or ():
            try:
                _digest_attribute(digest, cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                digest.update(b"<empty>")
    else:
        digest.update(f"{type(value).__module__}.{type(value).__qualname__}".encode())
        try:
            contents = getattr(value, "__dict__", None)
            if isinstance(contents, dict):  # a config object's settings
                _digest_attribute(digest, dict(contents), depth + 1)
            elif hasattr(value, "tobytes") and hasattr(value, "dtype"):  # a numpy array
                digest.update(f"{value.dtype}{getattr(value, 'shape', '')}".encode())
                digest.update(value.tobytes())
        except Exception:  # noqa: BLE001 - an object that will not be read: its type stands for it
            digest.update(b"<unreadable>")


def attributes_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every submodule's own attributes, whatever their kind: a function kept as ``self.act``
    (F.relu vs torch.tanh), a partial's arguments, a lambda's code and closure, a tensor that is no buffer. The
    architecture's fingerprint hashes plain values only (it must agree between processes whatever a forward
    cached on a module); two models it cannot tell apart computed different functions and shared a cached view."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(name.encode())
        _digest_attribute(digest, {key: value for key, value in vars(module).items()
                                   if key not in _MODULE_INTERNALS})
    return digest.hexdigest()


def private_copy(model: nn.Module) -> nn.Module:
    """`copy.deepcopy(model)`, also of a model holding a tensor computed from its parameters as a plain attribute
    (a pruned layer's `weight`, `weight_orig * weight_mask`; the hook-based `torch.nn.utils.weight_norm`'s), which
    deepcopy refuses (not a graph leaf): each is copied detached. The forward pre-hook that computes it is copied
    with the model and computes it again from the copy's own parameters. A custom op or a TorchScript function
    kept as an attribute (`torch.library.custom_op`'s, `torch.jit.script`'s: deepcopy cannot pickle them) is
    shared, as a function is."""
    from torch._library.custom_ops import CustomOpDef

    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
            elif isinstance(value, (CustomOpDef, torch.jit.ScriptFunction)):  # kept as an attribute: shared, as a
                memo[id(value)] = value  # function is (deepcopy cannot pickle either)
    return copy.deepcopy(model, memo)


BEHAVIOUR_IMAGES = 4  # the calibration images a model's float outputs are hashed on


def outputs_fingerprint(model: nn.Module, inputs: Any) -> str:
    """SHA-256 of a private eval-mode copy's float outputs on the first `BEHAVIOUR_IMAGES` inputs, bit for bit:
    what the model computes, whatever it is written with (a module global or a class attribute changed between two
    tests). A model that cannot run so gets a fingerprint of its own (never a stale cache hit)."""
    from .data import Inputs, call_model

    try:
        probe = private_copy(model).eval()
        device = next((p.device for p in probe.parameters()), torch.device("cpu"))
        first = inputs[:BEHAVIOUR_IMAGES]
        first = Inputs(tuple(t.to(device, copy=True) for t in first.tensors), first.names) \
            if isinstance(first, Inputs) else first.to(device, copy=True)  # a forward may write its input
        with torch.no_grad():
            out = call_model(probe, first)
    except Exception:  # noqa: BLE001 - quantize() names what is wrong; the cache only must not match it
        return f"unrun:{uuid.uuid4()}"
    digest = hashlib.sha256()
    for leaf in pytree.tree_leaves(out):
        _digest_attribute(digest, leaf)
    return digest.hexdigest()


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 over dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _onnx_bytes(model: Any) -> bytes:
    if hasattr(model, "SerializeToString"):
        return bytes(model.SerializeToString())
    with open(model, "rb") as file:
        return file.read()
