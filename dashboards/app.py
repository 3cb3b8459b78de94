"""The Dash app: layout and callbacks only; every figure and table comes from dashboards/figures.py.

Runs are analyzed before the app starts and held in memory; the browser selects them by index (an
integer checked against the list), so no path or file name sent by a browser is ever opened. Plotly.js
and Dash's own scripts are served by the app itself (no CDN): the dashboard works offline.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gpudoctor.analyzers.source_lines import where
from gpudoctor.dashboards import figures as F
from gpudoctor.dashboards.timeline import TimelineIndex
from gpudoctor.model import stats
from gpudoctor.render import summaries as S

if TYPE_CHECKING:  # dash and plotly are imported where the app is built (optional dependencies)
    import dash
    import plotly.graph_objects as go

PAGES = [("/", "Overview"), ("/timeline", "Timeline"), ("/kernels", "Kernels"), ("/summaries", "Summaries"), ("/roofline", "Roofline"),
         ("/communication", "Communication"), ("/memory", "Memory"), ("/compare", "Compare")]
PAGE_SIZE = 50


@dataclass
class Run:
    """One analyzed run and what the pages derive from it (built once, on first use)."""

    name: str
    analysis: object
    ceilings: dict | None = None
    _cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def cached(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._cache:
                self._cache[key] = fn()
            return self._cache[key]

    @property
    def index(self) -> TimelineIndex:
        return self.cached("index", lambda: TimelineIndex.from_trace(self.analysis.trace))

    def kernel_table(self, scope: str) -> pd.DataFrame:
        return self.cached(("kernels", scope), lambda: F.kernel_table(self.analysis, scope))

    def summaries(self) -> dict[str, pd.DataFrame]:
        """The summary tables (raw: ns and fractions), built once."""
        return self.cached("summaries", lambda: S.tables(self.analysis))

    def launch_delays(self) -> pd.DataFrame:
        return self.cached("launch_delays", lambda: stats.launch_delays(self.analysis.trace, S.windows(self.analysis)))

    def findings(self) -> pd.DataFrame:
        return self.cached("findings", lambda: F.findings_frame(self.analysis))

    def category_frame(self) -> pd.DataFrame:
        return self.cached("category_frame", lambda: F.category_frame(self.analysis))

    def rank_frame(self) -> pd.DataFrame:
        return self.cached("rank_frame", lambda: F.rank_frame(self.analysis))

    def default_timeline(self) -> go.Figure:
        """The Timeline page's first view (the steady-state window), built once."""
        return self.cached("default_timeline", lambda: _timeline(self, F.default_view(self.analysis)))

    def whole_timeline(self) -> go.Figure:
        """The whole run, zoomed out."""
        return self.cached("whole_timeline", lambda: _timeline(self, None))

    def prepare(self) -> None:
        """Build what the first page views need (timeline index, tables, figures) ahead of the first request."""
        self.index
        self.findings()
        self.rank_frame()
        self.category_frame()
        self.default_timeline()


def _table(id_, df: pd.DataFrame, page_size: int = PAGE_SIZE, hidden=(), **kw):
    from dash import dash_table
    return dash_table.DataTable(
        id=id_, data=df.to_dict("records"),
        columns=[{"name": c, "id": c} for c in df.columns if not c.startswith("_") and c != "id" and c not in hidden],
        page_size=page_size, sort_action="native",
        style_table={"overflowX": "auto"},
        style_cell={"fontFamily": "system-ui, sans-serif", "fontSize": 13, "textAlign": "left", "padding": "4px 8px",
                    "maxWidth": 520, "overflow": "hidden", "textOverflow": "ellipsis", "whiteSpace": "nowrap"},
        style_header={"fontWeight": "600", "backgroundColor": "#f3f4f6"},
        tooltip_duration=None, **kw)


def host_allowed(host_header: str | None, names: Iterable[str] = ()) -> bool:
    """True when a request's Host header names this server: an IP literal, ``localhost`` or one of
    ``names``. Any other name is refused: a DNS-rebinding page reaches the server under the attacker's
    domain name, never under an IP literal the browser would treat as another origin."""
    host = (host_header or "").strip().lower()
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if not name:
        return False
    if name == "localhost" or name in {n.lower() for n in names}:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


MAX_TIME_NS = 1 << 62  # views and indexes beyond this are not times (client input is checked against it)


