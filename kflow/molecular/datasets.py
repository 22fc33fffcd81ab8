"""Processed cluster stores on LMDB and torch_geometric datasets over them.

A store is an LMDB environment (a folder) holding one pickled ``Cluster.to_numpy()`` per key ``b"%08d"`` and a
``b"__meta__"`` record (count, names, crystals, provenance). It is written into a temporary folder and renamed
into place only when complete, so an interrupted build leaves no readable half database. Readers open the
environment lazily (once per process, fork-safe for DataLoader workers) and decode one cluster per access, so
memory does not grow with the size of the store.
"""
from __future__ import annotations

import os
import pickle
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch_geometric.data import Dataset

from kflow.molecular.cluster import Cluster, InvalidCrystal, RejectionSummary
from kflow.utils.io import atomic_path

__all__ = ["write_cluster_store", "ClusterStore", "ClusterDataset", "CODCluster17Dataset", "split_indices",
           "build_cluster_dataset", "build_clusters_from_files", "build_demo_dataset", "build_csd500_dataset",
           "csd500_path", "pyxtal_crystal_sources", "SerializedCluster", "COD_HUB_DATASET"]

META_KEY = b"__meta__"
COD_HUB_DATASET = "chao1224/CrystalFlow"
STORE_VERSION = 1
BUILDER_VERSION = 2  # bump when build_cluster's output changes, so cached demo/CSD-500 stores are rebuilt


class SerializedCluster(NamedTuple):
    """A cluster already pickled (``Cluster.to_numpy()`` record) by a worker process, ready to store."""

    blob: bytes
    name: str
    crystal: str


def _key(i: int) -> bytes:
    return b"%08d" % i


def write_cluster_store(clusters: Iterable[Cluster], path: str | os.PathLike, meta: dict | None = None,
                        map_size: int = 1 << 34, progress: bool = False, total: int | None = None) -> Path:
    """Write clusters (``Cluster`` objects, their ``to_numpy()`` records or ``SerializedCluster``) into a new LMDB
    store at ``path`` (atomically: temp folder, then rename; an exception mid-way leaves nothing behind)."""
    import lmdb

    path = Path(path)
    names, crystals, n = [], [], 0
    with atomic_path(path, is_dir=True) as tmp:
        env = lmdb.open(str(tmp), map_size=map_size, subdir=True, lock=False)
        try:
            iterator = clusters
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(clusters, total=total, desc=f"writing {path.name}", unit="cluster")
            txn = env.begin(write=True)
            for item in iterator:
                if isinstance(item, SerializedCluster):
                    blob, name, crystal = item
                else:
                    record = item.to_numpy() if isinstance(item, Cluster) else item
                    blob = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
                    name, crystal = record["name"], record["crystal"]
                txn.put(_key(n), blob)
                names.append(name)
                crystals.append(crystal)
                n += 1
                if n % 1000 == 0:  # bounded transactions
                    txn.commit()
                    txn = env.begin(write=True)
            record = {"version": STORE_VERSION, "count": n, "names": names, "crystals": crystals, **(meta or {})}
            txn.put(META_KEY, pickle.dumps(record))
            txn.commit()
            env.sync()
        finally:
            env.close()
    stale = _OPEN_ENVS.pop((str(path.resolve()), os.getpid()), None)  # a reader of the replaced store
    if stale is not None:
        stale.close()
    return path


_OPEN_ENVS: dict = {}


def _open_readonly(path: Path):
    """One read-only environment per (folder, process): LMDB refuses to open the same folder twice."""
    import lmdb

    key = (str(path.resolve()), os.getpid())
    if key not in _OPEN_ENVS:
        # A forked child (DataLoader worker) inherits the parent's handle, which LMDB forbids using or re-opening
        # alongside: close the inherited copy here (this unmaps it in the child only).
        for old in [k for k in _OPEN_ENVS if k[0] == key[0] and k[1] != key[1]]:
            _OPEN_ENVS.pop(old).close()
        _OPEN_ENVS[key] = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True,
                                    max_readers=256)
    return _OPEN_ENVS[key]


