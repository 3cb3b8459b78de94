"""`gpudoctor profile` end to end on CPU: the torch backend for real, nsys through a fake nsys, and the
pieces (rank detection, nsys discovery, command building, run directories, NVML samples)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpudoctor.collect import locate, nvml, ranks, rundir
from gpudoctor.collect import nsys as nsys_mod
from gpudoctor.collect.torch_backend import NotPython, parse_python_command
from gpudoctor.errors import GpudoctorError

ROOT = Path(__file__).resolve().parent.parent
TRAIN = "tests/programs/train_cpu.py"
FIXTURE_SQLITE = ROOT / "fixtures" / "nsys" / "tiny_sync.nsys.sqlite"


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ranks.RANK_ENV_VARS and not k.startswith(("TORCHELASTIC", "SLURM", "OMPI_", "PMI"))
           and k not in ("WORLD_SIZE", "LOCAL_RANK", locate.ENV_VAR, "GPUDOCTOR_PROFILE_PARENT")}
    env["PYTHONPATH"] = str(ROOT)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def profile(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpudoctor", "profile", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env or cli_env(), timeout=timeout)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def gd_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("gpudoctor:")]


@pytest.fixture
def fake_nsys(tmp_path) -> Path:
    """A folder holding a fake `nsys`: FAKE_NSYS_MODE ok | hang | noreport | export_fail | export_hang."""
    d = tmp_path / "fakebin"
    d.mkdir()
    script = d / "nsys"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""\
        import os, shutil, subprocess, sys, time
        mode = os.environ.get("FAKE_NSYS_MODE", "ok")
        args = sys.argv[1:]
        if args[:1] == ["--version"]:
            print("NVIDIA Nsight Systems version 2099.1.1-fake")
            sys.exit(0)
        if args[:1] == ["profile"]:
            i, out = 1, None
            while i < len(args) and args[i].startswith("-"):
                if args[i].startswith("--output="):
                    out = args[i].split("=", 1)[1]
                i += 2 if args[i] in ("-t", "-s", "-b", "-c", "-p", "-d", "-y", "-x", "-e", "-w", "-n") else 1
            log = os.environ.get("FAKE_NSYS_LOG")
            if log:
                with open(log, "a") as f:
                    f.write(" ".join(args[:i]) + "\\n")
            rc = subprocess.call(args[i:])
            open(out + ".qdstrm", "wb").write(b"qdstrm")
            if mode == "hang":
                time.sleep(3600)
            if mode != "noreport":
                shutil.copy({str(FIXTURE_SQLITE)!r}, out + ".nsys-rep")
                os.remove(out + ".qdstrm")
            sys.exit(rc)
        if args[:1] == ["export"]:
            out = [a.split("=", 1)[1] for a in args if a.startswith("--output=")][0]
            if mode == "export_hang":
                time.sleep(3600)
            if mode == "export_fail":
                print("error: fake export failure", file=sys.stderr)
                sys.exit(1)
            shutil.copy(args[-1], out)
            sys.exit(0)
        sys.exit(2)
        """))
    script.chmod(0o755)
    return d


def nsys_env(fake_dir: Path, **extra) -> dict:
    env = cli_env(**extra)
    env["PATH"] = f"{fake_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


# ---------------------------------------------------------------------------------------------------
# torch backend, for real (CPU)


