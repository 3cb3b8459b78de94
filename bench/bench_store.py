"""Benchmark of run.db: save() and load() of a synthetic trace.

    python bench/bench_store.py [--kernels 1000000] [--api-calls 1000000] [--ranges 50000] [--repeat 3]
                                [--compare-insert 200000] [--dir DIR]

Builds a trace with random but realistic values (monotonic timestamps, ~500 distinct kernel names,
~300 API names, 200 range texts, -1 fills), then times:

- save: run.db + the columnar cache (what ``gpudoctor`` does), and run.db alone (``cache=False``);
- load: from the cache, and from run.db itself (``use_cache=False``), each in a fresh Python process
  so that its peak RSS is its own.

Times are the best of ``--repeat`` runs; peak RSS is ``resource.getrusage(...).ru_maxrss``.
``--compare-insert N`` also times three ways of inserting N kernel rows into SQLite (sqlite-utils'
``insert_all``, ``executemany`` of ``itertuples``, and the multi-row ``executemany`` that save() uses).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpudoctor.model.trace import Trace  # noqa: E402
from gpudoctor.store import (  # noqa: E402
    cache_path,
    rundb,  # noqa: E402
    save,
)

T0 = 1_795_424_261_851_772_571  # a UTC epoch in ns


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


# In a child process ru_maxrss starts at the parent's RSS when it forked (Linux keeps it across exec),
# so the load children report VmHWM (the peak RSS of their own address space) where /proc has it.
_CHILD_PEAK = (
    "def peak():\n"
    "    try:\n"
    "        for line in open('/proc/self/status'):\n"
    "            if line.startswith('VmHWM:'): return int(line.split()[1]) / 1024\n"
    "    except OSError: pass\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
)


def _names(rng, n: int, stems: list[str]) -> list[str]:
    return [f"{stems[i % len(stems)]}_{i}_{rng.integers(1 << 30):x}<float, {64 << (i % 3)}, {i % 7}>"
            for i in range(n)]


def synthetic_trace(n_kernels: int, n_api: int, n_ranges: int, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    t = Trace(meta={"inputs": [{"path": f"rank{r}.nsys.sqlite", "format": "nsys_sqlite", "rank": r}
                               for r in range(8)], "bench": True})
    stems = ["sm90_xmma_gemm_bf16bf16_bf16f32", "ampere_sgemm_128x64_nn", "void at::native::vectorized_elementwise_kernel",
             "flash_fwd_kernel", "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "cutlass::Kernel2",
             "void at::native::reduce_kernel", "softmax_warp_forward"]
    kernel_names = _names(rng, 500, stems)
    # Kernels: 8 ranks, back-to-back-ish on a few streams, a Zipf-like name distribution.
    n = n_kernels
    code = np.minimum(rng.zipf(1.3, n) - 1, 499)
    start = T0 + np.cumsum(rng.integers(200, 40_000, n))
    grid_fallback = rng.random(n) < 0.02
    t.set("kernels", {
        "rank": rng.integers(0, 8, n), "device_id": rng.integers(0, 8, n), "stream_id": rng.integers(7, 24, n),
        "start_ns": start, "end_ns": start + rng.integers(1_000, 3_000_000, n),
        "name": pd.Categorical.from_codes(code, categories=kernel_names),
        "demangled_name": pd.Categorical.from_codes(code, categories=[f"void {k}(int, float const*, float*)"
                                                                      for k in kernel_names]),
        "grid_x": np.where(grid_fallback, -1, rng.integers(1, 8192, n)), "grid_y": rng.integers(1, 16, n),
        "grid_z": np.ones(n, np.int64), "block_x": rng.choice([128, 256, 384, 512], n),
        "block_y": np.ones(n, np.int64), "block_z": np.ones(n, np.int64),
        "registers_per_thread": rng.integers(16, 255, n), "shared_memory_bytes": rng.integers(0, 232_448, n),
        "correlation_id": np.arange(1, n + 1), "graph_id": np.where(rng.random(n) < 0.1, rng.integers(0, 64, n), -1),
        "category": pd.Categorical.from_codes(code % 7, categories=["gemm", "attention", "elementwise", "reduction",
                                                                    "communication", "memory", "other"]),
    })
    n = n_api
    api_names = [f"cuda{w}_v{i % 12000}" for i, w in enumerate(
        ["LaunchKernel", "MemcpyAsync", "StreamSynchronize", "EventRecord", "GraphLaunch", "MemsetAsync"] * 50)]
    astart = T0 + np.cumsum(rng.integers(200, 40_000, n))
    t.set("api_calls", {
        "rank": rng.integers(0, 8, n), "thread_id": rng.integers(100_000, 100_064, n), "start_ns": astart,
        "end_ns": astart + rng.integers(500, 30_000, n),
        "name": pd.Categorical.from_codes(np.minimum(rng.zipf(1.5, n) - 1, 299), categories=api_names),
        "api": pd.Categorical.from_codes(rng.integers(0, 2, n), categories=["runtime", "driver"]),
        "correlation_id": np.arange(1, n + 1), "return_value": np.where(rng.random(n) < 0.001, 2, 0),
    })
    n = n_ranges
    texts = [f"model.layers.{i}.{part}" for i, part in zip(range(200), ["attention", "mlp", "norm ✓", "step µs"] * 50)]
    rstart = T0 + np.cumsum(rng.integers(1_000, 800_000, n))
    gpu = rng.random(n) < 0.8
    t.set("ranges", {
        "rank": rng.integers(0, 8, n), "thread_id": rng.integers(100_000, 100_064, n), "start_ns": rstart,
        "end_ns": rstart + rng.integers(1_000, 20_000_000, n),
        "text": pd.Categorical.from_codes(rng.integers(0, 200, n), categories=texts),
        "domain": pd.Categorical.from_codes(rng.integers(0, 2, n), categories=["", "record_function"]),
        "depth": rng.integers(0, 6, n), "gpu_start_ns": np.where(gpu, rstart + 5_000, -1),
        "gpu_end_ns": np.where(gpu, rstart + 900_000, -1), "gpu_kernel_count": np.where(gpu, rng.integers(1, 60, n), 0),
    })
    return t


def _best(f, repeat: int) -> tuple[tuple[float, float], object]:
    """((wall seconds, CPU seconds) of the fastest of ``repeat`` runs, the last result)."""
    best, out = (float("inf"), float("inf")), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = f()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best, out


def _load_in_child(db: Path, use_cache: bool, repeat: int) -> dict:
    code = _CHILD_PEAK + (
        "import json, resource, sys, time; sys.path.insert(0, %r)\n"
        "from gpudoctor.store import load\n"
        "base = peak()\n"
        "best = (1e9, 1e9)\n"
        "for _ in range(%d):\n"
        "    t0, c0 = time.perf_counter(), time.process_time(); t = load(%r, use_cache=%r)\n"
        "    best = min(best, (time.perf_counter() - t0, time.process_time() - c0))\n"
        "    rows = len(t.kernels) + len(t.api_calls) + len(t.ranges); del t\n"
        "print(json.dumps({'s': best[0], 'cpu': best[1], 'rows': rows, 'rss': peak(),"
        " 'base': base}))\n"
    ) % (str(ROOT), repeat, str(db), use_cache)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_insert(t: Trace, n: int, workdir: Path) -> list[tuple[str, float]]:
    import sqlite_utils

    df = t.kernels.iloc[:n]
    types = {c: (str if isinstance(df[c].dtype, pd.CategoricalDtype) else int) for c in df.columns}
    results = []

    def fresh(name):
        p = workdir / f"cmp_{name}.db"
        if p.exists():
            p.unlink()
        conn = sqlite3.connect(p)
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "locking_mode = EXCLUSIVE", "cache_size = -65536"):
            conn.execute(f"PRAGMA {pragma}")
        db = sqlite_utils.Database(conn, execute_plugins=False)
        db["kernels"].create(types)
        return db

    db = fresh("insert_all")
    t0 = time.perf_counter()
    db["kernels"].insert_all(df.to_dict("records"), batch_size=1000)
    results.append(("sqlite-utils insert_all(to_dict records)", time.perf_counter() - t0))
    db.conn.close()

    db = fresh("itertuples")
    t0 = time.perf_counter()
    with db.conn:
        db.conn.executemany(f"INSERT INTO kernels VALUES ({','.join('?' * len(df.columns))})",
                            df.itertuples(index=False, name=None))
    results.append(("executemany(itertuples), 1 row/statement", time.perf_counter() - t0))
    db.conn.close()

    db = fresh("multirow")
    t0 = time.perf_counter()
    n_rows, cols = rundb._encode("kernels", df)
    rundb._insert(db.conn, "kernels", cols, n_rows)
    results.append(("save()'s multi-row executemany (128 rows/statement)", time.perf_counter() - t0))
    db.conn.close()
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=int, default=1_000_000)
    ap.add_argument("--api-calls", type=int, default=1_000_000)
    ap.add_argument("--ranges", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compare-insert", type=int, default=0, metavar="N",
                    help="also compare insert methods on N kernel rows")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--nsys", type=Path, default=None, metavar="SQLITE",
                    help="also time parsing this nsys SQLite export, and save/load of what it parses to")
    ap.add_argument("--grow-nsys", type=int, default=0, metavar="N",
                    help="with --nsys: first grow a copy of it (kernels and runtime calls doubled) to ~N rows each")
    args = ap.parse_args(argv)

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    trace = synthetic_trace(args.kernels, args.api_calls, args.ranges)
    build_s = time.perf_counter() - t0
    rss_trace = peak_rss_mb()
    n_rows = len(trace.kernels) + len(trace.api_calls) + len(trace.ranges)

    tmp = tempfile.TemporaryDirectory(prefix="bench_store_") if args.dir is None else None
    workdir = Path(tmp.name) if tmp else args.dir
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "run.db"
    try:
        kernels_only = Trace(kernels=trace.kernels)
        save_kernels_s, _ = _best(lambda: save(kernels_only, workdir / "kernels_only.db", cache=False), args.repeat)
        save_plain_s, _ = _best(lambda: save(trace, db, cache=False), args.repeat)
        save_s, _ = _best(lambda: save(trace, db), args.repeat)
        rss_save = peak_rss_mb()
        db_mb = db.stat().st_size / 1e6
        cache_mb = cache_path(db).stat().st_size / 1e6
        from_cache = _load_in_child(db, True, args.repeat)
        from_db = _load_in_child(db, False, args.repeat)
        assert from_cache["rows"] == from_db["rows"] == n_rows

        print(f"synthetic trace: {len(trace.kernels):,} kernels ({trace.kernels['name'].nunique()} names), "
              f"{len(trace.api_calls):,} api calls, {len(trace.ranges):,} ranges; built in {build_s:.2f} s")
        print(f"run.db {db_mb:.0f} MB, cache {cache_mb:.0f} MB; best of {args.repeat}; "
              f"python {sys.version.split()[0]}, pandas {pd.__version__}, numpy {np.__version__}, "
              f"sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus")
        print()
        print(f"{'step':<40} {'wall s':>7} {'CPU s':>7} {'rows/s (wall)':>14}  {'peak RSS MB':<20}")
        print("-" * 92)
        rows = [
            ("save (run.db + cache)", save_s, f"{rss_save:.0f} (trace alone {rss_trace - rss0:.0f})"),
            ("save (run.db only, cache=False)", save_plain_s, ""),
            (f"save {len(trace.kernels):,} kernels only, no cache", save_kernels_s, ""),
            ("load from cache (fresh process)", (from_cache["s"], from_cache["cpu"]),
             f"{from_cache['rss']:.0f} (imports {from_cache['base']:.0f})"),
            ("load from run.db (use_cache=False)", (from_db["s"], from_db["cpu"]),
             f"{from_db['rss']:.0f} (imports {from_db['base']:.0f})"),
        ]
        for label, (wall, cpu), rss in rows:
            n = len(trace.kernels) if "kernels only" in label else n_rows
            print(f"{label:<40} {wall:>7.2f} {cpu:>7.2f} {n / wall:>14,.0f}  {rss:<20}")
        print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus at the end: "
              "wall times grow with it, CPU times much less)")
        if args.compare_insert:
            n = min(args.compare_insert, len(trace.kernels))
            print()
            print(f"inserting {n:,} kernel rows (18 columns) into an empty table:")
            for label, s in compare_insert(trace, n, workdir):
                print(f"  {label:<55} {s:6.2f} s  {n / s:>10,.0f} rows/s")
        if args.nsys:
            print()
            bench_nsys(args.nsys, args.grow_nsys, workdir, args.repeat)
    finally:
        if tmp:
            tmp.cleanup()


def grow_nsys(src: Path, n: int, dst: Path) -> Path:
    """A copy of an nsys export whose kernel and runtime tables are doubled (shifted in time and
    correlation id) until they have ~n rows."""
    import shutil

    shutil.copyfile(src, dst)
    conn = sqlite3.connect(dst)
    conn.execute("PRAGMA journal_mode = OFF")
    for table in ("CUPTI_ACTIVITY_KIND_KERNEL", "CUPTI_ACTIVITY_KIND_RUNTIME"):
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        span, corr = conn.execute(f"SELECT max(end) - min(start) + 1000, max(correlationId) + 1 FROM {table}").fetchone()
        k = 1
        while conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] * 2 <= n:
            shifted = {"start": f"start + {span * k}", "end": f"end + {span * k}",
                       "correlationId": f"correlationId + {corr * k}"}
            conn.execute(f"INSERT INTO {table} SELECT {', '.join(shifted.get(c, c) for c in cols)} FROM {table}")
            k *= 2
    conn.commit()
    conn.close()
    return dst


def bench_nsys(path: Path, grow: int, workdir: Path, repeat: int) -> None:
    from gpudoctor.readers import nsys

    if grow:
        path = grow_nsys(path, grow, workdir / "grown.nsys.sqlite")
    parse_s, trace = _best(lambda: nsys.read(path), repeat)
    db = workdir / "nsys_run.db"
    save_s, _ = _best(lambda: save(trace, db), repeat)
    from_cache = _load_in_child(db, True, repeat)
    from_db = _load_in_child(db, False, repeat)
    print(f"nsys export {path.name} ({path.stat().st_size / 1e6:.0f} MB): {len(trace.kernels):,} kernels, "
          f"{len(trace.api_calls):,} api calls, {len(trace.ranges):,} ranges, {len(trace.memops):,} memops")
    print(f"  {'':<28} {'wall s':>7} {'CPU s':>7}")
    print(f"  {'parse nsys SQLite':<28} {parse_s[0]:>7.2f} {parse_s[1]:>7.2f}")
    print(f"  {'save run.db + cache':<28} {save_s[0]:>7.2f} {save_s[1]:>7.2f}")
    for label, r in (("load from cache", from_cache), ("load from run.db, no cache", from_db)):
        print(f"  {label:<28} {r['s']:>7.2f} {r['cpu']:>7.2f}   {parse_s[0] / r['s']:.1f}x faster than parsing "
              f"(CPU: {parse_s[1] / r['cpu']:.1f}x)")


if __name__ == "__main__":
    main()
