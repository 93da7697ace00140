"""Prompt features and TopHash masks (memoir-method.md section 2).

All functions are pure: activations in, features or masks out.
"""
from __future__ import annotations

import torch


def make_permutation(d_inner: int, seed: int) -> torch.Tensor:
    """The fixed TopHash permutation pi of range(D), from a seeded generator. Stored with the memory."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(d_inner, generator=gen)  # [D] int64


def prompt_feature(
    acts: torch.Tensor, prompt_mask: torch.Tensor, background: torch.Tensor | None, kind: str = "mean_decentered"
) -> torch.Tensor:
    """Feature v(x) of each row from the FFN activations over its prompt tokens.

    acts: [B, T, D] activations a_t entering the down-projection.
    prompt_mask: [B, T] bool, True on the prompt's tokens (BOS in, padding and target out).
    background: [D] mean activation of unrelated prompts (used by mean_decentered).
    Returns [B, D] float32.
    """
    m = prompt_mask.to(torch.float32).unsqueeze(-1)  # [B, T, 1]
    a = acts.to(torch.float32)
    if kind == "last":
        last = prompt_mask.to(torch.int64).cumsum(1).argmax(1)  # [B] index of the last prompt token
        return a[torch.arange(a.shape[0]), last]  # [B, D]
    mean = (a * m).sum(1) / m.sum(1).clamp_min(1.0)  # [B, D]
    if kind == "mean":
        return mean
    if kind == "mean_decentered":
        if background is None:
            raise ValueError("feature 'mean_decentered' needs a background mean; compute one first")
        return mean - background.to(torch.float32)
    raise ValueError(f"unknown feature {kind!r}: use mean_decentered, mean or last")


def tophash(feature: torch.Tensor, k: int, perm: torch.Tensor) -> torch.Tensor:
    """TopHash mask indices: pi[topk(|v|, k)], sorted. feature [B, D] -> [B, k] int64."""
    idx = feature.abs().topk(k, dim=-1).indices  # [B, k]
    return perm.to(feature.device)[idx].sort(dim=-1).values  # [B, k]


def indices_to_mask(indices: torch.Tensor, d_inner: int) -> torch.Tensor:
    """[B, k] mask indices -> [B, D] bool mask."""
    mask = torch.zeros(indices.shape[0], d_inner, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)
