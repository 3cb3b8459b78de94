#!/usr/bin/env bash
# Records the culprit loops (fixtures/workloads/culprits.py) the way a user profiles them, on a machine with
# an NVIDIA GPU, from the repo root:
#   bash scripts/record-pysamples.sh OUTDIR [PARTS]     # PARTS: any of profile,timings,interleaved,nostacks
#                                                        # (default all)
# 1. `gpudoctor profile --backend nsys|torch --stop-after-capture` of each case (the default window; Python
#    stack samples on, as by default): run directories OUTDIR/runs/{nsys,torch}_CASE, and beside each
#    OUTDIR/runs/{nsys,torch}_CASE.host.jsonl, the program's own timing of its bookkeeping / tokenize calls.
#    With COST_AFTER=N the program is not stopped after the window: it runs on and times the loop with and
#    without its culprit in the same process (N steps, blocks of 10): OUTDIR/runs/{nsys,torch}_CASE.cost.json.
# 2. What each culprit costs: every case timed with and without its culprit, unprofiled (twice each,
#    alternating): OUTDIR/timings.jsonl. Each line also holds `launch_ns`, the agent's launch timing taken in
#    that bare process, to check the unprofiled launch bound of launch-bound lines against the measured cost.
# 2b. The same cost measured inside one process, the two loops alternating in blocks of 10 steps (twice per
#    case): lines with "interleaved": true in OUTDIR/timings.jsonl. The host's Python speed on a VM can change
#    between processes (bench/gpu/host-python), so this one is the steadier.
# 3. The in-window cost of the samples: the torch runs again with --no-stacks (OUTDIR/runs/torch_CASE_nostacks).
# nsys is $NSYS or found as gpudoctor finds it; gpudoctor is imported from this checkout (PYTHONPATH).
# With ALTERNATE=K the program runs its loop with and without the culprit in blocks of K steps (culprits.py
#    --alternate): a window over them holds the culprit's cost at the host speed of the sampled steps; e.g.
#    ALTERNATE=4 WINDOW="--skip 11 --steps 25" starts the window on the last step of a block with the culprit
#    (the first step of a window is its warm-up), then three blocks without and three with it.
# Environment: COST_AFTER (above), ALTERNATE (above), BACKENDS (default "nsys torch"), PIN_MAIN (pin the profiled program's main thread to this core), CASES (default: the five below), STEPS (program steps when profiled, 60), WINDOW (extra
# gpudoctor profile options), TSTEPS / TWARMUP (steps and warm-up of the timed runs, 40 / 8). The recompile
# case compiles every step (seconds each):
#   CASES=recompile STEPS=12 WINDOW="--skip 2 --steps 6" TSTEPS=8 TWARMUP=2 bash scripts/record-pysamples.sh OUT
set -uo pipefail
out=${1:?output directory}
parts=${2:-profile,timings,interleaved,nostacks}
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
  # COST_AFTER=N: the program runs on after the window and times its culprit in the same process (N steps)
  local stop=(--stop-after-capture) cost=()
  [[ -n ${COST_AFTER:-} ]] && stop=() && cost=(--interleave-after "$COST_AFTER" --cost-log "$out/runs/$name.cost.json")
  [[ -n ${PIN_MAIN:-} ]] && cost+=(--pin-main "$PIN_MAIN")
  [[ -n ${ALTERNATE:-} ]] && cost+=(--alternate "$ALTERNATE")
  timeout 240 $PY -m gpudoctor profile --backend "$backend" --no-nvml "${stop[@]}" "${WINDOW_OPTS[@]}" "$@" \
    -o "$out/runs/$name" -- $PY $P "$case" --steps "$STEPS" --host-log "$out/runs/$name.host.jsonl" \
    "${cost[@]}" > "$out/runs/$name.console.log" 2>&1 || { log "FAILED $name"; tail -5 "$out/runs/$name.console.log"; }
}
[[ $parts == *profile* ]] && for c in $CASES; do
  [[ ${BACKENDS:-nsys torch} == *nsys* ]] && prof "nsys_$c" nsys "$c" --no-gpu-metrics
  [[ ${BACKENDS:-nsys torch} == *torch* ]] && prof "torch_$c" torch "$c"
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
[[ $parts == *interleaved* ]] && for rep in 1 2; do
  for c in $CASES; do
    log "interleaved $c $rep"
    more=(); [[ $c == tiny_kernels ]] && more=(--removed)
    timeout 200 $PY $P "$c" --interleave 10 --steps 80 --warmup 8 "${more[@]}" >> "$out/timings.jsonl" 2>> "$out/timings.log"
  done
done
[[ $parts == *nostacks* ]] && for c in $CASES; do
  prof "torch_${c}_nostacks" torch "$c" --no-stacks
done
log done
