"""Offline capability-retention checks: the edited model against itself with the memory off.

- NQ accuracy: teacher-forced token accuracy of `loc_ans` after `loc` on ZsRE's Natural Questions items;
- unrelated-text perplexity: perplexity of `locality_ground_truth` after `locality_prompt` on
  hallucination-train (text that is not in any evaluation stream).
Each with the memory on and off, the paired delta (on - off) and its standard error.
"""
from __future__ import annotations

import logging
from typing import Any

from .data import load_records
from .metrics import mean_stderr
from .scoring import score_rows

log = logging.getLogger(__name__)


def _paired(on: list[float], off: list[float]) -> dict[str, Any]:
    m_on, se_on = mean_stderr(on)
    m_off, se_off = mean_stderr(off)
    d, se_d = mean_stderr([a - b for a, b in zip(on, off)])
    return dict(memory_on=m_on, memory_on_stderr=se_on, memory_off=m_off, memory_off_stderr=se_off, delta=d,
                delta_stderr=se_d, within_stderr=abs(d) <= max(se_d, 1e-12) or d == 0.0, n=len(on))


def retention(m, limit: int | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Retention report for a Memoir (memory on vs off) on NQ items and unrelated text."""
    out: dict[str, Any] = dict(n_edits=m.memory.n_edits, tau=m.memory.tau)
    nq = [r for r in load_records("zsre", limit=limit) if r.has_loc]
    args = ([r.loc_prompt for r in nq], [r.loc_answer for r in nq])
    on = score_rows(m, *args, use_memory=True, batch_size=batch_size, desc="NQ, memory on")
    off = score_rows(m, *args, use_memory=False, batch_size=batch_size, desc="NQ, memory off")
    out["nq_accuracy"] = _paired(on.acc, off.acc) | dict(routed=sum(r >= 0 for r in on.row) / len(nq))
    text = [r for r in load_records("hallucination-train", limit=limit) if r.has_loc]
    args = ([r.loc_prompt for r in text], [r.loc_answer for r in text])
    on = score_rows(m, *args, use_memory=True, want_ppl=True, batch_size=batch_size, desc="text PPL, memory on")
    off = score_rows(m, *args, use_memory=False, want_ppl=True, batch_size=batch_size,
                     desc="text PPL, memory off")
    out["unrelated_ppl"] = _paired(on.ppl, off.ppl) | dict(routed=sum(r >= 0 for r in on.row) / len(text))
    return out
