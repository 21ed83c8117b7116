"""The curvature toolkit checked against exact dense Hessians of small float64 models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lscape import params as lparams
from lscape.curvature import (
    HessianOperator,
    dense_hessian,
    dense_matrix,
    dense_spectrum,
    distributed,
    gaussian_density,
    gradient,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
    slq_density,
)
from lscape.curvature.errors import CurvatureArgumentError

ce = nn.functional.cross_entropy


def mse_onehot(output, target):
    return nn.functional.mse_loss(output, nn.functional.one_hot(target, output.shape[-1]).to(output.dtype))


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).double()


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32, 10),
    ).double()  # fmt: skip


def mlp_batches(seed=1, sizes=(40, 24)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)) for n in sizes]


def cnn_batches(seed=1, sizes=(32, 20)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)) for n in sizes]


def reference_hessian(model, loss_fn, batches):
    """Independent dense Hessian: torch.autograd.functional.hessian of the pooled mean loss."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    names = [n for n, _ in model.named_parameters()]
    like = [p for _, p in model.named_parameters()]

    def loss_of(flat):
        weights = dict(zip(names, lparams.unflatten(flat, like)))
        return loss_fn(torch.func.functional_call(model, weights, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, lparams.flat_parameters(like))


@pytest.fixture(scope="module")
def mlp_case():
    model, batches = make_mlp(), mlp_batches()
    op = HessianOperator(model, ce, batches)
    return model, batches, dense_matrix(op)


@pytest.fixture(scope="module")
def cnn_case():
    model, batches = make_cnn(), cnn_batches()
    op = HessianOperator(model, ce, batches)
    return model, batches, dense_matrix(op)


# -- products -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,cache",
    [("double-backward", True), ("double-backward", False), ("forward-over-reverse", False), ("auto", None)],
)
def test_hvp_methods_match_independent_dense_hessian(method, cache):
    model, batches = make_mlp(), mlp_batches()
    exact = reference_hessian(model, ce, batches)
    op = HessianOperator(model, ce, batches, method=method, cache_graph=cache)
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(op.matvec(v), exact @ v, rtol=1e-10, atol=1e-12)
    block = torch.randn(5, op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(block), block @ exact, rtol=1e-10, atol=1e-12)
    assert op.num_products == 6


def test_unequal_batches_are_weighted_by_size():
    """Two batches of 40 and 24 examples give the Hessian and gradient of the pooled mean loss."""
    model, batches = make_mlp(), mlp_batches(sizes=(40, 24))
    pooled = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    split_op, pooled_op = HessianOperator(model, ce, batches), HessianOperator(model, ce, pooled)
    v = torch.randn(split_op.dim, dtype=torch.float64)
    torch.testing.assert_close(split_op.matvec(v), pooled_op.matvec(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradient(model, ce, batches), gradient(model, ce, pooled), rtol=1e-10, atol=1e-12)
    assert split_op.num_samples == 64


def test_parameter_subset_is_a_block_of_the_full_hessian(mlp_case):
    model, batches, full = mlp_case
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    start = sum(sizes[:2])  # "2.*" is the second Linear layer: names[2], names[3]
    stop = start + sizes[2] + sizes[3]
    assert names[2:4] == ["2.weight", "2.bias"]
    sub = dense_hessian(model, ce, batches, params="2")
    torch.testing.assert_close(sub, full[start:stop, start:stop], rtol=1e-10, atol=1e-12)
    by_tensor = HessianOperator(model, ce, batches, params=[model[2].weight, model[2].bias])
    assert by_tensor.names == ["2.weight", "2.bias"]
    with pytest.raises(CurvatureArgumentError, match="no parameter matches nothing_called_this") as raised:
        HessianOperator(model, ce, batches, params="nothing_called_this")
    assert raised.value.argument == "params" and isinstance(raised.value, ValueError)


def test_ggn_equals_jacobian_transpose_output_hessian_jacobian():
    model, batches = make_mlp(), mlp_batches(sizes=(10, 6))
    names = [n for n, _ in model.named_parameters()]
    like = [p for _, p in model.named_parameters()]
    flat = lparams.flat_parameters(like)
    for loss_fn in (ce, mse_onehot):
        expected = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
        for x, y in batches:
            def output_of(theta):
                return torch.func.functional_call(model, dict(zip(names, lparams.unflatten(theta, like))), (x,))
            out = output_of(flat)
            jac = torch.autograd.functional.jacobian(output_of, flat).reshape(out.numel(), -1)
            h_out = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out.detach()).reshape(out.numel(), -1)
            expected += len(x) * jac.T @ h_out @ jac
        expected /= sum(len(b[0]) for b in batches)
        ggn = dense_hessian(model, loss_fn, batches, kind="ggn")
        torch.testing.assert_close(ggn, expected, rtol=1e-9, atol=1e-12)
        assert torch.linalg.eigvalsh(ggn).min() > -1e-12  # PSD for convex losses


