"""Readers: raw exports -> trace model. Each reader is ``read(path, rank=None) -> Trace``.

``detect(path)`` sniffs the format from the first bytes (never from the extension alone), so a
misnamed file still gets the right reader or a clear error.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from gpudoctor.collect.rundir import MANIFEST, RUN_DB
from gpudoctor.errors import InputError

SQLITE_MAGIC = b"SQLite format 3\x00"

_RANK_PATTERNS = (
    re.compile(r"(?<![a-z])rank[_\-.]?(\d+)(?!\d)", re.I),  # rank0, rank_3, rank-12, rank.4
    re.compile(r"\.r(\d+)\.", re.I),  # trace.r3.sqlite
)


# Compressions gpudoctor does not read: named in the error instead of "not a recognized trace".
_OTHER_COMPRESSIONS = {b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ\x00": ("xz", "unxz"),
                       b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"), b"\x04\x22\x4d\x18": ("lz4", "unlz4")}


def _head(path: Path, n: int = 4096) -> bytes:
    from gpudoctor.readers.limits import open_input

    try:
        with open_input(path) as f:
            return f.read(n)
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None


def detect(path: str | Path) -> str:
    """Return the format name of ``path`` or raise InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        try:
            names = set(os.listdir(path))
        except OSError as e:
            raise InputError(path, f"cannot read the directory: {e.strerror or e}") from None
        if MANIFEST in names or RUN_DB in names:
            return "run_dir"
        raise InputError(path, f"directory holds no gpudoctor run (no {MANIFEST} or {RUN_DB})")
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, "not a regular file (a FIFO, socket or device); gpudoctor reads files")
    if st.st_size == 0:
        raise InputError(path, "empty file")
    if path.suffix == ".nsys-rep":
        return "nsys_rep"
    if path.suffix == ".ncu-rep":
        return "ncu_rep"
    head = _head(path)
    for magic, (name, tool) in _OTHER_COMPRESSIONS.items():
        if head.startswith(magic):
            raise InputError(path, f"{name}-compressed; gpudoctor reads plain or gzip files: "
                                   f"decompress it first ({tool} FILE)")
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"  # nsys export or a gpudoctor run.db; the reader checks which
    if head[:2] == b"\x80\x04" or head[:2] == b"\x80\x05" or head[:2] == b"\x80\x02":
        return "pickle"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text[:1] in (b"{", b"["):
        return "json"
    if head.startswith(b"ts_ns,device_id,"):
        return "nvml_csv"
    lowered = head.lower()
    if b"==prof==" in lowered or b'"id","process id"' in lowered or b'"kernel name"' in lowered:
        return "ncu_csv"
    if b"nccl-tests" in lowered or b"# nthread" in lowered or b"out-of-place" in lowered:
        return "nccl_tests"
    if b"# help" in lowered or b"# type" in lowered or b"vllm:" in lowered:
        return "prometheus"
    raise InputError(path, "not a recognized trace (expected nsys SQLite/.nsys-rep, PyTorch profiler JSON, "
                           "ncu CSV, nccl-tests log, CUDA memory snapshot or a gpudoctor run)")


def read_bytes(path: str | Path, expected: str, gunzip: bool = True) -> bytes:
    """The file's bytes (gunzipped when gzip), or a one-line InputError saying what is wrong.

    ``expected`` names what the reader wanted ("an Nsight Compute CSV export") for the directory case.
    """
    from gpudoctor.readers.limits import gunzip as bounded_gunzip

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, f"is a directory, expected {expected}") from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    if gunzip and data[:2] == b"\x1f\x8b":
        data = bounded_gunzip(data, path)
    return data


def rank_from_filename(name: str) -> int | None:
    """The rank a file name states (``rank0``, ``rank_3``, ``rank-12``, ``train.rank.4.json``,
    ``trace.r3.sqlite``), else None. The one rule every reader uses."""
    for rx in _RANK_PATTERNS:
        m = rx.search(name)
        if m:
            return int(m.group(1))
    return None
