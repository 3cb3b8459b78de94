"""NVML samples (raw/nvml.csv written by the sampler beside every profile backend) as counters."""

from __future__ import annotations

from pathlib import Path

from gpudoctor.collect.nvml import read_samples
from gpudoctor.model.trace import Trace

SOURCE_FORMAT = "nvml_csv"


def read(path: str | Path, rank: int | None = None) -> Trace:
    rank = int(rank or 0)
    t = Trace(meta={"inputs": [{"path": str(path), "format": SOURCE_FORMAT, "rank": rank}]})
    t.counters = read_samples(path, rank)
    t.set("ranks", {"rank": [rank], "source_file": [str(path)], "source_format": [SOURCE_FORMAT],
                    "clock_source": ["UTC epoch (sampler)"]})
    infinite = int(t.counters.attrs.get("infinite_values", 0))
    if infinite:
        t.add_dropped(rank, "nvml", "sample value is infinite", infinite)
    return t
