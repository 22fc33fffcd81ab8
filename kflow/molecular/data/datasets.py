"""Splits and datasets: crystal-level train/valid/test splits and the torch_geometric datasets over cluster stores.

``ClusterDataset`` views a ``ClusterStore`` (optionally one split of it); ``CODCluster17Dataset`` is the same over
the published COD-Cluster17 raw folder, preprocessed once into a store by ``kflow.molecular.data.sources``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch_geometric.data import Dataset

from kflow.molecular.data.cluster import Cluster
from kflow.molecular.data.cod import COD_SUBSETS, cod_cluster17_ids, cod_store_key, preprocess_cod_cluster17
from kflow.molecular.data.store import ClusterStore

__all__ = ["split_indices", "ClusterDataset", "CODCluster17Dataset", "RedrawnStarts", "redraw_start", "StartHands",
           "set_start_hands", "START_MIRRORS", "store_splits"]

# Handedness of a cluster's start copies: as in the crystal (each start copy a proper pose of its crystal copy), or
# made from start molecule 0 alone as ``kflow assemble`` makes a lone molecule's copies (``assemble.MIRROR_MODES``):
# all one hand ("none") or the odd-numbered copies mirrored ("half").
START_MIRRORS = ("crystal", "none", "half")


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


def store_splits(store, seed: int = 0) -> dict[str, ClusterDataset]:
    """Train/valid/test ``ClusterDataset`` views of a store, split 80/10/10 by crystal with ``seed`` (was the method
    ``ClusterStore.splits``: the store sits below the data sets)."""
    return {name: ClusterDataset(store, split=name, seed=seed) for name in ("train", "valid", "test")}


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
    from kflow.molecular.data.starts import noise_model

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
    out.info.pop("start_mirror", None)  # the new start has the crystal's hands again
    return out


def _mirrored_copies(mirror: str, m: int) -> torch.Tensor:
    """[M] bool: the copies ``set_start_hands`` mirrors, the same as ``assemble.starts.mirrored_copies`` (odd ones
    for "half")."""
    return (torch.arange(m) % 2 == 1) if mirror == "half" else torch.zeros(m, dtype=torch.bool)


def set_start_hands(cluster: Cluster, mirror: str) -> Cluster:
    """A copy of ``cluster`` whose start copies have the handedness ``kflow assemble`` gives a lone molecule.

    A crystal with inversion or mirror symmetry holds both hands of its conformer, and a start drawn from it keeps
    them; a lone molecule's start has only the hands ``mirror`` makes. So that training and tests see the same mix:
    "crystal" returns ``cluster`` itself; "none" and "half" rebuild every start copy i from start molecule 0
    (centred), inverted through its centroid (p -> −p, a mirror image) for the odd i under "half", and put it at
    copy i's start centroid with the proper rotation that best superposes it on the stored copy i (Kabsch). Start
    centroids and the final (crystal) positions are unchanged, and a copy whose hand already agrees is reproduced
    to float rounding. Records ``info["start_mirror"]``.
    """
    from kflow.molecular.geometry import kabsch

    if mirror not in START_MIRRORS:
        raise ValueError(f"start mirror must be one of {START_MIRRORS}, got {mirror!r}")
    if mirror == "crystal":
        return cluster
    m = cluster.num_molecules
    counts = torch.bincount(cluster.molecule_index, minlength=m)
    order = torch.argsort(cluster.molecule_index, stable=True)  # molecule-major: molecule 0 first
    z = cluster.atomic_numbers[order]
    if (counts != counts[0]).any() or (z.reshape(m, -1) != z[:counts[0]]).any():
        raise ValueError(f"cluster {cluster.name!r}: start hands need copies of one molecule in one atom order "
                         f"(atoms per molecule {counts.tolist()})")
    start = cluster.initial_positions.double()[order].reshape(m, -1, 3)  # [M, P, 3]
    centroids = start.mean(1)  # [M, 3]
    stored = start - centroids[:, None]  # [M, P, 3] centred stored copies
    sign = 1.0 - 2.0 * _mirrored_copies(mirror, m).double()  # [M]: −1 inverts the copy
    body = sign[:, None, None] * stored[0]  # [M, P, 3] molecule 0, inverted where mirrored
    rot, _ = kabsch(body, stored, translate=False)  # [M, 3, 3] proper
    rebuilt = torch.einsum("mij,mpj->mpi", rot, body) + centroids[:, None]  # [M, P, 3]
    initial = torch.empty(order.shape[0], 3, dtype=torch.float64)
    initial[order] = rebuilt.reshape(-1, 3)
    out = Cluster(cluster.atomic_numbers, cluster.molecule_index, initial.to(cluster.initial_positions.dtype),
                  cluster.final_positions, cluster.name, cluster.crystal, dict(cluster.info))
    out.info["start_mirror"] = mirror
    return out


class RedrawnStarts(Dataset):
    """Training view of a ``ClusterDataset`` whose starts are drawn anew every epoch from the stored crystal
    clusters, so a crystal gives unlimited (start, crystal) pairs instead of the few drawn when the store was built.

    Item ``i`` of epoch ``e`` gets the start seeded by (``seed``, e, store index of ``i``): reproducible, and a
    resumed run sees the starts the uninterrupted one saw (the ``Trainer`` calls ``set_epoch`` before each epoch).
    Validation and test splits keep their stored, fixed starts. ``noise``: the start model (``crystals.NoiseModel``
    or a preset name); None (default): each cluster's own, recorded in its ``info["noise"]`` when it was built.
    ``mirror``: the hands of the start copies, set after the redraw (``set_start_hands``; "crystal": as drawn).
    """

    def __init__(self, dataset: ClusterDataset, noise=None, seed: int = 0, mirror: str = "crystal"):
        super().__init__(None)
        from kflow.molecular.data.starts import noise_model

        if mirror not in START_MIRRORS:
            raise ValueError(f"start mirror must be one of {START_MIRRORS}, got {mirror!r}")
        self.dataset, self.seed, self.epoch, self.mirror = dataset, int(seed), 0, mirror
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
        from kflow.molecular.data.starts import NoiseModel

        stored = self.dataset.cluster(idx)
        noise = self.noise or NoiseModel(**stored.info["noise"])
        return set_start_hands(redraw_start(stored, noise, self.start_seed(idx)), self.mirror)

    def get(self, idx: int):
        return self.cluster(idx).to_data()

    @property
    def crystals(self) -> list[str]:
        return self.dataset.crystals


def with_start_hands(dataset, mirror: str):
    """``dataset`` as a model trained with ``start_mirror = mirror`` sees its starts: viewed with ``StartHands``
    unless ``mirror`` is "crystal" (the starts as stored). The truth stays the crystal."""
    return dataset if mirror == "crystal" else StartHands(dataset, mirror)


class StartHands(Dataset):
    """View of a data set (``ClusterDataset``, ``RedrawnStarts``, ...) whose starts get the hands ``mirror``
    (``set_start_hands``): the fixed validation and test starts of a model trained on them. Wrap after selecting
    clusters (``study.first_clusters``); ``set_epoch``, ``store`` and ``crystals`` pass through."""

    def __init__(self, dataset, mirror: str):
        super().__init__(None)
        if mirror not in START_MIRRORS:
            raise ValueError(f"start mirror must be one of {START_MIRRORS}, got {mirror!r}")
        self.dataset, self.mirror = dataset, mirror
        self.store = getattr(dataset, "store", None)  # the data identity the Trainer checks on resume

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def len(self) -> int:
        return len(self.dataset)

    def cluster(self, idx: int) -> Cluster:
        return set_start_hands(self.dataset.cluster(idx), self.mirror)

    def get(self, idx: int):
        return self.cluster(idx).to_data()

    @property
    def crystals(self) -> list[str]:
        return self.dataset.crystals
