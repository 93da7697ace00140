"""Ray edit jobs: S sequential edit streams on Ray actors, snapshots every N edits, resume, one merged snapshot.

    memoir edit --ray --workers 2 --shards 4 --edits zsre.json --out /shared/jobs/zsre

Edits within one memory are sequential, so a job scales out over independent memories: the edit
file is split into S shards (round-robin, see memoir_vllm.shards), each shard is one EditStream
on one actor, and at most `workers` actors run at a time. Every stream checkpoints its own
snapshot store every `every` edits; when an actor dies, the driver starts a new one on the same
store, which resumes from the stream's newest snapshot, and sends the edits after it again (none
is lost, none is applied twice). At the end the stream stores are merged into one S-shard
snapshot at OUT. OUT must be a path every Ray node can read and write (a shared filesystem).
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .edit_job import check_resumable
from .edits import EditRequest, load_edits
from .models import sha256_file
from .shards import (SHARDING, merge_streams, read_job_spec, stream_dir, stream_items, streams_root,
                     write_job_spec)
from .snapshot import LATEST, SnapshotError, latest_version
from .stream import EditStream

log = logging.getLogger(__name__)


class RayJobError(RuntimeError):
    """A Ray edit job that cannot start or finish: no cluster, a worker that keeps dying, bad setup."""


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
    root = Path(__file__).resolve().parents[1]
    return None if "site-packages" in root.parts else str(root)


def connect(address: str | None, num_cpus: int, timeout: float = 10.0) -> bool:
    """Join the cluster at `address`, or start a local one with num_cpus CPUs; True if this call started Ray.

    Reuses an already initialised Ray (e.g. in tests). Workers of a source checkout get it on PYTHONPATH.
    """
    import ray

    if address not in (None, "auto", "local"):
        _probe(address, timeout)
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


# -- the actor -------------------------------------------------------------------------------------


class RemoteStream:
    """The actor around an EditStream. The stream is built in state(), not in __init__, so that its
    errors (a bad model path, a store made with another model) reach the driver as themselves
    instead of as a dead actor."""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.stream: EditStream | None = None

    def state(self) -> dict[str, Any]:
        if self.stream is None:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # no weight-loading bars from every worker
            self.stream = EditStream(*self.args)
        return self.stream.state()

    def edit_batch(self, batch: dict[str, list]) -> dict[str, list]:
        return self.stream(batch)

    def finish(self) -> str:
        return self.stream.finish()


# -- the job ----------------------------------------------------------------------------------------


@dataclass
class _Stream:
    """Driver-side state of one stream."""

    shard: int
    items: list[tuple[int, EditRequest]]
    actor: Any = None
    sent: int = 0  # items sent to the current actor (counting from the start of the stream)
    done: int = 0  # items confirmed done
    restarts: int = 0
    pid: int | None = None
    snapshot: str | None = None
    inflight: set = field(default_factory=set)


def _check_out(out: Path, resume: bool, n_shards: int, spec: dict[str, Any]) -> None:
    """Validate the output directory before any cluster or worker starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
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
    out = Path(out).expanduser().resolve()
    spec = {"n_shards": n_shards, "sharding": SHARDING, "edits": str(Path(edits).resolve()),
            "edits_sha256": sha256_file(Path(edits).expanduser()), "n_edits": len(requests), "model": model,
            "every": every}
    if address not in (None, "auto", "local"):
        _probe(address, connect_timeout)  # before anything is written
    _check_out(out, resume, n_shards, spec)

    import ray
    from ray.exceptions import RayActorError, RayTaskError

    started = connect(address, num_cpus=max(workers, os.cpu_count() or 1), timeout=connect_timeout)
    if read_job_spec(out) is None:
        write_job_spec(out, spec)  # a resumed job's spec is updated only once it has finished
    Actor = ray.remote(RemoteStream)
    streams = [_Stream(s, stream_items(requests, n_shards, s)) for s in range(n_shards)]
    pending = list(streams)  # streams not yet given an actor
    running: dict[Any, tuple[_Stream, str, int]] = {}  # object ref -> (stream, kind, n items)
    bar = tqdm(total=len(requests), desc=f"editing ({n_shards} shards)", unit="edit", disable=not progress)
    emit = on_event or (lambda *_: None)

    def launch(st: _Stream) -> None:
        st.actor = Actor.options(num_cpus=threads, max_restarts=0, max_task_retries=0).remote(
            str(stream_dir(out, st.shard)), model, settings, background, every, threads, keep)
        st.sent, st.inflight = 0, set()
        ref = st.actor.state.remote()
        running[ref] = (st, "open", 0)
        st.inflight.add(ref)

    def submit(st: _Stream) -> None:
        if st.sent >= len(st.items):
            if not st.inflight:
                ref = st.actor.finish.remote()
                running[ref] = (st, "finish", 0)
                st.inflight.add(ref)
            return
        part = st.items[st.sent : st.sent + chunk]
        batch = {"edit_id": [i for i, _ in part], "prompt": [r.prompt for _, r in part],
                 "target": [r.target for _, r in part], "source": [r.source for _, r in part]}
        ref = st.actor.edit_batch.remote(batch)
        running[ref] = (st, "edit", len(part))
        st.inflight.add(ref)
        st.sent += len(part)

    def refresh() -> None:
        bar.n = sum(st.done for st in streams)
        bar.set_postfix_str(" ".join(f"s{st.shard}:{st.done}/{len(st.items)}" for st in streams), refresh=False)
        bar.refresh()

    def stop_all() -> None:
        for st in streams:
            if st.actor is not None:
                ray.kill(st.actor, no_restart=True)
                st.actor = None

    t0 = time.perf_counter()
    resumed_after: dict[int, int] = {}
    warm: dict[str, float] = {}  # when every first-wave actor had opened, and the edits done by then
    try:
        while pending and sum(1 for st in streams if st.actor is not None) < workers:
            launch(pending.pop(0))
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)  # a timeout keeps Ctrl-C responsive
            if not ready:
                continue
            ref = ready[0]
            st, kind, n = running.pop(ref)
            if ref not in st.inflight:
                continue  # a reply from an actor that was replaced
            st.inflight.discard(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as e:  # an error raised by our code: bad input, not a lost worker
                cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
                raise cause from None
            except RayActorError as e:
                st.restarts += 1
                for r in st.inflight:
                    running.pop(r, None)
                st.inflight = set()
                ray.kill(st.actor, no_restart=True)
                if st.restarts > max_restarts:
                    raise RayJobError(f"the worker of shard {st.shard} died {st.restarts} times (last: "
                                      f"{type(e).__name__}); its store {stream_dir(out, st.shard)} keeps the last "
                                      "snapshot: fix the cause and rerun with --resume") from None
                log.warning("worker of shard %d (pid %s) died; restarting it from its last snapshot (%d of %d)",
                            st.shard, st.pid, st.restarts, max_restarts)
                launch(st)
                continue
            if kind == "open":
                done_ids = result["edit_ids"]
                check_resumable([_Pair(*p) for p in result["pairs"]], [r for _, r in st.items])
                if done_ids != [i for i, _ in st.items[: len(done_ids)]]:
                    raise RayJobError(f"stream store {stream_dir(out, st.shard)} holds edit ids {done_ids[:5]}..., "
                                      "not this shard's first edits: resume with the same --shards and edit file")
                st.done = st.sent = len(done_ids)
                st.pid = result["pid"]
                resumed_after.setdefault(st.shard, len(done_ids))
                if len(resumed_after) == min(workers, n_shards) and not warm:
                    warm.update(t=time.perf_counter(), done=sum(x.done for x in streams))
                emit("open", st.shard, {"pid": st.pid, "done": st.done})
                refresh()
                submit(st)
                submit(st)
            elif kind == "edit":
                st.done += n
                emit("progress", st.shard, {"done": st.done})
                refresh()
                submit(st)
            else:
                st.snapshot = result
                ray.kill(st.actor, no_restart=True)
                st.actor = None
                emit("finish", st.shard, {"snapshot": result})
                if pending:
                    launch(pending.pop(0))
        t_end = time.perf_counter()
        seconds = t_end - t0
        bar.close()
        merged = merge_streams(out, n_shards, keep=keep)
        write_job_spec(out, spec)
    except BaseException:
        bar.close()
        stop_all()
        raise
    finally:
        if started:
            ray.shutdown()
    n_new = sum(len(st.items) - resumed_after.get(st.shard, 0) for st in streams)
    summary = {
        "snapshot": str(merged),
        "n_shards": n_shards,
        "workers": workers,
        "edits_total": len(requests),
        "edits_this_run": n_new,
        "resumed_after": sum(resumed_after.values()),
        "seconds": round(seconds, 2),
        "edits_per_s": round(n_new / seconds, 3) if n_new else None,
        # after every first-wave worker has loaded its model: the editing rate without start-up
        "startup_s": round(warm["t"] - t0, 2) if warm else None,
        "edits_per_s_warm": round((len(requests) - warm["done"]) / (t_end - warm["t"]), 3)
        if warm and t_end > warm["t"] and len(requests) > warm["done"] else None,
        "per_shard": {str(st.shard): len(st.items) for st in streams},
        "restarts": {str(st.shard): st.restarts for st in streams if st.restarts},
        "streams": {str(st.shard): st.snapshot for st in streams},
    }
    log.info("job done: %d edits in %.1f s (%.2f edits/s) over %d shards", n_new, seconds,
             summary["edits_per_s"] or 0.0, n_shards)
    return summary


@dataclass
class _Pair:
    prompt: str
    target: str


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
