"""Analyzers: pure functions of the trace model that return Findings. They never plot or read files."""

from gpudoctor.analyzers.findings import SEVERITIES, Finding  # noqa: F401
