"""Resumable image-generation studies: flow matching vs K-Flow trained with validation-FID checkpoint selection on
the latents of one autoencoder, then scored by an NFE sweep, a schedule ablation and steerability measurements.

A study is a set of cells. A model cell (row × seed) trains one ``ImageModelConfig`` on the shared latent cache,
evaluates a validation FID every ``eval_every`` steps on a fixed subset (held-out training images; fixed labels and
noise), keeps the best EMA weights (``best.pt``) and stops after ``patience`` evaluations without improvement or at
``steps``; the best weights are then sampled at every NFE of the sweep. A steering cell measures noise splitting
and condition dropping for one trained model. Each finished cell is one JSON file written atomically
(``StudyCell.result_path``); a rerun loads it, an interrupted training resumes from its checkpoint, and the
Inception features of every sample set are cached beside the run, so an interrupted sweep resumes too.

Fairness by construction: ``prepare_study`` builds one autoencoder and one latent cache (``prepare_latents`` into
``<work>/latents``; a folder made from other settings is refused) and every cell trains on exactly those latents;
each result records the latent fingerprint, and ``check_same_latents`` refuses to put cells from different latent
spaces in one table. Sample noise depends only on the seed, so every model is sampled from the same noise.

The benchmark runner is ``benchmarks/vision_study.py`` (``python benchmarks/bench_vision.py --study``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from kflow.core import SAMPLING_METHODS
from kflow.utils.io import (FolderBusyError, FolderLock, atomic_save, atomic_write_text, check_saved_budget,
                            read_versioned_json, safe_filename)
from kflow.vision.analysis import band_energy_profile
from kflow.vision.artifacts import load_image_model, read_latent_record, save_image_grid
from kflow.vision.autoencoders import encode_dataset
from kflow.vision.config import ImageDataConfig, ImageModelConfig, build_decomposition
from kflow.vision.data import crop_to, load_image_dataset, pad_to
from kflow.vision.metrics import (InceptionFeatures, condition_dropping_scores, extract_features, frechet_distance,
                                  precision_recall)
from kflow.vision.sampling import SamplingConfig, decode_latents, generate_images, sample_latents
from kflow.vision.steering import condition_dropping_grid, noise_splitting_scores, steering_figures
from kflow.vision.workflow import MIN_LR_RATIO, PADDED_SIZE, prepare_latents, train_image_model

__all__ = ["VisionStudyBudget", "StudyContext", "StudyCell", "prepare_study", "run_model_cell", "run_steering_cell",
           "run_final_cell", "study_rows", "ablation_rows", "energy_band_weights", "sweep_settings",
           "check_same_latents", "matched_nfe", "SELECTIONS", "MATCHED_NFE", "feature_network", "PlateauReached",
           "plateau_reached", "RESULT_VERSION", "HEADLINE"]

RESULT_VERSION = 1
SELECTIONS = ("fid", "latent_fd")
MATCHED_NFE = 1.5  # a sampler competes for "best" only within 1.5x the validation NFE (see matched_nfe)
HEADLINE = ("heun", 20)  # the sampler of the main table: Heun, 20 function evaluations
VAL_SEED, TEST_SEED, CDR_SEED = 10_000, 20_000, 30_000  # sample-noise seeds: equal for every model
GENERATION_BATCH = 250
GRID_PER_CLASS = 10  # rows of a final cell's sample grid (samples.png)
FEATURE_WAIT_S = 10.0  # how often a runner checks on features another runner is extracting


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


# ---------------------------------------------------------------------------------------------- model cells
class PlateauReached(Exception):
    """Raised from the validation hook to end training once the validation FID has stopped improving."""


def plateau_reached(fids: list[float], patience: int, min_improvement: float = 0.0) -> bool:
    """True when the best of the last ``patience`` validation FIDs is not lower than the best before them by more
    than ``min_improvement`` (a fraction). Over a window rather than step by step, so a slow but steady gain keeps a
    run going; with 0 it is "no new best in ``patience`` evaluations"."""
    if len(fids) <= patience:
        return False
    before, recent = min(fids[:-patience]), min(fids[-patience:])
    return recent >= before * (1 - min_improvement)


def matched_nfe(nfe: dict[str, float], target: int) -> list[str]:
    """The samplers of ``nfe`` ({sampler: measured evaluations per sample}) that ran at a matched budget, at most
    ``MATCHED_NFE`` × ``target``; all of them if none did. dopri5 cannot go below ~6 evaluations per step and
    piece (K-Flow integrates each window piece separately), and an x1 model's stiff band ends can cost it 100+:
    such a run would win on budget, not on quality."""
    matched = [m for m, n in nfe.items() if n <= MATCHED_NFE * target]
    return matched or list(nfe)


class _ValidationFID:
    """eval_fn for ``train_image_model``: FID of ``val_samples`` EMA samples (fixed labels and noise) against the
    held-out validation images; keeps the best weights (best.pt) and a history (selection.json, atomic, so a
    resumed run keeps its earlier evaluations) and raises ``PlateauReached`` once ``plateau_reached``."""

    def __init__(self, ctx: StudyContext, run_dir: Path):
        self.ctx, self.run_dir, self.budget = ctx, run_dir, ctx.budget
        try:
            self.state = json.loads((run_dir / "selection.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.state = {"history": [], "best_step": None, "best_fid": math.inf, "stopped": False}

    def __call__(self, model, flow, step: int) -> dict:
        labels = self.ctx.balanced_labels(self.budget.val_samples)
        entry = {"step": step}
        if self.budget.selection == "latent_fd":
            # "fid" holds the selection score (here the best sampler's latent FD) so one history format serves both
            reference = self.ctx.val_latents.flatten(1)
            scores = self.ctx.latent_fds(model, flow, labels, reference, VAL_SEED)
            entry["latent_fd"] = {method: fd for method, (fd, _) in scores.items()}
            entry["nfe"] = {method: nfe for method, (_, nfe) in scores.items()}
            entry["sampler"] = min(matched_nfe(entry["nfe"], self.budget.val_nfe), key=entry["latent_fd"].get)
            entry["fid"] = entry["latent_fd"][entry["sampler"]]
        else:
            images = self.ctx.images(model, flow, labels, self.budget.val_nfe // 2, "heun", VAL_SEED)
            entry["fid"] = frechet_distance(self.ctx.val_features, extract_features(self.ctx.net, images))
        history = [h for h in self.state["history"] if h["step"] < step] + [entry]
        self.state["history"] = history
        if entry["fid"] < self.state["best_fid"]:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_save({k: v.detach().clone() for k, v in model.state_dict().items()}, self.run_dir / "best.pt")
            self.state.update(best_step=step, best_fid=entry["fid"], best_sampler=entry.get("sampler", "heun"))
        self.save(stopped=plateau_reached([h["fid"] for h in history], self.budget.patience,
                                          self.budget.min_improvement))
        if self.state["stopped"]:
            raise PlateauReached(step)
        if "latent_fd" not in entry:
            return {"fid": entry["fid"]}
        return {f"latent_fd_{method}": value for method, value in entry["latent_fd"].items()}

    def save(self, **changes):
        self.state.update(changes)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "selection.json", json.dumps(self.state, indent=1))


def run_model_cell(cell: StudyCell, ctx: StudyContext, progress: bool = False, log=print) -> dict:
    """Train ``cell.config`` (seed ``cell.seed``) for at most ``cell.steps`` steps with validation-FID checkpoint
    selection, then sample the best weights at every sweep setting (``sweep_settings``; ``cell.extra`` may keep
    only some "methods" and "nfe") and score FID / precision / recall against the test reference. A finished cell
    is loaded, not recomputed."""
    done = cell.load()
    if done is not None:
        return done
    budget = ctx.budget
    selector = _ValidationFID(ctx, cell.run_dir)
    t0 = time.perf_counter()
    stopped_at = None
    if not (selector.state["stopped"] or selector.state.get("trained")):
        log(f"[{cell.slug}] training up to {cell.steps} steps, validation FID every {budget.eval_every}")
        try:
            train_image_model(budget.data_config(ctx.data_root), cell.run_dir, cell.config,
                              latent_dir=ctx.work / "latents", steps=cell.steps, batch_size=budget.batch_size,
                              lr=budget.lr, min_lr_ratio=budget.min_lr_ratio, seed=cell.seed,
                              checkpoint_every=budget.eval_every, resume=True,
                              progress=progress, eval_fn=selector, eval_every=budget.eval_every)
        except PlateauReached as stop:
            stopped_at = int(stop.args[0])
        selector.save(trained=True)  # a rerun goes straight to the sweep
    train_s = time.perf_counter() - t0
    if selector.state["best_step"] is None:  # no evaluation happened (steps < eval_every): use the end
        dit, flow, _, _ = load_image_model(cell.run_dir)
        selector.state["stopped"] = True
        try:
            selector(dit, flow, cell.steps)
        except PlateauReached:
            pass
    history = selector.state["history"]
    dit, flow, _, record = load_image_model(cell.run_dir)
    dit.load_state_dict(torch.load(cell.run_dir / "best.pt", weights_only=True))
    dit.eval()
    labels = ctx.balanced_labels(budget.sweep_samples)
    sweep, t1 = {}, time.perf_counter()
    settings = [(m, n, k) for m, n, k in sweep_settings(cell.config, budget.nfe)
                if m in cell.extra.get("methods", (m,)) and n in cell.extra.get("nfe", (n,))]
    for method, nfe, steps in settings:
        if method == "band" and band_step_is_euler(cell.config) and f"euler@{nfe}" in sweep:
            sweep[f"band@{nfe}"] = {**sweep[f"euler@{nfe}"], "method": "band", "same_as": "euler"}
            log(f"[{cell.slug}] band NFE {nfe}: the Euler update for this model (velocity, linear ramps)")
            continue
        f = ctx.features(cell.run_dir / f"features_{method}_nfe{nfe}_n{budget.sweep_samples}.pt",
                         lambda: ctx.images(dit, flow, labels, steps, method, TEST_SEED), progress)
        precision, recall = precision_recall(ctx.test_features, f)
        sweep[f"{method}@{nfe}"] = {"method": method, "nfe": nfe, "steps": steps, "precision": precision,
                                    "recall": recall, "fid": frechet_distance(ctx.test_features, f)}
        log(f"[{cell.slug}] {method} NFE {nfe}: FID {sweep[f'{method}@{nfe}']['fid']:.2f}")
    final = _final_latent_scores(cell, ctx, dit, flow, log) if budget.final_samples else None
    last_eval = history[-1]["step"] if history else None
    if stopped_at is not None:
        log(f"[{cell.slug}] validation FID stopped improving: stopped at step {stopped_at}")
    result = {"config": record, "budget": asdict(budget), "latents": ctx.fingerprint, "steps_planned": cell.steps,
              "steps_run": last_eval, "stopped_early": last_eval is not None and last_eval < cell.steps,
              "best_step": selector.state["best_step"], "best_val_fid": selector.state["best_fid"],
              "history": history, "train_s": train_s, "sweep_s": time.perf_counter() - t1, "sweep": sweep,
              "sweep_samples": budget.sweep_samples, "reference": len(ctx.test_features)}
    if final is not None:
        result.update(selection=budget.selection, best_sampler=selector.state.get("best_sampler", "heun"), final=final)
    return cell.save(result)


def _final_latent_scores(cell: StudyCell, ctx: StudyContext, dit, flow, log) -> dict:
    """Latent Fréchet distance of ``final_samples`` samples (balanced classes, the test noise) under each
    validation sampler at ``val_nfe`` against the whole test set's latents: {sampler: {"latent_fd", "nfe"}}."""
    budget = ctx.budget
    reference = ctx.reference_latents("test").flatten(1)
    labels = ctx.balanced_labels(budget.final_samples)
    scores = {}
    for method, (fd, nfe) in ctx.latent_fds(dit, flow, labels, reference, TEST_SEED).items():
        scores[method] = {"latent_fd": fd, "nfe": nfe}
        log(f"[{cell.slug}] {method} ({nfe:.0f} NFE): test latent FD {fd:.3f} ({len(labels)} samples vs "
            f"{len(reference)} test latents)")
    return scores


