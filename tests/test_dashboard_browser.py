"""The dashboard in a real browser: Debian's Chromium driven by Playwright (see shared/testing/browser.md).

The app serves real fixture runs on a free loopback port; every page is loaded and interacted with, and
the tests assert on what is rendered (text, table rows, plotly points, axis ranges), that the browser
logged no console errors, and save screenshots to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")]

pytest.importorskip("dash")
pytest.importorskip("playwright")

ROOT = Path(__file__).resolve().parent.parent
FX = ROOT / "fixtures"
ART = ROOT / "test-artifacts"
RUNS = [FX / "nsys" / "attn_naive.nsys.sqlite", FX / "nsys" / "attn_sdpa.nsys.sqlite", FX / "ncu" / "ncu_kernels.raw.csv",
        FX / "torch" / "attn_naive.torch.json.gz"]
# runs of several inputs each (one run = all inputs of one analyze call)
MULTI = {"ddp_comm_bound (2x H200, nsys)": [FX / "multigpu" / f"ddp_comm_bound_rank{r}.sqlite" for r in (0, 1)],
         "kv_static (nsys + memory snapshot)": [FX / "nsys" / "kv_static.nsys.sqlite", FX / "kv" / "kv_static.snapshot.pickle"],
         "decode (nsys)": [FX / "nsys" / "decode.nsys.sqlite"],
         "item_sync (torch, sampled stacks)": [FX / "pysamples" / "torch_item_sync"]}
NAIVE, SDPA, NCU, TORCH, COMM, DDP, KV, DECODE, ITEM_SYNC = range(9)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {**browser_type_launch_args, "executable_path": shutil.which("chromium"), "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1400, "height": 1000}}


def _comm_run(base):
    """attn_naive on two ranks plus synthetic all_reduce calls (rank 1 arrives 200 us late): no fixture has
    NCCL, it was recorded on one GPU."""
    from gpudoctor.model.trace import Trace, conform
    from gpudoctor.pipeline import analyze
    k1 = base.trace.kernels.copy()
    k1["rank"] = 1
    t = Trace(devices=conform("devices", pd.concat([base.trace.devices, base.trace.devices.assign(rank=1)])),
              ranks=conform("ranks", pd.DataFrame({"rank": [0, 1]})),
              kernels=conform("kernels", pd.concat([base.trace.kernels, k1], ignore_index=True)), meta={"inputs": []})
    w0 = base.ranks[0].window.start_ns
    rows = [{"rank": r, "start_ns": w0 + i * 2_000_000 + 200_000 * r, "end_ns": w0 + i * 2_000_000 + 200_000 * r
             + int(2 ** (20 + 2 * i) / 150e9 * 1e9) + 20_000, "op": "all_reduce", "bytes": 2 ** (20 + 2 * i),
             "comm_size": 2, "source": "nvtx_nccl"} for i in range(6) for r in (0, 1)]
    t.set("collectives", pd.DataFrame(rows))
    return analyze(t, [{"path": "synthetic"}], [])


@pytest.fixture(scope="module")
def server():
    from werkzeug.serving import make_server

    from gpudoctor.cli.dashboard import load_runs
    from gpudoctor.dashboards.app import Run, create_app
    from gpudoctor.pipeline import analyze_inputs

    runs = load_runs([str(p) for p in RUNS])
    runs.append(Run("synthetic 2-rank all_reduce", _comm_run(runs[NAIVE].analysis)))
    runs += [Run(name, analyze_inputs([str(p) for p in paths])) for name, paths in MULTI.items()]
    app = create_app(runs)
    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield {"url": f"http://127.0.0.1:{srv.server_port}", "runs": runs}
    srv.shutdown()
    th.join(10)


@pytest.fixture(autouse=True)
def patient(page):
    """Callbacks render server-side figures; on a loaded machine they take longer than playwright's 30 s."""
    page.set_default_timeout(90_000)


@pytest.fixture
def errors(page):
    """Console errors and uncaught exceptions of the page; each test asserts it stays empty."""
    found: list[str] = []
    page.on("console", lambda m: found.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: found.append(f"pageerror: {e}"))
    return found


