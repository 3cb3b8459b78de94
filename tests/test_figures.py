"""Dashboard figures and the HTML report on the real fixtures, without a browser.

Expected numbers are counted independently from the trace tables (not through dashboards/), so a
figure that drops or duplicates events fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("plotly")

from gpudoctor.dashboards import figures as F  # noqa: E402
from gpudoctor.dashboards.timeline import CATEGORIES, TimelineIndex  # noqa: E402
from gpudoctor.model.schema import KERNEL_CATEGORIES  # noqa: E402
from gpudoctor.model.trace import Trace, conform  # noqa: E402
from gpudoctor.pipeline import analyze, analyze_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FX = ROOT / "fixtures"
NAIVE = FX / "nsys" / "attn_naive.nsys.sqlite"
SDPA = FX / "nsys" / "attn_sdpa.nsys.sqlite"
NAIVE_TORCH = FX / "torch" / "attn_naive.torch.json.gz"
NCU = FX / "ncu" / "ncu_kernels.raw.csv"
CEILINGS = FX / "ceilings_h100.json"


@pytest.fixture(scope="module")
def naive():
    return analyze_inputs([str(NAIVE)])


@pytest.fixture(scope="module")
def naive_index(naive):
    return TimelineIndex.from_trace(naive.trace)


@pytest.fixture(scope="module")
def sdpa():
    return analyze_inputs([str(SDPA)])


@pytest.fixture(scope="module")
def ncu():
    return analyze_inputs([str(NCU)])


def _segments(trace_obj) -> int:
    """Events drawn by an exact-mode line trace: x is [start, end, NaN] per event."""
    x = np.asarray(trace_obj.x, dtype=float)
    assert len(x) % 3 == 0
    assert np.isnan(x[2::3]).all()
    return len(x) // 3


def _overlapping(df: pd.DataFrame, lo: int, hi: int) -> int:
    return int(((df["end_ns"].to_numpy() > lo) & (df["start_ns"].to_numpy() < hi)).sum())


# ------------------------------------------------------------------------------------------ timeline
def test_timeline_zoomed_out_is_aggregated(naive, naive_index):
    fig = F.timeline_figure(naive_index)
    meta = fig.layout.meta
    assert meta["mode"] == "aggregated"
    # every GPU op of the run is in view: 1089 kernels + 216 memops
    assert meta["visible_gpu_ops"] == 1089 + 216 == len(naive.trace.kernels) + len(naive.trace.memops)
    heat = [t for t in fig.data if t.type == "heatmap"]
    lines = [t for t in fig.data if t.type == "scatter" and t.x is not None and len(t.x) > 1]
    assert not lines, "zoomed out must not draw events one by one"
    # one heat strip per category present, each with BINS columns, however many kernels
    present = set(naive.trace.kernels["category"].astype(str)) | {"memcpy", "memset", "nvtx", "api"}
    assert {t.name for t in heat} == present
    for t in heat:
        z = np.asarray(t.z, dtype=float)
        assert z.shape[1] == F.BINS
        assert len(t.x) == F.BINS + 1
        assert np.nanmax(z) <= 1.0
    assert sum(np.asarray(t.z, dtype=float).size for t in heat) < 20 * F.BINS  # bins, not 1089 rectangles


def test_timeline_busy_bins_add_up_to_kernel_time(naive, naive_index):
    k = naive.trace.kernels
    lo, hi = naive_index.extent
    edges, frac = naive_index.busy(lo, hi, 1000)
    width = np.diff(edges).astype(float)
    gpu_lane = next(i for i, ln in enumerate(naive_index.lanes) if ln.kind == "gpu")
    for cat in KERNEL_CATEGORIES:
        expect = int((k["end_ns"] - k["start_ns"])[k["category"].astype(str) == cat].sum())
        got = float((frac[gpu_lane, CATEGORIES.index(cat)] * width).sum())
        assert got == pytest.approx(expect, rel=1e-9, abs=1), cat


def test_timeline_one_step_shows_its_exact_kernels(naive, naive_index):
    steps = naive.ranks[0].window.steps
    step = steps.iloc[3]
    lo, hi = int(step["gpu_start_ns"]), int(step["gpu_end_ns"])
    fig = F.timeline_figure(naive_index, (lo, hi))
    meta = fig.layout.meta
    assert meta["mode"] == "exact"
    assert not [t for t in fig.data if t.type == "heatmap"]
    drawn = {t.name: _segments(t) for t in fig.data if t.type == "scatter" and t.meta and "category" in t.meta}
    k, m = naive.trace.kernels, naive.trace.memops
    n_kernels = _overlapping(k, lo, hi)
    assert 100 < n_kernels < 200
    assert sum(v for c, v in drawn.items() if c in KERNEL_CATEGORIES) == n_kernels
    for cat in KERNEL_CATEGORIES:
        kc = k[k["category"].astype(str) == cat]
        assert drawn.get(cat, 0) == _overlapping(kc, lo, hi), cat
    assert drawn.get("memcpy", 0) + drawn.get("memset", 0) == _overlapping(m, lo, hi)
    assert drawn.get("nvtx", 0) == _overlapping(naive.trace.ranges, lo, hi)
    assert drawn.get("api", 0) == _overlapping(naive.trace.api_calls, lo, hi)
    assert meta["visible_gpu_ops"] == n_kernels + _overlapping(m, lo, hi)
    # launch -> kernel links: every visible GPU op with a recorded launch call (the host runs ahead: the
    # calls of this step's kernels were made before the step's GPU work began)
    a = naive.trace.api_calls
    ops = pd.concat([k[(k["end_ns"] > lo) & (k["start_ns"] < hi)]["correlation_id"],
                     m[(m["end_ns"] > lo) & (m["start_ns"] < hi)]["correlation_id"]])
    n_links = int(ops.isin(a["correlation_id"]).sum())
    assert n_links == meta["launch_links"] == meta["visible_gpu_ops"]
    calls = a.set_index("correlation_id")["start_ns"]
    op_calls = calls.reindex(ops[ops.isin(a["correlation_id"])].to_numpy()).to_numpy()
    near = int((op_calls >= lo - (hi - lo)).sum())  # drawn: calls inside the view or one view-width before
    assert 0 < near == sum(_segments(t) for t in fig.data if (t.name or "").startswith("launch"))
    # the x axis is the requested range, in ms after the first event
    x0, x1 = fig.layout.xaxis.range
    assert x0 == pytest.approx((lo - naive_index.origin_ns) / 1e6)
    assert x1 == pytest.approx((hi - naive_index.origin_ns) / 1e6)
    # hover names the kernel
    gemm = next(t for t in fig.data if t.name == "gemm")
    assert "nvjet" in gemm.text[0]


def test_timeline_too_many_visible_kernels_stay_aggregated(naive, naive_index):
    w = naive.ranks[0].window
    fig = F.timeline_figure(naive_index, (w.start_ns, w.end_ns), max_exact=500)
    assert fig.layout.meta["mode"] == "aggregated"
    assert fig.layout.meta["visible_gpu_ops"] > 500
    fig = F.timeline_figure(naive_index, (w.start_ns, w.end_ns))
    assert fig.layout.meta["mode"] == "exact"


def _replicate(trace: Trace, copies: int) -> Trace:
    """attn_naive's kernels repeated back to back (a synthetic long run built from real kernels)."""
    k = trace.kernels
    span = int(k["end_ns"].max() - k["start_ns"].min()) + 1000
    n = len(k)
    shift = np.repeat(np.arange(copies, dtype=np.int64) * span, n)
    big = {c: np.tile(k[c].to_numpy(), copies) for c in k.columns if c not in ("start_ns", "end_ns")}
    big["start_ns"] = np.tile(k["start_ns"].to_numpy(), copies) + shift
    big["end_ns"] = np.tile(k["end_ns"].to_numpy(), copies) + shift
    out = Trace(devices=trace.devices, ranks=trace.ranks, meta=trace.meta)
    out.kernels = conform("kernels", pd.DataFrame(big))
    return out


