"""pipeline_bubbles: pipeline-parallel bubbles, measured per rank and compared with the schedule's ideal.

A rank runs pipeline parallelism when it has point-to-point communication: NCCL send/recv kernels
(``ncclDevKernel_SendRecv``, ``ncclKernel_SendRecv_*``, ``ncclSendKernel`` / ``ncclRecvKernel`` of old
NCCL) that are not the kernel of a collective, or collectives with op send / recv / send_recv. NCCL runs
all-to-all (and uneven all-gather / reduce-scatter) as the same send/recv kernels: a send/recv kernel
whose collectives row says all_to_all, all_reduce, ... (from record_param_comms, or the ``nccl:<op>`` /
``c10d::`` / TorchRec range around its launch: gpudoctor/model/collectives.py) is not a pipeline
transfer (``nccl_dominated.pipeline_p2p_mask``). Otherwise this analyzer says nothing.

bubble_fraction = the part of the steady-state window in which no compute kernel runs (compute = every
kernel that is not communication; time inside send/recv kernels, waiting for the neighbour stage,
counts as bubble). Also reported: p2p_fraction (union of send/recv kernel time) and idle_fraction
(nothing at all on the GPU).

The ideal bubble of GPipe and 1F1B with p stages and m micro-batches is (p-1)/(m+p-1); interleaved 1F1B
with v model chunks per stage: (p-1)/(v*m+p-1) (Narayanan et al., "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM", SC'21). p: config pipeline_stages, else the number of ranks
with send/recv kernels, else of ranks in the run (a pure pipeline: with data parallelism too, give p); m: config microbatches, else the distinct indices of ranges named like
``microbatch_3`` / ``micro_batch 3`` / ``mb_3``; v: config virtual_stages (default 1).

Where the run's collectives hold sends and receives of several ranks, each send is matched to the
receive it feeds (``model.collectives.pair_p2p``: kernels overlapping in time, same size where known), and
the finding adds how long this rank's receives waited for the sending stage (recv_wait_ns,
recv_wait_fraction) and its sends for the receiving stage (send_wait_ns), with the peer ranks in the
evidence: the waiting of a receive is the sending stage's work, i.e. where this rank's bubble comes from.

Severity on bubble_fraction: high >= bubble_fraction_high (0.4), medium >= bubble_fraction_medium (0.2),
else info. The title says whether the measured bubble is near the ideal (the schedule itself is the
limit: more micro-batches) or far above it (excess >= far_above, 0.1 of the window: blocking transfers,
unbalanced stages, or host stalls). estimated_saving_ns = (bubble_fraction - ideal at target m) x window,
target m = target_microbatches_per_stage x p (the ideal is taken as 0 when p is unknown). In steps:
``measure`` takes the bubble, p / m / v, the ideals and the matched send/recv waits; ``severity`` grades
bubble_fraction; ``explain`` words the finding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gpudoctor.analyzers.findings import Finding, severity_for
from gpudoctor.analyzers.nccl_dominated import (
    comm_mask,
    intervals,
    pipeline_p2p,
    pipeline_p2p_kernels,
    pipeline_p2p_mask,
    world_size,
)
from gpudoctor.analyzers.spec import AnalyzerSpec, Setting, fraction
from gpudoctor.model.collectives import P2P_OPS, pair_p2p
from gpudoctor.model.steps import union_ns

if TYPE_CHECKING:
    from gpudoctor.analyzers.context import AnalysisContext
    from gpudoctor.model.trace import Trace


ID = "pipeline_bubbles"

SETTINGS = (
    Setting("pipeline_stages", None, "pipeline stages p (default: the number of ranks in the run)", unit="count",
            kind="integer", minimum=1),
    Setting("microbatches", None, "micro-batches per step m (default: from ranges named microbatch_<j>)", unit="count",
            kind="integer", minimum=1),
    Setting("virtual_stages", 1, "model chunks per stage v of an interleaved schedule (1 = GPipe / 1F1B)", unit="count",
            minimum=1),
    fraction("bubble_fraction_medium", 0.2, "medium when no compute runs at least this fraction of the window"),
    fraction("bubble_fraction_high", 0.4, "high at this fraction"),
    fraction("far_above", 0.1, "measured bubble this much (fraction of the window) above the ideal is 'far above'"),
    Setting("target_microbatches_per_stage", 4, "the saving assumes m = this x p micro-batches", unit="count", minimum=1),
    Setting("microbatch_pattern", r"micro_?batch[\s_#:-]*(\d+)|(?:^|[^a-z])mb[\s_#:-]*(\d+)",
            "regex (case-insensitive) of micro-batch range names; the first number is the index", kind="regex"),
)


def ideal_bubble(p: int, m: int, v: int = 1) -> float:
    """(p-1)/(v*m+p-1): the bubble share of a GPipe / 1F1B (v=1) or interleaved (v>1) schedule."""
    if p < 1 or m < 1 or v < 1:
        raise ValueError("p, m, v must be >= 1")
    return (p - 1) / (v * m + p - 1)


def microbatches_from_ranges(ranges: pd.DataFrame, pattern: str) -> int | None:
    """Distinct micro-batch indices among range names (None when no range is named like one)."""
    if ranges.empty:
        return None
    rx = re.compile(pattern, re.I)
    texts = ranges["text"]
    uniq = texts.cat.categories if isinstance(texts.dtype, pd.CategoricalDtype) else pd.unique(texts.astype(str))
    idx = set()
    for t in uniq:
        m = rx.search(str(t))
        if m:
            num = next((g for g in m.groups() if g is not None), None)
            if num is not None:
                idx.add(int(num))
    return len(idx) or None


def is_pipeline(trace: Trace) -> bool:
    k = trace.kernels
    if len(k) and pipeline_p2p(trace) and pipeline_p2p_mask(k, trace.collectives).any():
        return True
    c = trace.collectives
    if not len(c):
        return False
    timeline = c["source"].astype(str).to_numpy() != "nccl_tests"  # benchmark rows are not this run's traffic
    return bool((timeline & np.isin(c["op"].astype(str).to_numpy(), P2P_OPS)).any())


def stages(ctx: AnalysisContext, cfg: dict) -> tuple[int, str]:
    """Pipeline stages p and where the number came from."""
    if cfg.get("pipeline_stages"):
        return int(cfg["pipeline_stages"]), "config"
    run = getattr(ctx, "run_trace", None)
    if run is not None and len(run.kernels):
        mask = pipeline_p2p_mask(run.kernels, run.collectives)
        n = int(run.kernels.loc[mask, "rank"].nunique()) if mask.any() else 0
        if n >= 2:
            return n, "ranks with send/recv kernels"
    return world_size(ctx.trace), "ranks in the run"


def bubble_metrics(ctx: AnalysisContext) -> dict:
    k, mo = ctx.kernels, ctx.memops
    lo, hi = ctx.start_ns, ctx.end_ns
    window = max(hi - lo, 0)
    cm = comm_mask(k)
    pm = pipeline_p2p_kernels(ctx)
    compute = union_ns(*intervals(k, ~cm), lo, hi)
    p2p = union_ns(*intervals(k, pm), lo, hi)
    busy = union_ns(np.r_[k["start_ns"].to_numpy(np.int64), mo["start_ns"].to_numpy(np.int64)],
                    np.r_[k["end_ns"].to_numpy(np.int64), mo["end_ns"].to_numpy(np.int64)], lo, hi)
    bubble = window - compute
    return {"window_ns": int(window), "compute_ns": int(compute), "bubble_ns": int(bubble), "p2p_ns": int(p2p),
            "idle_ns": int(window - busy),
            "bubble_fraction": bubble / window if window else 0.0,
            "p2p_fraction": p2p / window if window else 0.0,
            "idle_fraction": (window - busy) / window if window else 0.0}


def p2p_waits(ctx: AnalysisContext) -> dict:
    """This rank's transfers in the window matched to the other side's (``pair_p2p`` on the whole run):
    how long its receives ran before the matching send started (waiting for the sending stage) and its
    sends before the matching receive did (waiting for the receiving stage). Empty without pairs."""
    run = getattr(ctx, "run_trace", None)
    if run is None or run.collectives.empty:
        return {}
    pairs = ctx.run_cached("p2p_pairs", lambda: pair_p2p(run.collectives))
    lo, hi = ctx.start_ns, ctx.end_ns
    recv = pairs[(pairs["recv_rank"] == ctx.rank) & (pairs["recv_end_ns"] > lo) & (pairs["recv_start_ns"] < hi)]
    send = pairs[(pairs["send_rank"] == ctx.rank) & (pairs["send_end_ns"] > lo) & (pairs["send_start_ns"] < hi)]
    if recv.empty and send.empty:
        return {}

    def waited(own_start: pd.Series, other_start: pd.Series) -> int:
        a = np.maximum(own_start.to_numpy(np.int64), lo)
        return int(np.clip(np.minimum(other_start.to_numpy(np.int64), hi) - a, 0, None).sum())

    return {"p2p_pairs": int(len(recv) + len(send)),
            "recv_wait_ns": waited(recv["recv_start_ns"], recv["send_start_ns"]),
            "send_wait_ns": waited(send["send_start_ns"], send["recv_start_ns"]),
            "recv_from": sorted(set(recv["send_rank"].tolist())), "send_to": sorted(set(send["recv_rank"].tolist()))}


@dataclass
class Measurement:
    """What ``measure`` found in one rank's window."""

    raw: dict  # bubble_metrics (+ the matched p2p waits), unrounded
    metrics: dict
    p: int  # pipeline stages
    p_source: str
    mb: int | None  # micro-batches per step
    m_source: str
    v: int  # model chunks per stage
    ideal: float | None  # the schedule's ideal bubble at (p, mb, v); None when p or mb is unknown
    target_m: int
    ideal_target: float  # the ideal at target_m micro-batches (0 when p is unknown)
    waits: dict  # p2p_waits (empty without matched pairs)
    saving_ns: int


