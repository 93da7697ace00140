"""EditStream: one sequential edit stream (one memory), the unit of work of a Ray edit job.

A callable class in the style of Ray Data workers: it loads its model and memory in __init__
and maps a batch (a dict of lists) to a dict of lists. It runs the same without a cluster:

    stream = EditStream("out/streams/shard-000", model="default", every=50)
    stream({"edit_id": [0, 2], "prompt": [...], "target": [...], "source": [...]})
    stream.finish()                      # final snapshot of the stream store

A new stream starts an empty memory; a stream whose store already holds snapshots resumes from
the newest one (edits after it are lost and must be sent again). A snapshot version is written
whenever the stream's edit count reaches a multiple of `every`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..edit_job import read_background
from ..session import Memoir
from ..snapshot import latest_version

log = logging.getLogger(__name__)


class EditStream:
    """A single-shard memory written edit by edit, checkpointed to its own snapshot store.

    Args:
        store: the stream's snapshot store (created if missing, resumed if it holds a snapshot).
        model: 'default' or a local HF model directory; None on resume means the snapshot's model.
        settings: MemoirConfig overrides for a new memory (ignored on resume, with a warning).
        background: a text file of unrelated prompts for the background mean (new memory only).
        every: write a snapshot version every `every` edits of this stream.
        threads: torch threads of this worker.
        keep: snapshot versions kept in the store.
    """

    def __init__(self, store: str | Path, model: str | None = None, settings: dict[str, Any] | None = None,
                 background: str | Path | None = None, every: int = 50, threads: int = 1, keep: int = 3) -> None:
        if every < 1:
            raise ValueError(f"every={every}: give a positive number of edits between snapshots")
        torch.set_num_threads(threads)
        self.store, self.every, self.keep = Path(store), every, keep
        if latest_version(self.store) is not None:
            if settings:
                log.warning("resuming %s: the snapshot's settings are kept, ignoring %s", self.store, sorted(settings))
            self.memoir = Memoir.from_snapshot(self.store, model=model)
        else:
            self.memoir = Memoir.create(model or "default", background=read_background(background), **(settings or {}))
        self.saved = len(self.memoir.edits) if latest_version(self.store) is not None else -1

    # -- state ------------------------------------------------------------------------------------

    @property
    def n_edits(self) -> int:
        return len(self.memoir.edits)

    def state(self) -> dict[str, Any]:
        """What the stream holds: global edit ids and (prompt, target) of its edits, its process and model."""
        return {
            "edit_ids": self.memoir.memory.index.edit_ids.tolist(),
            "pairs": [(e.prompt, e.target) for e in self.memoir.edits],
            "pid": os.getpid(),
            "model": self.memoir.model_id(),
        }

    # -- work -------------------------------------------------------------------------------------

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """Edit a batch in order: {edit_id, prompt, target, source, subject} lists -> {edit_id, steps, loss, seconds}.

        Global edit ids must increase past the stream's last one: an edit is never applied twice.
        """
        ids = [int(i) for i in batch["edit_id"]]
        last = int(self.memoir.memory.index.edit_ids[-1]) if self.n_edits else -1
        for i in ids:
            if i <= last:
                raise ValueError(f"edit {i} comes after edit {last} in stream {self.store.name}: "
                                 "edit ids must increase (it is already applied, or the batch is out of order)")
            last = i
        sources = batch.get("source") or [""] * len(ids)
        subjects = batch.get("subject") or [None] * len(ids)
        out: dict[str, list] = {"edit_id": [], "steps": [], "loss": [], "seconds": []}
        for i, prompt, target, source, subject in zip(ids, batch["prompt"], batch["target"], sources, subjects):
            res = self.memoir.edit(prompt, target, source, edit_id=i, subject=subject or None)
            out["edit_id"].append(i)
            out["steps"].append(res.steps)
            out["loss"].append(res.losses[-1] if res.losses else float("nan"))
            out["seconds"].append(res.seconds)
            if self.n_edits % self.every == 0:
                self.checkpoint()
        return out

    def checkpoint(self) -> str:
        """Write the next snapshot version of the stream store (skipped if nothing changed)."""
        if self.saved != self.n_edits:
            self.path = self.memoir.save(self.store, keep=self.keep)
            self.saved = self.n_edits
        return str(latest_version(self.store))

    def finish(self) -> str:
        """The final snapshot of the stream (written if edits are unsaved); returns its version directory."""
        return self.checkpoint()
