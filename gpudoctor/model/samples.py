"""Per-step samples of one rank: what the regression gate compares (busy GPU time, step time and period
per steady step) and where the steady steps' GPU time went (per kernel identity, per NVTX range).

Computed once per rank when a run is analyzed (from the rank's steady-state window) and carried by the
Analysis, so that writing analysis.json or gating later needs no trace.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from gpudoctor.model.columns import as_categorical
from gpudoctor.model.joins import first_match
from gpudoctor.model.kernel_names import kernel_keys
from gpudoctor.model.steps import StepWindow, merge_intervals
from gpudoctor.model.trace import Trace

_DIGITS = re.compile(r"\d+")


def busy_in_windows(starts: np.ndarray, ends: np.ndarray, win_start: np.ndarray, win_end: np.ndarray) -> np.ndarray:
    """For each window, the length of the union of the intervals clipped to it (vectorized)."""
    win_start = np.asarray(win_start, dtype=np.int64)
    win_end = np.asarray(win_end, dtype=np.int64)
    if len(starts) == 0:
        return np.zeros(len(win_start), dtype=np.int64)
    bs, be = merge_intervals(starts, ends)
    cum = np.r_[0, np.cumsum(be - bs)]
    i0 = np.searchsorted(be, win_start, side="right")  # first block ending after the window start
    i1 = np.searchsorted(bs, win_end, side="left") - 1  # last block starting before the window end
    out = np.zeros(len(win_start), dtype=np.int64)
    ok = i0 <= i1
    a, b = i0[ok], i1[ok]
    tot = cum[b + 1] - cum[a]
    tot -= np.maximum(win_start[ok] - bs[a], 0)
    tot -= np.maximum(be[b] - win_end[ok], 0)
    out[ok] = np.maximum(tot, 0)
    return out


def _assign_to_steps(t: np.ndarray, step_start: np.ndarray, step_end: np.ndarray) -> np.ndarray:
    """Index of the steady step whose GPU span holds each time, or -1."""
    if len(step_start) == 0 or len(t) == 0:
        return np.full(len(t), -1)
    idx = np.searchsorted(step_start, t, side="right") - 1
    ok = idx >= 0
    ok[ok] = t[ok] < step_end[idx[ok]]
    return np.where(ok, idx, -1)


def rank_data(t: Trace, window: StepWindow, keys: pd.Categorical | None = None) -> dict:
    """Per-step samples and steady-step attribution totals of one rank (``keys``: ``kernel_keys`` of
    ``t.kernels`` when already computed)."""
    steady = window.steady.sort_values("gpu_start_ns", kind="stable")
    st = steady["gpu_start_ns"].to_numpy(np.int64)
    en = steady["gpu_end_ns"].to_numpy(np.int64)
    out: dict = {"n": len(steady)}
    k, m = t.kernels, t.memops
    starts = np.r_[k["start_ns"].to_numpy(np.int64), m["start_ns"].to_numpy(np.int64)]
    ends = np.r_[k["end_ns"].to_numpy(np.int64), m["end_ns"].to_numpy(np.int64)]
    out["step_time"] = (en - st).astype(float)
    out["gpu_time"] = busy_in_windows(starts, ends, st, en).astype(float)
    # Wall time: the step period, from the GPU start of a steady step to the GPU start of the next step.
    # It is the loop's real time per iteration whichever side is the bottleneck (a host-bound loop starves
    # the GPU, so GPU starts follow the host; a GPU-bound one queues), unlike the host range's duration,
    # which only measures launching when the host runs ahead of the GPU.
    allsteps = window.steps.sort_values("gpu_start_ns", kind="stable")
    starts_all = allsteps["gpu_start_ns"].to_numpy(np.int64)
    steady_mask = ~allsteps["warmup"].to_numpy(bool)
    period = np.diff(starts_all)
    out["wall_time"] = period[steady_mask[:-1]].astype(float) if len(starts_all) >= 2 else None
    # Attribution: kernels and memops starting inside a steady step.
    kin = _assign_to_steps(k["start_ns"].to_numpy(np.int64), st, en) >= 0
    if keys is None:
        keys = kernel_keys(k)
    min_ = _assign_to_steps(m["start_ns"].to_numpy(np.int64), st, en) >= 0
    out["kernels"] = _kernel_totals(k, keys, kin, m, min_)
    out["ranges"] = _range_time(t, kin, min_, steady)
    return out


def _kernel_totals(k: pd.DataFrame, keys: pd.Categorical, kin: np.ndarray, m: pd.DataFrame,
                   min_: np.ndarray) -> pd.DataFrame:
    """Total time and launches per (kernel identity, category) of the steady-step kernels, then per memop
    kind ("[memcpy_htod]", category memory), in order of first appearance. Grouped on integer codes: only
    the few distinct names become strings."""
    cat = as_categorical(k["category"])
    kg = pd.DataFrame({"key": np.asarray(keys.codes)[kin], "cat": np.asarray(cat.cat.codes)[kin],
                       "d": (k["end_ns"] - k["start_ns"]).to_numpy(np.int64)[kin]})
    g = kg.groupby(["key", "cat"], sort=False).agg(total_ns=("d", "sum"), count=("d", "size")).reset_index()
    key_names = np.asarray(keys.categories, dtype=object)
    cat_names = np.asarray(cat.cat.categories.astype(str), dtype=object)
    kernels = pd.DataFrame({"name": key_names[g["key"].to_numpy()] if len(g) else np.array([], dtype=object),
                            "category": cat_names[g["cat"].to_numpy()] if len(g) else np.array([], dtype=object),
                            "total_ns": g["total_ns"].to_numpy(np.int64), "count": g["count"].to_numpy(np.int64)})
    mm = pd.DataFrame({"name": "[" + m["kind"].astype(str).to_numpy()[min_].astype(object) + "]",
                       "category": "memory", "d": (m["end_ns"] - m["start_ns"]).to_numpy(np.int64)[min_]})
    if not len(mm):
        return kernels
    memops = mm.groupby(["name", "category"], sort=False).agg(total_ns=("d", "sum"), count=("d", "size")).reset_index()
    return pd.concat([kernels, memops], ignore_index=True)


def _range_time(t: Trace, kin: np.ndarray, min_: np.ndarray, steady: pd.DataFrame) -> pd.DataFrame:
    """GPU time of the steady-step kernels launched inside each NVTX / record_function range (inclusive of
    nested ranges), keyed by the range text with digits replaced by '#'. The step ranges themselves are left
    out (they hold everything)."""
    cols = ["text", "total_ns", "count"]
    r, api = t.ranges, t.api_calls
    if r.empty or api.empty:
        return pd.DataFrame(columns=cols)
    k, m = t.kernels, t.memops
    corr = np.r_[k["correlation_id"].to_numpy(np.int64)[kin], m["correlation_id"].to_numpy(np.int64)[min_]]
    dur = np.r_[(k["end_ns"] - k["start_ns"]).to_numpy(np.int64)[kin], (m["end_ns"] - m["start_ns"]).to_numpy(np.int64)[min_]]
    row = first_match(api["correlation_id"].to_numpy(np.int64), corr)
    hit = row >= 0
    launches = pd.DataFrame({"thread_id": api["thread_id"].to_numpy(np.int64)[row[hit]],
                             "start_ns": api["start_ns"].to_numpy(np.int64)[row[hit]], "d": dur[hit]})
    if launches.empty:
        return pd.DataFrame(columns=cols)
    step_keys = set(_DIGITS.sub("#", str(n)) for n in steady["name"].astype(str))
    text = r["text"] if isinstance(r["text"].dtype, pd.CategoricalDtype) else r["text"].astype(str).astype("category")
    norm = np.array([_DIGITS.sub("#", str(c)) for c in text.cat.categories] + [""], dtype=object)
    rr = r.assign(key=norm[np.asarray(text.cat.codes)])
    rr = rr[~rr["key"].isin(step_keys)]
    rows = []
    for tid, g in launches.groupby("thread_id", sort=False):
        g = g.sort_values("start_ns", kind="stable")
        ts = g["start_ns"].to_numpy(np.int64)
        cum = np.r_[0, np.cumsum(g["d"].to_numpy(np.int64))]
        rt = rr[rr["thread_id"] == tid]
        if rt.empty:
            continue
        lo = np.searchsorted(ts, rt["start_ns"].to_numpy(np.int64), side="left")
        hi = np.searchsorted(ts, rt["end_ns"].to_numpy(np.int64), side="right")
        rows.append(pd.DataFrame({"text": rt["key"].to_numpy(), "total_ns": cum[hi] - cum[lo], "count": hi - lo}))
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.concat(rows, ignore_index=True)
    out = out[out["total_ns"] > 0]
    return out.groupby("text", sort=False).agg(total_ns=("total_ns", "sum"), count=("count", "sum")).reset_index()
