"""SAM and ASAM against their update rules, the quadratic 2-cycle and the SAM-edge."""

import math

import pytest
import torch
from torch import nn

from lscape.plugins.optim import SAM, sam_edge


def _quadratic(lams, theta0):
    theta = nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    lam = torch.tensor(lams, dtype=torch.float64)

    def closure():
        theta.grad = None
        loss = 0.5 * (lam * theta * theta).sum()
        loss.backward()
        return loss.detach()

    return theta, lam, closure


def test_sam_quadratic_gradient_norm_goes_to_half_and_sam_edge_to_lambda_max():
    theta, lam, closure = _quadratic([10.0, 3.0, 1.0, 0.3], [1.0, 1.0, 1.0, 1.0])
    opt = SAM(torch.optim.SGD([theta], lr=0.1), rho=0.05)
    norms = []
    for _ in range(400):
        opt.step(closure)
        norms.append(opt.stats["grad_norm"])
    # ηρλ₁²/(2 − ηλ₁) = 0.1·0.05·100/1 = 0.5; eps = 1e-5 shifts it by ~1e-5
    assert norms[-1] == pytest.approx(0.5, abs=1e-3)
    assert norms[-2] == pytest.approx(0.5, abs=1e-3)
    assert sam_edge(norms[-1], lr=0.1, rho=0.05) == pytest.approx(10.0, rel=1e-3)
    # the iterate is a 2-cycle on e₁: the other coordinates have died out
    assert theta[1:].abs().max() < 1e-4  # the λ = 0.3 direction shrinks by 0.969 a step
    assert theta[0].abs().item() == pytest.approx(0.05, rel=1e-3)


def test_sam_edge_formula_solves_its_defining_equation():
    for g, lr, rho in [(0.5, 0.1, 0.05), (2.0, 0.25, 0.2), (1e-3, 0.01, 0.1)]:
        lam = sam_edge(g, lr, rho)
        assert lr * lam * (1 + rho * lam / g) == pytest.approx(2.0, rel=1e-9)
        assert lam == pytest.approx(g / (2 * rho) * (math.sqrt(1 + 8 * rho / (lr * g)) - 1), rel=1e-9)
    assert sam_edge(0.7, 0.1, 0.0) == 20.0


def _mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def _closure(model, batch):
    def closure():
        model.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        return loss.detach()

    return closure


def test_sam_with_rho_zero_is_the_base_optimizer_bit_for_bit():
    a, b = _mlp(), _mlp()
    base_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sam = SAM(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3), rho=0.0)
    for batch in _batches():
        la = _closure(a, batch)()
        base_a.step()
        lb = sam.step(_closure(b, batch))
        assert torch.equal(la, lb)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_sam_step_uses_gradient_at_the_normalised_ascent_point_of_the_same_batch():
    model = _mlp().double()
    batch = tuple(t.double() for t in _batches(1)[0])
    theta = [p.detach().clone() for p in model.parameters()]
    g = torch.autograd.grad(nn.functional.mse_loss(model(batch[0]), batch[1]), list(model.parameters()))
    norm = torch.sqrt(sum((x * x).sum() for x in g))
    with torch.no_grad():
        for p, gi in zip(model.parameters(), g):
            p.add_(0.1 * gi / (norm + 1e-5))
    g_tilde = torch.autograd.grad(nn.functional.mse_loss(model(batch[0]), batch[1]), list(model.parameters()))
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta):
            p.copy_(t)
    SAM(torch.optim.SGD(model.parameters(), lr=0.5), rho=0.1).step(_closure(model, batch))
    for p, t, gt in zip(model.parameters(), theta, g_tilde):
        torch.testing.assert_close(p.detach(), t - 0.5 * gt, rtol=1e-12, atol=1e-12)


def test_asam_perturbation_is_rho_T2g_over_norm_Tg():
    lams = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    theta0 = torch.tensor([0.3, -2.0, 0.0, 1.5], dtype=torch.float64)
    theta, lam, closure = _quadratic(lams.tolist(), theta0.tolist())
    rho, eta, lr = 0.5, 0.01, 0.1
    SAM(torch.optim.SGD([theta], lr=lr), rho=rho, adaptive=True, eta=eta).step(closure)
    g = lam * theta0
    T = theta0.abs() + eta
    e = rho * T * T * g / (torch.linalg.vector_norm(T * g) + 1e-5)
    expected = theta0 - lr * lam * (theta0 + e)
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-12, atol=1e-12)


