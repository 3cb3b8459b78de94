"""gpu_idle: how much of the steady-state window the GPU does nothing, and why.

idle_fraction = 1 - (union of kernel and memop time in the window) / window.

The idle time is the set of gaps between merged busy blocks. Each gap is attributed, as a whole, to
one cause (vectorized: the gaps' overlap with each class of API calls comes from cumulative sums and
searchsorted over the merged API intervals of that class):

1. gpu_side       the op after the gap was already launched when the GPU went idle (its launch call
                  had returned before the gap began): dependency / scheduling latency between queued kernels. Not
                  fixable from the host; not counted in the saving.
   Otherwise the host was late, and the first of these that holds names the cause:
2. module_load    a module load / JIT call overlaps the gap (cuLibraryLoadData, cuModuleLoad*, cuLink*,
                  or cudaFuncSetAttribute / cuKernelSetAttribute calls >= module_call_min_ns).
3. host_sync      a synchronizing call overlaps the gap (cuda*Synchronize, blocking cudaMemcpy, cudaFree,
                  the cudaStreamSynchronize of ``.item()``): the host drained the queue and waited.
4. pageable_memcpy  the API call of a memcpy from/to pageable host memory overlaps the gap.
5. launch_bound   a gap of at most launch_gap_max_ns: the host issues kernels slower than the GPU runs
                  them (per-kernel launch + framework overhead).
6. host_gap       longer gaps with none of the above: host-side work with no CUDA activity (Python, data
                  loading, CPU preprocessing, JIT that the profiler does not show).

Severity uses this analyzer's own thresholds on idle_fraction (idle_fraction_medium / _high); the
saving is the idle time of causes 2-6. In steps: ``measure`` finds the gaps, their causes, the frames
charged with them (with host call stacks) and, under torch.profiler, the profiler's own cost;
``severity`` grades idle_fraction (at most low when the profiler's cost explains the verdict);
``explain`` words the finding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gpudoctor.analyzers import source_lines
from gpudoctor.analyzers.context import AnalysisContext, display_name
from gpudoctor.analyzers.findings import SEVERITIES, Finding
from gpudoctor.analyzers.observer_effect import profiler_overhead
from gpudoctor.analyzers.spec import AnalyzerSpec, Setting, fraction
from gpudoctor.model.columns import equals
from gpudoctor.model.steps import merge_intervals

ID = "gpu_idle"

SETTINGS = (
    fraction("idle_fraction_medium", 0.25, "medium when the GPU is idle at least this fraction of the steady-state window"),
    fraction("idle_fraction_high", 0.5, "high at this fraction"),
    Setting("launch_bound_kernel_ns", 5000, "median kernel shorter than this with host-late gaps: launch-bound", unit="ns"),
    Setting("launch_gap_max_ns", 50000, "a host-late gap up to this long with no other cause counts as launch overhead",
            unit="ns"),
    Setting("module_call_min_ns", 10000, "cudaFuncSetAttribute / cuKernelSetAttribute calls at least this long count as "
            "module load", unit="ns"),
    Setting("max_examples", 5, "examples of each cause listed in the evidence", unit="count"),
    Setting("profiler_op_overhead_ns", 2200, "torch.profiler host cost per operator with record_shapes, when no "
            "unprofiled step time was measured", unit="ns"),
    Setting("profiler_op_overhead_stack_ns", 4400, "... with record_shapes and with_stack", unit="ns"),
    Setting("frame_samples_per_gap", 16, "times per idle gap at which the host stack is sampled to charge the gap to code",
            unit="count", minimum=1),
    Setting("max_frames", 5, "user-code frames named in the finding", unit="count"),
    Setting("max_frame_gaps", 50, "gaps listed per frame in the evidence (longest first), for the timeline", unit="count"),
    fraction("min_frame_fraction", 0.01, "frames costing less than this fraction of the window are not named"),
)

CAUSES = ("gpu_side", "module_load", "host_sync", "pageable_memcpy", "launch_bound", "host_gap")
MODULE_ALWAYS = re.compile(r"^cu(Library|Module)Load|^cuLink(Create|AddData|AddFile|Complete)|^nvrtc|^nvJitLink", re.I)
MODULE_IF_LONG = re.compile(r"^(cudaFuncSetAttribute|cuFuncSetAttribute|cuKernelSetAttribute)", re.I)
SYNC = re.compile(
    r"synchronize|^cudaMemcpy(2D|3D|Peer|FromSymbol|ToSymbol|FromArray|ToArray)?(_v\d+)?$|"
    r"^cuMemcpy(DtoH|HtoD|DtoD|2D|3D|Peer)?(_v\d+)?$|^cudaFree$|^cuMemFree(_v\d+)?$|^cudaFreeHost$", re.I)

RECOMMEND = {
    "launch_bound": "Launch overhead: the host issues kernels slower than the GPU runs them. Capture the steady loop "
                    "in a CUDA graph (torch.cuda.CUDAGraph / torch.compile(mode=\"reduce-overhead\")), let "
                    "torch.compile fuse the small elementwise ops, or give each kernel more work (batch the loop "
                    "iterations into one tensor op).",
    "host_sync": "Host syncs: remove .item() / .cpu() / .tolist() / print(tensor) / nonzero() on GPU tensors inside the "
                 "loop (keep running sums on the GPU and read them once per step or every N steps), use "
                 "non_blocking copies, and find the syncs with torch.cuda.set_sync_debug_mode(\"warn\").",
    "cudnn_search": "cuDNN's algorithm search runs inside the steady state (torch.backends.cudnn.benchmark with an "
                    "input shape it has not seen: the convolutions time candidate kernels and wait for each): keep "
                    "shapes fixed or pad them to a few sizes warmed up before the loop, or set "
                    "torch.backends.cudnn.benchmark = False.",
    "module_load": "Module loading / JIT inside the steady state: warm up every shape before measuring, keep shapes "
                   "static (pad sequence lengths to buckets, a fixed-size KV cache) so cuDNN / Triton / torch.compile "
                   "do not build and load new kernels per step; for cuDNN SDPA with changing lengths prefer the flash "
                   "backend.",
    "pageable_memcpy": "Pageable host memory: allocate host buffers pinned (DataLoader(pin_memory=True), "
                       "tensor.pin_memory()) and copy with .to(device, non_blocking=True).",
    "host_gap": "Host-side gaps with no CUDA activity: the CPU is busy with something else (Python, data loading, "
                "preprocessing, compilation). Profile the host (py-spy, torch.profiler CPU view), use more "
                "DataLoader workers (num_workers, persistent_workers=True, prefetch_factor), and move "
                "preprocessing to the GPU.",
}


def _covered_before(t: np.ndarray, us: np.ndarray, ue: np.ndarray, cum: np.ndarray) -> np.ndarray:
    """Length of the union (us, ue: disjoint, sorted) that lies before each time ``t``."""
    i = np.searchsorted(ue, t, side="right")  # intervals [0, i) end at or before t
    full = cum[i]
    j = np.clip(i, 0, len(us) - 1)
    partial = np.where(i < len(us), np.clip(t - us[j], 0, ue[j] - us[j]), 0)
    return full + partial


def overlap(g0: np.ndarray, g1: np.ndarray, s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Overlap (ns) of each gap [g0, g1) with the union of the intervals [s, e)."""
    if len(s) == 0 or len(g0) == 0:
        return np.zeros(len(g0), dtype=np.int64)
    us, ue = merge_intervals(s, e)
    cum = np.r_[0, np.cumsum(ue - us)]
    return _covered_before(g1, us, ue, cum) - _covered_before(g0, us, ue, cum)


