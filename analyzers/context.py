"""AnalysisContext: what every analyzer of one rank needs, computed once and shared.

Per rank: the rank's Trace view, its StepWindow (``find_steps(ranges, kernels)``), the kernels / memops /
API calls of the steady-state window, the GPU's peaks (datasheet table, overridden by measured
ceilings), the config, and caches that analyzers share (kernel-name masks, the launch join, the
kernel -> CPU-op join).

Tensor shapes (optional)
    ``trace.cpu_ops`` (the model table; the Kineto reader fills it from torch.profiler ``cpu_op``
    events) holds the operators with their input shapes as JSON text. ``ctx.ops`` is the rank's rows
    with ``input_dims`` / ``input_types`` decoded (dims: list of lists of ints per input, types: list
    of str such as "c10::BFloat16"), or None when no op of the rank has shapes (a profile taken
    without ``record_shapes``, or an nsys trace). Analyzers then use shapes; without them they fall
    back to kernel names and timing (see docs/analyzers.md).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from gpudoctor.model.columns import per_value
from gpudoctor.model.devices import DevicePeaks, peaks_for
from gpudoctor.model.joins import first_match
from gpudoctor.model.steps import StepWindow, find_steps, union_ns
from gpudoctor.model.trace import Trace

if TYPE_CHECKING:  # annotations only: the config imports the registry, which imports the analyzers
    from gpudoctor.analyzers.config import Config

OPS_COLUMNS = ("rank", "thread_id", "start_ns", "end_ns", "name", "external_id", "input_dims", "input_types",
               "sequence_number", "shape_key")

# Bytes per element of the tensor types torch.profiler records in ``input_types``.
ELEMENT_BYTES = {"c10::BFloat16": 2, "c10::Half": 2, "float": 4, "double": 8, "c10::Float8_e4m3fn": 1,
                 "c10::Float8_e5m2": 1}
_IDENT = re.compile(r"[A-Za-z_]\w*")
_OPISH = re.compile(r"functor|_kernel(_cuda|_impl)?$|KernelImpl$|_impl$|Ops$|^launch_\w+", re.I)
_GENERIC = {"kernel", "kernel2", "device_kernel", "elementwise_kernel", "vectorized_elementwise_kernel"}


def display_name(name: str, limit: int = 100) -> str:
    """A readable kernel name for evidence: short names as they are; long templated PyTorch names as
    ``base<op>`` (``elementwise_kernel<masked_fill_kernel>``, ``vectorized_elementwise_kernel<MulFunctor>``)."""
    name = str(name)
    body = name[5:] if name.startswith("void ") else name
    if len(name) <= limit and "<" not in body:
        return name
    body = body.replace("<unnamed>::", "").replace("(anonymous namespace)::", "")
    head = re.split(r"[<(]", body, maxsplit=1)[0]
    base = head.rsplit("::", 1)[-1] or head
    ops = [m for m in _IDENT.findall(body[len(head):]) if _OPISH.search(m) and not m.startswith("gpu_kernel") and m != base]
    if ops:
        return f"{base}<{ops[-1]}>"
    if base and base.lower() not in _GENERIC and len(base) >= 6:
        return base
    return name if len(name) <= limit else name[: limit - 1] + "…"


def measured_fact(meta: dict, key: str) -> float | None:
    """A positive number the collector measured and left in the trace's metadata (``unprofiled_step_ms``,
    ``unprofiled_launch_ns``): torch.profiler's own metadata first (its add_metadata writes strings),
    then the run's (a run directory's manifest)."""
    for src in (meta.get("torch_profiler") or {}, meta):
        try:
            v = float(src.get(key))
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            return v
    return None


@dataclass
class AnalysisContext:
    rank: int
    trace: Trace  # this rank only
    window: StepWindow
    kernels: pd.DataFrame  # steady-state kernels, times clipped to the window; + kname, dur_ns, trace_row
    memops: pd.DataFrame  # steady-state memops, clipped; + dur_ns, trace_row
    api_calls: pd.DataFrame  # API calls overlapping the window (not clipped)
    device_name: str
    peaks: DevicePeaks | None
    config: Config
    ops: pd.DataFrame | None = None  # CPU ops with shapes when the caller provided them
    run_trace: Trace | None = None  # the whole run (all ranks), for analyzers that compare ranks
    run_windows: dict[int, StepWindow] | None = None  # every rank's steady-state window, found once
    _cache: dict = field(default_factory=dict, repr=False)
    # shared by the contexts of one run's ranks: what is computed from the whole run, once per run
    _run_cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ basics
    @property
    def window_ns(self) -> int:
        return self.window.duration_ns

    @property
    def start_ns(self) -> int:
        return self.window.start_ns

    @property
    def end_ns(self) -> int:
        return self.window.end_ns

    def fraction(self, ns: float) -> float:
        """``ns`` as a fraction of the steady-state window (0 when the window is empty)."""
        return float(ns) / self.window_ns if self.window_ns > 0 else 0.0

    def cached(self, key: Any, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def run_cached(self, key: Any, fn: Callable[[], Any]) -> Any:
        """``cached`` for facts of the whole run (``run_trace``), shared by the contexts of its ranks."""
        if key not in self._run_cache:
            self._run_cache[key] = fn()
        return self._run_cache[key]

    def severity(self, analyzer: str, fraction: float) -> str:
        return self.config.severity(fraction, analyzer)

    def rel_us(self, t_ns: int) -> float:
        """A time as microseconds after the start of the steady-state window (for evidence)."""
        return round((int(t_ns) - self.start_ns) / 1e3, 1)

    # ------------------------------------------------------------------ kernel names
    def name_mask(self, pattern: str, frame: pd.DataFrame | None = None, column: str = "kname") -> np.ndarray:
        """Boolean mask: rows of ``frame`` (default: steady kernels) whose ``column`` matches the regex.

        The regex runs once per distinct name (names are categoricals), then maps back by code.
        """
        frame = self.kernels if frame is None else frame
        key = ("mask", pattern, id(frame), column)

        def compute():
            rx = re.compile(pattern, re.I)
            return per_value(frame[column], lambda v: bool(rx.search(v)), dtype=bool, missing=False)
        return self.cached(key, compute)

    def name_map(self, fn: Callable[[str], Any], key: str, frame: pd.DataFrame | None = None,
                 column: str = "kname", dtype: type | str = object) -> np.ndarray:
        """``fn`` applied once per distinct name of ``column``, mapped back to every row."""
        frame = self.kernels if frame is None else frame

        return self.cached(("map", key, id(frame), column), lambda: per_value(frame[column], fn, dtype=dtype))

    def kname_at(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """Kernel names (str) of the given rows of ctx.kernels, without converting the whole column."""
        col = self.kernels["kname"]
        cats = np.asarray(col.cat.categories, dtype=object)
        return cats[col.cat.codes.to_numpy()[np.asarray(rows, dtype=np.int64)]]

    # ------------------------------------------------------------------ joins
    def launches(self) -> pd.DataFrame:
        """Steady kernels and memops with their launch API call: one row per GPU op.

        Columns: is_kernel, row (index in ctx.kernels / ctx.memops), start_ns, end_ns, stream_id,
        correlation_id, launch_start_ns, launch_end_ns, thread_id (-1 / NaN-free ints when unmatched).
        """
        def compute():
            k = self.kernels
            m = self.memops
            ops = pd.DataFrame({
                "is_kernel": np.r_[np.ones(len(k), bool), np.zeros(len(m), bool)],
                "row": np.r_[np.arange(len(k)), np.arange(len(m))],
                "start_ns": np.r_[k["start_ns"].to_numpy(np.int64), m["start_ns"].to_numpy(np.int64)],
                "end_ns": np.r_[k["end_ns"].to_numpy(np.int64), m["end_ns"].to_numpy(np.int64)],
                "stream_id": np.r_[k["stream_id"].to_numpy(np.int64), m["stream_id"].to_numpy(np.int64)],
                "correlation_id": np.r_[k["correlation_id"].to_numpy(np.int64), m["correlation_id"].to_numpy(np.int64)],
            })
            # Join on correlation id by sorting (the first API call of each id wins): a hash join of
            # ten million ids costs several times more.
            api = self.trace.api_calls
            row = first_match(api["correlation_id"].to_numpy(np.int64), ops["correlation_id"].to_numpy(np.int64))
            ok = row >= 0
            src = np.clip(row, 0, None)
            for col, out in (("start_ns", "launch_start_ns"), ("end_ns", "launch_end_ns"), ("thread_id", "thread_id")):
                vals = api[col].to_numpy(np.int64)
                ops[out] = np.where(ok, vals[src] if len(vals) else -1, -1)
            ops["launched"] = ok
            return ops.sort_values("start_ns", kind="stable").reset_index(drop=True)
        return self.cached("launches", compute)

    def kernel_ops(self, op_names: tuple[str, ...]) -> np.ndarray:
        """For each steady kernel, the index (into ctx.ops) of the CPU op named in ``op_names`` that
        launched it (its launch call lies inside the op on the same thread; the latest-starting such op),
        or -1. All -1 without shapes."""
        def compute():
            out = np.full(len(self.kernels), -1, dtype=np.int64)
            if self.ops is None or self.ops.empty or self.kernels.empty:
                return out
            ops = self.ops[self.ops["name"].isin(op_names)]
            if ops.empty:
                return out
            la = self.launches()
            la = la[la["is_kernel"] & la["launched"]]
            for tid, grp in la.groupby("thread_id"):
                o = ops[ops["thread_id"].to_numpy() == tid].sort_values("start_ns", kind="stable")
                if o.empty:
                    continue
                starts = o["start_ns"].to_numpy(np.int64)
                ends = o["end_ns"].to_numpy(np.int64)
                t = grp["launch_start_ns"].to_numpy(np.int64)
                j = np.searchsorted(starts, t, side="right") - 1
                good = (j >= 0) & (ends[np.clip(j, 0, None)] >= t)
                out[grp["row"].to_numpy()[good]] = o.index.to_numpy()[j[good]]
            return out
        return self.cached(("kernel_ops", op_names), compute)

    def op_facts(self, fn: Callable[[str, list, list], tuple], key: str, columns: tuple[str, ...]) -> pd.DataFrame:
        """``fn(name, input_dims, input_types) -> tuple`` for every row of ctx.ops (same index), called once
        per distinct (name, dims, types): shapes repeat every step, so a million ops are a few calls."""
        def compute():
            ops = self.ops
            if ops is None or ops.empty:
                return pd.DataFrame(columns=list(columns))
            names = ops["name"].astype(str).to_numpy(dtype=object)
            skey = ops["shape_key"].to_numpy()  # dense codes 0..K-1, set by _ops_for_rank
            _, first = np.unique(skey, return_index=True)  # the first op of each key
            dims, types = ops["input_dims"].to_numpy(dtype=object), ops["input_types"].to_numpy(dtype=object)
            table = pd.DataFrame([fn(str(names[i]), list(dims[i] or []), list(types[i] or [])) for i in first],
                                 columns=list(columns))
            return table.iloc[skey].set_index(ops.index)
        return self.cached(("op_facts", key), compute)

    def busy_ns(self) -> int:
        """Union of steady kernel and memop time (the GPU is busy when any of them runs)."""
        def compute():
            return union_ns(np.r_[self.kernels["start_ns"].to_numpy(np.int64), self.memops["start_ns"].to_numpy(np.int64)],
                            np.r_[self.kernels["end_ns"].to_numpy(np.int64), self.memops["end_ns"].to_numpy(np.int64)],
                            self.start_ns, self.end_ns)
        return self.cached("busy_ns", compute)


def _clip(df: pd.DataFrame, lo: int, hi: int) -> pd.DataFrame:
    s = df["start_ns"].to_numpy(np.int64)
    e = df["end_ns"].to_numpy(np.int64)
    keep = (e > lo) & (s < hi) if hi > lo else np.zeros(len(df), bool)
    rows = np.nonzero(keep)[0]
    start = np.maximum(s[rows], lo)
    if len(start) > 1 and (np.diff(start) < 0).any():  # readers usually give start order: skip the sort then
        rows = rows[np.argsort(start, kind="stable")]
        start = np.maximum(s[rows], lo)
    # Column by column: one copy of each kept column, no block consolidation of a million-row frame.
    cols = {c: (df[c].array.take(rows) if isinstance(df[c].dtype, pd.CategoricalDtype) else df[c].to_numpy()[rows])
            for c in df.columns}
    cols["start_ns"] = start
    cols["end_ns"] = np.minimum(e[rows], hi)
    cols["dur_ns"] = cols["end_ns"] - start
    cols["trace_row"] = rows
    return pd.DataFrame(cols, copy=False)


def _codes_and_categories(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype("category")
    cats = np.asarray(col.cat.categories.astype(str), dtype=object)
    return col.cat.codes.to_numpy().astype(np.int64), np.r_[cats, np.array([""], dtype=object)]


def _kernel_names(k: pd.DataFrame) -> pd.Categorical:
    """The most informative name of each kernel: the demangled name when present, else the name.

    Works on distinct (demangled, name) pairs only, so millions of rows stay cheap.
    """
    dc, dcat = _codes_and_categories(k["demangled_name"])
    nc, ncat = _codes_and_categories(k["name"])
    dc = np.where(dc < 0, len(dcat) - 1, dc)
    nc = np.where(nc < 0, len(ncat) - 1, nc)
    pair = dc * (len(ncat) + 1) + nc
    uniq, inverse = np.unique(pair, return_inverse=True)
    names = [dcat[u // (len(ncat) + 1)] or ncat[u % (len(ncat) + 1)] for u in uniq]
    cats, per_pair = np.unique(np.array(names, dtype=object), return_inverse=True)
    return pd.Categorical.from_codes(per_pair[inverse].ravel(), categories=list(cats))


def _device_name(trace: Trace, rank: int, kernels: pd.DataFrame) -> tuple[str, float]:
    d = trace.devices
    if d.empty:
        return "", float("nan")
    if len(d) > 1 and len(kernels):
        dev = int(kernels["device_id"].mode().iloc[0])
        match = d[d["device_id"] == dev]
        if len(match):
            d = match
    row = d.iloc[0]
    return str(row["name"]), float(row["memory_bandwidth_bytes_per_s"])


def _decode_json(col: pd.Series) -> np.ndarray:
    """JSON texts -> Python values (lists), decoded once per distinct text; "" -> []."""
    codes, uniq = pd.factorize(col.to_numpy(dtype=object))
    out = np.empty(len(uniq), dtype=object)
    for i, u in enumerate(uniq):  # one by one: a list of equal-length lists would broadcast
        out[i] = json.loads(u) if u else []
    return out[codes] if len(codes) else np.empty(0, dtype=object)


def _ops_for_rank(trace: Trace, rank: int) -> pd.DataFrame | None:
    """The rank's ``cpu_ops`` with shapes decoded, or None when none of them has shapes."""
    ops = trace.cpu_ops
    if ops.empty:
        return None
    ops = ops[ops["rank"].to_numpy() == rank]
    if ops.empty or not (ops["input_dims"].to_numpy(dtype=object) != "").any():
        return None
    ops = ops.reset_index(drop=True)
    # Ops with equal name, dims and types get one key: per-shape facts are then computed once per key.
    key = (ops["name"].astype(str).to_numpy(dtype=object) + "\0" + ops["input_dims"].to_numpy(dtype=object)
           + "\0" + ops["input_types"].to_numpy(dtype=object))
    ops["shape_key"] = pd.factorize(key)[0]
    ops["input_dims"] = _decode_json(ops["input_dims"])
    ops["input_types"] = _decode_json(ops["input_types"])
    return ops


