#!/usr/bin/env python
"""The main job on embedded data (what `make demo` runs).

Builds COD-Cluster17-style clusters from the CSD crystals shipped with pyxtal, trains the rigid flow-matching
baseline (1 band) and K-Flow (2 Laplacian bands) with the same budget, samples the held-out test crystals and
prints the side-by-side table with the identity baseline (prediction = initial cluster).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kflow.molecular.datasets import ClusterDataset  # noqa: E402
from kflow.molecular.training import AssemblyModelConfig  # noqa: E402
from kflow.molecular.workflow import (evaluate_assembly, format_results_table, load_assembly_dataset,  # noqa: E402
                                      predict_assembly, train_assembly)
from kflow.utils.io import atomic_write_text  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=300, help="training steps per model (same for both)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bands", type=int, nargs="+", default=[1, 2], help="models to compare (1 = rigid FM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data-root", default="data")
    args = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    start = time.time()
    out = Path(args.out)

    print("== 1/3 data: clusters from the CSD crystals embedded in pyxtal")
    store = load_assembly_dataset("demo", args.data_root, draws_per_crystal=4, seed=args.seed)
    test = ClusterDataset(store, split="test", seed=args.seed)
    train = ClusterDataset(store, split="train", seed=args.seed)
    print(f"   {len(store)} clusters from {len(set(store.crystals))} crystals; train {len(train)} clusters, "
          f"test {len(test)} clusters of {len(set(test.crystals))} unseen crystals")

    results, timings = {"identity (initial cluster)": evaluate_assembly(test)}, {}
    for k in args.bands:
        label = "rigid FM (K=1)" if k == 1 else f"K-Flow (K={k})"
        print(f"== 2/3 training {label}: {args.steps} steps, batch {args.batch_size}")
        t0 = time.time()
        model, rigid, summary = train_assembly(store, out / f"k{k}", AssemblyModelConfig(num_bands=k),
                                               steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                               resume=True)
        t1 = time.time()
        print(f"== 3/3 sampling {label} on the test crystals ({args.sample_steps} steps, {args.repeats} repeats)")
        preds = predict_assembly(model, rigid, test, steps=args.sample_steps, repeats=args.repeats, seed=args.seed)
        results[label] = evaluate_assembly(test, preds)
        timings[label] = {"train_s": t1 - t0, "sample_s": time.time() - t1, "final_loss": summary["loss"]}

    table = format_results_table(results, f"Embedded pyxtal benchmark, test split ({len(test)} clusters, "
                                          f"min over {args.repeats} repeats)")
    print()
    print(table)
    print()
    for label, t in timings.items():
        print(f"{label}: training {t['train_s']:.0f} s (final loss {t['final_loss']:.3g}), sampling {t['sample_s']:.0f} s")
    print(f"total {time.time() - start:.0f} s; results in {out / 'results.json'}")
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps({"results": results, "timings": timings}, indent=1))


if __name__ == "__main__":
    from kflow.core.training import CheckpointError

    try:
        main()
    except (FileNotFoundError, ValueError, CheckpointError) as err:  # user errors: a message, not a traceback
        sys.exit(f"error: {err}")
