"""Sampling assembled clusters with a trained rigid-body K-Flow model: one batch (``sample_assembly``) or a whole
data set in batches (``predict_assembly``)."""
from __future__ import annotations

import torch

from kflow.molecular.model.flow import AssemblyBatch, RigidKFlow, collate_clusters

__all__ = ["sample_assembly", "predict_assembly", "medoid_sample", "predict_medoid"]


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
        # Sampling reads only the starts: their copies may be mirror images of the final ones (lone molecules
        # under --mirror half, starts with set hands), which training-time collation would refuse.
        batch = collate_clusters(items, free_pairs=True)
        pos = sample_assembly(model, batch, rigid, steps, method, repeats, repeat_noise, seed + start,
                              steps_per_band, reuse_graph)  # [R, B, M, P, 3]
        for b, item in enumerate(items):
            order = torch.argsort(item.molecule_index, stable=True)
            flat = pos[:, b][:, batch.mask[b]]  # [R, N, 3] in molecule-sorted order
            restored = torch.empty_like(flat)
            restored[:, order] = flat
            out.append(restored)
    return out


def medoid_sample(samples, molecule_index: torch.Tensor) -> int:
    """Index of the consensus of several predictions of one cluster (minimum Bayes risk under the matched
    PM-center): the sample whose summed matched PM-center to the others is smallest. ``samples``: [S, N, 3] (or a
    list of [N, 3]) atom positions in one atom order, ``molecule_index`` [N]. A generative model's single sample
    carries its own share of the uncertainty about the packing; the medoid is its most typical answer."""
    from kflow.molecular.evaluation.matching import compute_packing_matching

    xs = [torch.as_tensor(x, dtype=torch.float64) for x in samples]
    n = len(xs)
    if n == 0:
        raise ValueError("medoid_sample needs at least one sample")
    cluster = torch.zeros_like(molecule_index)
    cost = torch.zeros(n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(a + 1, n):
            pm = compute_packing_matching(xs[a], xs[b], molecule_index, cluster, permutation_invariant=True)
            cost[a, b] = cost[b, a] = float(pm.pm_center)
    return int(cost.sum(1).argmin())


def predict_medoid(model, rigid, dataset, samples: int = 8, steps: int = 10, seed: int = 0,
                   batch_size: int = 8) -> list[torch.Tensor]:
    """For every cluster of ``dataset`` (a ``ClusterDataset``-like view whose clusters record their start model,
    ``info["noise"]``): ``samples`` predictions from independent starts (the stored start and ``samples`` − 1
    redrawn ones, seeded by ``seed``, sample and cluster, with the view's start hands, ``info["start_mirror"]``),
    and the ``medoid_sample`` of them. Returns a list of [1, N_i, 3] in each cluster's stored frame and atom
    order."""
    from kflow.molecular.data.starts import NoiseModel
    from kflow.molecular.data.datasets import redraw_start, set_start_hands

    runs = []
    for k in range(samples):
        views = []
        for i in range(len(dataset)):
            cluster = dataset.cluster(i)
            if k > 0:
                hands = cluster.info.get("start_mirror", "crystal")
                cluster = redraw_start(cluster, NoiseModel(**cluster.info["noise"]), (seed * samples + k) * 1_000_003 + i)
                cluster = set_start_hands(cluster, hands)
            views.append(cluster)
        preds = predict_assembly(model, rigid, [c.to_data() for c in views], steps=steps, batch_size=batch_size)
        # back to the stored frame: a redrawn cluster is the stored one shifted by a constant
        runs.append([p[0] + (dataset.cluster(i).final_positions - v.final_positions).mean(0).to(p.dtype)
                     for i, (p, v) in enumerate(zip(preds, views))])
    out = []
    for i in range(len(dataset)):
        mol = dataset.cluster(i).molecule_index
        out.append(runs[medoid_sample([r[i] for r in runs], mol)][i][None])
    return out
