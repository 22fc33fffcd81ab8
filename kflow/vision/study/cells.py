"""The cells of an image study: the budget every number depends on (``VisionStudyBudget``), the rows (models) and
the sampler sweep, and ``StudyCell``, one saved JSON result per cell.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kflow.core import SAMPLING_METHODS
from kflow.utils.io import atomic_write_text, check_saved_budget, read_versioned_json, safe_filename
from kflow.vision.analysis import band_energy_profile
from kflow.vision.config import ImageDataConfig, ImageModelConfig, build_decomposition
from kflow.vision.workflow import MIN_LR_RATIO


__all__ = ["VisionStudyBudget", "StudyCell", "study_rows", "ablation_rows", "energy_band_weights", "sweep_settings",
           "SELECTIONS", "MATCHED_NFE", "RESULT_VERSION", "HEADLINE", "RUNTIME_ONLY", "band_step_is_euler",
           "GENERATION_BATCH", "GRID_PER_CLASS"]


RESULT_VERSION = 1
SELECTIONS = ("fid", "latent_fd")
MATCHED_NFE = 1.5  # a sampler competes for "best" only within 1.5x the validation NFE (see matched_nfe)
HEADLINE = ("heun", 20)  # the sampler of the main table: Heun, 20 function evaluations
VAL_SEED, TEST_SEED, CDR_SEED = 10_000, 20_000, 30_000  # sample-noise seeds: equal for every model
GENERATION_BATCH = 250
GRID_PER_CLASS = 10  # rows of a final cell's sample grid (samples.png)


@dataclass(frozen=True)
class VisionStudyBudget:
    """Everything a study's numbers depend on; shared by every cell."""

    # data and the one latent space
    dataset: str = "fashion-mnist"
    train_images: int = 50000  # the first N training images train the autoencoder and every model
    val_images: int = 500  # the last N training images (never trained on): the validation FID reference
    ae_steps: int = 1000
    ae_width: int = 16
    latent_channels: int = 1
    ae_downsample: int = 1  # 32×32 -> 16×16 latents: the smallest grid on which db6 has a level
    # model and optimiser (identical for every row)
    model: str = "DiT-M/4"
    num_bands: int = 2
    wavelet: str | None = "db6"
    batch_size: int = 64
    lr: float = 3e-4
    steps: int = 6000  # the most steps a model trains
    ablation_steps: int = 3000  # the schedule variants compare at equal steps, half the main budget
    min_lr_ratio: float = MIN_LR_RATIO  # the cosine LR decay ends at this fraction of lr at `steps`; 1: constant
    eval_every: int = 1000
    patience: int = 3  # stop when the last `patience` validation FIDs ...
    min_improvement: float = 0.0  # ... improve on the best before them by no more than this fraction
    val_samples: int = 200
    val_nfe: int = 20  # validation samples: Heun at this NFE
    # checkpoint selection: "fid" (Inception FID of decoded validation samples, Heun) or "latent_fd" (Fréchet
    # distance of the validation samples' latents to the held-out images' latents under each of `val_samplers`
    # at `val_nfe`, the best sampler's value kept: cheap, so a sampler sweep fits every evaluation)
    selection: str = "fid"
    val_samplers: tuple[str, ...] = ("heun",)
    dopri5_tol: float = 1e-2  # rtol = atol of the adaptive sampler (its NFE is measured and reported)
    final_samples: int = 0  # > 0: each model cell also scores this many samples per sampler against the test set
    final_reference: int = 10000  # the first N test images (Fashion-MNIST has 10,000: all) are the final reference
    # evaluation
    ref_samples: int = 1000  # first N test images: the reference of the sweep and of the per-class FIDs
    sweep_samples: int = 200
    nfe: tuple[int, ...] = (4, 10, 20, 50)
    cdr_per_class: int = 30
    taus: tuple[float, ...] = (0.3, 0.6)
    correlation_pairs: int = 64
    figure_pairs: int = 6
    threads: int = 1  # torch threads per worker process
    feature_net: str | None = None  # a TorchScript feature network instead of Inception-v3 (development only)

    def __post_init__(self):
        object.__setattr__(self, "nfe", tuple(int(n) for n in self.nfe))
        object.__setattr__(self, "taus", tuple(float(t) for t in self.taus))
        object.__setattr__(self, "val_samplers", tuple(str(m) for m in self.val_samplers))
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        unknown = [m for m in self.val_samplers if m not in SAMPLING_METHODS]
        if unknown or not self.val_samplers:
            raise ValueError(f"val_samplers must name samplers of {SAMPLING_METHODS}, got {list(self.val_samplers)}")

    def data_config(self, data_root: str | None = None) -> ImageDataConfig:
        return ImageDataConfig(self.dataset, "conv", self.ae_steps, self.ae_width, self.train_images, 0, data_root,
                               self.latent_channels, self.ae_downsample)

    def model_config(self, decomposition: str, **changes) -> ImageModelConfig:
        bands = 1 if decomposition == "none" else self.num_bands
        return ImageModelConfig(model=self.model, decomposition=decomposition, num_bands=bands,
                                wavelet=self.wavelet if decomposition == "wavelet" else None, **changes)


