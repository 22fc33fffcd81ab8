"""Baselines for a start from the molecule alone: the evenly spread shell (``shell``), PyXtal random crystals
(``pyxtal``) and PackMol (``packmol``)."""
from kflow.molecular.baselines.packmol import packmol_predictions
from kflow.molecular.baselines.pyxtal import PYXTAL_SPACE_GROUPS, pyxtal_predictions
from kflow.molecular.baselines.shell import shell_predictions

__all__ = ["shell_predictions", "pyxtal_predictions", "packmol_predictions", "PYXTAL_SPACE_GROUPS"]
