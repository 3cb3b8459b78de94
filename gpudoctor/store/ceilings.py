"""Where `gpudoctor ceilings` keeps the ceilings it measured, one JSON per GPU model."""

from __future__ import annotations

import json
import os
from pathlib import Path


def ceilings_dir() -> Path:
    base = os.environ.get("GPUDOCTOR_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "gpudoctor")
    return Path(base) / "ceilings"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def stored_ceilings(device_name: str) -> dict | None:
    """Ceilings measured earlier on a GPU of this name, or None."""
    if not device_name:
        return None
    p = ceilings_dir() / (slug(device_name) + ".json")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
