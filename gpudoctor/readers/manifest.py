"""A run directory's manifest.json, read within the limits and checked for the shape the readers use."""

from __future__ import annotations

from pathlib import Path

from gpudoctor.errors import InputError
from gpudoctor.readers.limits import read_json_file

MAX_RANK = 1 << 24


def read_manifest(run_dir: Path) -> dict:
    """The manifest as a dict whose ``reports`` is a list of {"path": str, "rank": int | None} and whose
    ``gpus`` is a list of dicts; a one-line InputError naming manifest.json otherwise."""
    path = Path(run_dir) / "manifest.json"
    try:
        doc = read_json_file(path, "a run manifest")
    except InputError as e:
        raise InputError(path, f"unreadable manifest: {e.problem}") from None
    if not isinstance(doc, dict):
        raise InputError(path, f"unreadable manifest: a JSON {type(doc).__name__}, expected an object")
    reports = doc.get("reports", [])
    if not isinstance(reports, list):
        raise InputError(path, f"unreadable manifest: reports is a {type(reports).__name__}, expected a list")
    for i, rep in enumerate(reports):
        if not isinstance(rep, dict) or not isinstance(rep.get("path"), str) or not rep["path"]:
            raise InputError(path, f"unreadable manifest: reports[{i}] has no path")
        rank = rep.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < MAX_RANK):
            raise InputError(path, f"unreadable manifest: reports[{i}].rank is {str(rank)[:40]!r}, "
                                   "expected a rank number")
    gpus = doc.get("gpus")
    if gpus is not None and not isinstance(gpus, list):
        raise InputError(path, f"unreadable manifest: gpus is a {type(gpus).__name__}, expected a list")
    for i, g in enumerate(gpus or []):
        for key in ("device_id", "memory_bytes", "max_sm_clock_mhz"):
            v = g.get(key) if isinstance(g, dict) else None
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 2**62):
                raise InputError(path, f"unreadable manifest: gpus[{i}].{key} is {str(v)[:40]!r}, expected a number")
    return doc
