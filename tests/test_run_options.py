"""The run options are one table (the fields of ``RunConfig``, each with its ``Option``):
the TOML keys, the flags of ``lscape run``/``lscape measure``, the ``lscape.run`` and
``attach`` keywords and the checks all come from it, and a bad value is named in the words
of whoever gave it."""

from __future__ import annotations

import dataclasses
import inspect
import os

import click
import pytest

import lscape
from lscape.config import RunConfig, load_toml, run_options
from lscape.errors import UsageError
from lscape.options import CLI, PYTHON, in_file

# (option, bad value as text / as a TOML or Python value, what the message says after the name)
BAD = [
    ("momentum", "2", 2, "must be in [0, 1), got"),
    ("lr", "-1", -1, "must be a positive finite number"),
    ("lr", "fast", "fast", "must be a number"),
    ("steps", "0", 0, "must be a positive integer"),
    ("batch_size", "many", "many", "must be a positive integer or 'full'"),
    ("data_seed", "-1", -1, "must be an integer in [0, 2**32)"),
    ("device", "tpu", "tpu", "must be cpu or cuda"),
    ("until_loss_every", "0", 0, "must be a positive integer"),
]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("name, text, value, says", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_a_bad_value_is_named_in_each_callers_words(cli, tmp_path, name, text, value, says):
    before = set(os.listdir(tmp_path))
    # the command line: the flag
    code, _, err = cli("run", _flag(name), text, "--out", tmp_path / "o.zarr")
    assert code == 2 and err.strip().startswith(f"error: {_flag(name)} {says}"), err
    # Python: the keyword, and no flag
    with pytest.raises(UsageError) as e:
        lscape.run(**{name: value}, out=str(tmp_path / "p.zarr"), progress=False)
    assert str(e.value).startswith(f"{name}= {says}") and "--" not in str(e.value), e.value
    # a TOML file: the file and its key
    toml = tmp_path / "exp.toml"
    toml.write_text(f"{name} = {value!r}\n".replace("'", '"'))
    code, _, err = cli("run", "--config", toml, "--out", tmp_path / "t.zarr")
    assert code == 2 and f"{toml}: '{name}' {says}" in err and "--" not in err.split(says)[0], err
    assert set(os.listdir(tmp_path)) == before | {"exp.toml"}  # nothing written


def test_options_checked_together_are_named_as_given(cli, tmp_path):
    code, _, err = cli("run", "--epochs", "2", "--steps", "3", "--out", tmp_path / "o.zarr")
    assert code == 2 and "give --epochs or --steps, not both" in err
    with pytest.raises(UsageError, match="give epochs= or steps=, not both"):
        lscape.api.make_config(epochs=2, steps=3).validate()
    (tmp_path / "exp.toml").write_text("epochs = 2\n")
    code, _, err = cli("run", "--config", tmp_path / "exp.toml", "--steps", "3", "--epochs", "4",
                       "--out", tmp_path / "o.zarr")
    assert code == 2 and "give --epochs or --steps" in err
    # the file's epochs and Python's steps: each in its own words
    cfg = load_toml(tmp_path / "exp.toml")
    cfg.steps, cfg.sources["steps"] = 3, PYTHON
    with pytest.raises(UsageError, match=f"give {tmp_path / 'exp.toml'}: 'epochs' or steps=, not both"):
        cfg.validate()


@pytest.mark.parametrize("line, says", [
    ('compile = "yes"', "'compile' must be true/false or a torch.compile backend name, got 'yes'"),
    ('nesterov = "yes"', "'nesterov' must be true or false, got 'yes'"),
    ("model = [1]", "'model' must be text, got [1]"),
    ('model_opts = "widths=4"', "'model_opts' must be a table of KEY = VALUE, got 'widths=4'"),
    ("seed = 1.5", "'seed' must be an integer, got 1.5"),
    ("batch_size = 16.0", "'batch_size' must be a positive integer or 'full', got 16.0"),
    ('compile = "00"', "'compile' must be true/false or a torch.compile backend name, got '00'"),
    ('plugins = "grad-norm"\ndisable = 3', "'disable' must be a list of plugin names, got 3"),
])
def test_a_toml_value_of_the_wrong_type_is_refused_when_the_file_is_read(tmp_path, line, says):
    path = tmp_path / "exp.toml"
    path.write_text(line + "\n")
    with pytest.raises(UsageError) as e:
        load_toml(path)
    assert str(e.value) == f"{path}: {says}" and "\n" not in str(e.value)


def test_a_torch_compile_backend_name_is_accepted_in_a_file(tmp_path):
    (tmp_path / "exp.toml").write_text('compile = "eager"\nlr = "0.5"\n')
    cfg = load_toml(tmp_path / "exp.toml")
    assert cfg.compile == "eager" and cfg.lr == 0.5


def test_check_is_pure_and_validate_normalises_explicitly():
    cfg = RunConfig(momentum="0.5", batch_size=" FULL ", precision="BF16")
    before = dataclasses.asdict(cfg)
    values = cfg.check()
    assert values["momentum"] == 0.5 and values["batch_size"] == "full" and values["precision"] == "bf16"
    assert dataclasses.asdict(cfg) == before  # nothing changed by checking
    bad = RunConfig(momentum=0.5, steps=0)
    with pytest.raises(UsageError, match=r"^steps= must be a positive integer"):
        bad.check()
    assert bad.momentum == 0.5 and bad.checkpoint_schedule is None
    cfg.validate()
    assert (cfg.momentum, cfg.batch_size, cfg.precision) == (0.5, "full", "bf16")
    assert cfg.checkpoint_schedule == "every:100" and cfg.plugins == ["grad-norm"]


def test_every_option_is_one_table_entry_and_a_click_option_with_its_default_shown():
    from lscape.cli import measure, run

    table = run_options()
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    assert set(table) == set(fields)
    for name, opt in table.items():
        assert opt.name == name and opt.help
        default = fields[name].default_factory() if fields[name].default is dataclasses.MISSING \
            else fields[name].default
        assert default == opt.default == getattr(RunConfig(), name), name
    params = {p.name: p for p in run.params if isinstance(p, click.Option)}
    own = {"config_path", "trust_store", "help"}
    assert set(params) - own == {n for n, o in table.items() if o.cli is not None}  # nothing else
    for name, opt in table.items():
        p = params[name]
        assert p.show_default, name
        assert set(opt.flag.split("/")) <= {*p.opts, *p.secondary_opts}, name
        assert "[default" not in p.help, f"{name}: a default retyped in the help text"
        if not p.multiple and opt.cli.default_text is None:
            assert p.default == opt.default, name
    # measure's --plugin (the probes to run) and --out (the measurement store) are its own
    measured = {p.name: p for p in measure.params if isinstance(p, click.Option)}
    for name in ("model", "model_opts", "data", "data_opts", "loss", "batch_size", "seed", "data_seed", "device"):
        assert measured[name].show_default and table[name].flag in measured[name].opts, name


def test_the_python_keywords_are_the_table(tmp_path):
    table = run_options()
    for name in table:  # every option is a keyword of make_config / lscape.run ...
        lscape.api.make_config(**{name: None})
    with pytest.raises(UsageError, match="unknown run option 'momentun'; did you mean 'momentum'"):
        lscape.api.make_config(momentun=0.9)
    # ... and attach's keywords that are run options have the table's defaults
    signature = inspect.signature(lscape.attach).parameters
    for name in ("out", "seed", "progress"):
        assert signature[name].default == table[name].default, name
    import torch

    with pytest.raises(UsageError, match=r"^seed= must be a 64-bit integer"):
        lscape.attach(torch.nn.Linear(2, 2), seed=2**64, out=str(tmp_path / "a.zarr"))
    with pytest.raises(UsageError, match=r"^batch_size= must be a positive integer or 'full'"):
        lscape.attach(torch.nn.Linear(2, 2), batch_size=0, out=str(tmp_path / "a.zarr"))
    assert not (tmp_path / "a.zarr").exists()


def test_run_help_shows_the_defaults(cli):
    code, out, _ = cli("run", "--help")
    assert code == 0
    text = " ".join(out.split())
    for flag, default in (("--lr", "0.1"), ("--momentum", "0.0"), ("--batch-size", "64"), ("--model", "mlp"),
                          ("--seed", "0"), ("--precision", "fp32"), ("--on-nan", "stop"), ("--until-loss-every", "1")):
        after = text.split(f" {flag} ", 1)[1]
        assert f"[default: {default}]" in after.split(" --", 1)[0], (flag, after[:200])
    assert "[default: (10 without --steps or --time-limit)]" in text


def test_measure_names_a_bad_value_by_its_flag(cli, tmp_path):
    code, _, err = cli("measure", "--plugin", "grad-norm", "--batch-size", "0", "--out", tmp_path / "m.zarr")
    assert code == 2 and "error: --batch-size must be a positive integer or 'full', got '0'" in err
    assert not (tmp_path / "m.zarr").exists()


def test_an_option_is_spelled_for_its_source():
    momentum = run_options()["momentum"]
    assert momentum.spelled(CLI) == "--momentum"
    assert momentum.spelled(PYTHON) == "momentum="
    assert momentum.spelled(in_file("exp.toml")) == "exp.toml: 'momentum'"
    assert run_options()["plugin_options"].spelled(CLI) == "-o"
    assert run_options()["progress"].flag == "--progress/--no-progress"
