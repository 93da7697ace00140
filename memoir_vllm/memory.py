"""ResidualMemory: W_m beside one FFN down-projection, its TopHash permutation, background mean and mask index.

    out = W_0 a + W_m[shard] (M ⊙ a)        M: the matched edit's mask, or no memory term at all

The one routing rule lives here, for every caller (the transformers layer, the vLLM op, calibration):

    rule "mask" (the paper's):
        pooled prompt -> feature() -> decide(): TopHash mask -> best active match -> routed iff ratio >= tau
    rule "subject" (the default for new memories):
        request text -> candidates(): the edits whose subject the text names (subjects.SubjectGate) and, with
        the second stage, whose question it asks (answer_type: both ask for the same kind of answer,
        routing/answer_type.py; the encoder check: cosine of the request's and the edit prompt's sentence vectors, the
        subject masked in both, >= check_tau; best cosine first)
        pooled prompt -> feature() -> decide(candidates): TopHash mask -> best active candidate (ties: the
        newest) -> routed iff ratio >= subject_tau; no candidate, no memory term. Under columns "free" (each
        edit writes columns no other edit of its shard wrote, free_columns_for) the mask is no routing key:
        the first active candidate routes
    memory_term(acts, decision masks, shards)      shared columns: one masked matmul per shard present
    column_term(acts, cols, column_table(rows))    free columns: each routed token reads its edit's k columns
                                                   alone, whatever the number of shards

`decide` runs on the memory's device with fixed shapes and no host sync, so the vLLM op can call it
inside a forward. Everything is a buffer (or W_m a parameter), so `state_dict()` is the whole memory.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .routing.answer_type import needed_cosine, same_answer_type
from .chat import ChatMarks, routing_span
from .routing.index import MaskIndex, unpack_masks
from .routing.subjects import SubjectGate, mask_subject, normalize
from .routing.tophash import Pooled, feature_from_pool, indices_to_mask, make_permutation, pool_prompt, tophash

log = logging.getLogger(__name__)

NO_EDIT = -1  # decision row of a request served by the base model
MAX_CANDIDATES = 32  # candidate rows per request under the subject rule (the newest when more edits match)


def candidate_rows(scored: list[list[tuple[int, float | None]]], width: int | None = None) -> torch.Tensor:
    """Per-text candidates (ResidualMemory.candidate_scores) as rows [B, C] int64, -1 padded, in decision order.
    width: C (default: the most any text has, at most MAX_CANDIDATES); a text with more keeps its first C."""
    c = width if width is not None else min(max([len(s) for s in scored] + [1]), MAX_CANDIDATES)
    out = torch.full((len(scored), c), NO_EDIT, dtype=torch.int64)
    for i, s in enumerate(scored):
        rows = [r for r, _ in s[:c]]
        out[i, : len(rows)] = torch.tensor(rows, dtype=torch.int64)
    return out


def starts_at_content(memory_start: str, marks: ChatMarks | None) -> bool:
    """Whether a routed request's memory term starts at its routing span (memory_start "content" with chat marks;
    a raw prompt's span starts at its first token, so there is nothing to gate)."""
    return memory_start == "content" and marks is not None


def memory_from(prompt_ids: list[int], marks: ChatMarks | None, memory_start: str) -> int:
    """The first token of a prompt that gets the memory term when routed: its routing span's start when
    starts_at_content, else 0. The engine core reads it to key the prefix cache (vllm/plugin.py)."""
    return routing_span(prompt_ids, marks)[0] if starts_at_content(memory_start, marks) else 0


