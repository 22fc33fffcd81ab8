#!/usr/bin/env python
"""Train latent K-Flow with a DiT on images.

    python scripts/train_image.py --dataset fashion-mnist --decomposition fourier --num-bands 2 --steps 4000
    python scripts/train_image.py --dataset digits --decomposition none --num-bands 1     # flow-matching baseline
    torchrun --nproc_per_node 2 scripts/train_image.py --dataset fashion-mnist --out runs/img_ddp
"""

from kflow.cli import HelpFormatter, set_help
from kflow.core import ORDERS, PREDICTIONS, RAMPS
from kflow.utils.cli import (ArgumentParser, add_run_arguments, positive_float, positive_int, run_main,
                             unit_fraction)
from kflow.vision.artifacts import default_run_dir
from kflow.vision.config import DECOMPOSITIONS, ImageDataConfig, ImageModelConfig
from kflow.vision.data import add_data_root_argument
from kflow.vision.models import DiT_models
from kflow.vision.workflow import MIN_LR_RATIO, train_image_model


def main(argv=None):
    p = ArgumentParser(__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | digits | image folder")
    add_data_root_argument(p)
    p.add_argument("--autoencoder", default="conv",
                   help="conv (trained here) | identity (pixels) | PATH to a saved one | diffusers:FOLDER_OR_HUB_ID")
    p.add_argument("--ae-steps", type=positive_int, default=1500, help="training steps of the conv autoencoder")
    p.add_argument("--ae-width", type=positive_int, default=32, help="channels of the conv autoencoder's first layer")
    p.add_argument("--latent-channels", type=positive_int, default=4, help="channels of the conv autoencoder's latent")
    p.add_argument("--ae-downsample", type=positive_int, default=None,
                   help="times the conv autoencoder halves the image (default: 2 for 32x32 images, 1 for smaller)")
    p.add_argument("--max-images", type=positive_int, default=None, help="use the first N training images only")
    p.add_argument("--latent-dir", default=None, help="folder for the autoencoder + latent cache (default --out)")
    p.add_argument("--decomposition", default="fourier", choices=DECOMPOSITIONS,
                   help="K-amplitude decomposition of the latents; none (1 band) is flow matching")
    p.add_argument("--wavelet", default=None,
                   help="wavelet name (default: the longest of db6/db4/db2/haar the latent grid admits)")
    p.add_argument("--num-bands", type=positive_int, default=2, help="bands K of the flow")
    p.add_argument("--order", default="low_to_high", choices=ORDERS, help="which bands are generated first")
    p.add_argument("--ramp", default="linear", choices=sorted(RAMPS), help="how each band switches on over its window")
    p.add_argument("--overlap", type=float, default=0.0, help="overlap of consecutive band windows, in [0, 1)")
    p.add_argument("--band-weights", type=positive_float, nargs="+", default=None,
                   help="window widths proportional to these (one per band, e.g. band energies; default equal)")
    p.add_argument("--prediction", default="velocity", choices=PREDICTIONS,
                   help="what the network outputs: the velocity or the endpoint x1")
    p.add_argument("--model", default="DiT-T/2", choices=sorted(DiT_models), help="DiT size / patch size")
    p.add_argument("--unconditional", action="store_true", help="no class labels")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, slower)")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps of the DiT")
    p.add_argument("--batch-size", type=positive_int, default=64, help="latents per step and process")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    p.add_argument("--min-lr-ratio", type=unit_fraction, default=MIN_LR_RATIO,
                   help="the cosine LR decay ends at this fraction of --lr; 1 keeps the LR constant after the "
                        "warm-up (a run can then be extended by --resume with more --steps)")
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="decay of the weights' moving average, which is saved and sampled")
    p.add_argument("--checkpoint-every", type=positive_int, default=500, help="training steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and autoencoder training")
    p.add_argument("--out", default=None,
                   help="run folder (default: runs/image_<dataset>_<decomposition><bands>)")
    add_run_arguments(p)
    set_help(p, "--no-progress", "no progress bars")
    args = p.parse_args(argv)
    data = ImageDataConfig(args.dataset, args.autoencoder, args.ae_steps, args.ae_width, args.max_images, args.seed,
                           args.data_root, args.latent_channels, args.ae_downsample)
    config = ImageModelConfig(model=args.model, decomposition=args.decomposition, num_bands=args.num_bands,
                              wavelet=args.wavelet, ramp=args.ramp, order=args.order, overlap=args.overlap,
                              band_weights=args.band_weights and tuple(args.band_weights),
                              prediction=args.prediction, num_classes=0 if args.unconditional else None)
    out = args.out or default_run_dir(args.dataset, args.decomposition, args.num_bands)
    trainer, _ = train_image_model(data, out, config, latent_dir=args.latent_dir, steps=args.steps,
                                   batch_size=args.batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                                   ema_decay=args.ema_decay, seed=args.seed,
                                   checkpoint_every=args.checkpoint_every, resume=args.resume,
                                   progress=not args.no_progress, gradient_checkpointing=args.gradient_checkpointing,
                                   overwrite=args.overwrite, deterministic=args.deterministic)
    print(f"trained to step {trainer.step}; run folder {out}")
    return out


if __name__ == "__main__":
    run_main(main)
