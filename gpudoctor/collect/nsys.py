"""Nsight Systems: check it, build the ``nsys profile`` command, export the report to SQLite (where it is
installed: gpudoctor.collect.locate).

Known failures handled by the profile command: nsys hanging after the program ended (bounded by a
timeout; what nsys wrote -- ``.nsys-rep`` or ``.qdstrm`` -- is kept), a report importer that cannot load
its libraries (the copy inside Nsight Compute needs libdw/libelf: only a ``.qdstrm`` comes out), and
export failures (the ``.nsys-rep`` is kept and can be analyzed later).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from gpudoctor.errors import GpudoctorError

# Cheap defaults: CUDA/NVTX/cuBLAS/cuDNN API tracing, no CPU sampling (a 20 s program otherwise writes
# a 2 GB .qdstrm), no context-switch tracing, no backtraces; GPU memory usage on.
DEFAULT_OPTIONS = [
    ("--trace", "cuda,nvtx,cublas,cudnn"),
    ("--sample", "none"),
    ("--cpuctxsw", "none"),
    ("--backtrace", "none"),
    ("--cuda-memory-usage", "true"),
]
# Short spellings of nsys profile options -> long ones (to tell when the user overrides a default).
_SHORT = {"-t": "--trace", "-s": "--sample", "-b": "--backtrace", "-o": "--output", "-f": "--force-overwrite",
          "-c": "--capture-range", "-p": "--nvtx-capture", "-d": "--duration", "-y": "--delay",
          "-x": "--stop-on-exit", "-e": "--env-var", "-w": "--show-output", "-n": "--inherit-environment"}
_OWNED = {"--output", "--force-overwrite"}  # gpudoctor decides where the report goes


def nsys_version(path: str, timeout: float = 30.0) -> str:
    """``nsys --version`` output (one line), or raise GpudoctorError saying why it does not run."""
    try:
        p = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise GpudoctorError(f"{path} --version did not answer within {timeout:.0f} s") from None
    except OSError as e:
        raise GpudoctorError(f"{path} cannot run: {e.strerror or e}") from None
    text = " ".join((p.stdout or p.stderr or "").split())
    if p.returncode != 0:
        raise GpudoctorError(f"{path} --version failed (exit {p.returncode}): {text[:200]}")
    return text[:200]


def importer_problem(nsys_path: str, timeout: float = 10.0) -> str | None:
    """Why nsys's report importer (QdstrmImporter) cannot load, or None when it looks fine / can't tell.

    nsys writes a .qdstrm and converts it with QdstrmImporter at exit; when that binary misses shared
    libraries (the copy inside Nsight Compute needs libdw.so.1 and libelf.so.1), only the .qdstrm is left.
    """
    real = os.path.realpath(nsys_path)
    base = Path(real).parent
    candidates = []
    for up in (base, base.parent, base.parent.parent):
        candidates.extend(up.glob("QdstrmImporter"))
        candidates.extend(up.glob("*/QdstrmImporter"))
    importer = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    ldd = shutil.which("ldd")
    if importer is None or ldd is None:
        return None
    try:
        p = subprocess.run([ldd, str(importer)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    missing = sorted({line.split("=>")[0].strip() for line in p.stdout.splitlines() if "not found" in line})
    if missing:
        return (f"its report importer {importer} cannot load {', '.join(missing)} "
                "(install them or add their folder to LD_LIBRARY_PATH)")
    return None


# ---------------------------------------------------------------------------------------------------
# Commands


def _option_key(arg: str) -> str | None:
    if not arg.startswith("-"):
        return None
    key = arg.split("=", 1)[0]
    return _SHORT.get(key, key)


def split_user_args(text: str | list[str] | None) -> list[str]:
    if not text:
        return []
    args = shlex.split(text) if isinstance(text, str) else list(text)
    for a in args:
        if _option_key(a) in _OWNED:
            raise GpudoctorError(f"--nsys-args: {a} is set by gpudoctor (the report goes to RUN_DIR/raw/); "
                                 "use gpudoctor's -o DIR to choose the run directory")
    return args


def merge_args(ours: list[str], user_args: list[str]) -> list[str]:
    """gpudoctor's own ``--key=value`` options for this run (window, GPU metrics, CPU sampling), less those
    the user's ``--nsys-args`` name, then the user's: nsys never sees an option twice, and the user's wins."""
    user_keys = {_option_key(a) for a in user_args} - {None}
    return [a for a in ours if _option_key(a) not in user_keys] + list(user_args)


