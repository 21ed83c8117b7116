"""Every built-in probe leaves the training untouched: parameters, buffers, modes, `.grad`,
the global RNG and the training data stream are as it found them, so the recorded losses of
a run with the probe equal those of a run without it, bit for bit."""

import numpy as np
import pytest
import torch

import lscape
from lscape.manager import build_registry, get_plugin_manager
from lscape.probe import preserve_state
from lscape.store import RunReader

# Options that make each probe cheap (or give it what it needs) on a tiny model.
OPTIONS = {
    "hessian": {"k": 2, "trace_schedule": "every:2", "density_schedule": "every:2"},
    "landscape": {"alpha": "-1:1:#3"},
    "eps-sharpness": {"repeats": 1},
    "grad-noise": {"noise_size": 2, "sharpness_batches": 2},
    "layer-norms": {},
}
NEEDS_OTHER_MODEL = {"interpolate"}  # measured against a second model: covered in its own tests

BASE = dict(data="synthetic", data_opts={"n": 96, "dim": 6, "classes": 3}, model_opts={"widths": 8},
            batch_size=16, steps=6, progress=False, checkpoint_schedule="never")


def _probes():
    reg = build_registry(get_plugin_manager())
    return sorted(n for n, e in reg.probes.items() if n not in NEEDS_OTHER_MODEL)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.zarr"
    return RunReader(lscape.run(**BASE, plugins=[], out=str(path)).path).read("train")["loss"]


@pytest.mark.parametrize("name", _probes())
def test_probe_changes_nothing_the_training_sees(name, baseline, tmp_path):
    opts = {**OPTIONS.get(name, {}), "schedule": "every:2"}
    res = lscape.run(**BASE, plugins=[name], plugin_options={name: opts}, out=str(tmp_path / "p.zarr"))
    assert res.status == "completed"
    r = RunReader(res.path)
    np.testing.assert_array_equal(r.read("train")["loss"], baseline)
    assert any(g == name or g.startswith(name + "/") or g.startswith(name) for g in r.groups()), r.groups()


def test_preserve_state_restores_everything_bit_for_bit():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    model.train()
    model(torch.randn(8, 4)).sum().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    with preserve_state(model):
        model.eval()
        for p in model.parameters():
            p.data.mul_(3)
            p.grad = None
        model[1].running_mean.add_(1)
        torch.randn(10)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng)
