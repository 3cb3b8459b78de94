"""The analyzer registry: every declared setting works from ``--set`` and from gpudoctor.toml, reaches its
analyzer and, where a fixture allows, changes what it reports; bad values are a one-line error (exit 2);
docs/analyzers.md's settings table is the registry's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from gpudoctor.analyzers.config import load_config
from gpudoctor.analyzers.registry import ANALYZERS, SECTIONS, SEVERITY
from gpudoctor.analyzers.runner import run_all
from gpudoctor.analyzers.spec import Setting
from gpudoctor.cli.main import main
from gpudoctor.errors import GpudoctorError
from gpudoctor.readers.inputs import read_input

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
DOC = ROOT / "docs" / "analyzers.md"
TINY = FIX / "nsys" / "tiny_fused.nsys.sqlite"
ALL = [(a, s) for a, settings in SECTIONS.items() for s in settings]


def other_value(s: Setting):
    """A valid value of ``s`` that is not its default."""
    if s.kind == "choice":
        return next(c for c in s.choices if c != s.default)
    if s.kind == "regex":
        return r"step_(\d+)|x"
    if s.kind == "text":
        return "other"
    if s.kind == "integer":
        return (s.default or 2) + 1
    if s.maximum == 1.0:
        return 0.37 if s.default != 0.37 else 0.41
    return float(s.default or 1) * 2 + 1


def toml_value(v) -> str:
    return f"'{v}'" if isinstance(v, str) else repr(v)


@pytest.fixture(scope="module")
def tiny():
    return read_input(TINY)


def seen_by_analyzer(monkeypatch, trace, aid: str, cfg, key: str):
    """Run analyzer ``aid`` on ``trace`` with ``cfg``; the value of ``key`` its context's config held."""
    seen = []
    spec = ANALYZERS[aid]

    def spy(ctx):
        seen.append(ctx.config.get(aid, key))
        return spec.analyze(ctx)
    monkeypatch.setitem(ANALYZERS, aid, dataclasses.replace(spec, analyze=spy))
    run_all(trace, cfg, only=[aid])
    assert seen, f"{aid} did not run"
    return seen[0]


@pytest.mark.parametrize("aid, setting", ALL, ids=[f"{a}.{s.key}" for a, s in ALL])
def test_every_setting_from_set_and_toml_reaches_its_analyzer(aid, setting, tiny, tmp_path, monkeypatch):
    v = other_value(setting)
    dotted = f"{aid}.{setting.key}"
    from_set = load_config(None, [f"{dotted}={v}"])
    toml = tmp_path / "gpudoctor.toml"
    toml.write_text(f"[analyzers.{aid}]\n{setting.key} = {toml_value(v)}\n")
    from_toml = load_config(toml)
    for cfg, source in ((from_set, "override"), (from_toml, str(toml))):
        assert cfg.get(aid, setting.key) == v and cfg.sources[dotted] == source
        if aid == SEVERITY:  # the general rule: every analyzer's threshold follows it
            assert cfg.threshold("unfused_attention", setting.key) == v
        else:
            assert seen_by_analyzer(monkeypatch, tiny, aid, cfg, setting.key) == v


@pytest.mark.parametrize("aid", list(ANALYZERS))
def test_every_analyzer_can_be_disabled_from_toml(aid, tmp_path):
    toml = tmp_path / "gpudoctor.toml"
    toml.write_text(f'[analyzers]\ndisable = ["{aid}"]\n')
    assert not load_config(toml).enabled(aid)


# -- through the command line: the keys that used to fail "unknown analyzer" --------------------------

@pytest.mark.parametrize("assignment", ["nccl_dominated.exposed_fraction_medium=0.2",
                                        "pipeline_bubbles.bubble_fraction_high=0.5",
                                        "stragglers.min_excess_fraction=0.05",
                                        "kv_fragmentation.waste_fraction_medium=0.3"])
def test_cli_set_of_every_analyzer_family(assignment, tmp_path, capsys):
    out = tmp_path / "a.json"
    assert main(["analyze", str(TINY), "--set", assignment, "--json", str(out), "-q"]) == 0
    assert json.loads(out.read_text())["findings"]


def test_cli_toml_disable_stragglers(tmp_path, monkeypatch):
    toml = tmp_path / "gpudoctor.toml"
    toml.write_text('[analyzers]\ndisable = ["stragglers", "gpu_idle"]\n[analyzers.stragglers]\n'
                    'excess_fraction_high = 0.3\n')
    out = tmp_path / "a.json"
    assert main(["analyze", str(TINY), "--config", str(toml), "--json", str(out), "-q"]) == 0
    assert "gpu_idle" not in {f["analyzer"] for f in json.loads(out.read_text())["findings"]}


