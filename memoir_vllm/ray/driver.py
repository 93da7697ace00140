"""The driver side of a Ray edit job (see memoir_vllm.ray.jobs): the actor class and RayEditJob, the event loop.

RayEditJob gives each stream an actor (at most `workers` at once), keeps two edit batches queued
per actor, restarts a dead actor from its stream's newest snapshot, and merges the stream stores
when every stream has finished. Each actor call's reply goes to its own handler: on_open (the
stream's state), on_edit (a batch done), on_finish (its final snapshot) or on_death (a lost actor).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from ..edit_job import check_resumable
from ..edits import EditRequest
from .shards import merge_streams, read_job_spec, stream_dir, stream_items, write_job_spec
from .stream import EditStream

log = logging.getLogger(__name__)


class RayJobError(RuntimeError):
    """A Ray edit job that cannot start or finish: no cluster, a worker that keeps dying, bad setup."""


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


@dataclass
class JobPlan:
    """A validated job (memoir_vllm.ray.jobs.plan_job): its edits, shards, actors and the streams' settings."""

    out: Path
    requests: list[EditRequest]
    n_shards: int
    workers: int  # actors at once, at most n_shards
    spec: dict[str, Any]  # what OUT/streams/job.json records
    model: str | None = None
    settings: dict[str, Any] | None = None
    background: str | Path | None = None
    every: int = 50
    threads: int = 1
    chunk: int = 4
    keep: int = 3
    max_restarts: int = 3


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


@dataclass
class _Pair:
    prompt: str
    target: str


