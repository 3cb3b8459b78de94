"""analysis.json: the versioned JSON contract (docs/json-schema.md)."""

from __future__ import annotations

import json


def render(analysis) -> str:
    return json.dumps(analysis.to_json_dict(), indent=1, default=_default) + "\n"


def _default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
