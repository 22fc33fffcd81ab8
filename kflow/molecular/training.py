"""Training objective and model construction for rigid-body molecular K-Flow.

The model predicts the final cluster (x1-prediction in the rigid-body chart); the K-Flow loss regresses ẑ¹ on z¹
at a random t, with the Laplacian band schedule deciding which collective modes of the cluster are already placed
(band 0: whole-cluster and long-wavelength motions first). x1-prediction keeps a learning signal at every t, while
a velocity target vanishes outside the active band; the sampler converts ẑ¹ into the exact band step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kflow.core.distributed import sample_batch_times
from kflow.molecular.flow import AssemblyBatch, RigidKFlow
from kflow.molecular.network import AssemblyFlowModel, AssemblyNetwork

__all__ = ["AssemblyModelConfig", "build_assembly_model", "AssemblyLoss"]


@dataclass
class AssemblyModelConfig:
    """Everything that determines the model's parameters and the flow; saved in every checkpoint."""

    num_bands: int = 2
    ramp: str = "linear"
    order: str = "low_to_high"
    overlap: float = 0.0
    hidden_irreps: str = "32x0e + 8x1o + 8x1e"
    num_atom_layers: int = 1
    num_molecule_layers: int = 2
    intra_cutoff: float = 2.0
    inter_cutoff: float = 4.0
    molecule_cutoff: float = 20.0
    lmax: int = 2
    num_basis: int = 10
    conv: str = "uvu"  # "uvu" depthwise convolutions; "fctp" the fully connected network of kflow <= 0.2
    heavy_atoms_only: bool = False  # atom-level message passing without hydrogens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AssemblyModelConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known.setdefault("conv", "fctp")  # configurations saved before `conv` existed describe the fctp network
        return cls(**known)


def build_assembly_model(config: AssemblyModelConfig) -> tuple[AssemblyFlowModel, RigidKFlow]:
    """The x1-predicting flow model and the rigid K-Flow (schedule + Laplacian bands) described by ``config``."""
    rigid = RigidKFlow(config.num_bands, ramp=config.ramp, order=config.order, overlap=config.overlap)
    net = AssemblyNetwork(config.hidden_irreps, config.num_atom_layers, config.num_molecule_layers,
                          config.intra_cutoff, config.inter_cutoff, config.molecule_cutoff, config.lmax,
                          config.num_basis, schedule=rigid.schedule, conv=config.conv,
                          heavy_atoms_only=config.heavy_atoms_only)
    return AssemblyFlowModel(net), rigid


class AssemblyLoss:
    """loss_fn(model, batch) -> (loss, metrics) for ``kflow.core.training.Trainer``.

    The loss is the mean squared chart error in Å² (rotation coordinates are scaled by the molecule's radius of
    gyration), i.e. close to the mean squared atom displacement of the predicted final poses.
    """

    def __init__(self, rigid_flow: RigidKFlow):
        self.rigid_flow = rigid_flow

    def __call__(self, model, batch: AssemblyBatch, t: torch.Tensor | None = None):
        flow = self.rigid_flow.for_batch(batch)
        z0, z1 = batch.initial_chart(), batch.final_chart()
        if t is None:  # global-batch times sliced per rank: DDP sees exactly what one process would
            t = sample_batch_times(batch.num_clusters, device=z0.device, dtype=z0.dtype)
        per_sample = flow.loss(model, z0, z1, t=t, model_kwargs={"batch": batch}, reduction="none")
        loss = per_sample.mean()
        return loss, {"rmsd_chart": float(loss.detach().sqrt())}
