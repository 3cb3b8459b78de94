"""Verdicts from measured counters on the H200 fixtures recorded with Nsight Systems GPU metrics
(fixtures/README.md, "GPU metrics, ResNet-50 and H200 Nsight Compute"): each detector positive and negative."""

from __future__ import annotations

import json
import sqlite3
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from gpudoctor.analyzers.config import Config
from gpudoctor.analyzers.runner import run_all
from gpudoctor.model import sampled
from gpudoctor.model.trace import Trace
from gpudoctor.readers import kineto, ncu, nsys

FIX = Path(__file__).resolve().parent.parent / "fixtures"


@lru_cache(maxsize=None)
def _read(rel: str) -> Trace:
    p = FIX / rel
    return nsys.read(p) if p.suffix == ".sqlite" else ncu.read(p) if p.suffix == ".csv" else kineto.read(p)


def load(rel: str) -> Trace:
    t = _read(rel)
    return Trace(**{n: df for n, df in t.tables()}, meta=dict(t.meta))


def finding(rel: str, analyzer: str, config=None):
    got = [f for f in run_all(load(rel), config, only=[analyzer])]
    assert len(got) == 1, [f.title for f in got]
    return got[0]


# ------------------------------------------------------------------ the reader
def test_gpu_metrics_become_counters_with_their_names_and_units():
    t = load("nsys/decode_b1_gm.nsys.sqlite")
    with sqlite3.connect(FIX / "nsys" / "decode_b1_gm.nsys.sqlite") as c:
        rows = c.execute("select count(*) from GPU_METRICS").fetchone()[0]
        names = {n for (n,) in c.execute("select metricName from TARGET_INFO_GPU_METRICS")}
    gm = t.counters[~t.counters["name"].astype(str).str.startswith(("kv_", "nvml."))]
    assert len(gm) == rows == 57024  # every sample of every metric, none dropped
    assert set(gm["name"].astype(str)) == names and len(names) == 22
    assert {"DRAM Read Bandwidth [Throughput %]", "Tensor Active [Throughput %]", "SMs Active [Throughput %]",
            "GR Active [Throughput %]", "PCIe RX Throughput [Throughput %]"} <= names
    ts, v, src = sampled.series(t.counters, "dram_read_fraction")
    assert src == "gpu_metrics" and len(ts) == 57024 // 22
    assert np.median(np.diff(ts)) == pytest.approx(500_000, rel=0.01)  # 2 kHz
    assert 0 <= v.min() and v.max() <= 1  # percent -> fraction


# ------------------------------------------------------------------ memory_bound_decode: MBU from DRAM samples
def _dram_throughput_over_decode_steps(rel: str) -> float:
    """Independently: the plain mean of DRAM read + write [Throughput %] samples stamped inside the decode
    steps' GPU spans, straight from the SQLite export."""
    t = load(rel)
    offset = int(t.ranks["clock_offset_ns"].iat[0])
    r = t.ranges[(t.ranges["text"].astype(str) == "decode_step") & (t.ranges["gpu_start_ns"] >= 0)]
    spans = list(zip(r["gpu_start_ns"] - offset, r["gpu_end_ns"] - offset))[1:]  # the analyzer skips the first as warm-up
    with sqlite3.connect(FIX / rel) as c:
        ids = [i for (i,) in c.execute("select metricId from TARGET_INFO_GPU_METRICS where metricName like 'DRAM % Bandwidth%'")]
        q = f"select timestamp, metricId, value from GPU_METRICS where metricId in ({','.join(map(str, ids))})"
        rows = np.array(c.execute(q).fetchall(), dtype=float)
    per_metric = []
    for mid in ids:
        m = rows[rows[:, 1] == mid]
        inside = np.zeros(len(m), bool)
        for s, e in spans:
            inside |= (m[:, 0] > s) & (m[:, 0] <= e)
        per_metric.append(m[inside, 2].mean() / 100)
    return float(sum(per_metric))


@pytest.mark.parametrize("rel,tokens,severity", [("nsys/decode_b1_gm.nsys.sqlite", 8.0, "high"),
                                                 ("nsys/decode_b32_gm.nsys.sqlite", 32.0, "medium")])
