#!/usr/bin/env python
"""Sample images from a trained run: PNG grid + .npz (images in [0, 1], labels).

    python scripts/sample_image.py --run runs/image_fashion-mnist_fourier2 --num 64 --cfg-scale 1.5
    python scripts/sample_image.py --run RUN --condition-tau 0.3          # keep the class only for t < 0.3
    python scripts/sample_image.py --run RUN --share-bands 0 --num 16      # shared low-band noise, varied details
"""
import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kflow.utils.io import atomic_write_bytes  # noqa: E402
from kflow.vision.pipeline import sample_latents  # noqa: E402
from kflow.vision.steering import save_image_grid, steering_figures  # noqa: E402
from kflow.vision.workflow import load_image_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--method", default="heun", choices=["euler", "heun", "band", "dopri5"])
    p.add_argument("--steps-per-band", type=int, nargs="+", default=None,
                   help="steps inside each band's window (one count per band; replaces --steps)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--condition-tau", type=float, default=None)
    p.add_argument("--share-bands", type=int, nargs="*", default=None)
    p.add_argument("--class-id", type=int, default=None, help="one class for all samples (default: cycle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, help="output prefix (default <run>/samples)")
    p.add_argument("--steering-figures", action="store_true",
                   help="also write the paper-style grids (shared low/high-band noise, condition kept vs dropped)")
    args = p.parse_args(argv)
    dit, flow, ae, config = load_image_model(args.run)
    labels = None
    if config["num_classes"]:
        labels = torch.full((args.num,), args.class_id) if args.class_id is not None else \
            torch.arange(args.num) % config["num_classes"]
    images = []
    for s in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - s)
        z = sample_latents(dit, flow, n, None if labels is None else labels[s:s + n], args.steps, args.method,
                           args.cfg_scale, args.condition_tau, share_noise_bands=args.share_bands,
                           seed=args.seed + s, steps_per_band=args.steps_per_band)
        with torch.no_grad():
            images.append(ae.decode(z).clamp(0, 1))
    images = torch.cat(images)
    prefix = Path(args.out or Path(args.run) / "samples")
    save_image_grid(images[:64], prefix.with_suffix(".png"))
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images.numpy().astype(np.float32),
                        labels=(labels if labels is not None else torch.full((args.num,), -1)).numpy())
    atomic_write_bytes(prefix.with_suffix(".npz"), buf.getvalue())
    if args.steering_figures:
        for name, path in steering_figures(dit, flow, ae, prefix.parent, steps=args.steps, seed=args.seed).items():
            print(f"{name}: {path}")
    print(f"wrote {len(images)} samples to {prefix.with_suffix('.npz')} and a grid to {prefix.with_suffix('.png')}")


if __name__ == "__main__":
    from kflow.core.training import CheckpointError

    try:
        main()
    except (FileNotFoundError, ValueError, CheckpointError) as err:  # user errors: a message, not a traceback
        sys.exit(f"error: {err}")
