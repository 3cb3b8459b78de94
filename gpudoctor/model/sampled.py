"""Sampled counters (``counters`` table) attributed to time intervals: kernels, steps, ranges.

Counters are samples ``(ts_ns, value)`` of one metric on one device. A sample stands for the period
that ends at its time stamp (Nsight Systems GPU metrics and NVML utilisations are averages over the
period since the previous sample); the first sample of a series covers one median period before it.

The mean of a metric over an interval is the time-weighted mean of the samples' values over the part
of the interval the samples cover: with F(t) the integral of the piecewise-constant series, the mean
over [s, e) is (F(e) - F(s)) / covered(s, e). Both come from cumulative sums and ``searchsorted``, so
millions of samples and kernels cost a few array passes, no Python loop per row.

Metric names differ between sources and GPU generations; :func:`canonical` maps them to one key:

==========================  ==================================================================  =========
key                         names                                                                unit
==========================  ==================================================================  =========
dram_read_fraction          ``DRAM Read Bandwidth [Throughput %]`` (Nsight Systems)             0..1
dram_write_fraction         ``DRAM Write Bandwidth [Throughput %]``                              0..1
tensor_active_fraction      ``Tensor Active [Throughput %]``, ``Tensor Active / FP16 Active``,   0..1
                            ``Tensor Pipe Active``, NVML ``nvml.tensor_util_pct``
sm_active_fraction          ``SMs Active [Throughput %]``, NVML ``nvml.sm_util_pct``             0..1
gr_active_fraction          ``GR Active [Throughput %]``, NVML ``nvml.gpu_util_pct``             0..1
dram_fraction               NVML ``nvml.dram_bw_util_pct`` (read + write together)               0..1
==========================  ==================================================================  =========

Percent metrics (``[Throughput %]``, ``_pct``) become fractions; other units stay as given.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gpudoctor.model.steps import merge_intervals

if TYPE_CHECKING:
    import numpy.typing as npt

# (canonical key, regex over the counter name, source). First match wins; GPU-metrics names first.
_CANON: tuple[tuple[str, re.Pattern, str], ...] = tuple((k, re.compile(p, re.I), s) for k, p, s in (
    ("dram_read_fraction", r"^DRAM Read Bandwidth\b", "gpu_metrics"),
    ("dram_write_fraction", r"^DRAM Write Bandwidth\b", "gpu_metrics"),
    ("tensor_active_fraction", r"^Tensor (Active|Pipe Active)\b", "gpu_metrics"),
    ("sm_active_fraction", r"^SMs? Active\b", "gpu_metrics"),
    ("gr_active_fraction", r"^GR Active\b", "gpu_metrics"),
    ("tensor_active_fraction", r"^nvml\.tensor_util_pct$", "nvml"),
    ("sm_active_fraction", r"^nvml\.sm_util_pct$", "nvml"),
    ("gr_active_fraction", r"^nvml\.gpu_util_pct$", "nvml"),
    ("dram_fraction", r"^nvml\.dram_bw_util_pct$", "nvml"),
))
_PERCENT = re.compile(r"%|_pct$", re.I)


def canonical(name: str) -> tuple[str, str] | None:
    """(key, source) of a counter name, or None when no analyzer reads it."""
    for key, rx, src in _CANON:
        if rx.search(name):
            return key, src
    return None


def scale_of(name: str) -> float:
    """Factor that turns the counter's value into the canonical unit (percent -> fraction)."""
    return 0.01 if _PERCENT.search(name) else 1.0


