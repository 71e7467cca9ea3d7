"""Fingerprints of what a campaign tests: the model (architecture and state) and the evaluation data.

A quantized view is reused across tests only when both the architecture and the weights match, and the shards of
one campaign must have seen the same model and data for their trials to be merged. Weights alone do not identify
a model: two nets with equal state dicts and a ReLU vs a Hardtanh between the layers compute different functions.
"""

from __future__ import annotations

import hashlib
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


def state_checksum(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, names and bytes: bit-exact identity of a model's state."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        if not isinstance(tensor, torch.Tensor):  # e.g. the dtype entry of torch.ao packed parameters
            digest.update(repr(tensor).encode())
            continue
        if tensor.is_quantized:  # the codes and their grid: scales and zero points are the model too
            digest.update(repr(tensor.qscheme()).encode())
            if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                grid = (tensor.q_per_channel_scales(), tensor.q_per_channel_zero_points())
            else:
                grid = (torch.tensor([tensor.q_scale()]), torch.tensor([tensor.q_zero_point()]))
            digest.update(tensor_fingerprint(*grid).encode())
            tensor = tensor.int_repr()
        t = tensor.detach().cpu().contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
