"""Timeline resampling: what to draw for a visible time range, however many kernels the run has.

``TimelineIndex.from_trace(trace)`` sorts every GPU op (kernels and memcpy/memset, on per
rank/device/stream lanes), host range (NVTX / record_function, per rank/thread/depth lanes) and
collective (per rank) once. A query for a visible range ``[lo, hi)`` then costs O(lanes x categories x
log n), independent of how many events fall inside it:

* ``count(lo, hi)``: events overlapping the range (two binary searches per lane and category);
* ``busy(lo, hi, bins)``: the busy fraction of each (lane, category) in each of ``bins`` equal bins,
  from prefix sums of the sorted starts and ends: the time covered by events before ``t`` is
  ``C(t) = sum_{s<t}(t - s) - sum_{e<t}(t - e)``, so the busy time of a bin is ``C(b1) - C(b0)``
  (exact, overlapping events included: their times add up, the fraction is clipped to 1);
* ``events(lo, hi)``: the events themselves (for the exact view; callers only ask when ``count`` is
  small). Candidates are found per lane and category by binary search on the start, reaching back by
  the longest event of that group.

All times inside the index are int64 nanoseconds relative to ``origin_ns`` (the first event), which
keeps prefix sums of a million events over hours well inside int64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gpudoctor.model.schema import KERNEL_CATEGORIES
from gpudoctor.model.trace import Trace

# Display order of categories: kernel categories, then memory operations, host ranges, collectives.
MEMOP_CATEGORIES = ("memcpy", "memset")
CATEGORIES = tuple(KERNEL_CATEGORIES) + MEMOP_CATEGORIES + ("nvtx", "api", "nccl")
GPU_CATEGORIES = tuple(KERNEL_CATEGORIES) + MEMOP_CATEGORIES
MAX_RANGE_DEPTH = 4  # deeper host ranges are folded into this depth's lane
MAX_API_THREADS = 2  # CUDA API calls of threads beyond the busiest ones share one lane per rank


@dataclass(frozen=True)
class Lane:
    rank: int
    kind: str  # gpu | nvtx | api | nccl
    label: str


@dataclass
class Events:
    """Events of one query, in lane then start order. Times relative to the index origin."""

    lane: np.ndarray
    category: np.ndarray  # codes into CATEGORIES
    start: np.ndarray
    end: np.ndarray
    label: np.ndarray  # object: hover text head (kernel name, range text, op)
    is_gpu: np.ndarray  # kernels and memops (what the kernel budget counts)
    corr: np.ndarray  # correlation id of kernels, memops and API calls (-1 for others)

    def __len__(self) -> int:
        return len(self.start)


class TimelineIndex:
    """Sorted, prefix-summed events of one run. Build once per run; query per zoom/pan."""

    def __init__(self, lanes: list[Lane], lane: np.ndarray, cat: np.ndarray, start: np.ndarray,
                 end: np.ndarray, label_codes: np.ndarray, labels: list[str], origin_ns: int,
                 counters: pd.DataFrame | None = None, corr: np.ndarray | None = None):
        self.lanes = lanes
        self.origin_ns = int(origin_ns)
        self.labels = np.asarray(labels, dtype=object)
        n = len(start)
        ncat = len(CATEGORIES)
        group = lane.astype(np.int64) * ncat + cat.astype(np.int64)
        order = np.lexsort((start, group))
        self._group = group[order]
        self._start = start[order].astype(np.int64)
        self._end = end[order].astype(np.int64)
        self._label = label_codes[order]
        self._corr = (corr if corr is not None else np.full(n, -1, np.int64))[order].astype(np.int64)
        gid, first = np.unique(self._group, return_index=True)
        bounds = np.r_[first, n].astype(np.int64)
        self.groups = [(int(g) // ncat, int(g) % ncat, int(bounds[i]), int(bounds[i + 1])) for i, g in enumerate(gid)]
        # Ends sorted within each group (a different order than starts when events overlap).
        end_order = np.lexsort((self._end, self._group))
        self._end_sorted = self._end[end_order]
        # Prefix sums (exclusive) over the whole array; a group's sum is a difference of two entries.
        self._cs_start = np.r_[0, np.cumsum(self._start)]
        self._cs_end = np.r_[0, np.cumsum(self._end_sorted)]
        dur = self._end - self._start
        self._maxdur = np.array([int(dur[a:b].max()) if b > a else 0 for _, _, a, b in self.groups], dtype=np.int64)
        self.n_events = n
        self.n_gpu = int(np.isin(self._group % ncat, [CATEGORIES.index(c) for c in GPU_CATEGORIES]).sum())
        if n:
            self.lo, self.hi = int(self._start.min()), int(self._end.max())
        else:
            self.lo, self.hi = 0, 1
        self.counters = counters if counters is not None else pd.DataFrame(columns=["rank", "device_id", "t", "name", "value"])
        self.categories_present = sorted({c for _, c, _, _ in self.groups})
        # API calls by (rank, correlation id): where a kernel's launch arrow starts
        api = CATEGORIES.index("api")
        is_api = (self._group % ncat == api) & (self._corr >= 0)
        lane_rank = np.array([ln.rank for ln in lanes] or [0], dtype=np.int64)
        ai = np.nonzero(is_api)[0]
        key = lane_rank[self._group[ai] // ncat] * (1 << 40) + self._corr[ai]
        o = np.argsort(key, kind="stable")
        self._api_key, self._api_pos = key[o], ai[o]
        self._lane_rank = lane_rank

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_trace(cls, trace: Trace) -> "TimelineIndex":
        k, m, r, c = trace.kernels, trace.memops, trace.ranges, trace.collectives
        starts = [k["start_ns"].to_numpy(np.int64), m["start_ns"].to_numpy(np.int64),
                  r["start_ns"].to_numpy(np.int64), c["start_ns"].to_numpy(np.int64)]
        allstart = np.concatenate(starts) if sum(len(s) for s in starts) else np.zeros(0, np.int64)
        origin = int(allstart.min()) if len(allstart) else 0
        api_thread = _api_lane_threads(trace.api_calls)
        lanes, lane_of = _lanes(trace, api_thread)
        labels, arrays = _concat_parts(_event_parts(trace, lane_of, api_thread), origin)
        cnt = trace.counters
        counters = pd.DataFrame({"rank": cnt["rank"].to_numpy(), "device_id": cnt["device_id"].to_numpy(),
                                 "t": cnt["ts_ns"].to_numpy(np.int64) - origin, "name": cnt["name"].astype(str).to_numpy(),
                                 "value": cnt["value"].to_numpy(np.float64)}).sort_values("t", kind="stable")
        return cls(lanes, *arrays[:4], arrays[4], labels, origin, counters=counters.reset_index(drop=True), corr=arrays[5])

    # ------------------------------------------------------------------ queries
    @property
    def extent(self) -> tuple[int, int]:
        return self.lo, self.hi

    def clamp(self, lo: float | None, hi: float | None) -> tuple[int, int]:
        """A valid query range (relative ns) inside the extent; None means the full extent."""
        if lo is None or hi is None or not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
            return self.lo, self.hi
        return int(lo), max(int(hi), int(lo) + 1)

    def count(self, lo: int, hi: int, gpu_only: bool = False) -> int:
        """Events overlapping [lo, hi)."""
        total = 0
        gpu = {CATEGORIES.index(c) for c in GPU_CATEGORIES}
        for _, cat, a, b in self.groups:
            if gpu_only and cat not in gpu:
                continue
            n_start_before_hi = np.searchsorted(self._start[a:b], hi, side="left")
            n_end_before_lo = np.searchsorted(self._end_sorted[a:b], lo, side="right")
            total += int(n_start_before_hi - n_end_before_lo)
        return total

    def _covered(self, a: int, b: int, t: np.ndarray) -> np.ndarray:
        """C(t) for group [a, b): time covered by its events before each t (int64, exact)."""
        s = self._start[a:b]
        e = self._end_sorted[a:b]
        ns = np.searchsorted(s, t, side="left")
        ne = np.searchsorted(e, t, side="left")
        ss = self._cs_start[a + ns] - self._cs_start[a]
        se = self._cs_end[a + ne] - self._cs_end[a]
        return t * ns - ss - (t * ne - se)

    def busy(self, lo: int, hi: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
        """(edges[bins+1], frac[lanes, categories, bins]) busy fraction per lane, category and bin."""
        bins = max(1, int(bins))
        edges = np.linspace(lo, hi, bins + 1).round().astype(np.int64)
        edges = np.maximum.accumulate(edges)
        width = np.maximum(np.diff(edges), 1).astype(np.float64)
        frac = np.zeros((len(self.lanes), len(CATEGORIES), bins), dtype=np.float64)
        for lane, cat, a, b in self.groups:
            c = self._covered(a, b, edges)
            frac[lane, cat] = np.diff(c) / width
        np.clip(frac, 0.0, 1.0, out=frac)
        return edges, frac

    def events(self, lo: int, hi: int, limit: int | None = None) -> Events:
        """Events overlapping [lo, hi), in lane order. With ``limit``, the longest ``limit`` of them."""
        idx = []
        for g, (_, _, a, b) in enumerate(self.groups):
            s = self._start[a:b]
            i0 = np.searchsorted(s, lo - self._maxdur[g], side="left")
            i1 = np.searchsorted(s, hi, side="left")
            if i1 <= i0:
                continue
            cand = np.arange(a + i0, a + i1)
            cand = cand[self._end[cand] > lo]
            idx.append(cand)
        sel = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        if limit is not None and len(sel) > limit:
            dur = np.minimum(self._end[sel], hi) - np.maximum(self._start[sel], lo)
            keep = np.argpartition(-dur, limit - 1)[:limit]
            sel = np.sort(sel[keep])
        ncat = len(CATEGORIES)
        cat = (self._group[sel] % ncat).astype(np.int16)
        gpu = np.isin(cat, [CATEGORIES.index(c) for c in GPU_CATEGORIES])
        return Events(lane=(self._group[sel] // ncat).astype(np.int32), category=cat, start=self._start[sel],
                      end=self._end[sel], label=self.labels[self._label[sel]], is_gpu=gpu, corr=self._corr[sel])

    def launches(self, ev: Events) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the GPU events of ``ev`` launched by a recorded API call: (event positions in ``ev``, the
        call's lane, the call's start), matched by rank and correlation id."""
        sel = np.nonzero(ev.is_gpu & (ev.corr >= 0))[0]
        if not len(sel) or not len(self._api_key):
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        key = self._lane_rank[ev.lane[sel]] * (1 << 40) + ev.corr[sel]
        i = np.clip(np.searchsorted(self._api_key, key), 0, len(self._api_key) - 1)
        ok = self._api_key[i] == key
        pos = self._api_pos[i[ok]]
        return sel[ok], self._group[pos] // len(CATEGORIES), self._start[pos]

    def counter_series(self, lo: int, hi: int, bins: int, name: str | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(label, t, value) per counter (rank, device, name) inside [lo, hi), of one counter ``name``
        or all; min/max per bin when dense."""
        out = []
        c = self.counters
        if name is not None:
            c = c[c["name"].to_numpy() == name]
        if c.empty:
            return out
        for (rank, dev, cname), g in c.groupby(["rank", "device_id", "name"], sort=True):
            t = g["t"].to_numpy()
            v = g["value"].to_numpy()
            i0 = max(np.searchsorted(t, lo, side="left") - 1, 0)
            i1 = min(np.searchsorted(t, hi, side="right") + 1, len(t))
            t, v = t[i0:i1], v[i0:i1]
            if len(t) > 2 * bins:  # keep each bin's min and max so spikes survive
                b = np.clip(((t - lo) * bins // max(hi - lo, 1)).astype(np.int64), 0, bins - 1)
                df = pd.DataFrame({"b": b, "t": t, "v": v})
                imin = df.groupby("b")["v"].idxmin().to_numpy()
                imax = df.groupby("b")["v"].idxmax().to_numpy()
                keep = np.unique(np.r_[imin, imax])
                t, v = t[keep], v[keep]
            label = f"rank {rank} {cname}" + (f" GPU {dev}" if dev >= 0 else "")
            out.append((label, t, v))
        return out


def _stream_purposes(k: pd.DataFrame, m: pd.DataFrame) -> dict[tuple, str]:
    """What each (rank, device, stream) runs: "NCCL" when most of its kernel time is communication
    kernels, "copies" when it runs only memcpy/memset, else "compute"."""
    out: dict[tuple, str] = {}
    if len(k):
        d = pd.DataFrame({"rank": k["rank"].to_numpy(), "dev": k["device_id"].to_numpy(), "s": k["stream_id"].to_numpy(),
                          "d": (k["end_ns"] - k["start_ns"]).to_numpy(),
                          "comm": (k["category"].astype(str).to_numpy() == "communication")})
        d["cd"] = d["d"] * d["comm"]
        g = d.groupby(["rank", "dev", "s"], sort=False)[["d", "cd"]].sum()
        for key, row in g.iterrows():  # one row per stream
            out[key] = "NCCL" if row["cd"] > 0.5 * row["d"] else "compute"
    if len(m):
        for key in set(zip(m["rank"].tolist(), m["device_id"].tolist(), m["stream_id"].tolist())) - set(out):
            out[key] = "copies"
    return out


def _api_lane_threads(a: pd.DataFrame) -> dict[tuple, int]:
    """(rank, thread) -> the thread id of its CUDA API lane: the busiest MAX_API_THREADS threads of a rank
    get a lane each, the others share one (-1)."""
    if a.empty:
        return {}
    n = pd.DataFrame({"rank": a["rank"].to_numpy(), "t": a["thread_id"].to_numpy()}).value_counts()
    out = {}
    for (rank, t), _ in n.items():  # in descending count order
        mine = sum(1 for (rk, _), v in out.items() if rk == rank and v != -1)
        out[(int(rank), int(t))] = int(t) if mine < MAX_API_THREADS else -1
    return out


def _codes_via(col: pd.Series, fn, fill: int) -> np.ndarray:
    """``fn`` of each row's value, computed once per distinct value (categoricals: per category)."""
    c = col if isinstance(col.dtype, pd.CategoricalDtype) else col.astype(str).astype("category")
    per = np.array([fn(str(x)) for x in c.cat.categories] + [fill], dtype=np.int64)
    codes = c.cat.codes.to_numpy()
    return per[np.where(codes >= 0, codes, len(per) - 1)]


def _bytes_text(b: np.ndarray) -> pd.Series:
    b = np.asarray(b, dtype=np.float64)
    out = np.where(b >= 2**30, np.char.add(np.round(b / 2**30, 2).astype(str), " GiB"),
                   np.where(b >= 2**20, np.char.add(np.round(b / 2**20, 2).astype(str), " MiB"),
                            np.where(b >= 2**10, np.char.add(np.round(b / 2**10, 1).astype(str), " KiB"),
                                     np.char.add(np.maximum(b, 0).astype(np.int64).astype(str), " B"))))
    return pd.Series(np.where(b < 0, "", out), dtype=object)


def _lanes(trace: Trace, api_thread: dict) -> tuple[list[Lane], dict[tuple, int]]:
    """Lanes in display order: per rank, host ranges, CUDA API, then GPU streams, then collectives; and the
    lane of each key."""
    k, m, r, c = trace.kernels, trace.memops, trace.ranges, trace.collectives
    lanes: list[Lane] = []
    lane_of: dict[tuple, int] = {}
    ranks = sorted(set(k["rank"].unique().tolist()) | set(m["rank"].unique().tolist())
                   | set(r["rank"].unique().tolist()) | set(c["rank"].unique().tolist()))
    purpose = _stream_purposes(k, m)
    # Lane keys in display order: per rank, host ranges, CUDA API, then GPU streams, then collectives.
    for rank in ranks:
        who = f"rank {rank} · " if len(ranks) > 1 else ""
        rr = r[r["rank"].to_numpy() == rank]
        keys = sorted(set(zip(rr["thread_id"].tolist(), np.minimum(rr["depth"].to_numpy(), MAX_RANGE_DEPTH).tolist())))
        threads = sorted({t for t, _ in keys})
        nvtx = "NVTX" if (~rr["domain"].astype(str).isin(["record_function", "profiler_step"])).any() else "ranges"
        for t, d in keys:
            tl = f" thread {threads.index(t) + 1}" if len(threads) > 1 else ""
            lane_of[(rank, "nvtx", t, d)] = len(lanes)
            lanes.append(Lane(rank, "nvtx", f"{who}{nvtx}{tl}" + (f" level {d + 1}" if d else "")))
        at = sorted({v for (rk, _), v in api_thread.items() if rk == rank}, key=lambda v: (v == -1, v))
        for j, t in enumerate(at):
            lane_of[(rank, "api", t)] = len(lanes)
            tl = " (other threads)" if t == -1 else (f" thread {j + 1}" if len(at) > 1 else "")
            lanes.append(Lane(rank, "api", f"{who}CUDA API{tl}"))
        kk = k[k["rank"].to_numpy() == rank]
        mm = m[m["rank"].to_numpy() == rank]
        streams = sorted(set(zip(kk["device_id"].tolist(), kk["stream_id"].tolist()))
                         | set(zip(mm["device_id"].tolist(), mm["stream_id"].tolist())))
        devices = {d for d, _ in streams}
        for dev, s in streams:
            lane_of[(rank, "gpu", dev, s)] = len(lanes)
            gpu = f"GPU {dev} " if len(devices) > 1 or len(ranks) > 1 else ""
            lanes.append(Lane(rank, "gpu", f"{who}{gpu}{purpose.get((rank, dev, s), 'compute')} (stream {s})"))
        if (c["rank"].to_numpy() == rank).any():
            lane_of[(rank, "nccl")] = len(lanes)
            lanes.append(Lane(rank, "nccl", f"{who}NCCL calls"))
    return lanes, lane_of


def _lane_codes(lane_of: dict[tuple, int], key_of: Callable[..., tuple], *cols: np.ndarray) -> np.ndarray:
    """Each row's lane: ``key_of`` (a lane_of key from one row's values) is called once per
    distinct row, found by factorizing the integer columns (no per-row Python)."""
    if not len(cols[0]):
        return np.zeros(0, np.int32)
    comb = np.zeros(len(cols[0]), np.int64)
    for col in cols:
        codes, uniq = pd.factorize(col)
        comb = comb * len(uniq) + codes
    codes, uniq = pd.factorize(comb)
    first = np.empty(len(uniq), np.int64)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)  # the first row of each distinct key
    table = np.array([lane_of[key_of(*(int(col[i]) for col in cols))] for i in first], np.int32)
    return table[codes]