def run_final_cell(cell: StudyCell, ctx: StudyContext, progress: bool = False, log=print) -> dict:
    """FID, precision and recall of ``final_samples`` images of a finished model cell (``cell.extra["run"]``,
    its best weights) under the sampler that won its validation (``cell.extra["sampler"]``) at ``val_nfe``,
    against Inception features of the whole test set: the final table's numbers. Features are cached."""
    done = cell.load()
    if done is not None:
        return done
    budget, run, method = ctx.budget, Path(cell.extra["run"]), cell.extra["sampler"]
    dit, flow, _, _ = load_image_model(run)
    dit.load_state_dict(torch.load(run / "best.pt", weights_only=True))
    dit.eval()
    t0 = time.perf_counter()
    reference = ctx.full_test_features(progress)
    labels = ctx.balanced_labels(budget.final_samples)
    nfe = []

    def make_images():
        z, calls = ctx.draw_latents(dit, flow, labels, budget.val_nfe, method, TEST_SEED)
        nfe.append(calls)
        images = decode_latents(ctx.autoencoder, z)
        images = crop_to(images, ctx.image_size) if images.shape[-1] > ctx.image_size else images
        # what the FID scores, to look at: the first 10 samples of each class, a column per class
        per_class = min(GRID_PER_CLASS, *(int((labels == c).sum()) for c in range(ctx.num_classes)))
        first = torch.stack([torch.nonzero(labels == c)[:per_class, 0] for c in range(ctx.num_classes)], 1)
        save_image_grid(images[first.flatten()], cell.result_path.with_suffix(".png"), nrow=ctx.num_classes)
        return images

    features = ctx.features(run / f"features_final_{method}_nfe{budget.val_nfe}_n{len(labels)}.pt", make_images,
                            progress)
    precision, recall = precision_recall(reference, features)
    fid = frechet_distance(reference, features)
    log(f"[{cell.slug}] {method} at {budget.val_nfe} NFE: FID {fid:.2f} ({len(labels)} samples vs the "
        f"{len(reference)} test images)")
    return cell.save({"run": str(run), "latents": ctx.fingerprint, "budget": asdict(budget), "sampler": method,
                      "nfe": nfe[0] if nfe else None, "samples": len(labels), "reference": len(reference),
                      "fid": fid, "precision": precision, "recall": recall, "seconds": time.perf_counter() - t0})


