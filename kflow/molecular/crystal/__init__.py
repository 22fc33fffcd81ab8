"""Crystal structure prediction for one rigid molecule: space-group candidates, batched lattice-energy
minimisation (MMFF94, periodic, ``kflow.molecular.physics.lattice``), duplicates removed, ranked by energy."""
from kflow.molecular.crystal.search import (SearchSettings, allocate_budget, coarse_minima, refine_minima,
                                            remove_duplicates, search_crystals)
from kflow.molecular.crystal.structure import RigidCrystal
from kflow.molecular.crystal.symmetry import FREQUENT_SPACE_GROUPS, SpaceGroup, space_group

__all__ = ["SearchSettings", "allocate_budget", "coarse_minima", "refine_minima", "remove_duplicates",
           "search_crystals", "RigidCrystal", "FREQUENT_SPACE_GROUPS", "SpaceGroup", "space_group"]
