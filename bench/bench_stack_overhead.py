"""What recording Python call stacks costs torch.profiler: mean step time of one loop without the
profiler, with the profiler (CPU activity, record_shapes), and with the profiler plus with_stack=True.

    python bench/bench_stack_overhead.py [--steps N] [--repeats R]

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


if __name__ == "__main__":
    main()
