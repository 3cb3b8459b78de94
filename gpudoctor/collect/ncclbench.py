"""The per-rank worker of ``gpudoctor nccl-bench``: NCCL collectives measured like nccl-tests.

Run by ``gpudoctor nccl-bench`` through torchrun (``python -m torch.distributed.run --nproc_per_node N
-m gpudoctor.collect.ncclbench ...``), or directly as one rank of a job started by torchrun or srun.

For every op and size (``--min-bytes`` to ``--max-bytes``, times ``--factor``), out-of-place then
in-place, as nccl-tests does (src/common.cu TimeTest/BenchTime):

- buffers are allocated once per op at the largest size; each size uses views of them;
- one untimed call, then ``--iters`` calls timed on the GPU with CUDA events: the GPU is first held by a
  short spin kernel (``torch.cuda._sleep``) so that the host enqueues every iteration before the first
  one runs; no synchronization inside the loop (a barrier before it aligns the ranks' hosts); time =
  elapsed / iters, averaged over ranks (nccl-tests' default ``-a 1``);
- with ``--check``: inputs filled with rank-dependent values, the op run once more, and every output
  element compared with its expected value on the GPU; ``#wrong`` is the number of wrong elements,
  summed over ranks. Values are small integers, so sums are exact in every dtype.

Sizes, counts, algbw and busbw follow nccl-tests (gpudoctor.model.collectives: op_sizes, bus_factor).
The table is printed in nccl-tests' layout so that ``gpudoctor analyze`` (and other nccl-tests tools)
read it; the JSON holds the same rows plus the link, its ceiling and the fraction of it reached.

torch.distributed has no out-of-place all-reduce or broadcast: for those two ops the out-of-place
half runs the (in-place) call on the separate output buffer, the in-place half on the input buffer.
all-gather, reduce-scatter and all-to-all run truly out-of-place and in-place (the input a slice of
the output, or the same buffer), as NCCL defines in-place for them. In-place all-to-all is timed but
not checked (nccl-tests reports N/A there too: NCCL does not define it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Callable

from gpudoctor import __version__
from gpudoctor.collect.nccltests_layout import format_footer, format_row, format_run_header, format_table_header
from gpudoctor.errors import GpudoctorError, install_hint
from gpudoctor.model.collectives import DTYPE_TYPES, OP_BINARIES, bandwidths, bus_factor, op_sizes, redop_of, root_of

if TYPE_CHECKING:
    from types import ModuleType

    from torch import Tensor
    from torch import device as TorchDevice
    from torch import dtype as TorchDtype
    from torch._C import _CudaDeviceProperties

    from gpudoctor.model.collectives import OpSize

ALL_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
OP_ALIASES = {
    "allreduce": "all_reduce", "all_reduce": "all_reduce", "allgather": "all_gather", "all_gather": "all_gather",
    "reducescatter": "reduce_scatter", "reduce_scatter": "reduce_scatter", "broadcast": "broadcast",
    "bcast": "broadcast", "alltoall": "all_to_all", "all_to_all": "all_to_all", "a2a": "all_to_all",
}
DTYPES = ("float32", "bfloat16", "float16")
# Largest integer every value up to which the dtype holds exactly (sums of the check pattern stay below).
_EXACT = {"float32": 1 << 24, "bfloat16": 256, "float16": 2048}
PATTERN = 8  # period of the check pattern
SAFETY_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# NVLink: GB/s per direction per link, by generation, and where the number comes from.
NVLINK_GBPS_PER_LINK = {1: 20.0, 2: 25.0, 3: 25.0, 4: 25.0, 5: 50.0}
NVLINK_SOURCES = {
    1: "NVIDIA Tesla P100 whitepaper: 4 NVLink 1 links, 160 GB/s bidirectional in all (40 GB/s per link)",
    2: "NVIDIA Tesla V100 whitepaper: 6 NVLink 2 links, 300 GB/s bidirectional in all (50 GB/s per link)",
    3: "NVIDIA A100 Tensor Core GPU Architecture whitepaper: 12 NVLink 3 links, 600 GB/s bidirectional in all",
    4: "NVIDIA H100 Tensor Core GPU Architecture whitepaper and H100/H200 datasheets: 18 NVLink 4 links, "
       "900 GB/s bidirectional in all (50 GB/s per link, 25 GB/s per direction)",
    5: "NVIDIA Blackwell architecture technical brief / B200 datasheet: 18 NVLink 5 links, 1.8 TB/s "
       "bidirectional in all (100 GB/s per link, 50 GB/s per direction)",
}
# The NVLink generation of each GPU architecture (compute capability major).
_NVLINK_BY_ARCH = {6: 1, 7: 2, 8: 3, 9: 4, 10: 5}
# nvmlNvlinkVersion_t (newer NVML) -> NVLink generation.
_NVML_NVLINK_ENUM = {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 5, 8: 6}
# PCIe: GB/s per lane per direction after line encoding (PCI-SIG base specs: 2.5/5 GT/s with 8b/10b,
# 8/16/32 GT/s with 128b/130b, 64 GT/s PAM4 with 242B/256B FLITs).
PCIE_GBPS_PER_LANE = {1: 0.25, 2: 0.5, 3: 8 * 128 / 130 / 8, 4: 16 * 128 / 130 / 8, 5: 32 * 128 / 130 / 8,
                      6: 64 * 242 / 256 / 8}
PCIE_SOURCE = ("PCI-SIG PCI Express base specifications: per-lane signaling rate and encoding "
               "(gen3 8 GT/s, gen4 16 GT/s, gen5 32 GT/s with 128b/130b; gen6 64 GT/s FLIT mode)")


# ----------------------------------------------------------------------------------------------------
# Arguments


def parse_size(text: str | int) -> int:
    """nccl-tests' size syntax: a number with an optional K, M or G suffix (powers of 1024)."""
    if isinstance(text, int):
        return text
    s = str(text).strip()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    mult = 1
    if s and s[-1].lower() in units:
        mult = units[s[-1].lower()]
        s = s[:-1]
    elif s.lower().endswith(("kb", "mb", "gb")):
        mult = units[s[-2].lower()]
        s = s[:-2]
    try:
        value = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8, 64K, 128M, 1G)") from None
    if value < 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(value * mult)


