"""Where clusters come from: crystal sources (pyxtal's embedded CSD crystals, the shipped CSD-500 set, crystal
files; the COD-Cluster17 download is ``cod``) and the parallel builds that turn them into cluster stores.

``build_cluster_dataset`` is the build pool (crystals -> clusters in worker processes -> ``write_cluster_store``);
the other functions find or fetch a source and call it, caching the demo and CSD-500 stores under the data root.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Sequence

import torch

from kflow.molecular.data.cluster import InvalidCrystal, RejectionSummary
from kflow.molecular.data.store import ClusterStore, close_store, staged_folder, write_cluster_store
from kflow.utils.io import ANY_CONTENT, atomic_path, atomic_write_text, safe_filename, unique_filename


__all__ = ["build_cluster_dataset", "build_clusters_from_files", "pyxtal_crystal_sources", "build_demo_dataset",
           "csd500_path", "build_csd500_dataset", "build_key", "files_fingerprint", "read_crystal_inputs",
           "report_build", "CSD500_SHIPPED", "BUILDER_VERSION", "isolated_map", "DATA_ROOT"]


# Bump when build_cluster's output or the store format changes, so cached stores are rebuilt (3: cluster stores
# became pickle-free; 4: planar molecules accepted, linear ones rejected, CIFs read by kflow's reader; 5: start
# presets; 6: the hard preset's central molecule and info["volume_per_molecule"], which redrawn training starts
# need). Cached stores are also keyed by their inputs' content and the build parameters (``build_key``).
BUILDER_VERSION = 6
DATA_ROOT = Path(__file__).resolve().parents[3] / "data"  # the repository's data/ folder (editable install)
CSD500_SHIPPED = DATA_ROOT / "csd500.extxyz.xz"
CSD500_CACHE = DATA_ROOT / "cache" / "csd500.extxyz"


# ------------------------------------------------------------------------------------------- building stores
def one_thread_worker() -> None:
    """Pool initializer: a forked worker inherits the parent's torch thread count, so N workers would each run
    N-thread kernels on N cores; oversubscribed, 2 workers were slower than 1 (measured 2026-11-27)."""
    torch.set_num_threads(1)


def _build_one(args):
    name, atoms, draws, seed, kwargs = args
    from kflow.molecular.data.clusters import build_cluster
    from kflow.molecular.data.molecules import find_molecules

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
                          meta: dict | None = None, **build_kwargs):
    """Build a cluster store from crystals (``(name, atoms)`` pairs), in parallel; returns (store, summary).

    Each kept crystal gives ``draws_per_crystal`` clusters with independent noise (cluster ids
    ``<crystal>_draw<k>``). The summary counts kept and rejected crystals by reason (a repeated crystal name is
    rejected as ``duplicate``, since splits are by crystal), per input file where the atoms carry
    ``info["source"]``, and is stored in the store's metadata (with ``meta``). With ``raw_root``, every cluster is
    also written in the COD-Cluster17 raw CSV layout under ``raw_root/raw``. The store is written transactionally.
    """
    summary = summary if summary is not None else RejectionSummary()
    items, seen, origin = [], set(), {}
    for name, atoms in sources:
        source, reader = atoms.info.get("source"), atoms.info.get("reader")
        if name in seen:
            summary.reject("duplicate", f"{name}: a crystal of this name was already read; kept the first",
                           source=source)
            continue
        seen.add(name)
        origin[name] = (source, reader)
        items.append((name, atoms, draws_per_crystal, seed, build_kwargs))
    num_workers = min(num_workers if num_workers is not None else (os.cpu_count() or 1), max(len(items), 1))
    store_meta = {**(meta or {}), "draws_per_crystal": draws_per_crystal, "seed": seed,
                  "build_kwargs": _jsonable(build_kwargs), "builder_version": BUILDER_VERSION}

    def results():
        if num_workers > 1:
            with get_context("fork").Pool(num_workers, initializer=one_thread_worker) as pool:
                yield from pool.imap(_build_one, items, chunksize=4)
        else:
            yield from map(_build_one, items)

    def clusters():
        from kflow.molecular.data.io import write_cod_cluster17

        iterator, taken = results(), set()
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(items), desc=f"building {Path(path).name}", unit="crystal")
        for name, built, rejection in iterator:
            source, reader = origin[name]
            if rejection:
                summary.reject(rejection[0], f"{name}: {rejection[1]}", source=source)
                continue
            summary.keep(source=source, reader=reader)
            for cluster in built:
                if raw_root is not None:  # one file per cluster: names that collide once made file names get a suffix
                    file_id = unique_filename(cluster.name, taken)
                    if file_id != cluster.name:
                        summary.rename(cluster.name, file_id)
                    write_cod_cluster17(cluster, raw_root, file_id)
                yield cluster
        store_meta["summary"] = summary.as_dict()  # read by write_cluster_store after the last cluster

    store = ClusterStore(write_cluster_store(clusters(), path, meta=store_meta))
    return store, summary


FILE_TIME_LIMIT_S = 300.0  # reading one input file, in its own worker process
FILE_MEMORY_LIMIT = 4 << 30  # bytes a worker may allocate beyond what it inherited


def _limit_memory(extra: int) -> None:
    """Cap this process's address space at its current size + ``extra`` bytes: an allocation beyond it raises
    ``MemoryError`` here instead of the kernel killing the machine's largest process."""
    import resource

    try:
        current = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return  # no /proc: no cap (the time limit still applies)
    resource.setrlimit(resource.RLIMIT_AS, (current + extra, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _isolated_child(function, item, conn, memory_limit: int) -> None:
    try:
        _limit_memory(memory_limit)
        torch.set_num_threads(1)
        outcome = ("ok", function(item))
    except MemoryError:
        outcome = ("limit", f"exceeded the memory limit of {memory_limit / 2 ** 30:g} GiB")
    except BaseException as err:  # reported by the parent; a worker never raises into the build
        outcome = ("error", f"{type(err).__name__}: {err}")
    try:
        conn.send(outcome)
    except Exception as err:  # e.g. a result too large to pickle within the memory limit
        conn.send(("limit", f"its result could not be returned ({type(err).__name__})"))
    finally:
        conn.close()
        os._exit(0)  # a forked child must not run the parent's exit handlers


def isolated_map(function, items: Sequence, workers: int = 1, time_limit: float = FILE_TIME_LIMIT_S,
                 memory_limit: int = FILE_MEMORY_LIMIT):
    """``function(item)`` for every item, each in its own forked process with a time and a memory budget, at most
    ``workers`` at once; yields ``(status, value)`` in the order of ``items``: ``("ok", result)``, ``("error",
    message)`` or ``("limit", message)`` (out of time or memory, or the worker died). One item can neither stall
    nor kill the caller."""
    import time
    from multiprocessing.connection import wait

    context = get_context("fork")
    pending, running, done, next_out = list(enumerate(items)), {}, {}, 0
    while pending or running:
        while pending and len(running) < max(workers, 1):
            index, item = pending.pop(0)
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_isolated_child, args=(function, item, sender, memory_limit))
            process.start()
            sender.close()
            running[receiver] = (index, process, time.monotonic() + time_limit)
        timeout = max(min(deadline for _, _, deadline in running.values()) - time.monotonic(), 0)
        for receiver in wait(list(running), timeout=timeout):
            index, process, _ = running.pop(receiver)
            try:
                done[index] = receiver.recv()
            except (EOFError, OSError):  # the worker ended without a result
                process.join()
                done[index] = ("limit", f"its worker died (exit status {process.exitcode}; killed for memory?)")
            receiver.close()
            process.join()
        now = time.monotonic()
        for receiver, (index, process, deadline) in list(running.items()):
            if now > deadline:
                process.kill()
                process.join()
                receiver.close()
                del running[receiver]
                done[index] = ("limit", f"exceeded the time limit of {time_limit:g} s")
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1


def _read_file(path):
    from kflow.molecular.data.crystals import read_crystals

    problems = []
    return list(read_crystals(path, problems)), problems


def read_crystal_inputs(files: Sequence[str | os.PathLike], workers: int | None = None,
                        time_limit: float = FILE_TIME_LIMIT_S, memory_limit: int = FILE_MEMORY_LIMIT,
                        progress: bool = False) -> tuple[list, RejectionSummary]:
    """Read crystal files (``crystals.crystal_files`` of the inputs) for a build: ([(name, atoms)], summary), the
    summary already holding a record for every file and the read problems (unreadable files, blocks without a
    cell, ...) as rejections with their reasons, so no file can leave the build unaccounted for.

    Each file is read in its own worker process (``isolated_map``, ``workers`` at once, default one per core)
    with ``time_limit`` seconds and ``memory_limit`` bytes: a file that needs more is rejected as
    ``resource_limit`` with the limit it hit, and the build goes on. The readers' modules are imported once,
    before the workers are forked (each worker imported ASE's io anew: 0.5 s a file)."""
    import ase.db  # noqa: F401  (imported for the forked workers)
    import ase.io  # noqa: F401
    import ase.io.cif  # noqa: F401

    import kflow.molecular.data.crystals  # noqa: F401

    summary, problems, sources = RejectionSummary(), [], []
    for f in files:
        summary.note_file(str(f))
    workers = workers or min(os.cpu_count() or 1, max(len(files), 1))
    results = isolated_map(_read_file, list(files), workers, time_limit, memory_limit)
    if progress:
        from tqdm.auto import tqdm

        results = tqdm(results, total=len(files), desc="reading", unit="file")
    for f, (status, value) in zip(files, results):
        if status == "ok":
            sources += value[0]
            problems += value[1]
        else:
            summary.reject("resource_limit" if status == "limit" else "unreadable", f"{f}: {value}", source=str(f))
    for problem in problems:
        summary.reject(problem.reason, f"{problem.source}: {problem.message}", source=problem.file)
    return sources, summary


# What a build writes into its output folder (``kflow.utils.io.foreign_entries``): anything else is foreign.
# processed/ may also hold the stores kflow caches when the folder is read as COD-Cluster17 data (<subset>.lmdb)
# and the staging folders of such a cache build that was interrupted.
BUILD_FOLDER_LAYOUT = {"raw": {"FinalPositions": {"*_cluster16.csv": None},
                               "InitialPositions": {"*_cluster16_noised.csv": None}},
                       "processed": {"*.lmdb": {"*.mdb": None}, ".*.lmdb.build-*": ANY_CONTENT},
                       "summary.json": None}
BUILD_FOLDER_ENTRIES = tuple(BUILD_FOLDER_LAYOUT)


def _check_build_folder(out: Path, files: Sequence[Path]) -> None:
    """A build replaces the whole ``out`` folder: refuse one that holds anything a build did not write (hidden
    files too), the current folder, a file, a place that is not writable, or the inputs themselves."""
    from kflow.utils.io import check_replaceable_folder

    resolved = out.resolve()
    inside = [str(f) for f in files if f.resolve().is_relative_to(resolved)]
    if inside:
        raise ValueError(f"input {inside[0]} lies inside the output folder {out}, which a build replaces; "
                         "choose another --out")
    check_replaceable_folder(out, BUILD_FOLDER_LAYOUT, "a cluster build")


def _note_unread_files(paths: Sequence[str | os.PathLike], read: Sequence[Path], summary: RejectionSummary) -> None:
    """List in ``summary`` every file of an input folder that a build does not read (a folder contributes its
    ``.cif`` files), so every file is accounted for: an XYZ or a database dropped into a CIF folder shows as
    ``not_read``, with how to read it."""
    from kflow.molecular.data.crystals import FOLDER_SUFFIXES

    read = set(read)
    for folder in (Path(p) for p in paths):
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_file() and f not in read:
                summary.note_file(str(f))
                summary.reject("not_read", f"{f}: a folder contributes its {'/'.join(FOLDER_SUFFIXES)} files; give "
                               "it by name to read it", source=str(f))


def build_clusters_from_files(paths: Sequence[str | os.PathLike], out: str | os.PathLike, draws_per_crystal: int = 4,
                              seed: int = 0, num_workers: int | None = None, write_raw: bool = True,
                              progress: bool = True, **build_kwargs):
    """Crystal files (CIF files/folders, ASE databases, extxyz) -> ``out/processed/clusters.lmdb``, with
    ``write_raw`` the raw COD-Cluster17 CSV layout under ``out/raw``, and ``out/summary.json``: kept/rejected
    crystals by reason, and for every input file its outcome (``built``, ``rejected`` with reasons, or ``error``
    with the cause) and the reader of its crystals. Unreadable files or entries count as ``unreadable``; files
    without a structure as ``no_structure``, ``no_cell``, ``no_atoms``; files of an input folder that are not
    read (not ``.cif``) as ``not_read``. Files are read ``num_workers`` at a time, each in its own worker process
    with a time and memory budget (``read_crystal_inputs``).

    The build is transactional: everything is written into a staging folder beside ``out`` and swapped in when
    complete, so a killed build leaves the previous ``out`` (or none), never a partial data set, and a rebuild
    leaves no file of an older build behind. ``out`` must be new, empty or an earlier build's folder.
    Returns (store, summary). This is what ``scripts/build_clusters.py`` runs."""
    from kflow.molecular.data.crystals import crystal_files

    out = Path(out)
    files = list(dict.fromkeys(f for p in paths for f in crystal_files(p)))  # missing inputs raise before writing
    _check_build_folder(out, files)
    sources, summary = read_crystal_inputs(files, num_workers, progress=progress)
    _note_unread_files(paths, files, summary)
    with staged_folder(out) as stage:
        stage.mkdir()
        store_path = stage / "processed" / "clusters.lmdb"
        store, summary = build_cluster_dataset(sources, store_path, draws_per_crystal, seed, num_workers, progress,
                                               raw_root=stage if write_raw else None, summary=summary,
                                               meta={"inputs": [str(p) for p in paths]}, **build_kwargs)
        count = len(store)
        close_store(store_path)
        atomic_write_text(stage / "summary.json", json.dumps({"inputs": [str(p) for p in paths], "clusters": count,
                                                              **summary.as_dict()}, indent=1) + "\n")
    return ClusterStore(out / "processed" / "clusters.lmdb"), summary


# ------------------------------------------------------------------------------------------- cache keys
def files_fingerprint(files: Sequence[str | os.PathLike]) -> str:
    """Hash of the input files' names and bytes (in the given order): any added, removed, renamed or changed
    file changes it."""
    digest = hashlib.blake2b(digest_size=16)
    for f in map(Path, files):
        digest.update(f.name.encode("utf-8", "surrogateescape") + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def build_key(files: Sequence[str | os.PathLike], draws_per_crystal: int, seed: int, **build_kwargs) -> str:
    """Key of a built store: the input files' content (``files_fingerprint``), draws, seed, the start-cluster noise
    preset and every other build parameter with ``build_cluster``'s defaults filled in, and ``BUILDER_VERSION``."""
    import inspect

    from kflow.molecular.data.clusters import build_cluster
    from kflow.molecular.data.starts import noise_model

    params = {k: v.default for k, v in inspect.signature(build_cluster).parameters.items()
              if v.default is not inspect.Parameter.empty and k not in ("seed", "name", "molecules", "draw")}
    params.update(build_kwargs)
    params["noise"] = noise_model(params.get("noise"))
    spec = {"inputs": files_fingerprint(files), "draws": draws_per_crystal, "seed": seed,
            "builder_version": BUILDER_VERSION, "params": _jsonable(params)}
    return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=8).hexdigest()


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
                       num_workers: int | None = None, rebuild: bool = False, progress: bool = True,
                       noise: str = "mild"):
    """The embedded benchmark: clusters from the single-component organic CSD crystals shipped with pyxtal.

    ``noise``: the start preset ("mild" or "hard", ``crystals.NOISE_PRESETS``). Cached at
    ``root/pyxtal_{noise}_d{draws}_s{seed}.lmdb``; built once (a few seconds on 2 cores) and rebuilt when its
    key (``build_key``: pyxtal's database files, parameters, builder version) changes. Returns a ``ClusterStore``;
    ``datasets.store_splits(store, seed)`` gives the crystal-level train/valid/test ``ClusterDataset`` views (or
    ``ClusterDataset(store, split=...)``).
    """
    from kflow.molecular.data.crystals import read_crystals

    path = Path(root) / f"pyxtal_{_preset_name(noise)}_d{draws_per_crystal}_s{seed}.lmdb"
    databases = pyxtal_crystal_sources()
    key = build_key(databases, draws_per_crystal, seed, noise=noise)
    cached = None if rebuild else cached_store(path, key)
    if cached is not None:
        return cached
    seen, sources = set(), []
    for db in databases:
        for name, atoms in read_crystals(db):
            if name not in seen:  # the two databases share a few refcodes
                seen.add(name)
                sources.append((name, atoms))
    store, summary = build_cluster_dataset(sources, path, draws_per_crystal, seed, num_workers, progress,
                                           meta={"build_key": key}, noise=noise)
    report_build("demo data set", store, summary)
    return store


