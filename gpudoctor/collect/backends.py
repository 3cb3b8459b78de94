"""Which backend profiles the program (nsys, torch.profiler, NVML only), checked before anything runs, and
the NVML-only run. The nsys and torch runs: gpudoctor/collect/run_nsys.py and run_torch.py."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gpudoctor.collect.manifest import Result
from gpudoctor.collect.supervise import Supervisor, exit_code_of, say, signame
from gpudoctor.errors import GpudoctorError

if TYPE_CHECKING:
    from gpudoctor.collect.session import Session

BACKENDS = ("auto", "nsys", "torch", "nvml")


def choose(s: Session) -> tuple[str, str, dict]:
    """(backend, why, facts) after checking that it can work; raises GpudoctorError otherwise."""
    a = s.options
    if a.backend == "nsys":
        return "nsys", "asked for", nsys_usable(s, strict=True)
    if a.backend == "torch":
        return "torch", "asked for", torch_usable(s, strict=True)
    if a.backend == "nvml":
        return "nvml", "asked for", nvml_usable(s, strict=True)
    # auto
    try:
        facts = nsys_usable(s, strict=False)
        return "nsys", f"{facts['version']}, found on {facts['found_by']}: {facts['path']}", facts
    except GpudoctorError as e:
        why_not_nsys = str(e)
    if a.capture_range:
        raise GpudoctorError(f"--capture-range needs Nsight Systems: {why_not_nsys}")
    try:
        facts = torch_usable(s, strict=False)
        return "torch", f"{why_not_nsys}; the program is Python with torch: torch.profiler in its process", facts
    except GpudoctorError as e:
        why_not_torch = str(e)
    if not a.no_nvml:
        try:
            facts = nvml_usable(s, strict=False)
            return "nvml", (f"{why_not_nsys}; {why_not_torch}: only NVML samples (GPU utilization, memory, "
                            "power, clocks) will be collected"), facts
        except GpudoctorError as e:
            why_not_nvml = str(e)
    else:
        why_not_nvml = "--no-nvml"
    raise GpudoctorError(f"nothing can profile this program here: {why_not_nsys}; {why_not_torch}; "
                         f"NVML: {why_not_nvml}")


def nsys_usable(s: Session, strict: bool) -> dict:
    from gpudoctor.collect import locate, nsys

    loc = locate.find_nsys(s.env)
    if loc is None:
        raise GpudoctorError(locate.not_found_message(s.env))
    version = nsys.nsys_version(loc.path, timeout=30 if strict else 20)
    facts = {"path": loc.path, "found_by": loc.how, "version": version}
    problem = nsys.importer_problem(loc.path)
    if problem:
        if not strict:
            raise GpudoctorError(f"nsys at {loc.path} cannot write reports: {problem}")
        say(f"warning: nsys at {loc.path}: {problem}; it may leave only a .qdstrm")
        facts["importer_problem"] = problem
    return facts


def torch_usable(s: Session, strict: bool) -> dict:
    from gpudoctor.collect import torch_backend as tb

    try:
        prog = tb.parse_python_command(s.cmd)
    except tb.NotPython as e:
        raise GpudoctorError(
            f"the torch backend runs a Python program in its own process, and {e} "
            "(give the python command itself, e.g. -- python train.py; for several GPUs use --nproc N or "
            "torchrun --nproc_per_node=N --no-python gpudoctor profile -- python train.py)") from None
    exe = tb.resolve_interpreter(prog, s.env)
    if exe is None:
        raise GpudoctorError(f"{prog.interpreter}: command not found", 127)
    if prog.mode == "script" and not os.path.exists(prog.target):
        raise GpudoctorError(f"{prog.interpreter}: can't open file {prog.target!r}: no such file", 2)
    probe = tb.probe_interpreter(exe, s.env)
    if not probe.get("torch"):
        raise GpudoctorError(f"torch is not installed for {exe}" + (f" ({probe['error']})" if probe.get("error") else ""))
    return {"program": prog, "interpreter": exe, "probe": probe}


def nvml_usable(s: Session, strict: bool) -> dict:
    from gpudoctor.collect import nvml

    info = nvml.device_info(s.env)
    if "error" in info:
        raise GpudoctorError(f"the nvml backend needs NVML: {info['error']}" if strict else info["error"])
    if not info.get("gpus"):
        raise GpudoctorError("NVML sees no GPU visible to the program")
    return {"nvml": info}


def run_plain(s: Session) -> Result:
    """nvml backend: the program itself, NVML sampled beside it (by the session)."""
    res = Result()
    sup = Supervisor(s.cmd, s.env, group=True)
    rc, res.program_start_ns, res.program_end_ns = sup.run()
    res.exit_code, res.signal = exit_code_of(rc)
    res.interrupted_by = signame(sup.interrupted_by)
    return res