def measure(ctx: AnalysisContext) -> Measurement | None:
    """Bubble, p2p and idle time of the window, p / m / v and where they came from, the ideal bubble now and
    at target_m, and the matched send/recv waits; None when the rank runs no pipeline transfer."""
    if not is_pipeline(ctx.trace) or ctx.window_ns <= 0:
        return None
    cfg = ctx.config.section(ID)
    m = bubble_metrics(ctx)
    window = m["window_ns"]
    p, p_source = stages(ctx, cfg)
    mb = int(cfg["microbatches"]) if cfg.get("microbatches") else microbatches_from_ranges(ctx.trace.ranges,
                                                                                         cfg["microbatch_pattern"])
    m_source = "config" if cfg.get("microbatches") else ("range names" if mb else "unknown")
    v = max(int(cfg.get("virtual_stages") or 1), 1)
    bf = m["bubble_fraction"]
    ideal = ideal_bubble(p, mb, v) if (p >= 2 and mb) else None
    target_m = int(cfg["target_microbatches_per_stage"]) * p
    ideal_target = ideal_bubble(p, target_m, v) if p >= 2 else 0.0
    saving = int(max(0.0, bf - ideal_target) * window)
    pw = p2p_waits(ctx)
    if pw:
        m.update({k: pw[k] for k in ("p2p_pairs", "recv_wait_ns", "send_wait_ns")})
        m["recv_wait_fraction"] = pw["recv_wait_ns"] / window if window else 0.0
    metrics = {key: (round(val, 6) if isinstance(val, float) else val) for key, val in m.items()}
    metrics.update({"pipeline_stages": p if p >= 2 else None, "microbatches": mb, "virtual_stages": v,
                    "ideal_bubble_fraction": None if ideal is None else round(ideal, 6),
                    "excess_over_ideal": None if ideal is None else round(bf - ideal, 6),
                    "steps": int(len(ctx.window.steady))})
    return Measurement(m, metrics, p, p_source, mb, m_source, v, ideal, target_m, ideal_target, pw, saving)


