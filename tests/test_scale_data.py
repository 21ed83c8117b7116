"""Real workloads at scale (issue 11): an ImageFolder of JPEGs through DataLoader workers,
exact resume with workers, micro-batched full-batch gradients, bf16 training with fp32
probes, and sharpness of a torchvision-style ResNet with in-place ReLUs — each against an
exact reference (the workers-0 store, an uninterrupted run, the unchunked gradient, a
dense Hessian of a copy without in-place ops)."""

from __future__ import annotations

import copy
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from torch import nn

pytest.importorskip("PIL")
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

import lscape
from lscape.api import make_config
from lscape.data import Fetcher
from lscape.engine import Engine, load_checkpoint
from lscape.plugins.workloads.datasets import ArrayDataset
from lscape.plugins.workloads.images import ImageFolder, imagefolder, make_image_folder
from lscape.plugins.workloads.resnet_imagenet import resnet18
from lscape.store import RunReader


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes × 6 training images (40×36, so crops and resizes do work) + 2 × 3 held out."""
    return make_image_folder(tmp_path_factory.mktemp("imgs") / "data", classes=3, per_class=6, size=(40, 36),
                             seed=0, val_per_class=2)


def _same_stores(a, b):
    ra, rb = RunReader(a), RunReader(b)
    groups = [g for g in ra.groups() if g != "checkpoints"]
    assert groups == [g for g in rb.groups() if g != "checkpoints"] and len(groups) >= 2
    for g in groups:
        da, db = ra.read(g), rb.read(g)
        assert sorted(da) == sorted(db), g
        for name in da:
            if name != "time":  # wall clock
                np.testing.assert_array_equal(da[name], db[name], err_msg=f"{g}/{name}")


# ---------------------------------------------------------------------------------------
# the imagefolder data set itself
# ---------------------------------------------------------------------------------------


def test_imagefolder_reads_splits_classes_and_exact_pixels(folder):
    from PIL import Image

    data = imagefolder(root=str(folder), size=32, augment="none", mean=0.5, std=0.25)
    train, held = data["train"], data["eval"]
    assert (len(train), len(held), train.num_classes, train.input_shape) == (18, 6, 3, (3, 32, 32))
    assert train.classes == ["class_0", "class_1", "class_2"] and train.targets == [0] * 6 + [1] * 6 + [2] * 6
    x, y = train[7]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == 1
    # augment=none: shorter side (36) resized to 32 (bilinear, 40 -> 35), then the central crop
    img = Image.open(train.samples[7][0]).convert("RGB").resize((35, 32), Image.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32)[:, 2:34].transpose(2, 0, 1) / 255.0  # left = round(3/2) = 2
    np.testing.assert_allclose(x.numpy(), (pixels - 0.5) / 0.25, rtol=0, atol=1e-6)
    # the flat layout (root/CLASS) gives only a training split
    flat = imagefolder(root=str(folder / "train"), size=32)
    assert set(flat) == {"train"} and len(flat["train"]) == 18


def test_imagefolder_augmentations_use_torchs_rng_only(folder):
    from PIL import Image

    cifar = imagefolder(root=str(folder), size=32, augment="cifar", mean=0.0, std=1.0)["train"]
    torch.manual_seed(3)
    a = cifar[0][0]
    torch.manual_seed(3)
    assert torch.equal(cifar[0][0], a)  # same seed, same crop (numpy / random are not used)
    # a cifar crop is a window of the 4-pixel zero-padded image, maybe flipped
    base = np.asarray(Image.open(cifar.samples[0][0]).convert("RGB").resize((35, 32), Image.BILINEAR),
                      dtype=np.float32)[:, 2:34].transpose(2, 0, 1) / 255.0
    padded = np.pad(base, ((0, 0), (4, 4), (4, 4)))
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = cifar[0][0].numpy()
        hits = [(i, j, f) for f in (False, True) for i in range(9) for j in range(9)
                if np.allclose((padded[:, i:i + 32, j:j + 32][:, :, ::-1] if f else padded[:, i:i + 32, j:j + 32]),
                               out, atol=1e-6)]
        assert hits, f"seed {seed}: not a padded crop"
        seen.add(hits[0])
    assert len(seen) > 3  # the crops really are random
    imagenet = imagefolder(root=str(folder), size=24, augment="imagenet")["train"]
    torch.manual_seed(0)
    first = imagenet[5][0]
    torch.manual_seed(1)
    assert first.shape == (3, 24, 24) and not torch.equal(imagenet[5][0], first)


def test_imagefolder_bad_input_is_one_line(folder, tmp_path):
    from lscape.errors import UsageError

    with pytest.raises(UsageError, match="set root=DIR"):
        imagefolder()
    with pytest.raises(UsageError, match="not a folder"):
        imagefolder(root=str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="augment"):
        imagefolder(root=str(folder), augment="heavy")
    with pytest.raises(UsageError, match="std"):
        imagefolder(root=str(folder), std="1,2")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(UsageError, match="holds no image"):
        imagefolder(root=str(tmp_path / "empty"))


def test_imagenet_resnets_have_torchvisions_parameter_counts():
    counts = {18: 11_689_512, 34: 21_797_672}
    from lscape.plugins.workloads import resnet_imagenet

    for depth, count in counts.items():
        model = getattr(resnet_imagenet, f"resnet{depth}")()
        assert sum(p.numel() for p in model.parameters()) == count
        assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    small = resnet18(num_classes=3, channels=2)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert {n.split(".")[0] for n, _ in small.named_parameters()} == {"conv1", "bn1", "layer1", "layer2", "layer3",
                                                                        "layer4", "fc"}


def test_torchvision_resnet_state_dicts_load_both_ways():
    tv = pytest.importorskip("torchvision.models")
    from lscape.build import build_model

    ours = resnet18(num_classes=3)
    theirs = build_model("torchvision.models:resnet18", {"num_classes": 3}, {}, tiny_images())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x))
    assert isinstance(theirs, tv.ResNet)


# ---------------------------------------------------------------------------------------
# workers: identical stores, exact resume
# ---------------------------------------------------------------------------------------


def _image_run(folder, out, **kw):
    opts = dict(model="resnet18", model_opts={"channels": 2}, data="imagefolder",
                data_opts={"root": str(folder), "size": 24, "augment": "imagenet"}, batch_size=5, steps=6,
                momentum=0.9, plugins=["sharpness"], plugin_options={"sharpness": {"every": 3, "batches": 2,
                                                                                   "max_iter": 6}},
                progress=False, out=str(out))
    opts.update(kw)
    return lscape.run(**opts)


def test_workers_0_and_2_store_the_same_with_random_augmentation(folder, tmp_path):
    train = imagefolder(root=str(folder), size=24, augment="imagenet")["train"]
    serial, parallel = Fetcher(train, seed=11, workers=0), Fetcher(train, seed=11, workers=2)
    idx = torch.tensor([4, 0, 17, 9])
    try:
        a0, a2 = serial.take(idx, epoch=0), parallel.take(idx, epoch=0)
        assert torch.equal(a0[0], a2[0]) and torch.equal(a0[1], a2[1])
        assert not torch.equal(serial.take(idx, epoch=1)[0], a0[0])  # a new epoch, new crops
    finally:
        parallel.close()
    r0 = _image_run(folder, tmp_path / "w0.zarr", workers=0)
    r2 = _image_run(folder, tmp_path / "w2.zarr", workers=2)
    assert r0.status == r2.status == "completed"
    assert len(RunReader(r0.path).read("sharpness")["lambda_max"]) == 2
    assert "eval_loss" in RunReader(r0.path).read("train")  # evaluation went through the loader too
    _same_stores(r0.path, r2.path)


def _latest_step(path):
    try:
        group = zarr.open_group(str(path), mode="r")["checkpoints"]
        return int(group[group.attrs["latest"]].attrs["step"])
    except Exception:
        return -1


def test_sigkill_and_resume_mid_epoch_with_workers_is_exact(folder, tmp_path, cli):
    # 18 images in batches of 4: 5 steps an epoch; checkpoints every 7 steps fall mid-epoch
    args = ["--model", "resnet18", "--model-opt", "channels=2", "--data", "imagefolder",
            "--data-opt", f"root={folder}", "--data-opt", "size=16", "--batch-size", "4", "--momentum", "0.9",
            "--workers", "2", "--checkpoint-schedule", "every:7", "--eval-schedule", "never", "--steps", "25",
            "--no-progress"]
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "lscape", "run", *args, "--out", str(killed)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _latest_step(killed) < 7:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    at = _latest_step(killed)
    assert RunReader(killed).attrs["status"] == "running", err  # killed part-way
    assert at >= 7 and at % 5 != 0, f"checkpoint at step {at} is not mid-epoch"
    done = subprocess.run([sys.executable, "-m", "lscape", "run", "--resume", str(killed), "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    reference = tmp_path / "reference.zarr"
    # the uninterrupted run in a fresh process too: in this one, earlier tests may have changed
    # torch's thread count, and a convolution's float sums depend on it
    ref = subprocess.run([sys.executable, "-m", "lscape", "run", *args, "--out", str(reference)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    assert len(RunReader(killed).read("train")["loss"]) == 25
    _same_stores(killed, reference)


# ---------------------------------------------------------------------------------------
# micro-batches: the chunked full-batch gradient is the unchunked one (float64)
# ---------------------------------------------------------------------------------------


class _Double(nn.Module):
    def forward(self, x):
        return x.double()


def double_mlp(input_shape=(8,), num_classes=3):
    """A float64 MLP (tanh) that casts its inputs to float64."""
    torch.manual_seed(5)
    return nn.Sequential(_Double(), nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.Tanh(),
                         nn.Linear(16, num_classes)).double()


def double_data(n=45, dim=8):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return ArrayDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), 3)


@pytest.mark.parametrize("data", ["tensors", "imagefolder"])
def test_micro_batched_full_batch_gradient_equals_the_unchunked_one(data, folder, tmp_path):
    if data == "tensors":
        spec = dict(data="test_scale_data:double_data")
    else:  # a loaded data set with random augmentation: the per-sample seeds give both runs the same crops
        spec = dict(data="imagefolder", data_opts={"root": str(folder), "size": 8, "augment": "imagenet"})
    updates = {}
    for micro in (None, 7):
        cfg = make_config(None, model="test_scale_data:double_mlp", batch_size="full", steps=1, lr=0.5,
                          micro_batch_size=micro, plugins=[], progress=False, out=str(tmp_path / f"m{micro}.zarr"),
                          eval_schedule="never", **spec)
        engine = Engine(cfg)
        ctx = engine.prepare()
        before = torch.cat([p.detach().flatten().clone() for p in ctx.model.parameters()])
        assert engine.run().status == "completed"
        after = torch.cat([p.detach().flatten() for p in ctx.model.parameters()])
        assert after.dtype == torch.float64
        updates[micro] = (before - after) / 0.5  # plain SGD: θ1 = θ0 − η g
    full, chunked = updates[None], updates[7]
    assert full.norm() > 0
    assert (chunked - full).norm() / full.norm() <= 1e-6
    assert (chunked - full).norm() / full.norm() <= 1e-12  # in fact exact up to float64 rounding


# ---------------------------------------------------------------------------------------
# bf16 training, fp32 probes
# ---------------------------------------------------------------------------------------


def _dense_lambda_max(model, loss_fn, x, y, params):
    """λ_max of the Hessian of the mean loss w.r.t. the named ``params`` by
    torch.autograd.functional.hessian on a float64 copy (independent of lscape.curvature)."""
    model = copy.deepcopy(model).double().eval()
    for m in model.modules():  # the reference runs without in-place ops
        if isinstance(m, nn.ReLU):
            m.inplace = False
    named = dict(model.named_parameters())
    chosen = [n for n in named if any(n.startswith(p) for p in params)] if params else list(named)
    shapes = [named[n].shape for n in chosen]
    flat = torch.cat([named[n].detach().flatten() for n in chosen])

    def f(theta):
        values, start = {}, 0
        for n, s in zip(chosen, shapes):
            k = math.prod(s)
            values[n] = theta[start:start + k].view(s)
            start += k
        out = torch.func.functional_call(model, values, (x.double(),), strict=False)
        return loss_fn(out, y)

    hessian = torch.autograd.functional.hessian(f, flat, vectorize=True)
    return float(torch.linalg.eigvalsh((hessian + hessian.T) / 2)[-1]), flat.numel()


def test_bf16_training_with_fp32_sharpness(tmp_path):
    common = dict(model="mlp", model_opts={"widths": "12"}, data="synthetic",
                  data_opts={"n": 80, "dim": 6, "classes": 3}, batch_size=16, steps=3, lr=0.2,
                  plugins=["sharpness"], plugin_options={"sharpness": {"schedule": "at:1", "data": "full",
                                                                       "tol": 1e-5, "max_iter": 120}},
                  checkpoint_schedule="every:1", eval_schedule="never", progress=False)
    bf16 = lscape.run(precision="bf16", out=str(tmp_path / "bf16.zarr"), **common)
    fp32 = lscape.run(precision="fp32", out=str(tmp_path / "fp32.zarr"), **common)
    assert bf16.status == fp32.status == "completed"
    reader = RunReader(bf16.path)
    loss_bf, loss_fp = reader.read("train")["loss"], RunReader(fp32.path).read("train")["loss"]
    assert np.isfinite(loss_bf).all()
    assert loss_bf[0] != loss_fp[0] and abs(loss_bf[0] - loss_fp[0]) < 0.05 * loss_fp[0]  # bf16 really ran
    sharp = reader.read("sharpness")
    assert list(sharp["step"]) == [1] and all(np.isfinite(v).all() for v in sharp.values())
    # the probe at θ_1 (the checkpoint after one step) against the dense fp64 Hessian: an fp32
    # computation agrees to ~1e-6, a bf16 one would be off by ~1e-2
    engine = Engine(make_config(None, precision="bf16", out=str(tmp_path / "again.zarr"), **common))
    ctx = engine.prepare()
    state = load_checkpoint(zarr.open_group(bf16.path, mode="r"), "step_000000001")
    ctx.model.load_state_dict(state["model"])
    x, y = ctx.train_set.tensors
    reference, _ = _dense_lambda_max(ctx.model, nn.functional.cross_entropy, x, y, None)
    assert sharp["lambda_max"][0] == pytest.approx(reference, rel=1e-4)


# ---------------------------------------------------------------------------------------
# curvature of a torchvision-style ResNet with in-place ReLUs
# ---------------------------------------------------------------------------------------


def tiny_images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return ArrayDataset(x, torch.arange(n) % 3, 3)


def test_resnet_with_inplace_relus_sharpness_equals_dense_hessian(tmp_path):
    params = "layer2.0.*"  # one pattern: "a.*,b.*" fails in the operator today (reported)
    trained = lscape.run(model="resnet18", model_opts={"channels": 2}, data="test_scale_data:tiny_images",
                         batch_size=8, steps=2, lr=0.05, momentum=0.9, plugins=[], eval_schedule="never",
                         checkpoint_schedule="every:1", progress=False, out=str(tmp_path / "train.zarr"))
    assert trained.status == "completed"
    measured = lscape.measure(trained.path, ["sharpness"], checkpoints="2", out=str(tmp_path / "m.zarr"),
                              data="test_scale_data:tiny_images",  # names the store's module:factory
                              plugin_options={"sharpness": {"data": "full", "params": params, "tol": 1e-5,
                                                            "max_iter": 150}})
    sharp = RunReader(measured.path).read("sharpness")
    state = load_checkpoint(zarr.open_group(trained.path, mode="r"), "step_000000002")
    model = resnet18(num_classes=3, channels=2)
    model.load_state_dict(state["model"])
    assert model.bn1.running_var.ne(1).any()  # BatchNorm statistics were trained
    x, y = tiny_images().tensors
    reference, dim = _dense_lambda_max(model, nn.functional.cross_entropy, x, y, ["layer2.0."])
    assert 100 < dim < 1000
    assert sharp["lambda_max"][0] == pytest.approx(reference, rel=1e-4)
