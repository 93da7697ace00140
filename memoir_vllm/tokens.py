"""Tokenising prompts and prompt+target pairs with explicit prompt and target spans.

The prompt span comes from the prompt's own tokenization, never from comparing activations
(memoir-method.md section 6); padding is excluded through the attention mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairBatch:
    """Right-padded 'prompt target' rows with the spans the method needs."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    prompt_mask: torch.Tensor  # [B, T] bool, the prompt's tokens
    target_mask: torch.Tensor  # [B, T] bool, the target's tokens

    def to(self, device: str | torch.device) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.prompt_mask, self.target_mask)))


ANSWER_ENDS = ("none", "eos", "period_eos", "newline")


def answer_end_ids(tok, target: str, end: str) -> list[int]:
    """The tokens trained after a target so greedy answers stop there (config.answer_end):
    none (the reference), eos (the end-of-text token), period_eos ("." unless the target ends with
    one, then end-of-text) or newline."""
    if end == "none":
        return []
    if end == "newline":
        return tok("\n", add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if end == "eos":
        return eos
    if end == "period_eos":
        period = [] if target.rstrip().endswith(".") else tok(".", add_special_tokens=False)["input_ids"]
        return period + eos
    raise ValueError(f"answer_end {end!r}: use one of {ANSWER_ENDS}")


def pair_ids(tok, prompt: str, target: str, end: str = "none") -> tuple[list[int], int]:
    """Token ids of 'prompt target' (then the answer's end, see answer_end_ids) and the prompt's length.

    Uses the tokenization of the whole string when the prompt's own tokens are a prefix of it
    (the reference's behaviour); otherwise prompt tokens + ' target' tokens, so the target never
    shares a token with the prompt.
    """
    p = tok(prompt)["input_ids"]
    full = tok(f"{prompt} {target}")["input_ids"]
    tail = answer_end_ids(tok, target, end)
    if full[: len(p)] == p and len(full) > len(p):
        return full + tail, len(p)
    return p + tok(f" {target}", add_special_tokens=False)["input_ids"] + tail, len(p)


def encode_pairs(tok, prompts: list[str], targets: list[str], max_length: int | None = None,
                 end: str = "none") -> PairBatch:
    """Right-padded batch of 'prompt target' rows with prompt and target masks; `end` appends the
    answer's end to every target (editing only: scoring reads the target alone)."""
    rows = [pair_ids(tok, p, t, end) for p, t in zip(prompts, targets, strict=True)]
    limit = max_length or _model_max_length(tok)
    for (ids, n_prompt), p, t in zip(rows, prompts, targets):
        if len(ids) == n_prompt:
            raise ValueError(f"target {t!r} of prompt {p[:60]!r} tokenizes to nothing: give a non-empty target")
        if limit and len(ids) > limit:
            raise ValueError(
                f"prompt+target is {len(ids)} tokens, longer than the model's context of {limit}: "
                f"shorten the prompt {p[:60]!r}"
            )
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    b = len(rows)
    input_ids = torch.full((b, width), pad, dtype=torch.long)
    attn = torch.zeros(b, width, dtype=torch.long)
    pmask = torch.zeros(b, width, dtype=torch.bool)
    tmask = torch.zeros(b, width, dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        pmask[i, :n_prompt] = True
        tmask[i, n_prompt : len(ids)] = True
    return PairBatch(input_ids, attn, pmask, tmask)


def encode_prompts(tok, prompts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts for generation: (input_ids [B, T], attention_mask [B, T])."""
    rows = [tok(p)["input_ids"] for p in prompts]
    limit = max_length or _model_max_length(tok)
    for ids, p in zip(rows, prompts):
        if not ids:
            raise ValueError("empty prompt: give at least one token of text")
        if limit and len(ids) > limit:
            raise ValueError(f"prompt is {len(ids)} tokens, longer than the model's context of {limit}: shorten {p[:60]!r}")
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attn[i, width - len(ids) :] = 1
    return input_ids, attn


def _model_max_length(tok) -> int | None:
    n = getattr(tok, "model_max_length", None)
    return n if isinstance(n, int) and n < 10**8 else None
