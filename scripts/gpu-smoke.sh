#!/usr/bin/env bash
# End-to-end check of `gpudoctor profile` on a machine with an NVIDIA GPU. Run from the repository root:
#
#   bash scripts/gpu-smoke.sh [OUTDIR]          # PYTHON=python3 by default
#
# Profiles a small training step (fixtures/workloads/cases.py attn_naive --steps 6) with each backend
# -- nsys (when gpudoctor finds it), torch, nvml only -- then a failing program under nsys and, when nsys
# is there, a two-rank job (--nproc 2; both ranks may share one GPU), and checks the run directories:
# manifest, raw reports, run.db, analysis.json with findings. Prints PASS/FAIL/SKIP per check; exits 1
# if any check failed. On the lent GPU machines run `source .gpu/nsys-env.sh` first (libraries that the
# Nsight Systems copy inside Nsight Compute needs); gpudoctor finds nsys by itself.
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-$(mktemp -d /tmp/gpudoctor-smoke.XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WORKLOAD=(fixtures/workloads/cases.py attn_naive --steps 6)
[ -f fixtures/workloads/cases.py ] || { echo "run this from the repository root"; exit 2; }

declare -A RESULT
ORDER=()

# check NAME DIR RC EXPECTED_RC BACKEND REPORT_FORMAT NEED_FINDINGS
check() {
  local name=$1 dir=$2 rc=$3
  $PY - "$dir" "$rc" "$4" "$5" "$6" "$7" <<'EOF'
import json, sys
from pathlib import Path
d, rc, want_rc, backend, fmt, need_findings = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6] == "1"
bad = []
def need(cond, what):
    if not cond:
        bad.append(what)
need(rc == want_rc, f"exit code {rc}, expected {want_rc}")
m = json.loads((d / "manifest.json").read_text()) if (d / "manifest.json").exists() else {}
need(bool(m), "no manifest.json")
if m:
    need(m.get("exit_code") == want_rc, f"manifest exit_code {m.get('exit_code')}")
    need(m.get("backend") == backend, f"manifest backend {m.get('backend')}")
    need(bool(m.get("gpus")), "manifest lists no GPU")
    need(bool(m.get("driver_version")), "manifest has no driver version")
    fmts = {r["format"] for r in m.get("reports", [])}
    need(fmt in fmts, f"no {fmt} report (reports: {sorted(fmts)})")
    for r in m.get("reports", []):
        need((d / r["path"]).exists(), f"listed report missing: {r['path']}")
    need((m.get("analysis") or {}).get("status") == "ok", f"analysis: {m.get('analysis')}")
    nv = m.get("nvml") or {}
    print(f"    manifest: outcome={m.get('outcome')} gpus={[g.get('name') for g in m.get('gpus', [])]} "
          f"driver={m.get('driver_version')} cuda={m.get('cuda_driver_version')} versions={m.get('versions')}")
    print(f"    nvml: samples={nv.get('samples')} metrics={nv.get('metrics')} cpu_fraction={nv.get('cpu_fraction')} "
          f"error={nv.get('error')}")
    for p in m.get("problems", []):
        print(f"    problem: {p}")
a = json.loads((d / "analysis.json").read_text()) if (d / "analysis.json").exists() else None
need(a is not None, "no analysis.json")
need((d / "run.db").exists(), "no run.db")
if a is not None:
    f = a.get("findings")
    need(isinstance(f, list), "analysis.json has no findings list")
    if need_findings:
        need(bool(f), "no findings")
    print(f"    findings: {[(x.get('analyzer'), x.get('severity'), x.get('title')) for x in (f or [])][:6]}")
    for r in a.get("ranks", []):
        print(f"    rank {r.get('rank')}: device={r.get('device')} kernels={r.get('kernel_count')} "
              f"busy={r.get('gpu_busy_fraction')} window={r.get('window_source')}")
if (d / "run.db").exists():
    try:
        from gpudoctor.store.rundb import load
        t = load(d / "run.db")
        names = sorted({str(n) for n in t.counters["name"].unique()})
        nvml = [n for n in names if n.startswith("nvml.")]
        print(f"    run.db: {len(t.kernels)} kernels, {len(t.counters)} counter rows ({len(nvml)} nvml series; "
              f"others: {[n for n in names if not n.startswith('nvml.')][:6]})")
        if fmt == "nvml_csv":
            need(len(nvml) > 0, "run.db holds no nvml.* counters")
            util = t.counters[t.counters["name"].astype(str) == "nvml.gpu_util_pct"]["value"]
            need(len(util) and float(util.max()) > 0, "GPU utilization never above 0 while the workload ran")
    except Exception as e:
        bad.append(f"run.db unreadable: {type(e).__name__}: {e}")
for b in bad:
    print(f"    FAIL: {b}")
sys.exit(1 if bad else 0)
EOF
  if [ $? -eq 0 ]; then RESULT[$name]=PASS; else RESULT[$name]=FAIL; fi
  ORDER+=("$name")
}

run() {  # name backend expected_rc report_format need_findings -- gpudoctor-profile-args
  local name=$1 backend=$2 want=$3 fmt=$4 findings=$5; shift 5
  echo "== $name: gpudoctor profile $*"
  local t0=$SECONDS
  $PY -m gpudoctor profile -o "$OUT/$name" --force "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc in $((SECONDS - t0)) s (log: $OUT/$name.log)"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
  check "$name" "$OUT/$name" "$rc" "$want" "$backend" "$fmt" "$findings"
}

NSYS_FOUND=$($PY -c 'from gpudoctor.collect.locate import find_nsys; l = find_nsys(); print(f"{l.path} ({l.how})" if l else "")')
echo "gpudoctor smoke test into $OUT"
echo "nsys: ${NSYS_FOUND:-not found}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'

if [ -n "$NSYS_FOUND" ]; then
  run nsys nsys 0 nsys_sqlite 1 --backend nsys -- "$PY" "${WORKLOAD[@]}"
  run nsys_exit3 nsys 3 nsys_sqlite 0 --backend nsys -- "$PY" -c \
    "import torch; x = torch.randn(1024, 1024, device='cuda'); [x @ x for _ in range(20)]; torch.cuda.synchronize(); raise SystemExit(3)"
  run nsys_2ranks nsys 0 nsys_sqlite 1 --backend nsys --nproc 2 -- "$PY" "${WORKLOAD[@]}"
else
  for n in nsys nsys_exit3 nsys_2ranks; do RESULT[$n]="SKIP (nsys not found)"; ORDER+=("$n"); done
fi
run torch torch 0 kineto_json 1 --backend torch -- "$PY" "${WORKLOAD[@]}"
run nvml nvml 0 nvml_csv 0 --backend nvml -- "$PY" "${WORKLOAD[@]}"

echo
fail=0
for n in "${ORDER[@]}"; do
  echo "${RESULT[$n]}  $n"
  [ "${RESULT[$n]}" = FAIL ] && fail=1
done
echo "run directories and logs: $OUT"
exit $fail