def test_torch_backend_end_to_end(tmp_path):
    run = tmp_path / "run"
    p = profile("--backend", "torch", "--no-nvml", "--whole", "-o", str(run), "--", "python", TRAIN, "--steps", "6")
    assert p.returncode == 0, p.stderr
    assert "step 5 loss" in p.stdout  # the program's own output
    assert "findings" in p.stdout  # the analysis is printed
    m = manifest(run)
    for key in ("command", "cwd", "host", "start_utc", "end_utc", "exit_code", "signal", "outcome", "what_happened",
                "gpus", "driver_version", "cuda_driver_version", "versions", "backend", "backend_reason", "options",
                "reports", "files", "nvml", "analysis"):
        assert key in m, key
    assert m["command"] == ["python", TRAIN, "--steps", "6"]
    assert m["exit_code"] == 0 and m["signal"] is None and m["outcome"] == "completed"
    assert m["backend"] == "torch" and m["versions"]["torch"].startswith("2.")
    assert m["reports"] == [{"path": "raw/trace.torch.json.gz", "format": "kineto_json", "rank": 0}]
    assert m["capture"]["whole_program"] and m["capture"]["step_source"] == "annotate"
    assert m["capture"]["steps_seen"] == 6
    assert m["analysis"]["status"] == "ok"
    assert "step 5 loss" in (run / "raw/program.stdout.log").read_text()  # the program's output is kept
    for name in ("raw/trace.torch.json.gz", "run.db", "analysis.json"):
        assert (run / name).stat().st_size > 0, name
    doc = json.loads((run / "analysis.json").read_text())
    assert isinstance(doc["findings"], list) and doc["ranks"]
    # The trace is the profiler's Chrome trace (gzip), with the program's steps and annotations in it.
    import gzip

    events = json.load(gzip.open(run / "raw/trace.torch.json.gz"))["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"ProfilerStep#1", "ProfilerStep#5", "step_0", "forward", "backward"} <= names
    assert "gpudoctor.counter kv_cache used_tokens=10 allocated_tokens=64 block_tokens=16" in names
    from gpudoctor.store.rundb import load

    t = load(run / "run.db")
    assert len(t.ranges) > 0


def test_program_exit_code_is_kept(tmp_path):
    run = tmp_path / "run"
    p = profile("--backend", "torch", "--no-nvml", "--whole", "-o", str(run), "--", "python", TRAIN, "--steps", "2",
                "--exit-code", "3")
    assert p.returncode == 3, p.stderr
    m = manifest(run)
    assert m["exit_code"] == 3 and m["outcome"] == "failed" and "exited with 3" in m["what_happened"]
    assert (run / "raw/trace.torch.json.gz").exists() and (run / "analysis.json").exists()


def test_program_exception_traceback_is_the_programs(tmp_path):
    run = tmp_path / "run"
    p = profile("--backend", "torch", "--no-nvml", "--whole", "-o", str(run), "--", "python", TRAIN, "--steps", "4",
                "--raise-at", "1")
    assert p.returncode == 1
    tb = p.stderr[p.stderr.index("Traceback"):]
    assert "ValueError: boom at step 1" in tb
    assert "train_cpu.py" in tb and "gpudoctor/collect" not in tb and "runpy" not in tb
    m = manifest(run)
    assert m["exit_code"] == 1 and m["outcome"] == "failed"
    assert "the program raised ValueError" in m["notes"]
    assert (run / "raw/trace.torch.json.gz").exists() and m["analysis"]["status"] == "ok"


def _start_and_signal(args, sig, tmp_path, env=None, marker="step 2"):
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "gpudoctor", "profile", *args], cwd=ROOT, env=env or cli_env(),
                                stdout=f, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while marker not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    return rc, out.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_program_keeps_data(tmp_path, sig):
    run = tmp_path / "run"
    rc, text = _start_and_signal(["--backend", "torch", "--no-nvml", "--skip", "0", "-o", str(run), "--", "python",
                                  TRAIN, "--steps", "1000", "--sleep", "0.2"], sig, tmp_path)
    assert rc == 128 + sig, text
    m = manifest(run)
    assert m["outcome"] == "interrupted" and m["interrupted_by"] == signal.Signals(sig).name
    assert m["exit_code"] == 128 + sig and m["signal"] == signal.Signals(sig).name
    assert (run / "raw/trace.torch.json.gz").stat().st_size > 0
    assert m["analysis"]["status"] == "ok" and (run / "analysis.json").exists()
    assert "step 999" not in text


def test_torch_delay_window_follows_steps(tmp_path):
    run = tmp_path / "run"
    code = ("import time, torch, gpudoctor.annotate as ga\nga.step()\n"
            "for i in range(30):\n    torch.ones(8).sum()\n    time.sleep(0.1)\n    ga.step()")
    p = profile("--backend", "torch", "--no-nvml", "--delay", "1", "--duration", "1", "-o", str(run), "--",
                "python", "-c", code)
    assert p.returncode == 0, p.stderr
    cap = manifest(run)["capture"]
    assert cap["step_source"] == "annotate" and cap["started"].startswith("step boundary ")
    assert cap["start_ns"] - manifest(run)["program_start_ns"] >= 1e9  # --delay 1
    assert 0.9e9 <= cap["end_ns"] - cap["start_ns"] < 1.6e9 and cap["stopped"].startswith("after ")


def test_torch_clock_window_without_steps(tmp_path):
    run = tmp_path / "run"
    code = "import time, torch\nfor i in range(40):\n    torch.ones(64).sum()\n    time.sleep(0.1)"
    p = profile("--backend", "torch", "--no-nvml", "--delay", "1", "--duration", "1", "-o", str(run), "--",
                "python", "-c", code)
    assert p.returncode == 0, p.stderr
    cap = manifest(run)["capture"]
    assert cap["step_source"] == "time" and cap["started"].startswith("clock: no step boundary 1 s after the start")
    assert cap["stopped"].startswith("clock: ")
    assert 0.8e9 < cap["end_ns"] - cap["start_ns"] < 3e9


def test_program_calling_os_exit_keeps_trace(tmp_path):
    run = tmp_path / "run"
    code = "import os, torch; torch.ones(3).sum(); os._exit(7)"
    p = profile("--backend", "torch", "--no-nvml", "--whole", "-o", str(run), "--", "python", "-c", code)
    assert p.returncode == 7, p.stderr
    m = manifest(run)
    assert m["exit_code"] == 7 and (run / "raw/trace.torch.json.gz").exists()


