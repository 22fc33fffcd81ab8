"""Predict how one molecule packs: the library behind ``kflow assemble``.

Python (objects in, objects out)::

    from kflow.molecular.assemble import assemble

    result = assemble("CC(=O)Oc1ccccc1C(=O)O")     # or an RDKit Mol, an ASE Atoms, a pymatgen Structure, a path
    best = result.predictions[0]                    # ase.Atoms, 17 molecules (array "mol_idx"), best first
    result.scores[0], result.metrics                # contact scores / ranking; metrics against a known crystal
    result.write("runs/aspirin")                    # the files of ``kflow assemble --out runs/aspirin``

Input (``read_assembly_input``) is one of
- a molecule: an RDKit ``Mol`` (its first 3-D conformer; one is embedded as for SMILES when it has none), an ASE
  ``Atoms`` without periodicity, a pymatgen ``Molecule``, an XYZ, MOL or SDF file (one structure; RDKit for
  MOL/SDF, ASE otherwise) or a SMILES string (RDKit: hydrogens added, one ETKDG conformer embedded with the seed,
  MMFF-optimised, UFF where MMFF lacks parameters);
- a crystal: an ASE ``Atoms`` periodic along all three axes (a cell and ``pbc=True``), a pymatgen ``Structure``,
  a CIF, an extxyz (or any ASE-readable file) with a periodic cell, or an ASE database row (``.db``, ``.json``). A
  file with several structures needs ``PATH@N``: N is the 0-based position of the structure in the file, the same
  for every format (CIF data block, SDF record, extxyz frame, database row; as ``ase.io.read("PATH@N")`` counts);
  ``PATH@id=K`` picks an ASE database row by its id. The structure's ``source`` is ``PATH@N`` as given.
A string is a path when that file exists (``PATH@N``: when PATH exists), else SMILES when RDKit parses it, else a
missing file; ``smiles=True`` always reads SMILES, ``smiles=False`` never.

Names: the structure's own name wherever one is shown (titles, extxyz ``name``, PDB title, summary): an RDKit
``_Name``, an ASE ``info`` / pymatgen ``properties`` key ``name``, ``refcode``, ``csd_code``, ``identifier`` or
``title`` (any case), a CIF data block, an ASE database row's refcode, an SDF title; else the molecule's formula
(a SMILES string, an unnamed object) or the file name. ``name=`` overrides it.

A molecule alone gets 17 start copies with the ``hard`` preset logic (random orientations, centroids placed at
random without overlap at crystal density). The density comes from the molecule alone: its van der Waals volume
(union of Bondi spheres, on a 0.25 Å grid) divided by the packing coefficient 0.71, the median of the CSD-500
crystals (5–95 %: 0.69–0.76; Kitaigorodskii's organic crystals span 0.65–0.77). ``mirror="half"`` mirrors 8 of
the 17 copies (x → −x, then the random rotation) for a racemic mix; every copy keeps the input's atom order.
With ``mirror="half"`` the notes say what the mirrored copies are (``mirror_note``): RDKit perceives the molecule
from its 3-D geometry (bond orders, else connectivity) and compares the isomeric SMILES of the input and of its
mirror image; when they differ the molecule is chiral and the 8 copies are its enantiomer (a racemic cluster, which
an enantiopure compound does not form: use ``mirror="none"``), else they are the same compound. Axial and planar
chirality (atropisomers) are not perceived.
A crystal gets its true 17-molecule cluster and a start by the model's preset (``crystals.build_cluster``).

Prediction runs the model's sampler on all ``samples`` starts at once, each molecule is snapped onto the exact
rigid motion of its input geometry (float64 Kabsch; the sampler is rigid to float32 rounding, ~1e-6 Å, reported),
and the samples are ranked by a physical score: fewest close contacts (intermolecular atom pairs closer than
0.75 × the sum of Bondi radii, 0.5 × for an H on N/O/F paired with N/O/F, so hydrogen bonds are not contacts;
96 % of the CSD-500 crystal clusters have none), then compactness (radius of gyration of the molecule centroids).
With a crystal input the samples are also scored against the true cluster (PM-atom, PM-center, index-paired and
with molecules matched, RMSD₁₅, collision and separation rates).

Outputs (``AssemblyResult.write``, ``write_assembly_outputs``) appear together or not at all: the folder is built
beside the output folder and swapped in when complete (``store.staged_folder``).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from kflow.molecular.assemble.inputs import AssemblyInput, check_input
from kflow.molecular.assemble.models import DEFAULT_MODEL, DEFAULT_SAMPLES, ModelLike, as_model, check_work
from kflow.molecular.assemble.outputs import check_out_dir, cluster_atoms, display_name, write_assembly_outputs
from kflow.molecular.assemble.predict import molecule_blocks, predict_clusters, relax_samples, truth_metrics
from kflow.molecular.assemble.pretrained import MIRROR_MODES
from kflow.molecular.assemble.readers import InputLike, read_assembly_input
from kflow.molecular.assemble.starts import (FROM_MOLECULE_PRESETS, crystal_starts, lone_molecule_starts, mirror_note,
                                             mirrored_copies, reference_copies)
from kflow.molecular.data.cluster import Cluster
from kflow.molecular.data.molecules import PACKING_COEFFICIENT, estimate_volume_per_molecule
from kflow.molecular.evaluation.contacts import CONTACT_FACTOR, HBOND_CONTACT_FACTOR, contact_scores, rank_samples
from kflow.utils.cli import check_seed
from kflow.utils.io import one_writer

if TYPE_CHECKING:
    from ase import Atoms


__all__ = ["AssemblyResult", "assemble", "RIGID_TOLERANCE"]


RIGID_TOLERANCE = 1e-4  # Å: every predicted molecule is a rigid motion of its input geometry to this


# ------------------------------------------------------------------------------------------------------ results
@dataclass(eq=False)
class AssemblyResult:
    """What ``assemble`` predicts for one molecule or crystal.

    - ``predictions``: the predicted 17-molecule clusters as ``ase.Atoms`` (Å, no cell), best first; per-atom
      array ``mol_idx`` (molecule 0..16, each molecule's atoms contiguous and in the input's atom order) and
      ``info`` ``name``, ``arrangement``, ``sample``, ``rank`` (1 = best, as in ``scores``), as the frames of
      samples.extxyz.
    - ``starts``: the start cluster of each prediction, in the same order.
    - ``scores``: one dict per prediction, in the same order: ``sample``, ``rank`` (1 = best), ``start_seed`` (a
      lone molecule) or ``draw`` (a crystal), ``close_contacts``, ``radius_of_gyration`` (Å), ``collision_pct``,
      ``separation_pct`` (``contact_scores``) and, for a crystal, ``metrics`` (``truth_metrics``).
    - ``order``: the sample indices, best first (``rank_samples``).
    - ``truth``: the crystal's true 17-molecule cluster (``ase.Atoms``) for a crystal input, else None;
      ``metrics`` / ``start_metrics``: the best prediction's and its start's scores against it;
      ``summary["against_start"]`` compares them and says where the prediction is worse than its start.
    - ``summary``: what summary.json holds (input, model, seed, steps, start, ranking, samples, rigidity, timings;
      ``files`` once written); ``input``: the ``AssemblyInput`` read.
    - ``write(folder)``: the files of ``kflow assemble --out folder``; ``files`` and ``folder`` then say which
      and where. ``total_s``: seconds ``assemble`` took (with writing when it wrote).
    """

    input: AssemblyInput
    predictions: list[Atoms]
    starts: list[Atoms]
    scores: list[dict]
    order: list[int]
    summary: dict
    truth: Atoms | None = None
    metrics: dict | None = None
    start_metrics: dict | None = None
    files: list[str] | None = None
    folder: Path | None = None
    total_s: float = 0.0
    clusters: list[Cluster] = field(default_factory=list, repr=False)  # the samples' clusters (starts, truth)
    positions: torch.Tensor | None = field(default=None, repr=False)  # [S, N, 3] float64, in sample order

    @property
    def name(self) -> str:
        """The molecule's (or crystal's) name, as the outputs show it."""
        return self.summary["input"]["name"]

    @property
    def notes(self) -> list[str]:
        """What the reader and the start did that the user may not expect (conformer, hydrogens, mirror, ...)."""
        return self.summary["input"]["notes"]

    @property
    def best(self) -> Atoms:
        """The first-ranked prediction (``predictions[0]``, written as pred.extxyz / pred.pdb)."""
        return self.predictions[0]

    def write(self, folder: str | os.PathLike) -> list[str]:
        """Write pred.extxyz, pred.pdb, start.extxyz, samples.extxyz (several samples), truth.extxyz (a crystal),
        cluster.png and summary.json into ``folder``, all of them or none (``write_assembly_outputs``); ``folder``
        is created, or replaced when it holds an earlier kflow assemble output only; one writer at a time
        (``kflow.utils.io.one_writer``). Returns the file names."""
        with one_writer(folder, "kflow assemble"):
            files = write_assembly_outputs(folder, self.clusters, self.positions, self.order, self.summary,
                                           self.truth is not None)
        self.summary = {**self.summary, "files": files}
        self.files, self.folder = files, Path(folder)
        return files

    def __repr__(self) -> str:
        first = self.scores[0]
        text = (f"AssemblyResult({self.name!r}, {self.input.kind}, {len(self.predictions)} prediction(s); best: "
                f"sample {first['sample']}, {first['close_contacts']} close contacts")
        if self.metrics:
            text += f", PM-center matched {self.metrics['pm_center_matched']:.2f} Å"
        return text + (f"; written to {str(self.folder)!r})" if self.folder else ")")


# ----------------------------------------------------------------------------------------------------- pipeline
class _Phases:
    """One progress line over the steps of ``assemble`` (each may take a second or more: the first imports, the
    conformer, the model, sampling, plotting) and their wall times. When stderr is not a terminal (a log file, a
    pipe) each step is a line of its own instead, so an error line never runs into a bar's carriage returns."""

    NAMES = ("reading input", "loading model", "building starts", "sampling", "scoring", "writing")

    def __init__(self, enabled: bool, writing: bool = True):
        import sys

        from tqdm.auto import tqdm

        self.lines = enabled and not sys.stderr.isatty()
        self.bars = enabled and not self.lines  # the inner bars (sampling, relaxing) too
        self.bar = tqdm(total=len(self.NAMES) - (not writing), bar_format="{desc} [{n_fmt}/{total_fmt}, {elapsed}]",
                        disable=not self.bars, leave=False)
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.lines:
            import sys

            print(f"kflow assemble: {name}", file=sys.stderr, flush=True)
        self.bar.set_description_str(f"kflow assemble: {name}")
        t0 = time.perf_counter()
        yield
        self.timings[name.replace(" ", "_") + "_s"] = round(time.perf_counter() - t0, 3)
        self.bar.update(1)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def close(self):
        self.bar.close()


