"""Space groups and candidates: spglib finds the group a candidate was generated in, copies are rigid (mirror
images where the group has improper operations), and a budget is a prefix of a larger one."""
import numpy as np
import pytest
import torch

from kflow.molecular.crystal.search import SearchSettings, SymmetricCrystals, allocate_budget, candidate_stream
from kflow.molecular.crystal.symmetry import FREQUENT_SPACE_GROUPS, space_group
from kflow.molecular.physics.lattice import LatticeEnergy


def test_frequent_groups_have_their_general_position():
    z = {g: space_group(g).z for g in FREQUENT_SPACE_GROUPS}
    assert z == {"P2_1/c": 4, "P-1": 2, "C2/c": 8, "P2_12_12_1": 4, "P2_1": 2, "Pbca": 8, "Pna2_1": 4, "Cc": 4}
    assert space_group("P21/c").hall == space_group("P2_1/c").hall == space_group(14).hall == 81
    with pytest.raises(ValueError, match="unknown space group"):
        space_group("P6_3/mmc-ish")


@pytest.mark.parametrize("symbol", FREQUENT_SPACE_GROUPS)
def test_candidates_have_the_symmetry_they_were_made_with(gasxon, gasxon_forcefield, symbol):
    import spglib

    group = space_group(symbol)
    energy = LatticeEnergy(gasxon_forcefield, cutoff=8.0, switch_width=1.0, electrostatics="cutoff",
                           vdw_switch="molecules")
    model = SymmetricCrystals(group, energy, torch.empty(0, 3, 3, dtype=torch.float64))
    x = candidate_stream(group, model, 3, 250.0, 1.5, seed=1)
    for crystal in model.crystals(x, "test", gasxon.atomic_numbers):
        atoms = crystal.to_ase()
        found = spglib.get_symmetry_dataset((atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers),
                                            symprec=1e-3)
        assert found.number == group.number
        dets = np.linalg.det(crystal.orientations)
        assert np.allclose(np.abs(dets), 1)
        improper = np.linalg.det(group.rotations) < 0
        assert np.allclose(dets < 0, improper)  # mirror images exactly where the operation is improper


def test_a_budget_is_a_prefix_of_a_larger_one(gasxon_forcefield):
    group = space_group("P2_1/c")
    energy = LatticeEnergy(gasxon_forcefield, electrostatics="cutoff", vdw_switch="molecules", cutoff=8.0,
                           switch_width=1.0)
    small = SymmetricCrystals(group, energy, torch.empty(0, 3, 3))
    large = SymmetricCrystals(group, energy, torch.empty(0, 3, 3))
    xs, xl = candidate_stream(group, small, 5, 250.0, 1.5, 7), candidate_stream(group, large, 300, 250.0, 1.5, 7)
    assert torch.equal(xs, xl[:5]) and torch.equal(small.reference, large.reference[:5])
    for budget in (100, 300):
        counts = allocate_budget(budget)
        assert sum(counts.values()) == budget and min(counts.values()) >= 4
        assert counts["P2_1/c"] > counts["P-1"] > counts["Cc"]
    assert all(allocate_budget(100)[g] <= allocate_budget(1000)[g] for g in FREQUENT_SPACE_GROUPS)


def test_settings_defaults_name_the_converged_energy():
    settings = SearchSettings()
    assert settings.fine["electrostatics"] == "ewald" and settings.fine["cutoff"] >= 12.0