def test_decode_mbu_is_the_measured_dram_throughput(rel, tokens, severity):
    f = finding(rel, "memory_bound_decode")
    assert f.evidence["basis"] == "gpu_metrics" and f.evidence["confidence"] == "high"
    assert f.metrics["decode_steps"] == 31 and f.metrics["bound"] == "memory"
    assert f.metrics["mbu"] == pytest.approx(_dram_throughput_over_decode_steps(rel), abs=0.05)
    assert f.metrics["mbu"] == pytest.approx(f.metrics["dram_throughput_fraction"], abs=1e-4)  # datasheet peaks
    assert f.metrics["tokens_per_step"] == tokens  # an upper bound from the kernel tiles (names)
    assert f.metrics["ridge_point"] == pytest.approx(989.4e12 / 4.8e12, rel=1e-3)  # H200
    assert f.metrics["arithmetic_intensity"] < f.metrics["ridge_point"] / 4
    assert f.severity == severity and "[evidence: gpu_metrics" in f.title
    assert "Batching" in f.recommendation


def test_prefill_is_compute_bound_by_measurement():
    f = finding("nsys/prefill_gm.nsys.sqlite", "memory_bound_decode")
    assert f.severity == "info" and f.metrics["decode_steps"] == 0
    assert f.evidence["basis"] == "gpu_metrics" and f.metrics["bound"] == "compute"
    m = f.evidence["measurement"]
    assert m["tensor_active_fraction"] > 0.7  # measured on the steps' GPU spans
    assert f.metrics["arithmetic_intensity"] > f.metrics["ridge_point"]


def test_decode_at_batch_32_from_torch_profiler_shapes():
    f = finding("torch/decode_b32.torch.json.gz", "memory_bound_decode")
    assert f.evidence["basis"] == "shapes"
    assert f.metrics["tokens_per_step"] == 32 and f.metrics["arithmetic_intensity"] == pytest.approx(32.0)
    assert f.metrics["bytes_per_step"] == json.loads((FIX / "truth" / "decode_b32_gm.truth.json").read_text())["weight_bytes"]
    assert f.severity == "medium"  # ridge 206 / 32 = 6.4x headroom
    # Without the step names: shapes alone find the decode steps at this batch.
    cfg = Config().update({"memory_bound_decode.decode_range_pattern": "^no such step$"})
    f = finding("torch/decode_b32.torch.json.gz", "memory_bound_decode", cfg)
    assert f.metrics["decode_steps"] == 23 and f.evidence["decode_steps_by"].startswith("CPU-op shapes")
    assert f.severity == "medium"


@pytest.mark.parametrize("rel", ["torch/conv_fp32.torch.json.gz", "torch/conv_bf16.torch.json.gz"])
def test_training_a_cnn_is_not_decode(rel):
    assert run_all(load(rel), only=["memory_bound_decode"]) == []  # its FC layer has 64 rows, but backward runs


# ------------------------------------------------------------------ low_tensor_core: Tensor Active samples
def test_fp32_resnet_convolutions_run_without_tensor_cores_by_measurement():
    f = finding("nsys/conv_fp32_gm.nsys.sqlite", "low_tensor_core")
    assert f.evidence["basis"] == "gpu_metrics" and f.evidence["confidence"] == "high"
    assert f.metrics["non_tensor_core_gemm_fraction"] >= 0.9
    assert f.severity == "high"
    names = " ".join(k["name"] for k in f.evidence["non_tensor_core_kernels"])
    assert "dgrad_engine" in names and "wgrad_alg0_engine" in names and "ffma" in names


def test_bf16_resnet_runs_on_tensor_cores_by_measurement():
    f = finding("nsys/conv_bf16_gm.nsys.sqlite", "low_tensor_core")
    assert f.evidence["basis"] == "gpu_metrics"
    assert f.metrics["non_tensor_core_gemm_fraction"] == pytest.approx(0.0, abs=0.01)
    assert f.severity == "info"


@pytest.mark.parametrize("rel,lo,hi", [("torch/conv_fp32.torch.json.gz", 0.9, 1.0), ("torch/conv_bf16.torch.json.gz", 0.0, 0.01)])
def test_resnet_tensor_core_share_from_shapes(rel, lo, hi):
    f = finding(rel, "low_tensor_core")
    assert f.evidence["basis"] == "shapes"
    assert lo <= f.metrics["non_tensor_core_gemm_fraction"] <= hi


