"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Everything is written to ``<path>.tmp-<pid>`` in the target's directory (same filesystem, so the
final ``os.replace`` is an atomic rename) and renamed into place only when the write finished. On an
exception (KeyboardInterrupt included) the temporary file is removed and the target is untouched.

``fsync=True`` also flushes the file and its directory to disk before and after the rename, so the
new contents survive a power loss; without it the write is atomic against crashes of the process
(the usual case) but not against the machine losing power.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name used for writing ``path``: ``<path>.tmp-<pid>`` in the same directory."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    except FileNotFoundError:
        pass


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The caller writes the temporary path (a file; a directory works too when ``path`` does not exist
    yet or is an empty directory). A stale temporary file of the same name, left by a killed process
    with the same pid, is removed first. If the block raises, or leaves nothing at the temporary
    path, nothing is renamed: the temporary path is removed and ``path`` keeps its old contents (or
    stays absent); the exception propagates.
    """
    path = Path(path)
    tmp = temp_path(path)
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written (atomic write of {path})")
        if fsync and tmp.is_file():
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent if str(path.parent) else Path("."))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk by default). Returns ``path``."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8, newlines as given). Returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)
