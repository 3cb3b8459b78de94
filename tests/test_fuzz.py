"""Property tests: random truncations and byte flips of a real fixture give a Trace or a GpudoctorError
(one line, naming the file) from every reader, never another exception.

Short by default: GPUDOCTOR_FUZZ_EXAMPLES examples per reader and damage kind (default 15), the same
examples on every run (derandomized: a red run is reproducible, CI never flakes). The long local run
explores new examples:

    GPUDOCTOR_FUZZ_RANDOM=1 GPUDOCTOR_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py

A crash found that way becomes a fixed case in REGRESSIONS below (and in tests/test_bad_inputs.py).
"""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpudoctor.errors import GpudoctorError
from gpudoctor.model.trace import Trace
from gpudoctor.readers.inputs import read_input

ROOT = Path(__file__).resolve().parent.parent
FX = ROOT / "fixtures"
DATA = ROOT / "tests" / "data"
EXAMPLES = int(os.environ.get("GPUDOCTOR_FUZZ_EXAMPLES", "15"))

# reader -> (file name to write, the real bytes to damage). Kineto is fuzzed uncompressed (a flip inside
# gzip is just a gzip error) and once compressed (truncation only).
_SOURCES = {
    "nsys": ("f.nsys.sqlite", lambda: (FX / "nsys" / "kv_static.nsys.sqlite").read_bytes()),
    "kineto": ("f.json", lambda: gzip.decompress((FX / "torch" / "tiny_fused.torch.json.gz").read_bytes())),
    "kineto_gz": ("f.json.gz", lambda: (FX / "torch" / "tiny_fused.torch.json.gz").read_bytes()),
    "ncu_raw": ("f.csv", lambda: (FX / "ncu" / "ncu_kernels.raw.csv").read_bytes()),
    "ncu_details": ("d.csv", lambda: (FX / "ncu" / "ncu_kernels.details.csv").read_bytes()),
    "nccl_tests": ("f.log", lambda: (DATA / "nccl_tests_all_reduce_handmade.log").read_bytes()),
    "snapshot": ("f.pickle", lambda: (FX / "kv" / "kv_static.snapshot.pickle").read_bytes()),
    "prometheus": ("f.prom", lambda: (DATA / "vllm_metrics_handmade.prom").read_bytes()),
}
_CACHE: dict[str, bytes] = {}


def _source(name: str) -> bytes:
    if name not in _CACHE:
        _CACHE[name] = _SOURCES[name][1]()
    return _CACHE[name]


def _check(name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / _SOURCES[name][0]
        path.write_bytes(data)
        try:
            t = read_input(path)
        except GpudoctorError as e:
            msg = str(e)
            assert "\n" not in msg, msg
            assert str(path) in msg, msg
            return
        assert isinstance(t, Trace)


# The same examples every run unless GPUDOCTOR_FUZZ_RANDOM is set (local exploration); hypothesis prints
# the failing example's bytes (print_blob) so it can be added to REGRESSIONS.
_FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("GPUDOCTOR_FUZZ_RANDOM"),
                 database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Damage that once escaped as another exception: (reader, [(offset, xor)...]). Always run.
REGRESSIONS = {
    # a flipped byte in the SQLite schema: store.rundb.is_run_db raised UnicodeDecodeError
    "nsys_schema_byte_not_utf8": ("nsys", [(141693, 217)]),
    "nsys_three_flips": ("nsys", [(332258, 200), (208308, 201), (141693, 217)]),
}


@pytest.mark.parametrize("case", sorted(REGRESSIONS))
def test_fuzz_regressions(case):
    name, flips = REGRESSIONS[case]
    buf = bytearray(_source(name))
    for offset, xor in flips:
        buf[offset] ^= xor
    _check(name, bytes(buf))

# (reader, damage) pairs where a crash was found: xfail(strict=True) so CI stays green and the bug stays
# visible. Filled in from findings; see docs/reliability.md.
KNOWN_CRASHES: dict[tuple[str, str], str] = {}


def _params(damages):
    out = []
    for name in _SOURCES:
        for damage in damages:
            if name == "kineto_gz" and damage != "truncate":
                continue
            marks = ()
            if (name, damage) in KNOWN_CRASHES:
                marks = pytest.mark.xfail(strict=True, reason=KNOWN_CRASHES[(name, damage)])
            out.append(pytest.param(name, damage, id=f"{name}-{damage}", marks=marks))
    return out


@st.composite
def _damaged(draw, name: str, damage: str) -> bytes:
    data = _source(name)
    n = len(data)
    if damage == "truncate":
        return data[:draw(st.integers(0, n - 1))]
    buf = bytearray(data)
    if damage == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, n - 1))
            buf[i] ^= draw(st.integers(1, 255))
        return bytes(buf)
    # "block": overwrite a run of bytes (a lost page, a zeroed sector), the header kept intact
    start = draw(st.integers(min(100, n - 1), n - 1))
    length = draw(st.integers(1, 8192))
    fill = draw(st.sampled_from([b"\x00", b"\xff", b"\n", b",", b'"']))
    buf[start:start + length] = fill * len(buf[start:start + length])
    return bytes(buf)


@pytest.mark.parametrize("name,damage", _params(["truncate", "flip", "block"]))
def test_damaged_fixture_trace_or_input_error(name, damage):
    @_FUZZ
    @given(data=_damaged(name, damage))
    def prop(data):
        _check(name, data)

    prop()