# ------------------------------------------------------------------ ncu_kernels on the H200 export
def test_h200_ncu_export_alone():
    findings = [f for f in run_all(load("ncu/ncu_h200.raw.csv")) if f.analyzer == "ncu_kernels"]
    assert len(findings) == 10  # max_kernels of the 12 profiled kernel names (14 launches)
    by_range = {}
    for f in findings:
        by_range.setdefault(f.evidence.get("nvtx_range"), []).append(f)
    fft = [f for f in by_range["conv_fp32"] if "fft2d_r2c" in f.evidence["kernel"]][0]
    assert "no tensor cores" in fft.title and fft.metrics["tensor_pipe_fraction"] < 0.02
    conv_bf16 = by_range["conv_bf16"][0]
    assert conv_bf16.metrics["tensor_pipe_fraction"] == pytest.approx(0.9316, abs=0.001)
    assert "no tensor cores" not in conv_bf16.title and conv_bf16.metrics["bound"] == "compute"
    add = by_range["elementwise_add"][0]
    assert add.metrics["bound"] == "memory" and add.metrics["memory_throughput_fraction"] > 0.85
    assert by_range["gemm_fp32"][0].metrics["tensor_pipe_fraction"] == 0.0


# ------------------------------------------------------------------ gpu_idle: the profiler's own cost
def test_profiler_cost_estimate_moves_the_idle_fraction_towards_the_unprofiled_one():
    """Removing the estimated per-op cost from a torch.profiler trace moves its idle fraction towards the one
    Nsight Systems measured on the same workload (without overshooting it by more than 0.05)."""
    for torch_rel, nsys_rel in (("torch/conv_bf16.torch.json.gz", "nsys/conv_bf16_gm.nsys.sqlite"),
                                ("torch/tiny_sync.torch.json.gz", "nsys/tiny_sync.nsys.sqlite"),
                                ("torch/tiny_fused.torch.json.gz", "nsys/tiny_fused.nsys.sqlite")):
        t = finding(torch_rel, "gpu_idle")
        n = finding(nsys_rel, "gpu_idle")
        assert t.metrics["idle_fraction"] > n.metrics["idle_fraction"]
        assert n.metrics["idle_fraction"] - 0.05 <= t.metrics["idle_fraction_without_profiler"] < t.metrics["idle_fraction"]
        assert t.severity == n.severity  # the profiler does not explain these verdicts: no downgrade


def test_run_summary_carries_gpu_metric_means():
    from gpudoctor.model.summary import summarize_rank
    s = summarize_rank(load("nsys/prefill_gm.nsys.sqlite"), 0).to_dict()["gpu_metrics"]
    assert s["tensor_active_fraction"] == pytest.approx(0.79, abs=0.01)
    assert s["gr_active_fraction"] > 0.95 and s["dram_read_fraction"] == pytest.approx(0.19, abs=0.01)
    assert summarize_rank(load("nsys/mlp_bf16.nsys.sqlite"), 0).to_dict()["gpu_metrics"] == {}  # recorded without


@pytest.mark.parametrize("rel,frac", [("nsys/conv_fp32_gm.nsys.sqlite", 1.0), ("nsys/conv_bf16_gm.nsys.sqlite", 0.0)])
def test_convolution_names_alone_agree_with_the_measurement(rel, frac):
    """Without the GPU-metrics samples the names decide: cuDNN's FP32 kernels (dgrad_engine, wgrad_alg0_engine,
    ffma implicit GEMM, FFT, Winograd) are SIMT, the bf16 xmma / nvjet / tensorop kernels are not."""
    from gpudoctor.model.trace import empty_frame
    t = load(rel)
    t.counters = empty_frame("counters")
    f = [x for x in run_all(t, only=["low_tensor_core"])][0]
    assert f.evidence["basis"] == "names"
    assert f.metrics["non_tensor_core_gemm_fraction"] == pytest.approx(frac, abs=0.001)


def test_decode_at_batch_32_from_names_alone():
    from gpudoctor.model.trace import empty_frame
    t = load("nsys/decode_b32_gm.nsys.sqlite")
    t.counters = empty_frame("counters")
    f = [x for x in run_all(t, only=["memory_bound_decode"])][0]
    assert f.evidence["basis"] == "names" and f.metrics["tokens_per_step"] == 32  # nvjet _64x32_ / _128x32_ tiles
    assert f.severity == "medium" and f.metrics["mbu"] is None