def test_timeline_payload_is_bounded_for_large_runs(naive):
    big = _replicate(naive.trace, 100)  # 108,900 kernels
    ix = TimelineIndex.from_trace(big)
    fig = F.timeline_figure(ix)
    assert fig.layout.meta["mode"] == "aggregated"
    assert fig.layout.meta["visible_gpu_ops"] == 108_900
    assert len(fig.to_json()) < 500_000
    # zoom into one copy's step 3: exact, the same kernels as the original
    s = naive.ranks[0].window.steps.iloc[3]
    span = int(naive.trace.kernels["end_ns"].max() - naive.trace.kernels["start_ns"].min()) + 1000
    lo, hi = int(s["gpu_start_ns"]) + 42 * span, int(s["gpu_end_ns"]) + 42 * span
    fig = F.timeline_figure(ix, (lo, hi))
    assert fig.layout.meta["mode"] == "exact"
    assert sum(_segments(t) for t in fig.data if t.meta and "category" in t.meta) == _overlapping(big.kernels, lo, hi)


def test_relayout_view():
    o = 1_000_000_000
    assert F.relayout_view({"xaxis.range[0]": 1.5, "xaxis.range[1]": 2.5}, o) == (o + 1_500_000, o + 2_500_000)
    assert F.relayout_view({"xaxis2.range[0]": 0, "xaxis2.range[1]": 1}, o) == (o, o + 1_000_000)
    assert F.relayout_view({"xaxis.range": [3, 4]}, o) == (o + 3_000_000, o + 4_000_000)
    assert F.relayout_view({"xaxis.autorange": True}, o) == "reset"
    assert F.relayout_view({"autosize": True}, o) is None
    assert F.relayout_view(None, o) is None
    assert F.relayout_view({"xaxis.range[0]": "x", "xaxis.range[1]": 2}, o) is None


