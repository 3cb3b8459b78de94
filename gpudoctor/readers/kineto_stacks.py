"""Python call stacks of a torch.profiler trace taken with ``with_stack=True`` -> frames, stacks,
host_stacks, and ``stack_id`` on api_calls, cpu_ops and ranges.

torch.profiler's Python tracer writes one ``python_function`` event per Python call (and per call of a
built-in / C function) with ``Python id`` and ``Python parent id``: the call tree of every thread. The
event name is ``file(line): function`` where line is the function's first line (the tracer records
calls, not the line being run), ``<built-in method NAME of TYPE object at 0x...>`` for C functions and
``nn.Module: NAME_i`` for module calls. Each call becomes a ``host_stacks`` row (source
``torch_python_call``) whose stack is the call plus its callers. A CUDA API call, CPU op or range gets
the stack of the innermost Python call running on its thread when it started.

The events are found in the raw text with one regular expression over Kineto's fixed layout (the
Kineto reader skips them unparsed); events that do not match it are counted in ``dropped``.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from gpudoctor.model.stacks import build_stacks, innermost_enclosing
from gpudoctor.model.trace import Trace, conform

SOURCE = "kineto_stacks"
R_LAYOUT = "python_function event not in Kineto's layout"
R_NO_PARENT = "python_function event whose parent is missing (parent taken as outermost)"

_NUM = rb"-?\d+(?:\.\d+)?"  # Kineto writes plain decimals; anything else is counted in dropped
# Two groups per event: the name, and the block of numbers pid, tid, ts, dur, parent id, id (parsed at once).
_EVENT = re.compile(
    rb'"cat":\s*"python_function",\s*"name":\s*"([^"\\]*(?:\\.[^"\\]*)*)",\s*('
    rb'"pid":\s*-?\d+,\s*"tid":\s*-?\d+,\s*"ts":\s*' + _NUM + rb',\s*"dur":\s*' + _NUM +
    rb'\s*,\s*"args":\s*\{\s*"Python parent id":\s*(?:null|-?\d+),\s*"Python id":\s*-?\d+)')
# bytes -> bytes table keeping the characters of numbers and blanking the rest (keys, quotes, colons)
_KEEP_NUMBERS = bytes(c if chr(c) in "0123456789.-" else 32 for c in range(256))
_PY_ID = b'"Python id"'
_FILE_LINE = re.compile(r"^(.*)\((\d+)\): (.*)$")
_BUILTIN_METHOD = re.compile(r"^<built-in method (\S+) of (\S+) object(?: at 0x[0-9a-fA-F]+)?>$")
_BUILTIN_FUNCTION = re.compile(r"^<built-in function (\S+)>$")
_MODULE = re.compile(r"^nn\.Module: (.*?)(?:_\d+)?$")


def parse_name(name: str) -> tuple[str, int, str]:
    """(file, line, function) of a python_function event name; native functions get file "" and line -1,
    addresses are left out so that every call of the same method is one frame."""
    m = _FILE_LINE.match(name)
    if m:
        return m.group(1), int(m.group(2)), m.group(3)
    m = _BUILTIN_METHOD.match(name)
    if m:
        owner = m.group(2)
        return "", -1, (m.group(1) if owner.startswith("pybind11") else f"{owner}.{m.group(1)}")
    m = _BUILTIN_FUNCTION.match(name)
    if m:
        return "", -1, m.group(1)
    m = _MODULE.match(name)
    if m:
        return "", -1, f"nn.Module: {m.group(1)}"
    return "", -1, name


def _raw(path: Path) -> bytes:
    with open(path, "rb") as f:
        magic = f.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read()


def add_python_stacks(trace: Trace, path: str | Path) -> None:
    """Fill ``trace``'s stack tables from the python_function events of the torch.profiler trace at
    ``path`` (the Kineto reader's result for that file; one rank). Does nothing when the trace has none."""
    counts = trace.meta.get("torch_profiler", {}).get("event_counts", {})
    if not counts.get("X/python_function"):
        return
    data = _raw(Path(path))
    found = _EVENT.findall(data)
    rank = int(trace.ranks["rank"].iat[0]) if len(trace.ranks) else 0
    # events of the Python tracer (they carry a Python id) that the pattern could not take
    trace.add_dropped(rank, SOURCE, R_LAYOUT, max(data.count(_PY_ID) - len(found), 0))
    del data
    if not found:
        return
    names, blocks = zip(*found)
    text = b" ".join(blocks).replace(b"null", b"-1").translate(_KEEP_NUMBERS)
    del found, blocks
    nums = np.fromstring(text, dtype=np.float64, sep=" ").reshape(len(names), 6)  # one C pass over all numbers
    tids, ts, dur, parents, ids = nums[:, 1], nums[:, 2], nums[:, 3], nums[:, 4], nums[:, 5]
    offset = int(trace.ranks["clock_offset_ns"].iat[0]) if len(trace.ranks) else 0
    us = trace.meta.get("torch_profiler", {}).get("ts_unit", "us") != "ns"
    scale = 1000.0 if us else 1.0
    start = np.round(ts * scale).astype(np.int64) + offset
    end = start + np.round(dur * scale).astype(np.int64)
    thread = tids.astype(np.int64)
    py_id = ids.astype(np.int64)
    py_parent = parents.astype(np.int64)
    # parent index: position of the event whose Python id is the parent id
    order = np.argsort(py_id, kind="stable")
    at = np.clip(np.searchsorted(py_id[order], py_parent), 0, len(order) - 1)
    has = (py_parent >= 0) & (py_id[order][at] == py_parent)
    parent = np.where(has, order[at], -1)
    trace.add_dropped(rank, SOURCE, R_NO_PARENT, int(((py_parent >= 0) & ~has).sum()))
    name_codes, uniq_names = pd.factorize(np.array(names, dtype=object))
    parsed = [parse_name(_decode(b)) for b in uniq_names]
    frames, stacks, node_stack = build_stacks(
        rank, np.array([p[0] for p in parsed], dtype=object), np.array([p[1] for p in parsed], dtype=np.int64),
        np.array([p[2] for p in parsed], dtype=object), parent, node_frame=name_codes)
    trace.frames = frames
    trace.stacks = stacks
    trace.host_stacks = conform("host_stacks", {
        "rank": np.full(len(start), rank, np.int64), "thread_id": thread, "start_ns": start, "end_ns": end,
        "stack_id": node_stack, "source": pd.Categorical.from_codes(np.zeros(len(start), np.int8),
                                                                      categories=["torch_python_call"]),
    }).sort_values(["start_ns", "thread_id"], kind="stable").reset_index(drop=True)
    for table in ("api_calls", "cpu_ops", "ranges"):
        df = trace.table(table)
        if len(df):
            span = innermost_enclosing(thread, start, end, parent, df["thread_id"].to_numpy(np.int64),
                                       df["start_ns"].to_numpy(np.int64))
            df["stack_id"] = np.where(span >= 0, node_stack[np.clip(span, 0, None)], -1)


def _decode(raw: bytes) -> str:
    return json.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode("utf-8", "replace")