def shot(page, name: str) -> None:
    ART.mkdir(exist_ok=True)
    page.screenshot(path=str(ART / f"dashboard-{name}.png"), full_page=True)


def goto(page, server, path: str, heading: str) -> None:
    page.goto(server["url"] + path)
    page.wait_for_selector(f"#page h3:has-text('{heading}')", timeout=30_000)
    page.wait_for_load_state("networkidle")


def select_option(page, dropdown_id: str, label: str) -> None:
    page.click(f"#{dropdown_id}")
    page.click(f"[role=option]:has-text('{label}')")


def select_run(page, index: int, server) -> None:
    select_option(page, "run", f"{index}: {server['runs'][index].name}")


def plot_range(page, graph_id: str) -> list[float]:
    return page.evaluate("id => document.querySelector('#' + id + ' .js-plotly-plot')._fullLayout.xaxis.range.slice()", graph_id)


def plot_meta(page, graph_id: str) -> dict:
    return page.evaluate("id => document.querySelector('#' + id + ' .js-plotly-plot')._fullLayout.meta", graph_id)


def cells(page, table_id: str, column: str) -> list[str]:
    """Texts of an HTML table's column (the Overview's tables are plain HTML)."""
    return page.locator(f"#{table_id} td[data-column='{column}']").all_inner_texts()


def rows(page, table_id: str, column: str) -> list[str]:
    return page.locator(f"#{table_id} td[data-dash-column='{column}']").all_inner_texts()


# ------------------------------------------------------------------------------------------ every page
def test_every_page_renders(page, server, errors):
    a = server["runs"][NAIVE].analysis
    goto(page, server, "/", "Overview")
    page.wait_for_selector("#findings-table td[data-column='analyzer']")
    assert cells(page, "findings-table", "analyzer")[0] == "unfused_attention"  # largest saving first
    assert len(cells(page, "findings-table", "analyzer")) == len(a.findings)
    assert cells(page, "ranks-table", "kernels") == ["1089"]
    cats = a.ranks[0].category_time
    segs = page.locator("#category-bars .category-seg")
    assert segs.count() == len(cats)
    assert sorted(segs.evaluate_all("els => els.map(e => e.dataset.category)")) == sorted(cats["category"])
    shot(page, "overview")

    goto(page, server, "/timeline", "Timeline")
    page.wait_for_selector("#timeline-graph .scatterlayer .trace", state="attached")
    # the first view is the steady-state window, kernel by kernel
    w = a.ranks[0].window
    k, m = a.trace.kernels, a.trace.memops
    n_ops = int(((k["end_ns"] > w.start_ns) & (k["start_ns"] < w.end_ns)).sum()
                + ((m["end_ns"] > w.start_ns) & (m["start_ns"] < w.end_ns)).sum())
    assert page.inner_text("#timeline-status").startswith(f"exact: {n_ops:,} GPU ops")
    origin = server["runs"][NAIVE].index.origin_ns
    assert plot_range(page, "timeline-graph") == pytest.approx([(w.start_ns - origin) / 1e6, (w.end_ns - origin) / 1e6])
    shot(page, "timeline-steady")

    goto(page, server, "/kernels", "Kernels")
    page.wait_for_selector("#kernel-table td[data-dash-column='kernel']")
    assert page.inner_text("#kernel-count") == "40 of 40 kernels"
    shot(page, "kernels")

    goto(page, server, "/roofline", "Roofline")
    assert "no Nsight Compute metrics" in page.inner_text("#roofline-graph")

    goto(page, server, "/communication", "Communication")
    assert "no collectives" in page.inner_text("#comm-bw-graph")
    assert "Needs collectives from two or more ranks" in page.inner_text("#page")

    goto(page, server, "/memory", "Memory")
    page.wait_for_selector("#memory-graph .scatterlayer .trace")
    assert "allocated" in page.locator("#memory-graph .legend").text_content()
    from gpudoctor.dashboards import figures as F
    kv = F.kv_frame(a)
    if len(kv):
        page.wait_for_selector("#kv-table td[data-dash-column='metric']")
        assert rows(page, "kv-table", "metric") == kv["metric"].tolist()[:50]
    else:
        assert "No KV-cache finding" in page.inner_text("#page")
    shot(page, "memory")

    goto(page, server, "/compare", "Compare")
    page.wait_for_selector("#compare-graph .bars .point")
    shot(page, "compare")
    assert errors == []