# ---------------------------------------------------------------------------------------------- steering cells
def run_steering_cell(cell: StudyCell, ctx: StudyContext, figures: Path, split=None, cdr: bool = True,
                      progress: bool = False, log=print) -> dict:
    """Steerability of the trained model in ``cell.extra["run"]`` (its best weights): noise-splitting grids and
    band-wise correlations under ``split`` (a K-Flow decomposition, so flow matching is probed with the same bands),
    the condition-dropping grid over several τ, and (``cdr``) the Class-Dropping-Ratio at each τ of the budget."""
    done = cell.load()
    if done is not None:
        return done
    budget = ctx.budget
    run = Path(cell.extra["run"])
    dit, flow, _, _ = load_image_model(run)
    dit.load_state_dict(torch.load(run / "best.pt", weights_only=True))
    dit.eval()
    split = split if split is not None else flow.decomposition
    steps, method = HEADLINE[1] // 2, HEADLINE[0]
    t0 = time.perf_counter()
    prefix = "vision_study_" + safe_filename(cell.row).lower() + "_"
    figures.mkdir(parents=True, exist_ok=True)
    paths = steering_figures(dit, flow, ctx.autoencoder, figures, pairs=budget.figure_pairs, steps=steps,
                             method=method, prefix=prefix, split=split, tau=budget.taus[0])
    paths["condition_dropping_taus"] = condition_dropping_grid(
        dit, flow, ctx.autoencoder, figures / f"{prefix}condition_dropping_taus.png", steps=steps, method=method,
        classes=min(8, ctx.num_classes))
    correlation = noise_splitting_scores(dit, flow, split, pairs=budget.correlation_pairs, steps=steps,
                                         method=method, seed=CDR_SEED)
    log(f"[{cell.slug}] band correlation (shared low / shared high / independent): "
        + " | ".join(" ".join(f"{v:.2f}" for v in correlation[k]) for k in correlation))
    result = {"run": str(run), "latents": ctx.fingerprint, "band_correlation": correlation,
              "figures": {k: str(v) for k, v in paths.items()}, "sampler": f"{method}@{HEADLINE[1]}"}
    if cdr:
        labels = ctx.balanced_labels(budget.cdr_per_class * ctx.num_classes)
        kept = ctx.features(cell.run_dir / f"features_cdr_kept_n{len(labels)}.pt",
                            lambda: ctx.images(dit, flow, labels, steps, method, CDR_SEED), progress)
        result["cdr"] = {}
        for tau in budget.taus:
            dropped = ctx.features(cell.run_dir / f"features_cdr_tau{tau:g}_n{len(labels)}.pt",
                                   lambda: ctx.images(dit, flow, labels, steps, method, CDR_SEED, condition_tau=tau),
                                   progress)
            scores = condition_dropping_scores(ctx.test_features, ctx.test_labels, kept, labels, dropped, labels,
                                               progress=progress)
            scores["fid_dropped"] = frechet_distance(ctx.test_features, dropped)
            scores["fid_kept"] = frechet_distance(ctx.test_features, kept)
            result["cdr"][f"{tau:g}"] = scores
            log(f"[{cell.slug}] CDR at tau {tau:g}: {scores['cdr']:.3f}")
    result["seconds"] = time.perf_counter() - t0
    return cell.save(result)


