"""nccl-tests output (``all_reduce_perf``, ``all_gather_perf``, ...) <-> trace model.

``read(path, rank=None) -> Trace`` reads the text that the nccl-tests binaries print (and that
``gpudoctor nccl-bench`` prints: it writes this same layout with gpudoctor.collect.nccltests_layout, so
that one reader serves both). The layout, from nccl-tests' src/common.cu and src/util.cu::

    # nThread 1 nGpus 1 minBytes 8 maxBytes 1073741824 step: 2(factor) warmup iters: 5 iters: 20 ...
    #
    # Using devices
    #  Rank  0 Group  0 Pid  41230 on   gpu-host device  0 [0x18] NVIDIA H200
    #  Rank  1 Group  0 Pid  41231 on   gpu-host device  1 [0x2a] NVIDIA H200
    #
    #                                                              out-of-place                       in-place
    #       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
    #        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
               8             2     float     sum      -1    18.53    0.00    0.00      0    18.21    0.00    0.00      0
    ...
    # Out of bounds values : 0 OK
    # Avg bus bandwidth    : 123.456
    #

Newer versions add ``# nccl-tests version ...`` / ``# Collective test starting: all_reduce_perf``
lines, a ``cputime`` column (``-C 1``), per-iteration columns (``i_min i_max i_p99 i_cv%``) and a
``timestamp`` column; old versions call ``#wrong`` ``error`` and may have no ``root``/``redop``
column. All of these are read. A column name the reader does not know is an error (one line).

What becomes what. The rows are measurements, not events on a timeline:

- ``meta["nccl_tests"]``: ``rows`` (one dict per row: op, size_bytes, count, type, dtype, redop, root,
  and per mode ``out_of_place_time_us`` / ``_algbw_gbps`` / ``_busbw_gbps`` / ``_wrong`` and the same
  for ``in_place``), ``sections`` (one per test in the file: op, binary, comm_size, devices,
  parameters, avg_busbw_gbps, out_of_bounds, complete), ``wrong_total`` (sum of ``#wrong`` over all
  rows and modes: any non-zero value means the collective returned wrong data), ``avg_busbw_gbps``,
  ``complete`` and ``gpudoctor`` (the ``# gpudoctor KEY: VALUE`` lines nccl-bench adds: link, ceiling).
- ``collectives``: one row per table row with op, bytes (the size column), dtype, comm_size (ranks
  listed under "Using devices"), source "nccl_tests" and start_ns = end_ns = 0 (no timeline).
- no ``ranks`` or ``devices`` rows: the log describes the whole job, not one rank's timeline, so it can
  be analyzed together with the per-rank traces of the same run (its devices are in the sections).
  ``rank`` (default 0) is the rank its collectives rows and findings are reported under.
- ``dropped``: a log that stops before its ``# Avg bus bandwidth`` line (a killed or crashed run) is
  still read, and counted once per unfinished test as "nccl-tests log ends early"; data-looking rows
  that cannot be parsed are counted as "unparseable nccl-tests row".

Bus bandwidth (nccl-tests' doc/PERFORMANCE.md): algbw = S / t; busbw = algbw x factor with factor
2(n-1)/n for all-reduce, (n-1)/n for all-gather, reduce-scatter and all-to-all, 1 for broadcast and
reduce. S is the ``size`` column: for all-gather the total output size (n x the per-rank input), for
reduce-scatter the total input size, for all-to-all the total per-rank buffer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from gpudoctor.errors import InputError
from gpudoctor.model.collectives import BINARY_OPS, OP_BINARIES, TYPE_DTYPES
from gpudoctor.model.trace import Trace
from gpudoctor.readers import read_bytes

FORMAT = "nccl_tests"
SOURCE = "nccl_tests"
R_ENDS_EARLY = "nccl-tests log ends early"
R_BAD_ROW = "unparseable nccl-tests row"

# Column names nccl-tests prints. Per-mode columns appear once for out-of-place, once for in-place.
_FIXED_COLUMNS = ("size", "count", "type", "redop", "root")
_MODE_COLUMNS = ("time", "cputime", "algbw", "busbw", "#wrong", "error", "i_min", "i_max", "i_p99", "i_cv%")
_KNOWN_COLUMNS = set(_FIXED_COLUMNS) | set(_MODE_COLUMNS) | {"timestamp"}
_MODE_KEYS = {"time": "time_us", "cputime": "time_us", "algbw": "algbw_gbps", "busbw": "busbw_gbps",
              "#wrong": "wrong", "error": "wrong", "i_min": "iter_min_us", "i_max": "iter_max_us",
              "i_p99": "iter_p99_us", "i_cv%": "iter_cv_pct"}
MODES = ("out_of_place", "in_place")

_RANK_LINE = re.compile(
    r"^#\s*Rank\s+(?P<rank>\d+)\s+Group\s+(?P<group>\d+)\s+Pid\s+(?P<pid>\d+)\s+on\s+(?P<host>\S+)\s+"
    r"device\s+(?P<dev>\d+)\s+\[(?P<bus>[^\]]*)\]\s*(?P<name>.*?)\s*$")
_NTHREAD = re.compile(r"^#\s*nThread\s+(\d+)\s+nGpus\s+(\d+)\s+minBytes\s+(\d+)\s+maxBytes\s+(\d+)"
                      r"(?:\s+step:\s*(\d+)\((\w+)\))?(.*)$")
_STARTING = re.compile(r"^#\s*Collective test starting:\s*(\S+)")
_OOB = re.compile(r"^#\s*Out of bounds values\s*:\s*(\d+)")
_AVG = re.compile(r"^#\s*Avg bus bandwidth\s*:\s*([-+0-9.eEnaif]+)")
_GPUDOCTOR = re.compile(r"^#\s*gpudoctor\s+([\w .-]+?)\s*:\s*(.*?)\s*$")
_INT = re.compile(r"^[0-9]+$")


# ----------------------------------------------------------------------------------------------------
# Parsing


@dataclass
class Section:
    op: str = ""
    binary: str = ""
    params: dict = field(default_factory=dict)
    devices: list[dict] = field(default_factory=list)
    columns: list[str] | None = None
    rows: list[dict] = field(default_factory=list)
    out_of_bounds: int | None = None
    avg_busbw_gbps: float | None = None
    complete: bool = False

    def started(self) -> bool:
        return bool(self.rows or self.columns or self.params or self.devices)


@dataclass
class Parsed:
    sections: list[Section]
    bad_rows: int
    gpudoctor: dict


def _op_from_binary(name: str) -> tuple[str, str]:
    stem = Path(name).name
    stem = stem[:-5] if stem.endswith("_perf") else stem
    stem = re.sub(r"_mpi$", "", stem)
    return BINARY_OPS.get(stem, stem), Path(name).name


def _op_from_filename(path: Path) -> str:
    name = path.name.lower()
    keys = sorted(set(BINARY_OPS) | {"all_to_all", "send_recv", "allreduce", "allgather", "reducescatter"},
                  key=len, reverse=True)  # all_reduce before reduce
    for key in keys:
        if re.search(rf"(^|[^a-z]){key}([^a-z]|$)", name):
            return BINARY_OPS.get(key, {"allreduce": "all_reduce", "allgather": "all_gather",
                                        "reducescatter": "reduce_scatter"}.get(key, key))
    return ""


def _op_from_rows(rows: list[dict], nranks: int) -> str:
    """The op whose bus-bandwidth factor, redop and root fit the rows (when nothing names the op)."""
    if nranks < 2:
        return ""
    ratios = []
    for r in rows:
        for mode in MODES:
            a, b = r.get(f"{mode}_algbw_gbps"), r.get(f"{mode}_busbw_gbps")
            if a and b and a >= 1.0:  # two printed decimals: small values are too coarse
                ratios.append(b / a)
    if not ratios:
        return ""
    ratio = sorted(ratios)[len(ratios) // 2]
    redop = str(rows[0].get("redop", ""))
    root = rows[0].get("root", -1)
    near = lambda f: abs(ratio - f) < 0.02 * f  # noqa: E731
    if near(2.0 * (nranks - 1) / nranks) and not near((nranks - 1) / nranks):
        return "all_reduce"
    if near((nranks - 1) / nranks) and not near(1.0):
        return "reduce_scatter" if redop not in ("none", "") else ("all_gather" if root in (-1, None) else "")
    if near(1.0) and root is not None and root >= 0:
        return "broadcast" if redop in ("none", "") else "reduce"
    return ""


def _columns(line: str, path: Path) -> list[str]:
    cols = line.lstrip("#").split()
    unknown = [c for c in cols if c not in _KNOWN_COLUMNS]
    if unknown:
        raise InputError(path, f"nccl-tests table has unknown column(s) {', '.join(unknown)} "
                               f"(known: {' '.join(sorted(_KNOWN_COLUMNS))})")
    if "size" not in cols or not ({"time", "cputime"} & set(cols)):
        raise InputError(path, "nccl-tests table header lacks the size or time column")
    return cols


_MAX_INT = 2 ** 62  # sizes, counts and roots beyond this are damage, not data


def _number(tok: str) -> float | None:
    """A measurement; ValueError (the row counts as unreadable) for inf, NaN or a value past 1e300."""
    if tok.upper() in ("N/A", "NA", "-"):
        return None
    v = float(tok)
    if not math.isfinite(v) or abs(v) > 1e300:
        raise ValueError(f"out-of-range value {tok!r}")
    return v


def _int(tok: str) -> int:
    v = int(tok)
    if not 0 <= v < _MAX_INT:
        raise ValueError(f"out-of-range integer {tok[:40]!r}")
    return v


def _parse_row(tokens: list[str], cols: list[str]) -> dict | None:
    if "timestamp" in cols and len(tokens) >= 2 and re.match(r"^\d\d:\d\d:\d\d$", tokens[-1]):
        tokens = tokens[:-2] + [tokens[-2] + " " + tokens[-1]]
    if len(tokens) == len(cols) - 1 and "redop" in cols:
        # Old all_gather/broadcast/alltoall print an empty redop (a "%6s" of "").
        i = cols.index("redop")
        tokens = tokens[:i] + [""] + tokens[i:]
    if len(tokens) != len(cols):
        return None
    row: dict = {}
    seen: dict[str, int] = {}
    try:
        for name, tok in zip(cols, tokens):
            if name in ("size", "count"):
                row["size_bytes" if name == "size" else "count"] = _int(tok)
            elif name == "type":
                row["type"] = tok
            elif name == "redop":
                row["redop"] = tok
            elif name == "root":
                row["root"] = _int(tok) if tok != "-1" else -1
            elif name == "timestamp":
                row["timestamp"] = tok
            else:
                k = seen.get(name, 0)
                seen[name] = k + 1
                if k > 1:
                    return None
                mode = MODES[k]
                v = _number(tok)
                key = _MODE_KEYS[name]
                if key == "wrong":
                    # "error" (very old versions) is the max error, a float: non-zero means wrong data.
                    v = None if v is None else (int(round(v)) if name == "#wrong" else int(v != 0))
                    if v is not None and v < 0:  # some versions print -1 when the check is off
                        v = None
                row[f"{mode}_{key}"] = v
    except ValueError:
        return None
    return row


class _Parser:
    """Line-by-line state of parse_text: the sections so far and the one being read."""

    def __init__(self, path: Path):
        self.path = path
        self.sections: list[Section] = []
        self.cur = Section()
        self.bad_rows = 0
        self.gpudoctor: dict = {}

    def new_section(self) -> Section:
        if self.cur.started():
            self.sections.append(self.cur)
        self.cur = Section()
        return self.cur

    def comment(self, line: str) -> None:
        """A '#' line: a test's start, its parameters, a rank, the summary or a column header."""
        cur = self.cur
        m = _STARTING.match(line)
        if m:
            new = self.new_section()
            new.op, new.binary = _op_from_binary(m.group(1))
            return
        m = _NTHREAD.match(line)
        if m:
            self._params(m)
            return
        m = _RANK_LINE.match(line)
        if m:
            cur.devices.append({"rank": int(m.group("rank")), "group": int(m.group("group")),
                                "pid": int(m.group("pid")), "host": m.group("host"),
                                "device": int(m.group("dev")), "bus": m.group("bus"), "name": m.group("name")})
            return
        m = _OOB.match(line)
        if m:
            cur.out_of_bounds = int(m.group(1))
            return
        m = _AVG.match(line)
        if m:
            try:
                cur.avg_busbw_gbps = float(m.group(1))
            except ValueError:
                cur.avg_busbw_gbps = None
            cur.complete = True
            return
        m = _GPUDOCTOR.match(line)
        if m:
            self.gpudoctor[m.group(1).strip().replace(" ", "_")] = m.group(2)
            return
        body = line.lstrip("#").split()
        if body and body[0] == "size" and len(body) > 3:
            if cur.rows or cur.complete:  # a second table without a new parameter line
                new = self.new_section()
                new.op, new.binary = cur.op, cur.binary
            self.cur.columns = _columns(line, self.path)

    def _params(self, m: re.Match) -> None:
        if self.cur.rows or self.cur.params:  # a second test in the same file
            self.new_section()
        params = {"nthread": int(m.group(1)), "ngpus": int(m.group(2)), "min_bytes": int(m.group(3)),
                  "max_bytes": int(m.group(4))}
        if m.group(5):
            params["step"] = int(m.group(5))
            params["step_kind"] = m.group(6)
        for key, val in re.findall(r"([A-Za-z][A-Za-z ]*?):\s*(-?\d+)", m.group(7) or ""):
            params[key.strip().replace(" ", "_")] = int(val)
        self.cur.params = params

    def data(self, line: str) -> bool:
        """A data line; False when it is a row that does not parse."""
        tokens = line.split()
        if not _INT.match(tokens[0]):
            return True  # NCCL INFO/WARN lines, launcher chatter
        if self.cur.columns is None:
            if len(tokens) >= 8 and all(_INT.match(t) for t in tokens[:2]):
                raise InputError(self.path, "nccl-tests rows before any column header (the '#  size  count ...' line)")
            return True
        row = _parse_row(tokens, self.cur.columns)
        if row is None:
            self.bad_rows += 1
            return False
        self.cur.rows.append(row)
        return True


