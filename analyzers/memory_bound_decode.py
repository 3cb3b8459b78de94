"""memory_bound_decode: decode steps that stream the weights for a handful of tokens.

Decode steps are steady steps whose range name matches ``decode_range_pattern``, or whose GEMM time is
mostly GEMV-shaped (names with gemv, nvjet N tile <= ``gemv_max_n`` such as ``_64x8_``, or M <= that in
CPU-op shapes). Per decode step:

    bytes        = model_bytes + kv_bytes_per_step           (config; or the weight operands of the
                                                              step's mm/addmm ops when shapes exist)
    FLOPs        = 2 x bytes_weights / bytes_per_param x tokens_per_step  (or sum of 2MNK from shapes)
    arithmetic intensity = FLOPs / bytes;  ridge point = peak FLOP/s (precision) / peak bandwidth
    step period  = steady window / steady steps                (what tokens/s sees, host time included)
    achieved bandwidth = bytes / step period;  MBU = achieved bandwidth / peak bandwidth
    mbu_gpu_busy = bytes / (GPU busy time per step) / peak bandwidth

Peaks come from the device table, replaced by measured ceilings when given. Severity uses this
analyzer's own thresholds (the cost is throughput, not window time): high when ridge / intensity >=
``high_headroom`` and GEMV-shaped GEMMs are >= ``gemv_busy_fraction_min`` of GPU busy time, medium at
``medium_headroom``. The saving is per-token: batching B requests shares one weight read, removing
(1 - 1/B) of the GEMV time per token.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from gpudoctor.analyzers.context import AnalysisContext
from gpudoctor.analyzers.findings import Finding
from gpudoctor.analyzers.low_tensor_core import (
    MM_OPS,
    gemm_kernels,
    gemm_shapes,
    tile_min,
)
from gpudoctor.analyzers.spec import AnalyzerSpec, Setting, fraction
from gpudoctor.model.devices import PRECISIONS

ID = "memory_bound_decode"

SETTINGS = (
    Setting("decode_range_pattern", "decode|generate|generation",
            "regex (case-insensitive) of step range names that are decode steps", kind="regex"),
    Setting("gemv_max_n", 16, "N tile (nvjet _MxN_) at most this, or M <= this in shapes: a GEMV-shaped (decode) GEMM",
            unit="elements"),
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


def analyze(ctx: AnalysisContext) -> list[Finding]:
    k = ctx.kernels
    if k.empty:
        return []
    cfg = ctx.config.section(ID)
    gmax = int(cfg["gemv_max_n"])
    gemm, gemv = gemm_kernels(ctx, gmax)
    if not gemm.any():
        return []
    dur = k["dur_ns"].to_numpy(np.int64)
    starts = k["start_ns"].to_numpy(np.int64)

    steady = ctx.window.steady.reset_index(drop=True)
    if steady.empty:  # no steps: the whole window is one step
        steady = pd.DataFrame({"name": ["(whole window)"], "gpu_start_ns": [ctx.start_ns], "gpu_end_ns": [ctx.end_ns]})
    step_idx = _step_of(starts, steady)

    # With shapes, GEMV-ness comes from M (tokens) too.
    shape = _shape_facts(ctx, np.nonzero(gemm)[0], step_idx)
    if shape and shape["tokens"] <= gmax:
        gemv = gemm.copy()

    pat = re.compile(str(cfg["decode_range_pattern"]), re.I)
    n_steps = len(steady)
    g_all = np.bincount(step_idx[gemm & (step_idx >= 0)], weights=dur[gemm & (step_idx >= 0)], minlength=n_steps)
    g_gemv = np.bincount(step_idx[gemv & (step_idx >= 0)], weights=dur[gemv & (step_idx >= 0)], minlength=n_steps)
    named = np.array([bool(pat.search(str(n))) for n in steady["name"]], dtype=bool)
    share = np.divide(g_gemv, g_all, out=np.zeros(n_steps), where=g_all > 0)
    is_decode = named | (share >= float(cfg["decode_gemv_fraction"]))
    n_decode = int(is_decode.sum())
    inference_like = bool(any(INFERENCE_STEP.search(str(n)) for n in steady["name"]))

    # Facts about the workload: config first, then shapes.
    model_bytes = cfg["model_bytes"]
    tokens_bound = False  # tokens is only an upper bound (from kernel tiles)
    kv_bytes = cfg["kv_bytes_per_step"] or 0
    tokens = cfg["tokens_per_step"]
    src = {}
    if model_bytes is not None:
        src["bytes"] = "config model_bytes" + (" + kv_bytes_per_step" if kv_bytes else "")
    elif shape.get("weight_bytes"):
        model_bytes = shape["weight_bytes"]
        src["bytes"] = "weight operands of the mm/addmm ops of one step (CPU-op shapes)"
    if tokens is not None:
        src["tokens"] = "config tokens_per_step"
    elif shape.get("tokens"):
        tokens = shape["tokens"]
        src["tokens"] = "M of the mm/addmm ops (CPU-op shapes)"
    elif n_decode and gemv.any():
        tiles = [t for t in (tile_min(str(n)) for n in set(ctx.kname_at(np.nonzero(gemv)[0]))) if t > 0]
        if tiles:
            tokens = max(tiles)
            tokens_bound = True
            src["tokens"] = f"upper bound from the GEMV kernels' N tile ({tokens}); set tokens_per_step for the real batch"
    if not n_decode and cfg["model_bytes"] is None and not inference_like:
        return []  # training or unrelated work: nothing to say

    peaks = ctx.peaks
    bw = peaks.memory_bandwidth_bytes_per_s if peaks else float("nan")
    precision = str(cfg["precision"])
    peak_flops = peaks.flops(precision) if peaks else float("nan")
    ridge = peak_flops / bw if peaks else float("nan")

    sel = is_decode if n_decode else np.ones(n_steps, dtype=bool)
    sel_idx = np.nonzero(sel)[0]
    # Step period: the steady window per step (host time between steps included: what tokens/s sees).
    period_ns = ctx.window_ns / n_steps if n_steps else float("nan")
    in_sel = np.isin(step_idx, sel_idx)
    busy_steps = ctx.busy_ns() / n_steps if n_steps else float("nan")
    gemv_ns = float(dur[gemv & in_sel].sum())
    gemm_ns = float(dur[gemm & in_sel].sum())
    busy_sel = busy_steps * len(sel_idx)
    gemv_busy_fraction = gemv_ns / busy_sel if busy_sel > 0 else 0.0

    bytes_step = float(model_bytes) + float(kv_bytes) if model_bytes is not None else float("nan")
    if shape.get("flops") and cfg["model_bytes"] is None and cfg["tokens_per_step"] is None:
        flops_step = shape["flops"]
    elif model_bytes is not None and tokens is not None:
        flops_step = 2.0 * float(model_bytes) / float(cfg["bytes_per_param"]) * float(tokens)
    else:
        flops_step = float("nan")
    ai = flops_step / bytes_step if bytes_step and math.isfinite(bytes_step) else float("nan")
    if not math.isfinite(ai) and tokens is not None:
        ai = 2.0 * float(tokens) / float(cfg["bytes_per_param"])  # weights dominate: FLOP per weight byte
        src["intensity"] = "2 x tokens / bytes_per_param (weights only; model size unknown)" + (
            ": an upper bound" if tokens_bound else "")
    achieved = bytes_step / (period_ns * 1e-9) if math.isfinite(bytes_step) else float("nan")
    mbu = achieved / bw if math.isfinite(achieved) and math.isfinite(bw) else float("nan")
    mbu_busy = (bytes_step / (busy_steps * 1e-9) / bw) if math.isfinite(bytes_step) and math.isfinite(bw) and busy_steps > 0 else float("nan")
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

    def r(x, nd=6):
        return None if x is None or not math.isfinite(float(x)) else round(float(x), nd)

    metrics = {
        "mbu": r(mbu), "mbu_gpu_busy": r(mbu_busy), "arithmetic_intensity": r(ai, 3),
        "achieved_bandwidth_bytes_per_s": r(achieved, 0), "ridge_point": r(ridge, 2),
        "bound": ("memory" if math.isfinite(headroom) and headroom > 1 else "compute" if math.isfinite(headroom) else None),
        "decode_steps": n_decode, "steady_steps": n_steps, "step_period_ns": r(period_ns, 0),
        "gpu_busy_per_step_ns": r(busy_steps, 0), "bytes_per_step": r(bytes_step, 0), "tokens_per_step": r(tokens, 3),
        "tokens_per_s": r(tok_s, 3), "roofline_ceiling_tokens_per_s": r(ceiling_tok_s, 3), "mfu": r(mfu),
        "gemv_busy_fraction": r(gemv_busy_fraction), "gemv_gemm_fraction": r(gemv_ns / gemm_ns if gemm_ns else 0.0),
        "peak_bandwidth_bytes_per_s": r(bw, 0),
    }
    evidence = {
        "window": ctx.window.describe(),
        "decode_steps_by": (None if not n_decode else "range names" if named[sel_idx].all() else "GEMV share of GEMM time"),
        "sources": src,
        "peaks": peaks.describe() if peaks else "GPU not in the device table and no ceilings measured",
        "gemv_kernels": sorted({str(n)[:100] for n in ctx.kname_at(np.nonzero(gemv & in_sel)[0])})[:8],
        "example_steps": [{"name": str(steady["name"].iat[i]), "start_us": ctx.rel_us(steady["gpu_start_ns"].iat[i]),
                           "gpu_span_us": round((steady["gpu_end_ns"].iat[i] - steady["gpu_start_ns"].iat[i]) / 1e3, 1)}
                          for i in sel_idx[:3]],
    }
    saving = gemv_ns * (1.0 - 1.0 / max(quote_b, 1)) if n_decode else 0.0
    sfrac = ctx.fraction(saving)

    if not n_decode:
        if metrics["bound"]:
            title = (f"No decode steps: {metrics['bound']}-bound steps (arithmetic intensity "
                     f"{metrics['arithmetic_intensity']} FLOP/B vs ridge point {metrics['ridge_point']})")
        else:
            title = ("No decode steps: the GEMMs are not GEMV-shaped (set memory_bound_decode.model_bytes and "
                     "tokens_per_step for intensity and MBU)")
        return [Finding(analyzer=ID, severity="info", title=title, metrics=metrics,
                        recommendation="Nothing to do: these steps do enough work per weight byte.",
                        evidence=evidence, rank=ctx.rank)]

    if math.isfinite(headroom) and gemv_busy_fraction >= float(cfg["gemv_busy_fraction_min"]):
        sev = "high" if headroom >= float(cfg["high_headroom"]) else "medium" if headroom >= float(cfg["medium_headroom"]) else "low"
    else:
        sev = "low"
    mbu_txt = f"MBU {mbu:.1%}" if math.isfinite(mbu) else "MBU unknown (set memory_bound_decode.model_bytes)"
    tok_txt = f"{'<=' if tokens_bound else ''}{metrics['tokens_per_step'] or '?'}"
    title = (f"Decode is memory-bound: {n_decode} decode steps at {tok_txt} tokens/step, "
             f"arithmetic intensity {metrics['arithmetic_intensity']} FLOP/B vs ridge point {metrics['ridge_point']}, {mbu_txt}")
    rec = [f"Each decode step reads all weights for {tok_txt} token(s): the GPU is bandwidth-bound "
           f"(ridge point {metrics['ridge_point']} FLOP/B)."]
    if math.isfinite(quote_tok_s) and math.isfinite(tok_s):
        rec.append(f"Batching to {quote_b} concurrent sequences would give ~{quote_tok_s:,.0f} tokens/s at the same step time "
                   f"(now {tok_s:,.1f} tokens/s) until compute-bound at ~{compute_bound_batch:,.0f} tokens/step: use continuous "
                   "batching (vLLM, TensorRT-LLM, SGLang) or a larger batch.")
    elif math.isfinite(compute_bound_batch):
        rec.append("Batching more sequences per step (continuous batching: vLLM, TensorRT-LLM, SGLang) raises tokens/s almost "
                   f"linearly at the same step time until ~{compute_bound_batch:,.0f} tokens/step; set "
                   "memory_bound_decode.tokens_per_step and model_bytes for exact numbers.")
    if math.isfinite(ceiling_tok_s):
        rec.append(f"At this batch the roofline ceiling is ~{ceiling_tok_s:,.0f} tokens/s ({bytes_step / 1e9:.2f} GB per step "
                   f"at {bw / 1e12:.2f} TB/s).")
    if math.isfinite(mbu) and math.isfinite(mbu_busy) and mbu_busy > 2 * mbu:
        rec.append(f"The kernels themselves reach {mbu_busy:.0%} of peak bandwidth while running but the step period is "
                   f"{period_ns / max(busy_steps, 1):.0f}x the GPU busy time: the host is the bottleneck (see gpu_idle) — capture "
                   "the decode step in a CUDA graph (torch.compile(mode=\"reduce-overhead\"), vLLM/TensorRT-LLM do this).")
    rec.append("Fewer bytes per token also help: fp8/int8/int4 weight quantization, a smaller KV cache (GQA, fp8 KV), "
               "speculative decoding.")
    return [Finding(analyzer=ID, severity=sev, title=title, metrics=metrics, estimated_saving_ns=int(saving),
                    estimated_saving_fraction=round(sfrac, 6), recommendation=" ".join(rec), evidence=evidence,
                    rank=ctx.rank)]


SPEC = AnalyzerSpec(ID, analyze, SETTINGS, evidence=(
    ("decode_steps_by", "how decode steps were recognized (range names, GEMV share)"),
    ("example_steps", "a few decode steps with their times"),
    ("gemv_kernels", "the GEMV-shaped GEMM kernels and their time"),
    ("peaks", "the device peaks the roofline used"),
    ("sources", "where model bytes and tokens per step came from (config, shapes)"),
    ("window", "the steady-state window"),
))
