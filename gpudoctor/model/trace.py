"""The trace model: one set of columnar tables per run, shared by every reader, analyzer and renderer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd

from gpudoctor.errors import GpudoctorError
from gpudoctor.model.schema import TABLES

_NUMPY = {"i8": "int64", "f8": "float64", "b": "bool"}


_EMPTY: dict[str, pd.DataFrame] = {}


def empty_frame(table: str) -> pd.DataFrame:
    """A zero-row frame with the table's columns and dtypes (a copy of one built once per table:
    ``conform`` costs ~3 ms a table, and every ``Trace()`` / ``for_rank`` needs twelve)."""
    if table not in _EMPTY:
        _EMPTY[table] = conform(table, pd.DataFrame())
    return _EMPTY[table].copy()


def conform(table: str, df: pd.DataFrame | dict) -> pd.DataFrame:
    """Return ``df`` with exactly the table's columns, in order, with the schema's dtypes.

    Missing columns are filled with the schema's fill value; NaN in integer columns becomes the fill.
    Unknown columns are an error: the model is a contract.
    """
    if isinstance(df, dict):
        df = pd.DataFrame(df)
    spec = TABLES[table]
    names = [c for c, _, _ in spec]
    extra = set(df.columns) - set(names)
    if extra:
        raise ValueError(f"{table}: columns not in the trace model: {sorted(extra)}")
    n = len(df)
    out = {}
    for col, kind, fill in spec:
        if col in df.columns:
            s = df[col]
        else:
            s = pd.Series(np.full(n, fill, dtype=object if kind in ("str", "cat") else _NUMPY[kind]), index=df.index)
        if kind in _NUMPY:
            if s.dtype.kind == "f" and kind == "i8":
                s = s.fillna(fill)
            elif s.dtype == object:
                s = s.where(s.notna(), fill)
            out[col] = s.astype(_NUMPY[kind]).to_numpy()
        elif kind == "cat":
            if not isinstance(s.dtype, pd.CategoricalDtype):
                s = s.astype(object).where(s.notna(), fill).astype(str).astype("category")
            out[col] = s.values
        else:  # plain string
            out[col] = s.astype(object).where(s.notna(), fill).astype(str).to_numpy(dtype=object)
    return pd.DataFrame(out, columns=names)


@dataclass
class Trace:
    """All tables of one run (one or many ranks) plus metadata.

    ``meta`` holds run-level facts: inputs, tool versions, and anything a reader knows about the run
    (``meta["inputs"]`` is a list of {path, format, rank}).
    """

    devices: pd.DataFrame = field(default_factory=lambda: empty_frame("devices"))
    ranks: pd.DataFrame = field(default_factory=lambda: empty_frame("ranks"))
    kernels: pd.DataFrame = field(default_factory=lambda: empty_frame("kernels"))
    memops: pd.DataFrame = field(default_factory=lambda: empty_frame("memops"))
    api_calls: pd.DataFrame = field(default_factory=lambda: empty_frame("api_calls"))
    ranges: pd.DataFrame = field(default_factory=lambda: empty_frame("ranges"))
    collectives: pd.DataFrame = field(default_factory=lambda: empty_frame("collectives"))
    counters: pd.DataFrame = field(default_factory=lambda: empty_frame("counters"))
    memory_events: pd.DataFrame = field(default_factory=lambda: empty_frame("memory_events"))
    kernel_metrics: pd.DataFrame = field(default_factory=lambda: empty_frame("kernel_metrics"))
    cpu_ops: pd.DataFrame = field(default_factory=lambda: empty_frame("cpu_ops"))
    frames: pd.DataFrame = field(default_factory=lambda: empty_frame("frames"))
    stacks: pd.DataFrame = field(default_factory=lambda: empty_frame("stacks"))
    host_stacks: pd.DataFrame = field(default_factory=lambda: empty_frame("host_stacks"))
    dropped: pd.DataFrame = field(default_factory=lambda: empty_frame("dropped"))
    meta: dict = field(default_factory=dict)

    def table(self, name: str) -> pd.DataFrame:
        return getattr(self, name)

    def tables(self) -> Iterable[tuple[str, pd.DataFrame]]:
        for name in TABLES:
            yield name, getattr(self, name)

    def set(self, name: str, df: pd.DataFrame | dict) -> None:
        setattr(self, name, conform(name, df))

    @property
    def rank_ids(self) -> list[int]:
        return sorted(set(self.ranks["rank"].tolist()) | set(self.kernels["rank"].unique().tolist()))

    def for_rank(self, rank: int) -> "Trace":
        """A view of one rank (tables filtered, meta shared)."""
        t = Trace(meta=self.meta)
        for name, df in self.tables():
            t.__dict__[name] = df[df["rank"].to_numpy() == rank].reset_index(drop=True)
        return t

    def dropped_counts(self) -> dict[str, int]:
        """Total dropped events by reason, summed over ranks."""
        if self.dropped.empty:
            return {}
        g = self.dropped.groupby("reason", sort=True)["count"].sum()
        return {str(k): int(v) for k, v in g.items() if v}

    def add_dropped(self, rank: int, source: str, reason: str, count: int) -> None:
        if count:
            row = conform("dropped", {"rank": [rank], "source": [source], "reason": [reason], "count": [int(count)]})
            self.dropped = pd.concat([self.dropped, row], ignore_index=True) if len(self.dropped) else row


SIDE_ERRORS = "side_errors"  # meta key: [{"path", "error"}] of files read with a report that failed alone
JOINED_META = ("inputs", SIDE_ERRORS)  # meta lists that every merged trace adds to (the rest: the first's)


def merge(traces: list[Trace]) -> Trace:
    """Merge per-rank traces into one run. Two inputs claiming the same rank is an error."""
    if len(traces) == 1:
        return traces[0]
    seen: dict[int, str] = {}
    for t in traces:
        for _, row in t.ranks.iterrows():  # a handful of rows, one per input
            r = int(row["rank"])
            if r in seen:
                raise GpudoctorError(
                    f"{row['source_file']}: claims rank {r}, already given by {seen[r]} "
                    "(pass an explicit rank mapping, e.g. --rank FILE=N)"
                )
            seen[r] = row["source_file"]
    joined = {key: [i for t in traces for i in t.meta.get(key, [])] for key in JOINED_META}
    out = Trace(meta={key: v for key, v in joined.items() if v or key == "inputs"})
    for name in TABLES:
        frames = [t.table(name) for t in traces if len(t.table(name))]
        if frames:
            df = pd.concat(frames, ignore_index=True)
            setattr(out, name, conform(name, df))  # re-unifies categoricals
    for t in traces:
        for k, v in t.meta.items():
            if k not in JOINED_META:
                out.meta.setdefault(k, v)
    return out
