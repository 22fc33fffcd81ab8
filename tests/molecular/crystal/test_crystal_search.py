"""The search end to end on a tiny budget, duplicates, CIF files the field's metric reads, the landscape relax."""
from pathlib import Path

import ase.io
import numpy as np
import pytest

from kflow.molecular.crystal.search import SearchSettings, remove_duplicates, search_crystals


def test_remove_duplicates_keeps_one_of_each_packing():
    energy = np.array([-20.0, -19.8, -25.0, -19.9, np.inf])
    density = np.array([1.30, 1.301, 1.40, 1.10, 1.3])
    fingerprint = np.array([[4.0, 5.0], [4.05, 5.1], [3.9, 5.0], [4.0, 5.0], [4.0, 5.0]])
    # 0 and 1: one packing (close energy, density, neighbours); 3: same neighbours but another density; 4: failed
    assert remove_duplicates(energy, density, fingerprint).tolist() == [2, 0, 3]


def test_cif_round_trip_is_the_same_crystal_for_oxtalign(gasxon, tmp_path):
    import oxtalign

    from kflow.molecular.data.crystals import read_crystals

    path = tmp_path / "gasxon.cif"
    gasxon.write_cif(path)
    truth = Path(__file__).resolve().parents[3] / "data" / "examples" / "GASXON.cif"
    result = oxtalign.compare(str(path), str(truth), n=15)
    assert result.n_matched == 15 and result.rmsd_n < 1e-3
    _, atoms = next(iter(read_crystals(path)))
    assert len(atoms) == gasxon.z * len(gasxon.atomic_numbers)  # the space group's operations rebuild the cell
    assert np.allclose(atoms.cell.cellpar(), ase.io.read(truth).cell.cellpar(), atol=1e-4)


def test_tiny_search_is_ranked_unique_and_reproducible(gasxon, gasxon_forcefield, one_thread):
    settings = SearchSettings(candidates=6, space_groups=("P2_1/c", "P-1"), compaction_steps=20, relax_steps=40,
                              refine=4, refine_steps=10, keep=3)
    first = search_crystals(gasxon_forcefield, 240.0, settings, "GASXON")
    again = search_crystals(gasxon_forcefield, 240.0, settings, "GASXON")
    energies = [c.info["energy"] for c in first["crystals"]]
    assert 1 <= len(energies) <= 3 and energies == sorted(energies)
    assert [c.info["rank"] for c in first["crystals"]] == list(range(1, len(energies) + 1))
    assert energies == [c.info["energy"] for c in again["crystals"]]
    for crystal in first["crystals"]:
        assert crystal.space_group in ("P2_1/c", "P-1") and 0.5 < crystal.density < 2.5
        assert np.isfinite(crystal.info["energy"]) and crystal.info["energy"] < 0  # molecules attract once packed


def test_relaxing_the_experimental_crystal_lowers_its_energy(gasxon, gasxon_forcefield, one_thread):
    from kflow.molecular.crystal.relax import crystal_energy, relax_crystal

    settings = {"cutoff": 9.0, "switch_width": 1.0, "electrostatics": "cutoff", "vdw_switch": "molecules"}
    relaxed = relax_crystal(gasxon_forcefield, gasxon, steps=30, **settings)
    assert relaxed.info["energy"] < relaxed.info["energy_before"] - 1.0
    assert relaxed.info["energy_before"] == pytest.approx(crystal_energy(gasxon_forcefield, gasxon, **settings))
    assert relaxed.space_group is None and relaxed.z == gasxon.z
