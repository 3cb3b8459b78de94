"""Annotations that every gpudoctor backend sees. All of them are no-ops without a GPU or torch.

    import gpudoctor.annotate as ga

    with ga.range("data"):          # or @ga.range("forward") on a function
        batch = next(loader)
    ...
    ga.step()                       # once per iteration, at its end (like torch.profiler's prof.step())
    ga.kv_cache(used_tokens=1234, allocated_tokens=4096, block_tokens=16)

``range(name)``
    An NVTX push/pop range (``torch.cuda.nvtx`` when torch with CUDA is imported, else the ``nvtx``
    package when installed) and, while a torch profiler is recording, a ``record_function`` range of the
    same name. Works as a context manager and as a decorator (a fresh range per call, so recursion and
    threads are fine).

``step()``
    Marks the boundary between two steps: it ends the current step range and starts the next one, named
    ``ProfilerStep#N`` (N counts from 1). Under ``gpudoctor profile --backend torch`` it calls the
    in-process profiler's ``prof.step()`` (which writes the ``ProfilerStep#N`` ranges and drives the
    ``--delay``/``--duration`` window); otherwise it writes an NVTX start/end range (not push/pop, so it
    never upsets the nesting of your own ranges) and, under a torch profiler of your own, a
    ``record_function`` range. The first range starts at the first call: the iteration before it is
    warm-up and is not a step. The last open range is ended when the process exits.

``counter(name, **values)`` / ``kv_cache(used_tokens=, allocated_tokens=, block_tokens=None)``
    A sample of named values at this moment, recorded as a range of (nearly) zero length whose text is::

        gpudoctor.counter <name> <key>=<value> [<key>=<value> ...]

    e.g. ``gpudoctor.counter kv_cache used_tokens=1234 allocated_tokens=4096 block_tokens=16``.
    ``<name>`` and ``<key>`` match ``[A-Za-z_][A-Za-z0-9_.]*``; ``<value>`` is a decimal int or float as
    Python's ``repr`` writes it (``nan``/``inf`` allowed); pairs are separated by one space and keep the
    order given. It is written as an NVTX start/end range (seen by Nsight Systems) and, while a torch
    profiler records, as a ``record_function`` of the same text (a ``user_annotation`` event in the
    Chrome trace). ``parse_counter(text)`` reads the text back: ``("kv_cache", {"used_tokens": 1234.0,
    ...})``, or None for any other text. Each pair becomes one counter sample named
    ``<name>.<key>`` (``kv_cache.used_tokens``) at the range's start time.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import sys
import threading

__all__ = ["range", "step", "counter", "kv_cache", "parse_counter", "COUNTER_PREFIX"]

COUNTER_PREFIX = "gpudoctor.counter "
STEP_PREFIX = "ProfilerStep#"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_COUNTER = re.compile(r"^gpudoctor\.counter ([A-Za-z_][A-Za-z0-9_.]*)((?: [A-Za-z_][A-Za-z0-9_.]*=\S+)*)$")

# ---------------------------------------------------------------------------------------------------
# NVTX: resolved lazily, once (again if torch is imported later)


class _Nvtx:
    """push/pop/start/end/mark of whichever NVTX binding works here; every call is a cheap no-op otherwise."""

    def __init__(self):
        self.kind = "none"
        self.with_torch = "torch" in sys.modules
        self._push = self._pop = self._start = self._end = None
        torch = sys.modules.get("torch")
        if torch is not None and getattr(getattr(torch, "version", None), "cuda", None):
            try:
                nv = torch.cuda.nvtx
                nv.range_pop  # noqa: B018 - attribute check
                self._push, self._pop, self._start, self._end = nv.range_push, nv.range_pop, nv.range_start, nv.range_end
                self.kind = "torch.cuda.nvtx"
                return
            except Exception:  # pragma: no cover - broken torch install
                pass
        try:
            import nvtx  # the NVTX Python package (pip install nvtx)

            self._push = lambda msg: nvtx.push_range(message=msg)
            self._pop = nvtx.pop_range
            self._start = lambda msg: nvtx.start_range(message=msg)
            self._end = nvtx.end_range
            self.kind = "nvtx"
        except Exception:
            pass

    def _call(self, fn, *args):
        try:
            return True, fn(*args)
        except Exception:  # e.g. a CPU-only torch: "NVTX functions not installed"
            self._push = self._pop = self._start = self._end = None
            self.kind = "none"
            return False, None

    def push(self, msg: str) -> bool:
        """True when a range was pushed (and must be popped)."""
        return self._push is not None and self._call(self._push, msg)[0]

    def pop(self) -> None:
        if self._pop is not None:
            self._call(self._pop)

    def start(self, msg: str):
        """A handle for end(), or None when nothing was started."""
        return self._call(self._start, msg)[1] if self._start is not None else None

    def end(self, handle) -> None:
        if handle is not None and self._end is not None:
            self._call(self._end, handle)


_nvtx_impl: _Nvtx | None = None


def _nvtx() -> _Nvtx:
    global _nvtx_impl
    impl = _nvtx_impl
    if impl is None or (not impl.with_torch and "torch" in sys.modules):
        impl = _nvtx_impl = _Nvtx()
    return impl


def nvtx_kind() -> str:
    """Which NVTX binding annotations use here: "torch.cuda.nvtx", "nvtx" or "none"."""
    return _nvtx().kind


# ---------------------------------------------------------------------------------------------------
# torch profiler


def _torch_recording():
    """torch's autograd.profiler module when torch is imported and a profiler records, else None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.autograd._profiler_enabled():
            return torch.autograd.profiler
    except Exception:
        pass
    return None