def severity(ctx: AnalysisContext, m: Measurement) -> str:
    """high / medium on bubble_fraction by this analyzer's thresholds, else info (no "low" band: low = medium)."""
    cfg = ctx.config.section(ID)
    return severity_for(m.raw["bubble_fraction"], float(cfg["bubble_fraction_medium"]),
                        float(cfg["bubble_fraction_high"]), float(cfg["bubble_fraction_medium"]))


def _far_above(ctx, m: Measurement) -> bool:
    """Whether the measured bubble is at least far_above (fraction of the window) above the ideal."""
    return m.ideal is not None and m.raw["bubble_fraction"] - m.ideal >= float(ctx.config.section(ID)["far_above"])


def _advice(m: Measurement, far: bool) -> list[str]:
    """More micro-batches when the schedule is the limit; otherwise overlap, balance and the config to give."""
    p, mb, ideal, target_m, ideal_target, raw = m.p, m.mb, m.ideal, m.target_m, m.ideal_target, m.raw
    bf = raw["bubble_fraction"]
    rec = []
    if ideal is not None and not far and ideal >= 0.1:
        rec.append(f"The schedule itself is the limit: with {p} stages and {mb} micro-batch{'es' if mb != 1 else ''} "
                   f"the bubble cannot go below {ideal:.0%}. Split each batch into more micro-batches (m = {target_m} "
                   f"gives {ideal_target:.0%}), or use an interleaved schedule (v model chunks per stage divides the "
                   "bubble by about v).")
    if far or ideal is None:
        rec.append("Overlap the transfers with compute: post the receive of the next micro-batch before computing the "
                   "current one (isend/irecv or batch_isend_irecv instead of blocking send/recv), and keep sends "
                   "non-blocking.")
        if raw["p2p_fraction"] >= 0.1:
            rec.append(f"The GPU sits in send/recv kernels {raw['p2p_fraction']:.0%} of the window, mostly waiting for the "
                       "neighbouring stage: balance the stages (layers per stage, the embedding and loss on the first "
                       "and last stages) so that every stage takes the same time per micro-batch.")
        if ideal is None:
            rec.append("Give pipeline_stages / microbatches in the config (or name ranges microbatch_<j>) to compare "
                       "with the schedule's ideal.")
        elif mb is not None and mb < target_m:
            rec.append(f"More micro-batches also shrink the ideal ({ideal:.0%} now, {ideal_target:.0%} with m={target_m}).")
    if m.waits and raw["recv_wait_fraction"] >= 0.1:
        peers = ", ".join(str(r) for r in m.waits["recv_from"])
        rec.append(f"Its receives wait {raw['recv_wait_fraction']:.0%} of the window for rank {peers} to send (matched "
                   "send/recv pairs): that stage's work before each send is this rank's bubble.")
    if raw["idle_fraction"] >= 0.5 * bf and bf > 0:
        rec.append(f"{raw['idle_fraction']:.0%} of the window the GPU runs nothing at all (not even a send/recv): the host "
                   "is late too (see gpu_idle).")
    return rec


