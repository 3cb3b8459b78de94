"""Running the analyzers on a trace: each thing computed once per rank, findings finished and sorted once.

For each rank: its tables (one filtered view), its steady-state window (``find_steps``, once), its
summary (``summarize_rank``), the gate's per-step samples (``model.samples.rank_data``), and one
AnalysisContext shared by every enabled analyzer of that rank. Every rank's window is handed to the
contexts, so cross-rank analyzers (stragglers) reuse them. Nothing is caught: an analyzer that raises is a
bug and the exception propagates.

Findings are finished (``finish``: rank and window start filled in, the analyzer id checked) and sorted
once (``sort_findings``: by estimated saving, then severity, rank and registry order); renderers keep
that order. The parallel path (gpudoctor.parallel) uses the same functions on its workers and in its reduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpudoctor.analyzers.config import Config, as_config
from gpudoctor.analyzers.context import AnalysisContext, build_context
from gpudoctor.analyzers.findings import Finding
from gpudoctor.analyzers.registry import ANALYZERS
from gpudoctor.model.kernel_names import kernel_keys
from gpudoctor.model.samples import rank_data
from gpudoctor.model.steps import StepWindow, find_steps
from gpudoctor.model.summary import RankSummary, summarize_rank
from gpudoctor.model.trace import Trace

_ORDER = {aid: i for i, aid in enumerate(ANALYZERS)}


@dataclass
class TraceAnalysis:
    """What analyzing one trace gives: per-rank summaries, findings (sorted), and per-rank gate samples."""

    ranks: list[RankSummary]
    findings: list[Finding]
    samples: dict[int, dict] = field(default_factory=dict)  # rank -> model.samples.rank_data (when asked for)
    windows: dict[int, StepWindow] = field(default_factory=dict)


def rank_views(trace: Trace) -> dict[int, Trace]:
    """Each rank's tables, filtered once (one rank whose events are all its own: the trace itself)."""
    ranks = trace.rank_ids or [0]
    if len(ranks) == 1 and (trace.kernels.empty or set(trace.kernels["rank"].unique()) <= {ranks[0]}):
        return {ranks[0]: trace}
    return {r: trace.for_rank(r) for r in ranks}


def check_only(only: list[str] | None) -> None:
    unknown = set(only or []) - set(ANALYZERS)
    if unknown:
        raise KeyError(f"unknown analyzers {sorted(unknown)}; known: {', '.join(ANALYZERS)}")


def finish(f: Finding, analyzer: str, rank: int, window_start_ns: int) -> Finding:
    """The runner's part of every finding: the analyzer id checked, the rank and window start filled in
    (evidence times, start_us, count from the window start)."""
    if f.analyzer != analyzer:
        raise ValueError(f"analyzer {analyzer} returned a finding of {f.analyzer!r}")
    if f.rank is None:
        f.rank = rank
    f.evidence.setdefault("window_start_ns", window_start_ns)
    return f


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """THE order of findings: largest estimated saving first, then severity (high first), rank, registry order."""
    return sorted(findings, key=lambda f: (-f.estimated_saving_ns, -f.severity_rank,
                                           f.rank if f.rank is not None else -1, _ORDER.get(f.analyzer, len(_ORDER))))


def run_context(ctx: AnalysisContext, only: list[str] | None = None, skip: tuple[str, ...] = ()) -> list[Finding]:
    """Every enabled analyzer (of ``only``, less ``skip``) on one rank's context, findings finished."""
    out: list[Finding] = []
    for aid, spec in ANALYZERS.items():
        if (only is not None and aid not in only) or aid in skip or not ctx.config.enabled(aid):
            continue
        out.extend(finish(f, aid, ctx.rank, ctx.start_ns) for f in spec.analyze(ctx))
    return out


def contexts(trace: Trace, config: Config | dict | None = None) -> list[AnalysisContext]:
    """One AnalysisContext per rank of ``trace`` (ranks without kernels included: they may idle)."""
    cfg = as_config(config)
    views = rank_views(trace)
    windows = {r: find_steps(v.ranges, v.kernels) for r, v in views.items()}
    shared: dict = {}
    return [build_context(trace, r, cfg, rank_view=v, window=windows[r], run_windows=windows, run_cache=shared)
            for r, v in views.items()]


def analyze_trace(trace: Trace, config: Config | dict | None = None, *, only: list[str] | None = None,
                  skip: tuple[str, ...] = (), samples: bool = True) -> TraceAnalysis:
    """Summaries, findings and (``samples``) the gate's per-step samples of every rank of ``trace``.

    ``only`` / ``skip``: analyzer ids to run / leave out (the parallel path skips the cross-rank ones on
    its workers). One context is alive at a time.
    """
    check_only(only)
    cfg = as_config(config)
    views = rank_views(trace)
    windows = {r: find_steps(v.ranges, v.kernels) for r, v in views.items()}
    keys = {r: kernel_keys(v.kernels) for r, v in views.items()}  # each kernel's identity, decided once
    out = TraceAnalysis(ranks=[summarize_rank(trace, r, view=v, window=windows[r], keys=keys[r])
                               for r, v in views.items()], findings=[], windows=windows)
    if samples:
        out.samples = {r: rank_data(v, windows[r], keys[r]) for r, v in views.items()}
    findings: list[Finding] = []
    shared: dict = {}  # run-wide facts (p2p pairs), computed by the first rank that needs them
    for r, v in views.items():
        ctx = build_context(trace, r, cfg, rank_view=v, window=windows[r], run_windows=windows, run_cache=shared)
        findings.extend(run_context(ctx, only, skip))
    out.findings = sort_findings(findings)
    return out


def run_all(trace: Trace, config: Config | dict | None = None, only: list[str] | None = None) -> list[Finding]:
    """Every enabled analyzer (or those in ``only``) on every rank, findings in THE order (sort_findings)."""
    return analyze_trace(trace, config, only=only, samples=False).findings
