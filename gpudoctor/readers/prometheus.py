"""Reader for saved Prometheus text scrapes of an inference engine (vLLM).

``read(path, rank=None) -> Trace`` turns the engine's metrics into ``counters`` rows. Sample lines are
parsed by prometheus_client's text-format parser; this module splits a file into scrapes and turns vLLM's
metrics into counters.

File layout: Prometheus text exposition format (``curl http://host:8000/metrics > FILE``), one scrape or
several. Scrapes are separated by a comment line ``# scrape ts=SECONDS`` (UNIX time; an ISO 8601 time is
accepted too), by an OpenMetrics ``# EOF`` line, or, for files made by
concatenating ``curl`` outputs, by a ``# HELP``/``# TYPE`` line of a metric already seen in the current
scrape. Time of a sample: its own timestamp (milliseconds) if the line has one, else its scrape's ``ts``;
when a file has no time at all, the scrapes are placed at the file's modification time, 1 ns apart in
file order (``ranks.clock_source`` says so).

Counted in ``dropped``, never silently skipped: lines the parser refuses, samples whose value is NaN or
infinite, and times (sample timestamps, ``# scrape ts=``) outside the representable range (before 1970 or
after 2262).

Counters written (values aggregated over label sets, i.e. over engines of a data-parallel server: usage
is averaged weighted by each engine's ``num_gpu_blocks`` when known, counts are summed):

==============================  ==========================================================================
counter                         from
==============================  ==========================================================================
vllm.kv_cache_usage             ``vllm:kv_cache_usage_perc`` (V1) or ``vllm:gpu_cache_usage_perc`` (V0):
                                fraction (0..1) of the KV pool's blocks in use
vllm.num_requests_running       ``vllm:num_requests_running``
vllm.num_requests_waiting       ``vllm:num_requests_waiting``
vllm.block_size                 label ``block_size`` of ``vllm:cache_config_info`` (tokens per block)
vllm.num_gpu_blocks             label ``num_gpu_blocks`` of ``vllm:cache_config_info`` (pool size)
vllm.<name>                     every other ``vllm:`` gauge / counter sample (histogram and summary
                                series ``_bucket``/``_sum``/``_count``/``_created`` are skipped)
==============================  ==========================================================================

``meta["vllm_cache_config"]`` keeps every label of ``vllm:cache_config_info`` (cache_dtype,
enable_prefix_caching, gpu_memory_utilization, ...) as text. A file without any ``vllm:`` metric is an
InputError (there is nothing this reader can use in it).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from prometheus_client.parser import text_string_to_metric_families

from gpudoctor.errors import InputError
from gpudoctor.model.trace import Trace
from gpudoctor.readers import rank_from_filename, read_bytes

SOURCE_FORMAT = "prometheus_text"
R_BAD_LINE = "unparsable Prometheus line"
R_NON_FINITE = "Prometheus sample with a NaN or infinite value"
R_BAD_TIME = "Prometheus time out of range"
_MAX_EPOCH_NS = 2**63 - 1  # what an int64 nanosecond time can hold (year 2262)

USAGE_NAMES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # first wins when both are present
CACHE_INFO = "vllm:cache_config_info"
_RENAMED = {"vllm:num_requests_running": "vllm.num_requests_running",
            "vllm:num_requests_waiting": "vllm.num_requests_waiting"}
_CACHE_LABEL_COUNTERS = {"block_size": "vllm.block_size", "num_gpu_blocks": "vllm.num_gpu_blocks"}

_SCRAPE = re.compile(r"^#\s*scrape\b(.*)$", re.I)
_TS_FIELD = re.compile(r"\bts=(\S+)")
_HELP_TYPE = re.compile(r"^#\s*(HELP|TYPE)\s+([a-zA-Z_:][a-zA-Z0-9_:]*)")


class TimeOutOfRange(ValueError):
    """A time before 1970 or beyond what int64 nanoseconds hold."""


def _epoch_ns(seconds: float) -> int:
    if not math.isfinite(seconds) or not 0 < seconds * 1e9 < _MAX_EPOCH_NS:
        raise TimeOutOfRange(f"time {seconds!r} s out of range")
    return int(round(seconds * 1e9))


def _parse_ts(text: str) -> int | None:
    """A scrape time (UNIX seconds or ISO 8601) as epoch ns; None when it is not a time;
    TimeOutOfRange when it is one that int64 nanoseconds cannot hold."""
    try:
        return _epoch_ns(float(text))
    except TimeOutOfRange:
        raise
    except (ValueError, OverflowError):
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return _epoch_ns(dt.timestamp())


def parse_sample(line: str) -> tuple[str, dict[str, str], float, int | None]:
    """``(name, labels, value, timestamp_ns or None)`` of one sample line (prometheus_client's parser);
    ValueError if malformed, TimeOutOfRange if its timestamp is."""
    try:
        samples = [smp for fam in text_string_to_metric_families(line + "\n") for smp in fam.samples]
    except (ValueError, OverflowError, IndexError, KeyError, TypeError) as e:
        raise ValueError(f"not a Prometheus sample ({e})") from None
    if len(samples) != 1:
        raise ValueError("expected one sample")
    smp = samples[0]
    # Sample timestamps are milliseconds: rounded to the microsecond, the float seconds give them back exactly.
    ts = None
    if smp.timestamp is not None:
        seconds = float(smp.timestamp)
        _epoch_ns(seconds)  # in range?
        ts = int(round(seconds * 1e6)) * 1000
    return smp.name, dict(smp.labels), float(smp.value), ts


def parse_text(text: str) -> tuple[list[dict], dict[str, int]]:
    """Split ``text`` into scrapes; returns ([{"ts_ns": int|None, "samples": [(name, labels, value, ts)]}],
    {drop reason: lines})."""
    scrapes: list[dict] = []
    cur: dict = {"ts_ns": None, "samples": [], "described": set(), "types": {}}
    bad: dict[str, int] = defaultdict(int)

    def flush(new_ts=None):
        nonlocal cur
        if cur["samples"] or cur["ts_ns"] is not None:
            scrapes.append(cur)
        cur = {"ts_ns": new_ts, "samples": [], "described": set(), "types": {}}

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = _SCRAPE.match(line)
            if m:
                tm = _TS_FIELD.search(m.group(1))
                try:
                    flush(_parse_ts(tm.group(1)) if tm else None)
                except TimeOutOfRange:
                    bad[R_BAD_TIME] += 1
                    flush(None)
                continue
            if line.upper().startswith("# EOF"):
                flush()
                continue
            ht = _HELP_TYPE.match(line)
            if ht:
                key = (ht.group(1).upper(), ht.group(2))
                if key in cur["described"] and cur["samples"]:
                    flush()
                cur["described"].add(key)
                if key[0] == "TYPE":
                    cur["types"][ht.group(2)] = line.split()[-1].lower()
            continue
        try:
            cur["samples"].append(parse_sample(line))
        except TimeOutOfRange:
            bad[R_BAD_TIME] += 1
        except ValueError:
            bad[R_BAD_LINE] += 1
    flush()
    for sc in scrapes:
        sc.pop("described", None)
    return [s for s in scrapes if s["samples"]], dict(bad)


def _num_label(v: str | None) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except ValueError:
        return None  # "None", "" and the like
    return x if math.isfinite(x) else None


def _is_distribution(name: str, types: dict[str, str]) -> bool:
    """A histogram / summary series (_bucket, _sum, _count) or a ``_created`` timestamp: not a counter."""
    if name.endswith("_created"):
        return True
    own = types.get(name)
    if own in ("gauge", "counter", "untyped", "unknown"):
        return False
    if own in ("histogram", "summary", "gaugehistogram"):
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            kind = types.get(name[: -len(suffix)])
            return kind in ("histogram", "summary", "gaugehistogram") if kind else True
    return False


def _scrape_counters(samples: list, ts: int, types: dict[str, str] | None = None
                     ) -> tuple[list[tuple[int, str, float]], dict[str, str], int]:
    """Counter rows (ts, name, value) of one scrape, the cache-config labels seen in it, and how many vllm:
    samples were left out for a NaN or infinite value."""
    types = types or {}
    non_finite = 0
    rows: list[tuple[int, str, float]] = []
    cache_labels: dict[str, str] = {}
    blocks_by_engine: dict[str, float] = {}
    block_sizes, gpu_blocks = [], []
    for name, labels, value, sts in samples:
        if name == CACHE_INFO:
            cache_labels.update(labels)
            bs, nb = _num_label(labels.get("block_size")), _num_label(labels.get("num_gpu_blocks"))
            if bs is not None:
                block_sizes.append((sts or ts, bs))
            if nb is not None:
                gpu_blocks.append((sts or ts, nb))
                blocks_by_engine[labels.get("engine", "")] = nb
    if block_sizes:
        rows.append((max(t for t, _ in block_sizes), "vllm.block_size", max(v for _, v in block_sizes)))
    if gpu_blocks:
        rows.append((max(t for t, _ in gpu_blocks), "vllm.num_gpu_blocks", float(sum(v for _, v in gpu_blocks))))

    usage_name = next((u for u in USAGE_NAMES if any(s[0] == u for s in samples)), None)
    sums: dict[str, list] = defaultdict(list)  # counter -> [(ts, value, weight)]
    for name, labels, value, sts in samples:
        if not name.startswith("vllm:") or name == CACHE_INFO:
            continue
        if not math.isfinite(value):
            non_finite += 1
            continue
        t = sts if sts is not None else ts
        if name in USAGE_NAMES:
            if name != usage_name:
                continue
            w = blocks_by_engine.get(labels.get("engine", ""), 1.0) if blocks_by_engine else 1.0
            sums["vllm.kv_cache_usage"].append((t, value, w))
            continue
        if _is_distribution(name, types):
            continue
        counter = _RENAMED.get(name, "vllm." + name[len("vllm:"):])
        sums[counter].append((t, value, None))
    for counter, vals in sums.items():
        t = max(v[0] for v in vals)
        if counter == "vllm.kv_cache_usage":
            wsum = sum(v[2] for v in vals)
            value = sum(v[1] * v[2] for v in vals) / wsum if wsum > 0 else float(np.mean([v[1] for v in vals]))
        else:
            value = float(sum(v[1] for v in vals))
        rows.append((t, counter, value))
    return rows, cache_labels, non_finite


def read(path: str | Path, rank: int | None = None) -> Trace:
    path = Path(path)
    raw = read_bytes(path, "Prometheus text")
    if b"\x00" in raw[:4096]:
        raise InputError(path, "not Prometheus text (binary content)")
    text = raw.decode("utf-8", errors="replace")
    scrapes, bad = parse_text(text)
    if not any(s[0].startswith("vllm:") for sc in scrapes for s in sc["samples"]):
        raise InputError(path, "Prometheus text without any vllm: metric (gpudoctor reads vLLM's "
                               "vllm:kv_cache_usage_perc, vllm:num_requests_running, vllm:cache_config_info)")
    if rank is None:
        rank = rank_from_filename(path.name)
    rank = 0 if rank is None else int(rank)

    timed = any(sc["ts_ns"] is not None or any(s[3] is not None for s in sc["samples"]) for sc in scrapes)
    mtime_ns = path.stat().st_mtime_ns
    rows: list[tuple[int, str, float]] = []
    cache_config: dict[str, str] = {}
    last_ts = None
    for i, sc in enumerate(scrapes):
        ts = sc["ts_ns"]
        if ts is None:
            ts = (last_ts + 1) if (timed and last_ts is not None) else (mtime_ns + i if not timed else mtime_ns)
        last_ts = ts
        r, labels, non_finite = _scrape_counters(sc["samples"], ts, sc["types"])
        bad[R_NON_FINITE] = bad.get(R_NON_FINITE, 0) + non_finite
        rows.extend(r)
        cache_config.update(labels)

    t = Trace()
    if rows:
        ts_a, names, vals = zip(*rows)
        t.set("counters", pd.DataFrame({"rank": rank, "device_id": -1, "ts_ns": np.asarray(ts_a, np.int64),
                                        "name": pd.Categorical(names), "value": np.asarray(vals, np.float64)}))
        t.counters = t.counters.sort_values(["ts_ns", "name"], kind="stable").reset_index(drop=True)
    t.set("ranks", {"rank": [rank], "source_file": [str(path)], "source_format": [SOURCE_FORMAT],
                    "clock_offset_ns": [0],
                    "clock_source": ["scrape ts comments (UTC epoch)" if timed
                                     else "file modification time (scrape times unknown)"]})
    for reason, n in bad.items():
        t.add_dropped(rank, "prometheus", reason, n)
    t.meta["inputs"] = [{"path": str(path), "format": SOURCE_FORMAT, "rank": rank}]
    t.meta["prometheus"] = {"scrapes": len(scrapes), "timed": timed}
    if cache_config:
        t.meta["vllm_cache_config"] = cache_config
    return t
