"""The sequential-editing evaluation protocol (memoir-method.md section 5).

    pre  = outputs of the unedited model for every record (before any edit)
    for T in Ts:
        cut the first min(1000, N) records into chunks of T (T=1000: one run)
        for each chunk (the first --chunks of them): fresh memory, edit its T records one after
            another, then evaluate ALL T: reliability, generalization, locality (vs pre), generative EM
        metrics = mean over chunks of each chunk's mean

A fresh memory costs nothing: the model, the background mean and the context templates are built
once (`Evaluator`) and only the ResidualMemory is new per chunk.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from memoir_vllm.state import MemoryState
from memoir_vllm.session import Memoir
from memoir_vllm.snapshot import latest_version, load_snapshot

from .data import EvalRecord
from .metrics import answer_match, exact_match, locality, mean_stderr, repeats
from .sampled import edit_stream, sampled_rows
from .scoring import generate_rows, score_rows, target_lengths

log = logging.getLogger(__name__)

STREAM = 1000  # the standard lifelong-editing stream: the first 1000 records
GEN_EXTRA_TOKENS = 2  # greedy answers get the target's token count plus this many
ANSWER_TOKENS = 24  # ... and edit prompts at least this many, for whole-answer match and repetition
NEIGHBOUR_TOKENS = 8  # greedy tokens compared with the unedited model's on a neighbour question


def neighbours(n_records: int, positions: list[int], chunk: list[int] | None = None) -> dict[int, int]:
    """Edit position -> an unedited record of the same file, its neighbour: the record half the file away (same
    benchmark, so the same question forms and relations, other subjects), unless that one is edited in the same
    chunk (`chunk`, default `positions`)."""
    edited = set(positions if chunk is None else chunk)
    out = {}
    for i in positions:
        k = (i + n_records // 2) % n_records
        if k not in edited:
            out[i] = k
    return out


@dataclass
class PreEdit:
    """Outputs of the unedited model, computed before any edit, for records by position."""

    loc_pred: dict[int, list[int]] = field(default_factory=dict)  # argmax tokens on the loc answer
    loc_text: dict[int, str] = field(default_factory=dict)  # greedy continuation of the loc prompt
    rel: dict[int, float] = field(default_factory=dict)  # token accuracy of the target without memory
    gen: dict[int, float] = field(default_factory=dict)
    rel_ppl: dict[int, float] = field(default_factory=dict)
    rel_em: dict[int, float] = field(default_factory=dict)
    neigh_text: dict[int, str] = field(default_factory=dict)  # by record: greedy answer to its question (neighbours)


class Evaluator:
    """A model with its background mean and templates, handing out fresh memories.

    Args:
        model: 'default' or a local HF model directory.
        settings: MemoirConfig overrides (layer, k, tau, lr, n_iter, ...).
        background: unrelated texts for the background mean (default: the packaged ones).
        batch_size: rows per scoring forward.
        generative: also compute greedy-decoding metrics.
    """

    def __init__(self, model: str | Path = "default", settings: dict[str, Any] | None = None,
                 background: list[str] | None = None, batch_size: int = 16, generative: bool = True,
                 base: Memoir | None = None) -> None:
        self.base = base or Memoir.create(model, background=background, **(settings or {}))
        self.batch_size, self.generative = batch_size, generative

    @property
    def cfg(self):
        return self.base.cfg

    def fresh(self) -> Memoir:
        """An empty memory on the shared model, with the same background mean, permutation and templates."""
        return self.base.with_state(self.base.state.fresh())

    # -- pre-edit -------------------------------------------------------------------------------

    def pre_edit(self, records: list[EvalRecord], positions: list[int], ppl: bool = False) -> PreEdit:
        """Unedited outputs for records[i], i in positions (memory off)."""
        m, pre = self.base, PreEdit()
        recs = [records[i] for i in positions]
        sc = score_rows(m, [r.prompt for r in recs], [r.target for r in recs], use_memory=False, want_ppl=ppl,
                        batch_size=self.batch_size, desc="pre-edit: edit prompts")
        for j, i in enumerate(positions):
            pre.rel[i] = sc.acc[j]
            if ppl:
                pre.rel_ppl[i] = sc.ppl[j]
        para = [i for i in positions if records[i].rephrase]
        if para:
            sc = score_rows(m, [records[i].rephrase for i in para], [records[i].target for i in para],
                            use_memory=False, batch_size=self.batch_size, desc="pre-edit: paraphrases")
            pre.gen.update(zip(para, sc.acc))
        loc = [i for i in positions if records[i].has_loc]
        if loc:
            sc = score_rows(m, [records[i].loc_prompt for i in loc], [records[i].loc_answer for i in loc],
                            use_memory=False, batch_size=self.batch_size, desc="pre-edit: unrelated")
            pre.loc_pred.update(zip(loc, sc.pred))
            if self.generative:
                lp = [records[i].loc_prompt for i in loc]
                n = target_lengths(m.tok, lp, [records[i].loc_answer for i in loc])
                # one prompt per forward: padding changes float sums, and greedy text must match bit for bit
                texts, _ = generate_rows(m, lp, [min(x, 32) for x in n], use_memory=False, batch_size=1,
                                         desc="pre-edit: unrelated, greedy")
                pre.loc_text.update(zip(loc, texts))
        nb = sorted(set(neighbours(len(records), positions, chunk=[]).values()))  # whatever the chunks will be
        if self.generative and nb:
            texts, _ = generate_rows(m, [records[k].prompt for k in nb], [NEIGHBOUR_TOKENS] * len(nb),
                                     use_memory=False, batch_size=1, desc="pre-edit: neighbours, greedy")
            pre.neigh_text.update(zip(nb, texts))
        if self.generative:
            n = target_lengths(m.tok, [r.prompt for r in recs], [r.target for r in recs])
            texts, _ = generate_rows(m, [r.prompt for r in recs], [x + GEN_EXTRA_TOKENS for x in n], use_memory=False,
                                     batch_size=self.batch_size, desc="pre-edit: edit prompts, greedy")
            pre.rel_em.update({i: exact_match(t, records[i].target) for i, t in zip(positions, texts)})
        return pre

    # -- one chunk ------------------------------------------------------------------------------

    def evaluate(self, m: Memoir, records: list[EvalRecord], positions: list[int], pre: PreEdit,
                 ppl: bool = False) -> list[dict[str, Any]]:
        """Evaluate the T edits records[positions] written (in that order) into m; one dict per edit.

        Index row j of m's memory is the edit of positions[j] (a fresh memory per chunk).
        """
        recs = [records[i] for i in positions]
        bs = self.batch_size
        out: list[dict[str, Any]] = [dict(record=i) for i in positions]
        rel = score_rows(m, [r.prompt for r in recs], [r.target for r in recs], want_ppl=ppl, batch_size=bs,
                         desc="eval: edit prompts")
        for j, d in enumerate(out):
            d.update(rel=rel.acc[j], edit_overlap=rel.ratio[j], edit_routed_right=rel.row[j] == j,
                     pre_rel=pre.rel.get(positions[j]))
            if ppl:
                d.update(rel_ppl=rel.ppl[j], pre_rel_ppl=pre.rel_ppl.get(positions[j]))
        para = [j for j, r in enumerate(recs) if r.rephrase]
        if para:
            sc = score_rows(m, [recs[j].rephrase for j in para], [recs[j].target for j in para], batch_size=bs,
                            desc="eval: paraphrases")
            for n, j in enumerate(para):
                out[j].update(gen=sc.acc[n], para_overlap=sc.ratio[n], para_routed_right=sc.row[n] == j,
                              para_best_is_own=sc.best[n] == j, pre_gen=pre.gen.get(positions[j]))
        loc = [j for j, r in enumerate(recs) if r.has_loc]
        if loc:
            sc = score_rows(m, [recs[j].loc_prompt for j in loc], [recs[j].loc_answer for j in loc], batch_size=bs,
                            desc="eval: unrelated")
            for n, j in enumerate(loc):
                out[j].update(loc=locality(sc.pred[n], pre.loc_pred[positions[j]]), loc_overlap=sc.ratio[n],
                              loc_routed=sc.row[n] >= 0, loc_row=int(sc.row[n]))
        nb = neighbours(len(records), positions)
        if nb:  # neighbour locality: unedited questions of the same file (same forms, other subjects)
            at = {i: j for j, i in enumerate(positions)}
            prompts = [records[k].prompt for k in nb.values()]
            sc = score_rows(m, prompts, [records[k].target for k in nb.values()], batch_size=bs,
                            desc="eval: neighbours")
            for n, i in enumerate(nb):
                out[at[i]].update(neigh_routed=sc.row[n] >= 0, neigh_row=int(sc.row[n]))
            if self.generative and all(k in pre.neigh_text for k in nb.values()):  # (a run resumed from older files)
                texts, _ = generate_rows(m, prompts, [NEIGHBOUR_TOKENS] * len(nb), batch_size=1,
                                         desc="eval: neighbours, greedy")  # as pre_edit
                for (i, k), t in zip(nb.items(), texts):
                    out[at[i]].update(neigh_changed=float(t != pre.neigh_text[k]))
        if self.generative:
            self._generative(m, recs, positions, pre, out, para, loc)
        if m.memory.marks is not None:  # a chat-format memory: asked as chat requests too
            self._chat_form(m, recs, out, para)
        return out

    def _chat_form(self, m: Memoir, recs: list[EvalRecord], out: list[dict[str, Any]], para: list[int]) -> None:
        """The edit prompt and its paraphrase as one user message in the chat template: teacher-forced Rel/Gen
        (chat_rel, chat_gen) and, with generative metrics, whether the greedy answer is the target
        (chat_rel_answer, chat_gen_answer) and repeats itself (chat_rel_repeats)."""
        bs = self.batch_size
        forms = [("rel", list(range(len(recs))), [r.prompt for r in recs])]
        if para:
            forms.append(("gen", para, [recs[j].rephrase for j in para]))
        for name, rows, prompts in forms:
            targets = [recs[j].target for j in rows]
            sc = score_rows(m, prompts, targets, batch_size=bs, desc=f"eval: chat {name}", chat=True)
            for n, j in enumerate(rows):
                out[j][f"chat_{name}"] = sc.acc[n]
            if self.generative:
                texts, _ = generate_rows(m, prompts, [ANSWER_TOKENS] * len(rows), batch_size=bs,
                                         desc=f"eval: chat {name}, greedy", chat=True)
                for j, t in zip(rows, texts):
                    out[j][f"chat_{name}_answer"] = answer_match(t, recs[j].target)
                    if name == "rel":
                        out[j]["chat_rel_repeats"] = repeats(t)

    def _generative(self, m: Memoir, recs: list[EvalRecord], positions: list[int], pre: PreEdit,
                    out: list[dict[str, Any]], para: list[int], loc: list[int]) -> None:
        """Greedy-decoding metrics: normalised EM of the target after the prompt and the paraphrase,
        and whether the loc prompt's continuation is unchanged from the unedited model's."""
        bs = self.batch_size
        n = target_lengths(m.tok, [r.prompt for r in recs], [r.target for r in recs])
        texts, _ = generate_rows(m, [r.prompt for r in recs], [max(x + GEN_EXTRA_TOKENS, ANSWER_TOKENS) for x in n],
                                 batch_size=bs, desc="eval: edit prompts, greedy")
        for j, t in enumerate(texts):  # greedy: the first target+2 tokens are what a shorter answer held
            out[j].update(rel_em=exact_match(t, recs[j].target), rel_answer=answer_match(t, recs[j].target),
                          rel_repeats=repeats(t), pre_rel_em=pre.rel_em.get(positions[j]), rel_text=t)
        if para:
            texts, _ = generate_rows(m, [recs[j].rephrase for j in para], [n[j] + GEN_EXTRA_TOKENS for j in para],
                                     batch_size=bs, desc="eval: paraphrases, greedy")
            for j, t in zip(para, texts):
                out[j].update(gen_em=exact_match(t, recs[j].target), gen_text=t)
        if loc:
            lp = [recs[j].loc_prompt for j in loc]
            nl = target_lengths(m.tok, lp, [recs[j].loc_answer for j in loc])
            texts, _ = generate_rows(m, lp, [min(x, 32) for x in nl], batch_size=1,
                                     desc="eval: unrelated, greedy")  # as pre_edit
            for j, t in zip(loc, texts):
                out[j].update(loc_em=float(t == pre.loc_text[positions[j]]))

    def run_chunk(self, records: list[EvalRecord], positions: list[int], pre: PreEdit, ppl: bool = False,
                  progress: bool = True, state: Path | None = None, every: int = 50,
                  prefixes: dict[int, Callable[[list[dict[str, Any]], dict[str, float]], None]] | None = None,
                  train: set[int] | None = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Fresh memory, T sequential edits, then evaluate all T. Returns per-edit rows and timings.

        state: a directory where the chunk saves its memory every `every` edits and after the last one (a
            snapshot store plus per-edit stats) and resumes from, so an interrupted chunk continues where it
            stopped; at the end it holds the chunk's edited memory (for serving, retention, lm-eval).
        prefixes: {n: fn(rows, times)}: after the n-th edit, evaluate the first n positions and hand the
            rows to fn. A T=n chunk over this chunk's first n records is exactly this prefix (the same
            edits, in the same order, from the same fresh memory), so it need not be run again.
        train: the chunk positions (0..T-1) to train; the others are written for routing alone and left out of
            the rows (memoir_eval.sampled). None: all.
        """
        m, stats = self._start(state)
        prefixes = prefixes or {}
        if stats:
            log.info("resuming the chunk after %d of %d edits from %s", len(stats), len(positions), state)

        def after_each(_i: int, res) -> None:
            stats.append(dict(steps=res.steps, final_loss=res.losses[-1] if res.losses else math.nan,
                              seconds=res.seconds))
            n = len(stats)
            if n in prefixes:
                t = time.perf_counter()
                rows = self._evaluated(m, records, positions[:n], pre, ppl, stats, train)
                prefixes[n](rows, dict(edit_s=sum(x["seconds"] for x in stats), eval_s=time.perf_counter() - t))
            if state is not None and (n % every == 0 or n == len(positions)):
                _save_state(m, stats, state)  # the last save holds the chunk's final memory (a usable snapshot)

        edit_stream(m, [records[i].edit_request() for i in positions], train, start=len(stats), progress=progress,
                    after_each=after_each)
        t1 = time.perf_counter()
        rows = self._evaluated(m, records, positions, pre, ppl, stats, train)
        return rows, dict(edit_s=sum(x["seconds"] for x in stats), eval_s=time.perf_counter() - t1)

    def _evaluated(self, m: Memoir, records: list[EvalRecord], positions: list[int], pre: PreEdit, ppl: bool,
                   stats: list[dict[str, float]], train: set[int] | None = None) -> list[dict[str, Any]]:
        rows = self.evaluate(m, records, positions, pre, ppl=ppl)
        for d, st in zip(rows, stats):
            d.update(steps=st["steps"], final_loss=st["final_loss"])
        return rows if train is None else sampled_rows(rows, train)

    def _start(self, state: Path | None) -> tuple[Memoir, list[dict[str, float]]]:
        """A fresh memory, or the memory and per-edit stats a chunk saved in `state`."""
        if state is None or latest_version(state) is None:
            return self.fresh(), []
        snap = load_snapshot(state)
        b = self.base
        stats = json.loads((Path(state) / STATS).read_text())[: len(snap.edits)]
        if len(stats) != len(snap.edits):
            raise ValueError(f"{state}: {len(snap.edits)} saved edits but stats for {len(stats)}; delete {state} "
                             "to restart this chunk")
        state = MemoryState(snap.memory, snap.edits, b.cfg, b.editor.templates, b.state.model, b.module)
        return b.with_state(state), stats