def test_torch_backend_needs_a_python_program(tmp_path):
    p = profile("--backend", "torch", "--no-nvml", "-o", str(tmp_path / "run"), "--", "sh", "-c", "true")
    assert p.returncode == 2
    (line,) = gd_lines(p.stderr)
    assert line.startswith("gpudoctor: error: the torch backend runs a Python program") and "'sh'" in line
    assert "Traceback" not in p.stderr


def test_auto_without_nsys_uses_torch_and_says_why(tmp_path):
    run = tmp_path / "run"
    env = cli_env()
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if not (Path(d) / "nsys").exists())
    p = profile("--no-nvml", "-o", str(run), "--", "python", "-c", "print('hi')", env=env)
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in gd_lines(p.stderr) if "backend" in ln)
    assert "backend torch" in line and "Nsight Systems (nsys) not found" in line
    assert manifest(run)["backend"] == "torch"


# ---------------------------------------------------------------------------------------------------
# run directory problems: one line, exit 2, before the program starts


def test_existing_run_dir_needs_force(tmp_path, fake_nsys):
    run = tmp_path / "run"
    env = nsys_env(fake_nsys)
    assert profile("--no-nvml", "-o", str(run), "--", "true", env=env).returncode == 0
    marker = tmp_path / "ran"
    p = profile("--no-nvml", "-o", str(run), "--", "touch", str(marker), env=env)
    assert p.returncode == 2
    assert gd_lines(p.stderr) == [f"gpudoctor: error: {run}: a run directory is already there (use --force to "
                                  "replace it, or -o to choose another directory)"]
    assert not marker.exists()
    p = profile("--no-nvml", "--force", "-o", str(run), "--", "touch", str(marker), env=env)
    assert p.returncode == 0 and marker.exists()
    assert manifest(run)["command"] == ["touch", str(marker)]


def test_force_never_empties_a_foreign_directory(tmp_path, fake_nsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "precious.txt").write_text("keep")
    p = profile("--no-nvml", "--force", "-o", str(d), "--", "true", env=nsys_env(fake_nsys))
    assert p.returncode == 2 and "not a gpudoctor run directory" in p.stderr
    assert (d / "precious.txt").read_text() == "keep"


def test_unwritable_output_and_low_disk_fail_before_start(tmp_path, fake_nsys):
    marker = tmp_path / "ran"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    p = profile("--no-nvml", "-o", str(blocker / "run"), "--", "touch", str(marker), env=nsys_env(fake_nsys))
    assert p.returncode == 2 and "cannot create the run directory" in p.stderr and not marker.exists()
    assert len(gd_lines(p.stderr)) == 1 and "Traceback" not in p.stderr
    p = profile("--no-nvml", "-o", str(tmp_path / "run"), "--", "touch", str(marker),
                env=nsys_env(fake_nsys, GPUDOCTOR_MIN_FREE_MB=10**12))
    assert p.returncode == 2 and "MB free, profiling needs at least" in p.stderr and not marker.exists()


def test_missing_program_is_one_line(tmp_path, fake_nsys):
    p = profile("--no-nvml", "-o", str(tmp_path / "run"), "--", "no-such-program-xyz", env=nsys_env(fake_nsys))
    assert p.returncode == 127
    assert gd_lines(p.stderr) == ["gpudoctor: error: no-such-program-xyz: command not found"]


def test_prepare_checks_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(GpudoctorError, match="only 5 MB free"):
        rundir.prepare(tmp_path / "run", force=False)


# ---------------------------------------------------------------------------------------------------
# nsys backend through a fake nsys


def test_nsys_backend_fake_end_to_end(tmp_path, fake_nsys):
    run = tmp_path / "run"
    log = tmp_path / "nsys-args.txt"
    p = profile("--no-nvml", "-o", str(run), "--nsys-args", "-t cuda,nvtx,osrt", "--", "sh", "-c",
                "echo program-output; exit 4", env=nsys_env(fake_nsys, FAKE_NSYS_LOG=log))
    assert p.returncode == 4, p.stderr
    assert "program-output" in p.stdout and "findings" in p.stdout
    m = manifest(run)
    assert m["backend"] == "nsys" and "found on PATH" in m["backend_reason"]
    assert m["exit_code"] == 4 and m["outcome"] == "failed"
    assert m["tools"]["nsys"]["version"] == "NVIDIA Nsight Systems version 2099.1.1-fake"
    assert m["reports"] == [{"path": "raw/trace.sqlite", "format": "nsys_sqlite", "rank": 0}]
    kinds = {f["kind"] for f in m["files"]}
    assert {"nsys_rep", "nsys_sqlite", "program_status"} <= kinds
    args = log.read_text()
    assert "-t cuda,nvtx,osrt" in args and "--trace=" not in args  # the user's -t replaces the default
    # call stacks are on by default: CPU sampling replaces the --sample=none default
    assert "--sample=process-tree" in args and "--sample=none" not in args and "--cuda-memory-usage=true" in args
    assert "--cudabacktrace" not in args and "--python-sampling" not in args
    a = json.loads((run / "analysis.json").read_text())
    assert a["ranks"][0]["kernel_count"] > 0


