"""Many rank files in parallel: parse and analyze each rank on its own worker, then reduce across ranks.

``analyze_many(paths, config, workers=None, scheduler=None) -> Analysis``

Map (one task per input file, on a worker process): read the file and analyze each of its ranks as the
serial path does (``runner.analyze_trace`` without the cross-rank analyzers: window, summary, findings and
the gate's per-step samples computed once), and the rank's row of the straggler table from that window. A task
returns only small results (a :class:`RankResult`: RankSummary, findings, the ranks / devices /
dropped rows, step end times, the distinct kernel and collective kinds), never the trace, so a
worker's memory is bounded by its largest rank and the parent holds a few kilobytes per rank.

Reduce (in the calling process): check that no two inputs claim the same rank (the error ``merge``
raises), align the ranks' steps and build the straggler table and finding as
``stragglers.analyze_run`` does on a merged trace, and assemble the Analysis. ``Analysis.trace`` is
a light trace (``meta["light_trace"]`` is True): the ranks, devices and dropped tables, ``meta``,
and one kernel / collective row per distinct kind of each rank (which kernels and devices the run has,
never how many or when), enough for the JSON / Markdown / terminal renderers; ``Analysis.gate_samples``
holds the workers' per-rank samples, so the JSON's ``gate`` block equals the serial path's. Callers that need the event tables
(dashboards, ``rundb.save``) must use the serial path (``readers.inputs.load_inputs`` + ``pipeline.analyze``).

Executors
    ``scheduler`` given (an address such as ``tcp://host:8786``): that Dask cluster; the files must be
    readable by its workers at the same paths. Else, with Dask installed (``pip install
    'gpudoctor[dask]'``) and ``executor="auto"``: a local Dask cluster of ``workers`` single-threaded
    processes. Without Dask: a ``concurrent.futures.ProcessPoolExecutor`` of ``workers`` processes
    (forkserver: workers start from a clean interpreter, not a copy of a large parent; as with any
    multiprocessing, a script calling this needs the ``if __name__ == "__main__":`` guard).
    ``workers`` defaults to the CPUs this process may use, capped by the number of files.

Same results as the serial path (tests/test_parallel.py): per-rank summaries and findings are computed
by the same functions on the same rank data. Two differences, both documented: ``world_size`` (used by
nccl_dominated / pipeline_bubbles for the bus-bandwidth factor and the pipeline depth) counts the input
files handed to ``analyze_many`` (the serial path counts the ranks of the inputs that could be read: the
two differ only when an input fails or one file holds several ranks), and categoricals keep the
reader's category order (ties in "top kernels" may list in another order).

Inputs that only make sense merged with another input (Nsight Compute exports, memory snapshots and
other side inputs attach to a timeline's rank) cannot be mapped independently: :func:`parallel_formats`
says False for them, and for run.db files.
"""

from __future__ import annotations

import gc
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gpudoctor import progress as prog
from gpudoctor.analyzers import stragglers
from gpudoctor.analyzers.analysis import Analysis
from gpudoctor.analyzers.config import Config, as_config
from gpudoctor.analyzers.findings import Finding
from gpudoctor.analyzers.registry import CROSS_RANK
from gpudoctor.analyzers.runner import analyze_trace, finish, rank_views, sort_findings
from gpudoctor.errors import GpudoctorError, install_hint
from gpudoctor.model.steps import StepWindow
from gpudoctor.model.summary import RankSummary
from gpudoctor.model.trace import Trace, conform
from gpudoctor.readers.boundary import input_boundary
from gpudoctor.readers.inputs import expand_inputs, input_format, pop_side_errors, read_input

PARALLEL_MIN_FILES = 8
"""``analyze_inputs`` switches to :func:`analyze_many` from this many input files on."""

# Per rank, the distinct kernel and collective kinds: what run-level checks on names need (which
# devices ran kernels, whether any rank runs pipeline send/recv...), a few rows instead of the events.
_KERNEL_KIND_COLUMNS = ("rank", "device_id", "name", "demangled_name", "category")
_COLLECTIVE_KIND_COLUMNS = ("rank", "op", "source")

