"""Raw COD-Cluster17 format, rigid frames, export, and clear errors for bad input."""
import numpy as np
import pytest
import torch

from kflow.molecular import (Cluster, CODCluster17Dataset, InvalidCluster, export_cluster, read_cod_cluster17,
                             rigid_frames, write_cod_cluster17)
from kflow.molecular.geometry import fit_rigid_motion
from kflow.molecular.data.io import cod_cluster17_paths
from kflow.molecular.so3 import random_rotations

from testkit import make_cluster

F64 = torch.float64


def test_raw_format_round_trip(tmp_path):
    cluster = make_cluster()
    initial, final = write_cod_cluster17(cluster, tmp_path, "0001")
    assert initial == cod_cluster17_paths(tmp_path, "0001")[0] and final.name == "0001_cluster16.csv"
    assert final.read_text().splitlines()[0] == "mol_idx,atom_type,x,y,z"
    back = read_cod_cluster17(initial, final)
    assert back.name == "0001"
    assert torch.equal(back.atomic_numbers, cluster.atomic_numbers)
    assert torch.equal(back.molecule_index, cluster.molecule_index)
    assert (back.initial_positions - cluster.initial_positions).abs().max() < 1e-5
    assert (back.final_positions - cluster.final_positions).abs().max() < 1e-5


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["mol_idx,atom_type,x,y,z"] + lines) + "\n")


@pytest.mark.parametrize("bad_line,reason,needle", [
    ("0,C,1.0,2.0", "malformed", "line 3: expected 5 columns"),
    ("0,Xx,1.0,2.0,3.0", "unknown_element", "line 3: unknown element 'Xx'"),
    ("0,C,1.0,abc,3.0", "malformed", "line 3: non-numeric"),
    ("0,C,1.0,nan,3.0", "nan", "line 3: non-finite"),
])
def test_malformed_csv_lines_are_named(tmp_path, bad_line, reason, needle):
    cluster = make_cluster()
    initial, final = write_cod_cluster17(cluster, tmp_path, "7")
    lines = initial.read_text().splitlines()
    lines[2] = bad_line
    initial.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidCluster, match=needle) as err:
        read_cod_cluster17(initial, final)
    assert err.value.reason == reason and str(initial) in str(err.value)


def test_inconsistent_clusters_are_rejected(tmp_path):
    cluster = make_cluster()
    initial, final = write_cod_cluster17(cluster, tmp_path, "8")
    with pytest.raises(InvalidCluster, match="does not exist"):
        read_cod_cluster17(tmp_path / "nope.csv", final)
    _write(tmp_path / "short.csv", final.read_text().splitlines()[1:-1])
    with pytest.raises(InvalidCluster, match="atoms but") as err:
        read_cod_cluster17(tmp_path / "short.csv", final)
    assert err.value.reason == "atom_count_mismatch"
    sixteen = [ln for ln in final.read_text().splitlines()[1:] if not ln.startswith("16,")]
    _write(tmp_path / "a.csv", sixteen)
    with pytest.raises(InvalidCluster, match="16 molecules"):
        read_cod_cluster17(tmp_path / "a.csv", tmp_path / "a.csv")
    swapped = cluster.atomic_numbers.clone()
    swapped[[10, 11]] = swapped[[11, 10]]  # molecule 2 lists its atoms in another order
    odd = Cluster(swapped, cluster.molecule_index, cluster.initial_positions, cluster.final_positions, "odd")
    with pytest.raises(InvalidCluster, match="molecule 2 lists different elements") as err:
        read_cod_cluster17(*write_cod_cluster17(odd, tmp_path, "odd"))
    assert err.value.reason == "composition_mismatch"
    with pytest.raises(InvalidCluster, match="molecule 2"):
        odd.validate()
    moved = cluster.final_positions.clone()
    moved[12] += 1.0  # atom 12 is in molecule 2: not a rigid copy any more
    broken = Cluster(cluster.atomic_numbers, cluster.molecule_index, cluster.initial_positions, moved, "bent")
    i2, f2 = write_cod_cluster17(broken, tmp_path, "9")
    with pytest.raises(InvalidCluster, match="molecule 2") as err:
        read_cod_cluster17(i2, f2)
    assert err.value.reason == "not_rigid"


def test_frames_reproduce_atoms_and_follow_rigid_motions():
    cluster = make_cluster(3, atoms=7)
    pos, mol = cluster.final_positions.double(), cluster.molecule_index
    rot, trans, body = rigid_frames(pos, mol)
    assert torch.allclose(torch.det(rot), torch.ones(17, dtype=F64), atol=1e-10)
    rebuilt = trans[mol] + torch.einsum("nij,nj->ni", rot[mol], body)
    assert (rebuilt - pos).abs().max() < 1e-10
    # Move each molecule rigidly (atom order kept): same body coordinates, frames move with the molecule.
    q = random_rotations(17, F64, generator=torch.Generator().manual_seed(9))
    shift = torch.randn(17, 3, dtype=F64)
    moved = torch.einsum("nij,nj->ni", q[mol], pos - trans[mol]) + trans[mol] + shift[mol]
    rot2, trans2, body2 = rigid_frames(moved, mol)
    assert (body2 - body).abs().max() < 1e-8
    assert torch.allclose(rot2, q @ rot, atol=1e-8)
    _, _, residual = fit_rigid_motion(body, moved, mol)
    assert residual.max() < 1e-8


def test_export_for_viewers(tmp_path):
    import ase.io

    cluster = make_cluster()
    for name in ["c.xyz", "c.extxyz", "c.pdb"]:
        export_cluster(cluster, tmp_path / name, "final")
        atoms = ase.io.read(tmp_path / name)
        assert len(atoms) == cluster.num_atoms
        assert np.allclose(atoms.positions, cluster.final_positions.numpy(), atol=1e-3)
    atom_lines = [ln for ln in (tmp_path / "c.pdb").read_text().splitlines() if ln.startswith("HETATM")]
    chains = [ln[21] for ln in atom_lines]  # one chain and one residue per molecule, in molecule order
    assert chains == [chr(ord("A") + m) for m in cluster.molecule_index.tolist()]
    assert [int(ln[22:26]) for ln in atom_lines] == (cluster.molecule_index + 1).tolist()
    export_cluster(cluster, tmp_path / "p.extxyz", "predicted", cluster.initial_positions)
    assert ase.io.read(tmp_path / "p.extxyz").info["arrangement"] == "predicted"
    with pytest.raises(ValueError, match="positions of shape"):
        export_cluster(cluster, tmp_path / "q.xyz", "predicted")


def test_cod_dataset_reads_raw_folder_and_explains_missing_data(tmp_path):
    ids = []
    for i in range(12):
        write_cod_cluster17(make_cluster(i, atoms=4), tmp_path, f"{i:04d}")
        ids.append(f"{i:04d}")
    (tmp_path / "raw" / "subset_5k.txt").write_text("\n".join(ids[:10]) + "\n")
    ds = CODCluster17Dataset(tmp_path, subset="5k", num_workers=1, progress=False, download=False)
    assert len(ds) == 10 and ds[0].initial_positions.shape == (68, 3)
    train = CODCluster17Dataset(tmp_path, subset="5k", split="train", progress=False, download=False)
    assert 0 < len(train) < 10
    with pytest.raises(FileNotFoundError, match="FinalPositions"):
        CODCluster17Dataset(tmp_path / "empty", subset="10k", download=False)
