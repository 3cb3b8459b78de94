"""low_tensor_core: matrix products (GEMM / convolution) that run without tensor cores.

Which GEMM/convolution kernels run without tensor cores is decided from the strongest evidence present
(``evidence.basis`` in the finding says which):

1. ``gpu_metrics``: Nsight Systems ``Tensor Active [Throughput %]`` samples. Per kernel name, the
   time-weighted mean of the samples over its launches; below ``tensor_active_min`` = no tensor cores.
2. ``ncu``: Nsight Compute tensor-pipe utilisation per profiled kernel (``kernel_metrics``, joined to the
   timeline or matched by name); below ``tensor_pipe_min`` = no tensor cores.
3. ``nvml``: NVML ``tensor_util`` over the window: when it stays below ``tensor_active_min`` no GEMM
   used tensor cores (a higher value cannot say which kernel did, so the names decide then).
4. ``shapes``: the dtype of the torch op that launched the kernel (fp32 = SIMT unless the kernel name
   positively names tensor cores: TF32 with allow_tf32).
5. ``names``: a kernel whose name names tensor cores (TF32, HMMA, GMMA/wgmma, nvjet, CUTLASS tensorop,
   bf16/fp16/fp8 operands, MMA shapes such as s16816) uses them; SIMT names (sgemm, simt, ffma) and the
   cuDNN FP32 convolution kernels (``conv2d_grouped_direct_kernel``, ``wgrad2d_/dgrad2d_grouped_direct``,
   ``dgrad_engine``, ``wgrad_alg0_engine``, ``implicit_convolve_sgemm``, Winograd, FFT) do not; an FP32
   kernel (``f32f32_f32f32``, ``<float, float``) counts as SIMT unless named as tensor-core work.

When a measurement contradicts the names (names say tensor cores, Tensor Active says 0%) the
measurement wins and ``evidence.disagreements`` lists the kernels. GEMV-shaped kernels (decode: N tile
<= ``gemv_max_n``, names with gemv, or M <= ``gemv_max_n`` in shapes) are left out of both sides: a
matrix-vector product is bandwidth-bound and tensor cores cannot help it. With CPU-op shapes, fp16/bf16
GEMMs whose K or N is not a multiple of 8 (fp8: 16) are reported as misaligned.

non_tensor_core_gemm_fraction = time of non-tensor-core GEMM kernels / time of all (non-GEMV) GEMM kernels.
Saving = non-tensor-core time x (1 - fp32 rate / ``fallback_precision`` tensor rate) + misaligned time x
``misaligned_penalty``.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from gpudoctor.analyzers.context import ELEMENT_BYTES, AnalysisContext, display_name
from gpudoctor.analyzers.findings import Finding
from gpudoctor.analyzers.spec import SEVERITY_OVERRIDES, AnalyzerSpec, Setting, fraction
from gpudoctor.analyzers.unfused_attention import FUSED
from gpudoctor.model import sampled
from gpudoctor.model.categories import category_of
from gpudoctor.model.devices import PRECISIONS

ID = "low_tensor_core"

SETTINGS = (
    Setting("fallback_precision", "tf32", "precision whose tensor-core rate the saving estimate assumes (tf32: allow_tf32)",
            choices=PRECISIONS),
    fraction("tensor_active_min", 0.05, "GPU metrics: a GEMM kernel whose Tensor Active per unit of GEMM time is below this "
             "runs without tensor cores (NVML: the window mean)"),
    fraction("tensor_pipe_min", 0.05, "ncu: a GEMM whose tensor pipe is active less than this fraction runs without tensor cores"),
    Setting("gemv_max_n", 16, "a GEMM whose N tile (nvjet _MxN_) or M (shapes) is at most this is GEMV-shaped: not flagged",
            unit="elements"),
    fraction("misaligned_penalty", 0.25, "fraction of a misaligned fp16/bf16/fp8 GEMM's time assumed recoverable by padding"),
) + SEVERITY_OVERRIDES

NON_TC = re.compile(r"sgemm|simt|ffma", re.I)
# Names that positively say tensor cores: TF32, HMMA/GMMA instructions, cuBLAS nvjet, CUTLASS tensorop,
# 16-bit / fp8 operand types, MMA instruction shapes (s16816, h1688, i8816...).
TC_NAME = re.compile(r"tf32|hmma|gmma|wgmma|nvjet|tensorop|tensor_?core|[shi]\d{3,5}(gemm|_)|bf16|bfloat16|f16f16|fp16|"
                     r"_f16_|half|e4m3|e5m2|fp8|hgemm|_h884|_h1688", re.I)
# cuDNN / cuBLAS kernels that run on the FP32 pipes (SIMT): direct and legacy-engine convolutions,
# Winograd and FFT convolutions, FFMA / SIMT GEMMs.
SIMT_NAME = re.compile(r"sgemm|simt|ffma|conv2d_grouped_direct|wgrad2d_grouped_direct|dgrad2d_grouped_direct|"
                       r"dgrad_engine|wgrad_alg\d_engine|implicit_convolve|winograd|fft\d?d_|fft_(r2c|c2r)|pointwise_mult_and_sum_complex|"
                       r"flip_filter|compute_gemm_pointers", re.I)
FP32_NAME = re.compile(r"f32f32_f32f32|<float, ?float|\bfloat\b.*\bfloat\b|_fp32|_f32_", re.I)
BASIS_CONFIDENCE = {"gpu_metrics": "high", "ncu": "high", "nvml": "medium", "shapes": "medium", "names": "low"}


def name_verdict(name: str) -> str:
    """What a kernel name says about tensor cores: 'tensor' | 'simt' | 'unknown'."""
    if SIMT_NAME.search(name) and not re.search(r"tf32|hmma|gmma|tensorop", name, re.I):
        return "simt"
    if TC_NAME.search(name):
        return "tensor"
    if FP32_NAME.search(name):
        return "simt"  # an FP32 kernel not named as tensor-core work runs on the FP32 pipes
    return "unknown"
GEMV_NAME = re.compile(r"gemv|gemmSN|gemmk1", re.I)
NOT_GEMM = re.compile(r"cudnn::fusion|convert_dq|splitkreduce|reduce_kernel", re.I)
TILE = re.compile(r"(?:nvjet_[a-z0-9]+_[a-z]+_|tilesize|_sgemm_|_gemm_|_)(\d+)x(\d+)(?:x\d+)?_", re.I)
CONV_OPS = ("aten::convolution", "aten::_convolution", "aten::cudnn_convolution", "aten::convolution_backward",
            "aten::conv2d", "aten::conv1d", "aten::conv3d")
MM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")
_HALF = {"c10::BFloat16": 8, "c10::Half": 8, "c10::Float8_e4m3fn": 16, "c10::Float8_e5m2": 16}


def is_gemm(name: str) -> bool:
    return category_of(name) == "gemm" and not NOT_GEMM.search(name) and not FUSED.search(name)


def tile_min(name: str) -> int:
    """Smaller side of the CTA tile written in the kernel name (nvjet ``_64x8_``, ``tilesize256x64x8``), or -1."""
    m = TILE.search(name)
    return min(int(m.group(1)), int(m.group(2))) if m else -1


def _gemm_dims(dims: list, name: str) -> tuple[int, int, int] | None:
    """(M, N, K) of an mm/addmm/bmm op from its input dims."""
    args = dims[1:] if name in ("aten::addmm", "aten::baddbmm", "aten::_addmm_activation") else dims
    if len(args) < 2 or not args[0] or not args[1] or len(args[0]) < 2 or len(args[1]) < 2:
        return None
    a, b = args[0], args[1]
    return int(a[-2]), int(b[-1]), int(a[-1])


_ADDMM_LIKE = ("aten::addmm", "aten::baddbmm", "aten::_addmm_activation")
SHAPE_COLUMNS = ("m", "n", "k", "batch", "weight_elems", "weight_elt_bytes", "align", "batched")


def _shape_row(name: str, dims: list, types: list) -> tuple:
    d = _gemm_dims(dims, name) if name in MM_OPS else None
    if d is None:
        return (-1, -1, -1, 1, 0, 2, 0, False)
    args = dims[1:] if name in _ADDMM_LIKE else dims
    batch = int(np.prod(args[0][:-2])) if len(args[0]) > 2 else 1
    off = len(dims) - len(args)  # 1 for addmm-like (bias first), else 0
    wtype = types[off + 1] if len(types) > off + 1 else ""
    half = next((x for x in types if x in _HALF), None)
    return (*d, batch, int(np.prod(args[1])), ELEMENT_BYTES.get(wtype, 2), _HALF.get(half, 0),
            name in ("aten::bmm", "aten::baddbmm"))


def _dtype_of(ctx: AnalysisContext, op: int) -> str | None:
    """The first fp16/bf16/fp8 input type of CPU op ``op``."""
    return next((x for x in (ctx.ops.at[op, "input_types"] or []) if x in _HALF), None)


def gemm_shapes(ctx: AnalysisContext) -> pd.DataFrame:
    """Per row of ``ctx.ops`` (same index): M, N, K, batch, weight_elems (elements of the 2nd operand),
    weight_elt_bytes, align (8 for fp16/bf16, 16 for fp8 operands, else 0) and batched (bmm-like) of the
    mm-like ops; m = -1 for other ops or unknown shapes."""
    return ctx.op_facts(_shape_row, "ltc.gemm_shapes", SHAPE_COLUMNS)


def gemm_kernels(ctx: AnalysisContext, gemv_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks over ctx.kernels: GEMM kernels, and those of them GEMV-shaped by name (gemv in the name, or
    a CTA tile side <= ``gemv_max``). Shared by low_tensor_core and memory_bound_decode."""
    gemm = ctx.name_map(is_gemm, "ltc.is_gemm", dtype=bool)
    by_name = ctx.name_map(lambda n: bool(GEMV_NAME.search(n)) or 0 <= tile_min(n) <= gemv_max,
                           f"ltc.gemv_name.{gemv_max}", dtype=bool)
    return gemm, gemm & by_name