def _check_integer(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (minimum is not None
                                                                                and value < minimum):
        need = f"an integer >= {minimum}" if minimum is not None else "an integer"
        raise ValueError(f"{name} must be {need}, got {value!r}")


def assemble(x: InputLike, *, samples: int = DEFAULT_SAMPLES, model: ModelLike = DEFAULT_MODEL, seed: int = 0,
             out: str | os.PathLike | None = None, steps: int | None = None, mirror: str | None = None,
             progress: bool = False, smiles: bool | None = None, name: str | None = None,
             relax: bool = True, no_limit: bool = False) -> AssemblyResult:
    """Predict the 17-molecule packing of a molecule or a crystal (see the module docstring).

    ``x``: an RDKit ``Mol``, an ASE ``Atoms`` (a crystal when periodic along all three axes), a pymatgen
    ``Structure`` or ``Molecule``, a SMILES string, or a file (``PATH`` or ``PATH@N``); ``smiles`` True/False
    forces or forbids reading a string as SMILES (``read_assembly_input``); ``name`` replaces the structure's own.
    ``model``: a shipped name (``pretrained.list_pretrained()``) or a pretrained file, loaded once per process, or
    an ``AssemblyModel`` / ``load_pretrained``'s ``(model, rigid, meta)``. ``samples`` starts drawn with ``seed``
    are sampled in ``steps`` band steps (default: the model's ``sample_steps``) and ranked by ``contact_scores``;
    ``mirror`` ("none" | "half", default: the model's) applies to lone molecules; ``progress`` shows a progress line.
    ``relax`` (default): every sample is relaxed as 17 rigid molecules against MMFF94 (``relax.relax_cluster``,
    tethered to the sample) and ranked by close contacts, then MMFF intermolecular energy; the start's and each
    sample's contacts and energies (before and after) are in ``summary``.

    Bounds (``models.check_work``): ``samples`` at most ``MAX_SAMPLES`` and ``steps`` at most ``MAX_STEPS`` unless
    ``no_limit``; ``seed`` in [0, 2**31) (``kflow.utils.cli.check_seed``).

    Returns an ``AssemblyResult`` (``.predictions``: ``ase.Atoms``, best first). ``out``: also write the files of
    ``kflow assemble --out`` there (as ``result.write(out)``); while it works, no other process may write that
    folder (``one_writer``: a second one is refused in one line before it starts). Every failure (bad input,
    missing model, an output folder that holds other files or is in use) raises before anything is written."""
    _check_integer("samples", samples, 1)
    seed = check_seed(seed)
    if steps is not None:
        _check_integer("steps", steps, 1)
    check_work(int(samples), steps, no_limit)
    if mirror is not None and mirror not in MIRROR_MODES:
        raise ValueError(f"mirror must be one of {MIRROR_MODES}, got {mirror!r}")
    out_dir = None if out is None else Path(out)
    if out_dir is not None:
        check_out_dir(out_dir)
    with contextlib.ExitStack() as stack:
        if out_dir is not None:  # taken before any work, let go on any exit (an error, Ctrl-C)
            stack.enter_context(one_writer(out_dir, "kflow assemble"))
        phase = _Phases(progress, writing=out_dir is not None)
        try:
            result = _predict(x, model, smiles, name, int(samples), steps, seed, mirror, phase.bars, phase,
                              bool(relax))
            if out_dir is not None:
                with phase("writing"):
                    result.write(out_dir)
        finally:
            phase.close()
    result.total_s = phase.elapsed()
    return result


def _predict(x, model, smiles, name, samples, steps, seed, mirror, progress, phase: _Phases,
             relax: bool = True) -> AssemblyResult:
    with phase("reading input"):
        inp = read_assembly_input(x, smiles=smiles, seed=seed, name=name)
    with phase("loading model"):
        loaded = as_model(model)
        net, rigid, meta = loaded.net, loaded.rigid, loaded.meta
        check_input(inp, meta, f"model {loaded.name!r}")
    notes = list(inp.notes)
    mirror_mode = mirror or meta["mirror"]
    with phase("building starts"):
        if inp.kind == "molecule":
            volume = estimate_volume_per_molecule(inp.atomic_numbers, inp.positions)
            lone_preset = meta["preset"] if meta["preset"] in FROM_MOLECULE_PRESETS else "hard"
            clusters = lone_molecule_starts(inp, samples, seed, mirror_mode, volume, lone_preset)
            references = torch.from_numpy(reference_copies(inp, mirror_mode))[None].expand(samples, -1, -1, -1)
            start = {"preset": lone_preset, "mirror": mirror_mode,
                     "mirrored_copies": int(mirrored_copies(mirror_mode).sum()), "volume_per_molecule": volume,
                     "volume_source": f"van der Waals volume / packing coefficient {PACKING_COEFFICIENT}"}
            if meta["preset"] != lone_preset:
                notes.append(f"model {loaded.name!r} was trained on {meta['preset']!r} starts (each molecule near "
                             "its target); a lone molecule gets a 'hard' start, which it was not trained for")
            if mirror_mode == "half":
                notes.append(mirror_note(inp.atomic_numbers, inp.positions))
        else:
            clusters = crystal_starts(inp, samples, seed, meta["preset"])
            references = torch.stack([molecule_blocks(c.final_positions.double()[None], clusters)[0] for c in clusters])
            cell_volume = abs(float(np.linalg.det(inp.molecules.cell))) / len(inp.molecules.positions)
            start = {"preset": meta["preset"], "mirror": "as in the crystal", "volume_per_molecule": cell_volume,
                     "volume_source": "crystal cell"}
            if mirror is not None:
                notes.append("--mirror applies to lone molecules; a crystal's copies keep their own handedness")
    steps = steps or int(meta.get("sample_steps", 10))
    with phase("sampling"):
        positions, sampler_residual = predict_clusters(net, rigid, clusters, references.contiguous(), steps, seed,
                                                       progress)
    truth = inp.kind == "crystal"
    _check_rigid(positions, references, clusters, sampler_residual)
    relaxed, start_energy = None, None
    if relax:
        with phase("relaxing"):
            positions, relaxed, start_energy, relax_note = relax_samples(positions, clusters, progress)
        if relax_note:
            notes.append(relax_note)
    with phase("scoring"):
        _check_rigid(positions, references, clusters, sampler_residual)
        scores = [contact_scores(positions[k], clusters[k]) for k in range(samples)]
        if relaxed is not None:
            for score, energy in zip(scores, relaxed):
                score.update(energy)
        order = rank_samples(scores)
        start_scores = contact_scores(clusters[order[0]].initial_positions.double(), clusters[order[0]])
        if start_energy is not None:
            start_scores["mmff_energy"] = start_energy
        sample_rows = []
        for k, score in enumerate(scores):
            row = {"sample": k, "rank": order.index(k) + 1, "start_seed": clusters[k].info.get("start_seed"),
                   "draw": k if truth else None, **score}
            if truth:
                row["metrics"] = truth_metrics(clusters[k], positions[k])
            sample_rows.append({key: v for key, v in row.items() if v is not None})
        start_metrics = truth_metrics(clusters[order[0]], clusters[order[0]].initial_positions) if truth else None
    best = order[0]
    summary = {
        "input": {"kind": inp.kind, "source": inp.source, "name": inp.name, "reader": inp.reader,
                  "formula": inp.formula, "atoms_per_molecule": len(inp.atomic_numbers),
                  **({"smiles": inp.smiles} if inp.smiles else {}), "notes": notes},
        "model": {"name": loaded.name, "path": loaded.path, "preset": meta["preset"],
                  "trained_mirror": meta["mirror"], "test_metrics": meta.get("test_metrics"),
                  "created": meta.get("created")},
        "seed": seed, "steps": steps, "method": "band", "num_samples": samples, "start": start,
        "ranking": f"fewest close contacts (< {CONTACT_FACTOR} x sum of Bondi radii, {HBOND_CONTACT_FACTOR} x for "
                   "hydrogen-bond pairs), then "
                   + ("lowest MMFF intermolecular energy after rigid-body relaxation" if relaxed is not None else
                      "smallest radius of gyration of the molecule centroids"),
        "relaxation": ({"method": "rigid-body relaxation of the 17 molecules against MMFF94 (UFF where MMFF has no "
                                  "parameters), tethered to the sample (kflow.molecular.physics.relax.relax_cluster)",
                        "energy_unit": "kcal/mol, intermolecular"} if relaxed is not None else None),
        "start_scores": start_scores,
        "chosen_sample": best,
        "samples": sample_rows,
        "rigidity": {"tolerance_A": RIGID_TOLERANCE, "sampler_residual_A": sampler_residual,
                     "note": "each written molecule is its input geometry moved rigidly (float64 Kabsch onto the "
                             "sampled atoms); sampler_residual_A is how far the sampled atoms were from that"},
    }
    if truth:
        summary["metrics"] = sample_rows[best]["metrics"]
        summary["start_metrics"] = start_metrics
        summary["against_start"] = against_start(summary["metrics"], start_metrics)
    # summary.json holds the times up to writing (the same whether written by assemble(out=...) or .write)
    summary["timings"] = {**phase.timings, "total_before_writing_s": phase.elapsed()}
    shown = display_name(clusters[best].crystal)
    predictions = [cluster_atoms(clusters[k], positions[k], name=shown, arrangement="predicted", sample=k,
                                 rank=r) for r, k in enumerate(order, start=1)]
    starts = [cluster_atoms(clusters[k], clusters[k].initial_positions, name=shown, arrangement="start", sample=k,
                            rank=r) for r, k in enumerate(order, start=1)]
    truth_atoms = cluster_atoms(clusters[best], clusters[best].final_positions, name=shown,
                         arrangement="crystal") if truth else None
    return AssemblyResult(input=inp, predictions=predictions, starts=starts, scores=[sample_rows[k] for k in order],
                          order=order, summary=summary, truth=truth_atoms, metrics=summary.get("metrics"),
                          start_metrics=start_metrics, clusters=list(clusters), positions=positions)


COMPARED = (("pm_center_matched", "PM-center matched"), ("pm_atom_matched", "PM-atom matched"))  # Å, lower: better


def against_start(metrics: dict, start: dict) -> dict:
    """The ranked-first prediction against its own start, both scored against the crystal: per metric of
    ``COMPARED`` (prediction, start), the ones where the prediction is worse (``worse``) and a sentence (``text``)
    that says so, e.g. for GASXON.cif "worse than its start: PM-center matched 2.59 Å (start 2.48)"."""
    keys = [(key, label) for key, label in COMPARED if metrics.get(key) is not None and start.get(key) is not None]
    rows = {key: {"prediction": metrics[key], "start": start[key]} for key, _ in keys}
    worse = [key for key, _ in keys if metrics[key] > start[key]]
    if worse:
        parts = [f"{label} {metrics[key]:.2f} Å (start {start[key]:.2f})" for key, label in keys if key in worse]
        text = "the ranked-first prediction is worse than its start against the crystal: " + ", ".join(parts)
    else:
        text = ("the ranked-first prediction is at least as close to the crystal as its start (PM-center and "
                "PM-atom, matched)")
    return {**rows, "worse": worse, "text": text}


def _check_rigid(positions: torch.Tensor, references: torch.Tensor, clusters: Sequence[Cluster],
                 sampler_residual: float) -> None:
    """Every molecule must be a proper rigid motion of its reference; a violation is a bug, not a user error."""
    from kflow.molecular.geometry import rigid_residuals

    residual = rigid_residuals(references, molecule_blocks(positions, clusters)).max().item()
    if residual > RIGID_TOLERANCE or sampler_residual > 1e-2:
        raise RuntimeError(f"predicted molecules are not rigid copies of the input (residual {residual:.3g} Å, "
                           f"sampler {sampler_residual:.3g} Å)")
