"""Entry point of the ``gpudoctor`` console script."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from gpudoctor import __version__
from gpudoctor.errors import GpudoctorError

INTERNAL_ERROR = 70  # EX_SOFTWARE

# name -> "module:Class". Modules are imported only when their command runs, so a missing optional
# dependency of one command never breaks another.
COMMANDS: dict[str, tuple[str, str]] = {
    "analyze": ("gpudoctor.cli.analyze:AnalyzeCommand", "analyze existing exports or a run directory"),
    "profile": ("gpudoctor.cli.profile:ProfileCommand", "run a program under a profiler and analyze it"),
    "ceilings": ("gpudoctor.cli.ceilings:CeilingsCommand", "measure this GPU's copy bandwidth and matrix rates"),
    "gate": ("gpudoctor.cli.gate:GateCommand", "fail CI on a real performance regression"),
    "baseline": ("gpudoctor.cli.gate:BaselineCommand", "save and show gate baselines"),
    "nccl-bench": ("gpudoctor.cli.ncclbench:NcclBenchCommand", "measure NCCL collectives like nccl-tests"),
    "dashboard": ("gpudoctor.cli.dashboard:DashboardCommand", "open the interactive dashboard"),
    "report": ("gpudoctor.cli.dashboard:ReportCommand", "write a self-contained HTML report"),
}


def _load(spec: str):
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)()


def build_parser(available: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpudoctor", description="Why is my GPU program slow? With numbers.")
    parser.add_argument("--version", action="version", version=f"gpudoctor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in available.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    available = {}
    for name, (spec, _help) in COMMANDS.items():
        # Build only the command asked for (plus names for --help), so one broken import can't block others.
        wanted = not argv or argv[0] in ("-h", "--help") or argv[0] == name
        if not wanted:
            continue
        try:
            available[name] = _load(spec)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("gpudoctor.cli."):
                continue  # command not built in this version
            raise
    parser = build_parser(available)
    args = parser.parse_args(argv)
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    try:
        return int(args._command.run(args) or 0)
    except GpudoctorError as e:
        print(f"gpudoctor: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("gpudoctor: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug in gpudoctor: still one line for the user, the traceback on request
        if os.environ.get("GPUDOCTOR_DEBUG"):
            raise
        from gpudoctor import crash
        report = crash.write_report(e, f"running '{args.command}'")
        print(f"gpudoctor: internal error: {crash.one_line(e)} (a bug in gpudoctor; traceback in {report})",
              file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
