"""The engine at scale: deferred NaN checks, epochs as passes for step owners, iterable data,
precision and compile wiring, objects in the Python API."""

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

import lscape
from lscape.errors import UsageError
from lscape.store import RunReader

SYNTH = dict(data="synthetic", data_opts={"n": 64, "dim": 8, "classes": 3}, batch_size=16, progress=False)


def test_deferred_nan_check_stops_within_the_window_and_names_the_first_bad_step(tmp_path):
    # the fifth forward pass (step 3: one pass is the set-up check) gives inf
    res = lscape.run(model="helpers_workloads:exploding", model_opts={"after": 4}, steps=40, nan_check_every=8,
                     out=str(tmp_path / "n.zarr"), **SYNTH)
    assert res.status == "diverged"
    r = RunReader(res.path)
    assert "at step 3 (noticed at step 7" in r.attrs["error"]
    loss = r.read("train")["loss"]
    assert len(loss) == 8 and np.isfinite(loss[:3]).all() and not np.isfinite(loss[3])


def test_epochs_are_passes_over_the_data_for_a_step_owner_drawing_fresh_batches(tmp_path):
    # digits: 1437 training samples, batch 256 -> 6 batches an epoch; L=8 -> 9 batches a step,
    # so every step crosses an epoch boundary: evaluation must still happen
    res = lscape.run(plugins=["entropy-sgd"], plugin_options={"entropy-sgd": {"L": 8}}, epochs=3, batch_size=256,
                     progress=False, out=str(tmp_path / "e.zarr"))
    train = RunReader(res.path).read("train")
    assert len(train["step"]) == 2  # ceil(3 epochs * 6 batches / 9 batches a step)
    assert np.isfinite(train["eval_loss"]).sum() == 2  # each step ended an epoch
    assert train["epoch"][-1] >= 1


class Stream(IterableDataset):
    """An iterable data set: the same 40 samples in the same order on every pass."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 8, generator=g)
        y = torch.randint(0, 3, (40,), generator=g)
        return iter(zip(x, y))


def stream_data():
    return Stream()


def test_iterable_dataset_trains_with_steps_and_refuses_epochs(tmp_path):
    with pytest.raises(UsageError, match="IterableDataset"):
        lscape.run(data="test_engine_scale:stream_data", model="test_engine_scale:small_mlp", batch_size=16,
                   progress=False, out=str(tmp_path / "a.zarr"), plugins=[])
    res = lscape.run(data="test_engine_scale:stream_data", model="test_engine_scale:small_mlp", batch_size=16,
                     steps=7, progress=False, out=str(tmp_path / "b.zarr"), plugins=[])
    train = RunReader(res.path).read("train")
    # 40 samples in batches of 16: 3 steps a pass, epochs counted as the stream runs dry
    assert list(train["epoch"]) == [0, 0, 0, 1, 1, 1, 2]


def small_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_fp16_with_a_step_owner_is_refused_and_bf16_trains(tmp_path):
    with pytest.raises(UsageError, match="GradScaler"):
        lscape.run(precision="fp16", plugins=["sam"], steps=2, out=str(tmp_path / "a.zarr"), **SYNTH)
    res = lscape.run(precision="bf16", plugins=["sam", "sharpness"], steps=3, out=str(tmp_path / "b.zarr"),
                     plugin_options={"sharpness": {"every": 2}}, **SYNTH)
    r = RunReader(res.path)
    assert res.status == "completed" and np.isfinite(r.read("train")["loss"]).all()
    attrs = r.root["sharpness"].attrs  # probes say what they computed in
    assert attrs["compute_dtype"] == "float32" and attrs["training_precision"] == "bf16"
    res = lscape.run(precision="fp16", steps=3, out=str(tmp_path / "c.zarr"), **SYNTH)
    assert res.status == "completed"


def test_compile_wraps_the_training_forward_and_trains_the_same(tmp_path):
    plain = lscape.run(steps=4, out=str(tmp_path / "p.zarr"), plugins=[], **SYNTH)
    compiled = lscape.run(steps=4, compile="eager", out=str(tmp_path / "c.zarr"), plugins=[], **SYNTH)
    a = RunReader(plain.path).read("train")["loss"]
    b = RunReader(compiled.path).read("train")["loss"]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def _objects():
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    loader = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=8, shuffle=True)
    return model, {"train": loader, "eval": TensorDataset(x[40:], y[40:])}


def test_objects_in_the_python_api_train_like_names_and_resume_with_the_same_objects(tmp_path):
    model, data = _objects()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    res = lscape.run(model=model, data=data, loss=torch.nn.functional.cross_entropy, optimizer=opt, steps=10,
                     checkpoint_schedule="every:4", plugins=["grad-norm"], progress=False, out=str(tmp_path / "o.zarr"))
    assert res.status == "completed"
    r = RunReader(res.path)
    cfg = r.attrs["config"]
    assert cfg["model"].startswith("<object torch.nn.modules.container.Sequential") and cfg["batch_size"] == 8
    assert cfg["optimizer"].startswith("<object torch.optim.sgd.SGD")
    # the same run from a factory for the optimizer: identical numbers
    model2, data2 = _objects()
    res2 = lscape.run(model=model2, data=data2, loss=torch.nn.functional.cross_entropy,
                      optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9), steps=10,
                      plugins=["grad-norm"], progress=False, out=str(tmp_path / "f.zarr"))
    np.testing.assert_array_equal(r.read("train")["loss"], RunReader(res2.path).read("train")["loss"])
    # resuming needs the objects again, and says so in one line
    with pytest.raises(UsageError, match="built from Python objects"):
        lscape.run(resume=res.path, steps=12, progress=False)
    model3, data3 = _objects()
    again = lscape.run(resume=res.path, steps=12, model=model3, data=data3, loss=torch.nn.functional.cross_entropy,
                       optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9), progress=False)
    assert again.status == "completed" and len(RunReader(res.path).read("train")["loss"]) == 12


class _Rows:
    """What a HuggingFace ``datasets.Dataset`` looks like to lscape: a length, rows as dicts of
    lists/numbers, ``column_names``."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=g).tolist()
        self.y = torch.randint(0, 3, (n,), generator=g).tolist()
        self.column_names = ["features", "label", "text"]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "label": self.y[i], "text": "ignored"}


