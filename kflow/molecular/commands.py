"""The molecular command lines, one parser and one ``main`` per command: ``kflow train|sample|evaluate|assemble``
and the scripts (``scripts/train_assembly.py``, ``sample_assembly.py``, ``evaluate_assembly.py``,
``train_pretrained.py``) both call these, so a flag or a behaviour exists once.

Every ``*_main(argv=None, prog=None)`` parses ``argv`` (default ``sys.argv[1:]``) and calls the workflow; user
errors are raised (``ValueError``, ``FileNotFoundError``) and turned into one line by ``kflow.cli.main`` or
``kflow.utils.cli.run_main``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from kflow.utils.cli import (ArgumentParser, HelpFormatter, add_run_arguments, nonnegative_int, positive_float,
                             positive_int, seed_int, set_help)

__all__ = ["train_main", "sample_main", "evaluate_main", "assemble_main", "train_pretrained_main", "train_parser",
           "sample_parser", "evaluate_parser", "assemble_parser", "train_pretrained_parser",
           "add_model_arguments", "model_config_from_args", "TRAIN_HELP", "SAMPLE_HELP", "EVALUATE_HELP",
           "ASSEMBLE_HELP", "TRAIN_PRETRAINED_HELP"]

TRAIN_HELP = """Train rigid-body K-Flow for molecular assembly (also: python scripts/train_assembly.py ...).

Examples:
    kflow train --dataset demo --steps 300              # K-Flow (2 bands) on the embedded crystals
    kflow train --dataset demo --num-bands 1            # rigid flow-matching baseline, embedded data
    kflow train --subset 10k                            # COD-Cluster17 10K (data/COD-Cluster17)
    kflow train --dataset my_cifs/ --noise hard --coupling ot --resume
    torchrun --nproc_per_node 2 scripts/train_assembly.py --dataset csd500 --steps 2000
"""

SAMPLE_HELP = """Sample assembled clusters from a trained checkpoint: writes an .npz (and optional extxyz files)
(also: python scripts/sample_assembly.py ...).

Example:
    kflow sample --checkpoint runs/assembly_demo_k2/checkpoints/last.pt --dataset demo \\
        --steps 20 --repeats 3 --out runs/assembly_demo_k2/predictions.npz --extxyz-dir runs/assembly_demo_k2/xyz
"""

EVALUATE_HELP = """Evaluate sampled clusters: PM-atom, PM-center, RMSD_15 (min over repeats), collision and separation
rates, mean ± std over clusters, next to the identity baseline (prediction = initial cluster). Table + JSON
(also: python scripts/evaluate_assembly.py ...).

Example:
    kflow evaluate --predictions runs/assembly_demo_k2/predictions.npz --dataset demo
"""

ASSEMBLE_HELP = """Predict how 17 rigid copies of a molecule pack (a local crystal cluster) with a pretrained model.

INPUT is a molecule (XYZ, MOL or SDF file; a SMILES string, or --smiles) or a crystal (CIF, extxyz with a cell,
ASE database). A file with several structures needs PATH@N, N the 0-based position of the structure in the file in
every format (CIF data block, SDF record, extxyz frame, database row), or PATH@id=K for a database row by its id.
For a crystal the true cluster is built too and the prediction is scored against it (PM-atom, PM-center, RMSD15,
collisions).

Writes DIR/pred.extxyz (molecule ids in the mol_idx column), DIR/pred.pdb (one residue and chain per molecule),
DIR/start.extxyz, DIR/samples.extxyz (all samples, best first), DIR/truth.extxyz (crystals), DIR/summary.json and
DIR/cluster.png; all of them or none. The same in Python, with RDKit, ASE and pymatgen objects in and ASE Atoms
out: kflow.molecular.assemble.assemble(x, out=DIR) (see its docstring and the README's "Python API").

Examples:
    kflow assemble data/examples/GASXON.sdf --out runs/gasxon
    kflow assemble data/examples/GASXON.cif --out runs/gasxon_crystal --samples 8
    kflow assemble --smiles "c1ccccc1" --out runs/benzene --mirror none
    kflow assemble "CC(=O)Oc1ccccc1C(=O)O" --out runs/aspirin       # a string that is no file: SMILES
    kflow assemble crystals.db@12 --out runs/row12 --model mild
"""

TRAIN_PRETRAINED_HELP = """Train, test and package a pretrained model for `kflow assemble`: the train split of
CSD-500 plus the embedded pyxtal crystals (compounds of the CSD-500 validation/test splits removed), checkpoint
selection on the CSD-500 validation split, metrics on the CSD-500 test split, written with save_pretrained.

With --datasets csd500 alone it trains exactly the study's cell for that configuration and seed (same split,
budget and checkpoint selection; benchmarks/assembly_study.py), so its test metrics are the study's row.

