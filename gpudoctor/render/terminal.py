"""The terminal summary: per rank, then findings ranked by the time they cost.

In a terminal the width is the terminal's; elsewhere (CI logs, pipes) 120 columns, or ``COLUMNS``.
Paragraphs are wrapped here, between words and never inside a value ("632 us", "12.5%"), with their
indentation kept on every line; rich only prints them. ``--no-color`` and ``NO_COLOR`` turn colors off.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from typing import IO, TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gpudoctor.render.fmt import metric_text, ns, pct, short, unknown_sources

if TYPE_CHECKING:
    from gpudoctor.analyzers.analysis import Analysis

SEVERITY_STYLE = {"high": "bold red", "medium": "yellow", "low": "cyan", "info": "dim"}
PIPE_WIDTH = 120
_NBSP = "\u00a0"
# a number and its unit (or an arrow between values) stay on one line
_KEEP = re.compile(r"(?<=\d) (?=(?:ns|us|µs|ms|s|%|GB|GiB|MB|MiB|KB|KiB|B|W|MHz|GB/s|TB/s|TFLOP/s|FLOP/B|x)\b)|(?<=\d) (?=->|→)|(?<=->) |(?<=→) |(?<=--set) ")


def make_console(no_color: bool = False, file: IO[str] | None = None) -> Console:
    """A console for the summary: the terminal's width on a TTY, else ``COLUMNS`` or 120 columns."""
    out = file or sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    width = None
    if not tty:
        cols = os.environ.get("COLUMNS", "")
        width = int(cols) if cols.isdigit() and int(cols) >= 40 else PIPE_WIDTH
    plain = no_color or bool(os.environ.get("NO_COLOR"))
    # color_system=None: no escape codes at all (no_color alone still writes bold)
    return Console(file=out, width=width, no_color=plain, highlight=False, soft_wrap=False,
                   **({"color_system": None} if plain else {}))


def paragraph(text: str, width: int, indent: str = "", first: str | None = None) -> str:
    """``text`` wrapped to ``width`` between words (never inside a number and its unit), every line
    indented by ``indent`` (the first by ``first`` when given)."""
    protected = _KEEP.sub(_NBSP, text)
    wrapped = textwrap.fill(protected, width=max(width, 40), initial_indent=indent if first is None else first,
                            subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
    return wrapped.replace(_NBSP, " ")


def _say(c: Console, text: str, indent: str = "", first: str | None = None, style: str | None = None) -> None:
    """One wrapped paragraph, printed as plain text (titles may hold square brackets: no markup)."""
    c.print(Text(paragraph(text, c.width, indent, first), style=style or ""), soft_wrap=True)


def render(analysis: Analysis, console: Console | None = None, top: int = 8, verbose: bool = False) -> None:
    c = console or make_console()
    for r in analysis.ranks:
        w = r.window
        c.print(Text(f"\nrank {r.rank}", style="bold") + Text(f"  {r.device or 'unknown device'}"), soft_wrap=True)
        _say(c, f"steady-state window: {ns(w.duration_ns)} ({w.describe()})", "  ")
        _say(c, f"GPU busy: {pct(r.gpu_busy_fraction)}   kernels: {r.steady_kernel_count} in window, "
                f"{r.kernel_count} in trace"
                + (f", {r.profiled_kernel_count} profiled by Nsight Compute" if r.profiled_kernel_count else ""), "  ")
        if r.samples:
            s = r.samples
            parts = [f"{k.replace('_pct', '')} {s[k]:.0f}%" for k in ("gpu_util_pct", "sm_util_pct", "tensor_util_pct",
                                                                       "dram_bw_util_pct") if k in s]
            if "power_w" in s:
                parts.append(f"power {s['power_w']:.0f} W")
            if "mem_used_bytes_max" in s:
                parts.append(f"memory used max {s['mem_used_bytes_max'] / 2**30:.1f} GiB")
            _say(c, f"NVML ({s.get('samples', 0)} samples): " + ", ".join(parts), "    ", "  ")
        if r.gpu_metrics:
            _say(c, "GPU metrics (window mean): " + ", ".join(
                f"{k.replace('_fraction', '').replace('_', ' ')} {v:.0%}" for k, v in r.gpu_metrics.items()), "    ", "  ")
        if len(r.category_time):
            cats = ", ".join(f"{k} {pct(f)}" for k, f in zip(r.category_time["category"], r.category_time["window_fraction"]))
            _say(c, f"time by category: {cats}", "    ", "  ")
        if len(r.top_kernels):
            t = Table(box=None, pad_edge=False, show_edge=False, padding=(0, 1))
            for col, just in (("time", "right"), ("%", "right"), ("count", "right"), ("mean", "right"),
                              ("category", "left"), ("kernel", "left")):
                t.add_column(col, justify=just, no_wrap=col != "kernel", overflow="fold")
            for row in r.top_kernels.head(top).itertuples():
                t.add_row(ns(row.total_ns), pct(row.window_fraction), str(row.count), ns(row.mean_ns), row.category,
                          short(row.name, 80))
            c.print("  top kernels:")
            c.print(t)
        if len(r.range_time):
            rngs = ", ".join(f"{short(x, 30)} {ns(g)}" for x, g in zip(r.range_time["text"].head(6), r.range_time["gpu_ns"].head(6)))
            _say(c, f"ranges on the GPU: {rngs}", "    ", "  ")
    findings = sorted(analysis.findings, key=lambda f: (-f.estimated_saving_ns, -f.severity_rank))
    hidden = 0 if verbose else sum(f.severity == "info" for f in findings)
    if not verbose:  # info findings say "nothing to do"; they stay in --json
        findings = [f for f in findings if f.severity != "info"]
    c.print(Text("\nfindings", style="bold") + Text(f" ({len(findings)})" if findings else ": none"), soft_wrap=True)
    for f in findings:
        style = SEVERITY_STYLE.get(f.severity, "")
        where = f" rank {f.rank}" if f.rank is not None and len(analysis.ranks) > 1 else ""
        saving = (f"  saves ~{ns(f.estimated_saving_ns)} ({pct(f.estimated_saving_fraction)} of window)"
                  .replace(" ", _NBSP).replace(_NBSP * 2, "  ", 1) if f.estimated_saving_ns else "")  # one phrase
        head = f"{f.severity.upper():6} "
        body = paragraph(f"{head}{f.analyzer}{where}: {f.title}{saving}", c.width, " " * 8, "")
        line = Text(body)
        line.stylize(style, 0, len(f.severity))
        c.print(line, soft_wrap=True)
        if f.metrics:
            shown = list(f.metrics.items())[:6]
            _say(c, ", ".join(f"{k}={ns(v) if k.endswith('_ns') and metric_text(v) != 'unknown' else metric_text(v)}"
                              for k, v in shown), " " * 8)
            why = unknown_sources(f.analyzer, [k for k, v in shown if metric_text(v) == "unknown"])
            if why:
                _say(c, f"unknown: {why}", " " * 10, " " * 8, style="dim")
        if f.recommendation:
            _say(c, f"fix: {f.recommendation}", " " * 13, " " * 8)
    if hidden:
        _say(c, f"({hidden} info findings not shown: --verbose shows them)", "  ")
    dropped = analysis.dropped
    if dropped:
        c.print(Text("\nevents not placed", style="bold") + Text(" (kept in counts, never silently dropped):"), soft_wrap=True)
        for reason, n in dropped.items():
            _say(c, f"{n:>8}  {reason}", " " * 12, "  ")
