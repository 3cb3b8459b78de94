"""Named baselines kept in a directory, keyed by name and hardware (GPU model).

``DIR/<gpu-model-slug>/<NAME>.json`` holds the gate data of one or more runs (RunData, a few KB each, not the
traces) and, with two or more runs, the calibrated tolerance of each metric. ``--baseline @NAME`` picks the
file for the candidate's GPU model, so one name (``main``) can hold a baseline per machine type.

DIR: ``--dir`` / ``--baseline-dir``, else $GPUDOCTOR_BASELINE_DIR, else ``.gpudoctor/baselines``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from gpudoctor.errors import GpudoctorError
from gpudoctor.gate import stats
from gpudoctor.gate.environment import check_environment
from gpudoctor.gate.run import METRICS, RunData

FORMAT = "gpudoctor-baseline"
VERSION = 1
DEFAULT_DIR = ".gpudoctor/baselines"
ENV_VAR = "GPUDOCTOR_BASELINE_DIR"
MIN_CALIBRATION_RUNS = 3  # a calibrated tolerance is applied from this many runs on
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def baseline_dir(directory: str | Path | None = None) -> Path:
    return Path(directory or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def hardware_key(gpu_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", (gpu_name or "").lower()).strip("-")
    return slug or "unknown-gpu"


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise GpudoctorError(f"baseline name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)")
    return name


def calibration(runs: list[RunData], metrics: list[str] | None = None) -> dict:
    """Per metric: the run-to-run spread of medians and the tolerance it suggests (stats.calibrate)."""
    names = metrics or sorted({k for r in runs for k in r.samples})
    out = {}
    for m in names:
        medians = [float(np.median(r.samples[m])) for r in runs if r.samples.get(m)]
        if not medians:
            continue
        spec = METRICS.get(m)
        if spec is not None and spec.per == "rank" and len(medians) < 2:
            continue
        out[m] = stats.calibrate(medians)
    return out


def save(name: str, runs: list[RunData], directory: str | Path | None = None, allow_mismatch: bool = False) -> Path:
    from gpudoctor import __version__
    from gpudoctor.store.atomic import atomic_write_text

    check_name(name)
    if not runs:
        raise GpudoctorError("baseline save needs at least one run")
    hard, _ = check_environment(runs[:1], runs[1:])
    if hard and not allow_mismatch:
        raise GpudoctorError("runs of one baseline must come from the same environment: " + "; ".join(hard))
    gpu = runs[0].gpu_name
    doc = {
        "format": FORMAT, "version": VERSION, "name": name, "hardware": gpu, "hardware_key": hardware_key(gpu),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gpudoctor_version": __version__,
        "runs": [r.to_dict(findings=True) for r in runs],
        "calibration": calibration(runs) if len(runs) >= 2 else {},
    }
    path = baseline_dir(directory) / hardware_key(gpu) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return path


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GpudoctorError(f"{path}: unreadable baseline: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise GpudoctorError(f"{path}: not a gpudoctor baseline")
    if int(doc.get("version", 0)) > VERSION:
        raise GpudoctorError(f"{path}: baseline format {doc.get('version')} is newer than this gpudoctor reads")
    return doc


def scan(directory: str | Path | None = None) -> tuple[list[tuple[Path, dict]], list[str]]:
    """(readable baselines, one line per unreadable file): one bad file never hides the others."""
    root = baseline_dir(directory)
    if not root.is_dir():
        return [], []
    out, bad = [], []
    for p in sorted(root.glob("*/*.json")):
        try:
            doc = _read(p)
            summary(p, doc)  # checks the structure the listing needs
            out.append((p, doc))
        except GpudoctorError as e:
            bad.append(str(e))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            bad.append(f"{p}: malformed baseline: {e}")
    return out, bad


def load(name: str, gpu_name: str, directory: str | Path | None = None) -> tuple[list[RunData], dict, Path]:
    """The runs of baseline NAME for this GPU model."""
    check_name(name)
    root = baseline_dir(directory)
    path = root / hardware_key(gpu_name) / f"{name}.json"
    if not path.exists():
        other = [d.get("hardware") or p.parent.name for p, d in scan(directory)[0] if d.get("name") == name]
        if other:
            raise GpudoctorError(f"baseline {name!r} exists for {', '.join(sorted(set(other)))} but not for "
                                 f"{gpu_name or 'this GPU'}; save one on this hardware: gpudoctor baseline save {name} RUN")
        raise GpudoctorError(f"no baseline {name!r} in {root} (save one: gpudoctor baseline save {name} RUN)")
    doc = _read(path)
    items = doc.get("runs") or []
    if not isinstance(items, list):
        raise GpudoctorError(f"{path}: malformed baseline: runs is not a list")
    try:
        runs = [RunData.from_dict(r, label=f"@{name}#{i + 1}" if len(items) > 1 else f"@{name}")
                for i, r in enumerate(items)]
    except ValueError as e:
        raise GpudoctorError(f"{path}: malformed baseline: {e}") from None
    if not runs:
        raise GpudoctorError(f"{path}: baseline holds no runs")
    return runs, doc, path


def calibrated_tolerances(doc: dict) -> dict[str, float]:
    """Tolerances a baseline of at least MIN_CALIBRATION_RUNS runs supplies, per metric."""
    if len(doc.get("runs") or []) < MIN_CALIBRATION_RUNS:
        return {}
    return {m: float(c["tolerance"]) for m, c in (doc.get("calibration") or {}).items() if c.get("tolerance")}


def summary(path: Path, doc: dict) -> dict:
    runs = doc.get("runs") or []
    gpu = [float(np.median(r["samples"]["gpu_time"])) for r in runs if (r.get("samples") or {}).get("gpu_time")]
    return {
        "name": doc.get("name"), "hardware": doc.get("hardware"), "path": str(path), "saved_at": doc.get("saved_at"),
        "runs": len(runs), "steps": sum(int(r.get("steps", 0)) for r in runs),
        "sources": [r.get("label") for r in runs],
        "median_gpu_time_ns": float(np.median(gpu)) if gpu else None,
        "calibrated_tolerances": calibrated_tolerances(doc),
        "env": (runs[0].get("env") if runs else {}),
    }
