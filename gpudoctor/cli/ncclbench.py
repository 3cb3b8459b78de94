"""gpudoctor nccl-bench: NCCL collectives measured like nccl-tests, printed in nccl-tests' layout.

Launches one rank per GPU with torchrun (``python -m torch.distributed.run --standalone
--nproc_per_node N -m gpudoctor.collect.ncclbench ...``), or, when this process already is a rank of
a job (RANK/WORLD_SIZE from torchrun, SLURM_PROCID/SLURM_NTASKS from srun), measures as that rank.
The launched ranks get NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 (NVLink multicast off). The worker is gpudoctor/collect/ncclbench.py.

Exit codes: 0 measured and every checked element right; 1 data corruption (#wrong > 0); 2 could not
measure (no GPU, a rank failed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gpudoctor.cli.base import Command
from gpudoctor.collect import ncclbench
from gpudoctor.collect.ncclbench import SAFETY_ENV, add_bench_arguments
from gpudoctor.errors import GpudoctorError, install_hint


def _under_launcher() -> bool:
    env = os.environ
    return ("RANK" in env and "WORLD_SIZE" in env) or ("SLURM_PROCID" in env and "SLURM_NTASKS" in env
                                                       and int(env.get("SLURM_NTASKS", "1") or 1) > 1)


def worker_argv(args: argparse.Namespace, json_path: str | None) -> list[str]:
    """The worker's arguments for the options given to the command."""
    argv = ["--ops", ",".join(args.ops), "--min-bytes", str(args.min_bytes), "--max-bytes", str(args.max_bytes),
            "--factor", str(args.factor), "--dtype", args.dtype, "--warmup", str(args.warmup),
            "--iters", str(args.iters), "--check" if args.check else "--no-check", "--backend", args.backend]
    if json_path:
        argv += ["--json", json_path]
    return argv


def launch_env(base: dict | None = None) -> dict:
    """Environment of the launched ranks: the caller's, NVLink multicast off, this gpudoctor importable."""
    env = dict(os.environ if base is None else base)
    env.update(SAFETY_ENV)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the gpudoctor package
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root] + parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _default_nproc(backend: str) -> int:
    if backend == "gloo":
        return 2
    try:
        import torch
    except ImportError:
        raise GpudoctorError(f"nccl-bench needs PyTorch: {install_hint('torch')}") from None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise GpudoctorError("no CUDA GPU visible: nccl-bench measures NCCL between GPUs")
    return n


class NcclBenchCommand(Command):
    name = "nccl-bench"
    help = "measure NCCL collectives like nccl-tests (bus bandwidth, #wrong), with the link's ceiling"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_bench_arguments(p)

    def run(self, args: argparse.Namespace) -> int:
        if _under_launcher():
            if args.nproc:
                print("gpudoctor: nccl-bench: running as one rank of the launched job; --nproc ignored",
                      file=sys.stderr)
            return ncclbench.run_rank(args)
        nproc = args.nproc or _default_nproc(args.backend)
        if nproc < 1:
            raise GpudoctorError("--nproc must be at least 1")
        if nproc == 1:
            print("gpudoctor: nccl-bench: one rank: no data crosses a link, bus bandwidths are 0 and no ceiling "
                  "applies (use --nproc 2 or more to measure a link)", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="gpudoctor-nccl-") as tmp:
            json_path = args.json or str(Path(tmp) / "nccl_bench.json")
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "gpudoctor.collect.ncclbench", *worker_argv(args, json_path), "--launched-by-cli"]
            try:
                rc = subprocess.call(cmd, env=launch_env())
            except OSError as e:
                raise GpudoctorError(f"cannot start torchrun: {e}") from None
            if rc != 0:
                raise GpudoctorError(f"nccl-bench: a rank failed (torchrun exit code {rc}); see its output above")
            try:
                doc = json.loads(Path(json_path).read_text())
            except (OSError, ValueError) as e:
                raise GpudoctorError(f"nccl-bench: no results from the ranks ({e})") from None
        wrong = int(doc.get("wrong_total") or 0)
        if wrong:
            print(f"gpudoctor: nccl-bench: data corruption: {wrong} wrong elements (#wrong column)",
                  file=sys.stderr)
            return 1
        return 0
