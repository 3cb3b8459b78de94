"""The analyzers, by id, and ``run_all``.

An analyzer is a pure function ``(ctx: AnalysisContext) -> list[Finding]``. ``run_all`` builds one
context per rank (steps, steady-state window, clipped tables, device peaks: computed once and shared by
every analyzer of that rank) and runs every enabled analyzer on it. Nothing is caught: an analyzer that
raises is a bug and the exception propagates.
"""

from __future__ import annotations

from typing import Callable

from gpudoctor.analyzers import gpu_idle, low_tensor_core, memory_bound_decode, unfused_attention
from gpudoctor.analyzers.config import Config, as_config
from gpudoctor.analyzers.context import AnalysisContext, build_context
from gpudoctor.analyzers.findings import Finding
from gpudoctor.model.trace import Trace

Analyzer = Callable[[AnalysisContext], list[Finding]]

ANALYZERS: dict[str, Analyzer] = {
    unfused_attention.ID: unfused_attention.analyze,
    low_tensor_core.ID: low_tensor_core.analyze,
    memory_bound_decode.ID: memory_bound_decode.analyze,
    gpu_idle.ID: gpu_idle.analyze,
}


def register(module) -> None:
    """Add an analyzer module (``ID``, ``analyze(ctx)``, optional ``DEFAULTS`` / ``CONFIG_DEFAULTS``:
    key -> (default, meaning)) to ANALYZERS and its keys to the config."""
    from gpudoctor.analyzers.config import register_defaults

    aid = module.ID
    ANALYZERS[aid] = module.analyze
    defaults = getattr(module, "CONFIG_DEFAULTS", None) or getattr(module, "DEFAULTS", None)
    if isinstance(defaults, dict):
        register_defaults(aid, defaults)


def contexts(trace: Trace, config: Config | dict | None = None) -> list[AnalysisContext]:
    """One AnalysisContext per rank of ``trace`` (ranks without kernels included: they may idle)."""
    cfg = as_config(config)
    ranks = trace.rank_ids or [0]
    if len(ranks) == 1 and (trace.kernels.empty or set(trace.kernels["rank"].unique()) <= {ranks[0]}):
        return [build_context(trace, ranks[0], cfg, rank_view=trace)]
    return [build_context(trace, r, cfg) for r in ranks]


def run_context(ctx: AnalysisContext, only: list[str] | None = None) -> list[Finding]:
    out: list[Finding] = []
    for aid, fn in ANALYZERS.items():
        if (only is not None and aid not in only) or not ctx.config.enabled(aid):
            continue
        for f in fn(ctx):
            if f.analyzer != aid:
                raise ValueError(f"analyzer {aid} returned a finding of {f.analyzer!r}")
            if f.rank is None:
                f.rank = ctx.rank
            f.evidence.setdefault("window_start_ns", ctx.start_ns)  # evidence times (start_us) count from here
            out.append(f)
    return out


def run_all(trace: Trace, config: Config | dict | None = None, only: list[str] | None = None) -> list[Finding]:
    """Every enabled analyzer on every rank; findings sorted by rank, then severity (high first), then saving."""
    unknown = set(only or []) - set(ANALYZERS)
    if unknown:
        raise KeyError(f"unknown analyzers {sorted(unknown)}; known: {', '.join(ANALYZERS)}")
    findings: list[Finding] = []
    for ctx in contexts(trace, config):
        findings.extend(run_context(ctx, only))
    findings.sort(key=lambda f: (f.rank if f.rank is not None else -1, -f.severity_rank, -f.estimated_saving_ns))
    return findings


# Multi-GPU and memory analyzers live in their own modules and join the registry here.
from gpudoctor.analyzers import kv_fragmentation, nccl_dominated, ncu_kernels, pipeline_bubbles, stragglers  # noqa: E402

for _module in (nccl_dominated, pipeline_bubbles, stragglers, kv_fragmentation, ncu_kernels):
    register(_module)
