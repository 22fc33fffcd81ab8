"""Resumable comparison studies for molecular assembly: train each (model, seed) with validation-based checkpoint
selection, score it on one fixed test split, and compare models per test cluster.

A study is a set of cells (data set × start preset × model × seed). Each finished cell is one JSON file
(``StudyCell.result_path``) written atomically as soon as it exists; a rerun loads it instead of training again,
and an interrupted training run resumes from its last checkpoint. So a study of hours can span several sittings.

Model selection: every ``eval_every`` steps the EMA model samples the first ``val_clusters`` clusters of the
validation split and the checkpoint with the lowest ``select_metric`` (PM-center, index-paired for the ``mild``
start and permutation-invariant for ``hard``) is kept (``best.pt``); the test split is scored with it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kflow.molecular.data.datasets import ClusterDataset, StartHands, with_start_hands
from kflow.molecular.model.config import GENERATIVE, AssemblyModelConfig, build_assembly_model
from kflow.molecular.model.flow import AssemblyBatch, collate_clusters
from kflow.molecular.model.sampling import predict_assembly
from kflow.molecular.workflow import (SELECT_METRIC, BestCheckpoint, evaluate_assembly, first_clusters,
                                      metrics_summary, train_assembly)
from kflow.utils.io import atomic_write_text, check_saved_budget, read_versioned_json, safe_filename

__all__ = ["StudyBudget", "StudyCell", "BestCheckpoint", "study_models", "generative_models", "run_model_cell",
           "run_packmol_cell", "run_identity_cell", "run_hands_cell", "run_shell_cell", "run_pyxtal_cell", "run_relaxed_cell", "run_medoid_cell", "paired_comparison",
           "band_energy_shares", "first_clusters", "SELECT_METRIC", "GENERATIVE"]

RESULT_VERSION = 1


@dataclass
class StudyBudget:
    """Training and evaluation budget shared by every model of a study."""

    epochs: float = 10.0  # passes over the train split
    batch_size: int = 4
    lr: float = 2e-3
    evals: int = 8  # validation evaluations per run (evenly spaced; the last at the final step)
    val_clusters: int = 48
    test_clusters: int | None = None  # None: the whole test split
    sample_steps: int = 10
    packmol_nloop: int | None = None

    def steps(self, train_size: int) -> int:
        return max(int(round(self.epochs * train_size / self.batch_size)), 1)

    def eval_every(self, train_size: int) -> int:
        return max(self.steps(train_size) // self.evals, 1)


@dataclass
class StudyCell:
    """One (table, row, seed) of a study; ``out`` is the study's result folder, ``work`` its checkpoint folder."""

    dataset: str
    preset: str
    row: str
    seed: int
    out: Path
    work: Path
    config: AssemblyModelConfig | None = None
    extra: dict = field(default_factory=dict)
    budget: StudyBudget | None = None  # when set, a result saved under another budget is refused on load

    @property
    def slug(self) -> str:
        return safe_filename(f"{self.dataset}_{self.preset}") + "/" + safe_filename(self.row) + f"_s{self.seed}"

    @property
    def result_path(self) -> Path:
        return self.out / f"{self.slug}.json"

    @property
    def run_dir(self) -> Path:
        return self.work / self.slug

    def load(self) -> dict | None:
        """The saved result, or None when the cell has not finished (or was saved by another study version).
        Raises ValueError when it was computed under a budget other than ``self.budget``."""
        record = read_versioned_json(self.result_path, RESULT_VERSION)
        check_saved_budget(self.result_path, record, self.budget)
        return record

    def save(self, result: dict) -> dict:
        result = {"version": RESULT_VERSION, "dataset": self.dataset, "preset": self.preset, "row": self.row,
                  "seed": self.seed, **result}
        atomic_write_text(self.result_path, json.dumps(result, indent=1) + "\n")
        return result


