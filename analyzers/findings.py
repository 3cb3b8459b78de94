"""The Finding: what an analyzer says, how much it costs, and what to do about it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SEVERITIES = ("info", "low", "medium", "high")


@dataclass
class Finding:
    analyzer: str  # id, part of the JSON contract: unfused_attention, low_tensor_core, ...
    severity: str  # info | low | medium | high
    title: str
    metrics: dict = field(default_factory=dict)
    estimated_saving_ns: int = 0  # per steady-state window
    estimated_saving_fraction: float = 0.0  # of the steady-state window
    recommendation: str = ""
    evidence: dict = field(default_factory=dict)  # kernel names, ranges, examples with timestamps
    rank: int | None = None

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, not {self.severity!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def severity_rank(self) -> int:
        return SEVERITIES.index(self.severity)


def severity_for(fraction: float, medium: float = 0.05, high: float = 0.15, low: float = 0.01) -> str:
    """THE severity rule: a problem costing ``fraction`` of the steady-state window is

    high if fraction >= high (15%), medium if >= medium (5%), low if >= low (1%), else info.
    NaN (cost unknown) is info. Analyzers whose cost is not a share of the window (memory_bound_decode,
    gpu_idle) document their own thresholds and call this with them.
    """
    if fraction is None or not math.isfinite(fraction):
        return "info"
    if fraction >= high:
        return "high"
    if fraction >= medium:
        return "medium"
    if fraction >= low:
        return "low"
    return "info"
