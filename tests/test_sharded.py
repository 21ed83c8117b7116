"""``--strategy fsdp``: FSDP2 sharded training on 2 CPU processes (gloo) under torchrun.

The loss curve equals the one-process run within float32 summation tolerance; rank 0 alone
writes the store (every rank writes only its Distributed Checkpoint shard files, inside the
store's ``checkpoints/step_N.dcp`` group); SIGKILL + ``--resume`` stores bitwise what an
uninterrupted FSDP run stores; resuming on one process reshards; a plugin that cannot run
on a sharded model is one line, exit 2, nothing written; gradient clipping and Adam on the
shards equal the unsharded model's. The wrapping rule is unit-tested.
"""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from lscape.errors import UsageError
from lscape.sharding import fsdp_blocks
from lscape.store import RunReader

ARGS = ["run", "--data", "synthetic", "--data-opt", "n=96", "--data-opt", "dim=6", "--data-opt", "classes=3",
        "--model-opt", "widths=12,10", "--model-opt", "activation=tanh", "--batch-size", "24", "--steps", "12",
        "--momentum", "0.9", "--plugin", "grad-norm", "--plugin", "trajectory", "-o", "trajectory.dim=8",
        "-o", "trajectory.gradient=true", "--no-progress"]

KILLER = textwrap.dedent('''
    """Test plugin: every rank SIGKILLs itself at the start of step $KILL_AT (no flush, no hooks)."""
    import os
    import signal

    from lscape import Plugin, hookimpl


    class Killer(Plugin):
        name = "killer"
        sharded = True

        @hookimpl
        def on_step_start(self, ctx, state):
            if os.environ.get("KILL_AT") and state.step == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)


    @hookimpl
    def register_plugins(register):
        register(Killer)
''')


