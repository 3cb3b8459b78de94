"""Did the baseline and the candidate run in comparable GPU conditions?

Each run's ``env["gpu_state"]`` (gpudoctor.collect.gpustate, recorded by ``gpudoctor profile`` from NVML)
says what the GPU did during the capture. A difference below is a reason to call the comparison
inconclusive rather than a regression: the step times moved for a reason other than the code.

* power cap differs by more than ``POWER_CAP_TOLERANCE``;
* median SM clock while busy differs by more than ``SM_CLOCK_TOLERANCE``, memory clock by more than
  ``MEM_CLOCK_TOLERANCE``;
* a slowdown throttle reason (hardware slowdown, thermal, power brake) was active in more than
  ``THROTTLE_FRACTION`` of the busy samples of one run and not the other; the software power cap in
  ``POWER_CAP_FRACTION`` more of them;
* other processes used the GPU during the capture (processes /proc does not show: a different number of them
  in the two runs);
* new uncorrectable ECC errors, pending or failed row remapping.

A run without ``gpu_state`` (a bare trace, an old run directory) is not checked; the result says so.
"""

from __future__ import annotations

from gpudoctor.gate.run import RunData

POWER_CAP_TOLERANCE = 0.01
SM_CLOCK_TOLERANCE = 0.05
MEM_CLOCK_TOLERANCE = 0.01
THROTTLE_FRACTION = 0.05
POWER_CAP_FRACTION = 0.25
SLOWDOWNS = ("hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")


def devices(run: RunData) -> list[dict]:
    state = run.env.get("gpu_state")
    if not isinstance(state, dict):
        return []
    return [d for d in state.get("devices") or [] if isinstance(d, dict)]


def _rel(a, b) -> float | None:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not a:
        return None
    return b / a - 1


def _clock(d: dict, key: str):
    v = d.get(key)
    return v.get("median") if isinstance(v, dict) else None


def run_problems(run: RunData) -> list[str]:
    """What makes one run's timing untrustworthy by itself: other processes, memory errors."""
    out = []
    for d in devices(run):
        gpu = f"{run.label} GPU {d.get('device_id', 0)}"
        others = [p for p in d.get("other_processes") or [] if p.get("known", True)]
        if others:
            pids = ", ".join(f"pid {p.get('pid')} ({int(p.get('used_memory_bytes') or 0) >> 20} MiB)" for p in others[:3])
            out.append(f"{gpu}: {len(others)} other process(es) used the GPU during the capture: {pids}")
        if (d.get("ecc_uncorrected_new") or 0) > 0:
            out.append(f"{gpu}: {d['ecc_uncorrected_new']} new uncorrectable ECC error(s) during the capture")
        rr = d.get("remapped_rows") or {}
        if rr.get("pending") or rr.get("failed") or (rr.get("uncorrectable_new") or 0) > 0:
            out.append(f"{gpu}: row remapping pending or failed (a reset is due; timing is not trustworthy)")
    return out


def pair_problems(base: RunData, cand: RunData) -> list[str]:
    """Differences of conditions between a baseline run and a candidate run, GPU by GPU."""
    out = []
    for db, dc in zip(devices(base), devices(cand)):
        where = f"GPU {dc.get('device_id', 0)}"
        r = _rel(db.get("power_limit_w"), dc.get("power_limit_w"))
        if r is not None and abs(r) > POWER_CAP_TOLERANCE:
            out.append(f"{where}: power cap {db['power_limit_w']:g} W ({base.label}) vs {dc['power_limit_w']:g} W "
                       f"({cand.label})")
        for key, tol, what in (("sm_clock_mhz", SM_CLOCK_TOLERANCE, "SM clock"),
                               ("mem_clock_mhz", MEM_CLOCK_TOLERANCE, "memory clock")):
            r = _rel(_clock(db, key), _clock(dc, key))
            if r is not None and abs(r) > tol:
                out.append(f"{where}: median {what} while busy {_clock(db, key):g} MHz ({base.label}) vs "
                           f"{_clock(dc, key):g} MHz ({cand.label}), {r:+.1%}")
        tb, tc = db.get("throttle") or {}, dc.get("throttle") or {}
        for reason in SLOWDOWNS:
            fb, fc = float(tb.get(reason, 0)), float(tc.get(reason, 0))
            if abs(fc - fb) > THROTTLE_FRACTION:
                out.append(f"{where}: throttle reason {reason} in {fb:.0%} of busy samples ({base.label}) vs "
                           f"{fc:.0%} ({cand.label})")
        # pids /proc does not show cannot be told apart from the program's own (host pids in a container):
        # only more of them in one run than in the other counts.
        ub, uc = (sum(not p.get("known", True) for p in d.get("other_processes") or []) for d in (db, dc))
        if ub != uc:
            out.append(f"{where}: {ub} ({base.label}) vs {uc} ({cand.label}) processes of other containers on the GPU")
        fb, fc = float(tb.get("sw_power_cap", 0)), float(tc.get("sw_power_cap", 0))
        if abs(fc - fb) > POWER_CAP_FRACTION:
            out.append(f"{where}: clocks held by the power cap in {fb:.0%} of busy samples ({base.label}) vs {fc:.0%} "
                       f"({cand.label})")
    return out


def check_conditions(baselines: list[RunData], candidates: list[RunData]) -> tuple[list[str], list[str]]:
    """(reasons the runs are not comparable, notes). The first baseline run is the reference."""
    problems: list[str] = []
    notes: list[str] = []
    missing = [r.label for r in baselines + candidates if not devices(r)]
    if missing:
        notes.append("GPU conditions (clocks, power cap, throttling, other processes) not recorded for "
                     + ", ".join(missing[:4]) + (" and more" if len(missing) > 4 else "")
                     + ": not checked (record runs with gpudoctor profile)")
    for r in baselines + candidates:
        problems += run_problems(r)
    ref = baselines[0]
    for r in baselines[1:] + candidates:
        problems += pair_problems(ref, r)
    return problems, notes
