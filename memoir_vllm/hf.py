"""Attach a ResidualMemory to a transformers causal LM.

`attach(model, memory, layer)` wraps the layer's FFN down-projection in a MemoirLayer. The
wrapper routes each batch row separately: at the first forward of a call it computes the row's
TopHash mask from its prompt tokens, matches it against the index, and for matched rows adds
W_m (M_i* ⊙ a) at every position; unmatched rows keep the base output untouched (bit-identical).
The decision is kept for the later decode steps of `generate()`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .config import arch_spec
from .memory import Decision, ResidualMemory, from_span
from .routing.tophash import pool_prompt


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part) if not part.isdigit() else root[int(part)]  # type: ignore[index]
    return root


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_module(model, arch_spec(model.config.model_type).layers)  # type: ignore[return-value]


def down_proj_path(model: nn.Module, layer: int) -> str:
    """Dotted module path of the edited down-projection, e.g. model.layers.25.mlp.down_proj."""
    spec = arch_spec(model.config.model_type)
    return f"{spec.layers}.{layer}.{spec.down_proj}"


def model_dims(model: nn.Module) -> tuple[int, int, int]:
    """(n_layers, d_model, D) of a supported transformers model."""
    c = model.config
    n_layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    d_model = getattr(c, "hidden_size", None) or c.n_embd
    d_inner = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d_model
    return n_layers, d_model, d_inner


Routing = Decision  # what the layer decided for each batch row of the last call (memory.Decision)


class MemoirLayer(nn.Module):
    """A down-projection plus the residual memory term, with per-row routing state.

    Modes, set through the context managers below (never by the caller of forward):
    - off (no prompt_mask, no train_mask): exactly the base layer;
    - routed (prompt_mask set): route each row at the first call, reuse for later calls;
    - train (train_mask set): the same mask on every row and position, gradients into W_m.
    """

    def __init__(self, base_layer: nn.Module, memory: ResidualMemory) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.memory = memory
        self.prompt_mask: torch.Tensor | None = None  # [B, T] bool
        self.candidates: torch.Tensor | None = None  # [B, C] rows (subject rule), None: every edit
        self.routing: Routing | None = None
        self.train_mask: torch.Tensor | None = None  # [1 or B, D] bool
        self.train_shard: int = 0
        self.train_from: torch.Tensor | None = None  # [B, T] bool: positions that get the term (None: all)
        self.captured: torch.Tensor | None = None  # last input activations when capturing
        self.capture = False

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # a: [B, T, D]
        out = self.base_layer(a)  # [B, T, d_model]
        if self.capture:
            self.captured = a.detach()
        if self.train_mask is not None:
            delta = self.memory.delta(a, self.train_mask.expand(a.shape[0], -1), self.train_shard)
            return out + (delta if self.train_from is None else delta * self.train_from.unsqueeze(-1).to(delta.dtype))
        if self.prompt_mask is None:
            return out
        first = self.routing is None  # the forward over the whole prompts; later ones are decode steps
        if first:
            self.routing = self.memory.decide(self.memory.feature_of(pool_prompt(a, self.prompt_mask)), self.candidates)
        d = self.routing
        sel = d.routed.nonzero().flatten()  # [b] batch rows with a matched edit
        if sel.numel() == 0:
            return out
        delta = self.memory.routed_term(a[sel], d.select(sel))  # [b, T, d_model]
        if first and self.memory.gates_content:  # no memory before the routing span (memory_start "content")
            delta = delta * from_span(self.prompt_mask[sel]).unsqueeze(-1).to(delta.dtype)
        out = out.clone()
        out[sel] = out[sel] + delta
        return out


def attach(model: nn.Module, memory: ResidualMemory, layer: int) -> MemoirLayer:
    """Wrap block `layer`'s down-projection with a MemoirLayer holding `memory`. Idempotent per layer."""
    path = down_proj_path(model, layer)
    parent_path, name = path.rsplit(".", 1)
    parent = get_module(model, parent_path)
    current = getattr(parent, name)
    if isinstance(current, MemoirLayer):
        current.memory = memory.to(next(current.base_layer.parameters()).device)
        return current
    wrapped = MemoirLayer(current, memory).to(next(current.parameters()).device)
    setattr(parent, name, wrapped)
    return wrapped


def detach(model: nn.Module) -> None:
    """Remove every MemoirLayer, restoring the original modules."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MemoirLayer):
            parent_path, child = name.rsplit(".", 1)
            setattr(get_module(model, parent_path), child, module.base_layer)


def find_layer(model: nn.Module) -> MemoirLayer:
    for module in model.modules():
        if isinstance(module, MemoirLayer):
            return module
    raise ValueError("this model has no memory attached: call memoir_vllm.hf.attach(model, memory, layer) first")


@contextlib.contextmanager
def routed(layer: MemoirLayer, prompt_mask: torch.Tensor | None,
           candidates: torch.Tensor | None = None) -> Iterator[MemoirLayer]:
    """Route each row from its prompt tokens (prompt_mask [B, T]); None runs the base model.

    candidates [B, C]: the rows each row may route to (ResidualMemory.candidates of the rows' texts)."""
    layer.prompt_mask, layer.candidates, layer.routing = prompt_mask, candidates, None
    try:
        yield layer
    finally:
        layer.prompt_mask, layer.candidates = None, None


@contextlib.contextmanager
def training(layer: MemoirLayer, mask: torch.Tensor, shard: int = 0,
             positions: torch.Tensor | None = None) -> Iterator[MemoirLayer]:
    """Apply one mask [D] bool to every row (editing), at every position or where positions [B, T] is True."""
    layer.train_mask, layer.train_shard, layer.train_from = mask.view(1, -1), shard, positions
    try:
        yield layer
    finally:
        layer.train_mask, layer.train_from = None, None


@contextlib.contextmanager
def capturing(layer: MemoirLayer) -> Iterator[MemoirLayer]:
    """Record the activations entering the down-projection (layer.captured) with the memory off."""
    layer.capture, layer.captured = True, None
    try:
        yield layer
    finally:
        layer.capture = False
