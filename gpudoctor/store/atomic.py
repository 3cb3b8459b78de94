"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Everything is written to ``<path>.tmp-<pid>-<random>`` in the target's directory (same filesystem, so
the final ``os.replace`` is an atomic rename) and renamed into place only when the write finished. On an
exception (KeyboardInterrupt included) the temporary file is removed and the target is untouched. The
random part keeps two writers with the same pid (two containers sharing a directory) apart.

What is never renamed over:

- ``-`` is standard output (``atomic_write_*`` only).
- A symlink is followed: its target is replaced, the link stays.
- A FIFO, a device (``/dev/null``, ``/dev/stdout``) or a socket is written in place by
  ``atomic_write_*`` (a rename would replace the device node), and refused by ``atomic_path``.

``check_writable(path)`` answers "can this output be written?" before a long computation, so that an
unwritable path is a one-line error up front, not a failure after the work.

``fsync=True`` also flushes the file and its directory to disk before and after the rename, so the
new contents survive a power loss; without it the write is atomic against crashes of the process
(the usual case) but not against the machine losing power.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gpudoctor.errors import GpudoctorError

STDOUT = "-"


def temp_path(path: str | os.PathLike) -> Path:
    """A new temporary name for writing ``path``: ``<path>.tmp-<pid>-<8 hex>`` in the same directory."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def resolve_output(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` lands in: the final target when ``path`` is a symlink (or sits under
    one), else ``path`` itself."""
    return Path(os.path.realpath(path))


def is_special(path: str | os.PathLike) -> bool:
    """True for an existing FIFO, device or socket: written in place, never renamed over."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_writable(path: str | os.PathLike | None, what: str = "output") -> None:
    """Raise a one-line GpudoctorError when ``path`` cannot be written (before doing the work).

    A temporary file is created and removed next to the target, which catches read-only filesystems and
    missing permissions alike (also for root). A missing parent directory is fine when its nearest
    existing ancestor is a writable directory (writers create it)."""
    if path is None or str(path) == STDOUT:
        return
    target = resolve_output(path)
    if target.is_dir():
        raise GpudoctorError(f"{path}: is a directory, cannot write the {what} there")
    if is_special(target):
        if not os.access(target, os.W_OK):
            raise GpudoctorError(f"{path}: cannot write the {what} there (permission denied)")
        return
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise GpudoctorError(f"{path}: cannot write the {what}: {parent} is not a directory")
    if parent != target.parent:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise GpudoctorError(f"{path}: cannot create its directory in {parent} (permission denied)")
        return
    probe = temp_path(target)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise GpudoctorError(f"{path}: cannot write the {what} there ({e.strerror or e})") from None


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
    yet or is an empty directory). ``path`` is resolved through symlinks first (the target is
    replaced); a FIFO, device or socket is refused. If the block raises, or leaves nothing at the temporary
    path, nothing is renamed: the temporary path is removed and ``path`` keeps its old contents (or
    stays absent); the exception propagates.
    """
    path = resolve_output(path)
    if is_special(path):
        raise GpudoctorError(f"{path}: not a regular file (a FIFO, device or socket); refusing to replace it")
    tmp = temp_path(path)
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written (atomic write of {path})")
        if tmp.is_file():
            _keep_mode(path, tmp)
            if fsync:
                _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent if str(path.parent) else Path("."))


def _keep_mode(path: Path, tmp: Path) -> None:
    """A replaced file keeps its permission bits (a new one gets the umask's)."""
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
    except OSError:
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk by default). Returns ``path``.

    ``-`` writes to standard output; a FIFO or device is written in place (see the module docstring)."""
    if str(path) == STDOUT:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return Path(STDOUT)
    path = Path(path)
    target = resolve_output(path)
    if is_special(target):
        with open(target, "wb") as f:
            f.write(data)
        return path
    with atomic_path(target, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8, newlines as given). Returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)
