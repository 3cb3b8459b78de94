"""Counter-grounded verdicts: sampled counters over intervals, ncu-only findings, convolution name rules,
the profiler's own cost in gpu_idle. GPU-metrics fixtures (nsys --gpu-metrics-devices) are in
tests/test_gpu_metrics.py."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from gpudoctor.analyzers import low_tensor_core
from gpudoctor.analyzers.config import load_config
from gpudoctor.analyzers.runner import run_all
from gpudoctor.cli.main import main
from gpudoctor.model import sampled
from gpudoctor.model.trace import Trace, conform
from gpudoctor.readers import kineto, ncu, nsys

FIX = Path(__file__).resolve().parent.parent / "fixtures"
RAW = FIX / "ncu" / "ncu_kernels.raw.csv"
DETAILS = FIX / "ncu" / "ncu_kernels.details.csv"
SHARED = Path("/work/shared/samples/attention_h100.ncu_raw.csv")
CEILINGS = FIX / "ceilings_h100.json"


@lru_cache(maxsize=None)
def _read(path: Path) -> Trace:
    return {"csv": ncu.read, "sqlite": nsys.read}.get(path.suffix.lstrip("."), kineto.read)(path)


def fresh(path: Path) -> Trace:
    t = _read(path)
    return Trace(**{n: df for n, df in t.tables()}, meta=dict(t.meta))


def by_kernel(findings, needle: str):
    got = [f for f in findings if f.analyzer == "ncu_kernels" and needle in f.evidence["kernel"]]
    assert len(got) == 1, [f.evidence["kernel"] for f in findings]
    return got[0]


# ------------------------------------------------------------------ sampled counters over intervals
def test_interval_means_are_time_weighted_over_sample_periods():
    ts = np.array([1000, 2000, 3000, 4000], dtype=np.int64)  # each value holds for the 1000 ns before its stamp
    v = np.array([0.0, 1.0, 0.5, 0.0])
    got = sampled.interval_means(ts, v, np.array([1000, 1500, 0, 2500, 5000]), np.array([2000, 2500, 4000, 3000, 6000]))
    assert got[0] == pytest.approx(1.0)  # exactly the second sample's period
    assert got[1] == pytest.approx(0.75)  # half of 1.0, half of 0.5
    assert got[2] == pytest.approx(0.375)  # all four periods
    assert got[3] == pytest.approx(0.5)
    assert np.isnan(got[4])  # after the last sample: not covered, not zero


def test_counter_names_of_every_source_map_to_one_key():
    for name, key in (("DRAM Read Bandwidth [Throughput %]", "dram_read_fraction"),
                      ("DRAM Write Bandwidth [Throughput %]", "dram_write_fraction"),
                      ("Tensor Active [Throughput %]", "tensor_active_fraction"),
                      ("Tensor Active / FP16 Active [Throughput %]", "tensor_active_fraction"),
                      ("SMs Active [Throughput %]", "sm_active_fraction"), ("GR Active [Throughput %]", "gr_active_fraction"),
                      ("nvml.tensor_util_pct", "tensor_active_fraction"), ("nvml.dram_bw_util_pct", "dram_fraction")):
        assert sampled.canonical(name)[0] == key, name
    assert sampled.canonical("PCIe RX Throughput [Throughput %]") is None  # kept in the table, not read by analyzers
    assert sampled.scale_of("SMs Active [Throughput %]") == 0.01 and sampled.scale_of("GPC Clock Frequency [MHz]") == 1.0


# ------------------------------------------------------------------ ncu export alone
def test_ncu_raw_export_alone_gives_per_kernel_findings_ranked_by_duration():
    cfg = load_config(None, None, ceilings=CEILINGS)
    findings = run_all(fresh(RAW), cfg)
    ncu_f = [f for f in findings if f.analyzer == "ncu_kernels"]
    assert len(ncu_f) == 4
    durations = [f.metrics["duration_ns"] for f in sorted(ncu_f, key=lambda f: -f.metrics["profiled_time_fraction"])]
    assert durations == sorted(durations, reverse=True) and durations[0] == 341216

    gemv = by_kernel(findings, "64x8")
    assert gemv.metrics["bound"] == "memory"
    assert gemv.metrics["dram_bandwidth_fraction"] == pytest.approx(0.908, abs=0.002)  # of the measured copy bandwidth
    assert "tensor cores)" not in gemv.title  # a GEMV waits on DRAM: an idle tensor pipe is not a missing one
    assert gemv.evidence["basis"] == "ncu" and gemv.evidence["ceilings"].startswith("measured ceilings")

    sgemm = by_kernel(findings, "simt_sgemm")
    assert sgemm.metrics["bound"] == "compute" and sgemm.metrics["tensor_pipe_fraction"] == 0.0
    assert "no tensor cores" in sgemm.title and "allow_tf32" in sgemm.recommendation
    assert sgemm.severity == "high"

    bf16 = by_kernel(findings, "nvjet_sm90_tst_256x128")
    assert bf16.metrics["bound"] == "compute" and bf16.metrics["tensor_pipe_fraction"] == pytest.approx(0.949, abs=0.001)
    assert "no tensor cores" not in bf16.title
    assert bf16.metrics["roof_fraction"] == pytest.approx(137438953472 / 176896e-9 / 772276471432095.6, rel=1e-3)


def test_ncu_details_page_bounds_from_speed_of_light():
    findings = run_all(fresh(DETAILS))
    assert by_kernel(findings, "64x8").metrics["bound"] == "memory"  # memory SOL 0.82 vs SM 0.07
    sdpa = by_kernel(findings, "sdpa")
    assert sdpa.metrics["bound"] == "latency"  # SM 0.41, memory 0.29: neither reaches 0.6
    assert sdpa.evidence["bound_by"] == "speed-of-light throughput" and sdpa.evidence["confidence"] == "medium"
    assert by_kernel(findings, "simt_sgemm").metrics["bound"] == "compute"


@pytest.mark.skipif(not SHARED.exists(), reason="shared sample not present")
def test_ncu_one_sol_metric_only_names_the_bound_when_high():
    findings = run_all(fresh(SHARED))
    assert len([f for f in findings if f.analyzer == "ncu_kernels"]) == 4  # 6 launches of 4 kernels
    normal = by_kernel(findings, "normal_kernel")
    assert normal.metrics["bound"] == "compute" and normal.metrics["launches"] == 3  # SM SOL 0.72
    copy = by_kernel(findings, "direct_copy")
    assert copy.metrics["bound"] == "unknown" and copy.severity == "info"  # SM 0.51, memory SOL not exported


def test_analyze_ncu_csv_counts_profiled_kernels(tmp_path, capsys):
    out = tmp_path / "a.json"
    assert main(["analyze", str(RAW), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 profiled by Nsight Compute" in " ".join(printed.split())
    doc = json.loads(out.read_text())
    assert doc["ranks"][0]["profiled_kernel_count"] == 4
    assert {f["analyzer"] for f in doc["findings"]} == {"ncu_kernels"}


def test_ncu_kernels_quiet_without_kernel_metrics():
    assert [f for f in run_all(fresh(FIX / "nsys" / "mlp_bf16.nsys.sqlite")) if f.analyzer == "ncu_kernels"] == []


# ------------------------------------------------------------------ tensor-core names: convolutions
@pytest.mark.parametrize("name", [
    "void cudnn::cnn::conv2d_grouped_direct_kernel<false, true, false, false, 0, 0, int, float, float, float>",
    "void cudnn::cnn::wgrad2d_grouped_direct_kernel<false, true, int, float, float, float>",
    "void cudnn::cnn::dgrad2d_grouped_direct_kernel<false, true, int, float, float, float>",
    "void cudnn::detail::dgrad_engine<float, 128, 6, 7, 3, 3, 5, false>",
    "void cudnn::detail::wgrad_alg0_engine<float, 128, 6, 8, 3, 3, 5, false, 512>",
    "void cudnn::cnn::implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>",
    "sm80_xmma_fprop_implicit_gemm_f32f32_f32f32_f32_nhwckrsc_nhwc_tilesize128x128x8_stage3_warpsize2x2x1_g1_ffma_aligna4",
    "sm80_xmma_dgrad_implicit_gemm_f32f32_f32f32_f32_nhwckrsc_nchw_tilesize64x32x8_stage3_warpsize2x2x1_g1_ffma",
    "void cudnn::winograd_nonfused::winogradForwardData4x4<float, float>",
    "void fft2d_r2c_32x32<float, false, 1u, false>",
])
def test_fp32_convolution_kernels_are_simt(name):
    assert low_tensor_core.is_gemm(name), name
    assert low_tensor_core.name_verdict(name) == "simt", name


@pytest.mark.parametrize("name", [
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_execute",
    "sm80_xmma_fprop_implicit_gemm_tf32f32_tf32f32_f32_nhwckrsc_nhwc_tilesize128x128x16_stage4_warpsize2x2x1_g1",
    "cutlass_80_tensorop_s1688gemm_128x128_32x3_nn_align4", "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT",
    "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8>(T1::Params)",
])
def test_tensor_core_kernels_are_named_so(name):
    assert low_tensor_core.name_verdict(name) == "tensor", name


def test_low_tensor_core_says_which_evidence_decided():
    f = [x for x in run_all(fresh(FIX / "nsys" / "mlp_fp32.nsys.sqlite"), only=["low_tensor_core"])][0]
    assert f.evidence["basis"] == "names" and "[evidence: names" in f.title
    t = fresh(FIX / "torch" / "mlp_fp32.torch.json.gz")
    f = run_all(t, only=["low_tensor_core"])[0]
    assert f.evidence["basis"] == "shapes"  # fp32 mm ops: SIMT unless the kernel names tensor cores


def test_measured_tensor_pipe_overrides_names_and_says_so():
    t = fresh(FIX / "nsys" / "mlp_bf16.nsys.sqlite")
    k = t.kernels
    nvjet = np.nonzero(k["name"].astype(str).str.startswith("nvjet").to_numpy())[0]
    t.kernel_metrics = conform("kernel_metrics", {"name": k["name"].astype(str).to_numpy()[nvjet], "kernel_row": nvjet,
                                                  "tensor_pipe_fraction": np.zeros(len(nvjet))})
    f = run_all(t, only=["low_tensor_core"])[0]
    assert f.evidence["basis"] == "ncu" and f.evidence["confidence"] == "high"
    d = f.evidence["disagreements"][0]
    assert d["names_say"] == "tensor cores" and d["measured_tensor_activity"] == 0.0
    assert "the measurement wins" in f.title


# ------------------------------------------------------------------ observer effect (torch.profiler's own cost)
def test_gpu_idle_estimates_the_profilers_cost_on_torch_traces_only():
    f = run_all(fresh(FIX / "torch" / "tiny_sync.torch.json.gz"), only=["gpu_idle"])[0]
    oe = f.evidence["observer_effect"]
    assert oe["how"] == "estimated" and oe["record_shapes"] and oe["ops_per_step"] == 960
    assert f.metrics["profiler_overhead_per_step_ns"] == 960 * 2200
    assert f.metrics["idle_fraction_without_profiler"] == pytest.approx(0.889, abs=0.01)  # nsys measured 0.889
    assert f.severity == "high"  # still 89% idle without the profiler: the program's own syncs and launches
    assert "profiler" not in f.title
    n = run_all(fresh(FIX / "nsys" / "tiny_sync.nsys.sqlite"), only=["gpu_idle"])[0]
    assert "observer_effect" not in n.evidence and "idle_fraction_without_profiler" not in n.metrics


def test_gpu_idle_uses_measured_unprofiled_step_time():
    t = fresh(FIX / "torch" / "tiny_sync.torch.json.gz")
    nsys_step_ms = 9.018  # the same workload's step under Nsight Systems
    t.meta["unprofiled_step_ms"] = 1.0  # as if the loop ran 1 ms/step unprofiled: the profiler made the gaps
    f = run_all(t, only=["gpu_idle"])[0]
    assert f.evidence["observer_effect"]["how"] == "measured"
    assert f.severity == "low" and "--backend nsys" in f.recommendation and "profiler" in f.title
    t.meta["unprofiled_step_ms"] = nsys_step_ms
    assert run_all(t, only=["gpu_idle"])[0].severity == "high"


def test_stored_ceilings_of_the_gpu_model_are_used_and_both_ridge_points_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUDOCTOR_HOME", str(tmp_path))
    (tmp_path / "ceilings").mkdir()
    (tmp_path / "ceilings" / "nvidia_h100_80gb_hbm3.json").write_text(CEILINGS.read_text())
    out = tmp_path / "a.json"
    assert main(["analyze", str(FIX / "torch" / "decode.torch.json.gz"), "--json", str(out), "--quiet"]) == 0
    f = next(f for f in json.loads(out.read_text())["findings"] if f["analyzer"] == "memory_bound_decode")
    measured = json.loads(CEILINGS.read_text())
    assert f["metrics"]["ridge_point_spec"] == pytest.approx(989.4e12 / 3.35e12, rel=1e-3)
    assert f["metrics"]["ridge_point_measured"] == pytest.approx(
        measured["bf16_flops_per_s"] / measured["copy_bandwidth_bytes_per_s"], rel=1e-3)
    assert f["metrics"]["peak_bandwidth_bytes_per_s"] == pytest.approx(measured["copy_bandwidth_bytes_per_s"], rel=1e-6)
    assert "datasheet" in f["title"]


def test_run_manifest_unprofiled_step_time_reaches_gpu_idle(tmp_path):
    import shutil
    shutil.copy(FIX / "torch" / "tiny_sync.torch.json.gz", tmp_path / "trace.torch.json.gz")
    (tmp_path / "manifest.json").write_text(json.dumps({
        "reports": [{"path": "trace.torch.json.gz", "rank": 0}],
        "capture": {"unprofiled_step_ms": 1.0, "profiled_step_ms": 11.2}}))
    out = tmp_path / "a.json"
    assert main(["analyze", str(tmp_path), "--json", str(out), "--quiet"]) == 0
    f = next(f for f in json.loads(out.read_text())["findings"] if f["analyzer"] == "gpu_idle")
    assert f["evidence"]["observer_effect"]["how"] == "measured"
    assert f["evidence"]["observer_effect"]["unprofiled_step_ns"] == 1_000_000
    assert f["severity"] == "low" and "--backend nsys" in f["recommendation"]