def profile_command(nsys: str, output_base: str | Path, program: list[str], user_args: list[str] | None = None,
                    delay_s: float | None = None, duration_s: float | None = None,
                    capture_range: str | None = None) -> list[str]:
    """The ``nsys profile`` command line: cheap defaults, the capture window, then the user's options.

    A default the user sets in ``user_args`` (e.g. ``-t cuda,nvtx,osrt``) is dropped, so nsys never
    sees an option twice. ``capture_range`` NAME -> ``--capture-range=nvtx --nvtx-capture=NAME@*
    --capture-range-end=stop``: collection starts when an NVTX range NAME (any domain) is pushed or
    started and stops when it ends; the program runs on to its end. nsys only matches unregistered NVTX
    strings (what torch.cuda.nvtx and most code use) with NSYS_NVTX_PROFILER_REGISTER_ONLY=0 in the
    program's environment: ``profile_env`` sets it.
    """
    user_args = list(user_args or [])
    user_keys = {_option_key(a) for a in user_args} - {None}
    cmd = [nsys, "profile"]
    for key, value in DEFAULT_OPTIONS:
        if key not in user_keys:
            cmd.append(f"{key}={value}")
    window: list[tuple[str, str]] = []
    if delay_s:
        window.append(("--delay", _secs(delay_s)))
    if duration_s:
        window.append(("--duration", _secs(duration_s)))
    if capture_range:
        name = capture_range if "@" in capture_range else f"{capture_range}@*"
        window += [("--capture-range", "nvtx"), ("--nvtx-capture", name), ("--capture-range-end", "stop")]
    if duration_s or capture_range:
        window.append(("--kill", "none"))  # when collection stops, the program runs on to its own end
    for key, value in window:
        if key not in user_keys:
            cmd.append(f"{key}={value}")
    cmd += ["--force-overwrite=true", f"--output={output_base}"]
    cmd += user_args
    cmd += list(program)
    return cmd


# Call stacks inside the window. Seen on an H200 with nsys 2025.3.1 (bench/gpu/stack-options.txt):
# --sample=process-tree gives native CPU samples (SAMPLING_CALLCHAINS: cuDNN's planning, module loading).
# --python-sampling and --python-backtrace write NVTX marks whose payload the SQLite export leaves empty,
# and --cudabacktrace unwinds every slow sync as it returns, which lengthens the very gaps being charged
# (+72% on a per-step .item(), fixtures/pysamples): neither is asked for. Python frames come from the
# agent's own sampler (collect/pysampler.py); --cudabacktrace can still be passed with --nsys-args.
STACK_ARGS = ["--sample=process-tree", "--cpuctxsw=process-tree"]


def capture_api_args(end: str = "stop") -> list[str]:
    """Collect only between the program's cudaProfilerStart and cudaProfilerStop (the agent calls them at
    the window's step boundaries); the program runs on after the stop."""
    if end not in ("stop", "stop-shutdown", "repeat", "none"):
        end = "stop"
    return ["--capture-range=cudaProfilerApi", f"--capture-range-end={end}", "--kill=none"]


def gpu_metrics_args(nsys: str, disabled: bool, frequency_hz: int, devices: str = "all") -> tuple[list[str], str | None]:
    """``--gpu-metrics-devices`` sampling when this nsys has it and we may use it; else ([], why not)."""
    if disabled:
        return [], None
    if not _supports(nsys, "--gpu-metrics-devices"):
        return [], "GPU metrics: this nsys has no --gpu-metrics-devices option; not sampled"
    if os.geteuid() != 0 and not _profiling_open_to_users():
        return [], ("GPU metrics: need root or the driver's RmProfilingAdminOnly=0 (performance counters "
                    "are restricted to admins here); not sampled")
    return [f"--gpu-metrics-devices={devices}", f"--gpu-metrics-frequency={int(frequency_hz)}"], None


def _profiling_open_to_users() -> bool:
    try:
        text = Path("/proc/driver/nvidia/params").read_text()
    except OSError:
        return False
    return bool(re.search(r"RmProfilingAdminOnly:\s*0\b", text))


_HELP_CACHE: dict[str, str] = {}