# ------------------------------------------------------------------------------------------ kernels
def test_kernel_filter_changes_rows(page, server, errors):
    a = server["runs"][NAIVE].analysis
    k = a.trace.kernels
    w = a.ranks[0].window
    inwin = k[(k["end_ns"] > w.start_ns) & (k["start_ns"] < w.end_ns)]
    match = inwin[inwin["name"].astype(str).str.contains("nvjet", case=False)
                  | inwin["demangled_name"].astype(str).str.contains("nvjet", case=False)]
    expect = match.groupby(["name", "demangled_name"], observed=True).ngroups
    assert 0 < expect < 40

    goto(page, server, "/kernels", "Kernels")
    page.wait_for_selector("#kernel-table td[data-dash-column='kernel']")
    assert len(rows(page, "kernel-table", "kernel")) == 40
    page.fill("#kernel-filter", "nvjet")
    page.wait_for_function(f"document.getElementById('kernel-count').innerText.startsWith('{expect} of 40')")
    names = rows(page, "kernel-table", "kernel")
    assert len(names) == expect
    assert all("nvjet" in n for n in names)
    assert set(rows(page, "kernel-table", "category")) == {"gemm"}
    # the category chart follows the filter: one bar (gemm)
    page.wait_for_function("document.querySelectorAll('#kernel-category-graph .bars .point').length == 1")
    shot(page, "kernels-filtered")
    # sorting by count (native) keeps the filtered rows
    page.click("#kernel-table th[data-dash-column='count'] .column-header--sort")
    counts = [int(c) for c in rows(page, "kernel-table", "count")]
    assert sorted(counts) == sorted(match.groupby(["name", "demangled_name"], observed=True).size().tolist())
    assert counts in (sorted(counts), sorted(counts, reverse=True))
    page.fill("#kernel-filter", "")
    page.wait_for_function("document.getElementById('kernel-count').innerText.startsWith('40 of 40')")
    assert errors == []


# ------------------------------------------------------------------------------------------ findings -> timeline
def test_clicking_a_finding_jumps_the_timeline(page, server, errors):
    from gpudoctor.dashboards import figures as F
    run = server["runs"][NAIVE]
    a = run.analysis
    top = next(f for f in a.findings if f.analyzer == "unfused_attention")
    s, e = F.finding_span(a, top)
    origin = run.index.origin_ns
    want = [(s - origin) / 1e6, (e - origin) / 1e6]

    goto(page, server, "/timeline", "Timeline")
    page.wait_for_selector("#timeline-graph .scatterlayer .trace", state="attached")
    before = plot_range(page, "timeline-graph")

    goto(page, server, "/", "Overview")
    page.click("#findings-table tr.finding-row >> nth=0")
    page.wait_for_selector("#finding-title")
    assert "unfused_attention" in page.inner_text("#finding-title")
    assert "scaled_dot_product_attention" in page.inner_text("#finding-detail")
    assert '"examples"' in page.locator("#finding-evidence").text_content()
    page.wait_for_selector("#finding-timeline .scatterlayer .trace", state="attached")
    assert plot_range(page, "finding-timeline") == pytest.approx(want)
    assert plot_meta(page, "finding-timeline")["mode"] == "exact"
    shot(page, "overview-finding")

    page.click("#finding-timeline-link")
    page.wait_for_selector("#page h3:has-text('Timeline')")
    page.wait_for_selector("#timeline-graph .scatterlayer .trace", state="attached")
    after = plot_range(page, "timeline-graph")
    assert after == pytest.approx(want)
    assert after != pytest.approx(before)
    assert page.inner_text("#timeline-status").startswith("exact:")
    shot(page, "timeline-finding")
    assert errors == []