def test_nsys_hang_at_exit_is_bounded(tmp_path, fake_nsys):
    run = tmp_path / "run"
    t = time.monotonic()
    p = profile("--no-nvml", "--nsys-timeout", "2", "-o", str(run), "--", "sh", "-c", "exit 0",
                env=nsys_env(fake_nsys, FAKE_NSYS_MODE="hang"))
    assert time.monotonic() - t < 60
    assert p.returncode == 0  # the program's
    assert "nsys has not finished 2 s after the program ended" in p.stderr and "Traceback" not in p.stderr
    m = manifest(run)
    assert (run / "raw/trace.qdstrm").exists()
    assert any("did not finish its report within 2 s" in x for x in m["problems"])
    assert any(f["path"] == "raw/trace.qdstrm" for f in m["files"])
    assert m["analysis"]["status"] == "skipped"


def test_nsys_export_failure_keeps_report(tmp_path, fake_nsys):
    run = tmp_path / "run"
    p = profile("--no-nvml", "-o", str(run), "--", "true", env=nsys_env(fake_nsys, FAKE_NSYS_MODE="export_fail"))
    assert p.returncode == 0
    m = manifest(run)
    assert (run / "raw/trace.nsys-rep").exists() and (run / "raw/trace.export.log").exists()
    assert any("nsys export failed (exit 1): error: fake export failure" in x for x in m["problems"])
    assert {"path": "raw/trace.nsys-rep", "format": "nsys_rep", "rank": 0} in m["reports"]
    assert "Traceback" not in p.stderr


def test_nsys_missing_is_one_line(tmp_path):
    env = cli_env()
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if not (Path(d) / "nsys").exists())
    p = profile("--backend", "nsys", "-o", str(tmp_path / "run"), "--", "true", env=env)
    assert p.returncode == 2
    (line,) = gd_lines(p.stderr)
    assert line.startswith("gpudoctor: error: Nsight Systems (nsys) not found")
    assert not (tmp_path / "run").exists()


def test_nsys_sigint_reaches_program(tmp_path, fake_nsys):
    run = tmp_path / "run"
    code = "import time\nfor i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.1)"
    rc, text = _start_and_signal(["--no-nvml", "-o", str(run), "--", sys.executable, "-c", code], signal.SIGINT,
                                 tmp_path, env=nsys_env(fake_nsys), marker="tick 3")
    assert rc == 130, text
    m = manifest(run)
    assert m["outcome"] == "interrupted" and m["exit_code"] == 130
    assert m["reports"][0]["format"] == "nsys_sqlite" and m["analysis"]["status"] == "ok"


# ---------------------------------------------------------------------------------------------------
# multi-rank


def test_ranks_write_one_run_dir(tmp_path, fake_nsys):
    """Two ranks as an external launcher starts them (RANK/WORLD_SIZE), sharing -o: per-rank files, one
    merged manifest, the last rank analyzes."""
    run = tmp_path / "run"
    procs = []
    for r in (0, 1):
        env = nsys_env(fake_nsys, RANK=r, WORLD_SIZE=2, LOCAL_RANK=r)
        procs.append(subprocess.Popen([sys.executable, "-m", "gpudoctor", "profile", "--no-nvml", "-o", str(run),
                                       "--", "sh", "-c", f"exit {r}"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 1], outs
    assert {"manifest.rank0.json", "manifest.rank1.json", "manifest.json", "run.db", "analysis.json"} <= {
        p.name for p in run.iterdir()}
    m = manifest(run)
    assert sorted((r["path"], r["rank"]) for r in m["reports"]) == [("raw/rank0.sqlite", 0), ("raw/rank1.sqlite", 1)]
    assert [(r["rank"], r["exit_code"]) for r in m["ranks"]] == [(0, 0), (1, 1)]
    assert m["exit_code"] == 1 and m["world_size"] == 2 and m["missing_ranks"] == []
    a = json.loads((run / "analysis.json").read_text())
    assert sorted(r["rank"] for r in a["ranks"]) == [0, 1]
    # The same rank again without --force: refused, the first run untouched.
    p = profile("--no-nvml", "-o", str(run), "--", "true", env=nsys_env(fake_nsys, RANK=1, WORLD_SIZE=2))
    assert p.returncode == 2 and "already holds rank 1's results" in p.stderr


def test_multi_rank_default_dir_needs_a_job_name(tmp_path, fake_nsys):
    p = profile("--no-nvml", "--", "true", env=nsys_env(fake_nsys, RANK=1, WORLD_SIZE=2))
    assert p.returncode == 2 and "pass the same -o DIR to every rank" in p.stderr


def test_nproc_launches_torchrun(tmp_path, fake_nsys):
    run = tmp_path / "run"
    p = profile("--nproc", "2", "--no-nvml", "-o", str(run), "--", "true", env=nsys_env(fake_nsys), timeout=600)
    assert p.returncode == 0, p.stderr
    m = manifest(run)
    assert m["launched_by"]["tool"] == "torchrun" and m["launched_by"]["nproc"] == 2
    assert sorted(r["rank"] for r in m["reports"]) == [0, 1]
    assert m["analysis"]["status"] == "ok"


# ---------------------------------------------------------------------------------------------------
# rank detection


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, (3, 8, 3, "RANK", "torchrun")),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "32", "SLURM_LOCALID": "1",
      "SLURM_STEP_ID": "0"}, (5, 16, 1, "SLURM_PROCID", "slurm")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     (2, 4, 0, "OMPI_COMM_WORLD_RANK", "openmpi")),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2, None, "PMI_RANK", "pmi")),
    # torchrun inside a Slurm allocation: RANK is the worker's rank, SLURM_PROCID the node's task
    ({"RANK": "7", "WORLD_SIZE": "8", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (7, 8, None, "RANK", "torchrun")),
])
def test_rank_detection(env, expected):
    info = ranks.detect_rank(env)
    assert (info.rank, info.world_size, info.local_rank, info.source, info.launcher) == expected
    assert ranks.is_multi_rank(info)