def _int_or_prevent(value, lo: int = -MAX_TIME_NS, hi: int = MAX_TIME_NS) -> int:
    """A client-sent integer within [lo, hi); anything else (text, inf, 1e400, booleans) ends the
    callback without an update instead of an HTTP 500."""
    from dash.exceptions import PreventUpdate

    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PreventUpdate
    try:
        i = int(value)
    except (TypeError, ValueError, OverflowError):
        raise PreventUpdate from None
    if not lo <= i < hi:
        raise PreventUpdate
    return i


def _view_or_prevent(view) -> tuple[int, int]:
    from dash.exceptions import PreventUpdate

    if not isinstance(view, (list, tuple)) or len(view) != 2:
        raise PreventUpdate
    a, b = (_int_or_prevent(v) for v in view)
    if b <= a:
        raise PreventUpdate
    return a, b


def create_app(runs: list[Run], prepare: bool = True, allowed_hosts: Iterable[str] = ()) -> dash.Dash:
    """The Dash app serving ``runs`` (already analyzed). ``prepare`` builds timeline indexes up front.
    Requests whose Host header is not ``host_allowed`` (with ``allowed_hosts``) get 403."""
    import dash
    from dash import dcc, html

    if not runs:
        raise ValueError("the dashboard needs at least one run")
    if prepare:
        for r in runs:
            r.prepare()

    # Everything is served by the app itself (serve_locally; no assets folder): the dashboard works offline
    # and the server exposes no file of the working directory.
    app = dash.Dash(__name__, title="gpudoctor", suppress_callback_exceptions=True, serve_locally=True,
                    assets_folder="__no_assets__", update_title=None)

    @app.server.before_request
    def _check_host():
        from flask import request
        if not host_allowed(request.host, allowed_hosts):
            return "gpudoctor dashboard: unexpected Host header (see --allowed-host)", 403
        return None

    def run_of(value) -> Run:
        return runs[_int_or_prevent(value, 0, len(runs))]

    plotly_src = app.get_relative_path("/_dash-component-suites/plotly/package_data/plotly.min.js")
    app.index_string = app.index_string.replace(
        "{%css%}", "{%css%}\n        " + _plotly_loader(plotly_src, app.get_relative_path("/")), 1)

    run_options = [{"label": f"{i}: {r.name}", "value": i} for i, r in enumerate(runs)]
    nav = html.Nav([dcc.Link(label, href=path, id=f"nav-{label.lower()}",
                             style={"marginRight": "18px", "textDecoration": "none", "fontWeight": "600"})
                    for path, label in PAGES], style={"margin": "8px 0 14px"})
    app.layout = html.Div([
        dcc.Location(id="url"),
        dcc.Store(id="focus", storage_type="session"),
        html.Div([
            html.H2("gpudoctor", style={"margin": "0 24px 0 0", "display": "inline-block"}),
            html.Span("run ", style={"marginRight": "6px"}),
            dcc.Dropdown(id="run", options=run_options, value=0, clearable=False, persistence=True,
                         persistence_type="session", style={"width": "520px", "display": "inline-block", "verticalAlign": "middle"}),
        ], style={"display": "flex", "alignItems": "center"}),
        nav,
        html.Div(id="page"),
    ], style={"fontFamily": "system-ui, sans-serif", "margin": "12px 20px"})

    _page_callbacks(app, runs, run_of)
    _finding_callbacks(app, runs, run_of)
    _timeline_callbacks(app, runs, run_of)
    _table_callbacks(app, runs, run_of)
    return app


def _page_overview(i: int, run: Run):
    from dash import html
    a = run.analysis
    fdf = run.findings()
    inputs = ", ".join(str(x.get("path", "")) for x in a.inputs)
    dropped = a.dropped
    return html.Div([
        html.H3(f"Overview — {run.name}"),
        html.Div(f"inputs: {inputs}", className="muted", style={"color": "#555", "fontSize": 13}),
        html.Div([html.Div(f"error: {e}", style={"color": "#b91c1c"}) for e in a.errors]),
        html.Div(f"dropped events: {', '.join(f'{k}: {v}' for k, v in dropped.items())}" if dropped else "",
                 style={"color": "#92400e", "fontSize": 13}),
        html.H4(f"Findings ({len(fdf)}), largest estimated saving first — click one for its evidence"),
        _findings_table(fdf),
        html.Div(id="finding-detail", style={"margin": "12px 0", "padding": "8px 12px", "background": "#f9fafb",
                                             "border": "1px solid #e5e7eb", "borderRadius": "6px"},
                 children=html.Em("No finding selected.")),
        html.H4("Ranks"),
        _html_table("ranks-table", run.rank_frame()),
        html.H4("Time by category (% of the steady-state window)"),
        _category_bars(run.category_frame()),
    ])

