"""One Attachment per served memoir layer, behind one registry.

The custom op finds its attachment by the layer's module path (a string: torch.compile keeps it as
a constant), the runner hook and the worker extension find the attachment of their runner. The
attachment holds everything about one served layer: the router (memory + per-request buffers),
the wrapped module and vLLM's own layer it wraps, the snapshot path, and whether the memory is on.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..memory import ResidualMemory
from .routing import Router

log = logging.getLogger(__name__)


@dataclass
class Attachment:
    name: str  # module path of the edited down-projection, e.g. model.layers.25.mlp.down_proj
    router: Router
    parent: nn.Module | None = None  # the module holding the layer as attribute `child`
    child: str = ""
    wrapped: nn.Module | None = None  # the MemoirDownProj in the model
    base: nn.Module | None = None  # vLLM's own down-projection inside it
    snapshot: str = ""  # the loaded snapshot version directory
    runner: Any = None  # weakref to the model runner that serves it (None: driven by hand, see standalone)
    enabled: bool = True  # False: no routing runs, every token gets the base output
    follower: Any = None  # follow.StoreFollower when a store (not a pinned version) is served

    @property
    def memory(self) -> ResidualMemory:
        return self.router.memory


_REGISTRY: dict[str, Attachment] = {}


def register(att: Attachment) -> None:
    _REGISTRY[att.name] = att


def standalone(name: str, router: Router) -> Attachment:
    """Register a router for the op under `name` without a vLLM runner: benchmarks and tests drive
    `router.prepare(...)` and `torch.ops.memoir.memory_term(a, out, name)` by hand."""
    att = Attachment(name, router)
    register(att)
    return att


def remove(name: str) -> None:
    _REGISTRY.pop(name, None)


def by_name(name: str) -> Attachment | None:
    """The attachment the op of layer `name` serves (None during profiling before attachment)."""
    return _REGISTRY.get(name)


def of_runner(runner: Any) -> Attachment | None:
    """The attachment served by this model runner, or None for an engine without a snapshot."""
    for att in _REGISTRY.values():
        if att.runner is not None and att.runner() is runner:
            return att
    return None


def runner_ref(runner: Any) -> Any:
    return weakref.ref(runner)


def for_serving(memory: ResidualMemory, device: torch.device, dtype: torch.dtype) -> ResidualMemory:
    """A loaded memory moved to the served model's device, W_m in its activation dtype."""
    memory = memory.to(device)
    with torch.no_grad():
        memory.weight.data = memory.weight.data.to(dtype)
    return memory
