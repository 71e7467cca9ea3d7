"""The model's own ReLUs and residual additions, run in place on the engine's fresh layer outputs.

A model written with out-of-place ops (`F.relu(self.bn1(self.conv1(x)))`, `F.relu(out + self.shortcut(x))`)
allocates a new tensor for every ReLU and sum. On the int8 path those were a third of a ResNet56 forward pass: each
fresh multi-megabyte tensor costs its pages' faults, where the same op in place is one pass over memory already
touched. The float model pays the same cost, but the engine need not.

Where the traced graph shows that a quantized layer's output is read by one op only, a ReLU or a sum, and that op's
result again by one op only, and so on (`graph.in_place_chains`), the layer's hook marks the tensor it returns with
that chain (`OwnOpsInPlace.mark`). While the view runs, this TorchFunctionMode performs each marked step in place
on the marked tensor: `torch.relu_`, or `add_` of the other operand where both have the same shape, dtype, device
and strides, so the result is laid out as the out-of-place op's would be. Elementwise, with the same operations,
the values are bit for bit the same; IEEE addition is commutative, so a sum may be taken into either operand.
Anything unexpected (another op, another layout) runs the model's op as it is.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import native
from .layout import is_dense

_RELU = {F.relu, torch.relu, torch._C.TensorBase.relu}
_ADD = {torch.add, torch._C.TensorBase.add}  # `a + b` reaches a mode as TensorBase.add


class OwnOpsInPlace(TorchFunctionMode):
    """Runs the marked chains of one forward pass in place (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        # id(tensor) -> (the tensor, weakly; its chain's remaining steps; whether the first is done already)
        self.marked: dict[int, tuple[weakref.ref[torch.Tensor], tuple[str, ...], bool]] = {}
        self.steps = 0  # the model's ops this mode ran in place (or found done)

    def mark(self, tensor: torch.Tensor, chain: tuple[str, ...], done: bool = False) -> None:
        """`tensor`, a fresh result no one else holds, is read next by `chain`'s ops, each the only reader; `done`:
        its first step's effect is in it already (a ReLU the requantization's clamp did)."""
        if is_dense(tuple(tensor.shape), tensor.stride()):
            self.marked[id(tensor)] = (weakref.ref(tensor), chain, done)

    def _take(self, tensor: Any, step: str) -> tuple[tuple[str, ...], bool] | None:
        """(the steps after it, whether it is done) if `tensor`'s next step is `step`; its mark is consumed either
        way."""
        entry = self.marked.pop(id(tensor), None) if isinstance(tensor, torch.Tensor) else None
        if entry is None or entry[0]() is not tensor or entry[1][0] != step:
            return None
        return entry[1][1:], entry[2]

    def _carry(self, tensor: torch.Tensor, rest: tuple[str, ...], done: bool = False) -> torch.Tensor:
        self.steps += 1
        if rest:
            self.marked[id(tensor)] = (weakref.ref(tensor), rest, done)
        return tensor

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self.marked and args:
            if func in _RELU and len(args) == 1 and set(kwargs) <= {"inplace"}:
                taken = self._take(args[0], "relu")
                if taken is not None:
                    rest, done = taken
                    return self._carry(args[0] if done else torch.relu_(args[0]), rest)
            elif func in _ADD and len(args) == 2 and not kwargs:
                a, b = args
                taken = self._take(a, "add")
                if taken is None:
                    a, b = b, a
                    taken = self._take(a, "add")
                if taken is not None and isinstance(b, torch.Tensor) and b is not a and b.shape == a.shape and \
                        b.dtype == a.dtype and b.device == a.device and b.stride() == a.stride():
                    rest = taken[0]
                    if rest[:1] == ("relu",) and native.add_relu(a, b):  # the sum's ReLU in the same pass
                        return self._carry(a, rest, done=True)
                    return self._carry(a.add_(b), rest)
        return func(*args, **kwargs)