def test_no_rank():
    assert ranks.detect_rank({"RANK": "", "PATH": "/bin"}) is None
    # an sbatch script: SLURM_PROCID=0 and the allocation's task count, but no srun step
    assert ranks.detect_rank({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}) is None
    assert ranks.detect_rank({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "4294967294"}) is None
    assert not ranks.is_multi_rank(ranks.detect_rank({"RANK": "0", "WORLD_SIZE": "1"}))


def test_job_keys_agree_across_ranks():
    slurm = [{"SLURM_PROCID": str(r), "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}
             for r in (0, 1)]
    assert {ranks.job_key(e) for e in slurm} == {"slurm4242.0"}
    tr = [{"RANK": str(r), "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc123", "TORCHELASTIC_RESTART_COUNT": "0"}
          for r in (0, 1)]
    assert {ranks.job_key(e) for e in tr} == {"torchrun-abc123"}
    # torchrun's default run id "none" on one node: the launcher agent (our parent) names the job
    one_node = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}
    key = ranks.job_key(one_node)
    assert key and key.startswith("torchrun-") and key.endswith(str(os.getppid()))
    # ... but several nodes with run id "none" have no common name: -o is required
    assert ranks.job_key({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}) is None
    assert ranks.job_key({"OMPI_COMM_WORLD_RANK": "1", "PMIX_NAMESPACE": "prterun-host-123@1"}) == "mpi-prterun-host-123_1"
    assert rundir.default_run_dir("train", job_key="slurm4242.0") == Path("gpudoctor-runs/slurm4242.0-train")


# ---------------------------------------------------------------------------------------------------
# nsys discovery and commands


