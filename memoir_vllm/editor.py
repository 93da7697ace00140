"""The sequential MEMOIR editor (memoir-method.md section 3), reference-faithful by default.

One edit reads top to bottom: rows -> activations -> mask -> masked training of W_m -> record.
`fast=True` caches the frozen prefix (everything up to the edited block) and each step runs only
the blocks after it, computing logits only where the loss needs them; same loss within 1e-4.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from .chat import has_chat_template
from .config import MemoirConfig, arch_spec
from .hf import MemoirLayer, attach, capturing, decoder_layers, get_module, training
from .inference import generate
from .memory import ResidualMemory, from_span
from .statements import statement_prefix
from .tokens import PairBatch, encode_pairs, encode_prompts
from .routing.tophash import indices_to_mask

log = logging.getLogger(__name__)

STATEMENT_TOKENS = 24  # new tokens of the unedited answer a statement row is cut from
TEMPLATE_SEEDS = ("I", "You", "Because", "Yes", "Q: ")
TEMPLATE_LENGTHS = (5, 10)  # new tokens; one template per seed and length -> 10 templates
TEMPLATE_DECODINGS = ("greedy", "model", "sample")
SAMPLE_DECODING = dict(do_sample=True, temperature=1.0, top_k=50)  # "sample": plain sampling, whatever the config


@torch.no_grad()
def generate_templates(model, tok, n_templates: int = 10, decoding: str = "greedy", seed: int = 0) -> list[str]:
    """Context templates generated once per memory from the unedited model, one per seed word and length.

    decoding "greedy": greedy from the seeds; "model" (the reference): under the model's own generation config
    (sampling where it samples, e.g. Llama-3-8B-Instruct's temperature 0.6, top_p 0.9), seeded by `seed` so a
    memory's templates are reproducible; greedy where the config does not sample (SmolLM2's); "sample": sampled
    at temperature 1 from the 50 likeliest tokens whatever the config, seeded (more fluent than greedy on a model
    whose config does not sample: on SmolLM2, seed 0, "I was watching a YouTube video" for greedy's "I-1000").
    """
    if decoding not in TEMPLATE_DECODINGS:
        raise ValueError(f"template decoding {decoding!r}: use {' or '.join(TEMPLATE_DECODINGS)}")
    templates: list[str] = []
    for i, length in enumerate(TEMPLATE_LENGTHS):
        b = encode_prompts(tok, list(TEMPLATE_SEEDS)).to(model.device)
        ids, attn = b.input_ids, b.attention_mask
        how = {"greedy": {"do_sample": False}, "model": {"generation_config": model.generation_config},
               "sample": SAMPLE_DECODING}[decoding]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=length, min_new_tokens=length,
                                 pad_token_id=tok.pad_token_id, **how)
        for word, row in zip(TEMPLATE_SEEDS, out[:, ids.shape[1]:]):
            text = word + tok.decode(row, skip_special_tokens=True)
            templates.append(text.replace("{", " ").replace("}", " "))
    return templates[:n_templates]


@torch.no_grad()
def compute_background(model, tok, layer: MemoirLayer, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean over texts of each text's mean activation entering the edited down-projection: [D]."""
    if not texts:
        raise ValueError("the background mean needs at least one unrelated text")
    means = []
    for s in range(0, len(texts), batch_size):
        b = encode_prompts(tok, texts[s : s + batch_size]).to(model.device)
        ids, attn = b.input_ids, b.attention_mask
        pos = (attn.cumsum(1) - 1).clamp_min(0)
        with capturing(layer):
            model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
        a, m = layer.captured.float(), attn.unsqueeze(-1).float()  # [B, T, D], [B, T, 1]
        means.append((a * m).sum(1) / m.sum(1))  # [B, D]
    return torch.cat(means).mean(0)


@dataclass
class EditResult:
    edit_id: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    mask_idx: torch.Tensor | None = None  # [k]
    subject: tuple[str, ...] = ()  # the aliases the edit was recorded with (set by Memoir.edit)
    superseded: list[int] = field(default_factory=list)  # older edits of the same question it retired

    @property
    def steps(self) -> int:
        return len(self.losses)


def row_losses(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """[B]: per row, summed CE on target tokens / (n_target + 1). logits [B, T, V] predict token t+1 at position t."""
    labels = batch.input_ids[:, 1:]  # [B, T-1]
    tmask = batch.target_mask[:, 1:].float()  # [B, T-1]
    v = logits.shape[-1]
    # the [N, V] layout: CE over a transposed [B, V, T] view is off by up to 3e-4 on CPU
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), labels.reshape(-1), reduction="none").view(labels.shape)
    return (ce * tmask).sum(1) / (tmask.sum(1) + 1)


