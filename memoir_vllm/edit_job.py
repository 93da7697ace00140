"""`memoir edit`: a sequential edit job over a file, with periodic snapshots and resume."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .edits import EditRequest, load_edits
from .session import Memoir
from .snapshot import EditRecord, latest_version

log = logging.getLogger(__name__)


def check_resumable(done: list[EditRecord], requests: list[EditRequest]) -> None:
    """The snapshot's edits must be the first edits of the file, in order, so none is applied twice."""
    if len(done) > len(requests):
        raise ValueError(f"the snapshot holds {len(done)} edits but the edit file has only {len(requests)}: "
                         "resume with the file the job started with")
    for i, (rec, req) in enumerate(zip(done, requests)):
        if (rec.prompt, rec.target) != (req.prompt, req.target):
            raise ValueError(f"the snapshot's edit {i} ({rec.prompt[:40]!r} -> {rec.target!r}) differs from the edit "
                             f"file's record {i} ({req.prompt[:40]!r}): resume with the same file, or use a new --out")


def read_background(path: str | Path | None) -> list[str] | None:
    if path is None:
        return None
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"background file {path} has no lines: give one unrelated prompt per line")
    return lines


def run_edit_job(
    model: str | None, edits: str | Path, out: str | Path, resume: bool = False, every: int = 50,
    limit: int | None = None, background: str | Path | None = None, settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Edit every record of `edits` into the store `out`; returns a summary.

    A snapshot version is written every `every` edits and at the end. With resume=True the job
    continues after the newest version in `out`, checking that its edits are the file's first ones.
    """
    if every < 1:
        raise ValueError(f"--checkpoint-every {every}: give a positive number of edits")
    requests = load_edits(edits)[:limit]
    latest = latest_version(out)
    if latest is not None and not resume:
        raise ValueError(f"{out} already holds snapshot {latest.name}: pass --resume to continue it, or choose a new --out")
    if latest is not None:
        if settings:
            log.warning("resuming: the snapshot's settings are kept, ignoring %s", sorted(settings))
        m = Memoir.from_snapshot(out, model=model)
        check_resumable(m.edits, requests)
        log.info("resuming %s after %d of %d edits", latest.name, len(m.edits), len(requests))
    else:
        m = Memoir.create(model or "default", background=read_background(background), **(settings or {}))
    start = len(m.edits)
    todo = requests[start:]
    saved = {"path": latest}

    def checkpoint(i: int, _res) -> None:
        if (start + i + 1) % every == 0:
            saved["path"] = m.save(out)

    t0 = time.perf_counter()
    results = m.edit_many(todo, progress=progress, after_each=checkpoint)
    found = [(req.prompt, list(res.subject)) for req, res in zip(todo, results) if not req.subject]
    for prompt, subject in found[:20]:
        log.info("subject found for %r: %s", prompt[:60], subject)
    seconds = time.perf_counter() - t0
    if saved["path"] is None or len(m.edits) % every != 0:
        saved["path"] = m.save(out)
    return {
        "snapshot": str(saved["path"]),
        "edits_total": len(m.edits),
        "edits_this_run": len(results),
        "resumed_after": start,
        "seconds": round(seconds, 2),
        "edits_per_s": round(len(results) / seconds, 3) if results else None,
        "mean_steps": round(sum(r.steps for r in results) / len(results), 2) if results else None,
        "mean_final_loss": round(sum(r.losses[-1] for r in results) / len(results), 4) if results else None,
        "routing": m.memory.rule,
        "superseded": sum(len(r.superseded) for r in results),  # older edits of a question edited again
        "subjects_found": len(found),  # edits without a subject in the file: memoir's rule found one
        "subjects_found_first": [{"prompt": p, "subject": s} for p, s in found[:5]],
    }
