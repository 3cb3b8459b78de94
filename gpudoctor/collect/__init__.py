"""Collectors: run programs under profilers (nsys, torch.profiler, NVML, Nsight Compute) and measure the GPU.

``gpudoctor profile`` (gpudoctor/cli/profile.py) drives them; the run directory it writes is described in
``gpudoctor.collect.rundir``.
"""
