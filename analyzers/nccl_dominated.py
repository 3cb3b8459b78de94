"""nccl_dominated: communication that the GPU waits on, per rank; and data corruption seen by nccl-tests.

Per rank, in the steady-state window (ctx.kernels are clipped to it):

- communication kernels: NCCL kernels of every naming generation (``ncclKernel_AllReduce_RING_LL_Sum_float``
  2.x, ``ncclDevKernel_AllReduce_Sum_f32_RING_LL`` 2.19+, ``ncclAllReduceRingLLKernel_sum_f32`` <= 2.7,
  ``ncclDevKernel_SendRecv``) and every kernel categorized "communication";
- compute kernels: all other kernels (on any stream);
- pipeline-parallel send/recv kernels (send/recv kernels that are not the kernel of a collective: see
  ``pipeline_p2p_mask`` and gpudoctor/model/collectives.py) are neither: that waiting is pipeline_bubbles'
  subject;
- comm_ns = union of communication time; overlapped_comm_ns = its part during which a compute kernel runs
  (on another stream); exposed_comm_ns = comm_ns - overlapped_comm_ns (communication with no compute
  running: the GPU waits on the network / the other ranks).

Metrics: comm_fraction = comm_ns / window, exposed_comm_fraction = exposed_comm_ns / window,
overlap_fraction = overlapped_comm_ns / comm_ns (the share of communication hidden behind compute).

Where collectives carry sizes (torch.profiler record_param_comms, or NCCL's NVTX payloads in nsys, whose
GPU span is the range's projection), the achieved bus bandwidth per op is bytes x factor / kernel time
(factor as nccl-tests: 2(n-1)/n all-reduce, (n-1)/n all-gather / reduce-scatter / all-to-all, 1 broadcast),
compared with the link ceiling (``link_bandwidth_gbps``, else the ``# gpudoctor ceiling`` of an
nccl-bench log in the same run, else NVLink of the GPU model: 450 GB/s per direction for H100/H200 SXM,
300 for A100 SXM, 900 for B200). Kernel time includes waiting for the slowest rank, so this is a lower
bound of what the link does.

Severity: high when exposed_comm_fraction >= exposed_fraction_high (0.25), medium >= exposed_fraction_medium
(0.10); below that, info when comm_fraction >= comm_fraction_info (0.05), else no finding.
estimated_saving_ns = the exposed communication that could hide behind compute not yet overlapping
anything: min(exposed, compute - overlapped) (with perfect overlap a step takes max(compute, comm)).

nccl-tests input (read by gpudoctor.readers.nccltests): any ``#wrong`` > 0 is data corruption: a HIGH finding
"data corruption: N wrong elements". Without corruption, the bus bandwidth of the largest measured size is
compared with the ceiling (info; medium when below link_fraction_medium of it for sizes >= 64 MB).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gpudoctor.analyzers.findings import Finding
from gpudoctor.analyzers.spec import AnalyzerSpec, Setting, fraction
from gpudoctor.model import collectives
from gpudoctor.model.collectives import P2P_OPS
from gpudoctor.model.columns import equals, per_value
from gpudoctor.model.steps import union_ns

if TYPE_CHECKING:
    from gpudoctor.analyzers.context import AnalysisContext
    from gpudoctor.model.trace import Trace


ID = "nccl_dominated"

SETTINGS = (
    fraction("exposed_fraction_medium", 0.10, "medium when exposed communication is at least this fraction of the window"),
    fraction("exposed_fraction_high", 0.25, "high at this fraction"),
    fraction("comm_fraction_info", 0.05, "below medium, an info finding when communication is at least this fraction"),
    Setting("small_message_bytes", 1 << 20, "collectives smaller than this (median) are latency-bound: fewer, larger ones",
            unit="bytes"),
    Setting("many_collectives_per_step", 64, "more collectives than this per step: coalesce them", unit="count"),
    Setting("link_bandwidth_gbps", None, "link ceiling per GPU per direction; default from nccl-bench or the GPU model",
            unit="GB/s", kind="number"),
    fraction("link_fraction_medium", 0.5, "achieved bus bandwidth below this fraction of the ceiling (large messages): "
             "check the link"),
    Setting("large_message_bytes", 16 << 20, "messages at least this large are expected to approach the link ceiling",
            unit="bytes"),
)

COMM_KERNEL = r"nccl|^(all_?reduce|all_?gather|reduce_?scatter|alltoall|sendrecv)|cross_device_reduce"
P2P_KERNEL = r"nccl(?:Dev)?Kernel_(?:SendRecv|Send|Recv)(?![a-z])|nccl(?:SendRecv|Send|Recv)Kernel"
# Per-direction NVLink ceiling by GPU model (device name substrings), GB/s.
_NVLINK_BY_NAME = (
    (re.compile(r"\b(gb|b)(200|300)\b", re.I), 900.0, "NVLink 5: 18 links x 50 GB/s per direction (B200 datasheet)"),
    (re.compile(r"h(100|200|800)(?!.*pcie)", re.I), 450.0,
     "NVLink 4: 18 links x 25 GB/s per direction (H100/H200 datasheets: 900 GB/s bidirectional)"),
    (re.compile(r"a100(?!.*pcie)", re.I), 300.0,
     "NVLink 3: 12 links x 25 GB/s per direction (A100 datasheet: 600 GB/s bidirectional)"),
)
_OP_OF_KERNEL = re.compile(r"(AllReduce|AllGather|ReduceScatter|Broadcast|AllToAll|SendRecv|Send|Recv|Reduce)", re.I)
_OPS = {"allreduce": "all_reduce", "allgather": "all_gather", "reducescatter": "reduce_scatter",
        "broadcast": "broadcast", "alltoall": "all_to_all", "sendrecv": "send_recv", "send": "send",
        "recv": "recv", "reduce": "reduce"}


# ----------------------------------------------------------------------------------------------------
# Helpers shared with pipeline_bubbles and stragglers


def name_mask(names: pd.Series, pattern: str) -> np.ndarray:
    """Regex mask over kernel names, decided once per distinct name."""
    rx = re.compile(pattern, re.I)
    return per_value(names, lambda v: bool(rx.search(v)), dtype=bool, missing=False)


def comm_mask(kernels: pd.DataFrame) -> np.ndarray:
    """Communication kernels: NCCL names of every generation, or category 'communication'."""
    if kernels.empty:
        return np.zeros(0, dtype=bool)
    by_cat = equals(kernels["category"], "communication")
    return by_cat | name_mask(kernels["name"], COMM_KERNEL)


def p2p_mask(kernels: pd.DataFrame) -> np.ndarray:
    if kernels.empty:
        return np.zeros(0, dtype=bool)
    return name_mask(kernels["name"], P2P_KERNEL)


def intervals(df: pd.DataFrame, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = df if mask is None else df[mask]
    return d["start_ns"].to_numpy(np.int64), d["end_ns"].to_numpy(np.int64)


def overlap_ns(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
               lo: int | None = None, hi: int | None = None) -> tuple[int, int, int]:
    """(|A|, |B|, |A ∩ B|) of two interval sets (each as a union), clipped to [lo, hi]."""
    ua = union_ns(a[0], a[1], lo, hi)
    ub = union_ns(b[0], b[1], lo, hi)
    uab = union_ns(np.r_[a[0], b[0]], np.r_[a[1], b[1]], lo, hi)
    return ua, ub, max(ua + ub - uab, 0)


def world_size(trace: Trace) -> int:
    """Ranks in the run: the inputs' ranks (shared meta), else the ranks table."""
    ranks = {i.get("rank") for i in (trace.meta.get("inputs") or []) if isinstance(i, dict) and i.get("rank") is not None}
    if not ranks:
        ranks = set(trace.ranks["rank"].tolist())
    return max(len(ranks), 1)


