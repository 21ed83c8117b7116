"""Issue 20 item 1 (`lscape measure`): kind=preconditioned reads P from the checkpoint's optimizer
state, checked against a dense D H D with D = P^{-1/2} built by hand from Adam's state (float64);
a source without optimizer state is refused in one line, nothing written."""

from __future__ import annotations

import copy
import os

import torch

from conftest import SMALL
from lscape.checkpoint import load_checkpoint
from lscape.config import RunConfig
from lscape.curvature import dense_hessian
from lscape.engine import Engine
from lscape.store import RunReader

ADAM = [*SMALL, "--optimizer", "adam", "--lr", "0.01", "--batch-size", "full"]
OPTS = ["-o", "sharpness.kind=preconditioned", "-o", "sharpness.data=full", "-o", "sharpness.tol=1e-3"]


def _adam_p(optimizer_state, betas=(0.9, 0.999), eps=1e-8):
    """Adam's P = (1 − β₁ᵗ)(√(v/(1 − β₂ᵗ)) + ε), flat, in parameter order, by hand."""
    b1, b2 = betas
    parts = []
    for i in sorted(optimizer_state["state"]):
        st = optimizer_state["state"][i]
        t = float(st["step"])
        v = st["exp_avg_sq"].double().reshape(-1)
        parts.append((1 - b1**t) * ((v / (1 - b2**t)).sqrt() + eps))
    return torch.cat(parts)


def test_measure_reads_p_from_the_checkpoint(cli, tmp_path):
    run = tmp_path / "adam.zarr"
    code, _, err = cli("run", *ADAM, "--steps", "7", "--out", run)
    assert code == 0, err
    code, _, err = cli("measure", run, "--plugin", "sharpness", *OPTS, "--out", tmp_path / "m.zarr")
    assert code == 0, err
    measured = RunReader(tmp_path / "m.zarr").read("sharpness")
    assert list(measured["step"]) == [7]
    reader = RunReader(run)
    state = load_checkpoint(reader.root)
    cfg = RunConfig.stored(reader)
    cfg.out, cfg.plugins = str(tmp_path / "unused.zarr"), []
    ctx = Engine(cfg).prepare()
    model = copy.deepcopy(ctx.model).double()
    model.load_state_dict(state["model"])
    x, y = ctx.train_set.tensors
    H = dense_hessian(model, torch.nn.functional.cross_entropy, [(x.double(), y)])
    D = _adam_p(state["optimizer"]).rsqrt()
    expected = float(torch.linalg.eigvalsh(D[:, None] * H * D[None, :])[-1])
    raw = float(torch.linalg.eigvalsh(H)[-1])
    got = float(measured["lambda_max"][0])
    assert abs(got - expected) <= 1e-4 * abs(expected), (got, expected)
    assert abs(raw - expected) > 0.1 * abs(expected)  # P matters: not the raw λ_max
    attrs = RunReader(tmp_path / "m.zarr").group_attrs("sharpness")
    assert "adam" in attrs["matrix"]


def test_measure_without_optimizer_state_is_refused(cli, tmp_path):
    run = tmp_path / "adam.zarr"
    assert cli("run", *ADAM, "--steps", "3", "--out", run)[0] == 0
    state = load_checkpoint(RunReader(run).root)
    torch.save(state["model"], tmp_path / "model.pt")
    cases = [
        [tmp_path / "model.pt", *ADAM[:-4]],
        [*ADAM[:-4]],  # a fresh model
    ]
    for source in cases:
        before = set(os.listdir(tmp_path))
        code, out, err = cli("measure", *source, "--plugin", "sharpness", *OPTS, "--out", tmp_path / "m.zarr")
        assert code == 2, (out, err)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "optimizer" in lines[0] and "Traceback" not in err, err
        assert set(os.listdir(tmp_path)) == before


def test_measure_from_checkpoints_equals_the_measurement_during_the_run(cli, tmp_path):
    """P at checkpoint steps 1, 4, 7 (after that many updates), read back by lscape measure,
    gives what the run measured at those steps (the same θ, the same optimizer state)."""
    run = tmp_path / "adam.zarr"
    code, _, err = cli("run", *ADAM, "--steps", "8", "--checkpoint-schedule", "every:3", "--plugin", "sharpness",
                       "-o", "sharpness.kind=preconditioned", "-o", "sharpness.schedule=at:1,4,7",
                       "-o", "sharpness.tol=1e-4", "--out", run)
    assert code == 0, err
    code, _, err = cli("measure", run, "--plugin", "sharpness", "-o", "sharpness.kind=preconditioned",
                       "-o", "sharpness.tol=1e-4", "--checkpoints", "1,4,7", "--out", tmp_path / "m.zarr")
    assert code == 0, err
    during, after = RunReader(run).read("sharpness"), RunReader(tmp_path / "m.zarr").read("sharpness")
    assert list(during["step"]) == list(after["step"]) == [1, 4, 7]
    torch.testing.assert_close(torch.tensor(after["lambda_max"]), torch.tensor(during["lambda_max"]), rtol=3e-4,
                               atol=0)
