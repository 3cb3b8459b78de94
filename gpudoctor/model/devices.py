"""Datasheet peaks of GPUs (dense FLOP/s per precision, memory bandwidth), looked up by device name.

The table lives in ``gpudoctor/data/devices.toml`` with the source of every number. Datasheet peaks
are ceilings that real kernels do not reach; when the GPU's ceilings were measured
(``gpudoctor ceilings``, see gpudoctor/collect/ceilings.py) they replace the datasheet values:
``with_ceilings(peaks, measured)``.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "devices.toml"
PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "fp8")
NAN = float("nan")


@dataclass(frozen=True)
class DevicePeaks:
    key: str
    name: str
    memory_bandwidth_bytes_per_s: float
    fp32_flops_per_s: float = NAN
    tf32_flops_per_s: float = NAN
    bf16_flops_per_s: float = NAN
    fp16_flops_per_s: float = NAN
    fp8_flops_per_s: float = NAN
    source: str = ""
    measured: tuple[str, ...] = field(default=())  # fields replaced by measured ceilings

    def flops(self, precision: str) -> float:
        """Dense peak FLOP/s of ``precision`` (fp32 | tf32 | bf16 | fp16 | fp8); NaN when the GPU lacks it."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
        return float(getattr(self, f"{precision}_flops_per_s"))

    def ridge_point(self, precision: str = "bf16") -> float:
        """FLOP per byte at which a kernel of ``precision`` stops being memory-bound (roofline knee)."""
        return self.flops(precision) / self.memory_bandwidth_bytes_per_s

    def describe(self) -> str:
        m = f", measured: {', '.join(self.measured)}" if self.measured else ""
        return f"{self.name} ({self.memory_bandwidth_bytes_per_s / 1e12:.2f} TB/s, bf16 {self.bf16_flops_per_s / 1e12:.0f} TFLOP/s{m})"


def _normalize(name: str) -> str:
    return " ".join(str(name).lower().replace("-", " ").replace("_", " ").split())


@lru_cache(maxsize=1)
def table() -> tuple[tuple[tuple[tuple[str, ...], ...], DevicePeaks], ...]:
    """(match alternatives, peaks) for every device of the data file, in file order."""
    with open(DATA_FILE, "rb") as f:
        data = tomllib.load(f)
    out = []
    for d in data["device"]:
        alts = tuple(tuple(_normalize(s) for s in alt.split("+")) for alt in d["match"].split("|"))
        peaks = DevicePeaks(
            key=d["key"], name=d["name"], memory_bandwidth_bytes_per_s=float(d["memory_bandwidth_bytes_per_s"]),
            source=d.get("source", ""),
            **{f"{p}_flops_per_s": float(d.get(f"{p}_flops_per_s", NAN)) for p in PRECISIONS},
        )
        out.append((alts, peaks))
    return tuple(out)


def lookup(device_name: str) -> DevicePeaks | None:
    """Datasheet peaks of the GPU called ``device_name`` (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
    name = _normalize(device_name)
    if not name:
        return None
    for alts, peaks in table():
        if any(all(s in name for s in alt) for alt in alts):
            return peaks
    return None


# Measured ceilings JSON key -> DevicePeaks field.
_CEILING_FIELDS = {
    "copy_bandwidth_bytes_per_s": "memory_bandwidth_bytes_per_s",
    "memory_bandwidth_bytes_per_s": "memory_bandwidth_bytes_per_s",
    "fp32_flops_per_s": "fp32_flops_per_s",
    "tf32_flops_per_s": "tf32_flops_per_s",
    "bf16_flops_per_s": "bf16_flops_per_s",
    "fp16_flops_per_s": "fp16_flops_per_s",
    "fp8_flops_per_s": "fp8_flops_per_s",
}


def ceilings_apply(device_name: str, ceilings: dict | None) -> bool:
    """Whether measured ``ceilings`` describe ``device_name`` (same name, or the ceilings name no GPU)."""
    if not ceilings:
        return False
    measured_on = _normalize(ceilings.get("device_name", ""))
    return not measured_on or not device_name or measured_on == _normalize(device_name)


def with_ceilings(peaks: DevicePeaks | None, ceilings: dict | None, device_name: str = "") -> DevicePeaks | None:
    """``peaks`` with every value that ``ceilings`` measured replaced by the measurement.

    ``ceilings`` is the JSON of ``gpudoctor ceilings`` (copy_bandwidth_bytes_per_s, bf16_flops_per_s, ...).
    A GPU missing from the datasheet table still gets peaks when the ceilings measure its bandwidth.
    fp16 takes the measured bf16 rate when only bf16 was measured (the same tensor-core rate on every
    GPU of the table).
    """
    if not ceilings_apply(device_name, ceilings):
        return peaks
    values = {}
    for key, fld in _CEILING_FIELDS.items():
        v = ceilings.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            values[fld] = float(v)
    if "bf16_flops_per_s" in values and "fp16_flops_per_s" not in values:
        values["fp16_flops_per_s"] = values["bf16_flops_per_s"]
    if not values:
        return peaks
    if peaks is None:
        if "memory_bandwidth_bytes_per_s" not in values:
            return None
        peaks = DevicePeaks(key="measured", name=device_name or ceilings.get("device_name", "unknown GPU"),
                            memory_bandwidth_bytes_per_s=values["memory_bandwidth_bytes_per_s"],
                            source="measured ceilings only")
    return replace(peaks, measured=tuple(sorted(set(peaks.measured) | set(values))), **values)


def peaks_for(device_name: str, ceilings: dict | None = None, reported_bandwidth: float = NAN) -> DevicePeaks | None:
    """Peaks of ``device_name``: datasheet table, overridden by measured ceilings of the same GPU.

    ``reported_bandwidth`` (the trace's devices.memory_bandwidth_bytes_per_s) is the last resort for a
    GPU that is neither in the table nor measured: bandwidth only, no FLOP/s.
    """
    peaks = with_ceilings(lookup(device_name), ceilings, device_name)
    if peaks is None and math.isfinite(reported_bandwidth) and reported_bandwidth > 0:
        peaks = DevicePeaks(key="reported", name=device_name or "unknown GPU",
                            memory_bandwidth_bytes_per_s=float(reported_bandwidth),
                            source="bandwidth reported by the profiler; no FLOP/s known")
    return peaks
