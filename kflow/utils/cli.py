"""What every kflow command-line entry point shares: argument types that reject nonsense before any work starts,
and one way of turning user errors into a one-line message instead of a traceback."""
from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable

__all__ = ["ArgumentParser", "positive_int", "nonnegative_int", "seed_int", "check_seed", "SEED_LIMIT", "positive_float", "unit_fraction", "add_run_arguments",
           "run_main", "user_errors", "error_line", "HelpFormatter", "set_help"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the module docstring kept as written (examples) and one-line errors: a bad argument ends
    the process with ``error: <prog>: <message>`` (exit status 2) and no usage dump (``--help`` shows it)."""

    def __init__(self, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        if getattr(namespace, "accept_changes", False):  # folded into --resume, which reaches Trainer.fit as is
            if not namespace.resume:
                self.error("--accept-changes applies to --resume")
            from kflow.core.training import Resume

            namespace.resume = Resume(namespace.resume, accept_changes=True)
        return namespace, rest


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


SEED_LIMIT = 2 ** 31  # seeds are 0 <= seed < 2**31: RDKit's conformer seed is a 32-bit int, torch's and numpy's more


def check_seed(value, name: str = "seed") -> int:
    """A seed as every generator kflow seeds accepts it: an integer 0 <= seed < ``SEED_LIMIT``, else ``ValueError``
    in one line (checked before any work: 2**70 once failed deep in torch after the model had loaded)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2^31) = 0..{SEED_LIMIT - 1}, got {value!r}")
    return int(value)


def seed_int(text: str) -> int:
    """argparse type: a seed, 0 <= seed < 2**31 (``check_seed``)."""
    value = int(text)  # not a number: argparse's "invalid seed_int value"
    try:
        return check_seed(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("seed ")) from None


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
    """The run-folder flags every training command shares: --resume [CHECKPOINT], --accept-changes, --overwrite,
    --deterministic, --no-progress."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                       help="continue from <out>/checkpoints/last.pt, or from CHECKPOINT (e.g. an intact step_*.pt "
                            "when last.pt is damaged); a changed seed or data set is refused")
    parser.add_argument("--accept-changes", action="store_true",
                        help="with --resume: continue although the seed, the data set or its start preset changed "
                             "(recorded in config.json as accepted_changes)")
    group.add_argument("--overwrite", action="store_true",
                       help="start over in a run folder that holds an earlier run (its checkpoints are deleted)")
    parser.add_argument("--deterministic", action="store_true",
                        help="bit-identical runs and resumes on CPU (one thread, deterministic algorithms; slower)")
    parser.add_argument("--no-progress", action="store_true")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a command reports as one line, not as a traceback (a bug): the user's mistakes (missing
    file, bad value, unreadable checkpoint, busy run folder) and what the machine refuses (``OSError``: disk
    full, permission denied, ...; ``MemoryError``)."""
    from kflow.core.training import CheckpointError

    return FileNotFoundError, ValueError, CheckpointError, OSError, MemoryError


_user_errors = user_errors  # the earlier private name


def error_line(err: BaseException) -> str:
    """``error: <message>`` on one line, whatever the exception's text: an ``OSError`` says which file and what
    the system said (``No space left on device``), a ``MemoryError`` that the machine ran out of memory."""
    if isinstance(err, OSError) and err.strerror:
        where = err.filename if err.filename is not None else ""
        message = f"{where}: {err.strerror}" if where else err.strerror
        if err.errno == errno.ENOSPC:
            message += " (free some space or write elsewhere; files already complete were kept)"
    elif isinstance(err, MemoryError):
        message = f"out of memory{': ' + str(err) if str(err) else ''} (a smaller input or batch, or more memory)"
    else:
        message = str(err) or type(err).__name__
    return "error: " + " ".join(message.split())


def run_main(main: Callable[[], object]) -> None:
    """Run a script's ``main()``: a user error (missing file, bad value, unreadable checkpoint, disk full) ends the
    process with ``error: <message>`` (one line) on stderr and exit status 1; anything else is a bug and keeps
    its traceback."""
    try:
        result = main()
    except KeyboardInterrupt:
        sys.exit("error: interrupted")
    except _user_errors() as err:
        sys.exit(error_line(err))
    if isinstance(result, int):
        sys.exit(result)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of every kflow command and script: the description as written (its examples), and each option's
    help ending in its default, ``(default: X)``, unless the help already says it or there is none to show (no
    default, an empty list, or off: a flag is off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        nothing = (default is None or default is False or default is argparse.SUPPRESS
                   or isinstance(default, (list, tuple)) and not default)
        positional = not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if nothing or positional or "%(default)" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def set_help(parser: argparse.ArgumentParser, option: str, text: str) -> None:
    """Give ``option``, added by a shared helper, the help text of this command."""
    parser._option_string_actions[option].help = text
