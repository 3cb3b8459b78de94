"""Per-step samples and steady-step attribution totals of a run, computed from its trace: the ``gpu_time``,
``step_time`` and ``wall_time`` samples, per-kernel / per-range GPU time of the steady steps, and the
``gate`` block of analysis.json (gpudoctor.gate.run describes the metrics)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from gpudoctor.gate.environment import environment
from gpudoctor.gate.run import FINDING_METRICS, RunData, carriers, finding_dict
from gpudoctor.model.steps import merge_intervals
from gpudoctor.model.trace import Trace


_DIGITS = re.compile(r"\d+")


def busy_in_windows(starts: np.ndarray, ends: np.ndarray, win_start: np.ndarray, win_end: np.ndarray) -> np.ndarray:
    """For each window, the length of the union of the intervals clipped to it (vectorized)."""
    win_start = np.asarray(win_start, dtype=np.int64)
    win_end = np.asarray(win_end, dtype=np.int64)
    if len(starts) == 0:
        return np.zeros(len(win_start), dtype=np.int64)
    bs, be = merge_intervals(starts, ends)
    cum = np.r_[0, np.cumsum(be - bs)]
    i0 = np.searchsorted(be, win_start, side="right")  # first block ending after the window start
    i1 = np.searchsorted(bs, win_end, side="left") - 1  # last block starting before the window end
    out = np.zeros(len(win_start), dtype=np.int64)
    ok = i0 <= i1
    a, b = i0[ok], i1[ok]
    tot = cum[b + 1] - cum[a]
    tot -= np.maximum(win_start[ok] - bs[a], 0)
    tot -= np.maximum(be[b] - win_end[ok], 0)
    out[ok] = np.maximum(tot, 0)
    return out


def _assign_to_steps(t: np.ndarray, step_start: np.ndarray, step_end: np.ndarray) -> np.ndarray:
    """Index of the steady step whose GPU span holds each time, or -1."""
    if len(step_start) == 0 or len(t) == 0:
        return np.full(len(t), -1)
    idx = np.searchsorted(step_start, t, side="right") - 1
    ok = idx >= 0
    ok[ok] = t[ok] < step_end[idx[ok]]
    return np.where(ok, idx, -1)


# PyTorch's generic kernels: one short name for hundreds of ops. Attribution names them by their functor.
GENERIC_KERNELS = {"vectorized_elementwise_kernel", "elementwise_kernel", "unrolled_elementwise_kernel", "reduce_kernel",
                   "index_elementwise_kernel", "vectorized_templated_elementwise_kernel", "multi_tensor_apply_kernel",
                   "elementwise_kernel_with_index"}
_WRAPPERS = GENERIC_KERNELS | {"gpu_kernel_impl_nocast", "gpu_kernel_impl", "gpu_kernel", "ReduceOp", "func_wrapper_t",
                               "BUnaryFunctor", "AUnaryFunctor", "BinaryFunctor", "UnaryFunctor", "memory", "detail",
                               "launch_vectorized_kernel", "launch_legacy_kernel", "TensorListMetadata", "opmath_gpu_kernel_with_scalars",
                               "binary_internal", "native", "void", "at"}
_NATIVE_ID = re.compile(r"at::native::(?:(?:<unnamed>|\(anonymous namespace\)|binary_internal|detail)::)*([A-Za-z_]\w*)")


def kernel_key(name: str, demangled: str) -> str:
    """The name attribution uses: the short name, with the op's functor for PyTorch's generic kernels
    (``vectorized_elementwise_kernel<MulFunctor>``)."""
    if name not in GENERIC_KERNELS or not demangled:
        return name
    for ident in _NATIVE_ID.findall(demangled):
        if ident not in _WRAPPERS:
            return f"{name}<{ident}>"
    return name


def _kernel_keys(k: pd.DataFrame) -> np.ndarray:
    if k.empty:
        return np.array([], dtype=object)
    names = pd.Categorical(k["name"].astype(str)) if not isinstance(k["name"].dtype, pd.CategoricalDtype) else k["name"].values
    dem = (pd.Categorical(k["demangled_name"].astype(str)) if not isinstance(k["demangled_name"].dtype, pd.CategoricalDtype)
           else k["demangled_name"].values)
    nc = np.asarray(names.codes, dtype=np.int64)
    dc = np.asarray(dem.codes, dtype=np.int64)
    pair = nc * (len(dem.categories) + 1) + (dc + 1)
    uniq, inv = np.unique(pair, return_inverse=True)
    nn, dd = uniq // (len(dem.categories) + 1), uniq % (len(dem.categories) + 1) - 1
    ncat, dcat = np.asarray(names.categories, dtype=object), np.asarray(dem.categories, dtype=object)
    keys = np.array([kernel_key(str(ncat[a]) if a >= 0 else "", str(dcat[b]) if b >= 0 else "")
                     for a, b in zip(nn, dd)], dtype=object)
    return keys[inv]


def rank_data(t: Trace, window) -> dict:
    """Per-step samples and steady-step attribution totals of one rank."""
    steady = window.steady.sort_values("gpu_start_ns", kind="stable")
    st = steady["gpu_start_ns"].to_numpy(np.int64)
    en = steady["gpu_end_ns"].to_numpy(np.int64)
    out: dict = {"n": len(steady)}
    k, m = t.kernels, t.memops
    starts = np.r_[k["start_ns"].to_numpy(np.int64), m["start_ns"].to_numpy(np.int64)]
    ends = np.r_[k["end_ns"].to_numpy(np.int64), m["end_ns"].to_numpy(np.int64)]
    out["step_time"] = (en - st).astype(float)
    out["gpu_time"] = busy_in_windows(starts, ends, st, en).astype(float)
    # Wall time: the step period, from the GPU start of a steady step to the GPU start of the next step.
    # It is the loop's real time per iteration whichever side is the bottleneck (a host-bound loop starves
    # the GPU, so GPU starts follow the host; a GPU-bound one queues), unlike the host range's duration,
    # which only measures launching when the host runs ahead of the GPU.
    allsteps = window.steps.sort_values("gpu_start_ns", kind="stable")
    starts_all = allsteps["gpu_start_ns"].to_numpy(np.int64)
    steady_mask = ~allsteps["warmup"].to_numpy(bool)
    period = np.diff(starts_all)
    out["wall_time"] = period[steady_mask[:-1]].astype(float) if len(starts_all) >= 2 else None
    # Attribution: kernels and memops starting inside a steady step.
    kin = _assign_to_steps(k["start_ns"].to_numpy(np.int64), st, en) >= 0
    kk = pd.DataFrame({"name": _kernel_keys(k)[kin], "category": k["category"].astype(str).to_numpy()[kin],
                       "d": (k["end_ns"] - k["start_ns"]).to_numpy(np.int64)[kin]})
    min_ = _assign_to_steps(m["start_ns"].to_numpy(np.int64), st, en) >= 0
    mm = pd.DataFrame({"name": "[" + m["kind"].astype(str).to_numpy()[min_].astype(object) + "]",
                       "category": "memory", "d": (m["end_ns"] - m["start_ns"]).to_numpy(np.int64)[min_]})
    both = pd.concat([kk, mm], ignore_index=True) if len(mm) else kk
    out["kernels"] = (both.groupby(["name", "category"], sort=False).agg(total_ns=("d", "sum"), count=("d", "size"))
                      .reset_index())
    out["ranges"] = _range_time(t, kin, min_, steady)
    return out


def _range_time(t: Trace, kin: np.ndarray, min_: np.ndarray, steady: pd.DataFrame) -> pd.DataFrame:
    """GPU time of the steady-step kernels launched inside each NVTX / record_function range (inclusive of
    nested ranges), keyed by the range text with digits replaced by '#'. The step ranges themselves are left
    out (they hold everything)."""
    cols = ["text", "total_ns", "count"]
    r, api = t.ranges, t.api_calls
    if r.empty or api.empty:
        return pd.DataFrame(columns=cols)
    k, m = t.kernels, t.memops
    corr = np.r_[k["correlation_id"].to_numpy(np.int64)[kin], m["correlation_id"].to_numpy(np.int64)[min_]]
    dur = np.r_[(k["end_ns"] - k["start_ns"]).to_numpy(np.int64)[kin], (m["end_ns"] - m["start_ns"]).to_numpy(np.int64)[min_]]
    ac = api[api["correlation_id"].to_numpy() >= 0]
    acorr = ac["correlation_id"].to_numpy(np.int64)
    order = np.argsort(acorr, kind="stable")
    sc = acorr[order]
    first = np.r_[True, sc[1:] != sc[:-1]] if len(sc) else np.zeros(0, bool)
    uc, ui = sc[first], order[first]
    if len(uc) == 0 or len(corr) == 0:
        return pd.DataFrame(columns=cols)
    pos = np.minimum(np.searchsorted(uc, corr), len(uc) - 1)
    hit = (corr >= 0) & (uc[pos] == corr)
    launches = pd.DataFrame({"thread_id": ac["thread_id"].to_numpy(np.int64)[ui[pos[hit]]],
                             "start_ns": ac["start_ns"].to_numpy(np.int64)[ui[pos[hit]]], "d": dur[hit]})
    if launches.empty:
        return pd.DataFrame(columns=cols)
    step_keys = set(_DIGITS.sub("#", str(n)) for n in steady["name"].astype(str))
    text = r["text"] if isinstance(r["text"].dtype, pd.CategoricalDtype) else r["text"].astype(str).astype("category")
    norm = np.array([_DIGITS.sub("#", str(c)) for c in text.cat.categories] + [""], dtype=object)
    rr = r.assign(key=norm[np.asarray(text.cat.codes)])
    rr = rr[~rr["key"].isin(step_keys)]
    rows = []
    for tid, g in launches.groupby("thread_id", sort=False):
        g = g.sort_values("start_ns", kind="stable")
        ts = g["start_ns"].to_numpy(np.int64)
        cum = np.r_[0, np.cumsum(g["d"].to_numpy(np.int64))]
        rt = rr[rr["thread_id"] == tid]
        if rt.empty:
            continue
        lo = np.searchsorted(ts, rt["start_ns"].to_numpy(np.int64), side="left")
        hi = np.searchsorted(ts, rt["end_ns"].to_numpy(np.int64), side="right")
        rows.append(pd.DataFrame({"text": rt["key"].to_numpy(), "total_ns": cum[hi] - cum[lo], "count": hi - lo}))
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.concat(rows, ignore_index=True)
    out = out[out["total_ns"] > 0]
    return out.groupby("text", sort=False).agg(total_ns=("total_ns", "sum"), count=("count", "sum")).reset_index()


def combine_steps(per_rank: list[np.ndarray | None], notes: list[str], metric: str) -> list[float] | None:
    vals = [v for v in per_rank if v is not None]
    if not vals or len(vals) < len(per_rank):
        return None
    if len(vals) > 1:
        if len({len(v) for v in vals}) == 1 and len(vals[0]):
            return [float(x) for x in np.max(np.vstack(vals), axis=0)]
        notes.append(f"{metric}: ranks have different numbers of steady steps; their steps are pooled")
    return [float(x) for v in vals for x in v]



def run_from_trace(trace: Trace, ranks: list, findings: list, label: str, source: str = "trace",
                   rank_samples: dict | None = None) -> RunData:
    """A RunData from an analyzed trace (``ranks``: its RankSummary list).

    ``rank_samples``: rank -> ``rank_data`` already computed elsewhere (the parallel path computes it on the
    worker that held the rank's events); ranks missing from it are computed from ``trace``.
    """
    per_rank = []
    run = RunData(label=label, source=source, env=environment(trace), findings=[finding_dict(f) for f in findings])
    multi = len(trace.rank_ids) > 1
    rank_samples = rank_samples or {}
    for rs in ranks:
        if rs.rank in rank_samples:
            per_rank.append(rank_samples[rs.rank])
        else:
            per_rank.append(rank_data(trace.for_rank(rs.rank) if multi else trace, rs.window))
        run.windows.append(f"rank {rs.rank}: {rs.window.describe()}")
    for metric in ("gpu_time", "step_time", "wall_time"):
        v = combine_steps([p[metric] for p in per_rank], run.notes, metric)
        if v is not None:
            run.samples[metric] = v
    run.steps = int(sum(p["n"] for p in per_rank))
    if per_rank:
        kern = pd.concat([p["kernels"] for p in per_rank], ignore_index=True)
        run.kernels = kern.groupby(["name", "category"], sort=False).agg(
            total_ns=("total_ns", "sum"), count=("count", "sum")).reset_index()
        rng = pd.concat([p["ranges"] for p in per_rank], ignore_index=True)
        if len(rng):
            run.ranges = rng.groupby("text", sort=False).agg(total_ns=("total_ns", "sum"), count=("count", "sum")).reset_index()
    # Per-rank values from the summary and the findings.
    idle = {rs.rank: 1.0 - float(rs.gpu_busy_fraction) for rs in ranks}
    scal: dict[str, dict] = {"idle_fraction": idle, "exposed_comm_fraction": {}, "mbu": {}}
    for key in FINDING_METRICS:
        for f in carriers(run.findings, key):
            scal[key][f.get("rank") if f.get("rank") is not None else -1] = float(f["metrics"][key])
    comm = run.kernels[run.kernels["category"] == "communication"]["total_ns"].sum() if len(run.kernels) else 0
    if not scal["exposed_comm_fraction"] and comm == 0 and len(run.kernels):
        scal["exposed_comm_fraction"] = {rs.rank: 0.0 for rs in ranks}
        run.notes.append("exposed_comm_fraction: no communication kernels, taken as 0")
    for key, vals in scal.items():
        if vals:
            run.samples[key] = [float(v) for _, v in sorted(vals.items(), key=lambda kv: (kv[0] is None, kv[0]))]
    return run



def gate_block(analysis) -> dict:
    """The ``gate`` block of analysis.json for an Analysis (pipeline.Analysis): what the gate needs to compare
    this run later without the trace. Recomputed from the trace (or from the analysis' ``gate_samples``,
    per-rank samples computed where the events were), a few KB."""
    run = run_from_trace(analysis.trace, analysis.ranks, [], label="", source="analysis_json",
                         rank_samples=getattr(analysis, "gate_samples", None))
    d = run.to_dict()
    d.pop("label", None)
    return d
