"""Curvature round two, items 4, 7, 8, 9, 10, 11: the operator through the batch adapter (dict
batches, a tiny GPT-2), GGN with the analytic cross-entropy Hessian, chunking, Fisher matrices,
finite differences, mse with forward-over-reverse, frozen parameters, dropout symmetry, groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lscape import params as lparams
from lscape.batch import BatchAdapter
from lscape.curvature import HessianOperator, dense_matrix, hutchpp, lanczos
from lscape.plugins.workloads.defaults import cross_entropy, mse

ce = nn.functional.cross_entropy


def mlp(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(7, 3)]
    return nn.Sequential(*layers).double()


def data(seed=1, sizes=(9, 6)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def jacobian_rows(model, x):
    """Per-sample output Jacobians (n, out, dim) of the model's output wrt all parameters."""
    names = [n for n, _ in model.named_parameters()]
    like = [p for _, p in model.named_parameters()]

    def out_of(flat):
        return torch.func.functional_call(model, dict(zip(names, lparams.unflatten(flat, like))), (x,))

    return torch.autograd.functional.jacobian(out_of, lparams.flat_parameters(like).detach())


def reference_ggn(model, batches):
    total, n = 0, 0
    for x, y in batches:
        j = jacobian_rows(model, x)  # (b, c, d)
        p = torch.softmax(model(x).detach(), -1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # per-sample CE output Hessian
        total = total + torch.einsum("bcd,bce,bef->df", j, h, j)  # Σ_i J_iᵀ H_i J_i = b · G_b
        n += len(x)
    return total / n


def test_ggn_with_the_analytic_cross_entropy_hessian_matches_autograd_and_the_dense_reference():
    model, batches = mlp(), data()
    ref = reference_ggn(model, batches)
    analytic = dense_matrix(HessianOperator(model, ce, batches, kind="ggn"))
    generic = dense_matrix(HessianOperator(model, lambda o, t: ce(o, t) * 1.0, batches, kind="ggn"))
    torch.testing.assert_close(analytic, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(generic, ref, rtol=1e-9, atol=1e-12)
    chunked = dense_matrix(HessianOperator(model, ce, batches, kind="ggn", chunk=4))
    torch.testing.assert_close(chunked, ref, rtol=1e-9, atol=1e-12)


def test_fisher_matrices_match_dense_references():
    model, batches = mlp(2), data(3)
    # empirical Fisher: (1/N) Σ_i g_i g_iᵀ from per-sample gradients
    names = [n for n, _ in model.named_parameters()]
    like = [p for _, p in model.named_parameters()]
    flat = lparams.flat_parameters(like).detach()
    grads = []
    for x, y in batches:
        for i in range(len(x)):
            def li(f, i=i, x=x, y=y):
                return ce(torch.func.functional_call(model, dict(zip(names, lparams.unflatten(f, like))), (x[i:i + 1],)), y[i:i + 1])
            grads.append(torch.func.grad(li)(flat))
    g = torch.stack(grads)
    empirical = dense_matrix(HessianOperator(model, ce, batches, kind="empirical-fisher"))
    torch.testing.assert_close(empirical, g.T @ g / len(g), rtol=1e-9, atol=1e-12)
    # Monte-Carlo Fisher: PSD, a fixed matrix (same draws at every product), unbiased for the GGN
    op = HessianOperator(model, ce, batches, kind="fisher", mc_samples=1500)
    fisher = dense_matrix(op)
    ggn = reference_ggn(model, batches)
    assert torch.linalg.eigvalsh(fisher).min() > -1e-10
    v = torch.randn(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), op.matvec(v), rtol=0, atol=0)
    assert torch.linalg.norm(fisher - ggn) / torch.linalg.norm(ggn) < 0.08
    top_f = lanczos(HessianOperator(model, ce, batches, kind="empirical-fisher"), k=2, tol=1e-8)
    torch.testing.assert_close(top_f.eigenvalues, torch.linalg.eigvalsh(g.T @ g / len(g)).flip(0)[:2], rtol=1e-7, atol=0)
    trace = hutchpp(HessianOperator(model, ce, batches, kind="empirical-fisher"), 60)
    assert abs(trace.estimate - float((g * g).sum() / len(g))) <= 4 * trace.stderr + 1e-9
    with pytest.raises(ValueError, match="cross-entropy"):
        HessianOperator(model, mse, batches, kind="fisher")


def test_dict_batches_and_the_models_own_loss_go_through_the_adapter():
    model, batches = mlp(4), data(5)

    class DictModel(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs, labels=None):
            logits = self.inner(inputs)
            return {"logits": logits, "loss": ce(logits, labels) if labels is not None else None}

    wrapped = DictModel(model)
    dicts = [{"inputs": x, "labels": y} for x, y in batches]
    h_tuple = dense_matrix(HessianOperator(model, ce, batches))
    h_dict = dense_matrix(HessianOperator(wrapped, BatchAdapter(ce), dicts))
    h_own = dense_matrix(HessianOperator(wrapped, BatchAdapter(None), dicts, method="forward-over-reverse"))
    torch.testing.assert_close(h_dict, h_tuple, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_own, h_tuple, rtol=1e-10, atol=1e-12)
    ggn = dense_matrix(HessianOperator(wrapped, BatchAdapter(ce), dicts, kind="ggn"))
    torch.testing.assert_close(ggn, reference_ggn(model, batches), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="separable") as raised:
        HessianOperator(wrapped, BatchAdapter(None), dicts, kind="ggn")
    assert "--loss" not in str(raised.value)  # the library speaks in its own words, not in flags


def test_forward_over_reverse_with_mse_frozen_params_and_finite_differences():
    model, batches = mlp(6), data(7)
    db = dense_matrix(HessianOperator(model, mse, batches, method="double-backward"))
    op = HessianOperator(model, mse, batches, method="forward-over-reverse")
    torch.testing.assert_close(dense_matrix(op), db, rtol=1e-10, atol=1e-12)  # "ZeroTensors are immutable" before
    assert op.fallback is not None
    fd = HessianOperator(model, mse, batches, method="finite-difference", fd_eps=1e-4)
    torch.testing.assert_close(dense_matrix(fd), db, rtol=1e-6, atol=1e-8)
    biased = HessianOperator(model, mse, batches, method="finite-difference", fd_eps=1e-3, fd_offset=1e-5)
    ratio = float(lanczos(biased, k=1, tol=1e-8).eigenvalues[0] / torch.linalg.eigvalsh(db)[-1])
    assert ratio == pytest.approx(2e-3 / (2e-3 + 1e-5), rel=1e-5)  # the sam_edge seed's −0.5% bias
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        HessianOperator(model, mse, batches, params=[model[0].weight])
    with pytest.raises(ValueError, match="frozen"):
        HessianOperator(model, mse, batches, params="0.weight")


def test_train_mode_dropout_operator_is_exactly_symmetric_in_float64():
    model, batches = mlp(8, dropout=0.3), data(9)
    for method in ("double-backward", "forward-over-reverse"):
        op = HessianOperator(model, ce, batches, mode="train", method=method, cache_graph=False)
        h = torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=torch.float64)])
        assert torch.linalg.norm(h - h.T) <= 1e-12 * torch.linalg.norm(h)
        assert torch.linalg.norm(h - dense_matrix(HessianOperator(model, ce, batches, mode="eval"))) > 1e-3


