"""Make large benchmark inputs by scaling the real H100 fixtures (nothing here is synthetic data).

    python bench/make_inputs.py nsys   --kernels 1000000 [--out DIR]
    python bench/make_inputs.py kineto --events 2160000  [--layout kineto|oneline] [--out DIR]
    python bench/make_inputs.py ranks  --ranks 64 [--kernels-per-rank N] [--straggler RANK] [--out DIR]

Everything is written under ``--out`` (default ``$GPUDOCTOR_BENCH_DIR`` or /tmp/gpudoctor-bench), never
into the repository; an existing output with the same parameters is reused (``--force`` rebuilds).
Each command prints the path(s) it made and the event counts as one JSON line.

nsys (fixtures/nsys/attn_naive.nsys.sqlite: 2-layer transformer training, 8 steps on one H100)
    The file is copied and its steady steps (NVTX ``step_1`` .. ``step_7``: 910 kernels, 2247 runtime /
    driver calls, 35 memcpy and 133 memset launches, 7 NVTX ranges) are replicated in time inside the
    copy with ``INSERT ... SELECT``: replica k shifts every time by a multiple of P (P = the block's
    span, CPU and GPU, plus 20 us; the first replica starts after the file's last event) and every
    correlation id by k x C (C clears the file's largest id, so ids stay unique and every kernel still
    joins its launch); replicated NVTX steps are renamed step_8, step_9, ... Replication is in whole
    blocks of 7 steps, so the kernel count is the original 1089 plus the first multiple of 910 at or
    above ``--kernels``. ``--mix launches`` (default) replicates the kernels, the 910 runtime calls that
    launched them and the NVTX steps: N kernels + N runtime calls, the target's mix. ``--mix full``
    replicates every runtime / driver call of the steps (cudaLaunchKernel, cuKernelGetName,
    cuKernelGetAttribute, ...: ~2.47 per kernel) and the memcpy / memset work too.

kineto (fixtures/torch/attn_naive.torch.json.gz: the same workload through torch.profiler)
    The trace is rewritten with its steady steps (``step_1`` .. ``step_7`` user annotations) replicated
    at the text level, so the output keeps Kineto's exact layout (one event per block, 2-space indent,
    its spacing and key order): CPU events (cpu_op, cuda_runtime/driver, user_annotation, fwdbwd
    flows) by time, GPU events (kernel, memcpy, memset, gpu_user_annotation) and ac2g flows by
    correlation / External id. Replica k shifts ts by k x P and correlation, External id, flow id and
    "Ev Idx" by k x their span. Plain (not gzipped) JSON: ``--events`` is the total event count.
    ``--layout oneline`` writes the same document on one line (events separated by "},{").

ranks (many-rank runs)
    ``--ranks`` copies of the nsys fixture (or of its scaled version with ``--kernels-per-rank``) named
    ``attn_naive.rankN.nsys.sqlite`` in one directory (the reader takes the rank from the name). With
    ``--straggler R`` rank R's kernels are made 30% longer (a straggler for the cross-rank analyzers).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import sqlite3
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NSYS_FIXTURE = ROOT / "fixtures" / "nsys" / "attn_naive.nsys.sqlite"
KINETO_FIXTURE = ROOT / "fixtures" / "torch" / "attn_naive.torch.json.gz"
DEFAULT_OUT = Path(os.environ.get("GPUDOCTOR_BENCH_DIR", "/tmp/gpudoctor-bench"))

STEADY_FIRST, STEADY_LAST = 1, 7  # step_1 .. step_7 of the fixtures (step_0 is warm-up)
GAP_NS = 20_000


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# nsys


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]


def nsys_counts(path: Path) -> dict:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        q = lambda t, w="": conn.execute(f'SELECT count(*) FROM "{t}" {w}').fetchone()[0]  # noqa: E731
        out = {"kernels": q("CUPTI_ACTIVITY_KIND_KERNEL"), "runtime_calls": q("CUPTI_ACTIVITY_KIND_RUNTIME"),
               "memcpy": q("CUPTI_ACTIVITY_KIND_MEMCPY"), "memset": q("CUPTI_ACTIVITY_KIND_MEMSET"),
               "nvtx_ranges": q("NVTX_EVENTS", "WHERE eventType IN (59, 60, 70, 71)")}
    finally:
        conn.close()
    out["events"] = sum(out.values())
    return out


def make_nsys(kernels: int, out_dir: Path, force: bool = False, mix: str = "launches", src: Path = NSYS_FIXTURE,
              name: str | None = None) -> Path:
    """A copy of the nsys fixture with its steady steps replicated until it has >= ``kernels`` kernels.

    ``mix``: "launches" replicates kernels, the runtime calls that launched them and the NVTX steps
    (one runtime call per kernel: the target's "1M kernels + 1M runtime calls"); "full" replicates
    every runtime / driver call of the steps and the memcpy / memset work too (~2.47 calls per kernel).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / (name or f"attn_naive_{mix}_k{kernels}.nsys.sqlite")
    if dst.exists() and not force:
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    conn = sqlite3.connect(tmp, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    steps = conn.execute(
        "SELECT text, start, end FROM NVTX_EVENTS WHERE eventType IN (59, 60) AND text GLOB 'step_[0-9]*'"
        " ORDER BY start").fetchall()
    by_name = {t: (s, e) for t, s, e in steps}
    w0 = by_name[f"step_{STEADY_FIRST}"][0]
    w1 = by_name[f"step_{STEADY_LAST}"][1]
    n_steps_total = len(steps)
    # Template: runtime calls started inside the steady steps, and the GPU work they launched.
    conn.execute("CREATE TEMP TABLE t_rt AS SELECT * FROM CUPTI_ACTIVITY_KIND_RUNTIME WHERE start >= ? AND start < ?",
                 (w0, w1))
    corr_lo, = conn.execute("SELECT min(correlationId) FROM temp.t_rt").fetchone()
    corr_max = max(conn.execute(f"SELECT ifnull(max(correlationId), 0) FROM {t}").fetchone()[0]
                   for t in ("CUPTI_ACTIVITY_KIND_RUNTIME", "CUPTI_ACTIVITY_KIND_KERNEL",
                             "CUPTI_ACTIVITY_KIND_MEMCPY", "CUPTI_ACTIVITY_KIND_MEMSET"))
    corr_step = corr_max - corr_lo + 1
    gpu_tables = ("CUPTI_ACTIVITY_KIND_KERNEL", "CUPTI_ACTIVITY_KIND_MEMCPY", "CUPTI_ACTIVITY_KIND_MEMSET")
    if mix == "launches":
        gpu_tables = gpu_tables[:1]
    elif mix != "full":
        raise ValueError(f"mix: launches or full, not {mix!r}")
    for t in gpu_tables:
        conn.execute(f"CREATE TEMP TABLE t_{t} AS SELECT * FROM {t} WHERE correlationId IN "
                     "(SELECT correlationId FROM temp.t_rt)")
    if mix == "launches":
        conn.execute('DELETE FROM temp.t_rt WHERE correlationId NOT IN '
                     '(SELECT correlationId FROM temp."t_CUPTI_ACTIVITY_KIND_KERNEL")')
    conn.execute("CREATE TEMP TABLE t_nvtx AS SELECT * FROM NVTX_EVENTS WHERE eventType IN (59, 60) "
                 "AND text GLOB 'step_[0-9]*' AND start >= ? AND start < ?", (w0, w1))
    lo = min(conn.execute(f"SELECT min(start) FROM temp.{t}").fetchone()[0] for t in
             ("t_rt", "t_nvtx", *(f"t_{g}" for g in gpu_tables)) if
             conn.execute(f"SELECT count(*) FROM temp.{t}").fetchone()[0])
    hi = max(conn.execute(f"SELECT max(end) FROM temp.{t}").fetchone()[0] for t in
             ("t_rt", "t_nvtx", *(f"t_{g}" for g in gpu_tables)) if
             conn.execute(f"SELECT count(*) FROM temp.{t}").fetchone()[0])
    # After the last event of the whole file too, so replicas never overlap the original tail.
    file_end = max(conn.execute(f"SELECT ifnull(max(end), 0) FROM {t}").fetchone()[0]
                   for t in ("CUPTI_ACTIVITY_KIND_RUNTIME", *gpu_tables))
    period = hi - lo + GAP_NS
    first_shift = max(period, file_end - lo + GAP_NS)
    per_rep = conn.execute('SELECT count(*) FROM temp."t_CUPTI_ACTIVITY_KIND_KERNEL"').fetchone()[0]
    have = conn.execute("SELECT count(*) FROM CUPTI_ACTIVITY_KIND_KERNEL").fetchone()[0]
    reps = max(0, -(-(kernels - have) // per_rep))
    steps_per_rep = conn.execute("SELECT count(*) FROM temp.t_nvtx").fetchone()[0]
    _log(f"nsys: {reps} replicas of {per_rep} kernels -> {dst}")
    conn.execute("CREATE TEMP TABLE reps (k INTEGER PRIMARY KEY)")
    conn.executemany("INSERT INTO temp.reps VALUES (?)", [(k,) for k in range(1, reps + 1)])
    shift = f"({first_shift} + (r.k - 1) * {period})"
    conn.execute("BEGIN")
    for table, tmpl in (("CUPTI_ACTIVITY_KIND_RUNTIME", "t_rt"), *((g, f"t_{g}") for g in gpu_tables)):
        cols = _columns(conn, table)
        sel = []
        for c in cols:
            if c in ("start", "end"):
                sel.append(f't."{c}" + {shift}')
            elif c == "correlationId":
                sel.append(f't."{c}" + r.k * {corr_step}')
            else:
                sel.append(f't."{c}"')
        conn.execute(f'INSERT INTO "{table}" ({", ".join(chr(34) + c + chr(34) for c in cols)}) '
                     f'SELECT {", ".join(sel)} FROM temp.reps r, temp."{tmpl}" t ORDER BY r.k, t.start')
    cols = _columns(conn, "NVTX_EVENTS")
    sel = []
    for c in cols:
        if c in ("start", "end"):
            sel.append(f't."{c}" + {shift}')
        elif c == "text":
            # step_j of replica k -> step_(n_steps_total - 1 + (k - 1) * steps_per_rep + j)
            sel.append(f"'step_' || (CAST(substr(t.text, 6) AS INTEGER) - {STEADY_FIRST} + {n_steps_total} "
                       f"+ (r.k - 1) * {steps_per_rep})")
        else:
            sel.append(f't."{c}"')
    conn.execute(f'INSERT INTO NVTX_EVENTS ({", ".join(chr(34) + c + chr(34) for c in cols)}) '
                 f'SELECT {", ".join(sel)} FROM temp.reps r, temp.t_nvtx t ORDER BY r.k, t.start')
    conn.execute("COMMIT")
    conn.close()
    os.replace(tmp, dst)
    return dst


def make_ranks(n_ranks: int, out_dir: Path, kernels_per_rank: int = 0, straggler: int | None = None,
               force: bool = False) -> Path:
    """A directory of ``n_ranks`` per-rank nsys files, ``attn_naive.rankN.nsys.sqlite``."""
    tag = f"ranks{n_ranks}_k{kernels_per_rank or 'fixture'}" + (f"_slow{straggler}" if straggler is not None else "")
    d = out_dir / tag
    if d.exists() and not force and len(list(d.glob("*.sqlite"))) == n_ranks:
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    src = NSYS_FIXTURE
    if kernels_per_rank:
        src = make_nsys(kernels_per_rank, out_dir, force=force, mix="full")
    for r in range(n_ranks):
        p = d / f"attn_naive.rank{r}.nsys.sqlite"
        shutil.copyfile(src, p)
        if r == straggler:
            conn = sqlite3.connect(p, isolation_level=None)
            conn.execute("UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET end = start + (end - start) * 13 / 10")
            conn.close()
    return d


# ----------------------------------------------------------------------------------------------------
# kineto

_SEP = "\n  {"


def _kineto_blocks(text: str) -> tuple[str, list[str], str]:
    """(header up to the first event, event blocks (without separator and trailing comma), footer)."""
    m = re.search(r'"traceEvents"\s*:\s*\[', text)
    start = text.index(_SEP, m.end())
    head = text[:start]
    body_end = text.rindex("\n  ]")
    parts = text[start + len(_SEP):body_end].split(_SEP)
    blocks = []
    for p in parts:
        p = p.rstrip()
        if p.endswith(","):
            p = p[:-1]
        blocks.append("{" + p)
    return head, blocks, text[body_end:]


def make_kineto(events: int, out_dir: Path, force: bool = False) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"attn_naive_e{events}.torch.json"
    if dst.exists() and not force:
        return dst
    text = gzip.decompress(KINETO_FIXTURE.read_bytes()).decode("utf-8")
    head, blocks, foot = _kineto_blocks(text)
    evs = json.loads(text)["traceEvents"]
    if len(evs) != len(blocks):
        raise SystemExit(f"layout not understood: {len(evs)} events, {len(blocks)} blocks")
    steps = {e["name"]: e for e in evs if e.get("cat") == "user_annotation" and re.fullmatch(r"step_\d+", e["name"])}
    w0 = float(steps[f"step_{STEADY_FIRST}"]["ts"])
    last = steps[f"step_{STEADY_LAST}"]
    w1 = float(last["ts"]) + float(last["dur"])
    gpu_cats = {"kernel", "gpu_memcpy", "gpu_memset", "gpu_user_annotation"}

    def args(e):
        return e.get("args") or {}

    cpu_sel = [i for i, e in enumerate(evs) if e.get("ph") in ("X", "s", "f") and e.get("cat") not in gpu_cats
               and e.get("cat") != "ac2g" and isinstance(e.get("ts"), (int, float)) and w0 <= e["ts"] < w1]
    corrs = {args(evs[i]).get("correlation") for i in cpu_sel} - {None}
    exts = {args(evs[i]).get("External id") for i in cpu_sel} - {None}
    gpu_sel = [i for i, e in enumerate(evs) if e.get("cat") in gpu_cats and (
        args(e).get("correlation") in corrs if e.get("cat") != "gpu_user_annotation" else args(e).get("External id") in exts)]
    flow_sel = [i for i, e in enumerate(evs) if e.get("cat") == "ac2g" and e.get("id") in corrs]
    sel = sorted(set(cpu_sel) | set(gpu_sel) | set(flow_sel))
    t_lo = min(float(evs[i]["ts"]) for i in sel)
    t_hi = max(float(evs[i]["ts"]) + float(evs[i].get("dur", 0)) for i in sel)
    t_end = max(float(e["ts"]) + float(e.get("dur", 0)) for e in evs if e.get("ph") == "X")
    period_us = round(t_hi - t_lo + GAP_NS / 1e3, 3)
    first_us = max(period_us, round(t_end - t_lo + GAP_NS / 1e3, 3))

    def span(key):
        vals = [args(e).get(key) for e in evs]
        vals = [v for v in vals if isinstance(v, int)]
        return max(vals) + 1 if vals else 0
    spans = {"corr": span("correlation"), "ext": span("External id"), "ev": span("Ev Idx"),
             "flow": max([e["id"] for e in evs if e.get("ph") in ("s", "f") and isinstance(e.get("id"), int)] + [0]) + 1}
    spans["flow"] = max(spans["flow"], spans["corr"])  # ac2g flow ids are correlation ids
    n_steps = len(steps)
    # Template: the selected blocks joined, split at the numbers that change per replica. Each such
    # number becomes a positional field; ``fields`` says what it is (kind, value in the fixture).
    field_rx = re.compile(r'("ts": )(-?\d+(?:\.\d+)?)|("correlation": )(\d+)|("External id": )(\d+)'
                          r'|("Ev Idx": )(\d+)|("id": )(\d+)|("name": "step_)(\d+)(")')
    kinds = {2: "ts", 4: "corr", 6: "ext", 8: "ev", 10: "id", 12: "step"}
    pieces: list[str] = []
    fields: list[tuple[str, str]] = []
    for i in sel:
        e = evs[i]
        b = blocks[i]
        flow_kind = ("corr" if e.get("cat") == "ac2g" else "flow") if e.get("ph") in ("s", "f") else None
        pos = 0
        seen_ts = seen_id = False
        for m in field_rx.finditer(b):
            g = next(k for k in kinds if m.group(k) is not None)
            kind = kinds[g]
            if kind == "ts":
                if seen_ts:
                    continue
                seen_ts = True
            if kind == "id":
                if flow_kind is None or seen_id:
                    continue
                seen_id = True
                kind = "f" + flow_kind
            pieces.append((b[pos:m.start(g)]).replace("{", "{{").replace("}", "}}"))
            pieces.append("{}")
            fields.append((kind, m.group(g)))
            pos = m.end(g)
        pieces.append(b[pos:].replace("{", "{{").replace("}", "}}"))
        pieces.append(",\n  ")
    pieces.pop()
    fmt = "".join(pieces)
    ts_base = [float(v) for k, v in fields if k == "ts"]
    ts_dec = [max(len(v.split(".")[1]) if "." in v else 0, 3) for k, v in fields if k == "ts"]
    steps_per_rep = STEADY_LAST - STEADY_FIRST + 1

    def values(k: int) -> list[str]:
        shift = first_us + (k - 1) * period_us
        out = []
        ti = 0
        for kind, v in fields:
            if kind == "ts":
                out.append(f"{ts_base[ti] + shift:.{ts_dec[ti]}f}")
                ti += 1
            elif kind == "step":
                out.append(str(int(v) - STEADY_FIRST + n_steps + (k - 1) * steps_per_rep))
            else:
                out.append(str(int(v) + k * spans[kind[1:] if kind in ("fcorr", "fflow") else kind]))
        return out

    n_tmpl = len(sel)
    reps = max(0, -(-(events - len(blocks)) // n_tmpl))
    _log(f"kineto: {reps} replicas of {n_tmpl} events -> {dst}")
    tmp = dst.with_name(dst.name + ".tmp")
    remaining = events - len(blocks)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(head)
        f.write(_SEP[:-1])
        f.write(",\n  ".join(blocks[:-1]))
        for k in range(1, reps + 1):
            text_k = fmt.format(*values(k))
            if remaining < n_tmpl:  # the last, partial replica: its first ``remaining`` events
                cut = -1
                for _ in range(remaining):
                    cut = text_k.index(",\n  {", cut + 1)
                text_k = text_k[:cut] if remaining > 0 else ""
            remaining -= n_tmpl
            if text_k:
                f.write(",\n  ")
                f.write(text_k)
        f.write(",\n  ")
        f.write(blocks[-1])
        f.write(foot)
    os.replace(tmp, dst)
    return dst


def make_kineto_oneline(events: int, out_dir: Path, force: bool = False) -> Path:
    """The same trace as ``make_kineto`` as one-line JSON: every line stripped and joined. Exact, since a
    JSON string cannot hold a raw newline, so every line break and the indentation around it lie outside
    strings. Events are then separated by "},{" (what orjson and minified exports write)."""
    src = make_kineto(events, out_dir, force)
    dst = out_dir / f"attn_naive_e{events}.oneline.torch.json"
    if dst.exists() and not force:
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb") as f, open(tmp, "wb") as out:
        while True:
            lines = f.readlines(1 << 24)
            if not lines:
                break
            out.write(b"".join(line.strip() for line in lines))
    os.replace(tmp, dst)
    return dst


def kineto_counts(path: Path) -> dict:
    """Events of a Kineto-laid-out file: blocks that start a line with "  {" (the top-level object's own
    opening "\n  {" at the start of the file is not an event). A one-line file made by
    ``make_kineto_oneline`` has as many as its Kineto-layout source."""
    if path.name.endswith(".oneline.torch.json"):
        src = path.with_name(path.name.replace(".oneline.torch.json", ".torch.json"))
        return {"events": kineto_counts(src)["events"], "bytes": path.stat().st_size}
    n = 0
    tail = b""
    with open(path, "rb") as f:
        first = f.read(4)
        f.seek(0)
        for block in iter(lambda: f.read(1 << 24), b""):
            buf = tail + block  # 3 bytes of overlap: a separator split by the read is counted once
            n += buf.count(b"\n  {")
            tail = buf[-3:]
    n -= first == b"\n  {"
    return {"events": n, "bytes": path.stat().st_size}


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["nsys", "kineto", "ranks"])
    ap.add_argument("--kernels", type=int, default=1_000_000)
    ap.add_argument("--mix", choices=["launches", "full"], default="launches",
                    help="nsys: replicate kernels + their launches (default) or every runtime call and memop")
    ap.add_argument("--events", type=int, default=2_160_000)
    ap.add_argument("--layout", choices=["kineto", "oneline"], default="kineto",
                    help="kineto: Kineto's own layout (one event per block); oneline: the same JSON on one line")
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--kernels-per-rank", type=int, default=0)
    ap.add_argument("--straggler", type=int, default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.what == "nsys":
        p = make_nsys(a.kernels, a.out / "nsys", a.force, a.mix)
        info = {"path": str(p), **nsys_counts(p)}
    elif a.what == "kineto":
        make = make_kineto_oneline if a.layout == "oneline" else make_kineto
        p = make(a.events, a.out / "kineto", a.force)
        info = {"path": str(p), **kineto_counts(p)}
    else:
        d = make_ranks(a.ranks, a.out / "ranks", a.kernels_per_rank, a.straggler, a.force)
        info = {"path": str(d), "files": len(list(d.glob("*.sqlite")))}
    info["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
