"""kv_fragmentation: KV-cache token slots that are allocated but hold no token, and why.

waste_fraction = (allocated token slots - slots holding a token) / allocated token slots

summed over every sample of the run (a slot-weighted average over time). Allocated slots and used
tokens are facts only the serving engine knows: a profiler or an allocator snapshot sees bytes, never
tokens. So the waste is measured only from

1. annotations: counters ``kv_cache.used_tokens``, ``kv_cache.allocated_tokens`` and optionally
   ``kv_cache.block_tokens``, ``kv_cache.requests`` (or ``sequences``), ``kv_cache.bytes_per_token``,
   ``kv_cache.pool_tokens`` (``gpudoctor.annotate.kv_cache(...)``, read from the trace's ranges by
   ``gpudoctor.model.counters_from_ranges``); or
2. vLLM metrics (``vllm.kv_cache_usage``, ``vllm.num_gpu_blocks``, ``vllm.block_size``,
   ``vllm.num_requests_running`` from ``gpudoctor.readers.prometheus``): vLLM publishes blocks in use,
   not tokens, so the waste is *estimated* as the block rounding of the running sequences (half a block
   each: a sequence's last block is on average half full) over the slots of the blocks in use.

Parts of the waste (fractions of allocated slots; they add up to waste_fraction):

- ``reservation_fraction``: slots reserved for tokens not generated yet (a max-length buffer per
  request, blocks allocated ahead);
- ``internal_fragmentation_fraction``: block rounding, at most block_tokens - 1 slots per sequence.
  With block_tokens > 1 the waste up to requests x (block_tokens - 1) is rounding, the rest
  reservation (all rounding when the number of sequences is unknown); with block_tokens = 1 (one
  contiguous buffer per request) all of it is reservation.

External fragmentation is the allocator's, in bytes (from a CUDA memory snapshot, ``meta
["memory_snapshot"]``): ``allocator_free_bytes`` = reserved - allocated (cached by the allocator, usable
by this process only), ``inactive_split_bytes`` (free pieces of segments that also hold live tensors:
``empty_cache`` cannot return them) and ``free_fragmentation`` = 1 - largest free block / free bytes.

The allocator view (snapshot segments, else live allocations rebuilt from ``memory_events``: torch
snapshot trace, Kineto memory events or Nsight Systems CUDA memory usage) gives the layout:

- ``static_max_length``: at least ``static_min_allocations`` live allocations of one identical size
  >= ``min_kv_allocation_bytes`` that hold >= ``pattern_min_share`` of the live bytes (one max-length
  buffer per request; per-layer pools of identical size look the same, so from the allocator alone
  this is a hint, reported as info);
- ``paged``: one live allocation holding >= ``pattern_min_share`` of the live bytes (one block pool).

Combined with token counts it gives bytes: for the static pattern, bytes_per_token = pattern bytes /
allocated tokens and max length = allocated tokens / allocations; for a pool, pool bytes / pool tokens
(``kv_cache.pool_tokens`` or vLLM's num_gpu_blocks x block_size). ``bytes_per_token`` in the config
overrides both. The finding says how many more sequences of the average length the wasted slots would
hold: wasted slots / (used tokens / sequences).

Severity follows this analyzer's own thresholds on waste_fraction (waste_fraction_low / _medium /
_high); without token counts (allocator only) the finding is info. The cost is memory, not time:
estimated_saving_ns is 0.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gpudoctor.analyzers.context import AnalysisContext
from gpudoctor.analyzers.findings import Finding, severity_for
from gpudoctor.analyzers.spec import AnalyzerSpec, Setting, fraction
from gpudoctor.model.counters_from_ranges import counters_from_ranges

ID = "kv_fragmentation"

SETTINGS = (
    fraction("waste_fraction_low", 0.1, "low when at least this fraction of allocated KV token slots holds no token"),
    fraction("waste_fraction_medium", 0.2, "medium at this fraction"),
    fraction("waste_fraction_high", 0.5, "high at this fraction"),
    Setting("bytes_per_token", None, "KV bytes per token (layers x 2 x kv_heads x head_dim x bytes per element); "
            "derived from the allocator view when it can be", unit="bytes", kind="number"),
    Setting("min_kv_allocation_bytes", 1 << 20, "live allocations smaller than this are not KV-cache candidates",
            unit="bytes"),
    Setting("static_min_allocations", 4, "identical live allocations needed to call it one max-length buffer per request",
            unit="count", minimum=1),
    fraction("pattern_min_share", 0.5, "share of live allocated bytes a static or pool pattern must hold"),
    Setting("max_samples_listed", 5, "annotation samples listed in the evidence (the most wasteful and the last)",
            unit="count"),
)

COUNTER_PREFIX = "kv_cache."
_REQUEST_KEYS = ("requests", "sequences", "num_sequences", "num_requests")
_EVENT_SOURCES = ("torch_snapshot", "kineto_memory", "nsys_cuda_memory")


def _cfg(ctx: AnalysisContext, key: str):
    return ctx.config.get(ID, key)


def _fmt_bytes(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "?"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}".replace(".0 ", " ")
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------------ inputs


def token_samples(counters: pd.DataFrame) -> pd.DataFrame:
    """One row per kv_cache annotation sample: ts_ns, device_id, used, allocated, block, requests,
    bytes_per_token, pool_tokens (NaN when not given). Only samples with used and allocated > 0."""
    c = counters[counters["name"].astype(str).str.startswith(COUNTER_PREFIX)]
    cols = ["ts_ns", "device_id", "used", "allocated", "block", "requests", "bytes_per_token", "pool_tokens"]
    if c.empty:
        return pd.DataFrame(columns=cols)
    c = c[np.isfinite(c["value"].to_numpy(np.float64))]
    key = c["name"].astype(str).str.slice(len(COUNTER_PREFIX))
    p = (c.assign(key=key.to_numpy()).pivot_table(index=["ts_ns", "device_id"], columns="key", values="value",
                                                  aggfunc="last", observed=True).reset_index())
    out = pd.DataFrame({"ts_ns": p["ts_ns"].to_numpy(np.int64), "device_id": p["device_id"].to_numpy(np.int64)})
    get = lambda k: p[k].to_numpy(np.float64) if k in p.columns else np.full(len(p), np.nan)  # noqa: E731
    out["used"] = get("used_tokens")
    out["allocated"] = get("allocated_tokens")
    out["block"] = get("block_tokens")
    req = np.full(len(p), np.nan)
    for k in _REQUEST_KEYS:
        req = np.where(np.isnan(req), get(k), req)
    out["requests"] = req
    out["bytes_per_token"] = get("bytes_per_token")
    out["pool_tokens"] = get("pool_tokens")
    ok = np.isfinite(out["used"]) & np.isfinite(out["allocated"]) & (out["allocated"] > 0) & (out["used"] >= 0)
    return out[ok].sort_values("ts_ns", kind="stable").reset_index(drop=True)


def vllm_samples(counters: pd.DataFrame) -> pd.DataFrame:
    """vLLM metrics per scrape time: usage, num_gpu_blocks, block_size, running (NaN when absent)."""
    names = {"vllm.kv_cache_usage": "usage", "vllm.num_gpu_blocks": "num_gpu_blocks",
             "vllm.block_size": "block_size", "vllm.num_requests_running": "running"}
    c = counters[counters["name"].astype(str).isin(list(names))]
    if c.empty:
        return pd.DataFrame(columns=["ts_ns", *names.values()])
    p = c.assign(key=c["name"].astype(str).map(names).to_numpy()).pivot_table(
        index="ts_ns", columns="key", values="value", aggfunc="last", observed=True).reset_index()
    for k in names.values():
        if k not in p.columns:
            p[k] = np.nan
    p = p.sort_values("ts_ns").reset_index(drop=True)
    # cache config is published once per scrape but may be missing from some: carry it forward/back
    for k in ("num_gpu_blocks", "block_size"):
        p[k] = p[k].ffill().bfill()
    return p[["ts_ns", *names.values()]]


def classify_sizes(sizes: Counter, live_bytes: int, min_bytes: int, min_count: int, min_share: float) -> dict:
    """The layout a set of live allocation sizes suggests (see the module docstring)."""
    out = {"pattern": "none", "allocations": 0, "allocation_bytes": 0, "pattern_bytes": 0, "share": 0.0,
           "live_bytes": int(live_bytes), "largest_allocation_bytes": max(sizes) if sizes else 0}
    if live_bytes <= 0 or not sizes:
        return out
    big = {s: c for s, c in sizes.items() if s >= min_bytes}
    if not big:
        return out
    size, count = max(big.items(), key=lambda sc: (sc[0] * sc[1], sc[0]))
    if count >= min_count and size * count >= min_share * live_bytes:
        out.update(pattern="static_max_length", allocations=int(count), allocation_bytes=int(size),
                   pattern_bytes=int(size * count), share=round(size * count / live_bytes, 6))
        return out
    largest = max(big)
    if largest >= min_share * live_bytes:
        out.update(pattern="paged", allocations=1, allocation_bytes=int(largest), pattern_bytes=int(largest),
                   share=round(largest / live_bytes, 6))
    return out


def _snapshot_for(meta: dict, rank: int) -> dict | None:
    snap = meta.get("memory_snapshot")
    snaps = snap if isinstance(snap, list) else [snap] if isinstance(snap, dict) else []
    for s in snaps:
        if isinstance(s, dict) and int(s.get("rank", 0)) == rank and s.get("devices"):
            return s
    return None


def allocator_view(ctx: AnalysisContext) -> dict | None:
    """Layout and allocator state of this rank: from the snapshot summary, else from memory_events."""
    min_b, min_c = int(_cfg(ctx, "min_kv_allocation_bytes")), int(_cfg(ctx, "static_min_allocations"))
    share = float(_cfg(ctx, "pattern_min_share"))
    snap = _snapshot_for(ctx.trace.meta, ctx.rank)
    if snap is not None:
        dev = max(snap["devices"], key=lambda d: d.get("allocated_bytes", 0))
        sizes = Counter({int(s): int(c) for s, c in dev.get("live_allocation_sizes", [])})
        view = classify_sizes(sizes, int(dev.get("allocated_bytes", 0)), min_b, min_c, share)
        view.update(source="torch_snapshot", device_id=int(dev.get("device_id", 0)), what="live tensors",
                    reserved_bytes=int(dev.get("reserved_bytes", 0)),
                    allocated_bytes=int(dev.get("allocated_bytes", 0)),
                    allocator_free_bytes=int(dev.get("reserved_bytes", 0)) - int(dev.get("allocated_bytes", 0)),
                    inactive_split_bytes=int(dev.get("inactive_split_bytes", 0)),
                    largest_free_block_bytes=int(dev.get("largest_free_block_bytes", 0)),
                    free_fragmentation=float(dev.get("free_fragmentation", 0.0)),
                    allocator_rounding_bytes=int(dev.get("allocated_bytes", 0)) - int(dev.get("requested_bytes", 0)),
                    expandable_segments=bool((snap.get("allocator_settings") or {}).get("expandable_segments")))
        return view
    ev = ctx.trace.memory_events
    if ev.empty:
        return None
    for source in _EVENT_SOURCES:
        e = ev[(ev["source"].astype(str) == source) & ev["kind"].astype(str).isin(["alloc", "free"])]
        if e.empty:
            continue
        e = e.sort_values("ts_ns", kind="stable")
        last = e.drop_duplicates(["device_id", "address"], keep="last")
        live = last[last["bytes"].to_numpy() > 0]
        if live.empty:
            continue
        dev = int(live.groupby("device_id")["bytes"].sum().idxmax())
        live = live[live["device_id"].to_numpy() == dev]
        sizes = Counter(live["bytes"].astype(np.int64).tolist())
        live_bytes = int(live["bytes"].sum())
        view = classify_sizes(sizes, live_bytes, min_b, min_c, share)
        view.update(source=source, device_id=dev,
                    what="CUDA allocations (allocator segments)" if source == "nsys_cuda_memory" else "live tensors",
                    reserved_bytes=live_bytes if source == "nsys_cuda_memory" else None,
                    allocated_bytes=None if source == "nsys_cuda_memory" else live_bytes,
                    allocator_free_bytes=None, inactive_split_bytes=None, largest_free_block_bytes=None,
                    free_fragmentation=None, allocator_rounding_bytes=None, expandable_segments=None)
        return view
    return None


# ------------------------------------------------------------------------------------------ analysis


def _split(wasted: np.ndarray, block: np.ndarray, requests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(internal rounding slots, reservation slots) per sample."""
    b = np.where(np.isfinite(block) & (block >= 1), block, 1.0)
    cap = np.where(np.isfinite(requests), requests * (b - 1.0), np.inf)
    internal = np.where(b > 1, np.minimum(wasted, cap), 0.0)
    return internal, wasted - internal


