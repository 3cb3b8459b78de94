#!/usr/bin/env bash
# Records the gate's GPU-conditions fixtures: N runs of the same program (fixtures/workloads/cases.py
# gate_base) with `gpudoctor profile --backend nsys`, then one more run while a second process loads the
# same GPU with a matmul loop. Clocks and GPU settings are never changed. Run on a machine with an NVIDIA GPU,
# from the repository root (on the project's GPU machines: `source .gpu/nsys-env.sh` first):
#
#   bash scripts/record-gate.sh OUTDIR [N=5] [STEPS=30]
#
# Each run directory is trimmed to what the gate needs: manifest.json (with gpu_state), analysis.json (with
# the gate block) and raw/nvml.csv.gz; the nsys report, its export and run.db are dropped. The result is
# OUTDIR/gate_runs.tgz, to unpack into fixtures/gate_runs/ (base_1 .. base_N, loaded).
set -uo pipefail
out=${1:?output directory}
n=${2:-5}
steps=${3:-30}
mkdir -p "$out"
out=$(cd "$out" && pwd)
W=$(mktemp -d)
PY=${PYTHON:-python3}
CASE="fixtures/workloads/cases.py gate_base --steps $steps"
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*"; }

profile() {  # name
  log "profile $1"
  $PY -m gpudoctor profile --backend nsys -o "$W/$1" -- $PY $CASE > "$W/$1.log" 2>&1 \
    || { log "FAILED $1"; tail -20 "$W/$1.log"; }
}

trim() {  # name: keep manifest.json, analysis.json, the NVML samples (gzipped), the log
  local d="$W/$1"
  [ -d "$d" ] || return
  mkdir -p "$W/keep/$1/raw"
  cp "$d/manifest.json" "$d/analysis.json" "$W/keep/$1/" 2>/dev/null
  [ -f "$d/raw/nvml.csv" ] && gzip -c "$d/raw/nvml.csv" > "$W/keep/$1/raw/nvml.csv.gz"
  cp "$W/$1.log" "$W/keep/$1/profile.log"
}

nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.max.sm,temperature.gpu --format=csv \
  > "$W/env.txt" 2>&1
cat "$W/env.txt"

for i in $(seq 1 "$n"); do
  profile "base_$i"
done

# The loaded candidate: a matmul loop in another process on the same GPU for as long as the run lasts.
log "background load"
$PY - > "$W/load.log" 2>&1 <<'EOF' &
import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
while True:
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
EOF
load_pid=$!
sleep 10  # let the loader start (CUDA context, first kernels)
profile loaded
kill "$load_pid" 2>/dev/null
wait "$load_pid" 2>/dev/null

for i in $(seq 1 "$n"); do trim "base_$i"; done
trim loaded
cp "$W/env.txt" "$W/keep/"
(cd "$W/keep" && tar czf "$out/gate_runs.tgz" .)
du -sh "$W/keep" "$out/gate_runs.tgz"
log "wrote $out/gate_runs.tgz (unpack into fixtures/gate_runs/)"
