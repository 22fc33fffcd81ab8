#!/usr/bin/env python
"""Sample assembled clusters from a trained checkpoint: writes an .npz (and optional extxyz files).

    python scripts/sample_assembly.py --checkpoint runs/assembly_demo_k2/checkpoints/last.pt --dataset demo \
        --steps 20 --repeats 3 --out runs/assembly_demo_k2/predictions.npz --extxyz-dir runs/assembly_demo_k2/xyz
"""

from kflow.core import SAMPLING_METHODS
from kflow.molecular.artifacts import export_predictions, load_assembly_model, write_predictions
from kflow.molecular.datasets import ClusterDataset
from kflow.molecular.crystals import NOISE_PRESETS
from kflow.molecular.workflow import default_split, load_assembly_dataset, predict_assembly
from kflow.utils.cli import ArgumentParser, positive_int, run_main


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default="demo")
    p.add_argument("--subset", default="10k")
    p.add_argument("--data-root", default="data")
    p.add_argument("--noise", default="mild", choices=sorted(NOISE_PRESETS),
                   help="start preset of clusters built from crystals (as in training): mild (each molecule near its target) or hard "
                        "(molecules placed at random at crystal density, random orientations)")
    p.add_argument("--split", default=None, choices=["train", "valid", "test", "all"],
                   help="default: test for demo/csd500/cod, all for a file, folder or store given by path")
    p.add_argument("--data-seed", type=int, default=0, help="start draws and split seed (must match training)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (start perturbation of repeats > 0)")
    p.add_argument("--steps", type=positive_int, default=20, help="integration steps (NFE for euler/band)")
    p.add_argument("--method", default="band", choices=SAMPLING_METHODS)
    p.add_argument("--steps-per-band", type=positive_int, nargs="+", default=None,
                   help="steps inside each band's window (one count per band; replaces --steps)")
    p.add_argument("--repeats", type=positive_int, default=1)
    p.add_argument("--repeat-noise", type=float, default=0.1, help="Å; perturbation of the start for repeats > 0")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--out", required=True, help="predictions .npz")
    p.add_argument("--extxyz-dir", default=None, help="also write <name>_predicted.extxyz (first repeat)")
    args = p.parse_args(argv)
    model, rigid, _ = load_assembly_model(args.checkpoint)
    store = load_assembly_dataset(args.dataset, args.data_root, args.subset, seed=args.data_seed,
                                  noise=args.noise)
    split = args.split or default_split(args.dataset)
    dataset = ClusterDataset(store, split=split, seed=args.data_seed)
    if len(dataset) == 0:
        raise ValueError(f"the {split} split of {args.dataset} is empty (too few crystals for an 80/10/10 split? "
                         "use --split all)")
    preds = predict_assembly(model, rigid, dataset, args.steps, args.method, args.repeats, args.repeat_noise,
                             args.batch_size, seed=args.seed, progress=True, steps_per_band=args.steps_per_band)
    write_predictions(args.out, dataset, preds)
    if args.extxyz_dir:
        export_predictions(args.extxyz_dir, dataset, preds)
    print(f"wrote {len(preds)} clusters × {args.repeats} repeats to {args.out}")


if __name__ == "__main__":
    run_main(main)