def test_a_source_line_links_to_its_gaps(page, server, errors):
    """gpu_idle's source lines list their largest gaps; clicking one shows that gap on the finding's
    timeline, and "open in Timeline" opens it there."""
    from gpudoctor.dashboards import figures as F
    run = server["runs"][ITEM_SYNC]
    a = run.analysis
    idx = next(i for i, f in enumerate(a.findings) if f.analyzer == "gpu_idle")
    f = a.findings[idx]
    s, e = F.frame_gap_span(a, f, 0, 1)
    origin = run.index.origin_ns
    want = [(s - origin) / 1e6, (e - origin) / 1e6]
    goto(page, server, "/", "Overview")
    select_run(page, ITEM_SYNC, server)
    page.wait_for_selector(f"#findings-table tr.finding-row >> nth={idx}")
    page.click(f"#findings-table tr.finding-row >> nth={idx}")
    page.wait_for_selector("#finding-frames")
    line = page.inner_text("#finding-frames li >> nth=0")
    assert "culprits.py:62 in `step`" in line and "sync" in line
    page.wait_for_selector("#finding-timeline .scatterlayer .trace", state="attached")
    before = plot_range(page, "finding-timeline")
    page.click("#finding-frames li >> nth=0 >> button >> nth=1")
    page.wait_for_function(f"(() => {{ const g = document.querySelector('#finding-timeline .js-plotly-plot'); "
                           f"const r = g && g._fullLayout && g._fullLayout.xaxis.range; "
                           f"return r && Math.abs(r[0] - {want[0]}) < 1e-3; }})()")
    # the browser's axis range holds the gap's ends to about 0.1 us (the wait above allows 1 us)
    assert plot_range(page, "finding-timeline") == pytest.approx(want, abs=1e-3) and want != pytest.approx(before)
    shot(page, "overview-source-line-gap")
    page.click("#finding-timeline-link")
    page.wait_for_selector("#timeline-graph .scatterlayer .trace", state="attached")
    assert plot_range(page, "timeline-graph") == pytest.approx(want, abs=1e-3)
    assert errors == []


def test_timeline_zoom_shows_exact_kernels_of_a_step(page, server, errors):
    run = server["runs"][NAIVE]
    a = run.analysis
    step = a.ranks[0].window.steps.iloc[3]
    lo, hi = int(step["gpu_start_ns"]), int(step["gpu_end_ns"])
    k, m = a.trace.kernels, a.trace.memops
    n_ops = int(((k["end_ns"] > lo) & (k["start_ns"] < hi)).sum() + ((m["end_ns"] > lo) & (m["start_ns"] < hi)).sum())
    origin = run.index.origin_ns

    goto(page, server, "/timeline", "Timeline")
    page.wait_for_selector("#timeline-graph .scatterlayer .trace", state="attached")
    # zoom like a user's drag does: a relayout of the x range (the server redraws for the new range)
    page.evaluate("([a, b]) => Plotly.relayout(document.querySelector('#timeline-graph .js-plotly-plot'),"
                  " {'xaxis.range[0]': a, 'xaxis.range[1]': b})", [(lo - origin) / 1e6, (hi - origin) / 1e6])
    page.wait_for_function(f"document.getElementById('timeline-status').innerText.startsWith('exact: {n_ops:,} GPU ops')")
    page.wait_for_selector("#timeline-graph .scatterlayer .trace", state="attached")
    drawn = page.evaluate("""() => {
        const gd = document.querySelector('#timeline-graph .js-plotly-plot');
        let n = 0;
        for (const t of gd._fullData) if (t.meta && t.meta.category && !['nvtx', 'api', 'nccl'].includes(t.meta.category))
            n += Array.from(t.x).filter(v => v !== null && !Number.isNaN(v)).length / 2;
        return n; }""")
    assert drawn == n_ops
    assert page.locator("#timeline-graph .heatmaplayer .hm").count() == 0
    shot(page, "timeline-step")
    page.click("#timeline-reset")
    page.wait_for_function("document.getElementById('timeline-status').innerText.startsWith('aggregated')")
    page.click("#timeline-window")
    page.wait_for_function("document.getElementById('timeline-status').innerText.startsWith('exact')")
    w = a.ranks[0].window
    assert plot_range(page, "timeline-graph") == pytest.approx([(w.start_ns - origin) / 1e6, (w.end_ns - origin) / 1e6])
    assert errors == []