def series(counters: pd.DataFrame, key: str, source: str | None = None,
           device_id: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Time stamps, values (canonical unit) and source of metric ``key`` (see :func:`canonical`).

    Several names with one key (e.g. NVML and GPU metrics both give tensor activity) are not mixed:
    the first source in the table above that has samples wins. Several devices are not mixed either:
    ``device_id`` picks one, else the device with most samples of the metric.
    """
    empty = (np.zeros(0, np.int64), np.zeros(0), "")
    if counters is None or counters.empty:
        return empty
    col = counters["name"]
    cats = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.Index(col.unique())
    found: dict[str, list[str]] = {}
    for n in cats:
        c = canonical(str(n))
        if c and c[0] == key and (source is None or c[1] == source):
            found.setdefault(c[1], []).append(str(n))
    if not found:
        return empty
    src = next(s for _, _, s in _CANON if s in found)
    names = found[src]
    rows = counters[col.isin(names).to_numpy()]
    if device_id is None:
        device_id = int(rows["device_id"].value_counts().idxmax())
    rows = rows[rows["device_id"].to_numpy() == device_id]
    # A metric split across names (one per GPU generation's naming) is one series.
    scale = np.array([scale_of(n) for n in names])[pd.Index(names).get_indexer(rows["name"].astype(str))]
    ts = rows["ts_ns"].to_numpy(np.int64)
    order = np.argsort(ts, kind="stable")
    return ts[order], rows["value"].to_numpy(np.float64)[order] * scale[order], src


def interval_means(ts: np.ndarray, values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Time-weighted mean of the sampled series over each interval [start, end); NaN where no sample
    period overlaps the interval (or it is empty). Samples stand for the period ending at ``ts``."""
    starts = np.asarray(starts, np.int64)
    ends = np.asarray(ends, np.int64)
    out = np.full(len(starts), np.nan)
    ok = np.isfinite(values)
    ts, values = ts[ok], values[ok]
    if len(ts) == 0 or len(starts) == 0:
        return out
    period = int(np.median(np.diff(ts))) if len(ts) > 1 else 1
    bounds = np.r_[ts[0] - max(period, 1), ts]  # sample i covers [bounds[i], bounds[i + 1])
    width = np.diff(bounds).astype(np.float64)
    area = np.r_[0.0, np.cumsum(values * width)]
    cover = np.r_[0.0, np.cumsum(width)]

    def integral(t: np.ndarray, acc: np.ndarray) -> np.ndarray:
        t = np.clip(t, bounds[0], bounds[-1])
        i = np.clip(np.searchsorted(bounds, t, side="right") - 1, 0, len(width) - 1)
        per = np.diff(acc)[i] / width[i]  # the sample's value (or 1 for coverage) per ns
        return acc[i] + per * (t - bounds[i])

    covered = integral(ends, cover) - integral(starts, cover)
    good = (ends > starts) & (covered > 0)
    out[good] = (integral(ends[good], area) - integral(starts[good], area)) / covered[good]
    return out


def sample_periods(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of the period each sample stands for (see :func:`interval_means`)."""
    period = int(np.median(np.diff(ts))) if len(ts) > 1 else 1
    bounds = np.r_[ts[0] - max(period, 1), ts] if len(ts) else np.zeros(1, np.int64)
    return bounds[:-1], bounds[1:]


def coverage(ts: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per sample, the fraction of its period covered by the union of the intervals [starts, ends)."""
    if len(ts) == 0:
        return np.zeros(0)
    p0, p1 = sample_periods(ts)
    us, ue = merge_intervals(starts, ends)
    if len(us) == 0:
        return np.zeros(len(ts))
    cum = np.r_[0, np.cumsum(ue - us)]

    def before(t):  # union length before each time t
        i = np.searchsorted(ue, t, side="right")
        j = np.clip(i, 0, len(us) - 1)
        return cum[i] + np.where(i < len(us), np.clip(t - us[j], 0, ue[j] - us[j]), 0)

    return (before(p1) - before(p0)) / np.maximum(p1 - p0, 1)


def sample_count_in(ts: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Samples whose time stamp lies in each interval [start, end)."""
    return np.searchsorted(ts, ends, side="left") - np.searchsorted(ts, starts, side="left")


def metric_over(counters: pd.DataFrame, key: str, starts: npt.ArrayLike, ends: npt.ArrayLike,
                source: str | None = None, device_id: int | None = None) -> tuple[np.ndarray, str]:
    """Per interval, the time-weighted mean of metric ``key``, and the source it came from ('' = none)."""
    ts, values, src = series(counters, key, source, device_id)
    return interval_means(ts, values, np.asarray(starts), np.asarray(ends)), src


def available(counters: pd.DataFrame) -> dict[str, str]:
    """Canonical keys present in the table -> the best source of each."""
    if counters is None or counters.empty:
        return {}
    col = counters["name"]
    cats = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.Index(col.unique())
    out: dict[str, str] = {}
    rank = {s: i for i, s in enumerate(dict.fromkeys(s for _, _, s in _CANON))}
    for n in cats:
        c = canonical(str(n))
        if c and (c[0] not in out or rank[c[1]] < rank[out[c[0]]]):
            out[c[0]] = c[1]
    return out
