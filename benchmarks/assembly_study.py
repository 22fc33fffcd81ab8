"""The molecular-assembly study: identity, PackMol, direct regression, rigid FM (K=1), K-Flow K=2/K=3 and K-Flow
in reversed order, trained with validation-based checkpoint selection, 3 seeds, both start presets on CSD-500 and
the hard preset on the embedded pyxtal set. Writes the "assembly-study" section of BENCHMARKS.md and learning-curve
figures under docs/figures/.

    python benchmarks/bench_assembly.py --study            # the published study (resumable)
    python benchmarks/bench_assembly.py --study --quick    # same code path, tiny budget (a few minutes)

Each (table, row, seed) result is saved under benchmarks/results/assembly_study/ (quick: runs/assembly_study_quick/)
as soon as it exists; a rerun skips finished ones and resumes an interrupted training run from its checkpoint.
Cells run seed by seed, so a partial study already holds every row for seed 0.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.report import markdown_table, write_section
from kflow.molecular.datasets import ClusterDataset
from kflow.molecular.study import (SELECT_METRIC, StudyBudget, StudyCell, band_energy_shares, first_clusters,
                                   paired_comparison, run_identity_cell, run_model_cell, run_packmol_cell, run_shell_cell,
                                   study_models)
from kflow.molecular.workflow import load_assembly_dataset
from kflow.utils.plots import plot_learning_curves, read_metrics_log

REPO = Path(__file__).resolve().parents[1]
SHELL_ROW = "shell (data-free)"  # baselines.shell_predictions: central molecule + 16 on Thomson points
ALL_ROWS = ("regression", "rigid FM (K=1)", "K-Flow (K=2)", "K-Flow (K=3)", "K-Flow (K=2, high→low)")
# (data set, start preset, trained rows, start draws per crystal)
NOISE_SOURCE_ROWS = ("rigid FM (K=1), eot, noise source", "K-Flow (K=2), eot, noise source")
TABLES = (
    ("csd500", "hard", ALL_ROWS + NOISE_SOURCE_ROWS, 2),
    ("csd500", "mild", ALL_ROWS, 2),
    ("demo", "hard", ("regression", "rigid FM (K=1)", "K-Flow (K=2)"), 4),
)
SEEDS = (0, 1, 2)
FULL = StudyBudget(epochs=8, evals=6, val_clusters=32, sample_steps=10)
QUICK = StudyBudget(epochs=0.05, evals=2, val_clusters=4, test_clusters=6, sample_steps=4, packmol_nloop=5)
COLUMNS = ("pm_atom", "pm_center", "pm_atom_perm", "pm_center_perm", "rmsd15", "collision")
LABELS = {"pm_atom": "PM-atom", "pm_center": "PM-center", "pm_atom_perm": "PM-atom, matched",
          "pm_center_perm": "PM-center, matched", "rmsd15": "RMSD₁₅", "collision": "collision %"}


def _cells(out: Path, work: Path, seeds, tables, budget: StudyBudget | None = None):
    """Every cell in run order: seed-major, so a partial study holds all rows of the first seeds. With ``budget``,
    a model result saved under another budget is refused when loaded."""
    for seed in seeds:
        for dataset, preset, rows, _ in tables:
            yield StudyCell(dataset, preset, "identity", 0, out, work) if seed == seeds[0] else None
            yield StudyCell(dataset, preset, SHELL_ROW, seed, out, work) if preset == "hard" else None
            yield StudyCell(dataset, preset, "PackMol", seed, out, work)
            for row, config in study_models(preset, rows).items():
                yield StudyCell(dataset, preset, row, seed, out, work, config, budget=budget)


def run_study(out: Path, work: Path, budget: StudyBudget, seeds, tables, progress: bool) -> None:
    stores = {}
    for cell in filter(None, _cells(out, work, seeds, tables, budget)):
        if cell.load() is not None:
            continue
        key = (cell.dataset, cell.preset)
        if key not in stores:
            draws = next(t[3] for t in tables if t[:2] == key)
            stores[key] = load_assembly_dataset(cell.dataset, "data", draws_per_crystal=draws, noise=cell.preset,
                                                progress=False)
        t0 = time.perf_counter()
        if cell.row == "identity":
            result = run_identity_cell(cell, stores[key], budget)
        elif cell.row == SHELL_ROW:
            result = run_shell_cell(cell, stores[key], budget)
        elif cell.row == "PackMol":
            shared = StudyCell(cell.dataset, "any", "PackMol", cell.seed, out, work)  # start-independent
            result = shared.load() or run_packmol_cell(shared, stores[key], budget, progress=progress)
            result = cell.save({k: v for k, v in result.items() if k not in ("version", "preset")})
        else:
            result = run_model_cell(cell, stores[key], budget, progress=progress)
        metric = SELECT_METRIC[cell.preset]
        print(f"[{cell.slug}] {metric} {result['metrics'][metric]['mean']:.3f}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)


# ----------------------------------------------------------------------------------------------------- report
def _collect(out: Path, dataset: str, preset: str, rows, seeds) -> dict[str, list[dict]]:
    found = {}
    for row in ("identity", SHELL_ROW, "PackMol", *rows):
        results = [StudyCell(dataset, preset, row, s, out, out).load() for s in ((0,) if row == "identity" else seeds)]
        results = [r for r in results if r is not None]
        if results:
            found[row] = results
    return found


def _cell_text(results: list[dict], metric: str) -> str:
    means = [r["metrics"][metric]["mean"] for r in results]
    if len(means) == 1:
        return f"{means[0]:.3f}"
    return f"{np.mean(means):.3f} ± {np.std(means):.3f}"


def _table(found: dict[str, list[dict]]) -> str:
    rows = []
    for row, results in found.items():
        r0 = results[0]
        budget = (f"{r0['epochs']:.1f} ep ({r0['steps']} st), best at {np.mean([r['best_step'] for r in results]):.0f}"
                  if r0.get("kind") == "model" else "—")
        cells = []
        for m in COLUMNS:
            paired_meaningless = row == "PackMol" and m in ("pm_atom", "pm_center")
            cells.append("n/a" if paired_meaningless else _cell_text(results, m))
        rows.append([row, len(results), budget, *cells])
    return markdown_table(["model", "seeds", "training", *[LABELS[m] for m in COLUMNS]], rows)


def _paired(found: dict, metric: str) -> list[list]:
    if "rigid FM (K=1)" not in found:
        return []
    base = found["rigid FM (K=1)"]
    seeds = {r["seed"] for r in base}
    out = []
    for row, results in found.items():
        if row in ("identity", "PackMol", SHELL_ROW, "rigid FM (K=1)"):
            continue
        common = sorted(seeds & {r["seed"] for r in results})
        if not common:
            continue
        a = [next(r for r in results if r["seed"] == s)["metrics"][metric]["per_cluster"] for s in common]
        b = [next(r for r in base if r["seed"] == s)["metrics"][metric]["per_cluster"] for s in common]
        c = paired_comparison(a, b)
        out.append([f"{row} vs rigid FM (K=1)", LABELS[metric], len(common), f"{100 * c['improved']:.0f}%",
                    f"{c['mean_diff']:+.3f}", f"{c['p']:.2g}"])
    return out


def _curves(found: dict, work: Path, dataset: str, preset: str, figures: Path) -> str | None:
    runs = {}
    for row, results in found.items():
        seed0 = [r for r in results if r.get("kind") == "model" and r["seed"] == min(x["seed"] for x in results)]
        if seed0:
            run_dir = StudyCell(dataset, preset, row, seed0[0]["seed"], work, work).run_dir
            try:
                runs[row] = read_metrics_log(run_dir)
            except (FileNotFoundError, ValueError):
                continue
    if not runs:
        return None
    metric = SELECT_METRIC[preset]
    png = figures / f"assembly_study_{dataset}_{preset}.png"
    plot_learning_curves(runs, png, metrics=(f"eval_{metric}", "eval_rmsd15"),
                         title=f"{dataset}, {preset} start: training loss and validation metrics (first seed)")
    return png.relative_to(REPO).as_posix() if png.is_relative_to(REPO) else str(png)


def _energy_table(tables, quick: bool) -> str:
    rows = []
    for dataset, preset in sorted({(t[0], p) for t in tables for p in ("mild", "hard") if t[0] == "csd500"}
                                  | {(t[0], t[1]) for t in tables}):
        draws = next((t[3] for t in tables if t[0] == dataset), 2)
        store = load_assembly_dataset(dataset, "data", draws_per_crystal=draws, noise=preset, progress=False)
        test = first_clusters(ClusterDataset(store, split="test", seed=0), 6 if quick else None)
        for k in (2, 3):
            shares = band_energy_shares(test, k, coupling="index" if preset == "mild" else "ot")
            rows.append([dataset, f"{preset} ({'index' if preset == 'mild' else 'ot'})", k,
                         " / ".join(f"{100 * s:.0f}%" for s in shares["mode_share"]),
                         " / ".join(f"{100 * s:.0f}%" for s in shares["pooled"]),
                         " / ".join(f"{100 * m:.0f} ± {100 * s:.0f}%" for m, s in zip(shares["mean"], shares["std"]))])
    return markdown_table(["data set", "start (pairing)", "K", "share of modes (no structure)",
                           "energy share per band (low → high), pooled",
                           "per cluster, mean ± std"], rows)


def _verdict(found: dict, preset: str) -> str:
    metric = SELECT_METRIC[preset]
    models = {row: np.mean([r["metrics"][metric]["mean"] for r in rs]) for row, rs in found.items()
              if row not in ("identity", "PackMol", SHELL_ROW)}
    if not models:
        return ""
    best = min(models, key=models.get)
    lines = [f"best trained model by test {LABELS[metric]}: **{best}** ({models[best]:.3f} Å)"]
    if "identity" in found:
        ident = found["identity"][0]["metrics"][metric]["mean"]
        change = 1 - models[best] / ident
        lines.append(f"{100 * abs(change):.0f}% {'below' if change >= 0 else 'above'} identity ({ident:.3f} Å)")
    if "PackMol" in found:
        pm = {m: np.mean([r["metrics"][m]["mean"] for r in found["PackMol"]])
              for m in ("pm_atom_perm", "pm_center_perm", "rmsd15")}
        ours = {m: np.mean([r["metrics"][m]["mean"] for r in found[best]]) for m in pm}
        lines.append("vs PackMol (matched PM-atom / PM-center / RMSD₁₅): "
                     + " / ".join(f"{ours[m]:.3f} vs {pm[m]:.3f}" for m in pm))
    if "rigid FM (K=1)" in models and best != "rigid FM (K=1)":
        lines.append(f"rigid FM (K=1): {models['rigid FM (K=1)']:.3f} Å")
    return "; ".join(lines) + "."


def report(out: Path, work: Path, budget: StudyBudget, seeds, tables, command: str, quick: bool) -> str:
    figures = out / "figures" if quick else REPO / "docs" / "figures"
    parts = [
        "## Molecular assembly study (`python benchmarks/bench_assembly.py --study`)\n",
        f"Command: `{command}` (resumable; results in `{out.relative_to(REPO).as_posix()}/`). Every trained row: "
        f"the default network, AdamW lr {budget.lr}, batch {budget.batch_size}, {budget.epochs:g} epochs of the "
        f"train split, {budget.evals} validation evaluations on the first {budget.val_clusters} validation "
        f"clusters keeping the EMA checkpoint with the lowest validation PM-center (index-paired for `mild`, "
        f"matched for `hard`), {budget.sample_steps}-step sampler (regression: one step), one sample per cluster. "
        f"Seeds {list(seeds)} vary initialisation and data order; the crystal split and the start draws are fixed "
        "(data seed 0), so all seeds and models are scored on the same test clusters. Training pairs start and final "
        "molecules by index for `mild` and by an optimal assignment (`--coupling ot`) for `hard`. Cells: mean ± std "
        "over seeds of the test-split mean (Å; lower is better). *Matched* columns compare after optimally "
        "matching predicted to true molecules (`compute_packing_matching(permutation_invariant=True)`), the fair "
        "measure for a `hard` start, which carries no index correspondence, and for PackMol (index-paired PM n/a). "
        "PackMol: the real binary (PyPI `packmol` wheel), 17 rigid copies packed without overlap (tolerance 2 Å) "
        "into the sphere that encloses the true cluster (the crystal's density), PackMol seed = study seed.\n",
    ]
    for dataset, preset, rows, draws in tables:
        found = _collect(out, dataset, preset, rows, seeds)
        if not found:
            continue
        parts.append(f"### {dataset}, `{preset}` start ({draws} start draws per crystal, "
                     f"{len(found[next(iter(found))][0]['test_names'])} test clusters)\n")
        parts.append(_table(found) + "\n")
        paired = _paired(found, SELECT_METRIC[preset]) + _paired(found, "rmsd15")
        if paired:
            parts.append("Paired per test cluster (cluster values averaged over the common seeds; Wilcoxon "
                         "signed-rank, two-sided):\n\n" + markdown_table(
                             ["comparison", "metric", "seeds", "clusters improved", "mean difference (Å)", "p"],
                             paired) + "\n")
        png = _curves(found, work, dataset, preset, figures)
        if png:
            parts.append(f"![learning curves {dataset} {preset}]({png})\n")
        verdict = _verdict(found, preset)
        if verdict:
            parts.append(verdict + "\n")
    parts.append("### Where the start→final motion lives\n\nShare of the squared rigid-body displacement "
                 "(chart coordinates, Å) in each Laplacian band of the start centroids, test split:\n\n"
                 + _energy_table(tables, quick) + "\n")
    return "\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny budget, same code path (checks the study runs)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--report-only", action="store_true", help="write the tables from the results saved so far")
    p.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    budget = QUICK if args.quick else FULL
    out = REPO / ("runs/assembly_study_quick" if args.quick else "benchmarks/results/assembly_study")
    work = REPO / ("runs/assembly_study_quick/work" if args.quick else "runs/assembly_study")
    command = "python benchmarks/bench_assembly.py --study" + (" --quick" if args.quick else "")
    if args.seeds != list(SEEDS):
        command += " --seeds " + " ".join(map(str, args.seeds))
    t0 = time.perf_counter()
    if not args.report_only:
        run_study(out, work, budget, tuple(args.seeds), TABLES, args.progress)
    body = report(out, work, budget, tuple(args.seeds), TABLES, command, args.quick)
    print(body)
    print(f"study wall time this sitting: {time.perf_counter() - t0:.0f} s; budget {asdict(budget)}")
    if not (args.no_write or args.quick):
        write_section("assembly-study", body)
