"""KV cache: the safe snapshot loader, the snapshot / Prometheus readers, annotation counters and the
kv_fragmentation analyzer, on the real H100 recordings of fixtures/workloads/cases.py ``case_kv``.

Fixtures (fixtures/README.md): 24 requests of random length 64..1024 (9801 tokens), either one
max-length (2048-token, 32 MiB) KV buffer each (kv_static: waste 0.8006) or a pool of 16-token blocks
(kv_paged: 10000 allocated slots, waste 0.0199). The truth JSONs hold the token counts; in production
they come from ``gpudoctor.annotate.kv_cache`` annotations, so the tests feed them through the same
path (an annotation text -> ``counters_from_ranges`` -> counters) and combine them with what the
allocator recorded.

Hand-made bad inputs in tests/data (not recordings):

- reduce_os_system_handmade.pickle: protocol 4, STACK_GLOBAL os.system + REDUCE("touch
  gpudoctor_pwned_reduce_handmade"): what ``pickle.dumps`` writes for an object whose ``__reduce__``
  returns ``(os.system, (...,))``;
- global_builtins_eval_handmade.pickle: protocol 2, GLOBAL builtins.eval + REDUCE of Python code that
  creates gpudoctor_pwned_eval_handmade;
- import_module_handmade.pickle: protocol 2, GLOBAL gpudoctor_pwned_module_handmade.MARKER: a plain
  unpickler imports that module (running its code, which the test writes to create
  gpudoctor_pwned_import_handmade) before looking up the name;
- snapshot_with_payload_handmade.pickle: a snapshot-shaped dict whose segment holds the os.system payload;
- truncated_snapshot_handmade.pickle: the first 6000 bytes of fixtures/kv/kv_static.snapshot.pickle;
- list_not_snapshot_handmade.pickle: ``pickle.dumps([1, 2, 3])``;
- vllm_metrics_handmade.prom: three scrapes of a vLLM V1 /metrics in vLLM's format (pool of 689
  16-token blocks like kv_paged, 209 / 419 / 625 blocks in use, 8 / 16 / 24 requests running);
- vllm_v0_metrics_handmade.prom: two concatenated scrapes with V0 names (gpu_cache_usage_perc), no times.
"""

from __future__ import annotations

import copyreg
import json
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpudoctor.analyzers import kv_fragmentation as kv
from gpudoctor.analyzers.config import Config
from gpudoctor.analyzers.runner import contexts
from gpudoctor.errors import InputError
from gpudoctor.model.counters_from_ranges import MALFORMED_REASON, counters_from_ranges, format_counter_text, parse_counter_text
from gpudoctor.model.trace import Trace, conform
from gpudoctor.readers import detect, nsys, prometheus, safe_pickle, snapshot
from gpudoctor.readers.inputs import read_input

ROOT = Path(__file__).resolve().parents[1]
KV = ROOT / "fixtures" / "kv"
NSYS = ROOT / "fixtures" / "nsys"
DATA = Path(__file__).resolve().parent / "data"

STATIC_SNAP = KV / "kv_static.snapshot.pickle"
PAGED_SNAP = KV / "kv_paged.snapshot.pickle"
STATIC_TRUTH = json.loads((KV / "kv_static.truth.json").read_text())
PAGED_TRUTH = json.loads((KV / "kv_paged.truth.json").read_text())

# --- Values of the recordings, read by hand (pickletools / sqlite3) ----------------------------------
KV_BUFFER_BYTES = 33554432  # 4 layers x 2 (K, V) x 8 heads x 2048 tokens x 128 x 2 bytes
STATIC_RESERVED = 826277888  # 24 x 32 MiB + one 20 MiB segment of randn temporaries (free, releasable)
STATIC_ALLOCATED = 805306368  # 24 x 32 MiB
STATIC_SNAPSHOT_NS = 1795431248200508000  # last allocator trace entry (time_us x 1000)
PAGED_POOL_BYTES = 180617216  # 689 blocks x 16 tokens x 16384 bytes
PAGED_RESERVED = 205520896  # 2 MiB small segment + 174 MiB pool segment + 20 MiB temporaries
PAGED_ALLOCATED = 180617728  # pool + one 512-byte block
PAGED_REQUESTED = 180617472  # the 512-byte block was asked for as 256 bytes
PAGED_FREE = 24903168
PAGED_INACTIVE_SPLIT = 3931648  # 512 + 2096128 (small segment) + 1835008 (tail of the pool segment)
PAGED_SNAPSHOT_NS = 1795431259683363000
NSYS_PAGED_POOL_SEGMENT = 182452224  # the pool's cudaMalloc: 180617216 rounded up to 2 MiB


# ---------------------------------------------------------------------------------------------------
# helpers


