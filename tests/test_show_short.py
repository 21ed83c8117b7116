"""`show`, the notebook view and repr() of a store say what it is in short lines: an attach or
object run's stored model/DataLoader/optimizer reprs are cut to one line each."""

from __future__ import annotations

import torch
from torch import nn

import lscape
from lscape.display import short_value


def test_short_value_keeps_one_short_line():
    assert short_value("mlp") == "mlp" and short_value(None) == "-"
    long = repr(nn.Sequential(*[nn.Linear(8, 8) for _ in range(20)]))
    out = short_value(long)
    assert "\n" not in out and len(out) <= 60 and out.endswith("…")


def test_show_and_html_of_an_object_run_print_each_object_on_one_short_line(cli, tmp_path):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)], nn.Linear(4, 2))
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = lscape.run(model=model, optimizer=opt, data=loader, loss="ce", steps=2, out=str(tmp_path / "o.zarr"),
                     progress=False)
    code, out, err = cli("show", str(tmp_path / "o.zarr"))
    assert code == 0, err
    model_line = next(line for line in out.splitlines() if line.startswith("model "))
    assert "Linear(in_features=4" not in out.replace(model_line, "") and len(out.splitlines()) < 30, out
    reader = lscape.open_run(run.path)
    assert reader._repr_html_().count("Linear(") <= 1
    text = repr(reader)
    assert text.startswith("<lscape run store") and "completed" in text and "train" in text and "\n" not in text
