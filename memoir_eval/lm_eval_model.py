"""The `memoir` model type for lm-eval: a transformers model plus a memoir snapshot.

    lm_eval --model memoir --model_args pretrained=DIR,snapshot=SNAP --tasks memoir_zsre --include_path tasks
    memoir lm-eval --model_args snapshot=SNAP --tasks memoir_zsre          # registers the model and the task pack

A subclass of lm-eval's HFLM. Each request is routed from its context (the prompt) only, as memoir
routes a served request from its prompt:
- loglikelihood: scored by memoir's own teacher-forced path (memoir_vllm.inference.score), so the
  numbers equal `memoir eval`'s. The result is an `LLResult`: a plain (logprob, is_greedy) tuple for
  lm-eval, carrying the token accuracy against the continuation, the perplexity and the per-token
  agreement of the argmax with the unedited model (memory off), which the memoir tasks' locality uses.
- generate_until: greedy with the row's routing decided from the context at prefill.
- loglikelihood_rolling (perplexity tasks): each window routed from all its tokens.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from memoir_vllm.hf import routed
from memoir_vllm.inference import answer_processors, score
from memoir_vllm.tokens import pair_ids

log = logging.getLogger(__name__)


class LLResult(tuple):
    """(logprob, is_greedy) with memoir's extra per-request numbers as attributes."""

    token_acc: float  # fraction of continuation tokens predicted by argmax (teacher forced)
    agreement: float  # fraction of continuation positions whose argmax equals the memory-off argmax
    ppl: float  # perplexity of the continuation tokens
    n_tokens: int
    routed: bool  # the context was routed to an edit
    overlap: float  # best overlap / k

    def __new__(cls, logprob: float, is_greedy: bool, **extra: Any) -> "LLResult":
        obj = super().__new__(cls, (logprob, is_greedy))
        obj.__dict__.update(extra)
        return obj

    def __reduce__(self):  # picklable for lm-eval's request cache
        return (_rebuild, (tuple(self), dict(self.__dict__)))


def _rebuild(values: tuple, extra: dict) -> LLResult:
    return LLResult(*values, **extra)


@register_model("memoir")
class MemoirLM(HFLM):
    """HFLM over a memoir snapshot.

    Args:
        snapshot: a memoir snapshot store or version directory (required).
        pretrained: the model directory or 'default' (default: the model recorded in the snapshot).
        tau: override the snapshot's routing threshold.
        memory: False evaluates the same model with the memory off (the unedited model).
        Other HFLM arguments (batch_size, max_length, ...) pass through.
    """

    def __init__(self, snapshot: str | None = None, pretrained: str | None = None, tau: float | None = None,
                 memory: bool | str = True, device: str = "cpu", **kwargs: Any) -> None:
        from memoir_vllm.session import Memoir

        if not snapshot:
            raise ValueError("the memoir model type needs a snapshot: --model_args snapshot=DIR[,pretrained=MODEL_DIR]")
        self.memoir = Memoir.from_snapshot(snapshot, model=pretrained)
        if tau is not None:
            self.memoir.set_tau(float(tau))
        self.use_memory = str(memory).lower() not in ("false", "0", "no", "off")
        kwargs.pop("backend", None)
        kwargs.setdefault("dtype", None)
        super().__init__(pretrained=self.memoir.model, tokenizer=self.memoir.tok, backend="causal", device=device,
                         **kwargs)

    # -- loglikelihood through memoir's scoring ------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[LLResult]:
        out: list[LLResult] = []
        bs = max(1, int(self.batch_size)) if str(self.batch_size).isdigit() else 8
        args = [r.args for r in requests]
        for s in tqdm(range(0, len(args), bs), disable=disable_tqdm, desc="memoir loglikelihood"):
            out += self._score_batch(args[s : s + bs])
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    @torch.no_grad()
    def _score_batch(self, pairs: list[tuple[str, str]]) -> list[LLResult]:
        """Score 'context continuation' rows as memoir does: the continuation's leading space is the
        separator memoir puts between prompt and target (lm-eval's default target_delimiter)."""
        m = self.memoir
        prompts = [c for c, _ in pairs]
        targets = [t[1:] if t.startswith(" ") else t for _, t in pairs]
        on = score(m.model, m.tok, m.layer, prompts, targets, use_memory=self.use_memory, keep_logits=True)
        routing = on.routing
        routed_rows = [bool(routing is not None and routing.row[i] >= 0) for i in range(len(pairs))]
        off_pred = list(on.pred_tokens)
        if any(routed_rows):  # rows left unrouted are bit-identical to the unedited model
            off = score(m.model, m.tok, m.layer, prompts, targets, use_memory=False)
            off_pred = [off.pred_tokens[i] if routed_rows[i] else on.pred_tokens[i] for i in range(len(pairs))]
        results = []
        for i, (p, t) in enumerate(zip(prompts, targets)):
            ids, n_prompt = pair_ids(m.tok, p, t)
            labels = torch.tensor(ids[n_prompt:])  # [n]
            logp = on.target_logits[i].log_softmax(-1).gather(1, labels.view(-1, 1)).squeeze(1)  # [n]
            n = len(labels)
            agree = sum(int(a == b) for a, b in zip(on.pred_tokens[i], off_pred[i])) / n
            results.append(LLResult(
                float(logp.sum()), bool(on.token_acc[i] == 1.0), token_acc=float(on.token_acc[i]), agreement=agree,
                ppl=float(torch.exp(-logp.mean())), n_tokens=n, routed=routed_rows[i],
                overlap=float(routing.ratio[i]) if routing is not None else 0.0,
            ))
        return results

    # -- generation and rolling perplexity, routed per row --------------------------------------

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        attn = generation_kwargs.get("attention_mask")
        mask = attn.bool() if attn is not None else context != self.tokenizer.pad_token_id
        if self.use_memory:  # a routed answer's first token is no end token (nonempty_answers), as memoir ask
            generation_kwargs["logits_processor"] = answer_processors(self.memoir.layer, context.shape[1])
        with routed(self.memoir.layer, mask if self.use_memory else None, self._candidates(context)):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _model_call(self, inps, attn_mask=None, labels=None):
        mask = attn_mask.bool() if attn_mask is not None else torch.ones_like(inps, dtype=torch.bool)
        with routed(self.memoir.layer, mask if self.use_memory else None, self._candidates(inps)):
            return super()._model_call(inps, attn_mask, labels)

    def _candidates(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The subject rule's candidate rows of token-id rows (their text decoded once); none without the memory."""
        if self.memoir.memory.rule != "subject" or not self.use_memory:
            return None
        return self.memoir.memory.candidates(self.tokenizer.batch_decode(ids, skip_special_tokens=True))

    def get_model_info(self) -> dict:
        info = super().get_model_info() if hasattr(super(), "get_model_info") else {}
        mem = self.memoir.memory
        return {**info, "memoir_edits": mem.n_edits, "memoir_tau": mem.tau, "memoir_layer": self.memoir.cfg.layer,
                "memoir_memory": self.use_memory}
