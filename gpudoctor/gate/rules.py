"""Rules on the candidate's findings and metrics (the ``[gate]`` keys fail_on, fail_on_severity,
max_idle_fraction, max_exposed_comm_fraction, min_mbu): validated, then evaluated."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from gpudoctor.analyzers.registry import ANALYZERS
from gpudoctor.errors import GpudoctorError
from gpudoctor.gate.run import RunData, carriers, finding_dict

# fail_on must name a registered analyzer.
KNOWN_ANALYZERS: tuple[str, ...] = tuple(ANALYZERS)
SEVERITIES = ("info", "low", "medium", "high")
RULE_KEYS = ("fail_on", "fail_on_severity", "max_idle_fraction", "max_exposed_comm_fraction", "min_mbu")
# rule -> (metric, which way is bad, analyzer whose evidence is shown when the metric comes from the summary)
_THRESHOLD_RULES = {
    "max_idle_fraction": ("idle_fraction", "above", "gpu_idle"),
    "max_exposed_comm_fraction": ("exposed_comm_fraction", "above", "nccl_dominated"),
    "min_mbu": ("mbu", "below", "memory_bound_decode"),
}


@dataclass
class RuleResult:
    name: str  # fail_on:ANALYZER | max_idle_fraction | max_exposed_comm_fraction | min_mbu
    status: str  # pass | fail | skipped
    message: str
    threshold: object = None
    value: float | None = None
    evidence: dict = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)  # the findings behind a failure: analyzer, severity, title, rank, run

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "message": self.message, "threshold": self.threshold,
                "value": self.value, "evidence": self.evidence, "findings": self.findings}


def validate_rules(rules: dict, known_analyzers: tuple[str, ...] = KNOWN_ANALYZERS) -> dict:
    """Check a rules table (the [gate] keys fail_on, fail_on_severity, max_*, min_mbu); returns it cleaned."""
    out: dict = {}
    for k, v in (rules or {}).items():
        if k not in RULE_KEYS:
            raise GpudoctorError(f"unknown gate rule {k!r} (known: {', '.join(RULE_KEYS)})")
        if k == "fail_on":
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise GpudoctorError("gate.fail_on must be a list of analyzer ids")
            bad = [x for x in v if x not in known_analyzers]
            if bad:
                raise GpudoctorError(f"gate.fail_on names unknown analyzers {bad} (known: {', '.join(known_analyzers)})")
            out[k] = list(v)
        elif k == "fail_on_severity":
            if v not in SEVERITIES:
                raise GpudoctorError(f"gate.fail_on_severity must be one of {', '.join(SEVERITIES)}, not {v!r}")
            out[k] = v
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise GpudoctorError(f"gate.{k} must be a number, not {v!r}")
            out[k] = float(v)
    return out


def rule_values(candidates: list[RunData]) -> dict[str, float]:
    """Per rule metric: each run's worst rank, then the median over runs."""
    out = {}
    for rule, (metric, bad, _) in _THRESHOLD_RULES.items():
        per_run = [(max if bad == "above" else min)(r.samples[metric]) for r in candidates if r.samples.get(metric)]
        if per_run:
            out[metric] = float(np.median(per_run))
    return out


def _brief(f: dict) -> dict:
    return {k: f.get(k) for k in ("analyzer", "severity", "title", "rank", "run", "estimated_saving_ns",
                                  "estimated_saving_fraction") if f.get(k) is not None}


def evaluate_rules(rules: dict, findings: list, values: dict[str, float] | None = None,
                   baseline_findings: Iterable = ()) -> list[RuleResult]:
    """The rules of ``[gate]`` on the candidate's findings (Finding objects or their dicts) and metric values.

    ``values``: idle_fraction / exposed_comm_fraction / mbu of the candidate; a value missing there is taken
    from the findings' metrics (the worst one). A rule whose value is unknown is skipped, not passed.
    ``baseline_findings``: the baseline's, only to say when a failing finding was there already.
    """
    fs = [finding_dict(f) for f in findings]
    values = dict(values or {})
    out: list[RuleResult] = []
    min_sev = rules.get("fail_on_severity", "low")
    min_rank = SEVERITIES.index(min_sev)

    def counts(f: dict) -> bool:
        return f.get("severity") in SEVERITIES and SEVERITIES.index(f["severity"]) >= min_rank

    base_ids = {f.get("analyzer") for f in map(finding_dict, baseline_findings) if counts(f)}
    for aid in rules.get("fail_on") or []:
        hits = [f for f in fs if f.get("analyzer") == aid and counts(f)]
        name = f"fail_on:{aid}"
        if hits:
            hits.sort(key=lambda f: (-SEVERITIES.index(f["severity"]), -(f.get("estimated_saving_ns") or 0)))
            top = hits[0]
            msg = f"{top.get('title') or aid} [{top['severity']}]"
            if len(hits) > 1:
                msg += f" (+{len(hits) - 1} more finding{'s' if len(hits) > 2 else ''})"
            if aid in base_ids:
                msg += "; the baseline has this finding too"
            out.append(RuleResult(name, "fail", msg, threshold=min_sev, evidence=top.get("evidence") or {},
                                  findings=[_brief(f) for f in hits]))
        else:
            out.append(RuleResult(name, "pass", f"no {aid} finding of severity {min_sev} or higher", threshold=min_sev))
    for rule, (metric, bad, analyzer) in _THRESHOLD_RULES.items():
        if rule not in rules:
            continue
        thr = float(rules[rule])
        carrying = carriers(fs, metric)
        value = values.get(metric)
        if value is None and carrying:
            pick = max if bad == "above" else min
            value = float(pick(f["metrics"][metric] for f in carrying))
        if value is None:
            out.append(RuleResult(rule, "skipped", f"no {metric} known for the candidate (no finding reports it)",
                                  threshold=thr))
            continue
        broken = value > thr if bad == "above" else value < thr
        op = ">" if bad == "above" else "<"
        ok_op = "<=" if bad == "above" else ">="
        if not broken:
            out.append(RuleResult(rule, "pass", f"{metric} {value:.3f} {ok_op} {thr:g}", threshold=thr, value=value))
            continue
        src = carrying or [f for f in fs if f.get("analyzer") == analyzer]
        src.sort(key=lambda f: -SEVERITIES.index(f.get("severity", "info")) if f.get("severity") in SEVERITIES else 0)
        msg = f"{metric} {value:.3f} {op} {thr:g}"
        evidence: dict = {}
        if src:
            msg += f": {src[0].get('title', '')}"
            evidence = src[0].get("evidence") or {}
        out.append(RuleResult(rule, "fail", msg, threshold=thr, value=value, evidence=evidence,
                              findings=[_brief(f) for f in src[:5]]))
    return out
