"""Nsight Compute CSV exports -> ``kernel_metrics`` (+ ``devices``, ``ranks``).

Two layouts of ``ncu --csv`` are read:

* ``--page raw``: one row per profiled launch, one column per metric, and a second row holding each
  column's unit (``Mbyte``, ``us``, ``Ghz``, ``%``, ...). Values are scaled to bytes, nanoseconds, Hz
  and 0..1 fractions with that row.
* ``--page details``: one row per (launch, metric) with ``Section Name``, ``Metric Name``,
  ``Metric Unit`` and ``Metric Value`` columns; rows are pivoted per ``ID`` (rule rows are skipped).
  Both the section metric names ("Duration", "DRAM Throughput", ...) and raw metric names (what
  ``--metrics`` adds to the page) are understood.

Lines before the CSV header (application stdout, ``==PROF==`` / ``==WARNING==`` lines) and ``==X==``
lines anywhere are skipped. Numbers may carry thousands separators ("1,980,000"); ``n/a`` and empty
cells are NaN.

What the metric columns become:

* ``flops_fp32 = fadd + fmul + 2*ffma`` from ``smsp__sass_thread_inst_executed_op_{fadd,fmul,ffma}_pred_on.sum``
  (``sm__`` as fallback); the same for ``d*`` (fp64) and ``h*`` (fp16). The ``h*`` counters count
  *thread instructions*, not half lanes. Measured on an H100 (ncu 2025.3.1): 32 threads x 1000
  ``__hfma2`` (SASS ``HFMA2.MMA``, two lanes) read ``hfma_pred_on.sum`` = 32,000, the same as 1000 scalar
  ``__hfma`` (``HFMA2 .H0_H0``, one lane); a ``__hadd2`` compiles to ``HFMA2.MMA a, 1, b`` and is counted
  as hfma. So ``flops_fp16 = hadd + hmul + 2*hfma`` (Nsight Compute's own half roofline formula) is
  exact for scalar half code and 2x low for packed half2 FMAs; the counters cannot tell them apart.
  Missing counters count as 0 when at least one of the three is present, else NaN.
* ``flops_tensor`` = sum of ``sm__ops_path_tensor_src_{bf16_dst_fp32, fp16[_dst_fp32|_dst_fp16],
  tf32_dst_fp32, fp8, fp64}.sum``. The query-metrics text calls them "# of math ops executed in
  Tensor path": one multiply-add counts 2, i.e. they are FLOPs (the committed bf16 4096^3 GEMM reads
  exactly 137,438,953,472 = 2*4096^3). Integer tensor ops (int8/int4/int1) are not FLOPs and are left
  out. Tensor cores execute padded tiles, so a skinny product counts the padded work (the 1x4096 GEMV
  fixture runs on an 8-row tile: 8x its useful FLOPs).
* ``tensor_pipe_fraction`` = ``sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active``
  / 100 (on Hopper it counts HGMMA too); the ``gmma`` variant only when ``hmma`` is absent.
* ``dram_read_bytes``/``dram_write_bytes`` from ``dram__bytes_{read,write}.sum``. An export that only
  has ``dram__bytes.sum`` (no read/write split) leaves both NaN in the model; :func:`read_metrics`
  keeps the total in an extra ``dram_bytes`` column the roofline uses.

:func:`read_metrics` returns the same rows with extra columns the model has no room for
(``flops_tensor_<precision>``, ``dram_bytes``); :func:`read` conforms to the trace model.

Ranks: every process (``Process ID``) is one rank, numbered in the order their first launch was
profiled, starting at ``rank`` (0 when not given).
"""

from __future__ import annotations

import csv
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from gpudoctor.collect.locate import find_ncu
from gpudoctor.errors import InputError
from gpudoctor.model.schema import TABLES
from gpudoctor.model.trace import Trace
from gpudoctor.readers import read_bytes

FORMAT = "ncu_csv"
SOURCE = "ncu"

_TOOL_LINE = re.compile(r"^==[A-Z]+==")
_HEADER_LINE = re.compile(r'^\ufeff?\s*"?ID"?\s*,')
_TRIPLE = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)")
# last quoted range of the NVTX push/pop cell: "Domain:Name:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg"
_NVTX_LAST = re.compile(r'"(?P<domain>[^":]*):(?P<name>[^"]*?)(?::[^":]*){6}"\s*$')