def _kernel_device(ctx: AnalysisContext) -> int | None:
    k = ctx.kernels
    return int(k["device_id"].mode().iloc[0]) if len(k) else None


def _by_name_from_gpu_metrics(ctx: AnalysisContext, rows: np.ndarray) -> tuple[dict[str, float], dict]:
    """Per GEMM kernel name (rows of ctx.kernels), the Tensor Active fraction per unit of GEMM time from
    Nsight Systems GPU metrics; {} when the export has no such samples.

    A 2 kHz sample averages over 500 us: several kernels and idle time. So per sample the activity is set
    against the share of the period that GEMM kernels covered: for a name,
    sum over its launches of duration x mean Tensor Active / sum of duration x mean GEMM coverage. A
    launch-bound bf16 network (GPU idle half the time) then still reads tens of percent, an FP32 one stays
    near the counter's floor (~1% on an H200 with only FFMA work)."""
    ts, values, src = sampled.series(ctx.trace.counters, "tensor_active_fraction", "gpu_metrics", _kernel_device(ctx))
    k = ctx.kernels
    if len(ts) < 2 or len(rows) == 0:
        return {}, {}
    s = k["start_ns"].to_numpy(np.int64)[rows]
    e = k["end_ns"].to_numpy(np.int64)[rows]
    cov = sampled.coverage(ts, s, e)
    ta = sampled.interval_means(ts, values, s, e)
    gc = sampled.interval_means(ts, cov, s, e)
    ok = np.isfinite(ta) & np.isfinite(gc)
    if not ok.any():
        return {}, {}
    w = (e - s)[ok].astype(float)
    names = ctx.kname_at(rows[ok])
    g = pd.DataFrame({"n": names, "ta": ta[ok] * w, "cov": gc[ok] * w}).groupby("n", sort=False)[["ta", "cov"]].sum()
    per = (g["ta"] / g["cov"].where(g["cov"] > 0)).dropna()
    inside = (ts >= ctx.start_ns) & (ts < ctx.end_ns)
    period = float(np.median(np.diff(ts))) if len(ts) > 1 else float("nan")
    info = {"samples_in_window": int(inside.sum()), "sample_period_us": round(period / 1e3, 1),
            "window_tensor_active_fraction": round(float(np.nanmean(values[inside])), 4) if inside.any() else None,
            "window_gemm_coverage_fraction": round(float(np.mean(cov[inside])), 4) if inside.any() else None}
    return {str(n): float(v) for n, v in per.items()}, info


