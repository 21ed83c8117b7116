"""The HVP ladder (method="auto") and finite-difference products.

A custom autograd.Function whose backward is @once_differentiable makes double backward
silently drop its second-order path (no error); one whose backward is not differentiable
makes it raise. Both must get the λ_max of the same model written with torch.tanh, within
the recorded error, with the product chosen recorded. Normal models keep double backward
and its exact results. Finite-difference products: against the dense Hessian within their
error estimate, parameters restored bit-exactly, Richardson more accurate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.data import TensorDataset

import lscape
from lscape.curvature import HessianOperator, METHODS, dense_matrix, lanczos, products
from lscape.store import RunReader

ce = nn.functional.cross_entropy


class OnceTanh(torch.autograd.Function):
    """tanh whose backward is @once_differentiable: double backward silently treats it as constant."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _TanhGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        return g * (1 - torch.tanh(x) ** 2)

    @staticmethod
    def backward(ctx, gg):
        raise RuntimeError("this kernel has no double backward")


class RaisingTanh(torch.autograd.Function):
    """tanh whose backward is a Function without a backward of its own: double backward raises."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _TanhGrad.apply(x, g)


class Act(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


def mlp(f=torch.tanh, dtype=torch.float64, width=12):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, width), Act(f), nn.Linear(width, width), Act(f), nn.Linear(width, 3)).to(dtype)


def data(dtype=torch.float64, n=48):
    g = torch.Generator().manual_seed(1)
    return [(2 * torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))]


def lambda_max(op):
    return float(lanczos(op, k=1, tol=1e-10, max_iter=200).eigenvalues[0])


@pytest.fixture(autouse=True)
def _fresh_decisions():
    products.forget_decisions()
    yield
    products.forget_decisions()


@pytest.mark.parametrize("act,why", [(OnceTanh.apply, "disagreement"), (RaisingTanh.apply, "raised")])
def test_ladder_falls_back_to_finite_differences_for_incomplete_or_raising_double_backward(act, why):
    batches = data()
    exact = lambda_max(HessianOperator(mlp(), ce, batches))
    model = mlp(act)
    before = [p.detach().clone() for p in model.parameters()]
    op = HessianOperator(model, ce, batches)
    assert op.method == "auto" and op.method_reason is None
    value = lambda_max(op)
    assert op.method == "finite-difference"
    assert why in op.method_check["double-backward"]
    assert "finite differences of gradients used" in op.method_reason
    assert op.product_error is not None and 0 < op.product_error < 1e-6
    # within the recorded error: |Δλ| ≲ product_error·‖H‖ (λ_max = ‖H‖ here)
    assert abs(value - exact) <= 3 * op.product_error * abs(exact)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    described = op.describe()
    assert described["method"] == "finite-difference" and described["product_error"] == op.product_error
    if why == "disagreement":
        check = op.method_check["double-backward"]
        assert check["disagreement"] > 0.1 > check["tolerance"]
        # what the ladder prevents: double backward forced silently gives a different λ_max
        forced = lambda_max(HessianOperator(model, ce, batches, method="double-backward"))
        assert abs(forced - exact) > 0.05 * exact
    else:
        with pytest.raises(RuntimeError, match="no double backward"):
            forced = HessianOperator(model, ce, batches, method="double-backward")
            forced.matvec(torch.ones(op.dim, dtype=torch.float64))


def test_normal_model_keeps_double_backward_exactly_and_the_decision_is_cached():
    model, batches = mlp(), data()
    forced = dense_matrix(HessianOperator(model, ce, batches, method="double-backward"))
    op = HessianOperator(model, ce, batches)
    auto = dense_matrix(op)
    assert torch.equal(auto, forced)  # the check changes nothing for a normal model
    assert op.method == "double-backward" and op.product_error is None
    assert "agrees with finite differences" in op.method_reason
    check = op.method_check["double-backward"]
    assert check["disagreement"] <= check["tolerance"] and check["disagreement"] < 1e-8
    again = HessianOperator(model, ce, batches)
    v = torch.linspace(-1, 1, op.dim, dtype=torch.float64)
    torch.testing.assert_close(again.matvec(v), forced @ v, rtol=1e-12, atol=1e-14)
    assert again.method == "double-backward" and "decided on the first operator" in again.method_reason
    # in float32 too: the test tolerates float32 rounding of an exact product
    model32, batches32 = mlp(dtype=torch.float32), data(torch.float32)
    op32 = HessianOperator(model32, ce, batches32)
    lanczos(op32, k=1, tol=1e-4)
    assert op32.method == "double-backward"


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_finite_differences_match_the_dense_hessian_within_their_error_and_restore_parameters(dtype, bound):
    reference = dense_matrix(HessianOperator(mlp(), ce, data()))  # float64, double backward
    model, batches = mlp(dtype=dtype), [(x.to(dtype), y) for x, y in data()]
    before = [p.detach().clone() for p in model.parameters()]
    errors = {}
    for richardson in (False, True):
        op = HessianOperator(model, ce, batches, method="finite-difference", fd_richardson=richardson)
        assert op.method_reason == "asked for (method=finite-difference)" and op.method_check is None
        g = torch.Generator().manual_seed(2)
        vs = torch.randn(4, op.dim, generator=g, dtype=torch.float64)
        got = op.matmat(vs.to(dtype)).double()
        want = vs @ reference
        rel = float((torch.linalg.norm(got - want, dim=1) / torch.linalg.norm(want, dim=1)).max())
        errors[richardson] = rel
        assert op.product_error is not None and rel <= 3 * op.product_error and rel < bound
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # bit-exact restore
    assert errors[True] < errors[False]  # Richardson: O(ε⁴) instead of O(ε²)


def test_finite_difference_step_rule_and_explicit_step():
    model, batches = mlp(), data()
    op = HessianOperator(model, ce, batches, method="finite-difference")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rms = float(torch.linalg.norm(flat)) / flat.numel() ** 0.5  # a typical entry, not ‖θ‖ (which grows with width)
    u = 2.0 ** -53
    assert products.fd_step(op, 2.0) == pytest.approx(u ** (1 / 3) * max(1.0, rms) / 2.0, rel=1e-12)
    rich = HessianOperator(model, ce, batches, method="finite-difference", fd_richardson=True)
    assert products.fd_step(rich, 1.0) == pytest.approx(u ** (1 / 5) * max(1.0, rms), rel=1e-12)
    fixed = HessianOperator(model, ce, batches, method="finite-difference", fd_eps=1e-3)
    assert products.fd_step(fixed, 5.0) == 1e-3  # an explicit step is used as given (the seed's semantics)


def test_forcing_a_method_skips_the_ladder_and_the_plugin_choices_are_the_library_methods():
    from lscape.plugins.curvature.base import CURVATURE_OPTIONS
    from lscape.plugins.curvature.eos import EdgeOfStability

    model, batches = mlp(OnceTanh.apply), data()
    for method in ("double-backward", "forward-over-reverse", "finite-difference"):
        op = HessianOperator(model, ce, batches, method=method)
        assert op.method == method and op.method_reason == f"asked for (method={method})"
    ggn = HessianOperator(mlp(), ce, batches, kind="ggn")
    assert ggn.method == "output-space" and "own product" in ggn.method_reason
    assert next(o for o in CURVATURE_OPTIONS if o.name == "method").choices is METHODS
    assert next(o for o in EdgeOfStability.options if o.name == "method").choices is METHODS
    assert METHODS is products.METHODS


def _run_sharpness(tmp_path, name, act, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), Act(act), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(3)
    x, y = 2 * torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    result = lscape.run(model=model, data={"train": TensorDataset(x, y)}, loss=ce, steps=1, batch_size=32,
                        plugins=["sharpness"], plugin_options={"sharpness": {"every": 1, "tol": 1e-5, **options}},
                        progress=False, eval_schedule="never", checkpoint_schedule="never",
                        out=str(tmp_path / f"{name}.zarr"))
    assert result.status == "completed"
    reader = RunReader(result.path)
    return float(reader.read("sharpness")["lambda_max"][0]), reader.group_attrs("sharpness")


def test_sharpness_probe_records_the_product_and_matches_the_differentiable_model(tmp_path):
    exact, attrs = _run_sharpness(tmp_path, "tanh", torch.tanh)
    assert attrs["hvp_method"] == "double-backward" and attrs["hvp_product_error"] is None
    assert attrs["hvp_check"]["double-backward"]["disagreement"] <= attrs["hvp_check"]["double-backward"]["tolerance"]
    value, attrs = _run_sharpness(tmp_path, "once", OnceTanh.apply)
    assert attrs["hvp_method"] == "finite-difference"
    assert "disagrees with finite differences" in attrs["hvp_method_reason"]
    error = attrs["hvp_product_error"]
    assert 0 < error < 1e-3
    # float32 run: within the recorded product error (plus the Lanczos tolerance 1e-5)
    assert abs(value - exact) <= (3 * error + 1e-5) * abs(exact)
    forced, attrs = _run_sharpness(tmp_path, "forced", OnceTanh.apply, method="double-backward")
    assert attrs["hvp_method"] == "double-backward" and attrs["hvp_method_reason"].startswith("asked for")
    assert abs(forced - exact) > 0.05 * exact  # the silent error the ladder catches
    assert np.isfinite(value)


def test_piecewise_linear_float32_model_keeps_double_backward_marked_unverified():
    # ReLU and max-pooling: the finite-difference step crosses kinks, so the reference is too
    # inaccurate to judge; the exact product is kept and the reason says it is unverified
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 3 * 3, 5))
    batches = [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,)))]
    forced = HessianOperator(cnn, ce, batches, method="double-backward")
    op = HessianOperator(cnn, ce, batches)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    assert torch.equal(op.matvec(v), forced.matvec(v))
    assert op.method == "double-backward"
    assert op.method_check["conclusive"] is False and "unverified" in op.method_reason
    assert op.method_check["fd_error"] > 0.05  # measured 0.46: the reason the check cannot judge
