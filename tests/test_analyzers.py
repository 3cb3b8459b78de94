"""Analyzers on the real H100 fixtures (fixtures/README.md), through both readers, plus unit tests.

Each analyzer must fire (medium or high) on its positive fixture and stay below medium on its negative,
through the Nsight Systems export AND the torch.profiler trace of the same workload. The metric values
pinned below are what the analyzers measured on these fixtures (see docs/analyzers.md); tolerances are
tight so that a change in a reader or an analyzer that moves a number shows up here.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from gpudoctor.analyzers import gpu_idle, low_tensor_core, runner, unfused_attention
from gpudoctor.analyzers.config import Config, as_config, load_config
from gpudoctor.analyzers.findings import SEVERITIES, Finding, severity_for
from gpudoctor.analyzers.registry import ANALYZERS
from gpudoctor.analyzers.runner import run_all, sort_findings
from gpudoctor.errors import GpudoctorError
from gpudoctor.model import devices
from gpudoctor.model.trace import Trace, conform, empty_frame, merge
from gpudoctor.readers import kineto, nsys

FIX = Path(__file__).resolve().parent.parent / "fixtures"
SOURCES = ("nsys", "torch")
FRAC = 0.003  # absolute tolerance of fractions of the window


@lru_cache(maxsize=None)
def _read(name: str, source: str) -> Trace:
    if source == "nsys":
        return nsys.read(FIX / "nsys" / f"{name}.nsys.sqlite")
    return kineto.read(FIX / "torch" / f"{name}.torch.json.gz")


def load(name: str, source: str, shapes: bool = False) -> Trace:
    """A fresh Trace object sharing the cached tables (meta copied so tests can add to it).

    The Kineto reader fills ``cpu_ops`` (with shapes: the fixtures were recorded with record_shapes);
    ``shapes=False`` empties it, to pin the analyzers' fallback on kernel names and timing.
    """
    t = _read(name, source)
    out = Trace(**{n: df for n, df in t.tables()}, meta=dict(t.meta))
    if shapes:
        assert source == "torch" and len(out.cpu_ops), "shapes come from the torch.profiler trace"
        out.cpu_ops = out.cpu_ops.copy()
    else:
        out.cpu_ops = empty_frame("cpu_ops")
    return out


def truth(name: str) -> dict:
    return json.loads((FIX / "truth" / f"{name}.truth.json").read_text())


def decode_config(name: str) -> Config:
    """Workload facts from the truth JSON, as a user would give them."""
    t = truth(name)
    return Config().update({"memory_bound_decode.model_bytes": t["weight_bytes"],
                            "memory_bound_decode.tokens_per_step": t["tokens_per_step"]})


def one(findings: list[Finding], analyzer: str) -> Finding:
    got = [f for f in findings if f.analyzer == analyzer]
    assert len(got) == 1, f"expected one {analyzer} finding, got {[f.title for f in got]}"
    return got[0]


def fires(f: Finding) -> bool:
    return f.severity in ("medium", "high")


# ------------------------------------------------------------------ unfused_attention
UNFUSED = {  # source: (attention_time_fraction, instances, estimated_saving_fraction)
    "nsys": (0.6552, 28, 0.5609),
    "torch": (0.6542, 28, 0.5601),
}
SDPA_FUSED_FRACTION = {"nsys": 0.1033, "torch": 0.0734}


@pytest.mark.parametrize("source", SOURCES)
def test_unfused_attention_fires_on_naive_attention(source):
    f = one(run_all(load("attn_naive", source), only=["unfused_attention"]), "unfused_attention")
    frac, n, saving = UNFUSED[source]
    assert f.severity == "high"
    assert f.metrics["attention_time_fraction"] == pytest.approx(frac, abs=FRAC)
    assert f.metrics["instances"] == n
    assert f.metrics["forward_instances"] == f.metrics["backward_instances"] == 14  # 2 layers x 7 steady steps
    assert f.metrics["instances_per_step"] == 4
    assert f.estimated_saving_fraction == pytest.approx(saving, abs=FRAC)
    assert f.rank == 0
    ex = f.evidence["examples"][0]
    names = " ".join(k["name"] for k in ex["kernels"])
    assert "softmax_warp_forward" in names and "nvjet" in names and "masked_fill" in names
    assert "scaled_dot_product_attention" in f.recommendation


@pytest.mark.parametrize("source", SOURCES)
def test_unfused_attention_quiet_on_sdpa(source):
    f = one(run_all(load("attn_sdpa", source), only=["unfused_attention"]), "unfused_attention")
    assert f.severity == "info"
    assert f.metrics["attention_time_fraction"] == 0.0
    assert f.metrics["instances"] == 0
    assert f.metrics["fused_attention_fraction"] == pytest.approx(SDPA_FUSED_FRACTION[source], abs=FRAC)
    assert any("cudnn_generated_fort_native_sdpa" in n for n in f.evidence["fused_kernels"])


def test_unfused_attention_with_shapes_checks_chains_and_counts_score_traffic():
    f = one(run_all(load("attn_naive", "torch", shapes=True), only=["unfused_attention"]), "unfused_attention")
    assert f.metrics["shapes_checked"] == 28  # inner dim of the GEMM after softmax == softmax row length (1024)
    assert f.metrics["score_traffic_ns"] > 0
    assert f.estimated_saving_fraction == pytest.approx(0.6282, abs=FRAC)


@pytest.mark.parametrize("source", SOURCES)
def test_unfused_attention_saving_is_below_what_fusing_really_saved(source):
    """The same workload with SDPA ran in the time the estimate predicts, or faster."""
    naive = one(run_all(load("attn_naive", source), only=["unfused_attention"]), "unfused_attention")
    ctx_n = runner.contexts(load("attn_naive", source))[0]
    ctx_f = runner.contexts(load("attn_sdpa", source))[0]
    gpu_n = ctx_n.busy_ns() / len(ctx_n.window.steady)
    gpu_f = ctx_f.busy_ns() / len(ctx_f.window.steady)
    real = 1 - gpu_f / gpu_n  # GPU time per step saved by SDPA: 0.70
    assert naive.estimated_saving_fraction <= real
    assert naive.estimated_saving_fraction >= 0.75 * real


def test_fused_kernel_families_are_recognized():
    fused = [
        "void flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::half_t>, true>(Flash_fwd_params)",
        "void flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>(Flash_bwd_params)",
        "void cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>(...)",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)",
        "fmha_cutlassB_f16_aligned_128x64_k128_sm80",
        "void pytorch_flash::flash_fwd_kernel<pytorch_flash::Flash_fwd_kernel_traits<64, 128>>",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
        "void attention_kernel_batched_impl<AttentionKernel<cutlass::bfloat16_t, cutlass::arch::Sm80, true, 64, 64, 64>>",
        "xformers::fmha_cutlassF",
        "triton_tem_fused_0",
        "triton_tem_fused_flex_attention_1",
        "fmha_v2_flash_attention_bf16_64_128_S_q_kv_128_sm90_kernel_nl",
        "xqa_kernel_dt_bf16_d_128_beam_1_kvt_e4m3_nqpkv_8_m_8_sm_90",
        "void tensorrt_llm::kernels::mmha::masked_multihead_attention_kernel<...>",
        "void vllm::paged_attention_v2_kernel<__nv_bfloat16, 128, 16, 128>",
        "void flashinfer::BatchPrefillWithPagedKVCacheKernel<...>",
        "void flashinfer::BatchDecodeWithPagedKVCacheKernel<...>",
    ]
    for n in fused:
        assert unfused_attention.kernel_class(n) == unfused_attention.FUSEDK, n
    assert unfused_attention.kernel_class("triton_tem_fused_mm_3") == unfused_attention.GEMM
    assert unfused_attention.kernel_class("void <unnamed>::softmax_warp_forward<float, float, float, 10>") == unfused_attention.SOFT
    assert unfused_attention.kernel_class("void cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>") != unfused_attention.SOFT


def _synthetic(names: list[str], gap: int = 2_000, dur: int = 10_000, streams: list[int] | None = None) -> Trace:
    n = len(names)
    start = np.arange(n, dtype=np.int64) * (dur + gap) + 1_000_000
    t = Trace()
    t.set("kernels", {"start_ns": start, "end_ns": start + dur, "name": names, "demangled_name": names,
                      "stream_id": streams or [7] * n, "correlation_id": np.arange(n) + 1})
    t.set("api_calls", {"start_ns": start - 5_000, "end_ns": start - 4_000, "name": ["cudaLaunchKernel"] * n,
                        "correlation_id": np.arange(n) + 1, "thread_id": [1] * n})
    t.set("ranks", {"rank": [0]})
    return t


def test_unfused_chain_needs_gemms_on_both_sides_of_the_softmax_on_one_stream():
    chain = ["sm90_xmma_gemm_bf16bf16_bf16f32_f32_nn_n_tilesize128x128x64_kernel_a",
             "void at::native::vectorized_elementwise_kernel<8, MulFunctor>_b",
             "void softmax_warp_forward<c10::BFloat16, float, 10>_c",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_nn_n_tilesize128x128x64_kernel_d"]
    f = one(run_all(_synthetic(chain), only=["unfused_attention"]), "unfused_attention")
    assert f.metrics["instances"] == 1
    assert f.metrics["attention_time_fraction"] == pytest.approx(40_000 / 46_000, abs=1e-6)
    assert f.estimated_saving_ns == 20_000  # the elementwise + softmax kernels
    # The second GEMM on another stream: no chain (launch order is per stream).
    assert run_all(_synthetic(chain, streams=[7, 7, 7, 8]), only=["unfused_attention"]) == []
    # Softmax feeding a loss (no GEMM after it): a classifier head, not attention.
    head = chain[:3] + ["void at::native::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>_e"]
    assert run_all(_synthetic(head), only=["unfused_attention"]) == []


# ------------------------------------------------------------------ low_tensor_core
LTC = {"nsys": (1.0, 0.9597, 0.8299), "torch": (1.0, 0.9599, 0.8301)}  # fraction, gemm time / window, saving


@pytest.mark.parametrize("source", SOURCES)
def test_low_tensor_core_fires_on_fp32(source):
    f = one(run_all(load("mlp_fp32", source), only=["low_tensor_core"]), "low_tensor_core")
    frac, gemm_frac, saving = LTC[source]
    assert f.severity == "high"
    assert f.metrics["non_tensor_core_gemm_fraction"] == pytest.approx(frac, abs=FRAC)
    assert f.metrics["gemm_time_fraction"] == pytest.approx(gemm_frac, abs=FRAC)
    assert f.estimated_saving_fraction == pytest.approx(saving, abs=FRAC)
    assert f.metrics["tensor_core_speedup_assumed"] == pytest.approx(494.7 / 66.9, rel=1e-3)
    names = " ".join(k["name"] for k in f.evidence["non_tensor_core_kernels"])
    assert "ffma" in names and "simt_sgemm" in names
    assert "allow_tf32" in f.recommendation and "autocast" in f.recommendation


@pytest.mark.parametrize("source", SOURCES)
def test_low_tensor_core_quiet_on_bf16(source):
    f = one(run_all(load("mlp_bf16", source), only=["low_tensor_core"]), "low_tensor_core")
    assert f.severity == "info"
    assert f.metrics["non_tensor_core_gemm_fraction"] == 0.0
    assert f.metrics["gemm_time_fraction"] == pytest.approx({"nsys": 0.6633, "torch": 0.6546}[source], abs=FRAC)


@pytest.mark.parametrize("source", SOURCES)
def test_low_tensor_core_fp32_saving_below_the_real_bf16_speedup(source):
    f = one(run_all(load("mlp_fp32", source), only=["low_tensor_core"]), "low_tensor_core")
    w32 = runner.contexts(load("mlp_fp32", source))[0].window_ns
    w16 = runner.contexts(load("mlp_bf16", source))[0].window_ns
    assert f.estimated_saving_fraction <= 1 - w16 / w32  # bf16 really saved 0.91; the TF32 estimate is 0.83


@pytest.mark.parametrize("source", SOURCES)
def test_low_tensor_core_does_not_flag_gemv(source):
    f = one(run_all(load("decode", source), only=["low_tensor_core"]), "low_tensor_core")
    assert f.severity == "info"
    assert f.metrics["non_tensor_core_gemm_fraction"] == 0.0
    assert f.metrics["gemv_time_fraction"] > 0.02


def test_gemm_tiles_and_tensor_core_names():
    tm = low_tensor_core.tile_min
    assert tm("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_splitK_TNT") == 8
    assert tm("nvjet_tss_64x8_TNN") == 8 and tm("nvjet_tss_256x128_64x4_1x2_h_bz_coopA_TNT") == 128
    assert tm("sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize256x64x8_stage3_warpsize2x2x1_ffma") == 64
    assert tm("void cutlass::Kernel2<cutlass_80_simt_sgemm_128x256_8x4_nt_align1>(T1::Params)") == 128
    assert tm("sgemm_largek_lds64") == -1
    assert low_tensor_core.NON_TC.search("ampere_sgemm_128x64_nn")
    assert low_tensor_core.NON_TC.search("void cudnn::cnn::implicit_convolve_sgemm<float, float, 128, 5, 5>")
    for tc in ("nvjet_tss_256x128_64x4_1x2_h_bz_coopA_TNT", "sm80_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32",
               "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n"):
        assert low_tensor_core.is_gemm(tc) and not low_tensor_core.NON_TC.search(tc), tc
    assert not low_tensor_core.is_gemm("void cublasLt::splitKreduce_kernel<32, 16, int, float>")
    assert not low_tensor_core.is_gemm("void cudnn::fusion::convert_dq_to_16bits<true>(void const*)")


def test_low_tensor_core_prefers_nsight_compute_measurements():
    t = load("mlp_bf16", "nsys")
    k = t.kernels
    nvjet = np.nonzero(k["name"].astype(str).str.startswith("nvjet").to_numpy())[0]
    t.kernel_metrics = conform("kernel_metrics", {
        "name": k["name"].astype(str).to_numpy()[nvjet], "kernel_row": nvjet,
        "tensor_pipe_fraction": np.zeros(len(nvjet))})  # measured: tensor pipe idle
    f = one(run_all(t, only=["low_tensor_core"]), "low_tensor_core")
    assert f.metrics["non_tensor_core_gemm_fraction"] == pytest.approx(1.0)
    assert fires(f) and "Nsight Compute" in f.evidence["method"]

    t = load("mlp_fp32", "nsys")
    names = t.kernels["demangled_name"].astype(str)
    fp32_names = sorted(set(names[names.str.contains("ffma|sgemm")]))
    assert len(fp32_names) == 3
    t.kernel_metrics = conform("kernel_metrics", {"name": fp32_names,
                                                  "tensor_pipe_fraction": [0.6] * 3})  # unjoined, matched by name
    f = one(run_all(t, only=["low_tensor_core"]), "low_tensor_core")
    assert f.metrics["non_tensor_core_gemm_fraction"] == 0.0 and not fires(f)


def test_low_tensor_core_flags_misaligned_half_gemms_from_shapes():
    t = load("mlp_bf16", "torch", shapes=True)
    ops = t.cpu_ops
    mm = ops["name"].isin(["aten::addmm", "aten::mm"])
    ops.loc[mm, "input_dims"] = ops.loc[mm, "input_dims"].map(
        lambda d: json.dumps([x if not x else x[:-1] + [4099] for x in json.loads(d)]))
    f = one(run_all(t, only=["low_tensor_core"]), "low_tensor_core")
    assert f.metrics["misaligned_gemm_fraction"] > 0.5
    assert f.evidence["misaligned_examples"][0]["dtype"] == "c10::BFloat16"
    assert "multiple of 8" in f.recommendation


# ------------------------------------------------------------------ memory_bound_decode
DECODE = {  # mbu, mbu_gpu_busy, achieved bandwidth B/s, tokens/s
    "nsys": (0.01685, 0.6622, 5.645e10, 22.43),
    "torch": (0.01778, 0.6623, 5.957e10, 23.67),
}
PREFILL = {"nsys": (0.0462, 1.548e11), "torch": (0.0467, 1.566e11)}


@pytest.mark.parametrize("source", SOURCES)
def test_memory_bound_decode_fires_on_decode(source):
    f = one(run_all(load("decode", source), decode_config("decode"), only=["memory_bound_decode"]), "memory_bound_decode")
    mbu, mbu_busy, bw, tps = DECODE[source]
    assert f.severity == "high"
    m = f.metrics
    assert m["bound"] == "memory"
    assert m["decode_steps"] == 23
    assert m["arithmetic_intensity"] == pytest.approx(1.0)
    assert m["ridge_point"] == pytest.approx(989.4e12 / 3.35e12, rel=1e-3)
    assert m["mbu"] == pytest.approx(mbu, abs=0.0005)
    assert m["mbu_gpu_busy"] == pytest.approx(mbu_busy, abs=FRAC)
    assert m["achieved_bandwidth_bytes_per_s"] == pytest.approx(bw, rel=0.01)
    assert m["tokens_per_s"] == pytest.approx(tps, rel=0.01)
    assert m["roofline_ceiling_tokens_per_s"] == pytest.approx(3.35e12 / 2516582400, rel=1e-3)
    assert "Batching to 32" in f.recommendation and "CUDA graph" in f.recommendation


@pytest.mark.parametrize("source", SOURCES)
def test_memory_bound_decode_quiet_on_prefill(source):
    f = one(run_all(load("prefill", source), decode_config("prefill"), only=["memory_bound_decode"]), "memory_bound_decode")
    mbu, bw = PREFILL[source]
    assert f.severity == "info"
    assert f.metrics["decode_steps"] == 0
    assert f.metrics["bound"] == "compute"
    assert f.metrics["arithmetic_intensity"] == pytest.approx(4096.0)
    assert f.metrics["mbu"] == pytest.approx(mbu, abs=0.0005)
    assert f.metrics["achieved_bandwidth_bytes_per_s"] == pytest.approx(bw, rel=0.01)


def test_memory_bound_decode_reads_weight_bytes_from_shapes():
    f = one(run_all(load("decode", "torch", shapes=True), only=["memory_bound_decode"]), "memory_bound_decode")
    assert f.metrics["bytes_per_step"] == truth("decode")["weight_bytes"]  # 2,516,582,400: every weight once
    assert f.metrics["tokens_per_step"] == 1
    assert f.metrics["mbu"] == pytest.approx(DECODE["torch"][0], abs=0.0005)
    assert f.severity == "high"


def test_memory_bound_decode_quiet_on_cnn_training_with_a_small_head():
    """A conv net trained at batch 16 (the H200 shape_change recording): its only matrix product, the
    Linear(128, 10) head, has 16 rows, which once made every GEMM/conv kernel 'GEMV-shaped' and the steps
    decode steps (high, MBU 0.0%). A backward pass and convolution-launched GEMM time rule decode out."""
    t = kineto.read(Path(__file__).resolve().parent.parent / "fixtures" / "stacks" / "shape_change.torch.json.gz")
    assert [(f.severity, f.metrics.get("decode_steps")) for f in run_all(t, only=["memory_bound_decode"])
            if f.severity != "info"] == []


@pytest.mark.parametrize("rank", [0, 1])
def test_memory_bound_decode_quiet_on_a_training_model_with_a_decoder_block(rank):
    """The third-party TorchRec-style training trace names a module range '## decoder fp8 None ##' inside each
    step; 'decoder' is not 'decode', and a step with a backward pass is not a decode step (it was a LOW
    'Decode is memory-bound' on both ranks)."""
    t = kineto.read(Path(__file__).resolve().parent.parent / "fixtures" / "hta" / "trace_filter"
                    / f"sampled_rank-{rank}.json.gz")
    assert (t.ranges["text"].astype(str) == "## decoder fp8 None ##").sum() == 4
    assert [f.severity for f in run_all(t, only=["memory_bound_decode"]) if f.severity != "info"] == []


def test_memory_bound_decode_without_workload_facts_still_fires_from_kernel_shapes():
    f = one(run_all(load("decode", "nsys"), only=["memory_bound_decode"]), "memory_bound_decode")
    assert f.severity == "high"
    assert f.metrics["mbu"] is None
    assert f.metrics["arithmetic_intensity"] == pytest.approx(8.0)  # bound from the nvjet _64x8_ tiles
    p = one(run_all(load("prefill", "nsys"), only=["memory_bound_decode"]), "memory_bound_decode")
    assert p.severity == "info"


def test_memory_bound_decode_uses_measured_ceilings():
    cfg = load_config(None, {"memory_bound_decode.model_bytes": 2516582400, "memory_bound_decode.tokens_per_step": 1},
                      ceilings=FIX / "ceilings_h100.json")
    f = one(run_all(load("decode", "nsys"), cfg, only=["memory_bound_decode"]), "memory_bound_decode")
    measured = json.loads((FIX / "ceilings_h100.json").read_text())
    assert f.metrics["peak_bandwidth_bytes_per_s"] == pytest.approx(measured["copy_bandwidth_bytes_per_s"], rel=1e-6)
    assert f.metrics["mbu"] == pytest.approx(0.01885, abs=0.0005)
    assert f.metrics["ridge_point"] == pytest.approx(measured["bf16_flops_per_s"] / measured["copy_bandwidth_bytes_per_s"], rel=1e-3)


def test_memory_bound_decode_silent_on_training():
    assert run_all(load("mlp_bf16", "nsys"), only=["memory_bound_decode"]) == []


# ------------------------------------------------------------------ gpu_idle
IDLE = {  # idle, launch_bound, host_sync
    "nsys": (0.8894, 0.6941, 0.1952),
    "torch": (0.9116, 0.6951, 0.1984),
}
IDLE_FUSED = {"nsys": 0.1485, "torch": 0.1898}


@pytest.mark.parametrize("source", SOURCES)
def test_gpu_idle_fires_on_tiny_sync(source):
    f = one(run_all(load("tiny_sync", source), only=["gpu_idle"]), "gpu_idle")
    idle, launch, sync = IDLE[source]
    assert f.severity == "high"
    assert f.metrics["idle_fraction"] == pytest.approx(idle, abs=FRAC)
    assert f.metrics["launch_bound_fraction"] == pytest.approx(launch, abs=FRAC)
    assert f.metrics["host_sync_fraction"] == pytest.approx(sync, abs=FRAC)
    assert f.metrics["median_kernel_ns"] < 5000 < f.metrics["median_launch_call_ns"]
    assert f.metrics["kernels_per_step"] == 448
    assert "cudaStreamSynchronize" in f.evidence["examples"]["host_sync"][0]["api_calls_in_gap"]
    assert "CUDA graph" in f.recommendation and ".item()" in f.recommendation


@pytest.mark.parametrize("source", SOURCES)
def test_gpu_idle_below_medium_on_tiny_fused(source):
    f = one(run_all(load("tiny_fused", source), only=["gpu_idle"]), "gpu_idle")
    assert f.severity == "low"
    assert f.metrics["idle_fraction"] == pytest.approx(IDLE_FUSED[source], abs=FRAC)
    assert f.metrics["launch_bound_fraction"] < 0.01
    # The only sync left is the one per step; it explains most of the idle time.
    assert f.metrics["host_sync_fraction"] > 0.5 * f.metrics["idle_fraction"]


def test_gpu_idle_finds_per_step_module_loads_in_decode():
    """cuDNN builds and loads a new SDPA kernel every decode step (the KV length changes)."""
    f = one(run_all(load("decode", "nsys"), only=["gpu_idle"]), "gpu_idle")
    assert f.severity == "high"
    assert f.metrics["module_load_fraction"] == pytest.approx(0.9244, abs=FRAC)
    ex = f.evidence["examples"]["module_load"][0]
    assert "cuLibraryLoadData" in ex["api_calls_in_gap"] and "cudnn_generated" in ex["next_op"]
    # torch.profiler does not record driver module loads: the same time is a host gap there.
    t = one(run_all(load("decode", "torch"), only=["gpu_idle"]), "gpu_idle")
    assert t.metrics["host_gap_fraction"] == pytest.approx(0.9472, abs=FRAC)


def test_gpu_idle_attributes_each_gap_to_its_cause():
    names = [f"k{i}" for i in range(8)]
    start = np.array([0, 20, 240, 460, 680, 700, 1200, 1213], dtype=np.int64) * 1000 + 10_000_000
    end = start + 10_000
    t = Trace()
    t.set("kernels", {"start_ns": start, "end_ns": end, "name": names, "demangled_name": names, "stream_id": [7] * 8,
                      "correlation_id": np.arange(8) + 1})
    launch = start - 3_000
    launch[7] = start[6] - 50_000  # k7 queued long before: the 3 us gap before it is GPU-side
    us = 1000
    extra_t0 = start[0]
    api = {
        "start_ns": list(launch) + [extra_t0 + 40 * us, extra_t0 + 255 * us, extra_t0 + 480 * us],
        "end_ns": list(launch + 2_000) + [extra_t0 + 60 * us, extra_t0 + 258 * us, extra_t0 + 500 * us],
        "name": ["cudaLaunchKernel"] * 8 + ["cuLibraryLoadData", "cudaStreamSynchronize", "cudaMemcpyAsync"],
        "correlation_id": list(range(1, 9)) + [-1, -1, 100],
        "thread_id": [1] * 11,
    }
    t.set("api_calls", api)
    t.set("memops", {"start_ns": [extra_t0 + 500 * us], "end_ns": [extra_t0 + 500 * us + 1], "kind": ["memcpy_htod"],
                     "bytes": [4096], "src_kind": ["pageable"], "dst_kind": ["device"], "correlation_id": [100]})
    ctx = runner.contexts(t)[0]
    gaps = gpu_idle.find_gaps(ctx)
    cause, _ = gpu_idle.attribute(ctx, gaps)
    got = [gpu_idle.CAUSES[c] for c in cause]
    # gaps: k0-k1 10us launch-late short, k1-k2 module load, k2-k3 sync, k3-memop pageable, memop-k4 ...
    assert got == ["launch_bound",  # k0 -> k1: 10 us, the launch came late
                   "module_load",  # k1 -> k2: cuLibraryLoadData in the gap
                   "host_sync",  # k2 -> k3: cudaStreamSynchronize
                   "pageable_memcpy",  # k3 -> memcpy: the pageable copy's own call
                   "host_gap",  # memcpy -> k4: 180 us, nothing on the host
                   "launch_bound",  # k4 -> k5
                   "host_gap",  # k5 -> k6: 490 us
                   "gpu_side"]  # k6 -> k7: k7 was queued 50 us before
    f = one(run_all(t, only=["gpu_idle"]), "gpu_idle")
    total = sum(f.metrics[f"{c}_fraction"] for c in gpu_idle.CAUSES)
    assert total == pytest.approx(f.metrics["idle_fraction"], abs=1e-6)


def test_gpu_idle_overlap_is_exact():
    g0 = np.array([0, 10, 50])
    g1 = np.array([10, 40, 60])
    s = np.array([5, 8, 30, 55])
    e = np.array([12, 9, 35, 100])
    assert gpu_idle.overlap(g0, g1, s, e).tolist() == [5, 2 + 5, 5]


# ------------------------------------------------------------------ config and severity
def test_severity_rule_boundaries():
    assert severity_for(0.15) == "high"
    assert severity_for(0.1499) == "medium"
    assert severity_for(0.05) == "medium"
    assert severity_for(0.0499) == "low"
    assert severity_for(0.01) == "low"
    assert severity_for(0.0099) == "info"
    assert severity_for(float("nan")) == "info"
    assert severity_for(0.3, medium=0.2, high=0.4) == "medium"


def test_config_from_toml_and_overrides(tmp_path):
    ceil = tmp_path / "ceil.json"
    ceil.write_text(json.dumps({"device_name": "NVIDIA H100 80GB HBM3", "copy_bandwidth_bytes_per_s": 3.0e12}))
    p = tmp_path / "gpudoctor.toml"
    p.write_text('ceilings_file = "ceil.json"\n'
                 "[analyzers]\ndisable = [\"low_tensor_core\"]\n"
                 "[analyzers.severity]\nmedium_fraction = 0.1\n"
                 "[analyzers.gpu_idle]\nidle_fraction_medium = 0.3\nidle_fraction_high = 0.6\n")
    cfg = load_config(p, ["gpu_idle.idle_fraction_medium=0.2"])
    assert cfg.get("gpu_idle", "idle_fraction_medium") == 0.2  # the override beats the file
    assert cfg.get("gpu_idle", "idle_fraction_high") == 0.6
    assert cfg.get("severity", "medium_fraction") == 0.1
    assert cfg.get("severity", "high_fraction") == 0.15
    assert cfg.sources["gpu_idle.idle_fraction_medium"] == "override"
    assert cfg.sources["gpu_idle.idle_fraction_high"] == str(p)
    assert not cfg.enabled("low_tensor_core")
    assert cfg.ceilings["copy_bandwidth_bytes_per_s"] == 3.0e12
    assert cfg.severity(0.09) == "low" and cfg.severity(0.1) == "medium"
    findings = run_all(load("tiny_fused", "nsys"), cfg)
    assert {f.analyzer for f in findings} == {"gpu_idle"}


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(GpudoctorError, match="unknown key"):
        Config().update({"gpu_idle.idle_fraction_meduim": 0.2})
    with pytest.raises(GpudoctorError, match="unknown analyzer"):
        Config().update(["gpu_idel.idle_fraction_medium=0.2"])
    with pytest.raises(GpudoctorError, match="expected a number"):
        Config().update(["gpu_idle.idle_fraction_medium=lots"])
    with pytest.raises(GpudoctorError, match="ANALYZER.KEY=VALUE"):
        Config().update(["gpu_idle"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[analyzers.gpu_idle\n")
    with pytest.raises(GpudoctorError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(TypeError):
        as_config(42)


@pytest.mark.parametrize("source", SOURCES)
def test_cli_override_changes_severity(source):
    t = load("tiny_fused", source)
    assert one(run_all(t, only=["gpu_idle"]), "gpu_idle").severity == "low"
    f = one(run_all(t, {"gpu_idle.idle_fraction_medium": 0.1}, only=["gpu_idle"]), "gpu_idle")
    assert f.severity == "medium"
    f = one(run_all(load("attn_naive", source), {"unfused_attention.high_fraction": 0.9},
                    only=["unfused_attention"]), "unfused_attention")
    assert f.severity == "medium"


# ------------------------------------------------------------------ registry and context
def test_run_all_every_fixture_and_source_gives_valid_findings():
    for name in ("attn_naive", "attn_sdpa", "mlp_fp32", "mlp_bf16", "decode", "prefill", "tiny_sync", "tiny_fused"):
        for source in SOURCES:
            for f in run_all(load(name, source)):
                assert f.analyzer in ANALYZERS and f.severity in SEVERITIES and f.rank == 0
                assert 0 <= f.estimated_saving_fraction <= 1 and f.estimated_saving_ns >= 0
                assert f.recommendation
                json.dumps(f.to_dict(), allow_nan=False)  # findings are plain JSON


def test_positive_fixtures_fire_only_their_own_analyzer_among_the_four_pairs():
    """Each negative fixture stays below medium for the analyzer it is the negative of."""
    pairs = {"unfused_attention": ("attn_naive", "attn_sdpa"), "low_tensor_core": ("mlp_fp32", "mlp_bf16"),
             "memory_bound_decode": ("decode", "prefill"), "gpu_idle": ("tiny_sync", "tiny_fused")}
    for analyzer, (pos, neg) in pairs.items():
        for source in SOURCES:
            cfg = decode_config(pos) if analyzer == "memory_bound_decode" else None
            assert fires(one(run_all(load(pos, source), cfg, only=[analyzer]), analyzer))
            cfg = decode_config(neg) if analyzer == "memory_bound_decode" else None
            assert not fires(one(run_all(load(neg, source), cfg, only=[analyzer]), analyzer))


def test_run_all_per_rank():
    a = nsys.read(FIX / "nsys" / "attn_naive.nsys.sqlite", rank=0)
    b = nsys.read(FIX / "nsys" / "tiny_sync.nsys.sqlite", rank=1)
    findings = run_all(merge([a, b]))
    by = {(f.rank, f.analyzer): f for f in findings}
    assert by[(0, "unfused_attention")].severity == "high"
    assert by[(1, "gpu_idle")].severity == "high"
    assert (1, "unfused_attention") not in by
    assert by[(1, "gpu_idle")].metrics["idle_fraction"] == pytest.approx(IDLE["nsys"][0], abs=FRAC)
    assert findings == sort_findings(findings)  # THE order: largest saving first
    savings = [f.estimated_saving_ns for f in findings]
    assert savings == sorted(savings, reverse=True)


def test_window_is_found_once_per_rank(monkeypatch):
    """Summaries, contexts, the gate's samples and the cross-rank stragglers all use one window per rank."""
    import gpudoctor.analyzers.context as context_mod
    import gpudoctor.analyzers.stragglers as stragglers_mod
    import gpudoctor.model.summary as summary_mod
    from gpudoctor.pipeline import analyze
    calls = []
    real = runner.find_steps
    counting = lambda *a: calls.append(1) or real(*a)  # noqa: E731
    for mod in (runner, context_mod, summary_mod, stragglers_mod):
        monkeypatch.setattr(mod, "find_steps", counting)
    a = nsys.read(FIX / "nsys" / "attn_naive.nsys.sqlite", rank=0)
    b = nsys.read(FIX / "nsys" / "tiny_sync.nsys.sqlite", rank=1)
    analysis = analyze(merge([a, b]), [], [])
    assert len(calls) == 2 and sorted(analysis.gate_samples) == [0, 1]


