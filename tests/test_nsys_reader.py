"""Tests of the Nsight Systems SQLite reader against a real H100 export and variants made from it.

Expected values below were read from the sample with sqlite3 by hand; the tests that can also compute
them with SQL do so. When the sample moves to a committed fixture, repoint SAMPLE and keep the values.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from gpudoctor.errors import InputError
from gpudoctor.readers import nsys, rank_from_filename
from gpudoctor.readers.nsys import read

SAMPLE = Path("/work/shared/samples/attention_h100.nsys.sqlite")

# --- Values of the sample (nsys 2025.3.2, export schema 3.20.3, one H100) --------------------------
SAMPLE_UTC_START_NS = 1795424261851772571  # TARGET_INFO_SESSION_START_TIME.utcEpochNs
SAMPLE_KERNELS = 24
SAMPLE_MEMSETS = 8
SAMPLE_API_CALLS = 2049  # rows of CUPTI_ACTIVITY_KIND_RUNTIME
SAMPLE_RUNTIME_CALLS = 132  # eventClass 0 (CUDA runtime)
SAMPLE_DRIVER_CALLS = 1917  # eventClass 1 (CUDA driver)
SAMPLE_NVTX_RANGES = 10  # 11 NVTX events, one of them the cuBLAS domain-create event
SAMPLE_PID = 901
SAMPLE_HOSTNAME = "vm"
SAMPLE_NSYS_VERSION = "2025.3.2.0"
SAMPLE_EXPORT_SCHEMA = "3.20.3"
SAMPLE_DEVICE_NAME = "NVIDIA H100 80GB HBM3"
SAMPLE_SM_COUNT = 132
SAMPLE_MEMORY_BYTES = 85017493504
SAMPLE_BANDWIDTH = 3352320000000.0
SAMPLE_CLOCK_HZ = 1980000000.0
SAMPLE_UUID = "f1ea6b44-4ac9-3f92-fc49-97fe9bca5306"
# The first nvjet GEMM: correlation id 1513, raw start/end in session nanoseconds.
NVJET_CORRELATION = 1513
NVJET_RAW_START, NVJET_RAW_END = 5593595267, 5593650756
# step0 launched 7 kernels (naive: 2 nvjet, 3 elementwise, softmax; sdpa: the cuDNN flash kernel) and memsets.
STEP0_KERNELS = 7
STEP0_GPU_START_RAW = 5593563714  # a memset launched just before the first nvjet
STEP0_GPU_END_RAW = 5761868424  # end of the cuDNN flash kernel
CATEGORY_OF = {
    "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "gemm",
    "softmax_warp_forward": "reduction",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0": "attention",
    "distribution_elementwise_grid_stride_kernel": "elementwise",
}
GLOBAL_PID = 281490092982272  # the sample's globalPid (pid 901)
GLOBAL_TID = 281490092983173  # the sample's main thread

needs_sample = pytest.mark.skipif(not SAMPLE.exists(), reason=f"sample export not found: {SAMPLE}")


@pytest.fixture(scope="module")
def trace():
    return read(SAMPLE)


@pytest.fixture()
def sample_db():
    con = sqlite3.connect(f"{SAMPLE.resolve().as_uri()}?mode=ro", uri=True)
    yield con
    con.close()


def copy_sample(tmp_path: Path, name: str = "copy.nsys.sqlite") -> Path:
    dst = tmp_path / name
    shutil.copyfile(SAMPLE, dst)  # copyfile: a writable copy (the sample itself is read-only)
    return dst


def _string_id(con: sqlite3.Connection, value: str) -> int:
    row = con.execute("SELECT id FROM StringIds WHERE value = ?", (value,)).fetchone()
    if row:
        return row[0]
    new = con.execute("SELECT max(id) + 1 FROM StringIds").fetchone()[0]
    con.execute("INSERT INTO StringIds (id, value) VALUES (?, ?)", (new, value))
    return new


# --- The sample -----------------------------------------------------------------------------------


@needs_sample
def test_counts(trace, sample_db):
    assert len(trace.kernels) == SAMPLE_KERNELS
    assert len(trace.kernels) == sample_db.execute("SELECT count(*) FROM CUPTI_ACTIVITY_KIND_KERNEL").fetchone()[0]
    assert len(trace.memops) == SAMPLE_MEMSETS
    assert set(trace.memops["kind"]) == {"memset"}
    assert len(trace.api_calls) == SAMPLE_API_CALLS
    assert (trace.api_calls["api"] == "runtime").sum() == SAMPLE_RUNTIME_CALLS
    assert (trace.api_calls["api"] == "driver").sum() == SAMPLE_DRIVER_CALLS
    assert len(trace.ranges) == SAMPLE_NVTX_RANGES
    assert trace.dropped_counts() == {}  # every kernel and memset has its launch; every range closed
    assert trace.collectives.empty and trace.counters.empty and trace.memory_events.empty


@needs_sample
def test_kernel_times_are_utc(trace, sample_db):
    k = trace.kernels[trace.kernels["correlation_id"] == NVJET_CORRELATION]
    assert len(k) == 1
    assert k["start_ns"].iloc[0] == NVJET_RAW_START + SAMPLE_UTC_START_NS
    assert k["end_ns"].iloc[0] == NVJET_RAW_END + SAMPLE_UTC_START_NS
    assert k["name"].iloc[0] == "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT"
    # All kernels, against SQL.
    raw = sample_db.execute("SELECT correlationId, start, end FROM CUPTI_ACTIVITY_KIND_KERNEL ORDER BY correlationId").fetchall()
    got = trace.kernels.sort_values("correlation_id")[["correlation_id", "start_ns", "end_ns"]].to_numpy()
    expected = np.array([(c, s + SAMPLE_UTC_START_NS, e + SAMPLE_UTC_START_NS) for c, s, e in raw], dtype=np.int64)
    np.testing.assert_array_equal(got, expected)


@needs_sample
def test_kernel_columns_against_sql(trace, sample_db):
    rows = sample_db.execute(
        "SELECT k.correlationId, s.value, d.value, gridX, gridY, gridZ, blockX, blockY, blockZ, registersPerThread, "
        "staticSharedMemory + dynamicSharedMemory, streamId, deviceId FROM CUPTI_ACTIVITY_KIND_KERNEL k "
        "JOIN StringIds s ON s.id = k.shortName JOIN StringIds d ON d.id = k.demangledName ORDER BY k.correlationId"
    ).fetchall()
    k = trace.kernels.sort_values("correlation_id")
    cols = ["correlation_id", "name", "demangled_name", "grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z",
            "registers_per_thread", "shared_memory_bytes", "stream_id", "device_id"]
    got = [tuple(r) for r in k[cols].astype(object).itertuples(index=False)]
    assert got == [tuple(r) for r in rows]
    assert (k["graph_id"] == -1).all()  # graphNodeId is NULL everywhere in the sample


@needs_sample
def test_devices(trace):
    d = trace.devices
    assert len(d) == 1
    row = d.iloc[0]
    assert row["device_id"] == 0
    assert row["name"] == SAMPLE_DEVICE_NAME
    assert row["sm_count"] == SAMPLE_SM_COUNT
    assert row["memory_bytes"] == SAMPLE_MEMORY_BYTES
    assert row["memory_bandwidth_bytes_per_s"] == SAMPLE_BANDWIDTH
    assert row["sm_clock_hz"] == SAMPLE_CLOCK_HZ
    assert row["compute_capability"] == "9.0"
    assert row["uuid"] == SAMPLE_UUID


@needs_sample
def test_rank_row_and_meta(trace):
    r = trace.ranks
    assert len(r) == 1
    row = r.iloc[0]
    assert row["rank"] == 0
    assert row["pid"] == SAMPLE_PID
    assert row["hostname"] == SAMPLE_HOSTNAME
    assert row["source_file"] == str(SAMPLE)
    assert row["source_format"] == "nsys_sqlite"
    assert row["clock_offset_ns"] == SAMPLE_UTC_START_NS
    assert row["clock_source"] == "TARGET_INFO_SESSION_START_TIME.utcEpochNs"
    assert trace.meta == {
        "inputs": [{"path": str(SAMPLE), "format": "nsys_sqlite", "rank": 0}],
        "nsys_version": SAMPLE_NSYS_VERSION,
        "export_schema": SAMPLE_EXPORT_SCHEMA,
        "driver_version": "580.159.04",
        "cuda_driver_version": "13.0",
    }
    for name, df in trace.tables():
        assert (df["rank"] == 0).all(), name


@needs_sample
def test_step0_projection_matches_sql(trace, sample_db):
    step0 = trace.ranges[trace.ranges["text"] == "step0"]
    assert len(step0) == 1
    s = step0.iloc[0]
    # GPU work (kernels and memsets) whose runtime/driver launch started inside step0 on its thread.
    sql = """
        WITH r AS (SELECT start, end, globalTid FROM NVTX_EVENTS WHERE text = 'step0'),
        launches AS (SELECT a.correlationId FROM CUPTI_ACTIVITY_KIND_RUNTIME a, r
                     WHERE a.globalTid = r.globalTid AND a.start >= r.start AND a.start <= r.end),
        ops AS (SELECT start, end, 1 AS k FROM CUPTI_ACTIVITY_KIND_KERNEL WHERE correlationId IN launches
                UNION ALL SELECT start, end, 0 FROM CUPTI_ACTIVITY_KIND_MEMSET WHERE correlationId IN launches)
        SELECT min(start), max(end), sum(k) FROM ops"""
    lo, hi, nk = sample_db.execute(sql).fetchone()
    assert (lo, hi, nk) == (STEP0_GPU_START_RAW, STEP0_GPU_END_RAW, STEP0_KERNELS)
    assert s["gpu_start_ns"] == lo + SAMPLE_UTC_START_NS
    assert s["gpu_end_ns"] == hi + SAMPLE_UTC_START_NS
    assert s["gpu_kernel_count"] == nk
    # gpu start of the kernels alone: the first nvjet
    kernel_lo = sample_db.execute(sql.replace("UNION ALL SELECT start, end, 0 FROM CUPTI_ACTIVITY_KIND_MEMSET "
                                              "WHERE correlationId IN launches", "")).fetchone()[0]
    assert kernel_lo == NVJET_RAW_START


@needs_sample
def test_range_depth_domain_and_text(trace):
    r = trace.ranges
    assert set(r.loc[r["text"] == "naive_attn", "depth"]) == {1}
    assert set(r.loc[r["text"] == "sdpa", "depth"]) == {1}
    assert set(r.loc[r["text"].isin(["step0", "step1", "step2"]), "depth"]) == {0}
    cublas = r[r["domain"] == "cuBLAS"]
    assert list(cublas["text"]) == ["cublasCreate_v2"]  # registered string (textId), in the cuBLAS domain
    assert list(cublas["depth"]) == [2]
    assert set(r.loc[r["domain"] != "cuBLAS", "domain"]) == {""}
    assert (r["thread_id"] == GLOBAL_TID).all()
    assert r.loc[r["text"] == "cublasCreate_v2", "gpu_start_ns"].iloc[0] == -1


@needs_sample
def test_categories(trace):
    k = trace.kernels
    for name, cat in CATEGORY_OF.items():
        assert set(k.loc[k["name"] == name, "category"]) == {cat}, name


@needs_sample
def test_api_names_lose_version_suffix(trace):
    names = set(trace.api_calls["name"].astype(str))
    assert {"cudaLaunchKernel", "cudaMalloc", "cuLaunchKernelEx", "cuGetProcAddress"} <= names
    assert not [n for n in names if re.search(r"_v\d+$", n)]
    launch = trace.api_calls[trace.api_calls["name"] == "cudaLaunchKernel"]
    assert set(launch["api"]) == {"runtime"} and len(launch) == 15
    assert set(trace.api_calls.loc[trace.api_calls["name"] == "cuLaunchKernelEx", "api"]) == {"driver"}


@needs_sample
def test_small_chunks_give_the_same_tables(trace, monkeypatch):
    monkeypatch.setattr(nsys, "CHUNK_ROWS", 7)
    again = read(SAMPLE)
    for name, df in trace.tables():
        assert df.astype(object).equals(again.table(name).astype(object)), name


# --- Rank resolution ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, rank", [
    ("rank0.nsys.sqlite", 0), ("trace_rank_3.sqlite", 3), ("rank-12.sqlite", 12), ("RANK5.sqlite", 5),
    ("prof.r3.sqlite", 3), ("node0_rank7_gpu.sqlite", 7), ("attention_h100.nsys.sqlite", None),
    ("frank3.sqlite", None), ("ranking1.sqlite", None), ("r1.sqlite", None), ("train.rank.4.json", 4),
])
def test_rank_from_filename(name, rank):
    assert rank_from_filename(name) == rank


@needs_sample
def test_rank_from_argument_file_name_and_environment(tmp_path):
    named = copy_sample(tmp_path, "job_rank3.nsys.sqlite")
    t = read(named)
    assert t.ranks["rank"].tolist() == [3] and set(t.kernels["rank"]) == {3}
    assert t.meta["inputs"][0]["rank"] == 3
    assert read(named, rank=6).ranks["rank"].tolist() == [6]
    con = sqlite3.connect(named)
    con.execute("UPDATE TARGET_INFO_SYSTEM_ENV SET value = value || ';RANK=5' WHERE name = 'DeviceEnvironment'")
    con.commit()
    con.close()
    assert read(named).ranks["rank"].tolist() == [5]  # the launcher's RANK beats the file name
    assert read(named, rank=2).ranks["rank"].tolist() == [2]  # the argument beats both


# --- Variants made from the sample: what the sample lacks ------------------------------------------


@pytest.fixture()
def rich(tmp_path):
    """The sample plus memcpys, NCCL NVTX ranges, GPU metrics, memory events and a few bad events."""
    path = copy_sample(tmp_path)
    con = sqlite3.connect(path)
    memcpy_api = _string_id(con, "cudaMemcpyAsync_v3020")
    con.executescript("""
        CREATE TABLE CUPTI_ACTIVITY_KIND_MEMCPY (start INTEGER NOT NULL, end INTEGER NOT NULL, deviceId INTEGER NOT NULL,
            contextId INTEGER NOT NULL, greenContextId INTEGER, streamId INTEGER NOT NULL, correlationId INTEGER,
            globalPid INTEGER, bytes INTEGER NOT NULL, copyKind INTEGER NOT NULL, deprecatedSrcId INTEGER, srcKind INTEGER,
            dstKind INTEGER, srcDeviceId INTEGER, srcContextId INTEGER, dstDeviceId INTEGER, dstContextId INTEGER,
            migrationCause INTEGER, graphNodeId INTEGER, virtualAddress INTEGER, copyCount INTEGER);
        CREATE TABLE GPU_METRICS (rawTimestamp INTEGER NOT NULL, timestamp INTEGER NOT NULL, typeId INTEGER NOT NULL,
            metricId INTEGER NOT NULL, value INTEGER NOT NULL);
        CREATE TABLE TARGET_INFO_GPU_METRICS (typeId INTEGER NOT NULL, sourceId INTEGER NOT NULL, typeName TEXT NOT NULL,
            metricId INTEGER NOT NULL, metricName TEXT NOT NULL);
        CREATE TABLE CUDA_GPU_MEMORY_USAGE_EVENTS (start INTEGER NOT NULL, globalPid INTEGER NOT NULL,
            deviceId INTEGER NOT NULL, contextId INTEGER NOT NULL, address INTEGER NOT NULL, pc INTEGER NOT NULL,
            bytes INTEGER NOT NULL, memKind INTEGER NOT NULL, memoryOperationType INTEGER NOT NULL, name TEXT,
            correlationId INTEGER, streamId INTEGER);
    """)
    copies = [  # start, end, corr, bytes, copyKind, srcKind, dstKind, srcDev, dstDev
        (5600000000, 5600001000, 900001, 4096, 1, 1, 2, None, None),  # HtoD from pinned
        (5600002000, 5600003000, 900002, 8192, 2, 2, 0, None, None),  # DtoH to pageable
        (5600004000, 5600005000, 900003, 65536, 8, 2, 2, 0, 1),  # DtoD across devices: peer; no launch record
    ]
    for s, e, corr, b, ck, sk, dk, sd, dd in copies:
        con.execute("INSERT INTO CUPTI_ACTIVITY_KIND_MEMCPY (start, end, deviceId, contextId, streamId, correlationId, "
                    "globalPid, bytes, copyKind, srcKind, dstKind, srcDeviceId, dstDeviceId) VALUES "
                    "(?, ?, 0, 1, 7, ?, ?, ?, ?, ?, ?, ?, ?)", (s, e, corr, GLOBAL_PID, b, ck, sk, dk, sd, dd))
    for corr, start in ((900001, 5599990000), (900002, 5599991000)):
        con.execute("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME (start, end, eventClass, globalTid, correlationId, nameId, "
                    "returnValue) VALUES (?, ?, 0, ?, ?, ?, 0)", (start, start + 500, GLOBAL_TID, corr, memcpy_api))
    # A kernel that ends before it starts (dropped) and one whose launch was not recorded (kept, counted).
    con.execute("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL SELECT start, start - 5, deviceId, contextId, greenContextId, "
                "streamId, 999998, globalPid, demangledName, shortName, mangledName, launchType, cacheConfig, "
                "registersPerThread, gridX, gridY, gridZ, blockX, blockY, blockZ, staticSharedMemory, dynamicSharedMemory, "
                "localMemoryPerThread, localMemoryTotal, gridId, sharedMemoryExecuted, graphNodeId, sharedMemoryLimitConfig "
                "FROM CUPTI_ACTIVITY_KIND_KERNEL WHERE correlationId = 1513")
    con.execute("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL SELECT start + 1000, end + 1000, deviceId, contextId, "
                "greenContextId, streamId, 999999, globalPid, demangledName, shortName, mangledName, launchType, "
                "cacheConfig, registersPerThread, gridX, gridY, gridZ, blockX, blockY, blockZ, staticSharedMemory, "
                "dynamicSharedMemory, localMemoryPerThread, localMemoryTotal, gridId, sharedMemoryExecuted, graphNodeId, "
                "sharedMemoryLimitConfig FROM CUPTI_ACTIVITY_KIND_KERNEL WHERE correlationId = 1513")
    # NVTX: a range never closed, a mark, the NCCL domain and three NCCL ranges (one with a JSON payload).
    all_reduce, all_gather = _string_id(con, "ncclAllReduce"), _string_id(con, "ncclAllGather")
    nvtx = [  # start, end, eventType, text, textId, domainId, jsonText
        (5770000000, None, 59, "unclosed", None, 0, None),
        (5770000100, None, 34, "a mark", None, 0, None),
        (5770000200, None, 75, "NCCL", None, 7, None),
        (5770001000, 5770002000, 59, None, all_reduce, 7, '{"Message size [bytes]": 1048576, "Reduction operation": "sum"}'),
        (5770003000, 5770004000, 59, None, all_gather, 7, None),
        (5770005000, 5770006000, 59, "ncclGroupStart", None, 7, None),
    ]
    for s, e, ty, text, tid, dom, js in nvtx:
        con.execute("INSERT INTO NVTX_EVENTS (start, end, eventType, text, globalTid, textId, domainId, jsonText) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (s, e, ty, text, GLOBAL_TID, tid, dom, js))
    type_id = 281479271677952  # as in a real H100 export (GPU 0)
    con.executemany("INSERT INTO TARGET_INFO_GPU_METRICS VALUES (?, ?, '', ?, ?)",
                    [(type_id, type_id, 0, "SMs Active [Throughput %]"), (type_id, type_id, 1, "DRAM Read Bandwidth [Throughput %]")])
    con.executemany("INSERT INTO GPU_METRICS VALUES (?, ?, ?, ?, ?)",
                    [(t, t, type_id, m, v) for t, m, v in [(100, 0, 10), (100, 1, 3), (200, 0, 90), (200, 1, 40), (-50, 0, 0)]])
    mem = [  # start, address, bytes, memKind, operation
        (5600000000, 0x7F0000000000, 1 << 20, 2, 0),  # device alloc
        (5600100000, 0x7F0000000000, 1 << 20, 2, 1),  # its free
        (5600200000, 0x200000000, 4096, 1, 0),  # pinned host memory: not GPU memory
        (5600300000, 0x7F0000100000, 512, 5, 0),  # static device memory
    ]
    con.executemany("INSERT INTO CUDA_GPU_MEMORY_USAGE_EVENTS (start, globalPid, deviceId, contextId, address, pc, bytes, "
                    "memKind, memoryOperationType) VALUES (?, ?, 0, 1, ?, 0, ?, ?, ?)",
                    [(s, GLOBAL_PID, a, b, k, o) for s, a, b, k, o in mem])
    con.commit()
    con.close()
    return path


@needs_sample
def test_rich_memops(rich):
    t = read(rich)
    m = t.memops.sort_values("start_ns")
    copies = m[m["kind"] != "memset"]
    assert list(copies["kind"]) == ["memcpy_htod", "memcpy_dtoh", "memcpy_peer"]
    assert list(copies["src_kind"]) == ["pinned", "device", "device"]
    assert list(copies["dst_kind"]) == ["device", "pageable", "device"]
    assert list(copies["bytes"]) == [4096, 8192, 65536]
    assert copies["start_ns"].iloc[0] == 5600000000 + SAMPLE_UTC_START_NS
    assert (m["kind"] == "memset").sum() == SAMPLE_MEMSETS


@needs_sample
def test_rich_dropped_accounting(rich):
    t = read(rich)
    assert len(t.kernels) == SAMPLE_KERNELS + 1  # the backwards kernel is dropped, the unlaunched one kept
    assert 999999 in set(t.kernels["correlation_id"]) and 999998 not in set(t.kernels["correlation_id"])
    assert t.dropped_counts() == {
        "gpu op with no launch record": 2,  # one kernel, one memcpy
        "kernel end before start": 1,
        "nvtx range never closed": 1,  # the mark is not a range and is not counted
        "host memory event (pageable/pinned), not GPU memory": 1,
    }
    assert set(t.dropped["source"]) >= {"nsys:CUPTI_ACTIVITY_KIND_KERNEL", "nsys:NVTX_EVENTS"}


@needs_sample
def test_rich_nccl_ranges_and_collectives(rich):
    t = read(rich)
    nccl = t.ranges[t.ranges["domain"] == "NCCL"]
    assert sorted(nccl["text"].astype(str)) == ["ncclAllGather", "ncclAllReduce", "ncclGroupStart"]
    assert "unclosed" not in set(t.ranges["text"]) and "a mark" not in set(t.ranges["text"])
    c = t.collectives.sort_values("start_ns")
    assert list(c["op"]) == ["all_reduce", "all_gather"]
    assert list(c["bytes"]) == [1048576, -1]
    assert set(c["source"]) == {"nvtx_nccl"}
    assert c["start_ns"].iloc[0] == 5770001000 + SAMPLE_UTC_START_NS


@needs_sample
def test_rich_counters_and_memory(rich):
    t = read(rich)
    c = t.counters.sort_values(["ts_ns", "name"])
    assert len(c) == 5
    assert set(c["device_id"]) == {0}
    sm = c[c["name"] == "SMs Active [Throughput %]"]
    assert list(sm["value"]) == [0.0, 10.0, 90.0]
    assert list(sm["ts_ns"]) == [SAMPLE_UTC_START_NS - 50, SAMPLE_UTC_START_NS + 100, SAMPLE_UTC_START_NS + 200]
    m = t.memory_events.sort_values("ts_ns")
    assert list(m["bytes"]) == [1 << 20, -(1 << 20), 512]
    assert list(m["kind"]) == ["alloc", "free", "alloc"]
    assert list(m["address"]) == [0x7F0000000000, 0x7F0000000000, 0x7F0000100000]
    assert set(m["source"]) == {"nsys_cuda_memory"}


@needs_sample
def test_collectives_from_nccl_kernel_names(tmp_path):
    path = copy_sample(tmp_path)
    con = sqlite3.connect(path)
    names = {"ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "all_reduce", "ncclKernel_AllGather_RING_LL_Sum_int8_t": "all_gather",
             "ncclDevKernel_SendRecv": "send_recv", "ncclDevKernel_ReduceScatter_Sum_f32_RING_SIMPLE": "reduce_scatter"}
    for i, name in enumerate(names):
        sid = _string_id(con, name)
        con.execute("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL SELECT start + ?, end + ?, deviceId, contextId, greenContextId, "
                    "streamId, correlationId, globalPid, ?, ?, mangledName, launchType, cacheConfig, registersPerThread, "
                    "gridX, gridY, gridZ, blockX, blockY, blockZ, staticSharedMemory, dynamicSharedMemory, "
                    "localMemoryPerThread, localMemoryTotal, gridId, sharedMemoryExecuted, graphNodeId, "
                    "sharedMemoryLimitConfig FROM CUPTI_ACTIVITY_KIND_KERNEL WHERE rowid = "
                    "(SELECT min(rowid) FROM CUPTI_ACTIVITY_KIND_KERNEL WHERE correlationId = 1513)",
                    (i * 100000000, i * 100000000, sid, sid))
    con.commit()
    con.close()
    t = read(path)
    c = t.collectives.sort_values("start_ns")
    assert list(c["op"]) == list(names.values())
    assert list(c["dtype"]) == ["bfloat16", "int8", "", "float32"]
    assert set(c["source"]) == {"kernel_name"} and set(c["bytes"]) == {-1}
    assert set(t.kernels.loc[t.kernels["name"].astype(str).str.startswith("nccl"), "category"]) == {"communication"}


@needs_sample
def test_device_ids_follow_the_process_view(tmp_path):
    """Two GPUs on the host; the process saw only the second, as its CUDA device 0 (CUDA_VISIBLE_DEVICES=1)."""
    path = copy_sample(tmp_path)
    con = sqlite3.connect(path)
    con.execute("INSERT INTO TARGET_INFO_GPU (vmId, id, name, smCount, totalMemory, uuid, cuDevice, computeMajor, "
                "computeMinor) VALUES (281474976710656, 1, 'Second GPU', 114, 1000, 'uuid-of-gpu-1', 1, 9, 0)")
    con.execute("DELETE FROM TARGET_INFO_CUDA_DEVICE")
    con.execute("INSERT INTO TARGET_INFO_CUDA_DEVICE (gpuId, cudaId, pid) VALUES (1, 0, ?)", (SAMPLE_PID,))
    con.execute("INSERT INTO TARGET_INFO_CUDA_DEVICE (gpuId, cudaId, pid) VALUES (0, 0, 12345)")  # another process
    con.commit()
    con.close()
    d = read(path).devices
    assert d[["device_id", "name", "sm_count", "uuid"]].values.tolist() == [[0, "Second GPU", 114, "uuid-of-gpu-1"]]


@needs_sample
def test_older_schema_without_optional_columns(tmp_path):
    """Columns that older nsys versions lack: greenContextId, graphNodeId, NVTX domainId/textId, eventClass."""
    path = tmp_path / "old.sqlite"
    drop = {
        "CUPTI_ACTIVITY_KIND_KERNEL": {"greenContextId", "graphNodeId", "sharedMemoryLimitConfig", "mangledName"},
        "CUPTI_ACTIVITY_KIND_MEMSET": {"greenContextId", "graphNodeId", "memKind"},
        "CUPTI_ACTIVITY_KIND_RUNTIME": {"eventClass", "callchainId"},
        "NVTX_EVENTS": {"domainId", "textId", "jsonTextId", "jsonText", "binaryData", "endGlobalTid"},
    }
    skip = {"TARGET_INFO_CUDA_DEVICE", "ENUM_NSYS_EVENT_CLASS"}
    con = sqlite3.connect(path)
    con.execute("ATTACH DATABASE ? AS s", (f"{SAMPLE.resolve().as_uri()}?mode=ro",))
    for (table,) in con.execute("SELECT name FROM s.sqlite_master WHERE type = 'table'").fetchall():
        if table in skip:
            continue
        cols = [r[1] for r in con.execute(f'PRAGMA s.table_info("{table}")') if r[1] not in drop.get(table, ())]
        con.execute(f'CREATE TABLE main."{table}" AS SELECT {", ".join(chr(34) + c + chr(34) for c in cols)} FROM s."{table}"')
    con.commit()
    con.execute("DETACH DATABASE s")
    con.close()
    t = read(path)
    assert len(t.kernels) == SAMPLE_KERNELS and (t.kernels["graph_id"] == -1).all()
    assert len(t.ranges) == SAMPLE_NVTX_RANGES
    assert set(t.ranges["domain"]) == {""}
    assert "" in set(t.ranges["text"])  # the cuBLAS range had only a registered-string id
    assert (t.api_calls["api"] == "runtime").sum() == SAMPLE_RUNTIME_CALLS  # told apart by name: cudaX vs cuX
    assert (t.api_calls["api"] == "driver").sum() == SAMPLE_DRIVER_CALLS
    assert t.devices["name"].tolist() == [SAMPLE_DEVICE_NAME]
    step0 = t.ranges[t.ranges["text"] == "step0"].iloc[0]
    assert step0["gpu_kernel_count"] == STEP0_KERNELS


@needs_sample
def test_export_without_kernel_table(tmp_path):
    path = copy_sample(tmp_path)
    con = sqlite3.connect(path)
    con.execute("DROP TABLE CUPTI_ACTIVITY_KIND_KERNEL")
    con.commit()
    con.close()
    t = read(path)
    assert t.kernels.empty and list(t.kernels.columns)[:3] == ["rank", "device_id", "stream_id"]
    assert len(t.memops) == SAMPLE_MEMSETS and len(t.ranges) == SAMPLE_NVTX_RANGES
    assert t.ranks["pid"].tolist() == [SAMPLE_PID]


# --- Bad inputs: one InputError, one line, naming the file ----------------------------------------


def _assert_input_error(path: Path, *words: str) -> InputError:
    with pytest.raises(InputError) as info:
        read(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    for w in words:
        assert w in msg, msg
    return info.value


def test_text_file_named_sqlite(tmp_path):
    p = tmp_path / "notes.sqlite"
    p.write_text("this is not a database\n")
    _assert_input_error(p, "not an SQLite file")


def test_empty_and_missing_files(tmp_path):
    p = tmp_path / "empty.sqlite"
    p.write_bytes(b"")
    _assert_input_error(p, "empty")
    _assert_input_error(tmp_path / "absent.sqlite", "no such file")


@needs_sample
def test_truncated_sample(tmp_path):
    p = tmp_path / "truncated.sqlite"
    p.write_bytes(SAMPLE.read_bytes()[:10 * 1024])
    _assert_input_error(p, "corrupt or truncated SQLite")


@needs_sample
def test_corrupted_pages(tmp_path):
    data = bytearray(SAMPLE.read_bytes())
    rng = np.random.default_rng(0)
    data[4096:] = rng.integers(0, 256, len(data) - 4096, dtype=np.uint8).tobytes()  # same size, pages garbage
    p = tmp_path / "garbage.sqlite"
    p.write_bytes(bytes(data))
    _assert_input_error(p, "corrupt or truncated SQLite")


def test_sqlite_from_another_program(tmp_path):
    p = tmp_path / "other.sqlite"
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE people (name TEXT, age INTEGER)")
    con.execute("INSERT INTO people VALUES ('ada', 36)")
    con.commit()
    con.close()
    _assert_input_error(p, "not an Nsight Systems export", "StringIds")


@needs_sample
def test_non_numeric_value_in_a_numeric_column(tmp_path):
    path = copy_sample(tmp_path)
    con = sqlite3.connect(path)
    con.execute("UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET gridX = 'lots' WHERE correlationId = 1513")
    con.commit()
    con.close()
    _assert_input_error(path, "CUPTI_ACTIVITY_KIND_KERNEL", "non-numeric")


@needs_sample
def test_read_only_open_leaves_file_untouched(tmp_path):
    path = copy_sample(tmp_path)
    path.chmod(0o444)
    before = path.read_bytes()
    read(path)
    assert path.read_bytes() == before
    assert not (tmp_path / (path.name + "-journal")).exists()


def test_threaded_chunk_fetch_equals_serial(monkeypatch):
    """Row chunks fetched on several threads (each with its own connection) give the same Trace, table by
    table, as one connection fetching them in order."""
    path = Path(__file__).resolve().parent.parent / "fixtures" / "nsys" / "attn_naive.nsys.sqlite"
    monkeypatch.setattr(nsys, "CHUNK_ROWS", 97)  # 12 chunks of kernels, dozens of runtime calls
    monkeypatch.setenv("GPUDOCTOR_READ_THREADS", "1")
    serial = read(path)
    monkeypatch.setenv("GPUDOCTOR_READ_THREADS", "3")
    threaded = read(path)
    assert len(serial.kernels) == 1089 and len(serial.api_calls) == 3862
    for name, df in serial.tables():
        other = getattr(threaded, name)
        assert df.shape == other.shape, name
        assert df.astype(str).equals(other.astype(str)), name
    assert serial.meta == threaded.meta


def test_read_threads_setting(monkeypatch):
    monkeypatch.setenv("GPUDOCTOR_READ_THREADS", "5")
    assert nsys.read_threads() == 5
    monkeypatch.setenv("GPUDOCTOR_READ_THREADS", "")
    assert 1 <= nsys.read_threads() <= nsys.MAX_READ_THREADS


# --- gzip-compressed exports -----------------------------------------------------------------------
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "nsys" / "tiny_sync.nsys.sqlite"


def test_a_gzipped_export_reads_as_the_plain_one(tmp_path):
    import gzip

    from gpudoctor.readers.inputs import read_input

    gz = tmp_path / "tiny_sync.nsys.sqlite.gz"
    gz.write_bytes(gzip.compress(FIXTURE.read_bytes()))
    plain, packed = read_input(FIXTURE), read_input(gz)
    assert len(packed.kernels) == len(plain.kernels) == 3585
    assert packed.kernels["start_ns"].equals(plain.kernels["start_ns"])
    assert packed.ranks["source_file"].tolist() == [str(gz)]  # named as given, not as the temporary file
    assert list(tmp_path.iterdir()) == [gz]


def test_a_truncated_gzipped_export_is_a_one_line_error(tmp_path):
    import gzip

    from gpudoctor.readers.inputs import read_input

    gz = tmp_path / "cut.sqlite.gz"
    data = gzip.compress(FIXTURE.read_bytes())
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt gzip"):
        read_input(gz)


def test_a_run_directory_reads_a_report_gzipped_since_the_run(tmp_path):
    import gzip
    import json

    from gpudoctor.readers.inputs import read_input

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "trace.sqlite.gz").write_bytes(gzip.compress(FIXTURE.read_bytes()))
    (tmp_path / "manifest.json").write_text(json.dumps({"outcome": "completed", "reports": [
        {"path": "raw/trace.sqlite", "format": "nsys_sqlite", "rank": 0}]}))
    assert len(read_input(tmp_path).kernels) == 3585
