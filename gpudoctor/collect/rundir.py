"""The run directory that ``gpudoctor profile`` writes, and its manifest.

Layout (single process)::

    RUN_DIR/
      manifest.json          what ran, where, how it ended, with what; "reports" lists the raw reports
      raw/                   the reports as the tools wrote them
        trace.nsys-rep       nsys backend: the report ...
        trace.sqlite         ... and its SQLite export (what gets analyzed)
        trace.qdstrm         only when nsys could not finish its report
        trace.torch.json.gz  torch backend: the Chrome trace (gzip)
        nvml.csv             NVML samples (gpudoctor.collect.nvml)
        kernels.*            --kernels: Nsight Compute report and CSV pages
        *.log                tool logs (nsys export, ncu)
      run.db                 the parsed trace model (gpudoctor.store.rundb)
      analysis.json          the analysis (docs/json-schema.md)

Multi-rank jobs write into one directory: every rank writes ``raw/rank<N>.*`` and its own
``manifest.rank<N>.json``; the rank that finishes last (or the ``--nproc`` launcher) merges them into
``manifest.json`` (with a ``ranks`` list) and writes run.db and analysis.json for the whole job.

``manifest.json`` "reports" entries are ``{"path": relative to RUN_DIR, "format": ..., "rank": N}`` with
format one of nsys_sqlite, nsys_rep (export failed: the report itself), kineto_json, ncu_csv and
nvml_csv (read with ``gpudoctor.collect.nvml.read_trace``). "files" lists every raw file, analyzable or not.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpudoctor.errors import GpudoctorError

RAW = "raw"
MANIFEST = "manifest.json"
RUN_DB = "run.db"
ANALYSIS = "analysis.json"
DEFAULT_BASE = "gpudoctor-runs"
MIN_FREE_BYTES = 100 * 1024 * 1024
MANIFEST_VERSION = 1
_RANK_MANIFEST = re.compile(r"^manifest\.rank(\d+)\.json$")
# Entries of a run directory that --force may remove (and that make a directory "a gpudoctor run").
RUNNING = ".running"  # held (flock) by the gpudoctor process that is writing the run
_RUN_ENTRIES = (MANIFEST, RAW, RUN_DB, ANALYSIS, ".lock", RUNNING)


def rank_manifest_name(rank: int) -> str:
    return f"manifest.rank{rank}.json"


def file_stem(rank: int | None, multi: bool) -> str:
    """Base name of this process's raw files: "trace" (single process) or "rank<N>"."""
    return f"rank{rank}" if multi else "trace"


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str, limit: int = 40) -> str:
    return _UNSAFE.sub("_", text).strip("._-")[:limit] or "program"


def default_run_dir(program: str, job_key: str | None = None, base: str | Path = DEFAULT_BASE,
                    now: _dt.datetime | None = None) -> Path:
    """gpudoctor-runs/<UTC time>-<program>/ (single process; -2, -3... if taken) or
    gpudoctor-runs/<job key>-<program>/ (every rank of a job computes the same name)."""
    base = Path(base)
    if job_key:
        return base / f"{safe_name(job_key, 80)}-{safe_name(program)}"
    stamp = (now or utc_now()).strftime("%Y%m%dT%H%M%SZ")
    path = base / f"{stamp}-{safe_name(program)}"
    n = 2
    while path.exists():
        path = base / f"{stamp}-{safe_name(program)}-{n}"
        n += 1
    return path


def holds_run(path: Path) -> bool:
    """A directory that is analyzed as one run (``gpudoctor analyze DIR``, the gate): it has manifest.json
    or run.db."""
    return (path / MANIFEST).exists() or (path / RUN_DB).exists()


