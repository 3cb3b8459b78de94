"""Cut the event array of a Chrome-trace JSON document into batches of event texts, with bounded memory.

``EventSplitter(f).batches()`` reads a binary stream in blocks and yields batches of event *bodies* (the
bytes of an event after its ``{"`` and before its ``}``), each batch one piece of the file's text with its
separators (``Batch.region``; ``Batch.bodies`` splits it), never holding more than about two blocks of text; after
the last batch, ``header`` holds the document's other keys (``{}`` for a bare event list).

How events are found whatever the layout
    The bytes between the first two events (``}`` whitespace ``,`` whitespace ``{``) are the file's
    separator: ``},\\n  {`` in Kineto's layout, ``},{`` from orjson or Kineto minified, ``}, {`` from
    ``json.dumps``. Blocks are cut at that exact separator with ``bytes.split`` (C speed). A cut can only
    be wrong where the separator also occurs inside an event (an object in a list inside ``args``, or a
    string: but a string cannot hold the separator followed by an unescaped quote, which every event
    body starts with, hence the ``"`` that ends the separator); such a wrong cut leaves a piece that is
    not an event body, so parsing the batch fails or yields a different number of events than pieces
    (``parse_bodies`` checks both) and the caller learns the file cannot be streamed. A file whose
    separator varies is caught per batch: every event has exactly one ``"ph"`` key, so each batch also
    counts those (``bytes.count``); where that finds more events than pieces (a piece holds two events:
    a separator written differently; or a value "ph" somewhere), the batch is marked ``exact=False`` and
    the caller must parse every piece of it (a piece may then hold several events; they are all parsed,
    so none is lost).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import orjson

BOM = b"\xef\xbb\xbf"
BLOCK_BYTES = 16 << 20  # bytes read per step
MAX_CARRY_BYTES = 256 << 20  # an event this long without a separator: give up streaming
_FIRST_EVENT_MAX = 1 << 20  # the first event must end within this many bytes (its end fixes the separator)

_TE_KEY_RE = re.compile(rb'"traceEvents"\s*:\s*\[')
_WS_B = re.compile(rb"\s*")
_WS_S = re.compile(r"\s*")
_SEP_RE = re.compile(rb'\}\s*,\s*\{\s*"')


class NotStreamable(Exception):
    """The document cannot be cut into events by its separator (the caller parses it whole)."""


@dataclass
class Batch:
    """Event texts of one step: ``buf[start:end]`` holds event bodies joined by ``sep`` (the file's text
    as it is, neither copied nor split unless ``region`` / ``bodies`` is asked for, so that a reader can
    pick the events it needs out of it). Where the batch was cut at a separator, ``buf[end]`` is that
    separator's ``}`` (the last body's closing brace)."""

    buf: bytes
    start: int
    end: int
    sep: bytes
    exact: bool  # False: a body may hold more than one event (parse them all, drop none unparsed)
    events: list | None = None  # the file's last events, already parsed
    count: int = 0  # bodies in buf[start:end]

    @property
    def region(self) -> bytes:
        """The bodies (each without its "{" and first '"', and without its "}"), joined by ``sep``."""
        return self.buf[self.start:self.end]

    @property
    def bodies(self) -> list[bytes]:
        if self.count <= 1:
            return [self.region] if self.count else []
        return self.region.split(self.sep)


def parse_bodies(bodies: list[bytes]) -> list:
    """Parse event bodies into dicts; NotStreamable unless they are exactly one object each."""
    if not bodies:
        return []
    events = orjson.loads(b'[{"' + b'},{"'.join(bodies) + b"}]")
    if len(events) != len(bodies):
        raise NotStreamable("event separator found inside an event")
    return events


class EventSplitter:
    def __init__(self, f, block_bytes: int = BLOCK_BYTES, max_carry_bytes: int = MAX_CARRY_BYTES):
        self._f = f
        self._block = block_bytes
        self._max_carry = max_carry_bytes
        self.header: dict | None = None
        self.layout = ""  # the separator found, for the reader's meta
        self.bare = False  # the document is a bare event list (no header)
        self.head = ""  # the text before the event array
        self.tail = ""  # the text after it

    def batches(self, until_separator: bool = False) -> Iterator[Batch]:
        """Batches from the start of the document. ``until_separator``: the stream ends just before a
        separator (the first half of a file cut in two): its last body is yielded as is, ``head`` holds
        the text before the event array and ``header`` stays None."""
        buf = self._f.read(self._block)
        if buf.startswith(BOM):
            buf = buf[3:]
        head, start = self._array_start(buf)
        self.bare = not head
        buf, start = self._fill(buf, start, _FIRST_EVENT_MAX)
        if self.bare and buf.startswith(b"]", start):
            raise NotStreamable("an empty list")
        if buf.startswith(b"]", start):  # no events
            rest = buf[start + 1:] + self._f.read(-1)
            self.header = join_header(head, rest.decode("utf-8"))
            return
        if not buf.startswith(b"{", start):
            raise NotStreamable("the event array does not hold objects")
        sep = self._separator(buf, start)
        self.layout = "one event" if sep is None else sep.decode("utf-8", "replace")
        start = _WS_B.match(buf, start + 1).end()
        if not buf.startswith(b'"', start):
            raise NotStreamable("an event does not start with a key")
        start += 1  # bodies start after their first quote: the separator ends with it
        self.head = head
        yield from self._cut(buf, start, sep, until_separator)
        if not until_separator:
            self.header = join_header(head, self.tail)

    def resume(self, sep: bytes) -> Iterator[Batch]:
        """Batches of a stream positioned at an event body (just after a separator), to the document's
        end; ``tail`` then holds the text after the event array."""
        self.layout = sep.decode("utf-8", "replace")
        yield from self._cut(self._f.read(self._block), 0, sep, False)

    def _cut(self, buf: bytes, start: int, sep: bytes | None, until_separator: bool) -> Iterator[Batch]:
        while sep is not None:
            k = buf.rfind(sep, start)
            if k > start:
                yield _batch(buf, start, k, sep)
                start = k + len(sep)
            more = self._f.read(self._block)
            if not more:
                break
            if len(buf) - start > self._max_carry:
                raise NotStreamable("no event separator found")
            # the separator before the next body is carried over too: a reader can then treat the
            # batch's first body like the others (Batch.buf[start - len(sep):start] is that separator)
            keep = start - len(sep) if start >= len(sep) and buf.startswith(sep, start - len(sep)) else start
            buf = buf[keep:] + more
            start -= keep
        if until_separator:  # the stream was cut just before a separator: what is left is one body
            body = bytes(memoryview(buf)[start:])
            yield Batch(body, 0, len(body), sep or b"", exact=body.count(b'"ph"') + body.startswith(b'ph"') == 1,
                        count=1)
            return
        rest = '{"' + bytes(memoryview(buf)[start:]).decode("utf-8")
        del buf
        events, self.tail = _decode_tail(rest)
        yield Batch(b"", 0, 0, sep or b"", exact=True, events=events)

    def separator(self) -> tuple[bytes, int]:
        """The separator between events and the offset of the first event body (after its '{"'), read
        from the start of the stream (which is left past that point)."""
        buf = self._f.read(self._block)
        bom = 3 if buf.startswith(BOM) else 0
        head, start = self._array_start(buf[bom:])
        if not head or not buf[bom:].startswith(b"{", start):
            raise NotStreamable("not an object with events")
        sep = self._separator(buf[bom:], start)
        if sep is None:
            raise NotStreamable("one event")
        return sep, bom + start


    # -- layout

    def _array_start(self, buf: bytes) -> tuple[str, int]:
        """The text before the event array (``""`` for a bare list) and the offset of its first element."""
        j = _WS_B.match(buf).end()
        if buf.startswith(b"[", j):
            return "", _WS_B.match(buf, j + 1).end()
        if not buf.startswith(b"{", j):
            raise NotStreamable("not an object")
        m = _TE_KEY_RE.search(buf)
        if m is None:
            raise NotStreamable("traceEvents not in the first block")
        return buf[: m.start()].decode("utf-8"), _WS_B.match(buf, m.end()).end()

    def _fill(self, buf: bytes, start: int, need: int) -> tuple[bytes, int]:
        while len(buf) - start < need:
            more = self._f.read(self._block)
            if not more:
                break
            buf += more
        return buf, start

    def _separator(self, buf: bytes, start: int) -> bytes | None:
        """The exact bytes between the first two events, from the first's ``}`` to the second's ``"``
        (None when there is only one event)."""
        end = _object_end(buf, start, start + _FIRST_EVENT_MAX)
        m = _SEP_RE.match(buf, end - 1)
        if m is not None:
            return m.group(0)
        if _WS_B.match(buf, end).end() < len(buf) and buf[_WS_B.match(buf, end).end()] == 0x5D:  # "]"
            return None
        raise NotStreamable("no separator after the first event")


class Window:
    """The first ``size`` bytes of a binary stream."""

    def __init__(self, f, size: int):
        self._f, self._left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n) if n > 0 else b""
        self._left -= len(data)
        return data


def find_cut(f: BinaryIO, size: int, sep: bytes, block_bytes: int = BLOCK_BYTES) -> int:
    """Offset of a separator near the middle of a seekable stream of ``size`` bytes (-1 if none)."""
    f.seek(size // 2)
    chunk = f.read(block_bytes)
    k = chunk.find(sep)
    return -1 if k < 0 else size // 2 + k

def _batch(buf: bytes, start: int, end: int, sep: bytes) -> Batch:
    count = buf.count(sep, start, end) + 1
    # Every event has one "ph" key: as many as bodies means no body holds two events (the first body's
    # opening quote belongs to the separator before the region).
    events = buf.count(b'"ph"', start, end) + buf.startswith(b'ph"', start)
    return Batch(buf, start, end, sep, exact=events == count, count=count)


def _object_end(buf: bytes, i: int, limit: int) -> int:
    """Offset just past the JSON object starting at ``buf[i]`` (a plain scan: used once per file)."""
    depth, in_str, esc = 0, False, False
    for j in range(i, min(len(buf), limit)):
        c = buf[j]
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:
                esc = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x7B, 0x5B):
            depth += 1
        elif c in (0x7D, 0x5D):
            depth -= 1
            if depth == 0:
                return j + 1
    raise NotStreamable("first event too long or unterminated")


def _decode_tail(s: str) -> tuple[list, str]:
    """Parse the last events (``s`` starts at one) and the closing ``]``; return them and the text after."""
    dec = json.JSONDecoder()
    i = _WS_S.match(s, 0).end()
    events: list = []
    if s.startswith("]", i):
        return events, s[i + 1:]
    while True:
        obj, i = dec.raw_decode(s, i)
        if not isinstance(obj, dict):
            raise NotStreamable("an event is not an object")
        events.append(obj)
        i = _WS_S.match(s, i).end()
        if s.startswith(",", i):
            i = _WS_S.match(s, i + 1).end()
            continue
        if s.startswith("]", i):
            return events, s[i + 1:]
        raise NotStreamable("unexpected text after an event")


def join_header(head: str, tail: str) -> dict:
    """The document's keys other than traceEvents, from the text before and after the array."""
    if not head:  # a bare event list: nothing may follow it
        if tail.strip():
            raise NotStreamable("text after the event list")
        return {}
    h, t = head.rstrip(), tail.strip()
    if h.endswith(","):
        if t.startswith(","):
            t = t[1:]
        elif t.startswith("}"):
            h = h[:-1]
    elif h.endswith("{") and t.startswith(","):
        t = t[1:]
    doc = json.loads(h + t)
    if not isinstance(doc, dict):
        raise NotStreamable("header is not an object")
    doc.pop("traceEvents", None)
    return doc
