"""Latents encoded once and cached in LMDB.

Layout of a cache folder (an LMDB environment): chunk ``b"%06d" % i`` holds a pickled pair
``(latents [n, C, h, w] float32, labels [n] int64)`` for consecutive samples, and ``b"__meta__"`` holds a dict with
``count``, ``chunks``, ``latent_shape`` and whatever describes how the latents were made (data set, autoencoder,
number of images). The folder is built under a temporary name and renamed into place, so a crash never leaves a
half-written cache behind; ``load_or_build_latent_cache`` rebuilds a cache whose description does not match.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kflow.utils.io import atomic_path

__all__ = ["write_latent_cache", "read_latent_cache", "load_or_build_latent_cache", "LatentCacheError"]

_META_KEY = b"__meta__"


class LatentCacheError(ValueError):
    """A latent cache that exists but cannot be used (missing chunks, wrong counts, unreadable records)."""


def write_latent_cache(path: str | os.PathLike, latents: torch.Tensor, labels: torch.Tensor, meta: dict | None = None,
                       chunk: int = 1024) -> Path:
    """Write latents [N, C, h, w] and labels [N] to an LMDB folder at ``path`` (atomically; replaces an old one)."""
    import lmdb

    if latents.shape[0] != labels.shape[0]:
        raise ValueError(f"{len(latents)} latents but {len(labels)} labels")
    if latents.shape[0] == 0:
        raise ValueError("refusing to write an empty latent cache")
    latents = latents.detach().cpu().float().numpy()
    labels = labels.detach().cpu().long().numpy()
    num_chunks = (len(latents) + chunk - 1) // chunk
    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        env = lmdb.open(str(tmp), map_size=max(1 << 24, 2 * latents.nbytes + labels.nbytes + (1 << 20)),
                        subdir=True, lock=False)
        try:
            with env.begin(write=True) as txn:
                for i in range(num_chunks):
                    part = slice(i * chunk, (i + 1) * chunk)
                    txn.put(b"%06d" % i, pickle.dumps((latents[part], labels[part]), protocol=4))
                txn.put(_META_KEY, pickle.dumps({**(meta or {}), "count": len(latents), "chunks": num_chunks,
                                                 "latent_shape": list(latents.shape[1:])}))
            env.sync()
        finally:
            env.close()
    return path


def read_latent_cache(path: str | os.PathLike):
    """(latents [N, C, h, w] float32, labels [N] long, meta dict) from a cache folder.

    Raises ``FileNotFoundError`` when there is no cache and ``LatentCacheError`` naming the folder when it is
    incomplete or corrupt.
    """
    import lmdb

    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise FileNotFoundError(f"{path}: no latent cache (expected an LMDB folder with data.mdb)")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    except lmdb.Error as err:
        raise LatentCacheError(f"{path}: cannot open the latent cache ({err})") from err
    try:
        with env.begin() as txn:
            raw = txn.get(_META_KEY)
            if raw is None:
                raise LatentCacheError(f"{path}: latent cache has no metadata record (incomplete build?)")
            meta = pickle.loads(raw)
            parts = []
            for i in range(meta["chunks"]):
                record = txn.get(b"%06d" % i)
                if record is None:
                    raise LatentCacheError(f"{path}: latent cache is missing chunk {i} of {meta['chunks']}")
                parts.append(pickle.loads(record))
    except (pickle.UnpicklingError, EOFError, KeyError, lmdb.Error) as err:
        raise LatentCacheError(f"{path}: corrupt latent cache ({err!r})") from err
    finally:
        env.close()
    latents = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if len(latents) != meta["count"] or len(labels) != meta["count"]:
        raise LatentCacheError(f"{path}: latent cache holds {len(latents)} latents and {len(labels)} labels, "
                               f"its metadata says {meta['count']}")
    return torch.from_numpy(latents), torch.from_numpy(labels), meta


def load_or_build_latent_cache(path: str | os.PathLike, meta: dict,
                               build: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
    """Read the cache at ``path`` if its metadata agrees with ``meta`` on every key of ``meta``; otherwise call
    ``build() -> (latents, labels)``, write the cache and return them. Returns (latents, labels, rebuilt: bool)."""
    try:
        latents, labels, stored = read_latent_cache(path)
        if all(stored.get(k) == v for k, v in meta.items()):
            return latents, labels, False
    except FileNotFoundError:
        pass
    latents, labels = build()
    write_latent_cache(path, latents, labels, meta)
    return latents, labels, True
