"""The in-process agent: runs a Python program exactly as ``python`` would, finds its steps, and opens and
closes the capture window (``gpudoctor.collect.window``) at step boundaries.

``gpudoctor profile`` starts it as ``python [OPTS] -m gpudoctor.collect.agent --mode MODE --status S
[--trace T] [--window SPEC_JSON] [--stacks] [--pysamples P] -- (script | -m module | -c code) ARGS``. Modes:

``torch``  torch.profiler (CPU activities, plus CUDA when a GPU is available; record_shapes) records the
           window; the trace is written (gzipped) as soon as the window closes, while the program runs on.
``cuda``   the program runs under Nsight Systems with ``--capture-range=cudaProfilerApi``: the agent calls
           cudaProfilerStart/Stop (``torch.cuda.profiler``) at the window's boundaries and writes an NVTX
           range ``ProfilerStep#N`` per step inside it, so the report carries the steps.

Whatever way the program ends -- returning, ``sys.exit(n)``, an exception, ``os._exit(n)``, SIGINT,
SIGTERM or SIGHUP -- an open window is closed (and in torch mode exported), a small JSON status is
written, and the agent exits with the program's code (1 for an uncaught exception, whose traceback is
printed as Python prints it; 128+N for signal N). The status file is rewritten at each change (window
open, window closed, end), so the supervising ``gpudoctor profile`` can analyze the window while the
program still runs.

Steps: the strongest source seen wins (window.SOURCE_RANK): ``gpudoctor.annotate.step()``, every
``torch.optim`` optimizer step (the global step hook), the end of each outermost ``nn.Module`` forward
call, else the clock. All hooks are removed once the window closes, so the rest of the run pays nothing.

``--pysamples P``: sample the main thread's Python stack inside the window (``gpudoctor.collect.pysampler``)
and write the samples to P when it closes. ``--stacks``: torch.profiler's own ``with_stack`` as well.

This module runs inside the profiled program's interpreter: it imports only the standard library, torch,
``gpudoctor.annotate``, ``gpudoctor.collect.window`` and ``gpudoctor.collect.pysampler``.
"""

from __future__ import annotations

import gzip
import json
import os
import runpy
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback

from gpudoctor.collect import launch_timing
from gpudoctor.collect.pysampler import PythonSampler
from gpudoctor.collect.window import Window, WindowSpec

# A real-time signal that wakes the main thread for the clock: torch.profiler must be started and stopped on
# the thread that created it (from any other thread Kineto crashes the process).
_TIMER_SIGNAL = (signal.SIGRTMIN + 7) if hasattr(signal, "SIGRTMIN") and signal.SIGRTMIN + 7 <= signal.SIGRTMAX else None
TICK_S = 0.25