def _evidence(ctx, m: Measurement) -> dict:
    """The window, where p and m came from, the formula and the matched send/recv pairs."""
    evidence = {"window": ctx.window.describe(), "p_from": m.p_source, "m_from": m.m_source,
                "formula": "ideal = (p-1)/(v*m+p-1) (GPipe/1F1B v=1; interleaved 1F1B v>1)"}
    pw = m.waits
    if pw:
        def ranks(rs: list) -> str:
            return ", ".join(map(str, rs)) or "-"

        evidence["p2p_pairs"] = (f"{pw['p2p_pairs']} transfers matched across ranks (send and recv kernels "
                                 f"overlapping in time): receives from rank {ranks(pw['recv_from'])} waited "
                                 f"{pw['recv_wait_ns'] / 1e6:.1f} ms for the send, sends to rank {ranks(pw['send_to'])} "
                                 f"{pw['send_wait_ns'] / 1e6:.1f} ms for the receive")
    return evidence


def explain(ctx: AnalysisContext, m: Measurement, sev: str) -> Finding:
    """Title (the bubble, near or far above the ideal), the fixes and the evidence."""
    bf, window = m.raw["bubble_fraction"], m.raw["window_ns"]
    far = _far_above(ctx, m)
    title = f"Pipeline bubble {bf:.0%} of the steady-state window (no compute running)"
    if m.ideal is not None:
        title += (f", {'far above' if far else 'near'} the ideal {m.ideal:.0%} for p={m.p}, m={m.mb}"
                  + (f", v={m.v}" if m.v > 1 else ""))
    return Finding(analyzer=ID, severity=sev, title=title, metrics=m.metrics, estimated_saving_ns=m.saving_ns,
                   estimated_saving_fraction=round(m.saving_ns / window, 6) if window else 0.0,
                   recommendation=" ".join(_advice(m, far)), evidence=_evidence(ctx, m), rank=ctx.rank)


def analyze(ctx: AnalysisContext) -> list[Finding]:
    m = measure(ctx)
    return [] if m is None else [explain(ctx, m, severity(ctx, m))]


SPEC = AnalyzerSpec(ID, analyze, SETTINGS, evidence=(
    ("formula", "the ideal bubble formula used"),
    ("p_from", "where the number of stages came from"),
    ("m_from", "where the number of micro-batches came from"),
    ("window", "the steady-state window"),
    ("p2p_pairs", "send/recv pairs matched across ranks and how long each side waited for the other"),
))
