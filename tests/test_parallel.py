"""gpudoctor.parallel: many rank files analyzed on workers give what the serial path gives."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from gpudoctor import parallel, progress
from gpudoctor.errors import GpudoctorError
from gpudoctor.pipeline import analyze_inputs
from gpudoctor.render import jsonout

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
NSYS = FIXTURES / "nsys" / "attn_naive.nsys.sqlite"
TORCH = FIXTURES / "torch" / "attn_naive.torch.json.gz"


def _ranks(tmp_path: Path, n: int = 3, straggler: int | None = None) -> list[str]:
    """``n`` copies of the nsys fixture named by rank; rank ``straggler``'s kernels 30% longer."""
    out = []
    for r in range(n):
        p = tmp_path / f"attn_naive.rank{r}.nsys.sqlite"
        shutil.copyfile(NSYS, p)
        if r == straggler:
            conn = sqlite3.connect(p)
            conn.execute("UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET end = start + (end - start) * 13 / 10")
            conn.commit()
            conn.close()
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def straggler_run(tmp_path_factory):
    files = _ranks(tmp_path_factory.mktemp("ranks"), 3, straggler=1)
    return files, analyze_inputs(files)  # 3 files: the serial path


def _same(serial, par) -> None:
    a, b = jsonout.to_json_dict(serial), jsonout.to_json_dict(par)
    assert [r["rank"] for r in b["ranks"]] == [0, 1, 2]
    assert b["ranks"] == a["ranks"]  # per-rank summaries
    assert b["findings"] == a["findings"]
    assert b["dropped"] == a["dropped"]
    assert b["inputs"] == a["inputs"]
    assert b["errors"] == a["errors"]
    assert b["gate"] == a["gate"]
    assert [f.analyzer for f in par.findings] == [f.analyzer for f in serial.findings]  # run_all's order


@pytest.mark.parametrize("executor", ["serial", "processes"])
def test_same_as_serial_path(straggler_run, executor):
    files, serial = straggler_run
    par = parallel.analyze_many(files, None, workers=2, executor=executor)
    _same(serial, par)
    # The cross-rank reduce found the straggler, as the merged trace does.
    strag = [f for f in par.findings if f.analyzer == "stragglers"]
    assert len(strag) == 1 and strag[0].metrics["slowest_rank"] == 1
    # A light trace: per-rank tables, and one kernel row per distinct kernel of each rank, no events.
    k = par.trace.kernels
    assert sorted(par.trace.ranks["rank"]) == [0, 1, 2] and par.trace.meta["light_trace"] is True
    kind = ["rank", "device_id", "name", "demangled_name", "category"]
    assert not k.duplicated(kind).any()
    distinct = serial.trace.kernels.drop_duplicates(kind)
    assert len(k) == len(distinct) < len(serial.trace.kernels) / 10


def test_same_as_serial_identical_copies(tmp_path):
    files = _ranks(tmp_path, 3)
    serial = analyze_inputs(files)
    par = parallel.analyze_many(files, workers=2, executor="processes")
    _same(serial, par)
    assert not [f for f in par.findings if f.analyzer == "stragglers"]


def test_kineto_ranks_and_config(tmp_path):
    files = []
    for r in range(3):
        p = tmp_path / f"attn.rank{r}.torch.json.gz"
        shutil.copyfile(TORCH, p)
        files.append(str(p))
    config = {"gpu_idle.idle_fraction_medium": 0.01}
    _same(analyze_inputs(files, config=config), parallel.analyze_many(files, config, executor="serial"))


def test_dask_local_cluster(straggler_run):
    pytest.importorskip("dask.distributed")
    files, serial = straggler_run
    _same(serial, parallel.analyze_many(files, workers=2, executor="dask"))


def test_errors_and_duplicate_ranks(tmp_path):
    files = _ranks(tmp_path, 2)
    bad = tmp_path / "rank5.nsys.sqlite"
    bad.write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    serial = analyze_inputs(files + [str(bad)])
    par = parallel.analyze_many(files + [str(bad)], executor="serial")
    assert par.errors == serial.errors and len(par.errors) == 1
    assert [r.rank for r in par.ranks] == [0, 1]
    # Two inputs claiming one rank: the error merge() gives.
    dup = tmp_path / "copy" / "attn_naive.rank0.nsys.sqlite"
    dup.parent.mkdir()
    shutil.copyfile(NSYS, dup)
    with pytest.raises(GpudoctorError, match="claims rank 0"):
        parallel.analyze_many(files + [str(dup)], executor="serial")
    with pytest.raises(GpudoctorError):
        parallel.analyze_many([str(bad)], executor="serial")


def test_parallel_formats(tmp_path):
    files = [Path(f) for f in _ranks(tmp_path, 8)]
    assert parallel.parallel_formats(files) == ["nsys_sqlite"] * 8
    assert parallel.parallel_formats(files[:7]) is None
    csv = FIXTURES / "ncu" / "ncu_kernels.raw.csv"
    assert parallel.parallel_formats(files + [csv]) is None  # ncu metrics attach to a timeline: serial


def test_progress_is_silent_off_terminal(capsys, monkeypatch):
    monkeypatch.delenv("GPUDOCTOR_PROGRESS", raising=False)
    assert not progress.enabled()  # pytest's stderr is not a terminal
    with progress.task("work", total=3) as bar:
        for _ in progress.track(range(2), "inner"):
            bar.advance()
    assert bar.completed == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_forced_on(monkeypatch):
    monkeypatch.setenv("GPUDOCTOR_PROGRESS", "1")
    assert progress.enabled()
    with progress.task("quick", total=2, delay=0.0) as bar:
        with progress.task("nested", total=1, delay=0.0) as inner:  # joins the same display
            inner.advance()
        bar.advance(2)
    assert bar.completed == 2 and progress._display is None  # closed with its last task
