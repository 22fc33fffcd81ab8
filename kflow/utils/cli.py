"""What every kflow command-line entry point shares: argument types that reject nonsense before any work starts,
and one way of turning user errors into a one-line message instead of a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

__all__ = ["ArgumentParser", "positive_int", "nonnegative_int", "positive_float", "unit_fraction", "add_run_arguments",
           "run_main", "user_errors"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the module docstring kept as written (examples) and one-line errors: a bad argument ends
    the process with ``error: <prog>: <message>`` (exit status 2) and no usage dump (``--help`` shows it)."""

    def __init__(self, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def unit_fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The run-folder flags every training command shares: --resume, --overwrite, --deterministic, --no-progress."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt")
    group.add_argument("--overwrite", action="store_true",
                       help="start over in a run folder that holds an earlier run (its checkpoints are deleted)")
    parser.add_argument("--deterministic", action="store_true",
                        help="bit-identical runs and resumes on CPU (one thread, deterministic algorithms; slower)")
    parser.add_argument("--no-progress", action="store_true")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a command reports as one line (the user's mistake), not as a traceback (a bug)."""
    from kflow.core.training import CheckpointError

    return FileNotFoundError, ValueError, CheckpointError


_user_errors = user_errors  # the earlier private name


def run_main(main: Callable[[], object]) -> None:
    """Run a script's ``main()``: a user error (missing file, bad value, unreadable checkpoint) ends the process
    with ``error: <message>`` on stderr and exit status 1; anything else is a bug and keeps its traceback."""
    try:
        result = main()
    except _user_errors() as err:
        sys.exit(f"error: {err}")
    if isinstance(result, int):
        sys.exit(result)
