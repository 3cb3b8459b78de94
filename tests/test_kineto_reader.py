"""PyTorch profiler (Kineto) Chrome-trace reader: values pinned from a real H100 export, recomputed
independently here with plain json, plus synthetic traces for what the sample does not show."""

from __future__ import annotations

import copy
import gzip
import json
import random
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import orjson
import pandas as pd
import pytest

from gpudoctor.errors import InputError
from gpudoctor.model.kernel_names import short_kernel_name
from gpudoctor.model.schema import TABLES
from gpudoctor.readers import kineto
from gpudoctor.readers.kineto import read

# ------------------------------------------------------------------------------------------------
# Expected values of the sample (to be repointed to committed fixtures).
SAMPLE = Path("/work/shared/samples/attention_h100.torch_profiler.json")
KERNEL_COUNT = 21
MEMSET_COUNT = 9
MEMCPY_COUNT = 0
API_CALL_COUNT = 41  # runtime + driver
RUNTIME_CALL_COUNT = 32
DRIVER_CALL_COUNT = 9
RANGE_COUNT = 6  # record_function scopes naive_attn / fused_attn, 3 each
CPU_OP_COUNT = 126
BASE_TIME_NS = 1790857026000000000
FIRST_NVJET_START_NS = 1795424047021968038
FIRST_NVJET_END_NS = 1795424047022394895
FIRST_NVJET_CORRELATION = 15
FIRST_NAIVE_GPU_START_NS = 1795424047021919109
FIRST_NAIVE_GPU_END_NS = 1795424047027684126
FIRST_NAIVE_GPU_KERNELS = 6
DEVICE_NAME = "NVIDIA H100 80GB HBM3"
SM_COUNT = 132
COMPUTE_CAPABILITY = "9.0"
RANK = 0
HOST_PID = 435
# Categories come from the short name (as nsys does), so the direct-copy unrolled_elementwise_kernel is elementwise.
CATEGORY_COUNTS = {"gemm": 6, "attention": 3, "elementwise": 9, "reduction": 3}


# ------------------------------------------------------------------------------------------------
# independent computation from the sample with plain json (exact decimals)


@pytest.fixture(scope="module")
def sample_path() -> Path:
    if not SAMPLE.exists():
        pytest.skip(f"sample not present: {SAMPLE}")
    return SAMPLE


@pytest.fixture(scope="module")
def raw(sample_path) -> dict:
    with open(sample_path) as f:
        return json.load(f, parse_float=Decimal)


@pytest.fixture(scope="module")
def trace(sample_path):
    return read(sample_path)


def _x(raw: dict, cat: str) -> list[dict]:
    return [e for e in raw["traceEvents"] if e.get("ph") == "X" and e.get("cat") == cat]


def _abs_ns(raw: dict, us: Decimal) -> int:
    return int(us * 1000) + int(raw.get("baseTimeNanoseconds", 0))


def test_sample_counts(trace, raw):
    assert len(_x(raw, "kernel")) == KERNEL_COUNT
    assert len(_x(raw, "gpu_memset")) == MEMSET_COUNT
    assert len(_x(raw, "gpu_memcpy")) == MEMCPY_COUNT
    assert len(_x(raw, "cuda_runtime")) == RUNTIME_CALL_COUNT
    assert len(_x(raw, "cuda_driver")) == DRIVER_CALL_COUNT
    assert RUNTIME_CALL_COUNT + DRIVER_CALL_COUNT == API_CALL_COUNT
    assert len(_x(raw, "user_annotation")) == RANGE_COUNT
    assert len(_x(raw, "cpu_op")) == CPU_OP_COUNT

    assert len(trace.kernels) == KERNEL_COUNT
    assert len(trace.memops) == MEMSET_COUNT + MEMCPY_COUNT
    assert (trace.memops["kind"] == "memset").sum() == MEMSET_COUNT
    assert len(trace.api_calls) == API_CALL_COUNT
    assert trace.api_calls["api"].value_counts().to_dict() == {"runtime": RUNTIME_CALL_COUNT,
                                                               "driver": DRIVER_CALL_COUNT}
    assert len(trace.ranges) == RANGE_COUNT
    assert trace.meta["cpu_op_count"] == CPU_OP_COUNT
    assert trace.dropped_counts() == {}  # every kernel/memop of the sample has its launch record


def test_sample_first_nvjet_kernel(trace, raw):
    nvjet = min((e for e in _x(raw, "kernel") if e["name"].startswith("nvjet")), key=lambda e: e["ts"])
    start = _abs_ns(raw, nvjet["ts"])
    end = _abs_ns(raw, nvjet["ts"] + nvjet["dur"])
    assert (start, end) == (FIRST_NVJET_START_NS, FIRST_NVJET_END_NS)
    assert int(raw["baseTimeNanoseconds"]) == BASE_TIME_NS

    k = trace.kernels[trace.kernels["name"].astype(str).str.startswith("nvjet")].sort_values("start_ns").iloc[0]
    assert (int(k["start_ns"]), int(k["end_ns"])) == (FIRST_NVJET_START_NS, FIRST_NVJET_END_NS)
    a = nvjet["args"]
    assert k["name"] == k["demangled_name"] == nvjet["name"]
    assert int(k["correlation_id"]) == a["correlation"] == FIRST_NVJET_CORRELATION
    assert int(k["device_id"]) == a["device"] and int(k["stream_id"]) == a["stream"]
    assert [k["grid_x"], k["grid_y"], k["grid_z"]] == a["grid"]
    assert [k["block_x"], k["block_y"], k["block_z"]] == a["block"]
    assert k["registers_per_thread"] == a["registers per thread"]
    assert k["shared_memory_bytes"] == a["shared memory"]
    assert k["category"] == "gemm"
    assert k["graph_id"] == -1


