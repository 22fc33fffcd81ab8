"""Latent image generation with K-Flow and DiT.

Modules, one job each: ``config`` (model config and its builder), ``objective`` (training loss), ``sampling``
(batched generation and decoding), ``artifacts`` (every on-disk format), ``workflow`` (train / sample / evaluate /
analyse), ``models`` (DiT), ``autoencoders`` (latent spaces), ``data`` (image data sets), ``metrics`` (FID,
precision/recall, CDR), ``analysis`` (band-energy and PCA-projection analyses), ``steering`` (noise splitting and
condition dropping). See docs/ARCHITECTURE.md.
"""
from kflow.vision.analysis import (band_energy_profile, pca_projection_ratio, plot_band_energy,
                                   plot_projection_ratio)
from kflow.vision.artifacts import (LatentCacheError, load_image_model, load_or_build_latent_cache, read_latent_cache,
                                    read_samples, save_image_grid, write_latent_cache, write_samples)
from kflow.vision.autoencoders import (ConvAutoencoder, DiffusersVAE, IdentityAutoencoder, encode_dataset,
                                       load_autoencoder, train_autoencoder)
from kflow.vision.config import (DECOMPOSITIONS, ImageDataConfig, ImageModelConfig, build_decomposition,
                                 build_image_model, choose_wavelet)
from kflow.vision.data import (crop_to, load_digits, load_fashion_mnist, load_image_dataset, load_image_folder, pad_to,
                               read_idx)
from kflow.vision.metrics import (InceptionFeatures, class_conditional_fid, class_dropping_ratio,
                                  condition_dropping_scores, extract_features, frechet_distance, precision_recall)
from kflow.vision.models import DiT, DiT_models
from kflow.vision.objective import ImageFlowLoss
from kflow.vision.sampling import GuidedModel, SamplingConfig, decode_latents, generate_images, sample_latents
from kflow.vision.steering import grouped_noise, sample_kept_and_dropped, steering_figures
from kflow.vision.workflow import (analyze_runs, evaluate_images, prepare_latents, sample_images,
                                   train_image_model)

__all__ = [
    "DiT", "DiT_models", "ConvAutoencoder", "DiffusersVAE", "IdentityAutoencoder", "train_autoencoder",
    "load_autoencoder", "encode_dataset", "read_idx", "load_fashion_mnist", "load_digits", "load_image_folder",
    "load_image_dataset", "pad_to", "crop_to", "InceptionFeatures", "extract_features", "frechet_distance",
    "precision_recall", "class_conditional_fid", "class_dropping_ratio", "condition_dropping_scores",
    "ImageModelConfig", "ImageDataConfig", "build_image_model", "build_decomposition", "choose_wavelet",
    "DECOMPOSITIONS", "ImageFlowLoss", "GuidedModel", "SamplingConfig", "sample_latents", "decode_latents",
    "generate_images", "write_latent_cache", "read_latent_cache", "load_or_build_latent_cache", "LatentCacheError",
    "load_image_model", "write_samples", "read_samples", "save_image_grid", "grouped_noise",
    "sample_kept_and_dropped", "steering_figures", "band_energy_profile", "plot_band_energy",
    "pca_projection_ratio", "plot_projection_ratio", "prepare_latents", "train_image_model", "sample_images",
    "evaluate_images", "analyze_runs",
]
