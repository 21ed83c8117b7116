"""Per-sample gradients and their statistics against loops over single samples."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lscape.plugins.noise import (
    HessianVarianceOperator,
    per_sample_gradients,
    per_sample_statistics,
)


class TinyTransformer(nn.Module):
    """Embedding, one pre-LayerNorm self-attention block, a linear head on the mean token."""

    def __init__(self, vocab=11, d=8, heads=2, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.block = nn.TransformerEncoderLayer(d, heads, dim_feedforward=16, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.block(self.emb(x)).mean(1))


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


def problem(kind, n=10, seed=0):
    """A float64 model with a batch; BatchNorm gets non-trivial running statistics."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model, x = mlp(), torch.randn(n, 5)
    elif kind == "cnn":
        model, x = cnn(), torch.randn(n, 2, 6, 6)
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    else:
        model, x = TinyTransformer(), torch.randint(0, 11, (n, 5))
    model = model.double()
    if x.is_floating_point():
        x = x.double()
    y = torch.randint(0, 3, (n,))
    return model, F.cross_entropy, (x, y)


def loop_gradients(model, loss_fn, batch):
    """Reference: one ordinary backward per sample, stacked to (n, d)."""
    x, y = batch
    params = [p for p in model.parameters()]
    rows = []
    for i in range(len(x)):
        g = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "attention"])
def test_per_sample_gradients_equal_loop_over_samples(kind):
    model, loss_fn, batch = problem(kind)
    model.eval()
    ref = loop_gradients(model, loss_fn, batch)
    got = per_sample_gradients(model, loss_fn, batch, chunk_size=3)  # several uneven chunks
    flat = torch.cat([g.reshape(len(ref), -1) for g in got.values()], dim=1)
    assert flat.shape == ref.shape
    torch.testing.assert_close(flat, ref, rtol=1e-10, atol=1e-12)


def test_loop_method_gives_the_same_gradients_as_vmap():
    model, loss_fn, batch = problem("attention", n=7)
    vm = per_sample_gradients(model, loss_fn, batch, chunk_size=4)
    lp = per_sample_gradients(model, loss_fn, batch, chunk_size=4, method="loop")
    for name in vm:
        torch.testing.assert_close(lp[name], vm[name], rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_leave_model_mode_and_grads_alone():
    model, loss_fn, batch = problem("cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    per_sample_gradients(model, loss_fn, batch)
    assert model.training and model[1].training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def brute_force_statistics(G):
    """GSNR, tr Σ, B_simple, NormTest, InnerTest straight from the (n, d) matrix."""
    n = G.shape[0]
    g = G.mean(0)
    var = ((G - g) ** 2).sum(0) / (n - 1)
    m2 = (G**2).mean(0)
    ok = (var > 0) & (m2 > (10 * torch.finfo(G.dtype).eps) ** 2 * m2.mean())  # rounding-only coordinates
    gsnr = (g[ok] ** 2 / var[ok]).mean()
    tr = var.sum()
    proj = G @ g
    var_proj = ((proj - proj.mean()) ** 2).sum() / (n - 1)
    return dict(trace_cov=tr, grad_sq=g @ g, gsnr=gsnr, b_simple=tr / (g @ g),
                norm_test=torch.sqrt(tr / (n * (g @ g))),
                inner_test=torch.sqrt(var_proj / (n * (g @ g) ** 2)))


@pytest.mark.parametrize("chunk_size", [64, 4])  # one vmap pass; two passes with chunks
@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_statistics_equal_brute_force(kind, chunk_size):
    model, loss_fn, (x, y) = problem(kind, n=12)
    model.eval()
    G = loop_gradients(model, loss_fn, (x, y))
    ref = brute_force_statistics(G)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]  # several batches of unequal size
    st = per_sample_statistics(model, loss_fn, batches, chunk_size=chunk_size, keep_grad=True)
    assert st.n == 12
    for name, value in ref.items():
        assert getattr(st, name) == pytest.approx(float(value), rel=1e-9), name
    torch.testing.assert_close(st.grad, G.mean(0), rtol=1e-10, atol=1e-12)
    # per-group values add up (trace, ‖g‖²) and match the group's own brute force
    assert sum(st.trace_cov_groups.values()) == pytest.approx(st.trace_cov, rel=1e-12)
    first = next(iter(st.gsnr_groups))
    d0 = dict(model.named_parameters())[first].numel()
    assert st.gsnr_groups[first] == pytest.approx(float(brute_force_statistics(G[:, :d0])["gsnr"]), rel=1e-9)


def test_cockpit_conventions_for_the_tests():
    """NormTest and InnerTest follow Cockpit: θ² = variance / (B·‖g‖²) and / (B·‖g‖⁴)."""
    torch.manual_seed(1)
    G = torch.randn(6, 4, dtype=torch.float64) + 0.5
    # a linear model whose per-sample gradients are exactly the rows of G: loss_i = −G_i·θ
    model = nn.Linear(4, 1, bias=False).double()
    loss_fn = lambda out, y: -(out.squeeze(-1)).mean()  # noqa: E731
    st = per_sample_statistics(model, loss_fn, [(-G, torch.zeros(6))])
    g = G.mean(0)
    bl2 = ((G / 6) ** 2).sum(1)  # BackPACK's individual gradients carry the 1/B factor
    var_l1 = (36 * bl2.sum() - 6 * (g @ g)) / 5
    assert st.norm_test == pytest.approx(math.sqrt(var_l1 / 6 / (g @ g)), rel=1e-10)
    dots = (G / 6) @ (G / 6).T
    projections = 6 * dots.sum(1)
    var_proj = ((projections**2).sum() - 6 * (g @ g) ** 2) / 5
    assert st.inner_test == pytest.approx(math.sqrt(var_proj / 6 / (g @ g) ** 2), rel=1e-10)


def dense_hessian_variance(model, loss_fn, batch):
    """(1/n) Σ H_i² − H² from dense per-sample Hessians."""
    x, y = batch
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def loss_of(flat, i):
        parts = torch.split(flat, [p.numel() for p in params])
        d = {n: t.view_as(p) for n, t, p in zip(names, parts, params)}
        return loss_fn(torch.func.functional_call(model, d, (x[i : i + 1],)), y[i : i + 1])

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    Hs = torch.stack([torch.autograd.functional.hessian(lambda t: loss_of(t, i), theta) for i in range(len(x))])
    H = Hs.mean(0)
    return (Hs @ Hs).mean(0) - H @ H


def test_hessian_variance_operator_matches_dense_matrix():
    model, loss_fn, (x, y) = problem("mlp", n=6)
    dense = dense_hessian_variance(model, loss_fn, (x, y))
    op = HessianVarianceOperator(model, loss_fn, [(x[:4], y[:4]), (x[4:], y[4:])], chunk_size=3)
    assert op.dim == dense.shape[0]
    v = torch.randn(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-9, atol=1e-11)
