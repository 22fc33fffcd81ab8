"""What ``kflow assemble`` writes: the output folder (extxyz, PDB, summary.json), staged so that it appears complete
or not at all, and the picture of the clusters (``plot_clusters``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from kflow.molecular.data.cluster import Cluster
from kflow.molecular.data.io import cluster_pdb_text
from kflow.utils.io import printable_name

if TYPE_CHECKING:
    from ase import Atoms
from kflow.molecular.assemble.inputs import covalent_bonds


__all__ = ["write_assembly_outputs", "plot_clusters", "OUTPUT_FILES"]


OUTPUT_FILES = ("pred.extxyz", "pred.pdb", "start.extxyz", "truth.extxyz", "samples.extxyz", "summary.json",
                "cluster.png")


# ------------------------------------------------------------------------------------------------------ outputs
def check_out_dir(out_dir: Path) -> None:
    """The output folder is replaced as a whole: refuse one that holds anything ``kflow assemble`` did not write
    (hidden files too: ``--out my_repo/`` must never sweep away ``my_repo/.git``), the current folder, a file and
    a place that is not writable."""
    from kflow.utils.io import check_replaceable_folder

    check_replaceable_folder(out_dir, dict.fromkeys(OUTPUT_FILES), "kflow assemble")


def display_name(name: str) -> str:
    """A name as the outputs show it: one line of printable characters, no double quotes (a name read from a file,
    e.g. an ASE db row holding a newline or a backslash, must not break the extxyz comment line)."""
    return printable_name(name)


def cluster_atoms(cluster: Cluster, positions: torch.Tensor, **info) -> Atoms:
    import ase

    atoms = ase.Atoms(numbers=cluster.atomic_numbers.numpy(), positions=positions.double().numpy())
    atoms.set_array("mol_idx", cluster.molecule_index.numpy().astype(np.int64))
    atoms.info.update({k: v for k, v in info.items() if v is not None})
    return atoms


def plot_clusters(panels: Sequence[tuple[str, torch.Tensor]], cluster: Cluster, path: str | os.PathLike,
                  title: str = "") -> Path:
    """3-D views side by side, one colour per molecule, bonds drawn: ``panels`` = [(title, positions [N, 3])].
    Every panel is centred on its molecule centroids and turned to their principal axes, so the clusters are
    compared in the same orientation convention; axis limits are shared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Line3DCollection

    from kflow.molecular.geometry import index_centroids

    z, mol = cluster.atomic_numbers, cluster.molecule_index
    m = cluster.num_molecules
    p = cluster.num_atoms // m
    # same atom order in every copy
    bonds = covalent_bonds(z[:p].numpy(), cluster.initial_positions[:p].double().numpy())
    colours = plt.get_cmap("tab20")(np.arange(m) % 20)
    views = []
    for _, x in panels:
        x = x.double()
        centroids = index_centroids(x, mol, m)
        centre = centroids.mean(0)
        _, axes = torch.linalg.eigh(((centroids - centre).T @ (centroids - centre)))
        views.append(((x - centre) @ axes.flip(-1)).numpy())  # largest spread first
    limit = max(np.abs(v).max() for v in views)
    fig = plt.figure(figsize=(4.4 * len(panels), 4.6))
    for k, ((label, _), view) in enumerate(zip(panels, views)):
        ax = fig.add_subplot(1, len(panels), k + 1, projection="3d")
        heavy = z.numpy() > 1
        ax.scatter(*view.T, c=colours[mol.numpy()], s=np.where(heavy, 14, 4), depthshade=False, linewidths=0)
        segments = view.reshape(m, p, 3)[:, bonds]  # [M, E, 2, 3]
        ax.add_collection3d(Line3DCollection(segments.reshape(-1, 2, 3), colors=np.repeat(colours, len(bonds), 0),
                                             linewidths=1.0))
        for set_lim in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
            set_lim(-limit, limit)
        ax.set_box_aspect((1, 1, 1))
        ax.set_title(label, fontsize=9)
        for set_ticks in (ax.set_xticks, ax.set_yticks, ax.set_zticks):
            set_ticks([])
    fig.tight_layout(rect=(0, 0, 1, 0.93) if title else None)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def write_assembly_outputs(out_dir: str | os.PathLike, clusters: Sequence[Cluster], positions: torch.Tensor,
                           order: Sequence[int], summary: dict, truth: bool) -> list[str]:
    """Write pred.extxyz, pred.pdb, start.extxyz, samples.extxyz (several samples), truth.extxyz (``truth``),
    cluster.png and summary.json for the samples (``positions`` [S, N, 3], ranked by ``order``) into a staging
    folder beside ``out_dir`` and swap it in when complete: ``out_dir`` shows all files or none."""
    import ase.io

    from kflow.molecular.data.store import staged_folder

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    best = order[0]
    chosen = clusters[best]
    name = display_name(chosen.crystal)
    files = ["pred.extxyz", "pred.pdb", "start.extxyz"] + (["samples.extxyz"] if len(clusters) > 1 else []) + (
        ["truth.extxyz"] if truth else []) + ["cluster.png", "summary.json"]
    summary = {**summary, "files": files}
    with staged_folder(out_dir) as stage:
        stage.mkdir()
        ase.io.write(stage / "pred.extxyz", cluster_atoms(chosen, positions[best], name=name, arrangement="predicted",
                                                   sample=best), format="extxyz")
        (stage / "pred.pdb").write_text(cluster_pdb_text(chosen, positions[best], f"kflow assemble: {name}, predicted "
                                                  f"cluster (sample {best})"))
        ase.io.write(stage / "start.extxyz", cluster_atoms(chosen, chosen.initial_positions, name=name,
                                                           arrangement="start", sample=best), format="extxyz")
        if len(clusters) > 1:
            ase.io.write(stage / "samples.extxyz", [cluster_atoms(clusters[k], positions[k], name=name,
                                                           arrangement="predicted", sample=k, rank=r)
                                                    for r, k in enumerate(order, start=1)], format="extxyz")
        panels = [("start", chosen.initial_positions), (f"prediction (sample {best})", positions[best])]
        if truth:
            ase.io.write(stage / "truth.extxyz", cluster_atoms(chosen, chosen.final_positions, name=name,
                                                        arrangement="crystal"), format="extxyz")
            panels.append(("crystal", chosen.final_positions))
        metrics = summary.get("metrics")
        subtitle = f"{name}: {chosen.num_molecules} molecules"
        if metrics:
            subtitle += (f"; PM-center {metrics['pm_center_matched']:.2f} Å (matched), {metrics['matched15']} of 15 "
                         f"molecules matched (OXtalign)")
        plot_clusters(panels, chosen, stage / "cluster.png", subtitle)
        (stage / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return files
