"""One self-contained HTML report of a run: overview, findings with evidence, and the main figures.

Plotly.js is inlined once in the page head; every figure is a div plus a ``Plotly.newPlot`` call, so the
file opens offline and can be attached to a CI run or an issue. Written atomically (temp file in the
target's directory, fsync, rename): a reader never sees half a report.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from gpudoctor import __version__
from gpudoctor.dashboards import figures as F
from gpudoctor.dashboards.timeline import TimelineIndex
from gpudoctor.model import stats
from gpudoctor.render import summaries as S

if TYPE_CHECKING:
    from gpudoctor.analyzers.analysis import Analysis


MAX_EVIDENCE_FIGURES = 5  # findings (largest saving first) whose example gets its own timeline

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1280px;color:#111827;padding:0 16px}
h1{margin-bottom:4px} .muted{color:#6b7280;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 16px;width:100%}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top}
td{overflow-wrap:break-word} td.num{white-space:nowrap;overflow-wrap:normal}
th{background:#f3f4f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
.sev-high{color:#b91c1c;font-weight:700}.sev-medium{color:#c2410c;font-weight:700}.sev-low{color:#a16207}.sev-info{color:#6b7280}
details pre{background:#f9fafb;border:1px solid #e5e7eb;padding:8px;max-height:320px;overflow:auto;font-size:12px}
section{margin:28px 0}
"""


