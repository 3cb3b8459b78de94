"""Runs, their per-step metrics, and the comparison of a candidate against a baseline.

A run (``RunData``) is what the gate needs of one recorded run, and nothing more: per-step samples of each
metric, per-kernel / per-category / per-range GPU time of the steady-state steps (for attribution), the
environment (GPU model, driver, software versions) and the findings. It comes from a raw trace, a run
directory, an ``analysis.json`` or a saved baseline, and serializes to a small JSON document
(``RunData.to_dict``) that baselines and ``analysis.json`` carry.

Metrics (lower is better unless said):

``gpu_time``       GPU busy time per steady step: union of kernel and memory-operation time inside the step's
                   GPU span. Gated by default: it measures the GPU work, not the host's launch pace.
``step_time``      GPU span per steady step (``StepWindow.steady['duration_ns']``): first GPU start to last GPU
                   end of the step, idle gaps included. Reported; gate it with ``metrics = [..., "step_time"]``.
``wall_time``      step period: GPU start of a steady step to the GPU start of the next step (the last step has
                   none), i.e. the loop's time per iteration, idle gaps and host stalls included. Reported.
``idle_fraction``  1 - GPU busy fraction of the steady-state window (the gpu_idle finding's when it has one),
                   one value per rank. Reported.
``exposed_comm_fraction``, ``mbu`` (higher is better): from findings' metrics, one value per rank. Reported.
user metrics       numbers parsed from the program's own output with a regex (e.g. tokens/s).

With several ranks in one run, a step's value is the slowest rank's (when every rank has the same number of
steady steps; else the ranks' steps are pooled).
"""

from __future__ import annotations

import glob
import json
import math
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gpudoctor import __version__
from gpudoctor.analyzers.runner import TraceAnalysis, analyze_trace
from gpudoctor.errors import GpudoctorError, InputError
from gpudoctor.gate import stats
from gpudoctor.gate.attribution import attribute
from gpudoctor.model.samples import rank_data
from gpudoctor.model.trace import Trace
from gpudoctor.readers.inputs import load_inputs
from gpudoctor.render.fmt import ns

RUN_FORMAT = "gpudoctor-gate-run"
RUN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str
    unit: str  # ns | fraction | free text (user metrics)
    higher_is_better: bool = False
    per: str = "step"  # step: one value per steady step | rank: one value per rank and run | sample: per match


METRICS: dict[str, MetricSpec] = {
    "gpu_time": MetricSpec("gpu_time", "GPU time per step", "ns"),
    "step_time": MetricSpec("step_time", "GPU span per step", "ns"),
    "wall_time": MetricSpec("wall_time", "wall time per step (step period)", "ns"),
    "idle_fraction": MetricSpec("idle_fraction", "GPU idle fraction", "fraction", per="rank"),
    "exposed_comm_fraction": MetricSpec("exposed_comm_fraction", "exposed communication fraction", "fraction", per="rank"),
    "mbu": MetricSpec("mbu", "memory bandwidth utilization", "fraction", higher_is_better=True, per="rank"),
}
DEFAULT_GATED = ("gpu_time",)
FINDING_METRICS = ("idle_fraction", "exposed_comm_fraction", "mbu")


@dataclass
class UserMetric:
    """A number the program prints, e.g. ``[gate.user_metrics.tokens_per_s] regex = 'tokens/s: ([0-9.]+)'``."""

    name: str
    regex: str
    higher_is_better: bool = True
    unit: str = ""
    files: tuple[str, ...] = ("stdout.log", "stdout.txt", "output.log", "{stem}.log", "{stem}.stdout")
    gate: bool = True
    label: str = ""

    def spec(self) -> MetricSpec:
        return MetricSpec(self.name, self.label or self.name, self.unit, self.higher_is_better, per="sample")


# -- one run ----------------------------------------------------------------------------------------------


