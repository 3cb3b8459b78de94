"""The series of past results of a baseline name, and the changes in it: a step change at one commit, or a
slow drift over many commits that no single comparison would flag.

``DIR/<gpu-model-slug>/<NAME>.history.jsonl`` (next to the baseline, gpudoctor.gate.baselines): one JSON
line per recorded run: ``{"recorded_at", "label", "commit", "n", "median", "metric", "samples"}`` with the
run's per-step samples of the metric (GPU time per step by default).

Detection over the series of per-run medians ``m_1..m_n`` (oldest first):

* **change points** by binary segmentation: the split that maximizes the relative difference of the two
  segments' medians weighted by sqrt(k (n - k) / n) (so that a short segment at an edge does not win), kept when that difference exceeds the tolerance and the exact Mann-Whitney test of the
  two segments' medians gives p < alpha (at least ``MIN_SEGMENT`` runs per segment); then each segment is
  searched again;
* **drift**: the Theil-Sen slope of the medians against the run index with its confidence interval; a drift
  is reported when the interval excludes 0 and the fitted change over the series exceeds the tolerance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from gpudoctor.errors import GpudoctorError, require
from gpudoctor.gate import stats
from gpudoctor.gate.baselines import baseline_dir, check_name, hardware_key
from gpudoctor.gate.run import RunData

MIN_SEGMENT = 3
MAX_CHANGE_POINTS = 5


def history_path(name: str, gpu_name: str, directory: str | Path | None = None) -> Path:
    return baseline_dir(directory) / hardware_key(gpu_name) / f"{check_name(name)}.history.jsonl"


def record(name: str, run: RunData, directory: str | Path | None = None, commit: str = "",
           metric: str = "gpu_time") -> Path:
    """Append one run's result to the series of NAME for its GPU model."""
    samples = run.samples.get(metric) or []
    if not samples:
        raise GpudoctorError(f"{run.label}: no {metric} samples to record")
    path = history_path(name, run.gpu_name, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "label": run.label,
             "commit": commit, "metric": metric, "n": len(samples), "median": float(np.median(samples)),
             "samples": [float(x) for x in samples]}
    with open(path, "a", encoding="utf-8") as f:  # one line per run: a torn last line is skipped on read
        f.write(json.dumps(entry) + "\n")
    return path


def find(name: str, gpu: str = "", directory: str | Path | None = None) -> Path:
    """The history file of baseline NAME: for GPU model ``gpu``, or the only one recorded."""
    root = baseline_dir(directory)
    found = sorted(root.glob(f"*/{check_name(name)}.history.jsonl")) if root.is_dir() else []
    if gpu:
        found = [p for p in found if p.parent.name == hardware_key(gpu)]
    if not found:
        raise GpudoctorError(f"no history for {name!r} in {root} (record one: gpudoctor baseline record {name} RUN)")
    if len(found) > 1:
        raise GpudoctorError(f"{name!r} has histories for several GPU models "
                             f"({', '.join(p.parent.name for p in found)}): pick one with --gpu")
    return found[0]


def load(path: Path) -> tuple[list[dict], int]:
    """(entries oldest first, lines skipped as unreadable)."""
    entries, skipped = [], 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise GpudoctorError(f"{path}: cannot read the history: {e}") from None
    for line in lines:
        try:
            e = json.loads(line)
            float(e["median"])
            entries.append(e)
        except (ValueError, TypeError, KeyError):
            skipped += 1
    return entries, skipped


def _split(m: np.ndarray, lo: int, hi: int, tolerance: float, alpha: float, out: list) -> None:
    """Binary segmentation of m[lo:hi] (see the module docstring)."""
    seg = m[lo:hi]
    if len(seg) < 2 * MIN_SEGMENT or len(out) >= MAX_CHANGE_POINTS:
        return
    best, best_k, best_score = 0.0, None, 0.0
    n = len(seg)
    for k in range(MIN_SEGMENT, n - MIN_SEGMENT + 1):
        before, after = np.median(seg[:k]), np.median(seg[k:])
        change = after / before - 1 if before > 0 else 0.0
        score = abs(change) * np.sqrt(k * (n - k) / n)  # weighted like CUSUM: short edge segments count less
        if score > best_score:
            best, best_k, best_score = change, k, score
    if best_k is None or abs(best) <= tolerance:
        return
    p = stats.mann_whitney_p(seg[:best_k], seg[best_k:])
    if not p < alpha:
        return
    out.append({"index": lo + best_k, "change": float(best), "p_value": float(p),
                "median_before": float(np.median(seg[:best_k])), "median_after": float(np.median(seg[best_k:]))})
    _split(m, lo, lo + best_k, tolerance, alpha, out)
    _split(m, lo + best_k, hi, tolerance, alpha, out)


def drift(m: np.ndarray, tolerance: float, confidence: float = stats.DEFAULT_CONFIDENCE) -> dict | None:
    """Theil-Sen slope of the medians; the fitted change from the first run to the last, relative to the first."""
    if len(m) < 2 * MIN_SEGMENT:
        return None
    sp = require("scipy.stats", "stats")
    x = np.arange(len(m), dtype=float)
    slope, intercept, lo, hi = sp.theilslopes(m, x, alpha=confidence)
    start = intercept
    if start <= 0:
        return None
    total = slope * (len(m) - 1) / start
    return {"slope_per_run": float(slope / start), "slope_ci": [float(lo / start), float(hi / start)],
            "total_change": float(total), "runs": int(len(m)),
            "detected": bool((lo > 0 or hi < 0) and abs(total) > tolerance)}


def analyze(entries: list[dict], tolerance: float = stats.DEFAULT_TOLERANCE, alpha: float = stats.DEFAULT_ALPHA) -> dict:
    """Change points and drift of a series of recorded results (oldest first)."""
    m = np.asarray([float(e["median"]) for e in entries], dtype=float)
    points: list[dict] = []
    _split(m, 0, len(m), tolerance, alpha, points)
    points.sort(key=lambda p: p["index"])
    for p in points:
        e = entries[p["index"]]
        p["label"], p["commit"] = e.get("label", ""), e.get("commit", "")
    return {"runs": int(len(m)), "tolerance": tolerance, "alpha": alpha, "medians": [float(x) for x in m],
            "change_points": points, "drift": drift(m, tolerance)}
