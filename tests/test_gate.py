"""`gpudoctor gate` / `gpudoctor baseline` on the real fixture pairs (fixtures/README.md), the statistics, the
rules, the outputs (JUnit counts, Markdown, GitHub annotations) and the environment check."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from gpudoctor.analyzers.findings import Finding
from gpudoctor.cli.main import main
from gpudoctor.errors import GpudoctorError
from gpudoctor.gate import outputs, stats
from gpudoctor.gate.compare import GateOptions, compare
from gpudoctor.gate.inputs import analyze, load_run
from gpudoctor.gate.rules import evaluate_rules
from gpudoctor.gate.run import RunData, UserMetric
from gpudoctor.gate.samples import gate_block, run_from_trace
from gpudoctor.model.kernel_names import kernel_key
from gpudoctor.model.samples import busy_in_windows
from gpudoctor.render import jsonout

ROOT = Path(__file__).resolve().parent.parent
NSYS = ROOT / "fixtures" / "nsys"
BASE_A = NSYS / "gate_base_a.nsys.sqlite"
BASE_B = NSYS / "gate_base_b.nsys.sqlite"
SLOW = NSYS / "gate_slow.nsys.sqlite"
SLOW_FEW = NSYS / "gate_slow_few.nsys.sqlite"
NAIVE = NSYS / "attn_naive.nsys.sqlite"
SDPA = NSYS / "attn_sdpa.nsys.sqlite"


def _has_registry() -> bool:
    try:
        import gpudoctor.analyzers.registry as registry
        return hasattr(registry, "run_all")
    except ImportError:
        return False


@pytest.fixture(scope="module")
def runs() -> dict[str, RunData]:
    return {p.name.split(".")[0]: load_run(str(p)) for p in (BASE_A, BASE_B, SLOW, SLOW_FEW, NAIVE, SDPA)}


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "gpudoctor", *args], capture_output=True, text=True, env=e, cwd=cwd,
                          timeout=300)


def metric(result, name):
    return next(m for m in result.metrics if m.spec.name == name)


def junit_counts(path_or_text) -> tuple[dict, dict]:
    """(testsuite attributes as ints, counts found by walking the testcases)."""
    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) else path_or_text
    root = ET.fromstring(text)
    suite = root.find("testsuite") if root.tag == "testsuites" else root
    attrs = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    cases = suite.findall("testcase")
    found = {"tests": len(cases),
             "failures": sum(c.find("failure") is not None for c in cases),
             "errors": sum(c.find("error") is not None for c in cases),
             "skipped": sum(c.find("skipped") is not None for c in cases)}
    if root.tag == "testsuites":
        assert {k: int(root.get(k)) for k in ("tests", "failures", "errors", "skipped")} == attrs
    return attrs, found


# -- the fixture pairs --------------------------------------------------------------------------------------


def test_same_workload_twice_passes(runs):
    r = compare([runs["gate_base_a"]], [runs["gate_base_b"]])
    assert r.status == "pass" and r.exit_code == 0
    g = metric(r, "gpu_time").decision
    assert g.decision == "pass"
    assert g.n_baseline == 19 and g.n_candidate == 29  # base_a: 11 warm-up steps skipped, base_b: 1
    assert 465_000 < g.median_baseline < 480_000 and 465_000 < g.median_candidate < 480_000
    assert abs(g.change) < 0.01  # measured -0.6%
    assert g.ci_low > 0.98 and g.ci_high < 1.02
    # The GPU span per step is host-launch-bound here and differs by ~10% between two identical runs:
    # that is why it is reported, not gated, by default.
    s = metric(r, "step_time")
    assert not s.gated and abs(s.decision.change) > 0.05
    # The reverse order passes too.
    assert compare([runs["gate_base_b"]], [runs["gate_base_a"]]).exit_code == 0


def test_slow_is_a_regression_of_a_few_percent(runs):
    r = compare([runs["gate_base_a"]], [runs["gate_slow"]])
    assert r.status == "fail" and r.exit_code == 1
    g = metric(r, "gpu_time").decision
    assert g.decision == "regression"
    # Measured: 473 us -> 515 us per step, +8.9% (vs base_b: +9.6%), p ~ 1e-8, CI of the ratio ~[1.087, 1.092].
    assert 1.05 < g.ratio < 1.15
    assert g.p_value < 1e-4
    assert g.ci_low > 1.03
    # The GELU/tanh epilogue shows up as new kernels.
    names = [k["name"] for k in r.attribution["new"]]
    assert any("Gelu" in n for n in names) and any("tanh" in n for n in names)
    assert r.attribution["total_delta_ns_per_step"] > 30_000
    assert "regression" in r.headline and "us/step" in r.headline
    r2 = compare([runs["gate_base_b"]], [runs["gate_slow"]])
    assert metric(r2, "gpu_time").status == "regression"


def test_pooling_runs(runs):
    r = compare([runs["gate_base_a"], runs["gate_base_b"]], [runs["gate_slow"]])
    g = metric(r, "gpu_time").decision
    assert g.n_baseline == 48 and g.decision == "regression"
    assert r.attribution["baseline_steps"] == 48


def cut(run: RunData, n: int) -> RunData:
    """The same run with only its first n steady steps of each per-step metric."""
    r = copy.copy(run)
    r.samples = {k: (v[:n] if k in ("gpu_time", "step_time", "wall_time") else v) for k, v in run.samples.items()}
    return r


def test_few_steps_far_apart_is_a_regression(runs):
    # gate_slow_few: 3 steady steps of gate_slow (+9%): each is slower than every one of base_a's 19 steps by
    # more than 2 x the 3% tolerance, so complete separation decides.
    r = compare([runs["gate_base_a"]], [runs["gate_slow_few"]])
    g = metric(r, "gpu_time").decision
    assert g.n_candidate == 3 and g.decision == "regression" and g.rule == "separation"
    assert 0.08 < g.extra["separation_gap"] < 0.10  # measured 9.1%
    assert g.extra["separation_p"] == pytest.approx(1 / 1540)  # 1 / C(22, 3)
    assert r.exit_code == 1 and "complete separation" in r.headline


def test_few_steps_within_twice_the_tolerance_is_inconclusive(runs):
    # With a 5% tolerance the 9% gap is not 2 x the tolerance apart, and 3 steps are too few for the test.
    o = GateOptions(tolerance=0.05)
    r = compare([runs["gate_base_a"]], [runs["gate_slow_few"]], o)
    g = metric(r, "gpu_time").decision
    assert g.decision == "inconclusive" and g.rule == "too_few" and "too few steps" in g.reason
    assert r.status == "inconclusive" and r.exit_code == 3
    assert compare([runs["gate_base_a"]], [runs["gate_slow_few"]], GateOptions(tolerance=0.05, inconclusive="pass")).exit_code == 0
    assert compare([runs["gate_base_a"]], [runs["gate_slow_few"]], GateOptions(tolerance=0.05, inconclusive="fail")).exit_code == 1
    # With the full 28 steps of gate_slow the test decides: +9% beyond 5% is a regression.
    assert metric(compare([runs["gate_base_a"]], [runs["gate_slow"]], o), "gpu_time").decision.rule == "test"


@pytest.mark.parametrize("n", [3, 4, 5])
def test_fused_to_unfused_attention_with_few_steps(runs, n):
    g = metric(compare([cut(runs["attn_sdpa"], n)], [cut(runs["attn_naive"], n)]), "gpu_time").decision
    assert g.decision == "regression" and g.rule == "separation" and g.ratio > 3  # measured 4.08 -> 13.8 ms


@pytest.mark.parametrize("n", [3, 5, 10])
def test_same_program_with_few_steps_passes(runs, n):
    a, b = cut(runs["gate_base_a"], n), cut(runs["gate_base_b"], n)
    g = metric(compare([a], [b]), "gpu_time").decision
    assert g.decision == "pass", g.reason
    assert g.rule in ("range", "test")
    same = metric(compare([a], [cut(runs["gate_base_a"], n)]), "gpu_time").decision
    assert same.decision == "pass" and same.change == 0


def test_unfused_attention_fails_with_softmax_gemm_chain(runs):
    r = compare([runs["attn_sdpa"]], [runs["attn_naive"]])
    assert r.exit_code == 1
    g = metric(r, "gpu_time").decision
    assert g.ratio > 3  # measured 4.08 ms -> 13.8 ms per step
    top = r.attribution["kernels"]
    names = [k["name"] for k in top]
    assert "softmax_warp_forward" in names and "softmax_warp_backward" in names
    status = {k["name"]: k["status"] for k in top}
    assert status["softmax_warp_forward"] == "new" and status["softmax_warp_backward"] == "new"
    assert any(k["category"] == "gemm" and k["status"] == "new" for k in r.attribution["new"])  # the bmm's
    assert any("masked_fill" in n for n in names)
    assert any("sdpa" in k["name"] for k in r.attribution["vanished"])  # the fused cuDNN kernels
    cats = {c["category"]: c for c in r.attribution["categories"]}
    assert cats["attention"]["delta_ns_per_step"] < 0 < cats["reduction"]["delta_ns_per_step"]
    # Sorted by contribution: every listed delta is at most the one before it.
    deltas = [k["delta_ns_per_step"] for k in top]
    assert deltas == sorted(deltas, reverse=True)
    total = r.attribution["total_delta_ns_per_step"]
    assert 9_000_000 < total < 10_500_000
    assert r.attribution["headline"].startswith("+9.")


# -- the statistics -----------------------------------------------------------------------------------------


def test_decide_rules():
    rng = np.random.default_rng(1)
    a = 1000 + rng.normal(0, 5, 40)
    assert stats.decide(a, a * 1.001).decision == "pass"
    assert stats.decide(a, a * 1.10).decision == "regression"
    assert stats.decide(a, a * 0.90).decision == "improvement"
    assert stats.decide(a, a[:1]).decision == "inconclusive"
    assert stats.decide(a, a[:4]).rule == "range"  # 4 of the same steps: all within the tolerance
    noisy = 1000 + rng.normal(0, 200, 8)
    d = stats.decide(noisy, noisy * 1.02)  # +2%, well inside the 20% step-to-step noise
    assert d.decision == "pass" and d.rule == "noise"
    d = stats.decide(noisy, noisy * 1.06)  # +6%: beyond the tolerance, not significant
    assert d.decision == "inconclusive" and "not significant" in d.reason
    # Higher is better (tokens/s): 10% fewer is a regression.
    t = stats.decide(a, a * 0.9, higher_is_better=True)
    assert t.decision == "regression" and t.worse > 0.09
    # Seeded: the same inputs give the same interval.
    assert stats.bootstrap_ratio_ci(a, a * 1.05) == stats.bootstrap_ratio_ci(a, a * 1.05)
    assert stats.decide([], a).decision == "error"
    const = np.full(10, 5.0)
    assert stats.decide(const, const).decision == "pass"


def test_calibrate():
    c = stats.calibrate([100.0, 101.0, 99.0])
    assert c["tolerance"] == pytest.approx(0.03)  # 3 x 1% spread
    assert stats.calibrate([100.0, 100.0, 100.0])["tolerance"] == 0.01  # the floor
    assert stats.calibrate([100.0])["tolerance"] is None


def test_busy_in_windows():
    s = np.array([0, 5, 20, 40])
    e = np.array([10, 12, 30, 50])
    out = busy_in_windows(s, e, np.array([0, 8, 11, 45, 60]), np.array([100, 25, 15, 46, 70]))
    assert out.tolist() == [12 + 10 + 10, 4 + 5, 1, 1, 0]


def test_kernel_key():
    dem = ("void at::native::vectorized_elementwise_kernel<(int)8, at::native::BUnaryFunctor<c10::BFloat16, c10::BFloat16, "
           "c10::BFloat16, at::native::binary_internal::MulFunctor<float>>, std::array<char *, (unsigned long)2>>(int, T2, T3)")
    assert kernel_key("vectorized_elementwise_kernel", dem) == "vectorized_elementwise_kernel<MulFunctor>"
    assert kernel_key("softmax_warp_forward", "void softmax_warp_forward<...>") == "softmax_warp_forward"


# -- rules --------------------------------------------------------------------------------------------------


def _finding(analyzer, severity, metrics=None, evidence=None, rank=0):
    return Finding(analyzer=analyzer, severity=severity, title=f"{analyzer} title", metrics=metrics or {},
                   evidence=evidence or {"example": 1}, rank=rank)


def test_rules_pure_function():
    fs = [_finding("unfused_attention", "high", {"attention_time_fraction": 0.6}, {"chain": ["softmax_warp_forward"]}),
          _finding("gpu_idle", "medium", {"idle_fraction": 0.4}, {"gaps": [1, 2]}),
          _finding("memory_bound_decode", "high", {"mbu": 0.2})]
    res = {r.name: r for r in evaluate_rules(
        {"fail_on": ["unfused_attention", "low_tensor_core"], "max_idle_fraction": 0.3, "min_mbu": 0.5,
         "max_exposed_comm_fraction": 0.2}, fs)}
    assert res["fail_on:unfused_attention"].status == "fail"
    assert res["fail_on:unfused_attention"].evidence == {"chain": ["softmax_warp_forward"]}
    assert res["fail_on:low_tensor_core"].status == "pass"
    assert res["max_idle_fraction"].status == "fail" and res["max_idle_fraction"].value == 0.4
    assert res["max_idle_fraction"].evidence == {"gaps": [1, 2]}
    assert res["min_mbu"].status == "fail"
    assert res["max_exposed_comm_fraction"].status == "skipped"  # nothing reports it
    # An info finding (e.g. "attention is already fused") does not trip fail_on unless asked.
    info = [_finding("unfused_attention", "info")]
    assert evaluate_rules({"fail_on": ["unfused_attention"]}, info)[0].status == "pass"
    assert evaluate_rules({"fail_on": ["unfused_attention"], "fail_on_severity": "info"}, info)[0].status == "fail"
    # Values given directly win over findings.
    r = evaluate_rules({"max_idle_fraction": 0.3}, fs, {"idle_fraction": 0.1})[0]
    assert r.status == "pass"


def test_rules_through_compare_and_junit(runs):
    base, cand = copy.deepcopy(runs["gate_base_a"]), copy.deepcopy(runs["gate_base_b"])
    cand.findings = [_finding("unfused_attention", "high").to_dict()]
    o = GateOptions(rules={"fail_on": ["unfused_attention"], "max_idle_fraction": 0.9, "min_mbu": 0.5})
    r = compare([base], [cand], o)
    assert metric(r, "gpu_time").status == "pass"
    assert r.status == "fail" and r.exit_code == 1
    assert any(x.startswith("rule fail_on:unfused_attention") for x in r.reasons)
    attrs, found = junit_counts(outputs.junit_xml(r))
    assert attrs == found
    # 5 metrics (gpu_time, step_time, wall_time, idle_fraction, exposed_comm_fraction) + 3 rules + environment
    assert attrs == {"tests": 9, "failures": 1, "errors": 0, "skipped": 1}


@pytest.mark.skipif(not _has_registry(), reason="analyzers/registry.py not available")
def test_fail_on_unfused_attention_with_the_analyzers(runs):
    o = GateOptions(rules={"fail_on": ["unfused_attention"]})
    r = compare([runs["attn_sdpa"]], [runs["attn_naive"]], o)
    rule = next(x for x in r.rules if x.name == "fail_on:unfused_attention")
    assert rule.status == "fail" and rule.evidence
    assert "softmax_warp_forward" in json.dumps(rule.evidence)
    assert "baseline has this finding too" not in rule.message  # sdpa's finding is only "info: already fused"
    ok = compare([runs["attn_sdpa"]], [runs["attn_sdpa"]], o)
    assert next(x for x in ok.rules if x.name == "fail_on:unfused_attention").status == "pass"


def test_bad_rule_config(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text('[gate]\nfail_on = ["unfused_atention"]\n')
    assert main(["gate", "--baseline", str(BASE_A), "--candidate", str(BASE_B), "--config", str(cfg), "-q"]) == 2
    cfg.write_text('[gate]\ntolerence = 0.05\n')
    assert main(["gate", "--baseline", str(BASE_A), "--candidate", str(BASE_B), "--config", str(cfg), "-q"]) == 2


# -- environment check ----------------------------------------------------------------------------------------


def _traced(path):
    from gpudoctor.readers.inputs import load_inputs
    trace, _, errors = load_inputs([str(path)])
    assert not errors
    return trace


def test_different_gpu_model_is_inconclusive(runs):
    trace = _traced(BASE_B)
    other = copy.deepcopy(trace)  # the fixture file is not touched
    other.devices["name"] = "NVIDIA A100-SXM4-80GB"
    a = analyze(other, None)
    ranks, findings = a.ranks, a.findings
    cand = run_from_trace(other, ranks, findings, "edited")
    assert cand.env["gpus"] == ["NVIDIA A100-SXM4-80GB"]
    assert runs["gate_base_a"].env["driver_version"] == "580.159.04"
    r = compare([runs["gate_base_a"]], [cand])
    assert r.status == "inconclusive" and r.exit_code == 3
    assert "GPU model" in r.headline and "A100" in r.headline and "H100" in r.headline
    r = compare([runs["gate_base_a"]], [cand], GateOptions(allow_mismatch=True))
    assert r.exit_code == 0 and r.mismatches
    attrs, found = junit_counts(outputs.junit_xml(r))
    assert attrs == found
    assert "--allow-mismatch" in outputs.markdown(r)


def test_different_driver_is_inconclusive_via_cli(runs, tmp_path):
    d = runs["gate_base_b"].to_dict()
    d["env"]["driver_version"] = "570.86.15"
    p = tmp_path / "cand.json"
    p.write_text(json.dumps(d))
    junit = tmp_path / "j.xml"
    res = run_cli("gate", "--baseline", str(BASE_A), "--candidate", str(p), "--junit", str(junit))
    assert res.returncode == 3
    assert "NVIDIA driver: 580.159.04" in res.stdout and "570.86.15" in res.stdout
    attrs, found = junit_counts(junit)
    assert attrs == found and attrs["skipped"] == 1 and attrs["failures"] == 0
    assert main(["gate", "--baseline", str(BASE_A), "--candidate", str(p), "--allow-mismatch", "-q"]) == 0
    # A minor CUDA difference is a note, not a refusal.
    d["env"]["driver_version"] = "580.159.04"
    d["env"]["cuda_driver_version"] = "13.1"
    p.write_text(json.dumps(d))
    assert main(["gate", "--baseline", str(BASE_A), "--candidate", str(p), "-q"]) == 0


# -- CLI and outputs ------------------------------------------------------------------------------------------


def test_cli_outputs_regression(tmp_path):
    j, m, js = tmp_path / "r.xml", tmp_path / "r.md", tmp_path / "r.json"
    summary = tmp_path / "summary.md"
    res = run_cli("gate", "--baseline", str(BASE_A), "--candidate", str(SLOW), "--junit", str(j), "--markdown", str(m),
                  "--json", str(js), "--github", env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert res.returncode == 1, res.stderr
    ann = [line for line in res.stdout.splitlines() if line.startswith("::")]
    assert ann and ann[0].startswith("::error title=gpudoctor gate%3A GPU time per step regressed::")
    assert "%25" in ann[0]  # '%' escaped for the workflow command
    attrs, found = junit_counts(j)
    assert attrs == found == {"tests": 6, "failures": 1, "errors": 0, "skipped": 0}
    root = ET.parse(j).getroot()
    fail = root.find("testsuite/testcase/failure")
    assert fail.get("type") == "regression" and "+8.9%" in fail.get("message")
    md = m.read_text()
    assert md.startswith("## gpudoctor gate: ❌ FAIL")
    assert "| GPU time per step (`gpu_time`)" in md and "Gelu" in md
    outside_code = "".join(md.split("`")[::2])
    assert "<Mul" not in outside_code.replace("\\<Mul", "")  # no raw HTML outside code spans
    assert "&gt;" not in md and "&lt;" not in md and " -> " in outside_code  # text kept as written
    assert "[rule: complete separation]" in md
    assert summary.read_text() == md
    doc = json.loads(js.read_text())
    assert doc["status"] == "fail" and doc["exit_code"] == 1
    g = next(x for x in doc["metrics"] if x["name"] == "gpu_time")
    assert g["decision"] == "regression" and g["gated"] is True
    assert doc["attribution"]["new"]


def test_cli_pass_and_inconclusive_main(tmp_path):
    j = tmp_path / "p.xml"
    assert main(["gate", "--baseline", str(BASE_A), "--candidate", str(BASE_B), "--junit", str(j), "-q"]) == 0
    assert junit_counts(j)[0] == {"tests": 6, "failures": 0, "errors": 0, "skipped": 0}
    j2 = tmp_path / "i.xml"
    few = ["gate", "--baseline", str(BASE_A), "--candidate", str(SLOW_FEW), "--tolerance", "0.05"]
    assert main([*few, "--junit", str(j2), "-q"]) == 3
    attrs, found = junit_counts(j2)
    assert attrs == found and attrs["skipped"] == 1 and attrs["failures"] == 0
    assert main([*few, "--inconclusive", "pass", "-q"]) == 0
    j3 = tmp_path / "f.xml"
    assert main([*few, "--inconclusive", "fail", "--junit", str(j3), "-q"]) == 1
    assert junit_counts(j3)[0]["failures"] == 1
    assert main(["gate", "--baseline", str(BASE_A), "--candidate", str(SLOW), "--tolerance", "0.2", "-q"]) in (0, 3)


def test_usage_and_input_errors(tmp_path, capsys):
    assert main(["gate", "--baseline", str(BASE_A), "-q"]) == 2
    assert main(["gate", "--baseline", str(BASE_A), "--candidate", str(tmp_path / "missing.sqlite"), "-q"]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["gate", "--inconclusive", "maybe"])
    assert e.value.code == 2


def test_github_annotations_bounded(runs):
    cand = copy.deepcopy(runs["gate_slow"])
    cand.findings = [_finding("unfused_attention", "high", rank=i).to_dict() for i in range(3)]
    o = GateOptions(rules={"fail_on": list(("unfused_attention", "low_tensor_core", "gpu_idle", "memory_bound_decode",
                                            "nccl_dominated", "pipeline_bubbles", "kv_fragmentation")),
                           "min_mbu": 0.5, "max_exposed_comm_fraction": 0.0, "max_idle_fraction": 0.1},
                    gated=("gpu_time", "step_time", "wall_time"), allow_mismatch=True)
    cand.env["driver_version"] = "570.86.15"
    cand.findings += [_finding(a, "medium").to_dict() for a in o.rules["fail_on"][1:]]
    r = compare([runs["gate_base_a"]], [cand], o)
    lines = outputs.github_annotations(r)
    assert len(lines) == outputs.MAX_ANNOTATIONS
    assert all(line.startswith(("::error ", "::warning ")) for line in lines)
    assert "more annotations left out" in lines[-1]
    for line in lines:
        assert "\n" not in line


def test_user_metric_from_run_directory(tmp_path, runs):
    from gpudoctor.store.rundb import save

    def make(name, values):
        d = tmp_path / name
        d.mkdir()
        save(_traced(BASE_A), d / "run.db")
        (d / "stdout.log").write_text("".join(f"step {i} loss 1.0 tokens/s: {v:,.1f}\n" for i, v in enumerate(values)))
        return d

    rng = np.random.default_rng(0)
    a = make("a", 50_000 + rng.normal(0, 200, 20))
    b = make("b", 45_000 + rng.normal(0, 200, 20))
    cfg = tmp_path / "gpudoctor.toml"
    cfg.write_text("[gate]\n[gate.user_metrics.tokens_per_s]\nregex = 'tokens/s: ([0-9.,]+)'\nunit = 'tok/s'\n")
    js = tmp_path / "r.json"
    assert main(["gate", "--baseline", str(a), "--candidate", str(b), "--config", str(cfg), "--json", str(js), "-q"]) == 1
    doc = json.loads(js.read_text())
    tok = next(x for x in doc["metrics"] if x["name"] == "tokens_per_s")
    assert tok["decision"] == "regression" and tok["n_baseline"] == 20 and tok["higher_is_better"]
    assert next(x for x in doc["metrics"] if x["name"] == "gpu_time")["decision"] == "pass"  # same trace
    assert doc["baseline"][0]["source"] == "run_dir"
    # gpudoctor.toml is read once per gate, for both its [gate] table and the analyzers' config
    from gpudoctor.analyzers import config as analyzer_config
    from gpudoctor.gate import config as gate_config

    reads = []
    real_read = gate_config.read_toml
    with pytest.MonkeyPatch.context() as mp:
        for module in (gate_config, analyzer_config):
            mp.setattr(module, "read_toml", lambda p: reads.append(p) or real_read(p))
        assert main(["gate", "--baseline", str(a), "--candidate", str(b), "--config", str(cfg), "-q"]) == 1
    assert reads == [cfg]
    # The regex finds nothing in the candidate's output: an error (exit 2), not a silent pass.
    (b / "stdout.log").write_text("no numbers here\n")
    assert main(["gate", "--baseline", str(a), "--candidate", str(b), "--config", str(cfg), "-q"]) == 2


def test_analysis_json_inputs(tmp_path):
    from gpudoctor.pipeline import analyze_inputs

    def write(path, src, with_gate=True, durations=False):
        an = analyze_inputs([str(src)])
        d = jsonout.to_json_dict(an)  # analysis.json carries the gate block
        assert d["gate"] == json.loads(json.dumps(gate_block(an)))
        if not with_gate:  # as an analysis.json from elsewhere might be
            d.pop("gate")
        if durations:
            for r in d["ranks"]:
                r["steps"]["durations_ns"] = [int(x) for x in an.ranks[0].window.steady["duration_ns"]]
        path.write_text(json.dumps(d))
        return path

    a = write(tmp_path / "a.json", BASE_A)
    s = write(tmp_path / "s.json", SLOW)
    js = tmp_path / "r.json"
    assert main(["gate", "--baseline", str(a), "--candidate", str(s), "--json", str(js), "-q"]) == 1
    doc = json.loads(js.read_text())
    assert next(x for x in doc["metrics"] if x["name"] == "gpu_time")["median_candidate"] > 500_000
    assert doc["attribution"]["new"]
    # Mixed: analysis.json baseline vs raw trace candidate.
    assert main(["gate", "--baseline", str(a), "--candidate", str(BASE_B), "-q"]) == 0
    # Without the gate block and without durations: a clear input error.
    bare = write(tmp_path / "bare.json", BASE_B, with_gate=False)
    assert main(["gate", "--baseline", str(a), "--candidate", str(bare), "-q"]) == 2
    # With only ranks[].steps.durations_ns: step_time can be gated, gpu_time cannot.
    dur_a = write(tmp_path / "da.json", BASE_A, with_gate=False, durations=True)
    dur_s = write(tmp_path / "ds.json", SLOW, with_gate=False, durations=True)
    assert main(["gate", "--baseline", str(dur_a), "--candidate", str(dur_s), "-q"]) == 2
    assert main(["gate", "--baseline", str(dur_a), "--candidate", str(dur_s), "--metrics", "step_time", "-q"]) == 0


def test_baseline_save_show_and_use(tmp_path, capsys):
    bdir = tmp_path / "baselines"
    assert main(["baseline", "save", "main", str(BASE_A), str(BASE_B), str(BASE_A), "--dir", str(bdir)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in out and "3 run(s)" in out
    f = bdir / "nvidia-h100-80gb-hbm3" / "main.json"
    assert f.exists()
    assert main(["baseline", "show", "--dir", str(bdir)]) == 0
    assert "main" in capsys.readouterr().out
    assert main(["baseline", "show", "main", "--dir", str(bdir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown[0]["runs"] == 3 and shown[0]["calibrated_tolerances"]["gpu_time"] >= 0.01
    js = tmp_path / "r.json"
    assert main(["gate", "--baseline", "@main", "--candidate", str(SLOW), "--baseline-dir", str(bdir),
                 "--json", str(js), "-q"]) == 1
    doc = json.loads(js.read_text())
    assert doc["options"]["tolerance_source"] == "calibrated baseline"
    assert main(["gate", "--baseline", "@main", "--candidate", str(BASE_B), "--baseline-dir", str(bdir), "-q"]) == 0
    assert main(["gate", "--baseline", "@nope", "--candidate", str(BASE_B), "--baseline-dir", str(bdir), "-q"]) == 2
    # Keyed by hardware: a baseline saved for another GPU model is not used for this one.
    other = json.loads(f.read_text())
    other["hardware"] = "NVIDIA A100-SXM4-80GB"
    (bdir / "nvidia-a100-sxm4-80gb").mkdir()
    (bdir / "nvidia-a100-sxm4-80gb" / "a100only.json").write_text(json.dumps(dict(other, name="a100only")))
    assert main(["gate", "--baseline", "@a100only", "--candidate", str(BASE_B), "--baseline-dir", str(bdir), "-q"]) == 2
    assert "exists for NVIDIA A100-SXM4-80GB but not for NVIDIA H100 80GB HBM3" in capsys.readouterr().err


def test_calibrate_cli(tmp_path, capsys):
    js = tmp_path / "cal.json"
    assert main(["gate", "calibrate", "--runs", str(BASE_A), str(BASE_B), "--json", str(js)]) == 0
    doc = json.loads(js.read_text())
    g = doc["metrics"]["gpu_time"]
    assert g["runs"] == 2 and 0.01 <= g["tolerance"] < 0.03  # measured spread 0.4% -> floor-ish tolerance
    assert doc["suggested_tolerance"] == g["tolerance"]
    assert doc["metrics"]["step_time"]["tolerance"] > 0.1  # the host-bound span is far noisier
    assert "tolerance =" in capsys.readouterr().out
    assert main(["gate", "--calibrate", "--runs", str(BASE_A)]) == 2


def test_multi_rank_run(runs):
    from gpudoctor.readers.inputs import load_inputs

    trace, _, errors = load_inputs([str(BASE_A), str(BASE_B)], {str(BASE_A): 0, str(BASE_B): 1})
    assert not errors and trace.rank_ids == [0, 1]
    a = analyze(trace, None)
    ranks, findings = a.ranks, a.findings
    run = run_from_trace(trace, ranks, findings, "two-ranks")
    assert run.env["gpu_count"] == 2
    assert len(run.samples["gpu_time"]) == 19 + 29  # different steady counts: pooled
    assert any("pooled" in n for n in run.notes)
    assert run.steps == 48
    assert len(run.samples["idle_fraction"]) == 2


def test_run_roundtrip(runs):
    r = runs["gate_slow"]
    back = RunData.from_dict(json.loads(json.dumps(r.to_dict(findings=True))))
    assert back.samples == r.samples and back.steps == r.steps and back.env == r.env
    assert back.kernels["total_ns"].sum() == r.kernels["total_ns"].sum()


def test_unknown_metric_and_user_metric_name(runs, tmp_path):
    with pytest.raises(GpudoctorError):
        compare([runs["gate_base_a"]], [runs["gate_base_b"]], GateOptions(gated=("gpu_tme",)))
    um = UserMetric(name="tps", regex=r"tps=(\d+)")
    o = GateOptions(user_metrics=[um])
    r = compare([runs["gate_base_a"]], [runs["gate_base_b"]], o)
    assert r.exit_code == 2 and metric(r, "tps").status == "error"


def test_run_directory_manifest_versions(tmp_path):
    from gpudoctor.store.rundb import save

    trace = _traced(BASE_A)

    def make(name, torch_version, cudnn):
        d = tmp_path / name
        d.mkdir()
        save(trace, d / "run.db")
        (d / "manifest.json").write_text(json.dumps({
            "manifest_version": 1, "driver_version": "580.159.04", "cuda_driver_version": 13000,
            "versions": {"torch": torch_version, "torch_cuda": "13.0", "cudnn_version": cudnn}, "reports": []}))
        return d

    a = make("a", "2.11.0+cu130", 91900)
    b = make("b", "2.10.0+cu130", 91900)
    c = make("c", "2.11.1+cu130", 91901)
    ra, rb, rc = load_run(str(a)), load_run(str(b)), load_run(str(c))
    assert ra.env["torch_version"] == "2.11.0+cu130" and ra.env["cudnn_version"] == "9.19.0"
    r = compare([ra], [rb])
    assert r.exit_code == 3 and "PyTorch major.minor version" in r.headline
    r = compare([ra], [rc])  # patch releases: a note, not a refusal
    assert r.exit_code == 0 and any("torch_version" in n for n in r.env_notes)


def test_malformed_inputs_keep_the_exit_contract(tmp_path, capsys):
    # An edited analysis.json (gate block with a non-number) is an input error, with the JSON/JUnit report.
    good = tmp_path / "a.json"
    assert main(["analyze", str(BASE_A), "--json", str(good), "-q"]) == 0
    doc = json.loads(good.read_text())
    doc["gate"]["samples"]["gpu_time"][0] = "x"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    junit, js = tmp_path / "j.xml", tmp_path / "r.json"
    assert main(["gate", "--baseline", str(good), "--candidate", str(bad), "--junit", str(junit), "--json", str(js),
                 "-q"]) == 2
    assert "malformed" in capsys.readouterr().err
    assert junit_counts(junit)[0]["errors"] == 1 and json.loads(js.read_text())["exit_code"] == 2
    # One corrupt baseline file neither breaks `baseline show` for the others nor goes unmentioned.
    bdir = tmp_path / "baselines"
    assert main(["baseline", "save", "main", str(good), "--dir", str(bdir)]) == 0
    saved = next(bdir.glob("*/main.json"))
    (saved.parent / "broken.json").write_text('{"format": "gpudoctor-baseline", "version": 1, "runs": 5}')
    capsys.readouterr()
    assert main(["baseline", "show", "--dir", str(bdir)]) == 0
    out = capsys.readouterr()
    assert "main" in out.out and "broken.json" in out.err
    edited = json.loads(saved.read_text())
    edited["runs"][0]["samples"]["gpu_time"] = ["x"]
    saved.write_text(json.dumps(edited))
    assert main(["gate", "--baseline", "@main", "--candidate", str(good), "--baseline-dir", str(bdir), "-q"]) == 2
    assert "malformed baseline" in capsys.readouterr().err


def test_gpu_conditions_not_recorded_is_a_note(runs):
    r = compare([runs["gate_base_a"]], [runs["gate_base_b"]])
    assert r.not_comparable == [] and any("GPU conditions" in n and "not checked" in n for n in r.notes)


def test_dashboard_compare_uses_the_gates_numbers(runs):
    from gpudoctor.gate.pairs import compare_analyses, kernel_table
    from gpudoctor.pipeline import analyze_inputs

    a, b = analyze_inputs([str(SDPA)], need_trace=True), analyze_inputs([str(NAIVE)], need_trace=True)
    r = compare_analyses(a, b)
    g, cli = metric(r, "gpu_time").decision, metric(compare([runs["attn_sdpa"]], [runs["attn_naive"]]), "gpu_time").decision
    assert (g.median_baseline, g.median_candidate, g.decision) == (cli.median_baseline, cli.median_candidate, "regression")
    t = kernel_table(r)
    top = compare([runs["attn_sdpa"]], [runs["attn_naive"]]).attribution["kernels"][0]
    row = t[t["kernel"] == top["name"]].iloc[0]
    assert row["diff_us"] == pytest.approx(top["delta_ns_per_step"] / 1e3, abs=0.01)
    assert any("<" in k for k in t["kernel"])  # the gate's names: generic kernels carry their functor


def _fake_nsys(d: Path, report: Path) -> Path:
    """A stand-in `nsys` that runs the program and hands back a real recording (``report``) as its report."""
    d.mkdir()
    script = d / "nsys"
    script.write_text(f"#!{sys.executable}\n" + f"""import shutil, subprocess, sys