def severity(ctx: AnalysisContext, waste: float | None) -> str:
    """This analyzer's thresholds on the waste fraction (memory, not time); info when it is unknown."""
    return severity_for(waste, float(_cfg(ctx, "waste_fraction_medium")), float(_cfg(ctx, "waste_fraction_high")),
                        float(_cfg(ctx, "waste_fraction_low")))


def kv_counters(ctx: AnalysisContext) -> pd.DataFrame:
    """The rank's counters; when they hold no kv_cache.* sample, plus those parsed from its ranges' texts
    (annotations in a trace whose reader did not turn them into counters)."""
    c = ctx.trace.counters
    if c["name"].astype(str).str.startswith(COUNTER_PREFIX).any() or ctx.trace.ranges.empty:
        return c
    rows = counters_from_ranges(ctx.trace.ranges).counters
    rows = rows[rows["name"].astype(str).str.startswith(COUNTER_PREFIX)]
    return pd.concat([c, rows], ignore_index=True) if len(rows) else c


@dataclass
class Measurement:
    """What ``measure`` found: the metrics (None = unknown), the evidence, the allocator view, the waste."""

    metrics: dict
    evidence: dict
    alloc: dict | None
    waste: float | None


def measure(ctx: AnalysisContext) -> Measurement | None:
    """Token slots (annotations, else vLLM's metrics), the allocator's view (a memory snapshot or the
    timeline's memory events), the layout, sequences and bytes; None when there is nothing to speak of."""
    counters = kv_counters(ctx)
    tok = token_samples(counters)
    vl = vllm_samples(counters)
    alloc = allocator_view(ctx)
    has_vllm = not vl.empty and np.isfinite(vl["usage"].to_numpy(np.float64)).any()
    if tok.empty and not has_vllm and (alloc is None or alloc["pattern"] == "none"):
        return None
    # Without token counts, an allocation pattern seen in a timeline's memory events is only a guess (a
    # training run's activations look the same): speak only when the user gave a memory snapshot.
    if tok.empty and not has_vllm and alloc["source"] != "torch_snapshot":
        return None
    m = dict.fromkeys(METRIC_KEYS)
    evidence: dict = {"window": ctx.window.describe()}
    if alloc is not None:
        _allocator_metrics(m, evidence, alloc)
    if has_vllm:
        _vllm_state(m, vl)
    seq_global, seq_src = _sequences(tok, vl, has_vllm, alloc)
    waste = None
    if not tok.empty:
        waste = _token_waste(ctx, m, evidence, tok, seq_global)
    elif has_vllm:
        waste = _vllm_waste(m, evidence, vl)
    m["layout"] = _layout(m, has_vllm, alloc)
    _sizes(ctx, m, tok, alloc, seq_global, seq_src)
    return Measurement(m, evidence, alloc, waste)


