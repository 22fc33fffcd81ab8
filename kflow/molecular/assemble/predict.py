"""Prediction of an input's starts: the model's sampler on all starts at once with each molecule snapped onto its
input geometry (``predict_clusters``), MMFF relaxation (``relax_samples``) and scores against a known crystal
(``truth_metrics``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from kflow.molecular.data.cluster import Cluster


__all__ = ["predict_clusters", "truth_metrics", "relax_samples"]


# --------------------------------------------------------------------------------------------------- prediction
class _CountingModel(torch.nn.Module):
    """The flow model with a progress bar that advances at every network evaluation."""

    def __init__(self, model, bar):
        super().__init__()
        self.model, self.bar = model, bar

    def preprocess(self, batch):
        return self.model.preprocess(batch)

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.bar.update(1)
        return out


def molecule_blocks(x: torch.Tensor, clusters: Sequence[Cluster]) -> torch.Tensor:
    """[S, N, 3] (atoms in molecule order, every molecule P atoms) -> [S, M, P, 3]."""
    m = clusters[0].num_molecules
    return x.reshape(x.shape[0], m, -1, 3)


def predict_clusters(model, rigid, clusters: Sequence[Cluster], references: torch.Tensor, steps: int = 10,
                     seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, float]:
    """Sample every cluster (one batch), then place each molecule's reference geometry (``references`` [S, M, P,
    3], float64) by the best rigid motion onto the sampled atoms. Returns (positions [S, N, 3] float64, largest RMS
    distance between a sampled molecule and its rigid placement, Å)."""
    from tqdm.auto import tqdm

    from kflow.molecular.geometry import atoms_from_poses, kabsch
    from kflow.molecular.model.sampling import predict_assembly

    nfe = 1 if rigid.regression else steps
    with tqdm(total=nfe, desc=f"sampling {len(clusters)} cluster(s)", unit="step", disable=not progress,
              leave=False) as bar:
        preds = predict_assembly(_CountingModel(model, bar), rigid, [c.to_data() for c in clusters], steps=steps,
                                 batch_size=len(clusters), seed=seed)
    sampled = molecule_blocks(torch.stack([p[0] for p in preds]).double(), clusters)  # [S, M, P, 3]
    rot, shift = kabsch(references, sampled)
    placed = atoms_from_poses(shift, rot, references)
    residual = (placed - sampled).square().sum(-1).mean(-1).sqrt().max().item()
    return placed.reshape(len(clusters), -1, 3), residual


def relax_samples(positions: torch.Tensor, clusters: Sequence[Cluster], progress: bool = False):
    """Rigid-body MMFF relaxation (``relax.relax_cluster``) of every sample [S, N, 3]. Returns (relaxed positions
    [S, N, 3] float64, per sample {"mmff_energy", "mmff_energy_before", "relax_shift_rms"}, the start's energy
    (of the first sample's start), a note or None). Where no force field can be set up for the molecule, the
    samples are returned unrelaxed with a note saying why."""
    from tqdm.auto import tqdm

    from kflow.molecular.physics.relax import relax_cluster

    out, rows = positions.clone(), []
    z, mol = clusters[0].atomic_numbers, clusters[0].molecule_index
    try:
        start = relax_cluster(z, clusters[0].initial_positions.double(), mol, max_steps=0, separate_rounds=0)
        for k in tqdm(range(len(clusters)), desc="relaxing", unit="sample", disable=not progress, leave=False):
            r = relax_cluster(z, positions[k], mol)
            out[k] = torch.as_tensor(r.positions, dtype=out.dtype)
            shift = float((out[k] - positions[k]).square().sum(-1).mean().sqrt())
            rows.append({"mmff_energy": r.energy_after, "mmff_energy_before": r.energy_before,
                         "relax_shift_rms": shift, "force_field": r.force_field})
    except ValueError as err:
        return positions, None, None, f"not relaxed: {str(err).splitlines()[0]}"
    return out, rows, start.energy_before, None


def truth_metrics(cluster: Cluster, positions: torch.Tensor) -> dict:
    """Scores of predicted positions [N, 3] against the cluster's true (crystal) arrangement: PM-atom and PM-center
    (Å; molecules paired by index, and ``_matched``: after matching predicted to true molecules), the field's
    packing metric from OXtalign (``matched15``: molecules of 15 within 1 Å; ``rmsd15``: COMPACK's RMSD₁₅ over
    them, None when only the centre matched), ``rmsd15_forced`` (all 15 forced into a match), collision and
    separation rates (%)."""
    from kflow.molecular.evaluation.collisions import collision_rate, separation_rate
    from kflow.molecular.evaluation.matching import compute_packing_matching
    from kflow.molecular.evaluation.oxtal import cluster_packing_match
    from kflow.molecular.evaluation.rmsd import rmsd15

    true, pred = cluster.final_positions.double(), positions.double()
    z, mol = cluster.atomic_numbers, cluster.molecule_index
    paired = compute_packing_matching(true, pred, mol)
    matched = compute_packing_matching(true, pred, mol, permutation_invariant=True)
    field_metric = cluster_packing_match(true, pred, z)
    rmsd = float(field_metric.rmsd[0])
    return {"pm_atom": float(paired.pm_atom[0]), "pm_center": float(paired.pm_center[0]),
            "pm_atom_matched": float(matched.pm_atom[0]), "pm_center_matched": float(matched.pm_center[0]),
            "matched15": int(field_metric.n_matched[0]), "rmsd15": None if rmsd != rmsd else rmsd,
            "rmsd15_forced": float(rmsd15(true, pred, mol, z)[0]),
            "collision_pct": float(collision_rate(pred, mol, z)[0]),
            "separation_pct": float(separation_rate(pred, mol, z)[0])}