def kernel_op(name: str) -> str:
    m = _OP_OF_KERNEL.search(name)
    return _OPS.get(m.group(1).lower(), "other") if m else "other"


def link_ceiling_gbps(ctx: AnalysisContext, cfg: dict) -> tuple[float | None, str]:
    """Per-GPU per-direction link ceiling (GB/s) and where it came from."""
    v = cfg.get("link_bandwidth_gbps")
    if v:
        return float(v), "config link_bandwidth_gbps"
    nt = (ctx.trace.meta.get("nccl_tests") or {}).get("gpudoctor") or {}
    m = re.match(r"\s*([0-9.]+)\s*GB/s", str(nt.get("ceiling", "")))
    if m:
        return float(m.group(1)), "gpudoctor nccl-bench: " + str(nt.get("link", "link measured by NVML"))
    name = ctx.device_name or ""
    for rx, gbps, src in _NVLINK_BY_NAME:
        if rx.search(name):
            return gbps, f"{src}, assumed from the GPU model '{name}'"
    return None, ""


def bus_factor(op: str, n: int) -> float | None:
    try:
        return collectives.bus_factor(op, n)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------------
# Sizes of the collectives


def sized_collectives(ctx: AnalysisContext) -> pd.DataFrame:
    """Collectives of the rank with bytes and a GPU span inside the window: op, bytes, comm_size, gpu_ns."""
    c = ctx.trace.collectives
    cols = ["op", "bytes", "comm_size", "start_ns", "end_ns"]
    if c.empty:
        return pd.DataFrame(columns=cols + ["gpu_ns"])
    src = c["source"].astype(str).to_numpy()
    parts = []
    on_gpu = c[np.isin(src, ["kineto_args", "kineto_range", "nvtx_range", "kernel_name"]) & (c["bytes"].to_numpy() > 0)]
    if len(on_gpu):
        parts.append(on_gpu[cols])
    nvtx = c[(src == "nvtx_nccl") & (c["bytes"].to_numpy() > 0)]
    r = ctx.trace.ranges
    if len(nvtx) and len(r):
        r = r[(r["domain"].astype(str).str.lower() == "nccl") & (r["gpu_start_ns"].to_numpy() >= 0)]
        j = nvtx[["op", "bytes", "comm_size", "start_ns", "end_ns"]].merge(
            r[["start_ns", "end_ns", "gpu_start_ns", "gpu_end_ns"]].drop_duplicates(["start_ns", "end_ns"]),
            on=["start_ns", "end_ns"], how="inner")
        if len(j):
            parts.append(pd.DataFrame({"op": j["op"].astype(str), "bytes": j["bytes"], "comm_size": j["comm_size"],
                                       "start_ns": j["gpu_start_ns"], "end_ns": j["gpu_end_ns"]}))
    if not parts:
        return pd.DataFrame(columns=cols + ["gpu_ns"])
    d = pd.concat([p.assign(op=p["op"].astype(str)) for p in parts], ignore_index=True)
    lo, hi = ctx.start_ns, ctx.end_ns
    d = d[(d["end_ns"] > d["start_ns"]) & (d["end_ns"] > lo) & (d["start_ns"] < hi)]
    return d.assign(gpu_ns=d["end_ns"] - d["start_ns"]).reset_index(drop=True)