# Set by gpudoctor.collect.torch_backend while it profiles this process: called by step().
_backend_step_hook = None


def _set_backend_step_hook(hook) -> None:
    global _backend_step_hook
    _backend_step_hook = hook


# ---------------------------------------------------------------------------------------------------
# range


class range(contextlib.ContextDecorator):  # noqa: A001 - the public name is the point
    """An annotated range: ``with range("name"):`` or ``@range("name")``."""

    __slots__ = ("name", "_pushed", "_rf")

    def __init__(self, name: str):
        self.name = str(name)
        self._pushed = False
        self._rf = None

    def _recreate_cm(self):  # a decorator gets a fresh range per call
        return type(self)(self.name)

    def __enter__(self):
        self._pushed = _nvtx().push(self.name)
        prof = _torch_recording()
        if prof is not None:
            try:
                rf = prof.record_function(self.name)
                rf.__enter__()
                self._rf = rf
            except Exception:
                self._rf = None
        return self

    def __exit__(self, *exc):
        rf, self._rf = self._rf, None
        if rf is not None:
            try:
                rf.__exit__(None, None, None)
            except Exception:
                pass
        if self._pushed:
            self._pushed = False
            _nvtx().pop()
        return False


# ---------------------------------------------------------------------------------------------------
# step

_step_lock = threading.Lock()
_step_num = 0
_step_nvtx = None  # handle of the open NVTX step range
_step_rf = None  # open record_function step range (own torch profiler only)


def step() -> None:
    """End the current step and start the next (call once per iteration, at its end)."""
    global _step_num, _step_nvtx, _step_rf
    with _step_lock:
        _step_num += 1
        name = f"{STEP_PREFIX}{_step_num}"
        nv = _nvtx()
        nv.end(_step_nvtx)
        _step_nvtx = nv.start(name)
        hook = _backend_step_hook
        rf, _step_rf = _step_rf, None
        if rf is not None:
            try:
                rf.__exit__(None, None, None)
            except Exception:
                pass
        if hook is not None:
            hook()  # the gpudoctor torch backend: prof.step() writes the ProfilerStep ranges
            return
        prof = _torch_recording()
        if prof is not None:
            try:
                rf = prof.record_function(name)
                rf.__enter__()
                _step_rf = rf
            except Exception:
                _step_rf = None


def _end_open_step() -> None:
    global _step_nvtx, _step_rf
    with _step_lock:
        handle, _step_nvtx = _step_nvtx, None
        rf, _step_rf = _step_rf, None
    if rf is not None:
        try:
            rf.__exit__(None, None, None)
        except Exception:
            pass
    if handle is not None and _nvtx_impl is not None:
        _nvtx_impl.end(handle)


atexit.register(_end_open_step)


# ---------------------------------------------------------------------------------------------------
# counters


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def counter_text(name: str, **values: float | None) -> str:
    """The annotation text of one counter sample (see the module docstring)."""
    if not _NAME.match(name):
        raise ValueError(f"counter name {name!r} must match [A-Za-z_][A-Za-z0-9_.]*")
    parts = [COUNTER_PREFIX + name]
    for key, value in values.items():
        if value is None:
            continue
        if not _NAME.match(key):
            raise ValueError(f"counter key {key!r} must match [A-Za-z_][A-Za-z0-9_.]*")
        parts.append(f"{key}={_fmt(value)}")
    return " ".join(parts)


def counter(name: str, **values: float | None) -> None:
    """Record one sample of named values (None values are left out)."""
    text = counter_text(name, **values)
    nv = _nvtx()
    nv.end(nv.start(text))
    prof = _torch_recording()
    if prof is not None:
        try:
            with prof.record_function(text):
                pass
        except Exception:
            pass


def kv_cache(used_tokens: int, allocated_tokens: int, block_tokens: int | None = None, **extra: float | None) -> None:
    """Record how many KV-cache token slots hold live tokens vs are allocated (and the block size)."""
    counter("kv_cache", used_tokens=used_tokens, allocated_tokens=allocated_tokens, block_tokens=block_tokens,
            **extra)


def parse_counter(text: str) -> tuple[str, dict[str, float]] | None:
    """``"gpudoctor.counter kv_cache used_tokens=3 ..."`` -> ``("kv_cache", {"used_tokens": 3.0, ...})``."""
    if not isinstance(text, str) or not text.startswith(COUNTER_PREFIX):
        return None
    m = _COUNTER.match(text)
    if not m:
        return None
    values: dict[str, float] = {}
    for pair in m.group(2).split():
        key, _, raw = pair.partition("=")
        try:
            values[key] = float(raw)
        except ValueError:
            return None
    return m.group(1), values
