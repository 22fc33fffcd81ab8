"""The periodic MMFF94 lattice energy: RDKit's own pair energies, invariance to rigid motions and to the choice
of cell, symmetric rows = all rows, gradients against finite differences, and convergence with the cutoffs."""
import numpy as np
import pytest
import torch

from kflow.molecular.physics.lattice import LatticeEnergy
from kflow.molecular.so3 import exp_map


def _tensors(crystal):
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)[None]  # noqa: E731
    return t(crystal.cell), t(crystal.centroids), t(crystal.orientations)


def test_pair_energy_is_rdkits_intermolecular_mmff94(gasxon, gasxon_forcefield):
    """E(dimer) − 2 E(monomer) from RDKit's MMFF94 equals the 14-7 + buffered Coulomb sum over atom pairs."""
    from rdkit import Chem
    from rdkit.Chem import rdForceFieldHelpers as helpers

    from kflow.molecular.physics.mmff import COULOMB_BUFFER, COULOMB_CONSTANT
    from kflow.molecular.physics.relax import molecule_from_geometry

    mol, _ = molecule_from_geometry(gasxon.atomic_numbers, gasxon.body)
    cluster = gasxon.cluster(17)
    single = helpers.MMFFGetMoleculeForceField(mol, helpers.MMFFGetMoleculeProperties(mol))
    pair = Chem.CombineMols(mol, mol)
    both = helpers.MMFFGetMoleculeForceField(pair, helpers.MMFFGetMoleculeProperties(pair), nonBondedThresh=100.0,
                                             ignoreInterfragInteractions=False)
    energy = LatticeEnergy(gasxon_forcefield)
    for k in (3, 8, 15):  # neighbours at different distances
        a, b = cluster[0], cluster[k]
        reference = (both.CalcEnergy(np.concatenate([a, b]).ravel().tolist())
                     - single.CalcEnergy(a.ravel().tolist()) - single.CalcEnergy(b.ravel().tolist()))
        r = torch.as_tensor(np.linalg.norm(a[:, None] - b[None], axis=-1))
        ours = energy.vdw_pairs(r).sum() + COULOMB_CONSTANT * (energy.qq / (r + COULOMB_BUFFER)).sum()
        assert float(ours) == pytest.approx(reference, abs=1e-6)


def test_invariant_to_rotating_and_translating_the_crystal(gasxon, gasxon_forcefield):
    energy = LatticeEnergy(gasxon_forcefield)
    cell, centroids, orientations = _tensors(gasxon)
    before = energy(cell, centroids, orientations)
    rot = exp_map(torch.tensor([[0.3, -1.1, 0.7]], dtype=torch.float64))[0]
    shift = torch.tensor([1.7, -3.2, 40.0], dtype=torch.float64)
    after = energy(cell @ rot.T, centroids @ rot.T + shift, rot @ orientations)
    assert float(after) == pytest.approx(float(before), abs=1e-7)


def test_invariant_to_the_choice_of_cell(gasxon, gasxon_forcefield):
    """A 2x1x1 supercell (Z = 8) and a sheared basis (a, b, c + a) give the same energy per molecule; a molecule
    moved by a lattice vector changes nothing."""
    energy = LatticeEnergy(gasxon_forcefield)
    cell, centroids, orientations = _tensors(gasxon)
    reference = float(energy(cell, centroids, orientations))
    a = cell[:, 0]
    super_cell = torch.stack([2 * a, cell[:, 1], cell[:, 2]], 1)
    super_centroids = torch.cat([centroids, centroids + a[:, None]], 1)
    super_orientations = torch.cat([orientations, orientations], 1)
    assert float(energy(super_cell, super_centroids, super_orientations)) == pytest.approx(reference, abs=1e-7)
    sheared = torch.stack([cell[:, 0], cell[:, 1], cell[:, 2] + cell[:, 0]], 1)
    assert float(energy(sheared, centroids, orientations)) == pytest.approx(reference, abs=1e-7)
    moved = centroids.clone()
    moved[:, 2] += cell[:, 1] - 2 * cell[:, 2]
    assert float(energy(cell, moved, orientations)) == pytest.approx(reference, abs=1e-7)


def test_one_row_equals_all_rows_for_a_symmetric_crystal(gasxon, gasxon_forcefield):
    energy = LatticeEnergy(gasxon_forcefield)
    args = _tensors(gasxon)
    # the file's coordinates are symmetric to ~1e-5 Å, so the rows agree to ~1e-5 kcal/mol, not to rounding
    assert float(energy(*args, symmetric=True)) == pytest.approx(float(energy(*args)), abs=1e-4)


@pytest.mark.parametrize("settings", [{}, {"electrostatics": "cutoff", "vdw_switch": "molecules", "cutoff": 9.0}])
def test_gradients_match_finite_differences(gasxon, gasxon_forcefield, settings):
    """d E / d (cell, centroids, rotation of one molecule) by autograd against central differences (float64)."""
    energy = LatticeEnergy(gasxon_forcefield, **settings)
    cell, centroids, orientations = _tensors(gasxon)
    cell = cell * 1.03  # off the (odd) experimental geometry, where every term is at work
    omega = torch.zeros(1, 3, dtype=torch.float64)

    def f(cell, centroids, omega):
        rotated = torch.cat([exp_map(omega)[:, None] @ orientations[:, :1], orientations[:, 1:]], 1)
        return energy(cell, centroids, rotated)

    inputs = [cell.clone().requires_grad_(), centroids.clone().requires_grad_(), omega.clone().requires_grad_()]
    grads = torch.autograd.grad(f(*inputs), inputs)
    rng = np.random.default_rng(0)
    h = 1e-5
    for which, grad in enumerate(grads):
        for _ in range(3):
            index = tuple(int(rng.integers(n)) for n in grad.shape)
            plus = [t.detach().clone() for t in inputs]
            minus = [t.detach().clone() for t in inputs]
            plus[which][index] += h
            minus[which][index] -= h
            numeric = (float(f(*plus)) - float(f(*minus))) / (2 * h)
            assert float(grad[index]) == pytest.approx(numeric, rel=1e-4, abs=1e-4)


def test_cutoff_convergence(gasxon, gasxon_forcefield):
    """The ranking energy (12 Å, dispersion tail, Ewald) is within 0.1 kcal/mol of a 24 Å sum; without the tail
    correction it is not, and Ewald's split (α) does not matter."""
    args = _tensors(gasxon)
    far = float(LatticeEnergy(gasxon_forcefield, cutoff=24.0)(*args, symmetric=True))
    near = float(LatticeEnergy(gasxon_forcefield, cutoff=12.0)(*args, symmetric=True))
    bare = float(LatticeEnergy(gasxon_forcefield, cutoff=12.0, tail=False)(*args, symmetric=True))
    assert abs(near - far) < 0.1
    assert abs(bare - far) > 0.2
    for ewald in (7.0, 11.0):
        other = float(LatticeEnergy(gasxon_forcefield, cutoff=12.0, ewald_cutoff=ewald)(*args, symmetric=True))
        assert other == pytest.approx(near, abs=1e-3)


def test_bad_settings_are_refused(gasxon_forcefield):
    with pytest.raises(ValueError, match="electrostatics"):
        LatticeEnergy(gasxon_forcefield, electrostatics="reaction-field")
    with pytest.raises(ValueError, match="switch_width"):
        LatticeEnergy(gasxon_forcefield, cutoff=2.0, switch_width=3.0)