def test_sample_all_kernel_times_exact(trace, raw):
    want = sorted((_abs_ns(raw, e["ts"]), _abs_ns(raw, e["ts"] + e["dur"])) for e in _x(raw, "kernel"))
    got = sorted(zip(trace.kernels["start_ns"].tolist(), trace.kernels["end_ns"].tolist()))
    assert got == want


def test_sample_first_naive_attn_projection(trace, raw):
    rng = min((e for e in _x(raw, "user_annotation") if e["name"] == "naive_attn"), key=lambda e: e["ts"])
    lo, hi = rng["ts"], rng["ts"] + rng["dur"]
    launches = [e for e in _x(raw, "cuda_runtime") + _x(raw, "cuda_driver")
                if e["tid"] == rng["tid"] and lo <= e["ts"] <= hi]
    corrs = {e["args"]["correlation"] for e in launches}
    kernels = [e for e in _x(raw, "kernel") if e["args"]["correlation"] in corrs]
    ops = kernels + [e for e in _x(raw, "gpu_memset") + _x(raw, "gpu_memcpy") if e["args"]["correlation"] in corrs]
    span = (min(_abs_ns(raw, e["ts"]) for e in ops), max(_abs_ns(raw, e["ts"] + e["dur"]) for e in ops))
    assert span == (FIRST_NAIVE_GPU_START_NS, FIRST_NAIVE_GPU_END_NS)
    assert len(kernels) == FIRST_NAIVE_GPU_KERNELS

    r = trace.ranges[trace.ranges["text"] == "naive_attn"].sort_values("start_ns").iloc[0]
    assert (int(r["start_ns"]), int(r["end_ns"])) == (_abs_ns(raw, lo), _abs_ns(raw, hi))
    assert (int(r["gpu_start_ns"]), int(r["gpu_end_ns"])) == (FIRST_NAIVE_GPU_START_NS, FIRST_NAIVE_GPU_END_NS)
    assert int(r["gpu_kernel_count"]) == FIRST_NAIVE_GPU_KERNELS
    assert r["domain"] == "record_function" and r["depth"] == 0 and r["thread_id"] == rng["tid"]


def test_sample_devices_ranks_meta(trace, raw, sample_path):
    props = raw["deviceProperties"][0]
    assert (props["name"], props["numSms"]) == (DEVICE_NAME, SM_COUNT)
    d = trace.devices.iloc[0]
    assert len(trace.devices) == 1
    assert (d["name"], int(d["sm_count"]), d["compute_capability"]) == (DEVICE_NAME, SM_COUNT, COMPUTE_CAPABILITY)
    assert int(d["memory_bytes"]) == props["totalGlobalMem"]

    r = trace.ranks.iloc[0]
    assert len(trace.ranks) == 1
    assert int(r["rank"]) == RANK and int(r["pid"]) == HOST_PID
    assert int(r["clock_offset_ns"]) == BASE_TIME_NS and r["clock_source"] == "baseTimeNanoseconds"
    assert r["source_format"] == "kineto_json" and r["source_file"] == str(sample_path)
    for name, df in trace.tables():
        assert (df["rank"] == RANK).all(), name

    assert trace.meta["inputs"] == [{"path": str(sample_path), "format": "kineto_json", "rank": RANK}]
    tp = trace.meta["torch_profiler"]
    assert tp["schemaVersion"] == raw["schemaVersion"]
    assert tp["cuda_runtime_version"] == raw["cuda_runtime_version"]
    assert tp["ts_unit"] == "us"
    assert sum(tp["event_counts"].values()) == len(raw["traceEvents"])


def test_sample_categories_and_memops(trace, raw):
    assert trace.kernels["category"].value_counts().to_dict() == CATEGORY_COUNTS
    assert set(trace.kernels.loc[trace.kernels["name"].astype(str).str.contains("sdpa"), "category"]) == {"attention"}
    m = trace.memops
    assert set(m["kind"]) == {"memset"} and set(m["dst_kind"]) == {"device"}
    assert m["bytes"].tolist() == [e["args"]["bytes"] for e in sorted(_x(raw, "gpu_memset"), key=lambda e: e["ts"])]
    assert set(trace.api_calls["thread_id"]) == {HOST_PID}
    assert set(trace.api_calls["correlation_id"]) == {e["args"]["correlation"] for e in
                                                       _x(raw, "cuda_runtime") + _x(raw, "cuda_driver")}


