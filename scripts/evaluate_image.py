#!/usr/bin/env python
"""FID, precision and recall of generated images against a reference set (offline Inception-v3 features);
class-aware FID and the Class-Dropping-Ratio when samples with the condition kept and dropped are given.

    python scripts/evaluate_image.py --samples runs/RUN/samples.npz --reference fashion-mnist-test
    python scripts/evaluate_image.py --samples full.npz --dropped dropped.npz --reference fashion-mnist-test
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kflow.utils.io import atomic_write_text  # noqa: E402
from kflow.vision.data import load_fashion_mnist, load_image_folder  # noqa: E402
from kflow.vision.metrics import (InceptionFeatures, class_conditional_fid, class_dropping_ratio,  # noqa: E402
                                  extract_features, frechet_distance, precision_recall)


def load_npz(path):
    data = np.load(path)
    if "images" not in data:
        raise SystemExit(f"{path}: no 'images' array")
    images = data["images"]
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
        if images.ndim == 3:
            images = images[:, None]
        elif images.shape[-1] in (1, 3):
            images = images.transpose(0, 3, 1, 2)
    labels = data["labels"] if "labels" in data else None
    return torch.from_numpy(np.ascontiguousarray(images)), None if labels is None else torch.from_numpy(labels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True)
    p.add_argument("--dropped", default=None, help="samples generated with the condition dropped after tau")
    p.add_argument("--reference", default="fashion-mnist-test", help="fashion-mnist-test | .npz | image folder")
    p.add_argument("--max-reference", type=int, default=10000)
    p.add_argument("--feature-net", default=None, help="TorchScript feature network instead of InceptionV3")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.reference == "fashion-mnist-test":
        ref, ref_labels = load_fashion_mnist("test")
    elif args.reference.endswith(".npz"):
        ref, ref_labels = load_npz(args.reference)
    else:
        ref, ref_labels = load_image_folder(args.reference)
    ref, ref_labels = ref[:args.max_reference], None if ref_labels is None else ref_labels[:args.max_reference]
    net = InceptionFeatures(args.feature_net)
    f_ref = extract_features(net, ref, progress=True)
    images, labels = load_npz(args.samples)
    f_gen = extract_features(net, images, progress=True)
    precision, recall = precision_recall(f_ref, f_gen, k=args.k)
    result = {"fid": frechet_distance(f_ref, f_gen), "precision": precision, "recall": recall,
              "num_samples": len(images), "num_reference": len(ref)}
    if args.dropped and labels is not None and ref_labels is not None:
        dropped, dropped_labels = load_npz(args.dropped)
        f_drop = extract_features(net, dropped, progress=True)
        full = class_conditional_fid(f_ref, ref_labels, f_gen, labels)
        drop = class_conditional_fid(f_ref, ref_labels, f_drop, dropped_labels)
        result.update({"class_fid_full": full, "class_fid_dropped": drop, "cdr": class_dropping_ratio(full, drop)})
    for k, v in result.items():
        if not isinstance(v, dict):
            print(f"{k:>14}: {v:.4f}" if isinstance(v, float) else f"{k:>14}: {v}")
    out = Path(args.json or Path(args.samples).with_suffix(".metrics.json"))
    atomic_write_text(out, json.dumps(result, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    from kflow.core.training import CheckpointError

    try:
        main()
    except (FileNotFoundError, ValueError, CheckpointError) as err:  # user errors: a message, not a traceback
        sys.exit(f"error: {err}")
