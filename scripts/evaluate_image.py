#!/usr/bin/env python
"""FID, precision and recall of generated images against a reference set (offline Inception-v3 features);
class-aware FID and the Class-Dropping-Ratio when samples with the condition kept and dropped are given.

    python scripts/evaluate_image.py --samples runs/RUN/samples_heun50_n1000.npz --reference fashion-mnist-test
    python scripts/evaluate_image.py --samples full.npz --dropped dropped.npz --reference fashion-mnist-test

Before the reference pass (10,000 Fashion-MNIST test images take ~20 min on 2 cores) it prints its estimated time;
the reference features are cached by content (the images and the feature network), so the next evaluation against
the same reference skips that pass. An FID from fewer than 2000 images on either side is flagged (a
SmallSampleWarning and "fid_note" in the results): it is not meaningful. Per-class FIDs (for the CDR) warn when a
class has fewer than 100 samples on either side.
"""

from kflow.cli import HelpFormatter
from kflow.utils.cli import ArgumentParser, positive_int, run_main
from kflow.vision.artifacts import read_samples
from kflow.vision.data import add_data_root_argument
from kflow.vision.workflow import FEATURE_CACHE_DIR, evaluate_images


def main(argv=None):
    p = ArgumentParser(__doc__, formatter_class=HelpFormatter)
    p.add_argument("--samples", required=True, help="samples .npz written by sample_image.py")
    p.add_argument("--dropped", default=None, help="samples generated with the condition dropped after tau")
    p.add_argument("--reference", default="fashion-mnist-test",
                   help="fashion-mnist-test | digits-test | .npz | image folder")
    add_data_root_argument(p)
    p.add_argument("--max-reference", type=positive_int, default=10000,
                   help="reference images embedded at most (the first N; their features are cached)")
    p.add_argument("--feature-net", default=None, help="TorchScript feature network instead of InceptionV3")
    p.add_argument("--k", type=positive_int, default=3, help="nearest neighbours for precision and recall")
    p.add_argument("--json", default=None, help="results file (default: <samples>.metrics.json)")
    p.add_argument("--feature-cache", default=str(FEATURE_CACHE_DIR),
                   help="folder of the cached reference features, one file per content key")
    p.add_argument("--no-feature-cache", action="store_true", help="compute the reference features, keep nothing")
    args = p.parse_args(argv)
    for samples in filter(None, (args.samples, args.dropped)):  # refuse a bad file before minutes of features
        read_samples(samples)
    result, path = evaluate_images(args.samples, args.reference, args.dropped, args.max_reference, args.feature_net,
                                   args.k, args.json, args.data_root,
                                   cache_dir=None if args.no_feature_cache else args.feature_cache)
    for k, v in result.items():
        if not isinstance(v, dict) and k != "fid_note":  # the note was shown as a SmallSampleWarning
            print(f"{k:>14}: {v:.4f}" if isinstance(v, float) else f"{k:>14}: {v}")
    print(f"written to {path}")


if __name__ == "__main__":
    run_main(main)
