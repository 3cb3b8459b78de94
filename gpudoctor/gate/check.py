"""One gate decision from run specs, as ``gpudoctor gate`` makes it: the options resolved, the runs read (run
directories, analysis.json, traces, ``@NAME`` baselines, or candidates recorded with ``gpudoctor profile``),
a saved baseline's calibrated tolerances applied, then ``compare``; and ``calibrate`` (a tolerance from
repeated runs). The command line only renders what these return."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gpudoctor.analyzers.config import Config
from gpudoctor.collect.rundir import MANIFEST
from gpudoctor.errors import GpudoctorError
from gpudoctor.gate import baselines
from gpudoctor.gate.compare import GateResult, compare
from gpudoctor.gate.config import CommandLine, build_options, read_setup
from gpudoctor.gate.environment import check_environment
from gpudoctor.gate.inputs import load_run
from gpudoctor.gate.run import METRICS, RunData, UserMetric


def load_side(specs: list[str], acfg: Config, user_metrics: list[UserMetric], gpu_for_names: str,
              baseline_directory: str | None, docs: list[dict]) -> list[RunData]:
    """The runs of one side; ``@NAME`` is the saved baseline NAME for ``gpu_for_names`` (its document is
    appended to ``docs``)."""
    runs = []
    for s in specs:
        if s.startswith("@"):
            rs, doc, _path = baselines.load(s[1:], gpu_for_names, baseline_directory)
            docs.append(doc)
            runs.extend(rs)
        else:
            runs.append(load_run(s, acfg, user_metrics))
    return runs


def record_candidates(candidate_cmd: str, repeat: int, profile_args: str = "", runs_dir: str | None = None,
                      quiet: bool = False) -> list[str]:
    """Run ``candidate_cmd`` under gpudoctor profile ``repeat`` times; the run directories."""
    if repeat < 1 or repeat > 100:
        raise GpudoctorError("--repeat must be between 1 and 100")
    cmd = shlex.split(candidate_cmd)
    if not cmd:
        raise GpudoctorError("--candidate-cmd is empty")
    root = Path(runs_dir or Path("gpudoctor-runs") / time.strftime("gate-%Y%m%dT%H%M%SZ", time.gmtime()))
    out = []
    for i in range(1, repeat + 1):
        run_dir = root / f"candidate_{i}"
        argv = [sys.executable, "-m", "gpudoctor", "profile", "-o", str(run_dir), *shlex.split(profile_args),
                "--", *cmd]
        rc = subprocess.run(argv, stdout=sys.stderr if not quiet else subprocess.DEVNULL).returncode
        if rc != 0 or not (run_dir / MANIFEST).is_file():
            raise GpudoctorError(f"candidate command failed (exit {rc}) on run {i} of {repeat}: {shlex.join(cmd)}")
        out.append(str(run_dir))
    return out


def gate(baseline: list[str], candidate: list[str], config_path: str | None, cli: CommandLine,
         baseline_dir: str | None = None) -> tuple[GateResult, float]:
    """Compare the candidate runs against the baseline runs; (result, seconds it took)."""
    if not baseline or not candidate:
        raise GpudoctorError("gate needs --baseline RUN... and --candidate RUN... or --candidate-cmd 'CMD' "
                             "(or: gate calibrate --runs ...)")
    t0 = time.monotonic()
    s = read_setup(config_path, baseline_dir)
    o = build_options(cli, s.table)
    cands = load_side(candidate, s.analyzers, o.user_metrics, "", s.baseline_dir, [])
    docs: list[dict] = []
    bases = load_side(baseline, s.analyzers, o.user_metrics, cands[0].gpu_name, s.baseline_dir, docs)
    if docs and len(docs) == 1:
        cal = baselines.calibrated_tolerances(docs[0])
        if cal:
            o = build_options(cli, s.table, cal)
    return compare(bases, cands, o), time.monotonic() - t0


@dataclass
class Calibration:
    runs: list[RunData]
    metrics: dict  # metric -> {"medians", "spread", "tolerance", ...} (baselines.calibration)
    gated: list[str]  # the metrics that decide
    suggested_tolerance: float | None
    method: str = "tolerance = max(3 x (std of per-run medians / their mean), 1%), rounded up to 0.1%"

    def to_dict(self) -> dict:
        return {"runs": [r.label for r in self.runs], "metrics": self.metrics,
                "suggested_tolerance": self.suggested_tolerance, "method": self.method}


def calibrate(specs: list[str], config_path: str | None, cli: CommandLine,
              baseline_dir: str | None = None) -> Calibration:
    """A tolerance from repeated runs of the same program (the spread of their per-run medians)."""
    if len(specs) < 2:
        raise GpudoctorError("calibrate needs at least 2 runs of the same program (3 or more recommended): "
                             "gpudoctor gate calibrate --runs R1 R2 R3")
    s = read_setup(config_path, baseline_dir)
    o = build_options(cli, s.table)
    runs = load_side(specs, s.analyzers, o.user_metrics, "", s.baseline_dir, [])
    hard, _ = check_environment(runs[:1], runs[1:])
    if hard and not cli.allow_mismatch:
        raise GpudoctorError("refusing to calibrate on runs from different environments: " + "; ".join(hard)
                             + " (pass --allow-mismatch to anyway)")
    step_metrics = [m for m, s in METRICS.items() if s.per == "step"] + [u.name for u in o.user_metrics]
    cal = baselines.calibration(runs, [m for m in step_metrics if any(r.samples.get(m) for r in runs)])
    gated = list(o.gated) + [u.name for u in o.user_metrics if u.gate]
    tol = [c["tolerance"] for m, c in cal.items() if m in gated and c.get("tolerance")]
    return Calibration(runs, cal, gated, max(tol) if tol else None)
