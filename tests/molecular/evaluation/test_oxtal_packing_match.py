"""The field's packing metric (OXtalign): the truth and small jitter match 15/15 whatever the numbering, a molecule
with internal symmetry matches when its atoms are relabelled by that symmetry (the retired home-made similarity
read labels and scored such a prediction 1/15), random orientations match only the centre, another compound is
refused."""
import numpy as np
import pytest
import torch

from kflow.molecular.evaluation.oxtal import cluster_packing_match, packing_match
from kflow.molecular.so3 import random_rotations

F64 = torch.float64


def _cluster(body: torch.Tensor, seed: int = 0, spacing: float = 6.0) -> torch.Tensor:
    """17 copies of ``body`` [P, 3] on the central site of a 3x3x3 grid and its 16 nearest, two orientations."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, dtype=F64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = grid[torch.argsort(grid.norm(dim=-1), stable=True)][:17] * spacing
    rot = random_rotations(2, dtype=F64, generator=g)[torch.arange(17) % 2]
    return torch.einsum("mij,pj->mpi", rot, body - body.mean(0)) + sites[:, None]  # [17, P, 3]


def _benzene() -> tuple[np.ndarray, torch.Tensor]:
    angles = torch.arange(6, dtype=F64) * np.pi / 3
    ring = torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros(6, dtype=F64)], -1)
    return np.array([6] * 6 + [1] * 6), torch.cat([1.39 * ring, 2.47 * ring])


def _asymmetric() -> tuple[np.ndarray, torch.Tensor]:
    """Propanol-like: C-C-C-O with hydrogens; no internal symmetry."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("CCCO"))
    AllChem.EmbedMolecule(mol, randomSeed=3)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    return z, torch.as_tensor(mol.GetConformer().GetPositions(), dtype=F64)


def _score(z, true, pred):
    n = true.shape[0]
    return cluster_packing_match(true.reshape(-1, 3), pred.reshape(-1, 3), torch.as_tensor(np.tile(z, n)))


def test_truth_and_jitter_match_fifteen_in_any_numbering():
    z, body = _asymmetric()
    true = _cluster(body)
    g = torch.Generator().manual_seed(1)
    order = torch.cat([torch.tensor([0]), torch.randperm(16, generator=g) + 1])
    jitter = true + 0.05 * torch.randn(true.shape, generator=g, dtype=F64)
    for pred, worst in ((true[order], 1e-6), (jitter[order], 0.2)):
        match = _score(z, true, pred)
        assert match.n_matched[0] == 15 and match.rmsd[0] < worst


def test_symmetric_molecule_relabelled_by_its_symmetry_still_matches():
    """Benzene's atoms of every neighbour renumbered by a 60° turn of the ring: the same geometry."""
    z, body = _benzene()
    true = _cluster(body)
    turn = torch.tensor([1, 2, 3, 4, 5, 0, 7, 8, 9, 10, 11, 6])
    relabelled = torch.cat([true[:1], true[1:, turn]])
    match = _score(z, true, relabelled)
    assert match.n_matched[0] == 15 and match.rmsd[0] < 1e-6


def test_random_orientations_match_only_the_centre():
    z, body = _asymmetric()
    true = _cluster(body)
    g = torch.Generator().manual_seed(2)
    centres = true.mean(1, keepdim=True)
    turned = torch.einsum("mij,mpj->mpi", random_rotations(17, dtype=F64, generator=g), true - centres) + centres
    match = _score(z, true, turned)
    assert match.n_matched[0] <= 2 and (match.n_matched[0] > 1 or np.isnan(match.rmsd[0]))


def test_another_compound_is_refused():
    zb, benzene = _benzene()
    za, other = _asymmetric()
    a = (np.tile(zb, 17), _cluster(benzene).reshape(-1, 3).numpy())
    b = (np.tile(za, 17), _cluster(other).reshape(-1, 3).numpy())
    with pytest.raises(ValueError, match="could not compare|different"):
        packing_match(a, b)
