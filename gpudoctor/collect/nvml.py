"""NVML sampler: GPU utilization, memory, power, clocks, temperature, throttling and link traffic over time.

``NvmlSampler(path, devices).start()`` samples in a background thread (10 Hz by default) and writes a
CSV, one row per device per sample, wide (one column per metric; an empty cell = not available):

    ts_ns,device_id,gpu_util_pct,mem_util_pct,mem_used_bytes,power_w,sm_clock_mhz,temp_c,throttle_reasons,...

``ts_ns`` is UTC epoch nanoseconds (the clock every reader puts traces on). ``device_id`` is the CUDA
device ordinal as the profiled program sees it (its index in CUDA_VISIBLE_DEVICES), the ``device_id``
of the trace tables. Metrics (``read_samples`` names them ``nvml.<column>``):

=====================  =====================================================================
gpu_util_pct           % of the last sample period in which a kernel ran (nvmlDeviceGetUtilizationRates)
mem_util_pct           % of the period the memory controller was busy
mem_used_bytes         device memory in use (all processes)
power_w                board power draw
sm_clock_mhz           current SM clock
mem_clock_mhz          current memory clock
temp_c                 GPU temperature
throttle_reasons       bit mask of clock event reasons (nvmlClocksEventReason*; 0 = none, 1 = idle)
sm_util_pct            % of SMs busy (GPM, Hopper and newer)
sm_occupancy_pct       achieved warp occupancy (GPM)
tensor_util_pct        tensor pipe activity (GPM)
dram_bw_util_pct       DRAM bandwidth used, % of peak (GPM)
pcie_tx_bytes_per_s    PCIe traffic out of / into the GPU (GPM, else NVML PCIe counters when present)
pcie_rx_bytes_per_s
nvlink_tx_bytes_per_s  NVLink data traffic, all links (GPM, else NVML NVLink throughput counters)
nvlink_rx_bytes_per_s
=====================  =====================================================================

``NvmlSampler.stop()`` also returns ``gpu_state``: the conditions of the capture (GPU model, driver, clocks
while busy, power cap, temperature, throttle reasons, ECC / row-remap events, other processes on the GPU),
summarized by gpudoctor.collect.gpustate from the samples and a snapshot taken at the start and the end.

``read_samples(path, rank)`` turns the CSV into rows of the trace model's ``counters`` table and
``read_trace(path, rank)`` into a Trace holding only those counters (no ``ranks`` row, so it merges with
the rank's timeline).

Cost: one thread, a handful of NVML calls per device per sample (ctypes releases the GIL during each
call), rows buffered and written once a second. The thread's CPU time is measured and reported by
``stop()`` (``cpu_fraction``); on a machine without NVML the sampler says so once and does nothing.
"""

from __future__ import annotations

import csv
import math
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gpudoctor.errors import install_hint

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import ModuleType

    import pandas as pd

    from gpudoctor.model.trace import Trace

METRICS = (
    "gpu_util_pct", "mem_util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz", "mem_clock_mhz", "temp_c",
    "throttle_reasons",
    "sm_util_pct", "sm_occupancy_pct", "tensor_util_pct", "dram_bw_util_pct",
    "pcie_tx_bytes_per_s", "pcie_rx_bytes_per_s", "nvlink_tx_bytes_per_s", "nvlink_rx_bytes_per_s",
)
COUNTER_PREFIX = "nvml."
DEFAULT_INTERVAL_S = 0.1
PROCESS_POLL_EVERY = 10  # samples between two looks at the processes on the GPU
_MIB = 1 << 20