# ---------------------------------------------------------------------------------------------- units
_PREFIX = {"": 1.0, "K": 1e3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_TIME = {"ns": 1e-9, "nsecond": 1e-9, "nanosecond": 1e-9, "us": 1e-6, "usecond": 1e-6, "microsecond": 1e-6,
         "ms": 1e-3, "msecond": 1e-3, "millisecond": 1e-3, "s": 1.0, "sec": 1.0, "second": 1.0}
_BASE_WORDS = ("byte", "bit", "inst", "cycle", "warp", "thread", "flop", "op", "sector", "request",
               "block", "register", "pass", "cluster", "wavefront", "transaction")
_PREFIXED = re.compile(r"^([KMGTPk]?)(" + "|".join(_BASE_WORDS) + r")s?$")


def _token_scale(tok: str) -> tuple[float, str]:
    """(factor to the SI base, dimension) of one unit token ("Mbyte" -> (1e6, "byte"))."""
    tok = tok.strip()
    if tok == "":
        return 1.0, ""
    if tok == "%":
        return 0.01, "fraction"
    if tok in _TIME:
        return _TIME[tok], "second"
    low = tok.lower()
    if low.endswith("hz"):
        return _PREFIX.get(tok[:-2].upper() if tok[:-2] else "", 1.0), "hz"
    m = _PREFIXED.match(tok)
    if m:
        return _PREFIX[m.group(1)], m.group(2)
    return 1.0, tok


def unit_scale(unit: str) -> tuple[float, str]:
    """Factor that turns a value in ``unit`` into SI base units, and the base dimension.

    ``"Mbyte"`` -> (1e6, "byte"); ``"us"`` -> (1e-6, "second"); ``"Ghz"`` -> (1e9, "hz");
    ``"cycle/nsecond"`` -> (1e9, "hz"); ``"%"`` -> (0.01, "fraction"); ``"Kbyte/block"`` -> (1e3, "byte/block").
    """
    unit = (unit or "").strip()
    if "/" in unit:
        num, den = unit.split("/", 1)
        fn, dn = _token_scale(num)
        fd, dd = _token_scale(den)
        if dn == "cycle" and dd == "second":
            return fn / fd, "hz"
        return fn / fd, f"{dn}/{dd}"
    return _token_scale(unit)


def to_number(s: pd.Series) -> pd.Series:
    """Strings with thousands separators / ``n/a`` / blanks -> float64 (NaN where not a number)."""
    s = pd.Series(s, copy=False)
    if s.dtype.kind in "fiu":
        return s.astype("float64")
    txt = s.astype("string").str.strip().str.replace(",", "", regex=False)
    out = pd.to_numeric(txt, errors="coerce").astype("float64")
    return out.where(np.isfinite(out.to_numpy()))  # inf / 1e400: not a measurement either


_MAX_ID = 2 ** 53  # beyond this a float no longer holds every integer


def _id_column(path: Path, df: pd.DataFrame, col: str, fill: int | None) -> pd.Series:
    """An integer column (launch ID, process, device): a one-line error for a value that is not a
    non-negative integer below 2**53; NaN allowed only where ``fill`` is given."""
    if col not in df.columns:
        return pd.Series(np.full(len(df), -1 if fill is None else fill, dtype=np.int64), index=df.index)
    v = to_number(df[col])
    a = v.to_numpy()
    bad = ~((a >= 0) & (a < _MAX_ID) & (a == np.floor(a)))
    if fill is not None:
        bad &= ~np.isnan(a)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(path, f"kernel row {i + 1} has an invalid {col} {str(df[col].iloc[i])[:40]!r} "
                               "(expected a non-negative integer)")
    return v.fillna(fill if fill is not None else -1).astype("int64")


# ------------------------------------------------------------------------------------- CSV loading
def _load_text(path: Path) -> str:
    data = read_bytes(path, "an Nsight Compute CSV export")
    if not data.strip():
        raise InputError(path, "empty file")
    if b"\x00" in data[:4096]:
        raise InputError(path, "binary file, expected an Nsight Compute CSV export (ncu --csv --page raw)")
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM (spreadsheet tools add one)
        data = data[3:]
    return data.decode("utf-8", errors="replace")


def _parse_csv(path: Path, text: str) -> tuple[list[str], list[list[str]], list[int], str]:
    """-> (header, rows after the header, 1-based file line of each row, page)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if _HEADER_LINE.match(ln)), None)
    if start is None:
        if any(_TOOL_LINE.match(ln) for ln in lines[:200]) and not any('","' in ln for ln in lines):
            raise InputError(path, "no profiled kernels: only ncu messages, no CSV header "
                                   "(did ncu profile any launch? check --nvtx-include / -k / --launch-skip)")
        raise InputError(path, 'not an Nsight Compute CSV export: no header row with "ID" and "Kernel Name" columns '
                               "(expected ncu --csv --page raw or --page details)")
    kept = [(i + 1, ln) for i, ln in enumerate(lines[start:], start) if not _TOOL_LINE.match(ln)]
    reader = csv.reader([ln for _, ln in kept])
    rows: list[list[str]] = []
    line_of: list[int] = []
    end = 0
    try:
        for row in reader:  # the csv module does the work; this only records where each row started
            if row:
                rows.append(row)
                line_of.append(end + 1)
            end = reader.line_num
    except csv.Error as e:
        raise InputError(path, f"malformed CSV near line {kept[min(reader.line_num, len(kept)) - 1][0]}: {e}") from None
    header = [h.strip().lstrip("\ufeff") for h in rows[0]]
    if "ID" not in header or "Kernel Name" not in header:
        raise InputError(path, 'not an Nsight Compute CSV export: no "ID" and "Kernel Name" columns')
    page = "details" if {"Metric Name", "Metric Value"} <= set(header) else "raw"
    n = len(header)
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    file_line = [kept[k - 1][0] for k in line_of]
    if page == "raw":
        bad = np.flatnonzero(lens != n)
    else:  # metric rows stop after "Metric Value" (rule columns absent); rule rows are full
        bad = np.flatnonzero((lens < header.index("Metric Value") + 1) | (lens > n))
    last_line = lines[-1]
    # ncu quotes every field: a last line without a line end that is not closed by a quote (or has an odd
    # number of quotes) was cut inside a field, even when its field count looks complete
    cut_mid_field = not last_line.endswith(("\n", "\r")) and (
        not last_line.rstrip().endswith('"') or last_line.count('"') % 2 == 1)
    if len(bad):
        i = int(bad[0])
        what = "truncated CSV" if i == len(rows) - 1 else "malformed CSV"
        raise InputError(path, f"{what}: row {file_line[i]} has {int(lens[i])} fields, header has {n}")
    if cut_mid_field and len(rows) > 1 and not _TOOL_LINE.match(last_line):
        raise InputError(path, f"truncated CSV: row {file_line[-1]} ends in the middle of a field "
                               f"(no line end at the end of the file)")
    return header, rows[1:], file_line[1:], page


# --------------------------------------------------------------------------------- metric sources
class _RawMetrics:
    """Metric columns of a raw page, scaled with the units row."""

    def __init__(self, df: pd.DataFrame, units: dict[str, str]):
        self.df, self.units = df, units

    def has(self, name: str) -> bool:
        return name in self.df.columns

    def get(self, name: str, default_unit: str = "") -> pd.Series | None:
        if name not in self.df.columns:
            return None
        unit = self.units.get(name, "") or default_unit
        factor, _ = unit_scale(unit)
        return to_number(self.df[name]) * factor

    def text(self, name: str) -> pd.Series | None:
        return self.df[name] if name in self.df.columns else None


class _DetailsMetrics:
    """Details page pivoted per ID: columns "<Metric Name>" and "<Metric Name>|<dimension>"."""

    def __init__(self, wide: pd.DataFrame, by_dim: pd.DataFrame):
        self.wide, self.by_dim = wide, by_dim

    def has(self, name: str) -> bool:
        return name in self.wide.columns

    def get(self, name: str, default_unit: str = "", dim: str | None = None) -> pd.Series | None:
        if dim is not None:
            key = f"{name}|{dim}"
            return self.by_dim[key] if key in self.by_dim.columns else None
        return self.wide[name] if name in self.wide.columns else None

    def text(self, name: str) -> pd.Series | None:
        return None


def _first_present(src, names, default_unit=""):
    for n in names:
        s = src.get(n, default_unit)
        if s is not None:
            return s
    return None


def _sum_available(parts: list[pd.Series | None], n: int, index) -> pd.Series:
    """Sum of the present series (NaN cells count 0 if any part has a number there), NaN if none."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return pd.Series(np.full(n, np.nan), index=index)
    return pd.concat(parts, axis=1).sum(axis=1, min_count=1)


def _simt_flops(src, letter: str, n: int, index) -> pd.Series:
    def inst(op):
        return _first_present(src, [f"{unit}__sass_thread_inst_executed_op_{letter}{op}_pred_on.sum"
                                    for unit in ("smsp", "sm")])
    add, mul, fma = inst("add"), inst("mul"), inst("fma")
    return _sum_available([add, mul, None if fma is None else 2.0 * fma], n, index)


def _tensor_flops(src, n: int, index) -> dict[str, pd.Series]:
    def m(name):
        return _first_present(src, [f"sm__ops_path_tensor_src_{name}.sum", f"smsp__ops_path_tensor_src_{name}.sum"])
    fp16 = m("fp16")  # Hopper+ name; older chips split by destination type
    if fp16 is None:
        a, b = m("fp16_dst_fp32"), m("fp16_dst_fp16")
        fp16 = None if a is None and b is None else _sum_available([a, b], n, index)
    out = {"bf16": m("bf16_dst_fp32"), "fp16": fp16, "tf32": m("tf32_dst_fp32"), "fp8": m("fp8"), "fp64": m("fp64")}
    return {k: v for k, v in out.items() if v is not None}


def _metrics_from(src, n: int, index) -> dict[str, pd.Series]:
    nan = pd.Series(np.full(n, np.nan), index=index)

    def pick(names, default_unit="", details=None):
        s = _first_present(src, names, default_unit)
        if s is None and details is not None and isinstance(src, _DetailsMetrics):
            s = src.get(details[0], dim=details[1])
        return nan if s is None else s

    out: dict[str, pd.Series] = {}
    dur = pick(["gpu__time_duration.sum", "gpu__time_duration.avg", "gpu__time_duration"], "ns",
               details=("Duration", "second"))
    out["duration_ns"] = (dur * 1e9).round(3)  # 101.47 us * 1e-6 * 1e9 would be 101469.99999999999
    out["dram_read_bytes"] = pick(["dram__bytes_read.sum"], "byte")
    out["dram_write_bytes"] = pick(["dram__bytes_write.sum"], "byte")
    out["dram_bytes"] = pick(["dram__bytes.sum"], "byte")
    out["flops_fp64"] = _simt_flops(src, "d", n, index)
    out["flops_fp32"] = _simt_flops(src, "f", n, index)
    out["flops_fp16"] = _simt_flops(src, "h", n, index)
    tensor = _tensor_flops(src, n, index)
    out["flops_tensor"] = _sum_available(list(tensor.values()), n, index)
    for prec in ("bf16", "fp16", "tf32", "fp8", "fp64"):
        out[f"flops_tensor_{prec}"] = tensor.get(prec, nan)
    out["tensor_pipe_fraction"] = pick(
        ["sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
         "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"], "%")
    out["sm_throughput_fraction"] = pick(["sm__throughput.avg.pct_of_peak_sustained_elapsed"], "%",
                                         details=("Compute (SM) Throughput", "fraction"))
    out["memory_throughput_fraction"] = pick(["gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"],
                                             "%", details=("Memory Throughput", "fraction"))
    out["dram_throughput_fraction"] = pick(["dram__throughput.avg.pct_of_peak_sustained_elapsed"], "%",
                                           details=("DRAM Throughput", "fraction"))
    out["achieved_occupancy_fraction"] = pick(["sm__warps_active.avg.pct_of_peak_sustained_active"], "%",
                                              details=("Achieved Occupancy", "fraction"))
    out["sm_clock_hz"] = pick(["sm__cycles_elapsed.avg.per_second"], "cycle/second",
                              details=("SM Frequency", "hz"))
    return out


# ------------------------------------------------------------------------------------------ pages
_IDENTITY = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Device", "CC",
             "Block Size", "Grid Size"]


