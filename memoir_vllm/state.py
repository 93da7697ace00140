"""MemoryState: a residual memory together with its edit records, the unit a snapshot stores.

The memory's index holds one mask per edit (row i) and `edits[i]` the prompt and target written
there; `MemoryState` keeps the two in step, so nothing else has to:

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
        self.check()

    def check(self) -> None:
        """Raise if the edit records and the stored masks are out of step."""
        if len(self.edits) != self.memory.n_edits:
            raise ValueError(f"{len(self.edits)} edit records for {self.memory.n_edits} stored masks: "
                             "they must match one to one")

    def record(self, edit: EditRecord) -> None:
        """Add the record of the edit whose mask was just stored in the memory's index."""
        self.edits.append(edit)
        self.check()

    def fresh(self) -> "MemoryState":
        """An empty state with the same settings, background, permutation and templates."""
        return MemoryState(self.memory.empty_like(), [], self.config, list(self.templates), dict(self.model),
                           self.module)
