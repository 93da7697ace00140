"""The memoir forward of the edited down-projection inside a vLLM model.

    out[t] = W_0 a[t]                                   if slot_row[slot(t)] < 0   (bit-identical base)
    out[t] = W_0 a[t] + W_m[shard] (M_row ⊙ a[t])        otherwise (shared columns; free columns: the same
                                                         sum over the edit's k columns alone, memory.column_term)

The memory term runs as one opaque custom op (`torch.ops.memoir.memory_term`), so torch.compile
and vLLM's graph capture treat it like attention: the graph around it is compiled, the op reads
the router's preallocated buffers at run time (no Python scalars frozen into a graph, no
`.item()` in the hot path). The routing rule itself is ResidualMemory's (memory.py); the op only
feeds it. As a reference loop per step:

    for t in routing tokens of undecided requests:  acc[slot(t)] += a[t]
    for s in slots whose prompt completes now:      slot decision = memory.decide(feature(acc[s], n[s], a[last(s)]))
    for t in tokens:                                if slot_row[slot(t)] >= 0 and tok_on[t]: out[t] += memory_term(a[t], slot)

(tok_on[t]: the token is at or after its prompt's routing span when the memory's memory_start is "content",
else always.)
"""
from __future__ import annotations

import torch
from torch import nn

from ..memory import column_term
from ..routing.tophash import Pooled
from . import attachment
from .routing import Router


@torch.library.custom_op("memoir::memory_term", mutates_args=("out",))
def memory_term(a: torch.Tensor, out: torch.Tensor, name: str) -> None:
    """Add the routed memory term to out [T, d_model] in place, from activations a [T, D]."""
    att = attachment.by_name(name)
    if att is None or not att.router.plan.armed:
        return  # profiling / warm-up forwards, or the memory is off: base model
    router = att.router
    plan = router.plan
    plan.armed = False
    t = a.shape[0]
    slot = router.tok_slot[:t]  # [T] -1 = padding
    sink = router.n_slots  # trailing row of the per-slot buffers, never a decision
    slot_x = torch.where(slot >= 0, slot, torch.full_like(slot, sink))  # [T]
    if plan.need_acc:
        prompt = router.tok_prompt[:t]  # [T]
        router.acc.index_add_(0, torch.where(prompt, slot_x, torch.full_like(slot_x, sink)), a.float())  # [S+1, D]
    if plan.n_decide:
        _decide(router, a, plan.n_decide)
    if not plan.need_memory:
        return
    rows = router.slot_row[slot_x]  # [T]
    if router.slot_table is not None:  # free columns: each token reads its edit's k columns (one embedding bag)
        delta = column_term(a, router.slot_cols[slot_x], router.slot_table, slot_x)  # [T, d_model]
    else:
        mask, shard = router.slot_mask[slot_x], router.slot_shard[slot_x]
        delta = router.memory.memory_term(a, mask, shard, present=plan.shards)  # [T, d_model]
        for gen, memory in plan.old:  # requests routed before a swap (follow.py) finish with their memory
            mine = (router.tok_gen[:t] == gen).unsqueeze(1)
            delta = torch.where(mine, memory.memory_term(a, mask, shard), delta)
    on = (rows >= 0) & router.tok_on[:t]  # [T] routed, and at or after its prompt's routing span (memory_start)
    out.copy_(torch.where(on.unsqueeze(1), out + delta.to(out.dtype), out))


@memory_term.register_fake
def _(a: torch.Tensor, out: torch.Tensor, name: str) -> None:
    return None


def _decide(router: Router, a: torch.Tensor, n: int) -> None:
    """Route the n slots whose prompt completes in this step (ResidualMemory.decide) and keep the decisions."""
    slots = router.dec_slots[:n]
    pooled = Pooled(router.acc[slots], router.n_prompt[slots], a[router.dec_last[:n]].float())
    cand = router.slot_cand[slots] if router.memory.rule == "subject" else None  # [n, C] subject rule
    d = router.memory.decide(router.memory.feature_of(pooled), cand)
    router.slot_row[slots] = d.row
    router.slot_mask[slots] = d.mask.to(router.slot_mask.dtype)
    router.slot_shard[slots] = d.shard
    if d.cols is not None:
        router.keep_columns(slots, d.row, d.cols)
    router.acc[slots] = 0


class MemoirDownProj(nn.Module):
    """Wraps vLLM's down-projection (a LinearBase returning (out, bias)) with the memory term."""

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.memoir_name = name  # the memory lives in the attachment registry, not in the model's parameters

    def forward(self, x: torch.Tensor):  # x: [T, D]
        out, bias = self.base_layer(x)  # [T, d_model]
        if x.dim() != 2:
            raise RuntimeError(f"memoir expects flattened tokens [T, D] at the down-projection, got {tuple(x.shape)}")
        torch.ops.memoir.memory_term(x, out, self.memoir_name)
        return out, bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)  # quant keys, weight, ... of the base layer
