#!/usr/bin/env bash
# Records the culprit loops (fixtures/workloads/culprits.py) the way a user profiles them, on a machine with
# an NVIDIA GPU, from the repo root:
#   bash scripts/record-pysamples.sh OUTDIR [PARTS]     # PARTS: any of profile,timings,nostacks (default all)
# 1. `gpudoctor profile --backend nsys|torch --stop-after-capture` of each case (the default window; Python
#    stack samples on, as by default): run directories OUTDIR/runs/{nsys,torch}_CASE.
# 2. What each culprit costs: every case timed with and without its culprit, unprofiled (twice each,
#    alternating): OUTDIR/timings.jsonl. Each line also holds `launch_ns`, the agent's launch timing taken in
#    that bare process, to check the unprofiled launch bound of launch-bound lines against the measured cost.
# 3. The in-window cost of the samples: the torch runs again with --no-stacks (OUTDIR/runs/torch_CASE_nostacks).
# nsys is $NSYS or found as gpudoctor finds it; gpudoctor is imported from this checkout (PYTHONPATH).
# Environment: CASES (default: the five below), STEPS (program steps when profiled, 60), WINDOW (extra
# gpudoctor profile options), TSTEPS / TWARMUP (steps and warm-up of the timed runs, 40 / 8). The recompile
# case compiles every step (seconds each):
#   CASES=recompile STEPS=12 WINDOW="--skip 2 --steps 6" TSTEPS=8 TWARMUP=2 bash scripts/record-pysamples.sh OUT
set -uo pipefail
out=${1:?output directory}
parts=${2:-profile,timings,nostacks}
mkdir -p "$out/runs"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
P=fixtures/workloads/culprits.py
CASES=${CASES:-"item_sync slow_preprocess dataloader0 tiny_kernels shape_change"}
STEPS=${STEPS:-60} TSTEPS=${TSTEPS:-40} TWARMUP=${TWARMUP:-8}
read -r -a WINDOW_OPTS <<< "${WINDOW:-}"
log() { echo "[$(date +%T)] $*"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  $PY -c 'import torch,sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
  echo "nsys: $("${NSYS:-nsys}" --version 2>&1)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
cp "$P" "$out/culprits.py"
prof() {  # name backend case [extra gpudoctor options]
  local name=$1 backend=$2 case=$3; shift 3
  log "profile $name"
  timeout 240 $PY -m gpudoctor profile --backend "$backend" --no-nvml --stop-after-capture "${WINDOW_OPTS[@]}" "$@" \
    -o "$out/runs/$name" -- $PY $P "$case" --steps "$STEPS" > "$out/runs/$name.console.log" 2>&1 || { log "FAILED $name"; tail -5 "$out/runs/$name.console.log"; }
}
[[ $parts == *profile* ]] && for c in $CASES; do
  prof "nsys_$c" nsys "$c" --no-gpu-metrics
  prof "torch_$c" torch "$c"
done
[[ $parts == *timings* ]] && for rep in 1 2; do
  for c in $CASES; do
    log "time $c $rep"
    timeout 150 $PY $P "$c" --steps "$TSTEPS" --warmup "$TWARMUP" >> "$out/timings.jsonl" 2>> "$out/timings.log"
    timeout 150 $PY $P "$c" --steps "$TSTEPS" --warmup "$TWARMUP" --fixed >> "$out/timings.jsonl" 2>> "$out/timings.log"
    # the fix (foreach) still launches kernels: the line's own cost is the loop without any EMA
    [[ $c == tiny_kernels ]] && timeout 90 $PY $P "$c" --steps "$TSTEPS" --warmup "$TWARMUP" --removed >> "$out/timings.jsonl" 2>> "$out/timings.log"
  done
done
[[ $parts == *nostacks* ]] && for c in $CASES; do
  prof "torch_${c}_nostacks" torch "$c" --no-stacks
done
log done
