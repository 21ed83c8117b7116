"""Every example in docs/own-loop.md runs and writes the store it names."""

import os
import re
from pathlib import Path

import pytest

from lscape.store import RunReader

DOC = Path(__file__).resolve().parents[1] / "docs" / "own-loop.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
NEEDS = {"lightning": "lightning.pytorch", "transformers": "transformers"}


def test_the_page_has_the_plain_lightning_and_hf_examples():
    assert len(BLOCKS) == 4
    plain = BLOCKS[0].strip().splitlines()
    assert len(plain) == 10 and "lscape.attach" in BLOCKS[0]
    assert "LscapeCallback" in BLOCKS[2] and "LscapeTrainerCallback" in BLOCKS[3]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    for word, module in NEEDS.items():
        if f"import {word}" in code or f"from {word}" in code or f"{word}." in code.split("\n", 1)[0]:
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{DOC.name}[{index}]", "exec"), {"__name__": "__docs__"})
    stores = re.findall(r'out="(runs/[^"]+\.zarr)"', code)
    assert stores
    for store in stores:
        r = RunReader(os.path.join(tmp_path, store))
        assert r.attrs["status"] == "completed" and r.has("train") and r.attrs["steps_done"] > 0
        for plugin in re.findall(r'plugins=\[([^\]]*)\]', code)[0].replace('"', "").split(","):
            assert r.has(plugin.strip()), (plugin, r.groups())
