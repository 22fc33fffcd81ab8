"""Space groups and unit cells for crystals of one independent molecule (Z′ = 1).

A space group G acts on fractional coordinates by its general-position operations (W_k, w_k) (spglib's tables,
standard setting: b-unique monoclinic, cell choice 1). A molecule with centroid f (fractional) and orientation Q
has Z = |G| copies, copy k at centroid W_k f + w_k with orientation M_k Q, M_k = Lᵀ W_k L⁻ᵀ the operation in
Cartesian coordinates (L: rows are the lattice vectors; det W_k = −1 makes the mirror image). Cells are
parametrised by the free lengths and angles of the group's crystal system (docs/MATH.md §9).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["SpaceGroup", "space_group", "FREQUENT_SPACE_GROUPS", "CSD_SHARE", "cell_matrix", "cell_parameters",
           "CELL_FREE_PARAMETERS", "MAX_COS"]

# The eight most frequent space groups of organic crystals, with their approximate share of the CSD's organic
# structures (Cambridge Structural Database statistics; these eight hold about 85 %). Used to split a budget.
CSD_SHARE = {"P2_1/c": 0.346, "P-1": 0.255, "C2/c": 0.083, "P2_12_12_1": 0.074, "P2_1": 0.050, "Pbca": 0.033,
             "Pna2_1": 0.013, "Cc": 0.009}
FREQUENT_SPACE_GROUPS = tuple(CSD_SHARE)
_NUMBERS = {"P-1": 2, "P2_1": 4, "Cc": 9, "P2_1/c": 14, "C2/c": 15, "P2_12_12_1": 19, "Pna2_1": 33, "Pbca": 61}
# Which lattice parameters (a, b, c, α, β, γ) are free in each crystal system (the rest: 90°).
CELL_FREE_PARAMETERS = {"triclinic": (0, 1, 2, 3, 4, 5), "monoclinic": (0, 1, 2, 4), "orthorhombic": (0, 1, 2)}
MAX_COS = 0.6  # |cos| of a free cell angle stays below this (53°-127°): a triclinic cell cannot fold flat


@dataclass(frozen=True)
class SpaceGroup:
    """symbol (spglib's short Hermann-Mauguin, e.g. "P2_1/c"), number, hall (spglib's Hall number), system,
    rotations [Z, 3, 3] int and translations [Z, 3] (fractional) of the general position."""

    symbol: str
    number: int
    hall: int
    system: str
    rotations: np.ndarray
    translations: np.ndarray

    @property
    def z(self) -> int:
        return len(self.rotations)

    @property
    def name(self) -> str:
        """Plain-text symbol (P21/c): for file names and CIFs."""
        return self.symbol.replace("_", "")

    @property
    def operations_xyz(self) -> list[str]:
        """The operations as CIF xyz triplets ("-x,y+1/2,-z+1/2")."""
        out = []
        for rot, shift in zip(self.rotations, self.translations):
            terms = []
            for row, t in zip(rot, shift):
                text = "".join(f"{'+' if c > 0 else '-'}{v}" for c, v in zip(row, "xyz") if c)
                frac = round(float(t) * 12) % 12
                if frac:
                    from fractions import Fraction
                    text += f"+{Fraction(frac, 12)}"
                terms.append(text.lstrip("+"))
            out.append(",".join(terms))
        return out


def _system(number: int) -> str:
    if number <= 2:
        return "triclinic"
    if number <= 15:
        return "monoclinic"
    if number <= 74:
        return "orthorhombic"
    raise ValueError(f"space group {number}: only triclinic, monoclinic and orthorhombic groups are supported")


@lru_cache(maxsize=None)
def space_group(symbol: str | int) -> SpaceGroup:
    """The standard setting of a space group by symbol (``"P2_1/c"``, ``"P21/c"``) or number (1-74)."""
    import warnings

    import spglib

    if isinstance(symbol, str):
        key = symbol.replace(" ", "")
        plain = {k.replace("_", ""): v for k, v in _NUMBERS.items()}
        number = _NUMBERS.get(key) or plain.get(key.replace("_", ""))
        if number is None:
            raise ValueError(f"unknown space group {symbol!r}; known by name: {', '.join(_NUMBERS)} (or give the "
                             f"number, 1-74)")
    else:
        number = int(symbol)
    _system(number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # spglib 2.x warns about its own error handling
        halls = [(hall, spglib.get_spacegroup_type(hall)) for hall in range(1, 531)]
    for hall, kind in halls:  # spglib lists the standard setting of each group first
        if kind.number == number:
            ops = spglib.get_symmetry_from_database(hall)
            return SpaceGroup(kind.international_short, number, hall, _system(number),
                              np.asarray(ops["rotations"], dtype=np.int64),
                              np.asarray(ops["translations"], dtype=np.float64) % 1.0)
    raise ValueError(f"space group {number} not found in spglib's tables")


def cell_matrix(lengths: torch.Tensor, cosines: torch.Tensor) -> torch.Tensor:
    """Lattice vectors as rows [..., 3, 3] from lengths (a, b, c) [..., 3] and cosines (cos α, cos β, cos γ)
    [..., 3], in the standard orientation: a along x, b in the xy plane."""
    a, b, c = lengths.unbind(-1)
    ca, cb, cg = cosines.unbind(-1)
    sg = (1 - cg * cg).clamp_min(1e-12).sqrt()
    cy = (ca - cb * cg) / sg
    cz = (1 - cb * cb - cy * cy).clamp_min(1e-12).sqrt()
    zero = torch.zeros_like(a)
    return torch.stack([torch.stack([a, zero, zero], -1), torch.stack([b * cg, b * sg, zero], -1),
                        torch.stack([c * cb, c * cy, c * cz], -1)], -2)


def cell_parameters(cell: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """(a, b, c, α, β, γ) in Å and degrees of rows-as-vectors ``cell`` [3, 3]."""
    a, b, c = (float(np.linalg.norm(v)) for v in cell)

    def angle(u, v):
        return float(np.degrees(np.arccos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1))))

    return a, b, c, angle(cell[1], cell[2]), angle(cell[0], cell[2]), angle(cell[0], cell[1])
