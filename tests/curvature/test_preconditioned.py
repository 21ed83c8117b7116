"""Issue 20 items 1-2: P read from the optimizer's state against a hand computation of each
update rule, and the preconditioned operator's λ_max against a dense D H D (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lscape import params as lparams
from lscape.curvature import (HessianOperator, PreconditionedOperator, PreconditionerRule, dense_hessian, dense_matrix,
                              edge_threshold, lanczos, power_iteration, preconditioner, register_preconditioner)

mse = nn.functional.mse_loss


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def data(seed=1, n=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(1, keepdim=True))


def train(model, opt, steps=4, batch=None):
    """Real optimizer steps; returns the flat gradients seen and the parameters after each step."""
    x, y = batch or data()
    grads, thetas = [], [lparams.flat_parameters(list(model.parameters())).clone()]
    for _ in range(steps):
        opt.zero_grad()
        mse(model(x), y).backward()
        grads.append(lparams.flatten([p.grad for p in model.parameters()]).clone())
        opt.step()
        thetas.append(lparams.flat_parameters(list(model.parameters())).clone())
    return grads, thetas


def adam_hand(grads, lr, betas, eps, amsgrad=False):
    b1, b2 = betas
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    vmax = torch.zeros_like(grads[0])
    for g in grads:
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = torch.maximum(vmax, v)
    t = len(grads)
    vv = vmax if amsgrad else v
    return m, (1 - b1**t) * ((vv / (1 - b2**t)).sqrt() + eps)


@pytest.mark.parametrize("cls,extra", [(torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.1}),
                                       (torch.optim.Adam, {"amsgrad": True})])
def test_adam_preconditioner_matches_hand_update_rule(cls, extra):
    model = mlp()
    lr, betas, eps = 0.02, (0.9, 0.95), 1e-8
    opt = cls(model.parameters(), lr=lr, betas=betas, eps=eps, **extra)
    grads, thetas = train(model, opt)
    m, p_hand = adam_hand(grads, lr, betas, eps, amsgrad=extra.get("amsgrad", False))
    pre = preconditioner(opt)
    assert pre.rule == cls.__name__.lower() and pre.step == 4 and pre.lr == lr and pre.sign == 1
    torch.testing.assert_close(pre.diag, p_hand, rtol=1e-12, atol=0)
    # P is what the last step divided by: θ_t = (1 − ηλ)θ_{t−1} − η P⁻¹ m_t
    decay = 1 - lr * extra.get("weight_decay", 0.0) if cls is torch.optim.AdamW else 1.0
    torch.testing.assert_close(thetas[-1], decay * thetas[-2] - lr * m / pre.diag, rtol=1e-12, atol=1e-14)


def test_preconditioned_lambda_max_equals_dense_dhd_for_adam_and_adamw():
    x, y = data()
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        model = mlp(3)
        opt = cls(model.parameters(), lr=0.01)
        grads, _ = train(model, opt, steps=5)
        _, p_hand = adam_hand(grads, 0.01, (0.9, 0.999), 1e-8)
        op = HessianOperator(model, mse, [(x, y)])
        H = dense_hessian(model, mse, [(x, y)])
        D = p_hand.rsqrt()
        M = D[:, None] * H * D[None, :]
        expected = float(torch.linalg.eigvalsh(M)[-1])
        # the same number is the top eigenvalue of the non-symmetric P⁻¹H
        pinv_h = torch.linalg.eigvals(H / p_hand[:, None]).real.max()
        assert abs(float(pinv_h) - expected) <= 1e-6 * abs(expected)
        pop = PreconditionedOperator(op, preconditioner(opt, op.params))
        torch.testing.assert_close(dense_matrix(pop), M, rtol=1e-9, atol=1e-9)
        assert abs(float(torch.linalg.eigvalsh(dense_matrix(pop))[-1]) - expected) <= 1e-6 * abs(expected)
        top = lanczos(pop, k=1, tol=1e-10)
        assert abs(float(top.eigenvalues[0]) - expected) <= 1e-6 * abs(expected)
        # the raw Hessian's λ_max is a different number (the preconditioner matters)
        assert abs(float(torch.linalg.eigvalsh(H)[-1]) - expected) > 1e-3 * abs(expected)
        assert pop.num_products == op.num_products > 0
        v = torch.randn(op.dim, dtype=torch.float64)
        torch.testing.assert_close(pop.matmat(v[None])[0], pop.matvec(v))
        torch.testing.assert_close(pop.gradient(), D * op.gradient())
        torch.testing.assert_close(pop.to_parameters(v), D * v)
        assert pop.loss() == op.loss() and pop.params is op.params


def test_per_group_learning_rates_are_folded_into_p():
    model = mlp()
    first, last = list(model[0].parameters()), list(model[2].parameters())
    opt = torch.optim.Adam([{"params": first, "lr": 0.01}, {"params": last, "lr": 0.03}])
    grads, thetas = train(model, opt, steps=3)
    m, p_hand = adam_hand(grads, None, (0.9, 0.999), 1e-8)
    n0 = sum(p.numel() for p in first)
    scale = torch.ones_like(p_hand)
    scale[n0:] = 0.01 / 0.03
    pre = preconditioner(opt)
    torch.testing.assert_close(pre.diag, p_hand * scale, rtol=1e-12, atol=0)
    # one reference η moves every coordinate: θ_t − θ_{t−1} = −η_ref P⁻¹ m
    torch.testing.assert_close(thetas[-1] - thetas[-2], -0.01 * m / pre.diag, rtol=1e-10, atol=1e-14)
    # a parameter subset, in the operator's order
    sub = preconditioner(opt, last)
    torch.testing.assert_close(sub.diag, pre.diag[n0:])
    assert preconditioner(opt, lr=0.03).diag[n0:].allclose(p_hand[n0:])


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_rmsprop_preconditioner_matches_hand_update_rule(centered, momentum):
    model = mlp()
    lr, alpha, eps = 0.01, 0.9, 1e-6
    opt = torch.optim.RMSprop(model.parameters(), lr=lr, alpha=alpha, eps=eps, centered=centered, momentum=momentum)
    grads, thetas = train(model, opt, steps=3)
    v = torch.zeros_like(grads[0])
    gbar = torch.zeros_like(grads[0])
    for g in grads:
        v = alpha * v + (1 - alpha) * g * g
        gbar = alpha * gbar + (1 - alpha) * g
    p_hand = ((v - gbar * gbar) if centered else v).sqrt() + eps
    pre = preconditioner(opt)
    torch.testing.assert_close(pre.diag, p_hand, rtol=1e-12, atol=0)
    if momentum == 0:
        torch.testing.assert_close(thetas[-1] - thetas[-2], -lr * grads[-1] / pre.diag, rtol=1e-10, atol=1e-14)
    value, name, formula = edge_threshold(opt)
    assert name == "threshold_rmsprop"
    assert value == pytest.approx((2 + 2 * momentum) / lr)


def test_adagrad_preconditioner_matches_hand_update_rule():
    model = mlp()
    lr, decay, eps, init = 0.05, 0.1, 1e-10, 0.2
    opt = torch.optim.Adagrad(model.parameters(), lr=lr, lr_decay=decay, eps=eps, initial_accumulator_value=init)
    with pytest.raises(ValueError, match="has not stepped yet"):  # Adagrad fills its state at construction
        preconditioner(opt)
    grads, thetas = train(model, opt, steps=3)
    s = init + sum(g * g for g in grads)
    p_hand = (1 + 2 * decay) * (s.sqrt() + eps)
    pre = preconditioner(opt)
    torch.testing.assert_close(pre.diag, p_hand, rtol=1e-12, atol=0)
    torch.testing.assert_close(thetas[-1] - thetas[-2], -lr * grads[-1] / pre.diag, rtol=1e-10, atol=1e-14)
    assert edge_threshold(opt).value == pytest.approx(2 / lr)


def test_sgd_is_identity_and_thresholds():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = preconditioner(opt)  # no state needed: P = I
    assert bool((pre.diag == 1).all()) and pre.rule == "sgd"
    assert edge_threshold(opt) == (pytest.approx(38.0), "threshold_sgd", "(2 + 2β)/η (heavy ball)")
    assert edge_threshold(torch.optim.SGD(model.parameters(), lr=0.1)).value == pytest.approx(20.0)
    nest = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    assert edge_threshold(nest).value == pytest.approx(3.8 / 2.8 / 0.1)
    damp = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    assert edge_threshold(damp).value == pytest.approx(3.8 / 0.05)
    adam = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999))
    assert edge_threshold(adam).value == pytest.approx(3800.0)  # 38/η
    assert edge_threshold(adam, lr=0.02).value == pytest.approx(1900.0)
    two = torch.optim.Adam([{"params": model[0].parameters(), "betas": (0.9, 0.999)},
                            {"params": model[2].parameters(), "betas": (0.8, 0.999)}], lr=0.01)
    with pytest.raises(ValueError, match="no single stability threshold"):
        edge_threshold(two)


def test_heavy_ball_threshold_is_the_linear_stability_edge():
    """On a 1-D quadratic λθ²/2, heavy-ball/Nesterov/Adam-with-frozen-P diverge just above the threshold."""
    def grows(cls, lam, **kw):
        theta = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        opt = cls([theta], **kw)
        for _ in range(3000):
            opt.zero_grad()
            (0.5 * lam * theta**2).sum().backward()
            opt.step()
        return float(theta.detach().abs()) > 1.0

    for kw in ({"lr": 0.1, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.9, "nesterov": True},
               {"lr": 0.1, "momentum": 0.6, "dampening": 0.3}, {"lr": 0.1}):
        edge = edge_threshold(torch.optim.SGD([torch.zeros(1, requires_grad=True)], **kw)).value
        assert not grows(torch.optim.SGD, 0.98 * edge, **kw)
        assert grows(torch.optim.SGD, 1.02 * edge, **kw)


def test_maximize_flips_the_sign():
    model = mlp()
    x, y = data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, maximize=True)
    train(model, opt, steps=2)
    pre = preconditioner(opt)
    assert pre.sign == -1
    op = HessianOperator(model, mse, [(x, y)])
    v = torch.randn(op.dim, dtype=torch.float64)
    D = pre.diag.rsqrt()
    torch.testing.assert_close(PreconditionedOperator(op, pre).matvec(v), -D * op.matvec(D * v))


def test_refusals_and_registration():
    model = mlp()
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match="^no preconditioner rule for optimizer LBFGS; register one with"):
        preconditioner(lbfgs)
    with pytest.raises(ValueError, match="no preconditioner rule for optimizer LBFGS"):
        edge_threshold(lbfgs)
    with pytest.raises(ValueError, match="has not stepped yet"):
        preconditioner(torch.optim.Adam(model.parameters()))
    other = nn.Linear(2, 2).double()
    opt = torch.optim.Adam(model.parameters())
    train(model, opt, steps=1)
    with pytest.raises(ValueError, match="not held by the optimizer"):
        preconditioner(opt, list(other.parameters()))
    op = HessianOperator(model, mse, [data()])
    with pytest.raises(ValueError, match="shape"):
        PreconditionedOperator(op, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        PreconditionedOperator(op, torch.zeros(op.dim, dtype=torch.float64))

    class Scaled(torch.optim.SGD):
        """A toy adaptive method: θ ← θ − η g / c with a per-parameter constant c in its state."""

    register_preconditioner(Scaled, PreconditionerRule(
        "scaled", "P = c", lambda state, group, p: torch.full_like(p, state["c"]), lambda g, lr: (2 / lr, "2/η")))
    scaled = Scaled(model.parameters(), lr=0.1)
    for p in model.parameters():
        scaled.state[p]["c"] = 4.0
        scaled.state[p]["step"] = 1
    assert bool((preconditioner(scaled).diag == 4).all())
    assert edge_threshold(scaled).name == "threshold_scaled"

    class Plain(torch.optim.SGD):
        pass

    register_preconditioner(Plain, lambda state, group, p: torch.full_like(p, 2.0))
    plain = Plain(model.parameters(), lr=0.1)
    for p in model.parameters():
        plain.state[p]["step"] = 3
    assert bool((preconditioner(plain).diag == 2).all()) and edge_threshold(plain).value == pytest.approx(20)


def test_lscape_optim_wrappers_read_the_base_state():
    from lscape.optim import SAM

    model = mlp()
    x, y = data()
    opt = SAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=0.01)

    def closure():
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    pre = preconditioner(opt)
    assert pre.optimizer == "Adam" and pre.step == 2
    torch.testing.assert_close(pre.diag, preconditioner(opt.base).diag)
    assert edge_threshold(opt).value == pytest.approx(3800.0)


def test_power_iteration_on_the_preconditioned_operator():
    model = mlp(5)
    x, y = data()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train(model, opt, steps=3)
    op = HessianOperator(model, mse, [(x, y)])
    pop = PreconditionedOperator(op, preconditioner(opt, op.params))
    dense = float(torch.linalg.eigvalsh(dense_matrix(pop)).abs().max())
    got = power_iteration(pop, k=1, iters=5000, tol=1e-14)
    assert abs(abs(float(got.eigenvalues[0])) - dense) <= 1e-6 * dense
