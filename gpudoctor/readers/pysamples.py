"""Python stack samples written by the in-process agent (``gpudoctor.collect.pysampler``) -> frames,
stacks and host_stacks rows of the trace they were taken beside.

A sample file is not an input of its own: it belongs to the report with the same stem in the same
folder (``trace.pysamples.json`` beside ``trace.sqlite`` / ``trace.nsys-rep`` / ``trace.torch.json.gz``)
and is read with it. The samples carry the sampler's clock; the trace holds the marker ranges
(``ANCHOR``) the sampler emitted at its start and end, so samples are mapped onto the trace's clock
through them, and their thread is the thread those ranges were recorded on. Samples that cannot be
placed (no marker range in the trace) are counted in ``dropped``, never guessed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from gpudoctor.collect.pysampler import ANCHOR, FORMAT
from gpudoctor.errors import InputError
from gpudoctor.model.stacks import build_stacks
from gpudoctor.model.trace import Trace, conform

SUFFIX = ".pysamples.json"
_REPORT_SUFFIXES = (".torch.json.gz", ".torch.json", ".json.gz", ".json", ".sqlite.gz", ".sqlite", ".nsys-rep")


def is_sample_file(path: Path) -> bool:
    return path.name.endswith(SUFFIX)


def sibling(report: Path) -> Path | None:
    """The sample file that belongs to ``report``, if there is one."""
    name = report.name
    for suffix in _REPORT_SUFFIXES:
        if name.endswith(suffix) and not name.endswith(SUFFIX):
            candidate = report.with_name(name[: -len(suffix)] + SUFFIX)
            return candidate if candidate.is_file() else None
    return None


def _load(path: Path) -> dict:
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise InputError(path, f"unreadable Python stack samples ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(path, "not a gpudoctor Python stack sample file")
    return doc


def _clock_map(anchor_t: np.ndarray, range_mid: np.ndarray):
    """Sampler time -> trace time, from the matched marker pairs (a shift, or a line through two)."""
    if len(anchor_t) >= 2 and anchor_t[-1] > anchor_t[0]:
        scale = (range_mid[-1] - range_mid[0]) / (anchor_t[-1] - anchor_t[0])
        return lambda t: (range_mid[0] + (t - anchor_t[0]) * scale).astype(np.int64)
    return lambda t: (t + (range_mid[0] - anchor_t[0])).astype(np.int64)


def _check(path: Path, t_ns: np.ndarray, sample_stack: np.ndarray, frames_in: list, stacks_in: list) -> None:
    if len(t_ns) != len(sample_stack):
        raise InputError(path, "sample times and stacks differ in length")
    if len(sample_stack) and (sample_stack.min() < 0 or sample_stack.max() >= len(stacks_in)):
        raise InputError(path, "a sample points at a stack the file does not have")
    if any(not stack for stack in stacks_in):
        raise InputError(path, "a stack without frames")
    if any(not (0 <= f < len(frames_in)) for stack in stacks_in for f in stack):
        raise InputError(path, "a stack points at a frame the file does not have")


def _sampler_frames(frames_in: list) -> set[int]:
    """Ids of the sampler's own handler frames (files written before the sampler skipped them itself)."""
    return {i for i, f in enumerate(frames_in)
            if str(f[0]).replace("\\", "/").endswith("gpudoctor/collect/pysampler.py") and str(f[2]) in ("_on_signal", "_record")}