def _table_html(df: pd.DataFrame, max_rows: int | None = None, classes: dict[str, callable] | None = None) -> str:
    if df.empty:
        return "<p class='muted'>none</p>"
    d = df.head(max_rows) if max_rows else df
    cols = [c for c in d.columns if not str(c).startswith("_")]
    out = ["<table><thead><tr>", *[f"<th>{_breakable(str(c))}</th>" for c in cols], "</tr></thead><tbody>"]
    for row in d[cols].itertuples(index=False, name=None):
        out.append("<tr>")
        for c, v in zip(cols, row):
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cls = (classes or {}).get(c)
            klass = " ".join(x for x in ("num" if num else "", cls(v) if cls else "") if x)
            text = "" if v is None or (isinstance(v, float) and v != v) else str(v)
            out.append(f"<td{f' class={chr(34)}{klass}{chr(34)}' if klass else ''}>{_breakable(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if max_rows and len(df) > max_rows:
        out.append(f"<p class='muted'>{len(df) - max_rows} more rows not shown</p>")
    return "".join(out)


def _breakable(text: str) -> str:
    """Escaped ``text`` that may break after ``_ , ( : <`` (long kernel names and shapes wrap there, not
    inside a word, and never widen the page)."""
    return re.sub(r"(_|,|\(|::|&lt;)", r"\1<wbr>", html.escape(text))


def _figure_html(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def build_report(analysis: Analysis, name: str, ceilings: dict | None = None) -> str:
    """The report of one analyzed run as one HTML string (plotly.js inlined once)."""
    from plotly.offline import get_plotlyjs

    a = analysis
    esc = html.escape
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts: list[str] = [f"<h1>gpudoctor report — {esc(name)}</h1>",
                        f"<div class='muted'>gpudoctor {esc(__version__)} · {esc(when)} · inputs: "
                        f"{esc(', '.join(str(i.get('path', '')) for i in a.inputs))}</div>"]
    for e in a.errors:
        parts.append(f"<p class='sev-high'>error: {esc(e)}</p>")
    if a.dropped:
        parts.append(f"<p class='muted'>dropped events: {esc(', '.join(f'{k}: {v}' for k, v in a.dropped.items()))}</p>")
    index = TimelineIndex.from_trace(a.trace)
    parts += _findings_section(a, index)
    parts += ["<section id='ranks'><h2>Ranks</h2>", _table_html(F.rank_frame(a)),
              _figure_html(F.category_figure(a), "fig-category"), "</section>"]
    parts += _timeline_section(a, index)
    parts += _summaries_section(a)
    parts += _kernels_section(a)
    parts += _hardware_sections(a, ceilings)
    head = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>gpudoctor report — {esc(name)}</title>"
            f"<style>{_CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>")
    return head + "\n".join(parts) + "</body></html>"


def _findings_section(a: Analysis, index: TimelineIndex) -> list[str]:
    """Findings, each with the timeline zoomed to the example that carries most of its saving."""
    esc = html.escape
    parts: list[str] = []
    # findings, each with the timeline zoomed to the example that carries most of its saving
    fdf = F.findings_frame(a)
    parts.append(f"<section id='findings'><h2>Findings ({len(fdf)})</h2>")
    parts.append(_table_html(fdf.drop(columns=["idx", "recommendation"]), classes={"severity": lambda v: f"sev-{v}"}))
    shown = 0
    for _, row in fdf.iterrows():
        f = a.findings[int(row["idx"])]
        parts.append(f"<details{' open' if shown < MAX_EVIDENCE_FIGURES and F.best_example(f) else ''}>"
                     f"<summary><span class='sev-{esc(f.severity)}'>{esc(f.severity)}</span> "
                     f"{esc(f.analyzer)} (rank {esc(str(f.rank))}): {esc(f.title)}</summary>"
                     f"<p><b>Recommendation:</b> {esc(f.recommendation)}</p>")
        if index.n_events and F.best_example(f) is not None and shown < MAX_EVIDENCE_FIGURES:
            parts.append(f"<p class='muted'>{esc(F.example_caption(a, f))}</p>")
            parts.append(_figure_html(F.timeline_figure(index, F.finding_span(a, f)), f"fig-finding-{int(row['idx'])}"))
            shown += 1
        parts.append(f"<pre>{esc(json.dumps({'metrics': f.metrics, 'evidence': f.evidence}, indent=1, default=_default))}</pre></details>")
    parts.append("</section>")
    return parts


def _timeline_section(a: Analysis, index: TimelineIndex) -> list[str]:
    """The steady-state window (the dashboard's first view), a typical step when the window is too busy
    to draw kernel by kernel, and the whole run."""
    parts: list[str] = []
    # too busy to draw kernel by kernel, and the whole run
    if index.n_events:
        parts.append("<section id='timeline'><h2>Timeline</h2>")
        view = F.default_view(a)
        steady = F.timeline_figure(index, view)
        parts.append("<p class='muted'>The steady-state window.</p>" + _figure_html(steady, "fig-timeline-steady"))
        step = typical_step(a)
        if steady.layout.meta["mode"] != "exact" and step is not None:
            parts.append(f"<p class='muted'>A typical step (the median steady step of rank {a.ranks[0].rank}).</p>")
            parts.append(_figure_html(F.timeline_figure(index, step), "fig-timeline-step"))
        parts.append("<p class='muted'>The whole run.</p>" + _figure_html(F.timeline_figure(index), "fig-timeline"))
        parts.append("</section>")
    return parts


def _summaries_section(a: Analysis) -> list[str]:
    esc = html.escape
    trace = a.trace
    parts: list[str] = []
    tabs = S.tables(a)
    figs = {"kernels": lambda: F.kernel_duration_figure(trace, S.windows(a)),
            "steps": lambda: F.step_figure(tabs["steps"]),
            "launch": lambda: F.launch_delay_figure(stats.launch_delays(trace, S.windows(a)))}
    parts.append("<section id='summaries'><h2>Summaries</h2><p class='muted'>Times in microseconds (the CSV files of "
                 "<code>gpudoctor analyze --csv DIR</code> keep nanoseconds).</p>")
    for kind in S.KINDS:
        parts.append(f"<h3>{esc(S.TITLES[kind])}</h3>")
        if kind in figs and not tabs[kind].empty:
            parts.append(_figure_html(figs[kind](), f"fig-summary-{kind}"))
        parts.append(_table_html(S.display(tabs[kind]), max_rows=30) if len(tabs[kind])
                     else f"<p class='muted'>none: {esc(S.EMPTY_WHY[kind])}</p>")
    parts.append("</section>")
    return parts


def _kernels_section(a: Analysis) -> list[str]:
    parts: list[str] = []
    kt = F.kernel_table(a)
    parts.append("<section id='kernels'><h2>Kernels (steady-state window)</h2>")
    parts.append(_table_html(kt.drop(columns=["signature"]), max_rows=30))
    parts.append(_figure_html(F.kernel_category_figure(kt), "fig-kernel-category"))
    parts.append("</section>")
    return parts


def _hardware_sections(a: Analysis, ceilings: dict | None) -> list[str]:
    """Roofline, communication and memory, where the run has what they need."""
    esc = html.escape
    trace = a.trace
    parts: list[str] = []
    if not trace.kernel_metrics.empty:
        parts.append("<section id='roofline'><h2>Roofline</h2>")
        parts.append(_figure_html(F.roofline_figure(trace, ceilings), "fig-roofline"))
        parts.append("</section>")
    if not trace.collectives.empty or any(f.analyzer in F.COMM_ANALYZERS for f in a.findings):
        parts.append("<section id='communication'><h2>Communication</h2>")
        bw = F.comm_bandwidth_figure(trace, ceilings, F.analysis_link_ceiling(a, ceilings))
        parts.append(f"<p class='muted'>{esc(bw.layout.meta['message'])}</p>" if bw.layout.meta.get("empty")
                     else _figure_html(bw, "fig-comm"))
        parts.append(_figure_html(F.comm_fraction_figure(a), "fig-comm-fraction"))
        parts.append(_figure_html(F.collective_time_figure(trace, S.windows(a)), "fig-comm-time"))
        parts.append("<h3>Communication kernels per rank and collective (steady-state window)</h3>"
                     + _table_html(F.comm_kernel_frame(trace, S.windows(a))))
        parts.append("<h3>Collective calls per rank and op (host side, whole trace)</h3>" + _table_html(F.collective_summary_frame(trace)))
        parts.append("<h3>Stragglers (last rank to arrive at each collective)</h3>" + _table_html(F.straggler_frame(trace)))
        sf = F.straggler_findings_frame(a)
        if len(sf):
            parts.append("<h3>Per-rank step time</h3>" + _table_html(sf))
        parts.append("</section>")
    if not trace.memory_events.empty or not trace.counters.empty:
        parts.append("<section id='memory'><h2>Memory</h2>")
        parts.append(_figure_html(F.memory_figure(trace), "fig-memory"))
        kv = F.kv_frame(a)
        if len(kv):
            parts.append("<h3>KV cache</h3>" + _table_html(kv))
        parts.append("</section>")
    return parts


def typical_step(analysis: Analysis) -> tuple[int, int] | None:
    """The GPU span of the first rank's median steady step (by duration), or None."""
    if not analysis.ranks or not len(analysis.ranks[0].window.steady):
        return None
    st = analysis.ranks[0].window.steady.reset_index(drop=True)
    i = int(st["duration_ns"].rank(method="first").sub((len(st) + 1) / 2).abs().idxmin())
    lo, hi = int(st["gpu_start_ns"].iat[i]), int(st["gpu_end_ns"].iat[i])
    return (lo, hi) if hi > lo else None


def _default(o):
    try:
        import numpy as np
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
    except ImportError:
        pass
    return str(o)


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (gpudoctor.store.atomic: temp file and rename, symlinks
    followed, devices and FIFOs written in place, ``-`` is stdout), creating its directory."""
    from gpudoctor.store.atomic import STDOUT, atomic_write_text

    path = Path(path)
    if str(path) != STDOUT:
        path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


def write_report(path: str | os.PathLike, analysis: Analysis, name: str, ceilings: dict | None = None) -> Path:
    return write_atomic(path, build_report(analysis, name, ceilings))
