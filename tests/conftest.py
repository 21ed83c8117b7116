"""Shared fixtures: a fresh plugin manager per test, small real workloads, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder, so default `runs/` stores never collide."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LSCAPE_TRACE_PLUGINS", raising=False)
    monkeypatch.delenv("LSCAPE_PLUGINS", raising=False)
    yield


@pytest.fixture
def cli(capsys):
    """Run `lscape ARGS` in-process; returns (exit_code, stdout, stderr)."""
    from lscape.cli import main

    def invoke(*args: str):
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


def run_subprocess(*args: str, cwd=None, timeout=300, env=None):
    """Run `python -m lscape ARGS` in a real process (for signals and tracebacks)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lscape", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


SMALL = ["--data", "synthetic", "--data-opt", "n=128", "--data-opt", "dim=8", "--data-opt", "classes=3",
         "--model-opt", "widths=16", "--batch-size", "32", "--no-progress"]