# Keys in the order reports show them; unknown values are left out of the finding.
METRIC_KEYS = (
    "waste_fraction", "layout", "reservation_fraction", "internal_fragmentation_fraction", "extra_sequences",
    "wasted_bytes", "pattern", "pattern_allocations", "pattern_allocation_bytes", "pattern_bytes",
    "pattern_share", "waste_source", "waste_fraction_last", "waste_fraction_max", "samples", "used_tokens",
    "allocated_tokens", "wasted_tokens", "block_tokens", "max_len_tokens", "sequences", "sequences_source",
    "avg_sequence_tokens", "bytes_per_token", "bytes_per_token_source", "pool_tokens", "pool_free_fraction",
    "kv_cache_usage", "num_gpu_blocks", "allocator_source", "reserved_bytes", "allocated_bytes",
    "allocator_free_bytes", "inactive_split_bytes", "largest_free_block_bytes", "free_fragmentation",
    "allocator_rounding_bytes")


def _allocator_metrics(m: dict, evidence: dict, alloc: dict) -> None:
    m.update(allocator_source=alloc["source"], pattern=alloc["pattern"],
             pattern_allocations=alloc["allocations"] or None,
             pattern_allocation_bytes=alloc["allocation_bytes"] or None,
             pattern_bytes=alloc["pattern_bytes"] or None, pattern_share=alloc["share"] or None,
             reserved_bytes=alloc["reserved_bytes"], allocated_bytes=alloc["allocated_bytes"],
             allocator_free_bytes=alloc["allocator_free_bytes"],
             inactive_split_bytes=alloc["inactive_split_bytes"],
             largest_free_block_bytes=alloc["largest_free_block_bytes"],
             free_fragmentation=alloc["free_fragmentation"],
             allocator_rounding_bytes=alloc["allocator_rounding_bytes"])
    evidence["allocator"] = {"source": alloc["source"], "device_id": alloc["device_id"], "what": alloc["what"],
                             "live_bytes": alloc["live_bytes"],
                             "largest_allocation_bytes": alloc["largest_allocation_bytes"]}