# GPM metric id names (pynvml) -> our column, scale to our unit
_GPM = (
    ("NVML_GPM_METRIC_SM_UTIL", "sm_util_pct", 1.0),
    ("NVML_GPM_METRIC_SM_OCCUPANCY", "sm_occupancy_pct", 1.0),
    ("NVML_GPM_METRIC_ANY_TENSOR_UTIL", "tensor_util_pct", 1.0),
    ("NVML_GPM_METRIC_DRAM_BW_UTIL", "dram_bw_util_pct", 1.0),
    ("NVML_GPM_METRIC_PCIE_TX_PER_SEC", "pcie_tx_bytes_per_s", _MIB),  # MiB/s
    ("NVML_GPM_METRIC_PCIE_RX_PER_SEC", "pcie_rx_bytes_per_s", _MIB),
    ("NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC", "nvlink_tx_bytes_per_s", _MIB),
    ("NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC", "nvlink_rx_bytes_per_s", _MIB),
)
# NVML field ids of cumulative counters -> our rate column, bytes per unit
_FIELDS = (
    ("NVML_FI_DEV_PCIE_COUNT_TX_BYTES", "pcie_tx_bytes_per_s", 1.0),
    ("NVML_FI_DEV_PCIE_COUNT_RX_BYTES", "pcie_rx_bytes_per_s", 1.0),
    ("NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", "nvlink_tx_bytes_per_s", 1024.0),  # KiB
    ("NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", "nvlink_rx_bytes_per_s", 1024.0),
)
_ALL_LINKS = 0xFFFFFFFF  # scopeId: sum over all NVLinks


class NvmlUnavailable(Exception):
    """NVML cannot be used here (no driver, no library, no GPU); the message says why."""


def _pynvml():
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable(f"nvidia-ml-py is not installed ({install_hint('gpu')})") from None
    return pynvml


def init() -> ModuleType:
    """Initialize NVML; returns the pynvml module or raises NvmlUnavailable."""
    pynvml = _pynvml()
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise NvmlUnavailable(f"NVML not available ({' '.join(str(e).split()) or type(e).__name__})") from None
    return pynvml


