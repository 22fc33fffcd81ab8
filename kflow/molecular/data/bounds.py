"""What a readable crystal must satisfy before any neighbour search (resource bounds), and how a reader
reports an input that gives no crystal (``ReadProblem``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


__all__ = ["ReadProblem", "cell_problem", "MIN_CELL_WIDTH", "MAX_CELL_LENGTH", "MIN_VOLUME_PER_ATOM",
           "MAX_CELL_ATOMS", "MAX_BONDED_PAIRS_PER_ATOM"]


# spans widths 3.5-24 A, 7.6-30 A^3 per atom, at most 200 atoms per cell and 42 A per edge (measured 2026-12).
MIN_CELL_WIDTH = 2.0  # A, distance between opposite faces of the cell
MAX_CELL_LENGTH = 1000.0  # A, longest cell edge
MIN_VOLUME_PER_ATOM = 3.0  # A^3 (diamond, the densest solid of light elements: 5.7)
MAX_CELL_ATOMS = 10_000  # atoms in the full cell, after symmetry expansion
# Bonded pairs (both directions) per atom of the cell, on average, when molecules are found: at most 2.4 in the 1241
# crystals of CSD-500, pyxtal's database and 591 benchmark CIFs (measured 2026-12); more means atoms piled together,
# a broken cell (checked while searching, before the pairs fill memory).
MAX_BONDED_PAIRS_PER_ATOM = 16


class ReadProblem(NamedTuple):
    """An input (a file, a CIF block or a database row) that gave no crystal: ``source`` names it, ``reason`` is a
    tag (``unreadable``, ``no_structure``, ``no_cell``, ``no_atoms``, ``missing_coordinates``) and ``file`` is
    the input file it belongs to."""

    source: str
    message: str
    reason: str = "unreadable"
    file: str = ""


class Unusable(Exception):
    """A CIF block that is readable but cannot give a crystal (a rejection with a reason, not a reader failure)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def cell_problem(cell, num_atoms: int) -> str | None:
    """Why a periodic cell (3x3 rows, Å) holding ``num_atoms`` atoms is outside kflow's resource bounds
    (``MIN_CELL_WIDTH``, ``MAX_CELL_LENGTH``, ``MIN_VOLUME_PER_ATOM``, ``MAX_CELL_ATOMS``), or None."""
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape != (3, 3) or not np.isfinite(cell).all():
        return "the cell is not a finite 3x3 matrix"
    volume = abs(float(np.linalg.det(cell)))
    faces = np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    width = volume / faces.max() if faces.max() > 0 else 0.0
    if width < MIN_CELL_WIDTH:
        return f"the cell is {width:.3g} Å thin (at least {MIN_CELL_WIDTH} Å between opposite faces)"
    if np.linalg.norm(cell, axis=1).max() > MAX_CELL_LENGTH:
        return f"a cell edge is {np.linalg.norm(cell, axis=1).max():.4g} Å long (at most {MAX_CELL_LENGTH:g} Å)"
    if num_atoms > MAX_CELL_ATOMS:
        return f"{num_atoms} atoms in the cell (at most {MAX_CELL_ATOMS})"
    if num_atoms and volume / num_atoms < MIN_VOLUME_PER_ATOM:
        return (f"{volume / num_atoms:.3g} Å³ per atom (at least {MIN_VOLUME_PER_ATOM} Å³: atoms this dense are "
                "a broken cell)")
    return None


def bounds_problem(atoms) -> str | None:
    """``cell_problem`` of a periodic ``Atoms`` (None for a structure without a 3-D cell)."""
    if not (np.all(atoms.pbc) and atoms.cell.rank == 3):
        return None
    return cell_problem(atoms.cell.array, len(atoms))


def note_problem(errors, source, message, reason="unreadable", file=None):
    problem = ReadProblem(str(source), message, reason, str(file if file is not None else source))
    if errors is None:
        raise ValueError(f"{problem.source}: {reason}: {message}")
    errors.append(problem)


def describe_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"
