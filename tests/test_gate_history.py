"""The result history of a baseline name (`gpudoctor baseline record/history`): change points and slow drift
found in series built from the real per-step samples of the gate fixtures (fixtures/README.md)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from gpudoctor.cli.main import main
from gpudoctor.gate import history
from gpudoctor.gate.inputs import load_run

NSYS = Path(__file__).resolve().parent.parent / "fixtures" / "nsys"


@pytest.fixture(scope="module")
def steps() -> dict[str, np.ndarray]:
    runs = {n: load_run(str(NSYS / f"{n}.nsys.sqlite")) for n in ("gate_base_a", "gate_base_b", "gate_slow")}
    base = np.r_[runs["gate_base_a"].samples["gpu_time"], runs["gate_base_b"].samples["gpu_time"]]
    return {"base": base, "slow": np.asarray(runs["gate_slow"].samples["gpu_time"]), "run": runs["gate_base_a"]}


def series(steps, scales, source="base", seed=0, n=10):
    """One recorded run per scale: n steps drawn (with replacement) from the real steps, times the scale."""
    rng = np.random.default_rng(seed)
    src = steps[source] if isinstance(source, str) else source
    return [{"median": float(np.median(rng.choice(src, n) * s)), "label": f"run{i}"} for i, s in enumerate(scales)]


def test_flat_series_has_no_change(steps):
    r = history.analyze(series(steps, [1.0] * 20))
    assert r["change_points"] == [] and not r["drift"]["detected"]
    assert abs(r["drift"]["total_change"]) < 0.01


def test_slow_drift_is_caught(steps):
    # +0.5% per commit: no neighbouring pair differs by more than the 3% tolerance, 20 commits add up to ~10%.
    entries = series(steps, [1 + 0.005 * i for i in range(20)])
    r = history.analyze(entries)
    assert r["drift"]["detected"] and 0.07 < r["drift"]["total_change"] < 0.12
    assert r["drift"]["slope_ci"][0] > 0


def test_step_change_is_located(steps):
    entries = series(steps, [1.0] * 10) + series(steps, [1.0] * 10, source="slow", seed=1)
    r = history.analyze(entries)
    assert [p["index"] for p in r["change_points"]] == [10]
    assert 0.07 < r["change_points"][0]["change"] < 0.12  # gate_slow: +9%


def test_record_and_history_cli(steps, tmp_path, capsys):
    rng = np.random.default_rng(2)
    for i in range(12):
        run = copy.copy(steps["run"])
        run.samples = {"gpu_time": list(rng.choice(steps["base"], 10) * (1 + 0.01 * i))}
        history.record("main", run, tmp_path, commit=f"c{i:02d}")
    path = next(tmp_path.glob("*/main.history.jsonl"))
    assert path.parent.name == "nvidia-h100-80gb-hbm3"
    with open(path, "a") as f:
        f.write('{"torn line\n')
    assert main(["baseline", "history", "main", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "drift: +" in out and "1 unreadable line" in out
    assert main(["baseline", "history", "nope", "--dir", str(tmp_path)]) == 2
