"""nccl_dominated, pipeline_bubbles and stragglers: unit tests on small synthetic traces, and the real
two-GPU recordings (fixtures/multigpu/, recorded by scripts/record-multigpu.sh from
fixtures/workloads/multi_gpu.py) when they are present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpudoctor.analyzers import nccl_dominated, pipeline_bubbles, stragglers
from gpudoctor.analyzers.config import Config
from gpudoctor.analyzers.context import build_context
from gpudoctor.model.categories import categorize
from gpudoctor.model.trace import Trace, conform, merge

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures" / "multigpu"
MS = 1_000_000
T0 = 1_700_000_000_000_000_000

GEMM = "sm90_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x128x16_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas"
ALLREDUCE = "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)"
SENDRECV = "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)"


def rank_trace(rank: int, kernels: list[tuple[str, int, float, float]], steps: int = 5, step_ms: float = 10.0,
               ranges: list[tuple[str, float, float, int]] = (), collectives: list[dict] = (),
               device: str = "NVIDIA H200") -> Trace:
    """One rank: ``steps`` steps of ``step_ms``, each with the same kernels (name, stream, start_ms, end_ms)
    and nested ranges (text, start_ms, end_ms, depth), all relative to the step start."""
    krows, rrows, crows = [], [], []
    corr = 1
    for i in range(steps):
        base = T0 + int(i * step_ms * MS)
        for name, stream, s, e in kernels:
            krows.append({"rank": rank, "stream_id": stream, "start_ns": base + int(s * MS), "end_ns": base + int(e * MS),
                          "name": name, "demangled_name": name, "correlation_id": corr})
            corr += 1
        ks = [base + int(s * MS) for _, _, s, _ in kernels]
        ke = [base + int(e * MS) for _, _, _, e in kernels]
        rrows.append({"rank": rank, "thread_id": 1, "start_ns": base, "end_ns": base + int(step_ms * MS),
                      "text": f"step_{i}", "depth": 0, "gpu_start_ns": min(ks), "gpu_end_ns": max(ke),
                      "gpu_kernel_count": len(kernels)})
        for text, s, e, depth in ranges:
            rrows.append({"rank": rank, "thread_id": 1, "start_ns": base + int(s * MS), "end_ns": base + int(e * MS),
                          "text": text, "depth": depth, "gpu_start_ns": base + int(s * MS),
                          "gpu_end_ns": base + int(e * MS), "gpu_kernel_count": 1})
        for c in collectives:
            crows.append({**c, "rank": rank, "start_ns": base + int(c["start_ns"] * MS), "end_ns": base + int(c["end_ns"] * MS)})
    t = Trace()
    k = pd.DataFrame(krows)
    k["category"] = categorize(k["name"])
    t.set("kernels", k)
    t.set("ranges", pd.DataFrame(rrows))
    if crows:
        t.set("collectives", pd.DataFrame(crows))
    t.set("devices", {"rank": [rank], "device_id": [0], "name": [device]})
    t.set("ranks", {"rank": [rank], "source_file": [f"synthetic_rank{rank}"], "source_format": ["test"]})
    t.meta = {"inputs": [{"path": f"synthetic_rank{rank}", "format": "test", "rank": rank}]}
    return t


def ctx_of(trace: Trace, rank: int = 0, overrides: dict | None = None):
    cfg = Config().update(overrides) if overrides else Config()
    return build_context(trace, rank, cfg)


# ------------------------------------------------------------------------------------------------ nccl_dominated


def test_exposed_communication():
    # compute 0-6 ms, all-reduce 4-10 ms of each 10 ms step: comm 6, overlapped 2, exposed 4
    t = rank_trace(0, [(GEMM, 7, 0, 6), (ALLREDUCE, 20, 4, 10)])
    m = nccl_dominated.comm_metrics(ctx_of(t))
    assert m["comm_fraction"] == pytest.approx(0.6)
    assert m["exposed_comm_fraction"] == pytest.approx(0.4)
    assert m["overlap_fraction"] == pytest.approx(1 / 3)
    [f] = nccl_dominated.analyze(ctx_of(t))
    assert f.analyzer == "nccl_dominated" and f.severity == "high"
    assert f.metrics["exposed_comm_fraction"] == pytest.approx(0.4)
    assert f.metrics["steps"] == 4  # step 0 is warm-up
    assert f.estimated_saving_fraction == pytest.approx(0.4)  # min(exposed 4, compute 6 - overlapped 2)
    assert "overlaps compute" in f.recommendation
    assert f.evidence["top_comm_kernels"][0]["op"] == "all_reduce"


def test_exposed_thresholds_and_overlap():
    t = rank_trace(0, [(GEMM, 7, 0, 8.5), (ALLREDUCE, 20, 7, 10)])  # exposed 1.5 of 10: medium
    [f] = nccl_dominated.analyze(ctx_of(t))
    assert f.severity == "medium" and f.metrics["exposed_comm_fraction"] == pytest.approx(0.15)
    t = rank_trace(0, [(GEMM, 7, 0, 9.5), (ALLREDUCE, 20, 2, 7)])  # all hidden: info
    [f] = nccl_dominated.analyze(ctx_of(t))
    assert f.severity == "info" and f.metrics["exposed_comm_fraction"] == pytest.approx(0.0)
    assert f.estimated_saving_ns == 0
    t = rank_trace(0, [(GEMM, 7, 0, 9.5), (ALLREDUCE, 20, 9.5, 10)])  # exposed 5% < 10%: info
    assert [f.severity for f in nccl_dominated.analyze(ctx_of(t))] == ["info"]
    t = rank_trace(0, [(GEMM, 7, 0, 9.9), (ALLREDUCE, 20, 9.9, 10)])  # 1%: nothing
    assert nccl_dominated.analyze(ctx_of(t)) == []
    t = rank_trace(0, [(GEMM, 7, 0, 9)])  # no communication at all
    assert nccl_dominated.analyze(ctx_of(t)) == []
    # thresholds from the config
    t = rank_trace(0, [(GEMM, 7, 0, 8.5), (ALLREDUCE, 20, 7, 10)])
    ctx = ctx_of(t)
    ctx.config.values.setdefault("nccl_dominated", {})["exposed_fraction_high"] = 0.12
    assert nccl_dominated.analyze(ctx)[0].severity == "high"


@pytest.mark.parametrize("name", [
    "ncclKernel_AllReduce_RING_LL_Sum_float(ncclWorkElem)",
    "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
    "ncclAllReduceRingLLKernel_sum_f32(ncclColl)",
    "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)",
    "ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t(ncclDevComm*, unsigned long, ncclWork*)",
])
def test_every_nccl_generation_is_communication(name):
    k = conform("kernels", pd.DataFrame({"name": [name, GEMM], "category": ["other", "gemm"]}))
    assert nccl_dominated.comm_mask(k).tolist() == [True, False]


def test_p2p_names():
    k = conform("kernels", pd.DataFrame({"name": [SENDRECV, "ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t(x)",
                                                  "ncclSendKernel_copy_i8", ALLREDUCE, GEMM]}))
    assert nccl_dominated.p2p_mask(k).tolist() == [True, True, True, False, False]


def test_bandwidth_from_sized_collectives():
    coll = [{"op": "all_reduce", "bytes": 600_000_000, "comm_size": 2, "source": "kineto_args", "start_ns": 4, "end_ns": 10}]
    t = rank_trace(0, [(GEMM, 7, 0, 6), (ALLREDUCE, 20, 4, 10)], collectives=coll)
    [f] = nccl_dominated.analyze(ctx_of(t))
    [bw] = f.metrics["bandwidth_by_op"]
    assert bw["op"] == "all_reduce" and bw["count"] == 4 and bw["ranks"] == 2
    assert bw["algbw_gbps"] == pytest.approx(100.0) and bw["busbw_gbps"] == pytest.approx(100.0)
    assert f.metrics["link_ceiling_gbps"] == 450.0  # H200 NVLink 4
    assert f.metrics["link_fraction"] == pytest.approx(100 / 450, abs=1e-3)
    assert "gpudoctor nccl-bench" in f.recommendation
    # config wins over the GPU model
    ctx = ctx_of(t)
    ctx.config.values.setdefault("nccl_dominated", {})["link_bandwidth_gbps"] = 120.0
    [f] = nccl_dominated.analyze(ctx)
    assert f.metrics["link_fraction"] == pytest.approx(100 / 120, abs=1e-3)


def test_bandwidth_from_nvtx_payload_sizes():
    """nsys: NCCL's NVTX ranges carry the size; their GPU projection gives the time."""
    t = rank_trace(0, [(GEMM, 7, 0, 6), (ALLREDUCE, 20, 4, 10)], ranges=[("ncclAllReduce", 3.9, 3.95, 1)])
    r = t.ranges.copy()
    nccl = r["text"].astype(str) == "ncclAllReduce"
    r["domain"] = np.where(nccl, "NCCL", "")
    r.loc[nccl, "gpu_start_ns"] = r.loc[nccl, "gpu_start_ns"] + int(0.1 * MS)  # the kernel: 4-10 ms
    r.loc[nccl, "gpu_end_ns"] = r.loc[nccl, "gpu_start_ns"] + 6 * MS
    t.set("ranges", r)
    c = r[nccl]
    t.set("collectives", {"rank": 0, "start_ns": c["start_ns"].to_numpy(), "end_ns": c["end_ns"].to_numpy(),
                          "op": "all_reduce", "bytes": 300_000_000, "source": "nvtx_nccl"})
    t.meta["inputs"].append({"path": "other", "rank": 1})  # a 2-rank run
    [f] = nccl_dominated.analyze(ctx_of(t))
    [bw] = f.metrics["bandwidth_by_op"]
    assert bw["ranks"] == 2 and bw["busbw_gbps"] == pytest.approx(50.0)


