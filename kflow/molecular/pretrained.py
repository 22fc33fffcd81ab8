"""Pretrained assembly models: the file format, loading by name, and the recipe that trains the shipped ones.

A pretrained model is one torch file, readable with ``torch.load(weights_only=True)`` (nothing in it can run
code), holding

    {"format": "kflow-pretrained", "version": 1,
     "config":  AssemblyModelConfig.to_dict(),
     "weights": state dict of the (EMA) AssemblyFlowModel,
     "meta":    JSON-like provenance: the data it saw, the exact command, seeds and split, the start preset
                ("hard" | "mild"), the --mirror mode, the largest molecule and the elements of the training data,
                and the test metrics}

Names resolve to ``kflow/molecular/pretrained_models/<name>.pt`` (package data, so editable and normal installs find
them); any other path is read as it is.

    model, rigid, meta = load_pretrained("hard")
    save_pretrained("my_model.pt", model, config, meta)

``train_pretrained`` is the recipe of the shipped models (``scripts/train_pretrained.py``): train on the train split
of CSD-500 plus the embedded pyxtal crystals, select the checkpoint on the CSD-500 validation split, score the
CSD-500 test split (``ClusterDataset(store, split="test", seed=data_seed)``, never trained on) and package the
result.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import pickle
import re
import time
import zipfile
from pathlib import Path
from typing import Sequence

import torch

from kflow.molecular.config import AssemblyModelConfig, build_assembly_model
from kflow.utils.io import atomic_save, safe_filename

__all__ = ["save_pretrained", "load_pretrained", "read_pretrained", "list_pretrained", "resolve_pretrained",
           "training_data_meta", "merge_training_store", "train_pretrained", "PRETRAINED_DIR", "PRETRAINED_FORMAT",
           "PRETRAINED_VERSION", "REQUIRED_META", "MIRROR_MODES", "PRESETS"]

PRETRAINED_FORMAT = "kflow-pretrained"
PRETRAINED_VERSION = 1
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained_models"
# What ``kflow assemble`` needs to know about a model before it predicts: which start it was trained for, how the
# copies of a lone molecule are made, and which molecules it has seen (elements, size).
REQUIRED_META = ("preset", "mirror", "elements", "max_atoms")
MIRROR_MODES = ("none", "half")  # copies of one conformer, or a racemic mix (half of the copies mirrored)
PRESETS = ("hard", "mild", "shell")


# ------------------------------------------------------------------------------------------------ file format
def _check_meta(meta: dict, where: str) -> None:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{where}: pretrained metadata lacks {', '.join(missing)}")
    if meta["preset"] not in PRESETS:
        raise ValueError(f"{where}: preset must be one of {PRESETS}, got {meta['preset']!r}")
    if meta["mirror"] not in MIRROR_MODES:
        raise ValueError(f"{where}: mirror must be one of {MIRROR_MODES}, got {meta['mirror']!r}")
    elements = meta["elements"]
    if not (isinstance(elements, list) and elements and all(isinstance(z, int) and 0 < z <= 118 for z in elements)):
        raise ValueError(f"{where}: elements must be a non-empty list of atomic numbers")
    if not (isinstance(meta["max_atoms"], int) and meta["max_atoms"] > 0):
        raise ValueError(f"{where}: max_atoms must be a positive integer, got {meta['max_atoms']!r}")


def save_pretrained(path: str | os.PathLike, model: torch.nn.Module, config: AssemblyModelConfig,
                    meta: dict) -> Path:
    """Write ``model`` (its current weights; pass the EMA model) with ``config`` and ``meta`` as a pretrained file,
    atomically. ``meta`` must be JSON-serialisable and hold ``REQUIRED_META``."""
    path = Path(path)
    _check_meta(meta, str(path))
    try:
        meta = json.loads(json.dumps(meta))  # plain containers only, so weights_only loading accepts them
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: pretrained metadata is not JSON-serialisable ({err})") from None
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_save({"format": PRETRAINED_FORMAT, "version": PRETRAINED_VERSION, "config": config.to_dict(),
                 "weights": weights, "meta": meta}, path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # a file to ship: readable like any other (the temporary file was private)
    return path


def list_pretrained() -> list[str]:
    """Names of the pretrained models shipped with this installation (``kflow/molecular/pretrained_models/*.pt``)."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt")) if PRETRAINED_DIR.is_dir() else []


def _available() -> str:
    names = list_pretrained()
    return ("available: " + ", ".join(names)) if names else (
        "none is shipped with this installation yet; train one with scripts/train_pretrained.py")


def resolve_pretrained(name_or_path: str | os.PathLike) -> Path:
    """The file of a pretrained model: an existing path as it is, else ``PRETRAINED_DIR/<name>.pt``. Raises
    ``FileNotFoundError`` listing the shipped names."""
    text = str(name_or_path)
    path = Path(text)
    if path.is_file():
        return path
    looks_like_path = os.sep in text or "/" in text or path.suffix == ".pt"
    if looks_like_path:
        raise FileNotFoundError(f"{text}: no such model file ({_available()})")
    if safe_filename(text) != text:
        raise FileNotFoundError(f"no pretrained model named {text!r} ({_available()})")
    shipped = PRETRAINED_DIR / f"{text}.pt"
    if not shipped.is_file():
        raise FileNotFoundError(f"no pretrained model named {text!r} ({_available()})")
    return shipped


def read_pretrained(name_or_path: str | os.PathLike, map_location="cpu") -> dict:
    """The validated content of a pretrained file (``format``, ``version``, ``config``, ``weights``, ``meta``)
    without building the model. A corrupt, truncated or foreign file is a ``ValueError`` naming it."""
    path = resolve_pretrained(name_or_path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an object: not ours, and never executed
        raise ValueError(f"{path}: not a kflow pretrained model (it holds objects other than tensors and plain "
                         f"data; refused without running them: {str(err).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: corrupt or unreadable model file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'truncated'})") from None
    if not isinstance(state, dict) or state.get("format") != PRETRAINED_FORMAT:
        hint = " (a training checkpoint? package it with kflow.molecular.pretrained.save_pretrained)" if (
            isinstance(state, dict) and "model" in state) else ""
        raise ValueError(f"{path}: not a kflow pretrained model (no format tag {PRETRAINED_FORMAT!r}){hint}")
    if state.get("version") != PRETRAINED_VERSION:
        raise ValueError(f"{path}: pretrained format version {state.get('version')!r}, this kflow reads version "
                         f"{PRETRAINED_VERSION}")
    for key, kind in (("config", dict), ("weights", dict), ("meta", dict)):
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{path}: pretrained file lacks its {key}")
    _check_meta(state["meta"], str(path))
    state["path"] = str(path)
    return state


def load_pretrained(name_or_path: str | os.PathLike, map_location="cpu"):
    """(model in eval mode, rigid flow, meta) of a shipped model name (``list_pretrained()``) or a file.

    A missing name lists the available ones; a corrupt or foreign file, or weights that do not fit the stored
    configuration, give a ``ValueError`` naming the file."""
    state = read_pretrained(name_or_path, map_location)
    path = state["path"]
    try:
        config = AssemblyModelConfig.from_dict(state["config"])
        model, rigid = build_assembly_model(config)
        model.load_state_dict(state["weights"])
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"{path}: weights do not fit the stored model configuration "
                         f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return model.eval(), rigid, state["meta"]


# ---------------------------------------------------------------------------------------- training the models
def training_data_meta(datasets: Sequence) -> dict:
    """Elements (sorted atomic numbers) and the largest molecule (atoms) over every cluster of ``datasets``
    (``ClusterDataset``s or ``ClusterStore``s): what a pretrained model can be trusted with."""
    elements, max_atoms, min_atoms = set(), 0, math.inf
    for data in datasets:
        get = data.cluster if hasattr(data, "cluster") else data.__getitem__
        for i in range(len(data)):
            cluster = get(i)
            elements.update(torch.unique(cluster.atomic_numbers).tolist())
            size = cluster.num_atoms // cluster.num_molecules
            max_atoms, min_atoms = max(max_atoms, size), min(min_atoms, size)
    if not elements:
        raise ValueError("training_data_meta: no clusters")
    return {"elements": sorted(int(z) for z in elements), "max_atoms": int(max_atoms), "min_atoms": int(min_atoms)}


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
    from kflow.molecular.datasets import ClusterDataset
    from kflow.molecular.store import ClusterStore, write_cluster_store

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
    from kflow.molecular.datasets import ClusterDataset, with_start_hands
    from kflow.molecular.sampling import predict_assembly
    from kflow.molecular.study import SELECT_METRIC, BestCheckpoint, first_clusters
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