def mask_columns(masks: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] int64: the columns of masks [B, D] bool that hold k ones each, ascending (fixed shapes, no sync)."""
    return torch.sort(masks.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]


def column_term(acts: torch.Tensor, cols: torch.Tensor, table: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """The free-columns memory term of tokens acts [N, D]: token t reads its edit's columns cols[t] [k] with the
    weights table[which[t]] [k, d_model] (ResidualMemory.column_table): sum_j table[which[t], j] * acts[t, cols[t, j]].
    One embedding bag over the gathered weights (vLLM's per-token LoRA term, on any device): the cost follows the
    tokens and k, never the number of shards. Returns [N, d_model] in acts' dtype."""
    k, d_model = table.shape[1], table.shape[2]
    weights = acts.gather(1, cols).to(table.dtype)  # [N, k]
    bags = which.unsqueeze(1) * k + torch.arange(k, device=acts.device)  # [N, k] rows of the flat table
    return F.embedding_bag(bags, table.reshape(-1, d_model), per_sample_weights=weights, mode="sum").to(acts.dtype)


def from_span(route_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions at or after each row's first routing token, where a routed row gets the memory
    term when the memory gates_content (left padding and a chat prompt's system prompt and header come before)."""
    return route_mask.to(torch.int64).cumsum(1) > 0


@dataclass
class Decision:
    """The routing of a batch of rows, all on the memory's device."""

    row: torch.Tensor  # [B] int64 matched index row, -1 = base model
    best: torch.Tensor  # [B] int64 best active row regardless of tau (-1 if none)
    ratio: torch.Tensor  # [B] float32 overlap / k of the best row
    mask: torch.Tensor  # [B, D] bool mask of the matched row (all False when not routed)
    shard: torch.Tensor  # [B] int64 W_m shard of the matched row (0 when not routed)
    mask_idx: torch.Tensor  # [B, k] int64 the rows' own TopHash masks
    cols: torch.Tensor | None = None  # [B, k] int64 free columns: the matched edit's columns (ascending; any when
    # not routed, its column_table row is zero)

    @property
    def routed(self) -> torch.Tensor:
        return self.row >= 0  # [B] bool

    def select(self, rows: torch.Tensor) -> "Decision":
        """The decisions of the batch rows `rows` [b] alone."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return Decision(*(None if v is None else v[rows] for v in values))


class ResidualMemory(nn.Module):
    """The editable memory of one layer.

    Args:
        d_model: output width of the down-projection.
        d_inner: its input width D (FFN hidden size).
        k: ones per TopHash mask.
        tau: routing threshold on overlap / k.
        seed: seed of the stored permutation.
        feature: prompt feature kind (mean_decentered by default).
        n_shards: number of independent W_m (1 = one memory; Ray jobs use more).
        rule: "mask" (the paper's routing over all edits) or "subject" (only edits whose subject the request
            names are candidates; see the module docstring).
        subject_tau: threshold on overlap / k among the candidates (rule "subject").
        subject_check, check_tau: "encoder" keeps a candidate whose sentence-encoder cosine with the request is
            >= check_tau (routing/encoder.py); "none" keeps every candidate.
        answer_type: keep a candidate only if it and the request do not ask for different kinds of answer
            (routing/answer_type.py: who / when / where / how many); applies before the encoder check.
        untyped_tau: with answer_type and the encoder check, the cosine a candidate needs when only one of the two
            questions names a kind of answer ("In which museum is X?" against "Who painted X?"); the stricter of it
            and check_tau applies; 0: check_tau alone.
        marks: the chat template's marks when edits were made in the chat format (prompts then route from
            their last user message's content: chat.routing_span); None routes every prompt from all its tokens.
        mask_key: "subject" (with the subject rule): each edit's mask is its TopHash relabelled by a key drawn
            from its subject (keyed), so edits of one relation about different subjects use nearly disjoint
            columns of W_m instead of nearly the same ones, while overlaps among one subject's edits, and so
            every routing decision, stay exactly as without; "none": the paper's masks.
        columns: "shared" (the paper's): an edit writes the columns of its TopHash mask; "free" (with the subject
            rule): the k columns of largest |feature| no other edit of its shard wrote (free_columns), and a request
            takes its first candidate (the second stage's best) with no mask overlap, so edits share no column.
        memory_start: "content": a routed request gets the memory term from its routing span's first token on
            (memory_from, starts_at_content), so the tokens before it (a system prompt, the template header) are the base model's;
            "all": at every token (the reference). The same for raw prompts.
        end_ids: the tokens that end an answer (tokens.end_token_ids), which a routed request's first generated
            token may not be (config.nonempty_answers); empty: any first token (the reference).
    """

    def __init__(
        self,
        d_model: int,
        d_inner: int,
        k: int,
        tau: float = 0.5,
        seed: int = 0,
        feature: str = "mean_decentered",
        n_shards: int = 1,
        dtype: torch.dtype = torch.float32,
        rule: str = "mask",
        subject_tau: float = 0.3,
        subject_check: str = "none",
        check_tau: float = 0.7,
        marks: ChatMarks | None = None,
        memory_start: str = "all",
        mask_key: str = "none",
        answer_type: bool = False,
        untyped_tau: float = 0.0,
        columns: str = "shared",
        end_ids: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if k > d_inner:
            raise ValueError(f"k={k} is larger than the FFN width D={d_inner}: choose k <= D")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau={tau} is outside [0, 1]")
        if rule not in ("mask", "subject"):
            raise ValueError(f"routing rule {rule!r}: use 'subject' or 'mask'")
        self.d_model, self.d_inner, self.k = d_model, d_inner, k
        self.tau, self.seed, self.feature = tau, seed, feature
        self.marks = marks
        if memory_start not in ("content", "all"):
            raise ValueError(f"memory_start {memory_start!r}: use 'content' or 'all'")
        self.memory_start = memory_start
        if mask_key not in ("subject", "none"):
            raise ValueError(f"mask_key {mask_key!r}: use 'subject' or 'none'")
        self.mask_key = mask_key
        if columns not in ("shared", "free"):
            raise ValueError(f"columns {columns!r}: use 'shared' or 'free'")
        if columns == "free" and rule != "subject":
            raise ValueError("columns='free' needs the subject rule (rule='subject'): free columns are no routing key")
        self.columns = columns
        self.end_ids = tuple(int(t) for t in end_ids)
        self.weight = nn.Parameter(torch.zeros(n_shards, d_model, d_inner, dtype=dtype))  # [S, d_model, D]
        self._trained: tuple[int, nn.Parameter] | None = None  # (shard, its trainable copy) while an edit trains
        self.register_buffer("perm", make_permutation(d_inner, seed))  # [D]
        self.register_buffer("perm_inv", torch.argsort(self.perm))  # [D]: perm_inv[perm[i]] = i
        self.register_buffer("background", torch.zeros(d_inner))  # [D]
        self.index = MaskIndex(d_inner, k)
        if subject_check not in ("encoder", "none"):
            raise ValueError(f"subject_check {subject_check!r}: use 'encoder' or 'none'")
        self.rule, self.subject_tau = rule, subject_tau
        self.subject_check, self.check_tau = subject_check, check_tau
        self.answer_type, self.untyped_tau = answer_type, untyped_tau
        self.subjects = SubjectGate()  # row i: the aliases of edit i (kept in step by state.MemoryState)

    @property
    def n_shards(self) -> int:
        return self.weight.shape[0]

    def shard_fill(self) -> list[int]:
        """Edits stored in each shard (active or not), shard 0 first."""
        return torch.bincount(self.index.shards.cpu(), minlength=self.n_shards).tolist()

    def add_shard(self) -> int:
        """Open a new zero W_m after the others (the newest shard is full under a shard budget); returns its index."""
        w = self.weight.detach()
        self.weight = nn.Parameter(torch.cat([w, torch.zeros_like(w[:1])]))
        return self.n_shards - 1

    @contextlib.contextmanager
    def trainable(self, shard: int) -> Iterator[nn.Parameter]:
        """W_m[shard] as a leaf tensor [d_model, D] for an optimizer: memory terms of `shard` read it, and it is
        written back on exit, so a training step costs one shard whatever the number of shards."""
        w = nn.Parameter(self.weight.detach()[shard].clone())
        self._trained = (shard, w)
        try:
            yield w
        finally:
            self._trained = None
            with torch.no_grad():
                self.weight[shard].copy_(w)

    def _shard_weight(self, s: int) -> torch.Tensor:
        """W_m[s] [d_model, D]: the trainable copy while `trainable(s)` is open."""
        return self._trained[1] if self._trained is not None and self._trained[0] == s else self.weight[s]

    @property
    def n_edits(self) -> int:
        return len(self.index)

    # -- routing --------------------------------------------------------------------------------

    def routing_span(self, prompt_ids: list[int]) -> tuple[int, int]:
        """[start, end) of the prompt tokens a prompt routes from (chat.routing_span with this memory's marks)."""
        return routing_span(prompt_ids, self.marks)

    @property
    def gates_content(self) -> bool:
        """True when the memory term starts at the routing span (starts_at_content)."""
        return starts_at_content(self.memory_start, self.marks)

    def feature_of(self, pooled: Pooled) -> torch.Tensor:
        """The routing feature [B, D] float32 of pooled routing tokens."""
        return feature_from_pool(pooled, self.background, self.feature)

    def masks_from_acts(self, acts: torch.Tensor, prompt_mask: torch.Tensor, key: int = 0,
                        shard: int = 0) -> torch.Tensor:
        """The mask indices [B, k] an edit writes, from activations [B, T, D] over the routing tokens [B, T]:
        its TopHash mask keyed by `key`, or under columns "free" the free columns of `shard` it prefers."""
        feature = self.feature_of(pool_prompt(acts, prompt_mask))  # [B, D]
        if self.columns == "free":
            return self.free_columns_for(feature, shard)
        return self.keyed(tophash(feature, self.k, self.perm), key)

    def written(self, shard: int) -> torch.Tensor:
        """[D] bool: the columns of W_m[shard] some stored edit writes (active or not: its weights are there)."""
        rows = (self.index.shards == shard).nonzero().flatten()
        return self.index.masks(rows).any(0) if len(rows) else torch.zeros(self.d_inner, dtype=torch.bool,
                                                                            device=self.perm.device)

    def n_free(self, shard: int) -> int:
        """Columns of W_m[shard] no stored edit writes."""
        return self.d_inner - int(self.written(shard).sum())

    def free_columns_for(self, feature: torch.Tensor, shard: int) -> torch.Tensor:
        """Indices [B, k], sorted: per feature row [B, D], the k columns of W_m[shard] that no stored edit writes,
        in TopHash order (column pi[i] ranks by |v_i|). Raises when fewer than k are free (open a new shard)."""
        used = self.written(shard)
        if self.d_inner - int(used.sum()) < self.k:
            raise ValueError(f"shard {shard} has {self.d_inner - int(used.sum())} free columns, an edit needs "
                             f"k={self.k}: open a new shard (ResidualMemory.add_shard)")
        score = torch.empty_like(feature)
        score[:, self.perm.to(feature.device)] = feature.abs()  # column pi[i] scores |v_i|
        score[:, used.to(feature.device)] = -1.0
        return score.topk(self.k, dim=-1).indices.sort(dim=-1).values

    def key_of(self, aliases: Sequence[str]) -> int:
        """The mask key of an edit about `aliases`: drawn from its first alias (normalised) under mask_key
        "subject" and the subject rule, else 0 (the paper's mask)."""
        if self.mask_key != "subject" or self.rule != "subject" or not aliases:
            return 0
        digest = hashlib.sha256(normalize(aliases[0]).encode()).digest()
        return int.from_bytes(digest[:8], "little") % self.d_inner

    def keyed(self, mask_idx: torch.Tensor, keys: torch.Tensor | int) -> torch.Tensor:
        """TopHash indices [..., k] relabelled by keys (an int or [...]): pi[(pi^-1[idx] + key) mod D], sorted.
        Key 0 is the identity; one key relabels two masks alike, so their overlap is unchanged."""
        if isinstance(keys, int):
            if keys == 0:
                return mask_idx
            keys = torch.tensor(keys, device=mask_idx.device)
        pos = self.perm_inv.to(mask_idx.device)[mask_idx]  # [..., k] the top-k positions
        shifted = (pos + keys.unsqueeze(-1)) % self.d_inner
        return self.perm.to(mask_idx.device)[shifted].sort(dim=-1).values

    @property
    def threshold_name(self) -> str:
        """The setting a request's overlap / k is held to: subject_tau under the subject rule, else tau."""
        return "subject_tau" if self.rule == "subject" else "tau"

    @property
    def threshold(self) -> float:
        """The overlap / k a request needs to route (the value of threshold_name)."""
        return getattr(self, self.threshold_name)

    def set_threshold(self, tau: float) -> None:
        """Set the routing threshold of this memory's rule (what `memoir ask --tau` and memoir_set_tau change)."""
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau={tau} is outside [0, 1]")
        if self.columns == "free":
            log.warning("%s=%s changes nothing under free columns: no mask overlap routes there (the subject gate "
                        "and the second stage do; its threshold is check_tau)", self.threshold_name, tau)
        setattr(self, self.threshold_name, float(tau))

    def candidates(self, texts: list[str]) -> torch.Tensor | None:
        """Rows [B, C] (-1: none) of each text's candidates in decision order (candidate_scores, candidate_rows);
        None under the mask rule (every edit is a candidate)."""
        if self.rule != "subject":
            return None
        return candidate_rows(self.candidate_scores(texts)).to(self.perm.device)

    def candidate_scores(self, texts: list[str], min_cos: float | None = None) -> list[list[tuple[int, float | None]]]:
        """Per text, the (row, cosine) of its candidates in decision order: the active rows whose subject it
        names, newest first; with the encoder check only those with cosine >= min_cos (default check_tau), best cosine
        first (cosine None without the check). With answer_type, a candidate whose prompt and the text do not both
        name a kind of answer needs the stricter of min_cos and untyped_tau."""
        min_cos = self.check_tau if min_cos is None else min_cos
        untyped_tau = self.untyped_tau if self.answer_type else 0.0
        gate = self.subjects
        rows = [self._active(gate.rows_in(t)) for t in texts]
        if not self.answer_type and self.subject_check != "encoder":
            return [[(r, None) for r in rs] for rs in rows]
        # the text as each candidate's subject masks it (what both stages read): usually one per text
        masked = [[mask_subject(t, gate.aliases[r]) for r in rs] for t, rs in zip(texts, rows)]
        if self.answer_type:
            kept = [[(r, m) for r, m in zip(rs, ms) if same_answer_type(m, gate.masked_prompt(r))]
                    for rs, ms in zip(rows, masked)]
            rows, masked = [[r for r, _ in k] for k in kept], [[m for _, m in k] for k in kept]
        if self.subject_check != "encoder":
            return [[(r, None) for r in rs] for rs in rows]
        from .routing.encoder import sentence_encoder

        self.fill_vectors()
        flat = sorted({m for ms in masked for m in ms})
        vec = dict(zip(flat, sentence_encoder()(flat))) if flat else {}
        out = []
        for rs, ms in zip(rows, masked):
            scored = [(r, float(gate.vectors[r] @ vec[m]),
                       needed_cosine(m, gate.masked_prompt(r), min_cos, untyped_tau)) for r, m in zip(rs, ms)]
            kept = [(r, round(c, 4)) for r, c, needed in scored if c >= needed]
            out.append(sorted(kept, key=lambda rc: -rc[1]))  # stable: equal cosines stay newest first
        return out

    def _active(self, rows: list[int]) -> list[int]:
        """The rows of active edits (disabled and superseded edits are no candidates)."""
        if not rows:
            return rows
        keep = self.index.active[torch.tensor(rows, device=self.index.active.device)].tolist()
        return [r for r, k in zip(rows, keep) if k]

    def fill_vectors(self) -> None:
        """Compute the question vectors the encoder check lacks (new edits, changed subjects), in one batch."""
        gate = self.subjects
        todo = sorted(gate.missing)
        if not todo:
            return
        from .routing.encoder import sentence_encoder

        vecs = sentence_encoder()([gate.masked_prompt(i) for i in todo])
        for i, v in zip(todo, vecs):
            gate.vectors[i] = v
        gate.missing.clear()

    def decide(self, feature: torch.Tensor, candidates: torch.Tensor | None = None) -> Decision:
        """Route features [B, D]: TopHash, best active stored mask (among `candidates` [B, C] rows when given,
        -1 = none), routed iff overlap / k >= threshold.

        On the memory's device, fixed shapes, no host sync (callable inside a vLLM forward).
        """
        mask_idx = tophash(feature, self.k, self.perm)  # [B, k]
        return self.decide_masks(mask_idx, candidates)

    def decide_masks(self, mask_idx: torch.Tensor, candidates: torch.Tensor | None = None) -> Decision:
        """decide() for query masks given as indices [B, k]. Under the subject rule, candidates None means
        no text was seen, hence no candidate: every row gets the base model."""
        b, dev = mask_idx.shape[0], self.perm.device
        if candidates is None and self.rule == "subject":
            candidates = torch.full((b, 0), NO_EDIT, dtype=torch.int64, device=dev)
        none = torch.full((b,), NO_EDIT, dtype=torch.int64, device=dev)
        if len(self.index) == 0 or (candidates is not None and candidates.shape[1] == 0):
            zeros = torch.zeros(b, dtype=torch.int64, device=dev)
            empty = torch.zeros(b, self.d_inner, dtype=torch.bool, device=dev)
            cols = mask_columns(empty, self.k) if self.columns == "free" else None
            return Decision(none, none, torch.zeros(b, device=dev), empty, zeros, mask_idx, cols)
        query = indices_to_mask(mask_idx, self.d_inner)  # [B, D] bool
        if candidates is None:
            top, best = self.index.overlaps(query).max(dim=1)  # [B]; -1 = inactive
            tau = self.tau
        else:
            top, best = self._best_candidate(mask_idx, candidates.to(dev))
            tau = self.threshold
        best = torch.where(top >= 0, best, none)
        ratio = top.clamp_min(0).float() / self.k
        row = torch.where(ratio >= tau, best, none)
        safe = row.clamp_min(0)
        mask = self.index.masks(safe) & (row >= 0).unsqueeze(1)  # [B, D]
        cols = mask_columns(mask, self.k) if self.columns == "free" else None
        return Decision(row, best, ratio, mask, self.index.shards[safe] * (row >= 0), mask_idx, cols)

    def _best_candidate(self, mask_idx: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(overlap [B] int, -1 if no active candidate; row [B]) of the best of the candidate rows [B, C];
        ties go to the first candidate (the newest). Reads only the candidates' masks, each against the query
        mask [B, k] keyed as that candidate's (keyed)."""
        b, c = cand.shape
        safe = cand.clamp(0, len(self.index) - 1)
        valid = (cand >= 0) & (cand < len(self.index)) & self.index.active[safe]  # [B, C]
        if self.columns == "free":  # no overlap to read: the first valid candidate (the second stage's best)
            ov = torch.full_like(cand, self.k).masked_fill(~valid, -1)  # [B, C]
        else:
            masks = unpack_masks(self.index.packed[safe.flatten()], self.d_inner).view(b, c, -1)  # [B, C, D]
            q_idx = self.keyed(mask_idx.unsqueeze(1).expand(b, c, -1), self.index.keys[safe])  # [B, C, k]
            query = torch.zeros(b, c, self.d_inner, dtype=torch.bool, device=masks.device).scatter_(2, q_idx, True)
            ov = (masks & query).sum(-1).masked_fill(~valid, -1)  # [B, C]
        top, j = ov.max(dim=1)
        return top, cand.gather(1, j.unsqueeze(1)).squeeze(1)

    def route(self, mask_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row [B] (-1 = base model), best row [B], ratio [B]) of query masks [B, k]; see decide()."""
        d = self.decide_masks(mask_idx)
        return d.row, d.best, d.ratio

    def add_edit(self, mask_idx: torch.Tensor, edit_id: int | None = None, shard: int = 0, key: int = 0) -> int:
        """Store one edit's mask (indices [k], already keyed by `key`); returns its edit id."""
        edit_id = self.n_edits if edit_id is None else edit_id
        mask = indices_to_mask(mask_idx.view(1, -1), self.d_inner)
        self.index.add(mask, torch.tensor([edit_id]), torch.tensor([shard]), torch.tensor([key]))
        return edit_id

    # -- the memory term ------------------------------------------------------------------------

    def memory_term(self, acts: torch.Tensor, masks: torch.Tensor, shards: torch.Tensor | int = 0,
                    present: Sequence[int] | None = None) -> torch.Tensor:
        """W_m[shard] (M ⊙ a): acts [..., D], masks broadcastable to acts (bool or 0/1), shards an int for
        every token or a tensor of acts.shape[:-1]. Returns [..., d_model] in acts' dtype.

        With several shards each token takes its own shard's W_m: one masked matmul per shard (fixed
        shapes, no host sync). present: the only shards that tokens with a nonzero mask can be in (known to the
        caller's host side), so the cost follows the shards in use, not the number stored; None: any.
        """
        masked = acts * masks.to(acts.dtype)  # [..., D]
        if present is not None and len(present) == 1:
            shards = int(present[0])  # every token with a mask is in this shard: one matmul
        if isinstance(shards, int) or self.n_shards == 1:
            s = shards if isinstance(shards, int) else 0
            return masked @ self._shard_weight(s).to(acts.dtype).T  # [..., d_model]
        out = torch.zeros(*acts.shape[:-1], self.d_model, dtype=acts.dtype, device=acts.device)
        for s in (range(self.n_shards) if present is None else present):
            out = out + (masked * (shards == s).unsqueeze(-1).to(acts.dtype)) @ self._shard_weight(s).to(acts.dtype).T
        return out

    def column_table(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """[B, k, d_model]: the weights decided rows [B] (-1: none, a zero row) read at their columns cols [B, k]
        (Decision.cols), W_m[shard][:, cols].T, gathered once per decision for column_term."""
        shard = self.index.shards[rows.clamp_min(0)]  # [B]
        table = self.weight.detach()[shard.unsqueeze(1), :, cols]  # [B, k, d_model]
        return table * (rows >= 0).view(-1, 1, 1).to(table.dtype)

    def routed_term(self, acts: torch.Tensor, d: Decision) -> torch.Tensor:
        """The memory term of rows acts [B, T, D] routed by `d` (a Decision of those B rows): [B, T, d_model]."""
        if d.cols is None:
            return self.delta(acts, d.mask, d.shard)
        b, t, _ = acts.shape
        which = torch.arange(b, device=acts.device).repeat_interleave(t)  # [B*T] the row of each token
        table = self.column_table(d.row, d.cols)
        return column_term(acts.reshape(b * t, -1), d.cols[which], table, which).view(b, t, -1)

    def delta(self, acts: torch.Tensor, masks: torch.Tensor, shards: torch.Tensor | int = 0) -> torch.Tensor:
        """Memory term for acts [B, T, D] with one mask [B, D] and shard [B] (or an int) per row."""
        per_token = shards if isinstance(shards, int) else shards.view(-1, 1).expand(acts.shape[:-1])
        return self.memory_term(acts, masks.unsqueeze(1), per_token)


    def empty_like(self, n_shards: int | None = None) -> "ResidualMemory":
        """A zero memory with this one's settings, permutation and background, and no edits."""
        fresh = ResidualMemory(self.d_model, self.d_inner, self.k, self.tau, self.seed, self.feature,
                               n_shards=self.n_shards if n_shards is None else n_shards, dtype=self.weight.dtype,
                               rule=self.rule, subject_tau=self.subject_tau, subject_check=self.subject_check,
                               check_tau=self.check_tau, answer_type=self.answer_type, untyped_tau=self.untyped_tau,
                               marks=self.marks,
                               memory_start=self.memory_start, mask_key=self.mask_key, columns=self.columns,
                               end_ids=self.end_ids)
        fresh.background.copy_(self.background)
        return fresh.to(self.perm.device)


def empty_memory(d_model: int, d_inner: int, cfg, n_shards: int = 1, dtype: torch.dtype = torch.float32,
                 marks: ChatMarks | None = None, end_ids: tuple[int, ...] = ()) -> ResidualMemory:
    """A fresh, zero memory for a resolved MemoirConfig (layer and k set); the one constructor callers use.
    marks: the tokenizer's chat marks, required when cfg.prompt_format is "chat"; end_ids: the tokenizer's
    tokens.end_token_ids, kept when cfg.nonempty_answers."""
    if cfg.prompt_format == "chat" and marks is None:
        raise ValueError("prompt_format='chat' needs the tokenizer's chat marks (chat.chat_marks(tok))")
    return ResidualMemory(d_model, d_inner, cfg.k, cfg.tau, cfg.seed, cfg.feature, n_shards=n_shards, dtype=dtype,
                          rule=cfg.routing, subject_tau=cfg.subject_tau, subject_check=cfg.subject_check,
                          check_tau=cfg.check_tau, answer_type=cfg.answer_type, untyped_tau=cfg.untyped_tau,
                          marks=marks if cfg.prompt_format == "chat" else None, memory_start=cfg.memory_start,
                          mask_key=cfg.mask_key, columns=cfg.columns,
                          end_ids=end_ids if cfg.nonempty_answers else ())
