"""The nsys backend's run: the program under ``nsys profile`` (through a wrapper that records how it ended),
the capture window driven from inside a Python program by gpudoctor's agent (cudaProfilerApi), the report
exported and analyzed while the program runs on, nsys stopped if it hangs, and the SQLite export at the end."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gpudoctor.collect import launch_timing, nsys
from gpudoctor.collect.manifest import Result
from gpudoctor.collect.rundir import read_json
from gpudoctor.collect.supervise import Supervisor, exit_code_of, say, signame, stop_orphan

if TYPE_CHECKING:
    from gpudoctor.collect.session import Session


def run(s: Session) -> Result:
    return NsysRun(s).run()


@dataclass
class NsysRun:
    s: Session
    res: Result = field(default_factory=Result)
    exe: str = ""  # the program's interpreter, when the agent drives the window
    shim: str | None = None  # a PATH directory that makes gpudoctor importable in the program's interpreter
    agent_status: Path | None = None  # the agent's status file when it drives the window
    deadline: float | None = None  # nsys must have finished its report by then (monotonic)
    hung: bool = False
    last_rep_size: int | None = None
    exported_s: float | None = None  # the export made while the program ran took this long

    def __post_init__(self) -> None:
        self.base = self.s.run.raw / self.s.run.stem
        self.status_path = self.s.run.raw_file(".program.json")  # the wrapper's: pid, start, end, exit code
        self.rep = self.s.run.raw_file(".nsys-rep")  # the names RunDirectory.expected_reports looks for
        self.qdstrm = self.s.run.raw_file(".qdstrm")
        self.sqlite = self.s.run.raw_file(".sqlite")
        self.export_log = self.s.run.raw_file(".export.log")

    @property
    def nsys_path(self) -> str:
        return self.s.facts["path"]

    def run(self) -> Result:
        s, a, res = self.s, self.s.options, self.res
        res.versions["nsys"] = s.facts.get("version")
        user_args = nsys.split_user_args(a.nsys_args)
        agent = self._agent()
        program, env = s.cmd, dict(s.env)
        window_args: list[str] = []
        if agent is not None:
            program, env, self.agent_status = agent
            window_args = nsys.capture_api_args(s.env.get("GPUDOCTOR_NSYS_CAPTURE_END", "stop"))
        elif not a.whole and not a.capture_range and a.delay is None and a.duration is None:
            res.notes.append("the program is not a Python program with torch: recorded whole (use --delay/--duration "
                             "for a time window)")
        metrics_args, metrics_note = nsys.gpu_metrics_args(self.nsys_path, a.no_gpu_metrics, a.gpu_metrics_frequency,
                                                           s.metrics_devices())
        if metrics_note:
            res.notes.append(metrics_note)
        stack_args = nsys.STACK_ARGS if a.stacks else []
        args = nsys.merge_args(window_args + metrics_args + stack_args, user_args)
        delay, duration = (None, None) if agent is not None else (a.delay, a.duration)
        argv = nsys.profile_command(self.nsys_path, self.base, nsys.wrap_program(self.status_path, program),
                                    args, delay, duration, a.capture_range)
        env = nsys.profile_env(env, a.capture_range)
        shown = nsys.profile_command(self.nsys_path, self.base, s.cmd, args, delay, duration, a.capture_range)
        res.backend_facts = {"command": shown, "nsys_path": self.nsys_path, "found_by": s.facts["found_by"],
                             "window_driven_by": "in-process agent (cudaProfilerApi)" if agent else None,
                             "gpu_metrics": bool(metrics_args)}
        if agent is not None and a.stacks:  # nsys slows launches all along: time one without it, first
            say(f"{s.label}timing a kernel launch without nsys (a bare {Path(self.exe).name} process)")
            timing = launch_timing.time_in_bare_process(self.exe, env)
            res.backend_facts["bare_launch_timing"] = timing
            if "error" in timing:
                res.notes.append(f"launch cost without nsys not timed: {timing['error']}")
        try:  # the agent's import path (shim) must outlive the retry too
            rc, sup = self._supervise(argv, env)
            if rc != 0 and (metrics_args or stack_args) and not (read_json(self.status_path) or {}).get("start_ns"):
                # nsys refused before starting the program: most likely GPU metrics or CPU sampling is not
                # permitted here; once more without them
                say(f"{s.label}nsys failed before the program started; retrying without GPU metrics and call stacks")
                res.notes.append("nsys failed before the program started with GPU metrics sampling / call stacks: "
                                 "recorded without them")
                argv = [x for x in argv if x not in metrics_args and x not in stack_args]
                res.backend_facts["gpu_metrics"] = False
                rc, sup = self._supervise(argv, env)
        finally:
            if self.shim:
                shutil.rmtree(self.shim, ignore_errors=True)
        return self._result(rc, sup)

    def _agent(self) -> tuple[list[str], dict, Path] | None:
        """(program command under the agent in cuda mode, env, agent status path), or None when the window
        cannot be driven from inside the program (not Python, no torch there, --whole, --capture-range)."""
        from gpudoctor.collect import torch_backend as tb

        s = self.s
        if s.options.whole or s.options.capture_range:
            return None
        try:
            prog = tb.parse_python_command(s.cmd)
        except tb.NotPython:
            return None
        exe = tb.resolve_interpreter(prog, s.env)
        if exe is None:
            return None
        self.exe = exe
        probe = tb.probe_interpreter(exe, s.env)
        if not probe.get("torch"):
            return None
        status_path = s.run.raw_file(".agent.json")
        self.shim = tempfile.mkdtemp(prefix="gpudoctor-path-") if not probe.get("gpudoctor") else None
        env = tb.child_env(s.env, probe, self.shim)
        return (tb.child_command(prog, exe, "cuda", str(status_path), s.window_spec(), pysamples=s.pysamples_path()),
                env, status_path)

    # ------------------------------------------------------------------ while it runs

    def _supervise(self, argv: list[str], env: dict) -> tuple[int, Supervisor]:
        status_path = self.status_path

        def to_program(signum: int) -> bool:
            # The first signal goes to the program (through its wrapper): nsys then sees it end and finishes
            # its report the normal way. A second one goes to nsys as well.
            wrapper = (read_json(status_path) or {}).get("wrapper_pid")
            if not wrapper:
                return False
            try:
                os.kill(wrapper, signum)
                return True
            except OSError:
                return False

        sup = Supervisor(argv, env, group=False, first_target=to_program, log_dir=self.s.run.raw)
        self.deadline, self.hung, self.last_rep_size, self.exported_s = None, False, None, None
        rc, self.res.program_start_ns, _ = sup.run(lambda: self._poll(sup))
        return rc, sup

    def _poll(self, sup: Supervisor) -> None:
        timeout = self.s.options.nsys_timeout
        if self.agent_status is not None and self.s.early is None:
            self._export_window(sup)
        if self.hung:
            return
        if self.deadline is None:
            st = read_json(self.status_path)
            if st and st.get("end_ns"):
                self.deadline = time.monotonic() + timeout
            return
        if time.monotonic() > self.deadline:
            self.hung = True
            say(f"{self.s.label}nsys has not finished {timeout:.0f} s after the program ended: stopping it "
                "(what it wrote is kept)")
            sup.terminate()

    def _export_window(self, sup: Supervisor) -> None:
        """Once the agent closed the window and nsys wrote the report (its size steady for a second while
        no .qdstrm is left), export and analyze it while the program runs on."""
        assert self.agent_status is not None
        st = read_json(self.agent_status) or {}
        if (st.get("capture") or {}).get("state") != "done" or st.get("finalizing_ns"):
            return
        if not self.rep.exists() or self.qdstrm.exists():
            return
        size = self.rep.stat().st_size
        last, self.last_rep_size = self.last_rep_size, size
        if last != size or size == 0:
            return
        t0 = time.monotonic()
        why = nsys.export_sqlite(self.nsys_path, self.rep, self.sqlite, self.s.options.nsys_timeout, self.export_log)
        self.res.capture = st["capture"]
        if why is not None:
            self.res.problems.append(f"{why} (while the program ran); retried at the end")
            self.s.early = {"status": "failed", "error": why}
            return
        self.exported_s = round(time.monotonic() - t0, 3)
        self.s.window_closed(self.res, [self.s.run.report(self.sqlite, "nsys_sqlite")], sup)

    # ------------------------------------------------------------------ after it ended

    def _result(self, rc: int, sup: Supervisor) -> Result:
        s, res = self.s, self.res
        res.interrupted_by = signame(sup.interrupted_by)
        st = read_json(self.status_path) or {}
        if st:
            res.files.append(s.run.file(self.status_path, "program_status"))
        if self.agent_status is not None:
            ag = read_json(self.agent_status) or {}
            if ag:
                res.files.append(s.run.file(self.agent_status, "agent_status"))
                res.capture = ag.get("capture") or res.capture
                res.notes += ag.get("notes", [])
                res.versions.update({k: ag[k] for k in ("torch_version", "torch_cuda", "cudnn_version") if ag.get(k)})
        if st.get("pid") and not st.get("end_ns"):
            stop_orphan(st["pid"], sup.interrupted_by or signal.SIGTERM)  # nsys went away, the program did not
            st = read_json(self.status_path) or st
        res.program_start_ns = st.get("start_ns") or res.program_start_ns
        res.program_end_ns = st.get("end_ns") or time.time_ns()
        if st.get("exit_code") is not None:
            res.exit_code, res.signal = st["exit_code"], st.get("signal")
            if st.get("error"):
                res.started = False
                res.problems.append(st["error"])
        elif res.interrupted_by:
            res.exit_code = 128 + int(signal.Signals[res.interrupted_by])
        else:
            res.started = bool(st)
            res.exit_code = exit_code_of(rc)[0] if rc else 1
            res.problems.append(f"nsys failed (exit {rc})" + ("" if st else " before the program started")
                                + ": see its messages above")
        if self.hung:
            res.problems.append(f"nsys did not finish its report within {s.options.nsys_timeout:.0f} s after the "
                                "program ended and was stopped")
        if self.exported_s is not None:
            res.backend_facts["export_seconds_while_running"] = self.exported_s
        self._collect_outputs()
        s.keep_program_logs(res)
        return res

    def _collect_outputs(self) -> None:
        s, res, run = self.s, self.res, self.s.run
        rep, qdstrm, sqlite = self.rep, self.qdstrm, self.sqlite
        early_ok = s.early is not None and s.early.get("status") == "ok" and sqlite.exists()
        if rep.exists() and early_ok:  # exported while the program ran; nothing was added since the window
            res.files.append(run.file(rep, "nsys_rep"))
            res.files.append(run.file(sqlite, "nsys_sqlite"))
            res.reports.append(run.report(sqlite, "nsys_sqlite"))
        elif rep.exists():
            res.files.append(run.file(rep, "nsys_rep"))
            t0 = time.monotonic()
            why = nsys.export_sqlite(self.nsys_path, rep, sqlite, s.options.nsys_timeout, self.export_log)
            export_s = round(time.monotonic() - t0, 3)
            if self.export_log.exists():
                res.files.append(run.file(self.export_log, "log"))
            if why is None:
                res.files.append(run.file(sqlite, "nsys_sqlite", export_seconds=export_s))
                res.reports.append(run.report(sqlite, "nsys_sqlite"))
            else:
                res.problems.append(f"{why}; the report is kept: {run.rel(rep)}")
                res.reports.append(run.report(rep, "nsys_rep"))
        if qdstrm.exists():
            res.files.append(run.file(qdstrm, "nsys_qdstrm"))
            if not rep.exists():
                why = s.facts.get("importer_problem") or nsys.importer_problem(self.nsys_path)
                res.problems.append(f"nsys left only its raw stream {run.rel(qdstrm)} (no .nsys-rep)"
                                    + (f": {why}" if why else "")
                                    + f"; convert it later with: QdstrmImporter -i {run.rel(qdstrm)}")
        if not rep.exists() and not qdstrm.exists():
            res.problems.append("nsys wrote no report")