def find_gaps(ctx: AnalysisContext) -> pd.DataFrame:
    """Idle gaps of the steady window: g0, g1, dur_ns, next op (is_kernel, row, launch_start_ns)."""
    la = ctx.launches()
    if la.empty:
        return pd.DataFrame(columns=["g0", "g1", "dur_ns", "next_is_kernel", "next_row", "next_launch_ns",
                                     "next_launch_end_ns", "next_launched"])
    s = la["start_ns"].to_numpy(np.int64)  # sorted by start
    e = la["end_ns"].to_numpy(np.int64)
    run_end = np.maximum.accumulate(e)
    new = np.r_[False, s[1:] > run_end[:-1]]  # op i starts a new busy block after a gap
    idx = np.nonzero(new)[0]
    g0 = run_end[idx - 1]
    g1 = s[idx]
    # Leading / trailing idle inside the window (the window is normally the span of the ops themselves).
    out = pd.DataFrame({
        "g0": g0, "g1": g1, "dur_ns": g1 - g0,
        "next_is_kernel": la["is_kernel"].to_numpy()[idx],
        "next_row": la["row"].to_numpy()[idx],
        "next_launch_ns": la["launch_start_ns"].to_numpy()[idx],
        "next_launch_end_ns": la["launch_end_ns"].to_numpy()[idx],
        "next_launched": la["launched"].to_numpy()[idx],
    })
    lead = int(s[0]) - ctx.start_ns if len(s) else 0
    trail = ctx.end_ns - int(run_end[-1]) if len(s) else 0
    extra = []
    if lead > 0:
        extra.append({"g0": ctx.start_ns, "g1": int(s[0]), "dur_ns": lead, "next_is_kernel": bool(la["is_kernel"].iat[0]),
                      "next_row": int(la["row"].iat[0]), "next_launch_ns": int(la["launch_start_ns"].iat[0]),
                      "next_launch_end_ns": int(la["launch_end_ns"].iat[0]),
                      "next_launched": bool(la["launched"].iat[0])})
    if trail > 0:
        extra.append({"g0": int(run_end[-1]), "g1": ctx.end_ns, "dur_ns": trail, "next_is_kernel": False,
                      "next_row": -1, "next_launch_ns": -1, "next_launch_end_ns": -1, "next_launched": False})
    if extra:
        out = pd.concat([out, pd.DataFrame(extra)], ignore_index=True)
    return out


