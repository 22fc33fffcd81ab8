"""The molecular cluster store: ``Cluster`` samples saved to and read from a pickle-free LMDB record store.

A cluster store is a ``kflow.utils.store`` record store (a folder) whose record ``i`` is ``Cluster.to_numpy()``
of the i-th cluster (integer and float arrays plus the ``name`` and ``crystal`` strings) and whose JSON metadata
holds the kind and version of the cluster store, the count, every cluster's name and crystal (so splits need not
decode records) and the builder's provenance. Nothing is pickled: reading a store never executes code from it, and
a store of kflow's former pickled format is refused with an error that says to rebuild it. Writing is atomic
(temporary folder, then rename); readers open the folder lazily, once per process, so a ``ClusterStore`` can be
handed to DataLoader worker processes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, NamedTuple

import numpy as np

from kflow.molecular.cluster import Cluster
from kflow.utils.store import RecordStore, RecordStoreError, encode_record, write_record_store

if TYPE_CHECKING:
    from kflow.molecular.datasets import ClusterDataset

__all__ = ["write_cluster_store", "ClusterStore", "SerializedCluster", "serialize_cluster", "CLUSTER_STORE_KIND",
           "CLUSTER_STORE_VERSION"]

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


def write_cluster_store(clusters: Iterable[Cluster | dict | SerializedCluster], path: str | os.PathLike,
                        meta: dict | None = None, map_size: int = 1 << 34, progress: bool = False,
                        total: int | None = None) -> Path:
    """Write clusters (``Cluster`` objects, their ``to_numpy()`` records or ``SerializedCluster``) into a new
    cluster store at ``path`` (atomically: temp folder, then rename; an exception mid-way leaves nothing behind).

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

    return write_record_store(path, records(), store_meta, map_size=map_size, description=DESCRIPTION)


def _aligned(array: np.ndarray) -> np.ndarray:
    """Decoded arrays are views at arbitrary byte offsets: copy the (rare) misaligned ones before torch sees them."""
    return array if array.flags.aligned else np.require(array, requirements="A")


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
        return Cluster.from_numpy({k: _aligned(v) if isinstance(v, np.ndarray) else v for k, v in record.items()})

    @property
    def names(self) -> list[str]:
        return self.meta["names"]

    @property
    def crystals(self) -> list[str]:
        return self.meta["crystals"]

    def splits(self, seed: int = 0) -> dict[str, "ClusterDataset"]:
        """Train/valid/test ``ClusterDataset`` views, split 80/10/10 by crystal with ``seed``."""
        from kflow.molecular.datasets import ClusterDataset

        return {name: ClusterDataset(self, split=name, seed=seed) for name in ("train", "valid", "test")}

    def __repr__(self):
        return f"ClusterStore({str(self.path)!r}, {len(self)} clusters)"