# Formats a worker can read and analyze on its own (one rank per file). A run.db may hold a whole run
# (several ranks, ncu metrics attached): not mappable.
_MAPPABLE = {"nsys_sqlite", "json", "nsys_rep"}


@dataclass
class RankResult:
    """What one map task sends back: small, picklable, no event tables."""

    path: str
    inputs: list[dict] = field(default_factory=list)
    error: str | None = None
    side_errors: list[dict] = field(default_factory=list)  # files read with the input that failed alone
    summaries: list[RankSummary] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    ranks: pd.DataFrame | None = None
    devices: pd.DataFrame | None = None
    dropped: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)  # trace.meta without inputs
    straggler_rows: pd.DataFrame | None = None
    step_ends: dict = field(default_factory=dict)  # rank -> steady steps' GPU end times (ns)
    gate_data: dict = field(default_factory=dict)  # rank -> the gate's per-rank samples (model.samples.rank_data)
    kernel_kinds: pd.DataFrame | None = None  # distinct (rank, device_id, name, demangled_name, category)
    collective_kinds: pd.DataFrame | None = None  # distinct (rank, op, source) of the collectives
    read_s: float = 0.0
    analyze_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the task on its worker
    peak_rss_mb: float = 0.0  # the worker process's peak RSS so far


# ----------------------------------------------------------------------------------------------------
# When to use it


def parallel_formats(files: list[Path], min_files: int = PARALLEL_MIN_FILES) -> list[str | None] | None:
    """Each file's format (``input_format``, None when it cannot be read: reported by whichever path reads
    it) when there are at least ``min_files`` inputs and each readable one is a per-rank timeline file (nsys
    SQLite / .nsys-rep, PyTorch profiler JSON) that a worker can read and analyze on its own; else None."""
    if len(files) < min_files:
        return None
    formats: list[str | None] = []
    for f in files:
        try:
            fmt = input_format(Path(f))
        except GpudoctorError:
            formats.append(None)
            continue
        if fmt not in _MAPPABLE:
            return None
        formats.append(fmt)
    return formats


