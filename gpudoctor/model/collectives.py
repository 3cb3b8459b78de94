"""Which collective a communication kernel belongs to, from every source a trace carries.

NCCL runs all-to-all (and, in some versions and libraries, all-gather, all-reduce or reduce-scatter of
uneven sizes) as grouped point-to-point transfers: the kernel is then named ``ncclKernel_SendRecv_*`` /
``ncclDevKernel_SendRecv`` whatever the collective was. The kernel name alone cannot tell pipeline
send/recv from an all-to-all, so the op is taken, in this order, from:

1. the profiler's own record of the call (torch.profiler ``record_param_comms`` "Collective name",
   Nsight Systems' NCCL NVTX domain with its payload): the reader's job;
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
    "" where none does. Ranges are the collective-named ones only (tens to thousands), so a
    launches x ranges test per thread, in chunks of launches, stays small."""
    out = np.full(len(launch_ns), "", dtype=object)
    if len(launch_ns) == 0 or len(r_start) == 0:
        return out
    order = np.argsort(r_start, kind="stable")
    r_tid, r_start, r_end, r_op = r_tid[order], r_start[order], r_end[order], np.asarray(r_op, dtype=object)[order]
    for tid in np.unique(launch_tid):
        on = r_tid == tid
        if not on.any():
            continue
        rs, re_, ro = r_start[on], r_end[on], r_op[on]
        idx = np.flatnonzero(launch_tid == tid)
        for lo in range(0, len(idx), chunk):
            sel = idx[lo:lo + chunk]
            t = launch_ns[sel][:, None]
            inside = (rs[None, :] <= t) & (t <= re_[None, :])
            hit = inside.any(axis=1)
            last = inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)  # latest-starting range
            out[sel[hit]] = ro[last[hit]]
    return out



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