def bandwidth_by_op(sized: pd.DataFrame, world: int) -> list[dict]:
    out = []
    for op, g in sized.groupby("op", sort=False):
        n = int(g["comm_size"].max()) if (g["comm_size"] > 0).any() else world
        f = bus_factor(str(op), n)
        t = float(g["gpu_ns"].sum())
        b = float(g["bytes"].sum())
        if t <= 0 or f is None:
            continue
        alg = b / t  # bytes per ns = GB/s
        out.append({"op": str(op), "count": int(len(g)), "bytes": int(b), "median_bytes": int(g["bytes"].median()),
                    "gpu_ns": int(t), "ranks": n, "algbw_gbps": round(alg, 3), "busbw_gbps": round(alg * f, 3)})
    return sorted(out, key=lambda x: -x["gpu_ns"])


# ----------------------------------------------------------------------------------------------------
# nccl-tests input


def nccl_corruption(trace: Trace, rank: int | None = None) -> list[Finding]:
    """HIGH finding when an nccl-tests (or nccl-bench) log reports wrong elements (#wrong > 0)."""
    nt = trace.meta.get("nccl_tests")
    if not isinstance(nt, dict):
        return []
    wrong = int(nt.get("wrong_total") or 0)
    if wrong <= 0:
        return []
    rows = nt.get("wrong_rows") or []
    ops = sorted({r["op"] or "?" for r in rows})
    return [Finding(
        analyzer=ID, severity="high", title=f"data corruption: {wrong} wrong elements",
        metrics={"wrong_elements": wrong, "wrong_measurements": len(rows)},
        recommendation=("A collective returned wrong data: this is a hardware, driver or NCCL fault, not a "
                        "performance problem. Re-run the failing sizes, check nvidia-smi -q for XID / ECC / NVLink "
                        "CRC errors (nvidia-smi nvlink -e), update the driver and NCCL, and take the GPU or "
                        "node out of service until it passes."),
        evidence={"ops": ops, "wrong_rows": rows[:20], "source": nt.get("path", "")}, rank=rank)]


