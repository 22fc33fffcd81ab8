#!/usr/bin/env python
"""Evaluate sampled clusters: PM-atom, PM-center, RMSD_15 (min over repeats), collision and separation rates,
mean ± std over clusters, next to the identity baseline (prediction = initial cluster). Table + JSON.

    python scripts/evaluate_assembly.py --predictions runs/assembly_demo_k2/predictions.npz --dataset demo
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kflow.molecular.datasets import ClusterDataset  # noqa: E402
from kflow.molecular.workflow import evaluate_assembly, format_results_table, load_assembly_dataset  # noqa: E402
from kflow.utils.io import atomic_write_text  # noqa: E402


def load_predictions(path, dataset):
    data = np.load(path)
    names = [dataset.cluster(i).name for i in range(len(dataset))]
    if list(data["names"]) != names:
        raise SystemExit(f"{path}: clusters do not match the {dataset.split} split of this data set "
                         "(different data set, split or seed?)")
    positions = torch.from_numpy(data["positions"])
    return list(torch.split(positions, data["counts"].tolist(), dim=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, nargs="+", help="one or more .npz from sample_assembly.py")
    p.add_argument("--labels", nargs="+", default=None, help="method names for the table")
    p.add_argument("--dataset", default="demo")
    p.add_argument("--subset", default="10k")
    p.add_argument("--data-root", default="data")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here (default: next to the first predictions)")
    args = p.parse_args(argv)
    store = load_assembly_dataset(args.dataset, args.data_root, args.subset, seed=args.seed)
    dataset = ClusterDataset(store, split=args.split, seed=args.seed)
    labels = args.labels or [Path(x).parent.name or Path(x).stem for x in args.predictions]
    results = {"identity": evaluate_assembly(dataset)}
    for label, path in zip(labels, args.predictions):
        results[label] = evaluate_assembly(dataset, load_predictions(path, dataset))
    print(format_results_table(results, f"{args.dataset} {args.split} split ({len(dataset)} clusters)"))
    out = Path(args.json or Path(args.predictions[0]).with_suffix(".metrics.json"))
    summary = {m: {k: {kk: vv for kk, vv in v.items() if kk != "per_cluster"} if isinstance(v, dict) else v
                   for k, v in r.items()} for m, r in results.items()}
    atomic_write_text(out, json.dumps({"summary": summary, "full": results}, indent=1))
    print(f"results written to {out}")


if __name__ == "__main__":
    from kflow.core.training import CheckpointError

    try:
        main()
    except (FileNotFoundError, ValueError, CheckpointError) as err:  # user errors: a message, not a traceback
        sys.exit(f"error: {err}")