def _by_name_from_ncu(ctx: AnalysisContext) -> dict[str, float]:
    """Per kernel name, the median tensor-pipe fraction Nsight Compute measured (joined rows first)."""
    km = ctx.trace.kernel_metrics
    if not len(km) or not km["tensor_pipe_fraction"].notna().any():
        return {}
    k = ctx.kernels
    meas = km[km["tensor_pipe_fraction"].notna()]
    rows = meas["kernel_row"].to_numpy()
    trace_row = k["trace_row"].to_numpy()
    pos = pd.Index(trace_row).get_indexer(rows) if len(trace_row) else np.full(len(rows), -1)
    kn = ctx.kname_at(np.clip(pos, 0, None)) if len(k) else np.full(len(pos), "", dtype=object)
    names = np.where(pos >= 0, kn, meas["name"].astype(str).to_numpy(dtype=object))
    med = pd.Series(meas["tensor_pipe_fraction"].to_numpy(float)).groupby(names).median()
    return {str(n): float(v) for n, v in med.items()}


def _apply_by_name(ctx: AnalysisContext, gemm: np.ndarray, per_name: dict[str, float], threshold: float,
                   measured: np.ndarray, non_tc: np.ndarray, value: np.ndarray) -> None:
    """Set non_tc / measured / value of the GEMM kernels named in ``per_name`` (kname or short name)."""
    for n, v in per_name.items():
        hit = gemm & (ctx.name_mask("^" + re.escape(n) + "$") | ctx.name_mask("^" + re.escape(n) + "$", column="name"))
        if hit.any():
            non_tc[hit] = v < threshold
            measured[hit] = True
            value[hit] = v


