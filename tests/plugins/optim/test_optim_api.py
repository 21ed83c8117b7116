"""`lscape.optim`'s variants are ordinary `torch.optim.Optimizer`s: schedulers, isinstance
checks, state dicts, copies and the old plugin-package names all see one."""

import copy
import pickle
import warnings

import pytest
import torch

import lscape.optim
import lscape.plugins.optim

VARIANTS = {
    "sam": lambda p: lscape.optim.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "smoothout": lambda p: lscape.optim.SmoothOut(p, torch.optim.SGD, ss=0.01, lr=0.1, momentum=0.9,
                                                  generator=torch.Generator().manual_seed(1)),
    "entropy-sgd": lambda p: lscape.optim.EntropySGD(p, torch.optim.SGD, L=2, lr=0.1, momentum=0.9, nesterov=True,
                                                     generator=torch.Generator().manual_seed(2)),
}


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a = a @ a.T + torch.eye(5, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    return a, theta


def _closure(opt, a, theta):
    def closure():
        opt.zero_grad()
        loss = 0.5 * theta @ a @ theta
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_variant_is_an_optimizer_a_scheduler_drives(name):
    a, theta = _problem()
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
    a, theta = _problem()
    opt = VARIANTS[name]([theta])
    for _ in range(3):
        opt.step(_closure(opt, a, theta))
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved) == {"base", "variant"} and saved["variant"]["t"] == 3
    theta_saved = theta.detach().clone()
    gen_state = opt.generator.get_state() if getattr(opt, "generator", None) is not None else None
    opt.step(_closure(opt, a, theta))
    expected = theta.detach().clone()

    _, other = _problem()
    with torch.no_grad():
        other.copy_(theta_saved)
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
    _, theta = _problem()
    opt = lscape.optim.SAM([theta], torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.base.load_state_dict(torch.optim.SGD([theta], lr=0.3, momentum=0.9).state_dict())
    assert opt.param_groups is opt.base.param_groups and opt.param_groups[0]["lr"] == 0.3


def test_copies_and_pickles_keep_the_base_and_the_counters():
    a, theta = _problem()
    opt = VARIANTS["sam"]([theta])
    opt.step(_closure(opt, a, theta))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(clone, lscape.optim.SAM) and clone.t == 1 and clone.rho == opt.rho
        assert clone.param_groups is clone.base.param_groups and clone.param_groups[0]["lr"] == 0.1


def test_step_hooks_and_add_param_group_go_through_the_optimizer_api():
    a, theta = _problem()
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
    _, theta = _problem()
    base = torch.optim.SGD([theta], lr=0.1)
    for opt in (lscape.plugins.optim.SAM(base, rho=0.1), lscape.optim.SAM(None, base, rho=0.1),
                lscape.optim.SAM(base=base, params=None, rho=0.1)):
        assert opt.base is base and opt.rho == 0.1 and isinstance(opt, torch.optim.Optimizer)
    with pytest.raises(TypeError, match="base_optimizer must be"):
        lscape.optim.SAM([theta], "sgd")
