"""Run folders and checkpoints: the errors a run can meet, what identifies a run's data, atomic resumable checkpoints
read with ``torch.load(weights_only=True)`` (``load_checkpoint``), and the check that a run folder is fresh.

Safety: checkpoints hold only tensors and plain Python values (the RNG states included), so a crafted file cannot
run code.
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from kflow.utils.io import FolderBusyError, atomic_path


__all__ = ["CheckpointError", "ConfigMismatchError", "RunExistsError", "RunBusyError", "Resume", "data_identity",
           "check_fresh_run_folder", "load_checkpoint", "read_checkpoint", "load_weights", "atomic_copy", "numpy_rng_state",
           "set_numpy_rng_state", "unwrap_model", "RUN_LOCK", "CHECKPOINT_KIND"]


CHECKPOINT_KIND = "kflow-checkpoint"


RUN_LOCK = "kflow.lock"  # in the run folder while a training writes it: the holder's pid, host and start


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt, not a kflow checkpoint, or does not fit the model."""


class ConfigMismatchError(ValueError):
    """Resuming with a configuration that changes the model or the data."""


class RunExistsError(ValueError):
    """Starting a fresh run in a folder that already holds another run's checkpoints."""


RunBusyError = FolderBusyError  # a run folder another live training writes (it holds RUN_LOCK)


class Resume(NamedTuple):
    """What ``Trainer.fit(resume=...)`` takes besides True / a path: resume from ``checkpoint`` (True: the run
    folder's last.pt) and, with ``accept_changes``, accept a changed seed, data set or start preset instead of
    refusing it; the changes are recorded in config.json and the checkpoints (``accepted_changes``)."""

    checkpoint: "bool | str | os.PathLike" = True
    accept_changes: bool = False


def data_identity(dataset) -> dict | None:
    """What identifies a training set beyond the model configuration, for resume checks: ``dataset.identity``
    or, for a view of a store, ``dataset.store.identity`` (a dict such as ``{"content_key": ..., "start_preset":
    ...}``); None for a data set that has none."""
    for owner in (dataset, getattr(dataset, "store", None)):
        identity = getattr(owner, "identity", None) if owner is not None else None
        if identity is not None:
            return dict(identity() if callable(identity) else identity)
    return None


def atomic_copy(src: Path, dst: Path):
    """Make ``dst`` an independent, complete copy of ``src`` atomically (never a hard link: damaging one file
    must not damage the other)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def numpy_rng_state() -> dict:
    """numpy's global RNG state as tensors and plain values (what ``torch.load(weights_only=True)`` accepts)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state) -> None:
    if isinstance(state, dict):
        state = (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                 state["cached_gaussian"])
    np.random.set_state(state)


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _legacy_numpy_globals() -> list:
    """The numpy types that checkpoints of kflow <= 0.2 pickled (the numpy RNG state): array reconstruction
    only, no callables that could run code."""
    multiarray = getattr(np, "_core", np.core).multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_weights_only(path: Path, map_location):
    with torch.serialization.safe_globals(_legacy_numpy_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _intact_step_checkpoints(folder: Path, skip: Path) -> Path | None:
    """The newest ``step_*.pt`` in ``folder`` (other than ``skip``) that reads as a kflow checkpoint."""
    for candidate in sorted(folder.glob("step_*.pt"), reverse=True):
        if candidate.resolve() == skip.resolve():
            continue
        try:
            state = _load_weights_only(candidate, "cpu")
        except Exception:
            continue
        if isinstance(state, dict) and state.get("kind") == CHECKPOINT_KIND:
            return candidate
    return None


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint without executing anything from it (``weights_only``); ``CheckpointError`` names the file,
    the cause and, for a damaged file, the newest intact step checkpoint beside it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = _load_weights_only(path, map_location)
    except Exception as err:
        hint = ""
        intact = _intact_step_checkpoints(path.parent, path)
        if intact is not None:
            hint = (f"; the newest intact checkpoint beside it is {intact} (train on from it with --resume {intact}, "
                    f"or sample it with --checkpoint {intact})")
        if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
            raise CheckpointError(f"{path}: refused, the file holds objects other than tensors and plain values "
                                  f"(loading it could run code){hint}") from err
        raise CheckpointError(f"{path}: cannot be read as a checkpoint (truncated or corrupt?): "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{hint}") from err
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: not a kflow checkpoint")
    return state


def load_weights(model: nn.Module, weights: dict, source: str):
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shape = [f"{k} {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if shape:
            parts.append(f"shape mismatches {shape[:5]}")
        raise CheckpointError(f"{source}: weights do not fit this model (a checkpoint of another configuration?): "
                              + "; ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None, use_ema: bool = True,
                    map_location="cpu") -> dict:
    """Read a checkpoint (raising ``CheckpointError`` with the reason) and, if ``model`` is given, load its EMA
    (default) or raw weights into it. Returns the checkpoint dict (with ``config`` and ``step``)."""
    state = read_checkpoint(path, map_location)
    if model is not None:
        weights = state["ema"]["shadow"] if (use_ema and state.get("ema")) else state["model"]
        load_weights(model, weights, str(path))
    return state


def check_fresh_run_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Checkpoint files of an earlier run in ``out_dir``; ``RunExistsError`` if there are some and not ``overwrite``.
    Call it before writing anything into a run folder that a fresh (not resumed) run is about to use."""
    folder = Path(out_dir) / "checkpoints"
    previous = sorted(folder.glob("*.pt")) if folder.exists() else []
    if previous and not overwrite:
        raise RunExistsError(f"{out_dir} already holds a training run ({len(previous)} checkpoint files); "
                             "resume it (--resume) or start over (--overwrite)")
    return previous
