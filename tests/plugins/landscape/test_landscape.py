"""Directions, slices, interpolation and ε-sharpness checked against exact references."""

import numpy as np
import pytest
import torch
from torch import nn

from lscape.plugins.landscape import (
    eps_sharpness,
    eps_sharpness_repeated,
    evaluate,
    filter_normalized_direction,
    interpolate_state,
    interpolation_curve,
    model_objective,
    normalize_to,
    parse_range,
    slice_1d,
    surface_2d,
    surface_rows,
)


class Quadratic(nn.Module):
    """f(w) = ½ wᵀHw + bᵀw, returned as the model output; the loss is its mean."""

    def __init__(self, H, b=None, w0=None):
        super().__init__()
        self.register_buffer("H", H)
        self.register_buffer("b", torch.zeros(len(H), dtype=H.dtype) if b is None else b)
        self.w = nn.Parameter(torch.zeros(len(H), dtype=H.dtype) if w0 is None else w0.clone())

    def forward(self, x):
        f = 0.5 * self.w @ self.H @ self.w + self.b @ self.w
        return f.expand(x.shape[0])


def mean_loss(out, y):
    return out.mean()


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def test_filter_normalised_direction_has_filter_norms_and_zero_biasbn():
    model = small_cnn()
    params = list(model.parameters())
    d = filter_normalized_direction(params, torch.Generator().manual_seed(0), ignore="biasbn")
    for p, di in zip(params, d):
        assert di.shape == p.shape
        if p.dim() <= 1:
            assert torch.count_nonzero(di) == 0
        else:
            torch.testing.assert_close(di.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)
            assert not torch.allclose(di, p)  # rescaled noise, not a copy


def test_filter_normalised_direction_copies_biasbn_when_not_ignored():
    model = small_cnn()
    params = list(model.parameters())
    d = filter_normalized_direction(params, torch.Generator().manual_seed(0), ignore="none")
    for p, di in zip(params, d):
        if p.dim() <= 1:
            torch.testing.assert_close(di, p.detach())


def test_normalize_to_unit_and_model_norm():
    params = list(small_cnn().parameters())
    g = [torch.randn_like(p) for p in params]
    unit = normalize_to(g, params, "unit")
    assert torch.sqrt(sum((t**2).sum() for t in unit)).item() == pytest.approx(1.0, rel=1e-5)
    whole = normalize_to(g, params, "model")
    norm = lambda ts: torch.sqrt(sum((t.double() ** 2).sum() for t in ts)).item()
    assert norm(whole) == pytest.approx(norm(params), rel=1e-5)


def test_slice_1d_of_a_quadratic_is_half_lambda_alpha_squared():
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    lam = torch.tensor([3.0, 1.5, 0.5, -0.2, 2.0], dtype=torch.float64)
    model = Quadratic(Q @ torch.diag(lam) @ Q.T)
    data = [(torch.zeros(4), torch.zeros(4, dtype=torch.float64))]
    for k in range(5):
        res = slice_1d(model, mean_loss, data, [model.w], [Q[:, k].clone()], "-1:1:#21")
        np.testing.assert_allclose(res["loss"], 0.5 * lam[k].item() * res["alpha"] ** 2, rtol=1e-12, atol=1e-14)
    assert torch.count_nonzero(model.w) == 0  # θ₀ restored


def test_surface_of_a_quadratic_and_resume_from_a_row():
    H = torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64))
    model = Quadratic(H)
    data = [(torch.zeros(2), torch.zeros(2))]
    e1, e2 = [torch.tensor([1.0, 0.0], dtype=torch.float64)], [torch.tensor([0.0, 1.0], dtype=torch.float64)]
    s = surface_2d(model, mean_loss, data, [model.w], e1, e2, "-1:1:#11", "-1:1:#7")
    A, B = np.meshgrid(s["alpha"], s["beta"], indexing="ij")
    np.testing.assert_allclose(s["loss"], A**2 + 0.25 * B**2, rtol=1e-12, atol=1e-14)
    rows = list(surface_rows(model, mean_loss, data, [model.w], e1, e2, "-1:1:#11", "-1:1:#7", start_row=8))
    assert [i for i, *_ in rows] == [8, 9, 10]
    np.testing.assert_array_equal(rows[0][1], s["loss"][8])


