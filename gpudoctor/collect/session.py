"""One ``gpudoctor profile`` collection: the options, the run directory, the NVML sampler beside the
backend, the backend's run, ``--kernels``, the capture window's early analysis, and the manifest.

The command line (gpudoctor/cli/profile.py) parses the options and analyzes; gpudoctor.collect.backends
picks the backend; this module collects. It calls back into the command for the analysis (``Session.analyze``), which lives in a
higher layer: a window analyzed while the program runs on, and the whole run at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpudoctor.collect import manifest as manifests
from gpudoctor.collect.manifest import Result
from gpudoctor.collect.ranks import RankInfo, detect_rank, is_multi_rank
from gpudoctor.collect.rundir import RunDirectory
from gpudoctor.collect.supervise import Supervisor, debug_traceback, say
from gpudoctor.collect.window import WindowSpec
from gpudoctor.errors import GpudoctorError, one_line

PARENT_ENV = "GPUDOCTOR_PROFILE_PARENT"  # set by --nproc for the ranks it launches
DEFAULT_NSYS_TIMEOUT_S = 600.0
DEFAULT_GPU_METRICS_HZ = 1000
MULTI_RANK_SKIP = 10  # ranks must agree on the window without talking: a fixed skip, not "until settled"

# (run directory, its manifest, the manifest's path, final) -> None; records the analysis in the manifest
Analyze = Callable[[Path, dict, Path, bool], None]


@dataclass
class ProfileOptions:
    """The options of ``gpudoctor profile`` (names as on the command line, ``-`` -> ``_``)."""

    backend: str = "auto"
    output: str | None = None
    force: bool = False
    no_nvml: bool = False
    nvml_interval: float = 0.1
    nsys_args: str | None = None
    nsys_timeout: float = DEFAULT_NSYS_TIMEOUT_S
    steps: int = WindowSpec.steps
    skip: int | None = None
    delay: float | None = None
    duration: float | None = None
    whole: bool = False
    stop_after_capture: bool = False
    no_gpu_metrics: bool = False
    gpu_metrics_frequency: int = DEFAULT_GPU_METRICS_HZ
    stacks: bool = True
    op_stacks: bool = False
    capture_range: str | None = None
    nproc: int | None = None
    kernels: bool = False
    nvtx_range: str | None = None
    kernel_regex: str | None = None
    launch_skip: int = 0
    launch_count: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProfileOptions:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Session:
    cmd: list[str]
    env: dict[str, str]
    options: ProfileOptions
    analyze: Analyze
    rank_info: RankInfo | None = None
    parent_dir: str | None = None  # set when this process is a rank launched by `--nproc`
    # Set by open() and collect():
    run: RunDirectory = field(init=False)
    backend: str = ""
    backend_reason: str = ""
    facts: dict = field(default_factory=dict)
    gpu_info: dict = field(default_factory=dict)
    start_ns: int = 0
    nvml_summary: dict = field(default_factory=dict)
    early: dict | None = None  # the window's analysis, made while the program ran on

    @classmethod
    def from_env(cls, cmd: list[str], env: dict[str, str], options: ProfileOptions, analyze: Analyze) -> Session:
        return cls(cmd, env, options, analyze, rank_info=detect_rank(env), parent_dir=env.get(PARENT_ENV))

    @property
    def multi(self) -> bool:
        return is_multi_rank(self.rank_info) or bool(self.parent_dir)

    @property
    def rank(self) -> int | None:
        return self.rank_info.rank if self.rank_info else None

    @property
    def world_size(self) -> int | None:
        return self.rank_info.world_size if self.rank_info else None

    @property
    def label(self) -> str:
        """Prefix of this process's lines: "rank N: " for a rank of a job."""
        return f"rank {self.rank}: " if self.multi and self.rank is not None else ""

    # ------------------------------------------------------------------ the run directory

    def open(self, run_dir: Path) -> RunDirectory:
        """Prepare ``run_dir`` for this process's files (``--force`` clears an earlier run there)."""
        self.run = RunDirectory(run_dir, self.rank, self.multi)
        self.run.prepare(self.options.force and not self.parent_dir, clear_shared=not self.parent_dir)
        return self.run

    def pysamples_path(self) -> str | None:
        """Where the agent writes the window's Python stack samples (beside the report, same stem)."""
        return str(self.run.raw_file(".pysamples.json")) if self.options.stacks else None

    def window_spec(self) -> dict:
        a = self.options
        skip = a.skip if a.skip is not None else (MULTI_RANK_SKIP if self.multi else None)
        spec = WindowSpec(steps=a.steps, skip=skip, delay_s=a.delay or 0.0, duration_s=a.duration, whole=a.whole)
        if a.duration:
            spec.time_window_s = a.duration
        if a.delay is not None:
            spec.no_step_wait_s = a.delay  # no step by then: the clock opens the window
        return spec.to_dict()

    # ------------------------------------------------------------------ the collection

    def collect(self, backend: str, why: str, facts: dict) -> tuple[Result, dict, int]:
        """Run the program under ``backend`` (NVML sampled beside it, ``--kernels`` after it); returns what
        it produced, the final manifest (not yet written) and the exit code to report."""
        from gpudoctor.collect import backends, run_nsys, run_torch

        self.backend, self.backend_reason, self.facts = backend, why, facts
        self.start_ns = time.time_ns()
        self.gpu_info = self._gpu_info()
        self.early = None
        # Written now and at each change, so that a killed gpudoctor still leaves an analyzable directory
        self.write_running_manifest(Result())
        sampler, nvml_summary = self._start_sampler()
        runner: Callable[[Session], Result] = {"nsys": run_nsys.run, "torch": run_torch.run,
                                                "nvml": backends.run_plain}[backend]
        try:
            result = runner(self)
        except KeyboardInterrupt:  # before the program's supervisor took over the signals
            result = Result(exit_code=130, interrupted_by="SIGINT", started=False)
            result.notes.append("interrupted while the program was being started")
        finally:
            if sampler is not None:
                nvml_summary = sampler.stop()
        end_ns = time.time_ns()
        if sampler is not None:
            self._add_nvml_report(result, sampler, nvml_summary)
        else:
            self.nvml_summary = nvml_summary
        if self.options.kernels and result.exit_code == 0 and not result.interrupted_by:
            self._run_kernels(result)
        elif self.options.kernels:
            result.notes.append("kernel metrics not collected: the program did not end successfully")
        code = self._exit_code(result)
        try:
            manifest = manifests.build(self, result, end_ns)
        except Exception as e:  # never lose the run over a fact we could not gather
            debug_traceback()
            manifest = manifests.incomplete(self, result, code, f"{type(e).__name__}: {one_line(e)}")
        for p in result.problems:
            say(f"{self.label}{p}")
        if result.outcome() == "killed":
            say(f"{self.label}the program was killed by {result.signal}")
        return result, manifest, code

    def _exit_code(self, result: Result) -> int:
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
        return code

    # ------------------------------------------------------------------ the window, analyzed while the program runs

    def write_running_manifest(self, res: Result) -> dict:
        """Write the manifest of the run so far; returns it."""
        manifest = manifests.running(self, res)
        try:
            self.run.write_manifest(manifest)
        except OSError as e:
            say(f"{self.label}cannot write {self.run.manifest_path}: {e}")
        return manifest

    def window_closed(self, res: Result, reports: list[dict], sup: Supervisor | None) -> None:
        """The capture window is recorded: analyze it now and print the findings, while the program runs on."""
        if self.early is not None or self.multi or not reports:
            return
        manifest = self.write_running_manifest(dataclasses.replace(res, reports=list(reports)))
        path = self.run.manifest_path
        say(f"{self.label}capture window recorded ({window_text(res.capture)}): analyzing it now")
        self.analyze(self.run.path, manifest, path, False)
        self.early = manifest.get("analysis") or {"status": "unknown"}
        self.early["while_program_ran"] = True
        if sup is not None and sup.proc is not None and sup.proc.poll() is None and not sup.received:
            if self.options.stop_after_capture:
                say(f"{self.label}--stop-after-capture: ending the program")
                res.stopped_after_capture = True
                sup.send(signal.SIGINT)
                sup.received_at = time.monotonic()  # escalate to SIGTERM/SIGKILL if it does not stop
                sup.received.append(signal.SIGINT)
            else:
                say(f"{self.label}the program runs on unprofiled; gpudoctor waits for it and passes its exit code "
                    "through (Ctrl-C stops it; --stop-after-capture ends it next time)")

    def keep_program_logs(self, res: Result) -> None:
        for name in ("program.stdout.log", "program.stderr.log"):
            if (self.run.raw / name).exists():
                res.files.append(self.run.file(self.run.raw / name, "program_output"))

    # ------------------------------------------------------------------ NVML beside the backend

    def _gpu_info(self) -> dict:
        if "nvml" in self.facts:
            return self.facts["nvml"]
        if self.options.no_nvml:
            return {}
        from gpudoctor.collect import nvml

        return nvml.device_info(self.env)

    def _sampler_devices(self) -> list[int] | None:
        """Every visible GPU for a single process; the rank's own (LOCAL_RANK-th) GPU for a rank."""
        if not self.multi:
            return None
        gpus = [g["device_id"] for g in self.gpu_info.get("gpus", [])]
        if not gpus:
            return None
        local = self.rank_info.local_rank if self.rank_info and self.rank_info.local_rank is not None else 0
        return [gpus[local % len(gpus)]] if len(gpus) > 1 else gpus

    def metrics_devices(self) -> str:
        """nsys --gpu-metrics-devices: one sampler per GPU, so each rank samples its own."""
        if self.multi and self.rank_info and self.rank_info.local_rank is not None:
            return str(self.rank_info.local_rank)
        return "all"

    def _start_sampler(self) -> tuple[Any, dict]:
        if self.options.no_nvml:
            return None, {"enabled": False}
        if "error" in self.gpu_info:
            say(f"{self.label}{self.gpu_info['error']}: no NVML samples (continuing)")
            return None, {"enabled": True, "error": self.gpu_info["error"]}
        from gpudoctor.collect.nvml import NvmlSampler

        sampler = NvmlSampler(self.run.nvml_csv, devices=self._sampler_devices(), interval_s=self.options.nvml_interval,
                              env=self.env)
        if not sampler.start():
            say(f"{self.label}{sampler.error}: no NVML samples (continuing)")
            return None, {"enabled": True, "error": sampler.error}
        return sampler, {}

    def _add_nvml_report(self, result: Result, sampler: Any, summary: dict) -> None:
        summary["enabled"] = True
        summary["path"] = self.run.rel(sampler.path)
        if sampler.samples:
            result.reports.append(self.run.report(sampler.path, "nvml_csv"))
        result.files.append(self.run.file(sampler.path, "nvml_csv"))
        self.nvml_summary = summary

    # ------------------------------------------------------------------ --kernels

    def _run_kernels(self, res: Result) -> None:
        from gpudoctor.collect import ncu

        a = self.options
        say(f"{self.label}collecting kernel metrics with Nsight Compute (runs the program again)")
        base = self.run.raw / ("kernels" if not self.multi else f"{self.run.stem}.kernels")
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
        for key, kind in (("report", "ncu_rep"), ("raw_csv", "ncu_csv"), ("details_csv", "ncu_details_csv"),
                          ("log", "log")):
            if out.get(key) and Path(out[key]).exists():
                res.files.append(self.run.file(Path(out[key]), kind))
        if out.get("raw_csv") and Path(out["raw_csv"]).exists():
            res.reports.append(self.run.report(Path(out["raw_csv"]), "ncu_csv"))
        if out.get("unavailable_metrics"):
            res.notes.append(f"ncu: metrics this GPU lacks: {', '.join(out['unavailable_metrics'])}")
        res.backend_facts["ncu_command"] = [str(x) for x in out.get("command", [])]


def window_text(capture: dict) -> str:
    """The capture window in a few words, for gpudoctor's own lines."""
    if not capture:
        return "no window"
    if capture.get("whole_program"):
        return "whole program"
    src = capture.get("step_source")
    if src in (None, "time"):
        return f"clock window: {capture.get('stopped') or 'program end'}"
    return (f"{capture.get('steps_recorded')} steps by {src} after skipping {capture.get('skipped_steps')}"
            + (f"; step {capture['median_step_ms']:.1f} ms" if capture.get("median_step_ms") else ""))

