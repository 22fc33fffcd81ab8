"""Model cells: training with validation-FID checkpoint selection and a plateau stop, then the NFE sweep
(``run_model_cell``), and the final cells' test scores (``run_final_cell``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kflow.utils.io import atomic_save, atomic_write_text
from kflow.vision.artifacts import load_image_model, save_image_grid
from kflow.vision.data import crop_to
from kflow.vision.metrics import extract_features, frechet_distance, precision_recall
from kflow.vision.sampling import decode_latents
from kflow.vision.study.cells import (GRID_PER_CLASS, MATCHED_NFE, TEST_SEED, VAL_SEED, StudyCell, band_step_is_euler,
                                     sweep_settings)
from kflow.vision.study.context import StudyContext
from kflow.vision.workflow import train_image_model


__all__ = ["run_model_cell", "run_final_cell", "matched_nfe", "PlateauReached", "plateau_reached"]


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
