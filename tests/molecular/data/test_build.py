"""Crystal-to-cluster builder on real crystals (pyxtal's embedded CSD set), LMDB stores and splits."""
import ase
import numpy as np
import pytest
import torch

from kflow.molecular import (InvalidCrystal, RejectionSummary, build_cluster, build_clusters, find_molecules,
                             read_crystals)
from kflow.molecular.data.datasets import ClusterDataset, split_indices
from kflow.molecular.data.sources import cached_store, pyxtal_crystal_sources
from kflow.molecular.data.store import ClusterStore, write_cluster_store
from kflow.utils.store import RecordStoreError
from kflow.molecular.data.io import check_rigid_consistency


@pytest.fixture(scope="module")
def crystals():
    return dict(list(read_crystals(pyxtal_crystal_sources()[0]))[:40])


def test_builder_gives_17_whole_identical_molecules(crystals):
    summary = RejectionSummary()
    clusters = list(build_clusters(crystals.items(), draws_per_crystal=2, summary=summary))
    assert summary.kept >= 20 and len(clusters) == 2 * summary.kept
    for cluster in clusters[:12]:
        assert cluster.num_molecules == 17
        z = cluster.atomic_numbers.reshape(17, -1)
        assert (z == z[0]).all()  # same molecule, same canonical atom order
        final = cluster.final_positions.double()
        d = torch.cdist(final, final)
        inter = cluster.molecule_index[:, None] != cluster.molecule_index[None]
        assert d[inter].min() > 1.0  # no overlapping atoms between molecules
        # whole molecules: every atom has a bonded partner within its own molecule
        intra = ~inter & ~torch.eye(len(final), dtype=torch.bool)
        assert (torch.where(intra, d, torch.inf).min(1).values < 1.8).all()
        assert check_rigid_consistency(cluster).max() < 1e-3
        assert abs(cluster.initial_positions.mean(0)).max() < 1e-3  # centred on the initial centroid
    # draws of one crystal share the crystal cluster and differ only in the noise
    a, b = clusters[0], clusters[1]
    assert a.crystal == b.crystal and torch.allclose(a.final_positions - a.final_positions.mean(0),
                                                     b.final_positions - b.final_positions.mean(0), atol=1e-4)
    assert not torch.allclose(a.initial_positions, b.initial_positions)


def test_builder_is_seeded(crystals):
    name, atoms = next(iter(crystals.items()))
    a = build_cluster(atoms, name=name, seed=3)
    b = build_cluster(atoms, name=name, seed=3)
    c = build_cluster(atoms, name=name, seed=4)
    assert torch.equal(a.initial_positions, b.initial_positions)
    assert not torch.equal(a.initial_positions, c.initial_positions)


def test_rejections_carry_reasons(crystals):
    molecule = ase.Atoms("CH4", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63],
                                           [0.63, -0.63, -0.63]])
    with pytest.raises(InvalidCrystal) as err:
        build_cluster(molecule)
    assert err.value.reason == "no_lattice"
    salt = ase.Atoms("NaCl", positions=[[0, 0, 0], [2.8, 0, 0]], cell=[5.6, 5.6, 5.6], pbc=True)
    with pytest.raises(InvalidCrystal) as err:
        build_cluster(salt)
    assert err.value.reason == "not_organic"
    chain = ase.Atoms("CH2", positions=[[0, 0, 0], [0, 1.0, 0], [0, -1.0, 0.3]], cell=[1.5, 6, 6], pbc=True)
    with pytest.raises(InvalidCrystal) as err:
        find_molecules(chain)
    assert err.value.reason == "polymeric"
    name, atoms = next(iter(crystals.items()))
    broken = atoms.copy()
    broken.positions[3, 1] = np.nan
    with pytest.raises(InvalidCrystal, match="atom 3") as err:
        build_cluster(broken)
    assert err.value.reason == "nan"
    dummy = atoms.copy()
    dummy.numbers[2] = 0
    with pytest.raises(InvalidCrystal, match="atom 2") as err:
        build_cluster(dummy)
    assert err.value.reason == "unknown_element"
    # planar molecules are accepted by default (issue 14) and rejected as "flat" only when asked to
    flat = []
    for n, a in crystals.items():
        try:
            build_cluster(a, drop_flat=True)
        except InvalidCrystal as e:
            if e.reason == "flat":
                flat.append((a, str(e)))
                break
    assert flat and "planar" in flat[0][1]
    assert build_cluster(flat[0][0], drop_flat=False).num_molecules == 17  # kept when asked to
    assert build_cluster(flat[0][0]).num_molecules == 17  # and by default
    # a linear molecule (acetylene) has no defined orientation about its axis: a clear reason, whatever drop_flat
    acetylene = ase.Atoms("HCCH", positions=[[-1.66, 0, 0], [-0.6, 0, 0], [0.6, 0, 0], [1.66, 0, 0]],
                          cell=[6.0, 5.0, 5.5], pbc=True)
    acetylene.positions += 2.5
    for drop in (False, True):
        with pytest.raises(InvalidCrystal, match="linear") as err:
            build_cluster(acetylene, drop_flat=drop)
        assert err.value.reason == "linear"
    doubled = atoms + atoms
    doubled.positions[len(atoms):] += 0.1
    with pytest.raises(InvalidCrystal) as err:
        build_cluster(doubled)
    assert err.value.reason == "disordered"


