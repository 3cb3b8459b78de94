"""Figures and tables of the dashboard and the HTML report: pure functions of the trace model.

Every function takes a Trace / Analysis (and plain options) and returns a plotly Figure or a pandas
DataFrame; nothing here knows about Dash, files or the network, so all of it is tested without a
browser (tests/test_figures.py). Figures carry what they drew in ``layout.meta`` (mode, counts) so the
app and the tests can check it without parsing traces.

Time axes of the timeline and the memory figure are milliseconds after the run's first event
(``run_origin_ns``), so that float64 keeps nanosecond detail.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from gpudoctor.analyzers.low_tensor_core import NON_TC
from gpudoctor.analyzers.roofline import kernel_roofline
from gpudoctor.dashboards.timeline import CATEGORIES, GPU_CATEGORIES, TimelineIndex
from gpudoctor.model.categories import categorize, short_names
from gpudoctor.model.devices import peaks_for
from gpudoctor.model.summary import in_window
from gpudoctor.model.trace import Trace

if TYPE_CHECKING:
    from gpudoctor.analyzers.analysis import Analysis
    from gpudoctor.analyzers.findings import Finding


MAX_EXACT = 5000  # events drawn one by one when zoomed in to fewer than this many
BINS = 800  # columns of the aggregated timeline (about one per pixel of a wide screen)

COLORS = {
    "gemm": "#1f77b4", "attention": "#9467bd", "elementwise": "#2ca02c", "reduction": "#ff7f0e",
    "communication": "#d62728", "memory": "#8c564b", "other": "#7f7f7f", "memcpy": "#e377c2",
    "memset": "#bcbd22", "nvtx": "#17becf", "api": "#64748b", "nccl": "#d62728",
}
SEVERITY_ORDER = {"high": 3, "medium": 2, "low": 1, "info": 0}
# A small template (plotly_white's look): the built-in templates are deep-copied into every figure,
# which costs ~60 ms a figure; this one costs well under 1 ms.
_GRID = "#e5e9f0"
_TEMPLATE = {"layout": {
    "paper_bgcolor": "white", "plot_bgcolor": "white", "font": {"color": "#2a3f5f"},
    "colorway": ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880", "#FF97FF", "#FECB52"],
    "xaxis": {"gridcolor": _GRID, "linecolor": _GRID, "zerolinecolor": _GRID, "ticks": "", "automargin": True},
    "yaxis": {"gridcolor": _GRID, "linecolor": _GRID, "zerolinecolor": _GRID, "ticks": "", "automargin": True},
    "hoverlabel": {"align": "left"}, "title": {"x": 0.05}}}


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    return f"rgba({r},{g},{b},{alpha})"


def fmt_ns(v: float | int | str) -> str:
    v = float(v)
    if not math.isfinite(v):
        return "n/a"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.0f} ns"


def fmt_bytes(v: float | int | str) -> str:
    v = float(v)
    if not math.isfinite(v) or v < 0:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.0f} B"


def empty_figure(message: str, title: str = "") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(template=_TEMPLATE, title=title, height=260, xaxis={"visible": False}, yaxis={"visible": False},
                      annotations=[{"text": message, "showarrow": False, "xref": "paper", "yref": "paper",
                                    "x": 0.5, "y": 0.5, "font": {"size": 14}}], meta={"empty": True, "message": message})
    return fig


def run_origin_ns(trace: Trace) -> int:
    """The run's first event (kernels, memops, host ranges, collectives): time zero of the axes."""
    firsts = [int(df["start_ns"].min()) for df in (trace.kernels, trace.memops, trace.ranges, trace.collectives) if len(df)]
    return min(firsts) if firsts else 0


# ====================================================================================== overview
def findings_frame(analysis: Analysis) -> pd.DataFrame:
    """Findings ranked by estimated saving, then severity: one row per finding (``idx`` = position in
    ``analysis.findings``, stable for callbacks)."""
    rows = []
    for i, f in enumerate(analysis.findings):
        metrics = ", ".join(f"{k}={_metric(v)}" for k, v in list(f.metrics.items())[:4])
        rows.append({"idx": i, "severity": f.severity, "analyzer": f.analyzer,
                     "rank": -1 if f.rank is None else int(f.rank), "title": f.title,
                     "saving_ms": round(f.estimated_saving_ns / 1e6, 3),
                     "saving_pct": round(100 * f.estimated_saving_fraction, 1),
                     "metrics": metrics, "recommendation": f.recommendation,
                     "_sev": SEVERITY_ORDER.get(f.severity, 0), "_saving": f.estimated_saving_ns})
    cols = ["idx", "severity", "analyzer", "rank", "title", "saving_ms", "saving_pct", "metrics", "recommendation"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows).sort_values(["_saving", "_sev"], ascending=[False, False], kind="stable")
    return df[cols].reset_index(drop=True)


def _metric(v) -> str:
    if v is None:
        return "unknown"
    if isinstance(v, float):
        return "unknown" if v != v else (f"{v:.3g}" if abs(v) < 1e6 else f"{v:.3e}")
    return str(v)


def rank_frame(analysis: Analysis) -> pd.DataFrame:
    """Per-rank summary: steady window, steps, GPU busy, kernels, the category that took most time."""
    rows = []
    for r in analysis.ranks:
        d = r.to_dict()
        top = r.category_time.iloc[0] if len(r.category_time) else None
        rows.append({
            "rank": r.rank, "device": r.device or "?", "window_ms": round(r.window.duration_ns / 1e6, 3),
            "window": d["window_source"], "steps": d["steps"]["count"],
            "median_step_ms": None if d["steps"]["median_step_ns"] is None else round(d["steps"]["median_step_ns"] / 1e6, 3),
            "gpu_busy_pct": round(100 * r.gpu_busy_fraction, 1), "kernels": r.kernel_count,
            "steady_kernels": r.steady_kernel_count,
            "top_category": "" if top is None else f"{top['category']} ({100 * top['window_fraction']:.0f}%)",
        })
    return pd.DataFrame(rows, columns=["rank", "device", "window_ms", "window", "steps", "median_step_ms",
                                       "gpu_busy_pct", "kernels", "steady_kernels", "top_category"])


def category_frame(analysis: Analysis) -> pd.DataFrame:
    """rank, category, total_ns, fraction (of the rank's steady-state window), categories in display order."""
    rows = []
    order = {c: i for i, c in enumerate(CATEGORIES)}
    for r in analysis.ranks:
        for _, c in r.category_time.iterrows():
            rows.append({"rank": int(r.rank), "category": str(c["category"]), "total_ns": int(c["total_ns"]),
                         "fraction": float(c["window_fraction"])})
    df = pd.DataFrame(rows, columns=["rank", "category", "total_ns", "fraction"])
    if len(df):
        df = df.sort_values(["rank", "category"], key=lambda s: s.map(order) if s.name == "category" else s, kind="stable")
    return df.reset_index(drop=True)


