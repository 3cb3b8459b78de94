"""Where Nsight Systems (``nsys``) and Nsight Compute (``ncu``) are installed: the profile command runs them,
the readers use them to export ``.nsys-rep`` / ``.ncu-rep`` reports.

``find_nsys()``, first hit wins: ``nsys`` on PATH; ``$GPUDOCTOR_NSYS`` (the executable or its folder);
the standard install folders (``/opt/nvidia/nsight-systems/*/bin/nsys``, ``/usr/local/cuda*/bin/nsys``,
newest version first); the copy inside Nsight Compute. ``find_ncu()``: ``$NCU``, PATH, the Nsight Compute
and CUDA toolkit folders (newest version).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

ENV_VAR = "GPUDOCTOR_NSYS"
STANDARD_GLOBS = [
    "/opt/nvidia/nsight-systems/*/bin/nsys",
    "/usr/local/cuda/bin/nsys",
    "/usr/local/cuda-*/bin/nsys",
]
NCU_COPY_GLOBS = [
    "/opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys",
]


class NsysLocation(NamedTuple):
    path: str
    how: str  # "PATH" | "$GPUDOCTOR_NSYS" | "standard folder" | "Nsight Compute copy"


def _version_key(path: str) -> tuple:
    """Sort key: the version numbers in the path (2025.3.1 -> (2025, 3, 1)), newest first when reversed."""
    nums = re.findall(r"\d+(?:\.\d+)*", path)
    best = max((tuple(int(x) for x in n.split(".")) for n in nums), default=())
    return best, path


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _globbed(patterns: list[str]) -> list[str]:
    found = []
    for pattern in patterns:
        hits = [p for p in glob.glob(pattern) if _executable(p)]
        found.extend(sorted(hits, key=_version_key, reverse=True))
    return found


def find_nsys(env: dict | None = None) -> NsysLocation | None:
    """Where nsys is and how it was found, or None."""
    env = os.environ if env is None else env
    on_path = shutil.which("nsys", path=env.get("PATH", os.defpath))
    if on_path:
        return NsysLocation(on_path, "PATH")
    explicit = env.get(ENV_VAR, "").strip()
    if explicit:
        if _executable(explicit):
            return NsysLocation(explicit, f"${ENV_VAR}")
        if os.path.isdir(explicit) and _executable(os.path.join(explicit, "nsys")):
            return NsysLocation(os.path.join(explicit, "nsys"), f"${ENV_VAR}")
    for path in _globbed(STANDARD_GLOBS):
        return NsysLocation(path, "standard folder")
    for path in _globbed(NCU_COPY_GLOBS):
        return NsysLocation(path, "Nsight Compute copy")
    return None


def not_found_message(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    bad = env.get(ENV_VAR, "").strip()
    extra = f" (${ENV_VAR}={bad} is not an executable)" if bad and not _executable(bad) else ""
    return ("Nsight Systems (nsys) not found on PATH, in $GPUDOCTOR_NSYS, in /opt/nvidia/nsight-systems, "
            f"/usr/local/cuda*/bin or inside Nsight Compute{extra}")


def find_ncu() -> str | None:
    """Path of Nsight Compute's ``ncu``: $NCU, PATH, /opt/nvidia/nsight-compute/*/ncu, CUDA toolkits."""
    env = os.environ.get("NCU")
    if env and Path(env).is_file() and os.access(env, os.X_OK):
        return env
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda/bin/ncu", "/usr/local/cuda-*/bin/ncu",
                    "/usr/local/NVIDIA-Nsight-Compute*/ncu"):
        hits = [h for h in glob.glob(pattern) if os.access(h, os.X_OK)]
        if hits:
            return sorted(hits, key=_version_key)[-1]
    return None