@dataclass
class RunData:
    label: str
    source: str = ""  # trace | run_dir | analysis_json | baseline
    env: dict = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    steps: int = 0  # steady steps summed over ranks (the per-step denominator of attribution)
    kernels: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["name", "category", "total_ns", "count"]))
    ranges: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["text", "total_ns", "count"]))
    findings: list[dict] = field(default_factory=list)
    windows: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    attribution_complete: bool = True  # False when only the top kernels were known (old analysis.json)

    @property
    def gpu_name(self) -> str:
        gpus = self.env.get("gpus") or []
        return gpus[0] if gpus else ""

    def to_dict(self, findings: bool = False) -> dict:
        d = {
            "format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, "label": self.label, "source": self.source,
            "env": self.env,
            "samples": {k: [_num(x) for x in v] for k, v in self.samples.items()},
            "steps": int(self.steps),
            "kernels": [[str(r.name), str(r.category), int(r.total_ns), int(r.count)]
                        for r in self.kernels.itertuples(index=False)],
            "ranges": [[str(r.text), int(r.total_ns), int(r.count)] for r in self.ranges.itertuples(index=False)],
            "windows": self.windows, "notes": self.notes, "attribution_complete": self.attribution_complete,
        }
        if findings:
            d["findings"] = self.findings
        return d

    @classmethod
    def from_dict(cls, d: dict, label: str | None = None, findings: list | None = None) -> "RunData":
        if d.get("format") != RUN_FORMAT:
            raise ValueError("not a gpudoctor gate run")
        if int(d.get("version", 0)) > RUN_FORMAT_VERSION:
            raise ValueError(f"gate run format version {d.get('version')} is newer than this gpudoctor reads")
        return cls(
            label=label or d.get("label", ""), source=d.get("source", ""), env=dict(d.get("env") or {}),
            samples={k: [float(x) for x in v if x is not None] for k, v in (d.get("samples") or {}).items()},
            steps=int(d.get("steps", 0)),
            kernels=pd.DataFrame(d.get("kernels") or [], columns=["name", "category", "total_ns", "count"]),
            ranges=pd.DataFrame(d.get("ranges") or [], columns=["text", "total_ns", "count"]),
            findings=list(findings if findings is not None else d.get("findings") or []),
            windows=list(d.get("windows") or []), notes=list(d.get("notes") or []),
            attribution_complete=bool(d.get("attribution_complete", True)),
        )


def _num(x):
    x = float(x)
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def _finding_dict(f) -> dict:
    return f if isinstance(f, dict) else f.to_dict()


def _combine_steps(per_rank: list[np.ndarray | None], notes: list[str], metric: str) -> list[float] | None:
    vals = [v for v in per_rank if v is not None]
    if not vals or len(vals) < len(per_rank):
        return None
    if len(vals) > 1:
        if len({len(v) for v in vals}) == 1 and len(vals[0]):
            return [float(x) for x in np.max(np.vstack(vals), axis=0)]
        notes.append(f"{metric}: ranks have different numbers of steady steps; their steps are pooled")
    return [float(x) for v in vals for x in v]


def environment(trace: Trace) -> dict:
    """GPU model(s), GPU count, driver and software versions: what must match for a fair comparison."""
    dev = trace.devices
    used = dev
    if len(dev) and len(trace.kernels):
        pairs = set(zip(trace.kernels["rank"].tolist(), trace.kernels["device_id"].tolist()))
        sel = [(r, d) in pairs for r, d in zip(dev["rank"].tolist(), dev["device_id"].tolist())]
        if any(sel):
            used = dev[sel]
    env: dict = {"gpus": sorted(set(used["name"].astype(str))) if len(used) else [], "gpu_count": int(len(used))}
    cc = sorted(set(x for x in used["compute_capability"].astype(str) if x)) if len(used) else []
    if cc:
        env["compute_capability"] = cc
    meta = trace.meta or {}
    tp = meta.get("torch_profiler") or {}
    for key, sources in {
        "driver_version": [meta.get("driver_version"), meta.get("nv_driver_version")],
        "cuda_driver_version": [meta.get("cuda_driver_version"), tp.get("cuda_driver_version")],
        "cuda_runtime_version": [meta.get("cuda_runtime_version"), meta.get("cuda_version"), tp.get("cuda_runtime_version")],
        "torch_version": [meta.get("torch_version")],
        "cudnn_version": [meta.get("cudnn_version")],
        "nccl_version": [meta.get("nccl_version")],
    }.items():
        v = next((s for s in sources if s not in (None, "")), None)
        if v is not None:
            env[key] = _version_text(v)
    if "driver_version" not in env or "cuda_driver_version" not in env:
        for inp in meta.get("inputs") or []:
            if inp.get("format") == "nsys_sqlite" and inp.get("path"):
                for k2, v2 in _nsys_env(inp["path"]).items():
                    env.setdefault(k2, v2)
                break
    return env