def test_sam_updates_batchnorm_running_stats_once_per_step_at_the_unperturbed_point():
    model, ref = _mlp(bn=True), _mlp(bn=True)
    batch = _batches(1)[0]
    SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, model=model).step(_closure(model, batch))
    ref.train()
    with torch.no_grad():
        ref(batch[0])  # one forward at θ: what one plain step does to the statistics
    bn, bn_ref = model[1], ref[1]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)


def test_sam_without_a_closure_is_a_clear_error():
    theta, _, _ = _quadratic([1.0], [1.0])
    with pytest.raises(ValueError, match="closure"):
        SAM(torch.optim.SGD([theta], lr=0.1)).step(None)


def test_sam_state_dict_round_trips_base_and_step_count():
    theta, _, closure = _quadratic([1.0, 2.0], [1.0, 1.0])
    opt = SAM(torch.optim.SGD([theta], lr=0.1, momentum=0.9), rho=0.05)
    opt.step(closure)
    other = SAM(torch.optim.SGD([theta], lr=0.1, momentum=0.9), rho=0.05)
    other.load_state_dict(opt.state_dict())
    assert other.t == 1
    assert torch.equal(other.base.state[theta]["momentum_buffer"], opt.base.state[theta]["momentum_buffer"])


def test_rho_per_param_group_scales_each_groups_ascent_with_the_global_norm():
    # davda54/sam: e_p = ρ_group · g_p / ‖g‖ with ‖g‖ over all groups; on ½Σλθ² the gradient
    # at θ + e is λ(θ + e), so one step with lr gives θ − lr·λ(θ + e)
    a = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    la, lb = torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    a0, b0 = a.detach().clone(), b.detach().clone()

    def closure():
        a.grad = b.grad = None
        loss = 0.5 * (la * a * a).sum() + 0.5 * (lb * b * b).sum()
        loss.backward()
        return loss.detach()

    base = torch.optim.SGD([{"params": [a], "rho": 0.1}, {"params": [b], "rho": 0.4}], lr=0.2)
    SAM(base, rho=0.05).step(closure)
    ga, gb = la * a0, lb * b0
    norm = torch.sqrt((ga * ga).sum() + (gb * gb).sum()) + 1e-5
    torch.testing.assert_close(a.detach(), a0 - 0.2 * la * (a0 + 0.1 * ga / norm), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(b.detach(), b0 - 0.2 * lb * (b0 + 0.4 * gb / norm), rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="rho must be a number"):
        SAM(torch.optim.SGD([{"params": [a], "rho": -1.0}], lr=0.1))


def test_asam_unscaled_bias_rule_is_kwon_et_al():
    # SamsungLabs/ASAM: T = |w| + η only for parameters named '*weight*', T = 1 for biases
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = torch.autograd.grad(nn.functional.mse_loss(model(x), y), [model.weight, model.bias])
    rho, eta = 0.3, 0.01
    Tw = w0.abs() + eta
    norm = torch.sqrt(((Tw * gw) ** 2).sum() + (gb**2).sum()) + 1e-5
    ew, eb = rho * Tw * Tw * gw / norm, rho * gb / norm
    with torch.no_grad():
        model.weight.add_(ew)
        model.bias.add_(eb)
    gw2, gb2 = torch.autograd.grad(nn.functional.mse_loss(model(x), y), [model.weight, model.bias])
    with torch.no_grad():
        model.weight.copy_(w0)
        model.bias.copy_(b0)

    def closure():
        model.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss.detach()

    SAM(torch.optim.SGD(model.parameters(), lr=0.5), rho=rho, adaptive=True, eta=eta, model=model,
        asam_bias="unscaled").step(closure)
    torch.testing.assert_close(model.weight.detach(), w0 - 0.5 * gw2, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(model.bias.detach(), b0 - 0.5 * gb2, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="needs the model"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.5), adaptive=True, asam_bias="unscaled")


def test_sam_plugin_sets_group_rho_and_refuses_a_wrong_count():
    from types import SimpleNamespace

    from lscape.errors import UsageError
    from lscape.plugins.optim.sam import SamStep

    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    SamStep(group_rho="0.1,0.2").build(SimpleNamespace(optimizer=opt, model=None))
    assert [g["rho"] for g in opt.param_groups] == [0.1, 0.2]
    with pytest.raises(UsageError, match="2 param groups"):
        SamStep(group_rho="0.1").build(SimpleNamespace(optimizer=opt, model=None))
    with pytest.raises(UsageError, match="group_rho"):
        SamStep(group_rho="0.1,nan").build(SimpleNamespace(optimizer=opt, model=None))
