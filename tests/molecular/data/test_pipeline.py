"""End-to-end data pipelines: crystal files -> raw layout + LMDB (scripts/build_clusters.py), COD preprocessing
that skips bad files with reasons, and the cached embedded demo data set."""
import json
import sys
import time
from pathlib import Path

import ase.io
import pytest
import torch

from kflow.molecular import build_cluster, read_crystals, write_cod_cluster17
from kflow.molecular.data.datasets import CODCluster17Dataset, store_splits
from kflow.molecular.data.cod import preprocess_cod_cluster17
from kflow.molecular.data.sources import CSD500_SHIPPED, build_demo_dataset, csd500_path, pyxtal_crystal_sources
from kflow.molecular.data.store import ClusterStore

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import build_clusters  # noqa: E402


@pytest.fixture(scope="module")
def crystals():
    return list(read_crystals(pyxtal_crystal_sources()[0]))[:12]


def test_cif_round_trip_builds_the_same_cluster(tmp_path, crystals):
    """A crystal written as CIF and read back gives the same crystal cluster (up to the global rotation CIF's
    cell convention applies): same atoms in the same order, same distance matrix."""
    for name, atoms in crystals:
        try:
            ref = build_cluster(atoms, name=name)
        except Exception:
            continue
        ase.io.write(tmp_path / f"{name}.cif", atoms, format="cif")
        (read_name, back), = list(read_crystals(tmp_path / f"{name}.cif"))
        again = build_cluster(back, name=read_name)
        assert read_name == name and torch.equal(again.atomic_numbers, ref.atomic_numbers)
        d_ref, d_back = torch.cdist(ref.final_positions, ref.final_positions), torch.cdist(
            again.final_positions, again.final_positions)
        assert (d_ref - d_back).abs().max() < 1e-2  # CIF stores ~5 significant digits
        return
    pytest.fail("no crystal of the sample could be built")


