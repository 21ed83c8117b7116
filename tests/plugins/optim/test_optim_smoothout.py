"""SmoothOut: noise distributions, schedules, exact denoising, ghost chunks, clipping."""

import math

import pytest
import torch
from scipy import stats
from torch import nn

from lscape.plugins.optim import SmoothOut, ghost_closures, smoothout_coefficient, smoothout_noise


def test_schedule_coefficients_are_exact():
    assert smoothout_coefficient("constant", 17, 100) == 1.0
    assert smoothout_coefficient("anneal", 0) == 1.0
    assert smoothout_coefficient("anneal", 3) == 4.0 ** (-0.275)
    assert smoothout_coefficient("tanh", 0, 10) == (math.tanh(-5.0) + 1) / 2
    assert smoothout_coefficient("tanh", 5, 10) == 0.5
    assert smoothout_coefficient("tanh", 10, 10) == (math.tanh(5.0) + 1) / 2
    with pytest.raises(ValueError, match="total_steps"):
        smoothout_coefficient("tanh", 1)


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(40, 250, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("distribution,reference", [("uniform", ("uniform", (-1, 2))), ("normal", ("norm", (0, 1)))])
def test_shape_none_is_iid_with_amplitude_a(distribution, reference):
    (tau,) = smoothout_noise([_weights()], 0.02, "none", distribution, torch.Generator().manual_seed(1))
    assert stats.kstest((tau / 0.02).flatten().numpy(), reference[0], args=reference[1]).pvalue > 1e-3


@pytest.mark.parametrize("distribution,reference", [("uniform", ("uniform", (-1, 2))), ("normal", ("norm", (0, 1)))])
def test_shape_weight_scales_each_entry_by_its_magnitude(distribution, reference):
    w = _weights()
    (tau,) = smoothout_noise([w], 0.02, "weight", distribution, torch.Generator().manual_seed(2))
    assert stats.kstest((tau / (0.02 * w.abs())).flatten().numpy(), reference[0], args=reference[1]).pvalue > 1e-3


@pytest.mark.parametrize("distribution", ["uniform", "normal"])
def test_shape_filter_gives_each_row_a_times_its_norm_in_a_random_direction(distribution):
    w = _weights().reshape(40, 10, 5, 5)  # a conv weight: rows are output filters
    (tau,) = smoothout_noise([w], 0.05, "filter", distribution, torch.Generator().manual_seed(3))
    rows, wrows = tau.reshape(40, -1), w.reshape(40, -1)
    torch.testing.assert_close(rows.norm(dim=1), 0.05 * wrows.norm(dim=1), rtol=1e-6, atol=0)
    unit = rows / rows.norm(dim=1, keepdim=True)
    # directions are symmetric about 0 and not aligned with the weights
    assert abs(unit.mean().item()) < 5 * unit.std().item() / math.sqrt(unit.numel())
    assert (unit * wrows / wrows.norm(dim=1, keepdim=True)).sum(1).abs().max() < 0.3


def _model(bn=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), *([nn.BatchNorm1d(16)] if bn else []), nn.Tanh(), nn.Linear(16, 2))


def _batch(n=64):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)


def test_denoise_restores_the_weights_bit_for_bit_and_gradients_come_from_noisy_weights():
    model = _model()
    theta = [p.detach().clone() for p in model.parameters()]
    seen = []
    closures, sizes = ghost_closures(model, nn.functional.mse_loss, _batch(), mb=16)
    recorded = []
    for c in closures:
        def spy(c=c):
            recorded.append([p.detach().clone() for p in model.parameters()])
            return c()
        seen.append(spy)
    opt = SmoothOut(torch.optim.SGD(model.parameters(), lr=0.0), ss=0.1, shape="weight")
    opt.step(seen, sizes)
    assert len(recorded) == 4
    for p, t in zip(model.parameters(), theta):
        assert torch.equal(p, t)
    # each chunk saw its own noise, not θ and not the previous chunk's noise
    assert not torch.equal(recorded[0][0], theta[0])
    assert not torch.equal(recorded[0][0], recorded[1][0])


def test_without_denoise_the_noise_stays_in_the_weights():
    model = _model()
    theta = [p.detach().clone() for p in model.parameters()]
    closures, _ = ghost_closures(model, nn.functional.mse_loss, _batch(), mb=32)
    SmoothOut(torch.optim.SGD(model.parameters(), lr=0.0), ss=0.1, denoise=False).step(closures)
    assert not torch.equal(next(model.parameters()), theta[0])


def test_ghost_chunks_without_noise_average_to_the_full_batch_gradient():
    model, ref = _model(), _model()
    batch = _batch(60)
    closures, sizes = ghost_closures(model, nn.functional.mse_loss, batch, mb=25)  # 25, 25, 10
    assert sizes == [25, 25, 10]
    opt = SmoothOut(torch.optim.SGD(model.parameters(), lr=0.1), ss=0.0, clip=None)
    loss = opt.step(closures, sizes)
    ref_loss = nn.functional.mse_loss(ref(batch[0]), batch[1])
    ref_loss.backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    torch.testing.assert_close(loss, ref_loss.detach())
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_gradient_is_clipped_to_norm_five():
    model = _model()
    x, y = _batch()
    closures, _ = ghost_closures(model, nn.functional.mse_loss, (x, 1000 * y), mb=64)
    opt = SmoothOut(torch.optim.SGD(model.parameters(), lr=0.0), ss=0.0)
    opt.step(closures)
    assert opt.stats["grad_norm"] > 5
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert total.item() == pytest.approx(5.0, rel=1e-5)