def _vllm_state(m: dict, vl: pd.DataFrame) -> None:
    """vLLM's pool at the latest scrape."""
    last = vl[np.isfinite(vl["usage"].to_numpy(np.float64))].iloc[-1]
    m["kv_cache_usage"] = round(float(last["usage"]), 6)
    if math.isfinite(last["usage"]):
        m["pool_free_fraction"] = round(1.0 - float(last["usage"]), 6)
    if math.isfinite(last["num_gpu_blocks"]):
        m["num_gpu_blocks"] = int(last["num_gpu_blocks"])
        if math.isfinite(last["block_size"]):
            m["pool_tokens"] = int(last["num_gpu_blocks"] * last["block_size"])


def _sequences(tok: pd.DataFrame, vl: pd.DataFrame, has_vllm: bool, alloc: dict | None) -> tuple[float | None, str | None]:
    """How many sequences hold the cache, and from where: annotations, vLLM, else the allocator."""
    seq_global, seq_src = None, None
    if not tok.empty and np.isfinite(tok["requests"]).any():
        seq_global, seq_src = float(tok["requests"][np.isfinite(tok["requests"])].iloc[-1]), "annotations"
    elif has_vllm and np.isfinite(vl["running"].to_numpy(np.float64)).any():
        r = vl["running"].to_numpy(np.float64)
        seq_global, seq_src = float(r[np.isfinite(r)][-1]), "vllm.num_requests_running"
    elif alloc is not None and alloc["pattern"] == "static_max_length" and not (
            not tok.empty and (tok["block"].to_numpy(np.float64) > 1).any()):
        # identical buffers count requests only when nothing says the cache is paged (per-layer pools of a
        # paged engine are identical too)
        seq_global, seq_src = float(alloc["allocations"]), "allocator: one buffer per request"
    return seq_global, seq_src