class _Signalled(BaseException):
    """Raised in the main thread by our SIGTERM/SIGHUP handler (a BaseException: `except Exception`
    in the program does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------------------------------------------
# Recorders: what "start" and "stop" mean in each mode


class TorchRecorder:
    def __init__(self, torch, trace_path: str, status: dict, stacks: bool):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if status.get("cuda_available"):
            activities.append(ProfilerActivity.CUDA)
        status["activities"] = [a.name for a in activities]
        self.prof = profile(activities=activities, record_shapes=True, with_stack=stacks)
        self.trace_path, self.status = trace_path, status

    @staticmethod
    def mark(name: str) -> None:
        from torch.profiler import record_function

        with record_function(name):
            pass

    def start(self, source: str | None) -> None:
        # ProfilerStep#N ranges from a step boundary on (none for a clock window or before the first step)
        self.prof.record_steps = source not in (None, "time")
        self.prof.start()

    def step(self, n: int, source: str) -> None:
        self.prof.record_steps = True
        self.prof.step()

    def stop(self, facts: dict) -> None:
        for key, value in facts.items():  # top-level keys of the trace; only taken while it records
            try:
                self.prof.add_metadata_json(key, json.dumps(value))
            except Exception:
                pass
        self.prof.stop()
        _export(self.prof, self.trace_path, self.status)


class CudaProfilerRecorder:
    """cudaProfilerStart/Stop for ``nsys --capture-range=cudaProfilerApi``, plus NVTX step ranges."""

    def __init__(self, torch):
        import gpudoctor.annotate as annotate

        self.torch, self.nvtx = torch, annotate._nvtx()
        self._range = None

    def mark(self, name: str) -> None:
        self.nvtx.end(self.nvtx.start(name))

    def _sync(self) -> None:
        if self.torch.cuda.is_initialized():
            self.torch.cuda.synchronize()

    def start(self, source: str | None) -> None:
        self._sync()  # the window begins with an empty queue: its first step is whole
        self.torch.cuda.profiler.start()
        if source not in (None, "time"):
            self.step(0, source)

    def step(self, n: int, source: str) -> None:
        self.nvtx.end(self._range)
        # the program's own gd.step() writes its NVTX step ranges: only the other sources need ours
        self._range = self.nvtx.start(f"ProfilerStep#{n}") if source != "annotate" else None

    def stop(self, facts: dict) -> None:
        self.nvtx.end(self._range)
        self._range = None
        self._sync()
        self.torch.cuda.profiler.stop()


# ---------------------------------------------------------------------------------------------------
# Step sources


class StepSources:
    """Installs the hooks that report step boundaries to ``on_boundary(source)``; ``remove()`` takes them off."""

    def __init__(self, torch, on_boundary):
        self.on_boundary = on_boundary
        self.handles: list = []
        self._depth = threading.local()
        self._forward_handles: list = []
        import importlib

        optim = importlib.import_module("torch.optim.optimizer")  # not an attribute of torch.optim in every version
        if hasattr(optim, "register_optimizer_step_post_hook"):
            self.handles.append(optim.register_optimizer_step_post_hook(self._after_optimizer_step))
        mod = torch.nn.modules.module
        if hasattr(mod, "register_module_forward_pre_hook") and hasattr(mod, "register_module_forward_hook"):
            self._forward_handles = [mod.register_module_forward_pre_hook(self._pre_forward),
                                     _forward_hook(mod, self._post_forward)]

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.remove_forward_hooks()  # a training loop: forward calls are not steps
        self.on_boundary("optimizer")

    def _pre_forward(self, module, args) -> None:
        self._depth.n = getattr(self._depth, "n", 0) + 1

    def _post_forward(self, module, args, output) -> None:
        n = getattr(self._depth, "n", 1) - 1
        self._depth.n = max(n, 0)
        if n <= 0:
            self.on_boundary("forward")

    def remove_forward_hooks(self) -> None:
        for h in self._forward_handles:
            h.remove()
        self._forward_handles = []

    def remove(self) -> None:
        self.remove_forward_hooks()
        for h in self.handles:
            h.remove()
        self.handles = []


def _forward_hook(mod, fn):
    try:
        return mod.register_module_forward_hook(fn, always_call=True)  # depth stays right on exceptions
    except TypeError:  # older torch
        return mod.register_module_forward_hook(fn)


# ---------------------------------------------------------------------------------------------------
# The controller: window decisions applied on the main thread


class Controller:
    def __init__(self, window: Window, recorder, status: dict, write_status, sources_factory, gpu_in_use=None,
                 sampler: PythonSampler | None = None, calibrate=None):
        self.window, self.recorder, self.status = window, recorder, status
        self.sampler = sampler
        self.calibrate = calibrate  # callable: host ns per kernel launch with no profiler, or None
        self.launch_ns: int | None = None
        self.gpu_in_use = gpu_in_use  # callable: has the program initialized CUDA yet (None: not a GPU program)
        window.wait_for_origin = gpu_in_use is not None
        self.write_status = write_status
        self.main_ident = threading.main_thread().ident
        self.owner = os.getpid()
        self.sources = None
        self._sources_factory = sources_factory
        self._busy = False
        self._quit = threading.Event()
        self._timer: threading.Thread | None = None
        self.window_steps = 0  # steps written inside the window (ProfilerStep#N)

    # -------------------------------------------------------------- set-up

    def begin(self) -> None:
        if self.window.spec.whole:
            self.window.start_whole(time.time_ns())
            self._apply("start", self.window.started_how)
        self.sources = self._sources_factory(self.on_boundary)
        import gpudoctor.annotate as annotate

        annotate._set_backend_step_hook(lambda: self.on_boundary("annotate"))
        if self.window.spec.whole:
            return  # no clock decisions to make
        if _TIMER_SIGNAL is not None and threading.current_thread() is threading.main_thread():
            signal.signal(_TIMER_SIGNAL, self._on_timer_signal)
            signal.siginterrupt(_TIMER_SIGNAL, False)  # the program's blocking calls restart (see pysampler)
            self._timer = threading.Thread(target=self._timer_loop, name="gpudoctor-window", daemon=True)
            self._timer.start()
        else:
            self.status["notes"].append("no timer signal here: the window follows step boundaries only")

    def _mine(self) -> bool:
        return os.getpid() == self.owner and threading.get_ident() == self.main_ident

    # -------------------------------------------------------------- inputs

    def on_boundary(self, source: str) -> None:
        if not self._mine() or self._busy:
            return  # a forked worker's copy, or another thread: the window is the main thread's
        self._busy = True
        try:
            action = self.window.boundary(source, time.time_ns())
            if action == "step":
                self._step()
            elif action:
                self._apply(action, self.window.started_how if action == "start" else self.window.stopped_how)
        except Exception as e:  # never into the program
            self._note(f"capture window: {type(e).__name__}: {e}")
        finally:
            self._busy = False

    def _on_timer_signal(self, signum, frame) -> None:
        if self._busy or not self._mine():
            return
        self._busy = True
        try:
            if self.window.origin_ns is None and self.gpu_in_use is not None and self.gpu_in_use():
                self.window.origin_ns = time.time_ns()
            action = self.window.tick(time.time_ns())
            if action:
                self._apply(action, self.window.started_how if action == "start" else self.window.stopped_how)
        except Exception as e:
            self._note(f"capture window: {type(e).__name__}: {e}")
        finally:
            self._busy = False

    def _timer_loop(self) -> None:
        while not self._quit.wait(TICK_S):
            if self.window.state == "done":
                return
            try:
                signal.pthread_kill(self.main_ident, _TIMER_SIGNAL)
            except (OSError, ValueError):
                return

    # -------------------------------------------------------------- actions

    def _step(self) -> None:
        self.window_steps += 1
        self.recorder.step(self.window_steps, self.window.source or "time")

    def _apply(self, action: str, how: str) -> None:
        if action == "start":
            if self.calibrate is not None:
                try:
                    self.launch_ns = self.calibrate()
                except Exception as e:
                    self._note(f"launch cost calibration: {type(e).__name__}: {e}")
            self.recorder.start(self.window.source)  # at a step boundary this opens the first step
            if self.sampler is not None:
                try:
                    self.sampler.start(self.recorder.mark)
                except Exception as e:  # never into the program
                    self.sampler = None
                    self._note(f"Python stack sampling did not start: {type(e).__name__}: {e}")
            self.window.started(time.time_ns())
            self.status["capture"] = {"state": "recording", "start_ns": time.time_ns(), "started": how}
            self.write_status()
        elif action == "stop":
            if self.sampler is not None:
                try:
                    self.status["pysamples"] = self.sampler.stop(self.recorder.mark)
                except Exception as e:
                    self._note(f"Python stack samples were not written: {type(e).__name__}: {e}")
                self.sampler = None
            self.recorder.stop(self._facts())
            self.status["capture"] = dict(self.window.summary(), state="done", closed_ns=time.time_ns(),
                                          **self._facts())
            self.status["window_steps"] = self.window_steps
            self.write_status()
            self.remove_hooks()

    def _facts(self) -> dict:
        """Median step times before and inside the window: the profiler's own cost, measured."""
        w = self.window
        before = w.step_ns[:max((w.start_step or 1) - 1, 0)]
        inside = w.step_ns[max((w.start_step or 1) - 1, 0):]
        out = {}
        if len(before) >= 2:
            out["unprofiled_step_ms"] = round(statistics.median(before[-5:]) / 1e6, 3)
        if inside:
            out["profiled_step_ms"] = round(statistics.median(inside) / 1e6, 3)
        if self.launch_ns:
            out["unprofiled_launch_ns"] = self.launch_ns
        return out

    def remove_hooks(self) -> None:
        self._quit.set()
        if self.sources is not None:
            self.sources.remove()
            self.sources = None
        import gpudoctor.annotate as annotate

        annotate._set_backend_step_hook(None)

    def finish(self, how: str) -> None:
        """The program ends: close an open window (main thread)."""
        self._quit.set()
        if _TIMER_SIGNAL is not None and self._timer is not None:
            try:
                signal.signal(_TIMER_SIGNAL, signal.SIG_IGN)
            except (ValueError, OSError):
                pass
        action = self.window.finish(time.time_ns(), how)
        if action == "stop":
            self._apply("stop", how)
        else:
            self.remove_hooks()

    def _note(self, text: str) -> None:
        notes = self.status.setdefault("notes", [])
        if text not in notes:
            notes.append(text)


