"""The conditions a capture ran in, per GPU: what a fair before/after comparison needs to know.

``summarize(samples, start, end, processes, driver)`` turns the NVML samples of a capture (the sampler's CSV
as a DataFrame) and the snapshots read at its start and end into a small JSON document that goes into the
run's manifest (``gpu_state``) and run.db (``meta.gpu_state``):

    {"driver_version": "...", "devices": [{
        "device_id", "name", "uuid", "power_limit_w",
        "busy_samples",                         # samples with the GPU busy (gpu_util_pct > 0)
        "sm_clock_mhz": {"median", "min", "max"},   # while busy
        "mem_clock_mhz": {"median", "min", "max"},  # while busy
        "power_w": {"median", "max"}, "temp_c": {"median", "max"},
        "throttle": {REASON: fraction of busy samples with it},   # GPU idle and clock settings left out
        "ecc_uncorrected_new", "ecc_corrected_new",            # volatile ECC counts, end - start
        "remapped_rows": {"uncorrectable_new", "pending", "failed"},
        "other_processes": [{"pid", "used_memory_bytes", "known": true|false}]}]}

``other_processes``: processes on the GPU during the capture that are not gpudoctor or its descendants
(looked up while they run); ``known`` is false for a pid this machine's /proc does not show (NVML gives host
pids: a process of another container, or, in a container whose pids differ from the host's, any process).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# nvmlClocksEventReason bits. Idle and the two clock settings say nothing about the run's speed.
THROTTLE_BITS = {
    0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
}
IGNORED_BITS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x100: "display_clock_setting"}
_COLUMNS = ("gpu_util_pct", "sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c", "throttle_reasons")


def read_csv(path: str | Path) -> pd.DataFrame:
    """The sampler's CSV with the columns this module uses (missing ones empty)."""
    df = pd.read_csv(path, on_bad_lines="skip")
    for c in ("device_id", *_COLUMNS):
        if c not in df.columns:
            df[c] = np.nan
    return df.dropna(subset=["device_id"])


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesized command name


def process_owner(pid: int, own_pid: int) -> str:
    """'own' for ``own_pid`` and its descendants, 'other' for another process this machine's /proc shows,
    'unknown' for a pid it does not show (NVML reports host pids; a process of another container)."""
    if not Path(f"/proc/{pid}").exists():
        return "unknown"
    chain, p = [], pid
    while p and p not in chain:
        if p == own_pid:
            return "own"
        chain.append(p)
        p = _parent(p)
    return "other"


def other_processes(pids: dict[int, int], owners: dict[int, str]) -> list[dict]:
    """The processes that are not gpudoctor's or its program's, each with the most GPU memory it held."""
    return [{"pid": pid, "used_memory_bytes": int(mem), "known": owners.get(pid) == "other"}
            for pid, mem in sorted(pids.items()) if owners.get(pid, "unknown") != "own"]


def _stats(x: pd.Series, keys=("median", "min", "max")) -> dict | None:
    x = pd.to_numeric(x, errors="coerce").dropna()
    if x.empty:
        return None
    v = {"median": float(x.median()), "min": float(x.min()), "max": float(x.max())}
    return {k: round(v[k], 1) for k in keys}


def _throttle(masks: pd.Series) -> dict:
    m = pd.to_numeric(masks, errors="coerce").dropna().astype("int64").to_numpy()
    if len(m) == 0:
        return {}
    return {name: round(float(np.mean((m & bit) != 0)), 3) for bit, name in THROTTLE_BITS.items() if np.any(m & bit)}


def summarize(samples: pd.DataFrame, start: list[dict], end: list[dict], processes: dict[int, list[dict]],
              driver_version: str = "") -> dict:
    """See the module docstring."""
    first = {s.get("device_id"): s for s in start}
    last = {s.get("device_id"): s for s in end}
    devices = []
    for dev in sorted(set(first) | set(last) | set(samples["device_id"].dropna().astype(int))):
        s0, s1 = first.get(dev, {}), last.get(dev, {})
        d: dict = {"device_id": int(dev)}
        for key in ("name", "uuid", "power_limit_w"):
            if key in s1 or key in s0:
                d[key] = s1.get(key, s0.get(key))
        rows = samples[samples["device_id"] == dev]
        util = pd.to_numeric(rows["gpu_util_pct"], errors="coerce")
        busy = rows[util > 0] if util.notna().any() else rows
        d["busy_samples"] = int(len(busy))
        for key, keys in (("sm_clock_mhz", ("median", "min", "max")), ("mem_clock_mhz", ("median", "min", "max")),
                          ("power_w", ("median", "max")), ("temp_c", ("median", "max"))):
            st = _stats(busy[key], keys)
            if st:
                d[key] = st
        d["throttle"] = _throttle(busy["throttle_reasons"])
        for key in ("ecc_uncorrected", "ecc_corrected"):
            if key in s0 and key in s1:
                d[f"{key}_new"] = int(s1[key]) - int(s0[key])
        if "remapped_rows" in s1:
            c1, u1, pending, failed = (list(s1["remapped_rows"]) + [0, 0, 0, 0])[:4]
            u0 = (s0.get("remapped_rows") or [0, u1])[1]
            d["remapped_rows"] = {"uncorrectable_new": int(u1) - int(u0), "pending": bool(pending),
                                  "failed": bool(failed)}
        d["other_processes"] = processes.get(dev, [])
        devices.append(d)
    return {"driver_version": driver_version, "devices": devices}
