"""gpudoctor dashboard RUN... and gpudoctor report RUN --html FILE."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gpudoctor.analyzers.config import load_config
from gpudoctor.cli.base import Command
from gpudoctor.errors import GpudoctorError, require
from gpudoctor.pipeline import analyze_inputs

if TYPE_CHECKING:
    from gpudoctor.analyzers.config import Config
    from gpudoctor.dashboards.app import Run


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    h = host.strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    try:  # a host name: loopback only if every address it resolves to is
        addrs = {ai[4][0] for ai in socket.getaddrinfo(h, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def non_loopback_warning(host: str, port: int) -> str:
    bar = "!" * 78
    return (f"{bar}\nWARNING: the gpudoctor dashboard is listening on {host}:{port}, which is NOT a loopback address.\n"
            "Anyone who can reach this machine on that port can read every profile you opened (kernel names,\n"
            "timings, file names): there is no authentication. Prefer the default --host 127.0.0.1 and an SSH\n"
            f"tunnel (ssh -L {port}:127.0.0.1:{port} HOST).\n{bar}")


def _load_ceilings(path: str | None) -> dict | None:
    """The ceilings JSON: a regular file (or - for stdin) within GPUDOCTOR_MAX_CONFIG_MB, whose rates are
    finite positive numbers."""
    if not path:
        return None
    from gpudoctor.readers.limits import read_json_file

    data = read_json_file(path, "a ceilings file", allow_stdin=True)
    if not isinstance(data, dict) or not data.get("copy_bandwidth_bytes_per_s"):
        raise GpudoctorError(f"{path}: not a ceilings file (expected the JSON of gpudoctor ceilings)")
    for key, value in data.items():
        if key.endswith("_per_s") and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                           and 0 < value < 1e30):
            raise GpudoctorError(f"{path}: ceilings {key} is {str(value)[:40]!r}, expected a positive number")
    return data


def _run_names(args: list[str]) -> list[str]:
    names = []
    for a in args:
        p = Path(a)
        n = p.name or str(p)
        for suf in (".nsys.sqlite", ".sqlite", ".torch.json.gz", ".json.gz", ".json", ".raw.csv", ".csv"):
            if n.endswith(suf) and len(n) > len(suf):
                n = n[: -len(suf)] + f" ({suf.lstrip('.').split('.')[0]})"
                break
        names.append(n)
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return out


def load_runs(paths: list[str], ceilings: dict | None = None, config: Config | dict | None = None) -> list[Run]:
    """Analyze each argument as one run. Unreadable runs are reported on stderr and skipped."""
    from gpudoctor.dashboards.app import Run

    runs, errors = [], []
    for path, name in zip(paths, _run_names(paths)):
        try:
            analysis = analyze_inputs([path], config=config, need_trace=True)
        except GpudoctorError as e:
            errors.append(str(e))
            continue
        for e in analysis.errors:
            print(f"gpudoctor: warning: {e}", file=sys.stderr)
        runs.append(Run(name=name, analysis=analysis, ceilings=ceilings))
    if not runs:
        raise GpudoctorError(errors[0] if len(errors) == 1 else "no run could be read: " + "; ".join(errors))
    for e in errors:
        print(f"gpudoctor: error: {e} (run skipped)", file=sys.stderr)
    return runs


class DashboardCommand(Command):
    name = "dashboard"
    help = "open the interactive dashboard on one or more runs"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("runs", nargs="+", metavar="RUN",
                       help="run directories or exports; each argument is one run (analyzed on its own)")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
        p.add_argument("--allow-remote", action="store_true",
                       help="confirm serving a non-loopback --host: anyone who reaches it reads every run (no authentication)")
        p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="also accept requests for this host name (the Host header); IP addresses and localhost always are")
        p.add_argument("--port", type=int, default=8050, help="port (default 8050; 0 picks a free one)")
        p.add_argument("--ceilings", metavar="JSON", help="measured ceilings (gpudoctor ceilings) for the roofline")
        p.add_argument("--config", metavar="TOML", help="gpudoctor.toml with analyzer thresholds")

    def run(self, args: argparse.Namespace) -> int:
        require("dash", "dash")
        require("plotly", "dash")
        from gpudoctor.dashboards.app import create_app

        loopback = is_loopback(args.host)
        if not loopback:  # before the (slow) analysis, and again once the port is known
            print(non_loopback_warning(args.host, args.port), file=sys.stderr)
            if not args.allow_remote:
                raise GpudoctorError(f"refusing to serve on {args.host} without --allow-remote (see the warning "
                                     "above); the default --host 127.0.0.1 needs no confirmation")
        runs = load_runs(args.runs, _load_ceilings(args.ceilings), load_config(args.config, []))
        names = list(args.allowed_host)
        if not loopback:  # the machine's own names, as remote browsers will type them
            names += [socket.gethostname(), socket.getfqdn(), args.host]
        app = create_app(runs, allowed_hosts=tuple(n for n in names if n))
        from werkzeug.serving import make_server
        try:
            srv = make_server(args.host, args.port, app.server, threaded=True)
        except (OSError, SystemExit) as e:
            raise GpudoctorError(f"cannot listen on {args.host}:{args.port}: {e}") from None
        if not loopback and args.port != srv.server_port:
            print(non_loopback_warning(args.host, srv.server_port), file=sys.stderr)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"gpudoctor dashboard: http://{host}:{srv.server_port}/ ({len(runs)} run{'s' if len(runs) != 1 else ''}; "
              "Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            srv.serve_forever()
        finally:
            srv.server_close()
        return 0


class ReportCommand(Command):
    name = "report"
    help = "write a self-contained HTML report (works offline)"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("inputs", nargs="+", metavar="RUN", help="a run directory, or exports that form one run")
        p.add_argument("--html", required=True, metavar="FILE", help="where to write the report; - for stdout")
        p.add_argument("--ceilings", metavar="JSON", help="measured ceilings (gpudoctor ceilings) for the roofline")
        p.add_argument("--config", metavar="TOML", help="gpudoctor.toml with analyzer thresholds")

    def run(self, args: argparse.Namespace) -> int:
        require("plotly", "dash")
        from gpudoctor.dashboards.report import write_report
        from gpudoctor.store.atomic import check_writable

        check_writable(args.html, "report")  # before the analysis, not after it
        ceilings = _load_ceilings(args.ceilings)
        analysis = analyze_inputs(args.inputs, config=load_config(args.config, []), need_trace=True)
        for e in analysis.errors:
            print(f"gpudoctor: warning: {e}", file=sys.stderr)
        name = _run_names([args.inputs[0]])[0] + (f" + {len(args.inputs) - 1} more" if len(args.inputs) > 1 else "")
        try:
            out = write_report(args.html, analysis, name, ceilings)
        except OSError as e:
            raise GpudoctorError(f"{args.html}: cannot write the report: {e}") from None
        if str(out) != "-":
            print(f"gpudoctor: wrote {out}", file=sys.stderr)
        return 2 if analysis.errors else 0
