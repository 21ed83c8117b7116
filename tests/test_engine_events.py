"""lscape.events.EventDriver: the one place that knows the order of the run events; the
engine's own state stays off ``ctx.cache``."""

import pytest
import torch

import lscape
from lscape.config import RunConfig
from lscape.context import RunContext, StepState
from lscape.errors import PluginError, UsageError
from lscape.events import EventDriver


class Recorder(lscape.Plugin):
    name = "recorder"

    def __init__(self):
        super().__init__()
        self.events = []

    @lscape.hookimpl
    def on_run_start(self, ctx):
        self.events.append("run_start")

    @lscape.hookimpl
    def on_epoch_start(self, ctx, epoch):
        self.events.append(f"epoch_start {epoch}")

    @lscape.hookimpl
    def on_step_start(self, ctx, state):
        self.events.append(f"step_start {state.step}")

    @lscape.hookimpl
    def on_after_backward(self, ctx, state):
        self.events.append(f"after_backward {state.step} {float(state.loss):g}")

    @lscape.hookimpl
    def on_evaluate(self, ctx, state, metrics):
        self.events.append(f"evaluate {state.step} {metrics}")

    @lscape.hookimpl
    def on_step_end(self, ctx, state):
        self.events.append(f"step_end {state.step}")

    @lscape.hookimpl
    def on_epoch_end(self, ctx, epoch):
        self.events.append(f"epoch_end {epoch}")

    @lscape.hookimpl
    def on_exception(self, ctx, error):
        self.events.append(f"exception {error}")

    @lscape.hookimpl
    def on_run_end(self, ctx, status):
        self.events.append(f"run_end {status}")


def _driver(**kwargs):
    pm = lscape.manager.get_plugin_manager(entry_points=False)
    rec = Recorder()
    pm.register(rec, name="plugin:recorder")
    model = torch.nn.Linear(2, 1)
    ctx = RunContext(config=RunConfig(), model=model, loss_fn=torch.nn.functional.mse_loss,
                     train_set=None, eval_set=None, device=torch.device("cpu"))
    driver = EventDriver(pm, ctx, **kwargs)
    driver.pm = pm  # for tests that register more plugins
    return driver, rec


def _state(driver, epoch_end=False):
    return lambda epoch: StepState(step=driver.step, epoch=epoch, epoch_end=epoch_end)


def test_the_driver_fires_the_events_in_order_and_counts():
    epochs = []
    driver, rec = _driver(on_new_epoch=epochs.append)
    driver.run_start()
    for i in range(3):  # two steps end epoch 0, the third starts epoch 1
        driver.begin_step(_state(driver, epoch_end=i == 1))
        driver.after_backward(torch.tensor(float(i)))
        driver.after_backward(torch.tensor(99.0))  # a closure's second call fires nothing
        if i == 1:
            driver.evaluate({"eval_loss": 0.5})
        driver.end_step()
    driver.evaluate({"eval_loss": 0.25})  # after a step: at the last step
    driver.end_epoch()
    driver.run_end("completed")
    assert rec.events == [
        "run_start",
        "epoch_start 0", "step_start 0", "after_backward 0 0", "step_end 0",
        "step_start 1", "after_backward 1 1", "evaluate 1 {'eval_loss': 0.5}", "step_end 1", "epoch_end 0",
        "epoch_start 1", "step_start 2", "after_backward 2 2", "step_end 2",
        "evaluate 2 {'eval_loss': 0.25}", "epoch_end 1",
        "run_end completed"]
    assert epochs == [0, 1]  # the engine's --regime runs before on_epoch_start
    assert (driver.step, driver.epoch, driver.next_epoch, driver.last.extras) == (3, 1, 2, {"eval_loss": 0.25})


def test_the_driver_follows_the_epochs_a_data_stream_gives():
    driver, rec = _driver()
    driver.begin_step(_state(driver), epoch=4)
    driver.end_step()
    driver.begin_step(_state(driver), epoch=4)  # same epoch: no new start
    driver.end_step()
    driver.begin_step(_state(driver), epoch=5)  # a new epoch without an end (an iterable data set)
    driver.end_step()
    assert [e for e in rec.events if "epoch" in e] == ["epoch_start 4", "epoch_start 5"]


def test_the_driver_restores_its_counters_from_a_checkpoint():
    driver, rec = _driver()
    driver.restore(step=7, epoch=2, epoch_open=True, position=3)
    driver.begin_step(_state(driver))
    driver.end_step()
    assert rec.events == ["step_start 7", "step_end 7"] and driver.position == 4
    driver, rec = _driver()
    driver.restore(step=8, epoch=3, epoch_open=False)
    state = driver.begin_step(_state(driver))
    assert rec.events[0] == "epoch_start 3" and state.epoch == 3


def test_the_driver_refuses_steps_out_of_order_and_names_failing_plugins():
    driver, rec = _driver()
    with pytest.raises(UsageError, match="without a step"):
        driver.end_step()
    driver.begin_step(_state(driver))
    with pytest.raises(UsageError, match="still open"):
        driver.begin_step(_state(driver))

    class Broken(lscape.Plugin):
        name = "broken"

        @lscape.hookimpl
        def on_step_end(self, ctx, state):
            raise RuntimeError("boom")

    driver.pm.register(Broken(), name="plugin:broken")
    with pytest.raises(PluginError, match="broken"):
        driver.end_step()
    driver.exception(RuntimeError("x"))  # a failing on_exception never hides the first error
    assert rec.events[-1] == "exception x"


def test_the_engine_keeps_its_own_state_off_ctx_cache(tmp_path):
    from lscape.engine import Engine

    cfg = lscape.api.make_config(model="mlp", data="synthetic", data_opts={"n": 64, "dim": 4, "classes": 2},
                                 model_opts={"widths": 8}, batch_size=16, steps=4, eval_schedule="every:2",
                                 until_loss=1e-9, out=str(tmp_path / "c.zarr"), progress=False)
    engine = Engine(cfg)
    engine.run()
    assert engine.ctx.cache == {}  # workers, until-loss batches, loaders, resume time: typed homes
    assert engine.step == 4
