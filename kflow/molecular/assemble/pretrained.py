"""Pretrained assembly models: the file format and loading by name (the recipe that trains the shipped ones is
``kflow.molecular.pretraining``).

A pretrained model is one torch file, readable with ``torch.load(weights_only=True)`` (nothing in it can run
code), holding

    {"format": "kflow-pretrained", "version": 1,
     "config":  AssemblyModelConfig.to_dict(),
     "weights": state dict of the (EMA) AssemblyFlowModel,
     "meta":    JSON-like provenance: the data it saw, the exact command, seeds and split, the start preset
                ("hard" | "mild"), the --mirror mode, the largest molecule and the elements of the training data,
                and the test metrics}

Names resolve to ``kflow/molecular/pretrained_models/<name>.pt`` (package data, so editable and normal installs find
them), whatever the working folder holds; a path (a separator or a suffix: ``./hard``, ``my_model.pt``) is read as
it is.

    model, rigid, meta = load_pretrained("hard")
    save_pretrained("my_model.pt", model, config, meta)
"""
from __future__ import annotations

import json
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Sequence

import torch

from kflow.molecular.model.config import AssemblyModelConfig, build_assembly_model
from kflow.utils.io import atomic_save, safe_filename


__all__ = ["save_pretrained", "load_pretrained", "read_pretrained", "list_pretrained", "resolve_pretrained",
           "training_data_meta", "is_model_path", "PRETRAINED_DIR", "PRETRAINED_FORMAT", "PRETRAINED_VERSION", "REQUIRED_META",
           "MIRROR_MODES", "PRESETS"]


PRETRAINED_FORMAT = "kflow-pretrained"
PRETRAINED_VERSION = 1
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained_models"
# What ``kflow assemble`` needs to know about a model before it predicts: which start it was trained for, how the
# copies of a lone molecule are made, and which molecules it has seen (elements, size).
REQUIRED_META = ("preset", "mirror", "elements", "max_atoms")
MIRROR_MODES = ("none", "half")  # copies of one conformer, or a racemic mix (half of the copies mirrored)
PRESETS = ("hard", "mild", "shell")


# ------------------------------------------------------------------------------------------------ file format
def check_meta(meta: dict, where: str) -> None:
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
    check_meta(meta, str(path))
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


def is_model_path(text: str) -> bool:
    """A model given as a path rather than a name: it holds a path separator or has a suffix (``./hard``,
    ``models/hard``, ``hard.pt``). Anything else is a name, and a shipped name always means the shipped model,
    whatever file of that name the working folder holds."""
    return os.sep in text or "/" in text or (os.altsep or "/") in text or bool(Path(text).suffix)


def resolve_pretrained(name_or_path: str | os.PathLike) -> Path:
    """The file of a pretrained model: a shipped name (``list_pretrained()``) is ``PRETRAINED_DIR/<name>.pt``; a
    path (``is_model_path``, or an ``os.PathLike``) is that file. Raises ``FileNotFoundError`` listing the shipped
    names."""
    text = str(name_or_path)
    if isinstance(name_or_path, os.PathLike) or is_model_path(text):
        path = Path(text).absolute()  # said in full: ./hard is not the shipped hard
        if not path.exists():
            raise FileNotFoundError(f"{text}: no such model file ({_available()})")
        if not path.is_file():
            raise ValueError(f"{text}: not a model file (a folder or a device); give a pretrained .pt file")
        return path
    shipped = PRETRAINED_DIR / f"{text}.pt"
    if safe_filename(text) != text or not shipped.is_file():
        local = " (a file in this folder? give it as a path: ./" + text + ")" if Path(text).is_file() else ""
        raise FileNotFoundError(f"no pretrained model named {text!r}{local} ({_available()})")
    return shipped


def read_pretrained(name_or_path: str | os.PathLike, map_location="cpu") -> dict:
    """The validated content of a pretrained file (``format``, ``version``, ``config``, ``weights``, ``meta``)
    without building the model. A corrupt, truncated or foreign file is a ``ValueError`` naming it, whatever
    torch's loader raised on it (``UnpicklingError``, ``IndexError``, ``EOFError``, a bad zip, ...)."""
    path = resolve_pretrained(name_or_path)
    try:
        with warnings.catch_warnings():  # torch's warnings about a foreign file would precede the one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an object (never executed), or garbage
        if "Unsupported global" not in str(err):  # torch's unpickler met no object, only bytes it cannot read
            raise ValueError(f"{path}: corrupt, truncated or another kind of file, not a kflow pretrained model "
                             "(not a torch file)") from None
        raise ValueError(f"{path}: not a kflow pretrained model: it holds Python objects other than tensors and "
                         "plain data, which kflow refuses to load because loading them could run code; a kflow "
                         "model is written by kflow.molecular.assemble.pretrained.save_pretrained") from None
    except MemoryError:
        raise
    except Exception as err:  # not a torch file at all (/etc/passwd: IndexError), truncated, a damaged zip, ...
        detail = str(err).strip().splitlines()[0].split(". ")[0][:160] if str(err).strip() else "no detail"
        raise ValueError(f"{path}: corrupt, truncated or another kind of file, not a kflow pretrained model "
                         f"(torch cannot read it: {type(err).__name__}: {detail})") from None
    if not isinstance(state, dict) or state.get("format") != PRETRAINED_FORMAT:
        hint = " (a training checkpoint? package it with kflow.molecular.assemble.pretrained.save_pretrained)" if (
            isinstance(state, dict) and "model" in state) else ""
        raise ValueError(f"{path}: not a kflow pretrained model (no format tag {PRETRAINED_FORMAT!r}){hint}")
    if state.get("version") != PRETRAINED_VERSION:
        raise ValueError(f"{path}: pretrained format version {state.get('version')!r}, this kflow reads version "
                         f"{PRETRAINED_VERSION}")
    for key, kind in (("config", dict), ("weights", dict), ("meta", dict)):
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{path}: pretrained file lacks its {key}")
    check_meta(state["meta"], str(path))
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
    except MemoryError:
        raise
    except Exception as err:  # a configuration or weights that do not fit, whatever the type
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else "no detail"
        raise ValueError(f"{path}: weights do not fit the stored model configuration "
                         f"({type(err).__name__}: {detail})") from None
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
