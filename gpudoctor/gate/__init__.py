"""The CI gate: compare a candidate run against a baseline and decide pass / regression / improvement /
inconclusive, with the change attributed to kernels, categories and NVTX ranges. docs/ci.md describes the
method and its defaults."""

from gpudoctor.gate.compare import GateOptions, GateResult, compare
from gpudoctor.gate.inputs import load_run
from gpudoctor.gate.rules import evaluate_rules
from gpudoctor.gate.run import RunData

__all__ = ["GateOptions", "GateResult", "RunData", "compare", "evaluate_rules", "load_run"]
