"""Rel by age: how well a chunk's edits still answer, per block of edits written, oldest first; and the edits
whose question the stream edits again later (a conflict in the data, not forgetting).

    rows = records_T1000.jsonl's rows of one chunk (the protocol's per-edit dicts, in edit order)
    by_age([rows], block=100)           -> [{"edits": "0-99", "n": 100, "rel": .47, "rel_em": ...}, ...]
    edited_again(records, positions)    -> {position: the position of the newest later edit of its question}
    conflict_split([rows], records, [positions]) -> {"edited_again": {...}, "single": {...}}
    in_blocks([1, 1, 0, 1], 2)         -> [1.0, 0.5]
    by_shard_position(ok, shards)       -> {"per_shard": 24, "full_shards": 41, "mean": .96, "by_position": [...]}
"""
from __future__ import annotations

import re
from typing import Any

from .data import EvalRecord
from .metrics import exact_match

AGE_BLOCK = 100  # edits per block of the by-age report
AGE_METRICS = ("rel", "gen", "rel_em", "gen_em", "rel_answer", "para_routed_right", "edit_routed_right")


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def _means(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for k in keys:
        m = _mean([float(r[k]) for r in rows if r.get(k) is not None])
        if m is not None:
            out[k] = m
    return out


def by_age(chunks: list[list[dict[str, Any]]], block: int = AGE_BLOCK) -> list[dict[str, Any]]:
    """Per block of `block` consecutive edits of each chunk (oldest first), the mean of each metric over the
    block's edits of every chunk. Empty when a chunk has fewer than two blocks (nothing to compare)."""
    size = max((len(rows) for rows in chunks), default=0)
    if size < 2 * block:
        return []
    out = []
    for start in range(0, size, block):
        rows = [r for rows in chunks for r in rows[start : start + block]]
        first, last = rows[0].get("position", start), rows[-1].get("position", start + block - 1)  # (sampled rows)
        out.append({"edits": f"{first}-{last}", "n": len(rows), **_means(rows, AGE_METRICS)})
    return out


def in_blocks(values: list[float], block: int) -> list[float]:
    """The mean of each run of `block` consecutive values, oldest first (the last run may be shorter)."""
    return [sum(values[s : s + block]) / len(values[s : s + block]) for s in range(0, len(values), block)]


def by_shard_position(values: list[float], shards: list[int]) -> dict[str, Any]:
    """Values (one per edit, in the order written) by the edit's position in its shard (0: the first edit its
    shard took), over the full shards only (those holding the most edits; the newest shard may be partial).

    Under free columns (a shard takes D // k edits, then never changes) an edit's weights are trained by its
    shard's later edits only, so these figures hold for any number of edits: with per-request routing measured at
    that size, `mean` is the projection of a larger stream's share."""
    fill: dict[int, list[float]] = {}
    for v, s in zip(values, shards):
        fill.setdefault(s, []).append(float(v))
    per_shard = max((len(v) for v in fill.values()), default=0)
    full = [v for v in fill.values() if len(v) == per_shard]
    by_position = [_mean([v[p] for v in full]) for p in range(per_shard)]
    return {"per_shard": per_shard, "full_shards": len(full), "mean": _mean([x for v in full for x in v]),
            "by_position": by_position}


def full_shards(stats: dict[str, Any]) -> str:
    """by_shard_position() in a table cell: '0.962 (41 x 24)', the mean over the full shards, their number, size."""
    return "" if stats["mean"] is None else f"{stats['mean']:.3f} ({stats['full_shards']} x {stats['per_shard']})"


def _question(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def edited_again(records: list[EvalRecord], positions: list[int]) -> dict[int, int]:
    """Edit position -> the position of the newest LATER edit, in the same chunk, of the same question (the same
    prompt, case- and whitespace-insensitive) with another target."""
    newest: dict[str, int] = {}
    out: dict[int, int] = {}
    for i in reversed(positions):
        q = _question(records[i].prompt)
        if q in newest and records[newest[q]].target.strip() != records[i].target.strip():
            out[i] = newest[q]
        newest.setdefault(q, i)
    return out


def conflict_split(chunks: list[list[dict[str, Any]]], records: list[EvalRecord],
                   chunk_positions: list[list[int]]) -> dict[str, Any]:
    """Rel of the edits the stream edits again later ("edited_again", with `newest_em`: the greedy answer is
    the newest target, what supersede should give) against the others ("single")."""
    again_rows, single_rows = [], []
    for rows, positions in zip(chunks, chunk_positions):
        later = edited_again(records, positions)
        for r in rows:
            if r["record"] in later:
                d = dict(r)
                if r.get("rel_text") is not None:
                    d["newest_em"] = exact_match(r["rel_text"], records[later[r["record"]]].target)
                again_rows.append(d)
            else:
                single_rows.append(r)
    keys = ("rel", "gen", "rel_em", "gen_em")
    return {"edited_again": {"n": len(again_rows), **_means(again_rows, keys + ("newest_em",))},
            "single": {"n": len(single_rows), **_means(single_rows, keys)}}


def age_markdown(by_age_rows: list[dict[str, Any]], T: int) -> str:
    """A markdown table of by_age() for one T."""
    if not by_age_rows:
        return ""
    keys = [k for k in AGE_METRICS if any(k in r for r in by_age_rows)]
    lines = [f"Rel by age, T={T} (blocks of edits in the order written, oldest first):", "",
             "| edits | n | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for r in by_age_rows:
        lines.append(f"| {r['edits']} | {r['n']} | " + " | ".join(
            "" if r.get(k) is None else f"{r[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot_by_age(by_age_rows: list[dict[str, Any]], T: int, data: str, path) -> None:
    """rel_by_age_T{T}.png: each metric per block, oldest block left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(len(by_age_rows)))
    for key, name in (("rel", "Rel"), ("gen", "Gen"), ("rel_em", "Rel EM"), ("gen_em", "Gen EM")):
        ys = [r.get(key) for r in by_age_rows]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=name)
    ax.set_xticks(xs, [r["edits"] for r in by_age_rows], rotation=45, ha="right")
    ax.set_xlabel("edits, in the order written (oldest left)")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"{data}, T={T}: Rel by age")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
