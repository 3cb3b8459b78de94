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
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gpudoctor.analyzers.context import ELEMENT_BYTES, AnalysisContext, display_name
from gpudoctor.analyzers.findings import Finding
from gpudoctor.analyzers.spec import SEVERITY_OVERRIDES, AnalyzerSpec, Setting
from gpudoctor.model.categories import category_of

ID = "unfused_attention"

SETTINGS = (
    Setting("max_kernels_between", 10, "most non-GEMM kernels between a GEMM and the softmax on either side of a chain",
            unit="count"),
    Setting("max_gemms_per_side", 2, "GEMMs directly before/after the chain counted as part of it (backward has 2)",
            unit="count"),
) + SEVERITY_OVERRIDES

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


def _run_ending(mask: np.ndarray) -> np.ndarray:
    """Length of the run of True ending at each position (0 where False)."""
    idx = np.arange(len(mask))
    last_false = np.maximum.accumulate(np.where(mask, -1, idx)) if len(mask) else idx
    return np.where(mask, idx - last_false, 0)


def _run_starting(mask: np.ndarray) -> np.ndarray:
    """Length of the run of True starting at each position (0 where False)."""
    return _run_ending(mask[::-1])[::-1]


@dataclass
class Chains:
    """Unfused chains, columnar. ``order``: steady-kernel rows grouped by stream, each stream in launch
    order; a chain's kernels are the contiguous positions ``lo..hi`` of ``order``: GEMMs ``lo..back_gemm``,
    softmax/elementwise ``back_gemm+1..fwd_gemm-1`` (the softmax at ``softmax``), GEMMs ``fwd_gemm..hi``."""

    order: np.ndarray
    table: pd.DataFrame  # lo, hi, softmax, back_gemm, fwd_gemm, backward, score_bytes, shape_checked

    def __len__(self) -> int:
        return len(self.table)

    def rows(self, i: int) -> np.ndarray:
        c = self.table.iloc[i]
        return self.order[int(c["lo"]): int(c["hi"]) + 1]

    def member_rows(self) -> np.ndarray:
        """Rows of ctx.kernels in any chain."""
        mark = np.zeros(len(self.order) + 1, dtype=np.int64)
        np.add.at(mark, self.table["lo"].to_numpy(), 1)
        np.add.at(mark, self.table["hi"].to_numpy() + 1, -1)
        return self.order[np.cumsum(mark[:-1]) > 0]

    def sums(self, dur: np.ndarray) -> tuple[int, int]:
        """(time of all chain kernels, time of their GEMMs) for per-kernel durations ``dur``."""
        t = self.table
        cs = np.r_[0, np.cumsum(dur[self.order])]
        lo, hi, bg, fg = (t[c].to_numpy() for c in ("lo", "hi", "back_gemm", "fwd_gemm"))
        chain_ns = int((cs[hi + 1] - cs[lo]).sum())
        gemm_ns = int((cs[bg + 1] - cs[lo]).sum() + (cs[hi + 1] - cs[fg]).sum())
        return chain_ns, gemm_ns


def _candidates(c: np.ndarray, max_between: int, max_gemms: int) -> pd.DataFrame:
    """Every softmax of one stream's class sequence ``c`` that has, on each side, at most
    ``max_between`` passthrough kernels and then at least one GEMM (positions local to ``c``)."""
    n = len(c)
    soft = np.nonzero(c == SOFT)[0]
    pass_end, pass_start = _run_ending(c == PASS), _run_starting(c == PASS)
    gemm_end, gemm_start = _run_ending(c == GEMM), _run_starting(c == GEMM)
    nb = np.where(soft >= 1, pass_end[np.clip(soft - 1, 0, None)], 0)
    nf = np.where(soft + 1 < n, pass_start[np.clip(soft + 1, None, n - 1)], 0)
    bg = soft - 1 - nb  # the GEMM nearest to the softmax, before it
    fg = soft + 1 + nf  # ... and after it
    ok = (nb <= max_between) & (nf <= max_between) & (bg >= 0) & (fg < n)
    ok &= (c[np.clip(bg, 0, n - 1)] == GEMM) & (c[np.clip(fg, 0, n - 1)] == GEMM)
    soft, bg, fg = soft[ok], bg[ok], fg[ok]
    lo = bg - np.minimum(gemm_end[bg], max_gemms) + 1
    hi = fg + np.minimum(gemm_start[fg], max_gemms) - 1
    return pd.DataFrame({"lo": lo, "hi": hi, "softmax": soft, "back_gemm": bg, "fwd_gemm": fg})