# ------------------------------------------------------------------------------------------ compare
def test_compare_switches_runs(page, server, errors):
    # The page shows what `gpudoctor gate --baseline A --candidate B` decides: same numbers, same kernel names.
    from gpudoctor.gate.compare import fmt_value
    from gpudoctor.gate.pairs import compare_analyses, kernel_table
    runs = server["runs"]

    def gate_view(i, j):
        r = compare_analyses(runs[i].analysis, runs[j].analysis)
        g = next(m for m in r.metrics if m.spec.name == "gpu_time").decision
        return fmt_value(g.median_baseline, "ns"), fmt_value(g.median_candidate, "ns"), kernel_table(r)

    goto(page, server, "/compare", "Compare")
    page.wait_for_selector("#compare-graph .bars .point")
    sa, sb, table = gate_view(NAIVE, SDPA)
    assert page.inner_text("#compare-a-step") == f"A = attn_naive (nsys): GPU time per step {sa}"
    assert page.inner_text("#compare-b-step") == f"B = attn_sdpa (nsys): GPU time per step {sb}"
    assert "improvement" in page.inner_text("#compare-verdict")
    assert rows(page, "compare-table", "kernel")[0] == table["kernel"].iloc[0]
    select_option(page, "compare-b", f"{TORCH}: attn_naive (torch)")
    page.wait_for_function("document.getElementById('compare-b-step').innerText.includes('torch')")
    _, sb, expect = gate_view(NAIVE, TORCH)
    assert page.inner_text("#compare-b-step") == f"B = attn_naive (torch): GPU time per step {sb}"
    page.wait_for_function(f"document.querySelector('#compare-table td[data-dash-column=\"kernel\"]').innerText == {expect['kernel'].iloc[0]!r}")
    assert page.locator("#compare-graph .bars .point").count() == min(15, len(expect))
    shot(page, "compare-torch")
    assert errors == []


# ------------------------------------------------------------------------------------------ roofline / comm
def test_roofline_of_the_ncu_run(page, server, errors):
    goto(page, server, "/roofline", "Roofline")
    select_run(page, NCU, server)
    page.wait_for_selector("#page h3:has-text('ncu_kernels')")
    page.wait_for_selector("#roofline-graph .scatterlayer .point")
    n = len(server["runs"][NCU].analysis.trace.kernel_metrics)
    assert page.locator("#roofline-graph .scatterlayer .point").count() == n == 4
    assert len(rows(page, "roofline-table", "kernel")) == 4
    assert "datasheet" in page.locator("#roofline-graph .gtitle").text_content()
    shot(page, "roofline")
    # the kernel table of a metrics-only run lists the profiled launches with tensor-core use
    page.click("#nav-kernels")
    page.wait_for_selector("#kernel-table td[data-dash-column='tensor_core']")
    tc = rows(page, "kernel-table", "tensor_core")
    assert sum(t.startswith("yes") for t in tc) == 2 and sum(t.startswith("no") for t in tc) == 2
    # a metrics-only run has no timeline: the page says so
    page.click("#nav-timeline")
    page.wait_for_selector("#page h3:has-text('Timeline')")
    assert page.inner_text("#timeline-status") == "no kernels, ranges or collectives in this run"
    select_run(page, NAIVE, server)
    page.wait_for_selector("#page h3:has-text('attn_naive (nsys)')")
    assert errors == []


