"""Start clusters of an input: 17 copies of a lone molecule at crystal density (``lone_molecule_starts``, ``--mirror``
and ``mirror_note``) or a crystal's true cluster with the model's start preset (``crystal_starts``).
"""
from __future__ import annotations


import numpy as np
import torch

from kflow.molecular.assemble.pretrained import MIRROR_MODES
from kflow.molecular.data.cluster import NUM_MOLECULES, Cluster, InvalidCrystal

from kflow.molecular.assemble.inputs import AssemblyInput, InputError
from kflow.molecular.assemble.pretrained import MIRROR_MODES
from kflow.molecular.assemble.readers import rejection_detail
from kflow.molecular.data.molecules import estimate_volume_per_molecule


__all__ = ["mirror_note", "lone_molecule_starts", "crystal_starts", "FROM_MOLECULE_PRESETS"]


def mirrored_copies(mirror: str, m: int = NUM_MOLECULES) -> np.ndarray:
    """Which of the m copies are mirror images: none, or every second one after the central copy (8 of 17)."""
    if mirror not in MIRROR_MODES:
        raise ValueError(f"mirror must be one of {MIRROR_MODES}, got {mirror!r}")
    return (np.arange(m) % 2 == 1) if mirror == "half" else np.zeros(m, dtype=bool)


def reference_copies(inp: AssemblyInput, mirror: str) -> np.ndarray:
    """[M, P, 3] float64: the centred input geometry per copy, x -> −x for the mirrored ones."""
    centred = inp.positions - inp.positions.mean(0)
    copies = np.repeat(centred[None], NUM_MOLECULES, 0)
    copies[mirrored_copies(mirror), :, 0] *= -1
    return copies


def _isomeric_smiles(z: np.ndarray, pos: np.ndarray) -> str | None:
    """The isomeric SMILES RDKit perceives from a 3-D geometry (bond orders, else connectivity only; stereo from
    the coordinates), or None when it cannot."""
    from ase.data import chemical_symbols
    from rdkit import Chem, rdBase
    from rdkit.Chem import rdDetermineBonds

    block = f"{len(z)}\n\n" + "".join(f"{chemical_symbols[a]} {x:.6f} {y:.6f} {w:.6f}\n" for a, (x, y, w) in
                                      zip(z, pos))
    with rdBase.BlockLogs():
        for determine in (lambda m: rdDetermineBonds.DetermineBonds(m, charge=0),
                          rdDetermineBonds.DetermineConnectivity):
            try:
                mol = Chem.MolFromXYZBlock(block)
                determine(mol)
                Chem.AssignStereochemistryFrom3D(mol)
                return Chem.MolToSmiles(Chem.RemoveHs(mol, sanitize=False))
            except Exception:  # no consistent bond orders (charges, radicals): try connectivity alone
                continue
    return None


def mirror_note(atomic_numbers: np.ndarray, positions: np.ndarray) -> str:
    """One sentence on what ``mirror="half"`` makes of this molecule: RDKit perceives it from its geometry and
    from its mirror image (x → −x); different isomeric SMILES mean a chiral molecule, whose mirrored copies are its
    enantiomer (a racemic cluster, wrong for an enantiopure compound), equal ones an achiral molecule, whose
    mirrored copies are the same compound. Axial and planar chirality are not perceived."""
    z = np.asarray(atomic_numbers)
    pos = np.asarray(positions, dtype=np.float64)
    mirrored = int(mirrored_copies("half").sum())
    head = f"mirror half: {mirrored} of the {NUM_MOLECULES} copies are the mirror image (x -> -x) of the input"
    smiles, image = _isomeric_smiles(z, pos), _isomeric_smiles(z, pos * [-1.0, 1.0, 1.0])
    if smiles is None or image is None:
        return head + "; RDKit could not perceive the molecule, so whether they are its enantiomer is not known"
    if smiles != image:
        return (f"{head}; the molecule is chiral ({smiles}), so they are its enantiomer ({image}) and the cluster is "
                f"a racemate ({NUM_MOLECULES - mirrored}:{mirrored}); for an enantiopure compound use mirror none "
                "(--mirror none)")
    return f"{head}; the molecule is achiral ({smiles}), so they are the same compound in a mirrored conformer"


# Start presets that need only the molecule and a density: a lone molecule can be given the start its model knows.
FROM_MOLECULE_PRESETS = ("hard", "shell")


def lone_molecule_starts(inp: AssemblyInput, samples: int, seed: int = 0, mirror: str = "none",
                         volume_per_molecule: float | None = None, preset: str = "hard") -> list[Cluster]:
    """``samples`` start clusters of 17 copies of a lone molecule, drawn by a start ``preset`` that needs only the
    molecule and a density ("hard" or "shell", ``NOISE_PRESETS``), with seeds ``seed``·1000003 + k. There is no
    true cluster: ``final_positions`` repeat the start."""
    from kflow.molecular.data.starts import NOISE_PRESETS

    volume = volume_per_molecule or estimate_volume_per_molecule(inp.atomic_numbers, inp.positions)
    copies = torch.from_numpy(reference_copies(inp, mirror))  # [M, P, 3]
    m, p, _ = copies.shape
    z = torch.from_numpy(np.tile(inp.atomic_numbers, m))
    mol = torch.arange(m).repeat_interleave(p)
    out = []
    for k in range(samples):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
        start = NOISE_PRESETS[preset].apply(copies, gen, volume).reshape(-1, 3)
        start = start - start.mean(0)
        cluster = Cluster(z, mol, start, start, f"{inp.name}_sample{k}", inp.name)
        cluster.info.update(sample=k, start_seed=int(seed) * 1_000_003 + k)
        out.append(cluster.validate())
    return out


def crystal_starts(inp: AssemblyInput, samples: int, seed: int = 0, preset: str = "hard") -> list[Cluster]:
    """``samples`` clusters of a crystal input: the true 17-molecule cluster with starts drawn by ``preset``
    (``build_cluster`` draws 0..samples−1 with ``seed``)."""
    from kflow.molecular.data.clusters import build_cluster

    try:
        return [build_cluster(inp.atoms, seed=seed, name=inp.name, noise=preset, molecules=inp.molecules, draw=k)
                for k in range(samples)]
    except InvalidCrystal as err:
        raise InputError(inp.source, err.reason, rejection_detail(err)) from None
