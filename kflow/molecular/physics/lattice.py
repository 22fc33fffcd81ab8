"""Periodic lattice energy of a crystal of rigid molecules under MMFF94's intermolecular terms, batched in torch.

A crystal is a cell L [3, 3] (rows: lattice vectors a, b, c) and Z molecules per cell, molecule m at centroid c_m
with orientation Q_m (a 3x3 orthogonal matrix; det −1 is the mirror image), atoms x_ma = c_m + Q_m b_a for the
molecule's centred body coordinates b [P, 3]. The lattice energy per molecule is

    E = 1/(2Z) Σ_{m in cell} Σ_{(n, s) ≠ (m, 0)} E_pair(m, n + s)            (s: lattice translations)

with the pair energy of MMFF94 (``physics.mmff``). Its parts converge differently (docs/MATH.md §9):

* van der Waals is summed over atom pairs closer than ``cutoff``, smoothly switched off over the last
  ``switch_width`` Å (a C² quintic, so energies and forces stay continuous), and the dispersion beyond the switch
  is added analytically (``tail``: the −2ε(1.07R*)⁷/r⁷ limit of the 14-7 term integrated over a uniform density
  of atoms, the standard long-range correction; switching by molecule centres instead left 0.9 kcal/mol beyond
  14 Å for a 37-atom molecule, since r⁻⁷ is steep across a molecule's width).
* The Coulomb buffer correction 332 q q [1/(r + δ) − 1/r] (~δ/r²) is summed over whole molecules whose centres
  are within ``cutoff``, switched by centre distance: neutral groups, so it converges.
* Coulomb 1/r is summed by Ewald: real space erfc(αr)/r over atom pairs closer than ``ewald_cutoff``
  (α = ``EWALD_ACCURACY`` / ewald_cutoff, so the neglected erfc is < 1e-6), reciprocal space over |k| < k_max,
  the self term, and the molecule's own pairs removed exactly (a rigid constant). Neutral molecules, so no
  background term. ``electrostatics="cutoff"`` instead sums plain buffered Coulomb over the switched molecule
  pairs, which is cheaper and converges only conditionally; with ``vdw_switch="molecules"`` the van der Waals
  term is switched by molecule centres too and only molecules within ``cutoff`` are visited (~10x fewer atom
  pairs): the coarse setting of pre-minimisation, never of ranking.

``symmetric=True`` says every molecule of the cell is equivalent by symmetry (one independent molecule, Z′ = 1):
then molecule 0's interactions give the energy per molecule and the other rows are skipped (Z times cheaper).
Every quantity is a differentiable torch function of (cell, centroids, orientations), so forces and stresses
come from autograd; all shapes carry a leading batch axis B of independent crystals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kflow.molecular.physics.mmff import (COULOMB_BUFFER, COULOMB_CONSTANT, VDW_BUFFER_A, VDW_BUFFER_B,
                                          MoleculeForceField)

__all__ = ["LatticeEnergy", "EnergyTerms", "smooth_switch", "cell_volume", "EWALD_ACCURACY"]

EWALD_ACCURACY = 3.6  # α · r_cut: erfc(3.6) = 3.6e-7, the relative size of the dropped real-space terms
MAX_IMAGES = 12  # lattice translations per axis and direction: face spacing down to ~list_cutoff / 11


def smooth_switch(distance: torch.Tensor, cutoff: float, width: float) -> torch.Tensor:
    """1 below cutoff − width, 0 beyond cutoff, C² quintic in between (1 − 10u³ + 15u⁴ − 6u⁵)."""
    u = ((distance - (cutoff - width)) / width).clamp(0.0, 1.0)
    return 1 - u ** 3 * (10 - 15 * u + 6 * u * u)


def cell_volume(cell: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] -> [...] Å³ (absolute determinant)."""
    return torch.linalg.det(cell).abs()


@dataclass
class EnergyTerms:
    """Lattice energy per molecule (kcal/mol) of a batch [B], and its parts."""

    total: torch.Tensor
    vdw: torch.Tensor
    coulomb: torch.Tensor
    tail: torch.Tensor


