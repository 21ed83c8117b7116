"""A store written by the code before lscape.optim became a package (tests/fixtures/
optim_entropy_sgd_v0_1: `entropy-sgd` with L=1, scoping=0.5, checkpointed at step 2) still
resumes, and the resumed run is the uninterrupted run of today's code, bit for bit."""

import shutil
from pathlib import Path

import numpy as np

import lscape
from lscape.store import RunReader

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "optim_entropy_sgd_v0_1"


def test_an_old_entropy_sgd_checkpoint_resumes_exactly(tmp_path, cli):
    store = tmp_path / "old"
    shutil.copytree(FIXTURE, store)
    code, _, err = cli("run", "--resume", str(store), "--steps", "4", "--no-progress")
    assert code == 0, err
    fresh = lscape.run(model="mlp", model_opts={"widths": "4"}, data="synthetic",
                       data_opts={"task": "classification", "n": 32, "dim": 3, "classes": 2}, loss="ce",
                       batch_size=8, lr=0.1, momentum=0.9, nesterov=True, steps=4, progress=False,
                       eval_schedule="never", checkpoint_schedule="every:2", plugins=["entropy-sgd"],
                       plugin_options={"entropy-sgd": {"L": 1, "gamma": 0.03, "scoping": 0.5, "stats": "every:1"}},
                       out=str(tmp_path / "fresh.zarr"))
    old, new = RunReader(store), RunReader(fresh.path)
    assert np.array_equal(old.read("train")["loss"], new.read("train")["loss"]) and len(new.read("train")["loss"]) == 4
    rows_old, rows_new = old.read("entropy-sgd"), new.read("entropy-sgd")
    for key in ("step", "grad_norm", "dist_mu", "cos", "noise_norm", "mean_dist", "gamma"):
        assert np.array_equal(rows_old[key], rows_new[key]), key
    # the step counter came back from the old checkpoint: γ_t = γ₀ (1 + scoping)^t
    np.testing.assert_allclose(rows_old["gamma"], 0.03 * 1.5 ** np.arange(4), rtol=1e-12)
