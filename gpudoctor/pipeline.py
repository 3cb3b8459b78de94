"""parse -> trace model -> analyze: the one path every command takes from inputs to an Analysis.

All inputs of one call form one run (per-rank files of a job, or a timeline plus its Nsight Compute
export). An input that cannot be read is reported as a one-line error and the others are still
analyzed.
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gpudoctor import __version__
from gpudoctor.errors import GpudoctorError, InputError
from gpudoctor.model.summary import RankSummary, summarize_rank
from gpudoctor.model.trace import Trace, merge
from gpudoctor.readers import detect
from gpudoctor.readers.boundary import input_boundary
from gpudoctor.readers.manifest import read_manifest

JSON_SCHEMA_VERSION = "1.0"

# format -> module with read(path, rank=None) -> Trace
READER_MODULES = {
    "nsys_sqlite": "gpudoctor.readers.nsys",
    "json": "gpudoctor.readers.kineto",
    "ncu_csv": "gpudoctor.readers.ncu",
    "ncu_rep": "gpudoctor.readers.ncu",
    "nccl_tests": "gpudoctor.readers.nccltests",
    "pickle": "gpudoctor.readers.snapshot",
    "prometheus": "gpudoctor.readers.prometheus",
    "nvml_csv": "gpudoctor.readers.nvml",
}
_DIR_SUFFIXES = (".sqlite", ".json", ".csv", ".log", ".txt", ".pickle", ".nsys-rep", ".ncu-rep", ".prom")
# A compressed trace in a directory is taken too: gzip is read, the others get a one-line error (never skipped).
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def _trace_file_name(name: str) -> bool:
    low = name.lower()
    for c in _COMPRESSED_SUFFIXES:
        if low.endswith(c):
            low = low[:-len(c)]
            break
    return low.endswith(_DIR_SUFFIXES)


@dataclass
class Analysis:
    inputs: list[dict]
    trace: Trace
    ranks: list[RankSummary]
    findings: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # rank -> the gate's per-rank samples when they were computed elsewhere (parallel workers); else the
    # JSON's gate block is computed from ``trace``.
    gate_samples: dict | None = None

    @property
    def dropped(self) -> dict[str, int]:
        return self.trace.dropped_counts()

    def to_json_dict(self) -> dict:
        findings = sorted(self.findings, key=lambda f: (-f.estimated_saving_ns, -f.severity_rank))
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "gpudoctor_version": __version__,
            "inputs": self.inputs,
            "errors": self.errors,
            "ranks": [r.to_dict() for r in self.ranks],
            "findings": [f.to_dict() for f in findings],
            "dropped": self.dropped,
            "gate": _gate_block(self),
        }


def _gate_block(analysis) -> dict | None:
    """What `gpudoctor gate` needs to compare this run later without the trace (per-step samples)."""
    try:
        from gpudoctor.gate.samples import gate_block
    except ImportError:
        return None
    return gate_block(analysis)


def _read_nsys_rep(path: Path, rank: int | None) -> Trace:
    from gpudoctor.collect.nsys import export_sqlite, find_nsys

    loc = find_nsys()
    if loc is None:
        raise InputError(path, "reading .nsys-rep needs Nsight Systems (nsys); export it with: "
                               "nsys export --type sqlite -o FILE.sqlite FILE.nsys-rep")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / (path.stem + ".sqlite")
        why = export_sqlite(loc.path, path, out, timeout_s=600)
        if why is not None:
            raise InputError(path, why)
        from gpudoctor.readers import nsys as nsys_reader
        t = nsys_reader.read(out, rank=rank)
    for i in t.meta.get("inputs", []):
        i["path"] = str(path)
    t.ranks["source_file"] = str(path)
    return t


def _is_run_db(path: Path) -> bool:
    try:
        from gpudoctor.store.rundb import is_run_db
    except ImportError:
        return False
    return is_run_db(path)


def read_input(path: str | Path, rank: int | None = None) -> Trace:
    """Read one file into a Trace, picking the reader from the file's content."""
    path = Path(path)
    fmt = detect(path)
    if fmt == "run_dir":
        return read_run_dir(path)
    if fmt == "nsys_rep":
        return _read_nsys_rep(path, rank)
    if fmt == "sqlite":
        if _is_run_db(path):
            from gpudoctor.store.rundb import load
            return load(path)
        fmt = "nsys_sqlite"
    module = READER_MODULES.get(fmt)
    try:
        reader = importlib.import_module(module)
    except ModuleNotFoundError:
        raise InputError(path, f"{fmt} input is not supported by this version of gpudoctor") from None
    return reader.read(path, rank=rank)