def _page_timeline(i: int, run: Run, focus):
    from dash import dcc, html
    from dash.exceptions import PreventUpdate
    view = None
    if isinstance(focus, dict) and focus.get("run") == i and focus.get("view"):
        try:
            view = _view_or_prevent(focus["view"])
        except PreventUpdate:
            view = None  # a stored view that is not a time range: show the default
    fig = _timeline(run, view) if view is not None else run.default_timeline()
    return html.Div([
        html.H3(f"Timeline — {run.name}"),
        html.Div([
            html.Button("Zoom out (whole run)", id="timeline-reset", n_clicks=0, style={"marginRight": "10px"}),
            html.Button("Steady-state window", id="timeline-window", n_clicks=0, style={"marginRight": "16px"}),
            html.Span(_status(fig), id="timeline-status", style={"fontSize": 13, "color": "#374151"}),
        ], style={"marginBottom": "6px"}),
        html.Div("Drag to zoom, shift-drag to pan; kernels appear one by one once fewer than "
                 f"{F.MAX_EXACT:,} are in view.", style={"fontSize": 12, "color": "#6b7280"}),
        dcc.Graph(id="timeline-graph", figure=fig, config={"displaylogo": False, "scrollZoom": True}),
        dcc.Store(id="timeline-range"),
    ])

def _page_kernels(i: int, run: Run):
    from dash import dcc, html
    t = run.kernel_table("steady")
    cats = sorted(set(t["category"])) if len(t) else []
    return html.Div([
        html.H3(f"Kernels — {run.name}"),
        html.Div([
            dcc.Input(id="kernel-filter", type="text", placeholder="filter kernel names (substring)", debounce=False,
                      style={"width": "320px", "marginRight": "12px"}),
            dcc.Dropdown(id="kernel-category", options=[{"label": c, "value": c} for c in cats], multi=True,
                         placeholder="categories", style={"width": "320px", "display": "inline-block", "verticalAlign": "middle"}),
            dcc.RadioItems(id="kernel-scope", options=[{"label": " steady-state window", "value": "steady"},
                                                        {"label": " whole trace", "value": "all"}],
                           value="steady", inline=True, style={"display": "inline-block", "marginLeft": "16px"}),
        ]),
        html.Div(id="kernel-count", style={"margin": "8px 0", "fontSize": 13}),
        _table("kernel-table", t, filter_action="native", page_action="native",
               style_cell_conditional=[{"if": {"column_id": "signature"}, "maxWidth": "360px"},
                                       {"if": {"column_id": "kernel"}, "maxWidth": "380px"}]),
        dcc.Graph(id="kernel-category-graph", config={"displaylogo": False}),
    ])

def _page_summaries(i: int, run: Run):
    from dash import dcc, html
    tabs = run.summaries()
    a = run.analysis
    children = [html.H3(f"Summaries — {run.name}"),
                html.Div("Times in microseconds; the steady-state window of each rank (operators: the whole trace). "
                         "`gpudoctor analyze --summary KIND` prints them, `--csv DIR` writes them.",
                         style={"fontSize": 12, "color": "#6b7280"})]
    figs = {"kernels": lambda: F.kernel_duration_figure(a.trace, S.windows(a)),
            "steps": lambda: F.step_figure(tabs["steps"]),
            "launch": lambda: F.launch_delay_figure(run.launch_delays())}
    for kind in S.KINDS:
        df = tabs[kind]
        children.append(html.H4(S.TITLES[kind]))
        if kind in figs:
            children.append(dcc.Graph(id=f"summary-{kind}-graph", figure=figs[kind](), config={"displaylogo": False}))
        children.append(_table(f"summary-{kind}-table", S.display(df), page_size=15) if len(df)
                        else html.Em(f"None: {S.EMPTY_WHY[kind]}.", id=f"summary-{kind}-empty"))
    return html.Div(children)