def _event_parts(trace: Trace, lane_of: dict[tuple, int], api_thread: dict) -> list[tuple]:
    """Per table (kernels, memops, ranges, API calls, collectives): lane, category, start, end, label,
    correlation id."""
    k, m, r, c, a = trace.kernels, trace.memops, trace.ranges, trace.collectives, trace.api_calls

    def lane_codes(key_of: Callable[..., tuple], *cols: np.ndarray) -> np.ndarray:
        return _lane_codes(lane_of, key_of, *cols)

    cat_index = {c: i for i, c in enumerate(CATEGORIES)}
    parts = []
    # kernels
    if len(k):
        kc = _codes_via(k["category"], lambda x: cat_index.get(x, cat_index["other"]), cat_index["other"])
        parts.append((
            lane_codes(lambda rk, dev, st: (rk, "gpu", dev, st), k["rank"].to_numpy(), k["device_id"].to_numpy(),
                       k["stream_id"].to_numpy()),
            kc.astype(np.int16), k["start_ns"].to_numpy(np.int64), k["end_ns"].to_numpy(np.int64),
            k["name"], k["correlation_id"].to_numpy(np.int64)))
    if len(m):
        mc = np.where(m["kind"].astype(str).to_numpy() == "memset", cat_index["memset"], cat_index["memcpy"]).astype(np.int16)
        parts.append((
            lane_codes(lambda rk, dev, st: (rk, "gpu", dev, st), m["rank"].to_numpy(), m["device_id"].to_numpy(),
                       m["stream_id"].to_numpy()),
            mc, m["start_ns"].to_numpy(np.int64), m["end_ns"].to_numpy(np.int64),
            pd.Series(m["kind"].astype(str).to_numpy() + " " + _bytes_text(m["bytes"].to_numpy()).to_numpy()).astype("category"),
            m["correlation_id"].to_numpy(np.int64)))
    if len(r):
        parts.append((
            lane_codes(lambda rk, t, d: (rk, "nvtx", t, d), r["rank"].to_numpy(), r["thread_id"].to_numpy(),
                       np.minimum(r["depth"].to_numpy(), MAX_RANGE_DEPTH)),
            np.full(len(r), cat_index["nvtx"], np.int16), r["start_ns"].to_numpy(np.int64),
            r["end_ns"].to_numpy(np.int64), r["text"], np.full(len(r), -1, np.int64)))
    if len(a):
        parts.append((
            lane_codes(lambda rk, t: (rk, "api", api_thread.get((rk, t), -1)), a["rank"].to_numpy(), a["thread_id"].to_numpy()),
            np.full(len(a), cat_index["api"], np.int16), a["start_ns"].to_numpy(np.int64),
            a["end_ns"].to_numpy(np.int64), a["name"], a["correlation_id"].to_numpy(np.int64)))
    if len(c):
        parts.append((
            lane_codes(lambda rk: (rk, "nccl"), c["rank"].to_numpy()),
            np.full(len(c), cat_index["nccl"], np.int16), c["start_ns"].to_numpy(np.int64),
            c["end_ns"].to_numpy(np.int64),
            pd.Series(c["op"].astype(str).to_numpy() + " " + _bytes_text(c["bytes"].to_numpy()).to_numpy()).astype("category"),
            np.full(len(c), -1, np.int64)))
    return parts