def _nvml_says_idle(ctx: AnalysisContext, threshold: float) -> float | None:
    """NVML tensor utilisation averaged over the window when it says 'no tensor cores at all', else None."""
    ts, values, _ = sampled.series(ctx.trace.counters, "tensor_active_fraction", "nvml", _kernel_device(ctx))
    mean = sampled.interval_means(ts, values, np.array([ctx.start_ns]), np.array([ctx.end_ns]))[0] if len(ts) else np.nan
    return float(mean) if np.isfinite(mean) and mean < threshold else None


def _shape_dtypes(ctx: AnalysisContext, gemm: np.ndarray) -> np.ndarray:
    """Per kernel, the first input type of the mm/conv op that launched it ('' when unknown)."""
    out = np.full(len(ctx.kernels), "", dtype=object)
    op_idx = ctx.kernel_ops(MM_OPS + CONV_OPS)
    rows = np.nonzero(gemm & (op_idx >= 0))[0]
    if ctx.ops is None or not len(rows):
        return out
    first = ctx.op_facts(lambda name, dims, types: (next((x for x in types if x), ""),), "ltc.first_type",
                         ("first_type",))["first_type"].to_numpy(dtype=object)  # once per distinct shape
    out[rows] = first[op_idx[rows]]
    return out


def measure(ctx: AnalysisContext, gemm: np.ndarray) -> dict:
    """Which GEMM kernels run without tensor cores, from the strongest evidence present.

    Returns non_tc (mask), measured (mask of kernels a measurement decided), value (measured tensor
    activity per kernel, NaN where none), basis, details, and the kernels whose names disagree."""
    cfg = ctx.config.section(ID)
    n = len(ctx.kernels)
    verdict = ctx.name_map(name_verdict, "ltc.name_verdict")
    non_tc = gemm & (verdict == "simt")
    basis, details = "names", {}
    # Shapes: an fp32 op's kernels run on the FP32 pipes unless their name names tensor cores (TF32).
    dtypes = _shape_dtypes(ctx, gemm)
    fp32_op = gemm & (dtypes == "float") & (verdict != "tensor")
    if fp32_op.any() or (gemm & (dtypes != "")).any():
        non_tc |= fp32_op
        basis = "shapes"
    measured = np.zeros(n, dtype=bool)
    value = np.full(n, np.nan)
    nvml_mean = _nvml_says_idle(ctx, float(cfg["tensor_active_min"]))
    if nvml_mean is not None:
        non_tc = gemm.copy()
        measured[gemm] = True
        value[gemm] = nvml_mean
        basis, details = "nvml", {"nvml_tensor_util_fraction": round(nvml_mean, 4)}
    ncu = _by_name_from_ncu(ctx)
    if ncu:
        _apply_by_name(ctx, gemm, ncu, float(cfg["tensor_pipe_min"]), measured, non_tc, value)
        basis, details = "ncu", {"profiled_kernel_names": len(ncu)}
    gm, info = _by_name_from_gpu_metrics(ctx, np.nonzero(gemm)[0])
    if gm:
        _apply_by_name(ctx, gemm, gm, float(cfg["tensor_active_min"]), measured, non_tc, value)
        basis, details = "gpu_metrics", info
    said_tc = gemm & measured & (verdict == "tensor") & non_tc
    said_simt = gemm & measured & (verdict == "simt") & ~non_tc
    return {"non_tc": non_tc, "measured": measured, "value": value, "basis": basis, "details": details,
            "disagree": said_tc | said_simt, "verdict": verdict}