def _page_roofline(i: int, run: Run):
    from dash import dcc, html
    trace = run.analysis.trace
    fig = F.roofline_figure(trace, run.ceilings)
    children = [html.H3(f"Roofline — {run.name}"), dcc.Graph(id="roofline-graph", figure=fig, config={"displaylogo": False})]
    if not trace.kernel_metrics.empty and not fig.layout.meta.get("empty"):
        ceil, _ = F.resolve_ceilings(trace, run.ceilings)
        rf = F.roofline_frame(trace, ceil)
        show = pd.DataFrame({"kernel": rf["name"].astype(str), "precision": rf["dominant_precision"],
                             "flop_per_byte": rf["arithmetic_intensity"].round(2),
                             "tflop_s": (rf["achieved_flops_per_s"] / 1e12).round(2),
                             "roof_pct": (100 * rf["roof_fraction"]).round(1), "bound": rf["bound"],
                             "tensor_pipe_pct": (100 * rf["tensor_pipe_fraction"]).round(1)})
        children.append(_table("roofline-table", show))
    return html.Div(children)

def _page_communication(i: int, run: Run):
    from dash import dcc, html
    a = run.analysis
    strag = F.straggler_frame(a.trace)
    strag_f = F.straggler_findings_frame(a)
    cf = F.comm_findings_frame(a)
    link = F.analysis_link_ceiling(a, run.ceilings)
    return html.Div([
        html.H3(f"Communication — {run.name}"),
        dcc.Graph(id="comm-bw-graph", figure=F.comm_bandwidth_figure(a.trace, run.ceilings, link), config={"displaylogo": False}),
        dcc.Graph(id="comm-fraction-graph", figure=F.comm_fraction_figure(a), config={"displaylogo": False}),
        dcc.Graph(id="comm-time-graph", figure=F.collective_time_figure(a.trace, S.windows(a)), config={"displaylogo": False}),
        html.H4("Communication kernels per rank and collective (steady-state window)"),
        _table("comm-kernel-table", F.comm_kernel_frame(a.trace, S.windows(a))),
        html.H4("Collective calls per rank and op (host side, whole trace)"),
        _table("comm-summary-table", F.collective_summary_frame(a.trace)) if len(a.trace.collectives)
        else html.Em("No collectives in this run."),
        html.H4("Exposed communication and bubbles (findings)"),
        _table("comm-findings-table", cf) if len(cf) else html.Em("No communication findings in this run."),
        html.H4("Stragglers (last rank to arrive at each collective)"),
        _table("straggler-table", strag) if len(strag) else html.Em("Needs collectives from two or more ranks."),
        html.H4("Per-rank step time (stragglers analyzer)"),
        _table("straggler-ranks-table", strag_f) if len(strag_f) else html.Em("No straggler finding in this run."),
    ])

def _page_memory(i: int, run: Run):
    from dash import dcc, html
    a = run.analysis
    kv = F.kv_frame(a)
    return html.Div([
        html.H3(f"Memory — {run.name}"),
        dcc.Graph(id="memory-graph", figure=F.memory_figure(a.trace), config={"displaylogo": False}),
        html.H4("KV cache"),
        _table("kv-table", kv) if len(kv) else html.Em("No KV-cache finding in this run."),
    ])

def _page_compare(i: int, run: Run, runs: list[Run]):
    from dash import dcc, html

    run_options = [{"label": f"{k}: {r.name}", "value": k} for k, r in enumerate(runs)]
    b = 1 if len(runs) > 1 else 0
    return html.Div([
        html.H3("Compare two runs"),
        html.Div([
            html.Span("A "), dcc.Dropdown(id="compare-a", options=run_options, value=i, clearable=False,
                                          style={"width": "420px", "display": "inline-block", "verticalAlign": "middle"}),
            html.Span("  B ", style={"marginLeft": "16px"}),
            dcc.Dropdown(id="compare-b", options=run_options, value=b if b != i else 0, clearable=False,
                         style={"width": "420px", "display": "inline-block", "verticalAlign": "middle"}),
        ]),
        html.Div(id="compare-summary", style={"margin": "10px 0", "fontSize": 14}),
        dcc.Graph(id="compare-graph", config={"displaylogo": False}),
        html.Div(id="compare-table-wrap"),
    ])


