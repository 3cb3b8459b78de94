"""How fast the program's own Python runs inside a capture window, per collector.

    python bench/bench_host_python.py run OUT.jsonl [--steps N] [--no-sync]     # the program
    python bench/bench_host_python.py summary OUT.jsonl [RUN_DIR]               # the comparison

``run`` is a loop shaped like the item_sync culprit (fixtures/workloads/culprits.py): an MLP forward pass
on the GPU, ``loss.item()`` (the host waits for the GPU to drain), pure-Python bookkeeping, backward and
the optimizer step. The loop times its own bookkeeping with ``perf_counter_ns`` and appends one JSON line
per step: wall time, bookkeeping ns, step ns. ``--no-sync`` drops the ``.item()``, so the bookkeeping
runs while the GPU is busy with the queued forward pass.

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


def run(out: Path, steps: int, sync: bool) -> None:
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
                                "step_ns": time.perf_counter_ns() - t0}) + "\n")
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
    s = sub.add_parser("summary")
    s.add_argument("out", type=Path)
    s.add_argument("run_dir", type=Path, nargs="?")
    a = ap.parse_args()
    if a.cmd == "run":
        run(a.out, a.steps, not a.no_sync)
    else:
        print(json.dumps(summary(a.out, a.run_dir)))


if __name__ == "__main__":
    sys.exit(main())