def test_batchnorm_parameters_get_no_noise_by_default():
    model = _model(bn=True)
    bn_weight = model[1].weight.detach().clone()
    lin_weight = model[0].weight.detach().clone()
    inside = {}

    def closure():
        inside["bn"] = model[1].weight.detach().clone()
        inside["lin"] = model[0].weight.detach().clone()
        model.zero_grad()
        loss = nn.functional.mse_loss(model(_batch()[0]), _batch()[1])
        loss.backward()
        return loss.detach()

    SmoothOut(torch.optim.SGD(model.parameters(), lr=0.0), ss=0.1, model=model).step(closure)
    assert torch.equal(inside["bn"], bn_weight)
    assert not torch.equal(inside["lin"], lin_weight)
    SmoothOut(torch.optim.SGD(model.parameters(), lr=0.0), ss=0.1, model=model, exclude_batchnorm=False).step(closure)
    assert not torch.equal(inside["bn"], bn_weight)


def test_amplitude_follows_the_schedule_over_steps():
    model = _model()
    opt = SmoothOut(torch.optim.SGD(model.parameters(), lr=0.0), ss=0.01, schedule="anneal")
    closures, _ = ghost_closures(model, nn.functional.mse_loss, _batch(), mb=64)
    amps = []
    for _ in range(3):
        opt.step(closures)
        amps.append(opt.stats["amplitude"])
    assert amps == [0.01 * (1 + t) ** (-0.275) for t in range(3)]


def test_bad_choices_are_clear_errors():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="shape"):
        SmoothOut(torch.optim.SGD(p, lr=0.1), shape="row")
    with pytest.raises(ValueError, match="total_steps"):
        SmoothOut(torch.optim.SGD(p, lr=0.1), schedule="tanh")


def test_anneal_index_and_tanh_scale_are_the_seeds_options():
    # main_gbn.py: anneal coef = (1/(1 + t)^ai)^0.5, tanh coef = (tanh(ts(t/T − .5)) + 1)/2
    assert smoothout_coefficient("anneal", 8, anneal_index=1.0) == pytest.approx((1 / 9**1.0) ** 0.5, rel=1e-15)
    assert smoothout_coefficient("tanh", 2, 10, tanh_scale=3.0) == pytest.approx((math.tanh(3.0 * (0.2 - 0.5)) + 1) / 2,
                                                                                 rel=1e-15)
    from lscape.plugins.optim.smoothout import SmoothOutStep

    step = SmoothOutStep(ss_schedule="anneal", anneal_index="0.3", tanh_scale="4")
    from types import SimpleNamespace

    p = nn.Parameter(torch.zeros(3))
    opt = step.build(SimpleNamespace(optimizer=torch.optim.SGD([p], lr=0.1), total_steps=10, model=None))
    assert (opt.anneal_index, opt.tanh_scale) == (0.3, 4.0)
    assert opt.amplitude == pytest.approx(0.006)      # t = 0
    opt.variant_state["t"] = 3
    assert opt.amplitude == pytest.approx(0.006 * 4 ** (-0.15), rel=1e-15)


def test_batch_multiplier_accumulates_ghost_chunks_of_several_minibatches_into_one_update():
    from types import SimpleNamespace

    from lscape.plugins.optim.smoothout import SmoothOutStep

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    ref = nn.Linear(4, 2)
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)) for _ in range(3)]
    stream = iter(batches[1:])
    loss_fn = nn.functional.mse_loss
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    from lscape.batch import BatchAdapter

    ctx = SimpleNamespace(optimizer=opt, model=model, loss_fn=loss_fn, adapter=BatchAdapter(loss_fn), total_steps=1,
                          rank=0, world_size=1, store=None,
                          stream=SimpleNamespace(next=lambda: (next(stream), 0, False)))
    owner = SmoothOutStep(ss=0.0, clip=0.0, mb=4, batch_multiplier=3)
    assert owner.batches_per_step() == 3  # so that --epochs stay passes over the data
    owner.setup(ctx)
    state = SimpleNamespace(batch=batches[0], step=0, epoch_end=False, time=0.0, lr=None)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(state.batch[0]), state.batch[1])
        loss.backward()
        return loss.detach()

    owner.step(closure, ctx, state)
    # ss = 0, no clipping: one SGD step on the mean gradient over all 18 samples
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    loss_fn(ref(x), y).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert owner.optim.t == 1


def test_noisy_relu_draws_a_slope_in_a_b_in_train_mode_only():
    from lscape.plugins.optim.smoothout import NoisyReLU, noisy_relus

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    keys = set(model.state_dict())
    assert noisy_relus(model, 0.5, 1.5) == 2
    assert set(model.state_dict()) == keys and isinstance(model[2][1], NoisyReLU)
    act = model[1]
    x = torch.cat([torch.linspace(0.1, 2.0, 20000), -torch.linspace(0.1, 2.0, 100)])
    torch.manual_seed(0)
    out = act(x)
    ratio = out[:20000] / x[:20000]
    assert torch.all(out[20000:] == 0)
    assert ratio.min() >= 0.5 and ratio.max() <= 1.5
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.01)
    assert float(ratio.var()) == pytest.approx(1 / 12, rel=0.05)   # U(0.5, 1.5)
    act.eval()
    assert torch.equal(act(x), torch.relu(x))
    from lscape.errors import UsageError
    from lscape.plugins.optim.smoothout import SmoothOutStep

    with pytest.raises(UsageError, match="relu_noise"):
        SmoothOutStep(relu_noise="1.5:0.5")
    from types import SimpleNamespace

    with pytest.raises(UsageError, match="no nn.ReLU"):
        SmoothOutStep(relu_noise="0.9:1.1").check(SimpleNamespace(model=nn.Sequential(nn.Linear(2, 2), nn.Tanh())))
