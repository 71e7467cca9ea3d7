"""Rewrite the fused multiply-accumulate modules of the private copy (attention, recurrent cells) into the pieces the
engine quantizes: Linear layers and `MatMul`s of two activations, with the nonlinear glue (softmax, gates) in float.

An accelerator runs attention and recurrent cells on the same int8 MAC arrays as convolutions; torch runs them as
fused kernels (`_native_multi_head_attention`, `_VF.lstm`) that no hook can reach. The rewritten modules compute
the same function (up to float rounding) with every MAC in a module of its own:

- `nn.MultiheadAttention` -> `SplitMultiheadAttention`: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``
  (Linear) and ``scores`` (q @ k^T) and ``context`` (softmax(scores) @ v), both `MatMul`s of two activations.
  Heads stay a per-image dimension ([N, heads, L, head_dim]), so fault positions count within one image.
- Hugging Face's GPT-2-style ``Conv1D`` (a transposed linear layer computed on the batch and sequence merged into
  one dimension) -> `nn.Linear`.
- `nn.LSTM` / `nn.GRU` / `nn.RNN` -> `UnrolledRecurrent`: per layer and direction an ``ih`` Linear over the whole
  sequence (one call) and an ``hh`` Linear (and an LSTM's ``proj``) that runs once per time step; the engine gives
  such a layer one fault index range per step (`QuantLayer.calls`).

Modules with options the rewrite does not reproduce (attention with ``add_bias_kv`` or ``add_zero_attn``) are left
as they are: their MACs stay in float, and the view's coverage says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class MatMul(nn.Module):
    """``a @ b`` of two activations (torch.matmul broadcasting): a quantized layer with two input-code operands and
    no weight."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch._C.DisableTorchFunction():  # the op itself, not a functional call to dispatch again
            return torch.matmul(a, b)