def parse_ops(text: str) -> list[str]:
    if text.strip().lower() == "all":
        return list(ALL_OPS)
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if not tok:
            continue
        if tok not in OP_ALIASES:
            raise argparse.ArgumentTypeError(f"unknown op {tok!r}; choose from {', '.join(ALL_OPS)}")
        if OP_ALIASES[tok] not in out:
            out.append(OP_ALIASES[tok])
    if not out:
        raise argparse.ArgumentTypeError("no op given")
    return out


def sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    """nccl-tests' sweep: min, min*factor, ... while <= max (factor 1 means the min size only)."""
    if min_bytes < 1 or max_bytes < min_bytes:
        raise GpudoctorError(f"bad size range: min {min_bytes} B, max {max_bytes} B")
    out, s = [], min_bytes
    while s <= max_bytes:
        out.append(s)
        if factor <= 1:
            break
        s *= factor
    return out


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="ranks to launch on this host (default: all local GPUs); ignored under torchrun/srun")
    p.add_argument("--ops", type=parse_ops, default=list(ALL_OPS), metavar="OPS",
                   help="comma-separated: all_reduce,all_gather,reduce_scatter,broadcast,all_to_all (default all)")
    p.add_argument("--min-bytes", type=parse_size, default=8, metavar="SIZE", help="smallest size (default 8)")
    p.add_argument("--max-bytes", type=parse_size, default=1 << 30, metavar="SIZE", help="largest size (default 1G)")
    p.add_argument("--factor", type=int, default=2, help="size multiplier between rows (default 2)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="element type (default float32)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up iterations per op (default 5)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per size and mode (default 20)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="verify every output element once per size and mode (#wrong column; default on)")
    p.add_argument("--backend", choices=("nccl", "gloo"), default="nccl", help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------------------------------
# Link and ceiling


def nvlink_generation(raw_version: int, compute_major: int | None) -> int:
    """NVLink generation from nvmlDeviceGetNvLinkVersion's value.

    NVML returned the plain major version on older drivers and nvmlNvlinkVersion_t (6 = 4.0, 7 = 5.0)
    on newer ones; the GPU architecture says which reading is right.
    """
    expected = _NVLINK_BY_ARCH.get(compute_major) if compute_major is not None else None
    if expected is not None:  # the architecture fixes the generation, whichever way NVML encoded it
        return expected
    if raw_version >= 6:
        return _NVML_NVLINK_ENUM.get(raw_version, raw_version)
    return raw_version


def link_ceiling(link: dict) -> dict:
    """Per-GPU unidirectional bandwidth ceiling (GB/s, 1e9 B/s) of the link ``link_info`` described."""
    if link.get("kind") == "nvlink" and link.get("links"):
        gen = int(link["generation"])
        per = NVLINK_GBPS_PER_LINK.get(gen)
        if per is None:
            return {"gbps": None, "basis": f"NVLink {gen}: no per-link figure known", "source": ""}
        return {"gbps": per * link["links"],
                "basis": f"{link['links']} links x {per:g} GB/s per direction (NVLink {gen})",
                "source": NVLINK_SOURCES.get(gen, "")}
    if link.get("kind") == "pcie" and link.get("generation") and link.get("width"):
        per = PCIE_GBPS_PER_LANE.get(int(link["generation"]))
        if per is None:
            return {"gbps": None, "basis": f"PCIe gen{link['generation']}: no per-lane figure known", "source": ""}
        return {"gbps": per * link["width"],
                "basis": f"PCIe gen{link['generation']} x{link['width']}: {per:.3f} GB/s per lane per direction",
                "source": PCIE_SOURCE}
    return {"gbps": None, "basis": "link unknown", "source": ""}


def describe_link(link: dict) -> str:
    if link.get("kind") == "nvlink":
        s = f"NVLink {link['generation']}, {link['links']} links"
        if link.get("pcie_generation"):
            s += f" (PCIe gen{link['pcie_generation']} x{link.get('pcie_width')} to the host)"
        return s
    if link.get("kind") == "pcie":
        return f"PCIe gen{link['generation']} x{link['width']}"
    return f"unknown ({link.get('error', 'no NVML')})"


def _nvml_handle(pynvml, device_index: int, props) -> object:
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        u = str(uuid)
        for cand in (u if u.startswith(("GPU-", "MIG-")) else f"GPU-{u}",):
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(cand)
            except Exception:  # noqa: BLE001 - NVML raises its own error types
                pass
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        pci = f"{int(getattr(props, 'pci_domain_id', 0)):08x}:{int(bus):02x}:{int(getattr(props, 'pci_device_id', 0)):02x}.0"
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(pci)
        except Exception:  # noqa: BLE001
            pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    index = device_index
    if ids and device_index < len(ids) and ids[device_index].isdigit():
        index = int(ids[device_index])
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def link_info(device_index: int = 0, props: _CudaDeviceProperties | None = None) -> dict:
    """The GPU's links as NVML sees them: active NVLink links and their generation, and the PCIe link."""
    try:
        import pynvml
    except ImportError:
        return {"kind": "unknown", "error": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001
        return {"kind": "unknown", "error": f"NVML init failed: {e}"}
    try:
        h = _nvml_handle(pynvml, device_index, props)
        major = getattr(props, "major", None)
        active, raw_versions = 0, set()
        for link in range(int(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18))):
            try:
                state = pynvml.nvmlDeviceGetNvLinkState(h, link)
            except Exception:  # noqa: BLE001 - link absent or NVLink unsupported
                continue
            if state == getattr(pynvml, "NVML_FEATURE_ENABLED", 1):
                active += 1
                try:
                    raw_versions.add(int(pynvml.nvmlDeviceGetNvLinkVersion(h, link)))
                except Exception:  # noqa: BLE001
                    pass
        out: dict = {}
        try:
            out["pcie_generation"] = int(pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h))
            out["pcie_width"] = int(pynvml.nvmlDeviceGetCurrPcieLinkWidth(h))
        except Exception:  # noqa: BLE001
            pass
        if active:
            raw = max(raw_versions) if raw_versions else 0
            out.update(kind="nvlink", links=active, nvml_version=raw,
                       generation=nvlink_generation(raw, major) if (raw or major) else 0)
        elif "pcie_generation" in out:
            out.update(kind="pcie", generation=out["pcie_generation"], width=out["pcie_width"])
        else:
            out.update(kind="unknown", error="NVML reports neither NVLink nor PCIe link")
        out["source"] = "NVML nvmlDeviceGetNvLinkState/Version, nvmlDeviceGetCurrPcieLinkGeneration/Width"
        return out
    except Exception as e:  # noqa: BLE001
        return {"kind": "unknown", "error": f"NVML: {e}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------------------------------
# Check pattern (pure tensor functions, unit-tested on CPU)


def pattern_k(dtype: str, nranks: int) -> int:
    """Largest value of the check pattern: n x k must stay exactly representable in ``dtype``."""
    return max(1, min(PATTERN, _EXACT[dtype] // max(nranks, 1)))


def pattern(torch: ModuleType, rank: int, k: int, dtype: TorchDtype, device: TorchDevice) -> Tensor:
    """The period-PATTERN vector rank ``rank`` fills its input with: ((rank + i) % PATTERN) % k + 1."""
    i = torch.arange(PATTERN, device=device)
    return (((rank + i) % PATTERN) % k + 1).to(dtype)


def _periodic(vec, offset: int):
    import torch
    return torch.roll(vec, -(offset % len(vec)))


def fill(x: Tensor, vec: Tensor, offset: int = 0) -> None:
    """x[i] = vec[(offset + i) % len(vec)] without a buffer the size of x."""
    v = _periodic(vec, offset)
    p = len(v)
    n = x.numel()
    full = n // p
    if full:
        x[: full * p].view(full, p).copy_(v.expand(full, p))
    if n - full * p:
        x[full * p:].copy_(v[: n - full * p])


def count_wrong(x: Tensor, vec: Tensor, offset: int = 0) -> int:
    """Elements of x that differ from vec[(offset + i) % len(vec)]."""
    v = _periodic(vec, offset)
    p = len(v)
    n = x.numel()
    full = n // p
    wrong = 0
    if full:
        wrong += int((x[: full * p].view(full, p) != v.expand(full, p)).sum().item())
    if n - full * p:
        wrong += int((x[full * p:] != v[: n - full * p]).sum().item())
    return wrong


# ----------------------------------------------------------------------------------------------------
# One op


class OpBench:
    """Buffers and calls of one op, for every size of the sweep."""

    def __init__(self, torch, dist, op: str, dtype: str, device, rank: int, nranks: int, max_bytes: int):
        self.torch, self.dist, self.op, self.dtype_name = torch, dist, op, dtype
        self.dtype = getattr(torch, dtype)
        self.esize = torch.empty(0, dtype=self.dtype).element_size()
        self.device, self.rank, self.n = device, rank, nranks
        big = op_sizes(op, max_bytes, nranks, self.esize)
        self.send = torch.zeros(max(big.send_count, 1), dtype=self.dtype, device=device)
        self.recv = torch.zeros(max(big.recv_count, 1), dtype=self.dtype, device=device)
        k = pattern_k(dtype, nranks)
        self.vecs = [pattern(torch, r, k, self.dtype, device) for r in range(nranks)]
        self.sumvec = torch.stack(self.vecs).sum(0).to(self.dtype)
        self.set_size(max_bytes)

    def set_size(self, size: int) -> OpSize:
        self.sz = op_sizes(self.op, size, self.n, self.esize)
        self.s = self.send[: self.sz.send_count]
        self.r = self.recv[: self.sz.recv_count]
        return self.sz

    # the calls -------------------------------------------------------------------------------------
    def call(self, in_place: bool) -> None:
        d, op, s, r, c, rank = self.dist, self.op, self.s, self.r, self.sz.count, self.rank
        if op == "all_reduce":
            d.all_reduce(s if in_place else r)
        elif op == "broadcast":
            d.broadcast(s if in_place else r, src=0)
        elif op == "all_gather":
            d.all_gather_into_tensor(r, r.narrow(0, rank * c, c) if in_place else s)
        elif op == "reduce_scatter":
            d.reduce_scatter_tensor(s.narrow(0, rank * c, c) if in_place else r, s)
        elif op == "all_to_all":
            d.all_to_all_single(r, r if in_place else s)
        else:
            raise ValueError(op)

    # the check -------------------------------------------------------------------------------------
    def check(self, in_place: bool) -> int | None:
        """Fill, run once, count wrong elements on this rank (None where nccl-tests reports N/A)."""
        op, s, r, c, rank, n = self.op, self.s, self.r, self.sz.count, self.rank, self.n
        mine = self.vecs[rank]
        if op == "all_to_all" and in_place:
            return None
        if op == "all_reduce":
            fill(s, mine)
            if not in_place:
                r.copy_(s)
            self.call(in_place)
            self._sync()
            return count_wrong(s if in_place else r, self.sumvec)
        if op == "broadcast":
            buf = s if in_place else r
            if rank == 0:
                fill(buf, self.vecs[0])
            else:
                buf.zero_()
            self.call(in_place)
            self._sync()
            return count_wrong(buf, self.vecs[0])
        if op == "all_gather":
            r.zero_()
            fill(r.narrow(0, rank * c, c) if in_place else s, mine)
            self.call(in_place)
            self._sync()
            return sum(count_wrong(r.narrow(0, j * c, c), self.vecs[j]) for j in range(n))
        if op == "reduce_scatter":
            fill(s, mine)
            r.zero_()
            self.call(in_place)
            self._sync()
            return count_wrong(s.narrow(0, rank * c, c) if in_place else r, self.sumvec, rank * c)
        if op == "all_to_all":
            fill(s, mine)
            r.zero_()
            self.call(False)
            self._sync()
            return sum(count_wrong(r.narrow(0, j * c, c), self.vecs[j], rank * c) for j in range(n))
        raise ValueError(op)

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def free(self) -> None:
        del self.send, self.recv, self.s, self.r


# ----------------------------------------------------------------------------------------------------
# Timing


class Timer:
    """CUDA-event timing of a loop of calls (host clock only for the gloo/CPU test backend)."""

    def __init__(self, torch, device, barrier=None):
        self.torch, self.device, self.barrier = torch, device, barrier
        self.cuda = device.type == "cuda"
        self.host_per_call_s = 50e-6
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def calibrate(self, fn: Callable[[], object], n: int) -> None:
        """Host seconds per enqueued call (sets how long the GPU is held before a timed loop)."""
        if n <= 0:
            return
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self.host_per_call_s = max((time.perf_counter() - t0) / n, 1e-6)
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], iters: int) -> float:
        """Seconds per call."""
        torch = self.torch
        if self.barrier is not None:  # every rank's host starts the loop at about the same time
            if self.cuda:
                torch.cuda.synchronize(self.device)
            self.barrier()
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) / iters
        torch.cuda.synchronize(self.device)
        # Hold the GPU long enough for the host to enqueue every iteration (about 2 GHz SM clock).
        hold_s = min(0.05, max(2e-4, 2.0 * iters * self.host_per_call_s + 1e-4))
        torch.cuda._sleep(int(hold_s * 2e9))
        self.start.record()
        for _ in range(iters):
            fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) * 1e-3 / iters


