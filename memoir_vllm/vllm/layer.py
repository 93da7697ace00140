"""The memoir forward of the edited down-projection inside a vLLM model.

    out[t] = W_0 a[t]                                   if slot_row[slot(t)] < 0   (bit-identical base)
    out[t] = W_0 a[t] + W_m[shard] (M_row ⊙ a[t])        otherwise

The memory term runs as one opaque custom op (`torch.ops.memoir.memory_term`), so torch.compile
and vLLM's graph capture treat it like attention: the graph around it is compiled, the op reads
the router's preallocated buffers at run time (no Python scalars frozen into a graph, no
`.item()` in the hot path). The op, as a reference loop per step:

    for t in prompt tokens of undecided requests:  acc[slot(t)] += a[t]
    for s in slots whose prompt completes now:     decide(s) from acc[s] / n_prompt[s] - background
    for t in tokens:                               if slot_row[slot(t)] >= 0: out[t] += W_m (M ⊙ a[t])
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..memory import ResidualMemory
from ..tophash import indices_to_mask, tophash
from .routing import NO_MEMORY, Router

log = logging.getLogger(__name__)

_ROUTERS: dict[str, Router] = {}  # layer name -> router (one per memoir layer in this process)


@torch.library.custom_op("memoir::memory_term", mutates_args=("out",))
def memory_term(a: torch.Tensor, out: torch.Tensor, name: str) -> None:
    """Add the routed memory term to out [T, d_model] in place, from activations a [T, D]."""
    router = _ROUTERS.get(name)
    if router is None or not router.plan.armed:
        return  # profiling / warm-up forwards: base model
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
        _decide(router, router.dec_slots[: plan.n_decide])
    if not plan.need_memory:
        return
    mem = router.memory
    rows = router.slot_row[slot_x]  # [T]
    masked = a * router.slot_mask[slot_x]  # [T, D]
    if mem.n_shards == 1:
        delta = masked @ mem.weight[0].T  # [T, d_model]
    else:
        shard = router.slot_shard[slot_x]  # [T]
        delta = torch.zeros_like(out)
        for s in range(mem.n_shards):
            delta += (masked * (shard == s).unsqueeze(1).to(masked.dtype)) @ mem.weight[s].T  # [T, d_model]
    out.copy_(torch.where((rows >= 0).unsqueeze(1), out + delta.to(out.dtype), out))


@memory_term.register_fake
def _(a: torch.Tensor, out: torch.Tensor, name: str) -> None:
    return None


def _decide(router: Router, slots: torch.Tensor) -> None:
    """Route the slots whose prompt is complete: mean feature -> TopHash -> best active match -> tau."""
    mem: ResidualMemory = router.memory
    mean = router.acc[slots] / router.n_prompt[slots].unsqueeze(1)  # [n, D]
    feature = mean - mem.background.float() if mem.feature == "mean_decentered" else mean  # [n, D]
    mask_idx = tophash(feature, mem.k, mem.perm)  # [n, k]
    n = slots.shape[0]
    index = mem.index
    if len(index) == 0:
        row = torch.full((n,), NO_MEMORY, dtype=torch.int64, device=slots.device)
        ratio = torch.zeros(n, device=slots.device)
    else:
        overlaps = index.overlaps(indices_to_mask(mask_idx, mem.d_inner))  # [n, N], -1 on inactive rows
        best, best_row = overlaps.max(dim=1)  # [n]
        ratio = best.float().to(slots.device) / mem.k
        row = torch.where(ratio >= mem.tau, best_row.to(slots.device), torch.full_like(best_row, NO_MEMORY))  # [n]
    router.slot_row[slots] = row
    router.slot_ratio[slots] = ratio
    routed = row >= 0  # [n]
    safe = row.clamp_min(0).to(index.packed.device)
    if len(index):
        masks = index.masks(safe).to(router.slot_mask.device, router.slot_mask.dtype)  # [n, D]
        router.slot_mask[slots] = masks * routed.unsqueeze(1).to(masks.dtype)
        router.slot_shard[slots] = index.shards[safe].to(slots.device)
    else:
        router.slot_mask[slots] = 0
    router.acc[slots] = 0


class MemoirDownProj(nn.Module):
    """Wraps vLLM's down-projection (a LinearBase returning (out, bias)) with the memory term."""

    def __init__(self, base_layer: nn.Module, router: Router, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.memoir_name = name  # the memory lives in the router, not in the model's parameters
        _ROUTERS[name] = router

    @property
    def router(self) -> Router:
        return _ROUTERS[self.memoir_name]

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
