"""The torch backend: run a Python program in-process under torch.profiler.

``gpudoctor profile --backend torch -- python [OPTS] train.py ARGS`` starts a child interpreter (the
program's own ``python``) as ``python [OPTS] -m gpudoctor.collect.torch_backend --trace T --status S --
train.py ARGS``. That child starts the profiler (CPU activities, plus CUDA when a GPU is available;
``record_shapes``), runs the program with ``runpy`` exactly as ``python`` would (``sys.argv``,
``sys.path[0]``, ``__main__``; ``-m module`` and ``-c code`` too), and whatever way the program ends
-- returning, ``sys.exit(n)``, an exception, ``os._exit(n)``, SIGINT, SIGTERM or SIGHUP -- it stops the
profiler, writes the Chrome trace (gzipped) and a small JSON status, and exits with the program's code
(1 for an uncaught exception, whose traceback is printed as Python prints it; 128+N for signal N).
Only a hard crash (SIGKILL, a segfault) loses the trace: the supervising ``gpudoctor profile`` process
still records what happened.

Steps: ``gpudoctor.annotate.step()`` calls ``prof.step()`` here, which writes ``ProfilerStep#N``
ranges. ``--delay``/``--duration`` open and close the profiling window at step boundaries when the
program marks steps, else on a timer (the window is then not step-aligned). Without them the whole run
is recorded.

This module runs inside the profiled program's interpreter: it imports only the standard library,
torch and ``gpudoctor.annotate``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

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
    import gpudoctor

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


def child_command(prog: PyProgram, exe: str, trace_path: str, status_path: str, delay_s: float | None = None,
                  duration_s: float | None = None) -> list[str]:
    cmd = [exe, *prog.interpreter_options, "-m", "gpudoctor.collect.torch_backend",
           "--trace", trace_path, "--status", status_path]
    if delay_s:
        cmd += ["--delay", str(float(delay_s))]
    if duration_s:
        cmd += ["--duration", str(float(duration_s))]
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


# ---------------------------------------------------------------------------------------------------
# Child side


class _Signalled(BaseException):
    """Raised in the main thread by our SIGTERM/SIGHUP handler (a BaseException: `except Exception`
    in the program does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# A real-time signal that wakes the main thread for a clock-driven window (torch.profiler must be started
# and stopped on the thread that created it: from any other thread Kineto crashes the process).
_TIMER_SIGNAL = (signal.SIGRTMIN + 7) if hasattr(signal, "SIGRTMIN") and signal.SIGRTMIN + 7 <= signal.SIGRTMAX else None


class _Window:
    """Starts/stops the profiler (always on the main thread): at program start, at step boundaries, or
    -- for programs that mark no steps -- when the clock says so (--delay/--duration)."""

    def __init__(self, prof, delay_s: float | None, duration_s: float | None, status: dict):
        self.prof = prof
        self.delay = delay_s or 0.0
        self.duration = duration_s
        self.t0 = time.monotonic()
        self.status = status
        self.state = "waiting"  # waiting -> recording -> stopped
        self.steps = 0  # step() calls seen
        self.started_at = 0.0
        self._busy = False  # inside on_step: the timer signal must not act
        self._timer: threading.Thread | None = None
        self._quit = threading.Event()
        self._main = threading.main_thread().ident

    def begin(self) -> None:
        self.t0 = time.monotonic()  # --delay counts from the program's start, not from our set-up
        if self.delay <= 0:
            self._start("program start")
        if (self.delay > 0 or self.duration) and _TIMER_SIGNAL is not None \
                and threading.current_thread() is threading.main_thread():
            import torch

            hasattr(torch, "_inductor")  # what start() imports lazily: not from inside a signal handler
            signal.signal(_TIMER_SIGNAL, self._on_timer_signal)
            self._timer = threading.Thread(target=self._timer_loop, name="gpudoctor-window", daemon=True)
            self._timer.start()

    def _start(self, how: str, at_step: bool = False) -> None:
        if hasattr(self.prof, "record_steps"):
            # ProfilerStep ranges from a step boundary on; from the program start only once it marks a step
            self.prof.record_steps = at_step
        self.prof.start()
        self.state = "recording"
        self.started_at = time.monotonic()
        self.status["profiled"] = {"start_ns": time.time_ns(), "started": how}

    def _stop(self, how: str) -> None:
        if self.state != "recording":
            return
        self.prof.stop()
        self.state = "stopped"
        self.status["profiled"].update(end_ns=time.time_ns(), stopped=how)

    def on_step(self) -> None:
        """Called by gpudoctor.annotate.step() in the program's thread."""
        if os.getpid() != self.status["pid"] or threading.get_ident() != self._main:
            return  # a forked child's copy, or another thread: the profiler is the main thread's
        self._busy = True
        try:
            self.steps += 1
            now = time.monotonic()
            if self.state == "waiting":
                if now - self.t0 >= self.delay:
                    self._start(f"step {self.steps} (after --delay {self.delay:g} s)", at_step=True)
                return
            if self.state != "recording":
                return
            if self.duration and now - self.started_at >= self.duration:
                self._stop(f"step {self.steps} (after --duration {self.duration:g} s)")
                return
            if hasattr(self.prof, "record_steps") and not self.prof.record_steps:
                self.prof.record_steps = True  # the first mark opens ProfilerStep#1
            self.prof.step()
        finally:
            self._busy = False

    def _timer_loop(self) -> None:
        """Signals the main thread when the clock calls for a start or a stop, until steps take over."""
        last = 0.0
        while not self._quit.wait(0.05):
            if self.steps or self.state == "stopped":
                return
            now = time.monotonic()
            due = (self.state == "waiting" and now - self.t0 >= self.delay) or (
                self.state == "recording" and self.duration and now - self.started_at >= self.duration)
            if due and now - last > 0.5:
                last = now
                try:
                    signal.pthread_kill(self._main, _TIMER_SIGNAL)
                except (OSError, ValueError):
                    return

    def _on_timer_signal(self, signum, frame) -> None:
        if self._busy or self.steps or os.getpid() != self.status["pid"]:
            return
        now = time.monotonic()
        try:
            if self.state == "waiting" and now - self.t0 >= self.delay:
                self._start(f"clock (--delay {self.delay:g} s; the program marks no steps yet)")
            elif self.state == "recording" and self.duration and now - self.started_at >= self.duration:
                self._stop(f"clock (--duration {self.duration:g} s; the program marks no steps)")
        except Exception as e:  # never into the program
            self.status.setdefault("notes", []).append(f"profiler window: {type(e).__name__}: {e}")

    def finish(self) -> bool:
        """Stop for good (main thread); True when something was recorded."""
        self._quit.set()
        if _TIMER_SIGNAL is not None and self._timer is not None:
            try:
                signal.signal(_TIMER_SIGNAL, signal.SIG_IGN)
            except (ValueError, OSError):
                pass
        if self.state == "recording":
            self._stop("program end")
        recorded = self.state == "stopped"
        self.state = "stopped"
        return recorded


def _exit_code(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def _print_program_traceback(exc: BaseException) -> None:
    """The traceback as ``python prog.py`` would print it: this module's and runpy's frames left out."""
    skip = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name not in skip and os.path.abspath(name) not in skip:
            break
        tb = tb.tb_next
    exc.__traceback__ = tb  # the default excepthook prints the exception's own traceback
    try:
        sys.excepthook(type(exc), exc, tb)
    except Exception:
        traceback.print_exception(type(exc), exc, tb)


def _atomic_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def _export(prof, path: str, status: dict) -> None:
    t = time.monotonic()
    raw = path[:-3] if path.endswith(".gz") else path
    tmp_json = f"{raw}.tmp{os.getpid()}.json"
    try:
        prof.export_chrome_trace(tmp_json)
        if path.endswith(".gz"):
            tmp_gz = f"{path}.tmp{os.getpid()}"
            with open(tmp_json, "rb") as src, gzip.open(tmp_gz, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp_gz, path)
            os.unlink(tmp_json)
        else:
            os.replace(tmp_json, path)
        status["trace"] = path
        status["trace_bytes"] = os.path.getsize(path)
    except Exception as e:  # a failed export must not hide the program's own outcome
        status["error"] = f"trace export failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        for p in (tmp_json, f"{path}.tmp{os.getpid()}"):
            try:
                os.unlink(p)
            except OSError:
                pass
    status["export_s"] = round(time.monotonic() - t, 3)


def _torch_facts(torch) -> dict:
    facts = {"torch_version": torch.__version__, "torch_cuda": getattr(torch.version, "cuda", None)}
    try:
        facts["cuda_available"] = bool(torch.cuda.is_available())
        if facts["cuda_available"]:
            facts["device_count"] = torch.cuda.device_count()
            facts["cudnn_version"] = torch.backends.cudnn.version()
    except Exception:
        facts["cuda_available"] = False
    return facts


def _set_path0(entry: str) -> None:
    # `python -m gpudoctor.collect.torch_backend` put the cwd first; python would put the script's
    # folder (scripts), the cwd (-m) or "" (-c) there -- unless -P / -I (safe path) asked for nothing.
    if getattr(sys.flags, "safe_path", False) or not sys.path:
        return
    sys.path[0] = entry


def _run_program(program: list[str]) -> None:
    if program[0] == "-m":
        sys.argv = [program[1], *program[2:]]  # runpy replaces argv[0] with the module's file
        _set_path0(os.getcwd())
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    elif program[0] == "-c":
        import types

        sys.argv = ["-c", *program[2:]]
        _set_path0("")
        main_module = types.ModuleType("__main__")
        main_module.__dict__["__builtins__"] = __builtins__
        saved = sys.modules.get("__main__")
        sys.modules["__main__"] = main_module
        try:
            exec(compile(program[1], "<string>", "exec"), main_module.__dict__)
        finally:
            if saved is not None:
                sys.modules["__main__"] = saved
    else:
        script = program[0]
        sys.argv = [script, *program[1:]]
        _set_path0(os.path.dirname(os.path.abspath(script)))
        runpy.run_path(os.path.abspath(script), run_name="__main__")  # python 3.11 makes __file__ absolute


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m gpudoctor.collect.torch_backend --trace T --status S [--delay S] [--duration S] "
              "-- (script | -m module | -c code) [args]", file=sys.stderr)
        sys.exit(2)
    cut = argv.index("--")
    own, program = argv[:cut], argv[cut + 1:]
    opts = dict(zip(own[::2], own[1::2]))
    trace_path, status_path = opts["--trace"], opts["--status"]
    delay = float(opts.get("--delay", 0) or 0)
    duration = float(opts.get("--duration", 0) or 0) or None
    status: dict = {"pid": os.getpid(), "start_ns": time.time_ns(), "trace": None, "exit_code": None,
                    "signal": None, "exception": None, "notes": []}

    import torch
    from torch.profiler import ProfilerActivity, profile

    import gpudoctor.annotate as annotate

    status.update(_torch_facts(torch))
    activities = [ProfilerActivity.CPU]
    if status.get("cuda_available"):
        activities.append(ProfilerActivity.CUDA)
    status["activities"] = [a.name for a in activities]
    prof = profile(activities=activities, record_shapes=True)
    window = _Window(prof, delay, duration, status)
    annotate._set_backend_step_hook(window.on_step)

    owner = os.getpid()
    finished = threading.Event()
    outcome = {"code": None}

    def finalize(code: int, signum: int | None = None, exc: str | None = None) -> int:
        """Stop the profiler, export, write the status. Runs once, whoever ends the program."""
        if finished.is_set() or os.getpid() != owner:  # a forked child (multiprocessing) exports nothing
            return code
        finished.set()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the export short
            except (ValueError, OSError):
                pass
        annotate._set_backend_step_hook(None)
        status["end_ns"] = time.time_ns()
        status["exit_code"] = code
        status["signal"] = signal.Signals(signum).name if signum else None
        status["exception"] = exc
        status["steps_marked"] = window.steps
        try:
            recorded = window.finish()
        except Exception as e:
            recorded = False
            status["error"] = f"stopping the profiler failed: {type(e).__name__}: {e}"
        if recorded:
            _export(prof, trace_path, status)
        elif "error" not in status:
            status["notes"].append("the profiler never started (the program ended before --delay)")
        if (delay or duration) and window.steps == 0:
            status["notes"].append("the program marks no steps (gpudoctor.annotate.step()): "
                                   "the --delay/--duration window followed the clock")
        elif (delay or duration) and window.steps and _TIMER_SIGNAL is None:
            status["notes"].append("the --delay/--duration window could only follow step marks here")
        try:
            _atomic_json(status_path, status)
        except OSError as e:
            print(f"gpudoctor: cannot write {status_path}: {e}", file=sys.stderr)
        outcome["code"] = code
        return code

    def on_signal(signum, frame):
        if os.getpid() != owner:  # a forked child: die the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Signalled(signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(s, on_signal)
        except (ValueError, OSError):
            pass

    real_exit = os._exit

    def patched_exit(code=0):
        try:
            finalize(int(code) & 0xFF, exc="os._exit")
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            real_exit(code)

    os._exit = patched_exit

    # Run the program as `python` would.
    code, signum, exc_name = 0, None, None
    try:
        window.begin()
        _run_program(program)
    except SystemExit as e:
        code = _exit_code(e)
    except KeyboardInterrupt as e:
        _print_program_traceback(e)
        code, signum, exc_name = 128 + signal.SIGINT, signal.SIGINT, "KeyboardInterrupt"
    except _Signalled as e:
        code, signum = 128 + e.signum, e.signum
    except BaseException as e:  # the program's exception: its traceback, exit 1
        _print_program_traceback(e)
        code, exc_name = 1, type(e).__name__
    finally:
        os._exit = real_exit
    finalize(code, signum, exc_name)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    sys.exit(code)


if __name__ == "__main__":
    main()