class ClusterStore:
    """Read-only random access to an LMDB cluster store."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "data.mdb").exists():
            raise FileNotFoundError(f"{self.path}: not a cluster store (no data.mdb); build it first")
        self._env, self._pid = None, None
        meta = self._txn_get(META_KEY)
        if meta is None:
            raise ValueError(f"{self.path}: store has no metadata record (incomplete or foreign LMDB)")
        self.meta = pickle.loads(meta)
        if self.meta.get("version") != STORE_VERSION:
            raise ValueError(f"{self.path}: store version {self.meta.get('version')} != {STORE_VERSION}; rebuild it")

    def _open(self):
        if self._env is None or self._pid != os.getpid():  # reopen in DataLoader workers
            self._env, self._pid = _open_readonly(self.path), os.getpid()
        return self._env

    def _txn_get(self, key: bytes):
        with self._open().begin() as txn:
            return txn.get(key)

    def __len__(self) -> int:
        return self.meta["count"]

    def __getitem__(self, i: int) -> Cluster:
        if not 0 <= i < len(self):
            raise IndexError(f"cluster {i} out of range for a store of {len(self)}")
        return Cluster.from_numpy(pickle.loads(self._txn_get(_key(i))))

    def __getstate__(self):  # picklable for worker processes; the environment is reopened there
        state = dict(self.__dict__)
        state["_env"], state["_pid"] = None, None
        return state

    @property
    def crystals(self) -> list[str]:
        return self.meta["crystals"]

    def splits(self, seed: int = 0) -> dict[str, "ClusterDataset"]:
        """Train/valid/test ``ClusterDataset`` views, split 80/10/10 by crystal with ``seed``."""
        return {name: ClusterDataset(self, split=name, seed=seed) for name in ("train", "valid", "test")}

    @property
    def names(self) -> list[str]:
        return self.meta["names"]


def split_indices(groups: Sequence[str], seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[int]]:
    """Deterministic train/valid/test split of items by group (e.g. crystal refcode): every group lands in exactly
    one split, so no test crystal is seen in training. Groups are shuffled with ``seed`` and cut by count."""
    if abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    unique = sorted(set(groups))
    perm = np.random.default_rng(seed).permutation(len(unique))
    n = len(unique)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    if n >= 3:  # every split non-empty whenever possible
        n_valid = max(n_valid, 1)
        n_train = min(n_train, n - n_valid - 1)
    assignment = {}
    for rank, gi in enumerate(perm):
        assignment[unique[gi]] = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
    out = {"train": [], "valid": [], "test": []}
    for i, g in enumerate(groups):
        out[assignment[g]].append(i)
    return out


class ClusterDataset(Dataset):
    """A torch_geometric dataset over a cluster store, optionally restricted to a split.

    ``dataset[i]`` is a ``torch_geometric.data.Data`` (see ``Cluster.to_data``); ``dataset.cluster(i)`` the
    ``Cluster``. Splits are by crystal with ``split_indices``.
    """

    def __init__(self, store: str | os.PathLike | ClusterStore, split: str | None = None, seed: int = 0,
                 transform: Callable | None = None):
        super().__init__(None, transform=transform)
        self.store = store if isinstance(store, ClusterStore) else ClusterStore(store)
        if split is None or split == "all":
            self.indices_ = list(range(len(self.store)))
        else:
            splits = split_indices(self.store.crystals, seed)
            if split not in splits:
                raise ValueError(f"split must be 'train', 'valid', 'test' or 'all', got {split!r}")
            self.indices_ = splits[split]
        self.split = split or "all"

    def len(self) -> int:
        return len(self.indices_)

    def get(self, idx: int):
        return self.store[self.indices_[idx]].to_data()

    def cluster(self, idx: int) -> Cluster:
        return self.store[self.indices_[idx]]

    @property
    def crystals(self) -> list[str]:
        return [self.store.crystals[i] for i in self.indices_]


# ------------------------------------------------------------------------------------------- building stores
def _build_one(args):
    name, atoms, draws, seed, kwargs = args
    from kflow.molecular.crystals import build_cluster, find_molecules

    torch.set_num_threads(1)  # one process per core: intra-op threads would oversubscribe
    try:
        mols = find_molecules(atoms, kwargs.get("bond_factor", 1.2))
        return name, [build_cluster(atoms, name=name, seed=seed, draw=k, molecules=mols, **kwargs)
                      for k in range(draws)], None
    except InvalidCrystal as err:
        return name, [], (err.reason, str(err))
    except Exception as err:  # one bad crystal never stops a build
        return name, [], ("error", f"{type(err).__name__}: {err}")


def build_cluster_dataset(sources: Iterable, path: str | os.PathLike, draws_per_crystal: int = 4, seed: int = 0,
                          num_workers: int | None = None, progress: bool = True, raw_root: str | os.PathLike | None = None,
                          summary: RejectionSummary | None = None, **build_kwargs):
    """Build a cluster store from crystals (``(name, atoms)`` pairs), in parallel; returns (store, summary).

    Each kept crystal gives ``draws_per_crystal`` clusters with independent noise (cluster ids
    ``<crystal>_draw<k>``). The summary counts kept and rejected crystals by reason (a repeated crystal name is
    rejected as ``duplicate``, since splits are by crystal) and is stored in the store's metadata. With
    ``raw_root``, every cluster is also written in the COD-Cluster17 raw CSV layout under ``raw_root/raw``.
    """
    summary = summary if summary is not None else RejectionSummary()
    items, seen = [], set()
    for name, atoms in sources:
        if name in seen:
            summary.reject("duplicate", f"{name}: a crystal of this name was already read; kept the first")
            continue
        seen.add(name)
        items.append((name, atoms, draws_per_crystal, seed, build_kwargs))
    num_workers = min(num_workers if num_workers is not None else (os.cpu_count() or 1), max(len(items), 1))
    meta = {"draws_per_crystal": draws_per_crystal, "seed": seed, "build_kwargs": _jsonable(build_kwargs),
            "builder_version": BUILDER_VERSION}

    def results():
        if num_workers > 1:
            with get_context("fork").Pool(num_workers) as pool:
                yield from pool.imap(_build_one, items, chunksize=4)
        else:
            yield from map(_build_one, items)

    def clusters():
        from kflow.molecular.io import write_cod_cluster17

        iterator = results()
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(items), desc=f"building {Path(path).name}", unit="crystal")
        for name, built, rejection in iterator:
            if rejection:
                summary.reject(rejection[0], f"{name}: {rejection[1]}")
                continue
            summary.keep()
            for cluster in built:
                if raw_root is not None:
                    write_cod_cluster17(cluster, raw_root, cluster.name)
                yield cluster
        meta["summary"] = summary.as_dict()  # read by write_cluster_store after the last cluster

    store = ClusterStore(write_cluster_store(clusters(), path, meta=meta))
    return store, summary


def build_clusters_from_files(paths: Sequence[str | os.PathLike], out: str | os.PathLike, draws_per_crystal: int = 4,
                              seed: int = 0, num_workers: int | None = None, write_raw: bool = True,
                              progress: bool = True, **build_kwargs):
    """Crystal files (CIF files/folders, ASE databases, extxyz) -> ``out/processed/clusters.lmdb`` and, with
    ``write_raw``, the raw COD-Cluster17 CSV layout under ``out/raw``; a JSON summary of kept/rejected crystals
    by reason goes to ``out/summary.json``. Unreadable files or entries are counted as ``unreadable``.
    Returns (store, summary). This is what ``scripts/build_clusters.py`` runs."""
    import json

    from kflow.molecular.crystals import read_crystals
    from kflow.utils.io import atomic_write_text

    out = Path(out)
    summary, errors = RejectionSummary(), []
    sources = [item for p in paths for item in read_crystals(p, errors)]
    for source, message in errors:
        summary.reject("unreadable", f"{source}: {message}")
    store, summary = build_cluster_dataset(sources, out / "processed" / "clusters.lmdb", draws_per_crystal, seed,
                                           num_workers, progress, raw_root=out if write_raw else None,
                                           summary=summary, **build_kwargs)
    atomic_write_text(out / "summary.json", json.dumps({"inputs": [str(p) for p in paths], "clusters": len(store),
                                                        **summary.as_dict()}, indent=1) + "\n")
    return store, summary


def _jsonable(d):
    from dataclasses import asdict, is_dataclass

    return {k: asdict(v) if is_dataclass(v) else v for k, v in d.items()}


def pyxtal_crystal_sources() -> list[Path]:
    """The CSD crystal databases shipped inside the pyxtal wheel (``test.db``: 100 crystals, ``mech.db``: 50)."""
    import pyxtal

    folder = Path(pyxtal.__file__).parent / "database"
    paths = [folder / "test.db", folder / "mech.db"]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"pyxtal's crystal databases are missing: {missing} (reinstall pyxtal)")
    return paths


def build_demo_dataset(root: str | os.PathLike = "data/demo", draws_per_crystal: int = 4, seed: int = 0,
                       num_workers: int | None = None, rebuild: bool = False, progress: bool = True):
    """The embedded benchmark: clusters from the single-component organic CSD crystals shipped with pyxtal.

    Cached at ``root/pyxtal_d{draws}_s{seed}.lmdb``; built once (a few seconds on 2 cores) and rebuilt when the
    builder version changes. Returns a ``ClusterStore``; ``store.splits(seed)`` gives the crystal-level
    train/valid/test ``ClusterDataset`` views (or ``ClusterDataset(store, split=...)``).
    """
    from kflow.molecular.crystals import read_crystals

    path = Path(root) / f"pyxtal_d{draws_per_crystal}_s{seed}.lmdb"
    cached = None if rebuild else _cached_store(path)
    if cached is not None:
        return cached
    seen, sources = set(), []
    for db in pyxtal_crystal_sources():
        for name, atoms in read_crystals(db):
            if name not in seen:  # the two databases share a few refcodes
                seen.add(name)
                sources.append((name, atoms))
    store, summary = build_cluster_dataset(sources, path, draws_per_crystal, seed, num_workers, progress)
    if progress:
        print(f"demo data set: {summary}")
    return store


def _cached_store(path: Path) -> "ClusterStore | None":
    """An existing store built by the current builder, else None (stale or unreadable caches are rebuilt)."""
    try:
        store = ClusterStore(path)
    except (FileNotFoundError, ValueError):
        return None
    return store if store.meta.get("builder_version") == BUILDER_VERSION else None


def csd500_path(path: str | os.PathLike | None = None) -> Path:
    """The CSD-500 extxyz file: ``path``, else ``$KFLOW_CSD500``, else ../shared/data/csd500.extxyz next to the
    project (developer machines and CI only; it is never shipped with kflow)."""
    if path is None:
        path = os.environ.get("KFLOW_CSD500") or Path(__file__).resolve().parents[3] / "shared" / "data" / "csd500.extxyz"
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CSD-500 file not found at {path}; set KFLOW_CSD500 to the csd500.extxyz file")
    return path


def build_csd500_dataset(root: str | os.PathLike = "data/csd500", path: str | os.PathLike | None = None,
                         draws_per_crystal: int = 4, seed: int = 0, num_workers: int | None = None,
                         rebuild: bool = False, progress: bool = True) -> "ClusterStore":
    """Clusters from the CSD-500 extxyz crystals (refcodes from ``NAME``), cached at
    ``root/csd500_d{draws}_s{seed}.lmdb``; about 413 of the 500 crystals are kept (see BENCHMARKS.md)."""
    from kflow.molecular.crystals import read_crystals

    store_path = Path(root) / f"csd500_d{draws_per_crystal}_s{seed}.lmdb"
    cached = None if rebuild else _cached_store(store_path)
    if cached is not None:
        return cached
    store, summary = build_cluster_dataset(read_crystals(csd500_path(path)), store_path, draws_per_crystal, seed,
                                           num_workers, progress)
    if progress:
        print(f"CSD-500: {summary}")
    return store


# -------------------------------------------------------------------------------------------- COD-Cluster17
class CODCluster17Dataset(ClusterDataset):
    """COD-Cluster17 in its published raw format, preprocessed once into LMDB.

    Expects ``root/raw/InitialPositions/<id>_cluster16_noised.csv`` and ``root/raw/FinalPositions/<id>_cluster16.csv``.
    ``subset``: "5k", "10k" (id lists ``root/raw/subset_5k.txt`` / ``subset_10k.txt``, one id per line), "all",
    or a path to an id list. Missing raw data is downloaded from the hub dataset ``chao1224/CrystalFlow``
    (folder ``COD/``) when online; offline, the error says where to put the files.
    """

    def __init__(self, root: str | os.PathLike = "data/COD-Cluster17", subset: str = "10k", split: str | None = None,
                 seed: int = 0, num_workers: int | None = None, download: bool = True, progress: bool = True,
                 transform: Callable | None = None):
        root = Path(root)
        ids = cod_cluster17_ids(root, subset, download)
        tag = subset if subset in ("5k", "10k", "all") else Path(subset).stem
        store_path = root / "processed" / f"{tag}.lmdb"
        if not store_path.exists():
            preprocess_cod_cluster17(root, ids, store_path, num_workers, progress)
        super().__init__(store_path, split=split, seed=seed, transform=transform)


def cod_cluster17_ids(root: Path, subset: str, download: bool = True) -> list[str]:
    raw = root / "raw"
    final_dir = raw / "FinalPositions"
    if not final_dir.is_dir() and download:
        _download_cod(root)
    if not final_dir.is_dir():
        raise FileNotFoundError(
            f"COD-Cluster17 raw data not found under {raw}. Download the folder COD/ of the hub dataset "
            f"'{COD_HUB_DATASET}' and place its files so that {raw}/FinalPositions/<id>_cluster16.csv and "
            f"{raw}/InitialPositions/<id>_cluster16_noised.csv exist (subset id lists as {raw}/subset_5k.txt, "
            f"{raw}/subset_10k.txt).")
    if subset == "all":
        return sorted(p.name[: -len("_cluster16.csv")] for p in final_dir.glob("*_cluster16.csv"))
    if subset in ("5k", "10k"):
        candidates = [raw / f"subset_{subset}.txt", root / f"subset_{subset}.txt"]
        list_path = next((p for p in candidates if p.exists()), candidates[0])
    else:
        list_path = Path(subset)
    if not list_path.exists():
        raise FileNotFoundError(f"subset id list {list_path} not found: put the {subset} cluster ids there, one per "
                                f"line (or pass subset='all' or the path of an id list)")
    # one id per line; a trailing file suffix or a CSV-style "id,..." line is tolerated
    ids = [ln.split(",")[0].strip() for ln in list_path.read_text().splitlines() if ln.strip()]
    return [i.removesuffix("_cluster16.csv").removesuffix("_cluster16") for i in ids]


def _download_cod(root: Path):
    """Fetch the hub folder ``COD/`` into ``root/hub`` and move the folder that holds ``FinalPositions/`` (its exact
    depth in the hub layout is not assumed) to ``root/raw``. Failures (offline, no huggingface_hub) are reported
    and left to the caller, which raises with instructions."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(COD_HUB_DATASET, repo_type="dataset", allow_patterns=["COD/*", "COD/**"],
                          local_dir=str(root / "hub"))
    except Exception as err:
        print(f"COD-Cluster17 download from {COD_HUB_DATASET} failed ({type(err).__name__}); working offline")
        return
    found = sorted((root / "hub").rglob("FinalPositions"), key=lambda p: len(p.parts))
    raw = root / "raw"
    if found and not raw.exists():
        os.replace(found[0].parent, raw)


def _preprocess_cod_chunk(args):
    """Worker: parse, validate and rigidity-check a chunk of CSV pairs (one batched SVD for the whole chunk) and
    serialise the kept ones, so the main process only writes bytes. Returns ([(blob, name)], [(reason, msg)])."""
    from kflow.molecular.io import cod_cluster17_paths, read_cod_cluster17_record, record_residuals

    root, ids, tolerance = args
    records, rejected = [], []
    for cid in ids:
        initial, final = cod_cluster17_paths(root, cid)
        try:
            records.append(read_cod_cluster17_record(initial, final, name=cid))
        except InvalidCrystal as err:
            rejected.append((err.reason, str(err)))
        except Exception as err:  # one bad file never stops a build of thousands
            rejected.append(("error", f"{cid}: {type(err).__name__}: {err}"))
    kept = []
    for record, residual in zip(records, record_residuals(records)):
        if residual.max() > tolerance:
            m = int(residual.argmax())
            rejected.append(("not_rigid", f"cluster {record['name']!r}, molecule {m}: initial and final atoms differ "
                                          f"by more than a rigid motion (RMS residual {residual[m]:.3g} Å)"))
        else:
            kept.append(SerializedCluster(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL), record["name"],
                                          record["crystal"]))
    return kept, rejected


def preprocess_cod_cluster17(root: Path, ids: Sequence[str], store_path: Path, num_workers: int | None = None,
                             progress: bool = True, rigid_tolerance: float = 1e-3,
                             chunk_size: int = 64) -> RejectionSummary:
    """Parse raw CSV pairs in worker processes (chunks of ``chunk_size`` clusters, rigidity checked per chunk in
    one batched SVD), write the LMDB store atomically; returns the kept/rejected summary by reason."""
    root, ids = Path(root), list(ids)
    summary = RejectionSummary()
    num_workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    chunks = [(root, ids[k:k + chunk_size], rigid_tolerance) for k in range(0, len(ids), chunk_size)]

    def clusters():
        if num_workers > 1 and len(chunks) > 1:
            pool = get_context("fork").Pool(min(num_workers, len(chunks)))
            results = pool.imap(_preprocess_cod_chunk, chunks)
        else:
            pool, results = None, map(_preprocess_cod_chunk, chunks)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="preprocessing COD-Cluster17", unit="cluster")
        try:
            for kept, rejected in results:
                for reason, message in rejected:
                    summary.reject(reason, message)
                summary.keep(len(kept))
                if bar is not None:
                    bar.update(len(kept) + len(rejected))
                yield from kept
        finally:
            if bar is not None:
                bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()

    write_cluster_store(clusters(), store_path, meta={"source": "COD-Cluster17", "root": str(root),
                                                      "rigid_tolerance": rigid_tolerance})
    if progress:
        print(f"COD-Cluster17 preprocessing: {summary}")
    return summary
