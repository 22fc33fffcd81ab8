"""The molecular assembly workflow, one function per step (the scripts are argparse wrappers over these):
data set -> train -> predict -> evaluate.

    store = load_assembly_dataset("demo")
    model, rigid, summary = train_assembly(store, "runs/kflow2", AssemblyModelConfig(num_bands=2), steps=300)
    test = ClusterDataset(store, split="test")
    predictions = predict_assembly(model, rigid, test, steps=20, repeats=2)
    table = evaluate_assembly(test, predictions)
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from kflow.core import distributed as dist_utils
from kflow.core.training import Trainer
from kflow.molecular.artifacts import load_assembly_model
from kflow.molecular.data.datasets import (ClusterDataset, CODCluster17Dataset, RedrawnStarts, StartHands,
                                           with_start_hands)
from kflow.molecular.data.sources import (cached_store, build_cluster_dataset, build_demo_dataset,
                                          build_key, csd500_path, read_crystal_inputs, report_build)
from kflow.molecular.data.starts import noise_model
from kflow.molecular.data.store import ClusterStore
from kflow.molecular.evaluation.collisions import collision_rate, separation_rate
from kflow.molecular.evaluation.matching import aggregate_min_over_repeats, compute_packing_matching
from kflow.molecular.evaluation.oxtal import cluster_packing_match
from kflow.molecular.evaluation.rmsd import rmsd15
from kflow.molecular.model.config import AssemblyModelConfig, build_assembly_model
from kflow.molecular.model.flow import collate_clusters
from kflow.molecular.model.objective import AssemblyLoss
from kflow.molecular.model.sampling import predict_assembly
from kflow.utils.io import atomic_save, atomic_write_text, safe_filename

__all__ = ["default_split", "load_assembly_dataset", "steps_for_epochs", "train_assembly", "load_assembly_model",
           "predict_assembly", "evaluate_assembly", "compare_assembly_models", "format_results_table", "METRICS",
           "METRIC_LABELS", "SELECT_METRIC", "BestCheckpoint", "first_clusters", "metrics_summary"]

# "_perm": the permutation-invariant packing matching (molecules matched before comparing, metrics.match_molecules)
# "matched15" / "rmsd15": the field's packing metric, OXtalign's COMPACK-equivalent (evaluation.oxtal): molecules
# of the central one's 15-molecule shell matched within 1 Å, and the RMSD over those matched (NaN where only the
# centre matched, left out of the means). "rmsd15_forced": kflow's earlier RMSD that forces all 15 to match.
METRICS = ("pm_atom", "pm_center", "pm_atom_perm", "pm_center_perm", "matched15", "rmsd15", "rmsd15_forced",
           "collision", "separation", "contacts")
METRIC_LABELS = {"pm_atom": "PM-atom (Å)", "pm_center": "PM-center (Å)", "pm_atom_perm": "PM-atom, matched (Å)",
                 "pm_center_perm": "PM-center, matched (Å)", "matched15": "matched of 15 (OXtalign)",
                 "rmsd15": "RMSD₁₅ of the matched (Å, OXtalign)", "rmsd15_forced": "RMSD, all 15 forced (Å)",
                 "collision": "collision (%)", "separation": "separation (%)", "contacts": "close contacts"}
# Averaged over repeated samples rather than taking the best: rates, counts and the higher-is-better match.
MEAN_OVER_REPEATS = ("collision", "separation", "contacts", "matched15", "rmsd15")


def load_assembly_dataset(name: str = "demo", root: str | os.PathLike = "data", subset: str = "10k",
                          draws_per_crystal: int = 4, seed: int = 0, num_workers: int | None = None,
                          progress: bool = True, noise: str = "mild"):
    """A cluster store by name: "demo" (pyxtal's embedded CSD crystals), "csd500" (the CSD-500 extxyz file,
    ``$KFLOW_CSD500`` or the copy shipped in data/), "cod" (COD-Cluster17 ``subset`` under root/COD-Cluster17, or
    root/COD in AssembleFlow's layout), or a path: an existing cluster store (folder with data.mdb), a
    COD-Cluster17 folder (``raw/FinalPositions``; ``subset`` as for "cod"), the output folder of
    ``scripts/build_clusters.py``, a CIF file/folder, an ASE database or an extxyz file.

    ``noise`` is the start preset of clusters built from crystals ("mild": each molecule near its target, "hard":
    placed at random at crystal density; ``crystals.NOISE_PRESETS``). Stores and COD-Cluster17 carry their own
    starts, so it must stay "mild" for them.

    Crystal files are built once and cached under root/built/ as ``<name>_<key>.lmdb``, the key covering the
    files' content, draws, seed, build parameters and builder version (``sources.build_key``), so adding or
    changing an input file gives a new store. An unreadable or rejected file never stops the build; the
    summary (every input file's outcome) is printed, also without ``progress``, and saved beside the store as
    ``<name>_<key>.summary.json``."""
    from kflow.molecular.data.crystals import crystal_files

    root = Path(root)
    noise_model(noise)  # an unknown preset fails here, before any work
    if name == "demo":
        return build_demo_dataset(root / "demo", draws_per_crystal, seed, num_workers, progress=progress, noise=noise)
    if name == "cod":
        _starts_fixed(noise, "COD-Cluster17 ships its own start clusters")
        cod_root = root / "COD-Cluster17"
        if not cod_root.exists() and (root / "COD" / "raw" / "FinalPositions").is_dir():
            cod_root = root / "COD"  # AssembleFlow's folder name
        return CODCluster17Dataset(cod_root, subset=subset, num_workers=num_workers, progress=progress).store
    if name == "csd500":
        path = csd500_path()
    else:
        path = Path(name)
        if (path / "data.mdb").exists():
            _starts_fixed(noise, f"{path} is a built cluster store")
            return ClusterStore(path)
        if (path / "summary.json").is_file() and (path / "processed" / "clusters.lmdb" / "data.mdb").exists():
            return ClusterStore(path / "processed" / "clusters.lmdb")  # a build_clusters.py output folder
        if (path / "raw" / "FinalPositions").is_dir():
            return CODCluster17Dataset(path, subset=subset, num_workers=num_workers, progress=progress).store
        if not path.exists():
            raise FileNotFoundError(f"dataset {name!r}: not 'demo', 'csd500', 'cod' or an existing path")
    files = crystal_files(path)
    key = build_key(files, draws_per_crystal, seed, noise=noise)
    store_path = root / "built" / f"{safe_filename(path.stem or path.name)}_{key}.lmdb"
    cached = cached_store(store_path, key)
    if cached is not None:
        return cached
    sources, summary = read_crystal_inputs(files)
    store, summary = build_cluster_dataset(sources, store_path, draws_per_crystal, seed, num_workers, progress,
                                           summary=summary, meta={"build_key": key, "inputs": str(path)},
                                           noise=noise)
    report = store_path.with_name(store_path.name.removesuffix(".lmdb") + ".summary.json")
    atomic_write_text(report, json.dumps({"inputs": str(path), "store": str(store_path), "clusters": len(store),
                                          **summary.as_dict()}, indent=1) + "\n")
    report_build(path.name, store, summary)
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"every input file's outcome: {report}")
    return store


def _starts_fixed(noise, why: str):
    if noise_model(noise).name != "mild":
        raise ValueError(f"--noise {noise} applies to data sets built from crystals; {why}")


NAMED_DATASETS = ("demo", "csd500", "cod")


def default_split(dataset: str) -> str:
    """The split a prediction uses unless told: "test" for the named benchmark sets (the crystals no model saw),
    "all" for a file, folder or store given by path (a user's own crystals, all of them to be predicted)."""
    return "test" if dataset in NAMED_DATASETS else "all"


def _check_split(dataset, what: str):
    if len(dataset) == 0:
        raise ValueError(f"the {what} split is empty: the data set has too few crystals for an 80/10/10 split")


def steps_for_epochs(store: ClusterStore, epochs: int, batch_size: int, split_seed: int = 0) -> int:
    """Optimizer steps for ``epochs`` passes over the train split (all processes together under torchrun)."""
    train = ClusterDataset(store, split="train", seed=split_seed)
    return epochs * max(len(train) // (batch_size * dist_utils.get_world_size()), 1)


def train_assembly(store: ClusterStore, out_dir: str | os.PathLike, config: AssemblyModelConfig | None = None,
                   steps: int = 1000, batch_size: int = 4, lr: float = 2e-3, seed: int = 0, resume: bool = False,
                   ema_decay: float = 0.99, checkpoint_every: int = 200, warmup_steps: int = 20,
                   num_workers: int = 0, progress: bool = True, extra_config: dict | None = None, device=None,
                   split_seed: int | None = None, overwrite: bool = False, deterministic: bool = False,
                   eval_fn=None, eval_every: int | None = None, train_split: str = "train"):
    """Train the rigid-body K-Flow model on the train split of ``store``; returns (model with EMA weights, rigid
    flow, trainer summary). ``seed`` drives initialisation and data order; ``split_seed`` (default: ``seed``)
    the crystal-level train/valid/test split; ``train_split="all"`` trains on every cluster of ``store`` (a store
    holding only training crystals, e.g. the merged store of ``kflow.molecular.pretraining``). A fresh run (not
    ``resume``) refuses a folder holding another run unless ``overwrite``; ``deterministic``: bit-identical runs
    and resumes on CPU (see ``Trainer``).
    ``eval_fn(ema_model, step) -> dict`` runs every ``eval_every`` steps; its numbers go to metrics.jsonl (a
    config with ``start_mirror`` other than "crystal" wants its validation clusters viewed with
    ``datasets.StartHands``, as ``study.BestCheckpoint`` users do)."""
    config = config or AssemblyModelConfig()
    split_seed = seed if split_seed is None else split_seed
    train = ClusterDataset(store, split=train_split, seed=split_seed)
    _check_split(train, train_split)
    if config.redraw_starts:  # a new start per crystal cluster and epoch, from the store's own start preset
        train = RedrawnStarts(train, seed=seed, mirror=config.start_mirror)
    elif config.start_mirror != "crystal":
        train = StartHands(train, config.start_mirror)
    torch.manual_seed(seed)
    model, rigid = build_assembly_model(config)
    run_config = {"model": config.run_record(), "data_seed": split_seed, "dataset_size": len(store),
                  "dataset": str(store.path), "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
                  **(extra_config or {})}
    hands = {"free_pairs": True} if config.start_mirror != "crystal" else {}  # start copies of other hands
    collate = functools.partial(collate_clusters, coupling=config.coupling, central=config.central, **hands)
    loss = AssemblyLoss(rigid, config.rotation_loss, config.rotation_weight, config.time_sampling)
    trainer = Trainer(model, loss, train, collate_fn=collate, batch_size=batch_size, lr=lr,
                      max_steps=steps, out_dir=out_dir, config=run_config, warmup_steps=warmup_steps,
                      ema_decay=ema_decay, checkpoint_every=checkpoint_every, seed=seed, num_workers=num_workers,
                      progress=progress, device=device, overwrite=overwrite, deterministic=deterministic,
                      structural_keys=["model", "data_seed", "dataset_size", "batch_size", "lr", "ema_decay"],
                      normalize_config=_canonical_run_config,
                      eval_fn=eval_fn, eval_every=eval_every)
    try:
        summary = trainer.fit(resume=resume)
    finally:
        dist_utils.cleanup_distributed()
    return trainer.ema_model(), rigid, summary


def _canonical_run_config(config: dict) -> dict:
    """A run's recorded configuration with its model in canonical form (``AssemblyModelConfig.run_record``), so runs
    recorded before or after a field existed compare equal when the field holds its default."""
    model = config.get("model")
    if isinstance(model, dict):
        try:
            config = {**config, "model": AssemblyModelConfig.from_dict(model).run_record()}
        except (TypeError, ValueError):  # not a valid configuration: compared as recorded
            pass
    return config


def evaluate_assembly(dataset, predictions: Sequence[torch.Tensor] | None = None) -> dict:
    """Metrics per cluster and repeat, reduced to min over repeats, then mean ± std over clusters.

    ``predictions``: list of [R, N_i, 3] per cluster; None evaluates the identity baseline (prediction = initial
    cluster). Returns {metric: {"mean", "std", "per_cluster"}} for ``METRICS``: PM-atom, PM-center (Å) as
    AssembleFlow defines them (molecules paired by index), the same after matching the predicted molecules to the
    true ones ("pm_atom_perm", "pm_center_perm"; ``compute_packing_matching(permutation_invariant=True)``, for
    predictions that carry no index correspondence), the field's packing metric from OXtalign (``matched15``:
    molecules of the 15-molecule shell matched within 1 Å, ``rmsd15``: COMPACK's RMSD₁₅ over them, NaN where only
    the centre matched and left out of the mean), ``rmsd15_forced`` (every one of the 15 forced into a match by
    the Hungarian algorithm: not COMPACK's), collision and separation rates (%) and close contacts (atom pairs of
    different molecules closer than the contact threshold of ``contact_scores``); for the last five and the
    OXtalign pair the mean over repeats is reported, not the best.
    """
    from torch_geometric.data import Batch

    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        raise ValueError("evaluate_assembly: empty data set")
    if predictions is None:
        predictions = [it.initial_positions[None] for it in items]
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} clusters")
    repeats = predictions[0].shape[0]
    batch = Batch.from_data_list(items)
    true = batch.final_positions.double()
    values = {k: [] for k in METRICS}
    for r in range(repeats):
        pred = torch.cat([p[r] for p in predictions]).double()
        if pred.shape != true.shape:
            raise ValueError(f"predictions have {pred.shape[0]} atoms in total, clusters have {true.shape[0]}")
        pm = compute_packing_matching(true, pred, batch.molecule_index, batch.batch)
        values["pm_atom"].append(pm.pm_atom)
        values["pm_center"].append(pm.pm_center)
        pm = compute_packing_matching(true, pred, batch.molecule_index, batch.batch, permutation_invariant=True)
        values["pm_atom_perm"].append(pm.pm_atom)
        values["pm_center_perm"].append(pm.pm_center)
        values["rmsd15_forced"].append(rmsd15(true, pred, batch.molecule_index, batch.atomic_numbers, batch.batch))
        match = cluster_packing_match(true, pred, batch.atomic_numbers, batch.batch)
        values["matched15"].append(torch.as_tensor(match.n_matched, dtype=torch.float64))
        values["rmsd15"].append(torch.as_tensor(match.rmsd, dtype=torch.float64))
        values["collision"].append(collision_rate(pred, batch.molecule_index, batch.atomic_numbers, batch.batch))
        values["separation"].append(separation_rate(pred, batch.molecule_index, batch.atomic_numbers, batch.batch))
        values["contacts"].append(torch.tensor([_close_contacts(item, pred[batch.ptr[i]:batch.ptr[i + 1]])
                                                for i, item in enumerate(items)], dtype=torch.float64))
    out = {}
    for k, v in values.items():
        v = torch.stack(v)  # [R, B]
        if k in MEAN_OVER_REPEATS:
            per = v.nanmean(0)  # NaN only where no repeat has a value (rmsd15 with only the centre matched)
            known = per[~per.isnan()]
            out[k] = {"mean": known.mean().item() if len(known) else None,  # None, not NaN: results are JSON
                      "std": known.std(unbiased=False).item() if len(known) else None,
                      "per_cluster": [None if math.isnan(x) else x for x in per.tolist()],
                      **({"clusters": len(known)} if k == "rmsd15" else {})}
        else:
            mean, std, per = aggregate_min_over_repeats(v)
            out[k] = {"mean": mean, "std": std, "per_cluster": per.tolist()}
    out["num_clusters"] = len(items)
    out["repeats"] = repeats
    return out


def _close_contacts(item, pred: torch.Tensor) -> float:
    """Close contacts (``contact_scores``) of one cluster's prediction [N, 3]."""
    from types import SimpleNamespace

    from kflow.molecular.evaluation.contacts import contact_scores

    m = int(item.molecule_index.max()) + 1
    cluster = SimpleNamespace(atomic_numbers=item.atomic_numbers.long(), molecule_index=item.molecule_index.long(),
                              num_molecules=m)
    return float(contact_scores(pred.double(), cluster)["close_contacts"])


def compare_assembly_models(store: ClusterStore, out_dir: str | os.PathLike, configs: dict[str, AssemblyModelConfig],
                            steps: int, batch_size: int = 4, sample_steps: int = 20, repeats: int = 1,
                            seed: int = 0, split_seed: int = 0, log=print):
    """Train every model of ``configs`` (label -> config) with the same budget in ``out_dir/<label>``
    (resuming finished or interrupted runs), sample the test split and evaluate it next to the identity baseline.

    Returns ({label: evaluate_assembly results}, {label: timings}); "identity (initial cluster)" comes first."""
    test = ClusterDataset(store, split="test", seed=split_seed)
    _check_split(test, "test")
    results, timings = {"identity (initial cluster)": evaluate_assembly(test)}, {}
    for label, config in configs.items():
        log(f"== training {label}: {steps} steps, batch {batch_size}")
        t0 = time.time()
        model, rigid, summary = train_assembly(store, Path(out_dir) / safe_filename(label), config,
                                               steps=steps, batch_size=batch_size, seed=seed, resume=True,
                                               split_seed=split_seed)
        t1 = time.time()
        log(f"== sampling {label} on the test crystals ({sample_steps} steps, {repeats} repeats)")
        # sampled from starts with the hands the model trained on (start_mirror); scored against the same crystals
        preds = predict_assembly(model, rigid, with_start_hands(test, config.start_mirror), steps=sample_steps,
                                 repeats=repeats, seed=seed)
        results[label] = evaluate_assembly(test, preds)
        timings[label] = {"train_s": t1 - t0, "sample_s": time.time() - t1, "final_loss": summary["loss"]}
    return results, timings


def format_results_table(results: dict[str, dict], title: str = "") -> str:
    """Markdown table: one row per method, mean ± std per metric ("–" where a result lacks one, e.g. results
    saved before the permutation-invariant metrics existed)."""
    heads = ["method"] + [METRIC_LABELS[k] for k in METRICS]
    lines = ([f"**{title}**", ""] if title else []) + ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for method, res in results.items():
        cells = [f"{res[k]['mean']:.3f} ± {res[k]['std']:.3f}" if res.get(k, {}).get("mean") is not None else "–"
                 for k in METRICS]
        lines.append("| " + " | ".join([method] + cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- validation checkpoint selection
# The metric that picks the checkpoint: index pairing is meaningful for the mild start, not for the hard one.
SELECT_METRIC = {"mild": "pm_center", "hard": "pm_center_perm", "shell": "pm_center_perm"}


def first_clusters(dataset: ClusterDataset, n: int | None) -> ClusterDataset:
    """A view of the first ``n`` clusters of ``dataset`` (all when ``n`` is None)."""
    if n is None or n >= len(dataset):
        return dataset
    view = copy.copy(dataset)
    view.indices_ = list(dataset.indices_[:n])
    return view


def metrics_summary(results: dict) -> dict:
    return {k: v for k, v in results.items() if isinstance(v, dict) and "per_cluster" in v}


def _eval_record(results: dict) -> dict:
    return {k: v["mean"] for k, v in metrics_summary(results).items() if v["mean"] is not None}


class BestCheckpoint:
    """eval_fn for ``train_assembly``: scores the EMA model on validation clusters and keeps the best weights
    (``best.pt`` + ``best.json``, atomic, so a resumed run keeps the best of its earlier part)."""

    def __init__(self, run_dir: Path, val, rigid, metric: str, sample_steps: int):
        self.run_dir, self.val, self.rigid, self.metric, self.sample_steps = run_dir, val, rigid, metric, sample_steps
        try:
            self.best = json.loads((run_dir / "best.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.best = {"value": math.inf, "step": None}

    def __call__(self, model, step: int) -> dict:
        preds = predict_assembly(model, self.rigid, self.val, steps=self.sample_steps)
        record = _eval_record(evaluate_assembly(self.val, preds))
        value = record[self.metric]
        if value < self.best["value"]:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_save({k: v.detach().clone() for k, v in model.state_dict().items()}, self.run_dir / "best.pt")
            self.best = {"value": value, "step": step}
            atomic_write_text(self.run_dir / "best.json", json.dumps(self.best))
        return record
