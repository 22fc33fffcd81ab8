"""Pretrained models for ``assemble(model=...)``: ``AssemblyModel`` (load once, predict many times) and the cache of
models loaded by name or path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Union

import torch


__all__ = ["AssemblyModel", "clear_model_cache", "DEFAULT_SAMPLES", "DEFAULT_MODEL", "ModelLike", "MAX_SAMPLES",
           "MAX_STEPS", "SECONDS_PER_SAMPLE", "check_work"]


DEFAULT_SAMPLES = 8  # starts sampled and ranked, in Python (assemble) and on the command line (kflow assemble)
# Bounds on the work of one call, refused above unless asked for (``no_limit`` / ``--no-limit``): all samples are
# sampled as one batch (memory grows with samples × 17 molecules × atoms) and each is relaxed; ``steps`` network
# evaluations per sample. Measured: about SECONDS_PER_SAMPLE s per sample of a 20-atom molecule at the default
# 10 steps on a loaded 2-core machine (sampling plus relaxation; the relaxation dominates).
MAX_SAMPLES = 64
MAX_STEPS = 100
SECONDS_PER_SAMPLE = 2.5
DEFAULT_MODEL = "hard"  # the shipped model for a molecule alone


# ------------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True, eq=False)
class AssemblyModel:
    """A loaded pretrained model for ``assemble(model=...)``: load once, predict many times.

    ``net`` (the flow model, eval mode), ``rigid`` (its ``RigidKFlow``) and ``meta`` are what
    ``pretrained.load_pretrained`` returns; ``name`` and ``path`` (the absolute path of the file read) are reported in
    the summary and the console."""

    net: torch.nn.Module = field(repr=False)
    rigid: Any = field(repr=False)
    meta: dict = field(repr=False)
    name: str = "loaded model"
    path: str | None = None

    @classmethod
    def load(cls, model: str | os.PathLike = DEFAULT_MODEL, cache: bool = True) -> "AssemblyModel":
        """A shipped model by name (``pretrained.list_pretrained()``; always the shipped file) or a pretrained
        file given as a path (``./hard``, ``my.pt``: ``pretrained.is_model_path``). With ``cache`` a file
        already loaded (same path, size and modification time) is reused: ``assemble(model="hard")`` loads the
        model once per process. ``clear_model_cache()`` forgets them."""
        import copy

        from kflow.molecular.assemble.pretrained import load_pretrained, resolve_pretrained

        path = resolve_pretrained(model)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        loaded = _MODEL_CACHE.pop(key, None) if cache else None  # popped and put back: the newest entry
        if loaded is None:
            loaded = load_pretrained(path)
        if cache:
            _MODEL_CACHE[key] = loaded
            while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
                _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        net, rigid, meta = loaded
        return cls(net, rigid, copy.deepcopy(meta), str(model), str(path.resolve()))


_MODEL_CACHE: dict[tuple[str, int, int], tuple] = {}
_MODEL_CACHE_SIZE = 4  # a shipped model is ~0.2 MB of weights; a few files at most in one session


def clear_model_cache() -> None:
    """Forget the models ``assemble`` / ``AssemblyModel.load`` loaded by name or path."""
    _MODEL_CACHE.clear()


ModelLike = Union[str, "os.PathLike[str]", AssemblyModel, tuple]


def as_model(model: ModelLike) -> AssemblyModel:
    """An ``AssemblyModel`` from a name or file (cached), an ``AssemblyModel``, or ``load_pretrained``'s
    ``(model, rigid, meta)``."""
    from kflow.molecular.assemble.pretrained import check_meta

    if isinstance(model, AssemblyModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return AssemblyModel.load(model)
    if isinstance(model, (tuple, list)) and len(model) == 3 and isinstance(model[2], dict):
        check_meta(model[2], "model")
        return AssemblyModel(model[0], model[1], model[2])
    raise TypeError(f"model must be a shipped name, a pretrained file, an AssemblyModel or load_pretrained's "
                    f"(model, rigid, meta); got {type(model).__name__}")


def check_work(samples: int, steps: int | None, no_limit: bool = False) -> None:
    """Refuse (``ValueError``, one line with a time estimate) ``samples`` above ``MAX_SAMPLES`` or ``steps`` above
    ``MAX_STEPS`` unless ``no_limit``: ``--samples 1000000`` once ran silently for what would have been weeks."""
    if no_limit:
        return
    if samples > MAX_SAMPLES:
        hours = samples * SECONDS_PER_SAMPLE / 3600
        raise ValueError(f"samples={samples} is above the limit of {MAX_SAMPLES} (one batch, each sample relaxed: "
                         f"about {SECONDS_PER_SAMPLE} s a sample on 2 CPU cores, so ~{hours:.1f} h, and memory "
                         "grows with it); give --no-limit (no_limit=True) to run it anyway")
    if steps is not None and steps > MAX_STEPS:
        raise ValueError(f"steps={steps} is above the limit of {MAX_STEPS} (the shipped models use 10; work grows "
                         "with steps × samples); give --no-limit (no_limit=True) to run it anyway")
