"""ResidualMemory: W_m beside one FFN down-projection, its TopHash permutation, background mean and mask index.

    out = W_0 a + W_m[shard] (M ⊙ a)        M: the matched edit's mask, or no memory term at all

The one routing rule lives here, for every caller (the transformers layer, the vLLM op, calibration):

    pooled prompt -> feature() -> decide(): TopHash mask -> best active match -> routed iff ratio >= tau
    memory_term(acts, decision masks, shards)

`decide` runs on the memory's device with fixed shapes and no host sync, so the vLLM op can call it
inside a forward. Everything is a buffer (or W_m a parameter), so `state_dict()` is the whole memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .index import MaskIndex
from .tophash import Pooled, feature_from_pool, indices_to_mask, make_permutation, pool_prompt, tophash

NO_EDIT = -1  # decision row of a request served by the base model


@dataclass
class Decision:
    """The routing of a batch of rows, all on the memory's device."""

    row: torch.Tensor  # [B] int64 matched index row, -1 = base model
    best: torch.Tensor  # [B] int64 best active row regardless of tau (-1 if none)
    ratio: torch.Tensor  # [B] float32 overlap / k of the best row
    mask: torch.Tensor  # [B, D] bool mask of the matched row (all False when not routed)
    shard: torch.Tensor  # [B] int64 W_m shard of the matched row (0 when not routed)
    mask_idx: torch.Tensor  # [B, k] int64 the rows' own TopHash masks

    @property
    def routed(self) -> torch.Tensor:
        return self.row >= 0  # [B] bool