def _frame(header: list[str], rows: list[list[str]]) -> pd.DataFrame:
    n = len(header)
    # details metric rows are shorter than the header: pad them
    padded = rows if all(len(r) == n for r in rows) else [r + [""] * (n - len(r)) for r in rows]
    cols = list(dict.fromkeys(header))  # duplicate headers (never seen) keep the first
    idx = [header.index(c) for c in cols]
    arr = np.array(padded, dtype=object)
    if arr.ndim != 2:
        arr = arr.reshape(len(rows), n)
    return pd.DataFrame(arr[:, idx], columns=cols)


def _raw_page(path: Path, header, rows, lines):
    units_row = rows[0] if rows else None
    id_col = header.index("ID")
    if units_row is None or units_row[id_col].strip() != "":
        line = lines[0] if lines else 2
        raise InputError(path, f"missing units row: line {line} should be the units row (blank ID) of "
                               "ncu --csv --page raw")
    data = rows[1:]
    if not data:
        raise InputError(path, "no kernel rows: the export has a header and units row but no profiled launch")
    df = _frame(header, data)
    units = {h: u.strip() for h, u in zip(header, units_row)}
    return df, _RawMetrics(df, units)


def _details_page(path: Path, header, rows):
    if not rows:
        raise InputError(path, "no kernel rows: the details export has a header but no profiled launch")
    missing = [c for c in ("ID", "Metric Name", "Metric Unit", "Metric Value") if c not in header]
    if missing:
        raise InputError(path, f"details page without the column(s) {', '.join(missing)}")
    df = _frame(header, rows)
    df = df[df["Metric Name"].astype("string").str.strip().fillna("") != ""]
    if df.empty:
        raise InputError(path, "no metric rows in the details page (only rule results)")
    ids = to_number(df["ID"])
    if ids.isna().any():
        raise InputError(path, "details page row without a numeric ID")
    df = df.assign(_id=ids.astype("int64"))
    units = df["Metric Unit"].astype("string").fillna("").str.strip()
    uniq = pd.unique(units)
    scale = {u: unit_scale(u) for u in uniq}
    factor = units.map({u: f for u, (f, _) in scale.items()}).astype("float64")
    dim = units.map({u: d for u, (_, d) in scale.items()})
    value = to_number(df["Metric Value"]) * factor.to_numpy()
    name = df["Metric Name"].astype("string").str.strip()
    long = pd.DataFrame({"_id": df["_id"].to_numpy(), "name": name.to_numpy(), "dim": dim.to_numpy(),
                         "value": value.to_numpy()})
    wide = long.pivot_table(index="_id", columns="name", values="value", aggfunc="first", dropna=False)
    long["key"] = long["name"] + "|" + long["dim"].astype(str)
    by_dim = long.pivot_table(index="_id", columns="key", values="value", aggfunc="first", dropna=False)
    ident = df.drop_duplicates("_id").set_index("_id")
    ident = ident[[c for c in _IDENTITY if c in ident.columns]]
    order = ident.index
    wide = wide.reindex(order).reset_index(drop=True)
    by_dim = by_dim.reindex(order).reset_index(drop=True)
    return ident.reset_index(drop=True), _DetailsMetrics(wide, by_dim)


