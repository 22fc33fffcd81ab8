"""The recipe of the shipped pretrained models (``scripts/train_pretrained.py``, ``kflow train_pretrained``).

``train_pretrained`` is the recipe of the shipped models (``scripts/train_pretrained.py``): train on the train split
of CSD-500 plus the embedded pyxtal crystals, select the checkpoint on the CSD-500 validation split, score the
CSD-500 test split (``ClusterDataset(store, split="test", seed=data_seed)``, never trained on) and package the
result.
"""
from __future__ import annotations

import datetime
import os
import re
import time
from pathlib import Path
from typing import Sequence

import torch

from kflow.molecular.assemble.pretrained import MIRROR_MODES, PRESETS, save_pretrained, training_data_meta
from kflow.molecular.model.config import AssemblyModelConfig, build_assembly_model
from kflow.molecular.workflow import SELECT_METRIC, BestCheckpoint, first_clusters
from kflow.utils.io import safe_filename


__all__ = ["merge_training_store", "train_pretrained"]


def _family(crystal: str) -> str:
    """A CSD refcode's family (its six letters): redeterminations and polymorphs of one compound share it
    (ACSALA, ACSALA13)."""
    match = re.match(r"[A-Za-z]{6}", crystal)
    return (match.group(0) if match else crystal).upper()


def merge_training_store(primary, extras: Sequence, path: str | os.PathLike, split_seed: int = 0,
                         names: Sequence[str] | None = None):
    """One store of training clusters: the train split of ``primary`` (``ClusterDataset(primary, "train",
    split_seed)``) and every cluster of the ``extras`` stores except crystals of a compound (CSD refcode family)
    in the validation or test split of ``primary``, which stay unseen. Written transactionally to ``path``.

    Returns (store, provenance dict: per source its clusters and crystals used, and the crystals excluded)."""
    from kflow.molecular.data.datasets import ClusterDataset
    from kflow.molecular.data.store import ClusterStore, write_cluster_store

    names = list(names or [f"source{i}" for i in range(1 + len(extras))])
    train = ClusterDataset(primary, split="train", seed=split_seed)
    held_out = {_family(c) for split in ("valid", "test")
                for c in ClusterDataset(primary, split=split, seed=split_seed).crystals}
    sources, excluded, picks = [], set(), []
    picks.append((primary, train.indices_))
    sources.append({"dataset": names[0], "store": str(primary.path), "build_key": primary.meta.get("build_key"),
                    "split": f"train (seed {split_seed})", "clusters": len(train),
                    "crystals": len(set(train.crystals))})
    for name, store in zip(names[1:], extras):
        keep = [i for i, c in enumerate(store.crystals) if _family(c) not in held_out]
        excluded.update(c for c in store.crystals if _family(c) in held_out)
        picks.append((store, keep))
        sources.append({"dataset": name, "store": str(store.path), "build_key": store.meta.get("build_key"),
                        "split": "all, minus compounds held out", "clusters": len(keep),
                        "crystals": len({store.crystals[i] for i in keep})})
    if not any(indices for _, indices in picks):
        raise ValueError("merge_training_store: no training clusters")
    provenance = {"sources": sources, "excluded_crystals": sorted(excluded)}
    clusters = (store[i] for store, indices in picks for i in indices)
    out = write_cluster_store(clusters, path, meta={"merged_for": "pretraining", **provenance})
    return ClusterStore(out), provenance


def _summary(results: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "per_cluster"} if isinstance(v, dict) else v
            for k, v in results.items()}


