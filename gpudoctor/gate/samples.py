"""Per-step samples and steady-step attribution totals of a run, computed from its trace: the ``gpu_time``,
``step_time`` and ``wall_time`` samples, per-kernel / per-range GPU time of the steady steps, and the
``gate`` block of analysis.json (gpudoctor.gate.run describes the metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gpudoctor.gate.environment import environment
from gpudoctor.gate.run import FINDING_METRICS, RunData, carriers, finding_dict
from gpudoctor.model.samples import rank_data
from gpudoctor.model.trace import Trace

if TYPE_CHECKING:
    from gpudoctor.analyzers.analysis import Analysis


def combine_steps(per_rank: list[np.ndarray | None], notes: list[str], metric: str) -> list[float] | None:
    vals = [v for v in per_rank if v is not None]
    if not vals or len(vals) < len(per_rank):
        return None
    if len(vals) > 1:
        if len({len(v) for v in vals}) == 1 and len(vals[0]):
            return [float(x) for x in np.max(np.vstack(vals), axis=0)]
        notes.append(f"{metric}: ranks have different numbers of steady steps; their steps are pooled")
    return [float(x) for v in vals for x in v]



def run_from_trace(trace: Trace, ranks: list, findings: list, label: str, source: str = "trace",
                   rank_samples: dict | None = None) -> RunData:
    """A RunData from an analyzed trace (``ranks``: its RankSummary list).

    ``rank_samples``: rank -> ``rank_data`` already computed elsewhere (the parallel path computes it on the
    worker that held the rank's events); ranks missing from it are computed from ``trace``.
    """
    per_rank = []
    run = RunData(label=label, source=source, env=environment(trace), findings=[finding_dict(f) for f in findings])
    multi = len(trace.rank_ids) > 1
    rank_samples = rank_samples or {}
    for rs in ranks:
        if rs.rank in rank_samples:
            per_rank.append(rank_samples[rs.rank])
        else:
            per_rank.append(rank_data(trace.for_rank(rs.rank) if multi else trace, rs.window))
        run.windows.append(f"rank {rs.rank}: {rs.window.describe()}")
    for metric in ("gpu_time", "step_time", "wall_time"):
        v = combine_steps([p[metric] for p in per_rank], run.notes, metric)
        if v is not None:
            run.samples[metric] = v
    run.steps = int(sum(p["n"] for p in per_rank))
    if per_rank:
        kern = pd.concat([p["kernels"] for p in per_rank], ignore_index=True)
        run.kernels = kern.groupby(["name", "category"], sort=False).agg(
            total_ns=("total_ns", "sum"), count=("count", "sum")).reset_index()
        rng = pd.concat([p["ranges"] for p in per_rank], ignore_index=True)
        if len(rng):
            run.ranges = rng.groupby("text", sort=False).agg(total_ns=("total_ns", "sum"), count=("count", "sum")).reset_index()
    # Per-rank values from the summary and the findings.
    idle = {rs.rank: 1.0 - float(rs.gpu_busy_fraction) for rs in ranks}
    scal: dict[str, dict] = {"idle_fraction": idle, "exposed_comm_fraction": {}, "mbu": {}}
    for key in FINDING_METRICS:
        for f in carriers(run.findings, key):
            scal[key][f.get("rank") if f.get("rank") is not None else -1] = float(f["metrics"][key])
    comm = run.kernels[run.kernels["category"] == "communication"]["total_ns"].sum() if len(run.kernels) else 0
    if not scal["exposed_comm_fraction"] and comm == 0 and len(run.kernels):
        scal["exposed_comm_fraction"] = {rs.rank: 0.0 for rs in ranks}
        run.notes.append("exposed_comm_fraction: no communication kernels, taken as 0")
    for key, vals in scal.items():
        if vals:
            run.samples[key] = [float(v) for _, v in sorted(vals.items(), key=lambda kv: (kv[0] is None, kv[0]))]
    return run



def gate_block(analysis: Analysis) -> dict:
    """The ``gate`` block of analysis.json for an Analysis: what the gate needs to compare this run later
    without the trace, a few KB, assembled from the per-rank samples the analysis computed."""
    run = run_from_trace(analysis.trace, analysis.ranks, [], label="", source="analysis_json",
                         rank_samples=analysis.gate_samples)
    d = run.to_dict()
    d.pop("label", None)
    return d
