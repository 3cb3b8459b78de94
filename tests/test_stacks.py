"""Call stacks: the readers fill frames / stacks / host_stacks, and gpu_idle names the culprit line.

The culprit loops (fixtures/workloads/culprits.py) were recorded on an H200 with and without their
culprit line (fixtures/stacks/timings.jsonl): what the culprit costs per step is the difference of the
two mean step times, and the frame gpu_idle names must be the culprit's and be charged that cost +-20%.
"""

from __future__ import annotations

import ast
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from gpudoctor.analyzers.runner import run_all
from gpudoctor.model.stacks import is_library_file, stack_frames
from gpudoctor.readers import kineto
from gpudoctor.store import rundb

ROOT = Path(__file__).resolve().parent.parent
STACKS = ROOT / "fixtures" / "stacks"
CULPRITS = STACKS / "culprits.py"  # the workload as it was when the fixtures were recorded (line numbers)


def culprit_line(case: str) -> int:
    for i, text in enumerate(CULPRITS.read_text().splitlines(), 1):
        if text.rstrip().endswith(f"# culprit: {case}"):
            return i
    raise AssertionError(case)


def enclosing_function(line: int) -> tuple[str, int]:
    """(name, first line) of the innermost function of culprits.py that holds ``line``."""
    best = None
    for node in ast.walk(ast.parse(CULPRITS.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno <= line <= node.end_lineno:
            if best is None or node.lineno > best.lineno:
                best = node
    return best.name, best.lineno


def culprit_cost_ms(case: str) -> float:
    rows = [json.loads(x) for x in (STACKS / "timings.jsonl").read_text().splitlines() if x.strip()]
    with_c = [r["mean_step_ms"] for r in rows if r["case"] == case and not r["fixed"]]
    without = [r["mean_step_ms"] for r in rows if r["case"] == case and r["fixed"]]
    return statistics.mean(with_c) - statistics.mean(without)


def idle_finding(trace):
    (f,) = run_all(trace, only=["gpu_idle"])
    return f


_TRACES: dict = {}


def torch_trace(case: str):
    if case not in _TRACES:  # each trace is read once per session (a few seconds each)
        _TRACES[case] = kineto.read(STACKS / f"{case}.torch.json.gz")
    return _TRACES[case]


def frame_named(f, function: str) -> dict:
    hits = [x for x in f.evidence.get("frames", []) if x["function"] == function]
    assert hits, [(x["function"], x["line"]) for x in f.evidence.get("frames", [])]
    return hits[0]


def assert_is_culprit(frame: dict, case: str) -> None:
    """torch.profiler records calls, so the frame's line is the first line of the function that holds
    the culprit line."""
    name, first = enclosing_function(culprit_line(case))
    assert frame["file"].endswith("culprits.py")
    assert (frame["function"], frame["line"]) == (name, first)


# ------------------------------------------------------------------ reader and model
def test_with_stack_trace_fills_the_stack_tables():
    t = torch_trace("item_sync")
    assert len(t.frames) == 181 and len(t.stacks) == 342 and len(t.host_stacks) == 281_938
    assert t.frames["frame_id"].tolist() == list(range(len(t.frames)))
    # frames are interned: no (file, line, function) twice
    assert not t.frames.duplicated(["file", "line", "function"]).any()
    # a stack's parent is shallower by one
    st = t.stacks.set_index("stack_id")
    child = st[st["parent_id"] >= 0]
    assert (st.loc[child["parent_id"], "depth"].to_numpy() == child["depth"].to_numpy() - 1).all()
    # the .item() syncs: cudaStreamSynchronize called from Tensor.item called from step
    sf = stack_frames(t.stacks, t.frames)
    sync = t.api_calls[t.api_calls["name"].astype(str) == "cudaStreamSynchronize"]
    assert len(sync) >= 10 and (sync["stack_id"] >= 0).all()
    fn = t.frames["function"].astype(str).to_numpy()
    leaf = fn[sf["frame_id"].to_numpy()[sync["stack_id"].to_numpy()]]
    user = fn[sf["frame_id"].to_numpy()[sf["user_stack"].to_numpy()[sync["stack_id"].to_numpy()]]]
    assert set(leaf) == {"Tensor.item"} and set(user) == {"step"}
    assert t.dropped_counts() == {} or all("python_function" not in r for r in t.dropped_counts())


def test_stacks_survive_run_db(tmp_path):
    t = torch_trace("tiny_kernels")
    back = rundb.load(rundb.save(t, tmp_path / "run.db"), use_cache=False)
    for name in ("frames", "stacks", "host_stacks"):
        assert back.table(name).astype(str).equals(t.table(name).astype(str)), name
    assert (back.api_calls["stack_id"].to_numpy() == t.api_calls["stack_id"].to_numpy()).all()


def test_traces_without_stacks_have_none():
    t = kineto.read(ROOT / "fixtures" / "torch" / "tiny_sync.torch.json.gz")
    assert t.frames.empty and t.stacks.empty and t.host_stacks.empty
    assert (t.api_calls["stack_id"] == -1).all()
    f = idle_finding(t)
    assert "frames" not in f.evidence and "top_frame" not in f.metrics


def test_library_files():
    assert is_library_file("torch/nn/modules/module.py")
    assert is_library_file("/usr/lib/python3.12/threading.py")
    assert is_library_file("/opt/x/.venv/lib/python3.12/site-packages/numpy/core/fromnumeric.py")
    assert is_library_file("<frozen runpy>") and is_library_file("")
    assert is_library_file("/usr/bin/python3.12") and is_library_file("lib/libtorch_cuda.so")
    assert not is_library_file("culprits.py") and not is_library_file("/home/me/train/data.py")
    assert not is_library_file("mypkg/train.py")


# ------------------------------------------------------------------ gpu_idle names the culprit
def test_item_sync_names_the_item_call():
    f = idle_finding(torch_trace("item_sync"))
    top = f.evidence["frames"][0]
    assert_is_culprit(top, "item_sync")
    assert top["callee"] == "Tensor.item" and top["kind"] == "sync"
    assert f.metrics["top_frame"] == "culprits.py:59 in `step` -> `Tensor.item`"
    assert f.recommendation.startswith("culprits.py:59 in `step` -> `Tensor.item` blocks the GPU")
    # The gaps for the timeline: each frame lists its gaps (window-relative) and they lie in the window.
    assert 0 < len(top["gaps"]) <= 50 and all(0 <= g["start_us"] <= f.metrics["window_ns"] / 1e3 for g in top["gaps"])
    # Charged under torch.profiler: its Python tracer slows the host's Python work (here 25,000 generator
    # steps per step in the bookkeeping after the sync), so the charge is an upper bound of the culprit's
    # cost: at least what it costs without the profiler and at most the profiled step.
    cost = culprit_cost_ms(case="item_sync")
    assert cost == pytest.approx(2.166, abs=0.001)
    assert cost <= top["idle_ns_per_step"] / 1e6 <= f.metrics["window_ns"] / 10 / 1e6
    assert top["idle_ns_per_step"] / 1e6 == pytest.approx(11.63, abs=0.01)
    # ... and the finding says so: the tracer recorded the bookkeeping's generator steps in these gaps
    assert 20_000 < top["traced_python_calls_per_step"] < 30_000
    assert "Python tracer recorded" in f.recommendation.split(". Host syncs")[0]


def test_slow_preprocess_names_the_tokenizer():
    f = idle_finding(torch_trace("slow_preprocess"))
    top = f.evidence["frames"][0]
    assert_is_culprit(top, "slow_preprocess")
    assert top["callee"] == "ord" and top["kind"] == "host"
    # The gap ends with a small copy from pageable memory: the cause is the host work, not the copy.
    assert f.metrics["pageable_memcpy_fraction"] == 0 and f.metrics["host_gap_fraction"] > 0.8
    cost = culprit_cost_ms("slow_preprocess")
    assert cost <= top["idle_ns_per_step"] / 1e6 <= 2.5 * cost  # the tracer records 84,000 ord() calls a step


def test_dataloader0_names_getitem_and_the_main_process_loader():
    f = idle_finding(torch_trace("dataloader0"))
    top = f.evidence["frames"][0]
    assert_is_culprit(top, "dataloader0")
    assert top["context"] == "dataloader_main_process"
    assert "num_workers=0" in f.recommendation.split(". ")[0] or "num_workers>0" in f.recommendation
    # all of the loader's main-process work (getitem, collate, pin_memory) vs what num_workers=12 saves
    cost = culprit_cost_ms("dataloader0")
    assert top["dataloader_idle_ns_per_step"] / 1e6 == pytest.approx(cost, rel=0.2)


def test_tiny_kernels_names_the_ema_loop_as_launch_bound():
    f = idle_finding(torch_trace("tiny_kernels"))
    ema = frame_named(f, "update_ema")
    assert_is_culprit(ema, "tiny_kernels")
    assert ema["kind"] == "launch" and ema["kernels_per_step"] == 400 and ema["median_kernel_ns"] < 5000
    assert ema["callee"] in ("Tensor.add_", "Tensor.mul_")
    cost = culprit_cost_ms("tiny_kernels")
    # profiled: each of the 400 ops also records a CPU op and Python calls
    assert cost <= ema["idle_ns_per_step"] / 1e6 <= 1.5 * cost


def test_shape_change_names_the_step_that_replans():
    f = idle_finding(torch_trace("shape_change"))
    top = f.evidence["frames"][0]
    assert top["file"].endswith("culprits.py") and top["function"] == "step"
    assert enclosing_function(culprit_line("shape_change")) == ("step", top["line"])
    assert f.metrics["host_sync_fraction"] > 0.5


# ------------------------------------------------------------------ Nsight Systems: native backtraces
def test_nsys_backtraces_link_the_item_sync():
    """``--cudabacktrace=sync`` with CPU sampling: native stacks of the syncs (no Python frames: the
    export of nsys 2025.3.1 carried none, see the module docstring of readers/nsys_stacks.py)."""
    from gpudoctor.readers import nsys

    t = nsys.read(STACKS / "item_sync_stacks.nsys.sqlite")
    assert len(t.frames) == 199 and len(t.host_stacks) == 66
    assert set(t.host_stacks["source"].astype(str)) == {"nsys_cpu_sample"}
    # 108 Python samples and the 10 Python backtraces of the syncs: exported without their frames, counted
    assert t.dropped_counts()["nsys Python sample / backtrace without its frames (payload not exported)"] == 118
    linked = t.api_calls[t.api_calls["stack_id"] >= 0]
    assert len(linked) == 10 and set(linked["name"].astype(str)) == {"cudaStreamSynchronize"}
    f = idle_finding(t)
    top = f.evidence["frames"][0]
    assert top["kind"] == "sync" and top["function"].startswith("at::native::_local_scalar_dense_cuda")
    assert top["file"].endswith("libtorch_cuda.so") and top["line"] == -1
    # nsys barely slows the host: the charge is close to the culprit's cost (2.17 ms), 26% above it
    assert top["idle_ns_per_step"] / 1e6 == pytest.approx(2.738, abs=0.001)
    assert top["traced_python_calls_per_step"] == 0 and "Python tracer" not in f.recommendation
    assert top["idle_ns_per_step"] / 1e6 == pytest.approx(culprit_cost_ms("item_sync"), rel=0.3)


def test_nsys_names_cudnn_benchmark_and_runtime_compilation():
    from gpudoctor.readers import nsys

    f = idle_finding(nsys.read(STACKS / "shape_change_stacks.nsys.sqlite"))
    ctxs = {x["context"]: x for x in f.evidence["frames"]}
    assert ctxs["cudnn_benchmark"]["function"].startswith("std::vector<cudnn_frontend::ExecutionPlan_v8")
    assert ctxs["jit"]["function"] == "nvrtcCompileProgram"
    assert "cudnn.benchmark" in f.recommendation and "runtime compilation" in f.recommendation
    assert f.metrics["module_load_fraction"] > 0.5


# ------------------------------------------------------------------ bad input
def test_call_tree_with_a_cycle_is_an_error():
    from gpudoctor.model.stacks import build_stacks

    files = np.array(["a.py", "a.py"], dtype=object)
    with pytest.raises(ValueError, match="cycle"):
        build_stacks(0, files, np.array([1, 2]), np.array(["f", "g"], dtype=object), np.array([1, 0]))


def test_python_function_events_off_layout_are_counted(tmp_path):
    """A python_function event whose time is not a plain decimal is not taken; it is counted, the rest read."""
    good = {"ph": "X", "cat": "python_function", "name": "train.py(3): step", "pid": 1, "tid": 1, "ts": 10.5,
            "dur": 5.0, "args": {"Python parent id": None, "Python id": 1, "Ev Idx": 0}}
    odd = dict(good, name="train.py(9): log", ts="1e1", args={"Python parent id": 1, "Python id": 2, "Ev Idx": 1})
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": [good, odd], "baseTimeNanoseconds": 1_000_000_000}, indent=2))
    t = kineto.read(path)
    assert t.frames["function"].astype(str).tolist() == ["step"] and len(t.host_stacks) == 1
    assert t.host_stacks["start_ns"].tolist() == [1_000_010_500]
    assert t.dropped_counts()["python_function event not in Kineto's layout"] == 1
