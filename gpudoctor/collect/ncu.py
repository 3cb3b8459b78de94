"""Run Nsight Compute for the metrics the analyzers use, and join its launches to a timeline.

``build_ncu_command`` never locks clocks (``--clock-control none``): the numbers should describe the
GPU as the workload runs it, and the timeline (nsys / torch.profiler) was recorded at free clocks too.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from gpudoctor.collect.locate import find_ncu
from gpudoctor.errors import GpudoctorError
from gpudoctor.readers.limits import gunzip

# The metric list of scripts/record-fixtures.sh (what the committed fixtures hold), in that order.
RECORDED_METRICS: tuple[str, ...] = (
    "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
    "smsp__sass_thread_inst_executed_op_fadd_pred_on.sum", "smsp__sass_thread_inst_executed_op_fmul_pred_on.sum",
    "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum", "smsp__sass_thread_inst_executed_op_dadd_pred_on.sum",
    "smsp__sass_thread_inst_executed_op_dmul_pred_on.sum", "smsp__sass_thread_inst_executed_op_dfma_pred_on.sum",
    "smsp__sass_thread_inst_executed_op_hadd_pred_on.sum", "smsp__sass_thread_inst_executed_op_hmul_pred_on.sum",
    "smsp__sass_thread_inst_executed_op_hfma_pred_on.sum",
    "sm__ops_path_tensor_src_bf16_dst_fp32.sum", "sm__ops_path_tensor_src_fp16_dst_fp32.sum",
    "sm__ops_path_tensor_src_fp16_dst_fp16.sum",
    "sm__ops_path_tensor_src_tf32_dst_fp32.sum", "sm__ops_path_tensor_src_fp8.sum", "sm__ops_path_tensor_src_int8.sum",
    "sm__ops_path_tensor_src_fp64.sum",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_tensor_op_hmma.sum", "sm__inst_executed_pipe_tensor_op_gmma.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed", "sm__warps_active.avg.pct_of_peak_sustained_active",
    "sm__cycles_elapsed.avg.per_second", "dram__cycles_elapsed.avg.per_second",
)
# GH100 has no fp16_dst_* tensor counters (fixtures/ncu/ncu_missing.txt) but has src_fp16 (all destinations):
# without it an fp16 tensor-core GEMM on Hopper would read as 0 tensor FLOPs. The reader never adds it to the
# split counters of older chips (it prefers src_fp16 when present).
ANALYZER_METRICS: tuple[str, ...] = RECORDED_METRICS + ("sm__ops_path_tensor_src_fp16.sum",)

DEFAULT_LAUNCH_COUNT = 200
_METRIC_NAME = re.compile(r"^(?:[A-Za-z0-9_]+\.)*([a-z0-9]+__[A-Za-z0-9_]+)$")


def parse_query_metrics(text: str) -> set[str]:
    """Metric base names (no ``.sum``/``.avg`` suffix) listed by ``ncu --query-metrics``.

    Names in the table may carry a ``UNIT.Config.`` prefix (``FBSP.TriageCompute.dramc__cycles_elapsed``);
    the prefix is dropped. Continuation lines (indented description text), rule lines, the header and
    ``==PROF==`` notes are skipped.
    """
    names: set[str] = set()
    for line in text.splitlines():
        if not line or line[0].isspace() or line.startswith(("==", "-", "Chip ", "Metric Name", "Device ")):
            continue
        m = _METRIC_NAME.match(line.split(None, 1)[0])
        if m:
            names.add(m.group(1))
    return names


def available_metrics(ncu: str | os.PathLike, chip: str | None = None, timeout: float = 120) -> set[str]:
    """Metric base names ``ncu --query-metrics --chip CHIP`` lists (the local GPU's chip when ``chip`` is None).

    ``ncu`` may also be a saved output of that command (text or .gz), which is then parsed instead.
    """
    p = Path(ncu)
    if p.is_file() and (p.suffix in (".gz", ".txt") or not os.access(p, os.X_OK)):
        try:
            data = p.read_bytes()
        except OSError as e:
            raise GpudoctorError(f"{p}: cannot read: {e.strerror or e}") from None
        if data[:2] == b"\x1f\x8b":
            data = gunzip(data, p)  # within the decompression limits
        return parse_query_metrics(data.decode("utf-8", errors="replace"))
    cmd = [str(ncu), "--query-metrics"] + (["--chip", chip] if chip else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GpudoctorError(f"{ncu} --query-metrics failed: {str(e).splitlines()[0]}") from None
    names = parse_query_metrics(r.stdout)
    if r.returncode != 0 or not names:
        tail = (r.stderr or r.stdout).strip().splitlines()
        raise GpudoctorError(f"{ncu} --query-metrics failed (exit {r.returncode}): {tail[-1] if tail else 'no output'}")
    return names


def unavailable_metrics(metrics: Iterable[str], available: set[str]) -> list[str]:
    """The requested metrics (with suffixes) whose base name is not in ``available``, in request order."""
    return [m for m in metrics if m.split(".", 1)[0] not in available]


def build_ncu_command(cmd: list[str] | str, out_base: str | Path, nvtx_range: str | None = None, kernel_regex: str | None = None,
                      launch_skip: int = 0, launch_count: int | None = None,
                      metrics: Iterable[str] = ANALYZER_METRICS,
                      ncu: str | None = None) -> list[str]:
    """The ncu command line that profiles ``cmd`` (list or shell-quoted string) into ``out_base``.ncu-rep.

    * always ``--clock-control none`` (profile at the clocks the application really runs at);
    * ``nvtx_range``: only launches inside that NVTX push/pop range (``--nvtx --nvtx-include "NAME/"``);
    * ``kernel_regex``: only kernels whose name matches (``-k regex:...``);
    * ``launch_count``: at most that many launches; 200 by default when neither a range nor a regex
      narrows the selection (an unfiltered run would otherwise replay every launch of the program).
    """
    argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    if not argv:
        raise GpudoctorError("nothing to profile: empty command")
    out = [ncu or find_ncu() or "ncu", "--clock-control", "none", "--target-processes", "all",
           "-f", "-o", str(out_base)]
    if metrics:
        out += ["--metrics", ",".join(metrics)]
    if nvtx_range:
        out += ["--nvtx", "--nvtx-include", nvtx_range if nvtx_range.endswith("/") else f"{nvtx_range}/"]
    if kernel_regex:
        out += ["-k", f"regex:{kernel_regex}"]
    if launch_skip:
        out += ["--launch-skip", str(int(launch_skip))]
    if launch_count is None and not nvtx_range and not kernel_regex:
        launch_count = DEFAULT_LAUNCH_COUNT
    if launch_count is not None:
        out += ["--launch-count", str(int(launch_count))]
    return out + argv


def run_ncu(cmd: list[str] | str, out_base: str | Path, nvtx_range: str | None = None, kernel_regex: str | None = None, launch_skip: int = 0,
            launch_count: int | None = None, metrics: Iterable[str] = ANALYZER_METRICS, ncu: str | None = None,
            chip: str | None = None, timeout: float | None = None) -> dict:
    """Profile ``cmd`` and export the report next to it.

    Returns ``{"report", "raw_csv", "details_csv", "log", "unavailable_metrics", "command"}``; metrics the
    chip lacks (per ``ncu --query-metrics``) are left out of the run and listed in ``unavailable_metrics``.
    """
    ncu = ncu or find_ncu()
    if not ncu:
        raise GpudoctorError("Nsight Compute (ncu) not found: put it on PATH or set NCU=/path/to/ncu")
    out_base = Path(out_base)
    if out_base.suffix == ".ncu-rep":
        out_base = out_base.with_suffix("")
    out_base.parent.mkdir(parents=True, exist_ok=True)
    metrics = list(metrics)
    try:
        missing = unavailable_metrics(metrics, available_metrics(ncu, chip))
    except GpudoctorError:
        missing = []  # cannot ask: request everything, ncu reports what it cannot collect
    wanted = [m for m in metrics if m not in missing]
    command = build_ncu_command(cmd, out_base, nvtx_range, kernel_regex, launch_skip, launch_count, wanted, ncu)
    log = out_base.with_name(out_base.name + ".ncu.log")
    report = out_base.with_name(out_base.name + ".ncu-rep")
    with open(log, "wb") as f:
        try:
            rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise GpudoctorError(f"ncu did not finish within {timeout} s (log: {log})") from None
        except OSError as e:
            raise GpudoctorError(f"cannot run {ncu}: {e.strerror or e}") from None
    if not report.exists():
        tail = log.read_text(errors="replace").strip().splitlines()
        raise GpudoctorError(f"ncu wrote no report (exit {rc}): {tail[-1] if tail else 'no output'} (log: {log})")
    paths = {}
    for page in ("raw", "details"):
        dst = out_base.with_name(f"{out_base.name}.{page}.csv")
        with open(dst, "wb") as f:
            r = subprocess.run([ncu, "--import", str(report), "--csv", "--page", page], stdout=f,
                               stderr=subprocess.PIPE, timeout=timeout)
        if r.returncode != 0:
            err = r.stderr.decode(errors="replace").strip().splitlines()
            raise GpudoctorError(f"ncu --import {report} --page {page} failed: {err[-1] if err else r.returncode}")
        paths[page] = dst
    return {"report": report, "raw_csv": paths["raw"], "details_csv": paths["details"], "log": log,
            "unavailable_metrics": missing, "command": command, "returncode": rc}


# ----------------------------------------------------------------------------------- timeline join
_SIG = re.compile(r"^(?:void\s+)?(?P<q>[^(<]*)")


def _short_of(names: np.ndarray) -> np.ndarray:
    """"void ns::kern<...>(args)" -> "kern" (the function name without namespace/template/args), per name."""
    q = pd.Series(names, dtype="string").str.extract(_SIG)["q"].fillna("")
    return q.str.strip().str.split("::").str[-1].fillna("").to_numpy(dtype=object)


def _distinct(col: pd.Series) -> np.ndarray:
    vals = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.unique(col.dropna())
    return np.asarray(pd.Index(vals).astype(object).astype(str), dtype=object)


def _ids(col: pd.Series, vocab: pd.Index) -> np.ndarray:
    """Row-wise vocabulary ids of a string column, looked up once per distinct value."""
    cat = col.astype("category") if not isinstance(col.dtype, pd.CategoricalDtype) else col
    per_cat = vocab.get_indexer(cat.cat.categories.astype(object).astype(str))
    codes = cat.cat.codes.to_numpy()
    return np.where(codes >= 0, per_cat[np.maximum(codes, 0)], vocab.get_indexer([""])[0])


def join_to_timeline(kernel_metrics: pd.DataFrame, kernels: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Fill ``kernel_row`` of ncu launches with the matching timeline kernel; returns (frame, unjoined count).

    Within a rank, the n-th ncu launch (by ``launch_id``) of a (name, grid, block) is the n-th timeline
    kernel (launch order: ``correlation_id``, else ``start_ns``) of the same key. The ncu name is
    compared with the timeline's ``demangled_name``, then its ``name``, then both reduced to the bare
    function name (ncu's ``--print-kernel-base function``). ``kernel_row`` is the row position in the
    rows of ``kernels`` that have that rank (what ``Trace.for_rank(r).kernels`` indexes). Timeline
    kernels without grid/block (-1) match on the name alone.

    ncu and the timeline are separate runs: when ncu skipped launches (``--launch-skip``, ``-k``, NVTX
    filters) the n-th profiled launch is not the n-th launch of the program, and the join is by
    position, not identity.
    """
    km = kernel_metrics.copy()
    km["kernel_row"] = np.full(len(km), -1, dtype=np.int64)
    if km.empty or kernels is None or kernels.empty:
        return km, int(len(km))
    geo = ["grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z"]
    kn = kernels.reset_index(drop=True)
    has_dem = "demangled_name" in kn.columns
    # one vocabulary of every distinct string (names repeat: work on ids, never on millions of strings)
    distinct = [_distinct(kn["name"]), _distinct(km["name"])] + ([_distinct(kn["demangled_name"])] if has_dem else [])
    words = pd.unique(np.concatenate(distinct + [np.array([""], dtype=object)]))
    shorts = _short_of(words)
    vocab = pd.Index(pd.unique(np.concatenate([words, shorts])))
    short_id = pd.Series(vocab.get_indexer(shorts), index=vocab.get_indexer(words))  # word id -> short id

    name_id = _ids(kn["name"], vocab)
    dem_id = _ids(kn["demangled_name"], vocab) if has_dem else np.full(len(kn), vocab.get_indexer([""])[0])
    empty = vocab.get_indexer([""])[0]
    full_id = np.where(dem_id != empty, dem_id, name_id)
    tl = pd.DataFrame({"rank": kn["rank"].to_numpy(), "dem": dem_id, "name": name_id,
                       "short": short_id.reindex(full_id).to_numpy(),
                       **{g: (kn[g].to_numpy() if g in kn.columns else -1) for g in geo}})
    tl["row"] = tl.groupby("rank").cumcount().to_numpy()  # position within the rank
    if "correlation_id" in kn.columns and (kn["correlation_id"].to_numpy() >= 0).all():
        tl["order"] = kn["correlation_id"].to_numpy()
    else:
        tl["order"] = kn["start_ns"].to_numpy() if "start_ns" in kn.columns else np.arange(len(kn))
    tl["no_geo"] = tl["grid_x"].to_numpy() < 0

    q_name = _ids(km["name"], vocab)
    q = pd.DataFrame({"i": np.arange(len(km)), "rank": km["rank"].to_numpy(), "name": q_name,
                      "short": short_id.reindex(q_name).to_numpy(), "launch_id": km["launch_id"].to_numpy(),
                      **{g: km[g].to_numpy() for g in geo}})
    # which timeline column each distinct ncu name matches
    col = np.where(np.isin(q_name, np.unique(dem_id)), "dem",
                   np.where(np.isin(q_name, np.unique(name_id)), "name",
                            np.where(np.isin(q["short"].to_numpy(), np.unique(tl["short"].to_numpy())), "short", "")))
    q["col"] = col

    matched = np.full(len(km), -1, dtype=np.int64)
    for c in ("dem", "name", "short"):
        for with_geo in (True, False):
            qq = q[(q["col"].to_numpy() == c) & (matched[q["i"].to_numpy()] < 0)]
            if qq.empty:
                continue
            t = tl[~tl["no_geo"]] if with_geo else tl[tl["no_geo"]]
            keys = ["rank", "_k"] + (geo if with_geo else [])
            left = qq.assign(_k=qq["short" if c == "short" else "name"]).sort_values(["rank", "launch_id"],
                                                                                     kind="stable")
            right = t.assign(_k=t[c]).sort_values(["rank", "order"], kind="stable")
            left["n"] = left.groupby(keys, sort=False).cumcount().to_numpy()
            right = right.assign(n=right.groupby(keys, sort=False).cumcount().to_numpy())
            j = left.merge(right[keys + ["n", "row"]], on=keys + ["n"], how="inner")
            matched[j["i"].to_numpy()] = j["row"].to_numpy()
    km["kernel_row"] = matched
    return km, int((matched < 0).sum())


__all__ = ["ANALYZER_METRICS", "RECORDED_METRICS", "available_metrics", "parse_query_metrics",
           "unavailable_metrics", "build_ncu_command", "run_ncu", "join_to_timeline"]
