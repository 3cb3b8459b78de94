"""nccl-tests' conventions for collectives: op and dtype names, what a row of ``size`` bytes moves, the bus
bandwidth factor (nccl-tests' doc/PERFORMANCE.md). Shared by the nccl-tests reader, ``gpudoctor nccl-bench``
and the communication analyzers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
