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


# -- compat="original": python/optim.py as published (ALGORITHMS.md, "Behaviours of the original code")


def _original_reference(x0, grad, steps, lr, mom, nesterov, L, gamma, wd=0.0, damp=0.0, llr=0.1, beta=0.75):
    """The original algorithm transcribed for one flat tensor, noise 0: outer buffer seeded with
    the first gradient, Langevin ``dw = mdw`` without Nesterov, γ constant."""
    x = x0.clone()
    outer = None
    for _ in range(steps):
        g0 = grad(x)
        if outer is None:
            outer = g0.clone()
        xc, mu, m = x.clone(), x.clone(), torch.zeros_like(x)
        xp = x.clone()
        for _ in range(L):
            dw = grad(xp) + wd * xp
            if mom > 0:
                m = mom * m + (1 - damp) * dw
                if nesterov:
                    dw = dw + mom * m
                else:
                    dw = m          # alias: the next lines change the buffer too
            dw = dw - gamma * (xc - xp)
            if mom > 0 and not nesterov:
                m = dw
            xp = xp - llr * dw
            mu = beta * mu + (1 - beta) * xp
        d = (xc - mu) if L > 0 else g0
        d = d + wd * x
        outer = mom * outer + (1 - damp) * d
        d = d + mom * outer if nesterov else outer
        x = x - lr * d
    return x


def _quadratic():
    A = torch.diag(torch.tensor([1.5, 0.7, 0.2], dtype=torch.float64))
    b = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    return A, b, (lambda v: A @ v - b)


def _run(opt_factory, x0, A, b, steps):
    x = nn.Parameter(x0.clone())
    opt = opt_factory([x])

    def closure():
        x.grad = None
        (0.5 * x @ A @ x - b @ x).backward()
        return torch.zeros(())

    for _ in range(steps):
        opt.step(closure)
    return x.detach(), opt


def test_original_first_update_with_L_zero_is_one_plus_mu_plus_mu_squared_times_the_gradient():
    A, b, grad = _quadratic()
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    lr, mom = 0.1, 0.9
    make = lambda compat: (lambda p: EntropySGD(torch.optim.SGD(p, lr=lr, momentum=mom, nesterov=True), L=0,
                                                compat=compat))
    x_orig, _ = _run(make("original"), x0, A, b, 1)
    x_torch, _ = _run(make("none"), x0, A, b, 1)
    torch.testing.assert_close(x_orig, x0 - lr * (1 + mom + mom**2) * grad(x0), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(x_torch, x0 - lr * (1 + mom) * grad(x0), rtol=1e-14, atol=1e-15)
    # and ten steps follow the original's recursion exactly
    x10, _ = _run(make("original"), x0, A, b, 10)
    torch.testing.assert_close(x10, _original_reference(x0, grad, 10, lr, mom, True, 0, 0.0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("nesterov", [True, False])
def test_original_mode_matches_the_transcribed_original_with_langevin_steps(nesterov):
    A, b, grad = _quadratic()
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    kw = dict(lr=0.5, momentum=0.6, nesterov=nesterov, weight_decay=1e-2, dampening=0.0 if nesterov else 0.3)
    x, opt = _run(lambda p: EntropySGD(torch.optim.SGD(p, **kw), L=5, gamma=0.3, scoping=0.5, noise=0.0,
                                       compat="original"), x0, A, b, 8)
    ref = _original_reference(x0, grad, 8, 0.5, 0.6, nesterov, 5, 0.3, wd=1e-2, damp=kw["dampening"])
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-14)
    assert opt.t == 8 and opt.gamma_t == 0.3            # the original never increments t
    default, _ = _run(lambda p: EntropySGD(torch.optim.SGD(p, **kw), L=5, gamma=0.3, scoping=0.0, noise=0.0),
                      x0, A, b, 8)
    assert (default - ref).norm() > 1e-4 * ref.norm()   # the intended method differs, as the issue measured


def test_without_nesterov_the_aliased_buffer_and_the_copied_one_have_their_own_fixed_points():
    # aliased (original): m = mom·m + (1−τ)∇f − γ(x − x') has m* = 0, so x − μ → (1−τ)A((1−τ)A + γI)⁻¹x;
    # copied (default): d = m − γ(x − x') with m* = (1−τ)∇f/(1−mom), so x − μ → A(A + γ(1−mom)/(1−τ) I)⁻¹x
    A = torch.diag(torch.tensor([1.5, 0.5], dtype=torch.float64))
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mom, damp, gamma = 0.5, 0.2, 0.5
    eye = torch.eye(2, dtype=torch.float64)
    for compat, expected in (("original", (1 - damp) * A @ torch.linalg.solve((1 - damp) * A + gamma * eye, x0)),
                             ("none", A @ torch.linalg.solve(A + gamma * (1 - mom) / (1 - damp) * eye, x0))):
        x = nn.Parameter(x0.clone())

        def closure():
            x.grad = None
            (0.5 * x @ A @ x).backward()
            return torch.zeros(())

        base = torch.optim.SGD([x], lr=0.0, momentum=mom, dampening=damp)
        EntropySGD(base, L=800, gamma=gamma, scoping=0.0, noise=0.0, compat=compat).step(closure)
        torch.testing.assert_close(x.grad, expected, rtol=1e-8, atol=1e-10)


def test_original_mode_needs_an_sgd_base_and_the_plugin_passes_its_options():
    with pytest.raises(ValueError, match="torch.optim.SGD"):
        EntropySGD(torch.optim.Adam([nn.Parameter(torch.zeros(2))]), compat="original")
    from lscape.plugins.optim.entropy_sgd import EntropySgdStep

    names = {o.name for o in EntropySgdStep.all_options()}
    assert {"nesterov", "dampening", "weight_decay", "compat"} <= names
    step = EntropySgdStep(nesterov="false", dampening="0.1", weight_decay="0.01", compat="original", L="2")
    p = nn.Parameter(torch.zeros(2))
    from types import SimpleNamespace

    opt = step.build(SimpleNamespace(optimizer=torch.optim.SGD([p], lr=0.1, momentum=0.9)))
    assert (opt.nesterov, opt.dampening, opt.weight_decay, opt.compat) == (False, 0.1, 0.01, "original")


def test_entropy_sgd_statistics_through_the_engine_and_its_figure(cli, tmp_path):
    out = tmp_path / "e.zarr"
    code, _, err = cli("run", "--data", "synthetic", "--data-opt", "n=64", "--model-opt", "widths=8", "--batch-size", "16",
                       "--steps", "5", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--nesterov",
                       "--plugin", "entropy-sgd", "-o", "entropy-sgd.L=2", "-o", "entropy-sgd.gamma=0.03",
                       "-o", "entropy-sgd.scoping=0.5", "-o", "entropy-sgd.stats=every:1", "-o", "entropy-sgd.nesterov=false",
                       "--no-progress", "--out", str(out))
    assert code == 0, err
    from lscape.store import RunReader

    d = RunReader(out).read("entropy-sgd")
    assert list(d["step"]) == [0, 1, 2, 3, 4]
    assert d["gamma"] == pytest.approx([0.03 * 1.5**t for t in range(5)], rel=1e-12)
    assert (d["dist_mu"] > 0).all() and (abs(d["cos"]) <= 1).all()
    code, _, err = cli("plot", str(out), "--out", str(tmp_path / "figs"))
    assert code == 0, err
    assert (tmp_path / "figs" / "entropy_sgd.png").exists()
