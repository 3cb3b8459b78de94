"""Outputs and the dashboard server under hostile or unlucky conditions (the other half of the bad-input
corpus in tests/test_bad_inputs.py): output paths that are devices, FIFOs, symlinks, stdout or
unwritable; dashboard requests with a foreign Host header or absurd callback values; nccl-bench on one
rank. Each test names the promise it holds (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NSYS = ROOT / "fixtures" / "nsys" / "kv_static.nsys.sqlite"


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("GPUDOCTOR_DEBUG", None)
    return env


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpudoctor", *args], capture_output=True, text=True, env=_env(),
                          cwd=cwd, timeout=300)


# --------------------------------------------------------------------------------------------------
# output paths


def test_json_to_dev_null_keeps_the_device():
    """Promise: an output that is a device is written in place, never renamed over (as root, the old
    rename replaced /dev/null for the whole machine)."""
    before = os.stat("/dev/null")
    p = _cli("analyze", str(NSYS), "--json", "/dev/null", "--markdown", "/dev/null", "-q")
    assert p.returncode == 0, p.stderr
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino


def test_json_to_a_fifo_is_written_in_place(tmp_path):
    """Promise: a FIFO output (``--json >(jq .)``) receives the JSON and stays a FIFO."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got = {}

    def reader():
        with open(fifo, "rb") as f:
            got["data"] = f.read()
    t = threading.Thread(target=reader)
    t.start()
    p = _cli("analyze", str(NSYS), "--json", str(fifo), "-q")
    t.join(60)
    assert p.returncode == 0, p.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert json.loads(got["data"])["ranks"][0]["kernel_count"] == 48
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.fifo"]


def test_symlinked_output_writes_its_target(tmp_path):
    """Promise: a symlinked output is written to its target; the link stays a link."""
    target = tmp_path / "real" / "analysis.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    p = _cli("analyze", str(NSYS), "--json", str(link), "-q")
    assert p.returncode == 0, p.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["ranks"][0]["kernel_count"] == 48
    assert sorted(x.name for x in target.parent.iterdir()) == ["analysis.json"]  # no temp file left