def test_analyzer_exceptions_propagate(monkeypatch):
    def broken(ctx):
        raise RuntimeError("analyzer bug")
    import dataclasses
    monkeypatch.setitem(ANALYZERS, "gpu_idle", dataclasses.replace(ANALYZERS["gpu_idle"], analyze=broken))
    with pytest.raises(RuntimeError, match="analyzer bug"):
        run_all(load("tiny_fused", "nsys"))


def test_empty_trace_has_no_findings():
    assert run_all(Trace()) == []


def test_steady_window_excludes_warmup():
    ctx = runner.contexts(load("attn_naive", "nsys"))[0]
    assert len(ctx.window.steady) == 7
    assert ctx.kernels["start_ns"].min() >= ctx.start_ns and ctx.kernels["end_ns"].max() <= ctx.end_ns
    assert ctx.peaks.key == "h100_sxm"


# ------------------------------------------------------------------ device table
@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "h100_sxm"),
    ("NVIDIA H100 PCIe", "h100_pcie"),
    ("NVIDIA H100 NVL", "h100_nvl"),
    ("NVIDIA H200", "h200_sxm"),
    ("NVIDIA H200 NVL", "h200_nvl"),
    ("NVIDIA A100-SXM4-80GB", "a100_80gb"),
    ("NVIDIA A100 80GB PCIe", "a100_80gb_pcie"),
    ("NVIDIA A100-SXM4-40GB", "a100_40gb"),
    ("NVIDIA A100-PCIE-40GB", "a100_40gb"),
    ("NVIDIA L40S", "l40s"),
])
def test_device_lookup(name, key):
    p = devices.lookup(name)
    assert p is not None and p.key == key
    assert p.memory_bandwidth_bytes_per_s > 0 and p.bf16_flops_per_s > p.tf32_flops_per_s > p.fp32_flops_per_s
    assert p.source


