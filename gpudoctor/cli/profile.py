"""gpudoctor profile [OPTIONS] -- CMD... : run a program under a profiler, keep the reports, analyze them.

The program's output goes to the terminal as usual; gpudoctor's own lines start with "gpudoctor:" and go
to stderr; the findings are printed at the end. The exit code is the program's (128+N when it ended by
signal N), whatever happened to the profiling. Layout of the run directory: gpudoctor.collect.rundir.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpudoctor import __version__
from gpudoctor.cli.base import Command
from gpudoctor.collect import rundir
from gpudoctor.collect.ranks import RankInfo, detect_rank, is_multi_rank, job_key
from gpudoctor.collect.supervise import Supervisor, exit_code_of, say, signame, stop_orphan
from gpudoctor.collect.window import WindowSpec
from gpudoctor.errors import GpudoctorError

BACKENDS = ("auto", "nsys", "torch", "nvml")
PARENT_ENV = "GPUDOCTOR_PROFILE_PARENT"  # set by --nproc for the ranks it launches
DEFAULT_NSYS_TIMEOUT_S = 600.0
DEFAULT_GPU_METRICS_HZ = 1000
MULTI_RANK_SKIP = 10  # ranks must agree on the window without talking: a fixed skip, not "until settled"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------------------------------
# What one backend run produced


@dataclass
class Result:
    exit_code: int | None = None
    program_exit_code: int | None = None  # set when exit_code was changed to 128 + the forwarded signal
    signal: str | None = None  # the program ended by this signal
    interrupted_by: str | None = None  # gpudoctor received it and forwarded it
    started: bool = True  # the program started at all
    program_start_ns: int | None = None
    program_end_ns: int | None = None
    reports: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    backend_facts: dict = field(default_factory=dict)
    capture: dict = field(default_factory=dict)  # the capture window (collect.window.Window.summary())
    stopped_after_capture: bool = False

    def outcome(self) -> str:
        if self.stopped_after_capture:
            return "stopped_after_capture"
        if self.interrupted_by:
            return "interrupted"
        if not self.started:
            return "not_started"
        if self.interrupted_by:
            return "interrupted"
        if self.signal:
            return "killed"
        return "completed" if self.exit_code == 0 else "failed"


# ---------------------------------------------------------------------------------------------------


class ProfileCommand(Command):
    name = "profile"
    help = "run a program under a profiler (nsys, torch.profiler or NVML), keep the reports and analyze them"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.usage = "gpudoctor profile [OPTIONS] -- CMD [ARGS...]"
        p.add_argument("-o", "--output", metavar="DIR",
                       help="run directory (default: gpudoctor-runs/<UTC time>-<program>/)")
        p.add_argument("--force", action="store_true", help="replace an earlier run in DIR")
        p.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="nsys: Nsight Systems; torch: torch.profiler in the (Python) program's process; "
                            "nvml: GPU utilization samples only; auto (default): nsys when it works, else torch")
        p.add_argument("--no-nvml", action="store_true", help="do not sample NVML beside the backend")
        p.add_argument("--nvml-interval", type=float, default=0.1, metavar="S",
                       help="NVML sampling period in seconds (default 0.1)")
        p.add_argument("--nsys-args", metavar="'ARGS'",
                       help="extra nsys profile options as one string; they replace the defaults they name "
                            "(e.g. --nsys-args='-t cuda,nvtx,osrt --cuda-graph-trace=node')")
        p.add_argument("--nsys-timeout", type=float, default=DEFAULT_NSYS_TIMEOUT_S, metavar="S",
                       help="how long nsys may take to finish its report once the program ended, and again for "
                            f"the SQLite export (default {DEFAULT_NSYS_TIMEOUT_S:.0f})")
        w = p.add_argument_group("capture window (default: skip the warm-up, record a few steps, report at once)")
        w.add_argument("--steps", type=int, metavar="K", default=WindowSpec.steps,
                       help=f"steps in the window (default {WindowSpec.steps})")
        w.add_argument("--skip", type=int, metavar="N",
                       help="skip exactly N steps first (default: until step times settle; 10 for a multi-rank job)")
        w.add_argument("--delay", type=float, metavar="S", help="open the window no earlier than S seconds "
                                                                "after the start (at a step boundary when there are steps)")
        w.add_argument("--duration", type=float, metavar="S", help="a window of S seconds instead of K steps")
        w.add_argument("--whole", action="store_true", help="record the whole program (no window)")
        w.add_argument("--stop-after-capture", action="store_true",
                       help="end the program once the window is recorded and analyzed (default: it runs on "
                            "unprofiled and its exit code is passed through)")
        w.add_argument("--no-gpu-metrics", action="store_true",
                       help="nsys: no GPU metrics sampling (default: on where the GPU and permissions allow)")
        w.add_argument("--gpu-metrics-frequency", type=int, metavar="HZ", default=DEFAULT_GPU_METRICS_HZ,
                       help=f"nsys GPU metrics samples per second (default {DEFAULT_GPU_METRICS_HZ})")
        w.add_argument("--stacks", action=argparse.BooleanOptionalAction, default=True,
                       help="sample the program's Python call stack inside the window (1 kHz), to name the lines "
                            "that make the GPU wait; with nsys also native backtraces of CUDA calls and CPU "
                            "sampling; on by default")
        w.add_argument("--op-stacks", action="store_true",
                       help="torch: also torch.profiler's with_stack (a stack on every op; its Python tracer "
                            "slows Python code about 2x inside the window)")
        p.add_argument("--capture-range", metavar="NVTX_NAME",
                       help="nsys: collect only inside the first NVTX range of that name (e.g. step_3)")
        p.add_argument("--nproc", type=int, metavar="N",
                       help="launch N ranks with torchrun on this machine, one report per rank in one run directory")
        k = p.add_argument_group("kernel metrics (Nsight Compute; runs the program a second time)")
        k.add_argument("--kernels", action="store_true", help="also collect per-kernel metrics with ncu")
        k.add_argument("--nvtx-range", metavar="NAME", help="only kernels inside this NVTX push/pop range")
        k.add_argument("--kernel-regex", metavar="RE", help="only kernels whose name matches")
        k.add_argument("--launch-skip", type=int, metavar="N", default=0, help="skip the first N launches")
        k.add_argument("--launch-count", type=int, metavar="N", help="profile at most N launches")
        p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the program to run, after --")

    def run(self, args: argparse.Namespace) -> int:
        return Profile(args).run()


class Profile:
    def __init__(self, args: argparse.Namespace, env: dict | None = None):
        self.args = args
        self.env = dict(os.environ if env is None else env)
        cmd = list(args.cmd or [])
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        self.cmd = cmd
        self.parent_dir = self.env.get(PARENT_ENV)  # we are a rank launched by `--nproc`
        self.rank_info: RankInfo | None = detect_rank(self.env)
        self.multi = is_multi_rank(self.rank_info) or bool(self.parent_dir)
        self.rank = self.rank_info.rank if self.rank_info else None
        self.world_size = self.rank_info.world_size if self.rank_info else None
        self.label = f"rank {self.rank}: " if self.multi and self.rank is not None else ""

    # ------------------------------------------------------------------ checks before anything runs

    def validate(self) -> None:
        a = self.args
        if not self.cmd:
            raise GpudoctorError("no program given: gpudoctor profile [OPTIONS] -- CMD [ARGS...]")
        for name in ("delay", "duration", "nsys_timeout", "nvml_interval"):
            v = getattr(a, name)
            if v is not None and v < 0:
                raise GpudoctorError(f"--{name.replace('_', '-')} must be >= 0")
        if a.steps is not None and a.steps < 1:
            raise GpudoctorError("--steps must be at least 1")
        if a.skip is not None and a.skip < 0:
            raise GpudoctorError("--skip must be >= 0")
        if a.whole and (a.stop_after_capture or a.skip is not None or a.duration):
            raise GpudoctorError("--whole records the whole program: it cannot go with --skip, --duration or "
                                 "--stop-after-capture")
        if a.gpu_metrics_frequency is not None and not 10 <= a.gpu_metrics_frequency <= 200000:
            raise GpudoctorError("--gpu-metrics-frequency must be between 10 and 200000 Hz")
        if a.nvml_interval is not None and a.nvml_interval < 0.01:
            raise GpudoctorError("--nvml-interval must be at least 0.01 s")
        if not a.kernels:
            for opt, v in (("--nvtx-range", a.nvtx_range), ("--kernel-regex", a.kernel_regex),
                           ("--launch-count", a.launch_count)):
                if v is not None:
                    raise GpudoctorError(f"{opt} selects kernels for --kernels; add --kernels")
            if a.launch_skip:
                raise GpudoctorError("--launch-skip selects kernels for --kernels; add --kernels")
        if a.backend == "nvml" and a.no_nvml:
            raise GpudoctorError("--backend nvml collects only NVML samples: it cannot go with --no-nvml")
        if a.capture_range and a.backend in ("torch", "nvml"):
            raise GpudoctorError("--capture-range is an Nsight Systems option: use --backend nsys (or auto)")
        if a.nsys_args and a.backend in ("torch", "nvml"):
            raise GpudoctorError(f"--nsys-args has no effect with --backend {a.backend}")
        if a.nproc is not None:
            if a.nproc < 1:
                raise GpudoctorError("--nproc must be at least 1")
            if a.nproc > 1 and (is_multi_rank(self.rank_info) or self.parent_dir):
                raise GpudoctorError("--nproc launches the ranks itself: do not also run gpudoctor under "
                                     "torchrun/srun/mpirun")
        if a.kernels and (self.multi or (a.nproc or 1) > 1):
            raise GpudoctorError("--kernels runs the program a second time under Nsight Compute, which does not "
                                 "work for a multi-rank job: profile kernels in a single-process run")

    def check_program(self) -> None:
        exe = self.cmd[0]
        if os.sep in exe:
            if not os.path.exists(exe):
                raise GpudoctorError(f"{exe}: no such file", 127)
            if not os.access(exe, os.X_OK) or os.path.isdir(exe):
                raise GpudoctorError(f"{exe}: not an executable", 126)
        elif not shutil.which(exe, path=self.env.get("PATH", os.defpath)):
            raise GpudoctorError(f"{exe}: command not found", 127)

    # ------------------------------------------------------------------ backend choice

    def choose_backend(self) -> tuple[str, str, dict]:
        """(backend, why, facts) after checking that it can work; raises GpudoctorError otherwise."""
        a = self.args
        if a.backend == "nsys":
            return "nsys", "asked for", self._nsys_usable(strict=True)
        if a.backend == "torch":
            return "torch", "asked for", self._torch_usable(strict=True)
        if a.backend == "nvml":
            return "nvml", "asked for", self._nvml_usable(strict=True)
        # auto
        try:
            facts = self._nsys_usable(strict=False)
            return "nsys", f"{facts['version']}, found on {facts['found_by']}: {facts['path']}", facts
        except GpudoctorError as e:
            why_not_nsys = str(e)
        if a.capture_range:
            raise GpudoctorError(f"--capture-range needs Nsight Systems: {why_not_nsys}")
        try:
            facts = self._torch_usable(strict=False)
            return "torch", f"{why_not_nsys}; the program is Python with torch: torch.profiler in its process", facts
        except GpudoctorError as e:
            why_not_torch = str(e)
        if not a.no_nvml:
            try:
                facts = self._nvml_usable(strict=False)
                return "nvml", (f"{why_not_nsys}; {why_not_torch}: only NVML samples (GPU utilization, memory, "
                                "power, clocks) will be collected"), facts
            except GpudoctorError as e:
                why_not_nvml = str(e)
        else:
            why_not_nvml = "--no-nvml"
        raise GpudoctorError(f"nothing can profile this program here: {why_not_nsys}; {why_not_torch}; "
                             f"NVML: {why_not_nvml}")

    def _nsys_usable(self, strict: bool) -> dict:
        from gpudoctor.collect import locate, nsys

        loc = locate.find_nsys(self.env)
        if loc is None:
            raise GpudoctorError(locate.not_found_message(self.env))
        version = nsys.nsys_version(loc.path, timeout=30 if strict else 20)
        facts = {"path": loc.path, "found_by": loc.how, "version": version}
        problem = nsys.importer_problem(loc.path)
        if problem:
            if not strict:
                raise GpudoctorError(f"nsys at {loc.path} cannot write reports: {problem}")
            say(f"warning: nsys at {loc.path}: {problem}; it may leave only a .qdstrm")
            facts["importer_problem"] = problem
        return facts

    def _torch_usable(self, strict: bool) -> dict:
        from gpudoctor.collect import torch_backend as tb

        try:
            prog = tb.parse_python_command(self.cmd)
        except tb.NotPython as e:
            raise GpudoctorError(
                f"the torch backend runs a Python program in its own process, and {e} "
                "(give the python command itself, e.g. -- python train.py; for several GPUs use --nproc N or "
                "torchrun --nproc_per_node=N --no-python gpudoctor profile -- python train.py)") from None
        exe = tb.resolve_interpreter(prog, self.env)
        if exe is None:
            raise GpudoctorError(f"{prog.interpreter}: command not found", 127)
        if prog.mode == "script" and not os.path.exists(prog.target):
            raise GpudoctorError(f"{prog.interpreter}: can't open file {prog.target!r}: no such file", 2)
        probe = tb.probe_interpreter(exe, self.env)
        if not probe.get("torch"):
            raise GpudoctorError(f"torch is not installed for {exe}" + (f" ({probe['error']})" if probe.get("error") else ""))
        return {"program": prog, "interpreter": exe, "probe": probe}

    def _nvml_usable(self, strict: bool) -> dict:
        from gpudoctor.collect import nvml

        info = nvml.device_info(self.env)
        if "error" in info:
            raise GpudoctorError(f"the nvml backend needs NVML: {info['error']}" if strict else info["error"])
        if not info.get("gpus"):
            raise GpudoctorError("NVML sees no GPU visible to the program")
        return {"nvml": info}

    # ------------------------------------------------------------------ run directory

    def choose_run_dir(self) -> Path:
        from gpudoctor.collect.torch_backend import NotPython, parse_python_command

        if self.args.output:
            return Path(self.args.output)
        try:
            name = parse_python_command(self.cmd).name
        except NotPython:
            name = os.path.basename(self.cmd[0])
        if self.multi:
            key = job_key(self.env, self.rank_info)
            if key is None:
                raise GpudoctorError("this is one rank of a multi-rank job, and the launcher sets nothing that names "
                                     "the job on every rank: pass the same -o DIR to every rank")
            return rundir.default_run_dir(name, job_key=key)
        return rundir.default_run_dir(name)

    # ------------------------------------------------------------------ main flow

    def run(self) -> int:
        self.validate()
        if self.args.nproc and self.args.nproc > 1:
            return self.launch_ranks()
        self.check_program()
        run_dir = self.choose_run_dir()
        backend, why, facts = self.choose_backend()
        rundir.prepare(run_dir, self.args.force and not self.parent_dir, rank=self.rank, multi=self.multi,
                       clear_shared=not self.parent_dir)
        self.run_dir = run_dir
        self.raw = run_dir / rundir.RAW
        self.stem = rundir.file_stem(self.rank, self.multi)
        self.lock_fd = None if self.multi else rundir.hold_running_lock(run_dir)
        say(f"{self.label}backend {backend}" + ("" if why == "asked for" else f" ({why})") + f"; run directory {run_dir}")
        try:
            return self._run_backend(run_dir, backend, why, facts)
        finally:
            rundir.release_running_lock(run_dir, self.lock_fd)

    def _run_backend(self, run_dir: Path, backend: str, why: str, facts: dict) -> int:
        start_ns = time.time_ns()
        gpu_info = self._gpu_info(facts)
        self.backend, self.early = backend, None
        # Written now and at each change, so that a killed gpudoctor still leaves an analyzable directory
        self._write_running_manifest(backend, why, facts, gpu_info, start_ns, Result())
        sampler, nvml_summary = self._start_sampler(backend, gpu_info)
        self._early_context = (why, facts, gpu_info, start_ns)
        try:
            result = {"nsys": self._run_nsys, "torch": self._run_torch, "nvml": self._run_plain}[backend](facts)
        except KeyboardInterrupt:  # before the program's supervisor took over the signals
            result = Result(exit_code=130, interrupted_by="SIGINT", started=False)
            result.notes.append("interrupted while the program was being started")
        finally:
            if sampler is not None:
                nvml_summary = sampler.stop()
        end_ns = time.time_ns()
        if sampler is not None:
            self._add_nvml_report(result, sampler, nvml_summary)
        if self.args.kernels and result.exit_code == 0 and not result.interrupted_by:
            self._run_kernels(result)
        elif self.args.kernels:
            result.notes.append("kernel metrics not collected: the program did not end successfully")

        code = result.exit_code if result.exit_code is not None else 1
        if result.interrupted_by and code != 0 and not result.signal:
            # Stopped by the signal we forwarded, though it exited normally (e.g. a Python program under nsys
            # exits 1 on KeyboardInterrupt): report it as a shell would, 128 + that signal.
            wanted = 128 + int(signal.Signals[result.interrupted_by])
            if code != wanted:
                result.notes.append(f"the program exited with {code} after gpudoctor forwarded "
                                    f"{result.interrupted_by}; reported as {wanted}")
                result.program_exit_code = code
                code = result.exit_code = wanted
        try:
            manifest = self._manifest(backend, why, facts, gpu_info, nvml_summary, result, start_ns, end_ns)
        except Exception as e:  # never lose the run over a fact we could not gather
            _debug_traceback()
            manifest = {"manifest_version": rundir.MANIFEST_VERSION, "gpudoctor_version": __version__,
                        "command": self.cmd, "exit_code": code, "signal": result.signal,
                        "interrupted_by": result.interrupted_by, "outcome": result.outcome(), "backend": backend,
                        "rank": self.rank, "world_size": self.world_size, "reports": result.reports,
                        "files": result.files, "problems": result.problems + [
                            f"manifest incomplete: internal error {type(e).__name__}: {_one_line(e)}"]}
        self._report_outcome(result, code)
        if self.multi:
            self._finish_rank(manifest)
        else:
            path = run_dir / rundir.MANIFEST
            if self.early is not None:  # the window was analyzed while the program ran: keep that analysis
                manifest["analysis"] = self.early
                rundir.write_json(path, manifest)
                say(f"run saved in {run_dir} (the findings above are from the capture window)")
            else:
                rundir.write_json(path, manifest)
                analyze_and_record(run_dir, manifest, path)
        if result.stopped_after_capture and self.early is not None and self.early.get("status") == "ok":
            return 0  # the user asked for the program to be ended: that is success
        return code

    # ------------------------------------------------------------------ the window, analyzed while the program runs

    def _write_running_manifest(self, backend, why, facts, gpu_info, start_ns, res: Result,
                                state: str = "running") -> Path:
        m = self._manifest(backend, why, facts, gpu_info, {}, res, start_ns, time.time_ns())
        m.update(outcome=state, exit_code=None, program_exit_code=None, end_utc=None, end_ns=None, wall_s=None,
                 what_happened=f"the program is running under gpudoctor (pid {os.getpid()})",
                 reports_expected=self._expected_reports())
        path = self.run_dir / (rundir.MANIFEST if not self.multi else rundir.rank_manifest_name(self.rank))
        try:
            rundir.write_json(path, m)
        except OSError as e:
            say(f"{self.label}cannot write {path}: {e}")
        return path

    def _expected_reports(self) -> list[dict]:
        """Where this run's reports will be: what `gpudoctor analyze RUN_DIR` reads if gpudoctor is killed
        before it can list them (a killed run still leaves an analyzable directory)."""
        rank, raw = self.rank or 0, rundir.RAW
        out = []
        if self.backend == "torch":
            out.append({"path": f"{raw}/{self.stem}.torch.json.gz", "format": "kineto_json", "rank": rank})
        elif self.backend == "nsys":
            out += [{"path": f"{raw}/{self.stem}.sqlite", "format": "nsys_sqlite", "rank": rank},
                    {"path": f"{raw}/{self.stem}.nsys-rep", "format": "nsys_rep", "rank": rank}]
        if not self.args.no_nvml:
            name = "nvml.csv" if not self.multi else f"{self.stem}.nvml.csv"
            out.append({"path": f"{raw}/{name}", "format": "nvml_csv", "rank": rank})
        return out

    def window_closed(self, res: Result, reports: list[dict], sup: Supervisor | None) -> None:
        """The capture window is recorded: analyze it now and print the findings, while the program runs on."""
        if self.early is not None or self.multi or not reports:
            return
        why, facts, gpu_info, start_ns = self._early_context
        snapshot = Result(**{k: v for k, v in res.__dict__.items()})
        snapshot.reports = list(reports)
        path = self._write_running_manifest(self.backend, why, facts, gpu_info, start_ns, snapshot,
                                            state="running")
        manifest = rundir.read_json(path) or {}
        say(f"{self.label}capture window recorded ({_window_text(res.capture)}): analyzing it now")
        analyze_and_record(self.run_dir, manifest, path, final=False)
        self.early = manifest.get("analysis") or {"status": "unknown"}
        self.early["while_program_ran"] = True
        if sup is not None and sup.proc is not None and sup.proc.poll() is None and not sup.received:
            if self.args.stop_after_capture:
                say(f"{self.label}--stop-after-capture: ending the program")
                res.stopped_after_capture = True
                sup.send(signal.SIGINT)
                sup.received_at = time.monotonic()  # escalate to SIGTERM/SIGKILL if it does not stop
                sup.received.append(signal.SIGINT)
            else:
                say(f"{self.label}the program runs on unprofiled; gpudoctor waits for it and passes its exit code "
                    "through (Ctrl-C stops it; --stop-after-capture ends it next time)")

    # ------------------------------------------------------------------ facts

    def _gpu_info(self, facts: dict) -> dict:
        if "nvml" in facts:
            return facts["nvml"]
        if self.args.no_nvml:
            return {}
        from gpudoctor.collect import nvml

        return nvml.device_info(self.env)

    def _sampler_devices(self, gpu_info: dict) -> list[int] | None:
        """Every visible GPU for a single process; the rank's own (LOCAL_RANK-th) GPU for a rank."""
        if not self.multi:
            return None
        gpus = [g["device_id"] for g in gpu_info.get("gpus", [])]
        if not gpus:
            return None
        local = self.rank_info.local_rank if self.rank_info and self.rank_info.local_rank is not None else 0
        return [gpus[local % len(gpus)]] if len(gpus) > 1 else gpus

    def _start_sampler(self, backend: str, gpu_info: dict):
        if self.args.no_nvml:
            return None, {"enabled": False}
        if "error" in gpu_info:
            say(f"{self.label}{gpu_info['error']}: no NVML samples (continuing)")
            return None, {"enabled": True, "error": gpu_info["error"]}
        from gpudoctor.collect.nvml import NvmlSampler

        path = self.raw / ("nvml.csv" if not self.multi else f"{self.stem}.nvml.csv")
        sampler = NvmlSampler(path, devices=self._sampler_devices(gpu_info), interval_s=self.args.nvml_interval,
                              env=self.env)
        if not sampler.start():
            say(f"{self.label}{sampler.error}: no NVML samples (continuing)")
            return None, {"enabled": True, "error": sampler.error}
        return sampler, {}

    def _add_nvml_report(self, result: Result, sampler, summary: dict) -> None:
        rel = self._rel(sampler.path)
        summary["enabled"] = True
        summary["path"] = rel
        if sampler.samples:
            result.reports.append({"path": rel, "format": "nvml_csv", "rank": self.rank or 0})
        result.files.append({"path": rel, "kind": "nvml_csv", "rank": self.rank or 0})
        self.nvml_summary = summary

    def _rel(self, path: Path) -> str:
        return os.path.relpath(path, self.run_dir)

    # ------------------------------------------------------------------ backends

    def _run_plain(self, facts: dict) -> Result:
        """nvml backend: the program itself, NVML sampled beside it."""
        res = Result()
        sup = Supervisor(self.cmd, self.env, group=True)
        rc, res.program_start_ns, res.program_end_ns = sup.run()
        res.exit_code, res.signal = exit_code_of(rc)
        res.interrupted_by = signame(sup.interrupted_by)
        return res

    def window_spec(self) -> dict:
        a = self.args
        skip = a.skip if a.skip is not None else (MULTI_RANK_SKIP if self.multi else None)
        spec = WindowSpec(steps=a.steps, skip=skip, delay_s=a.delay or 0.0, duration_s=a.duration, whole=a.whole)
        if a.duration:
            spec.time_window_s = a.duration
        if a.delay is not None:
            spec.no_step_wait_s = a.delay  # no step by then: the clock opens the window
        return spec.to_dict()

    def _run_torch(self, facts: dict) -> Result:
        from gpudoctor.collect import torch_backend as tb

        res = Result()
        prog, exe, probe = facts["program"], facts["interpreter"], facts["probe"]
        trace = self.raw / f"{self.stem}.torch.json.gz"
        status_path = self.raw / f"{self.stem}.torch-status.json"
        report = {"path": self._rel(trace), "format": "kineto_json", "rank": self.rank or 0}
        shim = tempfile.mkdtemp(prefix="gpudoctor-path-") if not probe.get("gpudoctor") else None
        sup = None
        try:
            env = tb.child_env(self.env, probe, shim)
            argv = tb.child_command(prog, exe, "torch", str(status_path), self.window_spec(), str(trace),
                                    stacks=self.args.op_stacks, pysamples=self._pysamples_path())
            sup = Supervisor(argv, env, group=True, log_dir=self.raw)
            sup.saving = lambda: bool((rundir.read_json(status_path) or {}).get("finalizing_ns"))
            sup.ready = status_path.exists  # the agent writes it first thing, before importing torch

            def poll():
                st = rundir.read_json(status_path) or {}
                if self.early is None and (st.get("capture") or {}).get("state") == "done" and st.get("trace") \
                        and not st.get("finalizing_ns"):  # a window closed by the program's end: analyzed at the end
                    res.capture = st["capture"]
                    self.window_closed(res, [report], sup)

            rc, res.program_start_ns, res.program_end_ns = sup.run(poll)
        finally:
            if shim:
                shutil.rmtree(shim, ignore_errors=True)
        res.interrupted_by = signame(sup.interrupted_by)
        status = rundir.read_json(status_path)
        if status is not None:
            res.files.append({"path": self._rel(status_path), "kind": "torch_status", "rank": self.rank or 0})
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
        else:
            res.exit_code, res.signal = exit_code_of(rc)
            res.problems.append("the program's process ended without gpudoctor's profiler writing its status"
                                + (f" (it was killed by {res.signal})" if res.signal else "")
                                + ": no torch.profiler trace")
        if trace.exists() and trace.stat().st_size > 0:
            res.reports.append(report)
            res.files.append({"path": report["path"], "kind": "kineto_json", "rank": self.rank or 0})
        elif status is not None and not status.get("error") and (status.get("capture") or {}).get("start_ns"):
            res.problems.append("torch.profiler wrote no trace")
        self._keep_program_logs(res)
        return res

    def _keep_program_logs(self, res: Result) -> None:
        for name in ("program.stdout.log", "program.stderr.log"):
            if (self.raw / name).exists():
                res.files.append({"path": self._rel(self.raw / name), "kind": "program_output", "rank": self.rank or 0})

    def _agent_for_nsys(self, facts: dict) -> tuple[list[str], dict, Path] | None:
        """(program command under the agent in cuda mode, env, agent status path), or None when the window
        cannot be driven from inside the program (not Python, no torch there, --whole, --capture-range)."""
        from gpudoctor.collect import torch_backend as tb

        a = self.args
        if a.whole or a.capture_range:
            return None
        try:
            prog = tb.parse_python_command(self.cmd)
        except tb.NotPython:
            return None
        exe = tb.resolve_interpreter(prog, self.env)
        if exe is None:
            return None
        probe = tb.probe_interpreter(exe, self.env)
        if not probe.get("torch"):
            return None
        status_path = self.raw / f"{self.stem}.agent.json"
        self._shim = tempfile.mkdtemp(prefix="gpudoctor-path-") if not probe.get("gpudoctor") else None
        env = tb.child_env(self.env, probe, self._shim)
        return (tb.child_command(prog, exe, "cuda", str(status_path), self.window_spec(),
                                 pysamples=self._pysamples_path()), env, status_path)

    def _pysamples_path(self) -> str | None:
        """Where the agent writes the window's Python stack samples (beside the report, same stem)."""
        return str(self.raw / f"{self.stem}.pysamples.json") if self.args.stacks else None

    def _run_nsys(self, facts: dict) -> Result:
        from gpudoctor.collect import nsys

        a = self.args
        res = Result()
        res.versions["nsys"] = facts.get("version")
        base = self.raw / self.stem
        status_path = self.raw / f"{self.stem}.program.json"
        user_args = nsys.split_user_args(a.nsys_args)
        self._shim = None
        agent = self._agent_for_nsys(facts)
        program, env, agent_status = self.cmd, dict(self.env), None
        window_args: list[str] = []
        if agent is not None:
            program, env, agent_status = agent
            window_args = nsys.capture_api_args(self.env.get("GPUDOCTOR_NSYS_CAPTURE_END", "stop"))
        elif not a.whole and not a.capture_range and a.delay is None and a.duration is None:
            res.notes.append("the program is not a Python program with torch: recorded whole (use --delay/--duration "
                             "for a time window)")
        metrics_args, metrics_note = nsys.gpu_metrics_args(facts["path"], a.no_gpu_metrics, a.gpu_metrics_frequency,
                                                           self._metrics_devices())
        if metrics_note:
            res.notes.append(metrics_note)
        stack_args = nsys.STACK_ARGS if a.stacks else []
        extra = window_args + metrics_args + stack_args
        delay, duration = (None, None) if agent is not None else (a.delay, a.duration)
        argv = nsys.profile_command(facts["path"], base, nsys.wrap_program(status_path, program),
                                    extra + user_args, delay, duration, a.capture_range)
        env = nsys.profile_env(env, a.capture_range)
        shown = nsys.profile_command(facts["path"], base, self.cmd, extra + user_args, delay, duration, a.capture_range)
        res.backend_facts = {"command": shown, "nsys_path": facts["path"], "found_by": facts["found_by"],
                             "window_driven_by": "in-process agent (cudaProfilerApi)" if agent else None,
                             "gpu_metrics": bool(metrics_args)}
        try:
            rc, sup, state = self._supervise_nsys(argv, env, status_path, agent_status, res, facts, base)
        finally:
            if self._shim:
                shutil.rmtree(self._shim, ignore_errors=True)
        if rc != 0 and (metrics_args or stack_args) and not (rundir.read_json(status_path) or {}).get("start_ns"):
            # nsys refused before starting the program: most likely GPU metrics or CPU sampling is not
            # permitted here; once more without them
            say(f"{self.label}nsys failed before the program started; retrying without GPU metrics and call stacks")
            res.notes.append("nsys failed before the program started with GPU metrics sampling / call stacks: "
                             "recorded without them")
            argv = [x for x in argv if x not in metrics_args and x not in stack_args]
            res.backend_facts["gpu_metrics"] = False
            rc, sup, state = self._supervise_nsys(argv, env, status_path, agent_status, res, facts, base)
        return self._nsys_result(res, rc, sup, state, status_path, agent_status, facts, base)

    def _metrics_devices(self) -> str:
        if self.multi and self.rank_info and self.rank_info.local_rank is not None:
            return str(self.rank_info.local_rank)  # one sampler per GPU: each rank samples its own
        return "all"

    def _supervise_nsys(self, argv, env, status_path, agent_status, res, facts, base):
        def to_program(signum: int) -> bool:
            # The first signal goes to the program (through its wrapper): nsys then sees it end and finishes
            # its report the normal way. A second one goes to nsys as well.
            wrapper = (rundir.read_json(status_path) or {}).get("wrapper_pid")
            if not wrapper:
                return False
            try:
                os.kill(wrapper, signum)
                return True
            except OSError:
                return False

        sup = Supervisor(argv, env, group=False, first_target=to_program, log_dir=self.raw)
        timeout = self.args.nsys_timeout
        state = {"deadline": None, "hung": False, "seen": {}}

        def poll():
            if agent_status is not None and self.early is None:
                self._early_nsys(agent_status, res, facts, base, sup, state)
            if state["hung"]:
                return
            if state["deadline"] is None:
                st = rundir.read_json(status_path)
                if st and st.get("end_ns"):
                    state["deadline"] = time.monotonic() + timeout
                return
            if time.monotonic() > state["deadline"]:
                state["hung"] = True
                say(f"{self.label}nsys has not finished {timeout:.0f} s after the program ended: stopping it "
                    "(what it wrote is kept)")
                sup.terminate()

        rc, res.program_start_ns, _ = sup.run(poll)
        return rc, sup, state

    def _early_nsys(self, agent_status: Path, res: Result, facts: dict, base: Path, sup, state: dict) -> None:
        """Once the agent closed the window and nsys wrote the report (its size steady for a second while
        no .qdstrm is left), export and analyze it while the program runs on."""
        from gpudoctor.collect import nsys

        st = rundir.read_json(agent_status) or {}
        if (st.get("capture") or {}).get("state") != "done" or st.get("finalizing_ns"):
            return
        rep = base.with_name(base.name + ".nsys-rep")
        if not rep.exists() or base.with_name(base.name + ".qdstrm").exists():
            return
        size = rep.stat().st_size
        last = state["seen"].get("size")
        state["seen"]["size"] = size
        if last != size or size == 0:
            return
        sqlite = base.with_name(base.name + ".sqlite")
        log = base.with_name(base.name + ".export.log")
        t0 = time.monotonic()
        why = nsys.export_sqlite(facts["path"], rep, sqlite, self.args.nsys_timeout, log)
        res.capture = st["capture"]
        if why is not None:
            res.problems.append(f"{why} (while the program ran); retried at the end")
            self.early = {"status": "failed", "error": why}
            return
        state["exported_s"] = round(time.monotonic() - t0, 3)
        self.window_closed(res, [{"path": self._rel(sqlite), "format": "nsys_sqlite", "rank": self.rank or 0}], sup)

    def _nsys_result(self, res, rc, sup, state, status_path, agent_status, facts, base) -> Result:
        timeout = self.args.nsys_timeout
        res.interrupted_by = signame(sup.interrupted_by)
        st = rundir.read_json(status_path) or {}
        if st:
            res.files.append({"path": self._rel(status_path), "kind": "program_status", "rank": self.rank or 0})
        if agent_status is not None:
            ag = rundir.read_json(agent_status) or {}
            if ag:
                res.files.append({"path": self._rel(agent_status), "kind": "agent_status", "rank": self.rank or 0})
                res.capture = ag.get("capture") or res.capture
                res.notes += ag.get("notes", [])
                res.versions.update({k: ag[k] for k in ("torch_version", "torch_cuda", "cudnn_version") if ag.get(k)})
        if st.get("pid") and not st.get("end_ns"):
            stop_orphan(st["pid"], sup.interrupted_by or signal.SIGTERM)  # nsys went away, the program did not
            st = rundir.read_json(status_path) or st
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
        if state["hung"]:
            res.problems.append(f"nsys did not finish its report within {timeout:.0f} s after the program ended "
                                "and was stopped")
        if state.get("exported_s") is not None:
            res.backend_facts["export_seconds_while_running"] = state["exported_s"]
        self._collect_nsys_outputs(res, facts, base)
        self._keep_program_logs(res)
        return res

    def _collect_nsys_outputs(self, res: Result, facts: dict, base: Path) -> None:
        from gpudoctor.collect import nsys

        rank = self.rank or 0
        rep = base.with_name(base.name + ".nsys-rep")
        qdstrm = base.with_name(base.name + ".qdstrm")
        sqlite = base.with_name(base.name + ".sqlite")
        early_ok = self.early is not None and self.early.get("status") == "ok" and sqlite.exists()
        if rep.exists() and early_ok:  # exported while the program ran; nothing was added since the window
            res.files.append({"path": self._rel(rep), "kind": "nsys_rep", "rank": rank})
            res.files.append({"path": self._rel(sqlite), "kind": "nsys_sqlite", "rank": rank})
            res.reports.append({"path": self._rel(sqlite), "format": "nsys_sqlite", "rank": rank})
        elif rep.exists():
            res.files.append({"path": self._rel(rep), "kind": "nsys_rep", "rank": rank})
            log = base.with_name(base.name + ".export.log")
            t0 = time.monotonic()
            why = nsys.export_sqlite(facts["path"], rep, sqlite, self.args.nsys_timeout, log)
            export_s = round(time.monotonic() - t0, 3)
            if log.exists():
                res.files.append({"path": self._rel(log), "kind": "log", "rank": rank})
            if why is None:
                res.files.append({"path": self._rel(sqlite), "kind": "nsys_sqlite", "rank": rank,
                                  "export_seconds": export_s})
                res.reports.append({"path": self._rel(sqlite), "format": "nsys_sqlite", "rank": rank})
            else:
                res.problems.append(f"{why}; the report is kept: {self._rel(rep)}")
                res.reports.append({"path": self._rel(rep), "format": "nsys_rep", "rank": rank})
        if qdstrm.exists():
            res.files.append({"path": self._rel(qdstrm), "kind": "nsys_qdstrm", "rank": rank})
            if not rep.exists():
                why = facts.get("importer_problem") or nsys.importer_problem(facts["path"])
                res.problems.append(f"nsys left only its raw stream {self._rel(qdstrm)} (no .nsys-rep)"
                                    + (f": {why}" if why else "")
                                    + f"; convert it later with: QdstrmImporter -i {self._rel(qdstrm)}")
        if not rep.exists() and not qdstrm.exists():
            res.problems.append("nsys wrote no report")

    # ------------------------------------------------------------------ --kernels

    def _run_kernels(self, res: Result) -> None:
        from gpudoctor.collect import ncu

        a = self.args
        say(f"{self.label}collecting kernel metrics with Nsight Compute (runs the program again)")
        base = self.raw / ("kernels" if not self.multi else f"{self.stem}.kernels")
        try:
            out = ncu.run_ncu(self.cmd, base, nvtx_range=a.nvtx_range, kernel_regex=a.kernel_regex,
                              launch_skip=a.launch_skip, launch_count=a.launch_count)
        except GpudoctorError as e:
            res.problems.append(f"kernel metrics: {e}")
            say(f"{self.label}kernel metrics: {e}")
            return
        except KeyboardInterrupt:
            res.problems.append("kernel metrics: interrupted")
            return
        rank = self.rank or 0
        for key, kind in (("report", "ncu_rep"), ("raw_csv", "ncu_csv"), ("details_csv", "ncu_details_csv"),
                          ("log", "log")):
            if out.get(key) and Path(out[key]).exists():
                res.files.append({"path": self._rel(Path(out[key])), "kind": kind, "rank": rank})
        if out.get("raw_csv") and Path(out["raw_csv"]).exists():
            res.reports.append({"path": self._rel(Path(out["raw_csv"])), "format": "ncu_csv", "rank": rank})
        if out.get("unavailable_metrics"):
            res.notes.append(f"ncu: metrics this GPU lacks: {', '.join(out['unavailable_metrics'])}")
        res.backend_facts["ncu_command"] = [str(x) for x in out.get("command", [])]

    # ------------------------------------------------------------------ manifest

    def _versions(self, res: Result, facts: dict) -> dict:
        from importlib import metadata

        v = {"gpudoctor": __version__, "python": platform.python_version()}
        for dist, key in (("torch", "torch"), ("nvidia-ml-py", "pynvml")):
            try:
                v[key] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        v.update({k: val for k, val in res.versions.items() if val})
        if "torch_version" in v:
            v["torch"] = v.pop("torch_version")  # what the program really ran with
        return v

    def _manifest(self, backend, why, facts, gpu_info, nvml_summary, res: Result, start_ns, end_ns) -> dict:
        a = self.args
        nvml_summary = getattr(self, "nvml_summary", nvml_summary)
        code = res.exit_code
        what = {
            "completed": "the program ran to completion (exit 0)",
            "failed": f"the program exited with {code}",
            "interrupted": f"gpudoctor received {res.interrupted_by} and stopped the program (exit {code})",
            "stopped_after_capture": f"gpudoctor ended the program after the capture window (--stop-after-capture; "
                                     f"exit {code})",
            "killed": f"the program was killed by {res.signal} (exit {code})",
            "not_started": "the program did not start",
        }[res.outcome()]
        collected = ", ".join(sorted({r["format"] for r in res.reports})) or "nothing analyzable"
        tools = {}
        if backend == "nsys":
            tools["nsys"] = {"path": facts.get("path"), "found_by": facts.get("found_by"),
                             "version": facts.get("version")}
        if backend == "torch":
            tools["torch_profiler"] = {"interpreter": facts.get("interpreter")}
        m = {
            "manifest_version": rundir.MANIFEST_VERSION,
            "gpudoctor_version": __version__,
            "command": self.cmd,
            "command_line": shlex.join(self.cmd),
            "cwd": os.getcwd(),
            "host": {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count()},
            "start_utc": rundir.iso(start_ns), "end_utc": rundir.iso(end_ns),
            "start_ns": start_ns, "end_ns": end_ns, "wall_s": round((end_ns - start_ns) / 1e9, 3),
            "program_start_ns": res.program_start_ns, "program_end_ns": res.program_end_ns,
            "exit_code": code, "program_exit_code": res.program_exit_code if res.program_exit_code is not None else code,
            "signal": res.signal, "interrupted_by": res.interrupted_by,
            "outcome": res.outcome(),
            "what_happened": f"{what}; collected: {collected}"
                             + (f"; problems: {'; '.join(res.problems)}" if res.problems else ""),
            "rank": self.rank, "world_size": self.world_size,
            "local_rank": self.rank_info.local_rank if self.rank_info else None,
            "rank_source": self.rank_info.source if self.rank_info else None,
            "launcher": self.rank_info.launcher if self.rank_info else None,
            "backend": backend, "backend_reason": why,
            "options": {
                "backend": a.backend, "nvml": not a.no_nvml, "nvml_interval_s": a.nvml_interval,
                "nsys_args": a.nsys_args, "nsys_timeout_s": a.nsys_timeout, "delay_s": a.delay,
                "duration_s": a.duration, "capture_range": a.capture_range, "force": a.force, "nproc": a.nproc,
                "steps": a.steps, "skip": a.skip, "whole": a.whole, "stop_after_capture": a.stop_after_capture,
                "stacks": a.stacks, "gpu_metrics": not a.no_gpu_metrics,
                "gpu_metrics_frequency_hz": a.gpu_metrics_frequency,
                "kernels": {"nvtx_range": a.nvtx_range, "kernel_regex": a.kernel_regex,
                            "launch_skip": a.launch_skip, "launch_count": a.launch_count} if a.kernels else None,
            },
            "gpus": gpu_info.get("gpus", []),
            "driver_version": gpu_info.get("driver_version"),
            "cuda_driver_version": gpu_info.get("cuda_driver_version"),
            "versions": self._versions(res, facts),
            "tools": tools,
            "backend_details": res.backend_facts,
            "capture": res.capture,
            "nvml": nvml_summary,
            "gpu_state": (nvml_summary or {}).get("gpu_state"),  # the capture's conditions, for the gate
            "reports": res.reports,
            "files": res.files,
            "notes": res.notes,
            "problems": res.problems,
        }
        if gpu_info.get("error"):
            m["nvml"] = dict(m["nvml"] or {}, error=gpu_info["error"])
        return m

    def _report_outcome(self, res: Result, code: int) -> None:
        for p in res.problems:
            say(f"{self.label}{p}")
        if res.outcome() == "killed":
            say(f"{self.label}the program was killed by {res.signal}")

    # ------------------------------------------------------------------ multi-rank

    def _finish_rank(self, manifest: dict) -> None:
        run_dir = self.run_dir
        rundir.write_json(run_dir / rundir.rank_manifest_name(self.rank), manifest)
        with rundir.locked(run_dir):
            per_rank = rundir.rank_manifests(run_dir)
            if self.world_size:
                per_rank = {k: v for k, v in per_rank.items() if k < self.world_size}
            merged = rundir.merge_manifests(per_rank, self.world_size)
            rundir.write_json(run_dir / rundir.MANIFEST, merged)
            # a rank still running has only its start-time manifest: it is not done
            done = sum(1 for m in per_rank.values() if m.get("outcome") != "running")
            last = self.world_size is not None and done >= self.world_size
        if self.parent_dir:
            return  # the --nproc launcher analyzes the job
        if last or (self.world_size is None and self.rank == 0):
            analyze_and_record(run_dir, merged, run_dir / rundir.MANIFEST)
        else:
            say(f"{self.label}results saved in {run_dir}; {done} of {self.world_size or '?'} ranks done "
                "(the last rank to finish analyzes the job)")

    def launch_ranks(self) -> int:
        """--nproc N: torchrun N ranks of `gpudoctor profile` into one run directory, then analyze it."""
        a = self.args
        self.check_program()
        run_dir = self.choose_run_dir()
        backend, why, _facts = self.choose_backend()  # resolved once, so every rank uses the same
        rundir.prepare(run_dir, a.force)
        say(f"launching {a.nproc} ranks with torchrun, backend {backend}"
            + ("" if why == "asked for" else f" ({why})") + f"; run directory {run_dir}")
        inner = ["-o", str(run_dir), "--backend", backend, "--nsys-timeout", str(a.nsys_timeout),
                 "--nvml-interval", str(a.nvml_interval)]
        if a.no_nvml:
            inner.append("--no-nvml")
        for opt, v in (("--nsys-args", a.nsys_args), ("--delay", a.delay), ("--duration", a.duration),
                       ("--capture-range", a.capture_range), ("--steps", a.steps), ("--skip", a.skip),
                       ("--gpu-metrics-frequency", a.gpu_metrics_frequency)):
            if v is not None:
                inner += [opt, str(v)]
        for flag, on in (("--whole", a.whole), ("--stop-after-capture", a.stop_after_capture),
                         ("--no-stacks", not a.stacks), ("--no-gpu-metrics", a.no_gpu_metrics)):
            if on:
                inner.append(flag)
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
                "-m", "gpudoctor", "profile", *inner, "--", *self.cmd]
        env = dict(self.env, **{PARENT_ENV: str(run_dir.resolve())})
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        sup = Supervisor(argv, env, group=False)  # torchrun forwards signals to its workers
        rc, start_ns, end_ns = sup.run()
        launched = {"tool": "torchrun", "nproc": a.nproc, "command": argv, "exit_code": exit_code_of(rc)[0],
                    "interrupted_by": signame(sup.interrupted_by), "start_utc": rundir.iso(start_ns),
                    "end_utc": rundir.iso(end_ns)}
        per_rank = {k: v for k, v in rundir.rank_manifests(run_dir).items() if k < a.nproc}
        if not per_rank:
            say(f"no rank wrote its results (torchrun exit {rc}); nothing to analyze in {run_dir}")
            rundir.write_json(run_dir / rundir.MANIFEST, {
                "manifest_version": rundir.MANIFEST_VERSION, "gpudoctor_version": __version__, "command": self.cmd,
                "cwd": os.getcwd(), "outcome": "not_started", "exit_code": exit_code_of(rc)[0],
                "what_happened": f"torchrun exited with {rc} before any rank finished", "reports": [], "files": [],
                "launched_by": launched, "start_utc": rundir.iso(start_ns), "end_utc": rundir.iso(end_ns)})
            return exit_code_of(rc)[0] or 1
        merged = rundir.merge_manifests(per_rank, a.nproc, launched_by=launched)
        path = run_dir / rundir.MANIFEST
        rundir.write_json(path, merged)
        analyze_and_record(run_dir, merged, path)
        code = merged.get("exit_code")
        if code is None:
            code = exit_code_of(rc)[0]
        if sup.interrupted_by and not code:
            code = 128 + sup.interrupted_by
        return int(code)


