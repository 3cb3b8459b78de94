"""memory_bound_decode: decode steps that stream the weights for a handful of tokens.

Decode steps are steady steps whose range name (or a range inside them) matches ``decode_range_pattern``,
whose GEMM time is mostly GEMV-shaped (names with gemv, nvjet N tile <= ``gemv_max_n`` such as
``_64x8_``, or M <= that in CPU-op shapes), or, at any batch, whose CPU-op shapes give at most
``decode_max_tokens`` tokens per step at an arithmetic intensity below the ridge point.

Bytes per decode step and MBU come from the strongest evidence present (``evidence.basis``):

1. ``gpu_metrics``: Nsight Systems ``DRAM Read`` + ``DRAM Write Bandwidth [Throughput %]`` samples,
   time-weighted over the decode steps' GPU spans: MBU = that fraction (of the GPU's peak DRAM
   bandwidth, rescaled when measured ceilings replace the datasheet), bytes = MBU x peak x span.
2. ``ncu``: DRAM bytes Nsight Compute measured for the decode steps' kernels (``kernel_metrics`` joined to
   the timeline), scaled to the steps' GEMM time when only some kernels were profiled.
3. ``shapes`` / config: ``model_bytes`` + ``kv_bytes_per_step`` (config), or the weight operands of the
   step's mm/addmm ops (CPU-op shapes); MBU = bytes / step period / peak bandwidth.
4. ``names``: tokens bounded by the GEMV kernels' N tile; MBU unknown.

    FLOPs        = sum of 2MNK from shapes, or 2 x bytes_weights / bytes_per_param x tokens_per_step,
                   or (GPU metrics) Tensor Active x peak FLOP/s x span
    arithmetic intensity = FLOPs / bytes;  ridge point = peak FLOP/s (precision) / peak bandwidth, reported
                   for the datasheet and, when given, the measured ceilings
    step period  = steady window / steady steps                (what tokens/s sees, host time included)
    mbu_gpu_busy = bytes / (GPU busy time per step) / peak bandwidth

Peaks come from the device table, replaced by measured ceilings when given. Severity uses this
analyzer's own thresholds (the cost is throughput, not window time): high when ridge / intensity >=
``high_headroom`` and the decode steps' GEMMs are >= ``gemv_busy_fraction_min`` of GPU busy time, medium
at ``medium_headroom``. The saving is per-token: batching B requests shares one weight read, removing
(1 - 1/B) of the decode GEMM time per token.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from gpudoctor.analyzers.context import AnalysisContext
from gpudoctor.analyzers.findings import Finding
from gpudoctor.analyzers.low_tensor_core import MM_OPS, gemm_kernels, gemm_shapes, tile_min
from gpudoctor.analyzers.spec import AnalyzerSpec, Setting, fraction
from gpudoctor.model import sampled
from gpudoctor.model.columns import per_value
from gpudoctor.model.devices import PRECISIONS, lookup

ID = "memory_bound_decode"

SETTINGS = (
    Setting("decode_range_pattern", r"(?<![a-z])(decode|decoding|generate|generation)(?![a-z])",
            "regex (case-insensitive) of step range names that are decode steps (a whole word: 'decode_step', "
            "not 'decoder')", kind="regex"),
    Setting("gemv_max_n", 16, "N tile (nvjet _MxN_) at most this, or M <= this in shapes: a GEMV-shaped (decode) GEMM",
            unit="elements"),
    Setting("decode_max_tokens", 256, "with CPU-op shapes: steps of at most this many tokens whose intensity is below "
            "the ridge point are decode steps", unit="tokens"),
    fraction("decode_gemv_fraction", 0.5, "steps whose GEMM time is at least this fraction GEMV-shaped are decode steps"),
    Setting("model_bytes", None, "bytes of weights read per step (e.g. parameters x 2 for bf16); shapes give it when recorded",
            unit="bytes", kind="number"),
    Setting("kv_bytes_per_step", None, "bytes of KV cache read per step (added to model_bytes)", unit="bytes",
            kind="number"),
    Setting("tokens_per_step", None, "tokens produced per step (the decode batch); shapes give it when recorded",
            unit="tokens", kind="number", minimum=1),
    Setting("bytes_per_param", 2, "bytes per weight (2 = bf16/fp16, 1 = fp8/int8) for FLOPs = 2 x params x tokens",
            unit="bytes", kind="number", minimum=0.125),
    Setting("precision", "bf16", "precision of the matrix products, for the compute ceiling",
            choices=PRECISIONS),
    Setting("target_batch", 32, "batch the recommendation quotes ('batching to B would give ...'), capped by the ridge point",
            unit="tokens", minimum=1),
    Setting("medium_headroom", 4.0, "medium when ridge point / arithmetic intensity >= this (batching can give >= 4x)",
            unit="x"),
    Setting("high_headroom", 16.0, "high when ridge point / arithmetic intensity >= this", unit="x"),
    fraction("gemv_busy_fraction_min", 0.25, "below medium unless GEMV-shaped GEMMs are at least this fraction of GPU busy time"),
)
INFERENCE_STEP = re.compile(r"prefill|decode|generat|infer|forward|serve", re.I)


def _step_of(starts_ns: np.ndarray, steps: pd.DataFrame) -> np.ndarray:
    """Index (into ``steps``) of the step whose GPU span holds each start time, or -1."""
    s = steps["gpu_start_ns"].to_numpy(np.int64)
    e = steps["gpu_end_ns"].to_numpy(np.int64)
    order = np.argsort(s, kind="stable")
    j = np.searchsorted(s[order], starts_ns, side="right") - 1
    ok = j >= 0
    idx = np.where(ok, order[np.clip(j, 0, None)], -1)
    ok &= starts_ns < np.where(idx >= 0, e[np.clip(idx, 0, None)], 0)
    return np.where(ok, idx, -1)


def _shape_facts(ctx: AnalysisContext, gemm_rows: np.ndarray, step_idx: np.ndarray) -> dict:
    """Per-step weight bytes, FLOPs and tokens from the mm/addmm ops that launched the GEMMs (each op once,
    however many kernels it launched); the medians over steps."""
    op_idx = ctx.kernel_ops(MM_OPS)
    rows = gemm_rows[op_idx[gemm_rows] >= 0]
    if ctx.ops is None or len(rows) == 0:
        return {}
    rows = rows[step_idx[rows] >= 0]
    ops, first = np.unique(op_idx[rows], return_index=True)  # an op's first GEMM kernel decides its step
    sh = gemm_shapes(ctx).iloc[ops]
    known = sh["m"].to_numpy() >= 0
    if not known.any():
        return {}
    sh = sh[known]
    m_, n_, k_, batch = (sh[c].to_numpy(np.float64) for c in ("m", "n", "k", "batch"))
    weight = np.where(sh["batched"].to_numpy(bool), 0.0,
                      sh["weight_elems"].to_numpy(np.float64) * sh["weight_elt_bytes"].to_numpy(np.float64))
    per = pd.DataFrame({"step": step_idx[rows[first[known]]], "weight_bytes": weight,
                        "flops": 2.0 * m_ * n_ * k_ * batch, "tokens": m_ * batch})
    by_step = per.groupby("step").agg(weight_bytes=("weight_bytes", "sum"), flops=("flops", "sum"),
                                      tokens=("tokens", "median"))
    return {"weight_bytes": float(by_step["weight_bytes"].median()), "flops": float(by_step["flops"].median()),
            "tokens": float(by_step["tokens"].median())}


def _named_steps(ctx: AnalysisContext, steady: pd.DataFrame, pat: re.Pattern, training: bool) -> np.ndarray:
    """Steps named as decode, or holding a range so named (a ProfilerStep around a ``decode_step`` range;
    not in a training step, whose inner ranges name modules, e.g. a "decode" block of a training model)."""
    named = np.array([bool(pat.search(str(n))) for n in steady["name"]], dtype=bool)
    r = ctx.trace.ranges
    if named.all() or r.empty or training:
        return named
    hit = ctx.name_mask(pat.pattern, frame=r, column="text")
    inner = r[hit & (r["gpu_start_ns"].to_numpy() >= 0)]
    if inner.empty:
        return named
    idx = _step_of(inner["gpu_start_ns"].to_numpy(np.int64), steady)
    has = np.zeros(len(steady), dtype=bool)
    has[idx[idx >= 0]] = True
    return named | has


def _training(ctx: AnalysisContext) -> bool:
    """A backward pass among the CPU ops: training, which no decode step is."""
    ops = ctx.ops
    return ops is not None and bool(per_value(ops["name"], lambda v: "backward" in v, dtype=bool, missing=False).any())


def _inference_matmuls(ctx: AnalysisContext, gemm: np.ndarray, dur: np.ndarray, training: bool) -> bool:
    """No backward pass among the CPU ops, and most GEMM time launched by matrix-product ops (not
    convolutions): the shape of a decoder's forward pass, not of training or a CNN."""
    if ctx.ops is None or training:
        return False
    by_mm = gemm & (ctx.kernel_ops(MM_OPS) >= 0)
    total = float(dur[gemm].sum())
    return total > 0 and float(dur[by_mm].sum()) / total >= 0.5


