#!/usr/bin/env python
"""Sample assembled clusters from a trained checkpoint: writes an .npz (and optional extxyz files).

    python scripts/sample_assembly.py --checkpoint runs/assembly_demo_k2/checkpoints/last.pt --dataset demo \
        --steps 20 --repeats 3 --out runs/assembly_demo_k2/predictions.npz --extxyz-dir runs/assembly_demo_k2/xyz
"""
import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kflow.molecular.datasets import ClusterDataset  # noqa: E402
from kflow.molecular.io import export_cluster  # noqa: E402
from kflow.molecular.workflow import load_assembly_dataset, load_assembly_model, predict_assembly  # noqa: E402
from kflow.utils.io import atomic_write_bytes  # noqa: E402


def save_predictions(path, dataset, predictions):
    """Atomic .npz: positions [R, N_total, 3], counts [B], names [B] (split clusters in dataset order)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, positions=torch.cat(predictions, 1).numpy().astype(np.float32),
                        counts=np.array([p.shape[1] for p in predictions]),
                        names=np.array([dataset.cluster(i).name for i in range(len(dataset))]))
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default="demo")
    p.add_argument("--subset", default="10k")
    p.add_argument("--data-root", default="data")
    p.add_argument("--split", default="test", choices=["train", "valid", "test", "all"])
    p.add_argument("--seed", type=int, default=0, help="data split seed (must match training)")
    p.add_argument("--steps", type=int, default=20, help="integration steps (NFE for euler/band)")
    p.add_argument("--method", default="band", choices=["band", "euler", "heun", "dopri5"])
    p.add_argument("--steps-per-band", type=int, nargs="+", default=None,
                   help="steps inside each band's window (one count per band; replaces --steps)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--repeat-noise", type=float, default=0.1, help="Å; perturbation of the start for repeats > 0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="predictions .npz")
    p.add_argument("--extxyz-dir", default=None, help="also write <name>_predicted.extxyz (first repeat)")
    args = p.parse_args(argv)
    model, rigid, _ = load_assembly_model(args.checkpoint)
    store = load_assembly_dataset(args.dataset, args.data_root, args.subset, seed=args.seed)
    dataset = ClusterDataset(store, split=args.split, seed=args.seed)
    if len(dataset) == 0:
        raise SystemExit(f"the {args.split} split of {args.dataset} is empty")
    preds = predict_assembly(model, rigid, dataset, args.steps, args.method, args.repeats, args.repeat_noise,
                             args.batch_size, progress=True, steps_per_band=args.steps_per_band)
    save_predictions(args.out, dataset, preds)
    if args.extxyz_dir:
        for i, pred in enumerate(preds):
            cluster = dataset.cluster(i)
            export_cluster(cluster, Path(args.extxyz_dir) / f"{cluster.name}_predicted.extxyz", "predicted", pred[0])
    print(f"wrote {len(preds)} clusters × {args.repeats} repeats to {args.out}")


if __name__ == "__main__":
    from kflow.core.training import CheckpointError

    try:
        main()
    except (FileNotFoundError, ValueError, CheckpointError) as err:  # user errors: a message, not a traceback
        sys.exit(f"error: {err}")
