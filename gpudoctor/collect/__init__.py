"""Collectors: run programs under profilers (nsys, torch.profiler, NVML, Nsight Compute) and measure the GPU.

``gpudoctor profile`` (gpudoctor/cli/profile.py: options and analysis) drives them through
``gpudoctor.collect.session``; the run directory it writes is ``gpudoctor.collect.rundir`` and its manifest
``gpudoctor.collect.manifest``.
"""
