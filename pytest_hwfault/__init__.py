"""pytest-hwfault: gate quantized neural networks on their accuracy under hardware bit flips."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Fault",
    "FaultModel",
    "FaultPattern",
    "Kind",
    "QuantizedModel",
    "Site",
    "accuracy",
    "quantize",
    "resilience",
]

if TYPE_CHECKING:
    from .evaluate import accuracy
    from .faults import Fault, FaultModel, FaultPattern
    from .marker import resilience
    from .quantization import QuantizedModel, quantize
    from .spec import Kind, Site

_LAZY = {
    "Kind": "spec",
    "accuracy": "evaluate",
    "Fault": "faults",
    "FaultModel": "faults",
    "FaultPattern": "faults",
    "Site": "spec",
    "QuantizedModel": "quantization",
    "quantize": "quantization",
    "resilience": "marker",
}


def __getattr__(name: str) -> Any:
    """Import torch-heavy parts on first use, so that loading the plugin stays cheap."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_hwfault' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