def _fake_exe(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho fake\n")
    path.chmod(0o755)
    return str(path)


def test_nsys_discovery_order(tmp_path, monkeypatch):
    std = tmp_path / "opt/nvidia/nsight-systems"
    old_std = _fake_exe(std / "2024.5.1/bin/nsys")
    new_std = _fake_exe(std / "2025.3.1/bin/nsys")
    ncu_copy = _fake_exe(tmp_path / "opt/nvidia/nsight-compute/2025.3.1/host/target-linux-x64/nsys")
    on_path = _fake_exe(tmp_path / "pathdir/nsys")
    explicit = _fake_exe(tmp_path / "explicit/nsys")
    monkeypatch.setattr(locate, "STANDARD_GLOBS", [str(std / "*/bin/nsys"), str(tmp_path / "cuda*/bin/nsys")])
    monkeypatch.setattr(locate, "NCU_COPY_GLOBS", [str(tmp_path / "opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys")])
    empty = str(tmp_path / "empty")
    env = {"PATH": f"{tmp_path / 'pathdir'}:{empty}", "GPUDOCTOR_NSYS": explicit}
    assert locate.find_nsys(env) == (on_path, "PATH")
    env["PATH"] = empty
    assert locate.find_nsys(env) == (explicit, "$GPUDOCTOR_NSYS")
    env["GPUDOCTOR_NSYS"] = str(tmp_path / "explicit")  # a folder holding nsys works too
    assert locate.find_nsys(env) == (explicit, "$GPUDOCTOR_NSYS")
    del env["GPUDOCTOR_NSYS"]
    assert locate.find_nsys(env) == (new_std, "standard folder")  # newest version first
    os.unlink(new_std)
    assert locate.find_nsys(env) == (old_std, "standard folder")
    os.unlink(old_std)
    assert locate.find_nsys(env) == (ncu_copy, "Nsight Compute copy")
    os.unlink(ncu_copy)
    assert locate.find_nsys(env) is None
    env["GPUDOCTOR_NSYS"] = str(tmp_path / "nope")
    assert "is not an executable" in locate.not_found_message(env)


def test_nsys_profile_command():
    cmd = nsys_mod.profile_command("/x/nsys", "/r/raw/trace", ["python", "t.py", "-t", "1"])
    assert cmd[:2] == ["/x/nsys", "profile"]
    assert cmd[2:7] == ["--trace=cuda,nvtx,cublas,cudnn", "--sample=none", "--cpuctxsw=none", "--backtrace=none",
                        "--cuda-memory-usage=true"]
    assert cmd[-6:] == ["--force-overwrite=true", "--output=/r/raw/trace", "python", "t.py", "-t", "1"]
    cmd = nsys_mod.profile_command("nsys", "b", ["p"], ["-s", "cpu", "--trace=cuda"], delay_s=2, duration_s=5,
                                   capture_range="step_3")
    assert "--sample=none" not in cmd and "--trace=cuda,nvtx,cublas,cudnn" not in cmd
    assert cmd[-4:] == ["-s", "cpu", "--trace=cuda", "p"]
    for opt in ("--delay=2", "--duration=5", "--capture-range=nvtx", "--nvtx-capture=step_3@*",
                "--capture-range-end=stop", "--kill=none"):
        assert opt in cmd
    assert "--nvtx-capture=step_3@mydomain" in nsys_mod.profile_command("nsys", "b", ["p"], capture_range="step_3@mydomain")
    assert nsys_mod.profile_env({}, "step_3") == {"NSYS_NVTX_PROFILER_REGISTER_ONLY": "0"}
    with pytest.raises(GpudoctorError, match="set by gpudoctor"):
        nsys_mod.split_user_args("-o /tmp/x")
    assert nsys_mod.split_user_args("--cuda-graph-trace=node -t 'cuda,nvtx'") == ["--cuda-graph-trace=node", "-t",
                                                                                  "cuda,nvtx"]


def test_user_nsys_args_replace_the_run_options_they_name():
    """--nsys-args='--sample=none -s none' turns off the CPU sampling that --stacks asks for: nsys gets one of each."""
    ours = nsys_mod.STACK_ARGS + ["--gpu-metrics-devices=all", "--capture-range=cudaProfilerApi"]
    args = nsys_mod.merge_args(ours, nsys_mod.split_user_args("-s none --cpuctxsw=none --cuda-graph-trace=node"))
    assert args == ["--gpu-metrics-devices=all", "--capture-range=cudaProfilerApi", "-s", "none", "--cpuctxsw=none",
                    "--cuda-graph-trace=node"]
    assert nsys_mod.merge_args(ours, []) == ours


def test_python_command_parsing():
    p = parse_python_command(["python3", "-u", "-X", "dev", "train.py", "--lr", "1"])
    assert (p.interpreter_options, p.mode, p.target, p.args, p.name) == (["-u", "-X", "dev"], "script", "train.py",
                                                                         ["--lr", "1"], "train")
    p = parse_python_command(["/venv/bin/python", "-m", "pkg.train", "-x"])
    assert (p.mode, p.target, p.args, p.name) == ("module", "pkg.train", ["-x"], "pkg.train")
    assert parse_python_command(["python3.11", "-c", "print(1)", "a"]).program_args() == ["-c", "print(1)", "a"]
    for bad in (["torchrun", "t.py"], ["python"], ["python", "-"], ["python", "-V"], ["bash", "-c", "python t.py"]):
        with pytest.raises(NotPython):
            parse_python_command(bad)


def test_validation_errors():
    for args, msg in ((["--nvtx-range", "x", "--", "true"], "add --kernels"),
                      (["--backend", "nvml", "--no-nvml", "--", "true"], "cannot go with --no-nvml"),
                      (["--backend", "torch", "--capture-range", "s", "--", "python", "t.py"], "Nsight Systems option"),
                      (["--"], "no program given")):
        p = profile(*args)
        assert p.returncode == 2 and msg in p.stderr and len(gd_lines(p.stderr)) == 1, (args, p.stderr)


# ---------------------------------------------------------------------------------------------------
# NVML samples


def test_nvml_unavailable_here_is_said_once(tmp_path, fake_nsys):
    if "error" not in nvml.device_info():
        pytest.skip("this machine has NVML")
    p = profile("-o", str(tmp_path / "run"), "--", "true", env=nsys_env(fake_nsys))
    assert p.returncode == 0
    said = [ln for ln in gd_lines(p.stderr) if "NVML" in ln]
    assert len(said) == 1 and "continuing" in said[0]
    assert "error" in manifest(tmp_path / "run")["nvml"]


def test_read_samples(tmp_path):
    csv = tmp_path / "nvml.csv"
    csv.write_text("ts_ns,device_id,gpu_util_pct,power_w,throttle_reasons\n"
                   "1000,0,50,300.5,0\n1000,1,,280,4\n2000,0,75,310,\n2000,1,10,2")  # last line cut short
    df = nvml.read_samples(csv, rank=3)
    assert list(df.columns) == ["rank", "device_id", "ts_ns", "name", "value"]
    assert (df["rank"] == 3).all()
    rows = set(zip(df["ts_ns"], df["device_id"], df["name"].astype(str), df["value"]))
    assert (1000, 0, "nvml.gpu_util_pct", 50.0) in rows and (1000, 1, "nvml.throttle_reasons", 4.0) in rows
    assert not any(r[1] == 1 and r[2] == "nvml.gpu_util_pct" and r[0] == 1000 for r in rows)  # empty cell
    assert df["ts_ns"].is_monotonic_increasing
    t = nvml.read_trace(csv, rank=1)
    assert len(t.ranks) == 0 and len(t.counters) == len(df) and t.meta["inputs"][0]["format"] == "nvml_csv"


class _FakeNvml:
    """Enough of pynvml for the sampler: two GPUs, no GPM, NVLink counters on GPU 1."""

    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = 138
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 139

    def __init__(self):
        self.calls = 0
        self.kib = 0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}aaaa"

    def nvmlDeviceGetUtilizationRates(self, h):
        self.calls += 1
        return type("U", (), {"gpu": 90 + h, "memory": 40})()

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"used": 2 << 30, "total": 80 << 30})()

    def nvmlDeviceGetPowerUsage(self, h):
        return 350000

    def nvmlDeviceGetClockInfo(self, h, c):
        return 1980

    def nvmlDeviceGetTemperature(self, h, t):
        return 55

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0

    def nvmlGpmQueryDeviceSupport(self, h):
        return type("S", (), {"isSupportedDevice": 0})()

    def nvmlDeviceGetFieldValues(self, h, ids):
        if h == 0:
            raise RuntimeError("not supported")
        self.kib += 1024
        return [type("F", (), {"nvmlReturn": 0, "value": type("V", (), {"ullVal": self.kib})()})() for _ in ids]