class BaddBmm(nn.Module):
    """``torch.baddbmm(input, a, b, beta=, alpha=)`` = beta x input + alpha x (a @ b) (BLOOM's attention scores with
    their ALiBi bias): the product is a `MatMul` layer; the scaling and the added input stay float, as any op after a
    layer does."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = MatMul()

    def forward(self, a: torch.Tensor, b: torch.Tensor, added: torch.Tensor | None = None, beta: float = 1.0,
                alpha: float = 1.0) -> torch.Tensor:
        product = self.layer(a, b)
        with torch._C.DisableTorchFunction():
            if alpha != 1:
                product = product * alpha
            if added is None or beta == 0:  # torch ignores the input at beta 0 (NaN and all)
                return product
            return product + (added if beta == 1 else added * beta)


class Einsum(MatMul):
    """``torch.einsum(equation, a, b)`` of two activations."""

    def __init__(self, equation: str) -> None:
        super().__init__()
        self.equation = equation

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch._C.DisableTorchFunction():
            return torch.einsum(self.equation, a, b)

    def extra_repr(self) -> str:
        return repr(self.equation)


def attention(scores: MatMul, context: MatMul, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T x scale + mask) v over [..., L, d] tensors, the two matmuls as layers; also the weights.
    `mask`: boolean (True = attend) or additive, broadcast over the scores, as F.scaled_dot_product_attention."""
    s = scores(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    weights = torch.softmax(s, dim=-1)
    return context(weights, v), weights


class ScaledDotProductAttention(nn.Module):
    """F.scaled_dot_product_attention (no dropout: eval mode) as two `MatMul` layers around a float softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.scores, self.context = MatMul(), MatMul()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        if enable_gqa and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            # grouped-query attention: each key/value head serves a group of query heads, as torch's reference
            # computes it (and a MAC array does, reading each key and value once per query head it serves)
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        return attention(self.scores, self.context, q, k, v, attn_mask, is_causal, scale)[0]


class SplitMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with its projections as Linear layers and its two matmuls as `MatMul` layers."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e, heads = mha.embed_dim, mha.num_heads
        self.embed_dim, self.num_heads, self.head_dim, self.batch_first = e, heads, e // heads, mha.batch_first
        bias = mha.in_proj_bias is not None
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(e, e, bias), nn.Linear(mha.kdim, e, bias), \
            nn.Linear(mha.vdim, e, bias)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                assert mha.in_proj_weight is not None
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            for proj, weight, index in zip((self.q_proj, self.k_proj, self.v_proj), weights, range(3)):
                proj.weight.copy_(weight)
                if bias:
                    assert mha.in_proj_bias is not None and proj.bias is not None
                    proj.bias.copy_(mha.in_proj_bias[index * e:(index + 1) * e])
        self.out_proj = mha.out_proj
        self.scores, self.context = MatMul(), MatMul()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        heads, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, length, heads, d).transpose(1, 2)
        k = self.k_proj(key).view(n, source, heads, d).transpose(1, 2)
        v = self.v_proj(value).view(n, source, heads, d).transpose(1, 2)
        mask = _attention_mask(attn_mask, key_padding_mask, n, heads, length, source, query.dtype)
        causal = is_causal and attn_mask is None
        out, weights = attention(self.scores, self.context, q, k, v, mask, causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        if unbatched:
            out, weights = out.squeeze(0), weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=-3) if average_attn_weights else weights


def _attention_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, heads: int,
                    length: int, source: int, dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (True or -inf: do not attend) as one additive mask over [N, heads, L, S]."""
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    total = None
    if attn_mask is not None:
        total = additive(attn_mask)
        if total.dim() == 3:  # [N * heads, L, S]
            total = total.view(n, heads, length, source)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(n, 1, 1, source)
        total = padding if total is None else total + padding
    return total


class _Cell(nn.Module):
    """One layer and direction of a recurrent module: its gate matmuls."""

    def __init__(self, ih: nn.Linear, hh: nn.Linear) -> None:
        super().__init__()
        self.ih, self.hh = ih, hh
        self.proj: nn.Linear | None = None


class UnrolledRecurrent(nn.Module):
    """nn.LSTM / nn.GRU / nn.RNN as its gate matmuls, step by step (same equations as torch's documentation)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.mode, self.num_layers, self.batch_first = rnn.mode, rnn.num_layers, rnn.batch_first
        self.hidden_size, self.proj_size = rnn.hidden_size, getattr(rnn, "proj_size", 0)
        self.directions = 2 if rnn.bidirectional else 1
        gates = {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)
        self.cells = nn.ModuleDict()
        out_size = self.proj_size or self.hidden_size
        for layer in range(rnn.num_layers):
            for direction in range(self.directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                in_size = rnn.input_size if layer == 0 else out_size * self.directions
                cell = _Cell(nn.Linear(in_size, gates * rnn.hidden_size, rnn.bias),
                             nn.Linear(out_size, gates * rnn.hidden_size, rnn.bias))
                with torch.no_grad():
                    cell.ih.weight.copy_(getattr(rnn, "weight_ih" + suffix))
                    cell.hh.weight.copy_(getattr(rnn, "weight_hh" + suffix))
                    if rnn.bias:
                        cell.ih.bias.copy_(getattr(rnn, "bias_ih" + suffix))
                        cell.hh.bias.copy_(getattr(rnn, "bias_hh" + suffix))
                if self.proj_size:
                    cell.proj = nn.Linear(rnn.hidden_size, self.proj_size, bias=False)
                    with torch.no_grad():
                        cell.proj.weight.copy_(getattr(rnn, "weight_hr" + suffix))
                self.cells[suffix[1:]] = cell
        # a packed batch runs the calibration data's longest sequence's steps (`packed_steps_for`)
        self.packed_steps: int | None = None
        self.packed_steps_fixed = False
        self.packed_seen = [0, 0]  # calibration data: steps within the images' lengths, images

    def forward(self, x: Any, hx: Any = None) -> tuple[Any, Any]:
        if isinstance(x, nn.utils.rnn.PackedSequence):
            return self._forward_packed(x, hx)
        unbatched = x.dim() == 2
        x = x.unsqueeze(0) if unbatched else (x if self.batch_first else x.transpose(0, 1))  # [N, T, features]
        if hx is not None and unbatched:
            hx = tuple(h.unsqueeze(1) for h in hx) if self.mode == "LSTM" else hx.unsqueeze(1)
        out, h_n, c_n = self._layers(x, hx, None)
        out = out.squeeze(0) if unbatched else (out if self.batch_first else out.transpose(0, 1))
        if unbatched:
            h_n, c_n = h_n.squeeze(1), None if c_n is None else c_n.squeeze(1)
        return out, ((h_n, c_n) if self.mode == "LSTM" else h_n)

    def _forward_packed(self, x: nn.utils.rnn.PackedSequence, hx: Any) -> tuple[nn.utils.rnn.PackedSequence, Any]:
        """A packed batch as torch's module runs it (each sequence stops at its length; a reverse direction starts at
        its last step), computed one row per image on the padded batch: an image's steps past its length compute on
        zeros (the hidden matmul's input and the input's padding), are discarded, and leave its state as it was."""
        padded, lengths = nn.utils.rnn.pad_packed_sequence(x, batch_first=True)  # the batch's order; zero padding
        longest = padded.shape[1]
        steps = self.packed_steps_for(longest)
        if steps > longest:
            padded = torch.cat([padded, padded.new_zeros(padded.shape[0], steps - longest, *padded.shape[2:])], 1)
        valid = torch.arange(steps, device=padded.device) < lengths.to(padded.device)[:, None]  # [N, steps]
        if not self.packed_steps_fixed:  # calibration data: how many of the steps run are an image's own
            self.packed_seen = [self.packed_seen[0] + int(lengths.sum()), self.packed_seen[1] + len(lengths)]
        out, h_n, c_n = self._layers(padded, hx, valid)
        rows = out[:, :longest] if x.sorted_indices is None else out[:, :longest].index_select(0, x.sorted_indices)
        kept = torch.arange(len(rows), device=rows.device) < x.batch_sizes.to(rows.device)[:, None]  # [T, N]: packed
        packed = nn.utils.rnn.PackedSequence(rows.transpose(0, 1)[kept], x.batch_sizes, x.sorted_indices,
                                             x.unsorted_indices)
        return packed, ((h_n, c_n) if self.mode == "LSTM" else h_n)

    def packed_steps_for(self, longest: int) -> int:
        """How many steps a packed batch whose longest sequence has `longest` runs: the longest of the calibration
        data's (`fix_packed_steps`), so that every forward pass, a trial's few faulty images included, calls the
        hidden matmul equally often (faults are placed per call)."""
        if not self.packed_steps_fixed:
            self.packed_steps = max(self.packed_steps or 0, longest)
        assert self.packed_steps is not None
        if longest > self.packed_steps:
            from .qmodel import UnsupportedModelError

            raise UnsupportedModelError(
                f"the model passes its nn.{self.mode.split('_')[0]} a packed sequence of {longest} steps, where the "
                f"longest in the calibration data has {self.packed_steps}: the quantized view runs a packed batch "
                "for as many steps as the calibration data's longest sequence, so that every forward pass runs the "
                "hidden matmul equally often (faults are placed per call). Calibrate on data that holds the longest "
                "sequence (calibration_data=...)")
        return self.packed_steps

    def _layers(self, x: torch.Tensor, hx: Any, valid: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every layer and direction on x [N, T, features] -> (output [N, T, directions x width], h_n, c_n)."""
        n = x.shape[0]
        lstm = self.mode == "LSTM"
        h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
        last_h: list[torch.Tensor] = []
        last_c: list[torch.Tensor] = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                index = layer * self.directions + direction
                cell = self.cells[f"l{layer}" + ("_reverse" if direction else "")]
                assert isinstance(cell, _Cell)
                h = h0[index] if h0 is not None else x.new_zeros(n, self.proj_size or self.hidden_size)
                c = (c0[index] if c0 is not None else x.new_zeros(n, self.hidden_size)) if lstm else None
                h, c, out = self._run(cell, x, h, c, reverse=bool(direction), valid=valid)
                outputs.append(out)
                last_h.append(h)
                if c is not None:
                    last_c.append(c)
            x = torch.cat(outputs, dim=-1) if self.directions == 2 else outputs[0]
        return x, torch.stack(last_h), torch.stack(last_c) if lstm else None

    def _run(self, cell: _Cell, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, reverse: bool,
             valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One layer and direction; `valid` [N, T]: which steps of each image run (a packed batch), None: all."""
        gi = cell.ih(x)  # [N, T, gates x hidden]: the input's share of every gate, one call for the sequence
        steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
        outputs: list[torch.Tensor] = []
        for t in steps:
            live = None if valid is None else valid[:, t:t + 1]
            h_before, c_before = h, c
            gh = cell.hh(h if live is None else torch.where(live, h, 0.0))
            if self.mode == "LSTM":
                i, f, g, o = (gi[:, t] + gh).chunk(4, dim=1)
                assert c is not None
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                if cell.proj is not None:
                    h = cell.proj(h if live is None else torch.where(live, h, 0.0))
            elif self.mode == "GRU":
                ir, iz, in_ = gi[:, t].chunk(3, dim=1)
                hr, hz, hn = gh.chunk(3, dim=1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                n = torch.tanh(in_ + hn * r)
                h = (h - n) * z + n  # (1 - z) n + z h in torch's own order of operations (ATen's GRU cell)
            else:
                h = torch.tanh(gi[:, t] + gh) if self.mode == "RNN_TANH" else torch.relu(gi[:, t] + gh)
            if live is not None:  # an image past its length keeps its state and outputs zeros
                outputs.append(torch.where(live, h, 0.0))
                h = torch.where(live, h, h_before)
                c = None if c is None or c_before is None else torch.where(live, c, c_before)
            else:
                outputs.append(h)
        if reverse:
            outputs.reverse()
        return h, c, torch.stack(outputs, dim=1)


def fix_packed_steps(model: nn.Module, batches: Iterable[Any], run: Callable[[Any], Any], first_ran: bool
                     ) -> list[str]:
    """Fix the steps each recurrent module runs a packed batch for to the longest sequence in any of `batches` (the
    calibration data, run in float where the first one gives a module a packed batch; `first_ran`: the model already
    ran the first batch, so that none of its modules having seen one settles it): calibration and every later
    forward pass then call its hidden matmul equally often, whichever images they hold. Returns a note per module
    that ran packed batches: what share of its per-step codes are padding steps, where faults change nothing."""
    recurrent = {name: m for name, m in model.named_modules() if isinstance(m, UnrolledRecurrent)}
    if first_ran and not any(m.packed_steps is not None for m in recurrent.values()):
        recurrent = {}
    if not recurrent:
        for module in model.modules():
            if isinstance(module, UnrolledRecurrent):
                module.packed_steps_fixed = True
        return []
    for module in recurrent.values():
        module.packed_seen = [0, 0]
    with torch.no_grad(), FusedAttentionOff():
        for x in batches:
            run(x)
            if not any(m.packed_steps is not None for m in recurrent.values()):
                break
    notes = []
    for name, module in recurrent.items():
        module.packed_steps_fixed = True
        steps, (valid, images) = module.packed_steps, module.packed_seen
        if steps is None or not images:
            continue
        padding = 1 - valid / (images * steps)
        notes.append(
            f"{name or 'the model'} (nn.{module.mode.split('_')[0]}) runs packed batches one row per image for "
            f"{steps} steps, the calibration data's longest sequence: an image's steps past its length compute on "
            f"zeros and are discarded, so faults drawn at them ({padding:.1%} of its layers' per-step codes on the "
            "calibration data) change nothing, as on hardware that skips those steps; fault counts include them")
    return notes


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2-style ``Conv1D``: a linear layer with its weight transposed, computed as
    ``addmm(bias, x.view(-1, nx), weight)``, which merges the batch with the sequence."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
            and isinstance(weight, torch.Tensor) and weight.dim() == 2 and "forward" not in module.__dict__)


def _linear_of_conv1d(module: nn.Module) -> nn.Linear:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.to(weight.device)


def _own_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether `module` runs another forward than `base`'s (a subclass's, or one set on the instance), which a
    rewrite of `base`'s forward would not reproduce."""
    return "forward" in module.__dict__ or type(module).forward is not base.forward


class GraphRecurrent(nn.Module):
    """A recurrent op of a graph from torch.export (`aten.lstm` / `gru` / `rnn_tanh` / `rnn_relu` on the module's
    flat weight list) as the torch module it was exported from, returning the op's flat tuple, so that the rewrite
    below unrolls it into one layer per gate matmul, each called once per step, as it unrolls the eager module."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, hx: Any) -> tuple[torch.Tensor, ...]:
        lstm = isinstance(self.rnn, nn.LSTM)
        out, state = self.rnn(x, (hx[0], hx[1]) if lstm else hx)
        return (out, *state) if lstm else (out, state)


_GRAPH_RECURRENT = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}


def _recurrent_of_graph(graph_module: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """Replace each recurrent op node of an exported graph whose weights are the graph's own attributes by a
    `GraphRecurrent` holding a module with those weights (the op's shapes tell its sizes)."""
    replaced: list[tuple[str, str]] = []
    for node in list(graph_module.graph.nodes):
        op = getattr(getattr(node.target, "_overloadpacket", None), "__name__", "")
        mode = _GRAPH_RECURRENT.get(op) if node.op == "call_function" else None
        if mode is None or len(node.args) != 9 or not all(
                isinstance(p, torch.fx.Node) and p.op == "get_attr" for p in node.args[2]):
            continue
        x, hx, params, has_biases, num_layers, dropout, _, bidirectional, batch_first = node.args
        weights = [graph_module.get_parameter(p.target) if p.target in dict(graph_module.named_parameters())
                   else graph_module.get_buffer(p.target) for p in params]
        gates = {"LSTM": 4, "GRU": 3}.get(mode, 1)
        hidden = weights[0].shape[0] // gates
        proj_size = weights[1].shape[1] if mode == "LSTM" and weights[1].shape[1] != hidden else 0
        kind = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(mode, nn.RNN)
        options: dict[str, Any] = {"nonlinearity": "tanh" if mode == "RNN_TANH" else "relu"} if kind is nn.RNN else {}
        if proj_size:
            options["proj_size"] = proj_size
        rnn = kind(weights[0].shape[1], hidden, num_layers, bias=has_biases, batch_first=batch_first,
                   dropout=dropout, bidirectional=bidirectional, **options)
        with torch.no_grad():
            for target, value in zip(rnn._flat_weights, weights):
                target.copy_(value)
        name = f"{node.name}_module"
        graph_module.add_submodule(name, GraphRecurrent(rnn).eval())
        with graph_module.graph.inserting_before(node):
            call = graph_module.graph.call_module(name, (x, hx))
        node.replace_all_uses_with(call)
        graph_module.graph.erase_node(node)
        replaced.append((name, f"aten.{op}"))
    if replaced:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
    return replaced


def decompose(model: nn.Module) -> list[tuple[str, str]]:
    """Replace, in place on `model` (a private copy), every attention and recurrent module the rewrite reproduces;
    returns (name, original type) of each replaced module. The rewrites reproduce the torch classes' own forwards:
    a subclass with its own (a recurrent net that scales or normalises its outputs) keeps it; its attention calls
    are then layers call by call (`functional`), and its recurrent op runs in float, named with why. An exported
    graph's recurrent ops become modules first (`_recurrent_of_graph`)."""
    replaced: list[tuple[str, str]] = []
    if isinstance(model, torch.fx.GraphModule):
        replaced += _recurrent_of_graph(model)
    for name, module in list(model.named_modules()):
        new: nn.Module | None = None
        recurrent = next((kind for kind in (nn.LSTM, nn.GRU, nn.RNN) if isinstance(module, kind)), None)
        if isinstance(module, nn.MultiheadAttention) and _own_forward(module, nn.MultiheadAttention):
            pass
        elif recurrent is not None and _own_forward(module, recurrent):
            module.uncovered_reason = (
                f"{type(module).__qualname__} runs its own forward, not {recurrent.__name__}'s: the engine rewrites "
                f"only {recurrent.__name__}'s own forward into quantized pieces, so its recurrent MACs run in float")
        elif isinstance(module, nn.MultiheadAttention) and module.bias_k is None and not module.add_zero_attn:
            new = SplitMultiheadAttention(module)
        elif recurrent is not None:
            new = UnrolledRecurrent(module)
        elif _is_hf_conv1d(module):  # the same function as a Linear whose input keeps its batch dimension
            new = _linear_of_conv1d(module)
        if new is not None and name:
            model.set_submodule(name, new)
            replaced.append((name, type(module).__qualname__))
    return replaced


class FusedAttentionOff:
    """torch's fused MHA / TransformerEncoder fast path off for the block: it would call the fused kernel
    (`_native_multi_head_attention`), not the pieces."""

    def __enter__(self) -> None:
        self.saved = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc: object) -> None:
        torch.backends.mha.set_fastpath_enabled(self.saved)


