"""Latent spaces for image K-Flow: a small convolutional autoencoder kflow trains itself (the CPU default), the
identity (pixel space), and Stable Diffusion's ``AutoencoderKL`` through diffusers.

Common interface: ``encode(x [N, C, H, W] in [0, 1]) -> z [N, *latent_shape]``, ``decode(z) -> x``, ``latent_shape``;
``encode_dataset`` encodes a whole image set in batches.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from kflow.utils.io import atomic_save

__all__ = ["ConvAutoencoder", "IdentityAutoencoder", "DiffusersVAE", "train_autoencoder", "load_autoencoder",
           "encode_dataset", "SD_LATENT_SCALE", "NORMALISATION_SAMPLES"]

SD_LATENT_SCALE = 0.18215  # Stable Diffusion's latent scale: brings its VAE's latents to about unit variance
NORMALISATION_SAMPLES = 4096  # images whose latents set a trained autoencoder's per-channel normalisation
NORM_GROUPS = 8  # GroupNorm groups in the conv autoencoder's blocks (fewer when a block has fewer channels)


class IdentityAutoencoder(nn.Module):
    """Pixel space: z = 2x − 1 (centred), so the flow works on [-1, 1] images."""

    def __init__(self, image_shape):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.latent_shape = self.image_shape

    def encode(self, x):
        return 2 * x - 1

    def decode(self, z):
        return ((z + 1) / 2).clamp(0, 1)

    def config(self) -> dict:
        return {"kind": "identity", "image_shape": list(self.image_shape)}


def _block(cin, cout, down: bool):
    """Halve (or double) the resolution with a stride-2 convolution, then refine with a 3×3 convolution."""
    conv = nn.Conv2d(cin, cout, 4, 2, 1) if down else nn.ConvTranspose2d(cin, cout, 4, 2, 1)
    groups = min(NORM_GROUPS, cout)
    return nn.Sequential(conv, nn.GroupNorm(groups, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, 1, 1),
                         nn.GroupNorm(groups, cout), nn.SiLU())


class ConvAutoencoder(nn.Module):
    """Small convolutional autoencoder: [C, S, S] images -> [latent_channels, S/2^d, S/2^d] latents.

    Images must be square with S divisible by 2^downsample (pad 28×28 to 32×32 with ``kflow.vision.data.pad_to``).
    Latents are normalised per channel, z = (encoder(x) − latent_mean) / latent_std (buffers [latent_channels, 1, 1]
    set by ``fit_latent_normalisation`` after training), so the flow sees zero-mean, unit-variance channels, the
    role Stable Diffusion's 0.18215 plays for its VAE.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 32, latent_channels: int = 4, width: int = 32,
                 downsample: int = 2):
        super().__init__()
        if image_size % (2 ** downsample):
            raise ValueError(f"image_size {image_size} must be divisible by 2^{downsample}")
        self.hparams = dict(in_channels=in_channels, image_size=image_size, latent_channels=latent_channels,
                            width=width, downsample=downsample)
        chans = [width * 2 ** i for i in range(downsample + 1)]
        enc = [nn.Conv2d(in_channels, chans[0], 3, 1, 1), nn.SiLU()]
        enc += [_block(chans[i], chans[i + 1], True) for i in range(downsample)]
        enc += [nn.Conv2d(chans[-1], latent_channels, 1)]
        dec = [nn.Conv2d(latent_channels, chans[-1], 3, 1, 1), nn.SiLU()]
        dec += [_block(chans[i + 1], chans[i], False) for i in reversed(range(downsample))]
        dec += [nn.Conv2d(chans[0], in_channels, 3, 1, 1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.register_buffer("latent_mean", torch.zeros(latent_channels, 1, 1))
        self.register_buffer("latent_std", torch.ones(latent_channels, 1, 1))
        s = image_size // 2 ** downsample
        self.latent_shape = (latent_channels, s, s)

    def encode(self, x):
        """x [N, C, S, S] in [0, 1] -> z [N, *latent_shape], normalised per channel."""
        return (self.encoder(2 * x - 1) - self.latent_mean) / self.latent_std

    def decode(self, z):
        """z [N, *latent_shape] -> x [N, C, S, S] in [0, 1]."""
        return (torch.tanh(self.decoder(z * self.latent_std + self.latent_mean)) + 1) / 2

    @torch.no_grad()
    def fit_latent_normalisation(self, images: torch.Tensor, batch_size: int = 512):
        """Set latent_mean / latent_std to the per-channel statistics of the raw latents of images [N, C, S, S]."""
        raw = torch.cat([self.encoder(2 * images[i:i + batch_size] - 1) for i in range(0, len(images), batch_size)])
        self.latent_mean.copy_(raw.mean(dim=(0, 2, 3)).reshape(-1, 1, 1))
        self.latent_std.copy_(raw.std(dim=(0, 2, 3)).clamp_min(1e-6).reshape(-1, 1, 1))
        return self

    def forward(self, x):
        return self.decode(self.encode(x))

    def config(self) -> dict:
        return {"kind": "conv", **self.hparams}

    def save(self, path: str | os.PathLike):
        atomic_save({"kind": "kflow-autoencoder", "config": self.config(), "state": self.state_dict()}, path)


class DiffusersVAE(nn.Module):
    """Stable Diffusion's ``AutoencoderKL`` (diffusers) from a local folder or hub id; latents scaled by
    ``SD_LATENT_SCALE``.

    ``sample_posterior``: encode with a sample of the posterior instead of its mean.
    """

    def __init__(self, vae, scale_factor: float = SD_LATENT_SCALE, sample_posterior: bool = False,
                 image_size: int = 256):
        super().__init__()
        self.vae, self.scale_factor, self.sample_posterior = vae, scale_factor, sample_posterior
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_shape = (vae.config.latent_channels, image_size // down, image_size // down)
        self.image_size = image_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, subfolder: str | None = None, **kwargs):
        """E.g. ``DiffusersVAE.from_pretrained("stabilityai/sd-vae-ft-ema")`` or a local folder with config.json and
        weights (``subfolder="vae"`` for a full Stable Diffusion pipeline folder)."""
        from diffusers import AutoencoderKL

        extra = {"subfolder": subfolder} if subfolder else {}
        return cls(AutoencoderKL.from_pretrained(name_or_path, **extra), **kwargs)

    def encode(self, x):
        """x [N, C, H, W] in [0, 1] (grey images are repeated to the VAE's channels) -> z [N, 4, H/8, W/8]·scale."""
        if x.shape[1] == 1 and self.vae.config.in_channels != 1:
            x = x.expand(-1, self.vae.config.in_channels, -1, -1)
        dist = self.vae.encode(2 * x - 1).latent_dist
        z = dist.sample() if self.sample_posterior else dist.mean
        return z * self.scale_factor

    def decode(self, z):
        return ((self.vae.decode(z / self.scale_factor).sample + 1) / 2).clamp(0, 1)

    def config(self) -> dict:
        return {"kind": "diffusers", "scale_factor": self.scale_factor, "image_size": self.image_size}


def train_autoencoder(images: torch.Tensor, steps: int = 2000, batch_size: int = 128, lr: float = 2e-3,
                      seed: int = 0, progress: bool = True, **model_kwargs) -> ConvAutoencoder:
    """Train a ``ConvAutoencoder`` on images [N, C, S, S] in [0, 1] with an L1 + L2 reconstruction loss, then
    normalise its latents per channel on (up to) the first ``NORMALISATION_SAMPLES`` images. ``model_kwargs`` go to
    ``ConvAutoencoder`` (latent_channels, width, downsample)."""
    torch.manual_seed(seed)
    model = ConvAutoencoder(in_channels=images.shape[1], image_size=images.shape[-1], **model_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="autoencoder", unit="step", mininterval=2.0)
    model.train()
    for _ in iterator:
        x = images[torch.randint(0, len(images), (batch_size,), generator=gen)]
        rec = model(x)
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model.fit_latent_normalisation(images[:NORMALISATION_SAMPLES])


def load_autoencoder(path: str | os.PathLike) -> ConvAutoencoder:
    """A ``ConvAutoencoder`` saved with ``.save(path)``, in eval mode. Raises ``FileNotFoundError`` or a
    ``ValueError`` naming the file when it is not a complete kflow autoencoder file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such autoencoder file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception as err:  # truncated zip, objects that would need code to load, ...
        raise ValueError(f"{path}: cannot be read as a kflow autoencoder file ({err})") from err
    if not isinstance(state, dict) or state.get("kind") != "kflow-autoencoder":
        raise ValueError(f"{path}: not a kflow autoencoder file")
    cfg = dict(state["config"])
    cfg.pop("kind")
    model = ConvAutoencoder(**cfg)
    try:
        model.load_state_dict(state["state"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the stored configuration ({err})") from err
    return model.eval()


@torch.no_grad()
def encode_dataset(autoencoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images [N, C, H, W] in [0, 1] -> latents [N, *autoencoder.latent_shape], in batches, eval mode."""
    autoencoder.eval()
    return torch.cat([autoencoder.encode(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
