"""Image K-Flow end to end as library functions (scripts/train_image.py and sample_image.py wrap these)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kflow.core import BandSchedule, KFlow
from kflow.core.training import Trainer, load_checkpoint
from kflow.utils.io import atomic_write_text
from kflow.vision.autoencoders import IdentityAutoencoder, load_autoencoder, train_autoencoder
from kflow.vision.data import load_image_dataset, pad_to
from kflow.vision.models import DiT_models
from kflow.vision.pipeline import (ImageFlowLoss, build_decomposition, encode_dataset, read_latent_cache,
                                   write_latent_cache)

__all__ = ["prepare_latents", "train_image_model", "load_image_model"]


def prepare_latents(dataset: str, out_dir: str | os.PathLike, autoencoder: str = "conv", ae_steps: int = 1500,
                    seed: int = 0, data_root: str | None = None, progress: bool = True, max_images: int | None = None,
                    ae_width: int = 32):
    """Images -> (trained or loaded) autoencoder -> latents cached in LMDB under out_dir. Returns
    (autoencoder, latents [N, C, h, w], labels [N]). ``max_images`` keeps the first images only."""
    out = Path(out_dir)
    images, labels = load_image_dataset(dataset, "train", data_root)
    if max_images:
        images, labels = images[:max_images], labels[:max_images]
    if images.shape[-1] == 28:
        images = pad_to(images, 32)
    ae_path, cache = out / "autoencoder.pt", out / "latents.lmdb"
    if autoencoder == "identity":
        ae = IdentityAutoencoder(images.shape[1:])
    elif autoencoder == "conv":
        if ae_path.exists():
            ae = load_autoencoder(ae_path)
        else:
            downsample = 2 if images.shape[-1] >= 32 else 1
            ae = train_autoencoder(images, steps=ae_steps, seed=seed, progress=progress, downsample=downsample,
                                   width=ae_width)
            ae.save(ae_path)
    else:
        ae = load_autoencoder(autoencoder)
    if (cache / "data.mdb").exists():
        latents, labels, _ = read_latent_cache(cache)
    else:
        latents = encode_dataset(ae, images)
        write_latent_cache(cache, latents, labels, {"dataset": dataset, "autoencoder": autoencoder})
    return ae, latents, labels


def train_image_model(dataset: str, out_dir: str | os.PathLike, decomposition: str = "fourier", num_bands: int = 2,
                      model: str = "DiT-T/2", steps: int = 2000, batch_size: int = 64, lr: float = 3e-4,
                      ema_decay: float = 0.999, seed: int = 0, class_conditional: bool = True,
                      autoencoder: str = "conv", order: str = "low_to_high", resume: bool = False,
                      checkpoint_every: int = 500, progress: bool = True, data_root: str | None = None,
                      ae_steps: int = 1500, wavelet: str = "haar", latent_dir: str | os.PathLike | None = None,
                      max_images: int | None = None, ae_width: int = 32):
    """Train a DiT with K-Flow on cached latents; returns (trainer, flow). ``latent_dir`` (default ``out_dir``)
    holds the autoencoder and the latent cache, so several runs can share them."""
    out = Path(out_dir)
    latent_dir = Path(latent_dir or out)
    ae, latents, labels = prepare_latents(dataset, latent_dir, autoencoder, ae_steps, seed, data_root, progress,
                                          max_images, ae_width)
    latent_shape = tuple(latents.shape[1:])
    decomp = build_decomposition(decomposition, latent_shape, num_bands, fit_data=latents, wavelet=wavelet)
    if decomposition == "pca":
        decomp.save(out / "pca.pt")
    flow = KFlow(decomp, BandSchedule(num_bands, order=order))
    num_classes = int(labels.max()) + 1 if class_conditional else 0
    if model not in DiT_models:
        raise ValueError(f"unknown model {model!r}; choose from {sorted(DiT_models)}")
    torch.manual_seed(seed)
    dit = DiT_models[model](input_size=latent_shape[-1], in_channels=latent_shape[0], num_classes=num_classes)
    config = {"dataset": dataset, "decomposition": decomposition, "num_bands": num_bands, "model": model,
              "latent_shape": list(latent_shape), "num_classes": num_classes, "order": order, "wavelet": wavelet,
              "autoencoder": autoencoder, "latent_dir": str(latent_dir), "batch_size": batch_size, "lr": lr,
              "seed": seed}
    atomic_write_text(out / "image_config.json", json.dumps(config, indent=1))
    data = torch.utils.data.TensorDataset(latents, labels)
    trainer = Trainer(dit, ImageFlowLoss(flow, class_conditional), data,
                      collate_fn=lambda items: (torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])),
                      batch_size=batch_size, lr=lr, max_steps=steps, out_dir=out, config=config, ema_decay=ema_decay,
                      checkpoint_every=checkpoint_every, seed=seed, progress=progress, warmup_steps=min(100, steps // 10))
    trainer.fit(resume=resume)
    return trainer, flow


def load_image_model(run_dir: str | os.PathLike, use_ema: bool = True):
    """(dit, flow, autoencoder, config) from a run folder written by ``train_image_model``."""
    from kflow.core import PCADecomposition

    run = Path(run_dir)
    config = json.loads((run / "image_config.json").read_text())
    shape = tuple(config["latent_shape"])
    dit = DiT_models[config["model"]](input_size=shape[-1], in_channels=shape[0], num_classes=config["num_classes"])
    load_checkpoint(run / "checkpoints" / "last.pt", dit, use_ema=use_ema)
    if config["decomposition"] == "pca":
        decomp = PCADecomposition.load(run / "pca.pt")
    else:
        decomp = build_decomposition(config["decomposition"], shape, config["num_bands"], wavelet=config["wavelet"])
    flow = KFlow(decomp, BandSchedule(config["num_bands"], order=config["order"]))
    latent_dir = Path(config.get("latent_dir", run))
    ae = IdentityAutoencoder(shape) if config["autoencoder"] == "identity" else load_autoencoder(
        latent_dir / "autoencoder.pt" if config["autoencoder"] == "conv" else config["autoencoder"])
    return dit.eval(), flow, ae, config
