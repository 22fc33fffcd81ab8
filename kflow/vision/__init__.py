"""Latent image generation with K-Flow and DiT: models, autoencoders, data, metrics, steerable sampling."""
from kflow.vision.analysis import (band_energy_profile, pca_projection_ratio, plot_band_energy,
                                   plot_projection_ratio)
from kflow.vision.autoencoders import (ConvAutoencoder, DiffusersVAE, IdentityAutoencoder, load_autoencoder,
                                       train_autoencoder)
from kflow.vision.data import load_digits, load_fashion_mnist, load_image_dataset, load_image_folder, read_idx
from kflow.vision.metrics import (InceptionFeatures, class_conditional_fid, class_dropping_ratio, extract_features,
                                  frechet_distance, precision_recall)
from kflow.vision.models import DiT, DiT_models
from kflow.vision.latent_cache import (LatentCacheError, load_or_build_latent_cache, read_latent_cache,
                                       write_latent_cache)
from kflow.vision.pipeline import (GuidedModel, ImageFlowLoss, build_decomposition, choose_wavelet, encode_dataset,
                                   sample_latents)
from kflow.vision.steering import grouped_noise, sample_kept_and_dropped, save_image_grid, steering_figures

__all__ = [
    "DiT", "DiT_models", "ConvAutoencoder", "DiffusersVAE", "IdentityAutoencoder", "train_autoencoder",
    "load_autoencoder", "read_idx", "load_fashion_mnist", "load_digits", "load_image_folder", "load_image_dataset",
    "InceptionFeatures", "extract_features", "frechet_distance", "precision_recall", "class_conditional_fid",
    "class_dropping_ratio", "build_decomposition", "ImageFlowLoss", "GuidedModel", "sample_latents",
    "choose_wavelet", "encode_dataset", "write_latent_cache", "read_latent_cache", "load_or_build_latent_cache",
    "LatentCacheError", "grouped_noise", "sample_kept_and_dropped", "save_image_grid", "steering_figures",
    "band_energy_profile", "plot_band_energy", "pca_projection_ratio", "plot_projection_ratio",
]
