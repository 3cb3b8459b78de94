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
"""

from __future__ import annotations

import re

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


def collective_op(name) -> str | None:
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
