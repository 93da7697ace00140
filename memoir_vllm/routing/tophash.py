"""Prompt features and TopHash masks (memoir-method.md section 2).

All functions are pure: activations in, features or masks out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def make_permutation(d_inner: int, seed: int) -> torch.Tensor:
    """The fixed TopHash permutation pi of range(D), from a seeded generator. Stored with the memory."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(d_inner, generator=gen)  # [D] int64


@dataclass
class Pooled:
    """What a prompt feature is computed from, per row: the sum and count of its routing tokens'
    activations and the activation of its last routing token. The vLLM op accumulates these across
    the steps of a request; the transformers path pools them from one forward."""

    sum: torch.Tensor  # [B, D] float32
    count: torch.Tensor  # [B] float32
    last: torch.Tensor  # [B, D] float32


def pool_prompt(acts: torch.Tensor, prompt_mask: torch.Tensor) -> Pooled:
    """Pool activations [B, T, D] over the routing tokens prompt_mask [B, T] (BOS in, padding and target out)."""
    m = prompt_mask.to(torch.float32).unsqueeze(-1)  # [B, T, 1]
    a = acts.to(torch.float32)
    last = prompt_mask.to(torch.int64).cumsum(1).argmax(1)  # [B] index of the last routing token
    return Pooled((a * m).sum(1), m.sum((1, 2)), a[torch.arange(a.shape[0], device=a.device), last])


def feature_from_pool(p: Pooled, background: torch.Tensor | None, kind: str = "mean_decentered") -> torch.Tensor:
    """Feature v(x) [B, D] float32 of each row: its mean (minus the background mean [D]) or its last token."""
    if kind == "last":
        return p.last
    mean = p.sum / p.count.clamp_min(1.0).unsqueeze(-1)  # [B, D]
    if kind == "mean":
        return mean
    if kind == "mean_decentered":
        if background is None:
            raise ValueError("feature 'mean_decentered' needs a background mean; compute one first")
        return mean - background.to(torch.float32)
    raise ValueError(f"unknown feature {kind!r}: use mean_decentered, mean or last")


def prompt_feature(
    acts: torch.Tensor, prompt_mask: torch.Tensor, background: torch.Tensor | None, kind: str = "mean_decentered"
) -> torch.Tensor:
    """Feature v(x) [B, D] of each row from the activations [B, T, D] entering the down-projection
    over its prompt tokens [B, T]; background [D] is used by mean_decentered."""
    return feature_from_pool(pool_prompt(acts, prompt_mask), background, kind)


def tophash(feature: torch.Tensor, k: int, perm: torch.Tensor) -> torch.Tensor:
    """TopHash mask indices: pi[topk(|v|, k)], sorted. feature [B, D] -> [B, k] int64."""
    idx = feature.abs().topk(k, dim=-1).indices  # [B, k]
    return perm.to(feature.device)[idx].sort(dim=-1).values  # [B, k]


def indices_to_mask(indices: torch.Tensor, d_inner: int) -> torch.Tensor:
    """[B, k] mask indices -> [B, D] bool mask."""
    mask = torch.zeros(indices.shape[0], d_inner, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)
