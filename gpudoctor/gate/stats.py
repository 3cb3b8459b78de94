"""The statistics of the gate: is the candidate's step distribution worse than the baseline's?

Per metric the gate has two samples (one value per steady-state step, pooled over runs) and decides:

* ``inconclusive`` when either side has fewer than ``min_samples`` values;
* ``regression`` when the median got worse by more than the tolerance, the Mann-Whitney U test says the
  two distributions differ (two-sided p < alpha) and the whole bootstrap confidence interval of the
  median ratio lies on the worse side of 1;
* ``improvement``: the mirror image;
* ``pass`` when the change of the median is within the tolerance and the confidence interval is
  precise enough to say so: it fits inside +-tolerance, or it is no wider than the tolerance;
* ``inconclusive`` otherwise (the interval is wider than the tolerance, or a change larger than the
  tolerance is not significant).

The bootstrap resamples both sides independently (percentile interval of median(candidate) /
median(baseline)) with a seeded generator, so the same inputs always give the same answer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from gpudoctor.errors import require

PASS, REGRESSION, IMPROVEMENT, INCONCLUSIVE, ERROR = "pass", "regression", "improvement", "inconclusive", "error"

DEFAULT_TOLERANCE = 0.03
DEFAULT_MIN_SAMPLES = 5
DEFAULT_ALPHA = 0.05
DEFAULT_CONFIDENCE = 0.95
DEFAULT_BOOTSTRAP = 2000
DEFAULT_SEED = 0
CALIBRATE_FACTOR = 3.0
CALIBRATE_FLOOR = 0.01


@dataclass
class Decision:
    decision: str  # pass | regression | improvement | inconclusive | error
    reason: str
    n_baseline: int
    n_candidate: int
    median_baseline: float | None = None
    median_candidate: float | None = None
    ratio: float | None = None  # median(candidate) / median(baseline)
    change: float | None = None  # ratio - 1 (signed, in the metric's own direction)
    worse: float | None = None  # change made positive-is-worse (higher_is_better flips the sign)
    ci_low: float | None = None  # bootstrap CI of the ratio
    ci_high: float | None = None
    p_value: float | None = None
    tolerance: float = DEFAULT_TOLERANCE
    higher_is_better: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = None if not math.isfinite(v) else float(round(v, 9))
        return d


def mann_whitney_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Mann-Whitney U p-value (scipy's exact/asymptotic choice, tie-corrected)."""
    stats = require("scipy.stats", "stats")
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    if np.all(a == a[0]) and np.all(b == a[0]):
        return 1.0  # identical constants: no evidence of a difference (scipy would warn and give nan)
    return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)


