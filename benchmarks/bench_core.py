"""Core engine throughput: decomposition round trips and the K-Flow overhead over plain rectified flow.

Run: python -m benchmarks.bench_core   (writes the "core" section of BENCHMARKS.md)
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.report import markdown_table, write_section
from kflow.core import (BandSchedule, FourierDecomposition, IdentityDecomposition, KFlow, LaplacianDecomposition,
                        PCADecomposition, WaveletDecomposition)


def timeit(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    latents = torch.randn(256, 4, 32, 32)
    latents_1 = torch.randn(256, 4, 32, 32)
    pca_fit_data = torch.randn(2048, 4, 32, 32)
    start = time.perf_counter()
    pca_full = PCADecomposition.fit(pca_fit_data, 2)
    pca_full_fit = time.perf_counter() - start
    start = time.perf_counter()
    pca_patch = PCADecomposition.fit(pca_fit_data, 2, patch_size=2)
    pca_patch_fit = time.perf_counter() - start

    mol_pos = torch.randn(1024, 17, 3) * 6
    mol_z0, mol_z1 = torch.zeros(1024, 17, 6), torch.randn(1024, 17, 6)
    lap_build = timeit(lambda: LaplacianDecomposition(mol_pos, 2), args.repeats)
    lap = LaplacianDecomposition(mol_pos, 2)

    cases = [
        ("Fourier (32×32, K=2)", FourierDecomposition((32, 32), 2), latents, latents_1, ""),
        ("Wavelet db6 (32×32, K=2)", WaveletDecomposition((32, 32), 2), latents, latents_1, ""),
        ("Wavelet haar (32×32, K=3)", WaveletDecomposition((32, 32), 3, wavelet="haar"), latents, latents_1, ""),
        ("PCA whole latent (D=4096, K=2)", pca_full, latents, latents_1, f"fit on 2048 samples: {pca_full_fit:.1f} s"),
        ("PCA 2×2 patches (D=16, K=2)", pca_patch, latents, latents_1, f"fit: {pca_patch_fit:.2f} s"),
        ("Laplacian (17 molecules, K=2)", lap, mol_z0, mol_z1, f"basis build for 1024 clusters: {lap_build * 1e3:.1f} ms"),
    ]
    rows = []
    for name, dec, x0, x1, note in cases:
        round_trip = timeit(lambda: dec.inverse(dec(x0)), args.repeats)
        shape = tuple(x0.shape[1:])
        kflow = KFlow(dec, BandSchedule(dec.num_bands))
        rectified = KFlow(IdentityDecomposition(shape), BandSchedule(1))
        t = torch.rand(x0.shape[0])
        cost_k = timeit(lambda: kflow.interpolate_and_velocity(x0, x1, t), args.repeats)
        cost_r = timeit(lambda: rectified.interpolate_and_velocity(x0, x1, t), args.repeats)
        err = (dec.inverse(dec(x0.double())) - x0.double()).abs().max().item() if not isinstance(
            dec, PCADecomposition) else (dec.inverse(dec(x0)) - x0).abs().max().item()
        rows.append([name, f"[{x0.shape[0]}, {', '.join(map(str, shape))}]", f"{round_trip * 1e3:.1f}",
                     f"{x0.shape[0] / round_trip:,.0f}", f"{cost_k * 1e3:.2f}", f"{cost_r * 1e3:.2f}",
                     f"{cost_k / cost_r:.1f}×", f"{err:.1e}", note])
        print(rows[-1], flush=True)

    table = markdown_table(
        ["decomposition", "batch", "forward+inverse (ms)", "samples/s", "K-Flow x_t+u_t (ms)",
         "rectified x_t+u_t (ms)", "overhead ratio", "round-trip error", "notes"], rows)
    body = (
        "## Core engine (`benchmarks/bench_core.py`)\n\n"
        "Median of repeated runs, float32 (round-trip error in float64 except PCA). *K-Flow x_t+u_t* is "
        "`interpolate_and_velocity` (one forward and two inverse transforms); *rectified* is the same call on the "
        "one-band identity decomposition, i.e. plain rectified flow. Target: every round trip on the latent batch "
        "< 0.1 s on 2 cores. The absolute K-Flow cost per training step is what matters against a model's forward/"
        "backward pass; see the vision and assembly sections for the share of a real training step.\n\n" + table)
    print(body)
    if not args.no_write:
        write_section("core", body)


if __name__ == "__main__":
    main()