Examples:
    python scripts/train_pretrained.py --preset hard --out kflow/molecular/pretrained_models/hard.pt
    python scripts/train_pretrained.py --preset mild --out kflow/molecular/pretrained_models/mild.pt --num-bands 2
    python scripts/train_pretrained.py --preset hard --datasets csd500 --out /tmp/hard_study.pt   # the study's cell
    python scripts/train_pretrained.py --preset hard --out /tmp/tiny.pt --steps 4 --evals 1 --val-clusters 2 \\
        --hidden-irreps "8x0e + 2x1o + 2x1e" --molecule-layers 1      # a smoke test
"""


def _parser(description: str, prog: str | None) -> ArgumentParser:
    return ArgumentParser(description, prog=prog, formatter_class=HelpFormatter)


def _noise_argument(p, help_suffix: str = ""):
    from kflow.molecular.data.starts import NOISE_PRESETS

    p.add_argument("--noise", default="mild", choices=sorted(NOISE_PRESETS),
                   help="start preset of clusters built from crystals" + help_suffix + ": mild (each molecule near "
                        "its target) or hard (molecules placed at random at crystal density, random orientations)")


# ------------------------------------------------------------------------------------------------------ train
def add_model_arguments(p: argparse.ArgumentParser, coupling_default: str | None = None,
                        coupling_note: str = "") -> None:
    """The ``AssemblyModelConfig`` flags shared by ``kflow train`` and ``scripts/train_pretrained.py``;
    ``coupling_note`` ends the help of ``--coupling`` (a command whose default is not a constant says it there)."""
    from kflow.core import ORDERS, RAMPS
    from kflow.molecular.model.config import OBJECTIVES, AssemblyModelConfig
    from kflow.molecular.data.datasets import START_MIRRORS
    from kflow.molecular.model.flow import COUPLINGS
    from kflow.molecular.model.network import CONVOLUTIONS
    from kflow.molecular.model.objective import ROTATION_LOSSES, TIME_SAMPLINGS

    p.add_argument("--num-bands", type=positive_int, default=2,
                   help="Laplacian bands K of the flow; 1 = rigid flow matching (AssembleFlow-style)")
    p.add_argument("--ramp", default="linear", choices=RAMPS, help="how each band switches on over its window")
    p.add_argument("--order", default="low_to_high", choices=ORDERS,
                   help="band order: low_to_high places the collective, cluster-wide modes first")
    p.add_argument("--hidden-irreps", default=AssemblyModelConfig.hidden_irreps,
                   help="e3nn irreps of the network's hidden atom features")
    p.add_argument("--atom-layers", type=positive_int, default=AssemblyModelConfig.num_atom_layers,
                   help="equivariant convolution layers over the atoms")
    p.add_argument("--molecule-layers", type=positive_int, default=AssemblyModelConfig.num_molecule_layers,
                   help="message-passing layers over the 17 molecules")
    p.add_argument("--inter-cutoff", type=positive_float, default=AssemblyModelConfig.inter_cutoff,
                   help="Å; atoms of different molecules closer than this are joined by an edge")
    p.add_argument("--conv", default=AssemblyModelConfig.conv, choices=sorted(CONVOLUTIONS),
                   help="uvu: depthwise convolutions (fast); fctp: fully connected (the earlier network)")
    p.add_argument("--heavy-atoms-only", action=argparse.BooleanOptionalAction,
                   default=AssemblyModelConfig.heavy_atoms_only,
                   help="atom graph without hydrogens (faster; they ride along rigidly); --no-heavy-atoms-only "
                        "keeps every atom")
    p.add_argument("--coupling", default=coupling_default, choices=COUPLINGS,
                   help="index: start molecule i flows to final molecule i; ot: to the final slot of an optimal "
                        "assignment within each cluster (centroid distances); eot: ot alternating with a rotation "
                        "of the final cluster onto the start" + (coupling_note or " (default: index; eot with "
                                                                 "--generative)"))
    p.add_argument("--objective", default="flow", choices=OBJECTIVES,
                   help="flow: K-Flow / flow matching; regression: one-step prediction baseline (needs --num-bands 1)")
    p.add_argument("--generative", action="store_true",
                   help="the recipe for starts from the molecule alone (hard/shell presets): eot coupling about a "
                        "central molecule the network marks, a network that sees only the poses at time t, starts "
                        "redrawn every epoch, the atom pose loss, band-start times (docs/MATH.md §6); the flags "
                        "below override single choices")
    p.add_argument("--condition-on-start", action=argparse.BooleanOptionalAction, default=None,
                   help="the network also sees each molecule's offset from its start (refinement; default: yes, "
                        "no with --generative)")
    p.add_argument("--central", action=argparse.BooleanOptionalAction, default=None,
                   help="start molecule 0 is central: eot pivots on it and the network marks it (default: no, yes "
                        "with --generative)")
    p.add_argument("--redraw-starts", action=argparse.BooleanOptionalAction, default=None,
                   help="draw training starts anew every epoch from the stored crystal (default: no, yes with "
                        "--generative)")
    p.add_argument("--rotation-loss", default=None, choices=ROTATION_LOSSES,
                   help="chart: rotation-vector error; atoms: mean squared atom displacement of the pose (no cut "
                        "at 180°) (default: chart, atoms with --generative)")
    p.add_argument("--rotation-weight", type=positive_float, default=AssemblyModelConfig.rotation_weight,
                   help="weight of the orientation part of the atom pose loss")
    p.add_argument("--time-sampling", default=None, choices=TIME_SAMPLINGS,
                   help="uniform, or band_start: half the training times at the start of a band window (default: "
                        "uniform, band_start with --generative)")
    p.add_argument("--start-mirror", default=None, choices=START_MIRRORS,
                   help="hands of the training start copies: crystal (as in the crystal, default), or as kflow "
                        "assemble makes a lone molecule's copies from molecule 0: none (one hand) or half (the "
                        "odd-numbered copies mirrored)")


def model_config_from_args(args, coupling: str | None = None):
    from kflow.molecular.model.config import AssemblyModelConfig

    return AssemblyModelConfig(num_bands=args.num_bands, ramp=args.ramp, order=args.order,
                               hidden_irreps=args.hidden_irreps, num_atom_layers=args.atom_layers,
                               num_molecule_layers=args.molecule_layers, inter_cutoff=args.inter_cutoff,
                               conv=args.conv, heavy_atoms_only=args.heavy_atoms_only,
                               coupling=coupling or args.coupling or ("eot" if args.generative else "index"),
                               objective=args.objective,
                               **_recipe_from_args(args))


def _recipe_from_args(args) -> dict:
    """The generative-recipe fields: ``study.GENERATIVE`` with --generative, each overridden by its own flag."""
    from kflow.molecular.model.config import GENERATIVE

    recipe = {k: v for k, v in GENERATIVE.items() if k != "coupling"} if args.generative else {}
    for key in ("condition_on_start", "central", "redraw_starts", "rotation_loss", "time_sampling", "start_mirror"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    recipe["rotation_weight"] = args.rotation_weight
    return recipe


def train_parser(prog: str | None = None) -> ArgumentParser:
    p = _parser(TRAIN_HELP, prog)
    p.add_argument("--dataset", default="cod", help="training data: cod (COD-Cluster17), demo (pyxtal's embedded "
                                                    "crystals), csd500 (shipped) or PATH (store, CIF(s), ASE db, "
                                                    "extxyz with lattices)")
    p.add_argument("--subset", default="10k", help="COD-Cluster17 subset: 5k, 10k, all or PATH to an id list")
    p.add_argument("--data-root", default="data", help="folder of the data sets and their built stores")
    p.add_argument("--draws-per-crystal", type=positive_int, default=4,
                   help="noisy start clusters drawn per crystal (data sets built from crystals)")
    _noise_argument(p)
    add_model_arguments(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=positive_int, default=None,
                       help="training steps (default: 50 epochs of the training split)")
    group.add_argument("--epochs", type=positive_int, default=None,
                       help="passes over the training split instead of --steps (default: 50)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="clusters per process")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--ema-decay", type=float, default=0.99,
                   help="decay of the weights' moving average, which is saved and sampled")
    p.add_argument("--checkpoint-every", type=positive_int, default=200, help="training steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--data-seed", type=int, default=0,
                   help="start-cluster draws and the crystal-level split (keep it fixed to compare seeds)")
    p.add_argument("--num-workers", type=nonnegative_int, default=0,
                   help="data-loading worker processes (0: load in the training process)")
    p.add_argument("--out", default=None, help="run folder (default: runs/assembly_<dataset>_k<bands>)")
    add_run_arguments(p)
    set_help(p, "--no-progress", "no progress bars")
    return p


def train_main(argv=None, prog: str | None = None):
    from kflow.core.distributed import is_main_process
    from kflow.core.training import RUN_LOCK
    from kflow.molecular.artifacts import default_run_dir
    from kflow.molecular.workflow import load_assembly_dataset, steps_for_epochs, train_assembly
    from kflow.utils.io import FolderLock, check_writable_folder

    args = train_parser(prog).parse_args(argv)
    out = args.out or default_run_dir(args.dataset, args.num_bands)
    check_writable_folder(out)  # a file, a read-only place or a busy run folder: said before any data is read
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 takes the lock, the other ranks must not see it busy
        FolderLock(out, RUN_LOCK, "training run").check()
    store = load_assembly_dataset(args.dataset, args.data_root, args.subset, args.draws_per_crystal, args.data_seed,
                                  progress=not args.no_progress, noise=args.noise)
    config = model_config_from_args(args)
    steps = args.steps or steps_for_epochs(store, args.epochs or 50, args.batch_size, args.data_seed)
    _, _, summary = train_assembly(store, out, config, steps=steps, batch_size=args.batch_size, lr=args.lr,
                                   seed=args.seed, split_seed=args.data_seed, resume=args.resume,
                                   ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every,
                                   num_workers=args.num_workers, progress=not args.no_progress,
                                   overwrite=args.overwrite, deterministic=args.deterministic)
    if not is_main_process():
        return
    resumed = f" (resumed at step {summary['resumed_from']}, now at {summary['step']})" if summary["resumed_from"] else ""
    print(f"trained {summary['steps_run']} steps{resumed} in {summary['wall_time_s']:.0f} s "
          f"({summary['samples_per_s']:.2f} clusters/s), final loss {summary['loss']:.4g}, "
          f"skipped {summary['skipped_steps']}; checkpoints in {out}/checkpoints")


# ----------------------------------------------------------------------------------------------------- sample
def sample_parser(prog: str | None = None) -> ArgumentParser:
    from kflow.core import SAMPLING_METHODS

    p = _parser(SAMPLE_HELP, prog)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of kflow train (RUN/checkpoints/last.pt)")
    p.add_argument("--dataset", default="demo", help="clusters to predict: demo, csd500, cod or PATH (as kflow train)")
    p.add_argument("--subset", default="10k", help="COD-Cluster17 subset: 5k, 10k, all or PATH to an id list")
    p.add_argument("--data-root", default="data", help="folder of the data sets and their built stores")
    _noise_argument(p, " (as in training)")
    p.add_argument("--split", default=None, choices=["train", "valid", "test", "all"],
                   help="default: test for demo/csd500/cod, all for a file, folder or store given by path")
    p.add_argument("--data-seed", type=int, default=0, help="start draws and split seed (must match training)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (start perturbation of repeats > 0)")
    p.add_argument("--steps", type=positive_int, default=20, help="integration steps (NFE for euler/band)")
    p.add_argument("--method", default="band", choices=SAMPLING_METHODS,
                   help="integrator; band takes the exact step of each band's path")
    p.add_argument("--steps-per-band", type=positive_int, nargs="+", default=None,
                   help="steps inside each band's window (one count per band; replaces --steps)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="predictions per cluster (the evaluation keeps each cluster's best)")
    p.add_argument("--repeat-noise", type=float, default=0.1, help="Å; perturbation of the start for repeats > 0")
    p.add_argument("--batch-size", type=positive_int, default=8, help="clusters sampled together")
    p.add_argument("--out", required=True, help="predictions .npz")
    p.add_argument("--extxyz-dir", default=None, help="also write <name>_predicted.extxyz (first repeat)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def sample_main(argv=None, prog: str | None = None):
    from kflow.molecular.artifacts import export_predictions, load_assembly_model, write_predictions
    from kflow.molecular.model.config import AssemblyModelConfig
    from kflow.molecular.data.datasets import ClusterDataset, with_start_hands
    from kflow.molecular.workflow import default_split, load_assembly_dataset, predict_assembly
    from kflow.utils.io import check_writable_file, check_writable_folder

    args = sample_parser(prog).parse_args(argv)
    check_writable_file(args.out)  # said now, not after minutes of sampling
    if args.extxyz_dir:
        check_writable_folder(args.extxyz_dir, "--extxyz-dir")
    model, rigid, run_config = load_assembly_model(args.checkpoint)
    store = load_assembly_dataset(args.dataset, args.data_root, args.subset, seed=args.data_seed,
                                  noise=args.noise, progress=not args.no_progress)
    split = args.split or default_split(args.dataset)
    dataset = ClusterDataset(store, split=split, seed=args.data_seed)
    if len(dataset) == 0:
        raise ValueError(f"the {split} split of {args.dataset} is empty (too few crystals for an 80/10/10 split? "
                         "use --split all)")
    # the starts get the hands the model trained on (its start_mirror); the written file holds the crystals' names
    mirror = AssemblyModelConfig.from_dict(run_config["model"]).start_mirror
    preds = predict_assembly(model, rigid, with_start_hands(dataset, mirror), args.steps, args.method, args.repeats,
                             args.repeat_noise, args.batch_size, seed=args.seed, progress=not args.no_progress,
                             steps_per_band=args.steps_per_band)
    write_predictions(args.out, dataset, preds)
    if args.extxyz_dir:
        export_predictions(args.extxyz_dir, dataset, preds)
    print(f"wrote {len(preds)} clusters × {args.repeats} repeats to {args.out}")


# --------------------------------------------------------------------------------------------------- evaluate
def evaluate_parser(prog: str | None = None) -> ArgumentParser:
    p = _parser(EVALUATE_HELP, prog)
    p.add_argument("--predictions", required=True, nargs="+", help="one or more .npz from kflow sample")
    p.add_argument("--labels", nargs="+", default=None,
                   help="method names for the table (default: the predictions' folder names)")
    p.add_argument("--dataset", default="demo", help="the clusters that were sampled: demo, csd500, cod or PATH")
    p.add_argument("--subset", default="10k", help="COD-Cluster17 subset: 5k, 10k, all or PATH to an id list")
    p.add_argument("--data-root", default="data", help="folder of the data sets and their built stores")
    _noise_argument(p, " (as in training)")
    p.add_argument("--split", default="test", help="split that was sampled: train, valid, test or all")
    p.add_argument("--data-seed", type=int, default=0, help="start draws and split seed (must match sampling)")
    p.add_argument("--json", default=None, help="write the results here (default: next to the first predictions)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def evaluate_main(argv=None, prog: str | None = None):
    from kflow.molecular.artifacts import metrics_path, read_predictions, write_metrics
    from kflow.molecular.data.datasets import ClusterDataset
    from kflow.molecular.workflow import evaluate_assembly, format_results_table, load_assembly_dataset
    from kflow.utils.io import check_writable_file

    args = evaluate_parser(prog).parse_args(argv)
    check_writable_file(args.json or metrics_path(args.predictions[0]), "--json")  # before the data and scores
    store = load_assembly_dataset(args.dataset, args.data_root, args.subset, seed=args.data_seed,
                                  noise=args.noise, progress=not args.no_progress)
    dataset = ClusterDataset(store, split=args.split, seed=args.data_seed)
    labels = args.labels or [Path(x).parent.name or Path(x).stem for x in args.predictions]
    methods = [("identity", None)] + [(label, path) for label, path in zip(labels, args.predictions)]
    if not args.no_progress:
        from tqdm.auto import tqdm

        methods = tqdm(methods, desc="evaluating", unit="method", leave=False)
    results = {label: evaluate_assembly(dataset, None if path is None else read_predictions(path, dataset))
               for label, path in methods}
    print(format_results_table(results, f"{args.dataset} {args.split} split ({len(dataset)} clusters)"))
    out = write_metrics(args.json or metrics_path(args.predictions[0]), results)
    print(f"results written to {out}")


# --------------------------------------------------------------------------------------------------- assemble
def assemble_parser(prog: str | None = None) -> ArgumentParser:
    """``kflow assemble``: every default is ``kflow.molecular.assemble.assemble``'s (one place: DEFAULT_SAMPLES,
    DEFAULT_MODEL)."""
    from kflow.molecular.assemble.models import DEFAULT_MODEL, DEFAULT_SAMPLES, MAX_SAMPLES, MAX_STEPS
    from kflow.molecular.assemble.pretrained import MIRROR_MODES

    p = _parser(ASSEMBLE_HELP, prog)
    p.add_argument("input", nargs="?", default=None,
                   help="molecule or crystal file (PATH or PATH@N), or a SMILES string (a string that is no file "
                        "and that RDKit parses)")
    p.add_argument("--smiles", default=None, help="a molecule as SMILES instead of INPUT (RDKit conformer)")
    p.add_argument("--out", required=True, help="output folder (created, or replaced if it holds an earlier "
                                                "kflow assemble output)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="shipped model name (hard: a molecule alone; mild: a "
                                                          "rough packing to refine; always the shipped file) or a "
                                                          "pretrained file given as a path (./hard, my.pt)")
    p.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES,
                   help=f"starts to sample (one batch) and rank, at most {MAX_SAMPLES} without --no-limit; the "
                        "first-ranked prediction is pred.extxyz / pred.pdb")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"sampling steps, at most {MAX_STEPS} without --no-limit (default: the model's)")
    p.add_argument("--no-limit", action="store_true", help="allow --samples and --steps above their limits")
    p.add_argument("--seed", type=seed_int, default=0, help="start draws (and the SMILES conformer), 0..2^31-1")
    p.add_argument("--mirror", default=None, choices=MIRROR_MODES,
                   help="copies of a lone molecule: none (all the same conformer) or half (8 of 17 mirrored, a "
                        "racemic mix; a note says whether the molecule is chiral); default: what the model was "
                        "trained with")
    p.add_argument("--relax", action=argparse.BooleanOptionalAction, default=True,
                   help="relax every sample as 17 rigid molecules against MMFF94 (tethered) and rank by contacts, "
                        "then energy; --no-relax ranks the raw samples by contacts, then compactness")
    p.add_argument("--no-progress", action="store_true", help="no progress line or bar")
    return p


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _input_source(p: ArgumentParser, args) -> str:
    """The one input of ``kflow assemble`` / ``kflow crystal``: INPUT or --smiles, never both or neither."""
    if (args.input is None) == (args.smiles is None):
        p.error("give one INPUT file or --smiles, not both" if args.input else "give an INPUT file or --smiles")
    return args.smiles if args.smiles is not None else args.input


def assemble_main(argv=None, prog: str | None = None):
    """``kflow assemble``: parse, call ``assemble(..., out=--out)``, print the notes (stderr) and the ranking."""
    from kflow.molecular.assemble.api import assemble

    p = assemble_parser(prog)
    args = p.parse_args(argv)
    source = _input_source(p, args)
    result = assemble(source, samples=args.samples, model=args.model, seed=args.seed, out=args.out,
                      steps=args.steps, mirror=args.mirror, progress=not args.no_progress,
                      smiles=True if args.smiles is not None else None, relax=args.relax, no_limit=args.no_limit)
    for line in result.notes:
        print(f"note: {line}", file=sys.stderr)
    summary = result.summary
    inp = summary["input"]
    if inp["kind"] == "molecule":
        print("note: this is a learned 17-molecule cluster at crystal density, not a crystal structure; for ranked "
              "crystal structures (space group, cell) run kflow crystal on the same input: on the CSD-500 test "
              "crystals it places neighbours right where the learned models do not (BENCHMARKS.md)", file=sys.stderr)
    print(f"{inp['name']} ({inp['kind']}, {inp['formula']}, {inp['atoms_per_molecule']} atoms) with model "
          f"{summary['model']['name']!r} ({summary['model']['path']}): {summary['num_samples']} sample(s), "
          f"{summary['steps']} steps, start "
          f"{summary['start']['preset']}, mirror {summary['start']['mirror']}")
    truth = result.metrics is not None
    relaxed = summary.get("relaxation") is not None
    head = f"{'sample':>6} {'rank':>4} {'contacts':>8} {'Rg/Å':>6}" + (" E_MMFF" if relaxed else "") + (
        f" {'PM-atom':>7} {'PM-ctr':>7} {'PM-ctr matched':>14} {'matched':>7} {'RMSD15':>7}" if truth else "")
    print(head)
    for row in result.scores:  # best first
        line = f"{row['sample']:>6} {row['rank']:>4} {row['close_contacts']:>8} {row['radius_of_gyration']:>6.2f}"
        if relaxed:
            line += f" {row['mmff_energy']:>6.0f}"
        if truth:
            m = row["metrics"]
            line += (f" {_fmt(m['pm_atom']):>7} {_fmt(m['pm_center']):>7} {_fmt(m['pm_center_matched']):>14} "
                     f"{m['matched15']:>4}/15 {_fmt(m['rmsd15']):>7}")
        print(line)
    best, start = result.scores[0], summary["start_scores"]
    energy = (f", MMFF intermolecular energy {best['mmff_energy']:.0f} kcal/mol (before relaxing "
              f"{best['mmff_energy_before']:.3g})" if relaxed else "")
    start_energy = f", {start['mmff_energy']:.3g} kcal/mol" if "mmff_energy" in start else ""
    print(f"ranked first: sample {best['sample']} ({best['close_contacts']} close contacts, centroid radius of "
          f"gyration {best['radius_of_gyration']:.2f} Å{energy}); its start: {start['close_contacts']} close "
          f"contacts{start_energy}")
    if truth:
        m, s = result.metrics, result.start_metrics
        print(f"against the crystal: PM-atom {m['pm_atom']:.2f} Å, PM-center {m['pm_center']:.2f} Å (matched "
              f"{m['pm_center_matched']:.2f}), {m['matched15']} of 15 molecules matched (OXtalign, RMSD15 "
              f"{_fmt(m['rmsd15'])} Å), collisions {m['collision_pct']:.2f} % (start: PM-center matched "
              f"{s['pm_center_matched']:.2f}, {s['matched15']} of 15 matched)")
        print(summary["against_start"]["text"])
    print(f"rigid to {summary['rigidity']['sampler_residual_A']:.1e} Å before snapping; wrote {args.out}/: "
          f"{', '.join(result.files)} in {result.total_s:.1f} s")


# ------------------------------------------------------------------------------------------ train_pretrained
def train_pretrained_parser(prog: str | None = None) -> ArgumentParser:
    from kflow.molecular.assemble.pretrained import MIRROR_MODES, PRESETS

    p = _parser(TRAIN_PRETRAINED_HELP, prog)
    p.add_argument("--out", required=True, help="the pretrained file (kflow/molecular/pretrained_models/<name>.pt ships "
                                                "it as model <name>)")
    p.add_argument("--preset", required=True, choices=PRESETS, help="start preset of the training clusters")
    p.add_argument("--mirror", default=None, choices=MIRROR_MODES,
                   help="how kflow assemble makes the copies of a lone molecule for this model (recorded; default: "
                        "the --start-mirror of training when none or half, else none)")
    p.add_argument("--datasets", nargs="+", default=["csd500", "demo"],
                   help="the first gives the held-out validation and test splits; the rest are training data")
    p.add_argument("--data-root", default="data", help="folder of the data sets and their built stores")
    p.add_argument("--draws-per-crystal", type=positive_int, default=2, help="noisy start clusters drawn per crystal")
    p.add_argument("--data-seed", type=int, default=0, help="start draws and the crystal-level split")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    add_model_arguments(p, coupling_note=" (default: eot with --generative, else ot for --preset hard/shell, index "
                                         "for mild)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=positive_int, default=None, help="training steps instead of --epochs")
    group.add_argument("--epochs", type=positive_float, default=8.0, help="passes over the training store")
    p.add_argument("--batch-size", type=positive_int, default=4, help="clusters per step")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--evals", type=positive_int, default=6, help="validation evaluations (checkpoint selection)")
    p.add_argument("--val-clusters", type=positive_int, default=32,
                   help="validation clusters scored at each evaluation")
    p.add_argument("--sample-steps", type=positive_int, default=10, help="sampling steps (validation, test, and "
                                                                        "kflow assemble's default)")
    p.add_argument("--work", default=None, help="run folder (default: runs/pretrained_<name>)")
    add_run_arguments(p)
    set_help(p, "--no-progress", "no progress bars")
    return p


def train_pretrained_main(argv=None, prog: str | None = None):
    from kflow.molecular.pretraining import train_pretrained

    argv = list(sys.argv[1:] if argv is None else argv)
    args = train_pretrained_parser(prog).parse_args(argv)
    coupling = args.coupling or ("eot" if args.generative else "ot" if args.preset != "mild" else "index")
    config = model_config_from_args(args, coupling)
    meta = train_pretrained(args.out, config, preset=args.preset, datasets=args.datasets, root=args.data_root,
                            work=args.work, draws_per_crystal=args.draws_per_crystal, data_seed=args.data_seed,
                            seed=args.seed, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, evals=args.evals, val_clusters=args.val_clusters,
                            sample_steps=args.sample_steps, mirror=args.mirror,
                            command="python scripts/train_pretrained.py " + shlex.join(argv), resume=args.resume,
                            overwrite=args.overwrite, deterministic=args.deterministic,
                            progress=not args.no_progress)
    test = meta["test_metrics"]
    model, identity = test["model"], test["identity"]
    print(f"wrote {args.out}: {meta['data']['train_clusters']} training clusters, best step "
          f"{meta['training']['best_step']}; {test['dataset']} test ({test['clusters']} clusters): PM-center matched "
          f"{model['pm_center_perm']['mean']:.3f} (identity {identity['pm_center_perm']['mean']:.3f}), PM-atom "
          f"{model['pm_atom']['mean']:.3f}, matched {model['matched15']['mean']:.2f} of 15 (OXtalign)")


# ------------------------------------------------------------------------------------------------------ crystal
CRYSTAL_HELP = """Predict crystal structures of a rigid molecule: random crystals in the frequent organic space groups
(P2₁/c, P-1, C2/c, P2₁2₁2₁, P2₁, Pbca, Pna2₁, Cc; one independent molecule), each minimised with the MMFF94 lattice
energy (periodic, Ewald), duplicates removed, ranked by energy.