def _boot_medians(x: np.ndarray, n_boot: int, rng: np.random.Generator, chunk_cells: int = 4_000_000) -> np.ndarray:
    n = len(x)
    out = np.empty(n_boot)
    rows = max(1, chunk_cells // max(n, 1))
    for i in range(0, n_boot, rows):
        m = min(rows, n_boot - i)
        idx = rng.integers(0, n, size=(m, n))
        out[i:i + m] = np.median(x[idx], axis=1)
    return out


def bootstrap_ratio_ci(baseline, candidate, n_boot: int = DEFAULT_BOOTSTRAP, confidence: float = DEFAULT_CONFIDENCE,
                       seed: int = DEFAULT_SEED) -> tuple[float, float]:
    """Percentile bootstrap CI of median(candidate) / median(baseline), seeded."""
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(candidate, dtype=float)
    rng = np.random.default_rng(seed)
    ma = _boot_medians(a, n_boot, rng)
    mb = _boot_medians(b, n_boot, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = mb / ma
    r = r[np.isfinite(r)]
    if len(r) == 0:
        return float("nan"), float("nan")
    q = (1 - confidence) / 2
    lo, hi = np.quantile(r, [q, 1 - q])
    return float(lo), float(hi)


def decide(baseline, candidate, tolerance: float = DEFAULT_TOLERANCE, *, higher_is_better: bool = False,
           min_samples: int = DEFAULT_MIN_SAMPLES, alpha: float = DEFAULT_ALPHA,
           confidence: float = DEFAULT_CONFIDENCE, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED,
           unit_label: str = "steps") -> Decision:
    """Compare two samples of one metric. See the module docstring for the rules."""
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(candidate, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    d = Decision(INCONCLUSIVE, "", len(a), len(b), tolerance=tolerance, higher_is_better=higher_is_better)
    if len(a) == 0 or len(b) == 0:
        side = "baseline" if len(a) == 0 else "candidate"
        d.decision, d.reason = ERROR, f"no values on the {side} side"
        return d
    d.median_baseline, d.median_candidate = float(np.median(a)), float(np.median(b))
    if d.median_baseline > 0:
        d.ratio = d.median_candidate / d.median_baseline
        d.change = d.ratio - 1
        d.worse = -d.change if higher_is_better else d.change
    if len(a) < min_samples or len(b) < min_samples:
        d.reason = (f"too few {unit_label}: {len(a)} baseline, {len(b)} candidate (need at least {min_samples} "
                    "per side)")
        return d
    if d.ratio is None:
        d.decision, d.reason = ERROR, "baseline median is not positive; a ratio means nothing"
        return d
    d.p_value = mann_whitney_p(a, b)
    d.ci_low, d.ci_high = bootstrap_ratio_ci(a, b, n_boot, confidence, seed)
    # The CI of "worse" (positive = worse), whichever way the metric points.
    if higher_is_better:
        w_lo, w_hi = 1 - d.ci_high, 1 - d.ci_low
    else:
        w_lo, w_hi = d.ci_low - 1, d.ci_high - 1
    d.extra = {"worse_ci": [w_lo, w_hi], "alpha": alpha, "confidence": confidence, "bootstrap": n_boot, "seed": seed}
    width = w_hi - w_lo
    significant = d.p_value is not None and d.p_value < alpha
    pct = f"{d.change * 100:+.1f}%"
    ci = f"{confidence:.0%} CI of the ratio [{d.ci_low:.3f}, {d.ci_high:.3f}]"
    if d.worse > tolerance and significant and w_lo > 0:
        d.decision = REGRESSION
        d.reason = f"median {pct}, worse than the {tolerance:.1%} tolerance (p={d.p_value:.2g}, {ci})"
    elif d.worse < -tolerance and significant and w_hi < 0:
        d.decision = IMPROVEMENT
        d.reason = f"median {pct}, better by more than the {tolerance:.1%} tolerance (p={d.p_value:.2g}, {ci})"
    elif abs(d.worse) <= tolerance and ((w_lo >= -tolerance and w_hi <= tolerance) or width <= tolerance):
        d.decision = PASS
        d.reason = f"median {pct}, within the {tolerance:.1%} tolerance ({ci})"
    else:
        d.decision = INCONCLUSIVE
        if abs(d.worse) > tolerance and not significant:
            d.reason = (f"median {pct} but not significant (p={d.p_value:.2g} >= {alpha}); "
                        f"{ci} is wider than the tolerance allows")
        else:
            d.reason = (f"median {pct}; the {ci} spans {width:.1%}, too wide to tell against the "
                        f"{tolerance:.1%} tolerance: record more steps or runs")
    return d


def calibrate(run_medians: list[float], factor: float = CALIBRATE_FACTOR, floor: float = CALIBRATE_FLOOR) -> dict:
    """A tolerance from repeated runs of the same program: ``factor`` x the coefficient of variation
    (sample standard deviation / mean) of the per-run medians, at least ``floor``, rounded up to 0.1%."""
    m = np.asarray([x for x in run_medians if x is not None and math.isfinite(x)], dtype=float)
    if len(m) < 2:
        return {"runs": int(len(m)), "spread": None, "tolerance": None,
                "reason": "need at least 2 runs with this metric (3 or more recommended)"}
    mean = float(m.mean())
    cv = float(m.std(ddof=1) / mean) if mean else float("nan")
    rel_range = float((m.max() - m.min()) / mean) if mean else float("nan")
    tol = max(factor * cv, floor) if math.isfinite(cv) else None
    if tol is not None:
        tol = math.ceil(tol * 1000 - 1e-9) / 1000
    return {"runs": int(len(m)), "medians": [float(x) for x in m], "spread": cv, "range": rel_range,
            "tolerance": tol, "factor": factor, "floor": floor}