def test_model_state_is_untouched_in_train_mode():
    """BatchNorm running stats, dropout RNG, modes and .grad survive products and gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Dropout(0.3), nn.Linear(10, 3)).double()
    model.eval()
    model[4].weight.grad = torch.full_like(model[4].weight, 7.0)
    batches = [(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,)))]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    results = []
    for method in ("double-backward", "forward-over-reverse"):
        op = HessianOperator(model, ce, batches, mode="train", method=method)
        v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        results.append(op.matvec(v))
        # The operator is a fixed symmetric matrix even with dropout active.
        h = dense_matrix(op)
        raw = op.matmat(torch.eye(op.dim, dtype=torch.float64))
        torch.testing.assert_close(raw, raw.T, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(h @ v, results[-1], rtol=1e-9, atol=1e-12)
        op.gradient()
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-12)
    assert not model.training and not any(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model[4].weight.grad, torch.full_like(model[4].weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "4.weight")


def test_eval_and_train_modes_differ_with_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Dropout(0.5), nn.Linear(10, 3)).double()
    batches = [(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,)))]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    hv_eval = HessianOperator(model, ce, batches, mode="eval").matvec(v)
    hv_train = HessianOperator(model, ce, batches, mode="train").matvec(v)
    assert not torch.allclose(hv_eval, hv_train)


# -- eigenvalues --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mlp_case", "cnn_case"])
def test_lanczos_matches_exact_hessian_top1_and_top5(case, request):
    model, batches, h = request.getfixturevalue(case)
    exact = torch.linalg.eigvalsh(h).flip(0)
    for k in (1, 5):
        op = HessianOperator(model, ce, batches)
        result = lanczos(op, k=k, tol=1e-6)
        assert result.all_converged
        rel = (result.eigenvalues - exact[:k]).abs() / exact[:k].abs()
        assert rel.max() < 1e-4, (result.eigenvalues, exact[:k])
        assert result.num_products == op.num_products < op.dim


@pytest.mark.parametrize("which", ["LA", "LM", "SA"])
def test_lanczos_residuals_are_honest(which, cnn_case):
    """The reported ‖Hv − λv‖ equals the residual computed with the dense Hessian."""
    model, batches, h = cnn_case
    for tol in (1e-2, 1e-6):
        result = lanczos(HessianOperator(model, ce, batches), k=3, which=which, tol=tol)
        vectors = result.eigenvectors
        true = (vectors @ h - result.eigenvalues[:, None] * vectors).norm(dim=1)
        torch.testing.assert_close(result.residuals, true, rtol=1e-6, atol=1e-12 * float(h.norm()))
        # Every Ritz value is within its residual of a true eigenvalue.
        exact = torch.linalg.eigvalsh(h)
        gaps = (result.eigenvalues[:, None] - exact[None, :]).abs().min(dim=1).values
        assert (gaps <= result.residuals + 1e-12).all()


def test_lanczos_which_selects_the_right_end(cnn_case):
    model, batches, h = cnn_case
    exact = torch.linalg.eigvalsh(h)
    op = HessianOperator(model, ce, batches)
    smallest = lanczos(op, k=2, which="SA", tol=1e-7)
    torch.testing.assert_close(smallest.eigenvalues, exact[:2], rtol=1e-4, atol=1e-7 * float(exact.abs().max()))
    largest_magnitude = lanczos(op, k=2, which="LM", tol=1e-7)
    by_magnitude = exact[exact.abs().argsort(descending=True)][:2]
    torch.testing.assert_close(largest_magnitude.eigenvalues, by_magnitude, rtol=1e-4, atol=0)


def test_lanczos_warm_start_after_a_small_step_needs_few_products():
    model, batches = make_cnn(), cnn_batches()
    params = list(model.parameters())
    first = lanczos(HessianOperator(model, ce, batches), k=1, tol=1e-3)
    with torch.no_grad():  # probes may call the toolkit under no_grad
        g = gradient(model, ce, batches)
        lparams.set_flat_parameters(params, lparams.flat_parameters(params) - 0.02 * g)
    cold = lanczos(HessianOperator(model, ce, batches), k=1, tol=1e-3, seed=5)
    warm = lanczos(HessianOperator(model, ce, batches), k=1, tol=1e-3, v0=first.eigenvectors)
    assert warm.all_converged and cold.all_converged
    assert abs(warm.eigenvalues[0] - cold.eigenvalues[0]) <= 1e-3 * abs(cold.eigenvalues[0])
    # A warm start also multiplies a fresh random direction and verifies (it must not hide
    # an eigenvalue the previous vector misses), so it saves fewer products than it used to.
    assert warm.num_products < cold.num_products and warm.verified


def test_lanczos_restarts_on_an_invariant_subspace():
    """Starting from an exact eigenvector, Lanczos still finds the other top eigenpairs."""
    diag = torch.tensor([5.0, 4.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    op = _MatrixOperator(torch.diag(diag))
    result = lanczos(op, k=3, tol=1e-10, v0=torch.eye(6, dtype=torch.float64)[3])
    torch.testing.assert_close(result.eigenvalues, diag[:3])


def test_power_iteration_with_deflation_finds_top_eigenvalues(mlp_case):
    model, batches, h = mlp_case
    exact = torch.linalg.eigvalsh(h).flip(0)
    result = power_iteration(HessianOperator(model, ce, batches), k=2, iters=500, tol=1e-8)
    torch.testing.assert_close(result.eigenvalues, exact[:2], rtol=1e-3, atol=0)
    true = (result.eigenvectors @ h - result.eigenvalues[:, None] * result.eigenvectors).norm(dim=1)
    torch.testing.assert_close(result.residuals, true, rtol=1e-6, atol=1e-12)


# -- trace and density --------------------------------------------------------------------


@pytest.mark.parametrize("estimator,n", [(hutchinson, 40), (hutchpp, 42)])
def test_trace_within_two_standard_errors_in_90_percent_of_trials(estimator, n, cnn_case):
    model, batches, h = cnn_case
    op = HessianOperator(model, ce, batches)
    exact = float(h.trace())
    trials = 20
    inside = 0
    for seed in range(trials):
        estimate, stderr = estimator(op, n, seed=seed)
        inside += abs(estimate - exact) <= 2 * stderr
    assert inside >= 0.9 * trials
    assert op.num_products == trials * n


def test_hutchpp_beats_hutchinson_on_a_low_rank_spectrum():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
    values = torch.cat([torch.linspace(100, 50, 10), torch.full((190,), 0.01)]).double()
    op = _MatrixOperator(basis @ torch.diag(values) @ basis.T)
    _, err_h = hutchinson(op, 60)
    _, err_pp = hutchpp(op, 60)
    assert err_pp < 0.1 * err_h


def test_slq_density_integrates_to_one_and_matches_exact_spectrum(cnn_case):
    model, batches, h = cnn_case
    exact = torch.linalg.eigvalsh(h)
    density = slq_density(HessianOperator(model, ce, batches), num_runs=6, num_steps=60, seed=0)
    assert abs(float(torch.trapezoid(density.density, density.grid)) - 1) < 1e-9
    torch.testing.assert_close(density.weights.sum(dim=1), torch.ones(6, dtype=torch.float64))
    reference = gaussian_density(exact, None, density.grid, density.sigma)
    l1 = float(torch.trapezoid((density.density - reference).abs(), density.grid))
    assert l1 < 0.15, l1
    # The quadrature's cumulative distribution tracks the eigenvalue histogram.
    for t in torch.quantile(exact, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)):
        slq_cdf = float((density.weights * (density.nodes <= t)).sum() / density.weights.sum())
        exact_cdf = float((exact <= t).double().mean())
        assert abs(slq_cdf - exact_cdf) < 0.1


# -- dense --------------------------------------------------------------------------------


def test_dense_spectrum_matches_reference_and_refuses_big_models():
    model, batches = make_mlp(), mlp_batches()
    spectrum = dense_spectrum(model, ce, batches, eigenvectors=True)
    torch.testing.assert_close(spectrum.eigenvalues, torch.linalg.eigvalsh(reference_hessian(model, ce, batches)))
    assert spectrum.eigenvectors.shape == (len(spectrum.eigenvalues),) * 2
    with pytest.raises(ValueError, match="exceeds the limit of 100"):
        dense_hessian(model, ce, batches, max_params=100)


def test_distributed_reduction_is_a_noop_without_a_process_group():
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    assert float(distributed.dot(t, t)) == 5.0
    assert distributed.world_size() == 1


class _MatrixOperator:
    """A dense symmetric matrix as an operator, for solver checks with known spectra."""

    def __init__(self, matrix):
        self.matrix, self.dim, self.dtype, self.device = matrix, matrix.shape[0], matrix.dtype, matrix.device
        self.num_products = 0

    def matvec(self, v):
        self.num_products += 1
        return self.matrix @ v

    def matmat(self, vs):
        self.num_products += vs.shape[0]
        return vs @ self.matrix
