"""Curvature round two, defect 1 and 6: BatchNorm and in-place ReLU models, eval and train mode,
with every product method and every curvature probe, against independent dense Hessians."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lscape
from lscape import params as lparams
from lscape.curvature import HessianOperator, dense_matrix, hutchpp, lanczos, slq_density
from lscape.store import RunReader

ce = nn.functional.cross_entropy


def bn_mlp(width: int = 12):
    """Factory named by the probe runs: Linear → BatchNorm1d → in-place ReLU → Linear."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Linear(width, 3))


def bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * 2 * 2, 4),
    ).double()  # fmt: skip


def inplace_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _warm_bn(model, x):
    """Non-trivial running statistics, as after training."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.3 * torch.randn_like(x))
    model.eval()
    return model


def reference_hessian(model, loss_fn, batches, mode):
    """Σ_b n_b H_b / N from torch.autograd.functional.hessian on a copy (BN never updates stats)."""
    ref = copy.deepcopy(model)
    ref.train(mode == "train")
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and mode == "train":
            m.track_running_stats = False
        if isinstance(m, nn.ReLU):
            m.inplace = False  # the reference itself must not depend on the defect
    names = [n for n, _ in ref.named_parameters()]
    like = [p for _, p in ref.named_parameters()]
    buffers = dict(ref.named_buffers())
    total, count = 0, 0
    for x, y in batches:
        def loss_of(flat):
            weights = dict(zip(names, lparams.unflatten(flat, like)))
            return loss_fn(torch.func.functional_call(ref, (weights, buffers), (x,)), y)

        total = total + len(x) * torch.autograd.functional.hessian(loss_of, lparams.flat_parameters(like).detach())
        count += len(x)
    return total / count


CNN_BATCHES = None


def cnn_batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))
            for n in (12, 8)]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("factory", ["bn", "inplace"])
def test_every_method_matches_the_dense_hessian_on_bn_and_inplace_models(mode, factory):
    if factory == "bn":
        batches = cnn_batches()
        model = _warm_bn(bn_cnn(), torch.cat([b[0] for b in batches]))
    else:
        g = torch.Generator().manual_seed(2)
        batches = [(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
                   for n in (10, 7)]
        model = inplace_mlp()
    before = [b.clone() for b in model.buffers()]
    was_training = model.training
    h = reference_hessian(model, ce, batches, mode)
    exact = torch.linalg.eigvalsh(h)
    for method in ("double-backward", "forward-over-reverse"):
        op = HessianOperator(model, ce, batches, mode=mode, method=method)
        # the second and later products are where the cached graph used to fail (BN eval)
        torch.testing.assert_close(dense_matrix(op), h, rtol=1e-8, atol=1e-10)
        top = lanczos(op, k=3, tol=1e-8)
        torch.testing.assert_close(top.eigenvalues, exact.flip(0)[:3], rtol=1e-7, atol=1e-9)
        assert top.all_converged
        bottom = lanczos(op, k=1, which="SA", tol=1e-8)
        assert float(bottom.eigenvalues[0]) == pytest.approx(float(exact[0]), rel=1e-6, abs=1e-9)
        trace = hutchpp(op, 60, seed=1)
        assert abs(trace.estimate - float(exact.sum())) <= 4 * trace.stderr + 1e-8 * float(exact.abs().sum())
        density = slq_density(op, num_runs=1, num_steps=op.dim)  # full Krylov: nodes are eigenvalues
        assert float(density.nodes[density.weights > 1e-12].max()) == pytest.approx(float(exact[-1]), rel=1e-6)
    assert model.training is was_training
    for b, saved in zip(model.buffers(), before):
        assert torch.equal(b, saved)  # running statistics untouched


def test_products_between_forward_and_backward_leave_a_pending_backward_valid():
    """Defect 6: a probe run between the user's forward and backward (lscape.attach)."""
    batches = cnn_batches()
    model = _warm_bn(bn_cnn(), torch.cat([b[0] for b in batches]))
    x, y = batches[0]
    loss = ce(model(x), y)  # eval-mode BN saves its running statistics for backward
    op = HessianOperator(model, ce, batches, mode="eval")
    lanczos(op, k=2, tol=1e-6)
    HessianOperator(model, ce, batches, mode="train").matvec(torch.ones(op.dim, dtype=torch.float64))
    loss.backward()  # raised "modified by an inplace operation" before
    assert all(p.grad is not None for p in model.parameters())


