#!/usr/bin/env python
"""Build COD-Cluster17-style clusters from crystal files.

    python scripts/build_clusters.py CRYSTALS... --out data/built/mycrystals [--draws 4] [--seed 0]

CRYSTALS: CIF files or folders of CIFs, ASE databases (.db/.json) or extxyz files with lattices. Writes the raw
COD-Cluster17 CSV layout under OUT/raw, an LMDB store at OUT/processed/clusters.lmdb and OUT/summary.json, and
prints how many crystals were kept and rejected by reason. Every input file ends in the summary as built,
rejected (with reasons) or error (with the cause); one bad file never stops the build. The build is
transactional: OUT is replaced only when complete (a killed build leaves the previous OUT or none), so OUT must
be new, empty or an earlier build's folder. Equivalent Python:
``kflow.molecular.data.sources.build_clusters_from_files(paths, out, ...)``.
"""
import sys
from pathlib import Path

from dataclasses import replace

from kflow.molecular.data.starts import NOISE_PRESETS, NoiseModel
from kflow.molecular.data.sources import build_clusters_from_files
from kflow.cli import HelpFormatter
from kflow.utils.cli import ArgumentParser, positive_float, positive_int, run_main


def _noise(args) -> NoiseModel:
    preset = NOISE_PRESETS[args.noise]
    if args.noise == "mild" and (args.expansion, args.jitter) != (preset.expansion, preset.jitter):
        return replace(preset, expansion=args.expansion, jitter=args.jitter, name="custom")
    return preset


def main(argv=None) -> int:
    p = ArgumentParser(__doc__, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="CIF file/folder, ASE database or extxyz file(s)")
    p.add_argument("--out", required=True, help="output folder (raw/, processed/clusters.lmdb, summary.json)")
    p.add_argument("--draws", type=positive_int, default=4, help="noisy initial clusters per crystal")
    p.add_argument("--seed", type=int, default=0, help="seed of the start-cluster draws")
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-raw", action="store_true", help="skip the raw CSV layout, write only the LMDB store")
    p.add_argument("--noise", default="mild", choices=sorted(NOISE_PRESETS),
                   help="start preset: mild (each molecule near its target) or hard (random placement at crystal "
                        "density)")
    p.add_argument("--expansion", type=positive_float, default=NoiseModel.expansion,
                   help="mild noise: centroid expansion factor")
    p.add_argument("--jitter", type=float, default=NoiseModel.jitter, help="mild noise: centroid jitter (Å)")
    p.add_argument("--bond-factor", type=positive_float, default=1.2,
                   help="bond if d < factor × (r_cov,i + r_cov,j)")
    args = p.parse_args(argv)
    try:
        store, summary = build_clusters_from_files(
            args.inputs, args.out, args.draws, args.seed, args.workers, write_raw=not args.no_raw,
            noise=_noise(args), bond_factor=args.bond_factor)
    except (FileNotFoundError, ValueError) as err:  # no readable input: exit status 2, as for usage errors
        print(f"build_clusters: {err}", file=sys.stderr)
        return 2
    print(f"{len(store)} clusters from {summary.kept} crystals -> {Path(args.out)}")
    print(summary)
    print(f"every input file's outcome: {Path(args.out) / 'summary.json'}")
    return 0 if len(store) else 1


if __name__ == "__main__":
    run_main(main)