def test_tiny_gpt2_curvature_through_the_adapter():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=31, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 31, (3, 6), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    own = HessianOperator(model, BatchAdapter(None), [batch], params="transformer.h.0.mlp.*")

    def shifted_ce(logits, labels):  # what GPT2LMHeadModel computes for its own loss
        return ce(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    named = HessianOperator(model, BatchAdapter(shifted_ce), [batch], params="transformer.h.0.mlp.*")
    h = dense_matrix(own)
    # transformers computes its own loss on float32-upcast logits: agreement to float32 rounding
    assert torch.linalg.norm(h - dense_matrix(named)) <= 1e-5 * torch.linalg.norm(h)
    top = lanczos(own, k=2, tol=1e-6)
    torch.testing.assert_close(top.eigenvalues, torch.linalg.eigvalsh(h).flip(0)[:2], rtol=1e-6, atol=1e-9)
    # the GGN of the LM loss with the analytic CE Hessian (labels shifted by the adapter's loss)
    x = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    ggn = HessianOperator(model, BatchAdapter(cross_entropy), [x], params="transformer.wte.*", kind="ggn", chunk=2)
    gen = HessianOperator(model, BatchAdapter(lambda o, t: cross_entropy(o, t) * 1.0), [x], params="transformer.wte.*",
                          kind="ggn")
    v = torch.randn(ggn.dim, dtype=torch.float64)
    torch.testing.assert_close(ggn.matvec(v), gen.matvec(v), rtol=1e-9, atol=1e-12)
    assert np.isfinite(hutchpp(own, 12).estimate)
