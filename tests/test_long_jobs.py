"""Long jobs under `gpudoctor profile --backend torch` on the CPU: the capture window closes after a few
steps, the findings come while the program runs, memory stays bounded, and Ctrl-C ends it within seconds
at any moment with what was collected kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpudoctor.collect.window import Window, WindowSpec

ROOT = Path(__file__).resolve().parent.parent
LONG = "tests/programs/long_train_cpu.py"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "SLURM", "OMPI_", "PMI"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GPUDOCTOR_PROFILE_PARENT")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(d.name))
            rss[int(d.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _wait_for(ready, proc: subprocess.Popen, log: Path, limit_s: float = 90) -> None:
    deadline = time.monotonic() + limit_s
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def _interrupt(proc: subprocess.Popen, timeout_s: float = 60) -> tuple[int, float]:
    """Ctrl-C: (exit code, seconds until it ended); the process is killed if it outlives the test."""
    proc.send_signal(signal.SIGINT)
    t = time.monotonic()
    try:
        return proc.wait(timeout=timeout_s), time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()


def _start(run: Path, *program_args: str, extra=()) -> tuple[subprocess.Popen, Path]:
    log = run.parent / f"{run.name}.log"
    f = open(log, "w")
    p = subprocess.Popen([sys.executable, "-m", "gpudoctor", "profile", "--backend", "torch", "--no-nvml", *extra,
                          "-o", str(run), "--", sys.executable, *program_args], cwd=ROOT, env=_env(), stdout=f,
                         stderr=subprocess.STDOUT)
    return p, log


@pytest.mark.slow
def test_two_minute_loop_findings_early_memory_bounded_ctrl_c(tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc, log = _start(run, LONG, "--seconds", "120")
    findings_s, peak, at_findings = None, 0, None
    try:
        while findings_s is None or time.monotonic() - t0 < findings_s + 15:
            assert proc.poll() is None, log.read_text()
            peak = max(peak, _tree_rss_bytes(proc.pid))
            if findings_s is None and (run / "analysis.json").exists():
                findings_s, at_findings = time.monotonic() - t0, peak
            assert time.monotonic() - t0 < 90, "no analysis within 90 s:\n" + log.read_text()
            time.sleep(0.25)
        rc, stop_s = _interrupt(proc)  # Ctrl-C while the program runs on, unprofiled
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert findings_s < 60, text  # the findings came while the program ran, not after 2 minutes
    assert "findings" in text and "capture window recorded" in text
    assert rc == 130 and stop_s < 10, (rc, stop_s, text)
    m = json.loads((run / "manifest.json").read_text())
    assert m["outcome"] == "interrupted" and m["analysis"]["status"] == "ok" and m["analysis"]["while_program_ran"]
    cap = m["capture"]
    assert cap["step_source"] == "optimizer" and cap["steps_recorded"] == WindowSpec.steps
    assert cap["skipped_steps"] >= WindowSpec.min_skip
    # Bounded: the memory of the whole process tree did not grow after the window (the profiler let go), and
    # the trace holds the window only.
    assert peak < at_findings * 1.2 + 50 * 2**20, (peak, at_findings)
    assert peak < 1.5 * 2**30
    assert (run / "raw/trace.torch.json.gz").stat().st_size < 5 * 2**20
    assert "step 200" in (run / "raw/program.stdout.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("when", ["startup", "warmup", "window"])
def test_ctrl_c_at_any_moment_ends_within_seconds_and_keeps_data(tmp_path, when):
    run = tmp_path / "run"
    extra = ("--skip", "0", "--duration", "600") if when == "window" else ("--skip", "100000")
    proc, log = _start(run, LONG, "--seconds", "300", extra=extra)
    try:
        if when == "startup":  # the program has just started: its interpreter is still importing torch
            deadline = time.monotonic() + 60
            while not (run / "manifest.json").exists():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        else:
            status = run / "raw/trace.torch-status.json"
            deadline = time.monotonic() + 90
            ready = (lambda: '"recording"' in _text(status)) if when == "window" else (lambda: "step 200" in _text(log))
            while not ready():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        t = time.monotonic()
        rc = proc.wait(timeout=60)
        assert time.monotonic() - t < 20, log.read_text()  # the export of what the window holds included
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 130, text
    if when == "startup":
        assert "Traceback" not in text, text
    m = json.loads((run / "manifest.json").read_text())
    assert m["outcome"] == "interrupted" and m["exit_code"] == 130
    if when == "window":  # what the open window recorded is kept and analyzed
        assert (run / "raw/trace.torch.json.gz").stat().st_size > 0 and m["analysis"]["status"] == "ok"
    else:
        assert m["analysis"]["status"] == "skipped"  # nothing was recorded yet, and the manifest says so


@pytest.mark.slow
def test_stop_after_capture_ends_the_program(tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc, log = _start(run, LONG, "--seconds", "300", "--exit-code", "0", extra=("--stop-after-capture",))
    try:
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 0 and time.monotonic() - t0 < 90, text
    assert "--stop-after-capture: ending the program" in text
    m = json.loads((run / "manifest.json").read_text())
    assert m["outcome"] == "stopped_after_capture" and m["analysis"]["status"] == "ok"
    assert m["program_exit_code"] == 130  # what the program itself returned, kept beside our 0
    assert "done after" not in text  # it did not run its 300 s


@pytest.mark.slow
def test_program_that_ignores_ctrl_c_is_still_ended(tmp_path):
    run = tmp_path / "run"
    code = ("import signal, time, torch\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "m = torch.nn.Linear(8, 8); opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
            "i = 0\nwhile True:\n    m(torch.ones(8)).sum().backward(); opt.step(); i += 1\n"
            "    if i % 100 == 0: print('step', i, flush=True)")
    proc, log = _start(run, "-c", code, extra=("--skip", "0", "--steps", "50"))
    try:
        _wait_for(lambda: "step 300" in log.read_text(), proc, log)
        rc, took = _interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert took < 25 and "sending SIGTERM" in text, (took, text)
    assert rc in (130, 143), text
    assert (run / "raw/trace.torch.json.gz").stat().st_size > 0  # the window's trace is kept


# ---------------------------------------------------------------------------------------------------
# The window's rules (pure)


def _feed(w: Window, source: str, durations_ms: list[float], t0: int = 0) -> list[tuple[int, str]]:
    t, acts = t0, []
    for i, d in enumerate(durations_ms):
        t += int(d * 1e6)
        a = w.boundary(source, t)
        if a and a != "step":
            acts.append((i, a))
    return acts


def test_window_skips_until_step_times_settle():
    w = Window(WindowSpec(steps=5), 0)
    acts = _feed(w, "optimizer", [5000, 900, 400, 120, 100, 101, 99, 100, 100, 100, 100, 100, 100, 100])
    # boundaries 0..3 are warm-up (compile, autotune): the last 3 step times agree only from boundary 6 on
    assert acts == [(6, "start"), (11, "stop")]
    s = w.summary()
    assert s["skipped_steps"] == 6 and s["steps_recorded"] == 5 and s["step_source"] == "optimizer"


def test_window_gives_up_waiting_for_settled_times():
    w = Window(WindowSpec(steps=3, max_skip=10), 0)
    noisy = [100 if i % 2 else 300 for i in range(30)]
    acts = _feed(w, "forward", noisy)
    assert acts[0] == (10, "start") and any("had not settled" in n for n in w.notes)


def test_stronger_step_source_wins():
    w = Window(WindowSpec(steps=3, skip=2), 0)
    assert _feed(w, "forward", [10, 10]) == []
    # an optimizer step appears: forward boundaries are ignored from now on, counting restarts
    acts = _feed(w, "optimizer", [30] * 8, t0=20_000_000)
    assert w.source == "optimizer" and acts == [(2, "start"), (5, "stop")]
    assert w.boundary("forward", 10**12) is None


def test_clock_window_when_no_steps():
    spec = WindowSpec(no_step_wait_s=2, time_window_s=3)
    w = Window(spec, 0)
    assert w.tick(int(1.9e9)) is None
    assert w.tick(int(2.0e9)) == "start" and w.source == "time"
    assert w.boundary("optimizer", int(2.5e9)) is None  # a time window runs to its end
    assert w.tick(int(4.9e9)) is None and w.tick(int(5.0e9)) == "stop"


def test_clock_waits_for_the_programs_first_gpu_use():
    w = Window(WindowSpec(no_step_wait_s=2, time_window_s=3), 0)
    w.wait_for_origin = True  # a GPU program still importing and building its model: no clock window yet
    assert w.tick(int(30e9)) is None
    w.origin_ns = int(31e9)  # it initialized CUDA
    assert w.tick(int(32.9e9)) is None and w.tick(int(33e9)) == "start"
    assert "first GPU use" in w.started_how
    never = Window(WindowSpec(no_step_wait_s=2, max_origin_wait_s=60), 0)
    never.wait_for_origin = True
    assert never.tick(int(59e9)) is None and never.tick(int(60e9)) == "start"


def test_explicit_skip_and_duration():
    w = Window(WindowSpec(skip=3, duration_s=1.0), 0)
    acts = _feed(w, "annotate", [200] * 20)
    assert acts == [(3, "start"), (8, "stop")]  # 5 steps of 0.2 s make the 1 s window


def test_whole_program_counts_steps_without_a_window():
    w = Window(WindowSpec(whole=True), 0)
    assert w.start_whole(0) == "start"
    assert [w.boundary("annotate", i * 10**6) for i in range(1, 4)] == ["step"] * 3
    assert w.boundary("forward", 5 * 10**6) is None
    assert w.finish(10**7, "program end") == "stop" and w.summary()["steps_recorded"] == 3


def test_exit_code_passes_through_a_closed_pipe(tmp_path):
    """`gpudoctor profile ... | head -1`: the program's exit code, not 1 from writing to the closed pipe."""
    p = subprocess.Popen([sys.executable, "-m", "gpudoctor", "profile", "--backend", "torch", "--no-nvml", "--whole",
                          "-o", str(tmp_path / "run"), "--", sys.executable, "tests/programs/train_cpu.py", "--steps",
                          "30", "--exit-code", "3"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()  # what `head -1` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 3, err
    assert first.startswith(b"step 0")
    m = json.loads((tmp_path / "run/manifest.json").read_text())
    assert m["exit_code"] == 3 and m["analysis"]["status"] == "ok"


@pytest.mark.slow
def test_killed_gpudoctor_never_leaves_the_program_running(tmp_path):
    """kill -9 of gpudoctor: the program gets SIGTERM (parent-death signal), writes what its open window
    holds, and the run directory's manifest (written at the start) says which run it was."""
    run = tmp_path / "run"
    proc, log = _start(run, LONG, "--seconds", "300", extra=("--skip", "0", "--duration", "600"))
    status = run / "raw/trace.torch-status.json"
    try:
        _wait_for(lambda: '"recording"' in _text(status), proc, log)
        time.sleep(0.5)
        agent_pid = json.loads(status.read_text())["pid"]
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{agent_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{agent_pid}").exists(), "the program outlived gpudoctor"
    finally:
        if proc.poll() is None:
            proc.kill()
    m = json.loads((run / "manifest.json").read_text())
    assert m["outcome"] == "running" and m["command"][-2:] == ["--seconds", "300"]
    st = json.loads(status.read_text())
    assert st["signal"] == "SIGTERM" and (run / "raw/trace.torch.json.gz").stat().st_size > 0
    # and the directory it left is analyzable: the trace it expected is found and read
    a = subprocess.run([sys.executable, "-m", "gpudoctor", "analyze", str(run), "--json", str(tmp_path / "a.json")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr
    assert json.loads((tmp_path / "a.json").read_text())["ranks"]


@pytest.mark.slow
def test_window_trace_carries_the_measured_step_times(tmp_path):
    """The torch trace of a window says how long steps took before it and inside it: the analyzers tell
    the profiler's own cost from a slow host with that (observer effect)."""
    run = tmp_path / "run"
    proc, log = _start(run, LONG, "--seconds", "120", extra=("--stop-after-capture",))
    assert proc.wait(timeout=120) == 0, log.read_text()
    from gpudoctor.readers import kineto

    meta = kineto.read(run / "raw/trace.torch.json.gz").meta["torch_profiler"]
    cap = json.loads((run / "manifest.json").read_text())["capture"]
    assert float(meta["unprofiled_step_ms"]) == cap["unprofiled_step_ms"] > 0
    assert float(meta["profiled_step_ms"]) == cap["profiled_step_ms"] > 0


@pytest.mark.slow
def test_force_refuses_a_run_still_being_written(tmp_path):
    run = tmp_path / "run"
    proc, log = _start(run, LONG, "--seconds", "300")
    try:
        _wait_for((run / "manifest.json").exists, proc, log)
        second = subprocess.run([sys.executable, "-m", "gpudoctor", "profile", "--backend", "torch", "--no-nvml",
                                 "--force", "-o", str(run), "--", sys.executable, "-c", "pass"], cwd=ROOT, env=_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "still being written" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr and proc.poll() is None  # the first run goes on, untouched
    finally:
        _interrupt(proc)
    assert json.loads((run / "manifest.json").read_text())["outcome"] == "interrupted"
