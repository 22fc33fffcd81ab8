"""Property tests of the K-Flow interpolant, schedule, loss and samplers."""
import pytest
import torch
from torch import nn

from kflow.core import (BandSchedule, ConditionDropping, FourierDecomposition, KFlow,
                        LaplacianDecomposition, WaveletDecomposition, share_bands)

F64 = torch.float64


def _flows():
    return {
        "fourier3": KFlow(FourierDecomposition((8, 8), 3), BandSchedule(3)),
        "fourier2-smooth-overlap": KFlow(FourierDecomposition((6, 5), 2), BandSchedule(2, "smooth", overlap=0.4)),
        "wavelet3-reversed": KFlow(WaveletDecomposition((16, 16), 3, wavelet="haar"),
                                   BandSchedule(3, order="high_to_low")),
        "laplacian2-cosine": KFlow(LaplacianDecomposition(torch.randn(5, 17, 3, dtype=F64) * 5, 2),
                                   BandSchedule(2, "cosine", weights=[2.0, 1.0])),
    }


def _pair(flow, batch=5):
    dec = flow.decomposition
    shape = (17, 6) if isinstance(dec, LaplacianDecomposition) else (2, *dec.data_shape)
    return torch.randn(batch, *shape, dtype=F64), torch.randn(batch, *shape, dtype=F64)


@pytest.mark.parametrize("name", list(_flows()))
def test_endpoints(name):
    flow = _flows()[name]
    x0, x1 = _pair(flow)
    assert (flow.interpolate(x0, x1, 0.0) - x0).abs().max() < 1e-12
    assert (flow.interpolate(x0, x1, 1.0) - x1).abs().max() < 1e-12


@pytest.mark.parametrize("name", list(_flows()))
def test_velocity_is_time_derivative(name):
    flow = _flows()[name]
    x0, x1 = _pair(flow)
    t = torch.rand(x0.shape[0], dtype=F64) * 0.98 + 0.01
    eps = 1e-6
    fd = (flow.interpolate(x0, x1, t + eps) - flow.interpolate(x0, x1, t - eps)) / (2 * eps)
    u = flow.target_velocity(x0, x1, t)
    # Central differences straddle a window edge with probability ~0; tolerance covers rounding.
    assert (fd - u).abs().max() < 1e-5
    xt, u2 = flow.interpolate_and_velocity(x0, x1, t)
    assert torch.allclose(xt, flow.interpolate(x0, x1, t)) and torch.allclose(u2, u)


def test_localisation_only_active_band_moves():
    flow = KFlow(FourierDecomposition((8, 8), 3), BandSchedule(3))
    x0, x1 = _pair(flow)
    dec = flow.decomposition
    for t, active in [(0.1, 0), (0.5, 1), (0.9, 2)]:
        cu = dec(flow.target_velocity(x0, x1, torch.full((5,), t, dtype=F64)))
        for b in range(3):
            moving = cu[..., dec.band_index == b].abs().max()
            assert (moving > 1e-3) if b == active else (moving < 1e-12)
        # Finished bands hold data, bands not reached yet hold the source.
        cx = dec(flow.interpolate(x0, x1, t))
        c0, c1 = dec(x0), dec(x1)
        for b in range(3):
            m = dec.band_index == b
            if b < active:
                assert torch.allclose(cx[..., m], c1[..., m], atol=1e-12)
            if b > active:
                assert torch.allclose(cx[..., m], c0[..., m], atol=1e-12)


def test_reversed_order_moves_high_band_first():
    flow = KFlow(FourierDecomposition((8, 8), 2), BandSchedule(2, order="high_to_low"))
    x0, x1 = _pair(flow)
    cu = flow.decomposition(flow.target_velocity(x0, x1, 0.2))
    assert cu[..., flow.decomposition.band_index == 0].abs().max() < 1e-12
    assert cu[..., flow.decomposition.band_index == 1].abs().max() > 1e-3


def test_one_band_is_rectified_flow():
    for flow in [KFlow.rectified((3, 4)), KFlow(FourierDecomposition((3, 4), 1), BandSchedule(1))]:
        x0, x1 = torch.randn(6, 3, 4, dtype=F64), torch.randn(6, 3, 4, dtype=F64)
        t = torch.rand(6, dtype=F64)
        tt = t[:, None, None]
        assert torch.allclose(flow.interpolate(x0, x1, t), (1 - tt) * x0 + tt * x1, atol=1e-12)
        assert torch.allclose(flow.target_velocity(x0, x1, t), x1 - x0, atol=1e-12)


