"""The dashboard in a real browser: Debian's Chromium driven by Playwright (see shared/testing/browser.md).

The app serves real fixture runs on a free loopback port; every page is loaded and interacted with, and
the tests assert on what is rendered (text, table rows, plotly points, axis ranges), that the browser
logged no console errors, and save screenshots to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import shutil
import threading
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
NAIVE, SDPA, NCU, TORCH, COMM = range(5)
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
    from gpudoctor.pipeline import Analysis, analyze_trace
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
    ranks, findings = analyze_trace(t)
    return Analysis(inputs=[{"path": "synthetic"}], trace=t, ranks=ranks, findings=findings)


@pytest.fixture(scope="module")
def server():
    from werkzeug.serving import make_server

    from gpudoctor.cli.dashboard import load_runs
    from gpudoctor.dashboards.app import Run, create_app

    runs = load_runs([str(p) for p in RUNS])
    runs.append(Run("synthetic 2-rank all_reduce", _comm_run(runs[NAIVE].analysis)))
    app = create_app(runs)
    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield {"url": f"http://127.0.0.1:{srv.server_port}", "runs": runs}
    srv.shutdown()
    th.join(10)


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
    page.wait_for_selector("#timeline-graph .heatmaplayer")
    assert page.inner_text("#timeline-status").startswith("aggregated: 1,305 GPU ops")
    assert plot_meta(page, "timeline-graph")["mode"] == "aggregated"
    shot(page, "timeline-zoomed-out")

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
    page.wait_for_selector("#timeline-graph .heatmaplayer")
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


def test_timeline_zoom_shows_exact_kernels_of_a_step(page, server, errors):
    run = server["runs"][NAIVE]
    a = run.analysis
    step = a.ranks[0].window.steps.iloc[3]
    lo, hi = int(step["gpu_start_ns"]), int(step["gpu_end_ns"])
    k, m = a.trace.kernels, a.trace.memops
    n_ops = int(((k["end_ns"] > lo) & (k["start_ns"] < hi)).sum() + ((m["end_ns"] > lo) & (m["start_ns"] < hi)).sum())
    origin = run.index.origin_ns

    goto(page, server, "/timeline", "Timeline")
    page.wait_for_selector("#timeline-graph .heatmaplayer")
    # zoom like a user's drag does: a relayout of the x range (the server redraws for the new range)
    page.evaluate("([a, b]) => Plotly.relayout(document.querySelector('#timeline-graph .js-plotly-plot'),"
                  " {'xaxis.range[0]': a, 'xaxis.range[1]': b})", [(lo - origin) / 1e6, (hi - origin) / 1e6])
    page.wait_for_function("document.getElementById('timeline-status').innerText.startsWith('exact')")
    assert page.inner_text("#timeline-status").startswith(f"exact: {n_ops:,} GPU ops")
    page.wait_for_selector("#timeline-graph .scatterlayer .trace", state="attached")
    drawn = page.evaluate("""() => {
        const gd = document.querySelector('#timeline-graph .js-plotly-plot');
        let n = 0;
        for (const t of gd._fullData) if (t.meta && t.meta.category && !['nvtx', 'nccl'].includes(t.meta.category))
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
    from gpudoctor.dashboards import figures as F
    runs = server["runs"]
    goto(page, server, "/compare", "Compare")
    page.wait_for_selector("#compare-graph .bars .point")
    assert page.inner_text("#compare-a-step") == f"A = attn_naive (nsys): step {F.step_time(runs[NAIVE].analysis):.3f} ms"
    assert page.inner_text("#compare-b-step") == f"B = attn_sdpa (nsys): step {F.step_time(runs[SDPA].analysis):.3f} ms"
    assert rows(page, "compare-table", "kernel")[0] == F.compare_frame(runs[NAIVE].analysis, runs[SDPA].analysis)["kernel"].iloc[0]
    select_option(page, "compare-b", f"{TORCH}: attn_naive (torch)")
    page.wait_for_function("document.getElementById('compare-b-step').innerText.includes('torch')")
    assert page.inner_text("#compare-b-step") == f"B = attn_naive (torch): step {F.step_time(runs[TORCH].analysis):.3f} ms"
    expect = F.compare_frame(runs[NAIVE].analysis, runs[TORCH].analysis)
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
    page.wait_for_selector("#timeline-graph .heatmaplayer")
    ticks = page.evaluate("() => [...document.querySelectorAll('#timeline-graph .ytick text')].map(t => t.textContent)")
    assert "r0 NCCL" in ticks and "r1 NCCL" in ticks
    select_run(page, NAIVE, server)
    page.wait_for_selector("#page h3:has-text('attn_naive (nsys)')")
    assert errors == []
