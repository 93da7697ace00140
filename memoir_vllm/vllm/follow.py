"""A served store follows its LATEST: new versions are loaded beside the engine and swapped in between steps.

`memoir serve --snapshot STORE` (or MEMOIR_SNAPSHOT=STORE) follows the store; a version directory
(`STORE/v000003`) pins that version (a rollback is a pin of an older one). A thread polls STORE/LATEST every
`interval` seconds (MEMOIR_FOLLOW_INTERVAL, default 0.5; MEMOIR_FOLLOW=0 pins whatever LATEST names at start);
when it names a new version the thread loads it (checksums, the served model's identity, the encoder's
vectors) and hands it over; the runner hook swaps it in before the next step (Router.swap: requests in
flight finish with the memory they were routed with, new requests use the new one). A version that fails to
load is logged as an error, counted, and not retried until LATEST moves again; the last good one keeps
serving.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..snapshot import LATEST, version_name, version_number

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A version ready to swap in: its directory and its memory, already on the served device."""

    path: str
    memory: Any
    seconds: float


def version_of(path: str | Path) -> int:
    """The version number a store's LATEST names now (a version directory: its own), 0 if unreadable. Cached by
    LATEST's mtime, so the engine core pays one stat per request."""
    p = Path(path)
    latest = p / LATEST
    try:
        stamp = latest.stat().st_mtime_ns
    except OSError:
        return version_number(p.name)
    hit = _VERSIONS.get(str(p))
    if hit is None or hit[0] != stamp:
        try:
            hit = (stamp, version_number(latest.read_text().strip()))
        except OSError:
            return 0
        _VERSIONS[str(p)] = hit
    return hit[1]


_VERSIONS: dict[str, tuple[int, int]] = {}


def follows(path: str | Path) -> bool:
    """A store directory (it has LATEST) is followed, a version directory is pinned."""
    return (Path(path) / LATEST).is_file() and os.environ.get("MEMOIR_FOLLOW", "1") != "0"


class StoreFollower:
    """Polls a store's LATEST in a daemon thread; `take()` returns a newly loaded version once."""

    def __init__(self, store: str | Path, current: str, load: Callable[[str], Any], interval: float | None = None,
                 salted: bool = True):
        self.store = Path(store)
        self.salted = salted  # the engine core salts requests with this store's versions (take(wanted) honours them)
        self.current = Path(current).name  # the version being served
        self.load = load  # version dir -> memory ready to serve (raises when the version is refused)
        self.interval = float(os.environ.get("MEMOIR_FOLLOW_INTERVAL", "0.5")) if interval is None else interval
        self.refused: str | None = None  # a version that failed to load: not retried until LATEST moves
        self.counts = {"reloads": 0, "load_failures": 0}
        self._ready: Loaded | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memoir-follow", daemon=True)
        self._thread.start()

    def _latest(self) -> str | None:
        try:
            return (self.store / LATEST).read_text().strip() or None
        except OSError:
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            name = self._latest()
            with self._lock:
                pending = self._ready.path if self._ready is not None else None
            if name is None or name in (self.current, self.refused) or (pending and Path(pending).name == name):
                continue
            loaded = self._load(name)
            if loaded is not None:
                with self._lock:
                    self._ready = loaded

    def _load(self, name: str) -> Loaded | None:
        """Version `name` loaded, or None when it is refused (then logged, counted and not retried)."""
        path = str(self.store / name)
        t0 = time.perf_counter()
        try:
            return Loaded(path, self.load(path), time.perf_counter() - t0)
        except Exception as e:  # refused: keep serving the last good version, loudly
            self.refused = name
            self.counts["load_failures"] += 1
            log.error("memoir: %s refused, still serving %s: %s", path, self.current, e)
            return None

    def take(self, wanted: int = 0) -> Loaded | None:
        """A version newer than the one served, to swap in now (None if none): the one the thread loaded, or
        with `wanted` newer than both, version `wanted` loaded here and now (the engine core has already
        salted a request with it, so it must not run on an older one)."""
        with self._lock:
            ready, self._ready = self._ready, None
        current = version_number(self.current)
        if ready is not None and version_number(Path(ready.path).name) <= current:
            ready = None  # the thread loaded what was already swapped in
        have = version_number(Path(ready.path).name) if ready is not None else current
        if self.salted and wanted > have and version_name(wanted) != self.refused:
            ready = self._load(version_name(wanted)) or ready  # refused: the request runs on the last good one
        if ready is not None:
            self.current = Path(ready.path).name
            self.counts["reloads"] += 1
        return ready

    def stop(self) -> None:
        self._stop.set()
