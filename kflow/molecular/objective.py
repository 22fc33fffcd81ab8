"""Training objective of rigid-body molecular K-Flow.

The model predicts the final cluster (x1-prediction in the rigid-body chart); the K-Flow loss regresses ẑ¹ on z¹
at a random t, with the Laplacian band schedule deciding which collective modes of the cluster are already placed
(band 0: whole-cluster and long-wavelength motions first). x1-prediction keeps a learning signal at every t, while
a velocity target vanishes outside the active band; the sampler converts ẑ¹ into the exact band step.
"""
from __future__ import annotations

import torch

from kflow.core.distributed import sample_batch_times
from kflow.molecular.flow import AssemblyBatch, RigidKFlow

__all__ = ["AssemblyLoss"]


class AssemblyLoss:
    """loss_fn(model, batch) -> (loss, metrics) for ``kflow.core.training.Trainer``.

    The loss is the mean squared chart error in Å² (rotation coordinates are scaled by the molecule's radius of
    gyration), i.e. close to the mean squared atom displacement of the predicted final poses. For the
    direct-regression baseline (``RigidKFlow(regression=True)``) every time is 0: the same loss on the network's
    one-step prediction from the start cluster.
    """

    def __init__(self, rigid_flow: RigidKFlow):
        self.rigid_flow = rigid_flow

    def __call__(self, model, batch: AssemblyBatch, t: torch.Tensor | None = None):
        flow = self.rigid_flow.for_batch(batch)
        z0, z1 = batch.initial_chart(), batch.final_chart()
        if t is None and self.rigid_flow.regression:  # direct regression: start cluster -> final cluster
            t = torch.zeros(batch.num_clusters, device=z0.device, dtype=z0.dtype)
        elif t is None:  # global-batch times sliced per rank: DDP sees exactly what one process would
            t = sample_batch_times(batch.num_clusters, device=z0.device, dtype=z0.dtype)
        per_sample = flow.loss(model, z0, z1, t=t, model_kwargs={"batch": batch}, reduction="none")
        loss = per_sample.mean()
        return loss, {"rmsd_chart": float(loss.detach().sqrt())}
