"""Per-rank summary of a trace: steady-state window, GPU busy fraction, where the GPU time went."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gpudoctor.model import sampled
from gpudoctor.model.columns import as_categorical
from gpudoctor.model.kernel_names import kernel_keys
from gpudoctor.model.steps import StepWindow, find_steps, union_ns
from gpudoctor.model.trace import Trace

TOP_N = 10


@dataclass
class RankSummary:
    rank: int
    device: str
    window: StepWindow
    gpu_busy_fraction: float
    kernel_count: int  # all kernels of the rank
    steady_kernel_count: int  # kernels inside the steady-state window
    top_kernels: pd.DataFrame  # name, category, count, total_ns, mean_ns, window_fraction
    category_time: pd.DataFrame  # category, total_ns, window_fraction
    range_time: pd.DataFrame  # text, count, gpu_ns, window_fraction
    samples: dict  # NVML means over the window (or the whole run when there are no kernels)
    profiled_kernel_count: int = 0  # kernel launches Nsight Compute profiled (kernel_metrics rows)
    gpu_metrics: dict | None = None  # Nsight Systems GPU metrics: time-weighted means over the window (fractions)

    def to_dict(self) -> dict:
        w = self.window
        return {
            "rank": self.rank,
            "device": self.device,
            "window_ns": [int(w.start_ns), int(w.end_ns)],
            "window_duration_ns": w.duration_ns,
            "window_source": w.describe(),
            "steps": {
                "count": int(len(w.steps)),
                "warmup": int(w.steps["warmup"].sum()) if len(w.steps) else 0,
                "median_step_ns": int(np.median(w.steady["duration_ns"])) if len(w.steady) else None,
            },
            "gpu_busy_fraction": round(self.gpu_busy_fraction, 6),
            "kernel_count": self.kernel_count,
            "steady_kernel_count": self.steady_kernel_count,
            "profiled_kernel_count": self.profiled_kernel_count,
            "gpu_metrics": self.gpu_metrics or {},
            "top_kernels": _records(self.top_kernels),
            "time_by_category": _records(self.category_time),
            "time_by_range": _records(self.range_time),
            "nvml": self.samples,
        }


def _records(df: pd.DataFrame) -> list[dict]:
    out = []
    for row in df.to_dict(orient="records"):
        out.append({k: (int(v) if isinstance(v, (np.integer,)) else round(float(v), 6) if isinstance(v, (float, np.floating))
                        else v) for k, v in row.items()})
    return out


def in_window(df: pd.DataFrame, start_ns: int, end_ns: int, start_col: str = "start_ns",
              end_col: str = "end_ns") -> pd.DataFrame:
    """Rows overlapping [start_ns, end_ns]."""
    s = df[start_col].to_numpy()
    e = df[end_col].to_numpy()
    return df[(e > start_ns) & (s < end_ns)]


def summarize_rank(trace: Trace, rank: int, view: Trace | None = None, window: StepWindow | None = None,
                   keys: pd.Categorical | None = None) -> RankSummary:
    """Where ``rank``'s steady-state time went. ``view``: the rank's tables when already filtered; ``window``:
    its steady-state window when already found; ``keys``: ``kernel_keys`` of its kernels (else all three are
    computed here). Top kernels are grouped by kernel identity (``kernel_key``), not by short name."""
    t = view if view is not None else trace.for_rank(rank) if len(trace.rank_ids) > 1 else trace
    if window is None:
        window = find_steps(t.ranges, t.kernels)
    if keys is None:
        keys = kernel_keys(t.kernels)
    lo, hi = window.start_ns, window.end_ns
    dur = max(hi - lo, 1)
    kin = (t.kernels["end_ns"].to_numpy() > lo) & (t.kernels["start_ns"].to_numpy() < hi)
    k = t.kernels[kin]
    m = in_window(t.memops, lo, hi)
    busy = union_ns(np.r_[k["start_ns"].to_numpy(), m["start_ns"].to_numpy()],
                    np.r_[k["end_ns"].to_numpy(), m["end_ns"].to_numpy()], lo, hi)
    # Clip kernel durations to the window so fractions add up.
    kd = np.minimum(k["end_ns"].to_numpy(), hi) - np.maximum(k["start_ns"].to_numpy(), lo)
    # Group on the categorical codes; only the few groups become str.
    identity = pd.Categorical.from_codes(np.asarray(keys.codes)[kin], categories=keys.categories) if len(keys) else keys
    kk = pd.DataFrame({"name": identity, "category": as_categorical(k["category"]).array, "d": kd})
    top = (kk.groupby(["name", "category"], sort=False, observed=True).agg(count=("d", "size"), total_ns=("d", "sum"))
           .reset_index().sort_values("total_ns", ascending=False).head(TOP_N))
    top["name"] = top["name"].astype(str)
    top["category"] = top["category"].astype(str)
    top["mean_ns"] = (top["total_ns"] / top["count"]).round().astype(np.int64)
    top["window_fraction"] = top["total_ns"] / dur
    md = np.minimum(m["end_ns"].to_numpy(), hi) - np.maximum(m["start_ns"].to_numpy(), lo)
    by_cat = kk.groupby("category", observed=True)["d"].sum()
    by_cat = pd.Series(by_cat.to_numpy(), index=by_cat.index.astype(str))
    if len(md):
        by_cat["memory"] = by_cat.get("memory", 0) + md.sum()
    cat = (by_cat.rename_axis("category").rename("total_ns").reset_index()
           .sort_values(["total_ns", "category"], ascending=[False, True]))
    cat["window_fraction"] = cat["total_ns"] / dur
    r = t.ranges
    r = r[(r["gpu_start_ns"] >= 0)]
    r = r[(r["gpu_end_ns"] > lo) & (r["gpu_start_ns"] < hi)]
    rd = np.minimum(r["gpu_end_ns"].to_numpy(), hi) - np.maximum(r["gpu_start_ns"].to_numpy(), lo)
    rr = pd.DataFrame({"text": r["text"].astype(str).to_numpy(), "depth": r["depth"].to_numpy(), "d": rd})
    rng = (rr.groupby("text").agg(count=("d", "size"), gpu_ns=("d", "sum"), depth=("depth", "min")).reset_index()
           .sort_values(["depth", "gpu_ns"], ascending=[True, False]).head(TOP_N))
    rng["window_fraction"] = rng["gpu_ns"] / dur
    rng = rng.drop(columns="depth")
    dev = t.devices["name"].iloc[0] if len(t.devices) else ""
    samples = nvml_means(t.counters, lo, hi) if hi > lo else nvml_means(t.counters, None, None)
    return RankSummary(rank=rank, device=str(dev), window=window, gpu_busy_fraction=busy / dur,
                       kernel_count=int(len(t.kernels)), steady_kernel_count=int(len(k)),
                       top_kernels=top.reset_index(drop=True), category_time=cat.reset_index(drop=True),
                       range_time=rng.reset_index(drop=True), samples=samples,
                       profiled_kernel_count=int(len(t.kernel_metrics)),
                       gpu_metrics=gpu_metric_means(t.counters, lo, hi))


GPU_METRIC_KEYS = ("dram_read_fraction", "dram_write_fraction", "tensor_active_fraction", "sm_active_fraction",
                   "gr_active_fraction")


def gpu_metric_means(counters: pd.DataFrame, lo: int, hi: int) -> dict:
    """Time-weighted means of the main Nsight Systems GPU metrics over [lo, hi] (fractions of peak)."""
    out = {}
    if hi <= lo:
        return out
    for key in GPU_METRIC_KEYS:
        v, src = sampled.metric_over(counters, key, np.array([lo]), np.array([hi]), source="gpu_metrics")
        if src and np.isfinite(v[0]):
            out[key] = round(float(v[0]), 4)
    return out


NVML_MEANS = {"nvml.gpu_util_pct": "gpu_util_pct", "nvml.sm_util_pct": "sm_util_pct",
              "nvml.tensor_util_pct": "tensor_util_pct", "nvml.dram_bw_util_pct": "dram_bw_util_pct",
              "nvml.power_w": "power_w", "nvml.sm_clock_mhz": "sm_clock_mhz"}


def nvml_means(counters: pd.DataFrame, lo: int | None, hi: int | None) -> dict:
    """Mean of the NVML sampler's main series (and peak memory used) inside [lo, hi]."""
    c = counters
    if c.empty:
        return {}
    if lo is not None:
        c = c[(c["ts_ns"] >= lo) & (c["ts_ns"] <= hi)]
    names = c["name"].astype(str)
    out = {}
    for series, key in NVML_MEANS.items():
        v = c.loc[names == series, "value"].dropna()
        if len(v):
            out[key] = round(float(v.mean()), 3)
    mem = c.loc[names == "nvml.mem_used_bytes", "value"].dropna()
    if len(mem):
        out["mem_used_bytes_max"] = int(mem.max())
    if out:
        out["samples"] = int((names == "nvml.gpu_util_pct").sum())
    return out