# ----------------------------------------------------------------------------------------------------
# Map


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _release_memory() -> None:
    """Give freed heap back to the OS between tasks, so a worker's RSS tracks its current rank."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def map_rank(path: str, rank: int | None = None, config: Config | dict | None = None, world: list[str] | None = None,
             fmt: str | None = None) -> RankResult:
    """Read one input and analyze each of its ranks (the map step; runs on a worker)."""
    out = RankResult(path=str(path))
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with input_boundary(path):
            trace = read_input(path, rank=rank, fmt=fmt)
    except GpudoctorError as e:
        out.error = str(e)
        out.inputs = [{"path": str(path), "error": str(e)}]
        out.cpu_s = time.process_time() - c0
        return out
    out.read_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        out.side_errors = pop_side_errors(trace)
        out.inputs = list(trace.meta.get("inputs") or [{"path": str(path)}]) + out.side_errors
        # Run-level facts (versions, profiler header); tables kept in meta stay on the worker.
        out.meta = {k: v for k, v in trace.meta.items() if k != "inputs" and not isinstance(v, pd.DataFrame)}
        _announce_world(trace, world or [], str(path))
        result = analyze_trace(trace, config, skip=CROSS_RANK)
        out.summaries, out.findings, out.gate_data = result.ranks, result.findings, result.samples
        if as_config(config).enabled(stragglers.ID):
            out.straggler_rows, out.step_ends = _straggler_part(trace, result.windows)
        out.kernel_kinds = trace.kernels[list(_KERNEL_KIND_COLUMNS)].drop_duplicates().reset_index(drop=True)
        out.collective_kinds = trace.collectives[list(_COLLECTIVE_KIND_COLUMNS)].drop_duplicates().reset_index(drop=True)
        out.ranks, out.devices, out.dropped = trace.ranks, trace.devices, trace.dropped
    finally:
        out.analyze_s = time.perf_counter() - t1
        del trace
        _release_memory()
        out.peak_rss_mb = _peak_rss_mb()
        out.cpu_s = time.process_time() - c0
    return out


def _announce_world(trace: Trace, world: list[str], own: str) -> None:
    """Let world_size() see the whole run: one placeholder input per other file of the run.

    world_size counts distinct ranks in meta["inputs"]; the placeholders carry negative ranks, which no
    real input has. Only the analyzers see them: the result keeps the real inputs.
    """
    others = [p for p in world if p != own]
    if others:
        trace.meta = dict(trace.meta)
        trace.meta["inputs"] = list(trace.meta.get("inputs") or []) + [
            {"path": p, "format": "peer", "rank": -(i + 1)} for i, p in enumerate(others)]


def _straggler_part(trace: Trace, windows: dict[int, StepWindow]) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """This input's rows of the straggler table (step_end_lag_ns filled by the reduce) and step ends, from
    the windows the analysis already found."""
    rows, ends = [], {}
    for r, view in rank_views(trace).items():
        if view.kernels.empty:
            continue
        row, ends[r] = stragglers.rank_row(view, r, windows[r])
        rows.append(row)
    return pd.DataFrame(rows, columns=stragglers.COLUMNS), ends


# ----------------------------------------------------------------------------------------------------
# Reduce


def reduce_results(results: list[RankResult], config: Config | dict | None = None) -> Analysis:
    """Assemble the Analysis of the run from the map results (in input order)."""
    inputs, errors, ok = [], [], []
    for r in results:
        inputs.extend(r.inputs)
        errors.extend(e["error"] for e in r.side_errors)
        if r.error is not None:
            errors.append(r.error)
        else:
            ok.append(r)
    if not ok:
        raise GpudoctorError(errors[0] if len(errors) == 1 else "; ".join(errors))
    _check_unique_ranks(ok)
    trace = _light_trace(ok, inputs)
    summaries = sorted((s for r in ok for s in r.summaries), key=lambda s: s.rank)
    findings = [f for r in ok for f in r.findings]
    findings.extend(_straggler_findings(ok, summaries, config, trace))
    findings = sort_findings(findings)
    # The gate's per-rank samples come from the workers (the light trace has no events to compute them).
    return Analysis(inputs=inputs, trace=trace, ranks=summaries, findings=findings, errors=errors,
                    gate_samples={k: v for r in ok for k, v in r.gate_data.items()})


def _check_unique_ranks(results: list[RankResult]) -> None:
    seen: dict[int, str] = {}
    for r in results:
        if r.ranks is None:
            continue
        for rank, src in zip(r.ranks["rank"].tolist(), r.ranks["source_file"].tolist()):
            if rank in seen:
                raise GpudoctorError(f"{src}: claims rank {rank}, already given by {seen[rank]} "
                                     "(pass an explicit rank mapping, e.g. --rank FILE=N)")
            seen[rank] = src


def _light_trace(results: list[RankResult], inputs: list[dict]) -> Trace:
    """The run's trace without its events (they stayed on the workers): ranks, devices and dropped of every
    rank, the merged meta, and one kernel row per distinct (rank, device, name, category) and one
    collective row per distinct (rank, op, source). Enough for run-level code that asks *which* kernels /
    devices / collectives the run has (gate.environment, nccl_dominated.pipeline_p2p), never how many or when."""
    t = Trace(meta={"inputs": [i for i in inputs if "error" not in i]})
    for name, attr in (("ranks", "ranks"), ("devices", "devices"), ("dropped", "dropped"),
                       ("kernels", "kernel_kinds"), ("collectives", "collective_kinds")):
        frames = [getattr(r, attr) for r in results if getattr(r, attr) is not None and len(getattr(r, attr))]
        if frames:
            setattr(t, name, conform(name, pd.concat(frames, ignore_index=True)))
    for r in results:
        for k, v in r.meta.items():
            t.meta.setdefault(k, v)
    t.meta["light_trace"] = True  # event tables were left on the workers
    return t


def _straggler_findings(results: list[RankResult], summaries: list[RankSummary], config: Config | dict | None,
                        trace: Trace) -> list[Finding]:
    """The stragglers finding of the run, from the per-rank rows, as analyze_run computes it."""
    cfg = as_config(config)
    if not cfg.enabled(stragglers.ID):
        return []
    frames = [r.straggler_rows for r in results if r.straggler_rows is not None and len(r.straggler_rows)]
    if not frames:
        return []
    tab = pd.concat(frames, ignore_index=True).sort_values("rank", kind="stable").reset_index(drop=True)
    step_ends: dict[int, np.ndarray] = {}
    for r in results:
        step_ends.update(r.step_ends)
    tab = stragglers.with_step_end_lag(tab, step_ends)
    found = stragglers.findings_from_table(tab, cfg.section(stragglers.ID), trace)
    if not summaries:
        return found
    # As the serial path: run from the context of the run's first rank.
    first = summaries[0]
    return [finish(f, stragglers.ID, first.rank, first.window.start_ns) for f in found]


# ----------------------------------------------------------------------------------------------------
# Executors


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(n_files: int) -> int:
    return max(1, min(cpu_count(), n_files))


def _have_dask() -> bool:
    try:
        import dask.distributed  # noqa: F401
    except ImportError:
        return False
    return True


def analyze_many(paths: list, config: Config | dict | None = None, workers: int | None = None,
                 scheduler: str | None = None, *, rank_map: dict | None = None, executor: str = "auto",
                 progress: bool | None = None, formats: list[str | None] | None = None) -> Analysis:
    """Parse and analyze every input on a worker, reduce across ranks; returns an Analysis.

    ``paths``: input files (directories of per-rank files are expanded as ``analyze_inputs`` does).
    ``workers``: worker processes (default: usable CPUs, at most one per file). ``scheduler``: the address
    of an existing Dask scheduler. ``executor``: "auto" (Dask when installed, else processes), "dask",
    "processes", or "serial" (in this process, one file after the other: the reference). ``rank_map``:
    path or file name -> rank, as in ``analyze_inputs``. ``formats``: each file's ``input_format`` when the
    caller already sniffed them. Raises GpudoctorError when no input could be read, or when two inputs claim
    the same rank.
    """
    files = [str(p) for p in expand_inputs([str(p) for p in paths])]
    fmts = formats if formats is not None and len(formats) == len(files) else [None] * len(files)
    rank_map = rank_map or {}
    ranks = [rank_map.get(f, rank_map.get(Path(f).name)) for f in files]
    n = len(files)
    workers = workers or default_workers(n)
    if scheduler is not None:
        executor = "dask"
    elif executor == "auto":
        executor = "dask" if _have_dask() and workers > 1 else ("processes" if workers > 1 else "serial")
    results: list[RankResult | None] = [None] * n
    with prog.task(f"Analyzing {n} inputs ({executor}, {workers} workers)", total=n, show=progress) as bar:
        if executor == "serial":
            for i, f in enumerate(files):
                results[i] = map_rank(f, ranks[i], config, files, fmts[i])
                bar.advance()
        elif executor == "processes":
            _run_processes(files, ranks, fmts, config, workers, results, bar)
        elif executor == "dask":
            _run_dask(files, ranks, fmts, config, workers, scheduler, results, bar)
        else:
            raise ValueError(f"executor must be auto, dask, processes or serial, not {executor!r}")
    return reduce_results([r for r in results if r is not None], config)


def _pool_context():
    import multiprocessing as mp
    try:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["gpudoctor.parallel", "gpudoctor.readers.inputs"])
        return ctx
    except ValueError:  # no forkserver on this platform
        return mp.get_context("spawn")


def _run_processes(files, ranks, fmts, config, workers, results, bar) -> None:
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        futs = {pool.submit(map_rank, f, ranks[i], config, files, fmts[i]): i for i, f in enumerate(files)}
        for fut in as_completed(futs):
            results[futs[fut]] = fut.result()
            bar.advance()


def _run_dask(files, ranks, fmts, config, workers, scheduler, results, bar) -> None:
    try:
        from dask.distributed import Client, LocalCluster
        from dask.distributed import as_completed as dask_completed
    except ImportError:
        raise GpudoctorError(f"--scheduler needs Dask: {install_hint('dask')}") from None
    cluster = None
    if scheduler is None:
        # One single-threaded process per worker: the readers hold the GIL most of the time.
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=50)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as e:
            raise GpudoctorError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
    try:
        futs = client.map(map_rank, files, ranks, [config] * len(files), [files] * len(files), fmts, pure=False)
        index = {f.key: i for i, f in enumerate(futs)}
        for fut in dask_completed(futs):
            results[index[fut.key]] = fut.result()
            fut.release()
            bar.advance()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
