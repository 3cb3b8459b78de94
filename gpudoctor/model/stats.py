"""Summary tables of a trace: what `nsys stats`, the PyTorch profiler's operator view and HTA print.

Pure, vectorized functions of the trace model (one groupby each, no per-row Python). ``windows`` maps
a rank to the ``(start_ns, end_ns)`` it is summarized over (its steady-state window); a rank missing
from it, or ``windows=None``, is summarized over its whole trace. An event belongs to a window when it
starts inside it (durations are never clipped, so min/median/max are real event lengths).

* :func:`kernel_stats`: per kernel name: count, total, min, median, mean, max, stddev, share of the window;
* :func:`api_stats`: the same per CUDA runtime / driver API call name, share of all API time;
* :func:`op_stats`: framework operators (PyTorch ``aten::`` ops) per name and input shapes: self and
  total host time, and the GPU time of the kernels they launched (self and total);
* :func:`step_stats`: per step: step time, GPU busy, idle, communication and the part of it not
  overlapped by compute;
* :func:`launch_delays` / :func:`launch_delay_stats`: kernel start minus its launch call's start
  (the queueing delay HTA reports), per launch and as a distribution.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gpudoctor.model.columns import as_categorical
from gpudoctor.model.trace import Trace

Windows = dict[int, tuple[int, int]] | None
DIST_COLS = ["count", "total_ns", "min_ns", "median_ns", "mean_ns", "max_ns", "std_ns"]
KERNEL_COLS = ["kernel", "category"] + DIST_COLS + ["window_fraction"]
API_COLS = ["api"] + DIST_COLS + ["api_time_fraction"]
OP_COLS = ["op", "input_dims", "count", "cpu_total_ns", "cpu_self_ns", "cuda_total_ns", "cuda_self_ns", "kernels"]
STEP_COLS = ["rank", "step", "start_ns", "step_ns", "gpu_busy_ns", "gpu_idle_ns", "gpu_busy_fraction", "comm_ns",
             "exposed_comm_ns", "kernels"]
DELAY_COLS = ["rank", "launches", "p50_ns", "p90_ns", "p99_ns", "max_ns", "mean_ns"]


def in_windows(df: pd.DataFrame, windows: Windows, col: str = "start_ns") -> np.ndarray:
    """Rows whose ``col`` lies inside their rank's window (all rows of ranks without one)."""
    keep = np.ones(len(df), dtype=bool)
    if not windows or df.empty:
        return keep
    ranks = df["rank"].to_numpy()
    t = df[col].to_numpy()
    for rank, (lo, hi) in windows.items():
        sel = ranks == rank
        keep[sel] = (t[sel] >= lo) & (t[sel] < hi)
    return keep


def window_total_ns(df: pd.DataFrame, windows: Windows) -> int:
    """The summed length of the windows of the ranks in ``df`` (their whole span when a rank has none)."""
    total = 0
    for rank, g in df.groupby("rank", sort=True):
        if windows and rank in windows:
            total += int(windows[rank][1] - windows[rank][0])
        elif len(g):
            total += int(g["end_ns"].max() - g["start_ns"].min())
    return total


def _distribution(keys: dict[str, object], dur: np.ndarray) -> pd.DataFrame:
    """count/total/min/median/mean/max/std (sample stddev, 0 for one event) of ``dur`` per key."""
    d = pd.DataFrame({**keys, "d": dur.astype(np.int64)})
    by = list(keys)
    g = d.groupby(by, sort=False, observed=True)["d"]
    out = g.agg(count="size", total_ns="sum", min_ns="min", median_ns="median", mean_ns="mean", max_ns="max",
                std_ns="std").reset_index()
    out["std_ns"] = out["std_ns"].fillna(0.0)
    for c in by:
        out[c] = out[c].astype(str)
    return out.sort_values("total_ns", ascending=False, kind="stable").reset_index(drop=True)