def test_hf_datasets_adapter_gives_tuples_or_dicts_and_splits():
    from lscape.data import from_hf

    ds = from_hf(_Rows(10, 0), tuple_of=("features", "label"))
    x, y = ds[3]
    assert x.shape == (5,) and x.dtype == torch.float32 and y.dtype == torch.int64
    splits = from_hf({"train": _Rows(10, 0), "validation": _Rows(4, 1)}, columns=["features", "label"])
    assert set(splits) == {"train", "eval"} and len(splits["eval"]) == 4
    row = splits["train"][0]
    assert set(row) == {"features", "label"}  # the text column left behind


def test_hf_datasets_adapter_on_a_real_datasets_object():
    from lscape.data import from_hf

    datasets = pytest.importorskip("datasets")
    real = datasets.Dataset.from_dict({"features": [[0.0] * 5] * 6, "label": [1] * 6})
    x, y = from_hf(real, tuple_of=("features", "label"))[2]
    assert x.shape == (5,) and int(y) == 1


def test_a_landscape_grid_too_big_for_one_measurement_is_refused_before_the_store(tmp_path):
    out = tmp_path / "l.zarr"
    with pytest.raises(UsageError, match="landscape.alpha/beta"):
        lscape.run(plugins=["landscape"], plugin_options={"landscape": {"dims": 2, "alpha": "-1:1:#1000"}}, steps=2,
                   out=str(out), **SYNTH)
    assert not out.exists()


@pytest.mark.parametrize("plugin, options, match", [
    ("hessian", {"k": 10**7}, "hessian.k=10000000"),  # more products than the default budget
    ("hessian", {"k": 10**7, "budget": 10**8}, "hessian.k"),  # more than the parameters
    ("hessian", {"k": 200_000, "budget": 10**6}, "hessian.k"),  # fewer, but its basis would not fit
    ("hessian-exact", {"max_params": 10**9}, "hessian-exact.params"),  # 3·n²·8 bytes of a wide MLP
    ("hessian", {"budget": 10**9}, "hessian.trace_samples"),  # the trace's share: its probe vectors do not fit
    ("hessian", {"density_schedule": "every:1", "density_points": 10**9}, "hessian.density_points"),  # the grid
    ("hessian", {"density_schedule": "every:1", "density_steps": 10**9}, "hessian.density_steps"),  # the budget
    ("eos", {"k": 10**7}, "eos.k"),  # eos checks k as every curvature probe does
])
def test_curvature_sizes_beyond_the_model_or_memory_are_refused_before_the_store(tmp_path, plugin, options, match):
    out = tmp_path / "c.zarr"
    with pytest.raises(UsageError, match=match):
        lscape.run(plugins=[plugin], plugin_options={plugin: options}, model_opts={"widths": "20000"}, steps=2,
                   out=str(out), **SYNTH)
    assert not out.exists()