def read_run_dir(run_dir: Path) -> Trace:
    """A run directory: run.db when present (fast), else the raw reports its manifest lists."""
    db = run_dir / "run.db"
    if db.exists() and _is_run_db(db):
        from gpudoctor.store.rundb import load
        return load(db)
    manifest_path = run_dir / "manifest.json"
    manifest = read_manifest(run_dir)
    traces = []
    root = run_dir.resolve()
    for rep in manifest.get("reports", []):
        p = (run_dir / rep["path"]).resolve()
        if root not in p.parents:  # never follow a path out of the run directory
            raise InputError(manifest_path, f"report path {rep['path']!r} points outside the run directory")
        traces.append(read_input(p, rank=rep.get("rank")))
    if not traces:
        raise InputError(run_dir, "run directory lists no reports and has no run.db")
    trace = _devices_from_manifest(combine(traces), manifest)
    # Step time before the profiler started (the profiler's own cost, measured): gpu_idle reads it.
    for src in (manifest, manifest.get("capture") or {}):
        if isinstance(src, dict) and isinstance(src.get("unprofiled_step_ms"), (int, float)):
            trace.meta.setdefault("unprofiled_step_ms", float(src["unprofiled_step_ms"]))
    return trace


def _devices_from_manifest(trace: Trace, manifest: dict) -> Trace:
    """A run without a timeline (NVML samples only) has no devices table: take the GPUs the profiler saw,
    from the manifest, for its one rank (with several ranks it cannot tell whose GPU is whose)."""
    gpus = [g for g in manifest.get("gpus") or [] if isinstance(g, dict) and g.get("name")]
    if isinstance(manifest.get("gpu_state"), dict):  # the capture's conditions travel into run.db's meta
        trace.meta.setdefault("gpu_state", manifest["gpu_state"])
    ranks = trace.rank_ids
    if len(trace.devices) or not gpus or len(ranks) > 1:
        return trace
    rank = ranks[0] if ranks else 0
    trace.set("devices", {
        "rank": [rank] * len(gpus), "device_id": [int(g.get("device_id", i)) for i, g in enumerate(gpus)],
        "name": [str(g["name"]) for g in gpus], "memory_bytes": [int(g.get("memory_bytes") or 0) for g in gpus],
        "sm_clock_hz": [float(g.get("max_sm_clock_mhz") or 0) * 1e6 for g in gpus],
        "uuid": [str(g.get("uuid") or "") for g in gpus]})
    for key in ("driver_version", "cuda_driver_version"):
        if manifest.get(key) and not trace.meta.get(key):
            trace.meta[key] = str(manifest[key])
    return trace


def expand_inputs(paths: list[str]) -> list[Path]:
    """Directories that are not run directories stand for the trace files inside them (per-rank files)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not ((p / "manifest.json").exists() or (p / "run.db").exists()):
            try:
                files = sorted(f for f in p.iterdir() if f.is_file() and _trace_file_name(f.name))
            except OSError:
                files = []  # unreadable directory: detect() says why
            if not files:
                out.append(p)  # detect() will say what is wrong
            out.extend(files)
        else:
            out.append(p)
    return out


def load_inputs(paths: list[str], rank_map: dict[str, int] | None = None) -> tuple[Trace | None, list[dict], list[str]]:
    """Read every input; returns (merged trace or None, inputs, one-line errors)."""
    rank_map = rank_map or {}
    traces, inputs, errors = [], [], []
    from gpudoctor import progress
    for p in progress.track(expand_inputs(paths), "Reading inputs"):
        try:
            with input_boundary(p):
                t = read_input(p, rank=rank_map.get(str(p), rank_map.get(p.name)))
        except GpudoctorError as e:
            errors.append(str(e))
            inputs.append({"path": str(p), "error": str(e)})
            continue
        traces.append(t)
        inputs.extend(t.meta.get("inputs") or [{"path": str(p)}])
    if not traces:
        return None, inputs, errors
    return combine(traces), inputs, errors


def combine(traces: list[Trace]) -> Trace:
    """One run from many inputs. Side inputs (ncu kernel metrics, NVML samples, memory snapshots, engine
    metrics) describe a timeline's rank rather than claiming a rank of their own."""
    timeline = [t for t in traces if not _side_input(t)]
    side = [t for t in traces if _side_input(t)]
    if timeline and side:
        merged = merge(timeline)
        _attach_side_inputs(merged, side)
        return merged
    return merge(traces)


