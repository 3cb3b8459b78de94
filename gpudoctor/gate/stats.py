"""The statistics of the gate: is the candidate's step distribution worse than the baseline's?

Per metric the gate has two samples (one value per steady-state step, pooled over runs). ``worse`` is the
relative change of the median in the bad direction. Rules, in order; the first that applies decides and is
named in the result (``Decision.rule``):

``separation``  every candidate value is worse than every baseline value (at least ``SEPARATION_MIN`` per
                side) and the gap between the closest two is more than ``SEPARATION_FACTOR`` x the tolerance:
                regression (mirror: improvement), however few the steps. The exact one-sided Mann-Whitney
                p-value of complete separation, 1 / C(m + n, m), is reported with it.
``test``        (at least ``min_samples`` per side) a change beyond the tolerance with Mann-Whitney U
                p < alpha (exact for small samples) whose whole confidence interval of the ratio lies on the
                worse side of 1: regression (mirror: improvement). A change within the tolerance whose
                interval is precise (inside +-tolerance, or no wider than the tolerance): pass.
``range``       every candidate value is within the tolerance of every baseline value (all pairwise ratios
                inside 1 +- tolerance; their range holds the shift with confidence 1 - 2 / C(m + n, m)): pass.
``noise``       the medians differ by less than the tolerance and by less than the baseline's own
                step-to-step noise (1.4826 x the median absolute deviation): pass.
``too_few`` / ``undecided``  otherwise: inconclusive, with the reason.

The interval of the ratio: for samples up to ``EXACT_PAIRS`` pairs, the distribution-free interval of the
Hodges-Lehmann shift of log values (order statistics of the pairwise differences at the exact Mann-Whitney
critical value); larger samples use a seeded percentile bootstrap of median(candidate) / median(baseline).
Both are deterministic: the same inputs give the same answer on every machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gpudoctor.errors import require

if TYPE_CHECKING:
    import numpy.typing as npt

PASS, REGRESSION, IMPROVEMENT, INCONCLUSIVE, ERROR = "pass", "regression", "improvement", "inconclusive", "error"

DEFAULT_TOLERANCE = 0.03
DEFAULT_MIN_SAMPLES = 5
DEFAULT_ALPHA = 0.05
DEFAULT_CONFIDENCE = 0.95
DEFAULT_BOOTSTRAP = 2000
DEFAULT_SEED = 0
CALIBRATE_FACTOR = 3.0
CALIBRATE_FLOOR = 0.01
SEPARATION_MIN = 3  # fewest values per side for the separation rule
SEPARATION_FACTOR = 2.0  # the gap must exceed this many tolerances
EXACT_PAIRS = 40_000  # pairwise differences for the exact interval; beyond: bootstrap
EXACT_NULL_CELLS = 2_500  # m x n up to which the Mann-Whitney null distribution is computed exactly
MAD_TO_SD = 1.4826
# Decision.rule -> how the outputs name it
RULE_WORDS = {"separation": "complete separation", "test": "Mann-Whitney test and interval",
              "range": "pairwise range within tolerance", "noise": "baseline noise"}


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
    ci_low: float | None = None  # confidence interval of the ratio
    ci_high: float | None = None
    p_value: float | None = None  # two-sided Mann-Whitney U
    tolerance: float = DEFAULT_TOLERANCE
    higher_is_better: bool = False
    rule: str = ""  # separation | test | range | noise | too_few | undecided | error
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = None if not math.isfinite(v) else float(round(v, 9))
        return d


def _mwu():
    return require("scipy.stats", "stats").mannwhitneyu


def mann_whitney_p(a: np.ndarray, b: np.ndarray, alternative: str = "two-sided") -> float:
    """Mann-Whitney U p-value: exact for small samples without ties (scipy's choice), else tie-corrected
    normal approximation. ``alternative`` 'greater' tests b > a."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    if np.all(a == a[0]) and np.all(b == a[0]):
        return 1.0  # identical constants: no evidence of a difference (scipy would warn and give nan)
    alt = {"two-sided": "two-sided", "greater": "less", "less": "greater"}[alternative]  # scipy: x=a vs y=b
    return float(_mwu()(a, b, alternative=alt).pvalue)


def u_null_counts(m: int, n: int) -> np.ndarray:
    """Number of orderings giving each Mann-Whitney U = 0..m*n under the null (no ties): the coefficients of
    the Gaussian binomial [m+n choose m], built as prod_i (1 - q^(n+i)) / (1 - q^i)."""
    m, n = min(m, n), max(m, n)
    size = m * n + 1
    poly = np.zeros(size + n + m + 1, dtype=object)  # exact integers: the tails are tiny next to the middle
    poly[0] = 1
    for i in range(1, m + 1):
        poly[n + i:] -= poly[: len(poly) - (n + i)].copy()  # times (1 - q^(n+i))
        for k in range(i, len(poly)):  # divided by (1 - q^i): running sum with stride i
            poly[k] += poly[k - i]
    return poly[:size]


def u_critical(m: int, n: int, tail: float) -> int:
    """The largest k with P(U < k) <= tail under the null (0 when even U = 0 is too likely)."""
    if m * n <= EXACT_NULL_CELLS:
        counts = u_null_counts(m, n)
        total = math.comb(m + n, m)
        cdf = np.array([int(c) / total for c in np.cumsum(counts)])
        return int(np.searchsorted(cdf, tail, side="right"))
    z = abs(float(require("scipy.stats", "stats").norm.ppf(tail)))
    k = m * n / 2 - z * math.sqrt(m * n * (m + n + 1) / 12)
    return max(int(math.floor(k)), 0)


def shift_ratio_ci(baseline: npt.ArrayLike, candidate: npt.ArrayLike,
                   confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float, float]:
    """(Hodges-Lehmann ratio estimate, low, high): the distribution-free interval of the multiplicative shift
    candidate / baseline, from the pairwise differences of log values. Infinite bounds when the samples are
    too small for the confidence asked."""
    la = np.log(np.asarray(baseline, dtype=float))
    lb = np.log(np.asarray(candidate, dtype=float))
    d = np.sort((lb[None, :] - la[:, None]).ravel())
    est = float(np.exp(np.median(d)))
    k = u_critical(len(la), len(lb), (1 - confidence) / 2)
    if k < 1:
        return est, 0.0, float("inf")
    return est, float(np.exp(d[k - 1])), float(np.exp(d[len(d) - k]))


def _boot_medians(x: np.ndarray, n_boot: int, rng: np.random.Generator, chunk_cells: int = 4_000_000) -> np.ndarray:
    n = len(x)
    out = np.empty(n_boot)
    rows = max(1, chunk_cells // max(n, 1))
    for i in range(0, n_boot, rows):
        m = min(rows, n_boot - i)
        idx = rng.integers(0, n, size=(m, n))
        out[i:i + m] = np.median(x[idx], axis=1)
    return out


def bootstrap_ratio_ci(baseline: npt.ArrayLike, candidate: npt.ArrayLike, n_boot: int = DEFAULT_BOOTSTRAP,
                       confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_SEED) -> tuple[float, float]:
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


def ratio_ci(a: np.ndarray, b: np.ndarray, confidence: float, n_boot: int, seed: int) -> tuple[float, float, str]:
    """The interval of the ratio and the method that gave it (see the module docstring)."""
    if len(a) * len(b) <= EXACT_PAIRS and np.all(a > 0) and np.all(b > 0):
        _, lo, hi = shift_ratio_ci(a, b, confidence)
        return lo, hi, "exact Hodges-Lehmann"
    lo, hi = bootstrap_ratio_ci(a, b, n_boot, confidence, seed)
    return lo, hi, f"bootstrap ({n_boot} resamples)"


def baseline_noise(a: np.ndarray) -> float:
    """The baseline's step-to-step noise as a fraction of its median (robust: 1.4826 x MAD / median)."""
    med = float(np.median(a))
    if med == 0:
        return float("inf")
    return MAD_TO_SD * float(np.median(np.abs(a - med))) / abs(med)


def _separation(a: np.ndarray, b: np.ndarray, higher_is_better: bool) -> float | None:
    """Relative gap by which every candidate value is worse than every baseline value (>0), or better (<0);
    None when the samples overlap."""
    lo_a, hi_a, lo_b, hi_b = a.min(), a.max(), b.min(), b.max()
    if hi_a <= 0:
        return None
    if lo_b > hi_a:
        gap = lo_b / hi_a - 1  # candidate above
    elif hi_b < lo_a:
        gap = hi_b / lo_a - 1  # candidate below (negative)
    else:
        return None
    return -gap if higher_is_better else gap


def decide(baseline: npt.ArrayLike, candidate: npt.ArrayLike, tolerance: float = DEFAULT_TOLERANCE, *,
           higher_is_better: bool = False,
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
        d.decision, d.reason, d.rule = ERROR, f"no values on the {side} side", "error"
        return d
    d.median_baseline, d.median_candidate = float(np.median(a)), float(np.median(b))
    if d.median_baseline <= 0:
        d.decision, d.reason, d.rule = ERROR, "baseline median is not positive; a ratio means nothing", "error"
        return d
    d.ratio = d.median_candidate / d.median_baseline
    d.change = d.ratio - 1
    d.worse = -d.change if higher_is_better else d.change
    if min(len(a), len(b)) < 2:
        d.rule = "too_few"
        d.reason = f"too few {unit_label}: {len(a)} baseline, {len(b)} candidate (need at least 2 per side)"
        return d
    d.p_value = mann_whitney_p(a, b)
    noise = baseline_noise(a)
    d.extra = {"alpha": alpha, "confidence": confidence, "baseline_noise": noise}
    lo, hi, method = ratio_ci(a, b, confidence, n_boot, seed)
    d.extra.update(ci_method=method, bootstrap=n_boot, seed=seed)
    if math.isfinite(lo) and math.isfinite(hi) and lo > 0:  # too few values give an unbounded interval
        d.ci_low, d.ci_high = lo, hi
    gap = _separation(a, b, higher_is_better)
    sep_needed = SEPARATION_FACTOR * tolerance
    if gap is not None and min(len(a), len(b)) >= SEPARATION_MIN and abs(gap) > sep_needed:
        p_one = 1.0 / math.comb(len(a) + len(b), len(b))
        d.extra.update(separation_gap=abs(gap), separation_p=p_one)
        d.decision, d.rule = (REGRESSION, "separation") if gap > 0 else (IMPROVEMENT, "separation")
        side = "worse" if gap > 0 else "better"
        d.reason = (f"complete separation: every candidate {unit_label[:-1] if unit_label.endswith('s') else unit_label} "
                    f"is {side} than every baseline one, by at least {abs(gap):.1%} (> {SEPARATION_FACTOR:g} x the "
                    f"{tolerance:.1%} tolerance; exact one-sided p={p_one:.2g})")
        return d
    if len(a) >= min_samples and len(b) >= min_samples:
        decided = _test_rule(d, a, b, tolerance, alpha, confidence, n_boot, seed)
        if decided:
            return d
    lo_r, hi_r = float(b.min() / a.max()), float(b.max() / a.min())
    if lo_r - 1 >= -tolerance and hi_r - 1 <= tolerance and min(len(a), len(b)) >= SEPARATION_MIN:
        conf = 1 - 2 / math.comb(len(a) + len(b), len(b))
        d.decision, d.rule = PASS, "range"
        d.extra.update(pairwise_ratio_range=[lo_r, hi_r], range_confidence=conf)
        d.reason = (f"every candidate value is within the {tolerance:.1%} tolerance of every baseline "
                    f"value (all pairwise ratios in [{lo_r:.3f}, {hi_r:.3f}], which holds the shift with "
                    f"{conf:.0%} confidence)")
        return d
    if abs(d.worse) <= tolerance and abs(d.change) <= noise and len(a) >= SEPARATION_MIN:
        d.decision, d.rule = PASS, "noise"
        d.reason = (f"within the {tolerance:.1%} tolerance and within the baseline's step-to-step "
                    f"noise ({noise:.1%})")
        return d
    if d.rule == "undecided":
        return d  # the test rule said why
    d.rule = "too_few"
    d.reason = (f"too few {unit_label} to decide: {len(a)} baseline, {len(b)} candidate (the test "
                f"needs {min_samples} per side; complete separation by more than {sep_needed:.1%} decides from "
                f"{SEPARATION_MIN})")
    return d


def _test_rule(d: Decision, a, b, tolerance, alpha, confidence, n_boot, seed) -> bool:
    """The significance-and-interval rule; True when it decided (d is filled in), else d says why not."""
    if d.ci_low is None:
        d.rule = "undecided"
        d.reason = (f"{len(a)} and {len(b)} values give no bounded {confidence:.0%} "
                    "interval: record more steps or runs")
        return False
    method = d.extra["ci_method"]
    if d.higher_is_better:
        w_lo, w_hi = 1 - d.ci_high, 1 - d.ci_low
    else:
        w_lo, w_hi = d.ci_low - 1, d.ci_high - 1
    d.extra["worse_ci"] = [w_lo, w_hi]
    width = w_hi - w_lo
    significant = d.p_value is not None and d.p_value < alpha
    ci = f"{confidence:.0%} CI of the ratio [{d.ci_low:.3f}, {d.ci_high:.3f}], {method}"
    if d.worse > tolerance and significant and w_lo > 0:
        d.decision, d.rule = REGRESSION, "test"
        d.reason = f"worse than the {tolerance:.1%} tolerance (Mann-Whitney p={d.p_value:.2g}, {ci})"
    elif d.worse < -tolerance and significant and w_hi < 0:
        d.decision, d.rule = IMPROVEMENT, "test"
        d.reason = f"better by more than the {tolerance:.1%} tolerance (Mann-Whitney p={d.p_value:.2g}, {ci})"
    elif abs(d.worse) <= tolerance and ((w_lo >= -tolerance and w_hi <= tolerance) or width <= tolerance):
        d.decision, d.rule = PASS, "test"
        d.reason = f"within the {tolerance:.1%} tolerance ({ci})"
    else:
        d.decision, d.rule = INCONCLUSIVE, "undecided"
        if abs(d.worse) > tolerance and not significant:
            d.reason = f"beyond the {tolerance:.1%} tolerance but not significant (Mann-Whitney p={d.p_value:.2g} >= {alpha}; {ci})"
        else:
            d.reason = (f"the {ci} spans {width:.1%}, too wide to tell against the "
                        f"{tolerance:.1%} tolerance: record more steps or runs")
        return False
    return True


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
