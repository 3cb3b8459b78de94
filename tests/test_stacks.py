"""Call stacks: the readers fill frames / stacks / host_stacks, and gpu_idle names the culprit line.

The culprit loops (fixtures/workloads/culprits.py) were recorded on an H200 with and without their
culprit line (fixtures/stacks/timings.jsonl): what the culprit costs per step is the difference of the
two mean step times, and the frame gpu_idle names must be the culprit's and be charged that cost +-20%.
"""

from __future__ import annotations

import ast
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from gpudoctor.analyzers.registry import run_all
from gpudoctor.model.stacks import is_library_file, stack_frames
from gpudoctor.readers import kineto
from gpudoctor.render.jsonout import to_json  # noqa: F401  (the JSON output carries the frames)
from gpudoctor.store import rundb

ROOT = Path(__file__).resolve().parent.parent
STACKS = ROOT / "fixtures" / "stacks"
CULPRITS = ROOT / "fixtures" / "workloads" / "culprits.py"


def culprit_line(case: str) -> int:
    for i, text in enumerate(CULPRITS.read_text().splitlines(), 1):
        if text.rstrip().endswith(f"# culprit: {case}"):
            return i
    raise AssertionError(case)


def enclosing_function(line: int) -> tuple[str, int]:
    """(name, first line) of the innermost function of culprits.py that holds ``line``."""
    best = None
    for node in ast.walk(ast.parse(CULPRITS.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno <= line <= node.end_lineno:
            if best is None or node.lineno > best.lineno:
                best = node
    return best.name, best.lineno


def culprit_cost_ms(case: str) -> float:
    rows = [json.loads(x) for x in (STACKS / "timings.jsonl").read_text().splitlines() if x.strip()]
    with_c = [r["mean_step_ms"] for r in rows if r["case"] == case and not r["fixed"]]
    without = [r["mean_step_ms"] for r in rows if r["case"] == case and r["fixed"]]
    return statistics.mean(with_c) - statistics.mean(without)


def idle_finding(trace):
    (f,) = run_all(trace, only=["gpu_idle"])
    return f
