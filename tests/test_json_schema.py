"""docs/json-schema.md lists exactly the keys ``gpudoctor analyze --json`` writes, on real fixtures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpudoctor.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
SAMPLES = ROOT.parent / "shared" / "samples"
DOC = ROOT / "docs" / "json-schema.md"
# Below these the keys depend on the analyzer, the reader or the run (documented elsewhere).
OPEN = {"metrics", "evidence", "dropped", "nvml", "env", "samples"}

RUNS = [
    [FIX / "nsys" / "attn_naive.nsys.sqlite"],
    [FIX / "torch" / "tiny_sync.torch.json.gz"],
    [FIX / "nsys" / "kv_paged.nsys.sqlite", FIX / "kv" / "kv_paged.snapshot.pickle"],
    [FIX / "nsys" / "decode.nsys.sqlite", FIX / "ncu" / "ncu_kernels.raw.csv"],
]
MULTI = [SAMPLES / "multigpu-h200x2" / "ddp_comm_bound_rank0.sqlite",
         SAMPLES / "multigpu-h200x2" / "ddp_comm_bound_rank1.sqlite"]


def key_paths(x, path: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(x, dict):
        for k, v in x.items():
            p = f"{path}.{k}" if path else k
            out.add(p)
            if k not in OPEN:
                out |= key_paths(v, p)
    elif isinstance(x, list):
        for v in x:
            out |= key_paths(v, path + "[]")
    return out


def documented() -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", DOC.read_text(), re.M))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> set[str]:
    runs = RUNS + ([MULTI] if all(p.exists() for p in MULTI) else [])
    keys: set[str] = set()
    for i, inputs in enumerate(runs):
        out = tmp_path_factory.mktemp("json") / f"a{i}.json"
        assert main(["analyze", *map(str, inputs), "--json", str(out), "-q"]) == 0
        doc = json.loads(out.read_text())
        assert doc["gate"] is not None and doc["findings"]
        keys |= key_paths(doc)
    return keys


def test_every_written_key_is_documented(written):
    missing = written - documented()
    assert not missing, f"keys written but not in docs/json-schema.md: {sorted(missing)}"


def test_every_documented_key_is_written(written):
    unused = documented() - written
    assert not unused, f"keys in docs/json-schema.md that no fixture's output has: {sorted(unused)}"


def test_stragglers_and_the_gate_block_are_in_the_contract():
    doc = DOC.read_text()
    assert "`stragglers`" in doc and "| `gate` |" in doc
