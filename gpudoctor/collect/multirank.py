"""Multi-rank jobs: each rank's manifest merged into the job's manifest.json, and ``--nproc N`` (torchrun
launching N ranks of ``gpudoctor profile`` into one run directory). Layout: gpudoctor/collect/rundir.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gpudoctor import __version__
from gpudoctor.collect import rundir
from gpudoctor.collect.session import PARENT_ENV
from gpudoctor.collect.supervise import Supervisor, exit_code_of, say, signame

if TYPE_CHECKING:
    from gpudoctor.collect.session import Session


def finish_rank(s: Session, manifest: dict) -> None:
    """Write this rank's manifest and merge every rank's into manifest.json (one rank at a time); the rank
    that finishes last analyzes the job (the ``--nproc`` launcher does when there is one)."""
    run_dir = s.run.path
    s.run.write_manifest(manifest)
    with rundir.locked(run_dir):
        per_rank = rundir.rank_manifests(run_dir)
        if s.world_size:
            per_rank = {k: v for k, v in per_rank.items() if k < s.world_size}
        merged = rundir.merge_manifests(per_rank, s.world_size)
        rundir.write_json(s.run.job_manifest_path, merged)
        # a rank still running has only its start-time manifest: it is not done
        done = sum(1 for m in per_rank.values() if m.get("outcome") != "running")
        last = s.world_size is not None and done >= s.world_size
    if s.parent_dir:
        return  # the --nproc launcher analyzes the job
    if last or (s.world_size is None and s.rank == 0):
        s.analyze(run_dir, merged, s.run.job_manifest_path, True)
    else:
        say(f"{s.label}results saved in {run_dir}; {done} of {s.world_size or '?'} ranks done "
            "(the last rank to finish analyzes the job)")


def rank_options(s: Session, run_dir: Path, backend: str) -> list[str]:
    """The ``gpudoctor profile`` options every launched rank gets: the launcher's, with the backend resolved
    once (so every rank uses the same) and the shared run directory."""
    a = s.options
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
                     ("--no-stacks", not a.stacks), ("--op-stacks", a.op_stacks),
                     ("--no-gpu-metrics", a.no_gpu_metrics)):
        if on:
            inner.append(flag)
    return inner


def launch(s: Session, run_dir: Path, backend: str) -> int:
    """--nproc N: torchrun N ranks of `gpudoctor profile` into ``run_dir`` (prepared), merge their manifests,
    analyze the job; the job's exit code."""
    nproc = s.options.nproc or 1
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "gpudoctor", "profile", *rank_options(s, run_dir, backend), "--", *s.cmd]
    env = dict(s.env, **{PARENT_ENV: str(run_dir.resolve())})
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    sup = Supervisor(argv, env, group=False)  # torchrun forwards signals to its workers
    rc, start_ns, end_ns = sup.run()
    launched = {"tool": "torchrun", "nproc": nproc, "command": argv, "exit_code": exit_code_of(rc)[0],
                "interrupted_by": signame(sup.interrupted_by), "start_utc": rundir.iso(start_ns),
                "end_utc": rundir.iso(end_ns)}
    per_rank = {k: v for k, v in rundir.rank_manifests(run_dir).items() if k < nproc}
    path = run_dir / rundir.MANIFEST
    if not per_rank:
        say(f"no rank wrote its results (torchrun exit {rc}); nothing to analyze in {run_dir}")
        rundir.write_json(path, {
            "manifest_version": rundir.MANIFEST_VERSION, "gpudoctor_version": __version__, "command": s.cmd,
            "cwd": os.getcwd(), "outcome": "not_started", "exit_code": exit_code_of(rc)[0],
            "what_happened": f"torchrun exited with {rc} before any rank finished", "reports": [], "files": [],
            "launched_by": launched, "start_utc": rundir.iso(start_ns), "end_utc": rundir.iso(end_ns)})
        return exit_code_of(rc)[0] or 1
    merged = rundir.merge_manifests(per_rank, nproc, launched_by=launched)
    s.analyze(run_dir, merged, path, True)  # writes the merged manifest first
    code = merged.get("exit_code")
    if code is None:
        code = exit_code_of(rc)[0]
    if sup.interrupted_by and not code:
        code = 128 + sup.interrupted_by
    return int(code)
