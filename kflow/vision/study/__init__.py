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

Modules: ``cells`` (budget, rows, ``StudyCell``) < ``context`` (``StudyContext``, ``prepare_study``, features) <
``model_cells`` / ``steering_cells`` < ``runner`` (cells from plain specs). The benchmark runner is
``benchmarks/vision_study.py`` (``python benchmarks/bench_vision.py --study``).
"""
from kflow.vision.study.cells import (HEADLINE, MATCHED_NFE, RESULT_VERSION, RUNTIME_ONLY, SELECTIONS, StudyCell,
                                     VisionStudyBudget, ablation_rows, band_step_is_euler, energy_band_weights,
                                     study_rows, sweep_settings)
from kflow.vision.study.context import StudyContext, check_same_latents, feature_network, prepare_study
from kflow.vision.study.model_cells import (PlateauReached, matched_nfe, plateau_reached, run_final_cell,
                                            run_model_cell)
from kflow.vision.study.runner import cell_spec, run_cell_spec, spec_cell, study_context
from kflow.vision.study.steering_cells import run_steering_cell

__all__ = ["VisionStudyBudget", "StudyContext", "StudyCell", "prepare_study", "run_model_cell", "run_steering_cell",
           "run_final_cell", "study_rows", "ablation_rows", "energy_band_weights", "sweep_settings",
           "check_same_latents", "matched_nfe", "SELECTIONS", "MATCHED_NFE", "feature_network", "PlateauReached",
           "plateau_reached", "RESULT_VERSION", "HEADLINE", "RUNTIME_ONLY", "band_step_is_euler", "cell_spec",
           "spec_cell", "study_context", "run_cell_spec"]
