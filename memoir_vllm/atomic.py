"""Atomic writes: a reader sees the old file (or directory) or the new one, never a part of either.

A file is written to a temporary file in the same directory, fsynced, then renamed over the old
one; a directory is filled under a temporary name, its files are fsynced, then it is renamed.
Files written here get mode 0o666 & ~umask, what a plain open(path, "w") gives.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

TMP_PREFIX = ".tmp-"  # atomic_dir's temporary directories: .tmp-NAME-XXXXXXXX


def file_mode() -> int:
    """0o666 & ~umask: the mode a new file gets from a plain open(path, "w")."""
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return 0o666 & ~umask


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries (names created, renamed or removed in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` as a whole: temporary file next to it, fsync, rename. Returns the path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), file_mode())  # mkstemp makes 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """write_bytes_atomic() of a string."""
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """write_text_atomic() of json.dumps(obj, indent=indent, default=default)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=default))


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """A new temporary directory next to `final` that becomes `final` when the block ends without error.

    On leaving the block its files are fsynced and given mode 0o666 & ~umask (whatever wrote them),
    then it is renamed to `final` (which must not exist). On an error it is removed.

        with atomic_dir(store / "v000002") as tmp:
            (tmp / "manifest.json").write_text(...)
    """
    final = Path(final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        mode = file_mode()
        for p in tmp.rglob("*"):
            if p.is_symlink():
                continue
            if p.is_file():
                os.chmod(p, mode)  # some writers (safetensors) go through a 0600 temporary file
            fsync_path(p)
        fsync_path(tmp)
        os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def writable_dir(path: str | Path) -> Path:
    """Create the directory `path` if needed and prove a file can be written in it (a probe file, removed again);
    raises OSError otherwise. Callers check this before any work that would write there."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".probe-{uuid.uuid4().hex}"
    probe.touch()
    probe.unlink()
    return path


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