def _cudnn_text(v) -> str:
    """cuDNN's integer version: 91900 = 9.19.0 (cuDNN 9+), 8902 = 8.9.2 (cuDNN 8)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = int(v)
        if v >= 10000:
            return f"{v // 10000}.{(v % 10000) // 100}.{v % 100}"
        return f"{v // 1000}.{(v % 1000) // 100}.{v % 100}"
    return str(v)


def manifest_env(run_dir: Path) -> dict:
    """Driver and software versions a run directory's manifest.json records (gpudoctor profile)."""
    try:
        m = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(m, dict):
        return {}
    v = m.get("versions") if isinstance(m.get("versions"), dict) else {}
    out = {}
    for key, val in (("driver_version", m.get("driver_version")), ("cuda_driver_version", m.get("cuda_driver_version")),
                     ("torch_version", v.get("torch")), ("cuda_runtime_version", v.get("torch_cuda")),
                     ("nccl_version", v.get("nccl_version") or v.get("nccl"))):
        if val not in (None, ""):
            out[key] = _version_text(val)
    cudnn = v.get("cudnn_version") or v.get("cudnn")
    if cudnn not in (None, ""):
        out["cudnn_version"] = _cudnn_text(cudnn)
    return out


def _version_text(v) -> str:
    """CUDA writes versions as 13000 (13.0) or 12040 (12.4); strings pass through."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1000:
        v = int(v)
        return f"{v // 1000}.{(v % 1000) // 10}"
    return str(v)


def _nsys_env(path: str) -> dict:
    """Driver and CUDA driver version from an Nsight Systems export (TARGET_INFO_SYSTEM_ENV)."""
    try:
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    except sqlite3.Error:
        return {}
    try:
        rows = dict(conn.execute("SELECT name, value FROM TARGET_INFO_SYSTEM_ENV WHERE name IN "
                                 "('NvDriverVersion', 'CudaDriverVersion')").fetchall())
    except sqlite3.Error:
        return {}
    finally:
        conn.close()
    out = {}
    if rows.get("NvDriverVersion"):
        out["driver_version"] = str(rows["NvDriverVersion"])
    if rows.get("CudaDriverVersion"):
        try:
            out["cuda_driver_version"] = _version_text(int(rows["CudaDriverVersion"]))
        except ValueError:
            out["cuda_driver_version"] = str(rows["CudaDriverVersion"])
    return out


# metric -> the analyzer that owns it (others may carry a key of the same name with another meaning,
# e.g. pipeline_bubbles' per-stage idle_fraction); the owner's value is used when it reports one.
METRIC_OWNER = {"idle_fraction": "gpu_idle", "exposed_comm_fraction": "nccl_dominated", "mbu": "memory_bound_decode"}


def _carriers(findings: list[dict], metric: str) -> list[dict]:
    """Findings that report ``metric`` as a finite number, the owning analyzer's only when it has any."""
    def ok(f):
        v = (f.get("metrics") or {}).get(metric)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    fs = [f for f in findings if ok(f)]
    own = [f for f in fs if f.get("analyzer") == METRIC_OWNER.get(metric)]
    return own or fs