def _confidence(basis: str, m: dict, gemm: np.ndarray) -> str:
    """How sure the verdict is: the basis's rank, lowered when a measurement covers under half the GEMMs
    or the names leave kernels unknown."""
    conf = BASIS_CONFIDENCE[basis]
    if basis in ("gpu_metrics", "ncu") and gemm.any() and m["measured"][gemm].mean() < 0.5:
        conf = "medium"
    if basis == "names" and gemm.any() and (m["verdict"][gemm] == "unknown").mean() < 0.1:
        conf = "medium"
    return conf


def _disagreements(ctx: AnalysisContext, m: dict, dur: np.ndarray) -> list[dict]:
    rows = np.nonzero(m["disagree"])[0]
    if not len(rows):
        return []
    names = ctx.kname_at(rows)
    df = pd.DataFrame({"n": names, "d": dur[rows], "v": m["value"][rows], "say": m["verdict"][rows]})
    g = df.groupby("n", sort=False).agg(time_ns=("d", "sum"), measured=("v", "mean"), say=("say", "first"))
    g = g.sort_values("time_ns", ascending=False).head(5)
    return [{"name": str(n)[:120], "names_say": "tensor cores" if r["say"] == "tensor" else "SIMT",
             "measured_tensor_activity": round(float(r["measured"]), 4), "time_us": round(r["time_ns"] / 1e3, 1)}
            for n, r in g.iterrows()]


METHOD = {"gpu_metrics": "Nsight Systems GPU metrics Tensor Active (names where not sampled)",
          "ncu": "Nsight Compute tensor-pipe utilization (names where not measured)",
          "nvml": "NVML tensor utilization over the window",
          "shapes": "kernel names + CPU-op shapes", "names": "kernel names"}


def _shape_verdicts(ctx: AnalysisContext, gemm: np.ndarray, gemv: np.ndarray, gemv_max: int) -> tuple[np.ndarray, list[dict]]:
    """With CPU-op shapes: marks GEMV-shaped kernels (min(M, N) <= gemv_max) in ``gemv``, and returns the
    kernels whose K or N is not a multiple of their dtype's alignment, with up to 5 examples."""
    k = ctx.kernels
    misaligned = np.zeros(len(k), dtype=bool)
    op_idx = ctx.kernel_ops(MM_OPS)
    mis_examples: list[dict] = []
    if ctx.ops is None or not (op_idx >= 0).any():
        return misaligned, mis_examples
    rows = np.nonzero(gemm & (op_idx >= 0))[0]
    sh = gemm_shapes(ctx).iloc[op_idx[rows]]
    m_, n_, k_, align = (sh[c].to_numpy(np.int64) for c in ("m", "n", "k", "align"))
    known = m_ >= 0
    rows, m_, n_, k_, align = rows[known], m_[known], n_[known], k_[known], align[known]
    gemv[rows[np.minimum(m_, n_) <= gemv_max]] = True
    bad = (align > 0) & ((k_ % np.maximum(align, 1) != 0) | (n_ % np.maximum(align, 1) != 0))
    misaligned[rows[bad]] = True
    half_name = {8: "16-bit", 16: "fp8"}
    for i in np.nonzero(bad)[0][:5]:
        row = rows[i]
        mis_examples.append({"kernel": str(k["kname"].iat[row])[:100], "M": int(m_[i]), "N": int(n_[i]),
                             "K": int(k_[i]), "dtype": _dtype_of(ctx, int(op_idx[row])) or half_name[int(align[i])],
                             "start_us": ctx.rel_us(k["start_ns"].iat[row])})
    return misaligned, mis_examples


