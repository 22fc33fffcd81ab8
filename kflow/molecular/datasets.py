"""Splits and datasets: crystal-level train/valid/test splits and the torch_geometric datasets over cluster stores.

``ClusterDataset`` views a ``ClusterStore`` (optionally one split of it); ``CODCluster17Dataset`` is the same over
the published COD-Cluster17 raw folder, preprocessed once into a store by ``kflow.molecular.sources``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch_geometric.data import Dataset

from kflow.molecular.cluster import Cluster
from kflow.molecular.sources import COD_SUBSETS, cod_cluster17_ids, cod_store_key, preprocess_cod_cluster17
from kflow.molecular.store import ClusterStore

__all__ = ["split_indices", "ClusterDataset", "CODCluster17Dataset", "RedrawnStarts", "redraw_start"]


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


class CODCluster17Dataset(ClusterDataset):
    """COD-Cluster17 in its published raw format, preprocessed once into a cluster store.

    Expects ``root/raw/InitialPositions/<id>_cluster16_noised.csv`` and ``root/raw/FinalPositions/<id>_cluster16.csv``.
    ``subset``: "5k", "10k" (id lists in AssembleFlow's layout ``root/processed_5000/valid_idx.txt`` /
    ``processed_10000/valid_idx.txt``, or kflow's ``root/raw/subset_5k.txt`` / ``subset_10k.txt``; one id per
    line), "all", or a path to an id list, so AssembleFlow's ``COD/`` folder works as it is. Missing raw data or
    lists are downloaded from the hub dataset ``chao1224/CrystalFlow`` (only the raw CSVs and the id lists of its
    folder ``COD/``) when online; offline, the error says where to put the files and where the lists come from.
    The store ``root/processed/<subset>.lmdb`` is rebuilt when the ids or any CSV pair change (``cod_store_key``).
    """

    def __init__(self, root: str | os.PathLike = "data/COD-Cluster17", subset: str = "10k", split: str | None = None,
                 seed: int = 0, num_workers: int | None = None, download: bool = True, progress: bool = True,
                 transform: Callable | None = None, rigid_tolerance: float = 1e-3):
        root = Path(root)
        ids = cod_cluster17_ids(root, subset, download)
        tag = subset if subset in (*COD_SUBSETS, "all") else Path(subset).stem
        store_path = root / "processed" / f"{tag}.lmdb"
        key = cod_store_key(root, ids, rigid_tolerance)
        try:
            current = ClusterStore(store_path).meta.get("build_key") == key
        except (FileNotFoundError, ValueError):
            current = False
        if not current:
            preprocess_cod_cluster17(root, ids, store_path, num_workers, progress, rigid_tolerance)
        super().__init__(store_path, split=split, seed=seed, transform=transform)


REDRAW_SEED_STRIDE = 1_000_003


def redraw_start(cluster: Cluster, noise, seed: int) -> Cluster:
    """A copy of ``cluster`` with a new start drawn by ``noise`` (a ``NoiseModel`` or preset name) from its final
    cluster, seeded by ``seed``; as ``crystals.build_cluster`` does, both are then shifted so the start's atoms are
    centred. The crystal's density comes from ``info["volume_per_molecule"]`` (stores built before it was recorded
    fall back to the sphere enclosing the final centroids, ``NoiseModel.apply``)."""
    from kflow.molecular.crystals import noise_model

    m = cluster.num_molecules
    order = torch.argsort(cluster.molecule_index, stable=True)  # molecule-major: molecule 0 (central) first
    final = cluster.final_positions.double()[order].reshape(m, -1, 3)  # [M, P, 3]: equal-size copies
    gen = torch.Generator().manual_seed(int(seed))
    initial = torch.empty(order.shape[0], 3, dtype=final.dtype)
    initial[order] = noise_model(noise).apply(final, gen, cluster.info.get("volume_per_molecule")).reshape(-1, 3)
    shift = initial.mean(0)
    dtype = cluster.initial_positions.dtype
    out = Cluster(cluster.atomic_numbers, cluster.molecule_index, (initial - shift).to(dtype),
                  (cluster.final_positions.double() - shift).to(dtype), cluster.name, cluster.crystal,
                  dict(cluster.info))
    out.info["start_seed"] = int(seed)
    return out


class RedrawnStarts(Dataset):
    """Training view of a ``ClusterDataset`` whose starts are drawn anew every epoch from the stored crystal
    clusters, so a crystal gives unlimited (start, crystal) pairs instead of the few drawn when the store was built.

    Item ``i`` of epoch ``e`` gets the start seeded by (``seed``, e, store index of ``i``): reproducible, and a
    resumed run sees the starts the uninterrupted one saw (the ``Trainer`` calls ``set_epoch`` before each epoch).
    Validation and test splits keep their stored, fixed starts. ``noise``: the start model (``crystals.NoiseModel``
    or a preset name); None (default): each cluster's own, recorded in its ``info["noise"]`` when it was built.
    """

    def __init__(self, dataset: ClusterDataset, noise=None, seed: int = 0):
        super().__init__(None)
        from kflow.molecular.crystals import noise_model

        self.dataset, self.seed, self.epoch = dataset, int(seed), 0
        self.noise = None if noise is None else noise_model(noise)
        self.store = dataset.store  # the data identity the Trainer checks on resume
        if self.noise is None and len(dataset) and not isinstance(dataset.cluster(0).info.get("noise"), dict):
            raise ValueError(f"{dataset.store.path}: the clusters record no start model (info['noise']), so starts "
                             "cannot be redrawn; pass noise= (a NoiseModel or preset name)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def start_seed(self, idx: int) -> int:
        return (self.seed * REDRAW_SEED_STRIDE + self.epoch) * REDRAW_SEED_STRIDE + self.dataset.indices_[idx]

    def len(self) -> int:
        return len(self.dataset)

    def cluster(self, idx: int) -> Cluster:
        from kflow.molecular.crystals import NoiseModel

        stored = self.dataset.cluster(idx)
        noise = self.noise or NoiseModel(**stored.info["noise"])
        return redraw_start(stored, noise, self.start_seed(idx))

    def get(self, idx: int):
        return self.cluster(idx).to_data()

    @property
    def crystals(self) -> list[str]:
        return self.dataset.crystals
