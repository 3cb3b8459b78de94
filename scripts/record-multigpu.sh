#!/usr/bin/env bash
# Records the multi-GPU fixtures (fixtures/multigpu/) on one host with 2 NVIDIA GPUs, from the repository root:
#
#   source .gpu/nsys-env.sh            # where nsys needs it (see ../shared/gpu/README.md); optional
#   bash scripts/record-multigpu.sh OUTDIR [PARTS]
#
# PARTS: comma-separated subset of nsys,torch,bench (default all three; about 5 minutes on 2 H200s), to
# re-record one part within a time limit.
# Workloads: fixtures/workloads/multi_gpu.py (ddp_comm ddp_compute pp_1mb pp_4mb allreduce_loop), 2 ranks
# under torchrun. For each case: one Nsight Systems report per rank (nsys profile under torchrun, exported to
# SQLite), and one torch.profiler trace per rank. Then 'gpudoctor nccl-bench --nproc 2 --max-bytes 1G' and
# a plain dist.all_reduce loop at 1 GiB. Writes at most 6 archives to OUTDIR (each checked < 16 MB):
#
#   multigpu_nsys_ddp.tgz   ddp_comm_rank{0,1}.nsys.sqlite ddp_compute_rank{0,1}.nsys.sqlite
#   multigpu_nsys_pp.tgz    pp_1mb_rank{0,1}.nsys.sqlite pp_4mb_rank{0,1}.nsys.sqlite
#   multigpu_torch.tgz      {ddp_comm,ddp_compute,pp_1mb,pp_4mb}_rank{0,1}.torch.json.gz
#   multigpu_nccl.tgz       nccl_bench.log nccl_bench.json allreduce_loop.json *.truth.json env.txt
#                           summary.txt (what gpudoctor's analyzers say about the recordings) logs/
#
# Unpack into the fixtures:  mkdir -p fixtures/multigpu && for f in OUTDIR/multigpu_*.tgz; do tar xzf "$f" -C fixtures/multigpu; done
#
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1).
# gpudoctor runs from this checkout (PYTHONPATH=.); nccl-bench needs only numpy, pandas and torch there.
set -uo pipefail
out=${1:?usage: bash scripts/record-multigpu.sh OUTDIR [nsys,torch,bench]}
parts=",${2:-nsys,torch,bench},"
want() { [[ $parts == *",$1,"* ]]; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
W=$(mktemp -d)
mkdir -p "$W/logs"
PY=${PYTHON:-python3}
MG=fixtures/workloads/multi_gpu.py
NPROC=2
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=$NPROC)
log() { echo "[$(date +%T)] $*"; }
fail=0

