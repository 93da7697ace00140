"""One writer per snapshot store: an exclusive lock on STORE/.write.lock (the `filelock` package).

A writer (`memoir edit`, `memoir snapshot disable/subject`, `memoir calibrate --write`, `Memoir.save`) holds the
lock from before it reads the newest version until its last version is written, so two writers cannot both
build on the same version and lose each other's edits. A second writer fails at once with the holder's pid,
host, command and start time (STORE/.write.holder), or waits for it (`wait=True`, `--wait`). Readers (loading
a version, `memoir serve`) never take the lock: versions are complete directories and LATEST is replaced
atomically (memoir_vllm.atomic).

The lock is an OS lock (flock) on a file in the store: it is released when the holder exits, even by a crash,
and a stale .write.holder is only informative. On a shared filesystem it holds across machines only where the
filesystem implements flock across clients (NFSv4, Lustre and GPFS do; NFSv3 without lockd does not):
otherwise filelock falls back to a lock file's existence, which a crashed holder leaves behind (remove
STORE/.write.lock by hand after checking the holder is gone).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK, HOLDER = ".write.lock", ".write.holder"


class StoreLockedError(RuntimeError):
    """Another writer holds the store's write lock."""


def holder(root: str | Path) -> dict | None:
    """Who holds (or last held) the store's write lock, as written by that writer."""
    try:
        return json.loads((Path(root) / HOLDER).read_text())
    except (OSError, ValueError):
        return None


def _describe(h: dict | None) -> str:
    if not h:
        return "another writer"
    return f"pid {h.get('pid')} on {h.get('host')} ({h.get('command', '?')}, since {h.get('since', '?')})"


@contextmanager
def write_lock(root: str | Path, wait: bool | float = False) -> Iterator[None]:
    """Hold STORE's write lock for the block; re-entrant within a process (an edit job's saves).

    wait: False fails at once with StoreLockedError naming the holder; True waits as long as it takes; a number
    waits that many seconds.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCK), is_singleton=True, thread_local=False)
    outer = not lock.is_locked
    timeout = 0 if wait is False else (-1 if wait is True else float(wait))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise StoreLockedError(f"snapshot store {root} is being written by {_describe(holder(root))}: wait for it "
                               "to finish, or pass --wait (wait=True) to queue behind it") from None
    try:
        if outer:
            (root / HOLDER).write_text(json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        yield
    finally:
        lock.release()