def _supports(nsys: str, option: str) -> bool:
    if nsys not in _HELP_CACHE:
        try:
            p = subprocess.run([nsys, "profile", "--help"], capture_output=True, text=True, timeout=30,
                               stdin=subprocess.DEVNULL)
            _HELP_CACHE[nsys] = (p.stdout or "") + (p.stderr or "")
        except (OSError, subprocess.TimeoutExpired):
            _HELP_CACHE[nsys] = ""
    return option in _HELP_CACHE[nsys]


def profile_env(env: dict, capture_range: str | None) -> dict:
    env = dict(env)
    if capture_range:
        env.setdefault("NSYS_NVTX_PROFILER_REGISTER_ONLY", "0")
    return env


def _secs(v: float) -> str:
    # nsys takes whole seconds for --delay/--duration
    return str(max(1, int(round(float(v))))) if v else "0"


def export_command(nsys: str, report: str | Path, out: str | Path) -> list[str]:
    return [nsys, "export", "--type=sqlite", "--force-overwrite=true", f"--output={out}", str(report)]


def export_sqlite(nsys: str, report: Path, out: Path, timeout_s: float, log: Path | None = None) -> str | None:
    """Export ``report`` to SQLite ``out``; None when it worked, else a one-line reason (nothing raised)."""
    cmd = export_command(nsys, report, out)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                           start_new_session=True)
    except subprocess.TimeoutExpired as e:
        _write_log(log, cmd, e.stdout, e.stderr, f"timed out after {timeout_s:.0f} s")
        _unlink(out)
        return f"nsys export did not finish within {timeout_s:.0f} s"
    except OSError as e:
        return f"nsys export could not run: {e.strerror or e}"
    _write_log(log, cmd, p.stdout, p.stderr, f"exit {p.returncode}")
    if p.returncode != 0 or not out.exists() or out.stat().st_size == 0:
        last = [ln for ln in (p.stderr or p.stdout or "").splitlines() if ln.strip()]
        _unlink(out)
        return f"nsys export failed (exit {p.returncode}): {last[-1].strip()[:200] if last else 'no output'}"
    return None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _write_log(log: Path | None, cmd: list[str], out, err, status: str) -> None:
    if log is None:
        return

    def text(x):
        return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

    try:
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n{text(out)}{text(err)}[{status}]\n")
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------
# The program runs under nsys inside a tiny wrapper that records how it ended and when: nsys's own exit
# code does not say, and "the program ended but nsys has not" is how a hang at exit is recognized. The
# program gets its own process group; the wrapper forwards the signals nsys or gpudoctor send it.

PROGRAM_WRAPPER = r"""
import json, os, signal, sys, time
st, cmd = sys.argv[1], sys.argv[3:]
def put(d):
    tmp = st + ".tmp"
    with open(tmp, "w") as f:
        json.dump(d, f)
    os.replace(tmp, st)
doc = {"wrapper_pid": os.getpid(), "start_ns": time.time_ns()}
try:
    pid = os.posix_spawnp(cmd[0], cmd, os.environ, setpgroup=0)
except OSError as e:
    doc.update(end_ns=time.time_ns(), exit_code=127 if isinstance(e, FileNotFoundError) else 126,
               error="%s: %s" % (cmd[0], e.strerror or e))
    put(doc)
    sys.stderr.write("gpudoctor: cannot run %s: %s\n" % (cmd[0], e.strerror or e))
    sys.exit(doc["exit_code"])
doc["pid"] = pid
put(doc)
def forward(s, frame):
    try:
        os.killpg(pid, s)
    except OSError:
        pass
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, forward)
try:
    status = os.waitpid(pid, 0)[1]
    code = os.waitstatus_to_exitcode(status)
except ChildProcessError:
    code = 0
doc["end_ns"] = time.time_ns()
if code < 0:
    doc["signal"] = signal.Signals(-code).name
    code = 128 - code
doc["exit_code"] = code
put(doc)
sys.exit(code)
"""


def wrap_program(status_path: str | Path, program: list[str], python: str | None = None) -> list[str]:
    """``program`` run by PROGRAM_WRAPPER, which writes {start_ns, pid, end_ns, exit_code, signal} to status_path."""
    import sys

    return [python or sys.executable, "-I", "-S", "-c", PROGRAM_WRAPPER, str(status_path), "--", *program]
