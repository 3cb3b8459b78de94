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
import os
import sys

from gpudoctor.cli.base import Command
from gpudoctor.errors import GpudoctorError
from gpudoctor.gate import outputs
from gpudoctor.gate.check import calibrate, gate, load_side, record_candidates
from gpudoctor.gate.compare import GateResult, fmt_value
from gpudoctor.gate.config import INCONCLUSIVE_MODES, CommandLine, analyzer_config, read_setup, user_metrics_from


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


def write_error_outputs(args: argparse.Namespace, message: str) -> None:
    """When the gate cannot decide (input or usage error), CI still gets a report saying why."""
    if getattr(args, "junit", None):
        _write(args.junit, outputs.error_junit(message))
    md = outputs.error_markdown(message)
    if getattr(args, "markdown", None):
        _write(args.markdown, md)
    if getattr(args, "json", None):
        _write(args.json, outputs.error_json(message))
    if getattr(args, "github", False):
        print(outputs.error_annotation(message))
        _append_step_summary(md)


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

    def _compare(self, args: argparse.Namespace) -> tuple[GateResult, float]:
        if args.candidate_cmd:
            args.candidate = list(args.candidate) + record_candidates(args.candidate_cmd, args.repeat,
                                                                      args.profile_args, args.runs_dir, args.quiet)
        return gate(args.baseline, args.candidate, args.config, CommandLine.from_args(args), args.baseline_dir)

    def calibrate(self, args: argparse.Namespace) -> int:
        from gpudoctor.gate.run import METRICS

        cal = calibrate(args.runs or args.baseline, args.config, CommandLine.from_args(args), args.baseline_dir)
        doc = cal.to_dict()
        if args.json:
            _write(args.json, json.dumps(doc, indent=2) + "\n")
        if not args.quiet:
            print(f"calibration from {len(cal.runs)} runs ({cal.method}):")
            for m, c in cal.metrics.items():
                unit = METRICS[m].unit if m in METRICS else ""
                med = ", ".join(fmt_value(x, unit) for x in c.get("medians", []))
                spread = f"{c['spread']:.2%}" if c.get("spread") is not None else "n/a"
                t = f"{c['tolerance']:.1%}" if c.get("tolerance") else "n/a"
                lines = f"  {m:<12} run medians [{med}]  spread {spread}  -> tolerance {t}"
                print(lines + ("" if m in cal.gated else "  (not gated)"))
            if cal.suggested_tolerance is not None:
                print(f"\nput in gpudoctor.toml:\n[gate]\ntolerance = {cal.suggested_tolerance:g}")
            if len(cal.runs) < 3:
                print("note: 2 runs give a rough spread; 3 or more are recommended")
        return 0 if cal.suggested_tolerance is not None else 2


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
            setup = read_setup(args.config, args.dir)
            runs = load_side(args.runs, setup.analyzers, user_metrics_from(setup.table), "", setup.baseline_dir, [])
            path = baselines.save(args.name, runs, setup.baseline_dir, allow_mismatch=args.allow_mismatch)
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

    def record(self, args: argparse.Namespace) -> int:
        from gpudoctor.gate import history

        for run in load_side(args.runs, analyzer_config(None), [], "", args.dir, []):
            path = history.record(args.name, run, args.dir, commit=args.commit)
            print(f"recorded {run.label} in {path}")
        return 0

    def history(self, args: argparse.Namespace) -> int:
        from gpudoctor.gate import history

        path = history.find(args.name, args.gpu, args.dir)
        entries, skipped = history.load(path)
        tol = args.tolerance if args.tolerance is not None else 0.03
        res = history.analyze(entries, tolerance=tol)
        res["path"], res["skipped_lines"] = str(path), skipped
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        print(f"{args.name} ({path.parent.name}): {res['runs']} recorded runs, GPU time per step "
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
