#!/usr/bin/env bash
# Records the GPU-metrics and Python-stack fixtures on a machine with an NVIDIA GPU, from the repo root:
#   bash scripts/record-counters-stacks.sh counters OUTDIR  # nsys + GPU metrics: decode b1/b32, prefill,
#                                                           # ResNet-50 fp32 (TF32 off) / bf16; ncu kernels
#   bash scripts/record-counters-stacks.sh stacks OUTDIR    # the culprit loops: timings with and without the
#                                                           # culprit, torch.profiler with_stack, nsys backtraces
# nsys is $NSYS or found as gpudoctor finds it. GPU metrics need root (or the profiling permission).
set -uo pipefail
part=${1:?part: counters|stacks}
out=${2:?output directory}
mkdir -p "$out"
W=$(mktemp -d)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*"; }
[ -n "${NSYS:-}" ] || NSYS=$(command -v nsys || ls -d /opt/nvidia/nsight-systems/*/bin/nsys /opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys 2>/dev/null | tail -1)
GM="--gpu-metrics-devices=all --gpu-metrics-frequency=2000"
BASE="-t cuda,nvtx,cublas,cudnn --cuda-memory-usage=true --capture-range=cudaProfilerApi --capture-range-end=stop -f true"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  $PY -c 'import torch,sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
  $PY -c 'import timm, transformers; print("timm", timm.__version__, "transformers", transformers.__version__)'
  echo "nsys: $("$NSYS" --version 2>&1)"; echo "ncu: $(ncu --version 2>&1 | tail -1)"
} > "$W/env.txt" 2>&1
cat "$W/env.txt"

nsys_run() {  # name "nsys options" program args...
  local name=$1 opts=$2; shift 2
  log "nsys $name"
  timeout 150 "$NSYS" profile $BASE $opts -o "$W/$name" "$@" > "$W/$name.log" 2>&1 \
    && timeout 120 "$NSYS" export --type sqlite -f true -o "$W/$name.nsys.sqlite" "$W/$name.nsys-rep" >> "$W/$name.log" 2>&1 \
    || { log "FAILED $name"; tail -5 "$W/$name.log"; }
  rm -f "$W/$name.nsys-rep"
}

tables() {  # what an export holds: tables with row counts, and CUDA API rows that carry a call chain
  $PY - "$@" <<'PYEOF'
import sqlite3, sys
for path in sys.argv[1:]:
    try:
        c = sqlite3.connect(path)
        names = [r[0] for r in c.execute("select name from sqlite_master where type='table'")]
        counts = {n: c.execute(f'select count(*) from "{n}"').fetchone()[0] for n in names}
        api = "CUPTI_ACTIVITY_KIND_RUNTIME"
        cc = c.execute(f"select count(*) from {api} where callchainId is not null").fetchone()[0] if api in names else None
        print(path.rsplit('/', 1)[-1], "runtime rows with callchain:", cc)
        print("   ", ", ".join(f"{n}={counts[n]}" for n in sorted(names) if counts[n]))
    except Exception as e:
        print(path, "ERROR", e)
PYEOF
}

if [ "$part" = counters ]; then
  C=fixtures/workloads/cases.py
  nsys_run decode_b1_gm "$GM --sample=none --cpuctxsw=none --backtrace=none" $PY $C decode --steps 40 --capture-after 8 --truth "$W/decode_b1_gm.truth.json"
  nsys_run decode_b32_gm "$GM --sample=none --cpuctxsw=none --backtrace=none" $PY $C decode --batch 32 --steps 40 --capture-after 8 --truth "$W/decode_b32_gm.truth.json"
  nsys_run prefill_gm "$GM --sample=none --cpuctxsw=none --backtrace=none" $PY $C prefill --steps 10 --capture-after 3 --truth "$W/prefill_gm.truth.json"
  nsys_run conv_fp32_gm "$GM --sample=none --cpuctxsw=none --backtrace=none" $PY $C conv_fp32 --steps 14 --capture-after 8 --truth "$W/conv_fp32_gm.truth.json"
  nsys_run conv_bf16_gm "$GM --sample=none --cpuctxsw=none --backtrace=none" $PY $C conv_bf16 --steps 14 --capture-after 8 --truth "$W/conv_bf16_gm.truth.json"
  for c in "decode_b32:decode --batch 32 --steps 24" "conv_fp32:conv_fp32 --steps 10" "conv_bf16:conv_bf16 --steps 10"; do
    log "torch ${c%%:*}"
    $PY $C ${c#*:} --torch-trace "$W/${c%%:*}.torch.json.gz" > "$W/${c%%:*}.torch.log" 2>&1 || tail -5 "$W/${c%%:*}.torch.log"
  done
  log "ncu"
  ncu --clock-control none --nvtx --nvtx-include "kernels/" --section SpeedOfLight --section SpeedOfLight_RooflineChart \
      --section Occupancy --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_hmma.sum,sm__inst_executed_pipe_tensor_op_gmma.sum,dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
      -f -o "$W/ncu_h200" $PY fixtures/workloads/ncu_kernels.py --more > "$W/ncu_h200.log" 2>&1 || tail -5 "$W/ncu_h200.log"
  ncu --import "$W/ncu_h200.ncu-rep" --csv --page raw > "$W/ncu_h200.raw.csv" 2>&1
  ncu --import "$W/ncu_h200.ncu-rep" --csv --page details > "$W/ncu_h200.details.csv" 2>&1
  rm -f "$W/ncu_h200.ncu-rep"
  tables "$W"/*.nsys.sqlite
  ls -la "$W"
  (cd "$W" && tar cJf "$out/counters_nsys.tar.xz" *_gm.nsys.sqlite *.truth.json *_gm.log env.txt)
  (cd "$W" && tar cJf "$out/counters_torch_ncu.tar.xz" *.torch.json.gz *.torch.log ncu_h200*)
else
  P=fixtures/workloads/culprits.py
  for c in item_sync slow_preprocess dataloader0 tiny_kernels shape_change; do
    for rep in 1 2; do
      log "time $c (culprit, fixed) $rep"
      $PY $P $c --steps 40 >> "$W/timings.jsonl" 2>> "$W/timings.log"
      $PY $P $c --steps 40 --fixed >> "$W/timings.jsonl" 2>> "$W/timings.log"
    done
  done
  cat "$W/timings.jsonl"
  for c in item_sync slow_preprocess dataloader0 tiny_kernels shape_change; do
    log "torch $c"
    $PY $P $c --steps 24 --torch-trace "$W/$c.torch.json.gz" > "$W/$c.torch.log" 2>&1 || tail -5 "$W/$c.torch.log"
  done
  # Which nsys options give Python call stacks in the export (inside a capture window only)
  nsys_run item_sync_pybt "--python-backtrace=cuda --sample=process-tree --cpuctxsw=process-tree" $PY $P item_sync --steps 24 --capture-after 8
  nsys_run item_sync_pysamp "--python-sampling=true --python-sampling-frequency=1000 --sample=process-tree --cpuctxsw=process-tree" $PY $P item_sync --steps 24 --capture-after 8
  for c in item_sync slow_preprocess dataloader0 tiny_kernels shape_change; do
    nsys_run ${c}_stacks "--python-backtrace=cuda --cudabacktrace=sync,kernel,memory --python-sampling=true --python-sampling-frequency=1000 --sample=process-tree --cpuctxsw=process-tree" $PY $P $c --steps 24 --capture-after 8
  done
  tables "$W"/*.nsys.sqlite
  ls -la "$W"
  (cd "$W" && tar cJf "$out/stacks_torch.tar.xz" *.torch.json.gz *.torch.log timings.* env.txt)
  (cd "$W" && tar cJf "$out/stacks_nsys.tar.xz" *.nsys.sqlite *.log)
fi
log done
