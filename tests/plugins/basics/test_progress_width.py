"""The training bar at 80 and 100 columns keeps the bar, the step count and the ETA while a
probe runs; the probe's status has its own line."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from lscape.plugins.basics.progress import progress_bar


@pytest.mark.parametrize("width", [80, 100, 160])
def test_bar_count_and_eta_survive_narrow_terminals_with_a_probe_running(width):
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=True, color_system=None, legacy_windows=False)
    bar = progress_bar(console)
    task = bar.add_task("train", total=1000, info="loss 2.303  eval loss 2.301  eval accuracy 0.1125  12.3 steps/s")
    bar.update(task, completed=370)
    bar.doing = "measuring hessian: Lanczos 37/120 products, 12.4 s"
    console.print(bar.get_renderable())
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) == 2, lines
    first, second = lines
    assert "370/1000" in first and "━" in first and "-:--:--" in first and "loss 2.303" in first, first
    assert all(len(line.rstrip()) <= width for line in lines)
    assert second.startswith("measuring hessian")
    bar.doing = ""
    out.truncate(0), out.seek(0)
    console.print(bar.get_renderable())
    assert len([line for line in out.getvalue().splitlines() if line.strip()]) == 1
