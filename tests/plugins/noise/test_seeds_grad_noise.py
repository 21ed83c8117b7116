"""grad-noise: its state survives any number of resumes, and compat=original follows the seed
(imagenet-grad-noise's utils.power_method and train.py) step for step."""

from types import SimpleNamespace

import pytest
import torch

from lscape.plugins.noise.grad_noise import GradNoise


def _ctx(n=40):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g))
    return SimpleNamespace(train_set=data, batch_size=8, config=SimpleNamespace(seed=3), device="cpu")


def _same(a, b):
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    else:
        assert a == b


def _drawn(probe, ctx, count):
    return [b[1].tolist() for b in probe._get_sampler(ctx).draw(count)]


def test_state_round_trips_before_the_first_measurement_after_a_resume():
    ctx = _ctx()
    first = GradNoise()
    _drawn(first, ctx, 3)                       # measured before the first checkpoint
    saved = first.state_dict()
    second = GradNoise()                        # resumed ...
    second.load_state_dict(saved)
    again = second.state_dict()                 # ... and checkpointed before its next measurement
    _same(saved, again)
    assert again["sampler"] is not None
    third = GradNoise()                         # the second resume continues the same batch sequence
    third.load_state_dict(again)
    _same(third.state_dict(), saved)
    assert _drawn(third, ctx, 4) == _drawn(first, ctx, 4)


def test_state_round_trip_after_measuring_and_loading_into_a_built_sampler():
    ctx = _ctx()
    a, b = GradNoise(), GradNoise()
    _drawn(a, ctx, 2)
    _drawn(b, ctx, 5)                           # b's sampler exists and is elsewhere
    b.load_state_dict(a.state_dict())
    _same(b.state_dict(), a.state_dict())
    assert _drawn(b, ctx, 3) == _drawn(a, ctx, 3)
    fresh = GradNoise()
    _same(fresh.state_dict(), {"sampler": None})
    fresh.load_state_dict(fresh.state_dict())
    _same(fresh.state_dict(), {"sampler": None})


# -- compat=original: the seed's power method and its measurement points -------------------

from torch import nn  # noqa: E402

from lscape.batch import BatchAdapter  # noqa: E402
from lscape.plugins.noise.grad_noise import seed_power_method, sharpness  # noqa: E402


class _Dense:
    def __init__(self, H):
        self.H, self.dim, self.dtype, self.device, self.products = H, H.shape[0], H.dtype, H.device, 0

    def matvec(self, v):
        self.products += 1
        return self.H @ v


def test_seed_power_method_stops_at_five_products_with_the_fifth_rayleigh_quotient():
    H = torch.diag(torch.tensor([1.0, 0.9, 0.5, 0.1], dtype=torch.float64))
    v0 = torch.ones(4, dtype=torch.float64)
    op = _Dense(H)
    res = seed_power_method(op, v0, iters=5, tol=1e-12)
    # unconverged: the quotient of v = H⁴v0/‖H⁴v0‖, i.e. v0ᵀH⁹v0 / v0ᵀH⁸v0, after exactly 5 products
    d = torch.diag(H)
    assert op.products == 5 and res.num_products == 5 and not res.converged
    assert res.value == pytest.approx(float((d**9).sum() / (d**8).sum()), rel=1e-14)
    # lscape's own power method makes a 6th product for the vector it returns: another number
    other = sharpness(_Dense(H), v0, iters=5, tol=1e-12)
    assert other.num_products == 6 and abs(other.value - res.value) > 1e-3


def test_seed_power_method_divides_the_change_by_the_new_quotient():
    H = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    v0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    mu1, mu2 = 1.5, 9 / 5                                  # v0ᵀHv0/‖v0‖², v0ᵀH³v0/v0ᵀH²v0
    r_seed, r_old = (mu2 - mu1) / mu2, (mu2 - mu1) / (mu1 + 1e-6)
    tol = (r_seed + r_old) / 2                             # met by the seed's rule only
    op = _Dense(H)
    res = seed_power_method(op, v0, iters=5, tol=tol)
    assert res.converged and op.products == 2 and res.value == pytest.approx(mu2, rel=1e-14)
    assert sharpness(_Dense(H), v0, iters=5, tol=tol).num_products > 2


def _linear_regression(n=24, d=3):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    loss_fn = lambda out, t: ((out.squeeze(-1) - t) ** 2).mean()
    return X, y, model, loss_fn


def _full_grad(X, y, w):
    return 2 * X.T @ (X @ w - y) / len(y)


def test_compat_original_measures_all_but_the_first_gradient_after_the_update():
    X, y, model, loss_fn = _linear_regression()
    n = len(y)
    # full batches (batch_size = n) so that every fresh batch is the whole data set: exact references
    ctx = SimpleNamespace(train_set=torch.utils.data.TensorDataset(X, y), batch_size=n, config=SimpleNamespace(seed=0),
                          device="cpu", model=model, loss_fn=loss_fn, adapter=BatchAdapter(loss_fn), lr=0.1, cache={},
                          store=None)
    results = {}
    for compat in ("none", "original"):
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[0.2, 0.1, -0.3]], dtype=torch.float64))
        w_t = model.weight.detach().reshape(-1).clone()
        probe = GradNoise(compat=compat, noise_size=2, sharpness_batches=1, dir_pairs=1, sharpness_tol=1e-12)
        recorded = []
        probe.record = lambda ctx, step, **values: recorded.append((step, values))
        model.zero_grad()
        loss_fn(model(X), y).backward()
        state = SimpleNamespace(step=3, batch=(X, y), lr=0.1)
        probe.run_measure(ctx, state)
        with torch.no_grad():                             # the training step θ_t → θ_{t+1}
            model.weight.sub_(0.1 * model.weight.grad)
        w_next = model.weight.detach().reshape(-1).clone()
        probe.on_step_end(ctx, state)
        (step, values), = recorded
        results[compat] = values
        g_t, g_next = _full_grad(X, y, w_t), _full_grad(X, y, w_next)
        assert step == 3
        assert values["update_size"] == pytest.approx(0.1 * float(g_t.norm()), rel=1e-10)
        assert values["change_in_grad_sq"] == pytest.approx(float(((g_next - g_t) ** 2).sum()), rel=1e-8)
        measured_at = g_next if compat == "original" else g_t
        assert values["grad_sq"] == pytest.approx(float(measured_at @ measured_at), rel=1e-8)
        assert values["noise_sq"] == pytest.approx(0.0, abs=1e-20)
        H = 2 * X.T @ X / n
        if compat == "original":
            # the seed's power method from ĝ(θ_{t+1}), five products on the (here fixed) Hessian
            ref = seed_power_method(_Dense(H), g_next, iters=5, tol=1e-12).value
        else:
            ref = sharpness(_Dense(H), g_t, iters=5, tol=1e-12).value
        assert values["sharpness"] == pytest.approx(ref, rel=1e-8)
    assert results["original"]["grad_sq"] != pytest.approx(results["none"]["grad_sq"], rel=1e-3)