def train_pretrained(out: str | os.PathLike, config: AssemblyModelConfig, preset: str = "hard",
                     datasets: Sequence[str] = ("csd500", "demo"), root: str | os.PathLike = "data",
                     work: str | os.PathLike | None = None, draws_per_crystal: int = 2, data_seed: int = 0,
                     seed: int = 0, epochs: float = 8.0, steps: int | None = None, batch_size: int = 4,
                     lr: float = 2e-3, evals: int = 6, val_clusters: int = 32, sample_steps: int = 10,
                     mirror: str | None = None, command: str = "", resume: bool = False, overwrite: bool = False,
                     deterministic: bool = False, progress: bool = True, log=print) -> dict:
    """Train, select, test and package one pretrained model; returns its metadata.

    Data: ``datasets[0]`` (default CSD-500) gives the held-out validation and test splits (crystal level, 80/10/10,
    ``data_seed``); its train split and every other data set (default: the embedded pyxtal crystals, minus
    compounds held out) are merged into one training store (``merge_training_store``), all built with the start
    ``preset`` and ``draws_per_crystal`` starts per crystal. Training: ``train_assembly`` for ``steps`` (default
    ``epochs`` passes over the merged store), with the study's validation checkpoint selection (``evals``
    evaluations on the first ``val_clusters`` validation clusters, metric ``study.SELECT_METRIC[preset]``).
    The selected EMA weights are scored on the whole test split (``sample_steps`` band steps) next to the
    identity baseline, and ``save_pretrained`` writes ``out``. ``work`` (default ``runs/pretrained_<name>``)
    holds the run; ``resume`` continues an interrupted one (``overwrite``, ``deterministic``: as in
    ``train_assembly``). ``mirror``: how ``kflow assemble`` makes the copies
    of a lone molecule for this model (recorded, see README "For chemists"); a model trained on starts with those
    hands (``config.start_mirror`` "none" or "half") records its own and refuses another; default: that, else
    "none". Such a model validates and tests on starts with its hands (``study.with_start_hands``).

    With one data set, and the study's budget (the defaults), this is exactly ``study.run_model_cell`` of that
    configuration and seed: same clusters in the same order, steps, selection and test metrics.
    """
    from kflow.molecular.data.datasets import ClusterDataset, with_start_hands
    from kflow.molecular.model.sampling import predict_assembly
    from kflow.molecular.workflow import evaluate_assembly, load_assembly_dataset, train_assembly

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if mirror is not None and mirror not in MIRROR_MODES:
        raise ValueError(f"mirror must be one of {MIRROR_MODES}, got {mirror!r}")
    if config.start_mirror in MIRROR_MODES:  # the model learnt these hands: kflow assemble must make the same
        if mirror is not None and mirror != config.start_mirror:
            raise ValueError(f"mirror {mirror!r} contradicts the training starts' start_mirror "
                             f"{config.start_mirror!r}: kflow assemble would give the model copies of other hands "
                             f"than it was trained on (omit mirror, or pass {config.start_mirror!r})")
        mirror = config.start_mirror
    mirror = mirror or "none"
    if not datasets:
        raise ValueError("train_pretrained needs at least one data set")
    if config.objective == "flow" and sample_steps < config.num_bands:
        raise ValueError(f"--sample-steps {sample_steps} is fewer than the {config.num_bands} bands (one step per "
                         "band at least)")
    out = Path(out)
    work = Path(work) if work is not None else Path("runs") / f"pretrained_{safe_filename(out.stem)}"
    run_dir = work / "run"
    stores = [load_assembly_dataset(name, root, draws_per_crystal=draws_per_crystal, seed=data_seed,
                                    progress=progress, noise=preset) for name in datasets]
    primary = stores[0]
    store, provenance = merge_training_store(primary, stores[1:], work / "train.lmdb", data_seed, datasets)
    val = with_start_hands(first_clusters(ClusterDataset(primary, split="valid", seed=data_seed), val_clusters),
                           config.start_mirror)
    test = with_start_hands(ClusterDataset(primary, split="test", seed=data_seed), config.start_mirror)
    if len(val) == 0 or len(test) == 0:
        raise ValueError(f"{datasets[0]}: empty validation or test split (too few crystals)")
    steps = steps or max(int(round(epochs * len(store) / batch_size)), 1)
    eval_every = max(steps // evals, 1)
    if overwrite or not (run_dir / "checkpoints").exists():  # no run to continue: an old selection is stale
        for stale in ("best.pt", "best.json"):
            (run_dir / stale).unlink(missing_ok=True)
    _, rigid = build_assembly_model(config)
    metric = SELECT_METRIC[preset]
    selector = BestCheckpoint(run_dir, val, rigid, metric, sample_steps)
    log(f"training {out.name}: {len(store)} clusters, {steps} steps, validation on {len(val)} {datasets[0]} "
        f"clusters every {eval_every} steps ({metric})")
    t0 = time.perf_counter()
    model, rigid, summary = train_assembly(store, run_dir, config, steps=steps, batch_size=batch_size, lr=lr,
                                           seed=seed, split_seed=data_seed, resume=resume, overwrite=overwrite,
                                           checkpoint_every=eval_every, progress=progress, eval_fn=selector,
                                           eval_every=eval_every, train_split="all", deterministic=deterministic)
    train_s = time.perf_counter() - t0
    if selector.best["step"] is None:  # finished before the first evaluation: select the end
        selector(model, steps)
    model.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True))
    model.eval()
    log(f"testing on {len(test)} {datasets[0]} test clusters")
    preds = predict_assembly(model, rigid, test, steps=sample_steps, progress=progress)
    meta = {
        "name": out.stem,
        "preset": preset,
        "mirror": mirror,
        **training_data_meta([store]),
        "data": {**provenance, "draws_per_crystal": draws_per_crystal, "train_clusters": len(store),
                 "train_crystals": len(set(store.crystals)),
                 "held_out": {"dataset": datasets[0], "valid_crystals": sorted(set(val.crystals)),
                              "test_crystals": sorted(set(test.crystals))}},
        "data_seed": data_seed,
        "seed": seed,
        "split": f"ClusterDataset({datasets[0]} store, split='test', seed={data_seed}): crystal-level 80/10/10",
        "training": {"steps": steps, "epochs": steps * batch_size / len(store), "batch_size": batch_size, "lr": lr,
                     "eval_every": eval_every, "val_clusters": len(val), "select_metric": metric,
                     "best_step": selector.best["step"], "best_val": selector.best["value"], "train_s": train_s,
                     "steps_run": summary.get("steps_run")},
        "sample_steps": sample_steps,
        "test_metrics": {"dataset": datasets[0], "clusters": len(test), "model": _summary(
            evaluate_assembly(test, preds)), "identity": _summary(evaluate_assembly(test))},
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    from kflow import __version__

    meta["kflow_version"] = __version__
    save_pretrained(out, model, config, meta)
    return meta
