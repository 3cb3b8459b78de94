"""unfused_attention: attention computed as GEMM -> (scale/mask/cast) -> softmax -> GEMM.

Fused kernels of every known family (FlashAttention 1/2/3, PyTorch SDPA flash / mem-efficient,
cuDNN SDPA, xformers, FlexAttention / Triton templates, TensorRT-LLM fmha / XQA / MMHA, vLLM paged
attention, FlashInfer) are fine and only reported as info. An unfused chain is found on each stream in
launch order: a softmax kernel with, on both sides, at most ``max_kernels_between`` elementwise / copy /
mask kernels and then a GEMM. Backward chains (softmax backward) are found the same way. When CPU-op
shapes are available the chain must also pass the shape test: the inner dimension of the GEMM after
the softmax equals the softmax row length.

Saving = time of the softmax and elementwise kernels of every chain + the HBM traffic of the score /
probability matrices that the chain's GEMMs write and read (one S-sized matrix per GEMM, at peak
bandwidth; only when shapes give the matrix size). docs/analyzers.md has the details.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from gpudoctor.analyzers.context import AnalysisContext, display_name
from gpudoctor.analyzers.findings import Finding
from gpudoctor.model.categories import category_of

ID = "unfused_attention"

FUSED = re.compile(
    r"flash_fwd|flash_bwd|flash::|flashattn|flash_attn|flash_attention|fmha|cutlassF|cutlassB|"
    r"attentionkernel|attention_kernel|efficient_attention|mem_eff|pytorch_flash|sdpa|xformers|"
    r"triton_tem_fused(?!_(?:addmm|mm|bmm|baddbmm|convolution|_?scaled_mm))|flex_attention|flex_decoding|xqa|mmha|masked_multihead_attention|"
    r"multihead_attention|fused_mha|mha_fwd|mha_bwd|paged_attention|pagedattention|flashinfer|"
    r"batchprefill|batchdecode|singleprefill|singledecode|cudnn::fusion::compute_dot_do_o|cudnn::fusion::convert_dq",
    re.I)
SOFTMAX = re.compile(r"softmax", re.I)
LOG_SOFTMAX = re.compile(r"log_?softmax", re.I)
NOT_GEMM = re.compile(r"cudnn::fusion|convert_dq", re.I)
BACKWARD = re.compile(r"backward|bwd|_bw_|grad", re.I)

# Kernel classes
PASS, GEMM, SOFT, FUSEDK, STOP = 0, 1, 2, 3, 4

GEMM_OPS = ("aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm", "aten::matmul")
SOFTMAX_OPS = ("aten::_softmax", "aten::softmax", "aten::_softmax_backward_data", "aten::_masked_softmax")
_ELEMENT_BYTES = {"c10::BFloat16": 2, "c10::Half": 2, "float": 4, "double": 8, "c10::Float8_e4m3fn": 1,
                  "c10::Float8_e5m2": 1}


def kernel_class(name: str) -> int:
    if FUSED.search(name):
        return FUSEDK
    if SOFTMAX.search(name) and not LOG_SOFTMAX.search(name):
        return SOFT
    cat = category_of(name)
    if cat == "gemm" and not NOT_GEMM.search(name):
        return GEMM
    if cat in ("elementwise", "memory", "other"):
        return PASS
    return STOP


def _walk(cls: np.ndarray, i: int, step: int, max_between: int, max_gemms: int) -> tuple[list[int], list[int]] | None:
    """From softmax ``i`` walk ``step`` (-1/+1): passthrough kernels, then GEMMs. None if no GEMM is reached."""
    n = len(cls)
    between: list[int] = []
    j = i + step
    while 0 <= j < n and cls[j] == PASS and len(between) < max_between:
        between.append(j)
        j += step
    if not (0 <= j < n) or cls[j] != GEMM:
        return None
    gemms: list[int] = []
    while 0 <= j < n and cls[j] == GEMM and len(gemms) < max_gemms:
        gemms.append(j)
        j += step
    return between, gemms


def _dims(ops: pd.DataFrame, idx: int) -> list:
    d = ops.at[idx, "input_dims"]
    return list(d) if isinstance(d, (list, tuple)) else []


def _shape_check(ctx: AnalysisContext, soft_row: int, after_gemm_row: int, before_gemm_row: int) -> tuple[bool | None, float]:
    """(passes, score-matrix bytes) from CPU-op shapes; (None, nan) when the shapes are not known."""
    soft_ops = ctx.kernel_ops(SOFTMAX_OPS)
    gemm_ops = ctx.kernel_ops(GEMM_OPS)
    so, go = soft_ops[soft_row], gemm_ops[after_gemm_row]
    if so < 0 or go < 0:
        return None, float("nan")
    sdims, gdims = _dims(ctx.ops, so), _dims(ctx.ops, go)
    if not sdims or not sdims[0] or len(gdims) < 2:
        return None, float("nan")
    row_len = int(sdims[0][-1])
    # The GEMM after the softmax multiplies P (.., M, L) by V (.., L, N) (forward) or dS by K/Q (backward):
    # its inner dimension is the last dim of its first operand (mm/bmm) or of the 2nd (addmm/baddbmm).
    name = str(ctx.ops.at[go, "name"])
    a = gdims[1] if name in ("aten::addmm", "aten::baddbmm") and len(gdims) >= 3 else gdims[0]
    if not a:
        return None, float("nan")
    passes = int(a[-1]) == row_len or (len(a) >= 2 and int(a[-2]) == row_len)
    n_elem = float(np.prod([int(x) for x in sdims[0]]))
    types = ctx.ops.at[go, "input_types"]
    elt = _ELEMENT_BYTES.get(types[0] if isinstance(types, (list, tuple)) and types else "", 2)
    return passes, n_elem * elt


def find_chains(ctx: AnalysisContext) -> list[dict]:
    """Every unfused attention chain of the steady-state window (one dict per chain)."""
    k = ctx.kernels
    if k.empty:
        return []
    cls = ctx.name_map(kernel_class, "unfused_attention.class", dtype=np.int64)
    if not (cls == SOFT).any():
        return []
    backward = ctx.name_map(lambda n: bool(BACKWARD.search(n)), "unfused_attention.backward", dtype=bool)
    have_shapes = ctx.ops is not None
    max_between = int(ctx.config.get(ID, "max_kernels_between"))
    max_gemms = int(ctx.config.get(ID, "max_gemms_per_side"))
    chains = []
    used = np.zeros(len(k), dtype=bool)
    stream = k["stream_id"].to_numpy()
    for s in np.unique(stream[cls == SOFT]):
        rows = np.nonzero(stream == s)[0]  # ctx.kernels is sorted by start: launch order on a stream
        c = cls[rows]
        for i in np.nonzero(c == SOFT)[0]:
            back = _walk(c, i, -1, max_between, max_gemms)
            fwd = _walk(c, i, +1, max_between, max_gemms)
            if back is None or fwd is None:
                continue
            members = sorted(back[0] + back[1] + [i] + fwd[0] + fwd[1])
            mrows = rows[members]
            if used[mrows].any():
                continue
            passes, s_bytes = (_shape_check(ctx, rows[i], rows[fwd[1][0]], rows[back[1][0]]) if have_shapes
                               else (None, float("nan")))
            if passes is False:
                continue
            used[mrows] = True
            chains.append({
                "rows": mrows,
                "softmax_row": rows[i],
                "gemm_rows": rows[back[1] + fwd[1]],
                "elementwise_rows": rows[back[0] + fwd[0]],
                "backward": bool(backward[rows[i]]),
                "score_bytes": s_bytes,
                "shape_checked": passes is True,
            })
    return chains


def _short(name: str, n: int = 120) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def analyze(ctx: AnalysisContext) -> list[Finding]:
    k = ctx.kernels
    if k.empty:
        return []
    dur = k["dur_ns"].to_numpy(np.int64)
    cls = ctx.name_map(kernel_class, "unfused_attention.class", dtype=np.int64)
    fused_ns = int(dur[cls == FUSEDK].sum())
    fused_names = sorted(set(ctx.kname_at(np.nonzero(cls == FUSEDK)[0])))
    chains = find_chains(ctx)
    if not chains and not fused_ns:
        return []
    bw = ctx.peaks.memory_bandwidth_bytes_per_s if ctx.peaks else float("nan")
    chain_ns = sum(int(dur[c["rows"]].sum()) for c in chains)
    side_ns = sum(int(dur[c["elementwise_rows"]].sum()) + int(dur[c["softmax_row"]]) for c in chains)
    traffic_bytes = sum(c["score_bytes"] * len(c["gemm_rows"]) for c in chains if np.isfinite(c["score_bytes"]))
    traffic_ns = int(traffic_bytes / bw * 1e9) if traffic_bytes and np.isfinite(bw) else 0
    # The GEMM-side traffic cannot exceed the chain GEMMs' own time.
    gemm_ns = sum(int(dur[c["gemm_rows"]].sum()) for c in chains)
    traffic_ns = min(traffic_ns, gemm_ns)
    saving = side_ns + traffic_ns
    frac = ctx.fraction(saving)
    n_steps = max(len(ctx.window.steady), 1)
    metrics = {
        "attention_time_fraction": round(ctx.fraction(chain_ns), 6),
        "instances": len(chains),
        "forward_instances": sum(not c["backward"] for c in chains),
        "backward_instances": sum(c["backward"] for c in chains),
        "instances_per_step": round(len(chains) / n_steps, 3),
        "unfused_chain_ns": chain_ns,
        "softmax_elementwise_ns": side_ns,
        "score_traffic_ns": traffic_ns,
        "fused_attention_fraction": round(ctx.fraction(fused_ns), 6),
        "shapes_checked": sum(c["shape_checked"] for c in chains),
    }
    if not chains:
        return [Finding(
            analyzer=ID, severity="info",
            title=f"Attention runs in fused kernels ({metrics['fused_attention_fraction']:.1%} of the steady-state window)",
            metrics=metrics, recommendation="Nothing to do: attention is already fused.",
            evidence={"fused_kernels": [_short(n) for n in fused_names[:10]], "window": ctx.window.describe()},
            rank=ctx.rank)]

    rows_all = np.concatenate([c["rows"] for c in chains])
    by_name = pd.Series(dur[rows_all]).groupby(ctx.kname_at(rows_all)).sum().sort_values(ascending=False)
    examples = []
    for c in chains[:3]:
        examples.append({
            "direction": "backward" if c["backward"] else "forward",
            "start_us": ctx.rel_us(k["start_ns"].iat[c["rows"][0]]),
            "end_us": ctx.rel_us(k["end_ns"].iat[c["rows"][-1]]),
            "stream_id": int(k["stream_id"].iat[c["rows"][0]]),
            "kernels": [{"name": display_name(n), "dur_us": round(dur[r] / 1e3, 1)}
                        for r, n in zip(c["rows"], ctx.kname_at(c["rows"]))],
        })
    evidence = {
        "window": ctx.window.describe(),
        "chain_kernels_by_time_us": {display_name(n): round(v / 1e3, 1) for n, v in by_name.head(12).items()},
        "examples": examples,
        "saving_formula": "softmax + elementwise kernels of every chain"
                          + (" + score/probability matrix traffic of the chain GEMMs at peak bandwidth"
                             if traffic_ns else " (shapes not recorded: GEMM-side score-matrix traffic not counted, a lower bound)"),
    }
    if fused_names:
        evidence["fused_kernels_also_present"] = [_short(n) for n in fused_names[:5]]
    sev = ctx.severity(ID, frac)
    per_step = metrics["instances_per_step"]
    title = (f"Unfused attention: {len(chains)} GEMM→softmax→GEMM chains ({per_step:g} per step) take "
             f"{metrics['attention_time_fraction']:.0%} of the steady-state window; fusing saves ~{frac:.0%}")
    rec = ("Compute attention with one fused kernel: replace the bmm → scale/mask → softmax → bmm code with "
           "torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) (or attn_mask=...), which "
           "dispatches to FlashAttention / cuDNN / memory-efficient kernels; or call flash_attn.flash_attn_func. "
           "Hugging Face models: from_pretrained(..., attn_implementation=\"sdpa\") or \"flash_attention_2\". "
           "Inference engines: keep the fused attention backend on (vLLM VLLM_ATTENTION_BACKEND=FLASH_ATTN or "
           "FLASHINFER, TensorRT-LLM --context_fmha enable). Keep q/k/v in bf16/fp16 with head_dim a multiple of 8 "
           "so a fused backend is eligible.")
    return [Finding(analyzer=ID, severity=sev, title=title, metrics=metrics, estimated_saving_ns=int(saving),
                    estimated_saving_fraction=round(frac, 6), recommendation=rec, evidence=evidence, rank=ctx.rank)]
