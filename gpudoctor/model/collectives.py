"""Which collective a communication kernel belongs to, from every source a trace carries.

NCCL runs all-to-all (and, in some versions and libraries, all-gather, all-reduce or reduce-scatter of
uneven sizes) as grouped point-to-point transfers: the kernel is then named ``ncclKernel_SendRecv_*`` /
``ncclDevKernel_SendRecv`` whatever the collective was. The kernel name alone cannot tell pipeline
send/recv from an all-to-all, so the op is taken, in this order, from:

1. the profiler's own record of the call (torch.profiler ``record_param_comms`` "Collective name";
   Nsight Systems' NCCL NVTX domain: the NCCL API call whose range holds the launch, ``ncclAllReduce``,
   with its payload's message size; calls made between ``ncclGroupStart`` and ``ncclGroupEnd`` launch
   their kernels inside ``ncclGroupEnd``, which takes the op of the calls it closes: ``nccl_call_ops``);
2. the innermost collective-named host range around the kernel's launch (``enclosing_ops``):
   ``nccl:all_to_all`` / ``gloo:...`` record_function ranges of ProcessGroupNCCL, ``c10d::alltoall_base_``
   operator calls, ``ncclAllToAll`` NVTX ranges, TorchRec ranges such as ``## alltoall_fwd_single ##``;
3. the kernel name (``op_of_kernel``).

Also nccl-tests' conventions for collectives: op and dtype names, what a row of ``size`` bytes moves, the
bus bandwidth factor (nccl-tests' doc/PERFORMANCE.md), shared by the nccl-tests reader, ``gpudoctor
nccl-bench`` and the communication analyzers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

# Letters of an op name (lower case, digits and separators removed; "all2all" first made "alltoall"),
# tested in this order: the first contained key wins ("reducescatter" before "reduce", "sendrecv" before
# "send").
_OP_KEYS = (
    ("allreduce", "all_reduce"), ("reducescatter", "reduce_scatter"), ("allgather", "all_gather"),
    ("alltoall", "all_to_all"), ("broadcast", "broadcast"), ("sendrecv", "send_recv"),
    ("send", "send"), ("recv", "recv"), ("barrier", "barrier"), ("reduce", "reduce"),
    ("gather", "gather"), ("scatter", "scatter"),
)
P2P_OPS = ("send", "recv", "send_recv")

# Host ranges whose name says which collective runs inside: a process group's own range
# ("nccl:all_to_all", "gloo:broadcast"), a c10d operator ("c10d::allreduce_"), NCCL's API NVTX ranges
# ("ncclAllReduce"), and TorchRec / user ranges that name a collective ("## alltoall_fwd_single ##").
COMM_RANGE = re.compile(
    r"^(?:nccl|gloo|ucc|mpi|xccl|hccl):\s*\w|^c10d::\w|^nccl(?:AllReduce|AllGather|ReduceScatter|Broadcast|"
    r"AllToAll|Send|Recv|Reduce|Gather|Scatter)\b|"
    r"(?<![a-z])(?:all_?to_?all|all2all|all_?reduce|all_?gather|reduce_?scatter)", re.I)
_KERNEL_OP = re.compile(r"(AllReduce|AllGather|ReduceScatter|Broadcast|AllToAll|SendRecv|Send|Recv|Reduce)", re.I)
_DROP = re.compile(r"[^a-z]")


def collective_op(name: object) -> str | None:
    """The op a collective's name (or record_param_comms "Collective name") says, or None."""
    if not isinstance(name, str):
        return None
    letters = _DROP.sub("", name.lower().replace("all2all", "alltoall"))
    for key, op in _OP_KEYS:
        if key in letters:
            return op
    return None


def range_op(text: str) -> str | None:
    """The op of a host range that names a collective (``COMM_RANGE``), else None."""
    return collective_op(text) if COMM_RANGE.search(text) else None