def find_decode_steps(ctx: AnalysisContext, cfg: dict, steady: pd.DataFrame, step_idx: np.ndarray, gemm: np.ndarray,
                      gemv: np.ndarray, shape: dict, ridge: float) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Decode steps (mask over ``steady``), the GEMV-shaped kernels, and what decided."""
    k = ctx.kernels
    dur = k["dur_ns"].to_numpy(np.int64)
    n_steps = len(steady)
    gmax = int(cfg["gemv_max_n"])
    training = _training(ctx)
    inference = _inference_matmuls(ctx, gemm, dur, training)
    if shape and shape["tokens"] <= gmax and inference:
        gemv = gemm.copy()  # the matrix products that launched them are GEMV-shaped (few tokens)
    on = step_idx >= 0
    g_all = np.bincount(step_idx[gemm & on], weights=dur[gemm & on], minlength=n_steps)
    g_gemv = np.bincount(step_idx[gemv & on], weights=dur[gemv & on], minlength=n_steps)
    named = _named_steps(ctx, steady, re.compile(str(cfg["decode_range_pattern"]), re.I), training)
    share = np.divide(g_gemv, g_all, out=np.zeros(n_steps), where=g_all > 0)
    # A CNN's or a training step's small matrix product (a classifier head at batch 16) is not decode.
    by_share = (share >= float(cfg["decode_gemv_fraction"])) & (not training)
    # Any batch: few tokens per step at an intensity below the ridge point (CPU-op shapes).
    by_shapes = np.zeros(n_steps, dtype=bool)
    if (shape and shape.get("weight_bytes") and shape["tokens"] <= int(cfg["decode_max_tokens"])
            and inference):
        ai = shape["flops"] / shape["weight_bytes"]
        if math.isfinite(ridge) and ai < ridge:
            by_shapes[:] = g_all > 0
    is_decode = named | by_share | by_shapes
    if not is_decode.any():
        return is_decode, gemv, None
    by = ("range names" if named[is_decode].all() else "GEMV share of GEMM time" if by_share[is_decode].all()
          else "CPU-op shapes (tokens per step and intensity below the ridge point)")
    return is_decode, gemv, by


def _decode_spans(steady: pd.DataFrame, sel_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (steady["gpu_start_ns"].to_numpy(np.int64)[sel_idx], steady["gpu_end_ns"].to_numpy(np.int64)[sel_idx])


def _span_mean(ts: np.ndarray, values: np.ndarray, s: np.ndarray, e: np.ndarray) -> float:
    means = sampled.interval_means(ts, values, s, e)
    w = (e - s).astype(float)
    ok = np.isfinite(means) & (w > 0)
    return float(np.sum(means[ok] * w[ok]) / np.sum(w[ok])) if ok.any() else float("nan")


def bytes_from_gpu_metrics(ctx: AnalysisContext, s: np.ndarray, e: np.ndarray, spec_bw: float) -> dict:
    """DRAM bytes per decode step and tensor activity over the steps' GPU spans from GPU-metrics samples."""
    dev = int(ctx.kernels["device_id"].mode().iloc[0]) if len(ctx.kernels) else None
    c = ctx.trace.counters
    rd = sampled.series(c, "dram_read_fraction", "gpu_metrics", dev)
    if len(rd[0]) < 2 or not math.isfinite(spec_bw):
        return {}
    wr = sampled.series(c, "dram_write_fraction", "gpu_metrics", dev)
    read = _span_mean(rd[0], rd[1], s, e)
    write = _span_mean(wr[0], wr[1], s, e) if len(wr[0]) >= 2 else 0.0
    if not math.isfinite(read):
        return {}
    dram = read + (write if math.isfinite(write) else 0.0)
    ta = sampled.series(c, "tensor_active_fraction", "gpu_metrics", dev)
    tensor = _span_mean(ta[0], ta[1], s, e) if len(ta[0]) >= 2 else float("nan")
    span = float(np.mean(e - s))
    return {"dram_fraction": dram, "dram_read_fraction": read, "dram_write_fraction": write,
            "tensor_active_fraction": tensor, "bytes_per_step": dram * spec_bw * span * 1e-9, "span_ns": span,
            "samples": int(sampled.sample_count_in(rd[0], s, e).sum())}