def _token_waste(ctx: AnalysisContext, m: dict, evidence: dict, tok: pd.DataFrame, seq_global: float | None) -> float:
    """Empty token slots from the annotations: the waste fraction, split into reservation and rounding."""
    used = tok["used"].to_numpy(np.float64)
    allocated = tok["allocated"].to_numpy(np.float64)
    inconsistent = int((used > allocated).sum())
    used_c = np.minimum(used, allocated)
    wasted = allocated - used_c
    block = tok["block"].to_numpy(np.float64)
    req = tok["requests"].to_numpy(np.float64)
    if seq_global is not None:
        req = np.where(np.isfinite(req), req, seq_global)
    internal, reservation = _split(wasted, block, req)
    total = allocated.sum()
    waste = float(wasted.sum() / total)
    per = wasted / allocated
    m.update(waste_fraction=round(waste, 6), waste_source="annotations", samples=int(len(tok)),
             waste_fraction_last=round(float(per[-1]), 6), waste_fraction_max=round(float(per.max()), 6),
             used_tokens=int(used[-1]), allocated_tokens=int(allocated[-1]), wasted_tokens=int(wasted[-1]),
             reservation_fraction=round(float(reservation.sum() / total), 6),
             internal_fragmentation_fraction=round(float(internal.sum() / total), 6))
    fb = block[np.isfinite(block)]
    if len(fb):
        m["block_tokens"] = int(fb[-1])
    pt = tok["pool_tokens"].to_numpy(np.float64)
    if np.isfinite(pt).any():
        m["pool_tokens"] = int(pt[np.isfinite(pt)][-1])
    if inconsistent:
        evidence["inconsistent_samples"] = f"{inconsistent} samples report more used than allocated tokens (used capped)"
    n_list = int(_cfg(ctx, "max_samples_listed"))
    idx = np.unique(np.r_[np.argsort(-per, kind="stable")[:n_list - 1], len(tok) - 1])[:n_list]
    evidence["examples"] = [{"start_ns": int(tok["ts_ns"].iat[i]), "start_us": ctx.rel_us(tok["ts_ns"].iat[i]),
                            "used_tokens": int(used[i]), "allocated_tokens": int(allocated[i]),
                            "waste_fraction": round(float(per[i]), 4)} for i in idx.tolist()]
    return waste


