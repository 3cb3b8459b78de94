"""Python programs: recognise ``python [OPTS] (script | -m module | -c code) ARGS`` and run it under the
in-process agent (``gpudoctor.collect.agent``), which runs it exactly as ``python`` would and opens and
closes the capture window at the program's step boundaries. Used by the torch backend (torch.profiler
in the program's process) and by the nsys backend (cudaProfilerStart/Stop for Nsight Systems).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import gpudoctor

# ---------------------------------------------------------------------------------------------------
# Parent side: is the command a Python program, and how to run it under this module

_PYTHON = re.compile(r"^python(\d+(\.\d+)*)?[a-z]?$")
_OPTS_WITH_VALUE = {"-X", "-W", "--check-hash-based-pycs"}


@dataclass
class PyProgram:
    interpreter: str  # as given (python3, /opt/venv/bin/python, ...)
    interpreter_options: list[str]  # -u, -O, -X dev, -W error, ...
    mode: str  # "script" | "module" | "code"
    target: str  # script path, module name or code
    args: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A short program name for the run directory: the script's stem or the module name."""
        if self.mode == "script":
            return os.path.splitext(os.path.basename(self.target.rstrip("/")))[0] or "python"
        if self.mode == "module":
            return self.target
        return "python-c"

    def program_args(self) -> list[str]:
        if self.mode == "script":
            return [self.target, *self.args]
        return ["-m" if self.mode == "module" else "-c", self.target, *self.args]


class NotPython(ValueError):
    """The command is not ``python ... script|-m module|-c code``; the message says why."""


def parse_python_command(cmd: list[str]) -> PyProgram:
    """Split ``python [OPTS] (script | -m mod | -c code) ARGS``; raise NotPython otherwise."""
    if not cmd:
        raise NotPython("no command")
    if not _PYTHON.match(os.path.basename(cmd[0])):
        raise NotPython(f"the command starts with {os.path.basename(cmd[0])!r}, not python")
    opts: list[str] = []
    i = 1
    while i < len(cmd):
        a = cmd[i]
        if a in ("-m", "-c"):
            if i + 1 >= len(cmd):
                raise NotPython(f"python {a} needs an argument")
            return PyProgram(cmd[0], opts, "module" if a == "-m" else "code", cmd[i + 1], cmd[i + 2:])
        if a.startswith("-m") and len(a) > 2:
            return PyProgram(cmd[0], opts, "module", a[2:], cmd[i + 1:])
        if a.startswith("-c") and len(a) > 2:
            return PyProgram(cmd[0], opts, "code", a[2:], cmd[i + 1:])
        if a == "-":
            raise NotPython("a program read from stdin cannot be profiled in-process")
        if a == "--":
            i += 1
            break
        if a in _OPTS_WITH_VALUE:
            opts += cmd[i:i + 2]
            i += 2
            continue
        if a.startswith("-") and len(a) > 1:
            if a in ("-h", "--help", "-V", "--version", "-i"):
                raise NotPython(f"python {a} runs no program")
            opts.append(a)
            i += 1
            continue
        break
    if i >= len(cmd):
        raise NotPython("python is given no script, -m module or -c code")
    return PyProgram(cmd[0], opts, "script", cmd[i], cmd[i + 1:])


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(gpudoctor.__file__)))


def resolve_interpreter(prog: PyProgram, env: dict) -> str | None:
    exe = prog.interpreter
    if os.sep in exe:
        return exe if os.access(exe, os.X_OK) else None
    return shutil.which(exe, path=env.get("PATH", os.defpath))


def _same_environment(exe: str) -> bool:
    try:
        return os.path.samefile(os.path.dirname(exe), os.path.dirname(sys.executable))
    except OSError:
        return False


_PROBE = ("import importlib.util as u, json; "
          "print(json.dumps({'torch': u.find_spec('torch') is not None, "
          "'gpudoctor': u.find_spec('gpudoctor') is not None and "
          "u.find_spec('gpudoctor.collect.torch_backend') is not None}))")


def probe_interpreter(exe: str, env: dict, timeout: float = 60.0) -> dict:
    """{"torch": bool, "gpudoctor": bool} for the program's interpreter (no import of torch itself)."""
    if _same_environment(exe):
        import importlib.util

        return {"torch": importlib.util.find_spec("torch") is not None, "gpudoctor": True, "same": True}
    try:
        p = subprocess.run([exe, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL)
        out = json.loads(p.stdout.strip().splitlines()[-1])
        return {"torch": bool(out.get("torch")), "gpudoctor": bool(out.get("gpudoctor")), "same": False}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return {"torch": False, "gpudoctor": False, "same": False, "error": f"{exe} could not be probed"}


def child_command(prog: PyProgram, exe: str, mode: str, status_path: str, window: dict,
                  trace_path: str | None = None, stacks: bool = False, pysamples: str | None = None) -> list[str]:
    """The program's own interpreter running it under ``gpudoctor.collect.agent`` (mode "torch" or "cuda")."""
    cmd = [exe, *prog.interpreter_options, "-m", "gpudoctor.collect.agent", "--mode", mode,
           "--status", status_path, "--window", json.dumps(window, separators=(",", ":"))]
    if trace_path:
        cmd += ["--trace", trace_path]
    if stacks:
        cmd.append("--stacks")
    if pysamples:
        cmd += ["--pysamples", pysamples]
    return cmd + ["--", *prog.program_args()]


def child_env(env: dict, probe: dict, shim_dir: str | None) -> dict:
    """The child's environment: when its interpreter cannot import gpudoctor, a folder holding only a
    link to this checkout's package is put first on PYTHONPATH (nothing else of this environment leaks)."""
    env = dict(env)
    if not probe.get("gpudoctor") and shim_dir:
        link = os.path.join(shim_dir, "gpudoctor")
        if not os.path.exists(link):
            os.symlink(os.path.join(_package_root(), "gpudoctor"), link)
        env["PYTHONPATH"] = shim_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
