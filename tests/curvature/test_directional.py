"""Issue 20 items 3-4: batch sharpness against per-batch dense Hessians; directional and
critical sharpness from forward passes against uᵀHu from the dense Hessian (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lscape import params as lparams
from lscape.curvature import (HessianOperator, PreconditionedOperator, batch_sharpness, critical_sharpness,
                              dense_hessian, directional_curvature, gradient, preconditioner, random_batches)

mse = nn.functional.mse_loss


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def data(seed=1, n=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(1, keepdim=True))


class Counted(nn.Module):
    """Counts forward passes of the wrapped model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_batch_sharpness_against_per_batch_dense_hessians():
    model = mlp()
    x, y = data()
    batches = random_batches(x, y, batch_size=6, num_batches=5, seed=3)
    ratios, num, den = [], 0.0, 0.0
    for b in batches:
        H = dense_hessian(model, mse, [b])
        g = gradient(model, mse, [b])
        ghg, gg = float(g @ H @ g), float(g @ g)
        ratios.append(ghg / gg)
        num, den = num + ghg, den + gg
    got = batch_sharpness(model, mse, batches)
    assert got.num_batches == 5 and got.num_products == 5
    assert got.value == pytest.approx(sum(ratios) / 5, rel=1e-10)
    assert got.ratio_of_means == pytest.approx(num / den, rel=1e-10)
    torch.testing.assert_close(got.ratios, torch.tensor(ratios, dtype=torch.float64), rtol=1e-10, atol=0)
    assert got.stderr == pytest.approx(float(torch.tensor(ratios).std() / 5**0.5), rel=1e-6)
    # each quotient is a Rayleigh quotient of its batch Hessian: at most that batch's λ_max
    for b, r in zip(batches, ratios):
        assert r <= float(torch.linalg.eigvalsh(dense_hessian(model, mse, [b]))[-1]) + 1e-9
    # the authors' sampling: independent batches of distinct samples, reproducible by seed
    again = random_batches(x, y, 6, 5, seed=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, batches))
    assert all(len(set(map(tuple, b[0].tolist()))) == 6 for b in batches)


def test_batch_sharpness_refusals():
    model = mlp()
    x, y = data()
    with pytest.raises(ValueError, match="batch_size"):
        random_batches(x, y, 0, 3)
    flat = nn.Linear(4, 1, bias=False).double()
    nn.init.zeros_(flat.weight)
    zero = [(x, torch.zeros(len(x), 1, dtype=torch.float64))]
    with pytest.raises(ValueError, match="non-zero gradient"):
        batch_sharpness(flat, mse, zero)