def _concat_parts(parts: list[tuple], origin: int) -> tuple[list[str], tuple]:
    """All parts as one set of arrays (times from ``origin``) and one label list."""
    labels: list[str] = []
    codes_all, lane_all, cat_all, s_all, e_all, corr_all = [], [], [], [], [], []
    for lane, cat, s, e, lab, corr in parts:
        lab = lab if isinstance(lab.dtype, pd.CategoricalDtype) else lab.astype(str).astype("category")
        codes = lab.cat.codes.to_numpy().astype(np.int64)
        cats = [str(x) for x in lab.cat.categories]
        codes = np.where(codes >= 0, codes + len(labels), -1)
        labels.extend(cats)
        codes_all.append(codes)
        lane_all.append(lane)
        cat_all.append(cat)
        s_all.append(s - origin)
        e_all.append(np.maximum(e, s) - origin)
        corr_all.append(corr)
    labels.append("")
    if parts:
        codes = np.concatenate(codes_all)
        codes = np.where(codes >= 0, codes, len(labels) - 1)
        arrays = (np.concatenate(lane_all), np.concatenate(cat_all), np.concatenate(s_all), np.concatenate(e_all), codes,
                  np.concatenate(corr_all))
    else:
        arrays = (np.zeros(0, np.int32), np.zeros(0, np.int16), np.zeros(0, np.int64), np.zeros(0, np.int64),
                  np.zeros(0, np.int64), np.zeros(0, np.int64))
    return labels, arrays