STATS = "edit_stats.json"  # per-edit steps, final loss and seconds of a chunk's saved state


def _save_state(m: Memoir, stats: list[dict[str, float]], state: Path) -> None:
    """Stats first, then the snapshot: a crash between the two leaves extra stats, which _start trims."""
    from .report import write_json

    write_json(Path(state) / STATS, stats)
    m.save(state, keep=2)


# -- aggregation ----------------------------------------------------------------------------------

METRICS = ("rel", "gen", "loc", "rel_ppl", "rel_em", "gen_em", "loc_em", "rel_answer", "rel_repeats", "pre_rel",
           "pre_gen", "pre_rel_ppl",
           "pre_rel_em", "edit_routed_right", "para_routed_right", "para_best_is_own", "loc_routed", "neigh_routed",
           "neigh_changed", "chat_rel", "chat_gen", "chat_rel_answer", "chat_gen_answer", "chat_rel_repeats")


def summarize(chunks: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per metric: mean over chunks of chunk means (the paper's averaging), the stderr and median over edits."""
    out: dict[str, Any] = {}
    for key in METRICS:
        per_chunk, flat = [], []
        for rows in chunks:
            vals = [float(r[key]) for r in rows if r.get(key) is not None]
            if vals:
                per_chunk.append(sum(vals) / len(vals))
                flat += vals
        if flat:
            _, se = mean_stderr(flat)
            out[key] = dict(mean=sum(per_chunk) / len(per_chunk), stderr=se, median=statistics.median(flat), n=len(flat))
    return out


def chunk_positions(n_records: int, T: int, max_chunks: int | None) -> tuple[list[list[int]], int]:
    """Chunks of T consecutive positions over the first min(STREAM, n) records (T >= n: one chunk of all).

    Returns (the chunks to run, the number of chunks the full protocol has).
    """
    n = min(STREAM, n_records) if T <= STREAM else n_records
    if T >= n:
        return [list(range(n))], 1
    total = n // T
    chunks = [list(range(c * T, (c + 1) * T)) for c in range(total)]
    return chunks[: max_chunks or total], total


def evaluate_snapshot(snapshot: str, records: list[EvalRecord], model: str | None = None, ppl: bool = False,
                      generative: bool = False, batch_size: int = 16, tau: float | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Evaluate a snapshot whose edits are records[0..n-1] in order (as `memoir edit` writes them).

    The unedited outputs come from the same model with the memory off. Returns per-edit rows and
    the summary (same metrics as the protocol, one chunk).
    """
    m = Memoir.from_snapshot(snapshot, model=model)
    if tau is not None:
        m.set_tau(tau)
    n = m.memory.n_edits
    if n == 0 or n > len(records):
        raise ValueError(f"the snapshot holds {n} edits but {len(records)} records were given: give the records "
                         "the snapshot was edited with, in order")
    ev = Evaluator(base=m, batch_size=batch_size, generative=generative)
    positions = list(range(n))
    pre = ev.pre_edit(records, positions, ppl=ppl)
    rows = ev.evaluate(m, records, positions, pre, ppl=ppl)
    return rows, summarize([rows])
