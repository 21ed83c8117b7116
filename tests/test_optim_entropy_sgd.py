"""Entropy-SGD: the local-entropy gradient on a quadratic, L = 0, scoping, fresh batches."""

import pytest
import torch
from torch import nn

from lscape.plugins.optim import EntropySGD


def test_local_entropy_gradient_on_a_quadratic_is_A_inverse_A_plus_gamma_x():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    A = q @ torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.3, 0.1], dtype=torch.float64)) @ q.T
    x0 = torch.randn(5, dtype=torch.float64)
    x = nn.Parameter(x0.clone())

    def closure():
        x.grad = None
        loss = 0.5 * x @ A @ x
        loss.backward()
        return loss.detach()

    gamma = 1.0
    # lr 0 keeps x where it is, so p.grad is the x − μ the step handed to the base optimizer
    opt = EntropySGD(torch.optim.SGD([x], lr=0.0), L=400, gamma=gamma, scoping=0.0, noise=0.0, momentum=0.0)
    opt.step(closure)
    expected = A @ torch.linalg.solve(A + gamma * torch.eye(5, dtype=torch.float64), x0)
    torch.testing.assert_close(x.grad, expected, rtol=1e-8, atol=1e-10)
    assert torch.equal(x.detach(), x0)
    assert opt.stats["dist_mu"] == pytest.approx(expected.norm().item(), rel=1e-8)


def test_langevin_momentum_acts_on_grad_f_only_so_gamma_is_scaled_by_one_minus_mom():
    # the original puts ∇f (not the coupling term) through momentum: at the fixed point
    # ∇f/(1 − mom) = γ(x − x'), i.e. x − μ → A(A + γ(1 − mom)I)⁻¹x
    A = torch.diag(torch.tensor([1.5, 0.5], dtype=torch.float64))
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x = nn.Parameter(x0.clone())

    def closure():
        x.grad = None
        (0.5 * x @ A @ x).backward()
        return torch.zeros(())

    opt = EntropySGD(torch.optim.SGD([x], lr=0.0, momentum=0.5, nesterov=True), L=600, gamma=0.5, scoping=0.0, noise=0.0)
    opt.step(closure)
    torch.testing.assert_close(x.grad, A @ torch.linalg.solve(A + 0.5 * 0.5 * torch.eye(2, dtype=torch.float64), x0))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


class _Stream:
    """A closure that draws a new minibatch on every call, like the engine's."""

    def __init__(self, model, seed=1):
        self.model, self.g, self.calls = model, torch.Generator().manual_seed(seed), 0

    def __call__(self):
        self.calls += 1
        x, y = torch.randn(8, 6, generator=self.g), torch.randn(8, 3, generator=self.g)
        self.model.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        return loss.detach()


def test_L_zero_is_nesterov_sgd_bit_for_bit():
    a, b = _mlp(), _mlp()
    sgd = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    esgd = EntropySGD(torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4), L=0)
    sa, sb = _Stream(a), _Stream(b)
    for _ in range(5):
        sa()
        sgd.step()
        esgd.step(sb)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_each_step_calls_the_closure_L_plus_one_times_and_gamma_grows_with_t():
    model = _mlp()
    stream = _Stream(model)
    opt = EntropySGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True), L=3, gamma=0.03, scoping=0.1)
    gammas = []
    for _ in range(4):
        opt.step(stream)
        gammas.append(opt.stats["gamma"])
    assert stream.calls == 4 * 4
    assert gammas == [0.03 * 1.1 ** t for t in range(4)]
    assert opt.t == 4 and opt.gamma_t == 0.03 * 1.1 ** 4


def test_statistics_are_recorded_and_consistent():
    model = _mlp()
    opt = EntropySGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True), L=5, gamma=0.03, noise=1e-3)
    opt.step(_Stream(model))
    s = opt.stats
    assert set(s) == {"grad_norm", "dist_mu", "cos", "noise_norm", "mean_dist", "gamma"}
    assert s["grad_norm"] > 0 and s["dist_mu"] > 0 and s["mean_dist"] > 0
    assert -1.0 <= s["cos"] <= 1.0
    # the noise term is noise/√(0.5·η')·ξ with ξ ~ N(0, I) over all parameters
    n = sum(p.numel() for p in model.parameters())
    assert s["noise_norm"] == pytest.approx(1e-3 / (0.05 ** 0.5) * n ** 0.5, rel=0.2)
