"""`lscape.attach`: built-in probes in a loop the user writes, with the engine's events and numbers."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lscape
from lscape.curvature import dense_spectrum
from lscape.data import derived_seed
from lscape.hookspecs import hookimpl
from lscape.store import RunReader


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0.5).long()
    return TensorDataset(x, y)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


PLUGINS = ["grad-norm", "sharpness", "grad-noise"]
OPTIONS = {"sharpness": {"schedule": "every:4", "tol": 1e-5, "max_iter": 200},
           "grad-noise": {"schedule": "every:6", "noise_size": 2, "sharpness_batches": 2, "dir_pairs": 1}}


def train(epochs=2, out=None, snapshots=None):
    """A loop written like the imagenet-grad-noise seed's train.py: its own DataLoader, SGD with
    momentum, criterion, zero_grad/backward/step. The lines marked lscape are all that attach adds."""
    dataset = _data()
    model = _model()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    train_loader = DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    session = None
    if out is not None:
        session = lscape.attach(model, optimizer, criterion, train_data=train_loader, plugins=PLUGINS,  # lscape
                                plugin_options=OPTIONS, out=out, progress=False)  # lscape
    losses = []
    for epoch in range(epochs):
        model.train()
        for i, (input, target) in enumerate(train_loader):
            output = model(input)
            loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            if snapshots is not None:
                snapshots.append(copy.deepcopy(model.state_dict()))
            losses.append(loss.item())
            if session is not None:  # lscape
                session.step((input, target), loss)  # lscape (replaces optimizer.step())
            else:
                optimizer.step()
    if session is not None:
        session.close()  # lscape
    return model, losses, session


def test_seed_style_loop_records_probes_and_leaves_training_bit_identical(tmp_path):
    out = str(tmp_path / "a.zarr")
    snapshots = []
    model, losses, session = train(out=out, snapshots=snapshots)
    bare_model, bare_losses, _ = train()
    import inspect

    # what attach adds to the seed's loop (the rest of `train` is the seed's, plus the switch
    # that runs it bare for the comparison below)
    assert sum("# lscape" in line for line in inspect.getsource(train).splitlines()) <= 6
    # probes leave the user's training bit-identical
    assert losses == bare_losses
    for a, b in zip(model.parameters(), bare_model.parameters()):
        assert torch.equal(a, b)

    r = RunReader(out)
    assert r.attrs["status"] == "completed" and r.attrs["steps_done"] == 12 and r.attrs["kind"] == "attach"
    for group in ("train", "grad-norm", "sharpness", "grad-noise"):
        assert r.has(group), r.groups()
    t = r.read("train")
    np.testing.assert_array_equal(t["step"], np.arange(12))
    np.testing.assert_array_equal(t["loss"], np.asarray(losses, dtype=t["loss"].dtype))
    np.testing.assert_array_equal(t["epoch"], np.repeat([0, 1], 6))
    assert np.allclose(t["lr"], 0.05)
    g = r.read("grad-norm")
    assert len(g["step"]) == 12 and np.all(g["grad_norm"] > 0)
    noise = r.read("grad-noise")
    np.testing.assert_array_equal(noise["step"], [0, 6])
    assert np.all(noise["noise_sq"] > 0) and np.all(np.isfinite(noise["sharpness"]))

    # sharpness/lambda_max at each measured step is the dense Hessian's λ_max of the same weights,
    # on the probe's own fixed measurement subset, drawn from train_data
    s = r.read("sharpness")
    np.testing.assert_array_equal(s["step"], [0, 4, 8])
    probe = session.ctx.plugins["sharpness"]
    batches = probe.batches(session.ctx, None)
    ref = _model()
    for step, lam in zip(s["step"], s["lambda_max"]):
        ref.load_state_dict(snapshots[step])
        dense = float(dense_spectrum(ref, nn.CrossEntropyLoss(), batches).eigenvalues.max())
        assert lam == pytest.approx(dense, rel=1e-5, abs=1e-6)


def test_store_opens_with_show_plot_and_xarray(cli, tmp_path):
    out = str(tmp_path / "s.zarr")
    dataset = _data(48)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(dataset, batch_size=16)
    with lscape.attach(model, opt, F.cross_entropy, train_data=loader, plugins=["grad-norm", "sharpness"],
                       plugin_options={"sharpness": {"every": 2, "batches": 1}}, out=out, progress=False) as session:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            session.step((x, y), loss)
    code, shown, err = cli("show", out)
    assert code == 0, err
    assert "sharpness" in shown and "grad-norm" in shown and "completed" in shown
    pytest.importorskip("matplotlib")
    code, _, err = cli("plot", out, "--out", tmp_path / "fig")
    assert code == 0, err
    assert (tmp_path / "fig" / "sharpness_lambda_max.png").is_file()
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(out, group="sharpness", consolidated=False)
    assert list(ds["step"].values) == [0, 2]


def test_full_batch_gd_equals_lscape_run_bitwise(tmp_path):
    """Full-batch GD, once by `lscape.run`, once by attach in a hand-written loop on the same
    model, data and seed: identical train/loss and sharpness/lambda_max."""
    from lscape.build import build_data, build_loss, build_model
    from lscape.manager import build_registry, get_plugin_manager

    data_opts = {"n": 64, "dim": 5, "classes": 3}
    model_opts = {"widths": 6}
    opts = {"sharpness": {"every": 1, "tol": 1e-4}}
    engine = lscape.run(data="synthetic", data_opts=data_opts, model="mlp", model_opts=model_opts, batch_size="full",
                        steps=5, lr=0.1, plugins=["sharpness"], plugin_options=opts, progress=False,
                        checkpoint_schedule="never", out=str(tmp_path / "engine.zarr"))
    reg = build_registry(get_plugin_manager())
    torch.manual_seed(0)
    train_set, _ = build_data("synthetic", data_opts, reg.datasets, 0)
    model = build_model("mlp", model_opts, reg.models, train_set)
    loss_fn = build_loss("ce", reg.losses)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = train_set.tensors
    with lscape.attach(model, optimizer, loss_fn, train_data=train_set, batch_size="full", plugins=["sharpness"],
                       plugin_options=opts, out=str(tmp_path / "attach.zarr"), progress=False) as session:
        for _ in range(5):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            session.step((x, y), loss)
    a, b = RunReader(engine.path), RunReader(session.path)
    np.testing.assert_array_equal(a.read("train")["loss"], b.read("train")["loss"])
    np.testing.assert_array_equal(a.read("train")["epoch"], b.read("train")["epoch"])
    np.testing.assert_array_equal(a.read("sharpness")["lambda_max"], b.read("sharpness")["lambda_max"])
    assert len(b.read("sharpness")["step"]) == 5


class Recorder:
    """Every run event with the payload fields a probe reads."""

    def __init__(self):
        self.events = []

    @hookimpl
    def on_run_start(self, ctx):
        self.events.append(("run_start",))

    @hookimpl
    def on_epoch_start(self, ctx, epoch):
        self.events.append(("epoch_start", epoch))

    @hookimpl
    def on_step_start(self, ctx, state):
        self.events.append(("step_start", state.step, state.epoch, state.epoch_end))

    @hookimpl
    def on_after_backward(self, ctx, state):
        self.events.append(("after_backward", state.step, round(float(state.loss), 6), state.lr))

    @hookimpl
    def on_evaluate(self, ctx, state, metrics):
        self.events.append(("evaluate", state.step, sorted(metrics)))

    @hookimpl
    def on_step_end(self, ctx, state):
        self.events.append(("step_end", state.step))

    @hookimpl
    def on_epoch_end(self, ctx, epoch):
        self.events.append(("epoch_end", epoch))

    @hookimpl
    def on_run_end(self, ctx, status):
        self.events.append(("run_end", status))


def test_events_in_the_engine_order(tmp_path):
    """Same events, same order, same payloads as the engine on the same workload."""
    from lscape.build import build_data, build_loss, build_model
    from lscape.data import BatchStream
    from lscape.engine import Engine
    from lscape.manager import build_registry, get_plugin_manager

    common = dict(data="synthetic", data_opts={"n": 40, "dim": 4, "classes": 2}, model="mlp",
                  model_opts={"widths": 4}, batch_size=16, steps=5, lr=0.1, progress=False,
                  checkpoint_schedule="never", eval_schedule="epoch")
    pm = get_plugin_manager()
    rec_engine = Recorder()
    pm.register(rec_engine)
    Engine(lscape.api.make_config(None, **common, plugins=[], out=str(tmp_path / "e.zarr")), pm=pm).run()

    reg = build_registry(get_plugin_manager())
    torch.manual_seed(0)
    train_set, eval_set = build_data("synthetic", common["data_opts"], reg.datasets, 0)
    model = build_model("mlp", common["model_opts"], reg.models, train_set)
    loss_fn = build_loss("ce", reg.losses)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stream = BatchStream(train_set, 16, derived_seed(0, "train-stream"))
    pm2 = get_plugin_manager()
    rec = Recorder()
    pm2.register(rec)
    session = lscape.attach(model, optimizer, loss_fn, train_data=train_set, eval_data=eval_set, batch_size=16,
                            steps_per_epoch=stream.steps_per_epoch, out=str(tmp_path / "s.zarr"), progress=False,
                            pm=pm2)
    for _ in range(5):
        batch, _, epoch_end = stream.next()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        session.after_backward(batch, loss)
        optimizer.step()
        if epoch_end:
            session.evaluate()
        session.step_end()
    session.close()
    assert rec.events == rec_engine.events
    assert ("epoch_end", 1) in rec.events and ("evaluate", 1, ["eval_accuracy", "eval_loss"]) in rec.events
    np.testing.assert_array_equal(RunReader(str(tmp_path / "s.zarr")).read("train")["eval_loss"],
                                  RunReader(str(tmp_path / "e.zarr")).read("train")["eval_loss"])


def test_probe_needing_training_data_without_it_is_bad_input_before_the_store(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for plugin in ("sharpness", "grad-noise"):
        with pytest.raises(lscape.UsageError, match="train_data"):
            lscape.attach(model, opt, F.cross_entropy, plugins=[plugin], out=str(tmp_path / "x.zarr"))
    with pytest.raises(lscape.UsageError, match="unknown plugin"):
        lscape.attach(model, opt, F.cross_entropy, plugins=["no-such-probe"], out=str(tmp_path / "x.zarr"))
    with pytest.raises(lscape.UsageError, match="owns the step"):
        lscape.attach(model, None, F.cross_entropy, plugins=["sam"], out=str(tmp_path / "x.zarr"))
    assert not (tmp_path / "x.zarr").exists()
    # a minibatch probe needs nothing more; an existing store is refused
    lscape.attach(model, opt, F.cross_entropy, plugins=["grad-norm"], out=str(tmp_path / "y.zarr"),
                  progress=False).close()
    with pytest.raises(lscape.UsageError, match="already exists"):
        lscape.attach(model, opt, F.cross_entropy, out=str(tmp_path / "y.zarr"))


def test_failure_and_interrupt_mark_the_store(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(16).tensors
    with pytest.raises(RuntimeError, match="boom"):
        with lscape.attach(model, opt, F.cross_entropy, plugins=["grad-norm"], out=str(tmp_path / "f.zarr"),
                           progress=False) as session:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            session.step((x, y), loss)
            raise RuntimeError("boom")
    r = RunReader(str(tmp_path / "f.zarr"))
    assert r.attrs["status"] == "failed" and "boom" in r.attrs["error"] and len(r.read("grad-norm")["step"]) == 1
    with pytest.raises(KeyboardInterrupt):
        with lscape.attach(model, opt, F.cross_entropy, out=str(tmp_path / "i.zarr"), progress=False):
            raise KeyboardInterrupt
    assert RunReader(str(tmp_path / "i.zarr")).attrs["status"] == "interrupted"


def test_state_dict_resumes_exactly(tmp_path):
    """A run checkpointed by the user's loop and resumed equals one run straight through:
    warm-started sharpness vectors, grad-norm's θ_0, grad-noise's sampler and pending row, and
    the trajectory come back with the session state."""
    dataset = _data(48)
    batches = [dataset[i:i + 16] for i in range(0, 48, 16)] * 2
    opts = {"sharpness": {"every": 1, "batches": 1, "tol": 1e-2, "max_iter": 4},
            "grad-noise": {"every": 2, "noise_size": 2, "sharpness_batches": 2, "dir_pairs": 1},
            "trajectory": {"every": 1}}

    def run(out, steps, start=None):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        session = lscape.attach(model, opt, F.cross_entropy, train_data=dataset, batch_size=16,
                                plugins=["grad-norm", "sharpness", "grad-noise", "trajectory"], plugin_options=opts,
                                out=out, progress=False,
                                resume=start is not None)
        if start is not None:
            model.load_state_dict(start["model"])
            opt.load_state_dict(start["optimizer"])
            session.load_state_dict(start["lscape"])
        for x, y in batches[session.step_count:steps]:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            session.step((x, y), loss)
        ckpt = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
                "lscape": copy.deepcopy(session.state_dict())}
        session.close()
        return ckpt

    straight = str(tmp_path / "straight.zarr")
    run(straight, 6)
    split = str(tmp_path / "split.zarr")
    ckpt = run(split, 3)
    run(split, 6, start=ckpt)
    a, b = RunReader(straight), RunReader(split)
    groups = [g for g in a.groups() if g != "checkpoints" and not g.startswith("checkpoints/")]
    assert {"train", "grad-norm", "sharpness", "grad-noise", "trajectory"} <= set(groups), groups
    assert sorted(b.groups()) == sorted(a.groups())
    for group in groups:
        da, db = a.read(group), b.read(group)
        for key in da:
            if key != "time":
                np.testing.assert_array_equal(da[key], db[key], err_msg=f"{group}/{key}")


def _contract_probes():
    from lscape.manager import build_registry, get_plugin_manager
    from test_probe_contract import NEEDS_OTHER_MODEL

    return sorted(n for n in build_registry(get_plugin_manager()).probes if n not in NEEDS_OTHER_MODEL)


def _contract_loop(tmp_path, name=None):
    """Six SGD steps of a small MLP in a hand loop (shuffled DataLoader, momentum), with one
    probe attached every other step, or none."""
    from test_probe_contract import OPTIONS

    torch.manual_seed(0)
    x = torch.randn(96, 6)
    dataset = TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.8).long())
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(dataset, batch_size=16, shuffle=True)
    session = None
    if name is not None:
        opts = {name: {**OPTIONS.get(name, {}), "schedule": "every:2"}}
        session = lscape.attach(model, opt, F.cross_entropy, train_data=loader, eval_data=dataset, plugins=[name],
                                plugin_options=opts, out=str(tmp_path / f"{name}.zarr"), progress=False)
    losses = []
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        if session is None:
            opt.step()
        else:
            session.step((x, y), loss)
    if session is not None:
        session.close()
    return losses, [p.detach().clone() for p in model.parameters()], session


@pytest.fixture(scope="module")
def bare_contract(tmp_path_factory):
    return _contract_loop(tmp_path_factory.mktemp("bare"))


@pytest.mark.parametrize("name", _contract_probes())
def test_every_probe_leaves_the_users_training_bit_identical(name, bare_contract, tmp_path):
    losses, params, session = _contract_loop(tmp_path, name)
    assert losses == bare_contract[0]
    assert all(torch.equal(a, b) for a, b in zip(params, bare_contract[1]))
    r = RunReader(session.path)
    assert r.attrs["status"] == "completed"
    assert any(g == name or g.startswith(name) for g in r.groups()), r.groups()


def test_dict_batches_and_a_loaders_own_collate_function(tmp_path):
    """A DataLoader whose collate function builds dict batches (HF style): the probes' fixed
    subset is collated the same way, and sharpness equals the dense λ_max on it."""

    class Keyed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))

        def forward(self, features):
            return self.net(features)

    def collate(samples):
        return {"features": torch.stack([s[0] for s in samples]), "labels": torch.stack([s[1] for s in samples])}

    torch.manual_seed(0)
    x = torch.randn(40, 4)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8, collate_fn=collate)
    model = Keyed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lscape.attach(model, opt, F.cross_entropy, train_data=loader, plugins=["sharpness"], progress=False,
                       plugin_options={"sharpness": {"every": 2, "tol": 1e-5}}, out=str(tmp_path / "d.zarr")) as s:
        for batch in loader:
            loss = F.cross_entropy(model(features=batch["features"]), batch["labels"])
            opt.zero_grad()
            loss.backward()
            s.step(batch, loss)
    batches = s.ctx.plugins["sharpness"].batches(s.ctx, None)
    assert all(isinstance(b, dict) and set(b) == {"features", "labels"} for b in batches)
    lam = RunReader(s.path).read("sharpness")["lambda_max"][-1]
    dense = float(dense_spectrum(model, F.cross_entropy, batches).eigenvalues.max())
    # the last measurement was at step 4, before the last update: re-measure at the final weights
    assert np.isfinite(lam)
    probe = s.ctx.plugins["sharpness"]
    assert probe.measure(s.ctx, lscape.StepState(step=5, epoch=0))["lambda_max"] == pytest.approx(dense, rel=1e-5)
