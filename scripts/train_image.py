#!/usr/bin/env python
"""Train latent K-Flow with a DiT on images.

    python scripts/train_image.py --dataset fashion-mnist --decomposition fourier --num-bands 2 --steps 4000
    python scripts/train_image.py --dataset digits --decomposition none --num-bands 1     # flow-matching baseline
    torchrun --nproc_per_node 2 scripts/train_image.py --dataset fashion-mnist --out runs/img_ddp
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kflow.vision.models import DiT_models  # noqa: E402
from kflow.vision.pipeline import DECOMPOSITIONS  # noqa: E402
from kflow.vision.workflow import train_image_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | digits | image folder")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--autoencoder", default="conv",
                   help="conv (trained here) | identity (pixels) | PATH to a saved one | diffusers:FOLDER_OR_HUB_ID")
    p.add_argument("--ae-steps", type=int, default=1500)
    p.add_argument("--ae-width", type=int, default=32)
    p.add_argument("--max-images", type=int, default=None, help="use the first N training images only")
    p.add_argument("--latent-dir", default=None, help="folder for the autoencoder + latent cache (default --out)")
    p.add_argument("--decomposition", default="fourier", choices=DECOMPOSITIONS)
    p.add_argument("--wavelet", default=None, help="default: the longest of db6/db4/db2/haar the latent grid admits")
    p.add_argument("--num-bands", type=int, default=2)
    p.add_argument("--order", default="low_to_high", choices=["low_to_high", "high_to_low"])
    p.add_argument("--model", default="DiT-T/2", choices=sorted(DiT_models))
    p.add_argument("--unconditional", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = args.out or f"runs/image_{Path(args.dataset).stem}_{args.decomposition}{args.num_bands}"
    trainer, _ = train_image_model(
        args.dataset, out, decomposition=args.decomposition, num_bands=args.num_bands, model=args.model,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, seed=args.seed,
        class_conditional=not args.unconditional, autoencoder=args.autoencoder, order=args.order,
        resume=args.resume, checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
        data_root=args.data_root, ae_steps=args.ae_steps, wavelet=args.wavelet, latent_dir=args.latent_dir,
        max_images=args.max_images, ae_width=args.ae_width, gradient_checkpointing=args.gradient_checkpointing)
    print(f"trained to step {trainer.step}; run folder {out}")
    from kflow.core.distributed import cleanup_distributed

    cleanup_distributed()
    return out


if __name__ == "__main__":
    from kflow.core.training import CheckpointError

    try:
        main()
    except (FileNotFoundError, ValueError, CheckpointError) as err:  # user errors: a message, not a traceback
        sys.exit(f"error: {err}")
