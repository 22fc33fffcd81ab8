"""GASXON (data/examples/GASXON.cif, a CSD-500 crystal: P2₁/c, Z = 4, 23 atoms) as a rigid crystal and its MMFF94
parameters, shared by the lattice-energy and crystal-search tests."""
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "data" / "examples" / "GASXON.cif"


@pytest.fixture(scope="session")
def gasxon():
    from kflow.molecular.crystal.structure import RigidCrystal
    from kflow.molecular.data.crystals import read_crystals
    from kflow.molecular.data.molecules import find_molecules

    name, atoms = next(iter(read_crystals(EXAMPLE)))
    return RigidCrystal.from_molecules(name, find_molecules(atoms))


@pytest.fixture(scope="session")
def gasxon_forcefield(gasxon):
    from kflow.molecular.physics.mmff import MoleculeForceField

    return MoleculeForceField.from_geometry(gasxon.atomic_numbers, gasxon.body)