def test_communication_page(page, server, errors):
    goto(page, server, "/communication", "Communication")
    select_run(page, COMM, server)
    page.wait_for_selector("#page h3:has-text('synthetic')")
    page.wait_for_selector("#comm-bw-graph .scatterlayer .point")
    assert page.locator("#comm-bw-graph .scatterlayer .point").count() == 12
    ranks = rows(page, "straggler-table", "rank")
    assert ranks[0] == "1"  # the late rank first
    assert rows(page, "straggler-table", "last_arrivals")[0] == "6"
    shot(page, "communication")
    # its timeline has an NCCL lane per rank
    page.click("#nav-timeline")
    page.wait_for_selector("#timeline-graph .ytick")
    ticks = page.evaluate("() => [...document.querySelectorAll('#timeline-graph .ytick text')].map(t => t.textContent)")
    assert "rank 0 · NCCL calls" in ticks and "rank 1 · NCCL calls" in ticks
    select_run(page, NAIVE, server)
    page.wait_for_selector("#page h3:has-text('attn_naive (nsys)')")
    assert errors == []


# ------------------------------------------------------------------------------------------ every page, every kind
# What each page must draw per fixture kind (graph id -> must it draw something). Graphs not listed may be
# empty-with-a-message for that kind (a torch trace has no memory events, only an ncu run has a roofline).
KINDS = {
    NAIVE: ("nsys", {"timeline-graph", "kernel-category-graph", "summary-kernels-graph", "summary-steps-graph",
                     "summary-launch-graph", "memory-graph"}),
    TORCH: ("torch", {"timeline-graph", "kernel-category-graph", "summary-kernels-graph", "summary-steps-graph",
                      "summary-launch-graph"}),
    NCU: ("ncu", {"roofline-graph", "kernel-category-graph"}),
    DDP: ("ddp-2gpu", {"timeline-graph", "kernel-category-graph", "summary-kernels-graph", "summary-steps-graph",
                       "summary-launch-graph", "comm-fraction-graph", "comm-time-graph"}),
    KV: ("kv-snapshot", {"timeline-graph", "kernel-category-graph", "summary-kernels-graph", "memory-graph"}),
}
PAGE_IDS = [("Timeline", "timeline"), ("Kernels", "kernels"), ("Summaries", "summaries"), ("Roofline", "roofline"),
            ("Communication", "communication"), ("Memory", "memory")]
DRAWN_JS = """() => Object.fromEntries([...document.querySelectorAll('.js-plotly-plot')].map(gd => {
    const meta = gd._fullLayout.meta || {};
    let n = 0;
    for (const t of gd._fullData) {
        if (t.visible === false) continue;
        if (t.type === 'heatmap') n += t.z.flat().filter(v => v !== null && !Number.isNaN(v)).length;
        else if (t.type === 'box') n += (t.q1 || []).length;
        else if (t.x) n += Array.from(t.x).filter(v => v !== null && v !== undefined && !Number.isNaN(v)).length;
    }
    return [gd.parentElement.id || gd.id, meta.empty ? 0 : n];
}))"""