class RayEditJob:
    """Runs a JobPlan on an initialised Ray: run() edits and merges, summary() reports."""

    def __init__(self, plan: JobPlan, progress: bool = True,
                 on_event: Callable[[str, int, dict[str, Any]], None] | None = None) -> None:
        import ray

        self.plan = plan
        self.actor_cls = ray.remote(RemoteStream)
        self.streams = [_Stream(s, stream_items(plan.requests, plan.n_shards, s)) for s in range(plan.n_shards)]
        self.pending = list(self.streams)  # streams not yet given an actor
        self.running: dict[Any, tuple[_Stream, Callable[[Any], None]]] = {}  # object ref -> (stream, its handler)
        self.progress = progress
        self.emit = on_event or (lambda *_: None)
        self.resumed_after: dict[int, int] = {}  # shard -> edits its store held when its first actor opened
        self.warm: tuple[float, int] | None = None  # when every first-wave actor had opened, and edits done by then
        self.t0 = self.t_end = 0.0
        self.merged: Path | None = None

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> Path:
        """Edit every stream to its end, merge the stream stores into OUT; returns the merged version."""
        p = self.plan
        if read_job_spec(p.out) is None:
            write_job_spec(p.out, p.spec)  # a resumed job's spec is updated only once it has finished
        self.bar = tqdm(total=len(p.requests), desc=f"editing ({p.n_shards} shards)", unit="edit",
                        disable=not self.progress)
        self.t0 = time.perf_counter()
        try:
            while self.pending and sum(1 for st in self.streams if st.actor is not None) < p.workers:
                self.launch(self.pending.pop(0))
            while self.running:
                self._next_reply()
            self.t_end = time.perf_counter()
            self.bar.close()
            self.merged = merge_streams(p.out, p.n_shards, keep=p.keep)
            write_job_spec(p.out, p.spec)
        except BaseException:
            self.bar.close()
            self.stop_all()
            raise
        return self.merged

    def _next_reply(self) -> None:
        """Wait (at most 1 s, so Ctrl-C stays responsive) for one actor reply and hand it to its handler."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=1.0)
        if not ready:
            return
        ref = ready[0]
        st, handler = self.running.pop(ref)
        if ref not in st.inflight:
            return  # a reply from an actor that was replaced
        st.inflight.discard(ref)
        try:
            result = ray.get(ref)
        except RayTaskError as e:  # an error raised by our code: bad input, not a lost worker
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
            raise cause from None
        except RayActorError as e:
            self.on_death(st, e)
            return
        handler(result)

    def _track(self, st: _Stream, ref: Any, handler: Callable[[Any], None]) -> None:
        self.running[ref] = (st, handler)
        st.inflight.add(ref)

    # -- actor calls and their handlers -----------------------------------------------------------

    def launch(self, st: _Stream) -> None:
        """Start an actor for the stream and ask it for the stream's state (its store may hold edits)."""
        p = self.plan
        st.actor = self.actor_cls.options(num_cpus=p.threads, max_restarts=0, max_task_retries=0).remote(
            str(stream_dir(p.out, st.shard)), p.model, p.settings, p.background, p.every, p.threads, p.keep)
        st.sent, st.inflight = 0, set()
        self._track(st, st.actor.state.remote(), lambda state: self.on_open(st, state))

    def submit(self, st: _Stream) -> None:
        """Send the stream's next batch, or, once all are sent and done, ask for its final snapshot."""
        if st.sent >= len(st.items):
            if not st.inflight:
                self._track(st, st.actor.finish.remote(), lambda snapshot: self.on_finish(st, snapshot))
            return
        part = st.items[st.sent : st.sent + self.plan.chunk]
        batch = {"edit_id": [i for i, _ in part], "prompt": [r.prompt for _, r in part],
                 "target": [r.target for _, r in part], "source": [r.source for _, r in part],
                 "subject": [list(r.subject) for _, r in part]}
        self._track(st, st.actor.edit_batch.remote(batch), lambda _: self.on_edit(st, len(part)))
        st.sent += len(part)

    def on_open(self, st: _Stream, state: dict[str, Any]) -> None:
        """An actor is up: check what its store holds, then queue two batches."""
        done_ids = state["edit_ids"]
        check_resumable([_Pair(*p) for p in state["pairs"]], [r for _, r in st.items])
        if done_ids != [i for i, _ in st.items[: len(done_ids)]]:
            raise RayJobError(f"stream store {stream_dir(self.plan.out, st.shard)} holds edit ids {done_ids[:5]}..., "
                              "not this shard's first edits: resume with the same --shards and edit file")
        st.done = st.sent = len(done_ids)
        st.pid = state["pid"]
        self.resumed_after.setdefault(st.shard, len(done_ids))
        if len(self.resumed_after) == self.plan.workers and self.warm is None:
            self.warm = (time.perf_counter(), sum(x.done for x in self.streams))
        self.emit("open", st.shard, {"pid": st.pid, "done": st.done})
        self._refresh()
        self.submit(st)
        self.submit(st)

    def on_edit(self, st: _Stream, n: int) -> None:
        """A batch of n edits is done: queue the next."""
        st.done += n
        self.emit("progress", st.shard, {"done": st.done})
        self._refresh()
        self.submit(st)

    def on_finish(self, st: _Stream, snapshot: str) -> None:
        """The stream wrote its final snapshot: stop its actor and give a waiting stream one."""
        import ray

        st.snapshot = snapshot
        ray.kill(st.actor, no_restart=True)
        st.actor = None
        self.emit("finish", st.shard, {"snapshot": snapshot})
        if self.pending:
            self.launch(self.pending.pop(0))

    def on_death(self, st: _Stream, error: BaseException) -> None:
        """The stream's actor died: drop its calls and start a new one on the same store (it resumes there)."""
        import ray

        st.restarts += 1
        for r in st.inflight:
            self.running.pop(r, None)
        st.inflight = set()
        ray.kill(st.actor, no_restart=True)
        if st.restarts > self.plan.max_restarts:
            raise RayJobError(f"the worker of shard {st.shard} died {st.restarts} times (last: "
                              f"{type(error).__name__}); its store {stream_dir(self.plan.out, st.shard)} keeps the "
                              "last snapshot: fix the cause and rerun with --resume") from None
        log.warning("worker of shard %d (pid %s) died; restarting it from its last snapshot (%d of %d)",
                    st.shard, st.pid, st.restarts, self.plan.max_restarts)
        self.launch(st)

    def stop_all(self) -> None:
        """Kill every actor still running."""
        import ray

        for st in self.streams:
            if st.actor is not None:
                ray.kill(st.actor, no_restart=True)
                st.actor = None

    def _refresh(self) -> None:
        self.bar.n = sum(st.done for st in self.streams)
        self.bar.set_postfix_str(" ".join(f"s{st.shard}:{st.done}/{len(st.items)}" for st in self.streams),
                                 refresh=False)
        self.bar.refresh()

    # -- the result -------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Merged snapshot, edits, seconds, edits/s (also after start-up), per-shard counts, restarts."""
        p, streams, warm = self.plan, self.streams, self.warm
        seconds = self.t_end - self.t0
        n_total = len(p.requests)
        n_new = sum(len(st.items) - self.resumed_after.get(st.shard, 0) for st in streams)
        summary = {
            "snapshot": str(self.merged),
            "n_shards": p.n_shards,
            "workers": p.workers,
            "edits_total": n_total,
            "edits_this_run": n_new,
            "resumed_after": sum(self.resumed_after.values()),
            "seconds": round(seconds, 2),
            "edits_per_s": round(n_new / seconds, 3) if n_new else None,
            # after every first-wave worker has loaded its model: the editing rate without start-up
            "startup_s": round(warm[0] - self.t0, 2) if warm else None,
            "edits_per_s_warm": round((n_total - warm[1]) / (self.t_end - warm[0]), 3)
            if warm and self.t_end > warm[0] and n_total > warm[1] else None,
            "per_shard": {str(st.shard): len(st.items) for st in streams},
            "restarts": {str(st.shard): st.restarts for st in streams if st.restarts},
            "streams": {str(st.shard): st.snapshot for st in streams},
        }
        log.info("job done: %d edits in %.1f s (%.2f edits/s) over %d shards", n_new, seconds,
                 summary["edits_per_s"] or 0.0, p.n_shards)
        return summary
