"""Issue 11 on a CUDA device (skipped without one; benchmarks/gpu.sh runs them): the
real-scale example configs as written (device cuda, workers, bf16), bf16 training with fp32
probes, in-place-ReLU ResNet curvature, float64 micro-batches, fp16 + GradScaler resume and
workers with pinned memory — each against the same references as the CPU tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from torch import nn

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore:This DataLoader will create")]

pytest.importorskip("PIL")

import lscape
from lscape.api import make_config
from lscape.config import load_toml
from lscape.engine import Engine, load_checkpoint
from lscape.plugins.workloads.images import make_image_folder
from lscape.plugins.workloads.resnet_imagenet import resnet18
from lscape.store import RunReader

from test_scale_data import _dense_lambda_max, tiny_images


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs") / "data", classes=3, per_class=16, size=(40, 36),
                             seed=0, val_per_class=4)


@pytest.fixture
def exact_cuda(monkeypatch):
    """fp32 convolutions without TF32 and deterministic cuDNN kernels, for exact comparisons."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 matrix products
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("name, model_opts, plugin_options", [
    ("imagenet_grad_noise_resnet34.toml", {"channels": 16}, {"grad-noise": {"noise_size": 2, "sharpness_batches": 2}}),
    ("cifar10_resnet.toml", {}, {"sharpness": {"schedule": "at:1", "max_iter": 10}}),
])
def test_scale_examples_run_on_cuda_as_written(name, model_opts, plugin_options, folder, tmp_path):
    from test_scale_examples import EXAMPLES

    config = load_toml(EXAMPLES / name)
    result = lscape.run(config, steps=3, batch_size=16, data_opts={"root": str(folder), "size": 32},
                        model_opts=model_opts, plugin_options=plugin_options, progress=False,
                        out=str(tmp_path / "run.zarr"))
    assert result.status == "completed" and result.steps == 3
    reader = RunReader(result.path)
    assert reader.attrs["device"].startswith("cuda")
    assert np.isfinite(reader.read("train")["loss"]).all()
    for group in reader.groups():
        if group not in ("checkpoints", "train"):  # train's eval columns are NaN between evaluations
            for key, values in reader.read(group).items():
                if np.asarray(values).dtype.kind == "f":
                    assert np.isfinite(values).all(), f"{group}/{key}"


def test_bf16_cuda_training_with_fp32_sharpness(tmp_path, exact_cuda):
    common = dict(model="mlp", model_opts={"widths": "12"}, data="synthetic",
                  data_opts={"n": 80, "dim": 6, "classes": 3}, batch_size=16, steps=3, lr=0.2, device="cuda",
                  plugins=["sharpness"], plugin_options={"sharpness": {"schedule": "at:1", "data": "full",
                                                                       "tol": 1e-5, "max_iter": 120}},
                  checkpoint_schedule="every:1", eval_schedule="never", progress=False)
    run = lscape.run(precision="bf16", out=str(tmp_path / "bf16.zarr"), **common)
    assert run.status == "completed"
    reader = RunReader(run.path)
    assert np.isfinite(reader.read("train")["loss"]).all()
    sharp = reader.read("sharpness")
    engine = Engine(make_config(None, **{**common, "device": "cpu"}, out=str(tmp_path / "cpu.zarr")))
    ctx = engine.prepare()
    ctx.model.load_state_dict(load_checkpoint(zarr.open_group(run.path, mode="r"), "step_000000001")["model"])
    x, y = ctx.train_set.tensors
    reference, _ = _dense_lambda_max(ctx.model, nn.functional.cross_entropy, x, y, None)
    assert sharp["lambda_max"][0] == pytest.approx(reference, rel=1e-3)  # bf16 products would be ~1e-2 off


def test_resnet_inplace_relus_sharpness_on_cuda_equals_dense_hessian(tmp_path, exact_cuda):
    trained = lscape.run(model="resnet18", model_opts={"channels": 2}, data="test_scale_data:tiny_images",
                         batch_size=8, steps=2, lr=0.05, momentum=0.9, plugins=[], eval_schedule="never",
                         checkpoint_schedule="every:1", progress=False, device="cuda", out=str(tmp_path / "t.zarr"))
    measured = lscape.measure(trained.path, ["sharpness"], checkpoints="2", out=str(tmp_path / "m.zarr"),
                              data="test_scale_data:tiny_images",  # names the store's module:factory
                              plugin_options={"sharpness": {"data": "full", "params": "layer2.0.*", "tol": 1e-5,
                                                            "max_iter": 150}})
    sharp = RunReader(measured.path).read("sharpness")
    model = resnet18(num_classes=3, channels=2)
    model.load_state_dict(load_checkpoint(zarr.open_group(trained.path, mode="r"), "step_000000002")["model"])
    x, y = tiny_images().tensors
    reference, _ = _dense_lambda_max(model, nn.functional.cross_entropy, x, y, ["layer2.0."])
    assert sharp["lambda_max"][0] == pytest.approx(reference, rel=1e-3)


def test_micro_batched_full_batch_gradient_on_cuda(tmp_path):
    updates = {}
    for micro in (None, 7):
        cfg = make_config(None, model="test_scale_data:double_mlp", data="test_scale_data:double_data",
                          batch_size="full", steps=1, lr=0.5, micro_batch_size=micro, plugins=[], device="cuda",
                          progress=False, eval_schedule="never", out=str(tmp_path / f"m{micro}.zarr"))
        engine = Engine(cfg)
        ctx = engine.prepare()
        before = torch.cat([p.detach().flatten().clone() for p in ctx.model.parameters()])
        assert engine.run().status == "completed"
        updates[micro] = before - torch.cat([p.detach().flatten() for p in ctx.model.parameters()])
    assert (updates[7] - updates[None]).norm() / updates[None].norm() <= 1e-6


def test_fp16_gradscaler_resume_continues_like_one_run(tmp_path):
    common = dict(model="mlp", model_opts={"widths": "32"}, data="synthetic",
                  data_opts={"n": 256, "dim": 8, "classes": 3}, batch_size=32, lr=0.1, momentum=0.9,
                  device="cuda", precision="fp16", checkpoint_schedule="every:4", eval_schedule="never",
                  plugins=[], progress=False)
    whole = lscape.run(steps=12, out=str(tmp_path / "whole.zarr"), **common)
    part = lscape.run(steps=8, out=str(tmp_path / "part.zarr"), **common)
    assert whole.status == part.status == "completed"
    state = load_checkpoint(zarr.open_group(part.path, mode="r"))
    assert state["scaler"] and "scale" in state["scaler"]
    resumed = lscape.run(resume=part.path, steps=12, progress=False)
    assert resumed.status == "completed"
    np.testing.assert_allclose(RunReader(part.path).read("train")["loss"], RunReader(whole.path).read("train")["loss"],
                               rtol=1e-5)


def test_workers_and_pinned_memory_on_cuda_match_workers_0(folder, tmp_path, exact_cuda):
    runs = {}
    for workers in (0, 3):
        runs[workers] = lscape.run(model="resnet18", model_opts={"channels": 4}, data="imagefolder",
                                   data_opts={"root": str(folder), "size": 24, "augment": "imagenet"}, batch_size=8,
                                   steps=8, momentum=0.9, workers=workers, device="cuda", progress=False,
                                   out=str(tmp_path / f"w{workers}.zarr"))
    a, b = (RunReader(r.path).read("train") for r in runs.values())
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["eval_loss"], b["eval_loss"], rtol=1e-6)
