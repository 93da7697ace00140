"""Versioned, atomic memory snapshots: safetensors + Parquet + JSON, readable without memoir.

A snapshot store is a directory:

    SNAPDIR/
      LATEST                  the name of the newest complete version (replaced atomically)
      v000001/ v000002/ ...   one directory per version:
        manifest.json         format, model identity, layer, D, k, seed, tau, edit count, parent, sha256s
        memory.safetensors    weight [S, d_model, D], perm [D], background [D]
        edits.parquet         edit_id, prompt, target, mask (k indices), shard, created, source, active

Each version is written into a temporary directory, fsynced, then renamed; LATEST is replaced
after (memoir_vllm.atomic). A reader therefore sees a whole version or none, and a crash keeps the previous LATEST.
Every path that takes a snapshot accepts the store or one version directory.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from .chat import ChatMarks
from .atomic import TMP_PREFIX, atomic_dir, sha256_file, writable_dir, write_text_atomic
from .config import MemoirConfig
from .memory import ResidualMemory
from .state import EditRecord, MemoryState
from .store_lock import write_lock

__all__ = ["EditRecord", "MemoryState", "Snapshot", "SnapshotError", "save_snapshot", "load_snapshot",
           "resolve_version", "latest_version", "read_manifest", "check_model", "snapshot_info", "version_name",
           "version_number"]

FORMAT_VERSION = 2  # 2: edits carry a subject, the manifest names the routing rule and chat_marks; 1 reads as mask, raw
READABLE_FORMATS = (1, 2)
MANIFEST, WEIGHTS, EDITS, LATEST = "manifest.json", "memory.safetensors", "edits.parquet", "LATEST"


class SnapshotError(ValueError):
    """A snapshot that cannot be used: missing, corrupt, or made for another model or layer."""


@dataclass
class Snapshot:
    """A loaded snapshot version: where it lives, its manifest and the MemoryState it holds."""

    path: Path
    manifest: dict[str, Any]
    state: MemoryState

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def memory(self) -> ResidualMemory:
        return self.state.memory

    @property
    def edits(self) -> list[EditRecord]:
        return self.state.edits

    @property
    def config(self) -> MemoirConfig:
        return self.state.config

    @property
    def templates(self) -> list[str]:
        return self.state.templates


# -- paths -------------------------------------------------------------------------------------


def resolve_version(path: str | Path) -> Path:
    """The version directory a path names: itself if it holds a manifest, else the store's LATEST."""
    path = Path(path).expanduser()
    if (path / MANIFEST).exists():
        return path
    latest = path / LATEST
    if latest.exists():
        version = path / latest.read_text().strip()
        if (version / MANIFEST).exists():
            return version
        raise SnapshotError(f"{latest} names {version.name}, which is missing: the store is damaged")
    if not path.exists():
        raise SnapshotError(f"snapshot {path} does not exist: pass a directory written by `memoir edit --out`")
    raise SnapshotError(f"{path} is not a memoir snapshot (no {MANIFEST} and no {LATEST})")


def latest_version(root: str | Path) -> Path | None:
    """The newest complete version of a store, or None for a new or empty store."""
    try:
        return resolve_version(root)
    except SnapshotError:
        return None


def version_name(number: int) -> str:
    """The directory name of version `number` in a store: v000001, ..."""
    return f"v{number:06d}"


def version_number(name: str) -> int:
    """The number of a version directory name (version_name's inverse); 0 for anything else."""
    return int(name[1:]) if name[:1] == "v" and name[1:].isdigit() else 0


# -- save --------------------------------------------------------------------------------------


def save_snapshot(root: str | Path, state: MemoryState, keep: int = 3, extra: dict[str, Any] | None = None,
                  built_on: Path | None = None) -> Path:
    """Write `state` as the next version of the store at `root`; returns the version directory.

    keep: how many versions to keep, at least 2 (older ones are removed after the new LATEST is in place; the
      previous version stays for a server that is still loading it).
    extra: more manifest fields (e.g. a Ray job's merge provenance).
    built_on: the version `state` was loaded from; when it lies in `root`, the save is refused if another writer
      moved LATEST since (its edits would be lost).
    The store's write lock (memoir_vllm.store_lock) is held for the write: taken here unless this process holds it.
    """
    if keep < 2:
        raise ValueError(f"keep={keep}: keep at least 2 versions (a server may still be loading the previous one)")
    state.check()
    root = Path(root).expanduser()
    try:
        writable_dir(root)
    except OSError as e:
        raise SnapshotError(f"cannot write snapshots to {root}: {e.strerror}. Choose a writable --out directory") from e
    with write_lock(root):
        return _save_locked(root, state, keep, extra, built_on)


