"""Sampling assembled clusters with a trained rigid-body K-Flow model: one batch (``sample_assembly``) or a whole
data set in batches (``predict_assembly``)."""
from __future__ import annotations

import torch

from kflow.molecular.flow import AssemblyBatch, RigidKFlow, collate_clusters

__all__ = ["sample_assembly", "predict_assembly"]


@torch.no_grad()
def sample_assembly(model, batch: AssemblyBatch, rigid_flow: RigidKFlow, steps: int = 50, method: str = "band",
                    repeats: int = 1, repeat_noise: float = 0.1, seed: int = 0,
                    steps_per_band=None, reuse_graph: bool = True) -> torch.Tensor:
    """Integrate the learned flow from the initial clusters; returns atom positions [R, B, M, P, 3].

    The source (the initial cluster) is deterministic, so repeat r > 0 starts from a perturbed chart
    z⁰ ~ N(0, repeat_noise²) (Å, in translation and scaled-rotation coordinates), seeded by ``seed`` and r;
    repeat 0 always starts exactly at the initial cluster. With ``repeats=1`` sampling is deterministic.

    method: one of ``kflow.core.SAMPLING_METHODS``: "band" (exact band step for the x1-predicting model; NFE =
    steps), "euler", "heun" (2·steps NFE) or "dopri5" (adaptive). ``steps_per_band`` (one count per band) replaces
    ``steps`` with that many steps inside each band's window, e.g. more steps for the coarse band.
    ``reuse_graph=False`` rebuilds the fixed part of the network's graph at every step, as kflow <= 0.2 did (for
    speed comparisons only; results are the same). A direct-regression model (``rigid_flow.regression``) is
    always sampled in one step: its prediction at t = 0.
    """
    if rigid_flow.regression:
        steps, method, steps_per_band = 1, "euler", None
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


@torch.no_grad()
def predict_assembly(model, rigid, dataset, steps: int = 20, method: str = "band", repeats: int = 1,
                     repeat_noise: float = 0.1, batch_size: int = 8, seed: int = 0, progress: bool = False,
                     steps_per_band=None, reuse_graph: bool = True) -> list[torch.Tensor]:
    """Predicted final positions for every cluster of ``dataset``: a list of [R, N_i, 3] tensors (atom order of
    the cluster's ``Data``). See ``sample_assembly`` for the sampling arguments."""
    model.eval()
    out = []
    indices = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="sampling", unit="batch")
    for start in indices:
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate_clusters(items)
        pos = sample_assembly(model, batch, rigid, steps, method, repeats, repeat_noise, seed + start,
                              steps_per_band, reuse_graph)  # [R, B, M, P, 3]
        for b, item in enumerate(items):
            order = torch.argsort(item.molecule_index, stable=True)
            flat = pos[:, b][:, batch.mask[b]]  # [R, N, 3] in molecule-sorted order
            restored = torch.empty_like(flat)
            restored[:, order] = flat
            out.append(restored)
    return out
