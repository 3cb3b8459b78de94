"""Nsight Compute reader, collector helpers and per-kernel roofline, pinned to the committed H100 exports.

Every expected number below was read from fixtures/ncu/*.csv (recorded by fixtures/workloads/ncu_kernels.py)
or follows from the shapes that workload uses; synthetic files (tmp_path) cover what the fixtures do not show.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpudoctor.analyzers.roofline import kernel_roofline
from gpudoctor.collect import locate
from gpudoctor.collect import ncu as collect
from gpudoctor.errors import InputError
from gpudoctor.model.schema import TABLES
from gpudoctor.readers import detect, ncu

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "fixtures/ncu/ncu_kernels.raw.csv"
DETAILS = ROOT / "fixtures/ncu/ncu_kernels.details.csv"
QUERY = ROOT / "fixtures/ncu/ncu_query_metrics_gh100.txt.gz"
MISSING = ROOT / "fixtures/ncu/ncu_missing.txt"
CEILINGS = json.loads((ROOT / "fixtures/ceilings_h100.json").read_text())
SHARED = Path("/work/shared/samples/attention_h100.ncu_raw.csv")

# launch order of ncu_kernels.py: GEMV, fp32 GEMM, bf16 GEMM, SDPA
GEMV, GEMM32, GEMM16, ATTN = 0, 1, 2, 3


@pytest.fixture(scope="module")
def raw():
    return ncu.read(RAW)


@pytest.fixture(scope="module")
def roof(raw):
    return kernel_roofline(raw.kernel_metrics, CEILINGS)


def _rows(path: Path) -> list[list[str]]:
    return list(csv.reader(path.read_text().splitlines()))


def _write_rows(path: Path, rows: list[list[str]], prefix: str = "") -> Path:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    path.write_text(prefix + buf.getvalue())
    return path


# ------------------------------------------------------------------------------------------ raw page
def test_raw_fixture_has_four_kernels_in_launch_order(raw):
    km = raw.kernel_metrics
    assert list(km.columns) == [c for c, _, _ in TABLES["kernel_metrics"]]
    assert len(km) == 4
    assert km["launch_id"].tolist() == [0, 1, 2, 3]
    assert km["pid"].tolist() == [2481] * 4
    assert km["nvtx_range"].astype(str).tolist() == ["gemv_decode", "gemm_fp32", "gemm_bf16", "attn_fused"]
    names = km["name"].astype(str).tolist()
    assert names[GEMV] == "nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT"
    assert names[GEMM32] == "void cutlass::Kernel2<cutlass_80_simt_sgemm_256x128_8x4_nn_align1>(T1::Params)"
    assert names[GEMM16] == "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT"
    assert "cudnn" in names[ATTN] and "flash" in names[ATTN] and "sdpa" in names[ATTN]
    assert km[["grid_x", "grid_y", "grid_z"]].to_numpy().tolist() == [[2, 66, 1], [128, 1, 1], [2, 66, 1], [132, 1, 1]]
    assert km[["block_x", "block_y", "block_z"]].to_numpy().tolist() == [[384, 1, 1], [256, 1, 1]] + [[384, 1, 1]] * 2
    assert (km["kernel_row"] == -1).all()


def test_raw_units_are_scaled(raw):
    km = raw.kernel_metrics
    # gpu__time_duration.sum is printed in "us": 44.096000 us
    assert km["duration_ns"].tolist() == pytest.approx([44096.0, 341216.0, 176896.0, 100448.0])
    # dram__bytes_read.sum in "Mbyte", dram__bytes_write.sum in "Mbyte" (the .avg columns are in Kbyte)
    assert km["dram_read_bytes"].tolist() == pytest.approx([117471232, 33629952, 150505984, 50355712])
    assert km["dram_write_bytes"].tolist() == pytest.approx([2429184, 2426880, 28420096, 10861568])
    # sm__cycles_elapsed.avg.per_second in "Ghz"
    assert km["sm_clock_hz"].tolist() == pytest.approx([1.848619e9, 1.980677e9, 1.596269e9, 1.755332e9])
    # percentages -> 0..1
    assert km["dram_throughput_fraction"].tolist() == pytest.approx([0.81132379, 0.03152463, 0.30181244, 0.18189328])
    assert km["sm_throughput_fraction"].tolist() == pytest.approx([0.07110736, 0.84499525, 0.90022654, 0.4118724])
    assert km["memory_throughput_fraction"].iloc[GEMV] == pytest.approx(0.81132379)
    assert km["achieved_occupancy_fraction"].iloc[GEMM16] == pytest.approx(0.14646606)


def test_devices_and_ranks_from_raw(raw):
    d = raw.devices
    assert len(d) == 1
    row = d.iloc[0]
    assert row["name"] == "NVIDIA H100 80GB HBM3"
    assert row["sm_count"] == 132
    assert row["memory_bytes"] == 85_017_493_504  # "85,017,493,504"
    assert row["sm_clock_hz"] == pytest.approx(1.98e9)  # max_gpu_frequency_khz "1,980,000"
    # 2 x 2,619,000 kHz x 5,120 bit / 8 = 3.352 TB/s (H100 SXM datasheet: 3.35 TB/s)
    assert row["memory_bandwidth_bytes_per_s"] == pytest.approx(3.35232e12)
    assert row["compute_capability"] == "9.0"
    r = raw.ranks.iloc[0]
    assert (r["rank"], r["pid"], r["hostname"], r["source_format"]) == (0, 2481, "127.0.0.1", "ncu_csv")
    assert r["source_file"] == str(RAW)
    assert raw.meta["inputs"] == [{"path": str(RAW), "format": "ncu_csv", "rank": 0}]
    assert detect(RAW) == "ncu_csv"


def test_bf16_gemm_tensor_flops_and_compute_bound(raw, roof):
    km = raw.kernel_metrics
    # sm__ops_path_tensor_src_bf16_dst_fp32.sum = "137,438,953,472": tensor "ops" are FLOPs (FMA = 2)
    assert km["flops_tensor"].iloc[GEMM16] == pytest.approx(2 * 4096**3, rel=0.01)
    assert km["flops_tensor"].iloc[GEMM16] == 2 * 4096**3  # in fact exact
    assert km["flops_fp32"].iloc[GEMM16] == 0
    assert km["tensor_pipe_fraction"].iloc[GEMM16] == pytest.approx(0.9489784)  # 94.897840 %
    r = roof.iloc[GEMM16]
    assert r["bound"] == "compute"
    assert r["dominant_precision"] == "tensor_bf16"
    assert r["peak_flops_per_s"] == CEILINGS["bf16_flops_per_s"]
    assert r["arithmetic_intensity"] == pytest.approx(2 * 4096**3 / (150505984 + 28420096))  # 768.1 flop/B
    assert r["achieved_flops_per_s"] == pytest.approx(2 * 4096**3 / 176.896e-6)  # 777 TFLOP/s
    # the ceiling (median of 8192^3 runs) is 772 TFLOP/s: this launch ran 0.6 % above it
    assert r["roof_fraction"] == pytest.approx(1.00605, abs=1e-4)


def test_fp32_gemm_simt_flops(raw, roof):
    km = raw.kernel_metrics
    assert km["flops_tensor"].iloc[GEMM32] == 0
    # ffma "8589934592" = 2048^3, fmul 4,194,304 (alpha scaling of C): 2*2048^3 + 2048^2
    assert km["flops_fp32"].iloc[GEMM32] == 2 * 2048**3 + 2048**2
    assert km["flops_fp32"].iloc[GEMM32] == pytest.approx(2 * 2048**3, rel=0.01)
    r = roof.iloc[GEMM32]
    assert (r["dominant_precision"], r["peak_ceiling"], r["bound"]) == ("fp32", "fp32_flops_per_s", "compute")
    assert r["roof_fraction"] == pytest.approx(0.98545, abs=1e-4)
    assert r["tensor_pipe_fraction"] == 0


def test_gemv_is_memory_bound(raw, roof):
    km = raw.kernel_metrics
    weights = 14336 * 4096 * 2
    assert km["dram_read_bytes"].iloc[GEMV] == pytest.approx(weights, rel=0.001)  # 117,471,232
    r = roof.iloc[GEMV]
    assert r["dram_bytes"] == pytest.approx(weights, rel=0.03)  # read+write 119,900,416 (+2.1 %)
    assert r["bound"] == "memory"
    assert r["arithmetic_intensity"] < r["ridge_intensity"]
    assert r["roof_fraction"] == pytest.approx(119900416 / 44.096e-6 / CEILINGS["copy_bandwidth_bytes_per_s"])
    assert r["roof_fraction"] == pytest.approx(0.9082, abs=1e-4)
    # the 1-row product runs on an 8-row tensor tile: the tensor pipe executes 8x the useful FLOPs
    assert km["flops_tensor"].iloc[GEMV] == 8 * 2 * 4096 * 14336


def test_attention_kernel(raw, roof):
    km = raw.kernel_metrics
    assert km["flops_tensor"].iloc[ATTN] == 36_507_222_016
    # causal: a bit over half of 4*B*H*S^2*D
    assert 0.5 < km["flops_tensor"].iloc[ATTN] / (4 * 4 * 16 * 2048**2 * 64) < 0.6
    assert km["flops_fp32"].iloc[ATTN] == 290717696 + 226788352 + 2 * 4456448  # softmax in fp32 SIMT
    assert km["tensor_pipe_fraction"].iloc[ATTN] == pytest.approx(0.448078)
    r = roof.iloc[ATTN]
    assert (r["bound"], r["dominant_precision"]) == ("compute", "tensor_bf16")
    assert r["roof_fraction"] == pytest.approx(0.4774, abs=1e-4)


def test_unit_scale_table():
    cases = {"": (1, ""), "byte": (1, "byte"), "Kbyte": (1e3, "byte"), "Mbyte": (1e6, "byte"),
             "Gbyte": (1e9, "byte"), "Tbyte": (1e12, "byte"), "ns": (1e-9, "second"), "nsecond": (1e-9, "second"),
             "us": (1e-6, "second"), "usecond": (1e-6, "second"), "msecond": (1e-3, "second"), "second": (1, "second"),
             "%": (0.01, "fraction"), "hz": (1, "hz"), "Khz": (1e3, "hz"), "Mhz": (1e6, "hz"), "Ghz": (1e9, "hz"),
             "cycle/second": (1, "hz"), "cycle/nsecond": (1e9, "hz"), "cycle/usecond": (1e6, "hz"),
             "Gbyte/second": (1e9, "byte/second"), "Kbyte/block": (1e3, "byte/block"), "inst": (1, "inst"),
             "register/thread": (1, "register/thread"), "SM": (1, "SM")}
    for unit, (f, dim) in cases.items():
        got = ncu.unit_scale(unit)
        assert got[0] == pytest.approx(f), unit
        assert got[1] == dim, unit


def test_numbers_with_separators_and_na():
    s = pd.Series(["1,980,000", "7,117,606.79", "n/a", "", " 42 ", "1e3", "PolicySpread"])
    got = ncu.to_number(s).tolist()
    assert got[:2] == [1980000.0, 7117606.79]
    assert np.isnan(got[2]) and np.isnan(got[3]) and np.isnan(got[6])
    assert got[4:6] == [42.0, 1000.0]


def test_other_units_give_the_same_values(tmp_path, raw):
    """Re-express columns of the real file in other units (as other ncu versions / --print-units print them)."""
    rows = _rows(RAW)
    h, u = rows[0], rows[1]
    col = {name: i for i, name in enumerate(h)}

    def rewrite(metric, unit, f, fmt="{:,.6f}"):
        j = col[metric]
        old = ncu.unit_scale(u[j])[0]
        u[j] = unit
        for r in rows[2:]:
            r[j] = fmt.format(float(r[j].replace(",", "")) * old / f)

    rewrite("gpu__time_duration.sum", "nsecond", 1e-9, "{:,.0f}")
    rewrite("dram__bytes_read.sum", "Gbyte", 1e9, "{:.9f}")
    rewrite("dram__bytes_write.sum", "byte", 1, "{:,.0f}")
    rewrite("sm__cycles_elapsed.avg.per_second", "cycle/usecond", 1e6, "{:,.3f}")
    rows[2][col["sm__warps_active.avg.pct_of_peak_sustained_active"]] = "n/a"
    rows[3][col["smsp__sass_thread_inst_executed_op_fmul_pred_on.sum"]] = ""
    km = ncu.read(_write_rows(tmp_path / "units.csv", rows)).kernel_metrics
    ref = raw.kernel_metrics
    for c in ("duration_ns", "dram_read_bytes", "dram_write_bytes", "sm_clock_hz"):
        assert km[c].tolist() == pytest.approx(ref[c].tolist(), rel=1e-6), c
    assert np.isnan(km["achieved_occupancy_fraction"].iloc[0])
    assert km["achieved_occupancy_fraction"].iloc[1:].tolist() == pytest.approx(
        ref["achieved_occupancy_fraction"].iloc[1:].tolist())
    # a blank counter counts 0 next to present ones: fp32 FLOPs of the fp32 GEMM lose only the FMUL part
    assert km["flops_fp32"].iloc[GEMM32] == 2 * 2048**3


def test_missing_flop_counters_are_nan(tmp_path):
    rows = _rows(RAW)
    keep = [j for j, name in enumerate(rows[0]) if "sass_thread_inst_executed_op_f" not in name]
    rows = [[r[j] for j in keep] for r in rows]
    km = ncu.read(_write_rows(tmp_path / "nofp32.csv", rows)).kernel_metrics
    assert km["flops_fp32"].isna().all()
    assert km["flops_fp64"].tolist() == [0, 0, 0, 0]


# ------------------------------------------------------------------------------------- details page
def test_details_page_pivot(raw):
    t = ncu.read(DETAILS)
    km = t.kernel_metrics
    assert t.meta["ncu"]["page"] == "details"
    assert len(km) == 4 and km["launch_id"].tolist() == [0, 1, 2, 3]
    assert km["pid"].tolist() == [2618] * 4  # a second ncu run of the same workload
    assert km["name"].astype(str).tolist() == raw.kernel_metrics["name"].astype(str).tolist()
    assert km["grid_x"].tolist() == [2, 128, 2, 132]
    # "Duration","us","43.81": printed with 2 decimals
    assert km["duration_ns"].tolist() == [43810.0, 343360.0, 177790.0, 101470.0]
    # same kernels, separate run: within 1.1 % of the raw page (rounding is 0.005 us; run-to-run is larger)
    rel = (km["duration_ns"] / raw.kernel_metrics["duration_ns"] - 1).abs()
    assert rel.max() < 0.011
    assert km["sm_clock_hz"].tolist() == pytest.approx([1.83e9, 1.97e9, 1.59e9, 1.74e9])
    assert km["dram_throughput_fraction"].tolist() == pytest.approx([0.8169, 0.0313, 0.3002, 0.182])
    assert km["memory_throughput_fraction"].tolist() == pytest.approx([0.8169, 0.4609, 0.6974, 0.286])
    assert km["sm_throughput_fraction"].tolist() == pytest.approx([0.0721, 0.846, 0.9012, 0.4118])
    assert km["achieved_occupancy_fraction"].tolist() == pytest.approx([0.1443, 0.125, 0.1464, 0.1408])
    assert km["flops_tensor"].isna().all()  # SpeedOfLight/Occupancy sections carry no FLOP counters
    assert t.devices["compute_capability"].tolist() == ["9.0"]


def test_details_page_with_raw_metric_names_and_conflicting_names(tmp_path):
    """--metrics adds raw names to the details page; the same display name in two sections with different units."""
    rows = _rows(DETAILS)
    h = rows[0]
    sec, name, unit, value = (h.index(c) for c in ("Section Name", "Metric Name", "Metric Unit", "Metric Value"))
    extra = []
    for r in rows[1:]:
        if r[name] == "Duration":
            a = list(r)
            a[sec], a[name] = "Command line profiler metrics", "dram__bytes_read.sum"
            a[unit], a[value] = "Mbyte", "117.47"
            b = list(r)
            b[sec], b[name] = "Memory Workload Analysis", "Memory Throughput"
            b[unit], b[value] = "Gbyte/second", "2,650.1"
            extra += [a, b]
    km = ncu.read(_write_rows(tmp_path / "d.csv", [h] + extra + rows[1:])).kernel_metrics
    assert km["dram_read_bytes"].tolist() == [117.47e6] * 4
    assert km["memory_throughput_fraction"].tolist() == pytest.approx([0.8169, 0.4609, 0.6974, 0.286])


# ------------------------------------------------------------------------------------- shared sample
@pytest.mark.skipif(not SHARED.exists(), reason="shared sample not present")
def test_shared_sample_parses():
    t = ncu.read(SHARED)
    km = t.kernel_metrics
    assert len(km) == 6  # three ==WARNING==/==PROF== lines before the header are skipped
    assert km["pid"].tolist() == [493] * 6
    assert km["duration_ns"].tolist() == [43040, 43104, 43456, 426656, 704864, 1621632]  # "ns", "1,621,632"
    assert km["grid_x"].tolist() == [1056, 1056, 1056, 2, 524288, 1048576]
    assert km["name"].astype(str).iloc[3].startswith("nvjet_sm90")
    assert km["tensor_pipe_fraction"].iloc[3] == pytest.approx(0.1696)
    # this export has dram__bytes.sum only: the model's read/write columns stay NaN, the total is kept aside
    assert km["dram_read_bytes"].isna().all()
    assert t.meta["ncu"]["dram_bytes_total_only"] is True
    wide, _ = ncu.read_metrics(SHARED)
    assert wide["dram_bytes"].iloc[5] == 3_199_880_960
    assert t.devices.iloc[0]["sm_count"] == 132


# ----------------------------------------------------------------------- processes, devices, prefixes
def test_several_processes_and_devices(tmp_path):
    rows = _rows(RAW)
    h = rows[0]
    pid, dev, idc = h.index("Process ID"), h.index("Device"), h.index("ID")
    more = []
    for k, r in enumerate(rows[2:]):
        r2 = list(r)
        r2[pid], r2[dev], r2[idc] = "7,001", "1", str(4 + k)
        more.append(r2)
    # the second process's launches come first in the file; ranks follow the first launch ID
    path = _write_rows(tmp_path / "multi.csv", rows[:2] + more + rows[2:],
                       prefix="hello from the app, 1,2,3\n==PROF== Connected to process 2481\n")
    t = ncu.read(path, rank=4)
    km = t.kernel_metrics
    assert len(km) == 8
    assert sorted(zip(t.ranks["rank"], t.ranks["pid"])) == [(4, 2481), (5, 7001)]
    assert km.loc[km["pid"] == 7001, "device_id"].tolist() == [1] * 4
    assert km.loc[km["pid"] == 7001, "rank"].tolist() == [5] * 4
    assert sorted(zip(t.devices["rank"], t.devices["device_id"])) == [(4, 0), (5, 1)]
    assert t.ranks["source_format"].tolist() == ["ncu_csv"] * 2


def test_prof_lines_inside_and_no_nvtx(tmp_path):
    rows = _rows(RAW)
    h = rows[0]
    keep = [j for j, c in enumerate(h) if "_Range" not in c]
    rows = [[r[j] for j in keep] for r in rows]
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerows(rows[:3])
    buf.write("==WARNING== something, with a comma\n")
    w.writerows(rows[3:])
    buf.write("==PROF== Disconnected from process 2481\n")
    p = tmp_path / "prof.csv"
    p.write_text(buf.getvalue())
    km = ncu.read(p).kernel_metrics
    assert len(km) == 4
    assert (km["nvtx_range"].astype(str) == "").all()


def test_nvtx_innermost_of_nested_ranges(tmp_path):
    rows = _rows(RAW)
    j = next(i for i, c in enumerate(rows[0]) if "Push/Pop_Range" in c)
    rows[2][j] = ('77  "<default domain>:outer:none:none:none:none:none:none"  '
                  '"my_domain:step 3:a:b:none:none:none:none"  '
                  '"<default domain>:attn:block:none:none:none:none:none:none" ')
    rows[3][j] = ""
    km = ncu.read(_write_rows(tmp_path / "nvtx.csv", rows)).kernel_metrics
    assert km["nvtx_range"].astype(str).tolist()[:3] == ["attn:block", "", "gemm_bf16"]


# -------------------------------------------------------------------------------------- bad input
def _assert_input_error(path: Path, pattern: str):
    with pytest.raises(InputError) as e:
        ncu.read(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(path) + ": ")
    assert re.search(pattern, msg), msg


def test_truncated_mid_row(tmp_path):
    text = RAW.read_text()
    cut = text[: text.rindex('"1,980,000"')]  # the last kernel row, cut after its device attributes start
    p = tmp_path / "cut.csv"
    p.write_text(cut)
    n = len(_rows(RAW)[0])
    last = len(list(csv.reader(cut.splitlines()))[-1])
    _assert_input_error(p, rf"truncated CSV: row 6 has {last} fields, header has {n}$")


def test_truncated_inside_last_field(tmp_path):
    text = DETAILS.read_text()
    p = tmp_path / "cut.csv"
    for cut in (text.rindex("81.2") + 1, text.rindex("81.2"), text.rindex("81.2") - 1):
        p.write_text(text[:cut])  # inside the last quoted value, right after its opening quote, before it
        _assert_input_error(p, r"truncated CSV: row 101 ")


def test_truncated_details_row(tmp_path):
    text = DETAILS.read_text()
    p = tmp_path / "cut.csv"
    p.write_text(text[: text.index('"SM Frequency"')])
    _assert_input_error(p, r"truncated CSV: row 3 has 15 fields, header has 22$")


def test_missing_units_row(tmp_path):
    rows = _rows(RAW)
    _assert_input_error(_write_rows(tmp_path / "nounits.csv", [rows[0]] + rows[2:]), r"missing units row")


def test_csv_from_another_tool(tmp_path):
    p = tmp_path / "other.csv"
    p.write_text('"Time (%)","Total Time (ns)","Instances","Name"\n"50.0","100","2","kern"\n')
    _assert_input_error(p, r'not an Nsight Compute CSV export: no header row with "ID" and "Kernel Name"')
    p2 = tmp_path / "other2.csv"
    p2.write_text('"ID","Name","Value"\n"0","x","1"\n')
    _assert_input_error(p2, r'no "ID" and "Kernel Name" columns')


def test_empty_and_message_only(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("")
    _assert_input_error(p, r"empty file$")
    p2 = tmp_path / "blank.csv"
    p2.write_text("\n \n")
    _assert_input_error(p2, r"empty file$")
    p3 = tmp_path / "nokernels.csv"
    p3.write_text("==PROF== Connected to process 1 (/usr/bin/python3)\n==WARNING== No kernels were profiled.\n")
    _assert_input_error(p3, r"no profiled kernels")
    rows = _rows(RAW)
    _assert_input_error(_write_rows(tmp_path / "headonly.csv", rows[:2]), r"no kernel rows")


def test_ncu_rep_without_ncu(tmp_path, monkeypatch):
    rep = tmp_path / "x.ncu-rep"
    rep.write_bytes(b"\x00binary")
    monkeypatch.setattr(ncu, "find_ncu", lambda: None)
    with pytest.raises(InputError) as e:
        ncu.read(rep)
    assert str(e.value) == (f"{rep}: reading .ncu-rep needs Nsight Compute's ncu on PATH; export it with: "
                            "ncu --import FILE --csv --page raw > FILE.csv")


def _fake_ncu(tmp_path: Path) -> Path:
    """A stand-in ncu: --query-metrics prints the committed GH100 list, --import prints the fixtures,
    a profiling run writes an empty report."""
    script = tmp_path / "ncu"
    script.write_text(f"""#!/bin/sh
