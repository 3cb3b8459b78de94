"""A Markdown report (CI job summaries, pull requests)."""

from __future__ import annotations

from gpudoctor.analyzers.analysis import Analysis
from gpudoctor.render.fmt import metric, ns, pct, short


def render(analysis: Analysis) -> str:
    out = ["# gpudoctor analysis", ""]
    out.append("Inputs: " + ", ".join(f"`{i.get('path')}`" for i in analysis.inputs))
    for e in analysis.errors:
        out.append(f"\n> error: {e}")
    for r in analysis.ranks:
        out += ["", f"## Rank {r.rank}: {r.device}", "",
                f"- Steady-state window: {ns(r.window.duration_ns)} ({r.window.describe()})",
                f"- GPU busy: {pct(r.gpu_busy_fraction)}; kernels: {r.steady_kernel_count} in window, {r.kernel_count} in trace"
                + (f", {r.profiled_kernel_count} profiled by Nsight Compute" if r.profiled_kernel_count else "")]
        if len(r.category_time):
            out.append("- Time by category: " + ", ".join(
                f"{c} {pct(f)}" for c, f in zip(r.category_time["category"], r.category_time["window_fraction"])))
        if len(r.top_kernels):
            out += ["", "| time | % of window | count | category | kernel |", "|---:|---:|---:|---|---|"]
            for row in r.top_kernels.itertuples():
                out.append(f"| {ns(row.total_ns)} | {pct(row.window_fraction)} | {row.count} | {row.category} | "
                           f"`{short(row.name, 90).replace('|', '/')}` |")
    findings = analysis.findings  # in the analysis' order (analyzers.runner.sort_findings)
    out += ["", "## Findings", ""]
    if not findings:
        out.append("None.")
    for f in findings:
        where = f" (rank {f.rank})" if f.rank is not None else ""
        out.append(f"### {f.severity.upper()}: {f.title}{where}")
        out.append(f"- analyzer: `{f.analyzer}`; estimated saving {ns(f.estimated_saving_ns)} "
                   f"({pct(f.estimated_saving_fraction)} of the window)")
        if f.metrics:
            out.append("- metrics: " + ", ".join(f"`{k}`={metric(v)}" for k, v in f.metrics.items()))
        for fr in f.evidence.get("frames", []):  # user-code lines charged with the finding's time
            out.append(f"- at `{fr['file']}:{fr['line']}` in `{fr['function']}`"
                       + (f" -> `{fr['callee']}`" if fr.get("callee") else "")
                       + f": {ns(fr['idle_ns_per_step'])} per step ({pct(fr['step_fraction'])} of the step), {fr['kind']}"
                       + (f"; out of the loop it saves up to {ns(fr['saving_ns_per_step'])} per step"
                          if fr.get("saving_ns_per_step") is not None else ""))
        if f.recommendation:
            out.append(f"- fix: {f.recommendation}")
        out.append("")
    if analysis.dropped:
        out += ["## Events not placed", ""] + [f"- {n} {reason}" for reason, n in analysis.dropped.items()]
    return "\n".join(out) + "\n"
