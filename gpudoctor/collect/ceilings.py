"""Measure the real ceilings of the current GPU: copy bandwidth and dense bf16 matrix rate.

Datasheet peaks are leads; the roofline uses what this GPU actually reaches. Timed with CUDA events,
on random data (zeros run faster than real data), median of repeated runs after warm-up.
"""

from __future__ import annotations

import statistics

from gpudoctor.errors import GpudoctorError, require


def _median_ms(torch, fn, repeat: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measure_ceilings(copy_bytes: int = 2 << 30, gemm_n: int = 8192, device: int = 0) -> dict:
    """Return {device_name, copy_bandwidth_bytes_per_s, bf16_flops_per_s, fp32_flops_per_s, tf32_flops_per_s, method}."""
    torch = require("torch", "torch")
    if not torch.cuda.is_available():
        raise GpudoctorError("no CUDA GPU visible: ceilings are measured on the GPU they describe")
    torch.cuda.set_device(device)
    src = torch.randn(copy_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _median_ms(torch, lambda: dst.copy_(src))
    # A copy reads and writes every byte: count both, as bandwidth datasheets do.
    copy_bw = 2 * copy_bytes / (copy_ms * 1e-3)
    src = dst = None  # free the copy buffers before the matrix products
    out = {"device_name": torch.cuda.get_device_name(device), "copy_bandwidth_bytes_per_s": copy_bw}
    n = gemm_n
    for key, dtype, tf32 in (("bf16_flops_per_s", torch.bfloat16, False), ("tf32_flops_per_s", torch.float32, True),
                             ("fp32_flops_per_s", torch.float32, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        m = n if key == "bf16_flops_per_s" else n // 2  # fp32 SIMT is slow: a smaller product still fills the GPU
        a = torch.randn(m, m, device="cuda", dtype=dtype)
        b = torch.randn(m, m, device="cuda", dtype=dtype)
        ms = _median_ms(torch, lambda: a @ b, repeat=10)
        out[key] = 2 * m * m * m / (ms * 1e-3)
        a = b = None
    torch.backends.cuda.matmul.allow_tf32 = False
    out["method"] = (f"median of CUDA-event-timed runs after warm-up: device-to-device copy of {copy_bytes} B "
                     f"(read+write counted); {n}^3 bf16 and {n // 2}^3 fp32/tf32 matrix products on random data")
    out["torch_version"] = torch.__version__
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(measure_ceilings(), indent=1))