def target_loss(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """Reference loss: row_losses' mean over rows."""
    return row_losses(logits, batch).mean()


def edit_loss(per_row: torch.Tensor, plain: list[int], plain_weight: float) -> torch.Tensor:
    """The loss an edit trains: the mean over its rows (the reference), plus plain_weight times the mean over its
    rows without a template. edit_loss(tensor([1., 3.]), [0], 1.0) == 2 + 1"""
    loss = per_row.mean()
    return loss + plain_weight * per_row[plain].mean() if plain_weight else loss


def converged(losses: list[float], cfg: MemoirConfig) -> bool:
    """The early stop after the losses so far: loss <= stop_loss and, under the reference rule,
    |last change| <= stop_delta too."""
    if not losses or losses[-1] > cfg.stop_loss:
        return False
    if cfg.stop_rule == "loss":
        return True
    return len(losses) >= 2 and abs(losses[-1] - losses[-2]) <= cfg.stop_delta


def end_loss(step_fn) -> float:
    """The loss of an edit's rows after its last step (one forward, no gradient)."""
    with torch.no_grad():
        return step_fn()[0].item()


def rows_exact(wrong: torch.Tensor) -> torch.Tensor:
    """[R] bool from [R] counts of target tokens that are not the argmax: rows greedy decoding would reproduce."""
    return wrong.detach() == 0


def failed(losses: list[float]) -> bool:
    """Whether an edit's steps left its loss above half the first loss (diverged or stalled): worth a retry."""
    return len(losses) > 1 and losses[-1] > 0.5 * losses[0]


@contextlib.contextmanager
def decay_step(w: torch.Tensor, cfg: MemoirConfig) -> Iterator[None]:
    """Weight decay around one optimizer step of the trained shard w = W_m[shard] (other shards never shrink).

    coupled (the reference): the optimizer's L2 term, grad += wd * W before the step (torch's own
    weight_decay arithmetic, so the reference trajectory is bit-for-bit unchanged); SGD then shrinks
    W by lr * wd per step, so the shrink grows with the learning rate.
    decoupled: W *= 1 - wd after the step, the same shrink whatever the learning rate.
    """
    wd = cfg.weight_decay
    if wd and cfg.decay == "coupled":
        w.grad.add_(w.detach(), alpha=wd)
    yield
    if wd and cfg.decay == "decoupled":
        with torch.no_grad():
            w.mul_(1.0 - wd)


class SequentialEditor:
    """Writes edits one after another into a ResidualMemory attached to `model`.

    Args:
        model, tok: a frozen transformers causal LM and its tokenizer.
        memory: the memory to write (its layer is cfg.layer).
        cfg: a resolved MemoirConfig (layer and k set).
        templates: context templates; generated from the model when None.
    """

    def __init__(self, model, tok, memory: ResidualMemory, cfg: MemoirConfig, templates: list[str] | None = None):
        self.model, self.tok, self.memory, self.cfg = model, tok, memory, cfg
        self.layer = attach(model, memory, cfg.layer)
        self.templates = (generate_templates(model, tok, cfg.n_templates, cfg.template_decoding, cfg.seed)
                          if templates is None else templates)
        self.max_length = getattr(model.config, "max_position_embeddings", None)

    def rows(self, prompt: str, target: str) -> PairBatch:
        """The training rows of one edit; row 0 is the one its mask is computed from.

        raw format (the reference): the plain row and one row per template, '<template> {p} {y}'.
        chat format (the memory has chat marks): the same rows with '{p}' / '<template> {p}' as the user
        message of a chat and y as the assistant's answer, then the raw rows, so one edit serves chat
        requests and raw completions: the plain raw row, or under chat_raw_rows "templated" all the raw
        format's rows. Under statement_rows "self", last, the question as the unedited model states it (a raw row).
        """
        prompts = [prompt] + [f"{t} {prompt}" for t in self.templates]
        chat = self.memory.marks is not None
        flags = [False] * len(prompts)
        if chat:
            raw = prompts if self.cfg.chat_raw_rows == "templated" else [prompt]
            prompts, flags = prompts + raw, [True] * len(prompts) + [False] * len(raw)
        statement = self.statement(prompt) if self.cfg.statement_rows == "self" else None
        if statement:
            prompts, flags = prompts + [statement], flags + [False]
        return encode_pairs(self.tok, prompts, [target] * len(prompts), self.max_length, marks=self.memory.marks,
                            chat=flags, end=self.cfg.answer_end).to(self.model.device)

    def statement(self, prompt: str) -> str | None:
        """The prompt stated in the unedited model's words (statements.statement_prefix of its greedy answer, in
        the chat form where the tokenizer has one), or None."""
        answer = generate(self.model, self.tok, self.layer, [prompt], STATEMENT_TOKENS, use_memory=False,
                          chat=has_chat_template(self.tok))[0][0]
        prefix = statement_prefix(prompt, answer)
        log.debug("statement row of %r: %r (from %r)", prompt, prefix, answer)
        return prefix

    def edit(self, prompt: str, target: str, shard: int = 0, edit_id: int | None = None, key: int = 0) -> EditResult:
        """Train W_m on one (prompt, target) under the prompt's TopHash mask, then store the mask.

        edit_id: the id stored with the mask (default: the next row number); Ray jobs pass the
        edit's global position in its file so that shard memories merge into one numbering.
        key: the mask key (ResidualMemory.key_of the edit's subject; 0: the paper's mask).
        """
        if not target.strip():
            raise ValueError(f"empty target for prompt {prompt[:60]!r}: every edit needs a non-empty target")
        if not prompt.strip():
            raise ValueError("empty prompt: every edit needs a prompt to route from")
        t0 = time.perf_counter()
        batch = self.rows(prompt, target)
        step_fn, mask_idx = (self._fast_steps if self.cfg.fast else self._reference_steps)(batch, shard, key)
        result = EditResult(edit_id=-1, mask_idx=mask_idx)
        with self.memory.trainable(shard) as w:  # this edit's shard alone: a step costs one shard
            before = w.detach().clone() if self.cfg.retries else None
            lr = self.cfg.lr
            losses = self._train(w, step_fn, lr)
            result.losses += losses
            best_loss, best_w = math.inf, None  # the failed attempt that ended lowest, should all fail
            for _ in range(self.cfg.retries):
                if not failed(losses):
                    break
                end = end_loss(step_fn)
                if end < best_loss:
                    best_loss, best_w = end, w.detach().clone()
                lr /= 2
                log.info("edit of %r ended at loss %.3f (first %.3f): again at lr %g", prompt[:60], end,
                         losses[0], lr)
                with torch.no_grad():
                    w.copy_(before)
                losses = self._train(w, step_fn, lr)
                result.losses += losses
            if best_w is not None and failed(losses) and end_loss(step_fn) > best_loss:
                log.info("every attempt at %r failed: keeping the one that ended at loss %.3f", prompt[:60],
                         best_loss)
                with torch.no_grad():
                    w.copy_(best_w)
        result.edit_id = self.memory.add_edit(mask_idx, edit_id=edit_id, shard=shard, key=key)
        result.seconds = time.perf_counter() - t0
        return result

    def plain_rows(self) -> list[int]:
        """The rows of rows() without a template: what a user's request looks like (row 0, and in the chat format
        the plain raw row after the chat rows); exact_steps checks them."""
        return [0, 1 + len(self.templates)] if self.memory.marks is not None else [0]

    def _train(self, w: torch.Tensor, step_fn, lr: float) -> list[float]:
        """Optimizer steps on the trained shard `w` until converged or n_iter (and, with exact_steps, until the
        plain rows are exact, up to exact_steps more); the loss before each step."""
        opt_cls = torch.optim.SGD if self.cfg.optimizer == "sgd" else torch.optim.Adam
        opt = opt_cls([w], lr=lr)  # decay is applied by decay_step
        losses: list[float] = []
        plain = self.plain_rows()
        exact = not self.cfg.exact_steps  # without exact_steps: the loss rule alone
        for i in range(self.cfg.n_iter + self.cfg.exact_steps):
            if exact and (converged(losses, self.cfg) or i >= self.cfg.n_iter):
                break
            opt.zero_grad(set_to_none=True)
            loss, rows_ok = step_fn()
            exact = not self.cfg.exact_steps or bool(rows_ok[plain].all())  # as of the weights before this step
            loss.backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([w], self.cfg.grad_clip)
            with decay_step(w, self.cfg):
                opt.step()
            losses.append(loss.item())
        return losses

    # -- the two ways of computing the loss under the edit's mask ---------------------------

    def _mask_from(self, acts: torch.Tensor, batch: PairBatch, key: int, shard: int) -> torch.Tensor:
        """The edit's mask indices [k] from the plain row's routing span, keyed by `key` (free columns: of `shard`)."""
        return self.memory.masks_from_acts(acts[:1], batch.route_mask[:1], key, shard)[0]

    def _memory_positions(self, batch: PairBatch) -> torch.Tensor | None:
        """[R, T] bool: where each training row gets the memory term, as it will when served (memory_start
        "content": from its routing span on, so a chat row's template header gets none); None: everywhere."""
        return from_span(batch.route_mask) if self.memory.gates_content else None

    def _reference_steps(self, batch: PairBatch, shard: int, key: int = 0):
        with torch.no_grad(), capturing(self.layer):
            self.model(input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1], use_cache=False)
        mask_idx = self._mask_from(self.layer.captured, batch, key, shard)
        mask = indices_to_mask(mask_idx.view(1, -1), self.memory.d_inner)[0]

        positions = self._memory_positions(batch)

        pred, labels = batch.target_mask[:, 1:], batch.input_ids[:, 1:]
        plain = self.plain_rows()

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            with training(self.layer, mask, shard, positions):
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            wrong = ((logits[:, :-1].argmax(-1) != labels) & pred).sum(1)
            return edit_loss(row_losses(logits, batch), plain, self.cfg.plain_weight), rows_exact(wrong)

        return step, mask_idx

    def _fast_steps(self, batch: PairBatch, shard: int, key: int = 0):
        spec = arch_spec(self.model.config.model_type)
        if not spec.residual_additive:
            log.debug("fast editing needs a residual-additive block; using the reference path")
            return self._reference_steps(batch, shard, key)
        blocks = decoder_layers(self.model)
        li = self.cfg.layer
        saved: dict = {}

        def keep_output(_m, _args, out):
            saved["h"] = out[0] if isinstance(out, tuple) else out

        def keep_kwargs(_m, args, kwargs):
            saved["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            saved["args"] = args[1:]

        hooks = [blocks[li].register_forward_hook(keep_output)]
        if li + 1 < len(blocks):
            hooks.append(blocks[li + 1].register_forward_pre_hook(keep_kwargs, with_kwargs=True))
        try:
            with torch.no_grad(), capturing(self.layer):
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        acts = self.layer.captured  # [R, T, D]
        mask_idx = self._mask_from(acts, batch, key, shard)
        mask = indices_to_mask(mask_idx.view(1, -1), self.memory.d_inner)  # [1, D]
        h_base = saved["h"]  # [R, T, d_model] block output without memory
        norm = get_module(self.model, spec.final_norm)
        head = get_module(self.model, spec.lm_head)
        # logits are needed only at positions that predict a target token
        pred = batch.target_mask[:, 1:]  # [R, T-1]
        labels = batch.input_ids[:, 1:][pred]  # [n]
        row_of = pred.nonzero()[:, 0]  # [n]
        n_target = pred.sum(1).float()  # [R]

        positions = self._memory_positions(batch)
        gate = positions.unsqueeze(-1).to(acts.dtype) if positions is not None else None  # [R, T, 1]
        plain = self.plain_rows()

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            delta = self.memory.delta(acts, mask.expand(acts.shape[0], -1), shard)
            h = h_base + (delta if gate is None else delta * gate)
            for blk in blocks[li + 1 :]:
                out = blk(h, *saved["args"], **saved["kwargs"])
                h = out[0] if isinstance(out, tuple) else out
            logits = head(norm(h[:, :-1][pred]))  # [n, V]
            ce = F.cross_entropy(logits.float(), labels, reduction="none")  # [n]
            per_row = torch.zeros_like(n_target).index_add(0, row_of, ce)
            wrong = torch.zeros_like(n_target).index_add(0, row_of, (logits.argmax(-1) != labels).float())
            return edit_loss(per_row / (n_target + 1), plain, self.cfg.plain_weight), rows_exact(wrong)

        return step, mask_idx
