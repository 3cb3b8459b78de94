"""Call stacks of an Nsight Systems export -> frames, stacks, host_stacks, and ``api_calls.stack_id``.

Two tables carry stacks (nsys 2025.3):

- ``CUDA_CALLCHAINS`` (id, stackDepth, symbol, module): backtraces of CUDA API calls, recorded with
  ``--cudabacktrace=sync,kernel,memory`` (and CPU sampling on: ``--sample=process-tree``) for calls
  longer than nsys's thresholds; ``CUPTI_ACTIVITY_KIND_RUNTIME.callchainId`` points at them.
  stackDepth 0 is the innermost frame.
- ``SAMPLING_CALLCHAINS`` with ``COMPOSITE_EVENTS`` (start, globalTid, id): CPU samples of the
  process (``--sample=process-tree``), one stack per sample -> host_stacks, source ``nsys_cpu_sample``.

The frames are native (function symbol, shared object or executable as the file, no line): the
interpreter's ``_PyEval_EvalFrameDefault``, ``THPVariable_item``, ``at::native::item``.

Python frames: ``--python-sampling=true`` and ``--python-backtrace=cuda`` write their samples as NVTX
marks (``NVTX_EVENTS.eventType`` 34) in the domains "Python Periodic Sampling" and "Python Backtrace on
CUDA", whose payload schema (``NVTX_PAYLOAD_SCHEMA_ENTRIES``: thread state, frames of Function / File /
Line) is exported and whose strings land in ``StringIds``, but ``nsys export --type sqlite`` of nsys
2025.3.1 leaves the payload (``binaryData``) empty: the frames of a sample cannot be read back. Those
marks are counted in ``dropped`` (R_PYTHON_NO_PAYLOAD); Python file and line come from torch.profiler.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd

from gpudoctor.model.stacks import build_stacks
from gpudoctor.model.trace import Trace, conform

R_NO_CALL = "CUDA API backtrace whose call is not in api_calls"
R_PYTHON_NO_PAYLOAD = "nsys Python sample / backtrace without its frames (payload not exported)"
_PYTHON_DOMAINS = ("Python Periodic Sampling", "Python Backtrace on CUDA")


def _has(conn: sqlite3.Connection, table: str, column: str | None = None) -> bool:
    cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
    return bool(cols) and (column is None or column in cols)


def _chains(conn: sqlite3.Connection, table: str) -> pd.DataFrame:
    """(id, depth, symbol, module) of every frame of a call-chain table, names resolved."""
    return pd.DataFrame(conn.execute(
        f'SELECT c.id, c.stackDepth, coalesce(s.value, ""), coalesce(m.value, "") FROM "{table}" c '
        'LEFT JOIN StringIds s ON s.id = c.symbol LEFT JOIN StringIds m ON m.id = c.module').fetchall(),
        columns=["id", "depth", "symbol", "module"])


def add_native_stacks(trace: Trace, conn: sqlite3.Connection, rank: int, offset: int) -> None:
    """Fill ``trace``'s stack tables from the export's call chains (nothing when it has none)."""
    _count_python_marks(trace, conn, rank)
    parts = []
    if _has(conn, "CUDA_CALLCHAINS") and _has(conn, "CUPTI_ACTIVITY_KIND_RUNTIME", "callchainId"):
        parts.append(("cuda", _chains(conn, "CUDA_CALLCHAINS")))
    if _has(conn, "SAMPLING_CALLCHAINS") and _has(conn, "COMPOSITE_EVENTS"):
        parts.append(("sample", _chains(conn, "SAMPLING_CALLCHAINS")))
    parts = [(k, df) for k, df in parts if len(df)]
    if not parts:
        return
    frames = pd.concat([df.assign(kind=k) for k, df in parts], ignore_index=True)
    frames = frames.sort_values(["kind", "id", "depth"], kind="stable").reset_index(drop=True)
    # the caller of frame (kind, id, depth) is (kind, id, depth + 1): the next row of the same chain
    same_next = np.r_[(frames["kind"].to_numpy()[1:] == frames["kind"].to_numpy()[:-1])
                      & (frames["id"].to_numpy()[1:] == frames["id"].to_numpy()[:-1]), False]
    parent = np.where(same_next, np.arange(len(frames)) + 1, -1)
    fr, st, node_stack = build_stacks(rank, frames["module"].to_numpy(dtype=object),
                                      np.full(len(frames), -1, np.int64), frames["symbol"].to_numpy(dtype=object),
                                      parent)
    trace.frames, trace.stacks = fr, st
    leaf = frames["depth"].to_numpy() == frames.groupby(["kind", "id"])["depth"].transform("min").to_numpy()
    chain_stack = {(k, int(i)): int(s) for k, i, s in
                   zip(frames["kind"].to_numpy()[leaf], frames["id"].to_numpy()[leaf], node_stack[leaf])}
    if any(k == "cuda" for k, _ in parts):
        _link_api_calls(trace, conn, rank, offset, chain_stack)
    if any(k == "sample" for k, _ in parts):
        rows = np.array(conn.execute("SELECT start, globalTid, id FROM COMPOSITE_EVENTS").fetchall(), dtype=np.int64)
        rows = rows.reshape(-1, 3)
        stack = np.array([chain_stack.get(("sample", int(i)), -1) for i in rows[:, 2]], dtype=np.int64)
        t = rows[:, 0] + offset
        trace.host_stacks = conform("host_stacks", {
            "rank": np.full(len(rows), rank, np.int64), "thread_id": rows[:, 1], "start_ns": t, "end_ns": t,
            "stack_id": stack, "source": pd.Categorical.from_codes(np.zeros(len(rows), np.int8), ["nsys_cpu_sample"]),
        }).sort_values(["start_ns", "thread_id"], kind="stable").reset_index(drop=True)


def _link_api_calls(trace: Trace, conn: sqlite3.Connection, rank: int, offset: int, chain_stack: dict) -> None:
    """stack_id of the API calls that have a backtrace, matched on (thread, start, correlation id)."""
    rows = np.array(conn.execute(
        "SELECT globalTid, start, correlationId, callchainId FROM CUPTI_ACTIVITY_KIND_RUNTIME "
        "WHERE callchainId IS NOT NULL").fetchall(), dtype=np.int64).reshape(-1, 4)
    if not len(rows):
        return
    api = trace.api_calls
    key = pd.MultiIndex.from_arrays([api["thread_id"].to_numpy(np.int64), api["start_ns"].to_numpy(np.int64),
                                     api["correlation_id"].to_numpy(np.int64)])
    want = pd.MultiIndex.from_arrays([rows[:, 0], rows[:, 1] + offset, rows[:, 2]])
    first = ~key.duplicated()
    at = np.flatnonzero(first)[key[first].get_indexer(want)] if first.any() else np.full(len(want), -1)
    at = np.where(key[first].get_indexer(want) >= 0, at, -1)
    found = at >= 0
    stack_id = api["stack_id"].to_numpy(np.int64).copy()
    stack_id[at[found]] = [chain_stack.get(("cuda", int(c)), -1) for c in rows[found, 3]]
    api["stack_id"] = stack_id
    trace.add_dropped(rank, "nsys:CUDA_CALLCHAINS", R_NO_CALL, int((~found).sum()))


def _count_python_marks(trace: Trace, conn: sqlite3.Connection, rank: int) -> None:
    """Python samples / backtraces whose frames the export lacks: counted, never silently left out."""
    if not _has(conn, "NVTX_EVENTS", "domainId") or not _has(conn, "NVTX_EVENTS", "binaryData"):
        return
    names = ", ".join("?" for _ in _PYTHON_DOMAINS)
    n = conn.execute(
        "SELECT count(*) FROM NVTX_EVENTS e WHERE e.eventType = 34 AND e.binaryData IS NULL AND e.domainId IN "
        f"(SELECT d.domainId FROM NVTX_EVENTS d WHERE d.eventType = 75 AND d.text IN ({names}))",
        _PYTHON_DOMAINS).fetchone()[0]
    trace.add_dropped(rank, "nsys:NVTX_EVENTS", R_PYTHON_NO_PAYLOAD, int(n))