# ---------------------------------------------------------------------------------------------------
# Helpers


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
    exc.__traceback__ = tb
    try:
        sys.excepthook(type(exc), exc, tb)
    except Exception:
        traceback.print_exception(type(exc), exc, tb)


def _launch_ns(torch) -> int | None:
    """The agent's launch timing, just before the window opens (collect/launch_timing.py)."""
    timed = launch_timing.launch_ns(torch)
    return timed[0] if timed else None


def _atomic_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
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
    # `python -m gpudoctor.collect.agent` put the cwd first; python would put the script's folder
    # (scripts), the cwd (-m) or "" (-c) there -- unless -P / -I (safe path) asked for nothing.
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
        runpy.run_path(os.path.abspath(script), run_name="__main__")


USAGE = ("usage: python -m gpudoctor.collect.agent --mode torch|cuda --status S [--trace T] [--window JSON] "
         "[--stacks] [--pysamples P] -- (script | -m module | -c code) [args]")


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
    if "--" not in argv:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    cut = argv.index("--")
    own, program = argv[:cut], argv[cut + 1:]
    opts: dict = {"--stacks": False}
    i = 0
    while i < len(own):
        if own[i] == "--stacks":
            opts["--stacks"] = True
            i += 1
        else:
            opts[own[i]] = own[i + 1] if i + 1 < len(own) else ""
            i += 2
    if "--status" not in opts or opts.get("--mode") not in ("torch", "cuda") or not program:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    return opts, program