def test_slice_leaves_parameters_buffers_and_mode_exactly_as_found():
    model = small_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    d = filter_normalized_direction(params, torch.Generator().manual_seed(1))
    res = slice_1d(model, nn.functional.cross_entropy, batches(), params, d, "-1:1:0.5")
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(np.isfinite(res["loss"])) and all((0 <= res["accuracy"]) & (res["accuracy"] <= 1))
    # the centre of the slice is the unperturbed model in eval mode
    model.eval()
    assert res["loss"][2] == pytest.approx(evaluate(model, nn.functional.cross_entropy, batches())[0], rel=1e-6)


def test_parse_range_includes_a_stop_on_the_grid_only():
    a = parse_range("-1:2:0.1")
    assert len(a) == 31 and a[0] == -1 and a[-1] == pytest.approx(2) and 0.0 in a
    b = parse_range("-0.3:0.02:0.31")
    assert len(b) == 31 and b[-1] == pytest.approx(0.3)
    assert len(parse_range("-1:1:#51")) == 51
    assert list(parse_range("0:0.5:1")) == [0, 0.5, 1]
    with pytest.raises(ValueError, match="bad range"):
        parse_range("1:0:0.1")


def test_interpolation_covers_batchnorm_buffers_and_restores_the_model():
    a, b = small_cnn(), small_cnn()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3 * torch.randn_like(p))
    a.train()(batches(1, 5)[0][0])  # give the two models different running statistics
    b.train()(batches(1, 6)[0][0])
    sa, sb = a.state_dict(), b.state_dict()
    mid = interpolate_state(sa, sb, 0.25)
    key = "1.running_mean"
    torch.testing.assert_close(mid[key], 0.75 * sa[key] + 0.25 * sb[key])
    torch.testing.assert_close(interpolate_state(sa, sb, 2.0)["0.weight"], 2 * sb["0.weight"] - sa["0.weight"])
    assert mid["1.num_batches_tracked"].dtype == torch.long

    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = {"train": batches(2, 1), "eval": batches(1, 2)}
    curve = interpolation_curve(model, nn.functional.cross_entropy, data, sa, sb, "-1:2:0.5")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert set(curve) == {"alpha", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy"}
    i0, i1 = list(curve["alpha"]).index(0.0), list(curve["alpha"]).index(1.0)
    for m, i in ((a, i0), (b, i1)):
        m.eval()
        assert curve["eval_loss"][i] == pytest.approx(evaluate(m, nn.functional.cross_entropy, data["eval"])[0], rel=1e-6)


def quadratic_objective(H, c):
    def fun(v):
        v = v.double()
        return float(0.5 * v @ H @ v + c @ v), H @ v + c

    return fun


def brute_force(H, c, x, half, n=201):
    """Max over an n × n grid of the box (vertices included) of ½vᵀHv + cᵀv at v = x + y, as φ in %."""
    g1, g2 = np.meshgrid(np.linspace(-half[0], half[0], n), np.linspace(-half[1], half[1], n))
    v = x.numpy() + np.c_[g1.ravel(), g2.ravel()]
    f = 0.5 * np.einsum("mi,ij,mj->m", v, H.numpy(), v) + v @ c.numpy()
    f0 = float(0.5 * x @ H @ x + c @ x)
    return (f.max() - f0) / (1 + f0) * 100


@pytest.mark.parametrize("method", ["lbfgsb", "pga"])
def test_eps_sharpness_of_2d_quadratic_matches_brute_force(method):
    H = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    c = torch.tensor([0.5, -1.0], dtype=torch.float64)
    fun = quadratic_objective(H, c)
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    eps = 0.05
    ref = brute_force(H, c, x, (eps * (x.abs() + 1)).numpy())
    res = eps_sharpness(fun, x, eps=eps, method=method, iters=20, generator=torch.Generator().manual_seed(0))
    assert res.sharpness > 0  # a rise, not a fall: the maximisation has the intended sign
    assert res.sharpness == pytest.approx(ref, rel=1e-6)
    assert torch.all(res.displacement.abs() <= eps * (x.abs() + 1) + 1e-12)


def test_eps_sharpness_in_a_subspace_matches_brute_force_over_its_box():
    H = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    c = torch.tensor([0.5, -1.0], dtype=torch.float64)
    fun = quadratic_objective(H, c)
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    A = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    eps = 0.05
    coord = torch.linalg.lstsq(A, x.unsqueeze(1)).solution.squeeze()
    half = eps * (coord.abs() + 1)
    zs = torch.linspace(-half.item(), half.item(), 2001, dtype=torch.float64)
    f0 = fun(x)[0]
    ref = (max(fun(x + A[:, 0] * z)[0] for z in zs) - f0) / (1 + f0) * 100
    res = eps_sharpness(fun, x, eps=eps, subspace=A, method="lbfgsb", generator=torch.Generator().manual_seed(0))
    assert res.sharpness == pytest.approx(ref, rel=1e-6)


def test_eps_sharpness_repeated_on_a_model_restores_it():
    H = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    model = Quadratic(H, torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([1.0, -2.0], dtype=torch.float64))
    fun, x0, restore = model_objective(model, mean_loss, [(torch.zeros(3), torch.zeros(3))], [model.w])
    direct = quadratic_objective(H, torch.tensor([0.5, -1.0], dtype=torch.float64))
    f, g = fun(x0 + 0.1)
    fd, gd = direct(x0 + 0.1)
    assert f == pytest.approx(fd) and torch.allclose(g, gd)
    out = eps_sharpness_repeated(fun, x0, repeats=4, eps=0.05, subspace=1, seed=0)
    restore()
    assert torch.equal(model.w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert len(out["values"]) == 4 and out["std"] > 0  # a fresh random subspace per repeat
    assert np.all(out["values"] >= 0)


def test_parse_range_reads_loss_landscapes_xmin_xmax_xnum_and_refuses_the_ambiguous():
    # loss-landscape's --x=-1:1:51 is 51 points in [−1, 1] (it used to give 53 points from −1 to 51)
    a = parse_range("-1:1:51")
    np.testing.assert_array_equal(a, np.linspace(-1, 1, 51))
    np.testing.assert_array_equal(parse_range("0.5:1.5:3"), [0.5, 1.0, 1.5])
    # a written-out float third number keeps the step form
    assert list(parse_range("-1:1:2.0")) == [-1, 0, 1, 2]
    # an integer count no larger than the span could be either: refused, both spellings named
    with pytest.raises(ValueError, match=r"ambiguous range '0:10:2'.*0:10:#2.*0:10:2\.0"):
        parse_range("0:10:2")
    with pytest.raises(ValueError, match="finite"):
        parse_range("0:inf:0.1")


def test_random_subspace_is_the_smoothout_codes_construction():
    from lscape.plugins.landscape._keskar import random_subspace

    n, p = 40, 3
    A, A_plus = random_subspace(n, p, torch.Generator().manual_seed(7))
    # measure_sharpness.py -m p: A⁺ = U(−1, 1) (p, n) with unit rows, A = pinv(A⁺)
    u = 2 * torch.rand(p, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64) - 1
    torch.testing.assert_close(A_plus, u / u.norm(dim=1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(A, torch.linalg.pinv(A_plus), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(A_plus @ A, torch.eye(p, dtype=torch.float64), rtol=0, atol=1e-12)
    G, G_plus = random_subspace(n, p, torch.Generator().manual_seed(7), "gaussian")
    torch.testing.assert_close(G, torch.randn(n, p, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    # the scale is what makes φ differ: Gaussian columns have norm ~√n, the seed's ~1
    assert G.norm(dim=0).min() > 3 * A.norm(dim=0).max()


@pytest.mark.parametrize("kind", ["smoothout", "gaussian"])
def test_eps_sharpness_in_a_random_subspace_is_the_closed_form_corner_of_a_linear_loss(kind):
    from lscape.plugins.landscape._keskar import random_subspace

    # f(v) = 1 + cᵀv is maximised over |z_i| ≤ h_i = ε(|(A⁺x)_i| + 1) at z = h·sign(Aᵀc)
    n, p, eps = 30, 4, 0.01
    c = torch.linspace(-1, 1, n, dtype=torch.float64)
    x = torch.cos(torch.arange(n, dtype=torch.float64))

    def fun(v):
        return float(1 + c @ v), c.clone()

    A, A_plus = random_subspace(n, p, torch.Generator().manual_seed(3), kind)
    h = eps * ((A_plus @ x).abs() + 1)
    f0 = 1 + float(c @ x)
    expected = float((A.T @ c).abs() @ h) / (1 + f0) * 100
    res = eps_sharpness(fun, x, eps=eps, subspace=p, method="pga", iters=1, init="zero", step=1.0,
                        generator=torch.Generator().manual_seed(3), subspace_matrix=kind)
    assert res.sharpness == pytest.approx(expected, rel=1e-12)


def test_eps_sharpness_probe_measures_on_the_eval_set_with_split_eval():
    from types import SimpleNamespace

    from lscape.plugins.landscape import EpsSharpness

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    mk = lambda n, s: torch.utils.data.TensorDataset(torch.randn(n, 4, generator=torch.Generator().manual_seed(s)),
                                                     torch.arange(n) % 3)
    train, held = mk(24, 1), mk(20, 2)
    from lscape.batch import BatchAdapter

    ctx = SimpleNamespace(model=model, loss_fn=nn.functional.cross_entropy, train_set=train, eval_set=held,
                          adapter=BatchAdapter(nn.functional.cross_entropy),
                          batch_size=8, device="cpu", cache={}, workers=0, config=SimpleNamespace(seed=0), rank=0,
                          world_size=1)
    state = SimpleNamespace(step=0, batch=None)
    probe = EpsSharpness(split="eval", data="full", repeats=2, eps=1e-3)
    probe.check(ctx)
    out = probe.measure(ctx, state)
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(held.tensors[0]), held.tensors[1]))
    assert out["loss"] == pytest.approx(expected, rel=1e-6)
    assert EpsSharpness(data="full", repeats=2).measure(ctx, state)["loss"] != pytest.approx(expected, rel=1e-3)
    from lscape.errors import UsageError

    with pytest.raises(UsageError, match="split=eval needs an eval set"):
        EpsSharpness(split="eval").check(SimpleNamespace(eval_set=None))


def test_loss_landscapes_layerwise_normalisations():
    from lscape.plugins.landscape._directions import normalize_layerwise

    g = torch.Generator().manual_seed(0)
    w = [torch.randn(3, 4, generator=g), torch.randn(3, generator=g)]
    d = [torch.randn(3, 4, generator=g), torch.randn(3, generator=g)]
    out = {how: normalize_layerwise(d, w, how) for how in ("filter", "layer", "weight", "dfilter", "dlayer")}
    torch.testing.assert_close(out["filter"][0], d[0] * (w[0].norm(dim=1) / (d[0].norm(dim=1) + 1e-10))[:, None])
    torch.testing.assert_close(out["layer"][0], d[0] * w[0].norm() / d[0].norm())
    torch.testing.assert_close(out["weight"][0], d[0] * w[0])
    torch.testing.assert_close(out["dfilter"][0], d[0] / (d[0].norm(dim=1) + 1e-10)[:, None])
    torch.testing.assert_close(out["dlayer"][0], d[0] / d[0].norm())
    for how, res in out.items():
        assert torch.equal(res[1], torch.zeros(3)), how          # biasbn: 1-D tensors zeroed
        assert torch.equal(normalize_to(d, w, how, ignore="none")[1], w[1]), how  # or copied from θ
    assert torch.equal(d[0], d[0].clone())                        # inputs untouched


def test_dir_type_states_moves_batchnorm_buffers_along_the_direction():
    from lscape.plugins.landscape._directions import state_tensors

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    model(torch.randn(16, 3))                                     # non-trivial running statistics
    model.eval()
    names, tensors = state_tensors(model)
    assert "1.running_mean" in names and "1.running_var" in names and "1.num_batches_tracked" not in names
    direction = normalize_to([torch.randn(t.shape) for t in tensors], tensors, "filter", ignore="none")
    # ignore=none copies θ into the 1-D entries: the running mean moves to (1 + α)·running_mean
    torch.testing.assert_close(direction[names.index("1.running_mean")], model[1].running_mean)
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    batches = [(x, y)]
    res = slice_1d(model, nn.functional.mse_loss, batches, tensors, direction, [0.5])
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    sd = model.state_dict()
    ref.load_state_dict({k: (v + 0.5 * direction[names.index(k)]) if k in names else v for k, v in sd.items()})
    with torch.no_grad():
        assert res["loss"][0] == pytest.approx(float(nn.functional.mse_loss(ref(x), y)), rel=1e-6)
    assert torch.equal(model.state_dict()["1.running_mean"], sd["1.running_mean"])  # restored


def test_same_dir_gives_two_identical_directions():
    from types import SimpleNamespace

    from lscape.plugins.landscape import Landscape

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    probe = Landscape(dims=2, same_dir=True, seed=1)
    params = list(model.parameters())
    dirs, _ = probe.directions(SimpleNamespace(model=model, config=SimpleNamespace(seed=0)), params, [])
    assert all(torch.equal(a, b) for a, b in zip(dirs[0], dirs[1]))
    other, _ = Landscape(dims=2, seed=1).directions(SimpleNamespace(model=model, config=SimpleNamespace(seed=0)),
                                                    params, [])
    assert not torch.equal(other[0][0], other[1][0])
    from lscape.errors import UsageError

    with pytest.raises(UsageError, match="dims=2"):
        Landscape(same_dir=True)
    with pytest.raises(UsageError, match="dir_type=states"):
        Landscape(dir_type="states", direction="hessian")


def test_pca_directions_are_sklearns_on_a_path_in_a_known_plane():
    from lscape.plugins.landscape._pca import pca_directions, trajectory_matrix

    g = torch.Generator().manual_seed(0)
    n = 12
    u, v = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=torch.float64))[0].T
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    theta = torch.randn(n, dtype=torch.float64, generator=g)
    rows = [theta + 3 * ti * u + torch.sin(4 * ti) * v for ti in t]
    M = trajectory_matrix([{"w": r} for r in rows], ["w"], [theta], ignore="none")
    torch.testing.assert_close(M, torch.stack(rows) - theta)
    dirs, ratio = pca_directions(M)
    # reference: SVD of the centred rows (what sklearn's PCA computes), signs as svd_flip
    C = (M - M.mean(0)).numpy()
    _, s, vt = np.linalg.svd(C, full_matrices=False)
    for i in range(2):
        ref = vt[i] * np.sign(vt[i][np.argmax(np.abs(vt[i]))])
        np.testing.assert_allclose(dirs[i].numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(ratio.numpy(), s[:2] ** 2 / (s**2).sum(), rtol=1e-12)
    assert float(ratio.sum()) == pytest.approx(1.0, abs=1e-12)   # the path lies in the plane: all of it
    # the plane is span(u, v): projecting the rows on it loses nothing
    P = dirs.T @ dirs
    torch.testing.assert_close((M - M.mean(0)) @ P, M - M.mean(0), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="fewer than 2 directions"):
        pca_directions(M[:2])


def test_dir_type_states_draws_as_the_seed_draws_counters_included():
    """net_plotter.get_random_states: one randn per state_dict entry, num_batches_tracked too."""
    from lscape.plugins.landscape._directions import random_state_direction

    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2), nn.BatchNorm1d(2))
    ours = random_state_direction(model, torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    seed_dirs = [torch.randn(w.size()) for k, w in model.state_dict().items()]
    floating = [d for d, w in zip(seed_dirs, model.state_dict().values()) if torch.is_floating_point(w)]
    assert len(ours) == len(floating) < len(seed_dirs)
    for a, b in zip(ours, floating):
        assert torch.equal(a, b)
