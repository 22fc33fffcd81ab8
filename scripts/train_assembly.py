#!/usr/bin/env python
"""Train rigid-body K-Flow for molecular assembly.

Examples:
    python scripts/train_assembly.py --subset 10k                      # COD-Cluster17 10K (data/COD-Cluster17)
    python scripts/train_assembly.py --dataset demo --num-bands 1      # rigid flow-matching baseline, embedded data
    torchrun --nproc_per_node 2 scripts/train_assembly.py --dataset csd500 --steps 2000
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kflow.molecular.training import AssemblyModelConfig  # noqa: E402
from kflow.molecular.workflow import load_assembly_dataset, train_assembly  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cod", help="cod | demo | csd500 | PATH (store, CIF(s), ASE db, extxyz)")
    p.add_argument("--subset", default="10k", help="COD-Cluster17 subset: 5k | 10k | all | PATH to an id list")
    p.add_argument("--data-root", default="data")
    p.add_argument("--draws-per-crystal", type=int, default=4, help="noisy initial clusters per built crystal")
    p.add_argument("--num-bands", type=int, default=2, help="1 = rigid flow matching (AssembleFlow-style)")
    p.add_argument("--ramp", default="linear", choices=["linear", "smooth", "cosine"])
    p.add_argument("--order", default="low_to_high", choices=["low_to_high", "high_to_low"])
    p.add_argument("--hidden-irreps", default="32x0e + 8x1o + 8x1e")
    p.add_argument("--atom-layers", type=int, default=1)
    p.add_argument("--molecule-layers", type=int, default=2)
    p.add_argument("--inter-cutoff", type=float, default=4.0)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, default=None)
    group.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4, help="clusters per process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default runs/assembly_<dataset>_k<bands>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    store = load_assembly_dataset(args.dataset, args.data_root, args.subset, args.draws_per_crystal, args.seed,
                                  progress=not args.no_progress)
    config = AssemblyModelConfig(num_bands=args.num_bands, ramp=args.ramp, order=args.order,
                                 hidden_irreps=args.hidden_irreps, num_atom_layers=args.atom_layers,
                                 num_molecule_layers=args.molecule_layers, inter_cutoff=args.inter_cutoff)
    steps = args.steps
    if steps is None:
        from kflow.core.distributed import get_world_size
        from kflow.molecular.datasets import ClusterDataset

        per_epoch = max(len(ClusterDataset(store, split="train", seed=args.seed)) // (args.batch_size *
                                                                                     get_world_size()), 1)
        steps = (args.epochs or 50) * per_epoch
    out = args.out or f"runs/assembly_{Path(args.dataset).stem}_k{args.num_bands}"
    _, _, summary = train_assembly(store, out, config, steps=steps, batch_size=args.batch_size, lr=args.lr,
                                   seed=args.seed, resume=args.resume, ema_decay=args.ema_decay,
                                   checkpoint_every=args.checkpoint_every, num_workers=args.num_workers,
                                   progress=not args.no_progress)
    print(f"trained {summary['step']} steps in {summary['wall_time_s']:.0f} s "
          f"({summary['samples_per_s']:.2f} clusters/s), final loss {summary['loss']:.4g}, "
          f"skipped {summary['skipped_steps']}; checkpoints in {out}/checkpoints")
    from kflow.core.distributed import cleanup_distributed

    cleanup_distributed()


if __name__ == "__main__":
    from kflow.core.training import CheckpointError

    try:
        main()
    except (FileNotFoundError, ValueError, CheckpointError) as err:  # user errors: a message, not a traceback
        sys.exit(f"error: {err}")