def _vllm_waste(m: dict, evidence: dict, vl: pd.DataFrame) -> float | None:
    """vLLM publishes blocks in use, not tokens: half a block per running sequence, estimated."""
    waste = None
    v = vl.dropna(subset=["usage", "num_gpu_blocks", "block_size", "running"])
    if not v.empty:
        slots = (v["usage"] * v["num_gpu_blocks"] * v["block_size"]).to_numpy(np.float64)
        rounding = np.minimum(v["running"].to_numpy(np.float64) * (v["block_size"].to_numpy(np.float64) - 1) / 2.0,
                              slots)
        if slots.sum() > 0:
            waste = float(rounding.sum() / slots.sum())
            last = v.iloc[-1]
            m.update(waste_fraction=round(waste, 6), waste_source="vllm_metrics_estimate", samples=int(len(v)),
                     waste_fraction_last=round(float(rounding[-1] / slots[-1]), 6) if slots[-1] > 0 else None,
                     waste_fraction_max=round(float(np.max(np.divide(rounding, slots, out=np.zeros_like(slots),
                                                                      where=slots > 0))), 6),
                     allocated_tokens=int(slots[-1]), wasted_tokens=int(round(rounding[-1])),
                     block_tokens=int(last["block_size"]), reservation_fraction=0.0,
                     internal_fragmentation_fraction=round(waste, 6))
            evidence["estimate"] = ("vLLM publishes blocks in use, not tokens: waste estimated as half a block "
                                    "per running sequence")
    return waste


def _layout(m: dict, has_vllm: bool, alloc: dict | None) -> str:
    b = m["block_tokens"]
    if b is not None and b > 1:
        layout = "paged"
    elif has_vllm:
        layout = "paged"
    elif alloc is not None and alloc["pattern"] != "none":
        layout = alloc["pattern"]
    elif b == 1:
        layout = "contiguous"
    else:
        layout = "unknown"
    if layout == "contiguous" and alloc is not None and alloc["pattern"] == "static_max_length":
        layout = "static_max_length"
    return layout


