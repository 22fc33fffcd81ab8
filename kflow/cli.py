"""The ``kflow`` command (``python -m kflow``): one entry point whose subcommands wrap the library.

    kflow assemble INPUT --out DIR     predict how a molecule packs (pretrained model)
    kflow crystal INPUT --out DIR      predict its crystal structures (space groups + lattice energy)
    kflow train | sample | evaluate    the molecular workflow (the same code as scripts/*_assembly.py)
    kflow plot RUN_DIR                 learning curves of a training run as PNG

Each subcommand's module is imported only when it runs, so ``kflow --help`` and a failing argument answer fast.
User errors (a missing file, an unusable input, a bad value, a busy run folder) and what the system refuses (disk
full, permission denied, out of memory: ``OSError``, ``MemoryError``) end in one line ``error: ...`` and exit
status 1 (argument errors: status 2); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from kflow.utils.cli import ArgumentParser, HelpFormatter, error_line, set_help, user_errors

__all__ = ["main", "plot_main", "COMMANDS", "HelpFormatter", "set_help"]

# name -> (module, function, one-line summary)
COMMANDS = {
    "assemble": ("kflow.molecular.commands", "assemble_main", "predict the packing of a molecule or crystal "
                                                                "(17-molecule cluster) with a pretrained model"),
    "crystal": ("kflow.molecular.commands", "crystal_main", "predict crystal structures of a rigid molecule, ranked "
                                                              "by MMFF94 lattice energy"),
    "train": ("kflow.molecular.commands", "train_main", "train rigid-body K-Flow on a cluster data set"),
    "sample": ("kflow.molecular.commands", "sample_main", "sample predictions of a trained checkpoint (.npz)"),
    "evaluate": ("kflow.molecular.commands", "evaluate_main", "score predictions: PM-atom, PM-center, RMSD15, ..."),
    "plot": ("kflow.cli", "plot_main", "learning curves (loss, validation metrics) of training runs as PNG"),
}

USAGE = "kflow <command> [options]   (kflow <command> --help for each command's options and an example)"


def _overview() -> str:
    from kflow import __version__

    width = max(map(len, COMMANDS))
    lines = [f"kflow {__version__}: K-Flow for molecular assembly", "", f"usage: {USAGE}", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "example:", "  kflow assemble data/examples/GASXON.sdf --out runs/gasxon"]
    return "\n".join(lines)


PLOT_HELP = """Learning curves (training loss, validation metrics) of training runs, from their metrics.jsonl, as PNG.

Examples:
    kflow plot runs/assembly_demo_k2                       # writes runs/assembly_demo_k2/curves.png
    kflow plot runs/k1 runs/k2 --out runs/k1_vs_k2.png     # several runs in one figure
"""


def plot_main(argv=None, prog: str | None = None):
    from pathlib import Path

    from kflow.utils.plots import plot_learning_curves, plot_run, read_metrics_log

    p = ArgumentParser(PLOT_HELP, prog=prog, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run folder(s) holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png; needed for several runs)")
    p.add_argument("--metrics", nargs="+", default=(), help="validation metrics to show (default: all logged)")
    p.add_argument("--no-progress", action="store_true", help="accepted for symmetry; plotting shows no bar")
    args = p.parse_args(argv)
    if args.out is not None:  # a folder, a path below a file or a read-only place: said before any plotting
        from kflow.utils.io import check_writable_file

        check_writable_file(args.out)
    if len(args.runs) == 1 and not args.metrics:
        out = plot_run(args.runs[0], args.out)
    else:
        if args.out is None and len(args.runs) > 1:
            p.error("several runs need --out")
        runs = {Path(r).name or str(r): read_metrics_log(r) for r in args.runs}
        out = plot_learning_curves(runs, args.out or Path(args.runs[0]) / "curves.png", metrics=args.metrics)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kflow`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0 if argv else 2
    if argv[0] == "--version":
        from kflow import __version__

        print(f"kflow {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: kflow: unknown command {name!r}; choose one of {', '.join(COMMANDS)} (kflow --help)",
              file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    try:
        command = getattr(importlib.import_module(module), function)
        result = command(rest, prog=f"kflow {name}")
    except SystemExit as exit_:  # argparse: --help (0) or a bad argument (2, message already printed)
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except user_errors() as err:  # the one error boundary: user errors, OSError (disk full), MemoryError
        print(error_line(err), file=sys.stderr)  # one line, whatever the message
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