def test_schedule_properties():
    for sched in [BandSchedule(3), BandSchedule(4, "smooth", overlap=0.5), BandSchedule(2, "cosine", "high_to_low"),
                  BandSchedule(3, weights=[3, 2, 1]), BandSchedule(2, windows=[(0.0, 0.7), (0.3, 1.0)])]:
        t = torch.linspace(0, 1, 2001, dtype=F64)
        s, ds = sched.s(t), sched.ds(t)
        assert torch.allclose(s[0], torch.zeros(sched.num_bands, dtype=F64))
        assert torch.allclose(s[-1], torch.ones(sched.num_bands, dtype=F64))
        assert (s[1:] >= s[:-1] - 1e-15).all() and (ds >= 0).all()
        # ∫ ds dt = 1 for every band (trapezoid on a fine grid)
        assert torch.allclose(torch.trapezoid(ds, t, dim=0), torch.ones(sched.num_bands, dtype=F64), atol=2e-3)
        grid = sched.time_grid(20)
        assert grid.numel() == 21 and torch.all(torch.isin(sched.edges(), grid))
    with pytest.raises(ValueError):
        BandSchedule(2, windows=[(0.5, 0.2), (0.0, 1.0)])
    with pytest.raises(ValueError, match="ramp"):
        BandSchedule(2, ramp="cubic")


@pytest.mark.parametrize("ramp", ["linear", "smooth"])
@pytest.mark.parametrize("method,tol", [("band", 1e-8), ("dopri5", 1e-4), ("euler", 0.1), ("heun", 0.1)])
def test_sampling_transports_single_pair(ramp, method, tol):
    flow = KFlow(FourierDecomposition((8, 8), 3), BandSchedule(3, ramp, overlap=0.25))
    x0, x1 = _pair(flow, 3)
    exact_velocity = lambda x, t: flow.target_velocity(x0, x1, t)  # noqa: E731
    out = flow.sample(exact_velocity, x0, steps=40, method=method)
    err = (out - x1).abs().max()
    # Linear ramps are piecewise-constant velocities: every solver on the edge-aligned grid is exact.
    assert err < (1e-8 if ramp == "linear" else tol), err


def test_band_step_with_x1_prediction_is_exact_and_trajectory_matches_interpolant():
    flow = KFlow(FourierDecomposition((8, 8), 3), BandSchedule(3, "smooth"), prediction="x1")
    x0, x1 = _pair(flow, 3)
    out, traj = flow.sample(lambda x, t: x1, x0, steps=9, method="band", return_trajectory=True)
    assert (out - x1).abs().max() < 1e-10
    grid = flow.schedule.time_grid(9)
    for i in [0, 3, 5, 9]:
        assert torch.allclose(traj[i], flow.interpolate(x0, x1, grid[i]), atol=1e-10)


@pytest.mark.parametrize("schedule", [BandSchedule(3), BandSchedule(3, overlap=0.3),
                                      BandSchedule(3, order="high_to_low", weights=[3.0, 1.0, 2.0])])
def test_band_step_of_a_velocity_model_is_euler_for_linear_ramps(schedule):
    # Inside each step of the edge-aligned grid a linear ramp moves at constant speed, so the band step's
    # F v / S'(t) · ΔS equals h · F v: the same update as Euler, for any model (here one that is not a flow).
    flow = KFlow(FourierDecomposition((8, 8), 3), schedule)
    x0 = torch.randn(4, 2, 8, 8, dtype=F64)
    model = lambda x, t: torch.tanh(x) * (1 + 3 * t.reshape(-1, 1, 1, 1)) + x.roll(1, -1)  # noqa: E731
    band = flow.sample(model, x0, steps=7, method="band")
    euler = flow.sample(model, x0, steps=7, method="euler")
    assert (band - euler).abs().max() < 1e-12
    smooth = KFlow(FourierDecomposition((8, 8), 3), BandSchedule(3, "smooth"))
    assert (smooth.sample(model, x0, steps=7, method="band")
            - smooth.sample(model, x0, steps=7, method="euler")).abs().max() > 1e-3  # not a tautology


def test_steps_per_band_allocation():
    sched = BandSchedule(2)
    grid = sched.time_grid(steps_per_band=[3, 7])
    assert grid.numel() == 11 and ((grid <= 0.5).sum() == 4)


