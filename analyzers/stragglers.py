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

This analyzer needs every rank at once: ``analyze_run(trace, config)``. Through the per-rank interface,
``analyze(ctx)`` runs it on the whole run (``ctx.run_trace``) once, from the context of the run's first
rank (the finding's rank is the slowest rank), and returns [] from the other ranks' contexts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gpudoctor.analyzers.config import severity_for
from gpudoctor.analyzers.findings import Finding
from gpudoctor.analyzers.nccl_dominated import comm_mask, intervals, overlap_ns, pipeline_p2p
from gpudoctor.model.steps import find_steps, union_ns

ID = "stragglers"

DEFAULTS = {
    "excess_fraction_medium": (0.10, "medium when the slowest rank's extra compute is this fraction of a step"),
    "excess_fraction_high": (0.25, "high at this fraction"),
    "min_excess_fraction": (0.02, "below this the ranks are balanced: no finding"),
}

COLUMNS = ["rank", "steps", "median_step_ns", "mean_step_ns", "compute_ns_per_step", "comm_ns_per_step",
           "exposed_comm_ns_per_step", "busy_fraction", "step_end_lag_ns", "window_start_ns", "window_end_ns",
           "window_source"]


def straggler_table(trace) -> pd.DataFrame:
    """Per-rank step times and where each rank's step time goes (see the module docstring)."""
    rows = []
    step_ends: dict[int, np.ndarray] = {}
    ranks = trace.rank_ids or [0]
    for r in ranks:
        t = trace.for_rank(r) if len(ranks) > 1 else trace
        if t.kernels.empty:
            continue
        w = find_steps(t.ranges, t.kernels)
        lo, hi = w.start_ns, w.end_ns
        steady = w.steady
        n = max(len(steady), 1)
        k = t.kernels
        k = k[(k["end_ns"].to_numpy() > lo) & (k["start_ns"].to_numpy() < hi)]
        cm = comm_mask(k)
        comm, comp, ov = overlap_ns(intervals(k, cm), intervals(k, ~cm), lo, hi)
        busy = union_ns(*intervals(k), lo, hi)
        dur = steady["duration_ns"].to_numpy(np.int64) if len(steady) else np.array([hi - lo], np.int64)
        step_ends[r] = steady["gpu_end_ns"].to_numpy(np.int64) if len(steady) else np.array([hi], np.int64)
        rows.append({"rank": int(r), "steps": int(len(steady)), "median_step_ns": int(np.median(dur)),
                     "mean_step_ns": int(dur.mean()), "compute_ns_per_step": int(comp / n),
                     "comm_ns_per_step": int(comm / n), "exposed_comm_ns_per_step": int((comm - ov) / n),
                     "busy_fraction": round(busy / (hi - lo), 6) if hi > lo else 0.0,
                     "step_end_lag_ns": 0, "window_start_ns": int(lo), "window_end_ns": int(hi),
                     "window_source": w.describe()})
    df = pd.DataFrame(rows, columns=COLUMNS)
    if len(step_ends) > 1:
        # Align steps by their position from the end (warm-up skipping may differ between ranks).
        m = min(len(v) for v in step_ends.values())
        if m:
            ends = np.stack([v[-m:] for v in step_ends.values()])
            lag = np.median(ends - ends.min(axis=0, keepdims=True), axis=1)
            df["step_end_lag_ns"] = [int(x) for x in lag]
    return df


def analyze_run(trace, config=None) -> list[Finding]:
    """The straggler finding of a multi-rank run ([] for one rank).

    ``config``: an analyzers Config, a dict ``{"stragglers.KEY": value}`` / ``{"KEY": value}``, or None.
    """
    if len(trace.rank_ids or [0]) < 2:
        return []  # nothing to compare: skip the per-rank table
    return findings_from_table(straggler_table(trace), config, trace)


def findings_from_table(tab: pd.DataFrame, config, trace) -> list[Finding]:
    """The straggler finding from a ready ``straggler_table`` (the parallel path builds the table from
    rows computed by its workers). ``trace`` answers only whether the run is a pipeline (pipeline_p2p)."""
    cfg = _settings(config)
    if len(tab) < 2:
        return []
    slow_i = int(tab["compute_ns_per_step"].to_numpy().argmax())
    slow = tab.iloc[slow_i]
    others = tab.drop(index=tab.index[slow_i])
    med_other = float(np.median(others["compute_ns_per_step"]))
    excess = float(slow["compute_ns_per_step"]) - med_other
    step = float(np.median(tab["median_step_ns"]))
    frac = excess / step if step > 0 else 0.0
    if frac < float(cfg["min_excess_fraction"]):
        return []
    waiters = others[others["exposed_comm_ns_per_step"] - float(slow["exposed_comm_ns_per_step"]) >= 0.5 * excess]
    # high / medium by this analyzer's thresholds, else info (no "low" band: low = medium)
    sev = severity_for(frac, float(cfg["excess_fraction_medium"]), float(cfg["excess_fraction_high"]),
                       float(cfg["excess_fraction_medium"]))
    steps = max(int(slow["steps"]), 1)
    saving = int(max(excess, 0.0) * steps)
    window = int(slow["window_end_ns"] - slow["window_start_ns"])
    rel = excess / med_other if med_other > 0 else float("inf")
    pipeline = pipeline_p2p(trace)
    what = "stage" if pipeline else "rank"
    title = (f"Rank {int(slow['rank'])} is the slowest {what}: {excess / 1e3:.0f} us more compute per step "
             f"({rel:.0%} over the median of the other ranks, {frac:.0%} of a step)")
    if len(waiters):
        title += f"; rank{'s' if len(waiters) > 1 else ''} {', '.join(str(int(r)) for r in waiters['rank'])} wait on it"
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
    return [Finding(analyzer=ID, severity=sev, title=title,
                    metrics={"slowest_rank": int(slow["rank"]), "excess_ns_per_step": int(excess),
                             "excess_fraction_of_step": round(frac, 6), "median_step_ns": int(step),
                             "waiting_ranks": [int(r) for r in waiters["rank"]],
                             "ranks": tab.drop(columns=["window_source"]).to_dict(orient="records")},
                    estimated_saving_ns=saving,
                    estimated_saving_fraction=round(saving / window, 6) if window > 0 else 0.0,
                    recommendation=rec,
                    evidence={"note": "compute = union of non-communication kernels; ranks share one clock",
                              "windows": {int(r["rank"]): r["window_source"] for _, r in tab.iterrows()}},
                    rank=int(slow["rank"]))]


def _settings(config) -> dict:
    out = {k: v for k, (v, _) in DEFAULTS.items()}
    if config is None:
        return out
    if isinstance(config, dict):
        src = {k.split(".", 1)[1] if k.startswith(ID + ".") else k: v for k, v in config.items()
               if "." not in k or k.startswith(ID + ".")}
    else:
        src = (getattr(config, "values", None) or {}).get(ID) or {}
    out.update({k: v for k, v in src.items() if v is not None})
    return out


def analyze(ctx) -> list[Finding]:
    run = getattr(ctx, "run_trace", None)
    if run is None:
        return []
    if ctx.rank != min(run.rank_ids or [0]):
        return []  # one finding per run, from its first rank
    return analyze_run(run, getattr(ctx, "config", None))
