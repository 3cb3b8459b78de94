"""Nsight Systems GPU metrics (``--gpu-metrics-devices``) -> rows of the ``counters`` table.

``GPU_METRICS`` holds one row per (sample, metric): ``timestamp`` (``start`` in some exports), ``typeId``,
``metricId``, ``value``. ``TARGET_INFO_GPU_METRICS`` names them: (``typeId``, ``metricId``) ->
``metricName`` such as ``DRAM Read Bandwidth [Throughput %]``, ``Tensor Active [Throughput %]``,
``SMs Active [Throughput %]``, ``GR Active [Throughput %]``, ``PCIe RX Throughput [Throughput %]`` with the
unit in brackets, kept as given; ``typeName`` names the metric set and GPU. Every metric set and GPU
generation uses this layout, so every metric the export holds is read; ``gpudoctor.model.sampled``
maps the names analyzers use to one key per quantity. A metric id with no name becomes
``gpu_metric_<id>`` (kept, not dropped). nsys packs the GPU index in the low byte of ``typeId``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from gpudoctor.readers.nsys import _Reader

TABLE, INFO = "GPU_METRICS", "TARGET_INFO_GPU_METRICS"


class GpuMetricsSchemaError(ValueError):
    """The export has GPU metrics in a layout this reader does not know."""


def metric_names(reader: _Reader) -> tuple[dict[tuple[int, int], str], dict[int, str], list[str]]:
    """(typeId, metricId) -> name, metricId -> name (first seen), and the metric sets (typeName)."""
    names: dict[tuple[int, int], str] = {}
    by_metric: dict[int, str] = {}
    sets: list[str] = []
    cols = set(reader.columns(INFO)) if reader.has(INFO) else set()
    if {"metricId", "metricName"} <= cols:
        type_sel = '"typeId"' if "typeId" in cols else "-1"
        set_sel = '"typeName"' if "typeName" in cols else "''"
        for ty, mid, mname, tname in reader.conn.execute(
                f'SELECT {type_sel}, "metricId", "metricName", {set_sel} FROM "{INFO}"'):
            names[(int(ty), int(mid))] = str(mname)
            by_metric.setdefault(int(mid), str(mname))
            if tname and str(tname) not in sets:
                sets.append(str(tname))
    return names, by_metric, sets


def read_gpu_metrics(reader: _Reader, gpu_to_dev: dict[int, int], rank: int, offset_ns: int,
                     map_codes: Callable[..., np.ndarray],
                     factorize: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                     cat_from_distinct: Callable[[np.ndarray, np.ndarray], pd.Categorical],
                     ) -> tuple[pd.DataFrame, list[str]]:
    """The samples as counters columns (rank, device_id, ts_ns, name, value) and the metric sets seen.

    ``reader`` is the nsys export reader (``has``/``columns``/``col``/``fetch``/``conn``); the three helpers
    are its columnar utilities, passed in so this module does not import the reader (no cycle).
    """
    if not reader.has(TABLE) or "metricId" not in reader.columns(TABLE):
        return pd.DataFrame(), []
    ts_col = reader.col(TABLE, "timestamp") or reader.col(TABLE, "start")
    if ts_col is None:
        raise GpuMetricsSchemaError(f"{TABLE} has no timestamp column (unsupported nsys export schema)")
    f = reader.fetch(TABLE, [
        ("ts", ts_col, reader.NULL_TIME, "i8"), ("type_id", reader.col(TABLE, "typeId"), -1, "i8"),
        ("metric_id", '"metricId"', -1, "i8"), ("value", reader.col(TABLE, "value"), float("nan"), "f8"),
    ])
    keep = reader.valid_times(f"nsys:{TABLE}", f["ts"], f["ts"])  # NULL / out-of-range times: counted drops
    if not keep.all():
        f = {k: v[keep] for k, v in f.items()}
    names, by_metric, sets = metric_names(reader)
    t_codes, t_uniq = factorize(f["type_id"])
    m_codes, m_uniq = factorize(f["metric_id"])
    width = max(len(m_uniq), 1)
    inv, pairs = factorize(t_codes * width + m_codes)
    labels = np.array([names.get((int(t_uniq[p // width]), int(m_uniq[p % width])),
                                 by_metric.get(int(m_uniq[p % width]), f"gpu_metric_{int(m_uniq[p % width])}"))
                       for p in pairs.tolist()], dtype=object)
    gpu = np.where(f["type_id"] >= 0, f["type_id"] & 0xFF, -1)
    device = map_codes(gpu, gpu_to_dev, None)
    device = np.where(pd.isna(device), gpu, device).astype(np.int64)
    return pd.DataFrame({
        "rank": rank, "device_id": device, "ts_ns": f["ts"] + offset_ns,
        "name": cat_from_distinct(labels, inv), "value": f["value"],
    }), sets