def _is_run_dir(path: Path) -> bool:
    return (path / MANIFEST).exists() or (path / RAW).is_dir() or (path / RUN_DB).exists() or any(
        _RANK_MANIFEST.match(p.name) for p in path.iterdir())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def prepare(run_dir: Path, force: bool, rank: int | None = None, multi: bool = False,
            clear_shared: bool = True) -> None:
    """Make ``run_dir`` ready for this process's files, before the program starts.

    Single process: the directory must not exist or be empty; with ``force`` an earlier gpudoctor run
    there is removed (a directory that holds no gpudoctor run is never emptied). Multi-rank: only this
    rank's files count, and with ``force`` only they are removed (plus the merged outputs, by rank 0).
    Then: the directory must be writable and its filesystem have MIN_FREE_BYTES free.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise GpudoctorError(f"{run_dir}: exists and is not a directory")
    if run_dir.is_dir():
        if multi:
            mine = [run_dir / rank_manifest_name(rank)] + sorted((run_dir / RAW).glob(f"rank{rank}.*"))
            mine = [p for p in mine if p.exists()]
            if mine and not force:
                raise GpudoctorError(f"{run_dir}: already holds rank {rank}'s results of an earlier run "
                                     "(use --force to replace them, or -o to choose another directory)")
            try:
                for p in mine:
                    _remove(p)
                if force and rank == 0 and clear_shared:
                    for name in (MANIFEST, RUN_DB, ANALYSIS):
                        _remove(run_dir / name)
            except OSError as e:
                raise GpudoctorError(f"{run_dir}: cannot remove the earlier run: {e.strerror or e}") from None
        elif any(run_dir.iterdir()):
            if in_progress(run_dir):
                raise GpudoctorError(f"{run_dir}: a run is still being written there by another gpudoctor "
                                     "process; choose another directory with -o")
            if not force:
                raise GpudoctorError(f"{run_dir}: a run directory is already there (use --force to replace it, "
                                     "or -o to choose another directory)")
            if not _is_run_dir(run_dir):
                raise GpudoctorError(f"{run_dir}: not empty and not a gpudoctor run directory; "
                                     "refusing to replace it even with --force")
            try:
                for p in run_dir.iterdir():
                    if p.name in _RUN_ENTRIES or _RANK_MANIFEST.match(p.name) or p.name.startswith(
                            (RUN_DB + ".", ANALYSIS + ".", MANIFEST + ".")):
                        _remove(p)
            except OSError as e:
                raise GpudoctorError(f"{run_dir}: cannot remove the earlier run: {e.strerror or e}") from None
    try:
        (run_dir / RAW).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GpudoctorError(f"{run_dir}: cannot create the run directory: {e.strerror or e}") from None
    check_writable(run_dir / RAW)
    check_space(run_dir)


def check_writable(directory: Path) -> None:
    probe = Path(directory) / f".gpudoctor-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
        probe.unlink()
    except OSError as e:
        raise GpudoctorError(f"{directory}: not writable ({e.strerror or e}); choose another directory with -o") from None


def check_space(directory: Path, need: int | None = None) -> None:
    """At least ``need`` bytes free (default MIN_FREE_BYTES; $GPUDOCTOR_MIN_FREE_MB overrides it)."""
    if need is None:
        try:
            need = int(float(os.environ["GPUDOCTOR_MIN_FREE_MB"]) * 2**20)
        except (KeyError, ValueError):
            need = MIN_FREE_BYTES
    try:
        free = shutil.disk_usage(directory).free
    except OSError as e:
        raise GpudoctorError(f"{directory}: cannot tell the free space ({e.strerror or e})") from None
    if free < need:
        raise GpudoctorError(f"{directory}: only {free / 2**20:.0f} MB free, profiling needs at least "
                             f"{need / 2**20:.0f} MB for the reports; free some space or use -o elsewhere")


# ---------------------------------------------------------------------------------------------------
# One process's view of a run directory


@dataclass(frozen=True)
class RunDirectory:
    """Where one gpudoctor process (the single process, or one rank of a job) writes in a run directory:
    its raw files (``raw/<stem>.*``) and its own manifest (manifest.json, or manifest.rank<N>.json for a
    rank, merged into manifest.json by ``merge_manifests``)."""

    path: Path
    rank: int | None = None
    multi: bool = False

    @property
    def raw(self) -> Path:
        return self.path / RAW

    @property
    def stem(self) -> str:
        return file_stem(self.rank, self.multi)

    def raw_file(self, suffix: str) -> Path:
        """raw/<stem><suffix>, e.g. raw_file(".sqlite") -> raw/trace.sqlite or raw/rank3.sqlite."""
        return self.raw / f"{self.stem}{suffix}"

    @property
    def nvml_csv(self) -> Path:
        return self.raw / ("nvml.csv" if not self.multi else f"{self.stem}.nvml.csv")

    @property
    def manifest_path(self) -> Path:
        """This process's manifest: manifest.json, or manifest.rank<N>.json for a rank of a job."""
        return self.path / (rank_manifest_name(self.rank or 0) if self.multi else MANIFEST)

    @property
    def job_manifest_path(self) -> Path:
        return self.path / MANIFEST

    def rel(self, path: Path) -> str:
        """``path`` relative to the run directory, as manifests list files."""
        return os.path.relpath(path, self.path)

    def report(self, path: Path, fmt: str) -> dict:
        """A manifest "reports" entry for ``path``."""
        return {"path": self.rel(path), "format": fmt, "rank": self.rank or 0}

    def file(self, path: Path, kind: str, **extra: object) -> dict:
        """A manifest "files" entry for ``path``."""
        return {"path": self.rel(path), "kind": kind, "rank": self.rank or 0, **extra}

    def expected_reports(self, backend: str, nvml: bool) -> list[dict]:
        """Where this process's reports will be, written in the start-time manifest as "reports_expected":
        what ``gpudoctor analyze RUN_DIR`` reads if gpudoctor is killed before it can list them."""
        out = []
        if backend == "torch":
            out.append(self.report(self.raw_file(".torch.json.gz"), "kineto_json"))
        elif backend == "nsys":
            out += [self.report(self.raw_file(".sqlite"), "nsys_sqlite"),
                    self.report(self.raw_file(".nsys-rep"), "nsys_rep")]
        if nvml:
            out.append(self.report(self.nvml_csv, "nvml_csv"))
        return out

    def prepare(self, force: bool, clear_shared: bool = True) -> None:
        prepare(self.path, force, rank=self.rank, multi=self.multi, clear_shared=clear_shared)

    def write_manifest(self, doc: dict) -> None:
        """This process's manifest, replaced atomically (a reader never sees half of it)."""
        write_json(self.manifest_path, doc)

    def read_manifest(self) -> dict | None:
        return read_json(self.manifest_path)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Hold the RUNNING lock while profiling into a single-process run directory (a rank of a job
        shares its directory with the other ranks and takes none)."""
        fd = None if self.multi else hold_running_lock(self.path)
        try:
            yield
        finally:
            release_running_lock(self.path, fd)


# ---------------------------------------------------------------------------------------------------
# Manifests


def write_json(path: Path, doc: dict) -> None:
    from gpudoctor.store.atomic import atomic_write_text  # not at the top: gpudoctor.store loads run.db's pandas

    atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def in_progress(run_dir: Path) -> bool:
    """True while another process holds the run directory's RUNNING lock (it is profiling into it)."""
    try:
        fd = os.open(Path(run_dir) / RUNNING, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def hold_running_lock(run_dir: Path) -> int | None:
    """Take the RUNNING lock for this process's lifetime (released by the kernel if it dies); the fd."""
    try:
        fd = os.open(Path(run_dir) / RUNNING, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    except OSError:
        return None


def release_running_lock(run_dir: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.unlink(Path(run_dir) / RUNNING)
    except OSError:
        pass
    os.close(fd)


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run directory (ranks merging their manifests one at a time)."""
    fd = os.open(Path(run_dir) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def rank_manifests(run_dir: Path) -> dict[int, dict]:
    out = {}
    for p in Path(run_dir).iterdir():
        m = _RANK_MANIFEST.match(p.name)
        if m:
            doc = read_json(p)
            if doc is not None:
                out[int(m.group(1))] = doc
    return dict(sorted(out.items()))


_JOB_OUTCOMES = ("completed", "stopped_after_capture", "failed", "interrupted", "killed", "not_started")


def merge_manifests(per_rank: dict[int, dict], world_size: int | None, launched_by: dict | None = None) -> dict:
    """manifest.json of a multi-rank job: rank 0's facts (or the lowest rank's), every rank's reports and
    files, a "ranks" list, and the job's outcome (the first failing rank's exit code)."""
    ranks = sorted(per_rank)
    base = dict(per_rank[ranks[0]])
    for key in ("rank", "local_rank", "rank_source"):
        base.pop(key, None)
    base["world_size"] = world_size or base.get("world_size") or len(ranks)
    base["reports"] = [r for k in ranks for r in per_rank[k].get("reports", [])]
    base["files"] = [f for k in ranks for f in per_rank[k].get("files", [])]
    base["ranks"] = [{
        "rank": k, "manifest": rank_manifest_name(k), "host": per_rank[k].get("host", {}).get("hostname"),
        "exit_code": per_rank[k].get("exit_code"), "signal": per_rank[k].get("signal"),
        "outcome": per_rank[k].get("outcome"), "start_utc": per_rank[k].get("start_utc"),
        "end_utc": per_rank[k].get("end_utc"), "gpus": per_rank[k].get("gpus", []),
    } for k in ranks]
    base["missing_ranks"] = [k for k in range(base["world_size"]) if k not in per_rank]
    codes = [per_rank[k].get("exit_code") for k in ranks]
    bad = [c for c in codes if c not in (0, None)]
    base["exit_code"] = bad[0] if bad else (0 if all(c == 0 for c in codes) else None)
    outcomes = [per_rank[k].get("outcome") for k in ranks]
    base["outcome"] = next((o for o in reversed(_JOB_OUTCOMES) if o in outcomes), outcomes[0])
    base["start_ns"] = min((per_rank[k].get("start_ns") or 0) for k in ranks) or None
    base["end_ns"] = max((per_rank[k].get("end_ns") or 0) for k in ranks) or None
    base["start_utc"], base["end_utc"] = iso(base["start_ns"]), iso(base["end_ns"])
    base["notes"] = [f"rank {k}: {n}" for k in ranks for n in per_rank[k].get("notes", [])]
    base["problems"] = [f"rank {k}: {n}" for k in ranks for n in per_rank[k].get("problems", [])]
    summary = [f"rank {k}: {per_rank[k].get('what_happened', '?')}" for k in ranks]
    if base["missing_ranks"]:
        summary.append(f"no results from rank(s) {', '.join(map(str, base['missing_ranks']))}")
    base["what_happened"] = "; ".join(summary)
    if launched_by:
        base["launched_by"] = launched_by
    base.pop("analysis", None)
    return base
