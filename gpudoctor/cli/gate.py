"""gpudoctor gate / gpudoctor baseline: fail CI on a real performance regression (docs/ci.md).

    gpudoctor gate --baseline A [A2 ...] --candidate B [B2 ...] [--tolerance 0.03] [--junit F] [--github]
    gpudoctor gate calibrate --runs R1 R2 R3
    gpudoctor baseline save NAME RUN [RUN ...] [--dir DIR]
    gpudoctor baseline show [NAME] [--dir DIR]

Exit codes: 0 pass or improvement, 1 regression or a broken rule, 2 usage or input error (also: runs from
different GPU models, drivers or major software versions), 3 inconclusive (--inconclusive pass|fail|exit3).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from gpudoctor.analyzers.config import Config, load_config
from gpudoctor.cli.base import Command
from gpudoctor.errors import GpudoctorError
from gpudoctor.gate.rules import KNOWN_ANALYZERS

GATE_KEYS = {"tolerance", "tolerances", "min_steps", "alpha", "confidence", "bootstrap", "seed", "inconclusive",
             "metrics", "user_metrics", "baseline_dir", "top"}
INCONCLUSIVE_MODES = ("pass", "fail", "exit3")


# -- config ---------------------------------------------------------------------------------------------------


def _config_path(path: str | None) -> Path | None:
    if path:
        return Path(path)
    p = Path("gpudoctor.toml")
    return p if p.is_file() else None


def read_gate_config(path: str | None) -> dict:
    """The [gate] table of gpudoctor.toml (validated; unknown keys are an error)."""
    from gpudoctor.gate.rules import RULE_KEYS

    p = _config_path(path)
    if p is None:
        return {}
    from gpudoctor.analyzers.config import read_toml

    data = read_toml(p)
    gate = data.get("gate", {})
    if not isinstance(gate, dict):
        raise GpudoctorError(f"{p}: [gate] must be a table")
    unknown = set(gate) - GATE_KEYS - set(RULE_KEYS)
    if unknown:
        raise GpudoctorError(f"{p}: unknown [gate] keys {sorted(unknown)} (known: {', '.join(sorted(GATE_KEYS | set(RULE_KEYS)))})")
    return gate


def _num(cfg: dict, key: str, kind=float, lo=None, hi=None):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise GpudoctorError(f"gate.{key} must be a number, not {v!r}")
    if kind is int and not float(v).is_integer():
        raise GpudoctorError(f"gate.{key} must be a whole number, not {v!r}")
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise GpudoctorError(f"gate.{key} = {v} is out of range [{lo}, {hi}]")
    return v


def user_metrics_from(cfg: dict) -> list:
    from gpudoctor.gate.run import METRICS, UserMetric

    out = []
    table = cfg.get("user_metrics") or {}
    if not isinstance(table, dict):
        raise GpudoctorError("gate.user_metrics must be a table of tables: [gate.user_metrics.tokens_per_s]")
    for name, spec in table.items():
        if name in METRICS:
            raise GpudoctorError(f"gate.user_metrics.{name}: the name is taken by a built-in metric")
        if not isinstance(spec, dict) or not isinstance(spec.get("regex"), str):
            raise GpudoctorError(f"gate.user_metrics.{name} needs regex = '...' (one capture group: the number)")
        extra = set(spec) - {"regex", "higher_is_better", "unit", "files", "gate", "label"}
        if extra:
            raise GpudoctorError(f"gate.user_metrics.{name}: unknown keys {sorted(extra)}")
        kw = {k: spec[k] for k in ("higher_is_better", "unit", "gate", "label") if k in spec}
        if "files" in spec:
            files = spec["files"]
            kw["files"] = tuple([files] if isinstance(files, str) else files)
        out.append(UserMetric(name=name, regex=spec["regex"], **kw))
    return out


def build_options(args, cfg: dict, baseline_tolerances: dict | None = None):
    """GateOptions from (later wins) defaults < calibrated baseline < gpudoctor.toml [gate] < command line."""
    from gpudoctor.gate.compare import GateOptions
    from gpudoctor.gate.rules import validate_rules

    o = GateOptions()
    for metric, tol in (baseline_tolerances or {}).items():
        o.tolerances[metric] = tol
    if "gpu_time" in (baseline_tolerances or {}):
        o.tolerance, o.tolerance_source = baseline_tolerances["gpu_time"], "calibrated baseline"
    if "tolerance" in cfg:
        o.tolerance, o.tolerance_source = _num(cfg, "tolerance", float, 0.0, 10.0), "gpudoctor.toml"
        o.tolerances = {}
    if "tolerances" in cfg:
        if not isinstance(cfg["tolerances"], dict):
            raise GpudoctorError("gate.tolerances must be a table: metric = relative tolerance")
        for k in cfg["tolerances"]:
            o.tolerances[k] = _num(cfg["tolerances"], k, float, 0.0, 10.0)
    if "min_steps" in cfg:
        o.min_samples = _num(cfg, "min_steps", int, 2, None)
    if "alpha" in cfg:
        o.alpha = _num(cfg, "alpha", float, 1e-9, 0.5)
    if "confidence" in cfg:
        o.confidence = _num(cfg, "confidence", float, 0.5, 0.9999)
    if "bootstrap" in cfg:
        o.bootstrap = _num(cfg, "bootstrap", int, 100, 1_000_000)
    if "seed" in cfg:
        o.seed = _num(cfg, "seed", int, 0, None)
    if "top" in cfg:
        o.top = _num(cfg, "top", int, 1, 1000)
    if "inconclusive" in cfg:
        if cfg["inconclusive"] not in INCONCLUSIVE_MODES:
            raise GpudoctorError(f"gate.inconclusive must be one of {', '.join(INCONCLUSIVE_MODES)}")
        o.inconclusive = cfg["inconclusive"]
    if "metrics" in cfg:
        m = cfg["metrics"]
        if not isinstance(m, list) or not all(isinstance(x, str) for x in m):
            raise GpudoctorError("gate.metrics must be a list of metric names")
        o.gated = tuple(m)
    o.user_metrics = user_metrics_from(cfg)
    o.rules = validate_rules({k: v for k, v in cfg.items() if k in ("fail_on", "fail_on_severity", "max_idle_fraction",
                                                                     "max_exposed_comm_fraction", "min_mbu")},
                             known_analyzers=KNOWN_ANALYZERS)
    # command line
    if getattr(args, "tolerance", None) is not None:
        if not (0 <= args.tolerance <= 10):
            raise GpudoctorError("--tolerance is a relative change, e.g. 0.03 for 3%")
        o.tolerance, o.tolerance_source, o.tolerances = args.tolerance, "--tolerance", {}
    if getattr(args, "inconclusive", None):
        o.inconclusive = args.inconclusive
    if getattr(args, "min_steps", None) is not None:
        if args.min_steps < 2:
            raise GpudoctorError("--min-steps must be at least 2")
        o.min_samples = args.min_steps
    if getattr(args, "metrics", None):
        o.gated = tuple(x.strip() for x in args.metrics.split(",") if x.strip())
    if getattr(args, "allow_mismatch", False):
        o.allow_mismatch = True
    return o


def analyzer_config(path: str | None) -> Config:
    return load_config(path, [])


# -- outputs --------------------------------------------------------------------------------------------------


def _write(path: str, text: str) -> None:
    from gpudoctor.store.atomic import atomic_write_text

    atomic_write_text(path, text)


def _append_step_summary(text: str) -> None:
    p = os.environ.get("GITHUB_STEP_SUMMARY")
    if p:
        try:
            with open(p, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            print(f"gpudoctor: warning: cannot write $GITHUB_STEP_SUMMARY: {e}", file=sys.stderr)


def write_error_outputs(args, message: str) -> None:
    """When the gate cannot decide (input or usage error), CI still gets a report saying why."""
    from xml.sax.saxutils import escape, quoteattr

    if getattr(args, "junit", None):
        msg = message.replace("\n", " ")
        _write(args.junit, '<?xml version="1.0" encoding="UTF-8"?>\n'
               '<testsuites name="gpudoctor gate" tests="1" failures="0" errors="1" skipped="0" time="0">\n'
               ' <testsuite name="gpudoctor.gate" tests="1" failures="0" errors="1" skipped="0" time="0">\n'
               f'  <testcase classname="gpudoctor.gate" name="inputs" time="0">\n'
               f'   <error message={quoteattr(msg)} type="input">{escape(msg)}</error>\n'
               '  </testcase>\n </testsuite>\n</testsuites>\n')
    md = f"## gpudoctor gate: ❌ ERROR\n\n{message}\n"
    if getattr(args, "markdown", None):
        _write(args.markdown, md)
    if getattr(args, "json", None):
        _write(args.json, json.dumps({"status": "error", "exit_code": 2, "reasons": [message]}, indent=2) + "\n")
    if getattr(args, "github", False):
        from gpudoctor.gate.outputs import _gh_data
        print(f"::error title=gpudoctor gate::{_gh_data(message)}")
        _append_step_summary(md)


# -- commands -------------------------------------------------------------------------------------------------


def _load_side(specs: list[str], acfg, user_metrics, gpu_for_names: str, baseline_directory, docs: list) -> list:
    from gpudoctor.gate import baselines
    from gpudoctor.gate.inputs import load_run

    runs = []
    for s in specs:
        if s.startswith("@"):
            rs, doc, _path = baselines.load(s[1:], gpu_for_names, baseline_directory)
            docs.append(doc)
            runs.extend(rs)
        else:
            runs.append(load_run(s, acfg, user_metrics))
    return runs


def record_candidates(args) -> list[str]:
    """Run --candidate-cmd under gpudoctor profile --repeat times; the run directories."""
    import shlex
    import subprocess

    if args.repeat < 1 or args.repeat > 100:
        raise GpudoctorError("--repeat must be between 1 and 100")
    cmd = shlex.split(args.candidate_cmd)
    if not cmd:
        raise GpudoctorError("--candidate-cmd is empty")
    root = Path(args.runs_dir or Path("gpudoctor-runs") / time.strftime("gate-%Y%m%dT%H%M%SZ", time.gmtime()))
    out = []
    for i in range(1, args.repeat + 1):
        run_dir = root / f"candidate_{i}"
        argv = [sys.executable, "-m", "gpudoctor", "profile", "-o", str(run_dir), *shlex.split(args.profile_args),
                "--", *cmd]
        rc = subprocess.run(argv, stdout=sys.stderr if not args.quiet else subprocess.DEVNULL).returncode
        if rc != 0 or not (run_dir / "manifest.json").is_file():
            raise GpudoctorError(f"candidate command failed (exit {rc}) on run {i} of {args.repeat}: {shlex.join(cmd)}")
        out.append(str(run_dir))
    return out


class GateCommand(Command):
    name = "gate"
    help = "compare a candidate run against a baseline; exit 1 on a real performance regression"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.description = ("Compare candidate run(s) against baseline run(s): per-step GPU time with a tolerance, a "
                         "Mann-Whitney U test and a bootstrap CI of the median ratio; attribute the change to "
                         "kernels; check rules on findings. Exit 0 pass/improvement, 1 regression or broken rule, "
                         "2 usage/input error, 3 inconclusive. See docs/ci.md.")
        p.add_argument("action", nargs="?", choices=["calibrate"],
                       help="calibrate: derive a tolerance from repeated runs of the same program (--runs)")
        p.add_argument("--baseline", nargs="+", metavar="RUN", default=[],
                       help="baseline run(s): run directory, analysis.json, trace file (a,b for several files of one "
                            "run), or @NAME for a saved baseline")
        p.add_argument("--candidate", nargs="+", metavar="RUN", default=[], help="candidate run(s), same forms")
        p.add_argument("--runs", nargs="+", metavar="RUN", default=[], help="with calibrate: repeated baseline runs")
        p.add_argument("--candidate-cmd", metavar="'CMD'",
                       help="record the candidate: run CMD under `gpudoctor profile` (--repeat times) and compare those runs")
        p.add_argument("--repeat", type=int, default=1, metavar="N", help="with --candidate-cmd: how many runs (default 1)")
        p.add_argument("--profile-args", default="", metavar="'ARGS'",
                       help="with --candidate-cmd: options for gpudoctor profile, e.g. '--backend nsys'")
        p.add_argument("--runs-dir", metavar="DIR",
                       help="with --candidate-cmd: where the runs go (default gpudoctor-runs/gate-<UTC time>)")
        p.add_argument("--calibrate", action="store_true", help="same as the calibrate action")
        p.add_argument("--config", metavar="TOML", help="gpudoctor.toml ([gate] table; default ./gpudoctor.toml)")
        p.add_argument("--tolerance", type=float, metavar="FRAC", help="relative tolerance, e.g. 0.03 (default 0.03)")
        p.add_argument("--inconclusive", choices=INCONCLUSIVE_MODES,
                       help="exit code when inconclusive: pass (0), fail (1) or exit3 (3, the default)")
        p.add_argument("--min-steps", type=int, metavar="N", help="fewest steady steps per side to decide (default 5)")
        p.add_argument("--metrics", metavar="LIST", help="comma-separated metrics that decide (default gpu_time)")
        p.add_argument("--allow-mismatch", action="store_true",
                       help="compare runs from different GPU models, drivers or software versions anyway")
        p.add_argument("--baseline-dir", metavar="DIR", help="where @NAME baselines live (default .gpudoctor/baselines)")
        p.add_argument("--junit", metavar="FILE", help="write JUnit XML (one testcase per metric and rule)")
        p.add_argument("--markdown", metavar="FILE", help="write a Markdown summary")
        p.add_argument("--json", metavar="FILE", help="write the full result as JSON")
        p.add_argument("--github", action="store_true",
                       help="print GitHub Actions annotations (at most 10) and append to $GITHUB_STEP_SUMMARY")
        p.add_argument("--quiet", "-q", action="store_true", help="print nothing but annotations")

    def run(self, args: argparse.Namespace) -> int:
        if args.action == "calibrate" or args.calibrate:
            return self.calibrate(args)
        try:
            result, elapsed = self._compare(args)
        except GpudoctorError as e:
            write_error_outputs(args, str(e))
            raise
        except Exception as e:  # a defect: CI still gets a report saying what broke
            write_error_outputs(args, f"internal error: {type(e).__name__}: {e}")
            raise
        from gpudoctor.gate import outputs

        if args.junit:
            _write(args.junit, outputs.junit_xml(result, elapsed))
        md = outputs.markdown(result) if (args.markdown or args.github) else ""
        if args.markdown:
            _write(args.markdown, md)
        if args.json:
            _write(args.json, outputs.to_json(result))
        if args.github:
            for line in outputs.github_annotations(result):
                print(line)
            _append_step_summary(md)
        if not args.quiet:
            print(outputs.terminal(result), end="")
        return result.exit_code

    def _compare(self, args):
        from gpudoctor.gate.baselines import calibrated_tolerances
        from gpudoctor.gate.compare import compare

        if args.candidate_cmd:
            args.candidate = list(args.candidate) + record_candidates(args)
        if not args.baseline or not args.candidate:
            raise GpudoctorError("gate needs --baseline RUN... and --candidate RUN... or --candidate-cmd 'CMD' "
                                 "(or: gate calibrate --runs ...)")
        t0 = time.monotonic()
        cfg = read_gate_config(args.config)
        o = build_options(args, cfg)
        acfg = analyzer_config(args.config)
        bdir = args.baseline_dir or cfg.get("baseline_dir")
        cands = _load_side(args.candidate, acfg, o.user_metrics, "", bdir, [])
        docs: list = []
        bases = _load_side(args.baseline, acfg, o.user_metrics, cands[0].gpu_name, bdir, docs)
        if docs and len(docs) == 1:
            cal = calibrated_tolerances(docs[0])
            if cal:
                o = build_options(args, cfg, cal)
        return compare(bases, cands, o), time.monotonic() - t0

    def calibrate(self, args) -> int:
        from gpudoctor.gate.baselines import calibration
        from gpudoctor.gate.environment import check_environment
        from gpudoctor.gate.run import METRICS

        specs = args.runs or args.baseline
        if len(specs) < 2:
            raise GpudoctorError("calibrate needs at least 2 runs of the same program (3 or more recommended): "
                                 "gpudoctor gate calibrate --runs R1 R2 R3")
        cfg = read_gate_config(args.config)
        o = build_options(args, cfg)
        acfg = analyzer_config(args.config)
        bdir = args.baseline_dir or cfg.get("baseline_dir")
        runs = _load_side(specs, acfg, o.user_metrics, "", bdir, [])
        hard, _ = check_environment(runs[:1], runs[1:])
        if hard and not args.allow_mismatch:
            raise GpudoctorError("refusing to calibrate on runs from different environments: " + "; ".join(hard)
                                 + " (pass --allow-mismatch to anyway)")
        step_metrics = [m for m, s in METRICS.items() if s.per == "step"] + [u.name for u in o.user_metrics]
        cal = calibration(runs, [m for m in step_metrics if any(r.samples.get(m) for r in runs)])
        gated = list(o.gated) + [u.name for u in o.user_metrics if u.gate]
        tol = [c["tolerance"] for m, c in cal.items() if m in gated and c.get("tolerance")]
        doc = {"runs": [r.label for r in runs], "metrics": cal,
               "suggested_tolerance": max(tol) if tol else None,
               "method": "tolerance = max(3 x (std of per-run medians / their mean), 1%), rounded up to 0.1%"}
        if args.json:
            _write(args.json, json.dumps(doc, indent=2) + "\n")
        if not args.quiet:
            from gpudoctor.gate.compare import fmt_value
            print(f"calibration from {len(runs)} runs ({doc['method']}):")
            for m, c in cal.items():
                unit = METRICS[m].unit if m in METRICS else ""
                med = ", ".join(fmt_value(x, unit) for x in c.get("medians", []))
                spread = f"{c['spread']:.2%}" if c.get("spread") is not None else "n/a"
                t = f"{c['tolerance']:.1%}" if c.get("tolerance") else "n/a"
                lines = f"  {m:<12} run medians [{med}]  spread {spread}  -> tolerance {t}"
                print(lines + ("" if m in gated else "  (not gated)"))
            if doc["suggested_tolerance"] is not None:
                print(f"\nput in gpudoctor.toml:\n[gate]\ntolerance = {doc['suggested_tolerance']:g}")
            if len(runs) < 3:
                print("note: 2 runs give a rough spread; 3 or more are recommended")
        return 0 if doc["suggested_tolerance"] is not None else 2


class BaselineCommand(Command):
    name = "baseline"
    help = "save and show gate baselines (keyed by name and GPU model)"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="baseline_action", metavar="ACTION")
        s = sub.add_parser("save", help="save run(s) as baseline NAME for their GPU model")
        s.add_argument("name", metavar="NAME")
        s.add_argument("runs", nargs="+", metavar="RUN", help="run directory, analysis.json or trace (several: calibrated)")
        s.add_argument("--dir", metavar="DIR", help="baseline directory (default $GPUDOCTOR_BASELINE_DIR or .gpudoctor/baselines)")
        s.add_argument("--config", metavar="TOML", help="gpudoctor.toml (user metrics, analyzer thresholds)")
        s.add_argument("--allow-mismatch", action="store_true", help="save runs from different environments together")
        sh = sub.add_parser("show", help="list baselines, or show one")
        sh.add_argument("name", nargs="?", metavar="NAME")
        sh.add_argument("--dir", metavar="DIR", help="baseline directory")
        sh.add_argument("--json", action="store_true", help="print JSON")
        rec = sub.add_parser("record", help="append run(s) to the result history of NAME for their GPU model")
        rec.add_argument("name", metavar="NAME")
        rec.add_argument("runs", nargs="+", metavar="RUN", help="run directory, analysis.json or trace")
        rec.add_argument("--commit", default=os.environ.get("GITHUB_SHA", ""), help="the commit (default $GITHUB_SHA)")
        rec.add_argument("--dir", metavar="DIR", help="baseline directory")
        hi = sub.add_parser("history", help="the result history of NAME: change points and slow drift")
        hi.add_argument("name", metavar="NAME")
        hi.add_argument("--gpu", default="", metavar="MODEL", help="GPU model (default: the only one recorded)")
        hi.add_argument("--tolerance", type=float, default=None, metavar="FRAC", help="smallest change reported (default 0.03)")
        hi.add_argument("--dir", metavar="DIR", help="baseline directory")
        hi.add_argument("--json", action="store_true", help="print JSON")

    def run(self, args: argparse.Namespace) -> int:
        from gpudoctor.gate import baselines

        action = getattr(args, "baseline_action", None)
        if action == "save":
            cfg = read_gate_config(args.config)
            ums = user_metrics_from(cfg)
            acfg = analyzer_config(args.config)
            runs = _load_side(args.runs, acfg, ums, "", args.dir or cfg.get("baseline_dir"), [])
            path = baselines.save(args.name, runs, args.dir or cfg.get("baseline_dir"), allow_mismatch=args.allow_mismatch)
            doc = json.loads(path.read_text())
            s = baselines.summary(path, doc)
            print(f"saved baseline {args.name!r} for {s['hardware'] or 'unknown GPU'}: {s['runs']} run(s), "
                  f"{s['steps']} steady steps -> {path}")
            if s["calibrated_tolerances"]:
                print("calibrated tolerances: " + ", ".join(f"{k} {v:.1%}" for k, v in s["calibrated_tolerances"].items()))
            elif len(runs) >= 2:
                print(f"(calibrated tolerances are applied from {baselines.MIN_CALIBRATION_RUNS} runs on)")
            return 0
        if action == "show":
            found, unreadable = baselines.scan(args.dir)
            for line in unreadable:
                print(f"gpudoctor: warning: skipped {line}", file=sys.stderr)
            items = [(p, d) for p, d in found if not args.name or d.get("name") == args.name]
            if args.name and not items:
                raise GpudoctorError(f"no baseline {args.name!r} in {baselines.baseline_dir(args.dir)}")
            sums = [baselines.summary(p, d) for p, d in items]
            if args.json:
                print(json.dumps(sums, indent=2))
                return 0
            if not sums:
                print(f"no baselines in {baselines.baseline_dir(args.dir)}")
                return 0
            from gpudoctor.gate.compare import fmt_value
            for s in sums:
                med = fmt_value(s["median_gpu_time_ns"], "ns") if s["median_gpu_time_ns"] is not None else "n/a"
                print(f"{s['name']:<20} {s['hardware'] or 'unknown GPU':<28} {s['runs']} run(s) {s['steps']:>5} steps  "
                      f"GPU time/step {med:>9}  saved {s['saved_at']}")
                if args.name:
                    print(f"  file: {s['path']}")
                    print(f"  from: {', '.join(map(str, s['sources']))}")
                    print(f"  environment: {json.dumps(s['env'])}")
                    if s["calibrated_tolerances"]:
                        print("  calibrated tolerances: " + ", ".join(f"{k} {v:.1%}" for k, v in s["calibrated_tolerances"].items()))
            return 0
        if action == "record":
            return self.record(args)
        if action == "history":
            return self.history(args)
        raise GpudoctorError("usage: gpudoctor baseline save NAME RUN... | show [NAME] | record NAME RUN... | "
                             "history NAME")

    def record(self, args) -> int:
        from gpudoctor.gate import history

        for run in _load_side(args.runs, analyzer_config(None), [], "", args.dir, []):
            path = history.record(args.name, run, args.dir, commit=args.commit)
            print(f"recorded {run.label} in {path}")
        return 0

    def history(self, args) -> int:
        from gpudoctor.gate import baselines, history
        from gpudoctor.gate.compare import fmt_value

        root = baselines.baseline_dir(args.dir)
        found = sorted(root.glob(f"*/{baselines.check_name(args.name)}.history.jsonl")) if root.is_dir() else []
        if args.gpu:
            found = [p for p in found if p.parent.name == baselines.hardware_key(args.gpu)]
        if not found:
            raise GpudoctorError(f"no history for {args.name!r} in {root} (record one: gpudoctor baseline record "
                                 f"{args.name} RUN)")
        if len(found) > 1:
            raise GpudoctorError(f"{args.name!r} has histories for several GPU models "
                                 f"({', '.join(p.parent.name for p in found)}): pick one with --gpu")
        entries, skipped = history.load(found[0])
        tol = args.tolerance if args.tolerance is not None else 0.03
        res = history.analyze(entries, tolerance=tol)
        res["path"], res["skipped_lines"] = str(found[0]), skipped
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        print(f"{args.name} ({found[0].parent.name}): {res['runs']} recorded runs, GPU time per step "
              + " ".join(fmt_value(x, "ns") for x in res["medians"][-12:]) + (" ..." if res["runs"] > 12 else ""))
        if skipped:
            print(f"warning: {skipped} unreadable line(s) skipped")
        for p in res["change_points"]:
            print(f"change point at run {p['index'] + 1} ({p['label']}{' ' + p['commit'][:10] if p['commit'] else ''}): "
                  f"{fmt_value(p['median_before'], 'ns')} -> {fmt_value(p['median_after'], 'ns')} "
                  f"({p['change']:+.1%}, Mann-Whitney p={p['p_value']:.2g})")
        d = res["drift"]
        if d and d["detected"]:
            print(f"drift: {d['total_change']:+.1%} over {d['runs']} runs ({d['slope_per_run']:+.2%} per run, "
                  f"{stats_ci(d)})")
        worse = any(p["change"] > 0 for p in res["change_points"]) or bool(d and d["detected"] and d["total_change"] > 0)
        if not res["change_points"] and not (d and d["detected"]):
            print(f"no change beyond {tol:.1%} in the series")
        return 1 if worse else 0  # GPU time per step: up is worse


def stats_ci(d: dict) -> str:
    lo, hi = d["slope_ci"]
    return f"95% CI of the slope [{lo:+.2%}, {hi:+.2%}] per run"
