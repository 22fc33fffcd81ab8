"""Image K-Flow end to end as library functions (scripts/train_image.py and sample_image.py wrap these)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kflow.core import BandSchedule, KFlow, PCADecomposition
from kflow.core.training import Trainer, load_checkpoint
from kflow.utils.io import atomic_write_text
from kflow.core import distributed as dist_utils
from kflow.vision.autoencoders import DiffusersVAE, IdentityAutoencoder, load_autoencoder, train_autoencoder
from kflow.vision.data import load_image_dataset, pad_to
from kflow.vision.models import DiT_models
from kflow.vision.latent_cache import load_or_build_latent_cache, read_latent_cache
from kflow.vision.pipeline import ImageFlowLoss, build_decomposition, choose_wavelet, encode_dataset

__all__ = ["prepare_latents", "train_image_model", "load_image_model"]


def prepare_latents(dataset: str, out_dir: str | os.PathLike, autoencoder: str = "conv", ae_steps: int = 1500,
                    seed: int = 0, data_root: str | None = None, progress: bool = True, max_images: int | None = None,
                    ae_width: int = 32):
    """Images -> (trained or loaded) autoencoder -> latents cached in LMDB under out_dir. Returns
    (autoencoder, latents [N, C, h, w], labels [N]). ``max_images`` keeps the first images only.

    ``autoencoder``: "conv" (trained here on the training images and saved as out_dir/autoencoder.pt, reused when
    present), "identity" (pixel space), a saved kflow autoencoder file, or ``diffusers:<folder or hub id>``
    (Stable Diffusion's VAE). Under torchrun, rank 0 trains and encodes while the other ranks wait, then read.
    """
    out = Path(out_dir)
    ae_path, cache = out / "autoencoder.pt", out / "latents.lmdb"
    description = {"dataset": str(dataset), "autoencoder": autoencoder, "max_images": max_images,
                   "ae_steps": ae_steps, "ae_width": ae_width, "seed": seed}
    if dist_utils.is_main_process():
        ae, latents, labels = _prepare_latents_here(dataset, ae_path, cache, description, data_root, progress)
    dist_utils.barrier()
    if not dist_utils.is_main_process():
        ae = _load_latent_space(autoencoder, ae_path)
        latents, labels, _ = read_latent_cache(cache)
    return ae, latents, labels


def _load_latent_space(autoencoder: str, ae_path: Path, image_shape=None):
    if autoencoder == "identity":
        return IdentityAutoencoder(image_shape or (1, 32, 32))
    if autoencoder.startswith("diffusers:"):
        return DiffusersVAE.from_pretrained(autoencoder.split(":", 1)[1])
    return load_autoencoder(ae_path if autoencoder == "conv" else autoencoder)


def _prepare_latents_here(dataset, ae_path, cache, description, data_root, progress):
    images, labels = load_image_dataset(dataset, "train", data_root)
    if description["max_images"]:
        images, labels = images[:description["max_images"]], labels[:description["max_images"]]
    if images.shape[-1] == 28:
        images = pad_to(images, 32)
    autoencoder = description["autoencoder"]
    if autoencoder == "conv" and not ae_path.exists():
        downsample = 2 if images.shape[-1] >= 32 else 1
        ae = train_autoencoder(images, steps=description["ae_steps"], seed=description["seed"], progress=progress,
                               downsample=downsample, width=description["ae_width"])
        ae.save(ae_path)
    else:
        ae = _load_latent_space(autoencoder, ae_path, tuple(images.shape[1:]))
    if isinstance(ae, DiffusersVAE):
        ae.image_size = images.shape[-1]
    latents, labels, _ = load_or_build_latent_cache(cache, description, lambda: (encode_dataset(ae, images), labels))
    return ae, latents, labels


def train_image_model(dataset: str, out_dir: str | os.PathLike, decomposition: str = "fourier", num_bands: int = 2,
                      model: str = "DiT-T/2", steps: int = 2000, batch_size: int = 64, lr: float = 3e-4,
                      ema_decay: float = 0.999, seed: int = 0, class_conditional: bool = True,
                      autoencoder: str = "conv", order: str = "low_to_high", resume: bool = False,
                      checkpoint_every: int = 500, progress: bool = True, data_root: str | None = None,
                      ae_steps: int = 1500, wavelet: str | None = None, latent_dir: str | os.PathLike | None = None,
                      max_images: int | None = None, ae_width: int = 32, gradient_checkpointing: bool = False):
    """Train a DiT with K-Flow on cached latents through ``kflow.core.training.Trainer``; returns (trainer, flow).

    ``latent_dir`` (default ``out_dir``) holds the autoencoder and the latent cache, so several runs can share them.
    ``decomposition="none"`` with ``num_bands=1`` is the flow-matching baseline; ``wavelet=None`` picks the longest
    of db6/db4/db2/haar the latent grid admits (see ``choose_wavelet``). The run folder gets image_config.json,
    pca.pt (PCA only; reused on resume), the Trainer's checkpoints and metric logs.
    """
    out = Path(out_dir)
    latent_dir = Path(latent_dir or out)
    dist_utils.setup_distributed()  # under torchrun: join the process group first, so only rank 0 prepares latents
    ae, latents, labels = prepare_latents(dataset, latent_dir, autoencoder, ae_steps, seed, data_root, progress,
                                          max_images, ae_width)
    latent_shape = tuple(latents.shape[1:])
    if decomposition == "wavelet":
        wavelet = wavelet or choose_wavelet(min(latent_shape[1:]), num_bands)
    if decomposition == "pca" and resume and (out / "pca.pt").exists():
        decomp = PCADecomposition.load(out / "pca.pt")
    else:
        decomp = build_decomposition(decomposition, latent_shape, num_bands, fit_data=latents, wavelet=wavelet)
        if decomposition == "pca" and dist_utils.is_main_process():
            decomp.save(out / "pca.pt")
    flow = KFlow(decomp, BandSchedule(num_bands, order=order))
    num_classes = int(labels.max()) + 1 if class_conditional else 0
    if model not in DiT_models:
        raise ValueError(f"unknown model {model!r}; choose from {sorted(DiT_models)}")
    torch.manual_seed(seed)
    dit = DiT_models[model](input_size=latent_shape[-1], in_channels=latent_shape[0], num_classes=num_classes,
                            gradient_checkpointing=gradient_checkpointing)
    config = {"dataset": dataset, "decomposition": decomposition, "num_bands": num_bands, "model": model,
              "latent_shape": list(latent_shape), "num_classes": num_classes, "order": order, "wavelet": wavelet,
              "autoencoder": autoencoder, "latent_dir": str(latent_dir), "batch_size": batch_size, "lr": lr,
              "seed": seed}
    if dist_utils.is_main_process():
        atomic_write_text(out / "image_config.json", json.dumps(config, indent=1))
    data = torch.utils.data.TensorDataset(latents, labels)
    trainer = Trainer(dit, ImageFlowLoss(flow, class_conditional), data,
                      collate_fn=lambda items: (torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])),
                      batch_size=batch_size, lr=lr, max_steps=steps, out_dir=out, config=config, ema_decay=ema_decay,
                      checkpoint_every=checkpoint_every, seed=seed, progress=progress, warmup_steps=min(100, steps // 10))
    trainer.fit(resume=resume)
    return trainer, flow


def load_image_model(run_dir: str | os.PathLike, use_ema: bool = True):
    """(dit, flow, autoencoder, config) from a run folder written by ``train_image_model`` (EMA weights by
    default)."""
    run = Path(run_dir)
    if not (run / "image_config.json").is_file():
        raise FileNotFoundError(f"{run}: not an image run folder (no image_config.json)")
    config = json.loads((run / "image_config.json").read_text())
    shape = tuple(config["latent_shape"])
    dit = DiT_models[config["model"]](input_size=shape[-1], in_channels=shape[0], num_classes=config["num_classes"])
    load_checkpoint(run / "checkpoints" / "last.pt", dit, use_ema=use_ema)
    if config["decomposition"] == "pca":
        decomp = PCADecomposition.load(run / "pca.pt")
    else:
        decomp = build_decomposition(config["decomposition"], shape, config["num_bands"], wavelet=config["wavelet"])
    flow = KFlow(decomp, BandSchedule(config["num_bands"], order=config["order"]))
    ae = _load_latent_space(config["autoencoder"], Path(config.get("latent_dir", run)) / "autoencoder.pt", shape)
    return dit.eval(), flow, ae.eval(), config