def _sizes(ctx: AnalysisContext, m: dict, tok: pd.DataFrame, alloc: dict | None, seq_global: float | None,
           seq_src: str | None) -> None:
    """Sequences, bytes per token, wasted bytes and the room they would make."""
    layout = m["layout"]
    if seq_global is not None and seq_global > 0:
        m["sequences"], m["sequences_source"] = int(seq_global), seq_src
    bpt, bpt_src = _cfg(ctx, "bytes_per_token"), "config"
    if bpt is None and not tok.empty and np.isfinite(tok["bytes_per_token"]).any():
        bpt, bpt_src = float(tok["bytes_per_token"][np.isfinite(tok["bytes_per_token"])].iloc[-1]), "annotations"
    if bpt is None and alloc is not None and m["allocated_tokens"]:
        if alloc["pattern"] == "static_max_length" and layout == "static_max_length" and m["waste_source"] == "annotations":
            bpt = alloc["pattern_bytes"] / m["allocated_tokens"]
            bpt_src = "allocator: pattern bytes / allocated tokens"
        elif alloc["pattern"] == "paged" and m["pool_tokens"]:
            bpt = alloc["pattern_bytes"] / m["pool_tokens"]
            bpt_src = "allocator: pool bytes / pool tokens"
    if bpt is not None:
        m["bytes_per_token"], m["bytes_per_token_source"] = round(float(bpt), 3), bpt_src
    if layout == "static_max_length" and alloc is not None and alloc["allocations"] and m["allocated_tokens"] \
            and m["waste_source"] == "annotations":
        m["max_len_tokens"] = int(round(m["allocated_tokens"] / alloc["allocations"]))
    if m["wasted_tokens"] is not None and m["bytes_per_token"]:
        m["wasted_bytes"] = int(m["wasted_tokens"] * m["bytes_per_token"])
    if m["sequences"] and m["used_tokens"] and m["waste_source"] == "annotations":
        avg = m["used_tokens"] / m["sequences"]
        m["avg_sequence_tokens"] = round(avg, 1)
        m["extra_sequences"] = round(m["wasted_tokens"] / avg, 1) if avg > 0 else None
    if m["pool_tokens"] and m["allocated_tokens"] and m["pool_free_fraction"] is None and m["waste_source"] == "annotations":
        m["pool_free_fraction"] = round(max(0.0, 1.0 - m["allocated_tokens"] / m["pool_tokens"]), 6)


def explain(ctx: AnalysisContext, found: Measurement, sev: str) -> Finding:
    """Title and fix; metrics without the unknown ones. Memory, not time: no time saving."""
    m, alloc = found.metrics, found.alloc
    metrics = {k: v for k, v in m.items() if v is not None}
    return Finding(analyzer=ID, severity=sev, title=_title(m, alloc), metrics=metrics, estimated_saving_ns=0,
                   estimated_saving_fraction=0.0, recommendation=_recommendation(ctx, m, alloc, sev),
                   evidence=found.evidence, rank=ctx.rank)


def analyze(ctx: AnalysisContext) -> list[Finding]:
    found = measure(ctx)
    return [] if found is None else [explain(ctx, found, severity(ctx, found.waste))]


def _pattern_text(m: dict, alloc: dict | None) -> str:
    if alloc is None or alloc["pattern"] == "none":
        return ""
    what = "allocator segments" if alloc["source"] == "nsys_cuda_memory" else "live allocations"
    if alloc["pattern"] == "static_max_length":
        return (f"{alloc['allocations']} {what} of {_fmt_bytes(alloc['allocation_bytes'])} each, "
                f"{_fmt_bytes(alloc['pattern_bytes'])} = {alloc['share']:.0%} of live bytes")
    return f"one pool of {_fmt_bytes(alloc['pattern_bytes'])} = {alloc['share']:.0%} of live bytes"


def _title(m: dict, alloc: dict | None) -> str:
    pat = _pattern_text(m, alloc)
    if m["waste_fraction"] is None:
        if alloc is not None and alloc["pattern"] == "static_max_length":
            return f"KV cache looks like one max-length buffer per request: {pat}; waste unknown without token counts"
        if alloc is not None and alloc["pattern"] == "paged":
            return f"KV cache looks paged: {pat}; waste unknown without token counts"
        return f"KV cache pool {m['kv_cache_usage']:.0%} in use (vLLM); waste unknown" if m["kv_cache_usage"] is not None \
            else "KV cache: waste unknown"
    est = " (estimated)" if m["waste_source"] == "vllm_metrics_estimate" else ""
    layout = {"static_max_length": "one max-length buffer per request", "paged": "paged",
              "contiguous": "one buffer per request"}.get(m["layout"], m["layout"])
    t = f"KV cache: {m['waste_fraction']:.0%}{est} of allocated token slots hold no token ({layout}"
    if pat:
        t += f": {pat}"
    return t + ")"