class _MLP(nn.Module):
    def __init__(self, dim=2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x)], -1))


@pytest.mark.parametrize("prediction", ["velocity", "x1"])
def test_training_on_2d_toy_lowers_loss(prediction):
    torch.manual_seed(0)
    flow = KFlow(FourierDecomposition((2,), 2), BandSchedule(2), prediction=prediction)
    model = _MLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def data(n):  # two Gaussian blobs
        centers = torch.tensor([[2.0, 2.0], [-2.0, -1.0]])
        return centers[torch.randint(0, 2, (n,))] + 0.2 * torch.randn(n, 2)

    gen = torch.Generator().manual_seed(1)
    x0_eval, x1_eval = torch.randn(512, 2, generator=gen), data(512)
    t_eval = torch.rand(512, generator=gen)
    before = flow.loss(model, x0_eval, x1_eval, t_eval).item()
    for _ in range(300):
        loss = flow.loss(model, torch.randn(256, 2), data(256))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = flow.loss(model, x0_eval, x1_eval, t_eval).item()
    # The velocity target has irreducible variance (random pairs), so its loss cannot drop as far as x1's.
    assert after < (0.75 if prediction == "velocity" else 0.6) * before, (before, after)
    samples = flow.sample(model, torch.randn(512, 2), steps=40, method="heun")
    # Samples land near one of the two modes.
    d = torch.cdist(samples, torch.tensor([[2.0, 2.0], [-2.0, -1.0]])).min(1).values
    assert d.median() < 0.8


def test_loss_band_weights_and_errors():
    flow = KFlow(FourierDecomposition((4, 4), 2), BandSchedule(2))
    x0, x1 = torch.randn(3, 4, 4, dtype=F64), torch.randn(3, 4, 4, dtype=F64)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    t = torch.full((3,), 0.25, dtype=F64)
    plain = flow.loss(zero, x0, x1, t)
    unit = flow.loss(zero, x0, x1, t, band_weights=[1.0, 1.0])
    assert torch.allclose(plain, unit)  # orthonormal: coefficient-space error == data-space error
    # At t=0.25 only band 0 moves, so weighting band 1 changes nothing; weighting band 0 scales the loss.
    assert torch.allclose(flow.loss(zero, x0, x1, t, band_weights=[1.0, 5.0]), plain)
    assert torch.allclose(flow.loss(zero, x0, x1, t, band_weights=[2.0, 1.0]), 2 * plain)
    with pytest.raises(ValueError, match="shape"):
        flow.loss(lambda x, t: x[:, :2], x0, x1)
    with pytest.raises(ValueError, match="same shape"):
        flow.interpolate(x0, x1[:, :2], 0.5)
    with pytest.raises(ValueError, match="method"):
        flow.sample(zero, x0, method="rk4")


def test_noise_splitting_shares_chosen_bands_only():
    dec = FourierDecomposition((8, 8), 3)
    x0 = torch.randn(6, 2, 8, 8, dtype=F64)
    shared = share_bands(x0, dec, bands=[0], reference=2)
    c, c_orig = dec(shared), dec(x0)
    low, rest = dec.band_index == 0, dec.band_index != 0
    assert torch.allclose(c[..., low], c_orig[2:3][..., low].expand_as(c[..., low]))
    assert torch.allclose(c[..., rest], c_orig[..., rest])
    grouped = share_bands(x0, dec, bands=[1, 2], groups=torch.tensor([0, 0, 1, 1, 1, 2]))
    cg = dec(grouped)
    high = dec.band_index > 0
    assert torch.allclose(cg[1][..., high], c_orig[0][..., high])
    assert torch.allclose(cg[4][..., high], c_orig[2][..., high])
    assert not torch.allclose(cg[0][..., high], cg[2][..., high])


def test_condition_dropping_switches_at_tau():
    seen = []

    def model(x, t, y=None):
        seen.append(y.clone())
        return torch.zeros_like(x)

    wrapped = ConditionDropping(model, tau=0.3, null_condition=10)
    y = torch.tensor([1, 2, 3])
    wrapped(torch.zeros(3, 2), torch.tensor([0.0, 0.2999, 0.3]), y=y)
    assert seen[-1].tolist() == [1, 2, 10]
    wrapped(torch.zeros(3, 2), torch.full((3,), 0.1), y=y)
    assert seen[-1].tolist() == [1, 2, 3]


