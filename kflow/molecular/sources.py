"""Where clusters come from: crystal sources (pyxtal's embedded CSD crystals, the shipped CSD-500 set, crystal
files, the COD-Cluster17 download) and the parallel builds that turn them into cluster stores.

``build_cluster_dataset`` is the build pool (crystals -> clusters in worker processes -> ``write_cluster_store``);
the other functions find or fetch a source and call it, caching the demo and CSD-500 stores under the data root.
"""
from __future__ import annotations

import lzma
import os
import shutil
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Sequence

import torch

from kflow.molecular.cluster import InvalidCrystal, RejectionSummary
from kflow.molecular.store import ClusterStore, serialize_cluster, write_cluster_store
from kflow.utils.io import atomic_path

__all__ = ["build_cluster_dataset", "build_clusters_from_files", "pyxtal_crystal_sources", "build_demo_dataset",
           "csd500_path", "build_csd500_dataset", "cod_cluster17_ids", "preprocess_cod_cluster17",
           "COD_HUB_DATASET", "CSD500_SHIPPED", "BUILDER_VERSION"]

COD_HUB_DATASET = "chao1224/CrystalFlow"
# Bump when build_cluster's output or the store format changes, so cached demo/CSD-500 stores are rebuilt
# (3: cluster stores became pickle-free).
BUILDER_VERSION = 3
DATA_ROOT = Path(__file__).resolve().parents[2] / "data"  # the repository's data/ folder (editable install)
CSD500_SHIPPED = DATA_ROOT / "csd500.extxyz.xz"
CSD500_CACHE = DATA_ROOT / "cache" / "csd500.extxyz"


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
                          num_workers: int | None = None, progress: bool = True,
                          raw_root: str | os.PathLike | None = None, summary: RejectionSummary | None = None,
                          **build_kwargs):
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


def _jsonable(value):
    """Build keyword arguments as JSON for the store's metadata (provenance only): dataclasses become dicts, numpy
    values lists or numbers, tuples lists, anything else its ``repr``."""
    from dataclasses import asdict, is_dataclass

    import numpy as np

    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return str(value) if isinstance(value, os.PathLike) else repr(value)


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
    """An existing store built by the current builder, else None (stale, unreadable or old-format caches, e.g.
    the former pickled stores, are rebuilt)."""
    try:
        store = ClusterStore(path)
    except (FileNotFoundError, ValueError):
        return None
    return store if store.meta.get("builder_version") == BUILDER_VERSION else None


def csd500_path(path: str | os.PathLike | None = None) -> Path:
    """The CSD-500 extxyz file: ``path``, else ``$KFLOW_CSD500``, else the copy shipped with kflow
    (``data/csd500.extxyz.xz``, CC BY 4.0, see data/README.md), decompressed on first use into
    ``data/cache/csd500.extxyz`` (ase reads the .xz file itself only very slowly)."""
    if path is None:
        path = os.environ.get("KFLOW_CSD500") or None
    if path is None:
        if not CSD500_SHIPPED.is_file():
            raise FileNotFoundError(f"the shipped CSD-500 file {CSD500_SHIPPED} is missing (restore it from the "
                                    "repository) and KFLOW_CSD500 is not set; set it to a csd500.extxyz file")
        return _decompressed(CSD500_SHIPPED, CSD500_CACHE)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CSD-500 file not found at {path}; set KFLOW_CSD500 to the csd500.extxyz file "
                                "(or unset it to use the copy shipped with kflow)")
    return path


def _decompressed(source: Path, cache: Path) -> Path:
    """``cache``: the xz-compressed ``source`` decompressed, written atomically once (again if ``source`` is newer)."""
    if not cache.is_file() or cache.stat().st_mtime < source.stat().st_mtime:
        with atomic_path(cache) as tmp, lzma.open(source, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    return cache


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
    encode the kept ones (``encode_record``, no pickle), so the main process only writes bytes. Returns
    ([SerializedCluster], [(reason, msg)])."""
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
            kept.append(serialize_cluster(record))
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