def study_models(preset: str, rows: tuple[str, ...] | None = None) -> dict[str, AssemblyModelConfig]:
    """The trained rows of the study, all with the default network: the direct-regression baseline, rigid flow
    matching (K=1), K-Flow K=2 and K=3, and K-Flow K=2 travelling from high to low frequencies. Training pairs
    molecules by index for the ``mild`` start (each start molecule is next to its target) and by an optimal
    assignment (``coupling="ot"``) for ``hard`` (the start's numbering says nothing about the targets). For ``hard``
    two more rows train the generative set-up: equivariant OT coupling (``"eot"``) and a network that sees only
    the current poses (``condition_on_start=False``)."""
    coupling = "index" if preset == "mild" else "ot"
    models = {
        "regression": AssemblyModelConfig(num_bands=1, objective="regression", coupling=coupling),
        "rigid FM (K=1)": AssemblyModelConfig(num_bands=1, coupling=coupling),
        "K-Flow (K=2)": AssemblyModelConfig(num_bands=2, coupling=coupling),
        "K-Flow (K=3)": AssemblyModelConfig(num_bands=3, coupling=coupling),
        "K-Flow (K=2, high→low)": AssemblyModelConfig(num_bands=2, order="high_to_low", coupling=coupling),
    }
    if preset == "hard":  # the generative set-up: equivariant OT coupling and a network that cannot see the start
        models["rigid FM (K=1), eot, noise source"] = AssemblyModelConfig(num_bands=1, coupling="eot",
                                                                          condition_on_start=False)
        models["K-Flow (K=2), eot, noise source"] = AssemblyModelConfig(num_bands=2, coupling="eot",
                                                                        condition_on_start=False)
    models.update(generative_models())
    return models if rows is None else {r: models[r] for r in rows}


def generative_models() -> dict[str, AssemblyModelConfig]:
    """The rows of the generative hard-start study: rigid FM (K=1), K-Flow K=2 and K=3 and the one-step regression
    from the start, all with the ``GENERATIVE`` recipe; and single-change ablations of K=1 (each recipe choice put
    back to its earlier value), which measure what every change brings, K=1 from the "shell" start preset, and
    K=1 with the start hands of ``kflow assemble`` ("mirror none" / "mirror half")."""
    rows = {
        "regression, generative": AssemblyModelConfig(num_bands=1, objective="regression", **GENERATIVE),
        "rigid FM (K=1), generative": AssemblyModelConfig(num_bands=1, **GENERATIVE),
        "K-Flow (K=2), generative": AssemblyModelConfig(num_bands=2, **GENERATIVE),
        "K-Flow (K=3), generative": AssemblyModelConfig(num_bands=3, **GENERATIVE),
    }
    ablations = {"fixed starts": {"redraw_starts": False}, "chart rotation loss": {"rotation_loss": "chart"},
                 "uniform times": {"time_sampling": "uniform"}, "no central role": {"central": False}}
    for label, change in ablations.items():
        rows[f"rigid FM (K=1), generative, {label}"] = AssemblyModelConfig(num_bands=1, **{**GENERATIVE, **change})
    # The same model trained and sampled from the "shell" start preset (the even shell as a source).
    rows["rigid FM (K=1), generative, shell source"] = AssemblyModelConfig(num_bands=1, **GENERATIVE)
    # Start copies with the hands kflow assemble gives a lone molecule (all one hand, or half mirrored), in training
    # and on the test starts, instead of the crystal's (datasets.set_start_hands).
    for mirror in ("none", "half"):
        rows[f"rigid FM (K=1), generative, mirror {mirror}"] = AssemblyModelConfig(num_bands=1, start_mirror=mirror,
                                                                                   **GENERATIVE)
    return rows