case "$*" in
  *--query-metrics*) gzip -dc '{QUERY}' ;;
  *"--page raw"*) cat '{RAW}' ;;
  *"--page details"*) cat '{DETAILS}' ;;
  *) while [ "$1" != "-o" ]; do shift; done; echo "$@" > "$2.ncu-rep"; echo "==PROF== done" ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_ncu_rep_with_ncu(tmp_path, monkeypatch):
    fake = _fake_ncu(tmp_path)
    monkeypatch.setattr(ncu, "find_ncu", lambda: str(fake))
    rep = tmp_path / "run.ncu-rep"
    rep.write_bytes(b"\x00")
    t = ncu.read(rep)
    assert len(t.kernel_metrics) == 4
    assert t.meta["inputs"][0]["path"] == str(rep)


# ---------------------------------------------------------------------------------------- collect
def test_analyzer_metrics_cover_the_recording_script():
    text = (ROOT / "scripts/record-fixtures.sh").read_text()
    want = re.search(r'want="([^"]*)"', text).group(1).split()
    assert list(collect.RECORDED_METRICS) == want
    assert set(want) <= set(collect.ANALYZER_METRICS)


def test_available_metrics_on_committed_query_output(tmp_path):
    names = collect.parse_query_metrics(gzip.decompress(QUERY.read_bytes()).decode())
    assert collect.available_metrics(QUERY) == names
    assert len(names) > 3000
    for m in ("dram__bytes_read", "gpu__time_duration", "sm__ops_path_tensor_src_bf16_dst_fp32",
              "sm__ops_path_tensor_src_fp16", "sm__pipe_tensor_op_hmma_cycles_active",
              "smsp__sass_thread_inst_executed_op_ffma_pred_on", "dramc__cycles_elapsed"):
        assert m in names, m
    assert not any(n.startswith(("Metric", "Chip", "==", "-")) or " " in n for n in names)
    missing = MISSING.read_text().split(":", 1)[1].split()
    assert missing == ["sm__ops_path_tensor_src_fp16_dst_fp32.sum", "sm__ops_path_tensor_src_fp16_dst_fp16.sum",
                       "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"]
    assert collect.unavailable_metrics(collect.ANALYZER_METRICS, names) == missing
    # through a real subprocess
    assert collect.available_metrics(str(_fake_ncu(tmp_path)), "gh100") == names