def nccl_tests_bandwidth(ctx: AnalysisContext, cfg: dict) -> list[Finding]:
    nt = ctx.trace.meta.get("nccl_tests")
    if not isinstance(nt, dict) or not nt.get("rows") or int(nt.get("wrong_total") or 0):
        return []
    ceiling, source = link_ceiling_gbps(ctx, cfg)
    if ceiling is None:
        devs = [d for s in nt.get("sections", []) for d in s.get("devices", [])]
        name = devs[0]["name"] if devs else ""
        for rx, gbps, src in _NVLINK_BY_NAME:
            if rx.search(name):
                ceiling, source = gbps, f"{src}, assumed from the GPU model '{name}'"
                break
    best: dict[str, dict] = {}
    for r in nt["rows"]:
        op = r.get("op") or "?"
        if op not in best or r["size_bytes"] > best[op]["size_bytes"]:
            best[op] = r
    per_op = {}
    worst = None
    for op, r in best.items():
        bus = max((r.get(f"{m}_busbw_gbps") or 0.0) for m in ("out_of_place", "in_place"))
        frac = bus / ceiling if ceiling else None
        per_op[op] = {"size_bytes": int(r["size_bytes"]), "busbw_gbps": bus,
                      "fraction_of_ceiling": None if frac is None else round(frac, 4)}
        if frac is not None and r["size_bytes"] >= 64 << 20 and (worst is None or frac < worst[1]):
            worst = (op, frac)
    sev = "info"
    if worst is not None and worst[1] < float(cfg["link_fraction_medium"]):
        sev = "medium"
    parts = [f"{op} {v['busbw_gbps']:.0f} GB/s" + (f" ({v['fraction_of_ceiling']:.0%})" if v["fraction_of_ceiling"] is not None else "")
             for op, v in per_op.items()]
    title = "nccl-tests bus bandwidth at the largest size: " + ", ".join(parts)
    if ceiling:
        title += f" of a {ceiling:.0f} GB/s link"
    rec = ("The link reaches a normal share of its ceiling (NCCL's ring/tree algorithms typically reach about "
           "70-85% of NVLink's per-direction bandwidth at large sizes; NVLink SHARP more)." if sev == "info" else
           "Bus bandwidth of large messages is far below the link ceiling: check the topology (nvidia-smi topo -m), "
           "the transport NCCL picked (NCCL_DEBUG=INFO: P2P/IPC over NVLink vs SHM/NET), NCCL_P2P_DISABLE / "
           "NCCL_P2P_LEVEL, PCIe ACS and IOMMU settings, and NVLink errors (nvidia-smi nvlink -e).")
    return [Finding(analyzer=ID, severity=sev, title=title,
                    metrics={"link_ceiling_gbps": ceiling, "ops": per_op,
                             "avg_busbw_gbps": nt.get("avg_busbw_gbps")},
                    recommendation=rec, evidence={"ceiling_source": source, "log": nt.get("path", "")},
                    rank=ctx.rank)]


