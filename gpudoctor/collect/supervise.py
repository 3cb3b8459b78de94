"""Running the profiled program: its own session and process group, signals forwarded (and escalated when
it does not stop), its output copied to the run directory, and never left running when gpudoctor dies.

Used by ``gpudoctor profile`` (gpudoctor/cli/profile.py) for every backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO

from gpudoctor.errors import GpudoctorError

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ESCALATE_AFTER_S = 10.0  # a program still running this long after a forwarded signal gets the next one
READY_WAIT_S = 10.0  # the longest a signal waits for the child's interpreter to start


def say(msg: str) -> None:
    """One gpudoctor line on stderr (the program owns stdout)."""
    try:
        print(f"gpudoctor: {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def debug_traceback() -> None:
    """The current exception's traceback on stderr, only with $GPUDOCTOR_DEBUG set (users get one line)."""
    if os.environ.get("GPUDOCTOR_DEBUG"):
        import traceback

        traceback.print_exc()


def signame(num: int | None) -> str | None:
    if not num:
        return None
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def exit_code_of(returncode: int) -> tuple[int, str | None]:
    """Popen returncode -> (shell-style exit code, signal name)."""
    if returncode < 0:
        return 128 - returncode, signame(-returncode)
    return returncode, None


# ---------------------------------------------------------------------------------------------------
# Running a child with signals forwarded


class Supervisor:
    """Runs one child in its own session and forwards SIGINT/SIGTERM/SIGHUP to it.

    ``group=True`` signals the child's whole process group (as a terminal would); False only the child
    (nsys, which stops its collection and ends the program itself). A third signal kills the group.
    """

    def __init__(self, argv: list[str], env: dict, group: bool = True,
                 first_target: Callable[[int], bool] | None = None, log_dir: Path | None = None) -> None:
        self.argv, self.env, self.group = argv, env, group
        self.first_target = first_target  # optional: delivers the first signal instead of send()
        self.log_dir = log_dir  # the program's stdout/stderr are also kept there (program.stdout.log, ...)
        self.proc: subprocess.Popen | None = None
        self.received: list[int] = []
        self.received_at: float | None = None
        self._old: dict[int, object] = {}
        self._tees: list[StreamTee] = []
        self.saving = None  # optional: True while the program is writing what was collected (no escalation then)
        # optional: False while the child interpreter is still starting (a SIGINT then kills Python's own
        # start-up with a fatal error and a traceback): the first signal waits for it, at most READY_WAIT_S
        self.ready = None
        self._held: int | None = None

    def start(self) -> None:
        pipe = subprocess.PIPE if self.log_dir is not None else None
        # A signal between the child's start and our handlers would leave it running unsupervised: held
        # back until the handlers are in place (then delivered to them), and unblocked in the child.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            try:
                self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True, stdout=pipe,
                                             stderr=pipe, preexec_fn=_die_with_parent)
            except OSError as e:
                raise GpudoctorError(f"cannot run {self.argv[0]}: {e.strerror or e}",
                                     127 if isinstance(e, FileNotFoundError) else 126) from None
            if self.log_dir is not None:
                self._tees = [StreamTee(self.proc.stdout, sys.stdout, self.log_dir / "program.stdout.log"),
                              StreamTee(self.proc.stderr, sys.stderr, self.log_dir / "program.stderr.log")]
            for s in FORWARDED:
                try:
                    self._old[s] = signal.signal(s, self._on_signal)
                except (ValueError, OSError):  # not the main thread
                    pass
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        self.received_at = time.monotonic()
        n = len(self.received)
        if n == 1:
            say(f"{signame(signum)}: stopping the program; keeping and analyzing what was collected "
                "(signal again to insist, a third time to kill it)")
        if n >= 3:
            self.kill_group(signal.SIGKILL)
        elif n == 1 and self.ready is not None and not self.ready():
            self._held = signum  # delivered by wait() once the program runs
        elif n == 1 and self.first_target is not None and self.first_target(signum):
            return
        else:
            self.send(signum)

    def send(self, signum: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if self.group:
                os.killpg(self.proc.pid, signum)
            else:
                os.kill(self.proc.pid, signum)
        except OSError:
            pass

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signum)
        except OSError:
            pass

    def terminate(self, grace_s: float = 5.0) -> None:
        """SIGTERM the child's group, then SIGKILL after ``grace_s``."""
        self.kill_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill_group(signal.SIGKILL)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass

    def wait(self, poll: Callable[[], None] | None = None, interval: float = 0.2) -> int:
        """Wait for the child; ``poll()`` is called meanwhile (it may terminate the child)."""
        while True:
            try:
                rc = self.proc.wait(timeout=interval)
                for t in self._tees:
                    t.join()
                return rc
            except subprocess.TimeoutExpired:
                self._deliver_held()
                self._escalate()
                if poll is not None:
                    poll()

    def _deliver_held(self) -> None:
        if self._held is None or self.received_at is None:
            return
        if self.ready() or time.monotonic() - self.received_at > READY_WAIT_S or len(self.received) > 1:
            signum, self._held = self._held, None
            self.received_at = time.monotonic()
            if not (self.first_target is not None and self.first_target(signum)):
                self.send(signum)

    def _escalate(self) -> None:
        """A program that ignores a forwarded signal (a Python loop stuck in C code, a handler that swallows
        it) gets SIGTERM, then SIGKILL, ESCALATE_AFTER_S apart: Ctrl-C always ends it within seconds."""
        if self.received_at is None or self.proc.poll() is not None or self._held is not None:
            return
        if self.saving is not None and self.saving():
            self.received_at = time.monotonic()  # it is ending: its export must not be cut short
            return
        waited = time.monotonic() - self.received_at
        if waited < ESCALATE_AFTER_S:
            return
        nxt = signal.SIGTERM if len(self.received) < 2 else signal.SIGKILL
        say(f"the program is still running {waited:.0f} s after {signame(self.received[-1])}: sending "
            f"{signame(nxt)}")
        self.received.append(nxt)
        self.received_at = time.monotonic()
        if nxt == signal.SIGKILL:
            self.kill_group(signal.SIGKILL)
        else:
            self.send(nxt)

    def run(self, poll: Callable[[], None] | None = None) -> tuple[int, int, int]:
        """start, wait, restore the signal handlers: (return code, start ns, end ns) of the child."""
        start_ns = time.time_ns()
        self.start()
        try:
            rc = self.wait(poll)
        finally:
            self.restore()
        return rc, start_ns, time.time_ns()

    def restore(self) -> None:
        for s, old in self._old.items():
            try:
                signal.signal(s, old)
            except (ValueError, OSError, TypeError):
                pass
        self._old.clear()

    @property
    def interrupted_by(self) -> int | None:
        return self.received[0] if self.received else None


