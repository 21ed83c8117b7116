"""Trackers write inside the run store's folder by default, and an unusable folder is refused in
one line before the store exists."""

from __future__ import annotations

import os

import pytest

from conftest import SMALL, run_subprocess
from lscape.plugins.forwarding.tensorboard import default_log_dir


def test_default_log_dir_is_inside_the_store():
    assert default_log_dir("runs/a.zarr") == os.path.join("runs/a.zarr", "tensorboard")
    assert default_log_dir("file:///x/runs/a.zarr/") == os.path.join("/x/runs/a.zarr", "tensorboard")
    assert default_log_dir("s3://bucket/a.zarr") == os.path.join("runs", "tensorboard", "a")


@pytest.mark.parametrize("plugin,option", [("tensorboard", "log_dir"), ("wandb", "dir")])
def test_a_tracker_folder_under_a_file_is_refused_before_the_store_exists(cli, tmp_path, plugin, option):
    pytest.importorskip("tensorboard" if plugin == "tensorboard" else "wandb")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for folder in (blocker, blocker / "sub"):
        code, out, err = cli("run", *SMALL, "--steps", "2", "--plugin", plugin, "-o", f"{plugin}.{option}={folder}")
        assert code == 2 and err.count("\n") == 1 and f"{plugin}.{option}" in err, err
    assert not os.path.exists("runs")


def test_tensorboard_events_land_inside_the_store_and_the_store_still_reads_cleanly(cli, tmp_path):
    pytest.importorskip("tensorboard")
    code, out, err = cli("run", *SMALL, "--steps", "2", "--plugin", "tensorboard", "--out", "runs/t.zarr")
    assert code == 0, err
    assert any(f.startswith("events.out") for f in os.listdir("runs/t.zarr/tensorboard"))
    assert sorted(os.listdir("runs")) == ["t.zarr"]
    shown = run_subprocess("show", "runs/t.zarr", cwd=tmp_path)  # a real process: the user's warning filters
    assert shown.returncode == 0 and "train" in shown.stdout and "Warning" not in shown.stderr, shown.stderr
