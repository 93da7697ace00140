"""Long streams measured in less time: train only some edits, write the others for routing alone.

    train = parse_slices("0:100,900:1000", 1000)       # the oldest and the newest 100 of 1,000
    edit_stream(m, requests, set(train))               # 200 edits trained, 800 written for routing alone
    rows = sampled_rows(rows, set(train))              # evaluation rows of the trained edits

An edit written for routing alone has its mask and subject stored like any other and no training step: its
columns stay zero. It competes for every request as a trained edit does, since routing reads the unedited
model's activations, never W_m. Under free columns an edit's answer depends on its own columns and on routing
alone, so a trained edit answers as it would in a store where every edit was trained, less the weight decay the
later edits of its shard would have applied (decoupled, 1e-5 per step: at most (1 - 1e-5)^(30 x 23) = .993 of
its weights). A request routed to an untrained edit has an unknown answer in the full store; the unedited
questions such a request spoils count as changed, so locality from a sampled store is a lower bound.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator, Sequence

from memoir_vllm.edits import EditRequest

# MemoirConfig for an edit written for routing alone: no step, no retry, no statement row (a training row that
# costs a generation; routing reads the plain row alone)
UNTRAINED = {"n_iter": 0, "exact_steps": 0, "retries": 0, "statement_rows": "none"}


def parse_slices(text: str | None, n: int) -> list[int]:
    """'0:100,900:1000' (Python slices of range(n), or single indices) -> the positions they select, in order;
    None or '' -> all n."""
    if not text:
        return list(range(n))
    picked: set[int] = set()
    for part in text.split(","):
        try:
            bounds = [int(b) if b.strip() else None for b in part.split(":")]
        except ValueError:
            raise ValueError(f"--train {text!r}: {part!r} is not a slice; give e.g. 0:100,900:1000") from None
        if len(bounds) == 1:
            bounds = [bounds[0], bounds[0] + 1]
        if len(bounds) > 3:
            raise ValueError(f"--train {text!r}: {part!r} is not a slice; give e.g. 0:100,900:1000")
        picked.update(range(n)[slice(*bounds)])
    if not picked:
        raise ValueError(f"--train {text!r} selects none of the {n} edits; give e.g. 0:100,{n - 100}:{n}")
    return sorted(picked)


@contextlib.contextmanager
def untrained(cfg) -> Iterator[None]:
    """cfg (the editor's MemoirConfig) set for an edit written for routing alone (UNTRAINED)."""
    saved = {k: getattr(cfg, k) for k in UNTRAINED}
    for k, v in UNTRAINED.items():
        setattr(cfg, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(cfg, k, v)


def edit_stream(m, requests: Sequence[EditRequest], train: set[int] | None, start: int = 0,
                after_each: Callable[[int, Any], None] | None = None, progress: bool = True) -> None:
    """Write requests[start:] into the Memoir m in order; position i is trained when i is in `train` (None: all),
    else written for routing alone. after_each(i, result) as in Memoir.edit_many."""
    if train is not None and m.memory.columns != "free":
        raise ValueError(f"training only some edits needs columns='free' (this memory has {m.memory.columns!r}): "
                         "under shared columns later edits retrain earlier ones' columns, which a sampled run "
                         "would not measure; drop --train or use --columns free")
    if train is None:
        m.edit_many(requests[start:], progress=progress, after_each=after_each)
        return
    # runs of trained and untrained positions, each one edit_many
    for trains, run in itertools.groupby(range(start, len(requests)), key=lambda i: i in train):
        i, *rest = run
        with contextlib.nullcontext() if trains else untrained(m.cfg):
            m.edit_many(requests[i : i + 1 + len(rest)], progress=progress,
                        after_each=None if after_each is None else (lambda k, r, i=i: after_each(i + k, r)))


def unknown(routed: int | None, train: set[int]) -> bool:
    """Whether a request routed to edit `routed` (None or -1: to none) reached an untrained edit, whose answer in
    the fully trained store is unknown: an unedited question that did counts as changed."""
    return routed is not None and routed >= 0 and routed not in train


def sampled_rows(rows: list[dict[str, Any]], train: set[int]) -> list[dict[str, Any]]:
    """The evaluation rows (one per edit, in stream order) of the trained edits; an unrelated prompt or a
    neighbour question routed to an untrained edit counts as changed (loc 0, neigh_changed 1): a lower bound."""
    out = []
    for j, row in enumerate(rows):
        if j not in train:
            continue
        row = dict(row, position=j)
        if unknown(row.get("loc_row"), train):
            row["loc"] = 0.0
        if unknown(row.get("neigh_row"), train) and "neigh_changed" in row:
            row["neigh_changed"] = 1.0
        out.append(row)
    return out
