#!/usr/bin/env python
"""Evaluate sampled clusters: PM-atom, PM-center, RMSD_15 (min over repeats), collision and separation rates,
mean ± std over clusters, next to the identity baseline (prediction = initial cluster). Table + JSON. The same
command as `kflow evaluate` (kflow.molecular.commands.evaluate_main).

    python scripts/evaluate_assembly.py --predictions runs/assembly_demo_k2/predictions.npz --dataset demo
"""

from kflow.molecular.commands import evaluate_main
from kflow.utils.cli import run_main


def main(argv=None):
    return evaluate_main(argv)


if __name__ == "__main__":
    run_main(main)
