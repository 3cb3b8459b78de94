"""gpudoctor.annotate: ranges, steps and counters reach NVTX and torch.profiler, and cost nothing without them."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import gpudoctor.annotate as ga

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_nvtx(monkeypatch):
    """A stand-in `nvtx` package that records calls (when torch with CUDA is imported, that binding wins)."""
    calls = []
    mod = types.ModuleType("nvtx")
    mod.push_range = lambda message=None, **kw: calls.append(("push", message))
    mod.pop_range = lambda **kw: calls.append(("pop",))
    handles = iter(range(1, 10**6))

    def start_range(message=None, **kw):
        h = next(handles)
        calls.append(("start", message, h))
        return h

    mod.start_range = start_range
    mod.end_range = lambda h: calls.append(("end", h))
    monkeypatch.setitem(sys.modules, "nvtx", mod)
    monkeypatch.setattr(ga, "_nvtx_impl", None)
    monkeypatch.setattr(ga, "_step_num", 0)
    monkeypatch.setattr(ga, "_step_nvtx", None)
    if ga.nvtx_kind() != "nvtx":
        pytest.skip(f"NVTX goes through {ga.nvtx_kind()} here")
    yield calls
    monkeypatch.setattr(ga, "_nvtx_impl", None)


def test_range_pushes_and_pops(fake_nvtx):
    with ga.range("data"):
        pass

    @ga.range("fwd")
    def fwd(n):
        return fwd(n - 1) if n else "done"

    assert fwd(2) == "done"
    assert fake_nvtx == [("push", "data"), ("pop",)] + [("push", "fwd")] * 3 + [("pop",)] * 3


def test_range_pops_on_exception(fake_nvtx):
    with pytest.raises(KeyError):
        with ga.range("boom"):
            raise KeyError("x")
    assert fake_nvtx == [("push", "boom"), ("pop",)]


def test_step_ranges_are_start_end_and_chained(fake_nvtx):
    ga.step()
    ga.step()
    ga._end_open_step()
    assert fake_nvtx == [("start", "ProfilerStep#1", 1), ("end", 1), ("start", "ProfilerStep#2", 2), ("end", 2)]


def test_counter_is_a_zero_length_range(fake_nvtx):
    ga.kv_cache(used_tokens=12, allocated_tokens=64, block_tokens=16)
    assert fake_nvtx == [("start", "gpudoctor.counter kv_cache used_tokens=12 allocated_tokens=64 block_tokens=16", 1),
                         ("end", 1)]


def test_counter_text_and_parse():
    t = ga.counter_text("kv_cache", used_tokens=3, allocated_tokens=16.0, block_tokens=None, frac=0.25, on=True)
    assert t == "gpudoctor.counter kv_cache used_tokens=3 allocated_tokens=16 frac=0.25 on=1"
    assert ga.parse_counter(t) == ("kv_cache", {"used_tokens": 3.0, "allocated_tokens": 16.0, "frac": 0.25, "on": 1.0})
    name, vals = ga.parse_counter(ga.counter_text("q", depth=float("nan"), big=1e20))
    assert name == "q" and math.isnan(vals["depth"]) and vals["big"] == 1e20
    assert ga.parse_counter("step_3") is None and ga.parse_counter("gpudoctor.counter kv x=abc") is None
    for bad in (lambda: ga.counter_text("bad name", x=1), lambda: ga.counter_text("ok", **{"bad-key": 1})):
        with pytest.raises(ValueError):
            bad()


def test_counter_text_matches_the_readers_grammar():
    ranges_mod = pytest.importorskip("gpudoctor.model.counters_from_ranges")
    t = ga.counter_text("kv_cache", used_tokens=9801, allocated_tokens=49152, block_tokens=1, frac=0.5)
    group, values, device = ranges_mod.parse_counter_text(t)
    assert (group, values, device) == ("kv_cache", {"used_tokens": 9801.0, "allocated_tokens": 49152.0,
                                                    "block_tokens": 1.0, "frac": 0.5}, -1)


def test_under_a_torch_profiler(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    @ga.range("decorated")
    def work():
        return torch.ones(4).sum()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with ga.range("outer"):
                work()
            ga.kv_cache(used_tokens=5, allocated_tokens=8)
            ga.step()
    ga._end_open_step()
    prof.export_chrome_trace(str(tmp_path / "t.json"))
    import json

    names = {e.get("name") for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"]}
    assert {"outer", "decorated", "ProfilerStep#1", "ProfilerStep#2"} <= names
    assert "gpudoctor.counter kv_cache used_tokens=5 allocated_tokens=8" in names


def test_step_calls_the_backend_hook(monkeypatch):
    seen = []
    monkeypatch.setattr(ga, "_backend_step_hook", lambda: seen.append(1))
    ga.step()
    ga.step()
    assert seen == [1, 1]


def test_noop_without_torch_or_nvtx():
    """No torch, no nvtx package: every call works and nothing heavy is imported."""
    code = ("import sys; sys.modules['nvtx'] = None\n"
            "import gpudoctor.annotate as ga\n"
            "with ga.range('a'):\n    ga.step(); ga.kv_cache(used_tokens=1, allocated_tokens=2)\n"
            "@ga.range('f')\ndef f(): return 7\n"
            "assert f() == 7 and ga.nvtx_kind() == 'none'\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules and 'pandas' not in sys.modules\n"
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