def kernel_stats(trace: Trace, windows: Windows = None) -> pd.DataFrame:
    """Per kernel name (over all ranks): the duration distribution and share of the summed windows."""
    k = trace.kernels[in_windows(trace.kernels, windows)]
    if k.empty:
        return pd.DataFrame(columns=KERNEL_COLS)
    out = _distribution({"kernel": as_categorical(k["name"]).array, "category": as_categorical(k["category"]).array},
                        (k["end_ns"] - k["start_ns"]).to_numpy())
    out["window_fraction"] = out["total_ns"] / max(window_total_ns(k, windows), 1)
    return out[KERNEL_COLS]


def api_stats(trace: Trace, windows: Windows = None) -> pd.DataFrame:
    """Per CUDA API call name: the duration distribution and share of all API time in the windows."""
    a = trace.api_calls[in_windows(trace.api_calls, windows)]
    if a.empty:
        return pd.DataFrame(columns=API_COLS)
    out = _distribution({"api": as_categorical(a["name"]).array}, (a["end_ns"] - a["start_ns"]).to_numpy())
    out["api_time_fraction"] = out["total_ns"] / max(int(out["total_ns"].sum()), 1)
    return out[API_COLS]


def launch_delays(trace: Trace, windows: Windows = None) -> pd.DataFrame:
    """One row per kernel with a launch call: rank, kernel, launch_start_ns, start_ns, delay_ns (kernel
    start minus launch call start; negative values, clock skew, are kept as they are)."""
    k, a = trace.kernels, trace.api_calls
    cols = ["rank", "kernel", "launch_start_ns", "start_ns", "delay_ns"]
    k = k[in_windows(k, windows) & (k["correlation_id"].to_numpy() >= 0)]
    if k.empty or a.empty:
        return pd.DataFrame(columns=cols)
    a = a[a["correlation_id"].to_numpy() >= 0]
    launch = pd.DataFrame({"rank": a["rank"].to_numpy(), "corr": a["correlation_id"].to_numpy(),
                           "launch_start_ns": a["start_ns"].to_numpy()}).drop_duplicates(["rank", "corr"])
    kk = pd.DataFrame({"rank": k["rank"].to_numpy(), "corr": k["correlation_id"].to_numpy(),
                       "kernel": as_categorical(k["name"]).array, "start_ns": k["start_ns"].to_numpy()})
    m = kk.merge(launch, on=["rank", "corr"], how="inner")
    m["delay_ns"] = m["start_ns"] - m["launch_start_ns"]
    return m[cols].reset_index(drop=True)


def launch_delay_stats(delays: pd.DataFrame) -> pd.DataFrame:
    """Per rank: launches and the p50/p90/p99/max/mean of their launch delay."""
    if delays.empty:
        return pd.DataFrame(columns=DELAY_COLS)
    g = delays.groupby("rank", sort=True)["delay_ns"]
    out = pd.DataFrame({"launches": g.size(), "p50_ns": g.quantile(0.5), "p90_ns": g.quantile(0.9),
                        "p99_ns": g.quantile(0.99), "max_ns": g.max(), "mean_ns": g.mean()}).reset_index()
    return out[DELAY_COLS]


