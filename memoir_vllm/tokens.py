"""Tokenising prompts and prompt+target pairs with explicit prompt and target spans.

The prompt span comes from the prompt's own tokenization, never from comparing activations
(memoir-method.md section 6); padding is excluded through the attention mask. The routing span
(route_mask) is the part of the prompt a row routes from: all of it, or in a chat rendering the last
user message's content (chat.routing_span, with the memory's marks).

`chat=True` renders each prompt as one user message in the tokenizer's chat template (what
/v1/chat/completions sends), the target following as the assistant's answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .chat import ChatMarks, chat_marks, chat_prompt_ids, has_chat_template, routing_span


@dataclass
class PairBatch:
    """Right-padded 'prompt target' rows with the spans the method needs."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    prompt_mask: torch.Tensor  # [B, T] bool, the prompt's tokens
    target_mask: torch.Tensor  # [B, T] bool, the target's tokens (and the answer's end, when trained)
    route_mask: torch.Tensor  # [B, T] bool, the prompt tokens the row routes from

    def to(self, device: str | torch.device) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.prompt_mask,
                                                  self.target_mask, self.route_mask)))


@dataclass
class PromptBatch:
    """Left-padded prompts for generation."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    route_mask: torch.Tensor  # [B, T] bool, the prompt tokens each row routes from

    def to(self, device: str | torch.device) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), self.route_mask.to(device))


def prompt_ids(tok, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt as sent to the model: the text, or one user message in the chat template."""
    return chat_prompt_ids(tok, prompt) if chat else tok(prompt)["input_ids"]


ANSWER_ENDS = ("none", "eos", "period_eos", "newline")


def answer_end_ids(tok, target: str, end: str, marks: ChatMarks | None = None, chat: bool = False) -> list[int]:
    """The tokens trained after a target so greedy answers stop there (config.answer_end). A chat answer ends
    with the template's end of turn whatever the setting (but none); a raw one with none (the reference),
    eos (end-of-text), period_eos ("." unless the target ends with one, then end-of-text) or newline."""
    if end not in ANSWER_ENDS:
        raise ValueError(f"answer_end {end!r}: use one of {ANSWER_ENDS}")
    if end == "none":
        return []
    if chat and marks is not None:
        return list(marks.close[:1])
    if end == "newline":
        return tok("\n", add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if end == "eos":
        return eos
    period = [] if target.rstrip().endswith(".") else tok(".", add_special_tokens=False)["input_ids"]
    return period + eos


def end_token_ids(tok) -> tuple[int, ...]:
    """The tokens that can end an answer: end-of-text, and the chat template's end of turn where there is one
    (what config.nonempty_answers keeps from being a routed request's first generated token)."""
    ends = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    marks = chat_marks(tok) if has_chat_template(tok) else None
    if marks is not None and marks.close:
        ends.add(marks.close[0])
    return tuple(sorted(ends))


def pair_ids(tok, prompt: str, target: str, end: str = "none", chat: bool = False,
             marks: ChatMarks | None = None) -> tuple[list[int], int]:
    """Token ids of 'prompt target' (then the answer's end, see answer_end_ids) and the prompt's length.

    Raw: the tokenization of the whole string when the prompt's own tokens are a prefix of it
    (the reference's behaviour); otherwise prompt tokens + ' target' tokens, so the target never
    shares a token with the prompt. Chat: the rendered user message, then the target's tokens.
    """
    tail = answer_end_ids(tok, target, end, marks, chat)
    if chat:
        p = chat_prompt_ids(tok, prompt)
        return p + tok(target, add_special_tokens=False)["input_ids"] + tail, len(p)
    p = tok(prompt)["input_ids"]
    full = tok(f"{prompt} {target}")["input_ids"]
    if full[: len(p)] == p and len(full) > len(p):
        return full + tail, len(p)
    return p + tok(f" {target}", add_special_tokens=False)["input_ids"] + tail, len(p)


def encode_pairs(tok, prompts: list[str], targets: list[str], max_length: int | None = None,
                 marks: ChatMarks | None = None, chat: bool | list[bool] = False, end: str = "none") -> PairBatch:
    """Right-padded batch of 'prompt target' rows with prompt, target and routing masks.

    chat: render each prompt (or the rows flagged True) in the chat template; end: the answer's end appended
    to every target (answer_end_ids; editing only, scoring reads the target alone); marks: the memory's chat
    marks (the routing span, the end of turn).
    """
    chats = chat if isinstance(chat, list) else [chat] * len(prompts)
    rows = [pair_ids(tok, p, t, end, c, marks) for p, t, c in zip(prompts, targets, chats, strict=True)]
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
    rmask = torch.zeros(b, width, dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        pmask[i, :n_prompt] = True
        tmask[i, n_prompt : len(ids)] = True
        start, stop = routing_span(ids[:n_prompt], marks)
        rmask[i, start:stop] = True
    return PairBatch(input_ids, attn, pmask, tmask, rmask)


def encode_prompts(tok, prompts: list[str], max_length: int | None = None, marks: ChatMarks | None = None,
                   chat: bool = False) -> PromptBatch:
    """Left-padded prompts for generation, with each row's routing span (see encode_pairs)."""
    rows = [prompt_ids(tok, p, chat) for p in prompts]
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
    rmask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, ids in enumerate(rows):
        pad = width - len(ids)
        input_ids[i, pad:] = torch.tensor(ids)
        attn[i, pad:] = 1
        start, stop = routing_span(ids, marks)
        rmask[i, pad + start : pad + stop] = True
    return PromptBatch(input_ids, attn, rmask)


def _model_max_length(tok) -> int | None:
    n = getattr(tok, "model_max_length", None)
    return n if isinstance(n, int) and n < 10**8 else None