# ---------------------------------------------------------------------------------------------- running cells
_CONTEXTS: dict[str, StudyContext] = {}


def cell_spec(cell: StudyCell, budget: VisionStudyBudget, data_root: str | None = None, **options) -> dict:
    """A cell as plain data, so a worker process can run it (``run_cell_spec``). ``options``: ``figures``,
    ``split_run`` (the run whose decomposition splits the noise) and ``cdr`` for steering cells."""
    return {"kind": cell.kind, "row": cell.row, "seed": cell.seed, "out": str(cell.out), "work": str(cell.work),
            "config": None if cell.config is None else cell.config.to_dict(), "steps": cell.steps,
            "extra": cell.extra, "budget": asdict(budget), "data_root": data_root, **options}


def spec_cell(spec: dict) -> StudyCell:
    config = None if spec["config"] is None else ImageModelConfig.from_dict(spec["config"])
    return StudyCell(spec["kind"], spec["row"], spec["seed"], Path(spec["out"]), Path(spec["work"]), config,
                     spec["steps"], dict(spec["extra"]), VisionStudyBudget(**spec["budget"]))


def study_context(budget: VisionStudyBudget, work: str | Path, data_root=None, progress=False, log=print):
    """``prepare_study``, once per process (workers reuse the context for every cell they run)."""
    key = json.dumps([asdict(budget), str(work)], sort_keys=True)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = prepare_study(budget, work, data_root, progress, log)
    return _CONTEXTS[key]


def run_cell_spec(spec: dict, progress: bool = False) -> dict:
    """Run the cell described by ``cell_spec`` in this process; returns its result."""
    from functools import partial

    log = partial(print, flush=True)
    budget = VisionStudyBudget(**spec["budget"])
    ctx = study_context(budget, spec["work"], spec["data_root"], progress, log)
    cell = spec_cell(spec)
    # One process per cell: a second runner of the same study gets FolderBusyError and moves on to another cell.
    with FolderLock(cell.run_dir, f"{cell.kind}.lock", what="study runner"):
        if cell.kind == "model":
            return run_model_cell(cell, ctx, progress, log)
        if cell.kind == "final":
            return run_final_cell(cell, ctx, progress, log)
        split = load_image_model(spec["split_run"])[1].decomposition if spec.get("split_run") else None
        return run_steering_cell(cell, ctx, Path(spec["figures"]), split=split, cdr=spec.get("cdr", True),
                                 progress=progress, log=log)