def test_build_ncu_command():
    c = collect.build_ncu_command(["python", "train.py", "--steps", "3"], "/out/prof", ncu="ncu")
    assert c[:3] == ["ncu", "--clock-control", "none"]
    assert c[c.index("-o") + 1] == "/out/prof"
    assert c[c.index("--metrics") + 1] == ",".join(collect.ANALYZER_METRICS)
    assert c[c.index("--launch-count") + 1] == "200"
    assert c[-4:] == ["python", "train.py", "--steps", "3"]
    assert "--nvtx" not in c
    c = collect.build_ncu_command("python train.py", "o", nvtx_range="train_step", launch_skip=2, ncu="ncu")
    assert "--clock-control" in c and c[c.index("--clock-control") + 1] == "none"
    assert c[c.index("--nvtx-include") - 1] == "--nvtx"
    assert c[c.index("--nvtx-include") + 1] == "train_step/"
    assert c[c.index("--launch-skip") + 1] == "2"
    assert "--launch-count" not in c
    c = collect.build_ncu_command("python t.py", "o", kernel_regex="gemm|attn", launch_count=5, ncu="ncu",
                                  metrics=["gpu__time_duration.sum"])
    assert c[c.index("-k") + 1] == "regex:gemm|attn"
    assert c[c.index("--launch-count") + 1] == "5"
    assert c[c.index("--metrics") + 1] == "gpu__time_duration.sum"


