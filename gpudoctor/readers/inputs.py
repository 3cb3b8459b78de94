"""Inputs -> one Trace: which reader reads a file, run directories, directories of per-rank files, and how
the inputs of one call merge into one run.

All inputs of one call form one run (per-rank files of a job, or a timeline plus its Nsight Compute
export). An input that cannot be read is reported as a one-line error and the others are still read.
Each input is sniffed once (``input_format``) and its format handed on to the reader.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd

from gpudoctor import progress
from gpudoctor.collect.locate import find_nsys
from gpudoctor.collect.manifest import read_manifest, reports_to_read
from gpudoctor.collect.ncu import join_to_timeline
from gpudoctor.collect.nsys import export_sqlite
from gpudoctor.collect.rundir import MANIFEST, RUN_DB, holds_run
from gpudoctor.errors import GpudoctorError, InputError
from gpudoctor.model.trace import SIDE_ERRORS, Trace, conform, merge
from gpudoctor.readers import detect, kineto, nccltests, ncu, nsys, nvml, prometheus, pysamples, snapshot
from gpudoctor.readers.boundary import input_boundary
from gpudoctor.readers.limits import is_gzip, open_input
from gpudoctor.store import rundb

# format (input_format) -> the reader module, whose read(path, rank=None) -> Trace
READERS = {
    "nsys_sqlite": nsys,
    "json": kineto,
    "ncu_csv": ncu,
    "ncu_rep": ncu,
    "nccl_tests": nccltests,
    "pickle": snapshot,
    "prometheus": prometheus,
    "nvml_csv": nvml,
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


def _read_nsys_rep(path: Path, rank: int | None) -> Trace:
    loc = find_nsys()
    if loc is None:
        raise InputError(path, "reading .nsys-rep needs Nsight Systems (nsys); export it with: "
                               "nsys export --type sqlite -o FILE.sqlite FILE.nsys-rep")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / (path.stem + ".sqlite")
        why = export_sqlite(loc.path, path, out, timeout_s=600)
        if why is not None:
            raise InputError(path, why)
        t = nsys.read(out, rank=rank)
    _name_the_input(t, path)
    return t


def _read_gzipped_sqlite(path: Path, rank: int | None) -> Trace:
    """An nsys SQLite export compressed with gzip (SQLite reads only plain files): inflated, within the
    limits on decompression, into a temporary file that is read and removed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name.removesuffix(".gz")
        with open_input(path) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        t = nsys.read(out, rank=rank)
    _name_the_input(t, path)
    return t


def _name_the_input(t: Trace, path: Path) -> None:
    """The trace read from a file made from ``path`` names ``path`` as its input."""
    for i in t.meta.get("inputs", []):
        i["path"] = str(path)
    t.ranks["source_file"] = str(path)


def input_format(path: Path) -> str:
    """``detect``'s format, with an SQLite file told apart: "run_db" (a gpudoctor run.db) or "nsys_sqlite"."""
    fmt = detect(path)
    if fmt == "sqlite":
        return "run_db" if rundb.is_run_db(path) else "nsys_sqlite"
    return fmt


def read_input(path: str | Path, rank: int | None = None, fmt: str | None = None) -> Trace:
    """Read one file into a Trace, picking the reader from the file's content (``fmt``: ``input_format``'s
    answer when the caller already sniffed the file)."""
    path = Path(path)
    if pysamples.is_sample_file(path):
        raise InputError(path, "Python stack samples are read with their report: pass the trace beside them")
    fmt = fmt or input_format(path)
    if fmt == "run_dir":
        return read_run_dir(path)
    if fmt == "run_db":
        return rundb.load(path)
    if fmt == "nsys_rep":
        t = _read_nsys_rep(path, rank)
    elif fmt == "nsys_sqlite" and is_gzip(path):
        t = _read_gzipped_sqlite(path, rank)
    else:
        t = READERS[fmt].read(path, rank=rank)  # looked up at call time
    samples = pysamples.sibling(path) if fmt in ("nsys_rep", "nsys_sqlite", "json") else None
    if samples is not None:
        try:
            pysamples.attach(t, samples)
        except InputError as e:  # the report stands without them; the callers name the damaged file
            t.meta.setdefault(SIDE_ERRORS, []).append({"path": e.path, "error": str(e)})
    return t



def pop_side_errors(t: Trace) -> list[dict]:
    """The one-line errors of files read with ``t``'s report (its Python samples), taken out of its meta."""
    return t.meta.pop(SIDE_ERRORS, [])


def read_run_dir(run_dir: Path) -> Trace:
    """A run directory: run.db when present (fast), else the raw reports its manifest lists."""
    db = run_dir / RUN_DB
    if db.exists() and rundb.is_run_db(db):
        return rundb.load(db)
    manifest_path = run_dir / MANIFEST
    manifest = read_manifest(run_dir)
    traces = []
    root = run_dir.resolve()
    for rep in reports_to_read(run_dir, manifest):
        p = (run_dir / rep["path"]).resolve()
        if not p.exists() and p.with_name(p.name + ".gz").is_file():  # a report gzipped since the run
            p = p.with_name(p.name + ".gz")
        if root not in p.parents:  # never follow a path out of the run directory
            raise InputError(manifest_path, f"report path {rep['path']!r} points outside the run directory")
        traces.append(read_input(p, rank=rep.get("rank")))
    if not traces:
        raise InputError(run_dir, "run directory lists no reports and has no run.db")
    trace = _devices_from_manifest(combine(traces), manifest)
    # Step time before the profiler started (the profiler's own cost, measured): gpu_idle reads it. Under
    # nsys a launch is timed in a bare process (collect/launch_timing.py): that one comes first.
    bare = (manifest.get("backend_details") or {}).get("bare_launch_timing")
    if isinstance(bare, dict) and isinstance(bare.get("launch_ns"), int) and bare["launch_ns"] > 0:
        trace.meta.setdefault("unprofiled_launch_ns", float(bare["launch_ns"]))
        trace.meta.setdefault("unprofiled_launch_timed", "bare_process")
    for src in (manifest, manifest.get("capture") or {}):
        for key in ("unprofiled_step_ms", "unprofiled_launch_ns"):
            if isinstance(src, dict) and isinstance(src.get(key), (int, float)):
                trace.meta.setdefault(key, float(src[key]))
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
        if p.is_dir() and not holds_run(p):
            try:
                files = sorted(f for f in p.iterdir() if f.is_file() and _trace_file_name(f.name)
                               and not pysamples.is_sample_file(f))  # read with their report
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
        for side in pop_side_errors(t):
            errors.append(side["error"])
            inputs.append(side)
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
    for name in ("kernel_metrics", "counters", "memory_events", "dropped"):
        frames = [trace.table(name)] + [t.table(name) for t in side]
        frames = [f for f in frames if len(f)]
        if frames:
            setattr(trace, name, conform(name, pd.concat(frames, ignore_index=True)))
    if len(trace.kernel_metrics):
        km, unjoined = join_to_timeline(trace.kernel_metrics, trace.kernels)
        trace.kernel_metrics = conform("kernel_metrics", km)
        if unjoined:
            trace.add_dropped(0, "ncu", "ncu kernel not found in the timeline (kept, unjoined)", int(unjoined))
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