def _preset_name(noise) -> str:
    """The start preset's name for file names ("mild", "hard"; "custom" for a hand-made ``NoiseModel``)."""
    from kflow.molecular.data.starts import noise_model

    return safe_filename(noise_model(noise).name)


def report_build(label: str, store: ClusterStore, summary: RejectionSummary) -> None:
    """Print what a build kept and rejected (also without progress bars), once under torchrun (rank 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{label}: {len(store)} clusters; {summary}", flush=True)


def cached_store(path: Path, key: str | None = None) -> "ClusterStore | None":
    """An existing store built by the current builder (and, with ``key``, from the same inputs and parameters),
    else None: stale, unreadable or old-format caches (e.g. the former pickled stores) are rebuilt."""
    try:
        store = ClusterStore(path)
    except (FileNotFoundError, ValueError):
        return None
    if store.meta.get("builder_version") != BUILDER_VERSION:
        return None
    return store if key is None or store.meta.get("build_key") == key else None


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
                         rebuild: bool = False, progress: bool = True, noise: str = "mild") -> "ClusterStore":
    """Clusters from the CSD-500 extxyz crystals (refcodes from ``NAME``) with the start preset ``noise``, cached
    at ``root/csd500_{noise}_d{draws}_s{seed}.lmdb`` and rebuilt when the file (e.g. ``$KFLOW_CSD500``), the parameters or
    the builder change; 418 of the 500 crystals are kept (81 are multi-component, one polymeric)."""
    from kflow.molecular.data.crystals import read_crystals

    store_path = Path(root) / f"csd500_{_preset_name(noise)}_d{draws_per_crystal}_s{seed}.lmdb"
    source = csd500_path(path)
    key = build_key([source], draws_per_crystal, seed, noise=noise)
    cached = None if rebuild else cached_store(store_path, key)
    if cached is not None:
        return cached
    store, summary = build_cluster_dataset(read_crystals(source), store_path, draws_per_crystal, seed, num_workers,
                                           progress, meta={"build_key": key}, noise=noise)
    report_build("CSD-500", store, summary)
    return store
