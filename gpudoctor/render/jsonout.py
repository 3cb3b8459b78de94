"""analysis.json: the versioned JSON contract (docs/json-schema.md). Renders what the analysis computed."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from gpudoctor import __version__
from gpudoctor.analyzers.analysis import Analysis
from gpudoctor.gate.samples import gate_block

JSON_SCHEMA_VERSION = "1.0"


def to_json_dict(analysis: Analysis) -> dict[str, Any]:
    """The JSON document as a dict. Findings keep the analysis' order; the ``gate`` block is the gate's
    samples computed during the analysis (null when the analysis was made without them)."""
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "gpudoctor_version": __version__,
        "inputs": analysis.inputs,
        "errors": analysis.errors,
        "ranks": [r.to_dict() for r in analysis.ranks],
        "findings": [f.to_dict() for f in analysis.findings],
        "dropped": analysis.dropped,
        "gate": gate_block(analysis) if analysis.gate_samples is not None else None,
    }


def render(analysis: Analysis) -> str:
    return json.dumps(to_json_dict(analysis), indent=1, default=_default) + "\n"


def _default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
