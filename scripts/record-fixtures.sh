#!/usr/bin/env bash
# Records the committed GPU fixtures. Run on a machine with an NVIDIA GPU, from the repository root:
#   bash scripts/record-fixtures.sh nsys  OUTDIR   # Nsight Systems exports of every case
#   bash scripts/record-fixtures.sh torch OUTDIR   # torch.profiler traces, Nsight Compute exports, ceilings
# nsys is found as gpudoctor finds it: $NSYS, PATH, standard folders, or the copy inside Nsight Compute.
set -uo pipefail
part=${1:?part: nsys|torch}
out=${2:?output directory}
mkdir -p "$out"
W=$(mktemp -d)
PY=${PYTHON:-python3}
CASES=fixtures/workloads/cases.py
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*"; }

if [ -z "${NSYS:-}" ]; then
  NSYS=$(command -v nsys || ls -d /opt/nvidia/nsight-systems/*/bin/nsys /opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys 2>/dev/null | tail -1)
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c 'import torch,sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
  echo "nsys: $("$NSYS" --version 2>&1)"
  echo "ncu: $(ncu --version 2>&1 | tail -1)"
} > "$W/env.txt" 2>&1
cat "$W/env.txt"

nsys_case() {  # name case steps [extra args]
  local name=$1 case=$2 steps=$3; shift 3
  log "nsys $name"
  "$NSYS" profile -t cuda,nvtx,cublas,cudnn --sample=none --cpuctxsw=none --backtrace=none \
      --cuda-memory-usage=true -f true -o "$W/$name" $PY $CASES "$case" --steps "$steps" "$@" > "$W/$name.log" 2>&1 \
    && "$NSYS" export --type sqlite -f true -o "$W/$name.nsys.sqlite" "$W/$name.nsys-rep" >> "$W/$name.log" 2>&1 \
    || { log "FAILED $name"; tail -5 "$W/$name.log"; }
}

if [ "$part" = nsys ]; then
  nsys_case attn_naive attn_naive 8 --truth "$W/attn_naive.truth.json"
  nsys_case attn_sdpa attn_sdpa 8 --truth "$W/attn_sdpa.truth.json"
  nsys_case mlp_fp32 mlp_fp32 6 --truth "$W/mlp_fp32.truth.json"
  nsys_case mlp_bf16 mlp_bf16 6 --truth "$W/mlp_bf16.truth.json"
  nsys_case decode decode 24 --truth "$W/decode.truth.json"
  nsys_case prefill prefill 6 --truth "$W/prefill.truth.json"
  nsys_case tiny_sync tiny_sync 8
  nsys_case tiny_fused tiny_fused 8
  nsys_case gate_base_a gate_base 30
  nsys_case gate_base_b gate_base 30
  nsys_case gate_slow gate_slow 30
  nsys_case gate_slow_few gate_slow 4
  nsys_case kv_static kv_static 3 --truth "$W/kv_static.truth.json" --snapshot "$W/kv_static.snapshot.pickle"
  nsys_case kv_paged kv_paged 3 --truth "$W/kv_paged.truth.json" --snapshot "$W/kv_paged.snapshot.pickle"
  ls -la "$W"
  (cd "$W" && tar czf "$out/nsys_train.tgz" attn_*.sqlite mlp_*.sqlite *.truth.json *.log env.txt)
  (cd "$W" && tar czf "$out/nsys_infer.tgz" decode*.sqlite prefill*.sqlite tiny_*.sqlite)
  (cd "$W" && tar czf "$out/nsys_gate.tgz" gate_*.sqlite)
  (cd "$W" && tar czf "$out/nsys_kv.tgz" kv_*)
else
  log ceilings
  $PY -m gpudoctor.collect.ceilings > "$W/ceilings_h100.json" 2> "$W/ceilings.log"; cat "$W/ceilings_h100.json"
  for c in attn_naive:8 attn_sdpa:8 mlp_fp32:6 mlp_bf16:6 decode:24 prefill:6 tiny_sync:8 tiny_fused:8; do
    log "torch ${c%%:*}"
    $PY $CASES "${c%%:*}" --steps "${c##*:}" --torch-trace "$W/${c%%:*}.torch.json.gz" > "$W/${c%%:*}.torch.log" 2>&1 \
      || { log "FAILED ${c%%:*}"; tail -5 "$W/${c%%:*}.torch.log"; }
  done
  log "ncu query-metrics"
  ncu --query-metrics --chip gh100 > "$W/ncu_query_metrics_gh100.txt" 2>&1
  want="gpu__time_duration.sum dram__bytes_read.sum dram__bytes_write.sum
    smsp__sass_thread_inst_executed_op_fadd_pred_on.sum smsp__sass_thread_inst_executed_op_fmul_pred_on.sum
    smsp__sass_thread_inst_executed_op_ffma_pred_on.sum smsp__sass_thread_inst_executed_op_dadd_pred_on.sum
    smsp__sass_thread_inst_executed_op_dmul_pred_on.sum smsp__sass_thread_inst_executed_op_dfma_pred_on.sum
    smsp__sass_thread_inst_executed_op_hadd_pred_on.sum smsp__sass_thread_inst_executed_op_hmul_pred_on.sum
    smsp__sass_thread_inst_executed_op_hfma_pred_on.sum
    sm__ops_path_tensor_src_bf16_dst_fp32.sum sm__ops_path_tensor_src_fp16_dst_fp32.sum sm__ops_path_tensor_src_fp16_dst_fp16.sum
    sm__ops_path_tensor_src_tf32_dst_fp32.sum sm__ops_path_tensor_src_fp8.sum sm__ops_path_tensor_src_int8.sum sm__ops_path_tensor_src_fp64.sum
    sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active
    sm__inst_executed_pipe_tensor_op_hmma.sum sm__inst_executed_pipe_tensor_op_gmma.sum
    sm__throughput.avg.pct_of_peak_sustained_elapsed gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed
    dram__throughput.avg.pct_of_peak_sustained_elapsed sm__warps_active.avg.pct_of_peak_sustained_active
    sm__cycles_elapsed.avg.per_second dram__cycles_elapsed.avg.per_second"
  have=""; missing=""
  for m in $want; do
    base=${m%%.*}
    if grep -q "^ *$base\b" "$W/ncu_query_metrics_gh100.txt"; then have="$have,$m"; else missing="$missing $m"; fi
  done
  echo "ncu metrics unavailable on gh100:$missing" | tee "$W/ncu_missing.txt"
  log "ncu raw"
  ncu --clock-control none --nvtx --nvtx-include "kernels/" --metrics "${have#,}" -f -o "$W/ncu_kernels" \
      $PY fixtures/workloads/ncu_kernels.py > "$W/ncu_run.log" 2>&1 || tail -5 "$W/ncu_run.log"
  ncu --import "$W/ncu_kernels.ncu-rep" --csv --page raw > "$W/ncu_kernels.raw.csv" 2>&1
  log "ncu details"
  ncu --clock-control none --nvtx --nvtx-include "kernels/" --section SpeedOfLight --section Occupancy \
      -f -o "$W/ncu_sol" $PY fixtures/workloads/ncu_kernels.py > "$W/ncu_sol.log" 2>&1 || tail -5 "$W/ncu_sol.log"
  ncu --import "$W/ncu_sol.ncu-rep" --csv --page details > "$W/ncu_kernels.details.csv" 2>&1
  ls -la "$W"
  gzip -9 "$W/ncu_query_metrics_gh100.txt"
  (cd "$W" && tar czf "$out/torch.tgz" *.torch.json.gz *.torch.log env.txt)
  (cd "$W" && tar czf "$out/ncu.tgz" ncu_* ceilings*)
fi
log done
