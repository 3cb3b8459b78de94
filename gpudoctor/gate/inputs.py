"""Reading one run for the gate: a run directory, an analysis.json (with or without its ``gate`` block), a
saved gate run, a trace file or several files of one run; plus user metrics parsed from the program's
output."""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from gpudoctor.analyzers.config import Config
from gpudoctor.analyzers.runner import TraceAnalysis, analyze_trace
from gpudoctor.collect.rundir import MANIFEST, holds_run
from gpudoctor.errors import GpudoctorError, InputError
from gpudoctor.gate.environment import manifest_env
from gpudoctor.gate.run import RUN_FORMAT, RunData, UserMetric, carriers
from gpudoctor.gate.samples import combine_steps, run_from_trace
from gpudoctor.model.trace import Trace
from gpudoctor.readers.inputs import load_inputs


def analyze(trace: Trace, analyzer_config: Config | dict | None) -> TraceAnalysis:
    return analyze_trace(trace, analyzer_config)


def _is_analysis_json(path: Path) -> dict | None:
    if not path.is_file() or not path.name.endswith(".json"):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
            # analysis.json and saved gate runs say so in their first keys; a profiler trace never does.
            if not head.lstrip().startswith("{") or ('"gpudoctor_version"' not in head and RUN_FORMAT not in head):
                return None
            data = json.loads(head + f.read())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, dict) and "ranks" in data and "schema_version" in data:
        return data
    if isinstance(data, dict) and data.get("format") == RUN_FORMAT:
        return data
    return None


def run_from_analysis_json(data: dict, label: str) -> RunData:
    """A RunData from analysis.json: full when it carries the ``gate`` block, else what ``ranks[]`` allow."""
    if data.get("format") == RUN_FORMAT:
        return RunData.from_dict(data, label=label)
    findings = list(data.get("findings") or [])
    if isinstance(data.get("gate"), dict):
        run = RunData.from_dict(data["gate"], label=label, findings=findings)
        run.source = "analysis_json"
        return run
    ranks = data.get("ranks") or []
    per_rank = []
    for r in ranks:
        d = (r.get("steps") or {}).get("durations_ns")
        per_rank.append(None if d is None else np.asarray(d, dtype=float))
    if not ranks or any(p is None for p in per_rank):
        raise InputError(label, "analysis.json has no per-step durations (ranks[].steps.durations_ns or the 'gate' "
                                "block); pass the run directory or the trace instead")
    run = RunData(label=label, source="analysis_json", findings=findings, attribution_complete=False)
    run.env = {"gpus": sorted(set(str(r.get("device", "")) for r in ranks if r.get("device"))), "gpu_count": len(ranks)}
    v = combine_steps(per_rank, run.notes, "step_time")
    run.samples["step_time"] = v or []
    for key in ("gpu_busy_ns", "period_ns"):
        vals = [(r.get("steps") or {}).get(key) for r in ranks]
        if all(x is not None for x in vals):
            c = combine_steps([np.asarray(x, dtype=float) for x in vals], run.notes, key)
            if c is not None:
                run.samples["gpu_time" if key == "gpu_busy_ns" else "wall_time"] = c
    run.notes.append("analysis.json without the gate block: attribution from the top 10 kernels only")
    run.steps = int(sum(len(p) for p in per_rank))
    rows = []
    for r in ranks:
        for kk in r.get("top_kernels") or []:
            rows.append([kk.get("name", ""), kk.get("category", ""), int(kk.get("total_ns", 0)), int(kk.get("count", 0))])
    run.kernels = pd.DataFrame(rows, columns=["name", "category", "total_ns", "count"])
    if len(run.kernels):
        run.kernels = run.kernels.groupby(["name", "category"], sort=False).sum().reset_index()
    idle = [1 - float(r["gpu_busy_fraction"]) for r in ranks if r.get("gpu_busy_fraction") is not None]
    if idle:
        run.samples["idle_fraction"] = idle
    for key in ("exposed_comm_fraction", "mbu"):
        vals = [float(f["metrics"][key]) for f in carriers(findings, key)]
        if vals:
            run.samples[key] = vals
    return run



def _user_metric_files(base: Path, stem: str, patterns: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        pat = pat.replace("{stem}", stem)
        for p in sorted(glob.glob(str(base / pat))):
            pp = Path(p)
            if pp.is_file() and pp not in out:
                out.append(pp)
    return out


def _stem(p: Path) -> str:
    name = p.name
    for suf in (".nsys-rep", ".nsys.sqlite", ".sqlite", ".json.gz", ".json", ".pt.trace.json"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return p.stem


def read_user_metrics(paths: list[Path], user_metrics: list[UserMetric], run: RunData) -> None:
    """Parse each user metric from the program's output next to the input (run directory: inside it)."""
    for um in user_metrics:
        try:
            rx = re.compile(um.regex)
        except re.error as e:
            raise GpudoctorError(f"user metric {um.name}: bad regex {um.regex!r}: {e}") from None
        values: list[float] = []
        used: list[str] = []
        for p in paths:
            base, stem = (p, p.name) if p.is_dir() else (p.parent, _stem(p))
            for f in _user_metric_files(base, stem, um.files):
                try:
                    text = f.read_text(errors="replace")
                except OSError:
                    continue
                got = []
                for mt in rx.finditer(text):
                    g = mt.group(1) if rx.groups else mt.group(0)
                    try:
                        got.append(float(g.replace(",", "")))
                    except (TypeError, ValueError):
                        pass
                if got:
                    values.extend(got)
                    used.append(str(f))
                    break  # the first file with matches wins (no double counting of copies)
        if values:
            run.samples[um.name] = values
            run.notes.append(f"{um.name}: {len(values)} values from {', '.join(used)}")


def load_run(spec: str, analyzer_config: Config | dict | None = None, user_metrics: list[UserMetric] | None = None) -> RunData:
    """One run: a run directory, an analysis.json, a saved gate run, a trace file, a directory of per-rank
    traces, or several files of one run joined with commas."""
    parts = [s for s in spec.split(",") if s] if "," in spec and not Path(spec).exists() else [spec]
    paths = [Path(p) for p in parts]
    for p in paths:
        if not p.exists():
            raise InputError(p, "no such file or directory")
    label = spec
    if len(paths) == 1:
        data = _is_analysis_json(paths[0])
        if data is not None:
            try:
                run = run_from_analysis_json(data, label)
            except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
                raise InputError(paths[0], f"malformed analysis.json or gate run: {e}") from None
            if (paths[0].parent / MANIFEST).is_file():  # analysis.json of a run directory
                run.env.update(manifest_env(paths[0].parent))
            if user_metrics:
                read_user_metrics(paths, user_metrics, run)
            return run
    trace, _inputs, errors = load_inputs([str(p) for p in paths])
    if errors or trace is None:
        raise GpudoctorError("; ".join(errors) or f"{spec}: nothing could be read")
    if trace.kernels.empty:
        raise InputError(spec, "no GPU kernels in this run: nothing to compare")
    result = analyze(trace, analyzer_config)
    is_run_dir = len(paths) == 1 and paths[0].is_dir() and holds_run(paths[0])
    run = run_from_trace(trace, result.ranks, result.findings, label, source="run_dir" if is_run_dir else "trace",
                         rank_samples=result.samples)
    if is_run_dir:
        run.env.update(manifest_env(paths[0]))
    if user_metrics:
        read_user_metrics(paths, user_metrics, run)
    return run