def bytes_from_ncu(ctx: AnalysisContext, rows: np.ndarray, n_steps: int) -> dict:
    """DRAM bytes and FLOPs per decode step from Nsight Compute rows joined to the decode steps' kernels."""
    km = ctx.trace.kernel_metrics
    if km.empty or not len(rows) or not (km["kernel_row"].to_numpy() >= 0).any():
        return {}
    k = ctx.kernels
    trace_rows = k["trace_row"].to_numpy()[rows]
    pos = pd.Index(km["kernel_row"].to_numpy()).get_indexer(trace_rows)
    have = pos >= 0
    if not have.any():
        return {}
    m = km.iloc[pos[have]]
    dram = (m["dram_read_bytes"].fillna(0) + m["dram_write_bytes"].fillna(0)).to_numpy(float)
    flops = m[["flops_fp32", "flops_fp16", "flops_fp64", "flops_tensor"]].fillna(0).to_numpy(float).sum(axis=1)
    dur = k["dur_ns"].to_numpy(np.float64)[rows]
    scale = dur.sum() / dur[have].sum() if dur[have].sum() > 0 else float("nan")  # unprofiled launches alike
    return {"bytes_per_step": dram.sum() * scale / n_steps, "flops_per_step": flops.sum() * scale / n_steps,
            "profiled_fraction": float(dur[have].sum() / dur.sum()) if dur.sum() else 0.0}


