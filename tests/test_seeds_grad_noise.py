"""grad-noise: its state survives any number of resumes, and compat=original follows the seed
(imagenet-grad-noise's utils.power_method and train.py) step for step."""

from types import SimpleNamespace

import torch

from lscape.plugins.noise.probes import GradNoise


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