class _Session:
    """The agent's state in the program's process: its status file, the controller and the one finalize."""

    def __init__(self, status_path: str, status: dict):
        self.status_path, self.status = status_path, status
        self.owner = os.getpid()
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.ctl: Controller | None = None
        self.window: Window | None = None

    def write_status(self) -> None:
        with self.lock:
            try:
                _atomic_json(self.status_path, self.status)
            except OSError as e:
                print(f"gpudoctor: cannot write {self.status_path}: {e}", file=sys.stderr)

    def early_exit(self, code: int, signum: int | None) -> None:
        self.status.update(end_ns=time.time_ns(), exit_code=code,
                           signal=signal.Signals(signum).name if signum else None)
        self.status["notes"].append("the program was stopped before it started (while its profiler was being set up)")
        self.write_status()
        sys.exit(code)

    def on_signal(self, signum, frame) -> None:
        if os.getpid() != self.owner:  # a forked child: die the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Signalled(signum)

    def set_up(self, opts: dict, spec: WindowSpec):
        """Import torch and make the recorder and the window; a signal meanwhile ends the program here."""
        try:
            import torch

            self.status.update(_torch_facts(torch))
            if opts["--mode"] == "torch":
                recorder = TorchRecorder(torch, opts.get("--trace"), self.status, bool(opts["--stacks"]))
            else:
                recorder = CudaProfilerRecorder(torch)
            self.window = Window(spec, self.status["start_ns"])
        except KeyboardInterrupt:
            self.early_exit(128 + signal.SIGINT, signal.SIGINT)
        except _Signalled as e:
            self.early_exit(128 + e.signum, e.signum)
        gpu_in_use = torch.cuda.is_initialized if self.status.get("cuda_available") else None
        sampler = PythonSampler(opts["--pysamples"]) if opts.get("--pysamples") else None
        self.ctl = Controller(self.window, recorder, self.status, self.write_status,
                              lambda on_boundary: StepSources(torch, on_boundary), gpu_in_use, sampler,
                              (lambda: _launch_ns(torch)) if gpu_in_use is not None else None)

    def finalize(self, code: int, signum: int | None = None, exc: str | None = None) -> int:
        """Close the window, export, write the status. Runs once, whoever ends the program."""
        if self.finished.is_set() or os.getpid() != self.owner:
            return code
        self.finished.set()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the export short
            except (ValueError, OSError):
                pass
        status = self.status
        status["end_ns"] = time.time_ns()
        status["finalizing_ns"] = status["end_ns"]  # the supervisor waits for the export instead of escalating
        self.write_status()
        status.update(exit_code=code, signal=signal.Signals(signum).name if signum else None, exception=exc)
        why = f"program end ({signal.Signals(signum).name})" if signum else "program end"
        try:
            self.ctl.finish(why)
        except Exception as e:
            status["error"] = f"stopping the profiler failed: {type(e).__name__}: {e}"
        if self.window.start_ns is None and "error" not in status:
            status["notes"].append("the program ended before the capture window opened: nothing was recorded")
        self.write_status()
        return code

    def run(self, program: list[str]) -> int:
        """Run the program as ``python`` would, os._exit included; its exit code, after finalize."""
        real_exit = os._exit

        def patched_exit(code=0):
            try:
                self.finalize(int(code) & 0xFF, exc="os._exit")
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                real_exit(code)

        os._exit = patched_exit
        self.write_status()
        code, signum, exc_name = 0, None, None
        try:
            self.ctl.begin()
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
        return self.finalize(code, signum, exc_name)


def main(argv: list[str] | None = None) -> None:
    opts, program = _parse(sys.argv[1:] if argv is None else argv)
    spec = WindowSpec.from_dict(json.loads(opts.get("--window") or "{}"))
    status: dict = {"pid": os.getpid(), "start_ns": time.time_ns(), "mode": opts["--mode"], "trace": None,
                    "exit_code": None, "signal": None, "exception": None, "notes": [],
                    "capture": {"state": "waiting"}}
    session = _Session(opts["--status"], status)
    for s in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(s, session.on_signal)
        except (ValueError, OSError):
            pass
    session.write_status()  # first thing: the supervisor holds a Ctrl-C back until the interpreter runs this code
    session.set_up(opts, spec)
    code = session.run(program)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    sys.exit(code)


if __name__ == "__main__":
    main()
