"""Counters written as annotations: ``gpudoctor.counter GROUP key=value ...`` range / mark texts -> counters rows.

A program can report numbers that no profiler sees (KV-cache tokens, queue depth) by emitting an NVTX
range / mark or a ``record_function`` whose text is::

    gpudoctor.counter kv_cache used_tokens=9801 allocated_tokens=49152 block_tokens=1

(``gpudoctor.annotate.counter`` / ``kv_cache`` write exactly this; the grammar below is the one
``gpudoctor.annotate.parse_counter`` reads). Every ``key=value`` becomes one row of the ``counters``
table named ``NAME.key`` (``kv_cache.used_tokens``), at the range's start time, on the range's rank.

- the text is ``gpudoctor.counter`` NAME (``[A-Za-z_][A-Za-z0-9_.]*``) and one or more ``key=value``
  (key: same pattern), separated by whitespace; the NVTX domain does not matter;
- values are decimal numbers (``12``, ``0.5``, ``1e9``, ``-3``, and ``nan``/``inf`` as Python writes
  them; the rows keep them, analyzers skip non-finite values);
- ``device=N`` (or ``device_id=N``) is not a counter: it sets the rows' ``device_id`` (default -1), for
  processes that drive several GPUs;
- a text with the prefix that breaks any rule produces no rows at all and is counted as malformed (the
  reader adds the count to ``dropped`` with reason MALFORMED_REASON), so a typo never yields half a
  sample.

The function is pure: readers call it on the ranges they built (and on NVTX marks / instant events if
they keep those elsewhere) and append the rows to their counters.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np
import pandas as pd

from gpudoctor.model.trace import conform

PREFIX = "gpudoctor.counter"
MALFORMED_REASON = "malformed gpudoctor.counter annotation"

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_DEVICE_KEYS = ("device", "device_id")


class CounterRows(NamedTuple):
    counters: pd.DataFrame  # rows of the counters table
    malformed: dict[int, int]  # rank -> texts with the prefix that could not be parsed


def is_counter_text(text: str) -> bool:
    return text.startswith(PREFIX) and (len(text) == len(PREFIX) or text[len(PREFIX)].isspace())


def parse_counter_text(text: str) -> tuple[str, dict[str, float], int] | None:
    """``(group, {key: value}, device_id)`` of one annotation text; None when the text is not a counter.

    Raises ValueError (one line saying what is wrong) when the text has the prefix but breaks a rule.
    """
    text = str(text).strip()
    if not is_counter_text(text):
        return None
    tokens = text[len(PREFIX):].split()
    if not tokens:
        raise ValueError("no counter name after gpudoctor.counter")
    group = tokens.pop(0)
    if "=" in group or not _NAME.match(group):
        raise ValueError(f"bad counter name {group!r} (expected gpudoctor.counter NAME key=value ...)")
    if not tokens:
        raise ValueError(f"no key=value after gpudoctor.counter {group}")
    values: dict[str, float] = {}
    device = -1
    for tok in tokens:
        key, sep, raw = tok.partition("=")
        if not sep or not _NAME.match(key):
            raise ValueError(f"bad key=value {tok!r}")
        try:
            val = float(raw)
        except ValueError:
            raise ValueError(f"{key}: not a number: {raw!r}") from None
        if key in _DEVICE_KEYS:
            if not math.isfinite(val) or not val.is_integer() or val < 0:
                raise ValueError(f"{key}: not a device index: {raw!r}")
            device = int(val)
            continue
        if key in values:
            raise ValueError(f"{key} given twice")
        values[key] = val
    if not values:
        raise ValueError("no counter value (only a device)")
    return group, values, device


def format_counter_text(group: str, **values: float) -> str:
    """The annotation text for ``values`` (the inverse of parse_counter_text, for tests and emitters)."""
    parts = [PREFIX, group]
    for k, v in values.items():
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        parts.append(f"{k}={v}")
    return " ".join(parts)


def counters_from_ranges(ranges: pd.DataFrame, time_column: str = "start_ns") -> CounterRows:
    """Counters rows from every ``gpudoctor.counter`` text in ``ranges`` (columns rank, text, ``time_column``).

    Texts are parsed once per distinct text (ranges keep texts as categoricals). Rows come out ordered
    as the ranges were.
    """
    empty = CounterRows(conform("counters", pd.DataFrame()), {})
    if ranges is None or len(ranges) == 0 or "text" not in ranges.columns:
        return empty
    col = ranges["text"]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype(str).astype("category")
    cats = [str(c) for c in col.cat.categories]
    # Per distinct text: (names, values, device) or "bad" or None.
    parsed: list = []
    for c in cats:
        try:
            p = parse_counter_text(c)
        except ValueError:
            parsed.append("bad")
            continue
        if p is None:
            parsed.append(None)
        else:
            group, vals, dev = p
            names = [f"{group}.{k}" for k in vals]
            parsed.append((names, list(vals.values()), dev))
    codes = col.cat.codes.to_numpy()
    ranks = ranges["rank"].to_numpy(np.int64) if "rank" in ranges.columns else np.zeros(len(ranges), np.int64)
    times = ranges[time_column].to_numpy(np.int64)

    malformed: dict[int, int] = {}
    bad_codes = np.array([i for i, p in enumerate(parsed) if p == "bad"], dtype=np.int64)
    if len(bad_codes):
        bad_rows = np.isin(codes, bad_codes)
        for r, n in zip(*np.unique(ranks[bad_rows], return_counts=True)):
            malformed[int(r)] = int(n)

    good = [i for i, p in enumerate(parsed) if isinstance(p, tuple)]
    if not good:
        return CounterRows(empty.counters, malformed)
    rows = np.nonzero(np.isin(codes, np.array(good, dtype=np.int64)))[0]
    out_rank, out_dev, out_ts, out_name, out_val = [], [], [], [], []
    for i in rows.tolist():
        names, vals, dev = parsed[codes[i]]
        n = len(names)
        out_rank.append(np.full(n, ranks[i], np.int64))
        out_ts.append(np.full(n, times[i], np.int64))
        out_dev.append(np.full(n, dev, np.int64))
        out_name.extend(names)
        out_val.extend(vals)
    df = pd.DataFrame({
        "rank": np.concatenate(out_rank), "device_id": np.concatenate(out_dev), "ts_ns": np.concatenate(out_ts),
        "name": pd.Categorical(out_name), "value": np.asarray(out_val, dtype=np.float64),
    })
    return CounterRows(conform("counters", df), malformed)
