"""Ray edit jobs: S sequential edit streams on Ray actors, snapshots every N edits, resume, one merged snapshot.

    memoir edit --ray --workers 2 --shards 4 --edits zsre.json --out /shared/jobs/zsre

Edits within one memory are sequential, so a job scales out over independent memories: the edit
file is split into S shards (round-robin, see memoir_vllm.ray.shards), each shard is one EditStream
on one actor, and at most `workers` actors run at a time. Every stream checkpoints its own
snapshot store every `every` edits; when an actor dies, the driver starts a new one on the same
store, which resumes from the stream's newest snapshot, and sends the edits after it again (none
is lost, none is applied twice). At the end the stream stores are merged into one S-shard
snapshot at OUT. OUT must be a path every Ray node can read and write (a shared filesystem).

This module checks the options and the output directory and connects to Ray; the driver's event
loop and the actor class are in memoir_vllm.ray.driver.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable

from ..atomic import sha256_file, writable_dir
from ..edits import load_edits
from .driver import JobPlan, RayEditJob, RayJobError, RemoteStream
from .shards import SHARDING, read_job_spec, streams_root
from ..snapshot import LATEST

__all__ = ["RayJobError", "RemoteStream", "compute_masks", "connect", "plan_job", "run_ray_job"]

log = logging.getLogger(__name__)


# -- cluster ----------------------------------------------------------------------------------------


def _probe(address: str, timeout: float) -> None:
    """Fail fast unless a Ray GCS answers at host:port within `timeout` seconds.

    A bare TCP connect is not enough (proxies accept connections they never serve), so this makes
    one real GCS call (GetClusterId); an authentication refusal still proves a Ray cluster is there.
    ray:// client addresses are only checked for a TCP connection.
    """
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayJobError(f"--address {address!r} is not host:port (or ray://host:port, or 'auto')")
    why = None
    if address.startswith("ray://"):
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError as e:
            why = "timed out" if isinstance(e, (TimeoutError, socket.timeout)) else (e.strerror or str(e))
    else:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        with grpc.insecure_channel(hostport) as channel:
            try:
                stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                    why = {grpc.StatusCode.DEADLINE_EXCEEDED: "timed out",
                           grpc.StatusCode.UNIMPLEMENTED: "something answers there, but not a Ray GCS"}.get(
                        e.code(), (e.details() or str(e.code())).split(";")[0])
    if why:
        raise RayJobError(f"cannot reach the Ray cluster at {address} ({why}; waited at most {timeout:g} s): start "
                          "one with `ray start --head` and pass its address, or leave out --address for a local cluster")


def _source_root() -> str | None:
    """The directory holding the memoir_vllm package when it runs from a source tree (not installed)."""
    root = Path(__file__).resolve().parents[2]
    return None if "site-packages" in root.parts else str(root)


def _is_remote(address: str | None) -> bool:
    """Whether `address` names a cluster to probe (None starts a local one; 'auto' finds a running one)."""
    return address not in (None, "auto", "local")


def connect(address: str | None, num_cpus: int, timeout: float = 10.0) -> bool:
    """Join the cluster at `address`, or start a local one with num_cpus CPUs; True if this call started Ray.

    Reuses an already initialised Ray (e.g. in tests). Workers of a source checkout get it on PYTHONPATH.
    """
    if _is_remote(address):
        _probe(address, timeout)
    return _join(address, num_cpus)


def _join(address: str | None, num_cpus: int) -> bool:
    """connect() without the probe: for a caller that has probed `address` already."""
    import ray

    if ray.is_initialized():
        if address is not None:
            log.warning("Ray is already initialised in this process; using it instead of --address %s", address)
        return False
    env = {}
    src = _source_root()
    if src:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    kw: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                              runtime_env={"env_vars": env} if env else None)
    if address is None:
        # Ray starts workers at niceness 15; an edit job's workers are the job, so keep them at the
        # driver's priority on a local cluster (set RAY_worker_niceness to choose otherwise)
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=num_cpus, **kw)
    else:
        try:
            ray.init(address=address, **kw)
        except (ConnectionError, TimeoutError, RuntimeError) as e:
            raise RayJobError(f"cannot join the Ray cluster at {address}: {e}") from None
    return True


# -- the job ----------------------------------------------------------------------------------------


def plan_job(
    edits: str | Path, out: str | Path, *, model: str | None, workers: int, shards: int | None, every: int,
    resume: bool, limit: int | None, background: str | Path | None, settings: dict[str, Any] | None,
    threads: int, chunk: int, max_restarts: int, keep: int,
) -> JobPlan:
    """Check the options, read the edit file and build the job spec; nothing is written and no cluster is touched."""
    for name, value in (("workers", workers), ("every", every), ("chunk", chunk), ("threads", threads)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: give a positive number")
    old_spec = read_job_spec(out) if resume else None
    n_shards = shards or (int(old_spec["n_shards"]) if old_spec else workers)  # a resumed job keeps its shards
    if n_shards < 1:
        raise ValueError(f"--shards {n_shards}: give a positive number of shards")
    if workers > n_shards:
        log.warning("%d workers for %d shards: only %d actors will run", workers, n_shards, n_shards)
        workers = n_shards
    requests = load_edits(edits)[:limit]
    spec = {"n_shards": n_shards, "sharding": SHARDING, "edits": str(Path(edits).resolve()),
            "edits_sha256": sha256_file(Path(edits).expanduser()), "n_edits": len(requests), "model": model,
            "every": every}
    return JobPlan(Path(out).expanduser().resolve(), requests, n_shards, workers, spec, model=model,
                   settings=settings, background=background, every=every, threads=threads, chunk=chunk, keep=keep,
                   max_restarts=max_restarts)


def _check_out(out: Path, resume: bool, n_shards: int, spec: dict[str, Any]) -> None:
    """Validate the output directory before any cluster or worker starts."""
    try:
        writable_dir(out)
    except OSError as e:
        raise RayJobError(f"cannot write to --out {out}: {e.strerror or e}. Choose a writable directory that every "
                          "Ray node can reach (a shared filesystem)") from None
    old = read_job_spec(out)
    has_streams = streams_root(out).exists() and any(streams_root(out).glob("shard-*"))
    if (old is not None or has_streams or (out / LATEST).exists()) and not resume:
        raise RayJobError(f"{out} already holds a job or snapshot: pass --resume to continue it, or choose a new --out")
    if resume and old is None and (out / LATEST).exists():
        raise RayJobError(f"{out} holds a snapshot from a local `memoir edit` job, not a Ray job: resume it without "
                          "--ray, or choose a new --out")
    if resume and old is not None:
        if int(old["n_shards"]) != n_shards:
            raise RayJobError(f"{out} was started with --shards {old['n_shards']}, not {n_shards}: resume with "
                              f"--shards {old['n_shards']}")
        if old.get("edits_sha256") != spec["edits_sha256"]:
            log.warning("the edit file differs from the one the job started with; checking the edits already done")


def run_ray_job(
    edits: str | Path,
    out: str | Path,
    model: str | None = None,
    workers: int = 2,
    shards: int | None = None,
    every: int = 50,
    resume: bool = False,
    address: str | None = None,
    limit: int | None = None,
    background: str | Path | None = None,
    settings: dict[str, Any] | None = None,
    threads: int = 1,
    chunk: int = 4,
    max_restarts: int = 3,
    connect_timeout: float = 10.0,
    keep: int = 3,
    progress: bool = True,
    on_event: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Edit every record of `edits` into S shard memories on Ray actors and merge them into a snapshot at `out`.

    Args:
        edits: JSON list, JSONL or Parquet edit file (read on the driver; errors name the line).
        out: job directory (merged snapshot store + streams/); must be reachable from every node.
        model: 'default' or a local HF model directory (the same path on every node).
        workers: actors running at once (one stream each, `threads` torch threads each).
        shards: number of streams S (default: the resumed job's, else workers); edit i goes to shard i mod S.
        every: each stream writes a snapshot version every `every` of its edits.
        resume: continue the job at `out` from each stream's newest snapshot.
        address: an existing cluster ('host:port', 'ray://host:port' or 'auto'); None starts a local one.
        chunk: edits per actor call (progress granularity; an actor gets two calls queued).
        max_restarts: how often one stream's actor may die before the job gives up.
        on_event: called as on_event(kind, shard, info) for 'open' (info: pid, done), 'progress'
            (info: done) and 'finish' (info: snapshot); for monitoring and tests.
    Returns:
        a summary: merged snapshot, edits, seconds, edits/s, per-shard counts, restarts.
    """
    plan = plan_job(edits, out, model=model, workers=workers, shards=shards, every=every, resume=resume,
                    limit=limit, background=background, settings=settings, threads=threads, chunk=chunk,
                    max_restarts=max_restarts, keep=keep)
    if _is_remote(address):
        _probe(address, connect_timeout)  # once, and before anything is written
    _check_out(plan.out, resume, plan.n_shards, plan.spec)
    started = _join(address, num_cpus=max(plan.workers, os.cpu_count() or 1))
    try:
        job = RayEditJob(plan, progress=progress, on_event=on_event)
        job.run()
    finally:
        if started:
            import ray

            ray.shutdown()
    return job.summary()


