"""Bad-input corpus: every reader, fed broken or foreign files built at test time from the real fixtures.

Each error case must raise InputError (a GpudoctorError) whose message is one line naming the file;
a subset goes through the CLI (`gpudoctor analyze BAD GOOD`) to check exit 2, no traceback, and that the
good input of the same call is still analyzed. Success cases (damage the reader tolerates) assert the
exact kernel count and the dropped counts, so that nothing is dropped silently.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gpudoctor.errors import GpudoctorError, InputError
from gpudoctor.pipeline import analyze_inputs
from gpudoctor.readers.inputs import read_input

ROOT = Path(__file__).resolve().parent.parent
FX = ROOT / "fixtures"
DATA = ROOT / "tests" / "data"
NSYS = FX / "nsys" / "kv_static.nsys.sqlite"  # the smallest nsys fixture
NSYS_KERNELS = 48
TORCH = FX / "torch" / "tiny_fused.torch.json.gz"  # the smallest PyTorch profiler fixture
NCU_RAW = FX / "ncu" / "ncu_kernels.raw.csv"
NCU_DETAILS = FX / "ncu" / "ncu_kernels.details.csv"
NCCL = DATA / "nccl_tests_all_reduce_handmade.log"
SNAPSHOT = FX / "kv" / "kv_static.snapshot.pickle"
PROM = DATA / "vllm_metrics_handmade.prom"


# --------------------------------------------------------------------------------------------------
# builders: tmp_path -> path of a bad file


def _copy(src: Path, tmp: Path, name: str | None = None) -> Path:
    dst = tmp / (name or src.name)
    shutil.copyfile(src, dst)
    return dst


def _write(tmp: Path, name: str, data: bytes | str) -> Path:
    p = tmp / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def nsys_cut(n):
    def build(tmp):
        data = NSYS.read_bytes()
        cut = n if n > 0 else len(data) + n
        return _write(tmp, f"cut{cut}.nsys.sqlite", data[:cut])
    return build


def nsys_flip(offset_frac: float, length: int, value: int = 0xFF):
    """Overwrite ``length`` bytes in the middle of the file (whole b-tree pages)."""
    def build(tmp):
        data = bytearray(NSYS.read_bytes())
        start = int(len(data) * offset_frac) // 4096 * 4096
        data[start:start + length] = bytes([value]) * length
        return _write(tmp, "flipped.nsys.sqlite", bytes(data))
    return build


def nsys_sql(name: str, *statements: str):
    def build(tmp):
        p = _copy(NSYS, tmp, name)
        conn = sqlite3.connect(p)
        for s in statements:
            conn.execute(s)
        conn.commit()
        conn.close()
        return p
    return build


def sqlite_new(name: str, *statements: str):
    def build(tmp):
        p = tmp / name
        conn = sqlite3.connect(p)
        conn.execute("PRAGMA user_version = 7")  # writes a valid header even with no table
        for s in statements:
            conn.execute(s)
        conn.commit()
        conn.close()
        return p
    return build


_K = "CUPTI_ACTIVITY_KIND_KERNEL"


def _kernel_cols_without(col: str) -> str:
    cols = [r[1] for r in sqlite3.connect(NSYS).execute(f"PRAGMA table_info({_K})")]
    return ", ".join(f'"{c}"' for c in cols if c != col)


def nsys_drop_column(col: str):
    def build(tmp):
        return nsys_sql(f"no_{col}.nsys.sqlite",
                        f"CREATE TABLE k2 AS SELECT {_kernel_cols_without(col)} FROM {_K}",
                        f"DROP TABLE {_K}", f"ALTER TABLE k2 RENAME TO {_K}")(tmp)
    return build


def nsys_loose(name: str, *statements: str):
    """The kernel table copied without its NOT NULL constraints (CREATE TABLE AS), then ``statements``."""
    def build(tmp):
        return nsys_sql(name, f"CREATE TABLE k2 AS SELECT * FROM {_K}", f"DROP TABLE {_K}",
                        f"ALTER TABLE k2 RENAME TO {_K}", *(x.format(K=_K) for x in statements))(tmp)
    return build


def torch_bytes() -> bytes:
    return gzip.decompress(TORCH.read_bytes())


def torch_doc() -> dict:
    return json.loads(torch_bytes())


def torch_text(name: str, fn, gz: bool = False):
    def build(tmp):
        data = fn(torch_bytes())
        return _write(tmp, name, gzip.compress(data) if gz else data)
    return build


def torch_json(name: str, fn):
    def build(tmp):
        return _write(tmp, name, json.dumps(fn(torch_doc())))
    return build


def gz_cut(frac: float):
    def build(tmp):
        data = TORCH.read_bytes()
        return _write(tmp, "cut.torch.json.gz", data[:int(len(data) * frac)])
    return build


def text_of(src: Path, name: str, fn):
    def build(tmp):
        return _write(tmp, name, fn(src.read_text()))
    return build


def bytes_of(src: Path, name: str, fn):
    def build(tmp):
        return _write(tmp, name, fn(src.read_bytes()))
    return build


def data_file(name: str):
    return lambda tmp: DATA / name


def _ncu_drop_units(text: str) -> str:
    lines = text.splitlines(keepends=True)
    return lines[0] + "".join(lines[2:])


def _ncu_cut_mid_row(text: str) -> str:
    lines = text.splitlines(keepends=True)
    last = lines[-1]
    return "".join(lines[:-1]) + last[: len(last) // 2]


def _ncu_add_columns(text: str) -> str:
    lines = text.splitlines()
    out = [lines[0] + ',"Frobnication Level"', lines[1] + ',"widgets"'] + [x + ',"42"' for x in lines[2:]]
    return "\n".join(out) + "\n"


def _nccl_header_rename(text: str) -> str:
    return text.replace("busbw #wrong", "busbw #zorch", 1)


def _nccl_wrong(text: str) -> str:
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip().startswith("1048576 "):
            lines[i] = line[: line.rstrip().rfind(" 0")] + " 7\n"
    return "".join(lines)


def _nccl_cut(text: str) -> str:
    i = text.index("     1048576")
    return text[: i + 40]  # ends inside the 1 MiB row, no footer


def _manifest_escape(tmp):
    run = tmp / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"reports": [{"path": "../../etc/passwd", "rank": 0}]}))
    return run


def _manifest_absolute(tmp):
    run = tmp / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"reports": [{"path": "/etc/passwd", "rank": 0}]}))
    return run


def _dup_kernel_missing_ts(doc: dict) -> dict:
    n = 0
    for e in doc["traceEvents"]:
        if isinstance(e, dict) and e.get("cat") == "kernel" and n < 3:
            del e["ts"]
            n += 1
    return doc


# name, builder, expected substring of the one-line error
ERROR_CASES = [
    # --- nsys SQLite
    ("nsys_cut_50B", nsys_cut(50), "shorter than the SQLite header"),
    ("nsys_cut_100B", nsys_cut(100), "corrupt or truncated SQLite"),
    ("nsys_cut_4KiB", nsys_cut(4096), "corrupt or truncated SQLite"),
    ("nsys_cut_half", nsys_cut(190464), "corrupt or truncated SQLite"),
    ("nsys_cut_last_page", nsys_cut(-4096), "corrupt or truncated SQLite"),
    ("nsys_cut_odd", nsys_cut(-1234), "corrupt or truncated SQLite"),
    ("nsys_pages_ff_mid", nsys_flip(0.5, 3 * 4096), "SQLite"),
    ("nsys_pages_00_first_quarter", nsys_flip(0.25, 8 * 4096, 0x00), "SQLite"),
    ("nsys_schema_page_zeroed", nsys_flip(0.0, 4096 * 2, 0x00), "SQLite"),
    ("sqlite_empty_no_tables", sqlite_new("empty.sqlite"), "not an Nsight Systems export"),
    ("sqlite_other_program", sqlite_new("other.sqlite", "CREATE TABLE foo (x INTEGER)", "INSERT INTO foo VALUES (1)"),
     "not an Nsight Systems export"),
    ("sqlite_only_stringids", sqlite_new("strings.sqlite", "CREATE TABLE StringIds (id INTEGER, value TEXT)"),
     "not an Nsight Systems export"),
    ("nsys_kernel_no_start", nsys_drop_column("start"), "CUPTI_ACTIVITY_KIND_KERNEL has no start column"),
    ("nsys_kernel_end_renamed", nsys_sql("renamed.nsys.sqlite", f'ALTER TABLE {_K} RENAME COLUMN "end" TO "endNs"'),
     "CUPTI_ACTIVITY_KIND_KERNEL has no end column"),
    ("nsys_kernel_start_text", nsys_sql("text.nsys.sqlite", f"UPDATE {_K} SET start = 'soon' WHERE rowid = 5"),
     "unexpected non-numeric values"),
    # --- PyTorch profiler JSON
    ("torch_json_cut_half", torch_text("cut.json", lambda b: b[: len(b) // 2]), "truncated or invalid JSON"),
    ("torch_json_cut_header", torch_text("cut_head.json", lambda b: b[:300]), "truncated or invalid JSON"),
    ("torch_jsongz_cut_half", gz_cut(0.5), "corrupt gzip"),
    ("torch_jsongz_cut_90", gz_cut(0.9), "corrupt gzip"),
    ("torch_gz_of_truncated_json", torch_text("cutz.json.gz", lambda b: b[: len(b) // 3], gz=True),
     "truncated or invalid JSON"),
    ("torch_invalid_utf8_header", torch_text("utf8.json", lambda b: b.replace(b"NVIDIA H100", b"NVIDIA \xff\xfe", 1)),
     "invalid UTF-8"),
    ("torch_invalid_utf8_kernel",
     torch_text("utf8k.json", lambda b: b.replace(b'"cat": "kernel", "name": "void', b'"cat": "kernel", "name": "\xc3(', 1)),
     "invalid UTF-8"),
    ("torch_list_of_numbers", lambda tmp: _write(tmp, "nums.json", "[1, 2, 3]"), "does not hold trace events"),
    ("torch_list_of_objects_no_ph", lambda tmp: _write(tmp, "objs.json", '[{"a": 1}, {"b": 2}]'),
     "does not hold trace events"),
    ("torch_no_traceEvents", torch_json("notrace.json", lambda d: {k: v for k, v in d.items() if k != "traceEvents"}),
     "has no traceEvents"),
    ("torch_traceEvents_not_list", torch_json("dict.json", lambda d: {**d, "traceEvents": {"a": 1}}),
     "expected a list of events"),
    ("torch_event_is_number", torch_json("evnum.json", lambda d: {**d, "traceEvents": d["traceEvents"][:5] + [42]}),
     "traceEvents[5] is a int"),
    ("json_scalar", lambda tmp: _write(tmp, "scalar.json", '{"traceEvents": 1}'), "expected a list of events"),
    # --- ncu CSV
    ("ncu_cut_mid_row", text_of(NCU_RAW, "cut.csv", _ncu_cut_mid_row), "truncated CSV"),
    ("ncu_units_row_missing", text_of(NCU_RAW, "nounits.csv", _ncu_drop_units), "missing units row"),
    ("ncu_header_only", text_of(NCU_RAW, "hdr.csv", lambda t: "".join(t.splitlines(True)[:2])), "no kernel rows"),
    ("ncu_details_cut_mid_row", text_of(NCU_DETAILS, "dcut.csv", _ncu_cut_mid_row), "CSV"),
    ("csv_other_tool", lambda tmp: _write(tmp, "smi.csv", "timestamp, name, utilization.gpu [%]\n"
                                          "2026/11/23 10:00:00.000, NVIDIA H100 80GB HBM3, 97 %\n"),
     "not a recognized trace"),
    ("csv_other_tool_kernel_name", lambda tmp: _write(tmp, "other.csv", '"Kernel Name","Time"\n"gemm","1.0"\n'),
     "not an Nsight Compute CSV export"),
    # --- nccl-tests logs
    ("nccl_unknown_column", text_of(NCCL, "unk.log", _nccl_header_rename), "unknown column"),
    ("nccl_no_table", text_of(NCCL, "notable.log", lambda t: t.split("#       size")[0]), "no nccl-tests result table"),
    # --- CUDA memory snapshots (pickles)
    ("pickle_reduce_os_system", data_file("reduce_os_system_handmade.pickle"), "refused"),
    ("pickle_global_builtins_eval", data_file("global_builtins_eval_handmade.pickle"), "refused"),
    ("pickle_import_module", data_file("import_module_handmade.pickle"), "refused"),
    ("pickle_snapshot_with_payload", data_file("snapshot_with_payload_handmade.pickle"), "refused"),
    ("pickle_truncated_handmade", data_file("truncated_snapshot_handmade.pickle"), "truncated pickle"),
    ("pickle_list_not_snapshot", data_file("list_not_snapshot_handmade.pickle"), "not a CUDA memory snapshot"),
    ("pickle_real_cut_half", bytes_of(SNAPSHOT, "cut.pickle", lambda b: b[: len(b) // 2]), "truncated pickle"),
    ("pickle_real_cut_10", bytes_of(SNAPSHOT, "cut10.pickle", lambda b: b[:10]), "truncated pickle"),
    # --- Prometheus text
    ("prom_no_vllm_metric", text_of(PROM, "novllm.prom", lambda t: "\n".join(
        x for x in t.splitlines() if "vllm:" not in x) + "\n"), "without any vllm: metric"),
    # --- detection, run directories
    ("empty_file", lambda tmp: _write(tmp, "empty.json", b""), "empty file"),
    ("random_binary", lambda tmp: _write(tmp, "noise.bin", bytes(range(256)) * 8), "not a recognized trace"),
    ("dir_without_run", lambda tmp: tmp, "directory holds no gpudoctor run"),
    ("manifest_path_escapes", _manifest_escape, "points outside the run directory"),
    ("manifest_absolute_path", _manifest_absolute, "points outside the run directory"),
    ("manifest_unreadable", lambda tmp: (tmp / "m").mkdir() or _write(tmp / "m", "manifest.json", "{oops").parent,
     "unreadable manifest"),
]

# Cases that also go through the CLI in a subprocess (one per reader family and failure kind).
CLI_CASES = {"nsys_cut_half", "sqlite_other_program", "nsys_kernel_no_start", "torch_jsongz_cut_half",
             "ncu_units_row_missing", "nccl_unknown_column", "pickle_reduce_os_system",
             "manifest_path_escapes"}


def _names(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("name,build,expect", ERROR_CASES, ids=_names(ERROR_CASES))
def test_bad_input_one_line_error(name, build, expect, tmp_path):
    path = build(tmp_path)
    with pytest.raises(GpudoctorError) as ei:
        read_input(path)
    msg = str(ei.value)
    assert isinstance(ei.value, InputError), f"{type(ei.value).__name__}: {msg}"
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(path) in msg or str(path / "manifest.json") in msg, msg
    assert expect in msg, msg


# --------------------------------------------------------------------------------------------------
# damage the readers tolerate: success, exact counts, nothing dropped silently


def _kernels(t):
    return len(t.kernels)


SUCCESS_CASES = [
    # name, builder, kernel count, {dropped reason substring: count}
    ("nsys_no_kernel_table", nsys_sql("nok.nsys.sqlite", f"DROP TABLE {_K}"), 0, {}),
    ("nsys_end_before_start", nsys_sql("neg.nsys.sqlite", f'UPDATE {_K} SET "end" = start - 5 WHERE rowid IN (3, 4, 5, 9)'),
     NSYS_KERNELS - 4, {"kernel end before start": 4}),
    ("nsys_null_short_names", nsys_loose("null.nsys.sqlite", "UPDATE {K} SET shortName = NULL WHERE rowid < 20"),
     NSYS_KERNELS, {}),
    ("nsys_all_names_null", nsys_loose("null2.nsys.sqlite", "UPDATE {K} SET shortName = NULL, demangledName = NULL"),
     NSYS_KERNELS, {}),
    ("nsys_older_schema_no_greenContextId", nsys_drop_column("greenContextId"), NSYS_KERNELS, {}),
    ("nsys_older_schema_no_shortName", nsys_drop_column("shortName"), NSYS_KERNELS, {}),
    ("nsys_newer_schema_extra_column", nsys_sql("extra.nsys.sqlite", f"ALTER TABLE {_K} ADD COLUMN futureThing INTEGER"),
     NSYS_KERNELS, {}),
    ("nsys_no_session_start", nsys_sql("nostart.nsys.sqlite", "DROP TABLE TARGET_INFO_SESSION_START_TIME"),
     NSYS_KERNELS, {}),
    ("torch_kernels_missing_ts", torch_json("nots.json", _dup_kernel_missing_ts), -3, {"missing ts or dur": 3}),
    ("torch_single_line_json", torch_json("one.json", lambda d: d), None, {}),
    ("torch_bare_event_list", torch_json("bare.json", lambda d: d["traceEvents"]), None, {}),
    ("nccl_cut_short", text_of(NCCL, "short.log", _nccl_cut), 0, None),
    ("nccl_wrong_results", text_of(NCCL, "wrong.log", _nccl_wrong), 0, None),
    ("ncu_unknown_columns", text_of(NCU_RAW, "extra.csv", _ncu_add_columns), 0, None),
]


@pytest.mark.parametrize("name,build,kernels,dropped", SUCCESS_CASES, ids=_names(SUCCESS_CASES))
def test_tolerated_damage(name, build, kernels, dropped, tmp_path):
    path = build(tmp_path)
    t = read_input(path)
    if name.startswith("torch_"):  # relative to the intact fixture
        kernels = _kernels(read_input(TORCH)) + (kernels or 0)
    assert _kernels(t) == kernels
    if dropped is not None:
        counts = t.dropped_counts()
        for reason, n in dropped.items():
            (hit,) = [v for k, v in counts.items() if reason in k]
            assert hit == n, counts
        if not dropped and name.startswith("nsys_"):
            assert "kernel end before start" not in " ".join(counts)


def test_nccl_cut_short_is_counted(tmp_path):
    full = read_input(NCCL).meta
    t = read_input(_nccl_cut(NCCL.read_text()) and text_of(NCCL, "short.log", _nccl_cut)(tmp_path))
    meta = json.dumps(t.meta, default=str)
    assert '"complete": false' in meta or t.dropped_counts(), meta[:500]
    del full


def test_nccl_wrong_results_high_finding(tmp_path):
    path = text_of(NCCL, "wrong.log", _nccl_wrong)(tmp_path)
    a = analyze_inputs([str(path)])
    hits = [f for f in a.findings if f.severity == "high" and "corruption" in f.title]
    assert hits, [(f.severity, f.title) for f in a.findings]
    assert "7 wrong" in hits[0].title  # the in-place column of the 1 MiB row


def test_duplicate_torch_ranks_claims_rank(tmp_path):
    doc = torch_doc()
    doc["distributedInfo"] = {"rank": 3, "world_size": 4, "backend": "nccl"}
    a = _write(tmp_path, "a.json", json.dumps(doc))
    b = _write(tmp_path, "b.json", json.dumps(doc))
    out = tmp_path / "o.json"
    p = _cli("analyze", str(a), str(b), "--json", str(out), "-q")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "claims rank 3" in lines[0] and "b.json" in lines[0], p.stderr


# --------------------------------------------------------------------------------------------------
# through the CLI, as users run it


def _cli_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("GPUDOCTOR_DEBUG", None)  # users' behaviour: no traceback even for a bug
    return env


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpudoctor", *args], capture_output=True, text=True,
                          env=_cli_env(), cwd=ROOT, timeout=300)


GOOD = FX / "nsys" / "kv_static.nsys.sqlite"


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Run all CLI cases concurrently (two at a time per core is plenty) and collect the results."""
    procs = {}
    for name, build, expect in ERROR_CASES:
        if name not in CLI_CASES:
            continue
        tmp = tmp_path_factory.mktemp(name)
        bad = build(tmp)
        good = tmp / "rank5.nsys.sqlite"  # the good input claims rank 5 from its name
        shutil.copyfile(GOOD, good)
        out = tmp / "out.json"
        p = subprocess.Popen([sys.executable, "-m", "gpudoctor", "analyze", str(bad), str(good), "--json", str(out),
                              "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env(),
                             cwd=ROOT)
        procs[name] = (p, bad, out, expect)
    results = {}
    for name, (p, bad, out, expect) in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        results[name] = (p.returncode, stdout, stderr, bad, out, expect)
    return results


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_bad_input_exit_2_and_good_input_analyzed(name, cli_results):
    rc, stdout, stderr, bad, out, expect = cli_results[name]
    assert rc == 2, stderr
    assert "Traceback" not in stderr + stdout and "internal error" not in stderr, stderr
    # -q: stdout stays empty; the error is one line on stderr and in the JSON
    assert stdout.strip() == ""
    err_lines = stderr.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("gpudoctor: error: "), stderr
    doc = json.loads(out.read_text())
    (err,) = doc["errors"]
    assert "\n" not in err and expect in err, err
    assert str(bad) in err or str(bad / "manifest.json") in err, err
    assert [i.get("error") for i in doc["inputs"] if i.get("error")] == [err]
    assert [r["rank"] for r in doc["ranks"]] == [5]
    assert doc["ranks"][0]["kernel_count"] == NSYS_KERNELS


def test_cli_bad_input_error_is_one_stderr_line_without_quiet(tmp_path):
    bad = _manifest_escape(tmp_path)
    p = _cli("analyze", str(bad), str(GOOD))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr + p.stdout
    lines = [x for x in p.stderr.splitlines() if "points outside" in x]
    assert len(lines) == 1 and "manifest.json" in lines[0] and lines[0].rstrip().endswith("run directory"), p.stderr


# --------------------------------------------------------------------------------------------------
# a large file is streamed, not loaded whole

_RSS_SCRIPT = r"""
import json, resource, sys
from gpudoctor.readers.inputs import read_input
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = read_input(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kernels": len(t.kernels), "growth_mb": (after - before) / 1024,
                  "parser": str(t.meta.get("torch_profiler", {}).get("parser", ""))}))
"""


def _big_trace(path: Path, target_bytes: int, one_line: bool) -> int:
    """A Kineto-like trace of ~target_bytes made of many copies of the fixture's kernel + runtime events."""
    doc = torch_doc()
    events = [e for e in doc.pop("traceEvents") if isinstance(e, dict)]
    base = [e for e in events if e.get("cat") in ("kernel", "cuda_runtime")]
    other = [e for e in events if e.get("cat") not in ("kernel", "cuda_runtime")]
    head = json.dumps(doc)[:-1] + ', "traceEvents": ['
    sep = ", " if one_line else ",\n  "
    n = 0
    with open(path, "w") as f:
        f.write(head if one_line else head + "\n  ")
        f.write(sep.join(json.dumps(e) for e in other))
        size, shift = f.tell(), 0
        while size < target_bytes:
            shift += 1_000_000.0
            chunk = []
            for e in base:
                e2 = dict(e, ts=e["ts"] + shift)
                if "args" in e2 and "correlation" in e2["args"]:
                    e2["args"] = dict(e2["args"], correlation=e2["args"]["correlation"] + int(shift))
                chunk.append(json.dumps(e2))
                n += e.get("cat") == "kernel"
            s = sep + sep.join(chunk)
            f.write(s)
            size += len(s)
        f.write("]}" if one_line else "\n  ]\n}\n")
    return n


@pytest.mark.parametrize("one_line", [False], ids=["kineto_layout"])
def test_large_trace_streamed_bounded_memory(one_line, tmp_path):
    if os.environ.get("GPUDOCTOR_SKIP_BIG"):
        pytest.skip("GPUDOCTOR_SKIP_BIG set")
    big = tmp_path / "big.json"
    n = _big_trace(big, 50 << 20, one_line)
    p = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(big)], capture_output=True, text=True,
                       env=_cli_env(), cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["kernels"] >= n * 0.99
    assert r["growth_mb"] < 300, r