if [ ! -f "$MG" ]; then echo "run from the repository root (no $MG here)"; exit 2; fi
if [ -z "${NSYS:-}" ]; then
  NSYS=$(command -v nsys || ls -d /opt/nvidia/nsight-systems/*/bin/nsys /opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys 2>/dev/null | tail -1)
fi

{
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,pci.bus_id --format=csv
  nvidia-smi topo -m
  nvidia-smi nvlink -s -i 0 2>&1 | head -30
  $PY -c 'import torch,sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "nccl", ".".join(map(str, torch.cuda.nccl.version())), "gpus", torch.cuda.device_count())'
  echo "nsys: $("${NSYS:-nsys}" --version 2>&1 | tail -1)"
  env | grep -E '^(NCCL_|TORCH_SYMM|NVSHMEM)' | sort
} > "$W/env.txt" 2>&1
cat "$W/env.txt"

# ---------------------------------------------------------------- Nsight Systems, one report per rank
nsys_case() {  # case steps
  local c=$1 steps=$2
  log "nsys $c"
  "${TORCHRUN[@]}" --no-python "$NSYS" profile -t cuda,nvtx --sample=none --cpuctxsw=none --backtrace=none \
      -f true -o "$W/${c}_rank%q{RANK}" "$PY" "$MG" "$c" --steps "$steps" --truth "$W/$c.truth.json" \
      > "$W/logs/$c.nsys.log" 2>&1 || { log "FAILED nsys $c"; tail -20 "$W/logs/$c.nsys.log"; fail=1; }
  for r in $(seq 0 $((NPROC - 1))); do
    if [ -f "$W/${c}_rank$r.nsys-rep" ]; then
      "$NSYS" export --type sqlite -f true -o "$W/${c}_rank$r.nsys.sqlite" "$W/${c}_rank$r.nsys-rep" \
          >> "$W/logs/$c.nsys.log" 2>&1 || { log "FAILED export $c rank $r"; tail -5 "$W/logs/$c.nsys.log"; fail=1; }
    else
      log "MISSING $W/${c}_rank$r.nsys-rep"; fail=1
    fi
  done
}
if ! want nsys; then
  log "nsys part not asked for"
elif [ -n "$NSYS" ] && "$NSYS" --version > /dev/null 2>&1; then
  nsys_case ddp_comm 8
  nsys_case ddp_compute 8
  nsys_case pp_1mb 6
  nsys_case pp_4mb 6
else
  log "SKIPPED nsys: no working Nsight Systems (source .gpu/nsys-env.sh first)"; fail=1
fi

# ---------------------------------------------------------------- torch.profiler, one trace per rank
for c in ddp_comm ddp_compute pp_1mb pp_4mb; do
  want torch || break
  log "torch $c"
  "${TORCHRUN[@]}" "$MG" "$c" --steps 5 --torch-trace "$W/${c}_rank{rank}.torch.json.gz" \
      > "$W/logs/$c.torch.log" 2>&1 || { log "FAILED torch $c"; tail -20 "$W/logs/$c.torch.log"; fail=1; }
done

# ---------------------------------------------------------------- NCCL bandwidth
if want bench; then
log "nccl-bench"
# BENCH_EXTRA: more nccl-bench options (the CPU smoke test of this script uses '--backend gloo --max-bytes 64K')
"$PY" -m gpudoctor nccl-bench --nproc $NPROC --max-bytes 1G --json "$W/nccl_bench.json" ${BENCH_EXTRA:-} \
    > "$W/nccl_bench.log" 2> "$W/logs/nccl_bench.err"
rc=$?
[ $rc -eq 0 ] || { log "nccl-bench exit $rc"; tail -20 "$W/logs/nccl_bench.err"; fail=1; }
grep -E '^# (gpudoctor|Avg bus)' "$W/nccl_bench.log"
log "allreduce_loop 1 GiB"
"${TORCHRUN[@]}" "$MG" allreduce_loop --bytes $((1 << 30)) --out "$W/allreduce_loop.json" \
    > "$W/logs/allreduce_loop.log" 2>&1 || { log "FAILED allreduce_loop"; tail -20 "$W/logs/allreduce_loop.log"; fail=1; }
cat "$W/allreduce_loop.json" 2>/dev/null; echo
fi

# ---------------------------------------------------------------- what the analyzers say (a check, never fatal)
log "summary"
"$PY" - "$W" > "$W/summary.txt" 2>&1 <<'EOF'
import sys, traceback
from pathlib import Path
w = Path(sys.argv[1])
try:
    from gpudoctor.model.trace import merge
    from gpudoctor.readers import kineto, nsys, nccltests
    from gpudoctor.analyzers.config import Config
    from gpudoctor.analyzers.context import build_context
    from gpudoctor.analyzers import nccl_dominated, pipeline_bubbles, stragglers
except Exception:
    traceback.print_exc(); sys.exit(0)
for case in ("ddp_comm", "ddp_compute", "pp_1mb", "pp_4mb"):
    for kind, reader, suffix in (("nsys", nsys, ".nsys.sqlite"), ("torch", kineto, ".torch.json.gz")):
        files = sorted(w.glob(f"{case}_rank*{suffix}"))
        if not files:
            print(case, kind, "no files"); continue
        try:
            t = merge([reader.read(f) for f in files])
            print(f"== {case} {kind}: kernels {len(t.kernels)}, collectives {len(t.collectives)} "
                  f"({dict(t.collectives['source'].value_counts())}), ranks {t.rank_ids}")
            for r in t.rank_ids:
                ctx = build_context(t, r, Config())
                for mod in (nccl_dominated, pipeline_bubbles):
                    for f in mod.analyze(ctx):
                        keep = {k: v for k, v in f.metrics.items() if not isinstance(v, (list, dict))}
                        print(f"  rank {r} {f.analyzer} {f.severity}: {f.title}\n    {keep}")
            print(stragglers.straggler_table(t).drop(columns=["window_source"]).to_string())
            for f in stragglers.analyze_run(t):
                print(f"  {f.analyzer} {f.severity}: {f.title}")
        except Exception:
            traceback.print_exc()
try:
    t = nccltests.read(w / "nccl_bench.log")
    nt = t.meta["nccl_tests"]
    print("== nccl_bench.log:", [(s["op"], s["rows"], s["avg_busbw_gbps"]) for s in nt["sections"]],
          "wrong", nt["wrong_total"], nt["gpudoctor"].get("ceiling"))
except Exception:
    traceback.print_exc()
EOF
cat "$W/summary.txt"

# ---------------------------------------------------------------- archives
ls -la "$W" "$W/logs"
pack() {  # name files...
  local name=$1; shift
  local have=()
  for f in "$@"; do [ -e "$W/$f" ] && have+=("$f"); done
  if [ ${#have[@]} -eq 0 ]; then log "nothing for $name"; return; fi
  (cd "$W" && tar czf "$out/$name" "${have[@]}")
  local size
  size=$(stat -c %s "$out/$name")
  log "$name: $size bytes (${#have[@]} files)"
  if [ "$size" -ge $((16 * 1000 * 1000)) ]; then log "WARNING $name is over 16 MB: record fewer steps"; fail=1; fi
}
cd "$W" || exit 2
pack multigpu_nsys_ddp.tgz ddp_comm_rank*.nsys.sqlite ddp_compute_rank*.nsys.sqlite
pack multigpu_nsys_pp.tgz pp_1mb_rank*.nsys.sqlite pp_4mb_rank*.nsys.sqlite
pack multigpu_torch.tgz *_rank*.torch.json.gz
pack multigpu_nccl.tgz nccl_bench.log nccl_bench.json allreduce_loop.json *.truth.json env.txt summary.txt logs
cd - > /dev/null || true
ls -la "$out"
log "done (failures: $fail)"
exit $fail