def _str(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def visible_devices(pynvml: ModuleType, env: Mapping[str, str] | None = None) -> list[tuple[int, int]]:
    """(CUDA device ordinal, NVML index) of the GPUs the program sees, honouring CUDA_VISIBLE_DEVICES."""
    env = os.environ if env is None else env
    count = pynvml.nvmlDeviceGetCount()
    spec = env.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return [(i, i) for i in range(count)]
    uuids: list[str] = []
    for i in range(count):
        try:
            uuids.append(_str(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))))
        except Exception:
            uuids.append("")
    out: list[tuple[int, int]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            break
        if item.lstrip("-").isdigit():
            idx = int(item)
            if idx < 0 or idx >= count:
                break  # CUDA stops at the first invalid entry
        else:  # GPU-<uuid> (or a unique prefix of it); MIG instances are not sampled per instance
            matches = [i for i, u in enumerate(uuids) if u and (u == item or u.startswith(item))]
            if len(matches) != 1:
                break
            idx = matches[0]
        out.append((len(out), idx))
    return out


def device_info(env: dict | None = None) -> dict:
    """Driver, CUDA driver version and the visible GPUs, or {"error": why} without NVML."""
    try:
        pynvml = init()
    except NvmlUnavailable as e:
        return {"error": str(e)}
    try:
        info: dict = {}
        try:
            info["driver_version"] = _str(pynvml.nvmlSystemGetDriverVersion())
        except Exception:
            pass
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())
            info["cuda_driver_version"] = f"{v // 1000}.{(v % 1000) // 10}"
        except Exception:
            pass
        gpus = []
        for ordinal, idx in visible_devices(pynvml, env):
            h = pynvml.nvmlDeviceGetHandleByIndex(idx)
            g: dict = {"device_id": ordinal, "nvml_index": idx}
            for key, fn in (("name", lambda: _str(pynvml.nvmlDeviceGetName(h))),
                            ("uuid", lambda: _str(pynvml.nvmlDeviceGetUUID(h))),
                            ("memory_bytes", lambda: int(pynvml.nvmlDeviceGetMemoryInfo(h).total)),
                            ("pci_bus_id", lambda: _str(pynvml.nvmlDeviceGetPciInfo(h).busId)),
                            ("max_sm_clock_mhz", lambda: int(pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM))),
                            ("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0)):
                try:
                    g[key] = fn()
                except Exception:
                    pass
            gpus.append(g)
        info["gpus"] = gpus
        return info
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------------
# The sampler


class _Device:
    """Readers of one device: only the ones that worked when probed are kept."""

    def __init__(self, pynvml, ordinal: int, nvml_index: int):
        self.p = pynvml
        self.ordinal = ordinal
        self.index = nvml_index
        self.h = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        self.readers: list[tuple[str, object]] = []
        self.gpm = None  # (metric ids, columns, scales, two samples)
        self.fields = None  # (field ids, columns, scales, last values, last ts)
        self._probe()

    def _try(self, name: str, fn) -> None:
        try:
            fn()
        except Exception:
            return
        self.readers.append((name, fn))

    def _probe(self) -> None:
        p, h = self.p, self.h
        self._try("util", lambda: p.nvmlDeviceGetUtilizationRates(h))
        self._try("mem_used_bytes", lambda: p.nvmlDeviceGetMemoryInfo(h).used)
        self._try("power_w", lambda: p.nvmlDeviceGetPowerUsage(h) / 1000.0)
        self._try("sm_clock_mhz", lambda: p.nvmlDeviceGetClockInfo(h, p.NVML_CLOCK_SM))
        self._try("mem_clock_mhz", lambda: p.nvmlDeviceGetClockInfo(h, p.NVML_CLOCK_MEM))
        self._try("temp_c", lambda: p.nvmlDeviceGetTemperature(h, p.NVML_TEMPERATURE_GPU))
        reasons = getattr(p, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            p, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if reasons is not None:
            self._try("throttle_reasons", lambda: reasons(h))
        self._probe_gpm()
        self._probe_fields()

    def _probe_gpm(self) -> None:
        p = self.p
        try:
            if not p.nvmlGpmQueryDeviceSupport(self.h).isSupportedDevice:
                return
            ids, cols, scales = [], [], []
            for const, col, scale in _GPM:
                if hasattr(p, const):
                    ids.append(getattr(p, const))
                    cols.append(col)
                    scales.append(scale)
            samples = [p.nvmlGpmSampleAlloc(), p.nvmlGpmSampleAlloc()]
            p.nvmlGpmSampleGet(self.h, samples[0])
            self.gpm = [ids, cols, scales, samples, False]  # False: no previous sample yet in the run
        except Exception:
            self.gpm = None

    def _probe_fields(self) -> None:
        p = self.p
        have_gpm = set(self.gpm[1]) if self.gpm else set()
        wanted = [(getattr(p, c), col, s) for c, col, s in _FIELDS if hasattr(p, c) and col not in have_gpm]
        if not wanted:
            return
        try:
            ids = [(fid, _ALL_LINKS) if "nvlink" in col else fid for fid, col, _ in wanted]
            values = p.nvmlDeviceGetFieldValues(self.h, ids)
            keep = [i for i, v in enumerate(values) if v.nvmlReturn == 0]
            if keep:
                self.fields = [[ids[i] for i in keep], [wanted[i][1] for i in keep], [wanted[i][2] for i in keep],
                               None, 0]
        except Exception:
            self.fields = None

    def columns(self) -> list[str]:
        cols = []
        for name, _ in self.readers:
            cols.extend(("gpu_util_pct", "mem_util_pct") if name == "util" else (name,))
        if self.gpm:
            cols.extend(self.gpm[1])
        if self.fields:
            cols.extend(self.fields[1])
        return cols

    def sample(self, ts_ns: int) -> dict:
        row: dict = {}
        for name, fn in self.readers:
            try:
                v = fn()
            except Exception:
                continue
            if name == "util":
                row["gpu_util_pct"], row["mem_util_pct"] = v.gpu, v.memory
            else:
                row[name] = v
        if self.gpm:
            self._sample_gpm(row)
        if self.fields:
            self._sample_fields(row, ts_ns)
        return row

    def _sample_gpm(self, row: dict) -> None:
        p = self.p
        ids, cols, scales, samples, primed = self.gpm
        try:
            p.nvmlGpmSampleGet(self.h, samples[1])
            if primed:
                mg = p.c_nvmlGpmMetricsGet_t()
                mg.version = p.NVML_GPM_METRICS_GET_VERSION
                mg.numMetrics = len(ids)
                mg.sample1, mg.sample2 = samples[0], samples[1]
                for i, mid in enumerate(ids):
                    mg.metrics[i].metricId = mid
                p.nvmlGpmMetricsGet(mg)
                for i, col in enumerate(cols):
                    m = mg.metrics[i]
                    if m.nvmlReturn == 0 and math.isfinite(m.value):
                        row[col] = m.value * scales[i]
            samples.reverse()  # the newest sample becomes the base of the next period
            self.gpm[4] = True
        except Exception:
            self.gpm = None  # never retried: one failure means this device cannot do it

    def _sample_fields(self, row: dict, ts_ns: int) -> None:
        ids, cols, scales, last, last_ts = self.fields
        try:
            values = self.p.nvmlDeviceGetFieldValues(self.h, ids)
        except Exception:
            self.fields = None
            return
        now = []
        for v in values:
            now.append(float(v.value.ullVal) if v.nvmlReturn == 0 else math.nan)
        if last is not None and ts_ns > last_ts:
            dt = (ts_ns - last_ts) / 1e9
            for i, col in enumerate(cols):
                d = now[i] - last[i]
                if math.isfinite(d) and d >= 0:
                    row[col] = d * scales[i] / dt
        self.fields[3], self.fields[4] = now, ts_ns

    def snapshot(self) -> dict:
        """What is read once at the start and the end of a capture (each item only where NVML has it)."""
        p, h = self.p, self.h
        out: dict = {"device_id": self.ordinal}
        for key, fn in (
            ("name", lambda: _str(p.nvmlDeviceGetName(h))),
            ("uuid", lambda: _str(p.nvmlDeviceGetUUID(h))),
            ("power_limit_w", lambda: p.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0),
            ("ecc_uncorrected", lambda: int(p.nvmlDeviceGetTotalEccErrors(
                h, p.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, p.NVML_VOLATILE_ECC))),
            ("ecc_corrected", lambda: int(p.nvmlDeviceGetTotalEccErrors(
                h, p.NVML_MEMORY_ERROR_TYPE_CORRECTED, p.NVML_VOLATILE_ECC))),
            ("remapped_rows", lambda: [int(x) for x in p.nvmlDeviceGetRemappedRows(h)]),  # corr, unc, pending, failed
        ):
            try:
                out[key] = fn()
            except Exception:
                pass
        return out

    def processes(self) -> list[tuple[int, int]]:
        """(pid, used GPU memory bytes) of the compute and graphics processes on this GPU now."""
        out = []
        for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                for proc in getattr(self.p, fn)(self.h):
                    out.append((int(proc.pid), int(proc.usedGpuMemory or 0)))
            except Exception:
                pass
        return out

    def close(self) -> None:
        if self.gpm:
            for s in self.gpm[3]:
                try:
                    self.p.nvmlGpmSampleFree(s)
                except Exception:
                    pass
            self.gpm = None


class NvmlSampler:
    """Samples ``devices`` (CUDA ordinals as the program sees them; None = all visible) into ``path``."""

    def __init__(self, path: str | Path, devices: list[int] | None = None, interval_s: float = DEFAULT_INTERVAL_S,
                 env: dict | None = None, flush_s: float = 1.0):
        self.path = Path(path)
        self.wanted = devices
        self.interval_s = max(0.01, float(interval_s))
        self.flush_s = flush_s
        self.env = env
        self.error: str | None = None
        self.samples = 0
        self.columns: list[str] = []
        self.devices: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu_ns = 0
        self._t0 = self._t1 = 0.0
        self._pynvml = None
        self._devs: list[_Device] = []
        self._snapshots: dict[str, list[dict]] = {}
        self._procs: dict[int, dict[int, int]] = {}  # device_id -> pid -> most GPU memory seen
        self._own: dict[int, str] = {}  # pid -> "own" | "other" | "unknown" (gpustate.process_owner)
        self.driver_version = ""

    def start(self) -> bool:
        """Start sampling; False (and ``error`` set) when NVML or the devices cannot be used."""
        try:
            self._pynvml = init()
        except NvmlUnavailable as e:
            self.error = str(e)
            return False
        try:
            pairs = visible_devices(self._pynvml, self.env)
            if self.wanted is not None:
                pairs = [pr for pr in pairs if pr[0] in set(self.wanted)]
            if not pairs:
                raise NvmlUnavailable("no GPU visible to the program (CUDA_VISIBLE_DEVICES)")
            self._devs = [_Device(self._pynvml, o, i) for o, i in pairs]
        except NvmlUnavailable as e:
            self.error = str(e)
            self._shutdown()
            return False
        except Exception as e:
            self.error = f"NVML failed: {' '.join(str(e).split()) or type(e).__name__}"
            self._shutdown()
            return False
        cols: list[str] = []
        for d in self._devs:
            cols.extend(c for c in d.columns() if c not in cols)
        self.columns = [c for c in METRICS if c in cols]
        self.devices = [{"device_id": d.ordinal, "nvml_index": d.index, "metrics": d.columns()} for d in self._devs]
        self._snapshots["start"] = [d.snapshot() for d in self._devs]
        try:
            self.driver_version = _str(self._pynvml.nvmlSystemGetDriverVersion())
        except Exception:
            pass
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(["ts_ns", "device_id", *self.columns])
        self._file.flush()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="gpudoctor-nvml", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        cpu0 = time.thread_time_ns()
        buf: list[list] = []
        last_flush = time.monotonic()
        nxt = time.monotonic()
        try:
            while True:
                ts = time.time_ns()
                for d in self._devs:
                    row = d.sample(ts)
                    buf.append([ts, d.ordinal, *(_cell(row.get(c)) for c in self.columns)])
                if self.samples % PROCESS_POLL_EVERY == 0:
                    self._poll_processes()
                self.samples += 1
                now = time.monotonic()
                if now - last_flush >= self.flush_s:
                    self._writer.writerows(buf)
                    self._file.flush()
                    buf.clear()
                    last_flush = now
                nxt += self.interval_s
                if nxt < now:  # fell behind (slow NVML): don't try to catch up
                    nxt = now + self.interval_s
                if self._stop.wait(nxt - now):
                    break
        finally:
            if buf:
                self._writer.writerows(buf)
            self._file.flush()
            self._cpu_ns = time.thread_time_ns() - cpu0

    def _poll_processes(self) -> None:
        from gpudoctor.collect import gpustate

        for d in self._devs:
            seen = self._procs.setdefault(d.ordinal, {})
            for pid, mem in d.processes():
                if pid not in self._own:  # whose it is is looked up while it runs: /proc forgets it at exit
                    self._own[pid] = gpustate.process_owner(pid, os.getpid())
                seen[pid] = max(mem, seen.get(pid, 0))

    def stop(self) -> dict:
        """Stop, close the file, and return a summary (samples, CPU time used, metrics, devices, gpu_state)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._t1 = time.monotonic()
            try:
                self._file.close()
            except Exception:
                pass
            self._thread = None
            self._snapshots["end"] = [d.snapshot() for d in self._devs]
        self._shutdown()
        out = self.summary()
        if self._snapshots.get("end") is not None:
            out["gpu_state"] = self.gpu_state()
        return out

    def gpu_state(self) -> dict:
        """The conditions of the capture (gpudoctor.collect.gpustate.summarize), from the CSV and snapshots."""
        from gpudoctor.collect import gpustate

        try:
            samples = gpustate.read_csv(self.path)
        except (OSError, ValueError) as e:
            return {"error": f"cannot read the samples back: {e}"}
        procs = {dev: gpustate.other_processes(pids, self._own) for dev, pids in self._procs.items()}
        return gpustate.summarize(samples, self._snapshots.get("start") or [], self._snapshots.get("end") or [],
                                  procs, self.driver_version)

    def summary(self) -> dict:
        wall = max(self._t1 - self._t0, 0.0)
        out = {"interval_s": self.interval_s, "samples": self.samples, "metrics": self.columns,
               "devices": self.devices, "wall_s": round(wall, 3), "cpu_s": round(self._cpu_ns / 1e9, 4),
               "cpu_fraction": round(self._cpu_ns / 1e9 / wall, 5) if wall > 0 else None}
        if self.error:
            out["error"] = self.error
        return out

    def _shutdown(self) -> None:
        for d in self._devs:
            d.close()
        self._devs = []
        if self._pynvml is not None:
            try:
                self._pynvml.nvmlShutdown()
            except Exception:
                pass
            self._pynvml = None


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else (str(int(v)) if v.is_integer() else f"{v:.6g}")
    return str(v)


# ---------------------------------------------------------------------------------------------------
# Reading the CSV back


def read_samples(path: str | Path, rank: int | None = None) -> pd.DataFrame:
    """The CSV as rows of the trace model's ``counters`` table: rank, device_id, ts_ns, name, value.

    Names are ``nvml.<column>`` (``nvml.gpu_util_pct``...); empty cells are left out; rows are sorted by
    time. A truncated last line (the sampler was killed mid-write) is skipped.
    """
    import numpy as np
    import pandas as pd

    from gpudoctor.errors import InputError
    from gpudoctor.model.trace import conform

    path = Path(path)
    try:
        df = pd.read_csv(path, on_bad_lines="skip", dtype={"ts_ns": str, "device_id": str})
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except pd.errors.EmptyDataError:
        raise InputError(path, "empty file") from None
    except (ValueError, pd.errors.ParserError) as e:
        raise InputError(path, f"not an NVML sample CSV ({' '.join(str(e).split())})") from None
    if "ts_ns" not in df.columns or "device_id" not in df.columns:
        raise InputError(path, "not an NVML sample CSV (expected columns ts_ns, device_id, ...)")
    df = df.dropna(subset=["ts_ns", "device_id"])
    for col, top in (("ts_ns", 2 ** 62), ("device_id", 1 << 16)):
        # Integers in range only: a float, inf or a 30-digit number is damage, never a wrapped int64.
        v = pd.to_numeric(df[col].str.strip(), errors="coerce", downcast=None)
        ok = df[col].str.strip().str.fullmatch(r"\d{1,19}").fillna(False).to_numpy() & (v < top).to_numpy()
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise InputError(path, f"data row {i + 1}: {col} {str(df[col].iloc[i])[:40]!r} is not an integer "
                                   f"in 0..{top}")
        df[col] = v.astype("int64")
    metrics = [c for c in df.columns if c not in ("ts_ns", "device_id")]
    long = df.melt(id_vars=["ts_ns", "device_id"], value_vars=metrics, var_name="name", value_name="value")
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    values = long["value"].to_numpy(dtype="float64", na_value=np.nan)
    infinite = int(np.isinf(values).sum())  # damage, not a sample: counted by the reader (dropped)
    long = long[np.isfinite(values)]  # empty cells are metrics NVML did not give: not samples either
    long = long.sort_values(["ts_ns", "device_id", "name"], kind="stable")
    out = pd.DataFrame({
        "rank": int(rank or 0),
        "device_id": long["device_id"].astype("int64").to_numpy(),
        "ts_ns": long["ts_ns"].astype("int64").to_numpy(),
        "name": (COUNTER_PREFIX + long["name"].astype(str)).to_numpy(),
        "value": long["value"].astype("float64").to_numpy(),
    })
    out = conform("counters", out)
    out.attrs["infinite_values"] = infinite
    return out


def read_trace(path: str | Path, rank: int | None = None) -> Trace:
    """A Trace holding only the samples as counters (no ranks row: it merges with the rank's timeline)."""
    from gpudoctor.model.trace import Trace

    t = Trace(meta={"inputs": [{"path": str(path), "format": "nvml_csv", "rank": int(rank or 0)}]})
    t.counters = read_samples(path, rank)
    return t


# ---------------------------------------------------------------------------------------------------
# Stand-alone: python -m gpudoctor.collect.nvml [--seconds S] [--interval S] [--out FILE]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import tempfile

    ap = argparse.ArgumentParser(description="Sample NVML for a while and report what it cost.")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S)
    ap.add_argument("--out", help="CSV to write (default: a temporary file)")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="gpudoctor-nvml-"), "nvml.csv")
    s = NvmlSampler(out, interval_s=args.interval)
    if not s.start():
        print(json.dumps({"error": s.error}))
        return 1
    time.sleep(args.seconds)
    summary = s.stop()
    summary["path"] = out
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
