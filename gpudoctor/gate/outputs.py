"""What the gate writes: JUnit XML, Markdown (for $GITHUB_STEP_SUMMARY), GitHub Actions annotations, JSON
and the terminal text."""

from __future__ import annotations

import json
import math
import re
import socket
import time
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

from gpudoctor.gate import stats
from gpudoctor.gate.compare import GateResult, MetricResult, fmt_value, metric_line
from gpudoctor.render.fmt import short

MAX_ANNOTATIONS = 10
_BAD_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")

STATUS_WORD = {"pass": "PASS", "improvement": "PASS (improvement)", "fail": "FAIL", "inconclusive": "INCONCLUSIVE",
               "error": "ERROR"}
STATUS_ICON = {"pass": "✅", "improvement": "✅", "fail": "❌", "inconclusive": "⚠️", "error": "❌"}


def _x(text: object) -> str:
    return _BAD_XML.sub("?", str(text))


def _fmt_ms(ns: float | None) -> str:
    if ns is None:
        return "n/a"
    ns = float(ns)
    return f"{ns / 1e6:.3f} ms" if abs(ns) >= 1e5 else f"{ns / 1e3:.1f} us"


def _signed_ms(ns: float | None) -> str:
    ns = float(ns)
    return f"{ns / 1e6:+.3f} ms" if abs(ns) >= 1e5 else f"{ns / 1e3:+.1f} us"


# -- JUnit --------------------------------------------------------------------------------------------------


def _metric_case_outcome(m: MetricResult, inconclusive_mode: str) -> tuple[str, str]:
    """('failure' | 'error' | 'skipped' | 'pass', type)."""
    if not m.gated:
        return "pass", ""
    if m.status == stats.REGRESSION:
        return "failure", "regression"
    if m.status == stats.ERROR:
        return "error", "error"
    if m.status == stats.INCONCLUSIVE:
        return ("failure", "inconclusive") if inconclusive_mode == "fail" else ("skipped", "inconclusive")
    return "pass", ""