def _page_callbacks(app: dash.Dash, runs: list[Run], run_of: Callable[[Any], Run]) -> None:
    """The page shown for the URL and the run."""
    from dash import Input, Output, State, dcc, html

    @app.callback(Output("page", "children"), Input("url", "pathname"), Input("run", "value"), State("focus", "data"))
    def render_page(path, run_value, focus):
        run = run_of(run_value)
        i = _int_or_prevent(run_value, 0, len(runs))
        path = (path if isinstance(path, str) else "/").rstrip("/") or "/"
        if path == "/timeline":
            return _page_timeline(i, run, focus)
        if path == "/kernels":
            return _page_kernels(i, run)
        if path == "/summaries":
            return _page_summaries(i, run)
        if path == "/roofline":
            return _page_roofline(i, run)
        if path == "/communication":
            return _page_communication(i, run)
        if path == "/memory":
            return _page_memory(i, run)
        if path == "/compare":
            return _page_compare(i, run, runs)
        if path == "/":
            return _page_overview(i, run)
        return html.Div([html.H3("Not found"), dcc.Link("Overview", href="/")])



def _finding_callbacks(app: dash.Dash, runs: list[Run], run_of: Callable[[Any], Run]) -> None:
    """A finding's evidence, and a source line's gaps, on the overview's timeline."""
    import dash
    from dash import ALL, Input, Output, State, dcc, html
    from dash.exceptions import PreventUpdate

    # ------------------------------------------------------------------ overview: a finding's evidence
    @app.callback(Output("finding-detail", "children"), Output("focus", "data"),
                  Input({"type": "finding-row", "index": ALL}, "n_clicks"), State("run", "value"), prevent_initial_call=True)
    def show_finding(clicks, run_value):
        trig = dash.ctx.triggered_id
        if not isinstance(trig, dict) or not any(clicks or []):
            raise PreventUpdate
        run = run_of(run_value)
        idx = _int_or_prevent(trig.get("index"), 0, len(run.analysis.findings))
        f = run.analysis.findings[idx]
        span = F.finding_span(run.analysis, f)
        fig = _timeline(run, span)
        detail = html.Div([
            html.H4(f"{f.severity.upper()} · {f.analyzer} · rank {f.rank}: {f.title}", id="finding-title"),
            html.P([html.B("Recommendation: "), f.recommendation]),
            html.P([html.B("Estimated saving: "),
                    f"{F.fmt_ns(f.estimated_saving_ns)} per steady-state window ({100 * f.estimated_saving_fraction:.1f}%)"]),
            html.Details([html.Summary("Metrics"), html.Pre(json.dumps(f.metrics, indent=1, default=_json_default))], open=True),
            html.Details([html.Summary("Evidence"), html.Pre(json.dumps(f.evidence, indent=1, default=_json_default),
                                                             id="finding-evidence", style={"maxHeight": "300px", "overflow": "auto"})]),
            html.Div([html.B("Example in the timeline "),
                      dcc.Link("(open in Timeline →)", href="/timeline", id="finding-timeline-link")]),
            html.P(F.example_caption(run.analysis, f), id="finding-example", style={"fontSize": 13, "margin": "4px 0"}),
            _source_lines(f),
            dcc.Graph(id="finding-timeline", figure=fig, config={"displaylogo": False}),
        ])
        return detail, {"run": int(run_value), "view": [int(span[0]), int(span[1])], "finding": idx}

    # ------------------------------------------------------------------ a source line's gaps on the timeline
    @app.callback(Output("finding-timeline", "figure"), Output("focus", "data", allow_duplicate=True),
                  Input({"type": "frame-gap", "frame": ALL, "gap": ALL}, "n_clicks"),
                  State("run", "value"), State("focus", "data"), prevent_initial_call=True)
    def show_frame_gap(clicks, run_value, focus):
        trig = dash.ctx.triggered_id
        if not isinstance(trig, dict) or not any(clicks or []) or not isinstance(focus, dict):
            raise PreventUpdate
        run = run_of(run_value)
        f = run.analysis.findings[_int_or_prevent(focus.get("finding"), 0, len(run.analysis.findings))]
        span = F.frame_gap_span(run.analysis, f, _int_or_prevent(trig.get("frame"), 0, 1000),
                                _int_or_prevent(trig.get("gap"), 0, 1000))
        if span is None:
            raise PreventUpdate
        return _timeline(run, span), dict(focus, view=[span[0], span[1]])



