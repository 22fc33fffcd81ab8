#!/usr/bin/env python
"""Train rigid-body K-Flow for molecular assembly.

Examples:
    python scripts/train_assembly.py --subset 10k                      # COD-Cluster17 10K (data/COD-Cluster17)
    python scripts/train_assembly.py --dataset demo --num-bands 1      # rigid flow-matching baseline, embedded data
    torchrun --nproc_per_node 2 scripts/train_assembly.py --dataset csd500 --steps 2000
"""

import argparse

from kflow.core import ORDERS, RAMPS
from kflow.core.distributed import is_main_process
from kflow.molecular.artifacts import default_run_dir
from kflow.molecular.config import OBJECTIVES, AssemblyModelConfig
from kflow.molecular.crystals import NOISE_PRESETS
from kflow.molecular.flow import COUPLINGS
from kflow.molecular.network import CONVOLUTIONS
from kflow.molecular.workflow import load_assembly_dataset, steps_for_epochs, train_assembly
from kflow.utils.cli import (ArgumentParser, add_run_arguments, nonnegative_int, positive_float, positive_int,
                             run_main)


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--dataset", default="cod", help="cod | demo | csd500 | PATH (store, CIF(s), ASE db, extxyz)")
    p.add_argument("--subset", default="10k", help="COD-Cluster17 subset: 5k | 10k | all | PATH to an id list")
    p.add_argument("--data-root", default="data")
    p.add_argument("--draws-per-crystal", type=positive_int, default=4, help="noisy initial clusters per crystal")
    p.add_argument("--noise", default="mild", choices=sorted(NOISE_PRESETS),
                   help="start preset of clusters built from crystals: mild (each molecule near its target) or hard "
                        "(molecules placed at random at crystal density, random orientations)")
    p.add_argument("--num-bands", type=positive_int, default=2, help="1 = rigid flow matching (AssembleFlow-style)")
    p.add_argument("--ramp", default="linear", choices=RAMPS)
    p.add_argument("--order", default="low_to_high", choices=ORDERS)
    p.add_argument("--hidden-irreps", default=AssemblyModelConfig.hidden_irreps)
    p.add_argument("--atom-layers", type=positive_int, default=AssemblyModelConfig.num_atom_layers)
    p.add_argument("--molecule-layers", type=positive_int, default=AssemblyModelConfig.num_molecule_layers)
    p.add_argument("--inter-cutoff", type=positive_float, default=AssemblyModelConfig.inter_cutoff)
    p.add_argument("--conv", default=AssemblyModelConfig.conv, choices=sorted(CONVOLUTIONS),
                   help="uvu: depthwise convolutions (fast); fctp: fully connected (kflow <= 0.2)")
    p.add_argument("--heavy-atoms-only", action=argparse.BooleanOptionalAction,
                   default=AssemblyModelConfig.heavy_atoms_only,
                   help="atom graph without hydrogens (default; faster); --no-heavy-atoms-only keeps every atom")
    p.add_argument("--coupling", default=AssemblyModelConfig.coupling, choices=COUPLINGS,
                   help="index: start molecule i flows to final molecule i; ot: to the final slot of an optimal "
                        "assignment within each cluster (centroid distances)")
    p.add_argument("--objective", default="flow", choices=OBJECTIVES,
                   help="flow: K-Flow / flow matching; regression: one-step prediction baseline (needs --num-bands 1)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=positive_int, default=None)
    group.add_argument("--epochs", type=positive_int, default=None, help="default 50 when --steps is not given")
    p.add_argument("--batch-size", type=positive_int, default=4, help="clusters per process")
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--checkpoint-every", type=positive_int, default=200)
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--data-seed", type=int, default=0,
                   help="start-cluster draws and the crystal-level split (keep it fixed to compare seeds)")
    p.add_argument("--num-workers", type=nonnegative_int, default=0)
    p.add_argument("--out", default=None, help="run folder (default runs/assembly_<dataset>_k<bands>)")
    add_run_arguments(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    store = load_assembly_dataset(args.dataset, args.data_root, args.subset, args.draws_per_crystal, args.data_seed,
                                  progress=not args.no_progress, noise=args.noise)
    config = AssemblyModelConfig(num_bands=args.num_bands, ramp=args.ramp, order=args.order,
                                 hidden_irreps=args.hidden_irreps, num_atom_layers=args.atom_layers,
                                 num_molecule_layers=args.molecule_layers, inter_cutoff=args.inter_cutoff,
                                 conv=args.conv, heavy_atoms_only=args.heavy_atoms_only, coupling=args.coupling,
                                 objective=args.objective)
    steps = args.steps or steps_for_epochs(store, args.epochs or 50, args.batch_size, args.data_seed)
    out = args.out or default_run_dir(args.dataset, args.num_bands)
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


if __name__ == "__main__":
    run_main(main)
