"""ncu_kernels: what bounds each kernel Nsight Compute profiled (an ncu export alone is a full input).

Launches are grouped by kernel name (durations, FLOPs and DRAM bytes summed; fractions duration-weighted)
and ranked by total duration; the ``max_kernels`` longest get a finding each:

* **bound**: on the roofline (``analyzers.roofline.kernel_roofline``) with the measured ceilings when
  given (``gpudoctor ceilings`` JSON in the config or the run), else the datasheet peaks: ``compute`` when
  the arithmetic intensity is at or above the ridge point, ``memory`` below it. Either becomes
  ``latency`` when neither the SM nor the memory speed-of-light throughput reaches ``latency_sol_max``
  (the kernel keeps neither the pipes nor DRAM busy: too few warps, dependencies, launch-size). Without
  FLOP or DRAM counters (a details page with SpeedOfLight only) the larger of the SM and memory SOL
  throughputs decides.
* **tensor pipe** of GEMM-like kernels: a GEMM/convolution whose tensor pipe is active less than
  ``low_tensor_core.tensor_pipe_min`` runs on the FP32 pipes; its saving is its duration x (1 - fp32 /
  tf32 peak).
* **achieved DRAM bandwidth** of memory-bound kernels, as a fraction of the copy bandwidth.

The saving of a kernel is the time it would lose reaching its roof (duration x (1 - roof fraction)), or
the tensor-core saving when larger; fractions are of the total profiled duration, and severity uses the
``severity`` thresholds on that fraction. ``evidence.basis`` is ``ncu`` (confidence high with FLOP and
byte counters, medium from SOL percentages alone).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gpudoctor.analyzers.context import AnalysisContext, display_name
from gpudoctor.analyzers.findings import Finding
from gpudoctor.analyzers.low_tensor_core import is_gemm
from gpudoctor.analyzers.roofline import kernel_roofline
from gpudoctor.analyzers.spec import AnalyzerSpec, Setting, fraction
from gpudoctor.model.devices import lookup

ID = "ncu_kernels"
SETTINGS = (
    Setting("max_kernels", 10, "findings for at most this many kernels, the longest first", unit="count"),
    fraction("latency_sol_max", 0.6, "latency-bound when neither SM nor memory speed-of-light throughput reaches this fraction"),
    fraction("medium_fraction", None, "own override of severity.medium_fraction (saving / profiled time)"),
    fraction("high_fraction", None, "own override of severity.high_fraction"),
)

_SUM = ("duration_ns", "dram_read_bytes", "dram_write_bytes", "flops_fp64", "flops_fp32", "flops_fp16", "flops_tensor")
_MEAN = ("tensor_pipe_fraction", "sm_throughput_fraction", "memory_throughput_fraction", "dram_throughput_fraction",
         "achieved_occupancy_fraction")


def per_kernel(km: pd.DataFrame) -> pd.DataFrame:
    """One row per kernel name: launches, summed counters (NaN when no launch has them), duration-weighted
    fractions; sorted by total duration."""
    names = km["name"].astype(str).to_numpy(dtype=object)
    dur = km["duration_ns"].to_numpy(np.float64)
    w = np.where(np.isfinite(dur) & (dur > 0), dur, 1.0)
    cols = {"name": names, "launches": np.ones(len(km), np.int64)}
    for c in _SUM:
        cols[c] = km[c].to_numpy(np.float64)
        cols["_has_" + c] = np.isfinite(cols[c])
    for c in _MEAN:
        v = km[c].to_numpy(np.float64)
        cols[c + "_w"] = np.where(np.isfinite(v), v * w, 0.0)
        cols[c + "_n"] = np.where(np.isfinite(v), w, 0.0)
    g = pd.DataFrame(cols).groupby("name", sort=False).sum(min_count=1)
    out = pd.DataFrame({"name": g.index.astype(str), "launches": g["launches"].to_numpy(np.int64)})
    ranges = pd.Series(km["nvtx_range"].astype(str).to_numpy(dtype=object)).groupby(names, sort=False).first()
    out["nvtx_range"] = ranges.reindex(out["name"]).to_numpy(dtype=object)
    for c in _SUM:
        out[c] = np.where(g["_has_" + c].to_numpy() > 0, g[c].to_numpy(np.float64), np.nan)
    for c in _MEAN:
        n = g[c + "_n"].to_numpy(np.float64)
        out[c] = np.where(n > 0, g[c + "_w"].to_numpy(np.float64) / np.where(n > 0, n, 1), np.nan)
    return out.sort_values("duration_ns", ascending=False, kind="stable").reset_index(drop=True)


def ceilings_for(ctx: AnalysisContext) -> tuple[dict | None, str]:
    """Ceilings for the roofline: the measured ones (ctx.peaks carries them), else the datasheet."""
    p = ctx.peaks if ctx.peaks is not None else lookup(ctx.device_name)
    if p is None or not math.isfinite(p.fp32_flops_per_s):
        return None, "no peaks known for this GPU (run gpudoctor ceilings, pass --ceilings)"
    c = {"copy_bandwidth_bytes_per_s": p.memory_bandwidth_bytes_per_s, "bf16_flops_per_s": p.bf16_flops_per_s,
         "tf32_flops_per_s": p.tf32_flops_per_s, "fp32_flops_per_s": p.fp32_flops_per_s}
    return c, ("measured ceilings" if p.measured else "datasheet peaks") + f" of {p.name}"


def measure(ctx: AnalysisContext) -> tuple[pd.DataFrame, str]:
    """Per kernel name: the roofline placement plus bound (memory | compute | latency | unknown)."""
    cfg = ctx.config.section(ID)
    kn = per_kernel(ctx.trace.kernel_metrics)
    ceilings, ceil_src = ceilings_for(ctx)
    if ceilings is not None:
        roof = kernel_roofline(kn, ceilings)
        kn = kn.join(roof[["flops", "dram_bytes", "arithmetic_intensity", "achieved_bytes_per_s", "achieved_flops_per_s",
                           "peak_flops_per_s", "peak_bytes_per_s", "ridge_intensity", "bound", "roof_fraction",
                           "dominant_precision"]])
    else:
        for c in ("flops", "dram_bytes", "arithmetic_intensity", "achieved_bytes_per_s", "achieved_flops_per_s",
                  "peak_flops_per_s", "peak_bytes_per_s", "ridge_intensity", "roof_fraction"):
            kn[c] = np.nan
        kn["bound"] = "unknown"
        kn["dominant_precision"] = "unknown"
    sm = kn["sm_throughput_fraction"].to_numpy(np.float64)
    mem = kn["memory_throughput_fraction"].to_numpy(np.float64)
    sol_known = np.isfinite(sm) | np.isfinite(mem)
    sol_max = np.fmax(np.nan_to_num(sm, nan=-1), np.nan_to_num(mem, nan=-1))
    bound = kn["bound"].to_numpy(dtype=object).copy()
    by_sol = (bound == "unknown") & sol_known
    bound[by_sol] = np.where(np.nan_to_num(sm[by_sol], nan=-1) >= np.nan_to_num(mem[by_sol], nan=-1), "compute", "memory")
    # One SOL throughput alone names the bound only when it is high; a low one leaves the other unknown.
    bound[by_sol & ~(np.isfinite(sm) & np.isfinite(mem)) & (sol_max < float(cfg["latency_sol_max"]))] = "unknown"
    both = np.isfinite(sm) & np.isfinite(mem)  # latency needs both: one missing SOL could be the busy one
    bound[both & (sol_max < float(cfg["latency_sol_max"]))] = "latency"
    kn["bound"] = bound
    kn["bound_by"] = np.where(bound == "unknown", "", np.where(by_sol, "speed-of-light throughput", "roofline"))
    kn["gemm_like"] = [is_gemm(n) for n in kn["name"]]  # a few dozen names, not per launch
    return kn, ceil_src


def runs_without_tensor_cores(row: pd.Series, tc_min: float) -> bool:
    """A GEMM-like kernel on the FP32 pipes: no tensor FLOPs while SIMT FLOPs were counted, or, without FLOP
    counters, a tensor pipe below ``tc_min`` in a kernel that is not memory-bound (a GEMV keeps the tensor
    pipe nearly idle because it waits on DRAM, not because it lacks tensor cores)."""
    if not row["gemm_like"]:
        return False
    tensor, simt = row["flops_tensor"], np.nansum([row["flops_fp32"], row["flops_fp16"], row["flops_fp64"]])
    if np.isfinite(tensor):
        return bool(tensor == 0 and simt > 0)
    pipe = row["tensor_pipe_fraction"]
    return bool(np.isfinite(pipe) and pipe < tc_min and row["bound"] != "memory")


def _tc_saving_fraction(ctx: AnalysisContext) -> float:
    p = ctx.peaks if ctx.peaks is not None else lookup(ctx.device_name)
    if p is None or not (math.isfinite(p.fp32_flops_per_s) and math.isfinite(p.tf32_flops_per_s)):
        return 0.5
    return 1.0 - p.fp32_flops_per_s / p.tf32_flops_per_s


def _sol_text(row: pd.Series) -> str:
    sol = [f"{what} {row[col]:.0%}" for what, col in (("SM", "sm_throughput_fraction"), ("memory", "memory_throughput_fraction"))
           if np.isfinite(row[col])]
    return " / ".join(sol) + " of peak throughput"


def severity(ctx: AnalysisContext, saving_fraction: float) -> str:
    return ctx.config.severity(saving_fraction, ID)


def explain(ctx: AnalysisContext, row: pd.Series, total_ns: float, ceil_src: str, tc_min: float,
            tc_keep: float) -> Finding:
    dur = float(row["duration_ns"])
    name = display_name(row["name"], 90)
    bound = str(row["bound"])
    roof = float(row["roof_fraction"]) if np.isfinite(row["roof_fraction"]) else float("nan")
    no_tc = runs_without_tensor_cores(row, tc_min)
    if bound == "unknown":
        saving = 0.0
    elif math.isfinite(roof):
        saving = dur * (1.0 - min(roof, 1.0))
    else:  # no roofline: the headroom to the busier of the SM / memory speed-of-light throughputs
        sol = np.nanmax([row["sm_throughput_fraction"], row["memory_throughput_fraction"], np.nan])
        saving = dur * (1.0 - min(float(sol), 1.0)) if np.isfinite(sol) else 0.0
    if no_tc:
        saving = max(saving, dur * tc_keep)
    frac = saving / total_ns if total_ns > 0 else 0.0
    r = {k: round(float(row[k]), 6) for k in
         ("roof_fraction", "tensor_pipe_fraction", "arithmetic_intensity", "ridge_intensity", "sm_throughput_fraction",
          "memory_throughput_fraction", "dram_throughput_fraction", "achieved_bytes_per_s", "achieved_flops_per_s")
         if np.isfinite(row[k])}
    metrics = {"bound": bound, "duration_ns": int(dur), "profiled_time_fraction": round(dur / total_ns, 6) if total_ns else 0.0,
               "launches": int(row["launches"]), **r}
    bw_frac = (row["achieved_bytes_per_s"] / row["peak_bytes_per_s"]
               if np.isfinite(row["achieved_bytes_per_s"]) and np.isfinite(row["peak_bytes_per_s"]) else float("nan"))
    if math.isfinite(bw_frac):
        metrics["dram_bandwidth_fraction"] = round(float(bw_frac), 6)
    parts = [f"{name}: {bound}-bound"]
    if bound == "memory" and math.isfinite(bw_frac):
        parts.append(f"DRAM {row['achieved_bytes_per_s'] / 1e9:,.0f} GB/s = {bw_frac:.0%} of peak bandwidth ({ceil_src.split(' of ')[0]})")
    elif bound == "compute" and math.isfinite(roof):
        parts.append(f"{roof:.0%} of the {row['dominant_precision']} compute roof")
    elif bound == "latency":
        parts.append(_sol_text(row))
    elif row["bound_by"] == "speed-of-light throughput":
        parts.append(_sol_text(row))
    if row["gemm_like"] and np.isfinite(row["tensor_pipe_fraction"]):
        parts.append(f"tensor pipe {row['tensor_pipe_fraction']:.1%}" + (" (FP32 pipes, no tensor cores)" if no_tc else ""))
    confidence = "high" if row["bound_by"] == "roofline" else "medium"
    title = ", ".join(parts) + f" ({dur / 1e3:,.1f} us, {metrics['profiled_time_fraction']:.0%} of profiled time) " \
                               f"[evidence: ncu, confidence {confidence}]"
    rec = {"memory": "Memory-bound: fewer bytes (fusion with neighbours, lower-precision weights/activations, better reuse "
                     "through tiling); a kernel near the copy bandwidth is already at its roof.",
           "compute": "Compute-bound: move the FLOPs to a faster pipe (bf16/fp8 tensor cores) or do fewer of them.",
           "latency": "Latency-bound: neither the pipes nor DRAM are busy. Give the kernel more parallel work (bigger "
                      "batch / grid, fuse small launches), raise occupancy, or remove dependent memory round-trips.",
           "unknown": "Profile with FLOP and DRAM counters (ncu --section SpeedOfLight --section SpeedOfLight_RooflineChart)."}
    text = rec[bound]
    if no_tc:
        text = ("Runs without tensor cores: use bf16 autocast or allow TF32 (torch.backends.cuda.matmul.allow_tf32 / "
                "cudnn.allow_tf32 = True). ") + text
    evidence = {"basis": "ncu", "confidence": confidence, "bound_by": row["bound_by"], "ceilings": ceil_src,
                "kernel": str(row["name"])[:200]}
    if row["nvtx_range"]:
        evidence["nvtx_range"] = str(row["nvtx_range"])
    return Finding(analyzer=ID, severity=severity(ctx, frac) if saving > 0 else "info", title=title,
                   metrics=metrics, estimated_saving_ns=int(saving), estimated_saving_fraction=round(frac, 6),
                   recommendation=text, evidence=evidence, rank=ctx.rank)


def analyze(ctx: AnalysisContext) -> list[Finding]:
    km = ctx.trace.kernel_metrics
    if km.empty or not km["duration_ns"].notna().any():
        return []
    cfg = ctx.config.section(ID)
    kn, ceil_src = measure(ctx)
    total = float(np.nansum(kn["duration_ns"].to_numpy(np.float64)))
    tc_min = float(ctx.config.section("low_tensor_core")["tensor_pipe_min"])
    keep = _tc_saving_fraction(ctx)
    return [explain(ctx, row, total, ceil_src, tc_min, keep) for _, row in kn.head(int(cfg["max_kernels"])).iterrows()]


SPEC = AnalyzerSpec(ID, analyze, SETTINGS, evidence=(
    ("basis", "where the numbers come from (ncu)"),
    ("confidence", "high with FLOP and DRAM counters (roofline), medium from speed-of-light percentages alone"),
    ("bound_by", "what decided the bound: roofline or speed-of-light throughput"),
    ("ceilings", "the ceilings the roofline used (measured or datasheet, and the GPU)"),
    ("kernel", "the kernel's full name"),
    ("nvtx_range", "the NVTX range ncu recorded the kernel in"),
))