@pytest.mark.parametrize("assignment, message", [
    ("pipeline_bubbles.microbatch_pattern=(", "invalid regular expression"),
    ("memory_bound_decode.decode_range_pattern=[a-", "invalid regular expression"),
    ("gpu_idle.max_examples=-1", "must be at least 0"),
    ("kv_fragmentation.static_min_allocations=0", "must be at least 1"),
    ("nccl_dominated.small_message_bytes=" + "9" * 400, "number out of range"),
    ("gpu_idle.idle_fraction_high=1e400", "expected a finite number"),
    ("gpu_idle.idle_fraction_high=nan", "expected a finite number"),
    ("stragglers.excess_fraction_high=1.5", "must be at most 1"),
    ("gpu_idle.max_examples=2.5", "expected a whole number"),
    ("low_tensor_core.fallback_precision=fp64", "expected one of"),
    ("stragglers.nope=1", "unknown key"),
])
def test_cli_bad_values_are_one_line_exit_2(assignment, message, capsys):
    assert main(["analyze", str(TINY), "--set", assignment, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("line, message", [
    ("max_examples = -3", "must be at least 0"),
    ("max_examples = " + "9" * 400, "number out of range"),
    ("idle_fraction_high = inf", "expected a finite number"),
    ("idle_fraction_high = true", "expected a number"),
])
def test_toml_bad_values_are_one_line_errors(line, message, tmp_path):
    toml = tmp_path / "gpudoctor.toml"
    toml.write_text(f"[analyzers.gpu_idle]\n{line}\n")
    with pytest.raises(GpudoctorError, match=message):
        load_config(toml)


# -- behaviour: a setting changes what its analyzer reports -------------------------------------------

def _one(findings, aid):
    [f] = [f for f in findings if f.analyzer == aid]
    return f


@pytest.mark.parametrize("fixture, aid, assignment, before, after", [
    ("nsys/tiny_fused.nsys.sqlite", "gpu_idle", "gpu_idle.idle_fraction_medium=0.1", "low", "medium"),
    ("nsys/tiny_sync.nsys.sqlite", "gpu_idle", "gpu_idle.idle_fraction_high=0.99", "high", "medium"),
    ("nsys/attn_naive.nsys.sqlite", "unfused_attention", "unfused_attention.high_fraction=0.9", "high", "medium"),
    ("nsys/attn_naive.nsys.sqlite", "unfused_attention", "severity.high_fraction=0.9", "high", "medium"),
    ("nsys/mlp_fp32.nsys.sqlite", "low_tensor_core", "low_tensor_core.high_fraction=0.95", "high", "medium"),
    ("nsys/decode.nsys.sqlite", "memory_bound_decode", "memory_bound_decode.high_headroom=1e6", "high", "medium"),
])
def test_a_setting_changes_the_finding(fixture, aid, assignment, before, after):
    t = read_input(FIX / fixture)
    assert _one(run_all(t, only=[aid]), aid).severity == before
    assert _one(run_all(t, load_config(None, [assignment]), only=[aid]), aid).severity == after


def test_unfused_attention_chain_settings_change_what_is_found():
    t = read_input(FIX / "nsys" / "attn_naive.nsys.sqlite")
    base = _one(run_all(t, only=["unfused_attention"]), "unfused_attention")
    none = run_all(t, load_config(None, ["unfused_attention.max_kernels_between=0"]), only=["unfused_attention"])
    assert base.metrics["instances"] > 0
    assert not none or _one(none, "unfused_attention").metrics["instances"] < base.metrics["instances"]


# -- the docs ---------------------------------------------------------------------------------------

def _cell(v) -> str:
    if v is None:
        return "unset"
    text = f"`{v}`" if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)
    return text.replace("|", "\\|")


def _valid(s: Setting) -> str:
    if s.kind == "choice":
        return " / ".join(s.choices)
    if s.kind in ("regex", "text"):
        return s.kind
    lo = "" if s.minimum is None else f">= {s.minimum:g}"
    hi = "" if s.maximum is None else f"<= {s.maximum:g}"
    return ("whole number " if s.kind == "integer" else "number ") + ", ".join(x for x in (lo, hi) if x)


def settings_table() -> str:
    rows = ["| key | default | unit | valid values | meaning |", "|---|---|---|---|---|"]
    for aid, settings in SECTIONS.items():
        for s in settings:
            rows.append(f"| `{aid}.{s.key}` | {_cell(s.default)} | {s.unit} | {_valid(s)} | "
                        f"{s.meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def test_docs_settings_table_is_the_registrys():
    doc = DOC.read_text()
    m = re.search(r"<!-- settings-table -->\n(.*?)\n<!-- /settings-table -->", doc, re.S)
    assert m, "docs/analyzers.md has no <!-- settings-table --> block"
    assert m.group(1) == settings_table(), "docs/analyzers.md's settings table differs from the registry; " \
                                           "it should read:\n" + settings_table()


def test_every_analyzer_is_documented_with_its_evidence():
    doc = DOC.read_text()
    for aid, spec in ANALYZERS.items():
        assert f"## {aid}" in doc, aid
        assert spec.evidence, f"{aid} declares no evidence"


@pytest.mark.parametrize("fixture", ["nsys/attn_naive.nsys.sqlite", "nsys/tiny_sync.nsys.sqlite",
                                     "nsys/mlp_fp32.nsys.sqlite", "nsys/decode.nsys.sqlite"])
def test_findings_carry_only_declared_evidence(fixture):
    for f in run_all(read_input(FIX / fixture)):
        declared = {k for k, _ in ANALYZERS[f.analyzer].evidence} | {"window_start_ns"}
        assert set(f.evidence) <= declared, (f.analyzer, set(f.evidence) - declared)


def test_readme_lists_every_registered_analyzer():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^Analyzers \(\[docs/analyzers\.md\]\(docs/analyzers\.md\)\): (.*?)\.\n", readme, re.S | re.M)
    assert m, "README.md has no 'Analyzers (docs/analyzers.md): ...' sentence"
    assert re.findall(r"`(\w+)`", m.group(1)) == list(ANALYZERS), "README's analyzer list differs from the registry"
