"""Summary tables (gpudoctor.model.stats, gpudoctor.render.summaries) on the real fixtures, and the
terminal output of `gpudoctor analyze` in a CI log (not a TTY).

Expected values are computed here straight from the trace tables with plain pandas, so a summary that
drops, double-counts or mislabels events fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpudoctor.model import stats
from gpudoctor.pipeline import analyze_inputs
from gpudoctor.render import summaries as S

ROOT = Path(__file__).resolve().parent.parent
FX = ROOT / "fixtures"
DECODE = FX / "nsys" / "decode.nsys.sqlite"
NAIVE = FX / "nsys" / "attn_naive.nsys.sqlite"
NAIVE_TORCH = FX / "torch" / "attn_naive.torch.json.gz"
DDP = [FX / "multigpu" / f"ddp_comm_bound_rank{r}.sqlite" for r in (0, 1)]


@lru_cache(maxsize=None)
def run(*paths: Path):
    return analyze_inputs([str(p) for p in paths])


def _in_window(df: pd.DataFrame, a) -> pd.DataFrame:
    keep = np.zeros(len(df), dtype=bool)
    for r in a.ranks:
        keep |= (df["rank"].to_numpy() == r.rank) & (df["start_ns"].to_numpy() >= r.window.start_ns) \
            & (df["start_ns"].to_numpy() < r.window.end_ns)
    return df[keep]


def test_kernel_stats_match_the_kernels_table():
    a = run(DECODE)
    ks = stats.kernel_stats(a.trace, S.windows(a))
    k = _in_window(a.trace.kernels, a)
    d = (k["end_ns"] - k["start_ns"]).groupby(k["name"].astype(str)).agg(["size", "sum", "min", "median", "max", "std"])
    assert len(ks) == len(d) == 8
    assert ks["count"].sum() == len(k) == 2392
    for row in ks.itertuples():
        exp = d.loc[row.kernel]
        assert (row.count, row.total_ns, row.min_ns, row.max_ns) == (exp["size"], exp["sum"], exp["min"], exp["max"])
        assert row.median_ns == pytest.approx(exp["median"]) and row.std_ns == pytest.approx(exp["std"])
    assert list(ks["total_ns"]) == sorted(ks["total_ns"], reverse=True)
    w = a.ranks[0].window
    assert ks["window_fraction"].sum() == pytest.approx(k["end_ns"].sub(k["start_ns"]).sum() / (w.end_ns - w.start_ns))
    top = ks.iloc[0]
    assert top["kernel"] == "nvjet_sm90_tst_64x8_64x16_2x1_v_bz_splitK_TNT" and top["count"] == 368


def test_api_stats_and_launch_delays():
    a = run(DECODE)
    api = stats.api_stats(a.trace, S.windows(a))
    calls = _in_window(a.trace.api_calls, a)
    assert api["count"].sum() == len(calls)
    assert api["api_time_fraction"].sum() == pytest.approx(1.0)
    row = api.set_index("api").loc["cuLibraryLoadData"]
    sel = calls[calls["name"].astype(str) == "cuLibraryLoadData"]
    assert row["count"] == len(sel) == 23 and row["total_ns"] == (sel["end_ns"] - sel["start_ns"]).sum()
    d = stats.launch_delays(a.trace, S.windows(a))
    k = _in_window(a.trace.kernels, a)
    assert len(d) == k["correlation_id"].isin(a.trace.api_calls["correlation_id"]).sum() == 2392
    m = k.merge(a.trace.api_calls[["correlation_id", "start_ns"]], on="correlation_id", suffixes=("", "_call"))
    assert np.sort(d["delay_ns"].to_numpy()) == pytest.approx(np.sort((m["start_ns"] - m["start_ns_call"]).to_numpy()))
    ds = stats.launch_delay_stats(d)
    assert ds["launches"].tolist() == [2392]
    assert ds["p50_ns"].iloc[0] == pytest.approx(np.median(d["delay_ns"]))
    assert (d["delay_ns"] > 0).all()  # a kernel starts after its launch call


def test_op_stats_self_and_total_times():
    a = run(NAIVE_TORCH)
    ops = stats.op_stats(a.trace)
    assert set(ops["op"]) <= set(a.trace.cpu_ops["name"].astype(str))
    assert ops["count"].sum() == len(a.trace.cpu_ops)
    by = ops.groupby("op")[["cpu_total_ns", "cpu_self_ns", "cuda_total_ns", "cuda_self_ns"]].sum()
    # aten::softmax only calls aten::_softmax: its own CUDA time is zero, its total is the child's
    assert by.loc["aten::softmax", "cuda_self_ns"] == 0
    assert by.loc["aten::softmax", "cuda_total_ns"] == by.loc["aten::_softmax", "cuda_total_ns"] > 0
    assert by.loc["aten::softmax", "cpu_self_ns"] < by.loc["aten::softmax", "cpu_total_ns"]
    # aten::_softmax launches the softmax forward kernels (16: 2 layers x 8 steps)
    k = a.trace.kernels
    fwd = k[k["name"].astype(str).str.contains("softmax_warp_forward")]
    assert len(fwd) == 16 and by.loc["aten::_softmax", "cuda_self_ns"] == (fwd["end_ns"] - fwd["start_ns"]).sum()
    assert (ops["cpu_self_ns"] <= ops["cpu_total_ns"]).all() and (ops["cuda_self_ns"] <= ops["cuda_total_ns"]).all()
    assert ops["input_dims"].str.startswith("[[").all()  # shapes recorded
    assert stats.op_stats(run(DECODE).trace).empty  # nsys traces carry no framework operators


def test_step_table_on_the_ddp_recording():
    a = run(*DDP)
    st = S.step_table(a)
    assert st.groupby("rank").size().to_dict() == {0: 5, 1: 4}  # the steady steps of each rank
    assert (st["gpu_busy_ns"] + st["gpu_idle_ns"] == st["step_ns"]).all()
    assert (st["exposed_comm_ns"] <= st["comm_ns"]).all()
    # the exposed communication of rank 1's steps adds up to what nccl_dominated reports for its window
    f = next(f for f in a.findings if f.analyzer == "nccl_dominated" and f.rank == 1)
    assert st[st["rank"] == 1]["exposed_comm_ns"].sum() == pytest.approx(f.metrics["exposed_comm_ns"], rel=0.01)
    # idle by cause never exceeds the idle time of the step
    idle = st[[c for c in st.columns if c.startswith("idle_")]].sum(axis=1)
    assert (idle <= st["gpu_idle_ns"] + 1).all()


def test_decode_steps_are_mostly_module_load_idle():
    st = S.step_table(run(DECODE))
    assert len(st) == 23
    assert (st["gpu_busy_fraction"] < 0.05).all()
    assert (st["idle_module_load_ns"] > 0.8 * st["gpu_idle_ns"]).all()


def test_csv_files(tmp_path):
    a = run(NAIVE)
    paths = S.write_csv(a, tmp_path / "csv")
    assert sorted(p.name for p in paths) == sorted(f"{k}.csv" for k in S.KINDS)
    kern = pd.read_csv(tmp_path / "csv" / "kernels.csv")
    assert kern["count"].sum() == len(_in_window(a.trace.kernels, a))
    assert list(kern.columns) == stats.KERNEL_COLS
    assert pd.read_csv(tmp_path / "csv" / "steps.csv")["step"].tolist() == list(range(len(a.ranks[0].window.steady)))


# ------------------------------------------------------------------------------------------ terminal
def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR", "FORCE_COLOR")}
    return subprocess.run([sys.executable, "-m", "gpudoctor", "analyze", *args], capture_output=True, text=True,
                          env={**e, **(env or {})}, timeout=300, cwd=ROOT)


def test_terminal_in_a_ci_log():
    p = _cli(str(DECODE), "--summary", "kernels", "--summary", "steps")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert max(len(x) for x in lines) <= 120
    assert any(len(x) > 80 for x in lines)  # not rich's 80-column default
    # never a value cut from its unit across lines
    for a, b in zip(lines, lines[1:]):
        assert not (re.search(r"\d$", a) and re.match(r"\s*(ns|us|ms|s|%)\b", b)), (a, b)
    assert "saves ~999 ms (97.4% of window)" in p.stdout
    # fix paragraphs keep their indentation
    fix = next(i for i, x in enumerate(lines) if x.lstrip().startswith("fix: Module loading"))
    assert lines[fix].startswith(" " * 8) and lines[fix + 1].startswith(" " * 13)
    # unknown values say so, and what would supply them
    assert "None" not in p.stdout
    assert "mbu=unknown" in p.stdout and "--set memory_bound_decode.model_bytes=N" in p.stdout
    assert "Kernels (steady-state window)" in p.stdout and "idle module load" in p.stdout
    assert "\x1b[" not in p.stdout


def test_colors_follow_no_color():
    forced = _cli(str(NAIVE), env={"FORCE_COLOR": "1"})
    assert "\x1b[" in forced.stdout
    assert "\x1b[" not in _cli(str(NAIVE), "--no-color", env={"FORCE_COLOR": "1"}).stdout
    assert "\x1b[" not in _cli(str(NAIVE), env={"FORCE_COLOR": "1", "NO_COLOR": "1"}).stdout


def test_width_from_columns():
    p = _cli(str(DECODE), env={"COLUMNS": "90"})
    assert max(len(x) for x in p.stdout.splitlines()) <= 90


def test_summary_of_a_trace_without_operators_says_why():
    p = _cli(str(DECODE), "--summary", "ops", "-q")
    assert p.stdout == ""
    p = _cli(str(DECODE), "--summary", "ops")
    assert "none: no framework operators in this trace" in p.stdout
