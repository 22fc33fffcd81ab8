"""The batched L-BFGS minimiser: independent problems reach their own minima, finished ones stop early."""
import torch

from kflow.molecular.physics.lbfgs import batched_lbfgs


def test_each_problem_reaches_its_own_minimum():
    """Rosenbrock valleys with a different minimum per row (a, a²), plus an ill-conditioned quadratic."""
    a = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)

    def rosenbrock(x, index):
        return (a[index] - x[:, 0]) ** 2 + 10 * (x[:, 1] - x[:, 0] ** 2) ** 2

    result = batched_lbfgs(rosenbrock, torch.zeros(4, 2, dtype=torch.float64), max_steps=500, grad_tol=1e-8,
                           energy_tol=0.0, max_move=0.3)
    assert torch.allclose(result.x[:, 0], a, atol=1e-4)
    assert torch.allclose(result.x[:, 1], a * a, atol=1e-3)
    assert bool(result.converged.all())

    scales = torch.tensor([1.0, 1e3], dtype=torch.float64)
    result = batched_lbfgs(lambda x, i: (scales * (x - 2) ** 2).sum(-1), torch.zeros(3, 2, dtype=torch.float64),
                           grad_tol=1e-6, energy_tol=0.0)
    assert torch.allclose(result.x, torch.full((3, 2), 2.0, dtype=torch.float64), atol=1e-5)


def test_a_finished_problem_stops_while_others_go_on():
    """Row 0 starts at its minimum: it takes one step; row 1 needs many."""
    target = torch.tensor([[0.0, 0.0], [3.0, -4.0]], dtype=torch.float64)
    calls = []

    def f(x, index):
        calls.append(len(index))
        return ((x - target[index]) ** 2).sum(-1) + 0.1 * ((x - target[index]) ** 4).sum(-1)

    result = batched_lbfgs(f, torch.zeros(2, 2, dtype=torch.float64), grad_tol=1e-7, energy_tol=0.0, max_move=0.2)
    assert int(result.steps[0]) <= 1 < int(result.steps[1])
    assert torch.allclose(result.x, target, atol=1e-5)
    assert calls[-1] == 1  # the last evaluations ran on the unfinished row only


def test_non_finite_start_is_left_alone():
    result = batched_lbfgs(lambda x, i: torch.where(x[:, 0] > 5, torch.inf, (x ** 2).sum(-1)),
                           torch.tensor([[1.0, 1.0], [9.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(result.x[1], torch.tensor([9.0, 0.0], dtype=torch.float64))
    assert float(result.x[0].abs().max()) < 1e-3
