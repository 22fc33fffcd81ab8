"""What every kflow command-line entry point shares: argument types that reject nonsense before any work starts,
and one way of turning user errors into a one-line message instead of a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

__all__ = ["positive_int", "nonnegative_int", "positive_float", "run_main"]


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


def _user_errors() -> tuple[type[BaseException], ...]:
    from kflow.core.training import CheckpointError

    return FileNotFoundError, ValueError, CheckpointError



def run_main(main: Callable[[], object]) -> None:
    """Run a script's ``main()``: a user error (missing file, bad value, unreadable checkpoint) ends the process
    with ``error: <message>`` on stderr and exit status 1; anything else is a bug and keeps its traceback."""
    try:
        result = main()
    except _user_errors() as err:
        sys.exit(f"error: {err}")
    if isinstance(result, int):
        sys.exit(result)