def test_sampler_with_fake_nvml(tmp_path, monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert nvml.visible_devices(fake, {"CUDA_VISIBLE_DEVICES": "1"}) == [(0, 1)]
    assert nvml.visible_devices(fake, {"CUDA_VISIBLE_DEVICES": "GPU-1"}) == [(0, 1)]
    assert nvml.visible_devices(fake, {"CUDA_VISIBLE_DEVICES": "1,0,7,0"}) == [(0, 1), (1, 0)]  # stops at 7
    path = tmp_path / "raw" / "nvml.csv"
    s = nvml.NvmlSampler(path, interval_s=0.02, env={})
    assert s.start(), s.error
    time.sleep(0.5)
    summary = s.stop()
    assert summary["samples"] >= 5 and summary["cpu_fraction"] is not None
    assert summary["metrics"] == ["gpu_util_pct", "mem_util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz",
                                  "temp_c", "throttle_reasons", "nvlink_tx_bytes_per_s", "nvlink_rx_bytes_per_s"]
    df = nvml.read_samples(path, rank=0)
    util = df[df["name"] == "nvml.gpu_util_pct"]
    assert set(util["device_id"]) == {0, 1} and set(util["value"]) == {90.0, 91.0}
    assert (df[df["name"] == "nvml.power_w"]["value"] == 350.0).all()
    link = df[df["name"] == "nvml.nvlink_tx_bytes_per_s"]
    assert set(link["device_id"]) == {1} and (link["value"] > 0).all()  # a rate from the counter's deltas


def test_sampler_without_nvml(tmp_path, monkeypatch):
    class Broken:
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", Broken())
    s = nvml.NvmlSampler(tmp_path / "n.csv")
    assert not s.start() and "NVML not available (NVML Shared Library Not Found)" in s.error
    assert "error" in nvml.device_info()


def test_run_dir_with_nvml_samples_is_analyzed(tmp_path):
    """A run directory whose reports include NVML samples: analysis, run.db with the nvml.* counters."""
    import shutil

    from gpudoctor.cli.profile import analyze_run_dir
    from gpudoctor.store.rundb import load

    run = tmp_path / "run"
    (run / "raw").mkdir(parents=True)
    shutil.copy(FIXTURE_SQLITE, run / "raw/trace.sqlite")
    (run / "raw/nvml.csv").write_text("ts_ns,device_id,gpu_util_pct\n1,0,10\n2,0,20\n")
    rundir.write_json(run / "manifest.json", {"reports": [
        {"path": "raw/trace.sqlite", "format": "nsys_sqlite", "rank": 0},
        {"path": "raw/nvml.csv", "format": "nvml_csv", "rank": 0}]})
    analysis = analyze_run_dir(run)
    assert analysis.ranks and (run / "analysis.json").exists()
    t = load(run / "run.db")
    util = t.counters[t.counters["name"].astype(str) == "nvml.gpu_util_pct"]
    assert list(util["value"]) == [10.0, 20.0]
    assert len(t.kernels) > 0


def test_nvml_only_run_dir_takes_its_gpu_from_the_manifest(tmp_path):
    """NVML samples alone carry no device table: the manifest's GPU list (what the profiler saw) fills it,
    so the summary and the gate's environment name the GPU."""
    from gpudoctor.pipeline import analyze_inputs
    from gpudoctor.render import jsonout

    run = tmp_path / "run"
    (run / "raw").mkdir(parents=True)
    (run / "raw/nvml.csv").write_text("ts_ns,device_id,gpu_util_pct\n1,0,10\n2,0,20\n")
    rundir.write_json(run / "manifest.json", {
        "driver_version": "580.159.04", "cuda_driver_version": "13.0",
        "gpus": [{"device_id": 0, "nvml_index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1",
                  "memory_bytes": 85520809984, "max_sm_clock_mhz": 1980}],
        "reports": [{"path": "raw/nvml.csv", "format": "nvml_csv", "rank": 0}]})
    a = analyze_inputs([str(run)])
    d = a.trace.devices
    assert d["name"].tolist() == ["NVIDIA H100 80GB HBM3"] and d["memory_bytes"].tolist() == [85520809984]
    assert d["sm_clock_hz"].tolist() == [1.98e9] and a.ranks[0].device == "NVIDIA H100 80GB HBM3"
    assert a.trace.meta["driver_version"] == "580.159.04"
    assert jsonout.to_json_dict(a)["gate"]["env"]["gpus"] == ["NVIDIA H100 80GB HBM3"]


def test_merge_manifests():
    per_rank = {
        0: {"rank": 0, "exit_code": 0, "outcome": "completed", "reports": [{"path": "raw/rank0.sqlite", "rank": 0}],
            "files": [], "start_ns": 10, "end_ns": 20, "what_happened": "ok", "host": {"hostname": "a"}},
        2: {"rank": 2, "exit_code": 137, "signal": "SIGKILL", "outcome": "killed", "reports": [], "files": [],
            "start_ns": 5, "end_ns": 30, "what_happened": "killed", "host": {"hostname": "b"}},
    }
    m = rundir.merge_manifests(per_rank, 3)
    assert m["exit_code"] == 137 and m["outcome"] == "killed" and m["missing_ranks"] == [1]
    assert (m["start_ns"], m["end_ns"]) == (5, 30) and [r["host"] for r in m["ranks"]] == ["a", "b"]
    assert "rank" not in m and m["world_size"] == 3


@pytest.mark.parametrize("mode", ["ok", "export_fail"])
def test_analyze_nsys_rep_through_nsys_export(tmp_path, fake_nsys, mode):
    """`gpudoctor analyze X.nsys-rep` exports it with the nsys it finds (the same export step as profile):
    the fixture's kernels when it works; one line naming the file and the reason, exit 2, when it fails."""
    rep = tmp_path / "trace.nsys-rep"
    rep.write_bytes(FIXTURE_SQLITE.read_bytes())  # the fake nsys "exports" by copying
    out = tmp_path / "a.json"
    p = subprocess.run([sys.executable, "-m", "gpudoctor", "analyze", "-q", "--json", str(out), str(rep)],
                       capture_output=True, text=True, env=nsys_env(fake_nsys, FAKE_NSYS_MODE=mode), timeout=300)
    if mode == "ok":
        assert p.returncode == 0, p.stderr
        a = json.loads(out.read_text())
        from gpudoctor.readers import nsys as nsys_reader

        assert a["inputs"][0]["path"] == str(rep)
        assert a["ranks"][0]["kernel_count"] == len(nsys_reader.read(FIXTURE_SQLITE).kernels) == 3585
    else:
        assert p.returncode == 2 and "Traceback" not in p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and str(rep) in lines[0]
        assert "nsys export failed (exit 1): error: fake export failure" in lines[0]


def test_bare_launch_timing_reads_the_child_and_fails_in_one_line(tmp_path):
    from gpudoctor.collect import launch_timing

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "some import noise"\necho \'{"launch_ns": 7042, "batches_ns": [7100, 7042, 7001, 7300, 6990]}\'\n')
    fake.chmod(0o755)
    got = launch_timing.time_in_bare_process(str(fake), dict(os.environ))
    assert (got["launch_ns"], got["batches_ns"]) == (7042, [7100, 7042, 7001, 7300, 6990]) and got["seconds"] < 10
    fake.write_text('#!/bin/sh\necho \'{"error": "torch sees no CUDA device"}\'\n')
    assert launch_timing.time_in_bare_process(str(fake), dict(os.environ)) == {"error": "torch sees no CUDA device"}
    fake.write_text("#!/bin/sh\nexit 3\n")
    assert launch_timing.time_in_bare_process(str(fake), dict(os.environ)) == {
        "error": "the bare launch timing printed no result"}
    fake.write_text("#!/bin/sh\nsleep 5\n")
    assert "took over 1 s" in launch_timing.time_in_bare_process(str(fake), dict(os.environ), timeout_s=1)["error"]


def test_launch_timing_waits_for_the_program_to_initialize_cuda():
    from gpudoctor.collect import launch_timing

    class Cuda:
        @staticmethod
        def is_initialized():
            return False

    assert launch_timing.launch_ns(type("Torch", (), {"cuda": Cuda})) is None
