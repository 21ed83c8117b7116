"""CONTRIBUTING.md's "Add an optimizer variant (2 files)", done as written: its two files go
into a temporary package, and the new variant trains under `lscape.run` and in a plain loop."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lscape
from lscape.store import RunReader

CONTRIBUTING = Path(__file__).resolve().parents[3] / "CONTRIBUTING.md"
RUN = dict(model="mlp", model_opts={"widths": "8"}, data="synthetic",
           data_opts={"task": "classification", "n": 96, "dim": 5, "classes": 3}, loss="ce", batch_size=16,
           steps=5, progress=False, eval_schedule="never", checkpoint_schedule="never")


def _recipe_files() -> dict[str, str]:
    """The recipe's code blocks, by the path named on their first line."""
    text = CONTRIBUTING.read_text()
    section = text[text.index("## Add an optimizer variant (2 files)"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n# (\S+)\n(.*?)```", section, flags=re.S)
    return dict(blocks)


@pytest.fixture
def toy_variant(tmp_path, monkeypatch):
    files = _recipe_files()
    assert set(files) == {"core/optim/scaled_sgd.py", "plugins/optim/scaled_sgd.py"}
    pkg = tmp_path / "toyvariant"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scaled_sgd.py").write_text(files["core/optim/scaled_sgd.py"])
    # the one change outside lscape's tree: the algorithm's import path
    plugin = files["plugins/optim/scaled_sgd.py"]
    assert "from lscape.optim.scaled_sgd import ScaledSGD" in plugin
    (pkg / "plugin.py").write_text(plugin.replace("lscape.optim.scaled_sgd", "toyvariant.scaled_sgd"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "toyvariant.plugin"
    for name in [m for m in sys.modules if m == "toyvariant" or m.startswith("toyvariant.")]:
        del sys.modules[name]


def test_the_recipe_variant_trains_under_lscape_run_and_stores_its_rows(tmp_path, toy_variant):
    # scale 0.5 at lr 0.2 is plain SGD at lr 0.1, bit for bit (the factors are powers of two apart)
    plain = lscape.run(**RUN, lr=0.1, out=str(tmp_path / "plain.zarr"))
    run = lscape.run(**RUN, lr=0.2, plugins=[toy_variant],
                     plugin_options={"scaled-sgd": {"scale": 0.5, "stats": "every:2"}},
                     out=str(tmp_path / "scaled.zarr"))
    assert run.status == "completed"
    reader = RunReader(run.path)
    loss = reader.read("train")["loss"]
    assert len(loss) == 5 and np.array_equal(loss, RunReader(plain.path).read("train")["loss"])
    rows = reader.read("scaled-sgd")
    assert list(rows["step"]) == [0, 2, 4] and np.all(rows["grad_norm"] > 0)


def test_the_recipe_variant_is_a_plain_optimizer_too(toy_variant):
    from toyvariant.scaled_sgd import ScaledSGD

    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = ScaledSGD([theta], torch.optim.SGD, scale=0.5, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = (theta**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    sched.step()
    assert isinstance(opt, torch.optim.Optimizer) and opt.t == 1 and opt.param_groups[0]["lr"] == 0.05
    torch.testing.assert_close(theta.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64) * (1 - 0.1))
    state = opt.state_dict()
    assert state["variant"]["t"] == 1 and "momentum_buffer" in state["base"]["state"][0]
