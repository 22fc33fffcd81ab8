"""Running cells from plain specs (``cell_spec`` / ``spec_cell`` / ``run_cell_spec``), as the benchmark runner
does in its worker processes.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


from kflow.utils.io import FolderLock
from kflow.vision.artifacts import load_image_model
from kflow.vision.config import ImageModelConfig
from kflow.vision.study.cells import StudyCell, VisionStudyBudget
from kflow.vision.study.context import StudyContext, prepare_study
from kflow.vision.study.model_cells import run_final_cell, run_model_cell
from kflow.vision.study.steering_cells import run_steering_cell


__all__ = ["cell_spec", "spec_cell", "study_context", "run_cell_spec"]


# ---------------------------------------------------------------------------------------------- running cells
_CONTEXTS: dict[str, StudyContext] = {}


def cell_spec(cell: StudyCell, budget: VisionStudyBudget, data_root: str | None = None, **options) -> dict:
    """A cell as plain data, so a worker process can run it (``run_cell_spec``). ``options``: ``figures``,
    ``split_run`` (the run whose decomposition splits the noise) and ``cdr`` for steering cells."""
    return {"kind": cell.kind, "row": cell.row, "seed": cell.seed, "out": str(cell.out), "work": str(cell.work),
            "config": None if cell.config is None else cell.config.to_dict(), "steps": cell.steps,
            "extra": cell.extra, "budget": asdict(budget), "data_root": data_root, **options}


def spec_cell(spec: dict) -> StudyCell:
    config = None if spec["config"] is None else ImageModelConfig.from_dict(spec["config"])
    return StudyCell(spec["kind"], spec["row"], spec["seed"], Path(spec["out"]), Path(spec["work"]), config,
                     spec["steps"], dict(spec["extra"]), VisionStudyBudget(**spec["budget"]))


def study_context(budget: VisionStudyBudget, work: str | Path, data_root=None, progress=False, log=print):
    """``prepare_study``, once per process (workers reuse the context for every cell they run)."""
    key = json.dumps([asdict(budget), str(work)], sort_keys=True)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = prepare_study(budget, work, data_root, progress, log)
    return _CONTEXTS[key]


def run_cell_spec(spec: dict, progress: bool = False) -> dict:
    """Run the cell described by ``cell_spec`` in this process; returns its result."""
    from functools import partial

    log = partial(print, flush=True)
    budget = VisionStudyBudget(**spec["budget"])
    ctx = study_context(budget, spec["work"], spec["data_root"], progress, log)
    cell = spec_cell(spec)
    # One process per cell: a second runner of the same study gets FolderBusyError and moves on to another cell.
    with FolderLock(cell.run_dir, f"{cell.kind}.lock", what="study runner"):
        if cell.kind == "model":
            return run_model_cell(cell, ctx, progress, log)
        if cell.kind == "final":
            return run_final_cell(cell, ctx, progress, log)
        split = load_image_model(spec["split_run"])[1].decomposition if spec.get("split_run") else None
        return run_steering_cell(cell, ctx, Path(spec["figures"]), split=split, cdr=spec.get("cdr", True),
                                 progress=progress, log=log)
