"""Tests of run.db (gpudoctor.store): round trips, dtypes, meta, empty tables, atomic writes, the
columnar cache, and files that are not (or not yet) readable run.dbs."""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpudoctor.errors import GpudoctorError, InputError
from gpudoctor.model.schema import TABLES
from gpudoctor.model.trace import Trace, conform, empty_frame
from gpudoctor.store import (
    MODEL_VERSION,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    cache_path,
    is_run_db,
    load,
    rundb,
    save,
)
from gpudoctor.store.atomic import temp_path

# Values that are easy to get wrong: fills, extremes of int64, NaN/inf, unicode, SQL quoting, the
# separator the reader uses (U+001F), newlines, empty strings.
INTS = [0, -1, 2**62 + 7, -(2**63), 2**63 - 1]
FLOATS = [1.5, float("nan"), float("inf"), 1e-300, -2.5e12]
TEXTS = ["gemm", "", "naïve ✓ 🚀 µs 注意", "a\x1fb", "tab\t'quote\" \nnew line"]


def _synthetic_trace() -> Trace:
    """A few rows in every table, every column kind exercised, built with conform()."""
    t = Trace(meta={
        "inputs": [{"path": "/data/rank0.nsys.sqlite", "format": "nsys_sqlite", "rank": 0}],
        "tool": "nsys 2025.3.2", "unicode": "ünïcödé ✓", "nested": {"a": [1, 2.5, None, True], "b": {}},
        "empty_list": [], "number": 3, "float": 0.1, "none": None,
    })
    for name, spec in TABLES.items():
        cols = {}
        for i, (col, kind, fill) in enumerate(spec):
            if kind == "i8":
                vals = INTS[i % 2:] + INTS[:i % 2]
                cols[col] = np.array(vals, dtype=np.int64)
            elif kind == "f8":
                cols[col] = np.array(FLOATS, dtype=np.float64)
            elif kind == "b":
                cols[col] = np.array([True, False, True, False, False])
            else:
                cols[col] = TEXTS[i % 3:] + TEXTS[:i % 3]
        t.set(name, cols)
    # A categorical with unsorted categories and one no row uses.
    t.kernels["name"] = pd.Categorical(["z_kernel", "a_kernel", "z_kernel", "m ✓", "a_kernel"],
                                       categories=["z_kernel", "unused", "m ✓", "a_kernel"])
    t.kernels = conform("kernels", t.kernels)
    return t


