"""The agent's Python stack sampler (collect/pysampler.py) and its reader (readers/pysamples.py).

A real CPU run under ``gpudoctor profile --backend torch``: the program's culprit (a pure-Python
function) runs inside a ``record_function`` range, so the trace holds the exact time it took; the
samples, mapped onto the trace's clock through the marker ranges, must charge the culprit's line that
time (+-15%), and lie inside the window.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpudoctor.readers import inputs, pysamples

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "tests" / "programs" / "host_culprit_cpu.py"

torch = pytest.importorskip("torch")


def culprit_line() -> int:
    for i, text in enumerate(PROGRAM.read_text().splitlines(), 1):
        if text.rstrip().endswith("# culprit: slow_host"):
            return i
    raise AssertionError("no culprit line")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pysamples") / "run"
    r = subprocess.run([sys.executable, "-m", "gpudoctor", "profile", "--backend", "torch", "--no-nvml",
                        "--stop-after-capture", "-o", str(out), "--", sys.executable, str(PROGRAM), "--steps", "400"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_samples_are_written_beside_the_trace(run_dir):
    raw = run_dir / "raw"
    doc = json.loads((raw / "trace.pysamples.json").read_text())
    assert doc["format"] == "gpudoctor.pysamples" and doc["method"] == "signal"
    assert len(doc["anchors"]) == 2 and len(doc["t_ns"]) == len(doc["stack"]) > 20
    status = json.loads((raw / "trace.torch-status.json").read_text())
    assert status["pysamples"]["samples"] == len(doc["t_ns"])
    assert pysamples.sibling(raw / "trace.torch.json.gz") == raw / "trace.pysamples.json"


def test_samples_charge_the_culprit_its_measured_time(run_dir):
    t = inputs.read_input(run_dir / "raw" / "trace.torch.json.gz")
    hs = t.host_stacks[t.host_stacks["source"].astype(str) == "python_sample"].sort_values("start_ns")
    assert len(hs) > 20
    marks = t.ranges[t.ranges["text"].astype(str) == pysamples.ANCHOR]
    ts = hs["start_ns"].to_numpy(np.int64)
    assert marks["start_ns"].min() <= ts[0] and ts[-1] <= marks["end_ns"].max()  # inside the window
    # which samples have the culprit line anywhere on their stack
    frames = t.frames.set_index("frame_id")
    stacks = t.stacks.set_index("stack_id")
    line = culprit_line()

    def has_culprit(sid: int) -> bool:
        while sid >= 0:
            f = frames.loc[stacks.at[sid, "frame_id"]]
            if str(f["file"]).endswith("host_culprit_cpu.py") and int(f["line"]) == line:
                return True
            sid = int(stacks.at[sid, "parent_id"])
        return False

    hit = np.array([has_culprit(int(s)) for s in hs["stack_id"]])
    # sample i stands for the middle of its intervals, [(t[i-1] + t[i]) / 2, (t[i] + t[i+1]) / 2], as the
    # analyzers take it: "since the last sample" would charge the culprit half an interval of the model's
    # time at each entry, more where a loaded machine delays the timer's signals
    mid = (ts[:-1] + ts[1:]) / 2
    charged_ns = float((mid[1:] - mid[:-1])[hit[1:-1]].sum())
    r = t.ranges[t.ranges["text"].astype(str) == "slow_host"]
    # the culprit's time over the same span the charged samples cover (ranges cut at its ends)
    measured_ns = float((np.minimum(r["end_ns"], mid[-1]) - np.maximum(r["start_ns"], mid[0])).clip(lower=0).sum())
    r = r[(r["end_ns"] > mid[0]) & (r["start_ns"] < mid[-1])]
    assert len(r) >= 5 and measured_ns > 0
    print(f"charged {charged_ns / 1e6:.2f} ms, measured {measured_ns / 1e6:.2f} ms in {len(r)} ranges")
    assert charged_ns == pytest.approx(measured_ns, rel=0.15)


def test_a_sample_file_alone_is_refused(run_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "gpudoctor", "analyze", str(run_dir / "raw" / "trace.pysamples.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "read with their report" in r.stderr


def test_samples_without_their_marker_are_counted_not_placed(run_dir, tmp_path):
    """The trace of another run (no marker ranges) with these samples beside it: counted in dropped."""
    t = inputs.read_input(run_dir / "raw" / "trace.torch.json.gz")
    n = len(json.loads((run_dir / "raw" / "trace.pysamples.json").read_text())["t_ns"])
    t.ranges = t.ranges[t.ranges["text"].astype(str) != pysamples.ANCHOR]
    t.host_stacks = t.host_stacks.iloc[0:0]
    pysamples.attach(t, run_dir / "raw" / "trace.pysamples.json")
    assert t.host_stacks.empty
    assert t.dropped_counts()["Python stack samples without their clock marker in the trace"] == n


def test_a_damaged_sample_file_is_a_one_line_error_and_its_report_is_analyzed(tmp_path):
    """The H200 item_sync recording with its sample file damaged: one line naming the sample file, exit 2,
    and the report analyzed all the same (its finding then names no line of code)."""
    raw = ROOT / "fixtures" / "pysamples" / "torch_item_sync" / "raw"
    d = tmp_path / "d"
    d.mkdir()
    (d / "trace.torch.json.gz").write_bytes((raw / "trace.torch.json.gz").read_bytes())
    cmd = [sys.executable, "-m", "gpudoctor", "analyze", str(d / "trace.torch.json.gz")]
    (d / "trace.pysamples.json").write_bytes((raw / "trace.pysamples.json").read_bytes())
    whole = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert whole.returncode == 0
    assert "culprits.py:62 in `step` blocks the GPU 1.51 ms per step" in " ".join(whole.stdout.split())
    (d / "trace.pysamples.json").write_text('{"format": "gpudoctor.pysamples", "t_ns": [1, 2], "stack": [5]}')
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"gpudoctor: error: {d / 'trace.pysamples.json'}: sample times and stacks differ in length"]
    printed = " ".join(r.stdout.split())
    assert "gpu_idle: GPU idle 20% of the steady-state window" in printed and "culprits.py" not in printed


def test_the_programs_own_alarm_is_left_alone(tmp_path):
    """A program that sets SIGALRM and an alarm of its own during the window keeps them: the sampler stops
    there, says so, and the next sampler uses a thread instead of the signal."""
    import signal
    import time

    from gpudoctor.collect.pysampler import PythonSampler

    old = signal.getsignal(signal.SIGALRM)
    fired: list[int] = []
    try:
        s = PythonSampler(str(tmp_path / "a.json"))
        s.start(None)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.05:
            sum(range(1000))
        signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        summary = s.stop(None)
        assert summary["method"] == "signal" and summary["samples"] >= 10
        assert "took over SIGALRM" in summary["notes"][0]
        time.sleep(0.4)
        assert fired == [1]  # the program's alarm still fired
        s2 = PythonSampler(str(tmp_path / "b.json"))
        s2.start(None)
        time.sleep(0.05)
        assert s2.stop(None)["method"] == "thread"
        assert json.loads((tmp_path / "b.json").read_text())["method"] == "thread"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, old)


def test_a_signal_inside_a_sample_is_skipped_and_ids_stay_whole(tmp_path):
    """On a loaded machine a second SIGALRM can be handled while a sample is being taken (Python runs
    handlers between any bytecodes). It is skipped and counted; frame and stack ids stay one per key, so
    the file reads back (before, such a run's file pointed at frames it did not have)."""
    import sys as _sys

    from gpudoctor.collect.pysampler import PythonSampler

    class Interrupted(PythonSampler):
        def _record(self, began, f):
            if len(self.t_ns) == 1:  # a signal lands inside the second sample
                self._on_signal(14, _sys._getframe())
            super()._record(began, f)

    s = Interrupted(str(tmp_path / "s.json"))
    for _ in range(3):
        s._on_signal(14, _sys._getframe())
    s.stop(None)
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["nested"] == 1 and len(doc["t_ns"]) == len(doc["stack"]) == 3
    ids = [fid for stack in doc["stacks"] for fid in stack]
    assert max(ids) == len(doc["frames"]) - 1 and sorted(set(ids)) == list(range(len(doc["frames"])))


def test_a_signal_inside_the_handler_is_charged_to_the_program_line(tmp_path, monkeypatch):
    """A signal handled inside the sampler's own handler (as on the H200 recompile run, whose deep compile
    stacks made samples slow) hands the handler's frame over: the sample goes to the program's line that
    the handler interrupted, not to pysampler.py."""
    import sys as _sys

    from gpudoctor.collect import pysampler

    s = pysampler.PythonSampler(str(tmp_path / "s.json"))
    inner: list = []
    real = pysampler.time.monotonic_ns

    def clock():  # called inside _on_signal: take its frame, as a second signal there would
        inner.append(_sys._getframe(1))
        return real()

    monkeypatch.setattr(pysampler.time, "monotonic_ns", clock)
    s._on_signal(14, _sys._getframe())
    monkeypatch.setattr(pysampler.time, "monotonic_ns", real)
    assert inner[0].f_code is pysampler.PythonSampler._on_signal.__code__
    s._record(real(), inner[0])
    s.stop(None)
    doc = json.loads((tmp_path / "s.json").read_text())
    innermost = [doc["frames"][stack[0]][2] for stack in (doc["stacks"][i] for i in doc["stack"])]
    assert innermost == ["test_a_signal_inside_the_handler_is_charged_to_the_program_line"] * 2


def test_a_sample_cut_between_its_two_lists_is_left_out(tmp_path):
    """A stop signal raised between a sample's stack and its time leaves the sample out whole, counted."""
    from gpudoctor.collect.pysampler import PythonSampler

    s = PythonSampler(str(tmp_path / "s.json"))
    s._on_signal(14, sys._getframe())
    s.stack.append(s.stack[0])  # the stack of a sample whose time was never written
    s.stop(None)
    doc = json.loads((tmp_path / "s.json").read_text())
    assert len(doc["t_ns"]) == len(doc["stack"]) == 1 and doc["cut"] == 1  # counted: the reader adds it to dropped


def test_native_blocking_calls_are_not_interrupted_by_the_sampler(tmp_path):
    """A C library's blocking read (no retry on EINTR, as in much native code) while the sampler's 1 kHz
    signal runs: the read is restarted and returns its byte, and the wait is still sampled."""
    import ctypes
    import os
    import threading
    import time

    from gpudoctor.collect.pysampler import PythonSampler

    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    s = PythonSampler(str(tmp_path / "s.json"))
    s.start(None)
    writer = threading.Thread(target=lambda: (time.sleep(0.1), os.write(w, b"x")), daemon=True)
    writer.start()
    buf = ctypes.create_string_buffer(1)
    n = libc.read(r, buf, 1)  # returned -1 (EINTR) before the sampler asked for restarted calls
    err = ctypes.get_errno()
    summary = s.stop(None)
    writer.join()
    os.close(r)
    os.close(w)
    assert (n, buf.raw) == (1, b"x"), os.strerror(err)
    assert summary["method"] == "signal" and summary["samples"] >= 1


def test_a_damaged_sample_file_is_named_on_the_parallel_path_too(tmp_path):
    """Eight rank files (the parallel path), rank 3's sample file damaged: one line names it, exit 2, and
    all eight ranks are analyzed, rank 3 without its samples."""
    raw = ROOT / "fixtures" / "pysamples" / "torch_item_sync" / "raw"
    trace, samples = (raw / "trace.torch.json.gz").read_bytes(), (raw / "trace.pysamples.json").read_bytes()
    for r in range(8):
        (tmp_path / f"trace.rank{r}.torch.json.gz").write_bytes(trace)
        (tmp_path / f"trace.rank{r}.pysamples.json").write_bytes(samples if r != 3 else b'{"format": "x"}')
    out = tmp_path / "a.json"
    r = subprocess.run([sys.executable, "-m", "gpudoctor", "analyze", str(tmp_path), "--workers", "2",
                        "--json", str(out), "-q"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"gpudoctor: error: {tmp_path / 'trace.rank3.pysamples.json'}: not a gpudoctor Python stack sample file"]
    doc = json.loads(out.read_text())
    assert sorted(x["rank"] for x in doc["ranks"]) == list(range(8))
    named = {f["rank"] for f in doc["findings"] if f["analyzer"] == "gpu_idle" and f["evidence"].get("frames")}
    assert named == set(range(8)) - {3}


def test_cut_and_overflowing_samples_are_counted_in_dropped(tmp_path):
    raw = ROOT / "fixtures" / "pysamples" / "torch_item_sync" / "raw"
    (tmp_path / "trace.torch.json.gz").write_bytes((raw / "trace.torch.json.gz").read_bytes())
    doc = json.loads((raw / "trace.pysamples.json").read_text())
    doc.update(cut=1, overflow=5)
    (tmp_path / "trace.pysamples.json").write_text(json.dumps(doc))
    t = inputs.read_input(tmp_path / "trace.torch.json.gz")
    d = t.dropped.set_index("reason")["count"]
    assert d["Python stack sample cut short by a signal that stopped the program"] == 1
    assert d["Python stack samples beyond the sampler's limit"] == 5
    assert (t.host_stacks["source"].astype(str) == "python_sample").sum() == len(doc["t_ns"])


def test_sample_file_errors_of_every_rank_survive_a_merge(tmp_path):
    """A run directory reads its ranks' reports and merges them: each rank's damaged sample file stays named
    (the merge kept only the first trace's list before)."""
    from gpudoctor.model.trace import SIDE_ERRORS, merge

    raw = ROOT / "fixtures" / "pysamples" / "torch_item_sync" / "raw"
    traces = []
    for r in (0, 1):
        (tmp_path / f"trace.rank{r}.torch.json.gz").write_bytes((raw / "trace.torch.json.gz").read_bytes())
        (tmp_path / f"trace.rank{r}.pysamples.json").write_text('{"format": "x"}')
        traces.append(inputs.read_input(tmp_path / f"trace.rank{r}.torch.json.gz", rank=r))
    merged = merge(traces)
    assert [e["path"] for e in inputs.pop_side_errors(merged)] == [
        str(tmp_path / "trace.rank0.pysamples.json"), str(tmp_path / "trace.rank1.pysamples.json")]
    assert SIDE_ERRORS not in merged.meta
