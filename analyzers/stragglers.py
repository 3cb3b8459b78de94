"""stragglers: which rank is slowest, by how much, and which ranks wait on it.

``straggler_table(trace) -> DataFrame``: one row per rank, from each rank's steady-state window (all ranks
share one clock: the readers align every input to UTC epoch nanoseconds):

    rank, steps, median_step_ns, mean_step_ns, compute_ns_per_step (union of non-communication kernels),
    comm_ns_per_step (union of communication kernels), exposed_comm_ns_per_step (communication with no
    compute running: mostly waiting inside collectives for the other ranks), busy_fraction,
    step_end_lag_ns (median, over step indices all ranks have, of how much later this rank's step ends
    than the earliest rank's), window_start_ns, window_end_ns.

In synchronous data/tensor parallelism every rank's step takes the same time: the slow rank is the one
with the most compute per step, and the others show its excess as extra time inside collectives. In a
pipeline (send/recv kernels) the same numbers describe unbalanced stages. The
finding names the slowest rank (most compute per step), its excess over the median of the other ranks,
and the ranks that wait on it (exposed communication per step at least half that excess above the
slowest rank's own). Severity on excess / median step time: high >= excess_fraction_high (0.25), medium
>= excess_fraction_medium (0.10), else info. estimated_saving_ns: the excess per step times the steady steps.

This analyzer needs every rank at once: ``analyze_run(trace, settings)``. Through the per-rank interface,
``analyze(ctx)`` runs it on the whole run (``ctx.run_trace``, with the steady-state windows already found for
every rank) once, from the context of the run's first rank (the finding's rank is the slowest rank), and
returns [] from the other ranks' contexts. In steps: ``straggler_table`` measures each rank,
``measure`` finds the slowest rank and its excess, ``severity`` grades it, ``explain`` words the finding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gpudoctor.analyzers.findings import Finding, severity_for
from gpudoctor.analyzers.nccl_dominated import comm_mask, intervals, overlap_ns, pipeline_p2p
from gpudoctor.analyzers.spec import AnalyzerSpec, fraction
from gpudoctor.model.steps import StepWindow, find_steps, union_ns
from gpudoctor.model.trace import Trace

if TYPE_CHECKING:
    from gpudoctor.analyzers.context import AnalysisContext


ID = "stragglers"

SETTINGS = (
    fraction("excess_fraction_medium", 0.10, "medium when the slowest rank's extra compute is this fraction of a step"),
    fraction("excess_fraction_high", 0.25, "high at this fraction"),
    fraction("min_excess_fraction", 0.02, "below this the ranks are balanced: no finding"),
)

COLUMNS = ["rank", "steps", "median_step_ns", "mean_step_ns", "compute_ns_per_step", "comm_ns_per_step",
           "exposed_comm_ns_per_step", "busy_fraction", "step_end_lag_ns", "window_start_ns", "window_end_ns",
           "window_source"]


def rank_row(t: Trace, rank: int, w: StepWindow) -> tuple[dict, np.ndarray]:
    """One rank's row of the table (step_end_lag_ns still 0) and its steady steps' GPU end times."""
    lo, hi = w.start_ns, w.end_ns
    steady = w.steady
    n = max(len(steady), 1)
    k = t.kernels
    k = k[(k["end_ns"].to_numpy() > lo) & (k["start_ns"].to_numpy() < hi)]
    cm = comm_mask(k)
    comm, comp, ov = overlap_ns(intervals(k, cm), intervals(k, ~cm), lo, hi)
    busy = union_ns(*intervals(k), lo, hi)
    dur = steady["duration_ns"].to_numpy(np.int64) if len(steady) else np.array([hi - lo], np.int64)
    ends = steady["gpu_end_ns"].to_numpy(np.int64) if len(steady) else np.array([hi], np.int64)
    row = {"rank": int(rank), "steps": int(len(steady)), "median_step_ns": int(np.median(dur)),
           "mean_step_ns": int(dur.mean()), "compute_ns_per_step": int(comp / n),
           "comm_ns_per_step": int(comm / n), "exposed_comm_ns_per_step": int((comm - ov) / n),
           "busy_fraction": round(busy / (hi - lo), 6) if hi > lo else 0.0,
           "step_end_lag_ns": 0, "window_start_ns": int(lo), "window_end_ns": int(hi),
           "window_source": w.describe()}
    return row, ends


def with_step_end_lag(tab: pd.DataFrame, step_ends: dict[int, np.ndarray]) -> pd.DataFrame:
    """Fill step_end_lag_ns: steps aligned by their position from the end (warm-up skipping may differ
    between ranks), the median of how much later each rank's step ends than the earliest rank's."""
    if len(step_ends) > 1:
        m = min(len(step_ends[r]) for r in tab["rank"])
        if m:
            ends = np.stack([step_ends[r][-m:] for r in tab["rank"]])
            lag = np.median(ends - ends.min(axis=0, keepdims=True), axis=1)
            tab["step_end_lag_ns"] = [int(x) for x in lag]
    return tab


def straggler_table(trace: Trace, windows: dict[int, StepWindow] | None = None) -> pd.DataFrame:
    """Per-rank step times and where each rank's step time goes (see the module docstring). ``windows``:
    the ranks' steady-state windows when already found (else found here)."""
    rows, step_ends = [], {}
    ranks = trace.rank_ids or [0]
    for r in ranks:
        t = trace.for_rank(r) if len(ranks) > 1 else trace
        if t.kernels.empty:
            continue
        w = (windows or {}).get(r) or find_steps(t.ranges, t.kernels)
        row, step_ends[r] = rank_row(t, r, w)
        rows.append(row)
    return with_step_end_lag(pd.DataFrame(rows, columns=COLUMNS), step_ends)


