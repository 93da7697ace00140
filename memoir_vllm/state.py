"""MemoryState: a residual memory together with its edit records, the unit a snapshot stores.

The memory's index holds one mask per edit (row i), its subject gate the aliases of edit i, and
`edits[i]` the prompt, target and subject written there; `MemoryState` keeps the three in step, so
nothing else has to:

    state = MemoryState(memory, [], cfg, templates, model_identity, module)
    state.record(EditRecord(prompt, target))       # after the editor stored the edit's mask
    save_snapshot(store, state); load_snapshot(store).state
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .config import MemoirConfig
from .memory import ResidualMemory


@dataclass
class EditRecord:
    """What a snapshot remembers of one edit besides its mask."""

    prompt: str
    target: str
    source: str = ""
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    subject: tuple[str, ...] = ()  # the aliases requests name it by (routing/subjects.py); () routes nowhere by subject
    superseded_by: int | None = None  # the newer edit of the same question that retired it from routing


@dataclass
class MemoryState:
    """One layer's memory, its edits and the settings and model it was made with.

    memory: W_m, permutation, background and the mask index (row i = edit i).
    edits: one EditRecord per index row, in index order.
    config: the resolved MemoirConfig the edits were written with.
    templates: the editor's context templates.
    model: the model's identity (models.model_identity plus "path").
    module: the dotted name of the edited down-projection.
    """

    memory: ResidualMemory
    edits: list[EditRecord]
    config: MemoirConfig
    templates: list[str]
    model: dict[str, Any]
    module: str

    def __post_init__(self) -> None:
        gate = self.memory.subjects
        if len(gate) == 0:
            for e in self.edits:
                gate.add(e.subject, e.prompt)
        self.check()

    def check(self) -> None:
        """Raise if the edit records, the stored masks and the subject gate are out of step."""
        if not len(self.edits) == self.memory.n_edits == len(self.memory.subjects):
            raise ValueError(f"{len(self.edits)} edit records for {self.memory.n_edits} stored masks and "
                             f"{len(self.memory.subjects)} subjects: they must match one to one")

    def record(self, edit: EditRecord) -> None:
        """Add the record of the edit whose mask was just stored in the memory's index."""
        self.edits.append(edit)
        self.memory.subjects.add(edit.subject, edit.prompt)
        self.check()

    def row_of(self, edit_id: int) -> int:
        return self.memory.index.row_of(edit_id)

    def set_active(self, edit_id: int, active: bool) -> None:
        """Disable an edit, or enable it again (which also undoes a supersede)."""
        row = self.row_of(edit_id)
        self.memory.index.set_active(edit_id, active)
        if active:
            self.edits[row].superseded_by = None

    def supersede(self, edit_id: int, by: int) -> None:
        """Retire edit_id from routing: edit `by` asks the same question (newest correction wins)."""
        self.memory.index.set_active(edit_id, False)
        self.edits[self.row_of(edit_id)].superseded_by = by

    def set_subject(self, edit_id: int, aliases: tuple[str, ...]) -> None:
        """Change what an edit is about without re-editing: its record and its gate entry."""
        if not aliases:
            raise ValueError("a subject needs at least one non-empty alias")
        row = self.row_of(edit_id)
        self.edits[row].subject = tuple(aliases)
        self.memory.subjects.set(row, aliases)

    def fresh(self) -> "MemoryState":
        """An empty state with the same settings, background, permutation and templates."""
        return MemoryState(self.memory.empty_like(), [], self.config, list(self.templates), dict(self.model),
                           self.module)
