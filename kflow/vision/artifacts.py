"""Every on-disk format of the vision domain, read and written in one place.

Latent folder (``latent_dir``; by default the run folder itself, and shareable between runs):

    autoencoder.pt      the trained ConvAutoencoder (``ConvAutoencoder.save`` / ``load_autoencoder``)
    latents.lmdb/       the latent cache: a ``kflow.utils.store`` record store
    latents.json        what the folder's latents were made from (``ImageDataConfig.description()``) and their
                        fingerprint; a run asking for other latents in the same folder is refused, so runs that
                        share a latent folder share one latent space

Run folder (written by ``kflow.vision.workflow.train_image_model``):

    image_config.json   the run record: ``ImageModelConfig.to_dict()`` plus data set, latent space, latent_dir,
                        batch size, learning rate and seed (also the Trainer's structural config)
    pca.pt              the fitted PCA basis (PCA decomposition only)
    checkpoints/        the Trainer's checkpoints (``last.pt`` is loaded); metrics.jsonl / metrics.csv its logs

Samples (``sample_image.py`` writes, ``evaluate_image.py`` reads; ``default_samples_prefix`` names the sampling
settings, and an existing file is never replaced silently): ``<prefix>.npz`` with ``images`` float32
[N, C, H, W] in [0, 1] (uint8 [N, H, W] or [N, H, W, C] images are accepted when reading) and ``labels`` int64 [N]
(−1 for unconditional samples), beside a PNG grid ``<prefix>.png``; metrics go to ``<prefix>.metrics.json``.

The latent cache stores chunks of consecutive samples, record i = ``{"latents": [n, C, h, w] float32,
"labels": [n] int64}``, and metadata ``count``, ``chunks``, ``latent_shape`` plus whatever describes how the
latents were made; ``load_or_build_latent_cache`` rebuilds a cache whose description does not match.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kflow.core import PCADecomposition
from kflow.core.training import load_checkpoint
from kflow.utils.io import atomic_path, atomic_write_bytes, atomic_write_text, loads_json, safe_filename
from kflow.utils.store import RecordStore, RecordStoreError, write_record_store
from kflow.vision.autoencoders import DiffusersVAE, IdentityAutoencoder, load_autoencoder
from kflow.vision.config import ImageModelConfig, build_image_model

__all__ = ["IMAGE_CONFIG_FILE", "PCA_FILE", "CHECKPOINT_FILE", "AUTOENCODER_FILE", "LATENT_CACHE_DIR",
           "default_run_dir", "write_run_config", "read_run_config", "load_latent_space", "load_image_model",
           "LatentCacheError", "LATENT_RECORD_FILE", "read_latent_record", "write_latent_record", "latent_fingerprint",
           "write_latent_cache", "read_latent_cache", "load_or_build_latent_cache",
           "write_samples", "read_samples", "sample_paths", "default_samples_prefix", "write_metrics",
           "save_image_grid"]

IMAGE_CONFIG_FILE = "image_config.json"
PCA_FILE = "pca.pt"
CHECKPOINT_FILE = Path("checkpoints") / "last.pt"
AUTOENCODER_FILE = "autoencoder.pt"
LATENT_CACHE_DIR = "latents.lmdb"
LATENT_RECORD_FILE = "latents.json"
LATENT_CACHE_CHUNK = 1024  # latents per record of the latent cache
DEFAULT_PIXEL_SHAPE = (1, 32, 32)  # the identity latent space's image shape when a run does not record one


# ---------------------------------------------------------------------------------------------- run folders
def default_run_dir(dataset: str, decomposition: str, num_bands: int) -> Path:
    """runs/image_<data set>_<decomposition><bands>."""
    return Path("runs") / f"image_{Path(dataset).stem}_{decomposition}{num_bands}"


def write_run_config(run_dir: str | os.PathLike, record: dict) -> Path:
    """Write the run record (``ImageModelConfig.to_dict()`` merged with the run's data and training facts)."""
    path = Path(run_dir) / IMAGE_CONFIG_FILE
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


def read_run_config(run_dir: str | os.PathLike) -> tuple[ImageModelConfig, dict]:
    """(model config, the whole run record) of a run folder; ``FileNotFoundError`` when it is not one."""
    path = Path(run_dir) / IMAGE_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{Path(run_dir)}: not an image run folder (no {IMAGE_CONFIG_FILE})")
    try:
        record = loads_json(path.read_text())
        return ImageModelConfig.from_dict(record), record
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image run record ({err})") from err


def load_latent_space(autoencoder: str, latent_dir: str | os.PathLike, image_shape=None):
    """The latent space named by an ``ImageDataConfig.autoencoder`` spec: "identity" (of ``image_shape``),
    ``diffusers:<id>``, "conv" (``latent_dir``/autoencoder.pt) or a path to a saved autoencoder."""
    if autoencoder == "identity":
        return IdentityAutoencoder(image_shape or DEFAULT_PIXEL_SHAPE)
    if autoencoder.startswith("diffusers:"):
        return DiffusersVAE.from_pretrained(autoencoder.split(":", 1)[1])
    return load_autoencoder(Path(latent_dir) / AUTOENCODER_FILE if autoencoder == "conv" else autoencoder)


def load_image_model(run_dir: str | os.PathLike, use_ema: bool = True):
    """(dit, flow, autoencoder, run record) from a run folder written by ``train_image_model`` (EMA weights by
    default), rebuilt from its saved config by ``build_image_model``."""
    run = Path(run_dir)
    config, record = read_run_config(run)
    pca = PCADecomposition.load(run / PCA_FILE) if config.decomposition == "pca" else None
    dit, flow = build_image_model(config, pca=pca)
    load_checkpoint(run / CHECKPOINT_FILE, dit, use_ema=use_ema)
    ae = load_latent_space(record["autoencoder"], record.get("latent_dir", run), config.latent_shape)
    return dit.eval(), flow, ae.eval(), record


# ---------------------------------------------------------------------------------------------- latent cache
def latent_fingerprint(latent_dir: str | os.PathLike, description: dict) -> str:
    """A short content hash of a latent folder's latent space: the autoencoder file's bytes when there is one
    (a retrained autoencoder changes it), else the description."""
    import hashlib

    ae = Path(latent_dir) / AUTOENCODER_FILE
    data = ae.read_bytes() if ae.is_file() else json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def read_latent_record(latent_dir: str | os.PathLike) -> dict | None:
    """{"description": ..., "fingerprint": ...} of a latent folder, or None when it has none (yet)."""
    try:
        return loads_json((Path(latent_dir) / LATENT_RECORD_FILE).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ValueError(f"{Path(latent_dir) / LATENT_RECORD_FILE}: not readable ({err})") from err


def write_latent_record(latent_dir: str | os.PathLike, description: dict) -> dict:
    record = {"description": description, "fingerprint": latent_fingerprint(latent_dir, description)}
    atomic_write_text(Path(latent_dir) / LATENT_RECORD_FILE, json.dumps(record, indent=1))
    return record


class LatentCacheError(RecordStoreError):
    """A latent cache that exists but cannot be used (missing chunks, wrong counts, unreadable records)."""


def write_latent_cache(path: str | os.PathLike, latents: torch.Tensor, labels: torch.Tensor, meta: dict | None = None,
                       chunk: int = LATENT_CACHE_CHUNK) -> Path:
    """Write latents [N, C, h, w] and labels [N] as a latent cache at ``path`` (atomically; replaces an old one)."""
    if latents.shape[0] != labels.shape[0]:
        raise ValueError(f"{len(latents)} latents but {len(labels)} labels")
    if latents.shape[0] == 0:
        raise ValueError("refusing to write an empty latent cache")
    latents = latents.detach().cpu().float().numpy()
    labels = labels.detach().cpu().long().numpy()
    starts = range(0, len(latents), chunk)
    records = ({"latents": latents[s:s + chunk], "labels": labels[s:s + chunk]} for s in starts)
    return write_record_store(path, records, {**(meta or {}), "count": len(latents), "chunks": len(starts),
                                              "latent_shape": list(latents.shape[1:])}, description="latent cache")


def read_latent_cache(path: str | os.PathLike):
    """(latents [N, C, h, w] float32, labels [N] long, meta dict) from a cache folder.

    Raises ``FileNotFoundError`` when there is no cache and ``LatentCacheError`` naming the folder when it is
    incomplete, corrupt or of another format.
    """
    try:
        store = RecordStore(path, description="latent cache")
        parts = list(store)
    except RecordStoreError as err:
        raise LatentCacheError(str(err)) from err
    meta = store.meta
    try:
        latents = np.concatenate([p["latents"] for p in parts])
        labels = np.concatenate([p["labels"] for p in parts])
        count = meta["count"]
    except (KeyError, ValueError) as err:
        raise LatentCacheError(f"{path}: not a latent cache ({err!r})") from err
    if len(latents) != count or len(labels) != count:
        raise LatentCacheError(f"{path}: latent cache holds {len(latents)} latents and {len(labels)} labels, "
                               f"its metadata says {count}")
    return torch.from_numpy(latents), torch.from_numpy(labels), meta


def load_or_build_latent_cache(path: str | os.PathLike, meta: dict,
                               build: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
    """Read the cache at ``path`` if its metadata agrees with ``meta`` on every key of ``meta``; otherwise call
    ``build() -> (latents, labels)``, write the cache and return them. A cache that cannot be read (corrupt, or of
    an older format) is rebuilt with a warning. Returns (latents, labels, rebuilt: bool)."""
    try:
        latents, labels, stored = read_latent_cache(path)
        if all(stored.get(k) == v for k, v in meta.items()):
            return latents, labels, False
    except FileNotFoundError:
        pass
    except LatentCacheError as err:
        warnings.warn(f"rebuilding the latent cache: {err}")
    latents, labels = build()
    write_latent_cache(path, latents, labels, meta)
    return latents, labels, True


# ---------------------------------------------------------------------------------------------- samples
def sample_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """(samples .npz, PNG grid) for an output prefix (a trailing .npz or .png is dropped; other dots, as in
    samples_tau0.3, are part of the name)."""
    prefix = Path(prefix)
    if prefix.suffix in (".npz", ".png"):
        prefix = prefix.with_suffix("")
    return prefix.with_name(prefix.name + ".npz"), prefix.with_name(prefix.name + ".png")


def default_samples_prefix(run_dir: str | os.PathLike, num_samples: int, sampling, class_id: int | None = None) -> Path:
    """<run>/samples_<method><steps>_n<num>[_cfg<s>][_tau<τ>][_share<bands>][_class<c>][_seed<s>]: every sampling
    variant of a run gets its own file, so one never replaces another's samples."""
    steps = "-".join(map(str, sampling.steps_per_band)) + "perband" if sampling.steps_per_band else sampling.steps
    parts = [f"samples_{sampling.method}{steps}", f"n{num_samples}"]
    if sampling.cfg_scale != 1.0:
        parts.append(f"cfg{sampling.cfg_scale:g}")
    if sampling.condition_tau is not None:
        parts.append(f"tau{sampling.condition_tau:g}")
    if sampling.share_noise_bands is not None:
        parts.append("share" + "-".join(map(str, sampling.share_noise_bands)))
    if class_id is not None:
        parts.append(f"class{class_id}")
    if sampling.seed:
        parts.append(f"seed{sampling.seed}")
    return Path(run_dir) / safe_filename("_".join(parts))


def write_samples(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor | None) -> Path:
    """Images [N, C, H, W] in [0, 1] and labels [N] (None: unconditional, stored as −1) as a compressed .npz."""
    labels = torch.full((len(images),), -1) if labels is None else labels
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images.cpu().numpy().astype(np.float32), labels=labels.cpu().numpy())
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def read_samples(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [N, C, H, W] float in [0, 1], labels [N] or None) from a samples .npz (see the module docstring).
    Anything else (a missing or foreign file, object arrays, wrong shapes, NaN, labels that do not match) raises
    one line naming the file, so an evaluation can check its inputs before computing any features."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no samples file (.npz written by sample_image.py)")
    if not zipfile.is_zipfile(path):  # np.load would try a pickle and speak of "pickled (object) data"
        raise ValueError(f"{path}: not a samples .npz (not a zip archive; .npz files are written by sample_image.py)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data:
                raise ValueError(f"{path}: no 'images' array (holds {', '.join(data.files) or 'nothing'})")
            images = data["images"]
            labels = data["labels"] if "labels" in data else None
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a samples .npz ({type(err).__name__}: {err})") from None
    _check_samples(path, images, labels)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
        if images.ndim == 3:
            images = images[:, None]
        elif images.shape[-1] in (1, 3):
            images = images.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(images)), None if labels is None else torch.from_numpy(labels)


def _check_samples(path: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    if images.dtype.kind not in "uif" or images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(f"{path}: 'images' is {images.dtype} of shape {images.shape}; expected [N, C, H, W] floats "
                         "in [0, 1] or uint8 [N, H, W(, C)] with N > 0")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise ValueError(f"{path}: 'images' holds NaN or infinite values")
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (len(images),)):
        raise ValueError(f"{path}: 'labels' is {labels.dtype} of shape {labels.shape}; expected {len(images)} "
                         "integers, one per image")


def write_metrics(path: str | os.PathLike, metrics: dict) -> Path:
    """Evaluation results as JSON (written atomically)."""
    atomic_write_text(path, json.dumps(metrics, indent=1))
    return Path(path)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Images [N, C, H, W] in [0, 1] (C = 1 or 3) -> PNG grid with 1-pixel white borders, written atomically."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + 2), nrow * (w + 2))
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = images[i]
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(arr[..., 0] if c == 1 else arr).save(tmp, format="PNG")
    return Path(path)
