"""K-Flow: conditional flow matching along the K-amplitude (docs/MATH.md §1, paper eq. 10–12).

    x_t = F⁻¹( S(t) ⊙ F x1 + (1 − S(t)) ⊙ F x0 ) = x0 + F⁻¹( S(t) ⊙ F(x1 − x0) )
    u_t = F⁻¹( S′(t) ⊙ F(x1 − x0) )

Bands not reached yet still hold the source ("noise padding"), finished bands hold the data, and the velocity
is non-zero only in the active band(s). With one band, the identity decomposition and a linear ramp this is
exactly rectified flow: x_t = (1 − t) x0 + t x1, u_t = x1 − x0.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from kflow.core.decompositions import Decomposition, IdentityDecomposition
from kflow.core.schedule import BandSchedule

__all__ = ["KFlow", "SAMPLING_METHODS", "PREDICTIONS"]

SAMPLING_METHODS = ("euler", "heun", "band", "dopri5")  # the integrators of ``KFlow.sample`` (scripts' choices)
PREDICTIONS = ("velocity", "x1")  # what a model may output: the velocity, or the endpoint x1
ADAPTIVE_X1_TAIL = 1e-2  # dopri5 with x1-prediction: share of each piece finished by one band step (stiff end)
Model = Callable[..., torch.Tensor]


class KFlow:
    """The K-Flow interpolant, target velocity, training loss and samplers for one decomposition.

    Args:
        decomposition: a ``Decomposition`` acting on the trailing dims of the data.
        schedule: a ``BandSchedule`` with the same number of bands.
        prediction: what the model outputs by default: "velocity" (v_θ ≈ u_t) or "x1" (x̂1 ≈ x1, from which the
            velocity at the current state follows: ``velocity_from_x1``).

    All methods take x0, x1 of shape [B, ...] and t of shape [B] (or a float).
    """

    def __init__(self, decomposition: Decomposition, schedule: BandSchedule | None = None,
                 prediction: str = "velocity"):
        schedule = schedule if schedule is not None else BandSchedule(decomposition.num_bands)
        if schedule.num_bands != decomposition.num_bands:
            raise ValueError(f"schedule has {schedule.num_bands} bands but the decomposition has "
                             f"{decomposition.num_bands}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.decomposition, self.schedule, self.prediction = decomposition, schedule, prediction

    @classmethod
    def rectified(cls, shape: Sequence[int], prediction: str = "velocity") -> "KFlow":
        """Plain rectified flow matching (the baseline): one band, identity decomposition, linear ramp."""
        return cls(IdentityDecomposition(shape), BandSchedule(1), prediction)

    # ------------------------------------------------------------------ schedule in coefficient space
    def _per_coeff(self, s: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """[B, K] band values -> [B, 1, ..., 1, *band_index.shape], broadcastable against ``coeffs``."""
        band = self.decomposition.band_index.to(s.device)
        per = s[:, band]  # [B, *band_shape]
        extra = coeffs.dim() - 1 - band.dim()
        if extra < 0:
            raise ValueError(f"coefficients of shape {tuple(coeffs.shape)} have fewer dims than [B, "
                             f"*{tuple(band.shape)}]")
        return per.reshape(per.shape[0], *([1] * extra), *band.shape).to(coeffs.dtype)

    def _times(self, t, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or of shape [{x.shape[0]}], got {tuple(t.shape)}")
        return t

    def _check_pair(self, x0, x1):
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")

    # ------------------------------------------------------------------ interpolant
    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        """x_t (eq. 10), [B, ...]."""
        self._check_pair(x0, x1)
        t = self._times(t, x0)
        d = self.decomposition(x1 - x0)
        return x0 + self.decomposition.inverse(self._per_coeff(self.schedule.s(t), d) * d)

    def target_velocity(self, x0: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        """u_t = d x_t / dt (eq. 11), [B, ...]."""
        self._check_pair(x0, x1)
        t = self._times(t, x0)
        d = self.decomposition(x1 - x0)
        return self.decomposition.inverse(self._per_coeff(self.schedule.ds(t), d) * d)

    def interpolate_and_velocity(self, x0: torch.Tensor, x1: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, u_t) sharing one forward transform."""
        self._check_pair(x0, x1)
        t = self._times(t, x0)
        d = self.decomposition(x1 - x0)
        s, ds = self.schedule.s(t), self.schedule.ds(t)
        inv = self.decomposition.inverse
        return x0 + inv(self._per_coeff(s, d) * d), inv(self._per_coeff(ds, d) * d)

    # ------------------------------------------------------------------ training
    def sample_time(self, batch_size: int, device=None, dtype=None, generator: torch.Generator | None = None):
        """t ~ U(0, 1), [B]. Equal windows give every band the same share of training time."""
        return torch.rand(batch_size, device=device, dtype=dtype, generator=generator)

    def loss(self, model: Model, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | None = None,
             prediction: str | None = None, band_weights: Sequence[float] | torch.Tensor | None = None,
             model_kwargs: dict | None = None, reduction: str = "mean",
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Conditional K-Flow matching loss (eq. 12, Algorithm 1).

        prediction="velocity": ‖v_θ(x_t, t) − u_t‖².
        prediction="x1": ‖x̂1_θ(x_t, t) − x1‖². Regressing the endpoint (rather than the implied velocity, which
            vanishes outside the active band) keeps a useful signal at every t.
        band_weights: optional [K] weights applied per coefficient band (the error is measured in coefficient
            space, which equals the data-space error for an orthonormal F when all weights are 1).
        reduction: "mean" (scalar; mean over all elements) or "none" (per-sample mean, [B]).
        """
        self._check_pair(x0, x1)
        prediction = prediction or self.prediction
        t = self.sample_time(x0.shape[0], x0.device, x0.dtype, generator) if t is None else self._times(t, x0)
        x_t, u_t = self.interpolate_and_velocity(x0, x1, t)
        out = model(x_t, t, **(model_kwargs or {}))
        if out.shape != x0.shape:
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {tuple(x0.shape)}")
        err = out - (u_t if prediction == "velocity" else x1)
        if band_weights is not None:
            w = torch.as_tensor(band_weights, dtype=err.dtype, device=err.device)
            if w.shape != (self.decomposition.num_bands,):
                raise ValueError(f"band_weights must have {self.decomposition.num_bands} entries")
            ce = self.decomposition(err)
            sq = ce.pow(2) * self._per_coeff(w.expand(err.shape[0], -1), ce)
        else:
            sq = err.pow(2)
        per_sample = sq.reshape(sq.shape[0], -1).mean(1)
        if reduction == "none":
            return per_sample
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        return per_sample.mean()

    # ------------------------------------------------------------------ sampling
    def velocity_from_x1(self, x: torch.Tensor, x1_hat: torch.Tensor, t) -> torch.Tensor:
        """The velocity that a predicted endpoint x̂1 implies at the current state x_t (docs/MATH.md, "Sampling an
        x1-prediction").

        On the path of eq. 10 every coefficient satisfies F x_t = F x0 + S(t) ⊙ F(x1 − x0), so the source implied by
        (x_t, x̂1) is F x̂0 = (F x_t − S F x̂1) / (1 − S), and eq. 11 with x̂0, x̂1 gives

            v = F⁻¹( S′(t) / (1 − S(t)) ⊙ F(x̂1 − x_t) ).

        For flow matching (one band, linear ramp) this is the familiar (x̂1 − x_t) / (1 − t). Using the trajectory's
        own starting point instead of x̂0 would make Euler return the time-average of the predictions. Bands that
        do not move (S′ = 0: finished or not reached) get no velocity, whatever S is.
        """
        t = self._times(t, x)
        d = self.decomposition(x1_hat - x)
        return self.decomposition.inverse(self._per_coeff(self._rate(t), d) * d)

    def _rate(self, t: torch.Tensor) -> torch.Tensor:
        """S′(t) / (1 − S(t)) per band, [B, K]: 0 where a band does not move; 1 − S is floored at machine
        precision (at a band's very end S′ is the left limit and 1 − S rounds to 0)."""
        s, ds = self.schedule.s(t), self.schedule.ds(t)
        tiny = torch.finfo(s.dtype).eps
        return torch.where(ds > 0, ds / (1 - s).clamp_min(tiny), torch.zeros_like(ds))

    def velocity(self, model: Model, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor | None = None,
                 prediction: str | None = None, model_kwargs: dict | None = None) -> torch.Tensor:
        """The model's velocity at (x, t). An x1-prediction x̂1 is converted by ``velocity_from_x1`` (from the
        current state, not from the trajectory's start: ``x0`` is accepted for backward compatibility and
        ignored)."""
        out = model(x, t, **(model_kwargs or {}))
        if (prediction or self.prediction) == "velocity":
            return out
        return self.velocity_from_x1(x, out, t)

    @torch.no_grad()
    def sample(self, model: Model, x0: torch.Tensor, steps: int = 50, method: str = "euler",
               prediction: str | None = None, steps_per_band: Sequence[int] | None = None,
               model_kwargs: dict | None = None, time_grid: torch.Tensor | None = None,
               return_trajectory: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
               progress: bool = False):
        """Integrate dx/dt = v_θ(x, t) from t=0 (x = x0) to t=1.

        method:
            "euler", "heun": fixed steps on ``time_grid`` (default: ``steps`` uniform steps, or ``steps_per_band``
                steps inside each band's window). Heun costs two model calls per step.
            "band": the band-aware step x_{t+h} = x_t + F⁻¹((S(t+h) − S(t)) / (1 − S(t)) ⊙ F(x̂1 − x_t)), which
                follows the path through x_t towards x̂1 exactly for a constant x̂1 (a band's last step lands on
                x̂1). With prediction="x1" x̂1 is the model output; a velocity model's step is the same path read
                from v: F(x̂1 − x_t) / (1 − S) = F v / S′(t) on the active bands (a band starting with zero slope
                is read at the step's midpoint; bands that do not move fall back to an Euler step). Exact for the
                conditional velocity of one pair.
                With a velocity model and linear ramps it is the Euler update (each step of the edge-aligned
                grid stays inside one linear piece of every ramp); it differs for x1 prediction or curved ramps.
            "dopri5": adaptive Runge–Kutta (torchdiffeq) with tolerances ``rtol``/``atol``, integrated piecewise
                between window edges because S′ is discontinuous there for a linear ramp.
        Returns the final state [B, ...], or (final, trajectory [T+1, B, ...]) with ``return_trajectory``
        (for dopri5 the trajectory holds the states at ``time_grid``).
        """
        if method not in SAMPLING_METHODS:
            raise ValueError(f"unknown sampling method {method!r}; choose from {SAMPLING_METHODS}")
        prediction = prediction or self.prediction
        kwargs = model_kwargs or {}
        grid = time_grid if time_grid is not None else self.schedule.time_grid(steps, steps_per_band)
        grid = grid.to(device=x0.device, dtype=x0.dtype)
        if method == "dopri5":
            return self._sample_adaptive(model, x0, grid, prediction, kwargs, return_trajectory, rtol, atol)

        batch = x0.shape[0]
        x = x0
        traj = [x0] if return_trajectory else None
        intervals = range(grid.numel() - 1)
        if progress:
            from tqdm.auto import tqdm

            intervals = tqdm(intervals, desc=f"sampling ({method})", leave=False)
        for i in intervals:
            t, t_next = grid[i].expand(batch), grid[i + 1].expand(batch)
            h = grid[i + 1] - grid[i]
            if method == "euler":
                x = x + h * self.velocity(model, x, t, None, prediction, kwargs)
            elif method == "heun":
                x = self._heun_step(model, x, t, t_next, h, prediction, kwargs)
            else:
                x = self._band_step(model, x, t, t_next, h, prediction, kwargs)
            if traj is not None:
                traj.append(x)
        return (x, torch.stack(traj)) if return_trajectory else x

    def _heun_step(self, model, x, t, t_next, h, prediction, kwargs):
        v = self.velocity(model, x, t, None, prediction, kwargs)
        x_pred = x + h * v
        # The corrector uses the left limit at t+h, so a step never mixes two bands' velocities.
        t_end = torch.nextafter(t_next, t)
        v_end = self.velocity(model, x_pred, t_end, None, prediction, kwargs)
        if prediction == "x1":
            # A band that finishes in this step has 1 − S(t_end) ≈ 0: its corrector velocity is x̂1's change over a
            # vanishing remaining time. Those bands keep the predictor (Euler) step, which lands on x̂1 exactly,
            # as EDM's Heun sampler does on its last step.
            finishing = self._per_coeff((self.schedule.s(t_next) >= 1) & (self.schedule.ds(t) > 0),
                                        self.decomposition(x))
            cv, cv_end = self.decomposition(v), self.decomposition(v_end)
            v_end = self.decomposition.inverse(torch.where(finishing.bool(), cv, cv_end))
        return x + 0.5 * h * (v + v_end)

    def _band_step(self, model, x, t, t_next, h, prediction, kwargs):
        F = self.decomposition
        out = model(x, t, **kwargs)
        delta_s = self.schedule.s(t_next) - self.schedule.s(t)  # [B, K]
        if prediction == "x1":
            d = F(out - x)
            ratio = torch.where(delta_s > 0, delta_s / (1 - self.schedule.s(t)).clamp_min(1e-12),
                                torch.zeros_like(delta_s))  # [B, K]; 1 on a band's last step
            return x + F.inverse(self._per_coeff(ratio, d) * d)
        cv = F(out)
        ds = self._per_coeff(self.schedule.ds(t), cv)
        dS = self._per_coeff(delta_s, cv)
        if bool(((ds == 0) & (dS != 0)).any()):
            # A band starts with zero slope (smooth/cosine ramp): read its direction at the step's midpoint instead.
            t_mid = 0.5 * (t + t_next)
            cv_mid = F(model(x, t_mid, **kwargs))
            ds_mid = self._per_coeff(self.schedule.ds(t_mid), cv)
            use_mid = (ds == 0) & (ds_mid > 0)
            cv, ds = torch.where(use_mid, cv_mid, cv), torch.where(use_mid, ds_mid, ds)
        moving = ds > 0
        # Recover F(x̂1 − x0) = F v / S′ on the moving bands; elsewhere fall back to an Euler step.
        step = torch.where(moving, cv / torch.where(moving, ds, torch.ones_like(ds)) * dS, h * cv)
        return x + F.inverse(step)

    def _sample_adaptive(self, model, x0, grid, prediction, kwargs, return_trajectory, rtol, atol):
        """dopri5 piecewise between window edges: S′ jumps there (linear ramp), so each piece is smooth and is
        integrated with the velocity's left limit at its end.

        An x1-prediction's velocity S′/(1 − S) ⊙ F(x̂1 − x) pulls the state onto x̂1 ever faster as a band ends (the
        ODE turns stiff), so for x1 the solver stops ``ADAPTIVE_X1_TAIL`` of the piece before its end and one band
        step (which lands finishing bands on x̂1) covers the rest."""
        from torchdiffeq import odeint

        batch = x0.shape[0]
        edges = self.schedule.edges().to(grid)
        bounds = torch.unique(torch.cat([grid[[0, -1]], edges[(edges > grid[0]) & (edges < grid[-1])]]))
        states, x = {0: x0}, x0
        for start, end in zip(bounds[:-1], bounds[1:]):
            t_last = torch.nextafter(end, start) if end < 1 else end
            stop = end - ADAPTIVE_X1_TAIL * (end - start) if prediction == "x1" else end

            def rhs(t, y, t_last=t_last):
                return self.velocity(model, y, torch.minimum(t, t_last).expand(batch).to(y.dtype), None,
                                     prediction, kwargs)

            inside = (grid > start) & (grid < stop) if return_trajectory else torch.zeros_like(grid, dtype=torch.bool)
            times = torch.cat([start[None], grid[inside], stop[None]])
            # step_t stops the solver from stepping past `stop` (torchdiffeq otherwise overshoots and interpolates).
            out = odeint(rhs, x, times, method="dopri5", rtol=rtol, atol=atol, options={"step_t": stop[None]})
            x = out[-1]
            for idx, state in zip(inside.nonzero().flatten().tolist(), out[1:-1]):
                states[idx] = state
            if stop < end:
                x = self._band_step(model, x, stop.expand(batch), end.expand(batch), end - stop, prediction, kwargs)
            for idx in ((grid >= stop) & (grid <= end)).nonzero().flatten().tolist():
                states[idx] = x  # (a grid point inside the short tail gets the piece's end state)
        if not return_trajectory:
            return x
        return x, torch.stack([states[i] for i in range(grid.numel())])
