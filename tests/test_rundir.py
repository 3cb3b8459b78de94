"""The run directory's owner types (gpudoctor/collect/rundir.py, gpudoctor/collect/manifest.py): where one
process writes, what its start-time manifest expects, and what a killed run leaves to analyze."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from gpudoctor.collect.manifest import read_manifest, reports_to_read
from gpudoctor.collect.rundir import RunDirectory, holds_run
from gpudoctor.errors import InputError
from gpudoctor.readers.inputs import read_run_dir

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
GATE_RUN = FIX / "gate_runs" / "base_1"  # a real `gpudoctor profile` run (nsys + NVML) on an H100


def test_single_process_and_rank_layouts(tmp_path):
    one = RunDirectory(tmp_path)
    assert one.manifest_path == tmp_path / "manifest.json" and one.nvml_csv == tmp_path / "raw/nvml.csv"
    assert one.raw_file(".sqlite") == tmp_path / "raw/trace.sqlite"
    assert one.expected_reports("nsys", nvml=True) == [
        {"path": "raw/trace.sqlite", "format": "nsys_sqlite", "rank": 0},
        {"path": "raw/trace.nsys-rep", "format": "nsys_rep", "rank": 0},
        {"path": "raw/nvml.csv", "format": "nvml_csv", "rank": 0}]
    rank3 = RunDirectory(tmp_path, rank=3, multi=True)
    assert rank3.manifest_path == tmp_path / "manifest.rank3.json"
    assert rank3.job_manifest_path == tmp_path / "manifest.json"
    assert rank3.expected_reports("torch", nvml=True) == [
        {"path": "raw/rank3.torch.json.gz", "format": "kineto_json", "rank": 3},
        {"path": "raw/rank3.nvml.csv", "format": "nvml_csv", "rank": 3}]
    assert rank3.expected_reports("nvml", nvml=False) == []
    assert rank3.file(rank3.raw_file(".agent.json"), "agent_status") == {
        "path": "raw/rank3.agent.json", "kind": "agent_status", "rank": 3}


def _killed_nsys_run(tmp_path: Path) -> Path:
    """The real run's manifest as gpudoctor writes it at the start (outcome "running", no reports yet), with
    what a killed nsys run leaves: the SQLite export, an empty .nsys-rep, the NVML samples."""
    run = tmp_path / "run"
    (run / "raw").mkdir(parents=True)
    m = json.loads((GATE_RUN / "manifest.json").read_text())
    m.update(outcome="running", reports=[], reports_expected=RunDirectory(run).expected_reports("nsys", nvml=True))
    RunDirectory(run).write_manifest(m)
    shutil.copyfile(FIX / "nsys" / "tiny_sync.nsys.sqlite", run / "raw/trace.sqlite")
    (run / "raw/trace.nsys-rep").write_bytes(b"")
    (run / "raw/nvml.csv").write_bytes(gzip.decompress((GATE_RUN / "raw/nvml.csv.gz").read_bytes()))
    return run


def test_a_killed_run_is_read_from_the_reports_it_expected(tmp_path):
    run = _killed_nsys_run(tmp_path)
    assert holds_run(run) and not holds_run(tmp_path)
    manifest = read_manifest(run)
    assert [r["path"] for r in reports_to_read(run, manifest)] == ["raw/trace.sqlite", "raw/nvml.csv"]
    trace = read_run_dir(run)
    assert len(trace.kernels) > 0 and trace.rank_ids == [0]
    assert trace.counters["name"].astype(str).str.startswith("nvml.").any()  # the NVML samples came along


def test_an_ended_run_reads_only_its_listed_reports(tmp_path):
    run = _killed_nsys_run(tmp_path)
    m = read_manifest(run)
    m.update(outcome="completed", reports=[{"path": "raw/trace.sqlite", "format": "nsys_sqlite", "rank": 0}])
    RunDirectory(run).write_manifest(m)
    assert reports_to_read(run, read_manifest(run)) == m["reports"]
    m["reports"] = [{"path": "raw/trace.sqlite", "rank": "zero"}]
    RunDirectory(run).write_manifest(m)
    with pytest.raises(InputError, match="reports\\[0\\].rank is 'zero'"):
        read_manifest(run)
