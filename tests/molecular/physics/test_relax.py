"""Rigid-body relaxation against RDKit's MMFF94 (kflow.molecular.physics.relax)."""
import numpy as np
import pytest
import torch

from kflow.molecular.geometry import pad_by_index, rigid_residuals
from kflow.molecular.physics.relax import ClusterForceField, RigidBodies, relax_cluster, rigid_objective
from kflow.molecular.so3 import random_rotations

pytest.importorskip("rdkit")


def _rdkit_molecule(smiles: str, seed: int = 7):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    return mol


def _molecule(smiles: str, seed: int = 7):
    """Atomic numbers [P] and an embedded, MMFF-free geometry [P, 3] (float64) of a molecule with explicit H."""
    mol = _rdkit_molecule(smiles, seed)
    z = torch.tensor([a.GetAtomicNum() for a in mol.GetAtoms()])
    x = torch.tensor(mol.GetConformer().GetPositions(), dtype=torch.float64)
    return z, x - x.mean(0)


def _cluster(smiles: str, centres, seed: int = 0):
    """Copies of one molecule, randomly rotated, at the given centres [M, 3]: (z [N], x [N, 3], molecule [N])."""
    z, body = _molecule(smiles)
    centres = torch.as_tensor(centres, dtype=torch.float64)
    m = centres.shape[0]
    rot = random_rotations(m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = centres[:, None] + torch.einsum("mij,pj->mpi", rot, body)
    return z.repeat(m), x.reshape(-1, 3), torch.arange(m).repeat_interleave(body.shape[0])


def _rigid_error(x0, x1, mol):
    d0, mask, _ = pad_by_index(x0, mol)
    d1, _, _ = pad_by_index(x1, mol)
    return rigid_residuals(d0, d1, mask).max().item()


def test_crowded_cluster_relaxes_rigidly_and_energy_decreases():
    centres = 3.2 * torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1]], dtype=torch.float64)
    z, x, mol = _cluster("CC(N)=O", centres)  # acetamide, 9 atoms
    res = relax_cluster(z, x, mol, contacts=True)
    assert res.force_field == "mmff94" and res.bonds == "DetermineBonds"
    assert res.positions.dtype == torch.float64 and res.positions.shape == x.shape
    assert _rigid_error(x, res.positions, mol) < 1e-6
    assert res.energy_after < res.energy_before
    assert res.contacts_after <= res.contacts_before
    assert res.steps > 0 and res.evaluations >= res.steps
    # the reported rigid motion reproduces the positions: x = c + t + R (x0 - c)
    x0 = x.view(6, -1, 3)
    c = x0.mean(1, keepdim=True)
    rebuilt = c + res.translations[:, None] + torch.einsum("mij,mpj->mpi", res.rotations, x0 - c)
    assert torch.allclose(rebuilt.reshape(-1, 3), res.positions, atol=1e-9)
    # free relaxation (no tether) moves further and ends lower still
    free = relax_cluster(z, x, mol, restraint=0.0)
    assert free.energy_after <= res.energy_after + 1e-6
    assert _rigid_error(x, free.positions, mol) < 1e-6


def test_overlapping_copies_are_pushed_apart():
    z, body = _molecule("c1ccccc1")
    x = torch.cat([body, body + torch.tensor([0.8, 0.3, 0.5], dtype=torch.float64)])  # two benzenes on top
    mol = torch.arange(2).repeat_interleave(body.shape[0])
    res = relax_cluster(torch.cat([z, z]), x, mol, contacts=True)
    assert res.contacts_before > 0 and res.contacts_after < res.contacts_before
    assert res.contacts_after == 0
    assert res.energy_after < res.energy_before
    sep = lambda p: (p[12:].mean(0) - p[:12].mean(0)).norm().item()  # noqa: E731
    assert sep(res.positions) > sep(x) + 1.0
    assert _rigid_error(x, res.positions, mol) < 1e-6


def test_interlocked_rings_are_pulled_apart():
    """Two benzenes linked like a chain: a local rigid relaxation cannot unlink them (it ends with ~40 close
    contacts); the separation round does."""
    from kflow.molecular.so3 import exp_map

    z, body = _molecule("c1ccccc1")
    _, _, vh = torch.linalg.svd(body[:6] - body[:6].mean(0))
    body = body @ vh.T  # ring in the xy plane
    link = body @ exp_map(torch.tensor([torch.pi / 2, 0, 0], dtype=torch.float64)).T + torch.tensor([1.2, 0, 0])
    x, mol, zz = torch.cat([body, link]), torch.arange(2).repeat_interleave(12), torch.cat([z, z])
    stuck = relax_cluster(zz, x, mol, separate_rounds=0, contacts=True)
    assert stuck.contacts_after > 20 and stuck.separation_rounds == 0
    res = relax_cluster(zz, x, mol, contacts=True)
    assert res.separation_rounds >= 1 and res.contacts_after == 0
    assert res.energy_after < stuck.energy_after < res.energy_before
    assert _rigid_error(x, res.positions, mol) < 1e-6
    x0 = x.view(2, -1, 3)
    c = x0.mean(1, keepdim=True)
    rebuilt = c + res.translations[:, None] + torch.einsum("mij,mpj->mpi", res.rotations, x0 - c)
    assert torch.allclose(rebuilt.reshape(-1, 3), res.positions, atol=1e-9)


