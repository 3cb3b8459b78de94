"""A sampler of the program's Python call stack, run inside the program during the capture window.

Tracing every Python call (torch.profiler ``with_stack``) slows Python code 2x and more, which inflates
exactly the host gaps that gpu_idle charges to the user's lines; Nsight Systems' own Python sampling
leaves nothing in its SQLite export. So the agent samples the main thread's stack itself.

How: a wall-clock interval timer (``setitimer(ITIMER_REAL)``, SIGALRM every ``interval_s``) whose handler
runs in the main thread at its next bytecode boundary and reads the frame it interrupted. The kernel
delivers the signal whatever holds the GIL, so pure-Python stretches are sampled as densely as waits;
a signal that arrives during a blocking call (``.item()`` waiting for the GPU, a launch) is handled when
the call returns, with the frame of the line that made it. Each sample stands for the time since the
previous one (so a signal skipped because it arrived while a sample was being taken, counted as
``nested``, loses no time). A sampler thread is the fallback when the program owns SIGALRM or the timer already (it
can only sample where the main thread releases the GIL, so it favours blocking calls; the file says
which method was used).

Clock: samples carry ``time.monotonic_ns()``. The trace has its own clock, so at the start and the end
the sampler emits a marker range (``ANCHOR``) through the recorder (an NVTX range for nsys, a
``record_function`` for torch.profiler) and notes its own time at the marker; the reader
(``gpudoctor.readers.pysamples``) maps samples onto the trace's clock from the marker ranges it finds.

Standard library only: it runs inside the profiled program.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Callable

ANCHOR = "gpudoctor.pysamples.anchor"
FORMAT = "gpudoctor.pysamples"
MAX_SAMPLES = 2_000_000  # about 30 minutes at 1 kHz: far beyond a window; later samples are counted, not kept


class PythonSampler:
    def __init__(self, path: str, interval_s: float = 0.001, thread_ident: int | None = None):
        self.path, self.interval_s = path, interval_s
        main = threading.main_thread()
        self.thread_ident = thread_ident if thread_ident is not None else main.ident
        self.native_tid = getattr(main, "native_id", None)
        self._frame_ids: dict[tuple[str, int, str], int] = {}
        self._stack_ids: dict[tuple[int, ...], int] = {}
        self.t_ns: list[int] = []
        self.stack: list[int] = []
        self.anchors: list[dict] = []
        self.overflow = 0
        self.nested = 0  # signals that arrived while a sample was being taken (skipped, counted)
        self._in_sample = False
        self._quit = threading.Event()
        self._thread: threading.Thread | None = None
        self.method = ""  # "signal" or "thread"
        self.notes: list[str] = []
        self._old_handler = None
        self.busy_ns = 0  # time the sampler itself spent sampling (its cost to the program)

    # ------------------------------------------------------------------ control (main thread)

    def start(self, mark: Callable[[str], object] | None) -> None:
        """Begin sampling; ``mark(name)`` emits a marker range on the trace's clock (None: no anchors)."""
        self._anchor(mark)
        if self._signal_free():
            self.method = "signal"
            self._old_handler = signal.signal(signal.SIGALRM, self._on_signal)
            # signal.signal makes the program's blocking system calls fail with EINTR when the signal
            # arrives; native code that does not retry (a C++ loader's read, a store's socket) would see an
            # error a thousand times a second. Restarted calls run the handler when they return instead.
            signal.siginterrupt(signal.SIGALRM, False)
            signal.setitimer(signal.ITIMER_REAL, self.interval_s, self.interval_s)
        else:
            self.method = "thread"
            self._thread = threading.Thread(target=self._run, name="gpudoctor-pysampler", daemon=True)
            self._thread.start()

    @staticmethod
    def _signal_free() -> bool:
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
            return False
        return signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None) and \
            signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)

    def stop(self, mark: Callable[[str], object] | None) -> dict:
        """Stop, emit the closing marker, write the file. Returns a summary for the status file."""
        self._quit.set()
        if self.method == "signal":
            # The program may have taken SIGALRM or the timer over meanwhile (signal.alarm, its own
            # handler): then both are its own now and are left as they are.
            ours = signal.getsignal(signal.SIGALRM) == self._on_signal
            timer = signal.getitimer(signal.ITIMER_REAL)
            if ours and abs(timer[1] - self.interval_s) < 1e-9:
                signal.setitimer(signal.ITIMER_REAL, 0.0, 0.0)
            else:
                self.notes.append("the program took over SIGALRM or the interval timer during the window: "
                                  "sampling stopped there, and they were left to the program")
            if ours:
                signal.signal(signal.SIGALRM, self._old_handler if self._old_handler is not None else signal.SIG_DFL)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._anchor(mark)
        self.write()
        return {"path": self.path, "method": self.method, "notes": self.notes, "samples": len(self.t_ns), "stacks": len(self._stack_ids),
                "interval_s": self.interval_s, "overflow": self.overflow, "nested": self.nested,
                "sampler_busy_ms": round(self.busy_ns / 1e6, 1)}

    def _anchor(self, mark) -> None:
        if mark is None:
            return
        t0 = time.monotonic_ns()
        mark(ANCHOR)
        t1 = time.monotonic_ns()
        self.anchors.append({"t_ns": (t0 + t1) // 2, "width_ns": t1 - t0})

    # ------------------------------------------------------------------ sampling

    def _on_signal(self, signum, frame) -> None:
        # Python runs a handler between bytecodes, also those of a handler still running: on a loaded
        # machine a second SIGALRM can land inside _record and would hand out a frame id twice. The guard
        # comes first, so that the window before it is as short as can be.
        if self._in_sample:
            self.nested += 1
            return
        self._in_sample = True
        try:
            began = time.monotonic_ns()
            if frame is not None and not self._quit.is_set():
                self._record(began, frame)
        finally:
            self._in_sample = False

    def _run(self) -> None:
        current, ident = sys._current_frames, self.thread_ident
        while not self._quit.wait(self.interval_s):
            began = time.monotonic_ns()
            f = current().get(ident)
            if f is None:
                return  # the main thread is gone
            self._record(began, f)

    def _record(self, began: int, f) -> None:
        frame_ids, stack_ids, t_ns, stacks = self._frame_ids, self._stack_ids, self.t_ns, self.stack
        key = []
        # A signal that landed in this handler before its guard was set: the program's frame is the caller.
        while f is not None and f.f_code in _OWN_CODE:
            f = f.f_back
        while f is not None:  # innermost first
            code = f.f_code
            fk = (code.co_filename, f.f_lineno or 0, code.co_name)
            fid = frame_ids.get(fk)
            if fid is None:
                fid = frame_ids[fk] = len(frame_ids)
            key.append(fid)
            f = f.f_back
        del f
        sk = tuple(key)
        sid = stack_ids.get(sk)
        if sid is None:
            sid = stack_ids[sk] = len(stack_ids)
        if len(t_ns) < MAX_SAMPLES:
            stacks.append(sid)
            t_ns.append(began)  # last: a sample whose time is written is whole (see to_dict)
        else:
            self.overflow += 1
        self.busy_ns += time.monotonic_ns() - began

    # ------------------------------------------------------------------ output

    def to_dict(self) -> dict:
        frames = sorted(self._frame_ids, key=self._frame_ids.__getitem__)
        stacks = sorted(self._stack_ids, key=self._stack_ids.__getitem__)
        # A signal's exception (the program being stopped) may cut a sample between its two appends.
        n = len(self.t_ns)
        cut = max(len(self.stack) - n, 0)
        del self.stack[n:]
        return {"format": FORMAT, "version": 1, "pid": os.getpid(), "thread_native_id": self.native_tid,
                "method": self.method,
                "clock": "monotonic_ns", "interval_s": self.interval_s, "anchors": self.anchors,
                "frames": [list(f) for f in frames],
                "stacks": [list(s) for s in stacks],  # frame ids, innermost first
                "t_ns": self.t_ns, "stack": self.stack, "overflow": self.overflow,
                "nested": self.nested, "cut": cut, "sampler_busy_ns": self.busy_ns}

    def write(self) -> None:
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(self.to_dict(), fh, separators=(",", ":"))
        os.replace(tmp, self.path)


_OWN_CODE = frozenset({PythonSampler._on_signal.__code__, PythonSampler._record.__code__})
