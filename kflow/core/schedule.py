"""Band schedules: when each band travels from source to data along t ∈ [0, 1].

Band b is active on a window [a_b, c_b]; its progress is s_b(t) = ρ(clip((t − a_b) / (c_b − a_b), 0, 1)) with a
ramp ρ(0) = 0, ρ(1) = 1. The vector S(t) = (s_b(t))_b multiplies the coefficients of band b in the interpolant
(docs/MATH.md §2).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["BandSchedule", "RAMPS", "ORDERS"]

ORDERS = ("low_to_high", "high_to_low")  # band 0 (coarsest) first, or the reverse


def _linear(u):
    return u, torch.ones_like(u)


def _smooth(u):  # 3u² − 2u³: zero slope at both ends, so bands start and stop gently
    return u * u * (3 - 2 * u), 6 * u * (1 - u)


def _cosine(u):
    return 0.5 * (1 - torch.cos(math.pi * u)), 0.5 * math.pi * torch.sin(math.pi * u)


RAMPS = {"linear": _linear, "smooth": _smooth, "cosine": _cosine}


def _merge_close(points: torch.Tensor, tol: float = 1e-12) -> torch.Tensor:
    """Sorted unique points, dropping any within ``tol`` of its predecessor (exact edge values are kept)."""
    pts = torch.unique(points)
    keep = torch.ones_like(pts, dtype=torch.bool)
    keep[1:] = (pts[1:] - pts[:-1]) > tol
    return pts[keep]


class BandSchedule:
    """Per-band activation windows and ramp.

    Args:
        num_bands: K.
        ramp: "linear" (constant speed inside a window), "smooth" (3u² − 2u³) or "cosine".
        order: "low_to_high" (default; band 0 first, as in the paper) or "high_to_low" (reversed direction).
        windows: explicit [(a_b, c_b)] per band, used as given (``order`` then only records intent).
            Default: K consecutive equal windows in the travel order.
        overlap: fraction in [0, 1) by which consecutive default windows overlap (0 = disjoint, sequential).
        weights: optional positive per-band weights; default windows are then sized proportionally (e.g. by band
            energy or by how hard a band is to learn). Ignored when ``windows`` is given.

    ``s(t)`` and ``ds(t)`` map t of shape [B] (or a float) to [B, K]. A window is half-open [a, c) for the
    derivative (so at a shared edge exactly one band moves), except a window ending at 1, which includes t = 1.
    """

    def __init__(self, num_bands: int, ramp: str = "linear", order: str = "low_to_high",
                 windows: Sequence[Sequence[float]] | None = None, overlap: float = 0.0,
                 weights: Sequence[float] | None = None):
        if num_bands < 1:
            raise ValueError(f"num_bands must be >= 1, got {num_bands}")
        if ramp not in RAMPS:
            raise ValueError(f"unknown ramp {ramp!r}; choose from {sorted(RAMPS)}")
        if order not in ORDERS:
            raise ValueError(f"order must be 'low_to_high' or 'high_to_low', got {order!r}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.num_bands, self.ramp, self.order, self.overlap = int(num_bands), ramp, order, float(overlap)
        if windows is None:
            w = torch.ones(num_bands, dtype=torch.float64) if weights is None else torch.as_tensor(
                weights, dtype=torch.float64)
            if w.numel() != num_bands or (w <= 0).any():
                raise ValueError(f"weights must be {num_bands} positive numbers, got {weights}")
            if order == "high_to_low":
                w = w.flip(0)
            # Windows in travel order; each starts (1 − overlap) of the previous width after the previous start.
            widths = w / (w[:-1].sum() * (1 - overlap) + w[-1])
            starts = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(widths[:-1] * (1 - overlap), 0)])
            ends = (starts + widths).clamp(max=1.0)
            ends[-1] = 1.0
            if order == "high_to_low":
                starts, ends = starts.flip(0), ends.flip(0)
        else:
            win = torch.as_tensor(windows, dtype=torch.float64)
            if win.shape != (num_bands, 2):
                raise ValueError(f"windows must be {num_bands} pairs (a, c), got shape {tuple(win.shape)}")
            starts, ends = win[:, 0].clone(), win[:, 1].clone()
            if (starts < 0).any() or (ends > 1).any() or (ends <= starts).any():
                raise ValueError(f"each window needs 0 <= a < c <= 1, got {win.tolist()}")
        self.starts, self.ends = starts, ends  # [K] float64

    def __repr__(self):
        wins = ", ".join(f"[{a:.3g}, {c:.3g}]" for a, c in zip(self.starts.tolist(), self.ends.tolist()))
        return f"BandSchedule(num_bands={self.num_bands}, ramp={self.ramp!r}, order={self.order!r}, windows=({wins}))"

    def _u(self, t):
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        t = t.reshape(-1, 1)  # [B, 1]
        a = self.starts.to(device=t.device, dtype=t.dtype)
        c = self.ends.to(device=t.device, dtype=t.dtype)
        return t, a, c, ((t - a) / (c - a)).clamp(0, 1)

    def s(self, t) -> torch.Tensor:
        """Progress of every band, [B] -> [B, K], values in [0, 1]."""
        _, _, _, u = self._u(t)
        return RAMPS[self.ramp](u)[0]

    def ds(self, t) -> torch.Tensor:
        """Time derivative of ``s``, [B] -> [B, K]."""
        t, a, c, u = self._u(t)
        active = (t >= a) & ((t < c) | ((c >= 1) & (t <= c)))
        return torch.where(active, RAMPS[self.ramp](u)[1] / (c - a), torch.zeros_like(u))

    def edges(self) -> torch.Tensor:
        """Sorted unique window edges including 0 and 1, float64: the points where the active set changes."""
        pts = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), self.starts, self.ends])
        return _merge_close(pts)

    def time_grid(self, steps: int | None = None, steps_per_band: Sequence[int] | None = None,
                  dtype=torch.float64) -> torch.Tensor:
        """Integration grid from 0 to 1 whose points include every window edge, so no step straddles a change of
        the active bands.

        With ``steps``: exactly ``steps`` intervals, shared among the segments between edges in proportion to their
        length (at least one each). With ``steps_per_band``: ``steps_per_band[b]`` uniform steps inside band b's
        window (with overlapping windows the grids are merged).
        """
        edges = self.edges()
        if steps_per_band is None:
            if steps is None or int(steps) < 1:
                raise ValueError(f"steps must be a positive int, got {steps}")
            lengths = edges[1:] - edges[:-1]
            if steps < lengths.numel():
                raise ValueError(f"steps={steps} is fewer than the {lengths.numel()} segments between band edges")
            # Largest-remainder allocation with at least one step per segment.
            extra = steps - lengths.numel()
            quota = lengths / lengths.sum() * extra
            alloc = quota.floor().long() + 1
            remainder = extra - int((alloc - 1).sum())
            alloc[torch.argsort(quota - quota.floor(), descending=True)[:remainder]] += 1
            pieces = [torch.linspace(float(a), float(c), int(n) + 1, dtype=torch.float64)[:-1]
                      for a, c, n in zip(edges[:-1], edges[1:], alloc)]
            return torch.cat(pieces + [edges[-1:]]).to(dtype)
        if len(steps_per_band) != self.num_bands or min(steps_per_band) < 1:
            raise ValueError(f"steps_per_band needs {self.num_bands} positive ints, got {list(steps_per_band)}")
        points = [edges]
        for b, n in enumerate(steps_per_band):
            points.append(torch.linspace(float(self.starts[b]), float(self.ends[b]), int(n) + 1, dtype=torch.float64))
        return _merge_close(torch.cat(points)).to(dtype)

    def state_dict(self) -> dict:
        return {"num_bands": self.num_bands, "ramp": self.ramp, "order": self.order,
                "windows": torch.stack([self.starts, self.ends], 1).tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "BandSchedule":
        sched = cls(state["num_bands"], state["ramp"], state["order"], windows=state["windows"])
        return sched
