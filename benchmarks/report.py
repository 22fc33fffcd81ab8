"""Write one benchmark's tables into its own section of BENCHMARKS.md.

Each benchmark owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` and replaces only that,
so the scripts can run in any order and never clobber each other's results.
"""
from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import torch

from kflow.utils.io import atomic_write_text

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nMeasured figures, written by the scripts in `benchmarks/` (ours and the baseline in one run).\n"


def machine_line() -> str:
    threads = torch.get_num_threads()
    return (f"_Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
            f"{threads} torch thread{'s' if threads != 1 else ''}, torch {torch.__version__}, "
            f"Python {platform.python_version()}._")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md with ``body``."""
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n\n{machine_line()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