def _nccl_tests_rank(trace) -> int:
    """The rank an nccl-tests log's findings are reported under (its reader's ``rank``, default 0)."""
    nt = trace.meta.get("nccl_tests") or {}
    return int(nt.get("rank") or 0)


# ----------------------------------------------------------------------------------------------------
# The analyzer


def pipeline_p2p(trace: Trace) -> bool:
    """Whether the run has pipeline transfers: send/recv kernels, and either no collective recorded
    for them or a recorded point-to-point op (send / recv / send_recv). A run whose send/recv kernels
    all belong to collectives (NCCL runs all-to-all, and uneven all-gather / reduce-scatter, as grouped
    send/recv) has none. Asks only which ops the run has, so it works on the parallel path's light trace."""
    k = trace.kernels
    if k.empty or not p2p_mask(k).any():
        return False
    c = trace.collectives
    c = c[c["source"].astype(str) != "nccl_tests"] if len(c) else c
    if c.empty:
        return True
    return bool(set(c["op"].astype(str)) & set(P2P_OPS))


def pipeline_p2p_mask(kernels: pd.DataFrame, collectives: pd.DataFrame) -> np.ndarray:
    """Send/recv kernels that are not the kernel of a collective: no collectives row of another op at
    the same rank, start and end (the Kineto reader writes one row per NCCL kernel, with the op of its
    record_param_comms call or of the collective range around its launch; model/collectives.py)."""
    pm = p2p_mask(kernels)
    c = collectives
    if not pm.any() or c.empty:
        return pm
    c = c[~np.isin(c["op"].astype(str).to_numpy(), P2P_OPS) & (c["source"].astype(str).to_numpy() != "nccl_tests")]
    if c.empty:
        return pm
    rows = np.flatnonzero(pm)
    mine = pd.MultiIndex.from_arrays([kernels[col].to_numpy(np.int64)[rows] for col in ("rank", "start_ns", "end_ns")])
    theirs = pd.MultiIndex.from_arrays([c[col].to_numpy(np.int64) for col in ("rank", "start_ns", "end_ns")])
    out = pm.copy()
    out[rows[mine.isin(theirs)]] = False
    return out


def pipeline_p2p_kernels(ctx: AnalysisContext) -> np.ndarray:
    """For each steady-window kernel (``ctx.kernels``, clipped): a pipeline send/recv transfer?"""
    k = ctx.kernels
    if k.empty or not pipeline_p2p(ctx.trace):
        return np.zeros(len(k), dtype=bool)
    full = pipeline_p2p_mask(ctx.trace.kernels, ctx.trace.collectives)
    return full[k["trace_row"].to_numpy()] if "trace_row" in k else pipeline_p2p_mask(k, ctx.trace.collectives)


def comm_metrics(ctx: AnalysisContext) -> dict:
    """Communication / compute / overlap of one rank's steady window (ns and fractions).

    Pipeline send/recv kernels (``pipeline_p2p_kernels``) are left out (neither communication nor compute).
    """
    k = ctx.kernels
    lo, hi = ctx.start_ns, ctx.end_ns
    window = max(hi - lo, 0)
    cm = comm_mask(k)
    skip = pipeline_p2p_kernels(ctx)
    cm = cm & ~skip
    comm, comp, ov = overlap_ns(intervals(k, cm), intervals(k, ~cm & ~skip), lo, hi)
    exposed = comm - ov
    return {
        "window_ns": int(window), "comm_ns": int(comm), "compute_ns": int(comp), "overlapped_comm_ns": int(ov),
        "exposed_comm_ns": int(exposed), "comm_kernels": int(cm.sum()),
        "comm_fraction": comm / window if window else 0.0,
        "exposed_comm_fraction": exposed / window if window else 0.0,
        "overlap_fraction": ov / comm if comm else 0.0,
        "compute_fraction": comp / window if window else 0.0,
        "pipeline_p2p_excluded_kernels": int(skip.sum()),
        "_mask": cm,
    }