def build_context(trace: Trace, rank: int, config: Config, rank_view: Trace | None = None,
                  window: StepWindow | None = None, run_windows: dict[int, StepWindow] | None = None,
                  run_cache: dict | None = None) -> AnalysisContext:
    """The context of one rank of ``trace`` (``rank_view``: an already filtered view, to avoid refiltering;
    ``window``: the rank's steady-state window when already found; ``run_windows``: every rank's;
    ``run_cache``: one dict shared by the contexts of the run's ranks)."""
    t = rank_view if rank_view is not None else trace.for_rank(rank)
    if window is None:
        window = find_steps(t.ranges, t.kernels)
    lo, hi = window.start_ns, window.end_ns
    k = _clip(t.kernels, lo, hi)
    k["kname"] = _kernel_names(k) if len(k) else pd.Categorical([])
    m = _clip(t.memops, lo, hi)
    a = t.api_calls
    a = a[(a["end_ns"].to_numpy() > lo) & (a["start_ns"].to_numpy() < hi)].reset_index(drop=True)
    name, reported_bw = _device_name(t, rank, t.kernels)
    ceilings = config.ceilings if config.ceilings is not None else trace.meta.get("ceilings")
    peaks = peaks_for(name, ceilings, reported_bw)
    return AnalysisContext(rank=rank, trace=t, window=window, kernels=k, memops=m, api_calls=a,
                           device_name=name, peaks=peaks, config=config, ops=_ops_for_rank(t, rank), run_trace=trace,
                           run_windows=run_windows, _run_cache={} if run_cache is None else run_cache)