def _assert_same_tables(a, b, skip=("ranks",)):
    for name, df in a.tables():
        if name in skip:
            continue
        pd.testing.assert_frame_equal(df, b.table(name), check_categorical=False, obj=name)


def test_sample_cpu_ops_with_shapes(trace, raw):
    """cpu_ops holds the SHAPE_OPS cpu_op events with exact times, ids and shapes as JSON text."""
    want = sorted((e for e in _x(raw, "cpu_op")
                   if e["name"] in kineto.SHAPE_OPS or e["name"].startswith(kineto.SHAPE_OP_PREFIXES)),
                  key=lambda e: (e["ts"], int(e["tid"]), -e["dur"]))
    ops = trace.cpu_ops
    assert len(want) > 0 and len(ops) == len(want)
    assert set(ops["name"]) >= {"aten::bmm", "aten::_softmax"}
    assert (ops["rank"] == RANK).all()
    assert ops["name"].tolist() == [e["name"] for e in want]
    assert ops["thread_id"].tolist() == [int(e["tid"]) for e in want]
    assert ops["start_ns"].tolist() == [_abs_ns(raw, e["ts"]) for e in want]
    assert ops["end_ns"].tolist() == [_abs_ns(raw, e["ts"]) + int(e["dur"] * 1000) for e in want]
    assert ops["external_id"].tolist() == [int(e["args"]["External id"]) for e in want]
    assert ops["sequence_number"].tolist() == [int(e["args"].get("Sequence number", -1)) for e in want]
    assert [json.loads(d) for d in ops["input_dims"]] == [e["args"]["Input Dims"] for e in want]
    assert [json.loads(d) for d in ops["input_types"]] == [e["args"]["Input type"] for e in want]
    # kernels launched inside an op carry its External id (the join analyzers can use)
    ext = {int(e["args"]["External id"]) for e in want}
    launched = [e for e in _x(raw, "kernel") if int(e["args"].get("External id", -1)) in ext]
    assert launched


def test_gzip_round_trip(trace, sample_path, tmp_path):
    gz = tmp_path / "attention.json.gz"
    gz.write_bytes(gzip.compress(sample_path.read_bytes()))
    t = read(gz)
    _assert_same_tables(trace, t)
    assert t.ranks.iloc[0]["source_file"] == str(gz)
    # gzip is recognized by content, not by name
    odd = tmp_path / "attention.json"
    odd.write_bytes(gz.read_bytes())
    _assert_same_tables(trace, read(odd))


def test_streaming_blocks_and_whole_document_agree(trace, sample_path, raw, tmp_path, monkeypatch):
    # one-line JSON (json.dumps' "}, {" and orjson's "},{" separators) streams too, to the same tables
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(json.loads(sample_path.read_text())))
    t = read(compact)
    assert t.meta["torch_profiler"]["parser"] == "stream"
    assert t.meta["torch_profiler"]["event_separator"] == '}, {"'
    _assert_same_tables(trace, t)
    assert t.meta["torch_profiler"]["event_counts"] == trace.meta["torch_profiler"]["event_counts"]
    # tiny blocks: many cuts, carried partial events
    monkeypatch.setattr(kineto, "_BLOCK", 4096)
    t = read(sample_path)
    assert t.meta["torch_profiler"]["parser"] == "stream"
    _assert_same_tables(trace, t)
    assert t.meta["cpu_op_count"] == CPU_OP_COUNT


def test_bare_event_list(trace, sample_path, tmp_path):
    events = json.loads(sample_path.read_text())["traceEvents"]
    p = tmp_path / "events.json"
    p.write_text(json.dumps(events))
    t = read(p)
    assert len(t.kernels) == KERNEL_COUNT
    assert t.ranks.iloc[0]["clock_source"] == "trace"  # no baseTimeNanoseconds in a bare list
    assert (trace.kernels["start_ns"] - t.kernels["start_ns"] == BASE_TIME_NS).all()
    # the Chrome JSON array format may lack its closing bracket
    p.write_text(json.dumps(events)[:-1] + ",\n")
    assert len(read(p).kernels) == KERNEL_COUNT


# ------------------------------------------------------------------------------------------------
# synthetic traces

BASE = 1_700_000_000_000_000_000


