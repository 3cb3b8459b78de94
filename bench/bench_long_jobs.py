"""Long jobs under `gpudoctor profile`: time to findings, report and export sizes, analysis time, peak host
memory and the program's slowdown outside the capture window, for a 6-minute and a 2-minute run of the
same real training job (bench/workloads/long_train.py, a Hugging Face Llama trained with AdamW), with the
nsys and the torch backend; and a short whole-program run whose findings the windowed ones should agree
with. Runs on a machine with an NVIDIA GPU (one command of at most 10 minutes):

    python3 bench/bench_long_jobs.py OUTDIR [--long 360] [--short 120]

The unprofiled reference runs beside the profiled ones, started at the same moment, so every run sees the
same GPU sharing: the slowdown is the ratio of median step times in the same wall-clock intervals outside
the window (from the steps' own end times). Peak host memory is the largest resident set of each run's
whole process tree (gpudoctor, nsys and the program), sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "workloads" / "long_train.py"  # --workload replaces it (any script taking --seconds, --log)


def start(name: str, argv: list[str], out: Path) -> dict:
    log = open(out / f"{name}.console.log", "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    return {"name": name, "proc": p, "t0": time.time(), "peak_rss": 0, "argv": argv}


def tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants, from /proc (no dependency beyond Linux)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/statm") as f:
                rss[int(d)] = int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        parents[int(d)] = int(fields[1])
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(c for c, pp in parents.items() if pp == p)
    return total


def monitor(runs: list[dict], out: Path) -> None:
    while any(r["proc"].poll() is None for r in runs):
        for r in runs:
            if r["proc"].poll() is None:
                r["peak_rss"] = max(r["peak_rss"], tree_rss(r["proc"].pid))
            elif "wall_s" not in r:
                r["wall_s"] = round(time.time() - r["t0"], 1)
        time.sleep(0.5)
    for r in runs:
        r["rc"] = r["proc"].returncode
        r.setdefault("wall_s", round(time.time() - r["t0"], 1))


def profiled(name: str, backend: str, seconds: float, out: Path, *extra: str) -> tuple[str, list[str]]:
    return name, [sys.executable, "-m", "gpudoctor", "profile", "--backend", backend, *extra, "-o", str(out / name),
                  "--", sys.executable, str(WORK), "--seconds", str(seconds), "--log", str(out / f"{name}.steps.jsonl")]


def bare(name: str, seconds: float, out: Path) -> tuple[str, list[str]]:
    return name, [sys.executable, str(WORK), "--seconds", str(seconds), "--log", str(out / f"{name}.steps.jsonl")]


def cpu_main(out: Path, long_s: float, short_s: float) -> list[dict]:
    """No GPU: the torch backend, one run at a time (windowed long and short, whole short, bare)."""
    rows = []
    for name, argv, ref in [bare("bare_short", short_s, out) + (None,),
                            profiled("torch_short", "torch", short_s, out, "--no-nvml") + ("bare_short",),
                            profiled("torch_long", "torch", long_s, out, "--no-nvml") + (None,),
                            profiled("torch_whole_short", "torch", short_s, out, "--no-nvml", "--whole") + (None,)]:
        r = start(name, argv, out)
        monitor([r], out)
        rows.append(summarize(r, out, ref))
    return rows


def steps(path: Path) -> list[tuple[int, int]]:
    try:
        return [(d["step"], d["t_ns"]) for d in map(json.loads, path.read_text().splitlines())]
    except (OSError, ValueError):
        return []


def median_step_ms(rows: list[tuple[int, int]], lo_ns: int, hi_ns: int) -> float | None:
    """Median duration of the steps that end inside [lo, hi] (10-step blocks: loss.item() every 10)."""
    inside = [t for _, t in rows if lo_ns <= t <= hi_ns]
    blocks = [(inside[i + 10] - inside[i]) / 10 for i in range(0, len(inside) - 10, 10)]
    return round(statistics.median(blocks) / 1e6, 3) if blocks else None


def sizes(run_dir: Path) -> dict:
    out = {}
    for p in (run_dir / "raw").glob("*"):
        if p.suffix in (".nsys-rep", ".sqlite", ".gz"):
            out[p.name] = p.stat().st_size
    return out


def summarize(r: dict, out: Path, reference: str | None, window_of: str | None = None) -> dict:
    """One run's figures; with ``reference``, its step times against that run's outside the capture window
    (of this run, or of run ``window_of`` for an unprofiled run)."""
    run_dir = out / r["name"]
    row = {k: r.get(k) for k in ("name", "rc", "wall_s")}
    row["peak_rss_mb"] = round(r["peak_rss"] / 2**20)
    m = {}
    if (run_dir / "manifest.json").exists():
        m = json.loads((run_dir / "manifest.json").read_text())
        cap = m.get("capture") or {}
        row["capture"] = {k: cap.get(k) for k in ("step_source", "skipped_steps", "steps_recorded", "median_step_ms",
                                                   "unprofiled_step_ms", "profiled_step_ms", "started", "stopped")}
        row["analysis_s"] = (m.get("analysis") or {}).get("seconds")
        row["sizes_bytes"] = sizes(run_dir)
        row["export_s"] = (m.get("backend_details") or {}).get("export_seconds_while_running") or next(
            (f.get("export_seconds") for f in m.get("files", []) if f.get("export_seconds")), None)
        row["outcome"] = m.get("outcome")
        done_utc = (m.get("analysis") or {}).get("done_utc")
        if done_utc and m.get("start_ns"):  # when analysis.json was written, from gpudoctor's own start
            done_ns = datetime.fromisoformat(done_utc.replace("Z", "+00:00")).timestamp() * 1e9
            row["findings_s"] = round((done_ns - m["start_ns"]) / 1e9, 1)
            row["findings_while_program_ran"] = bool((m.get("analysis") or {}).get("while_program_ran"))
        if cap.get("start_ns"):
            row["window_opened_s"] = round((cap["start_ns"] - m["program_start_ns"]) / 1e9, 1)
    if (run_dir / "analysis.json").exists():
        a = json.loads((run_dir / "analysis.json").read_text())
        row["findings"] = sorted(f"{f.get('analyzer')}:{f.get('severity')}" for f in a.get("findings", []))
    if window_of and (out / window_of / "manifest.json").exists():
        wm = json.loads((out / window_of / "manifest.json").read_text())
        m = dict(m, capture=wm.get("capture") or {}, analysis=wm.get("analysis"))
        row["window_of"] = window_of
    if reference and m.get("capture", {}).get("start_ns"):
        cap = m["capture"]
        mine, ref = steps(out / f"{r['name']}.steps.jsonl"), steps(out / f"{reference}.steps.jsonl")
        if mine and ref:
            lo_all = max(mine[0][1], ref[0][1]) + int(30e9)  # past every run's warm-up
            hi_all = min(mine[-1][1], ref[-1][1]) - int(2e9)
            after = (cap.get("closed_ns") or cap["end_ns"]) + int((((m.get("analysis") or {}).get("seconds") or 0) + 5) * 1e9)
            intervals = {"before_window": (lo_all, cap["start_ns"] - int(1e9)), "after_window": (after, hi_all)}
            row["slowdown_outside_window"] = {}
            for key, (lo, hi) in intervals.items():
                a_ms, b_ms = median_step_ms(mine, lo, hi), median_step_ms(ref, lo, hi)
                if a_ms and b_ms:
                    row["slowdown_outside_window"][key] = {"profiled_ms": a_ms, "bare_ms": b_ms,
                                                            "ratio": round(a_ms / b_ms, 4),
                                                            "seconds": round((hi - lo) / 1e9)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--long", type=float, default=360.0)
    ap.add_argument("--short", type=float, default=120.0)
    ap.add_argument("--check", type=float, default=40.0, help="seconds of the windowed-vs-whole check runs")
    ap.add_argument("--workload", type=Path, help="another program taking --seconds and --log")
    ap.add_argument("--cpu", action="store_true", help="no GPU here: the torch backend alone, runs one at a time")
    ap.add_argument("--resummarize", action="store_true",
                    help="recompute OUT/long_jobs.json from the run directories and step logs already in OUT")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    global WORK
    WORK = args.workload.resolve() if args.workload else WORK
    if args.resummarize:
        doc = json.loads((out / "long_jobs.json").read_text())
        refs = {"bare_long_b": "bare_long", "nsys_long": "bare_long", "torch_long": "bare_long",
                "nsys_short": "bare_short", "torch_short": "bare_short", "torch_whole_short": None}
        doc["runs"] = [summarize({"name": r["name"], "rc": r["rc"], "wall_s": r["wall_s"],
                                  "peak_rss": r["peak_rss_mb"] * 2**20}, out, refs.get(r["name"]),
                                 "nsys_long" if r["name"] == "bare_long_b" else None) for r in doc["runs"]]
        (out / "long_jobs.json").write_text(json.dumps(doc, indent=1))
        return
    if args.cpu:
        rows = cpu_main(out, args.long, args.short)
        doc = {"machine": f"CPU only, {os.cpu_count()} cores", "long_s": args.long, "short_s": args.short, "runs": rows}
        (out / "long_jobs.json").write_text(json.dumps(doc, indent=1))
        for row in rows:
            print(json.dumps(row))
        return
    # bare_long_b is a second unprofiled run: its ratio to bare_long is the noise floor of the slowdown
    # figures (seven processes share one GPU).
    first = [bare("bare_long", args.long, out), bare("bare_long_b", args.long, out),
             profiled("nsys_long", "nsys", args.long, out, "--no-gpu-metrics"),
             profiled("torch_long", "torch", args.long, out),
             bare("bare_short", args.short, out), profiled("nsys_short", "nsys", args.short, out, "--no-gpu-metrics"),
             profiled("torch_short", "torch", args.short, out)]
    runs = [start(n, argv, out) for n, argv in first]
    long_runs, short_runs = runs[:4], runs[4:]
    monitor(short_runs, out)  # the long runs go on meanwhile
    # Then, one after the other beside the long runs: a windowed nsys run with GPU metrics, and the same
    # program recorded whole, for the agreement of the findings.
    check = [start(*profiled("nsys_window_gm", "nsys", args.check, out), out)]
    monitor(check, out)
    check.append(start(*profiled("nsys_whole_gm", "nsys", args.check, out, "--whole"), out))
    monitor(check[1:], out)
    monitor(long_runs, out)
    rows = []
    for r in runs + check:
        ref = {"bare_long_b": "bare_long", "nsys_long": "bare_long", "torch_long": "bare_long", "nsys_short": "bare_short",
               "torch_short": "bare_short"}.get(r["name"])
        rows.append(summarize(r, out, ref, "nsys_long" if r["name"] == "bare_long_b" else None))
    doc = {"machine": subprocess.run(["nvidia-smi" if shutil.which("nvidia-smi") else "true", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip(),
           "cpus": os.cpu_count(), "long_s": args.long, "short_s": args.short, "runs": rows}
    (out / "long_jobs.json").write_text(json.dumps(doc, indent=1))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
