"""Benchmark of the dashboard on a run with a million kernels.

    python bench/bench_dashboard.py [--kernels 1000000] [--repeat 3] [--json FILE]

The run is real kernels scaled up: attn_naive's 1,089 kernels (fixtures/nsys/attn_naive.nsys.sqlite)
repeated back to back, each copy shifted by the span of the original, cut at ``--kernels`` rows, put
into a Trace directly. A server process analyzes it, builds the app (timeline index prepared up front,
as ``gpudoctor dashboard`` does) and serves it on a free loopback port; this process drives Debian's
Chromium through Playwright (shared/testing/browser.md) and times, per page load in a fresh browser
context (cold cache first, then warm):

- Overview: navigation until the findings table rows and the category bars are drawn;
- Timeline: navigation until the zoomed-out (aggregated) timeline's heat strips are drawn;
- zoom: a relayout into one step until the exact kernels are drawn; reset: back to the whole run;
- Timeline revisit: the same browser navigating to the Timeline again (caches warm);
- the floor: a blank page that only loads the same plotly.js bundle and draws a 3-point line (what any
  plotly page costs this browser on this machine, whatever the data).

Then it reads the server process's resident memory (VmRSS now, VmHWM peak) from /proc. Target: first
complete render of Overview and Timeline <= 3 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / "fixtures" / "nsys" / "attn_naive.nsys.sqlite"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def scale_trace(base, n_kernels: int):
    """A Trace whose kernels are ``base``'s repeated back to back (shifted in time) up to ``n_kernels`` rows."""
    import numpy as np
    import pandas as pd

    from gpudoctor.model.trace import Trace, conform

    k = base.kernels
    n = len(k)
    copies = -(-n_kernels // n)
    span = int(k["end_ns"].max() - k["start_ns"].min()) + 1000
    shift = np.repeat(np.arange(copies, dtype=np.int64) * span, n)[:n_kernels]
    cols = {}
    for c in k.columns:
        col = k[c]
        if isinstance(col.dtype, pd.CategoricalDtype):  # keep categoricals cheap: tile the codes
            cols[c] = pd.Categorical.from_codes(np.tile(col.cat.codes.to_numpy(), copies)[:n_kernels], col.cat.categories)
        else:
            cols[c] = np.tile(col.to_numpy(), copies)[:n_kernels]
    cols["start_ns"] = cols["start_ns"] + shift
    cols["end_ns"] = cols["end_ns"] + shift
    t = Trace(devices=base.devices, ranks=base.ranks, meta=dict(base.meta))
    t.kernels = conform("kernels", pd.DataFrame(cols))
    return t


# ------------------------------------------------------------------------------------------ server process
def serve(n_kernels: int) -> None:
    from werkzeug.serving import make_server

    from gpudoctor.dashboards.app import Run, create_app
    from gpudoctor.pipeline import analyze
    from gpudoctor.readers import nsys

    t0 = time.perf_counter()
    trace = scale_trace(nsys.read(FIXTURE), n_kernels)
    t1 = time.perf_counter()
    analysis = analyze(trace, [{"path": f"{FIXTURE} (scaled)"}], [], samples=False)
    t2 = time.perf_counter()
    run = Run(f"attn_naive x{-(-n_kernels // 1089)} ({len(trace.kernels):,} kernels)", analysis)
    app = create_app([run])  # prepares the timeline index
    t3 = time.perf_counter()
    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    print(json.dumps({"ready": True, "port": srv.server_port, "pid": os.getpid(), "kernels": len(trace.kernels),
                      "build_s": t1 - t0, "analyze_s": t2 - t1, "prepare_s": t3 - t2,
                      "step": [int(analysis.ranks[0].window.steps["gpu_start_ns"].iloc[5]), int(analysis.ranks[0].window.steps["gpu_end_ns"].iloc[5])],
                      "origin_ns": int(run.index.origin_ns)}), flush=True)
    srv.serve_forever()


def _proc_mem(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


# ------------------------------------------------------------------------------------------ browser side
def measure(url: str, info: dict, repeat: int) -> dict:
    from playwright.sync_api import sync_playwright

    res: dict[str, list[float]] = {"overview": [], "timeline": [], "timeline_revisit": [], "zoom_step": [],
                                   "zoom_reset": [], "plotly_alone": []}
    floor_html = (f'<html><body><div id="g"></div><script src="{url}/_dash-component-suites/plotly/package_data/plotly.min.js">'
                  '</script><script>Plotly.newPlot("g", [{y: [1, 2, 3]}]).then(() => { window.done = 1; });</script></body></html>')
    lo, hi = info["step"]
    origin = info["origin_ns"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        for i in range(repeat):
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = ctx.new_page()
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            t0 = time.perf_counter()
            page.goto(url + "/")
            page.wait_for_selector("#findings-table td[data-column='analyzer']", timeout=120_000)
            page.wait_for_selector("#category-bars .category-seg", timeout=120_000)
            res["overview"].append(time.perf_counter() - t0)

            page2 = ctx.new_page()
            page2.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            t0 = time.perf_counter()
            page2.goto(url + "/timeline")
            page2.wait_for_selector("#timeline-graph .heatmaplayer image", state="attached", timeout=120_000)
            res["timeline"].append(time.perf_counter() - t0)
            status = page2.inner_text("#timeline-status")

            t0 = time.perf_counter()
            page2.evaluate("([a, b]) => Plotly.relayout(document.querySelector('#timeline-graph .js-plotly-plot'),"
                           " {'xaxis.range[0]': a, 'xaxis.range[1]': b})", [(lo - origin) / 1e6, (hi - origin) / 1e6])
            page2.wait_for_function("document.getElementById('timeline-status').innerText.startsWith('exact')", timeout=120_000)
            page2.wait_for_selector("#timeline-graph .scatterlayer .trace", state="attached")
            res["zoom_step"].append(time.perf_counter() - t0)
            zoomed = page2.inner_text("#timeline-status")

            t0 = time.perf_counter()
            page2.click("#timeline-reset")
            page2.wait_for_function("document.getElementById('timeline-status').innerText.startsWith('aggregated')", timeout=120_000)
            page2.wait_for_selector("#timeline-graph .heatmaplayer image", state="attached")
            res["zoom_reset"].append(time.perf_counter() - t0)

            # the same browser coming back to the Timeline (HTTP cache and compiled-code cache warm)
            t0 = time.perf_counter()
            page2.goto(url + "/timeline")
            page2.wait_for_selector("#timeline-graph .heatmaplayer image", state="attached", timeout=120_000)
            res["timeline_revisit"].append(time.perf_counter() - t0)

            # the floor: plotly.js alone (load and evaluate the bundle Dash serves, draw a 3-point line)
            page3 = ctx.new_page()
            page3.route(url + "/__plotly_alone", lambda route: route.fulfill(body=floor_html, content_type="text/html"))
            t0 = time.perf_counter()
            page3.goto(url + "/__plotly_alone")
            page3.wait_for_function("window.done === 1", timeout=120_000)
            res["plotly_alone"].append(time.perf_counter() - t0)
            if i == 0:
                art = ROOT / "test-artifacts"
                art.mkdir(exist_ok=True)
                page.screenshot(path=str(art / "bench-overview-1M.png"), full_page=True)
                page2.screenshot(path=str(art / "bench-timeline-1M.png"), full_page=True)
            ctx.close()
            if errors:
                raise SystemExit(f"browser console errors: {errors}")
        browser.close()
    return {"times": res, "status": status, "zoomed_status": zoomed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.kernels)
        return 0
    if shutil.which("chromium") is None:
        print("needs Debian's chromium (apt-get install -y chromium)", file=sys.stderr)
        return 2

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--kernels", str(args.kernels)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"server exited with {proc.wait()}")
        info = json.loads(line)
        startup = time.perf_counter() - t_start
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        mem_idle = _proc_mem(proc.pid)
        out = measure(f"http://127.0.0.1:{info['port']}", info, args.repeat)
        mem = _proc_mem(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)

    t = out["times"]
    rows = [
        ("kernels in the run", f"{info['kernels']:,}"),
        ("server: build scaled trace", f"{info['build_s']:.2f} s"),
        ("server: analyze (pipeline, before serving)", f"{info['analyze_s']:.2f} s"),
        ("server: create app + timeline index", f"{info['prepare_s']:.2f} s"),
        ("server: process start to ready", f"{startup:.2f} s"),
        ("Overview first render (cold browser cache)", f"{t['overview'][0]:.2f} s"),
        ("Overview render, median of warm", f"{statistics.median(t['overview'][1:] or t['overview']):.2f} s"),
        ("Timeline first render (zoomed out, aggregated)", f"{t['timeline'][0]:.2f} s"),
        ("Timeline render, median of warm", f"{statistics.median(t['timeline'][1:] or t['timeline']):.2f} s"),
        ("Timeline revisit in the same browser, median", f"{statistics.median(t['timeline_revisit']):.2f} s"),
        ("  floor: plotly.js alone (load + 3-point plot), median", f"{statistics.median(t['plotly_alone']):.2f} s"),
        ("zoom into one step (exact kernels), median", f"{statistics.median(t['zoom_step']):.2f} s"),
        ("zoom back out (aggregated), median", f"{statistics.median(t['zoom_reset']):.2f} s"),
        ("server RSS after start (idle)", f"{mem_idle.get('VmRSS', 0) / 2**20:.0f} MiB"),
        ("server RSS after the renders", f"{mem.get('VmRSS', 0) / 2**20:.0f} MiB"),
        ("server peak RSS (VmHWM)", f"{mem.get('VmHWM', 0) / 2**20:.0f} MiB"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  value")
    print(f"{'-' * w}  {'-' * 12}")
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(f"\ntimeline status zoomed out: {out['status']}")
    print(f"timeline status one step:   {out['zoomed_status']}")
    print(f"all times (s): {json.dumps({k: [round(x, 3) for x in v] for k, v in t.items()})}")
    print(f"machine: {os.cpu_count()} CPUs; load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} "
          "(other work on a shared machine slows every number here)")
    target_ok = t["overview"][0] <= 3 and t["timeline"][0] <= 3
    print(f"target (first render of Overview and Timeline <= 3 s): {'met' if target_ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "times": t, "memory_bytes": mem, "memory_idle_bytes": mem_idle,
                                               "startup_s": startup}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