def parse_text(text: str, path: Path | str = "<text>") -> Parsed:
    """Parse nccl-tests output (one or several tests) into sections of rows."""
    p = _Parser(Path(path))
    last_bad = last_line = -1
    for lineno, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if not line:
            continue
        last_line = lineno
        if line.startswith("#"):
            p.comment(line)
        elif not p.data(line):
            last_bad = lineno
    if last_bad == last_line and last_bad >= 0 and not p.cur.complete:
        p.bad_rows -= 1  # the half-written last line of a log that ends early: counted as that
    if p.cur.started():
        p.sections.append(p.cur)
    return Parsed(sections=p.sections, bad_rows=p.bad_rows, gpudoctor=p.gpudoctor)


def read(path: str | Path, rank: int | None = None) -> Trace:
    """Read nccl-tests (or gpudoctor nccl-bench) output into a Trace; see the module docstring."""
    path = Path(path)
    raw = read_bytes(path, "nccl-tests output")
    if not raw.strip():
        raise InputError(path, "empty file")
    text = raw.decode("utf-8", errors="replace")
    parsed = parse_text(text, path)
    return to_trace(parsed, path, rank)


def to_trace(parsed: Parsed, path: Path, rank: int | None = None) -> Trace:
    sections = [s for s in parsed.sections if s.rows or s.columns]
    if not sections:
        raise InputError(path, "no nccl-tests result table found (expected a '#  size  count  type ...' header "
                               "and data rows)")
    file_op = _op_from_filename(path)
    my_rank = 0 if rank is None else int(rank)
    rows: list[dict] = []
    coll: dict[str, list] = {k: [] for k in ("op", "bytes", "dtype", "comm_size")}
    sec_meta = []
    incomplete = 0
    all_devices: list[dict] = []
    for i, s in enumerate(sections):
        comm_size = len(s.devices) if s.devices else -1
        op = s.op or file_op or _op_from_rows(s.rows, comm_size)
        if s.devices:
            all_devices = all_devices or s.devices
        for r in s.rows:
            dtype = TYPE_DTYPES.get(str(r.get("type", "")).lower(), str(r.get("type", "")))
            rows.append({"section": i, "op": op, "dtype": dtype, **r})
            coll["op"].append(op)
            coll["bytes"].append(int(r["size_bytes"]))
            coll["dtype"].append(dtype)
            coll["comm_size"].append(comm_size)
        if s.rows and not s.complete:
            incomplete += 1
        avg = s.avg_busbw_gbps
        sec_meta.append({
            "op": op, "binary": s.binary or OP_BINARIES.get(op, ""), "comm_size": comm_size, "devices": s.devices,
            "parameters": s.params, "rows": len(s.rows), "avg_busbw_gbps": avg, "out_of_bounds": s.out_of_bounds,
            "complete": s.complete,
        })
    wrong_total = 0
    wrong_rows = []
    for r in rows:
        for mode in MODES:
            w = r.get(f"{mode}_wrong")
            if w:
                wrong_total += int(w)
                wrong_rows.append({"op": r["op"], "size_bytes": r["size_bytes"], "mode": mode, "wrong": int(w)})
    avgs = [s["avg_busbw_gbps"] for s in sec_meta if s["avg_busbw_gbps"] is not None]
    trace = Trace()
    n = len(coll["op"])
    trace.set("collectives", {
        "rank": [my_rank] * n, "start_ns": [0] * n, "end_ns": [0] * n, "op": pd.Categorical(coll["op"]),
        "bytes": coll["bytes"], "dtype": pd.Categorical(coll["dtype"]), "comm_size": coll["comm_size"],
        "source": [SOURCE] * n,
    })
    # No ranks/devices rows: the log describes the whole job, not one rank's timeline, so it can join the
    # per-rank traces of a run without claiming a rank (its devices are in meta["nccl_tests"]["sections"]).
    if incomplete:
        trace.add_dropped(my_rank, SOURCE, R_ENDS_EARLY, incomplete)
    if parsed.bad_rows:
        trace.add_dropped(my_rank, SOURCE, R_BAD_ROW, parsed.bad_rows)
    trace.meta = {
        "inputs": [{"path": str(path), "format": FORMAT, "rank": my_rank}],
        "nccl_tests": {
            "rows": rows, "sections": sec_meta, "wrong_total": int(wrong_total), "wrong_rows": wrong_rows,
            "avg_busbw_gbps": (sum(avgs) / len(avgs)) if avgs else None,
            "complete": incomplete == 0, "gpudoctor": parsed.gpudoctor, "path": str(path), "rank": my_rank,
            "devices": all_devices,
        },
    }
    return trace


def rows_frame(trace_or_meta: Trace | dict | None) -> pd.DataFrame:
    """meta["nccl_tests"]["rows"] as a DataFrame (empty when the trace has none)."""
    meta = trace_or_meta.meta if hasattr(trace_or_meta, "meta") else trace_or_meta
    rows = (meta or {}).get("nccl_tests", {}).get("rows", [])
    return pd.DataFrame(rows)


__all__ = ["read", "parse_text", "to_trace", "rows_frame"]
