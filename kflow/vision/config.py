"""Configuration of image K-Flow and the one builder of its model.

``ImageModelConfig`` holds everything that fixes the DiT's parameters and the flow (DiT size, latent shape, classes,
decomposition, bands, wavelet, schedule, prediction type); ``build_image_model`` turns it into ``(dit, flow)`` for
training and, from a run folder's saved config, for loading. The number of bands and the wavelet are resolved once,
when the config learns its latent shape, and stored in it; nothing downstream chooses them again.
``ImageDataConfig`` says which images and which latent space the latents come from.

The decomposition registry (``build_decomposition`` by name) and the wavelet picker live here too: they are the
part of the config that needs the latent grid.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

from kflow.core import (ORDERS, PREDICTIONS, RAMPS, BandSchedule, FourierDecomposition, IdentityDecomposition, KFlow,
                        PCADecomposition, WaveletDecomposition)
from kflow.vision.models import DiT, DiT_models

__all__ = ["ImageModelConfig", "ImageDataConfig", "build_image_model", "build_decomposition", "choose_wavelet",
           "wavelet_levels", "DECOMPOSITIONS", "WAVELET_PREFERENCE", "PCA_FIT_SAMPLES"]

DECOMPOSITIONS = ("none", "fourier", "wavelet", "pca")
WAVELET_PREFERENCE = ("db6", "db4", "db2", "haar")  # longest filter first: db6 is the paper's default
PCA_FIT_SAMPLES = 4096  # the PCA basis is fitted on the first latents only (ample for D = 256 of a 4×8×8 latent)


# ---------------------------------------------------------------------------------------------- decompositions
def wavelet_levels(size: int, wavelet: str) -> int:
    """How many levels of the boundary-wavelet matrix DWT a signal of ``size`` samples admits: level l (1-based)
    needs its input, of size size / 2^(l-1), at least as long as the filter."""
    import pywt

    length, levels = pywt.Wavelet(wavelet).dec_len, 0
    while size % 2 == 0 and size >= length:
        size, levels = size // 2, levels + 1
    return levels


def choose_wavelet(size: int, num_bands: int) -> str:
    """The longest wavelet of ``WAVELET_PREFERENCE`` with num_bands − 1 levels on a size × size grid."""
    for name in WAVELET_PREFERENCE:
        if wavelet_levels(size, name) >= num_bands - 1:
            return name
    raise ValueError(f"a {size}x{size} grid admits fewer than {num_bands - 1} wavelet levels even with haar; "
                     f"use fewer bands")


def _check_decomposition(name: str, num_bands: int) -> None:
    if name not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {name!r}; choose from {DECOMPOSITIONS}")
    if name == "none" and num_bands != 1:
        raise ValueError("decomposition 'none' is the one-band baseline; use num_bands=1")


def build_decomposition(name: str, latent_shape, num_bands: int, fit_data: torch.Tensor | None = None,
                        wavelet: str | None = None, pca_patch_size: int | None = None):
    """A decomposition of latents [C, H, W] by name.

    "none" is the one-band flow-matching baseline; "fourier" (radial frequency bands) and "wavelet" (band = DWT
    level) act on the spatial axes, channels broadcast; "pca" is fitted on the first ``PCA_FIT_SAMPLES`` of
    ``fit_data`` [N, C, H, W]. ``wavelet=None`` picks the longest of ``WAVELET_PREFERENCE`` that the grid admits
    (``choose_wavelet``); a named wavelet that does not fit raises ``ValueError``. ``build_image_model`` always
    passes the wavelet its config resolved.
    """
    _check_decomposition(name, num_bands)
    c, h, w = latent_shape
    if name == "none":
        return IdentityDecomposition(latent_shape)
    if name == "fourier":
        return FourierDecomposition((h, w), num_bands)
    if name == "wavelet":
        # A named wavelet too long for the grid: WaveletDecomposition raises, naming a shorter one to use.
        return WaveletDecomposition((h, w), num_bands, wavelet=wavelet or choose_wavelet(min(h, w), num_bands))
    if fit_data is None:
        raise ValueError("the PCA decomposition needs fit_data (training latents)")
    return PCADecomposition.fit(fit_data[:PCA_FIT_SAMPLES], num_bands, patch_size=pca_patch_size)


# ---------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class ImageModelConfig:
    """Everything that determines an image model's parameters and its flow; saved as the run's image_config.json.

    ``latent_shape`` and ``num_classes`` usually come from the data: leave them ``None`` and let the training
    workflow fill them in with ``for_data`` (``num_classes=0`` asks for an unconditional model whatever the data).
    Once ``latent_shape`` is known the wavelet is resolved (``wavelet=None`` picks the longest that fits) and stored.
    """

    model: str = "DiT-T/2"
    decomposition: str = "fourier"
    num_bands: int = 2
    wavelet: str | None = None
    pca_patch_size: int | None = None
    ramp: str = "linear"
    order: str = "low_to_high"
    overlap: float = 0.0
    band_weights: tuple[float, ...] | None = None  # window widths ∝ these (e.g. band energies); None: equal
    windows: tuple[tuple[float, float], ...] | None = None  # explicit (start, end) per band; overrides the above
    prediction: str = "velocity"
    class_dropout_prob: float = 0.1
    latent_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None

    def __post_init__(self):
        if self.model not in DiT_models:
            raise ValueError(f"unknown model {self.model!r}; choose from {sorted(DiT_models)}")
        _check_decomposition(self.decomposition, self.num_bands)
        for name, value, allowed in (("ramp", self.ramp, tuple(RAMPS)), ("order", self.order, ORDERS),
                                     ("prediction", self.prediction, PREDICTIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose from {allowed}")
        if self.decomposition != "wavelet":
            object.__setattr__(self, "wavelet", None)
        if self.band_weights is not None:
            weights = tuple(float(w) for w in self.band_weights)
            if len(weights) != self.num_bands or not all(w > 0 for w in weights):
                raise ValueError(f"band_weights must be {self.num_bands} positive numbers, got {list(weights)}")
            object.__setattr__(self, "band_weights", weights)
        if self.windows is not None:
            windows = tuple((float(a), float(c)) for a, c in self.windows)
            BandSchedule(self.num_bands, windows=windows)  # the schedule's own checks: K pairs, 0 <= a < c <= 1
            object.__setattr__(self, "windows", windows)
        if self.latent_shape is not None:
            shape = tuple(int(s) for s in self.latent_shape)
            if len(shape) != 3:
                raise ValueError(f"latent_shape must be (C, H, W), got {shape}")
            object.__setattr__(self, "latent_shape", shape)
            if self.decomposition == "wavelet" and self.wavelet is None:
                object.__setattr__(self, "wavelet", choose_wavelet(min(shape[1:]), self.num_bands))

    @property
    def complete(self) -> bool:
        """True once the latent shape and the number of classes are known."""
        return self.latent_shape is not None and self.num_classes is not None

    def for_data(self, latent_shape, num_classes: int) -> "ImageModelConfig":
        """This config for latents of ``latent_shape`` with ``num_classes`` classes (kept at 0 when the config asks
        for an unconditional model); resolves the wavelet."""
        return replace(self, latent_shape=tuple(latent_shape),
                       num_classes=num_classes if self.num_classes is None else self.num_classes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latent_shape"] = list(self.latent_shape) if self.latent_shape is not None else None
        d["band_weights"] = list(self.band_weights) if self.band_weights is not None else None
        if self.windows is None:
            del d["windows"]  # records made before explicit windows existed stay identical
        else:
            d["windows"] = [list(w) for w in self.windows]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageModelConfig":
        """The config from ``to_dict``'s output (other keys, such as a run record's data set, are ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class ImageDataConfig:
    """Which images, and which latent space encodes them.

    ``autoencoder``: "conv" (trained on the training images, ``ae_steps`` steps of width ``ae_width``, seed
    ``seed``, ``ae_latent_channels`` latent channels, halving the image ``ae_downsample`` times: None = twice for
    32×32 images, once for smaller ones), "identity" (pixel space), a saved kflow autoencoder file, or
    ``diffusers:<folder or hub id>`` (Stable Diffusion's VAE). ``max_images`` keeps the first training images
    only. ``data_root``: where the Fashion-MNIST IDX files are (default: ``kflow.vision.data.fashion_mnist_root``).
    """

    dataset: str = "fashion-mnist"
    autoencoder: str = "conv"
    ae_steps: int = 1500
    ae_width: int = 32
    max_images: int | None = None
    seed: int = 0
    data_root: str | None = None
    ae_latent_channels: int = 4
    ae_downsample: int | None = None

    def description(self) -> dict:
        """What the cached latents depend on (a latent folder made from another description is refused)."""
        d = {"dataset": str(self.dataset), "autoencoder": self.autoencoder, "max_images": self.max_images,
             "ae_steps": self.ae_steps, "ae_width": self.ae_width, "seed": self.seed}
        # Listed only when not the default, so latent folders made before these options existed stay valid.
        if self.ae_latent_channels != 4:
            d["ae_latent_channels"] = self.ae_latent_channels
        if self.ae_downsample is not None:
            d["ae_downsample"] = self.ae_downsample
        return d