def _recommendation(ctx: AnalysisContext, m: dict, alloc: dict | None, severity: str) -> str:
    parts: list[str] = []
    waste = m["waste_fraction"]
    if waste is None:
        parts.append("Waste needs token counts the allocator cannot see: call gpudoctor.annotate.kv_cache("
                     "used_tokens=..., allocated_tokens=..., block_tokens=...) once per step, or scrape the "
                     "engine's metrics while it runs and pass the file to gpudoctor analyze (for vLLM: "
                     "curl -s http://HOST:PORT/metrics >> engine.prom, one scrape per interval).")
        if alloc is not None and alloc["pattern"] == "static_max_length":
            parts.append("If these are per-request KV buffers sized for the maximum length, a paged KV cache "
                         "(vLLM PagedAttention, TensorRT-LLM paged KV cache) allocates only the blocks tokens fill.")
    else:
        room = ""
        if m["extra_sequences"] is not None and m["wasted_tokens"]:
            room = (f" The {m['wasted_tokens']} empty slots" +
                    (f" ({_fmt_bytes(m['wasted_bytes'])})" if m["wasted_bytes"] else "") +
                    f" would hold about {m['extra_sequences']:.0f} more concurrent sequences of the average "
                    f"length ({m['avg_sequence_tokens']:.0f} tokens) next to the {m['sequences']} running now.")
        res = m["reservation_fraction"] or 0.0
        internal = m["internal_fragmentation_fraction"] or 0.0
        if severity in ("info",):
            parts.append(f"Nothing to do: {waste:.1%} of allocated KV slots are empty"
                         + (f" (block rounding with {m['block_tokens']}-token blocks)." if internal >= res and internal > 0 else "."))
        elif res >= internal:
            txt = ("Most empty slots are reserved for tokens that were not generated"
                   + (f" (every request holds {m['max_len_tokens']} slots)" if m["max_len_tokens"] else "")
                   + ". Allocate KV in fixed-size blocks as tokens arrive (paged KV cache: vLLM PagedAttention, "
                     "TensorRT-LLM paged KV cache) instead of one max-length buffer per request, or lower the "
                     "maximum length to what requests need.")
            parts.append(txt + room)
        else:
            parts.append(f"Most empty slots are block rounding (the last block of each sequence is partly "
                         f"empty with {m['block_tokens']}-token blocks): a smaller block size wastes less." + room)
        if severity in ("medium", "high"):
            bpt = m["bytes_per_token"]
            parts.append("Smaller slots help on top: an FP8 KV cache halves bytes per token"
                         + (f" ({bpt:.0f} -> {bpt / 2:.0f})" if bpt else "")
                         + " and grouped-query attention (fewer KV heads) divides them by the group size.")
    if alloc is not None and alloc.get("inactive_split_bytes") is not None and alloc.get("reserved_bytes"):
        split = alloc["inactive_split_bytes"] / alloc["reserved_bytes"]
        if split >= 0.1 and not alloc.get("expandable_segments"):
            parts.append(f"The allocator holds {_fmt_bytes(alloc['inactive_split_bytes'])} ({split:.0%} of reserved) in "
                         "free pieces of split segments: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lets it "
                         "grow segments instead of splitting them.")
    return " ".join(parts)


SPEC = AnalyzerSpec(ID, analyze, SETTINGS, evidence=(
    ("allocator", "the allocator view of the memory snapshot (live KV-sized blocks, patterns)"),
    ("examples", "the most wasteful annotation samples"),
    ("inconsistent_samples", "samples whose used tokens exceed the allocated ones (left out)"),
    ("estimate", "how bytes per token were derived"),
    ("window", "the steady-state window"),
))
