"""The analyzers, in the order they run, each with its declaration (``SPEC``, see analyzers/spec.py).

Every analyzer is listed here, so its settings are known as soon as the config is (no analyzer joins
later, whatever is imported first). To add one: write its module with ``SPEC = AnalyzerSpec(...)`` and add
the module to ``_MODULES``; its settings then work in gpudoctor.toml and ``--set`` and must be documented
in docs/analyzers.md (tests/test_registry.py checks).
"""

from __future__ import annotations

from gpudoctor.analyzers import (
    gpu_idle,
    kv_fragmentation,
    low_tensor_core,
    memory_bound_decode,
    nccl_dominated,
    ncu_kernels,
    pipeline_bubbles,
    stragglers,
    unfused_attention,
)
from gpudoctor.analyzers.spec import GENERAL_SEVERITY, AnalyzerSpec, Setting

_MODULES = (unfused_attention, low_tensor_core, memory_bound_decode, gpu_idle, nccl_dominated, pipeline_bubbles,
            stragglers, kv_fragmentation, ncu_kernels)

ANALYZERS: dict[str, AnalyzerSpec] = {m.SPEC.id: m.SPEC for m in _MODULES}
"""id -> declaration, in run order (ties between findings keep this order)."""

SEVERITY = "severity"
"""The config section of the general severity rule (not an analyzer)."""

SECTIONS: dict[str, tuple[Setting, ...]] = {SEVERITY: GENERAL_SEVERITY, **{a: s.settings for a, s in ANALYZERS.items()}}
"""Every section of the config and its settings."""

CROSS_RANK: tuple[str, ...] = tuple(a for a, s in ANALYZERS.items() if s.cross_rank)
"""Analyzers that need every rank at once (the parallel path runs them after its reduce)."""