def _ints3(s: pd.Series | None, n: int) -> np.ndarray:
    out = np.full((n, 3), -1, dtype=np.int64)
    if s is None:
        return out
    ext = s.astype("string").str.extract(_TRIPLE)
    vals = ext.apply(pd.to_numeric, errors="coerce").to_numpy(dtype="float64")
    ok = np.isfinite(vals) & (np.abs(vals) < 2 ** 31)  # out of range: unknown (-1), never a wrapped int
    out[ok] = vals[ok].astype(np.int64)
    return out


def _nvtx_innermost(df: pd.DataFrame) -> pd.Series:
    n = len(df)
    res = pd.Series([""] * n, index=df.index, dtype=object)
    pushpop = [c for c in df.columns if "push/pop_range" in c.lower()]
    startstop = [c for c in df.columns if "start/stop_range" in c.lower()]
    for col in pushpop + startstop:  # push/pop first; start/stop ranges only where no push/pop range
        m = df[col].astype("string").fillna("").str.extract(_NVTX_LAST)
        name = m["name"].astype(object).where(m["name"].notna(), "")
        res = res.where(res != "", name)
    return res


def read_metrics(path: str | Path, rank: int | None = None) -> tuple[pd.DataFrame, dict]:
    """Parse an ncu CSV export: (wide per-launch frame, info).

    The frame has every ``kernel_metrics`` column plus ``flops_tensor_{bf16,fp16,tf32,fp8,fp64}``,
    ``dram_bytes`` (``dram__bytes.sum`` when exported) and the device columns used for ``devices``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.suffix == ".ncu-rep":
        return _read_rep(path, rank)
    text = _load_text(path)
    header, rows, lines, page = _parse_csv(path, text)
    if page == "raw":
        df, src = _raw_page(path, header, rows, lines)
    else:
        df, src = _details_page(path, header, rows)
    n = len(df)
    idx = df.index
    launch = _id_column(path, df, "ID", None)
    pid = _id_column(path, df, "Process ID", -1)
    dev = _id_column(path, df, "Device", 0)

    # processes -> ranks in the order of their first profiled launch
    first = pd.DataFrame({"pid": pid, "id": launch}).groupby("pid", sort=False)["id"].min().sort_values()
    base = 0 if rank is None else int(rank)
    rank_of = {p: base + i for i, p in enumerate(first.index.tolist())}
    ranks = pid.map(rank_of).astype("int64")

    grid = _ints3(df.get("Grid Size"), n)
    block = _ints3(df.get("Block Size"), n)
    if isinstance(src, _RawMetrics):  # launch__ metrics where the size columns are missing
        for arr, pre in ((grid, "launch__grid_dim_"), (block, "launch__block_dim_")):
            for j, ax in enumerate("xyz"):
                s = src.get(pre + ax)
                if s is not None:
                    fill = (arr[:, j] < 0) & s.notna().to_numpy() & (s.abs() < 2 ** 31).to_numpy()
                    arr[fill, j] = s.to_numpy()[fill].astype(np.int64)

    out = pd.DataFrame({
        "rank": ranks.to_numpy(), "device_id": dev.to_numpy(), "launch_id": launch.astype("int64").to_numpy(),
        "pid": pid.to_numpy(), "name": df["Kernel Name"].astype(object).to_numpy(),
        "nvtx_range": _nvtx_innermost(df).to_numpy(),
        "grid_x": grid[:, 0], "grid_y": grid[:, 1], "grid_z": grid[:, 2],
        "block_x": block[:, 0], "block_y": block[:, 1], "block_z": block[:, 2],
    })
    for k, v in _metrics_from(src, n, idx).items():
        out[k] = v.to_numpy(dtype="float64")
    out["kernel_row"] = -1

    # per-launch device/host facts (for devices and ranks)
    for col, key in (("Host Name", "_host"), ("Process Name", "_process"), ("CC", "_cc")):
        out[key] = df[col].astype(object).fillna("").to_numpy() if col in df.columns else ""
    if isinstance(src, _RawMetrics):
        _device_columns(out, src)
    out = out.sort_values(["rank", "launch_id"], kind="stable").reset_index(drop=True)
    info = {"page": page, "path": str(path),
            "metric_columns": sorted(c for c in df.columns if "__" in c) if page == "raw" else
            sorted(src.wide.columns.astype(str).tolist())}
    return out, info


def _device_columns(out: pd.DataFrame, src: _RawMetrics) -> None:
    def attr(name, default_unit=""):
        s = src.get(f"device__attribute_{name}", default_unit)
        return None if s is None else s.to_numpy()

    name = src.text("device__attribute_display_name")
    out["_dev_name"] = name.astype(object).fillna("").to_numpy() if name is not None else ""
    sm = attr("multiprocessor_count")
    if sm is None:
        sm = None if src.get("launch__sm_count") is None else src.get("launch__sm_count").to_numpy()
    out["_dev_sm_count"] = sm if sm is not None else np.nan
    mem = attr("total_memory", "byte")
    out["_dev_memory_bytes"] = mem if mem is not None else np.nan
    # clocks are printed in kHz with a blank unit; a printed unit (khz/Mhz/...) wins
    mclk = attr("memory_clock_rate", "khz")
    bus = attr("global_memory_bus_width")
    # DDR: two transfers per memory clock (the CUDA bandwidthTest formula; 3.35 TB/s on H100 SXM)
    out["_dev_bw"] = 2.0 * mclk * bus / 8.0 if mclk is not None and bus is not None else np.nan
    clk = attr("max_gpu_frequency_khz", "khz")
    if clk is None:
        clk = attr("clock_rate", "khz")
    out["_dev_clock"] = clk if clk is not None else np.nan
    major, minor = attr("compute_capability_major"), attr("compute_capability_minor")
    if major is not None and minor is not None:
        ok = ~(np.isnan(major) | np.isnan(minor))
        cc = np.where(ok, pd.Series(np.nan_to_num(major)).astype(int).astype(str).to_numpy() + "." +
                      pd.Series(np.nan_to_num(minor)).astype(int).astype(str).to_numpy(), "")
        out["_cc"] = np.where(cc != "", cc, out["_cc"].to_numpy())


_KM_COLS = [c for c, _, _ in TABLES["kernel_metrics"]]


def read(path: str | Path, rank: int | None = None) -> Trace:
    """Read an ncu CSV export (``--page raw`` or ``--page details``) or an ``.ncu-rep`` into a Trace."""
    path = Path(path)
    wide, info = read_metrics(path, rank)
    trace = Trace()
    trace.set("kernel_metrics", wide[_KM_COLS])

    firsts = wide.drop_duplicates(["rank", "device_id"])
    dev = {"rank": firsts["rank"], "device_id": firsts["device_id"], "compute_capability": firsts["_cc"]}
    if "_dev_name" in wide.columns:
        dev.update({"name": firsts["_dev_name"], "sm_count": firsts["_dev_sm_count"],
                    "memory_bytes": firsts["_dev_memory_bytes"], "memory_bandwidth_bytes_per_s": firsts["_dev_bw"],
                    "sm_clock_hz": firsts["_dev_clock"]})
    trace.set("devices", pd.DataFrame(dev).reset_index(drop=True))

    procs = wide.drop_duplicates("rank")
    trace.set("ranks", pd.DataFrame({
        "rank": procs["rank"], "pid": procs["pid"], "hostname": procs["_host"],
        "source_file": str(path), "source_format": FORMAT, "clock_offset_ns": 0, "clock_source": "",
    }).reset_index(drop=True))

    present = {"dram_read_write": bool(wide["dram_read_bytes"].notna().any() or wide["dram_write_bytes"].notna().any()),
               "dram_total_only": bool(wide["dram_bytes"].notna().any()
                                       and wide["dram_read_bytes"].isna().all())}
    trace.meta = {
        "inputs": [{"path": str(path), "format": FORMAT, "rank": int(r)} for r in sorted(wide["rank"].unique())],
        "ncu": {"page": info["page"], "kernels": int(len(wide)),
                "processes": {int(p): int(r) for p, r in zip(procs["pid"], procs["rank"])},
                "dram_bytes_total_only": present["dram_total_only"]},
    }
    return trace


# ------------------------------------------------------------------------------------------ .ncu-rep
def _read_rep(path: Path, rank: int | None):
    ncu = find_ncu()
    if not ncu:
        raise InputError(path, "reading .ncu-rep needs Nsight Compute's ncu on PATH; export it with: "
                               "ncu --import FILE --csv --page raw > FILE.csv")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / (path.stem + ".raw.csv")
        try:
            with open(out, "wb") as f:
                p = subprocess.run([ncu, "--import", str(path), "--csv", "--page", "raw"], stdout=f,
                                   stderr=subprocess.PIPE, timeout=600)
        except (subprocess.TimeoutExpired, OSError) as e:
            raise InputError(path, f"ncu --import failed: {str(e).splitlines()[0]}") from None
        if p.returncode != 0:
            err = (p.stderr or b"").decode(errors="replace").strip().splitlines()
            raise InputError(path, f"ncu --import failed (exit {p.returncode}): {err[-1] if err else 'no message'}")
        try:
            wide, info = read_metrics(out, rank)
        except InputError as e:
            raise InputError(path, f"exported CSV: {e.problem}") from None
    info["path"] = str(path)
    return wide, info


__all__ = ["read", "read_metrics", "unit_scale", "to_number", "FORMAT"]