def annotation_counters(truth: dict, ts_ns: int, rank: int = 0, **extra) -> pd.DataFrame:
    """Counters of one kv_cache annotation carrying the truth's numbers, through counters_from_ranges."""
    import gpudoctor.annotate as ga

    text = ga.counter_text("kv_cache", used_tokens=truth["used_tokens"], allocated_tokens=truth["allocated_tokens"],
                           block_tokens=truth["block_tokens"], **extra)
    ranges = conform("ranges", {"rank": [rank], "start_ns": [ts_ns], "end_ns": [ts_ns + 1000], "text": [text],
                                "domain": [""]})
    rows = counters_from_ranges(ranges)
    assert rows.malformed == {}
    return rows.counters


def with_counters(trace: Trace, counters: pd.DataFrame) -> Trace:
    trace.set("counters", pd.concat([trace.counters, counters], ignore_index=True))
    return trace


def run_kv(trace: Trace, config=None) -> list:
    return kv.analyze(contexts(trace, config)[0])


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------------------------------------------
# safe_pickle: what real snapshots need, and that nothing else gets through


@pytest.mark.parametrize("path", [STATIC_SNAP, PAGED_SNAP])
def test_real_snapshots_hold_no_global_and_load_the_same(path):
    code_ops = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2",
                "EXT4", "PERSID", "BINPERSID", "NEXT_BUFFER", "READONLY_BUFFER"}
    data = path.read_bytes()
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert not ops & code_ops
    assert data[:2] == b"\x80\x04"
    assert safe_pickle.load(path) == pickle.loads(data)
    assert detect(path) == "pickle"


PAYLOADS = [
    ("reduce_os_system_handmade.pickle", "os.system", "gpudoctor_pwned_reduce_handmade"),
    ("global_builtins_eval_handmade.pickle", "builtins.eval", "gpudoctor_pwned_eval_handmade"),
    ("import_module_handmade.pickle", "gpudoctor_pwned_module_handmade.MARKER", "gpudoctor_pwned_import_handmade"),
    ("snapshot_with_payload_handmade.pickle", "os.system", "gpudoctor_pwned_nested_handmade"),
]
EVIL_MODULE = "open('gpudoctor_pwned_import_handmade', 'w').close()\nMARKER = 1\n"


@pytest.fixture
def evil_dir(tmp_path, monkeypatch):
    """A working directory where every payload would leave its file, with the module the import payload names."""
    (tmp_path / "gpudoctor_pwned_module_handmade.py").write_text(EVIL_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("gpudoctor_pwned_module_handmade", None)


@pytest.mark.parametrize("name,target,marker", PAYLOADS)
def test_payloads_are_live_under_plain_pickle(evil_dir, name, target, marker):
    """Control: the same bytes given to pickle.load (in a child process) do create the file."""
    code = f"import pickle; pickle.load(open({str(DATA / name)!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], cwd=evil_dir, env={"PYTHONPATH": str(evil_dir), "PATH": "/usr/bin:/bin"},
                   check=False, capture_output=True, timeout=60)
    assert (evil_dir / marker).exists()


@pytest.mark.parametrize("name,target,marker", PAYLOADS)
def test_payloads_are_refused_before_anything_runs(evil_dir, name, target, marker):
    for read in (snapshot.read, read_input, safe_pickle.load):
        with pytest.raises(InputError) as e:
            read(DATA / name)
        assert one_line(e.value) == (f"{DATA / name}: refused: the pickle asks to load {target}; "
                                     "snapshots hold only plain data")
    assert not (evil_dir / marker).exists()
    assert "gpudoctor_pwned_module_handmade" not in sys.modules
    assert list(evil_dir.iterdir()) == [evil_dir / "gpudoctor_pwned_module_handmade.py"]


@pytest.mark.parametrize("data,what", [
    (b"\x80\x04K\x01Q.", "persistent id 1"),  # BININT1 1, BINPERSID
    (b"\x80\x02(X\x01\x00\x00\x00xq\x00o.", None),  # OBJ with a non-class: no callable can be reached
])
def test_other_ways_to_reach_objects_are_refused(data, what):
    with pytest.raises(InputError) as e:
        safe_pickle.loads(data, "x.pickle")
    if what:
        assert f"refused: the pickle asks to load {what}" in one_line(e.value)


def test_extension_codes_are_refused_even_when_registered(evil_dir):
    data = b"\x80\x02\x82\xf0q\x00)R."  # EXT1 240, then call it with ()
    with pytest.raises(InputError, match="unregistered extension code"):
        safe_pickle.loads(data)
    copyreg.add_extension("os", "getcwd", 240)
    try:
        pickle.loads(b"\x80\x02\x82\xf0.")  # a plain unpickler puts os.getcwd into copyreg's cache
        with pytest.raises(InputError, match="refused: the pickle asks to load an object from copyreg"):
            safe_pickle.loads(data)
    finally:
        copyreg.remove_extension("os", "getcwd", 240)
        copyreg.clear_extension_cache()


