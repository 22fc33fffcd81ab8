"""Every on-disk format of the molecular domain that a run reads or writes, in one place.

Run folder (written by ``kflow.molecular.workflow.train_assembly``; default ``runs/assembly_<data set>_k<bands>``):

    checkpoints/        the Trainer's checkpoints (``last.pt``, ``step_*.pt``); each carries the run config, whose
                        ``model`` entry is ``AssemblyModelConfig.to_dict()``
    metrics.jsonl/.csv  the Trainer's logs

Predictions (``sample_assembly.py`` writes, ``evaluate_assembly.py`` reads): one ``.npz`` (no pickled objects)
with ``positions`` float32 [R, N_total, 3] (R repeats, the clusters' atoms concatenated in data-set order, each
cluster in its own atom order), ``counts`` int [B] (atoms per cluster) and ``names`` str [B]; evaluation results go
to ``<predictions>.metrics.json``. Optional per-cluster extxyz files are named ``<cluster name>_predicted.extxyz``
with the name made safe for a file system (it comes from the input data).

Cluster stores and raw COD-Cluster17 files are data, not run artifacts: see ``store`` and ``io``.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kflow.core.training import load_checkpoint
from kflow.molecular.data.io import export_cluster
from kflow.molecular.model.config import AssemblyModelConfig, build_assembly_model
from kflow.utils.io import atomic_write_bytes, atomic_write_text, safe_filename, unique_filename

__all__ = ["default_run_dir", "load_assembly_model", "write_predictions", "read_predictions",
           "export_predictions", "metrics_path", "write_metrics"]


def default_run_dir(dataset: str, num_bands: int) -> Path:
    """runs/assembly_<data set>_k<bands>."""
    return Path("runs") / f"assembly_{safe_filename(Path(str(dataset)).stem)}_k{num_bands}"


def load_assembly_model(checkpoint: str | os.PathLike, use_ema: bool = True):
    """(model, rigid flow, run config) from a training checkpoint; clear errors for corrupt or mismatched files."""
    state = load_checkpoint(checkpoint)
    if "model" not in state.get("config", {}):
        raise ValueError(f"{checkpoint}: not a molecular assembly checkpoint (no model configuration)")
    config = AssemblyModelConfig.from_dict(state["config"]["model"])
    model, rigid = build_assembly_model(config)
    load_checkpoint(checkpoint, model, use_ema=use_ema)
    return model.eval(), rigid, state["config"]


def _names(dataset) -> list[str]:
    return [dataset.cluster(i).name for i in range(len(dataset))]


def write_predictions(path: str | os.PathLike, dataset, predictions: Sequence[torch.Tensor]) -> Path:
    """Atomic .npz of ``predictions`` (one [R, N_i, 3] tensor per cluster of ``dataset``, in order)."""
    if len(predictions) != len(dataset):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset)} clusters")
    buf = io.BytesIO()
    np.savez_compressed(buf, positions=torch.cat(list(predictions), 1).numpy().astype(np.float32),
                        counts=np.array([p.shape[1] for p in predictions]), names=np.array(_names(dataset)))
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def read_predictions(path: str | os.PathLike, dataset) -> list[torch.Tensor]:
    """Predictions of ``write_predictions`` as a list of [R, N_i, 3]; they must belong to the clusters of
    ``dataset`` (same names, same order), else ``ValueError`` naming the file."""
    try:
        data = np.load(path, allow_pickle=False)
        names, counts, positions = list(data["names"]), data["counts"], data["positions"]
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: not a predictions file of sample_assembly.py ({err})") from err
    if names != _names(dataset):
        raise ValueError(f"{path}: clusters do not match the {dataset.split} split of this data set "
                         "(different data set, split or seed?)")
    if int(counts.sum()) != positions.shape[1]:
        raise ValueError(f"{path}: atom counts add up to {int(counts.sum())}, positions hold {positions.shape[1]}")
    return list(torch.split(torch.from_numpy(positions), counts.tolist(), dim=1))


def export_predictions(out_dir: str | os.PathLike, dataset, predictions: Sequence[torch.Tensor],
                       repeat: int = 0) -> list[Path]:
    """``out_dir/<name>_predicted.extxyz`` per cluster (one repeat); names are sanitised, so a cluster name taken
    from an input file can never place a file outside ``out_dir``, and made unique (``unique_filename``: names
    that collide once sanitised get a suffix ``-2``, ...), so every cluster gets its own file. Each file's
    ``name`` is the cluster's own name (``printable_name``). Returns the paths in the order of the clusters."""
    paths, taken = [], set()
    for i, pred in enumerate(predictions):
        cluster = dataset.cluster(i)
        path = Path(out_dir) / f"{unique_filename(cluster.name, taken)}_predicted.extxyz"
        paths.append(export_cluster(cluster, path, "predicted", pred[repeat]))
    return paths


def metrics_path(predictions_path: str | os.PathLike) -> Path:
    return Path(predictions_path).with_suffix(".metrics.json")


def write_metrics(path: str | os.PathLike, results: dict[str, dict]) -> Path:
    """Evaluation results as JSON: a ``summary`` without the per-cluster lists, and the ``full`` results."""
    summary = {m: {k: {kk: vv for kk, vv in v.items() if kk != "per_cluster"} if isinstance(v, dict) else v
                   for k, v in r.items()} for m, r in results.items()}
    atomic_write_text(path, json.dumps({"summary": summary, "full": results}, indent=1))
    return Path(path)
