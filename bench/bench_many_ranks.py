"""Many ranks end to end: parse + analyze N per-rank nsys files, serial vs parallel (processes, Dask).

    python bench/bench_many_ranks.py [--ranks 64] [--kernels-per-rank 0] [--straggler 5]
                                     [--modes serial,processes,dask] [--workers 2] [--dask-python PY]
                                     [--out results.json]

Inputs: bench/make_inputs.py ranks: N copies of fixtures/nsys/attn_naive.nsys.sqlite named
``attn_naive.rankN.nsys.sqlite`` (``--kernels-per-rank`` scales each copy first; ``--straggler R`` makes
rank R's kernels 30% longer so the cross-rank reduce has a straggler to find).

Modes, each in a fresh process (``python bench/bench_many_ranks.py _child MODE DIR``):

- serial: ``pipeline.analyze_inputs(..., need_trace=True)``: read every file, merge into one trace,
  summarize and analyze it (what the dashboard and ``profile`` do, as they keep the events; from 8 files
  on, ``gpudoctor analyze`` takes the process pool below instead);
- processes: ``gpudoctor.parallel.analyze_many(..., executor="processes")``: a process pool;
- dask: ``analyze_many(..., executor="dask")``: a local Dask cluster (started inside the timing: its
  start-up is part of the cost), run with ``--dask-python`` (a Python that has dask.distributed;
  default: this one if it has it).

Reported: wall time of the call (``total_s``) and of the process; peak RSS of the calling process
(``VmHWM``), the largest worker peak (``peak_rss_mb`` that each map task reports), and the sampled RSS
of the whole process tree (``tree_peak_mb``: parent + workers + Dask scheduler/nanny). CPU: the calling
process's own (``parent_cpu_s``) and the sum over map tasks (``tasks_cpu_s``, measured on the workers),
which stay meaningful when the machine is shared. ``digest`` is a hash of the Analysis JSON: equal
digests mean the modes gave the same result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_readers  # noqa: E402
import make_inputs  # noqa: E402


def child(mode: str, d: str, workers: int) -> dict:
    sys.path.insert(0, str(ROOT))

    status = bench_readers.status
    t0 = time.perf_counter()
    from gpudoctor import parallel
    from gpudoctor.pipeline import analyze_inputs
    from gpudoctor.render import jsonout
    out = {"import_s": round(time.perf_counter() - t0, 3), "base_mb": status("VmRSS:")}
    t1 = time.perf_counter()
    if mode == "serial":
        a = analyze_inputs([d], need_trace=True)
    else:
        a = parallel.analyze_many([d], workers=workers, executor=mode, progress=False)
    out["total_s"] = round(time.perf_counter() - t1, 3)
    t2 = time.perf_counter()
    js = jsonout.to_json_dict(a)
    out["json_s"] = round(time.perf_counter() - t2, 3)
    out["digest"] = hashlib.sha256(json.dumps(js, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out["ranks"] = len(a.ranks)
    out["findings"] = sorted({f"{f.analyzer}:{f.severity}" for f in a.findings})
    out["peak_mb"] = status("VmHWM:")
    out["parent_cpu_s"] = round(time.process_time(), 2)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        mode, d, workers = argv[1], argv[2], int(argv[3])
        if mode != "serial":  # per-task peaks, from the map results
            sys.path.insert(0, str(ROOT))
            from gpudoctor import parallel
            peaks, cpu = [], []
            original = parallel.reduce_results

            def spy(results, config=None):
                peaks.extend(r.peak_rss_mb for r in results)
                cpu.extend(r.cpu_s for r in results)
                return original(results, config)
            parallel.reduce_results = spy
            res = child(mode, d, workers)
            res["worker_peak_mb"] = round(max(peaks), 1) if peaks else None
            res["tasks_cpu_s"] = round(sum(cpu), 2)
        else:
            res = child(mode, d, workers)
        print(json.dumps(res))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--kernels-per-rank", type=int, default=0)
    ap.add_argument("--straggler", type=int, default=5)
    ap.add_argument("--modes", default="serial,processes,dask")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--dask-python", default=None)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--data", type=Path, default=make_inputs.DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    d = make_inputs.make_ranks(a.ranks, a.data / "ranks", a.kernels_per_rank, a.straggler)
    results = {"machine": bench_readers.machine(), "input": {"dir": str(d), "ranks": a.ranks,
               "kernels_per_rank": a.kernels_per_rank or "fixture (1089)", "straggler": a.straggler},
               "results": []}
    print(json.dumps(results["machine"]), flush=True)
    for mode in a.modes.split(","):
        py = sys.executable
        if mode == "dask":
            py = a.dask_python or py
        cmd = [py, "-W", "ignore", str(Path(__file__)), "_child", mode, str(d), str(a.workers)]
        r = bench_readers.run_measured(cmd, a.timeout)
        r.update({"mode": mode, "workers": a.workers if mode != "serial" else 1,
                  "loadavg": round(os.getloadavg()[0], 2)})
        print(json.dumps(r), flush=True)
        results["results"].append(r)
    return bench_readers.finish(results, a.out)


if __name__ == "__main__":
    sys.exit(main())
