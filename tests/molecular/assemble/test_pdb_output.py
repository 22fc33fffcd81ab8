"""PDB output: CONECT records for the covalent bonds within each molecule, never across molecules."""
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem

from kflow.molecular import Cluster
from kflow.molecular.data.io import cluster_pdb_text, intramolecular_bonds
from kflow.molecular.so3 import random_rotations

SDF = Path(__file__).resolve().parents[3] / "data" / "examples" / "GASXON.sdf"


def crowded_cluster(spacing=1.5):
    """17 rotated copies of GASXON whose centres are only ``spacing`` Å apart: atoms of different molecules overlap,
    so any bond guess from distances alone would join the molecules."""
    mol = Chem.MolFromMolFile(str(SDF), removeHs=False)
    body = torch.tensor(mol.GetConformer().GetPositions(), dtype=torch.float64)
    body -= body.mean(0)
    rot = random_rotations(17, torch.float64, generator=torch.Generator().manual_seed(0))
    sites = torch.arange(17, dtype=torch.float64)[:, None] * torch.tensor([spacing, 0.0, 0.0])
    pos = (sites[:, None] + torch.einsum("mij,pj->mpi", rot, body)).reshape(-1, 3)
    z = torch.tensor([a.GetAtomicNum() for a in mol.GetAtoms()]).repeat(17)
    index = torch.arange(17).repeat_interleave(mol.GetNumAtoms())
    return mol, Cluster(z, index, pos, pos, "crowded")


def viewer_parse(text):
    """What a viewer reads: each serial's residue (chain, number) and the bonds of the CONECT records."""
    residue = {int(ln[6:11]): (ln[21], int(ln[22:26])) for ln in text.splitlines() if ln.startswith("HETATM")}
    bonds = set()
    for ln in text.splitlines():
        if ln.startswith("CONECT"):
            fields = [int(ln[k:k + 5]) for k in range(6, len(ln.rstrip()), 5)]
            bonds |= {tuple(sorted((fields[0], other))) for other in fields[1:]}
    return residue, bonds


def test_conect_records_stay_within_molecules_and_hold_every_bond():
    mol, cluster = crowded_cluster()
    residue, bonds = viewer_parse(cluster_pdb_text(cluster, cluster.final_positions, "crowded"))
    assert bonds and all(residue[i] == residue[j] for i, j in bonds)
    n = mol.GetNumAtoms()
    for m in range(17):  # every bond of the SDF (heavy atoms and hydrogens), in every copy; 1-based serials
        expected = {tuple(sorted((m * n + b.GetBeginAtomIdx() + 1, m * n + b.GetEndAtomIdx() + 1)))
                    for b in mol.GetBonds()}
        assert expected <= bonds
    assert len(bonds) == 17 * mol.GetNumBonds()  # and nothing else


def test_rdkit_reads_the_conect_bonds_as_seventeen_molecules():
    mol, cluster = crowded_cluster()
    pdb = Chem.MolFromPDBBlock(cluster_pdb_text(cluster, cluster.final_positions), sanitize=False, removeHs=False,
                               proximityBonding=False)
    assert pdb.GetNumBonds() == 17 * mol.GetNumBonds()
    frags = Chem.GetMolFrags(pdb)
    assert len(frags) == 17 and all(len(f) == mol.GetNumAtoms() for f in frags)


def test_conect_lines_hold_at_most_four_partners():
    # A carbon with 5 close neighbours in one molecule: its partners must continue on a second CONECT line.
    pos = torch.tensor([[0.0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]], dtype=torch.float64)
    z = torch.tensor([6, 1, 1, 1, 1, 1])
    cluster = Cluster(z, torch.zeros(6, dtype=torch.long), pos, pos, "star")
    lines = [ln for ln in cluster_pdb_text(cluster, pos).splitlines() if ln.startswith("CONECT")]
    assert all(len(ln.rstrip()) <= 6 + 5 * 5 for ln in lines)
    assert sum(ln[6:11] == "    1" for ln in lines) == 2
    assert intramolecular_bonds(z, cluster.molecule_index, pos).tolist() == [[0, 1], [0, 2], [0, 3], [0, 4], [0, 5]]


def test_bonds_are_symmetric_pairs_of_one_molecule():
    _, cluster = crowded_cluster()
    bonds = intramolecular_bonds(cluster.atomic_numbers, cluster.molecule_index, cluster.final_positions)
    mol = cluster.molecule_index.numpy()
    assert (bonds[:, 0] < bonds[:, 1]).all() and (mol[bonds[:, 0]] == mol[bonds[:, 1]]).all()
    assert len(np.unique(bonds, axis=0)) == len(bonds)