# ---------------------------------------------------------------- x1-prediction: the velocity at the current state
def _toy_flow(name, num_bands, batch):
    """(flow, data shape) on 8 coordinates: 256 data points {±1}^8, so the Bayes predictor is an exact sum. The
    Laplacian flow (the molecular one: a smooth, overlapping schedule) has one basis for all ``batch`` rows."""
    if name == "fourier":
        return KFlow(FourierDecomposition((4, 2), num_bands), BandSchedule(num_bands), prediction="x1"), (1, 4, 2)
    points = (torch.randn(1, 8, 3, dtype=F64, generator=torch.Generator().manual_seed(3)) * 4).expand(batch, -1, -1)
    return KFlow(LaplacianDecomposition(points, num_bands), BandSchedule(num_bands, "smooth", overlap=0.3),
                 prediction="x1"), (8, 1)


def _bayes_x1(flow, shape):
    """The exact E[x1 | x_t] for data uniform on {±1}^D and white Gaussian noise, for an orthonormal F: in
    coefficient space c_t | x1 ~ N(S ⊙ F x1, diag((1 − S)²))."""
    dec = flow.decomposition
    configs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=F64)] * 8)  # [256, 8]
    if isinstance(dec, LaplacianDecomposition):  # the 256 configurations as feature channels of every row
        coeffs = None
    else:
        coeffs = dec(configs.reshape(256, *shape)).reshape(1, 256, -1)  # [1, 256, D]

    def predictor(x, t):
        b = x.shape[0]
        cx = dec(x)
        s = flow._per_coeff(flow.schedule.s(t), cx).expand_as(cx).reshape(b, 1, -1)  # [B, 1, D]
        c1 = coeffs if coeffs is not None else dec(configs.T[None].expand(b, -1, -1)).transpose(1, 2)
        var = (1 - s).clamp_min(1e-9).square()
        log_w = -((cx.reshape(b, 1, -1) - s * c1).square() / (2 * var)).sum(-1)  # [B, 256]
        return (torch.softmax(log_w, -1) @ configs).reshape(b, *shape)

    return predictor


@pytest.mark.parametrize("num_bands", [1, 2, 3])
@pytest.mark.parametrize("method", ["euler", "heun", "band", "dopri5"])
@pytest.mark.parametrize("name", ["fourier", "laplacian"])
def test_x1_prediction_of_the_exact_predictor_reaches_the_data(num_bands, method, name):
    # Regression test: the x1 -> velocity conversion must use the x0 implied by x_t, (F x_t − S F x̂1)/(1 − S),
    # not the trajectory's start; with the start, Euler returns the time-average of x̂1 (mean |x| ≈ 0.6 here).
    flow, shape = _toy_flow(name, num_bands, 200)
    x0 = torch.randn(200, *shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = flow.sample(_bayes_x1(flow, shape), x0, steps=60, method=method)
    near = ((out.abs() - 1).abs() < 0.1).double().mean()
    assert near >= 0.99, (float(near), float(out.abs().mean()))


@pytest.mark.parametrize("method", ["euler", "band"])
def test_x1_and_velocity_prediction_of_one_exact_model_give_the_same_samples(method):
    flow, shape = _toy_flow("fourier", 2, 50)
    x1_model = _bayes_x1(flow, shape)
    dec, sch = flow.decomposition, flow.schedule

    def velocity_model(x, t):  # the implied velocity written out: F⁻¹(S′/(1 − S) ⊙ F(x̂1 − x))
        s, ds = sch.s(t), sch.ds(t)
        rate = torch.where(ds > 0, ds / (1 - s).clamp_min(1e-12), torch.zeros_like(ds))
        d = dec(x1_model(x, t) - x)
        return dec.inverse(flow._per_coeff(rate, d) * d)

    x0 = torch.randn(50, *shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    a = flow.sample(x1_model, x0, steps=30, method=method, prediction="x1")
    b = flow.sample(velocity_model, x0, steps=30, method=method, prediction="velocity")
    # (Heun and dopri5 differ by design at a band's end: for x1 they land finishing bands on x̂1, a velocity
    # model has no x̂1 to land on.)
    assert (a - b).abs().max() < 1e-8


def test_velocity_from_x1_is_flow_matching_for_one_band():
    flow = KFlow.rectified((3,), prediction="x1")
    x, x1 = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 0.3, 0.7, 0.95], dtype=F64)
    assert torch.allclose(flow.velocity_from_x1(x, x1, t), (x1 - x) / (1 - t[:, None]), atol=1e-12)
