"""The gate's error rates on real steps: false alarms on identical-program pairs and the smallest regression
it detects at 3, 5, 10 and 30 steps per side. Results go in bench/RESULTS.md.

    python bench/bench_gate.py [--trials 1000] [--json OUT]

Samples: the steady-step GPU time per step (``gpu_time``) of the real fixtures, read as the gate reads them.

False alarms: for each identical-program pair, ``trials`` times, draw n steps from side A and n from side B
(without replacement when the run has n steps, else with replacement) and run the gate's decision
(gpudoctor.gate.stats.decide, default options: 3% tolerance). A "fail" is a false alarm. Pairs:
``gate_base_a`` vs ``gate_base_b`` (two processes running the same program) both ways, and each of
``gate_base_a``, ``gate_base_b``, ``gate_slow`` against itself split in two halves (first vs second half of
the steady steps). When fixtures/gate_runs/ holds recorded runs (scripts/record-gate.sh) their gate blocks
are paired too (every ordered pair of base_1..base_N).

Detection: baseline n steps drawn from ``gate_base_a``, candidate n steps drawn from ``gate_base_b`` times
(1 + d); the smallest d (0.5% grid) at which at least 95% of the trials fail.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpudoctor.gate import stats  # noqa: E402
from gpudoctor.gate.inputs import load_run  # noqa: E402

SIZES = (3, 5, 10, 30)


def draw(rng, x: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(x, n, replace=n > len(x))


def steps(name: str) -> np.ndarray:
    return np.asarray(load_run(str(ROOT / "fixtures" / "nsys" / f"{name}.nsys.sqlite")).samples["gpu_time"])


def pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    s = {n: steps(n) for n in ("gate_base_a", "gate_base_b", "gate_slow")}
    out = {"gate_base_a vs gate_base_b": (s["gate_base_a"], s["gate_base_b"]),
           "gate_base_b vs gate_base_a": (s["gate_base_b"], s["gate_base_a"])}
    for n, x in s.items():
        h = len(x) // 2
        out[f"{n} first vs second half"] = (x[:h], x[h:])
    rec = ROOT / "fixtures" / "gate_runs"
    runs = {p.parent.name: np.asarray(load_run(str(p)).samples["gpu_time"])
            for p in sorted(rec.glob("base_*/analysis.json"))} if rec.is_dir() else {}
    for a, b in itertools.permutations(runs, 2):
        out[f"recorded {a} vs {b}"] = (runs[a], runs[b])
    return out


def false_alarms(trials: int, seed: int = 0, tolerance: float = stats.DEFAULT_TOLERANCE) -> dict:
    rng = np.random.default_rng(seed)
    res = {}
    for name, (a, b) in pairs().items():
        row = {}
        for n in SIZES:
            counts = {"pass": 0, "regression": 0, "improvement": 0, "inconclusive": 0, "error": 0}
            for _ in range(trials):
                counts[stats.decide(draw(rng, a, n), draw(rng, b, n), tolerance).decision] += 1
            row[n] = {k: v / trials for k, v in counts.items()}
        res[name] = row
    return res


def detection(trials: int, seed: int = 1, tolerance: float = stats.DEFAULT_TOLERANCE) -> dict:
    rng = np.random.default_rng(seed)
    a, b = steps("gate_base_a"), steps("gate_base_b")
    out = {}
    for n in SIZES:
        found = None
        for d in np.arange(0.0, 0.305, 0.005):
            hits = sum(stats.decide(draw(rng, a, n), draw(rng, b, n) * (1 + d), tolerance).decision == stats.REGRESSION
                       for _ in range(trials))
            if hits / trials >= 0.95:
                found = float(round(d, 3))
                break
        out[n] = found
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--tolerance", type=float, default=stats.DEFAULT_TOLERANCE)
    ap.add_argument("--json")
    args = ap.parse_args()
    t = time.monotonic()
    fa = false_alarms(args.trials, tolerance=args.tolerance)
    det = detection(max(args.trials // 5, 100), tolerance=args.tolerance)
    doc = {"false_alarms": fa, "smallest_detected": det, "trials": args.trials, "tolerance": args.tolerance,
           "seconds": round(time.monotonic() - t, 1)}
    for name, row in fa.items():
        print(f"{name:<38} " + "  ".join(f"n={n}: fail {r['regression']:.1%} pass {r['pass']:.1%} inc {r['inconclusive']:.1%}"
                                          for n, r in row.items()))
    print("smallest regression detected in >= 95% of trials: " + ", ".join(f"n={n}: {d}" for n, d in det.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
