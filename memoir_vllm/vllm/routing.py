"""Per-request routing state fed to the memoir layer once per engine step.

Each live request owns a stable slot (kept across preemption, freed when the runner drops the
request). Per step, after vLLM's runner has fixed its batch, `Router.prepare()` writes

    tok_slot[t]   slot of the request of token t (-1: padding, no memory)          [T_max] int64
    tok_prompt[t] token t is a routing token (in its prompt's routing span) of a request not yet decided
                                                                                   [T_max] bool
    dec_slots[:n] slots whose prompt completes this step (decided in the forward)  [R_max] int64
    dec_last[:n]  token index (in this step) of each deciding slot's last routing token [R_max] int64

A prompt's routing span is ResidualMemory.routing_span of its token ids (all of them, or in a chat
rendering the last user message's content), found once per request from its prompt token ids.

and, under the subject rule, once per request when it is admitted (its prompt decoded once; one batched encoder
call for all the requests a step admits):

    slot_cand[s]  the rows whose subject the request names, newest first, -1 padded [S+1, MAX_CANDIDATES] int64

with `copy_` into preallocated tensors. The layer (layer.py) then, inside the forward:
accumulates the prompt tokens' activations per slot, decides the completing slots with
ResidualMemory.decide (feature -> TopHash -> best match -> tau), and adds W_m (M_i* ⊙ a) to every token of a
routed slot. Decisions (slot_row, -1 = base model) live in device tensors; the host mirror is
refreshed at the next prepare() (never inside the forward).

Semantics (see docs in plugin.py): a request whose whole prompt runs in one step gets the exact
reference behaviour. A prompt split over several steps (chunked prefill) is decided from all its
prompt tokens, but the memory term reaches only the tokens run from the deciding chunk on.
A prefix-cache hit only happens between identical prompts (plugin salts the block hashes with
the prompt); its decision is reused from the request that computed the cached blocks.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..inference import block_end_tokens
from ..memory import MAX_CANDIDATES, ResidualMemory, candidate_rows, mask_columns

log = logging.getLogger(__name__)

NO_MEMORY = -1  # slot_row value: decided, base model
UNDECIDED = -2  # slot_row value: prompt still being read


@dataclass
class RequestState:
    """Host-side state of one live request."""

    slot: int
    key: bytes  # prompt identity (prompt-cache salt and decision cache key)
    decided: bool = False
    row: int = UNDECIDED  # host mirror of slot_row once read back
    n_prompt_seen: int = 0  # prompt tokens accumulated into the feature
    next_pos: int = 0  # where the next prompt chunk should start (a restart means preemption)
    pending_readback: bool = False
    gen: int = 0  # the memory generation it is routed with (Router.swap)


@dataclass
class StepPlan:
    """Python-side facts of this step that the layer reads (set by prepare, consumed by one forward)."""

    armed: bool = False  # a real step was prepared and its forward has not run yet
    need_acc: bool = False  # some token of this step is a prompt token of an undecided request
    n_decide: int = 0  # slots decided in this step's forward (dec_slots[:n_decide])
    need_memory: bool = False  # some token of this step may get the memory term
    shards: tuple[int, ...] | None = None  # the only shards this step's routed tokens can be in (None: any)
    old: tuple = ()  # (generation, memory) of requests routed before a swap, whose tokens are marked in tok_gen


class Router:
    """Routing buffers of one engine worker for one memoir layer.

    Args:
        memory: the loaded ResidualMemory (index, W_m, perm, background; on `device`).
        max_reqs: vLLM's max_num_seqs (batch rows per step).
        max_tokens: vLLM's max_num_batched_tokens (tokens per step).
        dtype: the model's activation dtype (for the per-slot dense masks).
        cache_size: decisions remembered per prompt key (prefix-cache hits reuse them).
        text_of: prompt token ids -> text, for the subject rule's candidates (None: no candidates, so a
            subject-rule memory routes nothing).
    """

    def __init__(self, memory: ResidualMemory, max_reqs: int, max_tokens: int, dtype: torch.dtype,
                 device: torch.device, cache_size: int = 1 << 16,
                 text_of: Callable[[list[int]], str] | None = None) -> None:
        self.memory = memory
        self._row_shard = memory.index.shards.tolist()  # host copy: the shard of each index row
        self.text_of = text_of
        self.cands: dict[str, list[tuple[int, float | None]]] = {}  # request id -> its candidates, set by admit()
        self.device, self.dtype = device, dtype
        self.max_tokens = max_tokens
        d = memory.d_inner
        self.n_slots = 0
        self.tok_slot = torch.full((max_tokens,), NO_MEMORY, dtype=torch.int64, device=device)  # [T_max]
        self.tok_prompt = torch.zeros(max_tokens, dtype=torch.bool, device=device)  # [T_max]
        self.tok_on = torch.ones(max_tokens, dtype=torch.bool, device=device)  # [T_max] may get the memory term
        self.dec_slots = torch.zeros(max_reqs, dtype=torch.int64, device=device)  # [R_max]
        self.dec_last = torch.zeros(max_reqs, dtype=torch.int64, device=device)  # [R_max]
        # config.nonempty_answers: per logits row of this step, the slot of a request whose first token it samples
        self.logit_slot = torch.full((max_reqs,), NO_MEMORY, dtype=torch.int64, device=device)  # [R_max]
        self._logit_rows = 0  # rows of this step's sampled logits (0: nothing armed)
        self._ends: tuple[tuple[int, ...], torch.Tensor | None] = ((), None)  # memory.end_ids and their device copy
        self._tok_slot_host = torch.full((max_tokens,), NO_MEMORY, dtype=torch.int64)  # staging
        self._tok_prompt_host = torch.zeros(max_tokens, dtype=torch.bool)
        self._tok_on_host = torch.ones(max_tokens, dtype=torch.bool)
        self.gen = 0  # generation of self.memory; swap() makes a new one
        self.version = ""  # the snapshot version of self.memory (for the log), set by the plugin
        self.old_memories: dict[int, ResidualMemory] = {}  # older generations still used by requests in flight
        self.tok_gen = torch.zeros(max_tokens, dtype=torch.int64, device=device)  # [T_max] only while old ones live
        self._grow(max(2 * max_reqs, 8), d)
        self.states: dict[str, RequestState] = {}
        self.keys: dict[str, bytes] = {}
        self.spans: dict[str, tuple[int, int]] = {}  # request id -> routing span [start, end) of its prompt
        self.decisions: OrderedDict[bytes, int] = OrderedDict()  # prompt key -> row (-1 none)
        self.cache_size = cache_size
        self.plan = StepPlan()
        self.partial_prefix_warned = False
        self.counts = {"decided": 0, "routed": 0, "reused": 0, "opted_out": 0, "partial_prefix": 0, "chunked": 0,
                       "recomputed": 0, "shared_prefix": 0, "no_candidate": 0}

    # -- slots -------------------------------------------------------------------------------------

    def _grow(self, n: int, d: int) -> None:
        """(Re)allocate per-slot buffers for n slots, keeping existing contents. Never called in forward."""
        old = self.n_slots

        def grown(t: torch.Tensor | None, shape: tuple, fill: float, dtype: torch.dtype) -> torch.Tensor:
            new = torch.full(shape, fill, dtype=dtype, device=self.device)
            if t is not None and old:
                new[:old] = t[:old]
            return new

        # one extra trailing row (index n) is a sink for padding tokens: never read as a decision
        self.slot_row = grown(getattr(self, "slot_row", None), (n + 1,), NO_MEMORY, torch.int64)  # [S+1]
        self.slot_shard = grown(getattr(self, "slot_shard", None), (n + 1,), 0, torch.int64)  # [S+1]
        self.slot_mask = grown(getattr(self, "slot_mask", None), (n + 1, d), 0.0, self.dtype)  # [S+1, D]
        self.acc = grown(getattr(self, "acc", None), (n + 1, d), 0.0, torch.float32)  # [S+1, D] prompt sums
        self.n_prompt = grown(getattr(self, "n_prompt", None), (n + 1,), 0.0, torch.float32)  # [S+1]
        self.slot_cand = grown(getattr(self, "slot_cand", None), (n + 1, MAX_CANDIDATES), NO_MEMORY,
                               torch.int64)  # [S+1, C] candidate rows (subject rule)
        # free columns: each decided slot's edit columns and their weights (memory.column_term), [S+1, k(, d_model)]
        free = self.memory.columns == "free"
        k, d_model = self.memory.k, self.memory.d_model
        self.slot_cols = grown(getattr(self, "slot_cols", None), (n + 1, k), 0, torch.int64) if free else None
        self.slot_table = grown(getattr(self, "slot_table", None), (n + 1, k, d_model), 0.0, self.dtype) if free else None
        if old:
            self.slot_row[old:].fill_(NO_MEMORY)
        self.free = list(range(n - 1, old - 1, -1)) + getattr(self, "free", [])
        self.n_slots = n

    def _alloc(self, rid: str, key: bytes) -> RequestState:
        """A free slot for a new request (its device rows are clean: see _release); host work only."""
        if not self.free:
            self._grow(2 * self.n_slots, self.memory.d_inner)
        st = RequestState(self.free.pop(), key, gen=self.gen)
        self.states[rid] = st
        return st

    def _release(self, live: set[str]) -> None:
        """Free the slots of finished requests, cleaning their device rows in one batched write each."""
        gone = [r for r in self.states if r not in live]
        if not gone:
            return
        slots = [self.states.pop(rid).slot for rid in gone]
        for rid in gone:
            self.keys.pop(rid, None)
            self.cands.pop(rid, None)
            self.spans.pop(rid, None)
        idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self.slot_row[idx] = NO_MEMORY
        self.slot_cand[idx] = NO_MEMORY
        self.slot_mask[idx] = 0
        self.acc[idx] = 0
        self.free.extend(slots)
        live_gens = {st.gen for st in self.states.values()}
        for g in [g for g in self.old_memories if g not in live_gens]:
            del self.old_memories[g]  # its last request finished

    def admit(self, new: list[tuple[str, list[int]]]) -> None:
        """A step's new requests (id, prompt token ids): each one's routing span (ResidualMemory.routing_span: the
        last user message's content in a chat rendering) and its subject candidates from that span's text, once
        per request and in one batch per step (one encoder call for all of them; host side, before their slots)."""
        for rid, prompt_ids in new:
            self.spans[rid] = self.memory.routing_span(prompt_ids)
        if self.memory.rule != "subject":
            return
        texts = [self.text_of(ids[slice(*self.spans[rid])]) if self.text_of is not None else "" for rid, ids in new]
        ids = self.memory.index.edit_ids
        for (rid, _), scored in zip(new, self.memory.candidate_scores(texts)):  # the one rule (memory.py)
            self.cands[rid] = scored[:MAX_CANDIDATES]
            if scored:  # why it will route where it does (the decision adds the mask overlap)
                log.info("memoir: request %s candidates (edit id, cosine): %s", rid,
                         [(int(ids[r]), c) for r, c in scored[:MAX_CANDIDATES]])

    def _remember(self, key: bytes, row: int) -> None:
        self.decisions[key] = row
        self.decisions.move_to_end(key)
        while len(self.decisions) > self.cache_size:
            self.decisions.popitem(last=False)

    def _set_decided(self, st: RequestState, row: int) -> None:
        """Fix a decision from the host (opt-out or a cached decision), outside the forward."""
        st.decided, st.row = True, row
        self.slot_row[st.slot] = row
        if row >= 0:
            index = self.memory.index
            rows = torch.tensor([row], device=index.packed.device)
            mask = index.masks(rows)  # [1, D]
            self.slot_mask[st.slot] = mask[0].to(self.slot_mask)
            self.slot_shard[st.slot] = self._row_shard[row]
            if self.slot_table is not None:
                self.keep_columns(torch.tensor([st.slot], device=self.device), rows, mask_columns(mask, self.memory.k))
        else:
            self.slot_mask[st.slot].zero_()

    def keep_columns(self, slots: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Free columns: keep the decided rows' columns [n, k] and weights (memory.column_table) in the slots [n]
        (inside a forward too: no host sync). A request routed before a swap keeps reading the weights it got."""
        self.slot_cols[slots] = cols
        self.slot_table[slots] = self.memory.column_table(rows, cols).to(self.slot_table.dtype)

    def clear_decisions(self) -> None:
        """Forget cached per-prompt decisions (after tau, edits or the snapshot changed)."""
        self.decisions.clear()

    def swap(self, memory: ResidualMemory) -> None:
        """Serve `memory` from the next step (outside any forward). Requests already routed (or deciding in the
        forward just run) finish with the memory they were routed with, kept as an older generation until
        they end; requests still reading their prompt decide with the new one. Their candidate rows stay
        valid when the new memory extends the old (a store's next version appends rows); otherwise they are
        dropped, and those requests get the base model."""
        old, self.memory = self.memory, memory
        self._row_shard = memory.index.shards.tolist()
        table = (memory.k, memory.d_model) if memory.columns == "free" else None
        if table != (None if self.slot_table is None else tuple(self.slot_table.shape[1:])):
            self.slot_cols = self.slot_table = None  # other column settings: the per-slot weights are made anew
            self._grow(self.n_slots, memory.d_inner)  # (requests routed before keep no weights: base model)
        appended = memory.n_edits >= old.n_edits and memory.d_inner == old.d_inner
        keep_old = False
        for st in self.states.values():
            if st.decided or st.pending_readback:
                keep_old |= st.gen == self.gen and (st.pending_readback or st.row >= 0)
            else:
                st.gen = self.gen + 1
                if not appended:
                    self.slot_cand[st.slot] = NO_MEMORY
        if keep_old and self.slot_table is None:  # free columns: routed slots already hold their weights,
            self.old_memories[self.gen] = old     # so the old memory (W_m of every shard) is not kept alive
        self.gen += 1
        self.clear_decisions()

    # -- per step ----------------------------------------------------------------------------------

    def _read_back(self) -> None:
        """Host mirror of the decisions made inside the previous forward (outside any forward)."""
        pending = [(rid, st) for rid, st in self.states.items() if st.pending_readback]
        if not pending:
            return
        rows = self.slot_row[torch.tensor([st.slot for _, st in pending])].tolist()
        for (rid, st), row in zip(pending, rows):
            if row == UNDECIDED:  # the step was prepared but its forward never ran: read the prompt again
                st.pending_readback, st.n_prompt_seen = False, 0
                self.acc[st.slot].zero_()
                continue
            st.pending_readback, st.decided, st.row = False, True, int(row)
            if row >= 0:  # which version and edit answer it (the server's log)
                memory = self.memory if st.gen == self.gen else self.old_memories.get(st.gen, self.memory)
                log.info("memoir: request %s answered by edit %d of %s", rid, int(memory.index.edit_ids[row]),
                         self.version if st.gen == self.gen else f"generation {st.gen}")
            self._remember(st.key, int(row))
            self.counts["decided"] += 1
            self.counts["routed"] += int(row >= 0)

    def prepare(self, req_ids: list[str], num_computed: np.ndarray, num_scheduled: np.ndarray,
                num_prompt: np.ndarray, opted_out: list[bool], keys: list[bytes], live: set[str]) -> None:
        """Fill this step's buffers from the final batch of the runner (one call per model forward). Each
        prompt routes from the span admit() found (the whole prompt for a request never admitted)."""
        self._read_back()
        self._release(live)
        n = len(req_ids)
        spans = np.asarray([self.spans.get(rid, (0, int(num_prompt[i]))) for i, rid in enumerate(req_ids)],
                           dtype=np.int64).reshape(n, 2)  # [R, 2] routing span [start, end) of each prompt
        # [R] each prompt's first token that gets the memory term (memory_start "content": its routing span)
        first_on = spans[:, 0] if self.memory.gates_content else np.zeros(n, dtype=np.int64)
        slots = np.empty(n, dtype=np.int64)
        undecided = np.zeros(n, dtype=bool)
        decide: list[int] = []
        decide_n: list[float] = []  # prompt tokens behind each deciding slot's feature
        decide_last: list[int] = []  # token index of each deciding slot's last prompt token
        offsets = np.cumsum(num_scheduled[:n]) - num_scheduled[:n]  # [R] first token of each row in this step
        fresh: list[int] = []  # new slots left undecided by the host: UNDECIDED until their forward decides
        new_cands: list[tuple[int, list[tuple[int, float | None]]]] = []  # (slot, candidates) of new requests
        need_memory = False
        subject_rule = self.memory.rule == "subject"
        shared = self.memory.columns != "free"  # free columns: the term reads per-slot weights, no shard matmul
        present: set[int] | None = set() if self.memory.n_shards > 1 and subject_rule and shared else None
        gens = np.full(n, self.gen, dtype=np.int64)  # [R] memory generation of each request
        first = np.full(n, NO_MEMORY, dtype=np.int64)  # [R] slot of each request that samples its first token
        for i, rid in enumerate(req_ids):
            st = self.states.get(rid)
            start, count, plen = int(num_computed[i]), int(num_scheduled[i]), int(num_prompt[i])
            c0, c1 = int(spans[i, 0]), int(spans[i, 1])  # routing span of the prompt
            if st is None:
                st = self._alloc(rid, keys[i])
                if self.cands.get(rid):
                    new_cands.append((st.slot, self.cands[rid]))
                if opted_out[i]:
                    self._set_decided(st, NO_MEMORY)
                    self.counts["opted_out"] += 1
                elif start > first_on[i]:  # hit on salted blocks (plugin._salt): only identical prompts share them
                    row = self.decisions.get(st.key)
                    if row is not None:
                        self._set_decided(st, row)
                        self.counts["reused"] += 1
                    else:
                        self.counts["partial_prefix"] += 1
                    if row is None and not self.partial_prefix_warned:
                        self.partial_prefix_warned = True
                        log.warning("memoir: a request started at token %d with no remembered decision for its "
                                    "prompt; it is routed from its uncached prompt tokens only", start)
                elif start > 0:  # only the memory-free blocks before its routing span were cached (shared)
                    self.counts["shared_prefix"] += 1
                if not st.decided and subject_rule and not self.cands.get(rid):  # names no edited subject: the
                    self._set_decided(st, NO_MEMORY)  # base model, known at admission
                    self.counts["no_candidate"] += 1
                    self.counts["decided"] += 1
                if not st.decided:
                    fresh.append(st.slot)
            slots[i] = st.slot
            gens[i] = st.gen
            if start + count == plen:  # its prompt completes now: the token sampled after it is its first
                first[i] = st.slot
            if start < st.next_pos:  # preempted, now recomputed from its start (or from cached blocks)
                self.counts["recomputed"] += 1
            if not st.decided and not st.pending_readback:
                if st.n_prompt_seen and start != st.next_pos:  # preempted mid-prompt and recomputed: start over
                    self.acc[st.slot].zero_()
                    st.n_prompt_seen = 0
                undecided[i] = True
                seen = max(0, min(start + count, c1) - max(start, c0))
                st.n_prompt_seen += seen
                if start + count >= plen:
                    if st.n_prompt_seen > count:
                        self.counts["chunked"] += 1
                    decide.append(st.slot)
                    decide_n.append(float(max(st.n_prompt_seen, 1)))
                    decide_last.append(int(offsets[i]) + max(c1 - 1 - start, 0))
                    st.pending_readback = True
                    need_memory = True
            elif st.pending_readback or st.row >= 0:
                need_memory = True
            st.next_pos = start + count
            if present is not None and st.gen == self.gen:  # decided: its edit's shard; deciding: its candidates'
                rows = [st.row] if st.decided else [c for c, _ in self.cands.get(rid, ())]
                present.update(self._row_shard[r] for r in rows if 0 <= r < len(self._row_shard))
        total = int(num_scheduled[:n].sum())
        if total > self.max_tokens:
            raise RuntimeError(f"memoir: {total} tokens in one step, buffers hold {self.max_tokens}")
        per_tok = np.repeat(slots, num_scheduled[:n])  # [T]
        tok_pos = np.repeat(num_computed[:n], num_scheduled[:n]) + _aranges(num_scheduled[:n])  # [T]
        tok_c0 = np.repeat(spans[:n, 0], num_scheduled[:n])  # [T]
        tok_c1 = np.repeat(spans[:n, 1], num_scheduled[:n])  # [T]
        tok_und = np.repeat(undecided, num_scheduled[:n])  # [T]
        self._tok_slot_host[:total] = torch.from_numpy(per_tok)
        self._tok_slot_host[total:] = NO_MEMORY
        self._tok_prompt_host[:total] = torch.from_numpy(tok_und & (tok_pos >= tok_c0) & (tok_pos < tok_c1))
        self._tok_prompt_host[total:] = False
        self._tok_on_host[:total] = torch.from_numpy(tok_pos >= np.repeat(first_on, num_scheduled[:n]))
        self._tok_on_host[total:] = True
        self.tok_slot.copy_(self._tok_slot_host, non_blocking=True)
        self.tok_prompt.copy_(self._tok_prompt_host, non_blocking=True)
        self.tok_on.copy_(self._tok_on_host, non_blocking=True)
        if new_cands:  # one batched write of the new requests' candidate rows
            idx = torch.tensor([s for s, _ in new_cands], dtype=torch.int64, device=self.device)
            self.slot_cand[idx] = candidate_rows([c for _, c in new_cands], MAX_CANDIDATES).to(self.device)
        if fresh:  # one batched write instead of one per request (each is a kernel launch on a GPU)
            self.slot_row[torch.tensor(fresh, dtype=torch.int64, device=self.device)] = UNDECIDED
        if decide:
            dec = torch.tensor(decide, dtype=torch.int64)
            self.n_prompt[dec.to(self.device)] = torch.tensor(decide_n, device=self.device)
            self.dec_slots[: len(decide)].copy_(dec, non_blocking=True)
            self.dec_last[: len(decide)].copy_(torch.tensor(decide_last, dtype=torch.int64), non_blocking=True)
        if self.memory.end_ids:
            self.logit_slot[:n].copy_(torch.from_numpy(first))
            self._logit_rows = n
        old = tuple((g, self.old_memories[g]) for g in sorted(set(gens.tolist()) - {self.gen}) if g in self.old_memories)
        if old:  # requests routed before a swap: their tokens use their generation's W_m
            self.tok_gen[:total].copy_(torch.from_numpy(np.repeat(gens, num_scheduled[:n])))
        self.plan = StepPlan(armed=True, need_acc=bool(undecided.any()), n_decide=len(decide), need_memory=need_memory,
                             old=old, shards=tuple(sorted(present)) if present is not None else None)

    def nonempty(self, logits: torch.Tensor) -> torch.Tensor:
        """This step's sampled logits [R, V] (one row per request, in prepare()'s order) with the end tokens
        blocked for the requests that sample their first token and routed (config.nonempty_answers; the
        decisions are read on the device, after the forward that made them). Once per prepare(); any other
        call (prompt logprobs, more rows than requests) passes through."""
        n, self._logit_rows = self._logit_rows, 0
        if not n or logits.shape[0] != n:
            return logits
        slots = self.logit_slot[:n]
        routed = (slots >= 0) & (self.slot_row[slots.clamp_min(0)] >= 0)
        if self._ends[0] != self.memory.end_ids:  # made once per memory, not copied to the device every step
            self._ends = (self.memory.end_ids, torch.tensor(self.memory.end_ids, dtype=torch.int64, device=self.device))
        return block_end_tokens(logits, routed, self._ends[1])


def _aranges(counts: np.ndarray) -> np.ndarray:
    """[2, 3] -> [0, 1, 0, 1, 2]."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)