def _ridges(ctx: AnalysisContext, precision: str) -> dict:
    """Ridge point of the peaks used, and of the datasheet and the measured ceilings separately."""
    out = {}
    spec = lookup(ctx.device_name)
    if spec is not None:
        out["ridge_point_spec"] = spec.ridge_point(precision)
    p = ctx.peaks
    if p is not None and p.measured:
        out["ridge_point_measured"] = p.ridge_point(precision)
        out["measured_bandwidth_bytes_per_s"] = p.memory_bandwidth_bytes_per_s
    return out


def analyze(ctx: AnalysisContext) -> list[Finding]:
    k = ctx.kernels
    if k.empty:
        return []
    cfg = ctx.config.section(ID)
    gmax = int(cfg["gemv_max_n"])
    gemm, gemv = gemm_kernels(ctx, gmax)
    if not gemm.any():
        return []
    starts = k["start_ns"].to_numpy(np.int64)

    steady = ctx.window.steady.reset_index(drop=True)
    if steady.empty:  # no steps: the whole window is one step
        steady = pd.DataFrame({"name": ["(whole window)"], "gpu_start_ns": [ctx.start_ns], "gpu_end_ns": [ctx.end_ns]})
    step_idx = _step_of(starts, steady)
    peaks = ctx.peaks
    precision = str(cfg["precision"])
    ridge = peaks.ridge_point(precision) if peaks else float("nan")
    shape = _shape_facts(ctx, np.nonzero(gemm)[0], step_idx)
    is_decode, gemv, decode_by = find_decode_steps(ctx, cfg, steady, step_idx, gemm, gemv, shape, ridge)
    n_steps = len(steady)
    n_decode = int(is_decode.sum())
    inference_like = bool(any(INFERENCE_STEP.search(str(n)) for n in steady["name"]))
    if not n_decode and cfg["model_bytes"] is None and not inference_like:
        return []  # training or unrelated work: nothing to say
    sel_idx = np.nonzero(is_decode if n_decode else np.ones(n_steps, dtype=bool))[0]
    f = measure(ctx, cfg, steady, step_idx, sel_idx, gemm, gemv, shape, n_decode)
    f.update(decode_by=decode_by, n_decode=n_decode, n_steps=n_steps, steady=steady, sel_idx=sel_idx)
    return explain(ctx, cfg, f, severity(cfg, f))


def _tokens(ctx: AnalysisContext, cfg: dict, shape: dict, rows: np.ndarray, src: dict) -> tuple[float | None, bool]:
    """Tokens per step: config, then shapes, then an upper bound from the GEMMs' N tiles. (tokens, is_bound)"""
    if cfg["tokens_per_step"] is not None:
        src["tokens"] = "config tokens_per_step"
        return float(cfg["tokens_per_step"]), False
    if shape.get("tokens"):
        src["tokens"] = "M of the mm/addmm ops (CPU-op shapes)"
        return float(shape["tokens"]), False
    tiles = [t for t in (tile_min(str(n)) for n in set(ctx.kname_at(rows))) if t > 0] if len(rows) else []
    if tiles:
        src["tokens"] = (f"upper bound from the decode GEMM kernels' N tile ({max(tiles)}); set tokens_per_step for the "
                         "real batch")
        return float(max(tiles)), True
    return None, False


def _estimate(cfg: dict, shape: dict, tokens: float | None, src: dict) -> dict:
    """What a step must read and compute, from the config or the CPU-op shapes (basis ``shapes``), else
    nothing known (basis ``names``)."""
    model_bytes, kv_bytes = cfg["model_bytes"], cfg["kv_bytes_per_step"] or 0
    basis = "names"
    if model_bytes is not None:
        src["bytes"] = "config model_bytes" + (" + kv_bytes_per_step" if kv_bytes else "")
        basis = "shapes"
    elif shape.get("weight_bytes"):
        model_bytes = shape["weight_bytes"]
        src["bytes"] = "weight operands of the mm/addmm ops of one step (CPU-op shapes)"
        basis = "shapes"
    bytes_step = float(model_bytes) + float(kv_bytes) if model_bytes is not None else float("nan")
    if shape.get("flops") and cfg["model_bytes"] is None and cfg["tokens_per_step"] is None:
        flops_step = shape["flops"]
    elif model_bytes is not None and tokens is not None:
        flops_step = 2.0 * float(model_bytes) / float(cfg["bytes_per_param"]) * float(tokens)
    else:
        flops_step = float("nan")
    ai = flops_step / bytes_step if bytes_step and math.isfinite(bytes_step) else float("nan")
    return {"basis": basis, "bytes_step": bytes_step, "flops_step": flops_step, "ai": ai, "span_ns": None, "measured": {}}


