"""SE(3)-equivariant velocity network for rigid-body molecular assembly (e3nn).

Two levels of message passing, both with tensor-product convolutions on spherical harmonics of edge vectors:

1. atoms: edges within a molecule (r < ``intra_cutoff``) and between molecules (r < ``inter_cutoff``) of the same
   cluster; a flag tells the two apart. Neighbour lists are computed densely in plain torch per cluster.
2. molecules: atom features are mean-pooled per molecule and exchanged over the complete graph of the M
   molecules of a cluster (edges between centroids), so every molecule sees the whole cluster.

The head predicts, per molecule, the remaining displacement to the final pose in the rigid-body chart: a
translation ΔT (irrep 1o, a vector) and a rotation-coordinate change (irrep 1e, a pseudovector). Everything is
built from relative vectors, so the output rotates with the input and ignores global translations.

Shapes: B clusters, M molecules, P atoms per molecule (padded), A = M·P atoms per cluster.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import FullyConnectedNet, Gate
from torch import nn
from torch_geometric.utils import scatter

from kflow.core import BandSchedule, BandTimeEmbedding
from kflow.molecular.flow import AssemblyBatch, poses_from_chart

__all__ = ["EquivariantConvolution", "AssemblyNetwork", "AssemblyFlowModel", "MAX_ATOMIC_NUMBER"]

MAX_ATOMIC_NUMBER = 100


def _gated_irreps(hidden: o3.Irreps):
    """Split hidden irreps into (scalars, gates, gated) for an e3nn Gate whose output is ``hidden``."""
    scalars = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l == 0])
    gated = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l > 0])
    gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
    return scalars, gates, gated


class EquivariantConvolution(nn.Module):
    """h_i' = Linear(h_i) + Gate( Σ_j TP(h_j, Y(r_ij); w(edge scalars)) / √n̄ ).

    Args:
        irreps_in, irreps_out: node feature irreps.
        irreps_sh: spherical-harmonics irreps of the edge direction.
        num_edge_scalars: size of the invariant edge features (radial basis, flags).
        avg_neighbors: normalisation of the summed messages.
    """

    def __init__(self, irreps_in, irreps_out, irreps_sh, num_edge_scalars: int, radial_hidden: int = 32,
                 avg_neighbors: float = 10.0):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        scalars, gates, gated = _gated_irreps(self.irreps_out)
        self.gate = Gate(scalars, [torch.nn.functional.silu] * len(scalars), gates,
                         [torch.sigmoid] * len(gates), gated)
        self.tp = o3.FullyConnectedTensorProduct(self.irreps_in, irreps_sh, self.gate.irreps_in,
                                                 shared_weights=False)
        self.radial = FullyConnectedNet([num_edge_scalars, radial_hidden, self.tp.weight_numel],
                                        torch.nn.functional.silu)
        self.self_interaction = o3.Linear(self.irreps_in, self.irreps_out)
        self.norm = 1.0 / math.sqrt(avg_neighbors)

    def forward(self, h, edge_src, edge_dst, edge_sh, edge_scalars):
        """h [V, irreps_in], edges [E], edge_sh [E, sh], edge_scalars [E, S] -> [V, irreps_out]."""
        messages = self.tp(h[edge_src], edge_sh, self.radial(edge_scalars))
        agg = scatter(messages, edge_dst, dim=0, dim_size=h.shape[0], reduce="sum") * self.norm
        return self.self_interaction(h) + self.gate(agg)


def _radius_edges(pos: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, intra_cutoff: float,
                  inter_cutoff: float):
    """Dense neighbour search per cluster in plain torch.

    pos [B, A, 3], mask [B, A], group [B, A] (molecule id). Returns flat (src, dst, same_group) over B·A nodes,
    keeping pairs i ≠ j with r < intra_cutoff inside a molecule or r < inter_cutoff between molecules.
    """
    b, a, _ = pos.shape
    dist = torch.cdist(pos, pos)  # [B, A, A]
    same = group[:, :, None] == group[:, None, :]
    valid = mask[:, :, None] & mask[:, None, :] & ~torch.eye(a, dtype=torch.bool, device=pos.device)
    keep = valid & torch.where(same, dist < intra_cutoff, dist < inter_cutoff)
    cb, ci, cj = keep.nonzero(as_tuple=True)
    return cb * a + cj, cb * a + ci, same[cb, ci, cj]  # messages flow j -> i


class AssemblyNetwork(nn.Module):
    """Equivariant network: atoms of a cluster -> per-molecule (ΔT [B, M, 3], Δω [B, M, 3]).

    Args:
        hidden_irreps: atom and molecule feature irreps (must contain 1o and 1e channels).
        num_atom_layers, num_molecule_layers: message-passing depth at each level.
        intra_cutoff, inter_cutoff: atom-graph cutoffs in Å (within / between molecules).
        molecule_cutoff: range of the radial basis on the molecule graph, Å.
        lmax: spherical-harmonics degree of edge directions.
        num_basis: radial basis size.
        schedule: the band schedule, for the band-aware time embedding (None: time only).
    """

    def __init__(self, hidden_irreps: str = "32x0e + 8x1o + 8x1e", num_atom_layers: int = 1,
                 num_molecule_layers: int = 2, intra_cutoff: float = 2.0, inter_cutoff: float = 4.0,
                 molecule_cutoff: float = 20.0, lmax: int = 2, num_basis: int = 10,
                 schedule: BandSchedule | None = None, time_dim: int = 32):
        super().__init__()
        self.hidden_irreps = o3.Irreps(hidden_irreps).sort().irreps.simplify()  # scalars first
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        self.intra_cutoff, self.inter_cutoff, self.molecule_cutoff = intra_cutoff, inter_cutoff, molecule_cutoff
        self.num_basis = num_basis
        num_scalars = self.hidden_irreps.count(o3.Irrep("0e"))
        self.atom_embedding = nn.Embedding(MAX_ATOMIC_NUMBER + 1, num_scalars)
        self.time_embedding = BandTimeEmbedding(time_dim, schedule)
        self.time_to_atoms = nn.Linear(time_dim, num_scalars)
        self.time_to_molecules = nn.Linear(time_dim, num_scalars)
        scalar_irreps = o3.Irreps(f"{num_scalars}x0e")
        atom_layers, irreps = [], scalar_irreps
        for _ in range(num_atom_layers):
            atom_layers.append(EquivariantConvolution(irreps, self.hidden_irreps, self.irreps_sh, num_basis + 1,
                                                      avg_neighbors=20.0))
            irreps = self.hidden_irreps
        self.atom_layers = nn.ModuleList(atom_layers)
        # Molecule inputs: pooled atom features + the current chart offset (z_T: 1o, z_R: 1e).
        self.molecule_input = o3.Linear(irreps + o3.Irreps("1x1o + 1x1e"), self.hidden_irreps)
        self.molecule_layers = nn.ModuleList([
            EquivariantConvolution(self.hidden_irreps, self.hidden_irreps, self.irreps_sh, num_basis,
                                   avg_neighbors=16.0) for _ in range(num_molecule_layers)])
        self.head = o3.Linear(self.hidden_irreps, o3.Irreps("1x1o + 1x1e"))
        self.irreps_in_molecule = irreps

    def forward(self, positions: torch.Tensor, atomic_numbers: torch.Tensor, mask: torch.Tensor,
                chart: torch.Tensor, t: torch.Tensor):
        """positions [B, M, P, 3], atomic_numbers [B, M, P], mask [B, M, P], chart z_t [B, M, 6], t [B]
        -> (ΔT [B, M, 3], Δω [B, M, 3])."""
        b, m, p, _ = positions.shape
        a = m * p
        if atomic_numbers.max() > MAX_ATOMIC_NUMBER or atomic_numbers.min() < 0:
            raise ValueError(f"atomic numbers must be in 1..{MAX_ATOMIC_NUMBER} (0 = padding), got "
                             f"{int(atomic_numbers.min())}..{int(atomic_numbers.max())}")
        dtype = positions.dtype
        pos = positions.reshape(b, a, 3)
        amask = mask.reshape(b, a)
        group = torch.arange(m, device=pos.device).repeat_interleave(p)[None].expand(b, a)
        temb = self.time_embedding(t).to(dtype)  # [B, time_dim]

        # ---- atom level
        src, dst, same = _radius_edges(pos, amask, group, self.intra_cutoff, self.inter_cutoff)
        flat = pos.reshape(b * a, 3)
        vec = flat[dst] - flat[src]
        length = vec.norm(dim=-1)
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        radial = soft_one_hot_linspace(length, 0.0, self.inter_cutoff, self.num_basis, basis="smooth_finite",
                                       cutoff=True) * math.sqrt(self.num_basis)
        edge_scalars = torch.cat([radial, same.to(dtype)[:, None]], -1)
        h = self.atom_embedding(atomic_numbers.reshape(b * a)).to(dtype)
        h = h + self.time_to_atoms(temb).repeat_interleave(a, 0)
        for layer in self.atom_layers:
            h = layer(h, src, dst, sh, edge_scalars)

        # ---- pool to molecules: mean over real atoms
        w = amask.reshape(b * m, p, 1).to(dtype)
        pooled = (h.reshape(b * m, p, -1) * w).sum(1) / w.sum(1).clamp_min(1)
        hm = self.molecule_input(torch.cat([pooled, chart.reshape(b * m, 6)], -1))
        num_scalars = self.time_to_molecules.out_features
        hm = torch.cat([hm[:, :num_scalars] + self.time_to_molecules(temb).repeat_interleave(m, 0),
                        hm[:, num_scalars:]], -1)

        # ---- molecule level: complete graph over the M molecules of each cluster
        centroids = (positions * mask[..., None]).sum(2) / mask.sum(2, keepdim=True).clamp_min(1)  # [B, M, 3]
        ii, jj = torch.meshgrid(torch.arange(m, device=pos.device), torch.arange(m, device=pos.device),
                                indexing="ij")
        off = ii != jj
        ii, jj = ii[off], jj[off]
        base = (torch.arange(b, device=pos.device) * m)[:, None]
        msrc, mdst = (base + jj[None]).reshape(-1), (base + ii[None]).reshape(-1)
        cflat = centroids.reshape(b * m, 3)
        mvec = cflat[mdst] - cflat[msrc]
        msh = o3.spherical_harmonics(self.irreps_sh, mvec, normalize=True, normalization="component")
        mrad = soft_one_hot_linspace(mvec.norm(dim=-1), 0.0, self.molecule_cutoff, self.num_basis,
                                     basis="smooth_finite", cutoff=True) * math.sqrt(self.num_basis)
        for layer in self.molecule_layers:
            hm = layer(hm, msrc, mdst, msh, mrad)
        out = self.head(hm).reshape(b, m, 6)
        return out[..., :3], out[..., 3:]


class AssemblyFlowModel(nn.Module):
    """x1-predicting model on the rigid-body chart, callable by the core ``KFlow``: model(z_t, t, batch=...) -> ẑ¹.

    From z_t it rebuilds the current poses and atoms and asks the network for the remaining chart displacement
    per molecule, ẑ¹ = z_t + (ΔT, Δz_R): ΔT is a vector (1o) in Å and Δz_R a pseudovector (1e) in the scaled
    rotation coordinates (Å). Predicting the displacement in the chart, rather than a relative rotation that is
    then mapped back with log, keeps the output continuous: log jumps where rotation angles cross π.
    """

    def __init__(self, network: AssemblyNetwork):
        super().__init__()
        self.network = network

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, batch: AssemblyBatch) -> torch.Tensor:
        trans, rot = poses_from_chart(batch.initial_translations, z_t, batch.rotation_scale)
        positions = trans[:, :, None] + torch.einsum("bmij,bmpj->bmpi", rot, batch.body)
        d_trans, d_rot = self.network(positions, batch.atomic_numbers, batch.mask, z_t, t)
        return z_t + torch.cat([d_trans, d_rot], -1)
