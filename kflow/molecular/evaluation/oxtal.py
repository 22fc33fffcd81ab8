"""The field's packing metric: RMSD₁₅ and molecules matched of 15, from OXtalign (PyPI ``oxtalign``, Apache-2.0),
the OXtal team's open equivalent of the CSD's COMPACK (within 0.004 Å of COMPACK's RMSD₁₅ on 2,000 CSD pairs).

OXtalign overlays the central molecule and its 14 nearest neighbours of one structure onto the other by trimmed
ICP, calls a molecule matched when its heavy-atom RMSD to a counterpart is within ``tolerance`` (1 Å), and
reports how many of the 15 match and the RMSD over the matched ones (COMPACK's RMSD₁₅). It matches by geometry,
not by atom labels, so a molecule with internal symmetry scores right, and it refuses to match different
compounds. Clusters are compared as they are (no cell); crystals as periodic structures.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["PackingMatch", "packing_match", "cluster_packing_match", "TOLERANCE", "SHELL"]

TOLERANCE = 1.0  # Å, per-molecule heavy-atom RMSD under which a molecule counts as matched (OXtalign's default)
SHELL = 15  # the central molecule and its 14 nearest neighbours


class PackingMatch(tuple):
    """(n_matched [B] int, rmsd [B] float Å over the matched molecules; NaN when only the centre matched)."""

    __slots__ = ()

    def __new__(cls, n_matched, rmsd):
        return super().__new__(cls, (n_matched, rmsd))

    @property
    def n_matched(self) -> np.ndarray:
        return self[0]

    @property
    def rmsd(self) -> np.ndarray:
        return self[1]


def _structure(atomic_numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray | None = None):
    import oxtalign
    from ase.data import chemical_symbols

    symbols = [chemical_symbols[int(z)] for z in atomic_numbers]
    if cell is None:
        return oxtalign.from_arrays(symbols, positions, source="kflow cluster")
    return oxtalign.from_arrays(symbols, positions, cell=cell, fractional=False, source="kflow crystal")


def packing_match(reference, other, n: int = SHELL, tolerance: float = TOLERANCE) -> tuple[int, float]:
    """(molecules matched of ``n``, RMSD over them) between two structures: each an ``oxtalign`` structure, a
    CIF path, or (atomic_numbers [N], positions [N, 3] Å[, cell [3, 3]]). Raises ValueError for different
    compounds."""
    import oxtalign

    def as_structure(x):
        if isinstance(x, tuple):
            return _structure(*x)
        return x if not isinstance(x, str) else oxtalign.load(x)

    result = oxtalign.compare(as_structure(reference), as_structure(other), n=n, mol_rmsd_tol=tolerance)
    if result.status == "failed" and result.n_matched == 0:
        raise ValueError(f"OXtalign could not compare the structures: {result.message or 'different compounds'}")
    rmsd = float(result.rmsd_n) if result.n_matched > 1 else float("nan")
    return int(result.n_matched), rmsd


@torch.no_grad()
def cluster_packing_match(true_positions: torch.Tensor, pred_positions: torch.Tensor, atomic_numbers: torch.Tensor,
                          batch: torch.Tensor | None = None, n: int = SHELL,
                          tolerance: float = TOLERANCE) -> PackingMatch:
    """OXtalign between the true and predicted clusters of a batch: atoms [N, 3] (Å), atomic numbers [N], batch
    [N] (the cluster of each atom, sorted; None: one cluster). Molecules are found from the geometry, so atom
    order and molecule labels do not matter. A prediction whose molecules overlap so far that OXtalign no longer
    finds the compound in it (bonds perceived across molecules) matches 0. Returns ``PackingMatch`` of [B]
    arrays."""
    true_positions = torch.as_tensor(true_positions).double()
    pred_positions = torch.as_tensor(pred_positions).double()
    z = torch.as_tensor(atomic_numbers).long()
    if batch is None:
        batch = torch.zeros(len(z), dtype=torch.long)
    counts = torch.bincount(torch.as_tensor(batch).long()).tolist()
    matched, rmsd = [], []
    start = 0
    for count in counts:  # one OXtalign call per cluster: it is a CPU library with its own search
        part = slice(start, start + count)
        start += count
        try:
            k, r = packing_match((z[part].numpy(), true_positions[part].numpy()),
                                 (z[part].numpy(), pred_positions[part].numpy()), n=n, tolerance=tolerance)
        except ValueError:  # the prediction's molecules overlap so far that they no longer read as the compound
            k, r = 0, float("nan")
        matched.append(k)
        rmsd.append(r)
    return PackingMatch(np.array(matched), np.array(rmsd))