_SHAPE_COLUMNS = ("soft_row_len", "soft_elems", "inner_last", "inner_prev", "elt_bytes")


def _op_shape(name: str, dims: list, types: list) -> tuple:
    """What the shape test needs of one CPU op (-1 where unknown): as a softmax, its row length and
    element count; as the GEMM after the softmax, the last two dims of the operand that P (or dS)
    multiplies, and its element size."""
    row_len, elems = (int(dims[0][-1]), float(np.prod([int(x) for x in dims[0]]))) if dims and dims[0] else (-1, -1.0)
    # The GEMM after the softmax multiplies P (.., M, L) by V (.., L, N) (forward) or dS by K/Q (backward):
    # its inner dimension is the last dim of its first operand (mm/bmm) or of the 2nd (addmm/baddbmm).
    a = dims[1] if name in ("aten::addmm", "aten::baddbmm") and len(dims) >= 3 else (dims[0] if dims else [])
    last = int(a[-1]) if len(dims) >= 2 and a else -1
    prev = int(a[-2]) if len(dims) >= 2 and a and len(a) >= 2 else -1
    return row_len, elems, last, prev, ELEMENT_BYTES.get(types[0] if types else "", 2)


def _shape_checks(ctx: AnalysisContext, soft_rows: np.ndarray, after_gemm_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For candidate chains (softmax kernel rows, rows of the first GEMM after it): whether the shapes pass
    (1), fail (0) or are unknown (-1), and the score-matrix bytes (nan when unknown)."""
    so = ctx.kernel_ops(SOFTMAX_OPS)[soft_rows]
    go = ctx.kernel_ops(GEMM_OPS)[after_gemm_rows]
    facts = ctx.op_facts(_op_shape, "unfused_attention.shapes", _SHAPE_COLUMNS)
    known = (so >= 0) & (go >= 0)
    s = facts.iloc[np.where(known, so, 0)] if len(facts) else None
    g = facts.iloc[np.where(known, go, 0)] if len(facts) else None
    if s is None:
        return np.full(len(so), -1), np.full(len(so), np.nan)
    row_len = s["soft_row_len"].to_numpy()
    last, prev = g["inner_last"].to_numpy(), g["inner_prev"].to_numpy()
    known &= (row_len >= 0) & (last >= 0)
    passes = (last == row_len) | ((prev >= 0) & (prev == row_len))
    verdict = np.where(known, passes.astype(int), -1)
    score = np.where(known, s["soft_elems"].to_numpy(float) * g["elt_bytes"].to_numpy(float), np.nan)
    return verdict, score


def find_chains(ctx: AnalysisContext) -> Chains:
    """Every unfused attention chain of the steady-state window.

    Candidates are found with run-length arrays per stream; chains cannot share kernels, so a
    candidate overlapping an accepted earlier one (or failing the shape test) is skipped.
    """
    k = ctx.kernels
    empty = Chains(np.zeros(0, np.int64), pd.DataFrame({c: np.zeros(0, np.int64) for c in
                   ("lo", "hi", "softmax", "back_gemm", "fwd_gemm")}).assign(backward=False, score_bytes=0.0,
                                                                             shape_checked=False))
    if k.empty:
        return empty
    cls = ctx.name_map(kernel_class, "unfused_attention.class", dtype=np.int64)
    if not (cls == SOFT).any():
        return empty
    backward = ctx.name_map(lambda n: bool(BACKWARD.search(n)), "unfused_attention.backward", dtype=bool)
    max_between = int(ctx.config.get(ID, "max_kernels_between"))
    max_gemms = int(ctx.config.get(ID, "max_gemms_per_side"))
    stream = k["stream_id"].to_numpy()
    # ctx.kernels is sorted by start, so a stable sort by stream keeps launch order within each stream.
    order = np.argsort(stream, kind="stable")
    bounds = np.r_[0, np.nonzero(np.diff(stream[order]))[0] + 1, len(order)]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        cand = _candidates(cls[order[a:b]], max_between, max_gemms)
        parts.append(cand + a)  # positions into ``order``
    cand = pd.concat(parts, ignore_index=True) if parts else empty.table
    lo, hi = cand["lo"].to_numpy(), cand["hi"].to_numpy()
    soft, fg = cand["softmax"].to_numpy(), cand["fwd_gemm"].to_numpy()
    if ctx.ops is not None:
        verdict, score_bytes = _shape_checks(ctx, order[soft], order[fg])
    else:
        verdict, score_bytes = np.full(len(cand), -1), np.full(len(cand), np.nan)
    keep = np.zeros(len(cand), dtype=bool)
    last_hi = -1
    for i, (l, h, v) in enumerate(zip(lo.tolist(), hi.tolist(), verdict.tolist())):  # candidates, not kernels
        if l <= last_hi or v == 0:
            continue
        keep[i] = True
        last_hi = h
    checked = verdict == 1
    table = cand[keep].reset_index(drop=True)
    table["backward"] = backward[order[table["softmax"].to_numpy()]]
    table["score_bytes"] = score_bytes[keep]
    table["shape_checked"] = checked[keep]
    return Chains(order, table)


def _short(name: str, n: int = 120) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


@dataclass
class Measurement:
    """What ``measure`` found in one rank's window."""

    chains: Chains
    fused_names: list[str]
    metrics: dict
    saving_ns: int
    saving_fraction: float
    traffic_ns: int


def measure(ctx: AnalysisContext) -> Measurement | None:
    """The unfused chains and fused attention kernels of the window, their time and the saving of fusing
    (softmax + elementwise kernels of every chain, plus the score-matrix traffic of its GEMMs when shapes
    give it); None when there is no attention at all."""
    k = ctx.kernels
    if k.empty:
        return None
    dur = k["dur_ns"].to_numpy(np.int64)
    cls = ctx.name_map(kernel_class, "unfused_attention.class", dtype=np.int64)
    fused_ns = int(dur[cls == FUSEDK].sum())
    fused_codes = np.unique(k["kname"].cat.codes.to_numpy()[cls == FUSEDK])
    fused_names = sorted(str(n) for n in k["kname"].cat.categories[fused_codes[fused_codes >= 0]])
    chains = find_chains(ctx)
    if not len(chains) and not fused_ns:
        return None
    bw = ctx.peaks.memory_bandwidth_bytes_per_s if ctx.peaks else float("nan")
    t = chains.table
    chain_ns, gemm_ns = chains.sums(dur)
    side_ns = chain_ns - gemm_ns  # softmax + elementwise kernels
    n_gemms = (t["back_gemm"] - t["lo"] + 1) + (t["hi"] - t["fwd_gemm"] + 1)
    sb = t["score_bytes"].to_numpy(float)
    fin = np.isfinite(sb)
    traffic_bytes = float((sb[fin] * n_gemms.to_numpy()[fin]).sum())
    traffic_ns = int(traffic_bytes / bw * 1e9) if traffic_bytes and np.isfinite(bw) else 0
    # The GEMM-side traffic cannot exceed the chain GEMMs' own time.
    traffic_ns = min(traffic_ns, gemm_ns)
    saving = side_ns + traffic_ns
    n_steps = max(len(ctx.window.steady), 1)
    metrics = {
        "attention_time_fraction": round(ctx.fraction(chain_ns), 6),
        "instances": len(chains),
        "forward_instances": int((~t["backward"]).sum()),
        "backward_instances": int(t["backward"].sum()),
        "instances_per_step": round(len(chains) / n_steps, 3),
        "unfused_chain_ns": chain_ns,
        "softmax_elementwise_ns": side_ns,
        "score_traffic_ns": traffic_ns,
        "fused_attention_fraction": round(ctx.fraction(fused_ns), 6),
        "shapes_checked": int(t["shape_checked"].sum()),
    }
    return Measurement(chains, fused_names, metrics, int(saving), ctx.fraction(saving), traffic_ns)


def severity(ctx: AnalysisContext, m: Measurement) -> str:
    """The general rule on the saving's share of the window; info when attention is already fused."""
    return ctx.severity(ID, m.saving_fraction) if len(m.chains) else "info"


def explain(ctx: AnalysisContext, m: Measurement, sev: str) -> Finding:
    """Title, evidence (the chains' kernels, a few chains with their times) and the fix."""
    metrics, chains = m.metrics, m.chains
    if not len(chains):
        return Finding(
            analyzer=ID, severity=sev,
            title=f"Attention runs in fused kernels ({metrics['fused_attention_fraction']:.1%} of the steady-state window)",
            metrics=metrics, recommendation="Nothing to do: attention is already fused.",
            evidence={"fused_kernels": [_short(n) for n in m.fused_names[:10]], "window": ctx.window.describe()},
            rank=ctx.rank)
    k, t = ctx.kernels, chains.table
    dur = k["dur_ns"].to_numpy(np.int64)
    rows_all = chains.member_rows()
    codes = k["kname"].cat.codes.to_numpy()[rows_all]
    by_code = pd.Series(dur[rows_all]).groupby(codes).sum().sort_values(ascending=False)
    by_name = pd.Series(by_code.to_numpy(), index=k["kname"].cat.categories[by_code.index.to_numpy()])
    examples = []
    for i in range(min(3, len(chains))):
        rows = chains.rows(i)
        examples.append({
            "direction": "backward" if t["backward"].iat[i] else "forward",
            "start_us": ctx.rel_us(k["start_ns"].iat[rows[0]]),
            "end_us": ctx.rel_us(k["end_ns"].iat[rows[-1]]),
            "stream_id": int(k["stream_id"].iat[rows[0]]),
            "kernels": [{"name": display_name(n), "dur_us": round(dur[r] / 1e3, 1)}
                        for r, n in zip(rows, ctx.kname_at(rows))],
        })
    evidence = {
        "window": ctx.window.describe(),
        "chain_kernels_by_time_us": {display_name(n): round(v / 1e3, 1) for n, v in by_name.head(12).items()},
        "examples": examples,
        "saving_formula": "softmax + elementwise kernels of every chain"
                          + (" + score/probability matrix traffic of the chain GEMMs at peak bandwidth"
                             if m.traffic_ns else " (shapes not recorded: GEMM-side score-matrix traffic not counted, a lower bound)"),
    }
    if m.fused_names:
        evidence["fused_kernels_also_present"] = [_short(n) for n in m.fused_names[:5]]
    frac = m.saving_fraction
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
    return Finding(analyzer=ID, severity=sev, title=title, metrics=metrics, estimated_saving_ns=m.saving_ns,
                   estimated_saving_fraction=round(frac, 6), recommendation=rec, evidence=evidence, rank=ctx.rank)


def analyze(ctx: AnalysisContext) -> list[Finding]:
    m = measure(ctx)
    return [] if m is None else [explain(ctx, m, severity(ctx, m))]


SPEC = AnalyzerSpec(ID, analyze, SETTINGS, evidence=(
    ("chain_kernels_by_time_us", "the chain's kernels (short names) and their time in the window"),
    ("examples", "a few chains with their kernels and start times"),
    ("fused_kernels", "fused attention kernels seen in the window"),
    ("fused_kernels_also_present", "a fused attention kernel runs next to the unfused chains"),
    ("saving_formula", "how the saving was estimated"),
    ("window", "the steady-state window"),
))
