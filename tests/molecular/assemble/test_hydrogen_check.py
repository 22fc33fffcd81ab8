"""A molecule known by its geometry only (XYZ, ASE Atoms, a crystal without H positions) whose heavy atoms lack the
hydrogens their valence needs is refused in one line that says how to fix it (it was once packed as garbage:
+20,737 kcal/mol, ranked first); complete molecules, zwitterions, nitro compounds and the CSD-500 molecules pass;
a charged pymatgen Molecule is refused the same way."""
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest

from kflow.cli import main
from kflow.molecular import read_crystals
from kflow.molecular.assemble.api import assemble
from kflow.molecular.assemble.hydrogens import missing_hydrogens
from kflow.molecular.assemble.inputs import InputError
from kflow.molecular.assemble.readers import read_assembly_input
from testkit import CIF, SDF, one_error_line


def _embedded(smiles: str) -> ase.Atoms:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=1)
    AllChem.MMFFOptimizeMolecule(mol)
    return ase.Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()], positions=mol.GetConformer().GetPositions())


def _heavy(atoms: ase.Atoms) -> ase.Atoms:
    return atoms[[i for i, z in enumerate(atoms.numbers) if z > 1]]


def test_an_xyz_file_without_hydrogens_is_refused_in_one_line(tiny_model, tmp_path, capsys):
    path = tmp_path / "paracetamol_heavy_atoms.xyz"
    ase.io.write(path, _heavy(_embedded("CC(=O)Nc1ccc(O)cc1")))
    out = tmp_path / "x"
    assert main(["assemble", str(path), "--out", str(out), "--model", tiny_model, "--no-progress"]) == 1
    line = one_error_line(capsys)
    assert "missing_hydrogens" in line and "C8NO2 (0 H)" in line and "SMILES" in line
    assert not out.exists()


def test_an_ase_molecule_without_hydrogens_is_refused_and_a_complete_one_is_read(tiny_model):
    full = _embedded("CC(=O)Nc1ccc(O)cc1")
    assert read_assembly_input(full).formula == "C8H9NO2"
    with pytest.raises(InputError, match="missing_hydrogens") as err:
        assemble(_heavy(full), model=tiny_model, samples=1)
    assert "\n" not in str(err.value) and "does not guess hydrogen positions" in str(err.value)


def test_partly_missing_hydrogens_and_hydrogen_less_benzene_are_seen():
    phenol = _embedded("Oc1ccccc1")
    without_oh = phenol[[i for i in range(len(phenol)) if not (phenol.numbers[i] == 1 and min(
        np.linalg.norm(phenol.positions[i] - phenol.positions[j]) for j in range(len(phenol))
        if phenol.numbers[j] == 8) < 1.1)]]
    assert "O0 has one single bond" in missing_hydrogens(without_oh.numbers, without_oh.positions)
    benzene = _heavy(_embedded("c1ccccc1"))  # RDKit alone would bond it as a ring of triple bonds
    assert "2 neighbours at 1" in missing_hydrogens(benzene.numbers, benzene.positions)


@pytest.mark.parametrize("smiles", ["CC(=O)Nc1ccc(O)cc1", "N#CC(C#N)=C(C#N)C#N", "ClC(Cl)(Cl)Cl", "O=C1C=CC(=O)C=C1",
                                    "CS(=O)(=O)C", "Cc1c(cc(cc1[N+](=O)[O-])[N+](=O)[O-])C(=O)O"])
def test_complete_molecules_pass(smiles):
    atoms = _embedded(smiles)
    assert missing_hydrogens(atoms.numbers, atoms.positions) is None


def _without_methyl_hydrogens(crystal: ase.Atoms) -> ase.Atoms:
    """The crystal less the hydrogens of its methyl groups (a structure whose H positions were only partly found)."""
    from ase.geometry import get_distances

    _, d = get_distances(crystal.positions, cell=crystal.cell, pbc=True)
    hydrogen = crystal.numbers == 1
    bonded_h = (d < 1.2) & hydrogen[None, :] & ~np.eye(len(crystal), dtype=bool)
    methyl = (crystal.numbers == 6) & (bonded_h.sum(1) == 3)
    drop = hydrogen & (bonded_h[methyl].any(0))
    assert drop.sum() > 0
    return crystal[[i for i in range(len(crystal)) if not drop[i]]]


def test_a_crystal_without_hydrogen_positions_is_refused(tiny_model, tmp_path, capsys):
    _, crystal = next(iter(read_crystals(CIF)))
    with pytest.raises(InputError, match="missing_hydrogens: the crystal's molecule C11H5O4 .*hydrogen positions"):
        read_assembly_input(_without_methyl_hydrogens(crystal))
    for name, bare in (("methyl_h_missing.cif", _without_methyl_hydrogens(crystal)), ("no_h.cif", _heavy(crystal))):
        path = tmp_path / name
        ase.io.write(path, bare)
        assert main(["assemble", str(path), "--out", str(tmp_path / "x"), "--model", tiny_model,
                     "--no-progress"]) == 1
        line = one_error_line(capsys)
        assert "missing_hydrogens" in line or "not_organic" in line  # no H at all: refused when molecules are found
        assert not (tmp_path / "x").exists()
    assert read_assembly_input(crystal).kind == "crystal"  # with its hydrogens: read as before


def test_a_charged_pymatgen_molecule_is_refused():
    from pymatgen.core import Molecule

    atoms = _embedded("CC(=O)Nc1ccc(O)cc1")
    molecule = Molecule(atoms.get_chemical_symbols(), atoms.positions, charge=1)
    with pytest.raises(InputError, match=r"charged: the Molecule has charge \+1"):
        read_assembly_input(molecule)
    assert read_assembly_input(Molecule(atoms.get_chemical_symbols(), atoms.positions)).formula == "C8H9NO2"