def test_read_crystals_reports_bad_files(tmp_path):
    (tmp_path / "bad.cif").write_text("data_x\n_cell_length_a 5\nloop_\n_atom_site_label\nnonsense 1 2\n")
    errors = []
    assert list(read_crystals(tmp_path / "bad.cif", errors)) == []
    assert errors and "bad.cif" in errors[0][0]
    with pytest.raises(FileNotFoundError):
        list(read_crystals(tmp_path / "missing.cif"))


def test_store_round_trip_splits_by_crystal_and_atomic_build(tmp_path, crystals):
    clusters = list(build_clusters(list(crystals.items())[:15], draws_per_crystal=3))
    path = write_cluster_store(clusters, tmp_path / "s.lmdb")
    store = ClusterStore(path)
    assert len(store) == len(clusters)
    assert torch.equal(store[4].final_positions, clusters[4].final_positions)
    splits = {s: ClusterDataset(store, split=s, seed=1) for s in ("train", "valid", "test")}
    seen = [set(splits[s].crystals) for s in splits]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sum(len(d) for d in splits.values()) == len(store)
    assert splits["train"][0].molecule_index.max() == 16

    def interrupted():
        yield clusters[0]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_cluster_store(interrupted(), tmp_path / "half.lmdb")
    assert not (tmp_path / "half.lmdb").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".half")]
    with pytest.raises(FileNotFoundError):
        ClusterStore(tmp_path / "half.lmdb")


def test_split_indices_is_deterministic_and_grouped():
    groups = [f"c{i // 3}" for i in range(60)]
    a, b = split_indices(groups, seed=5), split_indices(groups, seed=5)
    assert a == b and a != split_indices(groups, seed=6)
    for s in a:
        for i in a[s]:
            assert all(j in a[s] for j in range(len(groups)) if groups[j] == groups[i])
    assert len(a["train"]) == 48


class _CreatesFile:
    """Unpickling this would run ``open(path, "w")``: a stand-in for code smuggled into a store."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _lmdb_put(folder, items):
    import lmdb

    env = lmdb.open(str(folder), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key, value)
    env.close()


def test_cluster_store_refuses_pickled_data_without_unpickling_it(tmp_path, crystals):
    import pickle

    trap = tmp_path / "code_ran"
    payload = pickle.dumps(_CreatesFile(trap))
    # 1. a store in the former pickled format: pickled metadata and records
    old = tmp_path / "old_format.lmdb"
    _lmdb_put(old, {b"__meta__": payload, b"00000000": payload})
    with pytest.raises(RecordStoreError, match="old_format.lmdb") as err:
        ClusterStore(old)
    assert "rebuild" in str(err.value)
    assert cached_store(old) is None  # a cached demo/CSD-500 store of the old format counts as stale
    # 2. a current store whose first record was replaced by a pickle
    clusters = list(build_clusters(list(crystals.items())[:3], draws_per_crystal=2))
    tampered = write_cluster_store(clusters, tmp_path / "tampered.lmdb")
    _lmdb_put(tampered, {b"00000000": payload})
    store = ClusterStore(tampered)
    with pytest.raises(RecordStoreError, match="tampered.lmdb"):
        store[0]
    assert torch.equal(store[1].final_positions, clusters[1].final_positions)  # the other records still read
    assert not trap.exists()


def test_cluster_store_metadata_is_json_with_names_and_crystals(tmp_path, crystals):
    clusters = list(build_clusters(list(crystals.items())[:3], draws_per_crystal=2))
    path = write_cluster_store(clusters, tmp_path / "s.lmdb", meta={"source": "test", "shape": (2, 3)})
    store = ClusterStore(path)
    assert store.names == [c.name for c in clusters] and store.crystals == [c.crystal for c in clusters]
    assert store.meta["source"] == "test" and store.meta["shape"] == [2, 3] and store.meta["count"] == len(clusters)
    back = store[len(clusters) - 1]
    assert back.name == clusters[-1].name and torch.equal(back.atomic_numbers, clusters[-1].atomic_numbers)
    assert torch.equal(back.initial_positions, clusters[-1].initial_positions)
