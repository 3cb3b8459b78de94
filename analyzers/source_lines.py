"""The lines of the user's code that make the GPU wait: gpu_idle's gaps joined with host call stacks.

Needs the stack tables of the trace model (torch.profiler ``with_stack=True``; Nsight Systems with
Python backtraces / Python sampling). Pure: trace model and gaps in, a table of frames out.

measure  Every gap the host made (all causes but gpu_side) is charged to one or more user frames:
         - host_sync: the synchronizing call that overlaps the gap, by its stack (``loss.item()``): the
           sync drained the queue, so the whole gap is its cost, whatever the host did next;
         - module_load: the module-load call (``cuLibraryLoadData``) that overlaps the gap, by its stack;
         - launch_bound: the launch call that ended the gap (the code issuing the small kernels);
         - the others (host_gap, pageable_memcpy, module_load): what the host thread was running during
           the gap, sampled at ``frame_samples_per_gap`` evenly spaced times from ``host_stacks``
           (the launch that ended the gap when the trace has no host stacks).
         A stack is charged to its innermost frame of user code: library frames (torch, transformers,
         numpy, site-packages, the standard library, built-in functions) are skipped, and the library
         frame the user frame called is kept as ``callee`` (``Tensor.item``, ``conv2d``).
severity gpu_idle's own (these frames explain its idle time; they add no finding of their own).
explain  One line per frame, naming the cause by what the host was doing, with the per-step cost.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gpudoctor.analyzers.context import measured_fact
from gpudoctor.model.columns import equals, isin, per_value
from gpudoctor.model.joins import first_match
from gpudoctor.model.stacks import innermost_at, stack_frames
from gpudoctor.model.steps import union_ns

if TYPE_CHECKING:
    from gpudoctor.analyzers.context import AnalysisContext


ID = "gpu_idle"  # its settings (frame_samples_per_gap, max_frames, ...) are gpu_idle's SETTINGS

_DATALOADER = ("torch/utils/data/",)
# Files on the stack only while Dynamo / Inductor compile: Dynamo enters convert_frame on a cache miss (a
# first compile or a recompile), a lazy backward compiles through compile_fx. Not every torch/_dynamo
# frame: eval_frame's wrappers run on every call of compiled code and of functions that disable Dynamo
# (torch.optim's step), so they say nothing about compiling (fixtures/compile_cpu).
_COMPILE = ("torch/_dynamo/convert_frame.py", "torch/_inductor/compile_fx.py", "torch/_inductor/graph.py",
            "torch/_inductor/scheduler.py", "torch/_inductor/codegen/", "torch/_inductor/async_compile.py",
            "torch/_functorch/_aot_autograd/graph_compile.py")
_AUTOTUNE = ("triton/runtime/autotuner", "torch/_inductor/runtime/triton_heuristics", "torch/_inductor/select_algorithm")
KINDS = ("sync", "module", "launch", "host")
_BUILDING = ("compile", "autotune", "jit", "cudnn_benchmark")  # contexts in which the GPU waits for code being built
_JIT = re.compile(r"nvrtc|nvJitLink|cuLibraryLoad|cuModuleLoad|cuLink")


def _stack_info(ctx) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    def compute():
        st = ctx.trace.stacks
        if st.empty:
            return None
        st = st.sort_values("stack_id", kind="stable").reset_index(drop=True)
        fr = ctx.trace.frames.sort_values("frame_id", kind="stable").reset_index(drop=True)
        # text once: the walks below read files and functions per stack
        fr = fr.assign(file=fr["file"].astype(str).astype(object), function=fr["function"].astype(str).astype(object))
        return stack_frames(st, fr), fr
    return ctx.cached("source_lines.stacks", compute)


def _api_stack(ctx, corr: np.ndarray) -> np.ndarray:
    """Stack id of the API call with each correlation id (-1 when unknown)."""
    api = ctx.trace.api_calls
    s = api["stack_id"].to_numpy(np.int64)
    row = first_match(np.where(s >= 0, api["correlation_id"].to_numpy(np.int64), -1), corr)  # calls with stacks
    return np.where(row >= 0, s[np.clip(row, 0, None)] if len(s) else -1, -1)


def measure(ctx: AnalysisContext, gaps: pd.DataFrame, cause: np.ndarray, causes: tuple[str, ...],
            call_causes: dict[str, str]) -> pd.DataFrame | None:
    """One row per (gap, charged stack): gap index, stack, its user stack and callee, kind (sync / module /
    launch / host), ns charged. ``call_causes``: cause -> regex of the API calls whose stack explains a
    gap of that cause (host_sync: the syncs; module_load: the module loads). Sources, first that applies:
    Python samples; the stack of the sync / module-load call; the launch that ended a launch-bound gap;
    what the host thread ran (traced calls or CPU samples); the launch that ended the gap."""
    info = _stack_info(ctx)
    if info is None or not len(gaps):
        return None
    sf, fr = info
    dur = gaps["g1"].to_numpy(np.int64) - gaps["g0"].to_numpy(np.int64)
    fixable = cause != causes.index("gpu_side")
    sampled, covered = _from_python_samples(ctx, gaps, fixable, cause, causes, call_causes)
    fixable = fixable & ~covered  # the rest: from the stacks of API calls and traced calls, as below
    stack, kind = _from_call_stacks(ctx, gaps, fixable, cause, causes, call_causes)
    nxt_stack = _api_stack(ctx, _next_launch_correlation(ctx, gaps))
    lb = fixable & (kind < 0) & (cause == causes.index("launch_bound")) & (nxt_stack >= 0)
    stack[lb], kind[lb] = nxt_stack[lb], KINDS.index("launch")
    parts = [sampled, pd.DataFrame({"gap": np.flatnonzero(kind >= 0), "stack": stack[kind >= 0],
                                    "kind": kind[kind >= 0], "ns": dur[kind >= 0].astype(np.float64)})]
    rest = np.flatnonzero(fixable & (kind < 0))
    hosted = _from_host_stacks(ctx, sf, gaps, rest)
    if hosted is not None:
        parts.append(hosted)
        rest = np.setdiff1d(rest, hosted["gap"].to_numpy(np.int64))
    # no host stacks for a gap: the launch that ended it
    fallback = rest[nxt_stack[rest] >= 0]
    parts.append(pd.DataFrame({"gap": fallback, "stack": nxt_stack[fallback], "kind": KINDS.index("host"),
                               "ns": dur[fallback].astype(np.float64)}))
    out = pd.concat(parts, ignore_index=True)
    stk = out["stack"].to_numpy(np.int64)
    user = sf["user_stack"].to_numpy()[stk]
    if (user < 0).any():  # native-only stacks (nsys backtraces): the innermost frame above CUDA and the profiler
        uniq, inv = np.unique(stk[user < 0], return_inverse=True)
        user[user < 0] = np.array([_native_anchor(sf, fr, int(u)) for u in uniq], dtype=np.int64)[inv.ravel()]
    out["user_stack"] = user
    out["callee_stack"] = sf["callee_stack"].to_numpy()[stk]
    return out


def _from_call_stacks(ctx: AnalysisContext, gaps: pd.DataFrame, fixable: np.ndarray, cause: np.ndarray,
                      causes: tuple[str, ...], call_causes: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """host_sync / module_load gaps: the stack of the last such call starting before the gap ends, when it
    overlaps the gap. Returns (stack, kind) per gap, -1 where none."""
    g0, g1 = gaps["g0"].to_numpy(np.int64), gaps["g1"].to_numpy(np.int64)
    stack = np.full(len(gaps), -1, np.int64)
    kind = np.full(len(gaps), -1, np.int64)
    for c, pattern in call_causes.items():
        found = _overlapping_call(ctx, pattern, g0, g1, with_stack=True)
        if found is None:
            continue
        calls, jj, overlaps = found
        hit = fixable & (kind < 0) & (cause == causes.index(c)) & overlaps
        stack[hit], kind[hit] = calls["stack"][jj][hit], KINDS.index("sync" if c == "host_sync" else "module")
    return stack, kind


def _overlapping_call(ctx, pattern: str, g0: np.ndarray, g1: np.ndarray, with_stack: bool):
    """The API calls named like ``pattern`` (with a stack only, if asked) in start order, and per gap the
    last one starting before the gap ends and whether it overlaps the gap; None when there are none."""
    api = ctx.api_calls
    keep = ctx.name_mask(pattern, api, "name")
    if with_stack:
        keep = keep & (api["stack_id"].to_numpy() >= 0)
    calls = api[keep]
    if calls.empty:
        return None
    s0 = calls["start_ns"].to_numpy(np.int64)
    order = np.argsort(s0, kind="stable")
    out = {"start": s0[order], "end": calls["end_ns"].to_numpy(np.int64)[order],
           "stack": calls["stack_id"].to_numpy(np.int64)[order]}
    j = np.searchsorted(out["start"], g1, side="left") - 1
    jj = np.clip(j, 0, None)
    return out, jj, (j >= 0) & (out["end"][jj] > g0)


def _next_launch_correlation(ctx: AnalysisContext, gaps: pd.DataFrame) -> np.ndarray:
    """Correlation id of the kernel or memop that ended each gap, -1 where none."""
    out = np.full(len(gaps), -1, np.int64)
    has_next = gaps["next_row"].to_numpy(np.int64) >= 0
    if has_next.any():
        is_k = gaps["next_is_kernel"].to_numpy(bool)
        rows = gaps["next_row"].to_numpy(np.int64)
        kc = ctx.kernels["correlation_id"].to_numpy(np.int64)
        mc = ctx.memops["correlation_id"].to_numpy(np.int64)
        out = np.where(has_next & is_k, kc[np.clip(rows, 0, max(len(kc) - 1, 0))] if len(kc) else -1,
                       np.where(has_next, mc[np.clip(rows, 0, max(len(mc) - 1, 0))] if len(mc) else -1, -1))
    return out


def _from_host_stacks(ctx: AnalysisContext, sf: pd.DataFrame, gaps: pd.DataFrame,
                      rest: np.ndarray) -> pd.DataFrame | None:
    """Gaps ``rest``: what the host thread was running during them, from torch.profiler's traced calls or
    nsys's CPU samples (not the Python samples, used before). None when the trace has neither."""
    g0, g1 = gaps["g0"].to_numpy(np.int64), gaps["g1"].to_numpy(np.int64)
    dur = g1 - g0
    hs = ctx.trace.host_stacks
    hs = hs[~equals(hs["source"], "python_sample")]
    la = ctx.launches()
    launched = la[la["launched"]]
    if not (len(rest) and len(hs) and len(launched)):
        return None
    # the thread with Python stacks that launches the most GPU work (backward launches from the autograd
    # thread, which has no Python stack: sampling it would say nothing)
    py_threads = hs["thread_id"].unique()
    launching = launched.loc[launched["thread_id"].isin(py_threads), "thread_id"]
    thread = int(launching.mode().iloc[0]) if len(launching) else int(py_threads[0])
    mine = hs[hs["thread_id"].to_numpy() == thread]
    calls = mine["end_ns"].to_numpy(np.int64) > mine["start_ns"].to_numpy(np.int64)
    if calls.any():  # nested calls (torch.profiler): what ran at evenly spaced times of the gap
        k = max(int(ctx.config.section(ID)["frame_samples_per_gap"]), 1)
        frac = (np.arange(k) + 0.5) / k
        t = (g0[rest, None] + dur[rest, None] * frac[None, :]).astype(np.int64).ravel()
        sampled = innermost_at(mine[calls], sf["depth"].to_numpy(np.int64), thread, t)
        gap_of = np.repeat(rest, k)
        weight = np.full(len(t), 1.0 / k)
    else:  # samples (nsys): the samples taken inside the gap share it
        ts = mine["start_ns"].to_numpy(np.int64)
        order = np.argsort(ts, kind="stable")
        lo, hi = np.searchsorted(ts[order], g0[rest]), np.searchsorted(ts[order], g1[rest])
        n = hi - lo
        gap_of = np.repeat(rest, n)
        idx = order[np.repeat(lo, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))]
        sampled = mine["stack_id"].to_numpy(np.int64)[idx]
        weight = 1.0 / np.repeat(np.maximum(n, 1), n)
    ok = sampled >= 0
    return pd.DataFrame({"gap": gap_of[ok], "stack": sampled[ok], "kind": KINDS.index("host"),
                         "ns": (dur[gap_of[ok]] * weight[ok]).astype(np.float64)})


