#!/usr/bin/env python
"""Evaluate sampled clusters: PM-atom, PM-center, RMSD_15 (min over repeats), collision and separation rates,
mean ± std over clusters, next to the identity baseline (prediction = initial cluster). Table + JSON.

    python scripts/evaluate_assembly.py --predictions runs/assembly_demo_k2/predictions.npz --dataset demo
"""
from pathlib import Path

from kflow.molecular.artifacts import metrics_path, read_predictions, write_metrics
from kflow.molecular.datasets import ClusterDataset
from kflow.molecular.crystals import NOISE_PRESETS
from kflow.molecular.workflow import evaluate_assembly, format_results_table, load_assembly_dataset
from kflow.utils.cli import ArgumentParser, run_main


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--predictions", required=True, nargs="+", help="one or more .npz from sample_assembly.py")
    p.add_argument("--labels", nargs="+", default=None, help="method names for the table")
    p.add_argument("--dataset", default="demo")
    p.add_argument("--subset", default="10k")
    p.add_argument("--data-root", default="data")
    p.add_argument("--noise", default="mild", choices=sorted(NOISE_PRESETS),
                   help="start preset of clusters built from crystals (as in training): mild (each molecule near its target) or hard "
                        "(molecules placed at random at crystal density, random orientations)")
    p.add_argument("--split", default="test")
    p.add_argument("--data-seed", type=int, default=0, help="start draws and split seed (must match sampling)")
    p.add_argument("--json", default=None, help="write the results here (default: next to the first predictions)")
    args = p.parse_args(argv)
    store = load_assembly_dataset(args.dataset, args.data_root, args.subset, seed=args.data_seed,
                                  noise=args.noise)
    dataset = ClusterDataset(store, split=args.split, seed=args.data_seed)
    labels = args.labels or [Path(x).parent.name or Path(x).stem for x in args.predictions]
    results = {"identity": evaluate_assembly(dataset)}
    for label, path in zip(labels, args.predictions):
        results[label] = evaluate_assembly(dataset, read_predictions(path, dataset))
    print(format_results_table(results, f"{args.dataset} {args.split} split ({len(dataset)} clusters)"))
    out = write_metrics(args.json or metrics_path(args.predictions[0]), results)
    print(f"results written to {out}")


if __name__ == "__main__":
    run_main(main)