def _measured(ctx: AnalysisContext, est: dict, steady: pd.DataFrame, in_sel: np.ndarray, sel_idx: np.ndarray,
              n_decode: int, peak_flops: float, spec_bw: float, src: dict) -> dict:
    """Measured DRAM traffic replaces the estimate: Nsight Compute per kernel, then GPU-metrics samples (over
    the decode steps; over all steps when there are none, for the info finding)."""
    out = dict(est)
    nc = bytes_from_ncu(ctx, np.nonzero(in_sel)[0], len(sel_idx))
    if nc and nc["bytes_per_step"] > 0:
        out.update(basis="ncu", bytes_step=nc["bytes_per_step"],
                   measured={"ncu_profiled_fraction": round(nc["profiled_fraction"], 4)})
        src["bytes"] = "DRAM bytes Nsight Compute measured on the decode steps' kernels"
        if not math.isfinite(out["ai"]) and nc["flops_per_step"] > 0:
            out["ai"] = nc["flops_per_step"] / nc["bytes_per_step"]
            src["intensity"] = "FLOPs / DRAM bytes measured by Nsight Compute"
    gm = bytes_from_gpu_metrics(ctx, *_decode_spans(steady, sel_idx), spec_bw)
    if gm:
        ta = gm["tensor_active_fraction"]
        out.update(basis="gpu_metrics", bytes_step=gm["bytes_per_step"], span_ns=gm["span_ns"], measured={
            "dram_throughput_fraction": round(gm["dram_fraction"], 4), "dram_read_fraction": round(gm["dram_read_fraction"], 4),
            "tensor_active_fraction": round(ta, 4) if math.isfinite(ta) else None, "samples": gm["samples"],
            "mean_step_span_ns": round(gm["span_ns"])})
        src["bytes"] = ("DRAM Read + Write Bandwidth [Throughput %] (Nsight Systems GPU metrics) over the "
                        + ("decode" if n_decode else "steady") + " steps' GPU spans")
        if not math.isfinite(out["ai"]) and math.isfinite(ta) and gm["dram_fraction"] > 0:
            out["ai"] = ta * peak_flops / (gm["dram_fraction"] * spec_bw)
            src["intensity"] = "Tensor Active x peak FLOP/s / measured DRAM bytes/s (GPU metrics; approximate)"
    return out


def measure(ctx: AnalysisContext, cfg: dict, steady: pd.DataFrame, step_idx: np.ndarray, sel_idx: np.ndarray,
            gemm: np.ndarray, gemv: np.ndarray, shape: dict, n_decode: int) -> dict:
    """Bytes, FLOPs, tokens, MBU and intensity of the decode steps from the strongest evidence present."""
    dur = ctx.kernels["dur_ns"].to_numpy(np.int64)
    n_steps = len(steady)
    peaks = ctx.peaks
    bw = peaks.memory_bandwidth_bytes_per_s if peaks else float("nan")
    precision = str(cfg["precision"])
    peak_flops = peaks.flops(precision) if peaks else float("nan")
    spec = lookup(ctx.device_name)
    spec_bw = spec.memory_bandwidth_bytes_per_s if spec is not None else bw
    in_sel = np.isin(step_idx, sel_idx)
    src: dict = {}
    tokens, tokens_bound = _tokens(ctx, cfg, shape, np.nonzero((gemv if gemv.any() else gemm) & in_sel)[0]
                                   if n_decode else np.zeros(0, np.int64), src)
    period_ns = ctx.window_ns / n_steps if n_steps else float("nan")
    busy_steps = ctx.busy_ns() / n_steps if n_steps else float("nan")
    m = _measured(ctx, _estimate(cfg, shape, tokens, src), steady, in_sel, sel_idx, n_decode, peak_flops, spec_bw, src)
    bytes_step, ai = m["bytes_step"], m["ai"]
    # MBU over the steps' GPU spans when DRAM traffic was sampled there, else over the step period.
    over_ns = m["span_ns"] if m["span_ns"] else period_ns
    achieved = bytes_step / (over_ns * 1e-9) if math.isfinite(bytes_step) else float("nan")
    mbu = achieved / bw if math.isfinite(achieved) and math.isfinite(bw) else float("nan")
    if not math.isfinite(ai) and tokens is not None:
        ai = 2.0 * float(tokens) / float(cfg["bytes_per_param"])  # weights dominate: FLOP per weight byte
        src["intensity"] = "2 x tokens / bytes_per_param (weights only; model size unknown)" + (
            ": an upper bound" if tokens_bound else "")
    mbu_busy = (bytes_step / (busy_steps * 1e-9) / bw) if math.isfinite(bytes_step) and math.isfinite(bw) and busy_steps > 0 \
        else float("nan")
    decode_gemm = gemm & in_sel if n_decode else gemv & in_sel
    return {"bw": bw, "peak_flops": peak_flops, "ridge": peak_flops / bw if peaks else float("nan"),
            "ridges": _ridges(ctx, precision), "tokens": tokens, "tokens_bound": tokens_bound, "period_ns": period_ns,
            "busy_steps": busy_steps, "bytes_step": bytes_step, "flops_step": m["flops_step"], "ai": ai,
            "achieved": achieved, "mbu": mbu, "mbu_busy": mbu_busy, "basis": m["basis"], "src": src,
            "measured": m["measured"], "gemv_ns": float(dur[gemv & in_sel].sum()),
            "gemm_ns": float(dur[gemm & in_sel].sum()), "decode_gemm_ns": float(dur[decode_gemm].sum()),
            "busy_sel": busy_steps * len(sel_idx), "gemv_rows": np.nonzero(gemv & in_sel)[0]}