def measure(ctx: AnalysisContext, cfg: dict) -> dict | None:
    """Communication in the window (``comm_metrics``), the top communication kernels, collective sizes and
    bandwidths against the link ceiling; None when the rank runs no communication kernel."""
    if ctx.kernels.empty or ctx.window_ns <= 0:
        return None
    m = comm_metrics(ctx)
    cm = m.pop("_mask")
    if not cm.any():
        return None
    ck = ctx.kernels[cm]
    names = ck["kname"].astype(str) if "kname" in ck else ck["name"].astype(str)
    dur = (ck["end_ns"] - ck["start_ns"]).to_numpy(np.int64)
    top = (pd.DataFrame({"name": names.to_numpy(), "d": dur}).groupby("name").agg(count=("d", "size"), total_ns=("d", "sum"))
           .sort_values("total_ns", ascending=False).head(5))
    n_steps = max(len(ctx.window.steady), 1)
    world = world_size(ctx.trace)
    sized = sized_collectives(ctx)
    bw = bandwidth_by_op(sized, world)
    ceiling, ceiling_src = link_ceiling_gbps(ctx, cfg)
    metrics = {k2: (round(v, 6) if isinstance(v, float) else v) for k2, v in m.items()}
    metrics.update({"steps": int(len(ctx.window.steady)), "comm_kernels_per_step": round(m["comm_kernels"] / n_steps, 2),
                    "world_size": world})
    if bw:
        metrics["bandwidth_by_op"] = bw
        metrics["collective_bytes_per_step"] = int(sized["bytes"].sum() / n_steps)
        metrics["median_collective_bytes"] = int(sized["bytes"].median())
    if ceiling:
        metrics["link_ceiling_gbps"] = ceiling
        big = [b for b in bw if b["median_bytes"] >= int(cfg["large_message_bytes"])]
        if big:
            metrics["link_fraction"] = round(max(b["busbw_gbps"] for b in big) / ceiling, 4)
    saving = int(max(0, min(m["exposed_comm_ns"], m["compute_ns"] - m["overlapped_comm_ns"])))
    return {"raw": m, "metrics": metrics, "top": top, "n_steps": n_steps, "bandwidth": bw, "ceiling": ceiling,
            "ceiling_source": ceiling_src, "saving_ns": saving}


def severity(m: dict, cfg: dict) -> str | None:
    """high / medium on the exposed fraction, info on the communication fraction, else None (no finding)."""
    ef, cf = m["raw"]["exposed_comm_fraction"], m["raw"]["comm_fraction"]
    if ef >= float(cfg["exposed_fraction_high"]):
        return "high"
    if ef >= float(cfg["exposed_fraction_medium"]):
        return "medium"
    if cf >= float(cfg["comm_fraction_info"]):
        return "info"
    return None


