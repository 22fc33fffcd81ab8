#!/usr/bin/env python
"""The main job on embedded data (what `make demo` runs).

Builds COD-Cluster17-style clusters from the CSD crystals shipped with pyxtal, trains the direct-regression
baseline (one step from the start), the rigid flow-matching baseline (1 band) and K-Flow (2 Laplacian bands) with
the same budget, samples the held-out test crystals and prints the side-by-side table with the identity baseline
(prediction = initial cluster). The converged comparison is the study in BENCHMARKS.md.
"""
import argparse
import json
import time
from pathlib import Path

from kflow.molecular.model.config import AssemblyModelConfig
from kflow.molecular.data.datasets import ClusterDataset
from kflow.molecular.workflow import compare_assembly_models, format_results_table, load_assembly_dataset
from kflow.cli import HelpFormatter
from kflow.utils.cli import ArgumentParser, positive_int, run_main
from kflow.utils.io import atomic_write_text


def main(argv=None):
    p = ArgumentParser(__doc__, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=positive_int, default=300, help="training steps per model (the same for all)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="clusters per training step")
    p.add_argument("--sample-steps", type=positive_int, default=20, help="sampling steps per prediction")
    p.add_argument("--repeats", type=positive_int, default=2,
                   help="predictions per test cluster (the table keeps each cluster's best)")
    p.add_argument("--bands", type=positive_int, nargs="+", default=[1, 2], help="models to compare (1 = rigid FM)")
    p.add_argument("--regression", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the direct-regression baseline (the study's best model for mild starts)")
    p.add_argument("--seed", type=int, default=0, help="start draws, split, initialisation and data order")
    p.add_argument("--out", default="runs/demo", help="folder for the runs and results.md / results.json")
    p.add_argument("--data-root", default="data", help="folder of the data sets and their built stores")
    args = p.parse_args(argv)
    start, out = time.time(), Path(args.out)

    print("== data: clusters from the CSD crystals embedded in pyxtal")
    store = load_assembly_dataset("demo", args.data_root, draws_per_crystal=4, seed=args.seed)
    test = ClusterDataset(store, split="test", seed=args.seed)
    train = ClusterDataset(store, split="train", seed=args.seed)
    print(f"   {len(store)} clusters from {len(set(store.crystals))} crystals; train {len(train)} clusters, "
          f"test {len(test)} clusters of {len(set(test.crystals))} unseen crystals")
    configs = {"regression": AssemblyModelConfig(num_bands=1, objective="regression")} if args.regression else {}
    configs.update({("rigid FM (K=1)" if k == 1 else f"K-Flow (K={k})"): AssemblyModelConfig(num_bands=k)
                    for k in args.bands})
    results, timings = compare_assembly_models(store, out, configs, args.steps, args.batch_size, args.sample_steps,
                                               args.repeats, seed=args.seed, split_seed=args.seed)
    table = format_results_table(results, f"Embedded pyxtal benchmark, test split ({len(test)} clusters, "
                                          f"min over {args.repeats} repeats)")
    print(f"\n{table}\n")
    for label, t in timings.items():
        print(f"{label}: training {t['train_s']:.0f} s (final loss {t['final_loss']:.3g}), sampling {t['sample_s']:.0f} s")
    print(f"total {time.time() - start:.0f} s; results in {out / 'results.json'}")
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps({"results": results, "timings": timings}, indent=1))


if __name__ == "__main__":
    run_main(main)