def category_figure(analysis: Analysis) -> go.Figure:
    """Share of the steady-state window per kernel category, one bar per rank."""
    rows = []
    for r in analysis.ranks:
        for _, c in r.category_time.iterrows():
            rows.append({"rank": f"rank {r.rank}", "category": str(c["category"]), "frac": float(c["window_fraction"]),
                         "ns": float(c["total_ns"])})
    if not rows:
        return empty_figure("no kernels in the steady-state window", "Time by category")
    df = pd.DataFrame(rows)
    fig = go.Figure()
    for cat in [c for c in CATEGORIES if c in set(df["category"])]:
        d = df[df["category"] == cat]
        fig.add_bar(y=d["rank"], x=100 * d["frac"], name=cat, orientation="h", marker_color=COLORS.get(cat, "#999"),
                    text=[fmt_ns(v) for v in d["ns"]], textposition="none",
                    hovertemplate=f"{cat}: %{{x:.1f}}%% of the window (%{{text}})<extra></extra>")
    fig.update_layout(template=_TEMPLATE, barmode="stack", title="Time by category (% of the steady-state window)",
                      height=140 + 40 * len(analysis.ranks), xaxis={"title": "% of window", "range": [0, 100]}, margin={"l": 70, "r": 20, "t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.35}, meta={"bars": len(df)})
    return fig


# Example groups that are not part of their finding's saving: gpu_idle's queued gaps between kernels
# (latency on the GPU, not host time a fix removes).
NOT_SAVING_GROUPS = frozenset({"gpu_side"})


def finding_span(analysis: Analysis, finding: Finding) -> tuple[int, int]:
    """Where the timeline should jump for ``finding``: the span of its evidence example that carries the
    most of its saving (:func:`best_example`), padded by a tenth on each side (at least 50 us); else the
    rank's steady-state window."""
    w0, w1 = _rank_window(analysis, finding)
    span = example_span(analysis, finding, best_example(finding))
    if span is None or span[1] < span[0]:
        return int(w0), int(w1)
    s, e = span
    pad = max((e - s) // 10, 50_000)  # at least 50 us of context on each side
    return int(s - pad), int(e + pad)


def frame_gap_span(analysis: Analysis, finding: Finding, frame: int, gap: int) -> tuple[int, int] | None:
    """Where the timeline should jump for gap ``gap`` of source line ``frame`` of ``finding`` (gpu_idle's
    ``evidence["frames"]``), padded like :func:`finding_span`; None when there is no such gap."""
    frames = (finding.evidence or {}).get("frames") or []
    if not (0 <= frame < len(frames)) or not (0 <= gap < len(frames[frame].get("gaps") or [])):
        return None
    s, e = example_span(analysis, finding, frames[frame]["gaps"][gap])
    pad = max((e - s) // 10, 50_000)
    return int(s - pad), int(e + pad)


def _rank_window(analysis, finding) -> tuple[int, int]:
    rank = finding.rank if finding.rank is not None else (analysis.ranks[0].rank if analysis.ranks else 0)
    summary = next((r for r in analysis.ranks if r.rank == rank), analysis.ranks[0] if analysis.ranks else None)
    return (summary.window.start_ns, summary.window.end_ns) if summary is not None else (0, 0)


def example_span(analysis: Analysis, finding: Finding, ex: dict | None) -> tuple[int, int] | None:
    """An example's (start, end) on the run clock: ``start_ns``/``end_ns``, or ``start_us``/``end_us``/
    ``dur_us`` after the rank's steady-state window start."""
    if ex is None:
        return None
    if "start_ns" in ex:
        s = int(ex["start_ns"])
        return s, int(ex.get("end_ns", s + int(ex.get("dur_ns", 0))))
    w0, _ = _rank_window(analysis, finding)
    s = w0 + int(round(float(ex["start_us"]) * 1e3))
    if "end_us" in ex:
        return s, w0 + int(round(float(ex["end_us"]) * 1e3))
    return s, s + int(round(float(ex.get("dur_us", 0)) * 1e3))


def best_example(finding: Finding) -> dict | None:
    """The evidence example that carries the most of the finding's saving: the longest timed example,
    leaving out groups that are not part of the saving (:data:`NOT_SAVING_GROUPS`). Ties go to the
    first. Examples are a list of dicts or lists per cause (a dict of lists)."""
    best, best_ns = None, -1.0
    for ex in _timed_examples((finding.evidence or {}).get("examples")):
        d = _example_ns(ex)
        if d > best_ns:
            best, best_ns = ex, d
    return best


def _timed_examples(ex, group: str = ""):
    if group in NOT_SAVING_GROUPS:
        return
    if isinstance(ex, dict):
        if any(k in ex for k in ("start_ns", "start_us")):
            yield ex
            return
        for k, v in ex.items():
            yield from _timed_examples(v, str(k))
    elif isinstance(ex, (list, tuple)):
        for v in ex:
            yield from _timed_examples(v, group)


def _example_ns(ex: dict) -> float:
    """An example's length in ns (0 when it says none)."""
    if "end_ns" in ex and "start_ns" in ex:
        return float(ex["end_ns"]) - float(ex["start_ns"])
    if "dur_ns" in ex:
        return float(ex["dur_ns"])
    if "end_us" in ex and "start_us" in ex:
        return 1e3 * (float(ex["end_us"]) - float(ex["start_us"]))
    if "dur_us" in ex:
        return 1e3 * float(ex["dur_us"])
    return 0.0


# ====================================================================================== timeline
MAX_LABELS = 300  # kernel names written on bars (the widest bars) in the exact view
MAX_LINKS = 2000  # launch -> kernel arrows in the exact view
MAX_COUNTER_TRACKS = 8  # counter names drawn as line tracks; the others are named in the status line
LANE_PX, COUNTER_PX = 40, 90


def default_view(analysis: Analysis) -> tuple[int, int] | None:
    """The timeline's first view: the steady-state windows of all ranks (None: no window, whole run)."""
    ws = [(r.window.start_ns, r.window.end_ns) for r in analysis.ranks if r.window.end_ns > r.window.start_ns]
    if not ws:
        return None
    return min(w[0] for w in ws), max(w[1] for w in ws)


def timeline_figure(index: TimelineIndex, view_ns: tuple[int, int] | None = None, *, max_exact: int = MAX_EXACT,
                    bins: int = BINS) -> go.Figure:
    """Lanes of the run (NVTX ranges, CUDA API calls, GPU streams, collectives per rank) for the visible
    range, and one line track per counter name under them.

    ``view_ns``: (start, end) on the run clock; None = the whole GPU activity (zoomed out). Zoomed out,
    or with ``max_exact`` or more events visible, lanes are aggregated: per lane and category, the
    busy fraction of each of ``bins`` bins, drawn as heat strips (one raster per category, however many
    kernels). Zoomed in to fewer events, every event is drawn (one path per category), the widest bars
    carry their names, and kernels are linked to the API calls that launched them."""
    full = _gpu_extent(index)
    if view_ns is None:
        lo, hi = full
        zoomed_in = False
    else:
        lo, hi = index.clamp(view_ns[0] - index.origin_ns, view_ns[1] - index.origin_ns)
        zoomed_in = (hi - lo) < 0.98 * (full[1] - full[0])
    lanes = index.lanes
    if not lanes:
        return empty_figure("no kernels, ranges or collectives in this run", "Timeline")
    n_visible = index.count(lo, hi)
    n_gpu = index.count(lo, hi, gpu_only=True)
    exact = zoomed_in and n_visible <= max_exact
    L = len(lanes)
    counter_names = sorted(index.counters["name"].unique().tolist()) if len(index.counters) else []
    tracks = counter_names[:MAX_COUNTER_TRACKS]
    lanes_px = 60 + LANE_PX * L
    if tracks:
        from plotly.subplots import make_subplots
        fig = make_subplots(rows=1 + len(tracks), cols=1, shared_xaxes=True, vertical_spacing=0.02,
                            row_heights=[lanes_px] + [COUNTER_PX] * len(tracks))
        at = {"row": 1, "col": 1}
    else:
        fig, at = go.Figure(), {}
    if exact:
        drawn, labels, links = _draw_exact(fig, index, lo, hi, at)
        mode = "exact"
    else:
        _draw_aggregated(fig, index, lo, hi, bins, at)
        drawn = labels = links = 0
        mode = "aggregated"
    _draw_counters(fig, index, lo, hi, bins, tracks)
    status = (f"exact: {n_gpu:,} GPU ops ({n_visible:,} events) drawn one by one" if mode == "exact"
              else f"aggregated: {n_gpu:,} GPU ops ({n_visible:,} events) as busy fraction in {bins} bins"
              + ("" if zoomed_in else " — zoom in to see kernels"))
    if counter_names[MAX_COUNTER_TRACKS:]:
        status += f"; counters not drawn: {', '.join(counter_names[MAX_COUNTER_TRACKS:])}"
    meta = {"mode": mode, "visible_events": int(n_visible), "visible_gpu_ops": int(n_gpu), "drawn_events": int(drawn),
            "bins": int(bins) if mode == "aggregated" else 0, "origin_ns": int(index.origin_ns),
            "view_ns": [int(lo + index.origin_ns), int(hi + index.origin_ns)], "status": status,
            "bar_labels": int(labels), "launch_links": int(links), "counter_tracks": tracks,
            "counters_not_drawn": counter_names[MAX_COUNTER_TRACKS:]}
    _timeline_layout(fig, index, lo, hi, lanes_px, tracks, status, meta, at)
    return fig


def _draw_exact(fig: go.Figure, index: TimelineIndex, lo: int, hi: int, at: dict) -> tuple[int, int, int]:
    """Every event in [lo, hi], one path per category; returns (events drawn, bar labels, launch links)."""
    ms = 1e-6
    ev = index.events(lo, hi)
    drawn = len(ev)
    min_w = max((hi - lo) // 700, 1)  # at least ~2 px so a 1 us kernel is visible at any zoom
    for ci, cat in enumerate(CATEGORIES):
        sel = np.nonzero(ev.category == ci)[0]
        if len(sel) == 0:
            continue
        s = ev.start[sel]
        e = ev.end[sel]
        # drawn clipped to the view: geometry far outside it would widen the page (hover keeps the real times)
        x = _triples(np.maximum(s, lo) * ms, np.minimum(np.maximum(e, s + min_w), max(hi, s.max() + min_w)) * ms)
        y = _triples(ev.lane[sel], ev.lane[sel])
        text = [f"{lab}<br>{cat} · {fmt_ns(b - a)}<br>start {a * ms:.3f} ms"
                for lab, a, b in zip(ev.label[sel], s, e)]
        t3 = np.empty(3 * len(sel), dtype=object)
        t3[0::3] = text
        t3[1::3] = text
        t3[2::3] = ""
        # simplify=False: plotly.js otherwise drops segments shorter than a pixel (a blank lane)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=cat, line={"color": COLORS[cat], "width": 18, "simplify": False},
                                 text=t3, hovertemplate="%{text}<extra></extra>", connectgaps=False,
                                 legendgroup=cat, meta={"category": cat, "events": int(len(sel))}), **at)
    labels = _add_bar_labels(fig, ev, lo, hi, at)
    links = _add_launch_links(fig, index, ev, lo, hi, at)
    return drawn, labels, links


def _draw_aggregated(fig: go.Figure, index: TimelineIndex, lo: int, hi: int, bins: int, at: dict) -> None:
    """Per lane and category, the busy fraction of each bin as a heat strip."""
    ms = 1e-6
    edges, frac = index.busy(lo, hi, bins)
    x = edges * ms
    gpu_cats = [CATEGORIES.index(c) for c in GPU_CATEGORIES]
    for ci in index.categories_present:
        cat = CATEGORIES[ci]
        lane_ids = sorted({lane for lane, c, _, _ in index.groups if c == ci})
        if not lane_ids:
            continue
        # one heat strip per category, stacked inside the lane when a lane holds several categories
        per_lane = {li: [c for c in index.categories_present if any(g[0] == li and g[1] == c for g in index.groups)]
                    for li in lane_ids}
        yedges, z = [], []
        for j, li in enumerate(lane_ids):
            cats_here = per_lane[li] if ci in gpu_cats else [ci]
            K = len(cats_here) if ci in gpu_cats else 1
            k = cats_here.index(ci) if ci in gpu_cats else 0
            h = 0.84 / K
            y0 = li - 0.42 + k * h
            yedges += [y0, y0 + h]
            z.append(np.where(frac[li, ci] > 0, frac[li, ci], np.nan))
            if j < len(lane_ids) - 1:
                z.append(np.full(len(x) - 1, np.nan))
        z = np.vstack(z)
        fig.add_trace(go.Heatmap(
            x=x, y=yedges, z=z, zmin=0, zmax=1, showscale=False, name=cat, hoverongaps=False,
            colorscale=[[0, _rgba(COLORS[cat], 0.35)], [1, _rgba(COLORS[cat], 1.0)]],
            hovertemplate=f"{cat}<br>%{{x:.3f}} ms<br>busy %{{z:.0%}}<extra></extra>",
            meta={"category": cat, "bins": int(len(x) - 1)}), **at)
        # legend entry (heatmaps have none)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=cat, legendgroup=cat,
                                 marker={"color": COLORS[cat], "symbol": "square", "size": 10}, hoverinfo="skip"), **at)


def _draw_counters(fig: go.Figure, index: TimelineIndex, lo: int, hi: int, bins: int, tracks: list[str]) -> None:
    """One line track per counter name, under the lanes."""
    ms = 1e-6
    for row, name in enumerate(tracks, start=2):
        for label, t, v in index.counter_series(lo, hi, bins, name=name):
            fig.add_trace(go.Scatter(x=t * ms, y=v, mode="lines", name=label, line={"width": 1.5, "shape": "hv"},
                                     showlegend=True, meta={"counter": label}), row=row, col=1)
        fig.update_yaxes(title_text=_short(name, 22), title_font={"size": 10}, row=row, col=1)


def _timeline_layout(fig: go.Figure, index: TimelineIndex, lo: int, hi: int, lanes_px: int, tracks: list[str],
                     status: str, meta: dict, at: dict) -> None:
    ms = 1e-6
    lanes = index.lanes
    L = len(lanes)
    yaxis = {"tickmode": "array", "tickvals": list(range(L)), "ticktext": [ln.label for ln in lanes],
             "range": [L - 0.5, -0.5], "showgrid": False, "zeroline": False, "fixedrange": True}
    xr = [lo * ms, hi * ms]
    fig.update_layout(
        template=_TEMPLATE, height=110 + lanes_px + COUNTER_PX * len(tracks),
        margin={"l": 170, "r": 20, "t": 78, "b": 45}, title={"text": status, "font": {"size": 13}, "y": 0.99, "yanchor": "top"},
        uirevision="timeline", dragmode="zoom", hovermode="closest", showlegend=True,
        legend={"orientation": "h", "y": 1.0, "x": 0, "xanchor": "left", "yanchor": "bottom"},
        meta=meta)
    fig.update_yaxes(**yaxis, **at)
    fig.update_xaxes(range=xr, showgrid=True)
    fig.update_xaxes(title_text="ms since first event", row=1 + len(tracks), col=1) if tracks else \
        fig.update_xaxes(title_text="ms since first event")


def _triples(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[a0, b0, NaN, a1, b1, NaN, ...]: one line segment per pair (NaN breaks the line)."""
    out = np.empty(3 * len(a))
    out[0::3] = a
    out[1::3] = b
    out[2::3] = np.nan
    return out


def _add_bar_labels(fig: go.Figure, ev, lo: int, hi: int, at: dict) -> int:
    """Names on the GPU bars wide enough to hold a few characters (the widest MAX_LABELS of them)."""
    width = np.minimum(ev.end, hi) - np.maximum(ev.start, lo)
    px = width / max(hi - lo, 1) * 1100  # about the plot's width in pixels
    sel = np.nonzero(ev.is_gpu & (px >= 40))[0]
    if len(sel) > MAX_LABELS:
        sel = sel[np.argsort(-px[sel], kind="stable")[:MAX_LABELS]]
    if not len(sel):
        return 0
    mid = (np.maximum(ev.start[sel], lo) + np.minimum(ev.end[sel], hi)) / 2 * 1e-6
    chars = np.maximum((px[sel] / 6.5).astype(int), 3)
    text = [_short(str(n), int(c)) for n, c in zip(ev.label[sel], chars)]
    fig.add_trace(go.Scatter(x=mid, y=ev.lane[sel], mode="text", text=text, textfont={"size": 10, "color": "white"},
                             hoverinfo="skip", showlegend=False, meta={"bar_labels": int(len(sel))}), **at)
    return int(len(sel))


def _add_launch_links(fig: go.Figure, index: TimelineIndex, ev, lo: int, hi: int, at: dict) -> int:
    """A thin line from each visible GPU op's launch call (CUDA API lane) to the op's start; returns how
    many visible ops have a recorded call. Calls made up to one view-width before the view (the host runs
    ahead of the GPU) are drawn fainter, entering from the left edge; earlier ones are not drawn."""
    pos, api_lane, api_start = index.launches(ev)
    if not len(pos):
        return 0
    inside = (api_start >= lo) & (api_start < hi)
    # calls long before the view would all enter flat along the kernel lane: only those of the last view-width
    near = ~inside & (api_start >= lo - (hi - lo))
    for sel, name, color in ((inside, "launch → kernel", "rgba(55,65,81,0.45)"),
                             (near, "launch (before the view) → kernel", "rgba(55,65,81,0.15)")):
        p, ln, st = pos[sel], api_lane[sel], api_start[sel]
        if not len(p):
            continue
        if len(p) > MAX_LINKS:  # evenly thinned: the pattern stays visible
            keep = np.linspace(0, len(p) - 1, MAX_LINKS).astype(np.int64)
            p, ln, st = p[keep], ln[keep], st[keep]
        y0, y1 = ln + 0.3, ev.lane[p] - 0.3
        x1 = np.maximum(ev.start[p], lo).astype(np.float64)
        x0 = np.maximum(st, lo).astype(np.float64)  # a call before the view: the line enters at the left edge
        y0 = y0 + (y1 - y0) * (x0 - st) / np.maximum(x1 - st, 1)
        fig.add_trace(go.Scatter(x=_triples(x0 * 1e-6, x1 * 1e-6), y=_triples(y0, y1),
                                 mode="lines", line={"color": color, "width": 1, "simplify": False}, name=name,
                                 hoverinfo="skip", connectgaps=False, meta={"links": int(len(p))}), **at)
    return int(len(pos))


def _gpu_extent(index: TimelineIndex) -> tuple[int, int]:
    """Time span of GPU ops (kernels, memops) and collectives: the zoomed-out view."""
    lo, hi = None, None
    gpu = {CATEGORIES.index(c) for c in GPU_CATEGORIES} | {CATEGORIES.index("nccl")}
    for g, (_, cat, a, b) in enumerate(index.groups):
        if cat in gpu and b > a:
            s = int(index._start[a])
            e = int(index._end_sorted[b - 1])
            lo = s if lo is None else min(lo, s)
            hi = e if hi is None else max(hi, e)
    if lo is None:
        return index.extent
    return lo, max(hi, lo + 1)


def relayout_view(relayout: dict | None, origin_ns: int) -> tuple[int, int] | None | str:
    """The x range of a plotly relayoutData event, as run-clock ns: (start, end); "reset" for autorange;
    None when the event does not change the x range (hover, legend, y only)."""
    if not relayout:
        return None
    for key, val in relayout.items():
        if re.fullmatch(r"xaxis\d*\.autorange", key) and val:
            return "reset"
    for axis in ("xaxis", "xaxis2"):
        r0, r1 = relayout.get(f"{axis}.range[0]"), relayout.get(f"{axis}.range[1]")
        if r0 is None and isinstance(relayout.get(f"{axis}.range"), (list, tuple)):
            r0, r1 = relayout[f"{axis}.range"][:2]
        if r0 is not None and r1 is not None:
            try:
                a, b = float(r0), float(r1)
            except (TypeError, ValueError):
                return None
            if b > a:
                return int(origin_ns + a * 1e6), int(origin_ns + b * 1e6)
    return None


# ====================================================================================== kernels
def kernel_table(analysis: Analysis, scope: str = "steady") -> pd.DataFrame:
    """One row per kernel (short name + full signature): time, count, mean, share of the window, category,
    tensor-core use and bound (from Nsight Compute metrics when the run has them).

    ``scope``: "steady" (durations clipped to each rank's steady-state window) or "all" (whole trace).
    A run with only Nsight Compute metrics (no timeline) lists its profiled launches."""
    trace = analysis.trace
    cols = ["kernel", "category", "count", "total_ms", "mean_us", "share_pct", "tensor_core", "bound", "signature"]
    k = trace.kernels
    metrics = _metrics_by_kernel(trace)
    if k.empty:
        km = trace.kernel_metrics
        if km.empty:
            return pd.DataFrame(columns=cols)
        d = pd.DataFrame({"kernel": np.asarray(short_names(km["name"].astype(str)), dtype=object),
                          "signature": km["name"].astype(str).to_numpy(),
                          "category": np.asarray(categorize(km["name"].astype(str)), dtype=object),
                          "d": km["duration_ns"].to_numpy(np.float64)})
        g = d.groupby(["kernel", "signature", "category"], sort=False).agg(count=("d", "size"), total=("d", "sum")).reset_index()
        denom = float(g["total"].sum()) or 1.0
    else:
        parts, denom = [], 0.0
        for r in analysis.ranks:
            kr = k[k["rank"].to_numpy() == r.rank] if len(analysis.ranks) > 1 else k
            if scope == "steady" and r.window.end_ns > r.window.start_ns:
                lo, hi = r.window.start_ns, r.window.end_ns
                kr = in_window(kr, lo, hi)
                d = np.minimum(kr["end_ns"].to_numpy(), hi) - np.maximum(kr["start_ns"].to_numpy(), lo)
                denom += hi - lo
            else:
                d = (kr["end_ns"] - kr["start_ns"]).to_numpy()
                if len(kr):
                    denom += int(kr["end_ns"].max() - kr["start_ns"].min())
            # categorical keys: grouping a million rows by codes, not by strings
            parts.append(pd.DataFrame({"kernel": kr["name"].to_numpy(), "signature": kr["demangled_name"].to_numpy(),
                                       "category": kr["category"].to_numpy(), "d": np.asarray(d, dtype=np.int64)}))
        d = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["kernel", "signature", "category", "d"])
        g = (d.groupby(["kernel", "signature", "category"], sort=False, observed=True)
             .agg(count=("d", "size"), total=("d", "sum")).reset_index())
        for c in ("kernel", "signature", "category"):
            g[c] = g[c].astype(str)
        denom = denom or 1.0
    g["total_ms"] = (g["total"] / 1e6).round(4)
    g["mean_us"] = (g["total"] / g["count"] / 1e3).round(2)
    g["share_pct"] = (100 * g["total"] / denom).round(2)
    g["signature"] = g["signature"].where(g["signature"] != "", g["kernel"])
    tc, bound = [], []
    for name, sig, cat in zip(g["kernel"], g["signature"], g["category"]):
        m = metrics.get(name) or metrics.get(sig)
        if m is not None and np.isfinite(m["tensor_pipe_fraction"]):
            tpf = m["tensor_pipe_fraction"]
            tc.append(f"{'yes' if tpf >= 0.05 else 'no'} ({100 * tpf:.0f}% pipe, ncu)")
        else:
            tc.append(_tensor_core_by_name(sig or name, cat))
        bound.append(m["bound"] if m is not None else "")
    g["tensor_core"] = tc
    g["bound"] = bound
    g = g.sort_values("total", ascending=False, kind="stable")
    return g[cols].reset_index(drop=True)


def _tensor_core_by_name(name: str, category: str) -> str:
    if category not in ("gemm", "attention"):
        return ""
    return "no (name)" if NON_TC.search(name) else "likely (name)"


def _metrics_by_kernel(trace: Trace) -> dict[str, dict]:
    """Per kernel name (short and full): mean tensor pipe fraction and the roofline bound of its ncu launches."""
    km = trace.kernel_metrics
    if km.empty:
        return {}
    try:
        ceil = resolve_ceilings(trace, None)[0]
        roof = kernel_roofline(km, ceil) if ceil else None
    except ValueError:
        roof = None
    full = km["name"].astype(str).to_numpy()
    short = np.asarray(short_names(km["name"].astype(str)), dtype=object)
    # a launch joined to the timeline names its kernel exactly
    if (km["kernel_row"] >= 0).any() and len(trace.kernels):
        rows = km["kernel_row"].to_numpy()
        ok = (rows >= 0) & (rows < len(trace.kernels))
        short = np.where(ok, trace.kernels["name"].astype(str).to_numpy()[np.clip(rows, 0, len(trace.kernels) - 1)], short)
    out: dict[str, dict] = {}
    df = pd.DataFrame({"full": full, "short": short, "tpf": km["tensor_pipe_fraction"].to_numpy(np.float64),
                       "bound": roof["bound"].to_numpy() if roof is not None else ""})
    for key in ("full", "short"):
        for name, grp in df.groupby(key, sort=False):
            b = grp["bound"].mode()
            out.setdefault(str(name), {"tensor_pipe_fraction": float(grp["tpf"].mean()) if grp["tpf"].notna().any() else float("nan"),
                                       "bound": str(b.iloc[0]) if len(b) else ""})
    return out


def kernel_category_figure(table: pd.DataFrame) -> go.Figure:
    """Time by category of a kernel table (what the table shows, after filtering)."""
    if table.empty:
        return empty_figure("no kernels", "Time by category")
    g = table.groupby("category", sort=False)["total_ms"].sum().sort_values(ascending=True)
    fig = go.Figure(go.Bar(x=g.to_numpy(), y=g.index.tolist(), orientation="h",
                           marker_color=[COLORS.get(c, "#999") for c in g.index],
                           hovertemplate="%{y}: %{x:.3f} ms<extra></extra>"))
    fig.update_layout(template=_TEMPLATE, title="Time by category (ms)", height=120 + 28 * len(g),
                      margin={"l": 100, "r": 20, "t": 45, "b": 35}, meta={"bars": int(len(g))})
    return fig


# ====================================================================================== roofline
def resolve_ceilings(trace: Trace, measured: dict | None) -> tuple[dict | None, str]:
    """Ceilings for the roofline: measured ones (``gpudoctor ceilings`` JSON) when given, else the
    datasheet peaks of the run's GPU (device table). (None, why) when neither is known."""
    if measured:
        return dict(measured), f"measured ceilings ({measured.get('device_name', 'this GPU')})"
    name = str(trace.devices["name"].iloc[0]) if len(trace.devices) else ""
    peaks = peaks_for(name) if name else None
    if peaks is None:
        return None, f"GPU {name or '(unknown)'} is not in the device table; pass --ceilings FILE"
    c = {"device_name": peaks.name, "copy_bandwidth_bytes_per_s": peaks.memory_bandwidth_bytes_per_s,
         "bf16_flops_per_s": peaks.bf16_flops_per_s, "tf32_flops_per_s": peaks.tf32_flops_per_s,
         "fp32_flops_per_s": peaks.fp32_flops_per_s}
    if math.isfinite(peaks.fp16_flops_per_s):
        c["fp16_tensor_flops_per_s"] = peaks.fp16_flops_per_s
    if math.isfinite(peaks.fp8_flops_per_s):
        c["fp8_flops_per_s"] = peaks.fp8_flops_per_s
    return c, f"datasheet peaks ({peaks.name})"


def load_ceilings(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def roofline_frame(trace: Trace, ceilings: dict) -> pd.DataFrame:
    return kernel_roofline(trace.kernel_metrics, ceilings)


_PREC_COLORS = {"tensor_bf16": "#1f77b4", "tensor_fp16": "#17becf", "tensor_tf32": "#9467bd", "tensor_fp8": "#e377c2",
                "tensor_fp64": "#8c564b", "fp32": "#ff7f0e", "fp16": "#bcbd22", "fp64": "#d62728", "none": "#7f7f7f"}


def roofline_figure(trace: Trace, measured: dict | None = None) -> go.Figure:
    """Profiled kernels (Nsight Compute) as points: arithmetic intensity (FLOP/byte of DRAM traffic) vs
    achieved FLOP/s, against the memory roof and one compute roof per precision present."""
    if trace.kernel_metrics.empty:
        return empty_figure("no Nsight Compute metrics in this run (add an ncu CSV export to the run)", "Roofline")
    ceil, source = resolve_ceilings(trace, measured)
    if ceil is None:
        return empty_figure(source, "Roofline")
    rf = roofline_frame(trace, ceil)
    ok = rf["arithmetic_intensity"].notna() & rf["achieved_flops_per_s"].notna() & (rf["arithmetic_intensity"] > 0)
    pts = rf[ok]
    fig = go.Figure()
    bw = float(ceil["copy_bandwidth_bytes_per_s"])
    ai_lo = float(min(pts["arithmetic_intensity"].min() / 3, 0.1)) if len(pts) else 0.1
    ai_hi = float(max(pts["arithmetic_intensity"].max() * 3, 1e4)) if len(pts) else 1e4
    ai = np.logspace(np.log10(ai_lo), np.log10(ai_hi), 200)
    precisions = sorted(set(pts["dominant_precision"]) | ({"tensor_bf16"} if len(pts) == 0 else set()))
    roofs = []
    for p in precisions:
        sel = rf[rf["dominant_precision"] == p]
        peak = float(sel["peak_flops_per_s"].iloc[0]) if len(sel) else float(ceil.get("bf16_flops_per_s", np.nan))
        src = str(sel["peak_ceiling"].iloc[0]) if len(sel) else "bf16_flops_per_s"
        if not math.isfinite(peak):
            continue
        roofs.append(p)
        fig.add_trace(go.Scatter(x=ai, y=np.minimum(peak, bw * ai) / 1e12, mode="lines", name=f"roof {p} ({peak / 1e12:.0f} TFLOP/s)",
                                 line={"color": _PREC_COLORS.get(p, "#444"), "dash": "dash", "width": 1.5},
                                 hovertemplate=f"{src}: {peak / 1e12:.1f} TFLOP/s; memory {bw / 1e12:.2f} TB/s<extra></extra>",
                                 meta={"roof": p}))
    for p in sorted(set(pts["dominant_precision"])):
        d = pts[pts["dominant_precision"] == p]
        text = [f"{_short(n, 80)}<br>{ai_:.1f} FLOP/B · {f / 1e12:.1f} TFLOP/s<br>{b}-bound, {100 * rfr:.0f}% of roof"
                + (f"<br>tensor pipe {100 * tp:.0f}%" if tp == tp else "")
                for n, ai_, f, b, rfr, tp in zip(d["name"], d["arithmetic_intensity"], d["achieved_flops_per_s"],
                                                 d["bound"], d["roof_fraction"], d["tensor_pipe_fraction"])]
        fig.add_trace(go.Scatter(x=d["arithmetic_intensity"], y=d["achieved_flops_per_s"] / 1e12, mode="markers",
                                 name=f"kernels {p}", text=text, hovertemplate="%{text}<extra></extra>",
                                 marker={"size": 12, "color": _PREC_COLORS.get(p, "#444"), "line": {"width": 1, "color": "#222"}},
                                 meta={"points": int(len(d)), "precision": p}))
    n_out = int((~ok).sum())
    title = f"Roofline: {len(pts)} profiled kernels vs {source}" + (f" ({n_out} without FLOP/byte counters not shown)" if n_out else "")
    fig.update_layout(template=_TEMPLATE, title={"text": title, "font": {"size": 14}}, height=520,
                      xaxis={"type": "log", "title": "arithmetic intensity (FLOP / DRAM byte)"},
                      yaxis={"type": "log", "title": "achieved TFLOP/s"},
                      meta={"points": int(len(pts)), "kernels": int(len(rf)), "roofs": roofs, "ceilings": source})
    return fig


def _short(name, width: int = 70) -> str:
    name = str(name)
    return name if len(name) <= width else name[: width - 1] + "…"


# ====================================================================================== communication
_BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
               "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n}
LINK_KEYS = ("link_bandwidth_bytes_per_s", "nvlink_bandwidth_bytes_per_s", "nccl_busbw_bytes_per_s",
             "interconnect_bandwidth_bytes_per_s")


def collective_frame(trace: Trace) -> pd.DataFrame:
    """Collectives with size: algorithm bandwidth (bytes / time) and bus bandwidth (nccl-tests' factor:
    all_reduce 2(n-1)/n, all_gather / reduce_scatter / all_to_all (n-1)/n, others 1)."""
    c = trace.collectives
    cols = ["rank", "op", "bytes", "duration_ns", "comm_size", "algbw", "busbw"]
    if c.empty:
        return pd.DataFrame(columns=cols)
    d = pd.DataFrame({"rank": c["rank"].to_numpy(), "op": c["op"].astype(str).to_numpy(), "bytes": c["bytes"].to_numpy(),
                      "duration_ns": (c["end_ns"] - c["start_ns"]).to_numpy(), "comm_size": c["comm_size"].to_numpy()})
    d = d[(d["bytes"] > 0) & (d["duration_ns"] > 0)].copy()
    n = d["comm_size"].where(d["comm_size"] > 0, trace.ranks["rank"].nunique() or 1).astype(float)
    d["algbw"] = d["bytes"] / (d["duration_ns"] * 1e-9)
    factor = np.array([_BUS_FACTOR[o](k) if o in _BUS_FACTOR and k > 1 else 1.0 for o, k in zip(d["op"], n)])
    d["busbw"] = d["algbw"] * factor
    return d[cols].reset_index(drop=True)


def link_ceiling(ceilings: dict | None) -> tuple[float | None, str]:
    for key in LINK_KEYS:
        if ceilings and ceilings.get(key):
            return float(ceilings[key]), key
    return None, ""


def comm_bandwidth_figure(trace: Trace, ceilings: dict | None = None, link_bytes_per_s: float | None = None) -> go.Figure:
    """Bus bandwidth of every sized collective against its message size, per op; the link ceiling as a line
    (from ``ceilings``, else ``link_bytes_per_s``)."""
    d = collective_frame(trace)
    if d.empty:
        return empty_figure("no collectives with sizes in this run", "Collective bus bandwidth")
    fig = go.Figure()
    for op, g in d.groupby("op", sort=True):
        fig.add_trace(go.Scatter(x=g["bytes"], y=g["busbw"] / 1e9, mode="markers", name=op,
                                 text=[f"rank {r} · {fmt_bytes(b)} · {fmt_ns(t)}" for r, b, t in zip(g["rank"], g["bytes"], g["duration_ns"])],
                                 hovertemplate="%{text}<br>bus bw %{y:.1f} GB/s<extra>" + op + "</extra>",
                                 marker={"size": 8, "opacity": 0.75}, meta={"points": int(len(g))}))
    link, key = link_ceiling(ceilings)
    if not link and link_bytes_per_s:
        link, key = float(link_bytes_per_s), "nccl_dominated"
    if link:
        fig.add_hline(y=link / 1e9, line_dash="dash", line_color="#d62728", annotation_text=f"link ceiling {link / 1e9:.0f} GB/s ({key})")
    fig.update_layout(template=_TEMPLATE, title="Collective bus bandwidth vs message size" + ("" if link else
                      " (no link ceiling measured: gpudoctor nccl-bench)"), height=420,
                      xaxis={"type": "log", "title": "message size (bytes)"}, yaxis={"title": "bus bandwidth (GB/s)"},
                      meta={"points": int(len(d)), "link_ceiling": link})
    return fig


COMM_ANALYZERS = ("nccl_dominated", "pipeline_bubbles", "stragglers")


def analysis_link_ceiling(analysis: Analysis, ceilings: dict | None = None) -> float | None:
    """Link ceiling (bytes/s): measured ceilings first, else what the nccl_dominated analyzer used."""
    link, _ = link_ceiling(ceilings)
    if link:
        return link
    for f in analysis.findings:
        v = f.metrics.get("link_ceiling_gbps") if f.analyzer == "nccl_dominated" else None
        if isinstance(v, (int, float)) and v > 0:
            return float(v) * 1e9
    return None


def comm_findings_frame(analysis: Analysis) -> pd.DataFrame:
    """Per-rank exposed communication and pipeline bubbles: the (scalar) metrics of those findings."""
    rows = []
    for f in analysis.findings:
        if f.analyzer not in COMM_ANALYZERS and not any(re.search(r"exposed|bubble", k) for k in f.metrics):
            continue
        for k, v in f.metrics.items():
            if k.startswith("_") or isinstance(v, (dict, list, tuple)):
                continue
            rows.append({"rank": -1 if f.rank is None else int(f.rank), "analyzer": f.analyzer, "metric": k,
                         "value": _metric(v), "severity": f.severity})
    return pd.DataFrame(rows, columns=["rank", "analyzer", "metric", "value", "severity"])


def comm_fraction_figure(analysis: Analysis) -> go.Figure:
    """Bars per rank of the *_fraction metrics of the communication findings (exposed comm, bubbles)."""
    rows = []
    for f in analysis.findings:
        if f.analyzer not in COMM_ANALYZERS and not any(re.search(r"exposed|bubble", k) for k in f.metrics):
            continue
        for k, v in f.metrics.items():
            if k.endswith("fraction") and isinstance(v, (int, float)) and v == v:
                rows.append({"rank": f"rank {f.rank}", "metric": k, "value": 100 * float(v)})
    if not rows:
        return empty_figure("no exposed-communication or pipeline-bubble findings in this run", "Exposed communication and bubbles")
    df = pd.DataFrame(rows)
    fig = go.Figure()
    for m, g in df.groupby("metric", sort=True):
        fig.add_bar(x=g["rank"], y=g["value"], name=m)
    fig.update_layout(template=_TEMPLATE, barmode="group", title="Exposed communication and bubbles (% of window)",
                      height=360, yaxis={"title": "% of window", "range": [0, 100]}, meta={"bars": int(len(df))})
    return fig


def straggler_findings_frame(analysis: Analysis) -> pd.DataFrame:
    """The per-rank table of the stragglers analyzer (step time, compute and exposed comm per step)."""
    for f in analysis.findings:
        ranks = f.metrics.get("ranks") if f.analyzer == "stragglers" else None
        if isinstance(ranks, list) and ranks and isinstance(ranks[0], dict):
            df = pd.DataFrame(ranks)
            keep = [c for c in df.columns if not c.startswith("window_")]
            return df[keep]
    return pd.DataFrame()


def straggler_frame(trace: Trace) -> pd.DataFrame:
    """Ranks that arrive last at collectives. Calls are matched across ranks by op and per-rank order;
    a call's lateness is the rank's start minus the earliest start of that call (others wait that long)."""
    c = trace.collectives
    cols = ["rank", "calls", "last_arrivals", "last_pct", "mean_late_us", "max_late_us", "others_wait_ms"]
    if c.empty or c["rank"].nunique() < 2:
        return pd.DataFrame(columns=cols)
    d = pd.DataFrame({"rank": c["rank"].to_numpy(), "op": c["op"].astype(str).to_numpy(), "start": c["start_ns"].to_numpy()})
    d = d.sort_values(["rank", "op", "start"], kind="stable")
    d["seq"] = d.groupby(["rank", "op"]).cumcount()
    nranks = d["rank"].nunique()
    g = d.groupby(["op", "seq"])
    d["first"] = g["start"].transform("min")
    d["last"] = g["start"].transform("max")
    d["n"] = g["rank"].transform("size")
    d = d[d["n"] == nranks]  # calls every rank made
    if d.empty:
        return pd.DataFrame(columns=cols)
    d["late"] = d["start"] - d["first"]
    d["is_last"] = (d["start"] == d["last"]) & (d["last"] > d["first"])
    out = d.groupby("rank").agg(calls=("late", "size"), last_arrivals=("is_last", "sum"), mean_late=("late", "mean"),
                                max_late=("late", "max"), wait=("late", "sum")).reset_index()
    out["last_pct"] = (100 * out["last_arrivals"] / out["calls"]).round(1)
    out["mean_late_us"] = (out["mean_late"] / 1e3).round(2)
    out["max_late_us"] = (out["max_late"] / 1e3).round(2)
    out["others_wait_ms"] = (out["wait"] * (nranks - 1) / 1e6).round(3)
    out = out.sort_values(["last_arrivals", "mean_late"], ascending=False)
    return out[cols].reset_index(drop=True)


# ====================================================================================== memory
def memory_figure(trace: Trace, max_points: int = 4000) -> go.Figure:
    """GPU memory over time on the timeline's clock: the running sum of allocation events per rank,
    device and source (nsys ``--cuda-memory-usage``, a PyTorch memory snapshot's trace), allocated blocks
    (alloc/free) and reserved segments (segment_*) apart, and every memory counter; a counter sampled once
    (a snapshot's allocator state) is a marker."""
    me = trace.memory_events
    origin = run_origin_ns(trace)
    fig = go.Figure()
    n = 0
    if len(me):
        kind = me["kind"].astype(str).to_numpy()
        series = np.where(np.char.startswith(kind.astype(str), "segment"), "reserved", "allocated")
        d = pd.DataFrame({"rank": me["rank"].to_numpy(), "dev": me["device_id"].to_numpy(), "src": me["source"].astype(str).to_numpy(),
                          "series": series, "ts": me["ts_ns"].to_numpy(np.int64), "b": me["bytes"].to_numpy(np.float64),
                          "free": np.char.startswith(kind.astype(str), "free") | (kind == "segment_free")})
        for (rank, dev, src, ser), g in d.groupby(["rank", "dev", "src", "series"], sort=True):
            g = g.sort_values("ts", kind="stable")
            b = g["b"].to_numpy()
            delta = np.where(b < 0, b, np.where(g["free"].to_numpy(), -b, b))
            t = (g["ts"].to_numpy() - origin) * 1e-6
            y = np.cumsum(delta)
            t, y = _downsample_step(t, y, max_points)
            fig.add_trace(go.Scatter(x=t, y=y / 2**30, mode="lines+markers" if len(t) == 1 else "lines", line={"shape": "hv"},
                                     name=f"rank {rank} GPU {dev} {ser} ({src.replace('_', ' ')})",
                                     meta={"series": ser, "source": src, "events": int(len(g))}))
            n += 1
    cnt = trace.counters
    if len(cnt):
        mem = cnt[cnt["name"].astype(str).str.contains(r"mem|reserved|allocated|kv", case=False, regex=True)]
        for (rank, dev, name), g in mem.groupby(["rank", "device_id", "name"], sort=True, observed=True):
            t = (g["ts_ns"].to_numpy(np.int64) - origin) * 1e-6
            v = g["value"].to_numpy(np.float64)
            scale = 2**30 if np.nanmax(np.abs(v)) > 2**20 else 1.0
            t, v = _downsample_step(t, v, max_points)
            one = len(t) == 1
            fig.add_trace(go.Scatter(x=t, y=v / scale, mode="markers" if one else "lines",
                                     line={"shape": "hv", "dash": "dot"}, marker={"size": 10, "symbol": "diamond"},
                                     name=f"rank {rank} {name}" + (" (GiB)" if scale > 1 else "") + (" at snapshot" if one else ""),
                                     meta={"series": str(name), "points": int(len(t))}))
            n += 1
    if n == 0:
        return empty_figure("no memory events or memory counters in this run "
                            "(nsys --cuda-memory-usage=true or torch.profiler profile_memory=True records them)", "GPU memory")
    fig.update_layout(template=_TEMPLATE, title="GPU memory over time", height=460, xaxis_title="ms since first event", showlegend=True,
                      yaxis_title="GiB", legend={"orientation": "h", "y": -0.2}, meta={"series": n})
    return fig


def _downsample_step(t: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the min and max of each of max_points/2 bins (plus the last point): the shape survives."""
    if len(t) <= max_points:
        return t, y
    bins = max_points // 2
    b = np.clip(((t - t[0]) / max(t[-1] - t[0], 1e-12) * bins).astype(np.int64), 0, bins - 1)
    df = pd.DataFrame({"b": b, "y": y})
    keep = np.unique(np.r_[df.groupby("b")["y"].idxmin().to_numpy(), df.groupby("b")["y"].idxmax().to_numpy(), len(t) - 1])
    return t[keep], y[keep]


def kv_frame(analysis: Analysis) -> pd.DataFrame:
    """KV-cache waste: the metrics of kv_fragmentation findings (and any finding with kv_ metrics)."""
    rows = []
    for f in analysis.findings:
        if f.analyzer != "kv_fragmentation" and not any(k.startswith("kv") for k in f.metrics):
            continue
        for k, v in f.metrics.items():
            if k.startswith("_"):
                continue
            rows.append({"rank": -1 if f.rank is None else int(f.rank), "metric": k, "value": _metric(v),
                         "severity": f.severity, "title": f.title})
    return pd.DataFrame(rows, columns=["rank", "metric", "value", "severity", "title"])


# ====================================================================================== compare
def per_step_frame(analysis: Analysis) -> tuple[pd.DataFrame, int]:
    """Kernel time per steady step by kernel name (summed over ranks, divided by the steady steps of each
    rank): (frame[kernel, category, count_per_step, us_per_step], steps)."""
    parts, steps_total = [], 0
    k = analysis.trace.kernels
    for r in analysis.ranks:
        kr = k[k["rank"].to_numpy() == r.rank] if len(analysis.ranks) > 1 else k
        lo, hi = r.window.start_ns, r.window.end_ns
        if hi <= lo:
            continue
        steps = max(len(r.window.steady), 1)
        steps_total = max(steps_total, steps)
        kr = in_window(kr, lo, hi)
        d = np.minimum(kr["end_ns"].to_numpy(), hi) - np.maximum(kr["start_ns"].to_numpy(), lo)
        parts.append(pd.DataFrame({"kernel": kr["name"].astype(str).to_numpy(), "category": kr["category"].astype(str).to_numpy(),
                                   "d": d / steps, "c": np.full(len(kr), 1.0 / steps)}))
    if not parts:
        return pd.DataFrame(columns=["kernel", "category", "count_per_step", "us_per_step"]), 0
    d = pd.concat(parts, ignore_index=True)
    g = d.groupby("kernel", sort=False).agg(category=("category", "first"), count_per_step=("c", "sum"), ns=("d", "sum")).reset_index()
    g["us_per_step"] = g["ns"] / 1e3
    return g.drop(columns="ns"), steps_total


def compare_frame(a: Analysis, b: Analysis) -> pd.DataFrame:
    """Per-kernel difference per step between run A and run B (B - A), largest absolute change first."""
    fa, _ = per_step_frame(a)
    fb, _ = per_step_frame(b)
    m = fa.merge(fb, on="kernel", how="outer", suffixes=("_a", "_b"))
    m["category"] = m["category_a"].where(m["category_a"].notna(), m["category_b"])
    for c in ("count_per_step_a", "count_per_step_b", "us_per_step_a", "us_per_step_b"):
        m[c] = m[c].fillna(0.0)
    m["diff_us"] = m["us_per_step_b"] - m["us_per_step_a"]
    m["diff_pct"] = np.where(m["us_per_step_a"] > 0, 100 * m["diff_us"] / m["us_per_step_a"].where(m["us_per_step_a"] > 0, 1), np.nan)
    m = m.reindex(m["diff_us"].abs().sort_values(ascending=False, kind="stable").index)
    out = m[["kernel", "category", "us_per_step_a", "us_per_step_b", "diff_us", "diff_pct", "count_per_step_a", "count_per_step_b"]]
    return out.round({"us_per_step_a": 2, "us_per_step_b": 2, "diff_us": 2, "diff_pct": 1, "count_per_step_a": 2,
                      "count_per_step_b": 2}).reset_index(drop=True)


def step_time(analysis: Analysis) -> float:
    """Median steady step (ms) of the first rank with steps, else the steady window length."""
    for r in analysis.ranks:
        if len(r.window.steady):
            return float(np.median(r.window.steady["duration_ns"])) / 1e6
    return analysis.ranks[0].window.duration_ns / 1e6 if analysis.ranks else float("nan")


def compare_figure(a: Analysis, b: Analysis, name_a: str = "A", name_b: str = "B", top: int = 15) -> go.Figure:
    """The kernels whose time per step changed most from run A to run B."""
    df = compare_frame(a, b)
    if df.empty:
        return empty_figure("no steady-state kernels to compare", "Per-kernel difference per step")
    d = df.head(top).iloc[::-1]
    fig = go.Figure(go.Bar(x=d["diff_us"], y=[_short(k, 50) for k in d["kernel"]], orientation="h",
                           marker_color=["#d62728" if v > 0 else "#2ca02c" for v in d["diff_us"]],
                           text=[f"{x:.1f} → {y:.1f} us" for x, y in zip(d["us_per_step_a"], d["us_per_step_b"])],
                           hovertemplate="%{y}<br>%{text}<br>change %{x:.1f} us per step<extra></extra>"))
    sa, sb = step_time(a), step_time(b)
    fig.update_layout(template=_TEMPLATE, height=140 + 26 * len(d), margin={"l": 330, "r": 20, "t": 60, "b": 40},
                      title={"text": f"Per-kernel time per step, {name_b} − {name_a} (step {sa:.3f} → {sb:.3f} ms)", "font": {"size": 14}},
                      xaxis_title="us per step (B − A)", meta={"bars": int(len(d)), "kernels": int(len(df))})
    return fig


def kernel_delta_figure(df: pd.DataFrame, title: str, top: int = 15) -> go.Figure:
    """Bars of the per-kernel change per step of a table with kernel, us_per_step_a/b and diff_us columns
    (gpudoctor.gate.pairs.kernel_table: the gate's numbers and kernel names)."""
    if df.empty:
        return empty_figure("no steady-state kernels to compare", title)
    d = df.head(top).iloc[::-1]
    fig = go.Figure(go.Bar(x=d["diff_us"], y=[_short(k, 50) for k in d["kernel"]], orientation="h",
                           marker_color=["#d62728" if v > 0 else "#2ca02c" for v in d["diff_us"]],
                           text=[f"{x:.1f} → {y:.1f} us" for x, y in zip(d["us_per_step_a"], d["us_per_step_b"])],
                           hovertemplate="%{y}<br>%{text}<br>change %{x:.1f} us per step<extra></extra>"))
    fig.update_layout(template=_TEMPLATE, height=140 + 26 * len(d), margin={"l": 330, "r": 20, "t": 60, "b": 40},
                      title={"text": title, "font": {"size": 14}}, xaxis_title="us per step (B − A)",
                      meta={"bars": int(len(d)), "kernels": int(len(df))})
    return fig


# ====================================================================================== summaries
def example_caption(analysis: Analysis, finding: Finding) -> str:
    """What the finding's timeline example shows: its cause or name, length and start."""
    ex = best_example(finding)
    span = example_span(analysis, finding, ex)
    if ex is None or span is None:
        return "No timed example in the evidence: the view is the rank's steady-state window."
    group = _example_group(finding, ex)
    what = ex.get("name") or ex.get("direction") or ""
    head = " · ".join(x for x in (group.replace("_", " ") if group else "", str(what)) if x)
    return (f"Example that carries the most of the saving: {head + ', ' if head else ''}{fmt_ns(span[1] - span[0])} "
            f"starting {fmt_ns(span[0] - _rank_window(analysis, finding)[0])} into the steady-state window.")


def _example_group(finding, ex) -> str:
    examples = (finding.evidence or {}).get("examples")
    if isinstance(examples, dict):
        for k, v in examples.items():
            if isinstance(v, list) and any(e is ex for e in v):
                return str(k)
    return ""


def launch_delay_figure(delays: pd.DataFrame, bins: int = 60) -> go.Figure:
    """Distribution of launch delays (kernel start minus its launch call's start), one histogram per rank,
    binned here (log-spaced bins in microseconds) so a million launches cost 60 bars."""
    if delays.empty:
        return empty_figure("no kernels matched to launch calls (needs CUDA API calls with correlation ids)", "Launch delay")
    d_us = np.maximum(delays["delay_ns"].to_numpy(np.float64), 1.0) / 1e3
    edges = np.logspace(np.log10(d_us.min()), np.log10(max(d_us.max(), d_us.min() * 1.01)), bins + 1)
    fig = go.Figure()
    for rank, g in delays.groupby("rank", sort=True):
        v = np.maximum(g["delay_ns"].to_numpy(np.float64), 1.0) / 1e3
        counts, _ = np.histogram(v, edges)
        mid = np.sqrt(edges[:-1] * edges[1:])
        fig.add_bar(x=mid, y=counts, width=np.diff(edges), name=f"rank {rank}", opacity=0.75,
                    hovertemplate="%{x:.3g} us: %{y} launches<extra></extra>", meta={"launches": int(len(g))})
    p50, p99 = np.percentile(d_us, [50, 99])
    fig.update_layout(template=_TEMPLATE, barmode="overlay", height=340,
                      title={"text": f"Launch delay: kernel start − launch call start (median {fmt_ns(p50 * 1e3)}, p99 {fmt_ns(p99 * 1e3)})",
                             "font": {"size": 14}},
                      xaxis={"type": "log", "title": "delay (us)"}, yaxis_title="launches", meta={"launches": int(len(delays))})
    return fig


def kernel_duration_figure(trace: Trace, windows: dict | None, top: int = 12) -> go.Figure:
    """Duration distribution of the kernels with the most total time (box: min, quartiles, median, max),
    quartiles computed here so a kernel launched a million times costs five numbers."""
    from gpudoctor.model.stats import in_windows
    k = trace.kernels[in_windows(trace.kernels, windows)]
    if k.empty:
        return empty_figure("no kernels in the steady-state window", "Kernel durations")
    d = pd.DataFrame({"kernel": k["name"].to_numpy(), "us": (k["end_ns"] - k["start_ns"]).to_numpy() / 1e3})
    g = d.groupby("kernel", observed=True)["us"]
    q = pd.DataFrame({"total": g.sum(), "min": g.min(), "q1": g.quantile(0.25), "med": g.median(), "q3": g.quantile(0.75),
                      "max": g.max(), "n": g.size()}).sort_values("total", ascending=False).head(top).iloc[::-1]
    names = [_short(n, 60) for n in q.index.astype(str)]
    fig = go.Figure(go.Box(y=names, q1=q["q1"], median=q["med"], q3=q["q3"], lowerfence=q["min"], upperfence=q["max"],
                           orientation="h", marker_color=COLORS["gemm"], name="duration", hoverinfo="x",
                           meta={"kernels": int(len(q))}))
    fig.update_layout(template=_TEMPLATE, height=120 + 30 * len(q), margin={"l": 20, "r": 20, "t": 50, "b": 40},
                      title={"text": f"Kernel durations (the {len(q)} kernels with most time; min, quartiles, max)", "font": {"size": 14}},
                      xaxis={"type": "log", "title": "duration (us)"}, showlegend=False, meta={"kernels": int(len(q))})
    return fig


def step_figure(steps: pd.DataFrame) -> go.Figure:
    """Per step: GPU busy time and idle time by cause (stacked), exposed communication as a line."""
    if steps.empty:
        return empty_figure("no steps found (NVTX ranges, gpudoctor.annotate.step() or torch.profiler steps mark them)", "Steps")
    fig = go.Figure()
    multi = steps["rank"].nunique() > 1
    x = [f"r{r} s{s}" if multi else str(s) for r, s in zip(steps["rank"], steps["step"])]
    fig.add_bar(x=x, y=steps["gpu_busy_ns"] / 1e6, name="GPU busy", marker_color="#1f77b4")
    idle_cols = [c for c in steps.columns if c.startswith("idle_")]
    colors = ["#fbbf24", "#f97316", "#ef4444", "#a855f7", "#10b981", "#94a3b8"]
    for i, c in enumerate(idle_cols):
        fig.add_bar(x=x, y=steps[c] / 1e6, name=c.removeprefix("idle_").removesuffix("_ns").replace("_", " ") + " (idle)",
                    marker_color=colors[i % len(colors)])
    if not idle_cols:
        fig.add_bar(x=x, y=steps["gpu_idle_ns"] / 1e6, name="GPU idle", marker_color="#cbd5e1")
    if steps["exposed_comm_ns"].any():
        fig.add_scatter(x=x, y=steps["exposed_comm_ns"] / 1e6, name="exposed communication", mode="lines+markers",
                        line={"color": COLORS["nccl"]})
    fig.update_layout(template=_TEMPLATE, barmode="stack", height=380, title={"text": "Per step: GPU busy and idle by cause", "font": {"size": 14}},
                      xaxis_title="rank / step" if multi else "step", yaxis_title="ms", meta={"steps": int(len(steps))},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def collective_summary_frame(trace: Trace) -> pd.DataFrame:
    """Per rank and collective op: calls, total and mean time, and how many calls carry a size."""
    c = trace.collectives
    cols = ["rank", "op", "calls", "total_ms", "mean_us", "max_us", "sized_calls", "total_bytes"]
    if c.empty:
        return pd.DataFrame(columns=cols)
    d = pd.DataFrame({"rank": c["rank"].to_numpy(), "op": c["op"].astype(str).to_numpy(),
                      "dur": (c["end_ns"] - c["start_ns"]).to_numpy(), "b": c["bytes"].to_numpy()})
    d["sized"] = d["b"] > 0
    d["b"] = d["b"].clip(lower=0)
    g = d.groupby(["rank", "op"], sort=True).agg(calls=("dur", "size"), total=("dur", "sum"), mean=("dur", "mean"),
                                                 mx=("dur", "max"), sized_calls=("sized", "sum"), total_bytes=("b", "sum")).reset_index()
    g["total_ms"] = (g["total"] / 1e6).round(3)
    g["mean_us"] = (g["mean"] / 1e3).round(1)
    g["max_us"] = (g["mx"] / 1e3).round(1)
    return g[cols]


_NCCL_OP = re.compile(r"nccl(?:Dev)?Kernel_([A-Za-z]+)|nccl([A-Z][a-z]+(?:[A-Z][a-z]+)*?)(?:Ring|Tree|Kernel)")


def comm_kernel_frame(trace: Trace, windows: dict | None = None) -> pd.DataFrame:
    """Communication kernels (GPU time) per rank and collective, in each rank's window: kernels, GPU
    time, share of the window. The op comes from the NCCL kernel name (ncclDevKernel_AllReduce_... ->
    all_reduce)."""
    from gpudoctor.model.stats import in_windows, window_total_ns
    cols = ["rank", "op", "kernels", "gpu_ms", "mean_us", "window_pct"]
    k = trace.kernels
    k = k[in_windows(k, windows) & (k["category"].astype(str).to_numpy() == "communication")]
    if k.empty:
        return pd.DataFrame(columns=cols)
    names = k["name"].astype(str)
    op = names.str.extract(_NCCL_OP).bfill(axis=1).iloc[:, 0].fillna("other")
    op = op.str.replace(r"(?<!^)(?=[A-Z])", "_", regex=True).str.lower()
    d = pd.DataFrame({"rank": k["rank"].to_numpy(), "op": op.to_numpy(), "d": (k["end_ns"] - k["start_ns"]).to_numpy()})
    g = d.groupby(["rank", "op"], sort=True)["d"].agg(["size", "sum", "mean"]).reset_index()
    span = {int(r): window_total_ns(k[k["rank"].to_numpy() == r], windows) for r in g["rank"].unique()}
    g["kernels"] = g["size"]
    g["gpu_ms"] = (g["sum"] / 1e6).round(3)
    g["mean_us"] = (g["mean"] / 1e3).round(1)
    g["window_pct"] = (100 * g["sum"] / g["rank"].map(span).clip(lower=1)).round(1)
    return g[cols]


def collective_time_figure(trace: Trace, windows: dict | None = None) -> go.Figure:
    """GPU time of the communication kernels per rank, by collective, as % of each rank's window (what
    the bandwidth chart cannot show when message sizes are unknown)."""
    d = comm_kernel_frame(trace, windows)
    if d.empty:
        return empty_figure("no communication kernels in the steady-state window", "Communication kernel time")
    fig = go.Figure()
    for op, g in d.groupby("op", sort=True):
        fig.add_bar(x=[f"rank {r}" for r in g["rank"]], y=g["window_pct"], name=op,
                    customdata=np.c_[g["gpu_ms"], g["kernels"]],
                    hovertemplate="%{x}: %{y:.1f}% of the window (%{customdata[0]:.2f} ms, %{customdata[1]} kernels)<extra>"
                    + op + "</extra>")
    fig.update_layout(template=_TEMPLATE, barmode="stack", height=340, yaxis={"title": "% of window", "range": [0, 100]},
                      title={"text": "Communication kernels: GPU time per rank (steady-state window)", "font": {"size": 14}},
                      meta={"bars": int(len(d))})
    return fig