CAUSE_KIND = {"host_sync": "sync", "module_load": "module", "launch_bound": "launch"}
SMALL_KERNEL_NS = 20_000  # a pass whose median kernel is shorter is bound by launching them
# library calls that run a model's forward / backward pass: a line calling them launches the pass's kernels
MODEL_PASS = {"backward": "backward", "_wrapped_call_impl": "forward", "_call_impl": "forward"}


def _from_python_samples(ctx, gaps: pd.DataFrame, fixable: np.ndarray, cause: np.ndarray,
                         causes: tuple[str, ...], call_causes: dict[str, str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Charge gaps from the agent's Python stack samples.

    A host_sync / module_load gap goes whole to the line that made the call: the sync drained the queue,
    so the gap is its cost whatever the host did next. That line is the sample taken as the call
    returned (a timer signal that arrives during a blocking call is handled right after it, in the
    calling frame). Any other gap (and such a gap whose call no sample caught) is split among the
    samples whose spans overlap it (``_sample_spans``) in proportion to the overlap, so its charges add
    up to the gap; the kind follows the gap's cause. Gaps outside the sampled span are left to the other
    sources."""
    covered = np.zeros(len(gaps), bool)
    empty = pd.DataFrame({"gap": np.zeros(0, np.int64), "stack": np.zeros(0, np.int64),
                          "kind": np.zeros(0, np.int64), "ns": np.zeros(0)})
    ts, st = _python_samples(ctx)
    if len(ts) < 2:
        return empty, covered
    lo, hi = _sample_spans(ctx)
    g0, g1 = gaps["g0"].to_numpy(np.int64), gaps["g1"].to_numpy(np.int64)
    covered = fixable & _sampled_span(lo, hi, g0, g1)
    gap_of, sample, ns = _samples_in_intervals(lo, hi, g0, g1, np.flatnonzero(covered))
    kind_of_cause = np.array([KINDS.index(CAUSE_KIND.get(c, "host")) for c in causes], dtype=np.int64)
    by_call = _caller_samples(ctx, gaps, covered, cause, causes, call_causes, ts, st)
    keep = by_call[gap_of] < 0
    out = pd.DataFrame({"gap": gap_of[keep], "stack": st[sample][keep], "kind": kind_of_cause[cause[gap_of[keep]]],
                        "ns": ns[keep].astype(np.float64)})
    whole = np.flatnonzero(by_call >= 0)
    out = pd.concat([out, pd.DataFrame({"gap": whole, "stack": by_call[whole], "kind": kind_of_cause[cause[whole]],
                                        "ns": (g1 - g0)[whole].astype(np.float64)})], ignore_index=True)
    return out[out["ns"] > 0], covered


BLOCKED_INTERVAL = 1.5  # an interval this many times the median one held a blocking call


def _sample_spans(ctx) -> tuple[np.ndarray, np.ndarray]:
    """Per Python sample (time order): the span of main-thread time it stands for, [lo, hi); the spans
    tile the sampled time. A sample shows the line running at its instant, and the line changes at an
    unknown moment between two samples, so an interval is split at its middle: a line that starts or
    ends between samples is credited as much at one end as it loses at the other. Blocking calls move
    the split: the timer's signal waits until the call returns and is handled then, in the calling line.
    So a long interval is the call's from half a period after its first sample on (the call began less
    than a period after that sample, or another sample would have come first), and the interval after
    a sample taken as a call returned goes whole to the next sample (what follows the return is the
    next line's). With the plain "since the last sample" spans, a line between two blocking calls
    (``.item()``, bookkeeping, ``loss.backward()``) lost half a period per step: 16% of 2.6 ms."""
    def compute() -> tuple[np.ndarray, np.ndarray]:
        ts, _ = _python_samples(ctx)
        if len(ts) < 2:
            return ts.copy(), ts.copy()
        d = np.diff(ts)
        period = int(np.median(d))
        blocked = d > BLOCKED_INTERVAL * period
        after_return = np.r_[False, blocked[:-1]]
        cut = np.where(after_return, ts[:-1], ts[:-1] + np.where(blocked, period // 2, d // 2))
        return np.r_[ts[0], cut], np.r_[cut, ts[-1]]
    return ctx.cached("source_lines.sample_spans", compute)


def _sampled_span(lo: np.ndarray, hi: np.ndarray, g0: np.ndarray, g1: np.ndarray) -> np.ndarray:
    """Per interval: whether it lies inside the sampled time (so its time is all accounted for)."""
    return (g0 >= lo[0]) & (g1 <= hi[-1]) & (g1 > g0)


def _samples_in_intervals(lo: np.ndarray, hi: np.ndarray, g0: np.ndarray, g1: np.ndarray,
                          idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The samples whose spans overlap intervals ``idx`` (each inside the sampled time): (interval,
    sample, overlapping ns) per pair."""
    first = np.searchsorted(hi, g0[idx], side="right")  # the first span that ends after the start
    last = np.searchsorted(lo, g1[idx], side="left") - 1  # the last span that starts before the end
    n = np.maximum(last - first + 1, 0)
    of = np.repeat(idx, n)
    sample = np.repeat(first, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    ns = np.minimum(hi[sample], g1[of]) - np.maximum(lo[sample], g0[of])
    return of, sample, ns


CALL_RETURN_SLACK_NS = 200_000  # a sample this soon after a call returned was taken in the calling frame


def _caller_samples(ctx, gaps: pd.DataFrame, covered: np.ndarray, cause: np.ndarray, causes: tuple[str, ...],
                    call_causes: dict[str, str], ts: np.ndarray, st: np.ndarray) -> np.ndarray:
    """Per gap: the sampled stack of the host_sync / module_load call that overlaps it, -1 when none."""
    out = np.full(len(gaps), -1, np.int64)
    g0, g1 = gaps["g0"].to_numpy(np.int64), gaps["g1"].to_numpy(np.int64)
    for c, pattern in call_causes.items():
        mine = covered & (cause == causes.index(c))
        found = _overlapping_call(ctx, pattern, g0, g1, with_stack=False) if mine.any() else None
        if found is None:
            continue
        calls, jj, overlaps = found
        s0, s1 = calls["start"], calls["end"]
        hit = mine & overlaps
        k = np.searchsorted(ts, s0[jj], side="left")  # the first sample from the call's start on
        kk = np.clip(k, 0, len(ts) - 1)
        ok = hit & (k < len(ts)) & (ts[kk] <= s1[jj] + CALL_RETURN_SLACK_NS)
        out[ok] = st[kk[ok]]
    return out


_NOT_ANCHOR = re.compile(r"libcuda\.so|libcudart|libcupti|libToolsInjection|\[vdso\]|libc\.so|^\[")


def _native_anchor(sf: pd.DataFrame, fr: pd.DataFrame, stack: int) -> int:
    """For a stack of native frames only: the innermost frame that is neither the CUDA driver / runtime,
    the profiler's injection, libc nor an unresolved address (``at::native::item``...), or -1."""
    files, funcs = fr["file"].to_numpy(dtype=object), fr["function"].to_numpy(dtype=object)
    fid, parent = sf["frame_id"].to_numpy(), sf["parent_id"].to_numpy()
    s = stack
    while s >= 0:  # one stack, leaf to root
        f = fid[s]
        if not _NOT_ANCHOR.search(files[f]) and not funcs[f].startswith("0x"):
            return s
        s = int(parent[s])
    return -1


def _traced_calls_per_gap(ctx, gaps: pd.DataFrame) -> np.ndarray:
    """Python calls that torch.profiler's tracer recorded inside each gap (0 without traced calls)."""
    hs = ctx.trace.host_stacks
    hs = hs[hs["end_ns"].to_numpy() > hs["start_ns"].to_numpy()]
    if hs.empty:
        return np.zeros(len(gaps))
    t = np.sort(hs["start_ns"].to_numpy(np.int64))
    return (np.searchsorted(t, gaps["g1"].to_numpy(np.int64)) - np.searchsorted(t, gaps["g0"].to_numpy(np.int64))).astype(float)


def _callee(sf: pd.DataFrame, fr: pd.DataFrame, rows: pd.DataFrame) -> str:
    """The library function the user frame was in: the innermost native call of the charged stacks
    (``Tensor.item``, ``conv2d``), else the library frame the user frame called."""
    native = fr["file"].to_numpy(dtype=object) == ""
    fid = sf["frame_id"].to_numpy()
    by_stack = rows.groupby("stack")["ns"].sum()
    names: dict[str, float] = {}
    parent = sf["parent_id"].to_numpy()
    for stack, ns in by_stack.items():  # distinct stacks of one frame: a handful
        s, user = int(stack), int(sf["user_stack"].iat[int(stack)])
        while s >= 0 and s != user and not (native[fid[s]] and not fr["function"].iat[fid[s]].startswith("nn.Module")):
            s = int(parent[s])
        if s < 0 or s == user:
            s = int(sf["callee_stack"].iat[int(stack)])
        if s >= 0:
            name = str(fr["function"].iat[fid[s]])
            names[name] = names.get(name, 0.0) + ns
    return max(names, key=names.get) if names else ""


def _native_context_per_gap(ctx, sf: pd.DataFrame, fr: pd.DataFrame, gaps: pd.DataFrame) -> np.ndarray:
    """Per gap, what native CPU samples (nsys) taken inside it show the process doing (cuDNN planning,
    runtime compilation...), "" when nothing: Python samples name the line, native ones name the work
    under it."""
    out = np.full(len(gaps), "", dtype=object)
    hs = ctx.trace.host_stacks
    ns = hs[equals(hs["source"], "nsys_cpu_sample")]
    if ns.empty or not len(gaps):
        return out
    stacks = ns["stack_id"].to_numpy(np.int64)
    uniq, inv = np.unique(stacks[stacks >= 0], return_inverse=True)
    ctx_of = np.array([_context(*_ancestors(sf, fr, int(s))) for s in uniq], dtype=object)  # distinct stacks
    t = ns["start_ns"].to_numpy(np.int64)[stacks >= 0]
    c = ctx_of[inv.ravel()]
    t, c = t[c != ""], c[c != ""]
    return _label_gaps(gaps, t, c)


def _label_gaps(gaps: pd.DataFrame, t: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per gap, the label of the first of the events at times ``t`` that fall inside it ("" for none)."""
    out = np.full(len(gaps), "", dtype=object)
    g0, g1 = gaps["g0"].to_numpy(np.int64), gaps["g1"].to_numpy(np.int64)
    order = np.argsort(g0, kind="stable")
    j = np.searchsorted(g0[order], t, side="right") - 1
    jj = order[np.clip(j, 0, None)]
    inside = (j >= 0) & (t < g1[jj])
    for gap, name in zip(jj[inside], label[inside]):  # events with a label: a few per gap at most
        out[gap] = out[gap] or name
    return out


def _compile_marks_per_gap(ctx, gaps: pd.DataFrame) -> np.ndarray:
    """Per gap, "compile" when Dynamo / Inductor mark a compile inside it: torch.profiler records their
    phases as ranges whose text holds ``compile_id=``, on whichever thread compiles. A backward graph
    compiles lazily on autograd's thread while the main thread waits in ``loss.backward()``, where its
    Python samples show nothing but the wait."""
    r = ctx.trace.ranges
    if r.empty or not len(gaps):
        return np.full(len(gaps), "", dtype=object)
    mark = per_value(r["text"], lambda v: "compile_id=" in v, dtype=bool, missing=False)
    t = r.loc[mark, "start_ns"].to_numpy(np.int64)
    return _label_gaps(gaps, t, np.full(len(t), "compile", dtype=object))


_SEARCH_SYNCS = ("cudaEventSynchronize", "cudaDeviceSynchronize", "cuEventSynchronize", "cuCtxSynchronize")
_CONV_OPS = re.compile(r"^aten::(_?convolution|cudnn_convolution)")


def cudnn_search_gaps(ctx, gaps: pd.DataFrame) -> np.ndarray:
    """Per gap: does it lie inside a convolution op that waits on the GPU (cuDNN's algorithm search)."""
    return _api_context_per_gap(ctx, gaps) == "cudnn_benchmark"


def _api_context_per_gap(ctx, gaps: pd.DataFrame) -> np.ndarray:
    """Per gap, "cudnn_benchmark" when it lies inside a convolution op that waits for the GPU: cuDNN's
    algorithm search (torch.backends.cudnn.benchmark, a shape not seen before) times each candidate kernel
    with events and synchronizes; a convolution has no other reason to. What torch.profiler traces show
    of it, where nsys's native samples name ``cudnnFind`` itself. Once per gap table (gpu_idle's measure
    and its frames both ask)."""
    return ctx.cached(("source_lines.api_context", id(gaps)), lambda: _search_context(ctx, gaps))


def _search_context(ctx, gaps: pd.DataFrame) -> np.ndarray:
    out = np.full(len(gaps), "", dtype=object)
    ops, api = ctx.trace.cpu_ops, ctx.trace.api_calls
    if ops.empty or api.empty or not len(gaps):
        return out
    conv = ops[per_value(ops["name"], lambda v: bool(_CONV_OPS.match(v)), dtype=bool, missing=False)]
    if conv.empty:  # most traces: decided on the distinct names, no row touched
        return out
    syncs = api[isin(api["name"], _SEARCH_SYNCS)]
    if syncs.empty:
        return out
    conv = conv.sort_values("start_ns", kind="stable")
    c0, c1 = conv["start_ns"].to_numpy(np.int64), conv["end_ns"].to_numpy(np.int64)
    waits = np.zeros(len(conv), dtype=bool)
    conv_thread, sync_thread = conv["thread_id"].to_numpy(), syncs["thread_id"].to_numpy()
    for thread in np.unique(conv_thread):  # an op waits when a sync of its own thread falls inside it
        t = np.sort(syncs["start_ns"].to_numpy(np.int64)[sync_thread == thread])
        mine = conv_thread == thread
        waits[mine] = np.searchsorted(t, c1[mine]) > np.searchsorted(t, c0[mine])
    if not waits.any():
        return out
    s, e = c0[waits], c1[waits]  # nested ops: any searching op that holds the gap's middle
    mid = (gaps["g0"].to_numpy(np.int64) + gaps["g1"].to_numpy(np.int64)) // 2
    k = np.searchsorted(s, mid, side="right") - 1
    reach = np.maximum.accumulate(e)
    out[(k >= 0) & (mid < reach[np.clip(k, 0, None)])] = "cudnn_benchmark"
    return out


def _syncs_unwound(ctx) -> bool:
    """An Nsight Systems report taken with CUDA backtraces on syncs (``--cudabacktrace=sync``): its sync
    calls carry stacks. nsys unwinds the stack as each sync returns, so the host reaches its next launch
    later and every gap after a sync grows (the .item() culprit: charged 2.66 ms against a 1.55 ms cost)."""
    fmt = set(ctx.trace.ranks["source_format"].astype(str)) if len(ctx.trace.ranks) else set()
    api = ctx.trace.api_calls
    if not fmt & {"nsys_sqlite", "nsys_rep"} or api.empty:
        return False
    syncs = per_value(api["name"], lambda v: "Synchronize" in v, dtype=bool, missing=False)
    return bool((api["stack_id"].to_numpy()[syncs] >= 0).any())


def _weighted_context(native: np.ndarray, gap_ns: pd.Series) -> str:
    """The native context that holds most of a frame's charged gap time, "" when none."""
    names = pd.Series(native[gap_ns.index.to_numpy()], index=gap_ns.index)
    by = gap_ns[names != ""].groupby(names[names != ""]).sum()
    return str(by.idxmax()) if len(by) else ""


def _frame_text(fr: pd.DataFrame, frame_id: int) -> tuple[str, int, str]:
    r = fr.iloc[int(frame_id)]
    return str(r["file"]), int(r["line"]), str(r["function"])


def _ancestors(sf: pd.DataFrame, fr: pd.DataFrame, stack: int) -> tuple[list[str], list[str]]:
    """Files and functions of a stack, innermost first."""
    files, funcs = fr["file"].to_numpy(dtype=object), fr["function"].to_numpy(dtype=object)
    out, fn = [], []
    parent, fid = sf["parent_id"].to_numpy(), sf["frame_id"].to_numpy()
    while stack >= 0:  # one stack: at most a few hundred frames
        out.append(files[fid[stack]])
        fn.append(funcs[fid[stack]])
        stack = int(parent[stack])
    return out, fn


def _context(files: list[str], functions: list[str] = ()) -> str:
    if any(("time_sorted_plan" in f or "cudnnFind" in f) for f in functions):
        return "cudnn_benchmark"
    if any(_JIT.match(f) for f in functions):
        return "jit"
    if any(any(p in f for p in _AUTOTUNE) for f in files):
        return "autotune"
    if any(any(p in f for p in _COMPILE) for f in files):
        return "compile"
    if any(any(p in f for p in _DATALOADER) for f in files):
        return "dataloader_main_process"
    return ""


def frames_table(ctx: AnalysisContext, charged: pd.DataFrame, gaps: pd.DataFrame, sync_pattern: str) -> list[dict]:
    """The user frames ranked by the GPU idle time charged to them, with per-step costs and their gaps
    (``sync_pattern``: the API calls in which the host waits for the GPU)."""
    sf, fr = _stack_info(ctx)
    cfg = ctx.config.section(ID)
    c = charged[charged["user_stack"] >= 0]
    if c.empty:
        return []
    c = c.assign(frame=sf["frame_id"].to_numpy()[c["user_stack"].to_numpy(np.int64)])
    n_steps = max(len(ctx.window.steady), 1)
    step_ns = ctx.window_ns / n_steps
    total = c.groupby("frame")["ns"].sum().sort_values(ascending=False)
    total = total[total >= float(cfg["min_frame_fraction"]) * ctx.window_ns].head(int(cfg["max_frames"]))
    k = ctx.kernels
    stack_pos, stack_ids = pd.factorize(c["stack"].to_numpy(np.int64))  # a few hundred distinct stacks
    calls_in_gap = _traced_calls_per_gap(ctx, gaps)
    native = _native_context_per_gap(ctx, sf, fr, gaps)
    native = np.where(native == "", _compile_marks_per_gap(ctx, gaps), native)
    unwound = _syncs_unwound(ctx)
    slowdown = _profiled_step_slowdown(ctx, step_ns)
    from_syncs = (native == "") & (_api_context_per_gap(ctx, gaps) != "")
    native = np.where(from_syncs, "cudnn_benchmark", native)
    c = c.assign(traced=calls_in_gap[c["gap"].to_numpy()] * c["ns"].to_numpy()
                 / np.maximum(gaps["dur_ns"].to_numpy(np.float64)[c["gap"].to_numpy()], 1.0))
    out = []
    for frame_id, ns in total.items():  # a handful of frames
        rows = c[c["frame"] == frame_id]
        by_kind = rows.groupby("kind")["ns"].sum()
        kind = KINDS[int(by_kind.idxmax())]
        callee_fn = _callee(sf, fr, rows)
        top_stack = int(rows.groupby("stack")["ns"].sum().idxmax())
        file, line, function = _frame_text(fr, frame_id)
        gap_ns = rows.groupby("gap")["ns"].sum().sort_values(ascending=False)
        g = gaps.iloc[gap_ns.index[: int(cfg["max_frame_gaps"])]]
        entry = {
            "file": file, "line": line, "function": function, "callee": callee_fn, "kind": kind,
            "context": _context(*_ancestors(sf, fr, top_stack)) or _weighted_context(native, gap_ns),
            "idle_ns": int(round(ns)), "idle_ns_per_step": int(round(ns / n_steps)),
            "step_fraction": round(ns / n_steps / step_ns, 4) if step_ns > 0 else 0.0,
            "idle_by_kind_ns": {KINDS[int(i)]: int(round(v)) for i, v in by_kind.items()},
            "gap_count": int(len(gap_ns)),
            "traced_python_calls_per_step": int(round(rows["traced"].sum() / n_steps)),
            "gaps": [{"start_us": ctx.rel_us(a), "dur_us": round(int(b - a) / 1e3, 1)}
                     for a, b in zip(g["g0"].to_numpy(np.int64), g["g1"].to_numpy(np.int64))],
        }
        if entry["context"] == "cudnn_benchmark":  # what showed it: nsys's CPU samples or the ops' syncs
            by_src = gap_ns.groupby(from_syncs[gap_ns.index.to_numpy()]).sum()
            entry["context_evidence"] = "cuda_syncs_in_convolutions" if by_src.get(True, 0) > by_src.get(False, 0) \
                else "cpu_samples"
        if kind == "sync" and unwound:
            entry["sync_backtraces"] = True
        if kind == "sync":
            entry.update(_host_after_sync(ctx, sf, fr, frame_id, gaps.iloc[gap_ns.index], n_steps))
            if entry["context"] in _BUILDING:  # the wait is part of building code: its gaps go with the rebuilds
                entry["saving_ns_per_step"] = entry["idle_ns_per_step"]
            else:
                slack = _step_slack_ns(ctx, sync_pattern, n_steps)
                entry.update(step_slack_ns_per_step=slack, saving_ns_per_step=min(entry["idle_ns_per_step"], slack))
        if kind == "launch" or callee_fn in MODEL_PASS:
            entry.update(_launch_stats(ctx, sf, frame_id, n_steps, k))
            entry.update(_unprofiled_launch_cost(ctx.trace.meta, entry))
            if kind == "launch" and slowdown:
                entry["profiled_step_slowdown"] = slowdown
        if entry["context"] == "dataloader_main_process":  # all the loader's main-process work, not only this frame
            in_loader = np.array([_context(*_ancestors(sf, fr, int(x))) == entry["context"] for x in stack_ids])
            entry["dataloader_idle_ns_per_step"] = int(round(c.loc[in_loader[stack_pos], "ns"].sum() / n_steps))
        if kind == "host" and callee_fn not in MODEL_PASS:
            entry.update(_host_saving(ctx, sf, fr, frame_id, entry, gaps, n_steps))
        out.append(entry)
    return _rank_frames(out)


def _rank_frames(frames: list[dict]) -> list[dict]:
    """Costliest first. The DataLoader's main-process work spreads over the lines of ``__getitem__``, its
    transforms and collate, none of which need cost the most alone: its lines rank by the loader's total
    (``dataloader_idle_ns_per_step``), each after the other by its own idle."""
    def cost(f: dict) -> tuple[int, int]:
        return f.get("dataloader_idle_ns_per_step", f["idle_ns_per_step"]), f["idle_ns_per_step"]
    return sorted(frames, key=cost, reverse=True)


def _host_after_sync(ctx, sf: pd.DataFrame, fr: pd.DataFrame, frame_id: int, gaps: pd.DataFrame,
                     n_steps: int) -> dict:
    """What the host did while the GPU idled after a sync, from the Python samples in its gaps: the user
    line that took most of that time, and the host work per step in those gaps outside the sync's own
    line and the model's passes (the work that overlaps the GPU once the sync is gone)."""
    ts, st = _python_samples(ctx)
    if len(ts) < 2 or gaps.empty:
        return {}
    lo, hi = _sample_spans(ctx)
    g0, g1 = gaps["g0"].to_numpy(np.int64), gaps["g1"].to_numpy(np.int64)
    _, sample, ns = _samples_in_intervals(lo, hi, g0, g1, np.flatnonzero(_sampled_span(lo, hi, g0, g1)))
    frame = _user_frame(sf, st[sample])
    keep = (frame >= 0) & (frame != frame_id) & ~_in_model_pass(sf, fr, st[sample])
    if not keep.any():
        return {}
    by_frame = pd.Series(ns[keep].astype(np.float64)).groupby(frame[keep]).sum().sort_values(ascending=False)
    file, line, function = _frame_text(fr, int(by_frame.index[0]))
    host_ns = by_frame.sum() / n_steps
    return {"host_after_sync": {"file": file, "line": line, "function": function,
                                "ns_per_step": int(round(by_frame.iat[0] / n_steps))},
            "host_after_sync_ns_per_step": int(round(host_ns))}


def _step_slack_ns(ctx, sync_pattern: str, n_steps: int) -> int:
    """How much shorter the steady step can get at all, per step: what bounds a sync line's saving (its
    GPU idle). Without any wait the step still takes the longer of the GPU's work and the host's own work
    (its steps' host time outside the calls that wait for the GPU). Without the sync the host runs ahead
    and its work, and the launches after it, overlap the GPU's queue; where the host's own work is the
    longer, only the difference comes back. Once per window, whatever the number of sync lines."""
    def compute() -> int:
        start, end = ctx.window.host_span
        api = ctx.trace.api_calls
        s, e = api["start_ns"].to_numpy(np.int64), api["end_ns"].to_numpy(np.int64)
        waits = ctx.name_mask(sync_pattern, api, "name") & (e > start) & (s < end)
        host_own = (end - start - union_ns(s[waits], e[waits], start, end)) / n_steps
        return int(round(max(ctx.window_ns / n_steps - max(host_own, ctx.busy_ns() / n_steps), 0.0)))
    return ctx.cached(("source_lines.step_slack", sync_pattern), compute)


def _in_model_pass(sf: pd.DataFrame, fr: pd.DataFrame, stacks: np.ndarray) -> np.ndarray:
    """Per stack: whether its user frame called the model's forward or backward (the pass's launches)."""
    callee = np.where(stacks >= 0, sf["callee_stack"].to_numpy()[np.clip(stacks, 0, None)], -1)
    name = fr["function"].to_numpy(dtype=object)[sf["frame_id"].to_numpy()[np.clip(callee, 0, None)]]
    return (callee >= 0) & np.isin(name.astype(str), list(MODEL_PASS))


def _host_saving(ctx, sf: pd.DataFrame, fr: pd.DataFrame, frame_id: int, entry: dict, gaps: pd.DataFrame,
                 n_steps: int) -> dict:
    """What taking a host line out of the loop would save, from the Python samples. Its idle share
    understates that when the step is host-bound: the GPU runs work queued earlier while the line runs,
    and every millisecond of the line still delays the next launches. So: the main thread's sampled time
    in the line per step (the DataLoader's, for its main-process work), capped by the step's GPU idle
    (what any host work can cost the GPU at most)."""
    host = _sampled_ns_per_frame(ctx, sf)
    if host is None:
        return {}
    idle_per_step = float(gaps["dur_ns"].sum()) / n_steps
    if entry["context"] == "dataloader_main_process":
        stacks = _sampled_stacks_in_window(ctx)
        mine = np.array([_context(*_ancestors(sf, fr, int(x))) == entry["context"] for x in stacks[0]], bool)
        ns = float(stacks[1][mine].sum()) / n_steps
        return {"dataloader_host_ns_per_step": int(round(ns)), "saving_ns_per_step": int(round(min(ns, idle_per_step)))}
    ns = host.get(frame_id, 0.0) / n_steps
    return {"host_ns_per_step": int(round(ns)), "saving_ns_per_step": int(round(min(ns, idle_per_step)))}


def _sampled_stacks_in_window(ctx) -> tuple[np.ndarray, np.ndarray]:
    """The distinct sampled stacks of the steady steps and the main thread's time in each (``_sample_spans``),
    over the steps' span on the host's clock (``StepWindow.host_span``)."""
    def compute() -> tuple[np.ndarray, np.ndarray]:
        ts, st = _python_samples(ctx)
        if len(ts) < 2:
            return np.zeros(0, np.int64), np.zeros(0)
        lo, hi = _sample_spans(ctx)
        start, end = ctx.window.host_span
        dt = (np.minimum(hi, end) - np.maximum(lo, start)).astype(np.float64)
        keep = dt > 0
        dt = dt[keep]
        uniq, inv = np.unique(st[keep], return_inverse=True)
        return uniq, np.bincount(inv.ravel(), weights=dt, minlength=len(uniq))
    return ctx.cached("source_lines.sampled_stacks", compute)


def _sampled_ns_per_frame(ctx, sf: pd.DataFrame) -> dict[int, float] | None:
    """The main thread's sampled time in the window per user frame (the innermost frame of the user's
    code on the stack), None without Python samples."""
    stacks, ns = _sampled_stacks_in_window(ctx)
    if not len(stacks):
        return None
    return pd.Series(ns).groupby(_user_frame(sf, stacks)).sum().to_dict()


def _user_frame(sf: pd.DataFrame, stacks: np.ndarray) -> np.ndarray:
    """The innermost user frame of each stack id (-1 for an unknown stack or one without user code)."""
    user = np.where(stacks >= 0, sf["user_stack"].to_numpy()[np.clip(stacks, 0, None)], -1)
    return np.where(user >= 0, sf["frame_id"].to_numpy()[np.clip(user, 0, None)], -1)


def _kernel_frames(ctx, sf: pd.DataFrame, k: pd.DataFrame) -> np.ndarray:
    """The user frame that launched each steady kernel (-1 when unknown), once per analysis."""
    def compute() -> np.ndarray:
        stack = _api_stack(ctx, k["correlation_id"].to_numpy(np.int64))
        return _user_frame(sf, np.where(stack >= 0, stack, _sampled_launch_stack(ctx, len(k))))
    return ctx.cached("source_lines.kernel_frames", compute)


def _launch_stats(ctx, sf: pd.DataFrame, frame_id: int, n_steps: int, k: pd.DataFrame) -> dict:
    """Kernels per step launched from this frame and their median duration."""
    mine = _kernel_frames(ctx, sf, k) == frame_id
    d = k["dur_ns"].to_numpy(np.int64)[mine]
    return {"kernels_per_step": round(int(mine.sum()) / n_steps, 1),
            "median_kernel_ns": int(np.median(d)) if len(d) else None}


def _profiled_step_slowdown(ctx, step_ns: float) -> float | None:
    """The window's mean step over the step the collector timed before the profiler started
    (``unprofiled_step_ms``), when the profiler made it at least 20% slower: a launch-bound line's gaps grow
    with every launch the profiler slows."""
    before_ms = measured_fact(ctx.trace.meta, "unprofiled_step_ms")
    if not before_ms or step_ns <= 0:
        return None
    ratio = step_ns / 1e6 / before_ms
    return round(ratio, 2) if ratio >= 1.2 else None


def _unprofiled_launch_cost(meta: dict, entry: dict) -> dict:
    """A profiler makes every launch slower, and a launch-bound frame's gaps grow with it. A launch was timed
    on this host with no profiler running (``unprofiled_launch_ns``: by the agent before the window, or,
    under nsys, whose injection slows launches all along, by a bare process before nsys started): the
    frame's launches at that cost bound what its gaps cost the program unprofiled."""
    launch_ns = measured_fact(meta, "unprofiled_launch_ns")
    n = entry.get("kernels_per_step")
    if not launch_ns or not n:
        return {}
    return {"unprofiled_launch_ns": int(launch_ns),
            "unprofiled_launch_timed": "bare_process" if meta.get("unprofiled_launch_timed") == "bare_process"
            else "before_window",
            "unprofiled_idle_ns_per_step": int(min(entry["idle_ns_per_step"], n * launch_ns))}


def _python_samples(ctx: AnalysisContext) -> tuple[np.ndarray, np.ndarray]:
    """The agent's Python samples in time order: (times, stack ids), sorted once per context."""
    def compute() -> tuple[np.ndarray, np.ndarray]:
        hs = ctx.trace.host_stacks
        ps = hs[equals(hs["source"], "python_sample")]
        order = np.argsort(ps["start_ns"].to_numpy(np.int64), kind="stable")
        return ps["start_ns"].to_numpy(np.int64)[order], ps["stack_id"].to_numpy(np.int64)[order]
    return ctx.cached("source_lines.python_samples", compute)


def _sampled_launch_stack(ctx, n_kernels: int) -> np.ndarray:
    """Per steady kernel: the main thread's sampled stack whose span (``_sample_spans``) holds the moment
    its launch call started, -1 without Python samples. With the next sample instead, a line that
    launches fast would lose the launches after its last sample (half an interval at 1 kHz: 12% of a
    400-launch loop). A launch from another thread (autograd's backward) gets the main thread's line
    that it works for (``loss.backward()``)."""
    out = np.full(n_kernels, -1, np.int64)
    ts, st = _python_samples(ctx)
    if len(ts) < 2 or not n_kernels:
        return out
    lo, hi = _sample_spans(ctx)
    la = ctx.launches()
    la = la[la["is_kernel"].to_numpy(bool)]
    t = la["launch_start_ns"].to_numpy(np.int64)
    j = np.searchsorted(hi, t, side="left")
    ok = (la["launched"].to_numpy(bool)) & (t > ts[0]) & (t <= ts[-1])
    out[la["row"].to_numpy(np.int64)[ok]] = st[np.clip(j, 0, len(ts) - 1)[ok]]
    return out


def where(f: dict) -> str:
    if not f["file"]:
        at = "(native code)"
    elif f["line"] < 0:  # a native frame: its shared object
        at = f["file"].rsplit("/", 1)[-1]
    else:
        at = f"{f['file']}:{f['line']}"
    return f"{at} in `{f['function']}`" + (f" -> `{f['callee']}`" if f["callee"] else "")


TRACED_CALLS_NOTE = 1000  # traced Python calls a step in a frame's gaps from which the charge is flagged


def explain(f: dict) -> str:
    """One line: where, what it costs per step, what the host was doing there, what to do."""
    line = _explain(f)
    if f.get("profiled_step_slowdown"):
        line += (f" (the profiled step took {f['profiled_step_slowdown']:.1f}x the step timed before the window: "
                 "the profiler slows every launch, so without it this costs less)")
    if f.get("sync_backtraces"):
        line += (" (this report unwound a backtrace as each sync returned, nsys --cudabacktrace=sync, which "
                 "lengthens the gap after it: without it this costs less)")
    n = f.get("traced_python_calls_per_step", 0)
    if n >= TRACED_CALLS_NOTE:
        line += (f" (torch.profiler's Python tracer recorded {n:,} calls a step in these gaps and slows them: "
                 "without the profiler this costs less)")
    return line


def _explain(f: dict) -> str:
    cost = f"{f['idle_ns_per_step'] / 1e6:.2f} ms per step ({f['step_fraction']:.0%} of the step)"
    ctx = f["context"]
    if ctx == "cudnn_benchmark":
        seen = ("(the convolutions wait on the GPU with event and device syncs)"
                if f.get("context_evidence") == "cuda_syncs_in_convolutions"
                else f"({f['callee']})" if "cudnn" in f["callee"].lower() else "(cuDNN's planning in the CPU samples)")
        return (f"{where(f)}: cuDNN benchmark mode times candidate kernels again {seen} "
                f"while the GPU idles {cost}: the input shape changes every step; keep shapes fixed (pad to a few "
                "sizes) or set torch.backends.cudnn.benchmark = False.")
    if ctx == "autotune":
        return f"{where(f)}: autotuning (Triton) idles the GPU {cost}: autotune once before the loop and cache the configs."
    if ctx == "compile":
        return (f"{where(f)}: torch.compile (re)compiles while the GPU idles {cost}: keep shapes and guards "
                "stable (mark_dynamic, fixed sizes) so that it compiles once.")
    if ctx == "jit":
        return (f"{where(f)}: runtime compilation / module loading while the GPU idles {cost} (a kernel is built "
                "for a shape not seen before, e.g. cuDNN's runtime-compiled kernels): keep input shapes fixed or "
                "warm every shape up before the loop.")
    if f["kind"] == "module" or (ctx == "" and "conv" in f["callee"].lower() and f["kind"] == "host"):
        return (f"{where(f)} builds or loads GPU code while the GPU idles {cost} (cuDNN benchmark / JIT for a new "
                "input shape, module loading): keep input shapes fixed (pad to a few buckets), or turn "
                "torch.backends.cudnn.benchmark off when shapes change every step.")
    if f["kind"] == "sync":
        after = f.get("host_after_sync")
        then = (f"; then the host spends {after['ns_per_step'] / 1e6:.2f} ms per step in {after['file']}:{after['line']} "
                f"in `{after['function']}` before the next launch") if after else ""
        saves = (f"; removing it saves about {f['saving_ns_per_step'] / 1e6:.2f} ms per step, as the host runs ahead "
                 f"and its work overlaps the GPU (at most {f['step_slack_ns_per_step'] / 1e6:.2f} ms: the step less the "
                 "longer of the GPU's work and the host's own)" if f.get("saving_ns_per_step") is not None else "")
        return (f"{where(f)} blocks the GPU {cost}: the host waits here until the GPU drains and the GPU idles until "
                f"the next launch{then}{saves}. Keep the value on the GPU (running sums) and read it every N steps, or "
                "copy it with non_blocking=True into pinned memory, so that the host work after it overlaps the GPU.")
    if f["kind"] == "launch":
        n = f.get("kernels_per_step")
        med = f.get("median_kernel_ns")
        what = f"issues {n:g} kernels per step" + (f" (median {med / 1e3:.1f} us)" if med is not None else "") if n else \
            "issues small kernels"
        unprof = ""
        if f.get("unprofiled_idle_ns_per_step") is not None:
            when = "in a process without the profiler" if f.get("unprofiled_launch_timed") == "bare_process" \
                else "before the window"
            unprof = (f" (about {f['unprofiled_idle_ns_per_step'] / 1e6:.2f} ms without the profiler: a launch took "
                      f"{f['unprofiled_launch_ns'] / 1e3:.1f} us on this host {when})")
        return (f"{where(f)} {what}; the GPU idles {cost} between them{unprof}: fuse them (torch._foreach_* ops, "
                "torch.compile) or capture the loop in a CUDA graph.")
    if f["kind"] == "host" and f["callee"] in MODEL_PASS and f.get("kernels_per_step"):
        med = f.get("median_kernel_ns")
        size = f" (median {med / 1e3:.1f} us)" if med is not None else ""
        head = (f"{where(f)} runs the model's {MODEL_PASS[f['callee']]} pass, {f['kernels_per_step']:g} kernels per step"
                f"{size}, and the GPU idles {cost} between them")
        if med is not None and med < SMALL_KERNEL_NS:
            return head + (": the pass is bound by launching its small kernels; larger batches, torch.compile "
                           "(mode=\"reduce-overhead\") or CUDA graphs remove the gaps.")
        return head + (": host work inside the pass issues them late (CPU ops, hooks, custom autograd functions, "
                       "syncs): look for it in the op table of this window.")
    if ctx == "dataloader_main_process":
        return (f"{where(f)} runs in the main process (DataLoader num_workers=0) while the GPU idles {cost}"
                f"{_saving_text(f, 'dataloader_host_ns_per_step', 'the loader')}: use "
                "DataLoader(num_workers>0, persistent_workers=True, pin_memory=True) or move the work to the GPU.")
    return (f"{where(f)} keeps the host busy while the GPU idles {cost}{_saving_text(f, 'host_ns_per_step', 'the line')}: "
            "move this work off the training loop (a DataLoader worker, a background thread, the GPU) or overlap "
            "it with GPU work.")


def _saving_text(f: dict, host_key: str, who: str) -> str:
    if f.get(host_key) is None:
        return ""
    return (f"; {who} takes {f[host_key] / 1e6:.2f} ms of the main thread per step (Python samples), so taking it "
            f"out of the loop saves up to {f['saving_ns_per_step'] / 1e6:.2f} ms per step")
