"""gpudoctor profile [OPTIONS] -- CMD... : run a program under a profiler, keep the reports, analyze them.

The program's output goes to the terminal as usual; gpudoctor's own lines start with "gpudoctor:" and go
to stderr; the findings are printed at the end. The exit code is the program's (128+N when it ended by
signal N), whatever happened to the profiling. This module parses the options and strings the steps
together: the collection is gpudoctor.collect.session (backends, run directory, manifest), the analysis
gpudoctor.pipeline. Layout of the run directory: gpudoctor.collect.rundir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gpudoctor.cli.base import Command
from gpudoctor.collect import backends, multirank, rundir
from gpudoctor.collect.backends import BACKENDS
from gpudoctor.collect.ranks import is_multi_rank, job_key
from gpudoctor.collect.session import DEFAULT_GPU_METRICS_HZ, DEFAULT_NSYS_TIMEOUT_S, ProfileOptions, Session
from gpudoctor.collect.supervise import debug_traceback, say
from gpudoctor.collect.window import WindowSpec
from gpudoctor.errors import GpudoctorError, one_line

if TYPE_CHECKING:
    from gpudoctor.analyzers.analysis import Analysis


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
                            "that make the GPU wait; with nsys also its native CPU samples, and a kernel launch "
                            "timed in a bare process before nsys starts (a few seconds: what a launch costs "
                            "without nsys); on by default")
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
        cmd = list(args.cmd or [])
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        self.cmd = cmd
        self.options = ProfileOptions.from_args(args)
        self.session = Session.from_env(cmd, dict(os.environ if env is None else env), self.options,
                                        analyze_and_record)

    # ------------------------------------------------------------------ checks before anything runs

    def validate(self) -> None:
        a = self.options
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
            if a.nproc > 1 and (is_multi_rank(self.session.rank_info) or self.session.parent_dir):
                raise GpudoctorError("--nproc launches the ranks itself: do not also run gpudoctor under "
                                     "torchrun/srun/mpirun")
        if a.kernels and (self.session.multi or (a.nproc or 1) > 1):
            raise GpudoctorError("--kernels runs the program a second time under Nsight Compute, which does not "
                                 "work for a multi-rank job: profile kernels in a single-process run")

    def check_program(self) -> None:
        exe = self.cmd[0]
        if os.sep in exe:
            if not os.path.exists(exe):
                raise GpudoctorError(f"{exe}: no such file", 127)
            if not os.access(exe, os.X_OK) or os.path.isdir(exe):
                raise GpudoctorError(f"{exe}: not an executable", 126)
        elif not shutil.which(exe, path=self.session.env.get("PATH", os.defpath)):
            raise GpudoctorError(f"{exe}: command not found", 127)

    def choose_run_dir(self) -> Path:
        from gpudoctor.collect.torch_backend import NotPython, parse_python_command

        if self.options.output:
            return Path(self.options.output)
        try:
            name = parse_python_command(self.cmd).name
        except NotPython:
            name = os.path.basename(self.cmd[0])
        s = self.session
        if s.multi:
            key = job_key(s.env, s.rank_info)
            if key is None:
                raise GpudoctorError("this is one rank of a multi-rank job, and the launcher sets nothing that names "
                                     "the job on every rank: pass the same -o DIR to every rank")
            return rundir.default_run_dir(name, job_key=key)
        return rundir.default_run_dir(name)

    # ------------------------------------------------------------------ main flow

    def run(self) -> int:
        self.validate()
        if self.options.nproc and self.options.nproc > 1:
            return self.launch_ranks()
        self.check_program()
        s = self.session
        run_dir = self.choose_run_dir()
        backend, why, facts = backends.choose(s)
        run = s.open(run_dir)
        with run.running():
            say(f"{s.label}backend {backend}" + ("" if why == "asked for" else f" ({why})") + f"; run directory {run_dir}")
            result, manifest, code = s.collect(backend, why, facts)
            if s.multi:
                multirank.finish_rank(s, manifest)
            elif s.early is not None:  # the window was analyzed while the program ran: keep that analysis
                manifest["analysis"] = s.early
                run.write_manifest(manifest)
                say(f"run saved in {run_dir} (the findings above are from the capture window)")
            else:  # analyze_and_record writes the manifest first
                analyze_and_record(run_dir, manifest, run.manifest_path)
        if result.stopped_after_capture and s.early is not None and s.early.get("status") == "ok":
            return 0  # the user asked for the program to be ended: that is success
        return code

    def launch_ranks(self) -> int:
        """--nproc N: torchrun N ranks of `gpudoctor profile` into one run directory, then analyze it."""
        self.check_program()
        run_dir = self.choose_run_dir()
        backend, why, _facts = backends.choose(self.session)  # resolved once, so every rank uses the same
        rundir.prepare(run_dir, self.options.force)
        say(f"launching {self.options.nproc} ranks with torchrun, backend {backend}"
            + ("" if why == "asked for" else f" ({why})") + f"; run directory {run_dir}")
        return multirank.launch(self.session, run_dir, backend)


# ---------------------------------------------------------------------------------------------------
# Analysis: one call


def analyze_run_dir(run_dir: Path) -> Analysis:
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
        debug_traceback()
        _analysis_failed(run_dir, manifest, manifest_path, f"internal error: {type(e).__name__}: {one_line(e)}")
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
        say(f"cannot print the analysis ({type(e).__name__}: {one_line(e)}); it is in {run_dir / rundir.ANALYSIS}")
    if final:
        say(f"run saved in {run_dir} (manifest.json, raw/, run.db, analysis.json)")


def _stdout_gone() -> None:
    """Our stdout is a closed pipe (``gpudoctor profile ... | head``): stop writing to it, keep the exit code."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _analysis_failed(run_dir: Path, manifest: dict, manifest_path: Path, why: str) -> None:
    manifest["analysis"] = {"status": "failed", "error": why}
    rundir.write_json(manifest_path, manifest)
    say(f"analysis failed: {why}")
    say(f"the raw reports are kept in {run_dir / rundir.RAW}; retry with: gpudoctor analyze {run_dir}")