def test_no_findings_on_single_gpu_fixtures():
    from gpudoctor.readers import nsys
    p = ROOT / "fixtures" / "nsys" / "mlp_bf16.nsys.sqlite"
    if not p.exists():
        pytest.skip("no single-GPU fixture")
    t = nsys.read(p)
    ctx = build_context(t, t.rank_ids[0], Config(), rank_view=t)
    assert nccl_dominated.analyze(ctx) == []
    assert pipeline_bubbles.analyze(ctx) == []
    assert stragglers.analyze_run(t) == []


# ------------------------------------------------------------------------------------------------ pipeline_bubbles


def test_ideal_bubble():
    assert pipeline_bubbles.ideal_bubble(2, 1) == pytest.approx(0.5)
    assert pipeline_bubbles.ideal_bubble(2, 4) == pytest.approx(0.2)
    assert pipeline_bubbles.ideal_bubble(4, 8) == pytest.approx(3 / 11)
    assert pipeline_bubbles.ideal_bubble(4, 8, 2) == pytest.approx(3 / 19)
    assert pipeline_bubbles.ideal_bubble(1, 8) == 0.0
    with pytest.raises(ValueError):
        pipeline_bubbles.ideal_bubble(2, 0)


def test_microbatches_from_range_names():
    r = conform("ranges", pd.DataFrame({"text": ["step_1", "microbatch_0", "microbatch_1", "microbatch_0_backward",
                                                 "microbatch_3", "forward"]}))
    assert pipeline_bubbles.microbatches_from_ranges(r, pipeline_bubbles.SPEC.setting("microbatch_pattern").default) == 3
    r = conform("ranges", pd.DataFrame({"text": ["mb 0", "mb 1", "mb_2", "step_0"]}))
    assert pipeline_bubbles.microbatches_from_ranges(r, pipeline_bubbles.SPEC.setting("microbatch_pattern").default) == 3
    r = conform("ranges", pd.DataFrame({"text": ["step_0", "embedding"]}))
    assert pipeline_bubbles.microbatches_from_ranges(r, pipeline_bubbles.SPEC.setting("microbatch_pattern").default) is None


