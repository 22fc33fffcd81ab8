"""SE(3)-equivariant velocity network for rigid-body molecular assembly (e3nn).

Two levels of message passing, both with tensor-product convolutions on spherical harmonics of edge vectors:

1. atoms: edges within a molecule (r < ``intra_cutoff``) and between molecules (r < ``inter_cutoff``) of the same
   cluster; a flag tells the two apart. Molecules are rigid, so the intra-molecular edges, their lengths and radial
   features never change along a path: ``AssemblyNetwork.preprocess`` builds them once per batch (from the body
   coordinates) and the sampler reuses them at every step. Inter-molecular edges are found in plain torch at every
   call, only between molecules whose centroids are close enough for any of their atoms to be within the cutoff
   (centroid distance < cutoff + 2 × molecule radius), so the search costs [K, P, P] for K such pairs instead of
   [B, A, A].
2. molecules: atom features are mean-pooled per molecule and exchanged over the complete graph of the M
   molecules of a cluster (edges between centroids), so every molecule sees the whole cluster.

Two convolutions (``conv``):
- ``"uvu"`` (default): depthwise tensor product, one learned radial weight per channel and path, channels mixed
  by node-level linear layers before and after the edge sum (the NequIP/MACE pattern). The per-edge weights are
  small ([E, Σ mul_in]), which is what makes it fast on CPU.
- ``"fctp"``: fully connected tensor product with per-edge weights ([E, mul_in · mul_out] per path), the
  network of kflow ≤ 0.2, kept so old checkpoints load and the speed-up is measured side by side.

The head predicts, per molecule, the remaining displacement to the final pose in the rigid-body chart: a
translation ΔT (irrep 1o, a vector) and a rotation-coordinate change (irrep 1e, a pseudovector). Everything is
built from relative vectors, so the output rotates with the input and ignores global translations.

Shapes: B clusters, M molecules, P atoms per molecule (padded), A = M·P atoms per cluster, V = B·A atom nodes,
E atom edges, N = B·M molecule nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import FullyConnectedNet, Gate
from torch import nn
from torch_geometric.utils import scatter

from kflow.core import BandSchedule, BandTimeEmbedding
from kflow.molecular.geometry import atoms_from_poses, masked_centroids
from kflow.molecular.model.flow import AssemblyBatch, poses_from_chart
from kflow.molecular.so3 import exp_map, log_map

__all__ = ["FullyConnectedConvolution", "DepthwiseConvolution", "CONVOLUTIONS", "AssemblyGraph", "AssemblyNetwork",
           "AssemblyFlowModel", "MAX_ATOMIC_NUMBER", "unwrap_rotation_vector"]

MAX_ATOMIC_NUMBER = 100
# Message sums are divided by √num_neighbors. Typical atom degree of the demo clusters at the default cutoffs
# (intra 2 Å, inter 4 Å); the molecule graph is complete over 17 molecules, so every molecule has 16 neighbours.
ATOM_NUM_NEIGHBORS = 20.0
MOLECULE_NUM_NEIGHBORS = 16.0
CHART_IRREPS = o3.Irreps("1x1o + 1x1e")  # per molecule: translation (vector), rotation coordinates (pseudovector)


def _gated_irreps(hidden: o3.Irreps):
    """Split hidden irreps into (scalars, gates, gated) for an e3nn Gate whose output is ``hidden``."""
    scalars = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l == 0])
    gated = o3.Irreps([(mul, ir) for mul, ir in hidden if ir.l > 0])
    gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
    return scalars, gates, gated


def _gate(irreps_out: o3.Irreps) -> Gate:
    scalars, gates, gated = _gated_irreps(irreps_out)
    return Gate(scalars, [torch.nn.functional.silu] * len(scalars), gates, [torch.sigmoid] * len(gates), gated)


def _radial_embedding(length: torch.Tensor, cutoff: float, num_basis: int) -> torch.Tensor:
    """Smooth radial basis vanishing at ``cutoff``: [E] -> [E, num_basis]."""
    return soft_one_hot_linspace(length, 0.0, cutoff, num_basis, basis="smooth_finite",
                                 cutoff=True) * math.sqrt(num_basis)


class FullyConnectedConvolution(nn.Module):
    """h_i' = Linear(h_i) + Gate( Σ_j TP(h_j, Y(r_ij); w(edge scalars)) / √num_neighbors ), fully connected TP.

    Args:
        irreps_in, irreps_out: node feature irreps.
        irreps_sh: spherical-harmonics irreps of the edge direction.
        num_edge_scalars: size of the invariant edge features (radial basis, flags).
        num_neighbors: typical number of messages a node receives (normalises the sum).
    """

    def __init__(self, irreps_in, irreps_out, irreps_sh, num_edge_scalars: int, radial_hidden: int = 32,
                 num_neighbors: float = 10.0):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.gate = _gate(self.irreps_out)
        self.tp = o3.FullyConnectedTensorProduct(self.irreps_in, irreps_sh, self.gate.irreps_in,
                                                 shared_weights=False)
        self.radial = FullyConnectedNet([num_edge_scalars, radial_hidden, self.tp.weight_numel],
                                        torch.nn.functional.silu)
        self.self_interaction = o3.Linear(self.irreps_in, self.irreps_out)
        self.norm = 1.0 / math.sqrt(num_neighbors)

    def forward(self, h, edge_src, edge_dst, edge_sh, edge_scalars):
        """h [V, irreps_in], edges [E], edge_sh [E, sh], edge_scalars [E, S] -> [V, irreps_out]."""
        messages = self.tp(h[edge_src], edge_sh, self.radial(edge_scalars))  # [E, gate_in]
        agg = scatter(messages, edge_dst, dim=0, dim_size=h.shape[0], reduce="sum") * self.norm  # [V, gate_in]
        return self.self_interaction(h) + self.gate(agg)  # [V, irreps_out]


class DepthwiseConvolution(nn.Module):
    """h_i' = Linear(h_i) + Gate( Linear_out( Σ_j TP_uvu(Linear_in(h_j), Y(r_ij); w(edge scalars)) / √n ) ).

    The tensor product keeps channels separate ("uvu": channel u of h_j times Y, weighted by one radial scalar per
    channel and path); channel mixing happens on nodes, after the edge sum, where it is V instead of E rows.
    Only paths whose output irrep exists in the gate input are built. When the input is scalars only (the first
    atom layer) every path is 0e ⊗ Y_l -> l, i.e. an outer product h_u · w_u · Y_l, computed directly instead of
    through e3nn's general tensor product (same equivariance, a fraction of the cost on the largest edge set).
    Same arguments as ``FullyConnectedConvolution``.
    """

    def __init__(self, irreps_in, irreps_out, irreps_sh, num_edge_scalars: int, radial_hidden: int = 32,
                 num_neighbors: float = 10.0):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        irreps_sh = o3.Irreps(irreps_sh)
        self.gate = _gate(self.irreps_out)
        wanted = {ir for _, ir in self.gate.irreps_in}
        self.linear_in = o3.Linear(self.irreps_in, self.irreps_in)
        self.scalar_input = len(self.irreps_in) == 1 and self.irreps_in[0].ir == o3.Irrep("0e")
        if self.scalar_input:
            mul = self.irreps_in[0].mul
            self.sh_slices = [irreps_sh.slices()[j] for j, (_, ir) in enumerate(irreps_sh) if ir in wanted]
            irreps_mid = o3.Irreps([(mul, ir) for _, ir in irreps_sh if ir in wanted])
            self.tp, weight_numel = None, mul * len(self.sh_slices)
        else:
            irreps_mid, instructions = [], []
            for i, (mul, ir_in) in enumerate(self.irreps_in):
                for j, (_, ir_sh) in enumerate(irreps_sh):
                    for ir_out in ir_in * ir_sh:
                        if ir_out in wanted:
                            instructions.append((i, j, len(irreps_mid), "uvu", True))
                            irreps_mid.append((mul, ir_out))
            self.tp = o3.TensorProduct(self.irreps_in, irreps_sh, o3.Irreps(irreps_mid), instructions,
                                       shared_weights=False, internal_weights=False)
            irreps_mid, weight_numel = self.tp.irreps_out, self.tp.weight_numel
        self.radial = FullyConnectedNet([num_edge_scalars, radial_hidden, weight_numel], torch.nn.functional.silu)
        self.linear_out = o3.Linear(irreps_mid, self.gate.irreps_in)
        self.self_interaction = o3.Linear(self.irreps_in, self.irreps_out)
        self.norm = 1.0 / math.sqrt(num_neighbors)

    def _messages(self, h_src, edge_sh, weights):
        """h_src [E, irreps_in], edge_sh [E, sh], weights [E, weight_numel] -> [E, irreps_mid]."""
        if self.tp is not None:
            return self.tp(h_src, edge_sh, weights)
        e, mul = h_src.shape
        hw = weights.view(e, len(self.sh_slices), mul) * h_src[:, None, :]  # [E, paths, mul]
        return torch.cat([(hw[:, k, :, None] * edge_sh[:, None, sl]).reshape(e, -1)  # [E, mul·(2l+1)]
                          for k, sl in enumerate(self.sh_slices)], -1)

    def forward(self, h, edge_src, edge_dst, edge_sh, edge_scalars):
        """h [V, irreps_in], edges [E], edge_sh [E, sh], edge_scalars [E, S] -> [V, irreps_out]."""
        messages = self._messages(self.linear_in(h)[edge_src], edge_sh, self.radial(edge_scalars))  # [E, mid]
        agg = scatter(messages, edge_dst, dim=0, dim_size=h.shape[0], reduce="sum") * self.norm  # [V, mid]
        return self.self_interaction(h) + self.gate(self.linear_out(agg))  # [V, irreps_out]


CONVOLUTIONS = {"uvu": DepthwiseConvolution, "fctp": FullyConnectedConvolution}


@dataclass
class AssemblyGraph:
    """What does not change while the molecules of a batch move rigidly (built once by ``preprocess``).

    V = B·A atom nodes (padding included; padding and, with ``heavy_atoms_only``, hydrogens have no edges).
    """

    atom_types: torch.Tensor  # [V] long, 0 = padding
    atom_mask: torch.Tensor  # [B, M, P] bool: atoms that take part in message passing
    active_slots: torch.Tensor  # [B, M, Pa] long: slot (0..P-1) of each message-passing atom, compacted
    active_valid: torch.Tensor  # [B, M, Pa] bool: which compacted entries are real
    molecule_radius: torch.Tensor  # [B] largest centroid-to-atom distance of a message-passing atom, Å
    intra_src: torch.Tensor  # [E_intra] flat atom index (messages flow src -> dst)
    intra_dst: torch.Tensor  # [E_intra]
    intra_scalars: torch.Tensor  # [E_intra, num_basis + 1] radial features of the fixed bond lengths + intra flag
    molecule_src: torch.Tensor  # [B·M·(M-1)] complete molecule graph
    molecule_dst: torch.Tensor
    mask: torch.Tensor  # [B, M, P] bool, every real atom (centroids use all of them)


def _complete_graph(num_clusters: int, m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed edges j -> i, i ≠ j, of the complete graph on each cluster's M molecules (flat ids)."""
    ii, jj = torch.meshgrid(torch.arange(m, device=device), torch.arange(m, device=device), indexing="ij")
    off = ii != jj
    base = (torch.arange(num_clusters, device=device) * m)[:, None]
    return (base + jj[off][None]).reshape(-1), (base + ii[off][None]).reshape(-1)


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
        conv: "uvu" (depthwise, default) or "fctp" (fully connected, the previous network).
        heavy_atoms_only: atom-level message passing over non-hydrogen atoms only (hydrogens ride along rigidly).
        atom_num_neighbors, molecule_num_neighbors: normalisation of the message sums at each level.
        central_feature: mark molecule 0 of every cluster (the central molecule of a ``hard`` start) with a learned
            scalar on its atoms and its molecule node: a network that sees only relative vectors cannot otherwise
            tell which molecule has the central role.
    """

    def __init__(self, hidden_irreps: str = "32x0e + 8x1o + 8x1e", num_atom_layers: int = 1,
                 num_molecule_layers: int = 2, intra_cutoff: float = 2.0, inter_cutoff: float = 4.0,
                 molecule_cutoff: float = 20.0, lmax: int = 2, num_basis: int = 10,
                 schedule: BandSchedule | None = None, time_dim: int = 32, conv: str = "uvu",
                 heavy_atoms_only: bool = False, atom_num_neighbors: float = ATOM_NUM_NEIGHBORS,
                 molecule_num_neighbors: float = MOLECULE_NUM_NEIGHBORS, central_feature: bool = False):
        super().__init__()
        if conv not in CONVOLUTIONS:
            raise ValueError(f"conv must be one of {sorted(CONVOLUTIONS)}, got {conv!r}")
        convolution = CONVOLUTIONS[conv]
        self.hidden_irreps = o3.Irreps(hidden_irreps).sort().irreps.simplify()  # scalars first
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        self.intra_cutoff, self.inter_cutoff, self.molecule_cutoff = intra_cutoff, inter_cutoff, molecule_cutoff
        self.num_basis, self.heavy_atoms_only = num_basis, heavy_atoms_only
        num_scalars = self.hidden_irreps.count(o3.Irrep("0e"))
        self.atom_embedding = nn.Embedding(MAX_ATOMIC_NUMBER + 1, num_scalars)
        self.time_embedding = BandTimeEmbedding(time_dim, schedule)
        self.time_to_atoms = nn.Linear(time_dim, num_scalars)
        self.time_to_molecules = nn.Linear(time_dim, num_scalars)
        self.central_feature = central_feature
        if central_feature:  # additive scalars for molecule 0's atoms and molecule node
            self.central_atoms = nn.Parameter(torch.zeros(num_scalars))
            self.central_molecule = nn.Parameter(torch.zeros(num_scalars))
        atom_layers, irreps = [], o3.Irreps(f"{num_scalars}x0e")
        for _ in range(num_atom_layers):
            atom_layers.append(convolution(irreps, self.hidden_irreps, self.irreps_sh, num_basis + 1,
                                           num_neighbors=atom_num_neighbors))
            irreps = self.hidden_irreps
        self.atom_layers = nn.ModuleList(atom_layers)
        # Molecule inputs: pooled atom features + the current chart offset (z_T: 1o, z_R: 1e).
        self.molecule_input = o3.Linear(irreps + CHART_IRREPS, self.hidden_irreps)
        self.molecule_layers = nn.ModuleList([
            convolution(self.hidden_irreps, self.hidden_irreps, self.irreps_sh, num_basis,
                        num_neighbors=molecule_num_neighbors) for _ in range(num_molecule_layers)])
        self.head = o3.Linear(self.hidden_irreps, CHART_IRREPS)

    @torch.no_grad()
    def preprocess(self, atomic_numbers: torch.Tensor, mask: torch.Tensor, body: torch.Tensor) -> AssemblyGraph:
        """The rigid parts of the graph from atomic_numbers [B, M, P], mask [B, M, P], body coordinates
        [B, M, P, 3] (any rigid copy of each molecule: only intra-molecular distances are used)."""
        if atomic_numbers.max() > MAX_ATOMIC_NUMBER or atomic_numbers.min() < 0:
            raise ValueError(f"atomic numbers must be in 1..{MAX_ATOMIC_NUMBER} (0 = padding), got "
                             f"{int(atomic_numbers.min())}..{int(atomic_numbers.max())}")
        b, m, p = mask.shape
        a, device = m * p, mask.device
        active = mask & (atomic_numbers > 1) if self.heavy_atoms_only else mask  # [B, M, P]
        # Intra-molecular edges from the (fixed) bond geometry of each molecule.
        bond = torch.cdist(body, body)  # [B, M, P, P]
        keep = (active[..., :, None] & active[..., None, :] & (bond < self.intra_cutoff)
                & ~torch.eye(p, dtype=torch.bool, device=device))
        cb, cm, ci, cj = keep.nonzero(as_tuple=True)
        length = bond[cb, cm, ci, cj]
        radial = _radial_embedding(length, self.inter_cutoff, self.num_basis)  # [E_intra, num_basis]
        intra_scalars = torch.cat([radial, torch.ones_like(radial[:, :1])], -1)
        # Molecule radius about the all-atom centroid (the centroid the forward pass computes).
        centred = body - masked_centroids(body, mask)[..., None, :]  # [B, M, P, 3]
        radius = (centred.norm(dim=-1) * active).amax(dim=(1, 2))  # [B]
        # Message-passing atoms first in each molecule (stable), so the inter-molecular search skips the rest.
        order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)  # [B, M, P]
        width = max(int(active.sum(-1).max()), 1)
        slots, valid = order[..., :width], torch.gather(active, -1, order[..., :width])
        msrc, mdst = _complete_graph(b, m, device)
        return AssemblyGraph(atomic_numbers.reshape(b * a), active, slots, valid, radius, cb * a + cm * p + cj,
                             cb * a + cm * p + ci, intra_scalars.to(body.dtype), msrc, mdst, mask)

    def _inter_edges(self, positions: torch.Tensor, centroids: torch.Tensor, graph: AssemblyGraph):
        """Atom pairs of different molecules closer than ``inter_cutoff``: (src [E_inter], dst [E_inter]) flat ids.
        Only molecule pairs whose centroids are within reach (cutoff + 2 radii) are searched."""
        b, m, p, _ = positions.shape
        reach = self.inter_cutoff + 2 * graph.molecule_radius[:, None, None]  # [B, 1, 1]
        near = (torch.cdist(centroids, centroids) < reach) & ~torch.eye(m, dtype=torch.bool,
                                                                          device=positions.device)  # [B, M, M]
        kb, ki, kj = near.nonzero(as_tuple=True)  # K molecule pairs
        slots, valid = graph.active_slots, graph.active_valid  # [B, M, Pa]
        active_pos = torch.gather(positions, 2, slots[..., None].expand(-1, -1, -1, 3))  # [B, M, Pa, 3]
        close = torch.cdist(active_pos[kb, ki], active_pos[kb, kj]) < self.inter_cutoff  # [K, Pa, Pa]
        close &= valid[kb, ki][:, :, None] & valid[kb, kj][:, None, :]
        k, ai, aj = close.nonzero(as_tuple=True)
        b_k = kb[k]
        base = b_k * (m * p)
        src = base + kj[k] * p + slots[b_k, kj[k], aj]
        dst = base + ki[k] * p + slots[b_k, ki[k], ai]
        return src, dst  # messages flow j -> i

    def _atom_edges(self, positions: torch.Tensor, centroids: torch.Tensor, graph: AssemblyGraph):
        """Edge list of the current positions [B, M, P, 3]: fixed intra edges + inter edges within the cutoff.
        Returns (src [E], dst [E], sh [E, sh], edge_scalars [E, num_basis + 1])."""
        b, m, p, _ = positions.shape
        inter_src, inter_dst = self._inter_edges(positions, centroids, graph)
        src = torch.cat([graph.intra_src, inter_src])
        dst = torch.cat([graph.intra_dst, inter_dst])
        flat = positions.reshape(b * m * p, 3)
        vec = flat[dst] - flat[src]  # [E, 3]
        n_intra = graph.intra_src.shape[0]
        radial = _radial_embedding(vec[n_intra:].norm(dim=-1), self.inter_cutoff, self.num_basis)
        inter_scalars = torch.cat([radial, torch.zeros_like(radial[:, :1])], -1)
        edge_scalars = torch.cat([graph.intra_scalars.to(positions.dtype), inter_scalars])  # [E, num_basis + 1]
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        return src, dst, sh, edge_scalars

    def forward(self, positions: torch.Tensor, graph: AssemblyGraph, chart: torch.Tensor, t: torch.Tensor):
        """positions [B, M, P, 3], graph from ``preprocess``, chart z_t [B, M, 6], t [B]
        -> (ΔT [B, M, 3], Δω [B, M, 3])."""
        b, m, p, _ = positions.shape
        a, dtype = m * p, positions.dtype
        temb = self.time_embedding(t).to(dtype)  # [B, time_dim]

        centroids = masked_centroids(positions, graph.mask)  # [B, M, 3]

        # ---- atom level
        src, dst, sh, edge_scalars = self._atom_edges(positions, centroids, graph)  # E edges
        h = self.atom_embedding(graph.atom_types).to(dtype)  # [V, scalars]
        h = h + self.time_to_atoms(temb).repeat_interleave(a, 0)  # [V, scalars]
        if self.central_feature:
            is_central = (torch.arange(a, device=h.device) < p).to(dtype).repeat(b)  # [V]: atoms of molecule 0
            h = h + is_central[:, None] * self.central_atoms  # [V, scalars]
        for layer in self.atom_layers:
            h = layer(h, src, dst, sh, edge_scalars)  # [V, hidden]

        # ---- pool to molecules: mean over the atoms that took part
        w = graph.atom_mask.reshape(b * m, p, 1).to(dtype)  # [N, P, 1]
        pooled = (h.reshape(b * m, p, -1) * w).sum(1) / w.sum(1).clamp_min(1)  # [N, hidden]
        hm = self.molecule_input(torch.cat([pooled, chart.reshape(b * m, 6)], -1))  # [N, hidden]
        num_scalars = self.time_to_molecules.out_features
        scalars = hm[:, :num_scalars] + self.time_to_molecules(temb).repeat_interleave(m, 0)  # [N, scalars]
        if self.central_feature:
            is_central = (torch.arange(m, device=h.device) == 0).to(dtype).repeat(b)  # [N]: molecule 0
            scalars = scalars + is_central[:, None] * self.central_molecule
        hm = torch.cat([scalars, hm[:, num_scalars:]], -1)  # [N, hidden]

        # ---- molecule level: complete graph over the M molecules of each cluster
        cflat = centroids.reshape(b * m, 3)
        mvec = cflat[graph.molecule_dst] - cflat[graph.molecule_src]  # [B·M·(M-1), 3]
        msh = o3.spherical_harmonics(self.irreps_sh, mvec, normalize=True, normalization="component")
        mrad = _radial_embedding(mvec.norm(dim=-1), self.molecule_cutoff, self.num_basis)
        for layer in self.molecule_layers:
            hm = layer(hm, graph.molecule_src, graph.molecule_dst, msh, mrad)  # [N, hidden]
        out = self.head(hm).reshape(b, m, 6)  # [B, M, 6]
        return out[..., :3], out[..., 3:]


class AssemblyFlowModel(nn.Module):
    """x1-predicting model on the rigid-body chart, callable by the core ``KFlow``: model(z_t, t, batch=...) -> ẑ¹.

    From z_t it rebuilds the current poses and atoms and asks the network for the remaining chart displacement
    per molecule, ẑ¹ = z_t + (ΔT, Δz_R): ΔT is a vector (1o) in Å and Δz_R a pseudovector (1e) in the scaled
    rotation coordinates (Å). Predicting the displacement in the chart, rather than a relative rotation that is
    then mapped back with log, keeps the output continuous: log jumps where rotation angles cross π.

    ``graph`` (from ``preprocess(batch)``) is what stays fixed along a path; a sampler builds it once and passes
    it to every step, training builds it per batch.
    """

    def __init__(self, network: AssemblyNetwork, condition_on_start: bool = True):
        super().__init__()
        self.network, self.condition_on_start = network, condition_on_start

    def preprocess(self, batch: AssemblyBatch) -> AssemblyGraph:
        return self.network.preprocess(batch.atomic_numbers, batch.mask, batch.body)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, batch: AssemblyBatch,
                graph: AssemblyGraph | None = None) -> torch.Tensor:
        graph = self.preprocess(batch) if graph is None else graph
        trans, rot = poses_from_chart(batch.initial_translations, z_t, batch.rotation_scale)
        positions = atoms_from_poses(trans, rot, batch.body)  # [B, M, P, 3]
        if self.condition_on_start:
            d_trans, d_rot = self.network(positions, graph, z_t, t)
            return z_t + torch.cat([d_trans, d_rot], -1)  # [B, M, 6]
        # A true noise source: the network sees the poses at time t only (no chart offset from the start), and
        # its rotation output is an update of the current orientation, R̂¹ = exp(ω / ℓ) R_t, which depends on the
        # current pose alone; the start enters only through the chart bookkeeping below.
        d_trans, d_rot = self.network(positions, graph, torch.zeros_like(z_t), t)
        scale = batch.rotation_scale[:, None, None]  # [B, 1, 1]
        rot_hat = exp_map(d_rot / scale) @ rot  # [B, M, 3, 3]
        z_rot = unwrap_rotation_vector(log_map(rot_hat), z_t[..., 3:] / scale) * scale  # [B, M, 3]
        return torch.cat([z_t[..., :3] + d_trans, z_rot], -1)  # [B, M, 6]


def unwrap_rotation_vector(omega: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Of the rotation vectors θn and (θ − 2π)n of one rotation ([..., 3], angle θ in [0, π]) the one nearer
    ``reference`` [..., 3]: the chart stays continuous where the principal log jumps (at θ = π)."""
    angle = omega.norm(dim=-1, keepdim=True)
    axis = omega / angle.clamp_min(1e-12)
    other = omega - 2 * math.pi * axis
    nearer = (other - reference).norm(dim=-1, keepdim=True) < (omega - reference).norm(dim=-1, keepdim=True)
    return torch.where(nearer & (angle > 1e-6), other, omega)