def test_truncated_snapshot_is_one_line_error():
    path = DATA / "truncated_snapshot_handmade.pickle"
    assert detect(path) == "pickle"
    for read in (snapshot.read, read_input):
        with pytest.raises(InputError) as e:
            read(path)
        assert one_line(e.value) == f"{path}: truncated pickle (the file ends before the pickle does)"
    for cut in (1, 2, 100, len(STATIC_SNAP.read_bytes()) - 1):
        with pytest.raises(InputError, match="truncated pickle"):
            safe_pickle.loads(STATIC_SNAP.read_bytes()[:cut])


def test_not_a_snapshot():
    path = DATA / "list_not_snapshot_handmade.pickle"
    with pytest.raises(InputError) as e:
        read_input(path)
    assert one_line(e.value) == (f"{path}: not a CUDA memory snapshot: the pickle holds a list, expected the dict "
                                 "written by torch.cuda.memory._dump_snapshot")
    with pytest.raises(InputError, match="no 'segments'"):
        snapshot._as_snapshot({"a": 1}, "x")
    with pytest.raises(InputError, match="not a valid pickle"):
        safe_pickle.loads(b"this is text, not a pickle")
    with pytest.raises(InputError, match="empty file"):
        safe_pickle.loads(b"")


# ---------------------------------------------------------------------------------------------------
# snapshot reader on the real snapshots


def test_static_snapshot_reader():
    t = snapshot.read(STATIC_SNAP)
    s = t.meta["memory_snapshot"]
    assert s["time_ns"] == STATIC_SNAPSHOT_NS and s["rank"] == 0 and s["oom_events"] == 0
    assert s["allocator_settings"]["expandable_segments"] is False
    (d,) = s["devices"]
    assert d["device_id"] == 0
    assert d["reserved_bytes"] == STATIC_RESERVED
    assert d["allocated_bytes"] == d["active_bytes"] == d["requested_bytes"] == STATIC_ALLOCATED
    assert d["free_bytes"] == d["largest_free_block_bytes"] == d["releasable_bytes"] == 20971520
    assert d["inactive_split_bytes"] == 0 and d["free_fragmentation"] == 0.0
    assert d["segments"] == 25 and d["segments_by_type"] == {"large": 25} and d["blocks"] == 25
    assert d["live_allocations"] == 24
    assert d["live_allocation_sizes"] == [[KV_BUFFER_BYTES, 24]]
    assert d["live_allocation_histogram"]["<=32MiB"] == 24 and sum(d["live_allocation_histogram"].values()) == 24

    e = t.memory_events
    assert set(e["source"].astype(str)) == {"torch_snapshot"}
    assert e["kind"].astype(str).value_counts().to_dict() == {"alloc": 48, "segment_alloc": 25, "free": 24}
    blocks = e[e["kind"].astype(str).isin(["alloc", "free"])]
    segs = e[e["kind"].astype(str).str.startswith("segment")]
    assert blocks["bytes"].sum() == STATIC_ALLOCATED  # recording started before the first allocation
    assert segs["bytes"].sum() == STATIC_RESERVED
    assert (e["ts_ns"].diff().dropna() >= 0).all() and e["ts_ns"].max() == STATIC_SNAPSHOT_NS
    c = t.counters.set_index("name")["value"]
    assert set(t.counters["ts_ns"]) == {STATIC_SNAPSHOT_NS}
    assert c["memory_reserved_bytes"] == STATIC_RESERVED and c["memory_allocated_bytes"] == STATIC_ALLOCATED
    assert c["memory_inactive_split_bytes"] == 0 and c["memory_largest_free_block_bytes"] == 20971520
    assert t.ranks["source_format"].tolist() == ["torch_memory_snapshot"]
    assert t.devices["device_id"].tolist() == [0] and t.dropped.empty