def _pp_run(m: int):
    """2 stages; stage 0 computes 0-2 and 6-10 ms of each 10 ms step and waits in send/recv 2-6 ms."""
    mb = [(f"microbatch_{j}", 0.1 * j, 0.1 * j + 0.05, 1) for j in range(m)]
    r0 = rank_trace(0, [(GEMM, 7, 0, 2), (SENDRECV, 30, 2, 6), (GEMM, 7, 6, 10)], ranges=mb)
    r1 = rank_trace(1, [(SENDRECV, 30, 0, 2), (GEMM, 7, 2, 6), (SENDRECV, 30, 6, 10)], ranges=mb)
    return merge([r0, r1])


def test_pipeline_bubble_near_the_ideal():
    t = _pp_run(1)
    f0 = pipeline_bubbles.analyze(ctx_of(t, 0))
    [f] = f0
    assert f.analyzer == "pipeline_bubbles"
    assert f.metrics["bubble_fraction"] == pytest.approx(0.4)
    assert f.metrics["p2p_fraction"] == pytest.approx(0.4)
    assert f.metrics["pipeline_stages"] == 2 and f.metrics["microbatches"] == 1
    assert f.metrics["ideal_bubble_fraction"] == pytest.approx(0.5)
    assert f.severity == "high" and "near the ideal 50%" in f.title
    assert "more micro-batches" in f.recommendation
    # saving: down to the ideal of m = 4 x p = 8 micro-batches, 1/9
    assert f.estimated_saving_fraction == pytest.approx(0.4 - 1 / 9, abs=1e-4)
    [g] = pipeline_bubbles.analyze(ctx_of(t, 1))
    assert g.metrics["bubble_fraction"] == pytest.approx(0.6)