def severity(cfg: dict, f: dict) -> str:
    """High / medium by the batching headroom (ridge / intensity) when the decode GEMMs fill enough of the
    GPU's busy time; low otherwise; info without decode steps."""
    if not f["n_decode"]:
        return "info"
    ai, ridge = f["ai"], f["ridge"]
    headroom = ridge / ai if math.isfinite(ridge) and math.isfinite(ai) and ai > 0 else float("nan")
    share = f["decode_gemm_ns"] / f["busy_sel"] if f["busy_sel"] > 0 else 0.0
    if not math.isfinite(headroom) or share < float(cfg["gemv_busy_fraction_min"]):
        return "low"
    return "high" if headroom >= float(cfg["high_headroom"]) else "medium" if headroom >= float(cfg["medium_headroom"]) else "low"


def _r(x, nd=6):
    return None if x is None or not math.isfinite(float(x)) else round(float(x), nd)


def _roofline(cfg: dict, f: dict) -> dict:
    """What the measurement implies at this batch: tokens/s now, the roofline ceiling, MFU, the headroom to
    the ridge point, the batch at which decode turns compute-bound and the batch to quote (target_batch)."""
    tokens, tokens_bound, period_ns, bw = f["tokens"], f["tokens_bound"], f["period_ns"], f["bw"]
    ai, ridge, bytes_step, flops_step, peak_flops = f["ai"], f["ridge"], f["bytes_step"], f["flops_step"], f["peak_flops"]
    tok_s = float(tokens) / (period_ns * 1e-9) if tokens is not None and not tokens_bound and period_ns > 0 else float("nan")
    # Roofline ceiling at this batch: a step takes at least max(bytes / bandwidth, FLOPs / peak FLOP/s).
    floor_s = max(bytes_step / bw if math.isfinite(bytes_step) and math.isfinite(bw) else float("nan"),
                  flops_step / peak_flops if math.isfinite(flops_step) and math.isfinite(peak_flops) else 0.0)
    ceiling_tok_s = (float(tokens) / floor_s if tokens is not None and not tokens_bound and math.isfinite(floor_s) and floor_s > 0
                     else float("nan"))
    mfu = flops_step / (period_ns * 1e-9) / peak_flops if math.isfinite(flops_step) and math.isfinite(peak_flops) else float("nan")
    headroom = ridge / ai if math.isfinite(ridge) and math.isfinite(ai) and ai > 0 else float("nan")
    compute_bound_batch = (float(tokens) * headroom) if tokens is not None and math.isfinite(headroom) else float("nan")
    target = int(cfg["target_batch"])
    quote_b = int(min(target, math.floor(compute_bound_batch))) if math.isfinite(compute_bound_batch) else target
    quote_tok_s = quote_b / (period_ns * 1e-9) if period_ns > 0 else float("nan")
    return {"tok_s": tok_s, "ceiling_tok_s": ceiling_tok_s, "mfu": mfu, "headroom": headroom,
            "compute_bound_batch": compute_bound_batch, "quote_b": quote_b, "quote_tok_s": quote_tok_s}