@pytest.mark.parametrize("richardson,rel", [(False, 1e-6), (True, 1e-8)])
def test_directional_curvature_against_dense(richardson, rel):
    model = mlp(2)
    x, y = data()
    counted = Counted(model)
    op = HessianOperator(counted, mse, [(x, y)])
    H = dense_hessian(model, mse, [(x, y)])
    g = gradient(model, mse, [(x, y)])
    u = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    counted.calls = 0
    got = directional_curvature(op, u, richardson=richardson)
    exact = float(u @ H @ u / (u @ u))
    assert got.value == pytest.approx(exact, rel=rel)
    assert got.slope == pytest.approx(float(g @ u / (u @ u)), rel=1e-6)
    assert got.num_loss_evals == counted.calls == (5 if richardson else 3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # parameters put back exactly


def test_critical_sharpness_is_exact_on_a_quadratic_loss():
    """Linear regression: L is quadratic, so η_c = 2(−gᵀu)/(uᵀHu) exactly and the bracket must hold it."""
    torch.manual_seed(0)
    model = Counted(nn.Linear(4, 1).double())
    x, y = data()
    op = HessianOperator(model, mse, [(x, y)])
    H = dense_hessian(model, mse, [(x, y)])
    g = op.gradient()
    for u in (-g, -g / torch.linspace(1, 3, len(g), dtype=torch.float64)):  # GD step, a preconditioned step
        exact = float(u @ H @ u / -(g @ u))
        model.calls = 0
        got = critical_sharpness(op, u)
        assert got.lower <= exact <= got.upper and got.converged
        assert 1 - got.eta_bracket[0] / got.eta_bracket[1] <= 1 / 16
        assert got.value == pytest.approx(exact, rel=1 / 16)
        assert got.quadratic == pytest.approx(exact, rel=1e-6)
        assert got.num_loss_evals == model.calls <= 10
        # with a guess (the authors' start: a learning rate) the doubling search still fits in 10
        model.calls = 0
        guessed = critical_sharpness(op, u, lr_guess=0.5 * 2 / exact)
        assert guessed.lower <= exact <= guessed.upper and model.calls <= 10


def test_critical_sharpness_along_gd_and_adam_updates_of_a_tanh_mlp():
    model = Counted(mlp(4))
    x, y = data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    op = HessianOperator(model, mse, [(x, y)])
    H = dense_hessian(model, mse, [(x, y)])
    g = op.gradient()
    # the next Adam step per unit lr, u = −P⁻¹m_{t+1}, from the state (hand-applied update rule)
    state = [opt.state[p] for p in model.parameters()]
    m = lparams.flatten([0.9 * s["exp_avg"] for s in state]) + 0.1 * g
    u_adam = -m / preconditioner(opt, op.params).diag
    for u in (-g, u_adam):
        quad = float(u @ H @ u / -(g @ u))
        before = [p.detach().clone() for p in model.parameters()]
        model.calls = 0
        got = critical_sharpness(op, u)
        assert model.calls == got.num_loss_evals <= 10
        assert got.quadratic == pytest.approx(quad, rel=1e-6)  # the three-point model: FD error only
        # the line search sees the true loss, the model its quadratic part: close at this step size
        assert got.value == pytest.approx(quad, rel=0.2)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the GD value is the Rayleigh quotient of H at g
    assert critical_sharpness(op, -g).quadratic == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-6)


def test_critical_sharpness_refusals():
    model = mlp()
    op = HessianOperator(model, mse, [data()])
    g = op.gradient()
    with pytest.raises(ValueError, match="not a descent direction"):
        critical_sharpness(op, g)
    with pytest.raises(ValueError, match="zero"):
        critical_sharpness(op, torch.zeros_like(g))
    with pytest.raises(ValueError, match="shape"):
        directional_curvature(op, torch.ones(3, dtype=torch.float64))


def test_directional_curvature_through_the_preconditioned_operator():
    """The loss line of a PreconditionedOperator is the inner operator's (delegated params/loss)."""
    model = mlp(6)
    x, y = data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    op = HessianOperator(model, mse, [(x, y)])
    pop = PreconditionedOperator(op, preconditioner(opt, op.params))
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # curvature of φ ↦ L(Dφ) along v equals that of L along Dv, scaled by ‖Dv‖²/‖v‖²
    d = pop.to_parameters(v)
    got = directional_curvature(pop, d).value * float(d @ d) / float(v @ v)
    assert got == pytest.approx(float(v @ pop.matvec(v) / (v @ v)), rel=1e-6)


def test_critical_sharpness_brackets_within_budget_when_the_quadratic_guess_is_off():
    """At initialisation the cubic terms move η_c well away from the quadratic guess (up to
    ×1.7 here): the accelerating search still brackets and converges in 10 evaluations."""
    for seed in range(8):
        model = Counted(mlp(seed))
        x, y = data(seed + 10)
        op = HessianOperator(model, mse, [(x, y)])
        g = op.gradient()
        model.calls = 0
        got = critical_sharpness(op, -g)
        assert got.converged and model.calls == got.num_loss_evals <= 10
        assert got.lower <= got.value <= got.upper
        # every loss evaluated below the bracket's lower η decreased the loss, above its upper η increased it
        l0 = got.losses[0][1]
        lo, hi = got.eta_bracket
        assert all(v <= l0 for eta, v in got.losses[3:] if eta <= lo)
        assert all(v > l0 for eta, v in got.losses[3:] if eta >= hi)
