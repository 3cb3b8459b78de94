"""The summary tables of an analysis (gpudoctor.model.stats over each rank's steady-state window) for
the terminal (``gpudoctor analyze --summary``), CSV files (``--csv DIR``), the dashboard and the report.

Raw tables keep nanoseconds and fractions (units in the column names, as in the CSV files);
:func:`display` turns them into microseconds and percents for people.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pandas as pd

from gpudoctor.model import stats

if TYPE_CHECKING:
    from rich.console import Console

    from gpudoctor.analyzers.analysis import Analysis

KINDS = ("kernels", "api", "ops", "steps", "launch")
TITLES = {"kernels": "Kernels (steady-state window)", "api": "CUDA API calls (steady-state window)",
          "ops": ("Operators (PyTorch ops with input shapes, whole trace; the ops the trace model keeps: "
                 "matrix products, attention, convolution, softmax)"), "steps": "Steps (steady-state window)",
          "launch": "Launch delay: kernel start minus its launch call's start (steady-state window)"}
EMPTY_WHY = {"kernels": "no kernels in the steady-state window",
             "api": "no CUDA API calls in this trace (nsys records them with -t cuda; torch.profiler with CUDA activities)",
             "ops": "no framework operators in this trace (a torch.profiler trace recorded with record_shapes has them)",
             "steps": "no steps found (mark them with NVTX ranges, gpudoctor.annotate.step() or torch.profiler steps)",
             "launch": "no kernels matched to launch calls (needs CUDA API calls with correlation ids)"}


def windows(analysis: Analysis) -> dict[int, tuple[int, int]]:
    return {int(r.rank): (int(r.window.start_ns), int(r.window.end_ns)) for r in analysis.ranks
            if r.window.end_ns > r.window.start_ns}


def tables(analysis: Analysis, kinds: Iterable[str] = KINDS) -> dict[str, pd.DataFrame]:
    """The raw summary tables (``_ns`` and ``_fraction`` columns) of ``kinds``."""
    t = analysis.trace
    w = windows(analysis)
    out: dict[str, pd.DataFrame] = {}
    for kind in kinds:
        if kind == "kernels":
            out[kind] = stats.kernel_stats(t, w)
        elif kind == "api":
            out[kind] = stats.api_stats(t, w)
        elif kind == "ops":
            out[kind] = stats.op_stats(t)
        elif kind == "steps":
            out[kind] = step_table(analysis)
        elif kind == "launch":
            out[kind] = stats.launch_delay_stats(stats.launch_delays(t, w))
        else:
            raise ValueError(f"unknown summary {kind!r}; one of {', '.join(KINDS)}")
    return out


def step_table(analysis: Analysis) -> pd.DataFrame:
    """:func:`gpudoctor.model.stats.step_stats` of the steady steps, plus the idle time of each step by
    the gpu_idle analyzer's causes (``idle_<cause>_ns``, by where each idle gap starts)."""
    steps = {int(r.rank): r.window.steady for r in analysis.ranks}
    st = stats.step_stats(analysis.trace, steps)
    if st.empty:
        return st
    from gpudoctor.analyzers import gpu_idle
    from gpudoctor.analyzers.config import Config
    from gpudoctor.analyzers.context import build_context

    parts = []
    for rank, g in st.groupby("rank", sort=True):
        ctx = build_context(analysis.trace, int(rank), Config())
        gaps = gpu_idle.find_gaps(ctx)
        g = g.copy()
        cause, _ = gpu_idle.attribute(ctx, gaps) if len(gaps) else (np.zeros(0, np.int64), {})
        g0 = gaps["g0"].to_numpy(np.int64) if len(gaps) else np.zeros(0, np.int64)
        dur = gaps["dur_ns"].to_numpy(np.int64) if len(gaps) else np.zeros(0, np.int64)
        s0 = g["start_ns"].to_numpy(np.int64)
        s1 = s0 + g["step_ns"].to_numpy(np.int64)
        step = np.searchsorted(s0, g0, side="right") - 1
        ok = (step >= 0) & (g0 < s1[np.clip(step, 0, None)])
        for i, c in enumerate(gpu_idle.CAUSES):
            sel = ok & (cause == i)
            g[f"idle_{c}_ns"] = np.bincount(step[sel], weights=dur[sel], minlength=len(g)).astype(np.int64)
        parts.append(g)
    out = pd.concat(parts, ignore_index=True)
    causes = [c for c in out.columns if c.startswith("idle_") and out[c].any()]  # only causes that occur
    return out[[c for c in out.columns if not c.startswith("idle_") or c in causes]]


