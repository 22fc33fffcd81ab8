"""The molecular cluster store: ``Cluster`` samples saved to and read from a pickle-free LMDB record store.

A cluster store is a ``kflow.utils.store`` record store (a folder) whose record ``i`` is ``Cluster.to_numpy()``
of the i-th cluster (integer and float arrays plus the ``name`` and ``crystal`` strings) and whose JSON metadata
holds the kind and version of the cluster store, the count, every cluster's name and crystal (so splits need not
decode records) and the builder's provenance. Nothing is pickled: reading a store never executes code from it, and
a store of kflow's former pickled format is refused with an error that says to rebuild it. Readers open the folder
lazily, once per process, so a ``ClusterStore`` can be handed to DataLoader worker processes.

Writing is transactional (``staged_folder``): a store, or a whole build folder (raw CSVs + store + summary), is
written into a hidden staging folder ``.<name>.build-<pid>-<random>`` beside its final path and swapped into place
only when complete. On Linux the swap is one atomic exchange (``renameat2(RENAME_EXCHANGE)``), so a path that
held a store always holds a complete one (the old or the new); elsewhere it falls back to two renames. A build
killed at any moment leaves the previous folder (or nothing) plus a staging folder that the next build of the same
path removes (its process is gone), together with the ``.tmp-``/``.old-`` leftovers of earlier kflow versions.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from kflow.molecular.data.cluster import Cluster
from kflow.utils.io import loads_json, name_the_file, pid_alive
from kflow.utils.store import RecordStore, RecordStoreError, _close_cached, encode_record, write_record_store

__all__ = ["write_cluster_store", "ClusterStore", "SerializedCluster", "serialize_cluster", "CLUSTER_STORE_KIND",
           "CLUSTER_STORE_VERSION", "staged_folder", "clean_leftovers", "close_store"]

CLUSTER_STORE_KIND = "kflow-cluster-store"
CLUSTER_STORE_VERSION = 2  # 1 was the pickled format (no longer read)
DESCRIPTION = "cluster store"


class SerializedCluster(NamedTuple):
    """A cluster already encoded by a worker process (``encode_record(Cluster.to_numpy())``), ready to store."""

    blob: bytes
    name: str
    crystal: str


def serialize_cluster(record: dict) -> SerializedCluster:
    """A ``Cluster.to_numpy()`` record -> ``SerializedCluster`` (encoded without pickle; e.g. in a worker)."""
    return SerializedCluster(encode_record(record), record["name"], record["crystal"])


# ---------------------------------------------------------------------------------------- transactional folders
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _alive(pid: int) -> bool:
    return pid == os.getpid() or pid_alive(pid)


def clean_leftovers(final: str | os.PathLike) -> list[Path]:
    """Remove what interrupted builds of ``final`` left beside it: staging folders of processes that no longer
    run, and the ``.<name>.tmp-*`` / ``.<name>.old-*`` folders of earlier kflow versions. Returns what was removed."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(build-(\d+)-.+|tmp-.+|old-.+)$")
    for entry in final.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or (match.group(2) is not None and _alive(int(match.group(2)))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _swap_into_place(new: Path, final: Path, work: Path) -> None:
    """Make the complete folder ``new`` the folder at ``final`` with no moment where ``final`` is missing (where
    the platform allows); what was at ``final`` ends up inside ``work``."""
    if _exchange(new, final):
        return
    try:
        os.rename(new, final)  # nothing at final yet
        return
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise
    os.replace(final, work / "previous")  # fallback without an atomic exchange: a short window without final
    os.replace(new, final)


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Build a folder transactionally: yields a path (not yet existing) to create and fill; when the block ends
    without an exception that folder replaces ``final`` in one step. On an exception nothing changes at ``final``
    and the staging folder is removed; if the process is killed, the next ``staged_folder(final)`` (or
    ``clean_leftovers``) removes it. Leftovers of earlier interrupted builds are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-{os.getpid()}-", dir=final.parent))
    try:
        new = work / final.name
        try:
            yield new
        except OSError as err:  # e.g. a full disk found while a library closes a file: say which folder
            name_the_file(err, final, new)
            raise
        if not new.is_dir():
            raise FileNotFoundError(f"{new}: the staged build produced no folder")
        _swap_into_place(new, final, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def close_store(path: str | os.PathLike) -> None:
    """Close this process's cached reader of the store at ``path`` (before the folder is moved or replaced)."""
    _close_cached(Path(path))


def write_cluster_store(clusters: Iterable[Cluster | dict | SerializedCluster], path: str | os.PathLike,
                        meta: dict | None = None, map_size: int = 1 << 34, progress: bool = False,
                        total: int | None = None) -> Path:
    """Write clusters (``Cluster`` objects, their ``to_numpy()`` records or ``SerializedCluster``) into a new
    cluster store at ``path``, transactionally (``staged_folder``: an exception or a kill mid-way leaves the
    previous store, or nothing, at ``path``; an existing store is replaced in one atomic swap).

    ``meta`` (JSON-serialisable) is read after the last cluster, so a caller may complete it while the clusters
    stream by (e.g. a summary of rejected crystals)."""
    path = Path(path)
    names, crystals = [], []

    def records():
        iterator = clusters
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(clusters, total=total, desc=f"writing {path.name}", unit="cluster")
        for item in iterator:
            if not isinstance(item, SerializedCluster):
                item = serialize_cluster(item.to_numpy() if isinstance(item, Cluster) else item)
            names.append(item.name)
            crystals.append(item.crystal)
            yield item.blob

    def store_meta() -> dict:
        return {"kind": CLUSTER_STORE_KIND, "version": CLUSTER_STORE_VERSION, "count": len(names), "names": names,
                "crystals": crystals, **(meta or {})}

    with staged_folder(path) as staged:
        write_record_store(staged, records(), store_meta, map_size=map_size, description=DESCRIPTION)
        _close_cached(staged)
    _close_cached(path)  # a reader in this process still maps the replaced store
    return path


def _aligned(array: np.ndarray) -> np.ndarray:
    """Decoded arrays are views at arbitrary byte offsets: copy the (rare) misaligned ones before torch sees them."""
    return array if array.flags.aligned else np.require(array, requirements="A")


_RECORD_ARRAYS = {"atomic_numbers": ("iu", 1), "molecule_index": ("iu", 1), "initial_positions": ("f", 2),
                  "final_positions": ("f", 2)}  # field -> (dtype kinds, dimensions)


def _record_problem(record: dict) -> str:
    """What makes a decoded record unusable as a ``Cluster`` (a missing field, a wrong type or shape), or ""."""
    for name, (kinds, ndim) in _RECORD_ARRAYS.items():
        value = record.get(name)
        if not isinstance(value, np.ndarray):
            return f"field {name!r} is missing" if value is None else f"field {name!r} is not an array"
        if value.dtype.kind not in kinds or value.ndim != ndim:
            return f"field {name!r} has dtype {value.dtype} and {value.ndim} dimension(s)"
    n = len(record["atomic_numbers"])
    for name in ("molecule_index", "initial_positions", "final_positions"):
        if len(record[name]) != n or (record[name].ndim == 2 and record[name].shape[1] != 3):
            return f"field {name!r} has shape {record[name].shape} for {n} atoms"
    for name in ("name", "crystal"):
        if not isinstance(record.get(name), str):
            return f"field {name!r} is not a string"
    if "info" in record and not isinstance(record["info"], str):
        return "field 'info' is not a string"
    if "info" in record:
        try:
            if not isinstance(loads_json(record["info"]), dict):
                raise ValueError
        except ValueError:
            return "field 'info' is not a JSON object"
    return ""


class ClusterStore:
    """Read-only random access to a cluster store: ``len(store)``, ``store[i]`` (a ``Cluster``), ``store.names``,
    ``store.crystals``, ``store.meta`` (the metadata written with it, e.g. the build summary).

    Raises ``FileNotFoundError`` when ``path`` holds no store and ``RecordStoreError`` (a ``ValueError``) naming
    the folder for an incomplete, foreign or outdated one (including the former pickled format).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._records = RecordStore(self.path, description=DESCRIPTION)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: not a cluster store (no data.mdb); build it first") from None
        except RecordStoreError as err:
            raise RecordStoreError(f"{err} (cluster stores of kflow's former pickled format are no longer read; "
                                   "cached demo/CSD-500 stores are rebuilt automatically)") from err
        self.meta = self._records.meta
        kind, version = self.meta.get("kind"), self.meta.get("version")
        names, crystals = self.meta.get("names"), self.meta.get("crystals")
        if kind == CLUSTER_STORE_KIND and not (isinstance(names, list) and isinstance(crystals, list)
                                               and len(names) == len(crystals) == len(self._records)):
            raise RecordStoreError(f"{self.path}: the cluster store's metadata lists no name and crystal per cluster "
                                   "(damaged); rebuild it")
        if kind != CLUSTER_STORE_KIND:
            raise RecordStoreError(f"{self.path}: a kflow record store but not a cluster store (kind {kind!r})")
        if version != CLUSTER_STORE_VERSION:
            raise RecordStoreError(f"{self.path}: cluster store version {version} != {CLUSTER_STORE_VERSION}; "
                                   "rebuild it")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> Cluster:
        if not 0 <= i < len(self):
            raise IndexError(f"cluster {i} out of range for a store of {len(self)}")
        record = self._records[i]
        problem = _record_problem(record)
        if problem:
            raise RecordStoreError(f"{self.path}: cluster {i} is not a valid cluster record ({problem}); the store "
                                   "is damaged or was not written by kflow, rebuild it")
        return Cluster.from_numpy({k: _aligned(v) if isinstance(v, np.ndarray) else v for k, v in record.items()})

    @property
    def identity(self) -> dict:
        """What a resumed training compares (``core.training.data_identity``): ``content_key``, the build key of a
        store built from crystal files (their bytes, draws, seed, parameters, start preset), else a hash of the
        store's metadata (every cluster's name and crystal, count, provenance); ``start_preset``, the noise preset
        the starts were drawn with (None where the store does not record it)."""
        import hashlib
        import json

        key = self.meta.get("build_key")
        if not isinstance(key, str):
            blob = json.dumps(self.meta, sort_keys=True, default=str).encode("utf-8")
            key = hashlib.blake2b(blob, digest_size=8).hexdigest()
        noise = (self.meta.get("build_kwargs") or {}).get("noise") if isinstance(self.meta.get("build_kwargs"),
                                                                                   dict) else None
        preset = noise.get("name") if isinstance(noise, dict) else noise if isinstance(noise, str) else None
        return {"content_key": key, "start_preset": preset}

    @property
    def names(self) -> list[str]:
        return self.meta["names"]

    @property
    def crystals(self) -> list[str]:
        return self.meta["crystals"]

    def __repr__(self):
        return f"ClusterStore({str(self.path)!r}, {len(self)} clusters)"