def _timeline_callbacks(app: dash.Dash, runs: list[Run], run_of: Callable[[Any], Run]) -> None:
    """Zoom and pan of the timeline page."""
    import dash
    from dash import Input, Output, State
    from dash.exceptions import PreventUpdate

    # ------------------------------------------------------------------ timeline zoom / pan
    # Only x-range changes reach the server: plotly also reports autosize / hover / legend relayouts, and
    # a second request for this callback while the first is in flight would make Dash drop the first.
    app.clientside_callback(
        """function(r) {
            const no = window.dash_clientside.no_update;
            if (!r) return no;
            for (const ax of ['xaxis', 'xaxis2']) {
                if (r[ax + '.autorange']) return {'xaxis.autorange': true, 't': Date.now()};
                let a = r[ax + '.range[0]'], b = r[ax + '.range[1]'];
                if (a === undefined && Array.isArray(r[ax + '.range'])) { a = r[ax + '.range'][0]; b = r[ax + '.range'][1]; }
                if (a !== undefined && b !== undefined) return {'xaxis.range[0]': a, 'xaxis.range[1]': b, 't': Date.now()};
            }
            return no;
        }""",
        Output("timeline-range", "data"), Input("timeline-graph", "relayoutData"), prevent_initial_call=True)

    @app.callback(Output("timeline-graph", "figure"), Output("timeline-status", "children"),
                  Input("timeline-range", "data"), Input("timeline-reset", "n_clicks"),
                  Input("timeline-window", "n_clicks"), State("run", "value"), prevent_initial_call=True)
    def zoom(relayout, _reset, _window, run_value):
        run = run_of(run_value)
        trig = dash.ctx.triggered_id
        if trig == "timeline-reset":
            view = None
        elif trig == "timeline-window":
            r = run.analysis.ranks[0] if run.analysis.ranks else None
            if r is None or r.window.end_ns <= r.window.start_ns:
                raise PreventUpdate
            view = (r.window.start_ns, r.window.end_ns)
        else:
            try:
                v = F.relayout_view(relayout, run.index.origin_ns)
            except (TypeError, ValueError, OverflowError, AttributeError, KeyError):
                raise PreventUpdate from None
            if v is None:
                raise PreventUpdate
            view = None if v == "reset" else _view_or_prevent(v)
        fig = _timeline(run, view) if view is not None else run.whole_timeline()
        return fig, _status(fig)



def _table_callbacks(app: dash.Dash, runs: list[Run], run_of: Callable[[Any], Run]) -> None:
    """The kernels table's filter and the comparison of two runs."""
    from dash import Input, Output, State, html

    # ------------------------------------------------------------------ kernels table
    @app.callback(Output("kernel-table", "data"), Output("kernel-count", "children"),
                  Output("kernel-category-graph", "figure"),
                  Input("kernel-filter", "value"), Input("kernel-category", "value"), Input("kernel-scope", "value"),
                  State("run", "value"))
    def filter_kernels(text, cats, scope, run_value):
        run = run_of(run_value)
        t = run.kernel_table("all" if scope == "all" else "steady")
        shown = filter_kernel_table(t, text, cats)
        msg = f"{len(shown):,} of {len(t):,} kernels" + (f" matching “{text}”" if text else "")
        return shown.to_dict("records"), msg, F.kernel_category_figure(shown)

    # ------------------------------------------------------------------ compare
    @app.callback(Output("compare-summary", "children"), Output("compare-graph", "figure"),
                  Output("compare-table-wrap", "children"), Input("compare-a", "value"), Input("compare-b", "value"))
    def do_compare(va, vb):
        from gpudoctor.gate.compare import fmt_value, metric_line
        from gpudoctor.gate.pairs import compare_analyses, kernel_table

        a, b = run_of(va), run_of(vb)
        result = compare_analyses(a.analysis, b.analysis, a.name, b.name)  # what `gpudoctor gate` decides
        g = next((m for m in result.metrics if m.spec.name == "gpu_time"), None)
        sa, sb = (g.decision.median_baseline, g.decision.median_candidate) if g else (None, None)
        df = kernel_table(result)
        summary = html.Div([
            html.Span(f"A = {a.name}: GPU time per step {fmt_value(sa, 'ns')}", id="compare-a-step"), html.Br(),
            html.Span(f"B = {b.name}: GPU time per step {fmt_value(sb, 'ns')}", id="compare-b-step"), html.Br(),
            html.B(f"gate (A baseline, B candidate): {result.status}" + (f" — {metric_line(g)}" if g else ""),
                   id="compare-verdict"),
        ])
        fig = F.kernel_delta_figure(df, f"Per-kernel time per step, B − A ({fmt_value(sa, 'ns')} → {fmt_value(sb, 'ns')} GPU time)")
        return summary, fig, _table("compare-table", df, page_size=25)




