"""Steady state: find the steps of a run, skip warm-up, and say which window was used.

Steps come from, in order of preference:
1. ProfilerStep#N ranges (torch.profiler's ``prof.step()``);
2. the outermost repeated host range whose name looks like a step (``step_3``, ``train_step``,
   ``decode_step``, ``iteration 7``), or failing that any outermost range repeated at least 3 times;
3. a repeated kernel sequence: the kernel name that occurs once per step (the most common occurrence
   count among names seen at least 3 times), its launches taken as step starts.
Each step's GPU span is its projection onto the GPU. Warm-up: the first step is always skipped when
there are at least 3; further leading steps are skipped while they take over 1.25x the median.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

STEP_NAME = re.compile(r"(^|[^a-z])(step|iter|iteration|batch)([^a-z]|$)|profilerstep", re.I)
_DIGITS = re.compile(r"\d+")
WARMUP_RATIO = 1.25


@dataclass
class StepWindow:
    steps: pd.DataFrame  # index, name, gpu_start_ns, gpu_end_ns, duration_ns, warmup
    start_ns: int
    end_ns: int
    source: str  # how the steps were found, for the user

    @property
    def steady(self) -> pd.DataFrame:
        # .loc with a bool mask: on an empty frame a plain [] would select columns instead of rows.
        return self.steps.loc[~self.steps["warmup"].astype(bool)]

    @property
    def duration_ns(self) -> int:
        return int(self.end_ns - self.start_ns)

    def describe(self) -> str:
        n, w = len(self.steps), int(self.steps["warmup"].sum())
        if n == 0:
            return f"whole trace ({self.source})"
        return f"{n - w} steady steps of {n} ({w} warm-up skipped), {self.source}"


def _normalize(text: pd.Series) -> pd.Series:
    return text.astype(str).str.replace(_DIGITS, "#", regex=True)


def _from_ranges(ranges: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
    r = ranges[(ranges["gpu_start_ns"] >= 0) & (ranges["gpu_kernel_count"] > 0)]
    if r.empty:
        return None
    prof = r[r["domain"].astype(str) == "profiler_step"]
    if len(prof) >= 2:
        return prof, "ProfilerStep ranges"
    r = r.assign(key=_normalize(r["text"]))
    groups = r.groupby("key", observed=True).agg(
        n=("text", "size"), depth=("depth", "min"), gpu_ns=("gpu_end_ns", "sum"))
    groups = groups[groups["n"] >= 2]
    if groups.empty:
        return None
    stepish = groups[[bool(STEP_NAME.search(k)) for k in groups.index]]
    pick = stepish if len(stepish) else groups[groups["n"] >= 3]
    if pick.empty:
        return None
    # Outermost first, then the most repetitions.
    key = pick.sort_values(["depth", "n"], ascending=[True, False]).index[0]
    sel = r[(r["key"] == key) & (r["depth"] == pick.loc[key, "depth"])]
    return sel.drop(columns="key"), f"ranges named '{key}'"


def _from_kernels(kernels: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
    if len(kernels) < 6:
        return None
    k = kernels.sort_values("start_ns", kind="stable")
    counts = k["name"].value_counts()
    counts = counts[counts >= 3]
    if counts.empty:
        return None
    n_steps = int(counts.value_counts().idxmax())
    names_with_n = set(counts[counts == n_steps].index)
    first_seen = k[k["name"].isin(names_with_n)].drop_duplicates("name")
    anchor = first_seen["name"].iloc[0]
    starts = k.loc[k["name"] == anchor, "start_ns"].to_numpy()
    ends = np.r_[starts[1:], k["end_ns"].max()]
    # Each step ends at the last kernel end before the next anchor.
    kend = k["end_ns"].to_numpy()
    kstart = k["start_ns"].to_numpy()
    last_idx = np.searchsorted(kstart, ends, side="left") - 1
    gpu_end = np.maximum.accumulate(kend)[np.clip(last_idx, 0, len(kend) - 1)]
    steps = pd.DataFrame({"text": [str(anchor)] * len(starts), "gpu_start_ns": starts, "gpu_end_ns": gpu_end})
    return steps, f"repeated kernel sequence (one '{str(anchor)[:60]}' per step)"


def find_steps(ranges: pd.DataFrame, kernels: pd.DataFrame) -> StepWindow:
    """Steps and the steady-state window of one rank."""
    found = _from_ranges(ranges) or _from_kernels(kernels)
    if found is None:
        if kernels.empty:
            return StepWindow(pd.DataFrame(columns=["index", "name", "gpu_start_ns", "gpu_end_ns", "duration_ns", "warmup"]),
                              0, 0, "no GPU work")
        s, e = int(kernels["start_ns"].min()), int(kernels["end_ns"].max())
        return StepWindow(pd.DataFrame(columns=["index", "name", "gpu_start_ns", "gpu_end_ns", "duration_ns", "warmup"]),
                          s, e, "no steps found: whole trace")
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
    return StepWindow(steps, int(steady["gpu_start_ns"].min()), int(steady["gpu_end_ns"].max()), source)


def merge_intervals(start, end) -> tuple[np.ndarray, np.ndarray]:
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
