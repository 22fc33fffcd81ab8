#!/usr/bin/env python
"""The paper's analyses for trained image runs: energy share per band of the real latents (Fig. 3) and the
PCA-projection ratio along sampled trajectories (Fig. 4), as PNGs and analysis.json.

    python scripts/analyze_image.py --runs runs/fm runs/kflow_fourier --out runs/analysis
"""

from kflow.cli import HelpFormatter
from kflow.utils.cli import ArgumentParser, positive_int, run_main
from kflow.vision.data import add_data_root_argument
from kflow.vision.workflow import analyze_runs


def main(argv=None):
    p = ArgumentParser(__doc__, formatter_class=HelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run folders from train_image.py (first: its latents)")
    p.add_argument("--out", required=True, help="folder for the PNGs and analysis.json")
    p.add_argument("--num-bands", type=positive_int, default=3, help="bands for the Fig. 3 energy profile")
    p.add_argument("--latents", type=positive_int, default=2048, help="training latents used")
    p.add_argument("--trajectories", type=positive_int, default=64,
                   help="sampled trajectories for the Fig. 4 PCA-projection ratio")
    p.add_argument("--steps", type=positive_int, default=20, help="sampling steps of each trajectory")
    p.add_argument("--seed", type=int, default=0, help="latent subset and trajectory noise")
    add_data_root_argument(p)  # the flag every image script takes; the analyses read the runs' cached latents
    args = p.parse_args(argv)
    result = analyze_runs(args.runs, args.out, args.num_bands, args.latents, args.trajectories, args.steps,
                          seed=args.seed)
    for name, prof in result["band_energy"].items():
        print(f"{name:8s} energy share per band: " + " ".join(f"{v:.3f}" for v in prof["energy_share"]))
    for name, curve in result["pca_projection_ratio"].items():
        print(f"{name}: top-{result['pca_top_components']} PC share at t=0, 0.5, 1: "
              f"{curve[0]:.3f} {curve[len(curve) // 2]:.3f} {curve[-1]:.3f}")
    print(f"figures and analysis.json in {args.out}")


if __name__ == "__main__":
    run_main(main)
