"""What one input may cost, with a clear one-line error past each limit and a setting to raise it.

Every limit is an environment variable (docs/reliability.md lists them):

- ``GPUDOCTOR_MAX_DECOMPRESSED_MB`` (default 8192): bytes a gzip input may inflate to (``.json.gz``,
  ncu ``.csv.gz``, nccl-tests ``.log.gz``, nsys ``.sqlite.gz``, which is inflated into a temporary file), checked while inflating, so a small decompression bomb stops
  at the limit instead of filling memory.
- ``GPUDOCTOR_MAX_GZIP_RATIO`` (default 200): inflated size per compressed byte, checked past the first
  64 MiB. Real traces compress 5-30x; a bomb compresses 1000x.
- ``GPUDOCTOR_MAX_JSON_DEPTH`` (default 256): nesting of small JSON documents (manifests, config-like
  files); deeper documents are refused before parsing (the parsers would recurse).
- ``GPUDOCTOR_MAX_PICKLE_OBJECTS`` (default 20000000): containers a memory snapshot may expand to when
  every shared reference is counted once per use (what the snapshot reader walks).
- ``GPUDOCTOR_MAX_CONFIG_MB`` (default 16): size of config-like inputs (``--config``, ``--ceilings``,
  manifests). Only regular files are read (or ``-`` for stdin where a command allows it): a FIFO or a
  device (``/dev/zero``) is refused without reading.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import sys
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpudoctor.errors import GpudoctorError, InputError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MIB = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
_RATIO_FLOOR_BYTES = 64 * MIB

DEFAULTS = {
    "GPUDOCTOR_MAX_DECOMPRESSED_MB": 8192,
    "GPUDOCTOR_MAX_GZIP_RATIO": 200,
    "GPUDOCTOR_MAX_JSON_DEPTH": 256,
    "GPUDOCTOR_MAX_PICKLE_OBJECTS": 20_000_000,
    "GPUDOCTOR_MAX_CONFIG_MB": 16,
}


def limit(name: str) -> int:
    """The current value of limit ``name`` (its environment variable, else the default)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return DEFAULTS[name]
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise GpudoctorError(f"{name} must be a positive integer, got {raw[:40]!r}")
    return value


def _raise_hint(name: str) -> str:
    return f"raise it with {name}=N"


# ----------------------------------------------------------------------------------------------------
# gzip


class BoundedGzip(io.RawIOBase):
    """A gzip stream that refuses to inflate past the limits (see the module docstring)."""

    def __init__(self, fileobj, path: str | os.PathLike, compressed_bytes: int):
        super().__init__()
        self._fileobj = fileobj  # closed with this stream (GzipFile leaves it open)
        self._gz = gzip.GzipFile(fileobj=fileobj, mode="rb")
        self._path = path
        max_mb = limit("GPUDOCTOR_MAX_DECOMPRESSED_MB")
        ratio = limit("GPUDOCTOR_MAX_GZIP_RATIO")
        self._max_bytes = max_mb * MIB
        self._ratio_bytes = max(_RATIO_FLOOR_BYTES, ratio * max(compressed_bytes, 1))
        self._max_mb, self._ratio = max_mb, ratio
        self.inflated = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks = []
            while chunk := self.read(MIB):
                chunks.append(chunk)
            return b"".join(chunks)
        try:
            data = self._gz.read(n)
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(self._path, f"corrupt gzip: {' '.join(str(e).split())}") from None
        self.inflated += len(data)
        if self.inflated > self._max_bytes:
            raise InputError(self._path, f"gzip inflates to more than {self._max_mb} MB "
                                         f"({_raise_hint('GPUDOCTOR_MAX_DECOMPRESSED_MB')})")
        if self.inflated > self._ratio_bytes:
            raise InputError(self._path, f"gzip inflates more than {self._ratio}x (a decompression bomb?; "
                                         f"{_raise_hint('GPUDOCTOR_MAX_GZIP_RATIO')})")
        return data

    def readinto(self, b: WriteableBuffer) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._gz.close()
        self._fileobj.close()
        super().close()


def gunzip(data: bytes, path: str | os.PathLike) -> bytes:
    """``data`` inflated, within the limits; a one-line InputError on corrupt gzip or past a limit."""
    with BoundedGzip(io.BytesIO(data), path, len(data)) as g:
        return g.read()


def is_gzip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def open_input(path: str | os.PathLike) -> io.BufferedReader:
    """A binary stream of the file's bytes, inflated within the limits when it is gzip."""
    raw = open(path, "rb")
    try:
        magic = raw.read(2)
        raw.seek(0)
        if magic != GZIP_MAGIC:
            return raw
        return io.BufferedReader(BoundedGzip(raw, path, os.fstat(raw.fileno()).st_size), buffer_size=MIB)
    except BaseException:
        raw.close()
        raise


