"""Which collective an NCCL kernel belongs to (gpudoctor/model/collectives.py and the Kineto reader), and
what pipeline_bubbles / nccl_dominated make of it, on real traces:

- negative for pipeline_bubbles, positive for nccl_dominated: fixtures/hta/trace_filter (two ranks of a
  TorchRec-style embedding job; its ncclKernel_SendRecv kernels run inside nccl:all_to_all /
  nccl:all_reduce / nccl:_all_gather_base ranges, and its profiler wrote no "Collective name");
- positive for pipeline_bubbles: the 2-stage pipeline recorded on 2x H200 (blocking dist.send/recv), and
  negative: the DDP job of the same machine (fixtures/multigpu); on these Nsight Systems exports also the
  op from NCCL's NVTX calls, and send/recv pairs across ranks.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from gpudoctor.analyzers import nccl_dominated, pipeline_bubbles
from gpudoctor.model.collectives import collective_op, enclosing_ops, nccl_call_ops, op_of_kernel, pair_p2p, range_op
from gpudoctor.model.trace import merge
from gpudoctor.pipeline import analyze_inputs
from gpudoctor.readers import kineto, nsys

ROOT = Path(__file__).resolve().parent.parent
HTA = ROOT / "fixtures" / "hta" / "trace_filter"
HTA_FILES = [str(HTA / f"sampled_rank-{r}.json.gz") for r in (0, 1)]
MULTI = ROOT / "fixtures" / "multigpu"


def test_op_names():
    assert range_op("nccl:all_to_all") == "all_to_all"
    assert range_op("nccl:_all_gather_base") == "all_gather"
    assert range_op("nccl:_reduce_scatter_base") == "reduce_scatter"
    assert range_op("c10d::alltoall_base_") == "all_to_all"
    assert range_op("c10d::allreduce_") == "all_reduce"
    assert range_op("nccl:send") == "send" and range_op("nccl:recv") == "recv"
    assert range_op("## alltoall_fwd_single ##") == "all_to_all"
    assert range_op("## all2all_data:kjt splits ##") == "all_to_all"
    assert range_op("ncclAllReduce") == "all_reduce"
    # names that do not say which collective runs inside
    for text in ("## sparse_data_dist ##", "ProfilerStep#551", "## forward ##", "backend_step", "small_gather"):
        assert range_op(text) is None, text
    assert collective_op("_allgather_base") == "all_gather" and collective_op(None) is None
    assert op_of_kernel("ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t(ncclDevComm*, unsigned long, ncclWork*)") == "send_recv"
    assert op_of_kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL(x)") == "all_reduce"


def test_enclosing_ops_innermost():
    # thread 1: outer all_to_all 0-100 holding an inner all_reduce 10-20; thread 2: nothing
    got = enclosing_ops(np.array([1, 1, 1, 2, 1]), np.array([5, 15, 50, 15, 200]), np.array([1, 1]),
                        np.array([0, 10]), np.array([100, 20]), np.array(["all_to_all", "all_reduce"], dtype=object))
    assert got.tolist() == ["all_to_all", "all_reduce", "all_to_all", "", ""]


@pytest.fixture(scope="module")
def hta():
    return analyze_inputs(HTA_FILES, need_trace=True)


def test_hta_sendrecv_kernels_are_collectives(hta):
    c = hta.trace.collectives
    assert len(c) == 20  # 10 NCCL kernels per rank
    for rank in (0, 1):
        mine = c[c["rank"] == rank]
        assert mine["op"].astype(str).value_counts().to_dict() == {"all_to_all": 4, "all_reduce": 4, "all_gather": 2}
        assert set(mine["source"].astype(str)) == {"kineto_range"}
    k = hta.trace.kernels
    assert nccl_dominated.p2p_mask(k).sum() == 20  # every one of them is named SendRecv
    assert not nccl_dominated.pipeline_p2p(hta.trace)
    assert nccl_dominated.pipeline_p2p_mask(k, c).sum() == 0


def test_hta_no_pipeline_finding(hta):
    assert [f for f in hta.findings if f.analyzer == "pipeline_bubbles"] == []


def test_hta_communication_share_matches_the_category_table(hta):
    found = {f.rank: f for f in hta.findings if f.analyzer == nccl_dominated.ID}
    assert set(found) == {0, 1}
    for summary in hta.ranks:
        cat = summary.category_time.set_index("category")["window_fraction"]
        f = found[summary.rank]
        # the NCCL kernels never overlap each other here, so the union equals the category's sum
        assert f.metrics["comm_fraction"] == pytest.approx(float(cat["communication"]), abs=1e-6)
        assert f.metrics["pipeline_p2p_excluded_kernels"] == 0
    assert found[0].metrics["comm_fraction"] == pytest.approx(0.323997, abs=1e-6)


def test_hta_each_source_alone(tmp_path):
    # the same real trace with the collective-named ranges renamed, source by source
    import gzip
    import json

    doc = json.loads(gzip.decompress(Path(HTA_FILES[0]).read_bytes()))

    def read_renamed(prefix: str, name: str):
        for e in doc["traceEvents"]:
            if str(e.get("name", "")).startswith(prefix):
                e["name"] = "renamed_range"
        p = tmp_path / name
        p.write_text(json.dumps(doc))
        return kineto.read(p)

    # without the nccl:<op> ranges, the c10d:: operator calls around the launches still say it
    t = read_renamed("nccl:", "no_nccl_ranges.json")
    assert t.collectives["op"].astype(str).value_counts().to_dict() == {"all_to_all": 4, "all_reduce": 4,
                                                                         "all_gather": 2}
    assert not nccl_dominated.pipeline_p2p(t)
    # without those either, TorchRec's ranges (## alltoall_fwd_single ## ...) still name the all-to-alls
    t = read_renamed("c10d::", "no_c10d.json")
    ops = t.collectives["op"].astype(str).value_counts().to_dict()
    assert ops.get("all_to_all", 0) >= 1 and set(ops) == {"all_to_all", "send_recv"}
    # and without any of them, nothing says what the SendRecv kernels were: point-to-point transfers
    t = read_renamed("## ", "no_comm_ranges.json")
    assert set(t.collectives["op"].astype(str)) == {"send_recv"}
    assert set(t.collectives["source"].astype(str)) == {"kernel_name"}
    assert nccl_dominated.pipeline_p2p(t)


def _multi(case: str) -> list[str]:
    files = [MULTI / f"{case}_rank{r}.sqlite" for r in (0, 1)]
    if not all(f.exists() for f in files):
        pytest.skip(f"fixtures/multigpu/{case} not present")
    return [str(f) for f in files]


def test_real_pipeline_is_still_found():
    a = analyze_inputs(_multi("pipe_m1"), need_trace=True)
    found = [f for f in a.findings if f.analyzer == pipeline_bubbles.ID]
    assert sorted(f.rank for f in found) == [0, 1]
    assert all(f.metrics["bubble_fraction"] > 0.4 for f in found)


def test_ddp_is_not_a_pipeline():
    a = analyze_inputs(_multi("ddp_comm_bound"), need_trace=True)
    assert [f for f in a.findings if f.analyzer == pipeline_bubbles.ID] == []
    assert {f.rank for f in a.findings if f.analyzer == nccl_dominated.ID} == {0, 1}


# ------------------------------------------------------------------------------------------------
# Nsight Systems: the NCCL NVTX call around each kernel's launch (the same 2x H200 recordings)


def _nccl_kernel_times(t):
    k = t.kernels[t.kernels["name"].astype(str).str.startswith("nccl")]
    return sorted(zip(k["start_ns"].tolist(), k["end_ns"].tolist()))


def test_nccl_call_ops_resolve_groups():
    texts = ["ncclGroupStart", "ncclSend", "ncclRecv", "ncclGroupEnd", "ncclAllReduce", "ncclCommInitRankConfig",
             "ncclGroupStart", "ncclSend", "ncclGroupStart", "ncclSend", "ncclGroupEnd", "ncclGroupEnd", "ncclBcast"]
    n = len(texts)
    ops, nbytes = nccl_call_ops(np.zeros(n, np.int64), np.arange(n, dtype=np.int64), texts,
                                np.array([-1, 100, 200, -1, 8, -1, -1, 5, -1, 7, -1, -1, -1]))
    assert list(ops) == ["", "send", "recv", "send_recv", "all_reduce", "", "", "send", "", "send", "", "send",
                         "broadcast"]
    assert nbytes[3] == 300 and nbytes[11] == 12  # a group's bytes: the sum of its calls'
    assert nbytes[10] == -1  # an inner ncclGroupEnd launches nothing


def test_nsys_pipeline_ops_from_nccl_nvtx_calls():
    # rank 0 sends the activations (fwd) and receives the gradients (bwd); the NCCL calls are made inside
    # a group, and the SendRecv kernel is launched inside ncclGroupEnd
    for rank, first in ((0, "send"), (1, "recv")):
        t = nsys.read(MULTI / f"pipe_m1_rank{rank}.sqlite")
        c = t.collectives.sort_values("start_ns")
        assert list(c["op"].astype(str)) == [first, ({"send", "recv"} - {first}).pop()] * 4
        assert set(c["source"].astype(str)) == {"nvtx_range"}
        assert sorted(zip(c["start_ns"].tolist(), c["end_ns"].tolist())) == _nccl_kernel_times(t)  # GPU times


def test_nsys_ddp_ops_from_nccl_nvtx_calls():
    t = nsys.read(MULTI / "ddp_comm_bound_rank0.sqlite")
    c = t.collectives
    assert c["op"].astype(str).value_counts().to_dict() == {"all_reduce": 65, "broadcast": 12, "all_gather": 1}
    assert set(c["source"].astype(str)) == {"nvtx_range"}
    assert sorted(zip(c["start_ns"].tolist(), c["end_ns"].tolist())) == _nccl_kernel_times(t)
    assert set(c.loc[c["op"] == "all_reduce", "dtype"].astype(str)) == {"float32"}  # from the kernel name


def _edited_copy(tmp_path, sql: str, params=()) -> Path:
    path = tmp_path / "pipe_m1_rank0.sqlite"
    shutil.copy(MULTI / "pipe_m1_rank0.sqlite", path)
    con = sqlite3.connect(path)
    con.execute(sql, params)
    con.commit()
    con.close()
    return path


def test_nsys_without_nccl_ranges_falls_back_to_kernel_names(tmp_path):
    path = _edited_copy(tmp_path, "DELETE FROM NVTX_EVENTS WHERE domainId = 2")  # NCCL's NVTX domain
    c = nsys.read(path).collectives
    assert c["op"].astype(str).tolist() == ["send_recv"] * 8 and set(c["source"].astype(str)) == {"kernel_name"}


def test_nsys_collective_range_wins_over_grouped_send_recv(tmp_path):
    # the first group (ncclSend inside ncclGroupStart/End) wrapped in a range that names an all-to-all, as
    # ProcessGroupNCCL's own NVTX range would: NCCL runs all-to-all as grouped send/recv
    path = _edited_copy(tmp_path, "INSERT INTO NVTX_EVENTS (start, end, eventType, text, globalTid, domainId) "
                                  "VALUES (8213500000, 8317690000, 59, 'nccl:all_to_all', 281497693062474, 0)")
    c = nsys.read(path).collectives.sort_values("start_ns")
    assert c["op"].astype(str).tolist() == ["all_to_all"] + ["recv", "send"] * 3 + ["recv"]


# ------------------------------------------------------------------------------------------------
# send/recv pairs across ranks (the 2-stage pipeline: positive; DDP: negative)


def _run(case: str):
    return merge([nsys.read(f) for f in _multi(case)])


def test_pipeline_sends_pair_with_the_next_stage_receives():
    pairs = pair_p2p(_run("pipe_m1").collectives)
    # 4 steps: the activations 0 -> 1 (forward), then the gradients 1 -> 0 (backward)
    assert list(zip(pairs["send_rank"], pairs["recv_rank"])) == [(0, 1), (1, 0)] * 4
    assert (pairs["overlap_ns"] > 0).all()
    # a blocking receive is posted before its send: the receiving stage waits for the sending one
    assert (pairs["recv_start_ns"] <= pairs["send_start_ns"]).all()
    assert (pairs["send_start_ns"] - pairs["recv_start_ns"]).max() > 9_000_000  # a stage's compute, in ns


def test_pairs_are_found_once_per_run(monkeypatch):
    """pair_p2p reads the whole run: the ranks' contexts share its result, and both stages get their waits."""
    from gpudoctor.analyzers import runner

    calls = []
    monkeypatch.setattr(pipeline_bubbles, "pair_p2p", lambda c: calls.append(len(c)) or pair_p2p(c))
    runner.analyze_trace(_run("pipe_m1"), only=["pipeline_bubbles"], samples=False)
    assert len(calls) == 1
    ctxs = runner.contexts(_run("pipe_m1"))
    assert len(ctxs) == 2 and all(pipeline_bubbles.p2p_waits(c)["p2p_pairs"] > 0 for c in ctxs)
    assert len(calls) == 2  # once more: the new run's contexts share their own


def test_ddp_has_no_send_recv_pairs():
    assert pair_p2p(_run("ddp_comm_bound").collectives).empty


def test_pipeline_finding_names_the_stage_waited_for():
    a = analyze_inputs(_multi("pipe_m1"), need_trace=True)
    found = {f.rank: f for f in a.findings if f.analyzer == pipeline_bubbles.ID}
    for rank, other in ((0, 1), (1, 0)):
        f = found[rank]
        assert f.metrics["p2p_pairs"] >= 4 and f.metrics["send_wait_ns"] == 0
        assert 0.4 < f.metrics["recv_wait_fraction"] <= f.metrics["bubble_fraction"]
        assert f"receives from rank {other} waited" in f.evidence["p2p_pairs"]
