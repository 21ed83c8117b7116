"""torchrun with 2 CPU processes (gloo): the loss curve and λ_max equal the single-process run."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from lscape.store import RunReader

ARGS = ["run", "--data", "synthetic", "--data-opt", "n=96", "--data-opt", "dim=6", "--data-opt", "classes=3",
        "--model-opt", "widths=12", "--model-opt", "activation=tanh", "--batch-size", "24", "--steps", "12",
        "--momentum", "0.9", "--plugin", "grad-norm", "--plugin", "sharpness", "-o", "sharpness.every=4", "-o", "sharpness.data=minibatch",
        "--no-progress"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--plugin", "sam", "-o", "sam.rho=0.1"]], ids=["sgd", "sam"])
def test_two_process_run_equals_single_process(tmp_path, extra):
    """SAM's two backward passes each all-reduce once, so its ascent uses the global gradient."""
    single = tmp_path / "single.zarr"
    proc = subprocess.run([sys.executable, "-m", "lscape", *ARGS, *extra, "--out", str(single)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ddp = tmp_path / "ddp.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                           "-m", "lscape", *ARGS, *extra, "--out", str(ddp)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = RunReader(single), RunReader(ddp)
    assert b.attrs["status"] == "completed"
    la, lb = a.read("train")["loss"], b.read("train")["loss"]
    assert len(lb) == 12
    np.testing.assert_allclose(lb, la, rtol=1e-4)
    sa, sb = a.read("sharpness"), b.read("sharpness")
    assert sb["step"].tolist() == [0, 4, 8]
    np.testing.assert_allclose(sb["lambda_max"], sa["lambda_max"], rtol=1e-4)
    gn_a, gn_b = a.read("grad-norm")["grad_norm"], b.read("grad-norm")["grad_norm"]
    np.testing.assert_allclose(gn_b, gn_a, rtol=1e-4)
    # rank 0 alone wrote: exactly one store, nothing else in the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.zarr", "single.zarr"]