CLIP = textwrap.dedent('''
    """Gradient clipping and an optimizer on FSDP2-sharded parameters (lscape.sharding.shard_model)
    against the same model unsharded in the same process: equal to float32 tolerance."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from lscape.sharding import shard_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()


    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Sequential(nn.Linear(7, 7), nn.Tanh()), nn.Linear(7, 3))


    plain, sharded = make(), shard_model(make())
    opt_plain, opt_sharded = torch.optim.Adam(plain.parameters(), lr=0.1), torch.optim.Adam(sharded.parameters(), lr=0.1)
    torch.manual_seed(1)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for _ in range(3):
        for opt in (opt_plain, opt_sharded):
            opt.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        nn.functional.cross_entropy(sharded(x[rank::2]), y[rank::2]).backward()  # halves: their mean is the batch's
        norm_plain = nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
        norm_sharded = nn.utils.clip_grad_norm_(sharded.parameters(), 0.1)
        torch.testing.assert_close(norm_sharded.full_tensor(), norm_plain)
        for p, q in zip(plain.parameters(), sharded.parameters()):
            torch.testing.assert_close(q.grad.full_tensor(), p.grad)
        opt_plain.step()
        opt_sharded.step()
    for p, q in zip(plain.parameters(), sharded.parameters()):
        torch.testing.assert_close(q.full_tensor(), p)
    print(f"rank {rank} OK", flush=True)
    dist.destroy_process_group()
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cwd, **extra):
    path = os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def _lscape(args, cwd, nproc=1, **env):
    launcher = [sys.executable, "-m", "lscape"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "lscape"]
    return subprocess.run([*launcher, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=_env(cwd, **env))


def _records(path):
    reader = RunReader(path)
    return {g: {k: v for k, v in reader.read(g).items() if k != "time"}
            for g in reader.groups() if g != "checkpoints"}


@pytest.mark.slow
@pytest.mark.parametrize("extra, rtol", [([], 2e-6), (["--micro-batch-size", "5"], 2e-6),
                                         (["--precision", "bf16"], 1e-2)], ids=["batch", "micro-batches", "bf16"])
def test_fsdp_two_processes_equals_single_process_and_rank0_alone_writes(tmp_path, extra, rtol):
    """fp32: float32 sums in another order (each rank's shard of the batch, reduce-scatter),
    measured ~2e-7 relative. bf16 (autocast in one process, FSDP's policy on two): bf16
    roundings of differently split sums, measured ~2e-3 relative on the loss."""
    single = tmp_path / "single.zarr"
    proc = _lscape([*ARGS, *extra, "--out", str(single)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    sharded = tmp_path / "fsdp.zarr"
    proc = _lscape([*ARGS, *extra, "--strategy", "fsdp", "--out", str(sharded)], tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = RunReader(single), RunReader(sharded)
    assert b.attrs["status"] == "completed" and b.attrs["config"]["strategy"] == "fsdp"
    la, lb = a.read("train")["loss"], b.read("train")["loss"]
    assert len(lb) == 12
    np.testing.assert_allclose(lb, la, rtol=rtol)
    for name in ("grad_norm", "param_norm", "dist_from_init", "update_size"):
        np.testing.assert_allclose(b.read("grad-norm")[name], a.read("grad-norm")[name], rtol=10 * rtol, err_msg=name)
    tol = max(rtol, 1e-5)  # projected θ and ∇L_B: coordinates near 0 too
    for name in ("theta", "grad", "loss", "path_length"):
        np.testing.assert_allclose(b.read("trajectory")[name], a.read("trajectory")[name], rtol=tol, atol=tol,
                                   err_msg=name)
    # rank 0 alone wrote the store; the other rank only its DCP shard files inside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsdp.zarr", "single.zarr"]  # (before measure below)
    latest = zarr.open_group(str(sharded), mode="r")["checkpoints"].attrs["latest"]
    dcp = sharded / "checkpoints" / f"{latest}.dcp"
    assert sorted(p.name for p in dcp.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "zarr.json"]
    # the checkpoint array keeps the gathered full model: measure/landscape read it as any store's
    from lscape.checkpoint import load_checkpoint

    full_a = load_checkpoint(zarr.open_group(str(single), mode="r"))["model"]
    full_b = load_checkpoint(zarr.open_group(str(sharded), mode="r"))
    assert full_b["sharded"] == {"dcp": f"{latest}.dcp", "world_size": 2}
    assert full_b["model"].keys() == full_a.keys()
    for key in full_a:
        torch.testing.assert_close(full_b["model"][key], full_a[key], rtol=max(rtol, 1e-5), atol=max(rtol, 1e-6))
    shown = _lscape(["show", str(sharded)], tmp_path)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    if not extra:  # lscape measure of an FSDP store: the full model, measured on a plain one (curvature too)
        measured = _lscape(["measure", str(sharded), "--plugin", "sharpness", "--out", str(tmp_path / "m.zarr"),
                            "--no-progress"], tmp_path)
        assert measured.returncode == 0, measured.stderr[-3000:]
        assert np.isfinite(RunReader(tmp_path / "m.zarr").read("sharpness")["lambda_max"]).all()


@pytest.mark.slow
def test_fsdp_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    args = [*ARGS, "--steps", "16", "--checkpoint-schedule", "every:5", "--lr-schedule", "cosine",
            "--strategy", "fsdp", "--plugin", "killer"]
    killed = tmp_path / "killed.zarr"
    proc = _lscape([*args, "--out", str(killed)], tmp_path, nproc=2, KILL_AT="8")
    assert proc.returncode != 0
    assert RunReader(killed).attrs["status"] == "running"  # killed part-way: nothing marked it
    latest = zarr.open_group(str(killed), mode="r")["checkpoints"].attrs["latest"]
    assert latest == "step_000000006"  # after the 6 updates of steps 0-5 (every:5 is due at step 5)
    done = _lscape(["run", "--resume", str(killed), "--trust-store", "--no-progress"], tmp_path, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert RunReader(killed).attrs["status"] == "completed"
    reference = tmp_path / "reference.zarr"
    ref = _lscape([*args, "--out", str(reference)], tmp_path, nproc=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = _records(killed), _records(reference)
    assert a.keys() == b.keys() and len(b["train"]["loss"]) == 16
    for group in a:
        for name in a[group]:
            np.testing.assert_array_equal(a[group][name], b[group][name], err_msg=f"{group}/{name}")  # bitwise


@pytest.mark.slow
def test_fsdp_checkpoint_of_two_processes_resumes_on_one(tmp_path):
    """DCP reshards model and momentum buffers from 2 shards to 1: the continued loss curve
    equals the 2-process run's within float32 summation tolerance."""
    args = [*ARGS, "--checkpoint-schedule", "every:6", "--strategy", "fsdp"]
    two = tmp_path / "two.zarr"
    proc = _lscape([*args, "--steps", "6", "--out", str(two)], tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _lscape(["run", "--resume", str(two), "--steps", "12", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = tmp_path / "reference.zarr"
    proc = _lscape([*args, "--out", str(reference)], tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(RunReader(two).read("train")["loss"], RunReader(reference).read("train")["loss"],
                               rtol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--plugin", "hessian-exact"], "plugin 'hessian-exact' does not run on a sharded model (--strategy fsdp)"),
    (["--plugin", "hessian", "-o", "hessian.eigenvectors=true"],
     "hessian: hessian.eigenvectors=true (every eigenvector would be gathered whole on rank 0) does not run on a "
     "sharded model (--strategy fsdp)"),
    (["--plugin", "sharpness", "-o", "sharpness.kind=ggn"], "sharpness: sharpness.kind=ggn (only the Hessian"),
    (["--precision", "fp16"], "--precision fp16 (a GradScaler) does not combine with --strategy fsdp"),
])
def test_refused_under_fsdp_in_one_line_before_anything_is_written(tmp_path, extra, message):
    out = tmp_path / "r.zarr"
    proc = _lscape([*ARGS, "--strategy", "fsdp", *extra, "--out", str(out)], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_gradient_clipping_and_optimizer_on_sharded_parameters(tmp_path):
    (tmp_path / "clip.py").write_text(CLIP)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_free_port()), "clip.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 OK" in proc.stdout and "rank 1 OK" in proc.stdout


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = nn.Linear(4, 4), nn.Linear(4, 4)


class _Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 10)


def test_wrapping_rule_blocks_of_children_and_layer_stacks():
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    assert fsdp_blocks(seq) == [seq[0], seq[2], seq[3]]  # children with parameters; the Tanh has none
    t = _Transformer()
    assert fsdp_blocks(t) == [t.embed, t.layers[0], t.layers[1], t.head]  # a ModuleList is a stack of blocks


def test_wrapping_rule_is_overridden_by_the_model():
    t = _Transformer()
    t.lscape_fsdp_blocks = lambda: list(t.layers)
    assert fsdp_blocks(t) == list(t.layers)
    t.lscape_fsdp_blocks = lambda: [nn.Linear(2, 2)]
    with pytest.raises(UsageError, match="submodules of the model"):
        fsdp_blocks(t)
