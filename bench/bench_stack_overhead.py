"""What recording Python call stacks costs torch.profiler: mean step time of one loop without the
profiler, with the profiler (CPU activity, record_shapes), and with the profiler plus with_stack=True.

    python bench/bench_stack_overhead.py [--steps N] [--repeats R]
    python bench/bench_stack_overhead.py --per-call   # extra ns per recorded Python call / built-in call

The loop is a small training step with the shapes of fixtures/workloads/culprits.py's tiny_kernels case
scaled down for a CPU (a stack of Linear layers, backward, SGD, an EMA loop of two in-place ops per
parameter) plus a little pure-Python work, so that both op dispatch and Python calls are measured. The
three variants run interleaved, ``--repeats`` times each; prints one JSON line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile


def make_step():
    torch.set_num_threads(1)  # a shared CPU: threads of the intra-op pool would only add noise
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(20)])
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-3)
    x = torch.randn(64, 128)

    def step():
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for e, p in zip(ema, params):
            e.mul_(0.999).add_(p.detach(), alpha=0.001)
        return sum(i * i % 7 for i in range(2000))
    return step


def run(variant: str, steps: int) -> float:
    step = make_step()
    for _ in range(3):
        step()
    prof = None
    if variant != "no_profiler":
        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=variant == "with_stack")
        prof.start()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
        if prof is not None:
            prof.step()
    dt = (time.perf_counter() - t0) / steps
    if prof is not None:
        prof.stop()
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    res: dict[str, list[float]] = {v: [] for v in ("no_profiler", "profiler", "with_stack")}
    for r in range(args.repeats):
        for v in res:
            ms = run(v, args.steps) * 1e3
            res[v].append(ms)
            print(json.dumps({"repeat": r, "variant": v, "mean_step_ms": round(ms, 3)}), flush=True)
    med = {v: statistics.median(x) for v, x in res.items()}
    print(json.dumps({"median_step_ms": {v: round(m, 3) for v, m in med.items()},
                      "with_stack_over_profiler": round(med["with_stack"] / med["profiler"], 3),
                      "with_stack_over_no_profiler": round(med["with_stack"] / med["no_profiler"], 3),
                      "torch": torch.__version__}))


# ---------------------------------------------------------------- per recorded call
def _py_calls(n: int) -> float:
    return float(sum(i * i % 7 for i in range(n)))  # n generator resumes: Python calls for the tracer


def _c_calls(n: int, text: str = "the quick brown fox jumps over the lazy dog ") -> int:
    s = (text * (n // len(text) + 1))[:n]
    return len([ord(c) for c in s])  # n calls of a built-in function


def per_call_ns(kind: str, n: int, repeats: int) -> dict:
    """Extra time per recorded call that with_stack=True adds over the same profiler without stacks:
    (t_with_stack - t_without) / n, median of ``repeats`` interleaved runs."""
    fn = _py_calls if kind == "python" else _c_calls
    extra = []
    for _ in range(repeats):
        times = {}
        for stack in (False, True):
            with profile(activities=[ProfilerActivity.CPU], with_stack=stack):
                t0 = time.perf_counter()
                fn(n)
                times[stack] = time.perf_counter() - t0
        extra.append((times[True] - times[False]) / n * 1e9)
    return {"kind": kind, "calls": n, "extra_ns_per_call": round(statistics.median(extra), 1),
            "runs_ns": [round(x, 1) for x in extra]}


if __name__ == "__main__" and "--per-call" in __import__("sys").argv:
    for k in ("python", "c"):
        print(json.dumps(per_call_ns(k, 200_000, 5)), flush=True)


if __name__ == "__main__" and "--per-call" not in __import__("sys").argv:
    main()
