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
import socket
import tempfile
import time
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


def unique_filename(name: str, taken: set[str]) -> str:
    """``safe_filename(name)``, with a suffix ``-2``, ``-3``, ... when that is already in ``taken`` (compared
    without letter case: ``ABC`` and ``abc`` are one file on macOS and Windows); the result is added to ``taken``.
    Names that differ only in characters ``safe_filename`` replaces (``X/1``, ``X:1``, ``X_1``) would otherwise
    overwrite each other's files."""
    base = safe_filename(name)
    candidate, k = base, 1
    while candidate.casefold() in taken:
        k += 1
        suffix = f"-{k}"
        candidate = base[:MAX_FILENAME_LENGTH - len(suffix)] + suffix
    taken.add(candidate.casefold())
    return candidate


def printable_name(name) -> str:
    """A name read from an input file as text files show it: one line of printable characters (newlines and other
    control characters become spaces, runs of spaces one), double quotes as single ones and backslashes as ``/``:
    a raw newline ends an extxyz comment line early and a backslash escapes the quote after it, so the file could
    not be read back (or its other fields would be read as part of the name)."""
    text = "".join(c if c.isprintable() else " " for c in str(name))
    return " ".join(text.replace('"', "'").replace("\\", "/").split()) or "unnamed"


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (``/proc``; changing it, even
    briefly, would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(is_dir: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file or folder under the current umask (0644 / 0755
    under umask 022)."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


def make_temporary(final: str | os.PathLike, is_dir: bool = False, kind: str = "tmp") -> Path:
    """A new, uniquely named temporary file or folder ``.<name>.<kind>-*`` beside ``final``, with the permissions the
    umask gives any new file: ``mkstemp``/``mkdtemp`` create them private (0600/0700), and after the rename onto
    ``final`` nobody else on a shared filesystem could read a run."""
    final = Path(final)
    prefix = f".{final.name}.{kind}-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, default_mode(is_dir))
    return tmp


def name_the_file(err: OSError, path: str | os.PathLike, staged: str | os.PathLike | None = None) -> OSError:
    """Give an ``OSError`` that names no file (a full disk found while a library flushes or closes a file it was
    handed) the file being written, so its one-line message says where: ``error: runs/x/last.pt: No space left on
    device``; one that names ``staged`` (the temporary file or folder written in place of ``path``), or a file
    inside it, names it where it was going instead (``runs/x/raw/a.csv``, not ``runs/.x.build-*/x/raw/a.csv``).
    Returns ``err``."""
    if not isinstance(err, OSError) or not err.strerror:
        return err
    if err.filename is None:
        err.filename = str(path)
    elif staged is not None and isinstance(err.filename, str):
        name, stage = err.filename, str(staged)
        if name == stage or name.startswith(stage + os.sep):
            err.filename = str(path) + name[len(stage):]
    return err


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it onto ``final``.

    The temporary lives in the same folder as ``final`` so the rename is atomic on POSIX, and it has the mode the
    umask gives a new file (``make_temporary``). On any exception the temporary is removed and ``final`` is left
    untouched (an older version, if any, survives).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = make_temporary(final, is_dir)
    except OSError as err:  # e.g. a read-only folder: name the file that was to be written, not its temporary
        if isinstance(err.filename, str) and Path(err.filename).name.startswith(f".{final.name}."):
            err.filename = str(final)
        raise
    try:
        try:
            yield tmp
            if is_dir and final.exists():
                # Directories cannot be renamed over non-empty ones: move the old one aside first.
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)  # onto a folder: "final: Is a directory", not the temporary's name
        except OSError as err:
            name_the_file(err, final, tmp)
            raise
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


# ------------------------------------------------------------------------------------------ output folders
def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(out: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse, before any work, a place a folder cannot be written to: an existing file, or a folder (or the first
    existing folder above it) this user may not write into. Returns ``out`` as a ``Path``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file; give a folder")
    anchor = _first_existing(out)
    if not anchor.is_dir():
        raise ValueError(f"{flag} {out}: {anchor} is a file, so no folder can be made below it")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: permission denied, {anchor} is not writable for this user")
    probe_write(anchor, f"{flag} {out}")
    return out


def probe_write(folder: str | os.PathLike, what: str) -> None:
    """Create and remove a hidden file in ``folder``: ``os.access`` says yes to root for places no file can be
    made in (``/sys``, ``/proc``, a read-only mount), which would otherwise fail after the work. Raises
    ``ValueError`` (one line, ``what`` first) when the folder takes no new file."""
    try:
        fd, name = tempfile.mkstemp(prefix=".kflow-probe-", dir=folder)
    except OSError as err:
        raise ValueError(f"{what}: cannot write into {folder} ({err.strerror or type(err).__name__})") from None
    os.close(fd)
    os.unlink(name)


def check_writable_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse, before any work, a file name that cannot be written: an existing folder, a path below a file, or a
    folder this user may not write into (the file is written beside its final place and renamed in). Returns
    ``path`` as a ``Path``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    anchor = _first_existing(path.parent)
    if not anchor.is_dir():
        raise ValueError(f"{flag} {path}: {anchor} is a file, so nothing can be written below it")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: permission denied, {anchor} is not writable for this user")
    return path


ANY_CONTENT = "any content"  # in an ``expected`` layout: a folder kflow made whose content is its own


def foreign_entries(folder: Path, expected: dict, prefix: str = "") -> list[str]:
    """Paths below ``folder`` that ``expected`` does not describe, hidden files included. ``expected`` maps a name
    or an ``fnmatch`` pattern to ``None`` (a file), to the ``expected`` of a sub-folder or to ``ANY_CONTENT``;
    symbolic links are always foreign (a command never writes one, and replacing one could reach outside the
    folder)."""
    import fnmatch

    found = []
    for entry in sorted(folder.iterdir()):
        spec = next((v for k, v in expected.items() if fnmatch.fnmatchcase(entry.name, k)), "missing")
        label = prefix + entry.name
        if spec == "missing" or entry.is_symlink() or (spec is None) != (not entry.is_dir()):
            found.append(label + ("/" if entry.is_dir() else ""))
        elif isinstance(spec, dict):
            found += foreign_entries(entry, spec, label + "/")
    return found


def check_replaceable_folder(out: str | os.PathLike, expected: dict, command: str, flag: str = "--out") -> Path:
    """Refuse an output folder that ``command`` would replace as a whole unless everything in it is what that
    command writes (``expected``, see ``foreign_entries``; dot-files count like any other file, so a ``.git``
    is never swept away), and refuse the current folder or one above it (``--out .``), a file and a place that
    is not writable. Raises ``ValueError`` with one line; returns ``out`` as a ``Path``."""
    out = check_writable_folder(out, flag)
    resolved, here = out.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or here.is_relative_to(resolved):
        raise ValueError(f"{flag} {out}: {command} replaces its output folder as a whole, which cannot be the "
                         "current folder or one above it; give a new or empty sub-folder")
    if out.is_dir():
        foreign = foreign_entries(out, expected)
        if foreign:
            raise ValueError(f"output folder {out} holds {', '.join(foreign[:5])}"
                             f"{f' and {len(foreign) - 5} more' if len(foreign) > 5 else ''}, which {command} did "
                             "not write; the folder is replaced as a whole, so give an empty or new --out")
        if not os.access(resolved.parent, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {out}: permission denied, its parent {resolved.parent} is not writable (the "
                             "folder is replaced by a rename there)")
        probe_write(resolved.parent, f"{flag} {out}")
    return out


_HELD_WRITER_LOCKS: dict[str, int] = {}  # resolved output folder -> depth, the locks this process holds


@contextlib.contextmanager
def one_writer(out: str | os.PathLike, what: str) -> Iterator[None]:
    """One writer per output folder that is replaced as a whole (``kflow assemble --out``, ``kflow crystal
    --out``): while the block runs, ``.<name>.kflow-lock`` beside the folder (not in it: the folder is swapped in
    by a rename) holds this process's pid, host and start time (``FolderLock``); a second process is refused in one
    line (``FolderBusyError``) naming the holder. The lock goes on any exit of the block (an error, Ctrl-C); one
    left by a killed process is stale and replaced. Re-entrant within a process (``assemble(out=)`` holds it
    while ``AssemblyResult.write`` writes)."""
    out = Path(out)
    key = str(out.resolve())
    if key in _HELD_WRITER_LOCKS:
        _HELD_WRITER_LOCKS[key] += 1
        try:
            yield
        finally:
            _HELD_WRITER_LOCKS[key] -= 1
        return
    with _WriterLock(out, what):
        _HELD_WRITER_LOCKS[key] = 1
        try:
            yield
        finally:
            del _HELD_WRITER_LOCKS[key]


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


def loads_json(text: str | bytes):
    """``json.loads``, with nesting deeper than the parser's recursion limit raised as ``json.JSONDecodeError`` (a
    damaged or hostile file, refused like any other malformed JSON) instead of a ``RecursionError`` traceback."""
    try:
        return json.loads(text)
    except RecursionError:
        doc = text if isinstance(text, str) else ""
        raise json.JSONDecodeError("nested deeper than the JSON reader's recursion limit", doc, 0) from None


def read_versioned_json(path: str | os.PathLike, version: int) -> dict | None:
    """A JSON object written (atomically) with ``"version": version``, or None when the file is missing, unreadable
    or of another version: how resumable studies tell a finished result from one still to compute."""
    try:
        record = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # deep nesting: damaged
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


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", tuple: "a list", dict: "an object", type(None): "null"}.get(
        type(value), type(value).__name__)


def _check_budget_types(path, saved, budget) -> None:
    """A saved budget must be an object whose fields have the kinds of the budget's own values (a list where a
    number belongs is a damaged or hand-edited file, refused in one line rather than a TypeError later)."""
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: the saved budget is {_kind(saved)}, not an object (a damaged or hand-edited "
                         "file); move it away to recompute")
    for f in fields(budget):
        want = getattr(budget, f.name)
        if f.name in saved and want is not None and saved[f.name] is not None and \
                _kind(saved[f.name]) != _kind(want):
            raise ValueError(f"{path}: budget field {f.name!r} is {_kind(saved[f.name])} where {_kind(want)} "
                             "belongs (a damaged or hand-edited file); move it away to recompute")


def check_saved_budget(path: str | os.PathLike, record: dict | None, budget, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a saved study result computed under another budget (ValueError naming the file and the changed
    fields): a resumable study that reused it silently would put numbers from two budgets in one table. A budget
    of the wrong shape (not an object, a field of the wrong kind) is refused the same way."""
    if record is None or budget is None or "budget" not in record:
        return
    _check_budget_types(path, record["budget"], budget)
    try:
        changed = budget_differences(record["budget"], budget, ignore)
    except (TypeError, ValueError) as err:  # the budget's own checks refused the saved values
        raise ValueError(f"{path}: the saved budget is not valid ({err}); move it away to recompute") from None
    if changed:
        raise ValueError(f"{path}: saved under another study budget ({'; '.join(changed)}); move it away to "
                         "recompute it, or write this study to another folder")


# ---------------------------------------------------------------------------------------------- folder locks
class FolderBusyError(ValueError):
    """A folder another live process is writing (it holds the folder's lock file)."""


def _process_start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc``), or None where unknown: with the pid it
    tells a live holder from a new process that happens to reuse a dead holder's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder_alive(holder: dict) -> bool:
    """Whether the process a lock file names still runs. A holder on another host cannot be checked: it counts as
    alive (the message says how to remove the lock of a machine that died)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
        return False
    started = holder.get("process_start")
    return started is None or _process_start_time(pid) in (None, started)


def _link_exclusive(complete: Path, path: Path) -> None:
    """Make ``path`` a file with the content of ``complete``, failing with ``FileExistsError`` if it exists: a hard
    link where the filesystem has them (atomic, never half-written), else an exclusive create."""
    try:
        os.link(complete, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network or FAT filesystems)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(complete.read_bytes())


class FolderLock:
    """One writer per folder: ``folder/<name>`` holds the holder's pid, host and start time while it works.

    ``acquire`` creates the file atomically (a complete file is hard-linked into place, so no reader ever sees a
    half-written one) and raises ``FolderBusyError`` naming the holder when a live process has it. A lock left by
    a process that died (same host, pid gone or reused) is stale: it is replaced. ``release`` removes the file if
    it is still this lock's."""

    def __init__(self, folder: str | os.PathLike, name: str = "kflow.lock", what: str = "folder"):
        self.path, self.what = Path(folder) / name, what
        self.token = f"{os.getpid()}-{time.time_ns()}"

    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start_time(os.getpid()),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": self.token}

    def _holder(self) -> dict | None:
        try:
            holder = loads_json(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}  # unreadable: no live holder can be named, so it is stale
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temporary(self.path)
        try:
            tmp.write_text(json.dumps(self._record()) + "\n")
            for _ in range(3):
                try:
                    _link_exclusive(tmp, self.path)
                    return self
                except FileExistsError:
                    holder = self._holder()
                    if holder is None:
                        continue  # released meanwhile
                    if holder and _holder_alive(holder):  # {}: unreadable, names no live holder: stale
                        raise self._busy(holder) from None
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
            raise FolderBusyError(f"{self.path}: could not take the lock (other processes keep taking it)")
        finally:
            tmp.unlink(missing_ok=True)

    def _busy(self, holder: dict) -> FolderBusyError:
        return FolderBusyError(f"{self.path.parent} is in use by another {self.what} (pid {holder.get('pid')} on "
                               f"{holder.get('host')}, since {holder.get('started')}); wait for it to finish, or "
                               f"remove {self.path} if that process is gone")

    def check(self) -> None:
        """Raise ``FolderBusyError`` if a live process holds the lock, without taking it: a command that reads
        or builds its inputs first can say at once that it could not write its folder anyway."""
        holder = self._holder()
        if holder and _holder_alive(holder):
            raise self._busy(holder)

    def release(self) -> None:
        holder = self._holder()
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class _WriterLock(FolderLock):
    """``one_writer``'s lock: ``.<name>.kflow-lock`` beside the output folder, its busy message about that folder."""

    def __init__(self, out: Path, what: str):
        super().__init__(out.parent, f".{out.name}.kflow-lock", what)
        self.out = out

    def _busy(self, holder: dict) -> FolderBusyError:
        return FolderBusyError(f"--out {self.out} is being written by another run (pid {holder.get('pid')} on "
                               f"{holder.get('host')}, since {holder.get('started')}); wait for it to finish, or "
                               f"remove {self.path} if that process is gone")
