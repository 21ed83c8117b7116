"""Issue 20 through the probes: kind=preconditioned, eos's threshold for every optimizer, batch
sharpness in eos, and the critical-sharpness probe, each against the library on the same point."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import lscape
from lscape.curvature import (HessianOperator, PreconditionedOperator, batch_sharpness, critical_sharpness,
                              dense_matrix, preconditioner)
from lscape.data import derived_seed, fixed_batches
from lscape.store import RunReader

WORKLOAD = dict(
    model="mlp",
    model_opts={"widths": "16,16", "activation": "tanh"},
    data="synthetic",
    data_opts={"task": "regression", "n": 80, "dim": 4, "outputs": 1, "noise": 0.5},
    loss="mse",
    batch_size="full",
    progress=False,
    eval_schedule="never",
    checkpoint_schedule="never",
)


def _eos(tmp_path, name, **kw):
    result = lscape.run(out=str(tmp_path / f"{name}.zarr"), **WORKLOAD, steps=5, plugins=["eos"],
                        plugin_options={"eos": {"every": 2, "norm": False}}, **kw)
    assert result.status == "completed"
    reader = RunReader(result.path)
    return reader.read("eos"), reader.group_attrs("eos")


def _problem(seed=0, n=24):
    torch.manual_seed(seed)
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    return model, x, y


@pytest.mark.slow
def test_eos_records_adams_threshold_38_over_lr_and_the_preconditioned_lambda_max(tmp_path):
    d, attrs = _eos(tmp_path, "adam", optimizer="adam", momentum=0.9, lr=0.01)
    np.testing.assert_allclose(d["threshold"], 38 / 0.01)
    np.testing.assert_allclose(d["threshold_gd"], 2 / 0.01)  # kept: the GD threshold beside it
    assert attrs["threshold_name"] == "threshold_adam" and attrs["threshold_formula"] == "(2 + 2β₁)/((1 − β₁)η)"
    assert attrs["preconditioner_rule"] == "adam" and attrs["matrix_preconditioned"] == "P^-1/2 H P^-1/2 (adam)"
    assert list(d["step"]) == [0, 2, 4]
    # before Adam's first update there is no P; afterwards a Lanczos solve of its own
    assert math.isnan(d["lambda_max_preconditioned"][0]) and math.isnan(d["preconditioned_ratio"][0])
    pre = d["lambda_max_preconditioned"][1:]
    assert np.all(np.isfinite(pre)) and np.all(d["preconditioned_products"][1:] > 0)
    assert np.all(pre > 10 * d["lambda_max"][1:])  # P⁻¹ ~ 1/(√v̂ + ε) ≫ 1 at these gradient sizes
    np.testing.assert_allclose(d["preconditioned_ratio"][1:], pre / (38 / 0.01))


@pytest.mark.slow
def test_eos_records_the_heavy_ball_threshold_and_two_over_lr_for_sgd(tmp_path):
    d, attrs = _eos(tmp_path, "momentum", optimizer="sgd", momentum=0.9, lr=0.05)
    np.testing.assert_allclose(d["threshold"], (2 + 2 * 0.9) / 0.05)
    assert attrs["threshold_formula"] == "(2 + 2β)/η (heavy ball)" and attrs["preconditioner_rule"] == "sgd"
    # P = I: the preconditioned λ_max is λ_max itself, at no extra product
    np.testing.assert_array_equal(d["lambda_max_preconditioned"], d["lambda_max"])
    assert np.all(d["preconditioned_products"] == 0)
    np.testing.assert_allclose(d["preconditioned_ratio"], d["lambda_max"] / d["threshold"])
    d, attrs = _eos(tmp_path, "gd", optimizer="sgd", lr=0.05)
    np.testing.assert_allclose(d["threshold"], 2 / 0.05)
    np.testing.assert_array_equal(d["threshold"], d["threshold_gd"])
    assert attrs["threshold_formula"] == "2/η"


def test_eos_with_an_optimizer_it_has_no_rule_for_still_measures(tmp_path):
    d, attrs = _eos(tmp_path, "adamax", optimizer="torch.optim:Adamax", lr=0.01)
    assert np.all(np.isfinite(d["lambda_max"])) and np.all(np.isnan(d["threshold"]))
    assert attrs["threshold_name"] == "none" and "Adamax" in attrs["threshold_formula"]


def test_kind_preconditioned_is_refused_for_an_optimizer_without_a_rule(tmp_path, cli):
    out = tmp_path / "bad.zarr"
    code, _, err = cli("run", "--model", "mlp", "--data", "synthetic", "--steps", "2", "--optimizer",
                       "torch.optim:Adamax", "--plugin", "sharpness", "-o", "sharpness.kind=preconditioned",
                       "--out", out, "--no-progress")
    assert code == 2 and not out.exists()
    assert "sharpness.kind" in err and "Adamax" in err and len(err.strip().splitlines()) == 1


def test_kind_preconditioned_through_sharpness_and_hessian_equals_the_library(tmp_path):
    model, x, y = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    options = {"sharpness": {"kind": "preconditioned", "every": 2, "tol": 1e-9, "max_iter": 200},
               "hessian": {"kind": "preconditioned", "every": 2, "k": 2, "tol": 1e-9, "trace_schedule": "never",
                           "density_schedule": "never"}}
    expected = {}
    with lscape.attach(model, opt, F.mse_loss, train_data=TensorDataset(x, y), batch_size="full",
                       plugins=["sharpness", "hessian"], plugin_options=options, out=str(tmp_path / "p.zarr"),
                       progress=False) as run:
        for step in range(5):
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            if step in (2, 4):  # what the probes see: θ_t and Adam's state after t updates
                op = HessianOperator(model, F.mse_loss, [(x, y)])
                dense = dense_matrix(PreconditionedOperator(op, preconditioner(opt, op.params)))
                expected[step] = torch.linalg.eigvalsh(dense).flip(0)[:2].numpy()
            run.step((x, y), loss)
    reader = RunReader(tmp_path / "p.zarr")
    sharp, top = reader.read("sharpness"), reader.read("hessian")
    assert list(sharp["step"]) == [2, 4] == list(top["step"])  # step 0: Adam has no state yet
    for row, step in enumerate((2, 4)):
        assert sharp["lambda_max"][row] == pytest.approx(expected[step][0], rel=1e-6)
        np.testing.assert_allclose(top["top_eigenvalues"][row], expected[step], rtol=1e-6)
    attrs = reader.group_attrs("sharpness")
    assert attrs["matrix"] == "P^-1/2 H P^-1/2 (adam)" and attrs["preconditioner_rule"] == "adam"
    assert "β₁" in attrs["preconditioner_formula"]
    assert reader.group_attrs("hessian")["matrix"] == "P^-1/2 H P^-1/2 (adam)"


@pytest.mark.slow
def test_eos_batch_sharpness_equals_the_library_on_the_same_batches(tmp_path):
    model, x, y = _problem(n=40)
    data = TensorDataset(x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {}
    with lscape.attach(model, opt, F.mse_loss, train_data=data, batch_size=8, plugins=["eos"], seed=3,
                       plugin_options={"eos": {"every": 3, "batch_sharpness": 7, "norm": False}},
                       out=str(tmp_path / "bs.zarr"), progress=False) as run:
        for step in range(4):
            xb, yb = x[8 * step: 8 * step + 8], y[8 * step: 8 * step + 8]
            loss = F.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            if step in (0, 3):
                # the batches eos draws: 5 disjoint batches of a shuffle, then 2 of the next one
                drawn = (fixed_batches(data, 8, 5, derived_seed(3, "batch-sharpness", step, 0))
                         + fixed_batches(data, 8, 2, derived_seed(3, "batch-sharpness", step, 1)))
                expected[step] = batch_sharpness(model, F.mse_loss, drawn, mode="train")
            run.step((xb, yb), loss)
    d = RunReader(tmp_path / "bs.zarr").read("eos")
    assert list(d["step"]) == [0, 3]
    for row, step in enumerate((0, 3)):
        assert d["batch_sharpness"][row] == pytest.approx(expected[step].value, rel=1e-9)
        assert d["batch_sharpness_stderr"][row] == pytest.approx(expected[step].stderr, rel=1e-9)
        assert d["batch_sharpness_products"][row] == 7
    assert np.all(d["threshold_gd"] == 2 / 0.1)


class _Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_critical_sharpness_probe_along_the_actual_update_in_at_most_ten_forwards(tmp_path, optimizer):
    inner, x, y = _problem(n=32)
    model = _Counting(inner)
    lr = 0.05 if optimizer == "sgd" else 0.01
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    forwards, expected = {}, {}
    with lscape.attach(model, opt, F.mse_loss, train_data=TensorDataset(x, y), batch_size="full",
                       plugins=["critical-sharpness"], plugin_options={"critical-sharpness": {"every": 2}},
                       out=str(tmp_path / "cs.zarr"), progress=False) as run:
        for step in range(5):
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            before = [p.detach().clone() for p in model.parameters()]
            calls = model.calls
            run.step((x, y), loss)
            forwards[step] = model.calls - calls
            if step % 2 == 0:  # the library on the same point and update, θ_t + η u
                after = [p.detach().clone() for p in model.parameters()]
                update = torch.cat([(a - b).reshape(-1) for a, b in zip(after, before)]) / lr
                with torch.no_grad():
                    for p, b in zip(model.parameters(), before):
                        p.copy_(b)
                expected[step] = critical_sharpness(HessianOperator(model, F.mse_loss, [(x, y)]), update)
                with torch.no_grad():
                    for p, a in zip(model.parameters(), after):
                        p.copy_(a)
    d = RunReader(tmp_path / "cs.zarr").read("critical-sharpness")
    assert list(d["step"]) == [0, 2, 4]
    for row, step in enumerate((0, 2, 4)):
        cs = expected[step]
        assert cs.converged and d["critical_converged"][row]
        assert d["critical_sharpness"][row] == pytest.approx(cs.value, rel=1e-9)
        assert d["critical_sharpness_lower"][row] <= d["critical_sharpness"][row] <= d["critical_sharpness_upper"][row]
        assert d["critical_forwards"][row] == forwards[step] == cs.num_loss_evals <= 10
    assert forwards[1] == forwards[3] == 0  # not due: no snapshot, no forward
    np.testing.assert_allclose(d["threshold_gd"], 2 / lr)