def op_of_kernel(name: str) -> str:
    """The op in an NCCL kernel's name ("send_recv" for the grouped point-to-point kernel), or "other"."""
    m = _KERNEL_OP.search(name)
    return collective_op(m.group(1)) or "other" if m else "other"


def enclosing_ops(launch_tid: np.ndarray, launch_ns: np.ndarray, r_tid: np.ndarray, r_start: np.ndarray,
                  r_end: np.ndarray, r_op: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Op of the innermost range (latest start) on the launch's thread that contains the launch time;
    "" where none does."""
    idx = enclosing_index(launch_tid, launch_ns, r_tid, r_start, r_end, chunk)
    ops = np.append(np.asarray(r_op, dtype=object), "")  # index -1 -> ""
    return ops[idx]


def enclosing_index(launch_tid: np.ndarray, launch_ns: np.ndarray, r_tid: np.ndarray, r_start: np.ndarray,
                    r_end: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Index of the innermost range (latest start) on the launch's thread that contains the launch
    time; -1 where none does. Ranges are the collective-named ones only (tens to thousands), so a
    launches x ranges test per thread, in chunks of launches, stays small."""
    out = np.full(len(launch_ns), -1, dtype=np.int64)
    if len(launch_ns) == 0 or len(r_start) == 0:
        return out
    order = np.argsort(r_start, kind="stable")
    r_tid, r_start, r_end = np.asarray(r_tid)[order], np.asarray(r_start)[order], np.asarray(r_end)[order]
    for tid in np.unique(launch_tid):
        on = np.flatnonzero(r_tid == tid)
        if not len(on):
            continue
        rs, re_ = r_start[on], r_end[on]
        idx = np.flatnonzero(launch_tid == tid)
        for lo in range(0, len(idx), chunk):
            sel = idx[lo:lo + chunk]
            t = launch_ns[sel][:, None]
            inside = (rs[None, :] <= t) & (t <= re_[None, :])
            hit = inside.any(axis=1)
            last = inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)  # latest-starting range
            out[sel[hit]] = order[on[last[hit]]]
    return out


_NCCL_CALL = re.compile(r"^nccl([A-Za-z]+)$")


def nccl_call_op(text: str) -> str:
    """The op of an NCCL API call range of NCCL's NVTX domain ("ncclAllReduce" -> "all_reduce"; "" for
    calls that move nothing: ncclCommInitRank, ncclGroupStart, ...)."""
    m = _NCCL_CALL.match(text)
    if not m:
        return ""
    name = m.group(1).lower()
    return "broadcast" if name == "bcast" else collective_op(name) or ""