RUNTIME_ONLY = ("threads",)  # budget fields that change how fast a cell runs, not what it measures


def study_rows(budget: VisionStudyBudget) -> dict[str, ImageModelConfig]:
    """The compared models: flow matching (one band) and K-Flow with each decomposition, same DiT and schedule."""
    return {"flow matching": budget.model_config("none"),
            "K-Flow Fourier": budget.model_config("fourier"),
            "K-Flow Wavelet": budget.model_config("wavelet"),
            "K-Flow PCA": budget.model_config("pca")}


def energy_band_weights(latents: torch.Tensor, config: ImageModelConfig) -> tuple[float, ...]:
    """Each band's share of the training latents' energy under ``config``'s decomposition: window widths
    proportional to these give a band time in proportion to how much of the image it carries."""
    dec = build_decomposition(config.decomposition, tuple(latents.shape[1:]), config.num_bands, fit_data=latents,
                              wavelet=config.wavelet)
    return tuple(float(s) for s in band_energy_profile(latents, dec)["energy_share"])


def ablation_rows(base_row: str, base: ImageModelConfig, latents: torch.Tensor) -> dict[str, ImageModelConfig]:
    """One change at a time to the best decomposition's schedule (equal windows, overlap 0, low→high)."""
    return {f"{base_row}, energy windows": replace(base, band_weights=energy_band_weights(latents, base)),
            f"{base_row}, overlap 0.2": replace(base, overlap=0.2),
            f"{base_row}, high→low": replace(base, order="high_to_low")}


def sweep_settings(config: ImageModelConfig, nfe: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """(method, NFE, steps) of the sweep: Euler (1 evaluation a step) and Heun (2) for every model, and the
    band-aware step (1) for K-Flow; a setting with fewer steps than the schedule has segments is left out."""
    methods = ("euler", "heun") + (("band",) if config.num_bands > 1 else ())
    segments = 1 if config.num_bands == 1 else (config.num_bands if config.overlap == 0 else 2 * config.num_bands - 1)
    out = []
    for method in methods:
        for n in nfe:
            steps = n // 2 if method == "heun" else n
            if steps >= segments:
                out.append((method, n, steps))
    return out


def band_step_is_euler(config: ImageModelConfig) -> bool:
    """For a velocity-predicting model with linear ramps the band-aware step is the Euler update on the same grid
    (KFlow.sample; tested), so the sweep reuses Euler's samples instead of drawing the same images twice."""
    return config.prediction == "velocity" and config.ramp == "linear"


# ---------------------------------------------------------------------------------------------- cells
@dataclass
class StudyCell:
    """One (row, seed) of a study; ``out`` holds the result JSON, ``work`` the run folder and cached features."""

    kind: str  # "model" or "steering"
    row: str
    seed: int
    out: Path
    work: Path
    config: ImageModelConfig | None = None
    steps: int = 0
    extra: dict = field(default_factory=dict)
    budget: VisionStudyBudget | None = None  # when set, a result saved under another budget is refused on load

    @property
    def slug(self) -> str:
        return f"{self.kind}/" + safe_filename(self.row) + f"_s{self.seed}"

    @property
    def result_path(self) -> Path:
        return self.out / f"{self.slug}.json"

    @property
    def run_dir(self) -> Path:
        return self.work / "runs" / (safe_filename(self.row) + f"_s{self.seed}")

    def load(self) -> dict | None:
        """The saved result, or None when the cell has not finished (or was saved by another study version).
        Raises ValueError when the result was computed under a budget other than ``self.budget``: reusing it
        silently would put numbers from two budgets in one table."""
        record = read_versioned_json(self.result_path, RESULT_VERSION)
        check_saved_budget(self.result_path, record, self.budget, ignore=RUNTIME_ONLY)
        return record

    def save(self, result: dict) -> dict:
        result = {"version": RESULT_VERSION, "kind": self.kind, "row": self.row, "seed": self.seed, **result}
        atomic_write_text(self.result_path, json.dumps(result, indent=1) + "\n")
        return result
