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
import tempfile
from pathlib import Path

import pandas as pd

from gpudoctor import __version__
from gpudoctor.dashboards import figures as F
from gpudoctor.dashboards.timeline import TimelineIndex

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1280px;color:#111827;padding:0 16px}
h1{margin-bottom:4px} .muted{color:#6b7280;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 16px;width:100%}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top}
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
    out = ["<table><thead><tr>", *[f"<th>{html.escape(str(c))}</th>" for c in cols], "</tr></thead><tbody>"]
    for row in d[cols].itertuples(index=False, name=None):
        out.append("<tr>")
        for c, v in zip(cols, row):
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cls = (classes or {}).get(c)
            klass = " ".join(x for x in ("num" if num else "", cls(v) if cls else "") if x)
            text = "" if v is None or (isinstance(v, float) and v != v) else str(v)
            out.append(f"<td{f' class={chr(34)}{klass}{chr(34)}' if klass else ''}>{html.escape(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if max_rows and len(df) > max_rows:
        out.append(f"<p class='muted'>{len(df) - max_rows} more rows not shown</p>")
    return "".join(out)


def _figure_html(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def build_report(analysis, name: str, ceilings: dict | None = None) -> str:
    """The report of one analyzed run as one HTML string (plotly.js inlined once)."""
    from plotly.offline import get_plotlyjs

    a = analysis
    trace = a.trace
    parts: list[str] = []
    esc = html.escape
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<h1>gpudoctor report — {esc(name)}</h1>")
    parts.append(f"<div class='muted'>gpudoctor {esc(__version__)} · {esc(when)} · inputs: "
                 f"{esc(', '.join(str(i.get('path', '')) for i in a.inputs))}</div>")
    for e in a.errors:
        parts.append(f"<p class='sev-high'>error: {esc(e)}</p>")
    if a.dropped:
        parts.append(f"<p class='muted'>dropped events: {esc(', '.join(f'{k}: {v}' for k, v in a.dropped.items()))}</p>")

    # findings
    fdf = F.findings_frame(a)
    parts.append(f"<section id='findings'><h2>Findings ({len(fdf)})</h2>")
    parts.append(_table_html(fdf.drop(columns=["idx", "recommendation"]), classes={"severity": lambda v: f"sev-{v}"}))
    for _, row in fdf.iterrows():
        f = a.findings[int(row["idx"])]
        parts.append(f"<details><summary><span class='sev-{esc(f.severity)}'>{esc(f.severity)}</span> "
                     f"{esc(f.analyzer)} (rank {esc(str(f.rank))}): {esc(f.title)}</summary>"
                     f"<p><b>Recommendation:</b> {esc(f.recommendation)}</p>"
                     f"<pre>{esc(json.dumps({'metrics': f.metrics, 'evidence': f.evidence}, indent=1, default=_default))}</pre></details>")
    parts.append("</section>")

    # ranks + categories
    parts.append("<section id='ranks'><h2>Ranks</h2>")
    parts.append(_table_html(F.rank_frame(a)))
    parts.append(_figure_html(F.category_figure(a), "fig-category"))
    parts.append("</section>")

    # timeline: whole run (aggregated) and the steady window of the first rank
    index = TimelineIndex.from_trace(trace)
    if index.n_events:
        parts.append("<section id='timeline'><h2>Timeline</h2>")
        parts.append(_figure_html(F.timeline_figure(index), "fig-timeline"))
        if a.ranks and a.ranks[0].window.end_ns > a.ranks[0].window.start_ns:
            w = a.ranks[0].window
            steady = w.steady
            # one steady step when the window holds too many events to draw one by one
            view = (w.start_ns, w.end_ns)
            if index.count(view[0] - index.origin_ns, view[1] - index.origin_ns) > F.MAX_EXACT and len(steady):
                view = (int(steady["gpu_start_ns"].iloc[0]), int(steady["gpu_end_ns"].iloc[0]))
            parts.append("<p class='muted'>Below: the steady-state window (or its first step) of rank "
                         f"{a.ranks[0].rank}.</p>")
            parts.append(_figure_html(F.timeline_figure(index, view), "fig-timeline-steady"))
        parts.append("</section>")

    # kernels
    kt = F.kernel_table(a)
    parts.append("<section id='kernels'><h2>Kernels (steady-state window)</h2>")
    parts.append(_table_html(kt.drop(columns=["signature"]), max_rows=30))
    parts.append(_figure_html(F.kernel_category_figure(kt), "fig-kernel-category"))
    parts.append("</section>")

    if not trace.kernel_metrics.empty:
        parts.append("<section id='roofline'><h2>Roofline</h2>")
        parts.append(_figure_html(F.roofline_figure(trace, ceilings), "fig-roofline"))
        parts.append("</section>")
    if not trace.collectives.empty or any(f.analyzer in F.COMM_ANALYZERS for f in a.findings):
        parts.append("<section id='communication'><h2>Communication</h2>")
        parts.append(_figure_html(F.comm_bandwidth_figure(trace, ceilings, F.analysis_link_ceiling(a, ceilings)), "fig-comm"))
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

    head = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>gpudoctor report — {esc(name)}</title>"
            f"<style>{_CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>")
    return head + "\n".join(parts) + "</body></html>"


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
    """Write ``text`` to ``path`` via a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def write_report(path: str | os.PathLike, analysis, name: str, ceilings: dict | None = None) -> Path:
    return write_atomic(path, build_report(analysis, name, ceilings))