# ----------------------------------------------------------------------------------------------------
# config-like files


def read_small_file(path: str | os.PathLike, what: str, *, allow_stdin: bool = False) -> bytes:
    """The bytes of a small regular file (or stdin for ``-`` when ``allow_stdin``), within
    GPUDOCTOR_MAX_CONFIG_MB. FIFOs, devices and directories are refused without being opened."""
    max_bytes = limit("GPUDOCTOR_MAX_CONFIG_MB") * MIB
    too_big = f"larger than {max_bytes // MIB} MB, too large for {what} ({_raise_hint('GPUDOCTOR_MAX_CONFIG_MB')})"
    if str(path) == "-" and allow_stdin:
        data = sys.stdin.buffer.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise InputError("-", too_big)
        return data
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise InputError(path, f"is {kind}, expected {what} (a regular file)")
    if st.st_size > max_bytes:
        raise InputError(path, too_big)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise InputError(path, too_big)
    return data


# ----------------------------------------------------------------------------------------------------
# JSON


def json_depth(data: bytes | str) -> int:
    """Deepest nesting of ``[`` / ``{`` in a JSON text, brackets inside strings ignored (vectorized)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    a = np.frombuffer(raw, dtype=np.uint8)
    if not len(a):
        return 0
    backslash = a == 0x5C
    idx = np.arange(len(a), dtype=np.int64)
    # A quote is escaped when an odd run of backslashes precedes it.
    last_other = np.maximum.accumulate(np.where(backslash, -1, idx))
    run_before = np.empty(len(a), dtype=np.int64)
    run_before[0] = 0
    run_before[1:] = idx[:-1] - last_other[:-1]
    quote = (a == 0x22) & (run_before % 2 == 0)
    in_string = (np.cumsum(quote, dtype=np.int64) % 2) == 1
    step = np.zeros(len(a), dtype=np.int32)
    step[(a == 0x5B) | (a == 0x7B)] = 1
    step[(a == 0x5D) | (a == 0x7D)] = -1
    step[in_string] = 0
    return int(np.cumsum(step).max(initial=0))


def check_json_depth(data: bytes | str, path: str | os.PathLike) -> None:
    max_depth = limit("GPUDOCTOR_MAX_JSON_DEPTH")
    depth = json_depth(data)
    if depth > max_depth:
        raise InputError(path, f"JSON nested {depth} levels deep, more than {max_depth} "
                               f"({_raise_hint('GPUDOCTOR_MAX_JSON_DEPTH')})")


def loads_json(data: bytes | str, path: str | os.PathLike, what: str = "JSON") -> Any:
    """Parse a small JSON document within the depth limit; a one-line InputError otherwise."""
    import json

    check_json_depth(data, path)
    try:
        return json.loads(data)
    except UnicodeDecodeError:
        raise InputError(path, f"invalid UTF-8 in {what}") from None
    except (ValueError, RecursionError) as e:
        raise InputError(path, f"invalid {what}: {' '.join(str(e).split())}") from None


def read_json_file(path: str | os.PathLike, what: str, *, allow_stdin: bool = False) -> Any:
    """A small JSON file (regular file, size and depth limits), parsed."""
    data = read_small_file(path, what, allow_stdin=allow_stdin)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return loads_json(data, path, what)


# ----------------------------------------------------------------------------------------------------
# pickles


def check_pickle_expansion(obj: object, path: str | os.PathLike) -> int:
    """Containers ``obj`` expands to when each shared reference counts once per use; raise past the
    limit. Linear in the distinct objects: each container's expanded size is computed once (by id)."""
    max_objects = limit("GPUDOCTOR_MAX_PICKLE_OBJECTS")
    sizes: dict[int, int] = {}
    stack: list[tuple[object, bool]] = [(obj, False)]
    while stack:
        o, done = stack.pop()
        key = id(o)
        if done:
            total = 1
            for child in _children(o):
                total += sizes.get(id(child), 0)
            sizes[key] = total
            if total > max_objects:
                raise InputError(path, f"the pickle expands to more than {max_objects:,} objects through shared "
                                       f"references (memo amplification; {_raise_hint('GPUDOCTOR_MAX_PICKLE_OBJECTS')})")
            continue
        if key in sizes or not isinstance(o, (dict, list, tuple, set, frozenset)):
            continue
        sizes[key] = 0  # in progress: a cycle counts once
        stack.append((o, True))
        for child in _children(o):
            if isinstance(child, (dict, list, tuple, set, frozenset)) and id(child) not in sizes:
                stack.append((child, False))
    return sizes.get(id(obj), 0)


def _children(o):
    if isinstance(o, dict):
        for k, v in o.items():
            yield k
            yield v
    elif isinstance(o, (list, tuple, set, frozenset)):
        yield from o