# ----------------------------------------------------------------------------------------------------
# The run


def _launch_env() -> dict:
    """RANK/WORLD_SIZE/LOCAL_RANK from torchrun, or derived from srun's SLURM_* variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"rank": int(env["RANK"]), "world": int(env["WORLD_SIZE"]),
                "local": int(env.get("LOCAL_RANK", env["RANK"]))}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", rank))
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local))
        if "MASTER_ADDR" not in env:
            os.environ["MASTER_ADDR"] = _slurm_master() or "127.0.0.1"
        if "MASTER_PORT" not in env:
            job = env.get("SLURM_JOB_ID", "0")
            os.environ["MASTER_PORT"] = str(20000 + (int(job) if job.isdigit() else 0) % 20000)
        return {"rank": rank, "world": world, "local": local}
    raise GpudoctorError("not launched as a rank: RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS "
                         "(srun) are not set; run 'gpudoctor nccl-bench' to launch the ranks")


def _slurm_master() -> str | None:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
    if not nodes:
        return None
    import subprocess
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=20)
        first = out.stdout.split()
        if first:
            return first[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodes.split(",")[0] if "[" not in nodes else None


def _device_record(torch, rank: int, device) -> dict:
    rec = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "device": 0, "bus": "", "name": "CPU"}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        bus = getattr(props, "pci_bus_id", None)
        rec.update(device=idx, name=props.name,
                   bus=f"0x{int(bus):02x}" if bus is not None else "",
                   compute_capability=f"{props.major}.{props.minor}",
                   uuid=str(getattr(props, "uuid", "")))
    return rec


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_rank(args: argparse.Namespace) -> int:
    """Measure as one rank of a job. Rank 0 prints the table and writes the JSON. Returns the exit code."""
    for k, v in SAFETY_ENV.items():
        os.environ.setdefault(k, v)
    launch = _launch_env()
    import warnings
    # torch >= 2.12 renames all_gather_into_tensor/reduce_scatter_tensor; the old names work everywhere.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated", category=FutureWarning)
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        raise GpudoctorError(f"nccl-bench needs PyTorch: {install_hint('torch')}") from None
    backend = args.backend
    rank, world, local = launch["rank"], launch["world"], launch["local"]
    if rank == 0:  # before NCCL starts (and maybe logs): readers sniff the first lines
        _print(f"# gpudoctor nccl-bench {__version__}: NCCL collectives in the nccl-tests layout\n")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise GpudoctorError("no CUDA GPU visible: nccl-bench measures NCCL on GPUs")
        if local >= torch.cuda.device_count():
            raise GpudoctorError(f"local rank {local} has no GPU (this host has {torch.cuda.device_count()})")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        return _bench(torch, dist, args, rank, world, device, backend)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def largest_line(op: str, result: dict, ceiling: dict, world: int) -> str:
    """The summary line of ``op``'s largest size: its bus bandwidth against the link's ceiling, or, with
    one rank, that there is no link to measure."""
    size = result["largest"]["size_bytes"]
    if world == 1:
        return (f"# gpudoctor {op} largest: {size} B; one rank: no data crosses a link, so there is no bus "
                "bandwidth to compare with a ceiling (run with --nproc 2 or more)")
    f = result["fraction_of_ceiling"]
    return (f"# gpudoctor {op} largest: {size} B, busbw {result['largest']['busbw_gbps']:.1f} GB/s"
            + (f" = {100 * f:.1f}% of the {ceiling['gbps']:.0f} GB/s ceiling" if f is not None else ""))


def _bench(torch, dist, args, rank: int, world: int, device, backend: str) -> int:
    me = _device_record(torch, rank, device)
    devices = [None] * world
    dist.all_gather_object(devices, me)
    main = rank == 0
    nccl_version = _nccl_version(torch) if backend == "nccl" else ""
    link, ceiling = {"kind": "unknown", "error": "CPU backend"}, {"gbps": None, "basis": "", "source": ""}
    if main and device.type == "cuda":
        link = link_info(device.index, torch.cuda.get_device_properties(device.index))
        ceiling = link_ceiling(link)
    method = ("CUDA events around --iters back-to-back calls (GPU held by a spin kernel while the host enqueues "
              "them), time averaged over ranks" if device.type == "cuda"
              else "host clock around --iters calls (gloo/CPU test backend, not a GPU measurement)")
    if main:
        _print_preamble(torch, args, backend, nccl_version, world, link, ceiling, method)
    results: dict = {}
    wrong_total = 0
    for op in args.ops:
        results[op], wrong = _bench_op(torch, dist, args, op, rank, world, device, devices, ceiling)
        wrong_total += wrong
    if main:
        tail = [largest_line(op, r, ceiling, world) for op, r in results.items() if r["largest"]]
        tail.append(f"# gpudoctor wrong elements: {wrong_total}" + (" (DATA CORRUPTION)" if wrong_total else ""))
        _print("\n".join(tail) + "\n")
        if args.json:
            _write_json(args.json, {
                "tool": "gpudoctor nccl-bench", "schema": 1, "backend": backend, "world_size": world,
                "nccl_version": nccl_version, "torch_version": torch.__version__, "dtype": args.dtype,
                "parameters": {"min_bytes": args.min_bytes, "max_bytes": args.max_bytes, "factor": args.factor,
                               "warmup": args.warmup, "iters": args.iters, "check": bool(args.check)},
                "method": method, "devices": devices, "link": link, "ceiling": ceiling,
                "env": {k: os.environ.get(k) for k in sorted(os.environ) if k.startswith(("NCCL_", "TORCH_NCCL"))
                        or k in SAFETY_ENV},
                "ops": results, "wrong_total": wrong_total,
            })
    if wrong_total:
        if main:
            print(f"gpudoctor: nccl-bench: data corruption: {wrong_total} wrong elements", file=sys.stderr)
        return 0 if getattr(args, "launched_by_cli", False) else 1
    return 0


def _nccl_version(torch) -> str:
    try:
        v = torch.cuda.nccl.version()
        return ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001
        return ""


def _print_preamble(torch, args, backend: str, nccl_version: str, world: int, link: dict, ceiling: dict,
                    method: str) -> None:
    pre = [f"# gpudoctor nccl-bench: torch.distributed {backend}"
           + (f", NCCL {nccl_version}" if nccl_version else "") + f", torch {torch.__version__}, "
           f"{world} ranks, dtype {args.dtype}",
           f"# gpudoctor link: {describe_link(link)}",
           "# gpudoctor ceiling: " + (f"{ceiling['gbps']:.1f} GB/s per direction per GPU, {ceiling['basis']}; "
                                      f"source: {ceiling['source']}" if ceiling["gbps"] else "unknown"),
           f"# gpudoctor method: {method}",
           "# gpudoctor env: " + " ".join(f"{k}={os.environ.get(k, '')}" for k in SAFETY_ENV)]
    _print("\n".join(pre) + "\n")


def _bench_op(torch, dist, args, op: str, rank: int, world: int, device, devices: list,
              ceiling: dict) -> tuple[dict, int]:
    """One collective over every size, printed as nccl-tests prints it: (its result, wrong elements)."""
    main = rank == 0
    size_list = sizes(args.min_bytes, args.max_bytes, args.factor)
    bench = OpBench(torch, dist, op, args.dtype, device, rank, world, args.max_bytes)
    binary = OP_BINARIES[op]
    if main:
        _print(format_run_header(nthreads=1, ngpus=1, min_bytes=args.min_bytes, max_bytes=args.max_bytes,
                                 factor=args.factor, warmup=args.warmup, iters=args.iters, check=args.check,
                                 devices=devices, binary=binary))
        _print(format_table_header())
    timer = Timer(torch, device, barrier=dist.barrier)
    # Warm-up at the largest and the smallest size (nccl-tests TimeTest), also calibrating the host.
    for size in (size_list[-1], size_list[0]):
        if bench.set_size(size).count:
            timer.calibrate(lambda: bench.call(False), max(args.warmup, 1))
    rows, busbws, oob, wrong_total = [], [], 0, 0
    for size in size_list:
        sz = bench.set_size(size)
        if sz.count == 0:
            continue  # fewer elements than ranks
        row, printed = _size_row(torch, dist, args, op, bench, timer, sz, world, device)
        for _, _, bus, w in printed:
            busbws.append(bus)
            if w:
                oob += 1
                wrong_total += w
        rows.append(row)
        if main:
            _print(format_row(sz.size_bytes, sz.count, DTYPE_TYPES[args.dtype], redop_of(op), root_of(op), printed))
    avg = sum(busbws) / len(busbws) if busbws else 0.0
    if main:
        _print(format_footer(oob, avg, binary))
    bench.free()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return _op_result(op, binary, rows, avg, oob, ceiling, world), wrong_total


def _size_row(torch, dist, args, op: str, bench, timer, sz, world: int, device) -> tuple[dict, list]:
    """Out-of-place and in-place timings of one size, averaged over ranks (wrong elements summed)."""
    per_mode = []
    for in_place in (False, True):
        bench.call(in_place)  # untimed: connections and the size's first call
        t = timer.time(lambda: bench.call(in_place), args.iters)
        wrong = bench.check(in_place) if args.check else None
        per_mode.append((t, wrong))
    vals = torch.tensor([per_mode[0][0], per_mode[1][0], float(per_mode[0][1] or 0), float(per_mode[1][1] or 0)],
                        dtype=torch.float64, device=device)
    dist.all_reduce(vals)
    t_oop, t_ip = float(vals[0]) / world, float(vals[1]) / world
    w_oop = None if per_mode[0][1] is None else int(round(float(vals[2])))
    w_ip = None if per_mode[1][1] is None else int(round(float(vals[3])))
    row = {"size_bytes": sz.size_bytes, "count": sz.count, "type": DTYPE_TYPES[args.dtype], "dtype": args.dtype,
           "redop": redop_of(op), "root": root_of(op)}
    printed = []
    for mode, t, w in (("out_of_place", t_oop, w_oop), ("in_place", t_ip, w_ip)):
        alg, bus = bandwidths(op, sz.size_bytes, t, world)
        if world == 1:
            bus = 0.0  # one rank: no byte crosses a link (a broadcast to itself is a no-op)
        row[mode] = {"time_us": t * 1e6, "algbw_gbps": alg, "busbw_gbps": bus, "wrong": w}
        printed.append((t * 1e6, alg, bus, w))
    return row, printed


def _op_result(op: str, binary: str, rows: list, avg: float, oob: int, ceiling: dict, world: int) -> dict:
    largest = rows[-1] if rows else None
    best = max(largest["out_of_place"]["busbw_gbps"], largest["in_place"]["busbw_gbps"]) if largest else None
    frac = best / ceiling["gbps"] if best is not None and ceiling["gbps"] and world > 1 else None
    return {"binary": binary, "bus_factor": bus_factor(op, world), "rows": rows,
            "avg_busbw_gbps": avg, "out_of_bounds": oob,
            "largest": {"size_bytes": largest["size_bytes"], "busbw_gbps": best} if largest else None,
            "fraction_of_ceiling": frac}


def _write_json(target: str, doc: dict) -> None:
    from pathlib import Path

    from gpudoctor.store.atomic import atomic_write_text
    if target != "-":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(doc, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpudoctor.collect.ncclbench",
                                description="one rank of gpudoctor nccl-bench (start it with torchrun or srun)")
    add_bench_arguments(p)
    p.add_argument("--launched-by-cli", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        return run_rank(args)
    except GpudoctorError as e:
        print(f"gpudoctor: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