def run_from_trace(trace: Trace, ranks: list, findings: list, label: str, source: str = "trace",
                   rank_samples: dict | None = None) -> RunData:
    """A RunData from an analyzed trace (``ranks``: its RankSummary list).

    ``rank_samples``: rank -> ``rank_data`` already computed elsewhere (the parallel path computes it on the
    worker that held the rank's events); ranks missing from it are computed from ``trace``.
    """
    per_rank = []
    run = RunData(label=label, source=source, env=environment(trace), findings=[_finding_dict(f) for f in findings])
    multi = len(trace.rank_ids) > 1
    rank_samples = rank_samples or {}
    for rs in ranks:
        if rs.rank in rank_samples:
            per_rank.append(rank_samples[rs.rank])
        else:
            per_rank.append(rank_data(trace.for_rank(rs.rank) if multi else trace, rs.window))
        run.windows.append(f"rank {rs.rank}: {rs.window.describe()}")
    for metric in ("gpu_time", "step_time", "wall_time"):
        v = _combine_steps([p[metric] for p in per_rank], run.notes, metric)
        if v is not None:
            run.samples[metric] = v
    run.steps = int(sum(p["n"] for p in per_rank))
    if per_rank:
        kern = pd.concat([p["kernels"] for p in per_rank], ignore_index=True)
        run.kernels = kern.groupby(["name", "category"], sort=False).agg(
            total_ns=("total_ns", "sum"), count=("count", "sum")).reset_index()
        rng = pd.concat([p["ranges"] for p in per_rank], ignore_index=True)
        if len(rng):
            run.ranges = rng.groupby("text", sort=False).agg(total_ns=("total_ns", "sum"), count=("count", "sum")).reset_index()
    # Per-rank values from the summary and the findings.
    idle = {rs.rank: 1.0 - float(rs.gpu_busy_fraction) for rs in ranks}
    scal: dict[str, dict] = {"idle_fraction": idle, "exposed_comm_fraction": {}, "mbu": {}}
    for key in FINDING_METRICS:
        for f in _carriers(run.findings, key):
            scal[key][f.get("rank") if f.get("rank") is not None else -1] = float(f["metrics"][key])
    comm = run.kernels[run.kernels["category"] == "communication"]["total_ns"].sum() if len(run.kernels) else 0
    if not scal["exposed_comm_fraction"] and comm == 0 and len(run.kernels):
        scal["exposed_comm_fraction"] = {rs.rank: 0.0 for rs in ranks}
        run.notes.append("exposed_comm_fraction: no communication kernels, taken as 0")
    for key, vals in scal.items():
        if vals:
            run.samples[key] = [float(v) for _, v in sorted(vals.items(), key=lambda kv: (kv[0] is None, kv[0]))]
    return run


# -- reading inputs ---------------------------------------------------------------------------------------


def _analyze(trace: Trace, analyzer_config) -> TraceAnalysis:
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
    v = _combine_steps(per_rank, run.notes, "step_time")
    run.samples["step_time"] = v or []
    for key in ("gpu_busy_ns", "period_ns"):
        vals = [(r.get("steps") or {}).get(key) for r in ranks]
        if all(x is not None for x in vals):
            c = _combine_steps([np.asarray(x, dtype=float) for x in vals], run.notes, key)
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
        vals = [float(f["metrics"][key]) for f in _carriers(findings, key)]
        if vals:
            run.samples[key] = vals
    return run


def gate_block(analysis) -> dict:
    """The ``gate`` block of analysis.json for an Analysis: what the gate needs to compare this run later
    without the trace, a few KB, assembled from the per-rank samples the analysis computed."""
    run = run_from_trace(analysis.trace, analysis.ranks, [], label="", source="analysis_json",
                         rank_samples=analysis.gate_samples)
    d = run.to_dict()
    d.pop("label", None)
    return d


def _user_metric_files(base: Path, stem: str, patterns) -> list[Path]:
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


def load_run(spec: str, analyzer_config=None, user_metrics: list[UserMetric] | None = None) -> RunData:
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
            run = run_from_analysis_json(data, label)
            if user_metrics:
                read_user_metrics(paths, user_metrics, run)
            return run
    trace, _inputs, errors = load_inputs([str(p) for p in paths])
    if errors or trace is None:
        raise GpudoctorError("; ".join(errors) or f"{spec}: nothing could be read")
    if trace.kernels.empty:
        raise InputError(spec, "no GPU kernels in this run: nothing to compare")
    result = _analyze(trace, analyzer_config)
    is_run_dir = len(paths) == 1 and paths[0].is_dir() and ((paths[0] / "manifest.json").exists() or (paths[0] / "run.db").exists())
    run = run_from_trace(trace, result.ranks, result.findings, label, source="run_dir" if is_run_dir else "trace",
                         rank_samples=result.samples)
    if is_run_dir:
        run.env.update(manifest_env(paths[0]))
    if user_metrics:
        read_user_metrics(paths, user_metrics, run)
    return run


