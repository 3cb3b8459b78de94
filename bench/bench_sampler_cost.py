"""What the agent's Python stack sampler costs a real loop, measured inside one process.

    python bench/bench_sampler_cost.py [CASE ...] [--blocks N] [--steps-per-block N] [--interval-ms X]

Runs the culprit loops of fixtures/workloads/culprits.py (on the GPU; WORKLOAD_DEVICE=cpu smoke-tests it)
in blocks of steps, the variants interleaved block by block so that the machine's drift between runs
(which moved step times more than the sampler in earlier separate runs) falls on all of them alike:

  bare        nothing running
  sampler     the agent's PythonSampler (SIGALRM every --interval-ms)
  profiler    torch.profiler (CPU + CUDA activities, record_shapes), as the torch backend's window runs it
  both        the profiler and the sampler, as ``gpudoctor profile --backend torch`` runs the window
  noop        the profiler and the same SIGALRM timer with a Python handler that does nothing
  ignored     the profiler and the same timer with SIGALRM ignored (the kernel's delivery alone)

Each block is timed between two device synchronizations. Prints one JSON line per block and a summary
line per case and variant (median block step time, and its difference to the first variant listed).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures" / "workloads"))
sys.path.insert(0, str(ROOT))

import culprits  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from gpudoctor.collect.pysampler import PythonSampler  # noqa: E402

VARIANTS = ("bare", "sampler", "profiler", "both", "noop", "ignored")


def run_block(step, variant: str, steps: int, interval_s: float, tmp: str) -> dict:
    prof = sampler = None
    if variant in ("profiler", "both", "noop", "ignored"):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if culprits.CUDA else [])
        prof = profile(activities=acts, record_shapes=True)
        prof.start()
    if variant in ("sampler", "both"):
        sampler = PythonSampler(f"{tmp}/samples.json", interval_s=interval_s)
        sampler.start(None)
    if variant in ("noop", "ignored"):
        signal.signal(signal.SIGALRM, (lambda signum, frame: None) if variant == "noop" else signal.SIG_IGN)
        signal.setitimer(signal.ITIMER_REAL, interval_s, interval_s)
    culprits.sync()
    t0 = time.perf_counter_ns()
    for _ in range(steps):
        step()
    culprits.sync()
    elapsed = time.perf_counter_ns() - t0
    if variant in ("noop", "ignored"):
        signal.setitimer(signal.ITIMER_REAL, 0.0, 0.0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    out = {"variant": variant, "steps": steps, "step_ms": round(elapsed / steps / 1e6, 4)}
    if sampler is not None:
        s = sampler.stop(None)
        out.update(samples=s["samples"], sampler_busy_ms=s["sampler_busy_ms"], nested=s["nested"])
    if prof is not None:
        prof.stop()  # the trace is dropped: only its cost while recording is measured
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*", default=["item_sync", "slow_preprocess", "tiny_kernels"])
    ap.add_argument("--blocks", type=int, default=5, help="blocks per variant")
    ap.add_argument("--steps-per-block", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--interval-ms", type=float, default=1.0)
    ap.add_argument("--variants", default=",".join(VARIANTS[:4]), help=f"comma-separated, of {','.join(VARIANTS)}")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            step = culprits.CASES[case](False)
            for _ in range(args.warmup):
                step()
            variants = args.variants.split(",")
            rows: dict[str, list[dict]] = {v: [] for v in variants}
            for _ in range(args.blocks):
                for v in variants:
                    r = run_block(step, v, args.steps_per_block, args.interval_ms / 1e3, tmp)
                    rows[v].append(r)
                    print(json.dumps({"case": case, **r}), flush=True)
            bare = statistics.median(r["step_ms"] for r in rows[variants[0]])
            for v in variants:
                med = statistics.median(r["step_ms"] for r in rows[v])
                summary = {"summary": case, "variant": v, "median_step_ms": round(med, 3),
                           "vs_first_ms": round(med - bare, 3), "vs_first_pct": round(100 * (med / bare - 1), 1)}
                if v in ("sampler", "both"):
                    n = sum(r["samples"] for r in rows[v])
                    busy = sum(r["sampler_busy_ms"] for r in rows[v])
                    steps = args.steps_per_block * args.blocks
                    summary.update(samples_per_step=round(n / steps, 2), busy_us_per_sample=round(1e3 * busy / max(n, 1), 1))
                print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
