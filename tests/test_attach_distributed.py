"""`lscape.attach` under torchrun (2 CPU processes, gloo, DDP in the user's loop): every rank
measures, the probes all-reduce, rank 0 alone writes, and the numbers equal one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from lscape.store import RunReader

SCRIPT = r'''
import os, sys
import torch, torch.nn.functional as F
import lscape

out = sys.argv[1]
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank() if world > 1 else 0
torch.manual_seed(0)
x = torch.randn(96, 6)
y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
forward = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
session = lscape.attach(model, opt, F.cross_entropy, plugins=["grad-norm", "sharpness"], out=out, progress=False,
                        plugin_options={"sharpness": {"every": 2, "data": "minibatch", "tol": 1e-5}})
for step in range(6):
    xb, yb = x[step * 16:(step + 1) * 16], y[step * 16:(step + 1) * 16]
    xb, yb = xb[rank::world], yb[rank::world]  # this rank's half of the global batch
    loss = F.cross_entropy(forward(xb), yb)
    opt.zero_grad()
    loss.backward()  # DDP averages the gradients: p.grad is the global batch's
    if world > 1:
        torch.distributed.all_reduce(loss := loss.detach().clone())
        loss /= world
    session.step((xb, yb), loss)
session.close()
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_attach_under_torchrun_equals_one_process(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single.zarr")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), str(script), str(tmp_path / "ddp.zarr")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = RunReader(str(tmp_path / "single.zarr")), RunReader(str(tmp_path / "ddp.zarr"))
    assert b.attrs["status"] == "completed" and b.attrs["steps_done"] == 6
    np.testing.assert_allclose(b.read("train")["loss"], a.read("train")["loss"], rtol=1e-5)
    np.testing.assert_allclose(b.read("grad-norm")["grad_norm"], a.read("grad-norm")["grad_norm"], rtol=1e-5)
    sa, sb = a.read("sharpness"), b.read("sharpness")
    assert sb["step"].tolist() == [0, 2, 4]
    np.testing.assert_allclose(sb["lambda_max"], sa["lambda_max"], rtol=1e-4)
    # rank 0 alone wrote: the two stores and the script, nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.zarr", "loop.py", "single.zarr"]
