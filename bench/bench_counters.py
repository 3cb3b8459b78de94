"""Sampled counters attributed to intervals at scale: model.sampled.interval_means.

Synthetic columns (a timing benchmark, not a fixture): N samples of one metric at a 2 kHz period (the
rate `gpudoctor profile` asks Nsight Systems for) and K kernel intervals spread over the same time.
Prints JSON: seconds for the series lookup in a counters table and for the means over the intervals.

    python bench/bench_counters.py --samples 5000000 --intervals 1000000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd

from gpudoctor.model import sampled
from gpudoctor.model.trace import conform


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=5_000_000)
    ap.add_argument("--intervals", type=int, default=1_000_000)
    ap.add_argument("--metrics", type=int, default=4, help="metrics interleaved in the counters table")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    period = 500_000  # 2 kHz
    ts = np.arange(a.samples, dtype=np.int64) * period
    names = ["DRAM Read Bandwidth [Throughput %]", "Tensor Active [Throughput %]", "SMs Active [Throughput %]",
             "GR Active [Throughput %]"][: a.metrics]
    table = conform("counters", pd.DataFrame({
        "ts_ns": np.repeat(ts, len(names)), "device_id": 0,
        "name": pd.Categorical.from_codes(np.tile(np.arange(len(names)), a.samples), categories=names),
        "value": rng.uniform(0, 100, a.samples * len(names))}))
    starts = np.sort(rng.integers(0, int(ts[-1]), a.intervals))
    ends = starts + rng.integers(1_000, 2_000_000, a.intervals)
    t0 = time.perf_counter()
    s_ts, s_v, _ = sampled.series(table, "tensor_active_fraction")
    t1 = time.perf_counter()
    means = sampled.interval_means(s_ts, s_v, starts, ends)
    t2 = time.perf_counter()
    print(json.dumps({"rows_in_counters": len(table), "samples_of_metric": len(s_ts), "intervals": a.intervals,
                      "series_s": round(t1 - t0, 3), "interval_means_s": round(t2 - t1, 3),
                      "covered": int(np.isfinite(means).sum())}))


if __name__ == "__main__":
    main()
