"""Exact resume after faults, for every built-in plugin: a run is SIGKILLed twice (at steps
that fall between checkpoints, mid-chunk) and resumed each time; every array of every group
must equal an uninterrupted run's. And every plugin with state round-trips ``state_dict``.

The kills are real SIGKILLs of a forked copy of the test process (no flush, no run-end hook,
the lock left behind by a dead process), so this costs no interpreter start-up per run."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch

import lscape
from lscape import hookimpl
from lscape.api import make_config
from lscape.config import RunConfig
from lscape.engine import Engine
from lscape.manager import build_registry, get_plugin_manager
from lscape.probe import StepOwner
from lscape.store import RunReader

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

STEPS, KILLS = 30, (11, 18)  # resumes from the checkpoints at steps 8 and 15
BASE = dict(data="synthetic", data_opts={"n": 64, "dim": 4, "classes": 3}, model_opts={"widths": 8},
            batch_size=16, steps=STEPS, momentum=0.9, lr_schedule="cosine", checkpoint_schedule="every:7",
            progress=False)

# Every built-in plugin is active in at least one run (step owners one per run); options make
# them cheap on the tiny model and make each measure several times, across both kills.
RUNS = {
    "probes": (["trajectory", "diffusion", "grad-norm", "sharpness", "hessian", "hessian-exact", "landscape",
                "interpolate", "eps-sharpness", "eos", "critical-sharpness"],
               {"diffusion": {"window": 8, "span": 4, "fit_points": 6, "fragment": 4},
                "sharpness": {"every": 5}, "hessian": {"every": 6, "k": 2, "trace_schedule": "every:9",
                                                        "density_schedule": "every:13", "density_points": 16,
                                                        "density_steps": 8, "density_runs": 2},
                "hessian-exact": {"every": 8}, "landscape": {"every": 9, "alpha": "-1:1:#5"},
                "interpolate": {"schedule": "every:10", "alpha": "0:1:#3"},
                "eps-sharpness": {"every": 10, "iters": 2, "repeats": 1}, "eos": {"every": 5, "batch_sharpness": 2},
                "critical-sharpness": {"every": 4}}),
    "sam": (["sam", "grad-stats", "trajectory"], {"sam": {"stats": "every:3"}, "grad-stats": {"every": 4},
                                                  "trajectory": {"every": 3, "dim": 5}}),
    "smoothout": (["smoothout", "grad-norm"], {"smoothout": {"stats": "every:3"}}),
    "entropy-sgd": (["entropy-sgd", "sharpness"], {"entropy-sgd": {"L": 2, "stats": "every:3"},
                                                   "sharpness": {"every": 4}}),
    "grad-noise": (["grad-noise"], {"grad-noise": {"schedule": "at:0,5,16,25", "noise_size": 2, "sharpness_batches": 2}}),
}


class _Killer:
    """Kills its own process with SIGKILL at the end of step ``at``: no flush, no hooks."""

    def __init__(self, at: int):
        self.at = at

    @hookimpl
    def on_step_end(self, ctx, state):
        if state.step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def _killed_at(cfg: RunConfig, at: int) -> None:
    """Run ``cfg`` in a forked child that SIGKILLs itself at step ``at``."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            engine = Engine(cfg)
            engine.prepare()
            engine.pm.register(_Killer(at), name="test-killer")
            engine.run()
        finally:
            os._exit(3)  # reached only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child exited with {status}"


def assert_same_stores(a, b) -> int:
    """Every array of every group equal (NaN = NaN), wall-clock ``time`` aside; returns the
    number of arrays compared."""
    ra, rb = RunReader(a), RunReader(b)
    groups = [g for g in ra.groups() if g != "checkpoints"]
    assert groups == [g for g in rb.groups() if g != "checkpoints"]
    compared = 0
    for g in groups:
        da, db = ra.read(g), rb.read(g)
        assert sorted(da) == sorted(db), g
        for name in da:
            if name == "time" or name.endswith("_seconds"):
                continue
            np.testing.assert_array_equal(da[name], db[name], err_msg=f"{g}/{name}")
            compared += 1
    return compared


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A model B for `interpolate`: the same architecture, another initialisation."""
    from lscape.plugins.workloads.defaults import MLP

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("other") / "other.pt"
    torch.save(MLP(4, [8], 3).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_sigkills_and_resumes_equal_the_uninterrupted_run(name, tmp_path, other_model):
    plugins, options = RUNS[name]
    options = {k: dict(v) for k, v in options.items()}
    if "interpolate" in options:
        options["interpolate"]["other"] = other_model
    kw = dict(BASE, plugins=plugins, plugin_options=options)
    reference = lscape.run(**kw, out=str(tmp_path / "ref.zarr"))
    assert reference.status == "completed"
    killed = str(tmp_path / "killed.zarr")
    _killed_at(make_config(None, **kw, out=killed), KILLS[0])
    assert RunReader(killed).attrs["status"] == "running"
    _killed_at(RunConfig(resume=killed, progress=False), KILLS[1])
    done = lscape.run(resume=killed, progress=False)
    assert done.status == "completed" and done.steps == STEPS
    assert assert_same_stores(killed, reference.path) > 0


# forward scalars to other tools (optional packages), write nothing into the store, keep no state
OUTSIDE_THE_STORE = {"tensorboard", "wandb"}


def test_every_builtin_plugin_is_in_a_fault_run():
    reg = build_registry(get_plugin_manager())
    builtin = {n for n, e in reg.activatable().items() if e.source.startswith("lscape.")
               and not getattr(e.obj, "always_on", False)} - OUTSIDE_THE_STORE
    covered = {p for plugins, _ in RUNS.values() for p in plugins}
    assert builtin <= covered, sorted(builtin - covered)


def _equal_state(a, b, where="") -> None:
    if isinstance(a, dict):
        # a loaded state may spell out defaults the saved one left implicit (0 rows, None)
        assert isinstance(b, dict), where
        for k in set(a) ^ set(b):
            value = a[k] if k in a else b[k]
            assert value is None or (not isinstance(value, torch.Tensor) and value in (0, False, {}, [])), \
                f"{where}.{k} only on one side"
        for k in set(a) & set(b):
            _equal_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", sorted(RUNS))
def test_plugin_state_round_trips_at_every_step(name, tmp_path, other_model):
    """At every step, each plugin's ``state_dict`` loaded into a fresh instance gives back the
    same state (so a checkpoint at any step holds what the plugin knows)."""
    plugins, options = RUNS[name]
    options = {k: dict(v) for k, v in options.items()}
    if "interpolate" in options:
        options["interpolate"]["other"] = other_model
    checked = []

    class Roundtrip:
        @hookimpl
        def on_step_end(self, ctx, state):
            for plugin in ctx.plugins.values():
                saved = plugin.state_dict()
                fresh = type(plugin)(**options.get(plugin.name, {}))
                if isinstance(fresh, StepOwner):  # its state lives in the variant set up around the optimizer
                    fresh.setup(ctx)
                fresh.load_state_dict(saved)
                _equal_state(fresh.state_dict(), saved, f"{plugin.name} at step {state.step}")
                checked.append(plugin.name)

    engine = Engine(make_config(None, **dict(BASE, steps=12), plugins=plugins, plugin_options=options,
                                out=str(tmp_path / "r.zarr")))
    engine.prepare()
    engine.pm.register(Roundtrip(), name="test-roundtrip")
    assert engine.run().status == "completed"
    assert set(plugins) <= set(checked)
