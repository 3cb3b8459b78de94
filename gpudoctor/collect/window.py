"""The capture window: which steps of a running program are recorded.

A long job is not recorded whole. gpudoctor finds the program's step boundaries as it runs, skips the
warm-up (compilation, autotuning, allocator growth: the first steps, until step times settle), records a
window of K steps, and stops collecting. This module is the decision alone, a pure state machine fed with
boundary times (and clock ticks) by the in-process agent (``gpudoctor.collect.agent``); it imports only
the standard library, because it runs inside the profiled program.

Step boundaries come from several sources; the strongest one seen so far wins and weaker ones are ignored
from then on:

  ``annotate``   ``gpudoctor.annotate.step()`` in the program
  ``optimizer``  every ``torch.optim`` optimizer step (a global hook: any optimizer, HF Trainer, Lightning)
  ``forward``    the end of each outermost ``nn.Module`` forward call (inference and serving loops)
  ``time``       none of the above within ``no_step_wait_s``: a window of ``time_window_s`` seconds
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

SOURCE_RANK = {"time": 0, "forward": 1, "optimizer": 2, "annotate": 3}


@dataclass
class WindowSpec:
    steps: int = 12  # steps in the window
    skip: int | None = None  # steps skipped before it; None: until step times settle
    min_skip: int = 2  # auto: always skip at least this many (the first steps compile and autotune)
    max_skip: int = 60  # auto: start after this many skipped steps even if times never settle
    max_warmup_s: float = 90.0  # auto: ... or after this many seconds since the first boundary
    settle_steps: int = 3  # auto: settled when the last N step times are within settle_fraction
    settle_fraction: float = 0.15  # ... of their median
    delay_s: float = 0.0  # start no earlier than this after the program start
    duration_s: float | None = None  # window length in seconds instead of a step count
    no_step_wait_s: float = 20.0  # no boundary this long after the clock's origin: a time window
    max_origin_wait_s: float = 120.0  # a GPU program that has not touched the GPU by then: the start is the origin
    time_window_s: float = 10.0  # length of a time window (duration_s when given)
    max_window_s: float = 300.0  # a step window ends after this long even if its K steps did not end
    whole: bool = False  # record the whole program (no window)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> WindowSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Window:
    """State: waiting -> recording -> done. ``boundary()`` returns "start", "stop", "step" (a boundary
    inside the window) or None; ``tick()`` returns "start", "stop" or None."""

    spec: WindowSpec
    t0_ns: int  # program start
    state: str = "waiting"
    source: str | None = None  # the step source in use
    boundaries: int = 0  # boundaries seen from that source
    step_ns: list[int] = field(default_factory=list)  # durations of the steps seen from that source
    last_ns: int | None = None
    first_ns: int | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    start_step: int | None = None  # boundaries seen when recording started
    steps_recorded: int = 0
    started_how: str = ""
    stopped_how: str = ""
    notes: list[str] = field(default_factory=list)
    # The clock's origin for a time window: when the program first used the GPU (imports and model building
    # before that can take tens of seconds and are not worth recording), else the program start.
    origin_ns: int | None = None
    wait_for_origin: bool = False

    # ------------------------------------------------------------------ inputs

    def boundary(self, source: str, t_ns: int) -> str | None:
        """A step boundary from ``source`` at ``t_ns``: what to do now."""
        if self.state == "done":
            return None
        if self.source is not None and SOURCE_RANK[source] < SOURCE_RANK[self.source]:
            return None
        if self.spec.whole:
            return self._whole_boundary(source, t_ns)
        if self.source != source:
            if self.state == "recording":
                if self.source == "time":
                    return None  # a time window runs to its end
                if SOURCE_RANK[source] > SOURCE_RANK[self.source]:
                    # a stronger source appeared mid-window: restart counting the window's steps from it
                    self.notes.append(f"step source switched from {self.source} to {source} during the window")
                    self.source, self.step_ns, self.last_ns = source, [], t_ns
                    self.start_step, self.boundaries, self.steps_recorded = 0, 0, 0
                    return "step"
            self.source, self.step_ns, self.boundaries, self.last_ns = source, [], 0, None
            self.first_ns = t_ns
        if self.last_ns is not None:
            self.step_ns.append(t_ns - self.last_ns)
        self.last_ns = t_ns
        self.boundaries += 1
        if self.state == "waiting":
            if self._ready_to_start(t_ns):
                return self._start(t_ns, f"step boundary {self.boundaries} ({source})")
            return None
        if self.state == "recording":
            self.steps_recorded = self.boundaries - (self.start_step or 0)
            if self._window_full(t_ns):
                return self._stop(t_ns, f"after {self.steps_recorded} steps")
            return "step"
        return None

    def _whole_boundary(self, source: str, t_ns: int) -> str | None:
        if self.source != source:
            self.source, self.step_ns, self.last_ns, self.boundaries = source, [], None, 0
        if self.last_ns is not None:
            self.step_ns.append(t_ns - self.last_ns)
        self.last_ns = t_ns
        self.boundaries += 1
        self.steps_recorded = self.boundaries
        return "step" if self.state == "recording" else None

    def started(self, t_ns: int) -> None:
        """The recorder is running now: the window (and its first step) count from here, so that the
        profiler's own start-up (seconds, the first time) is not taken for a slow step."""
        self.start_ns = t_ns
        if self.last_ns is not None and self.source not in (None, "time"):
            self.last_ns = t_ns

    def start_whole(self, t_ns: int) -> str:
        return self._start(t_ns, "program start (whole program)")

    def tick(self, t_ns: int) -> str | None:
        """The clock: time windows, and the time limits of step windows."""
        if self.state == "done" or self.spec.whole:
            return None
        since_start_s = (t_ns - self.t0_ns) / 1e9
        origin = self.origin_ns
        if origin is None and (not self.wait_for_origin or since_start_s >= self.spec.max_origin_wait_s):
            origin = self.t0_ns
        if self.state == "waiting" and self.source is None and origin is not None and (
                (t_ns - origin) / 1e9 >= self.spec.no_step_wait_s and since_start_s >= self.spec.delay_s):
            self.source = "time"
            since = "the program's first GPU use" if origin == self.origin_ns else "the start"
            return self._start(t_ns, f"clock: no step boundary {self.spec.no_step_wait_s:g} s after {since}")
        if self.state == "recording":
            length_s = (t_ns - (self.start_ns or t_ns)) / 1e9
            if self.source == "time" and length_s >= (self.spec.duration_s or self.spec.time_window_s):
                return self._stop(t_ns, f"clock: {length_s:.1f} s window")
            if self.source != "time" and length_s >= self.spec.max_window_s:
                self.notes.append(f"the window reached its {self.spec.max_window_s:g} s limit before "
                                  f"{self.spec.steps} steps ended")
                return self._stop(t_ns, f"clock: {self.spec.max_window_s:g} s limit")
        return None

    # ------------------------------------------------------------------ rules

    def _ready_to_start(self, t_ns: int) -> bool:
        if (t_ns - self.t0_ns) / 1e9 < self.spec.delay_s:
            return False
        skipped = self.boundaries - 1  # the first boundary opens step 1
        if self.spec.skip is not None:
            return skipped >= self.spec.skip
        if skipped < self.spec.min_skip:
            return False
        if skipped >= self.spec.max_skip:
            self.notes.append(f"step times had not settled after {skipped} steps: recording anyway")
            return True
        if self.first_ns is not None and (t_ns - self.first_ns) / 1e9 >= self.spec.max_warmup_s:
            self.notes.append(f"step times had not settled {self.spec.max_warmup_s:g} s after the first step: "
                              "recording anyway")
            return True
        return self.settled()

    def settled(self) -> bool:
        n = self.spec.settle_steps
        recent = self.step_ns[-n:]
        if len(recent) < n:
            return False
        mid = statistics.median(recent)
        return mid > 0 and all(abs(d - mid) <= self.spec.settle_fraction * mid for d in recent)

    def _window_full(self, t_ns: int) -> bool:
        if self.spec.duration_s:
            return (t_ns - (self.start_ns or t_ns)) / 1e9 >= self.spec.duration_s
        return self.steps_recorded >= self.spec.steps

    def _start(self, t_ns: int, how: str) -> str:
        self.state, self.start_ns, self.started_how = "recording", t_ns, how
        self.start_step = self.boundaries
        return "start"

    def _stop(self, t_ns: int, how: str) -> str:
        self.state, self.end_ns, self.stopped_how = "done", t_ns, how
        return "stop"

    def finish(self, t_ns: int, how: str) -> str | None:
        """The program ends or is stopped: close an open window."""
        if self.state == "recording":
            return self._stop(t_ns, how)
        self.state = "done"
        return None

    def summary(self) -> dict:
        """What the window was, for the run's manifest."""
        return {
            "step_source": self.source, "steps_seen": self.boundaries,
            "skipped_steps": max(self.start_step - 1, 0) if self.start_step is not None else None,
            "steps_recorded": self.steps_recorded, "start_ns": self.start_ns, "end_ns": self.end_ns,
            "started": self.started_how, "stopped": self.stopped_how,
            "median_step_ms": round(statistics.median(self.step_ns) / 1e6, 3) if self.step_ns else None,
            "whole_program": self.spec.whole, "spec": self.spec.to_dict(), "notes": self.notes,
        }