def _union_in(starts: np.ndarray, ends: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per bin [edges[i], edges[i+1]): time covered by the union of the intervals (vectorized)."""
    if len(starts) == 0:
        return np.zeros(len(edges) - 1, dtype=np.int64)
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    run_end = np.maximum.accumulate(e)
    new = np.r_[True, s[1:] > run_end[:-1]]  # an interval that starts after everything before it ended
    gid = np.cumsum(new) - 1
    us = s[new]
    ue = pd.Series(run_end).groupby(gid).max().to_numpy()
    # covered time before t: C(t) = sum over merged intervals of clip(t - s, 0, e - s)
    cs_s = np.r_[0, np.cumsum(us)]
    cs_len = np.r_[0, np.cumsum(ue - us)]
    i = np.searchsorted(us, edges, side="right")  # merged intervals started by t
    j = np.searchsorted(ue, edges, side="right")  # ... and ended by t
    # finished ones count fully; open ones (started, not ended) count t - s
    covered = cs_len[j] + (edges * (i - j) - (cs_s[i] - cs_s[j]))
    return np.diff(covered)


def step_stats(trace: Trace, steps: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Per step of each rank (``steps``: rank -> its steps, with ``gpu_start_ns``/``gpu_end_ns`` or
    ``start_ns``/``end_ns``): step time, GPU busy and idle time, communication kernel time and the part
    of it no compute kernel overlaps (exposed)."""
    rows = []
    for rank, st in steps.items():
        if st is None or st.empty:
            continue
        s0 = st["gpu_start_ns"].to_numpy(np.int64) if "gpu_start_ns" in st else st["start_ns"].to_numpy(np.int64)
        s1 = st["gpu_end_ns"].to_numpy(np.int64) if "gpu_end_ns" in st else st["end_ns"].to_numpy(np.int64)
        ok = s1 > s0
        s0, s1 = s0[ok], s1[ok]
        if not len(s0):
            continue
        order = np.argsort(s0, kind="stable")
        s0, s1 = s0[order], s1[order]
        k = trace.kernels[trace.kernels["rank"].to_numpy() == rank]
        m = trace.memops[trace.memops["rank"].to_numpy() == rank]
        ks, ke = k["start_ns"].to_numpy(np.int64), k["end_ns"].to_numpy(np.int64)
        comm = k["category"].astype(str).to_numpy() == "communication"
        # edges s0[0], s1[0], s0[1], s1[1], ... : the even bins are the steps (steps do not overlap)
        edges = np.maximum.accumulate(np.column_stack([s0, s1]).ravel())
        busy = _union_in(np.r_[ks, m["start_ns"].to_numpy(np.int64)], np.r_[ke, m["end_ns"].to_numpy(np.int64)], edges)[0::2]
        comm_ns = _union_in(ks[comm], ke[comm], edges)[0::2]
        compute = _union_in(ks[~comm], ke[~comm], edges)[0::2]
        both = _union_in(ks, ke, edges)[0::2]
        n_k = np.searchsorted(np.sort(ks), s1) - np.searchsorted(np.sort(ks), s0)
        dur = s1 - s0
        rows.append(pd.DataFrame({"rank": rank, "step": np.arange(len(s0)), "start_ns": s0, "step_ns": dur,
                                  "gpu_busy_ns": busy, "gpu_idle_ns": dur - busy, "gpu_busy_fraction": busy / np.maximum(dur, 1),
                                  "comm_ns": comm_ns, "exposed_comm_ns": both - compute, "kernels": n_k}))
    if not rows:
        return pd.DataFrame(columns=STEP_COLS)
    return pd.concat(rows, ignore_index=True)[STEP_COLS]


def _parents(ops: pd.DataFrame) -> np.ndarray:
    """Row position of each op's innermost enclosing op on its thread (-1 for top-level ones).
    Ops nest properly on a thread; one pass per nesting level."""
    n = len(ops)
    parent = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return parent
    key = ops["rank"].to_numpy().astype(np.int64) * (1 << 32) + ops["thread_id"].to_numpy().astype(np.int64)
    s = ops["start_ns"].to_numpy(np.int64)
    e = ops["end_ns"].to_numpy(np.int64)
    order = np.lexsort((-e, s, key))  # per thread by start, outer first on ties
    ks, ss, es = key[order], s[order], e[order]
    # depth = ops of the same thread that started before (in this order) and are still open
    depth = np.zeros(n, dtype=np.int64)
    for _, idx in pd.Series(np.arange(n)).groupby(ks, sort=False):
        i = idx.to_numpy()
        st, en = ss[i], es[i]
        started = np.arange(len(i))  # ops before me in order
        ended = np.searchsorted(np.sort(en), st, side="right")  # ops that ended at or before my start
        depth[i] = started - ended
    for d in range(1, int(depth.max()) + 1 if n else 0):
        child = np.nonzero(depth == d)[0]
        cand = np.nonzero(depth == d - 1)[0]
        if not len(child) or not len(cand):
            continue
        # the last op one level up that started before the child, on the same thread
        pos = np.searchsorted(cand, child, side="left") - 1
        ok = (pos >= 0)
        ok[ok] = ks[cand[pos[ok]]] == ks[child[ok]]
        parent[order[child[ok]]] = order[cand[pos[ok]]]
    return parent


def op_stats(trace: Trace) -> pd.DataFrame:
    """Framework operators per (name, input shapes): calls, total and self host time, and the GPU time of
    the kernels launched inside them (total: anywhere inside; self: not inside a nested op). Only the
    operators the trace keeps (``cpu_ops``: torch.profiler traces) are listed."""
    ops = trace.cpu_ops.reset_index(drop=True)
    if ops.empty:
        return pd.DataFrame(columns=OP_COLS)
    s = ops["start_ns"].to_numpy(np.int64)
    e = np.maximum(ops["end_ns"].to_numpy(np.int64), s)
    dur = e - s
    parent = _parents(ops)
    has_parent = parent >= 0
    child_cpu = np.bincount(parent[has_parent], weights=dur[has_parent], minlength=len(ops))
    # GPU time of launches, attributed by the launch call's time on the op's thread
    a, k = trace.api_calls, trace.kernels
    launch = pd.DataFrame({"rank": a["rank"].to_numpy(), "thread_id": a["thread_id"].to_numpy(),
                           "t": a["start_ns"].to_numpy(), "corr": a["correlation_id"].to_numpy()})
    kd = pd.DataFrame({"rank": k["rank"].to_numpy(), "corr": k["correlation_id"].to_numpy(),
                       "kd": (k["end_ns"] - k["start_ns"]).to_numpy()})
    kd = kd[kd["corr"] >= 0].groupby(["rank", "corr"], sort=False).agg(kd=("kd", "sum"), kn=("kd", "size")).reset_index()
    launch = launch.merge(kd, on=["rank", "corr"], how="inner")
    cuda_total = np.zeros(len(ops))
    kernels = np.zeros(len(ops), dtype=np.int64)
    okey = ops["rank"].to_numpy().astype(np.int64) * (1 << 32) + ops["thread_id"].to_numpy().astype(np.int64)
    lkey = launch["rank"].to_numpy().astype(np.int64) * (1 << 32) + launch["thread_id"].to_numpy().astype(np.int64)
    for key in np.unique(okey):
        li = np.nonzero(lkey == key)[0]
        if not len(li):
            continue
        lo = np.argsort(launch["t"].to_numpy()[li], kind="stable")
        t = launch["t"].to_numpy()[li][lo]
        cs = np.r_[0, np.cumsum(launch["kd"].to_numpy()[li][lo])]
        cn = np.r_[0, np.cumsum(launch["kn"].to_numpy()[li][lo])]
        oi = np.nonzero(okey == key)[0]
        i0 = np.searchsorted(t, s[oi], side="left")
        i1 = np.searchsorted(t, e[oi], side="right")
        cuda_total[oi] = cs[i1] - cs[i0]
        kernels[oi] = cn[i1] - cn[i0]
    child_cuda = np.bincount(parent[has_parent], weights=cuda_total[has_parent], minlength=len(ops))
    d = pd.DataFrame({"op": as_categorical(ops["name"]).array, "input_dims": ops["input_dims"].to_numpy(),
                      "cpu_total_ns": dur, "cpu_self_ns": dur - child_cpu, "cuda_total_ns": cuda_total,
                      "cuda_self_ns": cuda_total - child_cuda, "kernels": kernels})
    g = d.groupby(["op", "input_dims"], sort=False, observed=True).agg(
        count=("cpu_total_ns", "size"), cpu_total_ns=("cpu_total_ns", "sum"), cpu_self_ns=("cpu_self_ns", "sum"),
        cuda_total_ns=("cuda_total_ns", "sum"), cuda_self_ns=("cuda_self_ns", "sum"), kernels=("kernels", "sum")).reset_index()
    g["op"] = g["op"].astype(str)
    for c in ("cpu_total_ns", "cpu_self_ns", "cuda_total_ns", "cuda_self_ns"):
        g[c] = g[c].round().astype(np.int64)
    return g.sort_values(["cuda_total_ns", "cpu_total_ns"], ascending=False, kind="stable").reset_index(drop=True)[OP_COLS]
