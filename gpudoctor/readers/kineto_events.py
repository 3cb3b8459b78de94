"""Typed decoding of the Kineto events the reader holds most of: kernels, memcpy / memset, runtime and
driver calls.

msgspec decodes a batch of such events straight into Structs that have only the fields the reader uses;
the rest of each event (most of a kernel's ``args``) is skipped, not built as Python objects: about half
the time of parsing into dicts and reading the fields back. A Struct reads like the dict it replaces:
each field's default is the value the reader uses for a missing key (``EVENT_FILLS`` / ``ARG_FILLS``), a
whole column is one ``attrgetter`` pass (``column``), and ``get`` serves single events. A batch that does
not fit the types (``args`` not an object, an event not an object, a number out of range) raises
``Unfit``; the reader then parses it into dicts as usual, so both ways give the same result.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import msgspec

NEG3 = (-1, -1, -1)
EVENT_FILLS: dict[str, Any] = {"name": "", "ts": None, "dur": None, "tid": -1, "pid": None}
_COLLECTIVE_ARGS = ("External id", "Collective name", "In msg nelems", "Out msg nelems", "Group size", "dtype")
ARG_FILLS: dict[str, dict[str, Any]] = {
    "kernel": {"device": 0, "stream": -1, "correlation": -1, "registers per thread": -1, "shared memory": -1,
               "grid": NEG3, "block": NEG3, **dict.fromkeys(_COLLECTIVE_ARGS)},
    # a memop's device is "device", else "inDevice" (UNSET: absent, told apart from null)
    "memop": {"device": msgspec.UNSET, "inDevice": 0, "stream": -1, "correlation": -1, "bytes": 0},
    "api": {"correlation": -1},
}
# Kineto category -> the kind of Struct its events decode into
KIND_OF_CATEGORY = {"kernel": "kernel", "gpu_memcpy": "memop", "gpu_memset": "memop",
                    "cuda_runtime": "api", "cuda_driver": "api"}


class Unfit(Exception):
    """The batch does not decode into the typed events (parse it into dicts instead)."""


def _attr(key: str) -> str:
    return key.replace(" ", "_")


def _get(self, key: str, default: Any = None) -> Any:
    value = getattr(self, _attr(key), default)
    return default if value is msgspec.UNSET else value


def _struct(name: str, fills: dict[str, Any], extra: list | None = None) -> type:
    fields = [(_attr(k), Any, msgspec.field(default=v, name=k)) for k, v in fills.items()]
    # gc=False: these objects hold no cycles; the collector need not track millions of them
    return msgspec.defstruct(name, fields + (extra or []), namespace={"get": _get}, gc=False)


def _decoder(kind: str) -> msgspec.json.Decoder:
    args = _struct(f"{kind}_args", ARG_FILLS[kind])
    event = _struct(f"{kind}_event", EVENT_FILLS, [("args", args, msgspec.field(default_factory=args))])
    return msgspec.json.Decoder(event)


_DECODERS = {kind: _decoder(kind) for kind in ARG_FILLS}


def decode(category: str, objs: list[bytes]) -> list:
    """Events of one category, each the text of one JSON object -> typed events."""
    try:
        return list(map(_DECODERS[KIND_OF_CATEGORY[category]].decode, objs))
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise Unfit(str(e)) from None


def is_typed(objs: list) -> bool:
    return bool(objs) and type(objs[0]) is not dict


def column(objs: list, key: str) -> list:
    """The values of ``key`` in typed events (a missing key reads as its fill)."""
    return list(map(attrgetter(_attr(key)), objs))
