"""Learning curves from a training run's ``metrics.jsonl`` (written by ``kflow.core.training.Trainer``), as PNG.

Training records carry ``loss`` every ``log_every`` steps; evaluation records carry ``eval_<metric>`` every
``eval_every`` steps. Both domains share this reader and plot.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from kflow.utils.io import atomic_path, loads_json

__all__ = ["read_metrics_log", "plot_learning_curves", "plot_run"]


def read_metrics_log(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` in order. A truncated last line (a run killed while writing) is
    skipped; any other malformed line raises ``ValueError`` naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics log (is {run_dir} a training run folder?)")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = loads_json(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # the run was stopped mid-write
            raise ValueError(f"{path}, line {number}: not JSON ({err})") from None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    pairs = [(s, v) for s, v in pairs if math.isfinite(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (noisy per-batch losses)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_learning_curves(runs: dict[str, list[dict]], out_png: str | os.PathLike, metrics: Sequence[str] = (),
                         title: str = "", smooth: int = 10, log_loss: bool = True) -> Path:
    """One panel for the training loss and one per evaluation metric (``eval_<name>``), a line per run.

    ``runs``: label -> records (``read_metrics_log``). ``metrics``: the evaluation metrics to show (default:
    every ``eval_*`` key present). Written atomically; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not metrics:
        metrics = sorted({k for recs in runs.values() for r in recs for k in r if k.startswith("eval_")})
    panels = ["loss", *metrics]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for label, records in runs.items():
            steps, values = _series(records, key)
            if not steps:
                continue
            if key == "loss":
                values = _smooth(values, smooth)
            ax.plot(steps, values, label=label, marker="" if key == "loss" else ".", lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(key.removeprefix("eval_") + (" (train, smoothed)" if key == "loss" else " (validation)"),
                     fontsize=9)
        if key == "loss" and log_loss:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(5))  # long runs: step labels would run into each other
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png


def plot_run(run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None) -> Path:
    """Learning curves of one run, to ``out_png`` (default ``run_dir/curves.png``)."""
    run_dir = Path(run_dir)
    return plot_learning_curves({run_dir.name: read_metrics_log(run_dir)}, out_png or run_dir / "curves.png",
                                title=str(run_dir))