def test_counters_row(naive):
    t = Trace(kernels=naive.trace.kernels, ranks=naive.trace.ranks, devices=naive.trace.devices)
    k = t.kernels
    ts = np.linspace(k["start_ns"].min(), k["end_ns"].max(), 20000).astype(np.int64)
    t.set("counters", {"rank": 0, "device_id": 0, "ts_ns": ts, "name": "gpu_util", "value": np.arange(len(ts)) % 100})
    fig = F.timeline_figure(TimelineIndex.from_trace(t))
    counters = [d for d in fig.data if d.meta and "counter" in d.meta]
    assert len(counters) == 1
    assert len(counters[0].x) <= 2 * F.BINS + 2  # min/max per bin, not 20,000 points
    assert np.nanmax(counters[0].y) == 99


# ------------------------------------------------------------------------------------------ overview
def test_findings_ranked_and_jump_to_example(naive, naive_index):
    df = F.findings_frame(naive)
    assert len(df) == len(naive.findings) >= 1
    savings = [naive.findings[i].estimated_saving_ns for i in df["idx"]]
    assert savings == sorted(savings, reverse=True)
    top = naive.findings[int(df["idx"].iloc[0])]
    assert top.analyzer == "unfused_attention"
    ex = F.best_example(top)  # the longest chain: it carries the most of the saving
    assert ex["end_us"] - ex["start_us"] == max(e["end_us"] - e["start_us"] for e in top.evidence["examples"])
    w0 = naive.ranks[0].window.start_ns
    s, e = F.finding_span(naive, top)
    assert s < w0 + ex["start_us"] * 1e3 < w0 + ex["end_us"] * 1e3 < e
    fig = F.timeline_figure(naive_index, (s, e))
    assert fig.layout.meta["mode"] == "exact"
    names = " ".join(t for tr in fig.data if tr.type == "scatter" and tr.text is not None for t in tr.text if t)
    assert ex["kernels"][0]["name"] in names
    # a finding without examples jumps to its rank's steady-state window
    no_ex = next(f for f in naive.findings if not f.evidence.get("examples"))
    assert F.finding_span(naive, no_ex) == (naive.ranks[0].window.start_ns, naive.ranks[0].window.end_ns)


def test_rank_frame_and_category_figure(naive):
    r = F.rank_frame(naive)
    assert r["kernels"].tolist() == [1089]
    assert r["steady_kernels"].tolist() == [910]
    assert r["steps"].tolist() == [8]
    fig = F.category_figure(naive)
    cats = set(naive.ranks[0].category_time["category"])
    assert {t.name for t in fig.data} == cats
    assert sum(t.x[0] for t in fig.data) == pytest.approx(100 * naive.ranks[0].category_time["window_fraction"].sum())


# ------------------------------------------------------------------------------------------ kernels
def test_kernel_table_counts(naive):
    k = naive.trace.kernels
    w = naive.ranks[0].window
    t = F.kernel_table(naive)
    inwin = k[(k["end_ns"] > w.start_ns) & (k["start_ns"] < w.end_ns)]
    assert t["count"].sum() == len(inwin) == 910
    assert len(t) == len(inwin.groupby(["name", "demangled_name"], observed=True))
    clipped = np.minimum(inwin["end_ns"], w.end_ns) - np.maximum(inwin["start_ns"], w.start_ns)
    assert t["total_ms"].sum() == pytest.approx(clipped.sum() / 1e6, rel=1e-4)
    assert list(t["total_ms"]) == sorted(t["total_ms"], reverse=True)
    t_all = F.kernel_table(naive, "all")
    assert t_all["count"].sum() == 1089
    # filtering as the Kernels page does
    from gpudoctor.dashboards.app import filter_kernel_table
    shown = filter_kernel_table(t, "NVJET", None)
    expect = inwin[inwin["name"].astype(str).str.contains("nvjet", case=False)
                   | inwin["demangled_name"].astype(str).str.contains("nvjet", case=False)]
    assert len(shown) == len(expect.groupby(["name", "demangled_name"], observed=True)) > 0
    assert len(filter_kernel_table(t, None, ["gemm"])) == inwin[inwin["category"] == "gemm"].groupby(
        ["name", "demangled_name"], observed=True).ngroups
    assert set(shown["tensor_core"]) == {"likely (name)"}
    fig = F.kernel_category_figure(t)
    assert fig.layout.meta["bars"] == t["category"].nunique()


