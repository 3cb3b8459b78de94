"""How fast the program's own Python runs inside a capture window, per collector.

    python bench/bench_host_python.py run OUT.jsonl [--steps N] [--no-sync] [--pin-main CORE]  # the program
    python bench/bench_host_python.py pure OUT.jsonl [--calls N]     # the bookkeeping alone, no GPU
    python bench/bench_host_python.py summary OUT.jsonl [RUN_DIR]    # the comparison

``run`` is a loop shaped like the item_sync culprit (fixtures/workloads/culprits.py): an MLP forward pass
on the GPU, ``loss.item()`` (the host waits for the GPU to drain), pure-Python bookkeeping, backward and
the optimizer step. The loop times its own bookkeeping with ``perf_counter_ns`` and appends one JSON line
per step: wall time, bookkeeping ns, step ns. ``--no-sync`` drops the ``.item()``, so the bookkeeping
runs while the GPU is busy with the queued forward pass. Each line also names the core the thread ran on
(``cpu``); ``--pin-main`` keeps the main thread on one core; ``pure`` times the bookkeeping with no GPU and
no torch (scripts/host-speed-steadiness.sh runs them all).

Run it bare and under ``gpudoctor profile`` (``-o RUN_DIR``); ``summary`` splits the steps by the run's
capture window (manifest ``capture.start_ns`` / ``end_ns``) and prints the median bookkeeping time before,
inside and after the window, and inside / before: how much slower the collector made the program's own
Python in the window. The Python samples' host times are taken inside the window; this ratio is the
collector's share of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def bookkeeping(n: int = 25_000) -> float:
    return float(sum(i * i % 7 for i in range(n)))


def current_cpu() -> int:
    """The core this thread last ran on (field 39 of /proc/thread-self/stat), to see migrations."""
    try:
        stat = Path("/proc/thread-self/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[36])


def pure(out: Path, calls: int) -> None:
    """The bookkeeping call alone, back to back, no GPU: whether the host's speed changes without CUDA."""
    with out.open("w") as f:
        for _ in range(calls):
            b0 = time.perf_counter_ns()
            bookkeeping()
            f.write(json.dumps({"t_ns": time.time_ns(), "bookkeeping_ns": time.perf_counter_ns() - b0,
                                "cpu": current_cpu()}) + "\n")


def run(out: Path, steps: int, sync: bool, pin_main: int | None = None) -> None:
    import os

    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(4096, 4096), nn.GELU()]
    model = nn.Sequential(*layers).to("cuda", torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    total = 0.0
    if pin_main is not None:  # this thread only (threads started before keep their cores)
        os.sched_setaffinity(0, {pin_main})
    with out.open("w") as f:
        for _ in range(steps):
            t0 = time.perf_counter_ns()
            loss = model(x).float().pow(2).mean()
            if sync:
                total += loss.item()
            b0 = time.perf_counter_ns()
            bookkeeping()
            b1 = time.perf_counter_ns()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            f.write(json.dumps({"t_ns": time.time_ns(), "bookkeeping_ns": b1 - b0,
                                "step_ns": time.perf_counter_ns() - t0, "cpu": current_cpu()}) + "\n")
    torch.cuda.synchronize()


def summary(out: Path, run_dir: Path | None) -> dict:
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()][3:]  # warm-up
    start = end = None
    if run_dir is not None:
        cap = json.loads((run_dir / "manifest.json").read_text()).get("capture") or {}
        start, end = cap.get("start_ns"), cap.get("end_ns")
    parts: dict[str, list[int]] = {"before": [], "inside": [], "after": []}
    for r in rows:
        if start is None:
            part = "before"
        else:
            part = "before" if r["t_ns"] < start else "inside" if r["t_ns"] <= end else "after"
        parts[part].append(r["bookkeeping_ns"])
    doc: dict = {"file": str(out), "run_dir": str(run_dir) if run_dir else None}
    for k, v in parts.items():
        doc[f"{k}_steps"] = len(v)
        doc[f"{k}_median_us"] = round(statistics.median(v) / 1e3, 1) if v else None
    if doc["before_median_us"] and doc["inside_median_us"]:
        doc["inside_over_before"] = round(doc["inside_median_us"] / doc["before_median_us"], 3)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--steps", type=int, default=80)
    r.add_argument("--no-sync", action="store_true")
    r.add_argument("--pin-main", type=int, metavar="CORE", help="pin the main thread to this core after CUDA starts")
    p = sub.add_parser("pure")
    p.add_argument("out", type=Path)
    p.add_argument("--calls", type=int, default=2000)
    s = sub.add_parser("summary")
    s.add_argument("out", type=Path)
    s.add_argument("run_dir", type=Path, nargs="?")
    a = ap.parse_args()
    if a.cmd == "run":
        run(a.out, a.steps, not a.no_sync, a.pin_main)
    elif a.cmd == "pure":
        pure(a.out, a.calls)
    else:
        print(json.dumps(summary(a.out, a.run_dir)))


if __name__ == "__main__":
    sys.exit(main())
