"""gpudoctor's Kineto reader side by side with Holistic Trace Analysis (HTA) on the same traces.

    python -m venv /tmp/hta-venv && /tmp/hta-venv/bin/pip install HolisticTraceAnalysis==0.5.0 'pandas<3'
    python bench/bench_hta.py [--sizes 100000,1000000,2160000] [--layouts kineto,oneline] [--repeat 1]
                              [--hta-python /tmp/hta-venv/bin/python] [--skip-hta] [--analyze] [--out results.json]

Inputs: bench/make_inputs.py kineto (the attn_naive torch.profiler trace with its steady steps
replicated; plain JSON, Kineto's layout, and the same document on one line). For each size and layout,
in one run of this script, alternating:

- gpudoctor: ``gpudoctor.readers.kineto.read(path)`` in a fresh process of this Python;
- HTA: ``hta.trace_analysis.TraceAnalysis(trace_dir=DIR)`` (it parses the trace on construction) in a
  fresh process of the HTA venv's Python, DIR holding only that trace (a symlink named rank0.json).
  HTA 0.5.0 as pip installs it has no ijson, so it parses with its JSON backend (``json.load`` of the
  whole file), its default then; with one rank it parses in-process (no multiprocessing pool).

Each child reports its load time (imports excluded), CPU time, RSS after imports and peak RSS
(``VmHWM``); the harness samples the process tree's RSS too (``tree_peak_mb``) and takes the tree's CPU
time from ``wait4`` (``process_cpu_s``, imports included). Ratios: load wall time, the tree's CPU time
and the tree's peak RSS (gpudoctor reads a large plain file in two processes, so its own process is
only part of it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_readers  # noqa: E402
import make_inputs  # noqa: E402

HTA_CHILD = r"""
import json, sys, time
def status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return round(int(line.split()[1]) / 1024, 1)
t0 = time.perf_counter()
import hta
from hta.trace_analysis import TraceAnalysis
out = {"import_s": round(time.perf_counter() - t0, 3), "base_mb": status("VmRSS:")}
t1, c1 = time.perf_counter(), time.process_time()
a = TraceAnalysis(trace_dir=sys.argv[1])
out["read_s"] = round(time.perf_counter() - t1, 3)
out["read_cpu_s"] = round(time.process_time() - c1, 3)
out["rows"] = {str(r): len(df) for r, df in a.t.traces.items()}
out["peak_mb"] = out["peak_read_mb"] = status("VmHWM:")
try:
    from importlib.metadata import version
    out["hta_version"] = version("HolisticTraceAnalysis")
    out["pandas_version"] = version("pandas")
except Exception:
    pass
print(json.dumps(out))
"""


def hta_dir(trace: Path, data: Path, layout: str) -> Path:
    d = data / "hta" / f"{trace.stem.replace('.torch', '')}_{layout}"
    d.mkdir(parents=True, exist_ok=True)
    link = d / "rank0.json"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(trace)
    return d


def measure_hta(python: str, d: Path, repeat: int, timeout: float) -> dict:
    runs = []
    for _ in range(repeat):
        r = bench_readers.run_measured([python, "-W", "ignore", "-c", HTA_CHILD, str(d)], timeout)
        r["loadavg"] = round(os.getloadavg()[0], 2)
        runs.append(r)
        if r.get("rc") != 0:
            break
    return bench_readers.best_of(runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000,2160000")
    ap.add_argument("--layouts", default="kineto,oneline", help="kineto (Kineto's layout) and/or oneline")
    ap.add_argument("--skip-hta", action="store_true", help="gpudoctor only (e.g. sizes HTA cannot finish)")
    ap.add_argument("--analyze", action="store_true",
                    help="gpudoctor also runs the analyzers after the read (what `gpudoctor analyze` computes): "
                         "analyze_s, and process_s / process_cpu_s cover read + analyzers")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--hta-python", default="/tmp/hta-venv/bin/python")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--data", type=Path, default=make_inputs.DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if not Path(a.hta_python).exists():
        raise SystemExit(f"no HTA venv at {a.hta_python}: see this script's docstring")
    results = {"machine": bench_readers.machine(), "results": []}
    print(json.dumps(results["machine"]), flush=True)
    for n, layout in [(int(float(x)), lay) for x in a.sizes.split(",") if x for lay in a.layouts.split(",")]:
        make = make_inputs.make_kineto_oneline if layout == "oneline" else make_inputs.make_kineto
        trace = make(n, a.data / "kineto")
        counts = make_inputs.kineto_counts(trace)
        counts["layout"] = layout
        gd = bench_readers.measure({"kind": "kineto", "path": str(trace), "analyze": a.analyze}, a.repeat, a.timeout)
        hta = {} if a.skip_hta else measure_hta(a.hta_python, hta_dir(trace, a.data, layout), a.repeat, a.timeout)
        row = {"events": counts["events"], "bytes": counts["bytes"], "layout": layout, "gpudoctor": gd, "hta": hta}
        if gd.get("read_s") and hta.get("read_s"):
            # gpudoctor reads a large plain file in two processes: CPU and memory of the whole process
            # tree (imports included on both sides), not of the measured process alone
            row["speedup"] = round(hta["read_s"] / gd["read_s"], 2)
            row["cpu_speedup"] = round(hta["process_cpu_s"] / gd["process_cpu_s"], 2)
            row["peak_ratio"] = round(gd["tree_peak_mb"] / hta["tree_peak_mb"], 3)
        print(json.dumps({k: v for k, v in row.items() if k not in ("gpudoctor", "hta")} |
                         {"gd_read_s": gd.get("read_s"), "hta_read_s": hta.get("read_s"),
                          "gd_peak_mb": gd.get("peak_mb"), "gd_tree_peak_mb": gd.get("tree_peak_mb"),
                         "gd_process_s": gd.get("process_s"), "gd_process_cpu_s": gd.get("process_cpu_s"),
                         "gd_analyze_s": gd.get("analyze_s"), "hta_peak_mb": hta.get("peak_mb"),
                          "hta_rc": hta.get("rc"), "hta_err": hta.get("stderr_tail", "")[-300:]}), flush=True)
        results["results"].append(row)
    return bench_readers.finish(results, a.out)


if __name__ == "__main__":
    sys.exit(main())
