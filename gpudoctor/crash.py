"""Internal-error reports: the traceback of a bug in gpudoctor, written to a file the one-line error names."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback


def write_report(exc: BaseException, context: str = "") -> str:
    """Write ``exc``'s traceback (with versions and the command line) to a new file; return its path.

    The file goes to $GPUDOCTOR_REPORT_DIR, else the temporary directory. Returns a short reason instead
    of a path when nothing could be written (a full disk must not hide the original error)."""
    from gpudoctor import __version__

    folder = os.environ.get("GPUDOCTOR_REPORT_DIR") or tempfile.gettempdir()
    text = "".join([
        f"gpudoctor {__version__} internal error{' while ' + context if context else ''}\n",
        f"python {sys.version.split()[0]} on {platform.platform()}\n",
        f"command: {' '.join(sys.argv)}\n\n",
        *traceback.format_exception(type(exc), exc, exc.__traceback__),
    ])
    try:
        fd, path = tempfile.mkstemp(prefix=f"gpudoctor-internal-error-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".txt", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
            f.write(text)
        return path
    except OSError as e:
        return f"no report written: {e.strerror or e}"


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:300]}" if msg else type(exc).__name__
