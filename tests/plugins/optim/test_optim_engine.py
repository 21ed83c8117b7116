"""The `sam`, `smoothout` and `entropy-sgd` step owners inside the engine."""

import numpy as np
import pytest

import lscape
from lscape.errors import UsageError
from lscape.store import RunReader

WORKLOAD = dict(
    model="mlp",
    model_opts={"widths": "16", "activation": "tanh"},
    data="synthetic",
    data_opts={"task": "classification", "n": 320, "dim": 6, "classes": 3},
    loss="ce",
    lr=0.1,
    batch_size=32,
    progress=False,
    eval_schedule="never",
    checkpoint_schedule="never",
)


def _run(tmp_path, name, **kw):
    args = {**WORKLOAD, **kw}
    result = lscape.run(out=str(tmp_path / f"{name}.zarr"), **args)
    assert result.status == "completed"
    return RunReader(result.path)


@pytest.mark.parametrize("pair", [["sam", "entropy-sgd"], ["smoothout", "sam"]])
def test_two_step_owners_are_a_clear_error_and_write_nothing(tmp_path, pair):
    with pytest.raises(UsageError, match="both own the training step"):
        lscape.run(out=str(tmp_path / "two.zarr"), **WORKLOAD, steps=2, plugins=pair)
    assert not (tmp_path / "two.zarr").exists()


def test_sam_with_rho_zero_trains_exactly_like_the_base_optimizer(tmp_path):
    plain = _run(tmp_path, "plain", steps=8, momentum=0.9).read("train")
    sam = _run(tmp_path, "sam0", steps=8, momentum=0.9, plugins=["sam"],
               plugin_options={"sam": {"rho": 0.0, "stats": "every:1"}})
    assert np.array_equal(plain["loss"], sam.read("train")["loss"])
    s = sam.read("sam")
    assert list(s["step"]) == list(range(8))
    np.testing.assert_allclose(s["sam_edge"], 2 / 0.1)


def test_sam_records_grad_norm_and_sam_edge_on_its_schedule(tmp_path):
    s = _run(tmp_path, "sam", steps=6, plugins=["sam"], plugin_options={"sam": {"rho": 0.1, "stats": "every:2"}}).read("sam")
    assert list(s["step"]) == [0, 2, 4]
    np.testing.assert_allclose(s["perturbation_norm"], 0.1, rtol=1e-3)
    g = s["grad_norm"]
    np.testing.assert_allclose(s["sam_edge"], g / 0.2 * (np.sqrt(1 + 0.8 / (0.1 * g)) - 1), rtol=1e-9)


def test_entropy_sgd_with_L_zero_is_nesterov_sgd_and_L_steps_draw_fresh_batches(tmp_path):
    base = dict(steps=5, momentum=0.9, nesterov=True)
    plain = _run(tmp_path, "nesterov", **base).read("train")
    l0 = _run(tmp_path, "l0", **base, plugins=["entropy-sgd"], plugin_options={"entropy-sgd": {"L": 0}}).read("train")
    assert np.array_equal(plain["loss"], l0["loss"])
    # L = 4: each step takes 5 minibatches of the 8 in an epoch, so epochs advance every ~1.6 steps
    reader = _run(tmp_path, "l4", **base, plugins=["entropy-sgd"],
                  plugin_options={"entropy-sgd": {"L": 4, "gamma": 0.03, "scoping": 0.5, "stats": "every:1"}})
    train, stats = reader.read("train"), reader.read("entropy-sgd")
    assert list(train["epoch"]) == [0, 0, 1, 1, 2]
    np.testing.assert_allclose(stats["gamma"], 0.03 * 1.5 ** np.arange(5), rtol=1e-12)
    assert np.all(stats["dist_mu"] > 0) and np.all(np.abs(stats["cos"]) <= 1)


def test_smoothout_runs_ghost_chunks_and_records_the_annealed_amplitude(tmp_path):
    reader = _run(tmp_path, "so", steps=4, plugins=["smoothout", "grad-norm"],
                  plugin_options={"smoothout": {"ss": 0.01, "ss_schedule": "anneal", "mb": 8, "shape": "filter",
                                                "stats": "every:1"}})
    s = reader.read("smoothout")
    np.testing.assert_allclose(s["amplitude"], 0.01 * (1 + np.arange(4)) ** -0.275, rtol=1e-12)
    assert np.all(np.isfinite(reader.read("train")["loss"]))
    # on_after_backward still fires once per step (through the first ghost chunk)
    assert list(reader.read("grad-norm")["step"]) == [0, 1, 2, 3]


def test_smoothout_tanh_schedule_needs_the_run_length(tmp_path):
    with pytest.raises(UsageError, match="tanh"):
        lscape.run(out=str(tmp_path / "t.zarr"), **WORKLOAD, time_limit=5.0, plugins=["smoothout"],
                   plugin_options={"smoothout": {"ss_schedule": "tanh"}})


def test_step_owner_state_survives_a_checkpoint_round_trip():
    from lscape.plugins.optim.entropy_sgd import EntropySgdStep

    a, b = EntropySgdStep(L=1), EntropySgdStep(L=1)

    class Ctx:
        import torch

        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    a.setup(Ctx)
    a.optim.variant_state["t"] = 7
    b.load_state_dict(a.state_dict())
    b.setup(Ctx)
    assert b.optim.t == 7
