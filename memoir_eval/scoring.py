"""Batched scoring of evaluation prompts through an attached memory: the bridge between the model and metrics.

Each function takes a `Memoir` (model, tokenizer, attached layer) and returns plain Python lists,
one entry per row, with the routing decision of every row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from memoir_vllm.inference import generate, score
from memoir_vllm.tokens import pair_ids

from .metrics import perplexity


@dataclass
class RowScores:
    """Teacher-forced results of 'prompt target' rows."""

    acc: list[float] = field(default_factory=list)  # token accuracy against the target tokens
    pred: list[list[int]] = field(default_factory=list)  # argmax token at each target position
    ppl: list[float] = field(default_factory=list)  # perplexity of the target (when asked for)
    ratio: list[float] = field(default_factory=list)  # best overlap / k (0 with the memory off)
    row: list[int] = field(default_factory=list)  # matched index row, -1 = base model
    best: list[int] = field(default_factory=list)  # best index row regardless of tau


def _routing_lists(routing, n: int) -> tuple[list[float], list[int], list[int]]:
    if routing is None:
        return [0.0] * n, [-1] * n, [-1] * n
    return routing.ratio.tolist(), routing.row.tolist(), routing.best.tolist()


def _batches(n: int, batch_size: int, desc: str):
    """Batch start offsets, with a progress bar (in rows) when there are more than 8 batches."""
    bar = tqdm(total=n, desc=desc, unit="row", leave=False, disable=n <= 8 * batch_size)
    for s in range(0, n, batch_size):
        yield s
        bar.update(min(batch_size, n - s))
    bar.close()


@torch.no_grad()
def score_rows(m, prompts: list[str], targets: list[str], use_memory: bool = True, want_ppl: bool = False,
               batch_size: int = 16, desc: str = "scoring", chat: bool = False) -> RowScores:
    """Teacher-forced scores of 'prompt target' rows, each routed from its own prompt tokens (chat: each prompt
    as one user message in the chat template, the target as the answer; no perplexity)."""
    out = RowScores()
    for s in _batches(len(prompts), batch_size, desc):
        p, t = prompts[s : s + batch_size], targets[s : s + batch_size]
        sc = score(m.model, m.tok, m.layer, p, t, use_memory=use_memory, keep_logits=want_ppl, chat=chat)
        out.acc += sc.token_acc
        out.pred += sc.pred_tokens
        r, row, best = _routing_lists(sc.routing if use_memory else None, len(p))
        out.ratio += r
        out.row += row
        out.best += best
        if want_ppl:
            for pi, ti, logits in zip(p, t, sc.target_logits):
                ids, n_prompt = pair_ids(m.tok, pi, ti)
                labels = torch.tensor(ids[n_prompt:])  # [n_target]
                nll = -logits.log_softmax(-1).gather(1, labels.view(-1, 1)).squeeze(1)  # [n_target]
                out.ppl.append(perplexity(nll.tolist()))
    return out


@torch.no_grad()
def generate_rows(m, prompts: list[str], n_tokens: list[int], use_memory: bool = True,
                  batch_size: int = 16, desc: str = "generating", chat: bool = False) -> tuple[list[str], list[int]]:
    """Greedy continuations (n_tokens[i] new tokens for row i, batched by the maximum) and matched rows (chat:
    each prompt as one user message in the chat template)."""
    texts: list[str] = []
    rows: list[int] = []
    for s in _batches(len(prompts), batch_size, desc):
        p = prompts[s : s + batch_size]
        gen, routing = generate(m.model, m.tok, m.layer, p, max(n_tokens[s : s + batch_size]), use_memory=use_memory,
                                chat=chat)
        texts += gen
        rows += _routing_lists(routing if use_memory else None, len(p))[1]
    return texts, rows


def target_lengths(tok, prompts: list[str], targets: list[str]) -> list[int]:
    """Number of target tokens of each 'prompt target' row."""
    out = []
    for p, t in zip(prompts, targets):
        ids, n_prompt = pair_ids(tok, p, t)
        out.append(len(ids) - n_prompt)
    return out