def test_gradient_matches_finite_differences_of_the_rigid_parameters():
    z, x, mol = _cluster("CO", 3.0 * torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1.1, 0.2]], dtype=torch.float64))
    start = x.numpy().reshape(3, -1, 3)
    ff = ClusterForceField(z.numpy()[:6], start[0], 3)
    objective = rigid_objective(ff, RigidBodies(start), restraint=5.0)
    rng = np.random.default_rng(0)
    params = rng.normal(scale=0.3, size=18)  # away from 0, so the SO(3) Jacobian matters
    _, grad = objective(params)
    h = 1e-5
    fd = np.array([(objective(params + h * e)[0] - objective(params - h * e)[0]) / (2 * h) for e in np.eye(18)])
    assert np.abs(grad).max() > 1.0
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-5 * np.abs(fd).max())


def test_deterministic_and_independent_of_atom_order():
    z, x, mol = _cluster("CC(N)=O", 3.3 * torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float64))
    a = relax_cluster(z, x, mol)
    b = relax_cluster(z, x, mol)
    assert torch.equal(a.positions, b.positions) and a.energy_after == b.energy_after and a.steps == b.steps
    # molecules interleaved in the input (atom order within each molecule kept): same result, input order
    perm = torch.arange(x.shape[0]).view(4, -1).T.reshape(-1)  # atom 0 of every molecule, then atom 1, ...
    c = relax_cluster(z[perm], x[perm], mol[perm])
    assert torch.allclose(c.positions, a.positions[perm], atol=1e-10)


def test_intermolecular_energy_vanishes_for_distant_molecules():
    z, x, mol = _cluster("CC(N)=O", 60.0 * torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64))
    res = relax_cluster(z, x, mol, max_steps=5)
    assert abs(res.energy_before) < 0.05


def test_uff_fallback_when_mmff_has_no_parameters():
    z, x, mol = _cluster("CB(C)C", 4.0 * torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64))
    res = relax_cluster(z, x, mol)
    assert res.force_field == "uff" and "no parameters" in res.message
    assert res.energy_after <= res.energy_before
    assert _rigid_error(x, res.positions, mol) < 1e-6


def test_template_gives_the_bonds_perceived_from_geometry():
    """The bonds perceived from the geometry equal the molecule's own (RDKit template): same MMFF energies."""
    z, x, mol = _cluster("CC(N)=O", 3.3 * torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64))
    perceived = relax_cluster(z, x, mol, max_steps=20)
    given = relax_cluster(z, x, mol, max_steps=20, template=_rdkit_molecule("CC(N)=O"))
    assert perceived.bonds == "DetermineBonds" and given.bonds == "template"
    assert given.energy_before == pytest.approx(perceived.energy_before, abs=1e-8)
    assert torch.allclose(given.positions, perceived.positions, atol=1e-8)


def test_no_force_field_is_a_clear_error(monkeypatch):
    from rdkit.Chem import rdForceFieldHelpers

    z, x, mol = _cluster("CB(C)C", 4.0 * torch.eye(3, dtype=torch.float64))
    monkeypatch.setattr(rdForceFieldHelpers, "UFFHasAllMoleculeParams", lambda m: False)
    with pytest.raises(ValueError, match="cannot set up a force field.*MMFF94 has no parameters.*UFF"):
        relax_cluster(z, x, mol)


def test_clear_errors():
    z, x, mol = _cluster("CO", 3.0 * torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown force field"):
        relax_cluster(z, x, mol, force_field="amber")
    bad = z.clone()
    bad[7] = 9  # molecule 1 has an F where the others have an H
    with pytest.raises(ValueError, match="molecule 1 differs"):
        relax_cluster(bad, x, mol)
    with pytest.raises(ValueError, match="atom counts differ"):
        relax_cluster(z[:-1], x[:-1], mol[:-1])
    with pytest.raises(ValueError, match="expects"):
        relax_cluster(z, x[:, :2], mol)