def _explained_by(c: str, overlap_ns: np.ndarray, dur: np.ndarray) -> np.ndarray:
    """Gaps that cause ``c`` explains. A pageable copy explains a gap only when its call covers at least
    half of it: a gap in which the host computed and then copied the result is host work (named by the
    host's code), not a copy problem; the copy is counted apart (``pageable_copy_in_gaps_ns``)."""
    if c == "pageable_memcpy":
        return 2 * overlap_ns >= dur
    return overlap_ns > 0


def attribute(ctx: AnalysisContext, gaps: pd.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Cause index (into CAUSES) of every gap, and the per-class overlaps used."""
    cfg = ctx.config.section(ID)
    g0 = gaps["g0"].to_numpy(np.int64)
    g1 = gaps["g1"].to_numpy(np.int64)
    dur = g1 - g0
    api = ctx.api_calls
    a_s = api["start_ns"].to_numpy(np.int64)
    a_e = api["end_ns"].to_numpy(np.int64)
    mask = {}
    mask["module_load"] = ctx.name_mask(MODULE_ALWAYS.pattern, api, "name") | (
        ctx.name_mask(MODULE_IF_LONG.pattern, api, "name") & ((a_e - a_s) >= int(cfg["module_call_min_ns"])))
    mask["host_sync"] = ctx.name_mask(SYNC.pattern, api, "name")
    # API calls of memcpys that touch pageable host memory.
    m = ctx.memops
    page = equals(m["src_kind"], "pageable") | equals(m["dst_kind"], "pageable")
    corr = set(m.loc[page, "correlation_id"].tolist()) - {-1}
    mask["pageable_memcpy"] = api["correlation_id"].isin(corr).to_numpy() if corr else np.zeros(len(api), bool)
    ov = {c: overlap(g0, g1, a_s[mk], a_e[mk]) for c, mk in mask.items()}

    queued = gaps["next_launched"].to_numpy(bool) & (gaps["next_launch_end_ns"].to_numpy(np.int64) <= g0)
    cause = np.full(len(gaps), CAUSES.index("host_gap"), dtype=np.int64)
    short = dur <= int(cfg["launch_gap_max_ns"])
    # Assign from the lowest priority up so that higher priorities overwrite.
    cause[short] = CAUSES.index("launch_bound")
    for c in ("pageable_memcpy", "host_sync", "module_load"):
        cause[_explained_by(c, ov[c], dur)] = CAUSES.index(c)
    cause[queued] = CAUSES.index("gpu_side")
    return cause, ov


@dataclass
class Measurement:
    """What ``measure`` found in one rank's window."""

    gaps: pd.DataFrame
    cause: np.ndarray  # index into CAUSES of every gap
    by_cause: dict[str, int]  # idle ns by cause
    counts: dict[str, int]  # gaps by cause
    window_ns: int
    idle_fraction: float
    median_kernel_ns: float  # nan without kernels
    median_launch_ns: float  # nan without kernel launch calls
    pageable_copy_in_gaps_ns: int
    frames: list[dict]  # user-code frames charged with idle time (empty without host call stacks)
    observer: dict | None  # under torch.profiler: its estimated cost and the idle fraction without it
    metrics: dict
    saving_ns: int


def _medians(ctx: AnalysisContext) -> tuple[float, float]:
    """Median kernel duration and median kernel-launch call duration (ns; nan when there are none)."""
    kdur = ctx.kernels["dur_ns"].to_numpy(np.int64)
    la = ctx.launches()
    launch_calls = la.loc[la["launched"] & la["is_kernel"]]
    med_kernel = float(np.median(kdur)) if len(kdur) else float("nan")
    med_launch = float(np.median(launch_calls["launch_end_ns"] - launch_calls["launch_start_ns"])) if len(launch_calls) else float("nan")
    return med_kernel, med_launch


def _charged_frames(ctx: AnalysisContext, gaps: pd.DataFrame, cause: np.ndarray) -> list[dict]:
    """With host call stacks: the user-code frames charged with the idle time, largest first (each with its
    gaps for the timeline); empty without stacks."""
    charged = source_lines.measure(ctx, gaps, cause, CAUSES, {"module_load": MODULE_ALWAYS.pattern,
                                                              "host_sync": SYNC.pattern})
    if charged is None:
        return []
    return source_lines.frames_table(ctx, charged, gaps, SYNC.pattern)


def _observer(ctx: AnalysisContext, by_cause: dict[str, int], window: int, idle: int, n_steps: int) -> dict | None:
    """Under torch.profiler: the profiler's own per-step host cost (``observer_effect.profiler_overhead``),
    the host-late idle time and the idle fraction without the profiler's cost; None for other traces."""
    cfg = ctx.config.section(ID)
    est = profiler_overhead(ctx, float(cfg["profiler_op_overhead_ns"]), float(cfg["profiler_op_overhead_stack_ns"]))
    if est is None:
        return None
    host_late = sum(v for c, v in by_cause.items() if c in ("launch_bound", "host_gap"))
    cost = min(est["per_step_ns"] * n_steps, idle)  # host time the profiler added shows up as idle GPU time
    idle_without = (idle - cost) / (window - cost) if window > cost else 0.0
    return {"estimate": est, "host_late_ns": host_late, "idle_fraction_without": idle_without}


def measure(ctx: AnalysisContext) -> Measurement | None:
    """The idle gaps of the window and their causes (``find_gaps``, ``attribute``), idle time by cause, the
    median kernel and launch call, the frames charged with idle time and, under torch.profiler, the
    profiler's own cost; None without GPU work or window."""
    if ctx.kernels.empty and ctx.memops.empty:
        return None
    window = ctx.window_ns
    if window <= 0:
        return None
    busy = ctx.busy_ns()
    idle = max(window - busy, 0)
    gaps = find_gaps(ctx)
    cause, ov = attribute(ctx, gaps) if len(gaps) else (np.zeros(0, np.int64), {})
    gdur = gaps["dur_ns"].to_numpy(np.int64) if len(gaps) else np.zeros(0, np.int64)
    by_cause = {c: int(gdur[cause == i].sum()) for i, c in enumerate(CAUSES)}
    counts = {c: int((cause == i).sum()) for i, c in enumerate(CAUSES)}
    med_kernel, med_launch = _medians(ctx)
    n_steps = max(len(ctx.window.steady), 1)
    metrics = {
        "idle_fraction": round(idle / window, 6),
        "idle_ns": int(idle),
        "busy_ns": int(busy),
        "window_ns": int(window),
        "gaps": int(len(gaps)),
        "median_kernel_ns": None if np.isnan(med_kernel) else int(med_kernel),
        "median_launch_call_ns": None if np.isnan(med_launch) else int(med_launch),
        "kernels_per_step": round(len(ctx.kernels) / n_steps, 2),
    }
    for c in CAUSES:
        metrics[f"{c}_fraction"] = round(by_cause[c] / window, 6)
    pageable_in_gaps = int(ov["pageable_memcpy"][cause != CAUSES.index("gpu_side")].sum()) if len(gaps) else 0
    metrics["pageable_copy_in_gaps_ns"] = pageable_in_gaps
    search = source_lines.cudnn_search_gaps(ctx, gaps) if len(gaps) else np.zeros(0, dtype=bool)
    metrics["cudnn_search_ns"] = int(gdur[search].sum())
    metrics["cudnn_search_sync_ns"] = int(gdur[search & (cause == CAUSES.index("host_sync"))].sum())
    frames = _charged_frames(ctx, gaps, cause)
    if frames:
        metrics["top_frame"] = source_lines.where(frames[0])
        metrics["top_frame_idle_ns_per_step"] = frames[0]["idle_ns_per_step"]
        metrics["top_frame_step_fraction"] = frames[0]["step_fraction"]
    observer = _observer(ctx, by_cause, int(window), int(idle), n_steps)
    if observer is not None:
        metrics["profiler_overhead_per_step_ns"] = int(observer["estimate"]["per_step_ns"])
        metrics["idle_fraction_without_profiler"] = round(observer["idle_fraction_without"], 6)
    saving = int(sum(v for c, v in by_cause.items() if c != "gpu_side"))
    return Measurement(gaps, cause, by_cause, counts, window, idle / window, med_kernel, med_launch, pageable_in_gaps,
                       frames, observer, metrics, saving)


def _severity_at(ctx: AnalysisContext, idle_fraction: float) -> str:
    """This analyzer's own thresholds on the idle fraction; below them never more than low."""
    cfg = ctx.config.section(ID)
    if idle_fraction >= float(cfg["idle_fraction_high"]):
        return "high"
    if idle_fraction >= float(cfg["idle_fraction_medium"]):
        return "medium"
    sev = ctx.severity(ID, idle_fraction)
    return "low" if sev in ("medium", "high") else sev  # below this analyzer's own thresholds: never more than low


def _profiler_explains(ctx: AnalysisContext, m: Measurement) -> bool:
    """Under torch.profiler: whether removing the profiler's own cost would lower the severity."""
    if m.observer is None:
        return False
    sev = _severity_at(ctx, m.idle_fraction)
    without = _severity_at(ctx, m.observer["idle_fraction_without"])
    return not (SEVERITIES.index(without) >= SEVERITIES.index(sev) or sev in ("info", "low"))


def severity(ctx: AnalysisContext, m: Measurement) -> str:
    """idle_fraction on idle_fraction_high / _medium (below them at most low); low when torch.profiler's own
    per-op cost explains the verdict (without it the severity would be lower)."""
    return "low" if _profiler_explains(ctx, m) else _severity_at(ctx, m.idle_fraction)


def _examples(ctx: AnalysisContext, m: Measurement, nmax: int) -> dict[str, list]:
    """The longest gaps of each cause, with the API calls inside each and the op that follows it."""
    k, api, gaps, cause = ctx.kernels, ctx.api_calls, m.gaps, m.cause
    gdur = gaps["dur_ns"].to_numpy(np.int64) if len(gaps) else np.zeros(0, np.int64)
    examples: dict[str, list] = {}
    for i, c in enumerate(CAUSES):
        sel = np.nonzero(cause == i)[0]
        if not len(sel):
            continue
        if len(sel) > 4 * nmax:  # millions of gaps: keep the longest few before sorting
            sel = np.sort(sel[np.argpartition(gdur[sel], len(sel) - nmax)[len(sel) - nmax:]])
        top = sel[np.lexsort((sel, -gdur[sel]))][:nmax]  # longest first; equal ones in time order
        rows = []
        for g in top:
            r = gaps.iloc[g]
            nxt = ""
            if r["next_row"] >= 0:
                nxt = display_name(k["kname"].iat[int(r["next_row"])]) if r["next_is_kernel"] else \
                    str(ctx.memops["kind"].iat[int(r["next_row"])])
            inside = api[(api["end_ns"].to_numpy() > r["g0"]) & (api["start_ns"].to_numpy() < r["g1"])]
            calls = inside.assign(d=inside["end_ns"] - inside["start_ns"]).groupby("name", observed=True)["d"].agg(["size", "sum"])
            calls = calls.sort_values("sum", ascending=False).head(4)
            rows.append({"start_us": ctx.rel_us(r["g0"]), "dur_us": round(int(r["dur_ns"]) / 1e3, 1), "next_op": nxt,
                         "api_calls_in_gap": {str(n): {"count": int(v["size"]), "us": round(v["sum"] / 1e3, 1)}
                                              for n, v in calls.iterrows()}})
        examples[c] = rows
    return examples


def _evidence(ctx: AnalysisContext, m: Measurement) -> dict:
    """Idle time and gaps by cause, the longest gaps of each cause, the frames and the profiler's cost."""
    med_kernel, med_launch = m.median_kernel_ns, m.median_launch_ns
    evidence = {
        "window": ctx.window.describe(),
        "idle_by_cause_us": {c: round(v / 1e3, 1) for c, v in m.by_cause.items() if v},
        "gaps_by_cause": {c: v for c, v in m.counts.items() if v},
        "examples": _examples(ctx, m, int(ctx.config.section(ID)["max_examples"])),
        "note": ("launch-bound: median kernel {:.1f} us vs median launch call {:.1f} us".format(med_kernel / 1e3, med_launch / 1e3)
                 if not np.isnan(med_kernel) and not np.isnan(med_launch) else ""),
    }
    if ctx.trace.meta.get("torch_profiler") is not None:
        evidence["source_note"] = ("torch.profiler records no driver module loads (cuLibraryLoadData): JIT / module "
                                   "loading shows up as host_gap here")
    if m.frames:
        evidence["frames"] = m.frames
    if m.observer is not None:
        est, n_steps = m.observer["estimate"], max(len(ctx.window.steady), 1)
        evidence["observer_effect"] = {**est, "host_late_idle_per_step_ns": int(m.observer["host_late_ns"] / n_steps),
                                       "basis": "measured unprofiled steps" if est["how"] == "measured" else
                                       "operators per step x per-operator profiler cost"}
    return evidence


def _advice(ctx: AnalysisContext, m: Measurement, ranked: list[tuple[int, str]]) -> list[str]:
    """One fix per cause with at least 1% of the window, largest first (the pageable-copy fix also when the
    copies inside host-late gaps reach 1%)."""
    window, med_kernel = m.window_ns, m.median_kernel_ns
    rec = [RECOMMEND[c] for v, c in ranked if v / window >= 0.01]
    search, search_sync = m.metrics["cudnn_search_ns"], m.metrics["cudnn_search_sync_ns"]
    if search >= 0.01 * window:  # the syncs are cuDNN's own, not the program's: its advice replaces theirs
        said = any(f["context"] == "cudnn_benchmark" for f in m.frames)  # a frame's line says it already
        if search_sync >= 0.8 * m.by_cause["host_sync"] and RECOMMEND["host_sync"] in rec:
            rec.remove(RECOMMEND["host_sync"])
        if not said:
            rec.insert(0, RECOMMEND["cudnn_search"])
    if m.pageable_copy_in_gaps_ns >= 0.01 * window and RECOMMEND["pageable_memcpy"] not in rec:
        rec.append(RECOMMEND["pageable_memcpy"])
    rec = rec or ["Nothing large to fix: the remaining idle time is latency between queued kernels."]
    if ranked and ranked[0][1] == "launch_bound" and not np.isnan(med_kernel) and \
            med_kernel < int(ctx.config.section(ID)["launch_bound_kernel_ns"]):
        rec[0] = (f"Median kernel {med_kernel / 1e3:.1f} us is shorter than its launch (median launch call "
                  f"{m.median_launch_ns / 1e3:.1f} us): " + rec[0])
    return rec


def _profiler_note(observer: dict) -> tuple[str, str]:
    """Title suffix and leading recommendation when torch.profiler's own cost explains the verdict."""
    est, idle_without = observer["estimate"], observer["idle_fraction_without"]
    title = (f" (torch.profiler's own per-op cost, {est['how']} ~{est['per_step_ns'] / 1e6:.2f} ms/step, can explain it: "
             f"~{idle_without:.0%} idle without it)")
    rec = (f"This idle time may be the profiler's: torch.profiler{' with record_shapes' if est['record_shapes'] else ''}"
           f"{' and with_stack' if est['with_stack'] else ''} costs the host ~{est['per_step_ns'] / 1e6:.2f} ms per step "
           f"({est['how']}). Re-profile with `gpudoctor profile --backend nsys` (no per-operator host cost) before acting.")
    return title, rec


def explain(ctx: AnalysisContext, m: Measurement, sev: str) -> Finding:
    """Title (idle share, the largest causes, the costliest frame), evidence and the fixes: the frames' lines
    first, then one per cause; when torch.profiler's own cost explains the verdict, a note saying so leads."""
    window = m.window_ns
    ranked = sorted(((v, c) for c, v in m.by_cause.items() if c != "gpu_side" and v >= 0.005 * window), reverse=True)
    parts = [f"{c.replace('_', ' ')} {v / window:.0%}" for v, c in ranked[:3]]
    title = f"GPU idle {m.idle_fraction:.0%} of the steady-state window" + (f": {', '.join(parts)}" if parts else "")
    rec = _advice(ctx, m, ranked)
    if m.frames:
        title += f"; most from {m.metrics['top_frame']}"
    rec = [source_lines.explain(f) for f in m.frames] + rec
    if m.observer is not None and _profiler_explains(ctx, m):
        note_title, note_rec = _profiler_note(m.observer)
        title += note_title
        rec = [note_rec] + rec
    return Finding(analyzer=ID, severity=sev, title=title, metrics=m.metrics, estimated_saving_ns=m.saving_ns,
                   estimated_saving_fraction=round(m.saving_ns / window, 6), recommendation=" ".join(rec),
                   evidence=_evidence(ctx, m), rank=ctx.rank)


def analyze(ctx: AnalysisContext) -> list[Finding]:
    m = measure(ctx)
    return [] if m is None else [explain(ctx, m, severity(ctx, m))]


SPEC = AnalyzerSpec(ID, analyze, SETTINGS, evidence=(
    ("idle_by_cause_us", "idle time in the window by cause"),
    ("gaps_by_cause", "number of idle gaps by cause"),
    ("examples", "the longest gaps of each cause with their start times"),
    ("note", "how causes were attributed"),
    ("source_note", "what the input could not tell (no runtime calls recorded...)"),
    ("window", "the steady-state window"),
    ("observer_effect", "under torch.profiler: its estimated per-step host cost, how it was estimated, and the "
                        "host-late idle time per step"),
    ("frames", "with host call stacks: the user-code frames charged with idle time, largest first, each with its "
               "gaps (start_us, dur_us) for the timeline"),
))
