"""Latent image K-Flow on Fashion-MNIST: one-band flow-matching baseline vs K-Flow Fourier / Wavelet / PCA
(2 bands), same DiT, steps and seed; FID / precision / recall against the test set, speed, K-Flow overhead.

Run: python benchmarks/bench_vision.py [--steps 1500 --samples 500]   (writes the "vision" section)
Needs the Debian package dataset-fashion-mnist (or --data-root with the IDX files).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import markdown_table, write_section  # noqa: E402
from kflow.utils.io import atomic_write_text  # noqa: E402
from kflow.vision.data import load_fashion_mnist  # noqa: E402
from kflow.vision.metrics import InceptionFeatures, extract_features, frechet_distance, precision_recall  # noqa: E402
from kflow.vision.pipeline import sample_latents  # noqa: E402
from kflow.vision.workflow import load_image_model, train_image_model  # noqa: E402

VARIANTS = [("flow matching (1 band)", "none", 1), ("K-Flow Fourier (2 bands)", "fourier", 2),
            ("K-Flow Wavelet (2 bands)", "wavelet", 2), ("K-Flow PCA (2 bands)", "pca", 2)]


def kflow_overhead(trainer, flow, batch_size):
    """Share of a training step spent in the K-Flow interpolant (forward + inverse transforms)."""
    z = torch.stack([trainer.dataset[i][0] for i in range(batch_size)])
    y = torch.stack([trainer.dataset[i][1] for i in range(batch_size)])
    x0, t = torch.randn_like(z), torch.rand(batch_size)
    model = trainer.model
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        flow.interpolate_and_velocity(x0, z, t)
    interp = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        loss = flow.loss(model, x0, z, t=t, model_kwargs={"y": y})
        loss.backward()
    step = (time.perf_counter() - t0) / reps
    model.zero_grad(set_to_none=True)
    return interp / step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="DiT-T/2")
    p.add_argument("--samples", type=int, default=500, help="generated images per model for FID / recall")
    p.add_argument("--ref-samples", type=int, default=1000, help="test images for the reference statistics")
    p.add_argument("--nfe-steps", type=int, default=10, help="Heun steps (2 model calls each)")
    p.add_argument("--ae-steps", type=int, default=400)
    p.add_argument("--ae-width", type=int, default=16)
    p.add_argument("--train-images", type=int, default=20000, help="training images used (first N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_vision")
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(args.threads)  # 1 is far faster than 2 when other jobs share the 2 cores
    test_images, _ = load_fashion_mnist("test", args.data_root)
    net = InceptionFeatures()
    t0 = time.perf_counter()
    f_ref = extract_features(net, test_images[:args.ref_samples])
    feature_rate = args.ref_samples / (time.perf_counter() - t0)
    print(f"reference features: {args.ref_samples} test images at {feature_rate:.1f} images/s", flush=True)
    rows, raw = [], {}
    for label, decomposition, bands in VARIANTS:
        run = out / decomposition
        t0 = time.perf_counter()
        trainer, flow = train_image_model("fashion-mnist", run, decomposition, bands, args.model, args.steps,
                                          args.batch_size, seed=args.seed, latent_dir=out / "latents",
                                          progress=False, data_root=args.data_root, resume=True,
                                          ae_steps=args.ae_steps, max_images=args.train_images,
                                          ae_width=args.ae_width)
        train_time = time.perf_counter() - t0
        overhead = kflow_overhead(trainer, flow, args.batch_size)
        dit, flow, ae, config = load_image_model(run)
        labels = torch.arange(args.samples) % config["num_classes"]
        t0 = time.perf_counter()
        with torch.no_grad():
            z = sample_latents(dit, flow, args.samples, labels, steps=args.nfe_steps, method="heun", seed=args.seed)
            images = ae.decode(z)[:, :, 2:30, 2:30]  # undo the 28 -> 32 padding
        sample_rate = args.samples / (time.perf_counter() - t0)
        f_gen = extract_features(net, images)
        fid = frechet_distance(f_ref, f_gen)
        precision, recall = precision_recall(f_ref, f_gen)
        metrics = trainer.out_dir / "metrics.jsonl"
        last = json.loads(metrics.read_text().splitlines()[-1])
        if decomposition == "wavelet":
            label = label.replace("Wavelet", f"Wavelet {config['wavelet']}")
        rows.append([label, f"{fid:.1f}", f"{precision:.3f}", f"{recall:.3f}", f"{sample_rate:.0f}",
                     f"{last['samples_per_s'] / args.batch_size:.1f}", f"{100 * overhead:.1f}%"])
        raw[label] = {"fid": fid, "precision": precision, "recall": recall, "train_s": train_time,
                      "sampling_images_per_s": sample_rate, "kflow_overhead": overhead}
        print(rows[-1], flush=True)
    body = (
        "## Latent image generation (`benchmarks/bench_vision.py`)\n\n"
        f"Fashion-MNIST (first {args.train_images} training images, padded to 32×32) encoded once by a "
        f"convolutional autoencoder trained here ({args.ae_steps} steps, width {args.ae_width}; latents 4×8×8); "
        f"{args.model}, class-conditional, {args.steps} steps of batch {args.batch_size}, "
        f"seed {args.seed}, identical for every row. Sampling: Heun, {args.nfe_steps} steps "
        f"({2 * args.nfe_steps} NFE), no guidance. FID / precision / recall (k=3) with the offline Inception-v3 on "
        f"{args.samples} generated images per model vs {args.ref_samples} test images — not the 5k+ a proper FID "
        f"needs: Inception-v3 runs at only {feature_rate:.1f} images/s on this shared 2-core CPU, so FID here is "
        "strongly biased upwards and noisy (compare rows, not with published numbers). Overhead = time of the K-Flow interpolant per step / time "
        "of a full training step (forward + backward), same batch.\n\n"
        + markdown_table(["model", "FID ↓", "precision ↑", "recall ↑", "sampling images/s", "training steps/s",
                          "K-Flow overhead"], rows)
        + "\n\nSampling images/s includes decoding; training steps/s is the Trainer's windowed rate at the end of "
        "training. Timings are wall-clock on a machine shared with other jobs (load average > 2), so they are "
        "indicative only.")
    print(body)
    atomic_write_text(out / "raw.json", json.dumps(raw, indent=1))
    if not args.no_write:
        write_section("vision", body)


if __name__ == "__main__":
    main()
