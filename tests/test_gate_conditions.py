"""GPU conditions (gpudoctor.collect.gpustate, gpudoctor.gate.conditions): runs recorded by
scripts/record-gate.sh on a GPU machine (fixtures/gate_runs/: base_1..base_N of one program, `loaded` while a
second process ran matmuls on the same GPU). Without those recordings the tests that need them are skipped;
the ones on the committed nsys fixtures always run."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from gpudoctor.gate import conditions
from gpudoctor.gate.compare import GateOptions, compare
from gpudoctor.gate.inputs import load_run

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "fixtures" / "gate_runs"
NSYS = ROOT / "fixtures" / "nsys"
needs_recordings = pytest.mark.skipif(
    not (RUNS / "loaded" / "manifest.json").is_file(),
    reason="fixtures/gate_runs/ not recorded yet: bash scripts/record-gate.sh OUT on a GPU machine, then unpack "
           "OUT/gate_runs.tgz into fixtures/gate_runs/")


def gpu_time(r):
    return next(m for m in r.metrics if m.spec.name == "gpu_time").decision


@pytest.fixture(scope="module")
def recorded():
    return {p.name: load_run(str(p / "analysis.json")) for p in sorted(RUNS.iterdir()) if (p / "analysis.json").is_file()}


def test_nsys_fixtures_have_no_conditions_and_say_so():
    a, b = load_run(str(NSYS / "gate_base_a.nsys.sqlite")), load_run(str(NSYS / "gate_base_b.nsys.sqlite"))
    assert conditions.devices(a) == [] and conditions.check_conditions([a], [b])[0] == []
    r = compare([a], [b])
    assert r.exit_code == 0 and any("not checked" in n for n in r.notes)


@needs_recordings
def test_recorded_runs_carry_gpu_state(recorded):
    for name, run in recorded.items():
        devs = conditions.devices(run)
        assert devs, name
        d = devs[0]
        assert d["name"] == run.gpu_name and d["busy_samples"] > 0
        assert d["sm_clock_mhz"]["median"] > 500 and d["mem_clock_mhz"]["median"] > 500
        assert d["power_limit_w"] > 100


@needs_recordings
def test_same_program_runs_are_comparable_and_pass(recorded):
    bases = [r for n, r in recorded.items() if n.startswith("base_")]
    assert len(bases) >= 2
    r = compare([bases[0]], [bases[1]])
    assert r.not_comparable == [] and r.status == "pass", r.reasons


@needs_recordings
def test_candidate_under_load_is_inconclusive(recorded):
    r = compare([recorded["base_1"]], [recorded["loaded"]])
    assert r.status == "inconclusive" and r.exit_code == 3
    assert any("other process" in x for x in r.not_comparable), r.not_comparable
    # Without the check the same comparison is a false alarm: +18% GPU time per step, all from the load.
    forced = compare([recorded["base_1"]], [recorded["loaded"]], GateOptions(allow_mismatch=True))
    assert forced.exit_code == 1 and gpu_time(forced).ratio > 1.1 and len(forced.mismatches) == 3


@needs_recordings
def test_edited_manifest_clocks_and_throttling(recorded, tmp_path):
    # A recorded run directory whose manifest says the candidate ran with lower clocks, throttled and with a
    # lower power cap: the same steps are no longer comparable.
    src = RUNS / "base_2"
    dst = tmp_path / "base_2"
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    d = m["gpu_state"]["devices"][0]
    d["sm_clock_mhz"] = {k: v * 0.85 for k, v in d["sm_clock_mhz"].items()}
    d["throttle"] = dict(d.get("throttle") or {}, hw_thermal_slowdown=0.4)
    d["power_limit_w"] = d["power_limit_w"] * 0.8
    (dst / "manifest.json").write_text(json.dumps(m))
    cand = load_run(str(dst / "analysis.json"))
    r = compare([recorded["base_1"]], [cand])
    text = " | ".join(r.not_comparable)
    assert r.exit_code == 3 and "SM clock" in text and "hw_thermal_slowdown" in text and "power cap" in text
    base = copy.deepcopy(recorded["base_1"])
    assert conditions.pair_problems(base, recorded["base_2"]) == []


@needs_recordings
def test_gpu_state_recomputed_from_the_recorded_samples():
    from gpudoctor.collect import gpustate

    m = json.loads((RUNS / "base_1" / "manifest.json").read_text())
    samples = gpustate.read_csv(RUNS / "base_1" / "raw" / "nvml.csv.gz")
    dev = m["gpu_state"]["devices"][0]
    again = gpustate.summarize(samples, [], [], {})["devices"][0]
    assert again["busy_samples"] == dev["busy_samples"]
    assert again["sm_clock_mhz"] == dev["sm_clock_mhz"] and again["throttle"] == dev["throttle"]


def test_run_db_keeps_the_manifests_gpu_state(tmp_path):
    # The manifest's gpu_state goes into the trace's meta, hence run.db (here: from a recorded manifest when
    # there is one, else the committed nsys fixture's own GPU as a one-field state).
    from gpudoctor.readers.inputs import read_run_dir

    run = tmp_path / "run"
    (run / "raw").mkdir(parents=True)
    shutil.copy(NSYS / "gate_base_a.nsys.sqlite", run / "raw" / "trace.sqlite")
    rec = RUNS / "base_1" / "manifest.json"
    state = (json.loads(rec.read_text())["gpu_state"] if rec.is_file()
             else {"driver_version": "580.159.04", "devices": [{"device_id": 0, "name": "NVIDIA H100 80GB HBM3"}]})
    (run / "manifest.json").write_text(json.dumps({"reports": [{"path": "raw/trace.sqlite", "format": "nsys_sqlite",
                                                                "rank": 0}], "gpu_state": state}))
    assert read_run_dir(run).meta["gpu_state"] == state
    assert load_run(str(run)).env["gpu_state"] == state