def _advice(m: dict, cfg: dict) -> list[str]:
    raw, metrics, n_steps, bw, ceiling = m["raw"], m["metrics"], m["n_steps"], m["bandwidth"], m["ceiling"]
    rec = []
    if raw["compute_ns"] and raw["comm_ns"] > raw["compute_ns"]:
        rec.append(f"Communication ({raw['comm_ns'] / 1e6 / n_steps:.2f} ms per step) takes longer than compute "
                   f"({raw['compute_ns'] / 1e6 / n_steps:.2f} ms): no overlap can hide it all. Give each GPU more work per "
                   "byte communicated: a larger per-GPU batch, or gradient accumulation with DDP's no_sync() so that "
                   "gradients are all-reduced once every N micro-batches; halve the bytes with bf16 gradients "
                   "(DDP comm hook bf16_compress_hook, or bf16 mixed precision).")
    if raw["overlap_fraction"] < 0.5:
        rec.append(f"Only {raw['overlap_fraction']:.0%} of the communication overlaps compute. With DDP the all-reduce of "
                   "each gradient bucket starts as soon as the bucket is ready in backward: keep the default overlap "
                   "(no find_unused_parameters unless needed; static_graph=True; gradient_as_bucket_view=True), and "
                   "tune bucket_cap_mb (smaller buckets start earlier, larger ones use the link better). With FSDP, "
                   "enable backward/forward prefetch.")
    small = int(cfg["small_message_bytes"])
    if bw and metrics.get("median_collective_bytes", small) < small:
        rec.append(f"The median collective moves {metrics['median_collective_bytes'] / 1024:.0f} KiB: small messages are "
                   "latency-bound. Use fewer, larger collectives (raise DDP bucket_cap_mb, coalesce tensors, "
                   "torch.distributed's coalescing manager, flatten parameters).")
    elif raw["comm_kernels"] / n_steps > int(cfg["many_collectives_per_step"]):
        rec.append(f"{raw['comm_kernels'] / n_steps:.0f} communication kernels per step: coalesce them into fewer, larger "
                   "collectives.")
    if "link_fraction" in metrics and metrics["link_fraction"] < float(cfg["link_fraction_medium"]):
        rec.append(f"Large collectives reach only {metrics['link_fraction']:.0%} of the {ceiling:.0f} GB/s link ceiling "
                   "(kernel time, a lower bound): check the link with 'gpudoctor nccl-bench', nvidia-smi topo -m, and "
                   "NCCL_DEBUG=INFO for the transport in use.")
    elif "link_fraction" in metrics:
        rec.append(f"Large collectives already reach {metrics['link_fraction']:.0%} of the {ceiling:.0f} GB/s link: "
                   "the link is not the problem, the bytes per step are.")
    if not bw:
        rec.append("Message sizes are unknown in this trace (torch.profiler records them; with Nsight Systems trace "
                   "NVTX so that NCCL's own ranges carry them).")
    return rec


def explain(ctx: AnalysisContext, m: dict, sev: str, cfg: dict) -> Finding:
    raw, window, saving = m["raw"], m["raw"]["window_ns"], m["saving_ns"]
    title = (f"Exposed communication {raw['exposed_comm_fraction']:.0%} of the steady-state window (communication "
             f"{raw['comm_fraction']:.0%}, {raw['overlap_fraction']:.0%} of it overlapped with compute)")
    evidence = {
        "window": ctx.window.describe(),
        "top_comm_kernels": [{"name": str(n)[:120], "count": int(r["count"]), "total_us": round(r["total_ns"] / 1e3, 1),
                              "op": kernel_op(str(n))} for n, r in m["top"].iterrows()],
        "ceiling_source": m["ceiling_source"],
        "note": "kernel time of a collective includes waiting for the other ranks",
    }
    return Finding(analyzer=ID, severity=sev, title=title, metrics=m["metrics"], estimated_saving_ns=saving,
                   estimated_saving_fraction=round(saving / window, 6) if window else 0.0,
                   recommendation=" ".join(_advice(m, cfg)), evidence=evidence, rank=ctx.rank)


def analyze(ctx: AnalysisContext) -> list[Finding]:
    cfg = ctx.config.section(ID)
    out: list[Finding] = []
    if isinstance(ctx.trace.meta.get("nccl_tests"), dict) and ctx.rank == _nccl_tests_rank(ctx.trace):
        out += nccl_corruption(ctx.trace, ctx.rank)
        out += nccl_tests_bandwidth(ctx, cfg)
    m = measure(ctx, cfg)
    sev = severity(m, cfg) if m is not None else None
    if m is not None and sev is not None:
        out.append(explain(ctx, m, sev, cfg))
    return out


SPEC = AnalyzerSpec(ID, analyze, SETTINGS, evidence=(
    ("top_comm_kernels", "the communication kernels with the most time: name, op, count, total"),
    ("ceiling_source", "where the link ceiling came from (nccl-bench, config, GPU model)"),
    ("note", "how exposed communication was measured"),
    ("ops", "nccl-tests: the collectives whose rows returned wrong data"),
    ("wrong_rows", "nccl-tests: the rows with #wrong > 0"),
    ("source", "nccl-tests: the log"),
    ("log", "nccl-tests: the log the bandwidths came from"),
    ("window", "the steady-state window"),
))
