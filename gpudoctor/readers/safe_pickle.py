"""Load a pickle that may only hold plain data, never run code.

A CUDA caching-allocator snapshot (``torch.cuda.memory._dump_snapshot``) is a pickle. Unpickling an
untrusted pickle with ``pickle.load`` runs arbitrary code: ``GLOBAL``/``STACK_GLOBAL`` import any
callable (``os.system``, ``builtins.eval``) and ``REDUCE`` calls it. A snapshot is only nested dicts,
lists, tuples, strings and numbers, so this loader refuses everything that could reach code.

What real snapshots need (checked with ``pickletools`` on snapshots written by PyTorch 2.11: protocol 4,
opcodes PROTO FRAME EMPTY_DICT EMPTY_LIST MARK SETITEMS APPENDS APPEND TUPLE2 MEMOIZE BINGET
LONG_BINGET SHORT_BINUNICODE BINUNICODE BININT BININT1 BININT2 LONG1 BINFLOAT NEWFALSE STOP): no
global at all. So the allow-list of importable names is empty:

- ``find_class`` (reached by GLOBAL, STACK_GLOBAL, INST, OBJ-by-name and extension codes) always
  refuses, *before* anything is imported: the message names what the pickle asked for.
- ``persistent_load`` (PERSID, BINPERSID) refuses.
- Extension codes (EXT1/2/4) go through ``find_class`` unless ``copyreg``'s extension cache already
  holds the object; when the process has any extension registered, the pure-Python unpickler is used
  with those opcodes removed, so a cached object can never be reached either.
- Out-of-band buffers (NEXT_BUFFER) fail: no buffers are passed.

Without a callable on the stack, REDUCE / BUILD / NEWOBJ cannot run anything, so the only objects the
pickle machine can build are dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float,
bool and None.

The file is read into memory first (snapshots are megabytes) so that a length field claiming more
bytes than the file holds is caught as truncation instead of being allocated.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from pathlib import Path

from gpudoctor.errors import InputError
from gpudoctor.readers import read_bytes
from gpudoctor.readers.limits import check_pickle_expansion

PLAIN_TYPES = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, bool, type(None))


class _Refused(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class _PlainUnpickler(pickle.Unpickler):
    """The C unpickler with every way to import or resolve an object refused."""

    def find_class(self, module, name):  # noqa: D401 - pickle API
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {pid!r:.60}")


def _refuse_ext(self):
    raise _Refused("an object from copyreg's extension registry")


class _PlainPyUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python fallback used only when copyreg has extension codes registered in this process."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse_ext
    del _op

    def find_class(self, module, name):
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {pid!r:.60}")


def _truncation(e: BaseException) -> bool:
    if isinstance(e, EOFError):
        return True
    text = str(e).lower()
    return "truncated" in text or "ran out of input" in text or "unexpected end" in text


def loads(data: bytes, path: str | Path = "<bytes>") -> object:
    """Unpickle ``data`` allowing only plain data; raise InputError(path, ...) otherwise."""
    if not data:
        raise InputError(path, "empty file")
    cls = _PlainPyUnpickler if (copyreg._extension_cache or copyreg._inverted_registry) else _PlainUnpickler
    try:
        return cls(io.BytesIO(data)).load()
    except _Refused as e:
        raise InputError(path, f"refused: the pickle asks to load {e.what}; snapshots hold only plain data") from None
    except RecursionError:
        raise InputError(path, "refused: the pickle nests too deeply") from None
    except MemoryError:
        raise InputError(path, "refused: the pickle asks for more memory than is available") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, UnicodeDecodeError) as e:
        if _truncation(e):
            raise InputError(path, "truncated pickle (the file ends before the pickle does)") from None
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(path, f"not a valid pickle: {first}") from None


def load(path: str | Path) -> object:
    """Read ``path`` and unpickle it allowing only plain data (see the module docstring).

    Memo references let a small pickle stand for a huge tree (one list referenced a million times,
    each holding another): the result is refused when it expands to more than
    GPUDOCTOR_MAX_PICKLE_OBJECTS containers (``limits.check_pickle_expansion``), before a reader walks it."""
    path = Path(path)
    obj = loads(read_bytes(path, "a CUDA memory snapshot", gunzip=False), path)
    check_pickle_expansion(obj, path)
    return obj
