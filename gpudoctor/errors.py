"""Errors that carry their exit code and print as one line."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType


def one_line(x: object) -> str:
    """A message (or anything printable) on one line; an exception without a message by its type's name."""
    text = " ".join(str(x).split())
    return text or (type(x).__name__ if isinstance(x, BaseException) else "")


class GpudoctorError(Exception):
    """An expected failure: printed as one line, exits with ``exit_code``. Never a traceback."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(GpudoctorError):
    """An input file cannot be read. The message names the file and what is wrong."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class MissingExtraError(GpudoctorError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str):
        super().__init__(f"this needs the '{module}' package: {install_hint(extra)}")


def install_hint(extra: str) -> str:
    """The install command for an extra that works where this gpudoctor came from: a source checkout (the
    package sits next to pyproject.toml) or a package index."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return f"pip install -e '{root}[{extra}]'"
    return f"pip install 'gpudoctor[{extra}]'"


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency or raise MissingExtraError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(module, extra) from None
