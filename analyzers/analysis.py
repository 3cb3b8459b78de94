"""The Analysis: everything one run's analysis produced, what renderers, the gate and dashboards consume."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpudoctor.analyzers.findings import Finding
from gpudoctor.model.summary import RankSummary
from gpudoctor.model.trace import Trace


@dataclass
class Analysis:
    """One run: its inputs, the merged trace, per-rank summaries, findings (sorted once, in the runner's
    order), one-line errors of inputs that could not be read, and the gate's per-rank samples
    (rank -> model.samples.rank_data; None when the analysis was made without them).

    The parallel path's trace is light (ranks, devices, dropped and the distinct kernel kinds): see
    gpudoctor.parallel.
    """

    inputs: list[dict]
    trace: Trace
    ranks: list[RankSummary]
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    gate_samples: dict[int, dict] | None = None

    @property
    def dropped(self) -> dict[str, int]:
        return self.trace.dropped_counts()
