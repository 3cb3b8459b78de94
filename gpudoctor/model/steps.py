"""Steady state: find the steps of a run, skip warm-up, and say which window was used.

Steps come from, in order of preference (real markers first):
1. ProfilerStep#N ranges (torch.profiler's ``prof.step()``), even a single one;
2. the outermost repeated host range whose name looks like a step (``step_3``, ``train_step``,
   ``decode_step``, ``iteration 7``: NVTX or record_function);
3. optimizer steps (``Optimizer.step#AdamW.step``, which torch.optim records by itself, or a range named
   ``optimizer.step`` / ``optimizer_step``): one step ends where an optimizer step's GPU work ends, so
   step i runs from the end of optimizer step i-1 (the first kernel for i = 0) to the end of step i;
4. any other outermost host range repeated at least 3 times whose GPU spans hold at least
   ``MIN_SEQUENCE_COVERAGE`` of the kernel time (a repeated name is not a step marker by itself);
5. a repeated kernel sequence: the same kernels, by full identity (the demangled name, not the short
   name: many different kernels share a short name such as ``vectorized_elementwise_kernel``), at least
   ``MIN_SEQUENCE_KERNELS`` of them, repeated back to back at least twice, the repetitions holding at
   least ``MIN_SEQUENCE_COVERAGE`` of the kernel time. The repetitions are the steps.
Otherwise: "no steps found" with the reason, and the window is the whole trace (nothing is skipped).
Each step's GPU span is its projection onto the GPU. Warm-up: the first step is always skipped when
there are at least 3; further leading steps are skipped while they take over 1.25x the median.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import numpy.typing as npt

STEP_NAME = re.compile(r"(^|[^a-z])(step|iter|iteration|batch)([^a-z]|$)|profilerstep", re.I)
OPTIMIZER_STEP = re.compile(r"^optimizer\.step#|(^|[^a-z])optimizer[._ ]?step([^a-z]|$)", re.I)
_DIGITS = re.compile(r"\d+")
WARMUP_RATIO = 1.25
MIN_SEQUENCE_KERNELS = 8  # a repeated kernel sequence shorter than this is not taken as a step
MIN_SEQUENCE_COVERAGE = 0.8  # ... nor one whose repetitions hold less of the kernel time
_MAX_ANCHORS = 64  # anchor kernels tried by the sequence search


@dataclass
class StepWindow:
    steps: pd.DataFrame  # index, name, gpu_start_ns, gpu_end_ns, duration_ns, warmup
    start_ns: int
    end_ns: int
    source: str  # how the steps were found (or why none were), for the user
    # The steady steps on the host's clock, when the steps are host ranges (None: only the GPU's). A host-bound
    # loop's GPU work for step i begins after the host's work for it, so the GPU window [start_ns, end_ns)
    # holds the host work of steps 2..n+1, not 1..n: host time per step is counted over this span instead.
    host_start_ns: int | None = None
    host_end_ns: int | None = None

    @property
    def steady(self) -> pd.DataFrame:
        # .loc with a bool mask: on an empty frame a plain [] would select columns instead of rows.
        return self.steps.loc[~self.steps["warmup"].astype(bool)]

    @property
    def duration_ns(self) -> int:
        return int(self.end_ns - self.start_ns)

    @property
    def host_span(self) -> tuple[int, int]:
        """[start, end) of the steady steps on the host (the GPU window when the steps have no host ranges)."""
        if self.host_start_ns is None or self.host_end_ns is None:
            return self.start_ns, self.end_ns
        return self.host_start_ns, self.host_end_ns

    def describe(self) -> str:
        n, w = len(self.steps), int(self.steps["warmup"].sum())
        if n == 0:
            return f"whole trace ({self.source})"
        return f"{n - w} steady steps of {n} ({w} warm-up skipped), {self.source}"


def _normalize(text: pd.Series) -> pd.Series:
    return text.astype(str).str.replace(_DIGITS, "#", regex=True)


def _from_ranges(ranges: pd.DataFrame, kernels: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
    r = ranges[(ranges["gpu_start_ns"] >= 0) & (ranges["gpu_kernel_count"] > 0)]
    if r.empty:
        return None
    prof = r[r["domain"].astype(str) == "profiler_step"]
    if len(prof) >= 1:
        return prof, "ProfilerStep ranges"
    r = r.assign(key=_normalize(r["text"]))
    groups = r.groupby("key", observed=True).agg(
        n=("text", "size"), depth=("depth", "min"), gpu_ns=("gpu_end_ns", "sum"))
    is_opt = np.array([bool(OPTIMIZER_STEP.search(k)) for k in groups.index], dtype=bool)
    named = np.array([bool(STEP_NAME.search(k)) for k in groups.index], dtype=bool)
    stepish = groups[~is_opt & named & (groups["n"].to_numpy() >= 2)]
    if len(stepish):
        return _outermost(r, stepish)
    found = _from_optimizer(r[r["key"].isin(groups.index[is_opt])], kernels)
    if found is not None:
        return found
    repeated = groups[~is_opt & (groups["n"].to_numpy() >= 3)]
    if repeated.empty:
        return None
    sel, source = _outermost(r, repeated)
    # Not a step marker, only a repeated name: a step only if its GPU spans hold most of the kernel time
    held = _kernel_time_fraction(kernels, sel["gpu_start_ns"].to_numpy(np.int64), sel["gpu_end_ns"].to_numpy(np.int64))
    return (sel, source) if held >= MIN_SEQUENCE_COVERAGE else None


def _kernel_time_fraction(kernels: pd.DataFrame, span_start: np.ndarray, span_end: np.ndarray) -> float:
    """Share of the kernel time (sum of durations) of the kernels that start inside one of the spans."""
    ks = kernels["start_ns"].to_numpy(np.int64)
    dur = np.maximum(kernels["end_ns"].to_numpy(np.int64) - ks, 0)
    total = float(dur.sum())
    if total <= 0 or len(span_start) == 0:
        return 0.0
    bs, be = merge_intervals(span_start, span_end)
    i = np.searchsorted(bs, ks, side="right") - 1
    inside = (i >= 0) & (ks <= be[np.maximum(i, 0)])
    return float(dur[inside].sum()) / total


def _outermost(r: pd.DataFrame, pick: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    # Outermost first, then the most repetitions. The ranges of that name that no other range of the same
    # name holds: not the ones at one nesting depth, because start/end ranges (gpudoctor's own
    # ProfilerStep#N over nsys) cross the program's push/pop ranges and land at different depths.
    key = pick.sort_values(["depth", "n"], ascending=[True, False]).index[0]
    sel = r[r["key"] == key].sort_values(["start_ns", "end_ns"], ascending=[True, False], kind="stable")
    end = sel["end_ns"].to_numpy(np.int64)
    held = np.r_[False, end[1:] <= np.maximum.accumulate(end)[:-1]]
    return sel[~held].drop(columns="key"), f"ranges named '{key}'"


def _from_optimizer(opt: pd.DataFrame, kernels: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
    if opt.empty or kernels.empty:
        return None
    # Several optimizers per step (e.g. Shampoo, then an EMA): the step ends with the last one, so take
    # the most frequent name, and among those the one whose first range ends latest.
    g = opt.groupby("key", observed=True).agg(n=("key", "size"), first_end=("gpu_end_ns", "min"))
    key = g.sort_values(["n", "first_end"], ascending=[False, False]).index[0]
    opt = opt[opt["key"] == key].sort_values("gpu_end_ns", kind="stable")
    ends = opt["gpu_end_ns"].to_numpy(np.int64)
    first = int(kernels["start_ns"].min())
    kstart = np.sort(kernels["start_ns"].to_numpy(np.int64))
    # step i starts with the first kernel after optimizer step i-1 ends
    nxt = np.searchsorted(kstart, ends[:-1], side="right")
    starts = np.r_[first, kstart[np.minimum(nxt, len(kstart) - 1)]]
    steps = pd.DataFrame({"text": opt["text"].astype(str).to_numpy(), "gpu_start_ns": np.minimum(starts, ends),
                          "gpu_end_ns": ends})
    return steps, f"optimizer steps ('{opt['key'].iloc[0]}' ranges end each step)"


def _from_kernels(kernels: pd.DataFrame) -> tuple[pd.DataFrame, str] | str:
    """Steps from a kernel sequence that repeats back to back; else the reason there are none.

    Candidate periods come from anchor kernels whose occurrences are evenly spaced at the end (fewest
    repetitions first: the longest repeating sequence is the step, so a step made of two identical
    halves stays one step). The periodic stretch is where ``seq[i] == seq[i + period]``; its blocks are
    aligned on the longest GPU idle gap inside a period (steps are usually separated by host work);
    what comes before the first block is one step of its own (warm-up when there are >= 3)."""
    why = (f"no step markers, and no sequence of at least {MIN_SEQUENCE_KERNELS} kernels repeats to hold "
           f"{MIN_SEQUENCE_COVERAGE:.0%} of the kernel time")
    n_k = len(kernels)
    if n_k < 2 * MIN_SEQUENCE_KERNELS:
        return f"no step markers, and {n_k} kernels are too few for a repeated sequence"
    order = np.argsort(kernels["start_ns"].to_numpy(np.int64), kind="stable")
    ident = kernels["demangled_name"] if "demangled_name" in kernels else kernels["name"]
    full = ident.astype(str).to_numpy()
    full = np.where(full == "", kernels["name"].astype(str).to_numpy(), full)
    seq = pd.factorize(full[order])[0]
    start = kernels["start_ns"].to_numpy(np.int64)[order]
    end = kernels["end_ns"].to_numpy(np.int64)[order]
    dur = np.maximum(end - start, 0)
    total = float(dur.sum())
    if total <= 0:
        return why
    idle_before = np.r_[0, start[1:] - np.maximum.accumulate(end)[:-1]]
    counts = np.bincount(seq)
    first_pos = np.full(len(counts), n_k, np.int64)
    np.minimum.at(first_pos, seq, np.arange(n_k))
    tried, periods = 0, set()
    for reps in np.unique(counts[(counts >= 2) & (counts * MIN_SEQUENCE_KERNELS <= n_k)]):
        anchors = np.flatnonzero(counts == reps)
        for a in anchors[np.argsort(first_pos[anchors])][:8]:
            tried += 1
            if tried > _MAX_ANCHORS:
                return why
            gaps = np.diff(np.flatnonzero(seq == a))
            period = int(gaps[-1])
            if period < MIN_SEQUENCE_KERNELS or period in periods:
                continue
            periods.add(period)
            found = _periodic_steps(seq, start, end, dur, idle_before, total, period,
                                    int(np.flatnonzero(seq == a)[-1]))
            if found is not None:
                return found
    return why


def _periodic_steps(seq, start, end, dur, idle_before, total, period: int, inside: int):
    """Blocks of ``period`` kernels repeating around position ``inside``, or None."""
    n_k = len(seq)
    same = seq[:-period] == seq[period:]  # same[i]: kernel i is repeated one period later
    at = min(inside, len(same) - 1) if inside >= len(same) else inside
    if at >= len(same) or not same[at]:
        at = max(inside - period, 0)
        if at >= len(same) or not same[at]:
            return None
    breaks = np.flatnonzero(~same)
    lo = int(breaks[breaks < at].max()) + 1 if (breaks < at).any() else 0
    hi = int(breaks[breaks > at].min()) if (breaks > at).any() else len(same)
    region_end = hi + period  # kernels lo .. region_end-1 are periodic
    if region_end - lo < 2 * period:
        return None
    # align the blocks on the longest idle gap within a period (median over the repetitions)
    span = ((region_end - lo) // period) * period
    gaps = idle_before[lo:lo + span].reshape(-1, period)
    shift = int(np.argmax(np.median(gaps, axis=0)))
    first = lo + shift
    n_rep = (region_end - first) // period
    if n_rep < 2:
        first, n_rep = lo, (region_end - lo) // period
    # Identical layers repeat too: when every m-th block starts after a much longer idle gap than the
    # others, the step is m blocks (decode: one token = all the layers, then the host samples).
    block_gap = idle_before[first:first + n_rep * period:period]
    big = np.flatnonzero(block_gap > 4 * max(float(np.median(block_gap)), 1.0))
    if len(big) >= 2 and (np.diff(big) == big[1] - big[0]).all() and big[1] - big[0] >= 2:
        first, period = first + int(big[0]) * period, int(big[1] - big[0]) * period
        n_rep = (region_end - first) // period
        if n_rep < 2:
            return None
    hi_k = first + n_rep * period
    held = float(dur[first:hi_k].sum()) / total
    if held < MIN_SEQUENCE_COVERAGE:
        return None
    seg_start = start[first:hi_k:period]
    seg_end = np.maximum.reduceat(end[first:hi_k], np.arange(0, n_rep * period, period))
    names = [f"kernel sequence {i}" for i in range(n_rep)]
    note = [f"{n_rep} repetitions of {period} kernels holding {held:.0%} of the kernel time"]
    if first >= MIN_SEQUENCE_KERNELS:  # what ran before the first repetition: one step (warm-up when >= 3)
        seg_start, seg_end = np.r_[start[0], seg_start], np.r_[end[:first].max(), seg_end]
        names = ["before the repeated sequence"] + names
        note.append(f"{first} kernels before them form the first step")
    elif first:
        note.append(f"{first} kernels before them are outside the steps")
    if n_k > hi_k:
        note.append(f"{n_k - hi_k} kernels after them are outside the steps")
    steps = pd.DataFrame({"text": names, "gpu_start_ns": seg_start, "gpu_end_ns": seg_end})
    return steps, "repeated kernel sequence (" + "; ".join(note) + ")"


def find_steps(ranges: pd.DataFrame, kernels: pd.DataFrame) -> StepWindow:
    """Steps and the steady-state window of one rank."""
    empty = pd.DataFrame(columns=["index", "name", "gpu_start_ns", "gpu_end_ns", "duration_ns", "warmup"])
    if kernels.empty:
        return StepWindow(empty, 0, 0, "no GPU work")
    found = _from_ranges(ranges, kernels) or _from_kernels(kernels)
    if isinstance(found, str):
        s, e = int(kernels["start_ns"].min()), int(kernels["end_ns"].max())
        return StepWindow(empty, s, e, f"no steps found: {found}")
    sel, source = found
    sel = sel.sort_values("gpu_start_ns", kind="stable")
    steps = pd.DataFrame({
        "index": np.arange(len(sel)),
        "name": sel["text"].astype(str).to_numpy(),
        "gpu_start_ns": sel["gpu_start_ns"].to_numpy(np.int64),
        "gpu_end_ns": sel["gpu_end_ns"].to_numpy(np.int64),
    })
    steps["duration_ns"] = steps["gpu_end_ns"] - steps["gpu_start_ns"]
    warm = np.zeros(len(steps), dtype=bool)
    if len(steps) >= 3:
        warm[0] = True
        i = 1
        while i < len(steps) - 2:
            if steps["duration_ns"].iloc[i] > WARMUP_RATIO * float(np.median(steps["duration_ns"].iloc[i:])):
                warm[i] = True
                i += 1
            else:
                break
    steps["warmup"] = warm
    steady = steps[~steps["warmup"]]
    host = sel.loc[~warm] if {"start_ns", "end_ns"} <= set(sel.columns) else None
    return StepWindow(steps, int(steady["gpu_start_ns"].min()), int(steady["gpu_end_ns"].max()), source,
                      None if host is None else int(host["start_ns"].min()),
                      None if host is None else int(host["end_ns"].max()))


def merge_intervals(start: npt.ArrayLike, end: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The union of intervals [start, end) as disjoint blocks, sorted: (block starts, block ends), int64."""
    s = np.asarray(start, dtype=np.int64)
    e = np.asarray(end, dtype=np.int64)
    if len(s) == 0:
        return s, e
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    run_end = np.maximum.accumulate(e)
    # A new block starts where the start is past every earlier end; a block ends at the running maximum
    # of the ends at its last interval.
    first = np.nonzero(np.r_[True, s[1:] > run_end[:-1]])[0]
    last = np.r_[first[1:] - 1, len(s) - 1]
    return s[first], run_end[last]


def union_ns(start: np.ndarray, end: np.ndarray, lo: int | None = None, hi: int | None = None) -> int:
    """Total length of the union of intervals, clipped to [lo, hi]."""
    if len(start) == 0:
        return 0
    s = np.asarray(start, dtype=np.int64)
    e = np.asarray(end, dtype=np.int64)
    if lo is not None:
        s, e = np.maximum(s, lo), np.minimum(e, hi)
        keep = e > s
        s, e = s[keep], e[keep]
        if len(s) == 0:
            return 0
    block_start, block_end = merge_intervals(s, e)
    return int((block_end - block_start).sum())
