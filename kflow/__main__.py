"""``python -m kflow``: the ``kflow`` command (kflow.cli)."""
import sys

from kflow.cli import main

sys.exit(main())
