#!/usr/bin/env python
"""Sample assembled clusters from a trained checkpoint: writes an .npz (and optional extxyz files); the same command
as `kflow sample` (kflow.molecular.commands.sample_main).

    python scripts/sample_assembly.py --checkpoint runs/assembly_demo_k2/checkpoints/last.pt --dataset demo \
        --steps 20 --repeats 3 --out runs/assembly_demo_k2/predictions.npz --extxyz-dir runs/assembly_demo_k2/xyz
"""

from kflow.molecular.commands import sample_main
from kflow.utils.cli import run_main


def main(argv=None):
    return sample_main(argv)


if __name__ == "__main__":
    run_main(main)