def _ev(cat, name, ts, dur, ph="X", pid=77, tid=77, **args):
    e = {"ph": ph, "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur}
    if args:
        e["args"] = args
    return e


def _write(tmp_path, events, name="trace.json", indent=2, **header):
    doc = {"schemaVersion": 1, "baseTimeNanoseconds": BASE, **header, "traceEvents": events}
    p = tmp_path / name
    p.write_text(json.dumps(doc, indent=indent))
    return p


def _ddp_events():
    big = {"External id": 2, "Collective name": "allreduce", "dtype": "BFloat16",
           "In msg nelems": 1048576, "Out msg nelems": 1048576, "Group size": 8}
    return [
        {"name": "process_name", "ph": "M", "pid": 77, "tid": 0, "args": {"name": "python"}},
        {"name": "process_labels", "ph": "M", "pid": 77, "tid": 0, "args": {"labels": "CPU"}},
        _ev("cpu_op", "ProfilerStep#4", 1000.0, 500.0, **{"External id": 1}),
        _ev("cpu_op", "record_param_comms", 1010.0, 50.0, **big),
        _ev("cpu_op", "aten::add", 1011.0, 2.0),
        _ev("cuda_runtime", "cudaLaunchKernelExC", 1020.0, 5.0, correlation=100, **{"External id": 2}),
        _ev("kernel", "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 1100.0, 200.5,
            pid=0, tid=20, device=3, stream=20, correlation=100, **{"External id": 2}),
        _ev("user_annotation", "nccl:_all_gather_base", 1200.0, 50.0),
        _ev("cuda_runtime", "cudaLaunchKernel", 1210.0, 5.0, correlation=101),
        _ev("kernel", "ncclDevKernel_AllGather_RING_LL(x)", 1400.0, 100.0, pid=0, tid=20, device=3, stream=20,
            correlation=101, **{"Collective name": "_allgather_base", "dtype": "Float", "In msg nelems": 10,
                                "Out msg nelems": 80, "Group size": 8}),
        _ev("cuda_driver", "cuLaunchKernel", 1260.0, 5.0, correlation=102),  # after nccl:_all_gather_base
        _ev("kernel", "ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t(ncclWorkElem)", 1600.0, 10.0, pid=0, tid=21,
            device=3, stream=21, correlation=102),
        _ev("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 1700.0, 3.0, pid=0, tid=20, device=3, stream=20,
            correlation=103, bytes=4096),
        _ev("cuda_runtime", "cudaMemcpyAsync", 1300.0, 5.0, correlation=103),
        {"ph": "i", "cat": "cpu_instant_event", "name": "[memory]", "pid": 77, "tid": 77, "ts": 1001.0, "s": "t",
         "args": {"Device Type": 1, "Device Id": 3, "Addr": 140000000, "Bytes": 4096, "Total Allocated": 8192,
                  "Total Reserved": 2097152}},
        {"ph": "i", "cat": "cpu_instant_event", "name": "[memory]", "pid": 77, "tid": 77, "ts": 1002.0, "s": "t",
         "args": {"Device Type": 1, "Device Id": 3, "Addr": 140000000, "Bytes": -4096, "Total Allocated": 4096,
                  "Total Reserved": 2097152}},
        {"ph": "s", "id": 100, "pid": 77, "tid": 77, "ts": 1020.0, "cat": "ac2g", "name": "ac2g"},
        {"ph": "f", "id": 100, "pid": 0, "tid": 20, "ts": 1100.0, "cat": "ac2g", "name": "ac2g", "bp": "e"},
    ]


def test_collectives_ranges_memory(tmp_path):
    p = _write(tmp_path, _ddp_events(), distributedInfo={"backend": "nccl", "rank": 5, "world_size": 8})
    t = read(p)
    assert t.ranks.iloc[0]["rank"] == 5 and t.ranks.iloc[0]["pid"] == 77
    assert t.meta["torch_profiler"]["distributedInfo"]["world_size"] == 8
    c = t.collectives
    assert c["op"].tolist() == ["all_reduce", "all_gather", "send_recv"]
    assert c["bytes"].tolist() == [1048576 * 2, 80 * 4, -1]
    assert c["dtype"].tolist() == ["bfloat16", "float32", "int8"]
    assert c["comm_size"].tolist() == [8, 8, -1]
    assert c["source"].tolist() == ["kineto_args", "kineto_args", "kernel_name"]
    assert c["start_ns"].tolist() == [BASE + 1_100_000, BASE + 1_400_000, BASE + 1_600_000]
    assert c["end_ns"].tolist()[0] == BASE + 1_300_500
    assert set(t.kernels["category"]) == {"communication"}

    r = t.ranges.set_index("text")
    assert r.loc["ProfilerStep#4", "domain"] == "profiler_step" and r.loc["ProfilerStep#4", "depth"] == 0
    assert r.loc["nccl:_all_gather_base", "domain"] == "record_function"
    assert r.loc["nccl:_all_gather_base", "depth"] == 1
    # the step launched 3 kernels and one memcpy: span from the first kernel to the memcpy's end
    assert r.loc["ProfilerStep#4", "gpu_kernel_count"] == 3
    assert (r.loc["ProfilerStep#4", "gpu_start_ns"], r.loc["ProfilerStep#4", "gpu_end_ns"]) == (
        BASE + 1_100_000, BASE + 1_703_000)
    assert t.meta["cpu_op_count"] == 3

    m = t.memops.iloc[0]
    assert (m["kind"], m["src_kind"], m["dst_kind"], m["bytes"]) == ("memcpy_dtoh", "device", "pinned", 4096)
    assert t.memory_events["kind"].tolist() == ["alloc", "free"]
    assert t.memory_events["bytes"].tolist() == [4096, -4096]
    assert t.memory_events["source"].tolist() == ["kineto_memory"] * 2
    assert sorted(t.counters["name"].unique()) == ["memory_allocated_bytes", "memory_reserved_bytes"]
    assert t.devices["device_id"].tolist() == [3]  # seen in kernels, not listed in deviceProperties
    assert t.dropped_counts() == {}


def _shape_op_events(n_steps=1):
    events = [{"name": "process_labels", "ph": "M", "pid": 77, "tid": 0, "args": {"labels": "CPU"}}]
    for i in range(n_steps):
        t0 = 1000.0 + 100.0 * i
        x = 10 * i
        events += [
            _ev("cpu_op", f"ProfilerStep#{i}", t0, 90.0, **{"External id": x + 1}),
            _ev("cpu_op", "aten::linear", t0 + 1, 20.0, **{
                "External id": x + 2, "Sequence number": 7 + i, "Input Dims": [[8, 1024], [4096, 1024], [4096]],
                "Input type": ["c10::BFloat16", "c10::BFloat16", "c10::BFloat16"]}),
            _ev("cpu_op", "aten::t", t0 + 2, 1.0, **{"External id": x + 3, "Input Dims": [[4096, 1024]]}),
            _ev("cpu_op", "aten::addmm", t0 + 3, 10.0, **{
                "External id": x + 4, "Input Dims": [[4096], [8, 1024], [1024, 4096], [], []],
                "Input type": ["c10::BFloat16", "c10::BFloat16", "c10::BFloat16", "Scalar", "Scalar"]}),
            _ev("cuda_runtime", "cudaLaunchKernel", t0 + 4, 2.0, correlation=x + 5, **{"External id": x + 4}),
            _ev("kernel", "nvjet_tst_64x8_64x16_4x1_v_bz_TNN", t0 + 10, 5.0, pid=0, tid=7, device=0, stream=7,
                correlation=x + 5, **{"External id": x + 4}),
            _ev("cpu_op", "aten::convolution", t0 + 30, 5.0, **{"External id": x + 6}),  # no shapes recorded
            _ev("cpu_op", "aten::_scaled_dot_product_flash_attention", t0 + 40, 5.0,
                **{"External id": x + 7, "Input Dims": [[1, 8, 128, 64]] * 3}),
            _ev("cpu_op", "aten::mm_like", t0 + 50, 1.0),  # not an op of interest (exact names)
            _ev("cpu_op", "aten::add", t0 + 60, 1.0, **{"External id": x + 8, "Input Dims": [[8], [8]]}),
            _ev("python_function", "torch/nn/modules/linear.py(125): forward", t0, 30.0),
        ]
    return events


def test_cpu_ops_table(tmp_path):
    t = read(_write(tmp_path, _shape_op_events()))
    assert t.meta["torch_profiler"]["parser"] == "stream"
    assert t.meta["cpu_op_count"] == 8  # every cpu_op is counted, only the SHAPE_OPS ones are kept
    ops = t.cpu_ops
    assert ops["name"].tolist() == ["aten::linear", "aten::addmm", "aten::convolution",
                                    "aten::_scaled_dot_product_flash_attention"]
    assert ops["start_ns"].tolist() == [BASE + 1_001_000, BASE + 1_003_000, BASE + 1_030_000, BASE + 1_040_000]
    assert ops["end_ns"].tolist() == [BASE + 1_021_000, BASE + 1_013_000, BASE + 1_035_000, BASE + 1_045_000]
    assert ops["thread_id"].tolist() == [77] * 4
    assert ops["external_id"].tolist() == [2, 4, 6, 7]
    assert ops["sequence_number"].tolist() == [7, -1, -1, -1]
    assert ops["input_dims"].tolist() == ["[[8,1024],[4096,1024],[4096]]", "[[4096],[8,1024],[1024,4096],[],[]]",
                                          "", "[[1,8,128,64],[1,8,128,64],[1,8,128,64]]"]
    assert json.loads(ops["input_types"].iat[1]) == ["c10::BFloat16"] * 3 + ["Scalar"] * 2
    assert ops["input_types"].iat[2] == ""
    assert ops.columns.tolist() == [c for c, _, _ in TABLES["cpu_ops"]]
    # the ProfilerStep still becomes a range, the kernel a kernel
    assert t.ranges["text"].tolist() == ["ProfilerStep#0"] and len(t.kernels) == 1
    assert t.dropped_counts() == {}


def test_cpu_ops_stream_and_whole_agree(tmp_path, monkeypatch):
    events = _shape_op_events(n_steps=200)
    streamed = read(_write(tmp_path, events, name="a.json"))
    whole = kineto._read(_write(tmp_path, events, name="b.json", indent=None), None, stream=False)
    assert streamed.meta["torch_profiler"]["parser"] == "stream"
    assert whole.meta["torch_profiler"]["parser"].startswith("whole")
    assert len(streamed.cpu_ops) == 4 * 200
    _assert_same_tables(streamed, whole)
    assert streamed.meta["cpu_op_count"] == whole.meta["cpu_op_count"] == 8 * 200
    # tiny blocks: regions end on every kind of event, ops taken back go after the region's last one
    monkeypatch.setattr(kineto, "_BLOCK", 2048)
    small = read(_write(tmp_path, events, name="c.json"))
    assert small.meta["torch_profiler"]["parser"] == "stream"
    _assert_same_tables(streamed, small)


def test_rank_resolution(tmp_path):
    ev = _ddp_events()
    dist = {"backend": "nccl", "rank": 5, "world_size": 8}
    assert read(_write(tmp_path, ev, distributedInfo=dist)).ranks["rank"].tolist() == [5]
    t = read(_write(tmp_path, ev, distributedInfo=dist), rank=2)  # the argument wins
    assert t.ranks["rank"].tolist() == [2] and set(t.kernels["rank"]) == {2}
    assert t.meta["inputs"][0]["rank"] == 2
    for name, want in [("trace_rank3.json", 3), ("rank_3.json", 3), ("w-rank-12.pt.trace.json", 12),
                       ("rank0.json", 0), ("plain.json", 0), ("frank2_4242.1700000000000.pt.trace.json", 0),
                       ("run.r7.json", 7), ("train.rank.4.json", 4)]:  # the same rule as nsys files
        assert read(_write(tmp_path, ev, name=name)).ranks["rank"].tolist() == [want], name
    # tensorboard_trace_handler names: <hostname>_<pid>.<ms>.pt.trace.json
    t = read(_write(tmp_path, ev, name="frank2_4242.1700000000000.pt.trace.json"))
    assert t.ranks.iloc[0]["hostname"] == "frank2"


def test_dropped_accounting(tmp_path):
    ev = _ddp_events() + [
        _ev("mystery_cat", "x", 1.0, 1.0),
        _ev("mystery_cat", "y", 2.0, 1.0),
        {"ph": "X", "cat": "kernel", "name": "no_times", "args": {"correlation": 5}},
        _ev("kernel", "orphan_kernel", 1800.0, 1.0, pid=0, tid=20, device=3, stream=20, correlation=999),
        _ev("gpu_memset", "Memset (Device)", 1801.0, 1.0, pid=0, tid=20, device=3, stream=20, correlation=998),
        {"ph": "B", "name": "begin", "pid": 1, "tid": 1, "ts": 1.0},
    ]
    t = read(_write(tmp_path, ev))
    assert t.dropped_counts() == {
        "unknown event category: mystery_cat": 2,
        "event missing ts or dur": 1,
        "gpu op with no launch record": 2,
        "unsupported event phase: B": 1,
    }
    assert "orphan_kernel" in set(t.kernels["name"].astype(str))  # kept, only counted
    assert set(t.dropped["source"]) == {"kineto"}


def test_timestamp_precision(tmp_path):
    # µs with exactly 3 decimals, as Kineto writes them, up to 100 days after the base: exact ns
    rnd = random.Random(7)
    ns = [rnd.randrange(0, 100 * 86_400 * 10**9) for _ in range(3000)]
    durs = [rnd.randrange(0, 10**9) for _ in ns]
    lines = [
        '{"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 1, '
        f'"ts": {s // 1000}.{s % 1000:03d}, "dur": {d // 1000}.{d % 1000:03d}, "args": {{"correlation": {i}}}}}'
        for i, (s, d) in enumerate(zip(ns, durs))
    ]
    p = tmp_path / "precise.json"
    p.write_text('{\n  "baseTimeNanoseconds": %d,\n  "traceEvents": [\n  ' % BASE + ",\n  ".join(lines) + "\n  ]\n}")
    t = read(p)
    got = dict(zip(t.api_calls["correlation_id"], zip(t.api_calls["start_ns"], t.api_calls["end_ns"])))
    assert len(got) == len(ns)
    for i, (s, d) in enumerate(zip(ns, durs)):
        assert got[i] == (BASE + s, BASE + s + d)


def test_nanosecond_timestamps_detected(tmp_path):
    # µs reading would put these more than a year after the base: they are ns
    ev = [_ev("cuda_runtime", "cudaLaunchKernel", 4_567_021_018_119_081, 40_269, correlation=1)]
    t = read(_write(tmp_path, ev))
    assert t.meta["torch_profiler"]["ts_unit"] == "ns"
    assert t.api_calls["start_ns"].tolist() == [BASE + 4_567_021_018_119_081]
    assert t.api_calls["end_ns"].tolist() == [BASE + 4_567_021_018_119_081 + 40_269]
    # epoch ns without a base
    p = tmp_path / "nobase.json"
    p.write_text(json.dumps({"traceEvents": [_ev("cuda_runtime", "x", 1_795_424_047_021_968_038, 5, correlation=1)]}))
    t = read(p)
    assert t.api_calls["start_ns"].tolist() == [1_795_424_047_021_968_038]
    assert t.ranks.iloc[0]["clock_source"] == "trace"


# ------------------------------------------------------------------------------------------------
# bad input: one-line InputError naming the file


def _good_text() -> str:
    return json.dumps({"schemaVersion": 1, "baseTimeNanoseconds": BASE, "traceEvents": _ddp_events()}, indent=2)


BAD_INPUTS = {
    "truncated.json": lambda: _good_text()[: len(_good_text()) // 2].encode(),
    "truncated_end.json": lambda: _good_text()[:-3].encode(),
    "bad_utf8.json": lambda: _good_text().replace("nccl:_all_gather_base", "nccl:\udcff", 1).encode(
        "utf-8", "surrogateescape"),
    "list_of_numbers.json": lambda: b"[1, 2, 3]",
    "empty_list.json": lambda: b"[]",
    "not_a_trace.json": lambda: b'{"schemaVersion": 1, "foo": [1, 2]}',
    "events_not_list.json": lambda: b'{"traceEvents": {"ph": "X"}}',
    "scalar.json": lambda: b"42",
    "empty.json": lambda: b"",
    "blank.json": lambda: b"  \n\t ",
    "corrupt.json.gz": lambda: b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4,
    "truncated.json.gz": lambda: gzip.compress(_good_text().encode())[:200],
    "bad_event.json": lambda: json.dumps({"traceEvents": _ddp_events()[:3] + [7] + _ddp_events()[3:]}).encode(),
    "unhashable_name.json": lambda: json.dumps({"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": ["x"], "ts": 1, "dur": 1, "args": {}}]}, indent=2).encode(),
}
BAD_MESSAGES = {
    "truncated.json": "truncated or invalid JSON",
    "truncated_end.json": "truncated or invalid JSON",
    "bad_utf8.json": "invalid UTF-8",
    "list_of_numbers.json": "not a trace",
    "empty_list.json": "not a trace",
    "not_a_trace.json": "no traceEvents",
    "events_not_list.json": "traceEvents is a dict",
    "scalar.json": "not a trace",
    "empty.json": "empty file",
    "blank.json": "empty file",
    "corrupt.json.gz": "corrupt gzip",
    "truncated.json.gz": "corrupt gzip",
    "bad_event.json": "traceEvents[3]",
    "unhashable_name.json": "unexpected event structure",
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(BAD_INPUTS[name]())
    with pytest.raises(InputError) as info:
        read(p)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(p) + ": ")
    assert BAD_MESSAGES[name] in msg