def _metrics(f: dict, d: dict) -> dict:
    """The finding's metrics from the measurement ``f`` and its roofline numbers ``d``."""
    headroom = d["headroom"]
    r = _r
    metrics = {
        "mbu": r(f["mbu"]), "mbu_gpu_busy": r(f["mbu_busy"]), "arithmetic_intensity": r(f["ai"], 3),
        "achieved_bandwidth_bytes_per_s": r(f["achieved"], 0), "ridge_point": r(f["ridge"], 2),
        "bound": ("memory" if math.isfinite(headroom) and headroom > 1 else "compute" if math.isfinite(headroom) else None),
        "decode_steps": f["n_decode"], "steady_steps": f["n_steps"], "step_period_ns": r(f["period_ns"], 0),
        "gpu_busy_per_step_ns": r(f["busy_steps"], 0), "bytes_per_step": r(f["bytes_step"], 0),
        "tokens_per_step": r(f["tokens"], 3),
        "tokens_per_s": r(d["tok_s"], 3), "roofline_ceiling_tokens_per_s": r(d["ceiling_tok_s"], 3), "mfu": r(d["mfu"]),
        "gemv_busy_fraction": r(f["gemv_ns"] / f["busy_sel"] if f["busy_sel"] > 0 else 0.0),
        "gemv_gemm_fraction": r(f["gemv_ns"] / f["gemm_ns"] if f["gemm_ns"] else 0.0),
        "decode_gemm_busy_fraction": r(f["decode_gemm_ns"] / f["busy_sel"] if f["busy_sel"] > 0 else 0.0),
        "peak_bandwidth_bytes_per_s": r(f["bw"], 0),
        **{k: r(v, 2 if k.startswith("ridge") else 0) for k, v in f["ridges"].items()},
    }
    if f["measured"].get("dram_throughput_fraction") is not None:
        metrics["dram_throughput_fraction"] = f["measured"]["dram_throughput_fraction"]
    return metrics


def _evidence(ctx: AnalysisContext, f: dict, confidence: str) -> dict:
    """The window, basis, how decode steps were found, sources, peaks, GEMV kernels, example steps and the
    measurement."""
    steady, sel_idx, peaks = f["steady"], f["sel_idx"], ctx.peaks
    evidence = {
        "window": ctx.window.describe(), "basis": f["basis"], "confidence": confidence,
        "decode_steps_by": f["decode_by"], "sources": f["src"],
        "peaks": peaks.describe() if peaks else "GPU not in the device table and no ceilings measured",
        "gemv_kernels": sorted({str(n)[:100] for n in ctx.kname_at(f["gemv_rows"])})[:8],
        "example_steps": [{"name": str(steady["name"].iat[i]), "start_us": ctx.rel_us(steady["gpu_start_ns"].iat[i]),
                           "gpu_span_us": round((steady["gpu_end_ns"].iat[i] - steady["gpu_start_ns"].iat[i]) / 1e3, 1)}
                          for i in sel_idx[:3]],
    }
    if f["measured"]:
        evidence["measurement"] = f["measured"]
    return evidence


def _no_decode(ctx: AnalysisContext, metrics: dict, evidence: dict, ridge_txt: str, ev_txt: str) -> Finding:
    """The info finding when no step is a decode step."""
    if metrics["bound"]:
        title = (f"No decode steps: {metrics['bound']}-bound steps (arithmetic intensity "
                 f"{metrics['arithmetic_intensity']} FLOP/B vs ridge point {ridge_txt})")
    else:
        title = ("No decode steps: the GEMMs are not GEMV-shaped (set memory_bound_decode.model_bytes and "
                 "tokens_per_step for intensity and MBU)")
    return Finding(analyzer=ID, severity="info", title=title + ev_txt, metrics=metrics,
                   recommendation="Nothing to do: these steps do enough work per weight byte.",
                   evidence=evidence, rank=ctx.rank)