def display(df: pd.DataFrame) -> pd.DataFrame:
    """``*_ns`` columns as microseconds (``*_us``), ``*_fraction`` as percents (``*_pct``), rounded; the run
    clock's ``start_ns`` dropped."""
    out = {}
    for c in df.columns:
        if c == "start_ns":
            continue
        v = df[c]
        if c.endswith("_ns"):
            out[c[:-3] + "_us"] = (pd.to_numeric(v) / 1e3).round(2)
        elif c.endswith("_fraction"):
            out[c[: -len("_fraction")] + "_pct"] = (100 * pd.to_numeric(v)).round(2)
        else:
            out[c] = v
    return pd.DataFrame(out)


def write_csv(analysis: Analysis, directory: str | Path, kinds: Iterable[str] = KINDS) -> list[Path]:
    """One CSV per summary (``kernels.csv`` ...) in ``directory``, written atomically; returns the paths."""
    from gpudoctor.store.atomic import atomic_write_text

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, df in tables(analysis, kinds).items():
        p = d / f"{kind}.csv"
        atomic_write_text(p, df.to_csv(index=False))
        paths.append(p)
    return paths


def render(analysis: Analysis, kinds: Iterable[str], console: Console | None = None, rows: int = 20) -> None:
    """The summaries as terminal tables (the first ``rows`` rows of each)."""
    from gpudoctor.render.terminal import make_console

    console = console or make_console()
    for kind, df in tables(analysis, kinds).items():
        console.print(f"\n[bold]{TITLES[kind]}[/bold]", highlight=False)
        if df.empty:
            console.print(f"  none: {EMPTY_WHY[kind]}", highlight=False)
            continue
        console.print(_table(df, rows, multi_rank=len(analysis.ranks) > 1))
        if len(df) > rows:
            console.print(f"  ({len(df) - rows} more rows: --csv DIR writes all of them)", highlight=False)


def _cell(c: str, v) -> str:
    from gpudoctor.render.fmt import ns, pct, short
    if c.endswith("_ns"):
        return ns(v)
    if c.endswith("_fraction"):
        return pct(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return short(v, 90) if isinstance(v, str) else str(v)


def _table(df: pd.DataFrame, rows: int, multi_rank: bool):
    """A rich table of the first ``rows`` rows: columns that are all zero (and ``rank`` on one rank) left
    out, numbers never split (a column is as wide as its widest value; long headers wrap instead)."""
    from rich.table import Table

    d = df.head(rows)
    cols = [c for c in d.columns if c != "start_ns" and not (c == "rank" and not multi_rank)
            and not (pd.api.types.is_numeric_dtype(d[c]) and c != "step" and not d[c].any())]
    t = Table(box=None, pad_edge=False, show_edge=False, padding=(0, 1))
    cells = {c: [_cell(c, v) for v in d[c]] for c in cols}
    for c in cols:
        numeric = pd.api.types.is_numeric_dtype(d[c])
        head = (c.removesuffix("_ns")[: -len("_fraction")] + " %" if c.endswith("_fraction") else c.removesuffix("_ns")).replace("_", " ")
        if numeric:
            t.add_column(head, justify="right", overflow="fold",
                         min_width=max([len(x) for x in cells[c]] + [len(w) for w in head.split()]))
        else:
            t.add_column(head, justify="left", overflow="fold", min_width=min(44, max(len(x) for x in cells[c])))
    for i in range(len(d)):
        t.add_row(*(cells[c][i] for c in cols))
    return t