# ---------------------------------------------------------------------------------------------------
# Analysis: one call


def analyze_run_dir(run_dir: Path):
    """Analyze every report of RUN_DIR as one run; write run.db and analysis.json. Returns the Analysis."""
    from gpudoctor.pipeline import analyze_inputs
    from gpudoctor.render.jsonout import render as render_json
    from gpudoctor.store import rundb
    from gpudoctor.store.atomic import atomic_write_text

    for name in (rundir.RUN_DB, rundir.ANALYSIS):  # a stale one would be read instead of the reports
        try:
            (run_dir / name).unlink()
        except FileNotFoundError:
            pass
    analysis = analyze_inputs([str(run_dir)], need_trace=True)
    rundb.save(analysis.trace, run_dir / rundir.RUN_DB)
    atomic_write_text(run_dir / rundir.ANALYSIS, render_json(analysis))
    return analysis


def analyze_and_record(run_dir: Path, manifest: dict, manifest_path: Path, final: bool = True) -> None:
    """Analyze, print the findings, and record in the manifest how the analysis went. Never raises: the
    program's exit code is what the command returns (a signal during the analysis is recorded as such)."""
    if not manifest.get("reports"):
        manifest["analysis"] = {"status": "skipped", "reason": "no analyzable report was collected"}
        rundir.write_json(manifest_path, manifest)
        say(f"nothing to analyze: no report was collected; see {manifest_path}")
        return
    manifest["analysis"] = {"status": "running"}  # stays so only if gpudoctor itself is killed meanwhile
    rundir.write_json(manifest_path, manifest)
    t = time.monotonic()
    try:
        analysis = analyze_run_dir(run_dir)
    except GpudoctorError as e:
        _analysis_failed(run_dir, manifest, manifest_path, str(e))
        return
    except KeyboardInterrupt:
        _analysis_failed(run_dir, manifest, manifest_path, "interrupted (SIGINT during the analysis)")
        return
    except Exception as e:  # one line, never a traceback: the raw reports are safe
        _debug_traceback()
        _analysis_failed(run_dir, manifest, manifest_path, f"internal error: {type(e).__name__}: {_one_line(e)}")
        return
    manifest["analysis"] = {"status": "ok", "seconds": round(time.monotonic() - t, 3), "json": rundir.ANALYSIS,
                            "run_db": rundir.RUN_DB, "findings": len(analysis.findings), "errors": analysis.errors,
                            "done_utc": rundir.iso(time.time_ns())}
    rundir.write_json(manifest_path, manifest)
    try:
        from gpudoctor.render.terminal import render

        render(analysis)
        sys.stdout.flush()
    except (BrokenPipeError, SystemExit):  # rich raises SystemExit(1) on a broken pipe
        _stdout_gone()
    except KeyboardInterrupt:
        say("printing interrupted; the analysis is saved")
    except Exception as e:
        say(f"cannot print the analysis ({type(e).__name__}: {_one_line(e)}); it is in {run_dir / rundir.ANALYSIS}")
    if final:
        say(f"run saved in {run_dir} (manifest.json, raw/, run.db, analysis.json)")


def _stdout_gone() -> None:
    """Our stdout is a closed pipe (``gpudoctor profile ... | head``): stop writing to it, keep the exit code."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _window_text(capture: dict) -> str:
    if not capture:
        return "no window"
    if capture.get("whole_program"):
        return "whole program"
    src = capture.get("step_source")
    if src in (None, "time"):
        return f"clock window: {capture.get('stopped') or 'program end'}"
    return (f"{capture.get('steps_recorded')} steps by {src} after skipping {capture.get('skipped_steps')}"
            + (f"; step {capture['median_step_ms']:.1f} ms" if capture.get("median_step_ms") else ""))


def _debug_traceback() -> None:
    if os.environ.get("GPUDOCTOR_DEBUG"):
        import traceback

        traceback.print_exc()


def _analysis_failed(run_dir: Path, manifest: dict, manifest_path: Path, why: str) -> None:
    manifest["analysis"] = {"status": "failed", "error": why}
    rundir.write_json(manifest_path, manifest)
    say(f"analysis failed: {why}")
    say(f"the raw reports are kept in {run_dir / rundir.RAW}; retry with: gpudoctor analyze {run_dir}")

