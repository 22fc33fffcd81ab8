"""Start clusters: the seeded noise models that make a start from a crystal cluster (``NoiseModel``, presets
``mild`` / ``hard`` / ``shell`` in ``NOISE_PRESETS``) and the evenly spread shell of sites they use.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from kflow.molecular.so3 import random_rotations

from kflow.molecular.so3 import exp_map


__all__ = ["NoiseModel", "NOISE_PRESETS", "noise_model", "thomson_points"]


# -------------------------------------------------------------------------------------------------- noise model
@dataclass
class NoiseModel:
    """How the start cluster is made from the crystal cluster; seeded, and recorded in each cluster's
    ``info["noise"]``. The original COD-Cluster17 noise is unpublished; the presets (``NOISE_PRESETS``) are
    explicit.

    Every molecule keeps its shape and gets a Haar-random orientation about its centroid (``rotation="haar"``) or
    a random rotation of at most ``max_angle_deg`` (``"bounded"``); the central molecule is rotated too. Its
    centroid is placed by ``placement``:

    - ``"expand"`` (preset ``mild``): the crystal centroid moved away from the cluster centre by the factor
      ``expansion`` and jittered by isotropic Gaussian noise of ``jitter`` Å, so every molecule starts next to its
      target and keeps its index correspondence.
    - ``"random"`` (preset ``hard``): centroids drawn independently of the final cluster, uniformly in a sphere
      around the cluster centre holding the molecules at crystal density (volume = molecules × crystal volume per
      molecule × ``volume_factor``), no two closer than ``min_separation`` × (volume per molecule)^(1/3), and
      numbered by distance from the centre (molecule 0 central, as in the final cluster; with ``central`` it sits
      exactly at the centre and the others are placed around it). Only the molecule and the crystal's density
      are used: the start a user has when just the molecule is known.
    - ``"shell"`` (preset ``shell``): molecule 0 at the centre and the others on Thomson points of a sphere
      (``baselines.thomson_points``) in a Haar-random global orientation, at the mean distance from the centre
      that points uniform in the crystal-density ball have (3/4 of its radius), each site jittered by isotropic
      Gaussian noise of ``jitter`` Å, numbered at random: the data-free evenly spread shell as a source. It uses
      the same information as ``"random"``.
    """

    expansion: float = 1.25
    jitter: float = 0.5
    rotation: str = "haar"  # or "bounded"
    max_angle_deg: float = 180.0
    placement: str = "expand"  # or "random"
    volume_factor: float = 1.0
    min_separation: float = 0.7
    central: bool = False  # "random" placement: molecule 0 exactly at the centre (the role of the crystal's)
    name: str = "custom"  # the preset's name, recorded in the metadata

    def __post_init__(self):
        if self.rotation not in ("haar", "bounded"):
            raise ValueError(f"unknown rotation noise {self.rotation!r}; use 'haar' or 'bounded'")
        if self.placement not in ("expand", "random", "shell"):
            raise ValueError(f"unknown centroid placement {self.placement!r}; use 'expand', 'random' or 'shell'")
        if not (self.volume_factor > 0 and self.min_separation >= 0):
            raise ValueError("volume_factor must be > 0 and min_separation >= 0")

    def apply(self, positions: torch.Tensor, generator: torch.Generator,
              volume_per_molecule: float | None = None) -> torch.Tensor:
        """positions [M, P, 3] (final cluster) -> initial positions [M, P, 3]. ``volume_per_molecule`` (Å³, the
        crystal's cell volume / molecules per cell) sets the density of the "random" placement; without it the
        volume of the sphere enclosing the final centroids per molecule is used."""
        centroids = positions.mean(1)  # [M, 3]
        rot = self._rotations(positions.shape[0], positions.dtype, generator)  # [M, 3, 3]
        if self.placement == "expand":
            new_centroids = self._expanded(centroids, generator)
        elif self.placement == "shell":
            new_centroids = self._shell_placement(centroids, generator, volume_per_molecule)
        else:
            new_centroids = self._random_placement(centroids, generator, volume_per_molecule)
        return torch.einsum("mij,mpj->mpi", rot, positions - centroids[:, None]) + new_centroids[:, None]

    def _rotations(self, m: int, dtype, generator) -> torch.Tensor:
        if self.rotation == "haar":
            return random_rotations(m, dtype=dtype, generator=generator)
        axis = torch.nn.functional.normalize(torch.randn(m, 3, generator=generator, dtype=dtype), dim=-1)
        angle = torch.rand(m, 1, generator=generator, dtype=dtype) * np.deg2rad(self.max_angle_deg)
        return exp_map(axis * angle)

    def _expanded(self, centroids: torch.Tensor, generator) -> torch.Tensor:
        centre = centroids.mean(0)
        jitter = torch.randn(centroids.shape, generator=generator, dtype=centroids.dtype)
        return centre + self.expansion * (centroids - centre) + self.jitter * jitter

    def _ball_radius(self, centroids: torch.Tensor, volume_per_molecule) -> float:
        """Radius of the ball holding the M molecules at crystal density (× ``volume_factor``), Å."""
        m = centroids.shape[0]
        if volume_per_molecule is None:
            volume_per_molecule = 4 / 3 * np.pi * float((centroids - centroids.mean(0)).norm(dim=1).max()) ** 3 / m
        return (3 * m * volume_per_molecule * self.volume_factor / (4 * np.pi)) ** (1 / 3)

    def _shell_placement(self, centroids: torch.Tensor, generator, volume_per_molecule) -> torch.Tensor:
        m, dtype = centroids.shape[0], centroids.dtype
        radius = 0.75 * self._ball_radius(centroids, volume_per_molecule)
        turn = random_rotations(1, dtype=dtype, generator=generator)[0]
        sites = radius * thomson_points(m - 1, dtype=dtype) @ turn.T  # [M - 1, 3]
        sites = sites + self.jitter * torch.randn(sites.shape, generator=generator, dtype=dtype)
        sites = sites[torch.randperm(m - 1, generator=generator)]  # the numbering says nothing
        return torch.cat([torch.zeros(1, 3, dtype=dtype), sites]) + centroids.mean(0)

    def _random_placement(self, centroids: torch.Tensor, generator, volume_per_molecule) -> torch.Tensor:
        m, dtype = centroids.shape[0], centroids.dtype
        centre = centroids.mean(0)
        if volume_per_molecule is None:
            volume_per_molecule = 4 / 3 * np.pi * float((centroids - centre).norm(dim=1).max()) ** 3 / m
        radius = self._ball_radius(centroids, volume_per_molecule)
        min_distance = self.min_separation * volume_per_molecule ** (1 / 3)
        placed = torch.zeros(1 if self.central else 0, 3, dtype=dtype)  # central: molecule 0 at the centre
        for _ in range(len(placed), m):  # sequential random addition: 64 uniform candidates, first far enough
            direction = torch.nn.functional.normalize(torch.randn(64, 3, generator=generator, dtype=dtype), dim=-1)
            candidates = direction * radius * torch.rand(64, 1, generator=generator, dtype=dtype) ** (1 / 3)
            gap = torch.cdist(candidates, placed).amin(1) if len(placed) else torch.full((64,), np.inf, dtype=dtype)
            ok = torch.nonzero(gap >= min_distance)
            pick = int(ok[0]) if len(ok) else int(gap.argmax())  # too crowded: the roomiest candidate
            placed = torch.cat([placed, candidates[pick:pick + 1]])
        placed = placed[torch.argsort(placed.norm(dim=1), stable=True)]  # molecule 0 nearest the centre
        return placed + centre if self.central else placed - placed.mean(0) + centre


NOISE_PRESETS = {
    "mild": NoiseModel(name="mild"),
    # Molecule 0 exactly at the centre: the start has a central molecule with the role of the crystal's (paired
    # with it by the coupling, marked for the network), the same in training, the study and ``kflow assemble``.
    "hard": NoiseModel(placement="random", central=True, name="hard"),
    # The evenly spread shell as a source: the same information as "hard" (molecule + density), less entropy.
    "shell": NoiseModel(placement="shell", central=True, name="shell"),
}


def noise_model(noise: "str | NoiseModel | None" = None) -> NoiseModel:
    """A ``NoiseModel`` from a preset name ("mild", "hard"), a model (returned as is) or None ("mild")."""
    if noise is None:
        return NOISE_PRESETS["mild"]
    if isinstance(noise, NoiseModel):
        return noise
    if noise not in NOISE_PRESETS:
        raise ValueError(f"unknown start preset {noise!r}; choose one of {sorted(NOISE_PRESETS)}")
    return NOISE_PRESETS[noise]


# ------------------------------------------------------------------------------------------------ shell sites

@functools.lru_cache(maxsize=8)
def _thomson_points(n: int, iterations: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64) + 0.5
    polar, azimuth = torch.acos(1 - 2 * k / n), math.pi * (1 + 5 ** 0.5) * k
    x = torch.stack([polar.sin() * azimuth.cos(), polar.sin() * azimuth.sin(), polar.cos()], -1)  # [n, 3]
    eye = torch.eye(n, dtype=torch.bool)
    for _ in range(iterations):
        diff = x[:, None] - x[None]  # [n, n, 3]
        r = diff.norm(dim=-1).masked_fill(eye, math.inf)
        force = (diff / r[..., None] ** 3).sum(1)  # [n, 3] repulsion
        force = force - (force * x).sum(-1, keepdim=True) * x  # tangential part
        x = torch.nn.functional.normalize(x + 0.01 * force, dim=-1)
    return x


def thomson_points(n: int, iterations: int = 200, dtype=torch.float64) -> torch.Tensor:
    """n points [n, 3] on the unit sphere, spread by gradient steps on the Coulomb energy Σ 1/r_ij from a
    Fibonacci spiral (deterministic; computed once per (n, iterations))."""
    return _thomson_points(n, iterations).to(dtype).clone()

