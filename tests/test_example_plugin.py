"""The third-party example package (installed by .ci/run) is discovered and runs."""

import json

import pytest

from conftest import SMALL

pytest.importorskip("lscape_example_plugin", reason="pip install -e examples/lscape-example-plugin")


def test_example_plugin_is_listed_and_runs(cli, tmp_path):
    code, out, _ = cli("plugins", "--json")
    info = json.loads(out)
    assert info["plugins"]["layer-norms"]["source"] == "layer-norms"
    code, out, err = cli("run", *SMALL, "--steps", "6", "--plugin", "layer-norms", "-o", "layer-norms.every=2",
                         "--out", tmp_path / "e.zarr")
    assert code == 0, err
    from lscape.store import RunReader

    d = RunReader(tmp_path / "e.zarr").read("layer-norms")
    assert d["step"].tolist() == [0, 2, 4] and d["norms"].shape == (3, 2)  # two Linear weights
