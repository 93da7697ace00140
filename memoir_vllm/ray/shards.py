"""Sharded memories: how a job splits one edit file into S streams, and how their stores merge.

Sharding is deterministic and round-robin: the edit at position i of the file (0-based, after
--limit) goes to shard i mod S, and keeps i as its global edit id. Each shard is trained as its
own single-shard memory (its own W_m, its own SGD weight decay), so a shard's result equals a
single-stream run over that shard's edits. A job's directory holds the stream stores and the
merged snapshot store:

    OUT/
      LATEST, v000001/ ...        the merged S-shard snapshot (what `memoir ask` / serving load)
      streams/
        job.json                  n_shards, sharding, edit file and its sha256, model
        shard-000/ shard-001/ ... one snapshot store per stream (LATEST, vNNNNNN/)

merge_streams() reads the newest version of every stream store, checks that they were made with
the same model, layer, permutation, background and settings, and writes one version whose
memory.safetensors holds weight [S', d_model, D] (the streams' W_m one after another: S' = S, or more where
a shard budget (MemoirConfig.shard_budget) opened new ones in a stream) and whose edits.parquet lists every
edit in global id order with its `shard`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json_atomic
from ..edits import EditRequest
from ..memory import ResidualMemory
from ..snapshot import Snapshot, SnapshotError, load_snapshot, save_snapshot
from ..state import EditRecord, MemoryState

log = logging.getLogger(__name__)

SHARDING = "round_robin"  # edit i -> shard i mod S
STREAMS, JOB = "streams", "job.json"


def shard_of(edit_id: int, n_shards: int) -> int:
    """The shard of the edit at file position edit_id (round-robin)."""
    return edit_id % n_shards


def stream_items(requests: list[EditRequest], n_shards: int, shard: int) -> list[tuple[int, EditRequest]]:
    """The (global edit id, request) pairs of one shard, in file order."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
    return [(i, r) for i, r in enumerate(requests) if shard_of(i, n_shards) == shard]


def streams_root(out: str | Path) -> Path:
    return Path(out).expanduser() / STREAMS


def stream_dir(out: str | Path, shard: int) -> Path:
    """The snapshot store of one stream of the job at `out`."""
    return streams_root(out) / f"shard-{shard:03d}"


def write_job_spec(out: str | Path, spec: dict[str, Any]) -> Path:
    """Write OUT/streams/job.json atomically (temporary file, fsync, rename)."""
    root = streams_root(out)
    root.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(root / JOB, spec)


def read_job_spec(out: str | Path) -> dict[str, Any] | None:
    path = streams_root(out) / JOB
    return json.loads(path.read_text()) if path.exists() else None


# -- merging ----------------------------------------------------------------------------------


def check_compatible(snaps: list[Snapshot]) -> None:
    """Refuse streams that cannot share one memory: other model, layer, k, permutation, background or settings."""
    ref = snaps[0]
    for snap in snaps[1:]:
        a, b = ref.manifest, snap.manifest
        if a["model"].get("config_sha256") != b["model"].get("config_sha256"):
            raise SnapshotError(
                f"stream {snap.path.parent.name} was made with model {b['model'].get('name')!r} "
                f"(config {b['model'].get('config_sha256', '')[:12]}) but {ref.path.parent.name} with "
                f"{a['model'].get('name')!r} (config {a['model'].get('config_sha256', '')[:12]}): one job's streams "
                "must use one model; rerun the odd stream with the job's --model or start a new --out"
            )
        for key in ("module", "d_model", "d_inner", "k", "seed", "feature", "dtype"):
            if a[key] != b[key]:
                raise SnapshotError(f"stream {snap.path.parent.name} has {key}={b[key]!r} but {ref.path.parent.name} has "
                                    f"{a[key]!r}: the streams were made with different settings; rerun them as one job")
        if a["config"] != b["config"]:
            diff = sorted(k for k in a["config"] if a["config"][k] != b["config"].get(k))
            raise SnapshotError(f"streams {ref.path.parent.name} and {snap.path.parent.name} differ in settings {diff}: "
                                "rerun them as one job with one set of settings")
        if a["templates"] != b["templates"]:
            raise SnapshotError(f"streams {ref.path.parent.name} and {snap.path.parent.name} have different context "
                                "templates: they were made with different models")
        if not torch.equal(ref.memory.background, snap.memory.background):
            raise SnapshotError(f"streams {ref.path.parent.name} and {snap.path.parent.name} have different background "
                                "means: their masks are not comparable; rerun them as one job with one --background")