args = sys.argv[1:]
if args[:1] == ["--version"]:
    print("NVIDIA Nsight Systems version 2099.1.1-fake"); sys.exit(0)
if args[:1] == ["profile"]:
    i, out = 1, None
    while i < len(args) and args[i].startswith("-"):
        if args[i].startswith("--output="):
            out = args[i].split("=", 1)[1]
        i += 2 if args[i] in ("-t", "-s", "-b", "-c", "-p", "-d", "-y", "-x", "-e", "-w", "-n") else 1
    rc = subprocess.call(args[i:])
    shutil.copy({str(report)!r}, out + ".nsys-rep")
    sys.exit(rc)
if args[:1] == ["export"]:
    out = [a.split("=", 1)[1] for a in args if a.startswith("--output=")][0]
    shutil.copy(args[-1], out); sys.exit(0)
sys.exit(2)
""")
    script.chmod(0o755)
    return d


@pytest.mark.slow
def test_candidate_cmd_records_repeated_runs(tmp_path):
    fake = _fake_nsys(tmp_path / "bin", BASE_B)
    env = {"PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}"}
    runs_dir = tmp_path / "runs"
    js = tmp_path / "r.json"
    res = run_cli("gate", "--baseline", str(BASE_A), "--candidate-cmd", "sh -c 'echo step'", "--repeat", "2",
                  "--profile-args", "--backend nsys --no-nvml", "--runs-dir", str(runs_dir), "--json", str(js), env=env)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in runs_dir.iterdir()) == ["candidate_1", "candidate_2"]
    doc = json.loads(js.read_text())
    g = next(x for x in doc["metrics"] if x["name"] == "gpu_time")
    assert len(doc["candidate"]) == 2 and g["n_candidate"] == 2 * 29 and g["decision"] == "pass"
    bad = run_cli("gate", "--baseline", str(BASE_A), "--candidate-cmd", "sh -c 'exit 5'", "--profile-args",
                  "--backend nsys --no-nvml", "--runs-dir", str(tmp_path / "runs2"), env=env)
    assert bad.returncode == 2 and "candidate command failed (exit 5) on run 1 of 1" in bad.stderr


def test_plain_install_has_what_the_gate_needs():
    import tomllib

    from gpudoctor.errors import MissingExtraError, install_hint

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("scipy") for d in deps)  # the gate's tests and change points, no extra
    # From this checkout the hint names it, so the command works here as well as from an index.
    assert install_hint("dash") == f"pip install -e '{ROOT}[dash]'"
    assert str(ROOT) in str(MissingExtraError("plotly", "dash"))
