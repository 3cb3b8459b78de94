#!/usr/bin/env bash
# Records the observer-effect fixtures on a machine with an NVIDIA GPU, from the repo root:
#   bash scripts/record-observer.sh OUTDIR
# The same loop (fixtures/workloads/observer.py) under Nsight Systems and under torch.profiler with
# record_shapes; the torch trace carries the unprofiled step time (unprofiled_step_ms). Two sizes: a GPU-bound
# one where the profiler's per-op cost makes the GPU look idle, and a host-bound one where it does not.
set -uo pipefail
out=${1:?output directory}
mkdir -p "$out"
PY=${PYTHON:-python3}
[ -n "${NSYS:-}" ] || NSYS=$(command -v nsys || ls -d /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | tail -1)
W=fixtures/workloads/observer.py
for c in "observer_gpu:--d 2048 --tokens 512 --iters 200" "observer_host:--d 256 --tokens 64 --iters 400"; do
  name=${c%%:*}; args=${c#*:}
  $PY $W $args --time > "$out/$name.time.json"
  $PY $W $args --torch-trace "$out/$name.torch.json.gz" > "$out/$name.torch.log" 2>&1
  timeout 150 "$NSYS" profile -t cuda,nvtx --sample=none --cpuctxsw=none --backtrace=none -f true -o "$out/$name" \
    $PY $W $args --steps 20 > "$out/$name.nsys.log" 2>&1 \
    && "$NSYS" export --type sqlite -f true -o "$out/$name.nsys.sqlite" "$out/$name.nsys-rep" >> "$out/$name.nsys.log" 2>&1
  rm -f "$out/$name.nsys-rep"
done
ls -la "$out"
