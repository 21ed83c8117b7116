"""The real-scale example configs (examples/imagenet_grad_noise_resnet34.toml,
examples/cifar10_resnet.toml) start and run a few steps on a tiny generated ImageFolder of
JPEGs on the CPU: only the device, the length, the batch, the image size and the model's
width are overridden; the workers, precision, schedule and probes are the file's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PIL")
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

import lscape
from lscape.config import load_toml
from lscape.plugins.workloads.images import make_image_folder
from lscape.store import RunReader

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # non-square images bigger than the crop, so resizing and random crops do work
    return make_image_folder(tmp_path_factory.mktemp("imgs") / "data", classes=3, per_class=6, size=(40, 36),
                             seed=1, val_per_class=2)


def _run(name, folder, tmp_path, model_opts, plugin_options):
    config = load_toml(EXAMPLES / name)
    assert config.device == "cuda" and config.workers and config.data == "imagefolder"
    result = lscape.run(config, device="cpu", steps=3, batch_size=6, data_opts={"root": str(folder), "size": 32},
                        model_opts=model_opts, plugin_options=plugin_options, progress=False,
                        out=str(tmp_path / "run.zarr"))
    assert result.status == "completed" and result.steps == 3
    return config, RunReader(result.path)


def test_imagenet_grad_noise_resnet34_runs_three_steps(folder, tmp_path):
    config, reader = _run("imagenet_grad_noise_resnet34.toml", folder, tmp_path, {"channels": 4},
                          {"grad-noise": {"noise_size": 2, "sharpness_batches": 2}})
    assert (config.model, config.batch_size, config.workers) == ("resnet34", 250, 8)
    assert config.plugin_options["grad-noise"]["every"] == 7000
    assert config.plugin_options["grad-noise"]["noise_size"] == 500
    loss = reader.read("train")["loss"]
    assert len(loss) == 3 and np.isfinite(loss).all()
    noise = reader.read("grad-noise")
    assert list(noise["step"]) == [0]  # every:7000 measures at step 0
    assert np.isfinite(noise["noise_sq"]).all() and np.isfinite(noise["sharpness"]).all()
    assert reader.attrs["config"]["workers"] == 8


def test_cifar10_resnet_runs_three_steps_in_bf16(folder, tmp_path):
    config, reader = _run("cifar10_resnet.toml", folder, tmp_path, {},
                          {"sharpness": {"schedule": "at:1", "max_iter": 10}})
    assert (config.model, config.precision, config.data_opts["augment"]) == ("resnet20", "bf16", "cifar")
    assert reader.attrs["config"]["precision"] == "bf16"
    loss = reader.read("train")["loss"]
    assert len(loss) == 3 and np.isfinite(loss).all()
    sharp = reader.read("sharpness")
    assert list(sharp["step"]) == [1] and np.isfinite(sharp["lambda_max"]).all()
