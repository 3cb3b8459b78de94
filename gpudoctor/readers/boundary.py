"""The boundary around reading one input: whatever goes wrong becomes that input's one-line InputError,
so the other inputs of the call are still analyzed (exit 2 at the end).

Bad data (decode errors, numbers out of range, corrupt SQLite, I/O errors, nesting too deep, memory)
reads as what it is. Anything else is a bug in a reader: the input still fails alone, and the
traceback goes to a report file named in the one line (``GPUDOCTOR_DEBUG=1`` raises it instead).
"""

from __future__ import annotations

import csv
import os
import pickle
import sqlite3
import struct
import zlib
from contextlib import contextmanager
from typing import Iterator

from gpudoctor import crash
from gpudoctor.errors import GpudoctorError, InputError

# What damaged or hostile content raises from the parsers gpudoctor uses (UnicodeDecodeError and
# json/pandas parse errors are ValueErrors).
DATA_ERRORS = (ValueError, ArithmeticError, EOFError, zlib.error, sqlite3.Error, pickle.UnpicklingError,
               csv.Error, struct.error)


@contextmanager
def input_boundary(path: str | os.PathLike[str]) -> Iterator[None]:
    try:
        yield
    except GpudoctorError:
        raise
    except RecursionError:
        raise InputError(path, "nested too deeply to read") from None
    except MemoryError:
        raise InputError(path, "not enough memory to read it") from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or crash.one_line(e)}") from None
    except DATA_ERRORS as e:
        raise InputError(path, f"unreadable content ({crash.one_line(e)})") from None
    except Exception as e:
        if os.environ.get("GPUDOCTOR_DEBUG"):
            raise
        report = crash.write_report(e, f"reading {path}")
        raise InputError(path, f"internal error while reading it ({crash.one_line(e)}); "
                               f"report: {report}") from None
