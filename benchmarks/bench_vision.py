"""Latent image K-Flow on Fashion-MNIST: one-band flow-matching baseline vs K-Flow Fourier / Wavelet / PCA
(2 bands), same DiT, steps and seed, all on the latents of one autoencoder; FID / precision / recall against the
test set, speed, K-Flow overhead.

Run: python -m benchmarks.bench_vision   (the published configuration; writes the "vision" section, whose text
     states the command, so other settings are recorded as such)
     python benchmarks/bench_vision.py --study [--quick]   (the converged study, benchmarks/vision_study.py)
Needs Fashion-MNIST: `make data` (or --data-root with the IDX files).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/bench_vision.py): run as the module, repository importable
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_vision", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                 os.environ.get("PYTHONPATH")]))})

import torch

from benchmarks.report import markdown_table, write_section
from kflow.utils.cli import run_main
from kflow.utils.io import atomic_save, atomic_write_text
from kflow.vision.artifacts import load_image_model
from kflow.vision.config import ImageDataConfig, ImageModelConfig
from kflow.vision.data import crop_to, load_fashion_mnist
from kflow.vision.metrics import (InceptionFeatures, condition_dropping_scores, extract_features, frechet_distance,
                                  precision_recall)
from kflow.vision.models import DiT_models
from kflow.vision.sampling import SamplingConfig, generate_images
from kflow.vision.workflow import train_image_model

GENERATION_BATCH = 500  # images sampled per batch (batch i of a run starts at sample 500·i)
FASHION_MNIST_SIZE = 28  # generated 32×32 images are cropped back to this
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


def cached_features(path, net, make_images):
    """Inception features, cached on disk (feature extraction is the slow part on CPU: ~10 images/s)."""
    path = Path(path)
    if path.exists():
        return torch.load(path, weights_only=True)
    features = extract_features(net, make_images(), progress=True)
    atomic_save(features, path)
    return features


def fashion_images(dit, flow, ae, labels, steps, seed, condition_tau=None):
    """Images [N, 1, 28, 28] in [0, 1] for ``labels`` (Heun, no guidance), the 28 -> 32 padding undone."""
    sampling = SamplingConfig(steps=steps, method="heun", condition_tau=condition_tau, seed=seed,
                              batch_size=GENERATION_BATCH)
    return crop_to(generate_images(dit, flow, ae, labels, sampling=sampling), FASHION_MNIST_SIZE)


def build_parser() -> argparse.ArgumentParser:
    """The defaults are the published configuration of the BENCHMARKS.md vision table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", action="store_true",
                   help="run the converged study instead (benchmarks/vision_study.py; its flags follow)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="DiT-M/2", choices=sorted(DiT_models))
    p.add_argument("--samples", type=int, default=5000, help="generated images per model for FID / recall")
    p.add_argument("--ref-samples", type=int, default=5000, help="test images for the reference statistics")
    p.add_argument("--cdr-variants", nargs="*", default=["none", "fourier"],
                   help="decompositions for which the Class-Dropping-Ratio is measured")
    p.add_argument("--cdr-samples", type=int, default=2000,
                   help="images per CDR setting (the first N of the main samples are the condition-kept ones)")
    p.add_argument("--tau", type=float, default=0.3, help="condition kept for t < tau in the CDR samples")
    p.add_argument("--nfe-steps", type=int, default=10, help="Heun steps (2 model calls each)")
    p.add_argument("--ae-steps", type=int, default=300)
    p.add_argument("--ae-width", type=int, default=16)
    p.add_argument("--train-images", type=int, default=10000, help="training images used (first N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_vision")
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that reproduces this run: the module plus every option that differs from its default."""
    parts = ["python -m benchmarks.bench_vision"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "no_write", "out", "data_root"):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(value, bool):
            parts.append(flag)
        else:
            parts.append(" ".join([flag, *map(str, value if isinstance(value, list) else [value])]))
    return " ".join(parts)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--study" in argv:
        from benchmarks import vision_study

        return vision_study.main([a for a in argv if a != "--study"])
    parser = build_parser()
    args = parser.parse_args(argv)
    command = command_line(parser, args)
    out = Path(args.out)
    torch.set_num_threads(args.threads)  # 1 is far faster than 2 when other jobs share the 2 cores
    test_images, test_labels = load_fashion_mnist("test", args.data_root)
    test_images, test_labels = test_images[:args.ref_samples], test_labels[:args.ref_samples]
    net = InceptionFeatures()
    t0 = time.perf_counter()
    f_ref = cached_features(out / f"features_test_{args.ref_samples}.pt", net, lambda: test_images)
    feature_rate = args.ref_samples / max(time.perf_counter() - t0, 1e-9)
    print(f"reference features: {args.ref_samples} test images ({feature_rate:.1f} images/s if not cached)",
          flush=True)
    rows, raw = [], {}
    data = ImageDataConfig("fashion-mnist", ae_steps=args.ae_steps, ae_width=args.ae_width,
                           max_images=args.train_images, seed=args.seed, data_root=args.data_root)
    for label, decomposition, bands in VARIANTS:
        run = out / decomposition
        t0 = time.perf_counter()
        config = ImageModelConfig(model=args.model, decomposition=decomposition, num_bands=bands)
        trainer, flow = train_image_model(data, run, config, latent_dir=out / "latents", steps=args.steps,
                                          batch_size=args.batch_size, seed=args.seed, resume=True, progress=False)
        train_time = time.perf_counter() - t0
        overhead = kflow_overhead(trainer, flow, args.batch_size)
        dit, flow, ae, record = load_image_model(run)
        labels = torch.arange(args.samples) % record["num_classes"]
        t0 = time.perf_counter()
        images = fashion_images(dit, flow, ae, labels, args.nfe_steps, args.seed)
        sample_rate = args.samples / (time.perf_counter() - t0)
        f_gen = cached_features(run / f"features_gen_{args.samples}_s{args.seed}.pt", net, lambda: images)
        fid = frechet_distance(f_ref, f_gen)
        precision, recall = precision_recall(f_ref, f_gen)
        cdr = None
        if decomposition in args.cdr_variants:
            n = min(args.cdr_samples, args.samples)
            n -= n % GENERATION_BATCH if n >= GENERATION_BATCH else 0  # whole batches: the noise matches exactly
            # Same labels and, batch for batch, the same seeds as the first n main samples: only tau differs.
            dropped = cached_features(run / f"features_drop{args.tau}_{n}_s{args.seed}.pt", net,
                                      lambda: fashion_images(dit, flow, ae, labels[:n], args.nfe_steps, args.seed,
                                                             condition_tau=args.tau))
            scores = condition_dropping_scores(f_ref, test_labels, f_gen[:n], labels[:n], dropped, labels[:n],
                                               progress=True)
            cdr = scores["cdr"]
            raw_cdr = {"fid_full_per_class": scores["class_fid_full"],
                       "fid_dropped_per_class": scores["class_fid_dropped"], "cdr": cdr,
                       "fid_dropped": frechet_distance(f_ref, dropped)}
        metrics = trainer.out_dir / "metrics.jsonl"
        last = json.loads(metrics.read_text().splitlines()[-1])
        if decomposition == "wavelet":
            label = label.replace("Wavelet", f"Wavelet {record['wavelet']}")
        rows.append([label, f"{fid:.1f}", f"{precision:.3f}", f"{recall:.3f}",
                     "–" if cdr is None else f"{cdr:.2f} ({raw_cdr['fid_dropped']:.1f})", f"{sample_rate:.0f}",
                     f"{last['samples_per_s'] / args.batch_size:.1f}", f"{100 * overhead:.1f}%"])
        raw[label] = {"fid": fid, "precision": precision, "recall": recall, "train_s": train_time,
                      "sampling_images_per_s": sample_rate, "kflow_overhead": overhead,
                      **({"cdr": raw_cdr} if cdr is not None else {})}
        print(rows[-1], flush=True)
    body = (
        "## Latent image generation (`benchmarks/bench_vision.py`)\n\n"
        f"Command: `{command}` (`make bench` runs it with these defaults).\n\n"
        f"Fashion-MNIST (first {args.train_images} training images, padded to 32×32) encoded once by a "
        f"convolutional autoencoder trained here ({args.ae_steps} steps, width {args.ae_width}; latents 4×8×8); "
        f"{args.model}, class-conditional, {args.steps} steps of batch {args.batch_size}, "
        f"seed {args.seed}, identical for every row. Sampling: Heun, {args.nfe_steps} steps "
        f"({2 * args.nfe_steps} NFE), no guidance. FID / precision / recall (k=3) with the offline Inception-v3 "
        f"(pool3) on {args.samples} generated images per model (classes balanced) vs the first {args.ref_samples} "
        "test images. CDR (paper eq. 17–18, defined in docs/MATH.md) = mean over the 10 classes of FID(c) with the "
        f"condition for the whole path / FID(c) with the condition kept only for t < {args.tau} (null class after), "
        f"same noise; {min(args.cdr_samples, args.samples) // 10} generated vs ~{args.ref_samples // 10} test images "
        "per class, so per-class FIDs are biased upwards (the ratio is what matters); the bracket gives the FID of "
        "the condition-dropped samples against the whole reference set. A CDR near 1 "
        "means the class is fixed early in the path. Overhead = time of the K-Flow interpolant per step / time of a "
        "full training step (forward + backward), same batch.\n\n"
        + markdown_table(["model", "FID ↓", "precision ↑", "recall ↑", "CDR (FID dropped)", "sampling images/s",
                          "training steps/s", "K-Flow overhead"], rows)
        + "\n\nSampling images/s includes decoding; training steps/s is the Trainer's windowed rate at the end of "
        f"training; {args.threads} torch thread(s). Wall-clock timings on a shared 2-core machine are indicative "
        "only.")
    print(body)
    atomic_write_text(out / "raw.json", json.dumps(raw, indent=1))
    if not args.no_write:
        write_section("vision", body)


if __name__ == "__main__":
    run_main(main)  # a missing data set or a bad value: one line, no traceback
