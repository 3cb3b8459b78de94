"""Per-kernel roofline from Nsight Compute metrics and measured ceilings.

``kernel_roofline(kernel_metrics, ceilings)`` is a pure function: one output row per input row (same
index), no plotting, no files.

* ``flops`` = fp64 + fp32 + fp16 SIMT FLOPs + tensor FLOPs (NaN parts count 0; NaN when all are NaN).
* ``dram_bytes`` = DRAM read + write (``dram_bytes`` column of ``readers.ncu.read_metrics`` when the
  export only has the total).
* dominant precision = the largest of tensor / fp32 / fp16 / fp64 FLOPs. Its ceiling:
  tensor -> ``bf16_flops_per_s`` (or, when the frame carries ``flops_tensor_<p>`` columns from
  ``read_metrics``, the ceiling of the largest tensor precision: tf32 -> ``tf32_flops_per_s``, fp16 ->
  ``fp16_tensor_flops_per_s`` else bf16, fp8 -> ``fp8_flops_per_s`` else 2x bf16, fp64 ->
  ``fp64_tensor_flops_per_s`` else ``fp64_flops_per_s``); fp32 -> ``fp32_flops_per_s``; fp16 SIMT ->
  ``fp16_flops_per_s`` else 2x fp32; fp64 -> ``fp64_flops_per_s`` else the fp32 ceiling (an upper
  bound, so roof_fraction is then a lower bound); no FLOPs -> the fp32 ceiling (memory-bound anyway);
  no FLOP counters at all -> "unknown" with a NaN peak.
  ``peak_ceiling`` names what was used.
* ``ridge_intensity`` = peak / ``copy_bandwidth_bytes_per_s``; ``bound`` = "compute" when
  arithmetic_intensity >= ridge, "memory" below, "unknown" without FLOPs and bytes or without a duration.
* ``roof_fraction`` = achieved / roof at the kernel's intensity: achieved FLOP/s / peak when
  compute-bound, achieved DRAM bytes/s / bandwidth when memory-bound (identical to FLOP/s over
  intensity x bandwidth, and still defined for kernels with no FLOPs). Measured ceilings are medians of
  real runs, so a kernel at a better clock than the ceiling run can read slightly above 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

_REQUIRED = ("copy_bandwidth_bytes_per_s", "bf16_flops_per_s", "tf32_flops_per_s", "fp32_flops_per_s")
_SIMT = ("fp64", "fp32", "fp16")

COLUMNS = ["rank", "launch_id", "name", "nvtx_range", "kernel_row", "duration_ns",
           "flops_fp64", "flops_fp32", "flops_fp16", "flops_tensor", "flops", "dominant_precision",
           "dram_bytes", "arithmetic_intensity", "achieved_flops_per_s", "achieved_bytes_per_s",
           "peak_flops_per_s", "peak_ceiling", "peak_bytes_per_s", "ridge_intensity", "bound", "roof_fraction",
           "tensor_pipe_fraction"]


def _col(df: pd.DataFrame, name: str) -> np.ndarray:
    if name in df.columns:
        return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype="float64")
    return np.full(len(df), np.nan)


def _ceiling_table(c: dict) -> dict[str, tuple[float, str]]:
    def get(key):
        v = c.get(key)
        return float(v) if v is not None and np.isfinite(float(v)) and float(v) > 0 else None

    bf16, tf32, fp32 = get("bf16_flops_per_s"), get("tf32_flops_per_s"), get("fp32_flops_per_s")
    fp64, fp16 = get("fp64_flops_per_s"), get("fp16_flops_per_s")
    t = {
        "tensor_bf16": (bf16, "bf16_flops_per_s"),
        "tensor_tf32": (tf32, "tf32_flops_per_s"),
        "tensor_fp16": (get("fp16_tensor_flops_per_s"), "fp16_tensor_flops_per_s") if get("fp16_tensor_flops_per_s")
        else (bf16, "bf16_flops_per_s"),
        "tensor_fp8": (get("fp8_flops_per_s"), "fp8_flops_per_s") if get("fp8_flops_per_s")
        else (2 * bf16, "2*bf16_flops_per_s"),
        "tensor_fp64": (get("fp64_tensor_flops_per_s"), "fp64_tensor_flops_per_s") if get("fp64_tensor_flops_per_s")
        else ((fp64, "fp64_flops_per_s") if fp64 else (fp32, "fp32_flops_per_s")),
        "fp32": (fp32, "fp32_flops_per_s"),
        "fp16": (fp16, "fp16_flops_per_s") if fp16 else (2 * fp32, "2*fp32_flops_per_s"),
        "fp64": (fp64, "fp64_flops_per_s") if fp64 else (fp32, "fp32_flops_per_s"),
        "none": (fp32, "fp32_flops_per_s"),
        "unknown": (float("nan"), ""),  # no FLOP counters exported: the kernel cannot be placed
    }
    return t


def kernel_roofline(kernel_metrics: pd.DataFrame, ceilings: dict) -> pd.DataFrame:
    """Roofline placement of every profiled kernel. See the module docstring for the definitions."""
    missing = [k for k in _REQUIRED if not ceilings.get(k)]
    if missing:
        raise ValueError(f"ceilings lack {missing} (measure them with python -m gpudoctor.collect.ceilings)")
    km = kernel_metrics
    n = len(km)
    table = _ceiling_table(ceilings)
    bw = float(ceilings["copy_bandwidth_bytes_per_s"])

    simt = {p: _col(km, f"flops_{p}") for p in _SIMT}
    tensor = _col(km, "flops_tensor")
    parts = np.column_stack([tensor] + [simt[p] for p in _SIMT]) if n else np.zeros((0, 4))
    all_nan = np.isnan(parts).all(axis=1)
    flops = np.where(all_nan, np.nan, np.nansum(parts, axis=1))
    dom_idx = np.argmax(np.nan_to_num(parts, nan=0.0), axis=1) if n else np.zeros(0, dtype=int)
    any_flops = np.nan_to_num(parts, nan=0.0).max(axis=1) > 0 if n else np.zeros(0, dtype=bool)
    dominant = np.array(["tensor", *_SIMT], dtype=object)[dom_idx]
    dominant = np.where(any_flops, dominant, np.where(all_nan, "unknown", "none"))

    # which tensor precision: from flops_tensor_<p> columns when the caller has them, else bf16
    tprec_names = ["bf16", "fp16", "tf32", "fp8", "fp64"]
    tp = np.column_stack([_col(km, f"flops_tensor_{p}") for p in tprec_names]) if n else np.zeros((0, 5))
    have_tp = np.nan_to_num(tp, nan=0.0).max(axis=1) > 0 if n else np.zeros(0, dtype=bool)
    tprec = np.where(have_tp, np.array(tprec_names, dtype=object)[np.argmax(np.nan_to_num(tp, nan=0.0), axis=1)]
                     if n else np.zeros(0, dtype=object), "bf16")
    precision = pd.Series(np.where(dominant == "tensor", "tensor_" + tprec.astype(str), dominant.astype(str)),
                          dtype=object)
    peak = precision.map({k: v for k, (v, _) in table.items()}).to_numpy(dtype="float64")
    peak_src = precision.map({k: s for k, (_, s) in table.items()}).to_numpy(dtype=object)
    precision = precision.to_numpy(dtype=object)

    rd, wr, total = _col(km, "dram_read_bytes"), _col(km, "dram_write_bytes"), _col(km, "dram_bytes")
    rw = np.where(np.isnan(rd) & np.isnan(wr), np.nan, np.nan_to_num(rd) + np.nan_to_num(wr))
    dram = np.where(np.isnan(rw), total, rw)

    dur_s = _col(km, "duration_ns") * 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        ai = np.where((np.nan_to_num(flops) == 0) & (dram == 0), np.nan, flops / dram)
        ach_f = np.where(dur_s > 0, flops / dur_s, np.nan)
        ach_b = np.where(dur_s > 0, dram / dur_s, np.nan)
        ridge = peak / bw
        no_flops = ~any_flops & ~all_nan  # counted, zero FLOPs: intensity 0
        ai = np.where(no_flops & (dram > 0), 0.0, ai)
        known = ~np.isnan(ai) & (dur_s > 0)
        compute = known & (ai >= ridge)
        bound = np.where(~known, "unknown", np.where(compute, "compute", "memory"))
        frac = np.where(compute, ach_f / peak, ach_b / bw)
        frac = np.where(known, frac, np.nan)

    def passthrough(name, fill):
        return km[name].to_numpy() if name in km.columns else np.full(n, fill, dtype=object)

    out = pd.DataFrame({
        "rank": passthrough("rank", 0), "launch_id": passthrough("launch_id", -1),
        "name": km["name"].astype(object).to_numpy() if "name" in km.columns else np.full(n, "", dtype=object),
        "nvtx_range": km["nvtx_range"].astype(object).to_numpy() if "nvtx_range" in km.columns
        else np.full(n, "", dtype=object),
        "kernel_row": passthrough("kernel_row", -1), "duration_ns": _col(km, "duration_ns"),
        "flops_fp64": simt["fp64"], "flops_fp32": simt["fp32"], "flops_fp16": simt["fp16"], "flops_tensor": tensor,
        "flops": flops, "dominant_precision": precision, "dram_bytes": dram, "arithmetic_intensity": ai,
        "achieved_flops_per_s": ach_f, "achieved_bytes_per_s": ach_b, "peak_flops_per_s": peak,
        "peak_ceiling": peak_src, "peak_bytes_per_s": np.full(n, bw), "ridge_intensity": ridge, "bound": bound,
        "roof_fraction": frac, "tensor_pipe_fraction": _col(km, "tensor_pipe_fraction"),
    }, index=km.index, columns=COLUMNS)
    return out


__all__ = ["kernel_roofline", "COLUMNS"]