def test_paged_snapshot_reader():
    t = read_input(PAGED_SNAP)
    (d,) = t.meta["memory_snapshot"]["devices"]
    assert t.meta["memory_snapshot"]["time_ns"] == PAGED_SNAPSHOT_NS
    assert d["reserved_bytes"] == PAGED_RESERVED
    assert d["allocated_bytes"] == PAGED_ALLOCATED and d["requested_bytes"] == PAGED_REQUESTED
    assert d["free_bytes"] == PAGED_FREE and d["inactive_split_bytes"] == PAGED_INACTIVE_SPLIT
    assert d["largest_free_block_bytes"] == 20971520 and d["releasable_bytes"] == 20971520
    assert d["free_fragmentation"] == pytest.approx(1 - 20971520 / PAGED_FREE, abs=1e-6)
    assert d["segments_by_type"] == {"small": 1, "large": 2}
    assert d["live_allocation_sizes"] == [[PAGED_POOL_BYTES, 1], [512, 1]]
    pool = t.meta["memory_snapshot"]["segments"][1]
    assert pool["total_size"] == NSYS_PAGED_POOL_SEGMENT and pool["segment_type"] == "large"
    assert pool["bytes_by_state"] == {"active_allocated": PAGED_POOL_BYTES, "inactive": 1835008}
    assert [sg["total_size"] for sg in t.meta["memory_snapshot"]["segments"]] == [2097152, NSYS_PAGED_POOL_SEGMENT,
                                                                                 20971520]
    assert PAGED_POOL_BYTES == PAGED_TRUTH["pool_tokens"] * PAGED_TRUTH["bytes_per_token"]
    e = t.memory_events
    assert e["kind"].astype(str).value_counts().to_dict() == {"alloc": 49, "free": 47, "segment_alloc": 3}
    assert e[e["kind"].astype(str).isin(["alloc", "free"])]["bytes"].sum() == 180617472


def test_snapshot_without_times_and_old_list_format(tmp_path):
    data = pickle.loads(STATIC_SNAP.read_bytes())
    for entry in data["device_traces"][0]:
        entry.pop("time_us")
    p = tmp_path / "old.rank3.pickle"
    p.write_bytes(pickle.dumps(data, protocol=2))
    t = snapshot.read(p)
    assert t.meta["memory_snapshot"]["time_ns"] is None and t.counters.empty and t.memory_events.empty
    assert t.dropped_counts() == {snapshot.R_NO_TIME: 97}  # 121 entries less 24 free_requested
    assert t.ranks["rank"].tolist() == [3]  # from the file name
    p2 = tmp_path / "segments.pickle"
    p2.write_bytes(pickle.dumps(data["segments"], protocol=4))
    assert snapshot.read(p2, rank=1).meta["memory_snapshot"]["devices"][0]["allocated_bytes"] == STATIC_ALLOCATED


def test_nsys_memory_events_show_the_same_static_pattern():
    t = nsys.read(NSYS / "kv_static.nsys.sqlite")
    e = t.memory_events
    assert set(e["source"].astype(str)) == {"nsys_cuda_memory"}
    big = e[e["bytes"] >= (1 << 20)]
    assert big["bytes"].value_counts().to_dict() == {KV_BUFFER_BYTES: 24, 20971520: 1}
    # both recordings are on UTC epoch: the first KV buffer is seen 28 us apart by nsys and the allocator
    snap = snapshot.read(STATIC_SNAP).memory_events
    assert abs(int(big["ts_ns"].min()) - int(snap["ts_ns"].min())) < 1_000_000


# ---------------------------------------------------------------------------------------------------
# counters_from_ranges


def test_parse_counter_text():
    assert parse_counter_text("gpudoctor.counter kv_cache used_tokens=9801 allocated_tokens=49152 block_tokens=1") == \
        ("kv_cache", {"used_tokens": 9801.0, "allocated_tokens": 49152.0, "block_tokens": 1.0}, -1)
    assert parse_counter_text("gpudoctor.counter q depth=2.5 device=1") == ("q", {"depth": 2.5}, 1)
    assert parse_counter_text("step_3") is None
    assert parse_counter_text("gpudoctor.counters x=1") is None
    for bad in ("gpudoctor.counter", "gpudoctor.counter kv_cache", "gpudoctor.counter used=1",
                "gpudoctor.counter kv used=abc", "gpudoctor.counter kv used", "gpudoctor.counter kv a=1 a=2",
                "gpudoctor.counter kv device=0.5 a=1", "gpudoctor.counter kv device=1", "gpudoctor.counter 9kv a=1"):
        with pytest.raises(ValueError):
            parse_counter_text(bad)
    assert format_counter_text("kv_cache", used_tokens=3, allocated_tokens=4.0) == \
        "gpudoctor.counter kv_cache used_tokens=3 allocated_tokens=4"


def test_counter_texts_agree_with_annotate():
    import gpudoctor.annotate as ga

    for values in ({"used_tokens": 9801, "allocated_tokens": 49152, "block_tokens": 1},
                   {"used_tokens": 12, "allocated_tokens": 16, "x.y": 0.25, "big": 1e20}):
        text = ga.counter_text("kv_cache", **values)
        name, vals, dev = parse_counter_text(text)
        assert (name, vals) == ga.parse_counter(text) and dev == -1


