"""`lscape.optim`: SAM, SmoothOut and Entropy-SGD as plain torch.optim optimizers, in a loop
of one's own and through `session.step(closure=...)`, equal to the engine's step owners;
ordinary `torch.optim.Optimizer`s to schedulers, isinstance checks, state dicts, copies and
the old plugin-package names."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

import lscape
import lscape.optim
import lscape.plugins.optim
from lscape.data import BatchStream, derived_seed
from lscape.store import RunReader

COMMON = dict(data="synthetic", data_opts={"n": 48, "dim": 5, "classes": 3}, model="mlp", model_opts={"widths": 6},
              batch_size=8, steps=6, lr=0.1, momentum=0.9, progress=False, checkpoint_schedule="never")


def _quadratic():
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64)
    a = a @ a.T + torch.eye(4, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    return a, theta


def _closure(opt, a, theta):
    def closure():
        opt.zero_grad()
        loss = 0.5 * theta @ a @ theta
        loss.backward()
        return loss
    return closure


def test_sam_step_is_the_closed_form_on_a_quadratic():
    a, theta = _quadratic()
    t0 = theta.detach().clone()
    opt = lscape.optim.SAM([theta], torch.optim.SGD, rho=0.3, lr=0.1)
    loss = opt.step(_closure(opt, a, theta))
    g = a @ t0
    e = 0.3 * g / (g.norm() + 1e-5)
    expected = t0 - 0.1 * (a @ (t0 + e))
    assert float(loss.detach()) == pytest.approx(float(0.5 * t0 @ a @ t0), rel=1e-14)
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-12, atol=1e-14)
    assert isinstance(opt, torch.optim.Optimizer) and opt.stats["perturbation_norm"] == pytest.approx(float(e.norm()))


@pytest.mark.parametrize("make", [
    lambda p: lscape.optim.SAM(p, torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9),
    lambda p: lscape.optim.SmoothOut(p, torch.optim.SGD, ss=0.0, clip=None, lr=0.1, momentum=0.9),
    lambda p: lscape.optim.EntropySGD(p, torch.optim.SGD, L=0, lr=0.1, momentum=0.9),
    lambda p: lscape.optim.SAM(p, torch.optim.SGD(p, lr=0.1, momentum=0.9), rho=0.0),
])
def test_neutral_settings_are_the_base_optimizer_exactly(make):
    a, theta = _quadratic()
    ref = torch.nn.Parameter(theta.detach().clone())
    opt, base = make([theta]), torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)  # a scheduler takes the variant
    base_sched = torch.optim.lr_scheduler.StepLR(base, step_size=2, gamma=0.5)
    for _ in range(5):
        opt.step(_closure(opt, a, theta))
        base.step(_closure(base, a, ref))
        sched.step()
        base_sched.step()
    assert torch.equal(theta.detach(), ref.detach())
    state = opt.state_dict()
    assert state["variant"]["t"] == 5 and opt.param_groups[0]["lr"] == base.param_groups[0]["lr"]


def test_entropy_sgd_draws_a_batch_per_closure_call():
    a, theta = _quadratic()
    opt = lscape.optim.EntropySGD([theta], torch.optim.SGD, L=3, lr=0.1, momentum=0.9, nesterov=True,
                                  generator=torch.Generator().manual_seed(0))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = 0.5 * theta @ a @ theta
        loss.backward()
        return loss

    opt.step(closure)
    assert len(calls) == 4 and opt.t == 1 and opt.param_groups[0]["momentum"] == 0.9


def _built():
    from lscape.build import build_data, build_loss, build_model
    from lscape.manager import build_registry, get_plugin_manager

    reg = build_registry(get_plugin_manager())
    torch.manual_seed(0)
    train_set, _ = build_data("synthetic", COMMON["data_opts"], reg.datasets, 0)
    model = build_model("mlp", COMMON["model_opts"], reg.models, train_set)
    return train_set, model, build_loss("ce", reg.losses)


def test_sam_in_a_hand_loop_equals_the_engines_sam_plugin(tmp_path):
    """The `sam` step owner under `lscape.run`, the same plugin through `session.step(closure=)`,
    and `lscape.optim.SAM` stepped by the session: the same training, bit for bit."""
    engine = lscape.run(**COMMON, plugins=["sam"], plugin_options={"sam": {"rho": 0.05, "stats": "every:1"}},
                        out=str(tmp_path / "engine.zarr"))
    paths = {}
    for how in ("plugin", "optimizer"):
        train_set, model, loss_fn = _built()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if how == "plugin":
            opt, plugins = base, ["sam"]
        else:
            opt, plugins = lscape.optim.SAM(None, base, rho=0.05, model=model), []
        stream = BatchStream(train_set, 8, derived_seed(0, "train-stream"))
        with lscape.attach(model, opt, loss_fn, train_data=train_set, plugins=plugins, progress=False,
                           plugin_options={"sam": {"rho": 0.05, "stats": "every:1"}} if plugins else None,
                           out=str(tmp_path / f"{how}.zarr")) as session:
            for _ in range(6):
                batch, _, _ = stream.next()

                def closure():
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(batch[0]), batch[1])
                    loss.backward()
                    return loss

                session.step(batch, closure=closure)
        paths[how] = session.path
    ref = RunReader(engine.path)
    for how, path in paths.items():
        np.testing.assert_array_equal(RunReader(path).read("train")["loss"], ref.read("train")["loss"], err_msg=how)
    np.testing.assert_array_equal(RunReader(paths["plugin"]).read("sam")["grad_norm"], ref.read("sam")["grad_norm"])


def test_a_step_owner_plugin_needs_a_closure(tmp_path):
    train_set, model, loss_fn = _built()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = train_set.tensors
    with pytest.raises(lscape.UsageError, match="closure"):
        with lscape.attach(model, opt, loss_fn, plugins=["sam"], out=str(tmp_path / "s.zarr"), progress=False) as s:
            loss = loss_fn(model(x), y)
            loss.backward()
            s.step((x, y), loss)


def test_options_split_between_the_variant_and_the_base():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = lscape.optim.SAM(params, torch.optim.Adam, rho=0.1, lr=1e-3, eps=1e-8, sam_eps=1e-3)
    assert opt.base.defaults["eps"] == 1e-8 and opt.eps == 1e-3 and opt.rho == 0.1 and opt.param_groups[0]["lr"] == 1e-3
    e = lscape.optim.EntropySGD(params, torch.optim.SGD, L=2, lr=0.5, momentum=0.9, langevin_momentum=0.5, langevin_lr=0.2)
    assert e.param_groups[0]["momentum"] == 0.9 and e.momentum == 0.5 and e.langevin_lr == 0.2 and e.L == 2
    with pytest.raises(TypeError, match="unknown option 'rh0'"):
        lscape.optim.SAM(params, torch.optim.SGD, lr=0.1, rh0=0.1)
    with pytest.raises(TypeError, match="belong to the base optimizer go to its constructor"):
        lscape.optim.SAM(params, torch.optim.SGD(params, lr=0.1), momentum=0.9)


VARIANTS = {
    "sam": lambda p: lscape.optim.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "smoothout": lambda p: lscape.optim.SmoothOut(p, torch.optim.SGD, ss=0.01, lr=0.1, momentum=0.9,
                                                  generator=torch.Generator().manual_seed(1)),
    "entropy-sgd": lambda p: lscape.optim.EntropySGD(p, torch.optim.SGD, L=2, lr=0.1, momentum=0.9, nesterov=True,
                                                     generator=torch.Generator().manual_seed(2)),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_variant_is_an_optimizer_a_scheduler_drives(name):
    a, theta = _quadratic()
    opt = VARIANTS[name]([theta])
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, lscape.optim.WrappedOptimizer)
    # one set of groups and state: the base optimizer's own objects
    assert opt.param_groups is opt.base.param_groups and opt.state is opt.base.state
    assert opt.defaults is opt.base.defaults and opt.base_optimizer is opt.base
    plain = torch.optim.SGD([torch.nn.Parameter(theta.detach().clone())], lr=0.1, momentum=0.9)
    scheds = [(torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
               torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k))) for o in (opt, plain)]
    lrs, ref = [], []
    for _ in range(4):
        with warnings.catch_warnings():
            # the scheduler sees the variant's step (else: "lr_scheduler.step() before optimizer.step()")
            warnings.simplefilter("error")
            opt.step(_closure(opt, a, theta))
            plain.step()
            for step, lam in scheds:
                step.step()
                lam.step()
        lrs.append(opt.base.param_groups[0]["lr"])
        ref.append(plain.param_groups[0]["lr"])
    # the schedules act on the base optimizer's groups exactly as on a plain SGD's
    assert lrs == ref and len(set(lrs)) == 4
    step = scheds[0][0]
    assert opt.t == 4 and step.last_epoch == 4
    assert opt.base.state[theta]["momentum_buffer"] is not None


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_state_dict_round_trips_into_a_fresh_variant_bit_for_bit(name):
    a, theta = _quadratic()
    opt = VARIANTS[name]([theta])
    for _ in range(3):
        opt.step(_closure(opt, a, theta))
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved) == {"base", "variant"} and saved["variant"]["t"] == 3
    theta_saved = theta.detach().clone()
    gen_state = opt.generator.get_state() if getattr(opt, "generator", None) is not None else None
    opt.step(_closure(opt, a, theta))
    expected = theta.detach().clone()

    other = torch.nn.Parameter(theta_saved.clone())
    fresh = VARIANTS[name]([other])
    fresh.load_state_dict(saved)
    if gen_state is not None:
        fresh.generator.set_state(gen_state)
    # load_state_dict replaced the base's groups and state objects: the variant follows them
    assert fresh.param_groups is fresh.base.param_groups and fresh.state is fresh.base.state
    assert fresh.t == 3
    fresh.step(_closure(fresh, a, other))
    assert torch.equal(other.detach(), expected)


def test_loading_into_the_base_directly_keeps_the_variant_linked():
    _, theta = _quadratic()
    opt = lscape.optim.SAM([theta], torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.base.load_state_dict(torch.optim.SGD([theta], lr=0.3, momentum=0.9).state_dict())
    assert opt.param_groups is opt.base.param_groups and opt.param_groups[0]["lr"] == 0.3


def test_copies_and_pickles_keep_the_base_and_the_counters():
    a, theta = _quadratic()
    opt = VARIANTS["sam"]([theta])
    opt.step(_closure(opt, a, theta))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(clone, lscape.optim.SAM) and clone.t == 1 and clone.rho == opt.rho
        assert clone.param_groups is clone.base.param_groups and clone.param_groups[0]["lr"] == 0.1


def test_step_hooks_and_add_param_group_go_through_the_optimizer_api():
    a, theta = _quadratic()
    opt = lscape.optim.SAM([theta], torch.optim.SGD, lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    opt.step(_closure(opt, a, theta))
    assert seen == ["pre", "post"]
    extra = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(opt.base.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5 and "momentum" in opt.param_groups[1]


def test_the_old_names_are_the_new_classes():
    """Older code imports the algorithms from lscape.plugins.optim and wraps a built optimizer."""
    from lscape.plugins.optim.entropy_sgd import EntropySGD
    from lscape.plugins.optim.sam import sam_edge
    from lscape.plugins.optim.smoothout import NoisyReLU, noisy_relus

    assert lscape.plugins.optim.SAM is lscape.optim.SAM and EntropySGD is lscape.optim.EntropySGD
    assert sam_edge is lscape.optim.sam_edge and (NoisyReLU, noisy_relus) == (lscape.optim.NoisyReLU,
                                                                              lscape.optim.noisy_relus)
    _, theta = _quadratic()
    base = torch.optim.SGD([theta], lr=0.1)
    for opt in (lscape.plugins.optim.SAM(base, rho=0.1), lscape.optim.SAM(None, base, rho=0.1),
                lscape.optim.SAM(base=base, params=None, rho=0.1)):
        assert opt.base is base and opt.rho == 0.1 and isinstance(opt, torch.optim.Optimizer)
    with pytest.raises(TypeError, match="base_optimizer must be"):
        lscape.optim.SAM([theta], "sgd")


@pytest.mark.slow
def test_lightning_trains_checkpoints_and_resumes_a_variant_with_its_scheduler(tmp_path):
    """SAM returned by `configure_optimizers` with a StepLR: Lightning steps it through its
    closure, the scheduler moves its lr, and a checkpoint resumes it with its counter; the
    weights are a hand loop's with the same optimizer and schedule."""
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long())

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))

    def make(params):
        opt = lscape.optim.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()
            self.calls = 0

        def training_step(self, batch, batch_idx):
            self.calls += 1
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            opt, sched = make(self.parameters())
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def trainer(epochs):
        return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False,
                          default_root_dir=str(tmp_path))

    module = Tiny()
    first = trainer(1)
    first.fit(module, DataLoader(data, batch_size=8))
    assert module.calls == 8  # 4 steps, two closure calls each
    ckpt = tmp_path / "one.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert saved["variant"]["t"] == 4 and saved["base"]["param_groups"][0]["lr"] == 0.05

    resumed = Tiny()
    second = trainer(2)
    second.fit(resumed, DataLoader(data, batch_size=8), ckpt_path=str(ckpt))
    opt = second.optimizers[0]
    assert isinstance(opt, lscape.optim.SAM) and opt.t == 8 and opt.param_groups[0]["lr"] == 0.025

    model = net()
    hand, sched = make(model.parameters())
    for _ in range(2):
        for xb, yb in DataLoader(data, batch_size=8):
            def closure():
                hand.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                return loss
            hand.step(closure)
        sched.step()
    for a, b in zip(resumed.net.parameters(), model.parameters()):
        assert torch.equal(a.detach(), b.detach())
