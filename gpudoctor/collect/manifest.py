"""manifest.json: what a backend run produced (``Result``), the manifest written from it at the start, when
the capture window closes and at the end, and the manifest read back (checked) by whoever analyzes a run
directory. Field by field: docs/long-jobs.md and gpudoctor/collect/rundir.py (the layout).
"""

from __future__ import annotations

import os
import platform
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gpudoctor import __version__
from gpudoctor.collect.rundir import MANIFEST, MANIFEST_VERSION, iso
from gpudoctor.errors import InputError
from gpudoctor.readers.limits import read_json_file

if TYPE_CHECKING:
    from gpudoctor.collect.session import Session

MAX_RANK = 1 << 24


@dataclass
class Result:
    """What one backend run produced."""

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
        if self.signal:
            return "killed"
        return "completed" if self.exit_code == 0 else "failed"


# ---------------------------------------------------------------------------------------------------
# Writing


def build(s: Session, res: Result, end_ns: int) -> dict:
    """The manifest of a run that ended at ``end_ns`` (or of the run so far: see ``running``)."""
    a = s.options
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
    facts, gpu_info = s.facts, s.gpu_info
    tools = {}
    if s.backend == "nsys":
        tools["nsys"] = {"path": facts.get("path"), "found_by": facts.get("found_by"), "version": facts.get("version")}
    if s.backend == "torch":
        tools["torch_profiler"] = {"interpreter": facts.get("interpreter")}
    info = s.rank_info
    m = {
        "manifest_version": MANIFEST_VERSION,
        "gpudoctor_version": __version__,
        "command": s.cmd,
        "command_line": shlex.join(s.cmd),
        "cwd": os.getcwd(),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "start_utc": iso(s.start_ns), "end_utc": iso(end_ns),
        "start_ns": s.start_ns, "end_ns": end_ns, "wall_s": round((end_ns - s.start_ns) / 1e9, 3),
        "program_start_ns": res.program_start_ns, "program_end_ns": res.program_end_ns,
        "exit_code": code, "program_exit_code": res.program_exit_code if res.program_exit_code is not None else code,
        "signal": res.signal, "interrupted_by": res.interrupted_by,
        "outcome": res.outcome(),
        "what_happened": f"{what}; collected: {collected}"
                         + (f"; problems: {'; '.join(res.problems)}" if res.problems else ""),
        "rank": s.rank, "world_size": s.world_size,
        "local_rank": info.local_rank if info else None,
        "rank_source": info.source if info else None,
        "launcher": info.launcher if info else None,
        "backend": s.backend, "backend_reason": s.backend_reason,
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
        "versions": versions(res),
        "tools": tools,
        "backend_details": res.backend_facts,
        "capture": res.capture,
        "nvml": s.nvml_summary,
        "gpu_state": (s.nvml_summary or {}).get("gpu_state"),  # the capture's conditions, for the gate
        "reports": res.reports,
        "files": res.files,
        "notes": res.notes,
        "problems": res.problems,
    }
    if gpu_info.get("error"):
        m["nvml"] = dict(m["nvml"] or {}, error=gpu_info["error"])
    return m


def running(s: Session, res: Result) -> dict:
    """The manifest while the program runs (written at the start and when the window closes): the run so
    far, with "reports_expected" so that a killed gpudoctor still leaves an analyzable directory."""
    import time

    m = build(s, res, time.time_ns())
    m.update(outcome="running", exit_code=None, program_exit_code=None, end_utc=None, end_ns=None, wall_s=None,
             what_happened=f"the program is running under gpudoctor (pid {os.getpid()})",
             reports_expected=s.run.expected_reports(s.backend, nvml=not s.options.no_nvml))
    return m


def incomplete(s: Session, res: Result, code: int, error: str) -> dict:
    """The manifest when ``build`` failed: what is sure, and why the rest is missing."""
    return {"manifest_version": MANIFEST_VERSION, "gpudoctor_version": __version__,
            "command": s.cmd, "exit_code": code, "signal": res.signal,
            "interrupted_by": res.interrupted_by, "outcome": res.outcome(), "backend": s.backend,
            "rank": s.rank, "world_size": s.world_size, "reports": res.reports,
            "files": res.files, "problems": res.problems + [f"manifest incomplete: internal error {error}"]}


def versions(res: Result) -> dict:
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


# ---------------------------------------------------------------------------------------------------
# Reading


def read_manifest(run_dir: Path) -> dict:
    """The manifest as a dict whose ``reports`` is a list of {"path": str, "rank": int | None} and whose
    ``gpus`` is a list of dicts; a one-line InputError naming manifest.json otherwise."""
    path = Path(run_dir) / MANIFEST
    try:
        doc = read_json_file(path, "a run manifest")
    except InputError as e:
        raise InputError(path, f"unreadable manifest: {e.problem}") from None
    if not isinstance(doc, dict):
        raise InputError(path, f"unreadable manifest: a JSON {type(doc).__name__}, expected an object")
    reports = doc.get("reports", [])
    if not isinstance(reports, list):
        raise InputError(path, f"unreadable manifest: reports is a {type(reports).__name__}, expected a list")
    for i, rep in enumerate(reports):
        if not isinstance(rep, dict) or not isinstance(rep.get("path"), str) or not rep["path"]:
            raise InputError(path, f"unreadable manifest: reports[{i}] has no path")
        rank = rep.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < MAX_RANK):
            raise InputError(path, f"unreadable manifest: reports[{i}].rank is {str(rank)[:40]!r}, "
                                   "expected a rank number")
    gpus = doc.get("gpus")
    if gpus is not None and not isinstance(gpus, list):
        raise InputError(path, f"unreadable manifest: gpus is a {type(gpus).__name__}, expected a list")
    for i, g in enumerate(gpus or []):
        for key in ("device_id", "memory_bytes", "max_sm_clock_mhz"):
            v = g.get(key) if isinstance(g, dict) else None
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 2**62):
                raise InputError(path, f"unreadable manifest: gpus[{i}].{key} is {str(v)[:40]!r}, expected a number")
    return doc


def reports_to_read(run_dir: Path, manifest: dict) -> list[dict]:
    """The reports to analyze: those the manifest lists; for a run whose gpudoctor was killed (still
    "running", no list) those of "reports_expected" that exist, one timeline per rank (the SQLite export
    before the .nsys-rep)."""
    reports = manifest.get("reports") or []
    if reports or manifest.get("outcome") != "running":
        return reports
    out, timeline_ranks = [], set()
    for rep in manifest.get("reports_expected") or []:
        if not isinstance(rep, dict) or not isinstance(rep.get("path"), str):
            continue
        p = Path(run_dir) / rep["path"]
        if not p.is_file() or p.stat().st_size == 0:
            continue
        if rep.get("format") != "nvml_csv":
            if rep.get("rank") in timeline_ranks:
                continue
            timeline_ranks.add(rep.get("rank"))
        out.append(rep)
    return out