def test_counters_from_ranges():
    texts = ["gpudoctor.counter kv_cache used_tokens=10 allocated_tokens=16 block_tokens=16",
             "step_0",
             "gpudoctor.counter kv_cache used_tokens=oops allocated_tokens=16",
             "gpudoctor.counter kv_cache used_tokens=20 allocated_tokens=32 device=1",
             "gpudoctor.counter kv_cache used_tokens=10 allocated_tokens=16 block_tokens=16"]
    ranges = conform("ranges", {"rank": [0, 0, 1, 2, 2], "start_ns": [100, 150, 200, 300, 400],
                                "end_ns": [101, 160, 201, 301, 401], "text": texts})
    assert isinstance(ranges["text"].dtype, pd.CategoricalDtype)
    rows = counters_from_ranges(ranges)
    assert rows.malformed == {1: 1}
    c = rows.counters
    assert list(c.columns) == ["rank", "device_id", "ts_ns", "name", "value"]
    got = list(zip(c["rank"], c["device_id"], c["ts_ns"], c["name"].astype(str), c["value"]))
    assert got == [(0, -1, 100, "kv_cache.used_tokens", 10.0), (0, -1, 100, "kv_cache.allocated_tokens", 16.0),
                   (0, -1, 100, "kv_cache.block_tokens", 16.0), (2, 1, 300, "kv_cache.used_tokens", 20.0),
                   (2, 1, 300, "kv_cache.allocated_tokens", 32.0), (2, -1, 400, "kv_cache.used_tokens", 10.0),
                   (2, -1, 400, "kv_cache.allocated_tokens", 16.0), (2, -1, 400, "kv_cache.block_tokens", 16.0)]
    assert MALFORMED_REASON
    assert counters_from_ranges(conform("ranges", {})).counters.empty
    plain = pd.DataFrame({"rank": [0], "start_ns": [5], "text": ["gpudoctor.counter g v=1"]})  # text not categorical
    assert counters_from_ranges(plain).counters["name"].astype(str).tolist() == ["g.v"]


# ---------------------------------------------------------------------------------------------------
# kv_fragmentation on the real recordings


def test_static_waste_matches_truth():
    t = with_counters(snapshot.read(STATIC_SNAP), annotation_counters(STATIC_TRUTH, STATIC_SNAPSHOT_NS))
    (f,) = run_kv(t)
    m = f.metrics
    assert f.analyzer == "kv_fragmentation" and f.severity == "high"
    assert abs(m["waste_fraction"] - STATIC_TRUTH["waste_fraction"]) < 0.05
    assert m["waste_fraction"] == pytest.approx(0.800598, abs=1e-6)
    assert m["waste_source"] == "annotations"
    assert m["reservation_fraction"] == pytest.approx(m["waste_fraction"]) and m["internal_fragmentation_fraction"] == 0
    assert m["layout"] == m["pattern"] == "static_max_length"
    assert m["pattern_allocations"] == STATIC_TRUTH["requests"] and m["pattern_allocation_bytes"] == KV_BUFFER_BYTES
    assert m["max_len_tokens"] == STATIC_TRUTH["max_len"]
    assert m["bytes_per_token"] == STATIC_TRUTH["bytes_per_token"]
    assert m["wasted_tokens"] == 49152 - 9801 and m["wasted_bytes"] == (49152 - 9801) * 16384
    assert m["sequences"] == 24 and m["avg_sequence_tokens"] == pytest.approx(408.4, abs=0.05)
    assert m["extra_sequences"] == pytest.approx(96.4, abs=0.05)  # 39351 / (9801 / 24)
    assert m["reserved_bytes"] == STATIC_RESERVED and m["allocator_free_bytes"] == 20971520
    assert m["inactive_split_bytes"] == 0
    assert "paged KV cache" in f.recommendation and "96 more concurrent sequences" in f.recommendation
    assert "2048 slots" in f.recommendation and "FP8" in f.recommendation
    assert f.estimated_saving_ns == 0 and f.rank == 0
    json.dumps(f.to_dict())


def test_paged_waste_matches_truth_and_does_not_fire():
    t = with_counters(snapshot.read(PAGED_SNAP), annotation_counters(PAGED_TRUTH, PAGED_SNAPSHOT_NS))
    (f,) = run_kv(t)
    m = f.metrics
    assert abs(m["waste_fraction"] - PAGED_TRUTH["waste_fraction"]) < 0.05
    assert m["waste_fraction"] == pytest.approx(0.0199, abs=1e-6)
    assert f.severity not in ("medium", "high") and f.severity == "info"
    assert m["layout"] == m["pattern"] == "paged" and m["block_tokens"] == 16
    assert m["internal_fragmentation_fraction"] == pytest.approx(m["waste_fraction"]) and m["reservation_fraction"] == 0
    assert m["pattern_bytes"] == PAGED_POOL_BYTES
    assert m["inactive_split_bytes"] == PAGED_INACTIVE_SPLIT and m["allocator_rounding_bytes"] == 256
    assert "bytes_per_token" not in m  # the pool's token count is not in these three annotation keys
    assert f.recommendation.startswith("Nothing to do")