def _save_locked(root: Path, state: MemoryState, keep: int, extra: dict[str, Any] | None,
                 built_on: Path | None) -> Path:
    memory, config = state.memory, state.config
    parent = latest_version(root)
    if built_on is not None and Path(built_on).resolve().parent == root.resolve() and (
            parent is None or parent.resolve() != Path(built_on).resolve()):
        raise SnapshotError(f"{root} moved on since this memory was loaded from {Path(built_on).name} (LATEST is "
                            f"{parent.name if parent else 'gone'}): another writer saved; load the newest version "
                            "and apply the change again")
    version = (json.loads((parent / MANIFEST).read_text())["version"] + 1) if parent else 1
    name = version_name(version)
    final = root / name
    with atomic_dir(final) as tmp:
        _write_files(tmp, memory, state.edits, config, state.model)
        manifest = {
            "format_version": FORMAT_VERSION,
            "version": version,
            "parent": parent.name if parent else None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": state.model,
            "module": state.module,
            "layer": config.layer,
            "d_model": memory.d_model,
            "d_inner": memory.d_inner,
            "dtype": str(memory.weight.dtype).removeprefix("torch."),
            "k": memory.k,
            "seed": memory.seed,
            "tau": memory.tau,
            "feature": memory.feature,
            "routing": {"rule": memory.rule, "subject_tau": memory.subject_tau, "subject_check": memory.subject_check,
                        "check_tau": memory.check_tau, "answer_type": memory.answer_type,
                        "untyped_tau": memory.untyped_tau},
            "chat_marks": memory.marks.to_dict() if memory.marks is not None else None,
            "end_ids": list(memory.end_ids),
            "n_shards": memory.n_shards,
            "shard_fill": memory.shard_fill(),  # edits per shard
            "n_edits": memory.n_edits,
            "n_active": memory.index.n_active,
            "config": config.to_dict(),
            "templates": state.templates,
            "files": {f: sha256_file(tmp / f) for f in (WEIGHTS, EDITS)},
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    write_text_atomic(root / LATEST, name + "\n")
    _prune(root, keep)
    return final


def _write_files(d: Path, memory: ResidualMemory, edits: list[EditRecord], config: MemoirConfig, model_id: dict) -> None:
    tensors = {
        "weight": memory.weight.detach().cpu().contiguous(),
        "perm": memory.perm.cpu().contiguous(),
        "background": memory.background.cpu().contiguous(),
    }
    if memory.rule == "subject" and memory.subject_check == "encoder" and len(memory.subjects):
        memory.fill_vectors()  # the encoder check's per-edit question vectors [N, 384], so loading needs none
        tensors["question_vectors"] = torch.stack([v.cpu().float() for v in memory.subjects.vectors]).contiguous()
    meta = {"layer": str(config.layer), "model": json.dumps(model_id), "k": str(memory.k), "seed": str(memory.seed)}
    save_file(tensors, str(d / WEIGHTS), metadata=meta)
    idx = memory.index
    masks = idx.masks(torch.arange(len(idx), device=idx.packed.device)).cpu() if len(idx) else torch.zeros(0, memory.d_inner, dtype=torch.bool)
    mask_lists = [m.nonzero().flatten().to(torch.int16).tolist() for m in masks]
    table = pa.table(
        {
            "edit_id": pa.array(idx.edit_ids.tolist(), pa.int64()),
            "prompt": pa.array([e.prompt for e in edits], pa.string()),
            "target": pa.array([e.target for e in edits], pa.string()),
            "mask": pa.array(mask_lists, pa.list_(pa.int16())),
            "shard": pa.array(idx.shards.tolist(), pa.int64()),
            "mask_key": pa.array(idx.keys.tolist(), pa.int64()),
            "created": pa.array([e.created for e in edits], pa.string()),
            "source": pa.array([e.source for e in edits], pa.string()),
            "subject": pa.array([list(e.subject) for e in edits], pa.list_(pa.string())),
            "superseded_by": pa.array([e.superseded_by for e in edits], pa.int64()),
            "active": pa.array(idx.active.tolist(), pa.bool_()),
        }
    )
    pq.write_table(table, d / EDITS)


def _prune(root: Path, keep: int) -> None:
    versions = sorted(p for p in root.glob("v[0-9]*") if p.is_dir())
    for old in versions[: max(0, len(versions) - max(keep, 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash before its rename
        shutil.rmtree(stale, ignore_errors=True)


# -- load --------------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((resolve_version(path) / MANIFEST).read_text())


def load_snapshot(path: str | Path, verify: bool = True) -> Snapshot:
    """Load a snapshot version (or a store's LATEST), verifying every file's sha256."""
    d = resolve_version(path)
    manifest = json.loads((d / MANIFEST).read_text())
    if manifest.get("format_version") not in READABLE_FORMATS:
        raise SnapshotError(f"{d} has format {manifest.get('format_version')}, this memoir reads {READABLE_FORMATS}: "
                            "upgrade memoir to read it")
    if verify:
        for f, digest in manifest["files"].items():
            if not (d / f).exists():
                raise SnapshotError(f"{d / f} is missing: the snapshot is incomplete")
            if sha256_file(d / f) != digest:
                raise SnapshotError(f"{d / f} does not match its checksum in {MANIFEST}: the file is corrupt or was modified")
    tensors = load_file(str(d / WEIGHTS))
    config = MemoirConfig.from_dict(manifest["config"])  # format 1: routing "mask", as it routed then
    memory = ResidualMemory(
        manifest["d_model"], manifest["d_inner"], manifest["k"], manifest["tau"], manifest["seed"],
        manifest["feature"], n_shards=manifest["n_shards"], dtype=tensors["weight"].dtype,
        rule=config.routing, subject_tau=config.subject_tau, subject_check=config.subject_check,
        check_tau=config.check_tau, answer_type=config.answer_type, untyped_tau=config.untyped_tau,
        marks=ChatMarks.from_dict(manifest.get("chat_marks")),
        memory_start=config.memory_start, mask_key=config.mask_key, columns=config.columns,
        end_ids=tuple(manifest.get("end_ids") or ()),
    )
    with torch.no_grad():
        memory.weight.copy_(tensors["weight"])
        memory.background.copy_(tensors["background"])
    if not torch.equal(memory.perm, tensors["perm"]):
        raise SnapshotError(f"{d}: stored permutation differs from seed {manifest['seed']}'s: the masks would not match")
    table = pq.read_table(d / EDITS).to_pylist()
    if table:
        from .routing.tophash import indices_to_mask

        masks = indices_to_mask(torch.tensor([r["mask"] for r in table], dtype=torch.int64), manifest["d_inner"])
        memory.index.add(masks, torch.tensor([r["edit_id"] for r in table]), torch.tensor([r["shard"] for r in table]),
                         torch.tensor([r.get("mask_key") or 0 for r in table]))
        memory.index.active.copy_(torch.tensor([r["active"] for r in table]))
    edits = [EditRecord(r["prompt"], r["target"], r["source"], r["created"], tuple(r.get("subject") or ()),
                        r.get("superseded_by")) for r in table]
    vectors = tensors.get("question_vectors")
    for i, e in enumerate(edits):
        memory.subjects.add(e.subject, e.prompt, vectors[i] if vectors is not None else None)
    state = MemoryState(memory, edits, config, manifest["templates"],
                        manifest["model"], manifest["module"])
    return Snapshot(d, manifest, state)


def check_model(manifest: dict[str, Any], model_id: dict[str, Any], module: str) -> None:
    """Refuse a snapshot made for another model or layer, naming both."""
    want = manifest["model"]
    if want.get("config_sha256") != model_id.get("config_sha256"):
        raise SnapshotError(
            f"snapshot was made for model {want.get('name')!r} (config {want.get('config_sha256', '')[:12]}), "
            f"not for {model_id.get('name')!r} (config {model_id.get('config_sha256', '')[:12]}): "
            "load it with the model it was made for"
        )
    if manifest["module"] != module:
        raise SnapshotError(f"snapshot edits {manifest['module']}, but this setup edits {module}: use layer {manifest['layer']}")


def snapshot_info(path: str | Path) -> dict[str, Any]:
    """A short summary of a snapshot store or version (no tensors loaded)."""
    d = resolve_version(path)
    m = json.loads((d / MANIFEST).read_text())
    root = d.parent if (d.parent / LATEST).exists() else None
    keys = ("version", "parent", "created", "model", "module", "layer", "d_model", "d_inner", "k", "seed", "tau",
            "feature", "routing", "chat_marks", "end_ids", "n_shards", "shard_fill", "n_edits", "n_active")
    info = {k: m.get(k) for k in keys}
    info["shard_budget"] = m["config"].get("shard_budget", 0)
    info["path"] = str(d)
    if root:
        info["versions"] = sorted(p.name for p in root.glob("v[0-9]*") if p.is_dir())
    return info