SIDE_FORMATS = {"ncu_csv", "torch_memory_snapshot", "prometheus_text", "nvml_csv"}


def _side_input(t: Trace) -> bool:
    return len(t.kernels) == 0 and bool(set(t.ranks["source_format"].astype(str)) & SIDE_FORMATS)


def _attach_side_inputs(trace: Trace, side: list[Trace]) -> None:
    import pandas as pd

    from gpudoctor.model.trace import conform
    for name in ("kernel_metrics", "counters", "memory_events", "dropped"):
        frames = [trace.table(name)] + [t.table(name) for t in side]
        frames = [f for f in frames if len(f)]
        if frames:
            setattr(trace, name, conform(name, pd.concat(frames, ignore_index=True)))
    if len(trace.kernel_metrics):
        try:
            from gpudoctor.collect.ncu import join_to_timeline
            km, unjoined = join_to_timeline(trace.kernel_metrics, trace.kernels)
            trace.kernel_metrics = conform("kernel_metrics", km)
            if unjoined:
                trace.add_dropped(0, "ncu", "ncu kernel not found in the timeline (kept, unjoined)", int(unjoined))
        except ImportError:
            pass
    for t in side:
        trace.meta.setdefault("inputs", []).extend(t.meta.get("inputs", []))
        for k, v in t.meta.items():
            if k == "inputs":
                continue
            if k == "memory_snapshot":  # one per rank: keep them all
                cur = trace.meta.get(k)
                trace.meta[k] = (cur if isinstance(cur, list) else [cur] if cur else []) + (v if isinstance(v, list) else [v])
            else:
                trace.meta.setdefault(k, v)


def analyze_trace(trace: Trace, config=None) -> tuple[list[RankSummary], list]:
    from gpudoctor import progress
    with progress.task("Analyzing"):
        return _analyze_trace(trace, config)


def _use_stored_ceilings(trace: Trace, config) -> None:
    """Ceilings `gpudoctor ceilings` stored for the run's GPU model, when none were given."""
    if getattr(config, "ceilings", None) is not None or trace.meta.get("ceilings") or trace.devices.empty:
        return
    names = {str(n) for n in trace.devices["name"] if n}
    if len(names) == 1:
        from gpudoctor.store.ceilings import stored_ceilings
        stored = stored_ceilings(names.pop())
        if stored:
            trace.meta["ceilings"] = stored


def _analyze_trace(trace: Trace, config=None) -> tuple[list[RankSummary], list]:
    _use_stored_ceilings(trace, config)
    ranks = [summarize_rank(trace, r) for r in (trace.rank_ids or [0])]
    findings = []
    try:
        registry = importlib.import_module("gpudoctor.analyzers.registry")
    except ModuleNotFoundError:
        registry = None
    if registry is not None:
        findings = registry.run_all(trace, config)
    return ranks, findings


def analyze_inputs(paths: list[str], config=None, rank_map: dict[str, int] | None = None, *, workers=None,
                   scheduler=None, need_trace: bool = False) -> Analysis:
    """Read, merge and analyze. Raises GpudoctorError only when no input could be read.

    Many rank files (or a Dask ``scheduler``) go to gpudoctor.parallel, whose Analysis carries a light
    trace (ranks, devices, dropped): callers that need the events pass ``need_trace=True``.
    """
    from gpudoctor import parallel
    if not need_trace and parallel.use_parallel(expand_inputs(paths),
                                                min_files=1 if scheduler else parallel.PARALLEL_MIN_FILES):
        return parallel.analyze_many(paths, config, workers=workers, scheduler=scheduler, rank_map=rank_map)
    trace, inputs, errors = load_inputs(paths, rank_map)
    if trace is None:
        raise GpudoctorError(errors[0] if len(errors) == 1 else "; ".join(errors))
    ranks, findings = analyze_trace(trace, config)
    return Analysis(inputs=inputs, trace=trace, ranks=ranks, findings=findings, errors=errors)


