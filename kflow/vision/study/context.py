"""What every cell of a study shares (``StudyContext``): one autoencoder and latent cache (``prepare_study``), the
image splits, the Inception features (cached beside the run), and the check that results share one latent space.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kflow.utils.io import FolderBusyError, FolderLock, atomic_save
from kflow.vision.artifacts import read_latent_record
from kflow.vision.autoencoders import encode_dataset
from kflow.vision.data import crop_to, load_image_dataset, pad_to
from kflow.vision.metrics import InceptionFeatures, extract_features, frechet_distance
from kflow.vision.sampling import SamplingConfig, generate_images, sample_latents
from kflow.vision.study.cells import GENERATION_BATCH, VisionStudyBudget
from kflow.vision.workflow import PADDED_SIZE, prepare_latents


__all__ = ["FEATURE_WAIT_S", "StudyContext", "prepare_study", "check_same_latents", "feature_network"]

FEATURE_WAIT_S = 10.0  # how often a runner checks on features another runner is extracting


# ---------------------------------------------------------------------------------------------- shared context
def feature_network(path: str | None = None):
    """The FID feature network: the offline Inception-v3, or a TorchScript file (development and tests)."""
    return InceptionFeatures(path)


@dataclass
class StudyContext:
    """What every cell shares: the autoencoder and latents, the reference features, the feature network."""

    budget: VisionStudyBudget
    work: Path
    autoencoder: torch.nn.Module
    latents: torch.Tensor
    labels: torch.Tensor
    fingerprint: str
    image_size: int  # generated images are cropped back to the data set's size (28 for Fashion-MNIST)
    num_classes: int
    net: torch.nn.Module
    val_features: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor
    data_root: str | None = None
    val_latents: torch.Tensor | None = None  # [val_images, C, h, w]: the held-out images encoded (latent_fd)

    def draw_latents(self, dit, flow, labels, nfe: int, method: str, seed: int) -> tuple[torch.Tensor, float]:
        """(latents [N, C, h, w], model evaluations per sample) of ``labels`` under ``method`` at about ``nfe``
        evaluations: Euler and the band step take ``nfe`` steps, Heun ``nfe // 2``; dopri5 adapts its steps to
        ``budget.dopri5_tol`` and its count is measured (the embedder runs once per model evaluation)."""
        calls = [0]
        hook = dit.x_embedder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            out = []
            for start in range(0, len(labels), GENERATION_BATCH):
                part = labels[start:start + GENERATION_BATCH]
                out.append(sample_latents(dit, flow, len(part), part, nfe // 2 if method == "heun" else nfe, method,
                                          seed=seed + start, rtol=self.budget.dopri5_tol,
                                          atol=self.budget.dopri5_tol))
        finally:
            hook.remove()
        batches = math.ceil(len(labels) / GENERATION_BATCH)
        return torch.cat(out), calls[0] / batches

    def latent_fds(self, dit, flow, labels, reference: torch.Tensor, seed: int) -> dict[str, tuple[float, float]]:
        """{sampler: (latent Fréchet distance to ``reference`` [N, D], evaluations per sample)} for every sampler
        of ``budget.val_samplers`` at ``budget.val_nfe``."""
        scores = {}
        for method in self.budget.val_samplers:
            z, nfe = self.draw_latents(dit, flow, labels, self.budget.val_nfe, method, seed)
            scores[method] = (frechet_distance(reference, z.flatten(1)), nfe)
        return scores

    def reference_latents(self, split: str) -> torch.Tensor:
        """The encoded images of ``split`` ("val": the held-out training images; "test": the first
        ``final_reference`` test images), cached under ``work``: the references of the latent Fréchet distance."""
        path = self.work / (f"latents_val{self.budget.val_images}.pt" if split == "val"
                            else f"latents_test_first{self.budget.final_reference}.pt")
        if path.exists():
            return torch.load(path, weights_only=True)
        if split == "val":
            images = _split_images(self.budget, self.data_root)[0]
        else:
            images = load_image_dataset(self.budget.dataset, "test", self.data_root)[0][:self.budget.final_reference]
        with torch.no_grad():
            z = encode_dataset(self.autoencoder, pad_to(images, PADDED_SIZE) if images.shape[-1] == 28 else images)
        atomic_save(z, path)
        return z

    def full_test_features(self, progress: bool = False) -> torch.Tensor:
        """Inception features of the first ``final_reference`` test images (the reference of the final FIDs),
        cached under ``work``."""
        n = self.budget.final_reference
        return self.features(self.work / f"features_test_first{n}.pt",
                             lambda: load_image_dataset(self.budget.dataset, "test", self.data_root)[0][:n], progress)

    def images(self, dit, flow, labels, steps: int, method: str, seed: int, condition_tau=None, noise=None):
        sampling = SamplingConfig(steps=steps, method=method, condition_tau=condition_tau, seed=seed,
                                  batch_size=GENERATION_BATCH)
        images = generate_images(dit, flow, self.autoencoder, labels, sampling=sampling, noise=noise)
        return crop_to(images, self.image_size) if images.shape[-1] > self.image_size else images

    def features(self, path: Path, make_images, progress: bool = False) -> torch.Tensor:
        """Features of ``make_images()``, cached at ``path`` (feature extraction dominates a CPU study). Two runners
        of one study that need the same features (the test set's, 40 min on one core) extract them once: the
        second waits for the first's file instead of repeating the work."""
        while not path.exists():
            try:
                with FolderLock(path.parent, path.name + ".lock", what="feature extraction"):
                    if path.exists():  # finished between the check and the lock
                        break
                    features = extract_features(self.net, make_images(), progress=progress)
                    atomic_save(features, path)
                    return features
            except FolderBusyError:
                time.sleep(FEATURE_WAIT_S)
        return torch.load(path, weights_only=True)

    def balanced_labels(self, n: int) -> torch.Tensor:
        return torch.arange(n) % self.num_classes


def _split_images(budget: VisionStudyBudget, data_root):
    train, train_labels = load_image_dataset(budget.dataset, "train", data_root)
    if budget.train_images + budget.val_images > len(train):
        raise ValueError(f"{budget.dataset}: {len(train)} training images, fewer than train_images "
                         f"{budget.train_images} + val_images {budget.val_images}")
    test, test_labels = load_image_dataset(budget.dataset, "test", data_root)
    return train[len(train) - budget.val_images:], test[:budget.ref_samples], test_labels[:budget.ref_samples]


def prepare_study(budget: VisionStudyBudget, work: str | Path, data_root: str | None = None,
                  progress: bool = False, log=print) -> StudyContext:
    """The shared part of a study, built once and cached under ``work``: the autoencoder and latent cache
    (``work/latents``) and the Inception features of the validation and test references."""
    work = Path(work)
    torch.set_num_threads(budget.threads)
    data = budget.data_config(data_root)
    t0 = time.perf_counter()
    ae, latents, labels = prepare_latents(data, work / "latents", progress=progress)
    record = read_latent_record(work / "latents")
    val, test, test_labels = _split_images(budget, data_root)
    ctx = StudyContext(budget, work, ae.eval(), latents, labels, record["fingerprint"], val.shape[-1],
                       int(labels.max()) + 1, feature_network(budget.feature_net), torch.empty(0), torch.empty(0), test_labels,
                       data_root)
    if budget.selection == "latent_fd":  # no Inception until a cell's final FID asks for it
        ctx.val_latents = ctx.reference_latents("val")
        log(f"[prepare] latents {tuple(latents.shape)} (fingerprint {ctx.fingerprint}), latent references "
            f"{len(ctx.val_latents)} val ({time.perf_counter() - t0:.0f} s)")
        return ctx
    t1 = time.perf_counter()
    cached = (work / f"features_test_{budget.ref_samples}.pt").exists()
    ctx.val_features = ctx.features(work / f"features_val_{budget.val_images}.pt", lambda: val, progress)
    ctx.test_features = ctx.features(work / f"features_test_{budget.ref_samples}.pt", lambda: test, progress)
    # The FID feature rate sizes the whole study (see benchmarks/vision_study.py): report it when measured.
    rate = "" if cached else f", {(len(val) + len(test)) / (time.perf_counter() - t1):.1f} images/s"
    log(f"[prepare] latents {tuple(latents.shape)} (fingerprint {ctx.fingerprint}), reference features "
        f"{len(ctx.val_features)} val + {len(ctx.test_features)} test{rate} ({time.perf_counter() - t0:.0f} s)")
    return ctx


def check_same_latents(results: list[dict]) -> str:
    """The one latent fingerprint of ``results``; ``ValueError`` when cells trained in different latent spaces."""
    prints = {r["latents"] for r in results if "latents" in r}
    if len(prints) > 1:
        raise ValueError(f"the study's cells were trained on different latent spaces ({sorted(prints)}); a "
                         "comparison needs one: remove the stale results or use a fresh --work folder")
    return next(iter(prints), "")