def attach(trace: Trace, path: Path) -> None:
    """Add the samples of ``path`` to ``trace`` (one rank): frames, stacks and host_stacks rows."""
    doc = _load(path)
    t_ns = np.asarray(doc.get("t_ns") or [], dtype=np.int64)
    sample_stack = np.asarray(doc.get("stack") or [], dtype=np.int64)
    rank = int(trace.ranks["rank"].iat[0]) if len(trace.ranks) else 0
    source = f"{path.name}"
    frames_in = doc.get("frames") or []
    stacks_in = doc.get("stacks") or []
    _check(path, t_ns, sample_stack, frames_in, stacks_in)  # before anything is added to the trace
    if doc.get("overflow"):
        trace.add_dropped(rank, source, "Python stack samples beyond the sampler's limit", int(doc["overflow"]))
    if doc.get("cut"):
        trace.add_dropped(rank, source, "Python stack sample cut short by a signal that stopped the program",
                          int(doc["cut"]))
    r = trace.ranges
    marks = r[r["text"].astype(str).to_numpy() == ANCHOR].sort_values("start_ns", kind="stable")
    anchors = doc.get("anchors") or []
    n = min(len(marks), len(anchors))
    if n == 0 or not len(t_ns):
        trace.add_dropped(rank, source, "Python stack samples without their clock marker in the trace", len(t_ns))
        return
    anchor_t = np.array([a["t_ns"] for a in anchors[:n]], dtype=np.int64)
    mid = ((marks["start_ns"].to_numpy(np.int64)[:n] + marks["end_ns"].to_numpy(np.int64)[:n]) // 2)
    trace_t = _clock_map(anchor_t, mid)(t_ns)
    thread = int(marks["thread_id"].iat[0])

    # one node per frame of each distinct stack, outermost first; a stack's id is its innermost node's
    node_frame, node_parent, innermost = [], [], np.full(len(stacks_in), -1, np.int64)
    own = _sampler_frames(frames_in)
    for i, frame_ids in enumerate(stacks_in):  # distinct stacks: thousands at most in a window
        k = 0  # the sampler's own handler, caught by a signal of its own: the sample is its caller's
        while k < len(frame_ids) - 1 and frame_ids[k] in own:
            k += 1
        frame_ids = frame_ids[k:]
        parent = -1
        for fid in reversed(frame_ids):
            node_frame.append(fid)
            node_parent.append(parent)
            parent = len(node_frame) - 1
        innermost[i] = parent
    files = [str(f[0]) for f in frames_in]
    lines = [int(f[1]) for f in frames_in]
    funcs = [str(f[2]) for f in frames_in]
    frames, stacks, node_stack = build_stacks(rank, files, lines, funcs, np.asarray(node_parent),
                                              node_frame=np.asarray(node_frame))
    stack_of_sample = node_stack[innermost[sample_stack]]
    _append(trace, rank, frames, stacks, thread, trace_t, stack_of_sample)
    trace.meta.setdefault("pysamples", []).append({
        "path": str(path), "samples": int(len(t_ns)), "interval_s": doc.get("interval_s"),
        "sampler_busy_ms": round(float(doc.get("sampler_busy_ns") or 0) / 1e6, 1), "anchors_matched": n,
        "nested_signals": int(doc.get("nested") or 0)})


def _append(trace: Trace, rank: int, frames: pd.DataFrame, stacks: pd.DataFrame, thread: int,
            t: np.ndarray, stack_id: np.ndarray) -> None:
    """Append to the rank's frame and stack tables (ids continue after the ones already there)."""
    mine_f = trace.frames["rank"].to_numpy() == rank
    mine_s = trace.stacks["rank"].to_numpy() == rank
    f0 = int(trace.frames.loc[mine_f, "frame_id"].max()) + 1 if mine_f.any() else 0
    s0 = int(trace.stacks.loc[mine_s, "stack_id"].max()) + 1 if mine_s.any() else 0
    frames = frames.assign(frame_id=frames["frame_id"] + f0)
    stacks = stacks.assign(stack_id=stacks["stack_id"] + s0, frame_id=stacks["frame_id"] + f0,
                           parent_id=np.where(stacks["parent_id"] >= 0, stacks["parent_id"] + s0, -1))
    rows = conform("host_stacks", {"rank": np.full(len(t), rank, np.int64), "thread_id": np.full(len(t), thread, np.int64),
                                   "start_ns": t, "end_ns": t, "stack_id": stack_id + s0,
                                   "source": np.full(len(t), "python_sample", dtype=object)})
    for name, new in (("frames", frames), ("stacks", stacks), ("host_stacks", rows)):
        old = trace.table(name)
        trace.set(name, pd.concat([old, new], ignore_index=True) if len(old) else new)
