"""What sniffing an SQLite input costs beside reading it (``gpudoctor analyze`` sniffs each input once,
``readers.inputs.input_format``, then the reader opens it).

    python bench/bench_sniff.py [--data DIR] [--repeat 20]

For each input: ``sniff_ms`` (best of ``--repeat`` calls of ``input_format``, in this process, after one
warm-up call so the file is in the page cache), ``read_ms`` (one read by the reader the sniff chose) and
the sniff's share of the two. Inputs: the three largest nsys fixtures, the 1M-kernel nsys input of
bench/make_inputs.py when it is under ``--data`` (not made here), a run.db saved from the largest of them,
and the same run.db with its application id cleared (what a run.db written before it was set costs).
Prints one JSON line per input.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpudoctor.readers.inputs import input_format, read_input  # noqa: E402
from gpudoctor.store import rundb  # noqa: E402


def measure(path: Path, repeat: int) -> dict:
    input_format(path)  # warm-up: page cache
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fmt = input_format(path)
        best = min(best, time.perf_counter() - t)
    t = time.perf_counter()
    trace = read_input(path, fmt=fmt)
    read_s = time.perf_counter() - t
    return {"input": path.name, "bytes": path.stat().st_size, "format": fmt, "kernels": len(trace.kernels),
            "sniff_ms": round(best * 1e3, 3), "read_ms": round(read_s * 1e3, 1),
            "sniff_share": round(best / (best + read_s), 5)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/gpudoctor-bench", help="where bench/make_inputs.py put its inputs")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    inputs = sorted((ROOT / "fixtures" / "nsys").glob("*.nsys.sqlite"), key=lambda p: p.stat().st_size)[-3:]
    big = Path(args.data) / "nsys" / "attn_naive_launches_k1000000.nsys.sqlite"
    if big.is_file():
        inputs.append(big)
    with tempfile.TemporaryDirectory() as tmp:
        db = rundb.save(read_input(inputs[-1]), Path(tmp) / "run.db", cache=False)
        old = Path(tmp) / "old.run.db"
        shutil.copyfile(db, old)
        with sqlite3.connect(old) as conn:
            conn.execute("PRAGMA application_id = 0")
        conn.close()
        for path in [*inputs, db, old]:
            print(json.dumps(measure(path, args.repeat)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
