"""The analyze path on 1M kernels: what ``gpudoctor analyze FILE --json OUT`` does after the read.

    python bench/bench_analyze.py [--kernels 1000000] [--repeat 3] [--data /tmp/gpudoctor-bench]

Reads the scaled nsys input of bench/make_inputs.py (made on first use) once, then times ``repeat`` times
in the same process: ``pipeline.analyze`` (every rank's steady-state window, summary, findings and the gate's
per-step samples, each computed once) and ``render.jsonout.render`` (which renders what the analysis
computed). Prints one JSON line per run: wall and CPU seconds of each part and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_inputs  # noqa: E402

from gpudoctor.pipeline import analyze  # noqa: E402
from gpudoctor.readers import nsys  # noqa: E402
from gpudoctor.render import jsonout  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path("/tmp/gpudoctor-bench"))
    args = ap.parse_args(argv)
    path = make_inputs.make_nsys(args.kernels, args.data / "nsys", mix="launches")
    trace = nsys.read(path)
    print(json.dumps({"kernels": len(trace.kernels), "input": str(path)}), flush=True)
    for i in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        analysis = analyze(trace, [], [])
        t1, c1 = time.perf_counter(), time.process_time()
        jsonout.render(analysis)
        t2, c2 = time.perf_counter(), time.process_time()
        print(json.dumps({"run": i, "analyze_s": round(t1 - t0, 3), "analyze_cpu_s": round(c1 - c0, 3),
                          "json_s": round(t2 - t1, 3), "json_cpu_s": round(c2 - c1, 3),
                          "total_s": round(t2 - t0, 3), "total_cpu_s": round(c2 - c0, 3),
                          "load": round(os.getloadavg()[0], 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