def test_build_script_writes_raw_layout_lmdb_and_summary(tmp_path, crystals, capsys):
    cif_dir = tmp_path / "cifs"
    cif_dir.mkdir()
    for name, atoms in crystals[:6]:
        ase.io.write(cif_dir / f"{name}.cif", atoms, format="cif")
    (cif_dir / "broken.cif").write_text("data_x\n_cell_length_a 5\nloop_\n_atom_site_label\nnonsense 1 2\n")
    frames = []
    for name, atoms in crystals[6:]:
        atoms = atoms.copy()
        atoms.info = {"NAME": name}
        frames.append(atoms)
    ase.io.write(tmp_path / "more.extxyz", frames, format="extxyz")
    out = tmp_path / "built"
    assert build_clusters.main([str(cif_dir), str(tmp_path / "more.extxyz"), "--out", str(out), "--draws", "2",
                                "--workers", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected"]["unreadable"] == 1 and "broken.cif" in summary["examples"]["unreadable"][0]
    assert summary["kept"] + sum(summary["rejected"].values()) == len(crystals) + 1
    assert "kept" in capsys.readouterr().out
    store = ClusterStore(out / "processed" / "clusters.lmdb")
    assert len(store) == 2 * summary["kept"] == summary["clusters"]
    raw = CODCluster17Dataset(out, subset="all", num_workers=1, progress=False, download=False)
    assert len(raw) == len(store)  # the raw CSV layout reads back through the COD reader
    by_name = {raw.cluster(i).name: raw.cluster(i) for i in range(len(raw))}
    for i in range(len(store)):
        c = store[i]
        assert (by_name[c.name].final_positions - c.final_positions).abs().max() < 1e-5
    # a missing input is a one-line error with a non-zero exit, and writes nothing
    assert build_clusters.main([str(tmp_path / "nope.cif"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_cod_preprocessing_skips_bad_files_and_counts_reasons(tmp_path):
    from testkit import make_cluster

    ids = []
    for i in range(6):
        write_cod_cluster17(make_cluster(i, atoms=4), tmp_path, f"good{i}")
        ids.append(f"good{i}")

    def corrupt(cid, line_no, text):
        initial, _ = write_cod_cluster17(make_cluster(10, atoms=4), tmp_path, cid)
        lines = initial.read_text().splitlines()
        lines[line_no] = text
        initial.write_text("\n".join(lines) + "\n")
        ids.append(cid)

    corrupt("columns", 3, "0,C,1.0,2.0")
    corrupt("element", 4, "0,Qq,1.0,2.0,3.0")
    corrupt("nan", 5, "0,C,nan,2.0,3.0")
    bent = make_cluster(11, atoms=4)
    bent.final_positions[9] += 0.5
    write_cod_cluster17(bent, tmp_path, "bent")
    sixteen = make_cluster(12, atoms=4)
    keep = sixteen.molecule_index < 16
    from kflow.molecular import Cluster
    write_cod_cluster17(Cluster(sixteen.atomic_numbers[keep], sixteen.molecule_index[keep],
                                sixteen.initial_positions[keep], sixteen.final_positions[keep]), tmp_path, "sixteen")
    ids += ["bent", "sixteen", "missing"]
    summary = preprocess_cod_cluster17(tmp_path, ids, tmp_path / "s.lmdb", num_workers=2, progress=False,
                                       chunk_size=3)
    assert summary.kept == 6
    assert dict(summary.rejected) == {"malformed": 1, "unknown_element": 1, "nan": 1, "not_rigid": 1,
                                      "molecule_count": 1, "missing_file": 1}
    assert "columns_cluster16_noised.csv, line 4" in summary.examples["malformed"][0]
    assert "'Qq'" in summary.examples["unknown_element"][0]
    store = ClusterStore(tmp_path / "s.lmdb")
    assert sorted(store.names) == sorted(ids[:6])


def test_demo_dataset_is_cached_and_split_by_crystal(tmp_path):
    t0 = time.perf_counter()
    store = build_demo_dataset(tmp_path, draws_per_crystal=1, num_workers=2, progress=False)
    first = time.perf_counter() - t0
    assert len(store) >= 80 and store.meta["summary"]["kept"] == len(store)
    t0 = time.perf_counter()
    again = build_demo_dataset(tmp_path, draws_per_crystal=1, progress=False)
    assert len(again) == len(store) and time.perf_counter() - t0 < first / 5
    splits = store_splits(store, seed=0)
    crystals = {k: set(v.crystals) for k, v in splits.items()}
    assert not (crystals["train"] & crystals["test"]) and not (crystals["train"] & crystals["valid"])
    assert sum(len(v) for v in splits.values()) == len(store)
    data = splits["train"][0]
    assert data.num_molecules == 17 and data.initial_positions.dtype == torch.float32


def test_store_feeds_a_pyg_dataloader_with_worker_processes(tmp_path):
    from torch_geometric.loader import DataLoader

    from testkit import make_cluster
    from kflow.molecular.data.datasets import ClusterDataset
    from kflow.molecular.data.store import write_cluster_store

    clusters = [make_cluster(i, atoms=3 + i % 3, name=f"c{i}") for i in range(12)]
    store = ClusterStore(write_cluster_store(clusters, tmp_path / "s.lmdb"))
    loader = DataLoader(ClusterDataset(store), batch_size=5, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(b.num_graphs for b in batches) == 12
    b = batches[0]
    assert b.molecule_index.max() == 16  # per-cluster molecule ids are not offset by batching
    assert b.name == ["c0", "c1", "c2", "c3", "c4"] and b.batch.max() == 4
    expected = torch.cat([c.final_positions for c in clusters[:5]])
    assert torch.equal(b.final_positions, expected)


def test_shipped_csd500_is_found_inside_the_repository(monkeypatch, tmp_path):
    import itertools

    monkeypatch.delenv("KFLOW_CSD500", raising=False)
    repo = Path(__file__).resolve().parents[3]
    assert CSD500_SHIPPED == repo / "data" / "csd500.extxyz.xz" and CSD500_SHIPPED.is_file()
    path = csd500_path()
    assert path.is_file() and path.resolve().is_relative_to(repo)  # nothing outside the repository
    first = list(itertools.islice(read_crystals(path), 3))
    assert [name for name, _ in first][0] == "COBHUW" and len(first) == 3
    assert all(atoms.pbc.all() and atoms.cell.volume > 100 and len(atoms) > 10 for _, atoms in first)
    assert csd500_path() == path  # decompressed once, then reused
    explicit = tmp_path / "mine.extxyz"
    explicit.write_text("")
    assert csd500_path(explicit) == explicit
    monkeypatch.setenv("KFLOW_CSD500", str(tmp_path / "missing.extxyz"))
    with pytest.raises(FileNotFoundError, match="KFLOW_CSD500"):
        csd500_path()


def _report_torch_threads(args):
    """Stands in for the chunk worker: reports the torch thread count the worker process runs with."""
    return [], [("threads", str(torch.get_num_threads()))]


def test_preprocessing_workers_run_torch_single_threaded(tmp_path, monkeypatch):
    # a forked worker inherits the parent's thread count; N workers × N threads on N cores made 2 workers slower
    # than 1, so every worker must drop to one thread whatever the parent uses
    import kflow.molecular.data.cod as cod

    monkeypatch.setattr(cod, "_preprocess_cod_chunk", _report_torch_threads)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = preprocess_cod_cluster17(tmp_path, [f"c{i}" for i in range(4)], tmp_path / "s.lmdb", num_workers=2,
                                           progress=False, chunk_size=1)
    finally:
        torch.set_num_threads(before)
    assert summary.rejected["threads"] == 4 and set(summary.examples["threads"]) == {"1"}