# ---------------------------------------------------------------------------------------------- the builder
def build_image_model(config: ImageModelConfig, fit_data: torch.Tensor | None = None,
                      pca: PCADecomposition | None = None, seed: int | None = None,
                      gradient_checkpointing: bool = False) -> tuple[DiT, KFlow]:
    """(dit, flow) described by a complete ``config``, for training and for loading alike.

    A PCA decomposition is fitted on ``fit_data`` (training latents) or given fitted as ``pca`` (a run's
    pca.pt). ``seed``: seeds the DiT's initialisation. ``gradient_checkpointing`` saves memory in training and does
    not change the parameters.
    """
    if not config.complete:
        raise ValueError("the model config needs latent_shape and num_classes; use config.for_data(latent_shape, "
                         "num_classes)")
    if pca is not None and config.decomposition != "pca":
        raise ValueError(f"a PCA basis was given for a {config.decomposition!r} decomposition")
    decomposition = pca if pca is not None else build_decomposition(
        config.decomposition, config.latent_shape, config.num_bands, fit_data=fit_data, wavelet=config.wavelet,
        pca_patch_size=config.pca_patch_size)
    schedule = BandSchedule(config.num_bands, ramp=config.ramp, order=config.order, overlap=config.overlap,
                            weights=config.band_weights, windows=config.windows)
    flow = KFlow(decomposition, schedule, prediction=config.prediction)
    if seed is not None:
        torch.manual_seed(seed)
    channels, _, size = config.latent_shape
    dit = DiT_models[config.model](input_size=size, in_channels=channels, num_classes=config.num_classes,
                                   class_dropout_prob=config.class_dropout_prob,
                                   gradient_checkpointing=gradient_checkpointing)
    return dit, flow