def test_device_peaks_and_ceilings():
    h100 = devices.lookup("NVIDIA H100 80GB HBM3")
    assert h100.memory_bandwidth_bytes_per_s == 3.35e12 and h100.bf16_flops_per_s == 989.4e12
    assert h100.fp8_flops_per_s == 1978.9e12
    assert devices.lookup("NVIDIA A100-SXM4-80GB").fp8_flops_per_s != devices.lookup("NVIDIA A100-SXM4-80GB").fp8_flops_per_s
    assert devices.lookup("Tesla T4") is None and devices.lookup("") is None
    measured = json.loads((FIX / "ceilings_h100.json").read_text())
    m = devices.with_ceilings(h100, measured, "NVIDIA H100 80GB HBM3")
    assert m.memory_bandwidth_bytes_per_s == measured["copy_bandwidth_bytes_per_s"]
    assert m.bf16_flops_per_s == measured["bf16_flops_per_s"] and m.fp16_flops_per_s == measured["bf16_flops_per_s"]
    assert m.fp8_flops_per_s == h100.fp8_flops_per_s  # not measured: datasheet stays
    assert "memory_bandwidth_bytes_per_s" in m.measured
    # Ceilings of another GPU are not applied.
    assert devices.with_ceilings(h100, measured, "NVIDIA H200") is h100
    # An unknown GPU: measured ceilings, else the profiler's reported bandwidth.
    assert devices.peaks_for("Tesla T4", {"copy_bandwidth_bytes_per_s": 3e11}).memory_bandwidth_bytes_per_s == 3e11
    assert devices.peaks_for("Tesla T4", None, 3.2e11).memory_bandwidth_bytes_per_s == 3.2e11
    assert devices.peaks_for("Tesla T4") is None


