"""Safe file writes: a file either appears complete under its final name or not at all, and a name taken from
input data can only ever name a file inside the folder it is written to.

Every writer in kflow goes through these helpers so that a crash, a full disk or a Ctrl-C never leaves a
half-written checkpoint, dataset or report behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import torch


_UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_FILENAME_LENGTH = 120


def safe_filename(name: str) -> str:
    """A file-name component made from untrusted text (a crystal or cluster name read from an input file).

    Path separators, ``..``, control and other unusual characters become ``_``; leading dots are dropped (no hidden
    files, no ``..``); the result is never empty and at most ``MAX_FILENAME_LENGTH`` characters.
    """
    cleaned = _UNSAFE_FILENAME_CHARS.sub("_", str(name)).lstrip(".")
    cleaned = cleaned.replace("..", "_")[:MAX_FILENAME_LENGTH]
    return cleaned or "unnamed"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it onto ``final``.

    The temporary lives in the same folder as ``final`` so the rename is atomic on POSIX. On any exception the
    temporary is removed and ``final`` is left untouched (an older version, if any, survives).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent)) if is_dir else None
    if tmp is None:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and final.exists():
            # Directories cannot be renamed over non-empty ones: move the old one aside first.
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a truncated file under ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def read_versioned_json(path: str | os.PathLike, version: int) -> dict | None:
    """A JSON object written (atomically) with ``"version": version``, or None when the file is missing, unreadable
    or of another version: how resumable studies tell a finished result from one still to compute."""
    try:
        record = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("version") == version else None


def budget_differences(saved: dict, budget, ignore: tuple[str, ...] = ()) -> list[str]:
    """``"field: saved -> now"`` for every field of a saved budget (a dataclass as ``asdict``) that differs from
    ``budget`` (an instance of that dataclass), except ``ignore``; fields missing from an older record count as
    their defaults, fields the dataclass does not know are reported as such."""
    known = {f.name for f in fields(budget)}
    unknown = sorted(set(saved) - known)
    if unknown:
        return [f"unknown field(s) {', '.join(unknown)}"]
    before = type(budget)(**saved)
    return [f"{name}: {getattr(before, name)!r} -> {getattr(budget, name)!r}" for name in sorted(known)
            if name not in ignore and getattr(before, name) != getattr(budget, name)]


def check_saved_budget(path: str | os.PathLike, record: dict | None, budget, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a saved study result computed under another budget (ValueError naming the file and the changed
    fields): a resumable study that reused it silently would put numbers from two budgets in one table."""
    if record is None or budget is None or "budget" not in record:
        return
    changed = budget_differences(record["budget"], budget, ignore)
    if changed:
        raise ValueError(f"{path}: saved under another study budget ({'; '.join(changed)}); move it away to "
                         "recompute it, or write this study to another folder")
