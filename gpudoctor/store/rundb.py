"""run.db: the trace model as one SQLite file that any SQLite tool can open, plus a columnar cache.

Layout of run.db:

- one table per model table (``gpudoctor.model.schema.TABLES``), same column names and order, with
  INTEGER / REAL / TEXT columns (categoricals and strings are plain TEXT, so ``SELECT name FROM kernels``
  just works). Rows keep the trace's row order (rowid 1..n). NaN in REAL columns is stored as NULL;
  integer "unknown" values keep the model's fill (-1 etc.).
- ``meta (key TEXT PRIMARY KEY, value TEXT)``: ``trace.meta`` as one JSON value per key, plus the
  reserved keys ``schema_version`` (the trace-model version, ``MODEL_VERSION``) and ``write_id`` (a
  random id of this write, which ties the columnar cache to this exact file).
- indexes on (rank, start_ns) of kernels, api_calls and ranges.

Columnar cache: ``<run.db>.cache.npz`` next to it (e.g. ``run.db.cache.npz``), an uncompressed npz
with every column as a numpy array (integers narrowed to the smallest unsigned type after subtracting
the column minimum; strings as integer codes plus a JSON list of their distinct values; no pickles).
It records run.db's size, mtime and write_id; ``load`` uses it only when all three still match, and
otherwise reads run.db and rewrites the cache (best effort). Deleting the cache is always safe.

Speed (2-core machine, 1M kernels + 1M API calls + 50k ranges; see bench/bench_store.py): rows go in
through ``executemany`` of multi-row ``INSERT ... VALUES (...),(...)`` statements fed from per-column
``tolist()`` chunks (sqlite-utils' ``insert_all`` is ~10x slower here); run.db is written with
journal_mode=OFF / synchronous=OFF into a temporary file and renamed into place (atomic), and the
indexes are built after the rows. Reading run.db uses one ``group_concat`` per column and row chunk
parsed by numpy (integers) or split on U+001F (text); reading the cache is a few memcpy's.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
import warnings
import zipfile
from collections.abc import Iterable
from itertools import chain, islice
from pathlib import Path

import numpy as np
import pandas as pd

from gpudoctor.errors import GpudoctorError, InputError, one_line
from gpudoctor.model.schema import TABLES
from gpudoctor.model.trace import Trace, conform, empty_frame
from gpudoctor.store.atomic import atomic_path

MODEL_VERSION = 1
"""Version of the trace model stored in run.db (``meta.schema_version``). Bump when a column changes
meaning or a table changes in a way that old readers would misread."""

DB_NAME = "run.db"
META_TABLE = "meta"
RESERVED_META_KEYS = ("schema_version", "write_id")
INDEXED_TABLES = ("kernels", "api_calls", "ranges")
CACHE_SUFFIX = ".cache.npz"
CACHE_FORMAT = 1

SQLITE_MAGIC = b"SQLite format 3\x00"
# PRAGMA application_id of every run.db written (bytes 68-71 of the SQLite header, "GDRB"): a run.db is
# told from an nsys export by its first 100 bytes, without opening it as SQLite. Other SQLite files (nsys
# exports carry 0, as do run.db files written before it was set) are asked for the meta table.
APPLICATION_ID = 0x47445242

_SQL_TYPES = {"i8": int, "b": int, "f8": float, "str": str, "cat": str}
_TEXT = ("str", "cat")
_WRITE_CHUNK = 1 << 16  # rows turned into Python objects at a time (bounds memory)
_READ_CHUNK = 1 << 16  # rows per group_concat query
_ROWS_PER_INSERT = 128  # rows per multi-row INSERT statement
_SEP = "\x1f"  # unit separator: text values are group_concat'ed with it
_STAMP = "__stamp__"
# The dtype of categories that conform() produces on this pandas (str on pandas 3, object before).
_CAT_STR = pd.Series(["x"]).astype(str).astype("category").cat.categories.dtype


# ----------------------------------------------------------------------------------------------------
# Public API


def save(trace: Trace, path: str | os.PathLike, *, cache: bool = True) -> Path:
    """Write ``trace`` to the SQLite file ``path`` (or ``path/run.db`` when ``path`` is a directory).

    The file is written to ``<path>.tmp-<pid>-<random>`` and renamed into place, so ``path`` is never seen
    half-written. With ``cache`` (the default) the columnar cache ``<path>.cache.npz`` is written
    next to it; otherwise a cache left by an earlier save is removed. Returns the run.db path.
    """
    db_path = _db_path(path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    write_id = uuid.uuid4().hex
    meta_rows = _meta_rows(trace.meta) + [("schema_version", json.dumps(MODEL_VERSION)),
                                          ("write_id", json.dumps(write_id))]
    encoded = {name: _encode(name, conform(name, df)) for name, df in trace.tables()}
    with atomic_path(db_path) as tmp:
        _write_db(tmp, encoded, meta_rows)
    cpath = cache_path(db_path)
    if cache:
        try:
            _write_cache(db_path, encoded, write_id, db_path.stat())
        except OSError:  # the cache is an optimization; a stale one is rejected by its stamp anyway
            _unlink_quietly(cpath)
    else:
        _unlink_quietly(cpath)
    return db_path


def load(path: str | os.PathLike, *, use_cache: bool = True) -> Trace:
    """Read a run.db written by ``save`` (``path`` may be the directory holding ``run.db``).

    Every table comes back with exactly the model's columns and dtypes (categoricals as categoricals,
    with sorted categories); ``meta`` as saved. Reads the columnar cache when it matches the file,
    else run.db itself (and then rewrites the cache, best effort, unless ``use_cache`` is False).
    Raises InputError (a GpudoctorError) when the file is missing, not a run.db, corrupt, or written
    by a newer gpudoctor.
    """
    db_path = _db_path(path)
    _check_file(db_path)
    try:
        before = db_path.stat()
        conn = _connect_ro(db_path)
    except (OSError, sqlite3.Error) as e:
        raise InputError(db_path, f"cannot open run.db: {one_line(e)}") from None
    try:
        meta, write_id = _read_meta(conn, db_path)
        tables = _read_cache(db_path, write_id) if use_cache else None
        from_cache = tables is not None
        if tables is None:
            tables = {name: _read_table(conn, name, db_path) for name in TABLES}
    except GpudoctorError:
        raise
    except sqlite3.Error as e:
        raise InputError(db_path, f"corrupt or unreadable run.db: {one_line(e)}") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise InputError(db_path, f"unexpected content in run.db ({type(e).__name__}: {one_line(e)})") from None
    finally:
        conn.close()
    trace = Trace(meta=meta, **tables)
    if use_cache and not from_cache:
        try:
            after = db_path.stat()
            if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
                _write_cache(db_path, {n: _encode(n, df) for n, df in tables.items()}, write_id, before)
        except OSError:  # read-only directory, full disk: load still succeeded
            pass
    return trace


def is_run_db(path: str | os.PathLike) -> bool:
    """True for an SQLite file (or a directory's run.db) with a ``meta`` table holding schema_version."""
    try:
        p = Path(path)
        if p.is_dir():
            p = p / DB_NAME
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            header = f.read(100)
        if not header.startswith(SQLITE_MAGIC) or len(header) < 72:
            return False
        application_id = int.from_bytes(header[68:72], "big")
        if application_id == APPLICATION_ID:
            return True
        conn = _connect_ro(p)
        conn.text_factory = bytes  # damaged text is no reason to fail a yes/no question
        try:
            row = conn.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'").fetchone()
        finally:
            conn.close()
        return row is not None
    except (OSError, sqlite3.Error, ValueError):  # ValueError: an error message that is not UTF-8
        return False


def cache_path(path: str | os.PathLike) -> Path:
    """Where the columnar cache of the run.db at ``path`` lives: ``<path>.cache.npz``."""
    p = _db_path(path)
    return p.with_name(p.name + CACHE_SUFFIX)


# ----------------------------------------------------------------------------------------------------
# Encoding: one representation of every column, shared by the SQLite writer and the cache writer


class _Num:
    """A numeric column: its numpy array (int64, float64 or bool)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def chunk(self, lo: int, hi: int) -> list:
        return self.array[lo:hi].tolist()


class _Text:
    """A string column: codes (int64) into ``values`` (sorted distinct Python str, object array)."""

    __slots__ = ("codes", "values")

    def __init__(self, codes: np.ndarray, values: np.ndarray):
        self.codes = codes
        self.values = values

    def chunk(self, lo: int, hi: int) -> list:
        return self.values.take(self.codes[lo:hi]).tolist()


def _encode(name: str, df: pd.DataFrame) -> tuple[int, dict[str, _Num | _Text]]:
    """(rows, {column: encoded}) of a conformed frame."""
    cols: dict[str, _Num | _Text] = {}
    for col, kind, fill in TABLES[name]:
        s = df[col]
        cols[col] = _encode_text(s, fill) if kind in _TEXT else _Num(s.to_numpy())
    return len(df), cols


def _encode_text(s: pd.Series, fill: str) -> _Text:
    if isinstance(s.dtype, pd.CategoricalDtype):
        codes = s.cat.codes.to_numpy().astype(np.int64)
        cats = [str(c) for c in s.cat.categories]
        if len(codes) and codes.min() < 0:  # NaN in a categorical: stored as the fill, like run.db does
            cats.append(fill)
            codes[codes < 0] = len(cats) - 1
        # Sorted distinct values (categories may be unsorted, or collide once turned into str).
        values, inverse = np.unique(np.array(cats, dtype=object), return_inverse=True)
        codes = inverse.reshape(-1).astype(np.int64)[codes] if len(cats) else codes
    else:
        codes, uniq = pd.factorize(s.astype(object).where(s.notna(), fill).to_numpy(), sort=True)
        values = np.array([str(v) for v in uniq], dtype=object)
        codes = codes.astype(np.int64)
    if len(values):  # drop values no row uses, so the cache and run.db agree
        used = np.bincount(codes, minlength=len(values)) > 0
        if not used.all():
            codes = (np.cumsum(used) - 1)[codes]
            values = values[used]
    return _Text(codes, np.asarray(values, dtype=object))


def _text_column(kind: str, codes: np.ndarray, values: Iterable[str]) -> pd.Categorical | np.ndarray:
    """Model column from codes + sorted distinct values: a categorical, or an object array for str."""
    if kind == "cat":
        dtype = pd.CategoricalDtype(pd.Index(list(values), dtype=_CAT_STR))
        return pd.Categorical.from_codes(codes, dtype=dtype)
    return np.array(list(values), dtype=object).take(codes)


# ----------------------------------------------------------------------------------------------------
# Writing run.db


def _write_db(tmp: Path, encoded: dict[str, tuple[int, dict]], meta_rows: list[tuple[str, str]]) -> None:
    import sqlite_utils  # only for writing (its import costs ~0.1-0.3 s that load() need not pay)

    conn = sqlite3.connect(str(tmp))
    try:
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "locking_mode = EXCLUSIVE",
                       "cache_size = -65536", f"application_id = {APPLICATION_ID}"):
            conn.execute(f"PRAGMA {pragma}")
        db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
        # Schema first, with explicit types, so that empty tables exist too.
        for name, spec in TABLES.items():
            db[name].create({col: _SQL_TYPES[kind] for col, kind, _ in spec})
        db[META_TABLE].create({"key": str, "value": str}, pk="key")
        for name, (n, cols) in encoded.items():
            if n:
                _insert(conn, name, cols, n)
        # Indexes after the rows: one sort each. A small page cache and sorter threads are fastest here
        # (measured: 64 MB of cache made CREATE INDEX ~2x slower than 2 MB).
        conn.execute("PRAGMA cache_size = -2000")
        conn.execute(f"PRAGMA threads = {min(4, os.cpu_count() or 1)}")
        for name in INDEXED_TABLES:
            db[name].create_index(["rank", "start_ns"], index_name=f"{name}_rank_start_ns")
        with conn:
            conn.executemany(f"INSERT INTO {META_TABLE} (key, value) VALUES (?, ?)", meta_rows)
        conn.commit()
    finally:
        conn.close()


def _insert(conn: sqlite3.Connection, name: str, cols: dict[str, _Num | _Text], n: int) -> None:
    """Bulk insert: multi-row INSERT statements fed from per-column lists, a chunk of rows at a time."""
    m = len(cols)
    try:
        max_vars = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    except AttributeError:  # Python < 3.11
        max_vars = 999
    per = max(1, min(_ROWS_PER_INSERT, max_vars // m))
    names = ", ".join(f'"{c}"' for c in cols)
    one = "(" + ", ".join("?" * m) + ")"
    sql_one = f'INSERT INTO "{name}" ({names}) VALUES {one}'
    sql_many = f'INSERT INTO "{name}" ({names}) VALUES ' + ", ".join([one] * per)
    flat = chain.from_iterable
    with conn:
        for lo in range(0, n, _WRITE_CHUNK):
            hi = min(n, lo + _WRITE_CHUNK)
            rows = zip(*[c.chunk(lo, hi) for c in cols.values()])
            full = (hi - lo) // per
            if per > 1 and full:
                conn.executemany(sql_many, (tuple(flat(islice(rows, per))) for _ in range(full)))
            conn.executemany(sql_one, rows)  # the rest


def _meta_rows(meta: dict) -> list[tuple[str, str]]:
    rows = []
    for key, value in meta.items():
        key = str(key)
        if key in RESERVED_META_KEYS:
            raise ValueError(f"trace.meta key {key!r} is reserved by run.db")
        try:
            rows.append((key, json.dumps(value, ensure_ascii=False, default=_json_default)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"trace.meta[{key!r}] cannot be stored as JSON: {e}") from None
    return rows


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        try:
            return sorted(o)
        except TypeError:
            return list(o)
    if hasattr(o, "isoformat"):
        return o.isoformat()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


# ----------------------------------------------------------------------------------------------------
# The columnar cache


def _narrow(a: np.ndarray) -> tuple[np.ndarray, int]:
    """(a - min in the smallest unsigned type that holds the range, min); int64 as is if none does."""
    if not len(a):
        return a, 0
    lo, hi = int(a.min()), int(a.max())
    for dt in (np.uint8, np.uint16, np.uint32):
        if hi - lo <= np.iinfo(dt).max:
            return (a - np.int64(lo)).astype(dt), lo
    return a, 0


def _codes_dtype(n_values: int) -> type[np.integer]:
    for dt in (np.uint8, np.uint16, np.uint32):
        if n_values <= np.iinfo(dt).max + 1:
            return dt
    return np.int64


def _write_cache(db_path: Path, encoded: dict[str, tuple[int, dict]], write_id: str,
                 st: os.stat_result) -> None:
    arrays: dict[str, np.ndarray] = {}
    tables: dict[str, dict] = {}
    for name, (n, cols) in encoded.items():
        info: dict[str, dict] = {}
        for (col, kind, _), enc in zip(TABLES[name], cols.values()):
            key = f"{name}.{col}"
            if isinstance(enc, _Text):
                arrays[key + ".codes"] = enc.codes.astype(_codes_dtype(len(enc.values)))
                arrays[key + ".values"] = np.frombuffer(
                    json.dumps(enc.values.tolist(), ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
                info[col] = {"kind": kind}
            elif kind == "i8":
                arrays[key], base = _narrow(enc.array)
                info[col] = {"kind": kind, "base": base}
            else:
                arrays[key] = enc.array
                info[col] = {"kind": kind}
        tables[name] = {"rows": n, "columns": info}
    stamp = {"cache_format": CACHE_FORMAT, "model_version": MODEL_VERSION, "db_size": st.st_size,
             "db_mtime_ns": st.st_mtime_ns, "write_id": write_id, "tables": tables}
    arrays[_STAMP] = np.frombuffer(json.dumps(stamp).encode("utf-8"), dtype=np.uint8)
    with atomic_path(cache_path(db_path)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _read_cache(db_path: Path, write_id: str) -> dict[str, pd.DataFrame] | None:
    """The tables from the cache, or None when it is missing, stale or unreadable."""
    try:
        st = db_path.stat()
        with np.load(cache_path(db_path), allow_pickle=False) as z:
            stamp = json.loads(bytes(z[_STAMP]).decode("utf-8"))
            if (stamp.get("cache_format") != CACHE_FORMAT or stamp.get("model_version") != MODEL_VERSION
                    or stamp.get("db_size") != st.st_size or stamp.get("db_mtime_ns") != st.st_mtime_ns
                    or stamp.get("write_id") != write_id):
                return None
            out = {}
            for name, spec in TABLES.items():
                info = stamp["tables"][name]
                n = info["rows"]
                cols = {}
                for col, kind, _ in spec:
                    if info["columns"][col]["kind"] != kind:
                        return None
                    key = f"{name}.{col}"
                    if kind in _TEXT:
                        values = json.loads(bytes(z[key + ".values"]).decode("utf-8"))
                        cols[col] = _text_column(kind, z[key + ".codes"], values)
                    elif kind == "i8":
                        a = z[key].astype(np.int64)
                        base = info["columns"][col]["base"]
                        if base:
                            a += np.int64(base)
                        cols[col] = a
                    else:
                        cols[col] = z[key]
                    if len(cols[col]) != n:
                        return None
                out[name] = _frame(name, cols) if n else _empty(name)
            return out
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile, UnicodeDecodeError):
        return None


# ----------------------------------------------------------------------------------------------------
# Reading run.db


def _read_meta(conn: sqlite3.Connection, db_path: Path) -> tuple[dict, str]:
    """(trace.meta, write_id); raises InputError for a file that is not a (readable) run.db."""
    try:
        raw = dict(conn.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
    except sqlite3.DatabaseError as e:
        if "no such table" in str(e) or "no such column" in str(e):
            raise InputError(db_path, "not a gpudoctor run.db (no meta table with schema_version)") from None
        raise
    if "schema_version" not in raw:
        raise InputError(db_path, "not a gpudoctor run.db (no schema_version in its meta table)")
    try:
        version = json.loads(raw["schema_version"])
    except (TypeError, ValueError):
        version = None
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(db_path, f"invalid schema_version {raw['schema_version']!r} in its meta table")
    if version > MODEL_VERSION:
        raise InputError(db_path, f"written by a newer gpudoctor (trace model version {version}, this "
                                  f"gpudoctor reads up to {MODEL_VERSION}); upgrade gpudoctor to read it")
    meta = {}
    for key, value in raw.items():
        if key in RESERVED_META_KEYS:
            continue
        try:
            meta[key] = json.loads(value)
        except (TypeError, ValueError, RecursionError):  # edited by hand into plain text: keep the text
            meta[key] = value
    inputs = meta.get("inputs")
    if inputs is not None and not (isinstance(inputs, list) and all(isinstance(i, dict) for i in inputs)):
        raise InputError(db_path, "meta 'inputs' is not a list of objects (edited run.db?)")
    try:
        write_id = str(json.loads(raw.get("write_id") or '""'))
    except (TypeError, ValueError):
        write_id = str(raw.get("write_id"))
    return meta, write_id


def _read_table(conn: sqlite3.Connection, name: str, db_path: Path) -> pd.DataFrame:
    """One model table from run.db. Absent tables are empty, absent columns get the model's fill, NULLs
    the fill (NaN for REAL), values of the wrong type are cast (SQLite CAST rules)."""
    present = {r[1] for r in conn.execute(f'PRAGMA table_info("{name}")')}
    if not present:
        return empty_frame(name)
    spec = [(c, k, f) for c, k, f in TABLES[name] if c in present]
    ints = [(c, k, f) for c, k, f in spec if k in ("i8", "b")]
    texts = [(c, k, f) for c, k, f in spec if k in _TEXT]
    floats = [(c, k, f) for c, k, f in spec if k == "f8"]
    aggs = ["count(*)"]
    aggs += [f'CAST(group_concat(ifnull(CAST("{c}" AS INTEGER), {int(f)})) AS BLOB)' for c, _, f in ints]
    aggs += [f'group_concat(ifnull(CAST("{c}" AS TEXT), {_sql_str(f)}), char(31))' for c, _, f in texts]
    try:
        lo, hi = conn.execute(f'SELECT min(rowid), max(rowid) FROM "{name}"').fetchone()
        ranges = [] if lo is None else [(a, a + _READ_CHUNK) for a in range(lo, hi + 1, _READ_CHUNK)]
        where = "WHERE rowid >= ? AND rowid < ?"
    except sqlite3.OperationalError:  # WITHOUT ROWID (rebuilt by hand): one query
        ranges, where = [()], ""
    agg_sql = f'SELECT {", ".join(aggs)} FROM "{name}" {where}'
    float_names = ", ".join(f'"{c}"' for c, _, _ in floats)
    float_sql = f'SELECT {float_names} FROM "{name}" {where} ORDER BY rowid'
    int_parts: dict[str, list[np.ndarray]] = {c: [] for c, _, _ in ints}
    text_vals: dict[str, _TextCodes] = {c: _TextCodes() for c, _, _ in texts}
    float_parts: dict[str, list[np.ndarray]] = {c: [] for c, _, _ in floats}
    total = 0
    for params in ranges:
        row = conn.execute(agg_sql, params).fetchone()
        n = row[0]
        if not n:
            continue
        total += n
        for (c, _, _), blob in zip(ints, row[1:]):
            int_parts[c].append(_parse_ints(blob, n, db_path, name, c))
        for (c, _, f), text in zip(texts, row[1 + len(ints):]):
            vals = text.split(_SEP)
            if len(vals) != n:  # a value contains U+001F: fetch this column's chunk row by row
                q = f'SELECT ifnull(CAST("{c}" AS TEXT), {_sql_str(f)}) FROM "{name}" {where} ORDER BY rowid'
                vals = [r[0] for r in conn.execute(q, params)]
            text_vals[c].add(vals)
        if floats:
            rows = conn.execute(float_sql, params).fetchall()
            for i, (c, _, _) in enumerate(floats):
                float_parts[c].append(_floats([r[i] for r in rows]))
    cols: dict[str, object] = {}
    for c, k, _ in ints:
        a = np.concatenate(int_parts[c]) if int_parts[c] else np.empty(0, np.int64)
        cols[c] = a.astype(bool) if k == "b" else a
    for c, _, _ in floats:
        cols[c] = np.concatenate(float_parts[c]) if float_parts[c] else np.empty(0, np.float64)
    for c, k, _ in texts:
        cols[c] = text_vals.pop(c).column(k)
    if not total:
        return _empty(name)
    # Absent columns: conform fills them (it needs the length from at least one present column).
    if not cols:
        return conform(name, pd.DataFrame(index=pd.RangeIndex(total)))
    return _frame(name, cols)


class _TextCodes:
    """Codes of a text column read chunk by chunk: each chunk's strings are factorized and dropped, so
    only the distinct values and an int64 code per row stay in memory."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.parts: list[np.ndarray] = []

    def add(self, values: list[str]) -> None:
        codes, uniq = pd.factorize(np.array(values, dtype=object), sort=False)
        index = self.index
        to_global = np.array([index.setdefault(u, len(index)) for u in uniq.tolist()], dtype=np.int64)
        self.parts.append(to_global[codes] if len(to_global) else codes.astype(np.int64))

    def column(self, kind: str) -> pd.Categorical | np.ndarray:
        codes = np.concatenate(self.parts) if self.parts else np.empty(0, np.int64)
        values = np.array(list(self.index), dtype=object)
        order = np.argsort(values, kind="stable")  # sorted categories, as everywhere else
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        return _text_column(kind, rank[codes] if len(rank) else codes, values[order].tolist())


def _parse_ints(blob: bytes, n: int, db_path: Path, table: str, col: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy versions differ: a warning and a short array, or a ValueError
            arr = np.fromstring(blob, dtype=np.int64, sep=",")
    except ValueError:
        arr = None
    if arr is None or len(arr) != n:
        raise InputError(db_path, f"{table}.{col}: unreadable integer values")
    return arr


def _floats(values: list) -> np.ndarray:
    try:
        return np.array(values, dtype=np.float64)  # None (NULL) -> NaN
    except (TypeError, ValueError):  # text in a REAL column (edited by hand): what does not parse is NaN
        return pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(np.float64)


# ----------------------------------------------------------------------------------------------------
# Helpers


_EMPTY: dict[str, pd.DataFrame] = {}


def _empty(name: str) -> pd.DataFrame:
    if name not in _EMPTY:
        _EMPTY[name] = empty_frame(name)
    return _EMPTY[name].copy()


def _frame(name: str, cols: dict) -> pd.DataFrame:
    """The table from columns that already have the model's dtypes (int64 / float64 / bool arrays,
    categoricals made by _text_column), without copying them; through conform() when a column is
    absent or is a plain-string column (those need conform's str conversion; they are small tables)."""
    spec = TABLES[name]
    if any(kind == "str" for _, kind, _ in spec) or len(cols) != len(spec):
        return conform(name, cols)
    return pd.DataFrame(cols, columns=[c for c, _, _ in spec], copy=False)


def _db_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / DB_NAME if p.is_dir() else p


def _connect_ro(p: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
    try:
        conn.execute(f"PRAGMA mmap_size = {1 << 31}")
    except sqlite3.Error:
        pass
    return conn


def _check_file(p: Path) -> None:
    if not p.exists():
        raise InputError(p, "no such file")
    if p.is_dir():
        raise InputError(p, "is a directory, expected a gpudoctor run.db")
    if p.stat().st_size == 0:
        raise InputError(p, "empty file")
    with open(p, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head != SQLITE_MAGIC:
        raise InputError(p, "not an SQLite file (expected a gpudoctor run.db)")


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass
