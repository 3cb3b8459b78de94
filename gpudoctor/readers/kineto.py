"""PyTorch profiler / Kineto Chrome-trace JSON (``export_chrome_trace``) -> trace model.

``read(path, rank=None) -> Trace`` reads ``.json`` and gzip-compressed files (gzip is recognized by its
magic bytes, not by the extension).

Parsing and memory
    The reader streams the file in 16 MB blocks whatever its layout (Kineto's one event per block, or
    one-line JSON from orjson / ``json.dumps``): ``gpudoctor.readers.event_split`` cuts the event array
    at the file's own separator between events and checks each batch (see there). Events the model
    does not use are never parsed nor cut out: most cpu_op, python_function, gpu_user_annotation and
    flow events, recognized by their first bytes (``_Skipper``: one regex pass over the batch's text
    finds the separators *not* followed by such a prefix; the cpu_ops kept, ProfilerStep#N,
    record_param_comms, the c10d collectives and ``SHAPE_OPS``, are told apart by name in the same
    pattern; the skipped ones are only counted, with ``bytes.count``). Each kept event is parsed from
    its own text: kernels, memcpy / memset and runtime / driver calls into typed records holding only
    the fields used (msgspec, ``readers/kineto_events.py``), the others with orjson; then turned into
    numpy columns before reading on, so only one batch of parsed events is alive at a time: memory is
    bounded by the block size and the model, not by the file. The block buffers stay on the heap
    during the read (``readers/heap.py``) rather than being mapped and unmapped for every block. On
    any failure the reader starts over and parses the whole document at once (the path that also
    reports bad input, and reads what orjson refuses: NaN, huge integers); both paths give the same
    tables (tests/test_kineto_reader.py checks it on every real trace at hand).
    Skipped events are not validated as JSON. The cyclic GC is paused during a read (millions of
    acyclic objects). Output rows are sorted by time, so the result does not depend on the path or
    the batching.

Times
    ``ts``/``dur`` are microseconds (the Chrome trace rule; Kineto writes µs with 3 decimals, relative
    to ``baseTimeNanoseconds``, whatever ``displayTimeUnit`` says). Absolute ns = ts * 1000 +
    baseTimeNanoseconds (clock_source "baseTimeNanoseconds"), or ts * 1000 when the file has no base
    (clock_source "trace"). The µs -> ns step splits integer and fraction so that it is exact for the
    3-decimal values Kineto writes (while the float64 can hold them to better than 0.5 ns, i.e. up to
    ~100 days after the base). The unit is decided once per file from its *median* timestamp: ts are
    read as nanoseconds only when that median is impossible as µs (more than a year after
    baseTimeNanoseconds, or past the year 2190 without one), so one odd timestamp cannot switch a file;
    ``meta["torch_profiler"]["ts_unit"]`` says which reading was used. Events that cannot be placed are
    dropped and counted in ``dropped`` by reason: ts or dur missing or not a number, a negative dur, a
    ts more than a year from the file's median, or an absolute time outside int64 nanoseconds (never
    wrapped around).

What becomes what
    kernel -> kernels (+ collectives for NCCL kernels: op and sizes from record_param_comms arguments,
    else the op of the ``nccl:<op>`` / ``c10d::`` / TorchRec range around the launch, else the kernel
    name; gpudoctor/model/collectives.py); gpu_memcpy / gpu_memset -> memops;
    cuda_runtime / cuda_driver -> api_calls; user_annotation -> ranges (domain "record_function"),
    ProfilerStep#N (cpu_op or user_annotation) -> ranges (domain "profiler_step"), with depth and GPU
    projection; CUDA "[memory]" instants -> memory_events and counters; deviceProperties -> devices;
    cpu_op events of the operators analyzers use (``SHAPE_OPS``: matrix products, attention,
    convolution, softmax) -> cpu_ops, with ``External id``, ``Sequence number`` and, when the profile
    was taken with ``record_shapes``, ``Input Dims`` / ``Input type`` as JSON text. The other cpu_op
    events, python_function, gpu_user_annotation and the other known Kineto categories are not part
    of the model: they are counted in ``meta["torch_profiler"]["event_counts"]`` (cpu_op, all of
    them, also in ``meta["cpu_op_count"]``). Events of devices gpudoctor does not model (MTIA, HPU,
    XPU, ...: categories such as ``mtia_ccp_events``, and their ``[memory]`` events) are counted in
    ``dropped`` as "events of device type X not analyzed" (with "the trace has no CUDA/HIP kernels"
    when that is so). Unknown categories and unusable events are counted in ``dropped`` too.
"""

from __future__ import annotations

import codecs
import gc
import json
import multiprocessing
import operator
import os
import pickle
import re
from collections import Counter
from itertools import compress, repeat
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from gpudoctor.errors import InputError, one_line
from gpudoctor.model.categories import categorize_kernels, short_names
from gpudoctor.model.collectives import (
    collective_op,
    enclosing_ops,
    op_of_kernel,
    range_op,
)
from gpudoctor.model.columns import per_value
from gpudoctor.model.joins import first_match
from gpudoctor.model.projection import nesting_depth, project_ranges
from gpudoctor.model.trace import Trace, conform
from gpudoctor.readers import kineto_events, limits, rank_from_filename
from gpudoctor.readers.event_split import (
    BLOCK_BYTES,
    BOM,
    EventSplitter,
    NotStreamable,
    Window,
    find_cut,
    join_header,
    parse_bodies,
)
from gpudoctor.readers.heap import large_buffers_on_heap
from gpudoctor.readers.kineto_stacks import add_python_stacks
from gpudoctor.readers.limits import gunzip, open_input

_loads = orjson.loads

FORMAT = "kineto_json"
SOURCE = "kineto"

_GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = BLOCK_BYTES  # bytes read per streaming step
_TWO_PROCESS_MIN_BYTES = 256 << 20  # plain files at least this large are read in two halves at once
_FEED_CHUNK = 200_000  # events per batch on the whole-document path

# Kineto category names (older versions used capitalized names for some).
_CAT_ALIASES = {
    "kernel": "kernel",
    "gpu_memcpy": "gpu_memcpy",
    "memcpy": "gpu_memcpy",
    "gpu_memset": "gpu_memset",
    "memset": "gpu_memset",
    "cuda_runtime": "cuda_runtime",
    "runtime": "cuda_runtime",
    "cuda_driver": "cuda_driver",
    "driver": "cuda_driver",
    "cpu_op": "cpu_op",
    "operator": "cpu_op",
    "user_annotation": "user_annotation",
}
# Categories Kineto writes that the model does not hold (counted in meta, not "dropped").
_KNOWN_UNMODELED = {
    "python_function", "gpu_user_annotation", "overhead", "trace", "cuda_sync", "cpu_instant_event",
    "cuda_profiler_range", "fwdbwd", "ac2g", "kineto", "collective_comm",
}
_FLOW_PHASES = {"s", "t", "f"}
# Kineto categories of devices gpudoctor does not model, by their prefix (mtia_ccp_events, mtia_runtime,
# hpu_op, xpu_runtime, gcu_driver, privateuse1_runtime, ...) -> the device type named to the user.
_OTHER_DEVICE_PREFIXES = {"mtia": "MTIA", "hpu": "HPU", "xpu": "XPU", "gcu": "GCU", "glow": "Glow",
                          "privateuse1": "PrivateUse1", "mps": "MPS", "xla": "XLA", "ipu": "IPU"}
# c10::DeviceType codes of "[memory]" events, other than CPU (0) and CUDA (1; HIP builds report CUDA too).
_C10_DEVICE_TYPES = {6: "HIP", 7: "FPGA", 8: "MAIA", 9: "XLA", 10: "Vulkan", 11: "Metal", 12: "XPU",
                     13: "MPS", 14: "Meta", 15: "HPU", 16: "VE", 17: "Lazy", 18: "IPU", 19: "MTIA",
                     20: "PrivateUse1"}

_PROFILER_STEP = "ProfilerStep#"
_PARAM_COMMS = "record_param_comms"
_C10D = "c10d::"
_SPECIAL_CPU_OPS = (_PROFILER_STEP, _PARAM_COMMS, _C10D)

# cpu_op events kept in the cpu_ops table (the rest are only counted): the operators whose shapes the
# analyzers read (matrix products and softmax: analyzers/low_tensor_core.py MM_OPS,
# analyzers/unfused_attention.py GEMM_OPS / SOFTMAX_OPS) and their close kin, one op per level that
# carries the shapes: linear, scaled-dot-product attention (the call, and the backend op it chose,
# forward and backward) and convolution (aten::convolution: conv1d/2d/3d/transpose all go through it;
# not its inner _convolution / cudnn_convolution, which repeat the shapes). Every kept op is parsed, so
# the set stays small; elementwise and view ops (most of a trace) stay unparsed.
SHAPE_OPS = frozenset({
    "aten::mm", "aten::bmm", "aten::matmul", "aten::addmm", "aten::baddbmm", "aten::addbmm",
    "aten::_addmm_activation", "aten::addmv", "aten::mv", "aten::dot", "aten::linear", "aten::einsum",
    "aten::_scaled_mm", "aten::_int_mm",
    "aten::softmax", "aten::_softmax", "aten::_softmax_backward_data", "aten::_masked_softmax",
    "aten::scaled_dot_product_attention", "aten::convolution", "aten::convolution_backward",
})
# ... and every op whose name starts with one of these (aten::_scaled_dot_product_flash_attention,
# ..._efficient_attention, ..._cudnn_attention, ..._flash_attention_backward, ...).
SHAPE_OP_PREFIXES = ("aten::_scaled_dot_product_",)

_NCCL_RE = re.compile(r"nccl", re.I)
# c10 ScalarType names (Kineto "dtype") -> (torch dtype name, bytes per element).
_DTYPES = {
    "Byte": ("uint8", 1), "Char": ("int8", 1), "Short": ("int16", 2), "Int": ("int32", 4),
    "Long": ("int64", 8), "Half": ("float16", 2), "Float": ("float32", 4), "Double": ("float64", 8),
    "ComplexHalf": ("complex32", 4), "ComplexFloat": ("complex64", 8), "ComplexDouble": ("complex128", 16),
    "Bool": ("bool", 1), "QInt8": ("qint8", 1), "QUInt8": ("quint8", 1), "QInt32": ("qint32", 4),
    "BFloat16": ("bfloat16", 2), "Float8_e5m2": ("float8_e5m2", 1), "Float8_e4m3fn": ("float8_e4m3fn", 1),
    "Float8_e5m2fnuz": ("float8_e5m2fnuz", 1), "Float8_e4m3fnuz": ("float8_e4m3fnuz", 1),
    "Float8_e8m0fnu": ("float8_e8m0fnu", 1), "UInt16": ("uint16", 2), "UInt32": ("uint32", 4),
    "UInt64": ("uint64", 8), "Float4_e2m1fn_x2": ("float4_e2m1fn_x2", 1),
}
_DTYPE_SIZES = {name: size for name, size in _DTYPES.values()}
# dtype tokens in NCCL kernel names (ncclDevKernel_AllReduce_Sum_bf16_RING_LL, older ..._float).
_NCCL_DTYPE_TOKENS = {
    "i8": "int8", "int8_t": "int8", "u8": "uint8", "uint8_t": "uint8", "i32": "int32", "int32_t": "int32",
    "u32": "uint32", "uint32_t": "uint32", "i64": "int64", "int64_t": "int64", "u64": "uint64",
    "uint64_t": "uint64", "f16": "float16", "half": "float16", "f32": "float32", "float": "float32",
    "f64": "float64", "double": "float64", "bf16": "bfloat16", "__nv_bfloat16": "bfloat16",
    "f8e4m3": "float8_e4m3fn", "f8e5m2": "float8_e5m2", "int8": "int8", "uint8": "uint8",
    "int32": "int32", "uint32": "uint32", "int64": "int64", "uint64": "uint64",
}

_MEMCPY_RE = re.compile(r"^\s*Memcpy\s+(\w+)\s*(?:\(\s*(.*?)\s*->\s*(.*?)\s*\))?", re.I)
_MEMSET_RE = re.compile(r"^\s*Memset\s*(?:\(\s*(.*?)\s*\))?", re.I)
_MEMCPY_KINDS = {
    "htod": "memcpy_htod", "dtoh": "memcpy_dtoh", "dtod": "memcpy_dtod", "htoh": "memcpy_htoh",
    "ptop": "memcpy_peer", "htoa": "memcpy_htod", "atoh": "memcpy_dtoh", "atoa": "memcpy_dtod",
    "atod": "memcpy_dtod", "dtoa": "memcpy_dtod",
}
_MEMORY_KINDS = {
    "pageable": "pageable", "pinned": "pinned", "device": "device", "array": "array",
    "managed": "managed", "device static": "device", "managed static": "managed", "unknown": "unknown",
}

# tensorboard_trace_handler names files "<hostname>_<pid>.<ms>.pt.trace.json[.gz]".
_TB_NAME_RE = re.compile(r"^(?P<host>.+)_(?P<pid>\d+)\.\d+\.pt\.trace\.json(?:\.gz)?$")
# Start of an event body (after its '{"') that the model does not need: flow events, and cpu_op /
# python_function / gpu_user_annotation events except ProfilerStep#N and record_param_comms.
_SKIP_RE = re.compile(
    rb'ph"\s*:\s*"(?:([stf])"|X"\s*,\s*"cat"\s*:\s*"(cpu_op|python_function|gpu_user_annotation)"\s*,'
    rb'\s*"name"\s*:\s*"(?!ProfilerStep#|record_param_comms"))')
# How the names of the cpu_op events that are parsed begin in the raw text (after the opening quote):
# ProfilerStep#N, record_param_comms, the c10d collectives and SHAPE_OPS.
_C10D_OPS = (b"allreduce", b"allgather", b"_allgather", b"alltoall", b"reduce", b"_reduce_scatter", b"broadcast",
             b"send", b"recv", b"gather", b"scatter", b"barrier", b"allreduce_coalesced", b"all_to_all")
_TAKE_BACK_NAMES = (b"ProfilerStep#", b'record_param_comms"') + tuple(b"c10d::" + op for op in _C10D_OPS) + tuple(
    sorted(n.encode() + b'"' for n in SHAPE_OPS)) + tuple(p.encode() for p in SHAPE_OP_PREFIXES)
_SKIP_KEYS = {b"s": ("flow", None), b"t": ("flow", None), b"f": ("flow", None), b"cpu_op": ("X", "cpu_op"),
              b"python_function": ("X", "python_function"), b"gpu_user_annotation": ("X", "gpu_user_annotation")}

_EMPTY: dict = {}
_NEG3 = kineto_events.NEG3  # the typed events' default: both sides fill the same way
_US_PER_YEAR = 3.2e13  # µs
_NS_YEAR_2190 = 7.0e18
_NS_INT64_SAFE = 9.0e18  # |ns| at or above this could wrap int64 once rounded


# --------------------------------------------------------------------------------------------------
# public API


def read(path: str | Path, rank: int | None = None) -> Trace:
    """Read one PyTorch profiler Chrome trace (``.json`` / ``.json.gz``) into a Trace.

    ``rank``: the rank of this file; given, it wins over ``distributedInfo.rank`` in the file and a
    ``rankN`` in the file name (else rank 0).
    """
    path = Path(path)
    _check_file(path)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of acyclic objects: the cyclic GC would rescan them over and over (4x slower)
    try:
        with large_buffers_on_heap():
            trace = _read(path, rank)
        add_python_stacks(trace, path)  # with_stack traces: Python call stacks
        return trace
    finally:
        if gc_was_enabled:
            gc.enable()


def _read(path: Path, rank: int | None, stream: bool = True) -> Trace:
    """``stream=False`` takes the whole-document path directly (tests prove both paths equal)."""
    acc = _Accumulator()
    header: dict | None = None
    parser, layout = "stream", ""
    if not stream:
        parser = "whole (asked)"
    else:
        if _two_processes(path):
            try:
                header, layout = _stream_two(path, acc)
                parser = "stream (2 processes)"
            except InputError:  # corrupt gzip or past a limit: the whole-document path would say the same
                raise
            except Exception:  # noqa: BLE001 - anything odd: one process, then the whole document
                acc = _Accumulator()
        if header is None:
            try:
                header, layout = _stream(path, acc)
                parser = "stream"
            except InputError:
                raise
            except Exception as e:  # noqa: BLE001 - anything odd: start over on the whole-document path
                header = None
                parser = f"whole ({one_line(e)[:200]})"
    if header is None:
        acc = _Accumulator()
        header = _parse_whole(path, acc)
    try:
        return _build(path, header, acc, rank, parser, layout)
    except InputError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as e:
        raise InputError(path, f"unexpected event structure: {one_line(e)}") from None


# --------------------------------------------------------------------------------------------------
# bytes -> events


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, expected a PyTorch profiler JSON trace")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(path, f"cannot read: {one_line(e.strerror or e)}") from None
    if size == 0:
        raise InputError(path, "empty file")


class _Reader:
    """Plain or gzip byte stream (gzip recognized by magic bytes)."""

    def __init__(self, path: Path):
        self._f = open_input(path)  # gzip inflated within GPUDOCTOR_MAX_DECOMPRESSED_MB (readers/limits.py)

    def read(self, n: int) -> bytes:
        return self._f.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _stream(path: Path, acc: "_Accumulator") -> tuple[dict, str]:
    """Stream-parse the document batch by batch (event_split); return its header and layout.

    Raises on anything unexpected; the caller then parses the whole document.
    """
    with _Reader(path) as f:
        splitter = EventSplitter(f, _BLOCK)
        _feed_batches(splitter.batches(), acc)
    if splitter.bare and not any(ph is not None for ph, _ in acc.counts):
        raise NotStreamable("a list of objects that are not trace events")
    return splitter.header, splitter.layout


def _feed_batches(batches, acc: "_Accumulator") -> None:
    skipper = _Skipper()
    for batch in batches:
        if batch.events is not None:
            acc.feed(batch.events)
            continue
        if batch.exact:
            typed, kept, skipped = skipper.select(batch)
            del batch
            if skipped:
                acc.count_skipped(skipped)
            for cat, objs in typed.items():
                acc.feed_typed(cat, objs)
            del typed
            acc.feed(list(map(_loads, kept)))
            del kept
        else:  # a body may hold several events: parse every one
            bodies = batch.bodies
            del batch
            acc.feed(parse_bodies(bodies))
            del bodies


