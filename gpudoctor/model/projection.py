"""Range nesting depth and projection of host ranges onto the GPU.

A host range (NVTX push/pop, record_function) runs on the CPU; the kernels it launches run later. Its
GPU projection is the span [min start, max end] of the kernels and memops whose launch API call
(matched by correlation id) started inside the range on the same thread. Loops are per thread only;
per-event work is vectorized.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def nesting_depth(rank: np.ndarray, thread: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Depth of each range among the ranges of its (rank, thread): 0 for outermost.

    Depth = number of ranges on the thread that started before this one and have not yet ended.
    Ranges with equal start: the longer one is the parent.
    """
    n = len(start)
    depth = np.zeros(n, dtype=np.int64)
    if n == 0:
        return depth
    # Sort by thread, then start ascending, then end descending (parent first).
    order = np.lexsort((-end, start, thread, rank))
    r, t, s, e = rank[order], thread[order], start[order], end[order]
    group_change = np.r_[True, (r[1:] != r[:-1]) | (t[1:] != t[:-1])]
    group_id = np.cumsum(group_change) - 1
    out = np.empty(n, dtype=np.int64)
    for g in np.unique(group_id):
        idx = np.nonzero(group_id == g)[0]
        gs, ge = s[idx], e[idx]
        # Ranges opened before i: i (by sort order). Ranges closed at or before gs[i]: count of ends <= start.
        ends_sorted = np.sort(ge)
        closed_before = np.searchsorted(ends_sorted, gs, side="right")
        out[idx] = np.arange(len(idx)) - closed_before
    depth[order] = np.maximum(out, 0)
    return depth


def project_ranges(ranges: pd.DataFrame, api_calls: pd.DataFrame, gpu_ops: pd.DataFrame) -> pd.DataFrame:
    """Fill gpu_start_ns / gpu_end_ns / gpu_kernel_count of ``ranges``.

    ``gpu_ops``: rank, correlation_id, start_ns, end_ns, is_kernel (kernels and memops together).
    """
    ranges = ranges.copy()
    n = len(ranges)
    gstart = np.full(n, -1, dtype=np.int64)
    gend = np.full(n, -1, dtype=np.int64)
    gcount = np.zeros(n, dtype=np.int64)
    if n == 0 or api_calls.empty or gpu_ops.empty:
        ranges["gpu_start_ns"], ranges["gpu_end_ns"], ranges["gpu_kernel_count"] = gstart, gend, gcount
        return ranges

    ops = gpu_ops[gpu_ops["correlation_id"] >= 0]
    launches = api_calls[["rank", "thread_id", "start_ns", "correlation_id"]].merge(
        ops[["rank", "correlation_id", "start_ns", "end_ns", "is_kernel"]].rename(
            columns={"start_ns": "op_start", "end_ns": "op_end"}),
        on=["rank", "correlation_id"], how="inner",
    )
    if launches.empty:
        ranges["gpu_start_ns"], ranges["gpu_end_ns"], ranges["gpu_kernel_count"] = gstart, gend, gcount
        return ranges
    launches = launches.sort_values(["rank", "thread_id", "start_ns"], kind="stable")
    l_rank = launches["rank"].to_numpy()
    l_thread = launches["thread_id"].to_numpy()
    l_start = launches["start_ns"].to_numpy()
    l_ostart = launches["op_start"].to_numpy()
    l_oend = launches["op_end"].to_numpy()
    l_kernel = launches["is_kernel"].to_numpy().astype(np.int64)

    r_rank = ranges["rank"].to_numpy()
    r_thread = ranges["thread_id"].to_numpy()
    r_start = ranges["start_ns"].to_numpy()
    r_end = ranges["end_ns"].to_numpy()

    # Group boundaries of launches per (rank, thread).
    keys = pd.MultiIndex.from_arrays([l_rank, l_thread])
    first = pd.Series(np.arange(len(launches))).groupby([l_rank, l_thread]).agg(["min", "max"])
    for (rk, th), (lo, hi) in zip(first.index, first.to_numpy()):
        sel = np.nonzero((r_rank == rk) & (r_thread == th))[0]
        if len(sel) == 0:
            continue
        seg = slice(lo, hi + 1)
        s = l_start[seg]
        i0 = np.searchsorted(s, r_start[sel], side="left")
        i1 = np.searchsorted(s, r_end[sel], side="right")
        nonempty = i1 > i0
        if not nonempty.any():
            continue
        sel, i0, i1 = sel[nonempty], i0[nonempty], i1[nonempty]
        # reduceat over [i0, i1) pairs; a sentinel keeps i1 == len valid.
        os_ = np.r_[l_ostart[seg], 0]
        oe_ = np.r_[l_oend[seg], 0]
        kc = np.r_[l_kernel[seg], 0]
        pairs = np.column_stack([i0, i1]).ravel()
        gstart[sel] = np.minimum.reduceat(os_, pairs)[::2]
        gend[sel] = np.maximum.reduceat(oe_, pairs)[::2]
        ck = np.r_[0, np.cumsum(kc)]
        gcount[sel] = ck[i1] - ck[i0]
    del keys
    ranges["gpu_start_ns"], ranges["gpu_end_ns"], ranges["gpu_kernel_count"] = gstart, gend, gcount
    return ranges
