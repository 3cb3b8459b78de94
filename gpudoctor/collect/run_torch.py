"""The torch backend's run: the Python program under gpudoctor's agent, which drives torch.profiler over
the capture window in the program's own process and writes a status file (gpudoctor/collect/agent.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gpudoctor.collect.manifest import Result
from gpudoctor.collect.rundir import read_json
from gpudoctor.collect.supervise import Supervisor, exit_code_of, signame

if TYPE_CHECKING:
    from gpudoctor.collect.session import Session


def run(s: Session) -> Result:
    from gpudoctor.collect import torch_backend as tb

    res = Result()
    prog, exe, probe = s.facts["program"], s.facts["interpreter"], s.facts["probe"]
    trace = s.run.raw_file(".torch.json.gz")
    status_path = s.run.raw_file(".torch-status.json")
    report = s.run.report(trace, "kineto_json")
    shim = tempfile.mkdtemp(prefix="gpudoctor-path-") if not probe.get("gpudoctor") else None
    sup = None
    try:
        env = tb.child_env(s.env, probe, shim)
        argv = tb.child_command(prog, exe, "torch", str(status_path), s.window_spec(), str(trace),
                                stacks=s.options.op_stacks, pysamples=s.pysamples_path())
        sup = Supervisor(argv, env, group=True, log_dir=s.run.raw)
        sup.saving = lambda: bool((read_json(status_path) or {}).get("finalizing_ns"))
        sup.ready = status_path.exists  # the agent writes it first thing, before importing torch

        def poll() -> None:
            st = read_json(status_path) or {}
            if s.early is None and (st.get("capture") or {}).get("state") == "done" and st.get("trace") \
                    and not st.get("finalizing_ns"):  # a window closed by the program's end: analyzed at the end
                res.capture = st["capture"]
                s.window_closed(res, [report], sup)

        rc, res.program_start_ns, res.program_end_ns = sup.run(poll)
    finally:
        if shim:
            shutil.rmtree(shim, ignore_errors=True)
    res.interrupted_by = signame(sup.interrupted_by)
    status = read_json(status_path)
    if status is not None:
        _read_status(s, res, status, status_path, rc)
    else:
        res.exit_code, res.signal = exit_code_of(rc)
        res.problems.append("the program's process ended without gpudoctor's profiler writing its status"
                            + (f" (it was killed by {res.signal})" if res.signal else "")
                            + ": no torch.profiler trace")
    if trace.exists() and trace.stat().st_size > 0:
        res.reports.append(report)
        res.files.append(s.run.file(trace, "kineto_json"))
    elif status is not None and not status.get("error") and (status.get("capture") or {}).get("start_ns"):
        res.problems.append("torch.profiler wrote no trace")
    s.keep_program_logs(res)
    return res


def _read_status(s: Session, res: Result, status: dict, status_path: Path, rc: int) -> None:
    """What the agent's status file says about the program's end, its window and its versions."""
    res.files.append(s.run.file(status_path, "torch_status"))
    res.exit_code = status.get("exit_code")
    res.signal = status.get("signal")
    res.program_start_ns = status.get("start_ns") or res.program_start_ns
    res.program_end_ns = status.get("end_ns") or res.program_end_ns
    res.notes += status.get("notes", [])
    res.capture = status.get("capture") or {}
    if status.get("error"):
        res.problems.append(status["error"])
    if status.get("exception"):
        res.notes.append(f"the program raised {status['exception']}")
    res.versions.update({k: status[k] for k in ("torch_version", "torch_cuda", "cudnn_version") if status.get(k)})
    res.backend_facts = {k: status.get(k) for k in ("activities", "cuda_available", "device_count",
                                                     "window_steps", "export_s", "trace_bytes")}
    if res.exit_code is None:  # killed while it ran (after its status was first written)
        res.exit_code, res.signal = exit_code_of(rc)