class StreamTee:
    """Copies one of the program's output streams to our own and to a file in the run directory (at most
    LIMIT_BYTES kept there, then a note), on a thread."""

    LIMIT_BYTES = 64 * 2**20

    def __init__(self, src: IO[bytes], dst: IO[bytes], path: Path) -> None:
        self.src, self.dst, self.path = src, dst, path
        self.thread = threading.Thread(target=self._pump, name=f"gpudoctor-tee-{path.name}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        out = getattr(self.dst, "buffer", self.dst)
        kept = 0
        try:
            f = open(self.path, "ab")
        except OSError:
            f = None
        while True:
            try:
                chunk = os.read(self.src.fileno(), 65536)
            except OSError:
                break
            if not chunk:
                break
            try:
                out.write(chunk)
                out.flush()
            except (OSError, ValueError):
                pass  # our own stdout went away (a closed pipe): the file still gets it
            if f is not None and kept < self.LIMIT_BYTES:
                f.write(chunk[: self.LIMIT_BYTES - kept])
                kept += len(chunk)
                if kept >= self.LIMIT_BYTES:
                    f.write(b"\n[gpudoctor: output past 64 MiB not kept here]\n")
                f.flush()
        if f is not None:
            f.close()

    def join(self, timeout: float = 5.0) -> None:
        self.thread.join(timeout)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when gpudoctor dies (even by SIGKILL), so a killed gpudoctor
    never leaves the program running unsupervised (Linux; elsewhere a no-op)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def stop_orphan(pgid: int, signum: int, grace_s: float = 10.0) -> None:
    """Signal a process group that outlived its supervisor, then SIGKILL it after ``grace_s``."""
    try:
        os.killpg(pgid, signum)
    except OSError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except OSError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
