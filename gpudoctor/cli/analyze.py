"""gpudoctor analyze INPUT... : read exports or run directories, print findings."""

from __future__ import annotations

import argparse
import sys

from gpudoctor.analyzers.analysis import Analysis
from gpudoctor.analyzers.config import load_config
from gpudoctor.cli.base import Command
from gpudoctor.errors import GpudoctorError
from gpudoctor.pipeline import analyze_inputs
from gpudoctor.render import jsonout, markdown, summaries, terminal
from gpudoctor.render.terminal import make_console
from gpudoctor.store.atomic import STDOUT, atomic_write_text, check_writable


def parse_rank_map(items: list[str] | None) -> dict[str, int]:
    out = {}
    for item in items or []:
        path, sep, rank = item.rpartition("=")
        if not sep or not rank.isdigit():
            raise GpudoctorError(f"--rank expects FILE=N, got {item!r}")
        out[path] = int(rank)
    return out


def write_outputs(analysis: Analysis, json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        atomic_write_text(json_path, jsonout.render(analysis))
    if markdown_path:
        atomic_write_text(markdown_path, markdown.render(analysis))


class AnalyzeCommand(Command):
    name = "analyze"
    help = "analyze existing exports (nsys SQLite/.nsys-rep, PyTorch profiler JSON, ncu CSV, ...) or a run directory"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories; all inputs form one run")
        p.add_argument("--json", metavar="FILE", help="write the analysis as JSON (docs/json-schema.md); - for stdout")
        p.add_argument("--markdown", metavar="FILE", help="write a Markdown report; - for stdout")
        p.add_argument("--config", metavar="TOML", help="gpudoctor.toml with analyzer thresholds")
        p.add_argument("--set", action="append", metavar="ANALYZER.KEY=VALUE", default=[],
                       help="override one analyzer threshold, e.g. gpu_idle.idle_fraction_medium=0.2")
        p.add_argument("--rank", action="append", metavar="FILE=N", help="rank of an input whose rank can't be found")
        p.add_argument("--workers", type=int, metavar="N",
                       help="worker processes for many rank files (default: usable CPUs; parallel from 8 files)")
        p.add_argument("--scheduler", metavar="ADDRESS",
                       help="analyze ranks on this Dask cluster, e.g. tcp://host:8786 (needs gpudoctor[dask])")
        p.add_argument("--quiet", "-q", action="store_true", help="print nothing (with --json/--markdown)")
        p.add_argument("--no-color", action="store_true", help="plain text, no colors (also: NO_COLOR=1)")
        p.add_argument("--verbose", "-v", action="store_true", help="also show info findings")
        p.add_argument("--summary", action="append", metavar="KIND", choices=("kernels", "api", "ops", "steps", "launch"),
                       help="also print a summary table: kernels | api | ops | steps | launch (repeatable)")
        p.add_argument("--csv", metavar="DIR", help="write every summary table as DIR/<kind>.csv")

    def run(self, args: argparse.Namespace) -> int:
        if args.json == STDOUT and args.markdown == STDOUT:
            raise GpudoctorError("--json - and --markdown - would both write to standard output; pick one")
        check_writable(args.json, "JSON output")  # before the analysis, not after it
        check_writable(args.markdown, "Markdown report")
        config = load_config(args.config, args.set)
        analysis = analyze_inputs(args.inputs, config=config, rank_map=parse_rank_map(args.rank),
                                  workers=args.workers, scheduler=args.scheduler, samples=bool(args.json))
        if not args.quiet and STDOUT not in (args.json, args.markdown):  # stdout holds the JSON/Markdown then
            out = make_console(no_color=args.no_color)
            terminal.render(analysis, console=out, verbose=args.verbose)
            if args.summary:
                summaries.render(analysis, list(dict.fromkeys(args.summary)), console=out)
        errors = list(analysis.errors)
        try:
            write_outputs(analysis, args.json, args.markdown)
            if args.csv:
                summaries.write_csv(analysis, args.csv)
        except (OSError, GpudoctorError) as e:  # the findings above are printed all the same
            errors.append(f"cannot write the output: {getattr(e, 'strerror', None) or e}")
        for err in errors:  # one line each on stderr, even with --quiet; the rest was analyzed
            print(f"gpudoctor: error: {err}", file=sys.stderr)
        return 2 if errors else 0

