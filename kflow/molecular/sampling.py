"""Sampling assembled clusters with a trained rigid-body K-Flow model."""
from __future__ import annotations

import torch

from kflow.molecular.flow import AssemblyBatch, RigidKFlow

__all__ = ["sample_assembly"]


@torch.no_grad()
def sample_assembly(model, batch: AssemblyBatch, rigid_flow: RigidKFlow, steps: int = 50, method: str = "band",
                    repeats: int = 1, repeat_noise: float = 0.1, seed: int = 0,
                    steps_per_band=None, reuse_graph: bool = True) -> torch.Tensor:
    """Integrate the learned flow from the initial clusters; returns atom positions [R, B, M, P, 3].

    The source (the initial cluster) is deterministic, so repeat r > 0 starts from a perturbed chart
    z⁰ ~ N(0, repeat_noise²) (Å, in translation and scaled-rotation coordinates), seeded by ``seed`` and r;
    repeat 0 always starts exactly at the initial cluster. With ``repeats=1`` sampling is deterministic.

    method: "band" (exact band step for the x1-predicting model; NFE = steps), "euler", "heun" (2·steps NFE) or
    "dopri5" (adaptive). ``steps_per_band`` (one count per band) replaces ``steps`` with that many steps inside
    each band's window, e.g. more steps for the coarse band. ``reuse_graph=False`` rebuilds the fixed part of the
    network's graph at every step, as kflow <= 0.2 did (for speed comparisons only; results are the same).
    """
    flow = rigid_flow.for_batch(batch)
    z_init = batch.initial_chart()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Everything that stays fixed while molecules move rigidly (intra-molecular edges and their radial features,
    # the molecule graph) is built once for all steps and repeats.
    kwargs = {"batch": batch}
    if reuse_graph and hasattr(model, "preprocess"):
        kwargs["graph"] = model.preprocess(batch)
    out = []
    for r in range(repeats):
        noise = torch.randn(z_init.shape, generator=gen, dtype=torch.float64).to(z_init) * repeat_noise
        z0 = z_init if r == 0 else z_init + noise
        z1 = flow.sample(model, z0, steps=steps, method=method, model_kwargs=kwargs,
                         steps_per_band=steps_per_band)
        out.append(batch.positions_from_chart(z1))
    return torch.stack(out)