def test_json_dash_is_stdout(tmp_path):
    """Promise: ``--json -`` writes the JSON to stdout (and nothing else there), not a file named '-'."""
    p = _cli("analyze", str(NSYS), "--json", "-", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ranks"][0]["kernel_count"] == 48
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_output_fails_before_the_analysis(where, tmp_path):
    """Promise: an output path that cannot be written is a one-line error (exit 2) before any analysis."""
    if where == "under_a_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "a.json"
    else:
        out = Path("/proc/gpudoctor-test.json")  # not writable, even for root
    p = _cli("analyze", str(NSYS), "--json", str(out))
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""  # nothing analyzed or printed
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("gpudoctor: error: ") and str(out) in line and "cannot write" in line, line


def test_failed_write_after_the_analysis_still_prints_the_findings(tmp_path, monkeypatch, capsys):
    """Promise: when the write fails after the analysis (disk full), the findings are printed, the
    error is one line and the exit code 2."""
    from gpudoctor.cli import analyze
    from gpudoctor.cli.main import main

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(analyze, "atomic_write_text", full)  # the name the analyze command writes with
    rc = main(["analyze", str(NSYS), "--json", str(tmp_path / "a.json")])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "kv_static" in out or "rank 0" in out.lower()
    assert err.strip().splitlines() == ["gpudoctor: error: cannot write the output: No space left on device"]


def test_atomic_write_refuses_to_rename_over_a_device_and_writes_in_place(tmp_path):
    from gpudoctor.errors import GpudoctorError
    from gpudoctor.store.atomic import atomic_path, atomic_write_text
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    with pytest.raises(GpudoctorError, match="not a regular file"):
        with atomic_path(fifo):
            pass
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    atomic_write_text("/dev/null", "x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_report_html_dash_is_stdout_and_unwritable_fails_first(tmp_path):
    """Promise: ``report --html -`` writes to stdout; an unwritable --html fails before the analysis."""
    p = _cli("report", str(NSYS), "--html", "-")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("<!DOCTYPE html>") and p.stdout.rstrip().endswith("</html>")
    (tmp_path / "f").write_text("x")
    p = _cli("report", str(NSYS), "--html", str(tmp_path / "f" / "r.html"))
    assert p.returncode == 2 and "cannot write the report" in p.stderr and p.stdout == ""


@pytest.mark.parametrize("option", ["--config", "--ceilings"])
@pytest.mark.parametrize("source", ["/dev/zero", "fifo", "directory", "too_big"])
def test_config_like_inputs_only_regular_files(option, source, tmp_path):
    """Promise: --config and --ceilings read only regular files within GPUDOCTOR_MAX_CONFIG_MB: /dev/zero
    is not read forever, a FIFO does not hang, each is one line and exit 2."""
    env_extra = {}
    if source == "fifo":
        path = tmp_path / "cfg"
        os.mkfifo(path)
    elif source == "directory":
        path = tmp_path
    elif source == "too_big":
        path = tmp_path / "big.toml"
        path.write_bytes(b"#" * (2 << 20))
        env_extra["GPUDOCTOR_MAX_CONFIG_MB"] = "1"
    else:
        path = Path(source)
    cmd = ["report", str(NSYS), "--html", str(tmp_path / "r.html")] if option == "--ceilings" else \
        ["analyze", str(NSYS), "-q"]
    p = subprocess.run([sys.executable, "-m", "gpudoctor", *cmd, option, str(path)], capture_output=True, text=True,
                       env={**_env(), **env_extra}, cwd=ROOT, timeout=60)
    assert p.returncode == 2, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert str(path) in line, line
    assert ("regular file" in line) if source != "too_big" else ("GPUDOCTOR_MAX_CONFIG_MB" in line), line


# --------------------------------------------------------------------------------------------------
# dashboard server


@pytest.fixture(scope="module")
def app():
    pytest.importorskip("dash")
    from gpudoctor.dashboards.app import Run, create_app
    from gpudoctor.pipeline import analyze_inputs
    return create_app([Run("kv", analyze_inputs([str(NSYS)], need_trace=True))], allowed_hosts=("gpu-box.lan",))


@pytest.mark.parametrize("host,status", [("127.0.0.1:8050", 200), ("localhost:8050", 200), ("[::1]:8050", 200),
                                         ("10.0.0.7", 200), ("gpu-box.lan:8050", 200),
                                         ("attacker.example:8050", 403), ("localhost.attacker.example", 403),
                                         ("", 403)])
def test_dashboard_checks_the_host_header(app, host, status):
    """Promise: requests naming another host (DNS rebinding) are refused; IP literals, localhost and
    --allowed-host names are served."""
    r = app.server.test_client().get("/", headers={"Host": host})
    assert r.status_code == status


def _update(app, inputs, output="page.children", state=None):
    body = {"output": output, "outputs": {"id": output.split(".")[0], "property": output.split(".")[1]},
            "inputs": inputs, "changedPropIds": [f"{inputs[-1]['id']}.{inputs[-1]['property']}"],
            "state": state or []}
    text = json.dumps(body).replace('"__HUGE__"', "1e400").replace('"__BIG__"', "9" * 400)
    return app.server.test_client().post("/_dash-update-component", data=text, content_type="application/json",
                                         headers={"Host": "127.0.0.1:8050"})


@pytest.mark.parametrize("value", ["__HUGE__", "__BIG__", -1e300, "abc", [1], True])
def test_dashboard_callbacks_with_absurd_numbers_are_no_update(app, value):
    """Promise: callback inputs are validated: huge numbers, inf, text or lists give no update, never 500."""
    r = _update(app, [{"id": "url", "property": "pathname", "value": "/"},
                      {"id": "run", "property": "value", "value": value}],
                state=[{"id": "focus", "property": "data", "value": None}])
    assert r.status_code == 204, r.data[:200]


@pytest.mark.parametrize("view", [["__HUGE__", 5], [0, "__BIG__"], "x", [5, 1]])
def test_dashboard_stored_view_out_of_range_shows_the_whole_run(app, view):
    r = _update(app, [{"id": "url", "property": "pathname", "value": "/timeline"},
                      {"id": "run", "property": "value", "value": 0}],
                state=[{"id": "focus", "property": "data", "value": {"run": 0, "view": view}}])
    assert r.status_code == 200, r.data[:200]


# --------------------------------------------------------------------------------------------------
# nccl-bench on one rank


def test_nccl_bench_one_rank_says_there_is_no_link(tmp_path):
    """Promise: with one rank nothing crosses a link: bus bandwidths are 0 and no ceiling percentage is
    printed (it once printed 15,978,301 GB/s = 25,356,190% of the ceiling)."""
    pytest.importorskip("torch")
    out = tmp_path / "one.json"
    p = _cli("nccl-bench", "--backend", "gloo", "--nproc", "1", "--ops", "broadcast,all_reduce",
             "--max-bytes", "4096", "--iters", "2", "--warmup", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    for op in ("broadcast", "all_reduce"):
        r = doc["ops"][op]
        assert r["fraction_of_ceiling"] is None
        assert {row[m]["busbw_gbps"] for row in r["rows"] for m in ("out_of_place", "in_place")} == {0.0}
    assert "one rank: no data crosses a link" in p.stdout
    assert "% of the" not in p.stdout


def test_largest_line_one_rank_and_many():
    from gpudoctor.collect.ncclbench import largest_line
    r = {"largest": {"size_bytes": 1 << 30, "busbw_gbps": 15_978_301.0}, "fraction_of_ceiling": 253_561.9}
    assert "no data crosses a link" in largest_line("broadcast", r, {"gbps": 63.0}, 1)
    assert "% of the 63 GB/s ceiling" not in largest_line("broadcast", r, {"gbps": 63.0}, 1)
    r2 = {"largest": {"size_bytes": 1 << 30, "busbw_gbps": 40.0}, "fraction_of_ceiling": 40 / 63}
    assert largest_line("all_reduce", r2, {"gbps": 63.0}, 2).endswith("busbw 40.0 GB/s = 63.5% of the 63 GB/s ceiling")
