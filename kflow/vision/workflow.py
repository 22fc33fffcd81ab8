"""Image K-Flow end to end as library functions: prepare latents, train, sample, evaluate, analyse.

The scripts (train_image.py, sample_image.py, evaluate_image.py, analyze_image.py) parse their arguments into
configs and call one of these:

    data = ImageDataConfig("digits", ae_steps=300)
    trainer, flow = train_image_model(data, "runs/digits", ImageModelConfig(decomposition="fourier"), steps=500)
    paths = sample_images("runs/digits", 64, sampling=SamplingConfig(steps=20))
    metrics, _ = evaluate_images(paths["samples"], reference="digits-test")
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from kflow.core import FourierDecomposition, PCADecomposition
from kflow.core import distributed as dist_utils
from kflow.core.training import Trainer, check_fresh_run_folder
from kflow.utils.io import atomic_write_text
from kflow.vision.analysis import band_energy_profile, pca_projection_ratio, plot_band_energy, plot_projection_ratio
from kflow.vision.artifacts import (AUTOENCODER_FILE, LATENT_CACHE_DIR, LATENT_RECORD_FILE, PCA_FILE,
                                    LatentCacheError, default_samples_prefix, load_image_model, load_latent_space,
                                    load_or_build_latent_cache, read_latent_cache, read_latent_record, read_samples,
                                    sample_paths, save_image_grid, write_latent_record, write_metrics,
                                    write_run_config, write_samples)
from kflow.vision.autoencoders import DiffusersVAE, encode_dataset, train_autoencoder
from kflow.vision.config import ImageDataConfig, ImageModelConfig, build_decomposition, build_image_model
from kflow.vision.data import load_image_dataset, load_image_folder, pad_to
from kflow.vision.metrics import (InceptionFeatures, SmallSampleWarning, condition_dropping_scores, extract_features,
                                  feature_cache_entry, feature_rate, fid_sample_note, frechet_distance,
                                  precision_recall, read_cached_features, write_cached_features)
from kflow.vision.objective import ImageFlowLoss
from kflow.vision.sampling import SamplingConfig, generate_images, sample_latents
from kflow.vision.steering import steering_figures

__all__ = ["prepare_latents", "clear_latent_folder", "train_image_model", "sample_images", "load_reference_images",
           "evaluate_images", "analyze_runs", "PADDED_SIZE", "WARMUP_FRACTION", "MAX_WARMUP_STEPS", "MIN_LR_RATIO"]

PADDED_SIZE = 32  # 28×28 images (Fashion-MNIST) are zero-padded to 32×32, a grid the autoencoder halves twice
SMALL_IMAGE_DOWNSAMPLE = 1  # images under PADDED_SIZE (8×8 digits) are halved once by the autoencoder ...
DOWNSAMPLE = 2  # ... the others twice (32×32 -> 8×8 latents)
WARMUP_FRACTION, MAX_WARMUP_STEPS = 0.1, 100  # default LR warm-up: 10% of the steps, at most 100
MIN_LR_RATIO = 0.05  # default end of the cosine LR decay, as a fraction of the peak
GRID_SAMPLES = 64  # samples shown in the PNG grid next to a samples file
REFERENCE_SETS = {"fashion-mnist-test": "fashion-mnist", "digits-test": "digits"}  # reference name -> data set
# Reference features by content (the repository's data/cache, as the molecular caches): a second evaluation
# against the same reference images and feature network skips the reference pass (~20 min for 10,000 on 2 cores).
FEATURE_CACHE_DIR = Path(__file__).resolve().parents[2] / "data" / "cache" / "features"


# ---------------------------------------------------------------------------------------------- latents
def prepare_latents(data: ImageDataConfig, latent_dir: str | os.PathLike, progress: bool = True):
    """Images -> (trained or loaded) autoencoder -> latents cached under ``latent_dir``. Returns
    (autoencoder, latents [N, C, h, w], labels [N]).

    A "conv" autoencoder is trained on the training images and saved as latent_dir/autoencoder.pt (reused when
    present); latent_dir/latents.json records what the folder's latents were made from, and a folder made from
    another ``data.description()`` raises ``ValueError`` instead of being reused or re-encoded. Under torchrun,
    rank 0 trains and encodes while the other ranks wait, then read.
    """
    latent_dir = Path(latent_dir)
    if dist_utils.is_main_process():
        ae, latents, labels = _prepare_latents_here(data, latent_dir, progress)
    dist_utils.barrier()
    if not dist_utils.is_main_process():
        ae = load_latent_space(data.autoencoder, latent_dir)
        latents, labels, _ = read_latent_cache(latent_dir / LATENT_CACHE_DIR)
    return ae, latents, labels


def _prepare_latents_here(data: ImageDataConfig, latent_dir: Path, progress: bool):
    wanted = data.description()
    _check_latent_folder(latent_dir, wanted)
    images, labels = load_image_dataset(data.dataset, "train", data.data_root)
    if data.max_images:
        images, labels = images[:data.max_images], labels[:data.max_images]
    if images.shape[-1] == 28:
        images = pad_to(images, PADDED_SIZE)
    ae_path = latent_dir / AUTOENCODER_FILE
    if data.autoencoder == "conv" and not ae_path.exists():
        downsample = data.ae_downsample if data.ae_downsample is not None else (
            DOWNSAMPLE if images.shape[-1] >= PADDED_SIZE else SMALL_IMAGE_DOWNSAMPLE)
        ae = train_autoencoder(images, steps=data.ae_steps, seed=data.seed, progress=progress, downsample=downsample,
                               width=data.ae_width, latent_channels=data.ae_latent_channels)
        ae.save(ae_path)
    else:
        ae = load_latent_space(data.autoencoder, latent_dir, tuple(images.shape[1:]))
    if isinstance(ae, DiffusersVAE):
        ae.image_size = images.shape[-1]
    latents, labels, _ = load_or_build_latent_cache(latent_dir / LATENT_CACHE_DIR, wanted,
                                                    lambda: (encode_dataset(ae, images), labels))
    if read_latent_record(latent_dir) is None:
        write_latent_record(latent_dir, wanted)
    return ae, latents, labels


def _check_latent_folder(latent_dir: Path, wanted: dict) -> None:
    """Refuse a latent folder whose autoencoder or latents were made from another description: reusing its
    autoencoder for other settings, or re-encoding its cache, would silently change the latent space of every
    run that shares the folder."""
    record = read_latent_record(latent_dir)
    made = record["description"] if record else None
    if made is None and (latent_dir / LATENT_CACHE_DIR).exists():  # a folder from before latents.json
        try:
            meta = read_latent_cache(latent_dir / LATENT_CACHE_DIR)[2]
            made = {k: meta.get(k) for k in wanted}
        except (FileNotFoundError, LatentCacheError):
            made = None
    if made is not None and made != wanted:
        diff = ", ".join(f"{k} {made.get(k)!r} there vs {wanted.get(k)!r} now"
                         for k in sorted(set(made) | set(wanted)) if made.get(k) != wanted.get(k))
        raise ValueError(f"{latent_dir} holds latents made with other settings ({diff}); runs that share a latent "
                         f"folder must share its latent space: use the same data settings, another --latent-dir, "
                         f"or --overwrite when the folder is the run's own")


def clear_latent_folder(latent_dir: str | os.PathLike) -> None:
    """Remove a latent folder's autoencoder, latent cache and record (a fresh run that owns the folder)."""
    import shutil

    latent_dir = Path(latent_dir)
    (latent_dir / AUTOENCODER_FILE).unlink(missing_ok=True)
    (latent_dir / LATENT_RECORD_FILE).unlink(missing_ok=True)
    shutil.rmtree(latent_dir / LATENT_CACHE_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- training
def train_image_model(data: ImageDataConfig, out_dir: str | os.PathLike, config: ImageModelConfig | None = None, *,
                      latent_dir: str | os.PathLike | None = None, steps: int = 2000, batch_size: int = 64,
                      lr: float = 3e-4, ema_decay: float = 0.999, seed: int = 0, warmup_steps: int | None = None,
                      checkpoint_every: int = 500, resume: bool = False, progress: bool = True,
                      gradient_checkpointing: bool = False, overwrite: bool = False, deterministic: bool = False,
                      eval_fn=None, eval_every: int | None = None, min_lr_ratio: float = MIN_LR_RATIO):
    """Train a DiT with K-Flow on cached latents through ``kflow.core.training.Trainer``; returns (trainer, flow).

    ``latent_dir`` (default ``out_dir``) holds the autoencoder and the latent cache, so several runs can share them
    (runs that are compared should: a folder made with other data settings is refused, see ``prepare_latents``).
    The model config gets its latent shape and classes from the data (``config.for_data``). The run folder gets
    image_config.json, pca.pt (PCA only; reused on resume), the Trainer's checkpoints and metric logs.
    ``warmup_steps=None``: ``WARMUP_FRACTION`` of the steps, at most ``MAX_WARMUP_STEPS``; after it the LR decays
    on a cosine to ``min_lr_ratio`` × ``lr`` at ``steps`` (1.0: constant, so a run's first steps do not depend on
    ``steps`` and a capped run can be extended by resuming with more). A fresh run (not
    ``resume``) refuses a folder holding another run unless ``overwrite``; ``deterministic``: see ``Trainer``.
    ``eval_fn(ema_model, flow, step) -> dict`` runs every ``eval_every`` steps (logged as eval_<key>; e.g. a
    validation FID that keeps the best checkpoint, ``kflow.vision.study``).
    """
    out = Path(out_dir)
    if not resume:
        check_fresh_run_folder(out, overwrite)  # before anything of the earlier run is overwritten
    latent_dir = Path(latent_dir or out)
    dist_utils.setup_distributed()  # under torchrun: join the process group first, so only rank 0 prepares latents
    try:
        if overwrite and not resume and latent_dir == out and dist_utils.is_main_process():
            clear_latent_folder(latent_dir)  # the run's own latents go with it; a shared folder is never cleared
        _, latents, labels = prepare_latents(data, latent_dir, progress)
        config = (config or ImageModelConfig()).for_data(latents.shape[1:], int(labels.max()) + 1)
        pca = PCADecomposition.load(out / PCA_FILE) if (
            config.decomposition == "pca" and resume and (out / PCA_FILE).exists()) else None
        dit, flow = build_image_model(config, fit_data=latents, pca=pca, seed=seed,
                                      gradient_checkpointing=gradient_checkpointing)
        record = {**config.to_dict(), "dataset": data.dataset, "autoencoder": data.autoencoder,
                  "latent_dir": str(latent_dir), "batch_size": batch_size, "lr": lr, "seed": seed}
        if min_lr_ratio != MIN_LR_RATIO:  # recorded only when changed: runs made before the option still resume
            record["min_lr_ratio"] = min_lr_ratio
        if dist_utils.is_main_process():
            if config.decomposition == "pca" and pca is None:
                flow.decomposition.save(out / PCA_FILE)
            write_run_config(out, record)
        if warmup_steps is None:
            warmup_steps = min(MAX_WARMUP_STEPS, int(steps * WARMUP_FRACTION))
        trainer = Trainer(dit, ImageFlowLoss(flow, conditional=config.num_classes > 0),
                          torch.utils.data.TensorDataset(latents, labels), collate_fn=_stack_pairs,
                          batch_size=batch_size, lr=lr, max_steps=steps, out_dir=out, config=record,
                          ema_decay=ema_decay, checkpoint_every=checkpoint_every, seed=seed, progress=progress,
                          warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, overwrite=overwrite,
                          deterministic=deterministic,
                          eval_fn=None if eval_fn is None else (lambda model, step: eval_fn(model, flow, step)),
                          eval_every=eval_every)
        trainer.fit(resume=resume)
    finally:
        dist_utils.cleanup_distributed()
    return trainer, flow


def _stack_pairs(items):
    """[(latent, label), ...] -> (latents [N, C, h, w], labels [N])."""
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


# ---------------------------------------------------------------------------------------------- sampling
def sample_images(run_dir: str | os.PathLike, num_samples: int, out: str | os.PathLike | None = None,
                  sampling: SamplingConfig = SamplingConfig(), class_id: int | None = None,
                  with_steering_figures: bool = False, overwrite: bool = False) -> dict[str, Path]:
    """Sample ``num_samples`` images from a trained run: ``<out>.npz`` (images in [0, 1], labels), a PNG grid
    ``<out>.png`` and, with ``with_steering_figures``, the paper-style steering grids beside them
    (``<out>_share_low_bands.png``, ...). Labels cycle through the classes unless ``class_id`` fixes one. ``out``
    defaults to a name of the sampling settings in the run folder (``default_samples_prefix``), so variants never
    share a file; an existing ``<out>.npz`` is refused (``ValueError``, before any sampling) unless ``overwrite``.
    Returns {"samples": npz, "grid": png, <figure name>: png}."""
    npz, png = sample_paths(out or default_samples_prefix(run_dir, num_samples, sampling, class_id))
    if npz.exists() and not overwrite:
        raise ValueError(f"{npz} exists (samples of an earlier run); give another --out or pass --overwrite")
    dit, flow, ae, record = load_image_model(run_dir)
    labels = None
    if record["num_classes"]:
        labels = torch.full((num_samples,), class_id) if class_id is not None else \
            torch.arange(num_samples) % record["num_classes"]
    images = generate_images(dit, flow, ae, labels, num_samples, sampling)
    save_image_grid(images[:GRID_SAMPLES], png)
    paths = {"samples": write_samples(npz, images, labels), "grid": png}
    if with_steering_figures:
        paths.update(steering_figures(dit, flow, ae, npz.parent, steps=sampling.steps, seed=sampling.seed,
                                      prefix=f"{npz.stem}_"))
    return paths


# ---------------------------------------------------------------------------------------------- evaluation
def load_reference_images(reference: str, max_images: int | None = None, data_root: str | None = None):
    """Real images to compare with: a test split named in ``REFERENCE_SETS`` ("fashion-mnist-test",
    "digits-test"; Fashion-MNIST read from ``data_root``, see ``kflow.vision.data.fashion_mnist_root``), a
    samples-style .npz, or an image folder. Returns (images [N, C, H, W] in [0, 1], labels [N] or None), the first
    ``max_images``."""
    if reference in REFERENCE_SETS:
        images, labels = load_image_dataset(REFERENCE_SETS[reference], "test", data_root)
    elif reference.endswith(".npz"):
        images, labels = read_samples(reference)
    else:
        images, labels = load_image_folder(reference)
    return images[:max_images], None if labels is None else labels[:max_images]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def _reference_features(net: InceptionFeatures, ref: torch.Tensor, cache_dir, log) -> tuple[torch.Tensor, float | None]:
    """Features of the reference images from the cache, else computed (after saying how long that will take) and
    cached. Returns (features, the measured images/s or None when cached)."""
    entry = feature_cache_entry(net, ref, cache_dir)
    cached = read_cached_features(*entry, len(ref)) if entry else None
    if cached is not None:
        log(f"features: {len(ref)} reference images from the cache ({entry[0]})")
        return cached, None
    rate = feature_rate(net, ref)
    where = (f"cached in {cache_dir} for the next evaluation" if entry else "not cached (no cache folder)"
             if cache_dir is None else "not cached (a network given as a module has no identity)")
    log(f"features: {len(ref)} reference images, about {_duration(len(ref) / rate)} at {rate:.1f} images/s with "
        f"{torch.get_num_threads()} thread(s); {where}")
    features = extract_features(net, ref, progress=True)
    if entry:
        write_cached_features(*entry, features)
    return features, rate


def _sample_features(net, images, rate: float | None, what: str, log) -> torch.Tensor:
    estimate = f", about {_duration(len(images) / rate)}" if rate else ""
    log(f"features: {len(images)} {what}{estimate}")
    return extract_features(net, images, progress=True)


def evaluate_images(samples: str | os.PathLike, reference: str = "fashion-mnist-test",
                    dropped: str | os.PathLike | None = None, max_reference: int = 10000,
                    feature_net: str | None = None, k: int = 3, out: str | os.PathLike | None = None,
                    data_root: str | None = None, log=print,
                    cache_dir: str | os.PathLike | None = FEATURE_CACHE_DIR):
    """FID, precision and recall of a samples .npz against ``reference`` (see ``load_reference_images``;
    ``data_root`` is the Fashion-MNIST folder) with offline Inception-v3 features (or ``feature_net``, a TorchScript
    file); with ``dropped`` (samples generated with the condition dropped after τ) and labels on both sides, also
    class-aware FIDs and the Class-Dropping-Ratio (progress bars throughout; a ``SmallSampleWarning`` when a class
    has fewer than ``metrics.MIN_CLASS_SAMPLES`` samples). Writes the results to ``out`` (default
    <samples>.metrics.json); returns (results, path).

    The reference features are cached in ``cache_dir`` by content (the images and the network file; None: no
    cache), and the time of the reference pass is estimated and logged before it starts. Fewer than
    ``metrics.MIN_FID_SAMPLES`` images on either side raise a ``SmallSampleWarning`` and put the reason in the
    results as ``fid_note``: such an FID is not meaningful."""
    ref, ref_labels = load_reference_images(reference, max_reference, data_root)
    images, labels = read_samples(samples)
    note = fid_sample_note(len(images), len(ref))
    if note:
        warnings.warn(note, SmallSampleWarning, stacklevel=2)
    net = InceptionFeatures(feature_net)
    f_ref, rate = _reference_features(net, ref, cache_dir, log)
    f_gen = _sample_features(net, images, rate, f"samples from {samples}", log)
    precision, recall = precision_recall(f_ref, f_gen, k=k)
    result = {"fid": frechet_distance(f_ref, f_gen), "precision": precision, "recall": recall,
              "num_samples": len(images), "num_reference": len(ref)}
    if note:
        result["fid_note"] = note
    if dropped and labels is not None and ref_labels is not None:
        dropped_images, dropped_labels = read_samples(dropped)
        f_drop = _sample_features(net, dropped_images, rate, f"condition-dropped samples from {dropped}", log)
        log("class-aware FIDs (two 2048×2048 eigen-decompositions per class and set)")
        result.update(condition_dropping_scores(f_ref, ref_labels, f_gen, labels, f_drop, dropped_labels,
                                                progress=True))
    return result, write_metrics(out or Path(samples).with_suffix(".metrics.json"), result)


# ---------------------------------------------------------------------------------------------- analysis
def analyze_runs(run_dirs, out_dir: str | os.PathLike, num_bands: int = 3, num_latents: int = 2048,
                 num_trajectories: int = 64, steps: int = 20, top_fraction: float = 0.1, seed: int = 0) -> dict:
    """Both analyses of ``kflow.vision.analysis`` for trained image runs, as PNGs and a JSON.

    Fig. 3: energy share per band of the first run's cached training latents under Fourier, Wavelet and PCA
    decompositions with ``num_bands`` bands. Fig. 4: for every run, the share of a sample's energy in the leading
    ``top_fraction`` of principal components (PCA fitted on those latents) along the sampled trajectory
    (``num_trajectories`` samples, ``steps`` Euler steps): K-Flow fixes the coarse structure early, so its curve
    should rise earlier than flow matching's. Returns the numbers written to ``out_dir/analysis.json``.
    """
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("analyze_runs needs at least one run folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, _, _, record = load_image_model(run_dirs[0])
    latents = read_latent_cache(Path(record.get("latent_dir", run_dirs[0])) / LATENT_CACHE_DIR)[0][:num_latents]
    shape = tuple(latents.shape[1:])
    decompositions = {"Fourier": FourierDecomposition(shape[1:], num_bands),
                      "Wavelet": build_decomposition("wavelet", shape, num_bands),
                      "PCA": build_decomposition("pca", shape, num_bands, fit_data=latents)}
    profiles = {name: band_energy_profile(latents, d) for name, d in decompositions.items()}
    plot_band_energy(profiles, out / "fig3_band_energy.png")

    pca = PCADecomposition.fit(latents.reshape(len(latents), -1), 1)
    top = max(1, int(top_fraction * pca.explained_variance.numel()))
    curves, times = {}, None
    for run in run_dirs:
        dit, flow, _, cfg = load_image_model(run)
        labels = torch.arange(num_trajectories) % cfg["num_classes"] if cfg["num_classes"] else None
        _, traj = sample_latents(dit, flow, num_trajectories, labels, steps=steps, method="euler", seed=seed,
                                 return_trajectory=True)
        name = "flow matching" if cfg["num_bands"] == 1 else f"K-Flow {cfg['decomposition']} ({cfg['num_bands']})"
        curves[name] = pca_projection_ratio(traj.reshape(*traj.shape[:2], -1), pca, top)
        times = flow.schedule.time_grid(steps).float()
    plot_projection_ratio(curves, times, out / "fig4_pca_projection.png")
    result = {"band_energy": profiles, "pca_top_components": top, "times": times.tolist(),
              "pca_projection_ratio": {k: v.tolist() for k, v in curves.items()}}
    atomic_write_text(out / "analysis.json", json.dumps(result, indent=1))
    return result