# -- environment check ------------------------------------------------------------------------------------

# key -> (what it is called, how much of the version must match: None = all of it, n = first n parts)
ENV_KEYS = {
    "gpus": ("GPU model", None),
    "gpu_count": ("GPU count", None),
    "driver_version": ("NVIDIA driver", None),
    "cuda_driver_version": ("CUDA (driver API) major version", 1),
    "cuda_runtime_version": ("CUDA runtime major version", 1),
    "torch_version": ("PyTorch major.minor version", 2),
    "cudnn_version": ("cuDNN major version", 1),
    "nccl_version": ("NCCL major.minor version", 2),
}


def _major(v, parts: int | None):
    if parts is None or not isinstance(v, str):
        return v
    nums = re.split(r"[.+\-]", v)
    return ".".join(nums[:parts])


def env_differences(a: RunData, b: RunData) -> tuple[list[str], list[str]]:
    """(differences that make a comparison unfair, minor differences worth a note)."""
    hard, soft = [], []
    for key, (what, parts) in ENV_KEYS.items():
        va, vb = a.env.get(key), b.env.get(key)
        if va in (None, "", []) or vb in (None, "", []):
            continue
        if _major(va, parts) != _major(vb, parts):
            fa = ", ".join(va) if isinstance(va, list) else va
            fb = ", ".join(vb) if isinstance(vb, list) else vb
            hard.append(f"{what}: {fa} ({a.label}) vs {fb} ({b.label})")
        elif va != vb:
            soft.append(f"{key}: {va} ({a.label}) vs {vb} ({b.label})")
    return hard, soft


def check_environment(baselines: list[RunData], candidates: list[RunData]) -> tuple[list[str], list[str]]:
    ref = baselines[0]
    hard, soft = [], []
    for r in baselines[1:] + candidates:
        h, s = env_differences(ref, r)
        hard += h
        soft += s
    return hard, soft


# -- rules on findings ------------------------------------------------------------------------------------

# Analyzer ids of the JSON contract (docs/json-schema.md); fail_on must name one of these.
KNOWN_ANALYZERS = ("unfused_attention", "low_tensor_core", "memory_bound_decode", "gpu_idle", "nccl_dominated",
                   "pipeline_bubbles", "kv_fragmentation")
SEVERITIES = ("info", "low", "medium", "high")
RULE_KEYS = ("fail_on", "fail_on_severity", "max_idle_fraction", "max_exposed_comm_fraction", "min_mbu")
# rule -> (metric, which way is bad, analyzer whose evidence is shown when the metric comes from the summary)
_THRESHOLD_RULES = {
    "max_idle_fraction": ("idle_fraction", "above", "gpu_idle"),
    "max_exposed_comm_fraction": ("exposed_comm_fraction", "above", "nccl_dominated"),
    "min_mbu": ("mbu", "below", "memory_bound_decode"),
}


@dataclass
class RuleResult:
    name: str  # fail_on:ANALYZER | max_idle_fraction | max_exposed_comm_fraction | min_mbu
    status: str  # pass | fail | skipped
    message: str
    threshold: object = None
    value: float | None = None
    evidence: dict = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)  # the findings behind a failure: analyzer, severity, title, rank, run

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "message": self.message, "threshold": self.threshold,
                "value": self.value, "evidence": self.evidence, "findings": self.findings}


def validate_rules(rules: dict, known_analyzers=KNOWN_ANALYZERS) -> dict:
    """Check a rules table (the [gate] keys fail_on, fail_on_severity, max_*, min_mbu); returns it cleaned."""
    out: dict = {}
    for k, v in (rules or {}).items():
        if k not in RULE_KEYS:
            raise GpudoctorError(f"unknown gate rule {k!r} (known: {', '.join(RULE_KEYS)})")
        if k == "fail_on":
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise GpudoctorError("gate.fail_on must be a list of analyzer ids")
            bad = [x for x in v if x not in known_analyzers]
            if bad:
                raise GpudoctorError(f"gate.fail_on names unknown analyzers {bad} (known: {', '.join(known_analyzers)})")
            out[k] = list(v)
        elif k == "fail_on_severity":
            if v not in SEVERITIES:
                raise GpudoctorError(f"gate.fail_on_severity must be one of {', '.join(SEVERITIES)}, not {v!r}")
            out[k] = v
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise GpudoctorError(f"gate.{k} must be a number, not {v!r}")
            out[k] = float(v)
    return out