def run_model_cell(cell: StudyCell, store, budget: StudyBudget, progress: bool = False, log=print) -> dict:
    """Train ``cell.config`` with ``cell.seed`` on the train split (crystal split and start draws fixed by data seed
    0, so every seed is scored on the same test clusters), keep the best validation checkpoint, score the test
    split with it and save the result. A finished cell is loaded, not retrained. A config with ``start_mirror``
    validates and tests on starts with those hands (``with_start_hands``)."""
    done = cell.load()
    if done is not None:
        return done
    train = ClusterDataset(store, split="train", seed=0)
    val = with_start_hands(first_clusters(ClusterDataset(store, split="valid", seed=0), budget.val_clusters),
                           cell.config.start_mirror)
    test = with_start_hands(first_clusters(ClusterDataset(store, split="test", seed=0), budget.test_clusters),
                            cell.config.start_mirror)
    steps, eval_every = budget.steps(len(train)), budget.eval_every(len(train))
    _, rigid = build_assembly_model(cell.config)
    selector = BestCheckpoint(cell.run_dir, val, rigid, SELECT_METRIC[cell.preset], budget.sample_steps)
    log(f"[{cell.slug}] {steps} steps ({budget.epochs:g} epochs of {len(train)} clusters), validation every "
        f"{eval_every}")
    t0 = time.perf_counter()
    model, rigid, summary = train_assembly(store, cell.run_dir, cell.config, steps=steps,
                                           batch_size=budget.batch_size, lr=budget.lr, seed=cell.seed,
                                           split_seed=0, resume=True, checkpoint_every=eval_every,
                                           progress=progress, eval_fn=selector, eval_every=eval_every)
    train_s = time.perf_counter() - t0
    if selector.best["step"] is None:  # no evaluation happened (e.g. finished before eval_every): use the end
        selector(model, steps)
    model.load_state_dict(torch.load(cell.run_dir / "best.pt", weights_only=True))
    t0 = time.perf_counter()
    preds = predict_assembly(model.eval(), rigid, test, steps=budget.sample_steps)
    results = evaluate_assembly(test, preds)
    result = {"kind": "model", "config": cell.config.to_dict(), "budget": asdict(budget), "steps": steps,
              "epochs": steps * budget.batch_size / len(train), "train_clusters": len(train),
              "best_step": selector.best["step"], "best_val": selector.best["value"],
              "select_metric": SELECT_METRIC[cell.preset], "train_s": train_s,
              "steps_run": summary.get("steps_run"), "test_s": time.perf_counter() - t0,
              "test_names": [test.cluster(i).name for i in range(len(test))], "metrics": metrics_summary(results)}
    return cell.save(result)


def run_shell_cell(cell: StudyCell, store, budget: StudyBudget) -> dict:
    """The data-free evenly spread shell (``baselines.shell_predictions``, seeded by the cell's seed), scored like
    a model: what a start from the molecule alone gives with no learning at all."""
    from kflow.molecular.baselines.shell import shell_predictions

    done = cell.load()
    if done is not None:
        return done
    test = first_clusters(ClusterDataset(store, split="test", seed=0), budget.test_clusters)
    results = evaluate_assembly(test, shell_predictions(test, cell.seed))
    return cell.save({"kind": "baseline", "test_names": [test.cluster(i).name for i in range(len(test))],
                      "metrics": metrics_summary(results)})


def run_pyxtal_cell(cell: StudyCell, store, budget: StudyBudget, progress: bool = False) -> dict:
    """PyXtal random crystals (``baselines.pyxtal_predictions``: the start molecule packed in the five most frequent
    organic space groups at its estimated density, cut to the cluster, best by the contact score), seeded by the
    cell's seed: what a chemist would try first, scored like a model."""
    from kflow.molecular.baselines.pyxtal import pyxtal_predictions

    done = cell.load()
    if done is not None:
        return done
    test = first_clusters(ClusterDataset(store, split="test", seed=0), budget.test_clusters)
    info: dict = {}
    t0 = time.perf_counter()
    preds = pyxtal_predictions(test, cell.seed, progress=progress, info=info)
    results = evaluate_assembly(test, preds)
    return cell.save({"kind": "baseline", "seconds": time.perf_counter() - t0,
                      "fallback_clusters": info.get("fallback", 0), "space_groups": info.get("space_group"),
                      "test_names": [test.cluster(i).name for i in range(len(test))],
                      "metrics": metrics_summary(results)})