# -- masks and routing in parallel ------------------------------------------------------------------


def compute_masks(
    snapshot: str | Path, prompts: list[str], workers: int = 2, batch_size: int = 32, model: str | None = None,
    address: str | None = None, threads: int = 1, connect_timeout: float = 10.0,
) -> dict[str, list]:
    """TopHash masks and routing of many prompts against a snapshot, on `workers` Ray actors (MaskWorker).

    Masks depend only on the frozen model, so batches run in any order on any worker; results come
    back in prompt order: {"prompt", "mask", "edit_id", "shard", "ratio"} lists.
    """
    import ray
    from ray.util import ActorPool

    from .mask_worker import MaskWorker

    if workers < 1 or batch_size < 1:
        raise ValueError(f"workers={workers}, batch_size={batch_size}: give positive numbers")
    started = connect(address, num_cpus=max(workers, os.cpu_count() or 1), timeout=connect_timeout)
    try:
        Actor = ray.remote(MaskWorker).options(num_cpus=threads)
        pool = ActorPool([Actor.remote(str(Path(snapshot).resolve()), model, threads) for _ in range(workers)])
        batches = [{"prompt": prompts[s : s + batch_size]} for s in range(0, len(prompts), batch_size)]
        out: dict[str, list] = {}
        for part in pool.map(lambda a, b: a.__call__.remote(b), batches):  # ordered like batches
            for key, values in part.items():
                out.setdefault(key, []).extend(values)
        return out
    finally:
        if started:
            ray.shutdown()