def rule_values(candidates: list[RunData]) -> dict[str, float]:
    """Per rule metric: each run's worst rank, then the median over runs."""
    out = {}
    for rule, (metric, bad, _) in _THRESHOLD_RULES.items():
        per_run = [(max if bad == "above" else min)(r.samples[metric]) for r in candidates if r.samples.get(metric)]
        if per_run:
            out[metric] = float(np.median(per_run))
    return out


def _brief(f: dict) -> dict:
    return {k: f.get(k) for k in ("analyzer", "severity", "title", "rank", "run", "estimated_saving_ns",
                                  "estimated_saving_fraction") if f.get(k) is not None}


def evaluate_rules(rules: dict, findings: list, values: dict[str, float] | None = None,
                   baseline_findings=()) -> list[RuleResult]:
    """The rules of ``[gate]`` on the candidate's findings (Finding objects or their dicts) and metric values.

    ``values``: idle_fraction / exposed_comm_fraction / mbu of the candidate; a value missing there is taken
    from the findings' metrics (the worst one). A rule whose value is unknown is skipped, not passed.
    ``baseline_findings``: the baseline's, only to say when a failing finding was there already.
    """
    fs = [_finding_dict(f) for f in findings]
    values = dict(values or {})
    out: list[RuleResult] = []
    min_sev = rules.get("fail_on_severity", "low")
    min_rank = SEVERITIES.index(min_sev)

    def counts(f: dict) -> bool:
        return f.get("severity") in SEVERITIES and SEVERITIES.index(f["severity"]) >= min_rank

    base_ids = {f.get("analyzer") for f in map(_finding_dict, baseline_findings) if counts(f)}
    for aid in rules.get("fail_on") or []:
        hits = [f for f in fs if f.get("analyzer") == aid and counts(f)]
        name = f"fail_on:{aid}"
        if hits:
            hits.sort(key=lambda f: (-SEVERITIES.index(f["severity"]), -(f.get("estimated_saving_ns") or 0)))
            top = hits[0]
            msg = f"{top.get('title') or aid} [{top['severity']}]"
            if len(hits) > 1:
                msg += f" (+{len(hits) - 1} more finding{'s' if len(hits) > 2 else ''})"
            if aid in base_ids:
                msg += "; the baseline has this finding too"
            out.append(RuleResult(name, "fail", msg, threshold=min_sev, evidence=top.get("evidence") or {},
                                  findings=[_brief(f) for f in hits]))
        else:
            out.append(RuleResult(name, "pass", f"no {aid} finding of severity {min_sev} or higher", threshold=min_sev))
    for rule, (metric, bad, analyzer) in _THRESHOLD_RULES.items():
        if rule not in rules:
            continue
        thr = float(rules[rule])
        carriers = _carriers(fs, metric)
        value = values.get(metric)
        if value is None and carriers:
            pick = max if bad == "above" else min
            value = float(pick(f["metrics"][metric] for f in carriers))
        if value is None:
            out.append(RuleResult(rule, "skipped", f"no {metric} known for the candidate (no finding reports it)",
                                  threshold=thr))
            continue
        broken = value > thr if bad == "above" else value < thr
        op = ">" if bad == "above" else "<"
        ok_op = "<=" if bad == "above" else ">="
        if not broken:
            out.append(RuleResult(rule, "pass", f"{metric} {value:.3f} {ok_op} {thr:g}", threshold=thr, value=value))
            continue
        src = carriers or [f for f in fs if f.get("analyzer") == analyzer]
        src.sort(key=lambda f: -SEVERITIES.index(f.get("severity", "info")) if f.get("severity") in SEVERITIES else 0)
        msg = f"{metric} {value:.3f} {op} {thr:g}"
        evidence: dict = {}
        if src:
            msg += f": {src[0].get('title', '')}"
            evidence = src[0].get("evidence") or {}
        out.append(RuleResult(rule, "fail", msg, threshold=thr, value=value, evidence=evidence,
                              findings=[_brief(f) for f in src[:5]]))
    return out


