"""Reading crystals (``read_crystals``): CIF files (``cif.read_cif``), ASE databases and extxyz files. Every input gives
crystals or a ``ReadProblem`` with a reason; nothing is dropped silently.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator


if TYPE_CHECKING:  # ase is imported lazily at run time
    from ase import Atoms
from kflow.molecular.data.bounds import bounds_problem, describe_error, note_problem
from kflow.molecular.data.cif import read_cif


__all__ = ["read_crystals", "crystal_files", "FOLDER_SUFFIXES"]


FOLDER_SUFFIXES = (".cif",)  # what a folder given as input contributes


def crystal_files(path: str | os.PathLike) -> list[Path]:
    """The input files ``read_crystals(path)`` reads: ``path`` itself, or the ``.cif`` files of a folder (sorted).
    Raises ``FileNotFoundError`` for a missing path or a folder without CIF files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: folder contains no .cif files")
        return files
    return [path]


def read_crystals(path: str | os.PathLike, errors: list | None = None) -> Iterator[tuple[str, "Atoms"]]:
    """Yield ``(name, ase.Atoms)`` from a CIF file, a folder of CIFs, an ASE database (.db/.json) or an extxyz file.

    Names come from the CSD refcode where the source has one (ASE db keys ``csd_code``/``refcode``/``NAME``/
    ``name``, also inside a row's ``data`` or ``info``; extxyz ``NAME``), else from the file name (and the frame or
    block index). Every crystal carries ``atoms.info["source"]`` (its file) and ``atoms.info["reader"]``.

    CIF files are read block by block (see ``read_cif``): ASE's CIF parser with kflow's symmetry expansion first,
    pymatgen's ``CifParser`` second. An input that gives no crystal is skipped; when ``errors`` is a list, a
    ``ReadProblem`` (source, message, reason, file) is appended for it, so one bad file never stops a large build
    and no file is dropped silently. With ``errors=None`` the first problem raises ``ValueError``.
    """
    for file in crystal_files(path):
        suffix = file.suffix.lower()
        if suffix == ".cif":
            yield from read_cif(file, errors)
        elif suffix in (".db", ".json"):
            yield from _read_ase_db(file, errors)
        else:
            yield from _read_ase_frames(file, errors)


_NAME_KEYS = ("csd_code", "refcode", "name", "identifier")


def row_name(row) -> str | None:
    """A CSD refcode or name stored with an ASE database row: its key-value pairs, then ``data`` and ``info``
    dictionaries (any letter case, e.g. ``NAME``)."""
    places = [getattr(row, "key_value_pairs", None) or {}]
    data = row.get("data") or {}
    info = row.get("info") or {}
    places += [d for d in (data, info, data.get("info") if isinstance(data, dict) else None) if isinstance(d, dict)]
    for place in places:
        lower = {str(k).lower(): v for k, v in place.items()}
        for key in _NAME_KEYS:
            value = lower.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def _read_ase_db(path: Path, errors):
    import ase.db

    try:
        rows = list(ase.db.connect(str(path)).select())
    except Exception as err:
        note_problem(errors, path, f"cannot be read as an ASE database ({describe_error(err)})")
        return
    if not rows:
        note_problem(errors, path, "the database holds no structures", "no_structure")
    for row in rows:
        name = row_name(row) or f"{path.stem}_{row.id}"
        try:
            atoms = row.toatoms()
        except Exception as err:  # a broken row must not end the iteration
            note_problem(errors, f"{path}:{row.id}", describe_error(err), file=path)
            continue
        bounds = bounds_problem(atoms)
        if bounds:
            note_problem(errors, f"{path}:{row.id}", bounds, "out_of_bounds", path)
            continue
        atoms.info.update(source=str(path), reader="ase")
        yield str(name), atoms


def _read_ase_frames(path: Path, errors):
    import ase.io

    fmt = "extxyz" if path.suffix.lower() in (".xyz", ".extxyz") else None
    try:
        frames = ase.io.read(str(path), index=":", format=fmt)
    except Exception as err:
        note_problem(errors, path, f"cannot be read as {fmt or 'a crystal file'} ({describe_error(err)})")
        return
    if not frames:
        note_problem(errors, path, "the file holds no structures", "no_structure")
    for i, atoms in enumerate(frames):
        name = atoms.info.get("NAME") or atoms.info.get("name") or (
            path.stem if len(frames) == 1 else f"{path.stem}_{i}")
        bounds = bounds_problem(atoms)
        if bounds:
            note_problem(errors, f"{path}:{i}" if len(frames) > 1 else path, bounds, "out_of_bounds", path)
            continue
        atoms.info.update(source=str(path), reader="ase")
        yield str(name), atoms
