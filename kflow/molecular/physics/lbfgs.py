"""Batched L-BFGS: many independent minimisations advanced together in torch (one autograd call per step for
every candidate still running), as fairchem relaxes many structures at once.

Each problem b has its own parameters x_b [D], curvature memory (s, y pairs) and backtracking (Armijo) line
search; finished problems drop out of the batch, so late steps cost only what is still moving.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["LBFGSResult", "batched_lbfgs"]


@dataclass
class LBFGSResult:
    """x [B, D] the minimisers; energy [B]; steps [B] iterations each ran; converged [B] bool."""

    x: torch.Tensor
    energy: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor


def _value_and_grad(fun, x: torch.Tensor, index: torch.Tensor):
    """fun(x [n, D], index [n]) -> f [n]; returns (f, df/dx) with non-finite values made +inf / 0."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        f = fun(x, index)
        (g,) = torch.autograd.grad(f.sum(), x)
    bad = ~torch.isfinite(f) | ~torch.isfinite(g).all(-1)
    f = torch.where(bad, torch.full_like(f, float("inf")), f.detach())
    g = torch.where(bad[:, None], torch.zeros_like(g), g)
    return f, g


def _direction(g: torch.Tensor, s: torch.Tensor, y: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Two-loop recursion, batched: −H g [B, D] from memories s, y [B, m, D] (newest last) holding ``count``
    valid pairs each (the first m − count slots are zero and contribute nothing)."""
    memory = s.shape[1]
    sy = (s * y).sum(-1)  # [B, m]
    rho = torch.where(sy > 0, 1 / sy.clamp_min(1e-30), torch.zeros_like(sy))
    q = g.clone()
    alpha = torch.zeros_like(sy)
    for i in reversed(range(memory)):
        alpha[:, i] = rho[:, i] * (s[:, i] * q).sum(-1)
        q = q - alpha[:, i, None] * y[:, i]
    yy = (y[:, -1] * y[:, -1]).sum(-1)
    gamma = torch.where((count > 0) & (yy > 0), sy[:, -1] / yy.clamp_min(1e-30), torch.full_like(yy, 1e-2))
    r = gamma[:, None] * q
    for i in range(memory):
        beta = rho[:, i] * (y[:, i] * r).sum(-1)
        r = r + (alpha[:, i] - beta)[:, None] * s[:, i]
    return -r


def batched_lbfgs(fun: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                  max_steps: int = 300, memory: int = 10, max_move: float = 0.5, energy_tol: float = 1e-5,
                  patience: int = 5, grad_tol: float = 1e-3, line_search: int = 8,
                  progress: Callable[[int, int], None] | None = None) -> LBFGSResult:
    """Minimise fun(x [n, D], index [n]) -> [n] for every row of x0 [B, D] independently.

    ``index`` names the rows of the original batch being evaluated (so ``fun`` can look up per-problem data).
    A step moves no coordinate by more than ``max_move``; a problem stops when its largest gradient component
    is below ``grad_tol``, or its energy fell by less than ``energy_tol`` for ``patience`` steps in a row, or
    after ``max_steps``. Returns an ``LBFGSResult``. ``progress(done, total)`` is called after every step."""
    batch, dim = x0.shape
    x = x0.detach().clone()
    index = torch.arange(batch)
    f, g = _value_and_grad(fun, x, index)
    s = torch.zeros(batch, memory, dim, dtype=x.dtype)
    y = torch.zeros_like(s)
    count = torch.zeros(batch, dtype=torch.long)
    steps = torch.zeros(batch, dtype=torch.long)
    stalled = torch.zeros(batch, dtype=torch.long)
    converged = torch.zeros(batch, dtype=torch.bool)
    running = torch.isfinite(f)
    for _ in range(max_steps):
        act = running.nonzero().squeeze(1)
        if len(act) == 0:
            break
        ga, xa, fa = g[act], x[act], f[act]
        d = _direction(ga, s[act], y[act], count[act])
        slope = (ga * d).sum(-1)
        uphill = ~(slope < 0)
        d = torch.where(uphill[:, None], -ga, d)  # curvature memory went bad: steepest descent, memory reset
        slope = torch.where(uphill, -(ga * ga).sum(-1), slope)
        count[act[uphill]] = 0
        s[act[uphill]] = 0
        y[act[uphill]] = 0
        largest = d.abs().amax(-1).clamp_min(1e-30)
        step = torch.clamp(max_move / largest, max=1.0)
        new_x, new_f, new_g = xa.clone(), fa.clone(), ga.clone()
        pending = torch.ones(len(act), dtype=torch.bool)
        for _ in range(line_search):
            p = pending.nonzero().squeeze(1)
            trial = xa[p] + step[p, None] * d[p]
            ft, gt = _value_and_grad(fun, trial, act[p])
            ok = ft <= fa[p] + 1e-4 * step[p] * slope[p]
            hit = p[ok]
            new_x[hit], new_f[hit], new_g[hit] = trial[ok], ft[ok], gt[ok]
            pending[hit] = False
            step[p[~ok]] *= 0.25
            if not pending.any():
                break
        moved = ~pending
        ds, dg = new_x - xa, new_g - ga
        good = moved & ((ds * dg).sum(-1) > 1e-12)
        upd = act[good]
        s[upd] = torch.cat([s[upd, 1:], ds[good, None]], 1)
        y[upd] = torch.cat([y[upd, 1:], dg[good, None]], 1)
        count[upd] = (count[upd] + 1).clamp(max=memory)
        drop = fa - new_f
        x[act], f[act], g[act] = new_x, new_f, new_g
        steps[act] += 1
        stalled[act] = torch.where(moved & (drop > energy_tol), torch.zeros_like(drop, dtype=torch.long),
                                   stalled[act] + 1)
        small = new_g.abs().amax(-1) < grad_tol
        converged[act] = small | (stalled[act] >= patience)
        running[act] = ~converged[act]
        if progress is not None:
            progress(int((~running).sum()), batch)
    return LBFGSResult(x, f, steps, converged)
