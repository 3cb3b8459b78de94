#!/usr/bin/env bash
# The program's own Python speed inside the capture window, per collector (bench/bench_host_python.py), and
# how much a bare process's launch timing varies. On a machine with an NVIDIA GPU, from the repo root:
#   bash scripts/bench-host-python.sh OUTDIR
# nsys is $NSYS or found as gpudoctor finds it; gpudoctor is imported from this checkout (PYTHONPATH).
set -uo pipefail
out=${1:?output directory}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
B=bench/bench_host_python.py
log() { echo "[$(date +%T)] $*"; }
bare() {  # name [--no-sync]
  log "bare $1"; $PY $B run "$out/$1.jsonl" "${@:2}" && $PY $B summary "$out/$1.jsonl" >> "$out/summary.jsonl"
}
prof() {  # name backend "program options" [gpudoctor options...]
  local name=$1 backend=$2 popts=$3; shift 3
  log "profile $name"
  timeout 200 $PY -m gpudoctor profile --backend "$backend" --no-nvml --no-gpu-metrics "$@" -o "$out/runs/$name" \
    -- $PY $B run "$out/$name.jsonl" $popts > "$out/$name.console.log" 2>&1 || log "FAILED $name"
  $PY $B summary "$out/$name.jsonl" "$out/runs/$name" >> "$out/summary.jsonl"
}
bare bare_sync
bare bare_nosync --no-sync
prof torch_sync torch ""
prof torch_sync_nostacks torch "" --no-stacks
prof nsys_sync nsys ""
prof nsys_sync_nostacks nsys "" --no-stacks
prof nsys_sync_nosample nsys "" "--nsys-args=--sample=none --cpuctxsw=none"
prof nsys_nosync nsys "--no-sync"
for i in 1 2 3; do  # a bare process's launch timing, five times in a row
  $PY -c 'import json, torch; from gpudoctor.collect.launch_timing import launch_ns; torch.zeros(1, device="cuda")
print(json.dumps({"launch_ns": [launch_ns(torch) for _ in range(5)]}))' >> "$out/launch_ns.jsonl"
done
log done
cat "$out/summary.jsonl" "$out/launch_ns.jsonl"