def junit_xml(result: GateResult, elapsed_s: float = 0.0) -> str:
    """One testsuite, one testcase per metric, per rule and one for the environment check. Regressions and
    broken rules are <failure>s, metrics that could not be computed <error>s, inconclusive gated metrics
    <skipped> (or <failure> with --inconclusive fail), rules that could not be checked <skipped>."""
    cases: list[ET.Element] = []
    counts = {"failure": 0, "error": 0, "skipped": 0}

    def case(classname: str, name: str, outcome: str, kind: str, message: str, body: str, out: str = "",
             err: str = "") -> None:
        tc = ET.Element("testcase", {"classname": classname, "name": _x(name), "time": "0"})
        if outcome in ("failure", "error"):
            el = ET.SubElement(tc, outcome, {"message": _x(message), "type": kind})
            el.text = _x(body)
            counts[outcome] += 1
        elif outcome == "skipped":
            ET.SubElement(tc, "skipped", {"message": _x(message)})
            counts["skipped"] += 1
        if out:
            ET.SubElement(tc, "system-out").text = _x(out)
        if err:
            ET.SubElement(tc, "system-err").text = _x(err)
        cases.append(tc)

    attribution = result.attribution.get("headline") or ""
    for m in result.metrics:
        outcome, kind = _metric_case_outcome(m, result.options.inconclusive)
        line = metric_line(m)
        body = line + (f"\n{attribution}" if outcome == "failure" and attribution else "")
        out = json.dumps(m.to_dict(), indent=1, default=str)
        if not m.gated:
            out = f"informational (not gated): {m.status}: {line}\n" + out
        case("gpudoctor.gate.metrics", f"{m.spec.name} ({m.spec.label})", outcome, kind, line, body, out=out)
    for r in result.rules:
        outcome = {"fail": "failure", "skipped": "skipped"}.get(r.status, "pass")
        body = r.message
        if r.evidence:
            body += "\nevidence: " + json.dumps(r.evidence, indent=1, default=str)[:4000]
        case("gpudoctor.gate.rules", r.name, outcome, "rule", r.message, body,
             out=json.dumps(r.findings, indent=1, default=str) if r.findings else "")
    env = "; ".join(result.mismatches)
    unfit = "; ".join(result.not_comparable)
    outcome = ("failure" if result.options.inconclusive == "fail" else "skipped") if unfit else "pass"
    case("gpudoctor.gate.environment", "same GPU model, driver, software and GPU conditions", outcome,
         "inconclusive", f"not comparable: {unfit}", f"not comparable: {unfit}", out="\n".join(result.env_notes),
         err=(f"compared despite differences (--allow-mismatch): {env}" if env else ""))
    n = len(cases)
    attrs = {"name": "gpudoctor.gate", "tests": str(n), "failures": str(counts["failure"]),
             "errors": str(counts["error"]), "skipped": str(counts["skipped"]), "time": f"{elapsed_s:.3f}",
             "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "hostname": _x(socket.gethostname())}
    suites = ET.Element("testsuites", {k: attrs[k] for k in ("name", "tests", "failures", "errors", "skipped", "time")})
    suite = ET.SubElement(suites, "testsuite", attrs)
    props = ET.SubElement(suite, "properties")
    for k, v in (("status", result.status), ("exit_code", result.exit_code),
                 ("baseline", ", ".join(r.label for r in result.baselines)),
                 ("candidate", ", ".join(r.label for r in result.candidates)),
                 ("tolerance", result.options.tolerance), ("inconclusive", result.options.inconclusive)):
        ET.SubElement(props, "property", {"name": k, "value": _x(v)})
    suite.extend(cases)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


# -- Markdown -----------------------------------------------------------------------------------------------


_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")
_ENTITY = re.compile(r"&(?=#?\w+;)")


def _md(text: object) -> str:
    """Plain Markdown text outside code spans: kept as written (``473 us -> 515 us``), except what would start
    an HTML tag or entity (kernel names are full of <...>) or break a table, which is backslash-escaped."""
    s = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("`", "'")
    return _ENTITY.sub(r"\\&", _TAG_START.sub(r"\\<", s))


def _code(text: object) -> str:
    """A code span inside a table cell."""
    return "`" + str(text).replace("`", "'").replace("|", "\\|").replace("\n", " ") + "`"


def _pval(p: float | None) -> str:
    return "n/a" if p is None or (isinstance(p, float) and not math.isfinite(p)) else f"{p:.2g}"


def _decision_cell(m: MetricResult, mode: str, undecided: bool = False) -> str:
    s = m.status
    if m.gated and undecided and s in ("regression", "improvement"):
        return f"⚠️ {s} (not decided: the runs are not comparable)"
    if not m.gated:
        return "— (not gated)" if s in ("inconclusive", "error") else f"{s} (not gated)"
    icon = {"regression": "❌", "error": "❌", "inconclusive": "⚠️" if mode != "fail" else "❌",
            "improvement": "✅", "pass": "✅"}.get(s, "")
    return f"{icon} **{s}**"


def markdown(result: GateResult) -> str:
    o = result.options
    lines = [f"## gpudoctor gate: {STATUS_ICON.get(result.status, '')} {STATUS_WORD.get(result.status, result.status)}", ""]
    for r in result.reasons[:5]:
        lines.append(f"- {_md(r)}")
    lines.append("")
    b = ", ".join(f"{_code(r.label)} ({r.steps} steps)" for r in result.baselines)
    c = ", ".join(f"{_code(r.label)} ({r.steps} steps)" for r in result.candidates)
    lines += [f"Baseline: {b}  ", f"Candidate: {c}  ",
              f"Tolerance {o.tolerance:.1%} ({o.tolerance_source}). Rules: complete separation by more than "
              f"{stats.SEPARATION_FACTOR:g} x the tolerance (from {stats.SEPARATION_MIN} steps per side); Mann-Whitney U "
              f"(alpha {o.alpha}) with the {o.confidence:.0%} interval of the ratio (from {o.min_samples} steps per "
              f"side); all pairwise ratios within the tolerance; the baseline's noise. Inconclusive → {o.inconclusive}.",
              ""]
    lines += ["| metric | baseline median | candidate median | change | CI of ratio | p | n (base/cand) | decision |",
              "|---|---:|---:|---:|---|---:|---|---|"]
    for m in result.metrics:
        d = m.decision
        ch = f"{d.change * 100:+.1f}%" if d.change is not None else "n/a"
        ci = f"[{d.ci_low:.3f}, {d.ci_high:.3f}]" if d.ci_low is not None else "n/a"
        lines.append(f"| {_md(m.spec.label)} ({_code(m.spec.name)}) | {fmt_value(d.median_baseline, m.spec.unit)} | "
                     f"{fmt_value(d.median_candidate, m.spec.unit)} | {ch} | {ci} | {_pval(d.p_value)} | "
                     f"{d.n_baseline}/{d.n_candidate} | {_decision_cell(m, o.inconclusive, bool(result.not_comparable))} |")
    lines.append("")
    a = result.attribution
    if a.get("kernels"):
        lines += ["### Where the time went (kernel time per step)", ""]
        if a.get("headline"):
            lines += [f"**{_md(a['headline'])}**", ""]
        if not a.get("complete", True):
            lines += ["_Only the top kernels of each run were known (analysis.json without the gate block)._", ""]
        lines += ["| kernel | category | baseline / step | candidate / step | change / step | calls / step |",
                  "|---|---|---:|---:|---:|---|"]
        for k in a["kernels"]:
            tag = {"new": " **(new)**", "vanished": " **(vanished)**"}.get(k["status"], "")
            lines.append(f"| {_code(short(k['name'], 80))}{tag} | {k['category']} | {_fmt_ms(k['baseline_ns_per_step'])} | "
                         f"{_fmt_ms(k['candidate_ns_per_step'])} | {_signed_ms(k['delta_ns_per_step'])} | "
                         f"{k['baseline_count_per_step']:g} → {k['candidate_count_per_step']:g} |")
        lines.append("")
        for key, head, label in (("categories", "category", lambda k: k["category"]),
                                 ("ranges", "NVTX range", lambda k: _code(short(k["text"], 80)))):
            if a.get(key):
                lines += [f"| {head} | baseline / step | candidate / step | change / step |", "|---|---:|---:|---:|"]
                lines += [f"| {label(k)} | {_fmt_ms(k['baseline_ns_per_step'])} | {_fmt_ms(k['candidate_ns_per_step'])} | "
                          f"{_signed_ms(k['delta_ns_per_step'])} |" for k in a[key]]
                lines.append("")
        for key, word in (("new", "New kernels"), ("vanished", "Vanished kernels")):
            if a.get(key):
                col = "candidate_ns_per_step" if key == "new" else "baseline_ns_per_step"
                items = ", ".join(f"{_code(short(k['name'], 60))} ({_fmt_ms(k[col])})" for k in a[key])
                more = a.get(f"{key}_count", 0) - len(a[key])
                lines += [f"{word}: {items}" + (f" and {more} more" if more > 0 else ""), ""]
    if result.rules:
        lines += ["### Rules", "", "| rule | result | detail |", "|---|---|---|"]
        for r in result.rules:
            icon = {"fail": "❌", "pass": "✅", "skipped": "⏭️"}.get(r.status, "")
            lines.append(f"| {_code(r.name)} | {icon} {r.status} | {_md(r.message)} |")
        lines.append("")
        for r in result.rules:
            if r.status == "fail" and r.evidence:
                ev = json.dumps(r.evidence, indent=1, default=str)
                if len(ev) > 3000:
                    ev = ev[:3000] + "\n…"
                lines += [f"<details><summary>Evidence for {r.name}</summary>", "", "```json", ev, "```", "", "</details>", ""]
    if result.not_comparable:
        lines += ["### Not comparable", "", "The runs did not run in comparable conditions, so a change in step time "
                  "is not attributed to the code:", ""]
        lines += [f"- {_md(x)}" for x in result.not_comparable] + [""]
    if result.mismatches:
        lines += ["### Environment", "", "Compared despite differences (`--allow-mismatch`):", ""]
        lines += [f"- {_md(x)}" for x in result.mismatches] + [""]
    if result.env_notes:
        lines += ["Minor environment differences: " + "; ".join(_md(x) for x in result.env_notes), ""]
    windows = [f"{r.label}: {w}" for r in result.baselines + result.candidates for w in r.windows]
    if windows or result.notes:
        lines += ["<details><summary>Steps and notes</summary>", ""]
        lines += [f"- {_md(w)}" for w in windows + result.notes]
        lines += ["", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


# -- GitHub Actions annotations -----------------------------------------------------------------------------


def _gh_data(s: str) -> str:
    return str(s).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_prop(s: str) -> str:
    return _gh_data(s).replace(":", "%3A").replace(",", "%2C")


def github_annotations(result: GateResult, limit: int = MAX_ANNOTATIONS) -> list[str]:
    """``::error``/``::warning``/``::notice`` workflow commands, errors first, at most ``limit``."""
    items: list[tuple[str, str, str]] = []
    head = result.attribution.get("headline") or ""
    for m in result.metrics:
        if not m.gated:
            continue
        if m.status == stats.REGRESSION:
            items.append(("error", f"gpudoctor gate: {m.spec.label} regressed", metric_line(m) + (f" — {head}" if head else "")))
        elif m.status == stats.ERROR:
            items.append(("error", f"gpudoctor gate: {m.spec.label} unavailable", metric_line(m)))
        elif m.status == stats.INCONCLUSIVE:
            level = "error" if result.options.inconclusive == "fail" else "warning"
            items.append((level, f"gpudoctor gate: {m.spec.label} inconclusive", metric_line(m)))
    for r in result.rules:
        if r.status == "fail":
            items.append(("error", f"gpudoctor gate: rule {r.name}", r.message))
        elif r.status == "skipped":
            items.append(("warning", f"gpudoctor gate: rule {r.name} not checked", r.message))
    for x in result.mismatches:
        items.append(("warning", "gpudoctor gate: environments differ", x))
    if result.status in ("pass", "improvement"):
        items.append(("notice", f"gpudoctor gate: {result.status}", result.headline))
    order = {"error": 0, "warning": 1, "notice": 2}
    items.sort(key=lambda t: order[t[0]])
    if len(items) > limit:
        rest = len(items) - (limit - 1)
        items = items[: limit - 1] + [("warning", "gpudoctor gate: more", f"{rest} more annotations left out; see the job summary")]
    return [f"::{lvl} title={_gh_prop(title)}::{_gh_data(msg)}" for lvl, title, msg in items]


# -- JSON and terminal --------------------------------------------------------------------------------------


def to_json(result: GateResult) -> str:
    return json.dumps(result.to_dict(), indent=2, default=str) + "\n"


def terminal(result: GateResult) -> str:
    lines = [f"gpudoctor gate: {STATUS_WORD.get(result.status, result.status)} (exit {result.exit_code})"]
    # A metric's verdict is printed once, in the metrics list; the header adds only the other reasons.
    shown = [metric_line(m) for m in result.metrics]
    lines += [f"  {r}" for r in result.reasons[:6] if not any(x in r for x in shown)]
    lines.append("metrics:")
    for m in result.metrics:
        d = m.decision
        if not m.gated and m.status in (stats.INCONCLUSIVE, stats.ERROR):
            # Reported, not decided: just the values.
            vals = f"{fmt_value(d.median_baseline, m.spec.unit)} -> {fmt_value(d.median_candidate, m.spec.unit)}"
            lines.append(f"  {'info':<12} {m.spec.label}: {vals} [not gated; {d.n_baseline}/{d.n_candidate} values]")
            continue
        tag = "" if m.gated else " [not gated]"
        if m.gated and result.not_comparable and m.status in (stats.REGRESSION, stats.IMPROVEMENT):
            tag = " [not decided: the runs are not comparable]"
        line = metric_line(m)
        extra = f"  p={_pval(d.p_value)}" if d.p_value is not None and " p=" not in line else ""
        lines.append(f"  {m.status:<12} {line}{extra}{tag}")
    a = result.attribution
    if a.get("kernels"):
        lines.append(f"attribution: {a.get('headline', '')}")
        for k in a["kernels"][:8]:
            tag = {"new": " (new)", "vanished": " (vanished)"}.get(k["status"], "")
            lines.append(f"  {_signed_ms(k['delta_ns_per_step']):>12}/step  {short(k['name'], 70)}{tag}")
    for r in result.rules:
        lines.append(f"rule {r.name}: {r.status}: {r.message}")
    for x in result.mismatches:
        lines.append(f"warning: environments differ (allowed): {x}")
    return "\n".join(lines) + "\n"


# -- when the gate cannot decide (input or usage error): CI still gets a report saying why --------------------


def error_junit(message: str) -> str:
    msg = message.replace("\n", " ")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<testsuites name="gpudoctor gate" tests="1" failures="0" errors="1" skipped="0" time="0">\n'
            ' <testsuite name="gpudoctor.gate" tests="1" failures="0" errors="1" skipped="0" time="0">\n'
            '  <testcase classname="gpudoctor.gate" name="inputs" time="0">\n'
            f'   <error message={quoteattr(msg)} type="input">{escape(msg)}</error>\n'
            '  </testcase>\n </testsuite>\n</testsuites>\n')


def error_markdown(message: str) -> str:
    return f"## gpudoctor gate: ❌ ERROR\n\n{message}\n"


def error_json(message: str) -> str:
    return json.dumps({"status": "error", "exit_code": 2, "reasons": [message]}, indent=2) + "\n"


def error_annotation(message: str) -> str:
    return f"::error title=gpudoctor gate::{_gh_data(message)}"
