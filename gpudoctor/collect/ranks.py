"""Which rank of a distributed job this process is, from the launcher's environment.

Launchers and the variables they set (first found wins, in this order):

=========================  ===============  ====================  ==========================  ================
launcher                   rank             world size            local rank                  job id
=========================  ===============  ====================  ==========================  ================
torchrun / torch elastic   RANK             WORLD_SIZE            LOCAL_RANK                  TORCHELASTIC_RUN_ID
Slurm (srun)               SLURM_PROCID     SLURM_STEP_NUM_TASKS  SLURM_LOCALID               SLURM_JOB_ID.SLURM_STEP_ID
Open MPI (mpirun)          OMPI_COMM_WORLD_RANK  OMPI_COMM_WORLD_SIZE  OMPI_COMM_WORLD_LOCAL_RANK  PMIX_NAMESPACE
MPICH / Intel MPI (PMI)    PMI_RANK         PMI_SIZE              MPI_LOCALRANKID             PMI_KVSNAME
=========================  ===============  ====================  ==========================  ================

``RANK`` comes first because torchrun inside a Slurm allocation sets both, and there SLURM_PROCID is the
node's task, not the worker's rank. Slurm's variables count only inside an srun job step (SLURM_STEP_ID
or SLURM_STEP_NUM_TASKS set): the batch script itself also sees SLURM_PROCID=0 and the allocation's
SLURM_NTASKS, and is a single process.

The run directory of a multi-rank job must have the same name on every rank without the ranks talking
to each other: ``job_key()`` gives a string that every rank of one job computes identically (and that
differs between jobs), or None when the environment has no such thing (then ``-o DIR`` is required).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# (rank var, world-size vars, local-rank vars) per launcher, in order of trust.
LAUNCHERS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("torchrun", "RANK", ("WORLD_SIZE",), ("LOCAL_RANK",)),
    ("slurm", "SLURM_PROCID", ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"), ("SLURM_LOCALID",)),
    ("openmpi", "OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",)),
    ("pmi", "PMI_RANK", ("PMI_SIZE",), ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")),
    ("pmix", "PMIX_RANK", ("PMIX_SIZE",), ("PMIX_LOCAL_RANK",)),
)
RANK_ENV_VARS = tuple(rank_var for _, rank_var, _, _ in LAUNCHERS)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int | None  # None when the launcher does not say
    local_rank: int | None
    source: str  # the variable the rank came from, e.g. "RANK"
    launcher: str  # torchrun | slurm | openmpi | pmi | pmix

    def to_dict(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank,
                "rank_source": self.source, "launcher": self.launcher}


def _int(env: Mapping[str, str], names: Iterable[str]) -> int | None:
    for name in names:
        value = str(env.get(name, "")).strip()
        if value.isdigit():
            return int(value)
    return None


def detect_rank(env: dict | None = None) -> RankInfo | None:
    """The rank this process has in its job, or None when no launcher variable is set."""
    env = os.environ if env is None else env
    for launcher, rank_var, size_vars, local_vars in LAUNCHERS:
        if launcher == "slurm" and not _in_srun_step(env):
            continue  # a batch script sees SLURM_PROCID=0 and the allocation's SLURM_NTASKS: not a rank
        rank = _int(env, (rank_var,))
        if rank is not None:
            return RankInfo(rank, _int(env, size_vars), _int(env, local_vars), rank_var, launcher)
    return None


_SLURM_SPECIAL_STEPS = {"4294967292", "4294967293", "4294967294", "4294967295", "batch", "extern", "interactive"}


def _in_srun_step(env: Mapping[str, str]) -> bool:
    """True inside a task that srun started (a job step), False in the batch script itself."""
    step = str(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))).strip()
    if step:
        return step not in _SLURM_SPECIAL_STEPS
    return bool(str(env.get("SLURM_STEP_NUM_TASKS", "")).strip())


def is_multi_rank(info: RankInfo | None) -> bool:
    """True when the process is one of several ranks (or a rank > 0 of a job of unknown size)."""
    if info is None:
        return False
    return (info.world_size or 0) > 1 or info.rank > 0


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _clean(text: str, limit: int = 48) -> str:
    return _UNSAFE.sub("_", text).strip("._-")[:limit] or "job"


def _proc_start_utc(pid: int) -> str | None:
    """When a process started, as a compact UTC time (Linux /proc), to tell reused pids apart."""
    import time

    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        started = btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))


def job_key(env: dict | None = None, info: RankInfo | None = None) -> str | None:
    """A name every rank of the same job computes identically, or None.

    - ranks started by srun: the Slurm job and step ids;
    - torchrun with a rendezvous id (``--rdzv-id``, or ``--standalone`` which makes one up): that id;
    - torchrun with the default run id "none" inside an srun step: the Slurm job and step ids;
    - torchrun on one node with run id "none": the launcher agent (the parent of every worker) named by
      its start time and pid -- the same for all local workers, new for each launch;
    - Open MPI / PMIx: the PMIx namespace; MPICH/Hydra: the PMI KVS name.
    """
    env = os.environ if env is None else env
    info = info if info is not None else detect_rank(env)

    def slurm() -> str | None:
        if env.get("SLURM_JOB_ID") and _in_srun_step(env):
            step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
            return _clean(f"slurm{env['SLURM_JOB_ID']}" + (f".{step}" if step else ""))
        return None

    if info is not None and info.launcher == "slurm":
        return slurm()
    restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    suffix = f"-r{restart}" if restart not in ("", "0") else ""
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id.lower() != "none":
        return _clean(f"torchrun-{run_id}{suffix}")
    if "TORCHELASTIC_RUN_ID" in env or "TORCHELASTIC_RESTART_COUNT" in env:
        key = slurm()
        if key:
            return _clean(key + suffix)
        local_world = _int(env, ("LOCAL_WORLD_SIZE",))
        world = info.world_size if info else None
        if local_world is not None and world is not None and local_world == world:  # one node: one agent
            ppid = os.getppid()
            started = _proc_start_utc(ppid)
            if started is not None:
                return _clean(f"torchrun-{started}-{ppid}{suffix}")
        return None
    for var in ("PMIX_NAMESPACE", "PMI_KVSNAME"):
        if env.get(var):
            return _clean(f"mpi-{env[var]}")
    return slurm()