def merge_memories(snaps: list[Snapshot]) -> tuple[ResidualMemory, list[EditRecord]]:
    """One memory from S stream snapshots: their shards one after another (one per stream, or more where a
    stream's shard budget opened new ones), each edit in its stream's shard.

    Edits are ordered by their global edit id; ids must be unique across streams.
    """
    check_compatible(snaps)
    ref = snaps[0].memory
    offsets = [0]  # the merged index of each stream's first shard
    for snap in snaps:
        offsets.append(offsets[-1] + snap.memory.n_shards)
    memory = ref.empty_like(n_shards=offsets[-1])
    rows: list[tuple[int, int, int]] = []  # (global edit id, stream, row in that stream's index)
    for s, snap in enumerate(snaps):
        rows += [(int(e), s, r) for r, e in enumerate(snap.memory.index.edit_ids.tolist())]
    rows.sort()
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise SnapshotError(f"edit ids {dup} appear in more than one stream: these stores are not shards of one job")
    with torch.no_grad():
        memory.weight.copy_(torch.cat([snap.memory.weight for snap in snaps]))  # [S, d_model, D]
    records: list[EditRecord] = []
    if rows:
        masks = torch.cat([snaps[s].memory.index.masks(torch.tensor([r])) for _, s, r in rows])  # [N, D]
        shards = [offsets[s] + int(snaps[s].memory.index.shards[r]) for _, s, r in rows]
        memory.index.add(masks, torch.tensor(ids), torch.tensor(shards),
                         torch.tensor([int(snaps[s].memory.index.keys[r]) for _, s, r in rows]))
        memory.index.active.copy_(torch.tensor([bool(snaps[s].memory.index.active[r]) for _, s, r in rows]))
        records = [snaps[s].edits[r] for _, s, r in rows]
    return memory, records


def merge_streams(out: str | Path, n_shards: int | None = None, keep: int = 3) -> Path:
    """Merge the newest version of every stream store of the job at `out` into the next version of `out`.

    n_shards defaults to the job's (OUT/streams/job.json). Can be re-run at any time, e.g. to
    publish a partial merge while a job runs or after a stream was resumed by hand.
    """
    out = Path(out).expanduser()
    spec = read_job_spec(out)
    if n_shards is None:
        if spec is None:
            raise SnapshotError(f"{streams_root(out) / JOB} is missing: {out} is not a Ray edit job directory")
        n_shards = int(spec["n_shards"])
    snaps = []
    for s in range(n_shards):
        d = stream_dir(out, s)
        try:
            snaps.append(load_snapshot(d))
        except SnapshotError as e:
            raise SnapshotError(f"cannot merge shard {s}: {e}. Run the job (with --resume) until every stream "
                                "has written a snapshot") from None
    for s, snap in enumerate(snaps):
        bad = [int(e) for e in snap.memory.index.edit_ids.tolist() if shard_of(int(e), n_shards) != s]
        if bad:
            raise SnapshotError(f"stream shard-{s:03d} holds edit ids {bad[:5]} that belong to other shards under "
                                f"{SHARDING} sharding with {n_shards} shards")
    memory, records = merge_memories(snaps)
    ref = snaps[0]
    extra = {
        "sharding": SHARDING,
        "merged_from": [{"stream": f"{STREAMS}/{snap.path.parent.name}", "version": snap.path.name,
                         "n_edits": snap.memory.n_edits} for snap in snaps],
    }
    state = MemoryState(memory, records, ref.config, ref.templates, ref.state.model, ref.state.module)
    path = save_snapshot(out, state, keep=keep, extra=extra)
    log.info("merged %d streams (%d edits) into %s", n_shards, memory.n_edits, path)
    return path
