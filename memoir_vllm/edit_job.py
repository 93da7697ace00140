"""`memoir edit`: a sequential edit job over a file, with periodic snapshots and resume."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .edits import EditRequest, load_edits
from .session import Memoir
from .snapshot import EditRecord, latest_version
from .store_lock import write_lock
from .routing.subjects import normalize

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


def already_stored(done: list[EditRecord], requests: list[EditRequest]) -> list[bool]:
    """Per request: the store already holds this edit (same prompt and target; and the same subject when the
    request gives one), so --append must not apply it twice."""
    held: dict[tuple[str, str], list[frozenset[str]]] = {}
    for rec in done:
        held.setdefault((rec.prompt, rec.target), []).append(frozenset(map(normalize, rec.subject)))
    out = []
    for req in requests:
        subjects = held.get((req.prompt, req.target))
        out.append(subjects is not None and (not req.subject or frozenset(map(normalize, req.subject)) in subjects))
    return out


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
    progress: bool = True, append: bool = False, wait: bool = False,
) -> dict[str, Any]:
    """Edit every record of `edits` into the store `out`; returns a summary.

    A snapshot version is written every `every` edits and at the end. With resume=True the job
    continues after the newest version in `out`, checking that its edits are the file's first ones.
    With append=True the file's edits are added to an existing store (its settings kept); those it already
    holds (already_stored) are reported and skipped, so an interrupted append is finished by running it again.
    The store's write lock is held throughout: another writer fails at once (wait=True: waits).
    """
    if every < 1:
        raise ValueError(f"--checkpoint-every {every}: give a positive number of edits")
    if append and resume:
        raise ValueError("--append and --resume: give one (--append also finishes an interrupted append)")
    requests = load_edits(edits)[:limit]
    with write_lock(out, wait=wait):
        return _run_locked(model, requests, out, resume, every, background, settings, progress, append)


def _run_locked(model, requests, out, resume, every, background, settings, progress, append) -> dict[str, Any]:
    latest = latest_version(out)
    if append and latest is None:
        raise ValueError(f"{out} holds no snapshot to append to: drop --append to start a new store there")
    if latest is not None and not (resume or append):
        raise ValueError(f"{out} already holds snapshot {latest.name}: pass --append to add this file's edits to it, "
                         "--resume to continue the job that wrote it, or choose a new --out")
    skipped = 0
    if latest is not None:
        if settings:
            log.warning("%s: the snapshot's settings are kept, ignoring %s", "appending" if append else "resuming",
                        sorted(settings))
        m = Memoir.from_snapshot(out, model=model)
        if append:
            held = already_stored(m.edits, requests)
            skipped = sum(held)
            for req in [r for r, h in zip(requests, held) if h][:20]:
                log.info("already in %s, not applied again: %r -> %r", latest.name, req.prompt[:60], req.target)
            requests = [r for r, h in zip(requests, held) if not h]
            log.info("appending %d edits to %s (%d edits; %d of the file already there)", len(requests), latest.name,
                     len(m.edits), skipped)
        else:
            check_resumable(m.edits, requests)
            log.info("resuming %s after %d of %d edits", latest.name, len(m.edits), len(requests))
    else:
        m = Memoir.create(model or "default", background=read_background(background), **(settings or {}))
    start = 0 if append else len(m.edits)
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
    if saved["path"] is None or (todo and (start + len(todo)) % every != 0):  # the last edits since a checkpoint
        saved["path"] = m.save(out)
    return {
        "snapshot": str(saved["path"]),
        "edits_total": len(m.edits),
        "edits_this_run": len(results),
        "resumed_after": start,
        "already_in_store": skipped,  # --append: edits of the file the store held already (not applied again)
        "seconds": round(seconds, 2),
        "edits_per_s": round(len(results) / seconds, 3) if results else None,
        "mean_steps": round(sum(r.steps for r in results) / len(results), 2) if results else None,
        "mean_final_loss": round(sum(r.losses[-1] for r in results) / len(results), 4) if results else None,
        "routing": m.memory.rule,
        "superseded": sum(len(r.superseded) for r in results),  # older edits of a question edited again
        "subjects_found": len(found),  # edits without a subject in the file: memoir's rule found one
        "subjects_found_first": [{"prompt": p, "subject": s} for p, s in found[:5]],
    }