INPUT as for kflow assemble (molecule file, SMILES, or a crystal whose molecule is used and which every prediction
is scored against with OXtalign: molecules matched of 15, RMSD15). Cost: about 0.5 s a candidate on one core for
25-40 atoms (docs/PROMISES.md); --candidates is the budget.

Writes DIR/rank_01.cif ... (space group and asymmetric unit), DIR/rank_01_cluster.extxyz ... (the 17-molecule
cluster around one molecule), DIR/landscape.png and DIR/summary.json; all of them or none. The same in Python:
kflow.molecular.predict_crystals(x, candidates=..., out=DIR).

Example:
    kflow crystal data/examples/GASXON.sdf --candidates 300 --out runs/gasxon_csp
"""


def crystal_parser(prog: str | None = None) -> ArgumentParser:
    from kflow.molecular.assemble.crystals import DEFAULT_CANDIDATES, MAX_CANDIDATES

    p = _parser(CRYSTAL_HELP, prog)
    p.add_argument("input", nargs="?", default=None, help="molecule or crystal file (PATH or PATH@N), or SMILES")
    p.add_argument("--smiles", default=None, help="a molecule as SMILES instead of INPUT (RDKit conformer)")
    p.add_argument("--out", required=True, help="output folder (created, or replaced if it holds an earlier "
                                                "kflow crystal output)")
    p.add_argument("--candidates", type=positive_int, default=DEFAULT_CANDIDATES,
                   help=f"random crystals to minimise (at most {MAX_CANDIDATES})")
    p.add_argument("--keep", type=positive_int, default=10, help="ranked crystals to write")
    p.add_argument("--seed", type=seed_int, default=0, help="which candidates are drawn, 0..2^31-1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def crystal_main(argv=None, prog: str | None = None):
    """``kflow crystal``: parse, call ``predict_crystals(..., out=--out)``, print the ranking."""
    from kflow.molecular.assemble.crystals import predict_crystals

    p = crystal_parser(prog)
    args = p.parse_args(argv)
    source = _input_source(p, args)
    result = predict_crystals(source, candidates=args.candidates, seed=args.seed, keep=args.keep, out=args.out,
                              smiles=True if args.smiles is not None else None, progress=not args.no_progress)
    summary = result.summary
    for line in summary["notes"]:
        print(f"note: {line}", file=sys.stderr)
    print(f"{summary['name']} ({summary['formula']}, {summary['atoms_per_molecule']} atoms): "
          f"{summary['candidates']} candidates in {summary['seconds']:.0f} s "
          f"({summary['seconds_per_candidate']:.2f} s each)")
    truth = bool(result.scores)
    print(f"{'rank':>4} {'group':>10} {'E/kcal/mol':>10} {'density':>7}" + (f" {'matched':>7} {'RMSD15':>6}" if truth
                                                                              else ""))
    for row in summary["ranked"]:
        line = f"{row['rank']:>4} {row['space_group'].replace('_', ''):>10} {row['energy']:>10.2f} {row['density']:>7.3f}"
        if truth:
            line += f" {row['n_matched']:>4}/15 {row['rmsd15']:>6.2f}"
        print(line)
    if truth:
        best = max(summary["ranked"], key=lambda r: r["n_matched"], default=None)
        crystal = summary["input_crystal"]
        print(f"input crystal: density {crystal['density']:.3f}, lattice energy {crystal['energy']:.2f} kcal/mol"
              + (f"; best match rank {best['rank']} ({best['n_matched']}/15)" if best else ""))
    print(f"wrote {args.out}/: {len(result.crystals)} crystals, landscape.png, summary.json")
