"""Progress bars for work that takes more than a second: parsing big exports, analyzing many ranks.

One small API::

    from gpudoctor import progress

    with progress.task("Parsing rank0.nsys.sqlite") as bar:        # no total: a spinner and the time
        trace = read(path)

    with progress.task("Analyzing ranks", total=len(paths)) as bar:  # a bar, advanced by the caller
        for result in results:
            bar.advance()

    for path in progress.track(paths, "Reading"):                    # the same around an iterable
        ...

Nothing is drawn unless standard error is a terminal (never in CI logs, pipes or files), and a bar
appears only once its task has run for ``delay`` seconds (1 s by default), so quick commands print
nothing extra. Bars are transient: they disappear when the work ends, leaving the output as it was.
``GPUDOCTOR_PROGRESS=0`` turns them off, ``=1`` forces them on (e.g. to try them in a pipe). Tasks
opened while another is shown join the same display (one line each) instead of fighting over it.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import IO, Any, Iterable, Iterator, TypeVar

T = TypeVar("T")

DEFAULT_DELAY_S = 1.0

_lock = threading.RLock()
_display = None  # the shared rich Progress while any task is open
_open_tasks = 0


def enabled(stream: IO[str] | None = None) -> bool:
    """Whether bars are drawn: GPUDOCTOR_PROGRESS=0/1 decides, else only when ``stream`` is a terminal."""
    env = os.environ.get("GPUDOCTOR_PROGRESS", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    if os.environ.get("TERM") == "dumb":
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Bar:
    """Handle of one task. Every method is a no-op when bars are off."""

    def __init__(self, progress=None, task_id=None):
        self._progress = progress
        self._task = task_id
        self.completed = 0

    def advance(self, n: float = 1) -> None:
        self.completed += n
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, *, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if self._progress is not None:
            kw = {k: v for k, v in (("completed", completed), ("total", total), ("description", description))
                  if v is not None}
            self._progress.update(self._task, **kw)


def _new_display():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)


@contextmanager
def task(description: str, total: float | None = None, *, delay: float = DEFAULT_DELAY_S,
         show: bool | None = None) -> Iterator[Bar]:
    """A progress task for the duration of the ``with`` block; yields a :class:`Bar`.

    ``total``: units of work (None: unknown, a spinner). ``delay``: seconds before anything is drawn.
    ``show``: force on/off (default: :func:`enabled`).
    """
    global _display, _open_tasks
    if not (enabled() if show is None else show):
        yield Bar()
        return
    with _lock:
        if _display is None:
            _display = _new_display()
            _display._gd_started = False  # type: ignore[attr-defined]
        display = _display
        task_id = display.add_task(description, total=total, visible=False)
        _open_tasks += 1

    def reveal() -> None:
        with _lock:
            if _display is not display:
                return
            display.update(task_id, visible=True)
            if not display._gd_started:
                display._gd_started = True
                display.start()

    timer = threading.Timer(max(delay, 0.0), reveal)
    timer.daemon = True
    timer.start()
    try:
        yield Bar(display, task_id)
    finally:
        timer.cancel()
        with _lock:
            display.remove_task(task_id)
            _open_tasks -= 1
            if _open_tasks == 0:
                if display._gd_started:
                    display.stop()
                _display = None


def track(items: Iterable[T], description: str, total: float | None = None, **kw: Any) -> Iterator[T]:
    """Yield ``items`` while a task counts them (``total`` defaults to ``len(items)`` when it has one)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with task(description, total=total, **kw) as bar:
        for item in items:
            yield item
            bar.advance()
