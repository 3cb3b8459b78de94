"""The shape every subcommand has."""

from __future__ import annotations

import argparse


class Command:
    """A subcommand: declares its arguments and runs. ``run`` returns the exit code.

    Expected failures raise gpudoctor.errors.GpudoctorError (printed as one line, its exit code).
    """

    name = ""
    help = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # pragma: no cover - interface
        pass

    def run(self, args: argparse.Namespace) -> int:  # pragma: no cover - interface
        raise NotImplementedError
