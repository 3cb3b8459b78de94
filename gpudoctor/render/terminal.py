"""The terminal summary: per rank, then findings ranked by the time they cost."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from gpudoctor.render.fmt import metric, ns, pct, short

SEVERITY_STYLE = {"high": "bold red", "medium": "yellow", "low": "cyan", "info": "dim"}


def render(analysis, console: Console | None = None, top: int = 8, verbose: bool = False) -> None:
    console = console or Console()
    for r in analysis.ranks:
        w = r.window
        console.print(f"\n[bold]rank {r.rank}[/bold]  {r.device or 'unknown device'}", highlight=False)
        console.print(f"  steady-state window: {ns(w.duration_ns)} ({w.describe()})", highlight=False)
        console.print(f"  GPU busy: {pct(r.gpu_busy_fraction)}   kernels: {r.steady_kernel_count} in window, "
                      f"{r.kernel_count} in trace"
                      + (f", {r.profiled_kernel_count} profiled by Nsight Compute" if r.profiled_kernel_count else ""),
                      highlight=False)
        if r.samples:
            s = r.samples
            parts = [f"{k.replace('_pct', '')} {s[k]:.0f}%" for k in ("gpu_util_pct", "sm_util_pct", "tensor_util_pct",
                                                                       "dram_bw_util_pct") if k in s]
            if "power_w" in s:
                parts.append(f"power {s['power_w']:.0f} W")
            if "mem_used_bytes_max" in s:
                parts.append(f"memory used max {s['mem_used_bytes_max'] / 2**30:.1f} GiB")
            console.print(f"  NVML ({s.get('samples', 0)} samples): " + ", ".join(parts), highlight=False)
        if r.gpu_metrics:
            console.print("  GPU metrics (window mean): " + ", ".join(
                f"{k.replace('_fraction', '').replace('_', ' ')} {v:.0%}" for k, v in r.gpu_metrics.items()), highlight=False)
        if len(r.category_time):
            cats = "  ".join(f"{c} {pct(f)}" for c, f in zip(r.category_time["category"], r.category_time["window_fraction"]))
            console.print(f"  time by category: {cats}", highlight=False)
        if len(r.top_kernels):
            t = Table(box=None, pad_edge=False, show_edge=False, padding=(0, 1))
            for col, just in (("time", "right"), ("%", "right"), ("count", "right"), ("mean", "right"),
                              ("category", "left"), ("kernel", "left")):
                t.add_column(col, justify=just)
            for row in r.top_kernels.head(top).itertuples():
                t.add_row(ns(row.total_ns), pct(row.window_fraction), str(row.count), ns(row.mean_ns), row.category,
                          short(row.name, 80))
            console.print("  top kernels:")
            console.print(t)
        if len(r.range_time):
            rngs = ", ".join(f"{short(x, 30)} {ns(g)}" for x, g in zip(r.range_time["text"].head(6), r.range_time["gpu_ns"].head(6)))
            console.print(f"  ranges on the GPU: {rngs}", highlight=False)
    findings = sorted(analysis.findings, key=lambda f: (-f.estimated_saving_ns, -f.severity_rank))
    hidden = 0 if verbose else sum(f.severity == "info" for f in findings)
    if not verbose:  # info findings say "nothing to do"; they stay in --json
        findings = [f for f in findings if f.severity != "info"]
    console.print(f"\n[bold]findings[/bold] ({len(findings)})" if findings else "\n[bold]findings[/bold]: none")
    for f in findings:
        style = SEVERITY_STYLE.get(f.severity, "")
        where = f" rank {f.rank}" if f.rank is not None and len(analysis.ranks) > 1 else ""
        saving = f"  saves ~{ns(f.estimated_saving_ns)} ({pct(f.estimated_saving_fraction)} of window)" if f.estimated_saving_ns else ""
        console.print(f"[{style}]{f.severity.upper():6}[/{style}] {f.analyzer}{where}: {f.title}{saving}", highlight=False)
        if f.metrics:
            console.print("        " + ", ".join(f"{k}={metric(v)}" for k, v in list(f.metrics.items())[:6]), highlight=False)
        if f.recommendation:
            console.print(f"        fix: {f.recommendation}", highlight=False)
    if hidden:
        console.print(f"  ({hidden} info findings not shown: --verbose shows them)", highlight=False)
    dropped = analysis.dropped
    if dropped:
        console.print("\n[bold]events not placed[/bold] (kept in counts, never silently dropped):")
        for reason, n in dropped.items():
            console.print(f"  {n:>8}  {reason}", highlight=False)
