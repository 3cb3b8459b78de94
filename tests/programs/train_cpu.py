"""A tiny CPU training loop for profiling tests: a 2-layer MLP, marked steps and ranges.

    python tests/programs/train_cpu.py [--steps N] [--exit-code N] [--raise-at STEP] [--sleep S]

--exit-code N exits with N after the loop; --raise-at K raises ValueError in step K; --sleep S sleeps S
seconds per step (so a test can interrupt the program mid-run; prints "step K" as it goes).
"""

import argparse
import sys
import time

import torch

import gpudoctor.annotate as ga


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--exit-code", type=int, default=0)
    ap.add_argument("--raise-at", type=int, default=-1)
    ap.add_argument("--sleep", type=float, default=0.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for i in range(args.steps):
        with ga.range(f"step_{i}"):
            with ga.range("forward"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            with ga.range("backward"):
                opt.zero_grad()
                loss.backward()
            opt.step()
        ga.kv_cache(used_tokens=10 * (i + 1), allocated_tokens=64 * (i + 1), block_tokens=16)
        if i == args.raise_at:
            raise ValueError(f"boom at step {i}")
        print(f"step {i} loss {loss.item():.4f}", flush=True)
        if args.sleep:
            time.sleep(args.sleep)
        ga.step()
    sys.exit(args.exit_code)


if __name__ == "__main__":
    main()