# -- the comparison ---------------------------------------------------------------------------------------


@dataclass
class GateOptions:
    tolerance: float = stats.DEFAULT_TOLERANCE
    tolerances: dict[str, float] = field(default_factory=dict)  # per metric
    min_samples: int = stats.DEFAULT_MIN_SAMPLES
    alpha: float = stats.DEFAULT_ALPHA
    confidence: float = stats.DEFAULT_CONFIDENCE
    bootstrap: int = stats.DEFAULT_BOOTSTRAP
    seed: int = stats.DEFAULT_SEED
    inconclusive: str = "exit3"  # pass | fail | exit3
    gated: tuple[str, ...] = DEFAULT_GATED
    user_metrics: list[UserMetric] = field(default_factory=list)
    rules: dict = field(default_factory=dict)  # fail_on, fail_on_severity, max_idle_fraction, ...
    allow_mismatch: bool = False
    top: int = 10
    tolerance_source: str = "default"

    def tolerance_for(self, metric: str) -> float:
        return float(self.tolerances.get(metric, self.tolerance))


@dataclass
class MetricResult:
    spec: MetricSpec
    gated: bool
    decision: stats.Decision

    @property
    def status(self) -> str:
        return self.decision.decision

    def to_dict(self) -> dict:
        return {"name": self.spec.name, "label": self.spec.label, "unit": self.spec.unit,
                "higher_is_better": self.spec.higher_is_better, "gated": self.gated, **self.decision.to_dict()}


@dataclass
class GateResult:
    status: str  # pass | improvement | fail | inconclusive | error
    exit_code: int
    reasons: list[str]
    metrics: list[MetricResult]
    rules: list  # rules.RuleResult
    attribution: dict
    baselines: list[RunData]
    candidates: list[RunData]
    options: GateOptions
    mismatches: list[str] = field(default_factory=list)  # allowed with --allow-mismatch
    env_notes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def headline(self) -> str:
        return self.reasons[0] if self.reasons else self.status

    def to_dict(self) -> dict:

        o = self.options
        return {
            "gpudoctor_version": __version__,
            "status": self.status, "exit_code": self.exit_code, "reasons": self.reasons,
            "baseline": [{"label": r.label, "source": r.source, "env": r.env, "windows": r.windows,
                          "steps": r.steps} for r in self.baselines],
            "candidate": [{"label": r.label, "source": r.source, "env": r.env, "windows": r.windows,
                           "steps": r.steps} for r in self.candidates],
            "options": {"tolerance": o.tolerance, "tolerance_source": o.tolerance_source, "tolerances": o.tolerances,
                        "min_samples": o.min_samples, "alpha": o.alpha, "confidence": o.confidence,
                        "bootstrap": o.bootstrap, "seed": o.seed, "inconclusive": o.inconclusive,
                        "gated": list(o.gated), "rules": o.rules, "allow_mismatch": o.allow_mismatch},
            "metrics": [m.to_dict() for m in self.metrics],
            "rules": [r.to_dict() for r in self.rules],
            "attribution": self.attribution,
            "mismatches": self.mismatches, "env_notes": self.env_notes, "notes": self.notes,
        }


def pooled(runs: list[RunData], metric: str) -> list[float]:
    return [x for r in runs for x in r.samples.get(metric, [])]


