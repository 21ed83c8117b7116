"""`lscape plugins` at 80 columns: no line wider than the terminal, each plugin's help readable
(the source module gives its room below 120 columns; `lscape plugins NAME` shows it)."""

from __future__ import annotations

from conftest import run_subprocess


def test_plugins_listing_fits_80_columns(tmp_path):
    out = run_subprocess("plugins", cwd=tmp_path, env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    table = lines[: next(i for i, line in enumerate(lines) if "plugin modules" in line)]
    assert any(line.startswith("│ sharpness ") for line in table)
    assert not any("lscape.plugins" in line for line in table)  # the source column is left out at 80
    wide = run_subprocess("plugins", cwd=tmp_path, env={"COLUMNS": "160"})
    assert "lscape.plugins" in wide.stdout.split("plugin modules")[0]