_CELL = {"border": "1px solid #e5e7eb", "padding": "4px 8px", "textAlign": "left", "verticalAlign": "top", "fontSize": 13}
_SEVERITY_STYLE = {"high": {"color": "#b91c1c", "fontWeight": 700}, "medium": {"color": "#c2410c", "fontWeight": 700},
                   "low": {"color": "#a16207"}, "info": {"color": "#6b7280"}}


def _plotly_loader(src: str, overview_path: str) -> str:
    """Script tags that load plotly.js (4.8 MB; ~1-2 s to evaluate on a small machine) off the critical path.

    dcc.Graph asks for ``window.Plotly`` only when its first figure mounts and otherwise injects the script
    itself then, after the page's callbacks have returned: evaluation starts late. Here ``window.Plotly``
    starts as a thenable that loads the script once (dcc.Graph awaits it through ``Promise.resolve``, and
    plotly.js replaces it with itself when evaluated). Pages with graphs start the load at once, so the
    evaluation overlaps Dash's own start-up requests; the Overview, which draws no graph, only prefetches
    the file and evaluates it when the pointer reaches the page links or the page has been idle a while.
    """
    return (f'<link rel="prefetch" as="script" href="{src}">\n'
            "<script>(function () {\n"
            f"  var src = {json.dumps(src)}, overview = {json.dumps(overview_path.rstrip('/') or '/')}, loading = null;\n"
            "  function load() {\n"
            "    if (!loading) loading = new Promise(function (resolve, reject) {\n"
            "      var s = document.createElement('script'); s.src = src; s.async = true;\n"
            "      s.onload = function () { resolve(window.Plotly); }; s.onerror = reject;\n"
            "      document.head.appendChild(s);\n"
            "    });\n"
            "    return loading;\n"
            "  }\n"
            "  window.Plotly = {then: function (ok, fail) { return load().then(ok, fail); }};\n"
            "  var path = location.pathname.replace(/\\/+$/, '') || '/';\n"
            "  if (path !== overview) { load(); return; }\n"
            "  window.addEventListener('load', function () {\n"
            "    document.addEventListener('pointerover', function (e) {\n"
            "      if (e.target.closest && e.target.closest('nav')) load();\n"
            "    }, {passive: true});\n"
            "    setTimeout(function () { (window.requestIdleCallback || setTimeout)(load); }, 4000);\n"
            "  });\n"
            "})();</script>")


def _html_table(id_: str, df: pd.DataFrame, row_ids: list | None = None, row_class: str = "", max_chars: int = 140):
    """A plain HTML table (cheap to render: the Overview needs neither dash_table nor plotly.js)."""
    from dash import html

    cols = [c for c in df.columns if not str(c).startswith("_")]
    head = html.Thead(html.Tr([html.Th(c, style={**_CELL, "background": "#f3f4f6"}) for c in cols]))
    body = []
    for i, row in enumerate(df[cols].itertuples(index=False, name=None)):
        cells = []
        for c, v in zip(cols, row):
            text = "" if v is None or (isinstance(v, float) and v != v) else str(v)
            style = {**_CELL, **(_SEVERITY_STYLE.get(text, {}) if c == "severity" else {})}
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                style["textAlign"] = "right"
            short = text if len(text) <= max_chars else text[: max_chars - 1] + "…"
            cells.append(html.Td(short, title=text if short != text else None, style=style,
                                 **{"data-column": c}))
        kw = {"id": row_ids[i], "n_clicks": 0} if row_ids is not None else {}
        body.append(html.Tr(cells, className=row_class, style={"cursor": "pointer"} if row_ids is not None else None, **kw))
    return html.Table([head, html.Tbody(body)], id=id_, style={"borderCollapse": "collapse", "width": "100%", "margin": "6px 0"})