def run_relaxed_cell(cell: StudyCell, model_cell: StudyCell, store, budget: StudyBudget,
                     progress: bool = False) -> dict:
    """``model_cell``'s selected checkpoint, sampled on the test split as in its own cell, then every prediction
    relaxed as rigid molecules against MMFF94 (``relax.relax_cluster``, what ``kflow assemble`` does by default):
    the pipeline a user runs, scored like a model. Needs ``model_cell`` finished."""
    from tqdm.auto import tqdm

    from kflow.molecular.physics.relax import relax_cluster

    done = cell.load()
    if done is not None:
        return done
    model, rigid, test = _model_and_test(cell, model_cell, store, budget)
    t0 = time.perf_counter()
    preds = predict_assembly(model, rigid, test, steps=budget.sample_steps)
    relaxed, shifts, failed = [], [], 0
    for i in tqdm(range(len(test)), desc=f"relaxing {cell.row}", disable=not progress, leave=False):
        item = test[i]
        try:
            r = relax_cluster(item.atomic_numbers, preds[i][0].double(), item.molecule_index)
            moved = torch.as_tensor(r.positions, dtype=preds[i].dtype)
        except ValueError:  # no force field for this molecule: scored unrelaxed, counted
            moved, failed = preds[i][0], failed + 1
        shifts.append(float((moved - preds[i][0]).square().sum(-1).mean().sqrt()))
        relaxed.append(moved[None])
    results = evaluate_assembly(test, relaxed)
    return cell.save({"kind": "relaxed", "model_cell": model_cell.slug, "seconds": time.perf_counter() - t0,
                      "not_relaxed": failed, "mean_shift_A": float(np.mean(shifts)),
                      "test_names": [test.cluster(i).name for i in range(len(test))],
                      "metrics": metrics_summary(results)})


def _model_and_test(cell: StudyCell, model_cell: StudyCell, store, budget: StudyBudget):
    """(``model_cell``'s selected EMA model in eval mode, its rigid flow, the study's test split with the model's
    start hands) for a cell that re-uses a finished model cell."""
    base = model_cell.load()
    if base is None:
        raise ValueError(f"{cell.slug}: the model cell {model_cell.slug} has not finished")
    config = AssemblyModelConfig.from_dict(base["config"])
    model, rigid = build_assembly_model(config)
    model.load_state_dict(torch.load(model_cell.run_dir / "best.pt", weights_only=True))
    test = with_start_hands(first_clusters(ClusterDataset(store, split="test", seed=0), budget.test_clusters),
                            config.start_mirror)
    return model.eval(), rigid, test


def run_medoid_cell(cell: StudyCell, model_cell: StudyCell, store, budget: StudyBudget, samples: int = 8) -> dict:
    """``model_cell``'s selected checkpoint sampled ``samples`` times per test cluster from independent starts
    (``sampling.predict_medoid``; the first is the stored start) and the consensus sample kept (minimum Bayes risk
    under matched PM-center, no reference used), scored like a model. Needs ``model_cell`` finished."""
    from kflow.molecular.model.sampling import predict_medoid

    done = cell.load()
    if done is not None:
        return done
    model, rigid, test = _model_and_test(cell, model_cell, store, budget)
    t0 = time.perf_counter()
    preds = predict_medoid(model, rigid, test, samples=samples, steps=budget.sample_steps, seed=cell.seed)
    results = evaluate_assembly(test, preds)
    return cell.save({"kind": "medoid", "model_cell": model_cell.slug, "samples": samples,
                      "seconds": time.perf_counter() - t0,
                      "test_names": [test.cluster(i).name for i in range(len(test))],
                      "metrics": metrics_summary(results)})


def run_hands_cell(cell: StudyCell, model_cell: StudyCell, store, budget: StudyBudget, mirror: str) -> dict:
    """``model_cell``'s selected checkpoint scored, as in its cell, on test starts whose copies have the hands
    ``mirror`` (``datasets.set_start_hands``): what ``kflow assemble`` gives the model for a lone molecule, when it
    was trained on the crystal's hands. Needs ``model_cell`` finished."""
    done = cell.load()
    if done is not None:
        return done
    model, rigid, test = _model_and_test(cell, model_cell, store, budget)
    test = StartHands(test, mirror)
    t0 = time.perf_counter()
    preds = predict_assembly(model, rigid, test, steps=budget.sample_steps)
    results = evaluate_assembly(test, preds)
    return cell.save({"kind": "hands", "model_cell": model_cell.slug, "mirror": mirror,
                      "seconds": time.perf_counter() - t0,
                      "test_names": [test.cluster(i).name for i in range(len(test))],
                      "metrics": metrics_summary(results)})


