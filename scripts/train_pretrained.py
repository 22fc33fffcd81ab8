#!/usr/bin/env python
"""Train, test and package a pretrained model for `kflow assemble` (kflow.molecular.pretraining.train_pretrained,
argument parsing in kflow.molecular.commands.train_pretrained_main).

    python scripts/train_pretrained.py --preset hard --out kflow/molecular/pretrained_models/hard.pt
    python scripts/train_pretrained.py --preset mild --out kflow/molecular/pretrained_models/mild.pt
"""

from kflow.molecular.commands import train_pretrained_main
from kflow.utils.cli import run_main


def main(argv=None):
    return train_pretrained_main(argv)


if __name__ == "__main__":
    run_main(main)