def _all_gemv(ctx: AnalysisContext, gemv_ns: int, head: dict) -> Finding:
    """The info finding when every matrix product is GEMV-shaped."""
    return Finding(analyzer=ID, severity="info",
                   title="All matrix products are GEMV-shaped (matrix x vector): tensor cores cannot help them",
                   metrics={"non_tensor_core_gemm_fraction": 0.0, "gemm_time_fraction": 0.0,
                            "gemv_time_fraction": round(ctx.fraction(gemv_ns), 6)},
                   recommendation="Nothing to do here; see memory_bound_decode for matrix-vector work.",
                   evidence=head, rank=ctx.rank)


def _tensor_core_keep(ctx: AnalysisContext, fallback: str) -> tuple[float, bool]:
    """The share of its time a non-tensor-core GEMM would keep on tensor cores (fp32 / fallback peak), and
    whether the GPU's peaks gave it (else 0.5: tensor cores assumed to at least double the rate)."""
    ratio = float("nan")
    if ctx.peaks is not None:
        ratio = ctx.peaks.flops("fp32") / ctx.peaks.flops(fallback)
    speedup_known = bool(np.isfinite(ratio) and ratio > 0)
    return (ratio if speedup_known else 0.5), speedup_known


def _evidence(ctx: AnalysisContext, m: dict, head: dict, dur: np.ndarray, bad: np.ndarray, mis_examples: list[dict],
              saving_formula: str) -> dict:
    """The window, method, basis and confidence (``head``), the measurement and its disagreements with the
    names, the non-tensor-core kernels with a few launches, misaligned GEMMs, the formula and the peaks."""
    k = ctx.kernels
    names = ctx.kname_at(np.arange(len(k)))
    evidence: dict = dict(head)
    if m["details"]:
        evidence["measurement"] = m["details"]
    disagreements = _disagreements(ctx, m, dur)
    if disagreements:
        evidence["disagreements"] = disagreements
    if bad.any():
        s = pd.Series(dur[bad]).groupby(names[bad]).agg(["sum", "size"]).sort_values("sum", ascending=False)
        evidence["non_tensor_core_kernels"] = [
            {"name": n[:140], "time_us": round(r["sum"] / 1e3, 1), "launches": int(r["size"])} for n, r in s.head(8).iterrows()]
        evidence["examples"] = [{"name": names[r][:100], "start_us": ctx.rel_us(k["start_ns"].iat[r]),
                                 "dur_us": round(dur[r] / 1e3, 1)} for r in np.nonzero(bad)[0][:3]]
    if mis_examples:
        evidence["misaligned_examples"] = mis_examples
    evidence["saving_formula"] = saving_formula
    if ctx.peaks is not None:
        evidence["peaks"] = ctx.peaks.describe()
    return evidence


def analyze(ctx: AnalysisContext) -> list[Finding]:
    k = ctx.kernels
    if k.empty:
        return []
    cfg = ctx.config.section(ID)
    gemv_max = int(cfg["gemv_max_n"])
    gemm, gemv = gemm_kernels(ctx, gemv_max)
    if not gemm.any():
        return []
    dur = k["dur_ns"].to_numpy(np.int64)
    m = measure(ctx, gemm)
    non_tc = m["non_tc"]
    # Shapes, when available: GEMV by M/N, misalignment by K/N and dtype.
    misaligned, mis_examples = _shape_verdicts(ctx, gemm, gemv, gemv_max)
    basis = m["basis"]
    confidence = _confidence(basis, m, gemm)
    head = {"window": ctx.window.describe(), "method": METHOD[basis], "basis": basis, "confidence": confidence}
    counted = gemm & ~gemv
    total_ns = int(dur[counted].sum())
    if total_ns == 0:
        return [_all_gemv(ctx, int(dur[gemv].sum()), head)]
    bad = counted & non_tc
    bad_ns = int(dur[bad].sum())
    mis = counted & ~non_tc & misaligned
    mis_ns = int(dur[mis].sum())
    frac = bad_ns / total_ns

    fallback = str(cfg["fallback_precision"])
    keep, speedup_known = _tensor_core_keep(ctx, fallback)
    saving = bad_ns * (1.0 - min(keep, 1.0)) + mis_ns * float(cfg["misaligned_penalty"])
    sfrac = ctx.fraction(saving)
    metrics = {
        "non_tensor_core_gemm_fraction": round(frac, 6),
        "non_tensor_core_gemm_ns": bad_ns,
        "gemm_ns": total_ns,
        "gemm_time_fraction": round(ctx.fraction(total_ns), 6),
        "gemv_time_fraction": round(ctx.fraction(int(dur[gemv].sum())), 6),
        "misaligned_gemm_fraction": round(mis_ns / total_ns, 6),
        "tensor_core_speedup_assumed": round(1.0 / keep, 3),
    }
    saving_formula = (f"non-tensor-core GEMM time x (1 - fp32/{fallback} peak = {1 - keep:.2f})"
                      + ("" if speedup_known else " [GPU not in the device table: tensor cores assumed 2x]")
                      + (f" + misaligned GEMM time x {cfg['misaligned_penalty']}" if mis_ns else ""))
    evidence = _evidence(ctx, m, head, dur, bad, mis_examples, saving_formula)
    return explain(ctx, severity(ctx, sfrac, confidence), metrics, evidence, frac, bad_ns, mis_ns, total_ns, saving, sfrac)


