"""Fingerprints of what a campaign tests: the model (architecture and state) and the evaluation data.

A quantized view is reused across tests only when both the architecture and the weights match, and the shards of
one campaign must have seen the same model and data for their trials to be merged. Weights alone do not identify
a model: two nets with equal state dicts and a ReLU vs a Hardtanh between the layers compute different functions.
"""

from __future__ import annotations

import hashlib
import pickle
import types
from typing import Any

import torch
from torch import nn

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