def test_paged_with_pool_size_gives_bytes_per_token():
    # requests and pool size as extra annotation keys (gpudoctor.annotate.kv_cache(..., **extra))
    c = annotation_counters(PAGED_TRUTH, PAGED_SNAPSHOT_NS, requests=PAGED_TRUTH["requests"],
                            pool_tokens=PAGED_TRUTH["pool_tokens"])
    (f,) = run_kv(with_counters(snapshot.read(PAGED_SNAP), c))
    m = f.metrics
    assert m["bytes_per_token"] == PAGED_TRUTH["bytes_per_token"]
    assert m["bytes_per_token_source"] == "allocator: pool bytes / pool tokens"
    assert m["sequences"] == 24 and m["sequences_source"] == "annotations"
    assert m["internal_fragmentation_fraction"] == pytest.approx(0.0199)  # 199 <= 24 x 15 slots of rounding
    assert m["pool_free_fraction"] == pytest.approx(1 - 10000 / 11024, abs=1e-6)
    assert m["wasted_bytes"] == 199 * 16384


def test_allocator_alone_reports_the_pattern_not_a_waste():
    (f,) = run_kv(snapshot.read(STATIC_SNAP))
    assert f.severity == "info" and "waste_fraction" not in f.metrics
    assert f.metrics["pattern"] == "static_max_length" and f.metrics["pattern_allocations"] == 24
    assert "gpudoctor.annotate.kv_cache" in f.recommendation
    (f,) = run_kv(snapshot.read(PAGED_SNAP))
    assert f.severity == "info" and f.metrics["pattern"] == "paged" and "waste_fraction" not in f.metrics


def test_nsys_memory_events_give_the_pattern():
    # The allocator view recognizes both layouts from Nsight Systems' CUDA memory events ...
    ctx = contexts(nsys.read(NSYS / "kv_static.nsys.sqlite"))[0]
    view = kv.allocator_view(ctx)
    assert view["source"] == "nsys_cuda_memory" and view["pattern"] == "static_max_length"
    assert view["allocations"] == 24 and view["allocation_bytes"] == KV_BUFFER_BYTES
    view = kv.allocator_view(contexts(nsys.read(NSYS / "kv_paged.nsys.sqlite"))[0])
    assert view["pattern"] == "paged" and view["pattern_bytes"] == NSYS_PAGED_POOL_SEGMENT
    # ... but without token counts a timeline alone says nothing: a training step's activations look the
    # same (real negative: the attention training step).
    assert run_kv(nsys.read(NSYS / "kv_static.nsys.sqlite")) == []
    assert run_kv(nsys.read(NSYS / "attn_naive.nsys.sqlite")) == []
    # with the annotation the nsys view gives the same waste and bytes per token as the snapshot
    t = nsys.read(NSYS / "kv_static.nsys.sqlite")
    (f,) = run_kv(with_counters(t, annotation_counters(STATIC_TRUTH, int(t.memory_events["ts_ns"].max()))))
    assert abs(f.metrics["waste_fraction"] - STATIC_TRUTH["waste_fraction"]) < 0.05 and f.severity == "high"
    assert f.metrics["bytes_per_token"] == STATIC_TRUTH["bytes_per_token"]


def test_annotations_left_in_ranges_are_read():
    """A reader that kept the kv_cache annotation as a range (not yet as counters) still gives the waste."""
    import gpudoctor.annotate as ga

    t = snapshot.read(STATIC_SNAP)
    text = ga.counter_text("kv_cache", used_tokens=9801, allocated_tokens=49152, block_tokens=1)
    t.set("ranges", {"rank": [0, 0], "start_ns": [STATIC_SNAPSHOT_NS, STATIC_SNAPSHOT_NS + 5],
                     "end_ns": [STATIC_SNAPSHOT_NS + 1, STATIC_SNAPSHOT_NS + 6],
                     "text": [text, "gpudoctor.counter kv_cache used_tokens=x"]})
    (f,) = run_kv(t)
    assert f.metrics["waste_fraction"] == pytest.approx(STATIC_TRUTH["waste_fraction"], abs=1e-6)
    assert f.evidence["examples"][0]["start_ns"] == STATIC_SNAPSHOT_NS


def test_waste_over_time_is_slot_weighted():
    rows = []
    for ts, used, alloc in ((1000, 100, 1000), (2000, 900, 1000), (3000, 1500, 2000)):
        rows.append(annotation_counters({"used_tokens": used, "allocated_tokens": alloc, "block_tokens": 1}, ts))
    t = Trace()
    t.set("counters", pd.concat(rows, ignore_index=True))
    (f,) = run_kv(t)
    m = f.metrics
    assert m["samples"] == 3 and m["waste_fraction"] == pytest.approx(1 - 2500 / 4000)
    assert m["waste_fraction_max"] == pytest.approx(0.9) and m["waste_fraction_last"] == pytest.approx(0.25)
    assert m["layout"] == "contiguous" and f.severity == "medium"
    assert [x["start_ns"] for x in f.evidence["examples"]] == [1000, 2000, 3000]