def test_pipeline_bubble_far_above_the_ideal():
    t = _pp_run(4)
    [f] = pipeline_bubbles.analyze(ctx_of(t, 0))
    assert f.metrics["ideal_bubble_fraction"] == pytest.approx(0.2)
    assert f.metrics["excess_over_ideal"] == pytest.approx(0.2)
    assert "far above" in f.title and "isend/irecv" in f.recommendation
    # p and m from the config
    [f] = pipeline_bubbles.analyze(_with(ctx_of(t, 0), pipeline_stages=4, microbatches=16))
    assert f.metrics["ideal_bubble_fraction"] == pytest.approx(3 / 19, abs=1e-6)


def _with(ctx, **kw):
    ctx.config.values.setdefault("pipeline_bubbles", {}).update(kw)
    return ctx


def test_pipeline_transfers_are_not_nccl_dominated():
    t = _pp_run(1)
    assert nccl_dominated.analyze(ctx_of(t, 0)) == []
    m = nccl_dominated.comm_metrics(ctx_of(t, 0))
    assert m["comm_ns"] == 0 and m["pipeline_p2p_excluded_kernels"] > 0
    # all-to-all also runs as send/recv kernels: then they are communication
    t.set("collectives", {"rank": [0], "op": ["all_to_all"], "source": ["kineto_args"]})
    [f] = nccl_dominated.analyze(ctx_of(t, 0))
    assert f.metrics["comm_fraction"] == pytest.approx(0.4)


def test_unbalanced_pipeline_stages():
    [f] = stragglers.analyze_run(_pp_run(1))
    assert f.rank == 0 and "slowest stage" in f.title and "Pipeline stages are unbalanced" in f.recommendation
    assert f.metrics["waiting_ranks"] == [1]


def test_no_pipeline_no_finding():
    t = rank_trace(0, [(GEMM, 7, 0, 6), (ALLREDUCE, 20, 4, 10)])
    assert pipeline_bubbles.analyze(ctx_of(t)) == []


# ------------------------------------------------------------------------------------------------ stragglers


def test_straggler_table_and_finding():
    r0 = rank_trace(0, [(GEMM, 7, 0, 5), (ALLREDUCE, 20, 5, 10)])
    r1 = rank_trace(1, [(GEMM, 7, 0, 8), (ALLREDUCE, 20, 8, 10)])
    t = merge([r0, r1])
    tab = stragglers.straggler_table(t)
    assert list(tab["rank"]) == [0, 1]
    assert list(tab["steps"]) == [4, 4]
    assert list(tab["compute_ns_per_step"]) == [5 * MS, 8 * MS]
    assert list(tab["exposed_comm_ns_per_step"]) == [5 * MS, 2 * MS]
    assert list(tab["median_step_ns"]) == [10 * MS, 10 * MS]
    assert list(tab["step_end_lag_ns"]) == [0, 0]
    [f] = stragglers.analyze_run(t)
    assert f.analyzer == "stragglers" and f.rank == 1
    assert f.metrics["slowest_rank"] == 1 and f.metrics["waiting_ranks"] == [0]
    assert f.metrics["excess_ns_per_step"] == 3 * MS
    assert f.metrics["excess_fraction_of_step"] == pytest.approx(0.3)
    assert f.severity == "high" and "Rank 1 is the slowest rank" in f.title and "0 wait on it" in f.title
    assert stragglers.analyze_run(t, {"excess_fraction_high": 0.5})[0].severity == "medium"
    # balanced ranks: no finding; one rank: no finding
    assert stragglers.analyze_run(merge([r0, rank_trace(1, [(GEMM, 7, 0, 5), (ALLREDUCE, 20, 5, 10)])])) == []
    assert stragglers.analyze_run(r0) == []
    # through the per-rank interface: once per run, from the first rank's context (ctx.run_trace)
    [g] = stragglers.analyze(ctx_of(t, 0))
    assert g.title == f.title
    assert stragglers.analyze(ctx_of(t, 1)) == []


# ------------------------------------------------------------------------------------------------ workloads on CPU


