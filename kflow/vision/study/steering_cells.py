"""Steering cells: noise splitting and condition dropping measured on one trained model (``run_steering_cell``).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from kflow.utils.io import safe_filename
from kflow.vision.artifacts import load_image_model
from kflow.vision.metrics import condition_dropping_scores, frechet_distance
from kflow.vision.steering import condition_dropping_grid, noise_splitting_scores, steering_figures
from kflow.vision.study.cells import CDR_SEED, HEADLINE, StudyCell
from kflow.vision.study.context import StudyContext


__all__ = ["run_steering_cell"]


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
