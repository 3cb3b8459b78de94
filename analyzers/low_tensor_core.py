"""low_tensor_core: matrix products (GEMM / convolution) that run without tensor cores.

A GEMM kernel runs on the FP32 (SIMT / FFMA) pipes instead of the tensor cores when its name says so
(``sgemm``, ``simt``, ``ffma``: cuBLAS ``sm80_xmma_gemm_f32f32_f32f32_f32_..._ffma_...``, CUTLASS
``cutlass_80_simt_sgemm_...``, cuDNN ``implicit_convolve_sgemm``), or, when Nsight Compute metrics are
joined (``trace.kernel_metrics``), when its measured tensor pipe is idle (< ``tensor_pipe_min``) — the
measurement wins over the name. GEMV-shaped kernels (decode: N tile <= ``gemv_max_n``, names with
gemv, or M <= ``gemv_max_n`` in shapes) are left out of both sides: a matrix-vector product is
bandwidth-bound and tensor cores cannot help it. With CPU-op shapes, fp16/bf16 GEMMs whose K or N is not
a multiple of 8 (fp8: 16) are reported as misaligned.

non_tensor_core_gemm_fraction = time of non-tensor-core GEMM kernels / time of all (non-GEMV) GEMM kernels.
Saving = non-tensor-core time x (1 - fp32 rate / ``fallback_precision`` tensor rate) + misaligned time x
``misaligned_penalty``.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from gpudoctor.analyzers.context import ELEMENT_BYTES, AnalysisContext
from gpudoctor.analyzers.findings import Finding
from gpudoctor.analyzers.spec import SEVERITY_OVERRIDES, AnalyzerSpec, Setting, fraction
from gpudoctor.analyzers.unfused_attention import FUSED
from gpudoctor.model.categories import category_of
from gpudoctor.model.devices import PRECISIONS

ID = "low_tensor_core"

SETTINGS = (
    Setting("fallback_precision", "tf32", "precision whose tensor-core rate the saving estimate assumes (tf32: allow_tf32)",
            choices=PRECISIONS),
    fraction("tensor_pipe_min", 0.05, "ncu: a GEMM whose tensor pipe is active less than this fraction runs without tensor cores"),
    Setting("gemv_max_n", 16, "a GEMM whose N tile (nvjet _MxN_) or M (shapes) is at most this is GEMV-shaped: not flagged",
            unit="elements"),
    fraction("misaligned_penalty", 0.25, "fraction of a misaligned fp16/bf16/fp8 GEMM's time assumed recoverable by padding"),
) + SEVERITY_OVERRIDES

NON_TC = re.compile(r"sgemm|simt|ffma", re.I)
GEMV_NAME = re.compile(r"gemv|gemmSN|gemmk1", re.I)
NOT_GEMM = re.compile(r"cudnn::fusion|convert_dq|splitkreduce|reduce_kernel", re.I)
TILE = re.compile(r"(?:nvjet_[a-z0-9]+_[a-z]+_|tilesize|_sgemm_|_gemm_|_)(\d+)x(\d+)(?:x\d+)?_", re.I)
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
    non_tc = gemm & ctx.name_map(lambda n: bool(NON_TC.search(n)), "ltc.non_tc_name", dtype=bool)
    method = "kernel names"

    # Shapes, when available: GEMV by M/N, misalignment by K/N and dtype.
    misaligned = np.zeros(len(k), dtype=bool)
    op_idx = ctx.kernel_ops(MM_OPS)
    mis_examples = []
    if ctx.ops is not None and (op_idx >= 0).any():
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
        method = "kernel names + CPU-op shapes"

    # Nsight Compute measurements override the names, per kernel name.
    km = ctx.trace.kernel_metrics
    if len(km) and km["tensor_pipe_fraction"].notna().any():
        meas = km[km["tensor_pipe_fraction"].notna()]
        rows = meas["kernel_row"].to_numpy()
        trace_row = k["trace_row"].to_numpy()
        pos = pd.Index(trace_row).get_indexer(rows) if len(trace_row) else np.full(len(rows), -1)
        per_name: dict[str, list[float]] = {}
        for p, v, n in zip(pos, meas["tensor_pipe_fraction"].to_numpy(float), meas["name"].astype(str).to_numpy()):
            per_name.setdefault(str(k["kname"].iat[p]) if p >= 0 else n, []).append(float(v))
        if per_name:
            tmin = float(cfg["tensor_pipe_min"])
            med = {n: float(np.median(v)) for n, v in per_name.items()}
            for n, v in med.items():
                hit = gemm & (ctx.name_mask("^" + re.escape(n) + "$") |
                              ctx.name_mask("^" + re.escape(n) + "$", column="name"))
                if hit.any():
                    non_tc[hit] = v < tmin
            method = "Nsight Compute tensor-pipe utilization (names where not measured)"

    counted = gemm & ~gemv
    total_ns = int(dur[counted].sum())
    if total_ns == 0:
        gemv_ns = int(dur[gemv].sum())
        return [Finding(analyzer=ID, severity="info",
                        title="All matrix products are GEMV-shaped (matrix x vector): tensor cores cannot help them",
                        metrics={"non_tensor_core_gemm_fraction": 0.0, "gemm_time_fraction": 0.0,
                                 "gemv_time_fraction": round(ctx.fraction(gemv_ns), 6)},
                        recommendation="Nothing to do here; see memory_bound_decode for matrix-vector work.",
                        evidence={"window": ctx.window.describe(), "method": method}, rank=ctx.rank)]
    bad = counted & non_tc
    bad_ns = int(dur[bad].sum())
    mis = counted & ~non_tc & misaligned
    mis_ns = int(dur[mis].sum())
    frac = bad_ns / total_ns

    fallback = str(cfg["fallback_precision"])
    ratio = float("nan")
    if ctx.peaks is not None:
        ratio = ctx.peaks.flops("fp32") / ctx.peaks.flops(fallback)
    speedup_known = np.isfinite(ratio) and ratio > 0
    keep = ratio if speedup_known else 0.5  # unknown GPU: assume tensor cores at least double the rate
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
    names = ctx.kname_at(np.arange(len(k)))
    evidence: dict = {"window": ctx.window.describe(), "method": method}
    if bad.any():
        s = pd.Series(dur[bad]).groupby(names[bad]).agg(["sum", "size"]).sort_values("sum", ascending=False)
        evidence["non_tensor_core_kernels"] = [
            {"name": n[:140], "time_us": round(r["sum"] / 1e3, 1), "launches": int(r["size"])} for n, r in s.head(8).iterrows()]
        evidence["examples"] = [{"name": names[r][:100], "start_us": ctx.rel_us(k["start_ns"].iat[r]),
                                 "dur_us": round(dur[r] / 1e3, 1)} for r in np.nonzero(bad)[0][:3]]
    if mis_examples:
        evidence["misaligned_examples"] = mis_examples
    evidence["saving_formula"] = (
        f"non-tensor-core GEMM time x (1 - fp32/{fallback} peak = {1 - keep:.2f})"
        + ("" if speedup_known else " [GPU not in the device table: tensor cores assumed 2x]")
        + (f" + misaligned GEMM time x {cfg['misaligned_penalty']}" if mis_ns else ""))
    if ctx.peaks is not None:
        evidence["peaks"] = ctx.peaks.describe()

    sev = ctx.severity(ID, sfrac)
    if bad_ns == 0 and mis_ns == 0:
        return [Finding(analyzer=ID, severity="info", title="Matrix products run on tensor cores",
                        metrics=metrics, recommendation="Nothing to do.", evidence=evidence, rank=ctx.rank)]
    parts = []
    if bad_ns:
        parts.append(f"{frac:.0%} of GEMM/conv time runs without tensor cores (FP32 SIMT/FFMA kernels)")
    if mis_ns:
        parts.append(f"{mis_ns / total_ns:.0%} of it is fp16/bf16 GEMMs with dimensions not a multiple of 8")
    title = "; ".join(parts) + f"; tensor cores would save ~{sfrac:.0%} of the window"
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
    ("non_tensor_core_kernels", "GEMM kernels without tensor cores: name, launches, time"),
    ("examples", "a few of those launches with their start times"),
    ("misaligned_examples", "GEMMs whose shapes are not multiples of 8/16"),
    ("saving_formula", "how the saving was estimated"),
    ("peaks", "the device peaks the estimate used"),
    ("window", "the steady-state window"),
))