def test_run_ncu_with_stand_in(tmp_path):
    fake = _fake_ncu(tmp_path)
    res = collect.run_ncu(["python", "app.py"], tmp_path / "out" / "prof", ncu=str(fake), chip="gh100")
    assert res["report"] == tmp_path / "out" / "prof.ncu-rep" and res["report"].exists()
    assert res["unavailable_metrics"] == MISSING.read_text().split(":", 1)[1].split()
    assert "sm__ops_path_tensor_src_fp16_dst_fp32.sum" not in ",".join(res["command"])
    assert "--clock-control" in res["command"]
    assert len(ncu.read(res["raw_csv"]).kernel_metrics) == 4
    assert ncu.read(res["details_csv"]).meta["ncu"]["page"] == "details"


def test_find_ncu_env(tmp_path, monkeypatch):
    fake = _fake_ncu(tmp_path)
    monkeypatch.setenv("NCU", str(fake))
    assert locate.find_ncu() == str(fake)


# ----------------------------------------------------------------------------------- timeline join
def _timeline(km: pd.DataFrame) -> pd.DataFrame:
    """A timeline where every ncu kernel ran twice, with unrelated kernels in between, as nsys names them."""
    short = {"void cutlass::Kernel2<cutlass_80_simt_sgemm_256x128_8x4_nn_align1>(T1::Params)": "Kernel2"}
    recs = []
    for rep in range(2):
        for _, k in km.iterrows():  # test data: 8 rows
            full = str(k["name"])
            recs.append({"rank": 0, "name": short.get(full, full), "demangled_name": full,
                         **{g: k[g] for g in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z")}})
            recs.append({"rank": 0, "name": "elementwise", "demangled_name": "void at::elementwise<float>()",
                         "grid_x": 1, "grid_y": 1, "grid_z": 1, "block_x": 128, "block_y": 1, "block_z": 1})
    df = pd.DataFrame(recs)
    df["start_ns"] = np.arange(len(df)) * 1000
    df["correlation_id"] = np.arange(len(df)) + 10
    return df


def test_join_to_timeline(raw):
    km = raw.kernel_metrics
    tl = _timeline(km)
    out, unjoined = collect.join_to_timeline(km, tl)
    assert unjoined == 0
    assert out["kernel_row"].tolist() == [0, 2, 4, 6]
    assert (tl["demangled_name"].iloc[out["kernel_row"]].to_numpy() == km["name"].astype(str).to_numpy()).all()
    # ncu printed the function name only (--print-kernel-base function): "Kernel2" matches the short name
    km2 = km.copy()
    km2["name"] = km2["name"].astype(str).replace(
        "void cutlass::Kernel2<cutlass_80_simt_sgemm_256x128_8x4_nn_align1>(T1::Params)", "Kernel2")
    assert collect.join_to_timeline(km2, tl)[0]["kernel_row"].tolist() == [0, 2, 4, 6]
    # a second profiled pass of the same kernels joins the second occurrences; a kernel not in the timeline stays -1
    twice = pd.concat([km, km.assign(launch_id=km["launch_id"] + 4)], ignore_index=True)
    twice.loc[7, "grid_x"] = 999
    out, unjoined = collect.join_to_timeline(twice, tl)
    assert out["kernel_row"].tolist() == [0, 2, 4, 6, 8, 10, 12, -1]
    assert unjoined == 1
    # per-rank row positions; another rank's timeline is not used
    tl2 = pd.concat([tl.assign(rank=1).iloc[:3], tl], ignore_index=True)
    assert collect.join_to_timeline(km, tl2)[0]["kernel_row"].tolist() == [0, 2, 4, 6]
    # timeline without launch geometry (-1) matches on the name
    tl3 = tl.assign(grid_x=-1, grid_y=-1, grid_z=-1, block_x=-1, block_y=-1, block_z=-1)
    assert collect.join_to_timeline(km, tl3)[0]["kernel_row"].tolist() == [0, 2, 4, 6]
    # empty timeline: nothing joined
    assert collect.join_to_timeline(km, tl.iloc[:0])[1] == 4


# ---------------------------------------------------------------------------------------- roofline
def test_roofline_is_pure_and_aligned(raw):
    km = raw.kernel_metrics.copy()
    km.index = [10, 11, 12, 13]
    before = km.copy()
    r = kernel_roofline(km, CEILINGS)
    pd.testing.assert_frame_equal(km, before)
    assert list(r.index) == [10, 11, 12, 13]
    assert r["bound"].tolist() == ["memory", "compute", "compute", "compute"]
    ridge = CEILINGS["bf16_flops_per_s"] / CEILINGS["copy_bandwidth_bytes_per_s"]
    assert r["ridge_intensity"].iloc[0] == pytest.approx(ridge)
    assert kernel_roofline(km.iloc[:0], CEILINGS).empty


def test_roofline_edge_cases():
    km = pd.DataFrame({
        "name": ["copy", "l2_resident", "tf32_gemm", "no_counters", "fp64"],
        "duration_ns": [1000.0, 1000.0, 1000.0, 1000.0, 1000.0],
        "dram_read_bytes": [1e6, 0.0, 1e3, 1e6, 1e3], "dram_write_bytes": [1e6, 0.0, 0.0, 0.0, 0.0],
        "flops_fp32": [0.0, 1e6, 0.0, np.nan, 0.0], "flops_fp64": [0.0, 0.0, 0.0, np.nan, 5e6],
        "flops_fp16": [0.0, 0.0, 0.0, np.nan, 0.0], "flops_tensor": [0.0, 0.0, 1e9, np.nan, 0.0],
        "flops_tensor_tf32": [0.0, 0.0, 1e9, np.nan, 0.0],
    })
    r = kernel_roofline(km, CEILINGS)
    assert r["bound"].tolist() == ["memory", "compute", "compute", "unknown", "compute"]
    assert r["arithmetic_intensity"].iloc[0] == 0
    assert r["roof_fraction"].iloc[0] == pytest.approx(2e6 / 1e-6 / CEILINGS["copy_bandwidth_bytes_per_s"])
    assert np.isinf(r["arithmetic_intensity"].iloc[1])
    assert r["peak_ceiling"].tolist()[2:] == ["tf32_flops_per_s", "", "fp32_flops_per_s"]
    assert r["dominant_precision"].tolist() == ["none", "fp32", "tensor_tf32", "unknown", "fp64"]
    r64 = kernel_roofline(km, {**CEILINGS, "fp64_flops_per_s": 3e13})
    assert r64["peak_flops_per_s"].iloc[4] == 3e13
    with pytest.raises(ValueError, match="copy_bandwidth_bytes_per_s"):
        kernel_roofline(km, {"bf16_flops_per_s": 1.0})