def _walk_reference(c, i, step, max_between, max_gemms):
    """The chain search written as a plain walk: passthrough kernels, then GEMMs (None: no GEMM reached)."""
    j, between = i + step, 0
    while 0 <= j < len(c) and c[j] == unfused_attention.PASS and between < max_between:
        j, between = j + step, between + 1
    if not (0 <= j < len(c)) or c[j] != unfused_attention.GEMM:
        return None
    near, gemms = j, 0
    while 0 <= j < len(c) and c[j] == unfused_attention.GEMM and gemms < max_gemms:
        j, gemms = j + step, gemms + 1
    return near, j - step


def test_chain_candidates_match_a_plain_walk():
    """The run-length candidate search finds exactly the chains a kernel-by-kernel walk finds, on random
    class sequences (every mix of GEMM / passthrough / softmax / fused / other kernels)."""
    rng = np.random.default_rng(7)
    for trial in range(300):
        c = rng.choice([unfused_attention.PASS, unfused_attention.GEMM, unfused_attention.SOFT,
                        unfused_attention.FUSEDK, unfused_attention.STOP], size=int(rng.integers(1, 40)),
                       p=[0.35, 0.3, 0.15, 0.1, 0.1])
        max_between, max_gemms = int(rng.integers(0, 4)), int(rng.integers(1, 4))
        got = unfused_attention._candidates(c, max_between, max_gemms)
        want = []
        for i in np.nonzero(c == unfused_attention.SOFT)[0]:
            back = _walk_reference(c, i, -1, max_between, max_gemms)
            fwd = _walk_reference(c, i, +1, max_between, max_gemms)
            if back and fwd:
                want.append((back[1], fwd[1], i, back[0], fwd[0]))
        assert [tuple(r) for r in got[["lo", "hi", "softmax", "back_gemm", "fwd_gemm"]].to_numpy().tolist()] == want, \
            (trial, c.tolist(), max_between, max_gemms)
