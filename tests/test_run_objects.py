"""Objects given to `lscape.run` are honoured or refused in one line (issue 21): an optimizer
must update the model being trained; a DataLoader's batch size and drop_last are kept, and a
sampler lscape cannot honour is refused."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, SubsetRandomSampler, TensorDataset

import lscape
from lscape.errors import UsageError


def _data(n=120):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model():
    return torch.nn.Sequential(torch.nn.Linear(8, 3))


@pytest.mark.parametrize("params", [
    lambda model, other: other.parameters(),  # another model's: nothing would be trained
    lambda model, other: [*model.parameters(), *other.parameters()],  # partly another model's
])
def test_an_optimizer_over_another_models_parameters_is_refused(tmp_path, params):
    model, other = _model(), _model()
    with pytest.raises(UsageError, match="make it over model.parameters()"):
        lscape.run(model=model, data=_data(), loss="ce", optimizer=torch.optim.SGD(params(model, other), lr=0.1),
                   steps=2, progress=False, out=str(tmp_path / "o.zarr"))
    assert not (tmp_path / "o.zarr").exists()


def test_an_optimizer_over_part_of_the_model_trains_that_part(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    body = model[0].weight.detach().clone()
    result = lscape.run(model=model, data=_data(), loss="ce", optimizer=torch.optim.SGD(model[2].parameters(), lr=0.1),
                        steps=2, progress=False, out=str(tmp_path / "o.zarr"))
    assert result.status == "completed"
    assert torch.equal(model[0].weight, body)  # what the optimizer lacks stays, as with plain PyTorch


def test_attach_refuses_an_optimizer_over_another_model(tmp_path):
    model, other = _model(), _model()
    with pytest.raises(UsageError, match="attach: the optimizer"):
        lscape.attach(model, torch.optim.SGD(other.parameters(), lr=0.1), "ce", out=str(tmp_path / "a.zarr"))
    assert not (tmp_path / "a.zarr").exists()


@pytest.mark.parametrize("drop_last,steps", [(True, 14), (False, 16)])
def test_a_dataloaders_drop_last_is_honoured(tmp_path, drop_last, steps):
    loader = DataLoader(_data(120), batch_size=16, drop_last=drop_last)  # 7.5 batches an epoch
    result = lscape.run(model=_model(), data=loader, loss="ce", epochs=2, progress=False, out=str(tmp_path / "d.zarr"))
    assert result.steps == steps


@pytest.mark.parametrize("loader", [
    lambda ds: DataLoader(ds, batch_size=16, sampler=SubsetRandomSampler(range(40))),
    lambda ds: DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]),
])
def test_a_dataloader_sampler_lscape_cannot_honour_is_refused(tmp_path, loader):
    with pytest.raises(UsageError, match="cannot honour"):
        lscape.run(model=_model(), data=loader(_data()), loss="ce", steps=2, progress=False,
                   out=str(tmp_path / "s.zarr"))
    assert not (tmp_path / "s.zarr").exists()


def test_a_plain_batch_sampler_is_a_batch_size(tmp_path):
    loader = DataLoader(_data(), batch_sampler=BatchSampler(SequentialSampler(range(120)), 16, drop_last=True))
    result = lscape.run(model=_model(), data=loader, loss="ce", epochs=1, progress=False, out=str(tmp_path / "b.zarr"))
    assert result.steps == 7