def test_kernel_table_uses_ncu_metrics(ncu):
    t = F.kernel_table(ncu)
    assert len(t) == len(ncu.trace.kernel_metrics) == 4
    by = {r.kernel: r for r in t.itertuples()}
    assert by["nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT"].tensor_core.startswith("yes")
    sgemm = next(r for r in t.itertuples() if "simt_sgemm" in r.signature)
    assert sgemm.tensor_core.startswith("no")
    assert sgemm.bound == "compute"
    assert by["nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT"].bound == "memory"  # the GEMV


# ------------------------------------------------------------------------------------------ roofline
def test_roofline_points_are_the_ncu_kernels(ncu):
    measured = json.loads(CEILINGS.read_text())
    fig = F.roofline_figure(ncu.trace, measured)
    points = [t for t in fig.data if t.mode == "markers"]
    assert sum(len(t.x) for t in points) == len(ncu.trace.kernel_metrics) == 4
    assert fig.layout.meta["points"] == 4
    assert set(fig.layout.meta["roofs"]) == {"tensor_bf16", "fp32"}
    roof = next(t for t in fig.data if t.meta and t.meta.get("roof") == "tensor_bf16")
    assert max(roof.y) == pytest.approx(measured["bf16_flops_per_s"] / 1e12)
    # the memory roof's slope is the measured copy bandwidth
    assert roof.y[0] == pytest.approx(measured["copy_bandwidth_bytes_per_s"] * roof.x[0] / 1e12)
    # points sit at (FLOPs / DRAM bytes, FLOPs / duration) of each launch
    km = ncu.trace.kernel_metrics
    flops = km[["flops_fp64", "flops_fp32", "flops_fp16", "flops_tensor"]].fillna(0).sum(axis=1)
    ai = flops / (km["dram_read_bytes"] + km["dram_write_bytes"])
    xs = sorted(x for t in points for x in t.x)
    assert xs == pytest.approx(sorted(ai))
    # without a ceilings file: the device table (datasheet peaks of H100 SXM)
    fig = F.roofline_figure(ncu.trace)
    assert fig.layout.meta["points"] == 4
    assert "datasheet" in fig.layout.meta["ceilings"]


def test_roofline_without_metrics_says_so(naive):
    fig = F.roofline_figure(naive.trace)
    assert fig.layout.meta["empty"]
    assert "Nsight Compute" in fig.layout.meta["message"]


# ------------------------------------------------------------------------------------------ communication
def synthetic_comm_run(base) -> object:
    """Two ranks (attn_naive's kernels twice) with 6 all_reduce calls each, rank 1 arriving 200 us late.
    The collectives are synthetic: no fixture has NCCL (recorded on one GPU)."""
    k0 = base.trace.kernels
    k1 = k0.copy()
    k1["rank"] = 1
    t = Trace(devices=conform("devices", pd.concat([base.trace.devices, base.trace.devices.assign(rank=1)])),
              ranks=conform("ranks", pd.DataFrame({"rank": [0, 1]})),
              kernels=conform("kernels", pd.concat([k0, k1], ignore_index=True)), meta={"inputs": []})
    w0 = base.ranks[0].window.start_ns
    rows = []
    for i in range(6):
        size = 2 ** (20 + 2 * i)
        for rank in (0, 1):
            start = w0 + i * 2_000_000 + (200_000 if rank == 1 else 0)
            dur = int(size / 150e9 * 1e9) + 20_000
            rows.append({"rank": rank, "start_ns": start, "end_ns": start + dur, "op": "all_reduce", "bytes": size,
                         "dtype": "bf16", "comm_size": 2, "source": "nvtx_nccl"})
    t.set("collectives", pd.DataFrame(rows))
    return analyze(t, [], [])


def test_communication_figures(naive):
    a = synthetic_comm_run(naive)
    d = F.collective_frame(a.trace)
    assert len(d) == 12
    # all_reduce bus bandwidth = algbw x 2(n-1)/n = algbw for n=2
    assert (d["busbw"] / d["algbw"]).tolist() == pytest.approx([1.0] * 12)
    fig = F.comm_bandwidth_figure(a.trace, {"link_bandwidth_bytes_per_s": 450e9})
    assert fig.layout.meta["points"] == 12
    assert sum(len(t.x) for t in fig.data) == 12
    assert fig.layout.meta["link_ceiling"] == 450e9
    assert any(s.y0 == 450 for s in fig.layout.shapes)
    s = F.straggler_frame(a.trace)
    late = s[s["rank"] == 1].iloc[0]
    assert late["last_arrivals"] == 6 and late["calls"] == 6
    assert late["mean_late_us"] == pytest.approx(200.0)
    assert s[s["rank"] == 0].iloc[0]["last_arrivals"] == 0
    assert F.comm_bandwidth_figure(naive.trace).layout.meta["empty"]
    assert F.straggler_frame(naive.trace).empty
    # exposed comm / bubbles come from findings' metrics
    from gpudoctor.analyzers.findings import Finding
    a.findings = [Finding("pipeline_bubbles", "medium", "bubbles", metrics={"bubble_fraction": 0.2}, rank=1),
                  Finding("nccl_dominated", "high", "comm", metrics={"exposed_comm_fraction": 0.3}, rank=0)]
    cf = F.comm_findings_frame(a)
    assert set(cf["metric"]) == {"bubble_fraction", "exposed_comm_fraction"}
    assert F.comm_fraction_figure(a).layout.meta["bars"] == 2


