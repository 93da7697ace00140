"""Memoir: a transformers model with one residual memory attached; the library's front door.

    m = Memoir.create("default")                       # embedded SmolLM2-135M-Instruct
    m.edit("The capital of Freedonia is", "Fredville")
    print(m.ask(["The capital of Freedonia is"]))
    m.save("snapshots/freedonia")                      # versioned, atomic
    m = Memoir.from_snapshot("snapshots/freedonia")
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .chat import chat_marks, has_chat_template
from .config import MemoirConfig, default_config
from .editor import EditResult, SequentialEditor, compute_background, generate_templates
from .edits import EditRequest
from .hf import attach, down_proj_path, model_dims
from .inference import generate
from .memory import ResidualMemory, candidate_rows, empty_memory
from .models import load_model, model_identity, resolve_model_dir
from .snapshot import Snapshot, check_model, load_snapshot, save_snapshot
from .state import EditRecord, MemoryState
from .routing.subjects import as_aliases, auto_subject, normalize
from .tokens import end_token_ids

log = logging.getLogger(__name__)


def builtin_background() -> list[str]:
    """The packaged unrelated general-knowledge texts used for the background mean by default."""
    text = resources.files("memoir_vllm").joinpath("background.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_prompt_format(cfg: MemoirConfig, tok) -> MemoirConfig:
    """cfg with prompt_format "auto" made concrete: chat for a tokenizer with a chat template, else raw."""
    if cfg.prompt_format == "chat" and not has_chat_template(tok):
        raise ValueError("prompt_format='chat' but this model's tokenizer has no chat template: use "
                         "--prompt-format raw (base models are edited and routed in the raw format)")
    if cfg.prompt_format != "auto":
        return cfg
    return dataclasses.replace(cfg, prompt_format="chat" if has_chat_template(tok) else "raw")


@dataclass
class Answer:
    """One prompt answered with and without the memory."""

    prompt: str
    answer: str
    base_answer: str
    edit_id: int | None  # the edit the prompt was routed to, None for the base model
    overlap: float  # best overlap ratio |M_q & M_i| / k over the candidates (every active edit: mask rule)
    candidates: list[dict] | None = None  # subject rule: why it routed (edit_id, subject, cosine, overlap)

    def to_dict(self) -> dict:
        d = dict(prompt=self.prompt, answer=self.answer, base_answer=self.base_answer, edit_id=self.edit_id,
                 overlap=round(self.overlap, 4))
        if self.candidates is not None:
            d["candidates"] = self.candidates
        return d


class Memoir:
    """A frozen causal LM plus a ResidualMemory at one layer, with its editor and edit records."""

    def __init__(self, model, tok, state: MemoryState, parent: Snapshot | None = None):
        self.model, self.tok, self.state = model, tok, state
        self.module = down_proj_path(model, state.config.layer)
        if state.module != self.module:
            raise ValueError(f"the state edits {state.module}, but layer {state.config.layer} of this model is "
                             f"{self.module}")
        self.editor = SequentialEditor(model, tok, state.memory, state.config, state.templates)
        self.layer = self.editor.layer
        self.parent = parent
        self.built_on: Path | None = parent.path if parent is not None else None  # the version saves build on

    @property
    def memory(self) -> ResidualMemory:
        return self.state.memory

    @property
    def cfg(self) -> MemoirConfig:
        return self.state.config

    @property
    def edits(self) -> list[EditRecord]:
        return self.state.edits

    @property
    def model_ref(self) -> str:
        """'default' or the model directory, recorded in snapshots."""
        return self.state.model.get("path", "default")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def create(cls, model: str | Path = "default", background: list[str] | None = None, **settings) -> "Memoir":
        """A fresh, empty memory on a model ('default' or a local HF directory).

        settings override the model's measured defaults (see MemoirConfig), e.g. tau=0.6, fast=True.
        """
        hf_model, tok = load_model(model)
        n_layers, d_model, d_inner = model_dims(hf_model)
        cfg = default_config(hf_model.config.model_type, n_layers, d_inner, **settings).resolved(n_layers, d_inner)
        cfg = resolve_prompt_format(cfg, tok)
        memory = empty_memory(d_model, d_inner, cfg, marks=chat_marks(tok) if cfg.prompt_format == "chat" else None,
                              end_ids=end_token_ids(tok))
        layer = attach(hf_model, memory, cfg.layer)
        texts = (background or builtin_background())[: cfg.n_background]
        memory.background.copy_(compute_background(hf_model, tok, layer, texts))
        templates = generate_templates(hf_model, tok, cfg.n_templates, cfg.template_decoding, cfg.seed)
        ref = "default" if str(model) == "default" else str(resolve_model_dir(model).resolve())
        state = MemoryState(memory, [], cfg, templates, {**model_identity(hf_model), "path": ref},
                            down_proj_path(hf_model, cfg.layer))
        return cls(hf_model, tok, state)

    @classmethod
    def from_snapshot(cls, snapshot: str | Path, model: str | Path | None = None) -> "Memoir":
        """Load a snapshot onto its model (or `model`, which must have the same config)."""
        snap = load_snapshot(snapshot)
        ref = str(model) if model is not None else snap.manifest["model"].get("path", "default")
        hf_model, tok = load_model(ref)
        check_model(snap.manifest, model_identity(hf_model), down_proj_path(hf_model, snap.config.layer))
        state = snap.state
        state.model = {**model_identity(hf_model), "path": ref}
        return cls(hf_model, tok, state, parent=snap)

    def with_state(self, state: MemoryState) -> "Memoir":
        """Another Memoir on this one's model and tokenizer holding `state` (e.g. state.fresh())."""
        return Memoir(self.model, self.tok, state)

    # -- editing --------------------------------------------------------------------------------

    def edit(self, prompt: str, target: str, source: str = "", edit_id: int | None = None,
             subject: str | Sequence[str] | None = None) -> EditResult:
        """Write one fact; returns its edit id, subject, loss trajectory and time (edit_id: see SequentialEditor.edit).

        subject: what the fact is about, a string or a list of aliases; without one memoir finds it in the
        prompt (subjects.auto_subject). Under the subject rule a request routes to this edit only if it names
        the subject.
        """
        aliases = as_aliases(subject) or (auto_subject(prompt),)
        same = self.same_question(prompt) if self.cfg.supersede else []
        result = self.editor.edit(prompt, target, shard=self._next_shard(), edit_id=edit_id,
                                  key=self.memory.key_of(aliases))
        result.subject = aliases
        self.state.record(EditRecord(prompt, target, source, subject=aliases))
        for old in same:
            self.state.supersede(old, result.edit_id)
        result.superseded = same
        log.debug("edit %d: subject %s, supersedes %s", result.edit_id, aliases, same)
        return result

    def _next_shard(self) -> int:
        """The shard the next edit trains: the newest one, opening a new one when the newest holds shard_budget
        edits or, under columns "free", has fewer than k free columns (with neither, always shard 0)."""
        budget, mem = self.cfg.shard_budget, self.memory
        full = budget and mem.shard_fill()[-1] >= budget
        if mem.columns == "free":
            full = full or mem.n_free(mem.n_shards - 1) < mem.k
        elif not budget:
            return 0
        return mem.add_shard() if full else mem.n_shards - 1

    def same_question(self, prompt: str) -> list[int]:
        """Ids of the active edits that ask the question `prompt` asks: a subject it names and, by the encoder
        check, cosine >= supersede_tau (what a new edit of `prompt` supersedes). Needs the subject rule with
        the encoder check; otherwise only edits of the identical prompt (case and spacing aside)."""
        mem = self.memory
        if mem.rule == "subject" and mem.subject_check == "encoder":
            rows = [r for r, _ in mem.candidate_scores([prompt], min_cos=self.cfg.supersede_tau)[0]]
        else:
            key = normalize(prompt)
            rows = [i for i, e in enumerate(self.edits) if normalize(e.prompt) == key]
        return sorted(int(mem.index.edit_ids[r]) for r in rows if bool(mem.index.active[r]))

    def set_subject(self, edit_id: int, subject: str | Sequence[str]) -> None:
        """Change what an edit is about without re-editing (its aliases for the subject rule)."""
        self.state.set_subject(edit_id, as_aliases(subject))

    def edit_many(
        self, requests: Iterable[EditRequest], progress: bool = True,
        after_each: Callable[[int, EditResult], None] | None = None,
    ) -> list[EditResult]:
        """Write edits sequentially with a progress bar (edits/s); after_each(i, result) runs after each."""
        requests = list(requests)
        results = []
        t0 = time.perf_counter()
        bar = tqdm(requests, desc="editing", unit="edit", disable=not progress)
        for i, req in enumerate(bar):
            res = self.edit(req.prompt, req.target, req.source, subject=req.subject or None)
            results.append(res)
            bar.set_postfix(loss=f"{res.losses[-1]:.3f}" if res.losses else "-", steps=res.steps)
            if res.superseded:
                log.info("edit %d (%r) supersedes %s", res.edit_id, req.prompt[:60], res.superseded)
            if after_each:
                after_each(i, res)
        dt = time.perf_counter() - t0
        log.info("%d edits in %.1f s (%.2f edits/s)", len(results), dt, len(results) / max(dt, 1e-9))
        return results

    def set_active(self, edit_id: int, active: bool) -> None:
        """Disable (or re-enable, which also undoes a supersede) one edit: a disabled edit is never routed to."""
        self.state.set_active(edit_id, active)

    def set_tau(self, tau: float) -> None:
        """Set the routing threshold of the memory's rule (subject_tau under the subject rule, else tau)."""
        self.memory.set_threshold(tau)
        setattr(self.cfg, self.memory.threshold_name, self.memory.threshold)

    # -- asking ---------------------------------------------------------------------------------

    def ask(self, prompts: list[str], max_new_tokens: int = 16, chat: bool | None = None) -> list[Answer]:
        """Greedy answers with and without the memory, the matched edit and the best overlap (under the subject
        rule also each prompt's candidates: why it routed where it did).

        chat: send each prompt as a one-message chat (default: for a chat-format memory).
        """
        chat = (self.memory.marks is not None) if chat is None else chat
        if chat and not has_chat_template(self.tok):
            raise ValueError("--chat: this model's tokenizer has no chat template; ask in the raw form")
        scored = self.memory.candidate_scores(prompts) if self.memory.rule == "subject" else None  # found once
        answers, routing = generate(self.model, self.tok, self.layer, prompts, max_new_tokens, use_memory=True,
                                    chat=chat, candidates=candidate_rows(scored) if scored is not None else None)
        base, _ = generate(self.model, self.tok, self.layer, prompts, max_new_tokens, use_memory=False, chat=chat)
        out = []
        why = self.why(scored, routing.mask_idx) if scored is not None else None
        for i, p in enumerate(prompts):
            row = int(routing.row[i]) if routing is not None else -1
            edit_id = int(self.memory.index.edit_ids[row]) if row >= 0 else None
            overlap = float(routing.ratio[i]) if routing is not None else 0.0
            out.append(Answer(p, answers[i], base[i], edit_id, overlap, why[i] if why else None))
        return out

    def why(self, scored: list[list[tuple[int, float | None]]], mask_idx) -> list[list[dict]]:
        """Per prompt, its subject-rule candidates (ResidualMemory.candidate_scores) in decision order: edit id,
        subject, encoder cosine (None without the check) and mask overlap / k of its query mask (mask_idx
        [B, k]; None under free columns, where the first candidate is the one routed to); with shared columns the
        first with overlap >= subject_tau is the one routed to."""
        from .routing.tophash import indices_to_mask

        mem, out = self.memory, []
        for i, cands in enumerate(scored):
            rows = torch.tensor([r for r, _ in cands], dtype=torch.int64)
            if mem.columns == "shared" and len(rows):
                q = indices_to_mask(mem.keyed(mask_idx[i].expand(len(rows), -1), mem.index.keys[rows]), mem.d_inner)
                ov = [round(o / mem.k, 4) for o in (mem.index.masks(rows) & q).sum(1).tolist()]
            else:  # free columns read no overlap
                ov = [None] * len(rows)
            out.append([dict(edit_id=int(mem.index.edit_ids[r]), subject=list(mem.subjects.aliases[r]), cosine=c,
                             overlap=o) for (r, c), o in zip(cands, ov)])
        return out

    # -- saving ---------------------------------------------------------------------------------

    def model_id(self) -> dict:
        return dict(self.state.model)

    def save(self, root: str | Path, keep: int = 3) -> Path:
        """Write the memory and its edits as the next version of the snapshot store at root.

        Refused (SnapshotError) when this memory came from root and another writer saved there since, and
        (StoreLockedError) while another process holds root's write lock (memoir_vllm.store_lock).
        """
        self.built_on = save_snapshot(root, self.state, keep=keep, built_on=self.built_on)
        return self.built_on