def nccl_call_ops(tid: np.ndarray, start_ns: np.ndarray, texts: list[str],
                  nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Op and message bytes of each NCCL API call range (NCCL's NVTX domain, one rank), with groups
    resolved: an ``ncclGroupEnd`` that closes the outermost group gets the op of the calls made since
    its ``ncclGroupStart`` (send and recv together: "send_recv"; one op: that op; several: the most
    frequent) and the sum of their bytes (-1 unless all are known), since the group's kernels are
    launched inside it. NCCL calls are few (one per collective), so this walks them in order."""
    ops = np.array([nccl_call_op(t) for t in texts], dtype=object)
    out_bytes = np.asarray(nbytes, dtype=np.int64).copy()
    depth: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for i in np.lexsort((np.asarray(start_ns), np.asarray(tid))).tolist():
        t, text = int(tid[i]), texts[i]
        if text == "ncclGroupStart":
            depth[t] = depth.get(t, 0) + 1
            if depth[t] == 1:
                members[t] = []
        elif text == "ncclGroupEnd" and depth.get(t, 0) > 0:
            depth[t] -= 1
            if depth[t] == 0:
                inside = members.pop(t, [])
                ops[i] = _group_op([ops[j] for j in inside])
                sizes = out_bytes[inside] if inside else np.empty(0, np.int64)
                out_bytes[i] = int(sizes.sum()) if len(sizes) and (sizes >= 0).all() else -1
        elif ops[i] and depth.get(t, 0) > 0:
            members[t].append(i)
    return ops, out_bytes


def _group_op(ops: list[str]) -> str:
    kinds = set(ops)
    if not kinds:
        return ""
    if kinds == {"send", "recv"}:
        return "send_recv"
    return max(sorted(kinds), key=ops.count)



P2P_PAIR_COLUMNS = ("send_rank", "recv_rank", "send_start_ns", "send_end_ns", "recv_start_ns", "recv_end_ns",
                    "bytes", "overlap_ns")


def pair_p2p(collectives: pd.DataFrame) -> pd.DataFrame:
    """Sends matched to the receives they feed, across the ranks of one run (one row per pair).

    A transfer's send and recv kernels run at the same time (NCCL moves the data while both are in
    their kernel; the one that starts first waits for the other), so a send on rank a pairs with the
    receive on another rank b whose kernel overlaps it in time, with the same message size where both
    are known. For each (a, b) the candidates come in time order (a rank's receives run one after the
    other on its stream); a send that overlaps receives on two ranks, or two sends one receive, keep the
    longer overlap. Needs the ranks on one clock (one host, or clocks aligned by the readers); send_recv
    rows (a group holding both) are not paired. Benchmark rows (nccl_tests) are not this run's traffic."""
    out = pd.DataFrame({col: pd.Series(dtype="int64") for col in P2P_PAIR_COLUMNS})
    if collectives.empty:
        return out
    c = collectives[collectives["source"].astype(str).to_numpy() != "nccl_tests"]
    op = c["op"].astype(str).to_numpy()
    sends, recvs = c[op == "send"], c[op == "recv"]
    if sends.empty or recvs.empty:
        return out
    parts = []
    for a, s in sends.groupby("rank", sort=True):
        s = s.sort_values("start_ns")
        s_start, s_end, s_bytes = (s[k].to_numpy(np.int64) for k in ("start_ns", "end_ns", "bytes"))
        for b, r in recvs.groupby("rank", sort=True):
            if b == a:
                continue
            r = r.sort_values("start_ns")
            r_start, r_end, r_bytes = (r[k].to_numpy(np.int64) for k in ("start_ns", "end_ns", "bytes"))
            # the first receive still running when the send starts
            j = np.searchsorted(np.maximum.accumulate(r_end), s_start, side="right")
            ok = j < len(r_start)
            j = np.minimum(j, len(r_start) - 1)
            overlap = np.minimum(s_end, r_end[j]) - np.maximum(s_start, r_start[j])
            same_size = (s_bytes < 0) | (r_bytes[j] < 0) | (s_bytes == r_bytes[j])
            ok &= (overlap > 0) & same_size
            if ok.any():
                parts.append(pd.DataFrame({
                    "send_rank": int(a), "recv_rank": int(b), "send_start_ns": s_start[ok], "send_end_ns": s_end[ok],
                    "recv_start_ns": r_start[j[ok]], "recv_end_ns": r_end[j[ok]],
                    "bytes": np.where(s_bytes[ok] >= 0, s_bytes[ok], r_bytes[j[ok]]), "overlap_ns": overlap[ok]}))
    if not parts:
        return out
    pairs = pd.concat(parts, ignore_index=True).sort_values("overlap_ns", ascending=False, kind="stable")
    pairs = pairs.drop_duplicates(["send_rank", "send_start_ns", "send_end_ns"])
    pairs = pairs.drop_duplicates(["recv_rank", "recv_start_ns", "recv_end_ns"])
    return pairs.sort_values(["send_start_ns", "send_rank"], kind="stable").reset_index(drop=True)


# nccl-tests binary stem -> model op name.
BINARY_OPS = {
    "all_reduce": "all_reduce", "all_gather": "all_gather", "reduce_scatter": "reduce_scatter",
    "broadcast": "broadcast", "reduce": "reduce", "alltoall": "all_to_all", "alltoallv": "all_to_all",
    "sendrecv": "send_recv", "gather": "gather", "scatter": "scatter", "hypercube": "hypercube",
}
# model op -> nccl-tests binary.
OP_BINARIES = {
    "all_reduce": "all_reduce_perf", "all_gather": "all_gather_perf", "reduce_scatter": "reduce_scatter_perf",
    "broadcast": "broadcast_perf", "reduce": "reduce_perf", "all_to_all": "alltoall_perf",
    "send_recv": "sendrecv_perf", "gather": "gather_perf", "scatter": "scatter_perf",
}
# nccl-tests type names -> torch-style dtype names.
TYPE_DTYPES = {
    "int8": "int8", "char": "int8", "uint8": "uint8", "int32": "int32", "int": "int32", "uint32": "uint32",
    "int64": "int64", "uint64": "uint64", "half": "float16", "float16": "float16", "float": "float32",
    "float32": "float32", "double": "float64", "float64": "float64", "bfloat16": "bfloat16",
    "f8e4m3": "float8_e4m3fn", "f8e5m2": "float8_e5m2", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2",
}
DTYPE_TYPES = {"float32": "float", "float16": "half", "bfloat16": "bfloat16", "float64": "double",
               "int8": "int8", "uint8": "uint8", "int32": "int32", "uint32": "uint32", "int64": "int64",
               "uint64": "uint64"}
DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1, "int32": 4,
               "uint32": 4, "int64": 8, "uint64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}


def bus_factor(op: str, nranks: int) -> float:
    """busbw / algbw of ``op`` on ``nranks`` ranks (nccl-tests doc/PERFORMANCE.md)."""
    n = int(nranks)
    if n < 1:
        raise ValueError("nranks must be >= 1")
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        return (n - 1) / n
    if op in ("broadcast", "reduce", "send_recv", "send", "recv"):
        return 1.0
    raise ValueError(f"no bus bandwidth factor known for {op!r}")


@dataclass(frozen=True)
class OpSize:
    """One row's sizes in nccl-tests' conventions, for ``size`` bytes asked for."""

    size_bytes: int  # the size column: max(send bytes, recv bytes) of one rank
    count: int  # the count column: the element count passed to NCCL (per-rank chunk for gather-like ops)
    send_count: int  # elements in the send buffer of one rank
    recv_count: int  # elements in the receive buffer of one rank


def op_sizes(op: str, size: int, nranks: int, elem_size: int) -> OpSize:
    """nccl-tests' setupArgs + getCollByteCount for ``op``: what one row of ``size`` bytes moves."""
    count = int(size) // int(elem_size)
    n = int(nranks)
    if op in ("all_reduce", "broadcast", "reduce"):
        send, recv, param = count, count, count
    elif op == "all_gather":
        param = count // n
        send, recv = param, param * n
    elif op == "reduce_scatter":
        param = count // n
        send, recv = param * n, param
    elif op == "all_to_all":
        param = count // n
        send, recv = param * n, param * n
    else:
        raise ValueError(f"unsupported op {op!r}")
    return OpSize(size_bytes=max(send, recv) * elem_size, count=param, send_count=send, recv_count=recv)


def bandwidths(op: str, size_bytes: int, time_s: float, nranks: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 bytes/s) for a row of ``size_bytes`` that took ``time_s``."""
    if not time_s or time_s <= 0 or not math.isfinite(time_s):
        return 0.0, 0.0
    alg = size_bytes / 1e9 / time_s
    return alg, alg * bus_factor(op, nranks)


def root_of(op: str) -> int:
    return 0 if op in ("broadcast", "reduce", "gather", "scatter") else -1


def redop_of(op: str) -> str:
    return "sum" if op in ("all_reduce", "reduce_scatter", "reduce") else "none"
