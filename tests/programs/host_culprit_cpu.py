"""A CPU training loop with one known slow host line, for the Python stack sampler: each step runs a
pure-Python ``slow_host()`` (the culprit) inside a ``record_function("slow_host")`` range, so a trace
of it holds the exact time the culprit took, and then a small model. The culprit takes several sample
intervals per step (about 9 ms), so that where a sample interval starts and ends does not decide the
charge even when the machine is loaded and the timer's signals come late. It also measures itself how much
of the step ``slow_host`` takes and prints it as JSON at the end.

    python tests/programs/host_culprit_cpu.py [--steps N]
"""

import argparse
import json
import time

import torch


def slow_host(n: int = 100_000) -> int:
    return sum(i * i % 7 for i in range(n))  # culprit: slow_host


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64)
    in_culprit = total = 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with torch.profiler.record_function("slow_host"):
            slow_host()
        t1 = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        in_culprit += t1 - t0
        total += t2 - t0
    print(json.dumps({"culprit_fraction": round(in_culprit / total, 4), "steps": args.steps}), flush=True)


if __name__ == "__main__":
    main()