class ResidualMemory(nn.Module):
    """The editable memory of one layer.

    Args:
        d_model: output width of the down-projection.
        d_inner: its input width D (FFN hidden size).
        k: ones per TopHash mask.
        tau: routing threshold on overlap / k.
        seed: seed of the stored permutation.
        feature: prompt feature kind (mean_decentered by default).
        n_shards: number of independent W_m (1 = one memory; Ray jobs use more).
    """

    def __init__(
        self,
        d_model: int,
        d_inner: int,
        k: int,
        tau: float = 0.5,
        seed: int = 0,
        feature: str = "mean_decentered",
        n_shards: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if k > d_inner:
            raise ValueError(f"k={k} is larger than the FFN width D={d_inner}: choose k <= D")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau={tau} is outside [0, 1]")
        self.d_model, self.d_inner, self.k = d_model, d_inner, k
        self.tau, self.seed, self.feature = tau, seed, feature
        self.weight = nn.Parameter(torch.zeros(n_shards, d_model, d_inner, dtype=dtype))  # [S, d_model, D]
        self.register_buffer("perm", make_permutation(d_inner, seed))  # [D]
        self.register_buffer("background", torch.zeros(d_inner))  # [D]
        self.index = MaskIndex(d_inner, k)

    @property
    def n_shards(self) -> int:
        return self.weight.shape[0]

    @property
    def n_edits(self) -> int:
        return len(self.index)

    # -- routing --------------------------------------------------------------------------------

    def feature_of(self, pooled: Pooled) -> torch.Tensor:
        """The routing feature [B, D] float32 of pooled routing tokens."""
        return feature_from_pool(pooled, self.background, self.feature)

    def masks_from_acts(self, acts: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """TopHash mask indices [B, k] from activations [B, T, D] over the routing tokens [B, T]."""
        return tophash(self.feature_of(pool_prompt(acts, prompt_mask)), self.k, self.perm)

    def decide(self, feature: torch.Tensor) -> Decision:
        """Route features [B, D]: TopHash, best active stored mask, routed iff overlap / k >= tau.

        On the memory's device, fixed shapes, no host sync (callable inside a vLLM forward).
        """
        mask_idx = tophash(feature, self.k, self.perm)  # [B, k]
        return self.decide_masks(mask_idx)

    def decide_masks(self, mask_idx: torch.Tensor) -> Decision:
        """decide() for query masks given as indices [B, k]."""
        b, dev = mask_idx.shape[0], self.perm.device
        none = torch.full((b,), NO_EDIT, dtype=torch.int64, device=dev)
        if len(self.index) == 0:
            zeros = torch.zeros(b, dtype=torch.int64, device=dev)
            return Decision(none, none, torch.zeros(b, device=dev), torch.zeros(b, self.d_inner, dtype=torch.bool,
                            device=dev), zeros, mask_idx)
        top, best = self.index.overlaps(indices_to_mask(mask_idx, self.d_inner)).max(dim=1)  # [B]; -1 = inactive
        best = torch.where(top >= 0, best, none)
        ratio = top.clamp_min(0).float() / self.k
        row = torch.where(ratio >= self.tau, best, none)
        safe = row.clamp_min(0)
        mask = self.index.masks(safe) & (row >= 0).unsqueeze(1)  # [B, D]
        return Decision(row, best, ratio, mask, self.index.shards[safe] * (row >= 0), mask_idx)

    def route(self, mask_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row [B] (-1 = base model), best row [B], ratio [B]) of query masks [B, k]; see decide()."""
        d = self.decide_masks(mask_idx)
        return d.row, d.best, d.ratio

    def add_edit(self, mask_idx: torch.Tensor, edit_id: int | None = None, shard: int = 0) -> int:
        """Store one edit's mask (indices [k]); returns its edit id."""
        edit_id = self.n_edits if edit_id is None else edit_id
        mask = indices_to_mask(mask_idx.view(1, -1), self.d_inner)
        self.index.add(mask, torch.tensor([edit_id]), torch.tensor([shard]))
        return edit_id

    # -- the memory term ------------------------------------------------------------------------

    def memory_term(self, acts: torch.Tensor, masks: torch.Tensor, shards: torch.Tensor | int = 0) -> torch.Tensor:
        """W_m[shard] (M ⊙ a): acts [..., D], masks broadcastable to acts (bool or 0/1), shards an int for
        every token or a tensor of acts.shape[:-1]. Returns [..., d_model] in acts' dtype.

        With several shards each token takes its own shard's W_m: one masked matmul per shard (fixed
        shapes, no host sync).
        """
        masked = acts * masks.to(acts.dtype)  # [..., D]
        if isinstance(shards, int) or self.n_shards == 1:
            s = shards if isinstance(shards, int) else 0
            return masked @ self.weight[s].to(acts.dtype).T  # [..., d_model]
        out = torch.zeros(*acts.shape[:-1], self.d_model, dtype=acts.dtype, device=acts.device)
        for s in range(self.n_shards):
            out = out + (masked * (shards == s).unsqueeze(-1).to(acts.dtype)) @ self.weight[s].to(acts.dtype).T
        return out

    def delta(self, acts: torch.Tensor, masks: torch.Tensor, shards: torch.Tensor | int = 0) -> torch.Tensor:
        """Memory term for acts [B, T, D] with one mask [B, D] and shard [B] (or an int) per row."""
        per_token = shards if isinstance(shards, int) else shards.view(-1, 1).expand(acts.shape[:-1])
        return self.memory_term(acts, masks.unsqueeze(1), per_token)


    def empty_like(self, n_shards: int | None = None) -> "ResidualMemory":
        """A zero memory with this one's settings, permutation and background, and no edits."""
        fresh = ResidualMemory(self.d_model, self.d_inner, self.k, self.tau, self.seed, self.feature,
                               n_shards=self.n_shards if n_shards is None else n_shards, dtype=self.weight.dtype)
        fresh.background.copy_(self.background)
        return fresh.to(self.perm.device)


def empty_memory(d_model: int, d_inner: int, cfg, n_shards: int = 1,
                 dtype: torch.dtype = torch.float32) -> ResidualMemory:
    """A fresh, zero memory for a resolved MemoirConfig (layer and k set); the one constructor callers use."""
    return ResidualMemory(d_model, d_inner, cfg.k, cfg.tau, cfg.seed, cfg.feature, n_shards=n_shards, dtype=dtype)
