#!/usr/bin/env python
"""Train rigid-body K-Flow for molecular assembly; the same command as `kflow train`
(kflow.molecular.commands.train_main).

Examples:
    python scripts/train_assembly.py --subset 10k                      # COD-Cluster17 10K (data/COD-Cluster17)
    python scripts/train_assembly.py --dataset demo --num-bands 1      # rigid flow-matching baseline, embedded data
    torchrun --nproc_per_node 2 scripts/train_assembly.py --dataset csd500 --steps 2000
"""

from kflow.molecular.commands import train_main, train_parser
from kflow.utils.cli import run_main


def parse_args(argv=None):
    return train_parser().parse_args(argv)


def main(argv=None):
    return train_main(argv)


if __name__ == "__main__":
    run_main(main)
