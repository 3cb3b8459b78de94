"""The gate's comparison of two analyzed runs, for views that hold analyses rather than run files (the
dashboard's Compare page): the same numbers and the same kernel names as ``gpudoctor gate``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from gpudoctor.gate.compare import GateOptions, GateResult, compare
from gpudoctor.gate.samples import run_from_trace

if TYPE_CHECKING:
    from gpudoctor.analyzers.analysis import Analysis
    from gpudoctor.gate.run import RunData

KERNEL_COLUMNS = ["kernel", "category", "status", "us_per_step_a", "us_per_step_b", "diff_us", "diff_pct",
                  "count_per_step_a", "count_per_step_b"]


def run_of(analysis: Analysis, label: str) -> RunData:
    """The gate's RunData of an analysis (pipeline.Analysis)."""
    return run_from_trace(analysis.trace, analysis.ranks, analysis.findings, label,
                          rank_samples=getattr(analysis, "gate_samples", None))


def compare_analyses(a: Analysis, b: Analysis, label_a: str = "A", label_b: str = "B",
                     options: GateOptions | None = None) -> GateResult:
    """``gpudoctor gate --baseline A --candidate B`` on two analyses, every kernel attributed."""
    o = options or GateOptions(top=100_000)
    return compare([run_of(a, label_a)], [run_of(b, label_b)], o)


def kernel_table(result: GateResult) -> pd.DataFrame:
    """Per kernel: time per step in A (baseline) and B (candidate), in microseconds, as the gate attributes it."""
    rows = result.attribution.get("kernels") or []
    if not rows:
        return pd.DataFrame(columns=KERNEL_COLUMNS)
    k = pd.DataFrame(rows)
    a, b = k["baseline_ns_per_step"] / 1e3, k["candidate_ns_per_step"] / 1e3
    out = pd.DataFrame({
        "kernel": k["name"], "category": k["category"], "status": k["status"],
        "us_per_step_a": a, "us_per_step_b": b, "diff_us": b - a,
        "diff_pct": (100 * (b - a) / a.where(a > 0)),
        "count_per_step_a": k["baseline_count_per_step"], "count_per_step_b": k["candidate_count_per_step"]})
    out = out.reindex(out["diff_us"].abs().sort_values(ascending=False, kind="stable").index)
    return out.round({"us_per_step_a": 2, "us_per_step_b": 2, "diff_us": 2, "diff_pct": 1}).reset_index(drop=True)