def _two_processes(path: Path) -> bool:
    """Read a large plain (seekable) file in two halves at once, the second in a forked process."""
    if os.environ.get("GPUDOCTOR_READ_THREADS", "").strip() == "1" or (os.cpu_count() or 1) < 2:
        return False
    if "fork" not in multiprocessing.get_all_start_methods() or multiprocessing.current_process().daemon:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(2) != _GZIP_MAGIC and path.stat().st_size >= _TWO_PROCESS_MIN_BYTES
    except OSError:
        return False


def _stream_two(path: Path, acc: "_Accumulator") -> tuple[dict, str]:
    """``_stream`` on two halves of the file, cut at a separator near the middle: this process reads
    the first half while a forked one reads the second; their accumulators are then merged (string
    codes remapped, kernel rows shifted). Same result as ``_stream``: rows are sorted at the end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        sep, _ = EventSplitter(f, _BLOCK).separator()
        cut = find_cut(f, size, sep, _BLOCK)
    if cut < 0:
        raise NotStreamable("no separator near the middle")
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_second_half, args=(path, sep, cut + len(sep), send), daemon=True)
    child.start()
    send.close()
    try:
        with open(path, "rb") as f:
            splitter = EventSplitter(Window(f, cut), _BLOCK)
            _feed_batches(splitter.batches(until_separator=True), acc)
        payload = recv.recv_bytes()
    finally:
        recv.close()
        child.join()
    ok, data = pickle.loads(payload)
    del payload
    if not ok:
        raise NotStreamable(f"second half: {data}")
    other, tail = data
    acc.merge(other)
    return join_header(splitter.head, tail), splitter.layout


def _second_half(path: Path, sep: bytes, offset: int, send) -> None:
    try:
        acc = _Accumulator()
        with open(path, "rb") as f:
            f.seek(offset)
            splitter = EventSplitter(f, _BLOCK)
            _feed_batches(splitter.resume(sep), acc)
        out = (True, (acc, splitter.tail))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which falls back
        out = (False, f"{type(e).__name__}: {one_line(e)[:200]}")
    send.send_bytes(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
    send.close()


class _Skipper:
    """Picks out of a batch's text the events the model uses, so that the others are never parsed nor
    even cut out.

    Those others are most of a trace: cpu_op (except ProfilerStep#N, record_param_comms, c10d collectives
    and ``SHAPE_OPS``), python_function, gpu_user_annotation and flow events. Their exact prefixes (this
    file's layout) are learned with a regex from the first events of each batch. One compiled pattern
    then finds, in one pass over the batch's text, every separator *not* followed by a skipped prefix
    (the cpu_op events to keep share their category's prefix and are told apart by their name in the
    same pattern); each kept body runs to the next separator. The skipped events are counted by
    category with ``bytes.count`` of separator + prefix (the most common category is what is left).
    No Python object is made per skipped event. An event written differently is simply kept and
    parsed (and then handled the same way), so this is only a shortcut.
    """

    LEARN_FIRST = 5000  # events looked at in the first batch
    LEARN_NEXT = 256  # and in each later one
    _LEARN_BYTES_PER_EVENT = 2048  # text sampled per event to learn from

    def __init__(self):
        self.by_key: dict[tuple, set] = {}  # (ph, cat) -> prefixes
        self.batches = 0
        self.typed_prefixes: dict[bytes, str] = {}  # prefix -> category of the events decoded typed
        self._keep_re: dict[bytes, re.Pattern] = {}  # separator -> pattern of kept bodies' starts
        self._count_pats: dict[bytes, list] = {}  # separator -> [(key, [sep + prefix, ...])] to count

    def learn(self, sample: bytes, sep: bytes, n: int) -> None:
        """Prefixes of the first ``n`` bodies of ``sample`` (the start of a batch)."""
        self.batches += 1
        new = False
        for p in sample.split(sep, n)[:n]:
            t = _TYPED_PREFIX_RE.match(p)
            if t is not None:
                self.typed_prefixes.setdefault(t.group(0), t.group(1).decode())
            m = _SKIP_RE.match(p)
            if m is not None:
                key = _SKIP_KEYS[m.group(1) or m.group(2)]
                known = self.by_key.setdefault(key, set())
                if m.group(0) not in known:
                    known.add(m.group(0))
                    new = True
        if new:
            self._keep_re.clear()
            self._count_pats.clear()

    def _patterns(self, sep: bytes) -> tuple[re.Pattern, list]:
        keep = self._keep_re.get(sep)
        if keep is None:
            cpu = _SKIP_KEYS[b"cpu_op"]
            alts = [re.escape(p) for k, pres in self.by_key.items() if k != cpu for p in sorted(pres)]
            cpu_pres = sorted(self.by_key.get(cpu, ()))
            if cpu_pres:
                alts.append(b"(?:" + b"|".join(map(re.escape, cpu_pres)) + b")(?!" + _TAKE_BACK_RE + b")")
            keep = self._keep_re[sep] = re.compile(re.escape(sep) + (b"(?!" + b"|".join(alts) + b")" if alts else b""))
            # every key but the most common (cpu_op in Kineto traces) is counted; that one is the rest
            keys = sorted(self.by_key, key=lambda k: k == cpu)
            self._count_pats[sep] = [(k, [sep + p for p in self.by_key[k]]) for k in keys] or [(None, [])]
        return keep, self._count_pats[sep]

    def select(self, batch) -> tuple[dict, list, Counter]:
        """The events to parse, each as the text of one JSON object: those of the categories decoded
        typed (category -> texts) and the others; and counts of the skipped ones by (ph, cat)."""
        buf, start, end, sep = batch.buf, batch.start, batch.end, batch.sep
        n_learn = self.LEARN_FIRST if self.batches == 0 else self.LEARN_NEXT
        self.learn(buf[start:min(end, start + n_learn * self._LEARN_BYTES_PER_EVENT)], sep, n_learn)
        keep, count_pats = self._patterns(sep)
        n_sep = len(sep)
        if start >= n_sep and buf.startswith(sep, start - n_sep) and buf.startswith(b"}", end):
            text, lo, hi = buf, start - n_sep, end  # the separator before and the brace after are there
        else:
            text = sep + buf[start:end] + b"}"
            lo, hi = 0, len(text) - 1
        # every body not skipped: its separator's offset; its object runs from the separator's "{" to
        # the next separator's "}"
        at = [m.start() for m in keep.finditer(text, lo, hi)]
        body_at = list(map(operator.add, at, repeat(n_sep)))
        ends = list(map(text.find, repeat(sep), body_at, repeat(hi)))
        if ends and ends[-1] < 0:
            ends[-1] = hi
        objs = list(map(text.__getitem__, map(slice, map(operator.add, at, repeat(sep.rindex(b"{"))),
                                                  map(operator.add, ends, repeat(1)))))
        typed: dict[str, list] = {}
        rest = [True] * len(objs)
        for prefix, cat in self.typed_prefixes.items():
            hit = list(map(text.startswith, repeat(prefix), body_at))
            if any(hit):
                typed.setdefault(cat, []).extend(compress(objs, hit))
                rest = list(map(operator.gt, rest, hit))
        kept = list(compress(objs, rest)) if typed else objs
        counts: Counter = Counter()
        left = batch.count - len(objs)  # skipped
        for key, pats in count_pats[:-1]:
            n = sum(map(text.count, pats, repeat(lo), repeat(hi)))
            counts[key] += n
            left -= n
        if left:
            counts[count_pats[-1][0]] += left
        return typed, kept, counts


def _alternation(words: list[bytes]) -> bytes:
    """A regex matching any text that starts with one of ``words``, their common prefixes factored out
    (a flat alternation of ~40 names costs a test per name at every event)."""
    if not words or b"" in words:
        return b""
    by_first: dict[int, list[bytes]] = {}
    for w in words:
        by_first.setdefault(w[0], []).append(w[1:])
    parts = [re.escape(bytes([c])) + _alternation(rest) for c, rest in sorted(by_first.items())]
    return parts[0] if len(parts) == 1 else b"(?:" + b"|".join(parts) + b")"


_TAKE_BACK_RE = _alternation(sorted(set(_TAKE_BACK_NAMES)))
# The start of an event body (after its '{"') of a category decoded typed (kineto_events).
_TYPED_PREFIX_RE = re.compile(rb'ph"\s*:\s*"X"\s*,\s*"cat"\s*:\s*"('
                              + b"|".join(c.encode() for c in sorted(kineto_events.KIND_OF_CATEGORY)) + rb')"')


def _read_all(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(path, f"cannot read: {one_line(e.strerror or e)}") from None
    if data[:2] == _GZIP_MAGIC:
        data = gunzip(data, path)
    if data.startswith(BOM):
        data = data[3:]
    return data


def _utf8_error_at(data: bytes) -> str:
    dec = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    step = 1 << 24
    for i in range(0, len(data), step):
        try:
            dec.decode(view[i:i + step], final=i + step >= len(data))
        except UnicodeDecodeError as e:
            return f" near byte {i + e.start}"
    return ""


def _parse_whole(path: Path, acc: "_Accumulator") -> dict:
    """Parse the whole document; the authority on what is wrong with bad input."""
    data = _read_all(path)
    if not data or data.isspace():
        raise InputError(path, "empty file")
    doc: Any = None
    try:
        doc = _loads(data)
    except ValueError as e:  # orjson.JSONDecodeError, json.JSONDecodeError, UnicodeDecodeError
        msg = str(e)
        if isinstance(e, UnicodeDecodeError) or "UTF-8" in msg or "utf-8" in msg:
            raise InputError(path, f"invalid UTF-8{_utf8_error_at(data)}") from None
        doc = _retry_parse(data, msg)
        if doc is None:
            raise InputError(path, f"truncated or invalid JSON: {one_line(msg)}") from None
    del data
    if isinstance(doc, dict):
        if "traceEvents" not in doc:
            raise InputError(path, "not a PyTorch profiler trace: the JSON object has no traceEvents")
        events = doc.pop("traceEvents")
        header = doc
        if not isinstance(events, list):
            raise InputError(path, f"traceEvents is a {type(events).__name__}, expected a list of events")
    elif isinstance(doc, list):
        events, header = doc, {}
        probe = events[:100]
        _check_depth(doc, path)
        if not probe or not all(isinstance(e, dict) and "ph" in e for e in probe):
            raise InputError(path, "not a trace: the top-level JSON list does not hold trace events "
                                   "(objects with a 'ph' field)")
    else:
        raise InputError(path, f"not a trace: the top-level JSON value is a {type(doc).__name__}, "
                               "expected an object with traceEvents")
    del doc
    n = len(events)
    try:
        for i in range(0, n, _FEED_CHUNK):
            acc.feed(events[i:i + _FEED_CHUNK])
            events[i:i + _FEED_CHUNK] = [None] * min(_FEED_CHUNK, n - i)  # free the dicts as we go
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as e:
        bad = next((i for i, e in enumerate(events) if e is not None and not isinstance(e, dict)), None)
        if bad is not None:
            raise InputError(path, f"traceEvents[{bad}] is a {type(events[bad]).__name__}, "
                                   "expected an event object") from None
        raise InputError(path, f"unexpected event structure: {one_line(e)}") from None
    return header


def _check_depth(doc: Any, path: Path) -> None:
    """A list nested past GPUDOCTOR_MAX_JSON_DEPTH is refused as such (some orjson builds parse it; a
    trace is never that deep). Follows the first element down: cheap, and what a nesting attack uses."""
    cap = limits.limit("GPUDOCTOR_MAX_JSON_DEPTH")
    depth, x = 0, doc
    while isinstance(x, (list, dict)) and x and depth <= cap:
        x = x[0] if isinstance(x, list) else next(iter(x.values()))
        depth += 1
    if depth > cap:
        raise InputError(path, f"JSON nested too deeply (more than {cap} levels; GPUDOCTOR_MAX_JSON_DEPTH "
                               "raises the limit)")


def _retry_parse(data: bytes, msg: str) -> Any:
    """Second chances: what orjson refuses but is readable (NaN, Infinity, integers beyond 64 bits:
    stdlib json takes them), and a Chrome-trace array without its closing ']' (the format allows it)."""
    if "unexpected end of data" not in msg:
        try:
            return json.loads(data)
        except ValueError:
            pass
    stripped = data.strip()
    if stripped.startswith(b"[") and not stripped.endswith(b"]"):
        try:
            return _loads(stripped.rstrip(b", \t\r\n") + b"]")
        except ValueError:
            pass
    return None


# --------------------------------------------------------------------------------------------------
# events -> columns


def _nums(values: list) -> np.ndarray:
    """ts/dur values -> int64 or float64 array; missing or non-numeric -> NaN (float64)."""
    if not values:
        return np.empty(0, dtype=np.float64)
    try:
        arr = np.array(values)
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is not None and arr.ndim == 1 and arr.dtype.kind in "if":
        return arr
    s = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
    return s.to_numpy(dtype=np.float64, na_value=np.nan)


def _ints(values: list, fill: int) -> np.ndarray:
    """Integer column; missing / non-numeric values become ``fill``."""
    if not values:
        return np.empty(0, dtype=np.int64)
    try:
        arr = np.array(values, dtype=np.int64)
        if arr.ndim == 1:
            return arr
    except (ValueError, TypeError, OverflowError):
        pass
    s = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=np.float64,
                                                                                na_value=np.nan)
    ok = np.isfinite(s) & (np.abs(s) < 9.2e18)
    out = np.full(len(s), fill, dtype=np.int64)
    out[ok] = s[ok].astype(np.int64)
    return out


def _triples(values: list) -> np.ndarray:
    """grid/block [x, y, z] lists -> (n, 3) int64; anything else -> -1s."""
    n = len(values)
    if n == 0:
        return np.empty((0, 3), dtype=np.int64)
    try:
        arr = np.array(values, dtype=np.int64)
        if arr.shape == (n, 3):
            return arr
    except (ValueError, TypeError, OverflowError):
        pass
    fixed = []
    for v in values:
        if isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v):
            fixed.append(v)
        else:
            fixed.append(_NEG3)
    return np.array(fixed, dtype=np.int64).reshape(n, 3)


def _field(dicts: list, key: str, fill: Any = None) -> list:
    """``[d.get(key, fill) for d in dicts]`` without a Python frame per item (dicts must be dicts, or
    typed events whose fill for ``key`` is ``fill``: kineto_events)."""
    if kineto_events.is_typed(dicts):
        return kineto_events.column(dicts, key)
    return list(map(dict.get, dicts, repeat(key), repeat(fill)))


def _codes(lut: dict, values: list) -> np.ndarray:
    """Intern strings into ``lut`` (value -> code); return the codes."""
    for v in dict.fromkeys(values):  # the distinct values: few
        if v not in lut:
            lut[v] = len(lut)
    return np.fromiter(map(lut.__getitem__, values), dtype=np.int32, count=len(values))


def _args_of(evs: list) -> list:
    args = _field(evs, "args")
    if kineto_events.is_typed(evs):  # a typed event's args are always its args Struct
        return args
    if not set(map(type, args)) <= {dict}:
        args = [a if isinstance(a, dict) else _EMPTY for a in args]
    return args


def _name_of(x: Any) -> str:
    return x if isinstance(x, str) else ("" if x is None else str(x))


class _Cols:
    """Column parts per batch, concatenated once at the end."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {}
        self.n = 0

    def add(self, n: int, **cols: np.ndarray) -> None:
        for k, v in cols.items():
            self.parts.setdefault(k, []).append(v)
        self.n += n

    def get(self, name: str, dtype=np.int64) -> np.ndarray:
        parts = self.parts.get(name)
        if not parts:
            return np.empty(0, dtype=dtype)
        if len(parts) == 1:
            return parts[0]
        if dtype is None:  # ts/dur: keep int64 only if every part is int
            if all(p.dtype.kind == "i" for p in parts):
                return np.concatenate(parts)
            return np.concatenate([p.astype(np.float64) for p in parts])
        return np.concatenate(parts)


class _Accumulator:
    """Turns batches of event dicts into column parts; keeps nothing per event beyond numpy arrays."""

    def __init__(self):
        self.counts: Counter = Counter()  # (ph, cat) -> events
        self.unknown_cats: Counter = Counter()
        self.bad_phases: Counter = Counter()
        self.kern, self.mem, self.api, self.rng, self.mev = _Cols(), _Cols(), _Cols(), _Cols(), _Cols()
        self.ops = _Cols()  # cpu_op events of SHAPE_OPS
        self.oname: dict = {}
        self.odims: dict = {"": 0}
        self.otypes: dict = {"": 0}
        self.kname: dict = {}
        self.mname: dict = {}
        self.aname: dict = {}
        self.rtext: dict = {}
        self.knccl: list[bool] = []  # per kernel-name code: NCCL kernel?
        self.nccl: list[tuple] = []  # (kernel row, External id, collective info or None)
        self.rpc: list[tuple] = []  # record_param_comms: (External id, tid, ts, dur, info)
        self.comm_ops: list[tuple] = []  # c10d:: collective calls: (tid, ts, dur, name)
        self.cpu_op_count = 0
        self.proc_names: dict = {}
        self.proc_labels: dict = {}
        self.host_pids: Counter = Counter()
        self.cpu_memory_events = 0
        self.other_devices: Counter = Counter()  # device type -> [memory] events of it

    def merge(self, other: "_Accumulator") -> None:
        """Append what ``other`` accumulated from a later part of the file (codes remapped)."""
        for name in ("counts", "unknown_cats", "bad_phases", "host_pids", "other_devices"):
            getattr(self, name).update(getattr(other, name))
        self.cpu_op_count += other.cpu_op_count
        self.cpu_memory_events += other.cpu_memory_events
        for name in ("proc_names", "proc_labels"):
            for k, v in getattr(other, name).items():
                getattr(self, name).setdefault(k, v)
        self.nccl.extend((row + self.kern.n, ext, info) for row, ext, info in other.nccl)
        self.rpc.extend(other.rpc)
        self.comm_ops.extend(other.comm_ops)
        remaps = {  # table -> {code column: (my lut, its lut)}
            "kern": {"name": (self.kname, other.kname)}, "mem": {"name": (self.mname, other.mname)},
            "api": {"name": (self.aname, other.aname)}, "rng": {"text": (self.rtext, other.rtext)},
            "ops": {"name": (self.oname, other.oname), "dims": (self.odims, other.odims),
                    "types": (self.otypes, other.otypes)},
            "mev": {},
        }
        for table, code_cols in remaps.items():
            mine, theirs = getattr(self, table), getattr(other, table)
            maps = {col: np.array([lut.setdefault(v, len(lut)) for v in their_lut], dtype=np.int32)
                    for col, (lut, their_lut) in code_cols.items()}
            for col, parts in theirs.parts.items():
                if col in maps:
                    parts = [maps[col][p] for p in parts]
                mine.parts.setdefault(col, []).extend(parts)
            mine.n += theirs.n
        self.knccl = [_NCCL_RE.search(_name_of(k)) is not None for k in self.kname]

    def count_skipped(self, counts: Counter) -> None:
        for key, n in counts.items():
            self.counts[key] += n
            if key[1] == "cpu_op":
                self.cpu_op_count += n

    def feed_typed(self, cat: str, objs: list) -> None:
        """Events of one category that kineto_events decodes typed, each the text of one JSON object
        (parsed into dicts where they do not fit the types)."""
        try:
            evs = kineto_events.decode(cat, objs)
        except kineto_events.Unfit:
            self.feed(list(map(_loads, objs)))
            return
        del objs
        self.counts[("X", cat)] += len(evs)
        if cat == "kernel":
            self._kernels(evs)
        elif cat in ("gpu_memcpy", "gpu_memset"):
            self._memops(evs, cat)
        else:
            self._api(evs, 0 if cat == "cuda_runtime" else 1)

    # one batch
    def feed(self, events: list) -> None:
        # Group by (ph, cat) with C-level passes (a handful of distinct keys), no Python loop per event.
        keys = list(zip(_field(events, "ph"), _field(events, "cat")))
        buckets = {k: list(compress(events, map(operator.eq, keys, repeat(k)))) for k in dict.fromkeys(keys)}
        del keys
        for (ph, cat), evs in buckets.items():
            self.counts[("flow", None) if ph in _FLOW_PHASES else (ph, cat)] += len(evs)
            if ph == "X":
                c = _CAT_ALIASES.get(str(cat).lower(), str(cat).lower()) if cat is not None else ""
                if c == "kernel":
                    self._kernels(evs)
                elif c in ("gpu_memcpy", "gpu_memset"):
                    self._memops(evs, c)
                elif c in ("cuda_runtime", "cuda_driver"):
                    self._api(evs, 0 if c == "cuda_runtime" else 1)
                elif c == "user_annotation":
                    self._ranges(evs)
                elif c == "cpu_op":
                    self._cpu_ops(evs)
                elif c not in _KNOWN_UNMODELED:
                    self.unknown_cats[str(cat) if cat is not None else "<none>"] += len(evs)
            elif ph == "M":
                self._metadata(evs)
            elif ph in ("i", "I"):
                self._instants(evs)
            elif ph in _FLOW_PHASES:
                pass
            else:
                self.bad_phases[str(ph)] += len(evs)

    def _times(self, evs: list) -> tuple[np.ndarray, np.ndarray]:
        return _nums(_field(evs, "ts")), _nums(_field(evs, "dur"))

    def _kernels(self, evs: list) -> None:
        n = len(evs)
        ts, dur = self._times(evs)
        codes = _codes(self.kname, _field(evs, "name", ""))
        args = _args_of(evs)
        grid = _triples(_field(args, "grid", _NEG3))
        block = _triples(_field(args, "block", _NEG3))
        if len(self.knccl) < len(self.kname):
            new = list(self.kname)[len(self.knccl):]
            self.knccl.extend(_NCCL_RE.search(s) is not None for s in new)
        flags = np.array(self.knccl, dtype=bool)[codes] if n else np.zeros(0, bool)
        row0 = self.kern.n
        for i in np.flatnonzero(flags).tolist():
            a = args[i]
            self.nccl.append((row0 + i, a.get("External id"), _collective_info(a)))
        self.kern.add(
            n, ts=ts, dur=dur, name=codes,
            device=_ints(_field(args, "device", 0), 0),
            stream=_ints(_field(args, "stream", -1), -1),
            corr=_ints(_field(args, "correlation", -1), -1),
            regs=_ints(_field(args, "registers per thread", -1), -1),
            smem=_ints(_field(args, "shared memory", -1), -1),
            gx=grid[:, 0], gy=grid[:, 1], gz=grid[:, 2], bx=block[:, 0], by=block[:, 1], bz=block[:, 2],
        )

    def _memops(self, evs: list, cat: str) -> None:
        n = len(evs)
        ts, dur = self._times(evs)
        names = _field(evs, "name", "")
        if cat == "gpu_memset":  # the kind comes from the category; keep names apart per category
            names = ["\x00memset\x00" + s for s in names]
        args = _args_of(evs)
        self.mem.add(
            n, ts=ts, dur=dur, name=_codes(self.mname, names),
            device=_ints([a.get("device", a.get("inDevice", 0)) for a in args], 0),
            stream=_ints(_field(args, "stream", -1), -1),
            corr=_ints(_field(args, "correlation", -1), -1),
            bytes=_ints(_field(args, "bytes", 0), 0),
        )

    def _api(self, evs: list, api: int) -> None:
        n = len(evs)
        ts, dur = self._times(evs)
        args = _args_of(evs)
        self.host_pids[evs[0].get("pid")] += n
        self.api.add(
            n, ts=ts, dur=dur, name=_codes(self.aname, _field(evs, "name", "")),
            tid=_ints(_field(evs, "tid", -1), -1),
            corr=_ints(_field(args, "correlation", -1), -1),
            api=np.full(n, api, dtype=np.int8),
        )

    def _ranges(self, evs: list) -> None:
        if not evs:
            return
        n = len(evs)
        ts, dur = self._times(evs)
        self.rng.add(
            n, ts=ts, dur=dur, text=_codes(self.rtext, _field(evs, "name", "")),
            tid=_ints(_field(evs, "tid", -1), -1),
        )

    def _cpu_ops(self, evs: list) -> None:
        self.cpu_op_count += len(evs)
        self.host_pids[evs[0].get("pid")] += len(evs)
        special, shape = [], []
        for e in evs:
            n = e.get("name")
            if type(n) is str:
                if n in SHAPE_OPS or n.startswith(SHAPE_OP_PREFIXES):
                    shape.append(e)
                elif n.startswith(_SPECIAL_CPU_OPS):
                    special.append(e)
        if shape:
            self._shape_ops(shape)
        if not special:
            return
        self._ranges([e for e in special if e["name"].startswith(_PROFILER_STEP)])
        for e in special:
            if e["name"] == _PARAM_COMMS:
                a = e.get("args")
                a = a if isinstance(a, dict) else _EMPTY
                self.rpc.append((a.get("External id"), e.get("tid"), e.get("ts"), e.get("dur"),
                                 _collective_info(a)))
            elif e["name"].startswith(_C10D):
                self.comm_ops.append((e.get("tid"), e.get("ts"), e.get("dur"), e["name"]))

    def _shape_ops(self, evs: list) -> None:
        n = len(evs)
        ts, dur = self._times(evs)
        args = _args_of(evs)
        self.ops.add(
            n, ts=ts, dur=dur, name=_codes(self.oname, _field(evs, "name", "")),
            tid=_ints(_field(evs, "tid", -1), -1),
            ext=_ints(_field(args, "External id", -1), -1),
            seq=_ints(_field(args, "Sequence number", -1), -1),
            dims=_codes(self.odims, list(map(_json_text, _field(args, "Input Dims")))),
            types=_codes(self.otypes, list(map(_json_text, _field(args, "Input type")))),
        )

    def _metadata(self, evs: list) -> None:
        for e in evs:
            name = e.get("name")
            a = e.get("args")
            if not isinstance(a, dict):
                continue
            if name == "process_name":
                self.proc_names[e.get("pid")] = a.get("name")
            elif name == "process_labels":
                self.proc_labels[e.get("pid")] = a.get("labels")

    def _instants(self, evs: list) -> None:
        mem = [e for e in evs if e.get("name") == "[memory]"]
        if not mem:
            return
        args = _args_of(mem)
        dev_type = _ints(_field(args, "Device Type", -1), -1)
        cuda = dev_type == 1  # c10::DeviceType::CUDA
        self.cpu_memory_events += int((dev_type == 0).sum())
        other = dev_type[(dev_type != 0) & ~cuda]
        for code, n in zip(*np.unique(other, return_counts=True)):
            self.other_devices[_C10_DEVICE_TYPES.get(int(code), f"#{int(code)}")] += int(n)
        if not cuda.any():
            return
        idx = np.flatnonzero(cuda).tolist()
        mem = [mem[i] for i in idx]
        args = [args[i] for i in idx]
        self.mev.add(
            len(mem), ts=_nums(_field(mem, "ts")),
            device=_ints(_field(args, "Device Id", 0), 0),
            addr=_ints(_field(args, "Addr", -1), -1),
            bytes=_ints(_field(args, "Bytes", 0), 0),
            allocated=_nums(_field(args, "Total Allocated")),
            reserved=_nums(_field(args, "Total Reserved")),
        )


def _json_text(x: Any) -> str:
    """An args value as compact JSON text ("" when absent)."""
    if x is None:
        return ""
    try:
        return orjson.dumps(x).decode("utf-8")
    except TypeError:  # e.g. an integer beyond 64 bits (stdlib-parsed input)
        pass
    return json.dumps(x, ensure_ascii=False, separators=(",", ":"))


def _collective_info(a: dict) -> tuple | None:
    name = a.get("Collective name")
    if name is None:
        return None
    return (name, a.get("In msg nelems"), a.get("Out msg nelems"), a.get("Group size"), a.get("dtype"))


# --------------------------------------------------------------------------------------------------
# columns -> trace


def _categorical(lut: dict, codes: np.ndarray, transform=None) -> pd.Categorical:
    cats = [transform(k) if transform else _name_of(k) for k in lut]
    if len(set(cats)) == len(cats):
        return pd.Categorical.from_codes(codes, categories=cats)
    return pd.Categorical(np.asarray(cats, dtype=object)[codes] if len(codes) else [])


class _Clock:
    """How this file's ts/dur become ns, decided once per file, and which events cannot be placed.

    Unit: ts are µs (the Chrome trace rule) unless the *median* timestamp is impossible as µs (more
    than a year after baseTimeNanoseconds, or past the year 2190 without one): one odd timestamp cannot
    switch the whole file. An event is dropped (counted by reason) when its ts or dur is missing or not
    a number, its dur is negative, or its ts lies more than a year from the file's median timestamp
    (which also keeps every ns value far inside int64: no wrap-around however large the base).
    """

    def __init__(self, base: int | None, tables: list[_Cols]):
        self.offset = base if base is not None else 0
        samples = []
        for t in tables:
            ts = t.get("ts", None)
            if len(ts):
                ts = ts[:: max(1, len(ts) // 100_000)].astype(np.float64)  # a spread-out sample suffices
                samples.append(ts[np.isfinite(ts)])
        allts = np.concatenate(samples) if samples else np.empty(0)
        self.center = float(np.median(allts)) if len(allts) else 0.0
        if base is not None:
            self.unit = "ns" if abs(self.center) > _US_PER_YEAR else "us"
        else:
            self.unit = "ns" if abs(self.center) * 1000.0 > _NS_YEAR_2190 else "us"
        self._year = _US_PER_YEAR * (1000.0 if self.unit == "ns" else 1.0)
        self.dropped: Counter = Counter()

    def valid(self, cols: _Cols, with_dur: bool = True) -> np.ndarray:
        ts = cols.get("ts", None)
        ok = np.ones(len(ts), dtype=bool)
        if ts.dtype.kind == "f":
            ok &= np.isfinite(ts)
        if with_dur:
            dur = cols.get("dur", None)
            if dur.dtype.kind == "f":
                ok &= np.isfinite(dur)
        self.dropped["event missing ts or dur"] += int((~ok).sum())
        if with_dur:
            neg = ok & (dur < 0)
            self.dropped["event with negative duration"] += int(neg.sum())
            ok &= ~neg
        tsf = ts.astype(np.float64)
        far = ok & (np.abs(tsf - self.center) > self._year)
        self.dropped["timestamp more than a year from the file's median"] += int(far.sum())
        ok &= ~far
        # absolute ns (with the base) must fit int64: estimated in float64 before the exact integer step
        mult = 1.0 if self.unit == "ns" else 1000.0
        end_f = tsf + (np.maximum(dur.astype(np.float64), 0) if with_dur else 0.0)
        over = ok & (np.abs(tsf * mult + float(self.offset)) >= _NS_INT64_SAFE) | (
            ok & (np.abs(end_f * mult + float(self.offset)) >= _NS_INT64_SAFE))
        self.dropped["time beyond the int64 nanosecond range"] += int(over.sum())
        return ok & ~over

    def times_ns(self, cols: _Cols, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ts, dur = cols.get("ts", None)[ok], cols.get("dur", None)[ok]
        start = _to_ns(ts, self.unit) + self.offset
        return start, start + _to_ns(dur, self.unit)


def _to_ns(a: np.ndarray, unit: str) -> np.ndarray:
    """Finite ts/dur values -> int64 ns. µs floats: integer and fraction apart (exact to 3 decimals)."""
    if a.dtype.kind in "iu":
        return a.astype(np.int64) * (1 if unit == "ns" else 1000)
    if unit == "ns":
        return np.rint(a).astype(np.int64)
    whole = np.floor(a)
    return whole.astype(np.int64) * 1000 + np.rint((a - whole) * 1000.0).astype(np.int64)


def _int_or_none(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and np.isfinite(x):
        return int(x)
    if isinstance(x, str):
        try:
            return int(x.strip().strip('"'))
        except ValueError:
            return None
    return None


def _resolve_rank(path: Path, header: dict, rank: int | None) -> tuple[int, str]:
    if rank is not None:
        return int(rank), "argument"
    dist = header.get("distributedInfo")
    if isinstance(dist, dict):
        r = _int_or_none(dist.get("rank"))
        if r is not None and r >= 0:
            return r, "distributedInfo"
    for text in (path.name, path.parent.name):
        r = rank_from_filename(text)
        if r is not None:
            return r, "file name"
    return 0, "default"


def _main_pid(acc: _Accumulator, path: Path) -> int:
    for pid, label in acc.proc_labels.items():
        if isinstance(label, str) and label.strip().upper() == "CPU" and _int_or_none(pid) is not None:
            return _int_or_none(pid)
    for pid, _ in acc.host_pids.most_common():
        if _int_or_none(pid) is not None:
            return _int_or_none(pid)
    m = _TB_NAME_RE.match(path.name)
    return int(m.group("pid")) if m else -1


def _device_of_category(cat: str) -> str:
    """The device type of a Kineto event category gpudoctor does not model ("" for others)."""
    return _OTHER_DEVICE_PREFIXES.get(cat.lower().split("_", 1)[0], "") if "_" in cat else ""


def _memop_kind(key: str) -> tuple[str, str, str]:
    if key.startswith("\x00memset\x00"):
        name = key[len("\x00memset\x00"):]
        m = _MEMSET_RE.match(name)
        dst = _MEMORY_KINDS.get((m.group(1) or "").strip().lower(), "unknown") if m and m.group(1) else "unknown"
        return "memset", "", dst
    m = _MEMCPY_RE.match(key)
    if not m:
        return "memcpy_unknown", "unknown", "unknown"
    kind = _MEMCPY_KINDS.get(m.group(1).lower(), "memcpy_unknown")
    src = _MEMORY_KINDS.get((m.group(2) or "").strip().lower(), "unknown")
    dst = _MEMORY_KINDS.get((m.group(3) or "").strip().lower(), "unknown")
    return kind, src, dst




def _kernel_dtype(name: str) -> str:
    for tok in re.split(r"[_(),<>\s]+", name):
        d = _NCCL_DTYPE_TOKENS.get(tok)
        if d:
            return d
    return ""


def _canonical_dtype(d: Any) -> str:
    if not isinstance(d, str):
        return ""
    d = d.strip().strip('"')
    if d in _DTYPES:
        return _DTYPES[d][0]
    low = d.lower().removeprefix("torch.")
    return low if low in _DTYPE_SIZES else low


def _collectives(acc: _Accumulator, k_row_new: np.ndarray, k_start: np.ndarray, k_end: np.ndarray,
                 k_names: pd.Categorical, k_corr: np.ndarray, api: dict, comm_ranges: dict) -> dict:
    """One row per NCCL kernel. Op and sizes from the kernel's record_param_comms arguments (matched by
    External id, else the one around the launch); else the op of the innermost collective-named host
    range around the launch (``nccl:all_to_all``, ``c10d::alltoall_base_``, TorchRec's
    ``## alltoall_fwd_single ##``: source "kineto_range"); else the kernel name."""
    rpc_by_ext = {}
    rpc_by_tid: dict = {}
    for ext, tid, ts, dur, info in acc.rpc:
        if info is None:
            continue
        if ext is not None:
            rpc_by_ext.setdefault(ext, info)
        if isinstance(ts, (int, float)) and isinstance(dur, (int, float)):
            rpc_by_tid.setdefault(tid, []).append((float(ts), float(ts) + float(dur), info))
    for v in rpc_by_tid.values():
        v.sort(key=lambda x: x[0])
    rows_k = np.array([k_row_new[r] for r, _, _ in acc.nccl], dtype=np.int64)
    ok = rows_k >= 0
    # launch of each NCCL kernel: (tid, ts in the input's units, start ns) through its correlation id
    corr = k_corr[rows_k[ok]] if ok.any() else np.empty(0, np.int64)
    launch = first_match(api["corr"], corr)
    found = launch >= 0
    li = np.clip(launch, 0, None)
    have = len(api["corr"]) > 0
    l_tid = np.where(found, api["tid"][li] if have else -1, -1)
    l_raw = np.where(found, api["ts_raw"][li].astype(np.float64) if have else np.nan, np.nan)
    l_ns = np.where(found, api["start_ns"][li] if have else -1, -1)
    by_range = enclosing_ops(l_tid[found], l_ns[found], comm_ranges["tid"], comm_ranges["start_ns"],
                             comm_ranges["end_ns"], comm_ranges["op"])
    range_op = np.full(len(corr), "", dtype=object)
    range_op[found] = by_range
    rows: dict[str, list] = {k: [] for k in ("start_ns", "end_ns", "op", "bytes", "dtype", "comm_size", "source")}
    for i, (r, ext, info) in enumerate(compress(acc.nccl, ok)):
        j = k_row_new[r]
        name = str(k_names[j])
        if info is None and ext is not None:
            info = rpc_by_ext.get(ext)
        if info is None and found[i]:
            for s, e, inf in reversed(rpc_by_tid.get(int(l_tid[i]), [])):
                if s <= l_raw[i] <= e:
                    info = inf
                    break
        op, nbytes, dtype, size, source = op_of_kernel(name), -1, _kernel_dtype(name), -1, "kernel_name"
        if range_op[i]:
            op, source = range_op[i], "kineto_range"
        if info is not None:
            cname, n_in, n_out, gsize, dt = info
            op = collective_op(cname) or op
            dtype = _canonical_dtype(dt) or dtype
            size = _int_or_none(gsize)
            size = size if size is not None else -1
            nel = [x for x in (_int_or_none(n_in), _int_or_none(n_out)) if x is not None]
            esize = _DTYPE_SIZES.get(dtype)
            if nel and esize:
                nbytes = max(nel) * esize
            source = "kineto_args"
        rows["start_ns"].append(int(k_start[j]))
        rows["end_ns"].append(int(k_end[j]))
        rows["op"].append(op)
        rows["bytes"].append(nbytes)
        rows["dtype"].append(dtype)
        rows["comm_size"].append(size)
        rows["source"].append(source)
    return rows


def _comm_ranges(acc: _Accumulator, ranges: pd.DataFrame, unit: str, offset: int) -> dict:
    """Host ranges that name a collective: record_function ranges (``nccl:all_to_all``, TorchRec's),
    and the c10d operator calls, with their op."""
    r_op = per_value(ranges["text"], lambda t: range_op(t) or "", missing="")
    sel = r_op != ""
    tid = [ranges["thread_id"].to_numpy()[sel]]
    start = [ranges["start_ns"].to_numpy()[sel]]
    end = [ranges["end_ns"].to_numpy()[sel]]
    ops = [r_op[sel]]
    if acc.comm_ops:
        c_tid, c_ts, c_dur, c_name = zip(*acc.comm_ops)
        ts, dur = _nums(list(c_ts)), _nums(list(c_dur))
        fin = np.isfinite(ts.astype(np.float64)) & np.isfinite(dur.astype(np.float64))
        s_ns = _to_ns(ts[fin], unit) + offset
        tid.append(_ints(list(c_tid), -1)[fin])
        start.append(s_ns)
        end.append(s_ns + _to_ns(dur[fin], unit))
        ops.append(np.array([range_op(n) or "" for n in c_name], dtype=object)[fin])
    out = {"tid": np.concatenate(tid).astype(np.int64), "start_ns": np.concatenate(start).astype(np.int64),
           "end_ns": np.concatenate(end).astype(np.int64), "op": np.concatenate(ops)}
    keep = out["op"] != ""
    return {k: v[keep] for k, v in out.items()}


def _sort(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows in time order, ties broken by the other keys, so the result never depends on batching."""
    if len(df) < 2:
        return df
    cols = [(-df[k[1:]].to_numpy()) if k.startswith("-") else df[k].to_numpy() for k in keys]
    order = np.lexsort(cols[::-1])
    if (order[1:] > order[:-1]).all():
        return df
    return df.take(order).reset_index(drop=True)


def _build(path: Path, header: dict, acc: _Accumulator, rank_arg: int | None, parser: str, layout: str) -> Trace:
    rank, rank_from = _resolve_rank(path, header, rank_arg)
    base = _int_or_none(header.get("baseTimeNanoseconds"))
    offset = base if base is not None else 0
    clock = _Clock(base, [acc.kern, acc.mem, acc.api, acc.rng, acc.ops])
    unit = clock.unit
    trace = Trace()

    k_row_new, k_start, k_end, k_names, k_corr = _set_kernels(trace, acc, clock, rank)
    n_k = len(k_start)
    m_start, m_end = _set_memops(trace, acc, clock, rank)
    n_m = len(m_start)

    # api calls
    a = acc.api
    a_ok = clock.valid(a) if a.n else np.zeros(0, bool)
    a_start, a_end = clock.times_ns(a, a_ok) if a.n else (np.empty(0, np.int64),) * 2
    n_a = len(a_start)
    a_corr, a_tid = a.get("corr")[a_ok], a.get("tid")[a_ok]
    trace.set("api_calls", {
        "rank": np.full(n_a, rank, np.int64), "thread_id": a_tid, "start_ns": a_start, "end_ns": a_end,
        "name": _categorical(acc.aname, a.get("name", np.int32)[a_ok]),
        "api": pd.Categorical.from_codes(a.get("api", np.int8)[a_ok], categories=["runtime", "driver"]),
        "correlation_id": a_corr, "return_value": np.zeros(n_a, np.int64),
    })

    # ranges: depth and GPU projection
    r = acc.rng
    ok = clock.valid(r) if r.n else np.zeros(0, bool)
    r_start, r_end = clock.times_ns(r, ok) if r.n else (np.empty(0, np.int64),) * 2
    n_r = len(r_start)
    r_codes = r.get("text", np.int32)[ok]
    r_tid = r.get("tid")[ok]
    texts = [_name_of(t) for t in acc.rtext]
    is_step = np.array([t.startswith(_PROFILER_STEP) for t in texts], dtype=np.int8)
    domain = pd.Categorical.from_codes(is_step[r_codes] if n_r else np.empty(0, np.int8),
                                       categories=["record_function", "profiler_step"])
    r_rank = np.full(n_r, rank, np.int64)
    ranges = conform("ranges", {
        "rank": r_rank, "thread_id": r_tid, "start_ns": r_start, "end_ns": r_end,
        "text": _categorical(acc.rtext, r_codes), "domain": domain,
        "depth": nesting_depth(r_rank, r_tid, r_start, r_end),
    })
    gpu_ops = pd.DataFrame({
        "rank": np.full(n_k + n_m, rank, np.int64),
        "correlation_id": np.concatenate([k_corr, trace.memops["correlation_id"].to_numpy()]),
        "start_ns": np.concatenate([k_start, m_start]),
        "end_ns": np.concatenate([k_end, m_end]),
        "is_kernel": np.r_[np.ones(n_k, bool), np.zeros(n_m, bool)],
    })
    trace.set("ranges", project_ranges(ranges, trace.api_calls, gpu_ops))

    # collectives
    if acc.nccl:
        api_cols = {"corr": a_corr, "tid": a_tid, "ts_raw": a.get("ts", None)[a_ok], "start_ns": a_start}
        rows = _collectives(acc, k_row_new, k_start, k_end, k_names, k_corr, api_cols,
                            _comm_ranges(acc, ranges, unit, offset))
        n_c = len(rows["start_ns"])
        trace.set("collectives", {"rank": np.full(n_c, rank, np.int64), **rows})

    _set_cpu_ops(trace, acc, clock, rank)
    _set_memory(trace, acc, clock, unit, offset, rank)
    _set_devices(trace, header, rank)
    # ranks
    tb = _TB_NAME_RE.match(path.name)
    trace.set("ranks", {
        "rank": [rank], "pid": [_main_pid(acc, path)], "hostname": [tb.group("host") if tb else ""],
        "source_file": [str(path)], "source_format": [FORMAT], "clock_offset_ns": [offset],
        "clock_source": ["baseTimeNanoseconds" if base is not None else "trace"],
    })

    _sort_tables(trace)
    _add_drops(trace, acc, clock, rank, np.concatenate([k_corr, trace.memops["correlation_id"].to_numpy()]), a_corr, n_k)
    trace.meta = _meta(path, header, acc, rank, rank_from, unit, parser, layout)
    return trace


def _set_kernels(trace: Trace, acc: _Accumulator, clock: _Clock, rank: int) -> tuple:
    """The kernels table; returns each accumulated kernel's new row (-1 when dropped), and the kept ones'
    start, end, full names and correlation ids."""
    k = acc.kern
    ok = clock.valid(k) if k.n else np.zeros(0, bool)
    k_row_new = np.where(ok, np.cumsum(ok) - 1, -1)
    k_start, k_end = clock.times_ns(k, ok) if k.n else (np.empty(0, np.int64),) * 2
    k_names = _categorical(acc.kname, k.get("name", np.int32)[ok])
    # Kineto gives the full demangled name; `name` is the short form nsys calls shortName, so the
    # same kernel has the same name whichever profiler recorded it.
    k_short = short_names(k_names)
    k_corr = k.get("corr")[ok]
    n_k = len(k_start)
    trace.set("kernels", {
        "rank": np.full(n_k, rank, np.int64), "device_id": k.get("device")[ok], "stream_id": k.get("stream")[ok],
        "start_ns": k_start, "end_ns": k_end, "name": k_short, "demangled_name": k_names,
        "grid_x": k.get("gx")[ok], "grid_y": k.get("gy")[ok], "grid_z": k.get("gz")[ok],
        "block_x": k.get("bx")[ok], "block_y": k.get("by")[ok], "block_z": k.get("bz")[ok],
        "registers_per_thread": k.get("regs")[ok], "shared_memory_bytes": k.get("smem")[ok],
        "correlation_id": k_corr, "graph_id": np.full(n_k, -1, np.int64),
        "category": categorize_kernels(k_short, k_names),
    })
    return k_row_new, k_start, k_end, k_names, k_corr


def _set_memops(trace: Trace, acc: _Accumulator, clock: _Clock, rank: int) -> tuple[np.ndarray, np.ndarray]:
    m = acc.mem
    ok = clock.valid(m) if m.n else np.zeros(0, bool)
    m_start, m_end = clock.times_ns(m, ok) if m.n else (np.empty(0, np.int64),) * 2
    m_codes = m.get("name", np.int32)[ok]
    parsed = [_memop_kind(_name_of(key)) for key in acc.mname]
    n_m = len(m_start)

    def _mcat(i: int) -> pd.Categorical:
        vals = [p[i] for p in parsed]
        uniq = list(dict.fromkeys(vals))
        pos = {v: j for j, v in enumerate(uniq)}
        lut = np.array([pos[v] for v in vals], dtype=np.int32)
        return pd.Categorical.from_codes(lut[m_codes] if n_m else np.empty(0, np.int32), categories=uniq)

    trace.set("memops", {
        "rank": np.full(n_m, rank, np.int64), "device_id": m.get("device")[ok], "stream_id": m.get("stream")[ok],
        "start_ns": m_start, "end_ns": m_end, "kind": _mcat(0), "bytes": m.get("bytes")[ok],
        "src_kind": _mcat(1), "dst_kind": _mcat(2), "correlation_id": m.get("corr")[ok],
    })
    return m_start, m_end


def _set_cpu_ops(trace: Trace, acc: _Accumulator, clock: _Clock, rank: int) -> None:
    """The ops whose shapes the model keeps (SHAPE_OPS)."""
    o = acc.ops
    if o.n:
        ok = clock.valid(o)
        o_start, o_end = clock.times_ns(o, ok)
        n_o = len(o_start)
        trace.set("cpu_ops", {
            "rank": np.full(n_o, rank, np.int64), "thread_id": o.get("tid")[ok],
            "start_ns": o_start, "end_ns": o_end,
            "name": _categorical(acc.oname, o.get("name", np.int32)[ok]),
            "external_id": o.get("ext")[ok],
            "input_dims": np.array(list(acc.odims), dtype=object)[o.get("dims", np.int32)[ok]],
            "input_types": np.array(list(acc.otypes), dtype=object)[o.get("types", np.int32)[ok]],
            "sequence_number": o.get("seq")[ok],
        })


def _set_memory(trace: Trace, acc: _Accumulator, clock: _Clock, unit: str, offset: int, rank: int) -> None:
    """Memory events and allocator counters (CUDA caching allocator, profile_memory=True)."""
    mv = acc.mev
    if mv.n:
        ts = mv.get("ts", None)
        ok = clock.valid(mv, with_dur=False)
        t_ns = _to_ns(ts[ok], unit) + offset
        dev = mv.get("device")[ok]
        nbytes = mv.get("bytes")[ok]
        n_e = len(t_ns)
        trace.set("memory_events", {
            "rank": np.full(n_e, rank, np.int64), "device_id": dev, "ts_ns": t_ns,
            "address": mv.get("addr")[ok], "bytes": nbytes,
            "kind": pd.Categorical.from_codes((nbytes < 0).astype(np.int8), categories=["alloc", "free"]),
            "source": pd.Categorical.from_codes(np.zeros(n_e, np.int8), categories=["kineto_memory"]),
        })
        alloc, resv = mv.get("allocated", None)[ok], mv.get("reserved", None)[ok]
        parts = []
        for name, vals in (("memory_allocated_bytes", alloc), ("memory_reserved_bytes", resv)):
            fin = np.isfinite(vals.astype(np.float64))
            parts.append(pd.DataFrame({"device_id": dev[fin], "ts_ns": t_ns[fin], "name": name,
                                       "value": vals[fin].astype(np.float64)}))
        counters = pd.concat(parts, ignore_index=True)
        counters.insert(0, "rank", rank)
        trace.set("counters", counters)


def _set_devices(trace: Trace, header: dict, rank: int) -> None:
    """Devices from the header's deviceProperties, plus any device a GPU op ran on."""
    dev_rows = []
    props = header.get("deviceProperties")
    listed = set()
    if isinstance(props, list):
        for p in props:
            if not isinstance(p, dict):
                continue
            did = _int_or_none(p.get("id"))
            did = did if did is not None else len(dev_rows)
            listed.add(did)
            major, minor = _int_or_none(p.get("computeMajor")), _int_or_none(p.get("computeMinor"))
            sms, mem_b = _int_or_none(p.get("numSms")), _int_or_none(p.get("totalGlobalMem"))
            dev_rows.append({
                "rank": rank, "device_id": did, "name": _name_of(p.get("name")),
                "sm_count": sms if sms is not None else -1, "memory_bytes": mem_b if mem_b is not None else -1,
                "compute_capability": f"{major}.{minor}" if major is not None and minor is not None else "",
            })
    seen = set(np.unique(np.concatenate([trace.kernels["device_id"].to_numpy(),
                                         trace.memops["device_id"].to_numpy()])).tolist())
    for did in sorted(seen - listed):
        dev_rows.append({"rank": rank, "device_id": int(did)})
    if dev_rows:
        trace.set("devices", pd.DataFrame(dev_rows))


def _sort_tables(trace: Trace) -> None:
    """Time order (readers are free in the order of rows; sorted output is deterministic and friendlier)."""
    trace.kernels = _sort(trace.kernels, ["start_ns", "device_id", "stream_id", "correlation_id", "end_ns"])
    trace.memops = _sort(trace.memops, ["start_ns", "device_id", "stream_id", "correlation_id", "end_ns"])
    trace.api_calls = _sort(trace.api_calls, ["start_ns", "thread_id", "correlation_id", "end_ns"])
    trace.ranges = _sort(trace.ranges, ["start_ns", "thread_id", "-end_ns", "depth"])
    trace.collectives = _sort(trace.collectives, ["start_ns", "end_ns"])
    trace.cpu_ops = _sort(trace.cpu_ops, ["start_ns", "thread_id", "-end_ns", "external_id"])
    trace.memory_events = _sort(trace.memory_events, ["ts_ns", "device_id", "address"])


def _add_drops(trace: Trace, acc: _Accumulator, clock: _Clock, rank: int, gpu_corr: np.ndarray, a_corr: np.ndarray,
               n_k: int) -> None:
    """What was not kept, counted by reason: never silent."""
    launched = np.isin(gpu_corr, a_corr)
    trace.add_dropped(rank, SOURCE, "gpu op with no launch record", int((~launched).sum()))
    for reason, n in sorted(clock.dropped.items()):
        trace.add_dropped(rank, SOURCE, reason, n)
    other = Counter(acc.other_devices)
    for cat, n in sorted(acc.unknown_cats.items()):
        device = _device_of_category(cat)
        if device:
            other[device] += n
        else:
            trace.add_dropped(rank, SOURCE, f"unknown event category: {cat}", n)
    # Accelerators gpudoctor does not model (MTIA, HPU, XPU, ...): named, so that a trace of one does
    # not read as an idle GPU.
    why = "" if n_k else " (the trace has no CUDA/HIP kernels)"
    for device, n in sorted(other.items()):
        trace.add_dropped(rank, SOURCE, f"events of device type {device} not analyzed{why}", n)
    for ph, n in sorted(acc.bad_phases.items()):
        trace.add_dropped(rank, SOURCE, f"unsupported event phase: {ph}", n)


def _meta(path: Path, header: dict, acc: _Accumulator, rank: int, rank_from: str, unit: str, parser: str,
          layout: str) -> dict:
    tp = {k: v for k, v in header.items()}
    tp["ts_unit"] = unit
    tp["parser"] = parser
    if layout:
        tp["event_separator"] = layout
    tp["rank_from"] = rank_from
    tp["event_counts"] = {f"{ph}/{cat}" if cat is not None else str(ph): n
                          for (ph, cat), n in sorted(acc.counts.items(), key=lambda x: -x[1])}
    if acc.cpu_memory_events:
        tp["cpu_memory_event_count"] = acc.cpu_memory_events
    return {
        "inputs": [{"path": str(path), "format": FORMAT, "rank": rank}],
        "torch_profiler": tp,
        "cpu_op_count": acc.cpu_op_count,
    }
