#!/usr/bin/env bash
# Does the host's Python speed hold still when the program's thread stays on one core? On a machine with an
# NVIDIA GPU, from the repo root:   bash scripts/host-speed-steadiness.sh OUTDIR [CORE]
# The same bookkeeping call as bench/bench_host_python.py, timed per call / per step, each line with the core
# the thread ran on: without a GPU (`pure`), and in the GPU loop unpinned, with the whole process on CORE
# (taskset) and with only its main thread pinned to CORE (--pin-main). /proc/stat is sampled every 0.25 s
# alongside (steal time: the hypervisor running something else on the VM's cores). OUTDIR/steadiness.jsonl
# summarises each file: median, 10th / 90th percentile and the number of core changes.
set -uo pipefail
out=${1:?output directory}
PY=${PYTHON:-python3}
core=${2:-$(( $(nproc) - 2 ))}
B=bench/bench_host_python.py
mkdir -p "$out"
{ lscpu; echo; for c in 0 1 "$core"; do echo "cpu$c siblings: $(cat /sys/devices/system/cpu/cpu$c/topology/thread_siblings_list 2>&1)"; done
  ls /sys/devices/system/cpu/cpu0/cpufreq 2>&1; cat /proc/loadavg; ps -eo pcpu,comm --sort=-pcpu | head -8; } > "$out/host.txt"
( while :; do echo "$(date +%s%N) $(grep '^cpu' /proc/stat | tr '\n' '|')"; sleep 0.25; done ) > "$out/procstat.txt" &
sampler=$!
log() { echo "[$(date +%T)] $*"; }
log "pure unpinned"; $PY $B pure "$out/pure_unpinned.jsonl" --calls 1500
log "pure pinned"; taskset -c "$core" $PY $B pure "$out/pure_taskset.jsonl" --calls 1500
for rep in 1 2; do
  log "gpu unpinned $rep"; $PY $B run "$out/gpu_unpinned_$rep.jsonl" --steps 300
  log "gpu taskset $rep"; taskset -c "$core" $PY $B run "$out/gpu_taskset_$rep.jsonl" --steps 300
  log "gpu pin-main $rep"; $PY $B run "$out/gpu_pinmain_$rep.jsonl" --steps 300 --pin-main "$core"
done
kill "$sampler"
$PY - "$out" <<'PY' | tee "$out/steadiness.jsonl"
import json, statistics, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*_*.jsonl")):
    if f.name == "steadiness.jsonl":
        continue
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()][10:]
    ms = sorted(r["bookkeeping_ns"] / 1e6 for r in rows)
    q = statistics.quantiles(ms, n=10)
    cpus = [r.get("cpu") for r in rows]
    print(json.dumps({"file": f.name, "n": len(ms), "median_ms": round(statistics.median(ms), 3),
                      "p10_ms": round(q[0], 3), "p90_ms": round(q[-1], 3), "p90_over_p10": round(q[-1] / q[0], 3),
                      "core_changes": sum(a != b for a, b in zip(cpus, cpus[1:])), "cores": sorted(set(cpus))}))
PY
log done