def run_identity_cell(cell: StudyCell, store, budget: StudyBudget) -> dict:
    """The start cluster unchanged, scored like a model."""
    done = cell.load()
    if done is not None:
        return done
    test = first_clusters(ClusterDataset(store, split="test", seed=0), budget.test_clusters)
    results = evaluate_assembly(test)
    return cell.save({"kind": "identity", "test_names": [test.cluster(i).name for i in range(len(test))],
                      "metrics": metrics_summary(results)})


def run_packmol_cell(cell: StudyCell, store, budget: StudyBudget, progress: bool = False) -> dict:
    """The PackMol baseline (``packmol.packmol_predictions``, the real binary) with PackMol seed ``cell.seed``."""
    from kflow.molecular.baselines.packmol import find_packmol, packmol_predictions

    done = cell.load()
    if done is not None:
        return done
    test = first_clusters(ClusterDataset(store, split="test", seed=0), budget.test_clusters)
    t0 = time.perf_counter()
    preds = packmol_predictions(test, seed=cell.seed, nloop=budget.packmol_nloop, progress=progress)
    results = evaluate_assembly(test, preds)
    return cell.save({"kind": "packmol", "binary": str(find_packmol()), "seconds": time.perf_counter() - t0,
                      "test_names": [test.cluster(i).name for i in range(len(test))],
                      "metrics": metrics_summary(results)})


def paired_comparison(a: list[list[float]], b: list[list[float]]) -> dict:
    """Per-test-cluster comparison of model ``a`` against ``b`` (lower is better): the inputs are per-seed lists of
    per-cluster values on the same clusters; each cluster's value is its mean over seeds. Returns the fraction of
    clusters where ``a`` is better ("improved"; "higher": where it is higher, for higher-is-better scores), the mean
    difference a − b and the two-sided Wilcoxon signed-rank p-value."""
    from scipy.stats import wilcoxon

    x, y = np.mean(np.asarray(a, dtype=float), 0), np.mean(np.asarray(b, dtype=float), 0)
    if x.shape != y.shape:
        raise ValueError(f"paired comparison needs the same clusters: {x.shape} vs {y.shape}")
    diff = x - y
    p = float(wilcoxon(x, y).pvalue) if np.any(diff != 0) else 1.0
    return {"improved": float(np.mean(diff < 0)), "higher": float(np.mean(diff > 0)), "mean_diff": float(diff.mean()),
            "p": p, "n": int(diff.size)}


@torch.no_grad()
def band_energy_shares(dataset, num_bands: int, coupling: str = "index", batch_size: int = 16,
                       central: bool = False) -> dict:
    """How the start→final motion of each cluster spreads over ``num_bands`` Laplacian bands of its start
    centroids (the decomposition K-Flow uses): per band, the share of the squared rigid-body chart displacement
    (translations in Å, rotations scaled by the molecule's radius of gyration) summed over clusters, and the
    mean over clusters of each cluster's share, and ``mode_share``, each band's share of the modes (the share a
    motion without structure would give it). Band 0 holds the smoothest collective motions. ``coupling``: the
    start-to-final pairing, as in training ("index", "ot" or "eot"; ``central``: "eot" pivots on molecule 0)."""
    from kflow.molecular.model.flow import RigidKFlow

    rigid = RigidKFlow(num_bands)
    totals = torch.zeros(num_bands, dtype=torch.float64)
    per_cluster = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch: AssemblyBatch = collate_clusters(items, coupling=coupling, central=central)
        dec = rigid.for_batch(batch).decomposition
        displacement = (batch.final_chart() - batch.initial_chart()).double()  # [B, M, 6]
        energy = dec.band_energies(displacement).double()  # [B, K]
        totals += energy.sum(0)
        per_cluster.append(energy / energy.sum(1, keepdim=True).clamp_min(1e-12))
    shares = torch.cat(per_cluster)
    modes = dec.band_sizes().double()  # independent per-molecule noise would give each band this share
    return {"pooled": (totals / totals.sum()).tolist(), "mean": shares.mean(0).tolist(),
            "std": shares.std(0, unbiased=False).tolist(), "clusters": int(shares.shape[0]),
            "mode_share": (modes / modes.sum()).tolist()}
