"""Teacher-forced scoring and greedy generation through an attached memory, batched and routed per row."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from .hf import MemoirLayer, Routing, routed
from .tokens import encode_pairs, encode_prompts


@dataclass
class Scored:
    """Teacher-forced results for 'prompt target' rows."""

    token_acc: list[float]  # per row: fraction of target tokens predicted by argmax
    pred_tokens: list[list[int]]  # per row: argmax token at each target position
    target_logits: list[torch.Tensor]  # per row: [n_target, V] logits predicting the target tokens
    routing: Routing | None


def span_texts(tok, input_ids: torch.Tensor, route_mask: torch.Tensor, prompts: list[str], memory) -> list[str]:
    """The text the subject gate reads for each row: a chat-format memory's routing span decoded (the last user
    message's content, also when a prompt is an already rendered chat, as the vLLM router reads it); else the
    prompt as given."""
    if memory.marks is None:
        return prompts
    return [tok.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(input_ids, route_mask)]


def block_end_tokens(logits: torch.Tensor, rows: torch.Tensor, end_ids: tuple[int, ...] | torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the end tokens at -inf in the rows where rows [B] bool is True (no host sync when
    end_ids is already a tensor on the logits' device): what config.nonempty_answers does to a routed request's
    first generated token, in both serving paths."""
    if len(end_ids) == 0:
        return logits
    ends = torch.as_tensor(end_ids, dtype=torch.int64, device=logits.device)
    blocked = torch.where(rows.view(-1, 1), torch.full_like(logits[:, ends], float("-inf")), logits[:, ends])
    return logits.index_copy(1, ends, blocked)


class NonemptyAnswers:
    """transformers logits processor: at the first generated token, block_end_tokens for the routed rows."""

    def __init__(self, layer: MemoirLayer, prompt_len: int) -> None:
        self.layer, self.prompt_len = layer, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        routing = self.layer.routing
        if input_ids.shape[1] != self.prompt_len or routing is None:
            return scores
        return block_end_tokens(scores, routing.row.to(scores.device) >= 0, self.layer.memory.end_ids)


def answer_processors(layer: MemoirLayer, prompt_len: int) -> LogitsProcessorList:
    """The logits processors of a routed generate() over prompts padded to prompt_len: NonemptyAnswers when the
    memory keeps end tokens from a routed answer's start (config.nonempty_answers), else none."""
    return LogitsProcessorList([NonemptyAnswers(layer, prompt_len)] if layer.memory.end_ids else [])


def _max_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.no_grad()
def score(
    model, tok, layer: MemoirLayer | None, prompts: list[str], targets: list[str], use_memory: bool = True,
    keep_logits: bool = False, chat: bool = False,
) -> Scored:
    """Teacher-forced forward of 'prompt target' rows; each row routed from its routing span.

    chat: the prompts as one user message in the chat template, the target as the answer."""
    marks = layer.memory.marks if layer is not None else None
    b = encode_pairs(tok, prompts, targets, _max_length(model), marks=marks, chat=chat).to(model.device)
    prompt_mask = b.route_mask if (use_memory and layer is not None) else None
    if layer is None:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        routing = None
    else:
        with routed(layer, prompt_mask, layer.memory.candidates(span_texts(tok, b.input_ids, b.route_mask, prompts,
                                                                           layer.memory)) if prompt_mask is not None else None):
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            routing = layer.routing
    pred = b.target_mask[:, 1:]  # [B, T-1] positions whose next token is a target token
    argmax = logits[:, :-1].argmax(-1)  # [B, T-1]
    labels = b.input_ids[:, 1:]
    accs, preds, tl = [], [], []
    for i in range(len(prompts)):
        sel = pred[i]
        preds.append(argmax[i][sel].tolist())
        accs.append((argmax[i][sel] == labels[i][sel]).float().mean().item())
        tl.append(logits[i, :-1][sel].float().cpu() if keep_logits else torch.empty(0))
    return Scored(accs, preds, tl, routing)


@torch.no_grad()
def generate(
    model, tok, layer: MemoirLayer | None, prompts: list[str], max_new_tokens: int = 16, use_memory: bool = True,
    chat: bool = False, candidates: torch.Tensor | None = None,
) -> tuple[list[str], Routing | None]:
    """Greedy answers; the routing of each row is decided once from its routing span at prefill.

    chat: each prompt as one user message in the chat template (the answer is the assistant's turn).
    candidates: the rows' subject-rule candidates when the caller has them (default: found from prompts)."""
    marks = layer.memory.marks if layer is not None else None
    b = encode_prompts(tok, prompts, _max_length(model), marks, chat).to(model.device)
    ids, attn = b.input_ids, b.attention_mask
    kw = dict(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)
    if layer is None:
        out, routing = model.generate(**kw), None
    else:
        if use_memory and candidates is None:
            candidates = layer.memory.candidates(span_texts(tok, ids, b.route_mask, prompts, layer.memory))
        if use_memory:
            kw["logits_processor"] = answer_processors(layer, ids.shape[1])
        with routed(layer, b.route_mask if use_memory else None, candidates if use_memory else None):
            out = model.generate(**kw)
            routing = layer.routing
    texts = [tok.decode(row, skip_special_tokens=True) for row in out[:, ids.shape[1]:]]
    return texts, routing