# ------------------------------------------------------------------------------------------ memory
def test_memory_figure_is_running_allocation(naive):
    fig = F.memory_figure(naive.trace)
    me = naive.trace.memory_events
    alloc = next(t for t in fig.data if t.meta["series"] == "allocated")
    sign = np.where(me["kind"].astype(str) == "free", -1, 1)
    assert alloc.y[-1] == pytest.approx((me["bytes"] * sign).sum() / 2**30)
    assert len(alloc.x) <= 4001
    assert F.memory_figure(Trace()).layout.meta["empty"]


def test_kv_frame_reads_kv_findings():
    from gpudoctor.analyzers.findings import Finding
    a = analyze_inputs([str(FX / "nsys" / "kv_static.nsys.sqlite")])
    real = [k for f in a.findings if f.analyzer == "kv_fragmentation" for k in f.metrics if not k.startswith("_")]
    a.findings = list(a.findings) + [Finding("kv_fragmentation", "high", "KV waste", metrics={"kv_waste_fraction": 0.6})]
    kv = F.kv_frame(a)
    assert kv["metric"].tolist() == real + ["kv_waste_fraction"]
    assert kv["value"].iloc[-1] == "0.6"


# ------------------------------------------------------------------------------------------ compare
def test_compare_naive_vs_sdpa(naive, sdpa):
    df = F.compare_frame(naive, sdpa)
    row = df[df["kernel"] == "softmax_warp_forward"].iloc[0]
    assert row["us_per_step_a"] > 0 and row["us_per_step_b"] == 0
    assert row["diff_us"] == pytest.approx(-row["us_per_step_a"])
    # per-step time of A = clipped steady kernel time / steady steps
    w = naive.ranks[0].window
    k = naive.trace.kernels
    inwin = k[(k["end_ns"] > w.start_ns) & (k["start_ns"] < w.end_ns)]
    clipped = (np.minimum(inwin["end_ns"], w.end_ns) - np.maximum(inwin["start_ns"], w.start_ns)).sum()
    assert df["us_per_step_a"].sum() == pytest.approx(clipped / 1e3 / len(w.steady), rel=1e-3)
    assert list(df["diff_us"].abs()) == sorted(df["diff_us"].abs(), reverse=True)
    assert any("flash" in k for k in df.loc[df["us_per_step_b"] > df["us_per_step_a"], "kernel"])
    fig = F.compare_figure(naive, sdpa)
    assert fig.layout.meta["bars"] == 15
    assert F.step_time(sdpa) < F.step_time(naive)


def test_compare_across_profilers_matches_names(naive):
    torch_run = analyze_inputs([str(NAIVE_TORCH)])
    df = F.compare_frame(naive, torch_run)
    both = df[(df["us_per_step_a"] > 0) & (df["us_per_step_b"] > 0)]
    assert len(both) >= 15  # the same kernels under both profilers
    assert both["diff_pct"].abs().median() < 10


# ------------------------------------------------------------------------------------------ report
def test_report_is_self_contained(tmp_path, naive):
    from gpudoctor.dashboards.report import build_report
    html = build_report(naive, "attn_naive")
    assert html.count("<script src=") == 0
    assert len(re.findall(r"plotly\.js v\d+\.\d+\.\d+", html)) == 1  # plotly.js inlined once
    assert html.count("Plotly.newPlot(") >= 4
    for div in ("fig-category", "fig-timeline", "fig-timeline-steady", "fig-kernel-category", "fig-memory"):
        assert f'id="{div}"' in html
    assert "Unfused attention" in html
    assert "fig-roofline" not in html  # no ncu metrics in this run


def test_report_command_writes_atomically(tmp_path):
    from gpudoctor.cli.main import main
    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(NCU), "--html", str(out), "--ceilings", str(CEILINGS)]) == 0
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.endswith("</html>")
    assert 'id="fig-roofline"' in text
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]  # no temp file left behind