class LatticeEnergy(torch.nn.Module):
    """E(cell [B, 3, 3], centroids [B, Z, 3], orientations [B, Z, 3, 3]) -> energy per molecule [B] (kcal/mol).

    ``cutoff`` / ``switch_width`` (Å): molecule-centre cutoff of the short-ranged terms; ``ewald_cutoff`` (Å):
    atom-pair cutoff of Ewald's real space (α follows from it); ``tail``: add the dispersion beyond the cutoff."""

    def __init__(self, forcefield: MoleculeForceField, cutoff: float = 14.0, switch_width: float = 2.0,
                 electrostatics: str = "ewald", ewald_cutoff: float = 9.0, tail: bool = True,
                 vdw_switch: str = "atoms", dtype: torch.dtype = torch.float64):
        super().__init__()
        if electrostatics not in ("ewald", "cutoff"):
            raise ValueError(f"electrostatics must be 'ewald' or 'cutoff', not {electrostatics!r}")
        if vdw_switch not in ("atoms", "molecules"):
            raise ValueError(f"vdw_switch must be 'atoms' or 'molecules', not {vdw_switch!r}")
        if not 0 < switch_width < cutoff:
            raise ValueError(f"need 0 < switch_width ({switch_width}) < cutoff ({cutoff})")
        self.ff, self.cutoff, self.switch_width = forcefield, float(cutoff), float(switch_width)
        self.electrostatics, self.vdw_switch = electrostatics, vdw_switch
        self.tail = bool(tail) and vdw_switch == "atoms"  # the tail formula assumes atom-pair switching
        self.ewald_cutoff = float(ewald_cutoff)
        self.alpha = EWALD_ACCURACY / self.ewald_cutoff
        self.k_max = 2 * self.alpha * EWALD_ACCURACY  # exp(−k²/4α²) = exp(−3.6²) at k_max
        as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
        self.register_buffer("body", as_t(forcefield.body))  # [P, 3]
        q = as_t(forcefield.charges)
        self.register_buffer("charges", q)  # [P]
        self.register_buffer("qq", q[:, None] * q[None])  # [P, P]
        self.register_buffer("r_star", as_t(forcefield.r_star))  # [P, P]
        self.register_buffer("epsilon", as_t(forcefield.epsilon))  # [P, P]
        self.radius = forcefield.radius
        # Molecule pairs that can matter: some atom pair within the vdW or Ewald cutoff.
        if vdw_switch == "molecules" and electrostatics == "cutoff":
            self.list_cutoff = self.cutoff  # every term switched by molecule centres: the cheap, coarse setting
        else:
            reach = max(self.cutoff, self.ewald_cutoff if electrostatics == "ewald" else 0.0)
            self.list_cutoff = reach + 2 * self.radius
        # Dispersion tail: E_tail = −½ ρ C ∫ 4π r² (1 − S(r)) r⁻⁷ dr, C = Σ_ab 2 ε_ab (1.07 R*_ab)⁷ (long-range limit).
        self.c7 = float((2 * forcefield.epsilon * (1 + VDW_BUFFER_A) ** 7 * forcefield.r_star ** 7).sum())
        r = np.linspace(self.cutoff - self.switch_width, self.cutoff, 2001)
        s = smooth_switch(torch.as_tensor(r), self.cutoff, self.switch_width).numpy()
        inner = np.trapezoid((1 - s) * 4 * np.pi * r ** -5, r) if hasattr(np, "trapezoid") else \
            np.trapz((1 - s) * 4 * np.pi * r ** -5, r)
        self.tail_integral = float(inner + np.pi / self.cutoff ** 4)  # ∫_rc^∞ 4π r⁻⁵ dr = π / rc⁴
        d = torch.cdist(self.body, self.body)
        off = ~torch.eye(len(q), dtype=torch.bool)
        # Ewald constants per molecule: self term and the molecule's own pairs (erf part), rigid.
        intra = (self.qq * torch.erf(self.alpha * d) / torch.where(off, d, torch.ones_like(d)))[off].sum() / 2
        self.ewald_constant = float(-self.alpha / math.sqrt(math.pi) * (q * q).sum() - intra) * COULOMB_CONSTANT

    # ------------------------------------------------------------------------------------------ atoms and images
    def atoms(self, centroids: torch.Tensor, orientations: torch.Tensor) -> torch.Tensor:
        """[B, Z, 3], [B, Z, 3, 3] -> atom positions [B, Z, P, 3]."""
        return centroids[:, :, None] + torch.einsum("bzij,pj->bzpi", orientations, self.body)

    def image_shifts(self, cell: torch.Tensor) -> torch.Tensor:
        """Integer lattice translations [S, 3] that reach every molecule whose centre is within ``list_cutoff`` of
        a centre in the cell (centroids are wrapped into the cell first): n_i = ⌈r / width_i⌉ + 1 per axis."""
        inverse = torch.linalg.inv(cell.detach())  # [B, 3, 3], columns: reciprocal vectors / 2π
        widths = 1 / inverse.norm(dim=1)  # [B, 3] distance between opposite faces
        reach = torch.ceil(self.list_cutoff / widths.min(0).values).long() + 1  # [3]
        if int(reach.max()) > MAX_IMAGES:
            raise ValueError(f"a cell is too thin for the cutoff (face spacing {float(widths.min()):.2f} Å)")
        axes = [torch.arange(-int(n), int(n) + 1) for n in reach]
        return torch.cartesian_prod(*axes).to(cell.dtype)  # [S, 3]

    def neighbours(self, cell, centroids, rows: int):
        """Molecule pairs within ``list_cutoff``: (row index [B, R, K], molecule index [B, R, K], shift [B, R, K, 3]
        Å, centre distance [B, R, K], mask [B, R, K]). K is the most neighbours any row has; padded entries
        are masked. The pair list is rebuilt at every call (cheap next to the atom pairs) and padded, so the
        energy is a smooth function of its inputs wherever the switch is."""
        batch, count = centroids.shape[:2]
        frac = torch.einsum("bzi,bij->bzj", centroids, torch.linalg.inv(cell))
        wrap = torch.floor(frac.detach())  # a lattice translation per molecule: centroids into [0, 1)
        wrapped = centroids - torch.einsum("bzi,bij->bzj", wrap, cell)
        shifts = self.image_shifts(cell)  # [S, 3]
        shift_cart = torch.einsum("si,bij->bsj", shifts, cell)  # [B, S, 3]
        # [B, R, Z, S, 3]: from row molecule r to molecule n in image s
        delta = (wrapped[:, None, :, None] + shift_cart[:, None, None]) - wrapped[:, :rows, None, None]
        dist = delta.detach().norm(dim=-1)  # [B, R, Z, S]
        is_self = (torch.arange(rows)[:, None] == torch.arange(count)[None])[None, :, :, None] & (dist < 1e-9)
        inside = (dist < self.list_cutoff) & ~is_self
        flat = inside.reshape(batch, rows, -1)
        k = max(int(flat.sum(-1).max()), 1)
        order = torch.where(flat, dist.reshape(batch, rows, -1), torch.full_like(flat, float("inf"), dtype=dist.dtype))
        keep = order.topk(k, dim=-1, largest=False).indices  # [B, R, K]
        mask = torch.gather(flat, 2, keep)
        molecule = keep // shifts.shape[0]
        image = keep % shifts.shape[0]
        # translation that takes molecule n (unwrapped coordinates) to its neighbouring image
        wrap_n = torch.gather(wrap[:, None].expand(batch, rows, count, 3), 2, molecule[..., None].expand(-1, -1, -1, 3))
        wrap_r = wrap[:, :rows, None]
        lattice = shifts[image] - wrap_n + wrap_r  # [B, R, K, 3] integer
        offset = torch.einsum("brki,bij->brkj", lattice, cell)
        centre = torch.gather(centroids[:, None].expand(batch, rows, count, 3), 2,
                              molecule[..., None].expand(-1, -1, -1, 3)) + offset - centroids[:, :rows, None]
        return molecule, offset, centre.norm(dim=-1), mask

    # ------------------------------------------------------------------------------------------------ terms
    def vdw_pairs(self, r: torch.Tensor, rs: torch.Tensor | None = None, eps: torch.Tensor | None = None):
        """Buffered 14-7 energy (kcal/mol) of atom pairs at distances r [..., P, P], or of any pairs given their
        R* and ε (same shape as r)."""
        rs = self.r_star if rs is None else rs
        eps = self.epsilon if eps is None else eps
        rep = ((1 + VDW_BUFFER_A) * rs / (r + VDW_BUFFER_A * rs)) ** 7
        rs7 = rs ** 7
        return eps * rep * ((1 + VDW_BUFFER_B) * rs7 / (r ** 7 + VDW_BUFFER_B * rs7) - 2)

    def reciprocal(self, cell: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
        """Ewald reciprocal-space energy of the whole cell [B] (e²/Å; × COULOMB_CONSTANT for kcal/mol).

        (4π/V) Σ_{k in a half space, 0 < |k| < k_max} exp(−k²/4α²)/k² |S(k)|², S(k) = Σ_j q_j exp(i k·x_j)."""
        batch = cell.shape[0]
        lengths = cell.detach().norm(dim=-1).max(0).values  # [3]
        reach = torch.ceil(self.k_max * lengths / (2 * math.pi)).long()
        axes = [torch.arange(-int(n), int(n) + 1) for n in reach]
        h = torch.cartesian_prod(*axes)
        half = (h[:, 0] > 0) | ((h[:, 0] == 0) & (h[:, 1] > 0)) | ((h[:, 0] == 0) & (h[:, 1] == 0) & (h[:, 2] > 0))
        h = h[half].to(cell.dtype)  # [H, 3]
        recip = 2 * math.pi * torch.linalg.inv(cell).transpose(1, 2)  # [B, 3, 3] rows: reciprocal vectors
        k = torch.einsum("hi,bij->bhj", h, recip)  # [B, H, 3]
        k2 = (k * k).sum(-1)
        weight = torch.where(k2 < self.k_max ** 2, torch.exp(-k2 / (4 * self.alpha ** 2)) / k2, torch.zeros_like(k2))
        x = atoms.reshape(batch, -1, 3)  # [B, N, 3]
        q = self.charges.repeat(atoms.shape[1])  # [N]
        phase = torch.einsum("bhi,bni->bhn", k, x)  # [B, H, N]
        s_re = (q * torch.cos(phase)).sum(-1)
        s_im = (q * torch.sin(phase)).sum(-1)
        return 4 * math.pi / cell_volume(cell) * (weight * (s_re ** 2 + s_im ** 2)).sum(-1)

    def terms(self, cell: torch.Tensor, centroids: torch.Tensor, orientations: torch.Tensor,
              symmetric: bool = False) -> EnergyTerms:
        count = centroids.shape[1]
        rows = 1 if symmetric else count
        atoms = self.atoms(centroids, orientations)  # [B, Z, P, 3]
        molecule, offset, centre, mask = self.neighbours(cell, centroids, rows)  # [B, R, K] each (offset [.., 3])
        if self.vdw_switch == "atoms":
            vdw, coulomb = self._atom_pair_terms(atoms, molecule, offset, centre, mask, rows)
        else:
            vdw, coulomb = self._molecule_pair_terms(atoms, molecule, offset, centre, mask, rows)
        if self.electrostatics == "ewald":
            coulomb = coulomb + COULOMB_CONSTANT * self.reciprocal(cell, atoms) / count + self.ewald_constant
        density = count / cell_volume(cell)
        tail = -0.5 * density * self.c7 * self.tail_integral if self.tail else torch.zeros_like(vdw)
        return EnergyTerms(vdw + coulomb + tail, vdw, coulomb, tail)

    def _partners(self, atoms, molecule, offset, rows):
        """Row atoms [B, R, P, 3] and their neighbours' atoms [B, R, K, P, 3] (images placed)."""
        batch, count, size = atoms.shape[:3]
        partner = torch.gather(atoms[:, None].expand(batch, rows, count, size, 3), 2,
                               molecule[..., None, None].expand(-1, -1, -1, size, 3)) + offset[..., None, :]
        return atoms[:, :rows], partner

    def _molecule_pair_terms(self, atoms, molecule, offset, centre, mask, rows):
        """Coarse setting: every atom pair of the listed molecule pairs, weighted by the molecule-centre switch."""
        row_atoms, partner = self._partners(atoms, molecule, offset, rows)
        diff = row_atoms[:, :, None, :, None] - partner[:, :, :, None]  # [B, R, K, P, P, 3]
        r = (diff.square().sum(-1) + 1e-12).sqrt()  # [B, R, K, P, P]
        switch = smooth_switch(centre, self.cutoff, self.switch_width) * mask  # [B, R, K]
        vdw = (self.vdw_pairs(r).sum((-1, -2)) * switch).sum((1, 2)) / (2 * rows)
        buffered = (self.qq / (r + COULOMB_BUFFER)).sum((-1, -2))
        if self.electrostatics == "cutoff":
            return vdw, COULOMB_CONSTANT * (buffered * switch).sum((1, 2)) / (2 * rows)
        real = (self.qq * torch.erfc(self.alpha * r) / r * (r < self.ewald_cutoff)).sum((-1, -2)) * mask
        correction = (buffered - (self.qq / r).sum((-1, -2))) * switch
        return vdw, COULOMB_CONSTANT * (correction + real).sum((1, 2)) / (2 * rows)

    def _atom_pair_terms(self, atoms, molecule, offset, centre, mask, rows):
        """Converged setting: only the atom pairs that can contribute are evaluated (found without autograd, then
        gathered): pairs closer than the cutoffs, and every pair of molecules whose centres are within ``cutoff``
        (the buffer correction is summed over whole, neutral molecules: truncated by atom pairs it wobbled by
        0.2 kcal/mol between cutoffs)."""
        batch = atoms.shape[0]
        reach = max(self.cutoff, self.ewald_cutoff if self.electrostatics == "ewald" else 0.0)
        with torch.no_grad():
            row_atoms, partner = (t.float() for t in self._partners(atoms, molecule, offset, rows))
            # |x − y|² = |x|² + |y|² − 2 x·y as one batched matmul (float32; the margin covers its rounding)
            r2 = ((row_atoms * row_atoms).sum(-1)[:, :, None, :, None] + (partner * partner).sum(-1)[:, :, :, None]
                  - 2 * torch.einsum("brpi,brkqi->brkpq", row_atoms, partner))  # [B, R, K, P, P]
            near = (centre < self.cutoff)[..., None, None]
            b, row, k, i, j = (((r2 < (reach + 0.01) ** 2) | near) & mask[..., None, None]).nonzero(as_tuple=True)
        x_i = atoms[b, row, i]  # [N, 3], N atom pairs in the whole batch
        x_j = atoms[b, molecule[b, row, k], j] + offset[b, row, k]
        r = ((x_i - x_j).square().sum(-1) + 1e-12).sqrt()  # [N]
        switch = smooth_switch(r, self.cutoff, self.switch_width)
        qq = self.qq[i, j]
        pair_vdw = self.vdw_pairs(r, self.r_star[i, j], self.epsilon[i, j]) * switch
        by_centre = smooth_switch(centre[b, row, k], self.cutoff, self.switch_width)
        if self.electrostatics == "cutoff":  # whole molecules, as in the coarse setting
            pair_coulomb = qq / (r + COULOMB_BUFFER) * by_centre
        else:  # the buffer's short-ranged correction by whole molecules, plus Ewald's real space
            pair_coulomb = qq * ((1 / (r + COULOMB_BUFFER) - 1 / r) * by_centre
                                 + torch.erfc(self.alpha * r) / r * (r < self.ewald_cutoff))
        zero = torch.zeros(batch, dtype=atoms.dtype)
        vdw = zero.index_add(0, b, pair_vdw) / (2 * rows)
        coulomb = COULOMB_CONSTANT * zero.index_add(0, b, pair_coulomb) / (2 * rows)
        return vdw, coulomb

    def forward(self, cell: torch.Tensor, centroids: torch.Tensor, orientations: torch.Tensor,
                symmetric: bool = False) -> torch.Tensor:
        return self.terms(cell, centroids, orientations, symmetric).total