def drawn(page, must) -> dict[str, int]:
    """Points drawn per graph of the page, once the expected graphs on it have theirs (a loaded machine can
    answer the figure callbacks after the network went idle), or after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        now = dict(page.evaluate(DRAWN_JS))
        if all(now[g] for g in must if g in now) or time.monotonic() > deadline:
            return now
        page.wait_for_timeout(250)


@pytest.mark.parametrize("run_index", list(KINDS), ids=[v[0] for v in KINDS.values()])
def test_pages_draw_figures_for_each_fixture_kind(page, server, errors, run_index):
    kind, must = KINDS[run_index]
    run = server["runs"][run_index]
    goto(page, server, "/", "Overview")
    select_run(page, run_index, server)
    page.wait_for_selector(f"#page h3:has-text('{run.name}')")
    shot(page, f"overview-{kind}")
    seen: dict[str, int] = {}
    for label, slug in PAGE_IDS:
        page.click(f"#nav-{label.lower()}")
        page.wait_for_selector(f"#page h3:has-text('{label} — {run.name}')")
        graphs = page.locator("#page .dash-graph")
        for i in range(graphs.count()):  # every graph on the page has been drawn by plotly
            graphs.nth(i).locator(".main-svg").first.wait_for(state="attached", timeout=30_000)
        page.wait_for_load_state("networkidle")
        seen.update(drawn(page, must))
        shot(page, f"{slug}-{kind}")
    missing = sorted(g for g in must if not seen.get(g))
    assert not missing, (missing, seen)
    # tables that every run with a timeline has
    if run_index != NCU:
        page.click("#nav-summaries")
        page.wait_for_selector("#summary-kernels-table td[data-dash-column='kernel']")
        assert len(rows(page, "summary-kernels-table", "kernel")) == min(15, len(run.summaries()["kernels"]))
    if run_index == DDP:
        page.click("#nav-communication")
        page.wait_for_selector("#comm-summary-table td[data-dash-column='op']")
        assert sorted(set(rows(page, "comm-summary-table", "op"))) == ["all_gather", "all_reduce", "broadcast"]
        assert rows(page, "comm-kernel-table", "op") == ["all_reduce", "broadcast", "all_reduce"]
    assert errors == []


def test_finding_evidence_is_the_largest_saving_example(page, server, errors):
    """decode: the gpu_idle finding shows the 60 ms module-load gap, not a few-us queued gap."""
    from gpudoctor.dashboards import figures as F
    run = server["runs"][DECODE]
    f = next(f for f in run.analysis.findings if f.analyzer == "gpu_idle")
    goto(page, server, "/", "Overview")
    select_run(page, DECODE, server)
    page.wait_for_selector("#page h3:has-text('decode (nsys)')")
    page.click("#findings-table tr.finding-row:has-text('gpu_idle')")
    page.wait_for_selector("#finding-example")
    assert "module load, 60.3 ms" in page.inner_text("#finding-example")
    page.wait_for_selector("#finding-timeline .scatterlayer .trace", state="attached")
    s, e = F.finding_span(run.analysis, f)
    origin = run.index.origin_ns
    assert plot_range(page, "finding-timeline") == pytest.approx([(s - origin) / 1e6, (e - origin) / 1e6])
    drawn = page.evaluate(DRAWN_JS)
    assert drawn["finding-timeline"] > 0
    shot(page, "overview-finding-decode")
    assert errors == []


# ------------------------------------------------------------------------------------------ the HTML report
@pytest.mark.parametrize("name, inputs", [("decode", [FX / "nsys" / "decode.nsys.sqlite"]),
                                          ("mlp-ncu", [FX / "nsys" / "mlp_fp32.nsys.sqlite", FX / "ncu" / "ncu_kernels.raw.csv"]),
                                          ("ddp-2gpu", MULTI["ddp_comm_bound (2x H200, nsys)"])])
def test_report_in_the_browser(page, errors, tmp_path, name, inputs):
    """The report opens offline, draws every figure, and fits the window (long kernel names wrap)."""
    from gpudoctor.dashboards.report import write_report
    from gpudoctor.pipeline import analyze_inputs

    path = write_report(tmp_path / f"{name}.html", analyze_inputs([str(p) for p in inputs]), name)
    page.set_viewport_size({"width": 1300, "height": 900})
    page.goto(path.as_uri())
    page.wait_for_selector("#fig-timeline-steady .main-svg", state="attached", timeout=60_000)
    page.wait_for_timeout(500)
    drawn = page.evaluate(DRAWN_JS)
    assert drawn and all(v > 0 for v in drawn.values()), drawn
    assert page.evaluate("document.documentElement.scrollWidth") <= 1300
    # the fraction axis is 0-100% however small the shares
    assert page.evaluate("document.getElementById('fig-category')._fullLayout.xaxis.range") == [0, 100]
    ART.mkdir(exist_ok=True)
    page.screenshot(path=str(ART / f"report-{name}.png"), full_page=True)
    page.screenshot(path=str(ART / f"report-{name}-top.png"), full_page=True, clip={"x": 0, "y": 0, "width": 1300, "height": 2200})
    assert errors == []