def test_config_bytes_per_token_and_thresholds():
    cfg = Config().update({"kv_fragmentation.bytes_per_token": 1000, "kv_fragmentation.waste_fraction_high": 0.9})
    t = Trace()
    t.set("counters", annotation_counters(STATIC_TRUTH, 10))
    (f,) = run_kv(t, cfg)
    assert f.metrics["bytes_per_token"] == 1000 and f.metrics["bytes_per_token_source"] == "config"
    assert f.severity == "medium"  # 0.80 is below the raised high threshold


def test_nothing_to_say_without_kv_inputs():
    assert run_kv(Trace()) == []
    assert run_kv(nsys.read(NSYS / "tiny_sync.nsys.sqlite")) == []


# ---------------------------------------------------------------------------------------------------
# Prometheus (vLLM)


def test_prometheus_reader_on_handmade_vllm_scrapes():
    path = DATA / "vllm_metrics_handmade.prom"
    assert detect(path) == "prometheus"
    t = read_input(path)
    c = t.counters
    assert (c["device_id"] == -1).all() and (c["rank"] == 0).all()
    series = {n: g.sort_values("ts_ns")[["ts_ns", "value"]].values.tolist()
              for n, g in c.groupby(c["name"].astype(str), observed=True)}
    ts = [1795431259500000000, 1795431260500000000, 1795431261500000000]
    assert [v for _, v in series["vllm.kv_cache_usage"]] == pytest.approx([209 / 689, 419 / 689, 625 / 689])
    assert [int(s) for s, _ in series["vllm.kv_cache_usage"]] == ts
    assert [v for _, v in series["vllm.num_requests_running"]] == [8, 16, 24]
    assert [v for _, v in series["vllm.num_requests_waiting"]] == [16, 8, 0]
    assert [v for _, v in series["vllm.block_size"]] == [16, 16, 16]
    assert [v for _, v in series["vllm.num_gpu_blocks"]] == [689, 689, 689]
    assert series["vllm.prompt_tokens_total"] == [[ts[0], 3200.0]]
    assert series["vllm.num_preemptions_total"] == [[ts[0], 0.0]]
    assert not [n for n in series if "time_to_first_token" in n or "created" in n or "python" in n]
    assert t.meta["prometheus"] == {"scrapes": 3, "timed": True}
    assert t.meta["vllm_cache_config"]["cache_dtype"] == "auto"
    assert t.meta["vllm_cache_config"]["num_gpu_blocks"] == "689"
    assert t.dropped_counts() == {prometheus.R_BAD_LINE: 1}
    assert t.ranks["source_format"].tolist() == ["prometheus_text"]


def test_prometheus_v0_names_and_concatenated_scrapes():
    path = DATA / "vllm_v0_metrics_handmade.prom"
    t = prometheus.read(path)
    c = t.counters
    usage = c[c["name"].astype(str) == "vllm.kv_cache_usage"].sort_values("ts_ns")
    assert usage["value"].tolist() == [0.25, 0.5]
    assert usage["ts_ns"].tolist() == [path.stat().st_mtime_ns, path.stat().st_mtime_ns + 1]
    assert t.ranks["clock_source"].tolist() == ["file modification time (scrape times unknown)"]
    assert t.meta["vllm_cache_config"]["cache_dtype"] == "fp8"


def test_parse_sample_and_engines():
    name, labels, value, ts = prometheus.parse_sample(
        'vllm:kv_cache_usage_perc{engine="0",model_name="a,\\"b\\"}\\\\c"} 0.5 1700000000123')
    assert (name, labels, value, ts) == ("vllm:kv_cache_usage_perc", {"engine": "0", "model_name": 'a,"b"}\\c'},
                                         0.5, 1700000000123000000)
    assert prometheus.parse_sample("up +Inf")[2] == float("inf")
    for bad in ("{x=1} 2", 'm{a="1" 2', "m", "m one"):
        with pytest.raises(ValueError):
            prometheus.parse_sample(bad)
    text = ("# scrape ts=2026-11-23T10:00:00Z\n"
            'vllm:cache_config_info{engine="0",block_size="16",num_gpu_blocks="100"} 1\n'
            'vllm:cache_config_info{engine="1",block_size="16",num_gpu_blocks="300"} 1\n'
            'vllm:kv_cache_usage_perc{engine="0"} 1.0\nvllm:kv_cache_usage_perc{engine="1"} 0.2\n'
            'vllm:num_requests_running{engine="0"} 3\nvllm:num_requests_running{engine="1"} 4\n')
    scrapes, bad = prometheus.parse_text(text)
    assert bad == {} and len(scrapes) == 1 and scrapes[0]["ts_ns"] == 1795428000 * 10**9
    rows, _, _ = prometheus._scrape_counters(scrapes[0]["samples"], scrapes[0]["ts_ns"])
    got = {n: v for _, n, v in rows}
    assert got["vllm.kv_cache_usage"] == pytest.approx((1.0 * 100 + 0.2 * 300) / 400)  # weighted by pool size
    assert got["vllm.num_requests_running"] == 7 and got["vllm.num_gpu_blocks"] == 400


