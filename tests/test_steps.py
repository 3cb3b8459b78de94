"""Step detection (gpudoctor/model/steps.py) on real traces: the committed H100 fixtures and the shared
third-party sample. A trace without step markers is made by removing the marker ranges from a real
trace here in the test (the kernels are untouched), so the fallbacks are judged against the real steps."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from gpudoctor.model.steps import MIN_SEQUENCE_KERNELS, find_steps
from gpudoctor.readers import kineto, nsys

ROOT = Path(__file__).resolve().parent.parent
TORCH = ROOT / "fixtures" / "torch"
NSYS = ROOT / "fixtures" / "nsys"
HTA = ROOT / "fixtures" / "hta" / "trace_filter"


@lru_cache(maxsize=None)
def _read(path: str):
    return (nsys if path.endswith(".sqlite") else kineto).read(path)


def _without(ranges, pattern: str):
    """The ranges minus those whose text matches ``pattern`` (the markers being removed)."""
    return ranges[~ranges["text"].astype(str).str.contains(pattern, regex=True)]


def _steady_median_ns(window) -> float:
    return float(np.median(window.steady["duration_ns"]))


# ------------------------------------------------------------------------------------------------ real markers


def test_profiler_steps_win():
    t = _read(str(HTA / "sampled_rank-0.json.gz"))
    w = find_steps(t.ranges, t.kernels)
    assert w.source == "ProfilerStep ranges" and len(w.steps) == 2
    assert w.steps["name"].tolist() == ["ProfilerStep#551", "ProfilerStep#552"]


def test_a_single_profiler_step_is_one_step():
    t = _read(str(HTA / "sampled_rank-0.json.gz"))
    one = _without(t.ranges, r"^ProfilerStep#552$")
    w = find_steps(one, t.kernels)
    assert w.source == "ProfilerStep ranges" and len(w.steps) == 1 and not w.steps["warmup"].any()
    step = t.ranges[t.ranges["text"].astype(str) == "ProfilerStep#551"].iloc[0]
    assert (w.start_ns, w.end_ns) == (step["gpu_start_ns"], step["gpu_end_ns"])
    # the host span is the range's own, which starts before its first kernel does
    assert w.host_span == (step["start_ns"], step["end_ns"]) and w.host_span[0] < w.start_ns


def test_steps_found_without_host_ranges_have_only_the_gpu_span():
    t = _read(str(HTA / "sampled_rank-0.json.gz"))
    w = find_steps(_without(t.ranges, r"^ProfilerStep#"), t.kernels)
    assert not w.source.startswith("ProfilerStep")
    assert w.host_start_ns is None and w.host_span == (w.start_ns, w.end_ns)


@pytest.mark.parametrize("case", ["attn_naive", "mlp_bf16"])
def test_optimizer_steps_when_step_ranges_are_removed(case):
    # positive: torch.optim records Optimizer.step#<Opt>.step by itself; steps end where it ends
    t = _read(str(TORCH / f"{case}.torch.json.gz"))
    real = find_steps(t.ranges, t.kernels)
    w = find_steps(_without(t.ranges, r"^step_\d+$"), t.kernels)
    assert w.source.startswith("optimizer steps ('Optimizer.step#")
    assert len(w.steps) == len(real.steps)
    assert _steady_median_ns(w) == pytest.approx(_steady_median_ns(real), rel=0.02)


def test_two_optimizers_per_step_are_one_step():
    # the shared trace runs Shampoo and then an EMA optimizer in each of its 2 steps
    t = _read(str(HTA / "sampled_rank-0.json.gz"))
    w = find_steps(_without(t.ranges, r"^ProfilerStep#"), t.kernels)
    assert len(w.steps) == 2 and "EMAOptimizer" in w.source
    real = find_steps(t.ranges, t.kernels)
    assert _steady_median_ns(w) == pytest.approx(_steady_median_ns(real), rel=0.05)


def test_optimizer_step_range_is_not_a_step_range():
    # "Optimizer.step#SGD.step" contains "step" but is not a step: its GPU span is the optimizer's alone
    t = _read(str(TORCH / "mlp_bf16.torch.json.gz"))
    w = find_steps(_without(t.ranges, r"^step_\d+$"), t.kernels)
    assert not w.source.startswith("ranges named")


# ------------------------------------------------------------------------------------------------ kernel sequence


@pytest.mark.parametrize("path,marker", [
    (NSYS / "gate_base_b.nsys.sqlite", r"^step_\d+$"),
    (NSYS / "mlp_fp32.nsys.sqlite", r"^step_\d+$"),
    (TORCH / "decode.torch.json.gz", r"^decode_step$"),
])
def test_repeated_kernel_sequence_finds_the_real_steps(path, marker):
    # positive: no markers left (nor optimizer ranges in nsys / decode); the repetition is the step
    t = _read(str(path))
    real = find_steps(t.ranges, t.kernels)
    w = find_steps(_without(t.ranges, marker), t.kernels)
    assert w.source.startswith("repeated kernel sequence (")
    # one fewer at most: steps are cut at the longest idle gap, so when that gap sits a few kernels into
    # the real step (decode), the last real step is incomplete and left outside
    assert len(real.steps) - 1 <= len(w.steps) <= len(real.steps)
    # the same period: steps start as far apart as the real ones (a sequence's boundary is the longest
    # idle gap, which can sit inside a real step, so durations may differ; the spacing may not)
    spacing = lambda win: float(np.median(np.diff(win.steps["gpu_start_ns"].to_numpy()[1:])))  # noqa: E731
    assert spacing(w) == pytest.approx(spacing(real), rel=0.05)


@pytest.mark.parametrize("path,marker", [
    (HTA / "sampled_rank-0.json.gz", r"^ProfilerStep#|^Optimizer\."),  # 2 steps that do not repeat exactly
    (TORCH / "tiny_sync.torch.json.gz", r"^step_\d+$"),  # 5 elementwise kernels, one short name
    (NSYS / "kv_static.nsys.sqlite", r"^step_\d+$"),  # requests of random length
])
def test_no_steps_found_uses_the_whole_trace(path, marker):
    # negative: the old fallback took any repeated short name as a step; now: no steps, whole span, reason
    t = _read(str(path))
    w = find_steps(_without(t.ranges, marker), t.kernels)
    assert len(w.steps) == 0
    assert w.source.startswith("no steps found: no step markers")
    assert (w.start_ns, w.end_ns) == (t.kernels["start_ns"].min(), t.kernels["end_ns"].max())
    assert "whole trace (no steps found" in w.describe()


def test_short_names_are_not_identities():
    # tiny_sync's 5 kernels per iteration all have the short name vectorized_elementwise_kernel; by short
    # name a 1-kernel sequence would repeat 2560 times, by full identity the sequence is 5 kernels long
    t = _read(str(TORCH / "tiny_sync.torch.json.gz"))
    assert t.kernels["name"].astype(str).nunique() < t.kernels["demangled_name"].astype(str).nunique()
    assert 5 < MIN_SEQUENCE_KERNELS


def test_no_gpu_work():
    t = _read(str(TORCH / "tiny_sync.torch.json.gz"))
    w = find_steps(t.ranges.iloc[:0], t.kernels.iloc[:0])
    assert w.source == "no GPU work" and w.duration_ns == 0


def test_reason_reaches_the_json(tmp_path):
    # tiny_sync rewritten without its step_N ranges (every other event as recorded): the JSON says why
    doc = json.loads(gzip.decompress((TORCH / "tiny_sync.torch.json.gz").read_bytes()))
    doc["traceEvents"] = [e for e in doc["traceEvents"] if not re.fullmatch(r"step_\d+", str(e.get("name")))]
    src = tmp_path / "tiny_sync_no_steps.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "a.json"
    r = subprocess.run([sys.executable, "-m", "gpudoctor", "analyze", str(src), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rank = json.loads(out.read_text())["ranks"][0]
    assert rank["window_source"].startswith("whole trace (no steps found: no step markers, and no sequence")
    assert rank["steps"]["count"] == 0
    t = _read(str(TORCH / "tiny_sync.torch.json.gz"))
    assert rank["window_duration_ns"] == t.kernels["end_ns"].max() - t.kernels["start_ns"].min()
