"""inputs -> trace model -> analyzers -> Analysis: the one path every command takes.

``analyze_inputs`` reads every input (gpudoctor.readers.inputs), merges them into one run and analyzes it
(gpudoctor.analyzers.runner: each rank's window, summary, findings and gate samples computed once). Many
per-rank files (or a Dask scheduler) go to gpudoctor.parallel instead, which returns the same Analysis.
"""

from __future__ import annotations

from gpudoctor import parallel
from gpudoctor.analyzers.analysis import Analysis
from gpudoctor.analyzers.config import Config
from gpudoctor.analyzers.runner import analyze_trace
from gpudoctor.errors import GpudoctorError
from gpudoctor.model.trace import Trace
from gpudoctor.progress import task
from gpudoctor.readers.inputs import expand_inputs, load_inputs
from gpudoctor.store.ceilings import stored_ceilings


def analyze(trace: Trace, inputs: list[dict], errors: list[str], config: Config | dict | None = None,
            samples: bool = True) -> Analysis:
    """The Analysis of a trace already read (``samples``: compute the gate's per-step samples too)."""
    _use_stored_ceilings(trace, config)
    with task("Analyzing"):
        result = analyze_trace(trace, config, samples=samples)
    return Analysis(inputs=inputs, trace=trace, ranks=result.ranks, findings=result.findings, errors=errors,
                    gate_samples=result.samples if samples else None)


def _use_stored_ceilings(trace: Trace, config: Config | dict | None) -> None:
    """Ceilings `gpudoctor ceilings` stored for the run's GPU model, when none were given."""
    if getattr(config, "ceilings", None) is not None or trace.meta.get("ceilings") or trace.devices.empty:
        return
    names = {str(n) for n in trace.devices["name"] if n}
    if len(names) == 1:
        stored = stored_ceilings(names.pop())
        if stored:
            trace.meta["ceilings"] = stored


def analyze_inputs(paths: list[str], config: Config | dict | None = None, rank_map: dict[str, int] | None = None, *,
                   workers: int | None = None, scheduler: str | None = None, need_trace: bool = False,
                   samples: bool = True) -> Analysis:
    """Read, merge and analyze. Raises GpudoctorError only when no input could be read.

    Many rank files (or a Dask ``scheduler``) go to gpudoctor.parallel, whose Analysis carries a light
    trace (ranks, devices, dropped): callers that need the events pass ``need_trace=True``. ``samples``:
    compute the gate's per-step samples (what analysis.json's ``gate`` block holds).
    """
    files = expand_inputs(paths)
    if not need_trace:
        formats = parallel.parallel_formats(files, min_files=1 if scheduler else parallel.PARALLEL_MIN_FILES)
        if formats is not None:
            return parallel.analyze_many(paths, config, workers=workers, scheduler=scheduler, rank_map=rank_map,
                                         formats=formats)
    trace, inputs, errors = load_inputs(paths, rank_map)
    if trace is None:
        raise GpudoctorError(errors[0] if len(errors) == 1 else "; ".join(errors))
    return analyze(trace, inputs, errors, config, samples=samples)