def test_prometheus_bad_numbers_are_counted_not_fatal(tmp_path):
    """NaN / infinite values and times beyond int64 nanoseconds are counted drops; the rest is read."""
    p = tmp_path / "engine.prom"
    p.write_text("# scrape ts=1e300\n"
                 'vllm:kv_cache_usage_perc{engine="0"} 0.5\n'
                 "vllm:num_requests_running NaN\n"
                 "vllm:num_requests_waiting +Inf\n"
                 "vllm:num_requests_waiting 1e400\n"
                 "vllm:num_requests_waiting 3 " + "9" * 400 + "\n"
                 "vllm:num_requests_waiting 3 99999999999999999\n"
                 "# scrape ts=9999-12-31T00:00:00\n"
                 "vllm:kv_cache_usage_perc 0.25\n"
                 "not a sample at all {\n")
    t = read_input(p)
    assert t.dropped_counts() == {prometheus.R_NON_FINITE: 3, prometheus.R_BAD_TIME: 3, prometheus.R_BAD_LINE: 2}
    usage = t.counters[t.counters["name"].astype(str) == "vllm.kv_cache_usage"]
    assert usage["value"].tolist() == [0.5, 0.25]


def test_cli_prometheus_bad_numbers_exit_0(tmp_path, capsys):
    from gpudoctor.cli.main import main
    p = tmp_path / "engine.prom"
    p.write_text('vllm:kv_cache_usage_perc 0.5 ' + "9" * 400 + "\nvllm:kv_cache_usage_perc Inf\n"
                 "vllm:kv_cache_usage_perc 0.5\n")
    assert main(["analyze", str(p), "-q"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_prometheus_without_vllm_metrics_is_an_input_error(tmp_path):
    p = tmp_path / "dcgm.prom"
    p.write_text("# HELP DCGM_FI_DEV_GPU_UTIL util\n# TYPE DCGM_FI_DEV_GPU_UTIL gauge\nDCGM_FI_DEV_GPU_UTIL{gpu=\"0\"} 99\n")
    with pytest.raises(InputError) as e:
        read_input(p)
    assert "without any vllm: metric" in one_line(e.value)


def test_kv_fragmentation_from_vllm_metrics():
    (f,) = run_kv(prometheus.read(DATA / "vllm_metrics_handmade.prom"))
    m = f.metrics
    assert m["waste_source"] == "vllm_metrics_estimate" and m["layout"] == "paged"
    # half a 16-token block per running sequence over the slots of the blocks in use, summed over scrapes
    expected = (8 + 16 + 24) * 7.5 / ((209 + 419 + 625) * 16)
    assert m["waste_fraction"] == pytest.approx(expected, abs=1e-6)
    assert m["kv_cache_usage"] == pytest.approx(625 / 689, abs=1e-6) and m["num_gpu_blocks"] == 689
    assert m["pool_tokens"] == 11024 and m["sequences"] == 24
    assert f.severity == "info" and "(estimated)" in f.title
    # vLLM's pool size + a snapshot of the pool: bytes per token
    t = snapshot.read(PAGED_SNAP)
    v = prometheus.read(DATA / "vllm_metrics_handmade.prom")
    (f,) = run_kv(with_counters(t, v.counters))
    assert f.metrics["bytes_per_token"] == PAGED_TRUTH["bytes_per_token"]  # 180617216 B / (689 x 16) tokens
    assert f.metrics["bytes_per_token_source"] == "allocator: pool bytes / pool tokens"
    assert f.metrics["wasted_bytes"] == round(24 * 7.5) * 16384
    (f,) = run_kv(with_counters(with_counters(snapshot.read(PAGED_SNAP), v.counters),
                                annotation_counters(PAGED_TRUTH, PAGED_SNAPSHOT_NS)))
    assert f.metrics["waste_source"] == "annotations" and f.metrics["waste_fraction"] == pytest.approx(0.0199)
    assert f.metrics["bytes_per_token"] == PAGED_TRUTH["bytes_per_token"]


def test_handmade_inputs_are_marked():
    for p in DATA.iterdir():
        if p.suffix in (".pickle", ".prom"):
            assert "_handmade" in p.name
    assert np.all([(DATA / n).exists() for n, _, _ in PAYLOADS])
