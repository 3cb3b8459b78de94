"""What one kernel launch costs the program's host: the agent times it inside the program just before the
window opens, and, under nsys, a bare process of the program's own interpreter times it before nsys starts.

nsys's CUDA injection slows every launch of the process it runs, whether it is collecting or not (11.9 us
against a median of 6.7 us in bare processes on an H200, fixtures/pysamples), so under nsys only the bare
process gives the unprofiled cost that bounds what a launch-bound line costs (analyzers/source_lines.py).

    python -m gpudoctor.collect.launch_timing      # one JSON line: {"launch_ns": ..., "batches_ns": [...]}
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

LAUNCHES = 200  # per batch: 1-2 ms of launches
BATCHES = 5  # the median batch: one batch hit by an interrupt or a page fault does not move it


def launch_ns(torch, batches: int = BATCHES) -> tuple[int, list[int]] | None:
    """(median, per batch) host ns per launch of a one-element in-place add, the queue drained first; None
    before the program has initialized CUDA (the agent never initializes it for the program)."""
    if not torch.cuda.is_initialized():
        return None
    buf = torch.zeros(1, device="cuda")
    for _ in range(20):
        buf.add_(1)
    torch.cuda.synchronize()
    per_batch = []
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        for _ in range(LAUNCHES):
            buf.add_(1)
        per_batch.append((time.perf_counter_ns() - t0) // LAUNCHES)
        torch.cuda.synchronize()
    return int(statistics.median(per_batch)), per_batch


def time_in_bare_process(exe: str, env: dict, timeout_s: float = 60.0) -> dict:
    """Run this module with the program's interpreter and environment (no profiler loaded): {"launch_ns",
    "batches_ns", "seconds"} or {"error"}. It imports torch and creates a CUDA context: a few seconds."""
    t0 = time.monotonic()
    try:
        p = subprocess.run([exe, "-m", __name__], capture_output=True, text=True, timeout=timeout_s, env=env,
                           stdin=subprocess.DEVNULL)
        doc = json.loads(p.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"error": f"the bare launch timing took over {timeout_s:.0f} s"}
    except (OSError, ValueError, IndexError):
        return {"error": "the bare launch timing printed no result"}
    if not isinstance(doc, dict) or not isinstance(doc.get("launch_ns"), int):
        return {"error": str(doc.get("error") if isinstance(doc, dict) else doc)[:200] or "no result"}
    return {"launch_ns": doc["launch_ns"], "batches_ns": doc.get("batches_ns"),
            "seconds": round(time.monotonic() - t0, 2)}


def main() -> None:
    try:
        import torch

        if not torch.cuda.is_available():
            print(json.dumps({"error": "torch sees no CUDA device"}))
            return
        torch.zeros(1, device="cuda")
        median, batches = launch_ns(torch)
        print(json.dumps({"launch_ns": median, "batches_ns": batches, "pid": os.getpid()}))
    except Exception as e:  # one line for the parent, never a traceback
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))


if __name__ == "__main__":
    main()