MAX_GAP_LINKS = 5


def _source_lines(f):
    """gpu_idle's source lines, each with links to its largest gaps on the timeline below."""
    from dash import html

    frames = (f.evidence or {}).get("frames") or []
    if not frames:
        return html.Div()
    items = []
    for i, fr in enumerate(frames):
        links = [html.Button(f"+{g['start_us'] / 1e3:.2f} ms ({g['dur_us'] / 1e3:.2f} ms)",
                             id={"type": "frame-gap", "frame": i, "gap": j}, n_clicks=0,
                             style={"marginLeft": "6px", "fontSize": 12})
                 for j, g in enumerate((fr.get("gaps") or [])[:MAX_GAP_LINKS])]
        what = f"{fr['idle_ns_per_step'] / 1e6:.2f} ms per step, {fr['kind']}" + (f", {fr['context']}" if fr.get("context") else "")
        if fr.get("saving_ns_per_step") is not None:
            what += f"; out of the loop it saves up to {fr['saving_ns_per_step'] / 1e6:.2f} ms per step"
        items.append(html.Li([html.Code(where(fr)), f" — {what}; its largest gaps:", *links]))
    return html.Div([html.B("Source lines that make the GPU wait (click a gap to see it below)"),
                     html.Ul(items, id="finding-frames", style={"fontSize": 13})])


def _findings_table(fdf: pd.DataFrame):
    from dash import html
    if fdf.empty:
        return html.Em("No findings.", id="findings-table")
    return _html_table("findings-table", fdf.drop(columns=["idx", "recommendation"]),
                       row_ids=[{"type": "finding-row", "index": int(i)} for i in fdf["idx"]], row_class="finding-row")


def _category_bars(cf: pd.DataFrame):
    """Per rank, one stacked bar of the window's time by category (HTML: drawn before plotly.js loads)."""
    from dash import html
    if cf.empty:
        return html.Em("No kernels in the steady-state window.", id="category-bars")
    rows = []
    for rank, g in cf.groupby("rank", sort=True):
        segs = [html.Div(f"{r.category} {100 * r.fraction:.0f}%" if r.fraction >= 0.06 else "",
                         title=f"{r.category}: {100 * r.fraction:.1f}% of the window ({F.fmt_ns(r.total_ns)})",
                         className="category-seg", **{"data-category": r.category},
                         style={"width": f"{100 * r.fraction:.3f}%", "background": F.COLORS.get(r.category, "#999"),
                                "color": "white", "fontSize": 12, "overflow": "hidden", "whiteSpace": "nowrap",
                                "padding": "4px 0", "textAlign": "center"})
                for r in g.itertuples()]
        rows.append(html.Div([html.Span(f"rank {rank}", style={"width": "70px", "fontSize": 13}),
                              html.Div(segs, style={"display": "flex", "flex": "1", "background": "#f3f4f6"})],
                             style={"display": "flex", "alignItems": "center", "margin": "4px 0"}))
    legend = [html.Span([html.Span("■ ", style={"color": F.COLORS.get(c, "#999")}), c], style={"marginRight": "14px", "fontSize": 12})
              for c in dict.fromkeys(cf["category"])]
    return html.Div(rows + [html.Div(legend)], id="category-bars")


def _status(fig) -> str:
    meta = fig.layout.meta or {}
    return meta.get("status") or meta.get("message", "")


def _timeline(run: Run, view):
    """The timeline figure for the app: the status line is shown beside the buttons, not as a title."""
    fig = F.timeline_figure(run.index, view)
    fig.update_layout(title_text="", margin_t=40)
    return fig


def filter_kernel_table(t: pd.DataFrame, text: str | None, cats: list[str] | None) -> pd.DataFrame:
    """Rows whose short name or signature contains ``text`` (case-insensitive), in the given categories."""
    keep = np.ones(len(t), dtype=bool)
    if text:
        needle = text.strip().lower()
        keep &= (t["kernel"].str.lower().str.contains(needle, regex=False)
                 | t["signature"].str.lower().str.contains(needle, regex=False)).to_numpy()
    if cats:
        keep &= t["category"].isin(cats).to_numpy()
    return t[keep]


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
