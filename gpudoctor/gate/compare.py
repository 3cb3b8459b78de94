"""The comparison of candidate runs against baseline runs: every metric decided (gpudoctor.gate.stats), the
rules checked (gpudoctor.gate.rules), the change attributed (gpudoctor.gate.attribution), one overall
status and exit code."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gpudoctor.errors import GpudoctorError
from gpudoctor.gate import stats
from gpudoctor.gate.conditions import check_conditions
from gpudoctor.gate.environment import check_environment
from gpudoctor.gate.rules import evaluate_rules, rule_values
from gpudoctor.gate.run import DEFAULT_GATED, METRICS, MetricSpec, RunData, UserMetric


@dataclass
class GateOptions:
    tolerance: float = stats.DEFAULT_TOLERANCE
    tolerances: dict[str, float] = field(default_factory=dict)  # per metric
    min_samples: int = stats.DEFAULT_MIN_SAMPLES
    alpha: float = stats.DEFAULT_ALPHA
    confidence: float = stats.DEFAULT_CONFIDENCE
    bootstrap: int = stats.DEFAULT_BOOTSTRAP
    seed: int = stats.DEFAULT_SEED
    inconclusive: str = "exit3"  # pass | fail | exit3
    gated: tuple[str, ...] = DEFAULT_GATED
    user_metrics: list[UserMetric] = field(default_factory=list)
    rules: dict = field(default_factory=dict)  # fail_on, fail_on_severity, max_idle_fraction, ...
    allow_mismatch: bool = False
    top: int = 10
    tolerance_source: str = "default"

    def tolerance_for(self, metric: str) -> float:
        return float(self.tolerances.get(metric, self.tolerance))


@dataclass
class MetricResult:
    spec: MetricSpec
    gated: bool
    decision: stats.Decision

    @property
    def status(self) -> str:
        return self.decision.decision

    def to_dict(self) -> dict:
        return {"name": self.spec.name, "label": self.spec.label, "unit": self.spec.unit,
                "higher_is_better": self.spec.higher_is_better, "gated": self.gated, **self.decision.to_dict()}


@dataclass
class GateResult:
    status: str  # pass | improvement | fail | inconclusive | error
    exit_code: int
    reasons: list[str]
    metrics: list[MetricResult]
    rules: list  # rules.RuleResult
    attribution: dict
    baselines: list[RunData]
    candidates: list[RunData]
    options: GateOptions
    mismatches: list[str] = field(default_factory=list)  # allowed with --allow-mismatch
    not_comparable: list[str] = field(default_factory=list)  # environment / GPU conditions: inconclusive
    env_notes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def headline(self) -> str:
        return self.reasons[0] if self.reasons else self.status

    def to_dict(self) -> dict:
        from gpudoctor import __version__

        o = self.options
        return {
            "gpudoctor_version": __version__,
            "status": self.status, "exit_code": self.exit_code, "reasons": self.reasons,
            "baseline": [{"label": r.label, "source": r.source, "env": r.env, "windows": r.windows,
                          "steps": r.steps} for r in self.baselines],
            "candidate": [{"label": r.label, "source": r.source, "env": r.env, "windows": r.windows,
                           "steps": r.steps} for r in self.candidates],
            "options": {"tolerance": o.tolerance, "tolerance_source": o.tolerance_source, "tolerances": o.tolerances,
                        "min_samples": o.min_samples, "alpha": o.alpha, "confidence": o.confidence,
                        "bootstrap": o.bootstrap, "seed": o.seed, "inconclusive": o.inconclusive,
                        "gated": list(o.gated), "rules": o.rules, "allow_mismatch": o.allow_mismatch},
            "metrics": [m.to_dict() for m in self.metrics],
            "rules": [r.to_dict() for r in self.rules],
            "attribution": self.attribution,
            "mismatches": self.mismatches, "not_comparable": self.not_comparable, "env_notes": self.env_notes,
            "notes": self.notes,
        }


def pooled(runs: list[RunData], metric: str) -> list[float]:
    return [x for r in runs for x in r.samples.get(metric, [])]


def compare(baselines: list[RunData], candidates: list[RunData], options: GateOptions | None = None) -> GateResult:
    """Decide every metric, check the rules, attribute the change. Runs from different hardware or software,
    or recorded in different GPU conditions (gpudoctor.gate.conditions), make the result inconclusive unless
    ``allow_mismatch`` is on (then the differences are listed as mismatches)."""
    from gpudoctor.gate.attribution import attribute

    o = options or GateOptions()
    if not baselines or not candidates:
        raise GpudoctorError("gate needs at least one baseline and one candidate run")
    hard, soft = check_environment(baselines, candidates)
    unfit, cond_notes = check_conditions(baselines, candidates)
    not_comparable = [] if o.allow_mismatch else hard + unfit
    mismatches = hard + unfit if o.allow_mismatch else []
    specs = dict(METRICS)
    for um in o.user_metrics:
        specs[um.name] = um.spec()
    gated = set(o.gated) | {um.name for um in o.user_metrics if um.gate}
    unknown = gated - set(specs)
    if unknown:
        raise GpudoctorError(f"unknown gate metric(s) {sorted(unknown)}; known: {', '.join(specs)}")
    results: list[MetricResult] = []
    notes: list[str] = []
    for name, spec in specs.items():
        a, b = pooled(baselines, name), pooled(candidates, name)
        if not a and not b:
            if name in gated:
                hint = ("the program's output had no match for its regex" if spec.per == "sample" else
                        "it needs a trace, a run directory or an analysis.json with the gate block; "
                        "gate on other metrics with --metrics")
                results.append(MetricResult(spec, True, stats.Decision(
                    stats.ERROR, f"no {name} values in either baseline or candidate ({hint})", 0, 0,
                    tolerance=o.tolerance_for(name), higher_is_better=spec.higher_is_better)))
            continue
        unit = {"step": "steps", "rank": "values (one per rank and run)", "sample": "values"}[spec.per]
        d = stats.decide(a, b, o.tolerance_for(name), higher_is_better=spec.higher_is_better,
                         min_samples=o.min_samples, alpha=o.alpha, confidence=o.confidence, n_boot=o.bootstrap,
                         seed=o.seed, unit_label=unit)
        results.append(MetricResult(spec, name in gated, d))
    attribution = attribute(baselines, candidates, top=o.top)
    cand_findings = [dict(f, run=r.label) for r in candidates for f in r.findings]
    base_findings = [f for r in baselines for f in r.findings]
    rule_results = evaluate_rules(o.rules, cand_findings, rule_values(candidates), baseline_findings=base_findings)
    status, code, reasons = _overall(results, rule_results, attribution, o, not_comparable)
    notes += cond_notes
    for r in baselines + candidates:
        notes += [f"{r.label}: {n}" for n in r.notes]
    return GateResult(status, code, reasons, results, rule_results, attribution, baselines, candidates, o,
                      mismatches=mismatches, env_notes=soft, notes=notes, not_comparable=not_comparable)


def fmt_value(v: float | None, unit: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if unit == "ns":
        from gpudoctor.render.fmt import ns
        return ns(v)
    if unit == "fraction":
        return f"{v:.3f}"
    return f"{v:.4g}{(' ' + unit) if unit else ''}"


def metric_line(m: MetricResult) -> str:
    d = m.decision
    s = f"{m.spec.label}: "
    if d.median_baseline is not None and d.median_candidate is not None:
        s += f"{fmt_value(d.median_baseline, m.spec.unit)} -> {fmt_value(d.median_candidate, m.spec.unit)}"
        if d.change is not None:
            s += f" ({d.change * 100:+.1f}%)"
        s += "; "
    rule = stats.RULE_WORDS.get(d.rule)
    return s + d.reason + (f" [rule: {rule}]" if rule else "")


def _overall(metrics: list[MetricResult], rules: list, attribution: dict, o: GateOptions,
             not_comparable: list[str]) -> tuple[str, int, list[str]]:
    g = [m for m in metrics if m.gated]
    reg = [m for m in g if m.status == stats.REGRESSION]
    err = [m for m in g if m.status == stats.ERROR]
    inc = [m for m in g if m.status == stats.INCONCLUSIVE]
    imp = [m for m in g if m.status == stats.IMPROVEMENT]
    broken = [r for r in rules if r.status == "fail"]
    reasons: list[str] = []
    for m in reg:
        line = "regression: " + metric_line(m)
        if attribution.get("headline"):
            line += f" | {attribution['headline']}"
        reasons.append(line)
    reasons += [f"rule {r.name}: {r.message}" for r in broken]
    if broken:
        return "fail", 1, reasons
    if not_comparable:  # the step times may have moved for a reason other than the code
        code = {"pass": 0, "fail": 1, "exit3": 3}[o.inconclusive]
        return "inconclusive", code, ([f"not comparable: {x}" for x in not_comparable]
                                      + [f"(not decided) {r}" for r in reasons])
    if reg:
        return "fail", 1, reasons
    if err:
        return "error", 2, [f"error: {metric_line(m)}" for m in err]
    if inc:
        code = {"pass": 0, "fail": 1, "exit3": 3}[o.inconclusive]
        return "inconclusive", code, [f"inconclusive: {metric_line(m)}" for m in inc]
    if imp:
        return "improvement", 0, [f"improvement: {metric_line(m)}" for m in imp]
    return "pass", 0, [f"pass: {metric_line(m)}" for m in g]