def _advice(f: dict, d: dict, metrics: dict, tok_txt: str) -> list[str]:
    """Why decode is bandwidth-bound, what batching would give, the roofline ceiling, a late host and fewer
    bytes per token."""
    tokens, tokens_bound, mbu, mbu_busy = f["tokens"], f["tokens_bound"], f["mbu"], f["mbu_busy"]
    tok_s, quote_b, quote_tok_s, compute_bound_batch = d["tok_s"], d["quote_b"], d["quote_tok_s"], d["compute_bound_batch"]
    rec = [f"Each decode step reads all weights for {tok_txt} token(s): the GPU is bandwidth-bound "
           f"(ridge point {metrics['ridge_point']} FLOP/B)."]
    if math.isfinite(quote_tok_s) and math.isfinite(tok_s) and tokens is not None and quote_b > tokens:
        rec.append(f"Batching to {quote_b} concurrent sequences would give ~{quote_tok_s:,.0f} tokens/s at the same step time "
                   f"(now {tok_s:,.1f} tokens/s) until compute-bound at ~{compute_bound_batch:,.0f} tokens/step: use continuous "
                   "batching (vLLM, TensorRT-LLM, SGLang) or a larger batch.")
    elif math.isfinite(compute_bound_batch):
        rec.append("Batching more sequences per step (continuous batching: vLLM, TensorRT-LLM, SGLang) raises tokens/s almost "
                   f"linearly at the same step time until ~{compute_bound_batch:,.0f} tokens/step"
                   + ("; set memory_bound_decode.tokens_per_step and model_bytes for exact numbers." if tokens_bound or
                      tokens is None else "."))
    else:
        rec.append("Batching more sequences per step (continuous batching: vLLM, TensorRT-LLM, SGLang) shares each weight "
                   "read between them: tokens/s grows almost linearly with the batch while the step stays memory-bound.")
    if math.isfinite(d["ceiling_tok_s"]):
        rec.append(f"At this batch the roofline ceiling is ~{d['ceiling_tok_s']:,.0f} tokens/s ({f['bytes_step'] / 1e9:.2f} GB "
                   f"per step at {f['bw'] / 1e12:.2f} TB/s).")
    if math.isfinite(mbu) and math.isfinite(mbu_busy) and mbu_busy > 2 * mbu:
        rec.append(f"The kernels themselves reach {mbu_busy:.0%} of peak bandwidth while running but the step period is "
                   f"{f['period_ns'] / max(f['busy_steps'], 1):.0f}x the GPU busy time: the host is the bottleneck (see "
                   "gpu_idle) — capture the decode step in a CUDA graph (torch.compile(mode=\"reduce-overhead\"), "
                   "vLLM/TensorRT-LLM do this).")
    rec.append("Fewer bytes per token also help: fp8/int8/int4 weight quantization, a smaller KV cache (GQA, fp8 KV), "
               "speculative decoding.")
    return rec


def explain(ctx: AnalysisContext, cfg: dict, f: dict, sev: str) -> list[Finding]:
    """Title, metrics (with the roofline numbers at this batch), evidence and the fixes; info when no step is
    a decode step."""
    d = _roofline(cfg, f)
    metrics = _metrics(f, d)
    basis, n_decode, mbu = f["basis"], f["n_decode"], f["mbu"]
    confidence = {"gpu_metrics": "high", "ncu": "high", "shapes": "medium", "names": "low"}[basis]
    evidence = _evidence(ctx, f, confidence)
    saving = f["decode_gemm_ns"] * (1.0 - 1.0 / max(d["quote_b"], 1)) if n_decode else 0.0
    sfrac = ctx.fraction(saving)
    ridge_txt = f"{metrics['ridge_point']}" + (f" (measured ceilings; datasheet {metrics['ridge_point_spec']})"
                                               if "ridge_point_measured" in metrics and "ridge_point_spec" in metrics else "")
    ev_txt = f" [evidence: {basis}, confidence {confidence}]"
    if not n_decode:
        return [_no_decode(ctx, metrics, evidence, ridge_txt, ev_txt)]
    mbu_txt = f"MBU {mbu:.1%}" if math.isfinite(mbu) else "MBU unknown (set memory_bound_decode.model_bytes)"
    tok_txt = f"{'<=' if f['tokens_bound'] else ''}{metrics['tokens_per_step'] or '?'}"
    title = (f"Decode is memory-bound: {n_decode} decode steps at {tok_txt} tokens/step, "
             f"arithmetic intensity {metrics['arithmetic_intensity']} FLOP/B vs ridge point {ridge_txt}, {mbu_txt}" + ev_txt)
    return [Finding(analyzer=ID, severity=sev, title=title, metrics=metrics, estimated_saving_ns=int(saving),
                    estimated_saving_fraction=round(sfrac, 6), recommendation=" ".join(_advice(f, d, metrics, tok_txt)),
                    evidence=evidence, rank=ctx.rank)]


SPEC = AnalyzerSpec(ID, analyze, SETTINGS, evidence=(
    ("decode_steps_by", "how decode steps were recognized (range names, GEMV share)"),
    ("basis", "the measurement the arithmetic intensity rests on: gpu_metrics, ncu, shapes or names"),
    ("confidence", "high (measured DRAM traffic), medium (CPU-op shapes) or low (kernel names alone)"),
    ("measurement", "the measured DRAM numbers behind the verdict"),
    ("example_steps", "a few decode steps with their times"),
    ("gemv_kernels", "the GEMV-shaped GEMM kernels and their time"),
    ("peaks", "the device peaks the roofline used"),
    ("sources", "where model bytes and tokens per step came from (config, shapes)"),
    ("window", "the steady-state window"),
))