def compare(baselines: list[RunData], candidates: list[RunData], options: GateOptions | None = None) -> GateResult:
    """Decide every metric, check the rules, attribute the change. Raises GpudoctorError (exit 2) when the
    runs come from different hardware or software and ``allow_mismatch`` is off."""

    o = options or GateOptions()
    if not baselines or not candidates:
        raise GpudoctorError("gate needs at least one baseline and one candidate run")
    hard, soft = check_environment(baselines, candidates)
    if hard and not o.allow_mismatch:
        raise GpudoctorError("refusing to compare runs from different environments: " + "; ".join(hard)
                             + " (pass --allow-mismatch to compare anyway)")
    specs = dict(METRICS)
    for um in o.user_metrics:
        specs[um.name] = um.spec()
    gated = set(o.gated) | {um.name for um in o.user_metrics if um.gate}
    unknown = gated - set(specs)
    if unknown:
        raise GpudoctorError(f"unknown gate metric(s) {sorted(unknown)}; known: {', '.join(specs)}")
    results: list[MetricResult] = []
    notes: list[str] = []
    for name, spec in specs.items():
        a, b = pooled(baselines, name), pooled(candidates, name)
        if not a and not b:
            if name in gated:
                hint = ("the program's output had no match for its regex" if spec.per == "sample" else
                        "it needs a trace, a run directory or an analysis.json with the gate block; "
                        "gate on other metrics with --metrics")
                results.append(MetricResult(spec, True, stats.Decision(
                    stats.ERROR, f"no {name} values in either baseline or candidate ({hint})", 0, 0,
                    tolerance=o.tolerance_for(name), higher_is_better=spec.higher_is_better)))
            continue
        unit = {"step": "steps", "rank": "values (one per rank and run)", "sample": "values"}[spec.per]
        d = stats.decide(a, b, o.tolerance_for(name), higher_is_better=spec.higher_is_better,
                         min_samples=o.min_samples, alpha=o.alpha, confidence=o.confidence, n_boot=o.bootstrap,
                         seed=o.seed, unit_label=unit)
        results.append(MetricResult(spec, name in gated, d))
    attribution = attribute(baselines, candidates, top=o.top)
    cand_findings = [dict(f, run=r.label) for r in candidates for f in r.findings]
    base_findings = [f for r in baselines for f in r.findings]
    rule_results = evaluate_rules(o.rules, cand_findings, rule_values(candidates), baseline_findings=base_findings)
    status, code, reasons = _overall(results, rule_results, attribution, o)
    for r in baselines + candidates:
        notes += [f"{r.label}: {n}" for n in r.notes]
    return GateResult(status, code, reasons, results, rule_results, attribution, baselines, candidates, o,
                      mismatches=hard, env_notes=soft, notes=notes)


def fmt_value(v: float | None, unit: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if unit == "ns":
        return ns(v)
    if unit == "fraction":
        return f"{v:.3f}"
    return f"{v:.4g}{(' ' + unit) if unit else ''}"


def metric_line(m: MetricResult) -> str:
    d = m.decision
    s = f"{m.spec.label}: "
    if d.median_baseline is not None and d.median_candidate is not None:
        s += f"{fmt_value(d.median_baseline, m.spec.unit)} -> {fmt_value(d.median_candidate, m.spec.unit)}"
        if d.change is not None:
            s += f" ({d.change * 100:+.1f}%)"
        s += "; "
    return s + d.reason


def _overall(metrics: list[MetricResult], rules: list, attribution: dict, o: GateOptions) -> tuple[str, int, list[str]]:
    g = [m for m in metrics if m.gated]
    reg = [m for m in g if m.status == stats.REGRESSION]
    err = [m for m in g if m.status == stats.ERROR]
    inc = [m for m in g if m.status == stats.INCONCLUSIVE]
    imp = [m for m in g if m.status == stats.IMPROVEMENT]
    broken = [r for r in rules if r.status == "fail"]
    reasons: list[str] = []
    for m in reg:
        line = "regression: " + metric_line(m)
        if attribution.get("headline"):
            line += f" | {attribution['headline']}"
        reasons.append(line)
    reasons += [f"rule {r.name}: {r.message}" for r in broken]
    if reg or broken:
        return "fail", 1, reasons
    if err:
        return "error", 2, [f"error: {metric_line(m)}" for m in err]
    if inc:
        code = {"pass": 0, "fail": 1, "exit3": 3}[o.inconclusive]
        return "inconclusive", code, [f"inconclusive: {metric_line(m)}" for m in inc]
    if imp:
        return "improvement", 0, [f"improvement: {metric_line(m)}" for m in imp]
    return "pass", 0, [f"pass: {metric_line(m)}" for m in g]