def test_missing_file_and_directory(tmp_path):
    for p, why in [(tmp_path / "nope.json", "no such file"), (tmp_path, "is a directory")]:
        with pytest.raises(InputError) as info:
            read(p)
        assert str(info.value) == f"{p}: {why}" or str(info.value).startswith(f"{p}: {why}")


def test_odd_but_readable_inputs(tmp_path):
    ev = copy.deepcopy(_ddp_events())
    ev[6]["args"] = [1]  # kernel with args that are not an object: kept, fields unknown
    ev[5]["tid"] = "thread 5"  # non-numeric thread id
    t = read(_write(tmp_path, ev))
    k = t.kernels[t.kernels["name"].astype(str).str.startswith("ncclDevKernel_AllReduce")].iloc[0]
    assert k["correlation_id"] == -1 and k["grid_x"] == -1
    assert -1 in set(t.api_calls["thread_id"])
    # NaN (stdlib json accepts it, orjson does not) and a byte-order mark
    text = _good_text().replace('"dur": 200.5', '"dur": NaN', 1)
    p = tmp_path / "nan.json"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())
    t = read(p)
    assert t.dropped_counts()["event missing ts or dur"] == 1


def test_short_kernel_name():
    assert short_kernel_name("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == (
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT")
    assert short_kernel_name(
        "void at::native::vectorized_elementwise_kernel<8, at::native::BUnaryFunctor<c10::BFloat16, c10::BFloat16, "
        "c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 2ul> >(int, "
        "at::native::BUnaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, "
        "at::native::binary_internal::MulFunctor<float> >, std::array<char*, 2ul>)") == "vectorized_elementwise_kernel"
    assert short_kernel_name(
        "void (anonymous namespace)::softmax_warp_forward<float, float, float, 11, false, false>(float*, float const*, "
        "int, int, int, bool const*, int, bool)") == "softmax_warp_forward"
    assert short_kernel_name(
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
        "::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, std::array<char*, "
        "2ul>, 4>(int, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() "
        "const::{lambda()#7}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul>)") == (
        "unrolled_elementwise_kernel")


# ------------------------------------------------------------------------------------------------
# one result whatever the path, on every real trace at hand

ROOT = Path(__file__).resolve().parent.parent
REAL_TRACES = sorted((ROOT / "fixtures" / "torch").glob("*.torch.json.gz")) + sorted(
    (ROOT / "fixtures" / "hta" / "trace_filter").glob("*.json.gz"))


def _same_meta(a, b):
    ta, tb = a.meta["torch_profiler"], b.meta["torch_profiler"]
    assert ta["event_counts"] == tb["event_counts"] and ta["ts_unit"] == tb["ts_unit"]
    assert a.meta["cpu_op_count"] == b.meta["cpu_op_count"]
    assert a.dropped_counts() == b.dropped_counts()


@pytest.mark.parametrize("path", REAL_TRACES, ids=lambda p: p.name)
def test_stream_and_whole_document_are_one_result(path, tmp_path, monkeypatch):
    whole = kineto._read(path, None, stream=False)
    streamed = read(path)
    assert streamed.meta["torch_profiler"]["parser"] == "stream"
    assert whole.meta["torch_profiler"]["parser"] == "whole (asked)"
    _assert_same_tables(whole, streamed)
    _same_meta(whole, streamed)
    # the same document on one line (orjson's "},{" separators), read in small blocks
    one_line = tmp_path / "one_line.json"
    one_line.write_bytes(orjson.dumps(json.loads(gzip.decompress(path.read_bytes()))))
    monkeypatch.setattr(kineto, "_BLOCK", 1 << 16)
    small = read(one_line)
    assert small.meta["torch_profiler"]["parser"] == "stream"
    assert small.meta["torch_profiler"]["event_separator"] == '},{"'
    _assert_same_tables(whole, small)
    _same_meta(whole, small)


@pytest.mark.parametrize("path", REAL_TRACES[:1] + REAL_TRACES[-1:], ids=lambda p: p.name)
def test_two_halves_at_once_are_one_result(path, tmp_path, monkeypatch):
    # a large plain file is read in two halves at once (the second in a forked process): same tables
    plain = tmp_path / "plain.json"
    plain.write_bytes(gzip.decompress(path.read_bytes()))
    whole = kineto._read(plain, None, stream=False)
    monkeypatch.setattr(kineto, "_TWO_PROCESS_MIN_BYTES", 0)
    monkeypatch.setattr(kineto, "_BLOCK", 1 << 16)
    monkeypatch.delenv("GPUDOCTOR_READ_THREADS", raising=False)
    two = read(plain)
    assert two.meta["torch_profiler"]["parser"] == "stream (2 processes)"
    _assert_same_tables(whole, two)
    _same_meta(whole, two)
    monkeypatch.setenv("GPUDOCTOR_READ_THREADS", "1")
    assert read(plain).meta["torch_profiler"]["parser"] == "stream"


# ------------------------------------------------------------------------------------------------
# time sanity and devices not modeled, on a real trace edited here (the edit is the bad input)

TINY = ROOT / "fixtures" / "torch" / "tiny_sync.torch.json.gz"


def _edited(tmp_path, edit, name="edited.json"):
    doc = json.loads(gzip.decompress(TINY.read_bytes()))
    edit(doc)
    p = tmp_path / name
    p.write_text(json.dumps(doc, indent=1))
    return p


def _first(doc, cat):
    return next(e for e in doc["traceEvents"] if e.get("cat") == cat)


def test_negative_duration_is_dropped_and_counted(tmp_path):
    orig = read(TINY)
    p = _edited(tmp_path, lambda d: _first(d, "kernel").__setitem__("dur", -900000.0))
    t = read(p)
    assert len(t.kernels) == len(orig.kernels) - 1
    assert t.dropped_counts()["event with negative duration"] == 1
    assert (t.kernels["end_ns"] >= t.kernels["start_ns"]).all()


def test_one_huge_timestamp_does_not_switch_the_unit(tmp_path):
    orig = read(TINY)
    p = _edited(tmp_path, lambda d: _first(d, "cuda_runtime").__setitem__("ts", 4_567_021_018_119_081))
    t = read(p)
    assert t.meta["torch_profiler"]["ts_unit"] == "us"
    assert t.dropped_counts()["timestamp more than a year from the file's median"] == 1
    assert len(t.api_calls) == len(orig.api_calls) - 1
    assert set(t.api_calls["start_ns"]) < set(orig.api_calls["start_ns"])
    _assert_same_tables(orig, t, skip=("ranks", "api_calls", "dropped", "ranges"))


def test_large_base_never_wraps(tmp_path):
    # a base this close to the int64 limit puts every event past it: dropped and counted, never wrapped
    p = _edited(tmp_path, lambda d: d.__setitem__("baseTimeNanoseconds", 9_200_000_000_000_000_000))
    t = read(p)
    assert len(t.kernels) == 0 and len(t.api_calls) == 0
    assert t.dropped_counts()["time beyond the int64 nanosecond range"] > 0
    # and a file whose base is the usual epoch keeps every ns exact and positive
    assert (read(TINY).kernels["start_ns"] > 1_700_000_000_000_000_000).all()


def test_unmodeled_device_is_named(tmp_path):
    # the real trace with its GPU work relabelled as an MTIA device's (what MTIA traces carry)
    def to_mtia(doc):
        for e in doc["traceEvents"]:
            if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
                e["cat"] = "mtia_ccp_events"
            elif e.get("cat") in ("cuda_runtime", "cuda_driver"):
                e["cat"] = "mtia_runtime"

    p = _edited(tmp_path, to_mtia, name="mtia_like.json")
    orig = read(TINY)
    n = len(orig.kernels) + len(orig.memops) + len(orig.api_calls)
    t = read(p)
    assert len(t.kernels) == 0
    assert t.dropped_counts() == {"events of device type MTIA not analyzed (the trace has no CUDA/HIP kernels)": n}
    r = subprocess.run([sys.executable, "-m", "gpudoctor", "analyze", str(p)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{n} events of device type MTIA not analyzed (the trace has no CUDA/HIP kernels)" in " ".join(
        r.stdout.split())