def _assert_same_table(name: str, a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Same columns, exactly the dtypes conform() gives, same values (categoricals compared by value)."""
    expected = conform(name, a)
    assert list(b.columns) == list(expected.columns), name
    assert len(a) == len(b), name
    for col, kind, _ in TABLES[name]:
        x, y = a[col], b[col]
        if kind == "cat":
            # Categories come back sorted and without unused ones (run.db stores values, not categories).
            assert isinstance(y.dtype, pd.CategoricalDtype) and not y.dtype.ordered
            assert y.dtype == pd.CategoricalDtype(x.astype(object).unique()), (name, col)
            assert y.cat.categories.dtype == expected[col].cat.categories.dtype, (name, col)
            assert list(y.cat.categories) == sorted(set(y.astype(object))), (name, col)  # sorted, no unused
            assert x.astype(object).tolist() == y.astype(object).tolist(), (name, col)
        elif kind == "str":
            assert y.dtype == expected[col].dtype, (name, col, y.dtype)
            assert x.tolist() == y.tolist(), (name, col)
            assert all(type(v) is str for v in y.tolist())
        elif kind == "f8":
            assert y.dtype == expected[col].dtype, (name, col, y.dtype)
            np.testing.assert_array_equal(x.to_numpy(), y.to_numpy(), err_msg=f"{name}.{col}")
        else:
            assert y.dtype == expected[col].dtype, (name, col, y.dtype)
            np.testing.assert_array_equal(x.to_numpy(), y.to_numpy(), err_msg=f"{name}.{col}")


def _assert_same_trace(a: Trace, b: Trace) -> None:
    for name, df in a.tables():
        _assert_same_table(name, df, b.table(name))
    assert b.meta == a.meta


# ----------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("use_cache", [True, False])
def test_round_trip_preserves_values_dtypes_and_meta(tmp_path, use_cache):
    t = _synthetic_trace()
    db = save(t, tmp_path / "run.db", cache=use_cache)
    assert db == tmp_path / "run.db"
    assert cache_path(db).exists() == use_cache
    back = load(db, use_cache=use_cache)
    _assert_same_trace(t, back)
    assert sorted(os.listdir(tmp_path)) == sorted(["run.db"] + (["run.db.cache.npz"] if use_cache else []))


def test_cache_and_sqlite_give_identical_frames(tmp_path):
    t = _synthetic_trace()
    db = save(t, tmp_path / "run.db")
    from_cache = load(db)
    from_db = load(db, use_cache=False)
    for name, df in from_cache.tables():
        pd.testing.assert_frame_equal(df, from_db.table(name), check_exact=True)


def test_load_uses_the_cache_when_it_matches(tmp_path, monkeypatch):
    db = save(_synthetic_trace(), tmp_path / "run.db")

    def boom(*a, **k):
        raise AssertionError("read run.db although the cache matches")

    monkeypatch.setattr(rundb, "_read_table", boom)
    assert len(load(db).kernels) == 5


def test_empty_tables_are_preserved(tmp_path):
    t = Trace(meta={"inputs": []})
    db = save(t, tmp_path / "run.db")
    with sqlite3.connect(db) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert set(TABLES) | {"meta"} <= names
        for name, spec in TABLES.items():
            assert [r[1] for r in conn.execute(f'PRAGMA table_info("{name}")')] == [c for c, _, _ in spec]
    for use_cache in (True, False):
        back = load(db, use_cache=use_cache)
        for name, df in back.tables():
            assert len(df) == 0
            pd.testing.assert_frame_equal(df, empty_frame(name))
        assert back.meta == {"inputs": []}


def test_some_tables_empty_some_not(tmp_path):
    t = Trace()
    t.set("kernels", {"start_ns": [5, 1], "end_ns": [6, 2], "name": ["b", "a"]})
    back = load(save(t, tmp_path / "run.db"), use_cache=False)
    assert back.kernels["start_ns"].tolist() == [5, 1]  # row order kept
    assert back.kernels["stream_id"].tolist() == [-1, -1]  # fills kept
    assert len(back.api_calls) == 0 and list(back.api_calls.columns) == list(empty_frame("api_calls").columns)


def test_nan_in_a_categorical_becomes_the_fill(tmp_path):
    t = Trace()
    t.set("kernels", {"start_ns": [1, 2], "name": pd.Categorical(["x", None])})
    for use_cache in (True, False):
        back = load(save(t, tmp_path / "run.db", cache=use_cache), use_cache=use_cache)
        assert back.kernels["name"].tolist() == ["x", ""]


def test_meta_json_conversions_and_reserved_keys(tmp_path):
    t = Trace(meta={"n": np.int64(3), "x": np.float32(0.5), "p": Path("/a/b"), "s": {2, 1}, "arr": np.arange(3)})
    back = load(save(t, tmp_path / "run.db"))
    assert back.meta == {"n": 3, "x": 0.5, "p": "/a/b", "s": [1, 2], "arr": [0, 1, 2]}
    with pytest.raises(ValueError, match="reserved"):
        save(Trace(meta={"schema_version": 7}), tmp_path / "other.db")
    assert not (tmp_path / "other.db").exists()


def test_run_db_is_plain_sqlite_for_users(tmp_path):
    db = save(_synthetic_trace(), tmp_path / "run.db")
    with sqlite3.connect(db) as conn:
        types = {r[1]: r[2] for r in conn.execute("PRAGMA table_info(kernels)")}
        assert types["start_ns"] == "INTEGER" and types["name"] == "TEXT"
        assert {r[1]: r[2] for r in conn.execute("PRAGMA table_info(counters)")}["value"] == "REAL"
        assert conn.execute("SELECT name FROM kernels ORDER BY rowid LIMIT 1").fetchone()[0] == "z_kernel"
        assert conn.execute("SELECT count(*) FROM counters WHERE value IS NULL").fetchone()[0] == 1  # the NaN
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        assert json.loads(meta["schema_version"]) == MODEL_VERSION
        assert json.loads(meta["unicode"]) == "ünïcödé ✓"
        for table in ("kernels", "api_calls", "ranges"):
            cols = [r[2] for r in conn.execute(f"PRAGMA index_info({table}_rank_start_ns)")]
            assert cols == ["rank", "start_ns"]
        plan = " ".join(r[3] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM kernels WHERE rank = 0 AND start_ns > 5"))
        assert "kernels_rank_start_ns" in plan
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # an ordinary database


def test_save_into_a_directory_and_overwrite(tmp_path):
    t = _synthetic_trace()
    db = save(t, tmp_path)
    assert db == tmp_path / "run.db"
    t2 = Trace()
    t2.set("kernels", {"start_ns": [42]})
    save(t2, tmp_path)
    back = load(tmp_path)
    assert back.kernels["start_ns"].tolist() == [42] and len(back.api_calls) == 0
    assert sorted(os.listdir(tmp_path)) == ["run.db", "run.db.cache.npz"]


# ----------------------------------------------------------------------------------------------------
# The cache follows run.db


def test_edited_run_db_is_read_from_sqlite_and_the_cache_refreshed(tmp_path):
    db = save(_synthetic_trace(), tmp_path / "run.db")
    with sqlite3.connect(db) as conn:  # a user edits run.db with a SQLite tool
        conn.execute("UPDATE kernels SET start_ns = 777, name = 'edited' WHERE rowid = 1")
        conn.execute("INSERT INTO kernels (rank, start_ns) VALUES (3, NULL)")  # NULLs and missing values
    back = load(db)
    assert back.kernels["start_ns"].tolist()[0] == 777 and back.kernels["name"].tolist()[0] == "edited"
    assert back.kernels["start_ns"].tolist()[-1] == 0 and back.kernels["stream_id"].tolist()[-1] == -1
    assert back.kernels["name"].tolist()[-1] == ""
    _assert_same_table("kernels", back.kernels, load(db, use_cache=False).kernels)
    # The refreshed cache now matches run.db and is used.
    assert rundb._read_cache(db, rundb._read_meta(sqlite3.connect(db), db)[1]) is not None


def test_corrupt_or_foreign_cache_is_ignored(tmp_path):
    t = _synthetic_trace()
    db = save(t, tmp_path / "run.db")
    cache_path(db).write_bytes(b"not a zip file")
    _assert_same_trace(t, load(db))
    # A cache of another run.db (copied over) does not match this file's stamp.
    other = save(Trace(), tmp_path / "other" / "run.db")
    os.replace(cache_path(other), cache_path(db))
    _assert_same_trace(t, load(db))


def test_save_without_cache_removes_a_stale_one(tmp_path):
    db = save(_synthetic_trace(), tmp_path / "run.db")
    assert cache_path(db).exists()
    save(Trace(), db, cache=False)
    assert not cache_path(db).exists()
    assert len(load(db, use_cache=False).kernels) == 0


# ----------------------------------------------------------------------------------------------------
# Atomic writes


def test_interrupted_atomic_path_leaves_nothing(tmp_path):
    target = tmp_path / "run.db"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and re.fullmatch(rf"run\.db\.tmp-{os.getpid()}-[0-9a-f]{{8}}", tmp.name)
            tmp.write_bytes(b"half written")
            raise RuntimeError("crash while writing")
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_interrupted_atomic_path_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new, partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.json"]


def test_atomic_path_requires_a_write(tmp_path):
    target = tmp_path / "f"
    with pytest.raises(FileNotFoundError):
        with atomic_path(target):
            pass  # wrote nothing
    assert os.listdir(tmp_path) == []


def test_temp_names_differ_for_the_same_pid(tmp_path):
    """Two writers with the same pid (two containers sharing a directory) never share a temp file."""
    names = {temp_path(tmp_path / "f").name for _ in range(100)}
    assert len(names) == 100 and all(n.startswith(f"f.tmp-{os.getpid()}-") for n in names)


def test_atomic_write_text_and_bytes(tmp_path):
    p = atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(tmp_path / "a.txt", b"\x00\x01")
    assert (tmp_path / "a.txt").read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_save_interrupted_midway_leaves_no_file(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rundb, "_insert", fail)
    with pytest.raises(OSError, match="disk full"):
        save(_synthetic_trace(), tmp_path / "run.db")
    assert os.listdir(tmp_path) == []


def test_save_interrupted_midway_keeps_the_previous_run(tmp_path, monkeypatch):
    t = _synthetic_trace()
    db = save(t, tmp_path / "run.db")
    monkeypatch.setattr(rundb, "_insert", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save(t, db)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["run.db", "run.db.cache.npz"]
    _assert_same_trace(t, load(db))


# ----------------------------------------------------------------------------------------------------
# Not a run.db, or a newer one


def test_is_run_db(tmp_path):
    db = save(Trace(), tmp_path / "run.db")
    assert is_run_db(db) and is_run_db(tmp_path)
    other = tmp_path / "nsys.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE StringIds (id INTEGER, value TEXT)")
        conn.execute("CREATE TABLE kernels (start INTEGER)")
    assert not is_run_db(other)
    (tmp_path / "text.txt").write_text("hello")
    assert not is_run_db(tmp_path / "text.txt")
    assert not is_run_db(tmp_path / "missing.db")
    with sqlite3.connect(tmp_path / "meta_only.db") as conn:  # a meta table, but not ours
        conn.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    assert not is_run_db(tmp_path / "meta_only.db")
    with pytest.raises(InputError, match="not a gpudoctor run.db"):
        load(other)
    with pytest.raises(InputError, match="not an SQLite file"):
        load(tmp_path / "text.txt")
    with pytest.raises(InputError, match="no such file"):
        load(tmp_path / "missing.db")


def test_newer_schema_version_is_a_one_line_error(tmp_path):
    db = save(_synthetic_trace(), tmp_path / "run.db")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(MODEL_VERSION + 1),))
    assert is_run_db(db)
    for use_cache in (True, False):
        with pytest.raises(GpudoctorError) as e:
            load(db, use_cache=use_cache)
        msg = str(e.value)
        assert "\n" not in msg and f"version {MODEL_VERSION + 1}" in msg and "newer gpudoctor" in msg


def test_invalid_schema_version(tmp_path):
    db = save(Trace(), tmp_path / "run.db")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '\"one\"' WHERE key = 'schema_version'")
    with pytest.raises(InputError, match="invalid schema_version"):
        load(db)


def test_truncated_run_db_is_an_input_error(tmp_path):
    db = save(_synthetic_trace(), tmp_path / "run.db", cache=False)
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load(db)


def test_floats_survive_sqlite_exactly(tmp_path):
    rng = np.random.default_rng(1)
    vals = rng.standard_normal(1000) * 10.0 ** rng.integers(-300, 300, 1000)
    t = Trace()
    t.set("counters", {"ts_ns": np.arange(1000), "name": ["util"] * 1000, "value": vals})
    back = load(save(t, tmp_path / "run.db", cache=False), use_cache=False)
    assert back.counters["value"].to_numpy().tobytes() == vals.tobytes()
    assert math.isclose(back.counters["value"].sum(), vals.sum(), rel_tol=0, abs_tol=0)


def test_run_db_is_told_from_an_nsys_export_by_its_header(tmp_path, monkeypatch):
    """A run.db carries its application id, so sniffing it opens no SQLite connection (the reader's is the
    only one); an nsys export (application id 0) is still asked for the meta table, once."""
    db = save(Trace(), tmp_path / "run.db")
    assert int.from_bytes(db.read_bytes()[68:72], "big") == rundb.APPLICATION_ID
    nsys_export = Path(__file__).resolve().parent.parent / "fixtures" / "nsys" / "tiny_sync.nsys.sqlite"
    assert int.from_bytes(nsys_export.read_bytes()[68:72], "big") == 0
    opened = []
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: opened.append(a[0]) or real_connect(*a, **k))
    assert is_run_db(db) and opened == []
    assert not is_run_db(nsys_export) and len(opened) == 1