def test_report_failed_write_keeps_old_file(tmp_path, monkeypatch):
    from gpudoctor.dashboards import report
    out = tmp_path / "r.html"
    out.write_text("old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(report.os, "fsync", boom)
    with pytest.raises(OSError):
        report.write_atomic(out, "new")
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


# ------------------------------------------------------------------------------------------ CLI / security
def test_loopback_detection():
    from gpudoctor.cli.dashboard import is_loopback
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.10")


def test_dashboard_warns_on_non_loopback(monkeypatch, capsys):
    import werkzeug.serving

    from gpudoctor.cli.main import main

    served = {}

    class FakeServer:
        server_port = 8050

        def serve_forever(self):
            served["yes"] = True

        def server_close(self):
            pass

    def fake_make_server(host, port, app, threaded):
        served["host"] = host
        return FakeServer()
    monkeypatch.setattr(werkzeug.serving, "make_server", fake_make_server)
    # Without the confirmation flag: the warning, a one-line refusal, exit 2, nothing served.
    assert main(["dashboard", str(NAIVE), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "WARNING" in err and "without --allow-remote" in err.splitlines()[-1]
    assert served == {}
    assert main(["dashboard", str(NAIVE), "--host", "0.0.0.0", "--port", "0", "--allow-remote"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "NOT a loopback address" in err
    assert served == {"host": "0.0.0.0", "yes": True}
    assert main(["dashboard", str(NAIVE)]) == 0
    err = capsys.readouterr().err
    assert "WARNING" not in err
    assert served["host"] == "127.0.0.1"


def test_app_serves_runs_by_index_only(naive):
    """A callback asking for a run by path (or out-of-range index) gets nothing: no file is opened."""
    from gpudoctor.dashboards.app import Run, create_app
    app = create_app([Run("naive", naive)])
    client = app.server.test_client()

    def page(run_value):
        body = {"output": "page.children", "outputs": {"id": "page", "property": "children"},
                "inputs": [{"id": "url", "property": "pathname", "value": "/kernels"},
                           {"id": "run", "property": "value", "value": run_value}],
                "changedPropIds": ["run.value"], "state": [{"id": "focus", "property": "data", "value": None}]}
        return client.post("/_dash-update-component", json=body)
    ok = page(0)
    assert ok.status_code == 200 and b"vectorized_elementwise_kernel" in ok.data
    for bad in ("/etc/passwd", str(NAIVE), 1, -1, None):
        r = page(bad)
        assert r.status_code == 204, bad
    # static routes serve nothing from the working directory
    assert client.get("/assets/../pyproject.toml").status_code == 404
    assert client.get("/pyproject.toml").status_code in (200, 404)
    assert b"setuptools" not in client.get("/pyproject.toml").data


# ------------------------------------------------------------------------------------------ evidence, lanes, views
DECODE = FX / "nsys" / "decode.nsys.sqlite"
DDP = [FX / "multigpu" / f"ddp_comm_bound_rank{r}.sqlite" for r in (0, 1)]
KV = [FX / "nsys" / "kv_static.nsys.sqlite", FX / "kv" / "kv_static.snapshot.pickle"]


@pytest.fixture(scope="module")
def decode():
    return analyze_inputs([str(DECODE)])


@pytest.fixture(scope="module")
def ddp():
    return analyze_inputs([str(p) for p in DDP])


def test_evidence_is_the_example_with_the_largest_saving(decode):
    f = next(f for f in decode.findings if f.analyzer == "gpu_idle")
    ex = f.evidence["examples"]
    # the first example of the first cause is a few-us queued gap (not part of the saving) ...
    assert list(ex)[0] == "gpu_side" and ex["gpu_side"][0]["dur_us"] < 5
    best = F.best_example(f)
    # ... the shown one is the longest gap of the causes that make the saving: the 60 ms module load
    saving_causes = [c for c in ex if c != "gpu_side"]
    assert best["dur_us"] == max(e["dur_us"] for c in saving_causes for e in ex[c]) == 60274.9
    assert best in ex["module_load"] and max(f.evidence["idle_by_cause_us"], key=f.evidence["idle_by_cause_us"].get) == "module_load"
    s, e = F.finding_span(decode, f)
    w0 = decode.ranks[0].window.start_ns
    g0, g1 = w0 + best["start_us"] * 1e3, w0 + (best["start_us"] + best["dur_us"]) * 1e3
    assert s < g0 < g1 < e and (e - s) < 1.3 * (g1 - g0)
    # the timeline zoomed there draws the kernels around the gap
    fig = F.timeline_figure(TimelineIndex.from_trace(decode.trace), (s, e))
    assert fig.layout.meta["mode"] == "exact" and fig.layout.meta["visible_gpu_ops"] == 208
    assert "module load, 60.3 ms" in F.example_caption(decode, f)


def test_lanes_are_named_by_what_they_are(naive_index, ddp):
    assert [ln.label for ln in naive_index.lanes] == [
        "NVTX thread 1", "NVTX thread 1 level 2", "NVTX thread 2", "CUDA API thread 1", "CUDA API thread 2", "compute (stream 7)"]
    labels = [ln.label for ln in TimelineIndex.from_trace(ddp.trace).lanes]
    assert "rank 0 · GPU 0 NCCL (stream 17)" in labels and "rank 1 · GPU 1 NCCL (stream 17)" in labels
    assert "rank 0 · GPU 0 copies (stream 14)" in labels and "rank 1 · NCCL calls" in labels
    # the NCCL stream runs (almost) only communication kernels
    k = ddp.trace.kernels
    s17 = k[(k["rank"] == 0) & (k["stream_id"] == 17)]
    assert (s17["category"].astype(str) == "communication").mean() > 0.9


def test_default_view_is_the_steady_state_window(naive, ddp):
    w = naive.ranks[0].window
    assert F.default_view(naive) == (w.start_ns, w.end_ns)
    assert F.default_view(ddp) == (min(r.window.start_ns for r in ddp.ranks), max(r.window.end_ns for r in ddp.ranks))


def test_bar_labels_when_zoomed(naive, naive_index):
    step = naive.ranks[0].window.steps.iloc[3]
    lo, hi = int(step["gpu_start_ns"]), int(step["gpu_end_ns"])
    fig = F.timeline_figure(naive_index, (lo, lo + (hi - lo) // 8))
    labels = next(t for t in fig.data if t.mode == "text")
    assert fig.layout.meta["bar_labels"] == len(labels.text) > 0
    names = set(naive.trace.kernels["name"].astype(str))
    kernel_labels = [t for t in labels.text if not t.startswith("mem")]  # memcpy/memset bars say kind and size
    assert kernel_labels and all(any(n.startswith(t.rstrip("…")) for n in names) for t in kernel_labels)


def test_one_line_track_per_counter_name(naive):
    t = Trace(kernels=naive.trace.kernels, ranks=naive.trace.ranks, devices=naive.trace.devices)
    k = t.kernels
    ts = np.linspace(k["start_ns"].min(), k["end_ns"].max(), 300).astype(np.int64)
    t.set("counters", pd.concat([pd.DataFrame({"rank": 0, "device_id": 0, "ts_ns": ts, "name": n, "value": v})
                                 for n, v in (("gpu_util_pct", ts % 100), ("power_w", 300 + ts % 50))]))
    fig = F.timeline_figure(TimelineIndex.from_trace(t))
    assert fig.layout.meta["counter_tracks"] == ["gpu_util_pct", "power_w"]
    counters = [d for d in fig.data if d.meta and "counter" in d.meta]
    assert [d.yaxis for d in counters] == ["y2", "y3"]  # each on its own axis under the lanes


def _drawn(fig) -> int:
    """Marks a figure really draws: finite points inside the x range, non-empty heat cells, bars, boxes."""
    if (fig.layout.meta or {}).get("empty"):
        return 0
    xr = fig.layout.xaxis.range
    n = 0
    for t in fig.data:
        if t.type == "heatmap":
            n += int(np.isfinite(np.asarray(t.z, dtype=float)).sum())
        elif t.type == "box":
            n += len(t.q1)
        elif t.type == "bar":
            v = np.asarray(t.x if t.orientation == "h" else t.y, dtype=float)
            n += int((v > 0).sum())
        elif t.x is not None and not all(isinstance(v, (int, float, np.number)) or v is None for v in t.x):
            n += int(sum(v is not None for v in t.y))  # categorical x (steps)
        elif t.x is not None:
            x = np.asarray(t.x, dtype=float)
            ok = np.isfinite(x)
            if xr is not None and (t.xaxis in (None, "x")):
                ok &= (x >= xr[0]) & (x <= xr[1])
            n += int(ok.sum())
    return n


@pytest.mark.parametrize("inputs", [[DECODE], [NAIVE_TORCH], DDP, KV, [FX / "nsys" / "mlp_fp32.nsys.sqlite", NCU]],
                         ids=["decode", "torch", "ddp", "kv+snapshot", "mlp+ncu"])
def test_report_figures_are_not_empty(inputs, monkeypatch):
    from gpudoctor.dashboards import report
    a = analyze_inputs([str(p) for p in inputs])
    figs: dict[str, object] = {}
    real = report._figure_html
    monkeypatch.setattr(report, "_figure_html", lambda fig, div: figs.setdefault(div, fig) and real(fig, div))
    html = report.build_report(a, "x")
    assert {"fig-category", "fig-timeline-steady", "fig-timeline", "fig-kernel-category"} <= set(figs)
    for div, fig in figs.items():
        assert _drawn(fig) > 0, div
        assert f'id="{div}"' in html
    # the steady-state timeline draws GPU work of the window (blank lanes were the bug)
    steady = figs["fig-timeline-steady"]
    assert steady.layout.meta["visible_gpu_ops"] > 0
    gpu = [t for t in steady.data if t.meta and t.meta.get("category") in KERNEL_CATEGORIES]
    assert gpu and sum(_drawn(go_fig(t, steady)) for t in gpu) > 0
    # each finding with a timed example gets its own evidence timeline
    with_example = [f for f in a.findings if F.best_example(f) is not None]
    assert len([d for d in figs if d.startswith("fig-finding-")]) == min(len(with_example), report.MAX_EVIDENCE_FIGURES)
    if a.trace.collectives.empty:
        assert "fig-comm-time" not in figs
    else:  # the recording's collectives carry no sizes: no bandwidth chart, the time per rank instead
        assert {"fig-comm-time", "fig-comm-fraction"} <= set(figs) and "fig-comm" not in figs
        assert "no collectives with sizes in this run" in html


def go_fig(trace_obj, like):
    """A one-trace figure with the x range of ``like`` (to count what one trace draws)."""
    import plotly.graph_objects as go
    f = go.Figure([trace_obj])
    f.update_xaxes(range=like.layout.xaxis.range)
    return f


def test_fractions_have_fixed_axes(naive, decode):
    for a in (naive, decode):
        assert list(F.category_figure(a).layout.xaxis.range) == [0, 100]


def test_report_wraps_long_names(naive):
    from gpudoctor.dashboards.report import build_report
    html = build_report(naive, "attn_naive")
    assert "td{overflow-wrap:break-word}" in html and "td.num{white-space:nowrap" in html
    assert "<td>softmax_<wbr>warp_<wbr>forward</td>" in html  # names break after underscores


def test_memory_figure_draws_every_series():
    a = analyze_inputs([str(p) for p in KV])
    fig = F.memory_figure(a.trace)
    me = a.trace.memory_events
    names = [t.name for t in fig.data]
    assert "rank 0 GPU 0 allocated (nsys cuda memory)" in names and "rank 0 GPU 0 reserved (torch snapshot)" in names
    for t in fig.data:  # every legend entry draws something: one-sample counters are markers
        assert len(t.x) >= 1 and (len(t.x) > 1 or "markers" in t.mode), t.name
    snap = me[me["source"].astype(str) == "torch_snapshot"]
    seg = snap[snap["kind"].astype(str).str.startswith("segment")]
    reserved = next(t for t in fig.data if t.name == "rank 0 GPU 0 reserved (torch snapshot)")
    sign = np.where(seg["kind"].astype(str) == "segment_free", -1, 1)
    assert reserved.y[-1] == pytest.approx((np.abs(seg["bytes"]) * sign).sum() / 2**30)
    reserved_counter = a.trace.counters[a.trace.counters["name"].astype(str) == "memory_reserved_bytes"]["value"].iloc[0]
    assert reserved.y[-1] == pytest.approx(reserved_counter / 2**30)  # the event sum meets the snapshot's state


def test_communication_of_the_ddp_recording(ddp):
    cs = F.collective_summary_frame(ddp.trace)
    assert cs.groupby("op")["calls"].sum().to_dict() == {"all_gather": 2, "all_reduce": 130, "broadcast": 24}
    assert (cs["sized_calls"] == 0).all()  # nsys without NCCL's NVTX payloads: no message sizes
    assert F.comm_bandwidth_figure(ddp.trace).layout.meta["empty"]
    # GPU time of the NCCL kernels in each rank's window: all-reduce dominates, as nccl_dominated measures
    from gpudoctor.render.summaries import windows
    ck = F.comm_kernel_frame(ddp.trace, windows(ddp))
    for r in (0, 1):
        mine = ck[ck["rank"] == r].set_index("op")
        f = next(f for f in ddp.findings if f.analyzer == "nccl_dominated" and f.rank == r)
        assert mine["window_pct"].idxmax() == "all_reduce"
        assert mine.loc["all_reduce", "window_pct"] == pytest.approx(100 * f.metrics["comm_fraction"], abs=0.1)
    assert ck[ck["op"] == "all_reduce"]["kernels"].tolist() == [40, 32]
    fig = F.collective_time_figure(ddp.trace, windows(ddp))
    assert _drawn(fig) == int((ck["window_pct"] > 0).sum()) == 2 and list(fig.layout.yaxis.range) == [0, 100]
    frac = F.comm_fraction_figure(ddp)
    assert list(frac.layout.yaxis.range) == [0, 100] and _drawn(frac) >= 2