PROBE_WORKLOAD = dict(
    model="test_curvature2_models:bn_mlp",
    data="synthetic",
    data_opts={"n": 96, "dim": 8, "classes": 3},
    batch_size=32,
    progress=False,
    eval_schedule="never",
    checkpoint_schedule="never",
)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_curvature_probe_runs_on_a_bn_inplace_model_and_agrees_with_the_dense_spectrum(tmp_path, mode):
    subset = {"data": "subset", "batches": 2, "mode": mode}
    result = lscape.run(
        out=str(tmp_path / f"{mode}.zarr"), **PROBE_WORKLOAD, steps=3,
        plugins=["sharpness", "hessian", "hessian-exact", "eos"],
        plugin_options={
            "sharpness": {**subset, "schedule": "at:0,2", "tol": 1e-4},
            "hessian": {**subset, "schedule": "at:2", "k": 2, "tol": 1e-4, "trace_samples": 30,
                        "density_schedule": "at:2",  # the density is opt-in (issue 23)
                        "density_runs": 1, "density_steps": 20, "density_points": 64},
            "hessian-exact": {**subset, "schedule": "at:0,2"},
            "eos": {"schedule": "at:1", "k": 2, "mode": mode},
        },
    )  # fmt: skip
    assert result.status == "completed"
    run = RunReader(result.path)
    exact, sharp, top = run.read("hessian-exact"), run.read("sharpness"), run.read("hessian")
    for row, step in enumerate(exact["step"]):
        values = np.sort(exact["eigenvalues"][row])[::-1]
        s = list(sharp["step"]).index(step)
        assert sharp["lambda_max"][s] == pytest.approx(values[0], rel=1e-3)
        if step == 2:
            np.testing.assert_allclose(top["top_eigenvalues"][0], values[:2], rtol=1e-3)
            tr = run.read("hessian/trace")
            assert abs(tr["trace"][0] - values.sum()) <= 4 * tr["trace_stderr"][0] + 1e-4 * np.abs(values).sum()
    eos = run.read("eos")
    assert np.isfinite(eos["lambda_max"]).all() and (eos["hessian_norm"] >= eos["lambda_max"] * (1 - 1e-3)).all()


def test_per_group_spectra_match_the_dense_blocks(tmp_path):
    """Item 10: groups=blocks=PATTERN gives each group's diagonal-block spectrum, with a group dimension."""
    subset = {"data": "subset", "batches": 2}
    result = lscape.run(
        out=str(tmp_path / "groups.zarr"), **PROBE_WORKLOAD, steps=1,
        plugins=["sharpness", "hessian", "hessian-exact"],
        plugin_options={
            "sharpness": {**subset, "schedule": "at:0", "tol": 1e-5, "groups": "blocks=*"},
            "hessian": {**subset, "schedule": "at:0", "k": 2, "tol": 1e-5, "groups": "first=0.*;last=3.*",
                        "trace_samples": 30, "density_schedule": "at:0",  # the density is opt-in (issue 23)
                        "density_runs": 1, "density_steps": 10, "density_points": 32},
            "hessian-exact": {**subset, "schedule": "at:0", "params": "3.*"},
        },
    )  # fmt: skip
    run = RunReader(result.path)
    assert run.group_attrs("sharpness")["groups"] == ["0", "1", "3"]
    sharp = run.read("sharpness")
    assert sharp["group_eigenvalue"].shape == (1, 3) and sharp["group_converged"].all()
    block = np.sort(run.read("hessian-exact")["eigenvalues"][0])[::-1]
    assert sharp["group_eigenvalue"][0, 2] == pytest.approx(block[0], rel=1e-4)
    groups = run.read("hessian/groups")
    assert run.group_attrs("hessian")["groups"] == ["first", "last"]
    assert groups["group_top_eigenvalues"].shape == (1, 2, 2) and groups["group_density"].shape == (1, 2, 32)
    np.testing.assert_allclose(groups["group_top_eigenvalues"][0, 1], block[:2], rtol=1e-4)
    assert abs(groups["group_trace"][0, 1] - block.sum()) <= 4 * groups["group_trace_stderr"][0, 1] + 1e-4
    # the whole-model λ_max bounds every diagonal block's (Cauchy interlacing)
    assert (sharp["group_eigenvalue"][0] <= sharp["lambda_max"][0] * (1 + 1e-4)).all()