def severity(ctx: AnalysisContext, saving_fraction: float, confidence: str) -> str:
    """The window-fraction rule; a verdict from names alone is at most medium (a name can mislead)."""
    sev = ctx.severity(ID, saving_fraction)
    return "medium" if confidence == "low" and sev == "high" else sev


def explain(ctx: AnalysisContext, sev: str, metrics: dict, evidence: dict, frac: float, bad_ns: int, mis_ns: int,
            total_ns: int, saving: float, sfrac: float) -> list[Finding]:
    basis = evidence["basis"]
    if bad_ns == 0 and mis_ns == 0:
        return [Finding(analyzer=ID, severity="info", title="Matrix products run on tensor cores",
                        metrics=metrics, recommendation="Nothing to do.", evidence=evidence, rank=ctx.rank)]
    parts = []
    if bad_ns:
        parts.append(f"{frac:.0%} of GEMM/conv time runs without tensor cores (FP32 SIMT/FFMA kernels)")
    if mis_ns:
        parts.append(f"{mis_ns / total_ns:.0%} of it is fp16/bf16 GEMMs with dimensions not a multiple of 8")
    title = "; ".join(parts) + f"; tensor cores would save ~{sfrac:.0%} of the window"
    title += f" [evidence: {basis}, confidence {evidence['confidence']}]"
    if evidence.get("disagreements"):
        d = evidence["disagreements"][0]
        title += (f"; measured {d['measured_tensor_activity']:.1%} tensor activity on {display_name(d['name'], 60)} "
                  f"although its name says {d['names_say']}: the measurement wins")
    rec = []
    if bad_ns:
        rec.append("Run the matrix products on tensor cores: train/infer under torch.autocast(\"cuda\", dtype=torch.bfloat16) "
                   "(or convert the model with .to(torch.bfloat16)); if fp32 must stay, allow TF32: "
                   "torch.backends.cuda.matmul.allow_tf32 = True and torch.backends.cudnn.allow_tf32 = True "
                   "(or torch.set_float32_matmul_precision(\"high\")).")
    if mis_ns:
        rec.append("Pad the hidden / vocabulary / head dimensions to a multiple of 8 (fp8: 16; 64 is better) so cuBLAS "
                   "can use its aligned tensor-core kernels.")
    return [Finding(analyzer=ID, severity=sev, title=title, metrics=metrics, estimated_saving_ns=int(saving),
                    estimated_saving_fraction=round(sfrac, 6), recommendation=" ".join(rec), evidence=evidence,
                    rank=ctx.rank)]


SPEC = AnalyzerSpec(ID, analyze, SETTINGS, evidence=(
    ("method", "how tensor-core use was decided (ncu counters, kernel names, shapes)"),
    ("basis", "the measurement the verdict rests on: gpu_metrics, ncu, nvml, shapes or names"),
    ("confidence", "high (measured per kernel), medium (window mean or shapes) or low (kernel names alone)"),
    ("measurement", "the measured tensor-core numbers behind the verdict"),
    ("disagreements", "kernels where the measurement and the kernel name disagree"),
    ("non_tensor_core_kernels", "GEMM kernels without tensor cores: name, launches, time"),
    ("examples", "a few of those launches with their start times"),
    ("misaligned_examples", "GEMMs whose shapes are not multiples of 8/16"),
    ("saving_formula", "how the saving was estimated"),
    ("peaks", "the device peaks the estimate used"),
    ("window", "the steady-state window"),
))
