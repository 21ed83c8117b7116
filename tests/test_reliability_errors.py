"""The bad-input table: every case exits with status 2, one line on stderr, no traceback, and
writes no store. The table of cases and messages in docs/errors.md is generated from here:
``LSCAPE_WRITE_DOCS=1 pytest tests/test_reliability_errors.py`` rewrites it, and the test
fails when the page and the messages drift apart."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import lscape

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
DATA = ["--data", "synthetic", "--data-opt", "n=64", "--data-opt", "dim=4", "--data-opt", "classes=3"]
RUN = ["run", *DATA, "--steps", "2", "--no-progress"]


def _damage_metadata(store: Path) -> None:
    (store / "train" / "zarr.json").write_text('{"zarr_format": 3, "node_')


def _damage_chunk(store: Path) -> None:
    chunk = sorted((store / "train" / "loss" / "c").rglob("*"))[-1]
    chunk.write_bytes(b"not a chunk")


def _damage_checkpoints(store: Path) -> None:
    # every one: a resume passes over a damaged latest checkpoint to the newest intact one
    for chunk in (store / "checkpoints").rglob("c/*"):
        if chunk.is_file():
            chunk.write_bytes(os.urandom(64))


def _lose_chunk(store: Path) -> None:
    (store / "train" / "loss" / "c" / "0").unlink()


def _edit_attrs(**attrs):
    def edit(store: Path) -> None:
        meta = json.loads((store / "zarr.json").read_text())
        meta["attributes"].update(attrs)
        (store / "zarr.json").write_text(json.dumps(meta))

    edit.__name__ = f"_edit_{'_'.join(attrs)}"
    return edit


def _edit_model(store: Path) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["config"]["model_opts"] = {"widths": 12}
    (store / "zarr.json").write_text(json.dumps(meta))


def _zarr_v2(store: Path) -> None:
    import zarr

    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    shutil.rmtree(store)
    zarr.open_group(str(store), mode="w", zarr_format=2).attrs.update(attrs)


def _edit_config(store: Path) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["config"]["batch_sise"] = 32
    (store / "zarr.json").write_text(json.dumps(meta))


# (case, command line, what to prepare: a damaged copy of a finished run, or a file)
CASES = [
    ("a plugin option that is NaN", [*RUN, "--plugin", "sam", "-o", "sam.rho=nan", "--out", "o.zarr"], None),
    ("a plugin option that is infinite", [*RUN, "--plugin", "sharpness", "-o", "sharpness.tol=inf", "--out", "o.zarr"],
     None),
    ("`nan` in a TOML experiment file", [*RUN, "--config", "exp.toml", "--out", "o.zarr"], "toml-nan"),
    ("a run option out of its range", [*RUN, "--momentum", "1.5", "--out", "o.zarr"], None),
    ("a run option of the wrong type in a TOML file (named by its key)", [*RUN, "--config", "exp.toml", "--out",
                                                                          "o.zarr"], "toml-type"),
    ("an integer option that is infinite", [*RUN, "--plugin", "hessian", "-o", "hessian.k=inf", "--out", "o.zarr"],
     None),
    ("a model factory raising RuntimeError", [*RUN, "--model", "helpers_reliability:raises_runtime", "--out", "o.zarr"],
     None),
    ("a model factory raising KeyError", [*RUN, "--model", "helpers_reliability:raises_key", "--out", "o.zarr"], None),
    ("a data factory raising OSError", ["run", "--data", "helpers_reliability:raises_os", "--steps", "2", "--out",
                                        "o.zarr"], None),
    ("a data factory returning None", ["run", "--data", "helpers_reliability:returns_none", "--steps", "2", "--out",
                                       "o.zarr"], None),
    ("a data set without `__len__`", ["run", "--data", "helpers_reliability:no_len", "--steps", "2", "--out", "o.zarr"],
     None),
    ("a model factory returning a tuple", [*RUN, "--model", "helpers_reliability:returns_tuple", "--out", "o.zarr"],
     None),
    ("a loss that raises", [*RUN, "--loss", "helpers_reliability:raising_loss", "--out", "o.zarr"], None),
    ("`--out` under a file", [*RUN, "--out", "afile/o.zarr"], "afile"),
    ("`--until-loss` below what the loss can reach", [*RUN, "--until-loss", "-1", "--out", "o.zarr"], None),
    ("`--workers 100000`", [*RUN, "--workers", "100000", "--out", "o.zarr"], None),
    ("`--out` with a 300-character name", [*RUN, "--out", "runs/" + "x" * 300 + ".zarr"], None),
    ("`--out` with an unknown protocol", [*RUN, "--out", "bogus://o.zarr"], None),
    ("`--plugin` naming a module without lscape hooks", [*RUN, "--plugin", "json", "--out", "o.zarr"], None),
    ("a `params` pattern that matches nothing", [*RUN, "--plugin", "sharpness", "-o", "sharpness.params=nosuch*",
                                                 "--out", "o.zarr"], None),
    ("`hessian` sizes beyond its product budget", [*RUN, "--plugin", "hessian", "-o", "hessian.trace_samples=200",
                                                  "--out", "o.zarr"], None),
    ("`hessian` density sizes with the density off", [*RUN, "--plugin", "hessian", "-o", "hessian.density_runs=4",
                                                       "--out", "o.zarr"], None),
    ("a memory size that is not one", [*RUN, "--plugin", "sharpness", "-o", "sharpness.memory_budget=lots",
                                       "--out", "o.zarr"], None),
    ("`interpolate.other` that does not exist", [*RUN, "--plugin", "interpolate", "-o", "interpolate.other=bad.pt",
                                                 "--out", "o.zarr"], None),
    ("a probe that does not run on a sharded model", [*RUN, "--strategy", "fsdp", "--plugin", "hessian-exact",
                                                      "--out", "o.zarr"], None),
    ("a curvature option that does not run on a sharded model", [*RUN, "--strategy", "fsdp", "--plugin", "hessian",
                                                                 "-o", "hessian.eigenvectors=true", "--out", "o.zarr"],
     None),
    ("a forced autograd product on a sharded model", [*RUN, "--strategy", "fsdp", "--plugin", "sharpness", "-o",
                                                      "sharpness.method=double-backward", "--out", "o.zarr"], None),
    ("a finite-difference step outside (0, 1)", [*RUN, "--plugin", "sharpness", "-o", "sharpness.fd_eps=0",
                                                 "--out", "o.zarr"], None),
    ("`--strategy fsdp` with fp16's GradScaler", [*RUN, "--strategy", "fsdp", "--precision", "fp16", "--out",
                                                   "o.zarr"], None),
    ("`--probe-budget` outside (0, 1]", [*RUN, "--probe-budget", "0", "--out", "o.zarr"], None),
    ("`measure` of `kind=preconditioned` without optimizer state (a fresh model)",
     ["measure", *DATA, "--plugin", "sharpness", "-o", "sharpness.kind=preconditioned", "--out", "o.zarr"], None),
    ("a store that exists, without `--resume`", [*RUN, "--out", "done.zarr"], "store"),
    ("`--resume` of a store whose every checkpoint is damaged", ["run", "--resume", "done.zarr"], _damage_checkpoints),
    ("`--resume` of a store that lost a chunk", ["run", "--resume", "done.zarr"], _lose_chunk),
    ("`--resume` of a measurement store", ["run", "--resume", "done.zarr"], _edit_attrs(kind="measure")),
    ("`--resume` of a zarr v2 group with lscape's attributes", ["run", "--resume", "done.zarr"], _zarr_v2),
    ("`--resume` of a store whose config is not a table", ["run", "--resume", "done.zarr"],
     _edit_attrs(config=["mlp"])),
    ("`--resume` of a store whose config no longer fits its checkpoint", ["run", "--resume", "done.zarr"],
     _edit_model),
    ("`--resume --steps` below the run's length", ["run", "--resume", "done.zarr", "--steps", "2"], "store"),
    ("`--resume` of a store whose config was edited by hand", ["run", "--resume", "done.zarr"], _edit_config),
    ("`show` of a store with damaged metadata", ["show", "done.zarr"], _damage_metadata),
    ("`show` of a store with a damaged chunk", ["show", "done.zarr"], _damage_chunk),
    ("`plot --out` naming a file", ["plot", "done.zarr", "--out", "afile"], "afile+store"),
    ("`measure` of a `.pt` of another architecture", ["measure", "other.pt", *DATA, "--plugin", "grad-norm",
                                                      "--out", "o.zarr"], "other.pt"),
    ("`measure` of a pickled model (`torch.save(model)`)", ["measure", "pickled.pt", *DATA, "--plugin", "grad-norm",
                                                            "--out", "o.zarr"], "pickled.pt"),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    path = tmp_path_factory.mktemp("finished") / "done.zarr"
    lscape.run(data="synthetic", data_opts={"n": 64, "dim": 4, "classes": 3}, model_opts={"widths": 8},
               batch_size=16, steps=3, checkpoint_schedule="every:1", progress=False, out=str(path))
    return path


def _prepare(what, here: Path, finished: Path) -> None:
    if what is None:
        return
    if what in ("store", "afile+store") or callable(what):
        shutil.copytree(finished, here / "done.zarr")
        if callable(what):
            what(here / "done.zarr")
    if what in ("afile", "afile+store"):
        (here / "afile").write_text("a file\n")
    if what == "toml-nan":
        (here / "exp.toml").write_text("[plugins.sharpness]\ntol = nan\n")
    if what == "toml-type":
        (here / "exp.toml").write_text('compile = "yes"\n')
    if what == "other.pt":
        torch.save({"net.1.weight": torch.zeros(3, 3)}, here / "other.pt")
    if what == "pickled.pt":
        torch.save(torch.nn.Linear(4, 3), here / "pickled.pt")


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, finished, monkeypatch):
    rows = []
    for i, (case, args, what) in enumerate(CASES):
        here = tmp_path / f"case{i}"
        here.mkdir()
        monkeypatch.chdir(here)
        _prepare(what, here, finished)
        before = sorted(p.name for p in here.iterdir())
        code, _, err = cli(*args)
        lines = err.strip().splitlines()
        assert code == 2, (case, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
        assert "Traceback" not in err
        assert not (here / "o.zarr").exists(), case
        after = sorted(p.name for p in here.iterdir() if p.name != "done-plots")
        assert after == before, (case, "wrote", sorted(set(after) - set(before)))
        rows.append((case, "lscape " + " ".join(a if " " not in a else repr(a) for a in args),
                     lines[0].removeprefix("error: ").replace(str(here), ".")))
    page = _page(rows)
    if os.environ.get("LSCAPE_WRITE_DOCS"):
        DOC.write_text(page)
    assert DOC.read_text() == page, "docs/errors.md is out of date: LSCAPE_WRITE_DOCS=1 pytest " + __file__


def _page(rows) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = [
        "# Bad input and what lscape says",
        "",
        "Bad input exits with status 2 and one line on stderr, before anything is written (no store, no",
        "figure folder). User code that raises (a factory, a loss, a model's forward) is named in that",
        "line; `LSCAPE_DEBUG=1` adds the full traceback. A failure inside a plugin during a run is",
        "different: it names the plugin, flushes the store, marks it failed and exits with status 1.",
        "",
        "This page is generated by `tests/test_reliability_errors.py`, which runs every case below",
        "(`LSCAPE_WRITE_DOCS=1` rewrites it). `DATA` stands for",
        "`--data synthetic --data-opt n=64 --data-opt dim=4 --data-opt classes=3`.",
        "",
        "| case | command | message |",
        "|---|---|---|",
    ]
    data = " ".join(DATA)
    for case, command, message in rows:
        command = command.replace(data, "DATA").replace(" --steps 2 --no-progress", "")
        out.append(f"| {cell(case)} | `{cell(command)}` | {cell(message)} |")
    return "\n".join(out) + "\n"


def test_ctrl_c_while_the_cli_imports_is_one_line_and_exit_130(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "lscape", "run", "--steps", "100000", "--no-progress",
                             "--out", str(tmp_path / "c.zarr")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(0.3)  # torch is still importing
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_warning_raised_before_a_refusal_keeps_it_one_line(tmp_path):
    """Torch (or user code) warning while the input is checked would turn one `error:` line
    into three; the warning is shown only when the checks pass."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-m", "lscape", *RUN, "--model", "helpers_reliability:warns_then_fails",
                           "--out", str(tmp_path / "o.zarr")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_warnings_of_accepted_input_are_still_shown():
    import warnings

    from lscape.errors import UsageError, warnings_held

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with warnings_held():
            warnings.warn("kept", UserWarning)
        with pytest.raises(UsageError):
            with warnings_held():
                warnings.warn("dropped", UserWarning)
                raise UsageError("bad input")
    assert [str(w.message) for w in seen] == ["kept"]
