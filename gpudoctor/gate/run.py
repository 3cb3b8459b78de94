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

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from gpudoctor.analyzers.findings import Finding

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
            "env": copy.deepcopy(self.env),  # a document of its own: editing it never edits this run
            "samples": {k: [num(x) for x in v] for k, v in self.samples.items()},
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
        """Raises ValueError (with what is wrong) for anything but a well-formed gate run document."""
        if not isinstance(d, dict) or d.get("format") != RUN_FORMAT:
            raise ValueError("not a gpudoctor gate run")
        try:
            if int(d.get("version", 0)) > RUN_FORMAT_VERSION:
                raise ValueError(f"gate run format version {d.get('version')} is newer than this gpudoctor reads")
            samples = {str(k): [_finite(x) for x in v if x is not None] for k, v in (d.get("samples") or {}).items()}
            kernels = pd.DataFrame([[str(n), str(c), int(t), int(k)] for n, c, t, k in d.get("kernels") or []],
                                   columns=["name", "category", "total_ns", "count"])
            ranges = pd.DataFrame([[str(t), int(n), int(k)] for t, n, k in d.get("ranges") or []],
                                  columns=["text", "total_ns", "count"])
            env = d.get("env") or {}
            if not isinstance(env, dict):
                raise ValueError("env is not an object")
            return cls(
                label=label or str(d.get("label", "")), source=str(d.get("source", "")), env=dict(env),
                samples=samples, steps=int(d.get("steps", 0)), kernels=kernels, ranges=ranges,
                findings=[f for f in (findings if findings is not None else d.get("findings") or []) if isinstance(f, dict)],
                windows=[str(w) for w in d.get("windows") or []], notes=[str(n) for n in d.get("notes") or []],
                attribution_complete=bool(d.get("attribution_complete", True)),
            )
        except (TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ValueError(f"malformed gate run data: {e}") from None


def _finite(x) -> float:
    v = float(x)
    if isinstance(x, bool) or not math.isfinite(v):
        raise ValueError(f"sample {x!r} is not a finite number")
    return v


def num(x: float) -> int | float:
    x = float(x)
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def finding_dict(f: Finding | dict) -> dict:
    return f if isinstance(f, dict) else f.to_dict()



# metric -> the analyzer that owns it (others may carry a key of the same name with another meaning,
# e.g. pipeline_bubbles' per-stage idle_fraction); the owner's value is used when it reports one.
METRIC_OWNER = {"idle_fraction": "gpu_idle", "exposed_comm_fraction": "nccl_dominated", "mbu": "memory_bound_decode"}


def carriers(findings: list[dict], metric: str) -> list[dict]:
    """Findings that report ``metric`` as a finite number, the owning analyzer's only when it has any."""
    def ok(f):
        v = (f.get("metrics") or {}).get(metric)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    fs = [f for f in findings if ok(f)]
    own = [f for f in fs if f.get("analyzer") == METRIC_OWNER.get(metric)]
    return own or fs
