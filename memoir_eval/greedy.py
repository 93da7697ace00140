"""A memory's edits asked greedily, per kind of request: the share answered, by age, by position in a shard, empty
and routed to their own edit (what scripts/capacity.py and scripts/nonempty_effect.py report).

    answers_by_kind(m, facts, block=100)
    -> {"edited": .958, "edited_by_age": [.99, ...], "edited_by_shard_position": {...}, "edited_empty": 0.0,
        "edited_routed": 1.0, "paraphrase": .751, ..., "cloze": .089, ...}

facts[i] is edit i of the memory: a dict with its "target" and the requests of KINDS it has (a kind no fact has is
left out). An answer counts when it equals the target (memoir_eval.metrics.answer_match).
"""
from __future__ import annotations

from typing import Any, Sequence

from .age import by_shard_position, in_blocks
from .metrics import answer_match

KINDS = (("edited", "prompt"), ("paraphrase", "rephrase"), ("cloze", "cloze"))  # (name in the report, fact field)


def answers_by_kind(m, facts: list[dict[str, Any]], block: int, max_new_tokens: int = 16,
                    chat: bool | None = None, only: Sequence[int] | None = None) -> dict[str, Any]:
    """Per kind of request: the share answered overall, per `block` edits (oldest first) and per position in a full
    shard, the share of empty answers and of requests routed to their own edit. m: a memoir Memoir;
    chat: ask as one-message chats (default: as the memory was written); only: the edit ids to ask (default all),
    e.g. the trained ones of a store whose other edits were written for routing alone."""
    out: dict[str, Any] = {}
    shards = m.memory.index.shards.tolist()
    ids = range(len(facts)) if only is None else only
    for kind, field in KINDS:
        rows = [(i, facts[i]) for i in ids if facts[i].get(field)]
        if not rows:
            continue
        got = m.ask([f[field] for _, f in rows], max_new_tokens=max_new_tokens, chat=chat)
        ok = [answer_match(a.answer, f["target"]) for a, (_, f) in zip(got, rows)]
        n = len(rows)
        out[kind] = sum(ok) / n
        out[f"{kind}_by_age"] = in_blocks(ok, block)
        out[f"{kind}_by_shard_position"] = by_shard_position(ok, [shards[i] for i, _ in rows])
        out[f"{kind}_empty"] = sum(not a.answer.strip() for a in got) / n
        out[f"{kind}_routed"] = sum(a.edit_id == i for a, (i, _) in zip(got, rows)) / n
    return out
