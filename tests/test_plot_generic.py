"""`lscape plot` draws every group: a third-party probe without a registered figure gets a
generic one per array (and says so); an overlay of several runs lands in its own folder; a
refused plot creates nothing."""

from __future__ import annotations

import os
import textwrap

import pytest

from conftest import SMALL

pytest.importorskip("matplotlib")

PROBE = textwrap.dedent('''
    import torch
    from lscape import Output, Probe, hookimpl

    class Norms(Probe):
        name = "my-norms"
        schedule = "every:1"
        outputs = (Output("total"), Output("per_layer", dims=("layer",)))

        def measure(self, ctx, state):
            norms = torch.stack([p.detach().norm() for p in ctx.model.parameters()])
            return {"total": norms.norm(), "per_layer": norms}

    @hookimpl
    def register_probes(register):
        register(Norms)
''')


def test_a_third_party_group_without_a_figure_gets_generic_ones(cli, tmp_path, monkeypatch):
    (tmp_path / "my_norms_plugin.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = cli("run", *SMALL, "--steps", "3", "--plugin", "my_norms_plugin",
                         "--out", "runs/a.zarr")
    assert code == 0, err
    code, out, err = cli("plot", "runs/a.zarr")
    assert code == 0, err
    assert "no figure is registered for the group 'my-norms'" in err
    drawn = sorted(os.listdir("runs/a-plots"))
    assert "my-norms_total.png" in drawn and "my-norms_per_layer.png" in drawn, drawn


def test_two_runs_plot_into_a_folder_named_after_both_and_a_refused_plot_creates_nothing(cli, tmp_path):
    for name in ("a", "b"):
        code, out, err = cli("run", *SMALL, "--steps", "2", "--out", f"runs/{name}.zarr")
        assert code == 0, err
    code, out, err = cli("plot", "runs/a.zarr", "runs/b.zarr")
    assert code == 0 and os.path.isdir("runs/a-vs-b-plots") and not os.path.exists("runs/a-plots"), err
    (tmp_path / "blocker").write_text("x")
    code, out, err = cli("plot", "runs/a.zarr", "--out", str(tmp_path / "blocker" / "figs"))
    assert code == 2 and err.count("\n") == 1, err
    code, out, err = cli("plot", "runs/missing.zarr", "--out", "figs")
    assert code == 2 and not os.path.exists("figs"), err
