#!/usr/bin/env python
"""Sample images from a trained run: PNG grid + .npz (images in [0, 1], labels).

    python scripts/sample_image.py --run runs/image_fashion-mnist_fourier2 --num 64 --cfg-scale 1.5
    python scripts/sample_image.py --run RUN --condition-tau 0.3          # keep the class only for t < 0.3
    python scripts/sample_image.py --run RUN --share-bands 0 --num 16      # shared low-band noise, varied details

Each sampling variant writes its own files: --out PREFIX, or by default <run>/samples_<settings> (e.g.
samples_heun50_n64_cfg1.5); an existing file is kept unless --overwrite.
"""

from kflow.core import SAMPLING_METHODS
from kflow.cli import HelpFormatter
from kflow.utils.cli import ArgumentParser, positive_int, run_main
from kflow.vision.data import add_data_root_argument
from kflow.vision.sampling import SamplingConfig
from kflow.vision.workflow import sample_images


def main(argv=None):
    p = ArgumentParser(__doc__, formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, help="run folder of train_image.py")
    p.add_argument("--num", type=positive_int, default=64, help="images to generate")
    p.add_argument("--steps", type=positive_int, default=50, help="integration steps (NFE for euler/band)")
    p.add_argument("--method", default="heun", choices=SAMPLING_METHODS, help="integrator")
    p.add_argument("--steps-per-band", type=positive_int, nargs="+", default=None,
                   help="steps inside each band's window (one count per band; replaces --steps)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--condition-tau", type=float, default=None,
                   help="keep the class only for t < TAU, then drop it (default: kept throughout)")
    p.add_argument("--share-bands", type=int, nargs="*", default=None,
                   help="bands whose noise all samples share (e.g. 0: one coarse structure, varied details)")
    p.add_argument("--class-id", type=int, default=None, help="one class for all samples (default: cycle)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images sampled together")
    p.add_argument("--out", default=None,
                   help="output prefix: PREFIX.npz + PREFIX.png (default <run>/samples_<method><steps>_n<num>...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.npz")
    add_data_root_argument(p)  # the flag every image script takes; sampling itself reads no images
    p.add_argument("--steering-figures", action="store_true",
                   help="also write the paper-style grids (shared low/high-band noise, condition kept vs dropped)")
    args = p.parse_args(argv)
    sampling = SamplingConfig(args.steps, args.method, args.steps_per_band and tuple(args.steps_per_band),
                              args.cfg_scale, args.condition_tau,
                              None if args.share_bands is None else tuple(args.share_bands), args.seed,
                              args.batch_size)
    paths = sample_images(args.run, args.num, args.out, sampling, args.class_id, args.steering_figures,
                          overwrite=args.overwrite)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    run_main(main)
