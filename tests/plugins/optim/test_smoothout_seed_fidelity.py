"""SmoothOut against the seed's code (wenwei202/smoothout): ReLU modules on the built-in
ResNets, no draws at ss = 0, and compat=original's ghost batches and epoch-end update,
checked against a literal transcription of main_gbn.py's training loop."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lscape.batch import BatchAdapter
from lscape.optim import NoisyReLU, SmoothOut, ghost_closures
from lscape.plugins.optim.smoothout import SmoothOutStep
from lscape.plugins.workloads.models import resnet20


def _reference_resnet(model, x):
    """The CIFAR ResNet written with functional calls from its state: the numbers the
    model gave when its ReLUs were torch.relu calls."""
    def bn(mod, t):
        if isinstance(mod, nn.Identity):
            return t
        return F.batch_norm(t, mod.running_mean.clone(), mod.running_var.clone(), mod.weight, mod.bias,
                            mod.training, mod.momentum, mod.eps)

    def conv(mod, t):
        return F.conv2d(t, mod.weight, mod.bias, mod.stride, mod.padding)

    out = torch.relu(bn(model.bn1, conv(model.conv1, x)))
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            h = torch.relu(bn(block.bn1, conv(block.conv1, out)))
            h = bn(block.bn2, conv(block.conv2, h))
            if isinstance(block.shortcut, nn.Sequential):
                h = h + bn(block.shortcut[1], conv(block.shortcut[0], out))
            else:
                h = h + out
            out = torch.relu(h)
    return F.linear(out.mean(dim=(2, 3)), model.linear.weight, model.linear.bias)


@pytest.mark.slow
def test_resnet20_relus_are_modules_with_unchanged_state_dict_and_numbers():
    torch.manual_seed(0)
    model = resnet20()
    keys = list(model.state_dict())
    assert not any("relu" in k for k in keys)
    expected = [f"{name}.{k}" for name, mod in model.named_modules()
                if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))
                for k in mod.state_dict(keep_vars=True)]
    assert keys == expected
    assert sum(type(m) is nn.ReLU for m in model.modules()) == 10  # the stem and one per block
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            expect = _reference_resnet(model, x)
            torch.testing.assert_close(model(x), expect, rtol=0, atol=0)


@pytest.mark.slow
def test_relu_noise_reaches_resnet20():
    torch.manual_seed(0)
    model = resnet20()
    ctx = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)
    owner = SmoothOutStep(relu_noise="0.8:1.2")
    owner.check(ctx)  # no refusal: the ResNet has nn.ReLU modules
    owner.build(ctx)
    assert not any(type(m) is nn.ReLU for m in model.modules())
    assert sum(isinstance(m, NoisyReLU) for m in model.modules()) == 10
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # a fresh slope per forward pass
        model.eval()
        torch.testing.assert_close(model(x), _reference_resnet(model, x), rtol=0, atol=0)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _data(sizes, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)) for n in sizes]


@pytest.mark.parametrize("generator", [False, True])
def test_ss_zero_leaves_the_noise_stream_untouched(generator):
    model = _mlp()
    (batch,) = _data([12])
    gen = torch.Generator().manual_seed(3) if generator else None

    def states():
        return (torch.get_rng_state(), gen.get_state() if gen is not None else None)

    for ss, same in ((0.0, True), (0.01, False)):
        opt = SmoothOut(torch.optim.SGD(model.parameters(), lr=0.1), ss=ss, generator=gen)
        closures, sizes = ghost_closures(model, F.mse_loss, batch, mb=4)
        before = states()
        opt.step(closures, sizes)
        after = states()
        stream = 1 if generator else 0
        assert torch.equal(before[stream], after[stream]) is same


def _seed_epoch(model, batches, batch_size, mb, bm, lr, ss):
    """main_gbn.py's forward(training=True), transcribed: chunk(batch_size // mb), a fresh
    U(−ss, ss) per parameter per chunk added and subtracted, gradients summed over chunks,
    divided by len(mini_inputs)·n_batches (n_batches shorter at the epoch's end), clipped
    at 5, SGD step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    for i, (inputs, target) in enumerate(batches):
        is_updating = ((i + 1) % bm == 0) or (i + 1 == len(batches))
        mini_inputs = inputs.chunk(batch_size // mb)
        mini_targets = target.chunk(batch_size // mb)
        for k, mini_input in enumerate(mini_inputs):
            noises = {}
            if ss:
                for key, p in model.named_parameters():
                    noise = (torch.rand(p.size()) * 2.0 - 1.0) * ss * 1.0
                    noises[key] = noise
                    p.data.add_(noise)
            loss = F.mse_loss(model(mini_input), mini_targets[k])
            loss.backward()
            if ss:
                for key, p in model.named_parameters():
                    p.data.sub_(noises[key])
        if is_updating:
            n_batches = bm
            if (i + 1) == len(batches):
                n_batches = (i % bm) + 1
            for p in model.parameters():
                p.grad.data.div_(len(mini_inputs) * n_batches)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            optimizer.zero_grad()


def _lscape_epochs(model, batches, batch_size, bm, epochs, **options):
    """The plugin driven as the engine drives it: each step's first batch from the stream."""
    order = [(b, e, i + 1 == len(batches)) for e in range(epochs) for i, b in enumerate(batches)]
    it = iter(order)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx = SimpleNamespace(optimizer=opt, model=model, adapter=BatchAdapter(F.mse_loss), total_steps=None,
                          rank=0, world_size=1, store=None,
                          stream=SimpleNamespace(next=lambda: next(it), batch_size=batch_size))
    owner = SmoothOutStep(batch_multiplier=bm, **options)
    owner.setup(ctx)
    steps = 0
    for batch, epoch, end in it:
        state = SimpleNamespace(batch=batch, step=steps, epoch=epoch, epoch_end=end, time=0.0, lr=None)

        def closure(state=state):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(state.batch[0]), state.batch[1])
            loss.backward()
            return loss.detach()

        owner.step(closure, ctx, state)
        steps += 1
    return owner, steps


@pytest.mark.parametrize("sizes,bm,ss", [
    ([10], 1, 0.0),              # 10 samples, batch_size 12 // mb 4 = 3 parts: torch.chunk gives 4, 4, 2, unweighted
    ([12, 12, 7], 2, 0.0),       # bm = 2 over 3 batches: the epoch ends with a one-batch update
    ([12, 2], 2, 0.0),           # last batch cut into 2 chunks: the seed divides 5 chunk gradients by 2·2
    ([12, 12, 7], 2, 0.02),      # with noise drawn in the seed's order from the same stream
])
def test_compat_original_follows_main_gbn_ghost_batches_and_epoch_end(sizes, bm, ss):
    batches = _data(sizes)
    seed_model, model = _mlp(), _mlp()
    torch.manual_seed(11)
    for _ in range(2):
        _seed_epoch(seed_model, batches, 12, 4, bm, 0.05, ss)
    torch.manual_seed(11)
    owner, steps = _lscape_epochs(model, batches, 12, bm, 2, ss=ss, mb=4, compat="original", exclude_bn=False)
    assert steps == owner.steps_for_epochs(2, len(sizes)) == 2 * -(-len(sizes) // bm)
    tol = 1e-6 if ss else 1e-7
    for p, q in zip(model.parameters(), seed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def test_default_mode_keeps_size_weighted_chunks_and_differs_from_the_seed_on_uneven_batches():
    batches = _data([10])
    seed_model, model = _mlp(), _mlp()
    _seed_epoch(seed_model, batches, 12, 4, 1, 0.05, 0.0)
    _lscape_epochs(model, batches, 12, 1, 1, ss=0.0, mb=4)
    assert not torch.allclose(next(model.parameters()), next(seed_model.parameters()), rtol=1e-5, atol=1e-6)
    # batch_multiplier without compat: ⌈epochs·steps/k⌉ steps, no early update at epoch ends
    owner = SmoothOutStep(batch_multiplier=2)
    assert owner.steps_for_epochs(2, 3) == 3
    assert SmoothOutStep(batch_multiplier=2, compat="original").steps_for_epochs(2, 3) == 4


def test_noisy_relu_is_noisy_in_eval_mode_only_with_noisy_eval():
    # The seed's models/noisy_relu.py draws its slopes at every forward pass, whatever the
    # module's mode; lscape's NoisyReLU is plain in eval mode unless noisy_eval=True.
    x = torch.linspace(0.1, 1.0, 1000)
    act = NoisyReLU(0.5, 1.5).eval()
    assert torch.equal(act(x), torch.relu(x))
    seedlike = NoisyReLU(0.5, 1.5, noisy_eval=True).eval()
    assert not torch.equal(seedlike(x), torch.relu(x))


@pytest.mark.slow
def test_engine_runs_the_seeds_update_count_per_epoch_with_compat_original(tmp_path):
    import lscape

    steps = {}
    for compat in ("none", "original"):
        result = lscape.run(out=str(tmp_path / f"{compat}.zarr"), model="mlp", data="synthetic", data_opts={"n": 45},
                            batch_size=12, epochs=2, lr=0.1, progress=False, eval_schedule="never",
                            checkpoint_schedule="never", plugins=["smoothout"],
                            plugin_options={"smoothout": {"batch_multiplier": 2, "compat": compat, "mb": 4}})
        assert result.status == "completed"
        steps[compat] = result.steps
    # 3 minibatches of at most 12 an epoch, k = 2
    assert steps == {"none": 3, "original": 4}  # ⌈2·3/2⌉ against 2·⌈3/2⌉ (main_gbn.py's eq_batch_num)
