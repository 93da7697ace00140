"""Flags shared by every `memoir` subcommand (memoir_vllm.cli and memoir_eval.cli both import these).

The settings flags are generated from MemoirConfig's fields (their help and choices live there),
so a new setting is one field in config.py and appears in every subcommand that edits.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing

from .config import PRESETS, MemoirConfig

# fields that are not flags: the rest of MemoirConfig is settable from the command line
NOT_FLAGS: frozenset[str] = frozenset()


def _flag_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(MemoirConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def settable_fields() -> list[dataclasses.Field]:
    """The MemoirConfig fields a user may set from the command line."""
    return [f for f in dataclasses.fields(MemoirConfig) if f.name not in NOT_FLAGS]


def add_settings(p: argparse.ArgumentParser) -> None:
    """Flags that override MemoirConfig fields (unset flags keep the model's measured preset)."""
    g = p.add_argument_group("memory and editor settings (default: the model's measured preset)")
    for f in settable_fields():
        flag = "--" + f.name.replace("_", "-")
        kind, meta = _flag_type(f), f.metadata
        if kind is bool:
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
        else:
            g.add_argument(flag, dest=f.name, type=kind, choices=meta.get("choices"), default=None, help=meta["help"])
    g.add_argument("--reference", dest="fast", action="store_false", default=None,
                   help="the reference full forward every step (same as --no-fast)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from this named preset instead of the model's measured one (the other flags still "
                   "override it): reference is the paper's rule and editor (mask routing, shared columns, lr 1, "
                   "full forward); see memoir_vllm/config.py PRESETS")


def settings(args: argparse.Namespace) -> dict:
    """The MemoirConfig overrides the user gave (flags left unset are absent), and `preset` when one was named
    (Memoir.create passes it on to config.default_config)."""
    out = {f.name: getattr(args, f.name) for f in settable_fields() if getattr(args, f.name, None) is not None}
    if getattr(args, "preset", None):
        out["preset"] = args.preset
    return out


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="torch device for the model and memory, e.g. cuda (default: $MEMOIR_DEVICE, else cpu)")


def set_threads(n: int | None) -> None:
    """--threads: torch threads in this process (default $MEMOIR_THREADS, else every core)."""
    import torch

    torch.set_num_threads(n or int(os.environ.get("MEMOIR_THREADS", 0)) or os.cpu_count() or 1)


def set_device(name: str | None) -> None:
    """--device: the device models load onto in this process (checked now, so a typo fails before any work)."""
    if name is not None:
        from .models import default_device

        os.environ["MEMOIR_DEVICE"] = name
        default_device()
