"""Non-uniformity, sharpness and directional sharpness against dense Hessians of tiny models."""

import math

import pytest
import torch

from lscape.curvature import dense_hessian
from lscape.plugins.noise import nonuniformity, stability_margins
from lscape.plugins.noise.grad_noise import (
    ResampledHessian,
    directional_sharpness,
    gradient_norms,
    minibatch_noise,
    sharpness,
)
from test_noise_per_sample import dense_hessian_variance, problem


def test_nonuniformity_equals_dense_computation():
    model, loss_fn, (x, y) = problem("mlp", n=8)
    dense = dense_hessian_variance(model, loss_fn, (x, y))
    expected = torch.linalg.eigvalsh(dense)[-1]
    res = nonuniformity(model, loss_fn, [(x[:5], y[:5]), (x[5:], y[5:])], chunk_size=4, iters=80, tol=1e-8)
    assert res.converged
    assert res.eigenvalue == pytest.approx(float(expected), rel=1e-6)
    assert res.value == pytest.approx(math.sqrt(float(expected)), rel=1e-6)


def test_stability_margins():
    m = stability_margins(sharpness=10.0, nonuniformity=8.0, lr=0.1, batch_size=16)
    assert m == {"sharpness_margin": pytest.approx(0.5), "nonuniformity_margin": pytest.approx(0.2)}


def test_gradient_norms_and_minibatch_noise():
    g_hat = torch.tensor([1.0, -2.0, 0.0])
    grads = [torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0.0, -4.0, 0.0])]
    assert gradient_norms(g_hat) == {"grad_sq": 5.0, "grad_l1": 3.0, "grad_linf": 2.0}
    got = minibatch_noise(g_hat, grads)
    assert got == {"noise_sq": pytest.approx((2 + 5) / 2), "stograd_sq": pytest.approx((9 + 16) / 2),
                   "stograd_linf": pytest.approx((2 + 4) / 2)}


def test_sharpness_power_method_from_gradient_matches_dense_top_eigenvalue():
    model, loss_fn, batch = problem("mlp", n=16)
    from lscape.curvature import HessianOperator

    op = HessianOperator(model, loss_fn, [batch])
    H = dense_hessian(model, loss_fn, [batch])
    H = H.matrix if hasattr(H, "matrix") else H
    evals = torch.linalg.eigvalsh(H)
    top = evals[evals.abs().argmax()]
    res = sharpness(op, op.gradient(), iters=500, tol=1e-12)
    assert res.value == pytest.approx(float(top), rel=1e-5)
    # the seed's budget: at most 5 iterations (plus the closing product), never more
    quick = sharpness(op, op.gradient())
    assert quick.num_products <= 6 and quick.value <= float(top) + 1e-9


def test_resampled_hessian_draws_new_batches_each_product():
    model, loss_fn, (x, y) = problem("mlp", n=12)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    drawn = []

    def draw(count):
        out = [batches[(len(drawn) + i) % 3] for i in range(count)]
        drawn.extend(out)
        return out

    op = ResampledHessian(model, loss_fn, draw, count=1, mode="eval")
    v = torch.randn(op.dim, dtype=torch.float64)
    from lscape.curvature import HessianOperator

    for i in range(3):
        expected = HessianOperator(model, loss_fn, [batches[i]]).matvec(v)
        torch.testing.assert_close(op.matvec(v), expected)
    assert len(drawn) == 3


def test_directional_sharpness_matches_dense():
    model, loss_fn, (x, y) = problem("mlp", n=12)
    b1, b2, b3 = (x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])
    pairs = [(b1, b2), (b3, b1)]

    def grad_of(b):
        ps = list(model.parameters())
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model(b[0]), b[1]), ps)])

    def ratio(b, b2):
        H = dense_hessian(model, loss_fn, [b2])
        H = H.matrix if hasattr(H, "matrix") else H
        v = grad_of(b) / grad_of(b).norm()
        return float((H @ v).norm() / grad_of(b2).norm())

    expected = (ratio(b1, b2) + ratio(b3, b1)) / 2
    assert directional_sharpness(model, loss_fn, pairs) == pytest.approx(expected, rel=1e-8)
