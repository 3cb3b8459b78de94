"""What does profiling cost? Wall time of a small GPU workload bare and under each way of profiling it.

    python bench/bench_profile_overhead.py [--repeats 5] [--case attn_naive] [--steps 6] [--skip nsys,torch,...]

Run from the repository root on a machine with an NVIDIA GPU (on the lent machines: source
.gpu/nsys-env.sh first). Each configuration runs ``--repeats`` times, alternating configurations so that
drift hits all of them alike; the table shows the median, min and max wall time and the overhead of the
median over the bare program's:

    bare                 python fixtures/workloads/cases.py CASE --steps N
    nsys direct          nsys profile (gpudoctor's default options) ... ; the report only
    nsys direct+export   the same, then nsys export --type sqlite (what gpudoctor analyzes)
    gpudoctor nsys       gpudoctor profile --backend nsys --no-nvml (profile + export + analysis)
    gpudoctor torch      gpudoctor profile --backend torch --no-nvml (+ analysis)
    gpudoctor nvml       gpudoctor profile --backend nvml (the program + the NVML sampler + analysis)

For the gpudoctor rows, "program" is the time from starting the program to its end as the manifest
records it (the part a user waits for anyway), the rest is gpudoctor's post-processing. Last, the NVML
sampler alone: its thread's CPU time over 10 s of sampling, as a fraction of one core (target <= 1%).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(cmd: list[str], env: dict, log: Path) -> float:
    t = time.perf_counter()
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    dt = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}; see {log}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--case", default="attn_naive")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip", default="", help="comma-separated: nsys,torch,nvml,sampler")
    ap.add_argument("--keep", help="keep the run directories and logs here")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    py = sys.executable
    work = Path(args.keep or tempfile.mkdtemp(prefix="gpudoctor-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    program = [py, "fixtures/workloads/cases.py", args.case, "--steps", str(args.steps)]
    log = work / "bench.log"

    from gpudoctor.collect import nsys as nsys_mod
    from gpudoctor.collect.locate import find_nsys

    loc = find_nsys()
    configs: dict[str, callable] = {"bare": lambda i: (timed(program, env, log), None)}
    if loc and "nsys" not in skip:
        def nsys_direct(i, export=False):
            base = work / f"direct{i}"
            cmd = nsys_mod.profile_command(loc.path, base, program)
            t = timed(cmd, env, log)
            if export:
                t += timed(nsys_mod.export_command(loc.path, f"{base}.nsys-rep", f"{base}.sqlite"), env, log)
            return t, None
        configs["nsys direct"] = nsys_direct
        configs["nsys direct+export"] = lambda i: nsys_direct(i, export=True)
    elif "nsys" not in skip:
        print("nsys not found: its rows are skipped")

    def gd(backend: str, extra: list[str]):
        def run(i):
            out = work / f"gd-{backend}-{i}"
            cmd = [py, "-m", "gpudoctor", "profile", "--backend", backend, *extra, "-o", str(out), "--force", "--",
                   *program]
            t = timed(cmd, env, log)
            m = json.loads((out / "manifest.json").read_text())
            prog = (m["program_end_ns"] - m["program_start_ns"]) / 1e9 if m.get("program_end_ns") else None
            export = sum(f.get("export_seconds", 0.0) for f in m.get("files", []))
            return t, {"program": prog, "nvml_cpu": (m.get("nvml") or {}).get("cpu_fraction"),
                       "export": export, "analysis": (m.get("analysis") or {}).get("seconds")}
        return run

    if loc and "nsys" not in skip:
        configs["gpudoctor nsys"] = gd("nsys", ["--no-nvml"])
    if "torch" not in skip:
        configs["gpudoctor torch"] = gd("torch", ["--no-nvml"])
    if "nvml" not in skip:
        configs["gpudoctor nvml"] = gd("nvml", [])

    times: dict[str, list[float]] = {k: [] for k in configs}
    extra: dict[str, list[dict]] = {k: [] for k in configs}
    print(f"{args.case} --steps {args.steps}, {args.repeats} repeats; logs in {log}")
    configs["bare"](-1)  # warm caches (CUDA JIT, cuBLAS, file cache) before timing anything
    for i in range(args.repeats):
        for name, fn in configs.items():
            t, info = fn(i)
            times[name].append(t)
            if info:
                extra[name].append(info)
            print(f"  run {i + 1}/{args.repeats} {name:20s} {t:7.2f} s", flush=True)

    bare = statistics.median(times["bare"])
    print()
    print(f"{'configuration':22s} {'median s':>9s} {'min':>7s} {'max':>7s} {'overhead':>9s}  notes")
    for name, ts in times.items():
        med = statistics.median(ts)
        notes = ""
        if extra[name]:
            progs = [e["program"] for e in extra[name] if e.get("program")]
            if progs:
                p = statistics.median(progs)
                notes = f"program {p:.2f} s ({(p / bare - 1) * 100:+.1f}%), rest {med - p:.2f} s"
                parts = [(k, [e[k] for e in extra[name] if e.get(k)]) for k in ("export", "analysis")]
                notes += "".join(f", {k} {statistics.median(v):.2f} s" for k, v in parts if v)
                notes += " (rest: interpreter start and imports before the program, nsys export, analysis, output)"
            cpu = [e["nvml_cpu"] for e in extra[name] if e.get("nvml_cpu") is not None]
            if cpu:
                notes += f"; NVML sampler CPU {statistics.median(cpu) * 100:.2f}% of a core"
        over = "" if name == "bare" else f"{(med / bare - 1) * 100:+8.1f}%"
        print(f"{name:22s} {med:9.2f} {min(ts):7.2f} {max(ts):7.2f} {over:>9s}  {notes}")

    if "sampler" not in skip:
        from gpudoctor.collect.nvml import NvmlSampler

        s = NvmlSampler(work / "sampler.csv")
        if s.start():
            time.sleep(10)
            summ = s.stop()
            print(f"\nNVML sampler alone, 10 s at {summ['interval_s']} s: {summ['samples']} samples of "
                  f"{len(summ['devices'])} GPU(s), {len(summ['metrics'])} metrics; thread CPU {summ['cpu_s']:.3f} s "
                  f"= {summ['cpu_fraction'] * 100:.2f}% of one core (target <= 1%)")
        else:
            print(f"\nNVML sampler: {s.error}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