def settings_with(overrides: dict | None = None) -> dict:
    """This analyzer's defaults with ``overrides`` (key -> value) applied."""
    out = {s.key: s.default for s in SETTINGS}
    out.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return out


def analyze_run(trace: Trace, settings: dict | None = None,
                windows: dict[int, StepWindow] | None = None) -> list[Finding]:
    """The straggler finding of a multi-rank run ([] for one rank). ``settings``: key -> value overrides."""
    if len(trace.rank_ids or [0]) < 2:
        return []  # nothing to compare: skip the per-rank table
    return findings_from_table(straggler_table(trace, windows), settings, trace)


def measure(tab: pd.DataFrame) -> dict:
    """The slowest rank (most compute per step), its excess over the median of the others, and who waits."""
    slow_i = int(tab["compute_ns_per_step"].to_numpy().argmax())
    slow = tab.iloc[slow_i]
    others = tab.drop(index=tab.index[slow_i])
    med_other = float(np.median(others["compute_ns_per_step"]))
    excess = float(slow["compute_ns_per_step"]) - med_other
    step = float(np.median(tab["median_step_ns"]))
    waiters = others[others["exposed_comm_ns_per_step"] - float(slow["exposed_comm_ns_per_step"]) >= 0.5 * excess]
    return {"slow": slow, "median_other_ns": med_other, "excess_ns": excess, "median_step_ns": step,
            "excess_fraction": excess / step if step > 0 else 0.0, "waiters": [int(r) for r in waiters["rank"]]}


def severity(m: dict, cfg: dict) -> str:
    """high / medium by this analyzer's thresholds, else info (no "low" band: low = medium)."""
    return severity_for(m["excess_fraction"], float(cfg["excess_fraction_medium"]), float(cfg["excess_fraction_high"]),
                        float(cfg["excess_fraction_medium"]))


def explain(m: dict, tab: pd.DataFrame, sev: str, pipeline: bool) -> Finding:
    slow, excess, frac, waiters = m["slow"], m["excess_ns"], m["excess_fraction"], m["waiters"]
    med_other = m["median_other_ns"]
    steps = max(int(slow["steps"]), 1)
    saving = int(max(excess, 0.0) * steps)
    window = int(slow["window_end_ns"] - slow["window_start_ns"])
    rel = excess / med_other if med_other > 0 else float("inf")
    what = "stage" if pipeline else "rank"
    title = (f"Rank {int(slow['rank'])} is the slowest {what}: {excess / 1e3:.0f} us more compute per step "
             f"({rel:.0%} over the median of the other ranks, {frac:.0%} of a step)")
    if waiters:
        title += f"; rank{'s' if len(waiters) > 1 else ''} {', '.join(str(r) for r in waiters)} wait on it"
    if pipeline:
        rec = (f"Pipeline stages are unbalanced: stage rank {int(slow['rank'])} computes longest and the other stages "
               "wait for it in send/recv. Move layers from it to the others (count the embedding, the output "
               "projection and the loss, which sit on the first and last stages), or give it fewer layers in an "
               "interleaved schedule.")
    else:
        rec = (f"Find why rank {int(slow['rank'])} computes longer: uneven data (sequence lengths, padding, a larger "
               "shard), an extra task on that rank only (logging, evaluation, checkpointing on rank 0), a slower or "
               "throttled GPU (nvidia-smi -q -d PERFORMANCE,CLOCK: power/thermal slowdown), or a noisy neighbour on "
               "its host. Balance the work (bucket samples by length, move rank-0 chores off the critical path); the "
               "other ranks' extra time inside collectives is this wait.")
    return Finding(analyzer=ID, severity=sev, title=title,
                   metrics={"slowest_rank": int(slow["rank"]), "excess_ns_per_step": int(excess),
                            "excess_fraction_of_step": round(frac, 6), "median_step_ns": int(m["median_step_ns"]),
                            "waiting_ranks": waiters,
                            "ranks": tab.drop(columns=["window_source"]).to_dict(orient="records")},
                   estimated_saving_ns=saving,
                   estimated_saving_fraction=round(saving / window, 6) if window > 0 else 0.0,
                   recommendation=rec,
                   evidence={"note": "compute = union of non-communication kernels; ranks share one clock",
                             "windows": dict(zip(tab["rank"].astype(int).tolist(), tab["window_source"].tolist()))},
                   rank=int(slow["rank"]))


def findings_from_table(tab: pd.DataFrame, settings: dict | None, trace: Trace) -> list[Finding]:
    """The straggler finding from a ready ``straggler_table`` (the parallel path builds the table from
    rows computed by its workers). ``trace`` answers only whether the run is a pipeline (pipeline_p2p)."""
    cfg = settings_with(settings)
    if len(tab) < 2:
        return []
    m = measure(tab)
    if m["excess_fraction"] < float(cfg["min_excess_fraction"]):
        return []
    return [explain(m, tab, severity(m, cfg), pipeline_p2p(trace))]


def analyze(ctx: AnalysisContext) -> list[Finding]:
    run = ctx.run_trace
    if run is None or ctx.rank != min(run.rank_ids or [0]):
        return []  # one finding per run, from its first rank
    return analyze_run(run, ctx.config.section(ID), ctx.run_windows)


SPEC = AnalyzerSpec(ID, analyze, SETTINGS, cross_rank=True, evidence=(
    ("note", "how compute and communication were measured"),
    ("windows", "each rank's steady-state window"),
))
