"""Reader for CUDA caching-allocator snapshots (``torch.cuda.memory._dump_snapshot(path)``).

``read(path, rank=None) -> Trace``. The pickle is loaded by :mod:`gpudoctor.readers.safe_pickle`, which
refuses anything but plain data: a snapshot can never run code.

What a snapshot holds (PyTorch 2.1 .. 2.11; keys that are missing are treated as unknown):

- ``segments``: what the allocator reserved from the driver (one ``cudaMalloc`` each, or an expandable
  segment). Each has ``device, address, total_size, allocated_size, active_size, requested_size, stream,
  segment_type (small|large), segment_pool_id, is_expandable`` and ``blocks``: the pieces the segment is
  split into, each ``size, requested_size, state``; state is ``active_allocated`` (a live tensor),
  ``active_pending_free`` (freed by Python, waiting for the stream) or ``inactive`` (cached free space).
- ``device_traces``: per device, the recorded history since ``_record_memory_history`` was enabled:
  ``action`` (alloc, free_requested, free_completed, segment_alloc, segment_free, segment_map,
  segment_unmap, snapshot, oom), ``addr``, ``size``, ``stream``, ``time_us`` (UTC epoch microseconds;
  absent before PyTorch 2.1), ``frames``.
- ``allocator_settings`` (PYTORCH_CUDA_ALLOC_CONF, expandable_segments, ...), ``external_annotations``.
  Very old PyTorch (``torch.cuda.memory_snapshot()``) wrote only the list of segments: accepted too.

Into the trace model:

- ``memory_events`` (source ``torch_snapshot``): ``alloc`` (+size) and ``free`` (-size, at
  ``free_completed``: when the memory became reusable) of blocks, and ``segment_alloc`` (+size) /
  ``segment_free`` (-size) of segments (segment_map / segment_unmap of expandable segments count as
  segment_alloc / segment_free). Sum ``bytes`` over alloc/free for allocated memory, over segment_* for
  reserved memory; never over both. ``free_requested`` rows are not kept (the free_completed row is the
  free); trace entries without ``time_us`` are counted in ``dropped``.
- ``counters`` at the snapshot time (the last ``snapshot`` trace entry, else the last trace entry) when
  the trace has times: ``memory_reserved_bytes``, ``memory_allocated_bytes``, ``memory_active_bytes``,
  ``memory_requested_bytes``, ``memory_inactive_split_bytes``, ``memory_free_bytes``,
  ``memory_largest_free_block_bytes`` per device.
- ``meta["memory_snapshot"]``: the allocator's state at the snapshot: ``devices`` (per device, see
  ``summarize``), ``segments`` (one compact dict per segment, see ``segment_rows``: no stack frames),
  ``time_ns``, ``rank``, ``trace_entries``, ``oom_events``, ``allocator_settings``.
- ``ranks``: one row, ``source_format`` ``torch_memory_snapshot``; ``devices``: the device ids seen.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from gpudoctor.errors import InputError
from gpudoctor.model.trace import Trace, conform
from gpudoctor.readers import rank_from_filename, safe_pickle

SOURCE_FORMAT = "torch_memory_snapshot"
SOURCE = "torch_snapshot"

R_NO_TIME = "snapshot trace entry without time_us"
R_BAD_ENTRY = "snapshot trace entry not understood"

BLOCK_STATES = ("active_allocated", "active_pending_free", "inactive")
_EVENT_KIND = {"alloc": "alloc", "free_completed": "free", "segment_alloc": "segment_alloc",
               "segment_free": "segment_free", "segment_map": "segment_alloc", "segment_unmap": "segment_free"}
_IGNORED_ACTIONS = {"free_requested", "snapshot", "oom"}

# Log2 buckets of the live-allocation histogram: "<=4KiB", ... , ">1GiB".
_HIST_EDGES = [4 << 10, 64 << 10, 1 << 20, 2 << 20, 8 << 20, 32 << 20, 128 << 20, 512 << 20, 1 << 30]


def _fmt_size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


HIST_LABELS = [f"<={_fmt_size(e)}" for e in _HIST_EDGES] + [f">{_fmt_size(_HIST_EDGES[-1])}"]


def _int(x, default: int = -1) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return default
    try:
        return int(x)
    except (OverflowError, ValueError):
        return default


def _as_snapshot(data, path) -> dict:
    """The snapshot dict, or InputError when the pickle is something else."""
    if isinstance(data, list) and data and all(isinstance(s, dict) and "blocks" in s and "total_size" in s for s in data):
        return {"segments": data, "device_traces": []}  # torch.cuda.memory_snapshot() of old PyTorch
    if not isinstance(data, dict):
        raise InputError(path, f"not a CUDA memory snapshot: the pickle holds a {type(data).__name__}, "
                               "expected the dict written by torch.cuda.memory._dump_snapshot")
    if "segments" not in data:
        keys = ", ".join(sorted(map(str, data))[:6])
        raise InputError(path, f"not a CUDA memory snapshot: no 'segments' (keys: {keys or 'none'})")
    segs = data["segments"]
    if not isinstance(segs, list) or not all(isinstance(s, dict) for s in segs):
        raise InputError(path, "not a CUDA memory snapshot: 'segments' is not a list of segment dicts")
    traces = data.get("device_traces", [])
    if traces is None:
        traces = []
    if not isinstance(traces, list) or not all(isinstance(t, list) for t in traces):
        raise InputError(path, "not a CUDA memory snapshot: 'device_traces' is not a list per device")
    return data


def summarize(segments: list[dict]) -> dict[int, dict]:
    """Per device: the allocator's state (bytes, blocks, fragmentation, live allocation sizes).

    - reserved_bytes: sum of segment sizes (what the driver gave the allocator; ``memory_reserved``)
    - allocated_bytes: blocks in state active_allocated (``memory_allocated``)
    - active_bytes: allocated + active_pending_free
    - requested_bytes: what the program asked for in the live blocks (allocated - requested = rounding)
    - free_bytes: inactive blocks (cached, reusable by the allocator, not by other processes)
    - inactive_split_bytes: inactive blocks in segments that also hold active blocks (cannot be released
      by ``empty_cache``; torch's ``inactive_split_bytes``)
    - releasable_bytes: segments with no active block (``empty_cache`` would return them)
    - largest_free_block_bytes and free_fragmentation = 1 - largest free block / free bytes (0: all free
      space is one block; near 1: free space is in many pieces and a large request cannot use it)
    - live_allocation_sizes: [[size, count], ...] of active_allocated blocks, most bytes first
    - live_allocation_histogram: count of live allocations per size bucket (HIST_LABELS)
    - segments, segments_by_type, blocks, live_allocations, pools, expandable_segments
    """
    out: dict[int, dict] = {}
    for seg in segments:
        dev = _int(seg.get("device"), 0)
        _add_segment(out.setdefault(dev, _empty_device(dev)), seg)
    for d in out.values():
        _finish_device(d)
    return dict(sorted(out.items()))


def _empty_device(dev: int) -> dict:
    return {
        "device_id": dev, "reserved_bytes": 0, "allocated_bytes": 0, "active_bytes": 0,
        "requested_bytes": 0, "free_bytes": 0, "inactive_split_bytes": 0, "releasable_bytes": 0,
        "largest_free_block_bytes": 0, "segments": 0, "segments_by_type": {}, "blocks": 0,
        "live_allocations": 0, "_sizes": Counter(), "_pools": set(), "expandable_segments": 0,
    }


def _add_segment(d: dict, seg: dict) -> None:
    """One segment's bytes into its device's totals."""
    total = _int(seg.get("total_size"), 0)
    blocks = seg.get("blocks") if isinstance(seg.get("blocks"), list) else []
    d["reserved_bytes"] += max(total, 0)
    d["segments"] += 1
    st = str(seg.get("segment_type", "unknown"))
    d["segments_by_type"][st] = d["segments_by_type"].get(st, 0) + 1
    pool = seg.get("segment_pool_id")
    d["_pools"].add(tuple(pool) if isinstance(pool, (list, tuple)) else pool)
    d["expandable_segments"] += bool(seg.get("is_expandable"))
    if blocks:
        seg_active, seg_inactive = _add_blocks(d, blocks)
    else:  # a segment listed without blocks: trust its own totals
        alloc = max(_int(seg.get("allocated_size"), 0), 0)
        active = max(_int(seg.get("active_size"), alloc), alloc)
        d["allocated_bytes"] += alloc
        d["active_bytes"] += active
        d["requested_bytes"] += max(_int(seg.get("requested_size"), alloc), 0)
        d["free_bytes"] += max(total - active, 0)
        seg_active, seg_inactive = active, max(total - active, 0)
    if seg_active > 0:
        d["inactive_split_bytes"] += seg_inactive
    else:
        d["releasable_bytes"] += total


def _add_blocks(d: dict, blocks: list) -> tuple[int, int]:
    """A segment's blocks into its device's totals; returns the segment's (active, inactive) bytes."""
    seg_active = seg_inactive = 0
    for b in blocks:
        if not isinstance(b, dict):
            continue
        size = max(_int(b.get("size"), 0), 0)
        state = b.get("state")
        d["blocks"] += 1
        if state == "active_allocated":
            d["allocated_bytes"] += size
            d["active_bytes"] += size
            req = _int(b.get("requested_size"), size)
            d["requested_bytes"] += req if 0 <= req <= size else size
            d["live_allocations"] += 1
            d["_sizes"][size] += 1
            seg_active += size
        elif state == "active_pending_free":
            d["active_bytes"] += size
            seg_active += size
        else:
            d["free_bytes"] += size
            seg_inactive += size
            d["largest_free_block_bytes"] = max(d["largest_free_block_bytes"], size)
    return seg_active, seg_inactive


def _finish_device(d: dict) -> None:
    """Sizes, histogram, pools and fragmentation from the accumulated totals."""
    sizes: Counter = d.pop("_sizes")
    d["pools"] = len(d.pop("_pools"))
    d["live_allocation_sizes"] = [[int(s), int(c)] for s, c in
                                  sorted(sizes.items(), key=lambda sc: (-sc[0] * sc[1], -sc[0]))]
    hist = {lab: 0 for lab in HIST_LABELS}
    for s, c in sizes.items():
        hist[HIST_LABELS[int(np.searchsorted(_HIST_EDGES, s, side="left"))]] += c
    d["live_allocation_histogram"] = hist
    free = d["free_bytes"]
    d["free_fragmentation"] = round(1.0 - d["largest_free_block_bytes"] / free, 6) if free > 0 else 0.0


def segment_rows(segments: list[dict]) -> list[dict]:
    """One compact dict per segment (no frames, blocks summarized by state), ordered by device, address."""
    rows = []
    for seg in segments:
        blocks = [b for b in (seg.get("blocks") if isinstance(seg.get("blocks"), list) else []) if isinstance(b, dict)]
        by_state = Counter()
        bytes_by_state = Counter()
        largest_free = 0
        for b in blocks:
            st = b.get("state") if b.get("state") in BLOCK_STATES else "inactive"
            size = max(_int(b.get("size"), 0), 0)
            by_state[st] += 1
            bytes_by_state[st] += size
            if st == "inactive":
                largest_free = max(largest_free, size)
        pool = seg.get("segment_pool_id")
        rows.append({
            "device_id": _int(seg.get("device"), 0), "address": _int(seg.get("address"), -1),
            "total_size": _int(seg.get("total_size"), 0), "allocated_size": _int(seg.get("allocated_size"), -1),
            "active_size": _int(seg.get("active_size"), -1), "requested_size": _int(seg.get("requested_size"), -1),
            "stream": _int(seg.get("stream"), -1), "segment_type": str(seg.get("segment_type", "")),
            "pool_id": list(pool) if isinstance(pool, (list, tuple)) else pool,
            "is_expandable": bool(seg.get("is_expandable", False)),
            "blocks": len(blocks), "blocks_by_state": {k: int(v) for k, v in by_state.items()},
            "bytes_by_state": {k: int(v) for k, v in bytes_by_state.items()},
            "largest_free_block_bytes": largest_free,
        })
    rows.sort(key=lambda r: (r["device_id"], r["address"]))
    return rows


def _events(traces: list[list], rank: int) -> tuple[pd.DataFrame, dict[str, int], int | None, int]:
    """memory_events rows of the device traces; (rows, dropped by reason, snapshot time ns or None, ooms)."""
    dev_l, ts_l, addr_l, bytes_l, kind_l = [], [], [], [], []
    dropped: Counter = Counter()
    last_ts = None
    snap_ts = None
    ooms = 0
    for dev, entries in enumerate(traces):
        for e in entries:
            if not isinstance(e, dict):
                dropped[R_BAD_ENTRY] += 1
                continue
            action = e.get("action")
            t = e.get("time_us")
            t_ns = _int(t, -1) * 1000 if _int(t, -1) >= 0 else None
            if t_ns is not None:
                last_ts = t_ns if last_ts is None else max(last_ts, t_ns)
            if action == "snapshot" and t_ns is not None:
                snap_ts = t_ns if snap_ts is None else max(snap_ts, t_ns)
            if action == "oom":
                ooms += 1
            if action in _IGNORED_ACTIONS:
                continue
            kind = _EVENT_KIND.get(action)
            if kind is None:
                dropped[R_BAD_ENTRY] += 1
                continue
            if t_ns is None:
                dropped[R_NO_TIME] += 1
                continue
            size = max(_int(e.get("size"), 0), 0)
            dev_l.append(dev)
            ts_l.append(t_ns)
            addr_l.append(_int(e.get("addr"), -1))
            bytes_l.append(-size if kind in ("free", "segment_free") else size)
            kind_l.append(kind)
    n = len(ts_l)
    df = conform("memory_events", pd.DataFrame({
        "rank": np.full(n, rank, np.int64), "device_id": np.asarray(dev_l, np.int64),
        "ts_ns": np.asarray(ts_l, np.int64), "address": np.asarray(addr_l, np.int64),
        "bytes": np.asarray(bytes_l, np.int64), "kind": pd.Categorical(kind_l), "source": SOURCE,
    }))
    if n:
        df = df.sort_values(["ts_ns", "device_id"], kind="stable").reset_index(drop=True)
    return df, dict(dropped), (snap_ts if snap_ts is not None else last_ts), ooms


COUNTER_KEYS = ("reserved_bytes", "allocated_bytes", "active_bytes", "requested_bytes", "inactive_split_bytes",
                "free_bytes", "largest_free_block_bytes")


def read(path: str | Path, rank: int | None = None) -> Trace:
    path = Path(path)
    data = _as_snapshot(safe_pickle.load(path), path)
    if rank is None:
        rank = rank_from_filename(path.name)
    rank = 0 if rank is None else int(rank)

    devices = summarize(data["segments"])
    events, dropped, snap_ns, ooms = _events(data.get("device_traces") or [], rank)

    t = Trace()
    t.set("memory_events", events)
    if snap_ns is not None and devices:
        rows = [{"rank": rank, "device_id": dev, "ts_ns": snap_ns, "name": f"memory_{k}", "value": float(d[k])}
                for dev, d in devices.items() for k in COUNTER_KEYS]
        t.set("counters", pd.DataFrame(rows))
    dev_ids = sorted(set(devices) | set(range(len(data.get("device_traces") or []))))
    t.set("devices", {"rank": [rank] * len(dev_ids), "device_id": dev_ids})
    t.set("ranks", {"rank": [rank], "source_file": [str(path)], "source_format": [SOURCE_FORMAT],
                    "clock_offset_ns": [0],
                    "clock_source": ["time_us of the allocator trace (UTC epoch)" if snap_ns is not None else ""]})
    for reason, count in dropped.items():
        t.add_dropped(rank, "torch_snapshot", reason, count)
    settings = data.get("allocator_settings")
    t.meta["inputs"] = [{"path": str(path), "format": SOURCE_FORMAT, "rank": rank}]
    t.meta["memory_snapshot"] = {
        "rank": rank,
        "source_file": str(path),
        "time_ns": snap_ns,  # None when the snapshot has no trace times
        "devices": list(devices.values()),
        "segments": segment_rows(data["segments"]),
        "trace_entries": int(sum(len(x) for x in data.get("device_traces") or [])),
        "oom_events": ooms,
        "allocator_settings": {k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool))}
        if isinstance(settings, dict) else {},
    }
    return t
