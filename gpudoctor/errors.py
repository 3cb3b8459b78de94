"""Errors that carry their exit code and print as one line."""


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
        super().__init__(f"this needs the '{module}' package: pip install 'gpudoctor[{extra}]'")


def require(module: str, extra: str):
    """Import an optional dependency or raise MissingExtraError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(module, extra) from None
