"""Training objective of rigid-body molecular K-Flow.

The model predicts the final cluster (x1-prediction in the rigid-body chart); the K-Flow loss regresses ẑ¹ on z¹
at a random t, with the Laplacian band schedule deciding which collective modes of the cluster are already placed
(band 0: whole-cluster and long-wavelength motions first). x1-prediction keeps a learning signal at every t, while
a velocity target vanishes outside the active band; the sampler converts ẑ¹ into the exact band step.

Two choices matter when the start is noise (docs/MATH.md, "Generative assembly from a random start"):

- ``rotation_loss``: "chart" compares rotation vectors ℓ·log(R), whose principal value jumps where the angle
  crosses π (a third of the hard-start targets lie beyond 150°), so a prediction close to the target on the group
  can cost ~(2πℓ)². "atoms" compares the poses by what they do to the atoms: the mean squared displacement of
  the molecule's atoms between the predicted and the true final pose, |T̂ − T¹|² + tr((R̂ − R¹) C (R̂ − R¹)ᵀ)
  with C the molecule's body covariance — smooth on all of SO(3), no cut, and in the same units (Å²) for
  centroids and orientations.
- ``time_sampling``: "uniform" (t ~ U(0, 1), the paper's Algorithm 1) or "band_start": half of the times uniform,
  half concentrated at the start of a random band window, t = a_b + (c_b − a_b)·u², where the network has the least
  information (t = 0 for one band: pure noise) and the path is decided.
"""
from __future__ import annotations

import torch

from kflow.core.distributed import sample_batch_times
from kflow.molecular.model.flow import AssemblyBatch, RigidKFlow
from kflow.molecular.so3 import exp_map

__all__ = ["AssemblyLoss", "ROTATION_LOSSES", "TIME_SAMPLINGS", "sample_training_times", "pose_errors"]

ROTATION_LOSSES = ("chart", "atoms")
TIME_SAMPLINGS = ("uniform", "band_start")


def sample_training_times(num: int, schedule, how: str = "uniform", device=None, dtype=None) -> torch.Tensor:
    """Training times [num] by ``how`` (``TIME_SAMPLINGS``), drawn for the global batch and sliced per rank
    (``sample_batch_times``), so DDP sees exactly what one process would."""
    u = sample_batch_times(num, dtype=torch.float64)
    if how == "uniform":
        return u.to(device=device, dtype=dtype)
    if how != "band_start":
        raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {how!r}")
    pick, which = sample_batch_times(num, dtype=torch.float64), sample_batch_times(num, dtype=torch.float64)
    band = (which * schedule.num_bands).long().clamp_max(schedule.num_bands - 1)  # [num] a random band
    start, end = schedule.starts.double()[band], schedule.ends.double()[band]
    early = start + (end - start) * u.square()  # density ∝ 1/√(t − a_b): most mass at the band's start
    return torch.where(pick < 0.5, u, early).to(device=device, dtype=dtype)


def pose_errors(z1_hat: torch.Tensor, batch: AssemblyBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared centroid error [B, M] (Å²) and the mean squared atom displacement caused by the orientation error
    [B, M] (Å²), tr((R̂ − R¹) C (R̂ − R¹)ᵀ), of predicted final chart coordinates ``z1_hat`` [B, M, 6]."""
    z1 = batch.final_chart()
    translation = (z1_hat[..., :3] - z1[..., :3]).square().sum(-1)  # [B, M]
    rot_hat = exp_map(z1_hat[..., 3:] / batch.rotation_scale[:, None, None])  # [B, M, 3, 3]
    diff = rot_hat - batch.final_rotations  # [B, M, 3, 3]
    w = batch.mask.to(batch.body.dtype)  # [B, M, P]
    cov = torch.einsum("bmp,bmpi,bmpj->bmij", w, batch.body, batch.body) / w.sum(-1).clamp_min(1)[..., None, None]
    rotation = torch.einsum("bmij,bmjk,bmik->bm", diff, cov, diff)  # [B, M] = tr(D C Dᵀ)
    return translation, rotation


class AssemblyLoss:
    """loss_fn(model, batch) -> (loss, metrics) for ``kflow.core.training.Trainer``.

    ``rotation_loss="chart"``: the mean squared chart error in Å² (rotation coordinates scaled by the molecule's
    radius of gyration ℓ), eq. 12 with x1-prediction. ``"atoms"``: the pose error measured on the atoms
    (``pose_errors``), translation + ``rotation_weight`` × orientation part, divided by 6 so its scale matches the
    chart loss's per-coordinate mean. For the direct-regression baseline (``RigidKFlow(regression=True)``) every
    time is 0: the same loss on the network's one-step prediction from the start cluster.
    """

    def __init__(self, rigid_flow: RigidKFlow, rotation_loss: str = "chart", rotation_weight: float = 1.0,
                 time_sampling: str = "uniform"):
        if rotation_loss not in ROTATION_LOSSES:
            raise ValueError(f"rotation_loss must be one of {ROTATION_LOSSES}, got {rotation_loss!r}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        if not rotation_weight >= 0:
            raise ValueError(f"rotation_weight must be >= 0, got {rotation_weight}")
        self.rigid_flow, self.rotation_loss = rigid_flow, rotation_loss
        self.rotation_weight, self.time_sampling = float(rotation_weight), time_sampling

    def times(self, batch: AssemblyBatch) -> torch.Tensor:
        z0 = batch.body
        if self.rigid_flow.regression:  # direct regression: start cluster -> final cluster
            return torch.zeros(batch.num_clusters, device=z0.device, dtype=z0.dtype)
        return sample_training_times(batch.num_clusters, self.rigid_flow.schedule, self.time_sampling,
                                     device=z0.device, dtype=z0.dtype)

    def __call__(self, model, batch: AssemblyBatch, t: torch.Tensor | None = None):
        flow = self.rigid_flow.for_batch(batch)
        z0, z1 = batch.initial_chart(), batch.final_chart()
        t = self.times(batch) if t is None else t
        if self.rotation_loss == "chart":
            per_sample = flow.loss(model, z0, z1, t=t, model_kwargs={"batch": batch}, reduction="none")
            loss = per_sample.mean()
            return loss, {"rmsd_chart": float(loss.detach().sqrt())}
        z_t = flow.interpolate(z0, z1, t)  # [B, M, 6]
        z1_hat = model(z_t, t, batch=batch)  # [B, M, 6]
        translation, rotation = pose_errors(z1_hat, batch)  # [B, M] each
        loss = (translation + self.rotation_weight * rotation).mean() / 6
        return loss, {"rmsd_atoms": float((translation + rotation).detach().mean().sqrt()),
                      "rmsd_centroids": float(translation.detach().mean().sqrt())}
