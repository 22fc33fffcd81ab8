"""What several test files share (importable as ``testkit``: conftest.py puts tests/ on the path): the repository
root, toy clusters, data sets and trainers, and the small pyxtal cluster stores of the command-line tests."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kflow.core.training import Trainer
from kflow.molecular import Cluster
from kflow.molecular.so3 import random_rotations

REPO = Path(__file__).resolve().parents[1]
SDF, CIF = REPO / "data" / "examples" / "GASXON.sdf", REPO / "data" / "examples" / "GASXON.cif"
F64 = torch.float64


# ------------------------------------------------------------------------------------------------- clusters
def make_cluster(seed=0, atoms=5, name="toy"):
    g = torch.Generator().manual_seed(seed)
    body = torch.randn(atoms, 3, generator=g, dtype=F64)
    sites = torch.randn(17, 3, generator=g, dtype=F64) * 6
    r0, r1 = random_rotations(17, F64, generator=g), random_rotations(17, F64, generator=g)
    x0 = sites[:, None] + torch.einsum("mij,pj->mpi", r0, body)
    x1 = 0.8 * sites[:, None] + torch.einsum("mij,pj->mpi", r1, body)
    z = torch.tensor([6, 1, 8, 7, 16, 1, 1][:atoms]).repeat(17)
    return Cluster(z, torch.arange(17).repeat_interleave(atoms), x0.reshape(-1, 3), x1.reshape(-1, 3), name)


TINY = dict(hidden_irreps="8x0e + 4x1o + 4x1e", num_molecule_layers=1)


def _cluster(seed, crystal):
    """A 'crystal': 17 molecules on a compact lattice; the initial cluster is expanded and randomly rotated."""
    g = torch.Generator().manual_seed(seed)
    body = torch.tensor([[0.0, 0, 0], [1.4, 0, 0], [0, 1.1, 0.3], [-0.5, -0.6, 0.9]])
    grid = torch.stack(torch.meshgrid(*[torch.arange(-1, 2.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = grid[torch.argsort(grid.norm(dim=-1), stable=True)][:17] * 4.5
    final = sites[:, None] + body
    rot = random_rotations(17, generator=g)
    initial = 1.4 * sites[:, None] + torch.einsum("mij,pj->mpi", rot, body) + 0.3 * torch.randn(17, 1, 3,
                                                                                                  generator=g)
    shift = initial.reshape(-1, 3).mean(0)
    return Cluster(torch.tensor([6, 6, 8, 1]).repeat(17), torch.arange(17).repeat_interleave(4),
                   initial.reshape(-1, 3) - shift, final.reshape(-1, 3) - shift, f"{crystal}_{seed}", crystal)


def pyxtal_clusters(count: int, max_atoms: int = 300) -> list:
    """The first ``count`` clusters (at most ``max_atoms`` atoms) built from pyxtal's embedded crystals."""
    from kflow.molecular import InvalidCrystal, build_cluster, read_crystals
    from kflow.molecular.data.sources import pyxtal_crystal_sources

    clusters = []
    for name, atoms in read_crystals(pyxtal_crystal_sources()[0]):
        try:
            cluster = build_cluster(atoms, seed=0, name=name)
        except InvalidCrystal:
            continue
        if cluster.num_atoms <= max_atoms:
            clusters.append(cluster)
        if len(clusters) == count:
            break
    return clusters


# ------------------------------------------------------------------------------------------------ data sets
class ListDataset:
    """The part of ClusterDataset that artifacts use: len, cluster(i), split."""

    split = "test"

    def __init__(self, clusters):
        self.clusters = clusters

    def __len__(self):
        return len(self.clusters)

    def cluster(self, i):
        return self.clusters[i]


class ToyView:
    """What RedrawnStarts reads of a ClusterDataset: a store, the store indices, the length and the clusters."""

    store = type("S", (), {"path": "toy"})()

    def __init__(self, make_cluster, indices):
        self.make_cluster, self.indices_ = make_cluster, list(indices)

    def __len__(self):
        return len(self.indices_)

    def cluster(self, i):
        return self.make_cluster(i)


# ------------------------------------------------------------------------------------------------- training
class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def collate(items):
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def mse(model, batch):
    x, y = batch
    noise = 0.01 * torch.randn_like(y)  # consumes RNG, so resume must restore it exactly
    loss = (model(x).squeeze(-1) - y - noise).pow(2).mean()
    return loss, {"abs_err": float((model(x).squeeze(-1) - y).abs().mean().detach())}


def make_trainer(tmp_path, max_steps=20, model=None, loss_fn=mse, config=None, **kw):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    return Trainer(model, loss_fn, ToyData(), collate_fn=collate, batch_size=8, lr=1e-2, max_steps=max_steps,
                   out_dir=tmp_path, config=config or {"width": 16}, checkpoint_every=5, log_every=2,
                   progress=False, device="cpu", **kw)


def one_error_line(capsys) -> str:
    """The one line a command wrote to stderr: ``error: ...``, no traceback (asserted); returned for more checks."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]
