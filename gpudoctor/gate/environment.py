"""The environment of a run (GPU model, driver, software versions) and whether two runs' environments allow
a fair comparison."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from gpudoctor.collect.manifest import read_manifest
from gpudoctor.errors import InputError
from gpudoctor.gate.run import RunData
from gpudoctor.model.trace import Trace


def environment(trace: Trace) -> dict:
    """GPU model(s), GPU count, driver and software versions: what must match for a fair comparison."""
    dev = trace.devices
    used = dev
    if len(dev) and len(trace.kernels):
        pairs = set(zip(trace.kernels["rank"].tolist(), trace.kernels["device_id"].tolist()))
        sel = [(r, d) in pairs for r, d in zip(dev["rank"].tolist(), dev["device_id"].tolist())]
        if any(sel):
            used = dev[sel]
    env: dict = {"gpus": sorted(set(used["name"].astype(str))) if len(used) else [], "gpu_count": int(len(used))}
    cc = sorted(set(x for x in used["compute_capability"].astype(str) if x)) if len(used) else []
    if cc:
        env["compute_capability"] = cc
    meta = trace.meta or {}
    tp = meta.get("torch_profiler") or {}
    for key, sources in {
        "driver_version": [meta.get("driver_version"), meta.get("nv_driver_version")],
        "cuda_driver_version": [meta.get("cuda_driver_version"), tp.get("cuda_driver_version")],
        "cuda_runtime_version": [meta.get("cuda_runtime_version"), meta.get("cuda_version"), tp.get("cuda_runtime_version")],
        "torch_version": [meta.get("torch_version")],
        "cudnn_version": [meta.get("cudnn_version")],
        "nccl_version": [meta.get("nccl_version")],
    }.items():
        v = next((s for s in sources if s not in (None, "")), None)
        if v is not None:
            env[key] = _version_text(v)
    if isinstance(meta.get("gpu_state"), dict):  # recorded by gpudoctor profile (gpudoctor.collect.gpustate)
        env["gpu_state"] = meta["gpu_state"]
    if "driver_version" not in env or "cuda_driver_version" not in env:
        for inp in meta.get("inputs") or []:
            if inp.get("format") == "nsys_sqlite" and inp.get("path"):
                for k2, v2 in _nsys_env(inp["path"]).items():
                    env.setdefault(k2, v2)
                break
    return env


def _cudnn_text(v: object) -> str:
    """cuDNN's integer version: 91900 = 9.19.0 (cuDNN 9+), 8902 = 8.9.2 (cuDNN 8)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = int(v)
        if v >= 10000:
            return f"{v // 10000}.{(v % 10000) // 100}.{v % 100}"
        return f"{v // 1000}.{(v % 1000) // 100}.{v % 100}"
    return str(v)


def manifest_env(run_dir: Path) -> dict:
    """Driver and software versions a run directory's manifest.json records (gpudoctor profile)."""
    try:
        m = read_manifest(run_dir)
    except InputError:
        return {}
    v = m.get("versions") if isinstance(m.get("versions"), dict) else {}
    out = {}
    for key, val in (("driver_version", m.get("driver_version")), ("cuda_driver_version", m.get("cuda_driver_version")),
                     ("torch_version", v.get("torch")), ("cuda_runtime_version", v.get("torch_cuda")),
                     ("nccl_version", v.get("nccl_version") or v.get("nccl"))):
        if val not in (None, ""):
            out[key] = _version_text(val)
    cudnn = v.get("cudnn_version") or v.get("cudnn")
    if cudnn not in (None, ""):
        out["cudnn_version"] = _cudnn_text(cudnn)
    if isinstance(m.get("gpu_state"), dict):
        out["gpu_state"] = m["gpu_state"]
    return out


def _version_text(v: object) -> str:
    """CUDA writes versions as 13000 (13.0) or 12040 (12.4); strings pass through."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1000:
        v = int(v)
        return f"{v // 1000}.{(v % 1000) // 10}"
    return str(v)


def _nsys_env(path: str) -> dict:
    """Driver and CUDA driver version from an Nsight Systems export (TARGET_INFO_SYSTEM_ENV)."""
    try:
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    except sqlite3.Error:
        return {}
    try:
        rows = dict(conn.execute("SELECT name, value FROM TARGET_INFO_SYSTEM_ENV WHERE name IN "
                                 "('NvDriverVersion', 'CudaDriverVersion')").fetchall())
    except sqlite3.Error:
        return {}
    finally:
        conn.close()
    out = {}
    if rows.get("NvDriverVersion"):
        out["driver_version"] = str(rows["NvDriverVersion"])
    if rows.get("CudaDriverVersion"):
        try:
            out["cuda_driver_version"] = _version_text(int(rows["CudaDriverVersion"]))
        except ValueError:
            out["cuda_driver_version"] = str(rows["CudaDriverVersion"])
    return out



# -- environment check ------------------------------------------------------------------------------------

# key -> (what it is called, how much of the version must match: None = all of it, n = first n parts)
ENV_KEYS = {
    "gpus": ("GPU model", None),
    "gpu_count": ("GPU count", None),
    "driver_version": ("NVIDIA driver", None),
    "cuda_driver_version": ("CUDA (driver API) major version", 1),
    "cuda_runtime_version": ("CUDA runtime major version", 1),
    "torch_version": ("PyTorch major.minor version", 2),
    "cudnn_version": ("cuDNN major version", 1),
    "nccl_version": ("NCCL major.minor version", 2),
}


def _major(v: object, parts: int | None) -> object:
    if parts is None or not isinstance(v, str):
        return v
    nums = re.split(r"[.+\-]", v)
    return ".".join(nums[:parts])


def env_differences(a: RunData, b: RunData) -> tuple[list[str], list[str]]:
    """(differences that make a comparison unfair, minor differences worth a note)."""
    hard, soft = [], []
    for key, (what, parts) in ENV_KEYS.items():
        va, vb = a.env.get(key), b.env.get(key)
        if va in (None, "", []) or vb in (None, "", []):
            continue
        if _major(va, parts) != _major(vb, parts):
            fa = ", ".join(va) if isinstance(va, list) else va
            fb = ", ".join(vb) if isinstance(vb, list) else vb
            hard.append(f"{what}: {fa} ({a.label}) vs {fb} ({b.label})")
        elif va != vb:
            soft.append(f"{key}: {va} ({a.label}) vs {vb} ({b.label})")
    return hard, soft


def check_environment(baselines: list[RunData], candidates: list[RunData]) -> tuple[list[str], list[str]]:
    ref = baselines[0]
    hard, soft = [], []
    for r in baselines[1:] + candidates:
        h, s = env_differences(ref, r)
        hard += h
        soft += s
    return hard, soft