@pytest.mark.slow
def test_workload_runs_on_cpu(tmp_path):
    """fixtures/workloads/multi_gpu.py under torchrun with gloo: the pipeline case end to end, with traces."""
    pytest.importorskip("torch")
    env = dict(os.environ, WORKLOAD_DEVICE="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "fixtures" / "workloads" / "multi_gpu.py"), "pp_4mb", "--steps", "3",
           "--torch-trace", str(tmp_path / "pp_rank{rank}.torch.json.gz"), "--truth", str(tmp_path / "truth.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["pipeline_stages"] == 2 and truth["microbatches"] == 4
    from gpudoctor.readers import kineto
    traces = [kineto.read(tmp_path / f"pp_rank{r}.torch.json.gz") for r in (0, 1)]
    t = merge(traces)
    assert t.rank_ids == [0, 1]
    texts = set(t.ranges["text"].astype(str))
    assert {"step_0", "step_2", "microbatch_3", "microbatch_0_backward"} <= texts
    assert pipeline_bubbles.microbatches_from_ranges(t.ranges, pipeline_bubbles.SPEC.setting("microbatch_pattern").default) == 4


def test_trace_path_template():
    sys.path.insert(0, str(ROOT / "fixtures" / "workloads"))
    try:
        import importlib
        mg = importlib.import_module("multi_gpu")
    except ImportError:
        pytest.skip("torch not installed")
    finally:
        sys.path.pop(0)
    assert mg.trace_path("out/ddp_rank{rank}.torch.json.gz", 1) == "out/ddp_rank1.torch.json.gz"
    assert mg.trace_path("out/ddp.torch.json.gz", 0) == "out/ddp_rank0.torch.json.gz"
    assert mg.trace_path("x.json", 3) == "x_rank3.json"


# ------------------------------------------------------------------------------------------------ recorded fixtures
# Real per-rank Nsight Systems exports from 2x H200 (fixtures/multigpu/README.md): DDP whose all-reduce
# dominates (ddp_comm_bound) and a 2-stage pipeline with one micro-batch (pipe_m1). Cases that wait for a
# recording (a compute-bound DDP, a 4-micro-batch pipeline, torch.profiler traces of each) skip until
# scripts/record-multigpu.sh has made them.

RECORDED = {("ddp_comm", "nsys"): "ddp_comm_bound_rank{r}.sqlite", ("pp_1mb", "nsys"): "pipe_m1_rank{r}.sqlite"}
CASES = ("ddp_comm", "ddp_compute", "pp_1mb", "pp_4mb")
SUFFIX = {"nsys": ".nsys.sqlite", "torch": ".torch.json.gz"}


def _files(case: str, source: str) -> list[Path]:
    pattern = RECORDED.get((case, source), f"{case}_rank{{r}}{SUFFIX[source]}")
    return [FIX / pattern.format(r=r) for r in (0, 1)]


def _need(case: str, source: str) -> list[Path]:
    files = _files(case, source)
    if not all(f.exists() for f in files):
        pytest.skip(f"fixtures/multigpu/{files[0].name.replace('rank0', 'rank{0,1}')} not recorded yet")
    return files


@lru_cache(maxsize=None)
def _load(case: str, source: str) -> Trace:
    from gpudoctor.readers import kineto, nsys
    reader = nsys if source == "nsys" else kineto
    return merge([reader.read(f) for f in _files(case, source)])


def _findings(case: str, source: str, module) -> dict[int, list]:
    _need(case, source)
    t = _load(case, source)
    return {r: module.analyze(build_context(t, r, Config())) for r in t.rank_ids}


@pytest.mark.parametrize("source", ["nsys", "torch"])
def test_ddp_comm_is_communication_bound(source):
    out = _findings("ddp_comm", source, nccl_dominated)
    assert sorted(out) == [0, 1]
    for r, fs in out.items():
        [f] = [f for f in fs if "Exposed communication" in f.title]
        assert f.severity == "high", (r, f.title)
        # the recording's README: exposed communication roughly 40-50% of a step on each rank
        assert 0.40 <= f.metrics["exposed_comm_fraction"] <= 0.50
        assert f.metrics["comm_fraction"] > 0.6
        assert f.metrics["world_size"] == 2


def test_ddp_comm_recorded_values():
    """Values of the nsys recording, checked against its kernels: 8 all-reduce kernels per steady step."""
    out = _findings("ddp_comm", "nsys", nccl_dominated)
    f0, f1 = out[0][0], out[1][0]
    assert (f0.metrics["steps"], f1.metrics["steps"]) == (5, 4)
    assert f1.metrics["comm_kernels_per_step"] == 8.0
    t = _load("ddp_comm", "nsys")
    k = t.kernels[(t.kernels["rank"] == 1)]
    ar = k[k["name"].astype(str).str.contains("AllReduce")]
    assert len(ar) > 0 and (ar["category"].astype(str) == "communication").all()
    assert f0.metrics["exposed_comm_fraction"] == pytest.approx(0.4187, abs=1e-3)
    assert f1.metrics["exposed_comm_fraction"] == pytest.approx(0.4337, abs=1e-3)


@pytest.mark.parametrize("source", ["nsys", "torch"])
def test_ddp_compute_is_not(source):
    comm = _findings("ddp_compute", source, nccl_dominated)
    for r, fs in comm.items():
        assert all(f.severity in ("info", "low") for f in fs), [(f.severity, f.title) for f in fs]
    bound = _findings("ddp_comm", source, nccl_dominated)
    for r in comm:
        ef = comm[r][0].metrics["exposed_comm_fraction"] if comm[r] else 0.0
        assert ef < bound[r][0].metrics["exposed_comm_fraction"]


@pytest.mark.parametrize("source", ["nsys", "torch"])
def test_ddp_has_no_pipeline(source):
    assert all(v == [] for v in _findings("ddp_comm", source, pipeline_bubbles).values())


@pytest.mark.parametrize("source", ["nsys", "torch"])
def test_pipeline_is_not_nccl_dominated(source):
    assert all(v == [] for v in _findings("pp_1mb", source, nccl_dominated).values())


@pytest.mark.parametrize("source", ["nsys", "torch"])
def test_pipeline_bubble_one_microbatch_recorded(source):
    """p = 2 stages, m = 1: each rank waits about half of the step (the ideal bubble is 0.5)."""
    out = _findings("pp_1mb", source, pipeline_bubbles)
    for r in (0, 1):
        [f] = out[r]
        assert f.metrics["pipeline_stages"] == 2
        assert 0.45 <= f.metrics["bubble_fraction"] <= 0.6, f.title
        assert f.severity == "high"
        # the bubble is spent inside NCCL send/recv kernels, not idle
        assert f.metrics["p2p_fraction"] > 0.45 and f.metrics["idle_fraction"] < 0.02


@pytest.mark.parametrize("source", ["nsys", "torch"])
def test_pipeline_bubbles_shrink_with_microbatches(source):
    one = _findings("pp_1mb", source, pipeline_bubbles)
    four = _findings("pp_4mb", source, pipeline_bubbles)
    for r in (0, 1):
        [f1], [f4] = one[r], four[r]
        assert f1.metrics["microbatches"] == 1 and f4.metrics["microbatches"] == 4
        assert f1.metrics["ideal_bubble_fraction"] == pytest.approx(0.5)
        assert f4.metrics["ideal_bubble_fraction"] == pytest.approx(0.2)
        assert f4.metrics["bubble_fraction"] < f1.metrics["bubble_fraction"], (f1.title, f4.title)


@pytest.mark.parametrize("source", ["nsys", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_straggler_table_recorded(case, source):
    _need(case, source)
    tab = stragglers.straggler_table(_load(case, source))
    assert list(tab["rank"]) == [0, 1]
    assert (tab["steps"] >= 2).all()
    if case.startswith("ddp"):  # synchronous data parallel: both ranks' steps take the same time
        a, b = tab["median_step_ns"]
        assert a == pytest.approx(b, rel=0.1)
        assert not any(f.severity in ("medium", "high") for f in stragglers.analyze_run(_load(case, source)))
    else:  # the two stages of the pipeline: neither is a straggler worth fixing
        assert [f.severity for f in stragglers.analyze_run(_load(case, source))] in ([], ["info"], ["low"])


@pytest.mark.parametrize("case", CASES)
def test_nsys_sees_the_nccl_collectives(case):
    _need(case, "nsys")
    t = _load(case, "nsys")
    ops = t.collectives["op"].astype(str).value_counts().to_dict()
    if case.startswith("ddp"):
        assert "all_reduce" in ops
    else:
        assert set(ops) & {"send", "recv", "send_recv"}
    if case == "ddp_comm":
        assert ops == {"all_reduce": 130, "broadcast": 24, "all_gather": 2}
    if case == "pp_1mb":
        assert ops == {"send": 8, "recv": 8}
