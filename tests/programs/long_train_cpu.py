"""A plain torch.optim training loop that runs for a given time, as users write them: no gpudoctor
annotations, many small ops per step (the kind of loop whose whole-program trace grows without bound).

    python tests/programs/long_train_cpu.py [--seconds S] [--exit-code N] [--log STEPS.jsonl]
"""

import argparse
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--exit-code", type=int, default=0)
    ap.add_argument("--log", help="JSON lines: the end time of each step (for benchmarks)")
    args = ap.parse_args()
    log = open(args.log, "w") if args.log else None
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(16, 32)
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < args.seconds:
        loss = model(x).pow(2).mean()
        for _ in range(20):  # many small ops per step
            loss = loss + x.mean() * 0.0
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if log:
            log.write(f'{{"step": {step}, "t_ns": {time.time_ns()}}}\n')
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.5f}", flush=True)
    print(f"done after {step} steps", flush=True)
    if log:
        log.close()
    sys.exit(args.exit_code)


if __name__ == "__main__":
    main()
