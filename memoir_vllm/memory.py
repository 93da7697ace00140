"""ResidualMemory: W_m beside one FFN down-projection, its TopHash permutation, background mean and mask index.

    out = W_0 a + W_m (M ⊙ a)        M: the matched edit's mask, or no memory term at all

Everything is a buffer (or W_m a parameter), so `state_dict()` is the whole memory.
"""
from __future__ import annotations

import torch
from torch import nn

from .index import MaskIndex
from .tophash import indices_to_mask, make_permutation, prompt_feature, tophash


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

    def masks_from_acts(self, acts: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """TopHash mask indices [B, k] from activations [B, T, D] over the prompt tokens [B, T]."""
        v = prompt_feature(acts, prompt_mask, self.background, self.feature)  # [B, D]
        return tophash(v, self.k, self.perm)

    def route(self, mask_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route query masks [B, k] -> (row [B] (-1 = base model), matched row [B], ratio [B]).

        row is the matched index row when ratio >= tau, else -1.
        """
        query = indices_to_mask(mask_idx, self.d_inner)
        ratio, best = self.index.best_match(query)
        row = torch.where(ratio >= self.tau, best, torch.full_like(best, -1))
        return row, best, ratio

    def add_edit(self, mask_idx: torch.Tensor, edit_id: int | None = None, shard: int = 0) -> int:
        """Store one edit's mask (indices [k]); returns its edit id."""
        edit_id = self.n_edits if edit_id is None else edit_id
        mask = indices_to_mask(mask_idx.view(1, -1), self.d_inner)
        self.index.add(mask, torch.tensor([edit_id]), torch.tensor([shard]))
        return edit_id

    def delta(self, acts: torch.Tensor, masks: torch.Tensor, shards: torch.Tensor | None = None) -> torch.Tensor:
        """Memory term W_m (M ⊙ a) for acts [B, T, D] and dense masks [B, D] (one per row).

        shards [B] picks each row's W_m (default shard 0).
        """
        masked = acts * masks.to(acts.dtype).unsqueeze(1)  # [B, T, D]
        if self.n_shards == 1 or shards is None:
            return masked @ self.weight[0].to(acts.dtype).T  # [B, T, d_model]
        w = self.weight[shards].to(acts.dtype)  # [B, d_model, D]
        return masked @ w.transpose(1, 2)  # [B, T, d_model]
